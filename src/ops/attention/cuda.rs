//! CUDA twin of rel_pos_attention (cuda/attention.cu).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::cuda::{CudaDevice, cfg1d, launch_err};
use crate::error::{Error, Result};

/// qkv [b, g, g, 3d], bias [3d], rel_h / rel_w [2s - 1, 64] -> [b, g, g, d].
/// `window` 0 means global attention (s = g). Head dim must be 64.
#[allow(clippy::too_many_arguments)]
pub fn rel_pos_attention(
    dev: &CudaDevice,
    qkv: &CudaSlice<f32>,
    bias: &CudaSlice<f32>,
    rel_h: &CudaSlice<f32>,
    rel_w: &CudaSlice<f32>,
    b: usize,
    g: usize,
    d: usize,
    heads: usize,
    window: usize,
) -> Result<CudaSlice<f32>> {
    const OP: &str = "rel_pos_attention (cuda)";
    let s = if window == 0 { g } else { window };
    check_rel_pos(OP, qkv, bias, rel_h, rel_w, b, g, d, heads, s)?;
    let mut out = dev.alloc(b * g * g * d)?;
    let f = dev.function("attention", "rel_pos_attention_f32")?;
    let cfg = rel_pos_attention_config(b, g, heads, s);
    let (bb, gg, dd, ss) = (b as i32, g as i32, d as i32, s as i32);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut out)
        .arg(qkv)
        .arg(bias)
        .arg(rel_h)
        .arg(rel_w)
        .arg(&bb)
        .arg(&gg)
        .arg(&dd)
        .arg(&ss);
    // SAFETY: buffer sizes checked above against the indices the kernel forms
    // (tokens of b g g positions, 3d channels, tables of 2s - 1 rows of 64);
    // S <= 32 fits the kernel's per-warp bias arrays; argument types match.
    unsafe { l.launch(cfg) }.map_err(launch_err("rel_pos_attention launch"))?;
    Ok(out)
}

/// Launch geometry of rel_pos_attention_f32 (shared with the host-emulation
/// tests): 8 warps of one (image, window, head) per block, one query per warp.
pub fn rel_pos_attention_config(b: usize, g: usize, heads: usize, s: usize) -> LaunchConfig {
    let nwin = g.div_ceil(s);
    LaunchConfig {
        grid_dim: (
            (s * s).div_ceil(8) as u32,
            heads as u32,
            (b * nwin * nwin) as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch geometry of rel_pos_attention_tc_*: 4 warps take 64 of the real
/// queries of one (image, window, head); the fullest window has min(s, g)^2.
pub fn rel_pos_attention_tc_config(b: usize, g: usize, heads: usize, s: usize) -> LaunchConfig {
    let nwin = g.div_ceil(s);
    LaunchConfig {
        grid_dim: (
            (s.min(g) * s.min(g)).div_ceil(64) as u32,
            heads as u32,
            (b * nwin * nwin) as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// rel_pos_attention on tensor cores (bf16 q / k / v and probabilities, f32
/// accumulation and softmax), writing bf16: the input of the bf16 proj GEMM.
/// `biased`: whether qkv already holds the qkv bias (else the kernel adds it).
/// Shapes as rel_pos_attention.
#[allow(clippy::too_many_arguments)]
pub fn rel_pos_attention_tc_bf16(
    dev: &CudaDevice,
    qkv: &CudaSlice<f32>,
    bias: &CudaSlice<f32>,
    rel_h: &CudaSlice<f32>,
    rel_w: &CudaSlice<f32>,
    b: usize,
    g: usize,
    d: usize,
    heads: usize,
    window: usize,
    biased: bool,
) -> Result<CudaSlice<half::bf16>> {
    const OP: &str = "rel_pos_attention (cuda, tensor cores)";
    let s = if window == 0 { g } else { window };
    check_rel_pos(OP, qkv, bias, rel_h, rel_w, b, g, d, heads, s)?;
    let mut out = dev.alloc_bf16(b * g * g * d)?;
    let f = dev.function("attention", "rel_pos_attention_tc_bf16")?;
    let (bb, gg, dd, ss, bi) = (b as i32, g as i32, d as i32, s as i32, biased as i32);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut out).arg(qkv).arg(bias).arg(rel_h).arg(rel_w);
    l.arg(&bb).arg(&gg).arg(&dd).arg(&ss).arg(&bi);
    // SAFETY: sizes checked by check_rel_pos against the indices the kernel
    // forms (b g g tokens of 3d channels, tables of 2s - 1 rows of 64, s <= 32
    // for its per-row bias arrays); out holds b g g d bf16; types match
    // (unsigned short*, const float* x4, int x5).
    unsafe { l.launch(rel_pos_attention_tc_config(b, g, heads, s)) }
        .map_err(launch_err("rel_pos_attention_tc launch"))?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn check_rel_pos(
    op: &'static str,
    qkv: &CudaSlice<f32>,
    bias: &CudaSlice<f32>,
    rel_h: &CudaSlice<f32>,
    rel_w: &CudaSlice<f32>,
    b: usize,
    g: usize,
    d: usize,
    heads: usize,
    s: usize,
) -> Result<()> {
    if heads == 0 || d != heads * 64 {
        return Err(Error::shape(
            op,
            format!("width {d} with {heads} heads: the kernel needs head dim 64"),
        ));
    }
    if s == 0
        || s > 32
        || qkv.len() != b * g * g * 3 * d
        || bias.len() != 3 * d
        || rel_h.len() != (2 * s - 1) * 64
        || rel_w.len() != (2 * s - 1) * 64
    {
        return Err(Error::shape(
            op,
            format!(
                "qkv {} bias {} rel {} / {} for b {b} g {g} d {d} window {s} (at most 32)",
                qkv.len(),
                bias.len(),
                rel_h.len(),
                rel_w.len()
            ),
        ));
    }
    Ok(())
}

/// Launch geometry of mha_f32: one warp per (n, head, query), 8 per block.
pub fn mha_config(n: usize, heads: usize, lq: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n * heads * lq).div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Multi-head attention on projected q [N, Lq, I], k / v [N, Lk, I]: [N, Lq, I].
/// Any of q, k, v may have a batch of 1, shared by all N (no copies).
pub fn mha(
    dev: &CudaDevice,
    q: &impl crate::cuda::GpuIn,
    k: &impl crate::cuda::GpuIn,
    v: &impl crate::cuda::GpuIn,
    heads: usize,
) -> Result<crate::cuda::GpuTensor> {
    const OP: &str = "attention (cuda)";
    let bad = || {
        Error::shape(
            OP,
            format!(
                "q {:?}, k {:?}, v {:?}, {heads} heads (head dim at most 64)",
                q.dims(),
                k.dims(),
                v.dims()
            ),
        )
    };
    let ([nq, lq, i], [nk, lk, ik], [nv, lv, iv]): ([usize; 3], [usize; 3], [usize; 3]) = (
        q.dims().try_into().map_err(|_| bad())?,
        k.dims().try_into().map_err(|_| bad())?,
        v.dims().try_into().map_err(|_| bad())?,
    );
    let n = nq.max(nk).max(nv);
    let fits = |b: usize| b == n || b == 1;
    if ik != i
        || iv != i
        || lv != lk
        || !fits(nq)
        || !fits(nk)
        || !fits(nv)
        || heads == 0
        || i % heads != 0
        || i / heads > 64
    {
        return Err(bad());
    }
    let mut out = dev.alloc(n * lq * i)?;
    let f = dev.function("decoder", "mha_f32")?;
    let cfg = mha_config(n, heads, lq);
    let (nn, lqq, lkk, ii, hh) = (n as i32, lq as i32, lk as i32, i as i32, heads as i32);
    let (bq, bk, bv) = ((nq > 1) as i32, (nk > 1) as i32, (nv > 1) as i32);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut out)
        .arg(q.data())
        .arg(k.data())
        .arg(v.data())
        .arg(&nn)
        .arg(&lqq)
        .arg(&lkk)
        .arg(&ii)
        .arg(&hh)
        .arg(&bq)
        .arg(&bk)
        .arg(&bv);
    // SAFETY: one warp per (n, head, query) reads its q row, the Lk rows of k and
    // v of its head (item n, or item 0 of a shared batch), writes its output
    // row; all within the sizes checked above; 12 arguments as the kernel's.
    unsafe { l.launch(cfg) }.map_err(launch_err("mha launch"))?;
    Ok(crate::cuda::GpuTensor {
        data: out,
        dims: vec![n, lq, i],
    })
}

/// The weights of one ViT block as `vit_block_bf16` takes them: the four GEMM
/// weights in bf16 ([out, in]), everything else f32.
pub struct VitBlockBf16<'a> {
    /// [D] each
    pub norm1: (&'a CudaSlice<f32>, &'a CudaSlice<f32>),
    /// [3D, D] bf16, [3D]
    pub qkv: (&'a CudaSlice<half::bf16>, &'a CudaSlice<f32>),
    /// [D, D] bf16, [D]
    pub proj: (&'a CudaSlice<half::bf16>, &'a CudaSlice<f32>),
    /// [2S - 1, 64] each
    pub rel: (&'a CudaSlice<f32>, &'a CudaSlice<f32>),
    /// [D] each
    pub norm2: (&'a CudaSlice<f32>, &'a CudaSlice<f32>),
    /// [M, D] bf16, [M]
    pub lin1: (&'a CudaSlice<half::bf16>, &'a CudaSlice<f32>),
    /// [D, M] bf16, [D]
    pub lin2: (&'a CudaSlice<half::bf16>, &'a CudaSlice<f32>),
    pub heads: usize,
    /// 0: global attention.
    pub window: usize,
}

/// One ViT block with bf16 GEMM inputs, fused: the LayerNorms write the bf16
/// GEMM inputs directly, the tensor-core attention adds the qkv bias while it
/// loads and writes the bf16 proj input, lin1's epilogue (bias + GELU) writes
/// lin2's bf16 input, and both residual adds ride on the GEMMs (beta = 1 onto
/// x + bias). 6 kernels and 4 GEMMs; every GEMM bf16 x bf16 -> f32.
/// x [b, g, g, d] f32 -> [b, g, g, d] f32.
pub fn vit_block_bf16(
    dev: &CudaDevice,
    blas: &crate::cuda::blas::Blas,
    x: &CudaSlice<f32>,
    w: &VitBlockBf16<'_>,
    (b, g, d): (usize, usize, usize),
) -> Result<CudaSlice<f32>> {
    use crate::ops::activation::{Act, cuda as act};
    use crate::ops::norm::cuda::layer_norm_bf16;
    const OP: &str = "vit_block_bf16 (cuda)";
    let t = b * g * g;
    let m = w.lin1.1.len();
    if x.len() != t * d
        || w.norm1.0.len() != d
        || w.norm1.1.len() != d
        || w.norm2.0.len() != d
        || w.norm2.1.len() != d
        || w.qkv.0.len() != 3 * d * d
        || w.qkv.1.len() != 3 * d
        || w.proj.0.len() != d * d
        || w.proj.1.len() != d
        || w.lin1.0.len() != m * d
        || w.lin2.0.len() != d * m
        || w.lin2.1.len() != d
    {
        return Err(Error::shape(
            OP,
            format!(
                "x of {} values for [{b}, {g}, {g}, {d}], qkv {} / {}, proj {} / {}, \
                 lin1 {} / {m}, lin2 {} / {}",
                x.len(),
                w.qkv.0.len(),
                w.qkv.1.len(),
                w.proj.0.len(),
                w.proj.1.len(),
                w.lin1.0.len(),
                w.lin2.0.len(),
                w.lin2.1.len()
            ),
        ));
    }
    let st = dev.stream();
    let h = layer_norm_bf16(dev, x, w.norm1.0, w.norm1.1, d, 1e-6)?;
    let mut qkv = dev.alloc(t * 3 * d)?;
    blas.linear_bf16(st, &h, w.qkv.0, &mut qkv, t, 3 * d, d, false)?;
    drop(h);
    let a = rel_pos_attention_tc_bf16(
        dev, &qkv, w.qkv.1, w.rel.0, w.rel.1, b, g, d, w.heads, w.window, false,
    )?;
    drop(qkv);
    let mut x1 = act::add_bias_rows(dev, x, w.proj.1)?;
    blas.linear_bf16(st, &a, w.proj.0, &mut x1, t, d, d, true)?;
    drop(a);
    let h2 = layer_norm_bf16(dev, &x1, w.norm2.0, w.norm2.1, d, 1e-6)?;
    let mut hid = dev.alloc(t * m)?;
    blas.linear_bf16(st, &h2, w.lin1.0, &mut hid, t, m, d, false)?;
    drop(h2);
    let h16 = act::bias_act_bf16(dev, &hid, w.lin1.1, m, Act::Gelu)?;
    drop(hid);
    let mut y = act::add_bias_rows(dev, &x1, w.lin2.1)?;
    blas.linear_bf16(st, &h16, w.lin2.0, &mut y, t, d, m, true)?;
    Ok(y)
}

/// attention's backward on the device (cuda/decoder.cu mha_backward_*):
/// (dq, dk, dv) per item, [N, L, I] each; the caller sums a shared
/// operand's over the items. q [nq, Lq, I], k / v [nk / nv, Lk, I], g [N, Lq, I].
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn mha_backward(
    dev: &CudaDevice,
    q: &CudaSlice<f32>,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    batched: [bool; 3],
    (n, lq, lk, i, heads): (usize, usize, usize, usize, usize),
) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
    let items = |b: bool| if b { n } else { 1 };
    if heads == 0
        || i % heads != 0
        || i / heads > 64
        || q.len() != items(batched[0]) * lq * i
        || k.len() != items(batched[1]) * lk * i
        || v.len() != items(batched[2]) * lk * i
        || g.len() != n * lq * i
    {
        return Err(Error::shape(
            "attention backward (cuda)",
            format!("{n} items, {lq} queries, {lk} keys, width {i}, {heads} heads"),
        ));
    }
    let (mut dq, mut dk, mut dv) = (
        dev.alloc(n * lq * i)?,
        dev.alloc(n * lk * i)?,
        dev.alloc(n * lk * i)?,
    );
    let (mut lse, mut dd) = (dev.alloc(n * heads * lq)?, dev.alloc(n * heads * lq)?);
    let a = [n, lq, lk, i, heads].map(|x| x as i32);
    let fl = batched.map(|b| b as i32);
    let f = dev.function("decoder", "mha_backward_q")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut dq)
        .arg(&mut lse)
        .arg(&mut dd)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(g);
    for x in a.iter().chain(&fl) {
        l.arg(x);
    }
    // SAFETY: sizes checked above against the indices the kernel forms;
    // hd <= 64 fits its per-thread arrays; types match.
    unsafe { l.launch(cfg1d(n * heads * lq)) }.map_err(launch_err("mha_backward_q launch"))?;
    let f = dev.function("decoder", "mha_backward_kv")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut dk)
        .arg(&mut dv)
        .arg(&lse)
        .arg(&dd)
        .arg(q)
        .arg(k)
        .arg(v)
        .arg(g);
    for x in a.iter().chain(&fl) {
        l.arg(x);
    }
    // SAFETY: as above; lse and dd hold n heads lq floats.
    unsafe { l.launch(cfg1d(n * heads * lk)) }.map_err(launch_err("mha_backward_kv launch"))?;
    Ok((dq, dk, dv))
}

/// rel_pos_attention's input gradient on the device (cuda/attention.cu
/// rel_pos_backward_*): g [b, G, G, D] -> dqkv [b, G, G, 3D]. Head dim 64.
#[allow(clippy::too_many_arguments)]
pub fn rel_pos_attention_backward(
    dev: &CudaDevice,
    qkv: &CudaSlice<f32>,
    bias: &CudaSlice<f32>,
    rel_h: &CudaSlice<f32>,
    rel_w: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    (b, gr, d, heads, window): (usize, usize, usize, usize, usize),
) -> Result<CudaSlice<f32>> {
    const OP: &str = "rel_pos_attention backward (cuda)";
    let s = if window == 0 { gr } else { window };
    check_rel_pos(OP, qkv, bias, rel_h, rel_w, b, gr, d, heads, s)?;
    if g.len() != b * gr * gr * d {
        return Err(Error::shape(OP, format!("gradient of {} values", g.len())));
    }
    let nwin = gr.div_ceil(s);
    let rows = b * nwin * nwin * heads * s * s;
    let mut dq = dev.alloc(qkv.len())?;
    let (mut lse, mut dd) = (dev.alloc(rows)?, dev.alloc(rows)?);
    let a = [b, gr, d, s].map(|x| x as i32);
    let f = dev.function("attention", "rel_pos_backward_q")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut dq)
        .arg(&mut lse)
        .arg(&mut dd)
        .arg(qkv)
        .arg(bias)
        .arg(rel_h)
        .arg(rel_w)
        .arg(g);
    for x in &a {
        l.arg(x);
    }
    // SAFETY: sizes checked by check_rel_pos (head dim 64, tables of 2S - 1
    // rows) and above; lse / dd hold one float per (b, window, head,
    // position); types match.
    unsafe { l.launch(cfg1d(rows)) }.map_err(launch_err("rel_pos_backward_q launch"))?;
    let f = dev.function("attention", "rel_pos_backward_kv")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut dq)
        .arg(&lse)
        .arg(&dd)
        .arg(qkv)
        .arg(bias)
        .arg(rel_h)
        .arg(rel_w)
        .arg(g);
    for x in &a {
        l.arg(x);
    }
    // SAFETY: as above.
    unsafe { l.launch(cfg1d(rows)) }.map_err(launch_err("rel_pos_backward_kv launch"))?;
    Ok(dq)
}
