use rayon::prelude::*;

/// Source index and weights of PyTorch's align_corners=False bilinear, per output index.
fn torch_taps(inp: usize, out: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = inp as f32 / out as f32;
    (0..out)
        .map(|d| {
            let real = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (real as usize).min(inp - 1);
            let l1 = real - i0 as f32;
            let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// planes x h x w -> planes x oh x ow.
pub fn bilinear(x: &[f32], planes: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let ty = torch_taps(h, oh);
    let tx = torch_taps(w, ow);
    let mut out = vec![0.0f32; planes * oh * ow];
    out.par_chunks_mut(ow).enumerate().for_each(|(r, row)| {
        let (pl, oy) = (r / oh, r % oh);
        let src = &x[pl * h * w..(pl + 1) * h * w];
        let (y0, y1, h0, h1) = ty[oy];
        let (r0, r1) = (&src[y0 * w..(y0 + 1) * w], &src[y1 * w..(y1 + 1) * w]);
        for (o, &(x0, x1, w0, w1)) in row.iter_mut().zip(&tx) {
            *o = h0 * (w0 * r0[x0] + w1 * r0[x1]) + h1 * (w0 * r1[x0] + w1 * r1[x1]);
        }
    });
    out
}

/// For each input index, the (output index, weight) pairs that read it.
pub(crate) fn reverse_taps(inp: usize, out: usize) -> Vec<Vec<(usize, f32)>> {
    let mut r = vec![vec![]; inp];
    for (o, (i0, i1, w0, w1)) in torch_taps(inp, out).into_iter().enumerate() {
        r[i0].push((o, w0));
        r[i1].push((o, w1));
    }
    r
}

/// bilinear backward, as gathers (each input value sums the outputs that
/// read it, in output order): g planes x oh x ow -> planes x h x w. Columns
/// first (g -> planes x oh x w), then rows.
pub fn bilinear_backward(
    g: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
) -> Vec<f32> {
    let (ry, rx) = (reverse_taps(h, oh), reverse_taps(w, ow));
    let mut out = vec![0.0f32; planes * h * w];
    out.par_chunks_mut(h * w).enumerate().for_each(|(pl, dst)| {
        let gp = &g[pl * oh * ow..(pl + 1) * oh * ow];
        let mut tmp = vec![0.0f32; oh * w];
        for oy in 0..oh {
            let grow = &gp[oy * ow..(oy + 1) * ow];
            for (x, taps) in rx.iter().enumerate() {
                tmp[oy * w + x] = taps.iter().fold(0.0f32, |a, &(ox, wx)| a + wx * grow[ox]);
            }
        }
        for (y, taps) in ry.iter().enumerate() {
            for x in 0..w {
                dst[y * w + x] = taps
                    .iter()
                    .fold(0.0f32, |a, &(oy, wy)| a + wy * tmp[oy * w + x]);
            }
        }
    });
    out
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's coefficients for resampling `inp` samples to `out` with the bilinear
/// (triangle) filter: per output, the first source index and the fixed-point weights.
fn pil_coeffs(inp: usize, out: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = inp as f64 / out as f64;
    let filterscale = scale.max(1.0);
    let support = 1.0 * filterscale;
    (0..out)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as isize).max(0) as usize;
            let xmax = ((center + support + 0.5) as isize).min(inp as isize) as usize;
            let ws: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) * ss).abs();
                    if t < 1.0 { 1.0 - t } else { 0.0 }
                })
                .collect();
            let total: f64 = ws.iter().sum();
            let fixed = ws
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let v = w * (1u64 << PRECISION_BITS) as f64;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

#[inline]
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

pub fn resize_u8(img: &[u8], h: usize, w: usize, ch: usize, oh: usize, ow: usize) -> Vec<u8> {
    // Horizontal pass (only when the width changes), as PIL.
    let (mid, mw) = if ow != w {
        let cx = pil_coeffs(w, ow);
        let mut mid = vec![0u8; h * ow * ch];
        mid.par_chunks_mut(ow * ch)
            .enumerate()
            .for_each(|(y, row)| {
                let src = &img[y * w * ch..(y + 1) * w * ch];
                for (xx, (x0, k)) in cx.iter().enumerate() {
                    for c in 0..ch {
                        let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                        for (j, &kv) in k.iter().enumerate() {
                            acc += src[(x0 + j) * ch + c] as i64 * kv as i64;
                        }
                        row[xx * ch + c] = clip8(acc);
                    }
                }
            });
        (mid, ow)
    } else {
        (img.to_vec(), w)
    };
    if oh == h {
        return mid;
    }
    let cy = pil_coeffs(h, oh);
    let mut out = vec![0u8; oh * mw * ch];
    out.par_chunks_mut(mw * ch)
        .enumerate()
        .for_each(|(yy, row)| {
            let (y0, k) = &cy[yy];
            for (i, o) in row.iter_mut().enumerate() {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (j, &kv) in k.iter().enumerate() {
                    acc += mid[(y0 + j) * mw * ch + i] as i64 * kv as i64;
                }
                *o = clip8(acc);
            }
        });
    out
}
