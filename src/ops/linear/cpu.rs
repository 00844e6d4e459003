use rayon::prelude::*;

use crate::cpu::{MatRef, Par, multiversion, sgemm_new};
use crate::ops::activation::{Act, apply_act_seq};

multiversion! {
    /// row = act(row + bias (+ residual)), the GEMM epilogue of one output row.
    pub(crate) fn epilogue_row(row: &mut [f32], bias: Option<&[f32]>, residual: Option<&[f32]>) {
        match (bias, residual) {
            (Some(b), Some(r)) => row.iter_mut().zip(b).zip(r).for_each(|((o, b), r)| *o += b + r),
            (Some(b), None) => row.iter_mut().zip(b).for_each(|(o, b)| *o += b),
            (None, Some(r)) => row.iter_mut().zip(r).for_each(|(o, r)| *o += r),
            (None, None) => {}
        }
    }
}

/// x [m, k] row-major, w [n, k] row-major -> act(x W^T + b + residual) [m, n].
/// The GEMM writes the product; one parallel pass then adds the bias and the
/// residual and applies the activation (rows hot in cache, no separate seeding).
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    residual: Option<&[f32]>,
    act: Act,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let mut out = {
        let _p = crate::profile::scope("linear.gemm");
        sgemm_new(MatRef::rm(x, m, k), MatRef::tr(w, k, n), Par::Pool)
    };
    let _p = crate::profile::scope("linear.epilogue");
    if b.is_some() || residual.is_some() || act != Act::None {
        // Rows in chunks of ~16 K values per task.
        let rows_per = (16_384 / n.max(1)).max(1);
        out.par_chunks_mut(rows_per * n.max(1))
            .enumerate()
            .for_each(|(c, chunk)| {
                for (i, row) in chunk.chunks_mut(n.max(1)).enumerate() {
                    let r = (c * rows_per + i) * n;
                    epilogue_row(row, b, residual.map(|res| &res[r..r + n]));
                    apply_act_seq(row, act);
                }
            });
    }
    out
}

/// dX [m, k] = G [m, n] W [n, k].
pub fn grad_input(g: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    sgemm_new(MatRef::rm(g, m, n), MatRef::rm(w, n, k), Par::Pool)
}

/// dW [n, k] = G^T [n, m] X [m, k].
pub fn grad_weight(g: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    sgemm_new(MatRef::tr(g, n, m), MatRef::rm(x, m, k), Par::Pool)
}
