//! NIfTI-1 volumes in (.nii, .nii.gz) and label volumes out, with the
//! source's geometry.
//!
//! Every file is checked here before the `nifti` crate parses its header
//! (EVAL.md: the crate can panic on headers it does not expect): the header
//! size and magic (NIfTI-2 and header/image pairs are refused by name), the
//! dimensions (a 4-D image is refused unless its extra dimensions are 1),
//! the voxel type, the voxel offset and that the file holds every voxel.
//! The voxels are converted here (either byte order, scl_slope / scl_inter
//! applied). A gzip file is decompressed only as far as the header says the
//! voxels go, so a small corrupt file cannot expand without bound.

use std::io::Read;
use std::path::Path;

use nifti::NiftiHeader;

use crate::error::{Error, Result};

const OP: &str = "nifti";
const HEADER: usize = 348;

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::input(OP, format!("{}: {msg}", path.display()))
}

/// A 3-D scalar volume: voxels x fastest, then y, then z (the file's
/// order), as f32 after scl_slope / scl_inter.
#[derive(Clone, Debug)]
pub struct Volume {
    /// [nz][ny][nx]
    pub data: Vec<f32>,
    /// (nx, ny, nz)
    pub dims: [usize; 3],
    /// Voxel size along x, y, z (pixdim[1..4], mm when xyzt_units says so).
    pub spacing: [f64; 3],
    /// The source header: its geometry (qform, sform, pixdim, units) goes
    /// into every volume written from this one.
    pub header: NiftiHeader,
}

impl Volume {
    /// Slice z (an x-y plane): [ny][nx].
    pub fn slice(&self, z: usize) -> &[f32] {
        let n = self.dims[0] * self.dims[1];
        &self.data[z * n..(z + 1) * n]
    }
}

/// Bytes per voxel and a name for each scalar NIfTI datatype.
fn datatype(code: i16) -> Option<(usize, &'static str)> {
    Some(match code {
        2 => (1, "uint8"),
        4 => (2, "int16"),
        8 => (4, "int32"),
        16 => (4, "float32"),
        64 => (8, "float64"),
        256 => (1, "int8"),
        512 => (2, "uint16"),
        768 => (4, "uint32"),
        1024 => (8, "int64"),
        1280 => (8, "uint64"),
        _ => return None,
    })
}

fn datatype_name(code: i16) -> &'static str {
    match code {
        1 => "binary",
        32 => "complex64",
        128 => "RGB24",
        1536 => "float128",
        1792 => "complex128",
        2048 => "complex256",
        2304 => "RGBA32",
        _ => "unknown",
    }
}

/// What the header says, checked.
struct Layout {
    little: bool,
    dims: [usize; 3],
    datatype: i16,
    size: usize,
    offset: usize,
    voxels: usize,
}

fn check_header(path: &Path, h: &[u8]) -> Result<Layout> {
    if h.len() < HEADER {
        return Err(bad(
            path,
            format!(
                "truncated: {} bytes, a NIfTI-1 header has {HEADER}",
                h.len()
            ),
        ));
    }
    let le = i32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let be = i32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
    if le == 540 || be == 540 {
        return Err(bad(
            path,
            "a NIfTI-2 file; this reader takes NIfTI-1 (nibabel: nib.Nifti1Image(img.dataobj, img.affine).to_filename(...))",
        ));
    }
    let little = match (le, be) {
        (348, _) => true,
        (_, 348) => false,
        _ => return Err(bad(path, "not a NIfTI file (no NIfTI-1 header size)")),
    };
    let i16_at = |o: usize| {
        let b: [u8; 2] = h[o..o + 2].try_into().expect("2 bytes");
        if little {
            i16::from_le_bytes(b)
        } else {
            i16::from_be_bytes(b)
        }
    };
    let f32_at = |o: usize| {
        let b: [u8; 4] = h[o..o + 4].try_into().expect("4 bytes");
        if little {
            f32::from_le_bytes(b)
        } else {
            f32::from_be_bytes(b)
        }
    };
    match &h[344..348] {
        b"n+1\0" => {}
        b"ni1\0" => {
            return Err(bad(
                path,
                "a header of a .hdr/.img pair; give a single-file .nii or .nii.gz",
            ));
        }
        m => return Err(bad(path, format!("bad NIfTI-1 magic {m:?}"))),
    }
    let dim: Vec<i16> = (0..8).map(|k| i16_at(40 + 2 * k)).collect();
    let nd = dim[0];
    if !(1..=7).contains(&nd) {
        return Err(bad(
            path,
            format!("dim[0] = {nd}: not a number of dimensions"),
        ));
    }
    let nd = nd as usize;
    if dim[1..=nd].iter().any(|&d| d < 1) {
        return Err(bad(
            path,
            format!("dimensions {:?}: each must be at least 1", &dim[1..=nd]),
        ));
    }
    if nd > 3 && dim[4..=nd].iter().any(|&d| d > 1) {
        return Err(bad(
            path,
            format!(
                "a {nd}-D image (dimensions {:?}); give one 3-D volume (e.g. one time point)",
                &dim[1..=nd]
            ),
        ));
    }
    let get = |k: usize| if k <= nd { dim[k] as usize } else { 1 };
    let dims = [get(1), get(2), get(3)];
    let code = i16_at(70);
    let (size, _) = datatype(code).ok_or_else(|| {
        bad(
            path,
            format!(
                "voxel type {code} ({}) is not a scalar type this reader takes",
                datatype_name(code)
            ),
        )
    })?;
    let vox = f32_at(108);
    if !vox.is_finite() || vox < HEADER as f32 || vox.fract() != 0.0 {
        return Err(bad(
            path,
            format!("voxel offset {vox} is not a byte offset after the header"),
        ));
    }
    for k in 1..=3 {
        let p = f32_at(76 + 4 * k);
        if !p.is_finite() {
            return Err(bad(path, format!("voxel size pixdim[{k}] = {p}")));
        }
    }
    let offset = vox as usize;
    let voxels = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| {
            n.checked_mul(size)
                .and_then(|b| b.checked_add(offset))
                .is_some()
        })
        .ok_or_else(|| bad(path, format!("dimensions {dims:?} are too large")))?;
    Ok(Layout {
        little,
        dims,
        datatype: code,
        size,
        offset,
        voxels,
    })
}

/// Reads a NIfTI-1 volume (.nii, or .nii.gz / any gzip file).
pub fn read_nifti(path: &Path) -> Result<Volume> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 2];
    let gz = {
        let mut f = &file;
        let n = f.read(&mut magic).map_err(io)?;
        n == 2 && magic == [0x1f, 0x8b]
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut src: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let corrupt = |e: std::io::Error| bad(path, format!("unreadable ({e})"));
    let mut head = Vec::with_capacity(HEADER);
    (&mut src)
        .take(HEADER as u64)
        .read_to_end(&mut head)
        .map_err(corrupt)?;
    let l = check_header(path, &head)?;
    let want = l.offset + l.voxels * l.size;
    let mut bytes = head;
    (&mut src)
        .take((want - HEADER) as u64)
        .read_to_end(&mut bytes)
        .map_err(corrupt)?;
    if bytes.len() < want {
        return Err(bad(
            path,
            format!(
                "truncated: the header promises {} voxels of {} bytes from byte {}, the file ends at byte {}",
                l.voxels,
                l.size,
                l.offset,
                bytes.len()
            ),
        ));
    }
    if gz {
        // The rest of the stream, so that its checksum is verified: a cut
        // or damaged file fails even when the voxels came out whole.
        std::io::copy(&mut (&mut src).take(1 << 26), &mut std::io::sink()).map_err(corrupt)?;
    }
    // Checked above: the crate's parser sees a well-formed NIfTI-1 header.
    let mut header = NiftiHeader::from_reader(&bytes[..HEADER])
        .map_err(|e| bad(path, format!("header: {e}")))?;
    header.fix();
    let raw = &bytes[l.offset..want];
    let mut data = to_f32(raw, l.datatype, l.little);
    let (slope, inter) = (header.scl_slope, header.scl_inter);
    if slope.is_finite() && slope != 0.0 && inter.is_finite() && (slope != 1.0 || inter != 0.0) {
        data.iter_mut()
            .for_each(|v| *v = (*v as f64 * slope as f64 + inter as f64) as f32);
    }
    let spacing = std::array::from_fn(|k| {
        let p = header.pixdim[k + 1].abs() as f64;
        if p > 0.0 { p } else { 1.0 }
    });
    Ok(Volume {
        data,
        dims: l.dims,
        spacing,
        header,
    })
}

fn to_f32(raw: &[u8], code: i16, little: bool) -> Vec<f32> {
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            raw.chunks_exact($n)
                .map(|c| {
                    let b: [u8; $n] = c.try_into().expect("chunk");
                    (if little {
                        <$t>::from_le_bytes(b)
                    } else {
                        <$t>::from_be_bytes(b)
                    }) as f32
                })
                .collect()
        };
    }
    match code {
        2 => raw.iter().map(|&v| v as f32).collect(),
        256 => raw.iter().map(|&v| v as i8 as f32).collect(),
        4 => conv!(i16, 2),
        512 => conv!(u16, 2),
        8 => conv!(i32, 4),
        768 => conv!(u32, 4),
        16 => conv!(f32, 4),
        64 => conv!(f64, 8),
        1024 => conv!(i64, 8),
        1280 => conv!(u64, 8),
        _ => unreachable!("checked in check_header"),
    }
}

/// The 348 header bytes (little-endian) of `h`.
fn header_bytes(h: &NiftiHeader) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER);
    let i32s = |b: &mut Vec<u8>, v: i32| b.extend(v.to_le_bytes());
    let i16s = |b: &mut Vec<u8>, v: i16| b.extend(v.to_le_bytes());
    let f32s = |b: &mut Vec<u8>, v: f32| b.extend(v.to_le_bytes());
    let fixed = |b: &mut Vec<u8>, v: &[u8], n: usize| {
        let mut v = v.to_vec();
        v.resize(n, 0);
        b.extend(v);
    };
    i32s(&mut b, 348);
    fixed(&mut b, &h.data_type, 10);
    fixed(&mut b, &h.db_name, 18);
    i32s(&mut b, h.extents);
    i16s(&mut b, h.session_error);
    b.push(h.regular);
    b.push(h.dim_info);
    for d in h.dim {
        i16s(&mut b, d as i16);
    }
    f32s(&mut b, h.intent_p1);
    f32s(&mut b, h.intent_p2);
    f32s(&mut b, h.intent_p3);
    i16s(&mut b, h.intent_code);
    i16s(&mut b, h.datatype);
    i16s(&mut b, h.bitpix);
    i16s(&mut b, h.slice_start);
    for p in h.pixdim {
        f32s(&mut b, p);
    }
    f32s(&mut b, h.vox_offset);
    f32s(&mut b, h.scl_slope);
    f32s(&mut b, h.scl_inter);
    i16s(&mut b, h.slice_end);
    b.push(h.slice_code);
    b.push(h.xyzt_units);
    f32s(&mut b, h.cal_max);
    f32s(&mut b, h.cal_min);
    f32s(&mut b, h.slice_duration);
    f32s(&mut b, h.toffset);
    i32s(&mut b, h.glmax);
    i32s(&mut b, h.glmin);
    fixed(&mut b, &h.descrip, 80);
    fixed(&mut b, &h.aux_file, 24);
    i16s(&mut b, h.qform_code);
    i16s(&mut b, h.sform_code);
    for v in [
        h.quatern_b,
        h.quatern_c,
        h.quatern_d,
        h.quatern_x,
        h.quatern_y,
        h.quatern_z,
    ] {
        f32s(&mut b, v);
    }
    for row in [h.srow_x, h.srow_y, h.srow_z] {
        for v in row {
            f32s(&mut b, v);
        }
    }
    fixed(&mut b, &h.intent_name, 16);
    b.extend(b"n+1\0");
    debug_assert_eq!(b.len(), HEADER);
    b
}

/// Writes a single-file NIfTI-1 volume (gzip when the name ends in .gz)
/// with `like`'s geometry and units, `dims` (nx, ny, nz), voxels of
/// datatype `code` in `data` (little-endian bytes), `descrip` (up to 79
/// bytes kept) and `intent` (NIfTI intent code, e.g. 1002 for labels).
pub fn write_nifti(
    path: &Path,
    like: &NiftiHeader,
    dims: [usize; 3],
    code: i16,
    data: &[u8],
    descrip: &str,
    intent: i16,
) -> Result<()> {
    let (size, _) = datatype(code)
        .ok_or_else(|| Error::input(OP, format!("cannot write voxel type {code}")))?;
    if dims.iter().product::<usize>() * size != data.len()
        || dims.iter().any(|&d| d > i16::MAX as usize)
    {
        return Err(Error::shape(
            OP,
            format!(
                "{} bytes for dimensions {dims:?} of {size}-byte voxels",
                data.len()
            ),
        ));
    }
    let mut h = like.clone();
    h.dim = [
        3,
        dims[0] as u16,
        dims[1] as u16,
        dims[2] as u16,
        1,
        1,
        1,
        1,
    ];
    h.datatype = code;
    h.bitpix = (size * 8) as i16;
    h.vox_offset = 352.0;
    h.scl_slope = 1.0;
    h.scl_inter = 0.0;
    h.intent_code = intent;
    h.cal_min = 0.0;
    h.cal_max = 0.0;
    let mut d = descrip.as_bytes().to_vec();
    d.truncate(79);
    h.descrip = d;
    let mut out = header_bytes(&h);
    out.extend([0u8; 4]); // no extensions
    out.extend_from_slice(data);
    let gz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    let bytes = if gz {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(&out)
            .and_then(|_| e.finish())
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?
    } else {
        out
    };
    crate::io::write_atomic(path, &bytes)
}

/// Writes a label volume (uint8, NIFTI_INTENT_LABEL) on `like`'s grid:
/// its dimensions, voxel size, qform and sform.
pub fn write_labels(path: &Path, like: &Volume, labels: &[u8], descrip: &str) -> Result<()> {
    write_nifti(path, &like.header, like.dims, 2, labels, descrip, 1002)
}
