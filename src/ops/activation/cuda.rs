//! CUDA twins of the activations (cuda/activation.cu).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::Act;
use crate::cuda::{driver_err, grid_for, CudaDevice};
use crate::error::{Error, Result};

/// y = act(x) on the device. x: n floats.
pub fn act(dev: &CudaDevice, x: &CudaSlice<f32>, a: Act) -> Result<CudaSlice<f32>> {
    let n = x.len();
    let mut y = dev.alloc(n)?;
    let name = match a {
        Act::Gelu => "gelu_f32",
        Act::Relu => "relu_f32",
        Act::None => {
            dev.stream().memcpy_dtod(x, &mut y).map_err(driver_err("act copy"))?;
            return Ok(y);
        }
    };
    let f = dev.function("activation", name)?;
    let cfg = LaunchConfig { grid_dim: (grid_for(n), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let nn = n as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut y).arg(x).arg(&nn);
    // SAFETY: the kernel reads n floats of x and writes n floats of y, both
    // allocations of exactly n elements; the argument types match the kernel's
    // (float*, const float*, long long).
    unsafe { b.launch(cfg) }.map_err(driver_err("activation launch"))?;
    Ok(y)
}

/// y = a + b on the device.
pub fn add(dev: &CudaDevice, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
    if a.len() != b.len() {
        return Err(Error::shape("add (cuda)", format!("{} vs {} elements", a.len(), b.len())));
    }
    let n = a.len();
    let mut y = dev.alloc(n)?;
    let f = dev.function("activation", "add_f32")?;
    let cfg = LaunchConfig { grid_dim: (grid_for(n), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let nn = n as i64;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut y).arg(a).arg(b).arg(&nn);
    // SAFETY: three allocations of n floats; argument types match the kernel's.
    unsafe { l.launch(cfg) }.map_err(driver_err("add launch"))?;
    Ok(y)
}
