//! `tools/eval` (src/eval): the authors' test protocol on data_demo/test
//! against the fixtures' recorded Dice, shards merged equal to one run, bad
//! masks skipped with their reasons.

mod common;

use std::path::{Path, PathBuf};

use sam_unet::data::prepare::{Split, discover};
use sam_unet::eval::{EvalOptions, evaluate, read_rows, read_skipped, write_reports};
use sam_unet::io::Weights;
use sam_unet::{Predictor, PredictorOptions};

fn tmp(name: &str) -> PathBuf {
    common::scratch_dir(&format!("eval-{name}"))
}

fn small34(fx: &Path) -> Predictor {
    let w = Weights::from_file(common::fixture(fx, "small34_weights.safetensors")).unwrap();
    Predictor::from_weights(&w, PredictorOptions::default()).unwrap()
}

/// Every mask of data_demo/test: its Dice as the reference recorded it in
/// the small34_infer fixtures (same masks, boxes, protocol), and each row's
/// counts consistent with its areas.
#[test]
fn eval_demo_test_matches_the_fixtures_dice() {
    let Some(fx) = common::fixtures() else { return };
    let items = discover(&common::data_demo(&fx).join("test"), Split::Auto).unwrap();
    let p = small34(&fx);
    let (rows, skipped) = evaluate(&p, &items, EvalOptions::default(), &mut |_, _| {}).unwrap();
    assert!(skipped.is_empty(), "{skipped:?}");
    let listed: usize = items.iter().map(|i| i.masks.len()).sum();
    assert_eq!(rows.len(), listed);
    let mut checked = 0;
    for tag in ["amos_0004_75", "s0619_32"] {
        let f = common::Fixture::load(&common::fixture(
            &fx,
            &format!("small34_infer_{tag}.safetensors"),
        ));
        let masks: Vec<String> = serde_json::from_str(&f.meta["masks"]).unwrap();
        let dice: Vec<f64> = serde_json::from_str(&f.meta["dice"]).unwrap();
        for (m, d) in masks.iter().zip(&dice) {
            let file = Path::new(m)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let r = rows
                .iter()
                .find(|r| r.mask.ends_with(&file))
                .unwrap_or_else(|| panic!("no row for {m}"));
            // The fixture's Dice has no eps; ours adds 1e-7 to both sides.
            assert!(
                (r.dice - d).abs() <= 2e-3,
                "{m}: Dice {} vs the reference's {d}",
                r.dice
            );
            checked += 1;
        }
    }
    assert_eq!(checked, rows.len());
    for r in &rows {
        assert_eq!(r.tp + r.fn_, r.area_gt);
        assert_eq!(r.tp + r.fp, r.area_pred);
        assert!(r.area_gt > 0 && (0.0..=1.0).contains(&r.dice) && (0.0..=1.0).contains(&r.nsd));
        assert!(r.iou <= r.dice + 1e-12);
        assert_eq!(r.modality, "unknown");
    }
}

/// Two shards' rows merged give the same report files, byte for byte, as
/// one run over everything.
#[test]
fn shards_merge_to_the_single_run() {
    let Some(fx) = common::fixtures() else { return };
    let items = discover(&common::data_demo(&fx).join("test"), Split::Auto).unwrap();
    let p = small34(&fx);
    let dir = tmp("shards");
    let run = |shard: Option<(usize, usize)>, out: &Path| {
        let o = EvalOptions {
            shard,
            batch_images: 1,
            ..EvalOptions::default()
        };
        let (mut rows, skipped) = evaluate(&p, &items, o, &mut |_, _| {}).unwrap();
        write_reports(out, &mut rows, &skipped, o.tolerance).unwrap();
        rows.len()
    };
    let n_all = run(None, &dir.join("all"));
    let n0 = run(Some((0, 2)), &dir.join("s0"));
    let n1 = run(Some((1, 2)), &dir.join("s1"));
    assert!(n0 > 0 && n1 > 0 && n0 + n1 == n_all);
    let parts = [dir.join("s0"), dir.join("s1")];
    let dirs: Vec<&Path> = parts.iter().map(PathBuf::as_path).collect();
    let mut rows = read_rows(&dirs).unwrap();
    let skipped = read_skipped(&dirs).unwrap();
    write_reports(&dir.join("merged"), &mut rows, &skipped, 2.0).unwrap();
    for f in [
        "rows.jsonl",
        "rows.csv",
        "summary.json",
        "summary.md",
        "dice_by_modality.svg",
    ] {
        let a = std::fs::read(dir.join("all").join(f)).unwrap();
        let b = std::fs::read(dir.join("merged").join(f)).unwrap();
        assert!(
            a == b,
            "{f} differs between the single run and the merged shards"
        );
    }
    // Overlapping runs (a shard twice, or the single run with a shard) would
    // count masks twice: refused, naming a mask and both folders.
    for twice in [
        [dir.join("s0"), dir.join("s0")],
        [dir.join("all"), dir.join("s1")],
    ] {
        let dirs: Vec<&Path> = twice.iter().map(PathBuf::as_path).collect();
        let e = read_rows(&dirs).unwrap_err().to_string();
        assert!(e.contains("the runs overlap"), "{e}");
    }
    let bad = |o: EvalOptions| evaluate(&p, &items, o, &mut |_, _| {}).is_err();
    assert!(bad(EvalOptions {
        shard: Some((2, 2)),
        ..EvalOptions::default()
    }));
    for tolerance in [-1.0, f64::NAN, f64::INFINITY] {
        assert!(bad(EvalOptions {
            tolerance,
            ..EvalOptions::default()
        }));
    }
    assert!(bad(EvalOptions {
        batch_images: 0,
        ..EvalOptions::default()
    }));
}

/// A plain folder with bad masks (empty, not binary, another size, not an
/// image) and an unreadable image: each skipped with its reason, the good
/// mask evaluated, nothing panics.
#[test]
fn bad_masks_are_skipped_with_reasons() {
    let dir = tmp("bad");
    common::bad_items_folder(&dir);
    let items = discover(&dir, Split::Auto).unwrap();
    let cfg = sam_unet::model::SamUnetConfig::named("sam-unet-small-18").unwrap();
    let p = Predictor::from_weights(&cfg.random_weights(1), PredictorOptions::default()).unwrap();
    let (rows, skipped) = evaluate(&p, &items, EvalOptions::default(), &mut |_, _| {}).unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].mask.ends_with("a_liver_000.png"));
    let reason = |n: &str| {
        skipped
            .iter()
            .find(|s| s.path.ends_with(n))
            .map(|s| s.reason.clone())
            .unwrap_or_default()
    };
    assert_eq!(skipped.len(), 5, "{skipped:?}");
    assert!(reason("a_empty_000.png").contains("empty"), "{skipped:?}");
    assert!(reason("a_small_000.png").contains("32 x 24"), "{skipped:?}");
    assert!(!reason("a_soft_000.png").is_empty() && !reason("a_broken_000.png").is_empty());
    assert!(
        reason("b_liver_000.png").contains("its image"),
        "{skipped:?}"
    );
    let out = dir.join("out");
    let mut rows = rows;
    write_reports(&out, &mut rows, &skipped, 2.0).unwrap();
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["skipped"].as_array().unwrap().len(), 5);
    assert_eq!(s["masks"], 1);
}
