//! The CUDA twin of `linear_fused`: one cuBLAS GEMM (the residual, when there
//! is one, seeds the accumulator) and one epilogue kernel (bias, activation).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::cuda::{CudaDevice, cfg1d, driver_err, launch_err};
use crate::error::Result;
use crate::ops::activation::{self, Act};
use crate::tensor::{DType, Tensor};

/// y [m, n] = act(x [m, k] W^T + b + residual), W [n, k]; all compact CUDA
/// tensors on `dev`. W in f32 runs a true-f32 GEMM; W in bf16 takes x in
/// bf16 too (converted here) with f32 accumulation and an f32 output.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear(
    dev: &Arc<CudaDevice>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Act,
    (m, n, k): (usize, usize, usize),
    out_dims: &[usize],
) -> Result<Tensor> {
    const OP: &str = "linear (cuda)";
    let stream = dev.stream();
    // y [m, n]: the residual's values (the GEMM adds onto them), or garbage
    // that the GEMM overwrites (beta = 0 never reads it).
    let mut y = dev.alloc(m * n)?;
    if let Some(r) = residual {
        let (_, rs) = r.cuda_whole_f32(OP)?;
        stream
            .memcpy_dtod(rs, &mut y)
            .map_err(driver_err("linear residual seed"))?;
    }
    let accumulate = residual.is_some();
    match w.dtype() {
        DType::BF16 => {
            let xb = x.to_dtype(DType::BF16)?;
            let (xs, ws) = (xb.cuda_whole_bf16(OP)?, w.cuda_whole_bf16(OP)?);
            dev.with_blas(|blas| blas.linear_bf16(stream, xs, ws, &mut y, m, n, k, accumulate))?;
        }
        _ => {
            let (xs, ws) = (x.cuda_whole_f32(OP)?.1, w.cuda_whole_f32(OP)?.1);
            dev.with_blas(|blas| blas.linear_f32(stream, xs, ws, &mut y, m, n, k, accumulate))?;
        }
    }
    if b.is_some() || act != Act::None {
        let bias = b
            .map(|b| b.cuda_whole_f32(OP).map(|(_, s)| s))
            .transpose()?;
        activation::cuda::bias_act(dev, &mut y, bias, n, act)?;
    }
    Tensor::from_cuda_f32(dev, y, out_dims)
}

/// low [n, p] = sum_c h [n, c] (f [n, c, p] + msf [c, p]): the mask decoder's
/// hypernetwork product (cuda/decoder.cu's mask_dot_f32, one thread per (n, p)).
pub fn mask_dot(
    dev: &CudaDevice,
    h: &CudaSlice<f32>,
    f: &CudaSlice<f32>,
    msf: &CudaSlice<f32>,
    (n, c, p): (usize, usize, usize),
) -> Result<CudaSlice<f32>> {
    if h.len() != n * c || f.len() != n * c * p || msf.len() != c * p {
        return Err(crate::Error::shape(
            "mask_dot (cuda)",
            format!(
                "h {}, f {}, msf {} for n {n} c {c} p {p}",
                h.len(),
                f.len(),
                msf.len()
            ),
        ));
    }
    let mut low = dev.alloc(n * p)?;
    let func = dev.function("decoder", "mask_dot_f32")?;
    let (nn, cc, pp) = (n as i32, c as i32, p as i64);
    let mut l = dev.stream().launch_builder(&func);
    l.arg(&mut low)
        .arg(h)
        .arg(f)
        .arg(msf)
        .arg(&nn)
        .arg(&cc)
        .arg(&pp);
    // SAFETY: h [n, c], f [n, c, p], msf [c, p], low [n, p] (checked above); types match.
    unsafe { l.launch(cfg1d(n * p)) }.map_err(launch_err("mask_dot launch"))?;
    Ok(low)
}

/// linear's backward on the device: dX = G W and dW = G^T X as cuBLAS GEMMs
/// (f32), db = the row sums of G (ops::reduce, deterministic).
#[allow(clippy::type_complexity)]
pub(crate) fn linear_backward(
    g: &Tensor,
    x: Option<&Tensor>,
    w: Option<&Tensor>,
    want_b: bool,
    (m, n, k): (usize, usize, usize),
    (x_dims, w_dims): (&[usize], &[usize]),
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    const OP: &str = "linear backward (cuda)";
    let gc = crate::ops::cuda_input(OP, g)?;
    let (dev, gs) = gc.cuda_whole_f32(OP)?;
    let stream = dev.stream();
    let dx = match w {
        Some(w) => {
            let wc = crate::ops::cuda_input(OP, w)?;
            let ws = wc.cuda_whole_f32(OP)?.1;
            let mut dx = dev.alloc(m * k)?;
            // dX [m, k] = G [m, n] W [n, k]
            dev.with_blas(|b| {
                b.gemm_f32(
                    stream, false, false, m, k, n, gs, n, ws, k, &mut dx, k, false,
                )
            })?;
            Some(Tensor::from_cuda_f32(dev, dx, x_dims)?)
        }
        None => None,
    };
    let dw = match x {
        Some(x) => {
            let xc = crate::ops::cuda_input(OP, x)?;
            let xs = xc.cuda_whole_f32(OP)?.1;
            let mut dw = dev.alloc(n * k)?;
            // dW [n, k] = G^T (G stored [m, n]) X [m, k]
            dev.with_blas(|b| {
                b.gemm_f32(
                    stream, true, false, n, k, m, gs, n, xs, k, &mut dw, k, false,
                )
            })?;
            Some(Tensor::from_cuda_f32(dev, dw, w_dims)?)
        }
        None => None,
    };
    let db = if want_b {
        Some(Tensor::from_cuda_f32(
            dev,
            crate::ops::reduce::cuda::sum_rows(dev, gs, m, n)?,
            [n],
        )?)
    } else {
        None
    };
    Ok((dx, dw, db))
}

/// mask_dot's backward on the device (cuda/decoder.cu): (dh, df, dm), each
/// only when asked for. g [n, p], h [n, c], f [n, c, p], msf [c, p].
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub(crate) fn mask_dot_backward(
    dev: &CudaDevice,
    g: &CudaSlice<f32>,
    h: Option<&CudaSlice<f32>>,
    fm: Option<(&CudaSlice<f32>, &CudaSlice<f32>)>,
    (want_f, want_m): (bool, bool),
    (n, c, p): (usize, usize, usize),
) -> Result<(
    Option<CudaSlice<f32>>,
    Option<CudaSlice<f32>>,
    Option<CudaSlice<f32>>,
)> {
    let (nn, cc, pp) = (n as i32, c as i32, p as i64);
    if g.len() != n * p
        || h.is_some_and(|h| h.len() != n * c)
        || fm.is_some_and(|(f, m)| f.len() != n * c * p || m.len() != c * p)
    {
        return Err(crate::Error::shape(
            "mask_dot backward (cuda)",
            format!("gradient of {} values for {n} x {p}", g.len()),
        ));
    }
    let dh = match fm {
        Some((f, m)) => {
            let mut dh = dev.alloc(n * c)?;
            let k = dev.function("decoder", "mask_dot_backward_h")?;
            let mut l = dev.stream().launch_builder(&k);
            l.arg(&mut dh)
                .arg(g)
                .arg(f)
                .arg(m)
                .arg(&nn)
                .arg(&cc)
                .arg(&pp);
            // SAFETY: sizes checked above; types match (float*, const float* x3, int, int, long long).
            unsafe { l.launch(cfg1d(n * c)) }.map_err(launch_err("mask_dot_backward_h launch"))?;
            Some(dh)
        }
        None => None,
    };
    let (mut df, mut dm) = (None, None);
    if let Some(h) = h {
        if want_f {
            let mut d = dev.alloc(n * c * p)?;
            let k = dev.function("decoder", "mask_dot_backward_f")?;
            let mut l = dev.stream().launch_builder(&k);
            l.arg(&mut d).arg(g).arg(h).arg(&nn).arg(&cc).arg(&pp);
            // SAFETY: d holds n c p floats, g n p, h n c; types match.
            unsafe { l.launch(cfg1d(n * c * p)) }
                .map_err(launch_err("mask_dot_backward_f launch"))?;
            df = Some(d);
        }
        if want_m {
            let mut d = dev.alloc(c * p)?;
            let k = dev.function("decoder", "mask_dot_backward_m")?;
            let mut l = dev.stream().launch_builder(&k);
            l.arg(&mut d).arg(g).arg(h).arg(&nn).arg(&cc).arg(&pp);
            // SAFETY: d holds c p floats, g n p, h n c; types match.
            unsafe { l.launch(cfg1d(c * p)) }.map_err(launch_err("mask_dot_backward_m launch"))?;
            dm = Some(d);
        }
    }
    Ok((dh, df, dm))
}
