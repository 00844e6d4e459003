//! CUDA twins of the convolutions (cuda/conv.cu + cuBLAS GEMMs).

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::cuda::blas::Blas;
use crate::cuda::{CudaDevice, GpuTensor, act_code, cfg1d, driver_err};
use crate::error::{Error, Result};
use crate::ops::activation::Act;

/// act(conv(x) + bias + residual). x [N, C, H, W], w [O, C * kh * kw] -> [N, O, Ho, Wo].
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    dev: &CudaDevice,
    blas: &Blas,
    x: &GpuTensor,
    w: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    residual: Option<&GpuTensor>,
    act: Act,
) -> Result<GpuTensor> {
    const OP: &str = "conv2d (cuda)";
    let [n, c, h, wd]: [usize; 4] = x
        .dims
        .as_slice()
        .try_into()
        .map_err(|_| Error::shape(OP, format!("input {:?}", x.dims)))?;
    let k = c * kh * kw;
    if w.len() != o * k || stride == 0 || h + 2 * pad < kh || wd + 2 * pad < kw {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?}, weight of {} values for {o} x {c} x {kh} x {kw}",
                x.dims,
                w.len()
            ),
        ));
    }
    let (ho, wo) = (
        (h + 2 * pad - kh) / stride + 1,
        (wd + 2 * pad - kw) / stride + 1,
    );
    let p = ho * wo;
    if let Some(r) = residual
        && r.dims != [n, o, ho, wo]
    {
        return Err(Error::shape(
            OP,
            format!("residual {:?} for output {:?}", r.dims, [n, o, ho, wo]),
        ));
    }
    let mut y = dev.alloc(n * o * p)?;
    let direct = kh == 1 && kw == 1 && stride == 1 && pad == 0;
    let mut col = if direct {
        None
    } else {
        Some(dev.alloc(k * p)?)
    };
    let im2col = dev.function("conv", "im2col_f32")?;
    for i in 0..n {
        let xi = x.data.slice(i * c * h * wd..(i + 1) * c * h * wd);
        let mut yi = y.slice_mut(i * o * p..(i + 1) * o * p);
        match col.as_mut() {
            None => blas.gemm_f32(
                dev.stream(),
                false,
                false,
                o,
                p,
                k,
                w,
                k,
                &xi,
                p,
                &mut yi,
                p,
                false,
            )?,
            Some(col) => {
                let (ci, hi, wi, khi, kwi, si, pi, hoi, woi) = (
                    c as i32,
                    h as i32,
                    wd as i32,
                    kh as i32,
                    kw as i32,
                    stride as i32,
                    pad as i32,
                    ho as i32,
                    wo as i32,
                );
                let mut l = dev.stream().launch_builder(&im2col);
                l.arg(&mut *col)
                    .arg(&xi)
                    .arg(&ci)
                    .arg(&hi)
                    .arg(&wi)
                    .arg(&khi)
                    .arg(&kwi)
                    .arg(&si)
                    .arg(&pi)
                    .arg(&hoi)
                    .arg(&woi);
                // SAFETY: col holds k * p floats and the image c * h * w; types match.
                unsafe { l.launch(cfg1d(k * p)) }.map_err(driver_err("im2col launch"))?;
                blas.gemm_f32(
                    dev.stream(),
                    false,
                    false,
                    o,
                    p,
                    k,
                    w,
                    k,
                    &*col,
                    p,
                    &mut yi,
                    p,
                    false,
                )?;
            }
        }
    }
    if bias.is_some() || residual.is_some() || act != Act::None {
        let f = dev.function("conv", "conv_epilogue_f32")?;
        let (nn, oo, qq, a) = (n as i32, o as i32, p as i64, act_code(act));
        let null: u64 = 0;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&mut y);
        match bias {
            Some(b) => l.arg(b),
            None => l.arg(&null),
        };
        match residual {
            Some(r) => l.arg(&r.data),
            None => l.arg(&null),
        };
        l.arg(&nn).arg(&oo).arg(&qq).arg(&a);
        // SAFETY: y and the residual hold n * o * p floats, bias o floats (or null).
        unsafe { l.launch(cfg1d(n * o * p)) }.map_err(driver_err("conv epilogue launch"))?;
    }
    Ok(GpuTensor {
        data: y,
        dims: vec![n, o, ho, wo],
    })
}

/// ConvTranspose2d with kernel = stride = k: x [N, C, H, W], w [C, O k k] -> [N, O, kH, kW].
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d(
    dev: &CudaDevice,
    blas: &Blas,
    x: &GpuTensor,
    w: &CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    o: usize,
    k: usize,
    act: Act,
) -> Result<GpuTensor> {
    const OP: &str = "conv_transpose2d (cuda)";
    let [n, c, h, wd]: [usize; 4] = x
        .dims
        .as_slice()
        .try_into()
        .map_err(|_| Error::shape(OP, format!("input {:?}", x.dims)))?;
    let rows = o * k * k;
    if w.len() != c * rows {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?}, weight of {} values for {c} x {o} x {k} x {k}",
                x.dims,
                w.len()
            ),
        ));
    }
    let hw = h * wd;
    let mut y = dev.alloc(n * o * hw * k * k)?;
    let mut tmp = dev.alloc(rows * hw)?;
    let f = dev.function("conv", "convt_scatter_f32")?;
    let null: u64 = 0;
    for i in 0..n {
        let xi = x.data.slice(i * c * hw..(i + 1) * c * hw);
        // tmp [O k k, HW] = W^T [O k k, C] X [C, HW]
        blas.gemm_f32(
            dev.stream(),
            true,
            false,
            rows,
            hw,
            c,
            w,
            rows,
            &xi,
            hw,
            &mut tmp,
            hw,
            false,
        )?;
        let mut yi = y.slice_mut(i * o * hw * k * k..(i + 1) * o * hw * k * k);
        let (oo, hh, ww, kk, a) = (o as i32, h as i32, wd as i32, k as i32, act_code(act));
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&mut yi).arg(&tmp);
        match bias {
            Some(b) => l.arg(b),
            None => l.arg(&null),
        };
        l.arg(&oo).arg(&hh).arg(&ww).arg(&kk).arg(&a);
        // SAFETY: tmp holds rows * hw floats, the output image o * hw * k * k, bias o.
        unsafe { l.launch(cfg1d(o * hw * k * k)) }.map_err(driver_err("convT scatter launch"))?;
    }
    Ok(GpuTensor {
        data: y,
        dims: vec![n, o, h * k, wd * k],
    })
}

/// Max pooling with -inf padding: x [N, C, H, W] -> [N, C, Ho, Wo].
pub fn max_pool2d(
    dev: &CudaDevice,
    x: &GpuTensor,
    kernel: usize,
    stride: usize,
    pad: usize,
) -> Result<GpuTensor> {
    let [n, c, h, w]: [usize; 4] = x
        .dims
        .as_slice()
        .try_into()
        .map_err(|_| Error::shape("max_pool2d (cuda)", format!("input {:?}", x.dims)))?;
    if stride == 0 || h + 2 * pad < kernel || w + 2 * pad < kernel {
        return Err(Error::shape(
            "max_pool2d (cuda)",
            format!("input {:?}, kernel {kernel}", x.dims),
        ));
    }
    let (ho, wo) = (
        (h + 2 * pad - kernel) / stride + 1,
        (w + 2 * pad - kernel) / stride + 1,
    );
    let mut y = dev.alloc(n * c * ho * wo)?;
    let f = dev.function("conv", "max_pool2d_f32")?;
    let (pl, hh, ww, hoo, woo, kk, ss, pp) = (
        (n * c) as i64,
        h as i32,
        w as i32,
        ho as i32,
        wo as i32,
        kernel as i32,
        stride as i32,
        pad as i32,
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut y)
        .arg(&x.data)
        .arg(&pl)
        .arg(&hh)
        .arg(&ww)
        .arg(&hoo)
        .arg(&woo)
        .arg(&kk)
        .arg(&ss)
        .arg(&pp);
    // SAFETY: x holds planes * h * w floats, y planes * ho * wo; types match.
    unsafe { l.launch(cfg1d(n * c * ho * wo)) }.map_err(driver_err("max_pool2d launch"))?;
    Ok(GpuTensor {
        data: y,
        dims: vec![n, c, ho, wo],
    })
}
