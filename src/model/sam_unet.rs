//! The whole model: the ResNet branch feeding the frozen ViT through the
//! adapters, the bridges into the multi-scale feature, the prompt encoder and
//! the mask decoder.

use crate::error::{Error, Result};
use crate::io::Weights;
use crate::model::Trace;
use crate::model::adapters::{Reshaper, Up4};
use crate::model::config::SamUnetConfig;
use crate::model::image_encoder::ImageEncoderViT;
use crate::model::mask_decoder::MaskDecoder;
use crate::model::prompt_encoder::PromptEncoder;
use crate::model::resnet::ResNet;
use crate::ops::activation::{Act, add_};
use crate::ops::layout::{nchw_to_nhwc, nhwc_to_nchw};
use crate::ops::resize::{bilinear, bilinear_crop};
use crate::preprocess::ResizeInfo;
use crate::tensor::Tensor;

/// What the image side computes once per image and every box reuses.
#[derive(Clone, Debug)]
pub struct ImageFeatures {
    /// [B, 256, 16, 16]
    pub image_embeddings: Tensor,
    /// [B, 32, 64, 64]
    pub multi_scale_feature: Tensor,
}

pub struct SamUnet {
    pub config: SamUnetConfig,
    resnet: ResNet,
    vit: ImageEncoderViT,
    adapters_in: Vec<Reshaper>,
    /// adapters_bridge.0..2; bridge 2 - i follows stage i.
    bridges: Vec<Up4>,
    embedding_encoder: Up4,
    prompt: PromptEncoder,
    decoder: MaskDecoder,
    /// [1, 256, 16, 16], fixed for a model.
    dense_pe: Tensor,
    /// The same channels-last, [1, 16 * 16, 256]: the decoder's key positions.
    pos: Tensor,
}

impl SamUnet {
    /// Builds the model from weights whose configuration is read off the tensors;
    /// every expected tensor must be present with its shape, and nothing else.
    pub fn from_weights(w: &Weights) -> Result<Self> {
        let config = SamUnetConfig::from_weights(w)?;
        config.validate(w)?;
        Self::build(config, w, true)
    }

    /// The model to train: BatchNorm kept apart from its convolutions (train
    /// mode, batch statistics; `set_training(false)` for evaluation), every
    /// tensor sharing its storage with `w`'s (so that parameters can be named).
    pub fn for_training(w: &Weights) -> Result<Self> {
        let config = SamUnetConfig::from_weights(w)?;
        config.validate(w)?;
        Self::build(config, w, false)
    }

    /// BatchNorm in train (batch statistics) or eval (running statistics) mode.
    pub fn set_training(&self, on: bool) {
        for bn in self.resnet.batch_norms() {
            bn.training.store(on, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The ResNet's BatchNorms with their state_dict prefixes, in module order.
    pub fn batch_norms(&self) -> Vec<&crate::nn::BatchNorm2d> {
        self.resnet.batch_norms()
    }

    fn build(config: SamUnetConfig, w: &Weights, fold: bool) -> Result<Self> {
        let prompt = PromptEncoder::load(w, config.img_size, config.grid())?;
        let dense_pe = prompt.dense_pe()?;
        let [_, c, g, _] = dense_pe.dims_n::<4>("SamUnet", "dense_pe")?;
        let pos = nchw_to_nhwc(&dense_pe)?.reshape([1, g * g, c])?;
        Ok(SamUnet {
            pos,
            resnet: ResNet::load(w, &config.resnet, fold)?,
            vit: ImageEncoderViT::load(w, &config)?,
            adapters_in: (0..4)
                .map(|i| Reshaper::load(w, i))
                .collect::<Result<_>>()?,
            bridges: (0..3)
                .map(|j| Up4::load(w, &format!("adapters_bridge.{j}")))
                .collect::<Result<_>>()?,
            embedding_encoder: Up4::load(w, "embedding_encoder")?,
            prompt,
            decoder: MaskDecoder::load(w)?,
            dense_pe,
            config,
        })
    }

    /// x [B, 3, S, S] (normalised, padded) -> image features.
    pub fn encode_image(&self, x: &Tensor, trace: &mut Trace) -> Result<ImageFeatures> {
        let _p = crate::profile::scope("encode_image (total)");
        let s = self.config.img_size;
        let [_, c, h, w] = x.dims_n::<4>("encode_image", "input")?;
        if c != 3 || h != s || w != s {
            return Err(Error::shape(
                "encode_image",
                format!("input {:?}, expected [B, 3, {s}, {s}]", x.dims()),
            ));
        }
        let x = &x.to_device(self.device())?;
        let feats = self.resnet.forward(x)?;
        for (i, f) in feats.iter().enumerate() {
            trace.push(format!("resnet.f{}", i + 1), f);
        }
        let mut t = self.vit.embed(x)?;
        trace.push("vit.patch_embed", &t);
        let mut bridge_out: [Option<Tensor>; 3] = [None, None, None];
        for i in 0..4 {
            for b in [3 * i, 3 * i + 1] {
                t = self.vit.blocks[b].forward(&t)?;
                trace.push(format!("vit.block{b}"), &t);
            }
            let a = nchw_to_nhwc(&self.adapters_in[i].forward(&feats[i])?)?;
            trace.push(format!("adapter_in{i}"), &a);
            add_(&mut t, &a)?;
            trace.push(format!("vit.fused{i}"), &t);
            t = self.vit.blocks[3 * i + 2].forward(&t)?;
            trace.push(format!("vit.block{}", 3 * i + 2), &t);
            if i < 3 {
                let j = 2 - i;
                let br = self.bridges[j].forward(&nhwc_to_nchw(&t)?, Act::None)?;
                trace.push(format!("bridge{j}"), &br);
                bridge_out[j] = Some(br);
            }
        }
        let image_embeddings = self.vit.neck(&t)?;
        trace.push("image_embeddings", &image_embeddings);
        let mut msf = self
            .embedding_encoder
            .forward(&image_embeddings, Act::None)?;
        trace.push("embedding_encoder", &msf);
        // ((ee + bridge0) + bridge1) + bridge2, the reference's order.
        for br in bridge_out.iter().flatten() {
            add_(&mut msf, br)?;
        }
        trace.push("multi_scale_feature", &msf);
        Ok(ImageFeatures {
            image_embeddings,
            multi_scale_feature: msf,
        })
    }

    /// Decodes boxes (model frame) against image `index` of `features`:
    /// low-res logits [N, 1, 64, 64].
    pub fn decode(
        &self,
        features: &ImageFeatures,
        index: usize,
        boxes: &[[f32; 4]],
        trace: &mut Trace,
    ) -> Result<Tensor> {
        let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
        let boxes = Tensor::from_f32(flat, &[boxes.len(), 4]).to_device(self.device())?;
        self.decode_boxes(features, index, &boxes, trace)
    }

    /// `decode` with the boxes as a tensor [N, 4] (model frame) on the model's
    /// device: on CUDA it makes no host transfer and no synchronisation, so
    /// it can be recorded into a CUDA graph (crate::cuda::graph).
    pub fn decode_boxes(
        &self,
        features: &ImageFeatures,
        index: usize,
        boxes: &Tensor,
        trace: &mut Trace,
    ) -> Result<Tensor> {
        let b = features
            .image_embeddings
            .dims()
            .first()
            .copied()
            .unwrap_or(0);
        if index >= b || features.multi_scale_feature.dims().first() != Some(&b) {
            return Err(Error::input(
                "decode",
                format!(
                    "image index {index} of features {:?} / {:?}",
                    features.image_embeddings.dims(),
                    features.multi_scale_feature.dims()
                ),
            ));
        }
        let emb = slice_first(&features.image_embeddings, index)?;
        let msf = slice_first(&features.multi_scale_feature, index)?;
        // [N, 3, C]: the med token, then the two corners (one kernel on CUDA).
        let tokens = self
            .prompt
            .box_tokens(boxes, Some(self.decoder.med_token()))?;
        if trace.enabled {
            trace.push("prompt.sparse", &crate::ops::layout::narrow(&tokens, 1, 2)?);
        }
        trace.push("prompt.dense_pe", &self.dense_pe);
        let low =
            self.decoder
                .forward(&emb, &self.pos, &tokens, self.prompt.no_mask_embed(), &msf)?;
        trace.push("low_res_logits", &low);
        Ok(low)
    }

    /// low-res logits [N, 1, 64, 64] -> logits at the original size [N, 1, H, W].
    pub fn postprocess(&self, low: &Tensor, info: &ResizeInfo) -> Result<Tensor> {
        postprocess(low, info, self.config.img_size)
    }
}

/// low-res logits [N, 1, 64, 64] -> logits at the original size [N, 1, H, W]:
/// bilinear to the input side, crop to the resized image, bilinear to H x W.
pub fn postprocess(low: &Tensor, info: &ResizeInfo, s: usize) -> Result<Tensor> {
    let up = bilinear(low, s, s)?;
    bilinear_crop(&up, info.new_h, info.new_w, info.orig_h, info.orig_w)
}

/// x [B, ...] -> [1, ...] the index-th item: a view, no copy.
fn slice_first(x: &Tensor, index: usize) -> Result<Tensor> {
    let mut d = x.dims().to_vec();
    let per: usize = d[1..].iter().product();
    d[0] = 1;
    x.view(index * per, d)
}

crate::params!(SamUnet {
    resnet,
    vit,
    adapters_in,
    bridges,
    embedding_encoder,
    prompt,
    decoder,
    dense_pe,
    pos
});

impl SamUnet {
    /// The device the model's tensors are on.
    pub fn device(&self) -> crate::tensor::Device {
        self.dense_pe.device()
    }

    /// Moves every tensor of the model to `device`. The same module tree then
    /// runs there: each op dispatches on its inputs' device; images and boxes
    /// given on the host are moved to the model's device on the way in.
    ///
    /// `dtype` bf16 on CUDA keeps the image side's GEMM weights (ResNet,
    /// ViT, adapters, bridges, embedding encoder) in bf16, so their GEMMs run
    /// on bf16 inputs with f32 accumulation and the ViT blocks run fused
    /// (ops::attention::vit_block_bf16); every norm, softmax, epilogue and the
    /// whole decoder stay f32. Moving back to f32 widens them again (the
    /// rounding stays). On the CPU, bf16 keeps the weights in f32 and packs
    /// a bf16 copy of each of those GEMMs for the AVX512_BF16 kernel
    /// (`pack_image_side_cpu_bf16`): an error where the CPU lacks it.
    pub fn to_device(
        &mut self,
        device: crate::tensor::Device,
        dtype: crate::tensor::DType,
    ) -> Result<()> {
        use crate::tensor::{DType, Device};
        match (device, dtype) {
            (Device::Cpu, DType::BF16) => {
                if !crate::cpu::bf16_gemm::has_avx512_bf16() {
                    return Err(Error::input(
                        "SamUnet::to_device",
                        "bf16 on the CPU needs AVX512_BF16, which this CPU lacks \
                         (Predictor runs f32 instead, with a notice)",
                    ));
                }
                crate::nn::to_device(self, device)?;
                return self.pack_image_side_cpu_bf16(true);
            }
            (_, DType::F32) | (Device::Cuda(_), DType::BF16) => {}
            (d, t) => {
                return Err(Error::input(
                    "SamUnet::to_device",
                    format!(
                        "the model runs in f32 or (on CUDA) bf16, not {} on {d}",
                        t.name()
                    ),
                ));
            }
        }
        crate::nn::to_device(self, device)?;
        self.pack_image_side_cpu_bf16(false)?;
        if dtype == DType::BF16 {
            for m in self.image_side_mut() {
                crate::nn::gemm_weights_to(m, DType::BF16)?;
            }
        }
        Ok(())
    }

    /// The modules of the image side, whose GEMMs a bf16 model runs in bf16
    /// (the decoder stays f32).
    fn image_side_mut(&mut self) -> [&mut dyn crate::nn::Params; 5] {
        [
            &mut self.resnet,
            &mut self.vit,
            &mut self.adapters_in,
            &mut self.bridges,
            &mut self.embedding_encoder,
        ]
    }

    /// Every GEMM of the image side (ResNet, ViT, adapters, bridges, the
    /// embedding encoder: convolutions, transposed convolutions, linears)
    /// packed for the CPU's bf16 GEMM (`on`), or unpacked; the decoder
    /// stays f32. `to_device(Cpu, BF16)` does this where the CPU has
    /// AVX512_BF16; called directly on another CPU, the same arithmetic
    /// runs through the portable kernel (slower than f32: a reference for
    /// tests).
    pub fn pack_image_side_cpu_bf16(&mut self, on: bool) -> Result<()> {
        for m in self.image_side_mut() {
            m.set_cpu_bf16(on)?;
        }
        Ok(())
    }

    /// The dtype of the image side's GEMM weights (bf16 after
    /// `to_device(_, DType::BF16)`).
    pub fn dtype(&self) -> crate::tensor::DType {
        self.vit
            .blocks
            .first()
            .map_or(crate::tensor::DType::F32, |b| b.dtype())
    }
}
