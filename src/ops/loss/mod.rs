//! The authors' training loss over all masks of a batch at once (MODEL.md,
//! "Training"): p = sigmoid(logit), y in {0, 1},
//!   focal = sum(-0.25 y (1-p)^2 log(p + 1e-12) - 0.75 (1-y) p^2 log(1-p + 1e-12)) / count
//!   dice  = 1 - (2 sum(p y) + 1) / (sum p + sum y + 1)
//!   loss  = focal + w dice            (w = 20)
//! Forward and backward are one pass: the gradient with respect to the logits
//! is computed with the sums (in f64) and kept for the backward, which only
//! scales it. CPU for now; the CUDA kernel comes with the CUDA backward.

pub mod cuda;

use rayon::prelude::*;

use crate::autograd;
use crate::error::{Error, Result};
use crate::ops::cpu_f32;
use crate::tensor::{Device, Tensor};

/// The terms of one loss evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossTerms {
    pub loss: f64,
    pub focal: f64,
    pub dice: f64,
}

const EPS: f64 = 1e-12;
const CHUNK: usize = 1 << 14;

/// logits and labels of one shape (labels 0 or 1) -> (loss as a [1] tensor,
/// tracked when the logits are, and its terms). `dice_weight` is 20 in the
/// authors' trainer.
pub fn focal_dice(
    logits: &Tensor,
    labels: &Tensor,
    dice_weight: f64,
) -> Result<(Tensor, LossTerms)> {
    const OP: &str = "focal_dice";
    if logits.dims() != labels.dims() || logits.numel() == 0 {
        return Err(Error::shape(
            OP,
            format!("logits {:?}, labels {:?}", logits.dims(), labels.dims()),
        ));
    }
    autograd::no_backward("focal_dice (labels)", &[labels])?;
    if let Device::Cuda(_) = crate::ops::same_device(OP, &[logits, labels])? {
        return focal_dice_cuda(logits, labels, dice_weight);
    }
    let (x, y) = (cpu_f32(OP, logits)?, cpu_f32(OP, labels)?);
    if let Some(v) = y.iter().find(|&&v| v != 0.0 && v != 1.0) {
        return Err(Error::input(
            OP,
            format!("labels must be 0 or 1, found {v}"),
        ));
    }
    let count = x.len() as f64;
    // Per chunk: (focal sum, sum p y, sum p, sum y), added in chunk order.
    let parts: Vec<[f64; 4]> = x
        .par_chunks(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .map(|(x, y)| {
            let mut s = [0.0f64; 4];
            for (&x, &y) in x.iter().zip(y) {
                let p = sigmoid(x);
                let y = y as f64;
                s[0] += focal_term(p, y);
                s[1] += p * y;
                s[2] += p;
                s[3] += y;
            }
            s
        })
        .collect();
    let mut s = [0.0f64; 4];
    for q in &parts {
        for i in 0..4 {
            s[i] += q[i];
        }
    }
    let focal = s[0] / count;
    let (inter, den) = (s[1], s[2] + s[3] + 1.0);
    let dice = 1.0 - (2.0 * inter + 1.0) / den;
    let terms = LossTerms {
        loss: focal + dice_weight * dice,
        focal,
        dice,
    };
    let mut out = Tensor::from_f32(vec![terms.loss as f32], &[1]);
    if autograd::requires_grad(logits) {
        // d loss / d logit_i = (d focal / d p_i + w d dice / d p_i) p_i (1 - p_i)
        let mut grad = vec![0.0f32; x.len()];
        grad.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
            .for_each(|(gc, (x, y))| {
                for ((g, &x), &y) in gc.iter_mut().zip(x).zip(y) {
                    let p = sigmoid(x);
                    let y = y as f64;
                    let d_focal = focal_dp(p, y) / count;
                    let d_dice = -(2.0 * y * den - (2.0 * inter + 1.0)) / (den * den);
                    *g = ((d_focal + dice_weight * d_dice) * p * (1.0 - p)) as f32;
                }
            });
        let grad = Tensor::from_f32(grad, logits.dims());
        let saved = autograd::bytes(&grad);
        autograd::record(
            OP,
            &[logits, labels],
            &mut out,
            saved,
            Box::new(move |g| {
                crate::ops::backward_on_cpu("focal_dice backward", &[g])?;
                let s = cpu_f32("focal_dice backward", g)?[0];
                let gs: Vec<f32> = cpu_f32("focal_dice backward", &grad)?
                    .iter()
                    .map(|&v| v * s)
                    .collect();
                Ok(vec![Some(Tensor::from_f32(gs, grad.dims())), None])
            }),
        );
    }
    Ok((out, terms))
}

fn sigmoid(x: f32) -> f64 {
    // PyTorch computes p in f32 before the logs.
    (1.0 / (1.0 + (-x).exp())) as f64
}

fn focal_term(p: f64, y: f64) -> f64 {
    -0.25 * y * (1.0 - p).powi(2) * (p + EPS).ln() - 0.75 * (1.0 - y) * p * p * (1.0 - p + EPS).ln()
}

/// d focal_term / d p.
fn focal_dp(p: f64, y: f64) -> f64 {
    let l1 = (p + EPS).ln();
    let l0 = (1.0 - p + EPS).ln();
    -0.25 * y * (-2.0 * (1.0 - p) * l1 + (1.0 - p).powi(2) / (p + EPS))
        - 0.75 * (1.0 - y) * (2.0 * p * l0 - p * p / (1.0 - p + EPS))
}

/// focal_dice on the device: the sums there (deterministic), the three terms
/// read back (one synchronisation), the gradient computed in backward from
/// the saved logits, labels and sums.
fn focal_dice_cuda(
    logits: &Tensor,
    labels: &Tensor,
    dice_weight: f64,
) -> Result<(Tensor, LossTerms)> {
    const OP: &str = "focal_dice (cuda)";
    let (x, y) = (
        crate::ops::cuda_input(OP, logits)?,
        crate::ops::cuda_input(OP, labels)?,
    );
    let (dev, xs) = x.cuda_whole_f32(OP)?;
    let dev = dev.clone();
    let ys = y.cuda_whole_f32(OP)?.1;
    let sums = cuda::loss_sums(&dev, xs, ys)?;
    let s = dev
        .stream()
        .clone_dtoh(&sums)
        .map_err(crate::cuda::driver_err("copy to host"))?;
    let count = xs.len() as f64;
    let host = labels.to_host()?;
    if let Some(v) = cpu_f32(OP, &host)?.iter().find(|&&v| v != 0.0 && v != 1.0) {
        return Err(Error::input(
            OP,
            format!("labels must be 0 or 1, found {v}"),
        ));
    }
    let focal = s[0] / count;
    let (inter, den) = (s[1], s[2] + s[3] + 1.0);
    let dice = 1.0 - (2.0 * inter + 1.0) / den;
    let terms = LossTerms {
        loss: focal + dice_weight * dice,
        focal,
        dice,
    };
    let mut out = Tensor::from_f32(vec![terms.loss as f32], &[1]).to_device(logits.device())?;
    if autograd::requires_grad(logits) {
        let saved = autograd::bytes(&x) + autograd::bytes(&y);
        let dims = logits.dims().to_vec();
        autograd::record(
            "focal_dice",
            &[logits, labels],
            &mut out,
            saved,
            Box::new(move |g| {
                const OP: &str = "focal_dice backward (cuda)";
                let gc = crate::ops::cuda_input(OP, g)?;
                let grad = cuda::loss_grad(
                    &dev,
                    x.cuda_whole_f32(OP)?.1,
                    y.cuda_whole_f32(OP)?.1,
                    &sums,
                    gc.cuda_whole_f32(OP)?.1,
                    dice_weight,
                )?;
                Ok(vec![
                    Some(Tensor::from_cuda_f32(&dev, grad, dims.clone())?),
                    None,
                ])
            }),
        );
    }
    Ok((out, terms))
}
