//! The part of the zip format PyTorch archives use: stored (uncompressed)
//! records found through the central directory, zip64 included. Every offset and
//! size is checked against the file, so a truncated or forged archive is an
//! error, never an out-of-bounds read.

use std::collections::HashMap;
use std::ops::Range;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Record name -> byte range of its data in the archive.
pub struct ZipIndex {
    pub entries: HashMap<String, Range<usize>>,
}

pub fn is_zip(b: &[u8]) -> bool {
    b.starts_with(b"PK\x03\x04")
}

pub fn index(b: &[u8]) -> Result<ZipIndex, String> {
    // End of central directory: 22 bytes plus a comment of up to 64 KiB.
    let min = b.len().saturating_sub(22 + 65_535);
    let eocd = (min..=b.len().saturating_sub(22))
        .rev()
        .find(|&i| u32_at(b, i) == Some(0x0605_4b50))
        .ok_or("truncated archive: no end-of-central-directory record")?;
    let mut count = u16_at(b, eocd + 10).ok_or("truncated archive")? as u64;
    let mut cd_size = u32_at(b, eocd + 12).ok_or("truncated archive")? as u64;
    let mut cd_off = u32_at(b, eocd + 16).ok_or("truncated archive")? as u64;
    if count == 0xffff || cd_size == 0xffff_ffff || cd_off == 0xffff_ffff {
        // zip64: a locator just before the EOCD points at the zip64 EOCD.
        let loc = eocd.checked_sub(20).ok_or("truncated zip64 archive")?;
        if u32_at(b, loc) != Some(0x0706_4b50) {
            return Err("zip64 locator missing".into());
        }
        let z = usize::try_from(u64_at(b, loc + 8).ok_or("truncated zip64 archive")?)
            .map_err(|_| "zip64 offset too large")?;
        if u32_at(b, z) != Some(0x0606_4b50) {
            return Err("zip64 end-of-central-directory record missing".into());
        }
        count = u64_at(b, z + 32).ok_or("truncated zip64 archive")?;
        cd_size = u64_at(b, z + 40).ok_or("truncated zip64 archive")?;
        cd_off = u64_at(b, z + 48).ok_or("truncated zip64 archive")?;
    }
    let cd_end = cd_off
        .checked_add(cd_size)
        .filter(|&e| e <= b.len() as u64)
        .ok_or("truncated archive: central directory outside the file")?;
    let (mut p, cd_end) = (cd_off as usize, cd_end as usize);
    let mut entries = HashMap::new();
    for _ in 0..count {
        if p + 46 > cd_end || u32_at(b, p) != Some(0x0201_4b50) {
            return Err("corrupt central directory".into());
        }
        let method = u16_at(b, p + 10).ok_or("corrupt central directory")?;
        let mut csize = u32_at(b, p + 20).ok_or("corrupt central directory")? as u64;
        let mut usize_ = u32_at(b, p + 24).ok_or("corrupt central directory")? as u64;
        let nlen = u16_at(b, p + 28).ok_or("corrupt central directory")? as usize;
        let xlen = u16_at(b, p + 30).ok_or("corrupt central directory")? as usize;
        let clen = u16_at(b, p + 32).ok_or("corrupt central directory")? as usize;
        let mut local = u32_at(b, p + 42).ok_or("corrupt central directory")? as u64;
        let name = b
            .get(p + 46..p + 46 + nlen)
            .ok_or("corrupt central directory")?;
        let name = String::from_utf8_lossy(name).into_owned();
        // zip64 extra field: the 0xffffffff fields in order (usize, csize, offset).
        let extra = b
            .get(p + 46 + nlen..p + 46 + nlen + xlen)
            .ok_or("corrupt central directory")?;
        let mut e = 0;
        while e + 4 <= extra.len() {
            let (id, len) = (
                u16_at(extra, e).unwrap_or(0),
                u16_at(extra, e + 2).unwrap_or(0) as usize,
            );
            if id == 0x0001 {
                let mut q = e + 4;
                for field in [&mut usize_, &mut csize, &mut local] {
                    if *field == 0xffff_ffff {
                        *field = u64_at(extra, q).ok_or("corrupt zip64 extra field")?;
                        q += 8;
                    }
                }
            }
            e += 4 + len;
        }
        if method != 0 {
            return Err(format!(
                "record `{name}` is compressed (method {method}); PyTorch archives store records uncompressed"
            ));
        }
        if csize != usize_ {
            return Err(format!(
                "record `{name}`: stored size {csize} differs from its size {usize_}"
            ));
        }
        let l = usize::try_from(local).map_err(|_| "offset too large")?;
        if u32_at(b, l) != Some(0x0403_4b50) {
            return Err(format!(
                "record `{name}`: local header missing (truncated or corrupt archive)"
            ));
        }
        let data = l
            + 30
            + u16_at(b, l + 26).ok_or("truncated archive")? as usize
            + u16_at(b, l + 28).ok_or("truncated archive")? as usize;
        let end = (data as u64)
            .checked_add(csize)
            .filter(|&e| e <= b.len() as u64)
            .ok_or_else(|| {
                format!("truncated archive: record `{name}` runs past the end of the file")
            })?;
        entries.insert(name, data..end as usize);
        p += 46 + nlen + xlen + clen;
    }
    Ok(ZipIndex { entries })
}
