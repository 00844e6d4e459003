//! The online loader over prepared shards (prepare.rs), as the authors'
//! dataset class samples: per image, 5 masks drawn with replacement, each
//! box jittered at the original resolution (MODEL.md: noise_std =
//! min(w, h) x 0.1, m = min(5, int(noise_std x 5)), dx, dy uniform in
//! [-m, m - 1], both corners moved together) and then scaled to the model frame, never
//! clipped. Every random number is keyed by (seed, epoch, image, slot), so
//! a batch depends on nothing else: not on the number of loader threads,
//! not on what was loaded before (a resume needs no hidden state).

use std::path::Path;

use memmap2::Mmap;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::preprocess::{PIXEL_MEAN, PIXEL_STD, ResizeInfo, box_to_model_frame};
use crate::tensor::Tensor;
use crate::train::Batch;

/// A counter-based random number: SplitMix64's finaliser over the key's
/// words chained, so that (seed, epoch, image, slot) gives the same number
/// on every machine and thread.
pub fn keyed(key: &[u64]) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64;
    for &k in key {
        h = mix(h ^ mix(k.wrapping_add(0x9E37_79B9_7F4A_7C15)));
    }
    h
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform integer in [0, n) from a keyed number (n > 0; the modulo bias
/// is below 2^-40 for any n a data set has).
fn below(r: u64, n: usize) -> usize {
    (r % n as u64) as usize
}

/// One prepared image as the index describes it.
#[derive(Clone, Debug)]
pub struct ImageEntry {
    pub name: String,
    pub modality: String,
    pub dataset: String,
    pub case: String,
    pub shard: usize,
    pub row: usize,
    /// Its masks' rows in the shard, in list order.
    pub masks: Vec<usize>,
}

struct Shard {
    map: Mmap,
    /// Byte offsets of the tensors in the file.
    images: usize,
    sizes: usize,
    masks: usize,
    boxes: usize,
    n_images: usize,
    n_masks: usize,
}

/// A prepared folder, memory-mapped.
pub struct PreparedSet {
    pub size: usize,
    pub images: Vec<ImageEntry>,
    shards: Vec<Shard>,
}

fn bad(msg: String) -> Error {
    Error::input("prepared data", msg)
}

impl PreparedSet {
    /// Opens a folder written by `prepare` (its index.json and shards).
    pub fn open(dir: &Path) -> Result<Self> {
        let ip = dir.join("index.json");
        let text = std::fs::read_to_string(&ip).map_err(|source| Error::Io {
            path: ip.clone(),
            source,
        })?;
        let index: Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{}: not JSON: {e}", ip.display())))?;
        // What this reader understands: prepare's version 1.
        match index["version"].as_u64() {
            Some(1) => {}
            v => {
                return Err(bad(format!(
                    "{}: version {}; this build reads version 1 (prepare the data again)",
                    ip.display(),
                    v.map_or("missing".to_string(), |v| v.to_string())
                )));
            }
        }
        let size = index["size"]
            .as_u64()
            .ok_or_else(|| bad(format!("{}: no size", ip.display())))? as usize;
        crate::model::config::check_img_size(size)
            .map_err(|e| bad(format!("{}: size {size}: {e}", ip.display())))?;
        let mut shards = vec![];
        for s in index["shards"].as_array().into_iter().flatten() {
            let file = s["file"]
                .as_str()
                .ok_or_else(|| bad(format!("{}: a shard without a file", ip.display())))?;
            shards.push(Shard::open(&dir.join(file), size)?);
        }
        let mut images = vec![];
        let mut mask_row = vec![0usize; shards.len()];
        for e in index["images"].as_array().into_iter().flatten() {
            let s = |k: &str| {
                e[k].as_str()
                    .unwrap_or(crate::data::names::UNKNOWN)
                    .to_string()
            };
            let shard = e["shard"].as_u64().unwrap_or(u64::MAX) as usize;
            let row = e["row"].as_u64().unwrap_or(u64::MAX) as usize;
            let n = e["masks"].as_array().map_or(0, Vec::len);
            if shard >= shards.len() || n == 0 {
                return Err(bad(format!(
                    "{}: image {} has no shard or no mask",
                    ip.display(),
                    s("name")
                )));
            }
            // prepare writes an image's masks together, in image order.
            let first = mask_row[shard];
            mask_row[shard] += n;
            images.push(ImageEntry {
                name: s("name"),
                modality: s("modality"),
                dataset: s("dataset"),
                case: s("case"),
                shard,
                row,
                masks: (first..first + n).collect(),
            });
        }
        for e in &images {
            let n = shards[e.shard].n_images;
            if e.row >= n {
                return Err(bad(format!(
                    "{}: image {} is row {} of shard {}, which holds {n} images",
                    ip.display(),
                    e.name,
                    e.row,
                    e.shard
                )));
            }
        }
        for (k, sh) in shards.iter().enumerate() {
            if sh.n_masks != mask_row[k] {
                return Err(bad(format!(
                    "{}: shard {k} holds {} masks, the index lists {}",
                    ip.display(),
                    sh.n_masks,
                    mask_row[k]
                )));
            }
        }
        let set = PreparedSet {
            size,
            images,
            shards,
        };
        // The boxes the loader prompts with: inside their image, not empty.
        for (i, e) in set.images.iter().enumerate() {
            let info = set.info(i)?;
            for &m in &e.masks {
                let b = set.shards[e.shard].mask_box(m);
                crate::preprocess::validate_box(m, b, &info).map_err(|err| {
                    bad(format!(
                        "{}: image {}: mask {m} of shard {}: {err}",
                        ip.display(),
                        e.name,
                        e.shard
                    ))
                })?;
            }
        }
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The sizes of image `i`: (H, W, h', w').
    fn info(&self, i: usize) -> Result<ResizeInfo> {
        let e = &self.images[i];
        let sh = &self.shards[e.shard];
        let v = |j: usize| -> usize {
            let o = sh.sizes + (e.row * 4 + j) * 4;
            u32::from_le_bytes(sh.map[o..o + 4].try_into().expect("4 bytes")) as usize
        };
        let info = ResizeInfo::new(v(0), v(1), self.size)?;
        if (info.new_h, info.new_w) != (v(2), v(3)) {
            return Err(bad(format!("{}: stored sizes disagree", e.name)));
        }
        Ok(info)
    }

    /// Image `i` drawn for (seed, epoch): the normalised, zero-padded image
    /// [3, S, S], `k` masks drawn with replacement with their jittered boxes
    /// (model frame) and labels [k, S, S] in {0, 1}.
    pub fn sample(
        &self,
        i: usize,
        seed: u64,
        epoch: u64,
        k: usize,
    ) -> Result<(Vec<f32>, Vec<[f32; 4]>, Vec<f32>)> {
        let e = self
            .images
            .get(i)
            .ok_or_else(|| bad(format!("image {i} of {}", self.images.len())))?;
        let sh = &self.shards[e.shard];
        let s = self.size;
        let info = self.info(i)?;
        let px = &sh.map[sh.images + e.row * s * s * 3..sh.images + (e.row + 1) * s * s * 3];
        let mut image = vec![0.0f32; 3 * s * s];
        for y in 0..info.new_h {
            for x in 0..info.new_w {
                for c in 0..3 {
                    image[c * s * s + y * s + x] =
                        (px[(y * s + x) * 3 + c] as f32 - PIXEL_MEAN[c]) / PIXEL_STD[c];
                }
            }
        }
        let mut boxes = Vec::with_capacity(k);
        let mut labels = vec![0.0f32; k * s * s];
        for slot in 0..k {
            let key = [seed, epoch, i as u64, slot as u64];
            let m = e.masks[below(keyed(&[key[0], key[1], key[2], key[3], 0]), e.masks.len())];
            let b = sh.mask_box(m);
            let (dx, dy) = jitter(b, keyed(&[key[0], key[1], key[2], key[3], 1]));
            let jb = [b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy];
            boxes.push(box_to_model_frame(jb, &info));
            let mo = sh.masks + m * s * s;
            for (l, &v) in labels[slot * s * s..(slot + 1) * s * s]
                .iter_mut()
                .zip(&sh.map[mo..mo + s * s])
            {
                *l = v as f32;
            }
        }
        Ok((image, boxes, labels))
    }

    /// Image `i` as the test protocol takes it (EVAL.md): the normalised,
    /// padded image [3, S, S], every mask's box without jitter (model
    /// frame), the masks [m, S, S] in {0, 1}, and the valid region h' x w'.
    pub fn eval_item(&self, i: usize) -> Result<EvalItem> {
        let e = self
            .images
            .get(i)
            .ok_or_else(|| bad(format!("image {i} of {}", self.images.len())))?;
        let (image, _, _) = self.sample(i, 0, 0, 0)?;
        let sh = &self.shards[e.shard];
        let (s, info) = (self.size, self.info(i)?);
        let mut boxes = Vec::with_capacity(e.masks.len());
        let mut masks = Vec::with_capacity(e.masks.len() * s * s);
        for &m in &e.masks {
            let b = sh.mask_box(m);
            boxes.push(box_to_model_frame(b, &info));
            masks.extend_from_slice(&sh.map[sh.masks + m * s * s..sh.masks + (m + 1) * s * s]);
        }
        Ok(EvalItem {
            image,
            boxes,
            masks,
            valid: (info.new_h, info.new_w),
        })
    }

    /// A training batch of images `ids` for (seed, epoch), k masks each.
    pub fn batch(&self, ids: &[usize], seed: u64, epoch: u64, k: usize) -> Result<Batch> {
        use rayon::prelude::*;
        let s = self.size;
        let parts: Vec<_> = ids
            .par_iter()
            .map(|&i| self.sample(i, seed, epoch, k))
            .collect::<Result<_>>()?;
        let mut images = Vec::with_capacity(ids.len() * 3 * s * s);
        let (mut boxes, mut labels) = (vec![], vec![]);
        for (im, b, l) in parts {
            images.extend_from_slice(&im);
            boxes.push(b);
            labels.push(Tensor::from_vec(l, [k, 1, s, s])?);
        }
        Ok(Batch {
            images: Tensor::from_vec(images, [ids.len(), 3, s, s])?,
            boxes,
            labels,
        })
    }
}

/// One image for evaluation (PreparedSet::eval_item).
pub struct EvalItem {
    /// [3, S, S], normalised and zero-padded
    pub image: Vec<f32>,
    /// per mask, (x0, y0, x1, y1) in the model frame, no jitter
    pub boxes: Vec<[f32; 4]>,
    /// [m, S, S] in {0, 1}
    pub masks: Vec<u8>,
    /// (h', w'): the image's region of the S x S frame
    pub valid: (usize, usize),
}

/// The authors' box jitter from one keyed number: noise_std = min(w, h) *
/// 0.1, m = min(5, int(noise_std * 5)), dx and dy uniform integers in
/// [-m, m - 1] (0 when m is 0).
pub fn jitter(b: [f32; 4], r: u64) -> (f32, f32) {
    // Python floats (f64), int() truncating, as the reference computes it.
    let (w, h) = ((b[2] - b[0]) as f64, (b[3] - b[1]) as f64);
    let noise_std = w.min(h) * 0.1;
    let m = ((noise_std * 5.0) as i64).min(5);
    if m <= 0 {
        return (0.0, 0.0);
    }
    let span = (2 * m) as usize;
    let dx = below(r & 0xFFFF_FFFF, span) as i64 - m;
    let dy = below(r >> 32, span) as i64 - m;
    (dx as f32, dy as f32)
}

/// The order of the images in an epoch: a Fisher-Yates shuffle keyed by
/// (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = below(keyed(&[seed, epoch, i as u64, u64::MAX]), i + 1);
        v.swap(i, j);
    }
    v
}

impl Shard {
    /// Mask `m`'s box (x0, y0, x1, y1) at the original resolution.
    fn mask_box(&self, m: usize) -> [f32; 4] {
        let o = self.boxes + m * 16;
        std::array::from_fn(|j| {
            f32::from_le_bytes(
                self.map[o + j * 4..o + j * 4 + 4]
                    .try_into()
                    .expect("4 bytes"),
            )
        })
    }

    fn open(path: &Path, size: usize) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: a shard is read-only input that `prepare` wrote whole
        // (atomically); its header and every tensor's extent are checked
        // against the mapping below before any read.
        let map = unsafe { Mmap::map(&f) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (images, sizes, masks, boxes, n_images, n_masks) = {
            let st = safetensors::SafeTensors::deserialize(&map)
                .map_err(|e| bad(format!("{}: {e}", path.display())))?;
            let base = map.as_ptr() as usize;
            let get = |name: &str,
                       ok: &dyn Fn(&[usize]) -> bool,
                       want: &str|
             -> Result<(usize, usize)> {
                let t = st
                    .tensor(name)
                    .map_err(|e| bad(format!("{}: {name}: {e}", path.display())))?;
                if !ok(t.shape()) {
                    return Err(bad(format!(
                        "{}: {name} has shape {:?}, expected {want} (the index's size is {size})",
                        path.display(),
                        t.shape()
                    )));
                }
                Ok((t.data().as_ptr() as usize - base, t.shape()[0]))
            };
            let (images, n_images) = get(
                "images",
                &|d| d.len() == 4 && d[1..] == [size, size, 3],
                "[N, size, size, 3]",
            )?;
            let (sizes, n_sizes) = get("image_size", &|d| d.len() == 2 && d[1] == 4, "[N, 4]")?;
            let (masks, n_masks) = get(
                "masks",
                &|d| d.len() == 3 && d[1..] == [size, size],
                "[M, size, size]",
            )?;
            let (boxes, n_boxes) = get("mask_box", &|d| d.len() == 2 && d[1] == 4, "[M, 4]")?;
            if n_sizes != n_images || n_boxes != n_masks {
                return Err(bad(format!(
                    "{}: tensors of different lengths",
                    path.display()
                )));
            }
            (images, sizes, masks, boxes, n_images, n_masks)
        };
        Ok(Shard {
            map,
            images,
            sizes,
            masks,
            boxes,
            n_images,
            n_masks,
        })
    }
}

/// How a training / validation split groups images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitBy {
    /// Image by image, as the authors split (slices of one case land on
    /// both sides).
    Image,
    /// By `dataset--case` (EVAL.md): every slice of a case on one side. An
    /// image whose name carries no case is a case of its own.
    Case,
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// (training, validation) image indices: per modality, its units (images, or
/// cases) in a keyed shuffle, the first round(fraction x units) for
/// training; each side sorted.
pub fn split(
    images: &[ImageEntry],
    train_fraction: f64,
    by: SplitBy,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    use std::collections::BTreeMap;
    // modality -> unit -> images
    let mut groups: BTreeMap<&str, BTreeMap<String, Vec<usize>>> = BTreeMap::new();
    for (i, e) in images.iter().enumerate() {
        let unit = match by {
            SplitBy::Case if e.case != crate::data::names::UNKNOWN => {
                format!("{}--{}", e.dataset, e.case)
            }
            _ => format!("#{i}"),
        };
        groups
            .entry(e.modality.as_str())
            .or_default()
            .entry(unit)
            .or_default()
            .push(i);
    }
    let (mut train, mut val) = (vec![], vec![]);
    for (modality, units) in groups {
        let mut units: Vec<Vec<usize>> = units.into_values().collect();
        let n = units.len();
        for i in (1..n).rev() {
            let j = below(keyed(&[seed, fnv(modality), i as u64, u64::MAX - 1]), i + 1);
            units.swap(i, j);
        }
        let k = ((train_fraction * n as f64).round() as usize).min(n);
        for (u, members) in units.into_iter().enumerate() {
            if u < k {
                train.extend(members);
            } else {
                val.extend(members);
            }
        }
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_follows_the_authors_formula() {
        // w = h = 4: noise_std 0.4, m = int(2.0) = 2: dx, dy in [-2, 1].
        let mut seen = std::collections::BTreeSet::new();
        for r in 0..400u64 {
            let (dx, dy) = jitter([10.0, 10.0, 14.0, 14.0], keyed(&[r]));
            assert!((-2.0..=1.0).contains(&dx) && (-2.0..=1.0).contains(&dy));
            seen.insert(dx as i64);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![-2, -1, 0, 1]);
        // A 1-pixel-wide box: m = int(0.5) = 0, no jitter.
        assert_eq!(jitter([0.0, 0.0, 1.0, 50.0], 12345), (0.0, 0.0));
        // A large box: m = 5.
        let all: Vec<f32> = (0..400u64)
            .map(|r| jitter([0.0, 0.0, 200.0, 300.0], keyed(&[r])).0)
            .collect();
        assert_eq!(all.iter().cloned().fold(f32::MAX, f32::min), -5.0);
        assert_eq!(all.iter().cloned().fold(f32::MIN, f32::max), 4.0);
    }

    #[test]
    fn epoch_order_is_a_keyed_permutation() {
        let a = epoch_order(50, 7, 0);
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 7, 0));
        assert_ne!(a, epoch_order(50, 7, 1));
        assert_ne!(a, epoch_order(50, 8, 0));
    }

    fn entry(i: usize, modality: &str, case: &str) -> ImageEntry {
        ImageEntry {
            name: format!("{i}"),
            modality: modality.into(),
            dataset: "D".into(),
            case: case.into(),
            shard: 0,
            row: i,
            masks: vec![0],
        }
    }

    #[test]
    fn split_per_modality_and_by_case() {
        // 10 ct images in 5 cases of 2 slices, 5 mr images without cases.
        let mut v: Vec<ImageEntry> = (0..10)
            .map(|i| entry(i, "ct", &format!("c{}", i / 2)))
            .collect();
        v.extend((10..15).map(|i| entry(i, "mr", crate::data::names::UNKNOWN)));
        let (t, e) = split(&v, 0.8, SplitBy::Image, 0);
        assert_eq!((t.len(), e.len()), (12, 3)); // 8 + 4 of 10 + 5
        let (t, e) = split(&v, 0.8, SplitBy::Case, 0);
        assert_eq!((t.len(), e.len()), (12, 3)); // 4 cases x 2 + 4
        for c in 0..5 {
            let sides: Vec<bool> = (2 * c..2 * c + 2).map(|i| t.contains(&i)).collect();
            assert_eq!(sides[0], sides[1], "case c{c} split across sides");
        }
        assert_eq!(split(&v, 0.8, SplitBy::Case, 0), (t.clone(), e.clone()));
        assert_ne!(
            split(&v, 0.8, SplitBy::Image, 1).0,
            split(&v, 0.8, SplitBy::Image, 2).0
        );
    }
}
