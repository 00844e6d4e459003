//! Deterministic sums over rows: x [rows, cols] -> [cols] (bias gradients, the
//! gradient of an operand broadcast over a batch). Rows in fixed chunks of
//! `CHUNK`, each summed in order in f64, the chunk sums added in order in f64:
//! the same bits on the CPU and in cuda/reduce.cu, whatever the thread count
//! or launch geometry (no atomics).

pub mod cuda;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ops::{cpu_f32, cuda_input};
use crate::tensor::{Device, Tensor};

/// Rows per first-stage partial sum.
pub const CHUNK: usize = 256;

/// x viewed as [rows, cols] (cols = its last `cols` values per row) summed
/// over the rows: [cols], on x's device.
pub fn sum_rows(x: &Tensor, cols: usize) -> Result<Tensor> {
    const OP: &str = "sum_rows";
    if cols == 0 || x.numel() % cols != 0 {
        return Err(Error::shape(
            OP,
            format!("{:?} cannot be seen as rows of {cols}", x.dims()),
        ));
    }
    let rows = x.numel() / cols;
    if let Device::Cuda(_) = x.device() {
        let xc = cuda_input(OP, x)?;
        let (dev, xs) = xc.cuda_whole_f32(OP)?;
        let y = cuda::sum_rows(dev, xs, rows, cols)?;
        return Tensor::from_cuda_f32(dev, y, [cols]);
    }
    Ok(Tensor::from_f32(
        sum_rows_cpu(cpu_f32(OP, x)?, rows, cols),
        &[cols],
    ))
}

/// Values per chunk of `sum_squares` (one CUDA block each).
pub const SQ_CHUNK: usize = 1 << 16;
/// Interleaved partial sums per chunk (the CUDA block's threads).
pub const SQ_LANES: usize = 256;

/// The sum of the squares of x's values over the flat ranges [a, b) of
/// `ranges`, in f64 (a gradient norm): each range in chunks of SQ_CHUNK,
/// each chunk in SQ_LANES interleaved lanes added in order, the chunks' and
/// then the ranges' sums added in order; the same bits on both devices
/// (cuda/reduce.cu sumsq_chunks, whose chunk sums come to the host: one
/// small copy instead of the values).
pub fn sum_squares(x: &Tensor, ranges: &[(usize, usize)]) -> Result<f64> {
    const OP: &str = "sum_squares";
    let n = x.numel();
    if let Some(&(a, b)) = ranges.iter().find(|&&(a, b)| a > b || b > n) {
        return Err(Error::shape(
            OP,
            format!("range {a}..{b} of {:?}", x.dims()),
        ));
    }
    let mut total = 0.0f64;
    match x.device() {
        Device::Cuda(_) => {
            let xc = x.cuda_f32(OP)?;
            let dev = x.cuda_device().expect("a CUDA tensor").clone();
            for &(a, b) in ranges {
                let parts = cuda::sum_squares_chunks(&dev, &xc.slice(a..b))?;
                total += parts.iter().sum::<f64>();
            }
        }
        Device::Cpu => {
            let xs = cpu_f32(OP, x)?;
            for &(a, b) in ranges {
                total += sum_squares_cpu(&xs[a..b]).iter().sum::<f64>();
            }
        }
    }
    Ok(total)
}

/// The chunks' sums of squares of x (SQ_CHUNK values each, lanes in order).
pub fn sum_squares_cpu(x: &[f32]) -> Vec<f64> {
    x.par_chunks(SQ_CHUNK)
        .map(|c| {
            let mut lanes = [0.0f64; SQ_LANES];
            let it = c.chunks_exact(SQ_LANES);
            let rest = it.remainder();
            for row in it {
                for (l, &v) in lanes.iter_mut().zip(row) {
                    *l += v as f64 * v as f64;
                }
            }
            for (l, &v) in lanes.iter_mut().zip(rest) {
                *l += v as f64 * v as f64;
            }
            lanes.iter().fold(0.0f64, |s, &v| s + v)
        })
        .collect()
}

/// The CPU twin over a slice [rows, cols].
pub fn sum_rows_cpu(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let chunks = rows.div_ceil(CHUNK);
    let parts: Vec<Vec<f64>> = (0..chunks)
        .into_par_iter()
        .map(|k| {
            let mut acc = vec![0.0f64; cols];
            for r in k * CHUNK..((k + 1) * CHUNK).min(rows) {
                for (a, &v) in acc.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
                    *a += v as f64;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0.0f64; cols];
    for p in &parts {
        for (o, &v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}
