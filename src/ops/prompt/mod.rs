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
