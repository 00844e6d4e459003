//! CUDA twins of the layout changes (cuda/layout.cu).

use cudarc::driver::PushKernelArg;

use crate::cuda::{CudaDevice, GpuIn, GpuTensor, cfg1d, launch_err};
use crate::error::{Error, Result};

fn run(
    dev: &CudaDevice,
    x: &impl GpuIn,
    name: &'static str,
    b: usize,
    c: usize,
    p: usize,
    dims: Vec<usize>,
) -> Result<GpuTensor> {
    let mut y = dev.alloc(x.numel())?;
    let f = dev.function("layout", name)?;
    let (bb, cc, pp) = (b as i32, c as i32, p as i64);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut y).arg(x.data()).arg(&bb).arg(&cc).arg(&pp);
    // SAFETY: x and y hold b * c * p floats; types match the kernel.
    unsafe { l.launch(cfg1d(b * c * p)) }.map_err(launch_err("layout launch"))?;
    Ok(GpuTensor { data: y, dims })
}

/// [B, C, H, W] -> [B, H, W, C]
pub fn nchw_to_nhwc(dev: &CudaDevice, x: &impl GpuIn) -> Result<GpuTensor> {
    let [b, c, h, w]: [usize; 4] = x
        .dims()
        .try_into()
        .map_err(|_| Error::shape("nchw_to_nhwc (cuda)", format!("{:?}", x.dims())))?;
    run(dev, x, "nchw_to_nhwc_f32", b, c, h * w, vec![b, h, w, c])
}

/// [B, H, W, C] -> [B, C, H, W]
pub fn nhwc_to_nchw(dev: &CudaDevice, x: &impl GpuIn) -> Result<GpuTensor> {
    let [b, h, w, c]: [usize; 4] = x
        .dims()
        .try_into()
        .map_err(|_| Error::shape("nhwc_to_nchw (cuda)", format!("{:?}", x.dims())))?;
    run(dev, x, "nhwc_to_nchw_f32", b, c, h * w, vec![b, c, h, w])
}

/// x (len values) repeated n times: [n, len], given `dims` (product n * len).
pub fn repeat(
    dev: &CudaDevice,
    x: &cudarc::driver::CudaSlice<f32>,
    n: usize,
    dims: Vec<usize>,
) -> Result<GpuTensor> {
    let len = x.len();
    if n == 0 || len == 0 || dims.iter().product::<usize>() != n * len {
        return Err(Error::shape(
            "repeat (cuda)",
            format!("{len} values x {n} as {dims:?}"),
        ));
    }
    let mut y = dev.alloc(n * len)?;
    let f = dev.function("layout", "repeat_f32")?;
    let (l64, n64) = (len as i64, n as i64);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut y).arg(x).arg(&l64).arg(&n64);
    // SAFETY: x holds len floats, y n * len; types match the kernel.
    unsafe { l.launch(cfg1d(n * len)) }.map_err(launch_err("repeat launch"))?;
    Ok(GpuTensor { data: y, dims })
}
