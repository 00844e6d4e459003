//! A guard for refactoring the CUDA path without a GPU to time it: what
//! full-size SAM-UNet-50 asks of the driver and cuBLAS (kernels, GEMMs, calls,
//! device memory) may not grow. Counted by the emulated driver of tests/simt
//! in dry-run mode (kernels and GEMMs are checked and counted but not run: the
//! counts do not depend on the data), so the full-size model costs seconds.
//!
//! Scenarios, f32 and bf16: the image side at batch 1 and 8 (`encode_only`),
//! each run twice (the first run is eager and records a CUDA graph, the second
//! replays it), and the decoder for 16 boxes on a set image, twice likewise.
//! The ceilings were first measured at commit 3d06df2 (the model code of
//! 33eb153, before the one-model-tree refactoring of issue 8, when the
//! Predictor ran a CUDA-only model tree); since then the Predictor runs the
//! one model tree of src/model on the device, under the same ceilings. A count above
//! its ceiling fails; one below it is printed, so the ceilings can be lowered
//! with the commit that earned it.
//!
//! Own harness: on a machine with a GPU the counts are not the emulator's, and
//! the test says it skips.

use sam_unet::model::SamUnetConfig;
use sam_unet::{DType, Device, Predictor, PredictorOptions, Tensor};

mod kernel_check;
mod simt;

/// What the emulated driver counted in one step (fake_driver_counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    launch_calls: u64,
    kernels: u64,
    gemm_calls: u64,
    gemms: u64,
    graph_launches: u64,
    allocs: u64,
    alloc_bytes: u64,
    peak_bytes: u64,
}

const NAMES: [&str; 8] = [
    "cuLaunchKernel calls",
    "kernels run",
    "cuBLAS GEMM calls",
    "GEMMs run",
    "graph launches",
    "allocations",
    "bytes allocated",
    "peak device bytes",
];

impl Counts {
    fn values(&self) -> [u64; 8] {
        [
            self.launch_calls,
            self.kernels,
            self.gemm_calls,
            self.gemms,
            self.graph_launches,
            self.allocs,
            self.alloc_bytes,
            self.peak_bytes,
        ]
    }
}

struct Driver {
    counters: unsafe extern "C" fn(*mut u64),
    reset: unsafe extern "C" fn(),
}

impl Driver {
    fn measure(&self, step: impl FnOnce()) -> Counts {
        // SAFETY: plain C functions of the emulated driver, no arguments but
        // a buffer of 9 counters.
        unsafe { (self.reset)() };
        step();
        let mut v = [0u64; 9];
        // SAFETY: as above; v holds the 9 values written.
        unsafe { (self.counters)(v.as_mut_ptr()) };
        Counts {
            launch_calls: v[0],
            kernels: v[1],
            gemm_calls: v[2],
            gemms: v[3],
            graph_launches: v[4],
            allocs: v[5],
            alloc_bytes: v[6],
            peak_bytes: v[8],
        }
    }
}

/// (scenario, ceiling): see the header of the included table.
fn ceilings() -> Vec<(&'static str, Counts)> {
    include!("cuda_counts_ceilings.in")
}

fn main() {
    if sam_unet::cuda::CudaDevice::new(0).is_ok() {
        println!(
            "test cuda_counts ... SKIPPED (a GPU is present: the counts are the emulated driver's)"
        );
        return;
    }
    let Some(s) = simt::emulate_gpu(simt::Build::FAST) else {
        println!("test cuda_counts ... SKIPPED (no host emulator)");
        return;
    };
    // SAFETY: the signatures of cuda/host/fake_driver.cpp.
    let (driver, dry_run) = unsafe {
        (
            Driver {
                counters: s.sym("fake_driver_counters"),
                reset: s.sym("fake_driver_reset_counters"),
            },
            s.sym::<unsafe extern "C" fn(i32)>("fake_driver_dry_run"),
        )
    };
    // SAFETY: a plain flag of the emulated driver.
    unsafe { dry_run(1) };
    let w = SamUnetConfig::named("sam-unet-50")
        .unwrap()
        .random_weights(1);
    let mut measured: Vec<(String, Counts)> = vec![];
    for dt in [DType::F32, DType::BF16] {
        let mut p = Predictor::from_weights(
            &w,
            PredictorOptions {
                device: Device::Cuda(0),
                dtype: dt,
            },
        )
        .unwrap();
        let size = p.config().img_size;
        for batch in [1usize, 8] {
            let x = Tensor::from_vec(
                vec![0.5f32; batch * 3 * size * size],
                [batch, 3, size, size],
            )
            .unwrap();
            for pass in ["first", "second"] {
                let c = driver.measure(|| p.encode_only(&x).unwrap());
                measured.push((
                    format!("{} image side batch {batch} {pass} run", dt.name()),
                    c,
                ));
            }
        }
        let img = sam_unet::io::image::RgbImage::new(512, 384, vec![90; 512 * 384 * 3]).unwrap();
        p.set_image(&img).unwrap();
        let boxes: Vec<[f32; 4]> = (0..16)
            .map(|i| {
                let o = 10.0 * i as f32;
                [o, o, o + 200.0, o + 150.0]
            })
            .collect();
        for pass in ["first", "second"] {
            let c = driver.measure(|| {
                p.predict(&boxes).unwrap();
            });
            measured.push((format!("{} decoder 16 boxes {pass} run", dt.name()), c));
        }
    }
    // SAFETY: as above.
    unsafe { dry_run(0) };

    if std::env::var("SAM_UNET_PRINT_COUNTS").is_ok_and(|v| v == "1") {
        // The table this file includes, for a commit that lowers a ceiling.
        println!("vec![");
        for (name, c) in &measured {
            println!(
                "    (\"{name}\", Counts {{ launch_calls: {}, kernels: {}, gemm_calls: {}, gemms: {}, graph_launches: {}, allocs: {}, alloc_bytes: {}, peak_bytes: {} }}),",
                c.launch_calls,
                c.kernels,
                c.gemm_calls,
                c.gemms,
                c.graph_launches,
                c.allocs,
                c.alloc_bytes,
                c.peak_bytes
            );
        }
        println!("]");
    }
    let ceilings = ceilings();
    let mut failed = vec![];
    for (name, c) in &measured {
        let Some((_, ceiling)) = ceilings.iter().find(|(n, _)| n == name) else {
            failed.push(format!("{name}: no ceiling recorded"));
            continue;
        };
        for ((what, got), max) in NAMES.iter().zip(c.values()).zip(ceiling.values()) {
            if got > max {
                failed.push(format!("{name}: {what} {got} > {max}"));
            } else if got < max {
                println!("{name}: {what} {got} (ceiling {max}: lower it)");
            }
        }
        println!("{name}: {c:?}");
    }
    if failed.is_empty() {
        println!("test cuda_counts ... ok");
    } else {
        for f in &failed {
            println!("{f}");
        }
        println!("test cuda_counts ... FAILED");
        std::process::exit(1);
    }
}
