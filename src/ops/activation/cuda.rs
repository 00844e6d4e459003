//! CUDA twins of the activations (cuda/activation.cu).

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::Act;
use crate::cuda::{CudaDevice, cfg1d, driver_err, launch_err};
use crate::error::{Error, Result};

/// y = act(x) on the device. x: n floats.
pub fn act(dev: &CudaDevice, x: &CudaSlice<f32>, a: Act) -> Result<CudaSlice<f32>> {
    let n = x.len();
    let mut y = dev.alloc(n)?;
    let name = match a {
        Act::Gelu => "gelu_f32",
        Act::Relu => "relu_f32",
        Act::None => {
            dev.stream()
                .memcpy_dtod(x, &mut y)
                .map_err(driver_err("act copy"))?;
            return Ok(y);
        }
    };
    let f = dev.function("activation", name)?;
    let cfg = cfg1d(n);
    let nn = n as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut y).arg(x).arg(&nn);
    // SAFETY: the kernel reads n floats of x and writes n floats of y, both
    // allocations of exactly n elements; the argument types match the kernel's
    // (float*, const float*, long long).
    unsafe { b.launch(cfg) }.map_err(launch_err("activation launch"))?;
    Ok(y)
}

/// y = a + b on the device.
pub fn add(dev: &CudaDevice, a: &CudaSlice<f32>, b: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
    if a.len() != b.len() {
        return Err(Error::shape(
            "add (cuda)",
            format!("{} vs {} elements", a.len(), b.len()),
        ));
    }
    let n = a.len();
    let mut y = dev.alloc(n)?;
    let f = dev.function("activation", "add_f32")?;
    let cfg = cfg1d(n);
    let nn = n as i64;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut y).arg(a).arg(b).arg(&nn);
    // SAFETY: three allocations of n floats; argument types match the kernel's.
    unsafe { l.launch(cfg) }.map_err(launch_err("add launch"))?;
    Ok(y)
}

/// y [rows, cols] = act(y + bias) in place (a GEMM epilogue); bias [cols] or none.
pub fn bias_act(
    dev: &CudaDevice,
    y: &mut CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
    cols: usize,
    a: Act,
) -> Result<()> {
    bias_act_view(dev, &mut y.slice_mut(..), bias, cols, a)
}

/// bias_act on a view of a buffer (a tensor's range, written in place).
pub fn bias_act_view(
    dev: &CudaDevice,
    y: &mut cudarc::driver::CudaViewMut<'_, f32>,
    bias: Option<&CudaSlice<f32>>,
    cols: usize,
    a: Act,
) -> Result<()> {
    if cols == 0 || !y.len().is_multiple_of(cols) || bias.is_some_and(|b| b.len() != cols) {
        return Err(Error::shape(
            "bias_act (cuda)",
            format!(
                "{} values, {cols} columns, bias {:?}",
                y.len(),
                bias.map(|b| b.len())
            ),
        ));
    }
    let rows = (y.len() / cols) as i64;
    let f = dev.function("activation", "bias_act_f32")?;
    let cfg = cfg1d(y.len());
    let (c, act) = (
        cols as i32,
        match a {
            Act::None => 0i32,
            Act::Relu => 1,
            Act::Gelu => 2,
        },
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y);
    // A null pointer means "no bias" to the kernel.
    let null: u64 = 0;
    match bias {
        Some(b) => l.arg(b),
        None => l.arg(&null),
    };
    l.arg(&rows).arg(&c).arg(&act);
    // SAFETY: y holds rows * cols floats, bias cols floats or is null; argument
    // types match (float*, const float*, long long, int, int).
    unsafe { l.launch(cfg) }.map_err(launch_err("bias_act launch"))?;
    Ok(())
}

/// bf16 copy of x (round to nearest even), for bf16 GEMM inputs.
pub fn to_bf16(dev: &CudaDevice, x: &CudaSlice<f32>) -> Result<CudaSlice<half::bf16>> {
    let n = x.len();
    let mut y = dev.alloc_bf16(n)?;
    let f = dev.function("activation", "f32_to_bf16")?;
    let cfg = cfg1d(n);
    let nn = n as i64;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut y).arg(x).arg(&nn);
    // SAFETY: n bf16 out, n f32 in; types match (unsigned short*, const float*, long long).
    unsafe { l.launch(cfg) }.map_err(launch_err("f32_to_bf16 launch"))?;
    Ok(y)
}

/// f32 copy of bf16 values (exact).
pub fn to_f32(dev: &CudaDevice, x: &CudaSlice<half::bf16>) -> Result<CudaSlice<f32>> {
    let n = x.len();
    let mut y = dev.alloc(n)?;
    let f = dev.function("activation", "bf16_to_f32")?;
    let nn = n as i64;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut y).arg(x).arg(&nn);
    // SAFETY: n f32 out, n bf16 in; types match (float*, const unsigned short*, long long).
    unsafe { l.launch(cfg1d(n)) }.map_err(launch_err("bf16_to_f32 launch"))?;
    Ok(y)
}

/// bf16(act(y + bias)) with y [rows, cols] f32 and bias [cols]: a GEMM's
/// epilogue that also makes the next bf16 GEMM's input.
pub fn bias_act_bf16(
    dev: &CudaDevice,
    y: &CudaSlice<f32>,
    bias: &CudaSlice<f32>,
    cols: usize,
    a: Act,
) -> Result<CudaSlice<half::bf16>> {
    if cols == 0 || !y.len().is_multiple_of(cols) || bias.len() != cols {
        return Err(Error::shape(
            "bias_act_bf16 (cuda)",
            format!("{} values, {cols} columns, bias {}", y.len(), bias.len()),
        ));
    }
    let mut out = dev.alloc_bf16(y.len())?;
    let f = dev.function("activation", "bias_act_bf16out")?;
    let (rows, c, act) = (
        (y.len() / cols) as i64,
        cols as i32,
        crate::cuda::act_code(a),
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut out)
        .arg(y)
        .arg(bias)
        .arg(&rows)
        .arg(&c)
        .arg(&act);
    // SAFETY: y and out hold rows * cols values, bias cols; types match
    // (unsigned short*, const float*, const float*, long long, int, int).
    unsafe { l.launch(cfg1d(y.len())) }.map_err(launch_err("bias_act_bf16 launch"))?;
    Ok(out)
}

/// x + bias over rows (x [rows, cols], bias [cols]): the seed of a GEMM that
/// accumulates a residual branch onto x.
pub fn add_bias_rows(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    bias: &CudaSlice<f32>,
) -> Result<CudaSlice<f32>> {
    let cols = bias.len();
    if cols == 0 || !x.len().is_multiple_of(cols) {
        return Err(Error::shape(
            "add_bias_rows (cuda)",
            format!("{} values, bias {cols}", x.len()),
        ));
    }
    let mut y = dev.alloc(x.len())?;
    let f = dev.function("activation", "add_bias_rows_f32")?;
    let (rows, c) = ((x.len() / cols) as i64, cols as i32);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut y).arg(x).arg(bias).arg(&rows).arg(&c);
    // SAFETY: x and y hold rows * cols floats, bias cols; types match
    // (float*, const float*, const float*, long long, int).
    unsafe { l.launch(cfg1d(x.len())) }.map_err(launch_err("add_bias_rows launch"))?;
    Ok(y)
}

/// dx = g act'(x) (cuda/activation.cu act_backward_f32); x, g of n floats.
pub fn act_backward(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    a: Act,
) -> Result<CudaSlice<f32>> {
    if x.len() != g.len() {
        return Err(Error::shape(
            "act_backward (cuda)",
            format!("x of {} values, gradient of {}", x.len(), g.len()),
        ));
    }
    let mut dx = dev.alloc(x.len())?;
    let f = dev.function("activation", "act_backward_f32")?;
    let (n, code) = (
        x.len() as i64,
        match a {
            Act::None => 0i32,
            Act::Relu => 1,
            Act::Gelu => 2,
        },
    );
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut dx).arg(x).arg(g).arg(&n).arg(&code);
    // SAFETY: dx, x and g hold n floats; types match (float*, const float*,
    // const float*, long long, int).
    unsafe { l.launch(cfg1d(x.len())) }.map_err(launch_err("act_backward launch"))?;
    Ok(dx)
}
