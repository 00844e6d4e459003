//! SAM-UNet's mask decoder (`mask_decoder.`): SAM's two-way transformer and
//! upscaling with one "medical" token, the mask feature from `embedding_maskfeature`
//! plus the multi-scale feature, and a hypernetwork MLP giving the per-pixel dot
//! product. One mask per box (no IoU head).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::io::Weights;
use crate::model::adapters::Up4;
use crate::model::transformer::TwoWayTransformer;
use crate::nn::{Conv2d, LayerNorm, Linear};
use crate::ops::activation::Act;
use crate::ops::cpu_f32;
use crate::tensor::Tensor;

const PRE: &str = "mask_decoder";

pub struct MaskDecoder {
    transformer: TwoWayTransformer,
    output_upscaling: Up4,
    /// [C]
    med_token: Vec<f32>,
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
            med_token: w
                .req(&format!("{PRE}.med_token.weight"))?
                .as_f32()?
                .to_vec(),
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

    /// image_embeddings [1, C, G, G], dense_pe [1, C, G, G], sparse [N, 2, C],
    /// no_mask [C], msf [1, 32, 4G, 4G] -> low-res logits [N, 1, 4G, 4G].
    pub fn forward(
        &self,
        image_embeddings: &Tensor,
        dense_pe: &Tensor,
        sparse: &Tensor,
        no_mask: &[f32],
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
        let [n, two, sc] = sparse.dims_n::<3>(OP, "sparse")?;
        if two != 2 || sc != c || no_mask.len() != c || self.med_token.len() != c {
            return Err(Error::shape(
                OP,
                format!(
                    "sparse {:?} vs embeddings {:?}",
                    sparse.dims(),
                    image_embeddings.dims()
                ),
            ));
        }
        let hw = g * g;
        // tokens [N, 3, C] = [med_token, corner 0, corner 1]
        let sp = cpu_f32(OP, sparse)?;
        let mut tokens = Vec::with_capacity(n * 3 * c);
        for i in 0..n {
            tokens.extend_from_slice(&self.med_token);
            tokens.extend_from_slice(&sp[i * 2 * c..(i + 1) * 2 * c]);
        }
        let tokens = Tensor::from_f32(tokens, &[n, 3, c]);
        // src [N, HW, C] = (image_embeddings + no_mask) channels-last, pos [N, HW, C]
        let emb = cpu_f32(OP, image_embeddings)?;
        let pe = cpu_f32(OP, dense_pe)?;
        let mut src1 = vec![0.0f32; hw * c];
        let mut pos1 = vec![0.0f32; hw * c];
        for ch in 0..c {
            for p in 0..hw {
                src1[p * c + ch] = emb[ch * hw + p] + no_mask[ch];
                pos1[p * c + ch] = pe[ch * hw + p];
            }
        }
        // One copy, shared by every box in the first layer.
        let src = Tensor::from_f32(src1, &[1, hw, c]);
        let pos = Tensor::from_f32(pos1, &[1, hw, c]);
        let tr = crate::profile::scope("dec.transformer");
        let (q, k) = self.transformer.forward(&src, &pos, &tokens)?;
        drop(tr);
        let _up = crate::profile::scope("dec.upscale+feature");
        // keys back to [N, C, G, G]
        let ks = cpu_f32(OP, &k)?;
        let mut kc = vec![0.0f32; n * c * hw];
        kc.par_chunks_mut(c * hw).enumerate().for_each(|(i, dst)| {
            for p in 0..hw {
                for ch in 0..c {
                    dst[ch * hw + p] = ks[(i * hw + p) * c + ch];
                }
            }
        });
        let kc = Tensor::from_f32(kc, &[n, c, g, g]);
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
        let qs = cpu_f32(OP, &q)?;
        let med: Vec<f32> = (0..n)
            .flat_map(|i| qs[i * 3 * c..i * 3 * c + c].to_vec())
            .collect();
        let h = Tensor::from_f32(med, &[n, c]);
        let h = self.hf[0].forward_act(&h, Act::Relu)?;
        let h = self.hf[1].forward_act(&h, Act::Relu)?;
        let h = self.hf[2].forward(&h)?;
        let [_, fc, fh, fw] = f.dims_n::<4>(OP, "mask feature")?;
        msf.expect_dims(OP, "multi_scale_feature", &[1, fc, fh, fw])?;
        let (fs, ms, hs) = (cpu_f32(OP, &f)?, cpu_f32(OP, msf)?, cpu_f32(OP, &h)?);
        h.expect_dims(OP, "hypernetwork output", &[n, fc])?;
        let p = fh * fw;
        // logits[i, p] = sum_ch h[i, ch] * (f[i, ch, p] + msf[ch, p])
        let mut out = vec![0.0f32; n * p];
        out.par_chunks_mut(p).enumerate().for_each(|(i, o)| {
            for ch in 0..fc {
                let hv = hs[i * fc + ch];
                let fr = &fs[(i * fc + ch) * p..(i * fc + ch + 1) * p];
                let mr = &ms[ch * p..(ch + 1) * p];
                for ((o, &a), &b) in o.iter_mut().zip(fr).zip(mr) {
                    *o += hv * (a + b);
                }
            }
        });
        Ok(Tensor::from_f32(out, &[n, 1, fh, fw]))
    }
}
