//! SAM-UNet's configuration, read off a weights file or named, and the complete
//! list of its state_dict entries (name, shape, parameter or buffer, trainable),
//! from which parameter counts, weight validation and random init follow.

use crate::error::{Error, Result};
use crate::io::Weights;

const IE: &str = "image_encoder.sam_img_encoder";
const PE: &str = "prompt_encoder.sam_prompt_encoder";
const MD: &str = "mask_decoder";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResNetConfig {
    /// Residual blocks per stage (layer1..layer4).
    pub blocks: [usize; 4],
    /// Bottleneck blocks (ResNet-50 and deeper) instead of basic blocks.
    pub bottleneck: bool,
}

impl ResNetConfig {
    pub fn depth(depth: usize) -> Result<Self> {
        let (blocks, bottleneck) = match depth {
            18 => ([2, 2, 2, 2], false),
            34 => ([3, 4, 6, 3], false),
            50 => ([3, 4, 6, 3], true),
            101 => ([3, 4, 23, 3], true),
            152 => ([3, 8, 36, 3], true),
            _ => {
                return Err(Error::Config(format!(
                    "ResNet depth {depth} is not one of 18, 34, 50, 101, 152"
                )));
            }
        };
        Ok(ResNetConfig { blocks, bottleneck })
    }
    /// The torchvision depth name, when the block counts are a standard one.
    pub fn name(&self) -> String {
        let layers: usize =
            self.blocks.iter().sum::<usize>() * if self.bottleneck { 3 } else { 2 } + 2;
        format!("ResNet-{layers}")
    }
    pub fn expansion(&self) -> usize {
        if self.bottleneck { 4 } else { 1 }
    }
    /// Output channels of stage i (0..4): f1..f4.
    pub fn out_channels(&self, i: usize) -> usize {
        (64 << i) * self.expansion()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SamUnetConfig {
    /// Square model input side (256).
    pub img_size: usize,
    pub patch_size: usize,
    pub vit_dim: usize,
    pub vit_depth: usize,
    pub vit_heads: usize,
    pub vit_mlp_dim: usize,
    pub window_size: usize,
    pub global_blocks: Vec<usize>,
    /// Neck output and prompt width (256).
    pub prompt_dim: usize,
    pub resnet: ResNetConfig,
}

/// Whether an entry is a learnable parameter (trainable or frozen) or a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Param { trainable: bool },
    Buffer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: Kind,
    /// How a fresh model initialises it (for random weights).
    pub init: Init,
}

impl ParamSpec {
    /// A trainable parameter that box prompts reach: every trainable one but
    /// the prompt encoder's `point_embeddings.0/1`, `not_a_point_embed` and
    /// `mask_downscaling.*` (MODEL.md: they exist, get no gradient, no Adam
    /// state, and never change).
    pub fn gets_gradient_with_boxes(&self) -> bool {
        self.kind == (Kind::Param { trainable: true })
            && ![
                ".point_embeddings.0.",
                ".point_embeddings.1.",
                ".not_a_point_embed.",
                ".mask_downscaling.",
            ]
            .iter()
            .any(|k| self.name.contains(k))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = numel / shape[0]
    /// (Linear, Conv2d and ConvTranspose2d alike)
    FanIn,
    Ones,
    Zeros,
    Normal,
}

/// The largest model input side accepted (SAM's own is 1024).
pub const MAX_IMG_SIZE: usize = 4096;

/// Whether `size` can be SAM-UNet's input side: the ResNet branch halves the
/// image five times and the adapters bring its features to the ViT's grid of
/// 16-pixel patches, so the side must be a multiple of 32 (at most
/// `MAX_IMG_SIZE`). The reason when not.
pub fn check_img_size(size: usize) -> std::result::Result<(), String> {
    if size == 0 || size % 32 != 0 || size > MAX_IMG_SIZE {
        return Err(format!(
            "the input side must be a multiple of 32 from 32 to {MAX_IMG_SIZE} (the ResNet \
             branch halves it five times), not {size}"
        ));
    }
    Ok(())
}

impl SamUnetConfig {
    fn base(resnet_depth: usize) -> Result<Self> {
        Ok(SamUnetConfig {
            img_size: 256,
            patch_size: 16,
            vit_dim: 768,
            vit_depth: 12,
            vit_heads: 12,
            vit_mlp_dim: 3072,
            window_size: 14,
            global_blocks: vec![2, 5, 8, 11],
            prompt_dim: 256,
            resnet: ResNetConfig::depth(resnet_depth)?,
        })
    }

    /// `sam-unet-50`, `sam-unet-34` (ViT-B with that ResNet), or
    /// `sam-unet-<depth>`; `sam-unet-small-<depth>`: the test fixtures'
    /// narrow ViT (width 128, 2 heads, MLP 512; the same 12 blocks and
    /// adapters) with that ResNet, for experiments on a CPU.
    pub fn named(name: &str) -> Result<Self> {
        if let Some(d) = name.strip_prefix("sam-unet-small-") {
            let depth = d.parse::<usize>().map_err(|_| {
                Error::Config(format!(
                    "unknown architecture `{name}` (sam-unet-small-18/34/50)"
                ))
            })?;
            return Ok(SamUnetConfig {
                vit_dim: 128,
                vit_heads: 2,
                vit_mlp_dim: 512,
                ..Self::base(depth)?
            });
        }
        let depth = name
            .strip_prefix("sam-unet-")
            .and_then(|d| d.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown architecture `{name}` (sam-unet-50, sam-unet-34, sam-unet-18/101/152, sam-unet-small-<depth>)"
                ))
            })?;
        Self::base(depth)
    }

    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }
    pub fn head_dim(&self) -> usize {
        self.vit_dim / self.vit_heads
    }
    pub fn is_global(&self, block: usize) -> bool {
        self.global_blocks.contains(&block)
    }

    /// Reads the configuration off the tensors' names and shapes (MODEL.md).
    pub fn from_weights(w: &Weights) -> Result<Self> {
        let shape = |n: &str| -> Result<Vec<usize>> {
            w.get(n)
                .map(|t| t.dims().to_vec())
                .ok_or_else(|| w.missing(n, vec![]))
        };
        let pe = shape(&format!("{IE}.patch_embed.proj.weight"))?;
        if pe.len() != 4 || pe[1] != 3 || pe[2] != pe[3] || pe[2] == 0 {
            return Err(Error::Config(format!(
                "{IE}.patch_embed.proj.weight has shape {pe:?}, expected [D, 3, p, p]"
            )));
        }
        let (vit_dim, patch_size) = (pe[0], pe[2]);
        let pos = shape(&format!("{IE}.pos_embed"))?;
        if pos.len() != 4 || pos[1] != pos[2] || pos[3] != vit_dim {
            return Err(Error::Config(format!(
                "{IE}.pos_embed has shape {pos:?}, expected [1, G, G, {vit_dim}]"
            )));
        }
        let grid = pos[1];
        if patch_size != 16 {
            return Err(Error::Config(format!(
                "{IE}.patch_embed.proj.weight has {patch_size}-pixel patches; SAM-UNet's \
                 adapters bring the ResNet features to a grid of 16-pixel patches"
            )));
        }
        check_img_size(grid * patch_size).map_err(|e| {
            Error::Config(format!(
                "{IE}.pos_embed is a {grid} x {grid} grid, a {} pixel input: {e}",
                grid * patch_size
            ))
        })?;
        let mut depth = 0;
        while w.contains(&format!("{IE}.blocks.{depth}.norm1.weight")) {
            depth += 1;
        }
        if depth != 12 {
            return Err(Error::Config(format!(
                "found {depth} ViT blocks; SAM-UNet's four stages need 12"
            )));
        }
        let rel0 = shape(&format!("{IE}.blocks.0.attn.rel_pos_h"))?;
        if rel0.len() != 2 || rel0[1] == 0 || vit_dim % rel0[1] != 0 {
            return Err(Error::Config(format!(
                "{IE}.blocks.0.attn.rel_pos_h has shape {rel0:?}, expected [2S-1, head_dim]"
            )));
        }
        let head_dim = rel0[1];
        let mut global_blocks = vec![];
        let mut window_size = 0;
        for b in 0..depth {
            let r = shape(&format!("{IE}.blocks.{b}.attn.rel_pos_h"))?;
            if r.len() != 2 || r[0] % 2 == 0 {
                return Err(Error::Config(format!(
                    "{IE}.blocks.{b}.attn.rel_pos_h has shape {r:?}"
                )));
            }
            if r[0] == 2 * grid - 1 {
                global_blocks.push(b);
            } else if window_size == 0 || window_size == r[0].div_ceil(2) {
                window_size = r[0].div_ceil(2);
            } else {
                return Err(Error::Config(format!(
                    "block {b}: rel-pos table of {} rows, other window blocks have {}",
                    r[0],
                    2 * window_size - 1
                )));
            }
        }
        if global_blocks != [2, 5, 8, 11] {
            return Err(Error::Config(format!(
                "global-attention blocks {global_blocks:?}; SAM-UNet has 2, 5, 8, 11"
            )));
        }
        let mlp = shape(&format!("{IE}.blocks.0.mlp.lin1.weight"))?;
        let prompt = shape(&format!("{IE}.neck.0.weight"))?;
        let mut blocks = [0usize; 4];
        for (s, n) in blocks.iter_mut().enumerate() {
            while w.contains(&format!("resnet.stage{}.{}.conv1.weight", s + 1, *n)) {
                *n += 1;
            }
            if *n == 0 {
                return Err(Error::MissingTensor {
                    name: format!("resnet.stage{}.0.conv1.weight", s + 1),
                    expected: vec![],
                });
            }
        }
        let bottleneck = w.contains("resnet.stage1.0.conv3.weight");
        Ok(SamUnetConfig {
            img_size: grid * patch_size,
            patch_size,
            vit_dim,
            vit_depth: depth,
            vit_heads: vit_dim / head_dim,
            vit_mlp_dim: mlp.first().copied().unwrap_or(4 * vit_dim),
            window_size,
            global_blocks,
            prompt_dim: prompt.first().copied().unwrap_or(256),
            resnet: ResNetConfig { blocks, bottleneck },
        })
    }

    /// Every state_dict entry of the official model, in module order.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let mut v = Vec::new();
        let d = self.vit_dim;
        let pd = self.prompt_dim;
        let frozen = Kind::Param { trainable: false };
        let train = Kind::Param { trainable: true };
        let mut p = |name: String, shape: Vec<usize>, kind: Kind, init: Init| {
            v.push(ParamSpec {
                name,
                shape,
                kind,
                init,
            })
        };
        // --- image encoder (frozen) ---
        let ps = self.patch_size;
        p(
            format!("{IE}.pos_embed"),
            vec![1, self.grid(), self.grid(), d],
            frozen,
            Init::Zeros,
        );
        p(
            format!("{IE}.patch_embed.proj.weight"),
            vec![d, 3, ps, ps],
            frozen,
            Init::FanIn,
        );
        p(
            format!("{IE}.patch_embed.proj.bias"),
            vec![d],
            frozen,
            Init::Zeros,
        );
        for b in 0..self.vit_depth {
            let pre = format!("{IE}.blocks.{b}");
            let s = if self.is_global(b) {
                self.grid()
            } else {
                self.window_size
            };
            p(format!("{pre}.norm1.weight"), vec![d], frozen, Init::Ones);
            p(format!("{pre}.norm1.bias"), vec![d], frozen, Init::Zeros);
            p(
                format!("{pre}.attn.rel_pos_h"),
                vec![2 * s - 1, self.head_dim()],
                frozen,
                Init::Zeros,
            );
            p(
                format!("{pre}.attn.rel_pos_w"),
                vec![2 * s - 1, self.head_dim()],
                frozen,
                Init::Zeros,
            );
            p(
                format!("{pre}.attn.qkv.weight"),
                vec![3 * d, d],
                frozen,
                Init::FanIn,
            );
            p(
                format!("{pre}.attn.qkv.bias"),
                vec![3 * d],
                frozen,
                Init::Zeros,
            );
            p(
                format!("{pre}.attn.proj.weight"),
                vec![d, d],
                frozen,
                Init::FanIn,
            );
            p(
                format!("{pre}.attn.proj.bias"),
                vec![d],
                frozen,
                Init::Zeros,
            );
            p(format!("{pre}.norm2.weight"), vec![d], frozen, Init::Ones);
            p(format!("{pre}.norm2.bias"), vec![d], frozen, Init::Zeros);
            p(
                format!("{pre}.mlp.lin1.weight"),
                vec![self.vit_mlp_dim, d],
                frozen,
                Init::FanIn,
            );
            p(
                format!("{pre}.mlp.lin1.bias"),
                vec![self.vit_mlp_dim],
                frozen,
                Init::Zeros,
            );
            p(
                format!("{pre}.mlp.lin2.weight"),
                vec![d, self.vit_mlp_dim],
                frozen,
                Init::FanIn,
            );
            p(format!("{pre}.mlp.lin2.bias"), vec![d], frozen, Init::Zeros);
        }
        p(
            format!("{IE}.neck.0.weight"),
            vec![pd, d, 1, 1],
            frozen,
            Init::FanIn,
        );
        p(format!("{IE}.neck.1.weight"), vec![pd], frozen, Init::Ones);
        p(format!("{IE}.neck.1.bias"), vec![pd], frozen, Init::Zeros);
        p(
            format!("{IE}.neck.2.weight"),
            vec![pd, pd, 3, 3],
            frozen,
            Init::FanIn,
        );
        p(format!("{IE}.neck.3.weight"), vec![pd], frozen, Init::Ones);
        p(format!("{IE}.neck.3.bias"), vec![pd], frozen, Init::Zeros);

        // --- ResNet branch ---
        let bn = |p: &mut dyn FnMut(String, Vec<usize>, Kind, Init), pre: String, c: usize| {
            p(format!("{pre}.weight"), vec![c], train, Init::Ones);
            p(format!("{pre}.bias"), vec![c], train, Init::Zeros);
            p(
                format!("{pre}.running_mean"),
                vec![c],
                Kind::Buffer,
                Init::Zeros,
            );
            p(
                format!("{pre}.running_var"),
                vec![c],
                Kind::Buffer,
                Init::Ones,
            );
        };
        p(
            "resnet.stage0.0.weight".into(),
            vec![64, 3, 7, 7],
            train,
            Init::FanIn,
        );
        bn(&mut p, "resnet.stage0.1".into(), 64);
        let r = &self.resnet;
        let mut inp = 64;
        for s in 0..4 {
            let planes = 64 << s;
            let out = planes * r.expansion();
            for bi in 0..r.blocks[s] {
                let pre = format!("resnet.stage{}.{bi}", s + 1);
                if r.bottleneck {
                    p(
                        format!("{pre}.conv1.weight"),
                        vec![planes, inp, 1, 1],
                        train,
                        Init::FanIn,
                    );
                    bn(&mut p, format!("{pre}.bn1"), planes);
                    p(
                        format!("{pre}.conv2.weight"),
                        vec![planes, planes, 3, 3],
                        train,
                        Init::FanIn,
                    );
                    bn(&mut p, format!("{pre}.bn2"), planes);
                    p(
                        format!("{pre}.conv3.weight"),
                        vec![out, planes, 1, 1],
                        train,
                        Init::FanIn,
                    );
                    bn(&mut p, format!("{pre}.bn3"), out);
                } else {
                    p(
                        format!("{pre}.conv1.weight"),
                        vec![planes, inp, 3, 3],
                        train,
                        Init::FanIn,
                    );
                    bn(&mut p, format!("{pre}.bn1"), planes);
                    p(
                        format!("{pre}.conv2.weight"),
                        vec![planes, planes, 3, 3],
                        train,
                        Init::FanIn,
                    );
                    bn(&mut p, format!("{pre}.bn2"), planes);
                }
                let stride = if s > 0 && bi == 0 { 2 } else { 1 };
                if bi == 0 && (stride != 1 || inp != out) {
                    p(
                        format!("{pre}.downsample.0.weight"),
                        vec![out, inp, 1, 1],
                        train,
                        Init::FanIn,
                    );
                    bn(&mut p, format!("{pre}.downsample.1"), out);
                }
                inp = out;
            }
        }

        // --- adapters ---
        let conv = |p: &mut dyn FnMut(String, Vec<usize>, Kind, Init),
                    pre: String,
                    o: usize,
                    c: usize,
                    k: usize| {
            p(
                format!("{pre}.weight"),
                vec![o, c, k, k],
                train,
                Init::FanIn,
            );
            p(format!("{pre}.bias"), vec![o], train, Init::Zeros);
        };
        let convt =
            |p: &mut dyn FnMut(String, Vec<usize>, Kind, Init), pre: String, c: usize, o: usize| {
                p(
                    format!("{pre}.weight"),
                    vec![c, o, 2, 2],
                    train,
                    Init::FanIn,
                );
                p(format!("{pre}.bias"), vec![o], train, Init::Zeros);
            };
        let ln = |p: &mut dyn FnMut(String, Vec<usize>, Kind, Init), pre: String, c: usize| {
            p(format!("{pre}.weight"), vec![c], train, Init::Ones);
            p(format!("{pre}.bias"), vec![c], train, Init::Zeros);
        };
        for i in 0..4 {
            let c = r.out_channels(i);
            let pre = format!("adapters_in.{i}.reshaper");
            match i {
                0 => {
                    conv(&mut p, format!("{pre}.0"), 2 * c, c, 3);
                    ln(&mut p, format!("{pre}.1"), 2 * c);
                    conv(&mut p, format!("{pre}.3"), 4 * c, 2 * c, 3);
                    ln(&mut p, format!("{pre}.4"), 4 * c);
                    conv(&mut p, format!("{pre}.6"), d, 4 * c, 1);
                }
                1 => {
                    conv(&mut p, format!("{pre}.0"), 2 * c, c, 3);
                    ln(&mut p, format!("{pre}.1"), 2 * c);
                    conv(&mut p, format!("{pre}.3"), d, 2 * c, 1);
                }
                2 => conv(&mut p, format!("{pre}.0"), d, c, 1),
                _ => {
                    convt(&mut p, format!("{pre}.0"), c, c / 2);
                    ln(&mut p, format!("{pre}.1"), c / 2);
                    conv(&mut p, format!("{pre}.3"), d, c / 2, 1);
                }
            }
        }
        for j in 0..3 {
            let pre = format!("adapters_bridge.{j}");
            convt(&mut p, format!("{pre}.0"), d, 256);
            ln(&mut p, format!("{pre}.1"), 256);
            convt(&mut p, format!("{pre}.3"), 256, 32);
        }
        convt(&mut p, "embedding_encoder.0".into(), pd, 64);
        ln(&mut p, "embedding_encoder.1".into(), 64);
        convt(&mut p, "embedding_encoder.3".into(), 64, 32);

        // --- prompt encoder ---
        p(
            format!("{PE}.pe_layer.positional_encoding_gaussian_matrix"),
            vec![2, pd / 2],
            Kind::Buffer,
            Init::Normal,
        );
        for k in 0..4 {
            p(
                format!("{PE}.point_embeddings.{k}.weight"),
                vec![1, pd],
                train,
                Init::Normal,
            );
        }
        p(
            format!("{PE}.not_a_point_embed.weight"),
            vec![1, pd],
            train,
            Init::Normal,
        );
        conv(&mut p, format!("{PE}.mask_downscaling.0"), 4, 1, 2);
        ln(&mut p, format!("{PE}.mask_downscaling.1"), 4);
        conv(&mut p, format!("{PE}.mask_downscaling.3"), 16, 4, 2);
        ln(&mut p, format!("{PE}.mask_downscaling.4"), 16);
        conv(&mut p, format!("{PE}.mask_downscaling.6"), pd, 16, 1);
        p(
            format!("{PE}.no_mask_embed.weight"),
            vec![1, pd],
            train,
            Init::Normal,
        );

        // --- mask decoder ---
        let lin =
            |p: &mut dyn FnMut(String, Vec<usize>, Kind, Init), pre: String, o: usize, i: usize| {
                p(format!("{pre}.weight"), vec![o, i], train, Init::FanIn);
                p(format!("{pre}.bias"), vec![o], train, Init::Zeros);
            };
        let tr = format!("{MD}.sam_mask_decoder.transformer");
        let attn =
            |p: &mut dyn FnMut(String, Vec<usize>, Kind, Init), pre: String, inner: usize| {
                for n in ["q_proj", "k_proj", "v_proj"] {
                    lin(p, format!("{pre}.{n}"), inner, pd);
                }
                lin(p, format!("{pre}.out_proj"), pd, inner);
            };
        for l in 0..2 {
            let pre = format!("{tr}.layers.{l}");
            attn(&mut p, format!("{pre}.self_attn"), pd);
            ln(&mut p, format!("{pre}.norm1"), pd);
            attn(&mut p, format!("{pre}.cross_attn_token_to_image"), pd / 2);
            ln(&mut p, format!("{pre}.norm2"), pd);
            lin(&mut p, format!("{pre}.mlp.lin1"), 2048, pd);
            lin(&mut p, format!("{pre}.mlp.lin2"), pd, 2048);
            ln(&mut p, format!("{pre}.norm3"), pd);
            ln(&mut p, format!("{pre}.norm4"), pd);
            attn(&mut p, format!("{pre}.cross_attn_image_to_token"), pd / 2);
        }
        attn(&mut p, format!("{tr}.final_attn_token_to_image"), pd / 2);
        ln(&mut p, format!("{tr}.norm_final_attn"), pd);
        let up = format!("{MD}.sam_mask_decoder.output_upscaling");
        convt(&mut p, format!("{up}.0"), pd, 64);
        ln(&mut p, format!("{up}.1"), 64);
        convt(&mut p, format!("{up}.3"), 64, 32);
        p(
            format!("{MD}.med_token.weight"),
            vec![1, pd],
            train,
            Init::Normal,
        );
        conv(&mut p, format!("{MD}.embedding_maskfeature.0"), 64, 32, 3);
        ln(&mut p, format!("{MD}.embedding_maskfeature.1"), 64);
        conv(&mut p, format!("{MD}.embedding_maskfeature.3"), 32, 64, 3);
        lin(&mut p, format!("{MD}.hf_mlp.layers.0"), pd, pd);
        lin(&mut p, format!("{MD}.hf_mlp.layers.1"), pd, pd);
        lin(&mut p, format!("{MD}.hf_mlp.layers.2"), 32, pd);
        v
    }

    /// (total, trainable) learnable parameter counts, as PyTorch counts them.
    pub fn parameter_counts(&self) -> (usize, usize) {
        let (mut total, mut trainable) = (0, 0);
        for s in self.param_specs() {
            if let Kind::Param { trainable: t } = s.kind {
                let n: usize = s.shape.iter().product();
                total += n;
                if t {
                    trainable += n;
                }
            }
        }
        (total, trainable)
    }

    /// Checks that `w` holds exactly the model's entries with the right shapes.
    /// BatchNorm's integer `num_batches_tracked` may be present or not.
    pub fn validate(&self, w: &Weights) -> Result<()> {
        let specs = self.param_specs();
        let mut known = std::collections::HashSet::new();
        for s in &specs {
            known.insert(s.name.as_str());
            match w.get(&s.name) {
                None => {
                    return Err(w.missing(&s.name, s.shape.clone()));
                }
                Some(t) if t.dims() != s.shape.as_slice() => {
                    return Err(Error::TensorShape {
                        name: s.name.clone(),
                        expected: s.shape.clone(),
                        got: t.dims().to_vec(),
                    });
                }
                _ => {}
            }
        }
        // Every value finite (a parallel scan: ~0.14 G values for SAM-UNet-50).
        // Weights are f32 on the CPU (f16 / bf16 / f64 files are converted
        // at load), so `as_f32` sees every tensor.
        for s in &specs {
            if let Some(Ok(v)) = w.get(&s.name).map(|t| t.as_f32()) {
                use rayon::prelude::*;
                let first = v.par_iter().position_first(|x| !x.is_finite());
                if let Some(first) = first {
                    return Err(Error::NonFiniteWeights {
                        name: s.name.clone(),
                        count: v.par_iter().filter(|x| !x.is_finite()).count(),
                        first,
                    });
                }
            }
        }
        for (name, t) in w.iter() {
            if !known.contains(name) {
                return Err(Error::UnexpectedTensor {
                    name: name.to_string(),
                    shape: t.dims().to_vec(),
                });
            }
        }
        for (name, shape) in w.non_float() {
            let is_bn_counter = name
                .strip_suffix(".num_batches_tracked")
                .is_some_and(|pre| known.contains(format!("{pre}.running_mean").as_str()));
            if !is_bn_counter {
                return Err(Error::UnexpectedTensor {
                    name: name.to_string(),
                    shape: shape.to_vec(),
                });
            }
        }
        Ok(())
    }
}

impl SamUnetConfig {
    /// Random weights for this configuration (seeded, reproducible): enough to run
    /// and time the model; the masks they give are random.
    pub fn random_weights(&self, seed: u64) -> Weights {
        let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            // xorshift64*: a uniform in [0, 1).
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut w = Weights::new();
        for s in self.param_specs() {
            let n: usize = s.shape.iter().product();
            let fan = |k: usize| 1.0 / (k.max(1) as f32).sqrt();
            let v: Vec<f32> = match s.init {
                Init::Ones => vec![1.0; n],
                Init::Zeros => (0..n).map(|_| (next() - 0.5) * 0.02).collect(),
                Init::Normal => (0..n).map(|_| (next() - 0.5) * 3.4).collect(),
                // PyTorch's fan-in is numel / shape[0] for Linear, Conv2d and
                // ConvTranspose2d alike (C_out * k * k for the latter).
                Init::FanIn => {
                    let b = fan(n / s.shape[0].max(1));
                    (0..n).map(|_| (next() * 2.0 - 1.0) * b).collect()
                }
            };
            w.insert(s.name.clone(), crate::tensor::Tensor::from_f32(v, &s.shape));
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_names_give_the_fixture_width() {
        // small34_config.json: 29,900,844 parameters, 26,723,244 trainable.
        assert_eq!(
            SamUnetConfig::named("sam-unet-small-34")
                .unwrap()
                .parameter_counts(),
            (29_900_844, 26_723_244)
        );
        assert!(SamUnetConfig::named("sam-unet-small-x").is_err());
    }

    #[test]
    fn official_parameter_counts() {
        assert_eq!(
            SamUnetConfig::named("sam-unet-50")
                .unwrap()
                .parameter_counts(),
            (138_428_204, 51_755_564)
        );
        assert_eq!(
            SamUnetConfig::named("sam-unet-34")
                .unwrap()
                .parameter_counts(),
            (116_019_884, 29_347_244)
        );
    }

    #[test]
    fn unknown_arch_is_an_error() {
        assert!(SamUnetConfig::named("sam-unet-42").is_err());
        assert!(SamUnetConfig::named("vit-h").is_err());
    }
}
