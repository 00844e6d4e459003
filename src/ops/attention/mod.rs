//! Attention.
//!
//! * `rel_pos_attention`: the image encoder's multi-head attention with decomposed
//!   relative position bias (MViTv2 / SAM), for window blocks (the G x G grid
//!   zero-padded to a multiple of the window and cut into windows, row-major) and
//!   global blocks (window = 0: one window of the whole grid). Only the real
//!   tokens' q, k, v are passed in: a padded token is the zero vector after
//!   norm1, so its key and value are exactly the k and v biases; the padded
//!   queries' outputs are dropped by the model, so they are not computed at all.
//!   This gives the reference's numbers while skipping (Gp^2 - G^2) / Gp^2 of the
//!   qkv / proj work.
//! * `attention`: plain multi-head attention on projected q, k, v (the two-way
//!   transformer of the mask decoder).

mod cpu;
pub mod cuda;

use crate::error::{Error, Result};
use crate::ops::{cpu_f32, cuda_input, same_device};
use crate::tensor::{Device, Tensor};

/// qkv [B, G, G, 3 * D] (channel = which * D + head * hd + c, as SAM's reshape),
/// qkv_bias [3 * D], rel_h / rel_w [2 S - 1, hd] with S the window (or G when
/// `window == 0`) -> [B, G, G, D], the attention output before `proj`.
/// Logits = (q * hd^-0.5) k^T + q . Rh[qh - kh + S - 1] + q . Rw[qw - kw + S - 1].
pub fn rel_pos_attention(
    qkv: &Tensor,
    qkv_bias: &Tensor,
    rel_h: &Tensor,
    rel_w: &Tensor,
    heads: usize,
    window: usize,
) -> Result<Tensor> {
    const OP: &str = "rel_pos_attention";
    let _p = crate::profile::scope(OP);
    let [b, gh, gw, c3] = qkv.dims_n::<4>(OP, "qkv")?;
    if gh != gw {
        return Err(Error::shape(
            OP,
            format!("grid must be square, qkv {:?}", qkv.dims()),
        ));
    }
    if heads == 0 || c3 % (3 * heads) != 0 {
        return Err(Error::shape(
            OP,
            format!("qkv {:?} cannot split into 3 x {heads} heads", qkv.dims()),
        ));
    }
    let d = c3 / 3;
    let hd = d / heads;
    qkv_bias.expect_dims(OP, "qkv bias", &[c3])?;
    let s = if window == 0 { gh } else { window };
    rel_h.expect_dims(OP, "rel_pos_h", &[2 * s - 1, hd])?;
    rel_w.expect_dims(OP, "rel_pos_w", &[2 * s - 1, hd])?;
    // The image encoder is frozen: gradients flow to qkv only.
    crate::autograd::no_backward(
        "rel_pos_attention (qkv bias, rel-pos tables)",
        &[qkv_bias, rel_h, rel_w],
    )?;
    let mut y = rel_pos_attention_forward(
        qkv,
        qkv_bias,
        rel_h,
        rel_w,
        heads,
        window,
        (b, gh, d, hd, s),
    )?;
    if crate::autograd::requires_grad(qkv) {
        let (q, bias, rh, rw) = (qkv.clone(), qkv_bias.clone(), rel_h.clone(), rel_w.clone());
        crate::autograd::record_unary(OP, qkv, &mut y, crate::autograd::bytes(qkv), move |g| {
            const OP: &str = "rel_pos_attention backward";
            if let Device::Cuda(_) = same_device(OP, &[g, &q, &bias, &rh, &rw])? {
                let cs = [g, &q, &bias, &rh, &rw].map(|t| cuda_input(OP, t));
                let [gc, qc, bc, hc, wc] = cs;
                let (gc, qc, bc, hc, wc) = (gc?, qc?, bc?, hc?, wc?);
                let (dev, gsl) = gc.cuda_whole_f32(OP)?;
                let dq = cuda::rel_pos_attention_backward(
                    dev,
                    qc.cuda_whole_f32(OP)?.1,
                    bc.cuda_whole_f32(OP)?.1,
                    hc.cuda_whole_f32(OP)?.1,
                    wc.cuda_whole_f32(OP)?.1,
                    gsl,
                    (b, gh, d, heads, window),
                )?;
                return Tensor::from_cuda_f32(dev, dq, q.dims());
            }
            let dq = cpu::rel_pos_attention_backward(
                cpu_f32(OP, &q)?,
                cpu_f32(OP, &bias)?,
                cpu_f32(OP, &rh)?,
                cpu_f32(OP, &rw)?,
                cpu_f32(OP, g)?,
                cpu::RelPosGeometry {
                    b,
                    g: gh,
                    heads,
                    hd,
                    s,
                },
            );
            Ok(Tensor::from_f32(dq, q.dims()))
        });
    }
    Ok(y)
}

fn rel_pos_attention_forward(
    qkv: &Tensor,
    qkv_bias: &Tensor,
    rel_h: &Tensor,
    rel_w: &Tensor,
    heads: usize,
    window: usize,
    (b, gh, d, hd, s): (usize, usize, usize, usize, usize),
) -> Result<Tensor> {
    const OP: &str = "rel_pos_attention";
    let gw = gh;
    if let Device::Cuda(_) = same_device(OP, &[qkv, qkv_bias, rel_h, rel_w])? {
        // The kernels hold a head of 64 channels in a warp (2 per lane), and
        // windows up to 32: SAM's ViTs (B, L, H) all have head dim 64.
        let ins = [qkv, qkv_bias, rel_h, rel_w].map(|t| cuda_input(OP, t));
        let [q, bias, rh, rw] = ins;
        let (q, bias, rh, rw) = (q?, bias?, rh?, rw?);
        let (dev, qs) = q.cuda_whole_f32(OP)?;
        let y = cuda::rel_pos_attention(
            dev,
            qs,
            bias.cuda_whole_f32(OP)?.1,
            rh.cuda_whole_f32(OP)?.1,
            rw.cuda_whole_f32(OP)?.1,
            b,
            gh,
            d,
            heads,
            window,
        )?;
        return Tensor::from_cuda_f32(dev, y, [b, gh, gw, d]);
    }
    let out = cpu::rel_pos_attention(
        cpu_f32(OP, qkv)?,
        cpu_f32(OP, qkv_bias)?,
        cpu_f32(OP, rel_h)?,
        cpu_f32(OP, rel_w)?,
        cpu::RelPosGeometry {
            b,
            g: gh,
            heads,
            hd,
            s,
        },
    );
    Ok(Tensor::from_f32(out, &[b, gh, gw, d]))
}

/// The tensors of one ViT block, for `vit_block_bf16`.
pub struct VitBlock<'a> {
    /// LayerNorm weight and bias [D] each
    pub norm1: (&'a Tensor, &'a Tensor),
    /// Linear weight [3D, D] (bf16) and bias [3D]
    pub qkv: (&'a Tensor, &'a Tensor),
    /// [D, D] (bf16), [D]
    pub proj: (&'a Tensor, &'a Tensor),
    /// rel_pos_h, rel_pos_w [2S - 1, hd]
    pub rel: (&'a Tensor, &'a Tensor),
    /// [D] each
    pub norm2: (&'a Tensor, &'a Tensor),
    /// [M, D] (bf16), [M]
    pub lin1: (&'a Tensor, &'a Tensor),
    /// [D, M] (bf16), [D]
    pub lin2: (&'a Tensor, &'a Tensor),
    pub heads: usize,
    /// 0: global attention.
    pub window: usize,
}

/// A whole ViT block, x + proj(attn(norm1 x)) then + lin2(GELU(lin1(norm2 x))),
/// fused for CUDA with bf16 GEMM weights (f32 accumulation; the model chooses
/// it when its block's linears are bf16 on a CUDA device): 6 kernels and 4
/// GEMMs instead of the unfused ops' 7 + 4 and their f32 round trips between
/// the norms and the GEMMs. x [B, G, G, D] f32 -> [B, G, G, D] f32.
pub fn vit_block_bf16(x: &Tensor, w: &VitBlock<'_>) -> Result<Tensor> {
    use crate::tensor::DType;
    const OP: &str = "vit_block_bf16";
    // Inference only: training runs the unfused f32 block.
    crate::autograd::no_backward(OP, &[x])?;
    let _p = crate::profile::scope(OP);
    let [b, g, gw, d] = x.dims_n::<4>(OP, "x")?;
    if g != gw {
        return Err(Error::shape(
            OP,
            format!("grid must be square, x {:?}", x.dims()),
        ));
    }
    let [m, _] = w.lin1.0.dims_n::<2>(OP, "lin1 weight")?;
    let s = if w.window == 0 { g } else { w.window };
    let hd = d.checked_div(w.heads).unwrap_or(0);
    let checks: [(&Tensor, &str, Vec<usize>); 14] = [
        (w.norm1.0, "norm1 weight", vec![d]),
        (w.norm1.1, "norm1 bias", vec![d]),
        (w.qkv.0, "qkv weight", vec![3 * d, d]),
        (w.qkv.1, "qkv bias", vec![3 * d]),
        (w.proj.0, "proj weight", vec![d, d]),
        (w.proj.1, "proj bias", vec![d]),
        (w.rel.0, "rel_pos_h", vec![2 * s - 1, hd]),
        (w.rel.1, "rel_pos_w", vec![2 * s - 1, hd]),
        (w.norm2.0, "norm2 weight", vec![d]),
        (w.norm2.1, "norm2 bias", vec![d]),
        (w.lin1.0, "lin1 weight", vec![m, d]),
        (w.lin1.1, "lin1 bias", vec![m]),
        (w.lin2.0, "lin2 weight", vec![d, m]),
        (w.lin2.1, "lin2 bias", vec![d]),
    ];
    for (t, name, dims) in &checks {
        t.expect_dims(OP, name, dims)?;
    }
    let mut all = vec![x];
    all.extend(checks.iter().map(|c| c.0));
    let Device::Cuda(_) = same_device(OP, &all)? else {
        return Err(Error::Device {
            op: OP,
            expected: "cuda".into(),
            got: "cpu".into(),
        });
    };
    for t in [w.qkv.0, w.proj.0, w.lin1.0, w.lin2.0] {
        if t.dtype() != DType::BF16 {
            return Err(Error::DType {
                op: OP,
                expected: "bf16",
                got: t.dtype().name(),
            });
        }
    }
    let f32s = [
        x, w.norm1.0, w.norm1.1, w.qkv.1, w.proj.1, w.rel.0, w.rel.1, w.norm2.0, w.norm2.1,
        w.lin1.1, w.lin2.1,
    ]
    .map(|t| cuda_input(OP, t));
    let [x, n1w, n1b, qb, pb, rh, rw, n2w, n2b, l1b, l2b] = f32s;
    let (x, n1w, n1b, qb, pb, rh, rw, n2w, n2b, l1b, l2b) =
        (x?, n1w?, n1b?, qb?, pb?, rh?, rw?, n2w?, n2b?, l1b?, l2b?);
    let bf = [w.qkv.0, w.proj.0, w.lin1.0, w.lin2.0].map(|t| t.compact());
    let [wq, wp, w1, w2] = bf;
    let (wq, wp, w1, w2) = (wq?, wp?, w1?, w2?);
    fn f(t: &Tensor) -> Result<&cudarc::driver::CudaSlice<f32>> {
        t.cuda_whole_f32("vit_block_bf16").map(|(_, s)| s)
    }
    fn h(t: &Tensor) -> Result<&cudarc::driver::CudaSlice<half::bf16>> {
        t.cuda_whole_bf16("vit_block_bf16")
    }
    let (dev, xs) = x.cuda_whole_f32(OP)?;
    let wts = cuda::VitBlockBf16 {
        norm1: (f(&n1w)?, f(&n1b)?),
        qkv: (h(&wq)?, f(&qb)?),
        proj: (h(&wp)?, f(&pb)?),
        rel: (f(&rh)?, f(&rw)?),
        norm2: (f(&n2w)?, f(&n2b)?),
        lin1: (h(&w1)?, f(&l1b)?),
        lin2: (h(&w2)?, f(&l2b)?),
        heads: w.heads,
        window: w.window,
    };
    let y = dev.with_blas(|blas| cuda::vit_block_bf16(dev, blas, xs, &wts, (b, g, d)))?;
    Tensor::from_cuda_f32(dev, y, [b, g, g, d])
}

/// q [N, Lq, I], k [N, Lk, I], v [N, Lk, I] with I = heads * hd ->
/// softmax(q_h k_h^T / sqrt(hd)) v_h per head, concatenated: [N, Lq, I].
/// Any of q, k, v may have a leading 1 instead of N: it is shared by the whole
/// batch (the decoder's first layer, where the image side is the same per box).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    const OP: &str = "attention";
    let _p = crate::profile::scope(OP);
    let [nq, lq, i] = q.dims_n::<3>(OP, "q")?;
    let [nk, lk, ik] = k.dims_n::<3>(OP, "k")?;
    let [nv, lv, iv] = v.dims_n::<3>(OP, "v")?;
    let n = nq.max(nk).max(nv);
    let fits = |b: usize| b == n || b == 1;
    if ik != i || iv != i || lv != lk || !fits(nq) || !fits(nk) || !fits(nv) {
        return Err(Error::shape(
            OP,
            format!("q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims()),
        ));
    }
    if heads == 0 || i % heads != 0 {
        return Err(Error::shape(
            OP,
            format!("width {i} cannot split into {heads} heads"),
        ));
    }
    let batched = [nq > 1, nk > 1, nv > 1];
    let mut y = attention_forward(q, k, v, heads, batched, (n, lq, lk, i))?;
    if crate::autograd::is_tracked(&[q, k, v]) {
        let (qs, ks, vs) = (q.clone(), k.clone(), v.clone());
        let saved =
            crate::autograd::bytes(q) + crate::autograd::bytes(k) + crate::autograd::bytes(v);
        crate::autograd::record(
            OP,
            &[q, k, v],
            &mut y,
            saved,
            Box::new(move |g| {
                const OP: &str = "attention backward";
                if let Device::Cuda(_) = same_device(OP, &[g, &qs, &ks, &vs])? {
                    let cs = [g, &qs, &ks, &vs].map(|t| cuda_input(OP, t));
                    let [gc, qc, kc, vc] = cs;
                    let (gc, qc, kc, vc) = (gc?, qc?, kc?, vc?);
                    let (dev, gsl) = gc.cuda_whole_f32(OP)?;
                    let (dq, dk, dv) = cuda::mha_backward(
                        dev,
                        qc.cuda_whole_f32(OP)?.1,
                        kc.cuda_whole_f32(OP)?.1,
                        vc.cuda_whole_f32(OP)?.1,
                        gsl,
                        batched,
                        (n, lq, lk, i, heads),
                    )?;
                    // Per item; a shared operand's gradient is the sum over them.
                    let fold = |d, l: usize, b: bool| -> Result<Tensor> {
                        let t = Tensor::from_cuda_f32(dev, d, [n, l, i])?;
                        if b {
                            Ok(t)
                        } else {
                            crate::ops::activation::sum_leading(&t)
                        }
                    };
                    return Ok(vec![
                        Some(fold(dq, lq, batched[0])?),
                        Some(fold(dk, lk, batched[1])?),
                        Some(fold(dv, lk, batched[2])?),
                    ]);
                }
                let [dq, dk, dv] = cpu::attention_backward(
                    cpu_f32(OP, &qs)?,
                    cpu_f32(OP, &ks)?,
                    cpu_f32(OP, &vs)?,
                    cpu_f32(OP, g)?,
                    batched,
                    n,
                    lq,
                    lk,
                    i,
                    heads,
                );
                Ok(vec![
                    Some(Tensor::from_f32(dq, qs.dims())),
                    Some(Tensor::from_f32(dk, ks.dims())),
                    Some(Tensor::from_f32(dv, vs.dims())),
                ])
            }),
        );
    }
    Ok(y)
}

fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    batched: [bool; 3],
    (n, lq, lk, i): (usize, usize, usize, usize),
) -> Result<Tensor> {
    const OP: &str = "attention";
    if let Device::Cuda(_) = same_device(OP, &[q, k, v])? {
        let (q, k, v) = (cuda_input(OP, q)?, cuda_input(OP, k)?, cuda_input(OP, v)?);
        let (dev, _) = q.cuda_whole_f32(OP)?;
        let y = cuda::mha(
            dev,
            &q.gpu_ref(OP)?,
            &k.gpu_ref(OP)?,
            &v.gpu_ref(OP)?,
            heads,
        )?;
        return Tensor::from_gpu(dev, y);
    }
    let out = cpu::attention(
        cpu_f32(OP, q)?,
        cpu_f32(OP, k)?,
        cpu_f32(OP, v)?,
        batched,
        n,
        lq,
        lk,
        i,
        heads,
    );
    Ok(Tensor::from_f32(out, &[n, lq, i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, f: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * f).sin()).collect()
    }

    /// The reference's computation written out literally: pad the token grid with
    /// zero tokens, project every position (padded ones give the biases), full
    /// attention inside each window over all positions.
    #[test]
    fn window_attention_equals_padded_reference() {
        let (b, g, heads, hd, s) = (1usize, 5usize, 2usize, 4usize, 3usize);
        let d = heads * hd;
        let gp = g.div_ceil(s) * s;
        let qkv = seq(b * g * g * 3 * d, 0.37);
        let bias = seq(3 * d, 1.3);
        let rh = seq((2 * s - 1) * hd, 0.71);
        let rw = seq((2 * s - 1) * hd, 0.53);
        let got = rel_pos_attention(
            &Tensor::from_vec(qkv.clone(), [b, g, g, 3 * d]).unwrap(),
            &Tensor::from_vec(bias.clone(), [3 * d]).unwrap(),
            &Tensor::from_vec(rh.clone(), [2 * s - 1, hd]).unwrap(),
            &Tensor::from_vec(rw.clone(), [2 * s - 1, hd]).unwrap(),
            heads,
            s,
        )
        .unwrap();
        let got = got.as_f32().unwrap();
        let at = |y: usize, x: usize, which: usize, h: usize, c: usize| -> f64 {
            if y < g && x < g {
                qkv[(y * g + x) * 3 * d + which * d + h * hd + c] as f64
            } else {
                bias[which * d + h * hd + c] as f64
            }
        };
        let scale = (hd as f64).powf(-0.5);
        for wy in 0..gp / s {
            for wx in 0..gp / s {
                for h in 0..heads {
                    for qi in 0..s * s {
                        let (qy, qx) = (qi / s, qi % s);
                        let (gy, gx) = (wy * s + qy, wx * s + qx);
                        if gy >= g || gx >= g {
                            continue;
                        }
                        let mut logits = vec![0.0f64; s * s];
                        for (ki, l) in logits.iter_mut().enumerate() {
                            let (ky, kx) = (ki / s, ki % s);
                            let mut dot = 0.0;
                            let mut relh = 0.0;
                            let mut relw = 0.0;
                            for c in 0..hd {
                                let qv = at(gy, gx, 0, h, c);
                                dot += qv * scale * at(wy * s + ky, wx * s + kx, 1, h, c);
                                relh += qv * rh[(qy + s - 1 - ky) * hd + c] as f64;
                                relw += qv * rw[(qx + s - 1 - kx) * hd + c] as f64;
                            }
                            *l = dot + relh + relw;
                        }
                        let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for c in 0..hd {
                            let mut o = 0.0;
                            for ki in 0..s * s {
                                o += e[ki] / z * at(wy * s + ki / s, wx * s + ki % s, 2, h, c);
                            }
                            let gv = got[(gy * g + gx) * d + h * hd + c] as f64;
                            assert!(
                                (gv - o).abs() < 1e-5,
                                "window ({wy},{wx}) head {h} q {qi} c {c}: {gv} vs {o}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attention_broadcasts_a_batch_of_one() {
        let q = Tensor::from_vec(seq(3 * 5 * 8, 0.3), [3, 5, 8]).unwrap();
        let k1 = Tensor::from_vec(seq(4 * 8, 0.9), [1, 4, 8]).unwrap();
        let v1 = Tensor::from_vec(seq(4 * 8, 1.7), [1, 4, 8]).unwrap();
        let k3 = crate::ops::layout::repeat_first(&k1, 3).unwrap();
        let v3 = crate::ops::layout::repeat_first(&v1, 3).unwrap();
        let a = attention(&q, &k1, &v1, 2).unwrap();
        let b = attention(&q, &k3, &v3, 2).unwrap();
        assert_eq!(a.as_f32().unwrap(), b.as_f32().unwrap());
        let q1 = Tensor::from_vec(seq(5 * 8, 0.3), [1, 5, 8]).unwrap();
        let c = attention(&q1, &k3, &v3, 2).unwrap();
        assert_eq!(c.dims(), &[3, 5, 8]);
        assert!(attention(&q, &Tensor::zeros([2, 4, 8]), &v3, 2).is_err());
    }

    #[test]
    fn attention_single_key_returns_value() {
        // One key: softmax is 1, the output is v.
        let q = Tensor::from_vec(seq(2 * 3 * 4, 0.3), [2, 3, 4]).unwrap();
        let k = Tensor::from_vec(seq(2 * 4, 0.9), [2, 1, 4]).unwrap();
        let v = Tensor::from_vec(seq(2 * 4, 1.7), [2, 1, 4]).unwrap();
        let o = attention(&q, &k, &v, 2).unwrap();
        let (o, v) = (o.as_f32().unwrap(), v.as_f32().unwrap());
        for n in 0..2 {
            for l in 0..3 {
                for c in 0..4 {
                    assert!((o[(n * 3 + l) * 4 + c] - v[n * 4 + c]).abs() < 1e-6);
                }
            }
        }
    }
}
