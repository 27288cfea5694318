//! `ssl_head`: trains the self-supervised head of the test-time defence on a frozen classifier
//! (METHODS.md 12, R-MAO `cifar10_defense.py`), for `evaluate`'s `defense` to reverse attacks
//! with.
//!
//! # Inputs
//!
//! - `model` (required): a classifier artifact (what `finetune` writes).
//! - `dataset` (required): its train split trains the head; its test split measures it.
//!
//! # Params
//!
//! | param | default | meaning |
//! |---|---|---|
//! | `epochs` | 201 | R-MAO's `range(0, 201)` |
//! | `batch_size` | 1024 | images per step (each gives `views` rows); the last partial batch is kept, as R-MAO's loader |
//! | `views` | 2 | views of the SSL loss while training (R-MAO: 2; it reverses with 4) |
//! | `lr` | 1e-4 | Adam, betas (0.9, 0.999), no weight decay |
//! | `hidden_dim` | 128 | R-MAO's ResNet-18 head `Res18_out6_model` (its WRN head is 256) |
//! | `out_dim` | 8 | the same head's output (WRN: 16) |
//! | `augment` | `batch` | one augmentation draw per batch (R-MAO's batch-synchronous transforms, \[Q55\]) or `per_image` |
//! | `seed` | 0 | head init, shuffling, input crops and the SSL draws |
//! | `device` | `auto` | `auto`, `cpu` or `cuda:N` (the backend is keyed, the ordinal is not) |
//! | `checkpoint_minutes` | 10 | minutes between training-state writes within an epoch (0: every batch; not keyed) |
//!
//! # Training (R-MAO)
//!
//! Every epoch: the training images in a seeded random order; per image a reflect-padded (4)
//! random 32×32 crop and a horizontal flip (R-MAO's `Crop` / `FlipLR` on its reflect-padded
//! arrays), then per batch the SSL loss of [`crate::nn::defense`]: `views` batch-synchronous
//! draws of R-MAO's augmentation (\[Q55\]), the classifier's feature φ in eval mode (frozen,
//! no gradient), the head in train mode, (L1x) at τ = 0.2. Adam steps the head only.
//!
//! R-DLSP trained its own head differently (Adam betas (0.9, 0.99), 50 epochs, batch 512,
//! 4 views, zero-padding to 40×40 and the classifier in train mode, \[Q60\]) but its results
//! use R-MAO's head (\[Q58\]), so that recipe is not offered.
//!
//! After every epoch, every `checkpoint_minutes` within an epoch and on Ctrl-C, the head,
//! Adam's moments, the curve and the unfinished epoch's progress are written to
//! [`STATE_FILE`] in the node's scratch folder; a run of the same key resumes from the batch
//! after the last write and ends bit-identical to an uninterrupted one.
//!
//! # Outputs
//!
//! - `ssl_head.safetensors`: `linear.*`, `bn3.*`, `linear2.*` (R-MAO's names);
//!   `ssl_head.json`: the [`SslHeadConfig`].
//! - `curve.jsonl`: per epoch `epoch`, `loss` (the mean training loss), `seconds`.
//! - `metrics.json`: `train_loss` (last epoch), `test_ssl_loss` and `test_ssl_acc` (the SSL
//!   loss at 4 views, and the share of anchors whose first positive is their most similar
//!   other row, R-MAO's "correct", on the test split with the head in eval mode, batches of
//!   `batch_size`, seeded draws), `chance_ssl_acc`, `epochs`, `seconds`, `device`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use pipe_engine::{BoxError, ParamError, Resources, Slot, Slots, StageCtx, TypedStage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::{self, Split, tensor_io::DATA_FILE};
use crate::device::DeviceSpec;
use crate::nn::augment::{FinetuneConfig, ImageBatch, MultiView, PaddingMode};
use crate::nn::checkpoint::{self, TrainState};
use crate::nn::classifier::{Classifier, SPEC_FILE, WEIGHTS_FILE};
use crate::nn::defense::{
    AugmentMode, SslHead, SslHeadConfig, SyncAugment, ssl_head, ssl_loss, ssl_stats,
};
use crate::nn::init::{InitRules, build_seeded, named_vars, trainable};
use crate::nn::optim::{Adam, AdamConfig};
use crate::params::Checks;
use crate::rng::Rng;

type Result<T> = std::result::Result<T, BoxError>;

/// The head's weights.
pub const HEAD_FILE: &str = "ssl_head.safetensors";
/// The head's sizes.
pub const HEAD_SPEC_FILE: &str = "ssl_head.json";
/// The resumable state in the scratch folder.
pub use crate::nn::checkpoint::STATE_FILE;
/// Views of the test-split measurement (R-MAO's evaluation views).
pub const EVAL_VIEWS: usize = 4;

/// The state file's record of params and curve.
const META: &str = "meta/json";
/// The progress of an unfinished epoch in a mid-epoch state.
const PROGRESS: &str = "meta/epoch_progress_json";
const SHUFFLE_STREAM: u64 = 1;
const CROP_STREAM: u64 = 2;
const DRAW_STREAM: u64 = 3;
const EVAL_STREAM: u64 = 4;
const INIT_STREAM: u64 = 5;

/// The `ssl_head` kind.
pub struct SslHeadKind;

fn default_epochs() -> usize {
    201
}
fn default_batch() -> usize {
    1024
}
fn default_views() -> usize {
    2
}
fn default_lr() -> f64 {
    1e-4
}
fn default_hidden() -> usize {
    128
}
fn default_out() -> usize {
    8
}

/// Params of `ssl_head` (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SslHeadParams {
    /// Epochs.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Images per step.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Views of the training loss.
    #[serde(default = "default_views")]
    pub views: usize,
    /// Adam's learning rate.
    #[serde(default = "default_lr", deserialize_with = "crate::params::de_real")]
    pub lr: f64,
    /// Hidden width.
    #[serde(default = "default_hidden")]
    pub hidden_dim: usize,
    /// Output width.
    #[serde(default = "default_out")]
    pub out_dim: usize,
    /// One augmentation draw per batch (R-MAO, \[Q55\]) or per image.
    #[serde(default, skip_serializing_if = "AugmentMode::is_batch")]
    pub augment: AugmentMode,
    /// Seed.
    #[serde(default)]
    pub seed: u64,
    /// Device.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Minutes between training-state writes within an epoch (default 10; 0: after every
    /// batch). Not keyed: it changes no result.
    #[serde(
        default,
        deserialize_with = "crate::params::de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub checkpoint_minutes: Option<f64>,
}

impl SslHeadParams {
    fn check_errors(&self) -> Vec<ParamError> {
        let mut e = Checks::default();
        e.positive("epochs", self.epochs);
        e.positive("batch_size", self.batch_size);
        e.require(self.views >= 2, "views", || {
            format!("the SSL loss needs at least 2 views, got {}", self.views)
        });
        e.positive_real("lr", self.lr);
        e.positive("hidden_dim", self.hidden_dim);
        e.positive("out_dim", self.out_dim);
        e.checkpoint_minutes(self.checkpoint_minutes);
        e.device(self.device);
        e.into_errors()
    }
}

/// Loads an `ssl_head` artifact: the head and its sizes.
///
/// # Errors
/// Missing or malformed files, named.
pub fn load_head(
    weights: &Path,
    spec_file: &Path,
    device: &Device,
) -> Result<(SslHead, SslHeadConfig)> {
    let text =
        std::fs::read_to_string(spec_file).map_err(|e| format!("{}: {e}", spec_file.display()))?;
    let cfg: SslHeadConfig =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", spec_file.display()))?;
    let (vm, head) = build_seeded(0, &InitRules::default(), DType::F32, device, |vb| {
        ssl_head(&cfg, vb)
    })?;
    checkpoint::load(&vm, weights, "", true).map_err(|e| format!("{}: {e}", weights.display()))?;
    Ok((head, cfg))
}

/// One epoch's entry of the curve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss over the epoch's images.
    pub loss: f64,
    /// Seconds of the epoch.
    pub seconds: f64,
}

/// How far an unfinished epoch got (a mid-epoch state).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct EpochProgress {
    /// Batches finished.
    batches: usize,
    /// Sum of their losses times their sizes.
    sum: f64,
    /// Images trained on.
    seen: usize,
    /// Wall seconds spent on the epoch up to the state.
    seconds: f64,
}

/// Trains an [`SslHead`] on a frozen classifier, epoch by epoch, resumable.
pub struct HeadTrainer<'a> {
    p: SslHeadParams,
    clf: Classifier,
    train: &'a Split,
    varmap: VarMap,
    head: SslHead,
    cfg: SslHeadConfig,
    opt: Adam,
    aug: SyncAugment,
    crops: MultiView,
    device: Device,
    curve: Vec<CurvePoint>,
    /// The unfinished epoch a mid-epoch state was loaded from (taken by the next epoch).
    partial: Option<EpochProgress>,
    /// Where and how often [`HeadTrainer::train_epoch`] writes the state.
    checkpoint: Option<checkpoint::Cadence>,
}

impl<'a> HeadTrainer<'a> {
    /// A fresh head (PyTorch's default init, seeded) on `clf`'s feature.
    ///
    /// # Errors
    /// Invalid params or tensor errors.
    pub fn new(
        p: &SslHeadParams,
        clf: &Classifier,
        train: &'a Split,
        device: &Device,
    ) -> Result<Self> {
        let errors = p.check_errors();
        if let Some(e) = errors.first() {
            return Err(format!("{}: {}", e.path, e.message).into());
        }
        let cfg = SslHeadConfig {
            in_dim: clf.spec().feature_dim(),
            hidden_dim: p.hidden_dim,
            out_dim: p.out_dim,
        };
        let seed = Rng::derive(p.seed, &[INIT_STREAM]).next_u64();
        let (varmap, head) = build_seeded(seed, &InitRules::default(), DType::F32, device, |vb| {
            ssl_head(&cfg, vb)
        })?;
        let opt = Adam::new_named(
            &trainable(&varmap),
            AdamConfig {
                lr: p.lr,
                ..AdamConfig::default()
            },
        )?;
        let crops = FinetuneConfig {
            size: train.h,
            padding_mode: PaddingMode::Reflect,
            ..FinetuneConfig::default()
        }
        .build()?;
        Ok(Self {
            p: p.clone(),
            clf: clf.frozen()?,
            train,
            varmap,
            head,
            cfg,
            opt,
            aug: SyncAugment::r_mao(train.h).per_image(p.augment == AugmentMode::PerImage),
            crops,
            device: device.clone(),
            curve: Vec::new(),
            partial: None,
            checkpoint: None,
        })
    }

    /// Where this run stands (after [`HeadTrainer::load_state`]: where it resumes).
    pub fn resume_point(&self) -> checkpoint::ResumePoint {
        checkpoint::ResumePoint {
            epochs_done: self.curve.len(),
            epochs: self.p.epochs,
            batches_done: self.partial.as_ref().map_or(0, |p| p.batches),
        }
    }

    /// Finished epochs.
    pub fn epochs_done(&self) -> usize {
        self.curve.len()
    }

    /// Whether every epoch has run.
    pub fn finished(&self) -> bool {
        self.curve.len() >= self.p.epochs
    }

    /// The curve so far.
    pub fn curve(&self) -> &[CurvePoint] {
        &self.curve
    }

    /// The head (live weights).
    pub fn head(&self) -> &SslHead {
        &self.head
    }

    /// The head's variables.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The head's sizes.
    pub fn head_config(&self) -> SslHeadConfig {
        self.cfg
    }

    /// Runs the next epoch (or the rest of the one a mid-epoch state stopped in); with
    /// [`checkpoint::Resumable::checkpoint_to`], writes the state during and after it.
    ///
    /// # Errors
    /// Tensor errors, a non-finite loss, cancellation, a state that cannot be written.
    pub fn train_epoch(
        &mut self,
        progress: &dyn Fn(u64, u64, &str),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        let epoch = self.curve.len() as u64;
        let n = self.train.n;
        if n == 0 {
            return Err("the dataset's train split is empty".into());
        }
        let order = Rng::derive(self.p.seed, &[SHUFFLE_STREAM, epoch]).permutation(n);
        let crop_seed = Rng::derive(self.p.seed, &[CROP_STREAM, epoch]).next_u64();
        let mut done = self.partial.take().unwrap_or_default();
        let batches = n.div_ceil(self.p.batch_size);
        if done.batches >= batches {
            return Err(format!(
                "the saved state stopped after batch {} of epoch {}, which has {batches} batches",
                done.batches,
                epoch + 1
            )
            .into());
        }
        let first = done.batches;
        for (k, idx) in order.chunks(self.p.batch_size).enumerate().skip(first) {
            if cancelled() {
                if k > first {
                    self.save_mid_epoch(&done, start)?;
                }
                return Err("cancelled".into());
            }
            let part = self.train.select(idx);
            let views = self.crops.generate(
                ImageBatch::new(&part.images, part.n, part.h, part.w)?,
                crop_seed,
                k as u64,
            )?;
            let x = Tensor::from_vec(
                views.data,
                (part.n, 3, views.height, views.width),
                &self.device,
            )?;
            let mut rng = Rng::derive(self.p.seed, &[DRAW_STREAM, epoch, k as u64]);
            let draws: Vec<_> = (0..self.p.views)
                .map(|_| self.aug.draw(&mut rng, part.n, views.height, views.width))
                .collect();
            let loss = ssl_loss(&self.clf, &self.head, &self.aug, &x, &draws, true, true)?;
            let value = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            if !value.is_finite() {
                return Err(format!("epoch {}: the SSL loss is {value}", epoch + 1).into());
            }
            let grads = loss.backward()?;
            self.opt.step(&grads)?;
            done.batches += 1;
            done.sum += value * part.n as f64;
            done.seen += part.n;
            progress(
                done.seen as u64,
                n as u64,
                &format!(
                    "epoch {}/{}: loss {:.4}",
                    epoch + 1,
                    self.p.epochs,
                    done.sum / done.seen as f64
                ),
            );
            if k + 1 < batches
                && self
                    .checkpoint
                    .as_ref()
                    .is_some_and(checkpoint::Cadence::due)
            {
                self.save_mid_epoch(&done, start)?;
            }
        }
        self.curve.push(CurvePoint {
            epoch: epoch as usize + 1,
            loss: done.sum / done.seen as f64,
            seconds: done.seconds + start.elapsed().as_secs_f64(),
        });
        self.checkpoint_now(None)
    }

    /// Writes the state of an unfinished epoch (`done` so far, `start` of this call).
    fn save_mid_epoch(&mut self, done: &EpochProgress, start: Instant) -> Result<()> {
        let progress = EpochProgress {
            seconds: done.seconds + start.elapsed().as_secs_f64(),
            ..done.clone()
        };
        self.checkpoint_now(Some(&progress))
    }

    /// Writes the state where [`checkpoint::Resumable::checkpoint_to`] said, if it did.
    fn checkpoint_now(&mut self, partial: Option<&EpochProgress>) -> Result<()> {
        if let Some(c) = &self.checkpoint {
            self.write_state(c.path(), partial)?;
        }
        if let Some(c) = &mut self.checkpoint {
            c.wrote();
        }
        Ok(())
    }

    /// Writes the head, Adam's state and the curve (atomically).
    ///
    /// # Errors
    /// I/O or tensor errors.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        self.write_state(path, self.partial.as_ref())
    }

    fn write_state(&self, path: &Path, partial: Option<&EpochProgress>) -> Result<()> {
        let meta = checkpoint::json_tensor(&(&self.state_params(), &self.curve))?;
        let mut extra = vec![(META.into(), meta)];
        if let Some(p) = partial {
            extra.push((PROGRESS.into(), checkpoint::json_tensor(p)?));
        }
        TrainState::save(
            path,
            &named_vars(&self.varmap),
            self.opt.state(),
            extra,
            checkpoint::ResumePoint {
                batches_done: partial.map_or(0, |p| p.batches),
                ..self.resume_point()
            },
        )?;
        Ok(())
    }

    /// The params a state must have been written for (`checkpoint_minutes` aside: it
    /// changes no result).
    fn state_params(&self) -> SslHeadParams {
        SslHeadParams {
            checkpoint_minutes: None,
            ..self.p.clone()
        }
    }

    /// Restores a [`HeadTrainer::save_state`] file into this fresh trainer, all or nothing.
    ///
    /// # Errors
    /// A file of other params, or missing / misshapen tensors, named.
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let s = TrainState::load(path, &self.device)?;
        let (p, curve): (SslHeadParams, Vec<CurvePoint>) = s.json(META)?;
        if p != self.state_params() || curve.len() > self.p.epochs {
            return Err(s.error("was written for other params").into());
        }
        let partial: Option<EpochProgress> = match s.get(PROGRESS) {
            Some(_) => Some(s.json(PROGRESS)?),
            None => None,
        };
        if let Some(b) = partial.as_ref().map(|p| p.batches) {
            let batches = self.train.n.div_ceil(self.p.batch_size);
            if curve.len() >= self.p.epochs || b >= batches {
                return Err(s
                    .error(format!(
                        "batch {b} of epoch {} does not fit a run of {} epochs of {batches} batches",
                        curve.len() + 1,
                        self.p.epochs
                    ))
                    .into());
            }
        }
        let plan = s.vars(&named_vars(&self.varmap))?;
        self.opt.load_state(&s.optim()).map_err(|e| s.error(e))?;
        checkpoint::set_vars(plan)?;
        self.curve = curve;
        self.partial = partial;
        Ok(())
    }
}

impl checkpoint::Resumable for HeadTrainer<'_> {
    fn resume_from(&mut self, path: &Path) -> Result<checkpoint::ResumePoint> {
        self.load_state(path)?;
        Ok(self.resume_point())
    }

    fn checkpoint_to(&mut self, path: PathBuf, every: Duration) {
        self.checkpoint = Some(checkpoint::Cadence::new(path, every));
    }
}

impl TypedStage for SslHeadKind {
    const KIND: &'static str = "ssl_head";
    const VERSION: u32 = 1;
    type Params = SslHeadParams;

    fn inputs() -> Slots {
        const S: &[Slot] = &[Slot::required("model"), Slot::required("dataset")];
        Slots::Fixed(S)
    }

    fn check(p: &SslHeadParams) -> Vec<ParamError> {
        p.check_errors()
    }

    fn key_params(p: &SslHeadParams) -> Value {
        crate::params::key_with_backend(p, p.device)
    }

    fn outputs(_: &SslHeadParams) -> Vec<String> {
        [HEAD_FILE, HEAD_SPEC_FILE, "curve.jsonl", "metrics.json"]
            .iter()
            .map(|s| (*s).to_string())
            .collect()
    }

    fn resources(p: &SslHeadParams) -> Resources {
        crate::params::device_resources(p.device)
    }

    fn explain_failure(params: &serde_json::Value, message: &str) -> Option<String> {
        crate::device::out_of_memory_hint(params, message, &["batch_size"])
    }

    fn run(p: &SslHeadParams, ctx: &mut StageCtx<'_>) -> Result<()> {
        let ctx = &*ctx;
        let weights = crate::params::input_file(ctx, "model", WEIGHTS_FILE, "finetune")?;
        let spec = crate::params::input_file(ctx, "model", SPEC_FILE, "finetune")?;
        let data_path = crate::params::input_file(ctx, "dataset", DATA_FILE, "dataset")?;
        let dataset = data::load_dataset(&data_path)?;
        let device = p.device.open()?;
        let (_vm, clf) = Classifier::load(&weights, &spec, &device)?;
        if clf.spec().ncrop.is_some() {
            return Err("the SSL head needs a full-image classifier; this one has an n-crop head (the defence reverses single images)".into());
        }
        let start = Instant::now();
        let mut t = HeadTrainer::new(p, &clf, &dataset.train, &device)?;
        ctx.log(format!(
            "head {} -> {} -> {} on a width-{} classifier; {} training images",
            t.cfg.in_dim,
            t.cfg.hidden_dim,
            t.cfg.out_dim,
            clf.spec().width,
            dataset.train.n
        ));
        // all or nothing: a state that does not load leaves the trainer fresh
        if let Some(line) =
            crate::nn::checkpoint::resume_in(&mut t, ctx.scratch_dir(), p.checkpoint_minutes)
        {
            ctx.log(line);
        }
        let progress = |done: u64, total: u64, msg: &str| ctx.progress(done, total, msg);
        let cancelled = || ctx.is_cancelled();
        while !t.finished() {
            t.train_epoch(&progress, &cancelled)?;
            let last = t.curve().last().expect("an epoch ran");
            ctx.log(format!(
                "epoch {}: loss {:.4} ({:.1} s)",
                last.epoch, last.loss, last.seconds
            ));
        }
        checkpoint::save(t.varmap(), ctx.out_path(HEAD_FILE), "")?;
        crate::params::write_json(
            &ctx.out_path(HEAD_SPEC_FILE),
            &serde_json::to_value(t.head_config())?,
        )?;
        let mut curve = String::new();
        for c in t.curve() {
            curve.push_str(&serde_json::to_string(c)?);
            curve.push('\n');
        }
        std::fs::write(ctx.out_path("curve.jsonl"), curve)?;
        let head = t.head().frozen()?;
        let aug = SyncAugment::r_mao(dataset.test.h).per_image(p.augment == AugmentMode::PerImage);
        let clf = clf.frozen()?;
        let (loss, acc) = ssl_stats(
            &clf,
            &head,
            &aug,
            &dataset.test,
            EVAL_VIEWS,
            p.batch_size,
            Rng::derive(p.seed, &[EVAL_STREAM]).next_u64(),
            &device,
        )?;
        let metrics = json!({
            "train_loss": t.curve().last().map(|c| c.loss),
            "test_ssl_loss": loss,
            "test_ssl_acc": acc,
            "chance_ssl_acc": chance_acc(dataset.test.n.min(p.batch_size), EVAL_VIEWS),
            "epochs": p.epochs,
            "seconds": start.elapsed().as_secs_f64(),
            "device": p.device.backend(),
        });
        crate::params::write_json(&ctx.out_path("metrics.json"), &metrics)?;
        ctx.log(format!("done: {metrics}"));
        Ok(())
    }
}

/// The SSL accuracy of a head that ignores its input: one of the `V B − 1` other rows.
pub fn chance_acc(batch: usize, views: usize) -> f64 {
    let others = (views * batch).saturating_sub(1).max(1);
    1.0 / others as f64
}

#[cfg(test)]
mod tests;
