//! bf16 inference on the CPU against the f32 CPU path (issue 14): both
//! small34 inference fixtures and full-size SAM-UNet-50 with random
//! weights, at the CUDA bf16 path's bounds: logits relative L2 <= 2e-2 and
//! at least 99.5 % of mask pixels equal. Where the CPU has AVX512_BF16 the
//! model goes through `to_device(Cpu, BF16)` (the `vdpbf16ps` kernel);
//! elsewhere the same packing runs through the portable kernel (the same
//! bf16 products), and a bf16 request to `Predictor` runs f32 with a notice.

mod common;

use common::*;
use sam_unet::io::Weights;
use sam_unet::io::image::{RgbImage, read_rgb};
use sam_unet::model::{SamUnet, SamUnetConfig, Trace};
use sam_unet::preprocess::{box_to_model_frame, preprocess};
use sam_unet::{DType, Device, Predictor, PredictorOptions};

/// The model on the CPU in bf16: the AVX512_BF16 kernel where there is one,
/// else the portable kernel on the same packed weights.
fn to_cpu_bf16(m: &mut SamUnet) {
    if sam_unet::cpu::bf16_gemm::has_avx512_bf16() {
        m.to_device(Device::Cpu, DType::BF16).unwrap();
        assert_eq!(m.dtype(), DType::BF16);
    } else {
        println!("no AVX512_BF16 on this CPU: the portable kernel runs the bf16 products");
        let e = m
            .to_device(Device::Cpu, DType::BF16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("AVX512_BF16"), "{e}");
        m.pack_image_side_cpu_bf16(true).unwrap();
    }
}

/// Logits at the original size for `boxes` (image frame).
fn logits(m: &SamUnet, img: &RgbImage, boxes: &[[f32; 4]]) -> Vec<f32> {
    let (x, info) = preprocess(img, m.config.img_size).unwrap();
    let feats = m.encode_image(&x, &mut Trace::default()).unwrap();
    let mb: Vec<[f32; 4]> = boxes
        .iter()
        .map(|b| box_to_model_frame(*b, &info))
        .collect();
    let low = m.decode(&feats, 0, &mb, &mut Trace::default()).unwrap();
    m.postprocess(&low, &info)
        .unwrap()
        .as_f32()
        .unwrap()
        .to_vec()
}

fn compare(name: &str, w: &Weights, img: &RgbImage, boxes: &[[f32; 4]]) {
    let f32m = SamUnet::from_weights(w).unwrap();
    let want = logits(&f32m, img, boxes);
    let mut m = SamUnet::from_weights(w).unwrap();
    to_cpu_bf16(&mut m);
    let got = logits(&m, img, boxes);
    let rel = rel_l2(&got, &want);
    let same = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| (**a > 0.0) == (**b > 0.0))
        .count() as f64
        / want.len() as f64;
    println!(
        "{name} cpu bf16: logits relative L2 {rel:.2e}, {:.3} % of mask pixels equal",
        same * 100.0
    );
    assert!(
        rel > 0.0,
        "{name}: bf16 changed nothing: is the packing used?"
    );
    assert!(
        rel <= 2e-2 && same >= 0.995,
        "{name} bf16: relative L2 {rel}, masks {same}"
    );
    // Back to f32: the packing is dropped, the f32 answers return.
    m.to_device(Device::Cpu, DType::F32).unwrap();
    assert_eq!(m.dtype(), DType::F32);
    assert!(rel_l2(&logits(&m, img, boxes), &want) <= 1e-6);
}

fn small34_infer(name: &str) {
    let Some(dir) = fixtures() else { return };
    let fx = Fixture::load(&fixture(&dir, &format!("small34_infer_{name}.safetensors")));
    let w = Weights::from_file(fixture(&dir, "small34_weights.safetensors")).unwrap();
    let img = read_rgb(data_demo(&dir).join(&fx.meta["image"])).unwrap();
    // The fixture's boxes are in the model's 256 frame; back to the image's.
    let (_, info) = preprocess(&img, 256).unwrap();
    let s = info.orig_w as f32 / info.new_w as f32;
    let t = info.orig_h as f32 / info.new_h as f32;
    let boxes: Vec<[f32; 4]> = fx
        .f("boxes")
        .1
        .chunks(4)
        .map(|b| [b[0] * s, b[1] * t, b[2] * s, b[3] * t])
        .collect();
    compare(&format!("small34_infer_{name}"), &w, &img, &boxes);
}

#[test]
fn cpu_bf16_small34_infer_amos_0004_75() {
    small34_infer("amos_0004_75");
}

#[test]
fn cpu_bf16_small34_infer_s0619_32() {
    small34_infer("s0619_32");
}

fn image(w: usize, h: usize) -> RgbImage {
    RgbImage::new(
        w,
        h,
        (0..w * h * 3).map(|i| ((i * 37 / 3) % 251) as u8).collect(),
    )
    .unwrap()
}

#[test]
fn cpu_bf16_sam_unet_50_random() {
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
            [0.0, 0.0, 511.0, 511.0],
        ],
    );
}

/// A bf16 request to the predictor: bf16 where the CPU has AVX512_BF16,
/// else f32 (with a notice on stderr), never an illegal instruction.
#[test]
fn cpu_bf16_predictor_request() {
    let mut c = SamUnetConfig::named("sam-unet-34").unwrap();
    c.vit_dim = 128;
    c.vit_heads = 2;
    c.vit_mlp_dim = 512;
    let w = c.random_weights(3);
    let opts = PredictorOptions {
        device: Device::Cpu,
        dtype: DType::BF16,
    };
    let mut p = Predictor::from_weights(&w, opts).unwrap();
    let img = image(181, 258);
    p.set_image(&img).unwrap();
    let got = p.predict(&[[10.0, 20.0, 150.0, 200.0]]).unwrap();
    let mut f = Predictor::from_weights(&w, PredictorOptions::default()).unwrap();
    f.set_image(&img).unwrap();
    let want = f.predict(&[[10.0, 20.0, 150.0, 200.0]]).unwrap();
    let rel = rel_l2(got.logits.as_f32().unwrap(), want.logits.as_f32().unwrap());
    if sam_unet::cpu::bf16_gemm::has_avx512_bf16() {
        assert_eq!(p.options().dtype, DType::BF16);
        assert!(rel > 0.0 && rel <= 2e-2, "{rel}");
    } else {
        assert_eq!(
            p.options().dtype,
            DType::F32,
            "the request falls back to f32"
        );
        assert_eq!(rel, 0.0, "the fallback is the f32 path");
    }
}
