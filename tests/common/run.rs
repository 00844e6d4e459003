//! Helpers of the training-run tests (tests/train_run.rs, and the CUDA
//! resume test in tests/cuda_model.rs).

use std::path::{Path, PathBuf};

use sam_unet::data::prepare::{Item, PrepareOptions, Split, discover, prepare};
use sam_unet::model::SamUnetConfig;
use sam_unet::tensor::Device;
use sam_unet::train::{RunConfig, Session, read_log};

pub fn tmp(name: &str) -> PathBuf {
    super::scratch_dir(&format!("run-{name}"))
}

/// data_demo/train prepared into a temporary folder (None without fixtures).
pub fn demo_prepared(name: &str) -> Option<PathBuf> {
    demo_prepared_only(name, |_| true)
}

/// The same, with only the images `keep` accepts.
pub fn demo_prepared_only(name: &str, keep: impl Fn(&Item) -> bool) -> Option<PathBuf> {
    let fx = super::fixtures()?;
    let demo = super::data_demo(&fx).join("train");
    let mut items = discover(&demo, Split::Auto).unwrap();
    items.retain(|i| keep(i));
    assert!(!items.is_empty());
    let out = tmp(name).join("prepared");
    prepare(&items, &out, PrepareOptions::default(), &|_| {}).unwrap();
    Some(out)
}

/// data_demo's train and test images prepared together (4 images): for the
/// tests that need more images than the training split has.
pub fn demo_prepared_all(name: &str) -> Option<PathBuf> {
    let fx = super::fixtures()?;
    let demo = super::data_demo(&fx);
    let mut items = discover(&demo.join("train"), Split::Auto).unwrap();
    items.extend(discover(&demo.join("test"), Split::Auto).unwrap());
    let out = tmp(name).join("prepared");
    prepare(&items, &out, PrepareOptions::default(), &|_| {}).unwrap();
    Some(out)
}

pub fn losses(out: &Path) -> Vec<(u64, f64)> {
    read_log(&out.join("log.jsonl"))
        .unwrap()
        .iter()
        .filter(|l| l["event"] == "step")
        .map(|l| (l["step"].as_u64().unwrap(), l["loss"].as_f64().unwrap()))
        .collect()
}

pub fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// One update, a checkpoint, `updates - 1` more; then the same again from
/// that checkpoint: every loss and every byte of the model and of Adam's state
/// equal (the state files differ only in nothing: compared whole too).
pub fn resume_round_trip(device: Device, arch: &str, name: &str, updates: u64, accumulate: usize) {
    let Some(data) = demo_prepared(name) else {
        return;
    };
    let out = data.parent().unwrap().join("run");
    let mut cfg = RunConfig::new(&data, &out);
    cfg.device = device;
    cfg.train_fraction = 1.0;
    cfg.batch_images = 1;
    cfg.accumulate = accumulate;
    cfg.masks_per_image = 2;
    cfg.epochs = 3;
    cfg.lr = 1e-3;
    cfg.save_every = 1;
    cfg.keep = 5;
    cfg.max_steps = Some(updates);
    let w = SamUnetConfig::named(arch).unwrap().random_weights(5);
    let mut s = Session::new(cfg, &w).unwrap();
    s.run(&mut |_| {}).unwrap();
    drop(s);
    let first = losses(&out);
    assert_eq!(first.len() as u64, updates);
    let ck = out.join("checkpoints");
    let last = format!("step-{updates:08}");
    let end = files(&ck.join(&last));
    // Back to update 1 and on to 3 again.
    let mut s = Session::resume(&ck.join("step-00000001"), None, None, None).unwrap();
    assert_eq!(s.steps_taken(), 1);
    s.run(&mut |_| {}).unwrap();
    drop(s);
    let again = losses(&out);
    assert_eq!(
        again.len() as u64,
        updates,
        "the log keeps update 1 and redoes the others"
    );
    for ((s1, a), (s2, b)) in first.iter().zip(&again) {
        assert_eq!(s1, s2);
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "loss at update {s1}: {a} then {b}"
        );
    }
    let end2 = files(&ck.join(&last));
    assert_eq!(end.len(), end2.len());
    for ((n1, b1), (n2, b2)) in end.iter().zip(&end2) {
        assert_eq!(n1, n2);
        assert!(b1 == b2, "{n1} differs after the resume");
    }
    println!(
        "{arch} on {device}: losses {:?} repeated bit for bit from update 1's checkpoint",
        first.iter().map(|l| l.1).collect::<Vec<_>>()
    );
}
