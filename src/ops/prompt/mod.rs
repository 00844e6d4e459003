//! The box prompt encoding (SAM's PositionEmbeddingRandom + corner embeddings):
//! a box corner c in the model frame becomes
//!   x = 2 (c + 0.5) / img_size - 1  (per axis),  u = 2 pi (x G[0] + y G[1]),
//!   pe = [sin u, cos u] + corner_embedding
//! with G the [2, C/2] Gaussian matrix. The decoder's tokens for a box are
//! [med_token; pe(x0, y0) + e2; pe(x1, y1) + e3]. Every product and sum is
//! rounded on its own, in this order, on the CPU and in the kernel
//! (cuda/prompt.cu), so the two differ only by their sin / cos.

pub mod cuda;

use std::f32::consts::PI;

use crate::error::{Error, Result};
use crate::ops::{cpu_f32, cuda_input, same_device};
use crate::tensor::{Device, Tensor};

/// pe(c) for c in [0, 1]^2 (x, y): [sin u, cos u] with u = 2 pi ((2c - 1) G).
/// gaussian [2, C/2]; out [C].
pub fn fourier_pe(gaussian: &[f32], cx: f32, cy: f32, out: &mut [f32]) {
    let half = out.len() / 2;
    let (x, y) = (2.0 * cx - 1.0, 2.0 * cy - 1.0);
    for j in 0..half {
        let u = 2.0 * PI * (x * gaussian[j] + y * gaussian[half + j]);
        out[j] = u.sin();
        out[half + j] = u.cos();
    }
}

/// Boxes [N, 4] (x0, y0, x1, y1 in the model frame) -> sparse embeddings
/// [N, 2, C]: the encoded corners plus their embeddings (corner0 / corner1 [C]).
pub fn embed_boxes(
    boxes: &[[f32; 4]],
    gaussian: &[f32],
    corner0: &[f32],
    corner1: &[f32],
    img_size: usize,
) -> Vec<f32> {
    let c = corner0.len();
    let s = img_size as f32;
    let mut out = vec![0.0f32; boxes.len() * 2 * c];
    for (i, b) in boxes.iter().enumerate() {
        let row = &mut out[i * 2 * c..(i + 1) * 2 * c];
        let (c0, c1) = row.split_at_mut(c);
        fourier_pe(gaussian, (b[0] + 0.5) / s, (b[1] + 0.5) / s, c0);
        fourier_pe(gaussian, (b[2] + 0.5) / s, (b[3] + 0.5) / s, c1);
        c0.iter_mut().zip(corner0).for_each(|(o, e)| *o += e);
        c1.iter_mut().zip(corner1).for_each(|(o, e)| *o += e);
    }
    out
}

/// Boxes [N, 4] (x0, y0, x1, y1 in the model frame) -> the decoder's tokens
/// [N, L + 2, C]: `lead` ([1, 1, C] or [1, C]: the mask decoder's med token,
/// L = 1) if given, then the two encoded corners plus their embeddings.
/// gaussian [2, C/2], corner0 / corner1 [1, C]. On the boxes' device: the
/// tokens of a CUDA graph come from boxes already on the device.
pub fn box_tokens(
    boxes: &Tensor,
    gaussian: &Tensor,
    corners: (&Tensor, &Tensor),
    lead: Option<&Tensor>,
    img_size: usize,
) -> Result<Tensor> {
    const OP: &str = "box_tokens";
    let [n, four] = boxes.dims_n::<2>(OP, "boxes")?;
    let c = corners.0.numel();
    if four != 4 || n == 0 {
        return Err(Error::shape(
            OP,
            format!("boxes {:?}: expected [N, 4] with N >= 1", boxes.dims()),
        ));
    }
    if c == 0 || !c.is_multiple_of(2) {
        return Err(Error::shape(
            OP,
            format!("corner embedding {:?}", corners.0.dims()),
        ));
    }
    gaussian.expect_dims(OP, "gaussian", &[2, c / 2])?;
    corners.0.expect_dims(OP, "corner0", &[1, c])?;
    corners.1.expect_dims(OP, "corner1", &[1, c])?;
    if let Some(m) = lead
        && m.numel() != c
    {
        return Err(Error::shape(
            OP,
            format!("lead token {:?} for {c} channels", m.dims()),
        ));
    }
    let t = 2 + lead.is_some() as usize;
    let mut all = vec![boxes, gaussian, corners.0, corners.1];
    all.extend(lead);
    // The boxes and the Gaussian matrix (a buffer) get no gradient.
    crate::autograd::no_backward("box_tokens (boxes, gaussian)", &[boxes, gaussian])?;
    let mut y = box_tokens_forward(&all, n, t, c, img_size)?;
    if crate::autograd::is_tracked(&all) {
        let lead_dims = lead.map(|m| m.dims().to_vec());
        crate::autograd::record(
            OP,
            &all,
            &mut y,
            0,
            Box::new(move |g| {
                // Row r of every box, summed over the boxes (ops::reduce, the
                // same bits on both devices).
                let row_sum = |r: usize| -> Result<Tensor> {
                    crate::ops::activation::sum_leading(&crate::ops::layout::narrow(g, r, 1)?)
                };
                let l = t - 2;
                let mut v = vec![
                    None,
                    None,
                    Some(row_sum(l)?.reshape([1, c])?),
                    Some(row_sum(l + 1)?.reshape([1, c])?),
                ];
                if let Some(d) = &lead_dims {
                    v.push(Some(row_sum(0)?.reshape(d.clone())?));
                }
                Ok(v)
            }),
        );
    }
    Ok(y)
}

fn box_tokens_forward(
    all: &[&Tensor],
    n: usize,
    t: usize,
    c: usize,
    img_size: usize,
) -> Result<Tensor> {
    const OP: &str = "box_tokens";
    let (boxes, gaussian, corners, lead) = (all[0], all[1], (all[2], all[3]), all.get(4).copied());
    if let Device::Cuda(_) = same_device(OP, all)? {
        let b = cuda_input(OP, boxes)?;
        let g = cuda_input(OP, gaussian)?;
        let (c0, c1) = (cuda_input(OP, corners.0)?, cuda_input(OP, corners.1)?);
        let m = lead.map(|m| cuda_input(OP, m)).transpose()?;
        let (dev, bs) = b.cuda_whole_f32(OP)?;
        let y = cuda::box_tokens(
            dev,
            bs,
            g.cuda_whole_f32(OP)?.1,
            (c0.cuda_whole_f32(OP)?.1, c1.cuda_whole_f32(OP)?.1),
            m.as_ref()
                .map(|m| m.cuda_whole_f32(OP).map(|(_, s)| s))
                .transpose()?,
            img_size,
        )?;
        return Tensor::from_cuda_f32(dev, y, [n, t, c]);
    }
    let bs: Vec<[f32; 4]> = cpu_f32(OP, boxes)?
        .chunks_exact(4)
        .map(|b| [b[0], b[1], b[2], b[3]])
        .collect();
    let sparse = embed_boxes(
        &bs,
        cpu_f32(OP, gaussian)?,
        cpu_f32(OP, corners.0)?,
        cpu_f32(OP, corners.1)?,
        img_size,
    );
    let Some(m) = lead else {
        return Ok(Tensor::from_f32(sparse, &[n, 2, c]));
    };
    let m = cpu_f32(OP, m)?;
    let mut out = Vec::with_capacity(n * t * c);
    for s in sparse.chunks_exact(2 * c) {
        out.extend_from_slice(m);
        out.extend_from_slice(s);
    }
    Ok(Tensor::from_f32(out, &[n, t, c]))
}
