//! What the crate's unit tests share.

/// n values uniform in [-scale, scale), from a xorshift seeded by `seed` (the
/// sequence of tests/kernel_check's `rand`, for the integration tests).
pub fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}
