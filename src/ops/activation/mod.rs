//! Element-wise activations and adds. GELU is the exact (erf) form.

mod cpu;
pub mod cuda;

use crate::autograd;
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
    let mut y = if let Device::Cuda(_) = x.device() {
        let xc = cuda_input("act", x)?;
        let (dev, xs) = xc.cuda_whole_f32("act")?;
        Tensor::from_cuda_f32(dev, cuda::act(dev, xs, a)?, x.dims())?
    } else {
        let mut out = cpu_f32("act", x)?.to_vec();
        apply_act_slice(&mut out, a);
        Tensor::from_f32(out, x.dims())
    };
    if autograd::requires_grad(x) {
        // GELU's derivative needs x; ReLU's the sign of x (y > 0 alike).
        let xs = x.clone();
        autograd::record(
            "act",
            &[x],
            &mut y,
            autograd::bytes(x),
            Box::new(move |g| Ok(vec![Some(act_backward(&xs, g, a)?)])),
        );
    }
    Ok(y)
}

/// The gradient of act at x: g * act'(x) (GELU's exact derivative,
/// Phi(x) + x phi(x), as PyTorch computes it).
pub fn act_backward(x: &Tensor, g: &Tensor, a: Act) -> Result<Tensor> {
    const OP: &str = "act backward";
    if x.dims() != g.dims() {
        return Err(Error::shape(
            OP,
            format!("x {:?}, gradient {:?}", x.dims(), g.dims()),
        ));
    }
    if let Device::Cuda(_) = same_device(OP, &[x, g])? {
        let (xc, gc) = (cuda_input(OP, x)?, cuda_input(OP, g)?);
        let (dev, xs) = xc.cuda_whole_f32(OP)?;
        let dx = cuda::act_backward(dev, xs, gc.cuda_whole_f32(OP)?.1, a)?;
        return Tensor::from_cuda_f32(dev, dx, x.dims());
    }
    let (xs, gs) = (cpu_f32(OP, x)?, cpu_f32(OP, g)?);
    let out = match a {
        Act::None => gs.to_vec(),
        Act::Relu => {
            use rayon::prelude::*;
            let mut out = vec![0.0f32; xs.len()];
            out.par_chunks_mut(1 << 14)
                .zip(xs.par_chunks(1 << 14).zip(gs.par_chunks(1 << 14)))
                .for_each(|(o, (x, g))| {
                    for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                        *o = if x > 0.0 { g } else { 0.0 };
                    }
                });
            out
        }
        Act::Gelu => cpu::gelu_backward(xs, gs),
    };
    Ok(Tensor::from_f32(out, x.dims()))
}

/// g [N, ...] summed over its leading dim: [1, ...] (the gradient of a
/// batch-1 operand that was shared by every item).
pub fn sum_leading(g: &Tensor) -> Result<Tensor> {
    const OP: &str = "sum_leading";
    let d = g.dims();
    if d.is_empty() {
        return Err(Error::shape(OP, "a scalar has no leading dim"));
    }
    let per: usize = d[1..].iter().product();
    let mut dims = d.to_vec();
    dims[0] = 1;
    // The same bits on both devices (ops::reduce).
    crate::ops::reduce::sum_rows(g, per.max(1))?.reshape(dims)
}

/// The gradients of a + b (b's leading dim a's or 1): g, and g summed over
/// the items when b was shared.
fn add_backward(g: &Tensor, b_dims: &[usize]) -> Result<Vec<Option<Tensor>>> {
    let gb = if g.dims() == b_dims {
        g.clone()
    } else {
        sum_leading(g)?
    };
    Ok(vec![Some(g.clone()), Some(gb)])
}

fn record_add(
    op: &'static str,
    vars: [Option<autograd::Var>; 2],
    out: &mut Tensor,
    b_dims: &[usize],
) {
    if vars.iter().all(Option::is_none) {
        return;
    }
    let bd = b_dims.to_vec();
    autograd::record_vars(op, &vars, out, 0, Box::new(move |g| add_backward(g, &bd)));
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
    let mut out = if let Device::Cuda(_) = same_device("add", &[a, b])? {
        let _p = crate::profile::scope("add");
        let (a, b) = (cuda_input("add", a)?, cuda_input("add", b)?);
        let ((dev, av), (_, bv)) = (a.cuda_whole_f32("add")?, b.cuda_whole_f32("add")?);
        Tensor::from_cuda_f32(dev, cuda::add(dev, av, bv)?, a.dims())?
    } else {
        let mut out = cpu_f32("add", a)?.to_vec();
        cpu::add_assign(&mut out, cpu_f32("add", b)?);
        Tensor::from_f32(out, a.dims())
    };
    if autograd::is_tracked(&[a, b]) {
        record_add("add", [a.var(), b.var()], &mut out, b.dims());
    }
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
    let mut out = if let Device::Cuda(_) = same_device("add", &[a, b])? {
        let (a, b) = (cuda_input("add", a)?, cuda_input("add", b)?);
        let ((dev, av), (_, bv)) = (a.cuda_whole_f32("add")?, b.cuda_whole_f32("add")?);
        Tensor::from_cuda_f32(dev, cuda::add_bias_rows(dev, av, bv)?, ad)?
    } else {
        let bs = cpu_f32("add", b)?;
        let mut out = cpu_f32("add", a)?.to_vec();
        for chunk in out.chunks_mut(bs.len().max(1)) {
            cpu::add_assign(chunk, bs);
        }
        Tensor::from_f32(out, ad)
    };
    if autograd::is_tracked(&[a, b]) {
        record_add("add", [a.var(), b.var()], &mut out, b.dims());
    }
    Ok(out)
}

/// a += b in place (copies a's storage first only if it is shared).
pub fn add_(a: &mut Tensor, b: &Tensor) -> Result<()> {
    let _p = crate::profile::scope("add");
    if a.dims() != b.dims() {
        return Err(Error::shape(
            "add",
            format!("{:?} + {:?}", a.dims(), b.dims()),
        ));
    }
    let vars = [a.var(), b.var()];
    if let Device::Cuda(_) = same_device("add", &[a, b])? {
        add_rows_cuda(a, b)?;
    } else {
        let bs = cpu_f32("add", b)?;
        cpu_f32("add", a)?;
        cpu::add_assign(a.as_f32_mut()?, bs);
    }
    a.set_var(None);
    record_add("add_", vars, a, b.dims());
    Ok(())
}

/// a += b in place where b's leading dim is a's or 1 (b added to every item
/// of a: the ViT's pos_embed over a batch of images).
pub fn add_broadcast_(a: &mut Tensor, b: &Tensor) -> Result<()> {
    let (ad, bd) = (a.dims(), b.dims());
    if ad == bd {
        return add_(a, b);
    }
    if ad.len() != bd.len() || ad.is_empty() || bd[0] != 1 || ad[1..] != bd[1..] {
        return Err(Error::shape("add", format!("{:?} + {:?}", ad, bd)));
    }
    let _p = crate::profile::scope("add");
    let vars = [a.var(), b.var()];
    if let Device::Cuda(_) = same_device("add", &[a, b])? {
        add_rows_cuda(a, b)?;
    } else {
        let bs = cpu_f32("add", b)?;
        cpu_f32("add", a)?;
        for chunk in a.as_f32_mut()?.chunks_mut(bs.len().max(1)) {
            cpu::add_assign(chunk, bs);
        }
    }
    a.set_var(None);
    record_add("add_", vars, a, b.dims());
    Ok(())
}

/// a [rows, b.numel()] += b on every row, in a's buffer (copied first only if
/// shared): one bias_act launch, no allocation.
fn add_rows_cuda(a: &mut Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != crate::tensor::DType::F32 {
        return Err(Error::DType {
            op: "add",
            expected: "f32",
            got: a.dtype().name(),
        });
    }
    let b = cuda_input("add", b)?;
    let (dev, bv) = b.cuda_whole_f32("add")?;
    let dev = dev.clone();
    let cols = b.numel();
    let mut av = a.cuda_f32_mut("add")?;
    cuda::bias_act_view(&dev, &mut av, Some(bv), cols, Act::None)
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
