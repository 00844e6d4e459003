//! Writes a PyTorch checkpoint, `{'model': state_dict}`, in the zip format
//! `torch.save` has used since 1.6, readable by `torch.load(path,
//! weights_only=True)`: `archive/data.pkl` (pickle protocol 2 that only
//! names what the weights-only unpickler allows: `collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2` and the typed storages), one
//! uncompressed `archive/data/<k>` entry per tensor (64-byte aligned, as
//! torch writes them), `archive/version` and `archive/byteorder`. Files over
//! 4 GiB (zip64) are refused.

use std::path::Path;

use super::pth::{RawDType, RawTensor};
use crate::error::{Error, Result};

/// The storage class torch names for a dtype.
fn storage(d: RawDType) -> &'static str {
    match d {
        RawDType::F32 => "FloatStorage",
        RawDType::F16 => "HalfStorage",
        RawDType::BF16 => "BFloat16Storage",
        RawDType::F64 => "DoubleStorage",
        RawDType::I64 => "LongStorage",
        RawDType::I32 => "IntStorage",
        RawDType::I16 => "ShortStorage",
        RawDType::I8 => "CharStorage",
        RawDType::U8 => "ByteStorage",
        RawDType::Bool => "BoolStorage",
    }
}

/// A pickle protocol 2 stream, built opcode by opcode.
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, b: u8) {
        self.0.push(b);
    }
    fn global(&mut self, module: &str, name: &str) {
        self.op(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn str(&mut self, s: &str) {
        self.op(b'X'); // BINUNICODE
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: usize) -> Result<()> {
        if v < 256 {
            self.op(b'K'); // BININT1
            self.op(v as u8);
        } else if v <= i32::MAX as usize {
            self.op(b'J'); // BININT
            self.0.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement, 8 bytes are enough.
            self.op(0x8a);
            self.op(8);
            self.0.extend_from_slice(&(v as u64).to_le_bytes());
        }
        Ok(())
    }
    fn tuple(&mut self, vals: &[usize]) -> Result<()> {
        self.op(b'('); // MARK
        for &v in vals {
            self.int(v)?;
        }
        self.op(b't'); // TUPLE
        Ok(())
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')'); // EMPTY_TUPLE
        self.op(b'R'); // REDUCE
    }
}

/// The bytes of `{'model': OrderedDict(tensors)}` as a torch zip archive.
pub fn pth_bytes(tensors: &[(String, RawTensor)]) -> Result<Vec<u8>> {
    let mut p = Pickle(vec![0x80, 2]); // PROTO 2
    p.op(b'}'); // EMPTY_DICT
    p.str("model");
    p.ordered_dict();
    p.op(b'(');
    for (k, (name, t)) in tensors.iter().enumerate() {
        let numel: usize = t.shape.iter().product();
        if t.data.len() != numel * t.dtype.size() {
            return Err(Error::input(
                "pth writer",
                format!(
                    "{name}: {} bytes for {:?} of {}",
                    t.data.len(),
                    t.shape,
                    t.dtype.name()
                ),
            ));
        }
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(b'(');
        // The storage, by persistent id: ('storage', class, key, location, numel).
        p.op(b'(');
        p.str("storage");
        p.global("torch", storage(t.dtype));
        p.str(&k.to_string());
        p.str("cpu");
        p.int(numel)?;
        p.op(b't');
        p.op(b'Q'); // BINPERSID
        p.int(0)?; // storage offset
        p.tuple(&t.shape)?;
        let mut stride = vec![1usize; t.shape.len()];
        for i in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * t.shape[i + 1];
        }
        p.tuple(&stride)?;
        p.op(0x89); // NEWFALSE: requires_grad
        p.ordered_dict(); // backward hooks
        p.op(b't');
        p.op(b'R');
    }
    p.op(b'u'); // SETITEMS into the OrderedDict
    p.op(b's'); // SETITEM 'model' into the dict
    p.op(b'.'); // STOP
    let mut z = ZipWriter::default();
    z.add("archive/data.pkl", &p.0)?;
    z.add("archive/byteorder", b"little")?;
    for (k, (_, t)) in tensors.iter().enumerate() {
        z.add(&format!("archive/data/{k}"), &t.data)?;
    }
    z.add("archive/version", b"3\n")?;
    z.finish()
}

/// Writes `{'model': state_dict}` to `path` atomically (a temporary file
/// beside it, synced, renamed).
pub fn write_pth(path: &Path, tensors: &[(String, RawTensor)]) -> Result<()> {
    super::write_atomic(path, &pth_bytes(tensors)?)
}

/// CRC-32 (IEEE, reflected), as zip stores it.
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Stored (uncompressed) entries, each one's data 64-byte aligned by
/// padding its local header's extra field.
#[derive(Default)]
struct ZipWriter {
    out: Vec<u8>,
    /// (name, crc, size, local header offset)
    entries: Vec<(String, u32, u32, u32)>,
}

impl ZipWriter {
    fn add(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let too_big = || {
            Error::input(
                "pth writer",
                "the checkpoint would pass 4 GiB (zip64 is not written)",
            )
        };
        let offset = u32::try_from(self.out.len()).map_err(|_| too_big())?;
        let size = u32::try_from(data.len()).map_err(|_| too_big())?;
        let crc = crc32(data);
        let header = 30 + name.len();
        let pad = (64 - (self.out.len() + header + 4) % 64) % 64 + 4;
        let o = &mut self.out;
        o.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        o.extend_from_slice(&[20, 0, 0, 0, 0, 0]); // version, flags, method 0
        o.extend_from_slice(&[0, 0, 0x21, 0]); // time, date (1980-01-01)
        o.extend_from_slice(&crc.to_le_bytes());
        o.extend_from_slice(&size.to_le_bytes());
        o.extend_from_slice(&size.to_le_bytes());
        o.extend_from_slice(&(name.len() as u16).to_le_bytes());
        o.extend_from_slice(&(pad as u16).to_le_bytes());
        o.extend_from_slice(name.as_bytes());
        // The padding as one unknown extra block (id 0xCAFE, as torch's).
        o.extend_from_slice(&0xCAFEu16.to_le_bytes());
        o.extend_from_slice(&((pad - 4) as u16).to_le_bytes());
        o.extend(std::iter::repeat_n(b'Z', pad - 4));
        o.extend_from_slice(data);
        u32::try_from(o.len()).map_err(|_| too_big())?;
        self.entries.push((name.to_string(), crc, size, offset));
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<u8>> {
        let cd_start = self.out.len();
        let o = &mut self.out;
        for (name, crc, size, offset) in &self.entries {
            o.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            o.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0]); // made by, needed, flags, method
            o.extend_from_slice(&[0, 0, 0x21, 0]);
            o.extend_from_slice(&crc.to_le_bytes());
            o.extend_from_slice(&size.to_le_bytes());
            o.extend_from_slice(&size.to_le_bytes());
            o.extend_from_slice(&(name.len() as u16).to_le_bytes());
            o.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attributes
            o.extend_from_slice(&[0; 4]); // external attributes
            o.extend_from_slice(&offset.to_le_bytes());
            o.extend_from_slice(name.as_bytes());
        }
        let cd_size = o.len() - cd_start;
        let n = self.entries.len() as u16;
        o.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        o.extend_from_slice(&[0, 0, 0, 0]);
        o.extend_from_slice(&n.to_le_bytes());
        o.extend_from_slice(&n.to_le_bytes());
        o.extend_from_slice(&(cd_size as u32).to_le_bytes());
        o.extend_from_slice(&(cd_start as u32).to_le_bytes());
        o.extend_from_slice(&[0, 0]);
        if self.entries.len() > u16::MAX as usize {
            return Err(Error::input("pth writer", "more than 65,535 tensors"));
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    /// What we write, our reader reads back: names, dtypes, shapes, bytes,
    /// and the trainer-checkpoint source `model`.
    #[test]
    fn round_trip_through_our_reader() {
        let t = |d: RawDType, shape: Vec<usize>, data: Vec<u8>| RawTensor {
            dtype: d,
            shape,
            data,
        };
        let tensors = vec![
            (
                "a.weight".to_string(),
                t(RawDType::F32, vec![2, 3], (0..24).collect()),
            ),
            (
                "a.num_batches_tracked".to_string(),
                t(RawDType::I64, vec![], 7i64.to_le_bytes().to_vec()),
            ),
            ("b".to_string(), t(RawDType::F16, vec![300], vec![1; 600])),
        ];
        let bytes = pth_bytes(&tensors).unwrap();
        let ck = crate::io::pth::read_pth_bytes(&bytes).unwrap();
        assert_eq!(ck.source, "model");
        assert_eq!(ck.tensors.len(), 3);
        for ((n1, t1), (n2, t2)) in tensors.iter().zip(&ck.tensors) {
            assert_eq!(n1, n2);
            assert_eq!(t1, t2);
        }
    }
}
