use rayon::prelude::*;

use super::Act;
use crate::cpu::{math, multiversion};

multiversion! {
    fn gelu_inplace(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = math::gelu_g::<FMA>(*v);
        }
    }
}

const CHUNK: usize = 1 << 14;

/// In place; parallel over chunks of 16 K elements.
pub fn apply_act_slice(x: &mut [f32], a: Act) {
    match a {
        Act::None => {}
        Act::Relu => x
            .par_chunks_mut(CHUNK)
            .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0))),
        Act::Gelu => x.par_chunks_mut(CHUNK).for_each(gelu_inplace),
    }
}

/// Sequential version for use inside an already parallel loop.
pub fn apply_act_seq(x: &mut [f32], a: Act) {
    match a {
        Act::None => {}
        Act::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
        Act::Gelu => gelu_inplace(x),
    }
}

pub fn add_assign(a: &mut [f32], b: &[f32]) {
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(a, b)| {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        });
}

multiversion! {
    /// o = g * GELU'(x) over one chunk (AVX2 + FMA where the CPU has them).
    fn gelu_backward_chunk(o: &mut [f32], x: &[f32], g: &[f32]) {
        use std::f32::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};
        // 1 / sqrt(2 pi)
        let k = FRAC_2_SQRT_PI * FRAC_1_SQRT_2 * 0.5;
        for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 * (1.0 + math::erf_g::<FMA>(x * FRAC_1_SQRT_2));
            let pdf = math::exp_g::<FMA>(-0.5 * x * x) * k;
            *o = g * (cdf + x * pdf);
        }
    }
}

/// g * GELU'(x), GELU'(x) = Phi(x) + x phi(x) (PyTorch's exact-GELU backward).
pub fn gelu_backward(x: &[f32], g: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(o, (x, g))| gelu_backward_chunk(o, x, g));
    out
}
