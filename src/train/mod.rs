//! One training step as the authors' trainer takes it (MODEL.md, "Training"):
//! the model in train mode (BatchNorm on batch statistics), all masks of the
//! batch through the decoder, their low-res logits upsampled 64 -> 256 and
//! compared with the padded labels by focal + 20 dice over all masks at once,
//! backward through the tape (src/autograd), Adam on the trainable
//! parameters that got a gradient.
//!
//! The parameters live in one store (store.rs: values, gradients and Adam's
//! moments, each one flat allocation) and the model's parameter tensors are
//! views of it, named by the state_dict name they were loaded from; frozen
//! weights (the ViT and its neck) are never registered, so nothing is
//! recorded for them and they get no gradient. On the CPU or a CUDA device
//! (f32).

pub mod plot;
mod run;
mod store;

pub use run::{
    DataParallel, Event, RunConfig, Session, ValReport, evaluate, latest_checkpoint, rank_shard,
    read_log, write_plots,
};
pub use store::{ParamStore, Slot};

use std::collections::HashMap;
use std::time::Instant;

use std::sync::Arc;

use crate::autograd::Recording;
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::model::config::Kind;
use crate::model::{ImageFeatures, SamUnet, Trace};
use crate::nn::Params;
use crate::ops::activation::add;
use crate::ops::layout::{cat0, narrow};
use crate::ops::loss::{LossTerms, focal_dice};
use crate::ops::norm::SyncBatchNorm;
use crate::ops::resize::bilinear;
use crate::tensor::{Device, Tensor};

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
    /// Data-parallel steps: the gradient buckets summed over the ranks, and
    /// how many of them were launched while backward was still running.
    pub buckets: usize,
    pub buckets_during_backward: usize,
}

/// Values per gradient bucket by default (PyTorch DDP's 25 MiB of f32).
pub const BUCKET_VALUES: usize = 25 << 18;

pub struct Trainer {
    model: SamUnet,
    /// For every tensor of the model in visit order: its name when it is a
    /// trainable parameter.
    names: Vec<Option<String>>,
    /// For every tensor of the model in visit order: its state_dict name
    /// (parameters, frozen or not, and BatchNorm's running statistics).
    state_names: Vec<Option<String>>,
    /// The loaded tensors the model does not hold (the prompt encoder's
    /// parameters that boxes never use): kept to be written back unchanged.
    unused: Vec<(String, Tensor)>,
    /// The parameters box prompts reach, their gradients and Adam's state.
    store: ParamStore,
    cfg: TrainConfig,
    /// The equal shares whose losses are averaged (`step_as_ranks`; else 1).
    ranks: usize,
    /// The second group the gradient buckets are summed on (a duplicate of
    /// the step's collective, made at its first distributed step), keyed by
    /// the collective it was made from; None inside: it cannot duplicate.
    grad_comm: Option<(usize, Option<Box<dyn Collective>>)>,
    /// Values per gradient bucket (`set_bucket_values`).
    bucket_values: usize,
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
        let every: HashMap<(usize, usize), &str> =
            w.iter().map(|(n, t)| (t.storage_key(), n)).collect();
        let (mut names, mut state_names) = (vec![], vec![]);
        model.visit(&mut |t: &mut Tensor| {
            names.push(trainable.get(&t.storage_key()).map(|n| n.to_string()));
            state_names.push(every.get(&t.storage_key()).map(|n| n.to_string()));
            Ok(())
        })?;
        // The store takes the parameters that box prompts reach, in module
        // order (names come from the loaded storage, before any move).
        let reached: std::collections::HashSet<String> = model
            .config
            .param_specs()
            .into_iter()
            .filter(|s| s.gets_gradient_with_boxes())
            .map(|s| s.name)
            .collect();
        let mut params = vec![];
        let mut i = 0;
        model.visit(&mut |t: &mut Tensor| {
            if let Some(n) = names[i].as_ref().filter(|n| reached.contains(*n)) {
                params.push((n.clone(), t.clone()));
            }
            i += 1;
            Ok(())
        })?;
        let store = ParamStore::new(&params, device)?;
        drop(params);
        let held: std::collections::HashSet<&str> =
            state_names.iter().flatten().map(String::as_str).collect();
        let unused: Vec<(String, Tensor)> = w
            .iter()
            .filter(|(n, _)| !held.contains(n))
            .map(|(n, t)| Ok((n.to_string(), t.to_host()?.compact()?)))
            .collect::<Result<_>>()?;
        drop(held);
        let mut tr = Trainer {
            model,
            names,
            state_names,
            unused,
            store,
            cfg,
            ranks: 1,
            grad_comm: None,
            bucket_values: BUCKET_VALUES,
        };
        tr.attach_views()?;
        // The rest (frozen weights, buffers, parameters no box reaches).
        crate::nn::to_device(&mut tr.model, device)?;
        tr.model.set_training(true);
        Ok(tr)
    }

    /// Points the model's stored parameters at the store's values.
    fn attach_views(&mut self) -> Result<()> {
        self.each_stored(&mut |store, name, t| {
            *t = store.view(name)?;
            Ok(())
        })
    }

    /// Lets go of the model's views so that the store's values are its own
    /// to update in place (placeholders until `attach_views`).
    fn detach_views(&mut self) -> Result<()> {
        self.each_stored(&mut |_, _, t| {
            *t = Tensor::zeros([0]);
            Ok(())
        })
    }

    /// f on every model tensor that lives in the store, with its name.
    fn each_stored(
        &mut self,
        f: &mut dyn FnMut(&ParamStore, &str, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        let (names, store) = (&self.names, &self.store);
        let mut i = 0;
        self.model.visit(&mut |t: &mut Tensor| {
            if let Some(n) = names[i].as_deref()
                && store.slot(n).is_some()
            {
                f(store, n, t)?;
            }
            i += 1;
            Ok(())
        })
    }

    /// The model as it is now, under the official state_dict names, on the
    /// host in f32: every parameter (trained or frozen, and those box
    /// prompts never use, unchanged) and BatchNorm's running statistics
    /// (`num_batches_tracked`, an integer, is not a float tensor and is
    /// left out). `Weights::save` writes it as
    /// safetensors that inference and `Trainer::new` read back.
    pub fn weights(&mut self) -> Result<Weights> {
        let mut out = Weights::new();
        // The official shapes (the model keeps some as views of another
        // shape, e.g. the med token as [1, 1, D]).
        let shapes: HashMap<String, Vec<usize>> = self
            .model
            .config
            .param_specs()
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect();
        let names = &self.state_names;
        let mut i = 0;
        self.model.visit(&mut |t: &mut Tensor| {
            if let Some(n) = &names[i] {
                let mut h = t.to_host()?.compact()?;
                if let Some(shape) = shapes.get(n)
                    && h.dims() != shape.as_slice()
                {
                    h = h.reshape(shape.clone())?;
                }
                out.insert(n.clone(), h);
            }
            i += 1;
            Ok(())
        })?;
        for (n, t) in &self.unused {
            out.insert(n.clone(), t.clone());
        }
        Ok(out)
    }

    /// BatchNorm's `num_batches_tracked` under their state_dict names, in
    /// module order.
    pub fn batch_norm_counters(&self) -> Vec<(String, u64)> {
        self.bn_prefixes()
            .zip(self.model.batch_norms())
            .map(|(p, bn)| (format!("{p}.num_batches_tracked"), bn.running_stats().2))
            .collect()
    }

    /// Restores `num_batches_tracked` (a checkpoint's); every BatchNorm
    /// must be named.
    pub fn set_batch_norm_counters(&mut self, counters: &HashMap<String, u64>) -> Result<()> {
        let names: Vec<String> = self
            .bn_prefixes()
            .map(|p| format!("{p}.num_batches_tracked"))
            .collect();
        for (n, bn) in names.iter().zip(self.model.batch_norms()) {
            let c = counters.get(n).ok_or_else(|| {
                Error::input("trainer", format!("no {n} among the BatchNorm counters"))
            })?;
            bn.running.lock().unwrap_or_else(|p| p.into_inner()).batches = *c;
        }
        Ok(())
    }

    /// The BatchNorms' state_dict prefixes in module order (the model
    /// visits each one's running mean in that order).
    fn bn_prefixes(&self) -> impl Iterator<Item = &str> {
        self.state_names
            .iter()
            .flatten()
            .filter_map(|n| n.strip_suffix(".running_mean"))
    }

    /// BatchNorm on batch statistics (train, the default) or on the running
    /// ones (evaluation: validation between steps).
    pub fn set_training(&self, on: bool) {
        self.model.set_training(on);
    }

    /// Adam's learning rate now.
    pub fn lr(&self) -> f32 {
        self.cfg.lr
    }

    /// Sets Adam's learning rate (a schedule's step, e.g. MultiStepLR).
    pub fn set_lr(&mut self, lr: f32) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::input("trainer", format!("learning rate {lr}")));
        }
        self.cfg.lr = lr;
        Ok(())
    }

    /// The parameter store: values, gradients, Adam's moments and step.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// Restores Adam's state from a checkpoint (ParamStore::set_optimizer_state).
    pub fn set_optimizer_state(&mut self, step: u64, m: &Tensor, v: &Tensor) -> Result<()> {
        self.store.set_optimizer_state(step, m, v)
    }

    pub fn model(&self) -> &SamUnet {
        &self.model
    }

    /// The trainable parameters' names, in module order.
    pub fn param_names(&self) -> Vec<&str> {
        self.names.iter().flatten().map(String::as_str).collect()
    }

    /// The current value of a trainable parameter by name (a snapshot: the
    /// store's values change at the next step); None if there is none.
    pub fn param(&mut self, name: &str) -> Result<Option<Tensor>> {
        if self.store.slot(name).is_some() {
            return Ok(Some(self.store.view(name)?.compact()?));
        }
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
        self.store.steps()
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

    /// One update from several micro-batches (gradient accumulation): each
    /// runs forward and backward on its own (its BatchNorm statistics its
    /// own, as in PyTorch), its loss scaled by 1 / k so that the summed
    /// gradients are the mean of the micro-batches'; then one Adam step. The
    /// report's loss terms are the micro-batches' mean, its logits theirs
    /// in order.
    pub fn step_accumulated(&mut self, micro: &[Batch]) -> Result<StepReport> {
        self.steps_inner(micro, false)
    }

    /// One data-parallel update, this rank's part: its micro-batches as in
    /// `step_accumulated`, each loss scaled by 1 / (micro-batches x ranks),
    /// the gradients summed over the ranks in rank order
    /// (`Collective::all_reduce_sum`) on the flat gradient buffer, then the
    /// same Adam step on every rank, so that every rank keeps the same
    /// parameters. With `sync_bn` every train-mode BatchNorm normalises with
    /// the statistics of all ranks' micro-batches together and the running
    /// statistics move alike on every rank (PyTorch's SyncBatchNorm);
    /// without it each rank uses and keeps its own (DDP without
    /// SyncBatchNorm). Every rank must pass the same number of micro-batches.
    /// The loss terms reported are the mean over ranks; a NaN on any rank
    /// stops every rank at the same update.
    pub fn step_distributed(
        &mut self,
        micro: &[Batch],
        comm: &Arc<dyn Collective>,
        sync_bn: bool,
    ) -> Result<StepReport> {
        self.run_steps(micro, false, Some((comm, sync_bn)))
    }

    /// What `ranks` data-parallel ranks with SyncBatchNorm compute when each
    /// takes an equal, consecutive share of the batch's images, in one
    /// process: BatchNorm on the whole batch's statistics, the loss the mean
    /// of the shares' losses (each share its own Dice, as each GPU takes its
    /// own loss in the authors' trainer), whose gradient is the ranks'
    /// averaged one. With a GPU per rank unavailable, this reproduces a
    /// multi-GPU update on one device (and is what the ranks are tested
    /// against).
    pub fn step_as_ranks(&mut self, batch: &Batch, ranks: usize) -> Result<StepReport> {
        let b = batch.boxes.len();
        if ranks == 0 || b % ranks != 0 {
            return Err(Error::input(
                "train step",
                format!("{b} images do not split into {ranks} equal shares"),
            ));
        }
        self.ranks = ranks;
        let r = self.run_steps(std::slice::from_ref(batch), false, None);
        self.ranks = 1;
        r
    }

    /// Values per gradient bucket of data-parallel steps (default
    /// `BUCKET_VALUES`); 0 sums the whole buffer after backward instead.
    pub fn set_bucket_values(&mut self, values: usize) {
        self.bucket_values = values;
    }

    /// The group gradient buckets are summed on for `comm`: its duplicate,
    /// made once (every rank makes it at the same step). False where the
    /// buckets cannot overlap backward: buckets turned off, no duplicate,
    /// or gradients on CUDA with a group that cannot sum device memory on a
    /// stream (TCP: the whole buffer goes through the host after backward).
    fn bucket_comm(&mut self, comm: &Arc<dyn Collective>) -> Result<bool> {
        let key = Arc::as_ptr(comm) as *const () as usize;
        let cuda = self.model.device() != Device::Cpu;
        if self.bucket_values == 0 || (cuda && !comm.sums_on_stream()) {
            return Ok(false);
        }
        if self.grad_comm.as_ref().is_none_or(|(k, _)| *k != key) {
            self.grad_comm = Some((key, comm.duplicate()?));
        }
        Ok(self
            .grad_comm
            .as_ref()
            .and_then(|(_, c)| c.as_deref())
            .is_some_and(|c| !cuda || c.sums_on_stream()))
    }

    fn step_inner(&mut self, batch: &Batch, keep_grads: bool) -> Result<StepReport> {
        self.run_steps(std::slice::from_ref(batch), keep_grads, None)
    }

    fn steps_inner(&mut self, micro: &[Batch], keep_grads: bool) -> Result<StepReport> {
        self.run_steps(micro, keep_grads, None)
    }

    fn run_steps(
        &mut self,
        micro: &[Batch],
        keep_grads: bool,
        dist: Option<(&Arc<dyn Collective>, bool)>,
    ) -> Result<StepReport> {
        let comm = dist.map(|(c, _)| c.as_ref());
        let sync_bn = dist.filter(|d| d.1).map(|(c, _)| c);
        if micro.is_empty() {
            return Err(Error::input("train step", "no batch to step on"));
        }
        for batch in micro {
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
        }
        let k = micro.len();
        let (mut forward_s, mut backward_s) = (0.0, 0.0);
        let mut sum = LossTerms {
            loss: 0.0,
            focal: 0.0,
            dice: 0.0,
        };
        let mut all_logits = Vec::with_capacity(k);
        let mut kept = vec![];
        let overlap = match dist {
            Some((c, _)) => self.bucket_comm(c)?,
            None => false,
        };
        let (mut buckets, mut early) = (0, 0);
        for (mi, batch) in micro.iter().enumerate() {
            let t0 = Instant::now();
            let rec = self.register()?;
            // Until this micro-batch's backward is done.
            let _sync = sync_bn.map(|c| SyncBatchNorm::enter(Arc::clone(c)));
            let (logits, labels) = self.forward(batch)?;
            let (loss, terms, shares) = self.loss(batch, &logits, &labels)?;
            let mut finite = terms.loss.is_finite();
            if let Some(c) = comm {
                // Every rank learns whether any rank's loss is not finite.
                let mut bad = [f64::from(u8::from(!finite))];
                c.all_reduce_sum_f64(&mut bad)?;
                finite = bad[0] == 0.0;
            }
            if !finite {
                // Nothing was written: the store and the running statistics
                // keep the last finite step's values but this forward's
                // BatchNorm updates (a caller that stops here should reload
                // its last checkpoint).
                return Err(Error::NonFinite {
                    op: "train step",
                    msg: format!(
                        "the loss is {} (focal {}, dice {})",
                        terms.loss, terms.focal, terms.dice
                    ),
                });
            }
            sum.loss += terms.loss;
            sum.focal += terms.focal;
            sum.dice += terms.dice;
            forward_s += t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let ranks = comm.map_or(1, |c| c.world());
            let seed = Tensor::from_vec(vec![1.0 / (k * ranks * shares) as f32], [1])?
                .to_device(loss.device())?;
            // Each gradient goes into the store as soon as it is complete.
            if overlap && mi + 1 == k {
                // The last micro-batch: each bucket of the flat gradients is
                // summed over the ranks (on the duplicate group: by another
                // thread on the CPU, on the device's side stream on CUDA)
                // the moment its last slot is complete.
                let comm = self
                    .grad_comm
                    .as_ref()
                    .and_then(|(_, c)| c.as_deref())
                    .expect("bucket_comm said yes");
                let backward = |f: &mut GradSink<'_>| rec.backward_into(&loss, &seed, f);
                let kept = keep_grads.then_some(&mut kept);
                (buckets, early) = if self.model.device() == Device::Cpu {
                    reduce_during_backward(
                        &mut self.store,
                        comm,
                        self.bucket_values,
                        backward,
                        kept,
                    )?
                } else {
                    reduce_on_side_stream(
                        &mut self.store,
                        comm,
                        self.bucket_values,
                        backward,
                        kept,
                    )?
                };
            } else {
                let store = &mut self.store;
                rec.backward_into(&loss, &seed, &mut |_, name, g| {
                    store.accept_grad(name, &g)?;
                    if keep_grads {
                        kept.push((name.to_string(), g.to_host()?));
                    }
                    Ok(())
                })?;
            }
            backward_s += t1.elapsed().as_secs_f64();
            all_logits.push(logits.to_host()?);
        }
        let t2 = Instant::now();
        if let Some(c) = comm {
            if !overlap {
                self.store.all_reduce_grads(c)?;
                buckets = 1;
            }
            let mut t = [sum.loss, sum.focal, sum.dice];
            c.all_reduce_sum_f64(&mut t)?;
            let w = c.world() as f64;
            sum = LossTerms {
                loss: t[0] / w,
                focal: t[1] / w,
                dice: t[2] / w,
            };
        }
        let grad_norm = self.store.grad_norm()?;
        if !grad_norm.is_finite() {
            self.store.discard_grads();
            return Err(Error::NonFinite {
                op: "train step",
                msg: format!("the gradient norm is {grad_norm}; no update made"),
            });
        }
        self.adam()?;
        let optimizer_s = t2.elapsed().as_secs_f64();
        let logits = if k == 1 {
            all_logits.pop().expect("one micro-batch")
        } else {
            cat0(&all_logits.iter().collect::<Vec<_>>())?
        };
        let n = k as f64;
        Ok(StepReport {
            terms: LossTerms {
                loss: sum.loss / n,
                focal: sum.focal / n,
                dice: sum.dice / n,
            },
            grad_norm,
            logits,
            grads: kept,
            forward_s,
            backward_s,
            optimizer_s,
            buckets,
            buckets_during_backward: early,
        })
    }

    /// The loss of a forward: one focal + dice over all masks, or under
    /// `step_as_ranks` the sum of each share's (the caller divides by the
    /// shares, returned third; the terms are already their mean).
    fn loss(
        &self,
        batch: &Batch,
        logits: &Tensor,
        labels: &Tensor,
    ) -> Result<(Tensor, LossTerms, usize)> {
        let w = self.cfg.dice_weight;
        if self.ranks == 1 {
            let (l, t) = focal_dice(logits, labels, w)?;
            return Ok((l, t, 1));
        }
        let per = batch.boxes.len() / self.ranks;
        let dims = logits.dims().to_vec();
        let (m, px) = (dims[0], dims[1..].iter().product::<usize>());
        // Masks as rows of one item: a share is a run of rows.
        let (lr, yr) = (logits.reshape([1, m, px])?, labels.reshape([1, m, px])?);
        let mut total: Option<Tensor> = None;
        let mut terms = LossTerms {
            loss: 0.0,
            focal: 0.0,
            dice: 0.0,
        };
        let mut start = 0;
        for share in batch.boxes.chunks(per) {
            let len: usize = share.iter().map(Vec::len).sum();
            let mut shape = dims.clone();
            shape[0] = len;
            let l = narrow(&lr, start, len)?.reshape(shape.clone())?;
            let y = narrow(&yr, start, len)?.reshape(shape)?;
            let (sl, st) = focal_dice(&l, &y, w)?;
            terms.loss += st.loss;
            terms.focal += st.focal;
            terms.dice += st.dice;
            total = Some(match total {
                None => sl,
                Some(t) => add(&t, &sl)?,
            });
            start += len;
        }
        let n = self.ranks as f64;
        let terms = LossTerms {
            loss: terms.loss / n,
            focal: terms.focal / n,
            dice: terms.dice / n,
        };
        Ok((total.expect("at least one share"), terms, self.ranks))
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
    /// (ops::optim), over the store: the model's views are released so that
    /// the values are updated in place, then pointed at them again.
    fn adam(&mut self) -> Result<()> {
        let c = self.cfg;
        self.detach_views()?;
        // Python floats in the reference: hyper-parameters as f64.
        let r = self
            .store
            .adam(c.lr as f64, c.beta1 as f64, c.beta2 as f64, c.eps as f64);
        self.attach_views()?;
        r
    }
}

/// Where backward hands each complete gradient (slot, name, value).
pub type GradSink<'a> = dyn FnMut(usize, &str, Tensor) -> Result<()> + 'a;

/// One backward (`backward`, given the gradient callback) whose gradients
/// go into `store` while the store's buckets (`ParamStore::buckets`) are
/// summed over the ranks of `comm` by a second thread, each launched the
/// moment its last slot is complete; the buckets left incomplete at the end
/// (none when every slot gets a gradient) follow in store order. The ranks
/// complete buckets in the same order (the same graph), so their calls
/// pair up; a bucket's sum is the same bits as the whole buffer's.
/// Returns (buckets, launched during backward).
fn reduce_during_backward(
    store: &mut ParamStore,
    comm: &dyn Collective,
    bucket_values: usize,
    backward: impl FnOnce(&mut GradSink<'_>) -> Result<()>,
    mut kept: Option<&mut Vec<(String, Tensor)>>,
) -> Result<(usize, usize)> {
    let mut buckets = Buckets::new(store, bucket_values);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Vec<f32>)>();
    std::thread::scope(|scope| {
        let reducer = scope.spawn(move || -> Result<Vec<(usize, Vec<f32>)>> {
            let mut done = vec![];
            for (b, mut v) in rx {
                comm.all_reduce_sum(&mut v)?;
                done.push((b, v));
            }
            Ok(done)
        });
        let send = |store: &mut ParamStore, b: usize, span: std::ops::Range<usize>| {
            let g = store.cpu_grads_mut().expect("gradients on the CPU");
            // A send fails only when the reducer stopped on an error, which
            // its join reports.
            let _ = tx.send((b, g[span].to_vec()));
        };
        let r = backward(&mut |_, name, g| {
            store.accept_grad(name, &g)?;
            if let Some(k) = kept.as_deref_mut() {
                k.push((name.to_string(), g.to_host()?));
            }
            if let Some(b) = buckets.arrived(store, name) {
                send(store, b, buckets.spans[b].clone());
            }
            Ok(())
        });
        if r.is_ok() && store.cpu_grads_mut().is_some() {
            for b in buckets.rest() {
                send(store, b, buckets.spans[b].clone());
            }
        }
        drop(tx);
        let done = reducer
            .join()
            .map_err(|_| Error::input("train step", "the gradient reducer panicked"))?;
        r?;
        let done = done?;
        let g = store
            .cpu_grads_mut()
            .ok_or_else(|| Error::input("train step", "no gradient to reduce"))?;
        for (b, v) in &done {
            g[buckets.spans[*b].clone()].copy_from_slice(v);
        }
        Ok((buckets.spans.len(), buckets.early))
    })
}

/// The CUDA form of `reduce_during_backward`: the moment a bucket's last
/// slot is written (on the device's main stream), the side stream waits for
/// an event recorded there and sums the bucket over the ranks in place
/// (`Collective::all_reduce_sum_on_stream`) while backward goes on; the
/// buckets left incomplete follow in store order. Then the main stream waits
/// for the side stream, so what reads the gradients next (the norm, Adam)
/// reads the sums; the host waits for none of it (NCCL). Even when backward
/// fails the main stream is joined to the side stream before returning, so
/// no sum is still running on memory that may be freed.
/// Returns (buckets, launched during backward).
pub fn reduce_on_side_stream(
    store: &mut ParamStore,
    comm: &dyn Collective,
    bucket_values: usize,
    backward: impl FnOnce(&mut GradSink<'_>) -> Result<()>,
    mut kept: Option<&mut Vec<(String, Tensor)>>,
) -> Result<(usize, usize)> {
    type Side = Option<(
        Arc<crate::cuda::CudaDevice>,
        Arc<cudarc::driver::CudaStream>,
    )>;
    let mut buckets = Buckets::new(store, bucket_values);
    let mut side: Side = None;
    // A bucket's sum, enqueued on the side stream behind everything the
    // main stream holds now (its last slot's write included).
    let launch =
        |store: &mut ParamStore, side: &mut Side, span: std::ops::Range<usize>| -> Result<()> {
            let (dev, mut g) = store.cuda_grads_mut()?;
            let s = match side {
                Some((_, s)) => s.clone(),
                None => {
                    let s = dev.side_stream()?;
                    *side = Some((dev.clone(), s.clone()));
                    s
                }
            };
            dev.order(&s, dev.stream())?;
            comm.all_reduce_sum_on_stream(&s, &mut g.slice_mut(span))
        };
    let r = backward(&mut |_, name, g| {
        store.accept_grad(name, &g)?;
        if let Some(k) = kept.as_deref_mut() {
            k.push((name.to_string(), g.to_host()?));
        }
        if let Some(b) = buckets.arrived(store, name) {
            launch(store, &mut side, buckets.spans[b].clone())?;
        }
        Ok(())
    });
    let rest = || -> Result<()> {
        r?;
        if store.grads().is_some() {
            for b in buckets.rest() {
                launch(store, &mut side, buckets.spans[b].clone())?;
            }
        }
        Ok(())
    };
    let done = rest();
    // Whatever happened, nothing may touch the gradients before the sums
    // launched so far are done (backward's own error first).
    let joined = match &side {
        Some((dev, s)) => dev.order(dev.stream(), s),
        None => Ok(()),
    };
    done?;
    joined?;
    Ok((buckets.spans.len(), buckets.early))
}

/// The buckets of one backward (`ParamStore::buckets`) as their slots'
/// gradients arrive: which bucket each slot is in, how many slots each still
/// waits for, which were launched.
struct Buckets {
    /// Each bucket's values in the flat buffers.
    spans: Vec<std::ops::Range<usize>>,
    bucket_of: Vec<usize>,
    missing: Vec<usize>,
    launched: Vec<bool>,
    /// Launched during backward.
    early: usize,
}

impl Buckets {
    fn new(store: &ParamStore, bucket_values: usize) -> Self {
        let plan = store.buckets(bucket_values);
        let mut bucket_of = vec![0usize; store.slots().len()];
        for (b, r) in plan.iter().enumerate() {
            r.clone().for_each(|i| bucket_of[i] = b);
        }
        Buckets {
            spans: plan.iter().map(|r| store.span(r)).collect(),
            missing: plan.iter().map(|r| r.len()).collect(),
            launched: vec![false; plan.len()],
            bucket_of,
            early: 0,
        }
    }

    /// `name`'s gradient is in the store: the bucket it completes, if any
    /// (counted as launched during backward).
    fn arrived(&mut self, store: &ParamStore, name: &str) -> Option<usize> {
        let b = self.bucket_of[store.slot_index(name)?];
        self.missing[b] -= 1;
        (self.missing[b] == 0).then(|| {
            self.launched[b] = true;
            self.early += 1;
            b
        })
    }

    /// The buckets not launched yet, in store order (now counted launched).
    fn rest(&mut self) -> Vec<usize> {
        let rest: Vec<usize> = (0..self.launched.len())
            .filter(|&b| !self.launched[b])
            .collect();
        rest.iter().for_each(|&b| self.launched[b] = true);
        rest
    }
}
