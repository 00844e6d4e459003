//! Training pieces against the reference: the loss (`ref_loss`).

mod common;
use common::{Fixture, errors, fixture, fixtures};
use sam_unet::autograd::Recording;
use sam_unet::ops::loss::focal_dice;

/// focal + 20 dice and its gradient on the fixture's 4 masks (the last one
/// empty): loss terms to 1e-5 relative, grad_logits relative L2 <= 1e-5.
#[test]
fn ref_loss() {
    let Some(dir) = fixtures() else { return };
    let fx = Fixture::load(&fixture(&dir, "ref_loss.safetensors"));
    let (logits, labels) = (fx.tensor("logits"), fx.tensor("labels"));
    let rec = Recording::start().unwrap();
    let mut x = logits.clone();
    rec.param(&mut x, "logits").unwrap();
    let (loss, terms) = focal_dice(&x, &labels, 20.0).unwrap();
    for (name, got) in [
        ("loss", terms.loss),
        ("focal", terms.focal),
        ("dice_loss", terms.dice),
    ] {
        let want = fx.f(name).1[0] as f64;
        let rel = (got - want).abs() / want.abs();
        println!("{name}: {got:.9} vs {want:.9} (relative {rel:.2e})");
        assert!(rel <= 1e-5, "{name}: {got} vs {want}");
    }
    assert_eq!(loss.as_f32().unwrap()[0], terms.loss as f32);
    let one = sam_unet::Tensor::from_vec(vec![1.0], [1]).unwrap();
    let grads = rec.backward(&loss, &one).unwrap();
    let (name, g) = &grads[0];
    assert_eq!(name, "logits");
    let (rel, maxd, _) = errors(g.as_f32().unwrap(), &fx.f("grad_logits").1);
    println!("grad_logits: relative L2 {rel:.2e}, max abs {maxd:.2e}");
    assert!(rel <= 1e-5, "grad_logits: relative L2 {rel}");
}

/// Bad labels and shapes are typed errors.
#[test]
fn loss_rejects_bad_labels() {
    let x = sam_unet::Tensor::from_vec(vec![0.0; 4], [1, 1, 2, 2]).unwrap();
    let half = sam_unet::Tensor::from_vec(vec![0.5; 4], [1, 1, 2, 2]).unwrap();
    assert!(focal_dice(&x, &half, 20.0).is_err());
    let other = sam_unet::Tensor::from_vec(vec![0.0; 2], [1, 1, 1, 2]).unwrap();
    assert!(focal_dice(&x, &other, 20.0).is_err());
}
