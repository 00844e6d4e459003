//! Layers on the GPU, loaded from the same state_dict names as `crate::nn`
//! (BatchNorm folded into its conv on the host first).

use cudarc::driver::CudaSlice;

use crate::cuda::blas::Blas;
use crate::cuda::{CudaDevice, GpuTensor, driver_err};
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::ops::activation::{Act, cuda as act};
use crate::ops::conv::cuda as conv;
use crate::ops::norm::cuda as norm;
use crate::ops::norm::fold_batch_norm;
use crate::tensor::Tensor;

fn up(dev: &CudaDevice, t: &Tensor) -> Result<CudaSlice<f32>> {
    dev.upload(t.as_f32()?)
}

fn get<'a>(w: &'a Weights, prefix: &str, name: &str) -> Result<&'a Tensor> {
    w.req(&format!("{prefix}.{name}"))
}

/// y = act(x W^T + b (+ residual)), W [n, k].
pub struct GpuLinear {
    w: CudaSlice<f32>,
    b: Option<CudaSlice<f32>>,
    pub n: usize,
    pub k: usize,
}

impl GpuLinear {
    pub fn load(dev: &CudaDevice, w: &Weights, prefix: &str) -> Result<Self> {
        let wt = get(w, prefix, "weight")?;
        let [n, k] = wt.dims_n::<2>("GpuLinear", prefix)?;
        let b = w
            .get(&format!("{prefix}.bias"))
            .map(|t| up(dev, t))
            .transpose()?;
        Ok(GpuLinear {
            w: up(dev, wt)?,
            b,
            n,
            k,
        })
    }

    /// x [..., k] -> [..., n].
    pub fn forward(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        x: &GpuTensor,
        residual: Option<&GpuTensor>,
        a: Act,
    ) -> Result<GpuTensor> {
        if x.dims.last() != Some(&self.k) {
            return Err(Error::shape(
                "linear (cuda)",
                format!("input {:?} for a {} -> {} layer", x.dims, self.k, self.n),
            ));
        }
        let rows = x.numel() / self.k;
        let mut dims = x.dims.clone();
        *dims.last_mut().expect("rank >= 1") = self.n;
        let mut y = dev.alloc(rows * self.n)?;
        if let Some(r) = residual {
            if r.dims != dims {
                return Err(Error::shape(
                    "linear (cuda)",
                    format!("residual {:?} for output {:?}", r.dims, dims),
                ));
            }
            dev.stream()
                .memcpy_dtod(&r.data, &mut y)
                .map_err(driver_err("copy"))?;
        }
        blas.gemm_f32(
            dev.stream(),
            false,
            true,
            rows,
            self.n,
            self.k,
            &x.data,
            self.k,
            &self.w,
            self.k,
            &mut y,
            self.n,
            residual.is_some(),
        )?;
        if self.b.is_some() || a != Act::None {
            act::bias_act(dev, &mut y, self.b.as_ref(), self.n, a)?;
        }
        Ok(GpuTensor { data: y, dims })
    }

    /// act(x W^T + b) on `rows` rows of x that lie `ld` values apart (a
    /// strided view, e.g. one token of each box): [rows, n].
    pub fn forward_rows(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        x: &CudaSlice<f32>,
        rows: usize,
        ld: usize,
        a: Act,
    ) -> Result<GpuTensor> {
        let mut y = dev.alloc(rows * self.n)?;
        blas.gemm_f32(
            dev.stream(),
            false,
            true,
            rows,
            self.n,
            self.k,
            x,
            ld,
            &self.w,
            self.k,
            &mut y,
            self.n,
            false,
        )?;
        if self.b.is_some() || a != Act::None {
            act::bias_act(dev, &mut y, self.b.as_ref(), self.n, a)?;
        }
        Ok(GpuTensor {
            data: y,
            dims: vec![rows, self.n],
        })
    }
}

/// The bf16 copy of a layer's weights when it runs its GEMM in bf16.
fn bf16_copy(
    dev: &CudaDevice,
    w: &CudaSlice<f32>,
    bf16: bool,
) -> Result<Option<CudaSlice<half::bf16>>> {
    bf16.then(|| act::to_bf16(dev, w)).transpose()
}

/// Conv2d (optionally with BatchNorm folded in).
pub struct GpuConv {
    w: CudaSlice<f32>,
    /// The weights in bf16 when this conv runs its GEMM in bf16.
    w16: Option<CudaSlice<half::bf16>>,
    b: Option<CudaSlice<f32>>,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
}

impl GpuConv {
    fn from_tensors(
        dev: &CudaDevice,
        wt: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        let [o, _, kh, kw] = wt.dims_n::<4>("GpuConv", "weight")?;
        Ok(GpuConv {
            w: up(dev, wt)?,
            w16: None,
            b: b.map(|b| up(dev, b)).transpose()?,
            o,
            kh,
            kw,
            stride,
            pad,
        })
    }
    pub fn load(
        dev: &CudaDevice,
        w: &Weights,
        prefix: &str,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        Self::from_tensors(
            dev,
            get(w, prefix, "weight")?,
            w.get(&format!("{prefix}.bias")),
            stride,
            pad,
        )
    }
    /// A bias-free conv followed by BatchNorm (running statistics), folded.
    pub fn load_bn(
        dev: &CudaDevice,
        w: &Weights,
        conv: &str,
        bn: &str,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        let (fw, fb) = fold_batch_norm(
            get(w, conv, "weight")?,
            get(w, bn, "weight")?,
            get(w, bn, "bias")?,
            get(w, bn, "running_mean")?,
            get(w, bn, "running_var")?,
            1e-5,
        )?;
        Self::from_tensors(dev, &fw, Some(&fb), stride, pad)
    }
    /// Runs the GEMM in bf16 (f32 accumulation) when `bf16`.
    pub fn with_bf16(mut self, dev: &CudaDevice, bf16: bool) -> Result<Self> {
        self.w16 = bf16_copy(dev, &self.w, bf16)?;
        Ok(self)
    }
    pub fn forward(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        x: &GpuTensor,
        residual: Option<&GpuTensor>,
        a: Act,
    ) -> Result<GpuTensor> {
        conv::conv2d(
            dev,
            blas,
            x,
            &self.w,
            self.w16.as_ref(),
            self.b.as_ref(),
            self.o,
            self.kh,
            self.kw,
            self.stride,
            self.pad,
            residual.map(|r| r as &dyn crate::cuda::GpuIn),
            a,
        )
    }
}

/// ConvTranspose2d with kernel = stride.
pub struct GpuConvT {
    w: CudaSlice<f32>,
    w16: Option<CudaSlice<half::bf16>>,
    b: Option<CudaSlice<f32>>,
    o: usize,
    k: usize,
}

impl GpuConvT {
    pub fn load(dev: &CudaDevice, w: &Weights, prefix: &str) -> Result<Self> {
        let wt = get(w, prefix, "weight")?;
        let [_, o, k, _] = wt.dims_n::<4>("GpuConvT", prefix)?;
        Ok(GpuConvT {
            w: up(dev, wt)?,
            w16: None,
            b: w.get(&format!("{prefix}.bias"))
                .map(|b| up(dev, b))
                .transpose()?,
            o,
            k,
        })
    }
    pub fn forward(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        x: &GpuTensor,
        a: Act,
    ) -> Result<GpuTensor> {
        conv::conv_transpose2d(
            dev,
            blas,
            x,
            &self.w,
            self.w16.as_ref(),
            self.b.as_ref(),
            self.o,
            self.k,
            a,
        )
    }
    /// Runs the GEMM in bf16 (f32 accumulation) when `bf16`.
    pub fn with_bf16(mut self, dev: &CudaDevice, bf16: bool) -> Result<Self> {
        self.w16 = bf16_copy(dev, &self.w, bf16)?;
        Ok(self)
    }
}

/// LayerNorm (rows) or LayerNorm2d (channels of NCHW).
pub struct GpuNorm {
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
    c: usize,
    eps: f32,
}

impl GpuNorm {
    pub fn load(dev: &CudaDevice, w: &Weights, prefix: &str, eps: f32) -> Result<Self> {
        let wt = get(w, prefix, "weight")?;
        Ok(GpuNorm {
            c: wt.numel(),
            w: up(dev, wt)?,
            b: up(dev, get(w, prefix, "bias")?)?,
            eps,
        })
    }
    pub fn forward(&self, dev: &CudaDevice, x: &GpuTensor) -> Result<GpuTensor> {
        let y = norm::layer_norm(dev, &x.data, &self.w, &self.b, self.c, self.eps)?;
        Ok(GpuTensor {
            data: y,
            dims: x.dims.clone(),
        })
    }
    pub fn forward2d(&self, dev: &CudaDevice, x: &GpuTensor, a: Act) -> Result<GpuTensor> {
        norm::layer_norm2d(dev, x, &self.w, &self.b, self.eps, a)
    }
}

/// convT, LayerNorm2d, GELU, convT (then `act`): bridges, embedding encoder, upscaling.
pub struct GpuUp4 {
    t0: GpuConvT,
    n1: GpuNorm,
    t3: GpuConvT,
}

impl GpuUp4 {
    /// `bf16`: both transposed convolutions run their GEMMs in bf16.
    pub fn load(dev: &CudaDevice, w: &Weights, pre: &str, bf16: bool) -> Result<Self> {
        Ok(GpuUp4 {
            t0: GpuConvT::load(dev, w, &format!("{pre}.0"))?.with_bf16(dev, bf16)?,
            n1: GpuNorm::load(dev, w, &format!("{pre}.1"), 1e-6)?,
            t3: GpuConvT::load(dev, w, &format!("{pre}.3"))?.with_bf16(dev, bf16)?,
        })
    }
    pub fn forward(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        x: &GpuTensor,
        a: Act,
    ) -> Result<GpuTensor> {
        let h = self
            .n1
            .forward2d(dev, &self.t0.forward(dev, blas, x, Act::None)?, Act::Gelu)?;
        self.t3.forward(dev, blas, &h, a)
    }
}
