//! The box prompt encoder (`prompt_encoder.sam_prompt_encoder.`): random Fourier
//! positional encoding of the box corners plus learned corner embeddings, and the
//! dense "no mask" embedding. The mask input branch exists in the weights but is
//! unused with box prompts.

use crate::error::Result;
use crate::io::Weights;
use crate::tensor::Tensor;

const PRE: &str = "prompt_encoder.sam_prompt_encoder";

pub struct PromptEncoder {
    /// [2, C/2]
    gaussian: Vec<f32>,
    /// [C] each
    corner0: Vec<f32>,
    corner1: Vec<f32>,
    /// `no_mask_embed.weight` [1, C] (a tensor: it moves with the model).
    no_mask: Tensor,
    dim: usize,
    img_size: usize,
    grid: usize,
}

impl PromptEncoder {
    pub fn load(w: &Weights, img_size: usize, grid: usize) -> Result<Self> {
        let g =
            |n: &str| -> Result<Vec<f32>> { Ok(w.req(&format!("{PRE}.{n}"))?.as_f32()?.to_vec()) };
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

    fn pe(&self, cx: f32, cy: f32, out: &mut [f32]) {
        crate::ops::prompt::fourier_pe(&self.gaussian, cx, cy, out)
    }

    /// The dense positional encoding [1, C, G, G] of the cell centres.
    pub fn dense_pe(&self) -> Tensor {
        let (c, g) = (self.dim, self.grid);
        let mut out = vec![0.0f32; c * g * g];
        let mut v = vec![0.0f32; c];
        for y in 0..g {
            for x in 0..g {
                self.pe(
                    (x as f32 + 0.5) / g as f32,
                    (y as f32 + 0.5) / g as f32,
                    &mut v,
                );
                for ch in 0..c {
                    out[ch * g * g + y * g + x] = v[ch];
                }
            }
        }
        Tensor::from_f32(out, &[1, c, g, g])
    }

    /// Boxes [N, 4] in the model frame -> sparse embeddings [N, 2, C].
    pub fn embed_boxes(&self, boxes: &[[f32; 4]]) -> Tensor {
        let out = crate::ops::prompt::embed_boxes(
            boxes,
            &self.gaussian,
            &self.corner0,
            &self.corner1,
            self.img_size,
        );
        Tensor::from_f32(out, &[boxes.len(), 2, self.dim])
    }

    /// The tensors of the box encoding: Gaussian [2, C/2], corner embeddings [C] x 2.
    pub fn box_tables(&self) -> (&[f32], &[f32], &[f32]) {
        (&self.gaussian, &self.corner0, &self.corner1)
    }

    pub fn img_size(&self) -> usize {
        self.img_size
    }

    /// The no-mask embedding [1, C].
    pub fn no_mask_embed(&self) -> &Tensor {
        &self.no_mask
    }
}

// The box tables stay on the host (the encoding of a few boxes runs there;
// its result is moved to the model's device); the no-mask embedding moves.
crate::params!(PromptEncoder { no_mask });
