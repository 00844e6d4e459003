//! A ViT block of the image encoder on the GPU: LayerNorm, the qkv / proj / MLP
//! GEMMs in cuBLAS (f32, or bf16 inputs with f32 accumulation), the flash-style
//! window / global attention with relative position bias (CUDA cores in f32,
//! tensor cores in bf16), bias + GELU epilogues. The residual adds ride on the
//! GEMMs (beta = 1 onto x + bias, written in one pass).

use cudarc::driver::CudaSlice;

use crate::cuda::CudaDevice;
use crate::cuda::blas::Blas;
use crate::error::Result;
use crate::io::Weights;
use crate::ops::activation::{Act, cuda as act};
use crate::ops::attention::cuda::{rel_pos_attention, rel_pos_attention_tc_bf16};
use crate::ops::norm::cuda::{layer_norm, layer_norm_bf16};
use crate::tensor::DType;

struct Lin {
    /// [out, in]
    w: CudaSlice<f32>,
    w16: Option<CudaSlice<half::bf16>>,
    /// [out]
    b: CudaSlice<f32>,
    n: usize,
    k: usize,
}

pub struct GpuVitBlock {
    norm1: (CudaSlice<f32>, CudaSlice<f32>),
    qkv: Lin,
    proj: Lin,
    rel_h: CudaSlice<f32>,
    rel_w: CudaSlice<f32>,
    norm2: (CudaSlice<f32>, CudaSlice<f32>),
    lin1: Lin,
    lin2: Lin,
    d: usize,
    heads: usize,
    window: usize,
    dtype: DType,
}

impl GpuVitBlock {
    /// Uploads block `prefix` (`...blocks.3`, or `window` in the ref fixture).
    pub fn upload(
        dev: &CudaDevice,
        w: &Weights,
        prefix: &str,
        heads: usize,
        window: usize,
        dtype: DType,
    ) -> Result<Self> {
        let up = |n: &str| -> Result<CudaSlice<f32>> {
            dev.upload(w.req(&format!("{prefix}.{n}"))?.as_f32()?)
        };
        let lin = |n: &str| -> Result<Lin> {
            let wt = w.req(&format!("{prefix}.{n}.weight"))?;
            let [out, inp] = wt.dims_n::<2>("vit upload", n)?;
            let wd = dev.upload(wt.as_f32()?)?;
            let w16 = if dtype == DType::BF16 {
                Some(act::to_bf16(dev, &wd)?)
            } else {
                None
            };
            Ok(Lin {
                w: wd,
                w16,
                b: up(&format!("{n}.bias"))?,
                n: out,
                k: inp,
            })
        };
        let qkv = lin("attn.qkv")?;
        Ok(GpuVitBlock {
            norm1: (up("norm1.weight")?, up("norm1.bias")?),
            proj: lin("attn.proj")?,
            rel_h: up("attn.rel_pos_h")?,
            rel_w: up("attn.rel_pos_w")?,
            norm2: (up("norm2.weight")?, up("norm2.bias")?),
            lin1: lin("mlp.lin1")?,
            lin2: lin("mlp.lin2")?,
            d: qkv.k,
            qkv,
            heads,
            window,
            dtype,
        })
    }

    /// x [b, g, g, d] -> [b, g, g, d].
    ///
    /// f32: LN -> qkv GEMM -> bias -> attention -> (x + b_proj) += a Wp^T ->
    /// LN -> lin1 GEMM -> bias + GELU -> (x1 + b2) += m W2^T.
    /// bf16: the LayerNorms write the bf16 GEMM inputs directly, the qkv bias
    /// is added by the tensor-core attention while it loads (which writes the
    /// bf16 proj input), and lin1's epilogue writes lin2's bf16 input: 6
    /// kernels and 4 GEMMs per block, every GEMM bf16 x bf16 -> f32.
    pub fn forward(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        x: &CudaSlice<f32>,
        b: usize,
        g: usize,
    ) -> Result<CudaSlice<f32>> {
        let t = b * g * g;
        let d = self.d;
        if x.len() != t * d {
            return Err(crate::Error::shape(
                "vit block (cuda)",
                format!("{} values for {b} x {g} x {g} x {d}", x.len()),
            ));
        }
        match (
            &self.qkv.w16,
            &self.proj.w16,
            &self.lin1.w16,
            &self.lin2.w16,
        ) {
            (Some(wq), Some(wp), Some(w1), Some(w2)) if self.dtype == DType::BF16 => {
                let st = dev.stream();
                let h = layer_norm_bf16(dev, x, &self.norm1.0, &self.norm1.1, d, 1e-6)?;
                let mut qkv = dev.alloc(t * 3 * d)?;
                blas.linear_bf16(st, &h, wq, &mut qkv, t, self.qkv.n, d, false)?;
                let a = rel_pos_attention_tc_bf16(
                    dev,
                    &qkv,
                    &self.qkv.b,
                    &self.rel_h,
                    &self.rel_w,
                    b,
                    g,
                    d,
                    self.heads,
                    self.window,
                    false,
                )?;
                let mut x1 = act::add_bias_rows(dev, x, &self.proj.b)?;
                blas.linear_bf16(st, &a, wp, &mut x1, t, d, d, true)?;
                let h2 = layer_norm_bf16(dev, &x1, &self.norm2.0, &self.norm2.1, d, 1e-6)?;
                let mut m = dev.alloc(t * self.lin1.n)?;
                blas.linear_bf16(st, &h2, w1, &mut m, t, self.lin1.n, d, false)?;
                let m16 = act::bias_act_bf16(dev, &m, &self.lin1.b, self.lin1.n, Act::Gelu)?;
                let mut y = act::add_bias_rows(dev, &x1, &self.lin2.b)?;
                blas.linear_bf16(st, &m16, w2, &mut y, t, d, self.lin2.k, true)?;
                Ok(y)
            }
            _ => {
                let st = dev.stream();
                let h = layer_norm(dev, x, &self.norm1.0, &self.norm1.1, d, 1e-6)?;
                let mut qkv = dev.alloc(t * 3 * d)?;
                blas.linear_f32(st, &h, &self.qkv.w, &mut qkv, t, self.qkv.n, d, false)?;
                act::bias_act(dev, &mut qkv, Some(&self.qkv.b), self.qkv.n, Act::None)?;
                let a = rel_pos_attention(
                    dev,
                    &qkv,
                    &self.qkv.b,
                    &self.rel_h,
                    &self.rel_w,
                    b,
                    g,
                    d,
                    self.heads,
                    self.window,
                )?;
                let mut x1 = act::add_bias_rows(dev, x, &self.proj.b)?;
                blas.linear_f32(st, &a, &self.proj.w, &mut x1, t, d, d, true)?;
                let h2 = layer_norm(dev, &x1, &self.norm2.0, &self.norm2.1, d, 1e-6)?;
                let mut m = dev.alloc(t * self.lin1.n)?;
                blas.linear_f32(st, &h2, &self.lin1.w, &mut m, t, self.lin1.n, d, false)?;
                act::bias_act(dev, &mut m, Some(&self.lin1.b), self.lin1.n, Act::Gelu)?;
                let mut y = act::add_bias_rows(dev, &x1, &self.lin2.b)?;
                blas.linear_f32(st, &m, &self.lin2.w, &mut y, t, d, self.lin2.k, true)?;
                Ok(y)
            }
        }
    }
}
