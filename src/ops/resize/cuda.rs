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

/// Reverse taps as CSR tables on the device: (offsets [inp + 1], output
/// indices, weights), from the CPU's table.
fn csr(
    dev: &CudaDevice,
    taps: &[Vec<(usize, f32)>],
) -> Result<(CudaSlice<i32>, CudaSlice<i32>, CudaSlice<f32>)> {
    let mut off = Vec::with_capacity(taps.len() + 1);
    let (mut idx, mut wt) = (vec![], vec![]);
    off.push(0i32);
    for t in taps {
        for &(o, w) in t {
            idx.push(o as i32);
            wt.push(w);
        }
        off.push(idx.len() as i32);
    }
    let up = |v: &[i32]| {
        dev.stream()
            .clone_htod(v)
            .map_err(crate::cuda::alloc_err("copy to device", v.len() * 4))
    };
    Ok((up(&off)?, up(&idx)?, dev.upload(&wt)?))
}

/// bilinear's backward: g [planes, oh, ow] -> dx [planes, h, w], two gather
/// passes (columns, then rows) in the CPU twin's order.
#[allow(clippy::too_many_arguments)]
pub fn bilinear_backward(
    dev: &CudaDevice,
    g: &CudaSlice<f32>,
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Result<CudaSlice<f32>> {
    if g.len() != planes * oh * ow || h == 0 || w == 0 {
        return Err(Error::shape(
            "bilinear backward (cuda)",
            format!("gradient of {} values for {planes} x {oh} x {ow}", g.len()),
        ));
    }
    let (ox, ix, wx) = csr(dev, &super::cpu::reverse_taps(w, ow))?;
    let (oy, iy, wy) = csr(dev, &super::cpu::reverse_taps(h, oh))?;
    let mut tmp = dev.alloc(planes * oh * w)?;
    let mut dx = dev.alloc(planes * h * w)?;
    let (pl, hh, ohh, oww, ww) = (planes as i64, h as i32, oh as i32, ow as i32, w as i32);
    let f = dev.function("resize", "bilinear_backward_cols")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut tmp)
        .arg(g)
        .arg(&ox)
        .arg(&ix)
        .arg(&wx)
        .arg(&pl)
        .arg(&ohh)
        .arg(&oww)
        .arg(&ww);
    // SAFETY: tmp holds planes oh w floats, g planes oh ow; the tables index
    // output columns < ow for w input columns; types match.
    unsafe { l.launch(cfg1d(planes * oh * w)) }
        .map_err(launch_err("bilinear_backward_cols launch"))?;
    let f = dev.function("resize", "bilinear_backward_rows")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut dx)
        .arg(&tmp)
        .arg(&oy)
        .arg(&iy)
        .arg(&wy)
        .arg(&pl)
        .arg(&hh)
        .arg(&ohh)
        .arg(&ww);
    // SAFETY: dx holds planes h w floats, tmp planes oh w; the tables index
    // output rows < oh for h input rows; types match.
    unsafe { l.launch(cfg1d(planes * h * w)) }
        .map_err(launch_err("bilinear_backward_rows launch"))?;
    Ok(dx)
}
