//! What the kernel tests share, on the GPU (tests/cuda_ops.rs) and on the host
//! emulator (tests/kernels_host.rs): seeded inputs and the comparison against
//! the CPU twin, |kernel - cpu| <= atol + rtol |cpu| with the worst index printed.
#![allow(dead_code)]

/// n values uniform in [-scale, scale), from a xorshift seeded by `seed`.
pub fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// Asserts |got - cpu| <= atol + rtol |cpu| everywhere (and every value
/// finite); prints the worst element either way.
pub fn assert_close(what: &str, got: &[f32], cpu: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), cpu.len(), "{what}: length");
    // The element with the largest excess over its tolerance (NaN counts as
    // the largest), printed whether or not it passes.
    let (mut worst, mut at) = (f32::NEG_INFINITY, 0usize);
    for (i, (g, c)) in got.iter().zip(cpu).enumerate() {
        let excess = (g - c).abs() - (atol + rtol * c.abs());
        if excess.is_nan() || excess > worst {
            worst = if excess.is_nan() {
                f32::INFINITY
            } else {
                excess
            };
            at = i;
        }
    }
    println!(
        "{what}: worst index {at}: kernel {} cpu {} (|d| {:.3e})",
        got[at],
        cpu[at],
        (got[at] - cpu[at]).abs()
    );
    assert!(
        worst <= 0.0 && got.iter().all(|v| v.is_finite()),
        "{what}: index {at}: kernel {} vs cpu {} beyond atol {atol} + rtol {rtol}",
        got[at],
        cpu[at]
    );
}

/// ||a - b|| / ||b|| in f64.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}
