//! A ViT block of the image encoder on the GPU: LayerNorm, the qkv / proj / MLP
//! GEMMs in cuBLAS (f32, or bf16 inputs with f32 accumulation), the flash-style
//! window / global attention with relative position bias, bias + GELU epilogues.
//! The residual adds ride on the GEMMs (beta = 1 onto a copy of the input).

use cudarc::driver::CudaSlice;

use crate::cuda::blas::Blas;
use crate::cuda::{CudaDevice, driver_err};
use crate::error::Result;
use crate::io::Weights;
use crate::ops::activation::{Act, cuda as act};
use crate::ops::attention::cuda::rel_pos_attention;
use crate::ops::norm::cuda::layer_norm;
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

    /// y (+)= x W^T, then bias and act.
    fn linear(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        l: &Lin,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        accumulate: bool,
        a: Act,
    ) -> Result<()> {
        match (&l.w16, self.dtype) {
            (Some(w16), DType::BF16) => {
                let x16 = act::to_bf16(dev, x)?;
                blas.linear_bf16(dev.stream(), &x16, w16, y, rows, l.n, l.k, accumulate)?;
            }
            _ => blas.linear_f32(dev.stream(), x, &l.w, y, rows, l.n, l.k, accumulate)?,
        }
        act::bias_act(dev, y, Some(&l.b), l.n, a)
    }

    /// x [b, g, g, d] -> [b, g, g, d].
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
        let h = layer_norm(dev, x, &self.norm1.0, &self.norm1.1, d, 1e-6)?;
        let mut qkv = dev.alloc(t * 3 * d)?;
        self.linear(dev, blas, &self.qkv, &h, &mut qkv, t, false, Act::None)?;
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
        let mut x1 = dev.alloc(t * d)?;
        dev.stream()
            .memcpy_dtod(x, &mut x1)
            .map_err(driver_err("copy"))?;
        self.linear(dev, blas, &self.proj, &a, &mut x1, t, true, Act::None)?;
        let h2 = layer_norm(dev, &x1, &self.norm2.0, &self.norm2.1, d, 1e-6)?;
        let mut m = dev.alloc(t * self.lin1.n)?;
        self.linear(dev, blas, &self.lin1, &h2, &mut m, t, false, Act::Gelu)?;
        let mut y = dev.alloc(t * d)?;
        dev.stream()
            .memcpy_dtod(&x1, &mut y)
            .map_err(driver_err("copy"))?;
        self.linear(dev, blas, &self.lin2, &m, &mut y, t, true, Act::None)?;
        Ok(y)
    }
}
