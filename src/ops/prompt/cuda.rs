//! CUDA twin of the box prompt encoding (cuda/prompt.cu).

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::cuda::{CudaDevice, GpuTensor, cfg1d, launch_err};
use crate::error::{Error, Result};

/// The decoder's tokens [N, 3, C]: med token, then the two encoded corners
/// plus their embeddings. boxes [N, 4] in the model frame, gaussian [2, C/2],
/// med / corner0 / corner1 [C].
#[allow(clippy::too_many_arguments)]
pub fn box_tokens(
    dev: &CudaDevice,
    boxes: &CudaSlice<f32>,
    gaussian: &CudaSlice<f32>,
    med: &CudaSlice<f32>,
    corner0: &CudaSlice<f32>,
    corner1: &CudaSlice<f32>,
    img_size: usize,
) -> Result<GpuTensor> {
    let c = med.len();
    let n = boxes.len() / 4;
    if n == 0
        || boxes.len() != n * 4
        || c == 0
        || !c.is_multiple_of(2)
        || gaussian.len() != c
        || corner0.len() != c
        || corner1.len() != c
    {
        return Err(Error::shape(
            "box_tokens (cuda)",
            format!(
                "boxes of {} values, gaussian {}, med {c}, corners {} / {}",
                boxes.len(),
                gaussian.len(),
                corner0.len(),
                corner1.len()
            ),
        ));
    }
    let mut tok = dev.alloc(n * 3 * c)?;
    let f = dev.function("prompt", "box_tokens_f32")?;
    let (nn, cc, s) = (n as i32, c as i32, img_size as f32);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut tok)
        .arg(boxes)
        .arg(gaussian)
        .arg(med)
        .arg(corner0)
        .arg(corner1)
        .arg(&nn)
        .arg(&cc)
        .arg(&s);
    // SAFETY: boxes hold n * 4 floats, gaussian 2 * c / 2, the embeddings c
    // each, tok n * 3 * c; types match the kernel.
    unsafe { l.launch(cfg1d(n * 3 * c)) }.map_err(launch_err("box_tokens launch"))?;
    Ok(GpuTensor {
        data: tok,
        dims: vec![n, 3, c],
    })
}
