//! SAM-UNet on the GPU: the same module tree as `crate::model`, with every
//! tensor on the device; the image side runs once per image (a batch of images
//! in one call), the decoder for all boxes of an image in one batch, from the
//! box prompt encoding to the mask logits at the original size. Only the boxes
//! go up (N x 4 floats) and only the logits come down.

use cudarc::driver::CudaSlice;

use crate::cuda::blas::Blas;
use crate::cuda::nn::{GpuConv, GpuConvT, GpuLinear, GpuNorm, GpuUp4};
use crate::cuda::vit::GpuVitBlock;
use crate::cuda::{CudaDevice, GpuTensor, driver_err};
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::model::config::SamUnetConfig;
use crate::model::prompt_encoder::PromptEncoder;
use crate::ops::activation::{Act, cuda as act};
use crate::ops::attention::cuda::mha;
use crate::ops::layout::cuda::{nchw_to_nhwc, nhwc_to_nchw, repeat};
use crate::ops::prompt::cuda::box_tokens;
use crate::tensor::{DType, Tensor};

const IE: &str = "image_encoder.sam_img_encoder";

enum Block {
    Basic {
        c1: GpuConv,
        c2: GpuConv,
        ds: Option<GpuConv>,
    },
    Bottleneck {
        c1: GpuConv,
        c2: GpuConv,
        c3: GpuConv,
        ds: Option<GpuConv>,
    },
}

enum Reshaper {
    Down4(GpuConv, GpuNorm, GpuConv, GpuNorm, GpuConv),
    Down2(GpuConv, GpuNorm, GpuConv),
    Same(GpuConv),
    Up2(GpuConvT, GpuNorm, GpuConv),
}

struct Attn {
    q: GpuLinear,
    k: GpuLinear,
    v: GpuLinear,
    o: GpuLinear,
}

impl Attn {
    fn load(dev: &CudaDevice, w: &Weights, pre: &str) -> Result<Self> {
        let l = |n: &str| GpuLinear::load(dev, w, &format!("{pre}.{n}"));
        Ok(Attn {
            q: l("q_proj")?,
            k: l("k_proj")?,
            v: l("v_proj")?,
            o: l("out_proj")?,
        })
    }
    fn forward(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        residual: Option<&GpuTensor>,
    ) -> Result<GpuTensor> {
        let (q, k, v) = (
            self.q.forward(dev, blas, q, None, Act::None)?,
            self.k.forward(dev, blas, k, None, Act::None)?,
            self.v.forward(dev, blas, v, None, Act::None)?,
        );
        let o = mha(dev, &q, &k, &v, 8)?;
        self.o.forward(dev, blas, &o, residual, Act::None)
    }
}

struct TwoWayLayer {
    self_attn: Attn,
    norm1: GpuNorm,
    t2i: Attn,
    norm2: GpuNorm,
    lin1: GpuLinear,
    lin2: GpuLinear,
    norm3: GpuNorm,
    norm4: GpuNorm,
    i2t: Attn,
    skip_pe: bool,
}

/// The image side's outputs, on the device.
pub struct GpuFeatures {
    /// [B, 256, 16, 16]
    pub image_embeddings: GpuTensor,
    /// [B, 32, 64, 64]
    pub multi_scale_feature: GpuTensor,
}

pub struct GpuSamUnet {
    pub config: SamUnetConfig,
    stem: GpuConv,
    stages: Vec<Vec<Block>>,
    patch_embed: GpuConv,
    /// [G * G * D]
    pos_embed: CudaSlice<f32>,
    blocks: Vec<GpuVitBlock>,
    neck: (GpuConv, GpuNorm, GpuConv, GpuNorm),
    adapters_in: Vec<Reshaper>,
    bridges: Vec<GpuUp4>,
    embedding_encoder: GpuUp4,
    /// Box encoding: Gaussian [2, C/2], corner embeddings [C] x 2.
    box_gauss: CudaSlice<f32>,
    box_e0: CudaSlice<f32>,
    box_e1: CudaSlice<f32>,
    /// [HW * C], dense PE channels-last
    pos_cl: CudaSlice<f32>,
    /// [C]
    no_mask: CudaSlice<f32>,
    /// [C]
    med_token: CudaSlice<f32>,
    layers: Vec<TwoWayLayer>,
    final_attn: Attn,
    norm_final: GpuNorm,
    upscaling: GpuUp4,
    emf: (GpuConv, GpuNorm, GpuConv),
    hf: [GpuLinear; 3],
}

impl GpuSamUnet {
    /// Uploads a validated model; `dtype` bf16 runs the image side's GEMMs (ViT,
    /// ResNet, adapters, bridges) on bf16 inputs with f32 accumulation and the
    /// ViT attention on tensor cores; the decoder and every norm, softmax and
    /// epilogue stay f32.
    pub fn from_weights(dev: &CudaDevice, w: &Weights, dtype: DType) -> Result<Self> {
        let config = SamUnetConfig::from_weights(w)?;
        config.validate(w)?;
        if config.head_dim() != 64 {
            return Err(Error::Config(format!(
                "the CUDA attention kernel needs head dim 64, this model has {}",
                config.head_dim()
            )));
        }
        // bf16: the image side's convolutions run their GEMMs in bf16 too; the
        // decoder (a few small GEMMs per box, next to the mask) stays f32.
        let bf16 = dtype == DType::BF16;
        let c =
            |p: &str, s: usize, pad: usize| GpuConv::load(dev, w, p, s, pad)?.with_bf16(dev, bf16);
        let cb = |p: &str, bn: &str, s: usize, pad: usize| {
            GpuConv::load_bn(dev, w, p, bn, s, pad)?.with_bf16(dev, bf16)
        };
        let c32 = |p: &str, s: usize, pad: usize| GpuConv::load(dev, w, p, s, pad);
        let n2 = |p: &str| GpuNorm::load(dev, w, p, 1e-6);
        let mut stages = vec![];
        for s in 0..4 {
            let mut blocks = vec![];
            for b in 0..config.resnet.blocks[s] {
                let pre = format!("resnet.stage{}.{b}", s + 1);
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let ds = if w.contains(&format!("{pre}.downsample.0.weight")) {
                    Some(cb(
                        &format!("{pre}.downsample.0"),
                        &format!("{pre}.downsample.1"),
                        stride,
                        0,
                    )?)
                } else {
                    None
                };
                let cv = |n: &str, bn: &str, st: usize, pad: usize| {
                    cb(&format!("{pre}.{n}"), &format!("{pre}.{bn}"), st, pad)
                };
                blocks.push(if config.resnet.bottleneck {
                    Block::Bottleneck {
                        c1: cv("conv1", "bn1", 1, 0)?,
                        c2: cv("conv2", "bn2", stride, 1)?,
                        c3: cv("conv3", "bn3", 1, 0)?,
                        ds,
                    }
                } else {
                    Block::Basic {
                        c1: cv("conv1", "bn1", stride, 1)?,
                        c2: cv("conv2", "bn2", 1, 1)?,
                        ds,
                    }
                });
            }
            stages.push(blocks);
        }
        let adapters_in = (0..4)
            .map(|i| {
                let p = |j: usize| format!("adapters_in.{i}.reshaper.{j}");
                Ok(match i {
                    0 => Reshaper::Down4(
                        c(&p(0), 2, 1)?,
                        n2(&p(1))?,
                        c(&p(3), 2, 1)?,
                        n2(&p(4))?,
                        c(&p(6), 1, 0)?,
                    ),
                    1 => Reshaper::Down2(c(&p(0), 2, 1)?, n2(&p(1))?, c(&p(3), 1, 0)?),
                    2 => Reshaper::Same(c(&p(0), 1, 0)?),
                    _ => Reshaper::Up2(
                        GpuConvT::load(dev, w, &p(0))?.with_bf16(dev, bf16)?,
                        n2(&p(1))?,
                        c(&p(3), 1, 0)?,
                    ),
                })
            })
            .collect::<Result<_>>()?;
        let prompt = PromptEncoder::load(w, config.img_size, config.grid())?;
        let dense = prompt.dense_pe(); // [1, C, G, G]
        let (pc, hw) = (prompt.dim(), config.grid() * config.grid());
        let dv = dense.as_f32()?;
        let pos_cl: Vec<f32> = (0..hw)
            .flat_map(|p| (0..pc).map(move |ch| (p, ch)))
            .map(|(p, ch)| dv[ch * hw + p])
            .collect();
        let tr = "mask_decoder.sam_mask_decoder.transformer";
        let ln5 = |p: &str| GpuNorm::load(dev, w, p, 1e-5);
        let layers = (0..2)
            .map(|l| {
                let pre = format!("{tr}.layers.{l}");
                Ok(TwoWayLayer {
                    self_attn: Attn::load(dev, w, &format!("{pre}.self_attn"))?,
                    norm1: ln5(&format!("{pre}.norm1"))?,
                    t2i: Attn::load(dev, w, &format!("{pre}.cross_attn_token_to_image"))?,
                    norm2: ln5(&format!("{pre}.norm2"))?,
                    lin1: GpuLinear::load(dev, w, &format!("{pre}.mlp.lin1"))?,
                    lin2: GpuLinear::load(dev, w, &format!("{pre}.mlp.lin2"))?,
                    norm3: ln5(&format!("{pre}.norm3"))?,
                    norm4: ln5(&format!("{pre}.norm4"))?,
                    i2t: Attn::load(dev, w, &format!("{pre}.cross_attn_image_to_token"))?,
                    skip_pe: l == 0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(GpuSamUnet {
            stem: cb("resnet.stage0.0", "resnet.stage0.1", 2, 3)?,
            stages,
            patch_embed: c(&format!("{IE}.patch_embed.proj"), config.patch_size, 0)?,
            pos_embed: dev.upload(w.req(&format!("{IE}.pos_embed"))?.as_f32()?)?,
            blocks: (0..config.vit_depth)
                .map(|b| {
                    GpuVitBlock::upload(
                        dev,
                        w,
                        &format!("{IE}.blocks.{b}"),
                        config.vit_heads,
                        if config.is_global(b) {
                            0
                        } else {
                            config.window_size
                        },
                        dtype,
                    )
                })
                .collect::<Result<_>>()?,
            neck: (
                c(&format!("{IE}.neck.0"), 1, 0)?,
                n2(&format!("{IE}.neck.1"))?,
                c(&format!("{IE}.neck.2"), 1, 1)?,
                n2(&format!("{IE}.neck.3"))?,
            ),
            adapters_in,
            bridges: (0..3)
                .map(|j| GpuUp4::load(dev, w, &format!("adapters_bridge.{j}"), bf16))
                .collect::<Result<_>>()?,
            embedding_encoder: GpuUp4::load(dev, w, "embedding_encoder", bf16)?,
            pos_cl: dev.upload(&pos_cl)?,
            no_mask: dev.upload(prompt.no_mask_embed().as_f32()?)?,
            box_gauss: dev.upload(prompt.box_tables().0)?,
            box_e0: dev.upload(prompt.box_tables().1)?,
            box_e1: dev.upload(prompt.box_tables().2)?,
            med_token: dev.upload(w.req("mask_decoder.med_token.weight")?.as_f32()?)?,
            layers,
            final_attn: Attn::load(dev, w, &format!("{tr}.final_attn_token_to_image"))?,
            norm_final: ln5(&format!("{tr}.norm_final_attn"))?,
            upscaling: GpuUp4::load(
                dev,
                w,
                "mask_decoder.sam_mask_decoder.output_upscaling",
                false,
            )?,
            emf: (
                c32("mask_decoder.embedding_maskfeature.0", 1, 1)?,
                n2("mask_decoder.embedding_maskfeature.1")?,
                c32("mask_decoder.embedding_maskfeature.3", 1, 1)?,
            ),
            hf: [
                GpuLinear::load(dev, w, "mask_decoder.hf_mlp.layers.0")?,
                GpuLinear::load(dev, w, "mask_decoder.hf_mlp.layers.1")?,
                GpuLinear::load(dev, w, "mask_decoder.hf_mlp.layers.2")?,
            ],
            config,
        })
    }

    /// x [B, 3, S, S] (normalised, padded, on the host) -> image features on the device.
    pub fn encode_image(&self, dev: &CudaDevice, blas: &Blas, x: &Tensor) -> Result<GpuFeatures> {
        let s = self.config.img_size;
        let [_, ch, h, wd] = x.dims_n::<4>("encode_image (cuda)", "input")?;
        if ch != 3 || h != s || wd != s {
            return Err(Error::shape(
                "encode_image (cuda)",
                format!("input {:?}, expected [B, 3, {s}, {s}]", x.dims()),
            ));
        }
        self.encode_device(dev, blas, &GpuTensor::upload(dev, x)?)
    }

    /// The image side on an input already on the device, x [B, 3, S, S]. Makes
    /// no host transfer and no synchronisation, so it can be captured into a
    /// CUDA graph (crate::cuda::graph).
    pub fn encode_device(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        x: &GpuTensor,
    ) -> Result<GpuFeatures> {
        let s = self.config.img_size;
        let [b, ch, h, wd]: [usize; 4] = x
            .dims
            .as_slice()
            .try_into()
            .map_err(|_| Error::shape("encode_image (cuda)", format!("input {:?}", x.dims)))?;
        if ch != 3 || h != s || wd != s {
            return Err(Error::shape(
                "encode_image (cuda)",
                format!("input {:?}, expected [B, 3, {s}, {s}]", x.dims),
            ));
        }
        // ResNet
        let stem = self.stem.forward(dev, blas, x, None, Act::Relu)?;
        let pooled = crate::ops::conv::cuda::max_pool2d(dev, &stem, 3, 2, 1)?;
        drop(stem);
        // The stage outputs are kept (the adapters read them); an identity
        // shortcut reads its block's input in place, no copy.
        let mut feats: Vec<GpuTensor> = Vec::with_capacity(4);
        for stage in &self.stages {
            let mut cur: Option<GpuTensor> = None;
            for blk in stage {
                let input = match &cur {
                    Some(c) => c,
                    None => feats.last().unwrap_or(&pooled),
                };
                let next = match blk {
                    Block::Basic { c1, c2, ds } => {
                        let id = ds
                            .as_ref()
                            .map(|d| d.forward(dev, blas, input, None, Act::None))
                            .transpose()?;
                        let hh = c1.forward(dev, blas, input, None, Act::Relu)?;
                        c2.forward(
                            dev,
                            blas,
                            &hh,
                            Some(id.as_ref().unwrap_or(input)),
                            Act::Relu,
                        )?
                    }
                    Block::Bottleneck { c1, c2, c3, ds } => {
                        let id = ds
                            .as_ref()
                            .map(|d| d.forward(dev, blas, input, None, Act::None))
                            .transpose()?;
                        let hh = c1.forward(dev, blas, input, None, Act::Relu)?;
                        let hh = c2.forward(dev, blas, &hh, None, Act::Relu)?;
                        c3.forward(
                            dev,
                            blas,
                            &hh,
                            Some(id.as_ref().unwrap_or(input)),
                            Act::Relu,
                        )?
                    }
                };
                cur = Some(next);
            }
            feats.push(cur.ok_or_else(|| Error::Config("a ResNet stage without blocks".into()))?);
        }
        // ViT with the adapters
        let g = self.config.grid();
        let d = self.config.vit_dim;
        let mut t = nchw_to_nhwc(
            dev,
            &self.patch_embed.forward(dev, blas, x, None, Act::None)?,
        )?;
        act::bias_act(
            dev,
            &mut t.data,
            Some(&self.pos_embed),
            g * g * d,
            Act::None,
        )?;
        let mut bridges: Vec<Option<GpuTensor>> = vec![None, None, None];
        for i in 0..4 {
            for bi in [3 * i, 3 * i + 1] {
                t = GpuTensor {
                    data: self.blocks[bi].forward(dev, blas, &t.data, b, g)?,
                    dims: vec![b, g, g, d],
                };
            }
            let a = nchw_to_nhwc(dev, &self.reshape(dev, blas, i, &feats[i])?)?;
            t = GpuTensor {
                data: act::add(dev, &t.data, &a.data)?,
                dims: t.dims,
            };
            t = GpuTensor {
                data: self.blocks[3 * i + 2].forward(dev, blas, &t.data, b, g)?,
                dims: vec![b, g, g, d],
            };
            if i < 3 {
                bridges[2 - i] = Some(self.bridges[2 - i].forward(
                    dev,
                    blas,
                    &nhwc_to_nchw(dev, &t)?,
                    Act::None,
                )?);
            }
        }
        let nk = nhwc_to_nchw(dev, &t)?;
        let e = self.neck.1.forward2d(
            dev,
            &self.neck.0.forward(dev, blas, &nk, None, Act::None)?,
            Act::None,
        )?;
        let emb = self.neck.3.forward2d(
            dev,
            &self.neck.2.forward(dev, blas, &e, None, Act::None)?,
            Act::None,
        )?;
        let mut msf = self.embedding_encoder.forward(dev, blas, &emb, Act::None)?;
        for br in bridges.iter().flatten() {
            msf = GpuTensor {
                data: act::add(dev, &msf.data, &br.data)?,
                dims: msf.dims,
            };
        }
        Ok(GpuFeatures {
            image_embeddings: emb,
            multi_scale_feature: msf,
        })
    }

    fn reshape(&self, dev: &CudaDevice, blas: &Blas, i: usize, f: &GpuTensor) -> Result<GpuTensor> {
        match &self.adapters_in[i] {
            Reshaper::Down4(c0, n1, c3, n4, c6) => {
                let x =
                    n1.forward2d(dev, &c0.forward(dev, blas, f, None, Act::None)?, Act::Gelu)?;
                let x =
                    n4.forward2d(dev, &c3.forward(dev, blas, &x, None, Act::None)?, Act::Gelu)?;
                c6.forward(dev, blas, &x, None, Act::None)
            }
            Reshaper::Down2(c0, n1, c3) => {
                let x =
                    n1.forward2d(dev, &c0.forward(dev, blas, f, None, Act::None)?, Act::Gelu)?;
                c3.forward(dev, blas, &x, None, Act::None)
            }
            Reshaper::Same(c0) => c0.forward(dev, blas, f, None, Act::None),
            Reshaper::Up2(t0, n1, c3) => {
                let x = n1.forward2d(dev, &t0.forward(dev, blas, f, Act::None)?, Act::Gelu)?;
                c3.forward(dev, blas, &x, None, Act::None)
            }
        }
    }

    /// Boxes in the model frame against image `index` -> low-res logits
    /// [N, 1, 64, 64] on the device (ops::resize::cuda::postprocess takes them
    /// to the original size).
    pub fn decode(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        f: &GpuFeatures,
        index: usize,
        boxes: &[[f32; 4]],
    ) -> Result<GpuTensor> {
        if boxes.is_empty() {
            return Err(Error::input("decode (cuda)", "no boxes"));
        }
        let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
        self.decode_device(dev, blas, f, index, &dev.upload(&flat)?)
    }

    /// decode with the boxes already on the device, [N, 4] in the model frame:
    /// no host transfer and no synchronisation, so it can be captured into a
    /// CUDA graph (crate::cuda::graph).
    pub fn decode_device(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        f: &GpuFeatures,
        index: usize,
        boxes: &CudaSlice<f32>,
    ) -> Result<GpuTensor> {
        let emb_dims = &f.image_embeddings.dims;
        let (b, c, g) = (emb_dims[0], emb_dims[1], emb_dims[2]);
        if index >= b {
            return Err(Error::input(
                "decode (cuda)",
                format!("image index {index} of a batch of {b}"),
            ));
        }
        let n = boxes.len() / 4;
        if n == 0 || boxes.len() != 4 * n {
            return Err(Error::input(
                "decode (cuda)",
                format!("{} box values: expected [N, 4] with N >= 1", boxes.len()),
            ));
        }
        let hw = g * g;
        // src [N, HW, C] = channels-last (embeddings + no-mask embedding); pos likewise.
        let emb_i = GpuTensor {
            data: slice_copy(dev, &f.image_embeddings.data, index * c * hw, c * hw)?,
            dims: vec![1, c, g, g],
        };
        let mut src1 = nchw_to_nhwc(dev, &emb_i)?;
        act::bias_act(dev, &mut src1.data, Some(&self.no_mask), c, Act::None)?;
        let src = repeat(dev, &src1.data, n, vec![n, hw, c])?;
        let pos = repeat(dev, &self.pos_cl, n, vec![n, hw, c])?;
        // tokens [N, 3, C]: med token, the two encoded corners
        let tokens = box_tokens(
            dev,
            boxes,
            &self.box_gauss,
            &self.med_token,
            &self.box_e0,
            &self.box_e1,
            self.config.img_size,
        )?;
        let add = |a: &GpuTensor, bb: &GpuTensor| -> Result<GpuTensor> {
            Ok(GpuTensor {
                data: act::add(dev, &a.data, &bb.data)?,
                dims: a.dims.clone(),
            })
        };
        // Two-way transformer
        let (mut q, mut k) = (clone(dev, &tokens)?, src);
        for l in &self.layers {
            let q1 = if l.skip_pe {
                l.self_attn.forward(dev, blas, &q, &q, &q, None)?
            } else {
                let qp = add(&q, &tokens)?;
                l.self_attn.forward(dev, blas, &qp, &qp, &q, Some(&q))?
            };
            let q1 = l.norm1.forward(dev, &q1)?;
            let qp = add(&q1, &tokens)?;
            let kp = add(&k, &pos)?;
            let q2 = l
                .norm2
                .forward(dev, &l.t2i.forward(dev, blas, &qp, &kp, &k, Some(&q1))?)?;
            let m = l.lin1.forward(dev, blas, &q2, None, Act::Relu)?;
            let q3 = l
                .norm3
                .forward(dev, &l.lin2.forward(dev, blas, &m, Some(&q2), Act::None)?)?;
            let qp = add(&q3, &tokens)?;
            let k2 = l
                .norm4
                .forward(dev, &l.i2t.forward(dev, blas, &kp, &qp, &q3, Some(&k))?)?;
            q = q3;
            k = k2;
        }
        let qp = add(&q, &tokens)?;
        let kp = add(&k, &pos)?;
        let q = self.norm_final.forward(
            dev,
            &self.final_attn.forward(dev, blas, &qp, &kp, &k, Some(&q))?,
        )?;
        // Upscaling and mask feature
        let kc = nhwc_to_nchw(dev, &k.reshape(&[n, g, g, c]))?;
        let up = self.upscaling.forward(dev, blas, &kc, Act::Gelu)?;
        let fm = self.emf.1.forward2d(
            dev,
            &self.emf.0.forward(dev, blas, &up, None, Act::None)?,
            Act::Gelu,
        )?;
        let fm = self.emf.2.forward(dev, blas, &fm, None, Act::None)?; // [N, 32, 4G, 4G]
        // Hypernetwork MLP on the med token of each box (rows 3C apart in q).
        let h = self.hf[0].forward_rows(dev, blas, &q.data, n, 3 * c, Act::Relu)?;
        let h = self.hf[1].forward(dev, blas, &h, None, Act::Relu)?;
        let h = self.hf[2].forward(dev, blas, &h, None, Act::None)?;
        let (fc, fh, fw) = (fm.dims[1], fm.dims[2], fm.dims[3]);
        if h.dims != [n, fc] || f.multi_scale_feature.dims[1..] != [fc, fh, fw] {
            return Err(Error::shape(
                "mask_decoder (cuda)",
                format!(
                    "hypernetwork {:?}, mask feature {:?}, multi-scale feature {:?}",
                    h.dims, fm.dims, f.multi_scale_feature.dims
                ),
            ));
        }
        let msf_i = slice_copy(
            dev,
            &f.multi_scale_feature.data,
            index * fc * fh * fw,
            fc * fh * fw,
        )?;
        let low =
            crate::ops::linear::cuda::mask_dot(dev, &h.data, &fm.data, &msf_i, (n, fc, fh * fw))?;
        Ok(GpuTensor {
            data: low,
            dims: vec![n, 1, fh, fw],
        })
    }
}

fn clone(dev: &CudaDevice, x: &GpuTensor) -> Result<GpuTensor> {
    let mut y = dev.alloc(x.numel())?;
    dev.stream()
        .memcpy_dtod(&x.data, &mut y)
        .map_err(driver_err("copy"))?;
    Ok(GpuTensor {
        data: y,
        dims: x.dims.clone(),
    })
}

fn slice_copy(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    start: usize,
    len: usize,
) -> Result<CudaSlice<f32>> {
    let mut y = dev.alloc(len)?;
    dev.stream()
        .memcpy_dtod(&x.slice(start..start + len), &mut y)
        .map_err(driver_err("copy"))?;
    Ok(y)
}
