//! Layers with their weights, loaded under PyTorch's state_dict names.
//! `forward` functions are inference forms (BatchNorm folded into its conv).

use crate::error::Result;
use crate::io::Weights;
use crate::ops::activation::Act;
use crate::ops::conv::{Conv2dArgs, conv_transpose2d_with, conv2d_with};
use crate::ops::linear::linear_fused;
use crate::ops::norm::{fold_batch_norm, layer_norm, layer_norm2d};
use crate::tensor::Tensor;

/// A module's tensors, visited in a fixed order (the module tree's): moving
/// a model to a device, and later the parameter store, go through it.
pub trait Params {
    fn visit(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()>;
    /// Only the weights that a GEMM reads (Linear, Conv2d, ConvTranspose2d):
    /// what a bf16 model keeps in bf16.
    fn visit_gemm_weights(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()>;
    /// Every GEMM layer (Linear, Conv2d, ConvTranspose2d) packs its weight
    /// for the CPU's bf16 GEMM (`on`), or drops the packing: while packed,
    /// its CPU inputs are multiplied in bf16 with f32 sums.
    fn set_cpu_bf16(&mut self, on: bool) -> Result<()>;
}

/// Every tensor of `m` moved to `device`, in f32.
pub fn to_device(m: &mut (impl Params + ?Sized), device: crate::tensor::Device) -> Result<()> {
    m.visit(&mut |t: &mut Tensor| {
        *t = t.to_device(device)?.to_dtype(crate::tensor::DType::F32)?;
        Ok(())
    })
}

/// The GEMM weights of `m` (Params::visit_gemm_weights) converted to `dtype`
/// where they are: bf16 on CUDA makes their GEMMs run on bf16 inputs.
pub fn gemm_weights_to(m: &mut (impl Params + ?Sized), dtype: crate::tensor::DType) -> Result<()> {
    m.visit_gemm_weights(&mut |t: &mut Tensor| {
        *t = t.to_dtype(dtype)?;
        Ok(())
    })
}

impl<T: Params> Params for Option<T> {
    fn visit(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        self.iter_mut().try_for_each(|m| m.visit(f))
    }
    fn visit_gemm_weights(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        self.iter_mut().try_for_each(|m| m.visit_gemm_weights(f))
    }
    fn set_cpu_bf16(&mut self, on: bool) -> Result<()> {
        self.iter_mut().try_for_each(|m| m.set_cpu_bf16(on))
    }
}

impl<T: Params> Params for Vec<T> {
    fn visit(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        self.iter_mut().try_for_each(|m| m.visit(f))
    }
    fn visit_gemm_weights(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        self.iter_mut().try_for_each(|m| m.visit_gemm_weights(f))
    }
    fn set_cpu_bf16(&mut self, on: bool) -> Result<()> {
        self.iter_mut().try_for_each(|m| m.set_cpu_bf16(on))
    }
}

impl<T: Params, const N: usize> Params for [T; N] {
    fn visit(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        self.iter_mut().try_for_each(|m| m.visit(f))
    }
    fn visit_gemm_weights(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        self.iter_mut().try_for_each(|m| m.visit_gemm_weights(f))
    }
    fn set_cpu_bf16(&mut self, on: bool) -> Result<()> {
        self.iter_mut().try_for_each(|m| m.set_cpu_bf16(on))
    }
}

/// A bare tensor field (an embedding, a table, rel_pos) is not a GEMM weight.
impl Params for Tensor {
    fn visit(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        f(self)
    }
    fn visit_gemm_weights(&mut self, _f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        Ok(())
    }
    fn set_cpu_bf16(&mut self, _on: bool) -> Result<()> {
        Ok(())
    }
}

/// `impl Params` for a struct: its listed fields, in order. With `gemm
/// weight` (the layers) that field is the GEMM weight; otherwise the GEMM
/// weights are those of the fields' own modules.
#[macro_export]
#[doc(hidden)]
macro_rules! params {
    ($t:ty { $($field:ident),* $(,)? }) => {
        $crate::params!(@impl $t { $($field),* } |s, f| {
            $( $crate::nn::Params::visit_gemm_weights(&mut s.$field, f)?; )*
            Ok(())
        }, |s, on| {
            $( $crate::nn::Params::set_cpu_bf16(&mut s.$field, on)?; )*
            Ok(())
        });
    };
    ($t:ty { $($field:ident),* $(,)? } gemm $w:ident) => {
        $crate::params!(@impl $t { $($field),* } |s, f| f(&mut s.$w), |s, on| s.set_cpu_bf16_layer(on));
    };
    (@impl $t:ty { $($field:ident),* } |$s:ident, $f:ident| $gemm:expr, |$s2:ident, $on:ident| $pack:expr) => {
        impl $crate::nn::Params for $t {
            fn visit(
                &mut self,
                f: &mut dyn FnMut(&mut $crate::Tensor) -> $crate::Result<()>,
            ) -> $crate::Result<()> {
                $( $crate::nn::Params::visit(&mut self.$field, f)?; )*
                Ok(())
            }
            fn visit_gemm_weights(
                &mut self,
                $f: &mut dyn FnMut(&mut $crate::Tensor) -> $crate::Result<()>,
            ) -> $crate::Result<()> {
                let $s = self;
                $gemm
            }
            fn set_cpu_bf16(&mut self, $on: bool) -> $crate::Result<()> {
                let $s2 = self;
                $pack
            }
        }
    };
}

params!(Linear { weight, bias } gemm weight);
params!(Conv2d { weight, bias } gemm weight);
params!(ConvTranspose2d { weight, bias } gemm weight);
params!(LayerNorm { weight, bias });

/// A weight's values in f32 on the host (for packing).
fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(crate::tensor::Device::Cpu)?
        .to_dtype(crate::tensor::DType::F32)?
        .compact()?
        .as_f32()?
        .to_vec())
}

fn get(w: &Weights, prefix: &str, name: &str) -> Result<Tensor> {
    w.req(&format!("{prefix}.{name}")).cloned()
}

#[derive(Clone, Debug)]
pub struct Linear {
    /// [out, in]
    pub weight: Tensor,
    /// [out]
    pub bias: Option<Tensor>,
    /// The weight rounded to bf16 and packed for the CPU's AVX512_BF16
    /// GEMM (`pack_cpu_bf16`); when set, CPU inputs go through it.
    pub packed_bf16: Option<std::sync::Arc<crate::cpu::bf16_gemm::PackedB>>,
}

impl Linear {
    pub fn load(w: &Weights, prefix: &str) -> Result<Self> {
        Ok(Linear {
            weight: get(w, prefix, "weight")?,
            bias: w.get(&format!("{prefix}.bias")).cloned(),
            packed_bf16: None,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fused(x, None, Act::None)
    }
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        self.fused(x, None, act)
    }
    /// residual + x W^T + b
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.fused(x, Some(residual), Act::None)
    }

    fn fused(&self, x: &Tensor, residual: Option<&Tensor>, act: Act) -> Result<Tensor> {
        match &self.packed_bf16 {
            Some(p) if x.device() == crate::tensor::Device::Cpu => {
                crate::ops::linear::linear_packed_bf16(x, p, self.bias.as_ref(), residual, act)
            }
            _ => linear_fused(x, &self.weight, self.bias.as_ref(), residual, act),
        }
    }

    /// Rounds the weight to bf16 and packs it for the CPU's bf16 GEMM (or
    /// drops the packing): while packed, CPU inputs are multiplied in bf16
    /// with f32 sums (the bias, residual and activation stay f32).
    pub fn set_cpu_bf16_layer(&mut self, on: bool) -> Result<()> {
        self.packed_bf16 = None;
        if on {
            let [n, k] = self.weight.dims_n::<2>("pack_cpu_bf16", "weight")?;
            let w = host_f32(&self.weight)?;
            self.packed_bf16 = Some(std::sync::Arc::new(
                crate::cpu::bf16_gemm::PackedB::from_nk(&w, n, k)?,
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct Conv2d {
    /// [O, C, kh, kw]
    pub weight: Tensor,
    /// [O]
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
    /// The weight as A [O, C kh kw] for the CPU's bf16 GEMM
    /// (`set_cpu_bf16_layer`); when set, CPU inputs go through it.
    pub packed_bf16: Option<std::sync::Arc<crate::cpu::bf16_gemm::PackedA>>,
}

impl Conv2d {
    /// Rounds the weight to bf16 and packs it for the CPU's bf16 GEMM (or
    /// drops the packing).
    pub fn set_cpu_bf16_layer(&mut self, on: bool) -> Result<()> {
        self.packed_bf16 = None;
        if on {
            let [o, c, kh, kw] = self.weight.dims_n::<4>("pack_cpu_bf16", "weight")?;
            let w = host_f32(&self.weight)?;
            self.packed_bf16 = Some(std::sync::Arc::new(
                crate::cpu::bf16_gemm::PackedA::from_mk(&w, o, c * kh * kw)?,
            ));
        }
        Ok(())
    }

    pub fn load(w: &Weights, prefix: &str, stride: usize, padding: usize) -> Result<Self> {
        Ok(Conv2d {
            weight: get(w, prefix, "weight")?,
            bias: w.get(&format!("{prefix}.bias")).cloned(),
            stride,
            padding,
            packed_bf16: None,
        })
    }
    /// A bias-free conv followed by BatchNorm2d (eps 1e-5, running statistics),
    /// folded into one conv with bias.
    pub fn load_bn(
        w: &Weights,
        conv: &str,
        bn: &str,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let cw = get(w, conv, "weight")?;
        let (fw, fb) = fold_batch_norm(
            &cw,
            &get(w, bn, "weight")?,
            &get(w, bn, "bias")?,
            &get(w, bn, "running_mean")?,
            &get(w, bn, "running_var")?,
            1e-5,
        )?;
        Ok(Conv2d {
            weight: fw,
            bias: Some(fb),
            stride,
            padding,
            packed_bf16: None,
        })
    }
    pub fn forward(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        conv2d_with(
            x,
            &self.weight,
            self.packed_bf16.as_deref(),
            self.bias.as_ref(),
            Conv2dArgs {
                stride: self.stride,
                padding: self.padding,
            },
            None,
            act,
        )
    }
    /// act(conv(x) + residual)
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor, act: Act) -> Result<Tensor> {
        conv2d_with(
            x,
            &self.weight,
            self.packed_bf16.as_deref(),
            self.bias.as_ref(),
            Conv2dArgs {
                stride: self.stride,
                padding: self.padding,
            },
            Some(residual),
            act,
        )
    }
}

/// ConvTranspose2d with kernel = stride (2 x 2, stride 2 in SAM-UNet).
#[derive(Clone, Debug)]
pub struct ConvTranspose2d {
    /// [C, O, k, k]
    pub weight: Tensor,
    /// [O]
    pub bias: Option<Tensor>,
    /// W^T as A [O k k, C] for the CPU's bf16 GEMM (`set_cpu_bf16_layer`).
    pub packed_bf16: Option<std::sync::Arc<crate::cpu::bf16_gemm::PackedA>>,
}

impl ConvTranspose2d {
    pub fn load(w: &Weights, prefix: &str) -> Result<Self> {
        Ok(ConvTranspose2d {
            weight: get(w, prefix, "weight")?,
            bias: w.get(&format!("{prefix}.bias")).cloned(),
            packed_bf16: None,
        })
    }
    pub fn forward(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        conv_transpose2d_with(
            x,
            &self.weight,
            self.packed_bf16.as_deref(),
            self.bias.as_ref(),
            act,
        )
    }
    /// Rounds the weight to bf16 and packs it for the CPU's bf16 GEMM (or
    /// drops the packing).
    pub fn set_cpu_bf16_layer(&mut self, on: bool) -> Result<()> {
        self.packed_bf16 = None;
        if on {
            let [c, o, kh, kw] = self.weight.dims_n::<4>("pack_cpu_bf16", "weight")?;
            let w = host_f32(&self.weight)?;
            self.packed_bf16 = Some(std::sync::Arc::new(
                crate::cpu::bf16_gemm::PackedA::from_km(&w, c, o * kh * kw)?,
            ));
        }
        Ok(())
    }
}

/// LayerNorm over the last dim, or (as `forward2d`) SAM's LayerNorm2d over channels.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(w: &Weights, prefix: &str, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            weight: get(w, prefix, "weight")?,
            bias: get(w, prefix, "bias")?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
    pub fn forward2d(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        layer_norm2d(x, &self.weight, &self.bias, self.eps, act)
    }
}

/// The running statistics of a BatchNorm2d (buffers), updated by every
/// train-mode forward.
#[derive(Debug)]
pub struct Running {
    /// [C] each
    pub mean: Tensor,
    pub var: Tensor,
    /// `num_batches_tracked`
    pub batches: u64,
}

/// BatchNorm2d (eps 1e-5, momentum 0.1) with its buffers, for a model that
/// trains; an inference model has it folded into the convolution before it.
#[derive(Debug)]
pub struct BatchNorm2d {
    /// gamma, beta [C]
    pub weight: Tensor,
    pub bias: Tensor,
    pub running: std::sync::Mutex<Running>,
    pub eps: f32,
    pub momentum: f64,
    /// Train mode: batch statistics (and running-statistics updates).
    pub training: std::sync::atomic::AtomicBool,
}

impl BatchNorm2d {
    pub fn load(w: &Weights, prefix: &str) -> Result<Self> {
        Ok(BatchNorm2d {
            weight: get(w, prefix, "weight")?,
            bias: get(w, prefix, "bias")?,
            running: std::sync::Mutex::new(Running {
                mean: get(w, prefix, "running_mean")?,
                var: get(w, prefix, "running_var")?,
                batches: w
                    .get(&format!("{prefix}.num_batches_tracked"))
                    .and_then(|t| t.as_f32().ok().and_then(|v| v.first().copied()))
                    .map_or(0, |v| v as u64),
            }),
            eps: 1e-5,
            momentum: 0.1,
            training: std::sync::atomic::AtomicBool::new(true),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The running statistics now (mean, var, batches tracked).
    pub fn running_stats(&self) -> (Tensor, Tensor, u64) {
        let r = self.running();
        (r.mean.clone(), r.var.clone(), r.batches)
    }

    /// Train mode: normalise with this batch's statistics and move the running
    /// ones (momentum, unbiased variance), as PyTorch's BatchNorm2d.
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_train_fused(x, None, false)
    }

    /// relu?(forward_train(x) + residual?) as one op
    /// (ops::norm::batch_norm_train_fused).
    pub fn forward_train_fused(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        let (y, st) = crate::ops::norm::batch_norm_train_fused(
            x,
            &self.weight,
            &self.bias,
            self.eps,
            residual,
            relu,
        )?;
        let mut r = self.running();
        let m = self.momentum;
        let upd = |old: &Tensor, new: &[f64]| -> Result<Tensor> {
            let o = old.to_host()?;
            let v: Vec<f32> = o
                .as_f32()?
                .iter()
                .zip(new)
                .map(|(&a, &b)| ((1.0 - m) * a as f64 + m * b) as f32)
                .collect();
            Tensor::from_vec(v, old.dims().to_vec())?.to_device(old.device())
        };
        r.mean = upd(&r.mean, &st.mean)?;
        r.var = upd(&r.var, &st.var_unbiased)?;
        r.batches += 1;
        Ok(y)
    }
}

impl Params for BatchNorm2d {
    fn visit(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        f(&mut self.weight)?;
        f(&mut self.bias)?;
        let r = self.running.get_mut().unwrap_or_else(|p| p.into_inner());
        f(&mut r.mean)?;
        f(&mut r.var)
    }
    fn visit_gemm_weights(&mut self, _f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        Ok(())
    }
    fn set_cpu_bf16(&mut self, _on: bool) -> Result<()> {
        Ok(())
    }
}

/// A bias-free convolution followed by BatchNorm2d: folded into one
/// convolution with bias for inference (`bn` None), or kept apart to train
/// (the BatchNorm in train or eval mode).
#[derive(Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: Option<BatchNorm2d>,
}

impl ConvBn {
    /// `fold`: inference form (one conv with the running statistics folded in).
    pub fn load(
        w: &Weights,
        conv: &str,
        bn: &str,
        stride: usize,
        padding: usize,
        fold: bool,
    ) -> Result<Self> {
        if fold {
            return Ok(ConvBn {
                conv: Conv2d::load_bn(w, conv, bn, stride, padding)?,
                bn: None,
            });
        }
        Ok(ConvBn {
            conv: Conv2d::load(w, conv, stride, padding)?,
            bn: Some(BatchNorm2d::load(w, bn)?),
        })
    }

    pub fn forward(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        self.forward_impl(x, None, act)
    }

    /// act(bn(conv(x)) + residual)
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor, act: Act) -> Result<Tensor> {
        self.forward_impl(x, Some(residual), act)
    }

    fn forward_impl(&self, x: &Tensor, residual: Option<&Tensor>, act: Act) -> Result<Tensor> {
        let Some(bn) = &self.bn else {
            return match residual {
                Some(r) => self.conv.forward_residual(x, r, act),
                None => self.conv.forward(x, act),
            };
        };
        if !bn.training.load(std::sync::atomic::Ordering::Relaxed) {
            // Eval mode of a training model: fold the running statistics now.
            let folded = self.folded()?;
            return match residual {
                Some(r) => folded.forward_residual(x, r, act),
                None => folded.forward(x, act),
            };
        }
        let z = self.conv.forward(x, Act::None)?;
        match act {
            Act::None | Act::Relu => bn.forward_train_fused(&z, residual, act == Act::Relu),
            Act::Gelu => {
                let mut y = bn.forward_train(&z)?;
                if let Some(r) = residual {
                    y = crate::ops::activation::add(&y, r)?;
                }
                crate::ops::activation::act(&y, act)
            }
        }
    }

    /// The inference form: the BatchNorm's running statistics folded into the
    /// convolution (the conversion an inference model is loaded with).
    pub fn folded(&self) -> Result<Conv2d> {
        let Some(bn) = &self.bn else {
            return Ok(self.conv.clone());
        };
        let (mean, var, _) = bn.running_stats();
        let (fw, fb) =
            fold_batch_norm(&self.conv.weight, &bn.weight, &bn.bias, &mean, &var, bn.eps)?;
        Ok(Conv2d {
            weight: fw,
            bias: Some(fb),
            stride: self.conv.stride,
            padding: self.conv.padding,
            packed_bf16: None,
        })
    }
}

impl Params for ConvBn {
    fn visit(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        self.conv.visit(f)?;
        self.bn.visit(f)
    }
    fn visit_gemm_weights(&mut self, f: &mut dyn FnMut(&mut Tensor) -> Result<()>) -> Result<()> {
        self.conv.visit_gemm_weights(f)
    }
    fn set_cpu_bf16(&mut self, on: bool) -> Result<()> {
        self.conv.set_cpu_bf16(on)
    }
}
