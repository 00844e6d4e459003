//! CUDA twin of the bilinear resize (cuda/resize.cu) and the mask
//! post-processing built on it.

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::cuda::{CudaDevice, GpuTensor, cfg1d, launch_err};
use crate::error::{Error, Result};

/// The top-left h x w of every plane of x ([planes, ph, pw]) resized to
/// oh x ow: [planes, oh, ow]. h = ph, w = pw resizes whole planes.
#[allow(clippy::too_many_arguments)]
pub fn bilinear_crop(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    planes: usize,
    ph: usize,
    pw: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Result<CudaSlice<f32>> {
    const OP: &str = "bilinear (cuda)";
    if x.len() != planes * ph * pw || h == 0 || w == 0 || h > ph || w > pw || oh == 0 || ow == 0 {
        return Err(Error::shape(
            OP,
            format!(
                "cannot resize the {h} x {w} corner of {} values as [{planes}, {ph}, {pw}] to {oh} x {ow}",
                x.len()
            ),
        ));
    }
    let mut y = dev.alloc(planes * oh * ow)?;
    let f = dev.function("resize", "bilinear_f32")?;
    let (pl, hh, ww, ld, ps, ohh, oww) = (
        planes as i64,
        h as i32,
        w as i32,
        pw as i32,
        (ph * pw) as i64,
        oh as i32,
        ow as i32,
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut y)
        .arg(x)
        .arg(&pl)
        .arg(&hh)
        .arg(&ww)
        .arg(&ld)
        .arg(&ps)
        .arg(&ohh)
        .arg(&oww);
    // SAFETY: x holds planes * ph * pw floats and the kernel reads rows < h <= ph,
    // columns < w <= pw of each plane; y holds planes * oh * ow; types match.
    unsafe { l.launch(cfg1d(planes * oh * ow)) }.map_err(launch_err("bilinear launch"))?;
    Ok(y)
}

/// The CUDA twin of model::sam_unet::postprocess: low-res logits [N, 1, g, g]
/// -> bilinear to s x s -> crop to the resized image (new_h x new_w) ->
/// bilinear to the original size: [N, 1, orig_h, orig_w].
pub fn postprocess(
    dev: &CudaDevice,
    low: &GpuTensor,
    info: &crate::preprocess::ResizeInfo,
    s: usize,
) -> Result<GpuTensor> {
    let [n, one, g, g2]: [usize; 4] = low
        .dims
        .as_slice()
        .try_into()
        .map_err(|_| Error::shape("postprocess (cuda)", format!("logits {:?}", low.dims)))?;
    if one != 1 || info.new_h > s || info.new_w > s {
        return Err(Error::shape(
            "postprocess (cuda)",
            format!(
                "logits {:?}, resized image {} x {} in {s}",
                low.dims, info.new_h, info.new_w
            ),
        ));
    }
    let up = bilinear_crop(dev, &low.data, n, g, g2, g, g2, s, s)?;
    let out = bilinear_crop(
        dev,
        &up,
        n,
        s,
        s,
        info.new_h,
        info.new_w,
        info.orig_h,
        info.orig_w,
    )?;
    Ok(GpuTensor {
        data: out,
        dims: vec![n, 1, info.orig_h, info.orig_w],
    })
}
