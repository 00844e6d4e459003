//! `prepare`: a segmentation data folder read once, checked, and written as
//! memory-mappable shards in the model's frame, so that training reads no
//! image file.
//!
//! Inputs (`discover`):
//! - the SA-Med2D layout: a JSON object mapping an image to its masks
//!   (`image2label_train.json`, `SAMed2D_v1.json`) or a mask to its image
//!   (`label2image_test.json`), paths relative to the JSON's folder or one of
//!   its parents (whichever holds the first entry);
//! - a plain folder: `images/` and `masks/`, a mask named
//!   `<image stem>_<label>_<nnn>.png` (the longest image stem that prefixes it).
//!
//! Each image is resized to the 256 frame with the same PIL-exact resize as
//! inference and zero-padded; each mask is checked (readable, the image's
//! size, 0/1 or 0/255 only, not empty), its box taken from its largest
//! 8-connected component at the original resolution (max exclusive, as the
//! authors' dataset class), and it is resized like the image (bilinear on
//! 0/1, rounded) and padded. A bad item is skipped and listed in the report
//! with its reason; an image left with no usable mask is skipped too.
//!
//! Output folder: `shard-NNNNN.safetensors` (u8 `images` [n, S, S, 3], u8
//! `masks` [m, S, S] in {0, 1}, u32 `mask_image` [m] (the image's row in the
//! shard), f32 `mask_box` [m, 4] (x0, y0, x1, y1 at the original
//! resolution), u32 `image_size` [n, 4] (H, W, h', w')); `index.json` (every
//! kept image with its modality, dataset, case, shard and row, and its masks'
//! names, classes and boxes), written last, so that its presence means a
//! complete folder; `prepare_report.json` (counts, skipped items, timing).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{Value, json};

use crate::data::names::{image_group, mask_class, stem};
use crate::error::{Error, Result};
use crate::io::image::{Mask, read_rgb};
use crate::io::weights::write_safetensors;
use crate::preprocess::{ResizeInfo, box_from_mask, resize_image, resize_mask};

/// One image and its masks as the data folder lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub image: PathBuf,
    /// The image's name as listed (a relative path in the SA-Med2D layout).
    pub name: String,
    /// (path, name as listed)
    pub masks: Vec<(PathBuf, String)>,
}

/// An input left out, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Which list to read when a folder holds both a train and a test list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Auto,
    Train,
    Test,
}

#[derive(Clone, Copy, Debug)]
pub struct PrepareOptions {
    /// The model frame (256).
    pub size: usize,
    /// Images per shard.
    pub shard_images: usize,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            size: 256,
            shard_images: 256,
        }
    }
}

/// What `prepare` did.
#[derive(Clone, Debug, Default)]
pub struct PrepareReport {
    pub images_listed: usize,
    pub masks_listed: usize,
    pub images_kept: usize,
    pub masks_kept: usize,
    pub shards: usize,
    pub skipped: Vec<Skipped>,
    pub seconds: f64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn bad(op: &'static str, msg: impl Into<String>) -> Error {
    Error::input(op, msg)
}

/// The items of a data folder (or of a JSON list given directly), in the
/// list's order (a plain folder's: by image file name).
pub fn discover(path: &Path, split: Split) -> Result<Vec<Item>> {
    const OP: &str = "prepare";
    if path.is_file() {
        return from_json(path);
    }
    if !path.is_dir() {
        return Err(bad(OP, format!("{}: no such folder", path.display())));
    }
    let train = ["image2label_train.json", "SAMed2D_v1.json"]
        .iter()
        .map(|n| path.join(n))
        .find(|p| p.is_file());
    let test = Some(path.join("label2image_test.json")).filter(|p| p.is_file());
    let chosen = match (split, train, test) {
        (Split::Train, Some(t), _) | (Split::Test, _, Some(t)) => Some(t),
        (Split::Auto, Some(t), None) | (Split::Auto, None, Some(t)) => Some(t),
        (Split::Auto, Some(_), Some(_)) => {
            return Err(bad(
                OP,
                format!(
                    "{} holds a train and a test list: choose one with --split",
                    path.display()
                ),
            ));
        }
        (Split::Train, None, _) | (Split::Test, _, None) if has_plain(path) => None,
        (Split::Train, None, _) | (Split::Test, _, None) => {
            return Err(bad(
                OP,
                format!("{}: no {split:?} list in this folder", path.display()),
            ));
        }
        (Split::Auto, None, None) => None,
    };
    match chosen {
        Some(json) => from_json(&json),
        None if has_plain(path) => plain_folder(path),
        None => Err(bad(
            OP,
            format!(
                "{}: neither an SA-Med2D list (image2label_train.json, label2image_test.json, \
                 SAMed2D_v1.json) nor images/ and masks/ folders",
                path.display()
            ),
        )),
    }
}

fn has_plain(dir: &Path) -> bool {
    dir.join("images").is_dir() && dir.join("masks").is_dir()
}

/// An SA-Med2D JSON list: image -> [masks], or mask -> image.
fn from_json(path: &Path) -> Result<Vec<Item>> {
    const OP: &str = "prepare";
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| bad(OP, format!("{}: not JSON: {e}", path.display())))?;
    let obj = v.as_object().ok_or_else(|| {
        bad(
            OP,
            format!(
                "{}: expected an object of image or mask paths",
                path.display()
            ),
        )
    })?;
    // (image name, mask names) in first-seen order.
    let mut order: Vec<String> = vec![];
    let mut masks: HashMap<String, Vec<String>> = HashMap::new();
    for (k, val) in obj {
        let (image, ms): (&str, Vec<&str>) = match val {
            Value::Array(a) => (
                k.as_str(),
                a.iter()
                    .map(|m| {
                        m.as_str()
                            .ok_or_else(|| bad(OP, format!("{k}: a mask entry is not a path")))
                    })
                    .collect::<Result<_>>()?,
            ),
            Value::String(img) => (img.as_str(), vec![k.as_str()]),
            _ => {
                return Err(bad(
                    OP,
                    format!("{}: entry {k} is neither a path nor a list", path.display()),
                ));
            }
        };
        let e = masks.entry(image.to_string()).or_insert_with(|| {
            order.push(image.to_string());
            vec![]
        });
        e.extend(ms.into_iter().map(str::to_string));
    }
    // The folder the paths are relative to: the JSON's, or a parent's.
    let dir = path.parent().unwrap_or(Path::new("."));
    let base = order
        .first()
        .and_then(|first| {
            dir.ancestors()
                .take(3)
                .find(|b| b.join(first).is_file())
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| dir.to_path_buf());
    Ok(order
        .into_iter()
        .map(|name| {
            let ms = masks.remove(&name).unwrap_or_default();
            Item {
                image: base.join(&name),
                masks: ms.into_iter().map(|m| (base.join(&m), m)).collect(),
                name,
            }
        })
        .collect())
}

/// images/ + masks/, masks `<image stem>_<label>_<nnn>.<ext>`.
fn plain_folder(dir: &Path) -> Result<Vec<Item>> {
    let list = |d: &Path| -> Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .map_err(io_err(d))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        Ok(v)
    };
    let images = list(&dir.join("images"))?;
    let masks = list(&dir.join("masks"))?;
    let mut items: Vec<Item> = images
        .iter()
        .map(|n| Item {
            image: dir.join("images").join(n),
            name: format!("images/{n}"),
            masks: vec![],
        })
        .collect();
    // The longest image stem that prefixes the mask's name, followed by `_`.
    let mut by_len: Vec<(usize, &str)> = images
        .iter()
        .enumerate()
        .map(|(i, n)| (i, stem(n)))
        .collect();
    by_len.sort_by_key(|(_, s)| std::cmp::Reverse(s.len()));
    for m in &masks {
        if let Some(&(i, _)) = by_len
            .iter()
            .find(|(_, s)| m.len() > s.len() && m.starts_with(s) && m[s.len()..].starts_with('_'))
        {
            items[i]
                .masks
                .push((dir.join("masks").join(m), format!("masks/{m}")));
        }
    }
    Ok(items)
}

/// A mask read strictly: a single 0/1 or 0/255 image (any other value is an
/// error that names the values found).
pub fn read_mask_strict(path: &Path) -> Result<Mask> {
    let fail = |msg: String| Error::Mask {
        path: path.to_path_buf(),
        msg,
    };
    let img = image::ImageReader::open(path)
        .map_err(io_err(path))?
        .with_guessed_format()
        .map_err(io_err(path))?
        .decode()
        .map_err(|e| fail(format!("cannot decode: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(fail(format!("empty image ({w} x {h})")));
    }
    let raw = img.to_luma8().into_raw();
    let mut seen = [false; 256];
    raw.iter().for_each(|&v| seen[v as usize] = true);
    let values: Vec<usize> = (0..256).filter(|&v| seen[v]).collect();
    let binary =
        values.iter().all(|&v| v == 0 || v == 1) || values.iter().all(|&v| v == 0 || v == 255);
    if !binary {
        let shown: Vec<String> = values.iter().take(6).map(|v| v.to_string()).collect();
        return Err(fail(format!(
            "not a binary mask: values {}{}",
            shown.join(", "),
            if values.len() > 6 { ", ..." } else { "" }
        )));
    }
    Ok(Mask {
        width: w,
        height: h,
        data: raw.into_iter().map(|v| u8::from(v > 0)).collect(),
    })
}

/// One image ready for a shard.
struct Prepared {
    name: String,
    /// [S, S, 3]
    image: Vec<u8>,
    info: ResizeInfo,
    /// (name, [S, S] in {0, 1}, box at the original resolution)
    masks: Vec<(String, Vec<u8>, [f32; 4])>,
}

/// Reads, checks and resizes one item; what is wrong is returned as skipped.
fn prepare_item(item: &Item, size: usize) -> (Option<Prepared>, Vec<Skipped>) {
    let mut skipped = vec![];
    let img = match read_rgb(&item.image) {
        Ok(i) => i,
        Err(e) => {
            skipped.push(Skipped {
                path: item.name.clone(),
                reason: format!("{} ({} masks dropped with it)", e.full(), item.masks.len()),
            });
            return (None, skipped);
        }
    };
    let prep = (|| -> Result<(ResizeInfo, Vec<u8>)> {
        let info = ResizeInfo::new(img.height, img.width, size)?;
        let r = resize_image(&img, &info)?;
        Ok((info, pad(&r, info.new_h, info.new_w, 3, size)))
    })();
    let (info, image) = match prep {
        Ok(p) => p,
        Err(e) => {
            skipped.push(Skipped {
                path: item.name.clone(),
                reason: e.full(),
            });
            return (None, skipped);
        }
    };
    let mut masks = vec![];
    for (path, name) in &item.masks {
        let one = (|| -> Result<(Vec<u8>, [f32; 4])> {
            let m = read_mask_strict(path)?;
            if (m.height, m.width) != (img.height, img.width) {
                return Err(bad(
                    "prepare",
                    format!(
                        "mask {} x {} for an image of {} x {}",
                        m.width, m.height, img.width, img.height
                    ),
                ));
            }
            let b = box_from_mask(&m).ok_or_else(|| bad("prepare", "empty mask"))?;
            let r = resize_mask(&m, &info)?;
            Ok((pad(&r, info.new_h, info.new_w, 1, size), b))
        })();
        match one {
            Ok((m, b)) => masks.push((name.clone(), m, b)),
            Err(e) => skipped.push(Skipped {
                path: name.clone(),
                reason: e.full(),
            }),
        }
    }
    if masks.is_empty() {
        skipped.push(Skipped {
            path: item.name.clone(),
            reason: "no usable mask".into(),
        });
        return (None, skipped);
    }
    (
        Some(Prepared {
            name: item.name.clone(),
            image,
            info,
            masks,
        }),
        skipped,
    )
}

/// h x w x c values zero-padded bottom / right to size x size x c.
fn pad(v: &[u8], h: usize, w: usize, c: usize, size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size * size * c];
    for y in 0..h {
        out[y * size * c..(y * size + w) * c].copy_from_slice(&v[y * w * c..(y + 1) * w * c]);
    }
    out
}

/// Prepares `items` into `out` (created if missing). `progress` is called
/// with the number of images done after each one.
pub fn prepare(
    items: &[Item],
    out: &Path,
    opts: PrepareOptions,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<PrepareReport> {
    const OP: &str = "prepare";
    if opts.shard_images == 0 {
        return Err(bad(OP, "images per shard must be positive"));
    }
    crate::model::config::check_img_size(opts.size)
        .map_err(|e| bad(OP, &format!("size (the model frame): {e}")))?;
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    // An old index would describe other shards: remove it first, so that a
    // failed run leaves no index.
    let index_path = out.join("index.json");
    if index_path.exists() {
        std::fs::remove_file(&index_path).map_err(io_err(&index_path))?;
    }
    let mut report = PrepareReport {
        images_listed: items.len(),
        masks_listed: items.iter().map(|i| i.masks.len()).sum(),
        ..Default::default()
    };
    let done = std::sync::atomic::AtomicUsize::new(0);
    let mut index_images: Vec<Value> = vec![];
    let mut shard_rows: Vec<Value> = vec![];
    // Shards of `shard_images` kept images, filled in list order.
    let mut pending: Vec<Prepared> = vec![];
    let mut write_shard = |pending: &mut Vec<Prepared>, report: &mut PrepareReport| -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let k = report.shards;
        let file = format!("shard-{k:05}.safetensors");
        let s = opts.size;
        let (n, m) = (
            pending.len(),
            pending.iter().map(|p| p.masks.len()).sum::<usize>(),
        );
        let mut images = Vec::with_capacity(n * s * s * 3);
        let mut sizes = Vec::with_capacity(n * 16);
        let mut masks = Vec::with_capacity(m * s * s);
        let mut mask_image = Vec::with_capacity(m * 4);
        let mut boxes = Vec::with_capacity(m * 16);
        for (row, p) in pending.iter().enumerate() {
            images.extend_from_slice(&p.image);
            for v in [p.info.orig_h, p.info.orig_w, p.info.new_h, p.info.new_w] {
                sizes.extend_from_slice(&(v as u32).to_le_bytes());
            }
            let g = image_group(&p.name);
            let mut mask_rows = vec![];
            for (name, data, b) in &p.masks {
                masks.extend_from_slice(data);
                mask_image.extend_from_slice(&(row as u32).to_le_bytes());
                b.iter()
                    .for_each(|v| boxes.extend_from_slice(&v.to_le_bytes()));
                let class = mask_class(name);
                mask_rows.push(json!({
                    "name": name,
                    "class": class.map(|c| c.0),
                    "instance": class.map(|c| c.1),
                    "box": b,
                }));
            }
            index_images.push(json!({
                "name": p.name,
                "modality": g.modality,
                "dataset": g.dataset,
                "case": g.case,
                "shard": k,
                "row": row,
                "size": [p.info.orig_h, p.info.orig_w],
                "masks": mask_rows,
            }));
        }
        use safetensors::Dtype;
        write_safetensors(
            &out.join(&file),
            &[
                ("images".into(), Dtype::U8, vec![n, s, s, 3], images),
                ("image_size".into(), Dtype::U32, vec![n, 4], sizes),
                ("masks".into(), Dtype::U8, vec![m, s, s], masks),
                ("mask_image".into(), Dtype::U32, vec![m], mask_image),
                ("mask_box".into(), Dtype::F32, vec![m, 4], boxes),
            ],
        )?;
        shard_rows.push(json!({"file": file, "images": n, "masks": m}));
        report.images_kept += n;
        report.masks_kept += m;
        report.shards += 1;
        pending.clear();
        Ok(())
    };
    for block in items.chunks(opts.shard_images) {
        let results: Vec<(Option<Prepared>, Vec<Skipped>)> = block
            .par_iter()
            .map(|it| {
                let r = prepare_item(it, opts.size);
                progress(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
                r
            })
            .collect();
        for (p, s) in results {
            report.skipped.extend(s);
            if let Some(p) = p {
                pending.push(p);
                if pending.len() == opts.shard_images {
                    write_shard(&mut pending, &mut report)?;
                }
            }
        }
    }
    write_shard(&mut pending, &mut report)?;
    report.seconds = t0.elapsed().as_secs_f64();
    let rep = json!({
        "images_listed": report.images_listed,
        "masks_listed": report.masks_listed,
        "images_kept": report.images_kept,
        "masks_kept": report.masks_kept,
        "shards": report.shards,
        "seconds": report.seconds,
        "threads": rayon::current_num_threads(),
        "skipped": report.skipped.iter().map(|s| json!({"path": s.path, "reason": s.reason})).collect::<Vec<_>>(),
    });
    write_json(&out.join("prepare_report.json"), &rep)?;
    let index = json!({
        "format": "sam-unet prepared data",
        "version": 1,
        "size": opts.size,
        "shards": shard_rows,
        "images": index_images,
    });
    write_json(&index_path, &index)?;
    Ok(report)
}

/// Writes JSON atomically (a temporary file, then a rename).
fn write_json(path: &Path, v: &Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| bad("prepare", format!("{}: {e}", path.display())))?;
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}
