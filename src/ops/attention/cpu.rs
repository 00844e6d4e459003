use rayon::prelude::*;

use crate::cpu::{MatRef, Par, math, multiversion, sgemm};

multiversion! {
    /// Row-wise softmax in place, rows of `cols`; 8 partial sums so the
    /// reductions vectorise.
    pub fn softmax_rows(x: &mut [f32], cols: usize) {
        for row in x.chunks_mut(cols) {
            let mut m8 = [f32::NEG_INFINITY; 8];
            let mut chunks = row.chunks_exact(8);
            for c in &mut chunks {
                for i in 0..8 {
                    m8[i] = m8[i].max(c[i]);
                }
            }
            let m = chunks.remainder().iter().fold(m8.iter().cloned().fold(f32::NEG_INFINITY, f32::max), |a, &b| a.max(b));
            let mut z8 = [0.0f32; 8];
            let mut chunks = row.chunks_exact_mut(8);
            for c in &mut chunks {
                for i in 0..8 {
                    c[i] = math::exp_g::<FMA>(c[i] - m);
                    z8[i] += c[i];
                }
            }
            let mut z: f32 = z8.iter().sum();
            for v in chunks.into_remainder() {
                *v = math::exp_g::<FMA>(*v - m);
                z += *v;
            }
            let inv = 1.0 / z;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

pub struct RelPosGeometry {
    pub b: usize,
    pub g: usize,
    pub heads: usize,
    pub hd: usize,
    /// Window side (or G for global attention).
    pub s: usize,
}

/// See `super::rel_pos_attention`. One task per (image, window, head); each task
/// gathers its window's K / V [S*S, hd] (biases at padded positions) and the real
/// queries Q [nq, hd], then logits [nq, S*S] by GEMM, the decomposed bias from
/// Ph = Q Rh^T and Pw = Q Rw^T [nq, 2S-1], softmax, and O = P V [nq, hd].
pub fn rel_pos_attention(
    qkv: &[f32],
    bias: &[f32],
    rh: &[f32],
    rw: &[f32],
    geo: RelPosGeometry,
) -> Vec<f32> {
    let RelPosGeometry { b, g, heads, hd, s } = geo;
    let d = heads * hd;
    let nwin = g.div_ceil(s);
    let ss = s * s;
    let r = 2 * s - 1;
    let scale = (hd as f32).powf(-0.5);
    let tasks: Vec<(usize, usize, usize, usize)> = (0..b)
        .flat_map(|bi| {
            (0..nwin * nwin).flat_map(move |w| (0..heads).map(move |h| (bi, w / nwin, w % nwin, h)))
        })
        .collect();
    let results: Vec<(usize, usize, usize, usize, Vec<f32>)> = tasks
        .into_par_iter()
        .map(|(bi, wy, wx, h)| {
            let tok = |y: usize, x: usize| &qkv[((bi * g + y) * g + x) * 3 * d..][..3 * d];
            // Keys / values of all S*S window positions, queries of the real ones.
            let mut k = vec![0.0f32; ss * hd];
            let mut v = vec![0.0f32; ss * hd];
            let mut qpos = Vec::with_capacity(ss);
            for p in 0..ss {
                let (y, x) = (wy * s + p / s, wx * s + p % s);
                let (ks, vs) = if y < g && x < g {
                    let t = tok(y, x);
                    qpos.push(p);
                    (&t[d + h * hd..][..hd], &t[2 * d + h * hd..][..hd])
                } else {
                    (&bias[d + h * hd..][..hd], &bias[2 * d + h * hd..][..hd])
                };
                k[p * hd..(p + 1) * hd].copy_from_slice(ks);
                v[p * hd..(p + 1) * hd].copy_from_slice(vs);
            }
            let nq = qpos.len();
            let mut q = vec![0.0f32; nq * hd];
            let mut qs = vec![0.0f32; nq * hd];
            for (i, &p) in qpos.iter().enumerate() {
                let t = tok(wy * s + p / s, wx * s + p % s);
                let src = &t[h * hd..][..hd];
                q[i * hd..(i + 1) * hd].copy_from_slice(src);
                for (dst, &x) in qs[i * hd..(i + 1) * hd].iter_mut().zip(src) {
                    *dst = x * scale;
                }
            }
            // logits [nq, ss] = (q * scale) k^T
            let mut logits = vec![0.0f32; nq * ss];
            sgemm(
                MatRef::rm(&qs, nq, hd),
                MatRef::tr(&k, hd, ss),
                &mut logits,
                ss,
                1,
                false,
                Par::Seq,
            );
            // ph / pw [nq, r] = q (unscaled) R^T
            let mut ph = vec![0.0f32; nq * r];
            let mut pw = vec![0.0f32; nq * r];
            sgemm(
                MatRef::rm(&q, nq, hd),
                MatRef::tr(rh, hd, r),
                &mut ph,
                r,
                1,
                false,
                Par::Seq,
            );
            sgemm(
                MatRef::rm(&q, nq, hd),
                MatRef::tr(rw, hd, r),
                &mut pw,
                r,
                1,
                false,
                Par::Seq,
            );
            for (i, &p) in qpos.iter().enumerate() {
                let (qy, qx) = (p / s, p % s);
                let row = &mut logits[i * ss..(i + 1) * ss];
                let phr = &ph[i * r..(i + 1) * r];
                let pwr = &pw[i * r..(i + 1) * r];
                for ky in 0..s {
                    let bh = phr[qy + s - 1 - ky];
                    let lrow = &mut row[ky * s..(ky + 1) * s];
                    for (kx, l) in lrow.iter_mut().enumerate() {
                        *l += bh + pwr[qx + s - 1 - kx];
                    }
                }
            }
            softmax_rows(&mut logits, ss);
            let mut o = vec![0.0f32; nq * hd];
            sgemm(
                MatRef::rm(&logits, nq, ss),
                MatRef::rm(&v, ss, hd),
                &mut o,
                hd,
                1,
                false,
                Par::Seq,
            );
            // Tag each output row with its window position for the scatter.
            let mut tagged = Vec::with_capacity(nq * (hd + 1));
            for (i, &p) in qpos.iter().enumerate() {
                tagged.push(p as f32);
                tagged.extend_from_slice(&o[i * hd..(i + 1) * hd]);
            }
            (bi, wy, wx, h, tagged)
        })
        .collect();
    let mut out = vec![0.0f32; b * g * g * d];
    for (bi, wy, wx, h, tagged) in results {
        for row in tagged.chunks(hd + 1) {
            let p = row[0] as usize;
            let (y, x) = (wy * s + p / s, wx * s + p % s);
            out[((bi * g + y) * g + x) * d + h * hd..][..hd].copy_from_slice(&row[1..]);
        }
    }
    out
}

/// See `super::attention`. One task per (batch item, head), strided views, no
/// copies in; `batched` says which of q, k, v have a batch (else shared).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batched: [bool; 3],
    n: usize,
    lq: usize,
    lk: usize,
    i: usize,
    heads: usize,
) -> Vec<f32> {
    let hd = i / heads;
    let sd = (hd as f32).sqrt();
    let results: Vec<Vec<f32>> = (0..n * heads)
        .into_par_iter()
        .map(|t| {
            let (ni, h) = (t / heads, t % heads);
            let (qi, ki, vi) = (
                if batched[0] { ni } else { 0 },
                if batched[1] { ni } else { 0 },
                if batched[2] { ni } else { 0 },
            );
            let qv = MatRef {
                data: &q[qi * lq * i + h * hd..],
                rows: lq,
                cols: hd,
                rs: i,
                cs: 1,
            };
            let kt = MatRef {
                data: &k[ki * lk * i + h * hd..],
                rows: hd,
                cols: lk,
                rs: 1,
                cs: i,
            };
            let vv = MatRef {
                data: &v[vi * lk * i + h * hd..],
                rows: lk,
                cols: hd,
                rs: i,
                cs: 1,
            };
            let mut logits = vec![0.0f32; lq * lk];
            sgemm(qv, kt, &mut logits, lk, 1, false, Par::Seq);
            // The reference divides the product (q k^T) / sqrt(hd).
            logits.iter_mut().for_each(|l| *l /= sd);
            softmax_rows(&mut logits, lk);
            let mut o = vec![0.0f32; lq * hd];
            sgemm(
                MatRef::rm(&logits, lq, lk),
                vv,
                &mut o,
                hd,
                1,
                false,
                Par::Seq,
            );
            o
        })
        .collect();
    let mut out = vec![0.0f32; n * lq * i];
    for (t, o) in results.into_iter().enumerate() {
        let (ni, h) = (t / heads, t % heads);
        for l in 0..lq {
            out[(ni * lq + l) * i + h * hd..][..hd].copy_from_slice(&o[l * hd..(l + 1) * hd]);
        }
    }
    out
}
