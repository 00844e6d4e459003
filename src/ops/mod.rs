//! Op families. Each folder holds the public functions (shape checks, device
//! dispatch) in `mod.rs`, the CPU implementation in `cpu.rs` and the CUDA
//! launchers in `cuda.rs`; the backward rules sit beside them as they land.
//!
//! Dispatch: a public op takes `&Tensor`s, checks shapes once, and runs on the
//! device its inputs are on (all on one device, else `Error::Device`). Ops
//! whose CUDA path is not wired to `Tensor` yet refuse CUDA tensors with
//! `Error::Device` (through `cpu_f32`); they are reached on the GPU through the
//! CUDA model tree (src/cuda) until the one-model-tree change folds it in.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod layout;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod prompt;
pub mod reduce;
pub mod resize;

use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

/// The device all `ts` are on; tensors on different devices are an error
/// naming the op and both devices (never a silent copy).
pub(crate) fn same_device(op: &'static str, ts: &[&Tensor]) -> Result<Device> {
    let d = ts.first().map_or(Device::Cpu, |t| t.device());
    if let Some(t) = ts.iter().find(|t| t.device() != d) {
        return Err(Error::Device {
            op,
            expected: d.to_string(),
            got: t.device().to_string(),
        });
    }
    Ok(d)
}

/// A CUDA f32 input as the launchers take it: a whole buffer of its own (a
/// view is copied into one first).
pub(crate) fn cuda_input(op: &'static str, t: &Tensor) -> Result<Tensor> {
    if t.dtype() != crate::tensor::DType::F32 {
        return Err(Error::DType {
            op,
            expected: "f32",
            got: t.dtype().name(),
        });
    }
    t.compact()
}

/// The f32 values of a CPU tensor; a tensor on any other device gets a typed
/// error naming the op, never a silent copy.
pub(crate) fn cpu_f32<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a [f32]> {
    if t.device() != Device::Cpu {
        return Err(Error::Device {
            op,
            expected: "cpu".into(),
            got: t.device().to_string(),
        });
    }
    t.as_f32().map_err(|_| Error::DType {
        op,
        expected: "f32",
        got: t.dtype().name(),
    })
}

/// Backward passes run on the CPU so far: a CUDA tensor reaching one is a
/// typed error naming the op (the CUDA backward kernels come later).
pub(crate) fn backward_on_cpu(op: &'static str, ts: &[&Tensor]) -> Result<()> {
    if ts.iter().any(|t| t.device() != Device::Cpu) {
        return Err(Error::NoBackward { op });
    }
    Ok(())
}
