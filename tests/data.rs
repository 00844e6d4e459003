//! `prepare` on the real demo data (SA-Med2D layout) and on a plain folder
//! with every kind of bad item.

mod common;

use std::path::PathBuf;

use sam_unet::data::prepare::{PrepareOptions, Split, discover, prepare};
use sam_unet::io::image::{read_mask, read_rgb};
use sam_unet::preprocess::{ResizeInfo, box_from_mask, resize_image, resize_mask};

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir(&format!("data-{name}"))
}

fn tensor<'a>(st: &'a safetensors::SafeTensors<'a>, name: &str) -> (Vec<usize>, &'a [u8]) {
    let t = st.tensor(name).unwrap();
    (t.shape().to_vec(), t.data())
}

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// data_demo/train: every image and mask kept, and every stored value what
/// inference's preprocessing gives for the original files (image pixels,
/// resized masks, boxes from the largest component at the original size).
#[test]
fn prepare_demo_train_matches_preprocessing() {
    let Some(fx) = common::fixtures() else {
        return;
    };
    let demo = common::data_demo(&fx).join("train");
    let items = discover(&demo, Split::Auto).unwrap();
    let listed: usize = items.iter().map(|i| i.masks.len()).sum();
    assert!(!items.is_empty() && listed > 0);
    let out = tmp("demo");
    let opts = PrepareOptions {
        size: 256,
        shard_images: 2,
    };
    let r = prepare(&items, &out, opts, &|_| {}).unwrap();
    assert!(r.skipped.is_empty(), "{:?}", r.skipped);
    assert_eq!((r.images_kept, r.masks_kept), (items.len(), listed));
    assert_eq!(r.shards, items.len().div_ceil(2));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("index.json")).unwrap()).unwrap();
    let images = index["images"].as_array().unwrap();
    assert_eq!(images.len(), items.len());
    for (item, entry) in items.iter().zip(images) {
        assert_eq!(entry["name"].as_str().unwrap(), item.name);
        assert_eq!(
            entry["modality"], "unknown",
            "data_demo's names carry no grouping"
        );
        let shard = entry["shard"].as_u64().unwrap() as usize;
        let row = entry["row"].as_u64().unwrap() as usize;
        let bytes = std::fs::read(out.join(format!("shard-{shard:05}.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let img = read_rgb(&item.image).unwrap();
        let info = ResizeInfo::new(img.height, img.width, 256).unwrap();
        let (dims, sizes) = tensor(&st, "image_size");
        assert_eq!(dims[1], 4);
        assert_eq!(
            &u32s(sizes)[row * 4..row * 4 + 4],
            &[
                img.height as u32,
                img.width as u32,
                info.new_h as u32,
                info.new_w as u32
            ]
        );
        let (dims, pixels) = tensor(&st, "images");
        assert_eq!(&dims[1..], &[256, 256, 3]);
        let px = &pixels[row * 256 * 256 * 3..(row + 1) * 256 * 256 * 3];
        let resized = resize_image(&img, &info).unwrap();
        for y in 0..256 {
            for x in 0..256 {
                let got = &px[(y * 256 + x) * 3..(y * 256 + x) * 3 + 3];
                if y < info.new_h && x < info.new_w {
                    let o = (y * info.new_w + x) * 3;
                    assert_eq!(got, &resized[o..o + 3], "{} ({x}, {y})", item.name);
                } else {
                    assert_eq!(got, &[0, 0, 0], "padding of {}", item.name);
                }
            }
        }
        // The masks of this image: their rows in this shard, in list order.
        let (_, owner) = tensor(&st, "mask_image");
        let rows: Vec<usize> = u32s(owner)
            .iter()
            .enumerate()
            .filter(|(_, o)| **o as usize == row)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(rows.len(), item.masks.len());
        let (mdims, masks) = tensor(&st, "masks");
        assert_eq!(&mdims[1..], &[256, 256]);
        let boxes = f32s(tensor(&st, "mask_box").1);
        for ((path, _), &k) in item.masks.iter().zip(&rows) {
            let m = read_mask(path).unwrap();
            assert_eq!(
                &boxes[k * 4..k * 4 + 4],
                &box_from_mask(&m).unwrap(),
                "{}",
                path.display()
            );
            let r = resize_mask(&m, &info).unwrap();
            let got = &masks[k * 256 * 256..(k + 1) * 256 * 256];
            for y in 0..256 {
                for x in 0..256 {
                    let want = if y < info.new_h && x < info.new_w {
                        r[y * info.new_w + x]
                    } else {
                        0
                    };
                    assert_eq!(got[y * 256 + x], want, "{} ({x}, {y})", path.display());
                }
            }
        }
    }
}

/// A plain images/ + masks/ folder with one of every kind of bad item: each
/// is skipped with its reason, the rest kept; nothing panics.
#[test]
fn prepare_skips_and_reports_bad_items() {
    let dir = tmp("bad");
    let (im, ms) = common::bad_items_folder(&dir);
    // An image with only bad masks: skipped as having no usable mask.
    common::save_grey(&im.join("c.png"), 64, 48, |x, _| x as u8);
    common::save_grey(&ms.join("c_empty_000.png"), 64, 48, |_, _| 0);
    // "a_b" is also a prefix candidate: the longest stem wins.
    common::save_grey(&im.join("a_b.png"), 20, 20, |_, _| 7);
    common::save_grey(&ms.join("a_b_x_000.png"), 20, 20, |x, _| u8::from(x > 5));

    let items = discover(&dir, Split::Auto).unwrap();
    let names: Vec<(&str, usize)> = items
        .iter()
        .map(|i| (i.name.as_str(), i.masks.len()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("images/a.png", 5),
            ("images/a_b.png", 1),
            ("images/b.png", 1),
            ("images/c.png", 1)
        ]
    );
    let out = tmp("bad-out");
    let r = prepare(&items, &out, PrepareOptions::default(), &|_| {}).unwrap();
    assert_eq!((r.images_kept, r.masks_kept), (2, 2), "{:?}", r.skipped);
    let reason = |p: &str| {
        r.skipped
            .iter()
            .find(|s| s.path == p)
            .map(|s| s.reason.clone())
            .unwrap_or_else(|| panic!("{p} not reported: {:?}", r.skipped))
    };
    assert!(reason("masks/a_empty_000.png").contains("empty mask"));
    assert!(reason("masks/a_soft_000.png").contains("not a binary mask"));
    assert!(reason("masks/a_small_000.png").contains("32 x 24"));
    assert!(reason("masks/a_broken_000.png").contains("cannot decode"));
    assert!(reason("images/b.png").contains("1 masks dropped"));
    assert!(reason("images/c.png").contains("no usable mask"));
    assert_eq!(r.skipped.len(), 7);
    let rep: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("prepare_report.json")).unwrap())
            .unwrap();
    assert_eq!(rep["skipped"].as_array().unwrap().len(), 7);
    assert_eq!(rep["images_kept"], 2);
    assert!(out.join("index.json").is_file());
}

/// Folders that are not data, and ambiguous ones, are clear errors.
#[test]
fn discover_rejects_what_is_not_a_data_folder() {
    let dir = tmp("none");
    let e = discover(&dir.join("missing"), Split::Auto)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such folder"), "{e}");
    let e = discover(&dir, Split::Auto).unwrap_err().to_string();
    assert!(e.contains("neither an SA-Med2D list"), "{e}");
    std::fs::write(dir.join("image2label_train.json"), "{}").unwrap();
    std::fs::write(dir.join("label2image_test.json"), "[1, 2]").unwrap();
    let e = discover(&dir, Split::Auto).unwrap_err().to_string();
    assert!(e.contains("--split"), "{e}");
    assert!(discover(&dir, Split::Train).unwrap().is_empty());
    let e = discover(&dir, Split::Test).unwrap_err().to_string();
    assert!(e.contains("expected an object"), "{e}");
    std::fs::write(dir.join("label2image_test.json"), "{\"m.png\": 3}").unwrap();
    let e = discover(&dir, Split::Test).unwrap_err().to_string();
    assert!(e.contains("neither a path nor a list"), "{e}");
}

/// The loader reads back what `prepare` wrote, as inference would see the
/// original files: the image exactly as `preprocess`, every drawn label one
/// of the image's masks resized, every box that mask's box at the original
/// resolution moved by the authors' jitter, then scaled. Batches do not
/// depend on the thread count and repeat for the same (seed, epoch).
#[test]
fn loader_draws_as_the_authors_dataset() {
    use sam_unet::data::loader::{PreparedSet, epoch_order};
    use sam_unet::preprocess::{box_to_model_frame, preprocess};
    let Some(fx) = common::fixtures() else {
        return;
    };
    let demo = common::data_demo(&fx).join("train");
    let items = discover(&demo, Split::Auto).unwrap();
    let out = tmp("loader");
    prepare(&items, &out, PrepareOptions::default(), &|_| {}).unwrap();
    let set = PreparedSet::open(&out).unwrap();
    assert_eq!(set.len(), items.len());
    let (seed, k) = (3u64, 5usize);
    let mut draws = std::collections::BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        let img = read_rgb(&item.image).unwrap();
        let (want, info) = preprocess(&img, 256).unwrap();
        for epoch in 0..3u64 {
            let (image, boxes, labels) = set.sample(i, seed, epoch, k).unwrap();
            assert_eq!(image, want.as_f32().unwrap(), "{}", item.name);
            for (slot, b) in boxes.iter().enumerate() {
                let label = &labels[slot * 256 * 256..(slot + 1) * 256 * 256];
                // Which mask was drawn: the one whose resized pixels these are.
                let found = item.masks.iter().enumerate().find_map(|(j, (p, _))| {
                    let m = read_mask(p).unwrap();
                    let r = resize_mask(&m, &info).unwrap();
                    let same = (0..256 * 256).all(|q| {
                        let (y, x) = (q / 256, q % 256);
                        let v = if y < info.new_h && x < info.new_w {
                            r[y * info.new_w + x]
                        } else {
                            0
                        };
                        label[q] == v as f32
                    });
                    same.then(|| (j, box_from_mask(&m).unwrap()))
                });
                let (j, ob) = found
                    .unwrap_or_else(|| panic!("{} slot {slot}: not one of its masks", item.name));
                draws.insert((i, epoch, slot, j));
                // Some integer shift within the authors' range gives the box.
                let m = (((ob[2] - ob[0]).min(ob[3] - ob[1]) as f64) * 0.1 * 5.0) as i64;
                let m = m.min(5);
                let range = if m > 0 { -m..m } else { 0..1 };
                let ok = range.clone().any(|dx| {
                    range.clone().any(|dy| {
                        let (dx, dy) = (dx as f32, dy as f32);
                        box_to_model_frame([ob[0] + dx, ob[1] + dy, ob[2] + dx, ob[3] + dy], &info)
                            == *b
                    })
                });
                assert!(
                    ok,
                    "{} slot {slot}: box {b:?} from {ob:?} (m {m})",
                    item.name
                );
            }
        }
    }
    // Draws vary across epochs and slots (with replacement: any mask).
    let distinct: std::collections::BTreeSet<_> = draws.iter().map(|d| (d.0, d.3)).collect();
    assert!(distinct.len() > items.len(), "draws never vary: {draws:?}");
    // Batches: the same bits with one thread or two, and again.
    let ids = epoch_order(set.len(), seed, 1);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let a = one.install(|| set.batch(&ids, seed, 1, k)).unwrap();
    let b = set.batch(&ids, seed, 1, k).unwrap();
    assert_eq!(a.images.as_f32().unwrap(), b.images.as_f32().unwrap());
    assert_eq!(a.boxes, b.boxes);
    for (x, y) in a.labels.iter().zip(&b.labels) {
        assert_eq!(x.as_f32().unwrap(), y.as_f32().unwrap());
    }
    assert_eq!(a.images.dims(), &[set.len(), 3, 256, 256]);
    assert_eq!(a.labels[0].dims(), &[k, 1, 256, 256]);
    // An index that does not describe its shards is refused, naming what is wrong.
    let ip = out.join("index.json");
    let good = std::fs::read_to_string(&ip).unwrap();
    let edits: [(&str, &dyn Fn(&mut serde_json::Value)); 4] = [
        ("version 99", &|v| v["version"] = 99.into()),
        ("size 512", &|v| v["size"] = 512.into()),
        ("row 999 of shard 0", &|v| {
            v["images"][0]["row"] = 999.into()
        }),
        ("size 100", &|v| v["size"] = 100.into()),
    ];
    for (says, edit) in edits {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        edit(&mut v);
        std::fs::write(&ip, v.to_string()).unwrap();
        let e = PreparedSet::open(&out).err().expect(says).to_string();
        assert!(
            e.contains(says) || (says == "size 512" && e.contains("size is 512")),
            "{says}: {e}"
        );
    }
    std::fs::write(&ip, &good).unwrap();
    assert!(PreparedSet::open(&out).is_ok());
    // A missing or corrupt prepared folder is an error, not a panic.
    assert!(PreparedSet::open(&out.join("nope")).is_err());
    std::fs::write(out.join("shard-00000.safetensors"), b"garbage").unwrap();
    assert!(PreparedSet::open(&out).is_err());
}

/// The synthetic data set: deterministic (a seed gives the same files), in
/// the SA-Med2D layout `discover` and `prepare` read, every mask binary and
/// non-empty, names grouped by modality, train and test apart.
#[test]
fn synth_writes_a_preparable_deterministic_set() {
    use sam_unet::data::synth::{SynthOptions, write};
    let o = SynthOptions {
        train_images: 6,
        test_images: 3,
        size: 96,
        seed: 4,
    };
    let (a, b) = (tmp("synth-a"), tmp("synth-b"));
    let ra = write(&a, o, &|_| {}).unwrap();
    write(&b, o, &|_| {}).unwrap();
    assert_eq!((ra.train_images, ra.test_images), (6, 3));
    assert!(ra.train_masks >= 6 && ra.test_masks >= 3);
    let train = discover(&a.join("train"), Split::Auto).unwrap();
    let test = discover(&a.join("test"), Split::Auto).unwrap();
    assert_eq!((train.len(), test.len()), (6, 3));
    for it in train.iter().chain(&test) {
        let other = b.join(it.image.strip_prefix(&a).unwrap());
        assert_eq!(
            std::fs::read(&it.image).unwrap(),
            std::fs::read(other).unwrap()
        );
        let g = sam_unet::data::names::image_group(&it.name);
        assert!(["ct", "mr"].contains(&g.modality.as_str()), "{}", it.name);
        for (p, name) in &it.masks {
            assert!(sam_unet::data::names::mask_class(name).is_some(), "{name}");
            let m = sam_unet::data::prepare::read_mask_strict(p).unwrap();
            assert!(m.data.iter().any(|&v| v != 0));
        }
    }
    let names: Vec<&str> = train.iter().map(|i| i.name.as_str()).collect();
    assert!(test.iter().all(|t| !names.contains(&t.name.as_str())));
    let r = prepare(
        &train,
        &a.join("prepared"),
        PrepareOptions::default(),
        &|_| {},
    )
    .unwrap();
    assert!(r.skipped.is_empty(), "{:?}", r.skipped);
}
