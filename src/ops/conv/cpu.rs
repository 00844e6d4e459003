use rayon::prelude::*;

use crate::cpu::{par_col_tiles, sgemm, MatRef, Par};
use crate::ops::activation::{apply_act_seq, apply_act_slice, Act};

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

/// im2col of output pixels [q0, q0 + len) of one image x [c, h, w] into
/// col [c * kh * kw, len] (row-major, zero outside the input).
fn im2col_cols(g: &ConvGeometry, x: &[f32], q0: usize, len: usize, col: &mut [f32]) {
    let hw = g.h * g.w;
    for (r, dst) in col.chunks_mut(len).enumerate() {
        let (ci, ky, kx) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
        let src = &x[ci * hw..(ci + 1) * hw];
        im2col_row(g, src, ky, kx, q0, dst);
    }
}

/// One row (kernel tap ky, kx of one channel) for output pixels q0.. (dst.len()).
#[inline]
fn im2col_row(g: &ConvGeometry, src: &[f32], ky: usize, kx: usize, q0: usize, dst: &mut [f32]) {
    let mut q = q0;
    let end = q0 + dst.len();
    while q < end {
        let (oy, ox0) = (q / g.wo, q % g.wo);
        let seg = (g.wo - ox0).min(end - q);
        let d = &mut dst[q - q0..q - q0 + seg];
        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
        if iy < 0 || iy as usize >= g.h {
            d.fill(0.0);
        } else {
            let srow = &src[iy as usize * g.w..(iy as usize + 1) * g.w];
            if g.stride == 1 {
                // ix = ox + kx - pad: a shifted contiguous copy with zero edges.
                let shift = kx as isize - g.pad as isize;
                for (i, v) in d.iter_mut().enumerate() {
                    let ix = (ox0 + i) as isize + shift;
                    *v = if ix >= 0 && (ix as usize) < g.w { srow[ix as usize] } else { 0.0 };
                }
            } else {
                for (i, v) in d.iter_mut().enumerate() {
                    let ix = ((ox0 + i) * g.stride + kx) as isize - g.pad as isize;
                    *v = if ix >= 0 && (ix as usize) < g.w { srow[ix as usize] } else { 0.0 };
                }
            }
        }
        q += seg;
    }
}

/// Output pixels per tile in the tiled path: its im2col block stays in L2.
const TILE: usize = 256;
/// Weights up to this many values take the tiled path (each task re-packs them).
const SMALL_WEIGHTS: usize = 1 << 16;

/// out [n, o, ho*wo] = W [o, c*kh*kw] x col + bias + residual, then act.
///
/// Two schedules. Small weights (o * k <= 64 K, the ResNet stem and stage 1, the
/// decoder's mask-feature convs): parallel over (image, 256-pixel tile), each task
/// builds its im2col block in cache and runs a sequential GEMM into its own
/// columns, then the activation. Large weights: im2col of the whole image and one
/// GEMM parallelised inside.
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
    let img = g.c * g.h * g.w;
    if g.o * k <= SMALL_WEIGHTS {
        let _p = crate::profile::scope("conv2d.tiled");
        par_col_tiles(&mut out, g.n, g.o, p, TILE, |bi, q0, tile, col| {
            let len = tile.cols();
            let xi = &x[bi * img..(bi + 1) * img];
            if direct {
                tile.gemm(MatRef::rm(w, g.o, k), MatRef { data: &xi[q0..], rows: k, cols: len, rs: p, cs: 1 }, seeded);
            } else {
                col.resize(k * len, 0.0);
                im2col_cols(g, xi, q0, len, &mut col[..k * len]);
                tile.gemm(MatRef::rm(w, g.o, k), MatRef::rm(&col[..k * len], k, len), seeded);
            }
            if act != Act::None {
                for r in 0..g.o {
                    apply_act_seq(tile.row_mut(r), act);
                }
            }
        });
        return out;
    }
    let mut col = if direct { Vec::new() } else { vec![0.0f32; k * p] };
    for i in 0..g.n {
        let xi = &x[i * img..(i + 1) * img];
        let rhs = if direct {
            MatRef::rm(xi, k, p)
        } else {
            let _p = crate::profile::scope("conv2d.im2col");
            col.par_chunks_mut(p).enumerate().for_each(|(r, dst)| {
                let (ci, ky, kx) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
                im2col_row(g, &xi[ci * g.h * g.w..(ci + 1) * g.h * g.w], ky, kx, 0, dst);
            });
            MatRef::rm(&col, k, p)
        };
        let oi = &mut out[i * g.o * p..(i + 1) * g.o * p];
        let _p = crate::profile::scope("conv2d.gemm");
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
            apply_act_seq(plane, act);
        });
    }
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
