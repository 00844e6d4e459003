//! Named weight tensors, read from safetensors (memory-mapped) and stored as f32
//! for computing. f16 / bf16 / f32 on disk; integer tensors (BatchNorm's
//! `num_batches_tracked`) are kept aside, since inference does not use them.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(Clone, Default, Debug)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
    /// Non-floating tensors that were present: shapes and dtype names.
    others: BTreeMap<String, (Vec<usize>, String)>,
}

impl Weights {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads a `.safetensors` file through a memory map.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only and lives only for this call; a file changed
        // underneath by another process could give wrong values but not UB in safe
        // code that copies the bytes out immediately.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if crate::io::pth::is_pth(&mmap) {
            // A PyTorch checkpoint: its state dict (a trainer checkpoint's `model`).
            let ck = crate::io::pth::read_pth_bytes(&mmap).map_err(|msg| Error::WeightsFile {
                path: path.to_path_buf(),
                msg,
            })?;
            return Ok(Self::from_checkpoint(&ck));
        }
        Self::from_safetensors_bytes(&mmap).map_err(|msg| Error::WeightsFile {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Parses safetensors bytes; the error is a message for the caller to wrap.
    pub fn from_safetensors_bytes(bytes: &[u8]) -> std::result::Result<Self, String> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| format!("not a valid safetensors file: {e}"))?;
        let mut w = Weights::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::F64 => data
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    .collect(),
                other => {
                    w.others.insert(name, (shape, format!("{other:?}")));
                    continue;
                }
            };
            let t = Tensor::from_vec(values, shape).map_err(|e| format!("tensor `{name}`: {e}"))?;
            w.tensors.insert(name, t);
        }
        Ok(w)
    }

    /// The floating tensors of a PyTorch checkpoint as f32; the others kept aside.
    pub fn from_checkpoint(ck: &crate::io::pth::Checkpoint) -> Self {
        let mut w = Weights::new();
        for (name, t) in &ck.tensors {
            match t.to_tensor() {
                Some(x) => w.insert(name.clone(), x),
                None => {
                    w.others
                        .insert(name.clone(), (t.shape.clone(), t.dtype.name().to_string()));
                }
            }
        }
        w
    }

    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The tensor `name`, or a typed error naming it.
    pub fn req(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| self.missing(name, vec![]))
    }

    /// The error for a float tensor `name` that `get` did not find: present
    /// with another dtype (an integer one, say), or not present at all.
    /// `expected`: the shape the model wants, empty where unknown.
    pub fn missing(&self, name: &str, expected: Vec<usize>) -> Error {
        match self.others.get(name) {
            Some((_, dtype)) => Error::TensorDType {
                name: name.to_string(),
                dtype: dtype.clone(),
            },
            None => Error::MissingTensor {
                name: name.to_string(),
                expected,
            },
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn non_float(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.others
            .iter()
            .map(|(k, v)| (k.as_str(), v.0.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Writes every tensor as f32 safetensors, atomically (temporary file, rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut out = Vec::with_capacity(self.tensors.len());
        for (k, t) in &self.tensors {
            out.push((
                k.clone(),
                Dtype::F32,
                t.dims().to_vec(),
                bytemuck::cast_slice::<f32, u8>(t.as_f32()?).to_vec(),
            ));
        }
        write_safetensors(path.as_ref(), &out)
    }
}

/// Writes (name, dtype, shape, little-endian bytes) records as a safetensors file,
/// atomically: a temporary file beside the target, then a rename, so a failure
/// leaves no partial file behind.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
) -> Result<()> {
    let fail = |msg: String| Error::WeightsFile {
        path: path.to_path_buf(),
        msg,
    };
    let views = tensors
        .iter()
        .map(|(k, dt, s, b)| {
            safetensors::tensor::TensorView::new(*dt, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| fail(format!("tensor `{k}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, None).map_err(|e| fail(e.to_string()))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, data).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}
