//! The adapters between the branches: `adapters_in.{i}.reshaper` (ResNet feature
//! -> ViT tokens), `adapters_bridge.{j}` and `embedding_encoder` (ViT tokens /
//! image embeddings -> the 32 x 64 x 64 multi-scale feature).

use crate::error::Result;
use crate::io::Weights;
use crate::nn::{Conv2d, ConvTranspose2d, LayerNorm};
use crate::ops::activation::Act;
use crate::tensor::Tensor;

const LN2D_EPS: f32 = 1e-6;

/// Maps f(i+1) (C channels, S = 64 / 2^i pixels) to [B, D, 16, 16].
pub enum Reshaper {
    /// S = 64: conv s2, LN2d, GELU, conv s2, LN2d, GELU, conv 1x1
    Down4 {
        c0: Conv2d,
        n1: LayerNorm,
        c3: Conv2d,
        n4: LayerNorm,
        c6: Conv2d,
    },
    /// S = 32: conv s2, LN2d, GELU, conv 1x1
    Down2 {
        c0: Conv2d,
        n1: LayerNorm,
        c3: Conv2d,
    },
    /// S = 16: conv 1x1
    Same { c0: Conv2d },
    /// S = 8: convT 2x2 s2, LN2d, GELU, conv 1x1
    Up2 {
        t0: ConvTranspose2d,
        n1: LayerNorm,
        c3: Conv2d,
    },
}

impl Reshaper {
    pub fn load(w: &Weights, i: usize) -> Result<Self> {
        let pre = format!("adapters_in.{i}.reshaper");
        let conv = |j: usize, s: usize, p: usize| Conv2d::load(w, &format!("{pre}.{j}"), s, p);
        let ln = |j: usize| LayerNorm::load(w, &format!("{pre}.{j}"), LN2D_EPS);
        Ok(match i {
            0 => Reshaper::Down4 {
                c0: conv(0, 2, 1)?,
                n1: ln(1)?,
                c3: conv(3, 2, 1)?,
                n4: ln(4)?,
                c6: conv(6, 1, 0)?,
            },
            1 => Reshaper::Down2 {
                c0: conv(0, 2, 1)?,
                n1: ln(1)?,
                c3: conv(3, 1, 0)?,
            },
            2 => Reshaper::Same { c0: conv(0, 1, 0)? },
            _ => Reshaper::Up2 {
                t0: ConvTranspose2d::load(w, &format!("{pre}.0"))?,
                n1: ln(1)?,
                c3: conv(3, 1, 0)?,
            },
        })
    }

    /// f [B, C, S, S] -> [B, D, 16, 16] (channels first).
    pub fn forward(&self, f: &Tensor) -> Result<Tensor> {
        match self {
            Reshaper::Down4 { c0, n1, c3, n4, c6 } => {
                let x = n1.forward2d(&c0.forward(f, Act::None)?, Act::Gelu)?;
                let x = n4.forward2d(&c3.forward(&x, Act::None)?, Act::Gelu)?;
                c6.forward(&x, Act::None)
            }
            Reshaper::Down2 { c0, n1, c3 } => {
                let x = n1.forward2d(&c0.forward(f, Act::None)?, Act::Gelu)?;
                c3.forward(&x, Act::None)
            }
            Reshaper::Same { c0 } => c0.forward(f, Act::None),
            Reshaper::Up2 { t0, n1, c3 } => {
                let x = n1.forward2d(&t0.forward(f, Act::None)?, Act::Gelu)?;
                c3.forward(&x, Act::None)
            }
        }
    }
}

/// convT 2x2 s2, LN2d, GELU, convT 2x2 s2 (no activation after): 4x upsampling.
/// Used for `adapters_bridge.{j}` (D -> 32) and `embedding_encoder` (256 -> 32).
pub struct Up4 {
    t0: ConvTranspose2d,
    n1: LayerNorm,
    t3: ConvTranspose2d,
}

impl Up4 {
    pub fn load(w: &Weights, pre: &str) -> Result<Self> {
        Ok(Up4 {
            t0: ConvTranspose2d::load(w, &format!("{pre}.0"))?,
            n1: LayerNorm::load(w, &format!("{pre}.1"), LN2D_EPS)?,
            t3: ConvTranspose2d::load(w, &format!("{pre}.3"))?,
        })
    }

    /// x [B, C, 16, 16] -> [B, 32, 64, 64]; `act` after the last convT.
    pub fn forward(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let x = self
            .n1
            .forward2d(&self.t0.forward(x, Act::None)?, Act::Gelu)?;
        self.t3.forward(&x, act)
    }
}

impl Reshaper {
    /// Its layers in the module tree's order.
    fn layers(&mut self) -> Vec<&mut dyn crate::nn::Params> {
        match self {
            Reshaper::Down4 { c0, n1, c3, n4, c6 } => vec![c0, n1, c3, n4, c6],
            Reshaper::Down2 { c0, n1, c3 } => vec![c0, n1, c3],
            Reshaper::Same { c0 } => vec![c0],
            Reshaper::Up2 { t0, n1, c3 } => vec![t0, n1, c3],
        }
    }
}

impl crate::nn::Params for Reshaper {
    fn visit(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        self.layers().into_iter().try_for_each(|l| l.visit(f))
    }
    fn visit_gemm_weights(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        self.layers()
            .into_iter()
            .try_for_each(|l| l.visit_gemm_weights(f))
    }
    fn set_cpu_bf16(&mut self, on: bool) -> Result<()> {
        self.layers()
            .into_iter()
            .try_for_each(|l| l.set_cpu_bf16(on))
    }
}

crate::params!(Up4 { t0, n1, t3 });
