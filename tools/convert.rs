//! Checkpoint conversion, no Python needed; nothing in a checkpoint is executed.
//!
//!     convert --sam sam_vit_b_01ec64.pth --resnet resnet50.pth --out init.safetensors
//!         SAM-UNet's starting point: SAM brought to the 256 input as the official
//!         loader does, the ResNet mapped, new modules initialised (seeded).
//!     convert --in any.pth --out any.safetensors
//!         A plain format conversion of a checkpoint's state dict, dtypes kept.
//!     convert --in runs/a/best/model.safetensors --out model.pth
//!         The other way, for PyTorch users: `{'model': state_dict}` that
//!         `torch.load(path, weights_only=True)` accepts.
//!
//! Output is written atomically (temporary file, then rename).

#[path = "cli.rs"]
mod cli;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sam_unet::io::pth::{read_tensors, safetensors_records};
use sam_unet::io::weights::write_safetensors;
use sam_unet::model::init::starting_weights;

#[derive(Parser)]
#[command(
    about = "Convert PyTorch checkpoints to safetensors, or build SAM-UNet's starting weights"
)]
struct Args {
    /// A checkpoint (.pth or .safetensors) to convert as it is.
    #[arg(long = "in", conflicts_with_all = ["sam", "resnet"])]
    input: Option<PathBuf>,
    /// Meta's SAM checkpoint (e.g. sam_vit_b_01ec64.pth).
    #[arg(long, requires = "resnet")]
    sam: Option<PathBuf>,
    /// torchvision ResNet ImageNet weights (resnet18/34/50/101/152).
    #[arg(long, requires = "sam")]
    resnet: Option<PathBuf>,
    /// Model input side for the starting point.
    #[arg(long, default_value_t = 256)]
    img_size: usize,
    /// Seed of the new modules' initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output file: .safetensors, or .pth / .pt for a PyTorch checkpoint
    /// ({'model': state_dict}; with --in only).
    #[arg(long)]
    out: PathBuf,
    /// List every tensor mapped, dropped and initialised.
    #[arg(long, short)]
    verbose: bool,
}

/// A `.pth` / `.pt` output is written as a PyTorch checkpoint.
fn is_pth_name(p: &std::path::Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("pth") || e.eq_ignore_ascii_case("pt"))
}

fn main() -> std::process::ExitCode {
    cli::exit(run(Args::parse()))
}

fn run(a: Args) -> Result<()> {
    cli::output_ending("--out", &a.out, &[".safetensors", ".pth", ".pt"])?;
    let inputs: Vec<(&str, &std::path::Path)> = [
        ("--in", &a.input),
        ("--sam", &a.sam),
        ("--resnet", &a.resnet),
    ]
    .into_iter()
    .filter_map(|(flag, p)| p.as_deref().map(|p| (flag, p)))
    .collect();
    cli::not_an_input("--out", &a.out, &inputs)?;
    if a.sam.is_some() {
        sam_unet::model::config::check_img_size(a.img_size)
            .map_err(|e| anyhow::anyhow!("--img-size: {e}"))?;
    }
    match (&a.input, &a.sam, &a.resnet) {
        (Some(input), _, _) => {
            let ck = read_tensors(input)?;
            let recs = safetensors_records(&ck.tensors);
            if is_pth_name(&a.out) {
                // For PyTorch users: {'model': state_dict}, weights_only-safe.
                sam_unet::io::pth_write::write_pth(&a.out, &ck.tensors)?;
            } else {
                write_safetensors(&a.out, &recs)?;
            }
            println!(
                "{}: {} tensors from the {} state dict -> {}",
                input.display(),
                recs.len(),
                ck.source,
                a.out.display()
            );
            for s in &ck.skipped {
                println!("  skipped: {s}");
            }
            if a.verbose {
                for (n, t) in &ck.tensors {
                    println!("  {n} {} {:?}", t.dtype.name(), t.shape);
                }
            }
        }
        (None, Some(sam), Some(resnet)) => {
            if is_pth_name(&a.out) {
                bail!("write the starting point as .safetensors (convert --in it to .pth after)");
            }
            let s = read_tensors(sam).with_context(|| format!("reading {}", sam.display()))?;
            let r =
                read_tensors(resnet).with_context(|| format!("reading {}", resnet.display()))?;
            let (w, cfg, rep) = starting_weights(&s.tensors, &r.tensors, a.img_size, a.seed)?;
            w.save(&a.out)?;
            let (total, trainable) = cfg.parameter_counts();
            println!(
                "SAM-UNet starting point ({} ViT width {}, {}; {total} parameters, {trainable} trainable) -> {}",
                sam.display(),
                cfg.vit_dim,
                cfg.resnet.name(),
                a.out.display()
            );
            println!(
                "  mapped       {} tensors (image_encoder., prompt_encoder., mask_decoder. -> sam_*; conv1/bn1/layerK -> resnet.stage*)",
                rep.mapped.len()
            );
            for (n, how) in &rep.interpolated {
                println!("  interpolated {n}: {how}");
            }
            let (counters, dropped): (Vec<&String>, Vec<&String>) = rep
                .dropped
                .iter()
                .partition(|n| n.ends_with("num_batches_tracked"));
            println!(
                "  dropped      {} tensors: {}",
                dropped.len(),
                summarize(dropped.iter().map(|s| s.as_str()))
            );
            if !counters.is_empty() {
                println!(
                    "               and {} BatchNorm step counters (num_batches_tracked, unused)",
                    counters.len()
                );
            }
            println!(
                "  initialised  {} tensors (seed {}): {}",
                rep.initialised.len(),
                a.seed,
                summarize(rep.initialised.iter().map(|(n, _)| n.as_str()))
            );
            if a.verbose {
                for (f, t) in &rep.mapped {
                    println!("    {f} -> {t}");
                }
                for (n, how) in &rep.initialised {
                    println!("    {n}: {how}");
                }
            }
        }
        _ => bail!("give --in FILE, or --sam SAM.pth --resnet RESNET.pth (and --out)"),
    }
    Ok(())
}

/// The distinct module prefixes of some names (two components), comma separated.
fn summarize<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut seen: Vec<String> = vec![];
    for n in names {
        let p: Vec<&str> = n.split('.').take(2).collect();
        let p = p.join(".");
        if !seen.contains(&p) {
            seen.push(p);
        }
    }
    seen.join(", ")
}
