//! `pretrain`: SimCLR and EMP-SSL, each standard, PGD-adversarial or free-adversarial (the six
//! training scripts of CF-AMC-SSL; METHODS.md sections 3 and 4), and the ACL family: ACL,
//! DynACL, ACL-AIR and DynACL-AIR (R-AIR `pretraining.py`; METHODS.md sections 5 and 6), and
//! ACL-RCS / DynACL-RCS (R-RCS; METHODS.md 7, [`rcs`]), and AdvCL (R-ADV; METHODS.md 8).
//!
//! # Params
//!
//! | param | default | meaning |
//! |---|---|---|
//! | `method` | (required) | `simclr`, `emp_ssl`, `acl`, `air` or `rcs` (the ACL family: see below), `advcl` (see below) |
//! | `attack` | `none`; `pgd` for `acl` / `air` / `rcs` / `advcl` | `none`, `pgd` (T-step l_inf PGD per batch) or `free` (m replays with a persistent δ) |
//! | `views` | `patch` for standard EMP-SSL, else `crop` | `crop`: scale [0.08, 1], ratio [3/4, 4/3]; `patch`: scale 0.25, ratio 1 |
//! | `scale`, `ratio` | from `views` | explicit `[lo, hi]` overrides of the crop |
//! | `n_views` | 2 SimCLR; 64 standard EMP-SSL, 16 adversarial EMP-SSL | views per image (SimCLR must be 2) |
//! | `epochs` | SimCLR 500 (free 167), EMP-SSL 30 (free 10) | epochs, as the YAML says (free modes divide nothing) |
//! | `batch_size` | SimCLR 512, EMP-SSL 128 (free 100) | source images per batch (`drop_last`) |
//! | `m` | 3 | free replays per batch (paper; the scripts default to 5, \[Q1\]) |
//! | `eps`, `alpha` | 8/255, 0.01 | l_inf radius and step (fractions allowed) |
//! | `pgd_steps` | 5 | PGD steps (`attack: pgd`), zero init |
//! | `lr` | 0.3 | base rate of the cosine schedule (one step per optimiser update) |
//! | `momentum`, `nesterov`, `weight_decay` | 0.9, true, 1e-4 | the SGD inside the LARS wrapper |
//! | `lars` | true | solo-learn's LARS wrapper (`false`: plain SGD with these settings) |
//! | `lars_eta`, `lars_clip`, `lars_eps`, `lars_exclude_bias_n_norm` | 0.005, true, 1e-8, true | its settings |
//! | `width` | 64 | ResNet-18 width (64 = the paper's) |
//! | `hidden_dim`, `z_dim` | 4096; 1024 EMP-SSL, 128 SimCLR | `pre_feature` width and projection output |
//! | `temperature`, `base_temperature` | 0.07, 0.07 | SimCLR's NT-Xent |
//! | `patch_sim`, `tcr`, `tcr_eps` | 200, 1, 0.2 | EMP-SSL's loss weights and TCR ε (\[Q21\]) |
//! | `seed` | 0 | every random number of the run |
//! | `device` | `auto` | `auto`, `cpu` or `cuda:N` (the backend is keyed, the ordinal is not) |
//! | `checkpoint_minutes` | 10 | minutes between training-state writes within an epoch (0: every batch; not keyed, see Resume) |
//! | `input_norm` | `none` | `half`: `(x − 0.5) / 0.5` inside the model (R-EMP's transform; R-CF removed it), buffers `encoder.normalize.*` in the checkpoint; SimCLR / EMP-SSL only, keyed only when set |
//! | `faithful` | `true` | the reference-code quirks, `true` / `false` for all or a map (`q6`, `q7`, `q8`, `q10`, `q28`, `q31`, `q38`, `q41`, `q43`, `q47`, `q48`, `q50`) |
//!
//! # The ACL family (`method: acl | air`)
//!
//! R-AIR's model and loop: a ResNet-18 (`width`) that normalises its input by ImageNet's mean
//! and std (buffers `encoder.normalize.mean` / `.std`), with two BN branches `normal` and `pgd`
//! (`attack: pgd`, R-AIR's `--ACL_DS`) and the 3-layer head under `projection.` (`fc1` → BN →
//! ReLU → `fc2` → BN → ReLU → `fc3` → BN, `8 · width` wide, per-branch BNs). Each batch: two
//! views from the strength-`s` pipeline (RandomResizedCrop scale `[1 − 0.9 s, 1]` bicubic, flip,
//! jitter `(0.4 s, 0.4 s, 0.4 s, 0.1 s)` with p `0.8 s`, grayscale p `0.2 s`); PGD (`pgd_steps`,
//! `eps`, `alpha`, uniform start) on both views jointly, maximising NT-Xent (τ = `temperature`)
//! through the `pgd` branch in eval mode; then `(1 − ω) ℓ_CL(natural, normal) + (1 + ω)
//! ℓ_CL(adversarial, pgd)`, and for `air` `+ λ₁ SIR + λ₂ AIR` with the un-augmented image through
//! `normal`. LARS (R-AIR's: trust on every tensor) with `lr`, `momentum`, `weight_decay`,
//! `lars_eta`; `warmup_epochs` of linear warm-up, then cosine to 1e-6, stepped before each
//! update (\[Q32\]); the last partial batch is kept. `attack: none` is plain contrastive
//! learning on one branch (R-AIR without `--ACL_DS`, \[Q30\]).
//!
//! | param | default | meaning |
//! |---|---|---|
//! | `dyn_aug` | `false` | DynACL: strength `s = 1 − ⌊e/K⌋·K/E` (0-based epoch `e`, `E` epochs) and `ω = (2/3)(1 − s)`; off: `s = 1`, `ω = 0` (ACL) |
//! | `dyn_k` | 50 | DynACL's `K` (R-AIR fixes 50 for 1000 epochs; shorter runs need a smaller one to see the schedule) |
//! | `lambda1`, `lambda2` | 0.5, 0.5 | `air`: weights of SIR and AIR |
//! | `warmup_epochs` | 10 | learning-rate warm-up |
//! | defaults that differ | | `epochs` 1000, `batch_size` 512, `lr` 5.0, `weight_decay` 1e-6, `lars_eta` 1e-3, `alpha` `eps`/4, `temperature` 0.5 (no base-temperature scale), `n_views` 2 |
//!
//! `rcs` is ACL (or DynACL with `dyn_aug`) trained on coresets (R-RCS `DynACL_RCS.py`): the
//! whole set for 1-based epochs `e ≤ rcs_warmup` that select nothing (epochs 1 … 100 with the
//! defaults), then at 1-based epochs `e ≥ rcs_warmup`
//! with `(e − 1) mod rcs_every = 0` a new coreset of `rcs_fraction` of the training split is
//! selected ([`rcs`]: the greedy, head-gradient-based selection of R-RCS) and trained on until
//! the next; an epoch after `rcs_warmup` that comes before the first selection (`rcs_warmup`
//! mod `rcs_every` neither 0 nor 1) trains on a random coreset of that size, R-RCS's initial
//! one. The loss is `½ [(1 − ω) ℓ_CL + (1 + ω) ℓ̃_CL]` (\[Q43\]); the learning-rate
//! schedule is rebuilt every epoch on the epoch's batch count `L` and fast-forwarded by
//! `epoch · L` steps, so it follows the cosine in epoch fractions. The coreset is part of the
//! resumable state.
//!
//! | param | default | meaning |
//! |---|---|---|
//! | `rcs_fraction` | 0.2 | coreset size, of the 99 % training split |
//! | `rcs_warmup`, `rcs_every` | 100, 20 | R-RCS's `warmup` and `fre` |
//! | `rcs_pgd_steps`, `rcs_lr` | 3, 0.01 | the RD attack's steps (step `(10/255)/T`), the simulated head step (`Coreset_lr`) |
//! | `rcs_val_fraction` | 0.01 | the validation split |
//!
//! `views`, `scale`, `ratio`, `z_dim`, `hidden_dim`, `m`, `base_temperature`, `nesterov` and
//! the solo-learn LARS switches do not apply and are dropped from the key. Fine-tune the encoder
//! with `features: backbone` (it has no `pre_feature` head); `finetune` reads the `pgd` branch
//! and keeps the input normalisation. One deliberate difference: R-AIR also runs the
//! un-augmented image through `normal` under plain ACL (λ = 0), which only moves that
//! branch's running statistics; we skip that forward unless the method is `air`.
//!
//! # AdvCL (`method: advcl`)
//!
//! R-ADV's model and loop. Inputs: `dataset` and `labels`, a
//! [`pseudo_labels`](crate::kinds::pseudo_labels) node (its `ks` give the heads). The model: a
//! ResNet-18 (`width`, no input normalisation) with BN branches `normal`, `pgd`, `pgd_ce`;
//! `head_proj` under `projection.` (`0` Linear → `1` BN, one for all branches → ReLU → `3`
//! Linear to 128, l2-normalised); one Linear(8w → K) per label set under `pseudo.fc_{K:03}`.
//! Each batch: two SimCLR views `x1`, `x2` (RandomResizedCrop scale `scale` = [0.2, 1], flip,
//! jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2), the weak view `x_o` (RandomCrop 32 pad
//! 4 + flip) and its high-frequency component `x_HF` ([`crate::nn::spectral`], radius
//! `hf_radius`, unclamped). Two attacks from `x_o`, run as one PGD (`pgd_steps` sign steps of
//! `alpha` in the `eps` ball, uniform start unclamped, \[Q48\]) on
//! `SupCon([z(x_cl; pgd), z(x1), z(x2), z(x_HF)]) + ce_weight · (1/|K|) Σ_K CE_sum(W_K f(x_ce;
//! pgd_ce), ŷ_K)` with the model in train mode (\[Q46\], \[Q47\]); the training loss is
//! the same with the batch-mean CE (the curve's `contrast` and `pseudo_ce`). SupCon keeps
//! `base_temperature` 0.07 beside `temperature` 0.5 (the ×7.14 scale of \[Q45\]). Plain
//! SGD (`lr`, `momentum`, `weight_decay` on every tensor), AdvCL's schedule (per-iteration
//! warm-up from 0.01 over `warmup_epochs`, only at `batch_size` > 256 as in R-ADV, then the
//! per-epoch cosine to `lr · 10⁻³`), the last partial batch kept. R-ADV runs on several GPUs with synchronised BN (\[Q49\]); one device
//! with plain BN over the whole batch computes the same batch statistics.
//!
//! | param | default | meaning |
//! |---|---|---|
//! | `ce_weight` | 0.2 | weight of the pseudo-label cross-entropy |
//! | `hf_radius` | 8 | radius of the low-frequency disk removed from `x_o` |
//! | defaults that differ | | `epochs` 1000, `batch_size` 512, `lr` 0.5, `nesterov`/LARS do not apply, `alpha` 2/255, `temperature` 0.5, `base_temperature` 0.07, `scale` [0.2, 1], `warmup_epochs` 10 |
//!
//! R-ADV's unused `head_pred` / `head_ce` are not built (\[Q52\]), and its attack's extra
//! `head_proj` forward of `x_ce` (whose output no loss reads) is skipped: it moved only the
//! head BN's running statistics, which nothing downstream uses. Fine-tune with `preset:
//! advcl` (R-ADV's SLF); `finetune` reads the `pgd` branch.
//!
//! The `faithful` switches (METHODS.md section 17):
//! - `q6` (free only): the cosine's `T_max` is `⌊n/B⌋·epochs` although the scheduler steps `m`
//!   times per batch, so the rate goes 0.3 → 0 → 0.3 → 0 for m = 3; clean: `T_max` = all steps.
//! - `q7` (pgd only): the 5 attack back-props add their parameter gradients to the training
//!   gradient; clean: the update uses the training loss only (and the attack runs on a frozen
//!   copy of the weights, which also saves the parameter-gradient kernels).
//! - `q8` (pgd only): the attack forwards run in train mode and update the BN running
//!   statistics; clean: they still use batch statistics but leave the running statistics and
//!   counters as they were.
//! - `q10` (free only): δ is re-projected into the box of the previous batch only, so the first
//!   replay of a batch may see pixels in `[−ε, 1 + ε]`; clean: re-projected when a batch arrives.
//!
//! - `q28` (`air`): SIR and AIR as R-AIR computes them, `Σ p_j (log p_j − p_i)` (not KL
//!   divergences); clean: `KL(p_i ‖ p_j)` and the KL of the renormalised AIR products.
//! - `q31` (ACL family with `pgd`): the PGD start `x + U(−ε, ε)` goes into the first forward
//!   unclamped; clean: clamped to `[0, 1]` first.
//! - `q38` (`rcs`): the greedy loop's simulated head step is `2 · rcs_lr · G` (R-RCS subtracts
//!   it from `linear_layer` and again from `model.fc`, one module under two names; METHODS.md
//!   writes `η'`); clean: `rcs_lr · G`.
//! - `q41` (`rcs`): candidates are the whole training set (R-RCS swaps the full set, validation
//!   images included, into the coreset object), training before the first selection too, and
//!   only the first half of the validation images are used, each twice; clean: the 99 % split
//!   and every validation image once.
//! - `q43` (`rcs`): the ACL loss is halved; clean: not (as R-AIR).
//! - `q47` (`advcl`): every attack step's five train-mode forwards update the running
//!   statistics (the `pgd`, `pgd_ce` branches 5 + 1 times per batch at PGD-5). The three clean
//!   views give the same batch statistics at every step, so their backbone forwards run once
//!   and each later step applies their update in closed form (`r ↦ a r + s₃ − a s₀`, equal up
//!   to float rounding; the head, whose BN also sees `x_cl`, runs every step). Clean: the
//!   attack still uses batch statistics but restores the running statistics afterwards.
//! - \[Q46\] (R-ADV's attack sums its cross-entropy, training averages it) has no switch: it
//!   cannot change the attack. `x_ce`'s gradient comes from the cross-entropy alone and
//!   `x_cl`'s from the contrastive term alone, and sign steps are blind to a positive scale.
//! - `q48` (`advcl`): the attack's uniform start is not clamped to the box before the first
//!   forward, and the high-frequency view is left unclamped (it can be negative); clean: both
//!   clamped to `[0, 1]`. Keyed only when off.
//! - `q50` (`advcl`): R-ADV's loop runs `range(0, epoch + 2)`, so the run trains `epochs + 2`
//!   epochs and the cosine overshoots π at the end; clean: `epochs`.
//!
//! Params that do not apply are dropped before keying (`m` without `attack: free`, `eps` without
//! an attack, `temperature` for EMP-SSL, the switches of other attacks), so sweeping them
//! recomputes nothing. Method-dependent defaults are written out, so writing a default or leaving
//! it out gives the same key.
//!
//! # Outputs
//!
//! - `encoder.safetensors`: backbone under `encoder.` (torchvision names), heads under
//!   `pre_feature.` and `projection.` ([`crate::nn::heads`]), BN running statistics included.
//! - `curve.jsonl`: one line per epoch: `epoch`, `loss` (mean over batches), the loss terms
//!   (`invariance`, `tcr` for EMP-SSL; `nat_cl`, `adv_cl`, `sir`, `air` for the ACL family;
//!   `contrast`, `pseudo_ce` for AdvCL), `lr` (at the end of the epoch), `seconds`,
//!   `images_per_second` (source images).
//! - `metrics.json`: `final_loss` (+ terms), `train_seconds`, `train_minutes`,
//!   `images_per_second`, `device`, `epochs`, `steps`, `n_train`, `threads`.
//!
//! # Resume
//!
//! After every epoch, every `checkpoint_minutes` (default 10; 0: after every batch) within an
//! epoch, and when the run is cancelled (Ctrl-C), the full training state (weights, BN
//! statistics, optimiser buffers, the free-adversarial δ, step counters, the curve, the
//! unfinished epoch's batch count and partial sums, RCS's coreset) is written atomically to the
//! node's scratch folder; a killed run restarted with the same key continues from the batch
//! after the last write (a resumed RCS epoch keeps the coreset it selected).
//! `checkpoint_minutes` is not keyed.
//! Shuffling and augmentation draw from streams derived from `(seed, epoch)` and `(seed, step)`,
//! so the resumed run is bit-identical on the CPU to an uninterrupted one (same thread count).

pub mod rcs;
mod trainer;

pub use trainer::{
    AdvclBatch, AttackMode, BatchStats, BenchRow, EpochStats, Faithful, InputNormKind, Method,
    PretrainConfig, Pretrainer, TrainHooks, ViewKind, bench_mode,
};

use std::path::Path;

use pipe_engine::{BoxError, NormalizeCtx, ParamError, Resources, Slots, StageCtx, TypedStage};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

use crate::data::{self, tensor_io::DATA_FILE};
use crate::device::DeviceSpec;
use crate::kinds::pseudo_labels::{LABELS_FILE, PseudoLabels};
use crate::nn::checkpoint;
use crate::params::{
    Checks, MAX_DIM, MAX_EPOCHS, MAX_VIEWS, de_real, de_real_opt, de_real_pair_opt,
};

/// The `pretrain` kind.
pub struct Pretrain;

/// The encoder checkpoint.
pub const ENCODER_FILE: &str = "encoder.safetensors";
/// The per-epoch training curve.
pub const CURVE_FILE: &str = "curve.jsonl";
/// The resumable state in the scratch folder.
pub use crate::nn::checkpoint::STATE_FILE;

fn yes() -> bool {
    true
}

/// The `faithful` param as written: a bool for all switches or a map of some of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FaithfulParam {
    /// \[Q6\] free-adversarial cosine period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q6: Option<bool>,
    /// \[Q7\] attack gradients leak into the update.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q7: Option<bool>,
    /// \[Q8\] attack forwards update BN running statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q8: Option<bool>,
    /// \[Q10\] δ re-projected against the previous batch only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q10: Option<bool>,
    /// \[Q28\] AIR's regularisers as R-AIR computes them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q28: Option<bool>,
    /// \[Q31\] the ACL family's PGD start is not clamped to the box.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q31: Option<bool>,
    /// \[Q38\] RCS's simulated head step applied twice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q38: Option<bool>,
    /// \[Q41\] RCS's validation bookkeeping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q41: Option<bool>,
    /// \[Q43\] RCS halves the ACL loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q43: Option<bool>,
    /// \[Q47\] AdvCL's attack forwards update the BN running statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q47: Option<bool>,
    /// \[Q48\] AdvCL's random start and high-frequency view are not clamped to the box.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q48: Option<bool>,
    /// \[Q50\] AdvCL runs two epochs more than its cosine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q50: Option<bool>,
}

impl FaithfulParam {
    fn all(v: bool) -> Self {
        Self {
            q6: Some(v),
            q7: Some(v),
            q8: Some(v),
            q10: Some(v),
            q28: Some(v),
            q31: Some(v),
            q38: Some(v),
            q41: Some(v),
            q43: Some(v),
            q47: Some(v),
            q48: Some(v),
            q50: Some(v),
        }
    }
}

impl Default for FaithfulParam {
    fn default() -> Self {
        Self::all(true)
    }
}

impl<'de> Deserialize<'de> for FaithfulParam {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let expected = "expected true, false or a map with some of q6, q7, q8, q10, q28, q31, q38, q41, q43, q47, q48, q50 set to true/false";
        match Value::deserialize(d)? {
            Value::Bool(b) => Ok(Self::all(b)),
            Value::Object(m) => {
                // absent switches stay unset (they default to `true` in `config`), so the
                // canonical form reads back as itself
                let mut out = Self {
                    q6: None,
                    q7: None,
                    q8: None,
                    q10: None,
                    q28: None,
                    q31: None,
                    q38: None,
                    q41: None,
                    q43: None,
                    q47: None,
                    q48: None,
                    q50: None,
                };
                for (k, v) in m {
                    let Value::Bool(b) = v else {
                        return Err(serde::de::Error::custom(format!(
                            "faithful.{k}: expected true or false, got {v}"
                        )));
                    };
                    let slot = match k.as_str() {
                        "q6" => &mut out.q6,
                        "q7" => &mut out.q7,
                        "q8" => &mut out.q8,
                        "q10" => &mut out.q10,
                        "q28" => &mut out.q28,
                        "q31" => &mut out.q31,
                        "q38" => &mut out.q38,
                        "q41" => &mut out.q41,
                        "q43" => &mut out.q43,
                        "q47" => &mut out.q47,
                        "q48" => &mut out.q48,
                        "q50" => &mut out.q50,
                        _ => {
                            return Err(serde::de::Error::custom(format!(
                                "unknown switch faithful.{k}: {expected}"
                            )));
                        }
                    };
                    *slot = Some(b);
                }
                Ok(out)
            }
            other => Err(serde::de::Error::custom(format!("{expected}, got {other}"))),
        }
    }
}

/// Params of `pretrain` (see the module docs for defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainParams {
    /// `simclr`, `emp_ssl`, `acl` or `air`.
    pub method: Method,
    /// `none`, `pgd` or `free` (default `none`; `pgd` for the ACL family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attack: Option<AttackMode>,
    /// `crop` or `patch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views: Option<ViewKind>,
    /// Crop scale override `[lo, hi]`.
    #[serde(
        default,
        deserialize_with = "de_real_pair_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub scale: Option<[f64; 2]>,
    /// Crop aspect-ratio override `[lo, hi]`.
    #[serde(
        default,
        deserialize_with = "de_real_pair_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub ratio: Option<[f64; 2]>,
    /// Views per image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_views: Option<usize>,
    /// Epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// Source images per batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Free replays per batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub m: Option<usize>,
    /// l_inf radius.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub eps: Option<f64>,
    /// Attack step.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub alpha: Option<f64>,
    /// PGD steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgd_steps: Option<usize>,
    /// Base learning rate.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub lr: Option<f64>,
    /// SGD momentum.
    #[serde(default = "default_momentum", deserialize_with = "de_real")]
    pub momentum: f64,
    /// Nesterov momentum.
    #[serde(default = "yes")]
    pub nesterov: bool,
    /// Weight decay.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub weight_decay: Option<f64>,
    /// solo-learn's LARS wrapper around the SGD.
    #[serde(default = "yes")]
    pub lars: bool,
    /// LARS trust coefficient.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub lars_eta: Option<f64>,
    /// LARS `clip`.
    #[serde(default = "yes")]
    pub lars_clip: bool,
    /// LARS ε.
    #[serde(default = "default_lars_eps", deserialize_with = "de_real")]
    pub lars_eps: f64,
    /// LARS skips 1-d tensors.
    #[serde(default = "yes")]
    pub lars_exclude_bias_n_norm: bool,
    /// ResNet-18 width.
    #[serde(default = "default_width")]
    pub width: usize,
    /// `pre_feature` width.
    #[serde(default = "default_hidden")]
    pub hidden_dim: usize,
    /// Projection output dimension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub z_dim: Option<usize>,
    /// NT-Xent temperature (SimCLR).
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub temperature: Option<f64>,
    /// NT-Xent base temperature (SimCLR).
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_temperature: Option<f64>,
    /// Invariance weight (EMP-SSL).
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub patch_sim: Option<f64>,
    /// TCR weight (EMP-SSL).
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub tcr: Option<f64>,
    /// TCR ε (EMP-SSL).
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub tcr_eps: Option<f64>,
    /// ACL family: DynACL's strength schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dyn_aug: Option<bool>,
    /// DynACL: epochs per strength step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dyn_k: Option<usize>,
    /// AIR: weight of SIR.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub lambda1: Option<f64>,
    /// AIR: weight of AIR.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub lambda2: Option<f64>,
    /// ACL family: warm-up epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_epochs: Option<usize>,
    /// RCS: coreset fraction.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub rcs_fraction: Option<f64>,
    /// RCS: epochs on the whole set first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcs_warmup: Option<usize>,
    /// RCS: epochs between selections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcs_every: Option<usize>,
    /// RCS: RD attack steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rcs_pgd_steps: Option<usize>,
    /// RCS: simulated head step rate.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub rcs_lr: Option<f64>,
    /// RCS: validation fraction.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub rcs_val_fraction: Option<f64>,
    /// AdvCL: weight of the pseudo-label cross-entropy.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub ce_weight: Option<f64>,
    /// AdvCL: radius of the high-frequency view's removed disk.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub hf_radius: Option<f64>,
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
    /// Reference-code quirks.
    #[serde(default)]
    pub faithful: FaithfulParam,
    /// SimCLR / EMP-SSL: `half` normalises the input by mean and std 0.5 inside the model, as
    /// the original EMP-SSL (R-EMP) does; keyed only when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_norm: Option<InputNormKind>,
}

fn default_momentum() -> f64 {
    0.9
}
fn default_lars_eps() -> f64 {
    1e-8
}
fn default_width() -> usize {
    64
}
fn default_hidden() -> usize {
    4096
}

impl PretrainParams {
    /// The params with every method-dependent default written out and what does not apply
    /// dropped (the canonical form that is keyed).
    pub fn canonical(&self) -> PretrainParams {
        let c = self.config();
        let acl = c.method.is_acl_family();
        let rcs = c.method == Method::Rcs;
        let emp = c.method == Method::EmpSsl;
        let free = c.attack == AttackMode::Free;
        let pgd = c.attack == AttackMode::Pgd;
        let attacked = c.attack != AttackMode::None;
        let advcl = c.method == Method::Advcl;
        // the ACL family and AdvCL have their own optimiser, head and views: the CF-AMC-SSL
        // settings of those do not apply and keep their defaults (so writing them changes
        // nothing)
        let cf = |v: bool, default: bool| if acl || advcl { default } else { v };
        PretrainParams {
            method: c.method,
            attack: Some(c.attack),
            views: (!acl && !advcl).then_some(c.views),
            scale: (!acl).then_some(c.scale),
            ratio: (!acl).then_some(c.ratio),
            n_views: Some(c.n_views),
            epochs: Some(c.epochs),
            batch_size: Some(c.batch_size),
            m: free.then_some(c.m),
            eps: attacked.then_some(c.eps),
            alpha: attacked.then_some(c.alpha),
            pgd_steps: pgd.then_some(c.pgd_steps),
            lr: Some(c.lr),
            momentum: c.momentum,
            nesterov: cf(c.nesterov, true),
            weight_decay: Some(c.weight_decay),
            lars: cf(c.lars, true),
            lars_eta: (!advcl).then_some(c.lars_eta),
            lars_clip: cf(c.lars_clip, true),
            lars_eps: if acl || advcl {
                default_lars_eps()
            } else {
                c.lars_eps
            },
            lars_exclude_bias_n_norm: cf(c.lars_exclude_bias_n_norm, true),
            width: c.width,
            hidden_dim: if acl || advcl {
                default_hidden()
            } else {
                c.hidden_dim
            },
            z_dim: (!acl && !advcl).then_some(c.z_dim),
            temperature: (!emp).then_some(c.temperature),
            base_temperature: (!emp && !acl).then_some(c.base_temperature),
            patch_sim: emp.then_some(c.emp.patch_sim),
            tcr: emp.then_some(c.emp.tcr),
            tcr_eps: emp.then_some(c.emp.eps),
            dyn_aug: acl.then_some(c.dyn_aug),
            dyn_k: c.dyn_aug.then_some(c.dyn_k),
            lambda1: (c.method == Method::Air).then_some(c.lambda1),
            lambda2: (c.method == Method::Air).then_some(c.lambda2),
            warmup_epochs: (acl || advcl).then_some(c.warmup_epochs),
            rcs_fraction: rcs.then_some(c.rcs_fraction),
            rcs_warmup: rcs.then_some(c.rcs_warmup),
            rcs_every: rcs.then_some(c.rcs_every),
            rcs_pgd_steps: rcs.then_some(c.rcs_pgd_steps),
            rcs_lr: rcs.then_some(c.rcs_lr),
            rcs_val_fraction: rcs.then_some(c.rcs_val_fraction),
            ce_weight: advcl.then_some(c.ce_weight),
            hf_radius: advcl.then_some(c.hf_radius),
            seed: c.seed,
            device: self.device,
            checkpoint_minutes: self.checkpoint_minutes,
            input_norm: (c.input_norm != InputNormKind::None).then_some(c.input_norm),
            faithful: FaithfulParam {
                q6: (free && !acl).then_some(c.faithful.q6),
                q7: (pgd && !acl).then_some(c.faithful.q7),
                q8: (pgd && !acl).then_some(c.faithful.q8),
                q10: (free && !acl).then_some(c.faithful.q10),
                q28: (c.method == Method::Air && pgd).then_some(c.faithful.q28),
                q31: (acl && pgd).then_some(c.faithful.q31),
                q38: rcs.then_some(c.faithful.q38),
                q41: rcs.then_some(c.faithful.q41),
                q43: rcs.then_some(c.faithful.q43),
                q47: advcl.then_some(c.faithful.q47),
                q48: advcl.then_some(c.faithful.q48),
                q50: advcl.then_some(c.faithful.q50),
            },
        }
    }

    /// The resolved training configuration (defaults by method and attack, METHODS.md 15).
    pub fn config(&self) -> PretrainConfig {
        let method = self.method;
        let acl = method.is_acl_family();
        let emp = method == Method::EmpSsl;
        let advcl = method == Method::Advcl;
        let attack = self.attack.unwrap_or(if acl || advcl {
            AttackMode::Pgd
        } else {
            AttackMode::None
        });
        let free = attack == AttackMode::Free;
        let views = self.views.unwrap_or(if emp && attack == AttackMode::None {
            ViewKind::Patch
        } else {
            ViewKind::Crop
        });
        let (scale, ratio) = if acl {
            // strength 1; DynACL narrows the scale per epoch ([`PretrainConfig::strength`])
            ([0.1, 1.0], [3.0 / 4.0, 4.0 / 3.0])
        } else if advcl {
            // R-ADV's RandomResizedCrop(32, scale=(0.2, 1.))
            ([0.2, 1.0], [3.0 / 4.0, 4.0 / 3.0])
        } else {
            views.scale_ratio()
        };
        let n_views = self.n_views.unwrap_or(match (emp, attack) {
            (false, _) => 2,
            (true, AttackMode::None) => 64,
            (true, _) => 16,
        });
        let epochs = self.epochs.unwrap_or(match (method, free) {
            (Method::Acl | Method::Air | Method::Rcs | Method::Advcl, _) => 1000,
            (Method::EmpSsl, true) => 10,
            (Method::EmpSsl, false) => 30,
            (Method::Simclr, true) => 167,
            (Method::Simclr, false) => 500,
        });
        let batch_size = self.batch_size.unwrap_or(match (emp, free) {
            (true, true) => 100,
            (true, false) => 128,
            (false, _) => 512,
        });
        let eps = self.eps.unwrap_or(8.0 / 255.0);
        let f = self.faithful;
        let (acl_or, air) = (
            |a: f64, cf: f64| if acl { a } else { cf },
            method == Method::Air,
        );
        PretrainConfig {
            method,
            attack,
            views,
            scale: if acl {
                scale
            } else {
                self.scale.unwrap_or(scale)
            },
            ratio: if acl {
                ratio
            } else {
                self.ratio.unwrap_or(ratio)
            },
            n_views,
            epochs,
            batch_size,
            m: self.m.unwrap_or(3),
            eps,
            alpha: self.alpha.unwrap_or(if advcl {
                2.0 / 255.0
            } else {
                acl_or(eps / 4.0, 0.01)
            }),
            pgd_steps: self.pgd_steps.unwrap_or(5),
            lr: self
                .lr
                .unwrap_or(if advcl { 0.5 } else { acl_or(5.0, 0.3) }),
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay.unwrap_or(acl_or(1e-6, 1e-4)),
            lars: self.lars,
            lars_eta: self.lars_eta.unwrap_or(acl_or(1e-3, 0.005)),
            lars_clip: self.lars_clip,
            lars_eps: self.lars_eps,
            lars_exclude_bias_n_norm: self.lars_exclude_bias_n_norm,
            width: self.width,
            hidden_dim: self.hidden_dim,
            z_dim: if acl {
                8 * self.width
            } else if advcl {
                crate::nn::heads::ADVCL_Z_DIM
            } else {
                self.z_dim.unwrap_or(if emp { 1024 } else { 128 })
            },
            temperature: self
                .temperature
                .unwrap_or(if advcl { 0.5 } else { acl_or(0.5, 0.07) }),
            base_temperature: if acl {
                // R-AIR's NT-Xent has no base-temperature scale
                self.temperature.unwrap_or(0.5)
            } else {
                self.base_temperature.unwrap_or(0.07)
            },
            emp: crate::nn::losses::EmpLossConfig {
                patch_sim: self.patch_sim.unwrap_or(200.0),
                tcr: self.tcr.unwrap_or(1.0),
                eps: self.tcr_eps.unwrap_or(0.2),
            },
            dyn_aug: acl && self.dyn_aug.unwrap_or(false),
            dyn_k: self.dyn_k.unwrap_or(trainer::DYNACL_K),
            lambda1: if air {
                self.lambda1.unwrap_or(0.5)
            } else {
                0.0
            },
            lambda2: if air {
                self.lambda2.unwrap_or(0.5)
            } else {
                0.0
            },
            warmup_epochs: self.warmup_epochs.unwrap_or(10),
            rcs_fraction: self.rcs_fraction.unwrap_or(0.2),
            rcs_warmup: self.rcs_warmup.unwrap_or(100),
            rcs_every: self.rcs_every.unwrap_or(20),
            rcs_pgd_steps: self.rcs_pgd_steps.unwrap_or(3),
            rcs_lr: self.rcs_lr.unwrap_or(0.01),
            rcs_val_fraction: self.rcs_val_fraction.unwrap_or(0.01),
            ce_weight: self.ce_weight.unwrap_or(0.2),
            hf_radius: self.hf_radius.unwrap_or(crate::nn::spectral::ADVCL_RADIUS),
            seed: self.seed,
            input_norm: self.input_norm.unwrap_or_default(),
            faithful: Faithful {
                q6: f.q6.unwrap_or(true),
                q7: f.q7.unwrap_or(true),
                q8: f.q8.unwrap_or(true),
                q10: f.q10.unwrap_or(true),
                q28: f.q28.unwrap_or(true),
                q31: f.q31.unwrap_or(true),
                q38: f.q38.unwrap_or(true),
                q41: f.q41.unwrap_or(true),
                q43: f.q43.unwrap_or(true),
                q47: f.q47.unwrap_or(true),
                q48: f.q48.unwrap_or(true),
                q50: f.q50.unwrap_or(true),
            },
        }
    }
}

/// What is wrong with connecting (`given`) or not a `labels` input for `method`, as a
/// [`TypedStage::check_inputs`] error.
fn labels_misuse(method: Method, given: bool) -> Option<ParamError> {
    match (method == Method::Advcl, given) {
        (true, false) => Some(ParamError::new(
            "inputs",
            "method advcl trains on cluster pseudo-labels: give the stage a `labels` input (a \
             `pseudo_labels` node)",
        )),
        (false, true) => Some(ParamError::new(
            "inputs.labels",
            format!(
                "the `labels` input is read by method advcl only, not {}; remove it",
                serde_json::to_value(method)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("{method:?}"))
            ),
        )),
        _ => None,
    }
}

impl TypedStage for Pretrain {
    const KIND: &'static str = "pretrain";
    const VERSION: u32 = 1;
    type Params = PretrainParams;

    fn inputs() -> Slots {
        const S: &[pipe_engine::Slot] = &[
            pipe_engine::Slot::required("dataset"),
            // AdvCL's pseudo-labels (a `pseudo_labels` node)
            pipe_engine::Slot::optional("labels"),
        ];
        Slots::Fixed(S)
    }

    fn check_inputs(p: &PretrainParams, connected: &[&str]) -> Vec<ParamError> {
        labels_misuse(p.config().method, connected.contains(&"labels"))
            .into_iter()
            .collect()
    }

    fn check(p: &PretrainParams) -> Vec<ParamError> {
        let c = p.config();
        let mut e = Checks::default();
        let emp = c.method == Method::EmpSsl;
        e.require(
            p.input_norm.is_none() || matches!(c.method, Method::Simclr | Method::EmpSsl),
            "input_norm",
            || {
                "applies to simclr and emp_ssl only (the ACL family normalises by ImageNet's \
                 statistics inside its model, AdvCL reads raw pixels)"
                    .into()
            },
        );
        if !emp {
            e.require(c.n_views == 2, "n_views", || {
                let name = match c.method {
                    Method::Advcl => "AdvCL (two SimCLR views beside x_o and x_HF)",
                    m if m.is_acl_family() => "ACL / AIR",
                    _ => "SimCLR",
                };
                format!("{name} uses exactly 2 views, got {}", c.n_views)
            });
        } else {
            e.positive("n_views", c.n_views);
        }
        if c.method.is_acl_family() {
            e.require(c.attack != AttackMode::Free, "attack", || {
                "ACL / AIR train with `pgd` (dual-BN adversarial training, the default) or \
                 `none` (plain contrastive learning); there is no free-adversarial variant"
                    .into()
            });
            e.non_negative("lambda1", c.lambda1);
            e.non_negative("lambda2", c.lambda2);
            e.at_most("warmup_epochs", c.warmup_epochs, MAX_EPOCHS);
            e.positive("dyn_k", c.dyn_k);
        }
        if c.method == Method::Advcl {
            e.require(c.attack == AttackMode::Pgd, "attack", || {
                "AdvCL trains on its two PGD examples x_cl and x_ce: `attack: pgd` (the default)"
                    .into()
            });
            e.non_negative("ce_weight", c.ce_weight);
            e.require(
                c.hf_radius.is_finite() && c.hf_radius >= 0.0,
                "hf_radius",
                || format!("expected a finite radius >= 0, got {}", c.hf_radius),
            );
            e.at_most("warmup_epochs", c.warmup_epochs, MAX_EPOCHS);
        }
        if c.method == Method::Rcs {
            e.require(c.attack == AttackMode::Pgd, "attack", || {
                "RCS selects with the `pgd` branch: it trains with `attack: pgd`".into()
            });
            e.require(
                c.rcs_fraction > 0.0 && c.rcs_fraction <= 1.0,
                "rcs_fraction",
                || format!("expected 0 < rcs_fraction <= 1, got {}", c.rcs_fraction),
            );
            e.require(
                c.rcs_val_fraction > 0.0 && c.rcs_val_fraction < 0.5,
                "rcs_val_fraction",
                || {
                    format!(
                        "expected 0 < rcs_val_fraction < 0.5, got {}",
                        c.rcs_val_fraction
                    )
                },
            );
            e.positive("rcs_every", c.rcs_every);
            e.positive("rcs_pgd_steps", c.rcs_pgd_steps);
            e.at_most("rcs_warmup", c.rcs_warmup, MAX_EPOCHS);
            e.non_negative("rcs_lr", c.rcs_lr);
        }
        e.at_most("n_views", c.n_views, MAX_VIEWS);
        e.positive("epochs", c.epochs);
        e.at_most("epochs", c.epochs, MAX_EPOCHS);
        e.positive("batch_size", c.batch_size);
        e.require(c.batch_size >= 2, "batch_size", || {
            format!(
                "expected at least 2 images per batch (BN and the losses need them), got {}",
                c.batch_size
            )
        });
        e.positive("m", c.m);
        // l_inf radius and step on pixels in [0, 1]
        e.within("eps", c.eps, 0.0, 1.0);
        e.within("alpha", c.alpha, 0.0, 1.0);
        e.positive("pgd_steps", c.pgd_steps);
        for (name, [lo, hi], max) in [("scale", c.scale, 1.0), ("ratio", c.ratio, f64::MAX)] {
            e.require(
                lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi && hi <= max,
                name,
                || {
                    format!(
                        "expected 0 < lo <= hi{}, got [{lo}, {hi}]",
                        if max == 1.0 { " <= 1" } else { "" }
                    )
                },
            );
        }
        e.positive_real("lr", c.lr);
        e.within("momentum", c.momentum, 0.0, 1.0);
        e.non_negative("weight_decay", c.weight_decay);
        e.require(!c.nesterov || c.momentum > 0.0, "nesterov", || {
            "Nesterov momentum needs momentum > 0".into()
        });
        e.positive_real("lars_eta", c.lars_eta);
        e.non_negative("lars_eps", c.lars_eps);
        e.require((1..=1024).contains(&c.width), "width", || {
            format!(
                "expected a width in 1..=1024 (64 = the paper's), got {}",
                c.width
            )
        });
        e.positive("hidden_dim", c.hidden_dim);
        e.at_most("hidden_dim", c.hidden_dim, MAX_DIM);
        e.positive("z_dim", c.z_dim);
        e.at_most("z_dim", c.z_dim, MAX_DIM);
        e.positive_real("temperature", c.temperature);
        e.positive_real("base_temperature", c.base_temperature);
        e.non_negative("patch_sim", c.emp.patch_sim);
        e.non_negative("tcr", c.emp.tcr);
        e.positive_real("tcr_eps", c.emp.eps);
        e.checkpoint_minutes(p.checkpoint_minutes);
        e.device(p.device);
        e.into_errors()
    }

    fn canonicalize(
        p: PretrainParams,
        _ctx: &NormalizeCtx<'_>,
    ) -> Result<PretrainParams, Vec<ParamError>> {
        Ok(p.canonical())
    }

    fn key_params(p: &PretrainParams) -> Value {
        let mut v = crate::params::key_with_backend(p, p.device);
        // Keys are stable across versions: the first version keyed all four CF-AMC-SSL switches
        // (absent = true), whether or not they applied; the later switches are keyed only where
        // they apply (the canonical form leaves the others out), and each so far applies only
        // to a method added with it (`q28`..`q43` the ACL family, `q47`, `q50` AdvCL). A future
        // switch for an existing method must be keyed only when it is `false`, or the keys of
        // that method's cached nodes move.
        let f = p.faithful;
        let mut keyed = serde_json::Map::new();
        for (name, value) in [("q6", f.q6), ("q7", f.q7), ("q8", f.q8), ("q10", f.q10)] {
            keyed.insert(name.into(), Value::Bool(value.unwrap_or(true)));
        }
        let later = [
            ("q28", f.q28),
            ("q31", f.q31),
            ("q38", f.q38),
            ("q41", f.q41),
            ("q43", f.q43),
            ("q47", f.q47),
            ("q50", f.q50),
        ];
        for (name, value) in later {
            if let Some(b) = value {
                keyed.insert(name.into(), Value::Bool(b));
            }
        }
        // switches added to a method after its first version: keyed only when off
        if f.q48 == Some(false) {
            keyed.insert("q48".into(), Value::Bool(false));
        }
        if let Value::Object(m) = &mut v {
            m.insert("faithful".into(), Value::Object(keyed));
        }
        v
    }

    fn outputs(_: &PretrainParams) -> Vec<String> {
        [ENCODER_FILE, CURVE_FILE, "metrics.json"]
            .iter()
            .map(|s| (*s).to_string())
            .collect()
    }

    fn resources(p: &PretrainParams) -> Resources {
        crate::params::device_resources(p.device)
    }

    fn explain_failure(params: &serde_json::Value, message: &str) -> Option<String> {
        crate::device::out_of_memory_hint(params, message, &["batch_size", "n_views"])
    }

    fn run(p: &PretrainParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        let ctx = &*ctx;
        let cfg = p.config();
        let data_path = crate::params::input_file(ctx, "dataset", DATA_FILE, "dataset")?;
        let dataset = data::load_dataset(&data_path)?;
        let device = p.device.open()?;
        let given = ctx.inputs("labels").first();
        if let Some(e) = labels_misuse(cfg.method, given.is_some()) {
            return Err(e.message.into());
        }
        let labels = match given {
            Some(a) => {
                let path = a.file(LABELS_FILE).map_err(|e| {
                    format!("the `labels` input has no {LABELS_FILE} (is it a `pseudo_labels` stage?): {e}")
                })?;
                Some(PseudoLabels::load(&path)?)
            }
            None => None,
        };
        let mut trainer = match labels {
            Some(l) => {
                ctx.log(format!(
                    "pseudo-labels: K = {:?} over {} training images",
                    l.ks,
                    l.train.first().map_or(0, Vec::len)
                ));
                Pretrainer::advcl(cfg, &dataset.train, &l.ks, l.train, &device)?
            }
            None => Pretrainer::new(cfg, &dataset.train, &device)?,
        };
        // all or nothing: a state that does not load leaves the trainer fresh
        if let Some(line) =
            checkpoint::resume_in(&mut trainer, ctx.scratch_dir(), p.checkpoint_minutes)
        {
            ctx.log(line);
        }
        let progress = |done: u64, total: u64, msg: &str| ctx.progress(done, total, msg);
        let log = |msg: &str| ctx.log(msg);
        let cancelled = || ctx.is_cancelled();
        let hooks = TrainHooks {
            progress: &progress,
            log: &log,
            cancelled: &cancelled,
        };
        while !trainer.finished() {
            trainer.train_epoch(&hooks)?;
        }
        trainer.save_encoder(&ctx.out_path(ENCODER_FILE))?;
        write_curve(&ctx.out_path(CURVE_FILE), trainer.curve())?;
        let metrics = trainer.metrics(p.device.backend());
        crate::params::write_json(&ctx.out_path("metrics.json"), &metrics)?;
        ctx.log(format!("done: {metrics}"));
        Ok(())
    }
}

fn write_curve(path: &Path, curve: &[EpochStats]) -> Result<(), BoxError> {
    let mut text = String::new();
    for e in curve {
        text.push_str(&serde_json::to_string(e)?);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// The `metrics.json` of a finished run.
pub fn metrics_json(
    cfg: &PretrainConfig,
    curve: &[EpochStats],
    steps: usize,
    n_train: usize,
    device: &str,
) -> Value {
    let seconds: f64 = curve.iter().map(|e| e.seconds).sum();
    let images: f64 = curve.iter().map(|e| e.images as f64).sum();
    let last = curve.last();
    let mut m = json!({
        "method": cfg.method,
        "attack": cfg.attack,
        "final_loss": last.map(|e| e.loss),
        "train_seconds": seconds,
        "train_minutes": seconds / 60.0,
        "images_per_second": if seconds > 0.0 { images / seconds } else { 0.0 },
        "device": device,
        "epochs": curve.len(),
        "steps": steps,
        "n_train": n_train,
        "threads": rayon::current_num_threads(),
    });
    if let (Some(last), Value::Object(map)) = (last, &mut m) {
        for (k, v) in &last.terms {
            map.insert(format!("final_{k}"), json!(v));
        }
    }
    m
}

#[cfg(test)]
mod tests;
