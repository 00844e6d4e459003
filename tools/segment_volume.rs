//! Segments objects in a CT or MR volume from 3-D boxes (src/volume).
//!
//!     segment-volume --weights W --image ct.nii.gz \
//!         --box3d 120,80,40,260,210,72 --box3d 300,90,50,380,200,66 \
//!         --window abdomen --out labels.nii.gz
//!
//! `--image` also takes a folder holding one DICOM series (the labels are
//! then written as NIfTI on the series' grid). Boxes are x0,y0,z0,x1,y1,z1
//! in voxel indices (maxima exclusive); slice z
//! is the volume's x-y plane. Each box is propagated from its middle slice
//! up and down as MedSAM-Lite does; object k gets label k (from 1). The
//! labels are written as uint8 NIfTI on the image's grid (its qform, sform
//! and voxel size), the intensity window used in the header's description.

#[path = "cli.rs"]
mod cli;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use sam_unet::volume::{Box3d, Propagation, Window, read_volume, segment_volume, write_labels};
use sam_unet::{DType, Device, Predictor, PredictorOptions};

#[derive(Parser)]
#[command(about = "Segment a CT / MR volume (NIfTI) from 3-D boxes")]
struct Args {
    /// SAM-UNet weights: safetensors, .pth, or random:ARCH[:SEED].
    #[arg(long)]
    weights: String,
    /// The volume: a .nii / .nii.gz file (NIfTI-1, 3-D) or a folder holding
    /// one DICOM series.
    #[arg(long)]
    image: PathBuf,
    /// x0,y0,z0,x1,y1,z1 in voxels (maxima exclusive); repeatable.
    #[arg(long = "box3d", value_parser = parse_box3d, required = true)]
    boxes: Vec<Box3d>,
    /// Intensity to 8 bits: abdomen, lung, brain, mediastinum (CT windows),
    /// mr (0.5 / 99.5 percentiles of non-zero voxels), wide (of all voxels),
    /// or W,L.
    #[arg(long, default_value = "wide")]
    window: String,
    /// The label volume to write (.nii or .nii.gz).
    #[arg(long)]
    out: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// f32 or bf16 (the image side's GEMMs on bf16 inputs with f32 sums: on
    /// CUDA, or on a CPU with AVX512_BF16; elsewhere f32 with a notice).
    #[arg(long, default_value = "f32")]
    dtype: DType,
    /// Pixels added around the previous slice's mask box.
    #[arg(long, default_value_t = 3)]
    margin: usize,
    /// Slices through the image side together.
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

fn parse_box3d(s: &str) -> std::result::Result<Box3d, String> {
    Box3d::parse(s).map_err(|e| e.to_string())
}

fn main() -> std::process::ExitCode {
    cli::exit(run(Args::parse()))
}

fn run(a: Args) -> Result<()> {
    cli::output_ending("--out", &a.out, &[".nii", ".nii.gz"])?;
    cli::not_an_input("--out", &a.out, &[("--image", &a.image)])?;
    let window = Window::parse(&a.window)?;
    let t0 = Instant::now();
    let vol = read_volume(&a.image)?;
    let [nx, ny, nz] = vol.dims;
    let (grey, what) = window.apply(&vol);
    println!(
        "{}: {nx} x {ny} x {nz} voxels of {:.3} x {:.3} x {:.3}; {what} (read in {:.2} s)",
        a.image.display(),
        vol.spacing[0],
        vol.spacing[1],
        vol.spacing[2],
        t0.elapsed().as_secs_f64()
    );
    let w = cli::load_weights(&a.weights)?;
    let pred = Predictor::from_weights(
        &w,
        PredictorOptions {
            device: a.device,
            dtype: a.dtype,
        },
    )?;
    drop(w);
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:30} {pos}/{len} slice steps  ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t1 = Instant::now();
    let (labels, timing) = segment_volume(
        &pred,
        &grey,
        vol.dims,
        &a.boxes,
        Propagation {
            margin: a.margin,
            batch: a.batch,
        },
        &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    let secs = t1.elapsed().as_secs_f64();
    write_labels(&a.out, &vol, &labels, &what)?;
    let plane = nx * ny;
    for k in 0..a.boxes.len() {
        let n = labels.iter().filter(|&&l| l as usize == k + 1).count();
        let slices = (0..nz)
            .filter(|&z| {
                labels[z * plane..(z + 1) * plane]
                    .iter()
                    .any(|&l| l as usize == k + 1)
            })
            .count();
        println!("object {}: {n} voxels on {slices} slices", k + 1);
    }
    println!(
        "{} in {secs:.2} s on {}: image side {:.2} s for {} slices ({:.3} s each), decoder {:.2} s for {} \
         object slices ({:.4} s each); labels {}",
        a.image.display(),
        a.device,
        timing.encode_s,
        timing.slices,
        timing.encode_s / timing.slices.max(1) as f64,
        timing.decode_s,
        timing.steps,
        timing.decode_s / timing.steps.max(1) as f64,
        a.out.display()
    );
    Ok(())
}
