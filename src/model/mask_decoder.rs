//! SAM-UNet's mask decoder (`mask_decoder.`): SAM's two-way transformer and
//! upscaling with one "medical" token, the mask feature from `embedding_maskfeature`
//! plus the multi-scale feature, and a hypernetwork MLP giving the per-pixel dot
//! product. One mask per box (no IoU head).

use crate::error::{Error, Result};
use crate::io::Weights;
use crate::model::adapters::Up4;
use crate::model::transformer::TwoWayTransformer;
use crate::nn::{Conv2d, LayerNorm, Linear};
use crate::ops::activation::{Act, add_broadcast};
use crate::ops::layout;
use crate::ops::linear::mask_dot;
use crate::tensor::Tensor;

const PRE: &str = "mask_decoder";

pub struct MaskDecoder {
    transformer: TwoWayTransformer,
    output_upscaling: Up4,
    /// `med_token.weight` [1, C], seen as [1, 1, C]: the token ahead of each
    /// box's corner tokens (trainable).
    med_token: Tensor,
    emf0: Conv2d,
    emf1: LayerNorm,
    emf3: Conv2d,
    hf: [Linear; 3],
}

impl MaskDecoder {
    pub fn load(w: &Weights) -> Result<Self> {
        Ok(MaskDecoder {
            transformer: TwoWayTransformer::load(
                w,
                &format!("{PRE}.sam_mask_decoder.transformer"),
            )?,
            output_upscaling: Up4::load(w, &format!("{PRE}.sam_mask_decoder.output_upscaling"))?,
            med_token: {
                let t = w.req(&format!("{PRE}.med_token.weight"))?;
                let c = t.numel();
                t.reshape([1, 1, c])?
            },
            emf0: Conv2d::load(w, &format!("{PRE}.embedding_maskfeature.0"), 1, 1)?,
            emf1: LayerNorm::load(w, &format!("{PRE}.embedding_maskfeature.1"), 1e-6)?,
            emf3: Conv2d::load(w, &format!("{PRE}.embedding_maskfeature.3"), 1, 1)?,
            hf: [
                Linear::load(w, &format!("{PRE}.hf_mlp.layers.0"))?,
                Linear::load(w, &format!("{PRE}.hf_mlp.layers.1"))?,
                Linear::load(w, &format!("{PRE}.hf_mlp.layers.2"))?,
            ],
        })
    }

    /// The med token [1, 1, C]: the prompt encoder writes it ahead of each
    /// box's corner tokens (ops::prompt::box_tokens).
    pub fn med_token(&self) -> &Tensor {
        &self.med_token
    }

    /// image_embeddings [1, C, G, G], pos [1, G G, C] (the dense positional
    /// encoding channels-last), tokens [N, 3, C]
    /// (med token, corner 0, corner 1: torch.cat((med_token, sparse), dim=1)),
    /// no_mask [1, C], msf [1, 32, 4G, 4G] -> low-res logits [N, 1, 4G, 4G].
    pub fn forward(
        &self,
        image_embeddings: &Tensor,
        pos: &Tensor,
        tokens: &Tensor,
        no_mask: &Tensor,
        msf: &Tensor,
    ) -> Result<Tensor> {
        const OP: &str = "mask_decoder";
        let _p = crate::profile::scope("mask_decoder (total)");
        let [one, c, g, _] = image_embeddings.dims_n::<4>(OP, "image_embeddings")?;
        if one != 1 {
            return Err(Error::shape(
                OP,
                format!(
                    "one image at a time, got image_embeddings {:?}",
                    image_embeddings.dims()
                ),
            ));
        }
        let [n, three, sc] = tokens.dims_n::<3>(OP, "tokens")?;
        if three != 3 || sc != c || no_mask.dims() != [1, c] || self.med_token.numel() != c {
            return Err(Error::shape(
                OP,
                format!(
                    "tokens {:?} vs embeddings {:?}",
                    tokens.dims(),
                    image_embeddings.dims()
                ),
            ));
        }
        let hw = g * g;
        // src [1, HW, C] = image_embeddings channels-last + no_mask; pos [1, HW, C].
        // One copy, shared by every box in the first layer.
        let src = layout::nchw_to_nhwc(image_embeddings)?.reshape([hw, c])?;
        let src = add_broadcast(&src, no_mask)?.reshape([1, hw, c])?;
        pos.expect_dims(OP, "pos", &[1, hw, c])?;
        let tr = crate::profile::scope("dec.transformer");
        let (q, k) = self.transformer.forward(&src, pos, tokens)?;
        drop(tr);
        let _up = crate::profile::scope("dec.upscale+feature");
        // keys back to [N, C, G, G]
        let kc = layout::nhwc_to_nchw(&k.reshape([n, g, g, c])?)?;
        let up = {
            let _p = crate::profile::scope("dec.upscaling");
            self.output_upscaling.forward(&kc, Act::Gelu)? // [N, 32, 4G, 4G]
        };
        let _pf = crate::profile::scope("dec.maskfeature");
        let f = self.emf0.forward(&up, Act::None)?;
        let f = {
            let _p = crate::profile::scope("dec.maskfeature.ln2d");
            self.emf1.forward2d(&f, Act::Gelu)?
        };
        let f = self.emf3.forward(&f, Act::None)?; // [N, 32, 4G, 4G]
        drop(_pf);
        // h [N, 32] from the med token's output
        let h = layout::narrow(&q, 0, 1)?.reshape([n, c])?;
        let h = self.hf[0].forward_act(&h, Act::Relu)?;
        let h = self.hf[1].forward_act(&h, Act::Relu)?;
        let h = self.hf[2].forward(&h)?;
        // logits[i, p] = sum_ch h[i, ch] * (f[i, ch, p] + msf[ch, p])
        mask_dot(&h, &f, msf)
    }
}

crate::params!(MaskDecoder {
    transformer,
    output_upscaling,
    med_token,
    emf0,
    emf1,
    emf3,
    hf
});
