//! A device-resident f32 tensor: a cudarc buffer and its dims (row-major), as
//! the CUDA model tree passes them; and `GpuIn`, what a launcher reads of an
//! input: either that, or a `Tensor` on the device seen through `GpuRef`.

use cudarc::driver::CudaSlice;

use crate::cuda::CudaDevice;
use crate::error::Result;
use crate::tensor::Tensor;

pub struct GpuTensor {
    pub data: CudaSlice<f32>,
    pub dims: Vec<usize>,
}

impl GpuTensor {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
    pub fn upload(dev: &CudaDevice, t: &Tensor) -> Result<Self> {
        Ok(GpuTensor {
            data: dev.upload(t.as_f32()?)?,
            dims: t.dims().to_vec(),
        })
    }
    pub fn zeros(dev: &CudaDevice, dims: &[usize]) -> Result<Self> {
        Ok(GpuTensor {
            data: dev.alloc_zeros(dims.iter().product())?,
            dims: dims.to_vec(),
        })
    }
    pub fn download(&self, dev: &CudaDevice) -> Result<Tensor> {
        Tensor::from_vec(dev.download(&self.data)?, self.dims.clone())
    }
    /// The same buffer seen with other dims of equal element count.
    pub fn reshape(self, dims: &[usize]) -> Self {
        debug_assert_eq!(dims.iter().product::<usize>(), self.numel());
        GpuTensor {
            data: self.data,
            dims: dims.to_vec(),
        }
    }
}

/// An f32 input of a launcher: a whole device buffer and its dims.
pub trait GpuIn {
    fn data(&self) -> &CudaSlice<f32>;
    fn dims(&self) -> &[usize];
    fn numel(&self) -> usize {
        self.dims().iter().product()
    }
}

impl GpuIn for GpuTensor {
    fn data(&self) -> &CudaSlice<f32> {
        &self.data
    }
    fn dims(&self) -> &[usize] {
        &self.dims
    }
}

/// A compact f32 CUDA `Tensor` borrowed as a launcher input
/// (`Tensor::gpu_ref`).
pub struct GpuRef<'a> {
    pub(crate) data: &'a CudaSlice<f32>,
    pub(crate) dims: &'a [usize],
}

impl GpuIn for GpuRef<'_> {
    fn data(&self) -> &CudaSlice<f32> {
        self.data
    }
    fn dims(&self) -> &[usize] {
        self.dims
    }
}
