//! One training step as the authors' trainer takes it (MODEL.md, "Training"):
//! the model in train mode (BatchNorm on batch statistics), all masks of the
//! batch through the decoder, their low-res logits upsampled 64 -> 256 and
//! compared with the padded labels by focal + 20 dice over all masks at once,
//! backward through the tape (src/autograd), Adam on the trainable
//! parameters that got a gradient.
//!
//! The parameters are the model's own tensors, named by the state_dict name
//! they were loaded from; frozen weights (the ViT and its neck) are never
//! registered, so nothing is recorded for them and they get no gradient.
//! On the CPU or a CUDA device (f32).

use std::collections::HashMap;
use std::time::Instant;

use crate::autograd::Recording;
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::model::config::Kind;
use crate::model::{ImageFeatures, SamUnet, Trace};
use crate::nn::Params;
use crate::ops::layout::cat0;
use crate::ops::loss::{LossTerms, focal_dice};
use crate::ops::optim::{AdamStep, adam_cpu};
use crate::ops::resize::bilinear;
use crate::tensor::{Device, Tensor};

/// Adam's moments, laid out flat, one slot per parameter with a gradient.
enum Moments {
    Cpu(Vec<f32>, Vec<f32>),
    Cuda(
        std::sync::Arc<crate::cuda::CudaDevice>,
        cudarc::driver::CudaSlice<f32>,
        cudarc::driver::CudaSlice<f32>,
    ),
}

/// Adam and the loss as the authors set them.
#[derive(Clone, Copy, Debug)]
pub struct TrainConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// The weight of the Dice term (20).
    pub dice_weight: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            dice_weight: 20.0,
        }
    }
}

/// One step's input: images [B, 3, S, S] (normalised, padded, as inference
/// takes them), per image its boxes in the model frame and their labels
/// [k, 1, S, S] (0 / 1, padded with 0 like the image).
pub struct Batch {
    pub images: Tensor,
    pub boxes: Vec<Vec<[f32; 4]>>,
    pub labels: Vec<Tensor>,
}

/// What a step reports.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub terms: LossTerms,
    /// L2 norm of all gradients together.
    pub grad_norm: f64,
    /// The decoder output upsampled to S: [masks, 1, S, S].
    pub logits: Tensor,
    /// Gradients by parameter name (only when asked for: `step_with_grads`).
    pub grads: Vec<(String, Tensor)>,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

pub struct Trainer {
    model: SamUnet,
    /// For every tensor of the model in visit order: its name when it is a
    /// trainable parameter.
    names: Vec<Option<String>>,
    /// Adam's first and second moments, flat (one buffer each, on the
    /// model's device); a parameter's slot starts at `slots[name]`.
    moments: Option<Moments>,
    slots: HashMap<String, usize>,
    step: u64,
    cfg: TrainConfig,
}

impl Trainer {
    /// A trainer on weights (validated as for inference), on `device`.
    pub fn new(w: &Weights, device: Device, cfg: TrainConfig) -> Result<Self> {
        let mut model = SamUnet::for_training(w)?;
        let trainable: HashMap<(usize, usize), &str> = model
            .config
            .param_specs()
            .into_iter()
            .filter(|s| s.kind == Kind::Param { trainable: true })
            .filter_map(|s| {
                let (name, t) = w.iter().find(|(n, _)| *n == s.name)?;
                Some((t.storage_key(), name))
            })
            .collect();
        let mut names = vec![];
        model.visit(&mut |t: &mut Tensor| {
            names.push(trainable.get(&t.storage_key()).map(|n| n.to_string()));
            Ok(())
        })?;
        // Names first (they come from the loaded storage), then the device:
        // the visit order is what keeps them attached.
        crate::nn::to_device(&mut model, device)?;
        model.set_training(true);
        Ok(Trainer {
            model,
            names,
            moments: None,
            slots: HashMap::new(),
            step: 0,
            cfg,
        })
    }

    pub fn model(&self) -> &SamUnet {
        &self.model
    }

    /// The trainable parameters' names, in module order.
    pub fn param_names(&self) -> Vec<&str> {
        self.names.iter().flatten().map(String::as_str).collect()
    }

    /// The current value of a parameter (or buffer) by its module-order index
    /// name; None if there is no trainable parameter of that name.
    pub fn param(&mut self, name: &str) -> Result<Option<Tensor>> {
        let mut i = 0;
        let mut found = None;
        let names = &self.names;
        self.model.visit(&mut |t: &mut Tensor| {
            if names[i].as_deref() == Some(name) {
                found = Some(t.clone());
            }
            i += 1;
            Ok(())
        })?;
        Ok(found)
    }

    /// Adam steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The tape of one step's forward, without the backward or the update:
    /// what each node keeps alive until backward (the memory report).
    pub fn record_forward(&mut self, batch: &Batch) -> Result<Vec<crate::autograd::NodeInfo>> {
        let rec = self.register()?;
        let (logits, labels) = self.forward(batch)?;
        let _ = focal_dice(&logits, &labels, self.cfg.dice_weight)?;
        Ok(rec.nodes())
    }

    /// A recording on this thread with every trainable parameter registered.
    fn register(&mut self) -> Result<Recording> {
        let rec = Recording::start()?;
        let mut i = 0;
        let names = &self.names;
        self.model.visit(&mut |t: &mut Tensor| {
            if let Some(n) = &names[i] {
                rec.param(t, n.clone())?;
            }
            i += 1;
            Ok(())
        })?;
        Ok(rec)
    }

    pub fn step(&mut self, batch: &Batch) -> Result<StepReport> {
        self.step_inner(batch, false)
    }

    /// `step`, also returning every gradient by name.
    pub fn step_with_grads(&mut self, batch: &Batch) -> Result<StepReport> {
        self.step_inner(batch, true)
    }

    fn step_inner(&mut self, batch: &Batch, keep_grads: bool) -> Result<StepReport> {
        let b = batch.images.dims().first().copied().unwrap_or(0);
        if b == 0 || batch.boxes.len() != b || batch.labels.len() != b {
            return Err(Error::input(
                "train step",
                format!(
                    "{b} images, {} box lists, {} label sets",
                    batch.boxes.len(),
                    batch.labels.len()
                ),
            ));
        }
        let t0 = Instant::now();
        let rec = self.register()?;
        let (logits, labels) = self.forward(batch)?;
        let (loss, terms) = focal_dice(&logits, &labels, self.cfg.dice_weight)?;
        if !terms.loss.is_finite() {
            return Err(Error::input(
                "train step",
                format!(
                    "the loss is {} (focal {}, dice {})",
                    terms.loss, terms.focal, terms.dice
                ),
            ));
        }
        let forward_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let seed = Tensor::from_vec(vec![1.0], [1])?.to_device(loss.device())?;
        let grads = rec.backward(&loss, &seed)?;
        let backward_s = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        let mut sq = 0.0f64;
        for (_, g) in &grads {
            let h = g.to_host()?;
            sq += h.as_f32()?.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
        }
        self.adam(&grads)?;
        let optimizer_s = t2.elapsed().as_secs_f64();
        Ok(StepReport {
            terms,
            grad_norm: sq.sqrt(),
            logits: logits.to_host()?,
            grads: if keep_grads { grads } else { vec![] },
            forward_s,
            backward_s,
            optimizer_s,
        })
    }

    /// The recorded forward: logits upsampled to S [masks, 1, S, S] and the
    /// labels in the same order.
    fn forward(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let s = self.model.config.img_size;
        let feats: ImageFeatures = self
            .model
            .encode_image(&batch.images, &mut Trace::default())?;
        let mut lows = Vec::with_capacity(batch.boxes.len());
        for (i, bx) in batch.boxes.iter().enumerate() {
            lows.push(self.model.decode(&feats, i, bx, &mut Trace::default())?);
        }
        let low = cat0(&lows.iter().collect::<Vec<_>>())?;
        let up = bilinear(&low, s, s)?;
        let labels =
            cat0(&batch.labels.iter().collect::<Vec<_>>())?.to_device(self.model.device())?;
        Ok((up, labels))
    }

    /// torch.optim.Adam (no weight decay, no amsgrad), single-tensor form
    /// (ops::optim). Parameters without a gradient are not touched and get no
    /// state; the moments live in two flat buffers, one slot per parameter.
    fn adam(&mut self, grads: &[(String, Tensor)]) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        // Python floats in the reference: hyper-parameters as f64.
        let (lr, b1, b2, eps) = (c.lr as f64, c.beta1 as f64, c.beta2 as f64, c.eps as f64);
        let s = AdamStep::new(lr, b1, b2, eps, self.step);
        let by_name: HashMap<&str, &Tensor> = grads.iter().map(|(n, g)| (n.as_str(), g)).collect();
        // Slots in module order at the first step (the set of parameters
        // with a gradient is the architecture's, the same every step).
        if self.moments.is_none() {
            let mut total = 0;
            let mut i = 0;
            let names = &self.names;
            let slots = &mut self.slots;
            self.model.visit(&mut |p: &mut Tensor| {
                if let Some(n) = names[i].as_deref()
                    && by_name.contains_key(n)
                {
                    slots.insert(n.to_string(), total);
                    total += p.numel();
                }
                i += 1;
                Ok(())
            })?;
            self.moments = Some(match self.model.device() {
                Device::Cpu => Moments::Cpu(vec![0.0; total], vec![0.0; total]),
                Device::Cuda(i) => {
                    let dev = crate::cuda::shared_device(i)?;
                    let (m, v) = (
                        dev.alloc_zeros(total.max(1))?,
                        dev.alloc_zeros(total.max(1))?,
                    );
                    Moments::Cuda(dev, m, v)
                }
            });
        }
        let h = match &self.moments {
            Some(Moments::Cuda(dev, ..)) => Some(dev.upload(&s.to_array())?),
            _ => None,
        };
        let names = &self.names;
        let slots = &self.slots;
        let moments = self
            .moments
            .as_mut()
            .ok_or_else(|| Error::input("adam", "no moments"))?;
        let mut i = 0;
        self.model.visit(&mut |p: &mut Tensor| {
            let name = names[i].as_deref();
            i += 1;
            let (Some(name), Some(g)) = (name, name.and_then(|n| by_name.get(n))) else {
                return Ok(());
            };
            let at = *slots.get(name).ok_or_else(|| {
                Error::input(
                    "adam",
                    format!("{name} got a gradient at a later step only"),
                )
            })?;
            let n = g.numel();
            match &mut *moments {
                Moments::Cpu(m, v) => adam_cpu(
                    p.as_f32_mut()?,
                    g.as_f32()?,
                    &mut m[at..at + n],
                    &mut v[at..at + n],
                    &s,
                ),
                Moments::Cuda(dev, m, v) => {
                    let gc = crate::ops::cuda_input("adam", g)?;
                    let gs = gc.cuda_whole_f32("adam")?.1;
                    let dev = dev.clone();
                    let hs = h
                        .as_ref()
                        .ok_or_else(|| Error::input("adam", "no scalars"))?;
                    let mut pv = p.cuda_f32_mut("adam")?;
                    crate::ops::optim::cuda::adam(
                        &dev,
                        &mut pv,
                        gs,
                        &mut m.slice_mut(at..at + n),
                        &mut v.slice_mut(at..at + n),
                        hs,
                    )
                }
            }
        })
    }
}
