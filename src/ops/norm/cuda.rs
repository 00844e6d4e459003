//! CUDA twin of layer_norm (cuda/norm.cu).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::cuda::{CudaDevice, cfg1d, launch_err};
use crate::error::{Error, Result};

/// Launch geometry of layer_norm_f32 (shared with the host-emulation tests):
/// one block per row, a power of two of threads (32..=256) striding over C.
pub fn layer_norm_config(rows: usize, c: usize) -> LaunchConfig {
    let threads = (c.next_power_of_two() as u32).clamp(32, 256);
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// x [rows, c], w / b [c] -> [rows, c].
pub fn layer_norm(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    c: usize,
    eps: f32,
) -> Result<CudaSlice<f32>> {
    if c == 0 || !x.len().is_multiple_of(c) || w.len() != c || b.len() != c {
        return Err(Error::shape(
            "layer_norm (cuda)",
            format!(
                "x of {} values, C {c}, weight {}, bias {}",
                x.len(),
                w.len(),
                b.len()
            ),
        ));
    }
    let rows = x.len() / c;
    let mut y = dev.alloc(x.len())?;
    let f = dev.function("norm", "layer_norm_f32")?;
    let cfg = layer_norm_config(rows, c);
    let (r, cc) = (rows as i32, c as i32);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut y)
        .arg(x)
        .arg(w)
        .arg(b)
        .arg(&r)
        .arg(&cc)
        .arg(&eps);
    // SAFETY: x and y hold rows * c floats, w and b c floats; one block per row
    // touches only its row; argument types match (float*, const float* x3, int, int, float).
    unsafe { l.launch(cfg) }.map_err(launch_err("layer_norm launch"))?;
    Ok(y)
}

/// layer_norm with a bf16 result: the input of a bf16 GEMM in one pass.
pub fn layer_norm_bf16(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    c: usize,
    eps: f32,
) -> Result<CudaSlice<half::bf16>> {
    if c == 0 || !x.len().is_multiple_of(c) || w.len() != c || b.len() != c {
        return Err(Error::shape(
            "layer_norm_bf16 (cuda)",
            format!(
                "x of {} values, C {c}, weight {}, bias {}",
                x.len(),
                w.len(),
                b.len()
            ),
        ));
    }
    let rows = x.len() / c;
    let mut y = dev.alloc_bf16(x.len())?;
    let f = dev.function("norm", "layer_norm_bf16out")?;
    let (r, cc) = (rows as i32, c as i32);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut y)
        .arg(x)
        .arg(w)
        .arg(b)
        .arg(&r)
        .arg(&cc)
        .arg(&eps);
    // SAFETY: as layer_norm; y holds rows * c bf16 (unsigned short*).
    unsafe { l.launch(layer_norm_config(rows, c)) }
        .map_err(launch_err("layer_norm_bf16 launch"))?;
    Ok(y)
}

/// SAM's LayerNorm2d then act: x [N, C, H, W], w / b [C] -> same shape.
pub fn layer_norm2d(
    dev: &CudaDevice,
    x: &impl crate::cuda::GpuIn,
    w: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    eps: f32,
    a: crate::ops::activation::Act,
) -> Result<crate::cuda::GpuTensor> {
    let [n, c, h, wd]: [usize; 4] = x
        .dims()
        .try_into()
        .map_err(|_| Error::shape("layer_norm2d (cuda)", format!("input {:?}", x.dims())))?;
    if w.len() != c || b.len() != c {
        return Err(Error::shape(
            "layer_norm2d (cuda)",
            format!("input {:?}, weight {}, bias {}", x.dims(), w.len(), b.len()),
        ));
    }
    let p = (h * wd) as i64;
    let mut y = dev.alloc(x.numel())?;
    let f = dev.function("norm", "layer_norm2d_f32")?;
    let act = crate::cuda::act_code(a);
    let (nn, cc) = (n as i32, c as i32);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut y)
        .arg(x.data())
        .arg(w)
        .arg(b)
        .arg(&nn)
        .arg(&cc)
        .arg(&p)
        .arg(&eps)
        .arg(&act);
    // SAFETY: x and y hold n * c * p floats, w and b c floats; types match the kernel.
    unsafe { l.launch(crate::cuda::cfg1d(n * h * wd)) }
        .map_err(launch_err("layer_norm2d launch"))?;
    Ok(crate::cuda::GpuTensor {
        data: y,
        dims: x.dims().to_vec(),
    })
}

/// LayerNorm backward over `geo`'s groups (cuda/norm.cu): dx, and when asked
/// the weight and bias gradients [C] (per-group terms summed by
/// ops::reduce, deterministic).
#[allow(clippy::type_complexity)]
pub fn layer_norm_backward(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    geo: super::cpu::NormGroups,
    eps: f32,
    want_wb: bool,
) -> Result<(CudaSlice<f32>, Option<(CudaSlice<f32>, CudaSlice<f32>)>)> {
    let c = geo.c;
    if c == 0 || x.len() != geo.groups * c || g.len() != x.len() || w.len() != c {
        return Err(Error::shape(
            "layer_norm backward (cuda)",
            format!(
                "x of {} values, gradient {}, weight {} for {} groups of {c}",
                x.len(),
                g.len(),
                w.len(),
                geo.groups
            ),
        ));
    }
    let mut dx = dev.alloc(x.len())?;
    let mut parts = if want_wb {
        Some((dev.alloc(x.len())?, dev.alloc(x.len())?))
    } else {
        None
    };
    let f = dev.function("norm", "layer_norm_backward_f32")?;
    let (gr, cc, st, p) = (geo.groups as i64, c as i32, geo.stride as i64, geo.p as i64);
    let null: u64 = 0;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut dx);
    match parts.as_mut() {
        Some((pw, pb)) => {
            l.arg(pw).arg(pb);
        }
        None => {
            l.arg(&null).arg(&null);
        }
    }
    l.arg(x)
        .arg(w)
        .arg(g)
        .arg(&gr)
        .arg(&cc)
        .arg(&st)
        .arg(&p)
        .arg(&eps);
    // SAFETY: x, g, dx (and pw, pb when given, else null) hold groups * C
    // floats, the indices base(j) + ch * stride stay inside them for the
    // geometry the caller's shape checks gave, w holds C; types match.
    unsafe { l.launch(cfg1d(geo.groups)) }.map_err(launch_err("layer_norm_backward launch"))?;
    let wb = match parts {
        Some((pw, pb)) => Some((
            crate::ops::reduce::cuda::sum_rows(dev, &pw, geo.groups, c)?,
            crate::ops::reduce::cuda::sum_rows(dev, &pb, geo.groups, c)?,
        )),
        None => None,
    };
    Ok((dx, wb))
}

/// The launch of the per-channel BatchNorm reductions: one block of
/// BN_LANES (256) threads per channel (grid-stride past 65 535 channels).
pub fn bn_channel_config(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.clamp(1, 65_535) as u32, 1, 1),
        block_dim: (super::cpu::BN_LANES as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A host step between a BatchNorm's per-channel reduction and its use: two
/// f64 vectors [C] replaced in place (SyncBatchNorm's combination over ranks).
pub type HostSync<'a> = &'a mut dyn FnMut(&mut [f64], &mut [f64]) -> Result<()>;

/// `sync` run on two device vectors: down, changed on the host, up again
/// as new vectors.
fn synced(
    dev: &CudaDevice,
    a: &CudaSlice<f64>,
    b: &CudaSlice<f64>,
    sync: HostSync<'_>,
) -> Result<(CudaSlice<f64>, CudaSlice<f64>)> {
    let down = |v: &CudaSlice<f64>| {
        dev.stream()
            .clone_dtoh(v)
            .map_err(crate::cuda::driver_err("copy to host"))
    };
    let (mut ah, mut bh) = (down(a)?, down(b)?);
    sync(&mut ah, &mut bh)?;
    let up = |v: &[f64]| {
        dev.stream()
            .clone_htod(v)
            .map_err(crate::cuda::driver_err("copy to device"))
    };
    Ok((up(&ah)?, up(&bh)?))
}

/// Train-mode BatchNorm on the device: (y, mean, biased var) with the
/// statistics [C] in f64 on the device (cuda/norm.cu bn_stats_f64,
/// bn_apply_f32), y = relu?(bn(x) + residual?). `sync` (SyncBatchNorm)
/// turns this batch's (mean, var) into every rank's before they are applied.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    (residual, relu): (Option<&CudaSlice<f32>>, bool),
    (n, c, p): (usize, usize, usize),
    eps: f32,
    sync: Option<HostSync<'_>>,
) -> Result<(CudaSlice<f32>, CudaSlice<f64>, CudaSlice<f64>)> {
    if x.len() != n * c * p
        || gamma.len() != c
        || beta.len() != c
        || residual.is_some_and(|r| r.len() != x.len())
    {
        return Err(Error::shape(
            "batch_norm_train (cuda)",
            format!("x of {} values for {n} x {c} x {p}", x.len()),
        ));
    }
    let (mut mean, mut var) = (dev.alloc_f64(c)?, dev.alloc_f64(c)?);
    let (nn, cc, pp) = (n as i32, c as i32, p as i64);
    let f = dev.function("norm", "bn_stats_f64")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut mean)
        .arg(&mut var)
        .arg(x)
        .arg(&nn)
        .arg(&cc)
        .arg(&pp);
    // SAFETY: mean / var hold c doubles, x n c p floats; types match; one
    // block of BN_LANES threads per channel (the kernel's lanes).
    unsafe { l.launch(bn_channel_config(c)) }.map_err(launch_err("bn_stats launch"))?;
    if let Some(sync) = sync {
        (mean, var) = synced(dev, &mean, &var, sync)?;
    }
    let mut y = dev.alloc(x.len())?;
    let f = dev.function("norm", "bn_apply_f32")?;
    let mut l = dev.stream().launch_builder(&f);
    let relu = relu as i32;
    // A null pointer means "no residual" to the kernel.
    let null: u64 = 0;
    l.arg(&mut y)
        .arg(x)
        .arg(gamma)
        .arg(beta)
        .arg(&mean)
        .arg(&var);
    match residual {
        Some(r) => l.arg(r),
        None => l.arg(&null),
    };
    l.arg(&relu).arg(&nn).arg(&cc).arg(&pp).arg(&eps);
    // SAFETY: y, x (and the residual, when given) hold n c p floats,
    // gamma / beta c, mean / var c doubles; the rest match the kernel's ints.
    unsafe { l.launch(cfg1d(x.len())) }.map_err(launch_err("bn_apply launch"))?;
    Ok((y, mean, var))
}

/// Train-mode BatchNorm backward on the device: (dx when asked, dgamma,
/// dbeta), the per-channel sums in f64, rounded to f32 on the device.
/// `sync` (SyncBatchNorm) turns the sums into every rank's before dx uses
/// them with `total`, the values per channel over all ranks (None: n p);
/// dgamma and dbeta stay this rank's.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn batch_norm_backward(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    g: &CudaSlice<f32>,
    (mean, var): (&CudaSlice<f64>, &CudaSlice<f64>),
    (n, c, p): (usize, usize, usize),
    eps: f32,
    want_dx: bool,
    sync: Option<(HostSync<'_>, usize)>,
) -> Result<(Option<CudaSlice<f32>>, CudaSlice<f32>, CudaSlice<f32>)> {
    if x.len() != n * c * p
        || g.len() != x.len()
        || gamma.len() != c
        || mean.len() != c
        || var.len() != c
    {
        return Err(Error::shape(
            "batch_norm backward (cuda)",
            format!(
                "x of {} values, gradient {} for {n} x {c} x {p}",
                x.len(),
                g.len()
            ),
        ));
    }
    let (mut dgm, mut dbt) = (dev.alloc_f64(c)?, dev.alloc_f64(c)?);
    let (nn, cc, pp) = (n as i32, c as i32, p as i64);
    let f = dev.function("norm", "bn_backward_sums")?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut dgm)
        .arg(&mut dbt)
        .arg(x)
        .arg(g)
        .arg(mean)
        .arg(var)
        .arg(&nn)
        .arg(&cc)
        .arg(&pp)
        .arg(&eps);
    // SAFETY: sizes checked above; types match (double* x2, const float* x2,
    // const double* x2, int, int, long long, float).
    unsafe { l.launch(bn_channel_config(c)) }.map_err(launch_err("bn_backward_sums launch"))?;
    let mut total = (n * p) as f64;
    // The rank's own sums for dgamma / dbeta, every rank's for dx.
    let mut global = None;
    if want_dx && let Some((sync, all)) = sync {
        global = Some(synced(dev, &dgm, &dbt, sync)?);
        total = all as f64;
    }
    let dx = if want_dx {
        let (sdg, sdb) = global.as_ref().map_or((&dgm, &dbt), |(a, b)| (a, b));
        let mut dx = dev.alloc(x.len())?;
        let f = dev.function("norm", "bn_backward_dx")?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&mut dx)
            .arg(x)
            .arg(g)
            .arg(gamma)
            .arg(mean)
            .arg(var)
            .arg(sdg)
            .arg(sdb);
        l.arg(&nn).arg(&cc).arg(&pp).arg(&eps).arg(&total);
        // SAFETY: dx, x, g hold n c p floats, gamma c, the f64 vectors c;
        // then int, int, long long, float, double as the kernel declares.
        unsafe { l.launch(cfg1d(x.len())) }.map_err(launch_err("bn_backward_dx launch"))?;
        Some(dx)
    } else {
        None
    };
    // Rounded to f32 on the device (reduce.cu's finishing pass over one
    // partial: the same rounding as the CPU's `as f32`), no host round trip.
    let round = |v: &CudaSlice<f64>| -> Result<CudaSlice<f32>> {
        let mut out = dev.alloc(c)?;
        let f = dev.function("reduce", "sum_rows_finish")?;
        let (one, cols) = (1i64, c as i32);
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&mut out).arg(v).arg(&one).arg(&cols);
        // SAFETY: out holds c floats, v c doubles (one partial row of c
        // columns); types match (float*, const double*, long long, int).
        unsafe { l.launch(cfg1d(c)) }.map_err(launch_err("bn round launch"))?;
        Ok(out)
    };
    Ok((dx, round(&dgm)?, round(&dbt)?))
}
