//! The training run (src/train/run.rs) as `tools/train` drives it: it
//! learns on the demo data, a resumed run repeats the bytes of one never
//! stopped, a NaN stops it with the last good checkpoint intact.

mod common;

use common::run::{demo_prepared, losses, resume_round_trip};
use sam_unet::data::loader::PreparedSet;
use sam_unet::model::SamUnetConfig;
use sam_unet::tensor::Device;
use sam_unet::train::{RunConfig, Session, evaluate, read_log};

#[test]
fn resume_is_bit_exact_cpu() {
    resume_round_trip(Device::Cpu, "sam-unet-small-18", "resume-cpu");
}

// The same on CUDA (a GPU or the emulator): tests/cuda_model.rs,
// cuda_model_resume_small18.

/// The overfitting check of the whole gradient path: the fixtures' small
/// model from random weights, trained on data_demo/train's two images, lowers
/// its loss and reaches on those masks a Dice random weights never reach.
#[test]
fn learns_the_demo_masks_from_random_init() {
    let Some(data) = demo_prepared("learn") else {
        return;
    };
    let out = data.parent().unwrap().join("run");
    let mut cfg = RunConfig::new(&data, &out);
    cfg.train_fraction = 1.0;
    cfg.batch_images = 2;
    cfg.epochs = 40;
    cfg.lr = 5e-4;
    cfg.save_every = 1000;
    let w = SamUnetConfig::named("sam-unet-small-34")
        .unwrap()
        .random_weights(7);
    let mut s = Session::new(cfg, &w).unwrap();
    let set = PreparedSet::open(&data).unwrap();
    let all: Vec<usize> = (0..set.len()).collect();
    let before = evaluate(s.trainer(), &set, &all).unwrap();
    s.run(&mut |_| {}).unwrap();
    let after = evaluate(s.trainer(), &set, &all).unwrap();
    let l = losses(&out);
    let head: f64 = l[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
    let tail: f64 = l[l.len() - 5..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    println!(
        "{} updates: loss {head:.4} (first 5) -> {tail:.4} (last 5); Dice on the {} training masks {:.4} (random weights) -> {:.4}, IoU {:.4} -> {:.4}",
        l.len(),
        after.masks,
        before.dice,
        after.dice,
        before.iou,
        after.iou
    );
    assert!(tail < 0.5 * head, "the loss did not fall: {head} -> {tail}");
    assert!(after.dice > 0.7, "Dice {} after training", after.dice);
    assert!(after.dice > before.dice + 0.3, "Dice {} -> {}", before.dice, after.dice);
    assert!(out.join("curves.svg").is_file() && out.join("curves.png").is_file());
}

/// A learning rate that blows the weights up: the run stops at the first
/// non-finite loss with a typed error naming the last good checkpoint,
/// which still loads.
#[test]
fn nan_stops_the_run_and_keeps_the_last_checkpoint() {
    let Some(data) = demo_prepared("nan") else {
        return;
    };
    let out = data.parent().unwrap().join("run");
    let mut cfg = RunConfig::new(&data, &out);
    cfg.train_fraction = 1.0;
    cfg.batch_images = 1;
    cfg.masks_per_image = 1;
    cfg.epochs = 10;
    cfg.lr = 1e30;
    cfg.save_every = 1;
    let w = SamUnetConfig::named("sam-unet-small-18")
        .unwrap()
        .random_weights(1);
    let mut s = Session::new(cfg, &w).unwrap();
    let err = s.run(&mut |_| {}).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, sam_unet::Error::NonFinite { .. }),
        "{msg}"
    );
    assert!(msg.contains("last good checkpoint"), "{msg}");
    drop(s);
    let log = read_log(&out.join("log.jsonl")).unwrap();
    let stop = log.iter().find(|l| l["event"] == "stopped").expect("a stop line");
    let bad = stop["step"].as_u64().unwrap();
    assert!(bad >= 2, "update 1's loss is finite: {bad}");
    let s = Session::resume(&out, None, None, None).unwrap();
    assert_eq!(s.steps_taken(), bad - 1);
    println!("stopped at update {bad}: {msg}");
}
