use rayon::prelude::*;

use crate::cpu::{sgemm, MatRef, Par};
use crate::ops::activation::{apply_act_slice, Act};

pub struct ConvGeometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

/// im2col of one image: x [c, h, w] -> col [c * kh * kw, ho * wo], zero outside.
fn im2col(g: &ConvGeometry, x: &[f32], col: &mut [f32]) {
    let (p, hw) = (g.ho * g.wo, g.h * g.w);
    col.par_chunks_mut(p).enumerate().for_each(|(r, dst)| {
        let (ci, ky, kx) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
        let src = &x[ci * hw..(ci + 1) * hw];
        for oy in 0..g.ho {
            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
            let drow = &mut dst[oy * g.wo..(oy + 1) * g.wo];
            if iy < 0 || iy as usize >= g.h {
                drow.fill(0.0);
                continue;
            }
            let srow = &src[iy as usize * g.w..(iy as usize + 1) * g.w];
            for (ox, d) in drow.iter_mut().enumerate() {
                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                *d = if ix >= 0 && (ix as usize) < g.w { srow[ix as usize] } else { 0.0 };
            }
        }
    });
}

/// out [n, o, ho*wo] = W [o, c*kh*kw] x col + bias + residual, then act.
pub fn conv2d(g: &ConvGeometry, x: &[f32], w: &[f32], b: Option<&[f32]>, residual: Option<&[f32]>, act: Act) -> Vec<f32> {
    let p = g.ho * g.wo;
    let k = g.c * g.kh * g.kw;
    let mut out = match residual {
        Some(r) => r.to_vec(),
        None => vec![0.0f32; g.n * g.o * p],
    };
    let seeded = residual.is_some() || b.is_some();
    if let Some(b) = b {
        out.par_chunks_mut(p).enumerate().for_each(|(i, row)| {
            let bv = b[i % g.o];
            row.iter_mut().for_each(|v| *v += bv);
        });
    }
    let direct = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0;
    let mut col = if direct { Vec::new() } else { vec![0.0f32; k * p] };
    for i in 0..g.n {
        let xi = &x[i * g.c * g.h * g.w..(i + 1) * g.c * g.h * g.w];
        let rhs = if direct {
            MatRef::rm(xi, k, p)
        } else {
            im2col(g, xi, &mut col);
            MatRef::rm(&col, k, p)
        };
        let oi = &mut out[i * g.o * p..(i + 1) * g.o * p];
        sgemm(MatRef::rm(w, g.o, k), rhs, oi, p, 1, seeded, Par::Pool);
    }
    apply_act_slice(&mut out, act);
    out
}

/// Transposed conv with kernel = stride = k: every input pixel writes its own k x k
/// output patch. tmp [o*k*k, h*w] = W^T [o*k*k, c] x X [c, h*w], then scatter.
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d(x: &[f32], w: &[f32], b: Option<&[f32]>, act: Act, n: usize, c: usize, h: usize, wd: usize, o: usize, k: usize) -> Vec<f32> {
    let hw = h * wd;
    let rows = o * k * k;
    let (oh, ow) = (h * k, wd * k);
    let mut out = vec![0.0f32; n * o * oh * ow];
    let mut tmp = vec![0.0f32; rows * hw];
    for i in 0..n {
        let xi = &x[i * c * hw..(i + 1) * c * hw];
        sgemm(MatRef::tr(w, rows, c), MatRef::rm(xi, c, hw), &mut tmp, hw, 1, false, Par::Pool);
        let oi = &mut out[i * o * oh * ow..(i + 1) * o * oh * ow];
        oi.par_chunks_mut(oh * ow).enumerate().for_each(|(oc, plane)| {
            let bv = b.map_or(0.0, |b| b[oc]);
            for ky in 0..k {
                for kx in 0..k {
                    let t = &tmp[((oc * k + ky) * k + kx) * hw..][..hw];
                    for y in 0..h {
                        let dst = &mut plane[(y * k + ky) * ow..(y * k + ky + 1) * ow];
                        for xx in 0..wd {
                            dst[xx * k + kx] = t[y * wd + xx] + bv;
                        }
                    }
                }
            }
        });
    }
    apply_act_slice(&mut out, act);
    out
}

#[allow(clippy::too_many_arguments)]
pub fn max_pool2d(x: &[f32], planes: usize, h: usize, w: usize, ho: usize, wo: usize, k: usize, s: usize, p: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; planes * ho * wo];
    out.par_chunks_mut(ho * wo).enumerate().for_each(|(pl, o)| {
        let src = &x[pl * h * w..(pl + 1) * h * w];
        for oy in 0..ho {
            for ox in 0..wo {
                let mut m = f32::NEG_INFINITY;
                for ky in 0..k {
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy as usize >= h {
                        continue;
                    }
                    for kx in 0..k {
                        let ix = (ox * s + kx) as isize - p as isize;
                        if ix < 0 || ix as usize >= w {
                            continue;
                        }
                        let v = src[iy as usize * w + ix as usize];
                        // NaN propagates as in PyTorch.
                        if v > m || v.is_nan() {
                            m = v;
                        }
                    }
                }
                o[oy * wo + ox] = m;
            }
        }
    });
    out
}
