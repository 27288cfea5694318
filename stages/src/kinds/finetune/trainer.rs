//! The fine-tuning loop of the `finetune` kind, independent of the engine: a [`Finetuner`]
//! owns the classifier (or, for AFF, its dual-BN training copy), the optimiser and the feature
//! cache, and trains epoch by epoch on a [`Split`] of u8 images; [`finetune`] runs it to the end.
//! Between epochs, [`Finetuner::save_state`] and [`Finetuner::load_state`] carry the run over
//! a restart, bit-identically (every random stream below is a function of the seed, the epoch
//! and the batch or image, never of what ran before).
//!
//! # Inputs of a batch
//!
//! Every image `i` (its index in the split) gets its views from its own random stream
//! `Rng::derive(aug_seed, &[round, i, v])`, the stream [`MultiView`](crate::nn::augment::MultiView)
//! would give image `i` if the whole split were one batch ([`render_views`]). So what an image
//! looks like depends on the seed, the round and the image, never on the batch it lands in,
//! which is what lets the SLF feature cache and the per-batch path see the same inputs:
//!
//! | head / augmentation | round | views |
//! |---|---|---|
//! | `full`, no augmentation | - | the image, to float |
//! | `full`, `augment` | the epoch | RandomCrop(32, pad 4) + HFlip, one view |
//! | `ncrop` | 0 (drawn once) | `n_views` EMP views (crop or patch geometry, every colour / blur / solarize augmentation on, METHODS.md 11.1a, \[Q20\]) |
//!
//! # SLF feature cache
//!
//! The encoder of SLF is frozen and in eval mode, so an image's feature depends only on its
//! views. [`Finetuner`] computes the features of the whole split in chunks of
//! [`FEATURE_CHUNK`] images (for `ncrop`, the mean over each image's views) once when the
//! inputs never change, or once per epoch with `augment`, and trains the head on rows of that
//! cache: one encoder pass per round instead of one per batch and epoch. With
//! [`FinetuneConfig::cache_features`] off the same head is trained by re-running the encoder on
//! every batch (the reference the cache is tested against; results agree up to float rounding
//! of the different batch shapes).
//!
//! # AFF
//!
//! AFF trains a dual-BN copy of the classifier ([`DUAL_BRANCHES`]: `normal` for natural
//! inputs, `pgd` for adversarial ones, in the backbone and in `pre_feature`'s BN), both
//! branches initialised from the encoder's BN (its `pgd` branch when it has one, \[Q34\] clean).
//! [`Finetuner::finish`] keeps the `pgd` branch under the plain single-BN names.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle::{D, DType, Device, Module, Tensor, Var};
use candle_nn::{Init, Linear, VarBuilder, VarMap};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::Split;
use crate::journal::Journal;
use crate::kinds::pretrain::{TrainHooks, ViewKind};
use crate::nn::attacks::{Norm, PgdConfig, pgd};
use crate::nn::augment::pipeline::{PipelineConfig, Plan, Scratch, U8_TO_F32};
use crate::nn::augment::{EmpConfig, FinetuneConfig as PadCropFlip};
use crate::nn::checkpoint::{self, TrainState};
use crate::nn::classifier::{Classifier, ClassifierSpec, FeatureKind, NcropSpec, mean_over_views};
use crate::nn::heads::{
    CLASSIFIER, ClassifierConfig, ENCODER, LinearClassifier, PRE_FEATURE, linear_classifier,
};
use crate::nn::init::{InitRules, build_seeded, named_vars, trainable};
use crate::nn::losses::{cross_entropy, cross_entropy_per_example, kl_per_example, trades_loss};
use crate::nn::optim::{Adam, AdamConfig, Optim, Sgd, SgdConfig};
use crate::nn::resnet::{
    BranchBatchNorm, DEFAULT_BRANCH, INPUT_NORM, ResNet, ResNetConfig, branch_batch_norm, resnet18,
};
use crate::nn::schedule::{Cosine, MultiStep};
use crate::rng::Rng;

/// Errors of the loop (messages for the node's log).
pub type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

/// Stream tags of the derived random streams.
const SHUFFLE_STREAM: u64 = 0x4654_5348; // "FTSH"
const AUGMENT_STREAM: u64 = 0x4654_4147; // "FTAG"
const ATTACK_STREAM: u64 = 0x4654_4154; // "FTAT"
const SELECT_STREAM: u64 = 0x4654_534c; // "FTSL"

/// `select: best_test_pgd20`: R-ADV's per-epoch test attack (`AttackPGD` with `train=False`):
/// l_inf 8/255, 20 steps of 2/255, uniform random start, not clamped before the first forward.
pub fn selection_attack() -> PgdConfig {
    PgdConfig {
        random_start: true,
        clamp_after_init: false,
        ..PgdConfig::new(Norm::Linf, 8.0 / 255.0, 2.0 / 255.0, 20)
    }
}

/// Test images per batch of the selection attack (not keyed: the attack is per image).
pub const SELECT_BATCH: usize = 256;

/// Which epoch's head a run keeps (METHODS.md \[Q35\]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// The last epoch's (R-AIR / R-RCS; the default).
    #[default]
    Last,
    /// R-ADV's SLF script: after every epoch, clean and PGD-20 accuracy on the dataset's
    /// *test* split ([`selection_attack`], eval mode); the head of the epoch with the best
    /// PGD-20 accuracy is kept (the first on ties, R-ADV's `>`). Selection on the test set:
    /// faithful to R-ADV's reported numbers, not a sound protocol.
    BestTestPgd20,
}

impl Selection {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    fn is_last(&self) -> bool {
        *self == Selection::Last
    }
}

/// The layout version of [`Finetuner::save_state`] files (part of their fingerprint).
const STATE_FORMAT: u32 = 1;

/// Images per encoder call of the SLF feature cache (and of [`accuracy`]).
pub const FEATURE_CHUNK: usize = 256;

/// The BN branch that AFF trains on adversarial inputs and keeps.
pub use crate::nn::resnet::PGD_BRANCH;

/// The BN branches of AFF's training copy: natural inputs, adversarial inputs.
pub const DUAL_BRANCHES: [&str; 2] = [DEFAULT_BRANCH, PGD_BRANCH];

/// The standard deviation of AFF's initial noise, `x + 0.001 · N(0, 1)` (R-AIR).
pub const AFF_INIT_NOISE: f64 = 0.001;

/// The fine-tuning mode (METHODS.md 10.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Standard linear fine-tuning: the head on a frozen encoder, clean inputs.
    Slf,
    /// Adversarial linear fine-tuning: the head on a frozen encoder, PGD inputs.
    Alf,
    /// Adversarial full fine-tuning: every parameter, TRADES, dual BN.
    Aff,
}

/// The optimiser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// `torch.optim.Adam` (default betas, L2 weight decay).
    Adam,
    /// `torch.optim.SGD` with momentum (no Nesterov).
    Sgd,
}

/// How the head is initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadInit {
    /// PyTorch's default `Linear` init, `U(−1/√in, 1/√in)`, seeded (R-CF).
    Default,
    /// Weight and bias zero (R-AIR / R-RCS, METHODS.md 10.1).
    Zeros,
}

/// The learning-rate schedule, stepped once per epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// `CosineAnnealingLR(T_max)` stepped per epoch (R-CF's n-crop head: `T_max = 100`,
    /// whatever the epoch count, \[Q14\]).
    Cosine {
        /// The half period in epochs.
        t_max: usize,
    },
    /// `MultiStepLR(milestones, 0.1)` stepped per epoch (R-AIR / R-RCS).
    Multistep {
        /// Epochs (0-based) from which the rate is divided by 10 once more.
        milestones: Vec<usize>,
    },
}

/// The reference-code quirks of the fine-tuning attacks (METHODS.md 17), resolved; `true` is
/// the reference behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faithful {
    /// \[Q31\] the random start of ALF's PGD (`U(−ε, ε)`) and AFF's TRADES start
    /// (`x + 0.001 · N(0, 1)`) is not clamped to `[0, 1]` before the first forward (R-AIR /
    /// R-RCS); `false` clamps it.
    pub q31: bool,
    /// \[Q34\] b (AFF only; `false` for SLF / ALF): the dual-BN training copy starts every BN
    /// of the backbone (both branches: weight 1, bias 0, running mean 0, variance 1) and the
    /// three 1×1 shortcut convs (Kaiming-normal, fan-out) from scratch, as R-AIR's
    /// `strict=False` load leaves them; the other convs and `pre_feature` are pretrained.
    /// `false`: both branches and the shortcut convs are read from the encoder (the `pgd`
    /// branch where it has one). Not serialised when `false`, so the resume fingerprints of
    /// SLF / ALF states hold.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub q34b: bool,
}

impl Default for Faithful {
    fn default() -> Self {
        Self {
            q31: true,
            q34b: false,
        }
    }
}

/// A fully resolved fine-tuning configuration (see the kind's docs for the params).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    /// SLF, ALF or AFF.
    pub mode: Mode,
    /// The feature under the head.
    pub features: FeatureKind,
    /// The bag-of-features head (`head: ncrop`), if any.
    pub ncrop: Option<NcropSpec>,
    /// Adam or SGD.
    pub optimizer: OptimizerKind,
    /// Base learning rate.
    pub lr: f64,
    /// SGD momentum (unused by Adam).
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Per-epoch schedule.
    pub schedule: Schedule,
    /// Images per batch.
    pub batch_size: usize,
    /// Epochs.
    pub epochs: usize,
    /// Drop the last partial batch.
    pub drop_last: bool,
    /// RandomCrop(32, pad 4) + HFlip on the training images (full-image head).
    pub augment: bool,
    /// Head initialisation.
    pub head_init: HeadInit,
    /// l_inf radius of ALF / AFF.
    pub eps: f64,
    /// Attack step of ALF / AFF.
    pub alpha: f64,
    /// Attack steps of ALF / AFF.
    pub pgd_steps: usize,
    /// TRADES β (AFF).
    pub beta: f64,
    /// Seed of the shuffles, augmentations, attacks and the default head init.
    pub seed: u64,
    /// Reference-code quirks of the ALF / AFF attacks.
    pub faithful: Faithful,
    /// ALF: the attack starts at a uniform random point of the `eps` ball (R-AIR) or, when
    /// `false`, at the clean image (R-CF's robust head, zero init). Serialised only when
    /// `false`, so the fingerprints of states written before it existed still match.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub random_start: bool,
    /// ALF: epochs on clean inputs before and after the adversarial ones, with the same
    /// optimiser and schedule (R-CF's EMP robust head trains 2 clean, 2 adversarial, 2 clean
    /// epochs, \[Q13\]); `epochs` counts them all. Serialised only when not zero.
    #[serde(default, skip_serializing_if = "is_zeros")]
    pub clean_epochs: [usize; 2],
    /// SLF: train on cached features (true; the stage always does) or re-run the encoder per
    /// batch (false: the reference path, for tests). Ignored by ALF / AFF.
    pub cache_features: bool,
    /// Which epoch's head is kept (SLF / ALF). Serialised only when not `last`.
    #[serde(default, skip_serializing_if = "Selection::is_last")]
    pub select: Selection,
}

fn yes() -> bool {
    true
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_true(v: &bool) -> bool {
    *v
}

fn is_zeros(v: &[usize; 2]) -> bool {
    *v == [0, 0]
}

impl FinetuneConfig {
    /// The `epochs` param: every epoch but [`FinetuneConfig::clean_epochs`].
    pub fn adversarial_epochs(&self) -> usize {
        self.epochs
            .saturating_sub(self.clean_epochs[0])
            .saturating_sub(self.clean_epochs[1])
    }

    /// Whether epoch `epoch` (0-based) of an ALF run trains on clean inputs
    /// ([`FinetuneConfig::clean_epochs`]).
    pub fn clean_epoch(&self, epoch: usize) -> bool {
        let [before, after] = self.clean_epochs;
        self.mode == Mode::Alf && (epoch < before || epoch + after >= self.epochs)
    }

    /// The rate during epoch `epoch` (0-based).
    pub fn lr_at(&self, epoch: usize) -> f64 {
        match &self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine { t_max } => Cosine::new(self.lr, 0.0, *t_max).lr(epoch),
            Schedule::Multistep { milestones } => {
                MultiStep::new(self.lr, milestones.clone(), 0.1).lr(epoch)
            }
        }
    }

    /// ALF's attack: l_inf PGD with `pgd_steps` steps of `alpha` in the `eps` ball, from a
    /// uniform random start (or the clean image without `random_start`), box projection after
    /// every step; the start is clamped to the box before the first forward only with \[Q31\]
    /// off.
    pub fn alf_attack(&self) -> PgdConfig {
        PgdConfig {
            random_start: self.random_start,
            clamp_after_init: !self.faithful.q31,
            ..PgdConfig::new(Norm::Linf, self.eps, self.alpha, self.pgd_steps)
        }
    }

    /// The classifier this run trains, on an encoder of `width` and `hidden_dim` (with the
    /// input normalisation when `input_norm`).
    pub fn spec(
        &self,
        width: usize,
        hidden_dim: usize,
        input_norm: bool,
        classes: usize,
    ) -> ClassifierSpec {
        ClassifierSpec {
            width,
            hidden_dim,
            features: self.features,
            classes,
            ncrop: self.ncrop,
            input_norm,
        }
    }

    /// Batches per epoch for `n` images (`drop_last` or not; AFF also drops a last batch of a
    /// single image, which train-mode BN cannot normalise).
    pub fn batches(&self, n: usize) -> usize {
        let bs = self.batch_size.max(1);
        let full = n / bs;
        let rest = n % bs;
        let keep_rest = !self.drop_last && rest > 0 && !(self.mode == Mode::Aff && rest < 2);
        full + usize::from(keep_rest)
    }
}

/// The n-crop spec of `n_views` EMP views of the given geometry.
pub fn ncrop_spec(n_views: usize, views: ViewKind) -> NcropSpec {
    let (scale, ratio) = views.scale_ratio();
    NcropSpec {
        n_views,
        scale,
        ratio,
    }
}

/// The EMP view pipeline of an n-crop head, on images of `side × side` pixels (the views
/// have the images' size).
pub fn ncrop_pipeline(spec: &NcropSpec, side: usize) -> PipelineConfig {
    EmpConfig {
        n_views: spec.n_views,
        scale: spec.scale,
        ratio: spec.ratio,
        size: side,
        ..EmpConfig::crop(spec.n_views)
    }
    .config()
    .pipeline
}

/// Renders `n_views` views of the images `idx` of `split` through `pipeline`, view-major
/// (`(n_views · idx.len(), 3, size, size)` values in [0, 1]); view `v` of image `i` draws from
/// `Rng::derive(seed, &[round, i, v])`, exactly what
/// [`MultiView::generate`](crate::nn::augment::MultiView::generate) of the whole split at
/// step `round` would draw for it.
///
/// # Errors
/// Images that do not fit the pipeline.
pub fn render_views(
    pipeline: &PipelineConfig,
    n_views: usize,
    split: &Split,
    idx: &[usize],
    seed: u64,
    round: u64,
) -> Result<Vec<f32>> {
    pipeline.check_input(split.h, split.w)?;
    let size = pipeline.size;
    let row = 3 * size * size;
    let m = idx.len();
    let mut out = vec![0f32; n_views * m * row];
    if m == 0 {
        return Ok(out);
    }
    let plan = Plan::new(pipeline, split.h, split.w);
    out.par_chunks_mut(row)
        .enumerate()
        .with_min_len(4)
        .for_each_init(Scratch::default, |scratch, (r, dst)| {
            let (v, i) = (r / m, idx[r % m]);
            let mut rng = Rng::derive(seed, &[round, i as u64, v as u64]);
            let params = pipeline.sample(&mut rng, split.h, split.w);
            plan.render(split.image(i), &params, dst, scratch);
        });
    Ok(out)
}

/// The images `idx` of `split` as f32 in [0, 1] (`to_tensor`), `(len, 3, h, w)` values.
fn to_float(split: &Split, idx: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(idx.len() * split.image_len());
    for &i in idx {
        out.extend(split.image(i).iter().map(|&v| U8_TO_F32[usize::from(v)]));
    }
    out
}

/// AFF's adversarial inputs (R-AIR `trades_loss_dual`): `x̃ = x + 0.001·N(0, 1)` (clamped to
/// `[0, 1]` only with \[Q31\] off), then `cfg.pgd_steps` times `x̃ ← clip(clip(x̃ + α sign ∇,
/// x ± ε), 0, 1)` ascending `Σ_b KL(softmax(nat_b) ‖ softmax(adv_logits(x̃)_b))`, where `nat`
/// are the (detached) natural logits and `adv_logits` the model under attack, in eval mode.
///
/// # Errors
/// Tensor errors, or an `adv_logits` the input gradient does not reach.
pub fn trades_examples(
    x: &Tensor,
    nat: &Tensor,
    mut adv_logits: impl FnMut(&Tensor) -> candle::Result<Tensor>,
    cfg: &FinetuneConfig,
    rng: &mut Rng,
) -> Result<Tensor> {
    let noise: Vec<f32> = (0..x.elem_count())
        .map(|_| (AFF_INIT_NOISE * rng.normal()) as f32)
        .collect();
    let mut xa = (x + Tensor::from_vec(noise, x.shape(), x.device())?)?;
    if !cfg.faithful.q31 {
        xa = xa.clamp(0f32, 1f32)?;
    }
    let eps = cfg.eps;
    let (lo, hi) = ((x - eps)?, (x + eps)?);
    for _ in 0..cfg.pgd_steps {
        let v = Var::from_tensor(&xa)?;
        let kl = kl_per_example(nat, &adv_logits(v.as_tensor())?)?.sum_all()?;
        let grads = kl.backward()?;
        let g = grads
            .get(v.as_tensor())
            .ok_or("internal: no gradient reached the TRADES input")?;
        xa = (xa + (g.sign()? * cfg.alpha)?)?;
        xa = xa.maximum(&lo)?.minimum(&hi)?.clamp(0f32, 1f32)?;
    }
    Ok(xa.clamp(0f32, 1f32)?.detach())
}

// ---------------------------------------------------------------------------------------------
// The encoder checkpoint

/// The tensors of an encoder checkpoint (a `pretrain` artifact's `encoder.safetensors`, or an
/// in-memory model) and the architecture read off their shapes.
///
/// The pretrain node's `width` and `hidden_dim` are params, not tensor names, so they are
/// inferred: `encoder.conv1.weight` is `(width, 3, 3, 3)` and `pre_feature.0.weight` is
/// `(hidden_dim, 8 · width)` (absent for encoders without CF-AMC's `pre_feature`, e.g. the
/// ACL family). An encoder with a `pgd` BN branch (`encoder.bn1.pgd.weight`) is read through
/// that branch (METHODS.md 10.1, \[Q34\] a).
#[derive(Debug, Clone)]
pub struct EncoderWeights {
    tensors: HashMap<String, Tensor>,
    width: usize,
    hidden_dim: Option<usize>,
    pgd_branch: bool,
    input_norm: bool,
}

impl EncoderWeights {
    /// From named tensors.
    ///
    /// # Errors
    /// No `encoder.conv1.weight` of shape `(w, 3, 3, 3)`, or a `pre_feature.0.weight` that
    /// does not read `8 · w` features.
    pub fn from_tensors(tensors: HashMap<String, Tensor>) -> Result<Self> {
        let conv1 = tensors.get("encoder.conv1.weight").ok_or(
            "the encoder checkpoint has no encoder.conv1.weight (is it a `pretrain` artifact?)",
        )?;
        let width = match conv1.dims() {
            &[w, 3, 3, 3] if w > 0 => w,
            other => {
                return Err(format!(
                    "encoder.conv1.weight has shape {other:?}, expected (width, 3, 3, 3)"
                )
                .into());
            }
        };
        let hidden_dim = match tensors.get("pre_feature.0.weight").map(Tensor::dims) {
            None => None,
            Some(&[h, f]) if f == 8 * width => Some(h),
            Some(other) => {
                return Err(format!(
                    "pre_feature.0.weight has shape {other:?}, expected (hidden_dim, {})",
                    8 * width
                )
                .into());
            }
        };
        let pgd_branch = tensors.contains_key(&format!("encoder.bn1.{PGD_BRANCH}.weight"));
        let input_norm = tensors.contains_key(&format!("encoder.{INPUT_NORM}.mean"));
        Ok(Self {
            tensors,
            width,
            hidden_dim,
            pgd_branch,
            input_norm,
        })
    }

    /// Reads a safetensors checkpoint onto `device`.
    ///
    /// # Errors
    /// I/O or format errors (naming the file), or as [`EncoderWeights::from_tensors`].
    pub fn from_file(path: &Path, device: &Device) -> Result<Self> {
        let tensors = candle::safetensors::load(path, device)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_tensors(tensors).map_err(|e| format!("{}: {e}", path.display()).into())
    }

    /// Copies the variables of an in-memory model (e.g. a
    /// [`Pretrainer`](crate::kinds::pretrain::Pretrainer)'s).
    ///
    /// # Errors
    /// As [`EncoderWeights::from_tensors`].
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let tensors = named_vars(varmap)
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_detached_tensor().copy()?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Self::from_tensors(tensors)
    }

    /// The ResNet-18 width.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The `pre_feature` width, if the encoder has that head.
    pub fn hidden_dim(&self) -> Option<usize> {
        self.hidden_dim
    }

    /// Whether the encoder has a `pgd` BN branch (which is then the one read).
    pub fn has_pgd_branch(&self) -> bool {
        self.pgd_branch
    }

    /// Whether the encoder normalises its input inside the model (`encoder.normalize.*`, the
    /// ACL family); the classifier then does too.
    pub fn has_input_norm(&self) -> bool {
        self.input_norm
    }

    /// The checkpoint tensor that initialises the model variable `name`: the same name, with
    /// any `.pgd.` branch removed, read from the checkpoint's `pgd` branch when it has one.
    fn source(&self, name: &str) -> Option<(&str, &Tensor)> {
        let plain = name.replace(&format!(".{PGD_BRANCH}."), ".");
        let branched = match plain.rsplit_once('.') {
            Some((m, p)) => format!("{m}.{PGD_BRANCH}.{p}"),
            None => plain.clone(),
        };
        [branched, plain]
            .into_iter()
            .find_map(|k| self.tensors.get_key_value(&k))
            .map(|(k, t)| (k.as_str(), t))
    }

    /// Sets every variable of `varmap` except the head (`classifier.*`) from the checkpoint.
    fn load_into(&self, varmap: &VarMap) -> Result<()> {
        self.load_into_except(varmap, &HashSet::new())
    }

    /// [`EncoderWeights::load_into`], leaving the variables named in `keep` as they are.
    fn load_into_except(&self, varmap: &VarMap, keep: &HashSet<String>) -> Result<()> {
        let mut plan = Vec::new();
        for (name, var) in named_vars(varmap) {
            if name.starts_with(&format!("{CLASSIFIER}.")) || keep.contains(&name) {
                continue;
            }
            match self.source(&name) {
                Some((src, t)) => {
                    if t.dims() != var.dims() {
                        return Err(format!(
                            "the encoder's {src} has shape {:?}, the classifier's {name} expects {:?}",
                            t.dims(),
                            var.dims()
                        )
                        .into());
                    }
                    let t = t.to_dtype(var.dtype())?;
                    plan.push((var, t));
                }
                // a checkpoint without BN counters starts them at 0
                None if name.ends_with("num_batches_tracked") => {}
                None => {
                    let hint = if name.starts_with(&format!("{PRE_FEATURE}.")) {
                        " (an encoder without CF-AMC's pre_feature head needs `features: backbone`)"
                    } else {
                        ""
                    };
                    return Err(
                        format!("the encoder checkpoint has no tensor for {name}{hint}").into(),
                    );
                }
            }
        }
        for (var, t) in plan {
            var.set(&t.to_device(var.device())?)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// AFF's dual-BN training copy

/// The variables of the dual-BN copy that R-AIR's AFF does not load from the pretrained
/// encoder (\[Q34\] b): its converted single-BN `state_dict` names BNs `bn1.weight` and the
/// shortcut `downsample.0` / `.1`, the dual model `bn1.bn_list.k.weight` and
/// `downsample.conv` / `.bn`, and `load_state_dict(strict=False)` skips every name that does
/// not match. So every BN tensor of the backbone (both branches) and the shortcut convs keep
/// their initialisation. `pre_feature` has no counterpart in R-AIR and is loaded.
fn r_air_unloaded(varmap: &VarMap) -> HashSet<String> {
    let names: Vec<String> = named_vars(varmap).into_iter().map(|(n, _)| n).collect();
    let bn_modules: HashSet<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".running_mean"))
        .collect();
    names
        .iter()
        .filter(|n| n.starts_with(&format!("{ENCODER}.")))
        .filter(|n| {
            let module = n.rsplit_once('.').map_or("", |(m, _)| m);
            bn_modules.contains(module) || module.ends_with(".downsample.0")
        })
        .cloned()
        .collect()
}

/// `pre_feature` with one BN per branch.
#[derive(Debug, Clone)]
struct DualPre {
    linear: Linear,
    bn: BranchBatchNorm,
}

/// The classifier with `normal` and `pgd` BNs (backbone and `pre_feature`), names as the
/// single-BN [`Classifier`] plus `.pgd.` for the second branch.
#[derive(Debug, Clone)]
struct DualClassifier {
    backbone: ResNet,
    pre: Option<DualPre>,
    head: LinearClassifier,
}

impl DualClassifier {
    fn build(spec: &ClassifierSpec, vb: VarBuilder) -> candle::Result<Self> {
        let branches: Vec<String> = DUAL_BRANCHES.iter().map(|s| (*s).to_string()).collect();
        let backbone = resnet18(
            &ResNetConfig {
                width: spec.width,
                branches: branches.clone(),
                input_norm: spec.input_norm,
            },
            vb.pp(ENCODER),
        )?;
        let pre = match spec.features {
            FeatureKind::PreFeature => {
                let pvb = vb.pp(PRE_FEATURE);
                let (h, f) = (spec.hidden_dim, backbone.feature_dim());
                let w = pvb
                    .pp("0")
                    .get_with_hints((h, f), "weight", Init::Const(0.))?;
                let b = pvb.pp("0").get_with_hints(h, "bias", Init::Const(0.))?;
                Some(DualPre {
                    linear: Linear::new(w, Some(b)),
                    bn: branch_batch_norm(h, &branches, pvb.pp("1"))?,
                })
            }
            FeatureKind::Backbone => None,
        };
        let head = linear_classifier(
            &ClassifierConfig {
                in_dim: spec.feature_dim(),
                num_classes: spec.classes,
            },
            vb.pp(CLASSIFIER),
        )?;
        Ok(Self {
            backbone,
            pre,
            head,
        })
    }

    fn logits(&self, x: &Tensor, branch: &str, train: bool) -> candle::Result<Tensor> {
        let f = self.backbone.forward_branch(x, branch, train)?;
        let f = match &self.pre {
            Some(p) => {
                p.bn.forward_act(&p.linear.forward(&f)?, branch, train, true)?
            }
            None => f,
        };
        self.head.forward(&f)
    }

    fn frozen(&self) -> candle::Result<Self> {
        Ok(Self {
            backbone: self.backbone.frozen()?,
            pre: self
                .pre
                .as_ref()
                .map(|p| -> candle::Result<DualPre> {
                    Ok(DualPre {
                        linear: Linear::new(
                            p.linear.weight().detach(),
                            p.linear.bias().map(Tensor::detach),
                        ),
                        bn: p.bn.frozen()?,
                    })
                })
                .transpose()?,
            head: self.head.detached(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The loop

/// What one epoch did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// 0-based epoch index.
    pub epoch: usize,
    /// Mean training loss over the epoch's images (SLF / ALF: CE; AFF: TRADES).
    pub loss: f64,
    /// Accuracy of the logits the loss was computed on: SLF clean (augmented) inputs, ALF the
    /// PGD examples, AFF the `pgd` branch on the TRADES examples (the kept model).
    pub acc: f64,
    /// AFF: accuracy of the `normal` branch on the natural inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub natural_acc: Option<f64>,
    /// Learning rate of the epoch.
    pub lr: f64,
    /// Wall seconds (including the epoch's feature pass, if any, and the selection attack).
    pub seconds: f64,
    /// Images trained on.
    pub images: usize,
    /// `select: best_test_pgd20`: clean accuracy on the test split after the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_clean_acc: Option<f64>,
    /// `select: best_test_pgd20`: PGD-20 accuracy on the test split after the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_pgd_acc: Option<f64>,
}

enum Model {
    /// SLF / ALF: the classifier itself and its frozen (detached) encoder path.
    Single {
        varmap: VarMap,
        clf: Box<Classifier>,
        frozen: Box<Classifier>,
    },
    /// AFF: the dual-BN training copy.
    Dual { varmap: VarMap, net: DualClassifier },
}

/// The non-tensor part of a resumable state (`meta/json`).
#[derive(Serialize, Deserialize)]
struct StateMeta {
    /// What the state was written for ([`Finetuner::fingerprint`]).
    fingerprint: Value,
    /// Epochs finished.
    epoch: usize,
    /// Optimiser updates so far.
    steps: usize,
    /// Progress units so far.
    done: u64,
    /// Seconds spent filling the SLF feature cache.
    feature_seconds: f64,
    /// Encoder passes of the SLF feature cache.
    feature_passes: usize,
    /// The per-epoch curve so far.
    curve: Vec<EpochStats>,
    /// A mid-epoch state: how far the unfinished epoch got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partial: Option<EpochProgress>,
    /// `select: best_test_pgd20`: the epoch (0-based) whose head is kept so far; its tensors
    /// are `best/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    best: Option<usize>,
}

/// How far an unfinished epoch got: what a mid-epoch state records so that the resumed epoch
/// adds up to the uninterrupted one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct EpochProgress {
    /// Batches finished.
    batches: usize,
    /// Sum over them of the batch loss times the batch size.
    loss_sum: f64,
    /// Correct predictions (ALF: on the PGD examples; AFF: the `pgd` branch).
    right: usize,
    /// AFF: correct predictions of the `normal` branch on natural inputs.
    nat_right: usize,
    /// Images trained on.
    seen: usize,
    /// Wall seconds spent on the epoch up to the state.
    seconds: f64,
}

/// What a journaled chunk of the SLF feature pass describes (it is replayed only if it is
/// the chunk asked for).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FeatureChunk {
    round: u64,
    first: usize,
    len: usize,
}

/// The first difference between a saved and the current fingerprint, with its path
/// (`config.lr: 0.1 in the file, 0.05 now`).
fn first_difference(a: &Value, b: &Value, at: &str) -> String {
    let here = |a: &Value, b: &Value| {
        let at = if at.is_empty() { "the fingerprint" } else { at };
        format!("{at}: {a} in the file, {b} now")
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) if p == q => {}
                    (Some(p), Some(q)) => return first_difference(p, q, &path),
                    (p, q) => {
                        return format!(
                            "{path}: {} in the file, {} now",
                            p.map_or("absent".into(), Value::to_string),
                            q.map_or("absent".into(), Value::to_string)
                        );
                    }
                }
            }
            here(a, b)
        }
        _ => here(a, b),
    }
}

/// Per-batch results.
struct BatchOut {
    loss: f64,
    correct: usize,
    natural_correct: Option<usize>,
}

/// The fine-tuning state machine (see the module docs).
pub struct Finetuner<'d> {
    cfg: FinetuneConfig,
    spec: ClassifierSpec,
    images: &'d Split,
    device: Device,
    labels: Tensor,
    model: Model,
    opt: Box<dyn Optim>,
    aug_seed: u64,
    inputs: Option<(PipelineConfig, usize)>,
    cache: Option<(u64, Tensor)>,
    epoch: usize,
    steps: usize,
    done: u64,
    total: u64,
    feature_seconds: f64,
    feature_passes: usize,
    curve: Vec<EpochStats>,
    /// The unfinished epoch a mid-epoch state was loaded from (taken by the next epoch).
    partial: Option<EpochProgress>,
    /// Where and how often [`Finetuner::train_epoch`] writes the state.
    checkpoint: Option<checkpoint::Cadence>,
    /// Where the SLF feature pass records its chunks.
    journal: Journal,
    /// `select: best_test_pgd20`: the test split selected on ([`Finetuner::select_on`]).
    test: Option<&'d Split>,
    /// `select: best_test_pgd20`: the kept epoch (0-based) and its head.
    best: Option<(usize, Vec<(String, Tensor)>)>,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn correct(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let pred = logits.argmax(D::Minus1)?;
    let y = labels.to_dtype(DType::U32)?;
    Ok(usize::try_from(
        pred.eq(&y)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()?,
    )?)
}

impl<'d> Finetuner<'d> {
    /// A fresh run: the classifier built on `enc` (width and `hidden_dim` from its shapes),
    /// the head initialised by `cfg.head_init`, the optimiser over the head (SLF / ALF) or
    /// every parameter (AFF).
    ///
    /// # Errors
    /// An encoder without `pre_feature` under `features: pre_feature`, labels outside
    /// `0..classes`, too few images for one batch, or tensor errors.
    pub fn new(
        cfg: FinetuneConfig,
        enc: &EncoderWeights,
        images: &'d Split,
        classes: usize,
        device: &Device,
    ) -> Result<Self> {
        if classes == 0 {
            return Err("the dataset has no classes".into());
        }
        if let Some(bad) = images
            .labels
            .iter()
            .find(|&&l| usize::try_from(l).map_or(true, |l| l >= classes))
        {
            return Err(format!("label {bad} is outside 0..{classes}").into());
        }
        if cfg.batches(images.n) == 0 {
            return Err(format!(
                "batch_size {} is larger than the {} training images (drop_last: {})",
                cfg.batch_size, images.n, cfg.drop_last
            )
            .into());
        }
        if cfg.ncrop.is_some() && cfg.mode != Mode::Slf {
            return Err("the n-crop head is trained by SLF only".into());
        }
        let hidden_dim = match (cfg.features, enc.hidden_dim()) {
            (FeatureKind::PreFeature, None) => {
                return Err("`features: pre_feature` needs CF-AMC's pre_feature head, which this encoder does not have (use `features: backbone`)".into());
            }
            (_, h) => h.unwrap_or(0),
        };
        let spec = cfg.spec(enc.width(), hidden_dim, enc.has_input_norm(), classes);
        let (model, params) = match cfg.mode {
            Mode::Slf | Mode::Alf => {
                let (varmap, clf) = Classifier::build_seeded(&spec, cfg.seed, device)?;
                enc.load_into(&varmap)?;
                let head: Vec<(String, Var)> = named_vars(&varmap)
                    .into_iter()
                    .filter(|(n, _)| n.starts_with(&format!("{CLASSIFIER}.")))
                    .collect();
                let frozen = Box::new(clf.frozen()?);
                let clf = Box::new(clf);
                (
                    Model::Single {
                        varmap,
                        clf,
                        frozen,
                    },
                    head,
                )
            }
            Mode::Aff => {
                let (varmap, net) = build_seeded(
                    cfg.seed,
                    &InitRules::r_cf(ENCODER),
                    DType::F32,
                    device,
                    |vb| DualClassifier::build(&spec, vb),
                )?;
                let fresh = if cfg.faithful.q34b {
                    r_air_unloaded(&varmap)
                } else {
                    HashSet::new()
                };
                enc.load_into_except(&varmap, &fresh)?;
                let params = trainable(&varmap);
                (Model::Dual { varmap, net }, params)
            }
        };
        if cfg.head_init == HeadInit::Zeros {
            for (name, var) in &params {
                if name.starts_with(&format!("{CLASSIFIER}.")) {
                    var.set(&var.as_tensor().zeros_like()?)?;
                }
            }
        }
        let opt: Box<dyn Optim> = match cfg.optimizer {
            OptimizerKind::Adam => Box::new(Adam::new_named(
                &params,
                AdamConfig {
                    lr: cfg.lr,
                    weight_decay: cfg.weight_decay,
                    ..AdamConfig::default()
                },
            )?),
            OptimizerKind::Sgd => Box::new(Sgd::new_named(
                &params,
                SgdConfig {
                    lr: cfg.lr,
                    momentum: cfg.momentum,
                    dampening: 0.0,
                    nesterov: false,
                    weight_decay: cfg.weight_decay,
                },
            )?),
        };
        let inputs = match (&cfg.ncrop, cfg.augment) {
            (Some(n), _) => Some((ncrop_pipeline(n, images.h), n.n_views)),
            (None, true) => {
                let crop = PadCropFlip {
                    size: images.h,
                    ..PadCropFlip::default()
                };
                Some((crop.config().pipeline, 1))
            }
            (None, false) => None,
        };
        if let Some((p, _)) = &inputs {
            p.check_input(images.h, images.w)?;
        }
        let labels: Vec<u32> = images
            .labels
            .iter()
            .map(|&l| u32::try_from(l))
            .collect::<std::result::Result<_, _>>()?;
        let labels = Tensor::from_vec(labels, images.n, device)?;
        let aug_seed = Rng::derive(cfg.seed, &[AUGMENT_STREAM]).next_u64();
        let feature_passes = match (cfg.mode, cfg.cache_features) {
            (Mode::Slf, true) if cfg.augment && cfg.ncrop.is_none() => cfg.epochs,
            (Mode::Slf, true) => 1,
            _ => 0,
        };
        let chunks = images.n.div_ceil(FEATURE_CHUNK);
        let total = (feature_passes * chunks + cfg.epochs * cfg.batches(images.n)) as u64;
        Ok(Self {
            cfg,
            spec,
            images,
            device: device.clone(),
            labels,
            model,
            opt,
            aug_seed,
            inputs,
            cache: None,
            epoch: 0,
            steps: 0,
            done: 0,
            total,
            feature_seconds: 0.0,
            feature_passes: 0,
            curve: Vec::new(),
            partial: None,
            checkpoint: None,
            journal: Journal::off(),
            test: None,
            best: None,
        })
    }

    /// `select: best_test_pgd20`: the split the head is selected on (the dataset's test split,
    /// as R-ADV does). Call before training or [`Finetuner::load_state`].
    ///
    /// # Errors
    /// Another `select`, an empty split, or images of another size than the training ones.
    pub fn select_on(&mut self, test: &'d Split) -> Result<()> {
        if self.cfg.select != Selection::BestTestPgd20 {
            return Err("internal: select_on without `select: best_test_pgd20`".into());
        }
        if test.n == 0 {
            return Err(
                "`select: best_test_pgd20` needs test images: the dataset's test split is empty"
                    .into(),
            );
        }
        if (test.h, test.w) != (self.images.h, self.images.w) {
            return Err(format!(
                "the test images are {}x{}, the training images {}x{}",
                test.h, test.w, self.images.h, self.images.w
            )
            .into());
        }
        if self.test.is_none() {
            self.total += (self.cfg.epochs * test.n.div_ceil(SELECT_BATCH)) as u64;
        }
        self.test = Some(test);
        Ok(())
    }

    /// The epoch (0-based) whose head [`Finetuner::finish`] keeps with `select:
    /// best_test_pgd20`, once one is trained.
    pub fn selected_epoch(&self) -> Option<usize> {
        self.best.as_ref().map(|(e, _)| *e)
    }

    /// R-ADV's `validate` after an epoch: clean and PGD-20 ([`selection_attack`]) accuracy of
    /// the current classifier on the test split, eval mode, the attack's random start drawn
    /// from `(seed, epoch, batch)`.
    fn select_eval(&mut self, epoch: usize, hooks: &TrainHooks<'_>) -> Result<(f64, f64)> {
        let (Model::Single { clf, .. }, Some(test)) = (&self.model, self.test) else {
            return Err(
                "internal: `select: best_test_pgd20` without a test split or on AFF".into(),
            );
        };
        let target = clf.frozen()?;
        let attack = selection_attack();
        let (mut clean, mut robust) = (0usize, 0usize);
        for (b, first) in (0..test.n).step_by(SELECT_BATCH).enumerate() {
            if (hooks.cancelled)() {
                return Err(
                    format!("cancelled during the selection attack of epoch {epoch}").into(),
                );
            }
            let idx: Vec<usize> = (first..(first + SELECT_BATCH).min(test.n)).collect();
            let x = images_of(test, &idx, &self.device)?;
            let y = labels_of(test, &idx, &self.device)?;
            clean += correct(&target.logits(&x, false)?, &y)?;
            let mut rng = Rng::derive(self.cfg.seed, &[SELECT_STREAM, epoch as u64, b as u64]);
            let objective = |xa: &Tensor| cross_entropy_per_example(&target.logits(xa, false)?, &y);
            let adv = pgd(&x, objective, &attack, &mut rng)?.adv;
            robust += correct(&target.logits(&adv, false)?, &y)?;
            self.done += 1;
            (hooks.progress)(
                self.done,
                self.total,
                &format!(
                    "epoch {}/{} selection: PGD-20 acc {:.3} on {} test images",
                    epoch + 1,
                    self.cfg.epochs,
                    robust as f64 / (first + idx.len()) as f64,
                    first + idx.len()
                ),
            );
        }
        Ok((clean as f64 / test.n as f64, robust as f64 / test.n as f64))
    }

    /// Records every chunk of the SLF feature pass in `journal` and replays the chunks a
    /// previous run of the same node recorded, so neither a crash during the pass nor a resume
    /// after it computes the features again.
    pub fn journal_features(&mut self, journal: Journal) {
        self.journal = journal;
    }

    /// Where this run stands (after [`Finetuner::load_state`]: where it resumes).
    pub fn resume_point(&self) -> checkpoint::ResumePoint {
        checkpoint::ResumePoint {
            epochs_done: self.epoch,
            epochs: self.cfg.epochs,
            batches_done: self.partial.as_ref().map_or(0, |p| p.batches),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &FinetuneConfig {
        &self.cfg
    }

    /// The augmentation of the training images (`augment`, or the n-crop head's views).
    pub fn augmentation(&self) -> Option<&PipelineConfig> {
        self.inputs.as_ref().map(|(p, _)| p)
    }

    /// The spec of the classifier being trained.
    pub fn spec(&self) -> &ClassifierSpec {
        &self.spec
    }

    /// Epochs finished.
    pub fn epochs_done(&self) -> usize {
        self.epoch
    }

    /// Whether every epoch is done.
    pub fn finished(&self) -> bool {
        self.epoch >= self.cfg.epochs
    }

    /// Optimiser updates so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The per-epoch curve so far.
    pub fn curve(&self) -> &[EpochStats] {
        &self.curve
    }

    /// The variables being trained (for AFF the dual-BN copy, with `.pgd.` names).
    pub fn varmap(&self) -> &VarMap {
        match &self.model {
            Model::Single { varmap, .. } | Model::Dual { varmap, .. } => varmap,
        }
    }

    /// The round of the inputs of epoch `epoch` (see the module docs).
    fn round(&self, epoch: usize) -> u64 {
        if self.cfg.augment && self.cfg.ncrop.is_none() {
            epoch as u64
        } else {
            0
        }
    }

    /// The inputs of images `idx` in round `round`: `(n_views · len, 3, h, w)`, view-major.
    fn inputs(&self, idx: &[usize], round: u64) -> Result<Tensor> {
        let (data, n_views, size) = match &self.inputs {
            Some((p, nv)) => (
                render_views(p, *nv, self.images, idx, self.aug_seed, round)?,
                *nv,
                (p.size, p.size),
            ),
            None => (
                to_float(self.images, idx),
                1,
                (self.images.h, self.images.w),
            ),
        };
        Ok(Tensor::from_vec(
            data,
            (n_views * idx.len(), 3, size.0, size.1),
            &self.device,
        )?)
    }

    /// SLF / ALF: the frozen encoder's features of images `idx` in `round` (the mean over the
    /// views for an n-crop head), `(len, d)`.
    fn features(&self, frozen: &Classifier, idx: &[usize], round: u64) -> Result<Tensor> {
        let x = self.inputs(idx, round)?;
        let f = frozen.features(&x, false)?;
        Ok(match &self.cfg.ncrop {
            Some(n) => mean_over_views(&f, n.n_views)?,
            None => f,
        })
    }

    /// SLF: makes sure the cache holds the features of every image for `round`: chunk by
    /// chunk, each replayed from the journal if a run of this node recorded it, else computed
    /// and recorded.
    fn ensure_cache(&mut self, round: u64, hooks: &TrainHooks<'_>) -> Result<()> {
        if self.cache.as_ref().is_some_and(|(r, _)| *r == round) {
            return Ok(());
        }
        let Model::Single { frozen, .. } = &self.model else {
            return Err("internal: the feature cache is SLF's".into());
        };
        let start = Instant::now();
        let n = self.images.n;
        let part = format!("features-{round}");
        let replayed_before = self.journal.replayed();
        let mut parts = Vec::with_capacity(n.div_ceil(FEATURE_CHUNK));
        let mut done = self.done;
        for (c, s) in (0..n).step_by(FEATURE_CHUNK).enumerate() {
            if (hooks.cancelled)() {
                return Err(format!("cancelled while computing features (round {round})").into());
            }
            let len = (s + FEATURE_CHUNK).min(n) - s;
            let want = FeatureChunk {
                round,
                first: s,
                len,
            };
            let recorded = self.journal.get::<FeatureChunk>(&part, c, |e| {
                e.record == want
                    && e.tensor("features")
                        .is_ok_and(|t| t.dim(0).ok() == Some(len))
            });
            let f = match recorded {
                Some(e) => e.tensor("features")?.to_device(&self.device)?,
                None => {
                    let idx: Vec<usize> = (s..s + len).collect();
                    let f = self.features(frozen, &idx, round)?;
                    self.journal.put(&part, c, &want, &[("features", &f)])?;
                    f
                }
            };
            parts.push(f);
            done += 1;
            (hooks.progress)(done, self.total, &format!("features {}/{n}", s + len));
        }
        self.done = done;
        self.cache = Some((round, Tensor::cat(&parts, 0)?));
        if round > 0 {
            // an augmented SLF draws new inputs every epoch: the last round is not read again
            self.journal.remove(&format!("features-{}", round - 1));
        }
        let secs = start.elapsed().as_secs_f64();
        self.feature_seconds += secs;
        self.feature_passes += 1;
        let replayed = self.journal.replayed() - replayed_before;
        (hooks.log)(&format!(
            "features of {n} images (round {round}): {secs:.1} s{}",
            if replayed > 0 {
                format!(" ({replayed} of {} chunks replayed)", parts.len())
            } else {
                String::new()
            }
        ));
        Ok(())
    }

    /// The batches of epoch `epoch`: its seeded permutation cut into `batch_size` pieces.
    fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let perm =
            Rng::derive(self.cfg.seed, &[SHUFFLE_STREAM, epoch as u64]).permutation(self.images.n);
        perm.chunks(self.cfg.batch_size)
            .take(self.cfg.batches(self.images.n))
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// Trains one epoch (the next one, or the rest of the one a mid-epoch state stopped in),
    /// calling the hooks per batch; appends to the curve. With
    /// [`checkpoint::Resumable::checkpoint_to`],
    /// writes the state during and after the epoch.
    ///
    /// # Errors
    /// A non-finite loss (naming epoch and batch), non-finite weights at the end of the epoch
    /// (naming the epoch), cancellation, a state that cannot be written, or tensor errors.
    pub fn train_epoch(&mut self, hooks: &TrainHooks<'_>) -> Result<EpochStats> {
        let epoch = self.epoch;
        let start = Instant::now();
        let lr = self.cfg.lr_at(epoch);
        self.opt.set_lr(lr);
        let round = self.round(epoch);
        if self.cfg.mode == Mode::Slf && self.cfg.cache_features {
            self.ensure_cache(round, hooks)?;
        }
        let batches = self.epoch_batches(epoch);
        let mut p = self.partial.take().unwrap_or_default();
        if p.batches >= batches.len() {
            return Err(format!(
                "the saved state stopped after batch {} of epoch {}, which has {} batches",
                p.batches,
                epoch + 1,
                batches.len()
            )
            .into());
        }
        let first = p.batches;
        for (b, idx) in batches.iter().enumerate().skip(first) {
            if (hooks.cancelled)() {
                if b > first {
                    self.save_mid_epoch(&p, start)?;
                }
                return Err(format!("cancelled during epoch {epoch}, batch {b}").into());
            }
            let out = self
                .train_batch(idx, epoch, b)
                .map_err(|e| format!("epoch {epoch}, batch {b}: {e}"))?;
            p.batches += 1;
            p.loss_sum += out.loss * idx.len() as f64;
            p.right += out.correct;
            p.nat_right += out.natural_correct.unwrap_or(0);
            p.seen += idx.len();
            self.done += 1;
            (hooks.progress)(
                self.done,
                self.total,
                &format!(
                    "epoch {}/{} loss {:.4} acc {:.3}",
                    epoch + 1,
                    self.cfg.epochs,
                    p.loss_sum / p.seen as f64,
                    p.right as f64 / p.seen as f64
                ),
            );
            if b + 1 < batches.len()
                && self
                    .checkpoint
                    .as_ref()
                    .is_some_and(checkpoint::Cadence::due)
            {
                self.save_mid_epoch(&p, start)?;
            }
        }
        let seen_f = p.seen.max(1) as f64;
        let mut stats = EpochStats {
            epoch,
            loss: p.loss_sum / seen_f,
            acc: p.right as f64 / seen_f,
            natural_acc: (self.cfg.mode == Mode::Aff).then_some(p.nat_right as f64 / seen_f),
            lr,
            seconds: p.seconds + start.elapsed().as_secs_f64(),
            images: p.seen,
            test_clean_acc: None,
            test_pgd_acc: None,
        };
        (hooks.log)(&format!(
            "epoch {}/{}{}: loss {:.5} acc {:.4}{} lr {:.6} {:.1} s",
            epoch + 1,
            self.cfg.epochs,
            if self.cfg.clean_epoch(epoch) {
                " (clean)"
            } else {
                ""
            },
            stats.loss,
            stats.acc,
            stats
                .natural_acc
                .map(|a| format!(" natural acc {a:.4}"))
                .unwrap_or_default(),
            stats.lr,
            stats.seconds
        ));
        // a diverged model must fail here, before its state or checkpoint is saved
        let bad = checkpoint::non_finite(self.varmap())?;
        if let Some(first) = bad.first() {
            return Err(format!(
                "epoch {epoch}: the weights are not finite after its last step ({} tensors, \
                 first `{first}`; lr {lr:e}): the training diverged, lower `lr`",
                bad.len()
            )
            .into());
        }
        if self.cfg.select == Selection::BestTestPgd20 {
            let (clean, robust) = self.select_eval(epoch, hooks)?;
            stats.test_clean_acc = Some(clean);
            stats.test_pgd_acc = Some(robust);
            stats.seconds = p.seconds + start.elapsed().as_secs_f64();
            let best_so_far = self
                .best
                .as_ref()
                .and_then(|(e, _)| self.curve.get(*e))
                .and_then(|s| s.test_pgd_acc);
            let kept = best_so_far.is_none_or(|b| robust > b);
            if kept {
                let head = self
                    .state_vars()
                    .into_iter()
                    .map(|(n, v)| Ok((n, v.as_detached_tensor().copy()?)))
                    .collect::<Result<Vec<_>>>()?;
                self.best = Some((epoch, head));
            }
            (hooks.log)(&format!(
                "epoch {}/{} selection: test clean acc {clean:.4}, PGD-20 acc {robust:.4}{}",
                epoch + 1,
                self.cfg.epochs,
                if kept { " (best so far: kept)" } else { "" }
            ));
        }
        self.curve.push(stats.clone());
        self.epoch += 1;
        self.checkpoint_now(None)?;
        Ok(stats)
    }

    /// Writes the state of an unfinished epoch (`p` so far, `start` of this call).
    fn save_mid_epoch(&mut self, p: &EpochProgress, start: Instant) -> Result<()> {
        // a diverging model is reported at the end of the epoch; never keep its weights
        if self.checkpoint.is_none() || !checkpoint::non_finite(self.varmap())?.is_empty() {
            return Ok(());
        }
        let progress = EpochProgress {
            seconds: p.seconds + start.elapsed().as_secs_f64(),
            ..p.clone()
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

    fn train_batch(&mut self, idx: &[usize], epoch: usize, b: usize) -> Result<BatchOut> {
        let rows = Tensor::from_vec(
            idx.iter()
                .map(|&i| u32::try_from(i))
                .collect::<std::result::Result<Vec<_>, _>>()?,
            idx.len(),
            &self.device,
        )?;
        let y = self.labels.index_select(&rows, 0)?;
        let round = self.round(epoch);
        let mut attack_rng = Rng::derive(self.cfg.seed, &[ATTACK_STREAM, epoch as u64, b as u64]);
        let (loss, logits, natural) = match &self.model {
            Model::Single { clf, frozen, .. } => {
                let f = match (&self.cache, self.cfg.mode) {
                    (Some((r, cache)), Mode::Slf) if *r == round => cache.index_select(&rows, 0)?,
                    (_, Mode::Slf) => self.features(frozen, idx, round)?,
                    (_, Mode::Alf) if self.cfg.clean_epoch(epoch) => {
                        frozen.features(&self.inputs(idx, round)?, false)?
                    }
                    (_, Mode::Alf) => {
                        let x = self.inputs(idx, round)?;
                        // the attack sees the current head through a detached copy
                        let target = clf.frozen()?;
                        let objective =
                            |xa: &Tensor| cross_entropy_per_example(&target.logits(xa, false)?, &y);
                        let adv = pgd(&x, objective, &self.cfg.alf_attack(), &mut attack_rng)?.adv;
                        frozen.features(&adv, false)?
                    }
                    (_, Mode::Aff) => return Err("internal: AFF on a single-BN model".into()),
                };
                let logits = clf.head().forward(&f)?;
                (cross_entropy(&logits, &y)?, logits, None)
            }
            Model::Dual { net, .. } => {
                let x = self.inputs(idx, round)?;
                let adv = self.trades_examples(net, &x, &mut attack_rng)?;
                let nat = net.logits(&x, DEFAULT_BRANCH, true)?;
                let adv_logits = net.logits(&adv, PGD_BRANCH, true)?;
                let l = trades_loss(&nat, &adv_logits, &y, self.cfg.beta)?;
                (l.total, adv_logits, Some(nat))
            }
        };
        let value = scalar(&loss)?;
        if !value.is_finite() {
            return Err(format!(
                "the loss is {value} at optimiser step {} (lr {:e})",
                self.steps,
                self.opt.lr()
            )
            .into());
        }
        let grads = loss.backward()?;
        self.opt.step(&grads)?;
        self.steps += 1;
        Ok(BatchOut {
            loss: value,
            correct: correct(&logits, &y)?,
            natural_correct: natural.map(|n| correct(&n, &y)).transpose()?,
        })
    }

    /// AFF's adversarial inputs on the `pgd` branch of a detached copy of `net` in eval mode,
    /// against the `normal` branch's natural logits ([`trades_examples`]).
    fn trades_examples(&self, net: &DualClassifier, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let frozen = net.frozen()?;
        let nat = frozen.logits(x, DEFAULT_BRANCH, false)?.detach();
        trades_examples(
            x,
            &nat,
            |xa| frozen.logits(xa, PGD_BRANCH, false),
            &self.cfg,
            rng,
        )
    }

    /// The variables a resumed run needs back: the head (SLF / ALF; the frozen encoder is
    /// rebuilt from the encoder input), or every variable of the dual-BN copy (AFF: weights
    /// and both BN branches' running statistics).
    fn state_vars(&self) -> Vec<(String, Var)> {
        match &self.model {
            Model::Single { varmap, .. } => named_vars(varmap)
                .into_iter()
                .filter(|(n, _)| n.starts_with(&format!("{CLASSIFIER}.")))
                .collect(),
            Model::Dual { varmap, .. } => named_vars(varmap),
        }
    }

    /// What a saved state must match to be resumed by this trainer: the state layout, the
    /// resolved configuration, the classifier spec and a hash of the training images and
    /// labels. (The encoder is not in it: the scratch folder belongs to one node key, which
    /// covers the encoder input.)
    fn fingerprint(&self) -> Result<Value> {
        let mut h = blake3::Hasher::new();
        h.update_rayon(&self.images.images);
        for l in &self.images.labels {
            h.update(&l.to_le_bytes());
        }
        Ok(json!({
            "format": STATE_FORMAT,
            "config": serde_json::to_value(&self.cfg)?,
            "spec": serde_json::to_value(&self.spec)?,
            "n_train": self.images.n,
            "data_blake3": h.finalize().to_hex().as_str(),
        }))
    }

    /// Writes the resumable state atomically to `path` (a temporary file renamed over it):
    /// the trained variables ([`Finetuner::varmap`]'s head for SLF / ALF, every variable of
    /// the dual-BN copy for AFF, BN statistics included) as `model/<name>`, the optimiser
    /// buffers as `optim/<name>`, and `meta/json`: the fingerprint (config, spec, data hash),
    /// the epoch and step counters and the curve so far. The schedule needs no state of its
    /// own (the rate is a function of the epoch), and every random stream is derived from
    /// `(seed, epoch)` (shuffle, augmentation) or `(seed, epoch, batch)` (attacks), so
    /// [`Finetuner::load_state`] into a fresh trainer continues bit-identically on the same
    /// device and thread count.
    ///
    /// # Errors
    /// I/O (naming the path) or tensor errors.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        self.write_state(path, self.partial.as_ref())
    }

    fn write_state(&self, path: &Path, partial: Option<&EpochProgress>) -> Result<()> {
        let meta = StateMeta {
            fingerprint: self.fingerprint()?,
            epoch: self.epoch,
            steps: self.steps,
            done: self.done,
            feature_seconds: self.feature_seconds,
            feature_passes: self.feature_passes,
            curve: self.curve.clone(),
            partial: partial.cloned(),
            best: self.selected_epoch(),
        };
        let mut extra = vec![("meta/json".into(), checkpoint::json_tensor(&meta)?)];
        if let Some((_, head)) = &self.best {
            extra.extend(head.iter().map(|(n, t)| (format!("best/{n}"), t.clone())));
        }
        TrainState::save(
            path,
            &self.state_vars(),
            self.opt.state(),
            extra,
            checkpoint::ResumePoint {
                batches_done: partial.map_or(0, |p| p.batches),
                ..self.resume_point()
            },
        )?;
        Ok(())
    }

    /// Restores a [`Finetuner::save_state`] file into this freshly built trainer, all or
    /// nothing: everything is checked (fingerprint, names, shapes, optimiser state) before
    /// anything is changed, so on an error the trainer is still the fresh one.
    ///
    /// # Errors
    /// A state written for other params or data (the message names the first differing
    /// field), a missing or misshapen tensor, an epoch past the configured ones, or I/O and
    /// format errors; each names the file.
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let s = TrainState::load(path, &self.device)?;
        let meta: StateMeta = s.json("meta/json")?;
        let want = self.fingerprint()?;
        if meta.fingerprint != want {
            return Err(s
                .error(format!(
                    "was written for other params or data ({}), not resuming from it",
                    first_difference(&meta.fingerprint, &want, "")
                ))
                .into());
        }
        let batches = self.cfg.batches(self.images.n);
        if let Some(p) = &meta.partial
            && (meta.epoch >= self.cfg.epochs || p.batches >= batches)
        {
            return Err(s
                .error(format!(
                    "batch {} of epoch {} does not fit a run of {} epochs of {batches} batches",
                    p.batches,
                    meta.epoch + 1,
                    self.cfg.epochs
                ))
                .into());
        }
        if meta.epoch > self.cfg.epochs || meta.curve.len() != meta.epoch {
            return Err(s
                .error(format!(
                    "epoch {} with {} curve entries does not fit a run of {} epochs",
                    meta.epoch,
                    meta.curve.len(),
                    self.cfg.epochs
                ))
                .into());
        }
        let plan = s.vars(&self.state_vars())?;
        let best = match meta.best {
            Some(e) if e < meta.epoch => {
                let vars = self.state_vars();
                let head = s
                    .vars_under("best", &vars)?
                    .into_iter()
                    .zip(&vars)
                    .map(|((_, t), (n, _))| (n.clone(), t))
                    .collect();
                Some((e, head))
            }
            Some(e) => {
                return Err(s
                    .error(format!(
                        "its kept epoch {e} is not one of the {} finished",
                        meta.epoch
                    ))
                    .into());
            }
            None if self.cfg.select == Selection::BestTestPgd20 && meta.epoch > 0 => {
                return Err(s
                    .error("has no kept head for `select: best_test_pgd20`")
                    .into());
            }
            None => None,
        };
        // checks every entry before it changes anything
        self.opt
            .load_state(&s.optim())
            .map_err(|e| s.error(format!("optimiser state: {e}")))?;
        checkpoint::set_vars(plan)?;
        // the SLF feature cache is not in the state: it is filled again (replayed from the
        // feature journal, or recomputed bit-identically: same images, chunks and encoder)
        // before the next batch, one pass more than a run without the break, so count it:
        // within an epoch always, at an epoch's end when the next epoch would not have
        // made a new one (the inputs do not change per epoch)
        let recompute_cache = self.cfg.mode == Mode::Slf
            && self.cfg.cache_features
            && meta.epoch < self.cfg.epochs
            && (meta.partial.is_some()
                || (!(self.cfg.augment && self.cfg.ncrop.is_none()) && meta.epoch > 0));
        if recompute_cache {
            self.total += self.images.n.div_ceil(FEATURE_CHUNK) as u64;
        }
        self.epoch = meta.epoch;
        self.steps = meta.steps;
        self.done = meta.done;
        self.feature_seconds = meta.feature_seconds;
        self.feature_passes = meta.feature_passes;
        self.curve = meta.curve;
        self.partial = meta.partial;
        self.best = best;
        self.cache = None;
        Ok(())
    }

    /// The trained classifier and its variables, single BN (AFF keeps the `pgd` branch under
    /// the plain names), ready for [`Classifier::save`].
    ///
    /// # Errors
    /// Tensor errors.
    pub fn finish(&self) -> Result<(VarMap, Classifier)> {
        match &self.model {
            Model::Single { varmap, clf, .. } => match &self.best {
                None => Ok((varmap.clone(), clf.as_ref().clone())),
                // a fresh classifier (the trainer's variables stay as trained) with the
                // kept epoch's head
                Some((_, head)) => {
                    let (out, clf) =
                        Classifier::build_seeded(&self.spec, self.cfg.seed, &self.device)?;
                    let kept: HashMap<&str, &Tensor> =
                        head.iter().map(|(n, t)| (n.as_str(), t)).collect();
                    let trained: HashMap<String, Var> = named_vars(varmap).into_iter().collect();
                    for (name, var) in named_vars(&out) {
                        let src = match kept.get(name.as_str()) {
                            Some(t) => (*t).clone(),
                            None => trained
                                .get(&name)
                                .ok_or_else(|| format!("internal: the classifier has no {name}"))?
                                .as_detached_tensor(),
                        };
                        var.set(&src.copy()?)?;
                    }
                    Ok((out, clf))
                }
            },
            Model::Dual { varmap, .. } => {
                let (out, clf) = Classifier::build_seeded(&self.spec, self.cfg.seed, &self.device)?;
                let dual: HashMap<String, Var> = named_vars(varmap).into_iter().collect();
                for (name, var) in named_vars(&out) {
                    let branched = match name.rsplit_once('.') {
                        Some((m, p)) => format!("{m}.{PGD_BRANCH}.{p}"),
                        None => name.clone(),
                    };
                    let src = dual
                        .get(&branched)
                        .or_else(|| dual.get(&name))
                        .ok_or_else(|| format!("internal: the dual model has no {name}"))?;
                    var.set(&src.as_detached_tensor().copy()?)?;
                }
                Ok((out, clf))
            }
        }
    }

    /// The `metrics.json` of the run so far.
    pub fn metrics(&self, device: &str) -> Value {
        let seconds: f64 = self.curve.iter().map(|e| e.seconds).sum();
        let last = self.curve.last();
        let mut m = json!({
            "mode": self.cfg.mode,
            "features": self.cfg.features,
            "head": if self.cfg.ncrop.is_some() { "ncrop" } else { "full" },
            "train_loss": last.map(|e| e.loss),
            "train_acc": last.map(|e| e.acc),
            "seconds": seconds,
            "feature_seconds": self.feature_seconds,
            "feature_passes": self.feature_passes,
            "epochs": self.curve.len(),
            "steps": self.steps,
            "n_train": self.images.n,
            "classes": self.spec.classes,
            "width": self.spec.width,
            "feature_dim": self.spec.feature_dim(),
            "device": device,
            "threads": rayon::current_num_threads(),
            "curve": self.curve,
        });
        if let (Some(a), Value::Object(map)) = (last.and_then(|e| e.natural_acc), &mut m) {
            map.insert("train_acc_natural".into(), json!(a));
        }
        let kept = self.selected_epoch().and_then(|e| self.curve.get(e));
        if let (Some(e), Value::Object(map)) = (kept, &mut m) {
            map.insert("select".into(), json!(self.cfg.select));
            // 1-based, as the log counts epochs
            map.insert("selected_epoch".into(), json!(e.epoch + 1));
            map.insert("selected_test_clean_acc".into(), json!(e.test_clean_acc));
            map.insert("selected_test_pgd20_acc".into(), json!(e.test_pgd_acc));
        }
        m
    }
}

impl checkpoint::Resumable for Finetuner<'_> {
    fn resume_from(&mut self, path: &Path) -> Result<checkpoint::ResumePoint> {
        self.load_state(path)?;
        Ok(self.resume_point())
    }

    fn checkpoint_to(&mut self, path: PathBuf, every: Duration) {
        self.checkpoint = Some(checkpoint::Cadence::new(path, every));
    }
}

/// What [`finetune`] returns.
pub struct Finetuned {
    /// The classifier's variables (single BN).
    pub varmap: VarMap,
    /// The classifier.
    pub classifier: Classifier,
    /// `metrics.json`.
    pub metrics: Value,
    /// The per-epoch curve.
    pub curve: Vec<EpochStats>,
}

/// Runs a whole fine-tuning: [`Finetuner::new`], every epoch, [`Finetuner::finish`].
///
/// # Errors
/// As [`Finetuner::new`] and [`Finetuner::train_epoch`].
pub fn finetune(
    cfg: FinetuneConfig,
    enc: &EncoderWeights,
    train: &Split,
    classes: usize,
    device: &Device,
    hooks: &TrainHooks<'_>,
) -> Result<Finetuned> {
    let mut t = Finetuner::new(cfg, enc, train, classes, device)?;
    while !t.finished() {
        t.train_epoch(hooks)?;
    }
    let (varmap, classifier) = t.finish()?;
    let backend = if device.is_cpu() { "cpu" } else { "cuda" };
    Ok(Finetuned {
        varmap,
        classifier,
        metrics: t.metrics(backend),
        curve: t.curve().to_vec(),
    })
}

/// Clean accuracy of `clf` on `split` in eval mode: full images, or for an n-crop head the
/// mean feature of its views drawn from `seed` (one draw per image).
///
/// # Errors
/// Tensor errors.
pub fn accuracy(clf: &Classifier, split: &Split, seed: u64, device: &Device) -> Result<f64> {
    let n = split.n;
    if n == 0 {
        return Ok(0.0);
    }
    let spec = clf.spec();
    let pipeline = spec
        .ncrop
        .as_ref()
        .map(|s| (ncrop_pipeline(s, split.h), s.n_views));
    let mut right = 0usize;
    for s in (0..n).step_by(FEATURE_CHUNK) {
        let idx: Vec<usize> = (s..(s + FEATURE_CHUNK).min(n)).collect();
        let logits = match &pipeline {
            Some((p, nv)) => {
                let data = render_views(p, *nv, split, &idx, seed, 0)?;
                let x = Tensor::from_vec(data, (nv * idx.len(), 3, p.size, p.size), device)?;
                clf.logits_ncrop(&x, *nv, false)?
            }
            None => clf.logits(&images_of(split, &idx, device)?, false)?,
        };
        right += correct(&logits, &labels_of(split, &idx, device)?)?;
    }
    Ok(right as f64 / n as f64)
}

/// Rows `idx` of `split` as a float image batch `(n, 3, h, w)` in `[0, 1]`.
fn images_of(split: &Split, idx: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        to_float(split, idx),
        (idx.len(), 3, split.h, split.w),
        device,
    )?)
}

/// The labels of rows `idx` of `split` (u32).
fn labels_of(split: &Split, idx: &[usize], device: &Device) -> Result<Tensor> {
    let y: Vec<u32> = idx
        .iter()
        .map(|&i| u32::try_from(split.labels[i]))
        .collect::<std::result::Result<_, _>>()?;
    Ok(Tensor::from_vec(y, idx.len(), device)?)
}
