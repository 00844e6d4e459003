use rayon::prelude::*;

use crate::cpu::bf16_gemm::{PackedA, gemm_bf16_tiles, pack_b_rows, packed_b_len};
use crate::cpu::{MatRef, Par, par_col_tiles, sgemm, sgemm_new};
use crate::ops::activation::{Act, apply_act_seq};

/// A convolution's (dX, dW, db), each present when asked for.
pub type ConvGrads = (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>);

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
pub(crate) fn im2col_cols(g: &ConvGeometry, x: &[f32], q0: usize, len: usize, col: &mut [f32]) {
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
            // Output columns ox whose input column ix = ox * s + kx - pad is inside
            // [0, w): a contiguous range [lo, hi); zeros on either side.
            let s = g.stride as isize;
            let off = kx as isize - g.pad as isize;
            let lo = (((-off).max(0) + s - 1) / s).max(ox0 as isize) as usize;
            let hi = ((g.w as isize - off + s - 1) / s).clamp(0, (ox0 + seg) as isize) as usize;
            let hi = hi.max(lo);
            d[..lo.saturating_sub(ox0).min(seg)].fill(0.0);
            d[(hi - ox0).min(seg)..].fill(0.0);
            if hi > lo {
                let dst = &mut d[lo - ox0..hi - ox0];
                let first = (lo as isize * s + off) as usize;
                if g.stride == 1 {
                    dst.copy_from_slice(&srow[first..first + dst.len()]);
                } else {
                    for (i, v) in dst.iter_mut().enumerate() {
                        *v = srow[first + i * g.stride];
                    }
                }
            }
        }
        q += seg;
    }
}

/// Floats of im2col block per tile in the tiled path: 256 KiB, so that the block,
/// the weights and the output tile stay in a 512 KiB L2.
const TILE_FLOATS: usize = 1 << 16;
/// Weights up to this many values take the tiled path (each task re-packs them).
const SMALL_WEIGHTS: usize = 1 << 16;

/// out [n, o, ho*wo] = W [o, c*kh*kw] x col + bias + residual, then act.
///
/// Two schedules. Small weights (o * k <= 64 K, the ResNet stem and stage 1, the
/// decoder's mask-feature convs): parallel over (image, 256-pixel tile), each task
/// builds its im2col block in cache and runs a sequential GEMM into its own
/// columns, then the activation. Large weights: im2col of the whole image and one
/// GEMM parallelised inside.
pub fn conv2d(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    residual: Option<&[f32]>,
    act: Act,
) -> Vec<f32> {
    let p = g.ho * g.wo;
    let k = g.c * g.kh * g.kw;
    // The GEMMs write the products; bias, residual and activation follow in one
    // fused pass (per tile while it is in cache, or per row in parallel).
    let mut out = vec![0.0f32; g.n * g.o * p];
    let direct = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0;
    let img = g.c * g.h * g.w;
    if g.o * k <= SMALL_WEIGHTS {
        let _p = crate::profile::scope("conv2d.tiled");
        let tile = (TILE_FLOATS / k.max(1)).clamp(16, 1024) / 16 * 16;
        par_col_tiles(&mut out, g.n, g.o, p, tile, |bi, q0, tile, col| {
            let len = tile.cols();
            let xi = &x[bi * img..(bi + 1) * img];
            if direct {
                tile.gemm(
                    MatRef::rm(w, g.o, k),
                    MatRef {
                        data: &xi[q0..],
                        rows: k,
                        cols: len,
                        rs: p,
                        cs: 1,
                    },
                    false,
                );
            } else {
                col.resize(k * len, 0.0);
                im2col_cols(g, xi, q0, len, &mut col[..k * len]);
                tile.gemm(
                    MatRef::rm(w, g.o, k),
                    MatRef::rm(&col[..k * len], k, len),
                    false,
                );
            }
            tile_epilogue(tile, p * g.o * bi + q0, p, b, residual, act);
        });
        return out;
    }
    let mut col = if direct {
        Vec::new()
    } else {
        vec![0.0f32; k * p]
    };
    for i in 0..g.n {
        let xi = &x[i * img..(i + 1) * img];
        let rhs = if direct {
            MatRef::rm(xi, k, p)
        } else {
            let _p = crate::profile::scope("conv2d.im2col");
            im2col_par(g, xi, &mut col);
            MatRef::rm(&col, k, p)
        };
        let oi = &mut out[i * g.o * p..(i + 1) * g.o * p];
        let _p = crate::profile::scope("conv2d.gemm");
        sgemm(MatRef::rm(w, g.o, k), rhs, oi, p, 1, false, Par::Pool);
    }
    let _p = crate::profile::scope("conv2d.epilogue");
    out.par_chunks_mut(p).enumerate().for_each(|(i, row)| {
        if let Some(b) = b {
            let bv = b[i % g.o];
            row.iter_mut().for_each(|v| *v += bv);
        }
        if let Some(res) = residual {
            row.iter_mut()
                .zip(&res[i * p..(i + 1) * p])
                .for_each(|(v, r)| *v += r);
        }
        apply_act_seq(row, act);
    });
    out
}

/// bias + residual + activation on a tile of output channels x pixels
/// while it is in cache: row r is channel r (bias b[r]); its residual
/// starts at `res_at + r * p` (p: pixels per channel plane).
fn tile_epilogue(
    tile: &mut crate::cpu::Tile,
    res_at: usize,
    p: usize,
    b: Option<&[f32]>,
    residual: Option<&[f32]>,
    act: Act,
) {
    let len = tile.cols();
    for r in 0..tile.rows() {
        let row = tile.row_mut(r);
        if let Some(b) = b {
            let bv = b[r];
            row.iter_mut().for_each(|v| *v += bv);
        }
        if let Some(res) = residual {
            let at = res_at + r * p;
            row.iter_mut()
                .zip(&res[at..at + len])
                .for_each(|(v, r)| *v += r);
        }
        apply_act_seq(row, act);
    }
}

/// Output pixels per task of the bf16 convolutions: the packed-B tile
/// (K/2 x cols words) within ~512 KiB, 64 to 512 pixels.
fn bf16_tile(k: usize) -> usize {
    ((131_072 / k.div_ceil(2).max(1)) / 64 * 64).clamp(64, 512)
}

/// `conv2d` through the bf16 GEMM, W packed once as A [O, C kh kw]:
/// parallel over (image, pixel tile); each task writes the im2col of its
/// tile straight into bf16 k-pairs (a 1x1 stride-1 conv packs the input
/// itself), multiplies, and runs bias + residual + activation on the tile
/// in cache.
pub fn conv2d_bf16(
    g: &ConvGeometry,
    x: &[f32],
    w: &PackedA,
    b: Option<&[f32]>,
    residual: Option<&[f32]>,
    act: Act,
) -> crate::Result<Vec<f32>> {
    let _p = crate::profile::scope("conv2d.bf16");
    let p = g.ho * g.wo;
    let k = g.c * g.kh * g.kw;
    let mut out = vec![0.0f32; g.n * g.o * p];
    let direct = g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == 0;
    let img = g.c * g.h * g.w;
    gemm_bf16_tiles(
        w,
        g.n,
        p,
        bf16_tile(k),
        &mut out,
        &|bi, q0, len, col, words| {
            let xi = &x[bi * img..(bi + 1) * img];
            if direct {
                pack_b_rows(k, len, &xi[q0..], p, words);
            } else {
                // Panel by panel (64 pixels): the f32 im2col block stays
                // in L1/L2 between its writing and its packing.
                let panel = packed_b_len(k, 64);
                for (pi, dst) in words.chunks_mut(panel).enumerate() {
                    let (c0, w) = (pi * 64, 64.min(len - pi * 64));
                    col.resize(k * w, 0.0);
                    im2col_cols(g, xi, q0 + c0, w, &mut col[..k * w]);
                    pack_b_rows(k, w, col, w, dst);
                }
            }
        },
        &|bi, q0, tile| tile_epilogue(tile, p * g.o * bi + q0, p, b, residual, act),
    )?;
    Ok(out)
}

/// One output plane [h k, w k] of a transposed convolution (kernel = stride
/// = k) for channel `oc`, from the GEMM's product t: tap r = (oc k + ky) k + kx
/// of input pixel q at `t[r * tap_stride + q * pix_stride]` (tmp [O k k, H W]:
/// (H W, 1); its transpose [H W, O k k]: (1, O k k)); plus the bias, then the
/// activation. Every output pixel is written once.
#[allow(clippy::too_many_arguments)]
fn convt_plane(
    plane: &mut [f32],
    t: &[f32],
    oc: usize,
    (h, wd, k): (usize, usize, usize),
    (tap_stride, pix_stride): (usize, usize),
    bias: f32,
    act: Act,
) {
    let ow = wd * k;
    for y in 0..h {
        for ky in 0..k {
            let dst = &mut plane[(y * k + ky) * ow..(y * k + ky + 1) * ow];
            for kx in 0..k {
                let t0 = ((oc * k + ky) * k + kx) * tap_stride + y * wd * pix_stride;
                for xx in 0..wd {
                    dst[xx * k + kx] = t[t0 + xx * pix_stride] + bias;
                }
            }
        }
    }
    apply_act_seq(plane, act);
}

/// `conv_transpose2d` through the bf16 GEMM, W^T packed once as A
/// [O k k, C]: tmp [O k k, H W] per image (the input rows packed per
/// pixel tile), then the same scatter + bias + activation.
pub fn conv_transpose2d_bf16(
    x: &[f32],
    w: &PackedA,
    b: Option<&[f32]>,
    act: Act,
    (n, c, h, wd): (usize, usize, usize, usize),
    o: usize,
    k: usize,
) -> crate::Result<Vec<f32>> {
    let _p = crate::profile::scope("conv_transpose2d.bf16");
    let hw = h * wd;
    let rows = o * k * k;
    let (oh, ow) = (h * k, wd * k);
    let mut tmp = vec![0.0f32; n * rows * hw];
    gemm_bf16_tiles(
        w,
        n,
        hw,
        bf16_tile(c),
        &mut tmp,
        &|bi, j0, len, _, words| pack_b_rows(c, len, &x[bi * c * hw + j0..], hw, words),
        &|_, _, _| {},
    )?;
    let mut out = vec![0.0f32; n * o * oh * ow];
    out.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(i, plane)| {
            let (bi, oc) = (i / o, i % o);
            let t = &tmp[bi * rows * hw..(bi + 1) * rows * hw];
            let bv = b.map_or(0.0, |b| b[oc]);
            convt_plane(plane, t, oc, (h, wd, k), (hw, 1), bv, act);
        });
    Ok(out)
}

/// Transposed conv with kernel = stride = k: every input pixel writes its own k x k
/// output patch. tmp [o*k*k, h*w] = W^T [o*k*k, c] x X [c, h*w], then scatter.
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    act: Act,
    n: usize,
    c: usize,
    h: usize,
    wd: usize,
    o: usize,
    k: usize,
) -> Vec<f32> {
    let hw = h * wd;
    let rows = o * k * k;
    let (oh, ow) = (h * k, wd * k);
    let mut out = vec![0.0f32; n * o * oh * ow];
    // tmp [o*k*k, h*w] of one image -> its output planes [o, kh, kw].
    let scatter = |tmp: &[f32], oc: usize, plane: &mut [f32]| {
        let bv = b.map_or(0.0, |b| b[oc]);
        convt_plane(plane, tmp, oc, (h, wd, k), (hw, 1), bv, act);
    };
    if hw < 128 {
        // Few input pixels (adapter 3: 8 x 8): as tmp [O k k, HW] the product is
        // short and wide and the packed kernels stall (a batch of two images at
        // 8 x 8 ran at a third of the GEMM's rate); compute its transpose
        // tmpT [HW, O k k] = X^T W per image, which takes the column-split path.
        let mut tmp_t = vec![0.0f32; hw * rows];
        for (i, oi) in out.chunks_mut(o * oh * ow).enumerate() {
            sgemm(
                MatRef::tr(&x[i * c * hw..(i + 1) * c * hw], hw, c),
                MatRef::rm(w, c, rows),
                &mut tmp_t,
                rows,
                1,
                false,
                Par::Pool,
            );
            oi.par_chunks_mut(oh * ow)
                .enumerate()
                .for_each(|(oc, plane)| {
                    let bv = b.map_or(0.0, |b| b[oc]);
                    convt_plane(plane, &tmp_t, oc, (h, wd, k), (1, rows), bv, act);
                });
        }
    } else if n == 1 {
        let mut tmp = vec![0.0f32; rows * hw];
        sgemm(
            MatRef::tr(w, rows, c),
            MatRef::rm(x, c, hw),
            &mut tmp,
            hw,
            1,
            false,
            Par::Pool,
        );
        out.par_chunks_mut(oh * ow)
            .enumerate()
            .for_each(|(oc, plane)| scatter(&tmp, oc, plane));
    } else {
        // A batch (the decoder's boxes): one image per task, sequential GEMMs.
        out.par_chunks_mut(o * oh * ow)
            .enumerate()
            .for_each_init(Vec::new, |tmp, (i, oi)| {
                tmp.resize(rows * hw, 0.0);
                sgemm(
                    MatRef::tr(w, rows, c),
                    MatRef::rm(&x[i * c * hw..(i + 1) * c * hw], c, hw),
                    tmp,
                    hw,
                    1,
                    false,
                    Par::Seq,
                );
                for (oc, plane) in oi.chunks_mut(oh * ow).enumerate() {
                    scatter(tmp, oc, plane);
                }
            });
    }
    out
}

/// Max pooling of `planes` planes h x w -> ho x wo (kernel k, stride s,
/// padding p with -inf, as PyTorch), and, when `want_argmax`, for each
/// output the index in its plane of the value it took: the backward's saved
/// argmax. The first maximum in (ky, kx) order wins ties; a NaN takes over
/// (the last one seen), as PyTorch's kernel does.
#[allow(clippy::too_many_arguments)]
pub fn max_pool2d(
    x: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (ho, wo): (usize, usize),
    k: usize,
    s: usize,
    p: usize,
    want_argmax: bool,
) -> (Vec<f32>, Option<Vec<u32>>) {
    let mut out = vec![0.0f32; planes * ho * wo];
    let mut idx = vec![0u32; if want_argmax { planes * ho * wo } else { 0 }];
    let plane = |pl: usize, o: &mut [f32], mut at_out: Option<&mut [u32]>| {
        let src = &x[pl * h * w..(pl + 1) * h * w];
        for oy in 0..ho {
            for ox in 0..wo {
                let (mut m, mut at) = (f32::NEG_INFINITY, None);
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
                        let i = iy as usize * w + ix as usize;
                        let v = src[i];
                        // NaN propagates as in PyTorch.
                        if at.is_none() || v > m || v.is_nan() {
                            (m, at) = (v, Some(i));
                        }
                    }
                }
                o[oy * wo + ox] = m;
                if let Some(a) = at_out.as_deref_mut() {
                    // A window without taps cannot happen (padding <= k / 2,
                    // checked by the op); u32::MAX would take no gradient.
                    a[oy * wo + ox] = at.map_or(u32::MAX, |i| i as u32);
                }
            }
        }
    };
    let howo = (ho * wo).max(1);
    if want_argmax {
        out.par_chunks_mut(howo)
            .zip(idx.par_chunks_mut(howo))
            .enumerate()
            .for_each(|(pl, (o, a))| plane(pl, o, Some(a)));
    } else {
        out.par_chunks_mut(howo)
            .enumerate()
            .for_each(|(pl, o)| plane(pl, o, None));
    }
    (out, want_argmax.then_some(idx))
}

/// Below this many output pixels per image (the ResNet's stages 3-4 and the
/// adapters at 16 x 16 and 8 x 8) the backward GEMMs take the whole batch at
/// once, images side by side: per image their inner (dW) or outer (dX)
/// dimension would be 64-256 long, where the packed kernels run at half
/// their rate.
const MERGE_PIXELS: usize = 1024;
/// ... as long as the side-by-side copies stay under 64 MiB each.
const MERGE_FLOATS: usize = 1 << 24;

/// [n, rows, p] (images one after another) -> [rows, n p] (image i in
/// columns i p ..): a batch as one matrix whose columns are every pixel.
fn side_by_side(src: &[f32], n: usize, rows: usize, p: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * n * p];
    out.par_chunks_mut((n * p).max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            for (i, d) in dst.chunks_exact_mut(p.max(1)).enumerate() {
                d.copy_from_slice(&src[(i * rows + r) * p..(i * rows + r + 1) * p]);
            }
        });
    out
}

/// The inverse of `side_by_side`: [rows, n p] -> dst [n, rows, p].
fn one_after_another(src: &[f32], n: usize, rows: usize, p: usize, dst: &mut [f32]) {
    dst.par_chunks_mut(p.max(1))
        .enumerate()
        .for_each(|(ir, d)| {
            let (i, r) = (ir / rows, ir % rows);
            d.copy_from_slice(&src[r * n * p + i * p..][..p]);
        });
}

/// im2col of one whole image x [c, h, w] into col [c kh kw, ho wo], rows in
/// parallel.
fn im2col_par(g: &ConvGeometry, x: &[f32], col: &mut [f32]) {
    let p = g.ho * g.wo;
    col.par_chunks_mut(p.max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            let (ci, ky, kx) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
            im2col_row(g, &x[ci * g.h * g.w..(ci + 1) * g.h * g.w], ky, kx, 0, dst);
        });
}

/// `conv2d_backward` with the batch's images side by side (see
/// `MERGE_PIXELS`): dW = G_all col_all^T in one GEMM whose inner dimension runs
/// over every pixel of every image in image order, dX_all = W^T G_all, then
/// col2im per image.
fn conv2d_backward_side_by_side(
    geo: &ConvGeometry,
    grad: &[f32],
    x: Option<&[f32]>,
    w: Option<&[f32]>,
    want_b: bool,
    direct: bool,
) -> ConvGrads {
    let p = geo.ho * geo.wo;
    let np = geo.n * p;
    let k = geo.c * geo.kh * geo.kw;
    let img = geo.c * geo.h * geo.w;
    // g_all [o, n p]
    let g_all = side_by_side(grad, geo.n, geo.o, p);
    let dw = x.map(|x| {
        let _p = crate::profile::scope("conv2d.bw.dw");
        // col_all [k, n p]
        let col_all = if direct {
            side_by_side(x, geo.n, geo.c, p)
        } else {
            let _c = crate::profile::scope("conv2d.bw.im2col");
            let mut col = vec![0.0f32; k * np];
            col.par_chunks_mut(np).enumerate().for_each(|(r, dst)| {
                let (ci, ky, kx) = (r / (geo.kh * geo.kw), (r / geo.kw) % geo.kh, r % geo.kw);
                for (i, d) in dst.chunks_exact_mut(p).enumerate() {
                    let plane = &x[i * img + ci * geo.h * geo.w..][..geo.h * geo.w];
                    im2col_row(geo, plane, ky, kx, 0, d);
                }
            });
            col
        };
        // dw [o, k]
        sgemm_new(
            MatRef::rm(&g_all, geo.o, np),
            MatRef::tr(&col_all, np, k),
            Par::Pool,
        )
    });
    let dx = w.map(|w| {
        let _p = crate::profile::scope("conv2d.bw.dx");
        // dcol_all [k, n p]
        let dcol = {
            let _g = crate::profile::scope("conv2d.bw.dx.gemm");
            sgemm_new(
                MatRef::tr(w, k, geo.o),
                MatRef::rm(&g_all, geo.o, np),
                Par::Pool,
            )
        };
        let mut dx = vec![0.0f32; geo.n * img];
        if direct {
            // k = c and img = c p: dcol is dX side by side.
            one_after_another(&dcol, geo.n, geo.c, p, &mut dx);
        } else {
            let _c = crate::profile::scope("conv2d.bw.col2im");
            for (i, dxi) in dx.chunks_exact_mut(img).enumerate() {
                col2im_gather(geo, &dcol, np, i * p, dxi);
            }
        }
        dx
    });
    (dx, dw, want_b.then(|| bias_grad(grad, geo.o, p)))
}

/// db [o] = sums of G [n, o, p] per channel in f64, images in order.
fn bias_grad(grad: &[f32], o: usize, p: usize) -> Vec<f32> {
    let mut acc = vec![0.0f64; o];
    for gi in grad.chunks_exact(o * p) {
        for (a, plane) in acc.iter_mut().zip(gi.chunks_exact(p)) {
            *a += plane.iter().map(|&v| v as f64).sum::<f64>();
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// conv2d backward for G [n, o, ho wo] (the output's gradient, after the
/// activation): dX (when `w` is given: x needs one) by W^T G per image and a
/// col2im written as a gather (each input pixel sums the taps that read it),
/// dW (when `x` is given) = sum over images of G_i col_i^T, db = sums of G.
/// Images in order, so the sums do not depend on the thread count.
pub fn conv2d_backward(
    geo: &ConvGeometry,
    grad: &[f32],
    x: Option<&[f32]>,
    w: Option<&[f32]>,
    want_b: bool,
) -> ConvGrads {
    let p = geo.ho * geo.wo;
    let k = geo.c * geo.kh * geo.kw;
    let img = geo.c * geo.h * geo.w;
    // A 1 x 1, stride-1, unpadded convolution's im2col is the image itself
    // and its col2im the identity: the GEMMs read x and write dx directly
    // (the same sums, without the copies).
    let direct = geo.kh == 1 && geo.kw == 1 && geo.stride == 1 && geo.pad == 0;
    if geo.n > 1 && p < MERGE_PIXELS && k.max(geo.o) * geo.n * p <= MERGE_FLOATS {
        return conv2d_backward_side_by_side(geo, grad, x, w, want_b, direct);
    }
    let dw = x.map(|x| {
        let _p = crate::profile::scope("conv2d.bw.dw");
        if geo.o < 128 && geo.n > 1 {
            // Few output channels (the stem, the decoder's mask-feature
            // convolutions): G_i col_i^T is a short product that the pool
            // splits badly (40-70 GFLOP/s on two cores); one sequential
            // GEMM per image on each core instead, the images' products
            // then added in image order.
            let parts: Vec<Vec<f32>> = (0..geo.n)
                .into_par_iter()
                .map(|i| {
                    let xi = &x[i * img..(i + 1) * img];
                    let col;
                    let cols = if direct {
                        xi
                    } else {
                        let mut c = vec![0.0f32; k * p];
                        im2col_cols(geo, xi, 0, p, &mut c);
                        col = c;
                        &col[..]
                    };
                    sgemm_new(
                        MatRef::rm(&grad[i * geo.o * p..(i + 1) * geo.o * p], geo.o, p),
                        MatRef::tr(cols, p, k),
                        Par::Seq,
                    )
                })
                .collect();
            let mut parts = parts.into_iter();
            let mut dw = parts.next().expect("n > 1");
            for part in parts {
                dw.iter_mut().zip(&part).for_each(|(s, v)| *s += v);
            }
            return dw;
        }
        let mut dw = vec![0.0f32; geo.o * k];
        let mut col = vec![0.0f32; if direct { 0 } else { k * p }];
        for i in 0..geo.n {
            let xi = &x[i * img..(i + 1) * img];
            let cols = if direct {
                xi
            } else {
                let _c = crate::profile::scope("conv2d.bw.im2col");
                im2col_par(geo, xi, &mut col);
                &col[..]
            };
            sgemm(
                MatRef::rm(&grad[i * geo.o * p..(i + 1) * geo.o * p], geo.o, p),
                MatRef::tr(cols, p, k),
                &mut dw,
                k,
                1,
                i > 0,
                Par::Pool,
            );
        }
        dw
    });
    let dx = w.map(|w| {
        let _p = crate::profile::scope("conv2d.bw.dx");
        let mut dx = vec![0.0f32; geo.n * img];
        if direct {
            for (i, dxi) in dx.chunks_exact_mut(img).enumerate() {
                let _g = crate::profile::scope("conv2d.bw.dx.gemm");
                sgemm(
                    MatRef::tr(w, k, geo.o),
                    MatRef::rm(&grad[i * geo.o * p..(i + 1) * geo.o * p], geo.o, p),
                    dxi,
                    p,
                    1,
                    false,
                    Par::Pool,
                );
            }
            return dx;
        }
        let mut dcol = vec![0.0f32; k * p];
        for i in 0..geo.n {
            let _g = crate::profile::scope("conv2d.bw.dx.gemm");
            sgemm(
                MatRef::tr(w, k, geo.o),
                MatRef::rm(&grad[i * geo.o * p..(i + 1) * geo.o * p], geo.o, p),
                &mut dcol,
                p,
                1,
                false,
                Par::Pool,
            );
            drop(_g);
            let _c = crate::profile::scope("conv2d.bw.col2im");
            col2im_gather(geo, &dcol, p, 0, &mut dx[i * img..(i + 1) * img]);
        }
        dx
    });
    (dx, dw, want_b.then(|| bias_grad(grad, geo.o, p)))
}

/// dx [c, h, w] of one image from dcol [c kh kw, ho wo] (col2im; row r of
/// dcol at `r * ld + off`, so that the image can be one of several side by
/// side): each
/// channel's plane is summed by one task, taps in order (ky, kx), output rows
/// in order, so the sums do not depend on the thread count.
fn col2im_gather(geo: &ConvGeometry, dcol: &[f32], ld: usize, off: usize, dx: &mut [f32]) {
    let (h, w, s, pad) = (geo.h, geo.w, geo.stride, geo.pad);
    let p = geo.ho * geo.wo;
    dx.par_chunks_mut(h * w)
        .enumerate()
        .for_each(|(ci, plane)| {
            plane.fill(0.0);
            for ky in 0..geo.kh {
                for kx in 0..geo.kw {
                    let r = (ci * geo.kh + ky) * geo.kw + kx;
                    let src = &dcol[r * ld + off..r * ld + off + p];
                    // Output columns whose input column ox s + kx - pad lies in [0, w).
                    let lo = pad.saturating_sub(kx).div_ceil(s);
                    let hi = ((w + pad).saturating_sub(kx)).div_ceil(s).min(geo.wo);
                    if lo >= hi {
                        continue;
                    }
                    for oy in 0..geo.ho {
                        let iy = (oy * s + ky) as isize - pad as isize;
                        if iy < 0 || iy as usize >= h {
                            continue;
                        }
                        let row = &mut plane[iy as usize * w..(iy as usize + 1) * w];
                        let srow = &src[oy * geo.wo..(oy + 1) * geo.wo];
                        let x0 = lo * s + kx - pad;
                        if s == 1 {
                            for (d, &v) in row[x0..x0 + (hi - lo)].iter_mut().zip(&srow[lo..hi]) {
                                *d += v;
                            }
                        } else {
                            for (j, &v) in srow[lo..hi].iter().enumerate() {
                                row[x0 + j * s] += v;
                            }
                        }
                    }
                }
            }
        });
}

/// conv_transpose2d (kernel = stride = k) backward for G [n, o, hk, wk]:
/// Gt_i [o k k, h w] gathers each image's gradient back into the GEMM's
/// layout; dX_i = W [c, o k k] Gt_i, dW = sum_i X_i Gt_i^T, db = sums of G.
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose2d_backward(
    grad: &[f32],
    x: Option<&[f32]>,
    w: Option<&[f32]>,
    want_b: bool,
    (n, c, h, wd): (usize, usize, usize, usize),
    o: usize,
    k: usize,
) -> ConvGrads {
    let hw = h * wd;
    let rows = o * k * k;
    let (oh, ow) = (h * k, wd * k);
    let per_out = o * oh * ow;
    // Small inputs (adapter 3 at 8 x 8, the bridges at 16 x 16): the whole
    // batch side by side in one GEMM each (see MERGE_PIXELS); else image by
    // image. Either way the images are summed in order.
    let group = if n > 1 && hw < MERGE_PIXELS && rows.max(c) * n * hw <= MERGE_FLOATS {
        n
    } else {
        1
    };
    let mut dx = w.map(|_| vec![0.0f32; n * c * hw]);
    let mut dw = x.map(|_| vec![0.0f32; c * rows]);
    for i0 in (0..n).step_by(group) {
        let cols = group * hw;
        // gt [rows, group hw]: the images' gradients in the GEMM's layout.
        let mut gt = vec![0.0f32; rows * cols];
        let gather = crate::profile::scope("conv_transpose2d.bw.gather");
        gt.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
            let (oc, ky, kx) = (r / (k * k), (r / k) % k, r % k);
            for (j, dst) in row.chunks_exact_mut(hw).enumerate() {
                let gi = &grad[(i0 + j) * per_out + oc * oh * ow..][..oh * ow];
                for y in 0..h {
                    for xx in 0..wd {
                        dst[y * wd + xx] = gi[(y * k + ky) * ow + xx * k + kx];
                    }
                }
            }
        });
        drop(gather);
        if let (Some(dx), Some(w)) = (dx.as_mut(), w) {
            let _p = crate::profile::scope("conv_transpose2d.bw.dx");
            let dxs = &mut dx[i0 * c * hw..(i0 + group) * c * hw];
            if group == 1 {
                sgemm(
                    MatRef::rm(w, c, rows),
                    MatRef::rm(&gt, rows, hw),
                    dxs,
                    hw,
                    1,
                    false,
                    Par::Pool,
                );
            } else {
                // [c, group hw], then each image's planes in place.
                let mut t = vec![0.0f32; c * cols];
                sgemm(
                    MatRef::rm(w, c, rows),
                    MatRef::rm(&gt, rows, cols),
                    &mut t,
                    cols,
                    1,
                    false,
                    Par::Pool,
                );
                one_after_another(&t, group, c, hw, dxs);
            }
        }
        if let (Some(dw), Some(x)) = (dw.as_mut(), x) {
            let _p = crate::profile::scope("conv_transpose2d.bw.dw");
            let xs = &x[i0 * c * hw..(i0 + group) * c * hw];
            let merged;
            let xs = if group == 1 {
                xs
            } else {
                merged = side_by_side(xs, group, c, hw);
                &merged[..]
            };
            sgemm(
                MatRef::rm(xs, c, cols),
                MatRef::tr(&gt, cols, rows),
                dw,
                rows,
                1,
                i0 > 0,
                Par::Pool,
            );
        }
    }
    let _p = crate::profile::scope("conv_transpose2d.bw.db");
    (dx, dw, want_b.then(|| bias_grad(grad, o, oh * ow)))
}

/// max_pool2d's backward from the forward's saved argmax: each output's
/// gradient added at the input it took, per plane in output order (the
/// sums of the recomputing version before it, which the CUDA kernel's
/// gather matches bit for bit in tests/kernels_host.rs). argmax, grad
/// [planes, ho wo].
pub fn max_pool2d_backward(
    argmax: &[u32],
    grad: &[f32],
    planes: usize,
    hw: usize,
    howo: usize,
) -> Vec<f32> {
    let mut dx = vec![0.0f32; planes * hw];
    dx.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(pl, d)| {
            let (a, g) = (
                &argmax[pl * howo..(pl + 1) * howo],
                &grad[pl * howo..(pl + 1) * howo],
            );
            for (&i, &gv) in a.iter().zip(g) {
                if let Some(t) = d.get_mut(i as usize) {
                    *t += gv;
                }
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        crate::testing::rand(n, seed, 1.0)
    }

    fn close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}");
        let (mut d, mut r) = (0.0f64, 0.0f64);
        for (&g, &w) in got.iter().zip(want) {
            d += (g as f64 - w as f64).powi(2);
            r += (w as f64).powi(2);
        }
        let rel = (d / r.max(1e-30)).sqrt();
        assert!(rel < 1e-6, "{what}: relative L2 {rel:e}");
    }

    /// The backward of a batch (images side by side below MERGE_PIXELS, one
    /// after another above) equals the images' backward one by one: dX per
    /// image, dW and db summed over the images.
    #[test]
    fn batch_backward_equals_images_one_by_one() {
        // (c, h, w, o, k, stride, pad): 1 x 1 direct, 3 x 3, strided 3 x 3, the
        // 7 x 7 stem; above MERGE_PIXELS (36 x 32 outputs) with few output
        // channels (dW image-parallel) and with 128 (dW image after image).
        for (c, h, w, o, k, s, pad) in [
            (5, 6, 7, 4, 1, 1, 0),
            (3, 8, 8, 6, 3, 1, 1),
            (4, 9, 8, 5, 3, 2, 1),
            (3, 11, 10, 4, 7, 2, 3),
            (2, 36, 32, 3, 3, 1, 1),
            (2, 36, 32, 128, 3, 1, 1),
            (3, 32, 32, 128, 1, 1, 0),
        ] {
            let n = 3;
            let geo = |n| ConvGeometry {
                n,
                c,
                h,
                w,
                o,
                kh: k,
                kw: k,
                stride: s,
                pad,
                ho: (h + 2 * pad - k) / s + 1,
                wo: (w + 2 * pad - k) / s + 1,
            };
            let (img, p) = (c * h * w, geo(1).ho * geo(1).wo);
            let x = rand(n * img, 1);
            let wt = rand(o * c * k * k, 2);
            let g = rand(n * o * p, 3);
            let (dx, dw, db) = conv2d_backward(&geo(n), &g, Some(&x), Some(&wt), true);
            let (mut dx1, mut dw1, mut db1) = (vec![], vec![0.0f32; wt.len()], vec![0.0f32; o]);
            for i in 0..n {
                let (a, b, c) = conv2d_backward(
                    &geo(1),
                    &g[i * o * p..(i + 1) * o * p],
                    Some(&x[i * img..(i + 1) * img]),
                    Some(&wt),
                    true,
                );
                dx1.extend(a.unwrap());
                dw1.iter_mut().zip(b.unwrap()).for_each(|(s, v)| *s += v);
                db1.iter_mut().zip(c.unwrap()).for_each(|(s, v)| *s += v);
            }
            let what = format!("conv2d c{c} {h}x{w} o{o} k{k} s{s} p{pad}");
            close(&format!("{what} dx"), &dx.unwrap(), &dx1);
            close(&format!("{what} dw"), &dw.unwrap(), &dw1);
            close(&format!("{what} db"), &db.unwrap(), &db1);
        }
        // Transposed convolutions: 8 x 8 (side by side) and 33 x 32 (one by one).
        for (c, h, w, o, k) in [(6, 8, 8, 4, 2), (3, 33, 32, 2, 2)] {
            let n = 2;
            let (hw, per_out) = (h * w, o * h * k * w * k);
            let x = rand(n * c * hw, 4);
            let wt = rand(c * o * k * k, 5);
            let g = rand(n * per_out, 6);
            let (dx, dw, db) =
                conv_transpose2d_backward(&g, Some(&x), Some(&wt), true, (n, c, h, w), o, k);
            let (mut dx1, mut dw1, mut db1) = (vec![], vec![0.0f32; wt.len()], vec![0.0f32; o]);
            for i in 0..n {
                let (a, b, cc) = conv_transpose2d_backward(
                    &g[i * per_out..(i + 1) * per_out],
                    Some(&x[i * c * hw..(i + 1) * c * hw]),
                    Some(&wt),
                    true,
                    (1, c, h, w),
                    o,
                    k,
                );
                dx1.extend(a.unwrap());
                dw1.iter_mut().zip(b.unwrap()).for_each(|(s, v)| *s += v);
                db1.iter_mut().zip(cc.unwrap()).for_each(|(s, v)| *s += v);
            }
            let what = format!("conv_transpose2d c{c} {h}x{w} o{o} k{k}");
            close(&format!("{what} dx"), &dx.unwrap(), &dx1);
            close(&format!("{what} dw"), &dw.unwrap(), &dw1);
            close(&format!("{what} db"), &db.unwrap(), &db1);
        }
    }
}
