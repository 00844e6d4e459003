//! Typed errors. Every error a user can provoke (bad weights, bad shapes, bad
//! images, bad boxes, missing GPU) lands here; the library never panics on input.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An op got tensors whose shapes do not fit together.
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },

    /// An op got a tensor of a dtype it cannot compute on.
    #[error("{op}: expected dtype {expected}, got {got}")]
    DType {
        op: &'static str,
        expected: &'static str,
        got: &'static str,
    },

    /// An op got a tensor on a device it does not run on.
    #[error("{op}: tensor is on {got}, expected {expected}")]
    Device {
        op: &'static str,
        expected: String,
        got: String,
    },

    #[error("weights: missing tensor `{name}`{}", expected_shape(.expected))]
    MissingTensor { name: String, expected: Vec<usize> },

    #[error("weights: unexpected tensor `{name}` with shape {shape:?}")]
    UnexpectedTensor { name: String, shape: Vec<usize> },

    #[error("weights: tensor `{name}` has shape {got:?}, the model expects {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("weights: tensor `{name}` has dtype {dtype}, expected f32, f16 or bf16")]
    TensorDType { name: String, dtype: String },

    /// NaN or infinite values in weights (a diverged run's checkpoint, a
    /// corrupt file): the model would run and draw empty masks.
    #[error(
        "weights: tensor `{name}` holds {count} NaN or infinite values (the first at element {first})"
    )]
    NonFiniteWeights {
        name: String,
        count: usize,
        first: usize,
    },

    /// The weights file cannot be read as safetensors (corrupt, truncated, ...).
    #[error("weights file {path}: {msg}")]
    WeightsFile { path: PathBuf, msg: String },

    /// The weights do not describe a SAM-UNet we can build.
    #[error("configuration: {0}")]
    Config(String),

    #[error("box {index} {bbox:?}: {reason}")]
    InvalidBox {
        index: usize,
        bbox: [f32; 4],
        reason: String,
    },

    #[error("image: {0}")]
    Image(String),

    #[error("mask {path}: {msg}")]
    Mask { path: PathBuf, msg: String },

    #[error("{op}: {msg}")]
    InvalidInput { op: &'static str, msg: String },

    /// The OS error is the `source()` (anyhow's `{:#}` and the tools print
    /// it after the path), not repeated in this message.
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// No CUDA device to run on: no driver, no GPU (or not the ordinal asked
    /// for), or the kernels were not built. Run on the CPU instead.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),

    /// The GPU has not enough free memory for an allocation (`bytes`: what was
    /// asked for, when known). Smaller batches, or bf16, need less.
    #[error("{op}: CUDA out of memory{}", match .bytes { Some(b) => format!(" (asked for {b} bytes)"), None => String::new() })]
    CudaOutOfMemory {
        op: &'static str,
        bytes: Option<usize>,
    },

    /// A kernel could not be launched or failed while running (an illegal
    /// address, too many resources, a timeout): a bug of this crate, or a
    /// broken device; the device's state is lost.
    #[error("{op}: CUDA kernel launch failed: {msg}")]
    CudaLaunch { op: &'static str, msg: String },

    /// cuBLAS refused or failed a call (its `cublasStatus_t`).
    #[error("{op}: cuBLAS status {status} ({name})")]
    Cublas {
        op: &'static str,
        status: i32,
        name: &'static str,
    },

    /// An op without a backward got an input that needs a gradient (under an
    /// autograd recording): training through it is not supported (yet).
    #[error("{op}: no backward for an input that needs a gradient")]
    NoBackward { op: &'static str },

    /// Training met a NaN or an infinite value (the loss, the gradients):
    /// the step made no update; the run should stop and go back to its last
    /// good checkpoint (a lower learning rate, or the data, are the usual
    /// causes).
    #[error("{op}: not finite: {msg}")]
    NonFinite { op: &'static str, msg: String },

    /// A collective operation between ranks failed: a rank left or did not
    /// arrive in time, or the ranks disagree (buffer sizes). The run stops
    /// on every rank.
    #[error("{op}: {msg}")]
    Collective { op: &'static str, msg: String },

    /// Any other failure of a CUDA driver call.
    #[error("{op}: CUDA driver error: {msg}")]
    CudaDriver { op: &'static str, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The message with its causes (`source()` chain), e.g. "I/O error on
    /// x.png: No such file or directory (os error 2)": for reports that keep
    /// errors as text.
    pub fn full(&self) -> String {
        let mut s = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }

    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
    pub(crate) fn input(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidInput {
            op,
            msg: msg.into(),
        }
    }
}

/// " (the model expects shape [..])", or nothing where the shape is not known.
fn expected_shape(expected: &[usize]) -> String {
    if expected.is_empty() {
        String::new()
    } else {
        format!(" (the model expects shape {expected:?})")
    }
}
