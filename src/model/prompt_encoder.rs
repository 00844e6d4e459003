//! The box prompt encoder (`prompt_encoder.sam_prompt_encoder.`): random Fourier
//! positional encoding of the box corners plus learned corner embeddings, and the
//! dense "no mask" embedding. The mask input branch exists in the weights but is
//! unused with box prompts.

use crate::error::Result;
use crate::io::Weights;
use crate::tensor::Tensor;

const PRE: &str = "prompt_encoder.sam_prompt_encoder";

pub struct PromptEncoder {
    /// `pe_layer.positional_encoding_gaussian_matrix` [2, C/2] (a buffer)
    gaussian: Tensor,
    /// `point_embeddings.2.weight`, `point_embeddings.3.weight` [1, C] each:
    /// the box corners' embeddings (trainable)
    corner0: Tensor,
    corner1: Tensor,
    /// `no_mask_embed.weight` [1, C] (a tensor: it moves with the model).
    no_mask: Tensor,
    dim: usize,
    img_size: usize,
    grid: usize,
}

impl PromptEncoder {
    pub fn load(w: &Weights, img_size: usize, grid: usize) -> Result<Self> {
        let g = |n: &str| -> Result<Tensor> { w.req(&format!("{PRE}.{n}")).cloned() };
        let gaussian = g("pe_layer.positional_encoding_gaussian_matrix")?;
        let no_mask = w.req(&format!("{PRE}.no_mask_embed.weight"))?.clone();
        Ok(PromptEncoder {
            dim: no_mask.numel(),
            gaussian,
            corner0: g("point_embeddings.2.weight")?,
            corner1: g("point_embeddings.3.weight")?,
            no_mask,
            img_size,
            grid,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The dense positional encoding [1, C, G, G] of the cell centres,
    /// computed on the host (once, when the model is built).
    pub fn dense_pe(&self) -> Result<Tensor> {
        let gaussian = self.gaussian.to_host()?;
        let gaussian = gaussian.as_f32()?;
        let (c, g) = (self.dim, self.grid);
        let mut out = vec![0.0f32; c * g * g];
        let mut v = vec![0.0f32; c];
        for y in 0..g {
            for x in 0..g {
                crate::ops::prompt::fourier_pe(
                    gaussian,
                    (x as f32 + 0.5) / g as f32,
                    (y as f32 + 0.5) / g as f32,
                    &mut v,
                );
                for ch in 0..c {
                    out[ch * g * g + y * g + x] = v[ch];
                }
            }
        }
        Ok(Tensor::from_f32(out, &[1, c, g, g]))
    }

    /// Boxes [N, 4] in the model frame -> tokens [N, L + 2, C]: `lead`
    /// (L = 1) if given, then the sparse embeddings of the two corners.
    pub fn box_tokens(&self, boxes: &Tensor, lead: Option<&Tensor>) -> Result<Tensor> {
        crate::ops::prompt::box_tokens(
            boxes,
            &self.gaussian,
            (&self.corner0, &self.corner1),
            lead,
            self.img_size,
        )
    }

    pub fn img_size(&self) -> usize {
        self.img_size
    }

    /// The no-mask embedding [1, C].
    pub fn no_mask_embed(&self) -> &Tensor {
        &self.no_mask
    }
}

crate::params!(PromptEncoder {
    gaussian,
    corner0,
    corner1,
    no_mask
});
