//! SAM-UNet's starting point (MODEL.md, "Starting weights"): Meta's SAM ViT-B
//! checkpoint brought to the model's input size exactly as the official loader
//! does, torchvision ResNet weights mapped onto the `resnet.` branch, and every
//! new module initialised as PyTorch would (seeded, so reproducible).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::io::Weights;
use crate::io::pth::RawTensor;
use crate::model::config::{Kind, SamUnetConfig};
use crate::ops::layout::{nchw_to_nhwc, nhwc_to_nchw};
use crate::ops::resize::bilinear;
use crate::tensor::Tensor;

/// What the conversion did, for the user to read.
#[derive(Debug, Default)]
pub struct InitReport {
    /// (source name, SAM-UNet name)
    pub mapped: Vec<(String, String)>,
    /// Source tensors with no place in SAM-UNet.
    pub dropped: Vec<String>,
    /// (name, how) of tensors resized to the new input.
    pub interpolated: Vec<(String, String)>,
    /// (name, how) of new modules' tensors.
    pub initialised: Vec<(String, &'static str)>,
}

fn f32_of(name: &str, t: &RawTensor) -> Result<Tensor> {
    t.to_tensor().ok_or_else(|| Error::TensorDType {
        name: name.into(),
        dtype: t.dtype.name().into(),
    })
}

/// The official loader's work on SAM's own names, for an `img_size` input:
/// `pos_embed` [1, G0, G0, D] -> [1, G, G, D] and the global blocks' rel-pos
/// tables (2 G0 - 1 rows) -> 2 G - 1 rows, both by bilinear interpolation
/// (align_corners = False, no antialias); the IoU head, mask tokens and
/// hypernetwork MLPs dropped. Window-block tables are kept.
pub fn sam_to_input_size(
    sam: &[(String, RawTensor)],
    img_size: usize,
    report: &mut InitReport,
) -> Result<BTreeMap<String, Tensor>> {
    let patch = sam
        .iter()
        .find(|(n, _)| n == "image_encoder.patch_embed.proj.weight")
        .map(|(_, t)| t.shape.get(2).copied().unwrap_or(16))
        .ok_or_else(|| Error::MissingTensor {
            name: "image_encoder.patch_embed.proj.weight".into(),
            expected: vec![],
        })?;
    crate::model::config::check_img_size(img_size)
        .map_err(|e| Error::Config(format!("img_size: {e}")))?;
    if patch != 16 {
        return Err(Error::Config(format!(
            "image_encoder.patch_embed.proj.weight has {patch}-pixel patches; SAM-UNet needs 16"
        )));
    }
    let g = img_size / patch.max(1);
    let g0 = sam
        .iter()
        .find(|(n, _)| n == "image_encoder.pos_embed")
        .and_then(|(_, t)| t.shape.get(1).copied())
        .ok_or_else(|| Error::MissingTensor {
            name: "image_encoder.pos_embed".into(),
            expected: vec![],
        })?;
    let mut out = BTreeMap::new();
    for (name, t) in sam {
        let dropped = [
            "mask_decoder.mask_tokens",
            "mask_decoder.iou_token",
            "mask_decoder.output_hypernetworks_mlps",
            "mask_decoder.iou_prediction_head",
        ]
        .iter()
        .any(|p| name.starts_with(p));
        if dropped {
            report.dropped.push(name.clone());
            continue;
        }
        if !t.dtype.is_float() {
            report.dropped.push(format!("{name} ({})", t.dtype.name()));
            continue;
        }
        let x = f32_of(name, t)?;
        let x = if name == "image_encoder.pos_embed" && g != g0 {
            // [1, G0, G0, D] -> [1, D, G0, G0] -> resize -> [1, G, G, D]
            let r = nchw_to_nhwc(&bilinear(&nhwc_to_nchw(&x)?, g, g)?)?;
            report
                .interpolated
                .push((name.clone(), format!("{g0} x {g0} -> {g} x {g} (bilinear)")));
            r
        } else if name.starts_with("image_encoder.blocks.")
            && (name.ends_with("attn.rel_pos_h") || name.ends_with("attn.rel_pos_w"))
            && x.dims()[0] == 2 * g0 - 1
            && g != g0
        {
            // A global block's table, [2 G0 - 1, C] seen as a 1 x 1 x L x C image.
            let [l, c] = x.dims_n::<2>("rel_pos", name)?;
            let r = bilinear(&x.reshape([1, 1, l, c])?, 2 * g - 1, c)?.reshape([2 * g - 1, c])?;
            report.interpolated.push((
                name.clone(),
                format!("{l} -> {} rows (bilinear)", 2 * g - 1),
            ));
            r
        } else {
            x
        };
        out.insert(name.clone(), x);
    }
    Ok(out)
}

/// SAM's module names -> SAM-UNet's.
fn sam_name(name: &str) -> Option<String> {
    for (from, to) in [
        ("image_encoder.", "image_encoder.sam_img_encoder."),
        ("prompt_encoder.", "prompt_encoder.sam_prompt_encoder."),
        ("mask_decoder.", "mask_decoder.sam_mask_decoder."),
    ] {
        if let Some(rest) = name.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    None
}

/// torchvision ResNet names -> `resnet.` names (`fc` has no place).
fn resnet_name(name: &str) -> Option<String> {
    let name = name.strip_prefix("module.").unwrap_or(name);
    if let Some(rest) = name.strip_prefix("conv1.") {
        return Some(format!("resnet.stage0.0.{rest}"));
    }
    if let Some(rest) = name.strip_prefix("bn1.") {
        return Some(format!("resnet.stage0.1.{rest}"));
    }
    for k in 1..=4 {
        if let Some(rest) = name.strip_prefix(&format!("layer{k}.")) {
            return Some(format!("resnet.stage{k}.{rest}"));
        }
    }
    None
}

/// Seeded generator: splitmix64 uniforms, Box-Muller normals.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The SAM-UNet starting point from SAM's and a ResNet's state dicts.
pub fn starting_weights(
    sam: &[(String, RawTensor)],
    resnet: &[(String, RawTensor)],
    img_size: usize,
    seed: u64,
) -> Result<(Weights, SamUnetConfig, InitReport)> {
    let mut report = InitReport::default();
    let mut w = Weights::new();
    for (name, t) in sam_to_input_size(sam, img_size, &mut report)? {
        match sam_name(&name) {
            Some(n) => {
                report.mapped.push((name, n.clone()));
                w.insert(n, t);
            }
            None => report.dropped.push(name),
        }
    }
    for (name, t) in resnet {
        match resnet_name(name) {
            Some(n) if t.dtype.is_float() => {
                report.mapped.push((name.clone(), n.clone()));
                w.insert(n, f32_of(name, t)?);
            }
            _ => report.dropped.push(name.clone()),
        }
    }
    let cfg = SamUnetConfig::from_weights(&w)?;
    let specs = cfg.param_specs();
    let shapes: std::collections::HashMap<&str, &[usize]> = specs
        .iter()
        .map(|s| (s.name.as_str(), s.shape.as_slice()))
        .collect();
    let mut rng = Rng(seed);
    for spec in &specs {
        if w.contains(&spec.name) {
            continue;
        }
        let name = spec.name.as_str();
        let new_module = [
            "adapters_in.",
            "adapters_bridge.",
            "embedding_encoder.",
            "mask_decoder.med_token",
            "mask_decoder.embedding_maskfeature.",
            "mask_decoder.hf_mlp.",
        ]
        .iter()
        .any(|p| name.starts_with(p));
        if !new_module || matches!(spec.kind, Kind::Buffer) {
            return Err(Error::MissingTensor {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
            });
        }
        let n: usize = spec.shape.iter().product();
        let (stem, leaf) = name.rsplit_once('.').unwrap_or((name, ""));
        // The module's weight decides what it is: 1-d LayerNorm, 4-d conv, 2-d linear.
        let weight = shapes
            .get(format!("{stem}.weight").as_str())
            .copied()
            .unwrap_or(&spec.shape);
        // Reshaper convolutions (not the transposed one of stage 3).
        let reshaper_conv = name.starts_with("adapters_in.")
            && weight.len() == 4
            && !name.starts_with("adapters_in.3.reshaper.0.");
        let (values, how): (Vec<f32>, &'static str) = if name == "mask_decoder.med_token.weight" {
            (
                (0..n).map(|_| rng.normal() as f32).collect(),
                "normal(0, 1)",
            )
        } else if weight.len() == 1 {
            if leaf == "weight" {
                (vec![1.0; n], "ones (LayerNorm)")
            } else {
                (vec![0.0; n], "zeros (LayerNorm)")
            }
        } else if reshaper_conv && leaf == "bias" {
            (vec![0.0; n], "zeros")
        } else if reshaper_conv {
            // kaiming_normal_(mode='fan_out', nonlinearity='relu'): std = sqrt(2 / fan_out)
            let fan_out = weight[0] * weight[2..].iter().product::<usize>();
            let std = (2.0 / fan_out as f64).sqrt();
            (
                (0..n).map(|_| (rng.normal() * std) as f32).collect(),
                "kaiming normal (fan_out, relu)",
            )
        } else {
            // PyTorch's default for Linear / Conv2d / ConvTranspose2d, weight and
            // bias: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = numel / dim 0.
            let fan_in = weight.iter().product::<usize>() / weight[0].max(1);
            let b = 1.0 / (fan_in.max(1) as f64).sqrt();
            (
                (0..n)
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * b) as f32)
                    .collect(),
                "uniform(+-1/sqrt(fan_in)), PyTorch's default",
            )
        };
        report.initialised.push((spec.name.clone(), how));
        w.insert(
            spec.name.clone(),
            Tensor::from_vec(values, spec.shape.clone())?,
        );
    }
    cfg.validate(&w)?;
    Ok((w, cfg, report))
}
