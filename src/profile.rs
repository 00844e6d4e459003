//! Opt-in op-level profile: with `SAM_UNET_PROFILE=1` every op records its wall
//! time under its name; `report()` gives the totals. Off, a scope costs one
//! relaxed atomic load.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 off, 2 on
static TOTALS: Mutex<Option<HashMap<&'static str, (Duration, u64)>>> = Mutex::new(None);

pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var("SAM_UNET_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}

pub struct Scope {
    name: &'static str,
    start: Option<Instant>,
}

/// Times the enclosing block under `name` when profiling is on.
pub fn scope(name: &'static str) -> Scope {
    Scope {
        name,
        start: enabled().then(Instant::now),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            let d = s.elapsed();
            if let Ok(mut t) = TOTALS.lock() {
                let e = t
                    .get_or_insert_with(HashMap::new)
                    .entry(self.name)
                    .or_default();
                e.0 += d;
                e.1 += 1;
            }
        }
    }
}

type ShapeKey = (usize, usize, usize, bool);
static GEMMS: Mutex<Option<HashMap<ShapeKey, (Duration, u64)>>> = Mutex::new(None);

/// Records one GEMM of m x k times k x n that took `d` (`pooled`: it had the
/// rayon pool to itself; a sequential one inside a parallel loop shares the
/// cores with its siblings, so its GFLOP/s is per thread).
pub fn gemm(m: usize, n: usize, k: usize, pooled: bool, d: Duration) {
    if let Ok(mut t) = GEMMS.lock() {
        let e = t
            .get_or_insert_with(HashMap::new)
            .entry((m, n, k, pooled))
            .or_default();
        e.0 += d;
        e.1 += 1;
    }
}

/// One GEMM shape's totals: (m, n, k, pooled), time, calls.
pub type GemmRow = (ShapeKey, Duration, u64);

/// GEMM shapes by total time, largest first; clears them.
pub fn take_gemm_report() -> Vec<GemmRow> {
    drain_sorted(&GEMMS)
}

/// Times the enclosing block under "`name` backward" (the autograd's nodes).
pub fn backward_scope(name: &'static str) -> Scope {
    if !enabled() {
        return Scope { name, start: None };
    }
    static NAMES: Mutex<Option<HashMap<&'static str, &'static str>>> = Mutex::new(None);
    let label = NAMES
        .lock()
        .map(|mut m| {
            *m.get_or_insert_with(HashMap::new)
                .entry(name)
                // One small leak per op name, only when profiling.
                .or_insert_with(|| Box::leak(format!("{name} backward").into_boxed_str()))
        })
        .unwrap_or(name);
    scope(label)
}

/// (name, total time, calls), largest first; clears the totals.
pub fn take_report() -> Vec<(&'static str, Duration, u64)> {
    drain_sorted(&TOTALS)
}

/// A table's rows by total time, largest first; the table emptied.
fn drain_sorted<K>(table: &Mutex<Option<HashMap<K, (Duration, u64)>>>) -> Vec<(K, Duration, u64)> {
    let mut v: Vec<_> = table
        .lock()
        .map(|mut t| {
            t.take()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, (d, n))| (k, d, n))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| b.1.cmp(&a.1));
    v
}
