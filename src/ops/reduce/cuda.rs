//! CUDA twin of sum_rows (cuda/reduce.cu).

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::cuda::{CudaDevice, cfg1d, launch_err};
use crate::error::{Error, Result};

/// x [rows, cols] -> [cols], two launches (chunk partials in f64, then their
/// ordered sum), bit-exact with `super::sum_rows_cpu`.
pub fn sum_rows(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
) -> Result<CudaSlice<f32>> {
    if cols == 0 || x.len() != rows * cols {
        return Err(Error::shape(
            "sum_rows (cuda)",
            format!("{} values as {rows} rows of {cols}", x.len()),
        ));
    }
    if rows == 0 {
        return dev.alloc_zeros(cols);
    }
    let chunks = rows.div_ceil(super::CHUNK);
    let mut part = dev.alloc_f64(chunks * cols)?;
    let mut out = dev.alloc(cols)?;
    let (r, c, ch, k) = (rows as i64, cols as i32, super::CHUNK as i32, chunks as i64);
    let f = dev.function("reduce", "sum_rows_partial")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut part).arg(x).arg(&r).arg(&c).arg(&ch);
    // SAFETY: part holds chunks * cols doubles, x rows * cols floats (checked);
    // types match (double*, const float*, long long, int, int).
    unsafe { l.launch(cfg1d(chunks * cols)) }.map_err(launch_err("sum_rows_partial launch"))?;
    let f = dev.function("reduce", "sum_rows_finish")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut out).arg(&part).arg(&k).arg(&c);
    // SAFETY: out holds cols floats, part chunks * cols doubles; types match
    // (float*, const double*, long long, int).
    unsafe { l.launch(cfg1d(cols)) }.map_err(launch_err("sum_rows_finish launch"))?;
    Ok(out)
}
