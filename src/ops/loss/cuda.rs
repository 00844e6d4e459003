//! CUDA twin of the loss (cuda/loss.cu).

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::cuda::{CudaDevice, cfg1d, launch_err};
use crate::error::{Error, Result};

/// The four sums of the loss (focal terms, p y, p, y) on the device, [4] f64.
pub fn loss_sums(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    y: &CudaSlice<f32>,
) -> Result<CudaSlice<f64>> {
    let n = x.len();
    if y.len() != n || n == 0 {
        return Err(Error::shape(
            "focal_dice (cuda)",
            format!("logits of {n} values, labels of {}", y.len()),
        ));
    }
    let chunks = n.div_ceil(super::CHUNK);
    let mut part = dev.alloc_f64(chunks * 4)?;
    let mut sums = dev.alloc_f64(4)?;
    let (nn, ch, k) = (n as i64, super::CHUNK as i64, chunks as i64);
    let f = dev.function("loss", "loss_partial")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut part).arg(x).arg(y).arg(&nn).arg(&ch);
    // SAFETY: part holds chunks * 4 doubles, x and y n floats; types match
    // (double*, const float*, const float*, long long, long long).
    unsafe { l.launch(cfg1d(chunks)) }.map_err(launch_err("loss_partial launch"))?;
    let f = dev.function("loss", "loss_finish")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut sums).arg(&part).arg(&k);
    // SAFETY: sums holds 4 doubles, part chunks * 4; types match.
    unsafe { l.launch(cfg1d(1)) }.map_err(launch_err("loss_finish launch"))?;
    Ok(sums)
}

/// The loss's gradient with respect to the logits, times `scale[0]` (the
/// gradient arriving at the loss), from the sums of `loss_sums`.
pub fn loss_grad(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    y: &CudaSlice<f32>,
    sums: &CudaSlice<f64>,
    scale: &CudaSlice<f32>,
    dice_weight: f64,
) -> Result<CudaSlice<f32>> {
    let n = x.len();
    if y.len() != n || sums.len() != 4 || scale.is_empty() {
        return Err(Error::shape(
            "focal_dice backward (cuda)",
            format!("logits {n}, labels {}, sums {}", y.len(), sums.len()),
        ));
    }
    let mut g = dev.alloc(n)?;
    let nn = n as i64;
    let f = dev.function("loss", "loss_grad")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut g)
        .arg(x)
        .arg(y)
        .arg(sums)
        .arg(scale)
        .arg(&nn)
        .arg(&dice_weight);
    // SAFETY: g, x, y hold n floats, sums 4 doubles, scale at least one
    // float; types match (float*, const float* x2, const double*, const
    // float*, long long, double).
    unsafe { l.launch(cfg1d(n)) }.map_err(launch_err("loss_grad launch"))?;
    Ok(g)
}
