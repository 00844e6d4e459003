//! Trains (fine-tunes) SAM-UNet on prepared data (src/train/run.rs).
//!
//!     prepare --data my_data/ --out prepared/
//!     train --data prepared/ --init start.safetensors --out runs/a --epochs 20
//!     train --resume runs/a                      # after a crash or a pre-emption
//!
//! Data parallel (README "Training on several GPUs or machines"): `--nproc N`
//! starts N ranks on this machine; ranks started by torchrun (RANK,
//! WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or by Slurm's `srun`
//! (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the node list) find each other
//! through rank 0. Each rank takes `--batch` images per micro-batch from its
//! shard of the epoch; BatchNorm is synchronised across ranks unless
//! `--no-sync-bn`; rank 0 alone writes the run's folder.
//!
//! `--init`: the output of `convert --sam ... --resnet ...`, a SAM-UNet
//! safetensors file, an authors' `.pth` (state dict or trainer checkpoint),
//! or `random:ARCH[:SEED]` (e.g. `random:sam-unet-small-34`) to start from
//! random weights. The run's folder gets `log.jsonl` (one JSON line per update,
//! validation, epoch and checkpoint), `checkpoints/step-N/`, `best/` (the
//! best validation Dice) and `curves.svg` / `curves.png`.

#[path = "cli.rs"]
mod cli;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sam_unet::data::loader::SplitBy;
use sam_unet::dist::{Collective, Launch, Nccl, Tcp};
use sam_unet::tensor::Device;
use sam_unet::train::{DataParallel, Event, RunConfig, Session};

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    /// Image by image, as the authors split.
    Image,
    /// Every slice of a `dataset--case` on one side (EVAL.md).
    Case,
}

#[derive(Parser)]
#[command(about = "Train SAM-UNet on prepared data; resumable bit for bit")]
struct Args {
    /// Prepared data (the output of `prepare`).
    #[arg(long, required_unless_present = "resume")]
    data: Option<PathBuf>,
    /// Starting weights: safetensors, .pth, or random:ARCH[:SEED].
    #[arg(long, required_unless_present = "resume")]
    init: Option<String>,
    /// The run's folder.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue a run: its folder (newest checkpoint) or a checkpoint folder.
    /// The run keeps its settings (batch, learning rate, schedule, seed, ...,
    /// refused beside --resume); --device, --epochs, --max-steps and the
    /// ranks' options apply.
    #[arg(long, conflicts_with_all = ["data", "init", "out"])]
    resume: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<Device>,
    /// Epochs over the training split (default 1; with --resume: the run's,
    /// or more to train on).
    #[arg(long)]
    epochs: Option<u64>,
    /// Images per micro-batch (5 masks each).
    #[arg(long, default_value_t = 16, conflicts_with = "resume")]
    batch: usize,
    /// Micro-batches per update (gradient accumulation).
    #[arg(long, default_value_t = 1, conflicts_with = "resume")]
    accumulate: usize,
    /// Adam's learning rate (the authors: 1e-4).
    #[arg(long, default_value_t = 1e-4, conflicts_with = "resume")]
    lr: f32,
    /// MultiStepLR milestones, in epochs (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "resume")]
    milestones: Vec<u64>,
    /// MultiStepLR's factor at each milestone.
    #[arg(long, default_value_t = 0.1, conflicts_with = "resume")]
    gamma: f32,
    /// Seed of the split, the image order and the loader's draws.
    #[arg(long, default_value_t = 0, conflicts_with = "resume")]
    seed: u64,
    /// Share of each modality's images (or cases) trained on; the rest validates.
    #[arg(long, default_value_t = 0.8, conflicts_with = "resume")]
    train_fraction: f64,
    #[arg(long, value_enum, default_value = "image", conflicts_with = "resume")]
    split: SplitArg,
    /// Validate every K updates (default: at each epoch's end), and after the last.
    #[arg(long, default_value_t = 0, conflicts_with = "resume")]
    val_every: u64,
    /// Checkpoint every K updates (default: at each epoch's end), and after the last.
    #[arg(long, default_value_t = 0, conflicts_with = "resume")]
    save_every: u64,
    /// Checkpoints kept (the newest), besides best/.
    #[arg(long, default_value_t = 3, conflicts_with = "resume")]
    keep: usize,
    /// Stop after this many updates in all.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Start this many ranks on this machine (data parallel; with
    /// `--device cuda`, rank K takes cuda:K).
    #[arg(long, default_value_t = 1)]
    nproc: usize,
    /// Keep each rank's BatchNorm statistics (no SyncBatchNorm).
    #[arg(long, conflicts_with = "resume")]
    no_sync_bn: bool,
    /// MiB of gradients per bucket summed over the ranks while backward
    /// runs (PyTorch DDP's bucket_cap_mb); 0 sums them all after backward.
    #[arg(long, default_value_t = 25.0, conflicts_with = "resume")]
    bucket_mb: f64,
    /// Seconds a rank waits for the others before it gives up.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// How ranks sum their gradients: NCCL on the GPUs (the default on
    /// CUDA), TCP through the hosts (the default on the CPU).
    #[arg(long, value_enum, default_value = "auto")]
    collective: CollectiveArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CollectiveArg {
    Auto,
    Nccl,
    Tcp,
}

fn main() -> std::process::ExitCode {
    let a = Args::parse();
    let launch = match Launch::from_env() {
        Ok(l) => l,
        Err(e) => return cli::exit(Err(e.into())),
    };
    match launch {
        // A rank of a group (ours, torchrun's or Slurm's).
        Some(l) if l.world > 1 => {
            let rank = l.rank;
            let r = run_rank(a, Some(l));
            if let Err(e) = &r {
                eprintln!("rank {rank}: {e:#}");
            }
            cli::exit(r)
        }
        _ if a.nproc > 1 => cli::exit(spawn_ranks(a.nproc)),
        _ => cli::exit(run_rank(a, None)),
    }
}

/// `--nproc N`: this program again N times, as ranks 0..N of a group on
/// this machine (the variables torchrun sets); waits for them all. When a
/// rank fails, the others stop at their next reduction (the failed rank's
/// sockets close); any still running a minute later are killed.
fn spawn_ranks(n: usize) -> Result<()> {
    use std::process::Command;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut children = vec![];
    for rank in 0..n {
        let child = Command::new(&exe)
            .args(&args)
            .env("WORLD_SIZE", n.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting rank {rank}: {e}"))?;
        children.push(child);
    }
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    let mut since: Option<std::time::Instant> = None;
    let mut running: Vec<bool> = vec![true; n];
    while running.iter().any(|&r| r) {
        for (rank, c) in children.iter_mut().enumerate() {
            if !running[rank] {
                continue;
            }
            if let Some(st) = c.try_wait()? {
                running[rank] = false;
                if !st.success() && failed.is_none() {
                    failed = Some((rank, st));
                    since = Some(std::time::Instant::now());
                }
            }
        }
        if since.is_some_and(|t| t.elapsed() > std::time::Duration::from_secs(60)) {
            for (rank, c) in children.iter_mut().enumerate() {
                if running[rank] {
                    eprintln!("rank {rank} still running a minute after a rank failed: killed");
                    let _ = c.kill();
                    let _ = c.wait();
                    running[rank] = false;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if let Some((rank, st)) = failed {
        bail!("rank {rank} failed ({st}); the run stopped");
    }
    Ok(())
}

fn run_rank(a: Args, launch: Option<Launch>) -> Result<()> {
    // Each rank on its own GPU of this machine.
    let device = match (a.device, &launch) {
        (Some(Device::Cuda(_)), Some(l)) => Some(Device::Cuda(l.local_rank)),
        (d, _) => d,
    };
    let dp = match &launch {
        Some(l) => {
            let tcp = Tcp::connect(
                l.rank,
                l.world,
                &l.master,
                std::time::Duration::from_secs(a.timeout),
            )?;
            let comm: std::sync::Arc<dyn Collective> = match (a.collective, device) {
                (CollectiveArg::Tcp, _) | (CollectiveArg::Auto, None | Some(Device::Cpu)) => {
                    std::sync::Arc::new(tcp)
                }
                (_, Some(Device::Cuda(n))) => std::sync::Arc::new(Nccl::new(
                    sam_unet::cuda::shared_device(n)?,
                    Box::new(tcp),
                )?),
                (CollectiveArg::Nccl, _) => bail!("--collective nccl needs --device cuda"),
            };
            Some(DataParallel { comm })
        }
        None => None,
    };
    let leader = launch.as_ref().is_none_or(|l| l.rank == 0);
    let mut session = match &a.resume {
        Some(dir) => Session::resume_ranked(dir, device, a.epochs, a.max_steps.map(Some), dp)?,
        None => {
            let (Some(data), Some(init), Some(out)) = (&a.data, &a.init, &a.out) else {
                bail!("give --data, --init and --out (or --resume DIR)");
            };
            if out.join("checkpoints").is_dir() {
                bail!(
                    "{} already holds a run: continue it with --resume {0}, or choose another --out",
                    out.display()
                );
            }
            let mut cfg = RunConfig::new(data, out);
            cfg.device = device.unwrap_or(Device::Cpu);
            cfg.sync_bn = !a.no_sync_bn;
            cfg.bucket_mb = a.bucket_mb;
            cfg.epochs = a.epochs.unwrap_or(1);
            cfg.batch_images = a.batch;
            cfg.accumulate = a.accumulate;
            cfg.lr = a.lr;
            cfg.milestones = a.milestones.clone();
            cfg.gamma = a.gamma;
            cfg.seed = a.seed;
            cfg.train_fraction = a.train_fraction;
            cfg.split_by = match a.split {
                SplitArg::Image => SplitBy::Image,
                SplitArg::Case => SplitBy::Case,
            };
            cfg.val_every = a.val_every;
            cfg.save_every = a.save_every;
            cfg.keep = a.keep;
            cfg.max_steps = a.max_steps;
            let w = cli::load_weights(init)?;
            Session::new_ranked(cfg, &w, dp)?
        }
    };
    if !leader {
        // The others train silently; rank 0 reports for the group.
        return session.run(&mut |_| {}).map_err(Into::into);
    }
    if let Some(msg) = session.regrouped() {
        println!("resumed on another number of ranks: {msg}");
    }
    let world = session.cfg.world;
    println!(
        "{} training images, {} validation images ({}), {} updates per epoch of {} x {} images{}, on {}",
        session.train_images().len(),
        session.val_images().len(),
        session.cfg.data.display(),
        session.steps_per_epoch(),
        session.cfg.accumulate,
        session.cfg.batch_images,
        if world > 1 {
            format!(
                " x {world} ranks ({})",
                if session.cfg.sync_bn {
                    "SyncBatchNorm"
                } else {
                    "BatchNorm per rank"
                }
            )
        } else {
            String::new()
        },
        session.cfg.device
    );
    let bar = ProgressBar::hidden();
    let mut mean = None::<f64>;
    session.run(&mut |ev| match ev {
        Event::Start { first, last, .. } => {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(*last);
            bar.set_position(*first);
            bar.reset_eta();
            bar.set_style(
                ProgressStyle::with_template(
                    "[{elapsed_precise}] {bar:30} {pos}/{len} updates  {msg}  ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
        }
        Event::Step {
            step,
            epoch,
            loss,
            images_per_s,
            data_wait_s,
        } => {
            let m = mean.map_or(*loss, |m| 0.9 * m + 0.1 * loss);
            mean = Some(m);
            bar.set_position(*step);
            bar.set_message(format!(
                "epoch {epoch}  loss {loss:.4} (avg {m:.4})  {images_per_s:.2} img/s  data wait {:.0} ms",
                data_wait_s * 1e3
            ));
        }
        Event::Validation { step, report } => {
            let per: Vec<String> = report
                .per_modality
                .iter()
                .map(|(m, (d, _, n))| format!("{m} {d:.4} ({n})"))
                .collect();
            bar.println(format!(
                "update {step}: validation Dice {:.4}  IoU {:.4}  over {} masks  [{}]",
                report.dice,
                report.iou,
                report.masks,
                per.join(", ")
            ));
        }
        Event::Checkpoint { path, .. } => {
            bar.println(format!("checkpoint {}", path.display()));
        }
    })?;
    bar.finish_and_clear();
    let out = &session.cfg.out;
    println!(
        "done: {} updates; log {}, plots {} and {}{}",
        session.steps_taken(),
        out.join("log.jsonl").display(),
        out.join("curves.svg").display(),
        out.join("curves.png").display(),
        if out.join("best").is_dir() {
            format!(
                "; best model {}",
                out.join("best/model.safetensors").display()
            )
        } else {
            String::new()
        }
    );
    Ok(())
}
