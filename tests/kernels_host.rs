//! Every CUDA kernel run on the CPU by the host SIMT emulator (tests/simt,
//! cuda/host) with the launch geometry of its launcher, against the CPU twin
//! at the tolerances of tests/cuda_ops.rs. This runs everywhere a C++ compiler
//! is (CI sets SAM_UNET_REQUIRE_SIMT=1), so the kernels' indexing, barriers,
//! warp collectives and bounds are tested on every run, not only on a GPU
//! machine; their speed and the GPU's own arithmetic (FMA contraction,
//! expf / erff ulps) are left to tests/cuda_ops.rs on a GPU. Shapes are the
//! model's, with fewer heads / images where emulation would be slow.

mod kernel_check;
mod simt;

use cudarc::driver::LaunchConfig;
use kernel_check::{assert_close, rand};
use sam_unet::Tensor;
use sam_unet::cuda::cfg1d;
use sam_unet::ops::activation::{self, Act};
use sam_unet::ops::{attention, conv, layout, norm};
use simt::{Buf, Simt};

type F32p = *const f32;
type F32m = *mut f32;

fn t(v: &[f32], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims.to_vec()).unwrap()
}

/// A grid-stride geometry with only `blocks` blocks, so that every thread
/// loops several times.
fn few_blocks(blocks: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[test]
fn elementwise_kernels_match_cpu() {
    simt::each_build(elementwise_kernels_match_cpu_on);
}

fn elementwise_kernels_match_cpu_on(s: &'static Simt) {
    let n = 256 * 3072; // ViT MLP hidden activations
    let x = rand(n, 1, 6.0);
    let xb = Buf::from(s, &x);
    for (a, name) in [(Act::Gelu, "gelu_f32"), (Act::Relu, "relu_f32")] {
        let want = activation::act(&t(&x, &[n]), a).unwrap();
        for cfg in [cfg1d(n), few_blocks(7)] {
            let y = Buf::<f32>::out(s, n);
            s.launch(
                name,
                cfg,
                |k: unsafe extern "C" fn(F32m, F32p, i64)| unsafe { k(y.m(), xb.p(), n as i64) },
            )
            .unwrap();
            assert_close(name, &y.to_vec(), want.as_f32().unwrap(), 1e-6, 1e-5);
        }
    }
    let z = rand(n, 2, 3.0);
    let zb = Buf::from(s, &z);
    let y = Buf::<f32>::out(s, n);
    s.launch(
        "add_f32",
        cfg1d(n),
        |k: unsafe extern "C" fn(F32m, F32p, F32p, i64)| unsafe {
            k(y.m(), xb.p(), zb.p(), n as i64)
        },
    )
    .unwrap();
    let want = activation::add(&t(&x, &[n]), &t(&z, &[n])).unwrap();
    assert_close("add_f32", &y.to_vec(), want.as_f32().unwrap(), 0.0, 0.0);
}

#[test]
fn bias_act_epilogue_matches_cpu() {
    simt::each_build(bias_act_epilogue_matches_cpu_on);
}

fn bias_act_epilogue_matches_cpu_on(s: &'static Simt) {
    let (rows, cols) = (256usize, 3072usize);
    let x = rand(rows * cols, 3, 4.0);
    let bias = rand(cols, 4, 1.0);
    let bb = Buf::from(s, &bias);
    for (a, code) in [(Act::None, 0), (Act::Relu, 1), (Act::Gelu, 2)] {
        let y = Buf::from(s, &x);
        s.launch(
            "bias_act_f32",
            cfg1d(rows * cols),
            |k: unsafe extern "C" fn(F32m, F32p, i64, i32, i32)| unsafe {
                k(y.m(), bb.p(), rows as i64, cols as i32, code)
            },
        )
        .unwrap();
        let pre: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, v)| v + bias[i % cols])
            .collect();
        let want = activation::act(&t(&pre, &[rows * cols]), a).unwrap();
        assert_close(
            &format!("bias_act {a:?}"),
            &y.to_vec(),
            want.as_f32().unwrap(),
            1e-6,
            1e-5,
        );
    }
}

#[test]
fn f32_to_bf16_rounds_to_nearest_even() {
    simt::each_build(f32_to_bf16_rounds_to_nearest_even_on);
}

fn f32_to_bf16_rounds_to_nearest_even_on(s: &'static Simt) {
    let mut x = rand(4096, 5, 100.0);
    x.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        1e-40,
        -1e-40,
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
    ]);
    let n = x.len();
    let xb = Buf::from(s, &x);
    let y = Buf::<u16>::out(s, n);
    s.launch(
        "f32_to_bf16",
        cfg1d(n),
        |k: unsafe extern "C" fn(*mut u16, F32p, i64)| unsafe { k(y.m(), xb.p(), n as i64) },
    )
    .unwrap();
    for (i, (&got, &v)) in y.to_vec().iter().zip(&x).enumerate() {
        let want = half::bf16::from_f32(v);
        if v.is_nan() {
            assert!(
                half::bf16::from_bits(got).is_nan(),
                "index {i}: NaN became {got:#06x}"
            );
        } else {
            assert_eq!(
                got,
                want.to_bits(),
                "index {i}: {v} -> {got:#06x}, want {:#06x}",
                want.to_bits()
            );
        }
    }
    // And back: bf16 -> f32 is exact (the bits shifted up), NaN stays NaN.
    let z = Buf::<f32>::out(s, n);
    s.launch(
        "bf16_to_f32",
        cfg1d(n),
        |k: unsafe extern "C" fn(F32m, *const u16, i64)| unsafe { k(z.m(), y.p(), n as i64) },
    )
    .unwrap();
    for (i, (&back, &b)) in z.to_vec().iter().zip(&y.to_vec()).enumerate() {
        let want = half::bf16::from_bits(b).to_f32();
        assert!(
            back.to_bits() == want.to_bits() || (back.is_nan() && want.is_nan()),
            "index {i}: {b:#06x} -> {back}, want {want}"
        );
    }
}

#[test]
fn layer_norm_matches_cpu() {
    simt::each_build(layer_norm_matches_cpu_on);
}

fn layer_norm_matches_cpu_on(s: &'static Simt) {
    // ViT-B tokens (256 x 768: three values per thread), decoder keys (512 x
    // 256), and C = 96 on a block of 128 (threads without a value).
    for (rows, c) in [(256usize, 768usize), (512, 256), (64, 96)] {
        let (x, w, b) = (rand(rows * c, 3, 4.0), rand(c, 4, 1.0), rand(c, 5, 1.0));
        let (xb, wb, bb) = (Buf::from(s, &x), Buf::from(s, &w), Buf::from(s, &b));
        let y = Buf::<f32>::out(s, rows * c);
        s.launch(
            "layer_norm_f32",
            norm::cuda::layer_norm_config(rows, c),
            |k: unsafe extern "C" fn(F32m, F32p, F32p, F32p, i32, i32, f32)| unsafe {
                k(y.m(), xb.p(), wb.p(), bb.p(), rows as i32, c as i32, 1e-6)
            },
        )
        .unwrap();
        let want = norm::layer_norm(&t(&x, &[rows, c]), &t(&w, &[c]), &t(&b, &[c]), 1e-6).unwrap();
        assert_close(
            &format!("layer_norm {rows}x{c}"),
            &y.to_vec(),
            want.as_f32().unwrap(),
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn layer_norm2d_matches_cpu() {
    simt::each_build(layer_norm2d_matches_cpu_on);
}

fn layer_norm2d_matches_cpu_on(s: &'static Simt) {
    for (dims, a, code) in [
        ([1usize, 512, 32, 32], Act::Gelu, 2),
        ([4, 64, 64, 64], Act::Gelu, 2),
        ([2, 32, 16, 16], Act::Relu, 1),
        ([1, 256, 16, 16], Act::None, 0),
    ] {
        let n: usize = dims.iter().product();
        let (x, w, b) = (
            rand(n, 60, 3.0),
            rand(dims[1], 61, 1.0),
            rand(dims[1], 62, 1.0),
        );
        let (xb, wb, bb) = (Buf::from(s, &x), Buf::from(s, &w), Buf::from(s, &b));
        let y = Buf::<f32>::out(s, n);
        let p = (dims[2] * dims[3]) as i64;
        s.launch(
            "layer_norm2d_f32",
            cfg1d(dims[0] * dims[2] * dims[3]),
            |k: unsafe extern "C" fn(F32m, F32p, F32p, F32p, i32, i32, i64, f32, i32)| unsafe {
                k(
                    y.m(),
                    xb.p(),
                    wb.p(),
                    bb.p(),
                    dims[0] as i32,
                    dims[1] as i32,
                    p,
                    1e-6,
                    code,
                )
            },
        )
        .unwrap();
        let want = norm::layer_norm2d(
            &t(&x, &dims),
            &t(&w, &[dims[1]]),
            &t(&b, &[dims[1]]),
            1e-6,
            a,
        )
        .unwrap();
        assert_close(
            &format!("layer_norm2d {dims:?} {a:?}"),
            &y.to_vec(),
            want.as_f32().unwrap(),
            1e-5,
            1e-4,
        );
    }
}

#[test]
fn rel_pos_attention_matches_cpu() {
    simt::each_build(rel_pos_attention_matches_cpu_on);
}

fn rel_pos_attention_matches_cpu_on(s: &'static Simt) {
    // The ViT's 16 x 16 grid with head dim 64; two heads (ViT-B has 12: the
    // heads are independent blocks of the grid, two show the channel offsets).
    let (b, g, heads) = (2usize, 16usize, 2usize);
    let d = heads * 64;
    let qkv = rand(b * g * g * 3 * d, 6, 2.0);
    let bias = rand(3 * d, 7, 1.0);
    let (qb, biasb) = (Buf::from(s, &qkv), Buf::from(s, &bias));
    for window in [14usize, 0, 8] {
        let ws = if window == 0 { g } else { window };
        let (rh, rw) = (
            rand((2 * ws - 1) * 64, 8, 0.5),
            rand((2 * ws - 1) * 64, 9, 0.5),
        );
        let (rhb, rwb) = (Buf::from(s, &rh), Buf::from(s, &rw));
        let y = Buf::<f32>::out(s, b * g * g * d);
        s.launch(
            "rel_pos_attention_f32",
            attention::cuda::rel_pos_attention_config(b, g, heads, ws),
            |k: unsafe extern "C" fn(F32m, F32p, F32p, F32p, F32p, i32, i32, i32, i32)| unsafe {
                k(
                    y.m(),
                    qb.p(),
                    biasb.p(),
                    rhb.p(),
                    rwb.p(),
                    b as i32,
                    g as i32,
                    d as i32,
                    ws as i32,
                )
            },
        )
        .unwrap();
        let want = attention::rel_pos_attention(
            &t(&qkv, &[b, g, g, 3 * d]),
            &t(&bias, &[3 * d]),
            &t(&rh, &[2 * ws - 1, 64]),
            &t(&rw, &[2 * ws - 1, 64]),
            heads,
            window,
        )
        .unwrap();
        assert_close(
            &format!("rel_pos_attention window {window}"),
            &y.to_vec(),
            want.as_f32().unwrap(),
            1e-5,
            1e-4,
        );
    }
}

#[test]
fn decoder_attention_matches_cpu() {
    simt::each_build(decoder_attention_matches_cpu_on);
}

fn decoder_attention_matches_cpu_on(s: &'static Simt) {
    // self (3 tokens, width 256), token-to-image (3 vs 256, width 128),
    // image-to-token (256 vs 3), 8 heads; 2 and 3 boxes; then head dims 5
    // and 64 (the kernel's limit: lanes own channels lane and lane + 32).
    for (n, lq, lk, i, shared) in [
        (3usize, 3usize, 3usize, 256usize, false),
        (3, 3, 256, 128, false),
        (2, 256, 3, 128, false),
        (2, 5, 70, 40, false),
        (2, 3, 40, 512, false),
        // k and v of one image shared by 3 boxes (the decoder's image keys).
        (3, 3, 256, 128, true),
    ] {
        let heads = 8;
        let nkv = if shared { 1 } else { n };
        let (q, k, v) = (
            rand(n * lq * i, 150, 2.0),
            rand(nkv * lk * i, 151, 2.0),
            rand(nkv * lk * i, 152, 1.0),
        );
        let (qb, kb, vb) = (Buf::from(s, &q), Buf::from(s, &k), Buf::from(s, &v));
        let y = Buf::<f32>::out(s, n * lq * i);
        let per_item = (!shared) as i32;
        s.launch(
            "mha_f32",
            attention::cuda::mha_config(n, heads, lq),
            |f: unsafe extern "C" fn(
                F32m,
                F32p,
                F32p,
                F32p,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
            )| unsafe {
                f(
                    y.m(),
                    qb.p(),
                    kb.p(),
                    vb.p(),
                    n as i32,
                    lq as i32,
                    lk as i32,
                    i as i32,
                    heads as i32,
                    1,
                    per_item,
                    per_item,
                )
            },
        )
        .unwrap();
        let want = attention::attention(
            &t(&q, &[n, lq, i]),
            &t(&k, &[nkv, lk, i]),
            &t(&v, &[nkv, lk, i]),
            heads,
        )
        .unwrap();
        assert_close(
            &format!("mha q {lq} k {lk} width {i} shared k/v {shared}"),
            &y.to_vec(),
            want.as_f32().unwrap(),
            1e-5,
            1e-4,
        );
    }
}

/// c [m, n] = a [m, k] b [k, n] (optionally a stored transposed, [k, m]), in f64.
fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, a_t: bool) -> Vec<f32> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = if a_t { a[p * m + i] } else { a[i * k + p] } as f64;
            for j in 0..n {
                c[i * n + j] += av * b[p * n + j] as f64;
            }
        }
    }
    c.into_iter().map(|v| v as f32).collect()
}

#[test]
fn conv2d_pipeline_matches_cpu() {
    simt::each_build(conv2d_pipeline_matches_cpu_on);
}

fn conv2d_pipeline_matches_cpu_on(s: &'static Simt) {
    // im2col kernel -> GEMM (here on the host, cuBLAS on the GPU) -> epilogue
    // kernel (bias, residual, ReLU), exactly as ops::conv::cuda::conv2d.
    let cases: &[([usize; 4], [usize; 4], usize, usize, bool)] = &[
        ([1, 3, 64, 64], [16, 3, 7, 7], 2, 3, false),
        ([2, 64, 16, 16], [32, 64, 3, 3], 1, 1, true),
        ([1, 64, 16, 16], [32, 64, 3, 3], 2, 1, false),
        ([1, 8, 9, 7], [4, 8, 3, 3], 2, 0, true),
    ];
    for (ci, (xd, wd, st, pd, res)) in cases.iter().enumerate() {
        let [n, c, h, w] = *xd;
        let [o, _, kh, kw] = *wd;
        let fan = (c * kh * kw) as f32;
        let (x, wt, bias) = (
            rand(xd.iter().product(), 70 + ci as u64, 1.0),
            rand(wd.iter().product(), 80 + ci as u64, 1.0 / fan.sqrt()),
            rand(o, 90 + ci as u64, 0.5),
        );
        let (ho, wo) = ((h + 2 * pd - kh) / st + 1, (w + 2 * pd - kw) / st + 1);
        let (k, p) = (c * kh * kw, ho * wo);
        let r = rand(n * o * p, 95, 1.0);
        // All images in one launch, col [n, k, p]; the bf16 variant must hold
        // the same values rounded to bf16.
        let xb = Buf::from(s, &x);
        let col = Buf::<f32>::out(s, n * k * p);
        let col16 = Buf::<u16>::out(s, n * k * p);
        type Im2col<T> =
            unsafe extern "C" fn(*mut T, F32p, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32);
        let dims = [n, c, h, w, kh, kw, *st, *pd, ho, wo].map(|v| v as i32);
        s.launch("im2col_f32", cfg1d(n * k * p), |f: Im2col<f32>| unsafe {
            f(
                col.m(),
                xb.p(),
                dims[0],
                dims[1],
                dims[2],
                dims[3],
                dims[4],
                dims[5],
                dims[6],
                dims[7],
                dims[8],
                dims[9],
            )
        })
        .unwrap();
        s.launch("im2col_bf16", cfg1d(n * k * p), |f: Im2col<u16>| unsafe {
            f(
                col16.m(),
                xb.p(),
                dims[0],
                dims[1],
                dims[2],
                dims[3],
                dims[4],
                dims[5],
                dims[6],
                dims[7],
                dims[8],
                dims[9],
            )
        })
        .unwrap();
        let colv = col.to_vec();
        for (i, (&v16, &v)) in col16.to_vec().iter().zip(&colv).enumerate() {
            assert_eq!(
                v16,
                half::bf16::from_f32(v).to_bits(),
                "im2col_bf16 index {i}"
            );
        }
        let mut y = vec![0f32; n * o * p];
        for i in 0..n {
            y[i * o * p..(i + 1) * o * p].copy_from_slice(&matmul(
                &wt,
                &colv[i * k * p..(i + 1) * k * p],
                o,
                k,
                p,
                false,
            ));
        }
        let yb = Buf::from(s, &y);
        let (bb, rb) = (Buf::from(s, &bias), Buf::from(s, &r));
        let rp = if *res { rb.p() } else { std::ptr::null() };
        s.launch(
            "conv_epilogue_f32",
            cfg1d(n * o * p),
            |f: unsafe extern "C" fn(F32m, F32p, F32p, i32, i32, i64, i32)| unsafe {
                f(yb.m(), bb.p(), rp, n as i32, o as i32, p as i64, 1)
            },
        )
        .unwrap();
        let want = conv::conv2d(
            &t(&x, xd),
            &t(&wt, wd),
            Some(&t(&bias, &[o])),
            conv::Conv2dArgs {
                stride: *st,
                padding: *pd,
            },
            res.then(|| t(&r, &[n, o, ho, wo])).as_ref(),
            Act::Relu,
        )
        .unwrap();
        assert_close(
            &format!("conv2d {xd:?} * {wd:?} s{st} p{pd} residual {res}"),
            &yb.to_vec(),
            want.as_f32().unwrap(),
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn conv_transpose2d_pipeline_matches_cpu() {
    simt::each_build(conv_transpose2d_pipeline_matches_cpu_on);
}

fn conv_transpose2d_pipeline_matches_cpu_on(s: &'static Simt) {
    // GEMM tmp = W^T X (host here, cuBLAS on the GPU) -> scatter kernel.
    for (i, (xd, wd, a, code)) in [
        ([1usize, 96, 8, 8], [96usize, 32, 2, 2], Act::Gelu, 2),
        ([2, 64, 8, 8], [64, 32, 2, 2], Act::None, 0),
        ([1, 16, 5, 3], [16, 8, 3, 3], Act::Relu, 1),
    ]
    .iter()
    .enumerate()
    {
        let [n, c, h, w] = *xd;
        let [_, o, k, _] = *wd;
        let (x, wt, bias) = (
            rand(xd.iter().product(), 100 + i as u64, 1.0),
            rand(wd.iter().product(), 110 + i as u64, 0.05),
            rand(o, 120, 0.5),
        );
        let (hw, rows) = (h * w, o * k * k);
        let bb = Buf::from(s, &bias);
        // tmp [n, O k k, HW] for every image, then one scatter launch.
        let tmp: Vec<f32> = (0..n)
            .flat_map(|im| matmul(&wt, &x[im * c * hw..(im + 1) * c * hw], rows, c, hw, true))
            .collect();
        let tmp = Buf::from(s, &tmp);
        let yb = Buf::<f32>::out(s, n * o * hw * k * k);
        s.launch(
            "convt_scatter_f32",
            cfg1d(n * o * hw * k * k),
            |f: unsafe extern "C" fn(F32m, F32p, F32p, i32, i32, i32, i32, i32, i32)| unsafe {
                f(
                    yb.m(),
                    tmp.p(),
                    bb.p(),
                    n as i32,
                    o as i32,
                    h as i32,
                    w as i32,
                    k as i32,
                    *code,
                )
            },
        )
        .unwrap();
        let y = yb.to_vec();
        let want =
            conv::conv_transpose2d(&t(&x, xd), &t(&wt, wd), Some(&t(&bias, &[o])), *a).unwrap();
        assert_close(
            &format!("conv_transpose2d {xd:?} * {wd:?}"),
            &y,
            want.as_f32().unwrap(),
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn max_pool_matches_cpu() {
    simt::each_build(max_pool_matches_cpu_on);
}

fn max_pool_matches_cpu_on(s: &'static Simt) {
    for (dims, kk, st, pd) in [
        ([1usize, 64, 64, 64], 3usize, 2usize, 1usize),
        ([2, 3, 7, 9], 2, 2, 0),
        ([1, 2, 5, 5], 3, 1, 1),
    ] {
        let mut x = rand(dims.iter().product(), 130, 2.0);
        x[5] = f32::NAN; // NaN propagates, as in PyTorch
        let (h, w) = (dims[2], dims[3]);
        let (ho, wo) = ((h + 2 * pd - kk) / st + 1, (w + 2 * pd - kk) / st + 1);
        let planes = dims[0] * dims[1];
        let xb = Buf::from(s, &x);
        let y = Buf::<f32>::out(s, planes * ho * wo);
        s.launch(
            "max_pool2d_f32",
            cfg1d(planes * ho * wo),
            |f: unsafe extern "C" fn(F32m, F32p, i64, i32, i32, i32, i32, i32, i32, i32)| unsafe {
                f(
                    y.m(),
                    xb.p(),
                    planes as i64,
                    h as i32,
                    w as i32,
                    ho as i32,
                    wo as i32,
                    kk as i32,
                    st as i32,
                    pd as i32,
                )
            },
        )
        .unwrap();
        let want = conv::max_pool2d(&t(&x, &dims), kk, st, pd).unwrap();
        let (got, want) = (y.to_vec(), want.as_f32().unwrap().to_vec());
        assert!(got[0].is_nan() == want[0].is_nan(), "NaN propagation");
        let strip = |v: &[f32]| {
            v.iter()
                .map(|x| if x.is_nan() { 12345.0 } else { *x })
                .collect::<Vec<_>>()
        };
        assert_close(
            &format!("max_pool2d {dims:?} k{kk} s{st} p{pd}"),
            &strip(&got),
            &strip(&want),
            0.0,
            0.0,
        );
    }
}

#[test]
fn layout_kernels_match_cpu() {
    simt::each_build(layout_kernels_match_cpu_on);
}

fn layout_kernels_match_cpu_on(s: &'static Simt) {
    let dims = [2usize, 768, 16, 16];
    let n: usize = dims.iter().product();
    let x = rand(n, 140, 1.0);
    let xb = Buf::from(s, &x);
    let y = Buf::<f32>::out(s, n);
    let (b, c, p) = (dims[0] as i32, dims[1] as i32, (dims[2] * dims[3]) as i64);
    s.launch(
        "nchw_to_nhwc_f32",
        cfg1d(n),
        |f: unsafe extern "C" fn(F32m, F32p, i32, i32, i64)| unsafe { f(y.m(), xb.p(), b, c, p) },
    )
    .unwrap();
    let want = layout::nchw_to_nhwc(&t(&x, &dims)).unwrap();
    assert_close(
        "nchw_to_nhwc",
        &y.to_vec(),
        want.as_f32().unwrap(),
        0.0,
        0.0,
    );
    let back = Buf::<f32>::out(s, n);
    s.launch(
        "nhwc_to_nchw_f32",
        cfg1d(n),
        |f: unsafe extern "C" fn(F32m, F32p, i32, i32, i64)| unsafe { f(back.m(), y.p(), b, c, p) },
    )
    .unwrap();
    assert_close("nhwc_to_nchw", &back.to_vec(), &x, 0.0, 0.0);
}

#[test]
fn copy_rows_matches_definition() {
    simt::each_build(copy_rows_matches_definition_on);
}

fn copy_rows_matches_definition_on(s: &'static Simt) {
    // The decoder's token rows: 3 items of 5 rows of 256 channels; rows 1..4
    // of each item into rows 2..5 of a [3, 6, 256] output, then one shared
    // row (x stride 0) into row 0 of every item. Rows not copied stay NaN.
    let (n, c) = (3usize, 256usize);
    let x = rand(n * 5 * c, 40, 1.0);
    let head = rand(c, 41, 1.0);
    let (xb, hb) = (Buf::from(s, &x), Buf::from(s, &head));
    let y = Buf::<f32>::out(s, n * 6 * c);
    type K = unsafe extern "C" fn(F32m, F32p, i64, i32, i32, i64, i32, i64, i32);
    s.launch("copy_rows_f32", cfg1d(n * 3 * c), |k: K| unsafe {
        k(
            y.m(),
            xb.p(),
            n as i64,
            3,
            c as i32,
            5 * c as i64,
            1,
            6 * c as i64,
            2,
        )
    })
    .unwrap();
    s.launch("copy_rows_f32", cfg1d(n * c), |k: K| unsafe {
        k(y.m(), hb.p(), n as i64, 1, c as i32, 0, 0, 6 * c as i64, 0)
    })
    .unwrap();
    let got = y.to_vec();
    for i in 0..n {
        for r in 0..6 {
            for ch in 0..c {
                let v = got[(i * 6 + r) * c + ch];
                match r {
                    0 => assert_eq!(v, head[ch]),
                    2..=4 => assert_eq!(v, x[(i * 5 + r - 1) * c + ch]),
                    _ => assert!(v.is_nan(), "row {r} was written"),
                }
            }
        }
    }
}

#[test]
fn mask_dot_matches_definition() {
    simt::each_build(mask_dot_matches_definition_on);
}

fn mask_dot_matches_definition_on(s: &'static Simt) {
    let (n, c, p) = (3usize, 32usize, 256 * 256);
    let (h, f, msf) = (
        rand(n * c, 160, 1.0),
        rand(n * c * p, 161, 1.0),
        rand(c * p, 162, 1.0),
    );
    let (hb, fb, mb) = (Buf::from(s, &h), Buf::from(s, &f), Buf::from(s, &msf));
    let y = Buf::<f32>::out(s, n * p);
    s.launch(
        "mask_dot_f32",
        cfg1d(n * p),
        |k: unsafe extern "C" fn(F32m, F32p, F32p, F32p, i32, i32, i64)| unsafe {
            k(y.m(), hb.p(), fb.p(), mb.p(), n as i32, c as i32, p as i64)
        },
    )
    .unwrap();
    let want: Vec<f32> = (0..n * p)
        .map(|i| {
            (0..c)
                .map(|ch| {
                    h[(i / p) * c + ch] as f64
                        * (f[((i / p) * c + ch) * p + i % p] + msf[ch * p + i % p]) as f64
                })
                .sum::<f64>() as f32
        })
        .collect();
    assert_close("mask_dot", &y.to_vec(), &want, 1e-5, 1e-5);
}

#[test]
fn emulator_reports_broken_rules() {
    simt::each_build(emulator_reports_broken_rules_on);
}

fn emulator_reports_broken_rules_on(s: &'static Simt) {
    // The emulator itself (cuda/host/selftest.cu): broken synchronisation and
    // invalid geometry are errors naming the place, never a hang or a pass.
    let cfg = |threads| LaunchConfig {
        grid_dim: (2, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let y = Buf::<f32>::out(s, 128);
    let run = |name: &str, threads| {
        s.launch(name, cfg(threads), |k: unsafe extern "C" fn(F32m)| unsafe {
            k(y.m())
        })
    };
    run("selftest_block_sum", 64).unwrap();
    assert!(
        y.to_vec().iter().all(|&v| v == 64.0),
        "block_sum over 64 threads: {:?}",
        y.to_vec()
    );
    let e = run("selftest_divergent_barrier", 64).unwrap_err();
    assert!(
        e.contains("divergent barrier")
            && e.contains("selftest_divergent_barrier: block (0, 0, 0)"),
        "{e}"
    );
    let e = run("selftest_shuffle_after_exit", 32).unwrap_err();
    assert!(e.contains("lane(s) of its warp have exited"), "{e}");
    let e = run("selftest_block_sum", 2048).unwrap_err();
    assert!(e.contains("invalid launch configuration"), "{e}");
}

/// The source scan that lets the emulated driver run kernels without
/// barriers in direct mode (tests/simt/mod.rs, barrier_free_kernels), and
/// direct mode itself: the same threads in the same order as the fibers
/// would run them, and a barrier reached there is an error naming the kernel.
#[test]
fn emulator_direct_mode() {
    let src = r#"
static inline void __syncthreads() { simt_wait(2, 0xffffffffu); }
#define SYNC() \
    __syncthreads()
__device__ float helper(float x) { SYNC(); return x; }
__device__ float outer(float x) { return helper(x) + 1.0f; }
__device__ float pure(float x) { return x * 2.0f; /* __syncthreads() */ }
extern "C" __global__ void uses_helper(float* y) { y[0] = outer(y[0]); }
extern "C" __global__ void __launch_bounds__(256) plain(float* y) {
    if (threadIdx.x == 0) { y[0] = pure(y[0]); }
    const char* s = "__syncthreads()"; // helper(1.0f)
}
extern "C" __global__ void via_macro(float* y) { SYNC(); }
"#;
    let free = simt::barrier_free_in(&[src]);
    assert_eq!(
        free,
        std::collections::HashSet::from(["plain".to_string()]),
        "only `plain` reaches no barrier"
    );
    let free = simt::barrier_free_kernels(&simt::sources().unwrap()).unwrap();
    let mut names: Vec<&String> = free.iter().collect();
    names.sort();
    println!("kernels the emulator runs in direct mode: {names:?}");
    for k in [
        "selftest_last_writer_wins",
        "selftest_neighbour_read",
        "im2col_f32",
    ] {
        assert!(free.contains(k), "{k} has no barrier: {free:?}");
    }
    for k in [
        "selftest_block_sum",
        "selftest_atomic_count",
        "selftest_warp_reduce_shared",
        "selftest_shuffle_after_exit",
        "layer_norm_f32",
        "rel_pos_attention_f32",
    ] {
        assert!(!free.contains(k), "{k} has barriers or warp collectives");
    }
    let Some(s) = simt::simt_build(simt::Build::FAST) else {
        return;
    };
    let cfg = |blocks, threads| LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let run = |name: &str, c: LaunchConfig, direct: bool, y: &Buf<f32>| {
        let call = |k: unsafe extern "C" fn(F32m)| unsafe { k(y.m()) };
        if direct {
            s.launch_direct(name, c, call)
        } else {
            s.launch(name, c, call)
        }
    };
    // Natural order in both modes: the last thread's store stays; block b
    // reads what block b + 1 has not yet written.
    for direct in [false, true] {
        let y = Buf::<f32>::out(s, 8);
        run("selftest_last_writer_wins", cfg(1, 96), direct, &y).unwrap();
        assert_eq!(y.to_vec()[0], 95.0, "direct: {direct}");
        let y = Buf::from(s, &[0.0f32; 4]);
        run("selftest_neighbour_read", cfg(4, 64), direct, &y).unwrap();
        assert_eq!(y.to_vec(), [1.0, 1.0, 1.0, 1.0], "direct: {direct}");
    }
    let y = Buf::<f32>::out(s, 128);
    let e = run("selftest_block_sum", cfg(2, 64), true, &y).unwrap_err();
    assert!(
        e.contains("selftest_block_sum: block (0, 0, 0)") && e.contains("marks free of them"),
        "{e}"
    );
    // The build goes on working after the failed launch.
    run("selftest_block_sum", cfg(2, 64), false, &y).unwrap();
    assert!(y.to_vec().iter().all(|&v| v == 64.0));
}

#[test]
fn emulator_sanitizer_and_schedules() {
    simt::each_build(emulator_sanitizer_and_schedules_on);
}

fn emulator_sanitizer_and_schedules_on(s: &'static Simt) {
    // What the sanitizer must let pass (warp-synchronous shared memory,
    // atomics) and what it and the schedule variation must catch.
    let cfg = |blocks, threads| LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let run = |name: &str, y: &Buf<f32>, blocks, threads| {
        s.launch(
            name,
            cfg(blocks, threads),
            |k: unsafe extern "C" fn(F32m)| unsafe { k(y.m()) },
        )
    };
    let y = Buf::<f32>::out(s, 8);
    run("selftest_warp_reduce_shared", &y, 2, 128).unwrap();
    assert_eq!(y.to_vec(), vec![32.0; 8]);
    let y = Buf::from(s, &[0.0f32]);
    run("selftest_atomic_count", &y, 3, 64).unwrap();
    assert_eq!(y.to_vec(), vec![192.0]);
    // The schedules put back what a launch wrote before running it again:
    // a read-modify-write of y[0] by atomics counts once, not three times.
    let e = run("selftest_last_writer_wins", &Buf::<f32>::out(s, 1), 1, 64).unwrap_err();
    assert!(
        e.contains("schedule: selftest_last_writer_wins wrote different results")
            && e.contains("reversed"),
        "{e}"
    );
    let e = run(
        "selftest_uninitialised_shared",
        &Buf::<f32>::out(s, 128),
        2,
        64,
    )
    .unwrap_err();
    assert!(
        e.contains("initcheck: selftest_uninitialised_shared: block (0, 0, 0): thread (32, 0, 0) read shared")
            && e.contains("selftest_uninitialised_shared::s + 128 bytes")
            && e.contains("selftest.cu:"),
        "{e}"
    );
}

/// Runs `kernel` of a mutant and returns its error: the mutation must be caught.
fn mutant_error(
    s: &'static Simt,
    kernel: &str,
    run: impl Fn(&'static Simt) -> Result<(), String>,
) -> String {
    match run(s) {
        Ok(()) => panic!("mutant {}: {kernel} ran without an error", s.name),
        Err(e) => {
            println!("mutant {}: {e}", s.name);
            assert!(e.contains(kernel), "the error names {kernel}: {e}");
            e
        }
    }
}

#[test]
fn emulator_catches_mutants() {
    // Each mutation is a bug a GPU would show only now and then: the
    // emulator must report it every time, naming the kernel (and the source
    // lines where it can).
    if simt::simt().is_none() {
        return;
    }
    // 1. The barrier between loading a K / V tile into shared memory and
    //    reading it, removed from the f32 attention kernel.
    let s = simt::mutant(
        "attention-no-syncthreads",
        "attention.cu",
        "        __syncthreads();\n        if (!valid) continue;",
        "        if (!valid) continue;",
        &["attention.cu"],
    );
    // (thread 0 reaches the first tile's reads before the other threads
    // stored it: caught as a read of unwritten shared memory, with the line.)
    let e = mutant_error(s, "rel_pos_attention_f32", |s| run_rel_pos_attention(s, 14));
    assert!(
        (e.contains("racecheck") || e.contains("initcheck"))
            && e.contains("rel_pos_attention_f32::ks")
            && e.contains("attention.cu:"),
        "{e}"
    );
    // 2. The __syncwarp of a warp's reduction through shared memory, removed
    //    (lane l reads w[l + o] while lane l + o may still be storing it).
    let s = simt::mutant(
        "warp-reduce-no-syncwarp",
        "selftest.cu",
        "        __syncwarp();  // this step's stores before the next step's loads\n",
        "",
        &["selftest.cu"],
    );
    let e = mutant_error(s, "selftest_warp_reduce_shared", |s| {
        let y = Buf::<f32>::out(s, 4);
        s.launch(
            "selftest_warp_reduce_shared",
            LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            },
            |k: unsafe extern "C" fn(F32m)| unsafe { k(y.m()) },
        )
    });
    assert!(
        e.contains("racecheck")
            && e.contains("same warp: no __syncwarp")
            && e.contains("selftest.cu:"),
        "{e}"
    );
    //    and the one in the attention kernel between a warp's query store and
    //    the other lanes' reads of it.
    let s = simt::mutant(
        "attention-no-syncwarp",
        "attention.cu",
        "    __syncwarp();\n    // Decomposed bias rows",
        "    // Decomposed bias rows",
        &["attention.cu"],
    );
    let e = mutant_error(s, "rel_pos_attention_f32", |s| run_rel_pos_attention(s, 14));
    assert!(e.contains("rel_pos_attention_f32::qs"), "{e}");
    // 3. A read of shared memory before it is written: block_sum reading all
    //    32 slots of its scratch when fewer warps wrote theirs (LayerNorm).
    let s = simt::mutant(
        "block-sum-reads-unwritten",
        "common.cuh",
        "v = lane < nwarps ? scratch[lane] : 0.0f;",
        "v = scratch[lane];",
        &["norm.cu"],
    );
    let e = mutant_error(s, "layer_norm_f32", |s| {
        let (rows, c) = (4usize, 768usize);
        let (x, w, b) = (rand(rows * c, 3, 4.0), rand(c, 4, 1.0), rand(c, 5, 1.0));
        let (xb, wb, bb) = (Buf::from(s, &x), Buf::from(s, &w), Buf::from(s, &b));
        let y = Buf::<f32>::out(s, rows * c);
        s.launch(
            "layer_norm_f32",
            norm::cuda::layer_norm_config(rows, c),
            |k: unsafe extern "C" fn(F32m, F32p, F32p, F32p, i32, i32, f32)| unsafe {
                k(y.m(), xb.p(), wb.p(), bb.p(), rows as i32, c as i32, 1e-6)
            },
        )
    });
    assert!(e.contains("initcheck") && e.contains("scratch"), "{e}");
    // 4. Two blocks writing the same elements without atomics: the
    //    grid-stride loop without the block offset (every block redoes
    //    elements 0..blockDim).
    let s = simt::mutant(
        "grid-stride-without-block",
        "common.cuh",
        "for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;",
        "for (long long i = (long long)threadIdx.x;",
        &["activation.cu"],
    );
    let e = mutant_error(s, "relu_f32", |s| {
        let n = 4096;
        let x = Buf::from(s, &rand(n, 1, 1.0));
        let y = Buf::<f32>::out(s, n);
        s.launch(
            "relu_f32",
            cfg1d(n),
            |k: unsafe extern "C" fn(F32m, F32p, i64)| unsafe { k(y.m(), x.p(), n as i64) },
        )
    });
    assert!(
        e.contains("racecheck: relu_f32: block (0, 0, 0) wrote global byte 0 of the buffer")
            && e.contains("block (1, 0, 0)")
            && e.contains("without atomics"),
        "{e}"
    );
}

#[test]
fn emulated_driver_and_cublas_check_arguments() {
    // A caller's mistake fails on the emulator as the CUDA driver and cuBLAS
    // document it would on a GPU (invalid value / not supported), instead of
    // computing something anyway.
    use std::ffi::c_void;
    let Some(s) = simt::simt() else { return };
    type Alloc = unsafe extern "C" fn(*mut u64, usize) -> i32;
    type Free = unsafe extern "C" fn(u64) -> i32;
    type HtoD = unsafe extern "C" fn(u64, *const c_void, usize) -> i32;
    type Create = unsafe extern "C" fn(*mut *mut c_void) -> i32;
    type Gemm = unsafe extern "C" fn(
        *mut c_void,
        i32,
        i32,
        i32,
        i32,
        i32,
        *const f32,
        u64,
        i32,
        i32,
        i64,
        u64,
        i32,
        i32,
        i64,
        *const f32,
        u64,
        i32,
        i32,
        i64,
        i32,
        i32,
        i32,
    ) -> i32;
    type LoadData = unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> i32;
    type GetFunction = unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *const c_char) -> i32;
    type Launch = unsafe extern "C" fn(
        *mut c_void,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        *mut c_void,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> i32;
    use std::ffi::c_char;
    // SAFETY: the signatures are those of cuda/host/fake_driver.cpp (the
    // driver API's and cuBLAS's); every pointer passed below is either valid
    // for the sizes given or the point of the check, which refuses it before
    // any access.
    unsafe {
        let alloc: Alloc = s.sym("cuMemAlloc_v2");
        let free: Free = s.sym("cuMemFree_v2");
        let htod: HtoD = s.sym("cuMemcpyHtoD_v2");
        let create: Create = s.sym("cublasCreate_v2");
        let gemm: Gemm = s.sym("cublasGemmStridedBatchedEx");
        let dev = |bytes: usize| {
            let mut p = 0u64;
            assert_eq!(alloc(&mut p, bytes), 0);
            p
        };
        let (a, b, c) = (dev(64), dev(64), dev(128));
        let small = dev(32);
        let host = [0f32; 64];
        let mut h = std::ptr::null_mut();
        assert_eq!(create(&mut h), 0);
        let (one, zero) = (1.0f32, 0.0f32);
        // (lda, sc, batch, atype, btype, compute, C): a 4 x 4 x 4 f32 GEMM
        // with one argument changed at a time.
        let call = |lda, ldc, sc, batch, atype, btype, compute, a_ptr, c_ptr| {
            gemm(
                h, 0, 0, 4, 4, 4, &one, a_ptr, atype, lda, 0, b, btype, 4, 0, &zero, c_ptr, 0, ldc,
                sc, batch, compute, 0,
            )
        };
        let host_ptr = host.as_ptr() as u64;
        let r = |v: i32, what: &str, want: i32| assert_eq!(v, want, "{what}");
        r(call(4, 4, 16, 2, 0, 0, 68, a, c), "a valid batch of two", 0);
        r(call(3, 4, 16, 1, 0, 0, 68, a, c), "lda below m", 7);
        r(call(4, 2, 16, 1, 0, 0, 68, a, c), "ldc below m", 7);
        r(call(4, 4, 8, 2, 0, 0, 68, a, c), "overlapping outputs", 7);
        r(
            call(4, 4, -16, 2, 0, 0, 68, a, c),
            "negative output stride",
            7,
        );
        r(call(4, 4, 16, -1, 0, 0, 68, a, c), "negative batch", 7);
        r(call(4, 4, 16, 1, 0, 14, 68, a, c), "f32 x bf16", 15);
        r(call(4, 4, 16, 1, 0, 0, 77, a, c), "TF32 compute", 15);
        r(
            call(4, 4, 16, 1, 0, 0, 68, small, c),
            "A past its allocation",
            7,
        );
        r(
            call(4, 4, 16, 1, 0, 0, 68, a, host_ptr),
            "C in host memory",
            7,
        );
        r(
            call(4, 4, 16, 3, 0, 0, 68, a, c),
            "C of batch 3 past its allocation",
            7,
        );
        r(
            htod(small, host.as_ptr() as *const c_void, 64),
            "copy past the end",
            1,
        );
        r(
            htod(small + 4, host.as_ptr() as *const c_void, 32),
            "copy from inside past the end",
            1,
        );
        r(
            htod(small, host.as_ptr() as *const c_void, 32),
            "copy that fits",
            0,
        );
        r(free(host_ptr), "free of host memory", 1);
        // Launch limits (sm_80 / sm_90): threads per block, block and grid
        // dimensions, shared memory (the tensor-core attention kernel has
        // 44 KB of static shared memory: 8 KB of dynamic memory on top is
        // over the 48 KB a block may have without the opt-in).
        let load: LoadData = s.sym("cuModuleLoadData");
        let get: GetFunction = s.sym("cuModuleGetFunction");
        let launch: Launch = s.sym("cuLaunchKernel");
        let ptx = c".entry rel_pos_attention_tc_f32(\n.entry relu_f32(\n";
        let mut module = std::ptr::null_mut();
        r(
            load(&mut module, ptx.as_ptr() as *const c_void),
            "module",
            0,
        );
        let mut f = std::ptr::null_mut();
        r(get(&mut f, module, c"relu_f32".as_ptr()), "relu_f32", 0);
        let mut tc = std::ptr::null_mut();
        r(
            get(&mut tc, module, c"rel_pos_attention_tc_f32".as_ptr()),
            "tc",
            0,
        );
        let (mut y, mut x, mut n) = (c, a, 16i64);
        let mut params = [
            &mut y as *mut u64 as *mut c_void,
            &mut x as *mut u64 as *mut c_void,
            &mut n as *mut i64 as *mut c_void,
        ];
        let go = |f, g: (u32, u32, u32), blk: (u32, u32, u32), smem: u32, p: *mut *mut c_void| {
            launch(
                f,
                g.0,
                g.1,
                g.2,
                blk.0,
                blk.1,
                blk.2,
                smem,
                std::ptr::null_mut(),
                p,
                std::ptr::null_mut(),
            )
        };
        let p = params.as_mut_ptr();
        r(go(f, (1, 1, 1), (32, 1, 1), 0, p), "relu 16 elements", 0);
        r(
            go(f, (1, 1, 1), (2048, 1, 1), 0, p),
            "2048 threads per block",
            1,
        );
        r(go(f, (1, 1, 1), (1, 1, 128), 0, p), "block z 128", 1);
        r(go(f, (1, 70000, 1), (32, 1, 1), 0, p), "grid y 70000", 1);
        r(
            go(tc, (1, 1, 1), (128, 1, 1), 8192, p),
            "44 + 8 KB shared",
            1,
        );
        for p in [a, b, c, small] {
            r(free(p), "free", 0);
        }
    }
}

#[test]
fn bilinear_needs_its_rounding_intrinsics_under_fma() {
    // The resize kernel is bit-exact with the CPU because every product and
    // sum goes through __fmul_rn / __fadd_rn; written as plain `a * b + c`,
    // the contraction nvcc does by default (and the FMA build here) fuses
    // them and the results move by an ulp: the bit-exact test must see it.
    if simt::simt().is_none() {
        return;
    }
    let s = simt::mutant_with(
        simt::Build::CHECKED_FMA,
        "bilinear-plain-arithmetic",
        "resize.cu",
        "        float a = __fadd_rn(__fmul_rn(lx0, r0[x0]), __fmul_rn(lx1, r0[x1]));
        float b = __fadd_rn(__fmul_rn(lx0, r1[x0]), __fmul_rn(lx1, r1[x1]));
        y[i] = __fadd_rn(__fmul_rn(ly0, a), __fmul_rn(ly1, b));",
        "        float a = lx0 * r0[x0] + lx1 * r0[x1];
        float b = lx0 * r1[x0] + lx1 * r1[x1];
        y[i] = ly0 * a + ly1 * b;",
        &["resize.cu"],
    );
    let r = std::panic::catch_unwind(|| bilinear_matches_cpu_bit_for_bit_on(s));
    assert!(
        r.is_err(),
        "plain arithmetic under FMA contraction stayed bit-exact: the test cannot see contraction"
    );
}

/// The f32 attention kernel on a small input (one image, one head, the
/// 16 x 16 grid): Ok, or the emulator's error.
fn run_rel_pos_attention(s: &'static Simt, window: usize) -> Result<(), String> {
    let (b, g, heads) = (1usize, 16usize, 1usize);
    let d = heads * 64;
    let ws = if window == 0 { g } else { window };
    let qkv = Buf::from(s, &rand(b * g * g * 3 * d, 6, 2.0));
    let bias = Buf::from(s, &rand(3 * d, 7, 1.0));
    let rh = Buf::from(s, &rand((2 * ws - 1) * 64, 8, 0.5));
    let rw = Buf::from(s, &rand((2 * ws - 1) * 64, 9, 0.5));
    let y = Buf::<f32>::out(s, b * g * g * d);
    s.launch(
        "rel_pos_attention_f32",
        attention::cuda::rel_pos_attention_config(b, g, heads, ws),
        |k: unsafe extern "C" fn(F32m, F32p, F32p, F32p, F32p, i32, i32, i32, i32)| unsafe {
            k(
                y.m(),
                qkv.p(),
                bias.p(),
                rh.p(),
                rw.p(),
                b as i32,
                g as i32,
                d as i32,
                ws as i32,
            )
        },
    )
}

#[test]
fn bilinear_matches_cpu_bit_for_bit() {
    simt::each_build(bilinear_matches_cpu_bit_for_bit_on);
}

fn bilinear_matches_cpu_bit_for_bit_on(s: &'static Simt) {
    // The mask post-processing: 64 -> 256, then the crop of a 256 x 171
    // resized image up to 512 x 342, and a downscale; exact, as the kernel
    // rounds every step in the CPU's order.
    let (n, g) = (3usize, 64usize);
    let low = rand(n * g * g, 170, 20.0);
    let lb = Buf::from(s, &low);
    let run = |x: &Buf<f32>,
               planes: usize,
               ph: usize,
               pw: usize,
               h: usize,
               w: usize,
               oh: usize,
               ow: usize| {
        let y = Buf::<f32>::out(s, planes * oh * ow);
        s.launch(
            "bilinear_f32",
            cfg1d(planes * oh * ow),
            |k: unsafe extern "C" fn(F32m, F32p, i64, i32, i32, i32, i64, i32, i32)| unsafe {
                k(
                    y.m(),
                    x.p(),
                    planes as i64,
                    h as i32,
                    w as i32,
                    pw as i32,
                    (ph * pw) as i64,
                    oh as i32,
                    ow as i32,
                )
            },
        )
        .unwrap();
        y
    };
    let up = run(&lb, n, g, g, g, g, 256, 256);
    let want_up = sam_unet::ops::resize::bilinear(&t(&low, &[n, 1, g, g]), 256, 256).unwrap();
    assert_close(
        "bilinear 64 -> 256",
        &up.to_vec(),
        want_up.as_f32().unwrap(),
        0.0,
        0.0,
    );
    let info = sam_unet::preprocess::ResizeInfo {
        orig_h: 512,
        orig_w: 342,
        new_h: 256,
        new_w: 171,
        size: 256,
    };
    let out = run(
        &up,
        n,
        256,
        256,
        info.new_h,
        info.new_w,
        info.orig_h,
        info.orig_w,
    );
    let want = sam_unet::model::sam_unet::postprocess(&t(&low, &[n, 1, g, g]), &info, 256).unwrap();
    assert_close(
        "postprocess (crop + bilinear to 512 x 342)",
        &out.to_vec(),
        want.as_f32().unwrap(),
        0.0,
        0.0,
    );
    let down = run(&lb, n, g, g, g, g, 37, 50);
    let want_down = sam_unet::ops::resize::bilinear(&t(&low, &[n, 1, g, g]), 37, 50).unwrap();
    assert_close(
        "bilinear 64 -> 37 x 50",
        &down.to_vec(),
        want_down.as_f32().unwrap(),
        0.0,
        0.0,
    );
}

#[test]
fn box_tokens_match_cpu() {
    simt::each_build(box_tokens_match_cpu_on);
}

fn box_tokens_match_cpu_on(s: &'static Simt) {
    let c = 256usize;
    // SAM's Gaussian matrix is N(0, 1); boxes anywhere in the 256 frame,
    // including the corners and a degenerate one.
    let gauss: Vec<f32> = rand(c, 180, 1.7);
    let (med, e0, e1) = (rand(c, 181, 1.0), rand(c, 182, 1.0), rand(c, 183, 1.0));
    let boxes: Vec<[f32; 4]> = vec![
        [10.0, 20.5, 200.0, 180.25],
        [0.0, 0.0, 255.0, 255.0],
        [100.0, 100.0, 100.0, 100.0],
        [3.3, 250.1, 7.9, 255.0],
    ];
    let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
    let (bb, gb, mb, e0b, e1b) = (
        Buf::from(s, &flat),
        Buf::from(s, &gauss),
        Buf::from(s, &med),
        Buf::from(s, &e0),
        Buf::from(s, &e1),
    );
    let n = boxes.len();
    let sparse = sam_unet::ops::prompt::embed_boxes(&boxes, &gauss, &e0, &e1, 256);
    // lead 1: the med token ahead of the corners (the mask decoder's
    // tokens); lead 0: the corners alone, med not read (null).
    for lead in [1usize, 0] {
        let t = 2 + lead;
        let y = Buf::<f32>::out(s, n * t * c);
        s.launch(
            "box_tokens_f32",
            cfg1d(n * t * c),
            |k: unsafe extern "C" fn(F32m, F32p, F32p, F32p, F32p, F32p, i32, i32, f32, i32)| unsafe {
                k(
                    y.m(),
                    bb.p(),
                    gb.p(),
                    if lead == 1 { mb.p() } else { std::ptr::null() },
                    e0b.p(),
                    e1b.p(),
                    n as i32,
                    c as i32,
                    256.0,
                    lead as i32,
                )
            },
        )
        .unwrap();
        let want: Vec<f32> = (0..n)
            .flat_map(|i| {
                med.iter()
                    .take(lead * c)
                    .chain(&sparse[i * 2 * c..(i + 1) * 2 * c])
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_close(
            &format!("box_tokens lead {lead}"),
            &y.to_vec(),
            &want,
            1e-6,
            1e-6,
        );
    }
}

#[test]
fn repeat_matches_definition() {
    simt::each_build(repeat_matches_definition_on);
}

fn repeat_matches_definition_on(s: &'static Simt) {
    let (len, n) = (256 * 256 + 3, 5usize);
    let x = rand(len, 190, 1.0);
    let xb = Buf::from(s, &x);
    let y = Buf::<f32>::out(s, len * n);
    s.launch(
        "repeat_f32",
        cfg1d(len * n),
        |k: unsafe extern "C" fn(F32m, F32p, i64, i64)| unsafe {
            k(y.m(), xb.p(), len as i64, n as i64)
        },
    )
    .unwrap();
    let want: Vec<f32> = (0..n).flat_map(|_| x.iter().copied()).collect();
    assert_close("repeat", &y.to_vec(), &want, 0.0, 0.0);
}

#[test]
fn rel_pos_attention_tensor_cores_match_cpu() {
    simt::each_build(rel_pos_attention_tensor_cores_match_cpu_on);
}

fn rel_pos_attention_tensor_cores_match_cpu_on(s: &'static Simt) {
    // The bf16 tensor-core kernel (mma.sync fragments emulated lane by lane)
    // against the f32 CPU twin: bf16 rounding of q, k, v and the
    // probabilities bounds the error (relative L2 well under 1e-2). Window 14
    // on the 16 x 16 grid (partial windows of 28 and 4 queries, key tiles past
    // 196 masked), global (256 keys), window 8; qkv with and without its bias.
    let (b, g, heads) = (2usize, 16usize, 2usize);
    let d = heads * 64;
    let qkv = rand(b * g * g * 3 * d, 6, 2.0);
    let bias = rand(3 * d, 7, 1.0);
    let unbiased: Vec<f32> = qkv
        .iter()
        .enumerate()
        .map(|(i, v)| v - bias[i % (3 * d)])
        .collect();
    let (qb, ub, biasb) = (
        Buf::from(s, &qkv),
        Buf::from(s, &unbiased),
        Buf::from(s, &bias),
    );
    for (window, biased) in [(14usize, true), (0, false), (8, true), (14, false)] {
        let ws = if window == 0 { g } else { window };
        let (rh, rw) = (
            rand((2 * ws - 1) * 64, 8, 0.5),
            rand((2 * ws - 1) * 64, 9, 0.5),
        );
        let (rhb, rwb) = (Buf::from(s, &rh), Buf::from(s, &rw));
        let y = Buf::<u16>::out(s, b * g * g * d);
        let src = if biased { qb.p() } else { ub.p() };
        s.launch(
            "rel_pos_attention_tc_bf16",
            attention::cuda::rel_pos_attention_tc_config(b, g, heads, ws),
            |k: unsafe extern "C" fn(*mut u16, F32p, F32p, F32p, F32p, i32, i32, i32, i32, i32)| unsafe {
                k(y.m(), src, biasb.p(), rhb.p(), rwb.p(), b as i32, g as i32, d as i32, ws as i32, biased as i32)
            },
        )
        .unwrap();
        let got: Vec<f32> = y
            .to_vec()
            .into_iter()
            .map(|v| half::bf16::from_bits(v).to_f32())
            .collect();
        let want = attention::rel_pos_attention(
            &t(&qkv, &[b, g, g, 3 * d]),
            &t(&bias, &[3 * d]),
            &t(&rh, &[2 * ws - 1, 64]),
            &t(&rw, &[2 * ws - 1, 64]),
            heads,
            window,
        )
        .unwrap();
        let rel = kernel_check::rel_l2(&got, want.as_f32().unwrap());
        println!("rel_pos_attention_tc window {window} biased {biased}: relative L2 {rel:.2e}");
        assert!(
            rel < 5e-3,
            "tensor-core attention window {window}: relative L2 {rel}"
        );
        assert_close(
            &format!("rel_pos_attention_tc window {window}"),
            &got,
            want.as_f32().unwrap(),
            3e-2,
            3e-2,
        );
    }
}

#[test]
fn bf16_output_epilogues_match_cpu() {
    simt::each_build(bf16_output_epilogues_match_cpu_on);
}

fn bf16_output_epilogues_match_cpu_on(s: &'static Simt) {
    // LayerNorm -> bf16, bias + GELU -> bf16, residual + bias: the fused
    // passes of the bf16 ViT block; bf16 results equal the CPU value rounded
    // to bf16 up to one ulp (GELU's erff and the norm's rsqrt may differ by
    // an f32 ulp before rounding).
    let (rows, c) = (256usize, 768usize);
    let (x, w, b) = (rand(rows * c, 3, 4.0), rand(c, 4, 1.0), rand(c, 5, 1.0));
    let (xb, wb, bb) = (Buf::from(s, &x), Buf::from(s, &w), Buf::from(s, &b));
    let bf = |v: &[u16]| {
        v.iter()
            .map(|&u| half::bf16::from_bits(u).to_f32())
            .collect::<Vec<f32>>()
    };
    let y = Buf::<u16>::out(s, rows * c);
    s.launch(
        "layer_norm_bf16out",
        norm::cuda::layer_norm_config(rows, c),
        |k: unsafe extern "C" fn(*mut u16, F32p, F32p, F32p, i32, i32, f32)| unsafe {
            k(y.m(), xb.p(), wb.p(), bb.p(), rows as i32, c as i32, 1e-6)
        },
    )
    .unwrap();
    let want = norm::layer_norm(&t(&x, &[rows, c]), &t(&w, &[c]), &t(&b, &[c]), 1e-6).unwrap();
    assert_close(
        "layer_norm_bf16out",
        &bf(&y.to_vec()),
        want.as_f32().unwrap(),
        1e-5,
        1.0 / 128.0,
    );
    let (hid, hc) = (256usize, 3072usize);
    let m = rand(hid * hc, 6, 4.0);
    let bias = rand(hc, 7, 1.0);
    let (mb, biasb) = (Buf::from(s, &m), Buf::from(s, &bias));
    let y16 = Buf::<u16>::out(s, hid * hc);
    s.launch(
        "bias_act_bf16out",
        cfg1d(hid * hc),
        |k: unsafe extern "C" fn(*mut u16, F32p, F32p, i64, i32, i32)| unsafe {
            k(y16.m(), mb.p(), biasb.p(), hid as i64, hc as i32, 2)
        },
    )
    .unwrap();
    let pre: Vec<f32> = m
        .iter()
        .enumerate()
        .map(|(i, v)| v + bias[i % hc])
        .collect();
    let want = activation::act(&t(&pre, &[hid * hc]), Act::Gelu).unwrap();
    assert_close(
        "bias_gelu_bf16out",
        &bf(&y16.to_vec()),
        want.as_f32().unwrap(),
        1e-6,
        1.0 / 128.0,
    );
    let r = Buf::<f32>::out(s, rows * c);
    s.launch(
        "add_bias_rows_f32",
        cfg1d(rows * c),
        |k: unsafe extern "C" fn(F32m, F32p, F32p, i64, i32)| unsafe {
            k(r.m(), xb.p(), bb.p(), rows as i64, c as i32)
        },
    )
    .unwrap();
    let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + b[i % c]).collect();
    assert_close("add_bias_rows", &r.to_vec(), &want, 0.0, 0.0);
}

#[test]
fn adam_matches_cpu_bit_for_bit() {
    simt::each_build(adam_matches_cpu_bit_for_bit_on);
}

/// Three Adam steps of the kernel against ops::optim::adam_cpu: every value
/// bit-exact (both round each product and sum on its own, in one order; the
/// FMA build may not contract them). Gradients include zeros and both signs.
fn adam_matches_cpu_bit_for_bit_on(s: &'static Simt) {
    use sam_unet::ops::optim::{AdamStep, adam_cpu};
    let n = 3000;
    let mut p = rand(n, 300, 0.5);
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (pb, mb, vb) = (Buf::from(s, &p), Buf::from(s, &m), Buf::from(s, &v));
    for t in 1..=3u64 {
        let mut g = rand(n, 300 + t, 1e-2);
        g[..7].fill(0.0);
        let st = AdamStep::new(1e-4, 0.9, 0.999, 1e-8, t);
        adam_cpu(&mut p, &g, &mut m, &mut v, &st).unwrap();
        let (gb, hb) = (Buf::from(s, &g), Buf::from(s, &st.to_array()));
        s.launch(
            "adam_f32",
            cfg1d(n),
            |k: unsafe extern "C" fn(F32m, F32p, F32m, F32m, F32p, i64)| unsafe {
                k(pb.m(), gb.p(), mb.m(), vb.m(), hb.p(), n as i64)
            },
        )
        .unwrap();
        for (what, got, want) in [
            ("p", pb.to_vec(), &p),
            ("m", mb.to_vec(), &m),
            ("v", vb.to_vec(), &v),
        ] {
            for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "adam step {t}: {what}[{i}] {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn act_backward_matches_cpu() {
    simt::each_build(act_backward_matches_cpu_on);
}

/// ReLU's and GELU's backward against the CPU twin (ReLU exact; GELU within
/// CUDA's erff / expf error), over values that straddle 0.
fn act_backward_matches_cpu_on(s: &'static Simt) {
    use sam_unet::Tensor;
    use sam_unet::ops::activation::{Act, act_backward};
    let n = 5000;
    let x = rand(n, 310, 6.0);
    let g = rand(n, 311, 2.0);
    let (xb, gb) = (Buf::from(s, &x), Buf::from(s, &g));
    for (a, code, tol) in [(Act::Relu, 1, 0.0), (Act::Gelu, 2, 2e-6)] {
        let y = Buf::<f32>::out(s, n);
        s.launch(
            "act_backward_f32",
            cfg1d(n),
            |k: unsafe extern "C" fn(F32m, F32p, F32p, i64, i32)| unsafe {
                k(y.m(), xb.p(), gb.p(), n as i64, code)
            },
        )
        .unwrap();
        let want = act_backward(
            &Tensor::from_vec(x.clone(), [n]).unwrap(),
            &Tensor::from_vec(g.clone(), [n]).unwrap(),
            a,
        )
        .unwrap();
        assert_close(
            &format!("{a:?} backward"),
            &y.to_vec(),
            want.as_f32().unwrap(),
            tol,
            tol,
        );
    }
}

#[test]
fn sum_rows_matches_cpu_bit_for_bit() {
    simt::each_build(sum_rows_matches_cpu_bit_for_bit_on);
}

/// The two-stage row sum against ops::reduce::sum_rows_cpu, bit for bit:
/// row counts below, at and across the chunk (256), one and many columns.
fn sum_rows_matches_cpu_bit_for_bit_on(s: &'static Simt) {
    use sam_unet::ops::reduce::{CHUNK, sum_rows_cpu};
    for (rows, cols) in [(1usize, 7usize), (255, 3), (256, 1), (700, 33)] {
        let x = rand(rows * cols, (rows + cols) as u64, 3.0);
        let xb = Buf::from(s, &x);
        let chunks = rows.div_ceil(CHUNK);
        let part = Buf::<f64>::out(s, chunks * cols);
        let out = Buf::<f32>::out(s, cols);
        s.launch(
            "sum_rows_partial",
            cfg1d(chunks * cols),
            |k: unsafe extern "C" fn(*mut f64, F32p, i64, i32, i32)| unsafe {
                k(part.m(), xb.p(), rows as i64, cols as i32, CHUNK as i32)
            },
        )
        .unwrap();
        s.launch(
            "sum_rows_finish",
            cfg1d(cols),
            |k: unsafe extern "C" fn(F32m, *const f64, i64, i32)| unsafe {
                k(out.m(), part.p(), chunks as i64, cols as i32)
            },
        )
        .unwrap();
        let want = sum_rows_cpu(&x, rows, cols);
        for (c, (a, b)) in out.to_vec().iter().zip(&want).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{rows} x {cols}: column {c}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn sum_squares_matches_cpu_bit_for_bit() {
    simt::each_build(sum_squares_matches_cpu_bit_for_bit_on);
}

/// The chunked sum of squares (a gradient norm) against
/// ops::reduce::sum_squares_cpu, bit for bit: below one lane row, across
/// lanes and across chunks (a small chunk here, so that several blocks run).
fn sum_squares_matches_cpu_bit_for_bit_on(s: &'static Simt) {
    use sam_unet::ops::reduce::{SQ_CHUNK, SQ_LANES, sum_squares_cpu};
    for n in [5usize, 700, SQ_CHUNK + 1000] {
        let x = rand(n, n as u64, 2.0);
        let xb = Buf::from(s, &x);
        let chunks = n.div_ceil(SQ_CHUNK);
        let part = Buf::<f64>::out(s, chunks);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (chunks as u32, 1, 1),
            block_dim: (SQ_LANES as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        s.launch(
            "sumsq_chunks",
            cfg,
            |k: unsafe extern "C" fn(*mut f64, F32p, i64, i32)| unsafe {
                k(part.m(), xb.p(), n as i64, SQ_CHUNK as i32)
            },
        )
        .unwrap();
        let want = sum_squares_cpu(&x);
        let got = part.to_vec();
        assert_eq!(got.len(), want.len());
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{n} values, chunk {k}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn layer_norm_backward_matches_cpu() {
    simt::each_build(layer_norm_backward_matches_cpu_on);
}

/// Both LayerNorm forms' backward kernel against the CPU tape (dx, and the
/// per-group weight / bias terms summed on the host).
fn layer_norm_backward_matches_cpu_on(s: &'static Simt) {
    use sam_unet::Tensor;
    use sam_unet::autograd::Recording;
    use sam_unet::ops::activation::Act;
    use sam_unet::ops::norm::{layer_norm, layer_norm2d};
    // (dims, 2d form): tokens [5, 4, 96] over the last dim; maps [2, 24, 3, 5].
    for (dims, two_d) in [(vec![5usize, 4, 96], false), (vec![2, 24, 3, 5], true)] {
        let c = if two_d { dims[1] } else { dims[2] };
        let n: usize = dims.iter().product();
        let (x, w, b, g) = (
            rand(n, 320, 3.0),
            rand(c, 321, 1.0),
            rand(c, 322, 1.0),
            rand(n, 323, 1.0),
        );
        let rec = Recording::start().unwrap();
        let (mut xt, mut wt, mut bt) = (
            Tensor::from_vec(x.clone(), dims.clone()).unwrap(),
            Tensor::from_vec(w.clone(), [c]).unwrap(),
            Tensor::from_vec(b.clone(), [c]).unwrap(),
        );
        for (t, name) in [(&mut xt, "x"), (&mut wt, "w"), (&mut bt, "b")] {
            rec.param(t, name).unwrap();
        }
        let y = if two_d {
            layer_norm2d(&xt, &wt, &bt, 1e-6, Act::None).unwrap()
        } else {
            layer_norm(&xt, &wt, &bt, 1e-6).unwrap()
        };
        let want = rec
            .backward(&y, &Tensor::from_vec(g.clone(), dims.clone()).unwrap())
            .unwrap();
        let (groups, stride, p) = if two_d {
            (
                dims[0] * dims[2] * dims[3],
                dims[2] * dims[3],
                dims[2] * dims[3],
            )
        } else {
            (dims[0] * dims[1], 1, 0)
        };
        let (xb, wb, gb) = (Buf::from(s, &x), Buf::from(s, &w), Buf::from(s, &g));
        let (dx, pw, pb) = (
            Buf::<f32>::out(s, n),
            Buf::<f32>::out(s, n),
            Buf::<f32>::out(s, n),
        );
        s.launch(
            "layer_norm_backward_f32",
            cfg1d(groups),
            |k: unsafe extern "C" fn(
                F32m,
                F32m,
                F32m,
                F32p,
                F32p,
                F32p,
                i64,
                i32,
                i64,
                i64,
                f32,
            )| unsafe {
                k(
                    dx.m(),
                    pw.m(),
                    pb.m(),
                    xb.p(),
                    wb.p(),
                    gb.p(),
                    groups as i64,
                    c as i32,
                    stride as i64,
                    p as i64,
                    1e-6,
                )
            },
        )
        .unwrap();
        let sum = |v: Vec<f32>| -> Vec<f32> {
            let mut acc = vec![0.0f64; c];
            for row in v.chunks_exact(c) {
                acc.iter_mut().zip(row).for_each(|(a, &x)| *a += x as f64);
            }
            acc.into_iter().map(|v| v as f32).collect()
        };
        let get = |n: &str| {
            want.iter()
                .find(|(k, _)| k == n)
                .unwrap()
                .1
                .as_f32()
                .unwrap()
                .to_vec()
        };
        let what = if two_d { "layer_norm2d" } else { "layer_norm" };
        assert_close(&format!("{what} dx"), &dx.to_vec(), &get("x"), 1e-5, 1e-5);
        assert_close(
            &format!("{what} dw"),
            &sum(pw.to_vec()),
            &get("w"),
            1e-5,
            1e-5,
        );
        assert_close(
            &format!("{what} db"),
            &sum(pb.to_vec()),
            &get("b"),
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn loss_kernels_match_cpu() {
    simt::each_build(loss_kernels_match_cpu_on);
}

/// focal + 20 dice: the chunked sums and the gradient kernel against the CPU
/// op (terms to 1e-6, gradient to 1e-5 relative L2), over two chunks of
/// 16 K values with one empty mask.
fn loss_kernels_match_cpu_on(s: &'static Simt) {
    use sam_unet::Tensor;
    use sam_unet::autograd::Recording;
    use sam_unet::ops::loss::focal_dice;
    let dims = [3usize, 1, 128, 128];
    let n: usize = dims.iter().product();
    let x = rand(n, 330, 8.0);
    let y: Vec<f32> = (0..n)
        .map(|i| {
            if i >= 2 * 128 * 128 {
                0.0
            } else {
                ((i / 37 + i / 1000) % 2) as f32
            }
        })
        .collect();
    let rec = Recording::start().unwrap();
    let mut xt = Tensor::from_vec(x.clone(), dims).unwrap();
    rec.param(&mut xt, "x").unwrap();
    let (loss, terms) = focal_dice(&xt, &Tensor::from_vec(y.clone(), dims).unwrap(), 20.0).unwrap();
    let want_g = rec
        .backward(&loss, &Tensor::from_vec(vec![2.0], [1]).unwrap())
        .unwrap();
    let chunk = 1usize << 14;
    let chunks = n.div_ceil(chunk);
    let (xb, yb) = (Buf::from(s, &x), Buf::from(s, &y));
    let part = Buf::<f64>::out(s, chunks * 4);
    let sums = Buf::<f64>::out(s, 4);
    let g = Buf::<f32>::out(s, n);
    let scale = Buf::from(s, &[2.0f32]);
    s.launch(
        "loss_partial",
        cfg1d(chunks),
        |k: unsafe extern "C" fn(*mut f64, F32p, F32p, i64, i64)| unsafe {
            k(part.m(), xb.p(), yb.p(), n as i64, chunk as i64)
        },
    )
    .unwrap();
    s.launch(
        "loss_finish",
        cfg1d(1),
        |k: unsafe extern "C" fn(*mut f64, *const f64, i64)| unsafe {
            k(sums.m(), part.p(), chunks as i64)
        },
    )
    .unwrap();
    s.launch(
        "loss_grad",
        cfg1d(n),
        |k: unsafe extern "C" fn(F32m, F32p, F32p, *const f64, F32p, i64, f64)| unsafe {
            k(g.m(), xb.p(), yb.p(), sums.p(), scale.p(), n as i64, 20.0)
        },
    )
    .unwrap();
    let sv = sums.to_vec();
    let focal = sv[0] / n as f64;
    let dice = 1.0 - (2.0 * sv[1] + 1.0) / (sv[2] + sv[3] + 1.0);
    for (what, got, want) in [("focal", focal, terms.focal), ("dice", dice, terms.dice)] {
        assert!(
            (got - want).abs() <= 1e-6 * want.abs(),
            "{what}: {got} vs {want}"
        );
    }
    let got = g.to_vec();
    let want = want_g[0].1.as_f32().unwrap();
    let rel = kernel_check::rel_l2(&got, want);
    assert!(rel <= 1e-5, "loss gradient: relative L2 {rel}");
}

#[test]
fn bilinear_and_mask_dot_backward_match_cpu() {
    simt::each_build(bilinear_and_mask_dot_backward_match_cpu_on);
}

/// The decoder end of the backward: bilinear 16 -> 64 x 48 (the loss's
/// upsample, smaller) and the mask product's three gradients, against the
/// CPU tape.
fn bilinear_and_mask_dot_backward_match_cpu_on(s: &'static Simt) {
    use sam_unet::Tensor;
    use sam_unet::autograd::Recording;
    // bilinear: planes 3, 16 x 16 -> 64 x 48, through the kernels' CSR taps
    // built here as the launcher builds them (outputs in order per input).
    let (planes, h, w, oh, ow) = (3usize, 16usize, 16usize, 64usize, 48usize);
    let x = rand(planes * h * w, 340, 1.0);
    let g = rand(planes * oh * ow, 341, 1.0);
    let rec = Recording::start().unwrap();
    let mut xt = Tensor::from_vec(x.clone(), [1, planes, h, w]).unwrap();
    rec.param(&mut xt, "x").unwrap();
    let y = sam_unet::ops::resize::bilinear(&xt, oh, ow).unwrap();
    let want = rec
        .backward(
            &y,
            &Tensor::from_vec(g.clone(), [1, planes, oh, ow]).unwrap(),
        )
        .unwrap();
    let taps = |inp: usize, out: usize| -> (Vec<i32>, Vec<i32>, Vec<f32>) {
        // torch's align_corners=False taps, reversed.
        let scale = inp as f32 / out as f32;
        let mut r: Vec<Vec<(usize, f32)>> = vec![vec![]; inp];
        for d in 0..out {
            let real = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (real as usize).min(inp - 1);
            let l1 = real - i0 as f32;
            let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
            r[i0].push((d, 1.0 - l1));
            r[i1].push((d, l1));
        }
        let mut off = vec![0i32];
        let (mut idx, mut wt) = (vec![], vec![]);
        for t in r {
            for (o, v) in t {
                idx.push(o as i32);
                wt.push(v);
            }
            off.push(idx.len() as i32);
        }
        (off, idx, wt)
    };
    let (cx, cy) = (taps(w, ow), taps(h, oh));
    let gb = Buf::from(s, &g);
    let (oxb, ixb, wxb) = (
        Buf::from(s, &cx.0),
        Buf::from(s, &cx.1),
        Buf::from(s, &cx.2),
    );
    let (oyb, iyb, wyb) = (
        Buf::from(s, &cy.0),
        Buf::from(s, &cy.1),
        Buf::from(s, &cy.2),
    );
    let tmp = Buf::<f32>::out(s, planes * oh * w);
    let dx = Buf::<f32>::out(s, planes * h * w);
    type I32p = *const i32;
    s.launch(
        "bilinear_backward_cols",
        cfg1d(planes * oh * w),
        |k: unsafe extern "C" fn(F32m, F32p, I32p, I32p, F32p, i64, i32, i32, i32)| unsafe {
            k(
                tmp.m(),
                gb.p(),
                oxb.p(),
                ixb.p(),
                wxb.p(),
                planes as i64,
                oh as i32,
                ow as i32,
                w as i32,
            )
        },
    )
    .unwrap();
    s.launch(
        "bilinear_backward_rows",
        cfg1d(planes * h * w),
        |k: unsafe extern "C" fn(F32m, F32p, I32p, I32p, F32p, i64, i32, i32, i32)| unsafe {
            k(
                dx.m(),
                tmp.p(),
                oyb.p(),
                iyb.p(),
                wyb.p(),
                planes as i64,
                h as i32,
                oh as i32,
                w as i32,
            )
        },
    )
    .unwrap();
    assert_close(
        "bilinear backward",
        &dx.to_vec(),
        want[0].1.as_f32().unwrap(),
        1e-6,
        1e-6,
    );

    // mask_dot: n 3 boxes, c 8 channels, p 40 pixels.
    let (n, c, p) = (3usize, 8usize, 40usize);
    let (hv, fv, mv, gv) = (
        rand(n * c, 342, 1.0),
        rand(n * c * p, 343, 1.0),
        rand(c * p, 344, 1.0),
        rand(n * p, 345, 1.0),
    );
    let rec = Recording::start().unwrap();
    let mut ts = [
        Tensor::from_vec(hv.clone(), [n, c]).unwrap(),
        Tensor::from_vec(fv.clone(), [n, c, 5, 8]).unwrap(),
        Tensor::from_vec(mv.clone(), [1, c, 5, 8]).unwrap(),
    ];
    for (i, t) in ts.iter_mut().enumerate() {
        rec.param(t, format!("{i}")).unwrap();
    }
    let y = sam_unet::ops::linear::mask_dot(&ts[0], &ts[1], &ts[2]).unwrap();
    let want = rec
        .backward(&y, &Tensor::from_vec(gv.clone(), [n, 1, 5, 8]).unwrap())
        .unwrap();
    let (hb, fb, mb, gb) = (
        Buf::from(s, &hv),
        Buf::from(s, &fv),
        Buf::from(s, &mv),
        Buf::from(s, &gv),
    );
    let (dh, df, dm) = (
        Buf::<f32>::out(s, n * c),
        Buf::<f32>::out(s, n * c * p),
        Buf::<f32>::out(s, c * p),
    );
    s.launch(
        "mask_dot_backward_h",
        cfg1d(n * c),
        |k: unsafe extern "C" fn(F32m, F32p, F32p, F32p, i32, i32, i64)| unsafe {
            k(dh.m(), gb.p(), fb.p(), mb.p(), n as i32, c as i32, p as i64)
        },
    )
    .unwrap();
    s.launch(
        "mask_dot_backward_f",
        cfg1d(n * c * p),
        |k: unsafe extern "C" fn(F32m, F32p, F32p, i32, i32, i64)| unsafe {
            k(df.m(), gb.p(), hb.p(), n as i32, c as i32, p as i64)
        },
    )
    .unwrap();
    s.launch(
        "mask_dot_backward_m",
        cfg1d(c * p),
        |k: unsafe extern "C" fn(F32m, F32p, F32p, i32, i32, i64)| unsafe {
            k(dm.m(), gb.p(), hb.p(), n as i32, c as i32, p as i64)
        },
    )
    .unwrap();
    let get = |k: &str| {
        want.iter()
            .find(|(n, _)| n == k)
            .unwrap()
            .1
            .as_f32()
            .unwrap()
            .to_vec()
    };
    assert_close("mask_dot dh", &dh.to_vec(), &get("0"), 1e-6, 1e-6);
    assert_close("mask_dot df", &df.to_vec(), &get("1"), 0.0, 0.0);
    assert_close("mask_dot dm", &dm.to_vec(), &get("2"), 1e-6, 1e-6);
}

#[test]
fn col2im_gathers_the_taps() {
    simt::each_build(col2im_gathers_the_taps_on);
}

/// col2im against its definition (every column entry added into the input
/// pixel its tap read), for 3x3 stride 1 and 2, 7x7 stride 2 padding 3 and
/// 1x1 stride 2 (the ResNet's geometries) on odd and even sizes.
fn col2im_gathers_the_taps_on(s: &'static Simt) {
    for (k, st, pad, h, w) in [
        (3usize, 1usize, 1usize, 9usize, 8usize),
        (3, 2, 1, 8, 8),
        (7, 2, 3, 13, 10),
        (1, 2, 0, 8, 7),
    ] {
        let (n, c) = (2usize, 3usize);
        let (ho, wo) = ((h + 2 * pad - k) / st + 1, (w + 2 * pad - k) / st + 1);
        let dcol = rand(n * c * k * k * ho * wo, (k * 100 + h) as u64, 1.0);
        let mut want = vec![0.0f64; n * c * h * w];
        for i in 0..n {
            for ci in 0..c {
                for ky in 0..k {
                    for kx in 0..k {
                        for oy in 0..ho {
                            for ox in 0..wo {
                                let (iy, ix) = (
                                    (oy * st + ky) as isize - pad as isize,
                                    (ox * st + kx) as isize - pad as isize,
                                );
                                if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= w {
                                    continue;
                                }
                                let r = ((i * c + ci) * k + ky) * k + kx;
                                want[((i * c + ci) * h + iy as usize) * w + ix as usize] +=
                                    dcol[r * ho * wo + oy * wo + ox] as f64;
                            }
                        }
                    }
                }
            }
        }
        let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
        let db = Buf::from(s, &dcol);
        let dx = Buf::<f32>::out(s, n * c * h * w);
        let a = [n, c, h, w, k, k, st, pad, ho, wo].map(|v| v as i32);
        s.launch(
            "col2im_f32",
            cfg1d(n * c * h * w),
            |f: unsafe extern "C" fn(
                F32m,
                F32p,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
            )| unsafe {
                f(
                    dx.m(),
                    db.p(),
                    a[0],
                    a[1],
                    a[2],
                    a[3],
                    a[4],
                    a[5],
                    a[6],
                    a[7],
                    a[8],
                    a[9],
                )
            },
        )
        .unwrap();
        assert_close(
            &format!("col2im k{k} s{st} p{pad} {h}x{w}"),
            &dx.to_vec(),
            &want,
            1e-6,
            1e-6,
        );
    }
}

#[test]
fn pool_and_convt_backward_layouts() {
    simt::each_build(pool_and_convt_backward_layouts_on);
}

/// max_pool2d's backward gather against the CPU tape, on maps with flat
/// regions (ties: the first maximum in scan order takes the gradient) and
/// NaN; convt_gather against its definition.
fn pool_and_convt_backward_layouts_on(s: &'static Simt) {
    use sam_unet::Tensor;
    use sam_unet::autograd::Recording;
    let (planes, h, w) = (3usize, 9usize, 8usize);
    let mut x = rand(planes * h * w, 350, 1.0);
    for v in x.iter_mut().skip(20).take(30) {
        *v = 0.5; // a flat patch: tied windows
    }
    x[100] = f32::NAN;
    let (k, st, p) = (3usize, 2usize, 1usize);
    let (ho, wo) = ((h + 2 * p - k) / st + 1, (w + 2 * p - k) / st + 1);
    let g = rand(planes * ho * wo, 351, 1.0);
    let rec = Recording::start().unwrap();
    let mut xt = Tensor::from_vec(x.clone(), [1, planes, h, w]).unwrap();
    rec.param(&mut xt, "x").unwrap();
    let y = sam_unet::ops::conv::max_pool2d(&xt, k, st, p).unwrap();
    let want = rec
        .backward(
            &y,
            &Tensor::from_vec(g.clone(), [1, planes, ho, wo]).unwrap(),
        )
        .unwrap();
    let (xb, gb) = (Buf::from(s, &x), Buf::from(s, &g));
    let dx = Buf::<f32>::out(s, planes * h * w);
    let a = [h, w, ho, wo, k, st, p].map(|v| v as i32);
    s.launch(
        "max_pool2d_backward_f32",
        cfg1d(planes * h * w),
        |f: unsafe extern "C" fn(F32m, F32p, F32p, i64, i32, i32, i32, i32, i32, i32, i32)| unsafe {
            f(
                dx.m(),
                xb.p(),
                gb.p(),
                planes as i64,
                a[0],
                a[1],
                a[2],
                a[3],
                a[4],
                a[5],
                a[6],
            )
        },
    )
    .unwrap();
    assert_close(
        "max_pool2d backward",
        &dx.to_vec(),
        want[0].1.as_f32().unwrap(),
        0.0,
        0.0,
    );

    let (n, o, hh, ww, kk) = (2usize, 3usize, 4usize, 5usize, 2usize);
    let gv = rand(n * o * hh * kk * ww * kk, 352, 1.0);
    let gb = Buf::from(s, &gv);
    let gt = Buf::<f32>::out(s, gv.len());
    s.launch(
        "convt_gather_f32",
        cfg1d(gv.len()),
        |f: unsafe extern "C" fn(F32m, F32p, i32, i32, i32, i32, i32)| unsafe {
            f(
                gt.m(),
                gb.p(),
                n as i32,
                o as i32,
                hh as i32,
                ww as i32,
                kk as i32,
            )
        },
    )
    .unwrap();
    let got = gt.to_vec();
    for i in 0..n {
        for oc in 0..o {
            for y in 0..hh * kk {
                for x in 0..ww * kk {
                    let src = ((i * o + oc) * hh * kk + y) * ww * kk + x;
                    let r = (oc * kk + y % kk) * kk + x % kk;
                    let dst = (i * o * kk * kk + r) * hh * ww + (y / kk) * ww + x / kk;
                    assert_eq!(
                        got[dst].to_bits(),
                        gv[src].to_bits(),
                        "convt_gather at {src}"
                    );
                }
            }
        }
    }
}

#[test]
fn batch_norm_kernels_match_cpu() {
    simt::each_build(batch_norm_kernels_match_cpu_on);
}

/// Train-mode BatchNorm's four kernels against the CPU op and its tape:
/// statistics bit-exact (same f64 order), output and gradients to 1e-6.
fn batch_norm_kernels_match_cpu_on(s: &'static Simt) {
    // Plain, and fused with a residual add and ReLU; planes shorter and
    // longer than the reductions' 256 lanes.
    batch_norm_variant(s, false, (2, 5, 37));
    batch_norm_variant(s, true, (2, 3, 600));
}

fn batch_norm_variant(s: &'static Simt, fused: bool, (n, c, p): (usize, usize, usize)) {
    use sam_unet::Tensor;
    use sam_unet::autograd::Recording;
    use sam_unet::ops::norm::batch_norm_train_fused;
    let (x, gm, bt, g) = (
        rand(n * c * p, 360, 3.0),
        rand(c, 361, 1.0),
        rand(c, 362, 1.0),
        rand(n * c * p, 363, 1.0),
    );
    let res = rand(n * c * p, 364, 1.0);
    let rec = Recording::start().unwrap();
    let mut ts = [
        Tensor::from_vec(x.clone(), [n, c, p, 1]).unwrap(),
        Tensor::from_vec(gm.clone(), [c]).unwrap(),
        Tensor::from_vec(bt.clone(), [c]).unwrap(),
        Tensor::from_vec(res.clone(), [n, c, p, 1]).unwrap(),
    ];
    for (i, t) in ts.iter_mut().enumerate() {
        rec.param(t, format!("{i}")).unwrap();
    }
    let (y, st) =
        batch_norm_train_fused(&ts[0], &ts[1], &ts[2], 1e-5, fused.then_some(&ts[3]), fused)
            .unwrap();
    let want = rec
        .backward(&y, &Tensor::from_vec(g.clone(), [n, c, p, 1]).unwrap())
        .unwrap();
    // The gradient that reaches BatchNorm: masked by the fused ReLU.
    let yv = y.as_f32().unwrap().to_vec();
    let g: Vec<f32> = g
        .iter()
        .zip(&yv)
        .map(|(&g, &y)| if !fused || y > 0.0 { g } else { 0.0 })
        .collect();
    let rb = Buf::from(s, &res);
    let (rp, relu): (F32p, i32) = if fused {
        (rb.p(), 1)
    } else {
        (std::ptr::null(), 0)
    };
    let (xb, gmb, btb, gb) = (
        Buf::from(s, &x),
        Buf::from(s, &gm),
        Buf::from(s, &bt),
        Buf::from(s, &g),
    );
    let (mean, var) = (Buf::<f64>::out(s, c), Buf::<f64>::out(s, c));
    let (nn, cc, pp, eps) = (n as i32, c as i32, p as i64, 1e-5f32);
    s.launch(
        "bn_stats_f64",
        sam_unet::ops::norm::cuda::bn_channel_config(c),
        |k: unsafe extern "C" fn(*mut f64, *mut f64, F32p, i32, i32, i64)| unsafe {
            k(mean.m(), var.m(), xb.p(), nn, cc, pp)
        },
    )
    .unwrap();
    let mv = mean.to_vec();
    for (a, b) in mv.iter().zip(&st.mean) {
        assert_eq!(a.to_bits(), b.to_bits(), "batch mean {a} vs {b}");
    }
    let yb = Buf::<f32>::out(s, n * c * p);
    s.launch(
        "bn_apply_f32",
        cfg1d(n * c * p),
        |k: unsafe extern "C" fn(
            F32m,
            F32p,
            F32p,
            F32p,
            *const f64,
            *const f64,
            F32p,
            i32,
            i32,
            i32,
            i64,
            f32,
        )| unsafe {
            k(
                yb.m(),
                xb.p(),
                gmb.p(),
                btb.p(),
                mean.p(),
                var.p(),
                rp,
                relu,
                nn,
                cc,
                pp,
                eps,
            )
        },
    )
    .unwrap();
    assert_close(
        "batch norm output",
        &yb.to_vec(),
        y.as_f32().unwrap(),
        1e-6,
        1e-6,
    );
    let (dg, db) = (Buf::<f64>::out(s, c), Buf::<f64>::out(s, c));
    s.launch(
        "bn_backward_sums",
        sam_unet::ops::norm::cuda::bn_channel_config(c),
        |k: unsafe extern "C" fn(
            *mut f64,
            *mut f64,
            F32p,
            F32p,
            *const f64,
            *const f64,
            i32,
            i32,
            i64,
            f32,
        )| unsafe {
            k(
                dg.m(),
                db.m(),
                xb.p(),
                gb.p(),
                mean.p(),
                var.p(),
                nn,
                cc,
                pp,
                eps,
            )
        },
    )
    .unwrap();
    let dx = Buf::<f32>::out(s, n * c * p);
    s.launch(
        "bn_backward_dx",
        cfg1d(n * c * p),
        |k: unsafe extern "C" fn(
            F32m,
            F32p,
            F32p,
            F32p,
            *const f64,
            *const f64,
            *const f64,
            *const f64,
            i32,
            i32,
            i64,
            f32,
            f64,
        )| unsafe {
            k(
                dx.m(),
                xb.p(),
                gb.p(),
                gmb.p(),
                mean.p(),
                var.p(),
                dg.p(),
                db.p(),
                nn,
                cc,
                pp,
                eps,
                (n * p) as f64,
            )
        },
    )
    .unwrap();
    let get = |k: &str| {
        want.iter()
            .find(|(n, _)| n == k)
            .unwrap()
            .1
            .as_f32()
            .unwrap()
            .to_vec()
    };
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<_>>();
    assert_close("batch norm dx", &dx.to_vec(), &get("0"), 1e-6, 1e-6);
    assert_close("batch norm dgamma", &f(dg.to_vec()), &get("1"), 1e-6, 1e-6);
    assert_close("batch norm dbeta", &f(db.to_vec()), &get("2"), 1e-6, 1e-6);
    if fused {
        // The residual's gradient is the masked one, exactly.
        assert_eq!(get("3"), g, "fused residual gradient");
    }
}

#[test]
fn mha_backward_matches_cpu() {
    simt::each_build(mha_backward_matches_cpu_on);
}

/// The decoder attention's backward kernels against the CPU tape: boxes'
/// queries on keys / values of one image (shared, summed over the boxes
/// afterwards as the op does) and the batched form; head dims 16 and 32.
fn mha_backward_matches_cpu_on(s: &'static Simt) {
    use sam_unet::Tensor;
    use sam_unet::autograd::Recording;
    for (n, lq, lk, i, heads, shared) in [
        (3usize, 3usize, 20usize, 64usize, 4usize, true),
        (2, 7, 3, 128, 4, false),
    ] {
        let nk = if shared { 1 } else { n };
        let (q, k, v, g) = (
            rand(n * lq * i, 370, 1.0),
            rand(nk * lk * i, 371, 1.0),
            rand(nk * lk * i, 372, 1.0),
            rand(n * lq * i, 373, 1.0),
        );
        let rec = Recording::start().unwrap();
        let mut ts = [
            Tensor::from_vec(q.clone(), [n, lq, i]).unwrap(),
            Tensor::from_vec(k.clone(), [nk, lk, i]).unwrap(),
            Tensor::from_vec(v.clone(), [nk, lk, i]).unwrap(),
        ];
        for (j, t) in ts.iter_mut().enumerate() {
            rec.param(t, format!("{j}")).unwrap();
        }
        let y = sam_unet::ops::attention::attention(&ts[0], &ts[1], &ts[2], heads).unwrap();
        let want = rec
            .backward(&y, &Tensor::from_vec(g.clone(), [n, lq, i]).unwrap())
            .unwrap();
        let (qb, kb, vb, gb) = (
            Buf::from(s, &q),
            Buf::from(s, &k),
            Buf::from(s, &v),
            Buf::from(s, &g),
        );
        let (dq, dk, dv) = (
            Buf::<f32>::out(s, n * lq * i),
            Buf::<f32>::out(s, n * lk * i),
            Buf::<f32>::out(s, n * lk * i),
        );
        let (lse, dd) = (
            Buf::<f32>::out(s, n * heads * lq),
            Buf::<f32>::out(s, n * heads * lq),
        );
        let a = [n, lq, lk, i, heads].map(|x| x as i32);
        let bk = (!shared) as i32;
        s.launch(
            "mha_backward_q",
            cfg1d(n * heads * lq),
            |f: unsafe extern "C" fn(
                F32m,
                F32m,
                F32m,
                F32p,
                F32p,
                F32p,
                F32p,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
            )| unsafe {
                f(
                    dq.m(),
                    lse.m(),
                    dd.m(),
                    qb.p(),
                    kb.p(),
                    vb.p(),
                    gb.p(),
                    a[0],
                    a[1],
                    a[2],
                    a[3],
                    a[4],
                    1,
                    bk,
                    bk,
                )
            },
        )
        .unwrap();
        s.launch(
            "mha_backward_kv",
            cfg1d(n * heads * lk),
            |f: unsafe extern "C" fn(
                F32m,
                F32m,
                F32p,
                F32p,
                F32p,
                F32p,
                F32p,
                F32p,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
                i32,
            )| unsafe {
                f(
                    dk.m(),
                    dv.m(),
                    lse.p(),
                    dd.p(),
                    qb.p(),
                    kb.p(),
                    vb.p(),
                    gb.p(),
                    a[0],
                    a[1],
                    a[2],
                    a[3],
                    a[4],
                    1,
                    bk,
                    bk,
                )
            },
        )
        .unwrap();
        let fold = |v: Vec<f32>| -> Vec<f32> {
            if !shared {
                return v;
            }
            let per = lk * i;
            (0..per)
                .map(|j| (0..n).map(|m| v[m * per + j]).sum())
                .collect()
        };
        let get = |k: &str| {
            want.iter()
                .find(|(n, _)| n == k)
                .unwrap()
                .1
                .as_f32()
                .unwrap()
                .to_vec()
        };
        let what = if shared { "shared keys" } else { "batched" };
        assert_close(
            &format!("mha dq ({what})"),
            &dq.to_vec(),
            &get("0"),
            1e-5,
            1e-5,
        );
        assert_close(
            &format!("mha dk ({what})"),
            &fold(dk.to_vec()),
            &get("1"),
            1e-5,
            1e-5,
        );
        assert_close(
            &format!("mha dv ({what})"),
            &fold(dv.to_vec()),
            &get("2"),
            1e-5,
            1e-5,
        );
    }
}

#[test]
fn rel_pos_attention_backward_matches_cpu() {
    simt::each_build(rel_pos_attention_backward_matches_cpu_on);
}

/// The ViT attention's input-gradient kernels against the CPU tape: a 5 x 5
/// grid with windows of 3 (padded to 6 x 6: padded keys are the biases) and
/// global attention, head dim 64, two images.
fn rel_pos_attention_backward_matches_cpu_on(s: &'static Simt) {
    use sam_unet::Tensor;
    use sam_unet::autograd::Recording;
    let (b, g, d, heads) = (2usize, 5usize, 64usize, 1usize);
    for window in [3usize, 0] {
        let sw = if window == 0 { g } else { window };
        let nwin = g.div_ceil(sw);
        let (qkv, bias, rh, rw, gr) = (
            rand(b * g * g * 3 * d, 380, 1.0),
            rand(3 * d, 381, 0.5),
            rand((2 * sw - 1) * 64, 382, 0.5),
            rand((2 * sw - 1) * 64, 383, 0.5),
            rand(b * g * g * d, 384, 1.0),
        );
        let rec = Recording::start().unwrap();
        let mut xt = Tensor::from_vec(qkv.clone(), [b, g, g, 3 * d]).unwrap();
        rec.param(&mut xt, "qkv").unwrap();
        let t = |v: &[f32], dims: Vec<usize>| Tensor::from_vec(v.to_vec(), dims).unwrap();
        let y = sam_unet::ops::attention::rel_pos_attention(
            &xt,
            &t(&bias, vec![3 * d]),
            &t(&rh, vec![2 * sw - 1, 64]),
            &t(&rw, vec![2 * sw - 1, 64]),
            heads,
            window,
        )
        .unwrap();
        let want = rec.backward(&y, &t(&gr, vec![b, g, g, d])).unwrap();
        let (qb, bb, hb, wb, gb) = (
            Buf::from(s, &qkv),
            Buf::from(s, &bias),
            Buf::from(s, &rh),
            Buf::from(s, &rw),
            Buf::from(s, &gr),
        );
        let rows = b * nwin * nwin * heads * sw * sw;
        let dq = Buf::<f32>::out(s, qkv.len());
        let (lse, dd) = (Buf::<f32>::out(s, rows), Buf::<f32>::out(s, rows));
        let a = [b, g, d, sw].map(|x| x as i32);
        s.launch(
            "rel_pos_backward_q",
            cfg1d(rows),
            |f: unsafe extern "C" fn(
                F32m,
                F32m,
                F32m,
                F32p,
                F32p,
                F32p,
                F32p,
                F32p,
                i32,
                i32,
                i32,
                i32,
            )| unsafe {
                f(
                    dq.m(),
                    lse.m(),
                    dd.m(),
                    qb.p(),
                    bb.p(),
                    hb.p(),
                    wb.p(),
                    gb.p(),
                    a[0],
                    a[1],
                    a[2],
                    a[3],
                )
            },
        )
        .unwrap();
        s.launch(
            "rel_pos_backward_kv",
            cfg1d(rows),
            |f: unsafe extern "C" fn(
                F32m,
                F32p,
                F32p,
                F32p,
                F32p,
                F32p,
                F32p,
                F32p,
                i32,
                i32,
                i32,
                i32,
            )| unsafe {
                f(
                    dq.m(),
                    lse.p(),
                    dd.p(),
                    qb.p(),
                    bb.p(),
                    hb.p(),
                    wb.p(),
                    gb.p(),
                    a[0],
                    a[1],
                    a[2],
                    a[3],
                )
            },
        )
        .unwrap();
        let rel = kernel_check::rel_l2(&dq.to_vec(), want[0].1.as_f32().unwrap());
        assert!(
            rel <= 1e-5,
            "rel_pos_attention backward window {window}: relative L2 {rel}"
        );
    }
}

#[test]
fn emulated_driver_checks_stream_order() {
    // The emulated device runs each call at once, so an unordered pair of
    // streams never computes a wrong value here: the driver's stream-order
    // check fails the call instead, as a GPU could have computed garbage.
    // Events, host synchronisation, the legacy default stream, synchronous
    // calls and stream-ordered free, through the driver API itself.
    use std::ffi::c_void;
    let Some(s) = simt::simt() else { return };
    type P = *mut c_void;
    type StreamCreate = unsafe extern "C" fn(*mut P, u32) -> i32;
    type EventCreate = unsafe extern "C" fn(*mut P, u32) -> i32;
    type EventRecord = unsafe extern "C" fn(P, P) -> i32;
    type WaitEvent = unsafe extern "C" fn(P, P, u32) -> i32;
    type Sync = unsafe extern "C" fn(P) -> i32;
    type AllocAsync = unsafe extern "C" fn(*mut u64, usize, P) -> i32;
    type FreeAsync = unsafe extern "C" fn(u64, P) -> i32;
    type SetAsync = unsafe extern "C" fn(u64, u32, usize, P) -> i32;
    type CopyAsync = unsafe extern "C" fn(u64, u64, usize, P) -> i32;
    type DtoH = unsafe extern "C" fn(*mut c_void, u64, usize) -> i32;
    type Races = unsafe extern "C" fn() -> u64;
    type SetSync = unsafe extern "C" fn(u64, u32, usize) -> i32;
    type CtxSync = unsafe extern "C" fn() -> i32;
    const RACE: i32 = 719; // CUDA_ERROR_LAUNCH_FAILED, the message on stderr
    // SAFETY: the signatures are those of cuda/host/fake_driver.cpp (the
    // driver API's); every device range below lies inside its allocation
    // and the host buffer holds the bytes copied into it.
    unsafe {
        let stream_create: StreamCreate = s.sym("cuStreamCreate");
        let event_create: EventCreate = s.sym("cuEventCreate");
        let record: EventRecord = s.sym("cuEventRecord");
        let wait: WaitEvent = s.sym("cuStreamWaitEvent");
        let stream_sync: Sync = s.sym("cuStreamSynchronize");
        let alloc: AllocAsync = s.sym("cuMemAllocAsync");
        let free: FreeAsync = s.sym("cuMemFreeAsync");
        let set: SetAsync = s.sym("cuMemsetD32Async");
        let copy: CopyAsync = s.sym("cuMemcpyDtoDAsync_v2");
        let dtoh: DtoH = s.sym("cuMemcpyDtoH_v2");
        let races: Races = s.sym("fake_driver_stream_races");
        let stream = |flags: u32| {
            let mut p: P = std::ptr::null_mut();
            assert_eq!(stream_create(&mut p, flags), 0);
            p
        };
        let event = || {
            let mut e: P = std::ptr::null_mut();
            assert_eq!(event_create(&mut e, 0), 0);
            e
        };
        // Non-blocking streams (CU_STREAM_NON_BLOCKING, as cudarc makes them).
        let (a, b) = (stream(1), stream(1));
        let n = 256usize;
        let buf = |st: P| {
            let mut p = 0u64;
            assert_eq!(alloc(&mut p, n * 4, st), 0);
            p
        };
        let before = races();
        // A writes x; B reads it with nothing between: refused.
        let (x, y) = (buf(a), buf(b));
        assert_eq!(set(x, 7, n, a), 0);
        assert_eq!(
            copy(y, x, n * 4, b),
            RACE,
            "unordered read on another stream"
        );
        // An event recorded on A after the write, waited for by B: fine.
        let e = event();
        assert_eq!(record(e, a), 0);
        assert_eq!(wait(b, e, 0), 0);
        assert_eq!(copy(y, x, n * 4, b), 0);
        // A writes x again while B's read is not ordered before it: refused
        // (a write after a read); after A waits for B, fine.
        assert_eq!(set(x, 8, n, a), RACE, "unordered write after a read");
        assert_eq!(record(e, b), 0);
        assert_eq!(wait(a, e, 0), 0);
        assert_eq!(set(x, 9, n, a), 0);
        // Disjoint ranges of one allocation never conflict.
        assert_eq!(record(e, a), 0);
        assert_eq!(wait(b, e, 0), 0);
        assert_eq!(set(x, 1, n / 2, a), 0);
        assert_eq!(set(x + (n as u64 / 2) * 4, 2, n / 2, b), 0);
        // The host waiting for a stream orders it before everything after.
        assert_eq!(stream_sync(a), 0);
        assert_eq!(stream_sync(b), 0);
        assert_eq!(set(x, 3, n, b), 0);
        // A free is a write of the whole allocation on its stream: B just
        // wrote x, A frees it unordered: refused; y after a host sync: fine.
        assert_eq!(
            free(x, a),
            RACE,
            "free while another stream may still use it"
        );
        assert_eq!(stream_sync(b), 0);
        assert_eq!(free(y, a), 0);
        // The legacy default stream (a synchronous copy) waits for blocking
        // streams, not for non-blocking ones.
        let c = stream(0);
        let (z, w) = (buf(c), buf(a));
        assert_eq!(set(z, 4, n, c), 0);
        assert_eq!(set(w, 5, n, a), 0);
        let mut host = vec![0u32; n];
        assert_eq!(dtoh(host.as_mut_ptr().cast(), z, n * 4), 0);
        assert_eq!(host[0], 4);
        assert_eq!(
            dtoh(host.as_mut_ptr().cast(), w, n * 4),
            RACE,
            "the default stream does not wait for a non-blocking stream"
        );
        // An event recorded on the legacy default stream follows the blocking
        // streams' work: a non-blocking stream waiting for it may read z.
        assert_eq!(set(z, 6, n, c), 0);
        let null: P = std::ptr::null_mut();
        assert_eq!(record(e, null), 0);
        assert_eq!(wait(b, e, 0), 0);
        let v = buf(b);
        assert_eq!(copy(v, z, n * 4, b), 0);
        // A synchronous memset does not make the host wait: a non-blocking
        // stream writing the same memory right after it is unordered.
        let set_sync: SetSync = s.sym("cuMemsetD32_v2");
        assert_eq!(stream_sync(a), 0);
        assert_eq!(set_sync(w, 0, n), 0);
        assert_eq!(set(w, 1, n, a), RACE, "a synchronous memset orders nothing");
        assert_eq!(races() - before, 5);
        let sync_all: CtxSync = s.sym("cuCtxSynchronize");
        assert_eq!(sync_all(), 0);
        assert_eq!(free(z, c), 0);
        assert_eq!(free(w, a), 0);
        assert_eq!(free(v, b), 0);
    }
}
