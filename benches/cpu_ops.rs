//! criterion benchmarks of the main CPU ops at SAM-UNet-50's shapes (one image,
//! 256 x 256 input; decoder shapes for 16 boxes). Named `cpu_<op>_<shape>`; the
//! CUDA twins sit beside them as `cuda_<group>/<op>_<shape>`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sam_unet::Tensor;
use sam_unet::ops::activation::{Act, act};
use sam_unet::ops::attention::{attention, rel_pos_attention};
use sam_unet::ops::conv::{Conv2dArgs, conv_transpose2d, conv2d};
use sam_unet::ops::linear::linear_fused;
use sam_unet::ops::norm::{layer_norm, layer_norm2d};
use sam_unet::ops::resize::{bilinear, resize_u8_pil_bilinear};

fn rand(dims: &[usize], seed: u64) -> Tensor {
    let n: usize = dims.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        })
        .collect();
    Tensor::from_vec(v, dims.to_vec()).unwrap()
}

fn linear(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_linear");
    // ViT-B at 256 tokens: qkv, proj, mlp.lin1 (+GELU), mlp.lin2 (+residual)
    for &(name, m, k, n, a) in &[
        ("qkv_256x768x2304", 256, 768, 2304, Act::None),
        ("lin1_gelu_256x768x3072", 256, 768, 3072, Act::Gelu),
        ("lin2_256x3072x768", 256, 3072, 768, Act::None),
        ("dec_k_4096x256x128", 16 * 256, 256, 128, Act::None),
    ] {
        let (x, w, b) = (rand(&[m, k], 1), rand(&[n, k], 2), rand(&[n], 3));
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |bch| {
            bch.iter(|| linear_fused(&x, &w, Some(&b), None, a).unwrap())
        });
    }
    g.finish();
}

/// The bf16 GEMM (AVX512_BF16, issue 14) beside the f32 linear at the same
/// shapes, without bias: GFLOP/s = elements/s / 1e9 in criterion's report.
fn gemm_bf16(c: &mut Criterion) {
    use sam_unet::cpu::bf16_gemm::{Kernel, PackedB, gemm_bf16_with, has_avx512_bf16};
    if !has_avx512_bf16() {
        println!("cpu_gemm_bf16: no AVX512_BF16 on this CPU, skipped");
        return;
    }
    let kernels: Vec<Kernel> = Kernel::all_here()
        .into_iter()
        .filter(|&k| k != Kernel::Portable)
        .collect();
    let mut g = c.benchmark_group("cpu_gemm_bf16");
    // The ceilings: vdpbf16ps (and tdpbf16ps where the CPU has AMX) on
    // registers only, every thread.
    let iters = 100_000;
    g.throughput(Throughput::Elements(
        sam_unet::cpu::bf16_gemm::dot_roofline(1) * iters as u64,
    ));
    g.bench_function("roofline", |bch| {
        bch.iter(|| sam_unet::cpu::bf16_gemm::dot_roofline(iters))
    });
    if kernels.contains(&Kernel::Amx) {
        let iters = 20_000;
        g.throughput(Throughput::Elements(
            sam_unet::cpu::bf16_gemm::amx_roofline(1) * iters as u64,
        ));
        g.bench_function("roofline_amx", |bch| {
            bch.iter(|| sam_unet::cpu::bf16_gemm::amx_roofline(iters))
        });
    }
    for &(name, m, k, n) in &[
        ("4096x768x3072", 4096, 768, 3072),
        ("qkv_784x768x2304", 784, 768, 2304),
        ("lin1_256x768x3072", 256, 768, 3072),
        ("lin2_256x3072x768", 256, 3072, 768),
    ] {
        let (x, w) = (rand(&[m, k], 1), rand(&[n, k], 2));
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        let packed = PackedB::from_nk(w.as_f32().unwrap(), n, k).unwrap();
        let xs = x.as_f32().unwrap();
        let mut out = vec![0f32; m * n];
        for &kernel in &kernels {
            let id = match kernel {
                Kernel::Amx => "bf16_amx",
                _ => "bf16",
            };
            g.bench_function(BenchmarkId::new(id, name), |bch| {
                bch.iter(|| gemm_bf16_with(kernel, xs, m, &packed, &mut out, false).unwrap())
            });
        }
        g.bench_function(BenchmarkId::new("f32", name), |bch| {
            bch.iter(|| linear_fused(&x, &w, None, None, Act::None).unwrap())
        });
    }
    g.finish();
}

/// Packing a B tile for the bf16 GEMM (round to bf16, interleave k-pairs):
/// the per-call cost of a bf16 convolution beside its products, on any CPU;
/// a plain copy of the same f32 block for scale.
fn bf16_pack(c: &mut Criterion) {
    use sam_unet::cpu::bf16_gemm::{pack_b_rows, packed_b_len};
    let mut g = c.benchmark_group("cpu_bf16_pack");
    for (k, cols) in [(576usize, 64usize), (2304, 64), (768, 256)] {
        let src = rand(&[k, cols], 11);
        let src = src.as_f32().unwrap();
        let mut words = vec![0u32; packed_b_len(k, cols)];
        let mut copy = vec![0f32; k * cols];
        g.throughput(Throughput::Elements((k * cols) as u64));
        g.bench_function(BenchmarkId::new("pack", format!("{k}x{cols}")), |b| {
            b.iter(|| pack_b_rows(k, cols, src, cols, &mut words))
        });
        g.bench_function(BenchmarkId::new("copy_f32", format!("{k}x{cols}")), |b| {
            b.iter(|| copy.copy_from_slice(std::hint::black_box(src)))
        });
    }
    g.finish();
}

fn conv(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_conv2d");
    // (name, input dims, weight dims, stride, pad)
    let cases: &[(&str, [usize; 4], [usize; 4], usize, usize)] = &[
        (
            "stem_7x7s2_3to64_256",
            [1, 3, 256, 256],
            [64, 3, 7, 7],
            2,
            3,
        ),
        ("r50_l1_3x3_64_64", [1, 64, 64, 64], [64, 64, 3, 3], 1, 1),
        (
            "r50_l3_1x1_1024to256_16",
            [1, 1024, 16, 16],
            [256, 1024, 1, 1],
            1,
            0,
        ),
        (
            "adapter0_3x3s2_512to1024_32",
            [1, 512, 32, 32],
            [1024, 512, 3, 3],
            2,
            1,
        ),
        ("neck_3x3_256_16", [1, 256, 16, 16], [256, 256, 3, 3], 1, 1),
        (
            "maskfeature_3x3_64to32_x16",
            [16, 64, 64, 64],
            [32, 64, 3, 3],
            1,
            1,
        ),
    ];
    for (name, xd, wd, s, p) in cases {
        let (x, w, b) = (rand(xd, 4), rand(wd, 5), rand(&[wd[0]], 6));
        let ho = (xd[2] + 2 * p - wd[2]) / s + 1;
        g.throughput(Throughput::Elements(
            (2 * xd[0] * wd[0] * ho * ho * wd[1] * wd[2] * wd[3]) as u64,
        ));
        g.bench_function(BenchmarkId::from_parameter(name), |bch| {
            bch.iter(|| {
                conv2d(
                    &x,
                    &w,
                    Some(&b),
                    Conv2dArgs {
                        stride: *s,
                        padding: *p,
                    },
                    None,
                    Act::Relu,
                )
                .unwrap()
            })
        });
        // The same convolution through the bf16 GEMM (weights packed once).
        if sam_unet::cpu::bf16_gemm::has_avx512_bf16() {
            let packed = sam_unet::cpu::bf16_gemm::PackedA::from_mk(
                w.as_f32().unwrap(),
                wd[0],
                wd[1] * wd[2] * wd[3],
            )
            .unwrap();
            g.bench_function(BenchmarkId::new("bf16", name), |bch| {
                bch.iter(|| {
                    sam_unet::ops::conv::conv2d_with(
                        &x,
                        &w,
                        Some(&packed),
                        Some(&b),
                        Conv2dArgs {
                            stride: *s,
                            padding: *p,
                        },
                        None,
                        Act::Relu,
                    )
                    .unwrap()
                })
            });
        }
    }
    g.finish();
    let mut g = c.benchmark_group("cpu_conv_transpose2d");
    for (name, xd, wd) in [
        ("bridge_768to256_16", [1, 768, 16, 16], [768, 256, 2, 2]),
        ("adapter3_2048to1024_8", [1, 2048, 8, 8], [2048, 1024, 2, 2]),
        ("upscale_64to32_32_x16", [16, 64, 32, 32], [64, 32, 2, 2]),
    ] {
        let (x, w, b) = (rand(&xd, 7), rand(&wd, 8), rand(&[wd[1]], 9));
        g.bench_function(BenchmarkId::from_parameter(name), |bch| {
            bch.iter(|| conv_transpose2d(&x, &w, Some(&b), Act::None).unwrap())
        });
    }
    g.finish();
}

fn attn(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_attention");
    let qkv = rand(&[1, 16, 16, 2304], 10);
    let bias = rand(&[2304], 11);
    let (rh27, rw27, rh31, rw31) = (
        rand(&[27, 64], 12),
        rand(&[27, 64], 13),
        rand(&[31, 64], 14),
        rand(&[31, 64], 15),
    );
    g.bench_function("window14_vitb", |b| {
        b.iter(|| rel_pos_attention(&qkv, &bias, &rh27, &rw27, 12, 14).unwrap())
    });
    g.bench_function("global16_vitb", |b| {
        b.iter(|| rel_pos_attention(&qkv, &bias, &rh31, &rw31, 12, 0).unwrap())
    });
    let (q, k, v) = (
        rand(&[16, 256, 128], 16),
        rand(&[16, 3, 128], 17),
        rand(&[16, 3, 128], 18),
    );
    g.bench_function("decoder_image_to_token_x16", |b| {
        b.iter(|| attention(&q, &k, &v, 8).unwrap())
    });
    g.finish();
}

fn elementwise(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_elementwise");
    let x = rand(&[256, 3072], 19);
    g.throughput(Throughput::Elements(x.numel() as u64));
    g.bench_function("gelu_256x3072", |b| b.iter(|| act(&x, Act::Gelu).unwrap()));
    let t = rand(&[1, 16, 16, 768], 20);
    let (w, bb) = (rand(&[768], 21), rand(&[768], 22));
    g.bench_function("layer_norm_256x768", |b| {
        b.iter(|| layer_norm(&t, &w, &bb, 1e-6).unwrap())
    });
    let m = rand(&[16, 64, 64, 64], 23);
    let (w2, b2) = (rand(&[64], 24), rand(&[64], 25));
    g.bench_function("layer_norm2d_gelu_16x64x64x64", |b| {
        b.iter(|| layer_norm2d(&m, &w2, &b2, 1e-6, Act::Gelu).unwrap())
    });
    let low = rand(&[16, 1, 64, 64], 26);
    g.bench_function("bilinear_64to256_x16", |b| {
        b.iter(|| bilinear(&low, 256, 256).unwrap())
    });
    let img: Vec<u8> = (0..512 * 512 * 3).map(|i| (i * 31 % 251) as u8).collect();
    g.bench_function("pil_resize_512to256_rgb", |b| {
        b.iter(|| resize_u8_pil_bilinear(&img, 512, 512, 3, 256, 256).unwrap())
    });
    g.finish();
}

/// CUDA twins, timed with the stream synchronised inside each iteration; skipped
/// with a printed reason where there is no GPU.
fn cuda(c: &mut Criterion) {
    let dev = match sam_unet::cuda::CudaDevice::new(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cuda benchmarks skipped: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("cuda_elementwise");
    let x = rand(&[256, 3072], 19);
    let xd = dev.upload(x.as_f32().unwrap()).unwrap();
    g.throughput(Throughput::Elements(x.numel() as u64));
    g.bench_function("gelu_256x3072", |b| {
        b.iter(|| {
            let y = sam_unet::ops::activation::cuda::act(&dev, &xd, Act::Gelu).unwrap();
            dev.synchronize().unwrap();
            y
        })
    });
    let t = rand(&[256, 768], 20);
    let (td, wd, bd) = (
        dev.upload(t.as_f32().unwrap()).unwrap(),
        dev.upload(&vec![1.0; 768]).unwrap(),
        dev.upload(&vec![0.0; 768]).unwrap(),
    );
    g.throughput(Throughput::Elements(t.numel() as u64));
    g.bench_function("layer_norm_256x768", |b| {
        b.iter(|| {
            let y = sam_unet::ops::norm::cuda::layer_norm(&dev, &td, &wd, &bd, 768, 1e-6).unwrap();
            dev.synchronize().unwrap();
            y
        })
    });
    g.throughput(Throughput::Elements((16 * 64 * 64 * 64) as u64));
    let m = dev
        .upload(rand(&[16, 64, 64, 64], 23).as_f32().unwrap())
        .unwrap();
    let mt = sam_unet::cuda::GpuTensor {
        data: m,
        dims: vec![16, 64, 64, 64],
    };
    let (w2, b2) = (
        dev.upload(&vec![1.0; 64]).unwrap(),
        dev.upload(&vec![0.0; 64]).unwrap(),
    );
    g.bench_function("layer_norm2d_gelu_16x64x64x64", |b| {
        b.iter(|| {
            let y = sam_unet::ops::norm::cuda::layer_norm2d(&dev, &mt, &w2, &b2, 1e-6, Act::Gelu)
                .unwrap();
            dev.synchronize().unwrap();
            y
        })
    });
    g.finish();
    let blas0 = match sam_unet::cuda::blas::Blas::new(dev.stream()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cuda GEMM benchmarks skipped: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("cuda_conv2d");
    let cases: &[(&str, [usize; 4], [usize; 4], usize, usize)] = &[
        (
            "stem_7x7s2_3to64_256",
            [1, 3, 256, 256],
            [64, 3, 7, 7],
            2,
            3,
        ),
        ("r50_l1_3x3_64_64", [1, 64, 64, 64], [64, 64, 3, 3], 1, 1),
        (
            "adapter0_3x3s2_512to1024_32",
            [1, 512, 32, 32],
            [1024, 512, 3, 3],
            2,
            1,
        ),
        (
            "maskfeature_3x3_64to32_x16",
            [16, 64, 64, 64],
            [32, 64, 3, 3],
            1,
            1,
        ),
    ];
    for (name, xd, wd, s, p) in cases {
        let x = sam_unet::cuda::GpuTensor {
            data: dev.upload(rand(xd, 4).as_f32().unwrap()).unwrap(),
            dims: xd.to_vec(),
        };
        let w = dev.upload(rand(wd, 5).as_f32().unwrap()).unwrap();
        let ho = (xd[2] + 2 * p - wd[2]) / s + 1;
        g.throughput(Throughput::Elements(
            (2 * xd[0] * wd[0] * ho * ho * wd[1] * wd[2] * wd[3]) as u64,
        ));
        g.bench_function(*name, |b| {
            b.iter(|| {
                let y = sam_unet::ops::conv::cuda::conv2d(
                    &dev,
                    &blas0,
                    &x,
                    sam_unet::ops::conv::cuda::ConvWeight::F32(&w),
                    None,
                    wd[0],
                    wd[2],
                    wd[3],
                    *s,
                    *p,
                    None,
                    Act::Relu,
                )
                .unwrap();
                dev.synchronize().unwrap();
                y
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("cuda_attention");
    // ViT-B attention, batch 1 and 64: f32 on CUDA cores, bf16 on tensor cores.
    let bias = dev.upload(rand(&[2304], 11).as_f32().unwrap()).unwrap();
    for batch in [1usize, 64] {
        let qkv = dev
            .upload(rand(&[batch, 16, 16, 2304], 10).as_f32().unwrap())
            .unwrap();
        for (name, window, rows) in [
            ("window14_vitb", 14usize, 27usize),
            ("global16_vitb", 0, 31),
        ] {
            let (rh, rw) = (
                dev.upload(rand(&[rows, 64], 12).as_f32().unwrap()).unwrap(),
                dev.upload(rand(&[rows, 64], 13).as_f32().unwrap()).unwrap(),
            );
            g.bench_function(format!("{name}_f32_b{batch}"), |b| {
                b.iter(|| {
                    let y = sam_unet::ops::attention::cuda::rel_pos_attention(
                        &dev, &qkv, &bias, &rh, &rw, batch, 16, 768, 12, window,
                    )
                    .unwrap();
                    dev.synchronize().unwrap();
                    y
                })
            });
            g.bench_function(format!("{name}_tc_bf16_b{batch}"), |b| {
                b.iter(|| {
                    let y = sam_unet::ops::attention::cuda::rel_pos_attention_tc_bf16(
                        &dev, &qkv, &bias, &rh, &rw, batch, 16, 768, 12, window, false,
                    )
                    .unwrap();
                    dev.synchronize().unwrap();
                    y
                })
            });
        }
    }
    let qd = sam_unet::cuda::GpuTensor {
        data: dev
            .upload(rand(&[16, 256, 128], 16).as_f32().unwrap())
            .unwrap(),
        dims: vec![16, 256, 128],
    };
    let kd = sam_unet::cuda::GpuTensor {
        data: dev
            .upload(rand(&[16, 3, 128], 17).as_f32().unwrap())
            .unwrap(),
        dims: vec![16, 3, 128],
    };
    let vd = sam_unet::cuda::GpuTensor {
        data: dev
            .upload(rand(&[16, 3, 128], 18).as_f32().unwrap())
            .unwrap(),
        dims: vec![16, 3, 128],
    };
    g.bench_function("decoder_image_to_token_x16", |b| {
        b.iter(|| {
            let y = sam_unet::ops::attention::cuda::mha(&dev, &qd, &kd, &vd, 8).unwrap();
            dev.synchronize().unwrap();
            y
        })
    });
    g.finish();
    // A whole ViT-B block (window 14), f32 and bf16, batch 1 and 64: the encoder's
    // twelve blocks cost about twelve of these.
    let mut w = sam_unet::io::Weights::new();
    for (n, dims) in [
        ("norm1.weight", vec![768]),
        ("norm1.bias", vec![768]),
        ("attn.qkv.weight", vec![2304, 768]),
        ("attn.qkv.bias", vec![2304]),
        ("attn.proj.weight", vec![768, 768]),
        ("attn.proj.bias", vec![768]),
        ("attn.rel_pos_h", vec![27, 64]),
        ("attn.rel_pos_w", vec![27, 64]),
        ("norm2.weight", vec![768]),
        ("norm2.bias", vec![768]),
        ("mlp.lin1.weight", vec![3072, 768]),
        ("mlp.lin1.bias", vec![3072]),
        ("mlp.lin2.weight", vec![768, 3072]),
        ("mlp.lin2.bias", vec![768]),
    ] {
        w.insert(format!("blk.{n}"), rand(&dims, 50));
    }
    let mut g = c.benchmark_group("cuda_vit_block");
    g.sample_size(20);
    for dt in [sam_unet::DType::F32, sam_unet::DType::BF16] {
        // The model's block on the device: unfused ops in f32, the fused
        // block with bf16 GEMM weights.
        let mut blk = sam_unet::model::image_encoder::Block::load(&w, "blk", 12, 14).unwrap();
        let cuda = sam_unet::Device::Cuda(0);
        sam_unet::nn::to_device(&mut blk, cuda).unwrap();
        sam_unet::nn::gemm_weights_to(&mut blk, dt).unwrap();
        for b in [1usize, 64] {
            let x = rand(&[b, 16, 16, 768], 51).to_device(cuda).unwrap();
            g.throughput(Throughput::Elements(b as u64));
            g.bench_function(format!("window14_{}_b{b}", dt.name()), |bch| {
                bch.iter(|| {
                    let y = blk.forward(&x).unwrap();
                    dev.synchronize().unwrap();
                    y
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = linear, gemm_bf16, bf16_pack, conv, attn, elementwise, cuda
}
criterion_main!(benches);
