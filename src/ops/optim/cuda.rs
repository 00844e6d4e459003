//! CUDA twin of Adam (cuda/optim.cu).

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};

use crate::cuda::{CudaDevice, cfg1d, launch_err};
use crate::error::{Error, Result};

/// One Adam step over flat device buffers: p, m, v updated in place from g;
/// `h` the step's scalars on the device (AdamStep::to_array), so that a
/// recorded step reads the current ones.
pub fn adam(
    dev: &CudaDevice,
    p: &mut CudaViewMut<'_, f32>,
    g: &CudaView<'_, f32>,
    m: &mut CudaViewMut<'_, f32>,
    v: &mut CudaViewMut<'_, f32>,
    h: &CudaSlice<f32>,
) -> Result<()> {
    let n = p.len();
    if g.len() != n || m.len() != n || v.len() != n || h.len() != 6 {
        return Err(Error::shape(
            "adam (cuda)",
            format!(
                "parameter {n}, gradient {}, moments {} / {}, scalars {}",
                g.len(),
                m.len(),
                v.len(),
                h.len()
            ),
        ));
    }
    let f = dev.function("optim", "adam_f32")?;
    let nn = n as i64;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(p).arg(g).arg(m).arg(v).arg(h).arg(&nn);
    // SAFETY: p, g, m, v hold n floats each and h 6 (checked above); the
    // argument types match the kernel's (float*, const float*, float*,
    // float*, const float*, long long).
    unsafe { l.launch(cfg1d(n)) }.map_err(launch_err("adam launch"))?;
    Ok(())
}
