//! A synthetic segmentation data set for trying training end to end without
//! medical data: organ-like shapes (smooth star-shaped blobs, a few per
//! image) on textured backgrounds, written in the SA-Med2D layout that
//! `prepare` reads (train/ with image2label_train.json, test/ with
//! label2image_test.json). Deterministic: a seed gives the same bytes on any
//! machine. Two "modalities" of different looks (`ct`: grey soft tissue with
//! brighter organs; `mr`: darker organs on a brighter, banded background)
//! so that reports per modality have something to show.

use std::path::Path;

use serde_json::{Map, Value};

use crate::data::loader::keyed;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug)]
pub struct SynthOptions {
    pub train_images: usize,
    pub test_images: usize,
    /// Image side in pixels (square images).
    pub size: usize,
    pub seed: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            train_images: 200,
            test_images: 50,
            size: 256,
            seed: 0,
        }
    }
}

/// What was written.
#[derive(Clone, Copy, Debug, Default)]
pub struct SynthReport {
    pub train_images: usize,
    pub train_masks: usize,
    pub test_images: usize,
    pub test_masks: usize,
}

/// A uniform number in [0, 1) for a key.
fn uni(key: &[u64]) -> f64 {
    (keyed(key) >> 11) as f64 / (1u64 << 53) as f64
}

/// Image `index` of a split (`key`: the split's keys start there): its
/// SA-Med2D-style name, RGB pixels (grey) and its objects' masks (class,
/// 0 / 255 pixels).
// Phases are drawn in [0, 6.28): any range would do, and this one keeps the
// synthetic sets byte-identical to the ones already prepared.
#[allow(clippy::approx_constant)]
pub fn image(
    seed: u64,
    key: u64,
    index: u64,
    size: usize,
) -> (String, Vec<u8>, Vec<(u32, Vec<u8>)>) {
    let index_name = index;
    let index = key + index;
    let r = |k: u64| uni(&[seed, index, k]);
    let modality = if r(0) < 0.5 { "ct" } else { "mr" };
    let n = size;
    // Background: a few low-frequency waves plus fine noise.
    let waves: Vec<(f64, f64, f64, f64)> = (0..4)
        .map(|w| {
            let a = r(10 + w) * std::f64::consts::TAU;
            let f = 1.0 + 5.0 * r(20 + w);
            (
                a.cos() * f / n as f64,
                a.sin() * f / n as f64,
                r(30 + w) * 6.28,
                6.0 + 10.0 * r(40 + w),
            )
        })
        .collect();
    let base = if modality == "ct" {
        95.0 + 20.0 * r(1)
    } else {
        140.0 + 20.0 * r(1)
    };
    let mut px = vec![0f64; n * n];
    for y in 0..n {
        for x in 0..n {
            let mut v = base;
            for &(fx, fy, ph, amp) in &waves {
                v += amp * (std::f64::consts::TAU * (fx * x as f64 + fy * y as f64) + ph).sin();
            }
            if modality == "mr" {
                v += 12.0 * ((y as f64 / 7.0).sin());
            }
            v += 18.0 * (uni(&[seed, index, 1000 + (y * n + x) as u64]) - 0.5);
            px[y * n + x] = v;
        }
    }
    // Objects: 2 to 5 blobs that do not overlap (several per image, as
    // organs in a slice: a model must follow the box to pick one).
    let count = 2 + (r(2) * 4.0) as u64;
    let mut taken = vec![false; n * n];
    let mut masks = vec![];
    for o in 0..count {
        for attempt in 0..20u64 {
            let k = |j: u64| r(100 + o * 1000 + attempt * 50 + j);
            let class = 1 + (k(0) * 3.0) as u32;
            let r0 = n as f64 * (0.05 + 0.09 * k(1));
            let (cx, cy) = (
                r0 + (n as f64 - 2.0 * r0) * k(2),
                r0 + (n as f64 - 2.0 * r0) * k(3),
            );
            // class 1 round, 2 elongated, 3 lobed
            let (elong, lobes) = match class {
                1 => (1.0, 0.08),
                2 => (1.6 + 0.8 * k(4), 0.06),
                _ => (1.1, 0.22),
            };
            let rot = k(5) * std::f64::consts::PI;
            let harm: Vec<(f64, f64)> = (2..6)
                .map(|h| (lobes * k(10 + h) / (h as f64 - 1.0), k(20 + h) * 6.28))
                .collect();
            let mut m = vec![0u8; n * n];
            let mut clash = false;
            let mut area = 0;
            for y in 0..n {
                for x in 0..n {
                    let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                    let (u, v) = (
                        dx * rot.cos() + dy * rot.sin(),
                        -dx * rot.sin() + dy * rot.cos(),
                    );
                    let (u, v) = (u / elong.sqrt(), v * elong.sqrt());
                    let d = (u * u + v * v).sqrt();
                    let th = v.atan2(u);
                    let mut rr = r0;
                    for (h, &(a, ph)) in harm.iter().enumerate() {
                        rr *= 1.0 + a * ((h as f64 + 2.0) * th + ph).cos();
                    }
                    if d < rr {
                        let i = y * n + x;
                        clash |= taken[i];
                        m[i] = 255;
                        area += 1;
                    }
                }
            }
            if clash || area < 30 {
                continue;
            }
            // The object's look: brighter (ct) or darker (mr) than its
            // surroundings, its own texture, a soft rim.
            let contrast = (30.0 + 40.0 * k(6)) * if modality == "ct" { 1.0 } else { -1.0 };
            for i in 0..n * n {
                if m[i] > 0 {
                    taken[i] = true;
                    let t = uni(&[seed, index, 5_000_000 + o * 1_000_000 + i as u64]);
                    px[i] += contrast + 14.0 * (t - 0.5);
                }
            }
            masks.push((class, m));
            break;
        }
    }
    let rgb: Vec<u8> = px
        .iter()
        .flat_map(|&v| {
            let g = v.round().clamp(0.0, 255.0) as u8;
            [g, g, g]
        })
        .collect();
    let dataset = if key == 0 { "Synth" } else { "SynthTest" };
    let name = format!(
        "{modality}_00--{dataset}--case_{:04}--x_{:04}",
        index_name / 8,
        index_name % 8
    );
    (name, rgb, masks)
}

fn save_png(path: &Path, w: usize, h: usize, bytes: &[u8], rgb: bool) -> Result<()> {
    let ct = if rgb {
        image::ExtendedColorType::Rgb8
    } else {
        image::ExtendedColorType::L8
    };
    image::save_buffer(path, bytes, w as u32, h as u32, ct)
        .map_err(|e| Error::Image(format!("{}: {e}", path.display())))
}

/// Writes the data set under `out` (train/ and test/). Images of the test
/// side are drawn from other keys than the training side's: no image is in
/// both.
pub fn write(
    out: &Path,
    o: SynthOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<SynthReport> {
    use rayon::prelude::*;
    let mut rep = SynthReport::default();
    for (split, count, offset) in [
        ("train", o.train_images, 0u64),
        ("test", o.test_images, 1u64 << 40),
    ] {
        let dir = out.join(split);
        for sub in ["images", "masks"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|source| Error::Io {
                path: dir.join(sub),
                source,
            })?;
        }
        let done = std::sync::atomic::AtomicUsize::new(0);
        let items: Vec<(String, Vec<String>)> = (0..count)
            .into_par_iter()
            .map(|i| -> Result<(String, Vec<String>)> {
                let (name, rgb, masks) = image(o.seed, offset, i as u64, o.size);
                let ip = format!("{split}/images/{name}.png");
                save_png(&out.join(&ip), o.size, o.size, &rgb, true)?;
                let mut mp = vec![];
                for (j, (class, m)) in masks.iter().enumerate() {
                    let p = format!("{split}/masks/{name}--{class:04}_{j:03}.png");
                    save_png(&out.join(&p), o.size, o.size, m, false)?;
                    mp.push(p);
                }
                let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                progress(d + 1 + if split == "test" { o.train_images } else { 0 });
                Ok((ip, mp))
            })
            .collect::<Result<_>>()?;
        let masks: usize = items.iter().map(|i| i.1.len()).sum();
        let (json, file) = if split == "train" {
            rep.train_images = items.len();
            rep.train_masks = masks;
            let m: Map<String, Value> = items
                .into_iter()
                .map(|(i, ms)| (i, Value::from(ms)))
                .collect();
            (Value::Object(m), "image2label_train.json")
        } else {
            rep.test_images = items.len();
            rep.test_masks = masks;
            let m: Map<String, Value> = items
                .into_iter()
                .flat_map(|(i, ms)| ms.into_iter().map(move |p| (p, Value::from(i.clone()))))
                .collect();
            (Value::Object(m), "label2image_test.json")
        };
        let p = dir.join(file);
        std::fs::write(&p, serde_json::to_string_pretty(&json).expect("JSON"))
            .map_err(|source| Error::Io { path: p, source })?;
    }
    Ok(rep)
}
