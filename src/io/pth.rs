//! PyTorch checkpoints (`torch.save`) without Python and without running any of
//! their code: the zip format (torch >= 1.6) and the legacy pre-1.6 stream, read
//! through the restricted pickle machine of `super::pickle`. Tensors of f32, f16,
//! bf16, f64, int64, bool (and the other integer storages) come back contiguous,
//! whatever their strides, storage offsets or sharing of one storage.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::rc::Rc;

use half::{bf16, f16};

use super::pickle::{Global, Machine, PickleError, Value};
use super::zip;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The most bytes a broadcast view (strides that revisit stored elements) may
/// grow to when it is materialised.
const MAX_EXPANDED_BYTES: usize = 256 << 20;

/// Element types of torch storages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawDType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl RawDType {
    fn from_tag(tag: &str) -> Option<Self> {
        Some(match tag {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::BF16,
            "f64" => Self::F64,
            "i64" => Self::I64,
            "i32" => Self::I32,
            "i16" => Self::I16,
            "i8" => Self::I8,
            "u8" => Self::U8,
            "bool" => Self::Bool,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16 | Self::F64)
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::F64 => "f64",
            Self::I64 => "i64",
            Self::I32 => "i32",
            Self::I16 => "i16",
            Self::I8 => "i8",
            Self::U8 => "u8",
            Self::Bool => "bool",
        }
    }
}

/// A contiguous tensor as stored: dtype, shape, little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    pub dtype: RawDType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    /// The values as f32 (floating dtypes only).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let d = &self.data;
        Some(match self.dtype {
            RawDType::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            RawDType::F16 => d
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            RawDType::BF16 => d
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            RawDType::F64 => d
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                .collect(),
            _ => return None,
        })
    }
    pub fn to_tensor(&self) -> Option<Tensor> {
        Tensor::from_vec(self.to_f32()?, self.shape.clone()).ok()
    }
}

/// The tensors of a checkpoint's state dict, in file order.
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub tensors: Vec<(String, RawTensor)>,
    /// Where the state dict was found: "top level", or the key ("model", "state_dict").
    pub source: String,
    /// Top-level entries that were not the state dict (an optimizer, an epoch, ...).
    pub skipped: Vec<String>,
}

#[derive(Debug)]
struct StorageInfo {
    dtype: RawDType,
    key: String,
    numel: usize,
    /// Legacy storage views: (root key, element offset into the root).
    view_of: Option<(String, usize)>,
}

fn err(msg: impl Into<String>) -> PickleError {
    PickleError::Malformed {
        pos: 0,
        msg: msg.into(),
    }
}

/// persistent_load: ('storage', <torch.XStorage>, key, location, numel[, view]).
fn storage_from_pid(pid: Value) -> std::result::Result<Value, PickleError> {
    let items = pid
        .items()
        .ok_or_else(|| err("persistent id is not a tuple"))?;
    if items.len() < 5 || items[0].as_str() != Some("storage") {
        return Err(err("persistent id is not a storage record"));
    }
    let Value::Global(Global::StorageType(tag)) = &items[1] else {
        return Err(err("storage record without a storage type"));
    };
    let dtype = RawDType::from_tag(tag).ok_or_else(|| err("unknown storage type"))?;
    let key = items[2]
        .as_str()
        .ok_or_else(|| err("storage key is not a string"))?
        .to_string();
    let numel = items[4]
        .as_int()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| err("storage size is not a count"))?;
    let mut view_of = None;
    if let Some(v) = items.get(5).and_then(Value::items) {
        // (view key, offset, size) of a legacy storage view onto root `key`.
        let off = v
            .get(1)
            .and_then(Value::as_int)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| err("storage view offset"))?;
        view_of = Some((key.clone(), off));
    }
    Ok(Value::Persistent(Rc::new(StorageInfo {
        dtype,
        key,
        numel,
        view_of,
    })))
}

/// Storage key -> its bytes.
type Storages<'a> = HashMap<String, &'a [u8]>;

fn materialize(
    t: &super::pickle::TensorRef,
    storages: &Storages,
    name: &str,
) -> std::result::Result<RawTensor, String> {
    let Value::Persistent(p) = &t.storage else {
        return Err(format!("tensor `{name}` has no storage"));
    };
    let info = p
        .downcast_ref::<StorageInfo>()
        .ok_or_else(|| format!("tensor `{name}`: bad storage"))?;
    let (root, base) = match &info.view_of {
        Some((k, off)) => (k.as_str(), *off),
        None => (info.key.as_str(), 0),
    };
    let bytes = storages.get(root).ok_or_else(|| {
        format!("tensor `{name}`: storage record `{root}` is missing from the file")
    })?;
    let es = info.dtype.size();
    let declared = info
        .numel
        .checked_mul(es)
        .ok_or_else(|| format!("tensor `{name}`: storage size overflows"))?;
    if info.view_of.is_none() && bytes.len() < declared {
        return Err(format!(
            "tensor `{name}`: storage `{root}` holds {} bytes but declares {} elements of {} bytes",
            bytes.len(),
            info.numel,
            es
        ));
    }
    let avail = bytes.len() / es;
    let numel = t
        .size
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("tensor `{name}`: size {:?} overflows", t.size))?;
    let start = base
        .checked_add(t.offset)
        .ok_or_else(|| format!("tensor `{name}`: offset overflows"))?;
    if numel > 0 {
        let mut last = start;
        for (&d, &s) in t.size.iter().zip(&t.stride) {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| last.checked_add(x))
                .ok_or_else(|| format!("tensor `{name}`: strides overflow"))?;
        }
        if last >= avail {
            return Err(format!(
                "tensor `{name}` (size {:?}, stride {:?}, offset {}) reaches element {last} of a storage of {avail} elements",
                t.size, t.stride, t.offset
            ));
        }
    }
    let size_bytes = numel
        .checked_mul(es)
        .ok_or_else(|| format!("tensor `{name}`: size {:?} overflows", t.size))?;
    // A view can only need more bytes than its storage holds when strides
    // overlap (an expanded, broadcast tensor): a few bytes in the file could
    // ask for terabytes here. Checkpoints hold no such tensor of any size.
    if size_bytes > bytes.len() && size_bytes > MAX_EXPANDED_BYTES {
        return Err(format!(
            "tensor `{name}` (size {:?}, stride {:?}) repeats {} stored bytes into {size_bytes}; \
             refusing to materialise a broadcast view larger than {} MiB",
            t.size,
            t.stride,
            bytes.len(),
            MAX_EXPANDED_BYTES >> 20
        ));
    }
    let mut data = Vec::new();
    data.try_reserve_exact(size_bytes)
        .map_err(|_| format!("tensor `{name}`: {size_bytes} bytes do not fit in memory"))?;
    let contiguous = t
        .size
        .iter()
        .zip(&t.stride)
        .rev()
        .try_fold(1usize, |expect, (&d, &s)| {
            (d <= 1 || s == expect).then_some(expect * d)
        })
        .is_some();
    if contiguous {
        data.extend_from_slice(&bytes[start * es..(start + numel) * es]);
    } else if numel > 0 {
        let rank = t.size.len();
        let mut idx = vec![0usize; rank];
        for _ in 0..numel {
            let off = start + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            data.extend_from_slice(&bytes[off * es..(off + 1) * es]);
            for d in (0..rank).rev() {
                idx[d] += 1;
                if idx[d] < t.size[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }
    Ok(RawTensor {
        dtype: info.dtype,
        shape: t.size.clone(),
        data,
    })
}

fn dict_items(v: &Value) -> Option<Vec<(Value, Value)>> {
    match v {
        Value::Dict(d) => Some(d.borrow().items.clone()),
        _ => None,
    }
}

/// Finds the state dict: a `model` / `state_dict` / `module` entry holding tensors,
/// or the top level itself.
fn state_dict(root: &Value, storages: &Storages) -> std::result::Result<Checkpoint, String> {
    let top = dict_items(root).ok_or_else(|| {
        format!(
            "the checkpoint holds a {}, not a dict of tensors",
            root.kind()
        )
    })?;
    let has_tensors =
        |items: &[(Value, Value)]| items.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
    let (source, items, skipped) = if has_tensors(&top) {
        ("top level".to_string(), top, vec![])
    } else if let Some((k, v)) = ["model", "state_dict", "module"]
        .iter()
        .find_map(|k| top.iter().find(|(ek, _)| ek.as_str() == Some(k)).cloned())
    {
        let inner = dict_items(&v)
            .filter(|i| has_tensors(i))
            .ok_or_else(|| format!("entry `{}` holds no tensors", k.as_str().unwrap_or("?")))?;
        let skipped = top
            .iter()
            .filter(|(ek, _)| ek.as_str() != k.as_str())
            .map(|(ek, ev)| match ev {
                Value::Object(cls) => format!("{} ({cls})", ek.as_str().unwrap_or("?")),
                _ => format!("{} ({})", ek.as_str().unwrap_or("?"), ev.kind()),
            })
            .collect();
        (k.as_str().unwrap_or("?").to_string(), inner, skipped)
    } else {
        let keys: Vec<&str> = top.iter().filter_map(|(k, _)| k.as_str()).take(8).collect();
        return Err(format!("no tensors found: top-level keys {keys:?}"));
    };
    let mut out = Checkpoint {
        source,
        skipped,
        ..Default::default()
    };
    for (k, v) in items {
        let name = k
            .as_str()
            .ok_or("a state dict key is not a string")?
            .to_string();
        match v {
            Value::Tensor(t) => out
                .tensors
                .push((name.clone(), materialize(&t, storages, &name)?)),
            other => out.skipped.push(format!("{name} ({})", other.kind())),
        }
    }
    Ok(out)
}

fn read_zip(b: &[u8]) -> std::result::Result<Checkpoint, String> {
    let idx = zip::index(b)?;
    let pkl = idx
        .entries
        .keys()
        .find(|k| k.ends_with("data.pkl") && k.matches('/').count() == 1)
        .ok_or("not a PyTorch archive: no <name>/data.pkl record")?
        .clone();
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    if let Some(r) = idx.entries.get(&format!("{prefix}byteorder"))
        && &b[r.clone()] != b"little"
    {
        return Err("big-endian checkpoints are not supported".into());
    }
    let mut storages: Storages = HashMap::new();
    let data_prefix = format!("{prefix}data/");
    for (name, r) in &idx.entries {
        if let Some(key) = name.strip_prefix(&data_prefix) {
            storages.insert(key.to_string(), &b[r.clone()]);
        }
    }
    let mut m = Machine::new(&b[idx.entries[&pkl].clone()], storage_from_pid);
    let root = m.run().map_err(|e| e.to_string())?;
    state_dict(&root, &storages)
}

/// The legacy stream: magic, protocol version, sys info, the object, the storage
/// keys, then each storage as (u64 element count, raw data).
fn read_legacy(b: &[u8]) -> std::result::Result<Checkpoint, String> {
    const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    let mut pos = 0usize;
    let next = |pos: &mut usize, persistent: bool| -> std::result::Result<Value, String> {
        let mut m = Machine::new(&b[*pos..], |pid| {
            if persistent {
                storage_from_pid(pid)
            } else {
                Err(err("unexpected persistent id"))
            }
        });
        let v = m.run().map_err(|e| e.to_string())?;
        *pos += m.position();
        Ok(v)
    };
    match next(&mut pos, false)? {
        Value::BigInt(bytes) if bytes.as_slice() == MAGIC => {}
        _ => return Err("not a PyTorch checkpoint (wrong magic number)".into()),
    }
    if next(&mut pos, false)?.as_int() != Some(1001) {
        return Err("unsupported legacy protocol version".into());
    }
    let sys = next(&mut pos, false)?;
    if let Some(items) = dict_items(&sys)
        && items
            .iter()
            .any(|(k, v)| k.as_str() == Some("little_endian") && matches!(v, Value::Bool(false)))
    {
        return Err("big-endian checkpoints are not supported".into());
    }
    let root = next(&mut pos, true)?;
    let keys = next(&mut pos, false)?
        .items()
        .ok_or("legacy storage key list missing")?;
    // Element sizes of the storages, from the object's storage records.
    let mut sizes: HashMap<String, usize> = HashMap::new();
    collect_storage_sizes(&root, &mut sizes, &mut 0)?;
    let mut storages: Storages = HashMap::new();
    for k in keys {
        let key = k
            .as_str()
            .ok_or("legacy storage key is not a string")?
            .to_string();
        let n = b
            .get(pos..pos + 8)
            .ok_or_else(|| format!("truncated file: storage `{key}` missing"))?;
        let numel = u64::from_le_bytes(n.try_into().expect("8 bytes"));
        pos += 8;
        let es = *sizes
            .get(&key)
            .ok_or_else(|| format!("storage `{key}` is not used by any tensor"))?;
        let len = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(es))
            .ok_or("storage size overflows")?;
        let r: Range<usize> = pos..pos
            .checked_add(len)
            .filter(|&e| e <= b.len())
            .ok_or_else(|| format!("truncated file: storage `{key}` needs {len} bytes"))?;
        storages.insert(key, &b[r]);
        pos += len;
    }
    state_dict(&root, &storages)
}

/// Walks the object (bounded) for storage records: key -> element size.
fn collect_storage_sizes(
    v: &Value,
    out: &mut HashMap<String, usize>,
    budget: &mut usize,
) -> std::result::Result<(), String> {
    *budget += 1;
    if *budget > 10_000_000 {
        return Err("checkpoint object too large to walk".into());
    }
    match v {
        Value::Tensor(t) => {
            if let Value::Persistent(p) = &t.storage
                && let Some(info) = p.downcast_ref::<StorageInfo>()
            {
                let key = info.view_of.as_ref().map_or(&info.key, |(k, _)| k).clone();
                out.insert(key, info.dtype.size());
            }
        }
        Value::Dict(d) => {
            for (k, v) in d.borrow().items.iter() {
                collect_storage_sizes(k, out, budget)?;
                collect_storage_sizes(v, out, budget)?;
            }
        }
        Value::Tuple(_) | Value::List(_) => {
            for it in v.items().unwrap_or_default() {
                collect_storage_sizes(&it, out, budget)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Reads a checkpoint from its bytes (zip or legacy).
pub fn read_pth_bytes(b: &[u8]) -> std::result::Result<Checkpoint, String> {
    if zip::is_zip(b) {
        read_zip(b)
    } else if b.first() == Some(&0x80) {
        read_legacy(b)
    } else {
        Err("not a PyTorch checkpoint (neither a zip archive nor a pickle)".into())
    }
}

/// Reads a `.pth` file through a memory map.
pub fn read_pth(path: impl AsRef<Path>) -> Result<Checkpoint> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: a read-only map, used only during this call; the tensors are copied out.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_pth_bytes(&mmap).map_err(|msg| Error::WeightsFile {
        path: path.to_path_buf(),
        msg,
    })
}

pub fn is_pth(b: &[u8]) -> bool {
    zip::is_zip(b) || b.first() == Some(&0x80)
}

/// The tensors of a `.pth` checkpoint or a `.safetensors` file, dtypes kept.
pub fn read_tensors(path: impl AsRef<Path>) -> Result<Checkpoint> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: a read-only map, used only during this call; the tensors are copied out.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let fail = |msg: String| Error::WeightsFile {
        path: path.to_path_buf(),
        msg,
    };
    if is_pth(&mmap) {
        return read_pth_bytes(&mmap).map_err(fail);
    }
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
        fail(format!(
            "neither a PyTorch checkpoint nor a safetensors file: {e}"
        ))
    })?;
    let mut ck = Checkpoint {
        source: "safetensors".into(),
        ..Default::default()
    };
    for (name, v) in st.iter() {
        use safetensors::Dtype as D;
        let dtype = match v.dtype() {
            D::F32 => RawDType::F32,
            D::F16 => RawDType::F16,
            D::BF16 => RawDType::BF16,
            D::F64 => RawDType::F64,
            D::I64 => RawDType::I64,
            D::I32 => RawDType::I32,
            D::I16 => RawDType::I16,
            D::I8 => RawDType::I8,
            D::U8 => RawDType::U8,
            D::BOOL => RawDType::Bool,
            other => {
                return Err(fail(format!(
                    "tensor `{name}`: unsupported dtype {other:?}"
                )));
            }
        };
        ck.tensors.push((
            name.to_string(),
            RawTensor {
                dtype,
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            },
        ));
    }
    Ok(ck)
}

/// (name, dtype, shape, bytes) records of tensors as they are, for
/// `weights::write_safetensors`.
pub fn safetensors_records(
    tensors: &[(String, RawTensor)],
) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    tensors
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.dtype.safetensors(),
                t.shape.clone(),
                t.data.clone(),
            )
        })
        .collect()
}

impl RawDType {
    pub fn safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as D;
        match self {
            Self::F32 => D::F32,
            Self::F16 => D::F16,
            Self::BF16 => D::BF16,
            Self::F64 => D::F64,
            Self::I64 => D::I64,
            Self::I32 => D::I32,
            Self::I16 => D::I16,
            Self::I8 => D::I8,
            Self::U8 => D::U8,
            Self::Bool => D::BOOL,
        }
    }
}
