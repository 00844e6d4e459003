//! Element-wise activations and adds. GELU is the exact (erf) form.

mod cpu;
pub mod cuda;

use crate::error::{Error, Result};
use crate::ops::{cpu_f32, cuda_input, same_device};
use crate::tensor::{Device, Tensor};

/// An activation applied in an op's epilogue (fused after a GEMM or a norm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    Gelu,
}

pub(crate) use cpu::apply_act_seq;
pub use cpu::apply_act_slice;

/// act(x), elementwise, on x's device.
pub fn act(x: &Tensor, a: Act) -> Result<Tensor> {
    let _p = crate::profile::scope("act");
    if let Device::Cuda(_) = x.device() {
        let x = cuda_input("act", x)?;
        let (dev, xs) = x.cuda_whole_f32("act")?;
        return Tensor::from_cuda_f32(dev, cuda::act(dev, xs, a)?, x.dims());
    }
    let xs = cpu_f32("act", x)?;
    let mut out = xs.to_vec();
    apply_act_slice(&mut out, a);
    Ok(Tensor::from_f32(out, x.dims()))
}

pub fn gelu(x: &Tensor) -> Result<Tensor> {
    act(x, Act::Gelu)
}

pub fn relu(x: &Tensor) -> Result<Tensor> {
    act(x, Act::Relu)
}

/// a + b for equal shapes, on their device.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(Error::shape(
            "add",
            format!("{:?} + {:?}", a.dims(), b.dims()),
        ));
    }
    if let Device::Cuda(_) = same_device("add", &[a, b])? {
        let _p = crate::profile::scope("add");
        let (a, b) = (cuda_input("add", a)?, cuda_input("add", b)?);
        let ((dev, av), (_, bv)) = (a.cuda_whole_f32("add")?, b.cuda_whole_f32("add")?);
        return Tensor::from_cuda_f32(dev, cuda::add(dev, av, bv)?, a.dims());
    }
    let mut out = a.clone();
    add_(&mut out, b)?;
    Ok(out)
}

/// a + b where b's leading dim is a's or 1 (b shared along it).
pub fn add_broadcast(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ad, bd) = (a.dims(), b.dims());
    if ad == bd {
        return add(a, b);
    }
    if ad.len() != bd.len() || ad.is_empty() || bd[0] != 1 || ad[1..] != bd[1..] {
        return Err(Error::shape("add", format!("{:?} + {:?}", ad, bd)));
    }
    let _p = crate::profile::scope("add");
    if let Device::Cuda(_) = same_device("add", &[a, b])? {
        let (a, b) = (cuda_input("add", a)?, cuda_input("add", b)?);
        let ((dev, av), (_, bv)) = (a.cuda_whole_f32("add")?, b.cuda_whole_f32("add")?);
        return Tensor::from_cuda_f32(dev, cuda::add_bias_rows(dev, av, bv)?, ad);
    }
    let bs = cpu_f32("add", b)?;
    let mut out = cpu_f32("add", a)?.to_vec();
    for chunk in out.chunks_mut(bs.len().max(1)) {
        cpu::add_assign(chunk, bs);
    }
    Ok(Tensor::from_f32(out, ad))
}

/// a += b in place (copies a's storage first only if it is shared; on CUDA
/// the sum goes to a new buffer that replaces a's).
pub fn add_(a: &mut Tensor, b: &Tensor) -> Result<()> {
    let _p = crate::profile::scope("add");
    if a.dims() != b.dims() {
        return Err(Error::shape(
            "add",
            format!("{:?} + {:?}", a.dims(), b.dims()),
        ));
    }
    if let Device::Cuda(_) = same_device("add", &[a, b])? {
        *a = add(a, b)?;
        return Ok(());
    }
    let bs = cpu_f32("add", b)?;
    cpu_f32("add", a)?;
    let av = a.as_f32_mut()?;
    cpu::add_assign(av, bs);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_and_relu_values() {
        let x = Tensor::from_vec(vec![-2.0, -0.5, 0.0, 0.5, 2.0], [5]).unwrap();
        let g = gelu(&x).unwrap();
        // torch.nn.functional.gelu on the same values.
        let want = [-0.045_500_26, -0.154_268_47, 0.0, 0.345_731_53, 1.954_499_7];
        for (a, b) in g.as_f32().unwrap().iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let r = relu(&x).unwrap();
        assert_eq!(r.as_f32().unwrap(), &[0.0, 0.0, 0.0, 0.5, 2.0]);
    }

    #[test]
    fn add_checks_shapes() {
        let a = Tensor::zeros([2, 3]);
        let b = Tensor::zeros([3, 2]);
        assert!(matches!(add(&a, &b), Err(Error::Shape { op: "add", .. })));
    }
}
