//! The whole model on CUDA against the CPU backend: the small34 fixture weights
//! on its input, and full-size SAM-UNet-50 with random weights. f32 (TF32 off):
//! relative L2 <= 1e-4 on the logits; bf16: relative L2 <= 2e-2 and at least
//! 99.5 % of mask pixels equal. Own harness: on cuda:0 when there is a GPU,
//! otherwise on the emulated CUDA driver of tests/simt (the whole model's data
//! flow on the device, every launcher and cuBLAS call, with host arithmetic), and it
//! prints which; SAM_UNET_REQUIRE_GPU=1 makes a missing GPU a failure.

use sam_unet::io::Weights;
use sam_unet::io::image::RgbImage;
use sam_unet::model::SamUnetConfig;
use sam_unet::{DType, Device, Predictor, PredictorOptions};

mod common;
mod kernel_check;
mod simt;
use kernel_check::rel_l2;

fn image(w: usize, h: usize) -> RgbImage {
    RgbImage::new(
        w,
        h,
        (0..w * h * 3).map(|i| ((i * 37 / 3) % 251) as u8).collect(),
    )
    .unwrap()
}

fn compare(name: &str, w: &Weights, img: &RgbImage, boxes: &[[f32; 4]]) {
    let mut cpu = Predictor::from_weights(w, PredictorOptions::default()).unwrap();
    cpu.set_image(img).unwrap();
    let want = cpu.predict(boxes).unwrap();
    for dt in [DType::F32, DType::BF16] {
        let mut gpu = Predictor::from_weights(
            w,
            PredictorOptions {
                device: Device::Cuda(0),
                dtype: dt,
            },
        )
        .unwrap();
        // The first image runs eagerly (and records the image side as a CUDA
        // graph), the second replays the recording: both must match.
        for pass in ["eager", "graph replay"] {
            if pass == "graph replay" && sam_unet::cuda::graph::enabled() {
                let g = gpu.cuda_graphs();
                assert_eq!(
                    g.image_batches,
                    vec![(1, true)],
                    "{name}: the image side was not recorded as a CUDA graph"
                );
                assert_eq!(
                    g.decoder_boxes,
                    vec![(boxes.len(), true)],
                    "{name}: the decoder was not recorded as a CUDA graph"
                );
            }
            gpu.set_image(img).unwrap();
            let got = gpu.predict(boxes).unwrap();
            let rel = rel_l2(got.logits.as_f32().unwrap(), want.logits.as_f32().unwrap());
            let same = got
                .masks
                .iter()
                .flatten()
                .zip(want.masks.iter().flatten())
                .filter(|(a, b)| a == b)
                .count() as f64
                / (want.masks.len() * want.width * want.height) as f64;
            println!(
                "{name} {} ({pass}): logits relative L2 {rel:.2e}, {:.3} % of mask pixels equal",
                dt.name(),
                same * 100.0
            );
            match dt {
                DType::F32 => assert!(rel <= 1e-4, "{name} f32: relative L2 {rel}"),
                _ => assert!(
                    rel <= 2e-2 && same >= 0.995,
                    "{name} bf16: relative L2 {rel}, masks {same}"
                ),
            }
        }
        // A predictor moves to a worker thread and keeps working there (its
        // image, its recordings): the same logits as before the move.
        let before = gpu.predict(boxes).unwrap();
        let boxes_owned = boxes.to_vec();
        let after = std::thread::spawn(move || gpu.predict(&boxes_owned).unwrap())
            .join()
            .unwrap();
        let moved = rel_l2(
            after.logits.as_f32().unwrap(),
            before.logits.as_f32().unwrap(),
        );
        println!(
            "{name} {} (on another thread): logits relative L2 to before the move {moved:.2e}",
            dt.name()
        );
        assert!(
            moved <= 1e-6,
            "{name}: predictions changed after moving the predictor to another thread ({moved})"
        );
    }
}

fn small34() {
    let dir = std::env::var("SAM_UNET_FIXTURES").unwrap_or_else(|_| "../shared/fixtures".into());
    let p = std::path::Path::new(&dir).join("small34_weights.safetensors");
    if !p.exists() {
        println!(
            "small34 fixture not found at {} (set SAM_UNET_FIXTURES); using a random small model",
            p.display()
        );
        let mut c = SamUnetConfig::named("sam-unet-34").unwrap();
        c.vit_dim = 128;
        c.vit_heads = 2;
        c.vit_mlp_dim = 512;
        return compare(
            "small random",
            &c.random_weights(3),
            &image(181, 258),
            &[[10.0, 20.0, 150.0, 200.0], [40.0, 5.0, 90.0, 250.0]],
        );
    }
    compare(
        "small34",
        &Weights::from_file(p).unwrap(),
        &image(181, 258),
        &[[10.0, 20.0, 150.0, 200.0], [40.0, 5.0, 90.0, 250.0]],
    );
}

fn sam_unet_50_random() {
    let w = SamUnetConfig::named("sam-unet-50")
        .unwrap()
        .random_weights(1);
    compare(
        "sam-unet-50 random",
        &w,
        &image(512, 512),
        &[
            [30.0, 40.0, 300.0, 260.0],
            [100.0, 100.0, 400.0, 500.0],
            [0.0, 0.0, 512.0, 512.0],
        ],
    );
}

/// The one model tree (src/model) moved to CUDA with `SamUnet::to_device`:
/// every traced intermediate of both small34_infer fixtures, from the
/// fixture's own input and boxes, at the fixtures README tolerances (f32).
fn one_tree_small34_fixtures() {
    use sam_unet::model::{SamUnet, Trace};
    let Some(dir) = common::fixtures() else {
        return;
    };
    let w = Weights::from_file(common::fixture(&dir, "small34_weights.safetensors")).unwrap();
    let mut model = SamUnet::from_weights(&w).unwrap();
    model
        .to_device(Device::Cuda(0), sam_unet::DType::F32)
        .unwrap();
    assert_eq!(model.device(), Device::Cuda(0));
    for name in ["small34_infer_amos_0004_75", "small34_infer_s0619_32"] {
        let fx = common::Fixture::load(&common::fixture(&dir, &format!("{name}.safetensors")));
        let mut trace = Trace::on();
        let feats = model.encode_image(&fx.tensor("input"), &mut trace).unwrap();
        let boxes: Vec<[f32; 4]> = fx
            .f("boxes")
            .1
            .chunks(4)
            .map(|b| [b[0], b[1], b[2], b[3]])
            .collect();
        model.decode(&feats, 0, &boxes, &mut trace).unwrap();
        let mut checked = 0;
        for (n, t) in &trace.items {
            assert_eq!(
                t.device(),
                Device::Cuda(0),
                "{n} was computed off the device"
            );
            if fx.f32s.contains_key(n.as_str()) {
                let host = t.to_host().unwrap();
                print!("{name} cuda: ");
                common::check_intermediate(n, &host, fx.f(n));
                checked += 1;
            }
        }
        println!("{name}: {checked} intermediates checked on cuda:0");
        assert!(checked >= 30, "{name}: only {checked} intermediates traced");
    }
}

fn main() {
    let tests: &[(&str, fn())] = &[
        (
            "cuda_model_one_tree_small34_fixtures",
            one_tree_small34_fixtures,
        ),
        ("cuda_model_small34", small34),
        ("cuda_model_sam_unet_50_random", sam_unet_50_random),
    ];
    match simt::gpu_or_emulator(simt::Build::FAST) {
        Ok(what) => println!("running {} CUDA model tests on {what}", tests.len()),
        Err(e) => {
            if std::env::var("SAM_UNET_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                println!("test cuda_device ... FAILED ({e})");
                std::process::exit(1);
            }
            println!("{e}");
            for (n, _) in tests {
                println!("test {n} ... SKIPPED (needs a GPU)");
            }
            return;
        }
    }
    let mut failed = 0;
    for (n, f) in tests {
        let r = std::panic::catch_unwind(f);
        println!("test {n} ... {}", if r.is_ok() { "ok" } else { "FAILED" });
        failed += r.is_err() as usize;
    }
    if failed > 0 {
        std::process::exit(1);
    }
}
