//! A training run over prepared data (what `tools/train` drives): epochs of
//! shuffled images, several micro-batches per update when asked (gradient
//! accumulation), MultiStepLR by epoch as the authors' trainer, validation
//! on the held-out split, checkpoints that resume bit for bit, one JSON
//! line per event in `log.jsonl`.
//!
//! Everything a step depends on is a function of the configuration and the
//! position (epoch, step in epoch): the image order and every random number
//! of the loader are keyed (data::loader), the learning rate follows the
//! epoch, and a checkpoint holds the rest (the model's values and BatchNorm
//! buffers, Adam's moments and step). Resuming from a checkpoint therefore
//! needs no hidden state and gives the same bytes as a run never stopped.
//!
//! Layout of a run's folder:
//!
//! ```text
//! run.json                      the configuration
//! log.jsonl                     one line per step, validation, epoch, checkpoint
//! checkpoints/step-00000120/    model.safetensors, optimizer.safetensors, state.json
//! best/                         the checkpoint with the best validation Dice
//! curves.svg, curves.png        loss and validation Dice
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::Instant;

use safetensors::Dtype;
use serde_json::{Value, json};

use crate::data::loader::{PreparedSet, SplitBy, epoch_order, split};
use crate::error::{Error, Result};
use crate::io::Weights;
use crate::io::weights::write_safetensors;
use crate::io::write_atomic;
use crate::model::Trace;
use crate::ops::resize::bilinear;
use crate::tensor::{Device, Tensor};

use super::{Batch, TrainConfig, Trainer};
use crate::dist::Collective;

/// What a run does; saved in `run.json` and in every checkpoint.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// A folder written by `prepare`.
    pub data: PathBuf,
    /// The run's folder (checkpoints, logs, plots).
    pub out: PathBuf,
    pub device: Device,
    pub epochs: u64,
    /// Images per micro-batch (the authors: 16), 5 masks each.
    pub batch_images: usize,
    /// Micro-batches per update (gradient accumulation; 1: none).
    pub accumulate: usize,
    pub masks_per_image: usize,
    pub lr: f32,
    /// MultiStepLR: at each of these epochs the learning rate is multiplied
    /// by `gamma`.
    pub milestones: Vec<u64>,
    pub gamma: f32,
    pub seed: u64,
    /// The training side of the split (the authors: 0.8 per modality).
    pub train_fraction: f64,
    pub split_by: SplitBy,
    /// Validate every this many updates (0: at the end of each epoch), and
    /// after the last.
    pub val_every: u64,
    /// Checkpoint every this many updates (0: at the end of each epoch), and
    /// after the last.
    pub save_every: u64,
    /// Checkpoints kept (the newest), besides `best/`.
    pub keep: usize,
    /// Stop after this many updates in all (a checkpoint is written there).
    pub max_steps: Option<u64>,
    /// Ranks training together (data parallel; set by the run from its
    /// group): each takes `batch_images` per micro-batch, so the global
    /// batch is `batch_images x accumulate x world`.
    pub world: usize,
    /// SyncBatchNorm across the ranks (the authors'); false keeps each
    /// rank's statistics (PyTorch DDP without SyncBatchNorm).
    pub sync_bn: bool,
    /// MiB of f32 gradients per bucket summed over the ranks while backward
    /// runs (PyTorch DDP's `bucket_cap_mb`, 25 by default); 0 sums the whole
    /// buffer after backward.
    pub bucket_mb: f64,
}

impl RunConfig {
    /// Defaults as the authors train (lr 1e-4, 16 images, 5 masks, 80/20
    /// split by image) with the run's data and folder.
    pub fn new(data: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        RunConfig {
            data: data.into(),
            out: out.into(),
            device: Device::Cpu,
            epochs: 1,
            batch_images: 16,
            accumulate: 1,
            masks_per_image: 5,
            lr: 1e-4,
            milestones: vec![],
            gamma: 0.1,
            seed: 0,
            train_fraction: 0.8,
            split_by: SplitBy::Image,
            val_every: 0,
            save_every: 0,
            keep: 3,
            max_steps: None,
            world: 1,
            sync_bn: true,
            bucket_mb: 25.0,
        }
    }

    /// `bucket_mb` in f32 values.
    fn bucket_values(&self) -> usize {
        (self.bucket_mb * (1 << 18) as f64).round() as usize
    }

    fn to_json(&self) -> Value {
        json!({
            "data": self.data.to_string_lossy(),
            "out": self.out.to_string_lossy(),
            "device": self.device.to_string(),
            "epochs": self.epochs,
            "batch_images": self.batch_images,
            "accumulate": self.accumulate,
            "masks_per_image": self.masks_per_image,
            "lr": self.lr,
            "milestones": self.milestones,
            "gamma": self.gamma,
            "seed": self.seed,
            "train_fraction": self.train_fraction,
            "split_by": match self.split_by { SplitBy::Image => "image", SplitBy::Case => "case" },
            "val_every": self.val_every,
            "save_every": self.save_every,
            "keep": self.keep,
            "max_steps": self.max_steps,
            "world": self.world,
            "sync_bn": self.sync_bn,
            "bucket_mb": self.bucket_mb,
        })
    }

    fn from_json(v: &Value) -> Result<Self> {
        let bad =
            |k: &str| Error::input("run config", format!("`{k}` missing or of the wrong type"));
        let u = |k: &str| v[k].as_u64().ok_or_else(|| bad(k));
        let f = |k: &str| v[k].as_f64().ok_or_else(|| bad(k));
        let s = |k: &str| v[k].as_str().ok_or_else(|| bad(k));
        Ok(RunConfig {
            data: s("data")?.into(),
            out: s("out")?.into(),
            device: s("device")?.parse()?,
            epochs: u("epochs")?,
            batch_images: u("batch_images")? as usize,
            accumulate: u("accumulate")? as usize,
            masks_per_image: u("masks_per_image")? as usize,
            lr: f("lr")? as f32,
            milestones: v["milestones"]
                .as_array()
                .ok_or_else(|| bad("milestones"))?
                .iter()
                .map(|m| m.as_u64().ok_or_else(|| bad("milestones")))
                .collect::<Result<_>>()?,
            gamma: f("gamma")? as f32,
            seed: u("seed")?,
            train_fraction: f("train_fraction")?,
            split_by: match s("split_by")? {
                "case" => SplitBy::Case,
                _ => SplitBy::Image,
            },
            val_every: u("val_every")?,
            save_every: u("save_every")?,
            keep: u("keep")? as usize,
            max_steps: v["max_steps"].as_u64(),
            // Runs from before data parallelism: one rank.
            world: v["world"].as_u64().unwrap_or(1) as usize,
            sync_bn: v["sync_bn"].as_bool().unwrap_or(true),
            bucket_mb: v["bucket_mb"].as_f64().unwrap_or(25.0),
        })
    }

    fn check(&self) -> Result<()> {
        let fail = |m: String| Err(Error::input("run config", m));
        if !(self.bucket_mb.is_finite() && self.bucket_mb >= 0.0) {
            return fail(format!(
                "gradient bucket size {} MiB: must be 0 (sum after backward) or more",
                self.bucket_mb
            ));
        }
        if self.epochs == 0 {
            return fail("0 epochs: a run trains at least one".into());
        }
        if self.batch_images == 0 || self.accumulate == 0 || self.masks_per_image == 0 {
            return fail(format!(
                "images per batch {}, accumulation {}, masks per image {}: each must be at least 1",
                self.batch_images, self.accumulate, self.masks_per_image
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) || !(self.gamma.is_finite() && self.gamma > 0.0)
        {
            return fail(format!(
                "learning rate {} and gamma {} must be positive",
                self.lr, self.gamma
            ));
        }
        if !(self.train_fraction > 0.0 && self.train_fraction <= 1.0) {
            return fail(format!(
                "training fraction {} is not in (0, 1]",
                self.train_fraction
            ));
        }
        if self.keep == 0 {
            return fail("keep at least one checkpoint".into());
        }
        Ok(())
    }

    /// MultiStepLR: lr x gamma^(milestones reached by `epoch`).
    pub fn lr_at(&self, epoch: u64) -> f32 {
        let n = self.milestones.iter().filter(|&&m| m <= epoch).count();
        (self.lr as f64 * (self.gamma as f64).powi(n as i32)) as f32
    }
}

/// Validation figures (EVAL.md's per-mask Dice and IoU, eps 1e-7, mean over
/// masks), overall and per modality.
#[derive(Clone, Debug, Default)]
pub struct ValReport {
    pub dice: f64,
    pub iou: f64,
    pub masks: usize,
    /// modality -> (Dice, IoU, masks)
    pub per_modality: BTreeMap<String, (f64, f64, usize)>,
    /// Every mask's (Dice, IoU), in image and mask order.
    pub per_mask: Vec<(f64, f64)>,
    pub seconds: f64,
}

/// What the run reports as it goes (for a progress display; the same
/// figures go to `log.jsonl`).
#[derive(Clone, Debug)]
pub enum Event {
    /// The run is about to take updates `first..last` (last: the total).
    Start {
        first: u64,
        last: u64,
        steps_per_epoch: u64,
    },
    Step {
        step: u64,
        epoch: u64,
        loss: f64,
        images_per_s: f64,
        data_wait_s: f64,
    },
    Validation {
        step: u64,
        report: ValReport,
    },
    Checkpoint {
        step: u64,
        path: PathBuf,
    },
}

/// This process's rank of a data-parallel run: the group it trains with.
/// Rank 0 alone writes the run's folder (log, checkpoints, plots); every
/// rank reads its own shard of each epoch and a share of the validation
/// images.
#[derive(Clone)]
pub struct DataParallel {
    pub comm: Arc<dyn Collective>,
}

/// A run in progress: the trainer, the data and where the run stands.
pub struct Session {
    pub cfg: RunConfig,
    dp: Option<DataParallel>,
    trainer: Trainer,
    data: Arc<PreparedSet>,
    train_ids: Vec<usize>,
    val_ids: Vec<usize>,
    /// Updates taken, and the position: (epoch, update within the epoch)
    /// of the next one.
    step: u64,
    epoch: u64,
    step_in_epoch: u64,
    best: Option<(f64, u64)>,
    /// The log (rank 0 only).
    log: Option<std::fs::File>,
    /// What changed when the run was resumed on another number of ranks.
    regrouped: Option<String>,
}

const STATE_FORMAT: u64 = 1;

impl Session {
    /// A new run from starting weights (any form Weights reads).
    pub fn new(cfg: RunConfig, init: &Weights) -> Result<Self> {
        Self::new_ranked(cfg, init, None)
    }

    /// A new run as one rank of a data-parallel group (None: alone). Every
    /// rank starts from the same weights.
    pub fn new_ranked(
        mut cfg: RunConfig,
        init: &Weights,
        dp: Option<DataParallel>,
    ) -> Result<Self> {
        cfg.world = dp.as_ref().map_or(1, |d| d.comm.world());
        cfg.check()?;
        let data = Arc::new(PreparedSet::open(&cfg.data)?);
        let mut trainer = Trainer::new(
            init,
            cfg.device,
            TrainConfig {
                lr: cfg.lr_at(0),
                ..TrainConfig::default()
            },
        )?;
        trainer.set_bucket_values(cfg.bucket_values());
        let log = if is_leader(&dp) {
            mkdir(&cfg.out)?;
            let log_path = cfg.out.join("log.jsonl");
            let log = std::fs::File::create(&log_path).map_err(|e| io(&log_path, e))?;
            write_atomic(
                &cfg.out.join("run.json"),
                serde_json::to_string_pretty(&cfg.to_json())
                    .expect("JSON")
                    .as_bytes(),
            )?;
            Some(log)
        } else {
            None
        };
        let mut s = Self::assemble(cfg, trainer, data, log, dp)?;
        s.log_line(json!({"event": "start", "config": s.cfg.to_json(),
            "train_images": s.train_ids.len(), "val_images": s.val_ids.len()}))?;
        Ok(s)
    }

    fn assemble(
        cfg: RunConfig,
        trainer: Trainer,
        data: Arc<PreparedSet>,
        log: Option<std::fs::File>,
        dp: Option<DataParallel>,
    ) -> Result<Self> {
        let (train_ids, val_ids) = split(&data.images, cfg.train_fraction, cfg.split_by, cfg.seed);
        if train_ids.is_empty() {
            return Err(Error::input(
                "training run",
                format!(
                    "{}: no image on the training side of the split",
                    cfg.data.display()
                ),
            ));
        }
        Ok(Session {
            cfg,
            dp,
            trainer,
            data,
            train_ids,
            val_ids,
            step: 0,
            epoch: 0,
            step_in_epoch: 0,
            best: None,
            log,
            regrouped: None,
        })
    }

    /// Continues a run from a checkpoint folder, or from a run's folder
    /// (its newest checkpoint). `device`, `epochs` and `max_steps` may be
    /// changed; the rest is the run's. The log keeps what happened up to
    /// the checkpoint.
    pub fn resume(
        path: &Path,
        device: Option<Device>,
        epochs: Option<u64>,
        max_steps: Option<Option<u64>>,
    ) -> Result<Self> {
        Self::resume_ranked(path, device, epochs, max_steps, None)
    }

    /// `resume` as one rank of a data-parallel group. With another number
    /// of ranks than the run had, the global batch (images per update) is
    /// kept when it divides among the new ranks (each rank's batch changes,
    /// and the rest of the interrupted epoch is dealt anew); otherwise
    /// resuming is refused with the figures. `changed` reports what changed.
    pub fn resume_ranked(
        path: &Path,
        device: Option<Device>,
        epochs: Option<u64>,
        max_steps: Option<Option<u64>>,
        dp: Option<DataParallel>,
    ) -> Result<Self> {
        let ck = if path.join("state.json").is_file() {
            path.to_path_buf()
        } else {
            latest_checkpoint(&path.join("checkpoints"))?.ok_or_else(|| {
                Error::input("resume", format!("{}: no checkpoint in it", path.display()))
            })?
        };
        let sp = ck.join("state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| io(&sp, e))?;
        let st: Value = serde_json::from_str(&text)
            .map_err(|e| Error::input("resume", format!("{}: not JSON: {e}", sp.display())))?;
        if st["format"].as_u64() != Some(STATE_FORMAT) {
            return Err(Error::input(
                "resume",
                format!("{}: unknown state format", sp.display()),
            ));
        }
        let mut cfg = RunConfig::from_json(&st["config"])?;
        if let Some(d) = device {
            cfg.device = d;
        }
        if let Some(e) = epochs {
            cfg.epochs = e;
        }
        if let Some(m) = max_steps {
            cfg.max_steps = m;
        }
        let world = dp.as_ref().map_or(1, |d| d.comm.world());
        let mut regroup = None;
        if world != cfg.world {
            let global = cfg.batch_images * cfg.world;
            if global % world != 0 {
                return Err(Error::input(
                    "resume",
                    format!(
                        "the run trained on {} rank(s) x {} images = {global} images per micro-batch; \
                         {global} does not divide among {world} ranks (resume with a number of ranks \
                         that divides {global})",
                        cfg.world, cfg.batch_images
                    ),
                ));
            }
            regroup = Some(format!(
                "{} rank(s) x {} images -> {world} ranks x {} images (the same {global} images per \
                 micro-batch); the rest of epoch {} is dealt anew among the ranks",
                cfg.world,
                cfg.batch_images,
                global / world,
                "{}"
            ));
            cfg.batch_images = global / world;
            cfg.world = world;
        }
        cfg.check()?;
        let data = Arc::new(PreparedSet::open(&cfg.data)?);
        let fp = data_fingerprint(&data);
        if st["data_fingerprint"].as_str() != Some(fp.as_str()) {
            return Err(Error::input(
                "resume",
                format!(
                    "{}: the prepared data is not the one this run trained on",
                    cfg.data.display()
                ),
            ));
        }
        let mp = ck.join("model.safetensors");
        let w = Weights::from_file(&mp)?;
        let u = |k: &str| {
            st[k]
                .as_u64()
                .ok_or_else(|| Error::input("resume", format!("{}: no {k}", sp.display())))
        };
        let (step, epoch, step_in_epoch, adam_step) = (
            u("step")?,
            u("epoch")?,
            u("step_in_epoch")?,
            u("adam_step")?,
        );
        let mut trainer = Trainer::new(
            &w,
            cfg.device,
            TrainConfig {
                lr: cfg.lr_at(epoch),
                ..TrainConfig::default()
            },
        )?;
        trainer.set_bucket_values(cfg.bucket_values());
        drop(w);
        let counters = read_counters(&mp)?;
        trainer.set_batch_norm_counters(&counters)?;
        let op = ck.join("optimizer.safetensors");
        let ow = Weights::from_file(&op)?;
        trainer.set_optimizer_state(adam_step, ow.req("exp_avg")?, ow.req("exp_avg_sq")?)?;
        let names: Vec<&str> = st["store"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let ours: Vec<&str> = trainer
            .store()
            .slots()
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        if names != ours {
            return Err(Error::input(
                "resume",
                format!(
                    "{}: the optimizer state is laid out for other parameters",
                    op.display()
                ),
            ));
        }
        // The log up to the checkpoint; what came after it is redone.
        let log = if is_leader(&dp) {
            let log_path = cfg.out.join("log.jsonl");
            let kept = read_log(&log_path)
                .unwrap_or_default()
                .into_iter()
                .filter(|l| {
                    l["step"].as_u64().is_none_or(|s| s <= step) && l["event"] != "stopped"
                });
            let mut text = String::new();
            for l in kept {
                text.push_str(&l.to_string());
                text.push('\n');
            }
            mkdir(&cfg.out)?;
            write_atomic(&log_path, text.as_bytes())?;
            Some(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log_path)
                    .map_err(|e| io(&log_path, e))?,
            )
        } else {
            None
        };
        let mut s = Self::assemble(cfg, trainer, data, log, dp)?;
        s.step = step;
        s.epoch = epoch;
        s.step_in_epoch = step_in_epoch;
        s.best = st["best_dice"].as_f64().zip(st["best_step"].as_u64());
        // With another number of ranks the epoch's updates change: go on
        // at the update that covers the images already seen.
        if let Some(msg) = regroup {
            if s.step_in_epoch >= s.steps_per_epoch() {
                s.epoch += 1;
                s.step_in_epoch = 0;
            }
            s.regrouped = Some(msg.replace("{}", &epoch.to_string()));
        }
        s.log_line(
            json!({"event": "resume", "step": step, "from": ck.to_string_lossy(),
            "world": s.cfg.world, "regrouped": s.regrouped}),
        )?;
        Ok(s)
    }

    pub fn trainer(&mut self) -> &mut Trainer {
        &mut self.trainer
    }

    /// This process's rank and the number of ranks.
    pub fn rank(&self) -> (usize, usize) {
        self.dp
            .as_ref()
            .map_or((0, 1), |d| (d.comm.rank(), d.comm.world()))
    }

    /// Set when the run was resumed on another number of ranks: what
    /// changed.
    pub fn regrouped(&self) -> Option<&str> {
        self.regrouped.as_deref()
    }

    /// Updates taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    pub fn train_images(&self) -> &[usize] {
        &self.train_ids
    }

    pub fn val_images(&self) -> &[usize] {
        &self.val_ids
    }

    pub fn data(&self) -> &PreparedSet {
        &self.data
    }

    /// Updates per epoch: each rank's shard of the training split (all of
    /// it for one rank), batch x accumulation per update, the last one
    /// smaller when they do not divide.
    pub fn steps_per_epoch(&self) -> u64 {
        let per = self.cfg.batch_images * self.cfg.accumulate;
        let shard = self.train_ids.len().div_ceil(self.cfg.world);
        shard.div_ceil(per) as u64
    }

    fn last_step(&self) -> u64 {
        let all = self.cfg.epochs * self.steps_per_epoch();
        self.cfg.max_steps.map_or(all, |m| m.min(all))
    }

    /// Trains until the configured epochs (or `max_steps`) are done:
    /// validating, checkpointing and logging on the way; plots at the end.
    /// A NaN or infinite loss stops the run with `Error::NonFinite`; the
    /// checkpoints written before it stay as they were.
    pub fn run(&mut self, on: &mut dyn FnMut(&Event)) -> Result<()> {
        let last = self.last_step();
        let spe = self.steps_per_epoch();
        on(&Event::Start {
            first: self.step,
            last,
            steps_per_epoch: spe,
        });
        while self.step < last {
            let epoch = self.epoch;
            self.trainer.set_lr(self.cfg.lr_at(epoch))?;
            let stop_in_epoch = (last - self.step + self.step_in_epoch).min(spe);
            let rx = self.prefetch(epoch, self.step_in_epoch, stop_in_epoch);
            let (mut loss_sum, mut n_steps, mut images, t_epoch) =
                (0.0, 0u64, 0usize, Instant::now());
            let mut wait_total = 0.0;
            while self.step_in_epoch < stop_in_epoch {
                let t_wait = Instant::now();
                let micro = rx
                    .recv()
                    .map_err(|_| Error::input("loader", "the loader thread stopped"))??;
                let data_wait_s = t_wait.elapsed().as_secs_f64();
                wait_total += data_wait_s;
                let t_step = Instant::now();
                // Images in the update, over every rank.
                let n_img: usize =
                    micro.iter().map(|b| b.boxes.len()).sum::<usize>() * self.cfg.world;
                let stepped = match &self.dp {
                    Some(dp) => self
                        .trainer
                        .step_distributed(&micro, &dp.comm, self.cfg.sync_bn),
                    None => self.trainer.step_accumulated(&micro),
                };
                let r = match stepped {
                    Ok(r) => r,
                    Err(e @ Error::NonFinite { .. }) => {
                        let last_good = latest_checkpoint(&self.cfg.out.join("checkpoints"))
                            .ok()
                            .flatten();
                        self.log_line(json!({"event": "stopped", "step": self.step + 1,
                            "reason": e.to_string(),
                            "last_checkpoint": last_good.as_ref().map(|p| p.to_string_lossy().into_owned())}))?;
                        return Err(Error::NonFinite {
                            op: "training run",
                            msg: format!(
                                "update {} of epoch {epoch}: {e}; stopped; last good checkpoint: {}",
                                self.step + 1,
                                last_good.map_or("none".into(), |p| p.display().to_string())
                            ),
                        });
                    }
                    Err(e) => return Err(e),
                };
                let dt = t_step.elapsed().as_secs_f64();
                self.step += 1;
                self.step_in_epoch += 1;
                loss_sum += r.terms.loss;
                n_steps += 1;
                images += n_img;
                let ips = n_img as f64 / (dt + data_wait_s).max(1e-9);
                self.log_line(json!({"event": "step", "step": self.step, "epoch": epoch,
                    "step_in_epoch": self.step_in_epoch, "loss": r.terms.loss, "focal": r.terms.focal,
                    "dice_loss": r.terms.dice, "grad_norm": r.grad_norm, "lr": self.trainer.lr(),
                    "images": n_img, "images_per_s": ips, "data_wait_s": data_wait_s,
                    "forward_s": r.forward_s, "backward_s": r.backward_s, "optimizer_s": r.optimizer_s}))?;
                on(&Event::Step {
                    step: self.step,
                    epoch,
                    loss: r.terms.loss,
                    images_per_s: ips,
                    data_wait_s,
                });
                let epoch_done = self.step_in_epoch == spe;
                if epoch_done {
                    self.epoch += 1;
                    self.step_in_epoch = 0;
                }
                let now = self.step;
                let every = |k: u64| if k == 0 { epoch_done } else { now % k == 0 };
                let validate = every(self.cfg.val_every) || self.step == last;
                let mut best_now = false;
                if validate && !self.val_ids.is_empty() {
                    let rep = self.validate()?;
                    best_now = self.best.is_none_or(|(d, _)| rep.dice > d);
                    if best_now {
                        self.best = Some((rep.dice, self.step));
                    }
                    let per: serde_json::Map<String, Value> = rep
                        .per_modality
                        .iter()
                        .map(|(m, (d, i, n))| (m.clone(), json!({"dice": d, "iou": i, "masks": n})))
                        .collect();
                    self.log_line(json!({"event": "val", "step": self.step, "epoch": epoch,
                        "dice": rep.dice, "iou": rep.iou, "masks": rep.masks, "per_modality": per,
                        "seconds": rep.seconds, "best": best_now}))?;
                    on(&Event::Validation {
                        step: self.step,
                        report: rep,
                    });
                }
                let save = every(self.cfg.save_every) || self.step == last;
                if (save || best_now) && self.log.is_some() {
                    let path = self.save_checkpoint(save, best_now)?;
                    if save {
                        on(&Event::Checkpoint {
                            step: self.step,
                            path,
                        });
                    }
                }
                if epoch_done {
                    break;
                }
            }
            let secs = t_epoch.elapsed().as_secs_f64();
            if n_steps > 0 {
                self.log_line(json!({"event": "epoch", "epoch": epoch, "step": self.step,
                    "complete": self.step_in_epoch == 0, "loss_mean": loss_sum / n_steps as f64,
                    "images_per_s": images as f64 / secs.max(1e-9), "data_wait_s": wait_total, "seconds": secs}))?;
            }
        }
        if self.log.is_some() {
            write_plots(&self.cfg.out)?;
        }
        Ok(())
    }

    /// Batches for updates [from, to) of `epoch`, built ahead on a thread
    /// of their own (two updates in flight).
    fn prefetch(&self, epoch: u64, from: u64, to: u64) -> Receiver<Result<Vec<Batch>>> {
        let (tx, rx) = sync_channel(2);
        let data = Arc::clone(&self.data);
        let order: Vec<usize> = epoch_order(self.train_ids.len(), self.cfg.seed, epoch)
            .into_iter()
            .map(|i| self.train_ids[i])
            .collect();
        let (rank, world) = self.rank();
        let order = rank_shard(&order, rank, world);
        let (b, a, k, seed) = (
            self.cfg.batch_images,
            self.cfg.accumulate,
            self.cfg.masks_per_image,
            self.cfg.seed,
        );
        std::thread::spawn(move || {
            for j in from..to {
                let start = (j as usize * b * a).min(order.len());
                let end = (start + b * a).min(order.len());
                let micro: Result<Vec<Batch>> = order[start..end]
                    .chunks(b)
                    .map(|ids| data.batch(ids, seed, epoch, k))
                    .collect();
                let failed = micro.is_err();
                if tx.send(micro).is_err() || failed {
                    return;
                }
            }
        });
        rx
    }

    /// The validation split under the test protocol (`evaluate`); with
    /// several ranks each evaluates every world-th image and the masks'
    /// figures are gathered, so that every rank gets the report one process
    /// would.
    pub fn validate(&mut self) -> Result<ValReport> {
        let Some(dp) = &self.dp else {
            return evaluate(&mut self.trainer, &self.data, &self.val_ids);
        };
        let t0 = Instant::now();
        let (rank, world) = (dp.comm.rank(), dp.comm.world());
        let mine: Vec<usize> = self
            .val_ids
            .iter()
            .copied()
            .skip(rank)
            .step_by(world)
            .collect();
        self.trainer.set_training(false);
        let r = evaluate_rows(&self.trainer, &self.data, &mine);
        self.trainer.set_training(true);
        let rows = r?;
        // Every mask's slot in the whole split, (Dice, IoU) each: this
        // rank's filled, zero elsewhere; summed over ranks = gathered.
        let counts: Vec<usize> = self
            .val_ids
            .iter()
            .map(|&i| self.data.images[i].masks.len())
            .collect();
        let starts: Vec<usize> = counts
            .iter()
            .scan(0, |acc, &c| {
                let s = *acc;
                *acc += c;
                Some(s)
            })
            .collect();
        let total: usize = counts.iter().sum();
        let mut all = vec![0.0f64; 2 * total];
        let mut it = rows.iter();
        for k in (rank..self.val_ids.len()).step_by(world) {
            for m in 0..counts[k] {
                let r = it.next().ok_or_else(|| {
                    Error::input(
                        "validation",
                        "an image gave fewer masks than its index lists",
                    )
                })?;
                all[2 * (starts[k] + m)] = r.1;
                all[2 * (starts[k] + m) + 1] = r.2;
            }
        }
        dp.comm.all_reduce_sum_f64(&mut all)?;
        let rows: Vec<(String, f64, f64)> = self
            .val_ids
            .iter()
            .zip(&counts)
            .enumerate()
            .flat_map(|(k, (&i, &c))| {
                let all = &all;
                let start = starts[k];
                let m = self.data.images[i].modality.clone();
                (0..c).map(move |j| (m.clone(), all[2 * (start + j)], all[2 * (start + j) + 1]))
            })
            .collect();
        let mut rep = report(&rows);
        rep.seconds = t0.elapsed().as_secs_f64();
        Ok(rep)
    }

    fn state_json(&self) -> Value {
        json!({
            "format": STATE_FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "adam_step": self.trainer.steps(),
            "lr": self.trainer.lr(),
            "best_dice": self.best.map(|b| b.0),
            "best_step": self.best.map(|b| b.1),
            "data_fingerprint": data_fingerprint(&self.data),
            "store": self.trainer.store().slots().iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
            "config": self.cfg.to_json(),
        })
    }

    /// Writes `checkpoints/step-N/` (when `regular`) and `best/` (when
    /// `best`), each atomically: a temporary folder, every file synced, then
    /// one rename. Keeps the newest `keep` checkpoints.
    fn save_checkpoint(&mut self, regular: bool, best: bool) -> Result<PathBuf> {
        let dir = self.cfg.out.join("checkpoints");
        mkdir(&dir)?;
        let name = format!("step-{:08}", self.step);
        let tmp = dir.join(format!(".{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        mkdir(&tmp)?;
        self.write_checkpoint_files(&tmp)?;
        let mut out = dir.join(&name);
        if best {
            let b = self.cfg.out.join("best");
            let btmp = self.cfg.out.join(".best.tmp");
            if btmp.exists() {
                std::fs::remove_dir_all(&btmp).map_err(|e| io(&btmp, e))?;
            }
            if regular {
                copy_dir(&tmp, &btmp)?;
            } else {
                std::fs::rename(&tmp, &btmp).map_err(|e| io(&btmp, e))?;
            }
            replace_dir(&btmp, &b)?;
            out = b;
        }
        if regular {
            replace_dir(&tmp, &dir.join(&name))?;
            out = dir.join(&name);
            let mut all = checkpoints(&dir)?;
            while all.len() > self.cfg.keep {
                let old = all.remove(0);
                std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
            }
            self.log_line(
                json!({"event": "checkpoint", "step": self.step, "path": out.to_string_lossy()}),
            )?;
        }
        Ok(out)
    }

    fn write_checkpoint_files(&mut self, dir: &Path) -> Result<()> {
        // The model: f32 values and buffers under the official names, and
        // BatchNorm's counters as int64 (PyTorch's dtype for them).
        let w = self.trainer.weights()?;
        let mut recs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = w
            .iter()
            .map(|(n, t)| -> Result<_> {
                Ok((
                    n.to_string(),
                    Dtype::F32,
                    t.dims().to_vec(),
                    bytemuck::cast_slice::<f32, u8>(t.as_f32()?).to_vec(),
                ))
            })
            .collect::<Result<_>>()?;
        for (n, c) in self.trainer.batch_norm_counters() {
            recs.push((n, Dtype::I64, vec![], (c as i64).to_le_bytes().to_vec()));
        }
        let mp = dir.join("model.safetensors");
        write_safetensors(&mp, &recs)?;
        sync_file(&mp)?;
        drop(recs);
        let (m, v) = self.trainer.store().moments();
        let (m, v) = (m.to_host()?, v.to_host()?);
        let op = dir.join("optimizer.safetensors");
        write_safetensors(
            &op,
            &[
                (
                    "exp_avg".into(),
                    Dtype::F32,
                    m.dims().to_vec(),
                    bytemuck::cast_slice::<f32, u8>(m.as_f32()?).to_vec(),
                ),
                (
                    "exp_avg_sq".into(),
                    Dtype::F32,
                    v.dims().to_vec(),
                    bytemuck::cast_slice::<f32, u8>(v.as_f32()?).to_vec(),
                ),
            ],
        )?;
        sync_file(&op)?;
        let sp = dir.join("state.json");
        write_atomic(
            &sp,
            serde_json::to_string_pretty(&self.state_json())
                .expect("JSON")
                .as_bytes(),
        )?;
        sync_dir(dir)
    }

    fn log_line(&mut self, mut v: Value) -> Result<()> {
        let Some(log) = self.log.as_mut() else {
            return Ok(());
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        v["time"] = json!(now);
        let p = self.cfg.out.join("log.jsonl");
        writeln!(log, "{v}").map_err(|e| io(&p, e))?;
        log.flush().map_err(|e| io(&p, e))
    }
}

/// The test protocol of EVAL.md on prepared images `ids`, in the model's
/// S x S frame: each mask's box without jitter, BatchNorm on its running
/// statistics, low-res logits -> bilinear to S -> the image's h' x w'
/// region -> logit > 0, against the prepared (resized) mask; per mask
/// Dice = (2|P and G| + eps) / (|P| + |G| + eps) and IoU likewise, eps 1e-7;
/// the unweighted mean over masks, and per modality. (The authors compare
/// at the original resolution; `tools/eval` does, from the original files.)
pub fn evaluate(trainer: &mut Trainer, data: &PreparedSet, ids: &[usize]) -> Result<ValReport> {
    let t0 = Instant::now();
    trainer.set_training(false);
    let r = evaluate_inner(trainer, data, ids);
    trainer.set_training(true);
    let mut rep = r?;
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok(rep)
}

fn evaluate_inner(trainer: &Trainer, data: &PreparedSet, ids: &[usize]) -> Result<ValReport> {
    Ok(report(&evaluate_rows(trainer, data, ids)?))
}

/// Every mask's (modality, Dice, IoU) of images `ids`, in order.
fn evaluate_rows(
    trainer: &Trainer,
    data: &PreparedSet,
    ids: &[usize],
) -> Result<Vec<(String, f64, f64)>> {
    const EPS: f64 = 1e-7;
    // Masks decoded together at most (the decoder's memory grows with them).
    const CHUNK: usize = 16;
    let model = trainer.model();
    let s = data.size;
    let mut rows: Vec<(String, f64, f64)> = vec![];
    for &i in ids {
        let it = data.eval_item(i)?;
        let image = Tensor::from_vec(it.image, [1, 3, s, s])?;
        let feats = model.encode_image(&image, &mut Trace::default())?;
        let (h, w) = it.valid;
        for (c, boxes) in it.boxes.chunks(CHUNK).enumerate() {
            let low = model.decode(&feats, 0, boxes, &mut Trace::default())?;
            let up = bilinear(&low, s, s)?.to_host()?;
            let up = up.as_f32()?;
            for (k, _) in boxes.iter().enumerate() {
                let m = c * CHUNK + k;
                let (logits, gt) = (
                    &up[k * s * s..(k + 1) * s * s],
                    &it.masks[m * s * s..(m + 1) * s * s],
                );
                let (mut p, mut g, mut both) = (0u64, 0u64, 0u64);
                for y in 0..h {
                    for x in 0..w {
                        let (pp, gg) = (logits[y * s + x] > 0.0, gt[y * s + x] > 0);
                        p += pp as u64;
                        g += gg as u64;
                        both += (pp && gg) as u64;
                    }
                }
                let (p, g, both) = (p as f64, g as f64, both as f64);
                let dice = (2.0 * both + EPS) / (p + g + EPS);
                let iou = (both + EPS) / (p + g - both + EPS);
                rows.push((data.images[i].modality.clone(), dice, iou));
            }
        }
    }
    Ok(rows)
}

/// Means over masks, overall and per modality.
fn report(rows: &[(String, f64, f64)]) -> ValReport {
    let mut rep = ValReport {
        masks: rows.len(),
        ..ValReport::default()
    };
    let n = rows.len().max(1) as f64;
    rep.dice = rows.iter().map(|r| r.1).sum::<f64>() / n;
    rep.iou = rows.iter().map(|r| r.2).sum::<f64>() / n;
    let mut per: BTreeMap<String, (f64, f64, usize)> = BTreeMap::new();
    for (m, d, i) in rows {
        let e = per.entry(m.clone()).or_default();
        e.0 += d;
        e.1 += i;
        e.2 += 1;
    }
    for v in per.values_mut() {
        v.0 /= v.2 as f64;
        v.1 /= v.2 as f64;
    }
    rep.per_modality = per;
    rep.per_mask = rows.iter().map(|r| (r.1, r.2)).collect();
    rep
}

/// Rank `rank`'s share of an epoch's order, as PyTorch's DistributedSampler
/// deals it: the order padded to a multiple of `world` with its own first
/// images, then every world-th image from position `rank`. Every rank gets
/// the same number of images.
pub fn rank_shard(order: &[usize], rank: usize, world: usize) -> Vec<usize> {
    if world <= 1 {
        return order.to_vec();
    }
    let n = order.len().div_ceil(world) * world;
    (rank..n)
        .step_by(world)
        .map(|k| order[k % order.len()])
        .collect()
}

fn is_leader(dp: &Option<DataParallel>) -> bool {
    dp.as_ref().is_none_or(|d| d.comm.rank() == 0)
}

/// A run's log lines (JSON values; a torn last line is left out).
pub fn read_log(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Draws `curves.svg` and `curves.png` in a run's folder from its log: the
/// training loss per update (and its running mean over 20) above, the
/// validation Dice below.
pub fn write_plots(out: &Path) -> Result<()> {
    let log = read_log(&out.join("log.jsonl"))?;
    let pts = |ev: &str, key: &str| -> Vec<(f64, f64)> {
        log.iter()
            .filter(|l| l["event"] == ev)
            .filter_map(|l| Some((l["step"].as_f64()?, l[key].as_f64()?)))
            .collect()
    };
    let loss = pts("step", "loss");
    let smooth: Vec<(f64, f64)> = loss
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| {
            let a = i.saturating_sub(19);
            (
                x,
                loss[a..=i].iter().map(|p| p.1).sum::<f64>() / (i + 1 - a) as f64,
            )
        })
        .collect();
    let dice = pts("val", "dice");
    let plot = super::plot::Figure {
        panels: vec![
            super::plot::Panel {
                title: "training loss (focal + 20 dice)".into(),
                series: vec![(loss, [170, 190, 230]), (smooth, [30, 80, 200])],
                y_range: None,
            },
            super::plot::Panel {
                title: "validation Dice".into(),
                series: vec![(dice, [200, 60, 40])],
                y_range: Some((0.0, 1.0)),
            },
        ],
        x_label: "update".into(),
    };
    write_atomic(&out.join("curves.svg"), plot.svg().as_bytes())?;
    let png = plot.png()?;
    write_atomic(&out.join("curves.png"), &png)
}

/// A fingerprint of the prepared data the run trains on: the image names
/// and their mask counts, in order.
fn data_fingerprint(d: &PreparedSet) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h = (h ^ x as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&(d.size as u64).to_le_bytes());
    for e in &d.images {
        eat(e.name.as_bytes());
        eat(&(e.masks.len() as u64).to_le_bytes());
    }
    format!("{:016x}-{}", h, d.images.len())
}

/// `*.num_batches_tracked` of a checkpoint's model file (int64 scalars).
fn read_counters(path: &Path) -> Result<HashMap<String, u64>> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::WeightsFile {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let mut out = HashMap::new();
    for (n, v) in st.tensors() {
        if n.ends_with(".num_batches_tracked") && v.dtype() == Dtype::I64 && v.data().len() == 8 {
            out.insert(
                n,
                i64::from_le_bytes(v.data().try_into().expect("8 bytes")).max(0) as u64,
            );
        }
    }
    Ok(out)
}

fn checkpoints(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with("step-"))
                    && p.join("state.json").is_file()
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(io(dir, e)),
    };
    v.sort();
    Ok(v)
}

/// The newest complete checkpoint in a `checkpoints` folder.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(dir)?.pop())
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| io(p, e))
}

fn sync_file(p: &Path) -> Result<()> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(p, e))
}

fn sync_dir(p: &Path) -> Result<()> {
    // Directories cannot be opened for syncing everywhere (Windows): best
    // effort there.
    match std::fs::File::open(p) {
        Ok(f) => {
            let _ = f.sync_all();
            Ok(())
        }
        Err(e) => Err(io(p, e)),
    }
}

/// Puts folder `from` at `to`, replacing what was there: the old one is
/// moved aside first and removed after, so that a crash leaves either the
/// old or the new folder complete under a known name.
fn replace_dir(from: &Path, to: &Path) -> Result<()> {
    sync_dir(from)?;
    let old = to.with_file_name(format!(
        ".{}.old",
        to.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    }
    if to.exists() {
        std::fs::rename(to, &old).map_err(|e| io(to, e))?;
    }
    std::fs::rename(from, to).map_err(|e| io(to, e))?;
    if let Some(parent) = to.parent() {
        sync_dir(parent)?;
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    mkdir(to)?;
    for e in std::fs::read_dir(from).map_err(|e| io(from, e))? {
        let e = e.map_err(|e| io(from, e))?;
        let dst = to.join(e.file_name());
        std::fs::copy(e.path(), &dst).map_err(|er| io(&dst, er))?;
        sync_file(&dst)?;
    }
    Ok(())
}
