//! Evaluates a SAM-UNet on a data folder with the authors' test protocol
//! (EVAL.md; src/eval): one row per mask, reports per modality, dataset
//! and class.
//!
//!     eval --weights W --data ../shared/data_demo/test --out eval/
//!     eval --weights W --data SAMed2Dv1/ --split test --shard 3/16 --out eval/3   # one of 16 jobs
//!     eval --merge eval/0 eval/1 ... eval/15 --out eval/all                        # the same reports as one run
//!     eval --volume labels.nii.gz --labels reference.nii.gz --out eval/ct1         # 3-D Dice, IoU, NSD, HD95 per label
//!
//! Writes OUT/rows.jsonl and rows.csv (a row per mask: names and grouping,
//! the box, areas, TP/FP/FN, Dice, IoU, NSD, HD95), summary.json (nnU-Net
//! shaped, plus per modality / dataset / class), summary.md and
//! dice_by_modality.svg.

#[path = "cli.rs"]
mod cli;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use cli::SplitArg;
use indicatif::{ProgressBar, ProgressStyle};
use sam_unet::data::prepare::discover;
use sam_unet::eval::{EvalOptions, evaluate_timed, read_rows, read_skipped, write_reports};
use sam_unet::{DType, Device, Predictor, PredictorOptions};

#[derive(Parser)]
#[command(
    about = "Evaluate SAM-UNet with the authors' test protocol: Dice, IoU, NSD, HD95 per mask and per modality"
)]
struct Args {
    /// Weights: safetensors, .pth, or random:ARCH[:SEED].
    #[arg(long, required_unless_present_any = ["merge", "volume"])]
    weights: Option<String>,
    /// The data: SA-Med2D layout (label2image_test.json, ...) or images/ + masks/.
    #[arg(long, required_unless_present_any = ["merge", "volume"])]
    data: Option<PathBuf>,
    /// A predicted label volume (NIfTI, e.g. from segment-volume) to score
    /// against --labels: 3-D Dice and IoU per label.
    #[arg(long, requires = "labels", conflicts_with_all = ["weights", "data", "merge", "shard"])]
    volume: Option<PathBuf>,
    /// The reference label volume (NIfTI, or a DICOM series folder).
    #[arg(long)]
    labels: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    split: SplitArg,
    /// Output folder for the reports.
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// bf16 GEMMs on the image side (CUDA, or a CPU with AVX512_BF16; elsewhere f32 with a notice).
    #[arg(long)]
    bf16: bool,
    /// NSD tolerance in pixels (in mm for --volume).
    #[arg(long, default_value_t = 2.0)]
    tolerance: f64,
    /// Images per image-side batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Evaluate shard K of N (images K, K+N, ...), e.g. 3/16.
    #[arg(long)]
    shard: Option<String>,
    /// Merge the rows of earlier runs (their output folders) into one report.
    #[arg(long, num_args = 1.., conflicts_with_all = ["weights", "data", "shard"])]
    merge: Vec<PathBuf>,
}

fn main() -> std::process::ExitCode {
    cli::exit(run(Args::parse()))
}

/// `--volume P --labels R`: 3-D overlap per label, a table and
/// OUT/volume_summary.json.
fn eval_volume(a: &Args, pred: &std::path::Path, reference: &std::path::Path) -> Result<()> {
    use sam_unet::volume::{label_overlap, read_volume};
    let (p, r) = (read_volume(pred)?, read_volume(reference)?);
    let scores = label_overlap(&p, &r, a.tolerance).with_context(|| {
        format!(
            "comparing {} (prediction) with {} (reference)",
            pred.display(),
            reference.display()
        )
    })?;
    println!(
        "{} vs {}: {} x {} x {} voxels of {:.3} x {:.3} x {:.3} mm",
        pred.display(),
        reference.display(),
        r.dims[0],
        r.dims[1],
        r.dims[2],
        r.spacing[0],
        r.spacing[1],
        r.spacing[2]
    );
    println!(
        "| label | reference mL | predicted mL | Dice | IoU | NSD ({} mm) | HD95 mm |\n|---|---|---|---|---|---|---|",
        a.tolerance
    );
    let mut rows = vec![];
    for s in &scores {
        println!(
            "| {} | {:.2} | {:.2} | {:.4} | {:.4} | {:.4} | {:.2} |",
            s.label, s.reference_ml, s.predicted_ml, s.dice, s.iou, s.nsd, s.hd95
        );
        let hd = if s.hd95.is_finite() {
            serde_json::json!(s.hd95)
        } else {
            serde_json::json!("inf")
        };
        rows.push(
            serde_json::json!({"label": s.label, "reference_voxels": s.reference_voxels,
            "predicted_voxels": s.predicted_voxels, "true_positive": s.true_positive,
            "dice": s.dice, "iou": s.iou, "nsd": s.nsd, "hd95_mm": hd,
            "reference_ml": s.reference_ml, "predicted_ml": s.predicted_ml}),
        );
    }
    std::fs::create_dir_all(&a.out)?;
    let out = a.out.join("volume_summary.json");
    let doc = serde_json::json!({"prediction": pred.to_string_lossy(), "reference": reference.to_string_lossy(),
        "spacing_mm": r.spacing, "tolerance_mm": a.tolerance, "labels": rows,
        "note": "per label: Dice and IoU (nnU-Net's formula; null when absent from both), NSD and HD95 as DeepMind's surface_distance in 3-D with the reference's voxel spacing"});
    // serde_json writes NaN as null.
    std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
    println!("written {}", out.display());
    Ok(())
}

fn run(a: Args) -> Result<()> {
    if let (Some(p), Some(r)) = (&a.volume, &a.labels) {
        return eval_volume(&a, p, r);
    }
    if !a.merge.is_empty() {
        let dirs: Vec<&std::path::Path> = a.merge.iter().map(PathBuf::as_path).collect();
        for d in &dirs {
            cli::not_an_input("--out", &a.out, &[("--merge", d)])?;
        }
        let mut rows = read_rows(&dirs)?;
        let skipped = read_skipped(&dirs)?;
        let tol = read_tolerance(&dirs)?;
        write_reports(&a.out, &mut rows, &skipped, tol)?;
        println!(
            "merged {} runs: {} masks -> {}",
            dirs.len(),
            rows.len(),
            a.out.display()
        );
        return print_summary(&a.out);
    }
    let (Some(spec), Some(data)) = (&a.weights, &a.data) else {
        bail!("give --weights and --data (or --merge DIR...)");
    };
    let shard = match &a.shard {
        None => None,
        Some(s) => {
            let (k, n) = s.split_once('/').context("--shard K/N, e.g. 3/16")?;
            Some((
                k.trim().parse::<usize>().context("--shard K")?,
                n.trim().parse::<usize>().context("--shard N")?,
            ))
        }
    };
    let split = a.split.split();
    let items = discover(data, split)?;
    if items.is_empty() {
        bail!("{}: no images listed", data.display());
    }
    let w = cli::load_weights(spec)?;
    let predictor = Predictor::from_weights(
        &w,
        PredictorOptions {
            device: a.device,
            dtype: if a.bf16 { DType::BF16 } else { DType::F32 },
        },
    )?;
    drop(w);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:40} {pos}/{len} masks ({per_sec}, ETA {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let o = EvalOptions {
        tolerance: a.tolerance,
        batch_images: a.batch,
        shard,
    };
    let t0 = std::time::Instant::now();
    let (mut rows, skipped, timing) = evaluate_timed(&predictor, &items, o, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    write_reports(&a.out, &mut rows, &skipped, a.tolerance)?;
    println!(
        "{} masks evaluated ({} skipped) in {secs:.1} s ({:.1} masks/s) on {} -> {}",
        rows.len(),
        skipped.len(),
        rows.len() as f64 / secs.max(1e-9),
        a.device,
        a.out.display()
    );
    println!(
        "time: reading {:.1} s, model {:.1} s, metrics {:.1} s",
        timing.read_s, timing.model_s, timing.metrics_s
    );
    // (A shard with no images has nothing to evaluate; that is no failure.)
    if rows.is_empty() && !skipped.is_empty() {
        bail!(
            "no mask could be evaluated ({} skipped, each with its reason in {})",
            skipped.len(),
            a.out.join("summary.json").display()
        );
    }
    print_summary(&a.out)
}

fn read_tolerance(dirs: &[&std::path::Path]) -> Result<f64> {
    let mut tol = None;
    for d in dirs {
        let p = d.join("summary.json");
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&p).with_context(|| p.display().to_string())?,
        )?;
        let t = v["nsd_tolerance_px"]
            .as_f64()
            .with_context(|| format!("{}: no tolerance", p.display()))?;
        if tol.is_some_and(|x| x != t) {
            bail!("the runs used different NSD tolerances");
        }
        tol = Some(t);
    }
    tol.context("nothing to merge")
}

fn print_summary(out: &std::path::Path) -> Result<()> {
    let md = std::fs::read_to_string(out.join("summary.md"))?;
    // The per-modality table.
    for l in md.lines().skip(4).take_while(|l| !l.is_empty()) {
        println!("{l}");
    }
    Ok(())
}
