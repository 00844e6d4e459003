//! CUDA twin of the box prompt encoding (cuda/prompt.cu).

use cudarc::driver::{CudaSlice, PushKernelArg};

use crate::cuda::{CudaDevice, cfg1d, launch_err};
use crate::error::{Error, Result};

/// The decoder's tokens [N, L + 2, C]: with `lead` (L = 1, the med token [C])
/// that token first, then the two encoded corners plus their embeddings.
/// boxes [N, 4] in the model frame, gaussian [2, C/2], corner0 / corner1 [C].
pub fn box_tokens(
    dev: &CudaDevice,
    boxes: &CudaSlice<f32>,
    gaussian: &CudaSlice<f32>,
    corners: (&CudaSlice<f32>, &CudaSlice<f32>),
    lead: Option<&CudaSlice<f32>>,
    img_size: usize,
) -> Result<CudaSlice<f32>> {
    let (corner0, corner1) = corners;
    let c = corner0.len();
    let n = boxes.len() / 4;
    if n == 0
        || boxes.len() != n * 4
        || c == 0
        || !c.is_multiple_of(2)
        || gaussian.len() != c
        || corner1.len() != c
        || lead.is_some_and(|m| m.len() != c)
    {
        return Err(Error::shape(
            "box_tokens (cuda)",
            format!(
                "boxes of {} values, gaussian {}, lead {:?}, corners {c} / {}",
                boxes.len(),
                gaussian.len(),
                lead.map(|m| m.len()),
                corner1.len()
            ),
        ));
    }
    let t = 2 + lead.is_some() as usize;
    let mut tok = dev.alloc(n * t * c)?;
    let f = dev.function("prompt", "box_tokens_f32")?;
    let (nn, cc, s, l) = (n as i32, c as i32, img_size as f32, (t - 2) as i32);
    let null: u64 = 0;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut tok).arg(boxes).arg(gaussian);
    match lead {
        Some(m) => b.arg(m),
        None => b.arg(&null),
    };
    b.arg(corner0)
        .arg(corner1)
        .arg(&nn)
        .arg(&cc)
        .arg(&s)
        .arg(&l);
    // SAFETY: boxes hold n * 4 floats, gaussian 2 * c / 2, the embeddings c
    // each (med only read when lead = 1, else null), tok n * (2 + lead) * c;
    // types match the kernel.
    unsafe { b.launch(cfg1d(n * t * c)) }.map_err(launch_err("box_tokens launch"))?;
    Ok(tok)
}
