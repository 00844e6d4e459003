//! End-to-end latency of SAM-UNet with random weights (no file needed).
//!
//!     bench --arch sam-unet-50 --boxes 1,16 --runs 10
//!     bench --arch sam-unet-50 --train 2 --train-boxes 5 --runs 5
//!
//! Per box count, one JSON line: image side (preprocessing + encoder, ms),
//! decoder per box (ms), total for one image with that many boxes (ms); medians
//! over the runs, after one warm-up run.

#[path = "cli.rs"]
mod cli;

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use sam_unet::io::image::RgbImage;
use sam_unet::model::SamUnetConfig;
use sam_unet::{Device, Predictor, PredictorOptions};

#[derive(Parser)]
#[command(about = "Time SAM-UNet end to end with random weights")]
struct Args {
    /// Architecture: sam-unet-50, sam-unet-34 (or sam-unet-18/101/152).
    #[arg(long, default_value = "sam-unet-50")]
    arch: String,
    /// Comma-separated box counts per image.
    #[arg(long, default_value = "1,16", value_delimiter = ',')]
    boxes: Vec<usize>,
    /// Timed runs per configuration (the median is reported).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Side of the synthetic square input image, in pixels.
    #[arg(long, default_value_t = 512)]
    image_size: usize,
    /// cpu, cuda or cuda:N
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// f32 or bf16 (the image side's GEMMs on bf16 inputs with f32 sums: on
    /// CUDA, or on a CPU with AVX512_BF16; elsewhere f32 with a notice)
    #[arg(long, default_value = "f32")]
    dtype: sam_unet::DType,
    /// Also time the image side alone on batches of this many images
    /// (comma-separated), reporting images/s.
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Time training steps instead (forward, backward, Adam; CPU or CUDA)
    /// on this many images per step, each with --train-boxes masks.
    #[arg(long)]
    train: Option<usize>,
    #[arg(long, default_value_t = 5)]
    train_boxes: usize,
    /// Time the online loader instead: batches of --loader-batch images
    /// (--train-boxes masks each) from this prepared folder (`prepare`).
    #[arg(long)]
    loader: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 16)]
    loader_batch: usize,
    /// Time `segment-volume` instead: a synthetic CT of this many slices
    /// (--image-size square) with --objects 3-D boxes, read from and
    /// written to NIfTI.
    #[arg(long)]
    volume: Option<usize>,
    #[arg(long, default_value_t = 3)]
    objects: usize,
}

/// segment-volume's time per slice on a synthetic CT, split into reading,
/// windowing, the image side, the decoder and writing.
fn bench_volume(args: &Args, cfg: &SamUnetConfig, nz: usize) -> Result<()> {
    use sam_unet::volume::{
        Propagation, Window, read_nifti, segment_volume, synthetic_ct, write_labels, write_nifti,
    };
    let s = args.image_size;
    let (v, boxes) = synthetic_ct(s, s, nz, args.objects);
    let dir = std::env::temp_dir().join(format!("sam-unet-bench-volume-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("ct.nii.gz");
    let h = nifti::NiftiHeader {
        pixdim: [1.0, 0.8, 0.8, 2.5, 1.0, 1.0, 1.0, 1.0],
        xyzt_units: 2,
        ..Default::default()
    };
    write_nifti(&src, &h, [s, s, nz], 16, bytemuck::cast_slice(&v), "", 0)?;
    let pred = Predictor::from_weights(
        &cfg.random_weights(0),
        PredictorOptions {
            device: args.device,
            dtype: args.dtype,
        },
    )?;
    let t = std::time::Instant::now();
    let vol = read_nifti(&src)?;
    let read_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let (grey, what) = Window::parse("abdomen")?.apply(&vol);
    let window_s = t.elapsed().as_secs_f64();
    let (labels, tm) = segment_volume(
        &pred,
        &grey,
        vol.dims,
        &boxes,
        Propagation::default(),
        &mut |_, _| {},
    )?;
    let t = std::time::Instant::now();
    write_labels(&dir.join("labels.nii.gz"), &vol, &labels, &what)?;
    let write_s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    let total = read_s + window_s + tm.encode_s + tm.decode_s + write_s;
    println!(
        "{}",
        serde_json::json!({"what": "volume", "arch": args.arch, "device": args.device.to_string(),
            "size": [s, s, nz], "objects": boxes.len(), "slices_encoded": tm.slices, "object_slices": tm.steps,
            "read_s": read_s, "window_s": window_s, "encode_s": tm.encode_s, "decode_s": tm.decode_s,
            "write_s": write_s, "total_s": total, "s_per_slice": total / nz as f64})
    );
    println!(
        "volume {s} x {s} x {nz}, {} objects ({} object slices) on {}: {:.3} s per slice; image side {:.1} %, \
         decoder {:.1} %, read {:.1} %, window {:.1} %, write {:.1} %",
        boxes.len(),
        tm.steps,
        args.device,
        total / nz as f64,
        100.0 * tm.encode_s / total,
        100.0 * tm.decode_s / total,
        100.0 * read_s / total,
        100.0 * window_s / total,
        100.0 * write_s / total
    );
    Ok(())
}

/// The online loader's throughput: `runs` epochs over the prepared folder.
fn bench_loader(args: &Args, dir: &std::path::Path) -> Result<()> {
    use sam_unet::data::loader::{PreparedSet, epoch_order};
    let set = PreparedSet::open(dir)?;
    if set.is_empty() || args.loader_batch == 0 {
        bail!("no images in {} (or --loader-batch 0)", dir.display());
    }
    let (mut images, mut secs) = (0usize, vec![]);
    for epoch in 0..=args.runs as u64 {
        let order = epoch_order(set.len(), 0, epoch);
        let t = Instant::now();
        for ids in order.chunks(args.loader_batch) {
            std::hint::black_box(set.batch(ids, 0, epoch, args.train_boxes)?);
        }
        if epoch > 0 {
            secs.push(t.elapsed().as_secs_f64() / set.len() as f64);
            images += set.len();
        }
    }
    let per = median(&mut secs);
    println!(
        "{}",
        serde_json::json!({
            "what": "loader", "images": images, "batch": args.loader_batch,
            "masks_per_image": args.train_boxes, "threads": rayon::current_num_threads(),
            "images_per_s": (1.0 / per).round(),
        })
    );
    Ok(())
}

/// Peak resident memory of this process (Linux), in MB.
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// One training step timed per phase, `runs` times after a warm-up.
fn bench_train(args: &Args, cfg: &SamUnetConfig, images: usize) -> Result<()> {
    if images == 0 || args.train_boxes == 0 {
        bail!("--train and --train-boxes must be at least 1");
    }
    let w = cfg.random_weights(0);
    let mut tr = sam_unet::train::Trainer::new(&w, args.device, Default::default())?;
    // The trainer holds what it needs (the store has its own copy of the
    // trainable values), as a PyTorch model owns its parameters.
    drop(w);
    let s = cfg.img_size;
    let x = sam_unet::Tensor::from_vec(
        (0..images * 3 * s * s)
            .map(|i| ((i % 977) as f32 / 977.0 - 0.5) * 3.0)
            .collect(),
        [images, 3, s, s],
    )?;
    let boxes: Vec<Vec<[f32; 4]>> = (0..images)
        .map(|i| {
            (0..args.train_boxes)
                .map(|j| {
                    let o = ((i * 13 + j * 7) % 60) as f32;
                    [10.0 + o, 20.0 + o, 150.0 + o, 170.0 + o]
                })
                .collect()
        })
        .collect();
    let labels = (0..images)
        .map(|_| {
            sam_unet::Tensor::from_vec(
                (0..args.train_boxes * s * s)
                    .map(|p| (((p % s) / 32 + (p / s % s) / 32) % 2) as f32)
                    .collect(),
                [args.train_boxes, 1, s, s],
            )
        })
        .collect::<sam_unet::Result<Vec<_>>>()?;
    let batch = sam_unet::train::Batch {
        images: x,
        boxes,
        labels,
    };
    let (mut f, mut b, mut o, mut t) = (vec![], vec![], vec![], vec![]);
    for run in 0..=args.runs {
        let t0 = Instant::now();
        let r = tr.step(&batch)?;
        if run > 0 {
            f.push(r.forward_s * 1e3);
            b.push(r.backward_s * 1e3);
            o.push(r.optimizer_s * 1e3);
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let r2 = |v: f64| (v * 10.0).round() / 10.0;
    println!(
        "{}",
        serde_json::json!({
            "arch": args.arch, "device": args.device.to_string(), "what": "train_step",
            "threads": rayon::current_num_threads(),
            "images": images, "boxes_per_image": args.train_boxes, "runs": args.runs,
            "forward_ms": r2(median(&mut f)), "backward_ms": r2(median(&mut b)),
            "adam_ms": r2(median(&mut o)), "step_ms": r2(median(&mut t)),
            "images_per_s": r2(images as f64 / (median(&mut t) / 1e3)),
            "peak_rss_mb": peak_rss_mb().map(r2),
        })
    );
    if sam_unet::profile::enabled() {
        eprintln!("op profile over all runs (SAM_UNET_PROFILE):");
        for (name, d, n) in sam_unet::profile::take_report() {
            eprintln!("  {name:28} {:9.1} ms  {n:6} calls", d.as_secs_f64() * 1e3);
        }
        gemm_report();
    }
    Ok(())
}

/// The CPU GEMMs by shape (SAM_UNET_PROFILE), with their GFLOP/s.
fn gemm_report() {
    let rows = sam_unet::profile::take_gemm_report();
    if rows.is_empty() {
        return;
    }
    let (mut flops, mut secs) = (0.0, 0.0);
    for ((m, n, k, pooled), d, c) in &rows {
        if *pooled {
            flops += 2.0 * (m * n * k) as f64 * *c as f64;
            secs += d.as_secs_f64();
        }
    }
    eprintln!(
        "CPU GEMMs with the pool: {:.1} GFLOP in {:.1} ms, {:.1} GFLOP/s; by shape (m n k, pool / seq):",
        flops / 1e9,
        secs * 1e3,
        flops / secs.max(1e-9) / 1e9
    );
    // The 25 largest, or every shape with SAM_UNET_PROFILE=all.
    let all = std::env::var("SAM_UNET_PROFILE").is_ok_and(|v| v == "all");
    for ((m, n, k, pooled), d, c) in rows.iter().take(if all { usize::MAX } else { 25 }) {
        let f = 2.0 * (m * n * k) as f64 * *c as f64;
        eprintln!(
            "  {m:6} {n:6} {k:6} {:4} {:9.1} ms {c:6} calls {:7.1} GFLOP/s",
            if *pooled { "pool" } else { "seq" },
            d.as_secs_f64() * 1e3,
            f / d.as_secs_f64().max(1e-9) / 1e9
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn main() -> std::process::ExitCode {
    cli::exit(run(Args::parse()))
}

fn run(args: Args) -> Result<()> {
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("thread pool")?;
    }
    if args.runs == 0 || args.boxes.contains(&0) {
        bail!("--runs and every --boxes count must be at least 1");
    }
    let cfg = SamUnetConfig::named(&args.arch)?;
    if let Some(images) = args.train {
        return bench_train(&args, &cfg, images);
    }
    if let Some(dir) = &args.loader {
        return bench_loader(&args, dir);
    }
    if let Some(nz) = args.volume {
        return bench_volume(&args, &cfg, nz);
    }
    let mut predictor = Predictor::from_weights(
        &cfg.random_weights(0),
        PredictorOptions {
            device: args.device,
            dtype: args.dtype,
        },
    )?;
    // A synthetic CT-like image: smooth gradients and a disc.
    let s = args.image_size;
    let mut data = vec![0u8; s * s * 3];
    for y in 0..s {
        for x in 0..s {
            let d = (((x as f32 - s as f32 / 2.0).powi(2) + (y as f32 - s as f32 / 2.0).powi(2))
                .sqrt()
                / s as f32
                * 512.0) as i32;
            let v = if d < 120 {
                200
            } else {
                ((x + y) * 255 / (2 * s)) as i32
            };
            data[(y * s + x) * 3..(y * s + x) * 3 + 3].fill(v.clamp(0, 255) as u8);
        }
    }
    let img = RgbImage::new(s, s, data)?;
    for &n in &args.boxes {
        let boxes: Vec<[f32; 4]> = (0..n)
            .map(|i| {
                let o = (i * 7 % 50) as f32;
                [
                    20.0 + o,
                    30.0 + o,
                    s as f32 / 2.0 + o,
                    s as f32 / 2.0 + 10.0 + o,
                ]
            })
            .collect();
        let (mut enc, mut dec, mut tot) = (vec![], vec![], vec![]);
        for run in 0..=args.runs {
            let t0 = Instant::now();
            predictor.set_image(&img)?;
            let t1 = Instant::now();
            let pred = predictor.predict(&boxes)?;
            let t2 = Instant::now();
            std::hint::black_box(&pred);
            if run > 0 {
                enc.push((t1 - t0).as_secs_f64() * 1e3);
                dec.push((t2 - t1).as_secs_f64() * 1e3);
                tot.push((t2 - t0).as_secs_f64() * 1e3);
            }
        }
        let dec_ms = median(&mut dec);
        println!(
            "{}",
            serde_json::json!({
                "arch": args.arch,
                "device": args.device.to_string(),
                "dtype": predictor.options().dtype.name(),
                // the CPU's bf16 microkernel (AMX, AVX512_BF16) where bf16 runs there
                "bf16_kernel": (predictor.options().dtype.name() == "bf16" && args.device.to_string() == "cpu")
                    .then(|| sam_unet::cpu::bf16_gemm::Kernel::best().name()),
                "threads": rayon::current_num_threads(),
                "image": format!("{s}x{s}"),
                "boxes": n,
                "runs": args.runs,
                "image_side_ms": (median(&mut enc) * 100.0).round() / 100.0,
                "decoder_ms": (dec_ms * 100.0).round() / 100.0,
                "decoder_per_box_ms": (dec_ms / n as f64 * 100.0).round() / 100.0,
                "total_ms": (median(&mut tot) * 100.0).round() / 100.0,
            })
        );
    }
    for &b in &args.batch {
        if b == 0 {
            bail!("--batch sizes must be at least 1");
        }
        let s = cfg.img_size;
        let x = sam_unet::Tensor::from_vec(
            (0..b * 3 * s * s)
                .map(|i| ((i % 977) as f32 / 977.0 - 0.5) * 3.0)
                .collect(),
            [b, 3, s, s],
        )?;
        let mut times = vec![];
        for run in 0..=args.runs {
            let t = Instant::now();
            predictor.encode_only(&x)?;
            if run > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let ms = median(&mut times);
        println!(
            "{}",
            serde_json::json!({
                "arch": args.arch, "device": args.device.to_string(), "dtype": predictor.options().dtype.name(),
                "what": "image_side", "batch": b, "runs": args.runs,
                "ms": (ms * 100.0).round() / 100.0,
                // three decimals: a slow device (or the emulator) still shows a figure
                "images_per_s": format!("{:.3}", b as f64 / ms * 1e3).parse::<f64>().unwrap_or(0.0),
            })
        );
    }
    if sam_unet::profile::enabled() {
        eprintln!("op profile over all runs (SAM_UNET_PROFILE):");
        for (name, d, n) in sam_unet::profile::take_report() {
            eprintln!("  {name:28} {:9.1} ms  {n:6} calls", d.as_secs_f64() * 1e3);
        }
    }
    Ok(())
}
