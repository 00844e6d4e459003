//! Shared helpers of the golden tests: finding the fixtures, reading them
//! (including u8 tensors and metadata), and the fixtures README's comparisons.
#![allow(dead_code)]

pub mod run;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Names of the test processes' scratch folders in the system's temp folder.
const SCRATCH_PREFIX: &str = "sam-unet-tests-";

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

unsafe extern "C" {
    fn atexit(f: extern "C" fn()) -> std::ffi::c_int;
}

extern "C" fn remove_scratch() {
    if let Some(d) = SCRATCH.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// This test process's scratch folder, `$TMPDIR/sam-unet-tests-<pid>`, made at
/// first use: every test's files go under it, and it is removed when the
/// process exits, whether its tests passed or failed (SAM_UNET_KEEP_TMP=1
/// keeps it for a look). Each test run used to leave its files behind, ~2.5 GB
/// a run (the training tests' checkpoints, prepared shards). Folders of earlier
/// test processes that are gone (killed before they could clean up) are
/// removed at first use too, once an hour old.
pub fn scratch() -> &'static Path {
    SCRATCH.get_or_init(|| {
        let tmp = std::env::temp_dir();
        remove_dead_scratch(&tmp);
        let d = tmp.join(format!("{SCRATCH_PREFIX}{}", std::process::id()));
        // A folder of this name is a killed process's whose pid came back.
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let keep = std::env::var("SAM_UNET_KEEP_TMP").is_ok_and(|v| !v.is_empty() && v != "0");
        if !keep {
            // SAFETY: registers a plain function with the C runtime; it runs at
            // exit, after the tests, and only removes the folder named in a
            // static that is set before the registration.
            unsafe { atexit(remove_scratch) };
        }
        d
    })
}

/// A fresh, empty folder `name` in this process's scratch folder.
pub fn scratch_dir(name: &str) -> PathBuf {
    let d = scratch().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Removes the scratch folders, older than an hour, of test processes that no
/// longer run (Linux: no /proc/<pid>); elsewhere it cannot tell and removes
/// nothing.
fn remove_dead_scratch(tmp: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // An hour old too: a process in another PID namespace that shares
        // this temp folder looks dead from here.
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > 3600);
        if old && pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

use safetensors::{Dtype, SafeTensors};

/// The fixtures folder, or None (with a printed reason) when it is missing
/// outside CI. With CI=true a missing fixture fails the test.
pub fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var("SAM_UNET_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("../shared/fixtures"));
    if dir.join("README.md").exists() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!(
            "fixtures not found at {} (CI=true: a missing fixture is a failure)",
            dir.display()
        );
    }
    eprintln!(
        "SKIPPED: fixtures not found at {} (set SAM_UNET_FIXTURES)",
        dir.display()
    );
    None
}

/// A fixture file that must exist once the folder does.
pub fn fixture(dir: &std::path::Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    assert!(p.exists(), "fixture {} is missing", p.display());
    p
}

/// The demo data next to the fixtures (../data_demo).
pub fn data_demo(fixtures: &std::path::Path) -> PathBuf {
    let p = fixtures.join("../data_demo");
    assert!(p.exists(), "data_demo not found at {}", p.display());
    p
}

pub struct Fixture {
    pub f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub u8s: HashMap<String, (Vec<usize>, Vec<u8>)>,
    pub meta: HashMap<String, String>,
}

impl Fixture {
    pub fn load(path: &std::path::Path) -> Fixture {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, md) = SafeTensors::read_metadata(&bytes).expect("fixture header");
        let meta = md.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).expect("fixture");
        let mut f32s = HashMap::new();
        let mut u8s = HashMap::new();
        for (name, v) in st.tensors() {
            let shape = v.shape().to_vec();
            let d = v.data();
            match v.dtype() {
                Dtype::F32 => {
                    f32s.insert(
                        name,
                        (
                            shape,
                            d.chunks_exact(4)
                                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                                .collect(),
                        ),
                    );
                }
                Dtype::F16 => {
                    f32s.insert(
                        name,
                        (
                            shape,
                            d.chunks_exact(2)
                                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                                .collect(),
                        ),
                    );
                }
                Dtype::F64 => {
                    f32s.insert(
                        name,
                        (
                            shape,
                            d.chunks_exact(8)
                                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                                .collect(),
                        ),
                    );
                }
                Dtype::U8 | Dtype::BOOL => {
                    u8s.insert(name, (shape, d.to_vec()));
                }
                other => panic!("fixture tensor {name}: dtype {other:?}"),
            }
        }
        Fixture { f32s, u8s, meta }
    }

    pub fn f(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.f32s
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor `{name}` missing"))
    }

    pub fn u(&self, name: &str) -> &(Vec<usize>, Vec<u8>) {
        self.u8s
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor `{name}` missing"))
    }

    pub fn tensor(&self, name: &str) -> sam_unet::Tensor {
        let (s, v) = self.f(name);
        sam_unet::Tensor::from_vec(v.clone(), s.clone()).unwrap()
    }
}

/// Relative L2 error |a - b| / |b|, and max |a - b|, and max |b|.
/// Relative L2 error of `got` against `want` (f64 sums).
#[allow(dead_code)]
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (&a, &b) in got.iter().zip(want) {
        d += (a as f64 - b as f64).powi(2);
        n += (b as f64).powi(2);
    }
    (d / n.max(1e-300)).sqrt()
}

pub fn errors(got: &[f32], want: &[f32]) -> (f64, f64, f64) {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let (mut num, mut den, mut maxd, mut maxr) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&a, &b) in got.iter().zip(want) {
        let d = (a as f64 - b as f64).abs();
        num += d * d;
        den += (b as f64) * (b as f64);
        maxd = maxd.max(d);
        maxr = maxr.max((b as f64).abs());
        assert!(a.is_finite(), "non-finite output");
    }
    ((num / den.max(1e-300)).sqrt(), maxd, maxr)
}

/// The intermediate tolerance of the fixtures README:
/// max |a - b| <= 1e-3 max(1, max |ref|) and relative L2 <= 1e-4.
pub fn check_intermediate(
    name: &str,
    got: &sam_unet::Tensor,
    want: &(Vec<usize>, Vec<f32>),
) -> f64 {
    assert_eq!(got.dims(), want.0.as_slice(), "{name}: shape");
    let (rel, maxd, maxr) = errors(got.as_f32().unwrap(), &want.1);
    println!("{name:24} rel L2 {rel:.2e}  max abs {maxd:.2e}  (max |ref| {maxr:.3})");
    assert!(
        maxd <= 1e-3 * maxr.max(1.0),
        "{name}: max abs error {maxd} > {}",
        1e-3 * maxr.max(1.0)
    );
    assert!(rel <= 1e-4, "{name}: relative L2 error {rel} > 1e-4");
    rel
}

/// The fixture's batch: resized RGB [3, h', w'] normalised and padded to
/// 256, the boxes (model frame) and the labels.
pub fn train_batch(fx: &Fixture) -> sam_unet::train::Batch {
    use sam_unet::preprocess::{PIXEL_MEAN, PIXEL_STD};
    let s = 256;
    let mut images = vec![0.0f32; 2 * 3 * s * s];
    let (mut boxes, mut labels) = (vec![], vec![]);
    for i in 0..2 {
        let (d, v) = fx.f(&format!("image{i}"));
        let (h, w) = (d[1], d[2]);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    images[((i * 3 + c) * s + y) * s + x] =
                        (v[(c * h + y) * w + x] - PIXEL_MEAN[c]) / PIXEL_STD[c];
                }
            }
        }
        let (_, b) = fx.f(&format!("boxes{i}"));
        boxes.push(
            b.chunks_exact(4)
                .map(|q| [q[0], q[1], q[2], q[3]])
                .collect(),
        );
        labels.push(fx.tensor(&format!("labels{i}")));
    }
    sam_unet::train::Batch {
        images: sam_unet::Tensor::from_vec(images, [2, 3, s, s]).unwrap(),
        boxes,
        labels,
    }
}

/// The fixture's BatchNorm buffer keys in module order: (running_mean,
/// running_var) per layer.
pub fn bn_names(fx: &Fixture, prefix: &str) -> Vec<String> {
    let mut layers: Vec<String> = fx
        .f32s
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|k| k.strip_suffix(".running_mean"))
        .map(str::to_string)
        .collect();
    // Module order: stage0, then stage1.0.bn1, bn2, (downsample.1), ...
    layers.sort_by_key(|l| {
        let parts: Vec<&str> = l.split('.').collect();
        let stage: usize = parts[1].trim_start_matches("stage").parse().unwrap_or(0);
        let block: usize = parts.get(2).and_then(|b| b.parse().ok()).unwrap_or(0);
        let within = match parts.get(3).copied() {
            Some("bn1") => 1,
            Some("bn2") => 2,
            Some("bn3") => 3,
            Some("downsample") => 4,
            _ => 0,
        };
        (stage, if stage == 0 { 0 } else { block }, within)
    });
    layers
        .into_iter()
        .flat_map(|l| {
            [
                format!("{prefix}{l}.running_mean"),
                format!("{prefix}{l}.running_var"),
            ]
        })
        .collect()
}

/// The five steps' parameter updates against the reference's, at the
/// fixture's gradient samples: relative L2 of (ours after five - initial)
/// against (reference after five - initial) over every sample whose step-1
/// gradient is above the README's 1e-4 x its parameter's gradient norm (the
/// rule for the parameters after one Adam step: Adam moves a parameter by
/// about lr x sign(gradient), so a near-zero gradient's steps are noise),
/// parameters zero in exact arithmetic left out. `after5(name)` is our
/// parameter after five steps (host f32). Returns (relative L2, samples).
#[allow(dead_code)]
pub fn five_step_update_error(
    fx: &Fixture,
    w: &sam_unet::io::Weights,
    after5: &mut dyn FnMut(&str) -> Vec<f32>,
) -> (f64, usize) {
    let names: Vec<String> = fx
        .f32s
        .keys()
        .filter_map(|k| k.strip_prefix("grad_norm/").map(str::to_string))
        .collect();
    let largest = names
        .iter()
        .map(|n| fx.f(&format!("grad_norm/{n}")).1[0] as f64)
        .fold(0.0, f64::max);
    let (mut num, mut den, mut count) = (0.0f64, 0.0f64, 0);
    for name in &names {
        let norm = fx.f(&format!("grad_norm/{name}")).1[0] as f64;
        if norm < 1e-6 * largest {
            continue;
        }
        let p0 = w.req(name).unwrap().as_f32().unwrap().to_vec();
        let p5 = after5(name);
        let idx = &fx.f(&format!("grad_idx/{name}")).1;
        let vals = &fx.f(&format!("grad_val/{name}")).1;
        let want5 = &fx.f(&format!("param_after_5/{name}")).1;
        for ((&i, &g), &want) in idx.iter().zip(vals).zip(want5) {
            if (g as f64).abs() <= 1e-4 * norm {
                continue;
            }
            let i = i as usize;
            let (ours, theirs) = ((p5[i] - p0[i]) as f64, (want - p0[i]) as f64);
            num += (ours - theirs).powi(2);
            den += theirs.powi(2);
            count += 1;
        }
    }
    ((num / den.max(1e-300)).sqrt(), count)
}

pub fn save_grey(path: &std::path::Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]))
        .save(path)
        .unwrap();
}

/// A plain images/ + masks/ folder (in `dir`) with bad items: image `a`
/// (64 x 48) with a good mask (`a_liver_000`) and an empty, a non-binary, a
/// mis-sized (32 x 24) and an unreadable one; image `b` corrupt, with a good
/// mask. Returns the two folders for callers that add more.
pub fn bad_items_folder(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let (im, ms) = (dir.join("images"), dir.join("masks"));
    std::fs::create_dir_all(&im).unwrap();
    std::fs::create_dir_all(&ms).unwrap();
    let disc =
        |x: u32, y: u32| u8::from((x as i32 - 30).pow(2) + (y as i32 - 20).pow(2) < 100) * 255;
    save_grey(&im.join("a.png"), 64, 48, |x, y| (x * 3 + y) as u8);
    save_grey(&ms.join("a_liver_000.png"), 64, 48, disc);
    save_grey(&ms.join("a_empty_000.png"), 64, 48, |_, _| 0);
    save_grey(&ms.join("a_soft_000.png"), 64, 48, |x, _| (x * 4) as u8);
    save_grey(&ms.join("a_small_000.png"), 32, 24, |_, _| 255);
    std::fs::write(ms.join("a_broken_000.png"), b"not a png").unwrap();
    // An image whose file is corrupt: skipped with its masks.
    std::fs::write(im.join("b.png"), b"\x89PNG\r\n\x1a\ngarbage").unwrap();
    save_grey(&ms.join("b_liver_000.png"), 64, 48, disc);
    (im, ms)
}
