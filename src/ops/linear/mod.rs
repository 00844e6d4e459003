//! Linear layers: y = act(x W^T + b (+ residual)), W stored [out, in] as in PyTorch.

mod cpu;
pub mod cuda;

use cudarc::driver::CudaSlice;
use rayon::prelude::*;

use crate::autograd;
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
    let tracked = autograd::is_tracked(&all);
    if tracked && act != Act::None {
        // Under a recording the activation is its own node: its backward
        // needs the pre-activation values.
        let z = linear_fused(x, w, b, residual, Act::None)?;
        return crate::ops::activation::act(&z, act);
    }
    let mut y = linear_forward(x, w, b, residual, act, (m, n, k), &out_dims)?;
    if tracked {
        let (gx, gw) = (autograd::requires_grad(x), autograd::requires_grad(w));
        let gb = b.is_some_and(autograd::requires_grad);
        let gr = residual.is_some_and(autograd::requires_grad);
        // dX needs W, dW needs X: a frozen weight keeps no input alive.
        let xs = gw.then(|| x.clone());
        let ws = gx.then(|| w.clone());
        let saved = xs.as_ref().map_or(0, autograd::bytes);
        let (xd, wd) = (x.dims().to_vec(), w.dims().to_vec());
        let mut inputs = vec![x, w];
        inputs.extend(b);
        inputs.extend(residual);
        let (has_b, has_r) = (b.is_some(), residual.is_some());
        autograd::record(
            OP,
            &inputs,
            &mut y,
            saved,
            Box::new(move |g| {
                let (dx, dw, db) =
                    linear_backward(g, xs.as_ref(), ws.as_ref(), gb, (m, n, k), (&xd, &wd))?;
                let mut v = vec![dx, dw];
                if has_b {
                    v.push(db);
                }
                if has_r {
                    v.push(gr.then(|| g.clone()));
                }
                Ok(v)
            }),
        );
    }
    Ok(y)
}

/// act(x W^T + b + residual) with W packed for the CPU's bf16 GEMM
/// (`nn::Linear::pack_cpu_bf16`): x rounded to bf16, products summed in f32,
/// then the f32 epilogue (the residual seeds the accumulator, as in
/// `linear_fused`). CPU, inference only (no backward).
pub fn linear_packed_bf16(
    x: &Tensor,
    w: &crate::cpu::bf16_gemm::PackedB,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    const OP: &str = "linear (cpu bf16)";
    let _p = crate::profile::scope(OP);
    let (n, k) = (w.n, w.k);
    let xd = x.dims();
    if xd.last() != Some(&k) {
        return Err(Error::shape(
            OP,
            format!("input {xd:?} does not end in the weight's in-features {k}"),
        ));
    }
    let mut all = vec![x];
    all.extend(b);
    all.extend(residual);
    autograd::no_backward(OP, &all)?;
    let m = x.numel() / k.max(1);
    let mut out_dims = xd.to_vec();
    *out_dims.last_mut().expect("rank >= 1 checked above") = n;
    let xs = crate::ops::cpu_f32(OP, x)?;
    let mut out = match residual {
        Some(r) => {
            r.expect_dims(OP, "residual", &out_dims)?;
            crate::ops::cpu_f32(OP, r)?.to_vec()
        }
        None => vec![0.0f32; m * n],
    };
    {
        let _p = crate::profile::scope("linear (cpu bf16).gemm");
        crate::cpu::bf16_gemm::gemm_bf16(xs, m, w, &mut out, residual.is_some())?;
    }
    let bias = match b {
        Some(b) => {
            b.expect_dims(OP, "bias", &[n])?;
            Some(crate::ops::cpu_f32(OP, b)?)
        }
        None => None,
    };
    if bias.is_some() || act != Act::None {
        // The f32 path's epilogue (vectorised GELU), rows in chunks of ~16 K
        // values per task; the residual is already in the sums.
        let _p = crate::profile::scope("linear (cpu bf16).epilogue");
        let rows_per = (16_384 / n.max(1)).max(1);
        out.par_chunks_mut(rows_per * n.max(1)).for_each(|chunk| {
            for row in chunk.chunks_mut(n.max(1)) {
                cpu::epilogue_row(row, bias, None);
                crate::ops::activation::apply_act_seq(row, act);
            }
        });
    }
    Ok(Tensor::from_f32(out, &out_dims))
}

/// The gradients of y = x W^T + b (+ residual): dX = G W (when `w` is given:
/// x needs one), dW = G^T X (when `x` is given), db = column sums of G (when
/// `want_b`). G [m, n], x [m, k], w [n, k].
#[allow(clippy::type_complexity)]
pub fn linear_backward(
    g: &Tensor,
    x: Option<&Tensor>,
    w: Option<&Tensor>,
    want_b: bool,
    (m, n, k): (usize, usize, usize),
    (x_dims, w_dims): (&[usize], &[usize]),
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    const OP: &str = "linear backward";
    let mut all = vec![g];
    all.extend(x);
    all.extend(w);
    if g.numel() != m * n {
        return Err(Error::shape(
            OP,
            format!("gradient {:?} for {m} x {n}", g.dims()),
        ));
    }
    if let Device::Cuda(_) = same_device(OP, &all)? {
        return cuda::linear_backward(g, x, w, want_b, (m, n, k), (x_dims, w_dims));
    }
    let gs = cpu_f32(OP, g)?;
    let dx = w
        .map(|w| -> Result<Tensor> {
            Ok(Tensor::from_f32(
                cpu::grad_input(gs, cpu_f32(OP, w)?, m, n, k),
                x_dims,
            ))
        })
        .transpose()?;
    let dw = x
        .map(|x| -> Result<Tensor> {
            Ok(Tensor::from_f32(
                cpu::grad_weight(gs, cpu_f32(OP, x)?, m, n, k),
                w_dims,
            ))
        })
        .transpose()?;
    let db = want_b.then(|| Tensor::from_f32(crate::ops::reduce::sum_rows_cpu(gs, m, n), &[n]));
    Ok((dx, dw, db))
}

fn linear_forward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Act,
    (m, n, k): (usize, usize, usize),
    out_dims: &[usize],
) -> Result<Tensor> {
    const OP: &str = "linear";
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
            out_dims,
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
    Ok(Tensor::from_f32(out, out_dims))
}

/// The mask decoder's hypernetwork product: logits [N, 1, H, W] with
/// logits[i, p] = sum_c h[i, c] (f[i, c, p] + msf[0, c, p]), h [N, C],
/// f [N, C, H, W], msf [1, C, H, W]; the sum runs over c in order on both devices.
pub fn mask_dot(h: &Tensor, f: &Tensor, msf: &Tensor) -> Result<Tensor> {
    const OP: &str = "mask_dot";
    let _p = crate::profile::scope(OP);
    let [n, c, fh, fw] = f.dims_n::<4>(OP, "mask feature")?;
    h.expect_dims(OP, "hypernetwork output", &[n, c])?;
    msf.expect_dims(OP, "multi_scale_feature", &[1, c, fh, fw])?;
    let p = fh * fw;
    let mut y = mask_dot_forward(h, f, msf, (n, c, p), [n, 1, fh, fw])?;
    if autograd::is_tracked(&[h, f, msf]) {
        let gh = autograd::requires_grad(h);
        let (gf, gm) = (autograd::requires_grad(f), autograd::requires_grad(msf));
        // dh needs f and msf; df and dmsf need h.
        let fm = gh.then(|| (f.clone(), msf.clone()));
        let hs = (gf || gm).then(|| h.clone());
        let saved = fm.as_ref().map_or(0, |(f, _)| autograd::bytes(f));
        autograd::record(
            OP,
            &[h, f, msf],
            &mut y,
            saved,
            Box::new(move |g| {
                const OP: &str = "mask_dot backward";
                if let Device::Cuda(_) = g.device() {
                    let gc = cuda_input(OP, g)?;
                    let (dev, gs) = gc.cuda_whole_f32(OP)?;
                    let hc = hs.as_ref().map(|h| cuda_input(OP, h)).transpose()?;
                    let fmc = fm
                        .as_ref()
                        .map(|(f, m)| -> Result<(Tensor, Tensor)> {
                            Ok((cuda_input(OP, f)?, cuda_input(OP, m)?))
                        })
                        .transpose()?;
                    let hv = hc
                        .as_ref()
                        .map(|h| h.cuda_whole_f32(OP).map(|(_, s)| s))
                        .transpose()?;
                    let fmv = match &fmc {
                        Some((f, m)) => Some((f.cuda_whole_f32(OP)?.1, m.cuda_whole_f32(OP)?.1)),
                        None => None,
                    };
                    let (dh, df, dm) =
                        cuda::mask_dot_backward(dev, gs, hv, fmv, (gf, gm), (n, c, p))?;
                    let t = |d: Option<CudaSlice<f32>>, dims: Vec<usize>| {
                        d.map(|d| Tensor::from_cuda_f32(dev, d, dims)).transpose()
                    };
                    return Ok(vec![
                        t(dh, vec![n, c])?,
                        t(df, vec![n, c, fh, fw])?,
                        t(dm, vec![1, c, fh, fw])?,
                    ]);
                }
                let gs = cpu_f32(OP, g)?;
                let dh = match &fm {
                    Some((f, m)) => {
                        let (fs, ms) = (cpu_f32(OP, f)?, cpu_f32(OP, m)?);
                        let mut dh = vec![0.0f32; n * c];
                        for (i, row) in dh.chunks_exact_mut(c).enumerate() {
                            let gi = &gs[i * p..(i + 1) * p];
                            for (ch, d) in row.iter_mut().enumerate() {
                                let fr = &fs[(i * c + ch) * p..(i * c + ch + 1) * p];
                                let mr = &ms[ch * p..(ch + 1) * p];
                                *d = gi
                                    .iter()
                                    .zip(fr.iter().zip(mr))
                                    .map(|(&g, (&a, &b))| (g * (a + b)) as f64)
                                    .sum::<f64>() as f32;
                            }
                        }
                        Some(Tensor::from_f32(dh, &[n, c]))
                    }
                    None => None,
                };
                let (mut df, mut dm) = (None, None);
                if let Some(h) = &hs {
                    let hv = cpu_f32(OP, h)?;
                    if gf {
                        let mut d = vec![0.0f32; n * c * p];
                        for (r, plane) in d.chunks_exact_mut(p).enumerate() {
                            let (i, hr) = (r / c, hv[r]);
                            for (o, &g) in plane.iter_mut().zip(&gs[i * p..(i + 1) * p]) {
                                *o = g * hr;
                            }
                        }
                        df = Some(Tensor::from_f32(d, &[n, c, fh, fw]));
                    }
                    if gm {
                        let mut d = vec![0.0f32; c * p];
                        for i in 0..n {
                            for (ch, plane) in d.chunks_exact_mut(p).enumerate() {
                                let hr = hv[i * c + ch];
                                for (o, &g) in plane.iter_mut().zip(&gs[i * p..(i + 1) * p]) {
                                    *o += g * hr;
                                }
                            }
                        }
                        dm = Some(Tensor::from_f32(d, &[1, c, fh, fw]));
                    }
                }
                Ok(vec![dh, df, dm])
            }),
        );
    }
    Ok(y)
}

fn mask_dot_forward(
    h: &Tensor,
    f: &Tensor,
    msf: &Tensor,
    (n, c, p): (usize, usize, usize),
    out_dims: [usize; 4],
) -> Result<Tensor> {
    const OP: &str = "mask_dot";
    if let Device::Cuda(_) = same_device(OP, &[h, f, msf])? {
        let (h, f, msf) = (cuda_input(OP, h)?, cuda_input(OP, f)?, cuda_input(OP, msf)?);
        let (dev, hs) = h.cuda_whole_f32(OP)?;
        let y = cuda::mask_dot(
            dev,
            hs,
            f.cuda_whole_f32(OP)?.1,
            msf.cuda_whole_f32(OP)?.1,
            (n, c, p),
        )?;
        return Tensor::from_cuda_f32(dev, y, out_dims);
    }
    let (fs, ms, hs) = (cpu_f32(OP, f)?, cpu_f32(OP, msf)?, cpu_f32(OP, h)?);
    use rayon::prelude::*;
    let mut out = vec![0.0f32; n * p];
    out.par_chunks_mut(p).enumerate().for_each(|(i, o)| {
        for ch in 0..c {
            let hv = hs[i * c + ch];
            let fr = &fs[(i * c + ch) * p..(i * c + ch + 1) * p];
            let mr = &ms[ch * p..(ch + 1) * p];
            for ((o, &a), &b) in o.iter_mut().zip(fr).zip(mr) {
                *o += hv * (a + b);
            }
        }
    });
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

    /// The packed bf16 linear equals the f32 linear of the bf16-rounded
    /// input and weight up to f32 summation order, with its epilogues
    /// (bias + residual, bias + GELU) and a leading batch shape.
    #[test]
    fn linear_packed_bf16_equals_f32_of_rounded_inputs() {
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect()
        };
        let seq = |n: usize, f: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * f).sin()).collect() };
        let (m, k, n) = (2 * 7 * 5, 77, 130);
        let (x, w) = (seq(m * k, 0.37), seq(n * k, 0.91));
        let b = Tensor::from_vec(seq(n, 2.3), [n]).unwrap();
        let r = Tensor::from_vec(seq(m * n, 0.11), [2, 7, 5, n]).unwrap();
        let packed = crate::cpu::bf16_gemm::PackedB::from_nk(&w, n, k).unwrap();
        let xr = Tensor::from_vec(round(&x), [2, 7, 5, k]).unwrap();
        let wr = Tensor::from_vec(round(&w), [n, k]).unwrap();
        let x = Tensor::from_vec(x, [2, 7, 5, k]).unwrap();
        for (res, act) in [(Some(&r), Act::None), (None, Act::Gelu)] {
            let want = linear_fused(&xr, &wr, Some(&b), res, act).unwrap();
            let got = linear_packed_bf16(&x, &packed, Some(&b), res, act).unwrap();
            assert_eq!(got.dims(), want.dims());
            for (a, b) in got.as_f32().unwrap().iter().zip(want.as_f32().unwrap()) {
                assert!((a - b).abs() <= 1e-4, "{act:?}: {a} vs {b}");
            }
        }
        let e = linear_packed_bf16(&Tensor::zeros([3, 5]), &packed, None, None, Act::None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("linear (cpu bf16)") && e.contains("[3, 5]"),
            "{e}"
        );
    }

    #[test]
    fn linear_rejects_bad_shapes() {
        let x = Tensor::zeros([2, 4]);
        let w = Tensor::zeros([2, 3]);
        let e = linear(&x, &w, None).unwrap_err().to_string();
        assert!(e.contains("linear") && e.contains("[2, 4]"), "{e}");
    }
}
