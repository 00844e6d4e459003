//! Layout changes between channels-first maps (NCHW, convolutions) and
//! channels-last tokens (NHWC, the ViT), and broadcast helpers.

pub mod cuda;

use rayon::prelude::*;

use crate::autograd;
use crate::error::Result;
use crate::ops::{cpu_f32, cuda_input, same_device};
use crate::tensor::{Device, Tensor};

/// The CUDA path of a layout op: `f` on x's buffer, the result on x's device.
fn on_cuda(
    op: &'static str,
    x: &Tensor,
    f: impl FnOnce(&crate::cuda::CudaDevice, &crate::cuda::GpuRef) -> Result<crate::cuda::GpuTensor>,
) -> Result<Tensor> {
    let x = cuda_input(op, x)?;
    let (dev, _) = x.cuda_whole_f32(op)?;
    let y = f(dev, &x.gpu_ref(op)?)?;
    Tensor::from_gpu(dev, y)
}

/// [B, C, H, W] -> [B, H, W, C]
pub fn nchw_to_nhwc(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "nchw_to_nhwc";
    let _p = crate::profile::scope("layout");
    let [b, c, h, w] = x.dims_n::<4>(OP, "input")?;
    let mut y = nchw_to_nhwc_forward(x, [b, c, h, w])?;
    autograd::record_unary(OP, x, &mut y, 0, nhwc_to_nchw);
    Ok(y)
}

fn nchw_to_nhwc_forward(x: &Tensor, [b, c, h, w]: [usize; 4]) -> Result<Tensor> {
    const OP: &str = "nchw_to_nhwc";
    if let Device::Cuda(_) = x.device() {
        return on_cuda(OP, x, |dev, g| cuda::nchw_to_nhwc(dev, g));
    }
    let xs = cpu_f32(OP, x)?;
    let mut out = vec![0.0f32; xs.len()];
    let p = h * w;
    out.par_chunks_mut(p * c).enumerate().for_each(|(bi, o)| {
        let src = &xs[bi * c * p..(bi + 1) * c * p];
        for ci in 0..c {
            for pi in 0..p {
                o[pi * c + ci] = src[ci * p + pi];
            }
        }
    });
    Ok(Tensor::from_f32(out, &[b, h, w, c]))
}

/// [B, H, W, C] -> [B, C, H, W]
pub fn nhwc_to_nchw(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "nhwc_to_nchw";
    let _p = crate::profile::scope("layout");
    let [b, h, w, c] = x.dims_n::<4>(OP, "input")?;
    let mut y = nhwc_to_nchw_forward(x, [b, h, w, c])?;
    autograd::record_unary(OP, x, &mut y, 0, nchw_to_nhwc);
    Ok(y)
}

fn nhwc_to_nchw_forward(x: &Tensor, [b, h, w, c]: [usize; 4]) -> Result<Tensor> {
    const OP: &str = "nhwc_to_nchw";
    if let Device::Cuda(_) = x.device() {
        return on_cuda(OP, x, |dev, g| cuda::nhwc_to_nchw(dev, g));
    }
    let xs = cpu_f32(OP, x)?;
    let mut out = vec![0.0f32; xs.len()];
    let p = h * w;
    out.par_chunks_mut(p * c).enumerate().for_each(|(bi, o)| {
        let src = &xs[bi * c * p..(bi + 1) * c * p];
        for pi in 0..p {
            for ci in 0..c {
                o[ci * p + pi] = src[pi * c + ci];
            }
        }
    });
    Ok(Tensor::from_f32(out, &[b, c, h, w]))
}

/// Repeats x [1, ...] n times along the first dim: [n, ...].
pub fn repeat_first(x: &Tensor, n: usize) -> Result<Tensor> {
    const OP: &str = "repeat_first";
    let mut dims = x.dims().to_vec();
    if dims.first() != Some(&1) {
        return Err(crate::Error::shape(
            OP,
            format!("expected a leading 1, got {:?}", dims),
        ));
    }
    dims[0] = n;
    let mut y = if let Device::Cuda(_) = x.device() {
        on_cuda(OP, x, |dev, g| cuda::repeat(dev, g.data, n, dims))?
    } else {
        let xs = cpu_f32(OP, x)?;
        let mut out = Vec::with_capacity(xs.len() * n);
        for _ in 0..n {
            out.extend_from_slice(xs);
        }
        Tensor::from_f32(out, &dims)
    };
    autograd::record_unary(OP, x, &mut y, 0, crate::ops::activation::sum_leading);
    Ok(y)
}

/// g [N, len, C] placed at rows [start, start + len) of zeros [N, l, C]: the
/// gradient of `narrow`.
pub fn pad_rows(g: &Tensor, l: usize, start: usize) -> Result<Tensor> {
    const OP: &str = "pad_rows";
    let [n, len, c] = g.dims_n::<3>(OP, "gradient")?;
    if start + len > l {
        return Err(crate::Error::shape(
            OP,
            format!("rows {start}..{} of {l}", start + len),
        ));
    }
    if let Device::Cuda(_) = g.device() {
        let gc = cuda_input(OP, g)?;
        let (dev, gs) = gc.cuda_whole_f32(OP)?;
        let mut y = dev.alloc_zeros(n * l * c)?;
        cuda::copy_rows(dev, &mut y, gs, n, len, c, (len * c, 0), (l * c, start))?;
        return Tensor::from_cuda_f32(dev, y, [n, l, c]);
    }
    let gs = cpu_f32(OP, g)?;
    let mut out = vec![0.0f32; n * l * c];
    for i in 0..n {
        out[(i * l + start) * c..(i * l + start + len) * c]
            .copy_from_slice(&gs[i * len * c..(i + 1) * len * c]);
    }
    Ok(Tensor::from_f32(out, &[n, l, c]))
}

/// Rows [start, start + len) of every item of x [N, L, C]: [N, len, C]
/// (the decoder's med-token output is `narrow(q, 0, 1)`).
pub fn narrow(x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    const OP: &str = "narrow";
    let [n, l, c] = x.dims_n::<3>(OP, "input")?;
    if start.checked_add(len).is_none_or(|end| end > l) {
        return Err(crate::Error::shape(
            OP,
            format!(
                "rows {start}..{} of {:?}",
                start.saturating_add(len),
                x.dims()
            ),
        ));
    }
    let mut y = if let Device::Cuda(_) = x.device() {
        let x = cuda_input(OP, x)?;
        let (dev, xs) = x.cuda_whole_f32(OP)?;
        let mut y = dev.alloc(n * len * c)?;
        cuda::copy_rows(dev, &mut y, xs, n, len, c, (l * c, start), (len * c, 0))?;
        Tensor::from_cuda_f32(dev, y, [n, len, c])?
    } else {
        let xs = cpu_f32(OP, x)?;
        let mut out = Vec::with_capacity(n * len * c);
        for i in 0..n {
            out.extend_from_slice(&xs[(i * l + start) * c..(i * l + start + len) * c]);
        }
        Tensor::from_f32(out, &[n, len, c])
    };
    autograd::record_unary(OP, x, &mut y, 0, move |g| pad_rows(g, l, start));
    Ok(y)
}

/// Token sequences joined along dim 1: parts [N or 1, L_i, C] -> [N, sum L_i, C];
/// a part with one item is shared by every item (the med token ahead of each
/// box's two corner tokens).
pub fn cat1(parts: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "cat1";
    let mut dims = vec![];
    for p in parts {
        dims.push(p.dims_n::<3>(OP, "part")?);
    }
    let n = dims.iter().map(|d| d[0]).max().unwrap_or(0);
    let c = dims.first().map_or(0, |d| d[2]);
    if dims.is_empty() || dims.iter().any(|d| d[2] != c || (d[0] != n && d[0] != 1)) {
        return Err(crate::Error::shape(
            OP,
            format!(
                "parts {:?}",
                parts.iter().map(|p| p.dims()).collect::<Vec<_>>()
            ),
        ));
    }
    let l: usize = dims.iter().map(|d| d[1]).sum();
    let mut y = cat1_forward(parts, &dims, n, l, c)?;
    if autograd::is_tracked(parts) {
        let dims2 = dims.clone();
        autograd::record(
            OP,
            parts,
            &mut y,
            0,
            Box::new(move |g| {
                let mut row = 0;
                let mut out = Vec::with_capacity(dims2.len());
                for d in &dims2 {
                    let gi = narrow(g, row, d[1])?;
                    row += d[1];
                    out.push(Some(if d[0] == 1 && n != 1 {
                        crate::ops::activation::sum_leading(&gi)?
                    } else {
                        gi
                    }));
                }
                Ok(out)
            }),
        );
    }
    Ok(y)
}

fn cat1_forward(
    parts: &[&Tensor],
    dims: &[[usize; 3]],
    n: usize,
    l: usize,
    c: usize,
) -> Result<Tensor> {
    const OP: &str = "cat1";
    if let Device::Cuda(_) = crate::ops::same_device(OP, parts)? {
        let parts: Vec<Tensor> = parts
            .iter()
            .map(|p| cuda_input(OP, p))
            .collect::<Result<_>>()?;
        let dev = parts[0].cuda_device().expect("a CUDA tensor").clone();
        let mut y = dev.alloc(n * l * c)?;
        let mut row = 0;
        for (p, d) in parts.iter().zip(dims) {
            let (_, xs) = p.cuda_whole_f32(OP)?;
            let stride = if d[0] == 1 { 0 } else { d[1] * c };
            cuda::copy_rows(&dev, &mut y, xs, n, d[1], c, (stride, 0), (l * c, row))?;
            row += d[1];
        }
        return Tensor::from_cuda_f32(&dev, y, [n, l, c]);
    }
    let xs: Vec<&[f32]> = parts
        .iter()
        .map(|p| cpu_f32(OP, p))
        .collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(n * l * c);
    for i in 0..n {
        for (x, d) in xs.iter().zip(dims) {
            let item = if d[0] == 1 { 0 } else { i };
            out.extend_from_slice(&x[item * d[1] * c..(item + 1) * d[1] * c]);
        }
    }
    Ok(Tensor::from_f32(out, &[n, l, c]))
}

/// Tensors of equal trailing dims joined along dim 0 (the masks of several
/// images into one loss). On their device; the gradient of each part is its
/// range of the output's gradient (a view).
pub fn cat0(parts: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "cat0";
    let first = parts
        .first()
        .ok_or_else(|| crate::Error::shape(OP, "no parts"))?;
    let tail = first.dims().get(1..).unwrap_or(&[]).to_vec();
    if first.dims().is_empty()
        || parts
            .iter()
            .any(|p| p.dims().get(1..) != Some(tail.as_slice()))
    {
        return Err(crate::Error::shape(
            OP,
            format!(
                "parts {:?}",
                parts.iter().map(|p| p.dims()).collect::<Vec<_>>()
            ),
        ));
    }
    let n: usize = parts.iter().map(|p| p.dims()[0]).sum();
    let mut dims = vec![n];
    dims.extend(&tail);
    let total: usize = dims.iter().product();
    let mut y = if let Device::Cuda(_) = crate::ops::same_device(OP, parts)? {
        let dev = first.cuda_device().expect("a CUDA tensor").clone();
        let mut out = Tensor::from_cuda_f32(&dev, dev.alloc(total)?, dims.clone())?;
        let mut at = 0;
        {
            let mut dst = out.cuda_f32_mut(OP)?;
            for p in parts {
                let src = p.cuda_f32(OP)?;
                let mut part = dst.slice_mut(at..at + p.numel());
                dev.stream()
                    .memcpy_dtod(&src, &mut part)
                    .map_err(crate::cuda::driver_err("copy"))?;
                at += p.numel();
            }
        }
        out
    } else {
        let mut out = Vec::with_capacity(total);
        for p in parts {
            out.extend_from_slice(cpu_f32(OP, p)?);
        }
        Tensor::from_f32(out, &dims)
    };
    if autograd::is_tracked(parts) {
        let ranges: Vec<(usize, Vec<usize>)> = parts
            .iter()
            .scan(0, |at, p| {
                let r = (*at, p.dims().to_vec());
                *at += p.numel();
                Some(r)
            })
            .collect();
        autograd::record(
            OP,
            parts,
            &mut y,
            0,
            Box::new(move |g| {
                ranges
                    .iter()
                    .map(|(at, d)| g.view(*at, d.clone()).map(Some))
                    .collect()
            }),
        );
    }
    Ok(y)
}

/// g placed at [offset, offset + g.numel()) of a zero tensor of `whole`'s
/// shape: the gradient of a view (Tensor::view). On g's device.
pub fn scatter_range(g: &Tensor, offset: usize, whole: crate::tensor::Shape) -> Result<Tensor> {
    const OP: &str = "scatter_range";
    let n = g.numel();
    if offset.checked_add(n).is_none_or(|end| end > whole.numel()) {
        return Err(crate::Error::shape(
            OP,
            format!("{:?} at offset {offset} in {whole:?}", g.dims()),
        ));
    }
    if let Device::Cuda(_) = g.device() {
        let dev = g.cuda_device().expect("a CUDA tensor").clone();
        let src = g.cuda_f32(OP)?;
        let mut out = Tensor::from_cuda_f32(&dev, dev.alloc_zeros(whole.numel())?, whole)?;
        {
            let mut dst = out.cuda_f32_mut(OP)?;
            let mut part = dst.slice_mut(offset..offset + n);
            dev.stream()
                .memcpy_dtod(&src, &mut part)
                .map_err(crate::cuda::driver_err("copy"))?;
        }
        return Ok(out);
    }
    let mut out = vec![0.0f32; whole.numel()];
    out[offset..offset + n].copy_from_slice(cpu_f32(OP, g)?);
    Ok(Tensor::from_f32(out, whole.dims()))
}

/// Copies src's values into dst's flat range [offset, offset + src.numel())
/// in place (dst's own buffer: copied first only if it is shared), on
/// either device. Not recorded: for stores outside the tape.
pub fn copy_into(dst: &mut Tensor, offset: usize, src: &Tensor) -> Result<()> {
    const OP: &str = "copy_into";
    let n = src.numel();
    if offset.checked_add(n).is_none_or(|end| end > dst.numel()) {
        return Err(crate::Error::shape(
            OP,
            format!("{:?} at offset {offset} in {:?}", src.dims(), dst.dims()),
        ));
    }
    crate::autograd::no_backward(OP, &[&*dst, src])?;
    match same_device(OP, &[&*dst, src])? {
        Device::Cuda(_) => {
            let dev = src.cuda_device().expect("a CUDA tensor").clone();
            let s = src.cuda_f32(OP)?;
            let mut d = dst.cuda_f32_mut(OP)?;
            let mut part = d.slice_mut(offset..offset + n);
            dev.stream()
                .memcpy_dtod(&s, &mut part)
                .map_err(crate::cuda::driver_err("copy"))
        }
        Device::Cpu => {
            let s = cpu_f32(OP, src)?;
            dst.as_f32_mut()?[offset..offset + n].copy_from_slice(s);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_into_writes_a_range() {
        let mut d = Tensor::from_vec(vec![0.0; 6], [6]).unwrap();
        let s = Tensor::from_vec(vec![1.0, 2.0], [2, 1]).unwrap();
        copy_into(&mut d, 3, &s).unwrap();
        assert_eq!(d.as_f32().unwrap(), &[0.0, 0.0, 0.0, 1.0, 2.0, 0.0]);
        assert!(copy_into(&mut d, 5, &s).is_err());
    }

    #[test]
    fn narrow_and_cat_of_token_rows() {
        // x [2, 3, 2]: item i, row r, channel c = 100 i + 10 r + c.
        let v: Vec<f32> = (0..2)
            .flat_map(|i| {
                (0..3).flat_map(move |r| (0..2).map(move |c| (100 * i + 10 * r + c) as f32))
            })
            .collect();
        let x = Tensor::from_vec(v, [2, 3, 2]).unwrap();
        let q = narrow(&x, 1, 2).unwrap();
        assert_eq!(q.dims(), &[2, 2, 2]);
        assert_eq!(
            q.as_f32().unwrap(),
            &[10., 11., 20., 21., 110., 111., 120., 121.]
        );
        assert!(narrow(&x, 2, 2).is_err());
        let head = Tensor::from_vec(vec![-1., -2.], [1, 1, 2]).unwrap();
        let t = cat1(&[&head, &q]).unwrap();
        assert_eq!(t.dims(), &[2, 3, 2]);
        assert_eq!(
            t.as_f32().unwrap(),
            &[
                -1., -2., 10., 11., 20., 21., -1., -2., 110., 111., 120., 121.
            ]
        );
        assert!(cat1(&[&head, &Tensor::zeros([2, 1, 3])]).is_err());
    }

    #[test]
    fn round_trip() {
        let x = Tensor::from_vec((0..24).map(|v| v as f32).collect(), [1, 2, 3, 4]).unwrap();
        let y = nchw_to_nhwc(&x).unwrap();
        assert_eq!(y.dims(), &[1, 3, 4, 2]);
        assert_eq!(y.as_f32().unwrap()[..4], [0.0, 12.0, 1.0, 13.0]);
        let z = nhwc_to_nchw(&y).unwrap();
        assert_eq!(z.as_f32().unwrap(), x.as_f32().unwrap());
    }
}
