//! CUDA ops against their CPU twins on seeded random inputs at model shapes:
//! |gpu - cpu| <= atol + rtol |cpu|, the worst index printed. On a machine
//! with a GPU they run on cuda:0; without one, on the emulated CUDA driver and
//! cuBLAS of tests/simt (the same launchers, cudarc calls and kernels, run by
//! the host SIMT scheduler), so every run checks the whole CUDA path except the
//! GPU's own arithmetic and speed. Own harness, so the device used (or why
//! none) shows in `cargo test` output; SAM_UNET_REQUIRE_GPU=1 (the GPU check
//! script) makes a missing GPU a failure and refuses the emulator.

use sam_unet::Tensor;
use sam_unet::cuda::CudaDevice;
use sam_unet::ops::activation::{self, Act};
use sam_unet::ops::norm;

mod kernel_check;
mod simt;
use kernel_check::{assert_close, rand, rel_l2};

/// Set when the tests run on the host emulator (no GPU).
static EMULATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn device() -> Option<CudaDevice> {
    CudaDevice::new(0).ok()
}

type TestFn = fn();

fn main() {
    // (name, needs a GPU, test)
    let tests: &[(&str, bool, TestFn)] = &[
        (
            "cuda_stream_order_is_checked",
            true,
            cuda_stream_order_is_checked,
        ),
        (
            "cuda_gradient_buckets_on_side_stream",
            true,
            cuda_gradient_buckets_on_side_stream,
        ),
        (
            "cuda_gelu_relu_add_match_cpu",
            true,
            cuda_gelu_relu_add_match_cpu,
        ),
        (
            "cuda_layer_norm_matches_cpu",
            true,
            cuda_layer_norm_matches_cpu,
        ),
        (
            "cuda_rel_pos_attention_matches_cpu",
            true,
            cuda_rel_pos_attention_matches_cpu,
        ),
        (
            "cuda_linear_cublas_matches_cpu",
            true,
            cuda_linear_cublas_matches_cpu,
        ),
        (
            "cuda_vit_block_matches_cpu_f32_and_bf16",
            true,
            cuda_vit_block_matches_cpu_f32_and_bf16,
        ),
        (
            "cuda_layer_norm2d_matches_cpu",
            true,
            cuda_layer_norm2d_matches_cpu,
        ),
        ("cuda_conv2d_matches_cpu", true, cuda_conv2d_matches_cpu),
        (
            "cuda_conv_transpose2d_and_pool_match_cpu",
            true,
            cuda_conv_transpose2d_and_pool_match_cpu,
        ),
        ("cuda_layout_matches_cpu", true, cuda_layout_matches_cpu),
        (
            "cuda_decoder_attention_matches_cpu",
            true,
            cuda_decoder_attention_matches_cpu,
        ),
        (
            "cuda_rel_pos_attention_tensor_cores_match_cpu",
            true,
            cuda_rel_pos_attention_tensor_cores_match_cpu,
        ),
        (
            "cuda_graph_capture_failure_leaves_stream_usable",
            true,
            cuda_graph_capture_failure_leaves_stream_usable,
        ),
        (
            "cuda_postprocess_box_tokens_repeat_match_cpu",
            true,
            cuda_postprocess_box_tokens_repeat_match_cpu,
        ),
        (
            "cuda_reports_clear_errors",
            false,
            cuda_reports_clear_errors,
        ),
        (
            "cuda_out_of_memory_is_typed",
            true,
            cuda_out_of_memory_is_typed,
        ),
        ("cuda_tensor_storage", true, cuda_tensor_storage),
        ("cuda_adam_matches_cpu", true, cuda_adam_matches_cpu),
        ("cuda_backward_matches_cpu", true, cuda_backward_matches_cpu),
        ("cuda_loss_matches_cpu", true, cuda_loss_matches_cpu),
        (
            "cuda_decoder_backward_matches_cpu",
            true,
            cuda_decoder_backward_matches_cpu,
        ),
        (
            "cuda_conv_backward_matches_cpu",
            true,
            cuda_conv_backward_matches_cpu,
        ),
        (
            "cuda_convt_pool_backward_matches_cpu",
            true,
            cuda_convt_pool_backward_matches_cpu,
        ),
        (
            "cuda_batch_norm_train_matches_cpu",
            true,
            cuda_batch_norm_train_matches_cpu,
        ),
        (
            "cuda_sync_batch_norm_matches_one_batch",
            true,
            cuda_sync_batch_norm_matches_one_batch,
        ),
        (
            "cuda_nccl_world_one_steps_like_one_process",
            true,
            cuda_nccl_world_one_steps_like_one_process,
        ),
        (
            "cuda_sum_squares_matches_cpu",
            true,
            cuda_sum_squares_matches_cpu,
        ),
        (
            "cuda_attention_prompt_backward_matches_cpu",
            true,
            cuda_attention_prompt_backward_matches_cpu,
        ),
        (
            "cuda_activation_ops_dispatch_on_tensors",
            true,
            cuda_activation_ops_dispatch_on_tensors,
        ),
        (
            "cuda_norm_layout_ops_dispatch_on_tensors",
            true,
            cuda_norm_layout_ops_dispatch_on_tensors,
        ),
        (
            "cuda_attention_resize_ops_dispatch_on_tensors",
            true,
            cuda_attention_resize_ops_dispatch_on_tensors,
        ),
        (
            "cuda_linear_dispatches_on_tensors",
            true,
            cuda_linear_dispatches_on_tensors,
        ),
        (
            "cuda_conv_ops_dispatch_on_tensors",
            true,
            cuda_conv_ops_dispatch_on_tensors,
        ),
        (
            "cuda_decoder_ops_dispatch_on_tensors",
            true,
            cuda_decoder_ops_dispatch_on_tensors,
        ),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let mut selected: Vec<_> = tests
        .iter()
        .filter(|(n, _, _)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .collect();
    // Set in the FMA rerun (below).
    let fma = std::env::var("SAM_UNET_SIMT_FMA").is_ok_and(|v| v == "1");
    let build = if fma {
        simt::Build::CHECKED_FMA
    } else {
        simt::Build::CHECKED
    };
    let mut emulated = false;
    let gpu = match simt::gpu_or_emulator(build) {
        Ok(what) => {
            emulated = what.starts_with("no GPU");
            EMULATED.store(emulated, std::sync::atomic::Ordering::Relaxed);
            println!("running {} CUDA tests on {what}", selected.len());
            true
        }
        Err(e) => {
            if std::env::var("SAM_UNET_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                println!("test cuda_device ... FAILED ({e})");
                std::process::exit(1);
            }
            println!("{e}");
            false
        }
    };
    // On the emulator the op tests run twice: with each operation rounded on
    // its own (here), and with FMA contraction as nvcc does by default (a
    // second process, as the emulated driver is the one libcuda.so of a
    // process), started now so that the two run side by side (the emulator
    // runs one launch at a time on one core). The sanitizer stays on in the
    // rerun, but one thread schedule does (the three schedules of both
    // builds run in tests/kernels_host.rs at small shapes, and here at
    // these): it keeps CI within its budget.
    let mut fma_run = None;
    let sibling = std::env::var_os(simt::SIBLING).is_some();
    if emulated && !fma && !sibling {
        let schedules = std::env::var("SAM_UNET_SIMT_FMA_SCHEDULES").unwrap_or_else(|_| "1".into());
        let args: Vec<String> = std::env::args().skip(1).collect();
        let envs = [
            ("SAM_UNET_SIMT_FMA", "1".to_string()),
            ("SAM_UNET_SIMT_SCHEDULES", schedules),
        ];
        match simt::Sibling::spawn(
            "the same tests on the emulator built with FMA contraction",
            &args,
            &envs,
            None,
        ) {
            Ok(s) => fma_run = Some(s),
            Err(e) => {
                println!("test cuda_ops_fma_rerun ... FAILED ({e})");
                std::process::exit(1);
            }
        }
    }
    // The longest checked test (the ViT block, 3 schedules: about half of
    // this process's time) in a second sibling, on this process's library.
    const LONGEST: &str = "cuda_vit_block_matches_cpu_f32_and_bf16";
    let names: Vec<&str> = selected.iter().map(|(n, _, _)| *n).collect();
    let longest_run = (emulated && !fma)
        .then(|| simt::Sibling::longest_beside(LONGEST, &names, build))
        .flatten();
    if longest_run.is_some() {
        selected.retain(|(n, _, _)| *n != LONGEST);
    }
    let mut failed = 0;
    for (name, needs_gpu, f) in selected {
        if *needs_gpu && !gpu {
            println!("test {name} ... SKIPPED (needs a GPU)");
            continue;
        }
        // The wall time beside each result: CI's budget is spent here.
        let t0 = std::time::Instant::now();
        let r = std::panic::catch_unwind(f);
        println!(
            "test {name} ... {} ({:.1} s)",
            if r.is_ok() { "ok" } else { "FAILED" },
            t0.elapsed().as_secs_f64()
        );
        failed += r.is_err() as usize;
    }
    for s in [longest_run, fma_run].into_iter().flatten() {
        failed += !s.finish() as usize;
    }
    if failed > 0 {
        std::process::exit(1);
    }
}

fn cuda_gelu_relu_add_match_cpu() {
    let dev = device().expect("a GPU was found at start");
    // ViT MLP hidden activations: 256 tokens x 3072.
    let n = 256 * 3072;
    let x = rand(n, 1, 6.0);
    let xd = dev.upload(&x).unwrap();
    let xt = Tensor::from_vec(x.clone(), [n]).unwrap();
    for (a, name) in [(Act::Gelu, "gelu"), (Act::Relu, "relu")] {
        let g = dev
            .download(&activation::cuda::act(&dev, &xd, a).unwrap())
            .unwrap();
        let c = activation::act(&xt, a).unwrap();
        assert_close(name, &g, c.as_f32().unwrap(), 1e-6, 1e-5);
    }
    let y = rand(n, 2, 3.0);
    let g = dev
        .download(&activation::cuda::add(&dev, &xd, &dev.upload(&y).unwrap()).unwrap())
        .unwrap();
    let c = activation::add(&xt, &Tensor::from_vec(y, [n]).unwrap()).unwrap();
    assert_close("add", &g, c.as_f32().unwrap(), 0.0, 0.0);
}

fn cuda_layer_norm_matches_cpu() {
    let dev = device().expect("a GPU was found at start");
    // ViT-B tokens (256 x 768) and decoder keys for 16 boxes (4096 x 256).
    for (rows, c) in [(256usize, 768usize), (4096, 256)] {
        let x = rand(rows * c, 3, 4.0);
        let w = rand(c, 4, 1.0);
        let b = rand(c, 5, 1.0);
        let g = norm::cuda::layer_norm(
            &dev,
            &dev.upload(&x).unwrap(),
            &dev.upload(&w).unwrap(),
            &dev.upload(&b).unwrap(),
            c,
            1e-6,
        )
        .unwrap();
        let g = dev.download(&g).unwrap();
        let cpu = norm::layer_norm(
            &Tensor::from_vec(x, [rows, c]).unwrap(),
            &Tensor::from_vec(w, [c]).unwrap(),
            &Tensor::from_vec(b, [c]).unwrap(),
            1e-6,
        )
        .unwrap();
        assert_close(
            &format!("layer_norm {rows}x{c}"),
            &g,
            cpu.as_f32().unwrap(),
            1e-5,
            1e-5,
        );
    }
}

fn cuda_reports_clear_errors() {
    // Any machine: a device index that does not exist is a typed error, never a panic.
    match CudaDevice::new(1000) {
        Err(sam_unet::Error::CudaUnavailable(msg)) => println!("cuda:1000 -> {msg}"),
        Err(e) => panic!("unexpected error type: {e}"),
        Ok(_) => panic!("cuda:1000 opened"),
    }
}

fn cuda_activation_ops_dispatch_on_tensors() {
    // The public ops of the activation family run where their inputs are: the
    // same call on CUDA tensors gives the CPU's values (views included), and
    // tensors on two devices are an error naming the op.
    use sam_unet::Device;
    let cuda = Device::Cuda(0);
    let (n, c) = (64usize, 768usize);
    let x = Tensor::from_vec(rand(n * c, 170, 4.0), [n, c]).unwrap();
    let z = Tensor::from_vec(rand(n * c, 171, 4.0), [n, c]).unwrap();
    let row = Tensor::from_vec(rand(c, 172, 1.0), [1, c]).unwrap();
    let (xg, zg, rowg) = (
        x.to_device(cuda).unwrap(),
        z.to_device(cuda).unwrap(),
        row.to_device(cuda).unwrap(),
    );
    let host = |t: Tensor| {
        assert_eq!(t.device(), cuda);
        t.to_host().unwrap().into_f32_vec().unwrap()
    };
    for a in [Act::Gelu, Act::Relu, Act::None] {
        let want = activation::act(&x, a).unwrap();
        let got = host(activation::act(&xg, a).unwrap());
        assert_close(
            &format!("act {a:?} on tensors"),
            &got,
            want.as_f32().unwrap(),
            1e-6,
            1e-5,
        );
    }
    let want = activation::add(&x, &z).unwrap();
    assert_close(
        "add on tensors",
        &host(activation::add(&xg, &zg).unwrap()),
        want.as_f32().unwrap(),
        0.0,
        0.0,
    );
    let want = activation::add_broadcast(&x, &row).unwrap();
    let got = host(activation::add_broadcast(&xg, &rowg).unwrap());
    assert_close(
        "add_broadcast on tensors",
        &got,
        want.as_f32().unwrap(),
        0.0,
        0.0,
    );
    // In place, with a view as the addend (rows 8..16 of x).
    let (v, vg) = (
        x.view(8 * c, [8, c]).unwrap(),
        xg.view(8 * c, [8, c]).unwrap(),
    );
    let (mut s, mut sg) = (z.view(0, [8, c]).unwrap(), zg.view(0, [8, c]).unwrap());
    activation::add_(&mut s, &v).unwrap();
    activation::add_(&mut sg, &vg).unwrap();
    assert_close("add_ of views", &host(sg), s.as_f32().unwrap(), 0.0, 0.0);
    assert_eq!(
        zg.to_host().unwrap().as_f32().unwrap(),
        z.as_f32().unwrap(),
        "add_ wrote into a shared buffer"
    );
    assert!(matches!(
        activation::add(&x, &zg),
        Err(sam_unet::Error::Device { op: "add", .. })
    ));
}

/// op(inputs on the CPU) vs op(the same inputs on cuda:0), brought back.
fn same_on_both(
    name: &str,
    inputs: &[&Tensor],
    op: impl Fn(&[Tensor]) -> Tensor,
    atol: f32,
    rtol: f32,
) {
    let cpu: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
    let gpu: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_device(sam_unet::Device::Cuda(0)).unwrap())
        .collect();
    let want = op(&cpu);
    let got = op(&gpu);
    assert_eq!(
        got.device(),
        sam_unet::Device::Cuda(0),
        "{name}: output device"
    );
    assert_eq!(got.dims(), want.dims(), "{name}: output shape");
    let got = got.to_host().unwrap().into_f32_vec().unwrap();
    assert_close(name, &got, want.as_f32().unwrap(), atol, rtol);
}

fn cuda_norm_layout_ops_dispatch_on_tensors() {
    use sam_unet::ops::layout;
    let t = |n: usize, seed: u64, dims: &[usize]| {
        Tensor::from_vec(rand(n, seed, 2.0), dims.to_vec()).unwrap()
    };
    let (rows, c) = (96usize, 768usize);
    let (x, w, b) = (
        t(rows * c, 180, &[2, 48, c]),
        t(c, 181, &[c]),
        t(c, 182, &[c]),
    );
    same_on_both(
        "layer_norm on tensors",
        &[&x, &w, &b],
        |v| norm::layer_norm(&v[0], &v[1], &v[2], 1e-6).unwrap(),
        1e-5,
        1e-5,
    );
    let (m, w2, b2) = (
        t(2 * 32 * 16 * 16, 183, &[2, 32, 16, 16]),
        t(32, 184, &[32]),
        t(32, 185, &[32]),
    );
    for a in [Act::None, Act::Gelu] {
        same_on_both(
            &format!("layer_norm2d {a:?} on tensors"),
            &[&m, &w2, &b2],
            |v| norm::layer_norm2d(&v[0], &v[1], &v[2], 1e-6, a).unwrap(),
            1e-5,
            1e-4,
        );
    }
    same_on_both(
        "nchw_to_nhwc on tensors",
        &[&m],
        |v| layout::nchw_to_nhwc(&v[0]).unwrap(),
        0.0,
        0.0,
    );
    same_on_both(
        "nhwc_to_nchw on tensors",
        &[&m],
        |v| layout::nhwc_to_nchw(&v[0]).unwrap(),
        0.0,
        0.0,
    );
    // A view of one image, repeated.
    let one = m.view(32 * 256, [1, 32, 16, 16]).unwrap();
    same_on_both(
        "repeat_first of a view on tensors",
        &[&one],
        |v| layout::repeat_first(&v[0], 5).unwrap(),
        0.0,
        0.0,
    );
    let wrong = w.to_device(sam_unet::Device::Cuda(0)).unwrap();
    assert!(matches!(
        norm::layer_norm(&x, &wrong, &b, 1e-6),
        Err(sam_unet::Error::Device { .. })
    ));
}

fn cuda_attention_resize_ops_dispatch_on_tensors() {
    use sam_unet::ops::{attention, resize};
    let t = |n: usize, seed: u64, dims: &[usize], scale: f32| {
        Tensor::from_vec(rand(n, seed, scale), dims.to_vec()).unwrap()
    };
    // Window attention of one image, two heads of 64 on the 16 x 16 grid.
    let (b, g, d) = (1usize, 16usize, 128usize);
    let qkv = t(b * g * g * 3 * d, 190, &[b, g, g, 3 * d], 2.0);
    let bias = t(3 * d, 191, &[3 * d], 1.0);
    let (rh, rw) = (
        t(27 * 64, 192, &[27, 64], 0.5),
        t(27 * 64, 193, &[27, 64], 0.5),
    );
    same_on_both(
        "rel_pos_attention window 14 on tensors",
        &[&qkv, &bias, &rh, &rw],
        |v| attention::rel_pos_attention(&v[0], &v[1], &v[2], &v[3], 2, 14).unwrap(),
        1e-5,
        1e-4,
    );
    // Decoder attention, token-to-image with the image keys of one image
    // shared by 4 boxes (no copies of k / v).
    let (q, k, v) = (
        t(4 * 7 * 128, 194, &[4, 7, 128], 2.0),
        t(256 * 128, 195, &[1, 256, 128], 2.0),
        t(256 * 128, 196, &[1, 256, 128], 1.0),
    );
    same_on_both(
        "attention with shared keys on tensors",
        &[&q, &k, &v],
        |x| attention::attention(&x[0], &x[1], &x[2], 8).unwrap(),
        1e-5,
        1e-4,
    );
    // Bilinear resize is bit-exact on both devices.
    let m = t(2 * 64 * 64, 197, &[2, 1, 64, 64], 20.0);
    same_on_both(
        "bilinear 64 -> 256 on tensors",
        &[&m],
        |x| resize::bilinear(&x[0], 256, 256).unwrap(),
        0.0,
        0.0,
    );
    same_on_both(
        "bilinear 64 -> 37 x 50 on tensors",
        &[&m],
        |x| resize::bilinear(&x[0], 37, 50).unwrap(),
        0.0,
        0.0,
    );
}

fn cuda_linear_dispatches_on_tensors() {
    // linear_fused on CUDA tensors: cuBLAS owned by the device, residual as
    // the GEMM's seed, bias + activation epilogue; a bf16 weight makes a bf16
    // GEMM with f32 accumulation.
    use sam_unet::ops::linear;
    use sam_unet::{DType, Device};
    let t = |n: usize, seed: u64, dims: &[usize], scale: f32| {
        Tensor::from_vec(rand(n, seed, scale), dims.to_vec()).unwrap()
    };
    let (m, n, k) = (2 * 64usize, 384usize, 256usize);
    let (x, w, b, r) = (
        t(m * k, 200, &[2, 64, k], 1.0),
        t(n * k, 201, &[n, k], 0.1),
        t(n, 202, &[n], 1.0),
        t(m * n, 203, &[2, 64, n], 1.0),
    );
    same_on_both(
        "linear on tensors",
        &[&x, &w, &b],
        |v| linear::linear(&v[0], &v[1], Some(&v[2])).unwrap(),
        1e-5,
        1e-4,
    );
    same_on_both(
        "linear_fused residual + GELU on tensors",
        &[&x, &w, &b, &r],
        |v| linear::linear_fused(&v[0], &v[1], Some(&v[2]), Some(&v[3]), Act::Gelu).unwrap(),
        1e-5,
        1e-4,
    );
    // bf16 weight: against the CPU on the bf16-rounded x and w.
    let round = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let want = linear::linear(&round(&x), &round(&w), Some(&b)).unwrap();
    let cuda = Device::Cuda(0);
    let wg = w.to_device(cuda).unwrap().to_dtype(DType::BF16).unwrap();
    let got = linear::linear(
        &x.to_device(cuda).unwrap(),
        &wg,
        Some(&b.to_device(cuda).unwrap()),
    )
    .unwrap();
    let got = got.to_host().unwrap().into_f32_vec().unwrap();
    let rel = rel_l2(&got, want.as_f32().unwrap());
    println!(
        "linear bf16 weight on tensors: relative L2 {rel:.2e} to the bf16-rounded CPU product"
    );
    assert!(rel <= 1e-5, "bf16 linear: relative L2 {rel}");
}

fn cuda_conv_ops_dispatch_on_tensors() {
    use sam_unet::ops::conv::{self, Conv2dArgs};
    use sam_unet::{DType, Device};
    let t = |n: usize, seed: u64, dims: &[usize], scale: f32| {
        Tensor::from_vec(rand(n, seed, scale), dims.to_vec()).unwrap()
    };
    // A ResNet 3 x 3 stride-2 conv with bias, residual and ReLU; a 1 x 1 conv.
    let x = t(2 * 16 * 20 * 20, 210, &[2, 16, 20, 20], 1.0);
    let w = t(32 * 16 * 9, 211, &[32, 16, 3, 3], 0.2);
    let b = t(32, 212, &[32], 1.0);
    let r = t(2 * 32 * 10 * 10, 213, &[2, 32, 10, 10], 1.0);
    let args = Conv2dArgs {
        stride: 2,
        padding: 1,
    };
    same_on_both(
        "conv2d 3x3 s2 + residual + ReLU on tensors",
        &[&x, &w, &b, &r],
        |v| conv::conv2d(&v[0], &v[1], Some(&v[2]), args, Some(&v[3]), Act::Relu).unwrap(),
        1e-5,
        1e-4,
    );
    let w1 = t(8 * 16, 214, &[8, 16, 1, 1], 0.2);
    same_on_both(
        "conv2d 1x1 on tensors",
        &[&x, &w1],
        |v| {
            conv::conv2d(
                &v[0],
                &v[1],
                None,
                Conv2dArgs {
                    stride: 1,
                    padding: 0,
                },
                None,
                Act::None,
            )
            .unwrap()
        },
        1e-5,
        1e-4,
    );
    // The adapters' 2 x 2 / stride 2 transposed conv with GELU.
    let wt = t(16 * 8 * 4, 215, &[16, 8, 2, 2], 0.2);
    let bt = t(8, 216, &[8], 1.0);
    same_on_both(
        "conv_transpose2d on tensors",
        &[&x, &wt, &bt],
        |v| conv::conv_transpose2d(&v[0], &v[1], Some(&v[2]), Act::Gelu).unwrap(),
        1e-5,
        1e-4,
    );
    same_on_both(
        "max_pool2d on tensors",
        &[&x],
        |v| conv::max_pool2d(&v[0], 3, 2, 1).unwrap(),
        0.0,
        0.0,
    );
    // A bf16 weight runs the GEMM in bf16: against the CPU on bf16-rounded inputs.
    let round = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let want = conv::conv2d(&round(&x), &round(&w), Some(&b), args, None, Act::None).unwrap();
    let cuda = Device::Cuda(0);
    let wg = w.to_device(cuda).unwrap().to_dtype(DType::BF16).unwrap();
    let got = conv::conv2d(
        &x.to_device(cuda).unwrap(),
        &wg,
        Some(&b.to_device(cuda).unwrap()),
        args,
        None,
        Act::None,
    )
    .unwrap()
    .to_host()
    .unwrap()
    .into_f32_vec()
    .unwrap();
    let rel = rel_l2(&got, want.as_f32().unwrap());
    println!("conv2d bf16 weight on tensors: relative L2 {rel:.2e}");
    assert!(rel <= 1e-5, "bf16 conv2d: relative L2 {rel}");
    // The padding rule is one for both devices (CUDA max-pool had none).
    let xg = x.to_device(cuda).unwrap();
    assert!(conv::max_pool2d(&xg, 3, 2, 2).is_err());
}

fn cuda_decoder_ops_dispatch_on_tensors() {
    // The decoder's former host loops, now ops on both devices: token concat
    // with a shared med token, the med-token gather, the hypernetwork product.
    use sam_unet::ops::{layout, linear};
    let t = |n: usize, seed: u64, dims: &[usize]| {
        Tensor::from_vec(rand(n, seed, 1.0), dims.to_vec()).unwrap()
    };
    let (n, c) = (5usize, 256usize);
    let (med, sparse) = (t(c, 220, &[1, 1, c]), t(n * 2 * c, 221, &[n, 2, c]));
    same_on_both(
        "cat1 on tensors",
        &[&med, &sparse],
        |v| layout::cat1(&[&v[0], &v[1]]).unwrap(),
        0.0,
        0.0,
    );
    let q = t(n * 3 * c, 222, &[n, 3, c]);
    same_on_both(
        "narrow on tensors",
        &[&q],
        |v| layout::narrow(&v[0], 0, 1).unwrap(),
        0.0,
        0.0,
    );
    same_on_both(
        "narrow of a view on tensors",
        &[&q],
        |v| layout::narrow(&v[0].view(3 * c, [n - 1, 3, c]).unwrap(), 1, 2).unwrap(),
        0.0,
        0.0,
    );
    let (h, f, msf) = (
        t(n * 32, 223, &[n, 32]),
        t(n * 32 * 64 * 64, 224, &[n, 32, 64, 64]),
        t(32 * 64 * 64, 225, &[1, 32, 64, 64]),
    );
    same_on_both(
        "mask_dot on tensors",
        &[&h, &f, &msf],
        |v| linear::mask_dot(&v[0], &v[1], &v[2]).unwrap(),
        1e-5,
        1e-5,
    );
}

fn cuda_tensor_storage() {
    // Tensor on a CUDA device: to_device / to_host / to_dtype, views with an
    // offset, and copy-on-write that copies only a shared or partial range.
    use sam_unet::{DType, Device};
    let mut x = rand(1000, 160, 3.0);
    x[7] = 1.0 + 1.0 / 256.0; // a bf16 tie: rounds to even
    let cpu = Tensor::from_vec(x.clone(), [10, 100]).unwrap();
    let g = cpu.to_device(Device::Cuda(0)).unwrap();
    assert_eq!(g.device(), Device::Cuda(0));
    assert!(g.as_f32().is_err(), "CUDA values are not host slices");
    assert_eq!(g.to_host().unwrap().as_f32().unwrap(), &x[..]);
    // bf16 on the device rounds as the CPU does; back to f32 exactly.
    let gb = g.to_dtype(DType::BF16).unwrap();
    assert_eq!(gb.dtype(), DType::BF16);
    let want = cpu.to_dtype(DType::BF16).unwrap().into_f32_vec().unwrap();
    assert_eq!(gb.to_host().unwrap().into_f32_vec().unwrap(), want);
    assert_eq!(
        gb.to_dtype(DType::F32).unwrap().into_f32_vec().unwrap(),
        want
    );
    // Views: rows 3..5 of the device tensor, down and converted.
    let v = g.view(300, [2, 100]).unwrap();
    assert_eq!(v.to_host().unwrap().as_f32().unwrap(), &x[300..500]);
    assert_eq!(
        v.to_dtype(DType::BF16).unwrap().into_f32_vec().unwrap(),
        want[300..500].to_vec()
    );
    // Copy on write: the view gets a buffer of its own; g keeps its values.
    let mut w = v.clone();
    {
        let mut m = w.cuda_f32_mut("test").unwrap();
        let dev = g.cuda_device().unwrap();
        dev.stream()
            .memcpy_htod(&[42.0f32], &mut m.slice_mut(0..1))
            .unwrap();
    }
    assert_eq!(w.offset(), 0);
    assert_eq!(w.to_host().unwrap().as_f32().unwrap()[..2], [42.0, x[301]]);
    assert_eq!(g.to_host().unwrap().as_f32().unwrap(), &x[..]);
    // A whole buffer shared by a clone is copied too.
    let mut c = g.clone();
    {
        let mut m = c.cuda_f32_mut("test").unwrap();
        let dev = g.cuda_device().unwrap();
        dev.stream()
            .memcpy_htod(&[-1.0f32], &mut m.slice_mut(0..1))
            .unwrap();
    }
    assert_eq!(c.to_host().unwrap().as_f32().unwrap()[0], -1.0);
    assert_eq!(g.to_host().unwrap().as_f32().unwrap()[0], x[0]);
    // Errors: f16 is not a CUDA dtype, a missing device is CudaUnavailable.
    let h = cpu.to_dtype(DType::F16).unwrap();
    assert!(matches!(
        h.to_device(Device::Cuda(0)),
        Err(sam_unet::Error::DType { .. })
    ));
    assert!(matches!(
        cpu.to_device(Device::Cuda(1000)),
        Err(sam_unet::Error::CudaUnavailable(_))
    ));
}

fn cuda_out_of_memory_is_typed() {
    // 4 TiB is more than any GPU has: out of memory, with the bytes asked
    // for, a variant of its own (not "CUDA unavailable"); the device stays usable.
    let dev = device().expect("a GPU was found at start");
    match dev.alloc(1 << 40) {
        Err(sam_unet::Error::CudaOutOfMemory { op, bytes }) => {
            assert_eq!(bytes, Some(4 << 40));
            println!("{op}: out of memory, {bytes:?} bytes asked for")
        }
        Err(e) => panic!("unexpected error type: {e}"),
        Ok(_) => panic!("4 TiB allocated"),
    }
    let x = dev.upload(&[1.0, -2.0]).unwrap();
    let y = activation::cuda::act(&dev, &x, Act::Relu).unwrap();
    assert_eq!(dev.download(&y).unwrap(), vec![1.0, 0.0]);
}

fn cuda_rel_pos_attention_matches_cpu() {
    let dev = device().expect("a GPU was found at start");
    // ViT-B's geometry (heads of 64 on the 16 x 16 grid; window 14, padded to
    // 28, and global) with 2 of its 12 heads: every head runs the same code,
    // and the whole 12-head block runs in cuda_vit_block_matches_cpu_f32_and_bf16
    // (the checked emulator takes 100 s for 12 heads here).
    let (b, g, heads, d) = (2usize, 16usize, 2usize, 128usize);
    let qkv = rand(b * g * g * 3 * d, 6, 2.0);
    let bias = rand(3 * d, 7, 1.0);
    for window in [14usize, 0] {
        let s = if window == 0 { g } else { window };
        let rh = rand((2 * s - 1) * 64, 8, 0.5);
        let rw = rand((2 * s - 1) * 64, 9, 0.5);
        let gpu = sam_unet::ops::attention::cuda::rel_pos_attention(
            &dev,
            &dev.upload(&qkv).unwrap(),
            &dev.upload(&bias).unwrap(),
            &dev.upload(&rh).unwrap(),
            &dev.upload(&rw).unwrap(),
            b,
            g,
            d,
            heads,
            window,
        )
        .unwrap();
        let gpu = dev.download(&gpu).unwrap();
        let t = |v: &Vec<f32>, dims: Vec<usize>| Tensor::from_vec(v.clone(), dims).unwrap();
        let cpu = sam_unet::ops::attention::rel_pos_attention(
            &t(&qkv, vec![b, g, g, 3 * d]),
            &t(&bias, vec![3 * d]),
            &t(&rh, vec![2 * s - 1, 64]),
            &t(&rw, vec![2 * s - 1, 64]),
            heads,
            window,
        )
        .unwrap();
        assert_close(
            &format!("rel_pos_attention window {window}"),
            &gpu,
            cpu.as_f32().unwrap(),
            1e-5,
            1e-4,
        );
    }
}

fn cuda_linear_cublas_matches_cpu() {
    let dev = device().expect("a GPU was found at start");
    let blas = sam_unet::cuda::blas::Blas::new(dev.stream()).unwrap();
    let (m, k, n) = (256usize, 768usize, 2304usize);
    let (x, w) = (rand(m * k, 10, 1.0), rand(n * k, 11, 0.05));
    let mut y = dev.alloc(m * n).unwrap();
    blas.linear_f32(
        dev.stream(),
        &dev.upload(&x).unwrap(),
        &dev.upload(&w).unwrap(),
        &mut y,
        m,
        n,
        k,
        false,
    )
    .unwrap();
    let gpu = dev.download(&y).unwrap();
    let cpu = sam_unet::ops::linear::linear(
        &Tensor::from_vec(x.clone(), [m, k]).unwrap(),
        &Tensor::from_vec(w.clone(), [n, k]).unwrap(),
        None,
    )
    .unwrap();
    assert_close(
        "linear f32 (cuBLAS, no TF32)",
        &gpu,
        cpu.as_f32().unwrap(),
        1e-4,
        1e-4,
    );
    let mut y16 = dev.alloc(m * n).unwrap();
    let (x16, w16) = (
        sam_unet::ops::activation::cuda::to_bf16(&dev, &dev.upload(&x).unwrap()).unwrap(),
        sam_unet::ops::activation::cuda::to_bf16(&dev, &dev.upload(&w).unwrap()).unwrap(),
    );
    blas.linear_bf16(dev.stream(), &x16, &w16, &mut y16, m, n, k, false)
        .unwrap();
    let gpu16 = dev.download(&y16).unwrap();
    let rel = rel_l2(&gpu16, cpu.as_f32().unwrap());
    println!("linear bf16 (f32 accumulate): relative L2 {rel:.2e}");
    assert!(rel <= 2e-2, "bf16 linear relative L2 {rel}");
}

/// A ViT-B block with seeded random weights at the reference's scale.
fn vitb_block_weights(window: usize) -> sam_unet::io::Weights {
    let d = 768;
    let s = if window == 0 { 16 } else { window };
    let mut w = sam_unet::io::Weights::new();
    let mut put = |n: &str, dims: Vec<usize>, seed: u64, scale: f32, offset: f32| {
        let v: Vec<f32> = rand(dims.iter().product(), seed, scale)
            .into_iter()
            .map(|x| x + offset)
            .collect();
        w.insert(format!("blk.{n}"), Tensor::from_vec(v, dims).unwrap());
    };
    put("norm1.weight", vec![d], 20, 0.2, 1.0);
    put("norm1.bias", vec![d], 21, 0.1, 0.0);
    put("attn.qkv.weight", vec![3 * d, d], 22, 0.06, 0.0);
    put("attn.qkv.bias", vec![3 * d], 23, 0.1, 0.0);
    put("attn.proj.weight", vec![d, d], 24, 0.06, 0.0);
    put("attn.proj.bias", vec![d], 25, 0.1, 0.0);
    put("attn.rel_pos_h", vec![2 * s - 1, 64], 26, 0.3, 0.0);
    put("attn.rel_pos_w", vec![2 * s - 1, 64], 27, 0.3, 0.0);
    put("norm2.weight", vec![d], 28, 0.2, 1.0);
    put("norm2.bias", vec![d], 29, 0.1, 0.0);
    put("mlp.lin1.weight", vec![4 * d, d], 30, 0.06, 0.0);
    put("mlp.lin1.bias", vec![4 * d], 31, 0.1, 0.0);
    put("mlp.lin2.weight", vec![d, 4 * d], 32, 0.03, 0.0);
    put("mlp.lin2.bias", vec![d], 33, 0.1, 0.0);
    w
}

/// The model's ViT block on the CUDA device: the unfused ops in f32, the
/// fused block (ops::attention::vit_block_bf16) with bf16 GEMM weights.
fn cuda_vit_block_matches_cpu_f32_and_bf16() {
    let _dev = device().expect("a GPU was found at start");
    let (b, g, d) = (2usize, 16usize, 768usize);
    let x = rand(b * g * g * d, 40, 2.0);
    for window in [14usize, 0] {
        let w = vitb_block_weights(window);
        let cpu = sam_unet::model::image_encoder::Block::load(&w, "blk", 12, window)
            .unwrap()
            .forward(&Tensor::from_vec(x.clone(), [b, g, g, d]).unwrap())
            .unwrap();
        for dt in [sam_unet::DType::F32, sam_unet::DType::BF16] {
            let mut blk =
                sam_unet::model::image_encoder::Block::load(&w, "blk", 12, window).unwrap();
            sam_unet::nn::to_device(&mut blk, sam_unet::Device::Cuda(0)).unwrap();
            sam_unet::nn::gemm_weights_to(&mut blk, dt).unwrap();
            let xg = Tensor::from_vec(x.clone(), [b, g, g, d])
                .unwrap()
                .to_device(sam_unet::Device::Cuda(0))
                .unwrap();
            let y = blk.forward(&xg).unwrap().to_host().unwrap();
            let y = y.as_f32().unwrap();
            let rel = rel_l2(y, cpu.as_f32().unwrap());
            println!(
                "vit block window {window} {}: relative L2 vs CPU {rel:.2e}",
                dt.name()
            );
            let tol = if dt == sam_unet::DType::F32 {
                1e-5
            } else {
                2e-2
            };
            assert!(
                rel <= tol,
                "vit block window {window} {}: relative L2 {rel} > {tol}",
                dt.name()
            );
        }
    }
}

fn gpu_t(dev: &CudaDevice, v: &[f32], dims: &[usize]) -> sam_unet::cuda::GpuTensor {
    sam_unet::cuda::GpuTensor {
        data: dev.upload(v).unwrap(),
        dims: dims.to_vec(),
    }
}

fn cpu_t(v: &[f32], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims.to_vec()).unwrap()
}

fn cuda_layer_norm2d_matches_cpu() {
    let dev = device().expect("a GPU was found at start");
    // An adapter map and the decoder's mask feature for 16 boxes.
    for dims in [[1usize, 512, 32, 32], [16, 64, 64, 64]] {
        let n: usize = dims.iter().product();
        let (x, w, b) = (
            rand(n, 60, 3.0),
            rand(dims[1], 61, 1.0),
            rand(dims[1], 62, 1.0),
        );
        let g = norm::cuda::layer_norm2d(
            &dev,
            &gpu_t(&dev, &x, &dims),
            &dev.upload(&w).unwrap(),
            &dev.upload(&b).unwrap(),
            1e-6,
            Act::Gelu,
        )
        .unwrap();
        let c = norm::layer_norm2d(
            &cpu_t(&x, &dims),
            &cpu_t(&w, &[dims[1]]),
            &cpu_t(&b, &[dims[1]]),
            1e-6,
            Act::Gelu,
        )
        .unwrap();
        assert_close(
            &format!("layer_norm2d+gelu {dims:?}"),
            &dev.download(&g.data).unwrap(),
            c.as_f32().unwrap(),
            1e-5,
            1e-4,
        );
    }
}

fn cuda_conv2d_matches_cpu() {
    use sam_unet::ops::conv::{self, Conv2dArgs};
    let dev = device().expect("a GPU was found at start");
    let blas = sam_unet::cuda::blas::Blas::new(dev.stream()).unwrap();
    // (input, weight, stride, pad, with residual)
    let cases: &[([usize; 4], [usize; 4], usize, usize, bool)] = &[
        ([1, 3, 256, 256], [64, 3, 7, 7], 2, 3, false),
        ([1, 64, 64, 64], [64, 64, 3, 3], 1, 1, true),
        ([1, 512, 32, 32], [1024, 512, 3, 3], 2, 1, false),
        ([1, 1024, 16, 16], [256, 1024, 1, 1], 1, 0, true),
        ([4, 64, 64, 64], [32, 64, 3, 3], 1, 1, false),
    ];
    for (i, (xd, wd, s, p, res)) in cases.iter().enumerate() {
        let (nx, nw) = (xd.iter().product::<usize>(), wd.iter().product::<usize>());
        let fan = (wd[1] * wd[2] * wd[3]) as f32;
        let (x, w, b) = (
            rand(nx, 70 + i as u64, 1.0),
            rand(nw, 80 + i as u64, 1.0 / fan.sqrt()),
            rand(wd[0], 90 + i as u64, 0.5),
        );
        let ho = (xd[2] + 2 * p - wd[2]) / s + 1;
        let od = [xd[0], wd[0], ho, ho];
        let r = rand(od.iter().product(), 95, 1.0);
        let c = conv::conv2d(
            &cpu_t(&x, xd),
            &cpu_t(&w, wd),
            Some(&cpu_t(&b, &[wd[0]])),
            Conv2dArgs {
                stride: *s,
                padding: *p,
            },
            res.then(|| cpu_t(&r, &od)).as_ref(),
            Act::Relu,
        )
        .unwrap();
        let wg = dev.upload(&w).unwrap();
        let w16 = sam_unet::ops::activation::cuda::to_bf16(&dev, &wg).unwrap();
        // f32 (true f32 GEMMs), then bf16 GEMM inputs with f32 accumulation.
        for bf16 in [false, true] {
            let g = conv::cuda::conv2d(
                &dev,
                &blas,
                &gpu_t(&dev, &x, xd),
                if bf16 {
                    conv::cuda::ConvWeight::BF16(&w16)
                } else {
                    conv::cuda::ConvWeight::F32(&wg)
                },
                Some(&dev.upload(&b).unwrap()),
                wd[0],
                wd[2],
                wd[3],
                *s,
                *p,
                res.then(|| gpu_t(&dev, &r, &od))
                    .as_ref()
                    .map(|r| r as &dyn sam_unet::cuda::GpuIn),
                Act::Relu,
            )
            .unwrap();
            let got = dev.download(&g.data).unwrap();
            let what = format!("conv2d {xd:?} * {wd:?} s{s} p{p} residual {res} bf16 {bf16}");
            if bf16 {
                let rel = rel_l2(&got, c.as_f32().unwrap());
                println!("{what}: relative L2 {rel:.2e}");
                assert!(rel < 1e-2, "{what}: relative L2 {rel}");
            } else {
                assert_close(&what, &got, c.as_f32().unwrap(), 1e-4, 1e-4);
            }
        }
    }
}

fn cuda_conv_transpose2d_and_pool_match_cpu() {
    use sam_unet::ops::conv;
    let dev = device().expect("a GPU was found at start");
    let blas = sam_unet::cuda::blas::Blas::new(dev.stream()).unwrap();
    for (i, (xd, wd)) in [
        ([1usize, 768, 16, 16], [768usize, 256, 2, 2]),
        ([16, 64, 32, 32], [64, 32, 2, 2]),
    ]
    .iter()
    .enumerate()
    {
        let (x, w, b) = (
            rand(xd.iter().product(), 100 + i as u64, 1.0),
            rand(wd.iter().product(), 110 + i as u64, 0.05),
            rand(wd[1], 120, 0.5),
        );
        let c = conv::conv_transpose2d(
            &cpu_t(&x, xd),
            &cpu_t(&w, wd),
            Some(&cpu_t(&b, &[wd[1]])),
            Act::Gelu,
        )
        .unwrap();
        let wg = dev.upload(&w).unwrap();
        let w16 = sam_unet::ops::activation::cuda::to_bf16(&dev, &wg).unwrap();
        for bf16 in [false, true] {
            let g = conv::cuda::conv_transpose2d(
                &dev,
                &blas,
                &gpu_t(&dev, &x, xd),
                if bf16 {
                    conv::cuda::ConvWeight::BF16(&w16)
                } else {
                    conv::cuda::ConvWeight::F32(&wg)
                },
                Some(&dev.upload(&b).unwrap()),
                wd[1],
                2,
                Act::Gelu,
            )
            .unwrap();
            let got = dev.download(&g.data).unwrap();
            let what = format!("conv_transpose2d {xd:?} * {wd:?} bf16 {bf16}");
            if bf16 {
                let rel = rel_l2(&got, c.as_f32().unwrap());
                println!("{what}: relative L2 {rel:.2e}");
                assert!(rel < 1e-2, "{what}: relative L2 {rel}");
            } else {
                assert_close(&what, &got, c.as_f32().unwrap(), 1e-4, 1e-4);
            }
        }
    }
    let dims = [1usize, 64, 128, 128];
    let x = rand(dims.iter().product(), 130, 2.0);
    let g = conv::cuda::max_pool2d(&dev, &gpu_t(&dev, &x, &dims), 3, 2, 1).unwrap();
    let c = conv::max_pool2d(&cpu_t(&x, &dims), 3, 2, 1).unwrap();
    assert_close(
        "max_pool2d",
        &dev.download(&g.data).unwrap(),
        c.as_f32().unwrap(),
        0.0,
        0.0,
    );
}

fn cuda_layout_matches_cpu() {
    use sam_unet::ops::layout;
    let dev = device().expect("a GPU was found at start");
    let dims = [2usize, 768, 16, 16];
    let x = rand(dims.iter().product(), 140, 1.0);
    let g = layout::cuda::nchw_to_nhwc(&dev, &gpu_t(&dev, &x, &dims)).unwrap();
    let c = layout::nchw_to_nhwc(&cpu_t(&x, &dims)).unwrap();
    assert_close(
        "nchw_to_nhwc",
        &dev.download(&g.data).unwrap(),
        c.as_f32().unwrap(),
        0.0,
        0.0,
    );
    let back = layout::cuda::nhwc_to_nchw(&dev, &g).unwrap();
    assert_close(
        "nhwc_to_nchw",
        &dev.download(&back.data).unwrap(),
        &x,
        0.0,
        0.0,
    );
}

fn cuda_decoder_attention_matches_cpu() {
    use sam_unet::ops::attention;
    let dev = device().expect("a GPU was found at start");
    // self (3 tokens, width 256), token-to-image (3 vs 256, width 128), image-to-token.
    for (n, lq, lk, i) in [
        (16usize, 3usize, 3usize, 256usize),
        (16, 3, 256, 128),
        (16, 256, 3, 128),
    ] {
        let (q, k, v) = (
            rand(n * lq * i, 150, 2.0),
            rand(n * lk * i, 151, 2.0),
            rand(n * lk * i, 152, 1.0),
        );
        let g = attention::cuda::mha(
            &dev,
            &gpu_t(&dev, &q, &[n, lq, i]),
            &gpu_t(&dev, &k, &[n, lk, i]),
            &gpu_t(&dev, &v, &[n, lk, i]),
            8,
        )
        .unwrap();
        let c = attention::attention(
            &cpu_t(&q, &[n, lq, i]),
            &cpu_t(&k, &[n, lk, i]),
            &cpu_t(&v, &[n, lk, i]),
            8,
        )
        .unwrap();
        assert_close(
            &format!("attention q {lq} k {lk} width {i}"),
            &dev.download(&g.data).unwrap(),
            c.as_f32().unwrap(),
            1e-5,
            1e-4,
        );
    }
}

fn cuda_postprocess_box_tokens_repeat_match_cpu() {
    let dev = device().expect("a GPU was found at start");
    // 16 boxes' low-res logits to a 512 x 342 image (resized to 256 x 171):
    // bit-exact with the CPU (every rounding in the same order, no FMA).
    let (n, g) = (16usize, 64usize);
    let low = rand(n * g * g, 170, 20.0);
    let info = sam_unet::preprocess::ResizeInfo {
        orig_h: 512,
        orig_w: 342,
        new_h: 256,
        new_w: 171,
        size: 256,
    };
    let got = sam_unet::ops::resize::cuda::postprocess(
        &dev,
        &gpu_t(&dev, &low, &[n, 1, g, g]),
        &info,
        256,
    )
    .unwrap();
    let want =
        sam_unet::model::sam_unet::postprocess(&cpu_t(&low, &[n, 1, g, g]), &info, 256).unwrap();
    assert_close(
        "postprocess",
        &dev.download(&got.data).unwrap(),
        want.as_f32().unwrap(),
        0.0,
        0.0,
    );
    // Box tokens for 32 boxes against the CPU encoder (sin / cos ulps apart).
    let c = 256usize;
    let gauss = rand(c, 180, 1.7);
    let (med, e0, e1) = (rand(c, 181, 1.0), rand(c, 182, 1.0), rand(c, 183, 1.0));
    let boxes: Vec<[f32; 4]> = (0..32)
        .map(|i| {
            let v = rand(4, 200 + i, 128.0);
            [v[0] + 128.0, v[1] + 128.0, v[2] + 128.0, v[3] + 128.0]
        })
        .collect();
    let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
    let up = |v: &[f32]| dev.upload(v).unwrap();
    let tok = sam_unet::ops::prompt::cuda::box_tokens(
        &dev,
        &up(&flat),
        &up(&gauss),
        (&up(&e0), &up(&e1)),
        Some(&up(&med)),
        256,
    )
    .unwrap();
    let sparse = sam_unet::ops::prompt::embed_boxes(&boxes, &gauss, &e0, &e1, 256);
    let want: Vec<f32> = (0..boxes.len())
        .flat_map(|i| {
            med.iter()
                .chain(&sparse[i * 2 * c..(i + 1) * 2 * c])
                .copied()
                .collect::<Vec<_>>()
        })
        .collect();
    assert_close(
        "box_tokens",
        &dev.download(&tok).unwrap(),
        &want,
        1e-6,
        1e-5,
    );
    let x = rand(256 * 256, 190, 1.0);
    let r = sam_unet::ops::layout::cuda::repeat(&dev, &up(&x), 4, vec![4, 256, 256]).unwrap();
    let want: Vec<f32> = (0..4).flat_map(|_| x.iter().copied()).collect();
    assert_close("repeat", &dev.download(&r.data).unwrap(), &want, 0.0, 0.0);
}

fn cuda_rel_pos_attention_tensor_cores_match_cpu() {
    let dev = device().expect("a GPU was found at start");
    // ViT-B, 12 heads, batch 2: bf16 tensor-core kernel against the f32 CPU
    // twin; qkv without its bias (the kernel adds it) and with it.
    let (b, g, heads, d) = (2usize, 16usize, 12usize, 768usize);
    let qkv = rand(b * g * g * 3 * d, 6, 2.0);
    let bias = rand(3 * d, 7, 1.0);
    let unbiased: Vec<f32> = qkv
        .iter()
        .enumerate()
        .map(|(i, v)| v - bias[i % (3 * d)])
        .collect();
    for (window, biased) in [(14usize, false), (0, false), (14, true)] {
        let s = if window == 0 { g } else { window };
        let rh = rand((2 * s - 1) * 64, 8, 0.5);
        let rw = rand((2 * s - 1) * 64, 9, 0.5);
        let src = if biased { &qkv } else { &unbiased };
        let out = sam_unet::ops::attention::cuda::rel_pos_attention_tc_bf16(
            &dev,
            &dev.upload(src).unwrap(),
            &dev.upload(&bias).unwrap(),
            &dev.upload(&rh).unwrap(),
            &dev.upload(&rw).unwrap(),
            b,
            g,
            d,
            heads,
            window,
            biased,
        )
        .unwrap();
        let got: Vec<f32> = dev
            .stream()
            .clone_dtoh(&out)
            .unwrap()
            .into_iter()
            .map(|v| v.to_f32())
            .collect();
        let t = |v: &Vec<f32>, dims: Vec<usize>| Tensor::from_vec(v.clone(), dims).unwrap();
        let cpu = sam_unet::ops::attention::rel_pos_attention(
            &t(&qkv, vec![b, g, g, 3 * d]),
            &t(&bias, vec![3 * d]),
            &t(&rh, vec![2 * s - 1, 64]),
            &t(&rw, vec![2 * s - 1, 64]),
            heads,
            window,
        )
        .unwrap();
        let rel = rel_l2(&got, cpu.as_f32().unwrap());
        println!(
            "rel_pos_attention tensor cores window {window} biased {biased}: relative L2 {rel:.2e}"
        );
        assert!(rel < 5e-3, "relative L2 {rel}");
        assert_close(
            &format!("rel_pos_attention_tc window {window}"),
            &got,
            cpu.as_f32().unwrap(),
            3e-2,
            3e-2,
        );
    }
}

fn cuda_graph_capture_failure_leaves_stream_usable() {
    // A host copy cannot be captured: the recording fails with an error, and
    // the stream must come out of capture mode, so that the predictor's eager
    // fallback works. Then a capture that succeeds replays correctly.
    let dev = device().expect("a GPU was found at start");
    let x = rand(4096, 300, 3.0);
    let xd = dev.upload(&x).unwrap();
    let r = sam_unet::cuda::graph::record(&dev, || {
        let _ = dev.upload(&[1.0f32; 16])?;
        Ok(())
    });
    println!("capture with a host copy: {:?}", r.as_ref().err());
    assert!(
        r.is_err(),
        "a capture with a pageable host copy was accepted"
    );
    let y = activation::cuda::act(&dev, &xd, Act::Relu).unwrap();
    let want: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
    assert_close(
        "relu after a failed capture",
        &dev.download(&y).unwrap(),
        &want,
        0.0,
        0.0,
    );
    let mut out = dev.alloc_zeros(4096).unwrap();
    let g = sam_unet::cuda::graph::record(&dev, || {
        let t = activation::cuda::act(&dev, &xd, Act::Gelu)?;
        dev.stream()
            .memcpy_dtod(&t, &mut out)
            .map_err(|e| sam_unet::Error::CudaUnavailable(e.to_string()))?;
        Ok(())
    })
    .unwrap();
    g.launch().unwrap();
    let want = activation::act(&Tensor::from_vec(x.clone(), [4096]).unwrap(), Act::Gelu).unwrap();
    assert_close(
        "gelu replayed from a graph",
        &dev.download(&out).unwrap(),
        want.as_f32().unwrap(),
        1e-6,
        1e-5,
    );
}

/// The Adam launcher on device buffers (a view in the middle of a flat
/// moment buffer, as a parameter store lays them out) against the CPU twin,
/// bit for bit, two steps with the scalars read from device memory.
fn cuda_adam_matches_cpu() {
    use sam_unet::ops::optim::{AdamStep, adam_cpu, cuda::adam};
    let dev = device().expect("a GPU was found at start");
    let n = 1000;
    let mut p = rand(n, 400, 0.5);
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut pg = dev.upload(&p).unwrap();
    // Moments of three parameters of n values; this one is the middle slot.
    let mut mg = dev.upload(&vec![0.0f32; 3 * n]).unwrap();
    let mut vg = dev.upload(&vec![0.0f32; 3 * n]).unwrap();
    for t in 1..=2 {
        let g = rand(n, 400 + t, 1e-2);
        let st = AdamStep::new(1e-4, 0.9, 0.999, 1e-8, t);
        adam_cpu(&mut p, &g, &mut m, &mut v, &st).unwrap();
        let (gg, hg) = (dev.upload(&g).unwrap(), dev.upload(&st.to_array()).unwrap());
        adam(
            &dev,
            &mut pg.slice_mut(..),
            &gg.slice(..),
            &mut mg.slice_mut(n..2 * n),
            &mut vg.slice_mut(n..2 * n),
            &hg,
        )
        .unwrap();
    }
    let got = dev.download(&pg).unwrap();
    assert!(
        got.iter().zip(&p).all(|(a, b)| a.to_bits() == b.to_bits()),
        "parameters"
    );
    let mh = dev.download(&mg).unwrap();
    assert!(
        mh[n..2 * n]
            .iter()
            .zip(&m)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "first moments"
    );
    assert!(
        mh[..n].iter().chain(&mh[2 * n..]).all(|&x| x == 0.0),
        "other slots untouched"
    );
    // A wrong length is a typed error.
    let short = dev.upload(&vec![0.0f32; n - 1]).unwrap();
    let h = dev
        .upload(&AdamStep::new(1e-4, 0.9, 0.999, 1e-8, 1).to_array())
        .unwrap();
    assert!(
        adam(
            &dev,
            &mut pg.slice_mut(..),
            &short.slice(..),
            &mut mg.slice_mut(..n),
            &mut vg.slice_mut(..n),
            &h
        )
        .is_err()
    );
}

/// The tape on the device: linear (GELU epilogue, bias, residual), a
/// broadcast add, LayerNorm and LayerNorm2d recorded on CUDA tensors,
/// back-propagated there (cuBLAS dX / dW, the deterministic row sums, the
/// activation and LayerNorm backward kernels) against the same recording on
/// the CPU.
fn cuda_backward_matches_cpu() {
    use sam_unet::autograd::Recording;
    use sam_unet::ops::linear::linear_fused;
    let _dev = device().expect("a GPU was found at start");
    let cuda = sam_unet::Device::Cuda(0);
    let t = |d: &[usize], seed: u64, scale: f32| {
        Tensor::from_vec(rand(d.iter().product(), seed, scale), d.to_vec()).unwrap()
    };
    let ins = [
        t(&[2, 3, 40], 500, 1.0),
        t(&[24, 40], 501, 0.2),
        t(&[24], 502, 0.5),
        t(&[2, 3, 24], 503, 1.0),
        t(&[1, 3, 24], 504, 1.0),
        t(&[24], 506, 1.0),
        t(&[24], 507, 1.0),
        t(&[24], 508, 1.0),
        t(&[24], 509, 1.0),
    ];
    let run = |dev: sam_unet::Device| -> Vec<(String, Vec<f32>)> {
        let rec = Recording::start().unwrap();
        let mut xs: Vec<Tensor> = ins.iter().map(|x| x.to_device(dev).unwrap()).collect();
        for (i, x) in xs.iter_mut().enumerate() {
            rec.param(x, format!("in{i}")).unwrap();
        }
        let y = linear_fused(&xs[0], &xs[1], Some(&xs[2]), Some(&xs[3]), Act::Gelu).unwrap();
        let y = activation::add_broadcast(&y, &xs[4]).unwrap();
        // LayerNorm over the last dim, then LayerNorm2d on the values seen as
        // [2, 24, 3, 1] maps (so that it does not cancel the first's bias).
        let y = norm::layer_norm(&y, &xs[5], &xs[6], 1e-6).unwrap();
        let y = norm::layer_norm2d(
            &y.reshape([2, 24, 3, 1]).unwrap(),
            &xs[7],
            &xs[8],
            1e-6,
            Act::Gelu,
        )
        .unwrap();
        let g = t(y.dims(), 505, 1.0).to_device(dev).unwrap();
        rec.backward(&y, &g)
            .unwrap()
            .into_iter()
            .map(|(n, g)| (n, g.to_host().unwrap().as_f32().unwrap().to_vec()))
            .collect()
    };
    let (want, got) = (run(sam_unet::Device::Cpu), run(cuda));
    assert_eq!(want.len(), 9);
    for ((n, w), (n2, g)) in want.iter().zip(&got) {
        assert_eq!(n, n2);
        let rel = rel_l2(g, w);
        println!("backward on CUDA, d/d {n}: relative L2 vs CPU {rel:.2e}");
        if rel > 1e-5 {
            println!(
                "  cpu {:?}\n  cuda {:?}",
                &w[..w.len().min(6)],
                &g[..g.len().min(6)]
            );
        }
        assert!(rel <= 1e-5, "d/d {n}: relative L2 {rel}");
    }
}

/// The loss on CUDA tensors (sums on the device, gradient in backward)
/// against the CPU op: terms to 1e-6, gradient to 1e-5 relative L2; labels
/// other than 0 / 1 are refused on the device too.
fn cuda_loss_matches_cpu() {
    use sam_unet::autograd::Recording;
    use sam_unet::ops::loss::focal_dice;
    let _dev = device().expect("a GPU was found at start");
    let cuda = sam_unet::Device::Cuda(0);
    let dims = [2usize, 1, 64, 64];
    let n: usize = dims.iter().product();
    let x = Tensor::from_vec(rand(n, 520, 6.0), dims).unwrap();
    let y = Tensor::from_vec((0..n).map(|i| ((i / 50) % 2) as f32).collect(), dims).unwrap();
    let run = |dev: sam_unet::Device| {
        let rec = Recording::start().unwrap();
        let mut xd = x.to_device(dev).unwrap();
        rec.param(&mut xd, "x").unwrap();
        let (loss, terms) = focal_dice(&xd, &y.to_device(dev).unwrap(), 20.0).unwrap();
        let one = Tensor::from_vec(vec![1.0], [1])
            .unwrap()
            .to_device(dev)
            .unwrap();
        let g = rec.backward(&loss, &one).unwrap();
        (terms, g[0].1.to_host().unwrap().as_f32().unwrap().to_vec())
    };
    let ((tc, gc), (tg, gg)) = (run(sam_unet::Device::Cpu), run(cuda));
    for (what, a, b) in [
        ("loss", tg.loss, tc.loss),
        ("focal", tg.focal, tc.focal),
        ("dice", tg.dice, tc.dice),
    ] {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs(),
            "{what}: cuda {a} vs cpu {b}"
        );
    }
    let rel = rel_l2(&gg, &gc);
    println!(
        "loss on CUDA: loss {:.6} (cpu {:.6}), gradient relative L2 {rel:.2e}",
        tg.loss, tc.loss
    );
    assert!(rel <= 1e-5, "loss gradient: relative L2 {rel}");
    let bad = Tensor::from_vec(vec![0.5; n], dims)
        .unwrap()
        .to_device(cuda)
        .unwrap();
    assert!(focal_dice(&x.to_device(cuda).unwrap(), &bad, 20.0).is_err());
}

/// The decoder end of the tape on CUDA: the med-token row (narrow), the mask
/// product, the 4 -> 16 upsample and the loss, back-propagated on the device
/// against the CPU.
fn cuda_decoder_backward_matches_cpu() {
    use sam_unet::autograd::Recording;
    use sam_unet::ops::{layout, linear, loss, resize};
    let _dev = device().expect("a GPU was found at start");
    let t = |d: &[usize], seed: u64, scale: f32| {
        Tensor::from_vec(rand(d.iter().product(), seed, scale), d.to_vec()).unwrap()
    };
    let ins = [
        t(&[3, 3, 8], 530, 1.0),
        t(&[3, 8, 4, 4], 531, 1.0),
        t(&[1, 8, 4, 4], 532, 1.0),
    ];
    let labels = Tensor::from_vec(
        (0..3 * 256).map(|i| ((i / 9) % 2) as f32).collect(),
        [3, 1, 16, 16],
    )
    .unwrap();
    let run = |dev: sam_unet::Device| -> Vec<(String, Vec<f32>)> {
        let rec = Recording::start().unwrap();
        let mut xs: Vec<Tensor> = ins.iter().map(|x| x.to_device(dev).unwrap()).collect();
        for (i, x) in xs.iter_mut().enumerate() {
            rec.param(x, format!("in{i}")).unwrap();
        }
        let h = layout::narrow(&xs[0], 0, 1)
            .unwrap()
            .reshape([3, 8])
            .unwrap();
        let low = linear::mask_dot(&h, &xs[1], &xs[2]).unwrap();
        let up = resize::bilinear(&low, 16, 16).unwrap();
        let (l, _) = loss::focal_dice(&up, &labels.to_device(dev).unwrap(), 20.0).unwrap();
        let one = Tensor::from_vec(vec![1.0], [1])
            .unwrap()
            .to_device(dev)
            .unwrap();
        rec.backward(&l, &one)
            .unwrap()
            .into_iter()
            .map(|(n, g)| (n, g.to_host().unwrap().as_f32().unwrap().to_vec()))
            .collect()
    };
    let (want, got) = (run(sam_unet::Device::Cpu), run(sam_unet::Device::Cuda(0)));
    assert_eq!(want.len(), 3);
    for ((n, w), (_, g)) in want.iter().zip(&got) {
        let rel = rel_l2(g, w);
        println!("decoder backward on CUDA, d/d {n}: relative L2 vs CPU {rel:.2e}");
        assert!(rel <= 1e-5, "d/d {n}: relative L2 {rel}");
    }
}

/// conv2d's backward on CUDA (im2col + cuBLAS for dW, cuBLAS + col2im for dX,
/// row sums for the bias) against the CPU tape, in the ResNet's geometries,
/// with a residual and ReLU / GELU epilogues.
fn cuda_conv_backward_matches_cpu() {
    use sam_unet::autograd::Recording;
    use sam_unet::ops::conv::{Conv2dArgs, conv2d};
    let _dev = device().expect("a GPU was found at start");
    let t = |d: &[usize], seed: u64, scale: f32| {
        Tensor::from_vec(rand(d.iter().product(), seed, scale), d.to_vec()).unwrap()
    };
    for (k, stride, padding, act) in [
        (3usize, 1usize, 1usize, Act::Gelu),
        (3, 2, 1, Act::Relu),
        (7, 2, 3, Act::None),
        (1, 2, 0, Act::None),
    ] {
        let ho = (10 + 2 * padding - k) / stride + 1;
        let ins = [
            t(&[2, 3, 10, 10], 540, 1.0),
            t(&[4, 3, k, k], 541, 0.3),
            t(&[4], 542, 0.5),
            t(&[2, 4, ho, ho], 543, 1.0),
        ];
        let run = |dev: sam_unet::Device| -> Vec<(String, Vec<f32>)> {
            let rec = Recording::start().unwrap();
            let mut xs: Vec<Tensor> = ins.iter().map(|x| x.to_device(dev).unwrap()).collect();
            for (i, x) in xs.iter_mut().enumerate() {
                rec.param(x, format!("in{i}")).unwrap();
            }
            let y = conv2d(
                &xs[0],
                &xs[1],
                Some(&xs[2]),
                Conv2dArgs { stride, padding },
                Some(&xs[3]),
                act,
            )
            .unwrap();
            let g = t(y.dims(), 544, 1.0).to_device(dev).unwrap();
            rec.backward(&y, &g)
                .unwrap()
                .into_iter()
                .map(|(n, g)| (n, g.to_host().unwrap().as_f32().unwrap().to_vec()))
                .collect()
        };
        let (want, got) = (run(sam_unet::Device::Cpu), run(sam_unet::Device::Cuda(0)));
        assert_eq!(want.len(), 4);
        for ((n, w), (_, g)) in want.iter().zip(&got) {
            let rel = rel_l2(g, w);
            println!(
                "conv2d k{k} s{stride} p{padding} {act:?} backward on CUDA, d/d {n}: relative L2 vs CPU {rel:.2e}"
            );
            assert!(rel <= 1e-5, "d/d {n}: relative L2 {rel}");
        }
    }
}

/// conv_transpose2d (2 x 2, stride 2, GELU) and max_pool2d backward on CUDA
/// against the CPU tape.
fn cuda_convt_pool_backward_matches_cpu() {
    use sam_unet::autograd::Recording;
    use sam_unet::ops::conv::{conv_transpose2d, max_pool2d};
    let _dev = device().expect("a GPU was found at start");
    let t = |d: &[usize], seed: u64, scale: f32| {
        Tensor::from_vec(rand(d.iter().product(), seed, scale), d.to_vec()).unwrap()
    };
    let ins = [
        t(&[2, 4, 5, 6], 550, 1.0),
        t(&[4, 3, 2, 2], 551, 0.3),
        t(&[3], 552, 0.5),
    ];
    let run = |dev: sam_unet::Device| -> Vec<(String, Vec<f32>)> {
        let rec = Recording::start().unwrap();
        let mut xs: Vec<Tensor> = ins.iter().map(|x| x.to_device(dev).unwrap()).collect();
        for (i, x) in xs.iter_mut().enumerate() {
            rec.param(x, format!("in{i}")).unwrap();
        }
        let y = conv_transpose2d(&xs[0], &xs[1], Some(&xs[2]), Act::Gelu).unwrap();
        let y = max_pool2d(&y, 3, 2, 1).unwrap();
        let g = t(y.dims(), 553, 1.0).to_device(dev).unwrap();
        rec.backward(&y, &g)
            .unwrap()
            .into_iter()
            .map(|(n, g)| (n, g.to_host().unwrap().as_f32().unwrap().to_vec()))
            .collect()
    };
    let (want, got) = (run(sam_unet::Device::Cpu), run(sam_unet::Device::Cuda(0)));
    assert_eq!(want.len(), 3);
    for ((n, w), (_, g)) in want.iter().zip(&got) {
        let rel = rel_l2(g, w);
        println!("convT + max pool backward on CUDA, d/d {n}: relative L2 vs CPU {rel:.2e}");
        assert!(rel <= 1e-5, "d/d {n}: relative L2 {rel}");
    }
}

/// The gradient norm's sum of squares on CUDA (ranges of a flat buffer, the
/// chunk sums brought to the host) against the CPU, bit for bit.
fn cuda_sum_squares_matches_cpu() {
    use sam_unet::ops::reduce::sum_squares;
    let _dev = device().expect("a GPU was found at start");
    let n = 70_000;
    let x = Tensor::from_vec(rand(n, 570, 1.0), [n]).unwrap();
    let xd = x.to_device(sam_unet::Device::Cuda(0)).unwrap();
    for ranges in [
        vec![(0, n)],
        vec![(3, 900), (900, 66_000), (69_000, n)],
        vec![],
    ] {
        let (a, b) = (
            sum_squares(&x, &ranges).unwrap(),
            sum_squares(&xd, &ranges).unwrap(),
        );
        assert_eq!(a.to_bits(), b.to_bits(), "{ranges:?}: {a} vs {b}");
    }
    assert!(sum_squares(&xd, &[(5, n + 1)]).is_err());
}

/// Train-mode BatchNorm on CUDA (statistics, output, running statistics of
/// the module, backward) against the CPU: a ResNet ConvBn block with a
/// residual and ReLU (the fused op), recorded and back-propagated on each
/// device, the residual's gradient included.
fn cuda_batch_norm_train_matches_cpu() {
    use sam_unet::autograd::Recording;
    use sam_unet::nn::ConvBn;
    let _dev = device().expect("a GPU was found at start");
    let mut w = sam_unet::io::Weights::new();
    let t = |d: &[usize], seed: u64, scale: f32, off: f32| {
        Tensor::from_vec(
            rand(d.iter().product(), seed, scale)
                .into_iter()
                .map(|v| v + off)
                .collect(),
            d.to_vec(),
        )
        .unwrap()
    };
    w.insert("c.weight", t(&[6, 4, 3, 3], 560, 0.3, 0.0));
    w.insert("bn.weight", t(&[6], 561, 0.3, 1.0));
    w.insert("bn.bias", t(&[6], 562, 0.3, 0.0));
    w.insert("bn.running_mean", t(&[6], 563, 0.1, 0.0));
    w.insert("bn.running_var", t(&[6], 564, 0.1, 1.0));
    let x = t(&[2, 4, 7, 7], 565, 1.0, 0.0);
    let r = t(&[2, 6, 7, 7], 566, 1.0, 0.0);
    let run = |dev: sam_unet::Device| {
        let mut m = ConvBn::load(&w, "c", "bn", 1, 1, false).unwrap();
        sam_unet::nn::to_device(&mut m, dev).unwrap();
        let rec = Recording::start().unwrap();
        let mut xd = x.to_device(dev).unwrap();
        rec.param(&mut xd, "x").unwrap();
        rec.param(&mut m.conv.weight, "w").unwrap();
        let bn = m.bn.as_mut().unwrap();
        rec.param(&mut bn.weight, "gamma").unwrap();
        rec.param(&mut bn.bias, "beta").unwrap();
        let mut rd = r.to_device(dev).unwrap();
        rec.param(&mut rd, "residual").unwrap();
        // The fused BatchNorm + residual + ReLU (one node, one kernel).
        let y = m.forward_residual(&xd, &rd, Act::Relu).unwrap();
        let g = t(y.dims(), 567, 1.0, 0.0).to_device(dev).unwrap();
        let grads: Vec<(String, Vec<f32>)> = rec
            .backward(&y, &g)
            .unwrap()
            .into_iter()
            .map(|(n, g)| (n, g.to_host().unwrap().as_f32().unwrap().to_vec()))
            .collect();
        let (rm, rv, nb) = m.bn.as_ref().unwrap().running_stats();
        let y = y.to_host().unwrap().as_f32().unwrap().to_vec();
        let rm = rm.to_host().unwrap().as_f32().unwrap().to_vec();
        let rv = rv.to_host().unwrap().as_f32().unwrap().to_vec();
        (y, grads, rm, rv, nb)
    };
    let (want, got) = (run(sam_unet::Device::Cpu), run(sam_unet::Device::Cuda(0)));
    assert_eq!(
        want.1.len(),
        5,
        "x, w, gamma, beta and the residual get gradients"
    );
    assert_eq!(got.1.len(), 5);
    assert_close("ConvBn output", &got.0, &want.0, 1e-5, 1e-5);
    assert_close("running mean", &got.2, &want.2, 1e-6, 1e-6);
    assert_close("running var", &got.3, &want.3, 1e-6, 1e-6);
    assert_eq!(got.4, want.4);
    for ((n, w), (_, g)) in want.1.iter().zip(&got.1) {
        let rel = rel_l2(g, w);
        println!("ConvBn backward on CUDA, d/d {n}: relative L2 vs CPU {rel:.2e}");
        assert!(rel <= 1e-5, "d/d {n}: relative L2 {rel}");
    }
}

/// SyncBatchNorm on CUDA: two ranks (threads and the in-process
/// collective), rank 0 on the CUDA device with image 0 and rank 1 on the CPU
/// with image 1, through the fused ConvBn + residual + ReLU and back, equal
/// the CPU's one batch of both images: outputs and input gradients per
/// image, the weights' gradients summed over the ranks, and the same running
/// statistics on both ranks.
fn cuda_sync_batch_norm_matches_one_batch() {
    use sam_unet::autograd::Recording;
    use sam_unet::dist::{Collective, InProcess};
    use sam_unet::nn::ConvBn;
    use sam_unet::ops::norm::SyncBatchNorm;
    use std::sync::Arc;
    let _dev = device().expect("a GPU was found at start");
    let mut w = sam_unet::io::Weights::new();
    let t = |d: &[usize], seed: u64, scale: f32, off: f32| {
        Tensor::from_vec(
            rand(d.iter().product(), seed, scale)
                .into_iter()
                .map(|v| v + off)
                .collect(),
            d.to_vec(),
        )
        .unwrap()
    };
    w.insert("c.weight", t(&[6, 4, 3, 3], 580, 0.3, 0.0));
    w.insert("bn.weight", t(&[6], 581, 0.3, 1.0));
    w.insert("bn.bias", t(&[6], 582, 0.3, 0.0));
    w.insert("bn.running_mean", t(&[6], 583, 0.1, 0.0));
    w.insert("bn.running_var", t(&[6], 584, 0.1, 1.0));
    // Image 1 brighter than image 0: the ranks' statistics differ.
    let x = t(&[2, 4, 7, 7], 585, 1.0, 0.0);
    let xs = x.as_f32().unwrap();
    let x = Tensor::from_vec(
        xs.iter()
            .enumerate()
            .map(|(i, &v)| if i >= xs.len() / 2 { 2.0 * v + 0.5 } else { v })
            .collect(),
        [2, 4, 7, 7],
    )
    .unwrap();
    let r = t(&[2, 6, 7, 7], 586, 1.0, 0.0);
    let g = t(&[2, 6, 7, 7], 587, 1.0, 0.0);
    let half = |t: &Tensor, i: usize| {
        let v = t.as_f32().unwrap();
        let n = v.len() / 2;
        let mut d = t.dims().to_vec();
        d[0] = 1;
        Tensor::from_vec(v[i * n..(i + 1) * n].to_vec(), d).unwrap()
    };
    type Out = (Vec<f32>, Vec<(String, Vec<f32>)>, Vec<f32>, Vec<f32>);
    let run = |dev: sam_unet::Device, x: &Tensor, r: &Tensor, g: &Tensor| -> Out {
        let mut m = ConvBn::load(&w, "c", "bn", 1, 1, false).unwrap();
        sam_unet::nn::to_device(&mut m, dev).unwrap();
        let rec = Recording::start().unwrap();
        let mut xd = x.to_device(dev).unwrap();
        rec.param(&mut xd, "x").unwrap();
        rec.param(&mut m.conv.weight, "w").unwrap();
        let bn = m.bn.as_mut().unwrap();
        rec.param(&mut bn.weight, "gamma").unwrap();
        rec.param(&mut bn.bias, "beta").unwrap();
        let mut rd = r.to_device(dev).unwrap();
        rec.param(&mut rd, "residual").unwrap();
        let y = m.forward_residual(&xd, &rd, Act::Relu).unwrap();
        let grads = rec
            .backward(&y, &g.to_device(dev).unwrap())
            .unwrap()
            .into_iter()
            .map(|(n, g)| (n, g.to_host().unwrap().as_f32().unwrap().to_vec()))
            .collect();
        let (rm, rv, _) = m.bn.as_ref().unwrap().running_stats();
        let host = |t: Tensor| t.to_host().unwrap().as_f32().unwrap().to_vec();
        (host(y), grads, host(rm), host(rv))
    };
    let whole = run(sam_unet::Device::Cpu, &x, &r, &g);
    let group = InProcess::group(2, std::time::Duration::from_secs(600));
    let ranks: Vec<Out> = std::thread::scope(|s| {
        let hs: Vec<_> = group
            .into_iter()
            .map(|c| {
                let (run, half, x, r, g) = (&run, &half, &x, &r, &g);
                s.spawn(move || {
                    let i = c.rank();
                    let c: Arc<dyn Collective> = Arc::new(c);
                    let _sync = SyncBatchNorm::enter(c);
                    let dev = if i == 0 {
                        sam_unet::Device::Cuda(0)
                    } else {
                        sam_unet::Device::Cpu
                    };
                    run(dev, &half(x, i), &half(r, i), &half(g, i))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let cat = |f: &dyn Fn(&Out) -> Vec<f32>| [f(&ranks[0]), f(&ranks[1])].concat();
    assert_close(
        "synced output",
        &cat(&|o| o.0.clone()),
        &whole.0,
        1e-5,
        1e-5,
    );
    for (k, (n, want)) in whole.1.iter().enumerate() {
        let got = if n == "x" || n == "residual" {
            cat(&|o| o.1[k].1.clone())
        } else {
            // The weights' gradients: each rank's own, summed (DDP's reduce).
            ranks[0].1[k]
                .1
                .iter()
                .zip(&ranks[1].1[k].1)
                .map(|(a, b)| a + b)
                .collect()
        };
        assert_eq!(&ranks[0].1[k].0, n);
        let rel = rel_l2(&got, want);
        println!(
            "SyncBatchNorm (CUDA rank + CPU rank) d/d {n}: relative L2 vs one batch {rel:.2e}"
        );
        assert!(rel <= 1e-5, "d/d {n}: relative L2 {rel}");
    }
    for o in &ranks {
        assert_close("synced running mean", &o.2, &whole.2, 1e-6, 1e-6);
        assert_close("synced running var", &o.3, &whole.3, 1e-6, 1e-6);
    }
}

/// NCCL with one rank (NCCL refuses two ranks on one GPU): the id handed
/// over the TCP group, host and device all-reduces, and a data-parallel
/// training step (SyncBatchNorm, gradients summed by NCCL on the device)
/// against the same step of one process. Needs a real GPU and libnccl:
/// skipped on the emulator, a failure on a GPU without NCCL.
fn cuda_nccl_world_one_steps_like_one_process() {
    use sam_unet::dist::{Collective, Nccl, Tcp};
    use sam_unet::train::{Batch, TrainConfig, Trainer};
    use std::sync::Arc;
    if EMULATED.load(std::sync::atomic::Ordering::Relaxed) {
        println!("NCCL needs a real GPU: not run on the emulator");
        return;
    }
    let tcp = Tcp::connect(0, 1, "127.0.0.1:0", std::time::Duration::from_secs(30)).unwrap();
    let dev = sam_unet::cuda::shared_device(0).unwrap();
    let nccl: Arc<dyn Collective> = Arc::new(Nccl::new(dev, Box::new(tcp)).unwrap());
    let mut x = vec![1.5f32, -2.0, 3.25];
    nccl.all_reduce_sum(&mut x).unwrap();
    assert_eq!(x, [1.5, -2.0, 3.25]);
    let mut y = [0.1f64, 7.0];
    nccl.all_reduce_sum_f64(&mut y).unwrap();
    assert_eq!(y, [0.1, 7.0]);
    let w = sam_unet::model::SamUnetConfig::named("sam-unet-small-18")
        .unwrap()
        .random_weights(4);
    let s = 256;
    let batch = || Batch {
        images: Tensor::from_vec(rand(3 * s * s, 590, 1.0), [1, 3, s, s]).unwrap(),
        boxes: vec![vec![[30.0, 40.0, 150.0, 170.0]]],
        labels: vec![
            Tensor::from_vec(
                (0..s * s)
                    .map(|i| {
                        f32::from(u8::from(
                            (40..170).contains(&(i / s)) && (30..150).contains(&(i % s)),
                        ))
                    })
                    .collect(),
                [1, 1, s, s],
            )
            .unwrap(),
        ],
    };
    let dev = sam_unet::Device::Cuda(0);
    let mut one = Trainer::new(&w, dev, TrainConfig::default()).unwrap();
    let mut ranked = Trainer::new(&w, dev, TrainConfig::default()).unwrap();
    let a = one.step_accumulated(&[batch()]).unwrap();
    let b = ranked.step_distributed(&[batch()], &nccl, true).unwrap();
    let host = |t: &sam_unet::train::Trainer| {
        t.store()
            .values()
            .to_host()
            .unwrap()
            .as_f32()
            .unwrap()
            .to_vec()
    };
    let rel = rel_l2(&host(&ranked), &host(&one));
    println!(
        "NCCL, 1 rank: loss {} vs {}; parameters after the step: relative L2 {rel:.2e}",
        b.terms.loss, a.terms.loss
    );
    assert!((a.terms.loss - b.terms.loss).abs() <= 1e-6 * a.terms.loss.abs());
    assert!(rel <= 1e-6, "parameters after one step: relative L2 {rel}");
}

/// The decoder attention (keys and values shared by the boxes) and the box
/// prompt encoding, back-propagated on CUDA against the CPU tape.
fn cuda_attention_prompt_backward_matches_cpu() {
    use sam_unet::autograd::Recording;
    use sam_unet::ops::{attention, prompt};
    let _dev = device().expect("a GPU was found at start");
    let t = |d: &[usize], seed: u64, scale: f32| {
        Tensor::from_vec(rand(d.iter().product(), seed, scale), d.to_vec()).unwrap()
    };
    let boxes = Tensor::from_vec(
        vec![
            10.0, 20.0, 100.0, 90.0, 3.0, 4.0, 200.0, 250.0, 50.0, 60.0, 70.0, 80.0,
        ],
        [3, 4],
    )
    .unwrap();
    let gauss = t(&[2, 16], 570, 1.0);
    let ins = [
        t(&[1, 32], 571, 1.0),
        t(&[1, 32], 572, 1.0),
        t(&[1, 1, 32], 573, 1.0),
        t(&[1, 20, 32], 574, 1.0),
        t(&[1, 20, 32], 575, 1.0),
    ];
    let run = |dev: sam_unet::Device| -> Vec<(String, Vec<f32>)> {
        let rec = Recording::start().unwrap();
        let mut xs: Vec<Tensor> = ins.iter().map(|x| x.to_device(dev).unwrap()).collect();
        for (i, x) in xs.iter_mut().enumerate() {
            rec.param(x, format!("in{i}")).unwrap();
        }
        let (b, gs) = (boxes.to_device(dev).unwrap(), gauss.to_device(dev).unwrap());
        let tok = prompt::box_tokens(&b, &gs, (&xs[0], &xs[1]), Some(&xs[2]), 256).unwrap();
        let y = attention::attention(&tok, &xs[3], &xs[4], 2).unwrap();
        let g = t(y.dims(), 576, 1.0).to_device(dev).unwrap();
        rec.backward(&y, &g)
            .unwrap()
            .into_iter()
            .map(|(n, g)| (n, g.to_host().unwrap().as_f32().unwrap().to_vec()))
            .collect()
    };
    let (want, got) = (run(sam_unet::Device::Cpu), run(sam_unet::Device::Cuda(0)));
    assert_eq!(want.len(), 5);
    for ((n, w), (_, g)) in want.iter().zip(&got) {
        let rel = rel_l2(g, w);
        println!("attention + box_tokens backward on CUDA, d/d {n}: relative L2 vs CPU {rel:.2e}");
        assert!(rel <= 1e-5, "d/d {n}: relative L2 {rel}");
    }
}

/// Two streams of one device: the emulator's stream-order check
/// (cuda/host/fake_driver.cpp) fails a copy or a kernel that touches memory
/// another stream wrote with nothing ordering the two, and lets it run once
/// an event (`CudaDevice::order`) or a host synchronisation orders them:
/// memory the main stream allocated and filled, copied out on the side
/// stream; a kernel on the main stream reading what the side stream wrote
/// (its accesses come from the checked build's hooks). On a GPU a race is
/// not detectable: there only the ordered calls run, and their values are
/// checked.
fn cuda_stream_order_is_checked() {
    let emulated = EMULATED.load(std::sync::atomic::Ordering::Relaxed);
    let dev = sam_unet::cuda::shared_device(0).unwrap();
    let (main, side) = (dev.stream().clone(), dev.side_stream().unwrap());
    let n = 3000;
    let v = rand(n, 600, 1.0);
    let cuda = sam_unet::Device::Cuda(0);
    let t = Tensor::from_vec(v.clone(), [n])
        .unwrap()
        .to_device(cuda)
        .unwrap();
    if emulated {
        let r = side.clone_dtoh(&t.cuda_f32("test").unwrap());
        assert!(
            r.is_err(),
            "the side stream read what the main stream wrote, unordered: no race reported"
        );
        println!("unordered copy on the side stream: refused ({:?})", r.err());
    }
    dev.order(&side, &main).unwrap();
    let back = side.clone_dtoh(&t.cuda_f32("test").unwrap()).unwrap();
    assert_eq!(back, v);

    let mut u = Tensor::from_vec(vec![0.0; n], [n])
        .unwrap()
        .to_device(cuda)
        .unwrap();
    dev.order(&side, &main).unwrap();
    let neg: Vec<f32> = v.iter().map(|x| -x).collect();
    side.memcpy_htod(&neg, &mut u.cuda_f32_mut("test").unwrap())
        .unwrap();
    if emulated {
        let r = activation::relu(&u);
        assert!(
            r.is_err(),
            "a kernel on the main stream read what the side stream wrote, unordered: no race reported"
        );
        println!("unordered kernel on the main stream: refused");
    }
    dev.order(&main, &side).unwrap();
    let want: Vec<f32> = neg.iter().map(|x| x.max(0.0)).collect();
    let r = activation::relu(&u).unwrap().to_host().unwrap();
    assert_eq!(r.as_f32().unwrap(), want.as_slice());

    // A host synchronisation orders too.
    dev.order(&side, &main).unwrap();
    side.memcpy_htod(&v, &mut u.cuda_f32_mut("test").unwrap())
        .unwrap();
    side.synchronize().unwrap();
    let want: Vec<f32> = v.iter().map(|x| x.max(0.0)).collect();
    let r = activation::relu(&u).unwrap().to_host().unwrap();
    assert_eq!(r.as_f32().unwrap(), want.as_slice());
    // Before the buffers the side stream touched are freed (on the main
    // stream).
    dev.order(&main, &side).unwrap();
}

/// Gradient buckets summed on the side stream while backward runs
/// (`train::reduce_on_side_stream`), one CUDA rank beside a CPU rank (a
/// thread of the in-process group): a backward that writes four slots' gradients
/// with kernels on the main stream, last slot first, buckets of at most 400
/// values. Every bucket is launched during backward; the flat gradients
/// after it are the two ranks' sums bit for bit (rank order, f32); the
/// gradient norm read right after (a kernel on the main stream) passes the
/// emulator's stream-order check, so the side stream's sums are ordered
/// before it.
fn cuda_gradient_buckets_on_side_stream() {
    use sam_unet::dist::{Collective, InProcess};
    use sam_unet::train::{ParamStore, reduce_on_side_stream};
    let cuda = sam_unet::Device::Cuda(0);
    let sizes = [300usize, 50, 700, 20];
    let params: Vec<(String, Tensor)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let v = rand(n, 610 + i as u64, 1.0);
            (format!("p{i}"), Tensor::from_vec(v, [n]).unwrap())
        })
        .collect();
    let mut store = ParamStore::new(&params, cuda).unwrap();
    let plan = store.buckets(400);
    assert_eq!(plan.len(), 3, "{plan:?}");
    // Rank 0's gradient of slot i: relu of its values on the device (a
    // kernel); rank 1's: the values themselves.
    let mine = |i: usize| -> Vec<f32> {
        let v = params[i].1.as_f32().unwrap();
        v.iter().map(|x| x.max(0.0)).collect()
    };
    let theirs = |i: usize| params[i].1.as_f32().unwrap().to_vec();
    let mut group = InProcess::group(2, std::time::Duration::from_secs(300));
    let cpu_rank = group.pop().unwrap();
    let cuda_rank = group.pop().unwrap();
    // The buckets complete last first (the slots arrive in reverse).
    let order: Vec<usize> = (0..plan.len()).rev().collect();
    let (buckets, early) = std::thread::scope(|s| {
        let (plan, order, store_ref) = (&plan, &order, &store);
        let spans: Vec<_> = plan.iter().map(|r| store_ref.span(r)).collect();
        s.spawn(move || {
            let flat: Vec<f32> = (0..sizes.len()).flat_map(theirs).collect();
            for &b in order {
                let mut x = flat[spans[b].clone()].to_vec();
                cpu_rank.all_reduce_sum(&mut x).unwrap();
            }
        });
        reduce_on_side_stream(
            &mut store,
            &cuda_rank,
            400,
            |sink: &mut sam_unet::train::GradSink<'_>| {
                for i in (0..sizes.len()).rev() {
                    let x = params[i].1.to_device(cuda)?;
                    sink(i, &format!("p{i}"), activation::relu(&x)?)?;
                }
                Ok(())
            },
            None,
        )
        .unwrap()
    });
    assert_eq!((buckets, early), (3, 3));
    let norm = store.grad_norm().unwrap();
    let got = store.grads().unwrap().to_host().unwrap();
    let want: Vec<f32> = (0..sizes.len())
        .flat_map(|i| {
            mine(i)
                .into_iter()
                .zip(theirs(i))
                .map(|(a, b)| a + b)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        got.as_f32().unwrap() == want.as_slice(),
        "the flat gradients are not the ranks' sums"
    );
    let want_norm = want
        .iter()
        .map(|&x| f64::from(x).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        (norm - want_norm).abs() <= 1e-9 * want_norm,
        "{norm} vs {want_norm}"
    );
    println!("3 buckets summed on the side stream during backward; norm {norm:.6}");
}
