//! Prepares a segmentation data folder for training: every image and mask
//! read once, checked, brought to the model's 256 frame (the same PIL-exact
//! resize as inference), each mask's box taken from its largest 8-connected
//! component, all written as memory-mappable shards (src/data/prepare.rs).
//!
//!     prepare --data SAMed2Dv1/ --out prepared/train
//!     prepare --data data_demo/test --out prepared/test
//!     prepare --data my_folder/ --out prepared/mine      # images/ + masks/
//!
//! Bad items (missing or unreadable files, masks that are empty, not binary
//! or not the image's size) are skipped, counted and listed in
//! OUT/prepare_report.json; the run says how many it kept.

#[path = "cli.rs"]
mod cli;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Parser;
use cli::SplitArg;
use indicatif::{ProgressBar, ProgressStyle};
use sam_unet::data::prepare::{PrepareOptions, discover, prepare};

#[derive(Parser)]
#[command(about = "Prepare an SA-Med2D-style (or images/ + masks/) folder as training shards")]
struct Args {
    /// The data folder (or its JSON list: image2label_train.json,
    /// label2image_test.json, SAMed2D_v1.json).
    #[arg(long)]
    data: PathBuf,
    /// Output folder (shards, index.json, prepare_report.json).
    #[arg(long)]
    out: PathBuf,
    /// Which list to read when the folder holds both.
    #[arg(long, value_enum, default_value = "auto")]
    split: SplitArg,
    /// Model input side.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Images per shard.
    #[arg(long, default_value_t = 256)]
    shard_images: usize,
    /// List every skipped item here too (they are always in the report).
    #[arg(long, short)]
    verbose: bool,
}

fn main() -> std::process::ExitCode {
    cli::exit(run(Args::parse()))
}

fn run(a: Args) -> Result<()> {
    // Before reading a whole data folder (prepare checks it again).
    sam_unet::model::config::check_img_size(a.size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
    let split = a.split.split();
    let items = discover(&a.data, split)?;
    if items.is_empty() {
        bail!("{}: no images listed", a.data.display());
    }
    let bar = ProgressBar::new(items.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} images ({per_sec}, ETA {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let opts = PrepareOptions {
        size: a.size,
        shard_images: a.shard_images,
    };
    let r = prepare(&items, &a.out, opts, &|done| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    if a.verbose {
        for s in &r.skipped {
            eprintln!("skipped {}: {}", s.path, s.reason);
        }
    }
    let threads = rayon::current_num_threads();
    println!(
        "kept {} of {} images and {} of {} masks in {} shard(s) under {}; skipped {} item(s){}",
        r.images_kept,
        r.images_listed,
        r.masks_kept,
        r.masks_listed,
        r.shards,
        a.out.display(),
        r.skipped.len(),
        if r.skipped.is_empty() {
            String::new()
        } else {
            format!(" (see {})", a.out.join("prepare_report.json").display())
        }
    );
    println!(
        "{:.2} s, {:.1} images/s on {threads} thread(s) ({:.1} per thread)",
        r.seconds,
        r.images_listed as f64 / r.seconds.max(1e-9),
        r.images_listed as f64 / r.seconds.max(1e-9) / threads as f64
    );
    if r.images_kept == 0 {
        bail!("no usable image: nothing to train on");
    }
    Ok(())
}
