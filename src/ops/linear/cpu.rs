use rayon::prelude::*;

use crate::cpu::{sgemm, MatRef, Par};
use crate::ops::activation::{apply_act_slice, Act};

/// x [m, k] row-major, w [n, k] row-major -> [m, n].
#[allow(clippy::too_many_arguments)]
pub fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, residual: Option<&[f32]>, act: Act, m: usize, n: usize, k: usize) -> Vec<f32> {
    // Seed the accumulator with residual + bias so the GEMM adds onto it.
    let mut out = match residual {
        Some(r) => r.to_vec(),
        None => vec![0.0f32; m * n],
    };
    let seeded = residual.is_some() || b.is_some();
    if let Some(b) = b {
        out.par_chunks_mut(n.max(1)).for_each(|row| row.iter_mut().zip(b).for_each(|(o, b)| *o += b));
    }
    {
        let _p = crate::profile::scope("linear.gemm");
        sgemm(MatRef::rm(x, m, k), MatRef::tr(w, k, n), &mut out, n, 1, seeded, Par::Pool);
    }
    let _p = crate::profile::scope("linear.act");
    apply_act_slice(&mut out, act);
    out
}
