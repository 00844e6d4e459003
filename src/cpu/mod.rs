//! The CPU backend: GEMM through the `gemm` crate (packed, AVX2/AVX-512 kernels
//! chosen at run time, rayon-parallel), and vectorisable scalar math (exp, erf)
//! used by the element-wise ops.

pub mod bf16_gemm;
pub mod math;

/// Whether this CPU has AVX2 and FMA (checked once).
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX-512 F/VL/DQ/BW besides AVX2 and FMA (checked once).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            has_avx2_fma()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512bw")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines a function three times, compiled for AVX-512 (+ AVX2, FMA), for
/// AVX2 + FMA and for the baseline target, and dispatches at run time. The body's `#[inline(always)]`
/// helpers (`math::exp`, `math::gelu`) are inlined into every version and
/// vectorised for each; the body sees `const FMA: bool`, true in the AVX2 + FMA
/// and AVX-512 versions, to pick fused multiply-adds (`math::*_g::<FMA>`):
/// those two give the same values (lanes are independent; LLVM does not
/// reorder a float reduction), only 16 lanes at a time instead of 8. Used for the element-wise hot loops; the GEMM has its own
/// dispatch.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                #[allow(clippy::needless_return)]
                fn wide($($a: $t),*) $(-> $r)? {
                    #[allow(dead_code)]
                    const FMA: bool = true;
                    $body
                }
                if $crate::cpu::has_avx512() {
                    // SAFETY: the CPU supports AVX-512 F/VL/DQ/BW, AVX2 and FMA,
                    // checked at run time just above.
                    return unsafe { wide($($a),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::needless_return)]
                fn fast($($a: $t),*) $(-> $r)? {
                    #[allow(dead_code)]
                    const FMA: bool = true;
                    $body
                }
                if $crate::cpu::has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA, checked at run time just above.
                    return unsafe { fast($($a),*) };
                }
            }
            #[allow(dead_code)]
            const FMA: bool = false;
            $body
        }
    };
}
pub(crate) use multiversion;

/// A view of a row-major-or-strided f32 matrix: element (i, j) is at
/// `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows x cols` matrix.
    pub fn rm(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a contiguous row-major `cols x rows` matrix, seen as `rows x cols`.
    pub fn tr(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            rs: 1,
            cs: rows,
        }
    }
    fn max_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs
        }
    }
}

/// Whether a GEMM may use the rayon pool; `false` inside an already parallel loop.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Par {
    Pool,
    Seq,
}

/// `c = (accumulate ? c : 0) + a * b` for `a` m x k, `b` k x n, `c` m x n
/// (c at `c[i * c_rs + j * c_cs]`).
///
/// Panics only on an internal layout bug (the public ops check shapes first).
pub fn sgemm(
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
    par: Par,
) {
    let (m, n) = (a.rows, b.cols);
    assert!(
        m == 0 || n == 0 || c.len() > (m - 1) * c_rs + (n - 1) * c_cs,
        "sgemm: dst out of bounds"
    );
    // SAFETY: c is a live, exclusively borrowed slice holding every element
    // the product writes or reads (asserted above).
    unsafe { sgemm_raw(a, b, c.as_mut_ptr(), c_rs, c_cs, accumulate, par) }
}

/// `a * b` (m x k times k x n) into a new row-major m x n buffer that is not
/// zeroed first: the product writes every element (zeroing the outputs was
/// ~3 % of a training step).
pub fn sgemm_new(a: MatRef, b: MatRef, par: Par) -> Vec<f32> {
    let (m, n) = (a.rows, b.cols);
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: the buffer has room for m x n values at row stride n; sgemm_raw
    // writes each of them exactly (accumulate = false never reads the
    // destination, and k = 0 writes zeros), so all m x n are initialised when
    // the length is set.
    unsafe {
        sgemm_raw(a, b, c.as_mut_ptr(), n, 1, false, par);
        c.set_len(m * n);
    }
    c
}

/// `sgemm` on a raw destination.
///
/// # Safety
/// `c` must point to an allocation holding every element
/// `i * c_rs + j * c_cs` (i < m, j < n), initialised when `accumulate`,
/// written by no one else meanwhile and not aliasing `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_raw(
    a: MatRef,
    b: MatRef,
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
    par: Par,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "sgemm: inner dimensions");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.data.len() > a.max_index() || k == 0,
        "sgemm: lhs out of bounds"
    );
    assert!(
        b.data.len() > b.max_index() || k == 0,
        "sgemm: rhs out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: in bounds by the caller's contract.
                    unsafe { c.add(i * c_rs + j * c_cs).write(0.0) };
                }
            }
        }
        return;
    }
    let timer = crate::profile::enabled().then(std::time::Instant::now);
    // SAFETY: forwarded from the caller's contract.
    unsafe { sgemm_inner(a, b, c, c_rs, c_cs, accumulate, par, (m, k, n)) };
    if let Some(t) = timer {
        crate::profile::gemm(m, n, k, par == Par::Pool, t.elapsed());
    }
}

/// # Safety
/// As `sgemm_raw`.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_inner(
    a: MatRef,
    b: MatRef,
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
    par: Par,
    (m, k, n): (usize, usize, usize),
) {
    // Both operands k-contiguous: the layout the two rearrangements below serve.
    let dot = a.cs == 1 && b.rs == 1;
    if dot && c_cs == 1 && m <= 128 && n >= 2 * m && k >= 512 {
        // Both operands k-contiguous (X W^T, G col^T) with few rows: the `gemm`
        // crate runs this at 40-80 GFLOP/s on a Xeon core and the transposed
        // product, few columns instead, at 130-150 (2-3x on the convolutions'
        // weight gradients with 32-64 output channels). So: C^T = B^T A^T into
        // a scratch buffer, then transposed into C. The transposed call has
        // n' = m < m' = n and takes the ordinary path below.
        let mut t: Vec<f32> = Vec::with_capacity(n * m);
        let at = MatRef {
            data: a.data,
            rows: k,
            cols: m,
            rs: a.cs,
            cs: a.rs,
        };
        let bt = MatRef {
            data: b.data,
            rows: n,
            cols: k,
            rs: b.cs,
            cs: b.rs,
        };
        // SAFETY: t has room for n x m values at row stride m, each written by
        // the product (accumulate = false) before the length is set; the
        // operands are the caller's, in bounds by its asserts.
        unsafe {
            sgemm_inner(bt, at, t.as_mut_ptr(), m, 1, false, par, (n, k, m));
            t.set_len(n * m);
            transpose_into(&t, n, m, c, c_rs, accumulate, par);
        }
        return;
    }
    let threads = rayon::current_num_threads();
    if par == Par::Pool && threads > 1 && (m < 128 || dot) && n >= 256 * threads {
        // The packed kernels parallelise a short-and-wide product poorly (about
        // 90 GFLOPS on two Zen 2 cores for m = 64 against 130 this way), and
        // X W^T (both operands k-contiguous) at m = 512 too (the ViT's linears
        // on a Xeon: 150-160 against 190-200 GFLOP/s at 512 x 768 x 3072, no
        // worse at the others): give each thread its own block of columns and
        // run the kernels sequentially.
        let chunk = n.div_ceil(threads).next_multiple_of(16);
        let cptr = c as usize;
        rayon::scope(|sc| {
            for j0 in (0..n).step_by(chunk) {
                let nj = chunk.min(n - j0);
                sc.spawn(move |_| {
                    // SAFETY: this task writes only columns j0..j0 + nj of c, disjoint
                    // from every other task's columns; all indices are in bounds by
                    // the caller's contract; `c` outlives the scope.
                    unsafe {
                        raw_gemm(
                            m,
                            nj,
                            k,
                            (cptr as *mut f32).add(j0 * c_cs),
                            c_rs,
                            c_cs,
                            accumulate,
                            a,
                            b.data.as_ptr().add(j0 * b.cs),
                            b.rs,
                            b.cs,
                            gemm::Parallelism::None,
                        );
                    }
                });
            }
        });
        return;
    }
    let parallelism = match par {
        // Tiny products are not worth waking the pool for.
        Par::Pool if m * n * k >= 1 << 15 => gemm::Parallelism::Rayon(threads),
        _ => gemm::Parallelism::None,
    };
    // SAFETY: the asserts above bound every index the kernel touches in `a`
    // and `b`; `c`'s by the caller's contract, which also excludes aliasing.
    unsafe {
        raw_gemm(
            m,
            n,
            k,
            c,
            c_rs,
            c_cs,
            accumulate,
            a,
            b.data.as_ptr(),
            b.rs,
            b.cs,
            parallelism,
        )
    }
}

/// c[i * c_rs + j] (+)= t[j * m + i] for t row-major n x m (c is m x n with
/// unit column stride): blocks of 64 columns of c, whose rows of t (at most
/// 64 x m values) stay in L1 while each row of c is written contiguously.
///
/// # Safety
/// As `sgemm_raw` for c (m x n at c_rs, 1); `t` must not alias it.
unsafe fn transpose_into(
    t: &[f32],
    n: usize,
    m: usize,
    c: *mut f32,
    c_rs: usize,
    accumulate: bool,
    par: Par,
) {
    use rayon::prelude::*;
    const BLOCK: usize = 64;
    let cptr = c as usize;
    let block = |j0: usize| {
        let nj = BLOCK.min(n - j0);
        for i in 0..m {
            // Raw writes, not a slice: without `accumulate` the destination may
            // be uninitialised (sgemm_new).
            let row = (cptr as *mut f32).wrapping_add(i * c_rs + j0);
            for (jj, &v) in t[j0 * m + i..].iter().step_by(m).take(nj).enumerate() {
                // SAFETY: row i's columns j0..j0 + nj of c are in bounds by the
                // caller's contract and written by this block only.
                unsafe {
                    let d = row.add(jj);
                    d.write(if accumulate { d.read() + v } else { v });
                }
            }
        }
    };
    if par == Par::Pool && m * n >= 1 << 16 {
        (0..n).into_par_iter().step_by(BLOCK).for_each(block);
    } else {
        (0..n).step_by(BLOCK).for_each(block);
    }
}

/// The `gemm` crate call: c (m x n at c_rs, c_cs) (+)= a x b (b at b_rs, b_cs).
///
/// # Safety
/// Every index touched must be inside the allocations behind the pointers, and
/// `c` must not alias `a` or `b` or be written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn raw_gemm(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    c_rs: usize,
    c_cs: usize,
    accumulate: bool,
    a: MatRef,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    par: gemm::Parallelism,
) {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            c_cs as isize,
            c_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// A block of columns of a row-major output matrix, owned by one parallel task.
pub struct Tile {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: usize,
}

// SAFETY: a Tile is the only handle to its columns while its task runs (see
// `par_col_tiles`), so moving it to another thread cannot create shared access.
unsafe impl Send for Tile {}

impl Tile {
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// self (+)= a x b with a rows x k, b k x cols, sequentially (the caller is
    /// already one of many parallel tasks).
    pub fn gemm(&mut self, a: MatRef, b: MatRef, accumulate: bool) {
        assert!(
            a.rows == self.rows && b.cols == self.cols && a.cols == b.rows,
            "Tile::gemm: shapes"
        );
        assert!(
            a.data.len() > a.max_index() && b.data.len() > b.max_index(),
            "Tile::gemm: operands out of bounds"
        );
        if a.cols == 0 || self.rows == 0 || self.cols == 0 {
            return;
        }
        // SAFETY: the tile's rows x cols elements at stride rs are inside the
        // output slice and touched by no other task (par_col_tiles); the operands
        // are in bounds by the asserts.
        unsafe {
            raw_gemm(
                self.rows,
                self.cols,
                a.cols,
                self.ptr,
                self.rs,
                1,
                accumulate,
                a,
                b.data.as_ptr(),
                b.rs,
                b.cs,
                gemm::Parallelism::None,
            )
        }
    }

    /// The tile's first element and row stride, for kernels that write
    /// its rows x cols elements themselves.
    pub fn raw(&mut self) -> (*mut f32, usize) {
        (self.ptr, self.rs)
    }

    /// Row i of the tile (cols values).
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows);
        // SAFETY: row i of this tile lies inside the output slice and belongs to
        // this task only; the borrow of self keeps it unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.rs), self.cols) }
    }
}

/// Runs `f(batch, first_col, tile, scratch)` in parallel over the column tiles of
/// `c`, which holds `batches` row-major matrices of rows x cols one after another.
/// Each task gets exclusive access to its tile and a per-thread scratch vector.
pub fn par_col_tiles<F>(c: &mut [f32], batches: usize, rows: usize, cols: usize, tile: usize, f: F)
where
    F: Fn(usize, usize, &mut Tile, &mut Vec<f32>) + Sync + Send,
{
    use rayon::prelude::*;
    assert!(
        c.len() >= batches * rows * cols && tile > 0,
        "par_col_tiles: output too small"
    );
    let tiles = cols.div_ceil(tile);
    let base = c.as_mut_ptr() as usize;
    (0..batches * tiles)
        .into_par_iter()
        .for_each_init(Vec::new, |scratch, t| {
            let (b, c0) = (t / tiles, (t % tiles) * tile);
            // SAFETY: the offset is inside `c` (asserted above); tiles of different
            // tasks cover disjoint columns or batches, and `c` is mutably borrowed for
            // the whole call.
            let ptr = unsafe { (base as *mut f32).add(b * rows * cols + c0) };
            let mut t = Tile {
                ptr,
                rows,
                cols: tile.min(cols - c0),
                rs: cols,
            };
            f(b, c0, &mut t, scratch);
        });
}

/// Splits `n` items into chunks for rayon so each thread gets a few chunks.
pub fn chunk_len(n: usize, min: usize) -> usize {
    let t = rayon::current_num_threads().max(1) * 4;
    n.div_ceil(t).max(min).max(1)
}

#[cfg(test)]
mod sgemm_tests {
    use super::*;

    /// A product into a fresh, unzeroed buffer equals one into zeros, even
    /// where the allocator hands back memory that held NaNs (a kernel that
    /// read its destination would show them).
    #[test]
    fn sgemm_new_writes_every_element() {
        for (m, n, k, par) in [
            (37, 53, 29, Par::Pool),
            (64, 600, 40, Par::Pool),
            (5, 7, 0, Par::Seq),
        ] {
            drop(vec![f32::NAN; m * n]);
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.5).collect();
            let got = sgemm_new(MatRef::rm(&a, m, k), MatRef::rm(&b, k, n), par);
            let mut want = vec![0.0f32; m * n];
            sgemm(
                MatRef::rm(&a, m, k),
                MatRef::rm(&b, k, n),
                &mut want,
                n,
                1,
                false,
                par,
            );
            assert_eq!(got.len(), m * n);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "{m}x{n}x{k}"
            );
        }
    }

    /// Products with both operands k-contiguous go through the transposed
    /// product and a transpose (few rows) or the column split (`sgemm_inner`):
    /// every layout of the
    /// destination's rows, with and without `accumulate`, sequential and
    /// pooled, equals the f64 sums.
    #[test]
    fn few_rows_dot_layout_matches_f64() {
        for (m, n, k, par, acc) in [
            (1, 700, 600, Par::Seq, false),
            (32, 576, 1024, Par::Pool, false),
            (33, 130, 513, Par::Seq, true),
            (64, 300, 700, Par::Pool, true),
            (128, 256, 512, Par::Pool, false),
            // Many rows: the column split between the threads.
            (150, 600, 64, Par::Pool, true),
        ] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 97) as f32 / 50.0 - 1.0)
                .collect();
            // w [n, k], seen as k x n.
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729) % 89) as f32 / 40.0 - 1.0)
                .collect();
            let ldc = n + 3;
            let c0: Vec<f32> = (0..m * ldc).map(|i| (i % 11) as f32 - 5.0).collect();
            let mut c = c0.clone();
            sgemm(
                MatRef::rm(&a, m, k),
                MatRef::tr(&w, k, n),
                &mut c,
                ldc,
                1,
                acc,
                par,
            );
            for i in 0..m {
                for j in 0..n {
                    let dot: f64 = (0..k)
                        .map(|p| a[i * k + p] as f64 * w[j * k + p] as f64)
                        .sum();
                    let want = dot + if acc { c0[i * ldc + j] as f64 } else { 0.0 };
                    let got = c[i * ldc + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{m}x{n}x{k} ({i},{j}): {got} vs {want}"
                    );
                }
                // The padding columns are not touched.
                assert_eq!(
                    &c[i * ldc + n..(i + 1) * ldc],
                    &c0[i * ldc + n..(i + 1) * ldc]
                );
            }
        }
    }
}
