//! `finetune`: a linear head (SLF, ALF) or the whole network (AFF) trained on a pretrained
//! encoder (METHODS.md 10, and the CF-AMC linear-evaluation heads of 11.1).
//!
//! Inputs: `encoder`, a `pretrain` artifact (`encoder.safetensors`: `encoder.*`,
//! `pre_feature.*`, `projection.*`), and `dataset` (its train split is trained on).
//!
//! # Modes (METHODS.md 10.2)
//!
//! - `slf`: only the head is trained, on a frozen encoder in eval mode, with CE on clean
//!   inputs. The encoder never runs per batch: the features of the whole split are computed
//!   once (no augmentation, or the n-crop head, whose views are drawn once) or once per epoch
//!   (`augment: true`), and the head trains on rows of that cache.
//! - `alf`: the same trainable set and frozen encoder, on l_inf PGD examples (`pgd_steps`
//!   steps of `alpha` in the `eps` ball, uniform random start `U(−eps, eps)`, not clamped to
//!   the box before the first forward unless `faithful.q31` is off, or no random start with
//!   `random_start: false`, projected onto the ball and `[0, 1]` after every step, CE through
//!   encoder + head in eval mode, the attack on a detached copy of the current weights);
//!   `clean_epochs_before` / `_after` add clean epochs around the adversarial ones.
//! - `aff`: every parameter, TRADES (`CE(f(x), y) + beta · KL(f(x) ‖ f(x̃))`): `x̃` starts at
//!   `x + 0.001 · N(0, 1)` (not clamped unless `faithful.q31` is off) and takes `pgd_steps`
//!   sign steps of `alpha` that maximise the KL, projected onto the `eps` ball and `[0, 1]`,
//!   in eval mode. The training forward runs in train mode with dual BN (natural inputs
//!   through `normal`, adversarial ones through `pgd`, in the backbone and in `pre_feature`),
//!   both branches initialised from the encoder's BN (the backbone's from scratch with
//!   `faithful.q34b`); the saved model keeps the `pgd` branch under the plain single-BN names,
//!   so `evaluate` loads it as any classifier.
//!
//! An encoder with a `pgd` BN branch (ACL family) is read through that branch in every mode
//! (\[Q34\] a; its shortcut convs and BNs are loaded too, \[Q34\] b clean, unless
//! `faithful.q34b`).
//!
//! # Architecture
//!
//! The pretrain node's `width` and `hidden_dim` are not in the tensor names, so they are read
//! off the shapes: `encoder.conv1.weight` is `(width, 3, 3, 3)`, `pre_feature.0.weight` is
//! `(hidden_dim, 8 · width)` ([`EncoderWeights`]). `features: pre_feature` (CF-AMC: the head
//! reads the `hidden_dim`-wide `pre_feature` output, \[Q19\]) needs that head in the
//! checkpoint; ACL-family encoders use `features: backbone` (the `8 · width` pooled feature).
//!
//! # Params
//!
//! | param | default | meaning |
//! |---|---|---|
//! | `mode` | (required) | `slf`, `alf` or `aff` |
//! | `features` | `pre_feature`; `backbone` with a per-pretraining preset (`acl`, …) | `pre_feature` or `backbone` |
//! | `head` | `full` | `full` (single images) or `ncrop` (the head reads the mean feature of `n_views` random EMP views, METHODS.md 11.1a; SLF only) |
//! | `n_views`, `views` | 4, `crop` | the n-crop draw: `crop` (scale [0.08, 1], ratio [3/4, 4/3]) or `patch` (scale 0.25, ratio 1), every colour augmentation on (\[Q20\]); drawn once per training image |
//! | `preset` | `cf_adam` for SLF with the full head, `cf_sgd` for SLF with the n-crop head, `air` for ALF / AFF | fills in every optimisation param left out (table below); also R-AIR's per-pretraining rows `acl`, `dynacl`, `acl_air`, `dynacl_air`, `dynacl_air_pp` (+ `_cifar100`) and `advcl` |
//! | `optimizer` | preset | `adam` (default betas) or `sgd` (momentum, no Nesterov) |
//! | `lr`, `momentum`, `weight_decay` | preset | L2 weight decay on every trained tensor |
//! | `schedule` | preset | `constant`, `cosine` (`t_max` epochs, stepped per epoch, periodic beyond) or `multistep` (×0.1 from each of `milestones`, 0-based epochs) |
//! | `t_max`, `milestones` | preset | |
//! | `batch_size`, `epochs`, `drop_last` | preset | images per batch; the last partial batch is dropped with `drop_last` (AFF also drops a last batch of one image) |
//! | `augment` | preset | RandomCrop(32, pad 4, zeros) + HFlip on the training images, redrawn every epoch (full head only) |
//! | `head_init` | preset | `default` (PyTorch's Linear init, seeded) or `zeros` (METHODS.md 10.1) |
//! | `eps`, `alpha`, `pgd_steps` | 8/255, 2/255, 10 | ALF / AFF attack (fractions allowed) |
//! | `random_start` | `true` | ALF: the attack starts at `U(−eps, eps)` around the image (R-AIR), or at the image itself with `false` (R-CF's robust head, "zero init"); keyed only when `false` |
//! | `clean_epochs_before`, `clean_epochs_after` | 0, 0 | ALF: epochs on clean inputs before and after the `epochs` adversarial ones, one optimiser and schedule throughout (R-CF's EMP script trains its robust head 2 clean, 2 adversarial, 2 clean epochs, \[Q13\]); `metrics.epochs` and the curve count them all; keyed only when not 0 |
//! | `beta` | 6 | TRADES weight (AFF) |
//! | `seed` | 0 | shuffles, augmentations, attacks, the default head init |
//! | `device` | `auto` | `auto`, `cpu` or `cuda:N` (the backend is keyed, the ordinal is not) |
//! | `checkpoint_minutes` | 10 | minutes between training-state writes within an epoch (0: every batch; not keyed, see Resume) |
//! | `select` | `last` | which epoch's head is kept: `last`, or `best_test_pgd20` (SLF / ALF with the full-image head; \[Q35\], R-ADV's SLF script): after every epoch the head is attacked on the dataset's *test* split (PGD-20, l_inf 8/255, step 2/255, uniform random start, eval mode, [`selection_attack`]) and the head of the epoch with the best PGD-20 accuracy is kept (the first on ties). Selection on the test set reproduces R-ADV's reported numbers; it is not a sound protocol. Keyed only when not `last` |
//! | `faithful` | `{q31: true, q34b: false}` | the reference-code quirks, `true` / `false` for all or a map of some (`{q34b: true}`) |
//!
//! The `faithful` switches (METHODS.md section 17):
//!
//! | switch | default | `true` (reference, R-AIR / R-RCS) | `false` |
//! |---|---|---|---|
//! | `q31` | `true` | the random start (ALF: `x + U(−eps, eps)`; AFF: `x + 0.001 · N(0, 1)`) goes into the first forward unclamped, so the first gradient is taken at a slightly out-of-range image | the start is clamped to `[0, 1]` first (METHODS.md 2.5) |
//! | `q34b` | `false` | AFF: R-AIR's `load_state_dict(strict=False)` misses the BN and shortcut names of its dual-BN model, so every BN of the backbone (both branches: weight 1, bias 0, running mean 0, variance 1) and the three 1×1 shortcut convs (Kaiming-normal, fan-out) start from scratch; the other convs and `pre_feature` are pretrained | both branches and the shortcut convs start from the encoder (its `pgd` branch where it has one), METHODS.md's clean variant |
//!
//! `q34b` came after the first version, so it defaults to that version's (clean) behaviour
//! and is keyed only when on: every earlier AFF node keeps its key. `faithful: true` turns it
//! on too (the reference's every quirk).
//!
//! Presets:
//!
//! | preset | optimizer | lr | momentum | weight decay | schedule | batch | epochs | drop_last | augment | head init | source |
//! |---|---|---|---|---|---|---|---|---|---|---|---|
//! | `cf_adam` | Adam | 3e-4 | - | 0 | constant | 256 | 20 | yes | no | default | R-CF full-image heads (SimCLR script's 20 epochs; the EMP script's 2 are \[Q14\]) |
//! | `cf_sgd` | SGD | 0.03 | 0.9 | 5e-5 | cosine, `t_max` 100 | 100 | 100 | yes | no | default | R-CF `linear_train` (n-crop head) |
//! | `air`, SLF / ALF | SGD | 0.01 | 0.9 | 2e-4 | multistep 10, 20 | 512 | 25 | no | yes | zeros | METHODS.md 10.3, the ACL / DynACL CIFAR-10 row |
//! | `air`, AFF | SGD | 0.1 | 0.9 | 2e-4 | multistep 15, 20 | 128 | 25 | no | yes | zeros | METHODS.md 10.3, the fallback row (= DynACL's AFF) |
//!
//! The `air` preset picks, per mode, the 10.3 row that most pretraining labels share. The
//! per-pretraining presets are R-AIR's `setup_hyperparameter` rows (METHODS.md 10.3), with the
//! `air` preset's SGD, weight decay, multistep ×0.1, augmentation and zero head, and per mode
//! batch / lr / milestones / epochs:
//!
//! | preset (CIFAR-10; `_cifar100` for CIFAR-100) | SLF | ALF | AFF |
//! |---|---|---|---|
//! | `acl` (ACL, ACL-RCS) | 512 / 0.01 (C100 0.05) / 10,20 / 25 | as SLF | 128 / 0.1 / 40,60 / 100 |
//! | `dynacl` (DynACL, DynACL-RCS) | 512 / 0.01 (C100 0.05) / 10,20 / 25 | as SLF | 128 / 0.1 / 15,20 / 25 |
//! | `acl_air` | 512 / 0.005 (C100 0.1) / 10,20 / 25 | 512 / 0.01 (C100 0.1) / 10,20 / 25 | 128 / 0.1 / 40,60 / 100 |
//! | `dynacl_air` | 512 / 0.01 / 10,20 / **5** (C100 0.1, 25 epochs) | 512 / 0.01 (C100 0.1) / 10,20 / 25 | 128 / 0.1 / 15,20 / 25 |
//! | `dynacl_air_pp` (DynACL-AIR++) | 512 / 0.01 (C100 0.1) / 10,20 / 25 | 512 / 0.01 / 10,20 / **4** (C100 0.1, 25 epochs) | 128 / 0.1 / 15,20 / 25 |
//! | `advcl` (AdvCL) | 512 / 0.01 / 15,20 / 25, PyTorch's head init (R-ADV's SLF script) | 128 / 0.1 / 15,20 / 25 (R-AIR's fallback) | 128 / 0.1 / 15,20 / 25 |
//!
//! R-ADV's SLF script also evaluates PGD-20 on the test set after every epoch and reports the
//! best epoch (\[Q35\]); `finetune` keeps the last epoch and leaves evaluation to `evaluate`
//! unless `select: best_test_pgd20` asks for R-ADV's selection.
//!
//! Canonical form: the preset's values are written out and `preset` itself is dropped, so a
//! preset and the same values written by hand key alike; params that do not apply are dropped
//! (`eps`, `alpha`, `pgd_steps` for SLF; `beta` unless AFF; `n_views`, `views` unless
//! `ncrop`; `augment` for `ncrop`; `momentum` for Adam; `t_max` unless cosine; `milestones`
//! unless multistep; `faithful.q31` unless ALF with `eps > 0` or AFF, the modes whose attack
//! has a random start; `faithful.q34b` unless AFF and on), so sweeping them recomputes nothing.
//!
//! # Outputs
//!
//! - `classifier.safetensors`: `encoder.*` (torchvision `resnet18` names, single BN, running
//!   statistics included), `pre_feature.0.*`, `pre_feature.1.*` (with `features:
//!   pre_feature`), `classifier.weight`, `classifier.bias`; and `classifier.json`, the
//!   [`ClassifierSpec`](crate::nn::classifier::ClassifierSpec) (width, hidden_dim, features,
//!   classes, n-crop geometry) — both written by
//!   [`Classifier::save`](crate::nn::classifier::Classifier::save).
//! - `metrics.json`: `mode`, `features`, `head`, `train_loss` and `train_acc` of the last
//!   epoch (SLF: clean (augmented) inputs; ALF: the PGD examples; AFF: the TRADES loss and the
//!   `pgd` branch's accuracy on the TRADES examples, plus `train_acc_natural`, the `normal`
//!   branch on natural inputs), `seconds` (all epochs, feature passes included),
//!   `feature_seconds`, `feature_passes` (encoder passes over the split that filled the SLF
//!   feature cache: 1, or one per epoch with `augment`; one more after a resume when the cache
//!   never changes), `epochs`, `steps`, `n_train`, `classes`, `width`, `feature_dim`,
//!   `device`, `threads`, and `curve` (per epoch: `loss`, `acc`, `lr`, `seconds`, `images`;
//!   with `select: best_test_pgd20` also `test_clean_acc` and `test_pgd_acc`, and at the top
//!   level `select`, `selected_epoch` (1-based), `selected_test_clean_acc` and
//!   `selected_test_pgd20_acc`).
//!
//! Progress is reported per batch (and per chunk of the feature pass); the run polls for
//! cancellation between batches. A non-finite loss fails the node naming epoch and batch.
//!
//! # Resume
//!
//! After every epoch, every `checkpoint_minutes` (default 10; 0: after every batch) within an
//! epoch and on Ctrl-C, the training state is written atomically to [`STATE_FILE`] in the
//! node's scratch folder ([`Finetuner::save_state`]): the trained variables (the head for SLF / ALF;
//! for AFF every variable of the dual-BN copy, both BN branches and their running statistics
//! included), the optimiser buffers, the epoch and step counters, the curve so far and the
//! unfinished epoch's batch count and partial sums, with a fingerprint of the resolved config
//! and the training data. A killed run restarted with the same key loads it and continues from
//! the batch after the last write (log line `resumed from <path> after epoch N of M` or `… in
//! epoch N of M after batch B`); a state whose fingerprint differs is ignored with a log line naming
//! the first difference, and the run starts over. The schedule is a function of the epoch, and
//! the shuffles and augmentations draw from streams derived from `(seed, epoch)` and the
//! attacks from `(seed, epoch, batch)`, so a resumed run ends with weights bit-identical to an
//! uninterrupted one on the CPU (same thread count). The SLF feature pass records each chunk of
//! features in the scratch folder's journal (`journal/features-<round>/`); a resumed run, or
//! one killed during the pass, replays the recorded chunks instead of computing them again
//! (log: `(12 of 196 chunks replayed)`). `checkpoint_minutes` is not keyed.
//!
//! `VERSION` 2: `faithful.q31` (default on) stopped clamping ALF's random start, which version
//! 1 did; SLF and AFF train as in version 1.

mod trainer;

pub use trainer::{
    AFF_INIT_NOISE, DUAL_BRANCHES, EncoderWeights, EpochStats, FEATURE_CHUNK, Faithful,
    FinetuneConfig, Finetuned, Finetuner, HeadInit, Mode, OptimizerKind, PGD_BRANCH, SELECT_BATCH,
    Schedule, Selection, accuracy, finetune, ncrop_pipeline, ncrop_spec, render_views,
    selection_attack, trades_examples,
};

/// The resumable state in the scratch folder ([`Finetuner::save_state`]).
pub use crate::nn::checkpoint::STATE_FILE;

use pipe_engine::{BoxError, NormalizeCtx, ParamError, Resources, Slots, StageCtx, TypedStage};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::data::{self, tensor_io::DATA_FILE};
use crate::device::DeviceSpec;
use crate::kinds::pretrain::{ENCODER_FILE, TrainHooks, ViewKind};
use crate::nn::classifier::{FeatureKind, SPEC_FILE, WEIGHTS_FILE};
use crate::params::{Checks, MAX_EPOCHS, MAX_VIEWS, de_real_opt};

/// The `finetune` kind.
pub struct Finetune;

/// The head under the features.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// Single full images.
    #[default]
    Full,
    /// The bag-of-features head over `n_views` random views.
    Ncrop,
}

/// A bundle of optimisation defaults (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// R-CF's full-image heads: Adam 3e-4, batch 256, `drop_last`, 20 epochs.
    CfAdam,
    /// R-CF's n-crop head: SGD 0.03, momentum 0.9, wd 5e-5, batch 100, cosine `T_max` 100.
    CfSgd,
    /// R-AIR / R-RCS fine-tuning: SGD, momentum 0.9, wd 2e-4, multistep, augmentation.
    Air,
    /// `air` with METHODS.md 10.3's ACL / ACL-RCS row, CIFAR-10.
    Acl,
    /// The ACL row, CIFAR-100.
    AclCifar100,
    /// The DynACL / DynACL-RCS row, CIFAR-10.
    Dynacl,
    /// The DynACL row, CIFAR-100.
    DynaclCifar100,
    /// The ACL-AIR row, CIFAR-10.
    AclAir,
    /// The ACL-AIR row, CIFAR-100.
    AclAirCifar100,
    /// The DynACL-AIR row, CIFAR-10.
    DynaclAir,
    /// The DynACL-AIR row, CIFAR-100.
    DynaclAirCifar100,
    /// The DynACL-AIR++ row, CIFAR-10.
    DynaclAirPp,
    /// The DynACL-AIR++ row, CIFAR-100.
    DynaclAirPpCifar100,
    /// AdvCL encoders: R-ADV's SLF (`finetuning_advCL_SLF.py`: batch 512, lr 0.01, ×0.1 at
    /// epochs 15 and 20, 25 epochs, PyTorch's head init) and R-AIR's fallback row for ALF / AFF
    /// (the RobustSSL benchmark fine-tunes AdvCL with R-AIR's code).
    Advcl,
}

/// The `schedule` param.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Constant rate.
    Constant,
    /// Per-epoch cosine with `t_max`.
    Cosine,
    /// Per-epoch ×0.1 at `milestones`.
    Multistep,
}

/// The `faithful` param as written: a bool for all switches or a map of some of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FaithfulParam {
    /// \[Q31\] the attack's random start is not clamped to the box before the first forward.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q31: Option<bool>,
    /// \[Q34\] b: AFF's dual-BN copy starts the backbone's BNs and shortcut convs from scratch
    /// (default `false`, the clean variant; `faithful: true` turns it on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q34b: Option<bool>,
}

impl FaithfulParam {
    fn all(v: bool) -> Self {
        Self {
            q31: Some(v),
            q34b: Some(v),
        }
    }

    /// Whether no switch is written (the canonical form of a mode without attack).
    pub fn is_empty(&self) -> bool {
        self.q31.is_none() && self.q34b.is_none()
    }
}

impl<'de> Deserialize<'de> for FaithfulParam {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let expected = "expected true, false or a map with q31 and / or q34b set to true/false";
        match Value::deserialize(d)? {
            Value::Bool(b) => Ok(Self::all(b)),
            Value::Object(m) => {
                let mut out = Self::default();
                for (k, v) in m {
                    let Value::Bool(b) = v else {
                        return Err(serde::de::Error::custom(format!(
                            "faithful.{k}: expected true or false, got {v}"
                        )));
                    };
                    match k.as_str() {
                        "q31" => out.q31 = Some(b),
                        "q34b" => out.q34b = Some(b),
                        _ => {
                            return Err(serde::de::Error::custom(format!(
                                "unknown switch faithful.{k}: {expected}"
                            )));
                        }
                    }
                }
                Ok(out)
            }
            other => Err(serde::de::Error::custom(format!("{expected}, got {other}"))),
        }
    }
}

/// Params of `finetune` (see the module docs for defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneParams {
    /// `slf`, `alf` or `aff`.
    pub mode: Mode,
    /// `pre_feature` or `backbone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<FeatureKind>,
    /// `full` or `ncrop`.
    #[serde(default)]
    pub head: HeadKind,
    /// Views per image of the n-crop head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_views: Option<usize>,
    /// Geometry of the n-crop views.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views: Option<ViewKind>,
    /// Defaults of the optimisation params.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// `adam` or `sgd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerKind>,
    /// Base learning rate.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub lr: Option<f64>,
    /// SGD momentum.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub momentum: Option<f64>,
    /// L2 weight decay.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub weight_decay: Option<f64>,
    /// `constant`, `cosine` or `multistep`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleKind>,
    /// Cosine half period (epochs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_max: Option<usize>,
    /// Multistep milestones (0-based epochs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub milestones: Option<Vec<usize>>,
    /// Images per batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// Drop the last partial batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_last: Option<bool>,
    /// RandomCrop + HFlip on the training images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augment: Option<bool>,
    /// `default` or `zeros`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_init: Option<HeadInit>,
    /// l_inf radius (ALF / AFF).
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub eps: Option<f64>,
    /// Attack step (ALF / AFF).
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub alpha: Option<f64>,
    /// Attack steps (ALF / AFF).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgd_steps: Option<usize>,
    /// TRADES β (AFF).
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub beta: Option<f64>,
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
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub checkpoint_minutes: Option<f64>,
    /// Reference-code quirks of the ALF / AFF attacks.
    #[serde(default, skip_serializing_if = "FaithfulParam::is_empty")]
    pub faithful: FaithfulParam,
    /// ALF: start the attack at a uniform random point of the ball (default) or at the clean
    /// image. Keyed only when `false`, so the keys of earlier runs hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_start: Option<bool>,
    /// ALF: clean epochs before and after the `epochs` adversarial ones (\[Q13\]). Keyed only
    /// when not zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_epochs_before: Option<usize>,
    /// See `clean_epochs_before`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clean_epochs_after: Option<usize>,
    /// Which epoch's head is kept (\[Q35\]): `last` (default) or `best_test_pgd20`. Keyed
    /// only when not `last`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<Selection>,
}

/// The values a preset fills in.
struct PresetValues {
    optimizer: OptimizerKind,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    schedule: ScheduleKind,
    t_max: usize,
    milestones: Vec<usize>,
    batch_size: usize,
    epochs: usize,
    drop_last: bool,
    augment: bool,
    head_init: HeadInit,
}

impl Preset {
    fn values(self, mode: Mode) -> PresetValues {
        match self {
            Preset::CfAdam => PresetValues {
                optimizer: OptimizerKind::Adam,
                lr: 3e-4,
                momentum: 0.9,
                weight_decay: 0.0,
                schedule: ScheduleKind::Constant,
                t_max: 100,
                milestones: Vec::new(),
                batch_size: 256,
                epochs: 20,
                drop_last: true,
                augment: false,
                head_init: HeadInit::Default,
            },
            Preset::CfSgd => PresetValues {
                optimizer: OptimizerKind::Sgd,
                lr: 0.03,
                momentum: 0.9,
                weight_decay: 5e-5,
                schedule: ScheduleKind::Cosine,
                t_max: 100,
                milestones: Vec::new(),
                batch_size: 100,
                epochs: 100,
                drop_last: true,
                augment: false,
                head_init: HeadInit::Default,
            },
            Preset::Advcl if mode == Mode::Slf => PresetValues {
                optimizer: OptimizerKind::Sgd,
                lr: 0.01,
                momentum: 0.9,
                weight_decay: 2e-4,
                schedule: ScheduleKind::Multistep,
                t_max: 100,
                milestones: vec![15, 20],
                batch_size: 512,
                epochs: 25,
                drop_last: false,
                augment: true,
                head_init: HeadInit::Default,
            },
            air => {
                let (batch_size, lr, milestones, epochs) = air.row(mode);
                PresetValues {
                    optimizer: OptimizerKind::Sgd,
                    lr,
                    momentum: 0.9,
                    weight_decay: 2e-4,
                    schedule: ScheduleKind::Multistep,
                    t_max: 100,
                    milestones: milestones.to_vec(),
                    batch_size,
                    epochs,
                    drop_last: false,
                    augment: true,
                    head_init: HeadInit::Zeros,
                }
            }
        }
    }

    /// One of the per-pretraining rows (`acl`, `dynacl`, `acl_air`, …), which fine-tune ACL-family
    /// encoders only.
    pub fn is_acl_family_row(self) -> bool {
        !matches!(self, Preset::CfAdam | Preset::CfSgd | Preset::Air)
    }

    /// Batch / lr / milestones / epochs of an R-AIR preset for `mode` (METHODS.md 10.3).
    fn row(self, mode: Mode) -> (usize, f64, [usize; 2], usize) {
        use Preset::*;
        const LATE: [usize; 2] = [15, 20];
        const EARLY: [usize; 2] = [10, 20];
        const LONG: (usize, f64, [usize; 2], usize) = (128, 0.1, [40, 60], 100);
        const SHORT: (usize, f64, [usize; 2], usize) = (128, 0.1, LATE, 25);
        let linear = |lr: f64, epochs: usize| (512, lr, EARLY, epochs);
        match (self, mode) {
            (Air, Mode::Aff) | (Advcl, _) => SHORT,
            (Air, _) => linear(0.01, 25),
            (Acl | AclCifar100 | AclAir | AclAirCifar100, Mode::Aff) => LONG,
            (_, Mode::Aff) => SHORT,
            (Acl | Dynacl, _) => linear(0.01, 25),
            (AclCifar100 | DynaclCifar100, _) => linear(0.05, 25),
            (AclAir, Mode::Slf) => linear(0.005, 25),
            (DynaclAir, Mode::Slf) => linear(0.01, 5),
            (AclAir | DynaclAir, _) => linear(0.01, 25),
            (DynaclAirPp, Mode::Alf) => linear(0.01, 4),
            (DynaclAirPp, _) => linear(0.01, 25),
            (AclAirCifar100 | DynaclAirCifar100 | DynaclAirPpCifar100, _) => linear(0.1, 25),
            // not R-AIR presets ([`Preset::values`] handles them)
            (CfAdam | CfSgd, _) => linear(0.01, 25),
        }
    }
}

impl FinetuneParams {
    /// The preset that fills in what is left out (the written one, else by mode and head).
    pub fn preset(&self) -> Preset {
        self.preset.unwrap_or(match (self.mode, self.head) {
            (Mode::Slf, HeadKind::Full) => Preset::CfAdam,
            (Mode::Slf, HeadKind::Ncrop) => Preset::CfSgd,
            _ => Preset::Air,
        })
    }

    /// The params with every default written out, `preset` dropped and what does not apply
    /// dropped (the canonical form that is keyed).
    pub fn canonical(&self) -> FinetuneParams {
        let c = self.config();
        let ncrop = self.head == HeadKind::Ncrop;
        let attacked = c.mode != Mode::Slf;
        let alf = c.mode == Mode::Alf;
        let schedule = self.schedule_kind();
        FinetuneParams {
            mode: c.mode,
            features: Some(c.features),
            head: self.head,
            n_views: ncrop.then(|| self.n_views.unwrap_or(4)),
            views: ncrop.then(|| self.views.unwrap_or(ViewKind::Crop)),
            preset: None,
            optimizer: Some(c.optimizer),
            lr: Some(c.lr),
            momentum: (c.optimizer == OptimizerKind::Sgd).then_some(c.momentum),
            weight_decay: Some(c.weight_decay),
            schedule: Some(schedule),
            t_max: match &c.schedule {
                Schedule::Cosine { t_max } => Some(*t_max),
                _ => None,
            },
            milestones: match &c.schedule {
                Schedule::Multistep { milestones } => Some(milestones.clone()),
                _ => None,
            },
            batch_size: Some(c.batch_size),
            epochs: Some(c.adversarial_epochs()),
            drop_last: Some(c.drop_last),
            augment: (!ncrop).then_some(c.augment),
            head_init: Some(c.head_init),
            eps: attacked.then_some(c.eps),
            alpha: attacked.then_some(c.alpha),
            pgd_steps: attacked.then_some(c.pgd_steps),
            beta: (c.mode == Mode::Aff).then_some(c.beta),
            seed: c.seed,
            device: self.device,
            checkpoint_minutes: self.checkpoint_minutes,
            faithful: FaithfulParam {
                q31: self.has_random_start().then_some(c.faithful.q31),
                // added after the first version: keyed only when on, so AFF keys hold
                q34b: c.faithful.q34b.then_some(true),
            },
            random_start: (alf && c.eps != 0.0 && !c.random_start).then_some(false),
            clean_epochs_before: alf.then_some(c.clean_epochs[0]).filter(|&n| n > 0),
            clean_epochs_after: alf.then_some(c.clean_epochs[1]).filter(|&n| n > 0),
            select: Some(c.select).filter(|&s| s != Selection::Last),
        }
    }

    /// Whether the attack has a random start that \[Q31\] can clamp: ALF's `U(−ε, ε)` (not
    /// at `eps: 0` or without `random_start`) and AFF's `x + 0.001 · N(0, 1)`.
    fn has_random_start(&self) -> bool {
        match self.mode {
            Mode::Slf => false,
            Mode::Alf => {
                self.eps.unwrap_or(8.0 / 255.0) != 0.0 && self.random_start.unwrap_or(true)
            }
            Mode::Aff => true,
        }
    }

    fn schedule_kind(&self) -> ScheduleKind {
        self.schedule
            .unwrap_or_else(|| self.preset().values(self.mode).schedule)
    }

    /// The resolved training configuration.
    pub fn config(&self) -> FinetuneConfig {
        let d = self.preset().values(self.mode);
        let ncrop = (self.head == HeadKind::Ncrop).then(|| {
            ncrop_spec(
                self.n_views.unwrap_or(4),
                self.views.unwrap_or(ViewKind::Crop),
            )
        });
        let clean_epochs = if self.mode == Mode::Alf {
            [
                self.clean_epochs_before.unwrap_or(0),
                self.clean_epochs_after.unwrap_or(0),
            ]
        } else {
            [0, 0]
        };
        let schedule = match self.schedule_kind() {
            ScheduleKind::Constant => Schedule::Constant,
            ScheduleKind::Cosine => Schedule::Cosine {
                t_max: self.t_max.unwrap_or(d.t_max),
            },
            ScheduleKind::Multistep => {
                let mut m = self.milestones.clone().unwrap_or(d.milestones);
                m.sort_unstable();
                Schedule::Multistep { milestones: m }
            }
        };
        FinetuneConfig {
            mode: self.mode,
            features: self
                .features
                .unwrap_or(if self.preset().is_acl_family_row() {
                    // the ACL family's encoders have no pre_feature head
                    FeatureKind::Backbone
                } else {
                    FeatureKind::PreFeature
                }),
            ncrop,
            optimizer: self.optimizer.unwrap_or(d.optimizer),
            lr: self.lr.unwrap_or(d.lr),
            momentum: self.momentum.unwrap_or(d.momentum),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            schedule,
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            epochs: self
                .epochs
                .unwrap_or(d.epochs)
                .saturating_add(clean_epochs[0])
                .saturating_add(clean_epochs[1]),
            drop_last: self.drop_last.unwrap_or(d.drop_last),
            augment: ncrop.is_none() && self.augment.unwrap_or(d.augment),
            head_init: self.head_init.unwrap_or(d.head_init),
            eps: self.eps.unwrap_or(8.0 / 255.0),
            alpha: self.alpha.unwrap_or(2.0 / 255.0),
            pgd_steps: self.pgd_steps.unwrap_or(10),
            beta: self.beta.unwrap_or(6.0),
            seed: self.seed,
            faithful: Faithful {
                q31: self.faithful.q31.unwrap_or(true),
                q34b: self.mode == Mode::Aff && self.faithful.q34b.unwrap_or(false),
            },
            random_start: self.random_start.unwrap_or(true),
            clean_epochs,
            cache_features: true,
            select: self.select.unwrap_or_default(),
        }
    }
}

impl TypedStage for Finetune {
    const KIND: &'static str = "finetune";
    const VERSION: u32 = 2;
    type Params = FinetuneParams;

    fn inputs() -> Slots {
        const S: &[pipe_engine::Slot] = &[
            pipe_engine::Slot::required("encoder"),
            pipe_engine::Slot::required("dataset"),
        ];
        Slots::Fixed(S)
    }

    fn check(p: &FinetuneParams) -> Vec<ParamError> {
        let c = p.config();
        let mut e = Checks::default();
        let ncrop = p.head == HeadKind::Ncrop;
        e.require(!ncrop || c.mode == Mode::Slf, "head", || {
            format!(
                "the n-crop head is trained by `mode: slf` only, got `mode: {}`",
                mode_name(c.mode)
            )
        });
        e.require(
            c.select == Selection::Last || (c.mode != Mode::Aff && !ncrop),
            "select",
            || {
                format!(
                    "`select: best_test_pgd20` keeps the best epoch's head of SLF or ALF with the full-image head, got `mode: {}`{}",
                    mode_name(c.mode),
                    if ncrop { " with `head: ncrop`" } else { "" }
                )
            },
        );
        e.require(!(ncrop && p.augment == Some(true)), "augment", || {
            "augment applies to the full-image head; the n-crop head's views are its augmentation"
                .into()
        });
        if let Some(n) = &c.ncrop {
            e.positive("n_views", n.n_views);
            e.at_most("n_views", n.n_views, MAX_VIEWS);
        }
        e.positive("batch_size", c.batch_size);
        e.require(
            c.mode != Mode::Aff || c.batch_size >= 2,
            "batch_size",
            || {
                format!(
                    "AFF trains BN in train mode and needs at least 2 images per batch, got {}",
                    c.batch_size
                )
            },
        );
        e.positive("epochs", c.adversarial_epochs());
        e.at_most("epochs", c.epochs, MAX_EPOCHS);
        for (name, set) in [
            ("random_start", p.random_start.is_some()),
            ("clean_epochs_before", p.clean_epochs_before.is_some()),
            ("clean_epochs_after", p.clean_epochs_after.is_some()),
        ] {
            e.require(!set || c.mode == Mode::Alf, name, || {
                format!(
                    "applies to `mode: alf` only (the linear head on PGD examples), got `mode: {}`",
                    mode_name(c.mode)
                )
            });
        }
        e.positive_real("lr", c.lr);
        e.require(
            c.momentum.is_finite() && (0.0..1.0).contains(&c.momentum),
            "momentum",
            || format!("expected a value in [0, 1), got {}", c.momentum),
        );
        e.non_negative("weight_decay", c.weight_decay);
        if let Schedule::Cosine { t_max } = c.schedule {
            e.positive("t_max", t_max);
        }
        // l_inf radius and step on pixels in [0, 1]
        e.within("eps", c.eps, 0.0, 1.0);
        e.within("alpha", c.alpha, 0.0, 1.0);
        e.positive("pgd_steps", c.pgd_steps);
        e.non_negative("beta", c.beta);
        e.checkpoint_minutes(p.checkpoint_minutes);
        e.device(p.device);
        e.into_errors()
    }

    fn canonicalize(
        p: FinetuneParams,
        _ctx: &NormalizeCtx<'_>,
    ) -> Result<FinetuneParams, Vec<ParamError>> {
        Ok(p.canonical())
    }

    fn key_params(p: &FinetuneParams) -> Value {
        // Keys must not move when the code grows (README "What pipe promises"): `q31` is keyed
        // where it applies, as the first version did. A switch added later that applies to
        // existing nodes must stay out of the key at its default (`true`, the old behaviour),
        // as `pretrain::key_params` keeps its later switches out where they do not apply;
        // otherwise every cached fine-tuning would silently recompute.
        crate::params::key_with_backend(p, p.device)
    }

    fn outputs(_: &FinetuneParams) -> Vec<String> {
        [WEIGHTS_FILE, SPEC_FILE, "metrics.json"]
            .iter()
            .map(|s| (*s).to_string())
            .collect()
    }

    fn resources(p: &FinetuneParams) -> Resources {
        crate::params::device_resources(p.device)
    }

    fn explain_failure(params: &serde_json::Value, message: &str) -> Option<String> {
        crate::device::out_of_memory_hint(params, message, &["batch_size"])
    }

    fn run(p: &FinetuneParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        let ctx = &*ctx;
        let cfg = p.config();
        let enc_path = crate::params::input_file(ctx, "encoder", ENCODER_FILE, "pretrain")?;
        let data_path = crate::params::input_file(ctx, "dataset", DATA_FILE, "dataset")?;
        let dataset = data::load_dataset(&data_path)?;
        let device = p.device.open()?;
        let enc = EncoderWeights::from_file(&enc_path, &device)?;
        ctx.log(format!(
            "encoder: width {}, pre_feature {}, pgd BN branch {}; {} training images, {} classes",
            enc.width(),
            enc.hidden_dim()
                .map_or("none".to_string(), |h| h.to_string()),
            enc.has_pgd_branch(),
            dataset.train.n,
            dataset.classes.len()
        ));
        let progress = |done: u64, total: u64, msg: &str| ctx.progress(done, total, msg);
        let log = |msg: &str| ctx.log(msg);
        let cancelled = || ctx.is_cancelled();
        let hooks = TrainHooks {
            progress: &progress,
            log: &log,
            cancelled: &cancelled,
        };
        let select = cfg.select;
        let mut t = Finetuner::new(cfg, &enc, &dataset.train, dataset.classes.len(), &device)?;
        if select == Selection::BestTestPgd20 {
            t.select_on(&dataset.test)?;
            ctx.log(format!(
                "select: best_test_pgd20, PGD-20 on the {} test images after every epoch; the best epoch's head is kept (selection on the test set, as R-ADV)",
                dataset.test.n
            ));
        }
        // all or nothing: a state that does not load leaves the trainer fresh
        if let Some(line) =
            crate::nn::checkpoint::resume_in(&mut t, ctx.scratch_dir(), p.checkpoint_minutes)
        {
            ctx.log(line);
        }
        t.journal_features(crate::journal::Journal::at(ctx.scratch_dir()));
        while !t.finished() {
            t.train_epoch(&hooks)?;
        }
        let (varmap, clf) = t.finish()?;
        clf.save(&varmap, ctx.out_dir())?;
        let metrics = t.metrics(p.device.backend());
        crate::params::write_json(&ctx.out_path("metrics.json"), &metrics)?;
        ctx.log(format!(
            "done: train loss {} train acc {} in {:.1} s",
            metrics["train_loss"], metrics["train_acc"], metrics["seconds"]
        ));
        if let Some(e) = metrics.get("selected_epoch") {
            ctx.log(format!(
                "kept the head of epoch {e}: test clean acc {}, PGD-20 acc {}",
                metrics["selected_test_clean_acc"], metrics["selected_test_pgd20_acc"]
            ));
        }
        Ok(())
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Slf => "slf",
        Mode::Alf => "alf",
        Mode::Aff => "aff",
    }
}

#[cfg(test)]
mod tests;
