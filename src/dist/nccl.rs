//! GPU ranks joined by NCCL (loaded at run time, like the CUDA driver):
//! the gradient buffer is summed on the devices, over NVLink or InfiniBand,
//! without passing through the host. Rank 0 creates the NCCL id and hands
//! it to the others over the TCP group every rank joins first.
//!
//! NCCL adds in the order of its rings and trees, not in rank order; every
//! rank still receives the same bits, which is what keeps the ranks'
//! parameters equal.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::Collective;
use crate::cuda::CudaDevice;
use crate::error::{Error, Result};

const OP: &str = "nccl";

fn fail(msg: String) -> Error {
    Error::Collective { op: OP, msg }
}

/// Whether libnccl can be loaded on this machine.
pub fn nccl_available() -> bool {
    // SAFETY: loads (and unloads) the shared library by name to see that it
    // is there; no symbol of it is called.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// This process's rank of an NCCL group, on one GPU.
pub struct Nccl {
    rank: usize,
    world: usize,
    dev: Arc<CudaDevice>,
    comm: Mutex<Comm>,
    /// The stream the communicator enqueues on: the device's main stream,
    /// or its side stream for the duplicate that sums gradient buckets.
    stream: Arc<CudaStream>,
    /// The group the id came through; kept open for the run (closing it
    /// would look like a failure to the other ranks). A duplicate borrows
    /// its original's.
    bootstrap: Arc<dyn Collective>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a
// time; every use goes through the Mutex, on the communicator's stream.
unsafe impl Send for Nccl {}
// SAFETY: as above: shared references only reach the communicator through
// the Mutex.
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Joins the ranks of `bootstrap` (a group over TCP) in an NCCL group on
    /// `dev`. Fails with a clear error when libnccl is missing.
    pub fn new(dev: Arc<CudaDevice>, bootstrap: Box<dyn Collective>) -> Result<Nccl> {
        let bootstrap: Arc<dyn Collective> = Arc::from(bootstrap);
        let stream = dev.stream().clone();
        Self::join(dev, stream, bootstrap)
    }

    /// A communicator of the ranks of `bootstrap` enqueuing on `stream`.
    fn join(
        dev: Arc<CudaDevice>,
        stream: Arc<CudaStream>,
        bootstrap: Arc<dyn Collective>,
    ) -> Result<Nccl> {
        let (rank, world) = (bootstrap.rank(), bootstrap.world());
        if !nccl_available() {
            return Err(fail(format!(
                "{world} GPU ranks need NCCL, and libnccl.so was not found: install NCCL (the \
                 nvidia-nccl wheel or the system package; a libnccl.so link beside libnccl.so.2 \
                 on LD_LIBRARY_PATH), or pass --collective tcp (slow: gradients through the host)"
            )));
        }
        // The id's 128 bytes, from rank 0 to all: an all-reduce where the
        // others add zeros (exact in f64).
        let mut bytes = [0f64; 128];
        if rank == 0 {
            let id = Id::new().map_err(|e| fail(format!("creating the NCCL id: {e:?}")))?;
            for (b, &c) in bytes.iter_mut().zip(id.internal().iter()) {
                *b = f64::from(c as u8);
            }
        }
        bootstrap.all_reduce_sum_f64(&mut bytes)?;
        let internal: [core::ffi::c_char; 128] =
            std::array::from_fn(|i| bytes[i] as u8 as core::ffi::c_char);
        let comm =
            Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal)).map_err(|e| {
                fail(format!(
                    "rank {rank} of {world} joining the NCCL group: {e:?}"
                ))
            })?;
        Ok(Nccl {
            rank,
            world,
            dev,
            comm: Mutex::new(comm),
            stream,
            bootstrap,
        })
    }

    /// Before a call on the main stream's communicator: the main stream
    /// waits for the side stream, so that an all-reduce of this communicator
    /// never runs beside one of the duplicate's (gradient buckets). Two
    /// communicators' kernels in flight at once on one GPU can deadlock
    /// (NCCL asks for one at a time per device): this way each rank runs
    /// them one after another, in the program order every rank shares.
    fn after_side_stream(&self) -> Result<()> {
        if Arc::ptr_eq(&self.stream, self.dev.stream())
            && let Some(side) = self.dev.side_stream_made()
        {
            self.dev.order(&self.stream, side)?;
        }
        Ok(())
    }

    fn sum_on_device<T>(&self, x: &CudaSlice<T>) -> Result<CudaSlice<T>>
    where
        T: cudarc::nccl::NcclType + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
        self.after_side_stream()?;
        let mut out = self
            .stream
            .alloc_zeros::<T>(x.len())
            .map_err(|e| fail(format!("allocating {} values: {e}", x.len())))?;
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        comm.all_reduce(x, &mut out, &ReduceOp::Sum)
            .map_err(|e| fail(format!("all-reduce of {} values: {e:?}", x.len())))?;
        Ok(out)
    }

    fn sum_host<T>(&self, x: &mut [T]) -> Result<()>
    where
        T: cudarc::nccl::NcclType + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
        self.after_side_stream()?;
        let s = &self.stream;
        let d = s
            .clone_htod(x)
            .map_err(|e| fail(format!("copy to the device: {e}")))?;
        let out = self.sum_on_device(&d)?;
        s.memcpy_dtoh(&out, x)
            .map_err(|e| fail(format!("copy to the host: {e}")))?;
        s.synchronize()
            .map_err(|e| fail(format!("synchronize: {e}")))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<()> {
        self.sum_host(x)
    }
    fn all_reduce_sum_f64(&self, x: &mut [f64]) -> Result<()> {
        self.sum_host(x)
    }
    fn all_reduce_sum_device(&self, x: &CudaSlice<f32>) -> Result<Option<CudaSlice<f32>>> {
        if !Arc::ptr_eq(&self.stream, self.dev.stream()) {
            // The result would be the side stream's: only the original sums
            // whole buffers for the main stream.
            return Ok(None);
        }
        self.sum_on_device(x).map(Some)
    }
    fn sums_on_stream(&self) -> bool {
        true
    }
    /// In place on the communicator's stream (the caller's `stream` must be
    /// it: NCCL binds a communicator to one stream); the host does not wait.
    fn all_reduce_sum_on_stream(
        &self,
        stream: &Arc<CudaStream>,
        x: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        if stream.cu_stream() != self.stream.cu_stream() {
            return Err(fail(format!(
                "rank {}: asked to sum on another stream than the communicator's",
                self.rank
            )));
        }
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        comm.all_reduce_in_place(x, &ReduceOp::Sum)
            .map_err(|e| fail(format!("all-reduce of {} values: {e:?}", x.len())))?;
        Ok(())
    }
    /// A second communicator of the same ranks on the device's side stream
    /// (its own NCCL id, through the same bootstrap group): gradient buckets
    /// summed there overlap backward on the main stream, and never queue
    /// behind SyncBatchNorm's reductions on this one. The bucket sums still
    /// run before the next of those (`after_side_stream`), never beside.
    fn duplicate(&self) -> Result<Option<Box<dyn Collective>>> {
        let side = self.dev.side_stream()?;
        let d = Self::join(self.dev.clone(), side, Arc::clone(&self.bootstrap))?;
        Ok(Some(Box::new(d)))
    }
}
