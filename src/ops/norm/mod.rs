//! LayerNorm over the last dimension (channels-last tokens) and LayerNorm2d over
//! the channel dimension of NCHW maps (SAM's LayerNorm2d), each with an optional
//! fused activation; BatchNorm folding for inference.
//!
//! Statistics: mean first, then the biased variance of (x - mean), both
//! accumulated in f64 per row so the result does not depend on the summation order.

pub(crate) mod cpu;
pub mod cuda;

use std::sync::Arc;

use crate::autograd;
use crate::dist::Collective;
use crate::error::Result;
use crate::ops::activation::Act;
use crate::ops::{cpu_f32, cuda_input, same_device};
use crate::tensor::{Device, Tensor};

/// x: [..., C], weight/bias: [C].
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    let c = *x.dims().last().unwrap_or(&0);
    w.expect_dims(OP, "weight", &[c])?;
    b.expect_dims(OP, "bias", &[c])?;
    let mut y = layer_norm_forward(x, w, b, eps)?;
    let groups = cpu::NormGroups {
        groups: x.numel() / c.max(1),
        c,
        stride: 1,
        p: 0,
    };
    record_norm(OP, x, w, b, eps, groups, &mut y);
    Ok(y)
}

/// Records a layer norm's node when an input is tracked: it keeps x (and the
/// weight, alive anyway) and recomputes the statistics in backward.
fn record_norm(
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
    geo: cpu::NormGroups,
    y: &mut Tensor,
) {
    if !autograd::is_tracked(&[x, w, b]) {
        return;
    }
    let (gx, gw, gb) = (
        autograd::requires_grad(x),
        autograd::requires_grad(w),
        autograd::requires_grad(b),
    );
    let (xs, ws) = (x.clone(), w.clone());
    autograd::record(
        op,
        &[x, w, b],
        y,
        autograd::bytes(x),
        Box::new(move |g| {
            const OP: &str = "layer_norm backward";
            let c = geo.c;
            if let Device::Cuda(_) = same_device(OP, &[&xs, &ws, g])? {
                let (xc, wc, gc) = (
                    cuda_input(OP, &xs)?,
                    cuda_input(OP, &ws)?,
                    cuda_input(OP, g)?,
                );
                let (dev, xv) = xc.cuda_whole_f32(OP)?;
                let (dx, wb) = cuda::layer_norm_backward(
                    dev,
                    xv,
                    wc.cuda_whole_f32(OP)?.1,
                    gc.cuda_whole_f32(OP)?.1,
                    geo,
                    eps,
                    gw || gb,
                )?;
                let (dw, db) = match wb {
                    Some((dw, db)) => (
                        gw.then(|| Tensor::from_cuda_f32(dev, dw, [c]))
                            .transpose()?,
                        gb.then(|| Tensor::from_cuda_f32(dev, db, [c]))
                            .transpose()?,
                    ),
                    None => (None, None),
                };
                let dx = gx
                    .then(|| Tensor::from_cuda_f32(dev, dx, xs.dims()))
                    .transpose()?;
                return Ok(vec![dx, dw, db]);
            }
            let (dx, dw, db) = cpu::layer_norm_backward(
                cpu_f32(OP, &xs)?,
                cpu_f32(OP, &ws)?,
                cpu_f32(OP, g)?,
                geo,
                eps,
            );
            Ok(vec![
                gx.then(|| Tensor::from_f32(dx, xs.dims())),
                gw.then(|| Tensor::from_f32(dw, &[c])),
                gb.then(|| Tensor::from_f32(db, &[c])),
            ])
        }),
    );
}

fn layer_norm_forward(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "layer_norm";
    let _p = crate::profile::scope(OP);
    let c = *x.dims().last().unwrap_or(&0);
    if let Device::Cuda(_) = same_device(OP, &[x, w, b])? {
        let (x, w, b) = (cuda_input(OP, x)?, cuda_input(OP, w)?, cuda_input(OP, b)?);
        let (dev, xs) = x.cuda_whole_f32(OP)?;
        let y = cuda::layer_norm(
            dev,
            xs,
            w.cuda_whole_f32(OP)?.1,
            b.cuda_whole_f32(OP)?.1,
            c,
            eps,
        )?;
        return Tensor::from_cuda_f32(dev, y, x.dims());
    }
    let out = cpu::layer_norm(cpu_f32(OP, x)?, cpu_f32(OP, w)?, cpu_f32(OP, b)?, c, eps);
    Ok(Tensor::from_f32(out, x.dims()))
}

/// x: [B, C, H, W], weight/bias: [C]; normalised over C at every pixel, then act.
pub fn layer_norm2d(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32, act: Act) -> Result<Tensor> {
    const OP: &str = "layer_norm2d";
    let [n, c, h, wd] = x.dims_n::<4>(OP, "input")?;
    w.expect_dims(OP, "weight", &[c])?;
    b.expect_dims(OP, "bias", &[c])?;
    if !autograd::is_tracked(&[x, w, b]) {
        return layer_norm2d_forward(x, w, b, eps, act);
    }
    // Recorded: the norm, then the activation as its own node.
    let mut y = layer_norm2d_forward(x, w, b, eps, Act::None)?;
    let groups = cpu::NormGroups {
        groups: n * h * wd,
        c,
        stride: h * wd,
        p: h * wd,
    };
    record_norm(OP, x, w, b, eps, groups, &mut y);
    if act == Act::None {
        return Ok(y);
    }
    crate::ops::activation::act(&y, act)
}

fn layer_norm2d_forward(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32, act: Act) -> Result<Tensor> {
    const OP: &str = "layer_norm2d";
    let _p = crate::profile::scope(OP);
    let [n, c, h, wd] = x.dims_n::<4>(OP, "input")?;
    if let Device::Cuda(_) = same_device(OP, &[x, w, b])? {
        let (x, w, b) = (cuda_input(OP, x)?, cuda_input(OP, w)?, cuda_input(OP, b)?);
        let (dev, _) = x.cuda_whole_f32(OP)?;
        let (ws, bs) = (w.cuda_whole_f32(OP)?.1, b.cuda_whole_f32(OP)?.1);
        let y = cuda::layer_norm2d(dev, &x.gpu_ref(OP)?, ws, bs, eps, act)?;
        return Tensor::from_gpu(dev, y);
    }
    let out = cpu::layer_norm2d(
        cpu_f32(OP, x)?,
        cpu_f32(OP, w)?,
        cpu_f32(OP, b)?,
        n,
        c,
        h * wd,
        eps,
        act,
    );
    Ok(Tensor::from_f32(out, x.dims()))
}

/// Folds an inference BatchNorm (gamma, beta, running mean / var, eps) that follows
/// a bias-free convolution into the convolution: returns (w', b') with
/// w' = w * s, b' = beta - mean * s, s = gamma / sqrt(var + eps).
/// conv_w: [O, ...], all BN tensors [O].
pub fn fold_batch_norm(
    conv_w: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "fold_batch_norm";
    let o = *conv_w.dims().first().unwrap_or(&0);
    for (t, what) in [
        (gamma, "weight"),
        (beta, "bias"),
        (mean, "running_mean"),
        (var, "running_var"),
    ] {
        t.expect_dims(OP, what, &[o])?;
    }
    let w = cpu_f32(OP, conv_w)?;
    let per = w.len() / o.max(1);
    let (g, be, mu, va) = (
        cpu_f32(OP, gamma)?,
        cpu_f32(OP, beta)?,
        cpu_f32(OP, mean)?,
        cpu_f32(OP, var)?,
    );
    let mut nw = w.to_vec();
    let mut nb = vec![0.0f32; o];
    for i in 0..o {
        // In f64 so the folded weights are the correctly rounded products.
        let s = g[i] as f64 / (va[i] as f64 + eps as f64).sqrt();
        for v in &mut nw[i * per..(i + 1) * per] {
            *v = (*v as f64 * s) as f32;
        }
        nb[i] = (be[i] as f64 - mu[i] as f64 * s) as f32;
    }
    Ok((
        Tensor::from_f32(nw, conv_w.dims()),
        Tensor::from_f32(nb, &[o]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_rows() {
        let x = Tensor::from_vec(vec![1., 2., 3., 4., -1., -1., -1., -1.], [2, 4]).unwrap();
        let w = Tensor::from_vec(vec![1.0; 4], [4]).unwrap();
        let b = Tensor::from_vec(vec![0.5; 4], [4]).unwrap();
        let y = layer_norm(&x, &w, &b, 1e-5).unwrap();
        let y = y.as_f32().unwrap();
        // (x - 2.5) / sqrt(1.25 + eps) + 0.5; a constant row gives the bias.
        let s = (1.25f32 + 1e-5).sqrt();
        for (i, v) in [1., 2., 3., 4.].iter().enumerate() {
            assert!((y[i] - ((v - 2.5) / s + 0.5)).abs() < 1e-6);
        }
        assert!(y[4..].iter().all(|&v| v == 0.5));
    }

    #[test]
    fn layer_norm2d_matches_channels_last_layer_norm() {
        // [1, 3, 1, 2] vs its channels-last transpose [2, 3].
        let x = Tensor::from_vec(vec![1., 4., 2., 5., 6., -3.], [1, 3, 1, 2]).unwrap();
        let xt = Tensor::from_vec(vec![1., 2., 6., 4., 5., -3.], [2, 3]).unwrap();
        let w = Tensor::from_vec(vec![1., 2., 3.], [3]).unwrap();
        let b = Tensor::from_vec(vec![0., 1., -1.], [3]).unwrap();
        let a = layer_norm2d(&x, &w, &b, 1e-6, Act::None).unwrap();
        let c = layer_norm(&xt, &w, &b, 1e-6).unwrap();
        let (a, c) = (a.as_f32().unwrap(), c.as_f32().unwrap());
        for ch in 0..3 {
            for p in 0..2 {
                assert!((a[ch * 2 + p] - c[p * 3 + ch]).abs() < 1e-6);
            }
        }
    }
}

/// SyncBatchNorm (PyTorch's, MODEL.md "Training details"): while a scope
/// is entered on a thread, every train-mode BatchNorm on that thread
/// normalises with the statistics of all ranks' batches together, and its
/// backward sums (sum g, sum g xhat) over the ranks for dx. Every rank must
/// run the same BatchNorms in the same order (the ranks of one model do).
pub struct SyncBatchNorm {
    prev: Option<Arc<dyn Collective>>,
}

thread_local! {
    static SYNC: std::cell::RefCell<Option<Arc<dyn Collective>>> =
        const { std::cell::RefCell::new(None) };
}

impl SyncBatchNorm {
    /// Until the guard drops, this thread's train-mode BatchNorms sync over
    /// `comm`'s ranks.
    pub fn enter(comm: Arc<dyn Collective>) -> SyncBatchNorm {
        let prev = SYNC.with(|s| s.borrow_mut().replace(comm));
        SyncBatchNorm { prev }
    }

    fn current() -> Option<Arc<dyn Collective>> {
        SYNC.with(|s| s.borrow().clone())
    }
}

impl Drop for SyncBatchNorm {
    fn drop(&mut self) {
        let prev = self.prev.take();
        SYNC.with(|s| *s.borrow_mut() = prev);
    }
}

/// Every rank's (count, mean, biased var) per channel, gathered (an
/// all-reduce of zero-padded slots: adding zeros is exact), combined in rank
/// order as PyTorch's SyncBatchNorm does (mean of the means weighted by
/// count; variance from each rank's variance and its mean's distance to the
/// combined mean). Returns the combined count.
fn sync_stats(
    comm: &dyn Collective,
    mean: &mut [f64],
    var: &mut [f64],
    count: usize,
) -> Result<usize> {
    let (c, w, r) = (mean.len(), comm.world(), comm.rank());
    let slot = 2 * c + 1;
    let mut all = vec![0.0f64; w * slot];
    let mine = &mut all[r * slot..(r + 1) * slot];
    mine[0] = count as f64;
    mine[1..=c].copy_from_slice(mean);
    mine[c + 1..].copy_from_slice(var);
    comm.all_reduce_sum_f64(&mut all)?;
    let slots: Vec<&[f64]> = all.chunks(slot).collect();
    let total: f64 = slots.iter().map(|s| s[0]).sum();
    for ch in 0..c {
        let m = slots.iter().map(|s| s[0] * s[1 + ch]).sum::<f64>() / total;
        let v = slots
            .iter()
            .map(|s| s[0] * (s[1 + c + ch] + (s[1 + ch] - m).powi(2)))
            .sum::<f64>()
            / total;
        mean[ch] = m;
        var[ch] = v;
    }
    Ok(total as usize)
}

/// The backward's per-channel sums added over the ranks (rank order).
fn sync_sums(comm: &dyn Collective, dg: &mut [f64], db: &mut [f64]) -> Result<()> {
    let mut both = [&*dg, &*db].concat();
    comm.all_reduce_sum_f64(&mut both)?;
    let c = dg.len();
    dg.copy_from_slice(&both[..c]);
    db.copy_from_slice(&both[c..]);
    Ok(())
}

/// What a train-mode BatchNorm computed besides its output: the batch
/// statistics per channel (mean, and the unbiased variance that the running
/// statistics take), for the caller's running-statistics update.
#[derive(Clone, Debug)]
pub struct BatchStats {
    pub mean: Vec<f64>,
    pub var_unbiased: Vec<f64>,
    /// Values per channel (N H W).
    pub count: usize,
}

/// BatchNorm2d in train mode: x [N, C, H, W] normalised per channel with the
/// statistics of this batch (mean and biased variance over N, H, W, in f64),
/// then gamma, beta [C]. Records its backward (dx, dgamma, dbeta) under a
/// recording. The statistics are the one reduction point: under a
/// `SyncBatchNorm` scope they are every rank's batch's together.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<(Tensor, BatchStats)> {
    batch_norm_train_fused(x, gamma, beta, eps, None, false)
}

/// relu?(batch_norm_train(x) + residual?): a residual block's tail as one op
/// and one tape node (the values are the unfused ops', bit for bit). Its
/// backward masks the gradient by the output's sign (the ReLU), hands that to
/// the residual and runs BatchNorm's backward on it: it saves x and its own
/// output, which the next convolution keeps for its weight gradient anyway,
/// instead of the pre-activation that a separate ReLU would keep.
/// residual: x's shape.
pub fn batch_norm_train_fused(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    const OP: &str = "batch_norm_train";
    let _p = crate::profile::scope(OP);
    let [n, c, h, w] = x.dims_n::<4>(OP, "input")?;
    gamma.expect_dims(OP, "weight", &[c])?;
    beta.expect_dims(OP, "bias", &[c])?;
    if let Some(r) = residual {
        r.expect_dims(OP, "residual", x.dims())?;
    }
    let p = h * w;
    let count = n * p;
    if count < 2 {
        return Err(crate::Error::shape(
            OP,
            format!(
                "{:?}: train-mode BatchNorm needs more than one value per channel",
                x.dims()
            ),
        ));
    }
    let mut all = vec![x, gamma, beta];
    all.extend(residual);
    let comm = SyncBatchNorm::current();
    // The values per channel behind the statistics (all ranks' when synced).
    let mut total = count;
    let mut sync_fwd = |mean: &mut [f64], var: &mut [f64]| -> Result<()> {
        if let Some(c) = &comm {
            total = sync_stats(c.as_ref(), mean, var, count)?;
        }
        Ok(())
    };
    let unbiased = |var: &[f64], count: usize| -> Vec<f64> {
        var.iter()
            .map(|v| v * count as f64 / (count - 1) as f64)
            .collect()
    };
    // The statistics stay where the backward needs them: host vectors on the
    // CPU, device vectors (downloaded for the running statistics) on CUDA.
    let (mut y, stats, saved_stats) = match same_device(OP, &all)? {
        Device::Cuda(_) => {
            const OP: &str = "batch_norm_train (cuda)";
            let (xc, gc, bc) = (
                cuda_input(OP, x)?,
                cuda_input(OP, gamma)?,
                cuda_input(OP, beta)?,
            );
            let rc = residual.map(|r| cuda_input(OP, r)).transpose()?;
            let (dev, xs) = xc.cuda_whole_f32(OP)?;
            let dev = dev.clone();
            let rs = rc.as_ref().map(|r| r.cuda_whole_f32(OP)).transpose()?;
            let (y, mean, var) = cuda::batch_norm_train(
                &dev,
                xs,
                gc.cuda_whole_f32(OP)?.1,
                bc.cuda_whole_f32(OP)?.1,
                (rs.map(|r| r.1), relu),
                (n, c, p),
                eps,
                comm.is_some()
                    .then_some(&mut sync_fwd as cuda::HostSync<'_>),
            )?;
            let down = |v: &cudarc::driver::CudaSlice<f64>| {
                dev.stream()
                    .clone_dtoh(v)
                    .map_err(crate::cuda::driver_err("copy to host"))
            };
            let (mh, vh) = (down(&mean)?, down(&var)?);
            let stats = BatchStats {
                var_unbiased: unbiased(&vh, total),
                mean: mh,
                count: total,
            };
            let y = Tensor::from_cuda_f32(&dev, y, x.dims())?;
            (y, stats, SavedStats::Cuda(dev, mean, var))
        }
        Device::Cpu => {
            let (xs, gs, bs) = (cpu_f32(OP, x)?, cpu_f32(OP, gamma)?, cpu_f32(OP, beta)?);
            let rs = residual.map(|r| cpu_f32(OP, r)).transpose()?;
            let (mut mean, mut var) = cpu::channel_stats(xs, n, c, p);
            sync_fwd(&mut mean, &mut var)?;
            let y = cpu::batch_norm_apply(xs, gs, bs, (&mean, &var), rs, relu, (n, c, p), eps);
            let stats = BatchStats {
                var_unbiased: unbiased(&var, total),
                mean: mean.clone(),
                count: total,
            };
            (
                Tensor::from_f32(y, x.dims()),
                stats,
                SavedStats::Cpu(mean, var),
            )
        }
    };
    if autograd::is_tracked(&all) {
        let (gx, gg, gb) = (
            autograd::requires_grad(x),
            autograd::requires_grad(gamma),
            autograd::requires_grad(beta),
        );
        let gr = residual.is_some_and(autograd::requires_grad);
        let has_r = residual.is_some();
        // The output (before it joins the tape) for the ReLU's mask.
        let ys = relu.then(|| y.clone());
        let saved = autograd::bytes(x) + ys.as_ref().map_or(0, autograd::bytes);
        let (xk, gk) = (x.clone(), gamma.clone());
        autograd::record(
            OP,
            &all,
            &mut y,
            saved,
            Box::new(move |g| {
                let gm = match &ys {
                    Some(y) => crate::ops::activation::act_backward(y, g, Act::Relu)?,
                    None => g.clone(),
                };
                let sync = comm.as_ref().map(|c| (c.as_ref(), total));
                let (dx, dg, db) = batch_norm_train_backward(
                    &xk,
                    &gk,
                    &gm,
                    &saved_stats,
                    (n, c, p),
                    eps,
                    gx,
                    sync,
                )?;
                let mut v = vec![dx, gg.then_some(dg), gb.then_some(db)];
                if has_r {
                    v.push(gr.then_some(gm));
                }
                Ok(v)
            }),
        );
    }
    Ok((y, stats))
}

/// A train-mode BatchNorm's batch statistics (mean, biased variance) kept for
/// its backward, on the device that computed them.
enum SavedStats {
    Cpu(Vec<f64>, Vec<f64>),
    Cuda(
        std::sync::Arc<crate::cuda::CudaDevice>,
        cudarc::driver::CudaSlice<f64>,
        cudarc::driver::CudaSlice<f64>,
    ),
}

/// BatchNorm's backward on the gradient g of its output: (dx when `want_dx`,
/// dgamma, dbeta), on the device of the saved statistics; `sync`: the ranks
/// and the values per channel over all of them (SyncBatchNorm).
#[allow(clippy::too_many_arguments)]
fn batch_norm_train_backward(
    x: &Tensor,
    gamma: &Tensor,
    g: &Tensor,
    stats: &SavedStats,
    (n, c, p): (usize, usize, usize),
    eps: f32,
    want_dx: bool,
    sync: Option<(&dyn Collective, usize)>,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let mut sums = |dg: &mut [f64], db: &mut [f64]| -> Result<()> {
        match sync {
            Some((c, _)) => sync_sums(c, dg, db),
            None => Ok(()),
        }
    };
    let sync = sync.map(|(_, total)| (&mut sums as cuda::HostSync<'_>, total));
    match stats {
        SavedStats::Cpu(mean, var) => {
            const OP: &str = "batch_norm_train backward";
            crate::ops::backward_on_cpu(OP, &[g])?;
            let (dx, dg, db) = cpu::batch_norm_backward(
                cpu_f32(OP, x)?,
                cpu_f32(OP, gamma)?,
                cpu_f32(OP, g)?,
                (mean, var),
                (n, c, p),
                eps,
                want_dx,
                sync,
            )?;
            Ok((
                dx.map(|d| Tensor::from_f32(d, x.dims())),
                Tensor::from_f32(dg, &[c]),
                Tensor::from_f32(db, &[c]),
            ))
        }
        SavedStats::Cuda(dev, mean, var) => {
            const OP: &str = "batch_norm_train backward (cuda)";
            let (xc, gc, gcu) = (
                cuda_input(OP, x)?,
                cuda_input(OP, gamma)?,
                cuda_input(OP, g)?,
            );
            let (dx, dg, db) = cuda::batch_norm_backward(
                dev,
                xc.cuda_whole_f32(OP)?.1,
                gc.cuda_whole_f32(OP)?.1,
                gcu.cuda_whole_f32(OP)?.1,
                (mean, var),
                (n, c, p),
                eps,
                want_dx,
                sync,
            )?;
            Ok((
                dx.map(|d| Tensor::from_cuda_f32(dev, d, x.dims()))
                    .transpose()?,
                Tensor::from_cuda_f32(dev, dg, [c])?,
                Tensor::from_cuda_f32(dev, db, [c])?,
            ))
        }
    }
}
