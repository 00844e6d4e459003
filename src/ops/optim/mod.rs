//! Optimisers. Adam exactly as torch.optim.Adam (single-tensor form, no weight
//! decay, no amsgrad); the CUDA kernel (cuda/optim.cu) rounds every step in
//! the same order and reads the step's scalars from device memory.

pub mod cuda;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// The scalars of one Adam step, as PyTorch forms them: Python floats (f64)
/// rounded to f32 where they meet the tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// lr / (1 - beta1^t)
    pub step_size: f32,
    /// 1 - beta1 (the lerp weight)
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// sqrt(1 - beta2^t)
    pub bc2_sqrt: f32,
    pub eps: f32,
}

impl AdamStep {
    /// Step `t` (1-based) with these hyper-parameters.
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, t: u64) -> Self {
        let t = t.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - beta1.powi(t);
        let bc2 = 1.0 - beta2.powi(t);
        AdamStep {
            step_size: (lr / bc1) as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: eps as f32,
        }
    }

    /// The kernel's h[6].
    pub fn to_array(&self) -> [f32; 6] {
        [
            self.step_size,
            self.one_minus_beta1,
            self.beta2,
            self.one_minus_beta2,
            self.bc2_sqrt,
            self.eps,
        ]
    }
}

/// One Adam step on the CPU over flat slices (a parameter, its gradient and
/// moments, of one length).
pub fn adam_cpu(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    s: &AdamStep,
) -> Result<()> {
    if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
        return Err(Error::shape(
            "adam",
            format!(
                "parameter {}, gradient {}, moments {} / {}",
                p.len(),
                g.len(),
                m.len(),
                v.len()
            ),
        ));
    }
    // Element-wise: chunks in parallel give the same bits as one loop.
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let mi = *m + (g - *m) * s.one_minus_beta1;
                let vi = *v * s.beta2 + s.one_minus_beta2 * g * g;
                let denom = vi.sqrt() / s.bc2_sqrt + s.eps;
                *p -= s.step_size * (mi / denom);
                *m = mi;
                *v = vi;
            }
        });
    Ok(())
}
