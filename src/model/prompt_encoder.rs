//! The box prompt encoder (`prompt_encoder.sam_prompt_encoder.`): random Fourier
//! positional encoding of the box corners plus learned corner embeddings, and the
//! dense "no mask" embedding. The mask input branch exists in the weights but is
//! unused with box prompts.

use std::f32::consts::PI;

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
    no_mask: Vec<f32>,
    dim: usize,
    img_size: usize,
    grid: usize,
}

impl PromptEncoder {
    pub fn load(w: &Weights, img_size: usize, grid: usize) -> Result<Self> {
        let g = |n: &str| -> Result<Vec<f32>> { Ok(w.req(&format!("{PRE}.{n}"))?.as_f32()?.to_vec()) };
        let gaussian = g("pe_layer.positional_encoding_gaussian_matrix")?;
        let no_mask = g("no_mask_embed.weight")?;
        Ok(PromptEncoder {
            dim: no_mask.len(),
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

    /// pe(c) for c in [0, 1]^2 (x, y): u = 2 pi ((2c - 1) G); [sin u, cos u]. out: [C]
    fn pe(&self, cx: f32, cy: f32, out: &mut [f32]) {
        let half = self.dim / 2;
        let (x, y) = (2.0 * cx - 1.0, 2.0 * cy - 1.0);
        for j in 0..half {
            let u = 2.0 * PI * (x * self.gaussian[j] + y * self.gaussian[half + j]);
            out[j] = u.sin();
            out[half + j] = u.cos();
        }
    }

    /// The dense positional encoding [1, C, G, G] of the cell centres.
    pub fn dense_pe(&self) -> Tensor {
        let (c, g) = (self.dim, self.grid);
        let mut out = vec![0.0f32; c * g * g];
        let mut v = vec![0.0f32; c];
        for y in 0..g {
            for x in 0..g {
                self.pe((x as f32 + 0.5) / g as f32, (y as f32 + 0.5) / g as f32, &mut v);
                for ch in 0..c {
                    out[ch * g * g + y * g + x] = v[ch];
                }
            }
        }
        Tensor::from_f32(out, &[1, c, g, g])
    }

    /// Boxes [N, 4] in the model frame -> sparse embeddings [N, 2, C].
    pub fn embed_boxes(&self, boxes: &[[f32; 4]]) -> Tensor {
        let c = self.dim;
        let s = self.img_size as f32;
        let mut out = vec![0.0f32; boxes.len() * 2 * c];
        for (i, b) in boxes.iter().enumerate() {
            let row = &mut out[i * 2 * c..(i + 1) * 2 * c];
            let (c0, c1) = row.split_at_mut(c);
            self.pe((b[0] + 0.5) / s, (b[1] + 0.5) / s, c0);
            self.pe((b[2] + 0.5) / s, (b[3] + 0.5) / s, c1);
            c0.iter_mut().zip(&self.corner0).for_each(|(o, e)| *o += e);
            c1.iter_mut().zip(&self.corner1).for_each(|(o, e)| *o += e);
        }
        Tensor::from_f32(out, &[boxes.len(), 2, c])
    }

    /// The no-mask embedding [C].
    pub fn no_mask_embed(&self) -> &[f32] {
        &self.no_mask
    }
}
