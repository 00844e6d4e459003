//! Describes a SAM-UNet: configuration and parameter counts.
//!
//!     info --weights sam-unet.safetensors
//!     info --arch sam-unet-50

#[path = "cli.rs"]
mod cli;

use anyhow::{Result, bail};
use clap::Parser;
use sam_unet::io::Weights;
use sam_unet::model::SamUnetConfig;
use sam_unet::model::config::Kind;

#[derive(Parser)]
#[command(about = "Print a SAM-UNet's configuration and parameter counts")]
struct Args {
    /// A weights file (.safetensors); the configuration is read off its tensors.
    #[arg(long, conflicts_with = "arch")]
    weights: Option<std::path::PathBuf>,
    /// A named architecture: sam-unet-50, sam-unet-34 (or sam-unet-18/101/152).
    #[arg(long)]
    arch: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn group(c: usize) -> String {
    let s = c.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn main() -> std::process::ExitCode {
    cli::exit(run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    let (cfg, source) = match (&args.weights, &args.arch) {
        (Some(p), _) => {
            let w = Weights::from_file(p)?;
            let cfg = SamUnetConfig::from_weights(&w)?;
            cfg.validate(&w)?;
            (cfg, p.display().to_string())
        }
        (None, Some(a)) => (SamUnetConfig::named(a)?, a.clone()),
        (None, None) => bail!("give --weights FILE or --arch NAME (sam-unet-50, sam-unet-34)"),
    };
    let (total, trainable) = cfg.parameter_counts();
    let buffers: usize = cfg
        .param_specs()
        .iter()
        .filter(|s| s.kind == Kind::Buffer)
        .map(|s| s.shape.iter().product::<usize>())
        .sum();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "source": source,
                "img_size": cfg.img_size, "patch_size": cfg.patch_size,
                "vit_dim": cfg.vit_dim, "vit_depth": cfg.vit_depth, "vit_heads": cfg.vit_heads,
                "vit_mlp_dim": cfg.vit_mlp_dim, "window_size": cfg.window_size, "global_blocks": cfg.global_blocks,
                "resnet": cfg.resnet.name(), "resnet_blocks": cfg.resnet.blocks, "bottleneck": cfg.resnet.bottleneck,
                "prompt_dim": cfg.prompt_dim,
                "parameters_total": total, "parameters_trainable": trainable, "parameters_frozen": total - trainable,
                "buffers": buffers,
            })
        );
        return Ok(());
    }
    println!("SAM-UNet from {source}");
    println!(
        "  input            {0} x {0}, patch {1}",
        cfg.img_size, cfg.patch_size
    );
    println!(
        "  image encoder    ViT: width {}, depth {}, {} heads of {}, MLP {}",
        cfg.vit_dim,
        cfg.vit_depth,
        cfg.vit_heads,
        cfg.head_dim(),
        cfg.vit_mlp_dim
    );
    println!(
        "                   window {} (blocks {:?} global)",
        cfg.window_size, cfg.global_blocks
    );
    println!(
        "  CNN branch       {} (blocks {:?}, {})",
        cfg.resnet.name(),
        cfg.resnet.blocks,
        if cfg.resnet.bottleneck {
            "bottleneck"
        } else {
            "basic"
        }
    );
    println!("  prompt / decoder width {}", cfg.prompt_dim);
    println!("  parameters       {} total", group(total));
    println!(
        "                   {} trainable (all but image_encoder.*)",
        group(trainable)
    );
    println!("                   {} frozen", group(total - trainable));
    println!(
        "  buffers          {} values (BatchNorm statistics, PE matrix)",
        group(buffers)
    );
    Ok(())
}
