//! The pretraining loop of the `pretrain` kind, independent of the engine: a [`Pretrainer`]
//! owns the model, the optimiser, the schedule and the free-adversarial δ, and trains epoch by
//! epoch (or batch by batch, for tests and benchmarks) on a [`Split`] of u8 images.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle::backprop::GradStore;
use candle::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::data::Split;
use crate::device::DeviceSpec;
use crate::nn::attacks::{FreeDelta, Norm, PgdConfig, pgd, pgd_accumulate};
use crate::nn::augment::{
    DynAclConfig, EmpConfig, ImageBatch, Layout, MultiView, MultiViewConfig, SimClrConfig,
};
use crate::nn::checkpoint::{self, TrainState};
use crate::nn::heads::{
    AclEncoder, AdvclEncoder, Encoder, EncoderConfig, HeadConfig, PGD_CE_BRANCH, acl_encoder,
    advcl_encoder, encoder,
};
use crate::nn::init::{InitRules, build_seeded, is_buffer, named_vars, trainable};
use crate::nn::losses::{
    EmpLossConfig, air_regularizers, cross_entropy_per_example, emp_loss, nt_xent, supcon,
};
use crate::nn::optim::{AclLars, AclLarsConfig, Lars, LarsConfig, Optim, Sgd, SgdConfig};
pub use crate::nn::resnet::PGD_BRANCH;
use crate::nn::resnet::{DEFAULT_BRANCH, INPUT_NORM, ResNet, ResNetConfig};
use crate::nn::schedule::{AdvClLr, Cosine, FreeAdvLr, LrSchedule, WarmupCosine};
use crate::nn::spectral::HighPass;
use crate::rng::Rng;

/// Errors of the loop (messages for the node's log).
pub type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

/// Stream tags of the derived random streams.
const SHUFFLE_STREAM: u64 = 0x5348_5546; // "SHUF"
const AUGMENT_STREAM: u64 = 0x4155_474d; // "AUGM"
const ATTACK_STREAM: u64 = 0x4154_544b; // "ATTK"
const ORG_STREAM: u64 = 0x4f52_4756; // "ORGV"

/// The self-supervised method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// SimCLR: two views, NT-Xent (METHODS.md 3).
    Simclr,
    /// EMP-SSL: n views, invariance + total coding rate (METHODS.md 4).
    EmpSsl,
    /// ACL / DynACL: dual-BN adversarial contrastive learning (METHODS.md 5).
    Acl,
    /// ACL-AIR / DynACL-AIR: ACL plus the SIR and AIR invariance regularisers (METHODS.md 6).
    Air,
    /// ACL-RCS / DynACL-RCS: ACL on robustness-aware coresets (METHODS.md 7).
    Rcs,
    /// AdvCL: adversarial contrastive learning with a high-frequency view and cluster
    /// pseudo-labels (METHODS.md 8).
    Advcl,
}

impl Method {
    /// ACL, AIR and RCS: R-AIR's model (input normalisation, dual BN, 3-layer head), LARS
    /// with warm-up, the strength-`s` views.
    pub fn is_acl_family(self) -> bool {
        matches!(self, Method::Acl | Method::Air | Method::Rcs)
    }
}

/// DynACL's default strength step, in epochs (`K`).
pub const DYNACL_K: usize = 50;
/// DynACL's weight of the adversarial term (`Λ`): `ω = Λ (1 − s)`.
pub const DYNACL_LAMBDA: f64 = 2.0 / 3.0;

/// Adversarial training mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttackMode {
    /// Standard training.
    #[default]
    None,
    /// PGD on every batch (zero init, l_inf).
    Pgd,
    /// Free adversarial training: m replays with a persistent δ.
    Free,
}

/// Crop geometry of the views.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewKind {
    /// Random resized crops, scale [0.08, 1], ratio [3/4, 4/3].
    Crop,
    /// Fixed-scale patches, scale 0.25, ratio 1.
    Patch,
}

impl ViewKind {
    /// `(scale, ratio)` ranges.
    pub fn scale_ratio(self) -> ([f64; 2], [f64; 2]) {
        match self {
            ViewKind::Crop => ([0.08, 1.0], [3.0 / 4.0, 4.0 / 3.0]),
            ViewKind::Patch => ([0.25, 0.25], [1.0, 1.0]),
        }
    }
}

/// The reference-code quirks (see the kind's docs), resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faithful {
    /// \[Q6\] free-adversarial cosine period `⌊n/B⌋·epochs`.
    pub q6: bool,
    /// \[Q7\] attack parameter gradients added to the update.
    pub q7: bool,
    /// \[Q8\] attack forwards update the BN running statistics.
    pub q8: bool,
    /// \[Q10\] δ re-projected against the previous batch only.
    pub q10: bool,
    /// \[Q28\] AIR's regularisers as R-AIR computes them (not KL divergences).
    pub q28: bool,
    /// \[Q31\] the ACL family's PGD random start is not clamped to the box.
    pub q31: bool,
    /// \[Q38\] RCS's simulated head step is applied twice (R-RCS updates the same module
    /// through two names).
    pub q38: bool,
    /// \[Q41\] RCS's validation bookkeeping (candidates from the whole set, half the
    /// validation images twice).
    pub q41: bool,
    /// \[Q43\] RCS halves the ACL loss.
    pub q43: bool,
    /// \[Q47\] AdvCL's attack forwards run in train mode and update the BN running
    /// statistics, all five views at every step.
    pub q47: bool,
    /// \[Q48\] AdvCL's random start and high-frequency view are not clamped to `[0, 1]`.
    pub q48: bool,
    /// \[Q50\] AdvCL's loop runs `epochs + 2` epochs of the `epochs`-long cosine.
    pub q50: bool,
}

/// A fully resolved pretraining configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    /// SimCLR or EMP-SSL.
    pub method: Method,
    /// Adversarial mode.
    pub attack: AttackMode,
    /// Crop geometry (informational; `scale` and `ratio` are what is used).
    pub views: ViewKind,
    /// Crop scale range.
    pub scale: [f64; 2],
    /// Crop ratio range.
    pub ratio: [f64; 2],
    /// Views per image.
    pub n_views: usize,
    /// Epochs.
    pub epochs: usize,
    /// Source images per batch.
    pub batch_size: usize,
    /// Free replays.
    pub m: usize,
    /// l_inf radius.
    pub eps: f64,
    /// Attack step.
    pub alpha: f64,
    /// PGD steps.
    pub pgd_steps: usize,
    /// Base learning rate.
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov.
    pub nesterov: bool,
    /// Weight decay.
    pub weight_decay: f64,
    /// LARS wrapper on.
    pub lars: bool,
    /// LARS trust coefficient.
    pub lars_eta: f64,
    /// LARS clip.
    pub lars_clip: bool,
    /// LARS ε.
    pub lars_eps: f64,
    /// LARS skips 1-d tensors.
    pub lars_exclude_bias_n_norm: bool,
    /// ResNet width.
    pub width: usize,
    /// `pre_feature` width.
    pub hidden_dim: usize,
    /// Projection output.
    pub z_dim: usize,
    /// NT-Xent temperature.
    pub temperature: f64,
    /// NT-Xent base temperature.
    pub base_temperature: f64,
    /// EMP-SSL loss.
    pub emp: EmpLossConfig,
    /// ACL family: DynACL's augmentation-strength schedule and adversarial weight.
    pub dyn_aug: bool,
    /// DynACL: epochs per strength step (`K`, 50).
    pub dyn_k: usize,
    /// AIR: weight of SIR.
    pub lambda1: f64,
    /// AIR: weight of AIR.
    pub lambda2: f64,
    /// ACL family: linear warm-up epochs of the learning rate.
    pub warmup_epochs: usize,
    /// RCS: coreset size as a fraction of the training split (`fraction`, 0.2).
    pub rcs_fraction: f64,
    /// RCS: epochs on the whole set before the first selection (`warmup`, 100).
    pub rcs_warmup: usize,
    /// RCS: epochs between selections (`fre`, 20).
    pub rcs_every: usize,
    /// RCS: steps of the RD attack on the validation set (`Coreset_pgd_iter`, 3).
    pub rcs_pgd_steps: usize,
    /// RCS: rate of the simulated head step (`Coreset_lr`, 0.01).
    pub rcs_lr: f64,
    /// RCS: validation fraction of the training set (0.01).
    pub rcs_val_fraction: f64,
    /// AdvCL: weight of the pseudo-label cross-entropy (0.2).
    pub ce_weight: f64,
    /// AdvCL: radius of the low-frequency disk removed from the high-frequency view (8).
    pub hf_radius: f64,
    /// Seed.
    pub seed: u64,
    /// Quirk switches.
    pub faithful: Faithful,
    /// SimCLR / EMP-SSL: the input normalisation inside the model.
    pub input_norm: InputNormKind,
}

/// The input normalisation of a SimCLR / EMP-SSL encoder (METHODS.md 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputNormKind {
    /// Raw `[0, 1]` pixels (R-CF, which removed R-EMP's normalisation).
    #[default]
    None,
    /// `(x − 0.5) / 0.5` per channel as the model's first op (R-EMP's transform), with the
    /// buffers `encoder.normalize.mean` and `.std` set to 0.5 in the checkpoint.
    Half,
}

impl PretrainConfig {
    /// The encoder architecture.
    pub fn encoder(&self) -> EncoderConfig {
        EncoderConfig {
            backbone: ResNetConfig {
                width: self.width,
                input_norm: self.input_norm != InputNormKind::None,
                ..Default::default()
            },
            head: HeadConfig {
                hidden_dim: self.hidden_dim,
                z_dim: self.z_dim,
            },
        }
    }

    /// The ACL family's BN branches: `normal`, and `pgd` when adversarial.
    pub fn branches(&self) -> Vec<String> {
        let mut b = vec![DEFAULT_BRANCH.to_string()];
        if self.attack != AttackMode::None {
            b.push(PGD_BRANCH.to_string());
        }
        b
    }

    /// The augmentation strength `s` of 0-based `epoch` (ACL family): 1, or under DynACL
    /// `1 − ⌊e / K⌋ · K / E` (R-AIR's 1-based `1 − ⌊(e − 1) / K⌋ · K / E`).
    pub fn strength(&self, epoch: usize) -> f64 {
        if !self.dyn_aug {
            return 1.0;
        }
        let k = self.dyn_k.max(1);
        1.0 - ((epoch / k) * k) as f64 / self.epochs as f64
    }

    /// The weight `ω` of the adversarial term in epoch `epoch`: `Λ (1 − s)` under DynACL,
    /// else 0.
    pub fn omega(&self, epoch: usize) -> f64 {
        if self.dyn_aug {
            DYNACL_LAMBDA * (1.0 - self.strength(epoch))
        } else {
            0.0
        }
    }

    /// Epochs the loop runs: `epochs`, or for AdvCL with \[Q50\] `epochs + 2` (R-ADV's
    /// `range(0, epoch + 2)`).
    pub fn run_epochs(&self) -> usize {
        if self.method == Method::Advcl && self.faithful.q50 {
            self.epochs + 2
        } else {
            self.epochs
        }
    }

    /// Batches per epoch for `n` images: `drop_last` for CF-AMC-SSL's methods, the last
    /// partial batch kept for the ACL family (\[Q32\]) and AdvCL (a plain `DataLoader`).
    pub fn iters_per_epoch(&self, n: usize) -> usize {
        if self.method.is_acl_family() || self.method == Method::Advcl {
            n.div_ceil(self.batch_size)
        } else {
            n / self.batch_size
        }
    }

    /// The view generator of `epoch` for images of `side × side` pixels (the views have the
    /// images' size: 32 on CIFAR, as the references' `RandomResizedCrop(32)`).
    fn view_generator(&self, epoch: usize, side: usize) -> Result<MultiView> {
        Ok(match self.method {
            Method::Acl | Method::Air | Method::Rcs => {
                // view-major (rows 0..B view i, B..2B view j) instead of R-AIR's interleaving:
                // the losses pair rows explicitly and BN sees the same set of rows
                let cfg = DynAclConfig {
                    size: side,
                    ..DynAclConfig::with_strength(self.strength(epoch))
                }
                .config();
                MultiView::new(MultiViewConfig {
                    layout: Layout::ViewMajor,
                    ..cfg
                })?
            }
            Method::EmpSsl => EmpConfig {
                n_views: self.n_views,
                scale: self.scale,
                ratio: self.ratio,
                size: side,
                ..EmpConfig::crop(self.n_views)
            }
            .build()?,
            // AdvCL's x1, x2: SimCLR's pipeline with RandomResizedCrop scale (0.2, 1)
            Method::Simclr | Method::Advcl => SimClrConfig {
                scale: self.scale,
                ratio: self.ratio,
                size: side,
            }
            .build()?,
        })
    }
}

/// What one epoch did (a line of `curve.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// 0-based epoch index.
    pub epoch: usize,
    /// Mean training loss over the epoch's batches (the last replay of each batch in free mode).
    pub loss: f64,
    /// Mean loss terms (`invariance`, `tcr` for EMP-SSL).
    #[serde(flatten)]
    pub terms: BTreeMap<String, f64>,
    /// Learning rate of the epoch's last update (for a per-epoch schedule, the epoch's rate).
    pub lr: f64,
    /// Wall seconds of the epoch.
    pub seconds: f64,
    /// Source images trained on.
    pub images: usize,
    /// Source images per second.
    pub images_per_second: f64,
}

/// What one batch did.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchStats {
    /// The loss (last replay in free mode).
    pub loss: f64,
    /// Its terms.
    pub terms: Vec<(&'static str, f64)>,
}

/// How far an unfinished epoch got: what a mid-epoch state records so that the resumed epoch
/// adds up to the uninterrupted one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct EpochProgress {
    /// Batches (optimiser updates, `m` in free mode) finished in the epoch.
    batches: usize,
    /// Sum of their losses.
    loss_sum: f64,
    /// Sums of their loss terms.
    terms: BTreeMap<String, f64>,
    /// Source images trained on.
    images: usize,
    /// Wall seconds spent on the epoch up to the state.
    seconds: f64,
}

/// Callbacks from the loop to its runner (no-ops by default).
pub struct TrainHooks<'a> {
    /// `(done, total, message)` per batch.
    pub progress: &'a (dyn Fn(u64, u64, &str) + Sync),
    /// A log line per epoch.
    pub log: &'a (dyn Fn(&str) + Sync),
    /// Polled between batches: stop with an error when true.
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl Default for TrainHooks<'_> {
    fn default() -> Self {
        TrainHooks {
            progress: &|_, _, _| {},
            log: &|_| {},
            cancelled: &|| false,
        }
    }
}

/// The pretraining state machine (see the module docs).
pub struct Pretrainer<'d> {
    cfg: PretrainConfig,
    images: &'d Split,
    device: Device,
    varmap: VarMap,
    net: Net,
    params: Vec<(String, Var)>,
    opt: Box<dyn Optim>,
    sched: Box<dyn LrSchedule>,
    views: MultiView,
    views_epoch: usize,
    aug_seed: u64,
    free: Option<FreeDelta>,
    step: usize,
    epoch: usize,
    iters: usize,
    curve: Vec<EpochStats>,
    rcs: Option<RcsRun>,
    advcl: Option<AdvclRun>,
    /// The unfinished epoch a mid-epoch state was loaded from (taken by the next epoch).
    partial: Option<EpochProgress>,
    /// Where and how often [`Pretrainer::train_epoch`] writes the training state.
    checkpoint: Option<checkpoint::Cadence>,
}

/// AdvCL's per-run data.
struct AdvclRun {
    /// Per pseudo-label set, the label of every training image.
    labels: Vec<Vec<u32>>,
    /// The weak "org" view: RandomCrop(32, pad 4) + HFlip.
    org: MultiView,
    org_seed: u64,
    /// The high-frequency filter.
    high_pass: HighPass,
    /// Re-run the clean views' backbone forwards at every faithful attack step instead of
    /// [`CleanReplay`] (the reference implementation the replay is tested against).
    reforward: bool,
}

/// AdvCL's inputs of one batch ([`Pretrainer::advcl_batch`]).
pub struct AdvclBatch {
    /// First SimCLR view.
    pub x1: Tensor,
    /// Second SimCLR view.
    pub x2: Tensor,
    /// The weak "org" view `x_o` (the attacks' start).
    pub xo: Tensor,
    /// The high-frequency component of `x_o` (not clamped).
    pub hf: Tensor,
    /// Per pseudo-label set, the labels `(B,)` U32.
    pub targets: Vec<Tensor>,
}

/// AdvCL's clean views in a faithful (\[Q47\]) attack without re-running their backbone
/// forwards: their `normal`-branch backbone features from one train-mode forward each, and the
/// running statistics before (`s₀`) and after (`s₃`) those forwards. Each of the three forwards
/// maps a running statistic `r ↦ (1 − m) r + m μᵢ` with the same `μᵢ` at every step, so one
/// step's three forwards compose to `r ↦ a r + (s₃ − a s₀)`, `a = (1 − m)³`.
struct CleanReplay {
    feats: [Tensor; 3],
    /// `(running statistic, s₃ − a s₀)` of every float buffer of the backbone's `normal` branch.
    stats: Vec<(Var, Tensor)>,
    /// Their `num_batches_tracked` counters.
    counters: Vec<Var>,
    a: f64,
}

impl CleanReplay {
    fn new(m: &AdvclEncoder, b: &AdvclBatch, varmap: &VarMap) -> candle::Result<Self> {
        let branch_buffers: Vec<(String, Var)> = named_vars(varmap)
            .into_iter()
            .filter(|(n, _)| {
                n.starts_with("encoder.")
                    && is_buffer(n)
                    && !n.contains(&format!(".{PGD_BRANCH}."))
                    && !n.contains(&format!(".{PGD_CE_BRANCH}."))
            })
            .collect();
        let s0: Vec<Tensor> = branch_buffers
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle::Result<_>>()?;
        let feats = [
            m.features(&b.x1, DEFAULT_BRANCH, true)?.detach(),
            m.features(&b.x2, DEFAULT_BRANCH, true)?.detach(),
            m.features(&b.hf, DEFAULT_BRANCH, true)?.detach(),
        ];
        let a = (1.0 - crate::nn::resnet::BN_MOMENTUM).powi(3);
        let mut stats = Vec::new();
        let mut counters = Vec::new();
        for ((name, v), s0) in branch_buffers.into_iter().zip(s0) {
            if name.ends_with("num_batches_tracked") {
                counters.push(v);
            } else {
                let c = (v.as_tensor() - (s0 * a)?)?;
                stats.push((v, c));
            }
        }
        Ok(Self {
            feats,
            stats,
            counters,
            a,
        })
    }

    /// One more step's three forwards, in closed form.
    fn step(&self) -> candle::Result<()> {
        for (v, c) in &self.stats {
            v.set(&((v.as_tensor() * self.a)? + c)?)?;
        }
        for v in &self.counters {
            let t = v.as_tensor();
            v.set(&t.broadcast_add(&Tensor::new(3i64, t.device())?)?)?;
        }
        Ok(())
    }

    /// The clean views' embeddings: the head (train mode) on the kept features.
    fn embed(&self, m: &AdvclEncoder) -> candle::Result<[Tensor; 3]> {
        Ok([
            m.project(&self.feats[0], true)?,
            m.project(&self.feats[1], true)?,
            m.project(&self.feats[2], true)?,
        ])
    }
}

/// The embeddings of `x1`, `x2`, `x_HF` through the `normal` branch, train mode, in R-ADV's
/// order.
fn advcl_clean_views(m: &AdvclEncoder, b: &AdvclBatch) -> candle::Result<[Tensor; 3]> {
    Ok([
        m.embed(&b.x1, DEFAULT_BRANCH, true)?,
        m.embed(&b.x2, DEFAULT_BRANCH, true)?,
        m.embed(&b.hf, DEFAULT_BRANCH, true)?,
    ])
}

/// RCS's state across epochs.
struct RcsRun {
    split: super::rcs::RcsSplit,
    /// The last selected coreset.
    coreset: Option<Vec<usize>>,
    /// Scheduler steps before this epoch (R-RCS rebuilds the schedule every epoch with the
    /// epoch's loader length `L` and fast-forwards it by `epoch · L`).
    offset: usize,
    /// Updates so far in this epoch.
    batch: usize,
}

/// The model a [`Pretrainer`] trains.
enum Net {
    /// CF-AMC-SSL's encoder (SimCLR, EMP-SSL).
    Cf(Encoder),
    /// R-AIR's model (ACL, AIR).
    Acl(AclEncoder),
    /// R-ADV's model (AdvCL).
    Advcl(AdvclEncoder),
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl<'d> Pretrainer<'d> {
    /// A fresh run: the encoder initialised from `cfg.seed` (R-CF's init rules), the optimiser
    /// and schedule, no epoch done.
    ///
    /// # Errors
    /// Fewer training images than one batch, images that do not fit the view generator, or
    /// tensor errors.
    pub fn new(cfg: PretrainConfig, images: &'d Split, device: &Device) -> Result<Self> {
        if cfg.method == Method::Advcl {
            return Err("AdvCL trains on pseudo-labels: build it with `Pretrainer::advcl`".into());
        }
        let rcs = (cfg.method == Method::Rcs).then(|| RcsRun {
            split: super::rcs::split(images.n, &cfg),
            coreset: None,
            offset: 0,
            batch: 0,
        });
        // RCS's first schedule is built on its 99 % training loader
        let iters = match &rcs {
            Some(r) => cfg.iters_per_epoch(r.split.train.len()),
            None => cfg.iters_per_epoch(images.n),
        };
        if iters == 0 {
            return Err(format!(
                "batch_size {} is larger than the {} training images (batches are drop_last)",
                cfg.batch_size, images.n
            )
            .into());
        }
        let views = cfg.view_generator(0, images.h)?;
        let (varmap, net) = if cfg.method.is_acl_family() {
            // R-AIR keeps torchvision's init everywhere (its stem is built in __init__)
            let (vm, m) =
                build_seeded(cfg.seed, &InitRules::default(), DType::F32, device, |vb| {
                    acl_encoder(cfg.width, &cfg.branches(), vb)
                })?;
            (vm, Net::Acl(m))
        } else {
            let enc_cfg = cfg.encoder();
            let (vm, e) = build_seeded(
                cfg.seed,
                &InitRules::r_cf(crate::nn::heads::ENCODER),
                DType::F32,
                device,
                |vb| encoder(&enc_cfg, vb),
            )?;
            if cfg.input_norm == InputNormKind::Half {
                // the seeded init writes ImageNet's statistics into the normalisation buffers
                for (name, v) in named_vars(&vm) {
                    if name.starts_with(&format!("{}.{INPUT_NORM}.", crate::nn::heads::ENCODER)) {
                        v.set(&Tensor::full(0.5f32, v.shape(), device)?)?;
                    }
                }
            }
            (vm, Net::Cf(e))
        };
        let params = trainable(&varmap);
        if cfg.method.is_acl_family() {
            let opt = AclLars::new_named(
                &params,
                AclLarsConfig {
                    lr: cfg.lr,
                    momentum: cfg.momentum,
                    eta: cfg.lars_eta,
                    weight_decay: cfg.weight_decay,
                },
            )?;
            let sched = WarmupCosine {
                base_lr: cfg.lr,
                warmup_steps: cfg.warmup_epochs * iters,
                total_steps: cfg.epochs * iters,
                min_factor: 1e-6 / cfg.lr,
            };
            let mut t = Self::assemble(
                cfg,
                images,
                device,
                (varmap, net, params),
                Box::new(opt),
                Box::new(sched),
                views,
                iters,
            );
            t.rcs = rcs;
            return Ok(t);
        }
        let sgd = SgdConfig {
            lr: cfg.lr,
            momentum: cfg.momentum,
            dampening: 0.0,
            nesterov: cfg.nesterov,
            weight_decay: cfg.weight_decay,
        };
        let opt: Box<dyn Optim> = if cfg.lars {
            Box::new(Lars::new_named(
                &params,
                LarsConfig {
                    sgd,
                    eta: cfg.lars_eta,
                    clip: cfg.lars_clip,
                    eps: cfg.lars_eps,
                    exclude_bias_n_norm: cfg.lars_exclude_bias_n_norm,
                },
            )?)
        } else {
            Box::new(Sgd::new_named(&params, sgd)?)
        };
        let n = images.n;
        let sched = match cfg.attack {
            AttackMode::Free => Cosine::free_adv(
                cfg.lr,
                0.0,
                n,
                cfg.batch_size,
                cfg.epochs,
                cfg.m,
                if cfg.faithful.q6 {
                    FreeAdvLr::Faithful
                } else {
                    FreeAdvLr::Clean
                },
            ),
            _ => Cosine::per_iteration(cfg.lr, 0.0, n, cfg.batch_size, cfg.epochs),
        };
        Ok(Self::assemble(
            cfg,
            images,
            device,
            (varmap, net, params),
            opt,
            Box::new(sched),
            views,
            iters,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: PretrainConfig,
        images: &'d Split,
        device: &Device,
        (varmap, net, params): (VarMap, Net, Vec<(String, Var)>),
        opt: Box<dyn Optim>,
        sched: Box<dyn LrSchedule>,
        views: MultiView,
        iters: usize,
    ) -> Self {
        let aug_seed = Rng::derive(cfg.seed, &[AUGMENT_STREAM]).next_u64();
        Self {
            cfg,
            images,
            device: device.clone(),
            varmap,
            net,
            params,
            opt,
            sched,
            views,
            views_epoch: 0,
            aug_seed,
            free: None,
            step: 0,
            epoch: 0,
            iters,
            curve: Vec::new(),
            rcs: None,
            advcl: None,
            partial: None,
            checkpoint: None,
        }
    }

    /// A fresh AdvCL run (METHODS.md 8) on `images` with one pseudo-label set per entry of
    /// `ks` (`labels[i][j]`: the label of training image `j` in set `i`, below `ks[i]`): R-ADV's
    /// three-branch ResNet-18 and heads (torchvision / PyTorch init, seeded), plain SGD on
    /// every tensor, AdvCL's warm-up + per-epoch cosine.
    ///
    /// # Errors
    /// Labels that do not match the images or their `K`, images that are not 32 × 32, fewer
    /// images than two, or tensor errors.
    pub fn advcl(
        cfg: PretrainConfig,
        images: &'d Split,
        ks: &[usize],
        labels: Vec<Vec<u32>>,
        device: &Device,
    ) -> Result<Self> {
        if cfg.method != Method::Advcl {
            return Err("internal: Pretrainer::advcl for another method".into());
        }
        if ks.is_empty() || ks.len() != labels.len() {
            return Err(format!(
                "AdvCL needs at least one pseudo-label set, got {} cluster counts for {} label sets",
                ks.len(),
                labels.len()
            )
            .into());
        }
        for (k, l) in ks.iter().zip(&labels) {
            if l.len() != images.n {
                return Err(format!(
                    "the pseudo-labels (K = {k}) cover {} images, the training split has {}: \
                     they were computed on another dataset",
                    l.len(),
                    images.n
                )
                .into());
            }
            if let Some(bad) = l.iter().find(|&&v| v as usize >= *k) {
                return Err(format!("pseudo-label {bad} is not below K = {k}").into());
            }
        }
        let iters = cfg.iters_per_epoch(images.n);
        if images.n < 2 || images.n % cfg.batch_size == 1 {
            return Err(format!(
                "{} training images in batches of {} leave a batch of one image (BN needs two)",
                images.n, cfg.batch_size
            )
            .into());
        }
        let views = cfg.view_generator(0, images.h)?;
        let org = crate::nn::augment::FinetuneConfig {
            size: images.h,
            ..Default::default()
        };
        let org = MultiView::new(org.config())?;
        let high_pass = HighPass::new(images.h, images.w, cfg.hf_radius, device)?;
        let (varmap, model) =
            build_seeded(cfg.seed, &InitRules::default(), DType::F32, device, |vb| {
                advcl_encoder(cfg.width, ks, vb)
            })?;
        let params = trainable(&varmap);
        let opt = Sgd::new_named(
            &params,
            SgdConfig {
                lr: cfg.lr,
                momentum: cfg.momentum,
                dampening: 0.0,
                nesterov: false,
                weight_decay: cfg.weight_decay,
            },
        )?;
        let sched = AdvClLr {
            warm_epochs: cfg.warmup_epochs,
            ..AdvClLr::advcl(cfg.lr, cfg.epochs, cfg.batch_size, iters)
        };
        let org_seed = Rng::derive(cfg.seed, &[ORG_STREAM]).next_u64();
        let mut t = Self::assemble(
            cfg,
            images,
            device,
            (varmap, Net::Advcl(model), params),
            Box::new(opt),
            Box::new(sched),
            views,
            iters,
        );
        t.advcl = Some(AdvclRun {
            labels,
            org,
            org_seed,
            high_pass,
            reforward: false,
        });
        Ok(t)
    }

    /// The configuration.
    pub fn config(&self) -> &PretrainConfig {
        &self.cfg
    }

    /// Epochs finished.
    pub fn epochs_done(&self) -> usize {
        self.epoch
    }

    /// Batches finished in the next epoch (nonzero after loading a mid-epoch state).
    pub fn batches_done(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.batches)
    }

    /// Where this run stands (after [`Pretrainer::load_state`]: where it resumes).
    pub fn resume_point(&self) -> checkpoint::ResumePoint {
        checkpoint::ResumePoint {
            epochs_done: self.epoch,
            epochs: self.cfg.run_epochs(),
            batches_done: self.batches_done(),
        }
    }

    /// Whether every epoch is done.
    pub fn finished(&self) -> bool {
        self.epoch >= self.cfg.run_epochs()
    }

    /// Optimiser updates so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// Batches per epoch (`⌊n / batch_size⌋`; the ACL family keeps a last partial batch).
    pub fn iters_per_epoch(&self) -> usize {
        self.iters
    }

    /// The per-epoch curve so far.
    pub fn curve(&self) -> &[EpochStats] {
        &self.curve
    }

    /// The model's variables (parameters and BN buffers).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// CF-AMC-SSL's encoder (SimCLR, EMP-SSL); `None` for the other methods.
    pub fn encoder(&self) -> Option<&Encoder> {
        match &self.net {
            Net::Cf(e) => Some(e),
            _ => None,
        }
    }

    /// The ACL family's model; `None` for the other methods.
    pub fn acl_model(&self) -> Option<&AclEncoder> {
        match &self.net {
            Net::Acl(m) => Some(m),
            _ => None,
        }
    }

    /// AdvCL's model; `None` for the other methods.
    pub fn advcl_model(&self) -> Option<&AdvclEncoder> {
        match &self.net {
            Net::Advcl(m) => Some(m),
            _ => None,
        }
    }

    /// The backbone being trained (any method).
    pub fn backbone(&self) -> &ResNet {
        match &self.net {
            Net::Cf(e) => e.backbone(),
            Net::Acl(m) => m.backbone(),
            Net::Advcl(m) => m.backbone(),
        }
    }

    /// The positions of batch `b` in an epoch's order of `len` images (the last batch may be
    /// partial).
    fn batch_range(&self, b: usize, len: usize) -> std::ops::Range<usize> {
        let bs = self.cfg.batch_size;
        b * bs..((b + 1) * bs).min(len)
    }

    /// The last RCS coreset (image indices), if one was selected.
    pub fn coreset(&self) -> Option<&[usize]> {
        self.rcs.as_ref().and_then(|r| r.coreset.as_deref())
    }

    /// RCS: the images of `epoch` (the pool, a new coreset or the last one) and the epoch's
    /// schedule; `None` for the other methods.
    ///
    /// `resumed`: the epoch continues from a mid-epoch state, whose coreset is this epoch's
    /// selection (selecting again, on the weights of the state, would pick another set).
    fn rcs_epoch_set(
        &mut self,
        epoch: usize,
        resumed: bool,
        hooks: &TrainHooks<'_>,
    ) -> Result<Option<Vec<usize>>> {
        let Some(r) = &self.rcs else {
            return Ok(None);
        };
        let (select, use_coreset) = super::rcs::schedule(&self.cfg, epoch);
        let set = if select && !resumed {
            let Net::Acl(model) = &self.net else {
                return Err("internal: RCS on a CF-AMC model".into());
            };
            let t0 = Instant::now();
            let chosen = super::rcs::Selector {
                model,
                varmap: &self.varmap,
                images: self.images,
                split: &r.split,
                views: &self.views,
                cfg: &self.cfg,
                device: &self.device,
            }
            .select(epoch, hooks)?;
            (hooks.log)(&format!(
                "epoch {}: RCS selected {} of {} images in {:.1} s",
                epoch + 1,
                chosen.len(),
                r.split.pool.len(),
                t0.elapsed().as_secs_f64()
            ));
            chosen
        } else if select || use_coreset {
            match &r.coreset {
                Some(c) => c.clone(),
                None => {
                    let c = super::rcs::initial_coreset(&r.split, &self.cfg);
                    (hooks.log)(&format!(
                        "epoch {}: no coreset selected yet: training on a random one of {} images (R-RCS's initial coreset)",
                        epoch + 1,
                        c.len()
                    ));
                    c
                }
            }
        } else {
            r.split.pool.clone()
        };
        let lr = self.cfg.lr;
        let l = self.cfg.iters_per_epoch(set.len());
        if epoch >= 1 {
            // R-RCS rebuilds its LambdaLR every epoch on the current loader and fast-forwards it
            self.sched = Box::new(WarmupCosine {
                base_lr: lr,
                warmup_steps: self.cfg.warmup_epochs * l,
                total_steps: self.cfg.epochs * l,
                min_factor: 1e-6 / lr,
            });
        }
        if let Some(r) = &mut self.rcs {
            if use_coreset && !resumed {
                r.coreset = Some(set.clone());
            }
            r.offset = if epoch >= 1 { epoch * l } else { 0 };
            r.batch = 0;
        }
        Ok(Some(set))
    }

    /// The scheduler step of the next update.
    fn sched_t(&self) -> usize {
        match &self.rcs {
            Some(r) => r.offset + r.batch,
            None => self.step,
        }
    }

    /// The free-adversarial δ (after the first free batch).
    pub fn free_delta(&self) -> Option<&Tensor> {
        self.free.as_ref().map(FreeDelta::delta)
    }

    /// The image indices of batch `b` of epoch `epoch` (the epoch's seeded permutation).
    pub fn batch_indices(&self, epoch: usize, b: usize) -> Vec<usize> {
        let perm =
            Rng::derive(self.cfg.seed, &[SHUFFLE_STREAM, epoch as u64]).permutation(self.images.n);
        perm[self.batch_range(b, self.images.n)].to_vec()
    }

    /// The images of batch `b` of epoch `epoch` (the epoch's seeded permutation, drop_last).
    pub fn batch_images(&self, epoch: usize, b: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.cfg.batch_size * self.images.image_len());
        for i in self.batch_indices(epoch, b) {
            out.extend_from_slice(self.images.image(i));
        }
        out
    }

    /// Sets the view generator of `epoch` (the ACL family's strength changes per epoch).
    fn views_for_epoch(&mut self, epoch: usize) -> Result<()> {
        if self.cfg.method.is_acl_family() && self.views_epoch != epoch {
            self.views = self.cfg.view_generator(epoch, self.images.h)?;
            self.views_epoch = epoch;
        }
        Ok(())
    }

    /// Trains one epoch (the next one, or the rest of the one a mid-epoch state stopped in),
    /// calling the hooks per batch; appends to the curve. With [`checkpoint::Resumable::checkpoint_to`],
    /// writes the state during and after the epoch.
    ///
    /// # Errors
    /// A non-finite loss (naming epoch and batch), non-finite weights at the end of the epoch
    /// (naming the epoch), cancellation, a state that cannot be written, or tensor errors.
    pub fn train_epoch(&mut self, hooks: &TrainHooks<'_>) -> Result<EpochStats> {
        let epoch = self.epoch;
        let start = Instant::now();
        let resumed = self.partial.take();
        let mut done = resumed.clone().unwrap_or_default();
        self.views_for_epoch(epoch)?;
        let mut shuffle = Rng::derive(self.cfg.seed, &[SHUFFLE_STREAM, epoch as u64]);
        let (order, iters) = match self.rcs_epoch_set(epoch, resumed.is_some(), hooks)? {
            None => (shuffle.permutation(self.images.n), self.iters),
            Some(set) => {
                let iters = self.cfg.iters_per_epoch(set.len());
                let order = shuffle
                    .permutation(set.len())
                    .iter()
                    .map(|&k| set[k])
                    .collect();
                (order, iters)
            }
        };
        if done.batches >= iters {
            return Err(format!(
                "the saved state stopped after batch {} of epoch {}, which has {iters} batches",
                done.batches,
                epoch + 1
            )
            .into());
        }
        if let Some(r) = &mut self.rcs {
            r.batch = done.batches;
        }
        let perm: Vec<usize> = order;
        let bs = self.cfg.batch_size;
        let total = (iters * self.cfg.run_epochs()) as u64;
        let mut buf = Vec::with_capacity(bs * self.images.image_len());
        let first = done.batches;
        for b in first..iters {
            if (hooks.cancelled)() {
                if b > first {
                    self.save_mid_epoch(&done, start)?;
                }
                return Err(format!("cancelled during epoch {epoch}, batch {b}").into());
            }
            buf.clear();
            let range = self.batch_range(b, perm.len());
            let n_images = range.len();
            for &i in &perm[range] {
                buf.extend_from_slice(self.images.image(i));
            }
            // the augmentation stream of the batch; RCS epochs differ in length
            let global = if self.rcs.is_some() {
                ((epoch as u64) << 32) | b as u64
            } else {
                (epoch * iters + b) as u64
            };
            let stats = if self.advcl.is_some() {
                let idx = perm[self.batch_range(b, perm.len())].to_vec();
                self.train_batch_indexed(&idx, &buf, global)
            } else {
                self.train_batch(&buf, global)
            }
            .map_err(|e| format!("epoch {epoch}, batch {b}: {e}"))?;
            done.batches += 1;
            done.images += n_images;
            done.loss_sum += stats.loss;
            for (k, v) in &stats.terms {
                *done.terms.entry((*k).to_string()).or_default() += v;
            }
            let rate = (done.images - resumed.as_ref().map_or(0, |r| r.images)) as f64
                / start.elapsed().as_secs_f64().max(1e-9);
            (hooks.progress)(
                (epoch * iters + b + 1) as u64,
                total,
                &format!(
                    "epoch {}/{} loss {:.4} {:.0} img/s",
                    epoch + 1,
                    self.cfg.run_epochs(),
                    stats.loss,
                    rate
                ),
            );
            if b + 1 < iters
                && self
                    .checkpoint
                    .as_ref()
                    .is_some_and(checkpoint::Cadence::due)
            {
                self.save_mid_epoch(&done, start)?;
            }
        }
        let n = iters as f64;
        for v in done.terms.values_mut() {
            *v /= n;
        }
        let seconds = done.seconds + start.elapsed().as_secs_f64();
        let stats = EpochStats {
            epoch,
            loss: done.loss_sum / n,
            terms: done.terms,
            // the rate the epoch's last update used (an epoch has at least one batch)
            lr: self.sched.lr(self.sched_t().saturating_sub(1)),
            seconds,
            images: done.images,
            images_per_second: done.images as f64 / seconds.max(1e-9),
        };
        (hooks.log)(&format!(
            "epoch {}/{}: loss {:.5} {:?} lr {:.5} {:.1} s {:.1} img/s",
            epoch + 1,
            self.cfg.run_epochs(),
            stats.loss,
            stats.terms,
            stats.lr,
            stats.seconds,
            stats.images_per_second
        ));
        // a diverged model must fail here, before its state or checkpoint is saved
        let bad = checkpoint::non_finite(&self.varmap)?;
        if let Some(first) = bad.first() {
            return Err(format!(
                "epoch {epoch}: the weights are not finite after its last step ({} tensors, \
                 first `{first}`; lr {:e}): the training diverged, lower `lr`",
                bad.len(),
                self.cfg.lr
            )
            .into());
        }
        self.curve.push(stats.clone());
        self.epoch += 1;
        self.checkpoint_now(None)?;
        Ok(stats)
    }

    /// Writes the state of an unfinished epoch (`done` so far, `start` of this call).
    fn save_mid_epoch(&mut self, done: &EpochProgress, start: Instant) -> Result<()> {
        // a diverging model is reported at the end of the epoch; never keep its weights
        if self.checkpoint.is_none() || !checkpoint::non_finite(&self.varmap)?.is_empty() {
            return Ok(());
        }
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

    /// Trains on one batch of `batch_size` u8 images (CHW, concatenated); `global` is the
    /// batch's index over the whole run (it seeds the augmentation). One optimiser update,
    /// or `m` in free mode.
    ///
    /// # Errors
    /// A non-finite loss or tensor errors.
    pub fn train_batch(&mut self, images: &[u8], global: u64) -> Result<BatchStats> {
        if self.advcl.is_some() {
            return Err("AdvCL needs the batch's image indices: use train_batch_indexed".into());
        }
        let x = self.views_for(images, global)?;
        if self.cfg.method.is_acl_family() {
            return self.acl(&x, images, global);
        }
        match self.cfg.attack {
            AttackMode::None => self.standard(&x),
            AttackMode::Pgd => self.adversarial(&x, global),
            AttackMode::Free => self.free(&x),
        }
    }

    /// AdvCL: trains on the batch of training images `indices` (whose bytes are `images`) at
    /// batch index `global`; the indices select the pseudo-labels. Other methods ignore the
    /// indices.
    ///
    /// # Errors
    /// As [`Pretrainer::train_batch`].
    pub fn train_batch_indexed(
        &mut self,
        indices: &[usize],
        images: &[u8],
        global: u64,
    ) -> Result<BatchStats> {
        if self.advcl.is_none() {
            return self.train_batch(images, global);
        }
        self.advcl_step(indices, images, global)
    }

    /// AdvCL with faithful \[Q47\]: re-run the clean views' backbone forwards at every attack
    /// step (`true`) instead of replaying their effect on the running statistics (`false`, the
    /// default; the same bits but for the float rounding of those statistics). For tests.
    #[doc(hidden)]
    pub fn set_advcl_reforward(&mut self, on: bool) {
        if let Some(r) = &mut self.advcl {
            r.reforward = on;
        }
    }

    /// AdvCL's inputs of a batch: the weak "org" view `x_o` and its high-frequency component.
    ///
    /// # Errors
    /// Images that do not fit the generator, or tensor errors.
    pub fn advcl_org_views(&self, images: &[u8], global: u64) -> Result<(Tensor, Tensor)> {
        let run = self
            .advcl
            .as_ref()
            .ok_or("internal: AdvCL views for another method")?;
        let (h, w) = (self.images.h, self.images.w);
        let n = images.len() / (3 * h * w);
        let batch = ImageBatch::new(images, n, h, w)?;
        let v = run.org.generate(batch, run.org_seed, global)?;
        let shape = v.shape().to_vec();
        let xo = Tensor::from_vec(v.data, shape, &self.device)?;
        let hf = run.high_pass.apply(&xo)?;
        let hf = if self.cfg.faithful.q48 {
            hf
        } else {
            hf.clamp(0.0, 1.0)?
        };
        Ok((xo, hf))
    }

    /// The pseudo-labels `(B,)` U32 of the images `indices`, one tensor per set.
    fn pseudo_targets(&self, indices: &[usize]) -> Result<Vec<Tensor>> {
        let run = self
            .advcl
            .as_ref()
            .ok_or("internal: pseudo-labels for another method")?;
        run.labels
            .iter()
            .map(|l| {
                let v: Vec<u32> = indices.iter().map(|&i| l[i]).collect();
                Ok(Tensor::from_vec(v, indices.len(), &self.device)?)
            })
            .collect()
    }

    /// AdvCL's inputs of a batch of training images `indices` (bytes `images`) at batch
    /// index `global`.
    ///
    /// # Errors
    /// Images that do not fit the generators, or tensor errors.
    pub fn advcl_batch(&self, indices: &[usize], images: &[u8], global: u64) -> Result<AdvclBatch> {
        let x = self.views_for(images, global)?;
        let (x1, x2) = self.split_views(&x)?;
        let (xo, hf) = self.advcl_org_views(images, global)?;
        Ok(AdvclBatch {
            x1,
            x2,
            xo,
            hf,
            targets: self.pseudo_targets(indices)?,
        })
    }

    /// AdvCL's two attacks from `x_o` (METHODS.md 8.3), run jointly as one PGD on
    /// `[x_cl; x_ce]`: uniform start unclamped (\[Q48\]; clamped with it off), `pgd_steps`
    /// sign steps of `alpha`,
    /// the `eps` ball around `x_o` and the box; the objective
    /// `SupCon([z(x_cl; pgd), z(x1), z(x2), z(x_HF)]) + w · (1/|K|) Σ_K CE_sum(W_K f(x_ce;
    /// pgd_ce), ŷ_K)` with the model in train mode (the sum, \[Q46\], cannot change the sign
    /// steps: `x_ce`'s gradient comes from the cross-entropy alone). With \[Q47\] every step re-runs all five
    /// forwards, which update the running statistics; clean: the three clean views are
    /// embedded once and the running statistics are restored afterwards. Returns
    /// `(x_cl, x_ce)`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn advcl_attack(&self, batch: &AdvclBatch, global: u64) -> Result<(Tensor, Tensor)> {
        let Net::Advcl(model) = &self.net else {
            return Err("internal: AdvCL attack on another model".into());
        };
        let b = batch.xo.dim(0)?;
        let attacker = model.frozen()?;
        let saved = (!self.cfg.faithful.q47).then(|| self.bn_buffers());
        let once = match &saved {
            Some(_) => Some(advcl_clean_views(&attacker, batch)?),
            None => None,
        };
        // [Q47] faithful: the clean views' backbone forwards give the same batch statistics at
        // every step (same weights, same inputs), so they run once and the later steps apply
        // their effect on the `normal` running statistics in closed form (`replay`); the head,
        // whose one BN also sees x_cl, runs at every step in R-ADV's order.
        let replay = match (&once, self.advcl.as_ref().is_some_and(|r| r.reforward)) {
            (None, false) => Some(CleanReplay::new(&attacker, batch, &self.varmap)?),
            _ => None,
        };
        let calls = std::cell::Cell::new(0usize);
        let objective = |xa: &Tensor| -> candle::Result<Tensor> {
            let (x_cl, x_ce) = (xa.narrow(0, 0, b)?, xa.narrow(0, b, b)?);
            // R-ADV's order of forwards: x_cl, x_ce, x1, x2, x_HF
            let z_cl = attacker.embed(&x_cl, PGD_BRANCH, true)?;
            let f_ce = attacker.features(&x_ce, PGD_CE_BRANCH, true)?;
            let fresh;
            let clean = match (&once, &replay) {
                (Some(v), _) => v,
                (None, Some(r)) => {
                    if calls.get() > 0 {
                        r.step()?;
                    }
                    calls.set(calls.get() + 1);
                    fresh = r.embed(&attacker)?;
                    &fresh
                }
                (None, None) => {
                    fresh = advcl_clean_views(&attacker, batch)?;
                    &fresh
                }
            };
            Ok(self
                .advcl_terms(&attacker, &z_cl, &f_ce, clean, batch, true)?
                .0)
        };
        let cfg = PgdConfig {
            clamp_after_init: !self.cfg.faithful.q48,
            ..PgdConfig::new(Norm::Linf, self.cfg.eps, self.cfg.alpha, self.cfg.pgd_steps)
        };
        let mut rng = Rng::derive(self.cfg.seed, &[ATTACK_STREAM, global]);
        let start = Tensor::cat(&[&batch.xo, &batch.xo], 0)?;
        let adv = pgd(&start, objective, &cfg, &mut rng)?.adv;
        if let Some(saved) = saved {
            for (v, t) in saved {
                v.set(&t)?;
            }
        }
        Ok((adv.narrow(0, 0, b)?, adv.narrow(0, b, b)?))
    }

    /// AdvCL's objective from the embeddings, `(total, contrast, ce)`: `SupCon(τ, τ_b)` of the
    /// four views plus `ce_weight` times the mean over the pseudo-label sets of the
    /// cross-entropy (summed over the batch in the attack, `sum_ce`, \[Q46\]; the batch mean in
    /// training).
    fn advcl_terms(
        &self,
        model: &AdvclEncoder,
        z_cl: &Tensor,
        f_ce: &Tensor,
        clean: &[Tensor; 3],
        batch: &AdvclBatch,
        sum_ce: bool,
    ) -> candle::Result<(Tensor, Tensor, Tensor)> {
        let [z1, z2, zh] = clean;
        let z = Tensor::cat(&[z_cl, z1, z2, zh], 0)?;
        let contrast = supcon(&z, 4, self.cfg.temperature, self.cfg.base_temperature)?;
        let mut ce = contrast.zeros_like()?;
        for (l, y) in model.pseudo_logits(f_ce)?.iter().zip(&batch.targets) {
            let per = cross_entropy_per_example(l, y)?;
            ce = (ce
                + if sum_ce {
                    per.sum_all()?
                } else {
                    per.mean_all()?
                })?;
        }
        let ce = (ce / batch.targets.len() as f64)?;
        let total = (&contrast + (&ce * self.cfg.ce_weight)?)?;
        Ok((total, contrast, ce))
    }

    /// AdvCL's training loss at `(x_cl, x_ce)`, model in train mode (the forwards update the
    /// running statistics once each): `(loss, contrast, ce)`.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn advcl_loss(
        &self,
        batch: &AdvclBatch,
        x_cl: &Tensor,
        x_ce: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let Net::Advcl(model) = &self.net else {
            return Err("internal: AdvCL loss on another model".into());
        };
        let z_cl = model.embed(x_cl, PGD_BRANCH, true)?;
        let f_ce = model.features(x_ce, PGD_CE_BRANCH, true)?;
        let clean = advcl_clean_views(model, batch)?;
        Ok(self.advcl_terms(model, &z_cl, &f_ce, &clean, batch, false)?)
    }

    /// One AdvCL step (R-ADV `pretraining_advCL.py`, METHODS.md 8.3 and 8.4): the attacks, then
    /// the loss with the batch-mean cross-entropy and one SGD update.
    fn advcl_step(&mut self, indices: &[usize], images: &[u8], global: u64) -> Result<BatchStats> {
        let batch = self.advcl_batch(indices, images, global)?;
        let (x_cl, x_ce) = self.advcl_attack(&batch, global)?;
        let (loss, contrast, ce) = self.advcl_loss(&batch, &x_cl, &x_ce)?;
        let stats = self.finite(&loss, &[("contrast", contrast), ("pseudo_ce", ce)])?;
        let grads = loss.backward()?;
        self.update(&grads)?;
        Ok(stats)
    }

    /// The view-major views `(n_views · B, 3, 32, 32)` that [`Pretrainer::train_batch`]
    /// draws for these images at batch index `global`.
    ///
    /// # Errors
    /// Images that do not fit the generator.
    pub fn views_for(&self, images: &[u8], global: u64) -> Result<Tensor> {
        let (h, w) = (self.images.h, self.images.w);
        let n = images.len() / (3 * h * w);
        let batch = ImageBatch::new(images, n, h, w)?;
        let views = self.views.generate(batch, self.aug_seed, global)?;
        let shape = views.shape().to_vec();
        Ok(Tensor::from_vec(views.data, shape, &self.device)?)
    }

    /// The SSL loss of `x` (view-major, all views) or, for SimCLR, of `(x1, x2)`.
    fn ssl_loss(
        &self,
        enc: &Encoder,
        x1: &Tensor,
        x2: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<(&'static str, Tensor)>)> {
        match (self.cfg.method, x2) {
            (Method::EmpSsl, None) => {
                let (_, z) = enc.forward_t(x1, true)?;
                // a diverged model would only show up as a failed Cholesky in the TCR term
                let check = scalar(&z.sum_all()?)?;
                if !check.is_finite() {
                    return Err(format!(
                        "the loss is NaN: the embeddings are not finite at optimiser step {} (lr {:e})",
                        self.step,
                        self.sched.lr(self.sched_t())
                    )
                    .into());
                }
                let l = emp_loss(&z, self.cfg.n_views, &self.cfg.emp)?;
                Ok((l.total, vec![("invariance", l.invariance), ("tcr", l.tcr)]))
            }
            (Method::Simclr, Some(x2)) => {
                // two forwards: each view gets its own BN batch statistics (METHODS 3.1)
                let (_, z1) = enc.forward_t(x1, true)?;
                let (_, z2) = enc.forward_t(x2, true)?;
                let z = Tensor::cat(&[&z1, &z2], 0)?;
                Ok((
                    nt_xent(&z, self.cfg.temperature, self.cfg.base_temperature)?,
                    Vec::new(),
                ))
            }
            _ => Err("internal: views do not match the method".into()),
        }
    }

    /// CF-AMC-SSL's encoder.
    fn cf(&self) -> Result<&Encoder> {
        match &self.net {
            Net::Cf(e) => Ok(e),
            _ => Err("internal: SimCLR / EMP-SSL step on another model".into()),
        }
    }

    /// One ACL / AIR step (R-AIR `pretraining.py`): PGD on both views jointly through the
    /// `pgd` branch in eval mode, then `(1 − ω) ℓ_CL(natural, normal branch) + (1 + ω)
    /// ℓ_CL(adversarial, pgd branch)` (+ `λ₁ SIR + λ₂ AIR` for AIR, with the original images
    /// through the `normal` branch). Without an attack: ℓ_CL on the `normal` branch
    /// (R-AIR without `--ACL_DS`, \[Q30\]).
    fn acl(&mut self, x: &Tensor, images: &[u8], global: u64) -> Result<BatchStats> {
        let Net::Acl(model) = &self.net else {
            return Err("internal: ACL step on a CF-AMC model".into());
        };
        let tau = self.cfg.temperature;
        let cl = |z: &Tensor| nt_xent(z, tau, tau);
        let b = x.dim(0)? / 2;
        let (loss, terms) = if self.cfg.attack == AttackMode::None {
            let loss = cl(&model.embed(x, DEFAULT_BRANCH, true)?)?;
            (loss, Vec::new())
        } else {
            let pgd_cfg = PgdConfig {
                clamp_after_init: !self.cfg.faithful.q31,
                ..PgdConfig::new(Norm::Linf, self.cfg.eps, self.cfg.alpha, self.cfg.pgd_steps)
            };
            let mut rng = Rng::derive(self.cfg.seed, &[ATTACK_STREAM, global]);
            // R-AIR zeroes the parameter gradients after the attack: input gradients only
            let attacker = model.frozen()?;
            let objective = |xa: &Tensor| cl(&attacker.embed(xa, PGD_BRANCH, false)?);
            let adv = pgd(x, objective, &pgd_cfg, &mut rng)?.adv;
            let z = model.embed(x, DEFAULT_BRANCH, true)?;
            let za = model.embed(&adv, PGD_BRANCH, true)?;
            let omega = self.cfg.omega(self.epoch);
            let (nat, advl) = (cl(&z)?, cl(&za)?);
            // [Q43] DynACL-RCS halves the ACL loss; R-AIR does not
            let scale = if self.cfg.method == Method::Rcs && self.cfg.faithful.q43 {
                0.5
            } else {
                1.0
            };
            let mut loss = ((((&nat * (1.0 - omega))? + (&advl * (1.0 + omega))?)?) * scale)?;
            let mut terms = vec![("nat_cl", nat), ("adv_cl", advl)];
            if self.cfg.method == Method::Air {
                let (h, w) = (self.images.h, self.images.w);
                let xo = (Tensor::from_slice(images, (b, 3, h, w), &self.device)?
                    .to_dtype(DType::F32)?
                    / 255.0)?;
                let zo = model.embed(&xo, DEFAULT_BRANCH, true)?;
                let r = air_regularizers(
                    &z.narrow(0, 0, b)?,
                    &z.narrow(0, b, b)?,
                    &zo,
                    &za.narrow(0, 0, b)?,
                    &za.narrow(0, b, b)?,
                    tau,
                    self.cfg.faithful.q28,
                )?;
                loss = ((loss + (&r.sir * self.cfg.lambda1)?)? + (&r.air * self.cfg.lambda2)?)?;
                terms.push(("sir", r.sir));
                terms.push(("air", r.air));
            }
            (loss, terms)
        };
        let stats = self.finite(&loss, &terms)?;
        let grads = loss.backward()?;
        self.update(&grads)?;
        Ok(stats)
    }

    /// SimCLR's two views `(x1, x2)` of view-major `x`.
    fn split_views(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = x.dim(0)? / 2;
        Ok((x.narrow(0, 0, b)?, x.narrow(0, b, b)?))
    }

    fn finite(&self, loss: &Tensor, terms: &[(&'static str, Tensor)]) -> Result<BatchStats> {
        let value = scalar(loss)?;
        if !value.is_finite() {
            return Err(format!(
                "the loss is {value} at optimiser step {} (lr {:e})",
                self.step,
                self.sched.lr(self.sched_t())
            )
            .into());
        }
        let terms = terms
            .iter()
            .map(|(k, t)| Ok((*k, scalar(t)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(BatchStats { loss: value, terms })
    }

    /// One optimiser update at the current step's rate, then the scheduler step.
    fn update(&mut self, grads: &GradStore) -> Result<()> {
        self.opt.set_lr(self.sched.lr(self.sched_t()));
        self.opt.step(grads)?;
        self.step += 1;
        if let Some(r) = &mut self.rcs {
            r.batch += 1;
        }
        Ok(())
    }

    fn standard(&mut self, x: &Tensor) -> Result<BatchStats> {
        let (loss, terms) = match self.cfg.method {
            Method::EmpSsl => self.ssl_loss(self.cf()?, x, None)?,
            Method::Simclr | Method::Acl | Method::Air | Method::Rcs | Method::Advcl => {
                let (x1, x2) = self.split_views(x)?;
                self.ssl_loss(self.cf()?, &x1, Some(&x2))?
            }
        };
        let stats = self.finite(&loss, &terms)?;
        let grads = loss.backward()?;
        self.update(&grads)?;
        Ok(stats)
    }

    fn bn_buffers(&self) -> Vec<(Var, Tensor)> {
        named_vars(&self.varmap)
            .into_iter()
            .filter(|(name, _)| is_buffer(name))
            .map(|(_, v)| {
                let t = v.as_tensor().copy();
                (v, t)
            })
            .filter_map(|(v, t)| t.ok().map(|t| (v, t)))
            .collect()
    }

    fn adversarial(&mut self, x: &Tensor, global: u64) -> Result<BatchStats> {
        let cfg = PgdConfig {
            random_start: false,
            ..PgdConfig::new(Norm::Linf, self.cfg.eps, self.cfg.alpha, self.cfg.pgd_steps)
        };
        let mut rng = Rng::derive(self.cfg.seed, &[ATTACK_STREAM, global]);
        // [Q7] faithful: the attack runs on the live weights and its parameter gradients are
        // kept; clean: on a frozen copy (input gradient only).
        let attack_enc = if self.cfg.faithful.q7 {
            self.cf()?.clone()
        } else {
            self.cf()?.frozen()?
        };
        // [Q8] clean: the attack's train-mode forwards leave the running statistics alone.
        let saved = (!self.cfg.faithful.q8).then(|| self.bn_buffers());
        let (x1, target) = match self.cfg.method {
            Method::EmpSsl => (None, x.clone()),
            Method::Simclr | Method::Acl | Method::Air | Method::Rcs | Method::Advcl => {
                let (x1, x2) = self.split_views(x)?;
                (Some(x1), x2)
            }
        };
        let this = &*self;
        let objective = |xa: &Tensor| -> candle::Result<Tensor> {
            let r = match this.cfg.method {
                // EMP: all n·B views jointly
                Method::EmpSsl => this.ssl_loss(&attack_enc, xa, None),
                // SimCLR [Q9]: the clean second view against its own perturbed copy
                Method::Simclr | Method::Acl | Method::Air | Method::Rcs | Method::Advcl => {
                    this.ssl_loss(&attack_enc, &target, Some(xa))
                }
            };
            r.map(|(l, _)| l)
                .map_err(|e| candle::Error::Msg(e.to_string()))
        };
        let (adv, attack_grads) = if self.cfg.faithful.q7 {
            let (res, g) = pgd_accumulate(&target, objective, &cfg, &mut rng, &self.params)?;
            (res.adv, Some(g))
        } else {
            (pgd(&target, objective, &cfg, &mut rng)?.adv, None)
        };
        if let Some(saved) = saved {
            for (v, t) in saved {
                v.set(&t)?;
            }
        }
        let (loss, terms) = match &x1 {
            None => self.ssl_loss(self.cf()?, &adv, None)?,
            // training pairs the clean first view with the adversarial second view
            Some(x1) => self.ssl_loss(self.cf()?, x1, Some(&adv))?,
        };
        let stats = self.finite(&loss, &terms)?;
        let mut grads = loss.backward()?;
        if let Some(g) = attack_grads {
            grads.extend(g)?;
        }
        self.update(&grads)?;
        Ok(stats)
    }

    fn free(&mut self, x: &Tensor) -> Result<BatchStats> {
        let (x1, target) = match self.cfg.method {
            Method::EmpSsl => (None, x.clone()),
            Method::Simclr | Method::Acl | Method::Air | Method::Rcs | Method::Advcl => {
                let (x1, x2) = self.split_views(x)?;
                (Some(x1), x2)
            }
        };
        let mut fd = match self.free.take() {
            Some(fd) => fd,
            None => FreeDelta::zeros_like(&target, !self.cfg.faithful.q10)?,
        };
        fd.new_batch(&target)?;
        let mut last = None;
        for _ in 0..self.cfg.m {
            let (dv, xa) = fd.perturb(&target)?;
            let (loss, terms) = match &x1 {
                None => self.ssl_loss(self.cf()?, &xa, None)?,
                Some(x1) => self.ssl_loss(self.cf()?, x1, Some(&xa))?,
            };
            let stats = match self.finite(&loss, &terms) {
                Ok(s) => s,
                Err(e) => {
                    self.free = Some(fd);
                    return Err(e);
                }
            };
            let grads = loss.backward()?;
            self.update(&grads)?;
            let g = grads
                .get(dv.as_tensor())
                .ok_or("internal: no gradient reached the free-adversarial delta")?;
            fd.ascend(g, &target, self.cfg.eps, self.cfg.alpha)?;
            last = Some(stats);
        }
        self.free = Some(fd);
        last.ok_or_else(|| "m must be >= 1".into())
    }

    /// Writes the resumable state (weights, BN statistics, optimiser state, δ, counters,
    /// curve, and the progress of an unfinished epoch) atomically to `path`.
    ///
    /// # Errors
    /// I/O or tensor errors.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        self.write_state(path, self.partial.as_ref())
    }

    fn write_state(&self, path: &Path, partial: Option<&EpochProgress>) -> Result<()> {
        let mut extra = Vec::new();
        if let Some(p) = partial {
            extra.push((
                "meta/epoch_progress_json".into(),
                checkpoint::json_tensor(p)?,
            ));
        }
        if let Some(fd) = &self.free {
            extra.push(("free_delta".into(), fd.delta().clone()));
        }
        if let Some(c) = self.coreset() {
            let idx: Vec<i64> = c.iter().map(|&i| i as i64).collect();
            extra.push((
                "meta/rcs_coreset".into(),
                Tensor::new(idx.as_slice(), &Device::Cpu)?,
            ));
        }
        let counters = [self.epoch as i64, self.step as i64];
        extra.push((
            "meta/counters".into(),
            Tensor::new(&counters, &Device::Cpu)?,
        ));
        extra.push((
            "meta/curve_json".into(),
            checkpoint::json_tensor(&self.curve)?,
        ));
        let at = checkpoint::ResumePoint {
            batches_done: partial.map_or(0, |p| p.batches),
            ..self.resume_point()
        };
        TrainState::save(path, &named_vars(&self.varmap), self.opt.state(), extra, at)?;
        Ok(())
    }

    /// Restores [`Pretrainer::save_state`] into this (freshly built) trainer, all or nothing:
    /// every part of the file is read and checked before anything is changed, so on an error
    /// the trainer is still the fresh one.
    ///
    /// # Errors
    /// A state file that does not match this model, or I/O errors (naming the file).
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let s = TrainState::load(path, &self.device)?;
        let plan = s.vars(&named_vars(&self.varmap))?;
        let coreset = match (&self.rcs, s.get("meta/rcs_coreset")) {
            (Some(_), Some(c)) => {
                let idx = c.to_device(&Device::Cpu)?.to_vec1::<i64>()?;
                let n = self.images.n;
                Some(
                    idx.iter()
                        .map(|&i| usize::try_from(i).ok().filter(|&i| i < n))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            s.error("meta/rcs_coreset indexes outside the training set")
                        })?,
                )
            }
            _ => None,
        };
        let counters = s
            .tensor("meta/counters")?
            .to_device(&Device::Cpu)?
            .to_vec1::<i64>()?;
        let [epoch, step] = counters[..] else {
            return Err(s.error("meta/counters is not [epoch, step]").into());
        };
        let (epoch, step) = (usize::try_from(epoch)?, usize::try_from(step)?);
        let curve: Vec<EpochStats> = s.json("meta/curve_json")?;
        let partial: Option<EpochProgress> = match s.get("meta/epoch_progress_json") {
            Some(_) => Some(s.json("meta/epoch_progress_json")?),
            None => None,
        };
        if let Some(p) = &partial {
            // an RCS epoch's length is known once its set is (checked when it starts)
            if epoch >= self.cfg.run_epochs() || (self.rcs.is_none() && p.batches >= self.iters) {
                return Err(s
                    .error(format!(
                        "batch {} of epoch {} does not fit a run of {} epochs of {} batches",
                        p.batches,
                        epoch + 1,
                        self.cfg.run_epochs(),
                        self.iters
                    ))
                    .into());
            }
        }
        if epoch > self.cfg.run_epochs() || curve.len() != epoch {
            return Err(s
                .error(format!(
                    "epoch {epoch} with {} curve entries does not fit a run of {} epochs",
                    curve.len(),
                    self.cfg.run_epochs()
                ))
                .into());
        }
        // the optimiser checks every buffer before it changes any
        self.opt
            .load_state(&s.optim())
            .map_err(|e| s.error(format!("optimiser state: {e}")))?;
        checkpoint::set_vars(plan)?;
        self.free = s
            .get("free_delta")
            .map(|d| FreeDelta::from_tensor(d, !self.cfg.faithful.q10));
        if let (Some(r), Some(c)) = (&mut self.rcs, coreset) {
            r.coreset = Some(c);
        }
        self.epoch = epoch;
        self.step = step;
        self.curve = curve;
        self.partial = partial;
        Ok(())
    }

    /// Writes the encoder checkpoint (every variable: backbone, heads, BN statistics).
    ///
    /// # Errors
    /// I/O errors.
    pub fn save_encoder(&self, path: &Path) -> Result<()> {
        checkpoint::save(&self.varmap, path, "")?;
        Ok(())
    }

    /// The `metrics.json` of the run so far.
    pub fn metrics(&self, device: &str) -> serde_json::Value {
        super::metrics_json(&self.cfg, &self.curve, self.step, self.images.n, device)
    }
}

impl checkpoint::Resumable for Pretrainer<'_> {
    fn resume_from(&mut self, path: &Path) -> Result<checkpoint::ResumePoint> {
        self.load_state(path)?;
        Ok(self.resume_point())
    }

    fn checkpoint_to(&mut self, path: PathBuf, every: Duration) {
        self.checkpoint = Some(checkpoint::Cadence::new(path, every));
    }
}

/// One row of `pipe bench pretrain`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// `simclr` / `emp_ssl`.
    pub method: Method,
    /// `none` / `pgd` / `free`.
    pub attack: AttackMode,
    /// ResNet width.
    pub width: usize,
    /// Source images per batch.
    pub batch: usize,
    /// Views per image.
    pub n_views: usize,
    /// Median seconds per batch (all `m` replays in free mode).
    pub seconds_per_batch: f64,
    /// Source images per second.
    pub images_per_second: f64,
    /// Projected wall time of one 50,000-image CIFAR-10 epoch (`⌊50000/B⌋` batches; the ACL
    /// family's `⌈50000/B⌉`), seconds.
    pub cifar10_epoch_seconds: f64,
    /// Seconds to write the training state once ([`Pretrainer::save_state`], the cost of a
    /// mid-epoch checkpoint).
    pub state_write_seconds: f64,
    /// Its size in bytes.
    pub state_bytes: u64,
}

/// Times `steps` batches (after one warm-up batch) of a pretraining mode at full head sizes
/// (4096-d `pre_feature`, default `z_dim`) on synthetic 32×32 images, on `device`.
///
/// # Errors
/// Invalid settings, a device that does not open, or tensor errors.
pub fn bench_mode(cfg: PretrainConfig, steps: usize, device: DeviceSpec) -> Result<BenchRow> {
    let steps = steps.max(1);
    let device = device.open()?;
    let d = crate::data::synthetic(&crate::data::SyntheticConfig {
        n_classes: 10,
        n_train: cfg.batch_size * (steps + 1),
        n_test: 10,
        image_size: 32,
        seed: 0,
    });
    let mut t = if cfg.method == Method::Advcl {
        // R-ADV's five pseudo-label heads, with labels that cycle through the classes
        let ks = crate::kinds::pseudo_labels::ADVCL_KS;
        let labels = ks
            .iter()
            .map(|&k| (0..d.train.n).map(|i| (i % k) as u32).collect())
            .collect();
        Pretrainer::advcl(cfg, &d.train, &ks, labels, &device)?
    } else {
        Pretrainer::new(cfg, &d.train, &device)?
    };
    let mut times = Vec::with_capacity(steps);
    for b in 0..=steps {
        let indices = t.batch_indices(0, b);
        let images = t.batch_images(0, b);
        let start = Instant::now();
        t.train_batch_indexed(&indices, &images, b as u64)?;
        if b > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    let state = std::env::temp_dir().join(format!("pipe-bench-state-{}", std::process::id()));
    let start = Instant::now();
    let written = t.save_state(&state);
    let state_write_seconds = start.elapsed().as_secs_f64();
    let state_bytes = std::fs::metadata(&state).map_or(0, |m| m.len());
    let _ = std::fs::remove_file(&state);
    written?;
    let c = t.config();
    let ips = c.batch_size as f64 / secs;
    Ok(BenchRow {
        method: c.method,
        attack: c.attack,
        width: c.width,
        batch: c.batch_size,
        n_views: c.n_views,
        seconds_per_batch: secs,
        images_per_second: ips,
        cifar10_epoch_seconds: c.iters_per_epoch(50_000) as f64 * secs,
        state_write_seconds,
        state_bytes,
    })
}
