//! The tape's rules, and every recorded op's backward against central finite
//! differences (sums in f64): L = sum(R * f(inputs)) for a fixed random R,
//! dL/d input from the tape vs (L(x + h) - L(x - h)) / 2h at sampled indices.

use super::*;
use crate::ops::activation::{self, Act};
use crate::ops::{linear, norm};

use crate::testing::rand;

fn t(dims: &[usize], seed: u64, scale: f32) -> Tensor {
    Tensor::from_vec(rand(dims.iter().product(), seed, scale), dims.to_vec()).unwrap()
}

type OpFn = dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Checks f's gradients with respect to every input at up to 24 indices each.
fn check_grads(name: &str, f: &OpFn, inputs: &[Tensor], h: f32, tol: f64) {
    let out = f(inputs).unwrap();
    let r = t(out.dims(), 99, 1.0);
    let loss = |ins: &[Tensor]| -> f64 {
        let y = f(ins).unwrap();
        y.as_f32()
            .unwrap()
            .iter()
            .zip(r.as_f32().unwrap())
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum()
    };
    // The tape's gradients.
    let rec = Recording::start().unwrap();
    let mut tracked = inputs.to_vec();
    for (i, x) in tracked.iter_mut().enumerate() {
        rec.param(x, format!("in{i}")).unwrap();
    }
    let y = f(&tracked).unwrap();
    let grads = rec.backward(&y, &r).unwrap();
    for (i, x) in inputs.iter().enumerate() {
        let g = grads
            .iter()
            .find(|(n, _)| *n == format!("in{i}"))
            .map(|(_, g)| g.as_f32().unwrap().to_vec())
            .unwrap_or_else(|| vec![0.0; x.numel()]);
        let gmax = g.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
        let n = x.numel();
        for s in 0..24.min(n) {
            let idx = (s * 7919 + 13) % n;
            let mut plus = inputs.to_vec();
            let mut minus = inputs.to_vec();
            plus[i].as_f32_mut().unwrap()[idx] += h;
            minus[i].as_f32_mut().unwrap()[idx] -= h;
            let fd = (loss(&plus) - loss(&minus)) / (2.0 * h as f64);
            let got = g[idx] as f64;
            assert!(
                (fd - got).abs() <= tol * (gmax + fd.abs()) + 1e-4,
                "{name}: d/d input {i}[{idx}]: tape {got}, finite difference {fd} (max |grad| {gmax})"
            );
        }
    }
}

#[test]
fn activations_and_adds_match_finite_differences() {
    for a in [Act::Gelu, Act::Relu] {
        check_grads(
            &format!("{a:?}"),
            &move |x| activation::act(&x[0], a),
            &[t(&[4, 37], 1, 2.0)],
            1e-2,
            1e-2,
        );
    }
    check_grads(
        "add",
        &|x| activation::add(&x[0], &x[1]),
        &[t(&[3, 5], 2, 1.0), t(&[3, 5], 3, 1.0)],
        1e-2,
        1e-3,
    );
    check_grads(
        "add_broadcast",
        &|x| activation::add_broadcast(&x[0], &x[1]),
        &[t(&[3, 4, 5], 4, 1.0), t(&[1, 4, 5], 5, 1.0)],
        1e-2,
        1e-3,
    );
    check_grads(
        "add_ (in place, broadcast)",
        &|x| {
            let mut a = activation::act(&x[0], Act::Gelu)?;
            activation::add_broadcast_(&mut a, &x[1])?;
            activation::add_(&mut a, &x[0])?;
            Ok(a)
        },
        &[t(&[3, 4, 5], 6, 1.0), t(&[1, 4, 5], 7, 1.0)],
        1e-2,
        1e-2,
    );
}

#[test]
fn linear_and_norms_match_finite_differences() {
    for a in [Act::None, Act::Relu, Act::Gelu] {
        check_grads(
            &format!("linear {a:?}"),
            &move |x| linear::linear_fused(&x[0], &x[1], Some(&x[2]), Some(&x[3]), a),
            &[
                t(&[2, 3, 16], 10, 1.0),
                t(&[8, 16], 11, 0.3),
                t(&[8], 12, 0.5),
                t(&[2, 3, 8], 13, 1.0),
            ],
            1e-2,
            1e-2,
        );
    }
    check_grads(
        "layer_norm",
        &|x| norm::layer_norm(&x[0], &x[1], &x[2], 1e-5),
        &[t(&[5, 24], 20, 2.0), t(&[24], 21, 1.0), t(&[24], 22, 1.0)],
        1e-2,
        1e-2,
    );
    for a in [Act::None, Act::Gelu] {
        check_grads(
            &format!("layer_norm2d {a:?}"),
            &move |x| norm::layer_norm2d(&x[0], &x[1], &x[2], 1e-6, a),
            &[
                t(&[2, 6, 3, 5], 23, 2.0),
                t(&[6], 24, 1.0),
                t(&[6], 25, 1.0),
            ],
            1e-2,
            1e-2,
        );
    }
    // More pixels than one backward block (256).
    check_grads(
        "layer_norm2d over 300 pixels",
        &|x| norm::layer_norm2d(&x[0], &x[1], &x[2], 1e-6, Act::Gelu),
        &[
            t(&[2, 4, 15, 20], 26, 2.0),
            t(&[4], 27, 1.0),
            t(&[4], 28, 1.0),
        ],
        1e-2,
        1e-2,
    );
    check_grads(
        "reshape and view",
        &|x| {
            let v = x[0].reshape([6, 4])?.view(4, [2, 4])?;
            activation::act(&v, Act::Gelu)
        },
        &[t(&[2, 3, 4], 26, 1.0)],
        1e-2,
        1e-2,
    );
}

#[test]
fn a_value_used_twice_gets_the_sum() {
    let rec = Recording::start().unwrap();
    let mut x = Tensor::from_vec(vec![1.0, 2.0], [2]).unwrap();
    rec.param(&mut x, "x").unwrap();
    let y = activation::add(&x, &x).unwrap();
    let y = activation::add(&y, &x).unwrap();
    let g = rec
        .backward(&y, &Tensor::from_vec(vec![1.0, 10.0], [2]).unwrap())
        .unwrap();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].1.as_f32().unwrap(), &[3.0, 30.0]);
}

#[test]
fn constants_record_nothing_and_frozen_weights_save_no_input() {
    let rec = Recording::start().unwrap();
    let x = t(&[4, 8], 30, 1.0);
    let w_frozen = t(&[8, 8], 31, 0.3);
    // Only constants: nothing recorded.
    let h = linear::linear(&x, &w_frozen, None).unwrap();
    assert!(rec.nodes().is_empty());
    // A trainable bias makes the output tracked; the frozen next layer then
    // records a node that keeps no input (no weight gradient to compute).
    let mut b = t(&[8], 32, 0.1);
    rec.param(&mut b, "b").unwrap();
    drop(h);
    let h = linear::linear(&x, &w_frozen, Some(&b)).unwrap();
    let y = linear::linear(&h, &w_frozen, None).unwrap();
    let nodes = rec.nodes();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert!(nodes.iter().all(|n| n.saved_bytes == 0), "{nodes:?}");
    let g = rec.backward(&y, &Tensor::zeros([4, 8])).unwrap();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].0, "b");
}

#[test]
fn a_tracked_input_to_an_op_without_backward_is_an_error() {
    let rec = Recording::start().unwrap();
    let mut x = t(&[2, 3], 40, 1.0);
    rec.param(&mut x, "x").unwrap();
    assert!(matches!(
        x.to_dtype(crate::tensor::DType::BF16),
        Err(Error::NoBackward { op: "to_dtype" })
    ));
    assert!(no_backward("some_op", &[&x]).is_err());
    assert!(no_backward("some_op", &[&t(&[2], 41, 1.0)]).is_ok());
    // A second recording on the same thread is refused.
    assert!(Recording::start().is_err());
    drop(rec);
    // After the recording, x is a constant again.
    assert!(!requires_grad(&x));
    assert!(no_backward("some_op", &[&x]).is_ok());
}

#[test]
fn convolutions_and_pooling_match_finite_differences() {
    use crate::ops::conv::{self, Conv2dArgs};
    for (stride, padding, k) in [(1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 3, 7)] {
        check_grads(
            &format!("conv2d k{k} s{stride} p{padding}"),
            &move |x| {
                conv::conv2d(
                    &x[0],
                    &x[1],
                    Some(&x[2]),
                    Conv2dArgs { stride, padding },
                    None,
                    // Smooth: a ReLU kink within h of an output would break
                    // the finite difference, not the gradient.
                    Act::Gelu,
                )
            },
            &[
                t(&[2, 3, 9, 8], 50, 1.0),
                t(&[4, 3, k, k], 51, 0.3),
                t(&[4], 52, 0.5),
            ],
            1e-2,
            1e-2,
        );
    }
    check_grads(
        "conv2d with a residual",
        &|x| {
            conv::conv2d(
                &x[0],
                &x[1],
                None,
                Conv2dArgs {
                    stride: 1,
                    padding: 1,
                },
                Some(&x[2]),
                Act::None,
            )
        },
        &[
            t(&[1, 2, 5, 5], 53, 1.0),
            t(&[3, 2, 3, 3], 54, 0.3),
            t(&[1, 3, 5, 5], 55, 1.0),
        ],
        1e-2,
        1e-2,
    );
    check_grads(
        "conv_transpose2d",
        &|x| conv::conv_transpose2d(&x[0], &x[1], Some(&x[2]), Act::Gelu),
        &[
            t(&[2, 3, 4, 5], 56, 1.0),
            t(&[3, 4, 2, 2], 57, 0.3),
            t(&[4], 58, 0.5),
        ],
        1e-2,
        1e-2,
    );
    check_grads(
        "max_pool2d",
        &|x| conv::max_pool2d(&x[0], 3, 2, 1),
        &[t(&[2, 2, 7, 6], 59, 1.0)],
        1e-3,
        1e-2,
    );
}

#[test]
fn attention_and_decoder_ops_match_finite_differences() {
    use crate::ops::{attention, layout, prompt, resize};
    // Decoder attention: q per box, k and v shared by the boxes (leading 1).
    check_grads(
        "attention (shared keys)",
        &|x| attention::attention(&x[0], &x[1], &x[2], 2),
        &[
            t(&[3, 4, 8], 60, 1.0),
            t(&[1, 6, 8], 61, 1.0),
            t(&[1, 6, 8], 62, 1.0),
        ],
        1e-2,
        1e-2,
    );
    check_grads(
        "attention (batched)",
        &|x| attention::attention(&x[0], &x[1], &x[2], 2),
        &[
            t(&[2, 5, 8], 63, 1.0),
            t(&[2, 3, 8], 64, 1.0),
            t(&[2, 3, 8], 65, 1.0),
        ],
        1e-2,
        1e-2,
    );
    // Window attention on a 5 x 5 grid with windows of 3 (padded to 6 x 6),
    // and global attention; head dim 4.
    for window in [3usize, 0] {
        let s = if window == 0 { 5 } else { window };
        let (bias, rh, rw) = (
            t(&[3 * 8], 66, 0.5),
            t(&[2 * s - 1, 4], 67, 0.5),
            t(&[2 * s - 1, 4], 68, 0.5),
        );
        check_grads(
            &format!("rel_pos_attention window {window}"),
            &move |x| attention::rel_pos_attention(&x[0], &bias, &rh, &rw, 2, window),
            &[t(&[2, 5, 5, 24], 69, 1.0)],
            1e-2,
            1e-2,
        );
    }
    check_grads(
        "bilinear 4 -> 9 x 7",
        &|x| resize::bilinear(&x[0], 9, 7),
        &[t(&[2, 1, 4, 4], 70, 1.0)],
        1e-2,
        1e-3,
    );
    check_grads(
        "mask_dot",
        &|x| crate::ops::linear::mask_dot(&x[0], &x[1], &x[2]),
        &[
            t(&[3, 4], 71, 1.0),
            t(&[3, 4, 2, 3], 72, 1.0),
            t(&[1, 4, 2, 3], 73, 1.0),
        ],
        1e-2,
        1e-3,
    );
    let boxes = Tensor::from_vec(
        vec![10.0, 20.0, 100.0, 90.0, 3.0, 4.0, 200.0, 250.0],
        [2, 4],
    )
    .unwrap();
    let gauss = t(&[2, 4], 74, 1.0);
    check_grads(
        "box_tokens",
        &move |x| prompt::box_tokens(&boxes, &gauss, (&x[0], &x[1]), Some(&x[2]), 256),
        &[
            t(&[1, 8], 75, 1.0),
            t(&[1, 8], 76, 1.0),
            t(&[1, 1, 8], 77, 1.0),
        ],
        1e-2,
        1e-3,
    );
    check_grads(
        "layout: transposes, repeat, narrow, cat1",
        &|x| {
            let a = layout::nchw_to_nhwc(&x[0])?; // [2, 3, 4, 5]
            let a = layout::nhwc_to_nchw(&activation::act(&a, Act::Gelu)?)?;
            let r = layout::repeat_first(&x[1], 2)?; // [2, 3, 5]
            let tokens = layout::cat1(&[&x[1], &r, &a.reshape([2, 12, 5])?])?;
            layout::narrow(&activation::act(&tokens, Act::Gelu)?, 2, 10)
        },
        &[t(&[2, 5, 3, 4], 78, 1.0), t(&[1, 3, 5], 79, 1.0)],
        1e-2,
        1e-2,
    );
}

#[test]
fn batch_norm_and_cat0_match_finite_differences() {
    check_grads(
        "batch_norm_train",
        &|x| {
            let (y, _) = norm::batch_norm_train(&x[0], &x[1], &x[2], 1e-5)?;
            activation::act(&y, Act::Gelu)
        },
        &[
            t(&[3, 4, 3, 2], 80, 2.0),
            t(&[4], 81, 1.0),
            t(&[4], 82, 1.0),
        ],
        1e-2,
        1e-2,
    );
    check_grads(
        "batch_norm_train fused with a residual add and ReLU",
        &|x| {
            let (y, _) =
                norm::batch_norm_train_fused(&x[0], &x[1], &x[2], 1e-5, Some(&x[3]), true)?;
            activation::act(&y, Act::Gelu)
        },
        &[
            t(&[3, 4, 3, 2], 85, 2.0),
            t(&[4], 86, 1.0),
            t(&[4], 87, 1.0),
            t(&[3, 4, 3, 2], 88, 1.0),
        ],
        // A step small enough that no output crosses the ReLU's kink (where
        // a finite difference measures nothing).
        1e-3,
        1e-2,
    );
    check_grads(
        "cat0",
        &|x| {
            let y = crate::ops::layout::cat0(&[&x[0], &x[1]])?;
            activation::act(&y, Act::Gelu)
        },
        &[t(&[2, 3, 4], 83, 1.0), t(&[1, 3, 4], 84, 1.0)],
        1e-2,
        1e-2,
    );
}

#[test]
fn batch_norm_statistics_are_the_batch_s() {
    // Two images of one channel: mean 2.5, biased variance 1.25, unbiased 5/3.
    let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], [2, 1, 1, 2]).unwrap();
    let one = Tensor::from_vec(vec![1.0], [1]).unwrap();
    let zero = Tensor::from_vec(vec![0.0], [1]).unwrap();
    let (y, st) = norm::batch_norm_train(&x, &one, &zero, 0.0).unwrap();
    assert!((st.mean[0] - 2.5).abs() < 1e-12);
    assert!((st.var_unbiased[0] - 5.0 / 3.0).abs() < 1e-12);
    let want = [-1.5, -0.5, 0.5, 1.5].map(|v: f64| (v / 1.25f64.sqrt()) as f32);
    for (a, b) in y.as_f32().unwrap().iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}
