//! Writes a synthetic segmentation data set (src/data/synth.rs): organ-like
//! shapes on textured backgrounds, in the SA-Med2D layout, deterministic.
//!
//!     synth --out synth/                       # 200 training, 50 test images
//!     prepare --data synth/train --out synth-prepared/train
//!     train --data synth-prepared/train --init random:sam-unet-small-18 --out runs/synth

#[path = "cli.rs"]
mod cli;

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sam_unet::data::synth::{SynthOptions, write};

#[derive(Parser)]
#[command(about = "Write a synthetic segmentation data set (SA-Med2D layout)")]
struct Args {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 200)]
    train: usize,
    #[arg(long, default_value_t = 50)]
    test: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 256)]
    size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> std::process::ExitCode {
    cli::exit(run(Args::parse()))
}

fn run(a: Args) -> Result<()> {
    anyhow::ensure!(a.size >= 32, "--size {} is below 32 pixels", a.size);
    let bar = ProgressBar::new((a.train + a.test) as u64);
    bar.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {bar:40} {pos}/{len} images")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let o = SynthOptions {
        train_images: a.train,
        test_images: a.test,
        size: a.size,
        seed: a.seed,
    };
    let r = write(&a.out, o, &|d| bar.set_position(d as u64))?;
    bar.finish_and_clear();
    println!(
        "{}: train {} images / {} masks (train/image2label_train.json), test {} images / {} masks (test/label2image_test.json)",
        a.out.display(),
        r.train_images,
        r.train_masks,
        r.test_images,
        r.test_masks
    );
    Ok(())
}
