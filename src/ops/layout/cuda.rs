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

/// Rows [x0, x0 + rows) of each of n items of x (item stride xs, 0: one x
/// shared by all) into rows [y0, y0 + rows) of each item of y (stride ys),
/// rows of c floats.
#[allow(clippy::too_many_arguments)]
pub fn copy_rows(
    dev: &CudaDevice,
    y: &mut cudarc::driver::CudaSlice<f32>,
    x: &cudarc::driver::CudaSlice<f32>,
    n: usize,
    rows: usize,
    c: usize,
    (xs, x0): (usize, usize),
    (ys, y0): (usize, usize),
) -> Result<()> {
    let last = |stride: usize, start: usize| (n.max(1) - 1) * stride + (start + rows) * c;
    if n * rows * c == 0 {
        return Ok(());
    }
    if last(xs, x0) > x.len() || last(ys, y0) > y.len() {
        return Err(Error::shape(
            "copy_rows (cuda)",
            format!(
                "{n} x {rows} rows of {c} from {} values (stride {xs}, row {x0}) into {} (stride {ys}, row {y0})",
                x.len(),
                y.len()
            ),
        ));
    }
    let f = dev.function("layout", "copy_rows_f32")?;
    let (n64, r32, c32) = (n as i64, rows as i32, c as i32);
    let (xs64, x032, ys64, y032) = (xs as i64, x0 as i32, ys as i64, y0 as i32);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y)
        .arg(x)
        .arg(&n64)
        .arg(&r32)
        .arg(&c32)
        .arg(&xs64)
        .arg(&x032)
        .arg(&ys64)
        .arg(&y032);
    // SAFETY: every index the kernel forms is below last(xs, x0) <= x.len() and
    // last(ys, y0) <= y.len() (checked above); argument types match the kernel.
    unsafe { l.launch(cfg1d(n * rows * c)) }.map_err(launch_err("copy_rows launch"))?;
    Ok(())
}
