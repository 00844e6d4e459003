//! cuBLAS, loaded at run time through its stable C API (cublasCreate_v2 and
//! cublasGemmStridedBatchedEx for every GEMM), so one build works against cuBLAS 12 or 13.
//! Every status is checked and turned into an error naming the op.
//!
//! f32 GEMMs run in true f32 (TF32 off), bf16 ones with f32 accumulation.
//! Row-major GEMMs map onto cuBLAS's column-major ones by computing the
//! transpose: C^T = op(B)^T op(A)^T.

use std::ffi::{c_int, c_void};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use crate::error::{Error, Result};

type Handle = *mut c_void;
type CreateFn = unsafe extern "C" fn(*mut Handle) -> c_int;
type DestroyFn = unsafe extern "C" fn(Handle) -> c_int;
type SetStreamFn = unsafe extern "C" fn(Handle, *mut c_void) -> c_int;
type SetMathModeFn = unsafe extern "C" fn(Handle, c_int) -> c_int;
type SetWorkspaceFn = unsafe extern "C" fn(Handle, *mut c_void, usize) -> c_int;
#[allow(clippy::type_complexity)]
type GemmBatchedFn = unsafe extern "C" fn(
    Handle,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *const c_void,
    *const c_void,
    c_int,
    c_int,
    i64,
    *const c_void,
    c_int,
    c_int,
    i64,
    *const c_void,
    *mut c_void,
    c_int,
    c_int,
    i64,
    c_int,
    c_int,
    c_int,
) -> c_int;

/// Element types a GEMM operand may have (f32, or bf16 with f32 accumulation).
pub trait BlasElem: cudarc::driver::DeviceRepr {
    /// cudaDataType_t
    const CUDA_TYPE: c_int;
}
impl BlasElem for f32 {
    const CUDA_TYPE: c_int = CUDA_R_32F;
}
impl BlasElem for half::bf16 {
    const CUDA_TYPE: c_int = CUDA_R_16BF;
}

const OP_N: c_int = 0;
const OP_T: c_int = 1;
const CUDA_R_32F: c_int = 0;
const CUDA_R_16BF: c_int = 14;
const COMPUTE_32F: c_int = 68;
const GEMM_DEFAULT: c_int = -1;
/// CUBLAS_DEFAULT_MATH: keeps at least the requested precision, so f32 GEMMs stay
/// true f32 (TF32 needs the TF32 mode or NVIDIA_TF32_OVERRIDE), while the bf16
/// GemmEx calls may use tensor cores. (Pedantic mode could keep bf16 off them.)
const DEFAULT_MATH: c_int = 0;

pub struct Blas {
    _lib: libloading::Library,
    /// cuBLAS's workspace, ours: a GEMM inside a CUDA graph capture must not
    /// make cuBLAS allocate.
    _workspace: Option<CudaSlice<u8>>,
    handle: Handle,
    destroy: DestroyFn,
    gemm_batched: GemmBatchedFn,
}

// SAFETY: a cuBLAS handle may be used from any thread, one call at a time;
// the device keeps its Blas behind a Mutex (CudaDevice::with_blas), the
// Predictor's is used by one thread at a time (Predictor is not Sync), and
// every call makes the stream's context current first (gemm_batched).
unsafe impl Send for Blas {}

fn check(op: &'static str, status: c_int) -> Result<()> {
    // cublasStatus_t (cublas_api.h).
    let name = match status {
        0 => return Ok(()),
        1 => "CUBLAS_STATUS_NOT_INITIALIZED",
        3 => "CUBLAS_STATUS_ALLOC_FAILED",
        7 => "CUBLAS_STATUS_INVALID_VALUE",
        8 => "CUBLAS_STATUS_ARCH_MISMATCH",
        11 => "CUBLAS_STATUS_MAPPING_ERROR",
        13 => "CUBLAS_STATUS_EXECUTION_FAILED",
        14 => "CUBLAS_STATUS_INTERNAL_ERROR",
        15 => "CUBLAS_STATUS_NOT_SUPPORTED",
        16 => "CUBLAS_STATUS_LICENSE_ERROR",
        _ => "unknown",
    };
    Err(Error::Cublas { op, status, name })
}

impl Blas {
    /// Loads cuBLAS (`SAM_UNET_CUBLAS` names a file, else libcublas.so.13, .12 or
    /// the unversioned name through the loader path; the first whose handle can be
    /// created wins) and binds a handle to `stream`. Every GEMM of this handle runs
    /// on that stream: pass the same stream to its methods.
    pub fn new(stream: &std::sync::Arc<CudaStream>) -> Result<Self> {
        let mut names: Vec<String> = std::env::var("SAM_UNET_CUBLAS").into_iter().collect();
        names.extend(["libcublas.so.13", "libcublas.so.12", "libcublas.so"].map(String::from));
        let mut errors = vec![];
        for n in &names {
            // SAFETY: loading cuBLAS runs only its library initialisers.
            let Ok(lib) = (unsafe { libloading::Library::new(n) }) else {
                continue;
            };
            match Self::with_library(lib, stream) {
                Ok(b) => return Ok(b),
                Err(e) => errors.push(format!("{n}: {e}")),
            }
        }
        Err(Error::CudaUnavailable(format!(
            "no usable cuBLAS (tried {names:?}; {errors:?}); set SAM_UNET_CUBLAS or LD_LIBRARY_PATH"
        )))
    }

    fn with_library(lib: libloading::Library, stream: &std::sync::Arc<CudaStream>) -> Result<Self> {
        let sym = |e: libloading::Error| Error::CudaUnavailable(format!("cuBLAS symbol: {e}"));
        // SAFETY: these are cuBLAS's documented C entry points with the declared
        // signatures (cublas_api.h), stable across cuBLAS 11-13.
        unsafe {
            let create: CreateFn = *lib.get::<CreateFn>(b"cublasCreate_v2").map_err(sym)?;
            let destroy: DestroyFn = *lib.get::<DestroyFn>(b"cublasDestroy_v2").map_err(sym)?;
            let set_stream: SetStreamFn =
                *lib.get::<SetStreamFn>(b"cublasSetStream_v2").map_err(sym)?;
            let set_math: SetMathModeFn = *lib
                .get::<SetMathModeFn>(b"cublasSetMathMode")
                .map_err(sym)?;
            let gemm_batched: GemmBatchedFn = *lib
                .get::<GemmBatchedFn>(b"cublasGemmStridedBatchedEx")
                .map_err(sym)?;
            let mut handle: Handle = std::ptr::null_mut();
            check("cublasCreate", create(&mut handle))?;
            let mut b = Blas {
                _lib: lib,
                _workspace: None,
                handle,
                destroy,
                gemm_batched,
            };
            check(
                "cublasSetStream",
                set_stream(handle, stream.cu_stream() as *mut c_void),
            )?;
            check("cublasSetMathMode", set_math(handle, DEFAULT_MATH))?;
            // cuBLAS 11+; an older one keeps its own workspace (graphs may then
            // fail to capture, and the predictor runs eagerly).
            if let Ok(set_ws) = b._lib.get::<SetWorkspaceFn>(b"cublasSetWorkspace_v2") {
                const WORKSPACE: usize = 32 << 20;
                if let Ok(ws) = stream.alloc_zeros::<u8>(WORKSPACE) {
                    let (wp, _g) = ws.device_ptr(stream);
                    check(
                        "cublasSetWorkspace",
                        set_ws(handle, wp as *mut c_void, WORKSPACE),
                    )?;
                    drop(_g);
                    b._workspace = Some(ws);
                }
            }
            Ok(b)
        }
    }

    /// y [m, n] = (accumulate ? y : 0) + x [m, k] W^T, W [n, k] row-major (a Linear).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_f32(
        &self,
        stream: &CudaStream,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        self.gemm_f32(stream, false, true, m, n, k, x, k, w, k, y, n, accumulate)
    }

    /// The same Linear in bf16 inputs with f32 accumulation and f32 output:
    /// x [m, k] bf16, w [n, k] bf16 -> y [m, n] f32.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_bf16(
        &self,
        stream: &CudaStream,
        x: &CudaSlice<half::bf16>,
        w: &CudaSlice<half::bf16>,
        y: &mut CudaSlice<f32>,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) -> Result<()> {
        self.gemm_batched::<half::bf16, _, _, _>(
            stream, false, true, m, n, k, x, k, 0, w, k, 0, y, n, 0, 1, accumulate,
        )
    }
}

impl Blas {
    /// `batch` row-major GEMMs in one call: c_i [m, n] (+)= op(a_i) op(b_i),
    /// operand i starting `stride_*` elements after operand i - 1 (stride 0:
    /// the same matrix for every i, e.g. conv weights). a and b are f32 or
    /// bf16 (not mixed), c f32, accumulation in f32 (no TF32). Layout
    /// arguments as gemm_f32.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_batched<T: BlasElem, A: DevicePtr<T>, B: DevicePtr<T>, C: DevicePtrMut<f32>>(
        &self,
        stream: &CudaStream,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &A,
        lda: usize,
        stride_a: usize,
        b: &B,
        ldb: usize,
        stride_b: usize,
        c: &mut C,
        ldc: usize,
        stride_c: usize,
        batch: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        let need = |rows: usize, cols: usize, ld: usize, stride: usize| {
            if rows == 0 || cols == 0 || batch == 0 {
                0
            } else {
                (batch - 1) * stride + (rows - 1) * ld + cols
            }
        };
        let limit = c_int::MAX as usize;
        if a.len() < need(ar, ac, lda, stride_a)
            || b.len() < need(br, bc, ldb, stride_b)
            || c.len() < need(m, n, ldc, stride_c)
            || lda < ac
            || ldb < bc
            || ldc < n
            || [m, n, k, lda, ldb, ldc, batch].iter().any(|&v| v > limit)
        {
            return Err(Error::shape(
                "gemm batched (cuda)",
                format!(
                    "{batch} x (m {m} n {n} k {k}): buffers {} / {} / {} with ld {lda} / {ldb} / {ldc}, strides {stride_a} / {stride_b} / {stride_c}",
                    a.len(),
                    b.len(),
                    c.len()
                ),
            ));
        }
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        // cuBLAS works in the calling thread's current context: make it this
        // stream's (a predictor may have moved to another thread).
        stream
            .context()
            .bind_to_thread()
            .map_err(crate::cuda::driver_err("cuBLAS: bind context"))?;
        let (ap, _ga) = a.device_ptr(stream);
        let (bp, _gb) = b.device_ptr(stream);
        let (cp, _gc) = c.device_ptr_mut(stream);
        let op = |t: bool| if t { OP_T } else { OP_N };
        // Column-major view as in gemm_f32: C^T = op(B)^T op(A)^T, per batch item.
        // SAFETY: every element of every batch item lies inside the buffers
        // (checked above); the element types are the ones named to cuBLAS; the
        // guards keep the buffers alive and stream-ordered for the call.
        unsafe {
            check(
                "cublasGemmStridedBatchedEx",
                (self.gemm_batched)(
                    self.handle,
                    op(tb),
                    op(ta),
                    n as c_int,
                    m as c_int,
                    k as c_int,
                    &alpha as *const f32 as *const c_void,
                    bp as *const c_void,
                    T::CUDA_TYPE,
                    ldb as c_int,
                    stride_b as i64,
                    ap as *const c_void,
                    T::CUDA_TYPE,
                    lda as c_int,
                    stride_a as i64,
                    &beta as *const f32 as *const c_void,
                    cp as *mut c_void,
                    CUDA_R_32F,
                    ldc as c_int,
                    stride_c as i64,
                    batch as c_int,
                    COMPUTE_32F,
                    GEMM_DEFAULT,
                ),
            )
        }
    }

    /// Row-major c [m, n] (+)= op(a) op(b), op(a) m x k, op(b) k x n; `ta` / `tb`
    /// say that a is stored k x m / b is stored n x k; lda, ldb, ldc are the
    /// row-major leading dimensions. Works on slices and views.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_f32<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        stream: &CudaStream,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &A,
        lda: usize,
        b: &B,
        ldb: usize,
        c: &mut C,
        ldc: usize,
        accumulate: bool,
    ) -> Result<()> {
        self.gemm_batched::<f32, _, _, _>(
            stream, ta, tb, m, n, k, a, lda, 0, b, ldb, 0, c, ldc, 0, 1, accumulate,
        )
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by cublasCreate and is destroyed once.
        unsafe {
            (self.destroy)(self.handle);
        }
    }
}
