//! The frozen SAM ViT (`image_encoder.sam_img_encoder.`): patch embedding,
//! window / global blocks with decomposed relative position bias, and the neck.
//! Tokens are channels-last [B, G, G, D], G = 16.

use crate::error::Result;
use crate::io::Weights;
use crate::model::config::SamUnetConfig;
use crate::nn::{Conv2d, LayerNorm, Linear};
use crate::ops::activation::{Act, add_broadcast_};
use crate::ops::attention::{VitBlock, rel_pos_attention, vit_block_bf16};
use crate::ops::layout::{nchw_to_nhwc, nhwc_to_nchw};
use crate::tensor::Tensor;

const PRE: &str = "image_encoder.sam_img_encoder";

pub struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    /// [2S - 1, hd]
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    heads: usize,
    /// 0 for global attention.
    window: usize,
}

impl Block {
    pub fn load(w: &Weights, pre: &str, heads: usize, window: usize) -> Result<Self> {
        let g = |n: &str| w.req(&format!("{pre}.{n}")).cloned();
        Ok(Block {
            norm1: LayerNorm::load(w, &format!("{pre}.norm1"), 1e-6)?,
            qkv: Linear::load(w, &format!("{pre}.attn.qkv"))?,
            proj: Linear::load(w, &format!("{pre}.attn.proj"))?,
            rel_pos_h: g("attn.rel_pos_h")?,
            rel_pos_w: g("attn.rel_pos_w")?,
            norm2: LayerNorm::load(w, &format!("{pre}.norm2"), 1e-6)?,
            lin1: Linear::load(w, &format!("{pre}.mlp.lin1"))?,
            lin2: Linear::load(w, &format!("{pre}.mlp.lin2"))?,
            heads,
            window,
        })
    }

    /// x [B, G, G, D] -> [B, G, G, D].
    /// x = x + proj(attn(norm1(x))); x = x + lin2(GELU(lin1(norm2(x)))).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.qkv.weight.dtype() == crate::tensor::DType::BF16 {
            // CUDA bf16 (SamUnet::to_device): the fused block.
            return self.forward_fused_bf16(x);
        }
        let h = self.norm1.forward(x)?;
        // [B, G, G, 3D] for the real tokens only; padded ones are the bias.
        let qkv = self.qkv.forward(&h)?;
        let bias = self
            .qkv
            .bias
            .as_ref()
            .ok_or_else(|| crate::Error::MissingTensor {
                name: "attn.qkv.bias".into(),
                expected: vec![],
            })?;
        let a = rel_pos_attention(
            &qkv,
            bias,
            &self.rel_pos_h,
            &self.rel_pos_w,
            self.heads,
            self.window,
        )?;
        let x = self.proj.forward_residual(&a, x)?;
        let h = self.lin1.forward_act(&self.norm2.forward(&x)?, Act::Gelu)?;
        self.lin2.forward_residual(&h, &x)
    }

    /// The dtype of its GEMM weights (bf16 too when packed for the CPU's
    /// bf16 GEMM).
    pub fn dtype(&self) -> crate::tensor::DType {
        if self.qkv.packed_bf16.is_some() {
            return crate::tensor::DType::BF16;
        }
        self.qkv.weight.dtype()
    }

    fn forward_fused_bf16(&self, x: &Tensor) -> Result<Tensor> {
        let bias = |l: &'_ Linear, name: &str| -> Result<Tensor> {
            l.bias.clone().ok_or_else(|| crate::Error::MissingTensor {
                name: format!("{name}.bias"),
                expected: vec![],
            })
        };
        let (bq, bp, b1, b2) = (
            bias(&self.qkv, "attn.qkv")?,
            bias(&self.proj, "attn.proj")?,
            bias(&self.lin1, "mlp.lin1")?,
            bias(&self.lin2, "mlp.lin2")?,
        );
        vit_block_bf16(
            x,
            &VitBlock {
                norm1: (&self.norm1.weight, &self.norm1.bias),
                qkv: (&self.qkv.weight, &bq),
                proj: (&self.proj.weight, &bp),
                rel: (&self.rel_pos_h, &self.rel_pos_w),
                norm2: (&self.norm2.weight, &self.norm2.bias),
                lin1: (&self.lin1.weight, &b1),
                lin2: (&self.lin2.weight, &b2),
                heads: self.heads,
                window: self.window,
            },
        )
    }
}

pub struct ImageEncoderViT {
    patch_embed: Conv2d,
    /// [1, G, G, D]
    pos_embed: Tensor,
    pub blocks: Vec<Block>,
    neck0: Conv2d,
    neck1: LayerNorm,
    neck2: Conv2d,
    neck3: LayerNorm,
}

impl ImageEncoderViT {
    pub fn load(w: &Weights, cfg: &SamUnetConfig) -> Result<Self> {
        let blocks = (0..cfg.vit_depth)
            .map(|b| {
                let window = if cfg.is_global(b) { 0 } else { cfg.window_size };
                Block::load(w, &format!("{PRE}.blocks.{b}"), cfg.vit_heads, window)
            })
            .collect::<Result<_>>()?;
        Ok(ImageEncoderViT {
            patch_embed: Conv2d::load(w, &format!("{PRE}.patch_embed.proj"), cfg.patch_size, 0)?,
            pos_embed: w.req(&format!("{PRE}.pos_embed"))?.clone(),
            blocks,
            neck0: Conv2d::load(w, &format!("{PRE}.neck.0"), 1, 0)?,
            neck1: LayerNorm::load(w, &format!("{PRE}.neck.1"), 1e-6)?,
            neck2: Conv2d::load(w, &format!("{PRE}.neck.2"), 1, 1)?,
            neck3: LayerNorm::load(w, &format!("{PRE}.neck.3"), 1e-6)?,
        })
    }

    /// x [B, 3, 256, 256] -> tokens [B, G, G, D] (patch embedding + pos_embed).
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.patch_embed.forward(x, Act::None)?;
        // pos_embed [1, G, G, D] is shared by every image of the batch.
        let mut t = nchw_to_nhwc(&p)?;
        add_broadcast_(&mut t, &self.pos_embed)?;
        Ok(t)
    }

    /// tokens [B, G, G, D] -> image embeddings [B, 256, G, G].
    pub fn neck(&self, t: &Tensor) -> Result<Tensor> {
        let x = nhwc_to_nchw(t)?;
        let x = self
            .neck1
            .forward2d(&self.neck0.forward(&x, Act::None)?, Act::None)?;
        self.neck3
            .forward2d(&self.neck2.forward(&x, Act::None)?, Act::None)
    }
}

crate::params!(Block {
    norm1,
    qkv,
    proj,
    rel_pos_h,
    rel_pos_w,
    norm2,
    lin1,
    lin2
});
crate::params!(ImageEncoderViT {
    patch_embed,
    pos_embed,
    blocks,
    neck0,
    neck1,
    neck2,
    neck3
});
