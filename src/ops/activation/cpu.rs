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
