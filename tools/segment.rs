//! Box-prompted segmentation of one image.
//!
//!     segment --weights sam-unet.safetensors --image ct.png \
//!             --box 120,80,260,210 --box 300,90,380,200 --out masks/
//!     segment --weights W --image ct.png --box-from-mask liver.png --out masks/
//!
//! Writes one mask PNG per box (0 / 255, at the image's size) named
//! `<image stem>_mask<k>.png`, an overlay `<image stem>_overlay.png`, and with
//! `--logits F.safetensors` the f32 logits: `low_res_logits` (N x 1 x 64 x 64) and
//! `logits` (N x 1 x H x W).

#[path = "cli.rs"]
mod cli;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sam_unet::io::Weights;
use sam_unet::io::image::{read_mask, read_rgb, write_mask_png, write_overlay_png};
use sam_unet::preprocess::box_from_mask;
use sam_unet::{DType, Device, Predictor, PredictorOptions};

#[derive(Parser)]
#[command(about = "Segment an image with box prompts")]
struct Args {
    /// SAM-UNet weights (.safetensors).
    #[arg(long, required_unless_present = "random_weights")]
    weights: Option<PathBuf>,
    /// No weights file: a seeded random model of this architecture (sam-unet-50,
    /// sam-unet-34) to try the pipeline. Its masks are random.
    #[arg(long, conflicts_with = "weights", value_name = "ARCH")]
    random_weights: Option<String>,
    /// The image: PNG or JPEG, 8 or 16 bit, grey, RGB or RGBA.
    #[arg(long)]
    image: PathBuf,
    /// A box x0,y0,x1,y1 in image pixels (x1, y1 exclusive); repeatable.
    #[arg(long = "box", value_parser = parse_box)]
    boxes: Vec<[f32; 4]>,
    /// A mask whose largest 8-connected component gives a box (the evaluation
    /// protocol); repeatable.
    #[arg(long = "box-from-mask")]
    box_from_mask: Vec<PathBuf>,
    /// Output folder (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Also save the logits to this safetensors file.
    #[arg(long)]
    logits: Option<PathBuf>,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// f32 or bf16 (the image side's GEMMs on bf16 inputs with f32 sums: on
    /// CUDA, or on a CPU with AVX512_BF16; elsewhere f32 with a notice)
    #[arg(long, default_value = "f32")]
    dtype: DType,
}

fn parse_box(s: &str) -> std::result::Result<[f32; 4], String> {
    let v: Vec<f32> = s
        .split(',')
        .map(|t| t.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("`{s}`: {e}"))?;
    v.try_into()
        .map_err(|_| format!("`{s}`: a box is four numbers x0,y0,x1,y1"))
}

/// Before any work: no output may replace an input (the image, a
/// `--box-from-mask` mask), and `--logits` must be a `.safetensors` file whose
/// folder exists (or is `--out`, made below), so that a bad name fails before
/// the masks are written rather than after.
fn check_outputs(args: &Args) -> Result<()> {
    let mut inputs: Vec<(&str, &std::path::Path)> = vec![("--image", &args.image)];
    inputs.extend(
        args.box_from_mask
            .iter()
            .map(|m| ("--box-from-mask", m.as_path())),
    );
    let stem = image_stem(&args.image);
    let n = args.boxes.len() + args.box_from_mask.len();
    for k in 0..n {
        cli::not_an_input(
            "--out",
            &args.out.join(format!("{stem}_mask{k}.png")),
            &inputs,
        )?;
    }
    cli::not_an_input(
        "--out",
        &args.out.join(format!("{stem}_overlay.png")),
        &inputs,
    )?;
    if let Some(lp) = &args.logits {
        cli::output_ending("--logits", lp, &[".safetensors"])?;
        cli::not_an_input("--logits", lp, &inputs)?;
        let dir = lp.parent().filter(|d| !d.as_os_str().is_empty());
        let same = |a: &std::path::Path, b: &std::path::Path| {
            std::path::absolute(a).ok() == std::path::absolute(b).ok()
        };
        if let Some(d) = dir
            && !d.is_dir()
            && !same(d, &args.out)
        {
            bail!(
                "--logits {}: the folder {} does not exist",
                lp.display(),
                d.display()
            );
        }
    }
    Ok(())
}

/// The name the outputs start with: the image's file stem.
fn image_stem(image: &std::path::Path) -> String {
    image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

fn main() -> std::process::ExitCode {
    cli::exit(run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    check_outputs(&args)?;
    let img = read_rgb(&args.image)?;
    let mut boxes = args.boxes.clone();
    for m in &args.box_from_mask {
        let mask = read_mask(m)?;
        if (mask.width, mask.height) != (img.width, img.height) {
            bail!(
                "mask {} is {} x {}, the image is {} x {}",
                m.display(),
                mask.width,
                mask.height,
                img.width,
                img.height
            );
        }
        let b = box_from_mask(&mask)
            .with_context(|| format!("mask {} is empty: no box to take", m.display()))?;
        eprintln!(
            "box from {}: {},{},{},{}",
            m.display(),
            b[0],
            b[1],
            b[2],
            b[3]
        );
        boxes.push(b);
    }
    if boxes.is_empty() {
        bail!("no prompt: give at least one --box x0,y0,x1,y1 or --box-from-mask M.png");
    }
    let t0 = Instant::now();
    let w = match (&args.weights, &args.random_weights) {
        (Some(p), _) => Weights::from_file(p)?,
        (None, Some(arch)) => {
            eprintln!("warning: random {arch} weights: the masks are random, not segmentations");
            sam_unet::model::SamUnetConfig::named(arch)?.random_weights(0)
        }
        (None, None) => bail!("give --weights FILE (or --random-weights ARCH to try the pipeline)"),
    };
    let mut p = Predictor::from_weights(
        &w,
        PredictorOptions {
            device: args.device,
            dtype: args.dtype,
        },
    )?;
    drop(w);
    let t1 = Instant::now();
    p.set_image(&img)?;
    let t2 = Instant::now();
    let pred = p.predict(&boxes)?;
    let t3 = Instant::now();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let stem = image_stem(&args.image);
    for (k, m) in pred.masks.iter().enumerate() {
        let path = args.out.join(format!("{stem}_mask{k}.png"));
        write_mask_png(&path, pred.width, pred.height, m)?;
        let area = m.iter().filter(|&&v| v).count();
        println!(
            "{}: box {:?}, {} pixels ({:.2} %)",
            path.display(),
            boxes[k],
            area,
            100.0 * area as f64 / m.len() as f64
        );
    }
    let overlay = args.out.join(format!("{stem}_overlay.png"));
    write_overlay_png(&overlay, &img, &pred.masks, &boxes)?;
    println!("{}", overlay.display());
    if let Some(lp) = &args.logits {
        let mut out = Weights::new();
        out.insert("low_res_logits", pred.low_res_logits.clone());
        out.insert("logits", pred.logits.clone());
        out.save(lp)?;
        println!("{}", lp.display());
    }
    eprintln!(
        "load {:.0} ms, image side {:.0} ms, decoder {:.0} ms for {} box(es)",
        (t1 - t0).as_secs_f64() * 1e3,
        (t2 - t1).as_secs_f64() * 1e3,
        (t3 - t2).as_secs_f64() * 1e3,
        boxes.len()
    );
    Ok(())
}
