//! Tensors: a shape, a dtype and a storage on the CPU or a CUDA device.
//!
//! Storage is reference counted so that reshapes, clones and views are free; a
//! tensor is a contiguous range of its storage (`offset`, then `shape`'s element
//! count), so that, say, all parameters can live in one flat buffer and each be
//! a view of it. An op that writes in place (`as_f32_mut`, `cuda_f32_mut`)
//! copies only when the storage is shared or larger than the view; on a GPU that
//! copy can fail (out of memory) and says so, where cudarc's `CudaSlice::clone`
//! would panic, which is why `Storage` is not `Clone`.
//!
//! Dtypes: the CPU backend computes in f32; f16 / bf16 exist there for storage
//! and transfer (weights are converted once, at load). A CUDA tensor is f32 or
//! bf16 (the bf16 GEMM inputs), never f16. A CUDA storage holds a shared handle
//! to its device (context, stream, kernel modules): `to_device`, `to_host` and
//! `to_dtype` move and convert, each returning a typed error when the device is
//! missing or out of memory.

use std::fmt;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use half::{bf16, f16};

use crate::cuda::{CudaDevice, driver_err};
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

/// Values in host memory.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl CpuStorage {
    fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
        }
    }
    /// Elements [offset, offset + n) as a new storage.
    fn range(&self, offset: usize, n: usize) -> CpuStorage {
        match self {
            CpuStorage::F32(v) => CpuStorage::F32(v[offset..offset + n].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[offset..offset + n].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[offset..offset + n].to_vec()),
        }
    }
}

/// Values in one CUDA device's memory.
pub(crate) enum CudaBuf {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
}

/// A CUDA buffer and the device it lives on (whose stream orders every use).
pub struct CudaStorage {
    pub(crate) dev: Arc<CudaDevice>,
    pub(crate) buf: CudaBuf,
}

impl CudaStorage {
    fn len(&self) -> usize {
        match &self.buf {
            CudaBuf::F32(s) => s.len(),
            CudaBuf::BF16(s) => s.len(),
        }
    }
}

impl fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (dt, n) = match &self.buf {
            CudaBuf::F32(s) => ("f32", s.len()),
            CudaBuf::BF16(s) => ("bf16", s.len()),
        };
        write!(f, "CudaStorage(cuda:{}, {dt} x {n})", self.dev.ordinal)
    }
}

/// Where a tensor's values live. Not `Clone`: copying a CUDA buffer can run
/// out of memory, so every copy goes through a fallible path.
#[derive(Debug)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

impl Storage {
    fn len(&self) -> usize {
        match self {
            Storage::Cpu(c) => c.len(),
            Storage::Cuda(c) => c.len(),
        }
    }
}

/// A shape over a contiguous range of a shared storage.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    // Invariant: offset + shape.numel() <= storage.len().
    offset: usize,
    shape: Shape,
    /// Set while an autograd recording tracks this value (crate::autograd).
    var: Option<crate::autograd::Var>,
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

fn whole(storage: Storage, shape: Shape) -> Tensor {
    debug_assert_eq!(storage.len(), shape.numel());
    Tensor {
        storage: Arc::new(storage),
        offset: 0,
        shape,
        var: None,
    }
}

fn check_len(op: &'static str, len: usize, shape: &Shape) -> Result<()> {
    if len != shape.numel() {
        return Err(Error::shape(
            op,
            format!("{len} values cannot have shape {shape:?}"),
        ));
    }
    Ok(())
}

impl Tensor {
    /// A CPU f32 tensor; errors when `data` does not hold `shape`'s element count.
    pub fn from_vec(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        check_len("Tensor::from_vec", data.len(), &shape)?;
        Ok(whole(Storage::Cpu(CpuStorage::F32(data)), shape))
    }

    /// Internal constructor for op outputs whose length is right by construction.
    pub(crate) fn from_f32(data: Vec<f32>, dims: &[usize]) -> Self {
        whole(Storage::Cpu(CpuStorage::F32(data)), Shape(dims.to_vec()))
    }

    pub fn from_f16(data: Vec<f16>, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        check_len("Tensor::from_f16", data.len(), &shape)?;
        Ok(whole(Storage::Cpu(CpuStorage::F16(data)), shape))
    }

    pub fn from_bf16(data: Vec<bf16>, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        check_len("Tensor::from_bf16", data.len(), &shape)?;
        Ok(whole(Storage::Cpu(CpuStorage::BF16(data)), shape))
    }

    /// A CUDA f32 tensor over a whole buffer of `dev` (an op's output).
    pub(crate) fn from_cuda_f32(
        dev: &Arc<CudaDevice>,
        buf: CudaSlice<f32>,
        shape: impl Into<Shape>,
    ) -> Result<Self> {
        let shape = shape.into();
        check_len("Tensor::from_cuda_f32", buf.len(), &shape)?;
        Ok(whole(
            Storage::Cuda(CudaStorage {
                dev: dev.clone(),
                buf: CudaBuf::F32(buf),
            }),
            shape,
        ))
    }

    /// A CUDA bf16 tensor over a whole buffer of `dev` (an op's output).
    pub(crate) fn from_cuda_bf16(
        dev: &Arc<CudaDevice>,
        buf: CudaSlice<bf16>,
        shape: impl Into<Shape>,
    ) -> Result<Self> {
        let shape = shape.into();
        check_len("Tensor::from_cuda_bf16", buf.len(), &shape)?;
        Ok(whole(
            Storage::Cuda(CudaStorage {
                dev: dev.clone(),
                buf: CudaBuf::BF16(buf),
            }),
            shape,
        ))
    }

    pub fn zeros(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let n = shape.numel();
        whole(Storage::Cpu(CpuStorage::F32(vec![0.0; n])), shape)
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
            Storage::Cpu(CpuStorage::F32(_))
            | Storage::Cuda(CudaStorage {
                buf: CudaBuf::F32(_),
                ..
            }) => DType::F32,
            Storage::Cpu(CpuStorage::F16(_)) => DType::F16,
            Storage::Cpu(CpuStorage::BF16(_))
            | Storage::Cuda(CudaStorage {
                buf: CudaBuf::BF16(_),
                ..
            }) => DType::BF16,
        }
    }
    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(c) => Device::Cuda(c.dev.ordinal),
        }
    }
    /// The CUDA device of a CUDA tensor.
    pub fn cuda_device(&self) -> Option<&Arc<CudaDevice>> {
        match &*self.storage {
            Storage::Cpu(_) => None,
            Storage::Cuda(c) => Some(&c.dev),
        }
    }
    /// Where this tensor starts in its storage, in elements.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Whether this tensor is the only owner of all of its storage (an op may
    /// then write into it without a copy).
    pub fn is_exclusive(&mut self) -> bool {
        let n = self.numel();
        Arc::get_mut(&mut self.storage).is_some_and(|s| self.offset == 0 && s.len() == n)
    }

    fn not_on_cpu(&self, op: &'static str) -> Error {
        Error::Device {
            op,
            expected: "cpu".into(),
            got: self.device().to_string(),
        }
    }

    /// The f32 values of a CPU tensor (row-major).
    pub fn as_f32(&self) -> Result<&[f32]> {
        let (o, n) = (self.offset, self.numel());
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(&v[o..o + n]),
            Storage::Cuda(_) => Err(self.not_on_cpu("as_f32")),
            _ => Err(Error::DType {
                op: "as_f32",
                expected: "f32",
                got: self.dtype().name(),
            }),
        }
    }

    /// Mutable f32 values of a CPU tensor; copies its range into a storage of
    /// its own first when the storage is shared or larger than the tensor.
    pub fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        if self.device() != Device::Cpu {
            return Err(self.not_on_cpu("as_f32_mut"));
        }
        if self.dtype() != DType::F32 {
            return Err(Error::DType {
                op: "as_f32_mut",
                expected: "f32",
                got: self.dtype().name(),
            });
        }
        if !self.is_exclusive() {
            let Storage::Cpu(c) = &*self.storage else {
                unreachable!("checked above: a CPU tensor")
            };
            let own = c.range(self.offset, self.numel());
            self.storage = Arc::new(Storage::Cpu(own));
            self.offset = 0;
        }
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cpu(CpuStorage::F32(v))) => Ok(v),
            _ => unreachable!("an exclusive f32 CPU storage"),
        }
    }

    /// The values as an owned f32 vector (no copy when this tensor is the only
    /// owner of a whole f32 CPU storage); CUDA tensors are copied to the host.
    pub fn into_f32_vec(mut self) -> Result<Vec<f32>> {
        if self.device() != Device::Cpu {
            return self.to_host()?.into_f32_vec();
        }
        if self.dtype() == DType::F32 && self.is_exclusive() {
            if let Ok(Storage::Cpu(CpuStorage::F32(v))) = Arc::try_unwrap(self.storage) {
                return Ok(v);
            }
            unreachable!("an exclusive f32 CPU storage");
        }
        Ok(self.to_dtype(DType::F32)?.as_f32()?.to_vec())
    }

    /// Converts to `dtype` (round to nearest even for f16 / bf16). On CUDA:
    /// f32 and bf16 only.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        crate::autograd::no_backward("to_dtype", &[self])?;
        let (o, n) = (self.offset, self.numel());
        match &*self.storage {
            Storage::Cpu(s) => {
                let f32s: Vec<f32> = match s {
                    CpuStorage::F32(v) => v[o..o + n].to_vec(),
                    CpuStorage::F16(v) => v[o..o + n].iter().map(|x| x.to_f32()).collect(),
                    CpuStorage::BF16(v) => v[o..o + n].iter().map(|x| x.to_f32()).collect(),
                };
                let storage = match dtype {
                    DType::F32 => CpuStorage::F32(f32s),
                    DType::F16 => CpuStorage::F16(f32s.iter().map(|&x| f16::from_f32(x)).collect()),
                    DType::BF16 => {
                        CpuStorage::BF16(f32s.iter().map(|&x| bf16::from_f32(x)).collect())
                    }
                };
                Ok(whole(Storage::Cpu(storage), self.shape.clone()))
            }
            Storage::Cuda(c) => {
                use crate::ops::activation::cuda::{to_bf16, to_f32};
                // The conversion kernels take whole buffers: a view is made
                // compact first.
                let compact = self.compact()?;
                let Storage::Cuda(cc) = &*compact.storage else {
                    unreachable!("compact keeps the device")
                };
                match (&cc.buf, dtype) {
                    (CudaBuf::F32(s), DType::BF16) => {
                        Tensor::from_cuda_bf16(&c.dev, to_bf16(&c.dev, s)?, self.shape.clone())
                    }
                    (CudaBuf::BF16(s), DType::F32) => {
                        Tensor::from_cuda_f32(&c.dev, to_f32(&c.dev, s)?, self.shape.clone())
                    }
                    _ => Err(Error::DType {
                        op: "to_dtype (CUDA)",
                        expected: "f32 or bf16",
                        got: dtype.name(),
                    }),
                }
            }
        }
    }

    /// This tensor over a storage of its own, exactly its size (a copy only
    /// when it is a view of a larger or shared storage).
    pub(crate) fn compact(&self) -> Result<Tensor> {
        if self.offset == 0 && self.storage.len() == self.numel() {
            return Ok(self.clone());
        }
        let (o, n) = (self.offset, self.numel());
        match &*self.storage {
            Storage::Cpu(c) => Ok(whole(Storage::Cpu(c.range(o, n)), self.shape.clone())),
            Storage::Cuda(c) => {
                let buf = match &c.buf {
                    CudaBuf::F32(s) => {
                        let mut d = c.dev.alloc(n)?;
                        c.dev
                            .stream()
                            .memcpy_dtod(&s.slice(o..o + n), &mut d)
                            .map_err(driver_err("copy on device"))?;
                        CudaBuf::F32(d)
                    }
                    CudaBuf::BF16(s) => {
                        let mut d = c.dev.alloc_bf16(n)?;
                        c.dev
                            .stream()
                            .memcpy_dtod(&s.slice(o..o + n), &mut d)
                            .map_err(driver_err("copy on device"))?;
                        CudaBuf::BF16(d)
                    }
                };
                Ok(whole(
                    Storage::Cuda(CudaStorage {
                        dev: c.dev.clone(),
                        buf,
                    }),
                    self.shape.clone(),
                ))
            }
        }
    }

    /// This tensor on `device` (the same tensor when it is there already).
    /// CPU -> CUDA keeps f32 and bf16 (f16 is not a CUDA dtype here:
    /// `to_dtype` first); the device is opened once per process and shared.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        crate::autograd::no_backward("to_device", &[self])?;
        match device {
            Device::Cpu => self.to_host(),
            Device::Cuda(i) => {
                let dev = crate::cuda::shared_device(i)?;
                let host = if self.device() == Device::Cpu {
                    self.clone()
                } else {
                    self.to_host()?
                };
                host.to_cuda(&dev)
            }
        }
    }

    /// This CPU tensor copied to `dev` (f32 or bf16).
    pub fn to_cuda(&self, dev: &Arc<CudaDevice>) -> Result<Tensor> {
        let (o, n) = (self.offset, self.numel());
        let stream = dev.stream();
        let bytes = n * self.dtype().size_in_bytes();
        let buf = match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => CudaBuf::F32(
                stream
                    .clone_htod(&v[o..o + n])
                    .map_err(crate::cuda::alloc_err("copy to device", bytes))?,
            ),
            Storage::Cpu(CpuStorage::BF16(v)) => CudaBuf::BF16(
                stream
                    .clone_htod(&v[o..o + n])
                    .map_err(crate::cuda::alloc_err("copy to device", bytes))?,
            ),
            Storage::Cpu(CpuStorage::F16(_)) => {
                return Err(Error::DType {
                    op: "to_cuda",
                    expected: "f32 or bf16 (convert f16 with to_dtype first)",
                    got: "f16",
                });
            }
            Storage::Cuda(_) => return self.to_host()?.to_cuda(dev),
        };
        Ok(whole(
            Storage::Cuda(CudaStorage {
                dev: dev.clone(),
                buf,
            }),
            self.shape.clone(),
        ))
    }

    /// This tensor in host memory, same dtype (waits for the device's stream).
    pub fn to_host(&self) -> Result<Tensor> {
        let (o, n) = (self.offset, self.numel());
        match &*self.storage {
            Storage::Cpu(_) => Ok(self.clone()),
            Storage::Cuda(c) => {
                let stream = c.dev.stream();
                let cpu = match &c.buf {
                    CudaBuf::F32(s) => CpuStorage::F32(
                        stream
                            .clone_dtoh(&s.slice(o..o + n))
                            .map_err(driver_err("copy to host"))?,
                    ),
                    CudaBuf::BF16(s) => CpuStorage::BF16(
                        stream
                            .clone_dtoh(&s.slice(o..o + n))
                            .map_err(driver_err("copy to host"))?,
                    ),
                };
                Ok(whole(Storage::Cpu(cpu), self.shape.clone()))
            }
        }
    }

    /// The f32 values of a CUDA tensor, as a view of its buffer (for a
    /// kernel's launch; `op` names the caller in the error).
    pub fn cuda_f32(&self, op: &'static str) -> Result<CudaView<'_, f32>> {
        let (o, n) = (self.offset, self.numel());
        match &*self.storage {
            Storage::Cuda(CudaStorage {
                buf: CudaBuf::F32(s),
                ..
            }) => Ok(s.slice(o..o + n)),
            Storage::Cpu(_) => Err(Error::Device {
                op,
                expected: "cuda".into(),
                got: "cpu".into(),
            }),
            _ => Err(Error::DType {
                op,
                expected: "f32",
                got: self.dtype().name(),
            }),
        }
    }

    /// The device and the whole f32 buffer of a compact CUDA tensor (the
    /// launchers take whole buffers: `compact` a view first).
    pub(crate) fn cuda_whole_f32(
        &self,
        op: &'static str,
    ) -> Result<(&Arc<CudaDevice>, &CudaSlice<f32>)> {
        self.cuda_f32(op)?;
        match &*self.storage {
            Storage::Cuda(CudaStorage {
                dev,
                buf: CudaBuf::F32(s),
            }) if self.offset == 0 && s.len() == self.numel() => Ok((dev, s)),
            _ => Err(Error::input(
                op,
                "a view of a CUDA buffer: compact it first",
            )),
        }
    }

    /// The whole bf16 buffer of a compact bf16 CUDA tensor.
    pub(crate) fn cuda_whole_bf16(&self, op: &'static str) -> Result<&CudaSlice<bf16>> {
        match &*self.storage {
            Storage::Cuda(CudaStorage {
                buf: CudaBuf::BF16(s),
                ..
            }) if self.offset == 0 && s.len() == self.numel() => Ok(s),
            _ => Err(Error::input(
                op,
                format!("expected a compact bf16 CUDA tensor, got {self:?}"),
            )),
        }
    }

    /// A compact f32 CUDA tensor as a launcher input.
    pub(crate) fn gpu_ref(&self, op: &'static str) -> Result<crate::cuda::GpuRef<'_>> {
        let (_, data) = self.cuda_whole_f32(op)?;
        Ok(crate::cuda::GpuRef {
            data,
            dims: self.dims(),
        })
    }

    /// A launcher's output as a tensor on `dev`.
    pub(crate) fn from_gpu(dev: &Arc<CudaDevice>, g: crate::cuda::GpuTensor) -> Result<Tensor> {
        Tensor::from_cuda_f32(dev, g.data, g.dims)
    }

    /// Mutable f32 values of a CUDA tensor; its range is first copied into a
    /// buffer of its own (fallibly: out of memory is an error) when the
    /// storage is shared or larger than the tensor.
    pub fn cuda_f32_mut(&mut self, op: &'static str) -> Result<CudaViewMut<'_, f32>> {
        self.cuda_f32(op)?;
        if !self.is_exclusive() {
            *self = self.compact()?;
            // compact() of a whole storage shared with others is the same
            // storage: copy it then.
            if !self.is_exclusive() {
                let Storage::Cuda(c) = &*self.storage else {
                    unreachable!("checked: a CUDA tensor")
                };
                let CudaBuf::F32(s) = &c.buf else {
                    unreachable!("checked: f32")
                };
                let mut d = c.dev.alloc(s.len())?;
                c.dev
                    .stream()
                    .memcpy_dtod(s, &mut d)
                    .map_err(driver_err("copy on device"))?;
                let dev = c.dev.clone();
                *self = Tensor::from_cuda_f32(&dev, d, self.shape.clone())?;
            }
        }
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cuda(CudaStorage {
                buf: CudaBuf::F32(s),
                ..
            })) => Ok(s.slice_mut(..)),
            _ => unreachable!("an exclusive f32 CUDA storage"),
        }
    }

    /// Which values this tensor is (its storage and offset): two tensors with
    /// the same key and shape are the same values (a clone or a reshape).
    pub(crate) fn storage_key(&self) -> (usize, usize) {
        (Arc::as_ptr(&self.storage) as usize, self.offset)
    }

    /// The autograd value this tensor is, while a recording tracks it.
    pub(crate) fn var(&self) -> Option<crate::autograd::Var> {
        self.var
    }

    pub(crate) fn set_var(&mut self, var: Option<crate::autograd::Var>) {
        self.var = var;
    }

    /// A view of `shape` starting `offset` elements into this tensor (no copy).
    /// Under an autograd recording, the gradient of a view lands in its range
    /// of the whole (zeros elsewhere).
    pub fn view(&self, offset: usize, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if offset
            .checked_add(shape.numel())
            .is_none_or(|end| end > self.numel())
        {
            return Err(Error::shape(
                "view",
                format!(
                    "{:?} at offset {offset} does not fit in {:?}",
                    shape, self.shape
                ),
            ));
        }
        let mut out = Tensor {
            storage: self.storage.clone(),
            offset: self.offset + offset,
            shape,
            var: None,
        };
        if crate::autograd::requires_grad(self) {
            let whole = self.shape.clone();
            crate::autograd::record(
                "view",
                &[self],
                &mut out,
                0,
                Box::new(move |g| {
                    Ok(vec![Some(crate::ops::layout::scatter_range(
                        g, offset, whole,
                    )?)])
                }),
            );
        }
        Ok(out)
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
        let mut out = Tensor {
            storage: self.storage.clone(),
            offset: self.offset,
            shape,
            var: None,
        };
        if crate::autograd::requires_grad(self) {
            let back = self.shape.clone();
            crate::autograd::record(
                "reshape",
                &[self],
                &mut out,
                0,
                Box::new(move |g| Ok(vec![Some(g.reshape(back)?)])),
            );
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: usize) -> Tensor {
        Tensor::from_vec((0..n).map(|i| i as f32).collect(), [n]).unwrap()
    }

    #[test]
    fn views_share_storage_and_check_bounds() {
        let flat = t(10);
        let v = flat.view(3, [2, 2]).unwrap();
        assert_eq!(v.as_f32().unwrap(), &[3.0, 4.0, 5.0, 6.0]);
        assert_eq!(v.offset(), 3);
        // A view of a view counts from the inner view's start.
        let w = v.view(1, [2]).unwrap();
        assert_eq!(w.as_f32().unwrap(), &[4.0, 5.0]);
        assert_eq!(w.reshape([1, 2]).unwrap().as_f32().unwrap(), &[4.0, 5.0]);
        assert!(flat.view(8, [3]).is_err());
        assert!(v.view(1, [4]).is_err());
        assert!(flat.view(usize::MAX, [2]).is_err());
    }

    #[test]
    fn writes_copy_only_what_is_shared() {
        let flat = t(6);
        // A view is written through a copy of its range: the flat buffer keeps its values.
        let mut v = flat.view(2, [3]).unwrap();
        v.as_f32_mut().unwrap()[0] = -1.0;
        assert_eq!(v.as_f32().unwrap(), &[-1.0, 3.0, 4.0]);
        assert_eq!(v.offset(), 0);
        assert_eq!(flat.as_f32().unwrap(), &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        // The only owner of a whole storage writes in place.
        let mut own = t(3);
        let before = own.as_f32().unwrap().as_ptr();
        own.as_f32_mut().unwrap()[1] = 9.0;
        assert_eq!(own.as_f32().unwrap().as_ptr(), before);
        // A clone shares until written.
        let mut c = own.clone();
        c.as_f32_mut().unwrap()[1] = 7.0;
        assert_eq!(own.as_f32().unwrap(), &[0.0, 9.0, 2.0]);
        assert_eq!(c.as_f32().unwrap(), &[0.0, 7.0, 2.0]);
    }

    #[test]
    fn dtype_conversions_of_views() {
        let flat = Tensor::from_vec(vec![1.0, 1.0 + 1.0 / 256.0, 3.0, -0.5], [4]).unwrap();
        let v = flat.view(1, [2]).unwrap();
        let b = v.to_dtype(DType::BF16).unwrap();
        assert_eq!(b.dtype(), DType::BF16);
        // 1 + 2^-8 is halfway between two bf16 values: rounds to even (1.0).
        assert_eq!(
            b.to_dtype(DType::F32).unwrap().as_f32().unwrap(),
            &[1.0, 3.0]
        );
        assert!(b.as_f32().is_err());
        assert_eq!(b.into_f32_vec().unwrap(), vec![1.0, 3.0]);
        assert_eq!(v.into_f32_vec().unwrap(), vec![1.0 + 1.0 / 256.0, 3.0]);
        // A CPU tensor stays where it is; f16 cannot go to CUDA.
        let h = flat.to_dtype(DType::F16).unwrap();
        assert_eq!(h.to_device(Device::Cpu).unwrap().dtype(), DType::F16);
        assert!(flat.to_host().unwrap().as_f32().is_ok());
        assert!(flat.cuda_f32("test").is_err());
    }
}
