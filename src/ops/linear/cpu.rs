use crate::cpu::{sgemm, MatRef, Par};
use crate::ops::activation::{apply_act_slice, Act};

/// x [m, k] row-major, w [n, k] row-major -> [m, n].
#[allow(clippy::too_many_arguments)]
pub fn linear(x: &[f32], w: &[f32], b: Option<&[f32]>, residual: Option<&[f32]>, act: Act, m: usize, n: usize, k: usize) -> Vec<f32> {
    // Seed the accumulator with residual + bias so the GEMM adds onto it.
    let seeded = residual.is_some() || b.is_some();
    // The accumulator starts as residual + bias (one pass, no separate zeroing).
    let mut out: Vec<f32> = match (residual, b) {
        (Some(r), Some(b)) => r.chunks(n.max(1)).flat_map(|row| row.iter().zip(b).map(|(r, b)| r + b)).collect(),
        (Some(r), None) => r.to_vec(),
        (None, Some(b)) => b.iter().copied().cycle().take(m * n).collect(),
        (None, None) => vec![0.0f32; m * n],
    };
    {
        let _p = crate::profile::scope("linear.gemm");
        sgemm(MatRef::rm(x, m, k), MatRef::tr(w, k, n), &mut out, n, 1, seeded, Par::Pool);
    }
    let _p = crate::profile::scope("linear.act");
    apply_act_slice(&mut out, act);
    out
}
