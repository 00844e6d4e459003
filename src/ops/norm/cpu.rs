use rayon::prelude::*;

use crate::cpu::multiversion;
use crate::ops::activation::{Act, apply_act_seq};

multiversion! {
    /// One row: statistics in f64 (4 lanes), the affine map in f32.
    fn layer_norm_row(xr: &[f32], o: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
        let c = xr.len();
        let mut s4 = [0.0f64; 4];
        let mut ch = xr.chunks_exact(4);
        for q in &mut ch {
            for i in 0..4 {
                s4[i] += q[i] as f64;
            }
        }
        let sum = s4.iter().sum::<f64>() + ch.remainder().iter().map(|&v| v as f64).sum::<f64>();
        let mean = (sum / c as f64) as f32;
        let mut v4 = [0.0f64; 4];
        let mut ch = xr.chunks_exact(4);
        for q in &mut ch {
            for i in 0..4 {
                let d = (q[i] - mean) as f64;
                v4[i] += d * d;
            }
        }
        let var = (v4.iter().sum::<f64>() + ch.remainder().iter().map(|&v| ((v - mean) as f64).powi(2)).sum::<f64>()) / c as f64;
        let rstd = (1.0 / (var + eps as f64).sqrt()) as f32;
        for i in 0..c {
            o[i] = (xr[i] - mean) * rstd * w[i] + b[i];
        }
    }
}

/// x [rows, c] -> [rows, c].
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], c: usize, eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(c.max(1))
        .zip(x.par_chunks(c.max(1)))
        .for_each(|(o, xr)| layer_norm_row(xr, o, w, b, eps));
    out
}

multiversion! {
    /// Per-pixel mean and 1/std over `c` channels for the pixels [p0, p0 + len)
    /// of one image x [c, p]; the loops run along contiguous pixels.
    fn ln2d_stats(x: &[f32], c: usize, p: usize, p0: usize, mean: &mut [f32], rstd: &mut [f32], eps: f32) {
        let len = mean.len();
        let mut acc = [0.0f64; 64];
        let acc = &mut acc[..len];
        for ch in 0..c {
            let row = &x[ch * p + p0..ch * p + p0 + len];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        for (m, a) in mean.iter_mut().zip(acc.iter_mut()) {
            *m = (*a / c as f64) as f32;
            *a = 0.0;
        }
        for ch in 0..c {
            let row = &x[ch * p + p0..ch * p + p0 + len];
            for ((a, &v), &m) in acc.iter_mut().zip(row).zip(mean.iter()) {
                let d = (v - m) as f64;
                *a += d * d;
            }
        }
        for (r, a) in rstd.iter_mut().zip(acc.iter()) {
            *r = (1.0 / (*a / c as f64 + eps as f64).sqrt()) as f32;
        }
    }
}

multiversion! {
    fn ln2d_apply(x: &[f32], o: &mut [f32], mean: &[f32], rstd: &[f32], w: f32, b: f32) {
        for i in 0..o.len() {
            o[i] = (x[i] - mean[i]) * rstd[i] * w + b;
        }
    }
}

/// x [n, c, p] (p pixels) normalised over c at each pixel, then act.
/// Two parallel passes: statistics per block of 64 pixels, then the affine map
/// (and activation) per channel row.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm2d(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    c: usize,
    p: usize,
    eps: f32,
    act: Act,
) -> Vec<f32> {
    const BLK: usize = 64;
    let mut mean = vec![0.0f32; n * p];
    let mut rstd = vec![0.0f32; n * p];
    mean.par_chunks_mut(BLK)
        .zip(rstd.par_chunks_mut(BLK))
        .enumerate()
        .for_each(|(t, (m, r))| {
            // Blocks never straddle images: p is a multiple of 64 in SAM-UNet, and
            // otherwise the block is split at the image boundary below.
            let start = t * BLK;
            let (img, p0) = (start / p, start % p);
            let first = m.len().min(p - p0);
            ln2d_stats(
                &x[img * c * p..(img + 1) * c * p],
                c,
                p,
                p0,
                &mut m[..first],
                &mut r[..first],
                eps,
            );
            if first < m.len() {
                let img2 = img + 1;
                ln2d_stats(
                    &x[img2 * c * p..(img2 + 1) * c * p],
                    c,
                    p,
                    0,
                    &mut m[first..],
                    &mut r[first..],
                    eps,
                );
            }
        });
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(p).enumerate().for_each(|(row, o)| {
        let (img, ch) = (row / c, row % c);
        ln2d_apply(
            &x[row * p..(row + 1) * p],
            o,
            &mean[img * p..(img + 1) * p],
            &rstd[img * p..(img + 1) * p],
            w[ch],
            b[ch],
        );
        apply_act_seq(o, act);
    });
    out
}

/// Where the groups of a layer norm lie: `groups` groups of `c` values,
/// value ch of group j at base(j) + ch * stride.
#[derive(Clone, Copy)]
pub struct NormGroups {
    pub groups: usize,
    pub c: usize,
    /// Channel stride (1: the last dim; p: LayerNorm2d over NCHW).
    pub stride: usize,
    /// Pixels per image for LayerNorm2d (groups j = image * p + pixel); 0 for
    /// the last-dim form (groups j = row).
    pub p: usize,
}

impl NormGroups {
    fn base(&self, j: usize) -> usize {
        match j.checked_div(self.p) {
            None => j * self.c,
            Some(img) => img * self.c * self.p + j % self.p,
        }
    }
}

/// LayerNorm backward: (dx, dw, db) for y = (x - mean) rstd w + b over each
/// group, in f64: dx = rstd (gw - mean(gw) - xhat mean(gw xhat)) with
/// gw = g w; dw = sum g xhat, db = sum g over the groups. The groups are cut
/// into fixed chunks whose partial sums add up in chunk order, so the result
/// does not depend on the number of threads.
pub fn layer_norm_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    geo: NormGroups,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    if geo.p > 0 && geo.stride == geo.p {
        return layer_norm2d_backward(x, w, g, geo, eps);
    }
    if geo.p == 0 && geo.stride == 1 && geo.c > 0 && x.len() == geo.groups * geo.c {
        return layer_norm_backward_rows(x, w, g, geo.c, eps);
    }
    layer_norm_backward_groups(x, w, g, geo, eps)
}

multiversion! {
    /// layer_norm_backward for one contiguous row: the same f64 formulas as
    /// `layer_norm_backward_groups`, with every sum over the row kept in 8
    /// lanes (combined in lane order) so that the loops vectorise: a single
    /// f64 chain waits ~4 cycles per add, and this backward ran at 1/4 of
    /// PyTorch's speed. dw and db (f64, per channel) are accumulated.
    fn layer_norm_bw_row(
        xr: &[f32],
        gr: &[f32],
        w: &[f32],
        eps: f32,
        dxr: &mut [f32],
        acc: (&mut [f64], &mut [f64], &mut [f64]),
    ) {
        let (dw, db, xhat) = acc;
        const L: usize = 8;
        let c = xr.len();
        let lanes = |v: [f64; L], tail: f64| v.iter().sum::<f64>() + tail;
        let mut s = [0.0f64; L];
        let mut it = xr.chunks_exact(L);
        for q in &mut it {
            for i in 0..L {
                s[i] += q[i] as f64;
            }
        }
        let mean = lanes(s, it.remainder().iter().map(|&v| v as f64).sum()) / c as f64;
        let mut s = [0.0f64; L];
        let mut it = xr.chunks_exact(L);
        for q in &mut it {
            for i in 0..L {
                let d = q[i] as f64 - mean;
                s[i] += d * d;
            }
        }
        let tail = it.remainder().iter().map(|&v| (v as f64 - mean).powi(2)).sum();
        let var = lanes(s, tail) / c as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        let (mut sgw, mut sgwx) = ([0.0f64; L], [0.0f64; L]);
        let full = c / L * L;
        for k in (0..full).step_by(L) {
            let (xq, gq, wq) = (&xr[k..k + L], &gr[k..k + L], &w[k..k + L]);
            let (hq, dwq, dbq) = (&mut xhat[k..k + L], &mut dw[k..k + L], &mut db[k..k + L]);
            for i in 0..L {
                let h = (xq[i] as f64 - mean) * rstd;
                let gv = gq[i] as f64;
                let gw = gv * wq[i] as f64;
                hq[i] = h;
                sgw[i] += gw;
                sgwx[i] += gw * h;
                dwq[i] += gv * h;
                dbq[i] += gv;
            }
        }
        let (mut tgw, mut tgwx) = (0.0f64, 0.0f64);
        for k in full..c {
            let h = (xr[k] as f64 - mean) * rstd;
            let gv = gr[k] as f64;
            let gw = gv * w[k] as f64;
            xhat[k] = h;
            tgw += gw;
            tgwx += gw * h;
            dw[k] += gv * h;
            db[k] += gv;
        }
        let m_gw = lanes(sgw, tgw) / c as f64;
        let m_gwx = lanes(sgwx, tgwx) / c as f64;
        for k in 0..c {
            let gw = gr[k] as f64 * w[k] as f64;
            dxr[k] = (rstd * (gw - m_gw - xhat[k] * m_gwx)) as f32;
        }
    }
}

/// layer_norm_backward over contiguous rows (the last-dim form): chunks of
/// `CH` rows in parallel, each row by `layer_norm_bw_row`, dx written in
/// place, the chunks' dw / db partial sums added in chunk order.
fn layer_norm_backward_rows(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    c: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    const CH: usize = 256;
    let mut dx = vec![0.0f32; x.len()];
    let partial: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(CH * c)
        .enumerate()
        .map(|(t, dxc)| {
            let (mut dw, mut db, mut xhat) = (vec![0.0f64; c], vec![0.0f64; c], vec![0.0f64; c]);
            let off = t * CH * c;
            for (r, dxr) in dxc.chunks_exact_mut(c).enumerate() {
                let at = off + r * c;
                layer_norm_bw_row(
                    &x[at..at + c],
                    &g[at..at + c],
                    w,
                    eps,
                    dxr,
                    (&mut dw, &mut db, &mut xhat),
                );
            }
            (dw, db)
        })
        .collect();
    let (mut dw, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
    for (cdw, cdb) in partial {
        dw.iter_mut().zip(cdw).for_each(|(a, v)| *a += v);
        db.iter_mut().zip(cdb).for_each(|(a, v)| *a += v);
    }
    let f = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (dx, f(dw), f(db))
}

/// layer_norm_backward one group at a time (any layout).
fn layer_norm_backward_groups(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    geo: NormGroups,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    const CH: usize = 256;
    let c = geo.c;
    let chunks: Vec<(Vec<f32>, Vec<f64>, Vec<f64>)> = (0..geo.groups.div_ceil(CH))
        .into_par_iter()
        .map(|t| {
            let (j0, j1) = (t * CH, ((t + 1) * CH).min(geo.groups));
            let mut dx = vec![0.0f32; (j1 - j0) * c];
            let (mut dw, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
            let mut xhat = vec![0.0f64; c];
            for j in j0..j1 {
                let base = geo.base(j);
                let at = |ch: usize| base + ch * geo.stride;
                let mean = (0..c).map(|ch| x[at(ch)] as f64).sum::<f64>() / c as f64;
                let var = (0..c)
                    .map(|ch| (x[at(ch)] as f64 - mean).powi(2))
                    .sum::<f64>()
                    / c as f64;
                let rstd = 1.0 / (var + eps as f64).sqrt();
                let (mut m_gw, mut m_gwx) = (0.0f64, 0.0f64);
                for ch in 0..c {
                    xhat[ch] = (x[at(ch)] as f64 - mean) * rstd;
                    let gv = g[at(ch)] as f64;
                    let gw = gv * w[ch] as f64;
                    m_gw += gw;
                    m_gwx += gw * xhat[ch];
                    dw[ch] += gv * xhat[ch];
                    db[ch] += gv;
                }
                m_gw /= c as f64;
                m_gwx /= c as f64;
                let row = &mut dx[(j - j0) * c..(j - j0 + 1) * c];
                for ch in 0..c {
                    let gw = g[at(ch)] as f64 * w[ch] as f64;
                    row[ch] = (rstd * (gw - m_gw - xhat[ch] * m_gwx)) as f32;
                }
            }
            (dx, dw, db)
        })
        .collect();
    let mut dx = vec![0.0f32; x.len()];
    let (mut dw, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
    for (t, (cdx, cdw, cdb)) in chunks.into_iter().enumerate() {
        for (i, row) in cdx.chunks_exact(c.max(1)).enumerate() {
            let base = geo.base(t * CH + i);
            for (ch, &v) in row.iter().enumerate() {
                dx[base + ch * geo.stride] = v;
            }
        }
        dw.iter_mut().zip(cdw).for_each(|(a, v)| *a += v);
        db.iter_mut().zip(cdb).for_each(|(a, v)| *a += v);
    }
    let f = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (dx, f(dw), f(db))
}

/// layer_norm_backward over NCHW (LayerNorm2d: a group is a pixel, its
/// values a plane apart): the same f64 sums per pixel, channels in order,
/// but computed for a block of neighbouring pixels at once so that every
/// pass reads rows of a plane (vectorised, cache-friendly) instead of one
/// value per plane. Blocks of up to 256 pixels within one image; their dw /
/// db partial sums add up in block order (independent of the thread count).
fn layer_norm2d_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    geo: NormGroups,
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    const CH: usize = 256;
    let (c, p) = (geo.c, geo.p);
    let n = geo.groups / p.max(1);
    let per_img = p.div_ceil(CH);
    // Block t: image t / per_img, pixels [q0, q1); its dx as [c, q1 - q0].
    let blocks: Vec<(Vec<f32>, Vec<f64>, Vec<f64>)> = (0..n * per_img)
        .into_par_iter()
        .map(|t| {
            let (img, q0) = (t / per_img, (t % per_img) * CH);
            let len = CH.min(p - q0);
            let at = |ch: usize| img * c * p + ch * p + q0;
            let (mut dw, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
            let mut mean = vec![0.0f64; len];
            for ch in 0..c {
                let xs = &x[at(ch)..at(ch) + len];
                mean.iter_mut().zip(xs).for_each(|(m, &v)| *m += v as f64);
            }
            mean.iter_mut().for_each(|m| *m /= c as f64);
            let mut var = vec![0.0f64; len];
            for ch in 0..c {
                let xs = &x[at(ch)..at(ch) + len];
                for ((v, &xv), &m) in var.iter_mut().zip(xs).zip(&mean) {
                    *v += (xv as f64 - m).powi(2);
                }
            }
            let rstd: Vec<f64> = var
                .iter()
                .map(|v| 1.0 / (v / c as f64 + eps as f64).sqrt())
                .collect();
            let (mut m_gw, mut m_gwx) = (vec![0.0f64; len], vec![0.0f64; len]);
            for ch in 0..c {
                let (xs, gs) = (&x[at(ch)..at(ch) + len], &g[at(ch)..at(ch) + len]);
                let wc = w[ch] as f64;
                let (mut sw, mut sb) = (dw[ch], db[ch]);
                for k in 0..len {
                    let xhat = (xs[k] as f64 - mean[k]) * rstd[k];
                    let gv = gs[k] as f64;
                    let gw = gv * wc;
                    m_gw[k] += gw;
                    m_gwx[k] += gw * xhat;
                    sw += gv * xhat;
                    sb += gv;
                }
                (dw[ch], db[ch]) = (sw, sb);
            }
            let mut dx = vec![0.0f32; c * len];
            for ch in 0..c {
                let (xs, gs) = (&x[at(ch)..at(ch) + len], &g[at(ch)..at(ch) + len]);
                let wc = w[ch] as f64;
                for (k, o) in dx[ch * len..(ch + 1) * len].iter_mut().enumerate() {
                    let xhat = (xs[k] as f64 - mean[k]) * rstd[k];
                    let gw = gs[k] as f64 * wc;
                    *o =
                        (rstd[k] * (gw - m_gw[k] / c as f64 - xhat * (m_gwx[k] / c as f64))) as f32;
                }
            }
            (dx, dw, db)
        })
        .collect();
    // Each plane (image, channel) gathers its rows from its image's blocks.
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(p.max(1))
        .enumerate()
        .for_each(|(r, plane)| {
            let (img, ch) = (r / c.max(1), r % c.max(1));
            for b in 0..per_img {
                let q0 = b * CH;
                let len = CH.min(p - q0);
                let src = &blocks[img * per_img + b].0;
                plane[q0..q0 + len].copy_from_slice(&src[ch * len..(ch + 1) * len]);
            }
        });
    let (mut dw, mut db) = (vec![0.0f64; c], vec![0.0f64; c]);
    for (_, cdw, cdb) in &blocks {
        dw.iter_mut().zip(cdw).for_each(|(a, v)| *a += v);
        db.iter_mut().zip(cdb).for_each(|(a, v)| *a += v);
    }
    let f = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    (dx, f(dw), f(db))
}

/// Lanes of a BatchNorm plane's sums (cuda/norm.cu BN_LANES: one per thread
/// of the CUDA block).
pub const BN_LANES: usize = 256;

/// The sums of a BatchNorm plane, in the order both devices take
/// (cuda/norm.cu's `bn_lanes_total`): 256 interleaved f64 partial sums
/// (element q into lane q mod 256: independent chains here, one per thread
/// there), then the lanes added in order. Returns the sums of f and of h
/// over the plane.
#[inline(always)]
fn lane_sums2(
    a: &[f32],
    b: &[f32],
    f: impl Fn(f32, f32) -> f64,
    h: impl Fn(f32, f32) -> f64,
) -> (f64, f64) {
    let (mut lf, mut lh) = ([0.0f64; BN_LANES], [0.0f64; BN_LANES]);
    let (ca, cb) = (a.chunks_exact(BN_LANES), b.chunks_exact(BN_LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for j in 0..BN_LANES {
            lf[j] += f(xa[j], xb[j]);
            lh[j] += h(xa[j], xb[j]);
        }
    }
    for j in 0..ra.len() {
        lf[j] += f(ra[j], rb[j]);
        lh[j] += h(ra[j], rb[j]);
    }
    let add = |l: &[f64; BN_LANES]| l.iter().fold(0.0f64, |s, &v| s + v);
    (add(&lf), add(&lh))
}

/// Per-channel mean and biased variance of x [n, c, p] in f64: per plane in
/// `lane_sums2`'s order, the planes' sums added in image order.
pub fn channel_stats(x: &[f32], n: usize, c: usize, p: usize) -> (Vec<f64>, Vec<f64>) {
    let per: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let plane = |i: usize| &x[(i * c + ch) * p..(i * c + ch + 1) * p];
            let mut s = 0.0f64;
            for i in 0..n {
                s += plane_sum(plane(i));
            }
            let m = s / (n * p) as f64;
            let mut v = 0.0f64;
            for i in 0..n {
                v += plane_sq_dev(plane(i), m);
            }
            (m, v / (n * p) as f64)
        })
        .collect();
    per.into_iter().unzip()
}

// The plane loops of BatchNorm, compiled for AVX-512 / AVX2 beside the
// baseline (2 f64 lanes there; 8 with AVX-512); the same values in every
// version (no FMA contraction, the lanes' order fixed by `lane_sums2`).
multiversion! {
    fn plane_sum(a: &[f32]) -> f64 {
        lane_sums2(a, a, |v, _| v as f64, |_, _| 0.0).0
    }
}

multiversion! {
    fn plane_sq_dev(a: &[f32], m: f64) -> f64 {
        lane_sums2(a, a, |x, _| (x as f64 - m).powi(2), |_, _| 0.0).0
    }
}

multiversion! {
    /// (sum g xhat, sum g) over one plane.
    fn plane_bw_sums(x: &[f32], g: &[f32], mean: f64, rstd: f64) -> (f64, f64) {
        lane_sums2(x, g, |xv, gv| gv as f64 * (xv as f64 - mean) * rstd, |_, gv| gv as f64)
    }
}

multiversion! {
    /// dx = k (g - db / m - xhat dg / m) over one plane, in f64.
    fn plane_dx(out: &mut [f32], x: &[f32], g: &[f32], mean: f64, rstd: f64, k: f64, sums: (f64, f64, f64)) {
        let (dg, db, m) = sums;
        for ((o, &xv), &gv) in out.iter_mut().zip(x).zip(g) {
            let xhat = (xv as f64 - mean) * rstd;
            *o = (k * (gv as f64 - db / m - xhat * dg / m)) as f32;
        }
    }
}

multiversion! {
    /// out = x scale + shift (+ residual) (then ReLU) over one plane.
    fn plane_apply(out: &mut [f32], xs: &[f32], residual: Option<&[f32]>, scale: f32, shift: f32, relu: bool) {
        match residual {
            Some(rs) => {
                for ((o, &v), &a) in out.iter_mut().zip(xs).zip(rs) {
                    *o = (v * scale + shift) + a;
                }
            }
            None => {
                for (o, &v) in out.iter_mut().zip(xs) {
                    *o = v * scale + shift;
                }
            }
        }
        if relu {
            out.iter_mut().for_each(|o| *o = o.max(0.0));
        }
    }
}

/// y = (x - mean) / sqrt(var + eps) * gamma + beta per channel, then
/// `+ residual` and ReLU when asked (in that order, the unfused ops' order).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_apply(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    (mean, var): (&[f64], &[f64]),
    residual: Option<&[f32]>,
    relu: bool,
    (n, c, p): (usize, usize, usize),
    eps: f32,
) -> Vec<f32> {
    let mut y = vec![0.0f32; n * c * p];
    y.par_chunks_mut(p).enumerate().for_each(|(r, out)| {
        let ch = r % c;
        let rstd = 1.0 / (var[ch] + eps as f64).sqrt();
        let (scale, shift) = (
            (rstd * gamma[ch] as f64) as f32,
            (beta[ch] as f64 - mean[ch] * rstd * gamma[ch] as f64) as f32,
        );
        let xs = &x[r * p..(r + 1) * p];
        plane_apply(
            out,
            xs,
            residual.map(|res| &res[r * p..(r + 1) * p]),
            scale,
            shift,
            relu,
        );
    });
    y
}

/// BatchNorm (batch statistics) backward, per channel in f64 (planes in
/// `lane_sums2`'s order, added in image order):
/// dgamma = sum g xhat, dbeta = sum g,
/// dx = gamma rstd (g - dbeta / M - xhat dgamma / M), M = n p.
/// `sync` (SyncBatchNorm) turns the sums into every rank's for dx, with M
/// the values per channel over all ranks; dgamma and dbeta stay this rank's.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn batch_norm_backward(
    x: &[f32],
    gamma: &[f32],
    g: &[f32],
    (mean, var): (&[f64], &[f64]),
    (n, c, p): (usize, usize, usize),
    eps: f32,
    want_dx: bool,
    sync: Option<(super::cuda::HostSync<'_>, usize)>,
) -> crate::error::Result<(Option<Vec<f32>>, Vec<f32>, Vec<f32>)> {
    let mut m = (n * p) as f64;
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let rstd = 1.0 / (var[ch] + eps as f64).sqrt();
            let (mut dg, mut db) = (0.0f64, 0.0f64);
            for i in 0..n {
                let r = (i * c + ch) * p;
                let (pg, pb) = plane_bw_sums(&x[r..r + p], &g[r..r + p], mean[ch], rstd);
                dg += pg;
                db += pb;
            }
            (dg, db)
        })
        .collect();
    let mut global = None;
    if want_dx && let Some((sync, all)) = sync {
        let (mut dg, mut db): (Vec<f64>, Vec<f64>) = sums.iter().copied().unzip();
        sync(&mut dg, &mut db)?;
        global = Some(dg.into_iter().zip(db).collect::<Vec<_>>());
        m = all as f64;
    }
    let used = global.as_ref().unwrap_or(&sums);
    let dx = want_dx.then(|| {
        let mut dx = vec![0.0f32; n * c * p];
        dx.par_chunks_mut(p).enumerate().for_each(|(r, out)| {
            let ch = r % c;
            let rstd = 1.0 / (var[ch] + eps as f64).sqrt();
            let (dg, db) = used[ch];
            let k = gamma[ch] as f64 * rstd;
            let (xs, gs) = (&x[r * p..(r + 1) * p], &g[r * p..(r + 1) * p]);
            plane_dx(out, xs, gs, mean[ch], rstd, k, (dg, db, m));
        });
        dx
    });
    let (dg, db): (Vec<f64>, Vec<f64>) = sums.into_iter().unzip();
    let f = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect();
    Ok((dx, f(dg), f(db)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The LayerNorm2d backward by pixel blocks equals the one-group-at-a-time
    /// form: dx bit for bit (the same f64 expressions per pixel), dw / db to
    /// f64 rounding (other partial-sum blocks). 300 pixels: two blocks per
    /// image, the second partial.
    #[test]
    fn layer_norm_backward_rows_match_groups() {
        // c = 13 has a tail past the 8 lanes; 300 rows make two chunks.
        for (rows, c) in [(300usize, 13usize), (300, 64), (3, 768)] {
            let x = crate::testing::rand(rows * c, 7, 2.0);
            let w = crate::testing::rand(c, 8, 1.0);
            let g = crate::testing::rand(rows * c, 9, 1.0);
            let geo = NormGroups {
                groups: rows,
                c,
                stride: 1,
                p: 0,
            };
            let a = layer_norm_backward_rows(&x, &w, &g, c, 1e-6);
            let b = layer_norm_backward_groups(&x, &w, &g, geo, 1e-6);
            for (name, u, v) in [("dx", &a.0, &b.0), ("dw", &a.1, &b.1), ("db", &a.2, &b.2)] {
                assert_eq!(u.len(), v.len());
                for (k, (p, q)) in u.iter().zip(v.iter()).enumerate() {
                    assert!(
                        (p - q).abs() <= 1e-6 * q.abs().max(1e-2),
                        "{rows}x{c} {name}[{k}]: {p} vs {q}"
                    );
                }
            }
        }
    }

    #[test]
    fn layer_norm2d_backward_blocks_match_groups() {
        let (n, c, p) = (2usize, 6usize, 300usize);
        let v = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                        / (1u32 << 24) as f32
                        - 0.5
                })
                .collect()
        };
        let (x, w, g) = (v(n * c * p, 1), v(c, 2), v(n * c * p, 3));
        let geo = NormGroups {
            groups: n * p,
            c,
            stride: p,
            p,
        };
        let a = layer_norm2d_backward(&x, &w, &g, geo, 1e-6);
        let b = layer_norm_backward_groups(&x, &w, &g, geo, 1e-6);
        assert_eq!(a.0, b.0, "dx");
        for (u, v) in a.1.iter().zip(&b.1).chain(a.2.iter().zip(&b.2)) {
            assert!((u - v).abs() <= 1e-6 * v.abs().max(1e-3), "{u} vs {v}");
        }
    }
}
