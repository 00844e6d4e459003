//! Op families. Each folder holds the public functions (shape checks, device
//! dispatch) in `mod.rs` and the CPU implementation in `cpu.rs`; the CUDA twin
//! and the backward rules sit beside them as they land.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod layout;
pub mod linear;
pub mod norm;
pub mod prompt;
pub mod resize;

use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

/// Every op of this module currently computes on CPU f32 tensors; a tensor on any
/// other device gets a typed error naming the op, never a silent copy.
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
