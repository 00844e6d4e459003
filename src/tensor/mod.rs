//! Tensors: a shape, a dtype and a device-tagged storage.
//!
//! Storage is reference counted so that reshapes and clones are free; an op that
//! writes in place (`as_f32_mut`) copies only when the storage is shared. The CPU
//! backend computes in f32; f16 / bf16 exist for storage and transfer (weights are
//! converted once, at load). A CUDA storage variant slots in beside `Cpu` without
//! changing the op signatures.

use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(Error::input(
                "dtype",
                format!("unknown dtype `{s}` (f32, f16, bf16)"),
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = Error;
    /// `cpu`, `cuda` (device 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(Error::input(
                    "device",
                    format!("unknown device `{s}` (cpu, cuda, cuda:N)"),
                )),
            },
        }
    }
}

/// Dimensions, outermost first (row-major, contiguous).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn new(dims: Vec<usize>) -> Self {
        Shape(dims)
    }
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}
impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}

#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(CpuStorage),
}

#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Shape,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, {})",
            self.shape,
            self.dtype().name(),
            self.device()
        )
    }
}

impl Tensor {
    /// A CPU f32 tensor; errors when `data` does not hold `shape`'s element count.
    pub fn from_vec(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("{} values cannot have shape {:?}", data.len(), shape),
            ));
        }
        Ok(Tensor {
            storage: Arc::new(Storage::Cpu(CpuStorage::F32(data))),
            shape,
        })
    }

    /// Internal constructor for op outputs whose length is right by construction.
    pub(crate) fn from_f32(data: Vec<f32>, dims: &[usize]) -> Self {
        debug_assert_eq!(data.len(), dims.iter().product::<usize>());
        Tensor {
            storage: Arc::new(Storage::Cpu(CpuStorage::F32(data))),
            shape: Shape(dims.to_vec()),
        }
    }

    pub fn from_f16(data: Vec<f16>, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::shape(
                "Tensor::from_f16",
                format!("{} values vs {:?}", data.len(), shape),
            ));
        }
        Ok(Tensor {
            storage: Arc::new(Storage::Cpu(CpuStorage::F16(data))),
            shape,
        })
    }

    pub fn from_bf16(data: Vec<bf16>, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::shape(
                "Tensor::from_bf16",
                format!("{} values vs {:?}", data.len(), shape),
            ));
        }
        Ok(Tensor {
            storage: Arc::new(Storage::Cpu(CpuStorage::BF16(data))),
            shape,
        })
    }

    pub fn zeros(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let n = shape.numel();
        Tensor {
            storage: Arc::new(Storage::Cpu(CpuStorage::F32(vec![0.0; n]))),
            shape,
        }
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
    pub fn dtype(&self) -> DType {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(_)) => DType::F32,
            Storage::Cpu(CpuStorage::F16(_)) => DType::F16,
            Storage::Cpu(CpuStorage::BF16(_)) => DType::BF16,
        }
    }
    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    /// The f32 values of a CPU tensor (row-major).
    pub fn as_f32(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
            _ => Err(Error::DType {
                op: "as_f32",
                expected: "f32",
                got: self.dtype().name(),
            }),
        }
    }

    /// Mutable f32 values; copies the storage first if another tensor shares it.
    pub fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        let dt = self.dtype();
        match Arc::make_mut(&mut self.storage) {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
            _ => Err(Error::DType {
                op: "as_f32_mut",
                expected: "f32",
                got: dt.name(),
            }),
        }
    }

    /// The values as an owned f32 vector (no copy when this tensor is the only owner).
    pub fn into_f32_vec(self) -> Result<Vec<f32>> {
        match Arc::try_unwrap(self.storage) {
            Ok(Storage::Cpu(CpuStorage::F32(v))) => Ok(v),
            Ok(s) => Tensor {
                storage: Arc::new(s),
                shape: self.shape,
            }
            .to_dtype(DType::F32)
            .into_f32_vec(),
            Err(arc) => match &*arc {
                Storage::Cpu(CpuStorage::F32(v)) => Ok(v.clone()),
                _ => Tensor {
                    storage: arc.clone(),
                    shape: self.shape,
                }
                .to_dtype(DType::F32)
                .into_f32_vec(),
            },
        }
    }

    /// Converts to `dtype` (round to nearest even for f16 / bf16).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let Storage::Cpu(s) = &*self.storage;
        let f32s: Vec<f32> = match s {
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        };
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(f32s),
            DType::F16 => CpuStorage::F16(f32s.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => CpuStorage::BF16(f32s.iter().map(|&x| bf16::from_f32(x)).collect()),
        };
        Tensor {
            storage: Arc::new(Storage::Cpu(storage)),
            shape: self.shape.clone(),
        }
    }

    /// The same storage seen with another shape of equal element count.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{:?} -> {:?}", self.shape, shape),
            ));
        }
        Ok(Tensor {
            storage: self.storage.clone(),
            shape,
        })
    }

    /// Checks the dims, naming the op and both shapes on mismatch.
    pub(crate) fn expect_dims(&self, op: &'static str, what: &str, dims: &[usize]) -> Result<()> {
        if self.dims() != dims {
            return Err(Error::shape(
                op,
                format!("{what}: expected {:?}, got {:?}", dims, self.dims()),
            ));
        }
        Ok(())
    }

    /// Checks the rank and returns the dims.
    pub(crate) fn dims_n<const N: usize>(
        &self,
        op: &'static str,
        what: &str,
    ) -> Result<[usize; N]> {
        self.dims().try_into().map_err(|_| {
            Error::shape(
                op,
                format!("{what}: expected rank {N}, got shape {:?}", self.dims()),
            )
        })
    }
}
