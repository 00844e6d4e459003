//! Resizing.
//!
//! * `bilinear`: PyTorch's `F.interpolate(mode='bilinear', align_corners=False)`
//!   without antialias, on f32 NCHW maps (mask logits post-processing).
//! * `resize_u8_pil_bilinear`: PIL's `Image.resize(..., BILINEAR)` on 8-bit images:
//!   a separable triangle filter whose support widens with the downscale factor
//!   (antialiasing), fixed-point coefficients with 22 fractional bits, a horizontal
//!   pass then a vertical pass, each rounded and clamped to 0..255.

pub(crate) mod cpu;
pub mod cuda;

use crate::error::{Error, Result};
use crate::ops::{cpu_f32, cuda_input};
use crate::tensor::{Device, Tensor};

/// x [B, C, H, W] -> [B, C, oh, ow].
pub fn bilinear(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    const OP: &str = "bilinear";
    let _p = crate::profile::scope(OP);
    let [n, c, h, w] = x.dims_n::<4>(OP, "input")?;
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(Error::shape(
            OP,
            format!("cannot resize {:?} to {oh} x {ow}", x.dims()),
        ));
    }
    let mut y = if let Device::Cuda(_) = x.device() {
        // Bit-exact with the CPU (cuda/resize.cu rounds every step in its order).
        let x = cuda_input(OP, x)?;
        let (dev, xs) = x.cuda_whole_f32(OP)?;
        let y = cuda::bilinear_crop(dev, xs, n * c, h, w, h, w, oh, ow)?;
        Tensor::from_cuda_f32(dev, y, [n, c, oh, ow])?
    } else {
        let out = cpu::bilinear(cpu_f32(OP, x)?, n * c, h, w, oh, ow);
        Tensor::from_f32(out, &[n, c, oh, ow])
    };
    crate::autograd::record_unary(OP, x, &mut y, 0, move |g| {
        const OP: &str = "bilinear backward";
        if let Device::Cuda(_) = g.device() {
            let gc = cuda_input(OP, g)?;
            let (dev, gs) = gc.cuda_whole_f32(OP)?;
            let dx = cuda::bilinear_backward(dev, gs, n * c, h, w, oh, ow)?;
            return Tensor::from_cuda_f32(dev, dx, [n, c, h, w]);
        }
        let dx = cpu::bilinear_backward(cpu_f32(OP, g)?, n * c, h, w, oh, ow);
        Ok(Tensor::from_f32(dx, &[n, c, h, w]))
    });
    Ok(y)
}

/// The top-left h x w of each plane of x [B, C, H, W], resized to oh x ow:
/// [B, C, oh, ow] (the mask post-processing's crop to the resized image and
/// its resize to the original size, fused on CUDA; the same values on both).
pub fn bilinear_crop(x: &Tensor, h: usize, w: usize, oh: usize, ow: usize) -> Result<Tensor> {
    const OP: &str = "bilinear_crop";
    let _p = crate::profile::scope("bilinear");
    let [n, c, ph, pw] = x.dims_n::<4>(OP, "input")?;
    if h == 0 || w == 0 || h > ph || w > pw || oh == 0 || ow == 0 {
        return Err(Error::shape(
            OP,
            format!("crop {h} x {w} of {:?} to {oh} x {ow}", x.dims()),
        ));
    }
    // Post-processing only: training's loss sees the uncropped upsample.
    crate::autograd::no_backward(OP, &[x])?;
    if let Device::Cuda(_) = x.device() {
        let x = cuda_input(OP, x)?;
        let (dev, xs) = x.cuda_whole_f32(OP)?;
        let y = cuda::bilinear_crop(dev, xs, n * c, ph, pw, h, w, oh, ow)?;
        return Tensor::from_cuda_f32(dev, y, [n, c, oh, ow]);
    }
    let src = cpu_f32(OP, x)?;
    let mut crop = Vec::with_capacity(n * c * h * w);
    for pl in 0..n * c {
        for y in 0..h {
            let row = pl * ph * pw + y * pw;
            crop.extend_from_slice(&src[row..row + w]);
        }
    }
    let out = cpu::bilinear(&crop, n * c, h, w, oh, ow);
    Ok(Tensor::from_f32(out, &[n, c, oh, ow]))
}

/// img: h x w x ch interleaved u8 -> oh x ow x ch.
pub fn resize_u8_pil_bilinear(
    img: &[u8],
    h: usize,
    w: usize,
    ch: usize,
    oh: usize,
    ow: usize,
) -> Result<Vec<u8>> {
    const OP: &str = "resize_u8_pil_bilinear";
    let _p = crate::profile::scope(OP);
    if img.len() != h * w * ch {
        return Err(Error::shape(
            OP,
            format!("{} bytes for {h} x {w} x {ch}", img.len()),
        ));
    }
    if h == 0 || w == 0 || oh == 0 || ow == 0 || ch == 0 {
        return Err(Error::shape(
            OP,
            format!("cannot resize {h} x {w} x {ch} to {oh} x {ow}"),
        ));
    }
    Ok(cpu::resize_u8(img, h, w, ch, oh, ow))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_upsample_2x_matches_torch() {
        // torch: F.interpolate(torch.tensor([[[[0.,1.],[2.,3.]]]]), size=(4,4), mode='bilinear')
        let x = Tensor::from_vec(vec![0., 1., 2., 3.], [1, 1, 2, 2]).unwrap();
        let y = bilinear(&x, 4, 4).unwrap();
        let want = [
            0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
        ];
        assert_eq!(y.as_f32().unwrap(), &want);
    }

    #[test]
    fn pil_identity_and_constant() {
        let img: Vec<u8> = (0..5 * 7 * 3).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_u8_pil_bilinear(&img, 5, 7, 3, 5, 7).unwrap(), img);
        let flat = vec![77u8; 30 * 20];
        assert!(
            resize_u8_pil_bilinear(&flat, 30, 20, 1, 7, 11)
                .unwrap()
                .iter()
                .all(|&v| v == 77)
        );
    }
}
