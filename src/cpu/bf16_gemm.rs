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
//! k-pair it loads 4 vectors of B and broadcasts 6 words of A.
//!
//! Two drivers: `gemm_bf16` (A per call, B packed once: the ViT's linears,
//! x W^T) and `gemm_bf16_tiles` (A packed once: a convolution's weights;
//! B packed per column tile by the caller, e.g. im2col straight into
//! k-pairs, so that the tile stays in cache).
//!
//! Where the CPU has AMX (Intel Sapphire Rapids and later: `tdpbf16ps`
//! multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 f32 sums,
//! eight times `vdpbf16ps`'s rate per core), the `amx` kernel reads the
//! same packed B (a panel's k-pair rows are B tiles, 256 bytes apart) and
//! A as rows of k-pairs. Both B layouts pad K to whole tiles (32 values)
//! with zeros, so every kernel reads one layout.
//!
//! Where the CPU lacks AVX512_BF16, a portable kernel reads the same packed
//! words and computes the same rounded products in f32 (slower than the f32
//! GEMM: it is the reference that lets the packing and the model's bf16
//! wiring be tested on any CPU; `Predictor` runs f32 there instead).

use rayon::prelude::*;

use crate::error::{Error, Result};

mod amx;
pub use amx::roofline as amx_roofline;

const MR: usize = 6;
const NR: usize = 64;
/// Rows and columns of C per AMX block (and A's row padding for AMX).
const AMX_ROWS: usize = amx::BLOCK;
const AMX_COLS: usize = amx::BLOCK;

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

/// Which microkernel the bf16 GEMMs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`tdpbf16ps`), 32 x 32 blocks of C.
    Amx,
    /// AVX512_BF16 (`vdpbf16ps`), 6 x 64 blocks of C.
    Avx512,
    /// The same rounded products in plain f32 (the reference; CPUs without
    /// AVX512_BF16 run the model in f32 instead).
    Portable,
}

impl Kernel {
    /// The fastest this CPU runs: AMX where the CPU and the OS allow it
    /// (unless `SAM_UNET_CPU_AMX=0`), else AVX512_BF16, else portable.
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let no_amx = std::env::var("SAM_UNET_CPU_AMX").is_ok_and(|v| v == "0");
            if !has_avx512_bf16() {
                Kernel::Portable
            } else if amx::available() && !no_amx {
                Kernel::Amx
            } else {
                Kernel::Avx512
            }
        })
    }

    /// The kernels this CPU can run, fastest first (tests run each).
    pub fn all_here() -> Vec<Kernel> {
        [Kernel::Amx, Kernel::Avx512, Kernel::Portable]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect()
    }

    /// Whether this CPU (and OS) can run the kernel.
    pub fn runs_here(self) -> bool {
        match self {
            Kernel::Amx => has_avx512_bf16() && amx::available(),
            Kernel::Avx512 => has_avx512_bf16(),
            Kernel::Portable => true,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "AMX (tdpbf16ps)",
            Kernel::Avx512 => "AVX512_BF16 (vdpbf16ps)",
            Kernel::Portable => "portable",
        }
    }
}

/// k-pairs per AMX tile row block: packed B pads K/2 to a multiple of it.
const KT: usize = 16;

/// The k-pair rows a packed operand stores for K values: ceil(K / 2)
/// rounded up to whole AMX tiles (the extra rows are zero).
fn k2_stored(k: usize) -> usize {
    k.div_ceil(2).div_ceil(KT) * KT
}

/// f32 -> bf16 bits, round to nearest even (NaN stays a quiet NaN, as
/// `half::bf16::from_f32`); branch-free so that packing loops vectorise.
#[inline(always)]
fn bf16(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if (b & 0x7fff_ffff) > 0x7f80_0000 {
        (b >> 16) | 0x40
    } else {
        rounded
    }
}

/// Two bf16 values as one 32-bit word, the first in the low half (the
/// lane's even element).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16(lo) | (bf16(hi) << 16)
}

/// B [K, N] rounded to bf16 and packed for the microkernel.
#[derive(Clone)]
pub struct PackedB {
    pub k: usize,
    pub n: usize,
    /// [ceil(N / 64)][k2_stored(K)][64] words.
    words: Vec<u32>,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB {{ k: {}, n: {} }}", self.k, self.n)
    }
}

impl PackedB {
    /// From `b(k, n)`: any element order (row-major B, or a linear
    /// layer's weight [N, K] read transposed).
    fn build(k: usize, n: usize, b: impl Fn(usize, usize) -> f32 + Sync) -> PackedB {
        let words = pack_pairs(k, k2_stored(k), n, NR, b);
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

/// The packing of both operands: `lines` lines (B's columns, A's rows) of
/// `k` values each, `get(kk, line)`, rounded to bf16 k-pairs, in blocks of
/// `width` lines: [ceil(lines / width)][k2s][width] words (k2s >=
/// ceil(k / 2) k-pair rows); a missing line, the odd k's partner and the
/// rows past ceil(k / 2) are zero.
fn pack_pairs(
    k: usize,
    k2s: usize,
    lines: usize,
    width: usize,
    get: impl Fn(usize, usize) -> f32 + Sync,
) -> Vec<u32> {
    let k2 = k.div_ceil(2);
    debug_assert!(k2s >= k2);
    let mut words = vec![0u32; lines.div_ceil(width) * k2s * width];
    words
        .par_chunks_mut(k2s * width)
        .enumerate()
        .for_each(|(blk, dst)| {
            for kp in 0..k2 {
                for j in 0..width {
                    let line = blk * width + j;
                    if line >= lines {
                        continue;
                    }
                    let hi = if 2 * kp + 1 < k {
                        get(2 * kp + 1, line)
                    } else {
                        0.0
                    };
                    dst[kp * width + j] = pair(get(2 * kp, line), hi);
                }
            }
        });
    words
}

fn check(op: &'static str, got: usize, want: usize, what: &str) -> Result<()> {
    if got != want {
        return Err(Error::shape(op, format!("{got} values for {what}")));
    }
    Ok(())
}

/// A [M, K] rounded to bf16 and packed once (a convolution's weights) for
/// one kernel: for AVX512_BF16 (and the portable one) blocks of 6 rows, in
/// a block for each k-pair the 6 rows' pairs; for AMX rows of k-pairs.
#[derive(Clone)]
pub struct PackedA {
    pub m: usize,
    pub k: usize,
    kernel: Kernel,
    /// Avx512 / Portable: [ceil(M / 6)][ceil(K / 2)][6] words;
    /// Amx: [ceil(M / 32) 32][k2_stored(K)] words.
    words: Vec<u32>,
}

impl std::fmt::Debug for PackedA {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedA {{ m: {}, k: {} }}", self.m, self.k)
    }
}

impl PackedA {
    fn build(
        kernel: Kernel,
        m: usize,
        k: usize,
        a: impl Fn(usize, usize) -> f32 + Sync,
    ) -> PackedA {
        let words = if kernel == Kernel::Amx {
            amx_rows(m, k, a)
        } else {
            pack_pairs(k, k.div_ceil(2), m, MR, |kk, r| a(r, kk))
        };
        PackedA {
            m,
            k,
            kernel,
            words,
        }
    }

    /// A row-major [M, K] (a convolution's weight [O, C kh kw]).
    pub fn from_mk(a: &[f32], m: usize, k: usize) -> Result<PackedA> {
        Self::from_mk_for(Kernel::best(), a, m, k)
    }

    /// `from_mk` for a given kernel (tests and benchmarks compare them).
    pub fn from_mk_for(kernel: Kernel, a: &[f32], m: usize, k: usize) -> Result<PackedA> {
        check("bf16 pack", a.len(), m * k, &format!("A [{m}, {k}]"))?;
        Ok(Self::build(kernel, m, k, |r, l| a[r * k + l]))
    }

    /// A stored transposed, as row-major [K, M] (a transposed
    /// convolution's weight [C, O k k]: A = W^T).
    pub fn from_km(a: &[f32], k: usize, m: usize) -> Result<PackedA> {
        Self::from_km_for(Kernel::best(), a, k, m)
    }

    /// `from_km` for a given kernel.
    pub fn from_km_for(kernel: Kernel, a: &[f32], k: usize, m: usize) -> Result<PackedA> {
        check("bf16 pack", a.len(), m * k, &format!("A^T [{k}, {m}]"))?;
        Ok(Self::build(kernel, m, k, |r, l| a[l * m + r]))
    }

    /// The kernel this packing is for.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }
}

/// A [M, K] (`a(row, k)`) as AMX's A operand: rows of k-pairs,
/// [ceil(M / 32) 32][k2_stored(K)] words, zero past M and K; rows in
/// parallel.
fn amx_rows(m: usize, k: usize, a: impl Fn(usize, usize) -> f32 + Sync) -> Vec<u32> {
    let k2s = k2_stored(k);
    let mut words = vec![0u32; m.div_ceil(AMX_ROWS) * AMX_ROWS * k2s];
    words
        .par_chunks_mut(k2s.max(1))
        .take(m)
        .enumerate()
        .for_each(|(r, row)| {
            for (kp, w) in row.iter_mut().enumerate().take(k.div_ceil(2)) {
                let hi = if 2 * kp + 1 < k {
                    a(r, 2 * kp + 1)
                } else {
                    0.0
                };
                *w = pair(a(r, 2 * kp), hi);
            }
        });
    words
}

/// The packed-B words a tile of `cols` columns needs (`pack_b_rows`).
pub fn packed_b_len(k: usize, cols: usize) -> usize {
    cols.div_ceil(NR) * k2_stored(k) * NR
}

crate::cpu::multiversion! {
    /// Packs B [K, cols], row l at `src[l * rs..]`, into `dst`
    /// (`packed_b_len(k, cols)` words): the layout of `PackedB`, for
    /// `gemm_bf16_tiles`. Columns past `cols` and k-pair rows past K are zero.
    pub fn pack_b_rows(k: usize, cols: usize, src: &[f32], rs: usize, dst: &mut [u32]) {
        let (k2, k2s) = (k.div_ceil(2), k2_stored(k));
        assert!(dst.len() >= packed_b_len(k, cols), "pack_b_rows: dst too short");
        assert!(
            k == 0 || cols == 0 || src.len() >= (k - 1) * rs + cols,
            "pack_b_rows: src too short"
        );
        let row = |l: usize| &src[l * rs..l * rs + cols];
        for (p, panel) in dst.chunks_mut(k2s * NR).take(cols.div_ceil(NR)).enumerate() {
            panel[k2 * NR..].fill(0);
            let (c0, w) = (p * NR, NR.min(cols - p * NR));
            for kp in 0..k2 {
                let out = &mut panel[kp * NR..(kp + 1) * NR];
                let lo = &row(2 * kp)[c0..c0 + w];
                if 2 * kp + 1 < k {
                    let hi = &row(2 * kp + 1)[c0..c0 + w];
                    for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
                        *o = pair(l, h);
                    }
                } else {
                    for (o, &l) in out.iter_mut().zip(lo) {
                        *o = bf16(l);
                    }
                }
                out[w..].fill(0);
            }
        }
    }
}

/// One tile C[rows, cols] (row stride ldc, at `c`) = or += an A block
/// times a B panel, by the AVX512_BF16 kernel or the portable one on the
/// same words.
///
/// # Safety
/// `a` holds k2 x 6 words, `b` k2 x 64, and the rows x cols elements at
/// `c` with row stride ldc are valid for writes and touched by no one else;
/// `kernel` is Avx512 only where the CPU has AVX512_BF16.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn tile(
    kernel: Kernel,
    k2: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    debug_assert!(a.len() >= k2 * MR && b.len() >= k2 * NR && rows <= MR && cols <= NR);
    if kernel == Kernel::Avx512 {
        // SAFETY: the CPU has AVX-512 F / BW / BF16 (this function's
        // contract); the slices and the tile are as it says.
        unsafe { kernel_avx512(k2, a, b, c, ldc, rows, cols, accumulate) }
    } else {
        let acc = portable_tile(k2, a, b);
        for (i, r) in acc.iter().enumerate().take(rows) {
            // SAFETY: row i < rows of the tile (this function's contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), cols) };
            for (d, &v) in dst.iter_mut().zip(r) {
                *d = if accumulate { *d + v } else { v };
            }
        }
    }
}

crate::cpu::multiversion! {
    /// The portable kernel: the same bf16 products (exact in f32), summed
    /// in f32 per k-pair as `vdpbf16ps` does.
    fn portable_tile(k2: usize, a: &[u32], b: &[u32]) -> [[f32; NR]; MR] {
        let mut acc = [[0f32; NR]; MR];
        let (mut blo, mut bhi) = ([0f32; NR], [0f32; NR]);
        for kp in 0..k2 {
            let bw = &b[kp * NR..(kp + 1) * NR];
            for j in 0..NR {
                blo[j] = f32::from_bits(bw[j] << 16);
                bhi[j] = f32::from_bits(bw[j] & 0xffff_0000);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let w = a[kp * MR + i];
                let (alo, ahi) = (f32::from_bits(w << 16), f32::from_bits(w & 0xffff_0000));
                for j in 0..NR {
                    row[j] += alo * blo[j] + ahi * bhi[j];
                }
            }
        }
        acc
    }
}

/// C [M, N] = A [M, K] B (or += with `accumulate`), A's values rounded to
/// bf16, products summed in f32. Parallel over blocks of rows; runs
/// `Kernel::best()`.
pub fn gemm_bf16(a: &[f32], m: usize, b: &PackedB, c: &mut [f32], accumulate: bool) -> Result<()> {
    gemm_bf16_with(Kernel::best(), a, m, b, c, accumulate)
}

/// `gemm_bf16` on a given kernel (one this CPU runs: `Kernel::all_here`).
pub fn gemm_bf16_with(
    kernel: Kernel,
    a: &[f32],
    m: usize,
    b: &PackedB,
    c: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    const OP: &str = "gemm_bf16";
    let (k, n) = (b.k, b.n);
    check(OP, a.len(), m * k, &format!("A [{m}, {k}]"))?;
    check(OP, c.len(), m * n, &format!("C [{m}, {n}]"))?;
    if !kernel.runs_here() {
        return Err(Error::input(
            OP,
            format!("the {} kernel does not run on this CPU", kernel.name()),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if kernel == Kernel::Amx {
        gemm_bf16_amx(a, m, b, c, accumulate);
        return Ok(());
    }
    let (k2, k2s) = (k.div_ceil(2), k2_stored(k));
    // Rows in tasks of whole 6-row blocks; each task packs its rows of A
    // ([blocks][k2][6] words) and sweeps every panel of B.
    const TASK: usize = MR * 8;
    c.par_chunks_mut(TASK * n).enumerate().for_each(|(t, ct)| {
        let r0 = t * TASK;
        let rows = ct.len() / n;
        let blocks = rows.div_ceil(MR);
        // The worker's own packing buffer, kept between calls (up to 48 rows
        // x K words: 288 KiB at K = 3072, an allocation that would otherwise
        // be mapped and faulted in for every task of every linear layer).
        A_TILE.with_borrow_mut(|ap| {
            ap.clear();
            let a_row = |r: usize| &a[(r0 + r) * k..(r0 + r + 1) * k];
            ap.resize(blocks * k2 * MR, 0);
            for blk in 0..blocks {
                let dst = &mut ap[blk * k2 * MR..(blk + 1) * k2 * MR];
                for i in 0..MR {
                    let r = blk * MR + i;
                    if r >= rows {
                        continue;
                    }
                    let row = a_row(r);
                    for kp in 0..k2 {
                        let hi = if 2 * kp + 1 < k { row[2 * kp + 1] } else { 0.0 };
                        dst[kp * MR + i] = pair(row[2 * kp], hi);
                    }
                }
            }
            for p in 0..n.div_ceil(NR) {
                let bp = &b.words[p * k2s * NR..(p + 1) * k2s * NR];
                let cols = NR.min(n - p * NR);
                for blk in 0..blocks {
                    let rws = MR.min(rows - blk * MR);
                    let apb = &ap[blk * k2 * MR..(blk + 1) * k2 * MR];
                    let c0 = blk * MR * n + p * NR;
                    // SAFETY: apb holds k2 x 6 words, bp k2 x 64, and the tile
                    // [rws, cols] at c0 with row stride n lies in ct, which
                    // this task owns; `kernel` runs here (checked above).
                    unsafe {
                        tile(
                            kernel,
                            k2,
                            apb,
                            bp,
                            ct[c0..].as_mut_ptr(),
                            n,
                            rws,
                            cols,
                            accumulate,
                        );
                    }
                }
            }
        });
    });
    Ok(())
}

/// The AMX driver of `gemm_bf16`: A packed once per call into rows of
/// k-pairs (in parallel), then tasks of up to 256 rows x 128 columns, each
/// sweeping its 32-column half-panels of B (K/2 x 32 words, kept in L1/L2)
/// past its 32-row blocks: B is read from memory once per 256 rows (fewer
/// where K is long, so that the task's A stays in L2). (Tasks
/// of 64 whole rows, as the vector kernels use, read all of B once per 64
/// rows; with AMX that traffic, not the products, bounded the ViT's
/// 256-token linears.)
fn gemm_bf16_amx(a: &[f32], m: usize, b: &PackedB, c: &mut [f32], accumulate: bool) {
    const TASK_COLS: usize = 128;
    let (k, n) = (b.k, b.n);
    let k2s = k2_stored(k);
    // A task's rows of A within ~512 KiB (with its B columns, within L2):
    // 256 rows at K = 768, 64 at K = 3072.
    let task_rows = ((512 * 1024 / (4 * k2s.max(1))) / AMX_ROWS * AMX_ROWS).clamp(AMX_ROWS, 256);
    let ap = amx_rows(m, k, |r, l| a[r * k + l]);
    let col_tasks = n.div_ceil(TASK_COLS);
    let tasks = m.div_ceil(task_rows) * col_tasks;
    let base = c.as_mut_ptr() as usize;
    (0..tasks).into_par_iter().for_each(|t| {
        let (r0, c0) = ((t / col_tasks) * task_rows, (t % col_tasks) * TASK_COLS);
        let (r1, c1) = (m.min(r0 + task_rows), n.min(c0 + TASK_COLS));
        amx::with_tiles(|| {
            for h in c0 / AMX_COLS..c1.div_ceil(AMX_COLS) {
                let (p, off) = (h / 2, (h % 2) * AMX_COLS);
                let bp = &b.words[p * k2s * NR..(p + 1) * k2s * NR];
                let cols = AMX_COLS.min(n - h * AMX_COLS);
                for blk in r0 / AMX_ROWS..r1.div_ceil(AMX_ROWS) {
                    let rows = AMX_ROWS.min(m - blk * AMX_ROWS);
                    let apb = &ap[blk * AMX_ROWS * k2s..(blk + 1) * AMX_ROWS * k2s];
                    // SAFETY: tiles are configured (with_tiles); apb holds 32
                    // rows of k2s words, bp k2s rows of 64 words with the
                    // half-panel at `off`; the block [rows, cols] at row
                    // 32 blk, column 32 h of C (row stride n) lies inside c
                    // (m x n, mutably borrowed for the whole call) and inside
                    // this task's rows [r0, r1) x columns [c0, c1), which no
                    // other task touches.
                    unsafe {
                        amx::block(
                            k2s / KT,
                            apb,
                            k2s,
                            &bp[off..],
                            NR,
                            (base as *mut f32).add(blk * AMX_ROWS * n + h * AMX_COLS),
                            n,
                            rows,
                            cols,
                            accumulate,
                        )
                    }
                }
            }
        });
    });
}

thread_local! {
    /// Each worker's packed rows of A (`gemm_bf16`), kept between calls.
    static A_TILE: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each worker's packed-B tile (`gemm_bf16_tiles`), kept between calls.
    static B_TILE: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Packs B of one column tile: (batch, first column, columns, f32 scratch,
/// the tile's packed words).
pub type PackTile<'a> = dyn Fn(usize, usize, usize, &mut Vec<f32>, &mut [u32]) + Sync + 'a;

/// C = A B for `batches` products at once, with A [M, K] packed once and B
/// [K, N] packed per column tile by the caller: parallel over (batch,
/// tile of `tile` columns, a multiple of 64). `c` holds `batches` row-major
/// [M, N] matrices. For each task, `pack(batch, first_col, cols, scratch,
/// words)` fills `words` (`packed_b_len(K, cols)`, e.g. by `pack_b_rows`),
/// the tile [M, cols] is computed (by the kernel A was packed for), then
/// `epilogue(batch, first_col, tile)` runs on it while it is in cache.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_tiles(
    a: &PackedA,
    batches: usize,
    n: usize,
    tile_cols: usize,
    c: &mut [f32],
    pack: &PackTile<'_>,
    epilogue: &(dyn Fn(usize, usize, &mut crate::cpu::Tile) + Sync),
) -> Result<()> {
    const OP: &str = "gemm_bf16_tiles";
    let (m, k) = (a.m, a.k);
    check(
        OP,
        c.len(),
        batches * m * n,
        &format!("C {batches} x [{m}, {n}]"),
    )?;
    if tile_cols == 0 || !tile_cols.is_multiple_of(NR) {
        return Err(Error::input(
            OP,
            format!("tile of {tile_cols} columns: not a multiple of {NR}"),
        ));
    }
    if !a.kernel.runs_here() {
        return Err(Error::input(
            OP,
            format!(
                "A packed for {}, which this CPU does not run",
                a.kernel.name()
            ),
        ));
    }
    if m == 0 || n == 0 || batches == 0 {
        return Ok(());
    }
    let (k2, k2s) = (k.div_ceil(2), k2_stored(k));
    crate::cpu::par_col_tiles(c, batches, m, n, tile_cols, |bi, j0, t, scratch| {
        let cols = t.cols();
        B_TILE.with_borrow_mut(|words| {
            let len = packed_b_len(k, cols);
            if words.len() < len {
                words.resize(len, 0);
            }
            pack(bi, j0, cols, scratch, &mut words[..len]);
            let (ptr, ldc) = t.raw();
            if a.kernel == Kernel::Amx {
                // A's 32-row blocks outer (one stays in L1/L2 while the
                // tile's packed B, <= 512 KiB, stays in L2), half-panels
                // of 32 columns inner.
                amx::with_tiles(|| {
                    for blk in 0..m.div_ceil(AMX_ROWS) {
                        let rows = AMX_ROWS.min(m - blk * AMX_ROWS);
                        let ab = &a.words[blk * AMX_ROWS * k2s..(blk + 1) * AMX_ROWS * k2s];
                        for h in 0..cols.div_ceil(AMX_COLS) {
                            let (p, off) = (h / 2, (h % 2) * AMX_COLS);
                            let bp = &words[p * k2s * NR..(p + 1) * k2s * NR];
                            // SAFETY: tiles are configured (with_tiles); ab
                            // holds 32 rows of k2s words, bp k2s rows of 64
                            // words with the half-panel at `off`; the block
                            // rows [32 blk, +rows) x columns [32 h, +32) lies
                            // inside this task's tile (par_col_tiles gives it
                            // exclusive access).
                            unsafe {
                                amx::block(
                                    k2s / KT,
                                    ab,
                                    k2s,
                                    &bp[off..],
                                    NR,
                                    ptr.add(blk * AMX_ROWS * ldc + h * AMX_COLS),
                                    ldc,
                                    rows,
                                    AMX_COLS.min(cols - h * AMX_COLS),
                                    false,
                                )
                            }
                        }
                    }
                });
                return;
            }
            for p in 0..cols.div_ceil(NR) {
                let bp = &words[p * k2s * NR..(p + 1) * k2s * NR];
                let pc = NR.min(cols - p * NR);
                for blk in 0..m.div_ceil(MR) {
                    let rows = MR.min(m - blk * MR);
                    let ab = &a.words[blk * k2 * MR..(blk + 1) * k2 * MR];
                    // SAFETY: ab holds k2 x 6 words, bp k2 x 64; the tile
                    // rows [6 blk, 6 blk + rows) x columns [64 p, 64 p + pc)
                    // lie inside this task's tile (par_col_tiles gives it
                    // exclusive access); a.kernel runs here (checked above).
                    unsafe {
                        tile(
                            a.kernel,
                            k2,
                            ab,
                            bp,
                            ptr.add(blk * MR * ldc + p * NR),
                            ldc,
                            rows,
                            pc,
                            false,
                        );
                    }
                }
            }
        });
        epilogue(bi, j0, t);
    });
    Ok(())
}
/// One 6 x 64 tile: C[rows, cols] (row stride ldc, at c) = or += the packed
/// A block times the packed B panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx512(
    k2: usize,
    a: &[u32],
    b: &[u32],
    c: *mut f32,
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
                // SAFETY: the tile lies at c (row i < rows, 64 columns).
                unsafe {
                    let p = c.add(i * ldc + 16 * j);
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
            // SAFETY: row i < rows of the tile, cols values.
            let dst = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), cols) };
            for (d, &t) in dst.iter_mut().zip(&tmp) {
                *d = if accumulate { *d + t } else { t };
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx512(
    _: usize,
    _: &[u32],
    _: &[u32],
    _: *mut f32,
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
        crate::testing::rand(n, seed, 1.0)
    }

    fn round(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f64()
    }

    /// Against an f64 product of the bf16-rounded inputs: equal up to the
    /// f32 accumulation (|d| <= K eps sum |a b|), at shapes with partial
    /// tiles and an odd K, overwriting and accumulating, from [K, N] and
    /// from a weight [N, K].
    /// |c - sum(round(a) round(b))| within f32 accumulation of K terms.
    fn check_product(
        what: &str,
        (m, k, n): (usize, usize, usize),
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
        c0: Option<&[f32]>,
        c: &[f32],
    ) {
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut mag) = (0.0f64, 0.0f64);
                for l in 0..k {
                    let p = round(a(i, l)) * round(b(l, j));
                    s += p;
                    mag += p.abs();
                }
                if let Some(c0) = c0 {
                    s += c0[i * n + j] as f64;
                    mag += (c0[i * n + j] as f64).abs();
                }
                let d = (c[i * n + j] as f64 - s).abs();
                let bound = (k as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-30;
                assert!(
                    d <= bound,
                    "{what} {m}x{k}x{n} [{i},{j}]: {} vs {s} (|d| {d:e} > {bound:e})",
                    c[i * n + j]
                );
            }
        }
    }

    const SHAPES: [(usize, usize, usize); 8] = [
        (1, 1, 1),
        (7, 13, 65),
        (50, 64, 128),
        (13, 301, 70),
        (96, 768, 192),
        (64, 576, 200),
        // Several AMX row blocks and tasks, a partial last block, K/2 not a
        // whole tile.
        (161, 100, 97),
        (33, 2, 31),
    ];

    /// Against an f64 product of the bf16-rounded inputs: equal up to the
    /// f32 accumulation (|d| <= K eps sum |a b|), at shapes with partial
    /// tiles and an odd K, overwriting and accumulating, from [K, N] and
    /// from a weight [N, K]. Runs every kernel this CPU has (AMX,
    /// AVX512_BF16, and always the portable one).
    #[test]
    fn matches_f64_of_rounded_inputs() {
        println!("kernels here: {:?}", Kernel::all_here());
        for kernel in Kernel::all_here() {
            for &(m, k, n) in &SHAPES {
                let (a, b) = (rand(m * k, 1 + m as u64), rand(k * n, 2 + n as u64));
                let c0 = rand(m * n, 3);
                let pb = PackedB::from_kn(&b, k, n).unwrap();
                let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                let pw = PackedB::from_nk(&bt, n, k).unwrap();
                for (packed, accumulate) in [(&pb, false), (&pw, true), (&pb, true)] {
                    let mut c = c0.clone();
                    gemm_bf16_with(kernel, &a, m, packed, &mut c, accumulate).unwrap();
                    check_product(
                        &format!("gemm_bf16 {kernel:?}"),
                        (m, k, n),
                        |i, l| a[i * k + l],
                        |l, j| b[l * n + j],
                        accumulate.then_some(&c0[..]),
                        &c,
                    );
                }
            }
        }
    }

    /// A packed once (from [M, K] and from [K, M]) for each kernel here, B
    /// packed per tile by `pack_b_rows` from strided rows, two batches,
    /// tiles of 64 and 128 columns with a partial last one; the epilogue
    /// sees each tile once.
    #[test]
    fn tiles_match_f64_of_rounded_inputs() {
        for kernel in Kernel::all_here() {
            for &(m, k, n) in &SHAPES {
                let batches = 2;
                let a = rand(m * k, 5 + m as u64);
                // B of batch i: rows of length n + 3 (a stride wider than the row).
                let rs = n + 3;
                let b = rand(batches * k * rs, 6 + k as u64);
                let at: Vec<f32> = (0..m * k).map(|i| a[(i % m) * k + i / m]).collect();
                for (pa, tile_cols) in [
                    (PackedA::from_mk_for(kernel, &a, m, k).unwrap(), 64),
                    (PackedA::from_km_for(kernel, &at, k, m).unwrap(), 128),
                ] {
                    assert_eq!(pa.kernel(), kernel);
                    let mut c = vec![f32::NAN; batches * m * n];
                    let seen = std::sync::Mutex::new(Vec::new());
                    gemm_bf16_tiles(
                        &pa,
                        batches,
                        n,
                        tile_cols,
                        &mut c,
                        &|bi, j0, cols, _scratch, words| {
                            pack_b_rows(k, cols, &b[bi * k * rs + j0..], rs, words)
                        },
                        &|bi, j0, t| seen.lock().unwrap().push((bi, j0, t.cols())),
                    )
                    .unwrap();
                    let mut seen = seen.into_inner().unwrap();
                    seen.sort();
                    let want: Vec<_> = (0..batches)
                        .flat_map(|bi| {
                            (0..n.div_ceil(tile_cols))
                                .map(move |t| (bi, t * tile_cols, tile_cols.min(n - t * tile_cols)))
                        })
                        .collect();
                    assert_eq!(seen, want);
                    for bi in 0..batches {
                        check_product(
                            &format!("gemm_bf16_tiles {kernel:?}"),
                            (m, k, n),
                            |i, l| a[i * k + l],
                            |l, j| b[bi * k * rs + l * rs + j],
                            None,
                            &c[bi * m * n..(bi + 1) * m * n],
                        );
                    }
                }
            }
        }
    }

    /// The branch-free rounding is half's round-to-nearest-even, ties,
    /// overflow to infinity, subnormals and NaN included.
    #[test]
    fn rounding_is_round_to_nearest_even() {
        let mut s = 0x1234_5678u64;
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x7f7f_ffff),
        ];
        let randoms = (0..100_000).map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            f32::from_bits((s >> 32) as u32)
        });
        for x in specials.into_iter().chain(randoms) {
            assert_eq!(
                bf16(x),
                half::bf16::from_f32(x).to_bits() as u32,
                "{x:e} ({:#x})",
                x.to_bits()
            );
        }
    }

    /// Where the CPU has AVX512_BF16, the portable kernel (what other CPUs
    /// run) agrees with it on the same words.
    #[test]
    fn portable_kernel_agrees_with_avx512() {
        if !has_avx512_bf16() {
            println!("no AVX512_BF16 on this CPU: only the portable kernel runs");
            return;
        }
        let k2 = 300;
        let a: Vec<u32> = rand(k2 * MR * 2, 9)
            .chunks(2)
            .map(|p| pair(p[0], p[1]))
            .collect();
        let b: Vec<u32> = rand(k2 * NR * 2, 10)
            .chunks(2)
            .map(|p| pair(p[0], p[1]))
            .collect();
        let mut c = vec![0f32; MR * NR];
        // SAFETY: the CPU has AVX512_BF16; a, b and c have the sizes the kernel reads and writes.
        unsafe { kernel_avx512(k2, &a, &b, c.as_mut_ptr(), NR, MR, NR, false) };
        let p = portable_tile(k2, &a, &b);
        for i in 0..MR {
            for j in 0..NR {
                let mag: f32 = (0..k2)
                    .map(|kp| {
                        let (x, y) = (a[kp * MR + i], b[kp * NR + j]);
                        (f32::from_bits(x << 16) * f32::from_bits(y << 16)).abs()
                            + (f32::from_bits(x & 0xffff_0000) * f32::from_bits(y & 0xffff_0000))
                                .abs()
                    })
                    .sum();
                let d = (c[i * NR + j] - p[i][j]).abs();
                assert!(
                    d <= 2.0 * (2 * k2) as f32 * f32::EPSILON * mag,
                    "[{i},{j}] {} vs {}",
                    c[i * NR + j],
                    p[i][j]
                );
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        let pb = PackedB::from_kn(&[1.0; 6], 2, 3).unwrap();
        assert!(PackedB::from_kn(&[1.0; 5], 2, 3).is_err());
        assert!(gemm_bf16(&[1.0; 3], 2, &pb, &mut [0.0; 6], false).is_err());
        assert!(gemm_bf16(&[1.0; 4], 2, &pb, &mut [0.0; 5], false).is_err());
        // A kernel this CPU lacks is an error, not an illegal instruction.
        for kernel in [Kernel::Amx, Kernel::Avx512] {
            if !kernel.runs_here() {
                let r = gemm_bf16_with(kernel, &[1.0; 4], 2, &pb, &mut [0.0; 6], false);
                assert!(r.is_err(), "{kernel:?}");
            }
        }
    }
}
