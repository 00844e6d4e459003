//! CUDA twins of the convolutions (cuda/conv.cu + cuBLAS GEMMs). A batch of
//! images costs one im2col launch, one strided-batched GEMM (the weights are
//! shared: stride 0) and one epilogue per chunk of images, not one per image;
//! chunks keep the column buffer under COL_BYTES. With bf16 weights the GEMM
//! runs on bf16 inputs (im2col writes bf16 directly) with f32 accumulation.

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::cuda::blas::Blas;
use crate::cuda::{CudaDevice, GpuIn, GpuTensor, act_code, cfg1d, launch_err};
use crate::error::{Error, Result};
use crate::ops::activation::Act;
use crate::ops::activation::cuda::to_bf16;

/// A convolution's weight on the device: f32 runs the GEMM in f32, bf16 runs
/// it on bf16 inputs (the activations are rounded on the way) with f32
/// accumulation. One buffer either way: no f32 copy beside a bf16 weight.
#[derive(Clone, Copy)]
pub enum ConvWeight<'a> {
    F32(&'a CudaSlice<f32>),
    BF16(&'a CudaSlice<half::bf16>),
}

impl ConvWeight<'_> {
    pub fn len(&self) -> usize {
        match self {
            ConvWeight::F32(w) => w.len(),
            ConvWeight::BF16(w) => w.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The most bytes an im2col / transposed-conv scratch buffer may take; a
/// larger batch is processed in chunks of images.
const COL_BYTES: usize = 256 << 20;

fn images_per_chunk(per_image_bytes: usize, n: usize) -> usize {
    (COL_BYTES / per_image_bytes.max(1)).clamp(1, n.max(1))
}

/// act(conv(x) + bias + residual). x [N, C, H, W], w [O, C * kh * kw] (f32,
/// or bf16 to run the GEMM in bf16) -> [N, O, Ho, Wo].
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    dev: &CudaDevice,
    blas: &Blas,
    x: &(impl GpuIn + ?Sized),
    w: ConvWeight<'_>,
    bias: Option<&CudaSlice<f32>>,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    residual: Option<&dyn GpuIn>,
    act: Act,
) -> Result<GpuTensor> {
    const OP: &str = "conv2d (cuda)";
    let [n, c, h, wd]: [usize; 4] = x
        .dims()
        .try_into()
        .map_err(|_| Error::shape(OP, format!("input {:?}", x.dims())))?;
    let k = c * kh * kw;
    if w.len() != o * k
        || stride == 0
        || h + 2 * pad < kh
        || wd + 2 * pad < kw
        || bias.is_some_and(|b| b.len() != o)
    {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?}, weight of {} values for {o} x {c} x {kh} x {kw}",
                x.dims(),
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
        && r.dims() != [n, o, ho, wo]
    {
        return Err(Error::shape(
            OP,
            format!("residual {:?} for output {:?}", r.dims(), [n, o, ho, wo]),
        ));
    }
    let mut y = dev.alloc(n * o * p)?;
    let st = dev.stream();
    let direct = kh == 1 && kw == 1 && stride == 1 && pad == 0;
    match (w, direct) {
        // 1 x 1: the GEMM reads the images themselves.
        (ConvWeight::F32(w), true) => blas.gemm_batched::<f32, _, _, _>(
            st,
            false,
            false,
            o,
            p,
            c,
            w,
            k,
            0,
            x.data(),
            p,
            c * p,
            &mut y,
            p,
            o * p,
            n,
            false,
        )?,
        (ConvWeight::BF16(w16), true) => {
            let x16 = to_bf16(dev, x.data())?;
            blas.gemm_batched::<half::bf16, _, _, _>(
                st,
                false,
                false,
                o,
                p,
                c,
                w16,
                k,
                0,
                &x16,
                p,
                c * p,
                &mut y,
                p,
                o * p,
                n,
                false,
            )?
        }
        (ConvWeight::F32(w), false) => {
            let col = dev.alloc(images_per_chunk(k * p * 4, n) * k * p)?;
            im2col_gemm(
                dev,
                blas,
                "im2col_f32",
                col,
                w,
                x,
                &mut y,
                o,
                [kh, kw, stride, pad, ho, wo],
            )?
        }
        (ConvWeight::BF16(w16), false) => {
            let col = dev.alloc_bf16(images_per_chunk(k * p * 2, n) * k * p)?;
            im2col_gemm(
                dev,
                blas,
                "im2col_bf16",
                col,
                w16,
                x,
                &mut y,
                o,
                [kh, kw, stride, pad, ho, wo],
            )?
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
            Some(r) => l.arg(r.data()),
            None => l.arg(&null),
        };
        l.arg(&nn).arg(&oo).arg(&qq).arg(&a);
        // SAFETY: y and the residual hold n * o * p floats, bias o floats (or null).
        unsafe { l.launch(cfg1d(n * o * p)) }.map_err(launch_err("conv epilogue launch"))?;
    }
    Ok(GpuTensor {
        data: y,
        dims: vec![n, o, ho, wo],
    })
}

/// One im2col launch over `dims` = [nb, c, h, w] images into col [nb, c kh kw, ho wo].
#[allow(clippy::too_many_arguments)]
fn im2col<T: cudarc::driver::DeviceRepr>(
    dev: &CudaDevice,
    f: &cudarc::driver::CudaFunction,
    col: &mut CudaSlice<T>,
    x: &cudarc::driver::CudaView<'_, f32>,
    dims: [usize; 4],
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
) -> Result<()> {
    let [nb, c, h, w] = dims;
    let total = nb * c * kh * kw * ho * wo;
    if col.len() < total || x.len() != nb * c * h * w {
        return Err(Error::shape(
            "im2col (cuda)",
            format!("col {} x {} for {dims:?} k {kh}x{kw}", col.len(), x.len()),
        ));
    }
    let a: [i32; 11] = [nb, c, h, w, kh, kw, stride, pad, ho, wo, 0].map(|v| v as i32);
    let mut l = dev.stream().launch_builder(f);
    l.arg(col).arg(x);
    for v in &a[..10] {
        l.arg(v);
    }
    // SAFETY: col holds at least nb * c kh kw * ho wo elements of the kernel's
    // output type (float or bf16 bits) and x the nb images (checked above);
    // ten int arguments follow, as the kernel declares.
    unsafe { l.launch(cfg1d(total)) }.map_err(launch_err("im2col launch"))?;
    Ok(())
}

/// The im2col path of conv2d for either GEMM element type: images in chunks
/// that fit `col` (its length / (k p)), one im2col launch and one batched GEMM
/// per chunk into y [N, O, Ho Wo]. geo = [kh, kw, stride, pad, ho, wo].
#[allow(clippy::too_many_arguments)]
fn im2col_gemm<T: crate::cuda::blas::BlasElem>(
    dev: &CudaDevice,
    blas: &Blas,
    kernel: &'static str,
    mut col: CudaSlice<T>,
    w: &CudaSlice<T>,
    x: &(impl GpuIn + ?Sized),
    y: &mut CudaSlice<f32>,
    o: usize,
    geo: [usize; 6],
) -> Result<()> {
    let [kh, kw, stride, pad, ho, wo] = geo;
    let (n, c, h, wd) = (x.dims()[0], x.dims()[1], x.dims()[2], x.dims()[3]);
    let (k, p, chw) = (c * kh * kw, ho * wo, c * h * wd);
    let per = (col.len() / (k * p)).max(1);
    let f = dev.function("conv", kernel)?;
    for i0 in (0..n).step_by(per) {
        let nb = per.min(n - i0);
        im2col(
            dev,
            &f,
            &mut col,
            &x.data().slice(i0 * chw..(i0 + nb) * chw),
            [nb, c, h, wd],
            kh,
            kw,
            stride,
            pad,
            ho,
            wo,
        )?;
        let mut yi = y.slice_mut(i0 * o * p..(i0 + nb) * o * p);
        blas.gemm_batched::<T, _, _, _>(
            dev.stream(),
            false,
            false,
            o,
            p,
            k,
            w,
            k,
            0,
            &col,
            p,
            k * p,
            &mut yi,
            p,
            o * p,
            nb,
            false,
        )?;
    }
    Ok(())
}

/// ConvTranspose2d with kernel = stride = k: x [N, C, H, W], w [C, O k k]
/// (f32, or bf16 to run the GEMM in bf16) -> [N, O, kH, kW].
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d(
    dev: &CudaDevice,
    blas: &Blas,
    x: &(impl GpuIn + ?Sized),
    w: ConvWeight<'_>,
    bias: Option<&CudaSlice<f32>>,
    o: usize,
    k: usize,
    act: Act,
) -> Result<GpuTensor> {
    const OP: &str = "conv_transpose2d (cuda)";
    let [n, c, h, wd]: [usize; 4] = x
        .dims()
        .try_into()
        .map_err(|_| Error::shape(OP, format!("input {:?}", x.dims())))?;
    let rows = o * k * k;
    if w.len() != c * rows || bias.is_some_and(|b| b.len() != o) {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?}, weight of {} values for {c} x {o} x {k} x {k}",
                x.dims(),
                w.len()
            ),
        ));
    }
    let hw = h * wd;
    let st = dev.stream();
    let mut y = dev.alloc(n * o * hw * k * k)?;
    let per = images_per_chunk(rows * hw * 4, n);
    let mut tmp = dev.alloc(per * rows * hw)?;
    let f = dev.function("conv", "convt_scatter_f32")?;
    let null: u64 = 0;
    let x16 = match w {
        ConvWeight::BF16(_) => Some(to_bf16(dev, x.data())?),
        ConvWeight::F32(_) => None,
    };
    for i0 in (0..n).step_by(per) {
        let nb = per.min(n - i0);
        // tmp_i [O k k, HW] = W^T [O k k, C] X_i [C, HW], every image of the chunk in one call
        match (w, &x16) {
            (ConvWeight::BF16(_), None) => unreachable!("x16 is made for a bf16 weight"),
            (ConvWeight::BF16(w16), Some(x16)) => {
                let xi = x16.slice(i0 * c * hw..(i0 + nb) * c * hw);
                blas.gemm_batched::<half::bf16, _, _, _>(
                    st,
                    true,
                    false,
                    rows,
                    hw,
                    c,
                    w16,
                    rows,
                    0,
                    &xi,
                    hw,
                    c * hw,
                    &mut tmp,
                    hw,
                    rows * hw,
                    nb,
                    false,
                )?
            }
            (ConvWeight::F32(w), _) => {
                let xi = x.data().slice(i0 * c * hw..(i0 + nb) * c * hw);
                blas.gemm_batched::<f32, _, _, _>(
                    st,
                    true,
                    false,
                    rows,
                    hw,
                    c,
                    w,
                    rows,
                    0,
                    &xi,
                    hw,
                    c * hw,
                    &mut tmp,
                    hw,
                    rows * hw,
                    nb,
                    false,
                )?
            }
        }
        let mut yi = y.slice_mut(i0 * o * hw * k * k..(i0 + nb) * o * hw * k * k);
        let (nn, oo, hh, ww, kk, a) = (
            nb as i32,
            o as i32,
            h as i32,
            wd as i32,
            k as i32,
            act_code(act),
        );
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&mut yi).arg(&tmp);
        match bias {
            Some(b) => l.arg(b),
            None => l.arg(&null),
        };
        l.arg(&nn).arg(&oo).arg(&hh).arg(&ww).arg(&kk).arg(&a);
        // SAFETY: tmp holds nb * rows * hw floats, the output chunk nb * o * hw * k * k, bias o.
        unsafe { l.launch(cfg1d(nb * o * hw * k * k)) }
            .map_err(launch_err("convT scatter launch"))?;
    }
    Ok(GpuTensor {
        data: y,
        dims: vec![n, o, h * k, wd * k],
    })
}

/// Max pooling with -inf padding: x [N, C, H, W] -> [N, C, Ho, Wo].
pub fn max_pool2d(
    dev: &CudaDevice,
    x: &(impl GpuIn + ?Sized),
    kernel: usize,
    stride: usize,
    pad: usize,
) -> Result<GpuTensor> {
    let [n, c, h, w]: [usize; 4] = x
        .dims()
        .try_into()
        .map_err(|_| Error::shape("max_pool2d (cuda)", format!("input {:?}", x.dims())))?;
    if stride == 0 || h + 2 * pad < kernel || w + 2 * pad < kernel {
        return Err(Error::shape(
            "max_pool2d (cuda)",
            format!("input {:?}, kernel {kernel}", x.dims()),
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
        .arg(x.data())
        .arg(&pl)
        .arg(&hh)
        .arg(&ww)
        .arg(&hoo)
        .arg(&woo)
        .arg(&kk)
        .arg(&ss)
        .arg(&pp);
    // SAFETY: x holds planes * h * w floats, y planes * ho * wo; types match.
    unsafe { l.launch(cfg1d(n * c * ho * wo)) }.map_err(launch_err("max_pool2d launch"))?;
    Ok(GpuTensor {
        data: y,
        dims: vec![n, c, ho, wo],
    })
}

/// conv2d's backward on the device: per image, dW += G_i col_i^T (im2col,
/// then a cuBLAS GEMM accumulating over the images in order) when `x` is
/// given, and dcol = W^T G_i then col2im as a gather (dX) when `w` is given.
/// g [N, O, Ho, Wo]; x [N, C, H, W]; w [O, C kh kw]. Bias gradients come
/// from ops::reduce.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn conv2d_backward(
    dev: &CudaDevice,
    blas: &Blas,
    g: &CudaSlice<f32>,
    x: Option<&CudaSlice<f32>>,
    w: Option<&CudaSlice<f32>>,
    [n, c, h, wd]: [usize; 4],
    [o, kh, kw, stride, pad, ho, wo]: [usize; 7],
) -> Result<(Option<CudaSlice<f32>>, Option<CudaSlice<f32>>)> {
    const OP: &str = "conv2d backward (cuda)";
    let (k, p, img) = (c * kh * kw, ho * wo, c * h * wd);
    if g.len() != n * o * p
        || x.is_some_and(|x| x.len() != n * img)
        || w.is_some_and(|w| w.len() != o * k)
    {
        return Err(Error::shape(
            OP,
            format!("gradient of {} values for {n} x {o} x {ho} x {wo}", g.len()),
        ));
    }
    let st = dev.stream();
    let geo = |v: usize| v as i32;
    let dw = match x {
        Some(x) => {
            let mut dw = dev.alloc(o * k)?;
            let mut col = dev.alloc(k * p)?;
            let f = dev.function("conv", "im2col_f32")?;
            for i in 0..n {
                im2col(
                    dev,
                    &f,
                    &mut col,
                    &x.slice(i * img..(i + 1) * img),
                    [1, c, h, wd],
                    kh,
                    kw,
                    stride,
                    pad,
                    ho,
                    wo,
                )?;
                // dW [o, k] (+)= G_i [o, p] col_i^T (col_i stored [k, p])
                blas.gemm_f32(
                    st,
                    false,
                    true,
                    o,
                    k,
                    p,
                    &g.slice(i * o * p..(i + 1) * o * p),
                    p,
                    &col,
                    p,
                    &mut dw,
                    k,
                    i > 0,
                )?;
            }
            Some(dw)
        }
        None => None,
    };
    let dx = match w {
        Some(w) => {
            let mut dx = dev.alloc(n * img)?;
            let mut dcol = dev.alloc(k * p)?;
            let f = dev.function("conv", "col2im_f32")?;
            for i in 0..n {
                // dcol [k, p] = W^T (W stored [o, k]) G_i [o, p]
                blas.gemm_f32(
                    st,
                    true,
                    false,
                    k,
                    p,
                    o,
                    w,
                    k,
                    &g.slice(i * o * p..(i + 1) * o * p),
                    p,
                    &mut dcol,
                    p,
                    false,
                )?;
                let a = [1, c, h, wd, kh, kw, stride, pad, ho, wo].map(geo);
                let mut dxi = dx.slice_mut(i * img..(i + 1) * img);
                let mut l = st.launch_builder(&f);
                l.arg(&mut dxi).arg(&dcol);
                for v in &a {
                    l.arg(v);
                }
                // SAFETY: dxi holds one image (c h w floats), dcol c kh kw x
                // ho wo; ten int arguments as the kernel declares.
                unsafe { l.launch(cfg1d(img)) }.map_err(launch_err("col2im launch"))?;
            }
            Some(dx)
        }
        None => None,
    };
    Ok((dx, dw))
}

/// max_pool2d's backward on the device (the argmax found again, gathered per
/// input pixel): x [planes, h, w], g [planes, ho, wo] -> dx [planes, h, w].
#[allow(clippy::too_many_arguments)]
pub fn max_pool2d_backward(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    planes: usize,
    (h, w): (usize, usize),
    (ho, wo): (usize, usize),
    (k, s, p): (usize, usize, usize),
) -> Result<CudaSlice<f32>> {
    if x.len() != planes * h * w || g.len() != planes * ho * wo || s == 0 {
        return Err(Error::shape(
            "max_pool2d backward (cuda)",
            format!(
                "x {} / gradient {} values for {planes} planes",
                x.len(),
                g.len()
            ),
        ));
    }
    let mut dx = dev.alloc(planes * h * w)?;
    let f = dev.function("conv", "max_pool2d_backward_f32")?;
    let pl = planes as i64;
    let a = [h, w, ho, wo, k, s, p].map(|v| v as i32);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut dx).arg(x).arg(g).arg(&pl);
    for v in &a {
        l.arg(v);
    }
    // SAFETY: dx and x hold planes h w floats, g planes ho wo; types match
    // (float*, const float* x2, long long, int x7).
    unsafe { l.launch(cfg1d(planes * h * w)) }.map_err(launch_err("max_pool2d_backward launch"))?;
    Ok(dx)
}

/// conv_transpose2d's backward on the device: gt_i = the gradient gathered
/// back into the GEMM's layout, dX_i = W [c, o k k] gt_i, dW += X_i gt_i^T
/// (images in order). g [n, o, h k, w k], x [n, c, h, w], w [c, o k k].
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn conv_transpose2d_backward(
    dev: &CudaDevice,
    blas: &Blas,
    g: &CudaSlice<f32>,
    x: Option<&CudaSlice<f32>>,
    w: Option<&CudaSlice<f32>>,
    (n, c, h, wd): (usize, usize, usize, usize),
    o: usize,
    k: usize,
) -> Result<(Option<CudaSlice<f32>>, Option<CudaSlice<f32>>)> {
    let (hw, rows) = (h * wd, o * k * k);
    if g.len() != n * rows * hw
        || x.is_some_and(|x| x.len() != n * c * hw)
        || w.is_some_and(|w| w.len() != c * rows)
    {
        return Err(Error::shape(
            "conv_transpose2d backward (cuda)",
            format!(
                "gradient of {} values for {n} x {o} x {} x {}",
                g.len(),
                h * k,
                wd * k
            ),
        ));
    }
    let st = dev.stream();
    let mut gt = dev.alloc(n * rows * hw)?;
    let f = dev.function("conv", "convt_gather_f32")?;
    let a = [n, o, h, wd, k].map(|v| v as i32);
    let mut l = st.launch_builder(&f);
    l.arg(&mut gt).arg(g);
    for v in &a {
        l.arg(v);
    }
    // SAFETY: gt and g hold n o k k h w floats; five int arguments.
    unsafe { l.launch(cfg1d(n * rows * hw)) }.map_err(launch_err("convt_gather launch"))?;
    let dx = match w {
        Some(w) => {
            let mut dx = dev.alloc(n * c * hw)?;
            for i in 0..n {
                let gi = gt.slice(i * rows * hw..(i + 1) * rows * hw);
                let mut dxi = dx.slice_mut(i * c * hw..(i + 1) * c * hw);
                blas.gemm_f32(
                    st, false, false, c, hw, rows, w, rows, &gi, hw, &mut dxi, hw, false,
                )?;
            }
            Some(dx)
        }
        None => None,
    };
    let dw = match x {
        Some(x) => {
            let mut dw = dev.alloc(c * rows)?;
            for i in 0..n {
                let gi = gt.slice(i * rows * hw..(i + 1) * rows * hw);
                let xi = x.slice(i * c * hw..(i + 1) * c * hw);
                // dW [c, rows] (+)= X_i [c, hw] gt_i^T (gt_i stored [rows, hw])
                blas.gemm_f32(
                    st,
                    false,
                    true,
                    c,
                    rows,
                    hw,
                    &xi,
                    hw,
                    &gi,
                    hw,
                    &mut dw,
                    rows,
                    i > 0,
                )?;
            }
            Some(dw)
        }
        None => None,
    };
    Ok((dx, dw))
}
