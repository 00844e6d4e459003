//! The CPU backend: GEMM through the `gemm` crate (packed, AVX2/AVX-512 kernels
//! chosen at run time, rayon-parallel), and vectorisable scalar math (exp, erf)
//! used by the element-wise ops.

pub mod math;

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
        MatRef { data, rows, cols, rs: cols, cs: 1 }
    }
    /// The transpose of a contiguous row-major `cols x rows` matrix, seen as `rows x cols`.
    pub fn tr(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, rs: 1, cs: rows }
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
pub fn sgemm(a: MatRef, b: MatRef, c: &mut [f32], c_rs: usize, c_cs: usize, accumulate: bool, par: Par) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "sgemm: inner dimensions");
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.data.len() > a.max_index() || k == 0, "sgemm: lhs out of bounds");
    assert!(b.data.len() > b.max_index() || k == 0, "sgemm: rhs out of bounds");
    assert!(c.len() > (m - 1) * c_rs + (n - 1) * c_cs, "sgemm: dst out of bounds");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    c[i * c_rs + j * c_cs] = 0.0;
                }
            }
        }
        return;
    }
    let parallelism = match par {
        // Tiny products are not worth waking the pool for.
        Par::Pool if m * n * k >= 1 << 15 => gemm::Parallelism::Rayon(rayon::current_num_threads()),
        _ => gemm::Parallelism::None,
    };
    // SAFETY: the asserts above bound every index the kernel touches for these
    // dimensions and strides inside the three slices; `c` is borrowed mutably and
    // cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs as isize,
            c_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Splits `n` items into chunks for rayon so each thread gets a few chunks.
pub fn chunk_len(n: usize, min: usize) -> usize {
    let t = rayon::current_num_threads().max(1) * 4;
    n.div_ceil(t).max(min).max(1)
}
