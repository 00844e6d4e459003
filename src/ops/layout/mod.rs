//! Layout changes between channels-first maps (NCHW, convolutions) and
//! channels-last tokens (NHWC, the ViT), and broadcast helpers.

pub mod cuda;

use rayon::prelude::*;

use crate::error::Result;
use crate::ops::{cpu_f32, cuda_input};
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
    if let Device::Cuda(_) = x.device() {
        return on_cuda(OP, x, |dev, g| cuda::repeat(dev, g.data, n, dims));
    }
    let xs = cpu_f32(OP, x)?;
    let mut out = Vec::with_capacity(xs.len() * n);
    for _ in 0..n {
        out.extend_from_slice(xs);
    }
    Ok(Tensor::from_f32(out, &dims))
}

#[cfg(test)]
mod tests {
    use super::*;

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
