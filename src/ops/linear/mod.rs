//! Linear layers: y = act(x W^T + b (+ residual)), W stored [out, in] as in PyTorch.

mod cpu;
mod cuda;

use crate::error::{Error, Result};
use crate::ops::activation::Act;
use crate::ops::{cpu_f32, cuda_input, same_device};
use crate::tensor::{DType, Device, Tensor};

/// x: [..., K], w: [N, K], b: [N] -> [..., N].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_fused(x, w, b, None, Act::None)
}

/// act(x W^T + b + residual): the bias, the residual add and the activation are
/// applied in the GEMM's epilogue (the residual seeds the accumulator).
/// residual: same shape as the output.
pub fn linear_fused(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    const OP: &str = "linear";
    let _p = crate::profile::scope(OP);
    let [n, k] = w.dims_n::<2>(OP, "weight")?;
    let xd = x.dims();
    if xd.last() != Some(&k) {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?} does not end in weight's in-features {k} (weight {:?})",
                xd,
                w.dims()
            ),
        ));
    }
    let m = x.numel() / k.max(1);
    if let Some(b) = b {
        b.expect_dims(OP, "bias", &[n])?;
    }
    let mut out_dims = xd.to_vec();
    *out_dims.last_mut().expect("rank >= 1 checked above") = n;
    if let Some(r) = residual {
        r.expect_dims(OP, "residual", &out_dims)?;
    }
    let mut all = vec![x, w];
    all.extend(b);
    all.extend(residual);
    if let Device::Cuda(_) = same_device(OP, &all)? {
        // A bf16 weight makes a bf16 GEMM (f32 accumulation); the rest is f32.
        let w = if w.dtype() == DType::BF16 {
            w.compact()?
        } else {
            cuda_input(OP, w)?
        };
        let x = cuda_input(OP, x)?;
        let b = b.map(|b| cuda_input(OP, b)).transpose()?;
        let r = residual.map(|r| cuda_input(OP, r)).transpose()?;
        let dev = x.cuda_device().expect("a CUDA tensor").clone();
        return cuda::linear(
            &dev,
            &x,
            &w,
            b.as_ref(),
            r.as_ref(),
            act,
            (m, n, k),
            &out_dims,
        );
    }
    let out = cpu::linear(
        cpu_f32(OP, x)?,
        cpu_f32(OP, w)?,
        b.map(|b| cpu_f32(OP, b)).transpose()?,
        residual.map(|r| cpu_f32(OP, r)).transpose()?,
        act,
        m,
        n,
        k,
    );
    Ok(Tensor::from_f32(out, &out_dims))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_hand_computation() {
        // x [2, 3], w [2, 3]
        let x = Tensor::from_vec(vec![1., 2., 3., -1., 0., 2.], [2, 3]).unwrap();
        let w = Tensor::from_vec(vec![1., 0., -1., 0.5, 0.5, 0.5], [2, 3]).unwrap();
        let b = Tensor::from_vec(vec![0.25, -1.0], [2]).unwrap();
        let y = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.dims(), &[2, 2]);
        assert_eq!(y.as_f32().unwrap(), &[-1.75, 2.0, -2.75, -0.5]);
        let r = Tensor::from_vec(vec![1., 1., 1., 1.], [2, 2]).unwrap();
        let y = linear_fused(&x, &w, Some(&b), Some(&r), Act::Relu).unwrap();
        assert_eq!(y.as_f32().unwrap(), &[0.0, 3.0, 0.0, 0.5]);
    }

    #[test]
    fn linear_rejects_bad_shapes() {
        let x = Tensor::zeros([2, 4]);
        let w = Tensor::zeros([2, 3]);
        let e = linear(&x, &w, None).unwrap_err().to_string();
        assert!(e.contains("linear") && e.contains("[2, 4]"), "{e}");
    }
}
