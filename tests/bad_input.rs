//! Bad input gets a typed error, never a panic: corrupt and truncated weights,
//! missing / unexpected / mis-shaped tensors, empty and unreadable images, boxes
//! outside the image, inverted or NaN, zero boxes, a missing GPU.

mod common;

use std::path::PathBuf;

use sam_unet::io::Weights;
use sam_unet::io::image::{RgbImage, read_mask, read_rgb};
use sam_unet::model::{SamUnet, SamUnetConfig};
use sam_unet::{Device, Error, Predictor, PredictorOptions, Tensor};

fn tmp(name: &str) -> PathBuf {
    common::scratch().join(name)
}

/// A small random model: the fixture-sized configuration (ViT width 128, 2 heads,
/// ResNet-18), built without any file.
fn small_config() -> SamUnetConfig {
    let mut c = SamUnetConfig::named("sam-unet-18").unwrap();
    c.vit_dim = 128;
    c.vit_heads = 2;
    c.vit_mlp_dim = 512;
    c
}

fn small_weights() -> Weights {
    small_config().random_weights(1)
}

fn image(w: usize, h: usize) -> RgbImage {
    RgbImage::new(w, h, (0..w * h * 3).map(|i| (i % 251) as u8).collect()).unwrap()
}

#[test]
fn corrupt_and_truncated_weights_files() {
    let p = tmp("garbage.safetensors");
    std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    assert!(matches!(
        Weights::from_file(&p),
        Err(Error::WeightsFile { .. })
    ));
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(
        Weights::from_file(&p),
        Err(Error::WeightsFile { .. })
    ));
    // A valid file cut in the middle of its data.
    let good = tmp("good.safetensors");
    small_weights().save(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = tmp("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = Weights::from_file(&cut).unwrap_err();
    assert!(matches!(e, Error::WeightsFile { .. }), "{e}");
    // Round trip of the good one builds a model.
    let w = Weights::from_file(&good).unwrap();
    assert!(SamUnet::from_weights(&w).is_ok());
    assert!(matches!(
        Weights::from_file(tmp("does-not-exist.safetensors")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn missing_unexpected_and_misshaped_tensors_are_named() {
    let name = "mask_decoder.hf_mlp.layers.2.weight";
    let mut w = small_weights();
    w.insert(name, Tensor::zeros([31, 256]));
    let e = SamUnet::from_weights(&w)
        .err()
        .expect("mis-shaped tensor accepted");
    let msg = e.to_string();
    assert!(
        matches!(e, Error::TensorShape { .. })
            && msg.contains(name)
            && msg.contains("[31, 256]")
            && msg.contains("[32, 256]"),
        "{msg}"
    );

    let mut w2 = Weights::new();
    for (n, t) in small_weights().iter() {
        if n != "resnet.stage3.1.bn2.running_var" {
            w2.insert(n, t.clone());
        }
    }
    let e = SamUnet::from_weights(&w2)
        .err()
        .expect("missing tensor accepted");
    assert!(
        matches!(&e, Error::MissingTensor { name, .. } if name == "resnet.stage3.1.bn2.running_var"),
        "{e}"
    );

    let mut w3 = small_weights();
    w3.insert("mask_decoder.iou_token.weight", Tensor::zeros([1, 256]));
    let e = SamUnet::from_weights(&w3)
        .err()
        .expect("unexpected tensor accepted");
    assert!(
        matches!(&e, Error::UnexpectedTensor { name, .. } if name == "mask_decoder.iou_token.weight"),
        "{e}"
    );

    // A configuration the model cannot have.
    let mut w4 = small_weights();
    w4.insert(
        "image_encoder.sam_img_encoder.patch_embed.proj.weight",
        Tensor::zeros([128, 4, 16, 16]),
    );
    assert!(matches!(SamUnet::from_weights(&w4), Err(Error::Config(_))));
    assert!(SamUnet::from_weights(&Weights::new()).is_err());

    // NaN or infinite values (a diverged run's checkpoint): named, counted.
    let name = "image_encoder.sam_img_encoder.blocks.3.mlp.lin1.bias";
    let mut w5 = small_weights();
    let mut v = w5.req(name).unwrap().as_f32().unwrap().to_vec();
    v[7] = f32::NAN;
    v[9] = f32::INFINITY;
    let n = v.len();
    w5.insert(name, Tensor::from_vec(v, [n]).unwrap());
    let e = SamUnet::from_weights(&w5)
        .err()
        .expect("NaN weights accepted");
    assert!(
        matches!(&e, Error::NonFiniteWeights { name: m, count: 2, first: 7 } if m == name),
        "{e}"
    );

    // A tensor of the model stored with an integer dtype: said so, not "missing".
    let name = "adapters_bridge.0.0.bias";
    let mut recs = vec![];
    for (n, t) in small_weights().iter() {
        let (dt, bytes) = if n == name {
            let b: Vec<u8> = t
                .as_f32()
                .unwrap()
                .iter()
                .flat_map(|&x| (x as i16).to_le_bytes())
                .collect();
            (safetensors::Dtype::I16, b)
        } else {
            let b: Vec<u8> = t
                .as_f32()
                .unwrap()
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            (safetensors::Dtype::F32, b)
        };
        recs.push((n.to_string(), dt, t.dims().to_vec(), bytes));
    }
    let p = tmp("i16.safetensors");
    sam_unet::io::weights::write_safetensors(&p, &recs).unwrap();
    let e = SamUnet::from_weights(&Weights::from_file(&p).unwrap())
        .err()
        .expect("an integer tensor accepted");
    assert!(
        matches!(&e, Error::TensorDType { name: m, dtype } if m == name && dtype == "I16"),
        "{e}"
    );
}

#[test]
fn bad_images() {
    assert!(matches!(RgbImage::new(0, 10, vec![]), Err(Error::Image(_))));
    assert!(matches!(
        RgbImage::new(4, 4, vec![0; 5]),
        Err(Error::Image(_))
    ));
    let p = tmp("not-an-image.png");
    std::fs::write(&p, b"\x89PNG\r\n\x1a\n this is not a png").unwrap();
    assert!(matches!(read_rgb(&p), Err(Error::Image(_))));
    assert!(matches!(read_mask(&p), Err(Error::Image(_))));
    assert!(matches!(
        read_rgb(tmp("missing.png")),
        Err(Error::Io { .. })
    ));
    // An image struct made by hand with inconsistent fields.
    let p = Predictor::new(
        SamUnet::from_weights(&small_weights()).unwrap(),
        PredictorOptions::default(),
    )
    .unwrap();
    let bogus = RgbImage {
        width: 0,
        height: 0,
        data: vec![],
    };
    assert!(
        p.predict_batch(&[bogus], &[vec![[0.0, 0.0, 1.0, 1.0]]])
            .is_err()
    );
}

#[test]
fn bad_boxes_and_calls() {
    let mut p = Predictor::new(
        SamUnet::from_weights(&small_weights()).unwrap(),
        PredictorOptions::default(),
    )
    .unwrap();
    assert!(
        matches!(
            p.predict(&[[0.0, 0.0, 5.0, 5.0]]),
            Err(Error::InvalidInput { .. })
        ),
        "predict before set_image"
    );
    p.set_image(&image(64, 48)).unwrap();
    for b in [
        [10.0, 10.0, 5.0, 20.0],        // inverted
        [10.0, 10.0, 10.0, 20.0],       // empty
        [f32::NAN, 0.0, 5.0, 5.0],      // NaN
        [0.0, 0.0, f32::INFINITY, 5.0], // infinite
        [0.0, 0.0, 65.0, 10.0],         // past the right edge
        [-3.0, 0.0, 10.0, 10.0],        // before the left edge
        [0.0, 40.0, 10.0, 49.0],        // past the bottom
    ] {
        assert!(
            matches!(
                p.predict(&[[1.0, 1.0, 9.0, 9.0], b]),
                Err(Error::InvalidBox { index: 1, .. })
            ),
            "{b:?}"
        );
    }
    assert!(matches!(p.predict(&[]), Err(Error::InvalidInput { .. })));
    let ok = p
        .predict(&[[0.0, 0.0, 64.0, 48.0], [3.0, 4.0, 20.0, 30.0]])
        .unwrap();
    assert_eq!((ok.masks.len(), ok.width, ok.height), (2, 64, 48));
    assert_eq!(ok.logits.dims(), &[2, 1, 48, 64]);
    assert_eq!(ok.low_res_logits.dims(), &[2, 1, 64, 64]);
    assert!(ok.logits.as_f32().unwrap().iter().all(|v| v.is_finite()));
    // Batch calls check their lengths.
    assert!(p.predict_batch(&[image(8, 8)], &[]).is_err());
}

#[test]
fn unavailable_devices_and_dtypes_are_errors() {
    let m = || SamUnet::from_weights(&small_weights()).unwrap();
    // This machine may or may not have a GPU; a device that cannot exist always fails cleanly.
    let e = Predictor::from_weights(
        &small_weights(),
        PredictorOptions {
            device: Device::Cuda(999),
            dtype: sam_unet::DType::F32,
        },
    )
    .err()
    .unwrap();
    assert!(matches!(e, Error::CudaUnavailable(_)), "{e}");
    // cuda:0 fails with the same typed error where there is no GPU (on a GPU
    // machine it is a working device, tested in tests/cuda_model.rs).
    if sam_unet::cuda::CudaDevice::new(0).is_err() {
        let e = Predictor::new(
            m(),
            PredictorOptions {
                device: Device::Cuda(0),
                dtype: sam_unet::DType::F32,
            },
        )
        .err()
        .unwrap();
        assert!(matches!(e, Error::CudaUnavailable(_)), "{e}");
    }
    // The CPU computes in f32, or bf16 GEMMs where it has AVX512_BF16 (a
    // bf16 request elsewhere runs f32); f16 it does not.
    assert!(
        Predictor::new(
            m(),
            PredictorOptions {
                device: Device::Cpu,
                dtype: sam_unet::DType::F16
            }
        )
        .is_err()
    );
    let p = Predictor::new(
        m(),
        PredictorOptions {
            device: Device::Cpu,
            dtype: sam_unet::DType::BF16,
        },
    )
    .unwrap();
    let want = if sam_unet::cpu::bf16_gemm::has_avx512_bf16() {
        sam_unet::DType::BF16
    } else {
        sam_unet::DType::F32
    };
    assert_eq!(p.options().dtype, want);
    assert!("cuda:x".parse::<Device>().is_err());
    assert_eq!("cuda:1".parse::<Device>().unwrap(), Device::Cuda(1));
}

#[test]
fn batch_equals_single_image_calls() {
    let model = SamUnet::from_weights(&small_weights()).unwrap();
    let mut p = Predictor::new(model, PredictorOptions::default()).unwrap();
    let (a, b) = (image(64, 48), image(30, 70));
    let (ba, bb) = (
        vec![[2.0, 3.0, 40.0, 30.0]],
        vec![[1.0, 1.0, 20.0, 60.0], [5.0, 5.0, 25.0, 25.0]],
    );
    let batch = p
        .predict_batch(&[a.clone(), b.clone()], &[ba.clone(), bb.clone()])
        .unwrap();
    p.set_image(&a).unwrap();
    let sa = p.predict(&ba).unwrap();
    p.set_image(&b).unwrap();
    let sb = p.predict(&bb).unwrap();
    for (x, y) in [(&batch[0], &sa), (&batch[1], &sb)] {
        let (rel, _, _) = common::errors(x.logits.as_f32().unwrap(), y.logits.as_f32().unwrap());
        assert!(rel < 1e-5, "batched vs single: {rel}");
    }
}

#[test]
fn predictor_can_move_to_another_thread() {
    // A server moves a predictor into its worker thread (on any backend).
    fn assert_send<T: Send>() {}
    assert_send::<sam_unet::Predictor>();
}
