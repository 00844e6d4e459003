//! CUDA twin of sum_rows (cuda/reduce.cu).

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

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

/// The chunks' sums of squares of x on the host (SQ_CHUNK values per
/// chunk, one 256-thread block each: cuda/reduce.cu sumsq_chunks),
/// bit-exact with `super::sum_squares_cpu`.
pub fn sum_squares_chunks(dev: &CudaDevice, x: &CudaView<'_, f32>) -> Result<Vec<f64>> {
    let n = x.len();
    if n == 0 {
        return Ok(vec![]);
    }
    let chunks = n.div_ceil(super::SQ_CHUNK);
    let mut part = dev.alloc_f64(chunks)?;
    let (nn, ch) = (n as i64, super::SQ_CHUNK as i32);
    let f = dev.function("reduce", "sumsq_chunks")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut part).arg(x).arg(&nn).arg(&ch);
    let cfg = LaunchConfig {
        grid_dim: (chunks.min(65_535) as u32, 1, 1),
        block_dim: (super::SQ_LANES as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: part holds `chunks` doubles, x n floats; one block of
    // SQ_LANES threads per chunk (grid-stride past 65 535); types match
    // (double*, const float*, long long, int).
    unsafe { l.launch(cfg) }.map_err(launch_err("sumsq_chunks launch"))?;
    dev.stream()
        .clone_dtoh(&part)
        .map_err(crate::cuda::driver_err("copy to host"))
}
