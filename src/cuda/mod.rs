//! The CUDA runtime: driver probe, context and stream per device, the PTX
//! modules compiled by build.rs, device buffers, and launch helpers. cudarc is
//! loaded dynamically, so this compiles and the CPU path runs on machines with
//! no CUDA at all; every failure is a typed `Error`, and the driver library is
//! probed before the first call (cudarc panics when libcuda is missing).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError};

pub mod blas;
pub mod graph;
pub mod tensor;

use crate::error::{Error, Result};

mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Whether build.rs compiled the kernels (and why not, when it did not).
pub fn kernels_built() -> std::result::Result<(), &'static str> {
    match kernels::NOT_BUILT {
        None => Ok(()),
        Some(why) => Err(why),
    }
}

/// Names of the kernel files compiled into this build.
pub fn kernel_files() -> Vec<&'static str> {
    kernels::PTX.iter().map(|(n, _)| *n).collect()
}

/// A driver error as the variant a caller can act on: out of memory, a lost
/// or missing device, or another driver failure.
pub(crate) fn driver_err(op: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| classify(op, e, None)
}

/// A failed allocation of `bytes`: out of memory says how much was asked for.
pub(crate) fn alloc_err(op: &'static str, bytes: usize) -> impl Fn(DriverError) -> Error {
    move |e| classify(op, e, Some(bytes))
}

/// A failed kernel launch (or a failure of an earlier kernel reported by it).
pub(crate) fn launch_err(op: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| match classify(op, e, None) {
        Error::CudaDriver { op, msg } => Error::CudaLaunch { op, msg },
        other => other,
    }
}

fn classify(op: &'static str, e: DriverError, bytes: Option<usize>) -> Error {
    use cudarc::driver::sys::CUresult as R;
    match e.0 {
        R::CUDA_ERROR_OUT_OF_MEMORY => Error::CudaOutOfMemory { op, bytes },
        R::CUDA_ERROR_NO_DEVICE
        | R::CUDA_ERROR_INVALID_DEVICE
        | R::CUDA_ERROR_NOT_INITIALIZED
        | R::CUDA_ERROR_DEINITIALIZED
        | R::CUDA_ERROR_NO_BINARY_FOR_GPU
        | R::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => Error::CudaUnavailable(format!("{op}: {e}")),
        R::CUDA_ERROR_LAUNCH_FAILED
        | R::CUDA_ERROR_ILLEGAL_ADDRESS
        | R::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
        | R::CUDA_ERROR_LAUNCH_TIMEOUT
        | R::CUDA_ERROR_ILLEGAL_INSTRUCTION
        | R::CUDA_ERROR_MISALIGNED_ADDRESS
        | R::CUDA_ERROR_INVALID_PC
        | R::CUDA_ERROR_HARDWARE_STACK_ERROR => Error::CudaLaunch {
            op,
            msg: e.to_string(),
        },
        _ => Error::CudaDriver {
            op,
            msg: e.to_string(),
        },
    }
}

/// `cuda:ordinal`, opened once per process and shared by every tensor moved
/// there with `Tensor::to_device` (like a framework's current-device handle).
pub fn shared_device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    use std::sync::{Mutex, OnceLock};
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    let mut m = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(d) = m.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Arc::new(CudaDevice::new(ordinal)?);
    m.insert(ordinal, d.clone());
    Ok(d)
}

/// One device: its context, one stream, the loaded kernel modules and a
/// cuBLAS handle on that stream (created at its first use).
pub struct CudaDevice {
    // First, so it is dropped before the stream and context it uses.
    blas: std::sync::Mutex<Option<blas::Blas>>,
    pub ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// A second stream, made at its first use (`side_stream`).
    side: std::sync::OnceLock<Arc<CudaStream>>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    /// Kernels already looked up: every op launch asks for its kernel, and
    /// cuModuleGetFunction is a driver call.
    functions: std::sync::Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

impl CudaDevice {
    /// Opens `cuda:ordinal`: probes the driver library, creates the context and a
    /// stream, and loads every kernel module.
    pub fn new(ordinal: usize) -> Result<Self> {
        if let Err(why) = kernels_built() {
            return Err(Error::CudaUnavailable(format!(
                "kernels were not built: {why}"
            )));
        }
        // SAFETY: only tries to open the driver library (dlopen); no CUDA call is
        // made, so a machine without libcuda gets an error instead of cudarc's panic.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::CudaUnavailable(
                "no CUDA driver (libcuda) on this machine".into(),
            ));
        }
        let n = CudaContext::device_count().map_err(driver_err("device_count"))?;
        if ordinal as i32 >= n {
            return Err(Error::CudaUnavailable(format!(
                "cuda:{ordinal} requested, {n} device(s) present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err("create context"))?;
        // cudarc's cross-stream event tracking costs two events per
        // allocation and would order whole buffers: the one buffer shared
        // between streams (the flat gradients, whose buckets the side stream
        // sums while backward writes other slots) is ordered by explicit
        // events instead.
        // SAFETY: every buffer of this device is used on its main stream,
        // except the gradient buckets of train::reduce_on_side_stream, which
        // records an event after each bucket's last write that the side
        // stream waits for, and joins the main stream to the side stream
        // before anything else touches the buffer (the emulator's
        // stream-order check verifies both).
        unsafe { ctx.disable_event_tracking() };
        keep_freed_memory(&ctx)?;
        let stream = ctx.new_stream().map_err(driver_err("create stream"))?;
        let mut modules = HashMap::new();
        for (name, ptx) in kernels::PTX {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(*ptx))
                .map_err(driver_err("load PTX module"))?;
            modules.insert(*name, m);
        }
        Ok(CudaDevice {
            blas: std::sync::Mutex::new(None),
            ordinal,
            ctx,
            stream,
            side: std::sync::OnceLock::new(),
            modules,
            functions: Default::default(),
        })
    }

    /// Runs `f` with this device's cuBLAS handle (loaded and bound to the
    /// device's stream at the first call; one GEMM call at a time).
    pub fn with_blas<R>(&self, f: impl FnOnce(&blas::Blas) -> Result<R>) -> Result<R> {
        let mut b = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        if b.is_none() {
            *b = Some(blas::Blas::new(&self.stream)?);
        }
        f(b.as_ref().expect("set above"))
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown".into())
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A second stream of this device, made at the first call: gradient
    /// buckets are summed there (NCCL) while backward goes on on `stream()`.
    /// Nothing orders the two but events (`CudaStream::join`, `wait`).
    pub fn side_stream(&self) -> Result<Arc<CudaStream>> {
        if let Some(s) = self.side.get() {
            return Ok(s.clone());
        }
        let s = self
            .ctx
            .new_stream()
            .map_err(driver_err("create side stream"))?;
        Ok(self.side.get_or_init(|| s).clone())
    }

    /// The side stream, if something made it.
    pub fn side_stream_made(&self) -> Option<&Arc<CudaStream>> {
        self.side.get()
    }

    /// `waiter` waits (on the device, not the host) for what `of` holds now.
    pub fn order(&self, waiter: &CudaStream, of: &CudaStream) -> Result<()> {
        waiter.join(of).map_err(driver_err("order streams (event)"))
    }

    /// A kernel from one of the modules.
    pub fn function(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(&(module, name)) {
            return Ok(f.clone());
        }
        let m = self
            .modules
            .get(module)
            .ok_or_else(|| Error::CudaUnavailable(format!("kernel module `{module}` not built")))?;
        let f = m.load_function(name).map_err(driver_err("load kernel"))?;
        cache.insert((module, name), f.clone());
        Ok(f)
    }

    pub fn upload(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream
            .clone_htod(v)
            .map_err(alloc_err("copy to device", std::mem::size_of_val(v)))
    }

    pub fn download(&self, d: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream
            .clone_dtoh(d)
            .map_err(driver_err("copy to host"))
    }

    /// A buffer of n floats for an op to write completely (no memset: every op
    /// output and scratch buffer here is written in full before it is read).
    pub fn alloc(&self, n: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: f32 has no invalid bit patterns, and the callers (the op
        // launchers of this crate) write every element before reading any; the
        // buffer is stream-ordered on this device's only stream.
        unsafe { self.stream.alloc::<f32>(n) }.map_err(alloc_err("allocate", n.saturating_mul(4)))
    }

    /// A buffer of n bf16 values for an op to write completely (as `alloc`).
    pub fn alloc_bf16(&self, n: usize) -> Result<CudaSlice<half::bf16>> {
        // SAFETY: as in `alloc`: bf16 has no invalid bit patterns and every
        // caller writes all n values before any is read, on this one stream.
        unsafe { self.stream.alloc::<half::bf16>(n) }
            .map_err(alloc_err("allocate", n.saturating_mul(2)))
    }

    /// A buffer of n f64 values (reduction partials) for an op to write
    /// completely (as `alloc`).
    pub fn alloc_f64(&self, n: usize) -> Result<CudaSlice<f64>> {
        // SAFETY: as in `alloc`: f64 has no invalid bit patterns and every
        // caller writes all n values before any is read, on this one stream.
        unsafe { self.stream.alloc::<f64>(n) }.map_err(alloc_err("allocate", n.saturating_mul(8)))
    }

    /// A zeroed buffer of n floats.
    pub fn alloc_zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(n)
            .map_err(alloc_err("allocate", n.saturating_mul(4)))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("synchronize"))
    }
}

/// The caching memory pool. cudarc allocates with cuMemAllocAsync from the
/// device's default pool; raising the pool's release threshold to "never" keeps
/// freed blocks cached for reuse, so the steady state of inference (the same
/// sizes image after image) makes no allocation from the driver.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: plain driver queries on this context's device with valid
    // out-pointers; a device without memory pools reports an error we ignore.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) != sys::CUresult::CUDA_SUCCESS
        {
            return Ok(());
        }
        let mut threshold: u64 = u64::MAX;
        // A tuning setting only: a driver that refuses it still works, uncached.
        let _ = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        );
    }
    Ok(())
}

/// Blocks for a grid-stride launch over n elements.
pub fn grid_for(n: usize) -> u32 {
    (n.div_ceil(256)).clamp(1, 65_535 * 16) as u32
}

/// A 1-d grid-stride launch configuration over n elements (the geometry of
/// every element-wise kernel; public for the host-emulation tests).
pub fn cfg1d(n: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig {
        grid_dim: (grid_for(n), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub use tensor::{GpuIn, GpuRef, GpuTensor};

/// The activation code the kernels take: 0 none, 1 ReLU, 2 GELU.
pub(crate) fn act_code(a: crate::ops::activation::Act) -> i32 {
    match a {
        crate::ops::activation::Act::None => 0,
        crate::ops::activation::Act::Relu => 1,
        crate::ops::activation::Act::Gelu => 2,
    }
}
