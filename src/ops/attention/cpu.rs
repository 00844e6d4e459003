use rayon::prelude::*;

use crate::cpu::{MatRef, Par, math, multiversion, sgemm, sgemm_new};

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

#[derive(Clone, Copy)]
pub struct RelPosGeometry {
    pub b: usize,
    pub g: usize,
    pub heads: usize,
    pub hd: usize,
    /// Window side (or G for global attention).
    pub s: usize,
}

/// Every (image, window row, window column, head) of rel-pos attention.
fn window_tasks(geo: &RelPosGeometry) -> Vec<(usize, usize, usize, usize)> {
    let (heads, nwin) = (geo.heads, geo.g.div_ceil(geo.s));
    (0..geo.b)
        .flat_map(|bi| {
            (0..nwin * nwin).flat_map(move |w| (0..heads).map(move |h| (bi, w / nwin, w % nwin, h)))
        })
        .collect()
}

/// One (image, window, head), gathered: keys / values [S*S, hd] of every
/// window position (the k / v biases at padded ones), the real queries
/// [nq, hd] and scaled by hd^-0.5, and their window positions.
struct WindowHead {
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
    qs: Vec<f32>,
    qpos: Vec<usize>,
}

fn gather_window(
    qkv: &[f32],
    bias: &[f32],
    geo: &RelPosGeometry,
    (bi, wy, wx, h): (usize, usize, usize, usize),
) -> WindowHead {
    let RelPosGeometry {
        g, heads, hd, s, ..
    } = *geo;
    let (d, ss) = (heads * hd, s * s);
    let scale = (hd as f32).powf(-0.5);
    let tok = |y: usize, x: usize| &qkv[((bi * g + y) * g + x) * 3 * d..][..3 * d];
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
        let src = &tok(wy * s + p / s, wx * s + p % s)[h * hd..][..hd];
        q[i * hd..(i + 1) * hd].copy_from_slice(src);
        for (dst, &x) in qs[i * hd..(i + 1) * hd].iter_mut().zip(src) {
            *dst = x * scale;
        }
    }
    WindowHead { k, v, q, qs, qpos }
}

/// The attention probabilities P [nq, S*S] of one gathered window head:
/// logits (q scale) k^T by GEMM plus the decomposed bias from Ph = q Rh^T and
/// Pw = q Rw^T [nq, 2S - 1], then the softmax (the forward's arithmetic,
/// which the backward recomputes).
fn window_probs(w: &WindowHead, rh: &[f32], rw: &[f32], geo: &RelPosGeometry) -> Vec<f32> {
    let (hd, s) = (geo.hd, geo.s);
    let (ss, r, nq) = (s * s, 2 * s - 1, w.qpos.len());
    let mut logits = vec![0.0f32; nq * ss];
    sgemm(
        MatRef::rm(&w.qs, nq, hd),
        MatRef::tr(&w.k, hd, ss),
        &mut logits,
        ss,
        1,
        false,
        Par::Seq,
    );
    let mut ph = vec![0.0f32; nq * r];
    let mut pw = vec![0.0f32; nq * r];
    sgemm(
        MatRef::rm(&w.q, nq, hd),
        MatRef::tr(rh, hd, r),
        &mut ph,
        r,
        1,
        false,
        Par::Seq,
    );
    sgemm(
        MatRef::rm(&w.q, nq, hd),
        MatRef::tr(rw, hd, r),
        &mut pw,
        r,
        1,
        false,
        Par::Seq,
    );
    for (i, &p) in w.qpos.iter().enumerate() {
        let row = &mut logits[i * ss..(i + 1) * ss];
        add_rel_bias(
            row,
            &ph[i * r..(i + 1) * r],
            &pw[i * r..(i + 1) * r],
            (p / s, p % s),
            s,
        );
    }
    softmax_rows(&mut logits, ss);
    logits
}

multiversion! {
    /// One query's logits [S*S] += Ph[qy + S - 1 - ky] + Pw[qx + S - 1 - kx]
    /// (the decomposed relative-position bias; ph, pw [2S - 1]).
    fn add_rel_bias(row: &mut [f32], ph: &[f32], pw: &[f32], q: (usize, usize), s: usize) {
        let (qy, qx) = q;
        // Pw read backwards: kx = 0 takes pw[qx + s - 1].
        let pwr = &pw[qx..qx + s];
        for ky in 0..s {
            let bh = ph[qy + s - 1 - ky];
            for (l, &b) in row[ky * s..(ky + 1) * s].iter_mut().zip(pwr.iter().rev()) {
                *l += bh + b;
            }
        }
    }
}

multiversion! {
    /// The decomposed bias's part of one query's dq [hd]: dq += sum_ky
    /// (row sum ky of dS) Rh[qy + S - 1 - ky] + sum_kx (column sum kx of
    /// dS) Rw[qx + S - 1 - kx], for dS of that query as an S x S grid
    /// (`col` [S]: scratch for the column sums).
    fn rel_bias_dq(ds: &[f32], dq: &mut [f32], tables: (&[f32], &[f32]), q: (usize, usize), s: usize, col: &mut [f32]) {
        let ((rh, rw), (qy, qx), hd) = (tables, q, dq.len());
        for ky in 0..s {
            let sh: f32 = ds[ky * s..(ky + 1) * s].iter().sum();
            let rrow = &rh[(qy + s - 1 - ky) * hd..][..hd];
            dq.iter_mut().zip(rrow).for_each(|(a, &rv)| *a += sh * rv);
        }
        // Column sums in row order (0 + row 0 + row 1 + ...).
        col.iter_mut().for_each(|c| *c = 0.0);
        for ky in 0..s {
            col.iter_mut().zip(&ds[ky * s..(ky + 1) * s]).for_each(|(c, &v)| *c += v);
        }
        for (kx, &sw) in col.iter().enumerate() {
            let rrow = &rw[(qx + s - 1 - kx) * hd..][..hd];
            dq.iter_mut().zip(rrow).for_each(|(a, &rv)| *a += sw * rv);
        }
    }
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
    let (d, ss) = (heads * hd, s * s);
    let results: Vec<(usize, usize, usize, usize, Vec<f32>)> = window_tasks(&geo)
        .into_par_iter()
        .map(|(bi, wy, wx, h)| {
            let wh = gather_window(qkv, bias, &geo, (bi, wy, wx, h));
            let (nq, qpos) = (wh.qpos.len(), &wh.qpos);
            let (v, logits) = (&wh.v, window_probs(&wh, rh, rw, &geo));
            let mut o = vec![0.0f32; nq * hd];
            sgemm(
                MatRef::rm(&logits, nq, ss),
                MatRef::rm(v, ss, hd),
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

multiversion! {
    /// Softmax backward of one row in place: dS = P (dP - sum(dP P)), the
    /// sum in f64 over 8 lanes (one f64 chain was a third of this op's
    /// time).
    fn softmax_row_backward(p: &[f32], dp: &mut [f32]) {
        const L: usize = 8;
        let mut acc = [0.0f64; L];
        let (pc, dc) = (p.chunks_exact(L), dp.chunks_exact(L));
        let tail: f64 = pc.remainder().iter().zip(dc.remainder()).map(|(&a, &b)| a as f64 * b as f64).sum();
        for (a, b) in pc.zip(dc) {
            for l in 0..L {
                acc[l] += a[l] as f64 * b[l] as f64;
            }
        }
        let dot = (acc.iter().sum::<f64>() + tail) as f32;
        for (d, &pv) in dp.iter_mut().zip(p) {
            *d = pv * (*d - dot);
        }
    }
}

/// rel_pos_attention backward with respect to qkv (the bias and the rel-pos
/// tables are frozen: the padded keys, which are the biases, are constants).
/// Per (image, window, head): P recomputed from q and k (no attention matrix
/// kept by the forward), dP = dO V^T, dS = softmax backward, dq = scale dS K
/// plus the decomposed bias's terms (row sums of dS against Rh, column sums
/// against Rw), dk = scale dS^T q, dv = P^T dO, written back at the real
/// tokens only. g [b, g, g, d] -> dqkv [b, g, g, 3d].
pub fn rel_pos_attention_backward(
    qkv: &[f32],
    bias: &[f32],
    rh: &[f32],
    rw: &[f32],
    grad: &[f32],
    geo: RelPosGeometry,
) -> Vec<f32> {
    let RelPosGeometry { b, g, heads, hd, s } = geo;
    let d = heads * hd;
    let ss = s * s;
    let scale = (hd as f32).powf(-0.5);
    let tasks = window_tasks(&geo);
    // Per task: (real positions, dq [nq, hd], dk [nq, hd], dv [nq, hd]).
    let results: Vec<(
        usize,
        usize,
        usize,
        usize,
        Vec<usize>,
        Vec<f32>,
        Vec<f32>,
        Vec<f32>,
    )> = tasks
        .into_par_iter()
        .map(|(bi, wy, wx, h)| {
            let wh = gather_window(qkv, bias, &geo, (bi, wy, wx, h));
            let (nq, qpos) = (wh.qpos.len(), wh.qpos.clone());
            let (k, v, qs) = (&wh.k, &wh.v, &wh.qs);
            let mut dout = vec![0.0f32; nq * hd];
            for (i, &p) in qpos.iter().enumerate() {
                let (y, x) = (wy * s + p / s, wx * s + p % s);
                dout[i * hd..(i + 1) * hd]
                    .copy_from_slice(&grad[((bi * g + y) * g + x) * d + h * hd..][..hd]);
            }
            // P, as the forward computes it.
            let pm = window_probs(&wh, rh, rw, &geo);
            // dS [nq, ss]
            let mut ds = sgemm_new(MatRef::rm(&dout, nq, hd), MatRef::tr(v, hd, ss), Par::Seq);
            for (prow, drow) in pm.chunks_exact(ss).zip(ds.chunks_exact_mut(ss)) {
                softmax_row_backward(prow, drow);
            }
            // dq = scale dS K + (row / column sums of dS) against Rh / Rw
            let mut dq = sgemm_new(MatRef::rm(&ds, nq, ss), MatRef::rm(k, ss, hd), Par::Seq);
            dq.iter_mut().for_each(|v| *v *= scale);
            let mut col = vec![0.0f32; s];
            for (i, &p) in qpos.iter().enumerate() {
                let row = &ds[i * ss..(i + 1) * ss];
                let dqi = &mut dq[i * hd..(i + 1) * hd];
                rel_bias_dq(row, dqi, (rh, rw), (p / s, p % s), s, &mut col);
            }
            // dk = dS^T (q scale), dv = P^T dO, at the real keys only
            let dk_all = sgemm_new(MatRef::tr(&ds, ss, nq), MatRef::rm(qs, nq, hd), Par::Seq);
            let dv_all = sgemm_new(MatRef::tr(&pm, ss, nq), MatRef::rm(&dout, nq, hd), Par::Seq);
            if nq == ss {
                // A window without padding: every key is real, in order.
                return (bi, wy, wx, h, qpos, dq, dk_all, dv_all);
            }
            let mut dk = Vec::with_capacity(nq * hd);
            let mut dv = Vec::with_capacity(nq * hd);
            for &p in &qpos {
                dk.extend_from_slice(&dk_all[p * hd..(p + 1) * hd]);
                dv.extend_from_slice(&dv_all[p * hd..(p + 1) * hd]);
            }
            (bi, wy, wx, h, qpos, dq, dk, dv)
        })
        .collect();
    let mut out = vec![0.0f32; b * g * g * 3 * d];
    for (bi, wy, wx, h, qpos, dq, dk, dv) in results {
        for (i, &p) in qpos.iter().enumerate() {
            let (y, x) = (wy * s + p / s, wx * s + p % s);
            let t = &mut out[((bi * g + y) * g + x) * 3 * d..][..3 * d];
            t[h * hd..][..hd].copy_from_slice(&dq[i * hd..(i + 1) * hd]);
            t[d + h * hd..][..hd].copy_from_slice(&dk[i * hd..(i + 1) * hd]);
            t[2 * d + h * hd..][..hd].copy_from_slice(&dv[i * hd..(i + 1) * hd]);
        }
    }
    out
}

/// attention backward: (dq, dk, dv), each [its own batch, L, I]; an operand
/// shared by the batch (leading 1) gets the sum over the items, in order.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    grad: &[f32],
    batched: [bool; 3],
    n: usize,
    lq: usize,
    lk: usize,
    i: usize,
    heads: usize,
) -> [Vec<f32>; 3] {
    let hd = i / heads;
    let sd = (hd as f32).sqrt();
    let view = |x: &[f32], item: usize, len: usize, h: usize| -> Vec<f32> {
        let mut m = vec![0.0f32; len * hd];
        for l in 0..len {
            m[l * hd..(l + 1) * hd].copy_from_slice(&x[(item * len + l) * i + h * hd..][..hd]);
        }
        m
    };
    let results: Vec<[Vec<f32>; 3]> = (0..n * heads)
        .into_par_iter()
        .map(|t| {
            let (ni, h) = (t / heads, t % heads);
            let at = |j: usize| if batched[j] { ni } else { 0 };
            let (qm, km, vm) = (
                view(q, at(0), lq, h),
                view(k, at(1), lk, h),
                view(v, at(2), lk, h),
            );
            let dout = view(grad, ni, lq, h);
            let mut p = vec![0.0f32; lq * lk];
            sgemm(
                MatRef::rm(&qm, lq, hd),
                MatRef::tr(&km, hd, lk),
                &mut p,
                lk,
                1,
                false,
                Par::Seq,
            );
            p.iter_mut().for_each(|l| *l /= sd);
            softmax_rows(&mut p, lk);
            let mut ds = vec![0.0f32; lq * lk];
            sgemm(
                MatRef::rm(&dout, lq, hd),
                MatRef::tr(&vm, hd, lk),
                &mut ds,
                lk,
                1,
                false,
                Par::Seq,
            );
            for (prow, drow) in p.chunks_exact(lk).zip(ds.chunks_exact_mut(lk)) {
                softmax_row_backward(prow, drow);
            }
            ds.iter_mut().for_each(|v| *v /= sd);
            let mut dq = vec![0.0f32; lq * hd];
            let mut dk = vec![0.0f32; lk * hd];
            let mut dv = vec![0.0f32; lk * hd];
            sgemm(
                MatRef::rm(&ds, lq, lk),
                MatRef::rm(&km, lk, hd),
                &mut dq,
                hd,
                1,
                false,
                Par::Seq,
            );
            sgemm(
                MatRef::tr(&ds, lk, lq),
                MatRef::rm(&qm, lq, hd),
                &mut dk,
                hd,
                1,
                false,
                Par::Seq,
            );
            sgemm(
                MatRef::tr(&p, lk, lq),
                MatRef::rm(&dout, lq, hd),
                &mut dv,
                hd,
                1,
                false,
                Par::Seq,
            );
            [dq, dk, dv]
        })
        .collect();
    let lens = [lq, lk, lk];
    let mut out: [Vec<f32>; 3] =
        std::array::from_fn(|j| vec![0.0f32; if batched[j] { n } else { 1 } * lens[j] * i]);
    // Tasks in order (item-major): a shared operand sums the items in order.
    for (t, parts) in results.into_iter().enumerate() {
        let (ni, h) = (t / heads, t % heads);
        for (j, part) in parts.iter().enumerate() {
            let item = if batched[j] { ni } else { 0 };
            for l in 0..lens[j] {
                let dst = &mut out[j][(item * lens[j] + l) * i + h * hd..][..hd];
                dst.iter_mut()
                    .zip(&part[l * hd..(l + 1) * hd])
                    .for_each(|(a, &b)| *a += b);
            }
        }
    }
    out
}
