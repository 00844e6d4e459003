//! The ResNet branch (`resnet.`): torchvision's ResNet without avgpool / fc,
//! with BatchNorm folded into the convolutions for inference, or kept (train
//! mode: batch statistics) for training.

use crate::error::Result;
use crate::io::Weights;
use crate::model::config::ResNetConfig;
use crate::nn::ConvBn;
use crate::ops::activation::Act;
use crate::ops::conv::max_pool2d;
use crate::tensor::Tensor;

enum Block {
    Basic {
        conv1: ConvBn,
        conv2: ConvBn,
        downsample: Option<ConvBn>,
    },
    Bottleneck {
        conv1: ConvBn,
        conv2: ConvBn,
        conv3: ConvBn,
        downsample: Option<ConvBn>,
    },
}

pub struct ResNet {
    stem: ConvBn,
    stages: Vec<Vec<Block>>,
}

impl ResNet {
    /// `fold`: BatchNorm folded into the convolutions (inference).
    pub fn load(w: &Weights, cfg: &ResNetConfig, fold: bool) -> Result<Self> {
        let stem = ConvBn::load(w, "resnet.stage0.0", "resnet.stage0.1", 2, 3, fold)?;
        let mut stages = Vec::new();
        for s in 0..4 {
            let mut blocks = Vec::new();
            for b in 0..cfg.blocks[s] {
                let pre = format!("resnet.stage{}.{b}", s + 1);
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let downsample = if w.contains(&format!("{pre}.downsample.0.weight")) {
                    Some(ConvBn::load(
                        w,
                        &format!("{pre}.downsample.0"),
                        &format!("{pre}.downsample.1"),
                        stride,
                        0,
                        fold,
                    )?)
                } else {
                    None
                };
                let cb = |c: &str, bn: &str, st: usize, pad: usize| {
                    ConvBn::load(
                        w,
                        &format!("{pre}.{c}"),
                        &format!("{pre}.{bn}"),
                        st,
                        pad,
                        fold,
                    )
                };
                blocks.push(if cfg.bottleneck {
                    Block::Bottleneck {
                        conv1: cb("conv1", "bn1", 1, 0)?,
                        conv2: cb("conv2", "bn2", stride, 1)?,
                        conv3: cb("conv3", "bn3", 1, 0)?,
                        downsample,
                    }
                } else {
                    Block::Basic {
                        conv1: cb("conv1", "bn1", stride, 1)?,
                        conv2: cb("conv2", "bn2", 1, 1)?,
                        downsample,
                    }
                });
            }
            stages.push(blocks);
        }
        Ok(ResNet { stem, stages })
    }

    /// x [B, 3, 256, 256] -> f1..f4 [B, C_i, 64 / 2^i, 64 / 2^i].
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let x = self.stem.forward(x, Act::Relu)?;
        let mut x = max_pool2d(&x, 3, 2, 1)?;
        let mut feats = Vec::with_capacity(4);
        for stage in &self.stages {
            for block in stage {
                x = match block {
                    Block::Basic {
                        conv1,
                        conv2,
                        downsample,
                    } => {
                        let identity = match downsample {
                            Some(d) => d.forward(&x, Act::None)?,
                            None => x.clone(),
                        };
                        let h = conv1.forward(&x, Act::Relu)?;
                        conv2.forward_residual(&h, &identity, Act::Relu)?
                    }
                    Block::Bottleneck {
                        conv1,
                        conv2,
                        conv3,
                        downsample,
                    } => {
                        let identity = match downsample {
                            Some(d) => d.forward(&x, Act::None)?,
                            None => x.clone(),
                        };
                        let h = conv1.forward(&x, Act::Relu)?;
                        let h = conv2.forward(&h, Act::Relu)?;
                        conv3.forward_residual(&h, &identity, Act::Relu)?
                    }
                };
            }
            feats.push(x.clone());
        }
        Ok(feats)
    }
}

impl Block {
    /// Its layers in the module tree's order.
    fn layers(&mut self) -> Vec<&mut dyn crate::nn::Params> {
        match self {
            Block::Basic {
                conv1,
                conv2,
                downsample,
            } => vec![conv1, conv2, downsample],
            Block::Bottleneck {
                conv1,
                conv2,
                conv3,
                downsample,
            } => vec![conv1, conv2, conv3, downsample],
        }
    }
}

impl crate::nn::Params for Block {
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

crate::params!(ResNet { stem, stages });

impl ResNet {
    /// Every BatchNorm of the branch (none once folded), in module order.
    pub fn batch_norms(&self) -> Vec<&crate::nn::BatchNorm2d> {
        let mut v = vec![];
        v.extend(self.stem.bn.as_ref());
        for b in self.stages.iter().flatten() {
            let convs: Vec<&ConvBn> = match b {
                Block::Basic {
                    conv1,
                    conv2,
                    downsample,
                } => [Some(conv1), Some(conv2), downsample.as_ref()]
                    .into_iter()
                    .flatten()
                    .collect(),
                Block::Bottleneck {
                    conv1,
                    conv2,
                    conv3,
                    downsample,
                } => [Some(conv1), Some(conv2), Some(conv3), downsample.as_ref()]
                    .into_iter()
                    .flatten()
                    .collect(),
            };
            v.extend(convs.into_iter().filter_map(|c| c.bn.as_ref()));
        }
        v
    }
}
