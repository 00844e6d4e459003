//! A bf16 GEMM for CPUs with AVX512_BF16 (issue 14, first part): C = A B
//! (or C += A B) with A's and B's values rounded to bf16 (round to nearest
//! even) and products accumulated in f32 by `vdpbf16ps`, which adds two
//! bf16 products per f32 lane per instruction: twice the f32 FMA's rate.
//!
//! Layouts (k-pairs: the two bf16 values a `vdpbf16ps` lane multiplies):
//! - B, packed once (weights): panels of NR = 64 columns; in a panel, for
//!   each k-pair, the 64 columns' pairs (b[2p][j], b[2p+1][j]) as 32-bit
//!   words: [panels][K/2][64] words, an odd K padded with a zero row.
//! - A, packed per call: blocks of MR = 6 rows; in a block, for each
//!   k-pair, the 6 rows' pairs: [blocks][K/2][6] words.
//!
//! The microkernel keeps a 6 x 64 tile of C in 24 zmm registers; per
//! k-pair it loads 4 vectors of B and broadcasts 6 words of A. Not wired
//! into the model yet.

use rayon::prelude::*;

use crate::error::{Error, Result};

const MR: usize = 6;
const NR: usize = 64;

/// Whether this CPU has AVX-512 F / BW and BF16 (checked once).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 -> bf16 bits, round to nearest even (NaN stays NaN).
#[inline]
fn bf16(x: f32) -> u32 {
    half::bf16::from_f32(x).to_bits() as u32
}

/// Two bf16 values as one 32-bit word, the first in the low half (the
/// lane's even element).
#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16(lo) | (bf16(hi) << 16)
}

/// B [K, N] rounded to bf16 and packed for the microkernel.
#[derive(Clone, Debug)]
pub struct PackedB {
    pub k: usize,
    pub n: usize,
    /// [ceil(N / 64)][ceil(K / 2)][64] words.
    words: Vec<u32>,
}

impl PackedB {
    /// From `b(k, n)`: any element order (row-major B, or a linear
    /// layer's weight [N, K] read transposed).
    fn build(k: usize, n: usize, b: impl Fn(usize, usize) -> f32 + Sync) -> PackedB {
        let (k2, panels) = (k.div_ceil(2), n.div_ceil(NR));
        let mut words = vec![0u32; panels * k2 * NR];
        words
            .par_chunks_mut(k2 * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for kp in 0..k2 {
                    for j in 0..NR {
                        let col = p * NR + j;
                        if col >= n {
                            continue;
                        }
                        let lo = b(2 * kp, col);
                        let hi = if 2 * kp + 1 < k {
                            b(2 * kp + 1, col)
                        } else {
                            0.0
                        };
                        panel[kp * NR + j] = pair(lo, hi);
                    }
                }
            });
        PackedB { k, n, words }
    }

    /// B row-major [K, N].
    pub fn from_kn(b: &[f32], k: usize, n: usize) -> Result<PackedB> {
        check("bf16 pack", b.len(), k * n, &format!("B [{k}, {n}]"))?;
        Ok(Self::build(k, n, |r, c| b[r * n + c]))
    }

    /// A linear layer's weight W [N, K] (y = x W^T: B = W^T).
    pub fn from_nk(w: &[f32], n: usize, k: usize) -> Result<PackedB> {
        check("bf16 pack", w.len(), n * k, &format!("W [{n}, {k}]"))?;
        Ok(Self::build(k, n, |r, c| w[c * k + r]))
    }
}

fn check(op: &'static str, got: usize, want: usize, what: &str) -> Result<()> {
    if got != want {
        return Err(Error::shape(op, format!("{got} values for {what}")));
    }
    Ok(())
}

/// C [M, N] = A [M, K] B (or += with `accumulate`), A's values rounded to
/// bf16, products summed in f32. Needs AVX512_BF16 (`has_avx512_bf16`);
/// without it an error says so (the caller runs f32 instead).
pub fn gemm_bf16(a: &[f32], m: usize, b: &PackedB, c: &mut [f32], accumulate: bool) -> Result<()> {
    const OP: &str = "gemm_bf16";
    let (k, n) = (b.k, b.n);
    check(OP, a.len(), m * k, &format!("A [{m}, {k}]"))?;
    check(OP, c.len(), m * n, &format!("C [{m}, {n}]"))?;
    if !has_avx512_bf16() {
        return Err(Error::input(OP, "this CPU has no AVX512_BF16"));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let k2 = k.div_ceil(2);
    // Rows in tasks of whole 6-row blocks; each task packs its rows of A
    // and sweeps every panel of B.
    const TASK: usize = MR * 8;
    c.par_chunks_mut(TASK * n).enumerate().for_each(|(t, ct)| {
        let r0 = t * TASK;
        let rows = ct.len() / n;
        let blocks = rows.div_ceil(MR);
        let mut ap = vec![0u32; blocks * k2 * MR];
        for blk in 0..blocks {
            let dst = &mut ap[blk * k2 * MR..(blk + 1) * k2 * MR];
            for i in 0..MR {
                let r = blk * MR + i;
                if r >= rows {
                    continue;
                }
                let row = &a[(r0 + r) * k..(r0 + r + 1) * k];
                for kp in 0..k2 {
                    let hi = if 2 * kp + 1 < k { row[2 * kp + 1] } else { 0.0 };
                    dst[kp * MR + i] = pair(row[2 * kp], hi);
                }
            }
        }
        for p in 0..n.div_ceil(NR) {
            let bp = &b.words[p * k2 * NR..(p + 1) * k2 * NR];
            let cols = NR.min(n - p * NR);
            for blk in 0..blocks {
                let rws = MR.min(rows - blk * MR);
                let apb = &ap[blk * k2 * MR..(blk + 1) * k2 * MR];
                let c0 = blk * MR * n + p * NR;
                // SAFETY: the CPU has AVX-512 F / BW / BF16 (checked
                // above); apb holds k2 x 6 words, bp k2 x 64, and the
                // tile [rws, cols] at c0 with row stride n lies in ct.
                unsafe {
                    kernel(k2, apb, bp, &mut ct[c0..], n, rws, cols, accumulate);
                }
            }
        }
    });
    Ok(())
}

/// One 6 x 64 tile: C[rows, cols] (row stride ldc) = or += the packed A
/// block times the packed B panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    k2: usize,
    a: &[u32],
    b: &[u32],
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= k2 * MR && b.len() >= k2 * NR);
    let mut acc = [[_mm512_setzero_ps(); 4]; MR];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for kp in 0..k2 {
        // SAFETY: kp < k2, so the 4 vectors at bp + 64 kp and the 6 words
        // at ap + 6 kp are inside the slices (checked by the caller).
        let bv: [__m512bh; 4] = unsafe {
            std::array::from_fn(|j| {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    bp.add(kp * NR + 16 * j) as *const __m512i,
                ))
            })
        };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let av = unsafe {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *ap.add(kp * MR + i) as i32
                ))
            };
            for (j, v) in row.iter_mut().enumerate() {
                *v = _mm512_dpbf16_ps(*v, av, bv[j]);
            }
        }
    }
    let full = rows == MR && cols == NR;
    for (i, row) in acc.iter().enumerate().take(rows) {
        if full {
            for (j, v) in row.iter().enumerate() {
                // SAFETY: the tile lies in c (row i < rows, 64 columns).
                unsafe {
                    let p = c.as_mut_ptr().add(i * ldc + 16 * j);
                    let out = if accumulate {
                        _mm512_add_ps(_mm512_loadu_ps(p), *v)
                    } else {
                        *v
                    };
                    _mm512_storeu_ps(p, out);
                }
            }
        } else {
            let mut tmp = [0f32; NR];
            for (j, v) in row.iter().enumerate() {
                // SAFETY: tmp holds 64 floats.
                unsafe { _mm512_storeu_ps(tmp.as_mut_ptr().add(16 * j), *v) };
            }
            let dst = &mut c[i * ldc..i * ldc + cols];
            for (d, &t) in dst.iter_mut().zip(&tmp) {
                *d = if accumulate { *d + t } else { t };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel(
    _: usize,
    _: &[u32],
    _: &[u32],
    _: &mut [f32],
    _: usize,
    _: usize,
    _: usize,
    _: bool,
) {
    unreachable!("has_avx512_bf16 is false off x86-64")
}

/// The dot-product roofline of this CPU, for benchmarks: `iters` rounds of
/// 24 independent `vdpbf16ps` on registers (no memory traffic) on every
/// rayon thread; returns the FLOP done (64 per instruction: 32 products,
/// 32 adds). 0 without AVX512_BF16.
pub fn dot_roofline(iters: usize) -> u64 {
    if !has_avx512_bf16() {
        return 0;
    }
    let threads = rayon::current_num_threads();
    let sink: f32 = (0..threads)
        .into_par_iter()
        // SAFETY: the CPU has AVX-512 F / BW / BF16 (checked above).
        .map(|t| unsafe { roofline_thread(iters, t as f32) })
        .sum();
    std::hint::black_box(sink);
    (threads * iters * 24 * 64) as u64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn roofline_thread(iters: usize, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: both are 512-bit vectors; any bits are valid bf16 values.
    let (a, b): (__m512bh, __m512bh) = unsafe {
        (
            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3f80_3f80)),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3c00_3c00 + seed as i32)),
        )
    };
    let mut acc = [_mm512_setzero_ps(); 24];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in acc {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn roofline_thread(_: usize, _: f32) -> f32 {
    0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn round(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f64()
    }

    /// Against an f64 product of the bf16-rounded inputs: equal up to the
    /// f32 accumulation (|d| <= K eps sum |a b|), at shapes with partial
    /// tiles and an odd K, overwriting and accumulating, from [K, N] and
    /// from a weight [N, K].
    #[test]
    fn matches_f64_of_rounded_inputs() {
        if !has_avx512_bf16() {
            println!("no AVX512_BF16 on this CPU: the kernel is not run");
            assert!(
                gemm_bf16(
                    &[0.0],
                    1,
                    &PackedB::from_kn(&[0.0], 1, 1).unwrap(),
                    &mut [0.0],
                    false
                )
                .is_err()
            );
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 13, 65),
            (50, 64, 128),
            (13, 301, 70),
            (96, 768, 192),
        ] {
            let (a, b) = (rand(m * k, 1 + m as u64), rand(k * n, 2 + n as u64));
            let c0 = rand(m * n, 3);
            let pb = PackedB::from_kn(&b, k, n).unwrap();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let pw = PackedB::from_nk(&bt, n, k).unwrap();
            for (packed, accumulate) in [(&pb, false), (&pw, true)] {
                let mut c = c0.clone();
                gemm_bf16(&a, m, packed, &mut c, accumulate).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let (mut s, mut mag) = (0.0f64, 0.0f64);
                        for l in 0..k {
                            let p = round(a[i * k + l]) * round(b[l * n + j]);
                            s += p;
                            mag += p.abs();
                        }
                        if accumulate {
                            s += c0[i * n + j] as f64;
                            mag += (c0[i * n + j] as f64).abs();
                        }
                        let d = (c[i * n + j] as f64 - s).abs();
                        let bound = (k as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-30;
                        assert!(
                            d <= bound,
                            "{m}x{k}x{n} [{i},{j}]: {} vs {s} (|d| {d:e} > {bound:e})",
                            c[i * n + j]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        let pb = PackedB::from_kn(&[1.0; 6], 2, 3).unwrap();
        assert!(PackedB::from_kn(&[1.0; 5], 2, 3).is_err());
        assert!(gemm_bf16(&[1.0; 3], 2, &pb, &mut [0.0; 6], false).is_err());
        assert!(gemm_bf16(&[1.0; 4], 2, &pb, &mut [0.0; 5], false).is_err());
    }
}
