//! Convolutions on NCHW maps: Conv2d (im2col + GEMM; a 1x1 stride-1 conv is a
//! plain GEMM), ConvTranspose2d with kernel == stride (the 2x2 / stride 2
//! upsamplers of SAM-UNet: non-overlapping, so one GEMM and a scatter), and max
//! pooling. Bias, a residual add and an activation are fused in the epilogue.

mod cpu;
pub mod cuda;

use std::sync::Arc;

use crate::autograd;
use crate::cpu::bf16_gemm::PackedA;
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};
use crate::ops::activation::Act;
use crate::ops::{cpu_f32, cuda_input, same_device};
use crate::tensor::{DType, Device, Tensor};

/// A weight as the CUDA launchers take it: its dtype chooses the GEMM's
/// (bf16 weights run the GEMM on bf16 inputs with f32 accumulation).
fn cuda_weight(op: &'static str, w: &Tensor) -> Result<Tensor> {
    if w.dtype() == DType::BF16 {
        w.compact()
    } else {
        cuda_input(op, w)
    }
}

fn weight_ref<'a>(op: &'static str, w: &'a Tensor) -> Result<cuda::ConvWeight<'a>> {
    Ok(if w.dtype() == DType::BF16 {
        cuda::ConvWeight::BF16(w.cuda_whole_bf16(op)?)
    } else {
        cuda::ConvWeight::F32(w.cuda_whole_f32(op)?.1)
    })
}

fn device_of(t: &Tensor) -> Arc<CudaDevice> {
    t.cuda_device().expect("a CUDA tensor").clone()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dArgs {
    pub stride: usize,
    pub padding: usize,
}

/// x [B, C, H, W], w [O, C, kh, kw], b [O], residual [B, O, Ho, Wo] -> [B, O, Ho, Wo]
/// with Ho = (H + 2p - kh) / s + 1.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    args: Conv2dArgs,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    conv2d_with(x, w, None, b, args, residual, act)
}

/// `conv2d`, with `packed` (w as A [O, C kh kw], `nn::Conv2d::pack_cpu_bf16`)
/// running a CPU input through the bf16 GEMM: im2col of each column tile
/// straight into bf16 k-pairs, products summed in f32, the f32 epilogue.
/// Inference only (a tracked input is an error).
pub fn conv2d_with(
    x: &Tensor,
    w: &Tensor,
    packed: Option<&PackedA>,
    b: Option<&Tensor>,
    args: Conv2dArgs,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    let _p = crate::profile::scope(OP);
    let [n, c, h, wd] = x.dims_n::<4>(OP, "input")?;
    let [o, wc, kh, kw] = w.dims_n::<4>(OP, "weight")?;
    if wc != c {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?} has {c} channels, weight {:?} expects {wc}",
                x.dims(),
                w.dims()
            ),
        ));
    }
    if args.stride == 0 || kh == 0 || kw == 0 {
        return Err(Error::shape(
            OP,
            format!("stride {} with kernel {kh}x{kw}", args.stride),
        ));
    }
    if h + 2 * args.padding < kh || wd + 2 * args.padding < kw {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?} smaller than kernel {:?} with padding {}",
                x.dims(),
                w.dims(),
                args.padding
            ),
        ));
    }
    let ho = (h + 2 * args.padding - kh) / args.stride + 1;
    let wo = (wd + 2 * args.padding - kw) / args.stride + 1;
    if let Some(b) = b {
        b.expect_dims(OP, "bias", &[o])?;
    }
    let out_dims = [n, o, ho, wo];
    if let Some(r) = residual {
        r.expect_dims(OP, "residual", &out_dims)?;
    }
    let mut all = vec![x, w];
    all.extend(b);
    all.extend(residual);
    let tracked = autograd::is_tracked(&all);
    if tracked && act != Act::None {
        // Recorded: the activation is its own node (it needs the pre-activation).
        let z = conv2d(x, w, b, args, residual, Act::None)?;
        return crate::ops::activation::act(&z, act);
    }
    let geo = cpu::ConvGeometry {
        n,
        c,
        h,
        w: wd,
        o,
        kh,
        kw,
        stride: args.stride,
        pad: args.padding,
        ho,
        wo,
    };
    if let Some(p) = packed.filter(|_| x.device() == Device::Cpu) {
        autograd::no_backward("conv2d (cpu bf16)", &all)?;
        if (p.m, p.k) != (o, c * kh * kw) {
            return Err(Error::shape(
                OP,
                format!("packed weight [{}, {}] for weight {:?}", p.m, p.k, w.dims()),
            ));
        }
        same_device(OP, &all)?;
        let out = cpu::conv2d_bf16(
            &geo,
            cpu_f32(OP, x)?,
            p,
            b.map(|b| cpu_f32(OP, b)).transpose()?,
            residual.map(|r| cpu_f32(OP, r)).transpose()?,
            act,
        )?;
        return Ok(Tensor::from_f32(out, &out_dims));
    }
    let mut y = conv2d_forward(x, w, b, &geo, residual, act, &all)?;
    if tracked {
        let (gx, gw) = (autograd::requires_grad(x), autograd::requires_grad(w));
        let gb = b.is_some_and(autograd::requires_grad);
        let gr = residual.is_some_and(autograd::requires_grad);
        let xs = gw.then(|| x.clone());
        let ws = gx.then(|| w.clone());
        let saved = xs.as_ref().map_or(0, autograd::bytes);
        let (has_b, has_r) = (b.is_some(), residual.is_some());
        let (xd, wdims) = (x.dims().to_vec(), w.dims().to_vec());
        autograd::record(
            OP,
            &all,
            &mut y,
            saved,
            Box::new(move |g| {
                const OP: &str = "conv2d backward";
                let mut ins = vec![g];
                ins.extend(xs.as_ref());
                ins.extend(ws.as_ref());
                if let Device::Cuda(_) = same_device(OP, &ins)? {
                    let mut v = cuda_conv_grads(
                        OP,
                        g,
                        (xs.as_ref(), ws.as_ref()),
                        (&xd, &wdims),
                        |dev, blas, gsl, xv, wv| {
                            cuda::conv2d_backward(
                                dev,
                                blas,
                                gsl,
                                xv,
                                wv,
                                [geo.n, geo.c, geo.h, geo.w],
                                [geo.o, geo.kh, geo.kw, geo.stride, geo.pad, geo.ho, geo.wo],
                            )
                        },
                    )?;
                    if has_b {
                        v.push(gb.then(|| cuda_bias_grad(g, geo.o)).transpose()?);
                    }
                    if has_r {
                        v.push(gr.then(|| g.clone()));
                    }
                    return Ok(v);
                }
                let (dx, dw, db) = cpu::conv2d_backward(
                    &geo,
                    cpu_f32(OP, g)?,
                    xs.as_ref().map(|x| cpu_f32(OP, x)).transpose()?,
                    ws.as_ref().map(|w| cpu_f32(OP, w)).transpose()?,
                    gb,
                );
                let mut v = vec![
                    dx.map(|d| Tensor::from_f32(d, &xd)),
                    dw.map(|d| Tensor::from_f32(d, &wdims)),
                ];
                if has_b {
                    v.push(db.map(|d| Tensor::from_f32(d, &[geo.o])));
                }
                if has_r {
                    v.push(gr.then(|| g.clone()));
                }
                Ok(v)
            }),
        );
    }
    Ok(y)
}

fn conv2d_forward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    geo: &cpu::ConvGeometry,
    residual: Option<&Tensor>,
    act: Act,
    all: &[&Tensor],
) -> Result<Tensor> {
    const OP: &str = "conv2d";
    let (o, kh, kw) = (geo.o, geo.kh, geo.kw);
    let args = Conv2dArgs {
        stride: geo.stride,
        padding: geo.pad,
    };
    let out_dims = [geo.n, o, geo.ho, geo.wo];
    if let Device::Cuda(_) = same_device(OP, all)? {
        let x = cuda_input(OP, x)?;
        let w = cuda_weight(OP, w)?;
        let b = b.map(|b| cuda_input(OP, b)).transpose()?;
        let r = residual.map(|r| cuda_input(OP, r)).transpose()?;
        let dev = device_of(&x);
        let bs = b
            .as_ref()
            .map(|b| b.cuda_whole_f32(OP).map(|(_, s)| s))
            .transpose()?;
        let rr = r.as_ref().map(|r| r.gpu_ref(OP)).transpose()?;
        let y = dev.with_blas(|blas| {
            cuda::conv2d(
                &dev,
                blas,
                &x.gpu_ref(OP)?,
                weight_ref(OP, &w)?,
                bs,
                o,
                kh,
                kw,
                args.stride,
                args.padding,
                rr.as_ref().map(|r| r as &dyn crate::cuda::GpuIn),
                act,
            )
        })?;
        return Tensor::from_gpu(&dev, y);
    }
    let out = cpu::conv2d(
        geo,
        cpu_f32(OP, x)?,
        cpu_f32(OP, w)?,
        b.map(|b| cpu_f32(OP, b)).transpose()?,
        residual.map(|r| cpu_f32(OP, r)).transpose()?,
        act,
    );
    Ok(Tensor::from_f32(out, &out_dims))
}

/// ConvTranspose2d with kernel k == stride k and no padding.
/// x [B, C, H, W], w [C, O, k, k] (PyTorch's layout), b [O] -> [B, O, kH, kW].
pub fn conv_transpose2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Act) -> Result<Tensor> {
    conv_transpose2d_with(x, w, None, b, act)
}

/// `conv_transpose2d`, with `packed` (W^T as A [O k k, C],
/// `nn::ConvTranspose2d::pack_cpu_bf16`) running a CPU input through the
/// bf16 GEMM. Inference only (a tracked input is an error).
pub fn conv_transpose2d_with(
    x: &Tensor,
    w: &Tensor,
    packed: Option<&PackedA>,
    b: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    const OP: &str = "conv_transpose2d";
    let _p = crate::profile::scope(OP);
    let [n, c, h, wd] = x.dims_n::<4>(OP, "input")?;
    let [wc, o, kh, kw] = w.dims_n::<4>(OP, "weight")?;
    if wc != c {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?} has {c} channels, weight {:?} expects {wc}",
                x.dims(),
                w.dims()
            ),
        ));
    }
    if kh != kw || kh == 0 {
        return Err(Error::shape(
            OP,
            format!(
                "only square kernels with stride = kernel are supported, weight {:?}",
                w.dims()
            ),
        ));
    }
    if let Some(b) = b {
        b.expect_dims(OP, "bias", &[o])?;
    }
    let mut all = vec![x, w];
    all.extend(b);
    let tracked = autograd::is_tracked(&all);
    if tracked && act != Act::None {
        let z = conv_transpose2d(x, w, b, Act::None)?;
        return crate::ops::activation::act(&z, act);
    }
    if let Some(p) = packed.filter(|_| x.device() == Device::Cpu) {
        autograd::no_backward("conv_transpose2d (cpu bf16)", &all)?;
        if (p.m, p.k) != (o * kh * kh, c) {
            return Err(Error::shape(
                OP,
                format!("packed weight [{}, {}] for weight {:?}", p.m, p.k, w.dims()),
            ));
        }
        same_device(OP, &all)?;
        let out = cpu::conv_transpose2d_bf16(
            cpu_f32(OP, x)?,
            p,
            b.map(|b| cpu_f32(OP, b)).transpose()?,
            act,
            (n, c, h, wd),
            o,
            kh,
        )?;
        return Ok(Tensor::from_f32(out, &[n, o, h * kh, wd * kh]));
    }
    let mut y = conv_transpose2d_forward(x, w, b, act, &all, (n, c, h, wd), o, kh)?;
    if tracked {
        let (gx, gw) = (autograd::requires_grad(x), autograd::requires_grad(w));
        let gb = b.is_some_and(autograd::requires_grad);
        let xs = gw.then(|| x.clone());
        let ws = gx.then(|| w.clone());
        let saved = xs.as_ref().map_or(0, autograd::bytes);
        let has_b = b.is_some();
        let (xd, wdims) = (x.dims().to_vec(), w.dims().to_vec());
        autograd::record(
            OP,
            &all,
            &mut y,
            saved,
            Box::new(move |g| {
                const OP: &str = "conv_transpose2d backward";
                let mut ins = vec![g];
                ins.extend(xs.as_ref());
                ins.extend(ws.as_ref());
                if let Device::Cuda(_) = same_device(OP, &ins)? {
                    let mut v = cuda_conv_grads(
                        OP,
                        g,
                        (xs.as_ref(), ws.as_ref()),
                        (&xd, &wdims),
                        |dev, blas, gsl, xv, wv| {
                            cuda::conv_transpose2d_backward(
                                dev,
                                blas,
                                gsl,
                                xv,
                                wv,
                                (n, c, h, wd),
                                o,
                                kh,
                            )
                        },
                    )?;
                    if has_b {
                        v.push(gb.then(|| cuda_bias_grad(g, o)).transpose()?);
                    }
                    return Ok(v);
                }
                let (dx, dw, db) = cpu::conv_transpose2d_backward(
                    cpu_f32(OP, g)?,
                    xs.as_ref().map(|x| cpu_f32(OP, x)).transpose()?,
                    ws.as_ref().map(|w| cpu_f32(OP, w)).transpose()?,
                    gb,
                    (n, c, h, wd),
                    o,
                    kh,
                );
                let mut v = vec![
                    dx.map(|d| Tensor::from_f32(d, &xd)),
                    dw.map(|d| Tensor::from_f32(d, &wdims)),
                ];
                if has_b {
                    v.push(db.map(|d| Tensor::from_f32(d, &[o])));
                }
                Ok(v)
            }),
        );
    }
    Ok(y)
}

#[allow(clippy::too_many_arguments)]
fn conv_transpose2d_forward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Act,
    all: &[&Tensor],
    (n, c, h, wd): (usize, usize, usize, usize),
    o: usize,
    kh: usize,
) -> Result<Tensor> {
    const OP: &str = "conv_transpose2d";
    if let Device::Cuda(_) = same_device(OP, all)? {
        let x = cuda_input(OP, x)?;
        let w = cuda_weight(OP, w)?;
        let b = b.map(|b| cuda_input(OP, b)).transpose()?;
        let dev = device_of(&x);
        let bs = b
            .as_ref()
            .map(|b| b.cuda_whole_f32(OP).map(|(_, s)| s))
            .transpose()?;
        let y = dev.with_blas(|blas| {
            cuda::conv_transpose2d(
                &dev,
                blas,
                &x.gpu_ref(OP)?,
                weight_ref(OP, &w)?,
                bs,
                o,
                kh,
                act,
            )
        })?;
        return Tensor::from_gpu(&dev, y);
    }
    let out = cpu::conv_transpose2d(
        cpu_f32(OP, x)?,
        cpu_f32(OP, w)?,
        b.map(|b| cpu_f32(OP, b)).transpose()?,
        act,
        n,
        c,
        h,
        wd,
        o,
        kh,
    );
    Ok(Tensor::from_f32(out, &[n, o, h * kh, wd * kh]))
}

/// Max pooling, padding with -inf as PyTorch. x [B, C, H, W] -> [B, C, Ho, Wo].
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    const OP: &str = "max_pool2d";
    let _p = crate::profile::scope(OP);
    let [n, c, h, w] = x.dims_n::<4>(OP, "input")?;
    if stride == 0
        || kernel == 0
        || h + 2 * padding < kernel
        || w + 2 * padding < kernel
        || padding * 2 > kernel
    {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?}, kernel {kernel}, stride {stride}, padding {padding}",
                x.dims()
            ),
        ));
    }
    let ho = (h + 2 * padding - kernel) / stride + 1;
    let wo = (w + 2 * padding - kernel) / stride + 1;
    // What the backward keeps: the argmax on the CPU (4 bytes per output, no
    // search again), the input on CUDA (its backward kernel gathers from x).
    enum Saved {
        Input(Tensor),
        Argmax(Vec<u32>),
    }
    let tracked = autograd::requires_grad(x);
    let (mut y, saved) = if let Device::Cuda(_) = x.device() {
        // The checks above (padding at most half the kernel included) hold
        // for both devices.
        let xc = cuda_input(OP, x)?;
        let dev = device_of(&xc);
        let y = cuda::max_pool2d(&dev, &xc.gpu_ref(OP)?, kernel, stride, padding)?;
        (Tensor::from_gpu(&dev, y)?, Saved::Input(x.clone()))
    } else {
        let (out, argmax) = cpu::max_pool2d(
            cpu_f32(OP, x)?,
            n * c,
            (h, w),
            (ho, wo),
            kernel,
            stride,
            padding,
            tracked,
        );
        let saved = Saved::Argmax(argmax.unwrap_or_default());
        (Tensor::from_f32(out, &[n, c, ho, wo]), saved)
    };
    let saved_bytes = match &saved {
        Saved::Input(x) => autograd::bytes(x),
        Saved::Argmax(a) => a.len() * 4,
    };
    let x_dims = x.dims().to_vec();
    autograd::record_unary(OP, x, &mut y, saved_bytes, move |g| {
        const OP: &str = "max_pool2d backward";
        match saved {
            Saved::Input(xs) => {
                let (xc, gc) = (cuda_input(OP, &xs)?, cuda_input(OP, g)?);
                let (dev, xv) = xc.cuda_whole_f32(OP)?;
                let dx = cuda::max_pool2d_backward(
                    dev,
                    xv,
                    gc.cuda_whole_f32(OP)?.1,
                    n * c,
                    (h, w),
                    (ho, wo),
                    (kernel, stride, padding),
                )?;
                Tensor::from_cuda_f32(dev, dx, xs.dims())
            }
            Saved::Argmax(argmax) => {
                crate::ops::backward_on_cpu(OP, &[g])?;
                g.expect_dims(OP, "gradient", &[n, c, ho, wo])?;
                let dx = cpu::max_pool2d_backward(&argmax, cpu_f32(OP, g)?, n * c, h * w, ho * wo);
                Ok(Tensor::from_f32(dx, &x_dims))
            }
        }
    });
    Ok(y)
}

/// The CUDA half of a convolution's backward: the gradient and the kept
/// input / weight compacted on the device, `launch` (a GEMM launcher of
/// cuda.rs) run with cuBLAS, its dX / dW as tensors of the input's and the
/// weight's dims: [dx, dw].
#[allow(clippy::type_complexity)]
fn cuda_conv_grads(
    op: &'static str,
    g: &Tensor,
    (xs, ws): (Option<&Tensor>, Option<&Tensor>),
    (xd, wd): (&[usize], &[usize]),
    launch: impl FnOnce(
        &CudaDevice,
        &crate::cuda::blas::Blas,
        &cudarc::driver::CudaSlice<f32>,
        Option<&cudarc::driver::CudaSlice<f32>>,
        Option<&cudarc::driver::CudaSlice<f32>>,
    ) -> Result<(
        Option<cudarc::driver::CudaSlice<f32>>,
        Option<cudarc::driver::CudaSlice<f32>>,
    )>,
) -> Result<Vec<Option<Tensor>>> {
    let gc = cuda_input(op, g)?;
    let (dev, gsl) = gc.cuda_whole_f32(op)?;
    let xc = xs.map(|x| cuda_input(op, x)).transpose()?;
    let wc = ws.map(|w| cuda_input(op, w)).transpose()?;
    let xv = xc
        .as_ref()
        .map(|x| x.cuda_whole_f32(op).map(|(_, s)| s))
        .transpose()?;
    let wv = wc
        .as_ref()
        .map(|w| w.cuda_whole_f32(op).map(|(_, s)| s))
        .transpose()?;
    let (dx, dw) = dev.with_blas(|blas| launch(dev, blas, gsl, xv, wv))?;
    Ok(vec![
        dx.map(|d| Tensor::from_cuda_f32(dev, d, xd)).transpose()?,
        dw.map(|d| Tensor::from_cuda_f32(dev, d, wd)).transpose()?,
    ])
}

/// A convolution's bias gradient on the device: g [N, O, H, W] summed over
/// everything but O (the deterministic row sums of its channels-last form).
fn cuda_bias_grad(g: &Tensor, o: usize) -> Result<Tensor> {
    crate::ops::reduce::sum_rows(&crate::ops::layout::nchw_to_nhwc(g)?, o)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct 7-loop convolution, the definition.
    fn conv_ref(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        n: usize,
        c: usize,
        h: usize,
        wd: usize,
        o: usize,
        k: usize,
        s: usize,
        p: usize,
    ) -> Vec<f32> {
        let ho = (h + 2 * p - k) / s + 1;
        let wo = (wd + 2 * p - k) / s + 1;
        let mut out = vec![0.0; n * o * ho * wo];
        for ni in 0..n {
            for oi in 0..o {
                for y in 0..ho {
                    for xx in 0..wo {
                        let mut acc = b[oi] as f64;
                        for ci in 0..c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (y * s + ky) as isize - p as isize;
                                    let ix = (xx * s + kx) as isize - p as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd
                                    {
                                        acc += x
                                            [((ni * c + ci) * h + iy as usize) * wd + ix as usize]
                                            as f64
                                            * w[((oi * c + ci) * k + ky) * k + kx] as f64;
                                    }
                                }
                            }
                        }
                        out[((ni * o + oi) * ho + y) * wo + xx] = acc as f32;
                    }
                }
            }
        }
        out
    }

    fn seq(n: usize, f: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * f).sin() * 1.5).collect()
    }

    /// conv2d against the direct definition for one geometry, within `tol`.
    #[allow(clippy::too_many_arguments)]
    fn check_conv(
        n: usize,
        c: usize,
        h: usize,
        wd: usize,
        o: usize,
        k: usize,
        s: usize,
        p: usize,
        tol: f32,
    ) {
        let x = seq(n * c * h * wd, 0.37);
        let w = seq(o * c * k * k, 0.91);
        let b = seq(o, 2.3);
        let want = conv_ref(&x, &w, &b, n, c, h, wd, o, k, s, p);
        let got = conv2d(
            &Tensor::from_vec(x, [n, c, h, wd]).unwrap(),
            &Tensor::from_vec(w, [o, c, k, k]).unwrap(),
            Some(&Tensor::from_vec(b, [o]).unwrap()),
            Conv2dArgs {
                stride: s,
                padding: p,
            },
            None,
            Act::None,
        )
        .unwrap();
        for (a, b) in got.as_f32().unwrap().iter().zip(&want) {
            assert!((a - b).abs() < tol, "c{c} o{o} k{k} s{s} p{p}: {a} vs {b}");
        }
    }

    #[test]
    fn conv2d_matches_direct_definition() {
        for &(k, s, p) in &[(3, 1, 1), (3, 2, 1), (1, 1, 0), (7, 2, 3), (2, 2, 0)] {
            check_conv(2, 3, 9, 7, 4, k, s, p, 1e-4);
        }
    }

    /// Weights above the tiled path's limit take the whole-image im2col + GEMM path.
    #[test]
    fn conv2d_large_weights_path_matches_definition() {
        let (c, o, k) = (130, 64, 3);
        assert!(o * c * k * k > 1 << 16);
        for &(s, p) in &[(1, 1), (2, 1)] {
            check_conv(2, c, 9, 7, o, k, s, p, 1e-3);
        }
    }

    #[test]
    fn conv_transpose_matches_definition() {
        // Batches and single images; maps under 128 pixels take the
        // transposed product, larger batches one task per image.
        for (n, c, h, wd, o, k) in [
            (2, 3, 4, 5, 2, 2),
            (1, 5, 3, 4, 3, 2),
            (1, 4, 12, 11, 2, 2),
            (2, 3, 12, 11, 2, 2),
        ] {
            conv_transpose_case(n, c, h, wd, o, k);
        }
    }

    fn conv_transpose_case(n: usize, c: usize, h: usize, wd: usize, o: usize, k: usize) {
        let x = seq(n * c * h * wd, 0.3);
        let w = seq(c * o * k * k, 0.7);
        let b = seq(o, 2.9);
        let y = conv_transpose2d(
            &Tensor::from_vec(x.clone(), [n, c, h, wd]).unwrap(),
            &Tensor::from_vec(w.clone(), [c, o, k, k]).unwrap(),
            Some(&Tensor::from_vec(b.clone(), [o]).unwrap()),
            Act::None,
        )
        .unwrap();
        let y = y.as_f32().unwrap();
        for ni in 0..n {
            for oi in 0..o {
                for oy in 0..h * k {
                    for ox in 0..wd * k {
                        let (iy, ky, ix, kx) = (oy / k, oy % k, ox / k, ox % k);
                        let mut acc = b[oi];
                        for ci in 0..c {
                            acc += x[((ni * c + ci) * h + iy) * wd + ix]
                                * w[((ci * o + oi) * k + ky) * k + kx];
                        }
                        let got = y[((ni * o + oi) * h * k + oy) * wd * k + ox];
                        assert!((got - acc).abs() < 1e-5);
                    }
                }
            }
        }
    }

    fn bf16_round(v: &[f32]) -> Vec<f32> {
        v.iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect()
    }

    /// The bf16 path (weights packed once, im2col of each tile straight into
    /// bf16 pairs) equals the f32 convolution of the bf16-rounded input and
    /// weight up to f32 summation order: every geometry of the model (3x3
    /// stride 1 / 2, 1x1 direct, the 7x7 stem, the 16x16 patch embedding,
    /// odd channel counts for a padded k-pair), a batch of 2 and tiles of
    /// several widths, bias + residual + ReLU fused.
    #[test]
    fn conv2d_bf16_equals_f32_of_rounded_inputs() {
        for &(n, c, h, wd, o, k, s, p) in &[
            (2, 3, 9, 7, 4, 3, 1, 1),
            (1, 5, 20, 23, 13, 3, 2, 1),
            (2, 64, 12, 12, 40, 1, 1, 0),
            (1, 3, 30, 31, 8, 7, 2, 3),
            (1, 3, 32, 32, 24, 16, 16, 0),
            (1, 300, 15, 17, 7, 3, 1, 1),
        ] {
            let ho = (h + 2 * p - k) / s + 1;
            let wo = (wd + 2 * p - k) / s + 1;
            let x = seq(n * c * h * wd, 0.37);
            let w = seq(o * c * k * k, 0.91);
            let b = Tensor::from_vec(seq(o, 2.3), [o]).unwrap();
            let r = Tensor::from_vec(seq(n * o * ho * wo, 0.11), [n, o, ho, wo]).unwrap();
            let args = Conv2dArgs {
                stride: s,
                padding: p,
            };
            let want = conv2d(
                &Tensor::from_vec(bf16_round(&x), [n, c, h, wd]).unwrap(),
                &Tensor::from_vec(bf16_round(&w), [o, c, k, k]).unwrap(),
                Some(&b),
                args,
                Some(&r),
                Act::Relu,
            )
            .unwrap();
            let packed = PackedA::from_mk(&w, o, c * k * k).unwrap();
            let got = conv2d_with(
                &Tensor::from_vec(x, [n, c, h, wd]).unwrap(),
                &Tensor::from_vec(w, [o, c, k, k]).unwrap(),
                Some(&packed),
                Some(&b),
                args,
                Some(&r),
                Act::Relu,
            )
            .unwrap();
            assert_eq!(got.dims(), want.dims());
            let scale = want
                .as_f32()
                .unwrap()
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in got.as_f32().unwrap().iter().zip(want.as_f32().unwrap()) {
                assert!(
                    (a - b).abs() <= 1e-5 * (c * k * k) as f32 * scale.max(1.0),
                    "c{c} o{o} k{k} s{s} p{p}: {a} vs {b}"
                );
            }
        }
        // A packing that does not fit the weight is a typed error.
        let e = conv2d_with(
            &Tensor::zeros([1, 3, 8, 8]),
            &Tensor::zeros([4, 3, 3, 3]),
            Some(&PackedA::from_mk(&[0.0; 4 * 26], 4, 26).unwrap()),
            None,
            Conv2dArgs {
                stride: 1,
                padding: 1,
            },
            None,
            Act::None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("conv2d") && e.contains("packed"), "{e}");
    }

    #[test]
    fn conv_transpose2d_bf16_equals_f32_of_rounded_inputs() {
        for (n, c, h, wd, o, k) in [
            (2, 3, 4, 5, 2, 2),
            (1, 65, 8, 8, 32, 2),
            (1, 16, 20, 19, 9, 2),
        ] {
            let x = seq(n * c * h * wd, 0.3);
            let w = seq(c * o * k * k, 0.7);
            let b = Tensor::from_vec(seq(o, 2.9), [o]).unwrap();
            let want = conv_transpose2d(
                &Tensor::from_vec(bf16_round(&x), [n, c, h, wd]).unwrap(),
                &Tensor::from_vec(bf16_round(&w), [c, o, k, k]).unwrap(),
                Some(&b),
                Act::Gelu,
            )
            .unwrap();
            let packed = PackedA::from_km(&w, c, o * k * k).unwrap();
            let got = conv_transpose2d_with(
                &Tensor::from_vec(x, [n, c, h, wd]).unwrap(),
                &Tensor::from_vec(w, [c, o, k, k]).unwrap(),
                Some(&packed),
                Some(&b),
                Act::Gelu,
            )
            .unwrap();
            assert_eq!(got.dims(), want.dims());
            for (a, b) in got.as_f32().unwrap().iter().zip(want.as_f32().unwrap()) {
                assert!((a - b).abs() <= 1e-5 * c as f32, "c{c} o{o}: {a} vs {b}");
            }
        }
    }

    /// The packed path has no backward: a tracked input is an error, never
    /// a silent detach.
    #[test]
    fn conv2d_bf16_refuses_tracked_inputs() {
        let rec = crate::autograd::Recording::start().unwrap();
        let mut w = Tensor::from_vec(seq(4 * 3 * 9, 0.5), [4, 3, 3, 3]).unwrap();
        let packed = PackedA::from_mk(w.as_f32().unwrap(), 4, 27).unwrap();
        rec.param(&mut w, "w").unwrap();
        let x = Tensor::from_vec(seq(3 * 64, 0.2), [1, 3, 8, 8]).unwrap();
        let e = conv2d_with(
            &x,
            &w,
            Some(&packed),
            None,
            Conv2dArgs {
                stride: 1,
                padding: 1,
            },
            None,
            Act::None,
        );
        let e = e.unwrap_err().to_string();
        assert!(e.contains("conv2d (cpu bf16)"), "{e}");
    }

    #[test]
    fn max_pool_pads_with_neg_inf() {
        let x = Tensor::from_vec(vec![-1., -2., -3., -4.], [1, 1, 2, 2]).unwrap();
        let y = max_pool2d(&x, 3, 2, 1).unwrap();
        assert_eq!(y.dims(), &[1, 1, 1, 1]);
        assert_eq!(y.as_f32().unwrap(), &[-1.0]);
    }

    #[test]
    fn conv_rejects_channel_mismatch() {
        let e = conv2d(
            &Tensor::zeros([1, 3, 8, 8]),
            &Tensor::zeros([4, 2, 3, 3]),
            None,
            Conv2dArgs {
                stride: 1,
                padding: 1,
            },
            None,
            Act::None,
        );
        assert!(matches!(e, Err(Error::Shape { op: "conv2d", .. })));
    }
}
