//! Medical volumes: NIfTI-1 files and DICOM series in (nifti_io.rs,
//! dicom_io.rs), label volumes out as NIfTI (nifti_io.rs),
//! intensities to the 8-bit slices the model takes (`Window`), and a 3-D
//! box prompt propagated slice by slice as MedSAM-Lite does
//! (`segment_volume`).
//!
//! Slices are the file's x-y planes (z fixed), shown with x to the right
//! and y down: slice z is an image nx wide and ny high, and a box
//! x0,y0,z0,x1,y1,z1 is in voxel indices, the maxima exclusive.

mod dicom_io;
mod nifti_io;

pub use dicom_io::read_dicom_series;
pub use nifti_io::{Volume, read_nifti, write_labels, write_nifti};

/// A NIfTI-1 file, or a folder holding one DICOM series.
pub fn read_volume(path: &std::path::Path) -> Result<Volume> {
    if path.is_dir() {
        read_dicom_series(path)
    } else {
        read_nifti(path)
    }
}

/// A synthetic CT-like volume for benchmarks and tests: `objects` bright
/// ellipsoids (60 HU) in air and tissue (-1000 / -100 HU), and a 3-D box
/// around each. Voxels [nz][ny][nx].
pub fn synthetic_ct(nx: usize, ny: usize, nz: usize, objects: usize) -> (Vec<f32>, Vec<Box3d>) {
    let mut v = vec![-1000.0f32; nx * ny * nz];
    let (cx, cy) = (nx as f32 / 2.0, ny as f32 / 2.0);
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let (dx, dy) = (
                    (x as f32 - cx) / (0.45 * nx as f32),
                    (y as f32 - cy) / (0.4 * ny as f32),
                );
                if dx * dx + dy * dy < 1.0 {
                    v[(z * ny + y) * nx + x] = -100.0;
                }
            }
        }
    }
    let mut boxes = vec![];
    for k in 0..objects {
        // Spread around the body, each over about half of the slices.
        let a = k as f32 / objects.max(1) as f32 * std::f32::consts::TAU;
        let (ox, oy) = (
            cx + 0.2 * nx as f32 * a.cos(),
            cy + 0.2 * ny as f32 * a.sin(),
        );
        let (rx, ry) = (0.08 * nx as f32, 0.07 * ny as f32);
        let (z0, z1) = (
            nz * (k % 3 + 1) / 8,
            (nz * (k % 3 + 5) / 8).max(nz * (k % 3 + 1) / 8 + 1),
        );
        let (zc, rz) = ((z0 + z1) as f32 / 2.0, (z1 - z0) as f32 / 2.0);
        for z in z0..z1 {
            for y in 0..ny {
                for x in 0..nx {
                    let (dx, dy, dz) = (
                        (x as f32 - ox) / rx,
                        (y as f32 - oy) / ry,
                        (z as f32 + 0.5 - zc) / rz,
                    );
                    if dx * dx + dy * dy + dz * dz < 1.0 {
                        v[(z * ny + y) * nx + x] = 60.0;
                    }
                }
            }
        }
        let clamp = |v: f32, n: usize| (v.max(0.0) as usize).min(n);
        boxes.push(Box3d {
            x0: clamp(ox - rx - 2.0, nx),
            y0: clamp(oy - ry - 2.0, ny),
            z0,
            x1: clamp(ox + rx + 3.0, nx),
            y1: clamp(oy + ry + 3.0, ny),
            z1,
        });
    }
    (v, boxes)
}

use crate::error::{Error, Result};
use crate::io::image::RgbImage;
use crate::predictor::Predictor;

/// How intensities become 8 bits (EVAL.md "Volumes").
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Window {
    /// CT: clip to [level - width / 2, level + width / 2], then 0..255.
    Ct { width: f32, level: f32 },
    /// Clip to the lo / hi percentiles (of the non-zero voxels when
    /// `nonzero`, MedSAM's MR rule), then 0..255.
    Percentile { lo: f64, hi: f64, nonzero: bool },
}

impl Window {
    /// The default: the 0.5 / 99.5 percentiles of all voxels, a wide window
    /// (SA-Med2D's own CT slices look like one, EVAL.md).
    pub const WIDE: Window = Window::Percentile {
        lo: 0.5,
        hi: 99.5,
        nonzero: false,
    };

    /// A preset name (abdomen, lung, brain, mediastinum: Slicer's CT
    /// windows; mr: 0.5 / 99.5 percentiles of the non-zero voxels; wide: of
    /// all voxels) or a CT window as `W,L` (e.g. `400,40`).
    pub fn parse(s: &str) -> Result<Window> {
        let ct = |width, level| Ok(Window::Ct { width, level });
        match s.trim().to_ascii_lowercase().as_str() {
            "abdomen" | "soft-tissue" => ct(400.0, 40.0),
            "lung" => ct(1500.0, -600.0),
            "brain" => ct(80.0, 40.0),
            "mediastinum" => ct(350.0, 50.0),
            "mr" => Ok(Window::Percentile {
                lo: 0.5,
                hi: 99.5,
                nonzero: true,
            }),
            "wide" => Ok(Window::WIDE),
            other => {
                let v: Vec<f32> = other
                    .split(',')
                    .map(|p| p.trim().parse::<f32>())
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| bad_window(s))?;
                match v[..] {
                    [w, l] if w.is_finite() && w > 0.0 && l.is_finite() => ct(w, l),
                    _ => Err(bad_window(s)),
                }
            }
        }
    }

    /// The clip range [lo, hi] for a volume's values.
    pub fn range(&self, data: &[f32]) -> (f32, f32) {
        match *self {
            Window::Ct { width, level } => (level - width / 2.0, level + width / 2.0),
            Window::Percentile { lo, hi, nonzero } => {
                let mut v: Vec<f32> = data
                    .iter()
                    .copied()
                    .filter(|x| x.is_finite() && (!nonzero || *x != 0.0))
                    .collect();
                if v.is_empty() {
                    return (0.0, 0.0);
                }
                let at = |v: &mut Vec<f32>, p: f64| {
                    let k = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
                    *v.select_nth_unstable_by(k, f32::total_cmp).1
                };
                (at(&mut v, lo), at(&mut v, hi))
            }
        }
    }

    /// The volume as 8-bit voxels, and a description of the window used
    /// (printed, and stored in the output's header).
    pub fn apply(&self, vol: &Volume) -> (Vec<u8>, String) {
        let (lo, hi) = self.range(&vol.data);
        let span = hi - lo;
        let out = vol
            .data
            .iter()
            .map(|&v| {
                if !(span > 0.0) || !v.is_finite() {
                    0
                } else {
                    ((v.clamp(lo, hi) - lo) / span * 255.0).round() as u8
                }
            })
            .collect();
        let what = match *self {
            Window::Ct { width, level } => format!("CT window W{width} L{level}"),
            Window::Percentile {
                lo: a,
                hi: b,
                nonzero,
            } => format!(
                "percentiles {a}/{b} of {} voxels",
                if nonzero { "non-zero" } else { "all" }
            ),
        };
        (out, format!("sam-unet: {what} -> [{lo:.6}, {hi:.6}]"))
    }
}

fn bad_window(s: &str) -> Error {
    Error::input(
        "window",
        format!("{s:?}: give abdomen, lung, brain, mediastinum, mr, wide, or W,L (e.g. 400,40)"),
    )
}

/// A 3-D box in voxel indices, maxima exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Box3d {
    pub x0: usize,
    pub y0: usize,
    pub z0: usize,
    pub x1: usize,
    pub y1: usize,
    pub z1: usize,
}

impl Box3d {
    /// `x0,y0,z0,x1,y1,z1`.
    pub fn parse(s: &str) -> Result<Box3d> {
        let v: Vec<usize> = s
            .split(',')
            .map(|p| p.trim().parse::<usize>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                Error::input("box3d", format!("{s:?}: give x0,y0,z0,x1,y1,z1 in voxels"))
            })?;
        match v[..] {
            [x0, y0, z0, x1, y1, z1] => Ok(Box3d {
                x0,
                y0,
                z0,
                x1,
                y1,
                z1,
            }),
            _ => Err(Error::input(
                "box3d",
                format!("{s:?}: six numbers x0,y0,z0,x1,y1,z1"),
            )),
        }
    }

    fn check(&self, k: usize, dims: [usize; 3]) -> Result<()> {
        let ok = self.x0 < self.x1
            && self.y0 < self.y1
            && self.z0 < self.z1
            && self.x1 <= dims[0]
            && self.y1 <= dims[1]
            && self.z1 <= dims[2];
        if ok {
            return Ok(());
        }
        Err(Error::input(
            "box3d",
            format!(
                "box {k} ({},{},{},{},{},{}) is empty or leaves the volume of {} x {} x {} voxels",
                self.x0, self.y0, self.z0, self.x1, self.y1, self.z1, dims[0], dims[1], dims[2]
            ),
        ))
    }
}

/// Where `segment_volume`'s time went.
#[derive(Clone, Copy, Debug, Default)]
pub struct VolumeTiming {
    /// Slices through the image side (each once).
    pub slices: usize,
    /// Decoder calls (one per object and slice).
    pub steps: usize,
    pub encode_s: f64,
    /// The decoder, post-processing and the masks' boxes.
    pub decode_s: f64,
}

/// How `segment_volume` propagates.
#[derive(Clone, Copy, Debug)]
pub struct Propagation {
    /// Pixels added on each side of the previous slice's mask box.
    pub margin: usize,
    /// Slices through the image side together.
    pub batch: usize,
}

impl Default for Propagation {
    fn default() -> Self {
        Propagation {
            margin: 3,
            batch: 8,
        }
    }
}

/// Segments the objects of 8-bit `grey` voxels [nz][ny][nx] ((nx, ny, nz) =
/// `dims`), one 3-D box each, as MedSAM-Lite propagates a box: the middle
/// slice of the box gets its x-y box; going up and then down from it, each
/// slice's box is the box of the previous slice's mask widened by the
/// margin (the middle box again when that mask is empty), within the box's
/// z range. Every slice any box reaches goes through the image side once,
/// for all objects. Returns labels [nz][ny][nx]: object k is k + 1, a later
/// object over an earlier one. `progress(done, total)` after each slice's
/// image side and each object's slice.
pub fn segment_volume(
    pred: &Predictor,
    grey: &[u8],
    dims: [usize; 3],
    boxes: &[Box3d],
    opts: Propagation,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<u8>, VolumeTiming)> {
    let [nx, ny, nz] = dims;
    let plane = nx * ny;
    if grey.len() != plane * nz || plane == 0 {
        return Err(Error::shape(
            "segment_volume",
            format!("{} voxels for {nx} x {ny} x {nz}", grey.len()),
        ));
    }
    if boxes.is_empty() || boxes.len() > 255 {
        return Err(Error::input(
            "segment_volume",
            format!("{} boxes: give 1 to 255", boxes.len()),
        ));
    }
    for (k, b) in boxes.iter().enumerate() {
        b.check(k, dims)?;
    }
    let mut needed: Vec<usize> = boxes.iter().flat_map(|b| b.z0..b.z1).collect();
    needed.sort_unstable();
    needed.dedup();
    let work = needed.len() + boxes.iter().map(|b| b.z1 - b.z0).sum::<usize>();
    let mut done = 0;
    let mut timing = VolumeTiming {
        slices: needed.len(),
        ..VolumeTiming::default()
    };
    let t = std::time::Instant::now();
    // The image side, slice batch by slice batch.
    let mut encoded = std::collections::HashMap::new();
    for chunk in needed.chunks(opts.batch.max(1)) {
        let images: Vec<RgbImage> = chunk
            .iter()
            .map(|&z| {
                let s = &grey[z * plane..(z + 1) * plane];
                RgbImage::new(nx, ny, s.iter().flat_map(|&v| [v, v, v]).collect())
            })
            .collect::<Result<_>>()?;
        let enc = std::sync::Arc::new(pred.encode_images(&images)?);
        for (i, &z) in chunk.iter().enumerate() {
            encoded.insert(z, (std::sync::Arc::clone(&enc), i));
        }
        done += chunk.len();
        progress(done, work);
    }
    timing.encode_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let mut labels = vec![0u8; plane * nz];
    for (k, b) in boxes.iter().enumerate() {
        let mid = (b.z0 + b.z1 - 1) / 2;
        let middle = [b.x0 as f32, b.y0 as f32, b.x1 as f32, b.y1 as f32];
        let ups = mid..b.z1;
        let downs = (b.z0..mid).rev();
        let mut mid_mask: Option<Vec<bool>> = None;
        for (dir, zs) in [(0, ups.collect::<Vec<_>>()), (1, downs.collect())] {
            // Going down starts from the middle slice's mask.
            let mut prev = if dir == 0 { None } else { mid_mask.clone() };
            for z in zs {
                let bx = prev
                    .as_deref()
                    .and_then(|m| mask_box(m, nx, ny, opts.margin))
                    .unwrap_or(middle);
                let (enc, i) = &encoded[&z];
                let p = pred.predict_encoded(enc, *i, &[bx])?;
                let m = p.masks.into_iter().next().unwrap_or_default();
                let out = &mut labels[z * plane..(z + 1) * plane];
                for (o, &on) in out.iter_mut().zip(&m) {
                    if on {
                        *o = (k + 1) as u8;
                    }
                }
                if z == mid {
                    mid_mask = Some(m.clone());
                }
                prev = Some(m);
                done += 1;
                timing.steps += 1;
                progress(done, work);
            }
        }
    }
    timing.decode_s = t.elapsed().as_secs_f64();
    Ok((labels, timing))
}

/// The box of a mask's pixels widened by `margin` on each side (within the
/// image), or None when it is empty.
fn mask_box(m: &[bool], w: usize, h: usize, margin: usize) -> Option<[f32; 4]> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (i, _) in m.iter().enumerate().filter(|(_, on)| **on) {
        let (x, y) = (i % w, i / w);
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x + 1);
        y1 = y1.max(y + 1);
    }
    (x0 != usize::MAX).then(|| {
        [
            x0.saturating_sub(margin) as f32,
            y0.saturating_sub(margin) as f32,
            (x1 + margin).min(w) as f32,
            (y1 + margin).min(h) as f32,
        ]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_boxes_parse() {
        assert_eq!(
            Window::parse("abdomen").unwrap(),
            Window::Ct {
                width: 400.0,
                level: 40.0
            }
        );
        assert_eq!(
            Window::parse("1500,-600").unwrap(),
            Window::parse("lung").unwrap()
        );
        assert!(Window::parse("bone-ish").is_err());
        assert!(Window::parse("0,40").is_err());
        assert_eq!(
            Window::Ct {
                width: 400.0,
                level: 40.0
            }
            .range(&[]),
            (-160.0, 240.0)
        );
        let v: Vec<f32> = (0..=1000).map(|i| i as f32).collect();
        assert_eq!(Window::WIDE.range(&v), (5.0, 995.0));
        let b = Box3d::parse("1, 2,3,10,20,30").unwrap();
        assert_eq!((b.x0, b.z1), (1, 30));
        assert!(Box3d::parse("1,2,3").is_err());
        assert!(b.check(0, [10, 20, 29]).is_err());
        assert!(b.check(0, [10, 20, 30]).is_ok());
    }

    #[test]
    fn label_overlap_counts_per_label() {
        let vol = |d: Vec<f32>| Volume {
            data: d,
            dims: [4, 1, 1],
            spacing: [2.0, 5.0, 10.0],
            header: nifti::NiftiHeader::default(),
        };
        let s = label_overlap(&vol(vec![1., 1., 2., 0.]), &vol(vec![1., 0., 2., 2.]), 2.0).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].label, s[0].true_positive, s[0].dice),
            (1, 1, 2.0 / 3.0)
        );
        assert_eq!((s[1].reference_voxels, s[1].predicted_voxels), (2, 1));
        assert!((s[1].iou - 0.5).abs() < 1e-12 && (s[1].reference_ml - 0.2).abs() < 1e-12);
        assert!(label_overlap(&vol(vec![0.5, 0., 0., 0.]), &vol(vec![0.; 4]), 2.0).is_err());
        // Label 1: the predicted voxel 1 is 2 mm from the reference's
        // surface along x.
        assert!(s[0].nsd > 0.0 && s[0].nsd <= 1.0 && s[0].hd95 > 0.0);
    }

    #[test]
    fn mask_box_widens_within_the_image() {
        let (w, h) = (10, 8);
        let mut m = vec![false; w * h];
        assert_eq!(mask_box(&m, w, h, 3), None);
        m[2 * w + 1] = true;
        m[4 * w + 5] = true;
        assert_eq!(mask_box(&m, w, h, 3), Some([0.0, 0.0, 9.0, 8.0]));
        assert_eq!(mask_box(&m, w, h, 0), Some([1.0, 2.0, 6.0, 5.0]));
    }
}

/// One label's overlap between a predicted and a reference label volume.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelScore {
    pub label: u32,
    pub reference_voxels: usize,
    pub predicted_voxels: usize,
    pub true_positive: usize,
    /// 2 TP / (2 TP + FP + FN) (nnU-Net's); NaN when the label is in neither.
    pub dice: f64,
    /// TP / (TP + FP + FN); NaN likewise.
    pub iou: f64,
    /// The reference's and the prediction's volume in millilitres (voxel
    /// size from the reference, taken as mm).
    pub reference_ml: f64,
    pub predicted_ml: f64,
    /// Normalised surface Dice at the tolerance (mm), DeepMind's 3-D
    /// algorithm with the voxel spacing; NaN when both surfaces are empty.
    pub nsd: f64,
    /// The 95th-percentile Hausdorff distance (mm); infinite when one
    /// surface is empty.
    pub hd95: f64,
}

/// 3-D Dice, IoU, NSD at `tolerance` mm and HD95 per label (every non-zero
/// value in either volume) of a predicted label volume against a reference
/// on the same grid (dimensions equal, affines within 1e-3 mm), with the
/// reference's voxel spacing.
pub fn label_overlap(pred: &Volume, reference: &Volume, tolerance: f64) -> Result<Vec<LabelScore>> {
    const OP: &str = "label overlap";
    crate::eval::run::check_tolerance(OP, tolerance)?;
    if pred.dims != reference.dims {
        return Err(Error::shape(
            OP,
            format!(
                "prediction {:?} voxels, reference {:?}",
                pred.dims, reference.dims
            ),
        ));
    }
    let rows = |h: &nifti::NiftiHeader| [h.srow_x, h.srow_y, h.srow_z];
    let (a, b) = (rows(&pred.header), rows(&reference.header));
    let same = pred.header.sform_code == 0
        || reference.header.sform_code == 0
        || a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .all(|(x, y)| (x - y).abs() <= 1e-3);
    if !same {
        return Err(Error::input(
            OP,
            format!("the volumes are not on the same grid (sform {a:?} vs {b:?})"),
        ));
    }
    let label = |v: f32, which: &str| -> Result<u32> {
        if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= u32::MAX as f32 {
            Ok(v as u32)
        } else {
            Err(Error::input(
                OP,
                format!("a voxel of the {which} holds {v}, not a label (a non-negative integer)"),
            ))
        }
    };
    let mut counts: std::collections::BTreeMap<u32, [usize; 3]> = Default::default();
    for (&p, &r) in pred.data.iter().zip(&reference.data) {
        let (p, r) = (label(p, "prediction")?, label(r, "reference")?);
        if p != 0 {
            counts.entry(p).or_default()[1] += 1;
        }
        if r != 0 {
            let e = counts.entry(r).or_default();
            e[0] += 1;
            if p == r {
                e[2] += 1;
            }
        }
    }
    let ml = reference.spacing.iter().product::<f64>() / 1000.0;
    let [nx, ny, nz] = reference.dims;
    let [sx, sy, sz] = reference.spacing;
    Ok(counts
        .into_iter()
        .map(|(l, [r, p, tp])| {
            let mask = |v: &Volume| -> Vec<u8> {
                v.data.iter().map(|&x| u8::from(x == l as f32)).collect()
            };
            let sd = crate::eval::metrics::surface_distances_3d(
                &mask(pred),
                &mask(reference),
                [nz, ny, nx],
                (sz, sy, sx),
            );
            let (fp, fn_) = ((p - tp) as f64, (r - tp) as f64);
            let tpf = tp as f64;
            let ratio = |n: f64, d: f64| if d > 0.0 { n / d } else { f64::NAN };
            LabelScore {
                label: l,
                reference_voxels: r,
                predicted_voxels: p,
                true_positive: tp,
                dice: ratio(2.0 * tpf, 2.0 * tpf + fp + fn_),
                iou: ratio(tpf, tpf + fp + fn_),
                reference_ml: r as f64 * ml,
                predicted_ml: p as f64 * ml,
                nsd: sd.nsd(tolerance),
                hd95: sd.hausdorff(95.0),
            }
        })
        .collect())
}
