use rayon::prelude::*;

use crate::ops::activation::{apply_act_seq, Act};

/// x [rows, c] -> [rows, c].
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], c: usize, eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(c.max(1)).zip(x.par_chunks(c.max(1))).for_each(|(o, xr)| {
        let mean = (xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64) as f32;
        let var = xr.iter().map(|&v| ((v - mean) as f64).powi(2)).sum::<f64>() / c as f64;
        let rstd = (1.0 / (var + eps as f64).sqrt()) as f32;
        for i in 0..c {
            o[i] = (xr[i] - mean) * rstd * w[i] + b[i];
        }
    });
    out
}

/// x [n, c, p] (p pixels) normalised over c at each pixel; parallel over images
/// and blocks of 64 pixels so the inner loops run along contiguous pixels.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm2d(x: &[f32], w: &[f32], b: &[f32], n: usize, c: usize, p: usize, eps: f32, act: Act) -> Vec<f32> {
    const BLK: usize = 64;
    let mut out = vec![0.0f32; x.len()];
    let nblk = p.div_ceil(BLK);
    // Each task owns one (image, pixel block); outputs are written through raw
    // offsets into disjoint columns, so collect per task and scatter afterwards.
    let results: Vec<(usize, usize, Vec<f32>)> = (0..n * nblk)
        .into_par_iter()
        .map(|t| {
            let (img, blk) = (t / nblk, t % nblk);
            let p0 = blk * BLK;
            let len = BLK.min(p - p0);
            let base = img * c * p;
            let mut mean = vec![0.0f64; len];
            for ch in 0..c {
                let row = &x[base + ch * p + p0..base + ch * p + p0 + len];
                for (m, &v) in mean.iter_mut().zip(row) {
                    *m += v as f64;
                }
            }
            let mean: Vec<f32> = mean.iter().map(|m| (m / c as f64) as f32).collect();
            let mut var = vec![0.0f64; len];
            for ch in 0..c {
                let row = &x[base + ch * p + p0..base + ch * p + p0 + len];
                for ((s, &v), &m) in var.iter_mut().zip(row).zip(&mean) {
                    *s += ((v - m) as f64).powi(2);
                }
            }
            let rstd: Vec<f32> = var.iter().map(|s| (1.0 / (s / c as f64 + eps as f64).sqrt()) as f32).collect();
            let mut blk_out = vec![0.0f32; c * len];
            for ch in 0..c {
                let row = &x[base + ch * p + p0..base + ch * p + p0 + len];
                let o = &mut blk_out[ch * len..(ch + 1) * len];
                for i in 0..len {
                    o[i] = (row[i] - mean[i]) * rstd[i] * w[ch] + b[ch];
                }
                apply_act_seq(o, act);
            }
            (img, p0, blk_out)
        })
        .collect();
    for (img, p0, blk) in results {
        let len = blk.len() / c.max(1);
        for ch in 0..c {
            let dst = img * c * p + ch * p + p0;
            out[dst..dst + len].copy_from_slice(&blk[ch * len..(ch + 1) * len]);
        }
    }
    out
}
