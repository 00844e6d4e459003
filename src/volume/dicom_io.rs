//! DICOM series in (a folder of single-frame files), through `dicom-object`
//! and `dicom-pixeldata`: the slices sorted by ImagePositionPatient along
//! the slice normal (not by file name or InstanceNumber), RescaleSlope and
//! RescaleIntercept applied, JPEG (baseline, extended, lossless), RLE and
//! deflate decoded in pure Rust; JPEG-LS, JPEG 2000, HTJ2K, JPEG XL and
//! video refused by name. The geometry becomes a NIfTI sform (DICOM's LPS
//! turned to NIfTI's RAS), so that the labels written beside the series
//! line up with it in any NIfTI viewer.

use std::path::{Path, PathBuf};

use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;

use super::Volume;
use crate::error::{Error, Result};

const OP: &str = "dicom";

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::input(OP, format!("{}: {msg}", path.display()))
}

/// Transfer syntaxes this reader decodes.
const DECODED: &[&str] = &[
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
];

/// A name for a transfer syntax this reader refuses.
fn refused_name(ts: &str) -> &'static str {
    match ts {
        "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" => "JPEG-LS",
        "1.2.840.10008.1.2.4.90" | "1.2.840.10008.1.2.4.91" => "JPEG 2000",
        "1.2.840.10008.1.2.4.92" | "1.2.840.10008.1.2.4.93" => "JPEG 2000 multi-component",
        "1.2.840.10008.1.2.4.201" | "1.2.840.10008.1.2.4.202" | "1.2.840.10008.1.2.4.203" => {
            "HTJ2K"
        }
        "1.2.840.10008.1.2.4.110" | "1.2.840.10008.1.2.4.111" | "1.2.840.10008.1.2.4.112" => {
            "JPEG XL"
        }
        t if t.starts_with("1.2.840.10008.1.2.4.10") => "MPEG video",
        _ => "an unknown compression",
    }
}

/// One slice's file, read.
struct Slice {
    path: PathBuf,
    series: String,
    position: [f64; 3],
    orientation: [f64; 6],
    spacing: [f64; 2],
    rows: usize,
    cols: usize,
    pixels: Vec<f32>,
}

/// Runs `f`, turning a panic inside the DICOM crates into an error (they
/// parse untrusted files; a panic there must not take the program down).
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(bad(
            path,
            "the DICOM decoder failed on this file (malformed)",
        ))
    })
}

fn floats(obj: &DefaultDicomObject, path: &Path, name: &str, n: usize) -> Result<Vec<f64>> {
    let v = obj
        .element_by_name(name)
        .map_err(|_| bad(path, format!("no {name}")))?
        .to_multi_float64()
        .map_err(|e| bad(path, format!("{name}: {e}")))?;
    if v.len() < n || v.iter().take(n).any(|x| !x.is_finite()) {
        return Err(bad(path, format!("{name} has {v:?}, expected {n} numbers")));
    }
    Ok(v[..n].to_vec())
}

fn read_slice(path: &Path) -> Result<Slice> {
    let obj = OpenFileOptions::new()
        .open_file(path)
        .map_err(|e| bad(path, format!("not a readable DICOM file ({e})")))?;
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_string();
    if !DECODED.contains(&ts.as_str()) {
        return Err(bad(
            path,
            format!(
                "pixel data compressed as {} (transfer syntax {ts}), which this reader does not decode; \
                 decompress the series first (e.g. gdcmconv --raw, dcmdjpeg)",
                refused_name(&ts)
            ),
        ));
    }
    let text = |name: &str| {
        obj.element_by_name(name)
            .ok()
            .and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()))
            .unwrap_or_default()
    };
    let frames: u32 = obj
        .element_by_name("NumberOfFrames")
        .ok()
        .and_then(|e| e.to_int().ok())
        .unwrap_or(1);
    if frames > 1 {
        return Err(bad(
            path,
            format!("a multi-frame image ({frames} frames): this reader takes one slice per file"),
        ));
    }
    let position = floats(&obj, path, "ImagePositionPatient", 3)?;
    let orientation = floats(&obj, path, "ImageOrientationPatient", 6)?;
    let spacing = floats(&obj, path, "PixelSpacing", 2)?;
    let decoded = obj
        .decode_pixel_data()
        .map_err(|e| bad(path, format!("pixel data: {e}")))?;
    if decoded.samples_per_pixel() != 1 {
        return Err(bad(
            path,
            format!(
                "{} samples per pixel ({}): not a grey-level image",
                decoded.samples_per_pixel(),
                text("PhotometricInterpretation")
            ),
        ));
    }
    let (rows, cols) = (decoded.rows() as usize, decoded.columns() as usize);
    // Modality values: RescaleSlope and RescaleIntercept applied.
    let pixels: Vec<f32> = decoded
        .to_vec()
        .map_err(|e| bad(path, format!("pixel data: {e}")))?;
    if pixels.len() != rows * cols {
        return Err(bad(
            path,
            format!("{} pixels for {rows} x {cols}", pixels.len()),
        ));
    }
    Ok(Slice {
        path: path.to_path_buf(),
        series: text("SeriesInstanceUID"),
        position: [position[0], position[1], position[2]],
        orientation: std::array::from_fn(|i| orientation[i]),
        spacing: [spacing[0], spacing[1]],
        rows,
        cols,
        pixels,
    })
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Reads the DICOM series in folder `dir` (every file in it that is a
/// DICOM image; other files are skipped). One series only: a folder with
/// several says which, with their sizes.
pub fn read_dicom_series(dir: &Path) -> Result<Volume> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    let (mut slices, mut skipped) = (vec![], vec![]);
    for p in &paths {
        match guarded(p, || read_slice(p)) {
            Ok(s) => slices.push(s),
            Err(e) => skipped.push(e),
        }
    }
    if slices.is_empty() {
        return Err(match skipped.into_iter().next() {
            // One file that failed: its reason is the answer.
            Some(e) if paths.len() == 1 => e,
            Some(e) => bad(
                dir,
                format!(
                    "no readable DICOM slice among {} files (the first: {e})",
                    paths.len()
                ),
            ),
            None => bad(dir, "no files"),
        });
    }
    let mut series: Vec<(String, usize)> = vec![];
    for s in &slices {
        match series.iter_mut().find(|(u, _)| *u == s.series) {
            Some(e) => e.1 += 1,
            None => series.push((s.series.clone(), 1)),
        }
    }
    if series.len() > 1 {
        return Err(bad(
            dir,
            format!(
                "{} series in one folder ({series:?}): give a folder with one",
                series.len()
            ),
        ));
    }
    let first = &slices[0];
    let (rows, cols, orient, pixel_spacing) =
        (first.rows, first.cols, first.orientation, first.spacing);
    for s in &slices {
        if (s.rows, s.cols) != (rows, cols) {
            return Err(bad(
                &s.path,
                format!(
                    "{} x {} pixels; the series' first slice has {rows} x {cols}",
                    s.rows, s.cols
                ),
            ));
        }
        if s.orientation
            .iter()
            .zip(&orient)
            .any(|(a, b)| (a - b).abs() > 1e-4)
        {
            return Err(bad(
                &s.path,
                "its orientation differs from the series' (a localizer?)",
            ));
        }
    }
    let r = [orient[0], orient[1], orient[2]];
    let c = [orient[3], orient[4], orient[5]];
    let n = cross(r, c);
    if !(dot(n, n) > 0.5) {
        return Err(bad(
            &first.path,
            format!("ImageOrientationPatient {orient:?} is degenerate"),
        ));
    }
    // Along the normal, not by file name or InstanceNumber.
    slices.sort_by(|a, b| dot(a.position, n).total_cmp(&dot(b.position, n)));
    let along: Vec<f64> = slices.iter().map(|s| dot(s.position, n)).collect();
    let gaps: Vec<f64> = along.windows(2).map(|w| w[1] - w[0]).collect();
    if let Some(i) = gaps.iter().position(|&g| g.abs() < 1e-4) {
        return Err(bad(
            dir,
            format!(
                "{} and {} are at the same position along the slice normal",
                slices[i].path.display(),
                slices[i + 1].path.display()
            ),
        ));
    }
    let dz = if gaps.is_empty() {
        1.0
    } else {
        gaps.iter().sum::<f64>() / gaps.len() as f64
    };
    if gaps
        .iter()
        .any(|g| (g - dz).abs() > 0.01 * dz.abs().max(1e-6) + 1e-3)
    {
        // Kept, but the sform's slice step is the mean.
        eprintln!(
            "note: {}: uneven slice spacing ({:.3} to {:.3} mm); the volume takes the mean {dz:.3} mm",
            dir.display(),
            gaps.iter().cloned().fold(f64::INFINITY, f64::min),
            gaps.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
        );
    }
    let [row_sp, col_sp] = pixel_spacing;
    // Voxel (i = column, j = row, k = slice) -> LPS:
    // p0 + i col_sp r + j row_sp c + k dz n; NIfTI wants RAS: x and y negated.
    let p0 = slices[0].position;
    let lps = [
        [r[0] * col_sp, c[0] * row_sp, n[0] * dz, p0[0]],
        [r[1] * col_sp, c[1] * row_sp, n[1] * dz, p0[1]],
        [r[2] * col_sp, c[2] * row_sp, n[2] * dz, p0[2]],
    ];
    let row =
        |k: usize, sign: f64| -> [f32; 4] { std::array::from_fn(|j| (sign * lps[k][j]) as f32) };
    let nz = slices.len();
    let header = nifti::NiftiHeader {
        dim: [3, cols as u16, rows as u16, nz as u16, 1, 1, 1, 1],
        pixdim: [
            1.0,
            col_sp as f32,
            row_sp as f32,
            dz.abs() as f32,
            1.0,
            1.0,
            1.0,
            1.0,
        ],
        xyzt_units: 2,
        qform_code: 0,
        sform_code: 1,
        srow_x: row(0, -1.0),
        srow_y: row(1, -1.0),
        srow_z: row(2, 1.0),
        datatype: 16,
        bitpix: 32,
        ..Default::default()
    };
    let mut data = Vec::with_capacity(rows * cols * nz);
    for s in &slices {
        data.extend_from_slice(&s.pixels);
    }
    Ok(Volume {
        data,
        dims: [cols, rows, nz],
        spacing: [col_sp, row_sp, dz.abs()],
        header,
    })
}
