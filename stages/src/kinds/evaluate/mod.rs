//! `evaluate`: clean and PGD accuracy of a classifier on the test split (METHODS.md 11.1
//! "Paper table metrics", 11.2, 11.3), and its accuracy on a stored adversarial set.
//!
//! # Inputs
//!
//! - `model` (required): a classifier artifact, `classifier.safetensors` + `classifier.json`
//!   ([`crate::nn::classifier`], what `finetune` writes).
//! - `dataset` (required): a dataset artifact; its test split is evaluated.
//! - `adversarial` (optional): an `attack_dataset` artifact
//!   ([`crate::data::adversarial`]); the classifier's accuracy on its stored images is reported
//!   as `transfer_acc` (a transfer attack when the set was made against another model).
//! - `ssl_head` (optional): an `ssl_head` artifact, the head the `defense` reverses with
//!   ([`defense`]; required by the reverse defence, refused without `defense`).
//!
//! # Params
//!
//! | param | default | meaning |
//! |---|---|---|
//! | `attacks` | `[{eps: 4/255}, {eps: 8/255}]` (l_inf) | the PGD attacks, one accuracy each (below) |
//! | `preset` | `sound` | fills `alpha`, `steps`, `random_start` of the attacks that leave them out |
//! | `test_subset` | all | a seeded balanced subset of this many test images per class |
//! | `batch_size` | 100 | test images per batch (an n-crop head forwards `n_views` times as many rows) |
//! | `seed` | 0 | random starts, n-crop views and the subset |
//! | `device` | `auto` | `auto`, `cpu` or `cuda:N` (the backend is keyed, the ordinal is not) |
//! | `autoattack` | none | AutoAttack runs, one accuracy each (below) |
//! | `defense` | none | the test-time reverse attack (or random noise) on the clean and every PGD attack's images ([`defense`]) |
//!
//! Each attack is `{norm, eps, alpha, steps, random_start, restarts}`: `norm` is `linf`
//! (default), `l2` or `l1`; `eps` is required; `eps` and `alpha` accept fractions (`8/255`);
//! `restarts` defaults to 1 (per example the restart with the highest final cross-entropy is
//! kept). What an attack leaves out comes from the preset:
//!
//! | preset | `steps` | `alpha` | `random_start` | reference |
//! |---|---|---|---|---|
//! | `faithful_emp` | 2 | 0.01 | false | R-CF's EMP evaluation script (\[Q12\]) |
//! | `faithful_simclr` | 20 | 0.01 | false | R-CF's SimCLR evaluation script |
//! | `sound` | 20 | ε/4 | true | PGD-20 with a random start |
//! | `custom` | — | — | — | every attack must give all three |
//!
//! The PGD is METHODS.md 2.5 ([`crate::nn::attacks::pgd`]): l_inf sign steps, l_2 / l_1
//! normalised steps, projection onto the ε-ball and the box `[0, 1]` after every step, the last
//! iterate. The l_1 start is always zero.
//!
//! Params are canonicalized before keying: the preset is applied and then dropped, every
//! attack field is written out, `random_start` is `false` where it cannot matter (l_1, ε = 0),
//! and the attacks are sorted by (norm, ε). Equivalent configs therefore share one node: a
//! `sound` preset and a `custom` list with the same values key alike. Two attacks with the same
//! norm and ε would share one metric name and are refused: compare settings with one
//! `evaluate` node per setting (a sweep over `preset`, say).
//!
//! `autoattack` is a list of l_inf AutoAttack runs (METHODS.md 11.4, [`crate::nn::autoattack`]),
//! each `{eps, version, attacks, apgd_iters, fab_iters, square_queries, square_rescale,
//! n_target_classes}`: `eps` is required; `version` (`original`, the default: R-AA's standard
//! version, APGD and FAB 100 iterations, 9 targets, Square on its unscaled schedule; or
//! `torchattacks`: APGD and FAB 10 iterations, every other class a target (`all`), Square's
//! schedule rescaled, what R-CF ran) fills the rest, which may also be given one by one
//! (`n_target_classes` a number or `all`); `attacks` (default all four, in order: `apgd-ce`, `apgd-t`, `fab-t`,
//! `square`) runs a subset, as R-AA's `attacks_to_run`. Canonicalization writes every field out
//! and drops `version`, so equivalent runs key alike; a node without `autoattack` keys as
//! before the param existed. AutoAttack needs a full-image classifier.
//!
//! # What is measured
//!
//! End to end through encoder and head in eval mode (BN running statistics, no update), PGD
//! maximising the cross-entropy, on the test split (or the subset), in batches:
//!
//! - a full-image classifier: the logits of the 32×32 images;
//! - an n-crop classifier (`ncrop` in its spec, METHODS.md 11.1a): for each test image
//!   `n_views` views are drawn by the EMP view generator with the spec's scale and ratio
//!   (seeded by `seed` and the batch index), the head sees the mean feature of the views, and
//!   the attack perturbs all views jointly through that averaging (every view within ε in
//!   its norm). The clean accuracy and every attack use the same views.
//!
//! The random start of attack `a` on batch `k` draws from `Rng::derive(seed, [.., norm, ε, k])`,
//! so adding or removing another attack does not change an attack's result.
//!
//! The stored images of `adversarial` go through the full-image forward (an n-crop
//! classifier's head on the whole image's feature, like R-CF's EMP suite item 3): the stored
//! images are the attacked inputs themselves, and the view generator would round their
//! perturbation to u8. When the dataset's test split is the set's source (same indices and
//! labels), the accuracy on the clean originals of the same images is reported too.
//!
//! # Outputs
//!
//! `metrics.json`, accuracies as fractions in `[0, 1]`:
//! - `clean_acc`;
//! - one accuracy per attack named `pgd_<norm>_<eps>_acc`, ε printed as `k/255` when `255·ε`
//!   is an integer (within 1e-9), else as a decimal: `pgd_linf_8/255_acc`, `pgd_l2_0.5_acc`;
//! - `attacks`: each such name → its resolved config `{norm, eps, alpha, steps, random_start,
//!   restarts}`;
//! - `n_test`, `head` (`full_image` or `ncrop`), `n_views` (n-crop), `seconds`, `device`;
//! - one accuracy per AutoAttack run named `aa_linf_<eps>_acc` (`aa_linf_8/255_acc`), and
//!   `autoattack`: each such name → its resolved config and `after`, the robust accuracy after
//!   each of its attacks in order (R-AA's running log);
//! - with `adversarial`: `transfer_acc`, `transfer_n`, `transfer_attack` (the set's config) and,
//!   when the originals are found, `transfer_clean_acc`.
//!
//! # Crashes
//!
//! Every finished batch (of the clean / PGD / AutoAttack pass, of each defence-aware attack,
//! of each set's reversal) is recorded in the node's scratch folder ([`crate::journal`]); a
//! run of the same key after a crash or Ctrl-C replays them and computes only the rest, with
//! the numbers of an uninterrupted run. The log says how many batches were replayed.
//!
//! `VERSION` 2: APGD's first step-size checkpoint halves η only where the loss oscillated, as
//! R-AA's (`reduced_last_check` starts as ones); version 1 also halved it where the best loss
//! had not risen, so its AutoAttack accuracies differ.

pub mod defense;
mod runner;

pub use defense::{DefenseParam, DefenseSpec};
pub use runner::{
    AaCounts, AttackSpec, BenchRow, Error, EvalConfig, EvalReport, Hooks, OnAdversarial,
    TransferReport, batch_tensor, bench, count_correct, evaluate, evaluate_transfer, evaluate_with,
    format_radius, metrics_json, norm_name, subset_indices,
};

use std::time::Instant;

use pipe_engine::{
    BoxError, NormalizeCtx, ParamError, Resources, Slot, Slots, StageCtx, TypedStage,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::adversarial::{ADVERSARIAL_FILE, AdversarialSet};
use crate::data::{self, tensor_io::DATA_FILE};
use crate::device::DeviceSpec;
use crate::journal::Journal;
use crate::nn::attacks::Norm;
use crate::nn::autoattack::{AaAttack, AaConfig, TargetClasses};
use crate::nn::classifier::{Classifier, SPEC_FILE, WEIGHTS_FILE};
use crate::params::{Checks, de_real, de_real_opt};

/// The `evaluate` kind.
pub struct Evaluate;

/// How attacks that leave `alpha`, `steps` or `random_start` out are completed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// 2 steps, α = 0.01, no random start (R-CF EMP script).
    FaithfulEmp,
    /// 20 steps, α = 0.01, no random start (R-CF SimCLR script).
    FaithfulSimclr,
    /// 20 steps, α = ε/4, random start.
    #[default]
    Sound,
    /// Nothing: every attack gives all fields.
    Custom,
}

impl Preset {
    /// `(steps, alpha, random_start)` for radius `eps`; `None` for [`Preset::Custom`].
    pub fn values(self, eps: f64) -> Option<(usize, f64, bool)> {
        match self {
            Preset::FaithfulEmp => Some((2, 0.01, false)),
            Preset::FaithfulSimclr => Some((20, 0.01, false)),
            Preset::Sound => Some((20, eps / 4.0, true)),
            Preset::Custom => None,
        }
    }
}

fn one() -> usize {
    1
}

/// One attack as written (fields left out come from the preset).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackParam {
    /// `linf`, `l2` or `l1`.
    #[serde(default)]
    pub norm: Norm,
    /// Radius ε.
    #[serde(deserialize_with = "de_real")]
    pub eps: f64,
    /// Step α.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub alpha: Option<f64>,
    /// Gradient steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Random start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub random_start: Option<bool>,
    /// Restarts.
    #[serde(default = "one")]
    pub restarts: usize,
}

impl AttackParam {
    /// The attack with the preset's values where this one leaves them out; `Err` names the
    /// first field that is still missing (only with [`Preset::Custom`]).
    ///
    /// # Errors
    /// The name of the missing field.
    pub fn resolve(&self, preset: Preset) -> Result<AttackSpec, &'static str> {
        let fill = preset.values(self.eps);
        let steps = self.steps.or(fill.map(|f| f.0)).ok_or("steps")?;
        let alpha = self.alpha.or(fill.map(|f| f.1)).ok_or("alpha")?;
        let random_start = self
            .random_start
            .or(fill.map(|f| f.2))
            .ok_or("random_start")?;
        Ok(AttackSpec {
            norm: self.norm,
            eps: self.eps,
            alpha,
            steps,
            // zero start either way: keyed alike
            random_start: random_start && self.norm != Norm::L1 && self.eps != 0.0,
            restarts: self.restarts,
        })
    }
}

impl From<AttackSpec> for AttackParam {
    fn from(s: AttackSpec) -> Self {
        AttackParam {
            norm: s.norm,
            eps: s.eps,
            alpha: Some(s.alpha),
            steps: Some(s.steps),
            random_start: Some(s.random_start),
            restarts: s.restarts,
        }
    }
}

fn default_attacks() -> Vec<AttackParam> {
    [4.0, 8.0]
        .into_iter()
        .map(|k| AttackParam {
            norm: Norm::Linf,
            eps: k / 255.0,
            alpha: None,
            steps: None,
            random_start: None,
            restarts: 1,
        })
        .collect()
}

fn default_batch() -> usize {
    100
}

/// The AutoAttack version whose values complete a run ([`AaConfig::original`],
/// [`AaConfig::torchattacks`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AaVersion {
    /// R-AA's standard version.
    #[default]
    Original,
    /// The standard version as torchattacks runs it.
    Torchattacks,
}

/// One AutoAttack run as written (fields left out come from `version`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoAttackParam {
    /// Radius ε (l_inf).
    #[serde(deserialize_with = "de_real")]
    pub eps: f64,
    /// Completes the rest (dropped by canonicalization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<AaVersion>,
    /// The attacks, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attacks: Option<Vec<AaAttack>>,
    /// APGD iterations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apgd_iters: Option<usize>,
    /// FAB iterations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fab_iters: Option<usize>,
    /// Square queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub square_queries: Option<usize>,
    /// Square's schedule rescaled to its queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub square_rescale: Option<bool>,
    /// Targets of APGD-T and FAB-T: a number or `all`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_target_classes: Option<TargetClasses>,
}

impl AutoAttackParam {
    /// The run completed by its version.
    pub fn resolve(&self) -> AaConfig {
        let base = match self.version.unwrap_or_default() {
            AaVersion::Original => AaConfig::original(self.eps),
            AaVersion::Torchattacks => AaConfig::torchattacks(self.eps),
        };
        AaConfig {
            eps: self.eps,
            attacks: self.attacks.clone().unwrap_or(base.attacks),
            apgd_iters: self.apgd_iters.unwrap_or(base.apgd_iters),
            fab_iters: self.fab_iters.unwrap_or(base.fab_iters),
            square_queries: self.square_queries.unwrap_or(base.square_queries),
            square_rescale: self.square_rescale.unwrap_or(base.square_rescale),
            n_target_classes: self.n_target_classes.unwrap_or(base.n_target_classes),
        }
    }
}

impl From<AaConfig> for AutoAttackParam {
    fn from(c: AaConfig) -> Self {
        AutoAttackParam {
            eps: c.eps,
            version: None,
            attacks: Some(c.attacks),
            apgd_iters: Some(c.apgd_iters),
            fab_iters: Some(c.fab_iters),
            square_queries: Some(c.square_queries),
            square_rescale: Some(c.square_rescale),
            n_target_classes: Some(c.n_target_classes),
        }
    }
}

/// `aa_linf_8/255_acc`.
pub fn aa_metric(eps: f64) -> String {
    format!("aa_linf_{}_acc", format_radius(eps))
}

/// Params of `evaluate` (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    /// The attacks.
    #[serde(default = "default_attacks")]
    pub attacks: Vec<AttackParam>,
    /// Completes the attacks (`sound` when left out; dropped by canonicalization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// Test images per class (a seeded balanced subset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_subset: Option<usize>,
    /// Test images per batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Seed.
    #[serde(default)]
    pub seed: u64,
    /// Device.
    #[serde(default)]
    pub device: DeviceSpec,
    /// AutoAttack runs (none unless asked for: absent from the key then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub autoattack: Vec<AutoAttackParam>,
    /// The test-time defence ([`defense`]; none unless asked for: absent from the key then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defense: Option<DefenseParam>,
}

fn norm_rank(n: Norm) -> u8 {
    match n {
        Norm::Linf => 0,
        Norm::L2 => 1,
        Norm::L1 => 2,
    }
}

impl EvaluateParams {
    /// The attacks completed by the preset, in the written order; errors name the field
    /// (`attacks[1].alpha`).
    ///
    /// # Errors
    /// An attack that leaves a field out under `preset: custom`.
    pub fn resolved(&self) -> Result<Vec<AttackSpec>, Vec<ParamError>> {
        let preset = self.preset.unwrap_or_default();
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for (i, a) in self.attacks.iter().enumerate() {
            match a.resolve(preset) {
                Ok(s) => out.push(s),
                Err(field) => errors.push(ParamError::new(
                    format!("attacks[{i}].{field}"),
                    "preset `custom` needs alpha, steps and random_start in every attack (or use faithful_emp, faithful_simclr, sound)",
                )),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    /// The canonical form that is keyed (see the module docs).
    ///
    /// # Errors
    /// As [`EvaluateParams::resolved`].
    pub fn canonical(&self) -> Result<EvaluateParams, Vec<ParamError>> {
        let mut attacks = self.resolved()?;
        attacks.sort_by(|a, b| {
            norm_rank(a.norm)
                .cmp(&norm_rank(b.norm))
                .then(a.eps.total_cmp(&b.eps))
        });
        let mut aa: Vec<AaConfig> = self
            .autoattack
            .iter()
            .map(AutoAttackParam::resolve)
            .collect();
        aa.sort_by(|a, b| a.eps.total_cmp(&b.eps));
        Ok(EvaluateParams {
            attacks: attacks.into_iter().map(AttackParam::from).collect(),
            preset: None,
            autoattack: aa.into_iter().map(AutoAttackParam::from).collect(),
            defense: self.defense.as_ref().map(DefenseParam::canonical),
            ..self.clone()
        })
    }

    /// The evaluation config (the attacks resolved, in the written order).
    ///
    /// # Errors
    /// As [`EvaluateParams::resolved`].
    pub fn config(&self) -> Result<EvalConfig, Vec<ParamError>> {
        Ok(EvalConfig {
            attacks: self.resolved()?,
            autoattack: self
                .autoattack
                .iter()
                .map(AutoAttackParam::resolve)
                .collect(),
            batch_size: self.batch_size,
            seed: self.seed,
        })
    }
}

/// Range checks of one attack at `path` (`attacks[0]`, or `""` for top-level fields).
///
/// Pixels live in `[0, 1]`, so an l_inf radius or step outside `[0, 1]` is a mistake (a
/// radius written in pixel units, `8` for `8/255`). An l_2 or l_1 radius may exceed 1 (l_1
/// radii of 12 are usual) and only has to be a finite number >= 0.
pub(crate) fn check_attack(
    e: &mut Checks,
    path: &str,
    norm: Norm,
    eps: f64,
    alpha: Option<f64>,
    restarts: usize,
) {
    let at = |f: &str| {
        if path.is_empty() {
            f.to_string()
        } else {
            format!("{path}.{f}")
        }
    };
    if norm == Norm::Linf {
        e.within(&at("eps"), eps, 0.0, 1.0);
        if let Some(a) = alpha {
            e.within(&at("alpha"), a, 0.0, 1.0);
        }
    } else {
        e.non_negative(&at("eps"), eps);
        if let Some(a) = alpha {
            e.non_negative(&at("alpha"), a);
        }
    }
    e.positive(&at("restarts"), restarts);
}

/// Loads the classifier of the `model` input.
pub(crate) fn load_model(
    ctx: &StageCtx<'_>,
    device: &candle::Device,
) -> Result<Classifier, BoxError> {
    let file = |name: &str| crate::params::input_file(ctx, "model", name, "finetune");
    let (_vm, clf) = Classifier::load(&file(WEIGHTS_FILE)?, &file(SPEC_FILE)?, device)?;
    Ok(clf)
}

/// What is wrong with connecting (`given`) or not an `ssl_head` input for a defence of
/// `method` (`None`: no defence), as a [`TypedStage::check_inputs`] error.
fn ssl_head_misuse(method: Option<defense::DefenseMethod>, given: bool) -> Option<ParamError> {
    use defense::DefenseMethod::{Random, Reverse};
    match (method, given) {
        (None, true) => Some(ParamError::new(
            "inputs.ssl_head",
            "an `ssl_head` input is only read by the `defense` param; add `defense: {}` (R-MAO's reversal) or remove the input",
        )),
        (Some(Random), true) => Some(ParamError::new(
            "inputs.ssl_head",
            "`defense.method: random` reads no `ssl_head` input; remove it",
        )),
        (Some(Reverse), false) => Some(ParamError::new(
            "inputs",
            "`defense` reverses with an SSL head: add an `ssl_head` input (an `ssl_head` stage trained on this classifier)",
        )),
        _ => None,
    }
}

/// The `ssl_head` input, checked against the defence and the classifier.
fn load_ssl_head(
    ctx: &StageCtx<'_>,
    clf: &Classifier,
    defense: Option<&DefenseSpec>,
    device: &candle::Device,
) -> Result<Option<crate::nn::defense::SslHead>, BoxError> {
    use crate::kinds::ssl_head::{HEAD_FILE, HEAD_SPEC_FILE, load_head};
    let given = !ctx.inputs("ssl_head").is_empty();
    if let Some(e) = ssl_head_misuse(defense.map(|d| d.method), given) {
        return Err(e.message.into());
    }
    match defense {
        None => Ok(None),
        Some(d) if d.method == defense::DefenseMethod::Random => Ok(None),
        Some(_) => {
            if clf.spec().ncrop.is_some() {
                return Err(
                    "the defence needs a full-image classifier; this one has an n-crop head".into(),
                );
            }
            let file = |name: &str| crate::params::input_file(ctx, "ssl_head", name, "ssl_head");
            let spec_path = file(HEAD_SPEC_FILE)?;
            let (head, cfg) = load_head(&file(HEAD_FILE)?, &spec_path, device)?;
            if cfg.in_dim != clf.spec().feature_dim() {
                return Err(format!(
                    "the SSL head reads {}-d features but the classifier's are {}-d ({}): was it trained on another classifier?",
                    cfg.in_dim,
                    clf.spec().feature_dim(),
                    spec_path.display()
                )
                .into());
            }
            Ok(Some(head))
        }
    }
}

/// Loads the `dataset` input and checks that the classifier has its number of classes.
pub(crate) fn load_data(ctx: &StageCtx<'_>, clf: &Classifier) -> Result<data::Dataset, BoxError> {
    let path = crate::params::input_file(ctx, "dataset", DATA_FILE, "dataset")?;
    let d = data::load_dataset(&path)?;
    if clf.spec().classes != d.classes.len() {
        return Err(format!(
            "the classifier has {} classes but the dataset {} ({})",
            clf.spec().classes,
            d.classes.len(),
            path.display()
        )
        .into());
    }
    Ok(d)
}

impl TypedStage for Evaluate {
    const KIND: &'static str = "evaluate";
    const VERSION: u32 = 2;
    type Params = EvaluateParams;

    fn inputs() -> Slots {
        const S: &[Slot] = &[
            Slot::required("model"),
            Slot::required("dataset"),
            Slot::optional("adversarial"),
            Slot::optional("ssl_head"),
        ];
        Slots::Fixed(S)
    }

    fn check(p: &EvaluateParams) -> Vec<ParamError> {
        let mut e = Checks::default();
        for (i, a) in p.attacks.iter().enumerate() {
            check_attack(
                &mut e,
                &format!("attacks[{i}]"),
                a.norm,
                a.eps,
                a.alpha,
                a.restarts,
            );
        }
        for (i, a) in p.autoattack.iter().enumerate() {
            let at = |f: &str| format!("autoattack[{i}].{f}");
            e.within(&at("eps"), a.eps, 0.0, 1.0);
            let c = a.resolve();
            e.require(!c.attacks.is_empty(), &at("attacks"), || {
                "name at least one of apgd-ce, apgd-t, fab-t, square".to_string()
            });
            let mut names = c.attacks.clone();
            names.sort_unstable();
            names.dedup();
            e.require(names.len() == c.attacks.len(), &at("attacks"), || {
                "an attack is listed twice".to_string()
            });
            e.positive(&at("apgd_iters"), c.apgd_iters);
            e.positive(&at("fab_iters"), c.fab_iters);
            e.positive(&at("square_queries"), c.square_queries);
            e.require(
                c.n_target_classes != TargetClasses::Count(0),
                &at("n_target_classes"),
                || "must be at least 1 (or `all`)".to_string(),
            );
            if let Some(j) = p.autoattack[..i]
                .iter()
                .position(|o| aa_metric(o.eps) == aa_metric(a.eps))
            {
                e.require(false, &format!("autoattack[{i}]"), || {
                    format!(
                        "same eps as autoattack[{j}] (both would be reported as `{}`)",
                        aa_metric(a.eps)
                    )
                });
            }
        }
        e.positive("batch_size", p.batch_size);
        if let Some(d) = &p.defense {
            d.check(&mut e);
        }
        if let Some(k) = p.test_subset {
            e.positive("test_subset", k);
        }
        e.device(p.device);
        let mut errors = e.into_errors();
        match p.resolved() {
            Err(more) => errors.extend(more),
            Ok(specs) => {
                for (i, s) in specs.iter().enumerate() {
                    if let Some(j) = specs[..i].iter().position(|o| o.metric() == s.metric()) {
                        errors.push(ParamError::new(
                            format!("attacks[{i}]"),
                            format!(
                                "same norm and eps as attacks[{j}] (both would be reported as `{}`); evaluate other settings in another evaluate node (e.g. sweep `preset`)",
                                s.metric()
                            ),
                        ));
                    }
                }
            }
        }
        errors
    }

    fn canonicalize(
        p: EvaluateParams,
        _ctx: &NormalizeCtx<'_>,
    ) -> Result<EvaluateParams, Vec<ParamError>> {
        p.canonical()
    }

    fn check_inputs(p: &EvaluateParams, connected: &[&str]) -> Vec<ParamError> {
        let method = p.defense.as_ref().map(|d| d.method);
        ssl_head_misuse(method, connected.contains(&"ssl_head"))
            .into_iter()
            .collect()
    }

    fn key_params(p: &EvaluateParams) -> Value {
        crate::params::key_with_backend(p, p.device)
    }

    fn outputs(_: &EvaluateParams) -> Vec<String> {
        vec!["metrics.json".into()]
    }

    fn resources(p: &EvaluateParams) -> Resources {
        crate::params::device_resources(p.device)
    }

    fn explain_failure(params: &serde_json::Value, message: &str) -> Option<String> {
        crate::device::out_of_memory_hint(
            params,
            message,
            &["batch_size", "defense.batch_size", "defense.views"],
        )
    }

    fn run(p: &EvaluateParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        let ctx = &*ctx;
        let start = Instant::now();
        let cfg = p.config().map_err(|e| format!("{e:?}"))?;
        let device = p.device.open()?;
        let clf = load_model(ctx, &device)?;
        let dataset = load_data(ctx, &clf)?;
        let adversarial = match ctx.inputs("adversarial") {
            [] => None,
            [one] => {
                let path = one.file(ADVERSARIAL_FILE).map_err(|e| {
                    format!("the `adversarial` input has no {ADVERSARIAL_FILE} (is it an `attack_dataset` stage?): {e}")
                })?;
                let set = AdversarialSet::load(&path)?;
                if set.classes.len() != clf.spec().classes {
                    return Err(format!(
                        "the adversarial set has {} classes but the classifier {}",
                        set.classes.len(),
                        clf.spec().classes
                    )
                    .into());
                }
                Some(set)
            }
            many => {
                return Err(format!(
                    "input `adversarial` holds {} artifacts, expected one",
                    many.len()
                )
                .into());
            }
        };
        let subset;
        let test = match p.test_subset {
            Some(k) => {
                let idx = subset_indices(&dataset.test, &dataset.classes, Some(k), p.seed)?;
                subset = dataset.test.select(&idx);
                &subset
            }
            None => &dataset.test,
        };
        ctx.log(format!(
            "evaluating {} test images ({} head) under {} attack(s){}",
            test.n,
            if clf.spec().ncrop.is_some() {
                "n-crop"
            } else {
                "full-image"
            },
            cfg.attacks.len(),
            match cfg.autoattack.len() {
                0 => String::new(),
                n => format!(" and {n} AutoAttack run(s)"),
            }
        ));
        let progress = |done: u64, total: u64, msg: &str| ctx.progress(done, total, msg);
        let log = |msg: &str| ctx.log(msg);
        let cancelled = || ctx.is_cancelled();
        let hooks = Hooks {
            progress: &progress,
            log: &log,
            cancelled: &cancelled,
        };
        let defense = p.defense.as_ref().map(DefenseParam::resolve);
        let head = load_ssl_head(ctx, &clf, defense.as_ref(), &device)?;
        // the adversarial images of every attack, kept for the defence
        let il = 3 * test.h * test.w;
        let mut kept: Vec<Vec<f32>> = match &defense {
            Some(_) => vec![vec![0f32; test.n * il]; cfg.attacks.len()],
            None => Vec::new(),
        };
        let mut keep = |a: usize, s: usize, adv: &candle::Tensor| -> candle::Result<()> {
            if let Some(buf) = kept.get_mut(a) {
                let v = adv.flatten_all()?.to_vec1::<f32>()?;
                buf[s * il..s * il + v.len()].copy_from_slice(&v);
            }
            Ok(())
        };
        // finished batches survive a crash: a rerun of this key replays them
        let journal = Journal::at(ctx.scratch_dir());
        let report = evaluate_with(
            &clf,
            test,
            &cfg,
            &device,
            &hooks,
            &journal,
            defense
                .is_some()
                .then_some(&mut keep as runner::OnAdversarial<'_>),
        )?;
        let mut adaptive: Vec<(Vec<f32>, usize)> = Vec::new();
        let defended = match &defense {
            Some(spec) => {
                if let Some(note) = defense::radius_note(spec, &cfg.attacks) {
                    ctx.log(note);
                }
                let clean = batch_tensor(test, 0, test.n, &candle::Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let mut sets = vec![defense::SetImages {
                    name: "clean".into(),
                    norm: None,
                    data: &clean,
                }];
                for (a, buf) in cfg.attacks.iter().zip(&kept) {
                    sets.push(defense::SetImages {
                        name: a.name(),
                        norm: Some(a.norm),
                        data: buf,
                    });
                }
                if let (Some(ad), Some(h)) = (&spec.adaptive, &head) {
                    ctx.log(format!(
                        "defence-aware attacks: CE - {} * SSL loss ({} views)",
                        ad.lambda, ad.views
                    ));
                    adaptive = defense::adaptive_attacks(
                        &clf,
                        h,
                        test,
                        &cfg.attacks,
                        ad,
                        cfg.batch_size,
                        p.seed,
                        &device,
                        &hooks,
                        &journal,
                    )?;
                }
                for (a, (buf, _)) in cfg.attacks.iter().zip(&adaptive) {
                    sets.push(defense::SetImages {
                        name: format!("adaptive_{}", a.name()),
                        norm: Some(a.norm),
                        data: buf,
                    });
                }
                ctx.log(format!(
                    "defence: {} of {} set(s) in batches of {}",
                    spec.suffix(),
                    sets.len(),
                    spec.batch_size
                ));
                let r = defense::defend(
                    &clf,
                    head.as_ref(),
                    test,
                    &sets,
                    spec,
                    p.seed,
                    &device,
                    &hooks,
                    &journal,
                )?;
                Some((spec, r))
            }
            None => None,
        };
        let transfer = match &adversarial {
            Some(set) => Some(evaluate_transfer(
                &clf,
                set,
                Some(&dataset.test),
                cfg.batch_size,
                &device,
                &hooks,
            )?),
            None => None,
        };
        let mut metrics = metrics_json(
            &cfg,
            &report,
            transfer.as_ref(),
            start.elapsed().as_secs_f64(),
            p.device.backend(),
        );
        if let (Some((spec, sets)), Value::Object(m)) = (&defended, &mut metrics) {
            defense::defense_metrics(m, spec, sets, test.n);
            for (a, (_, correct)) in cfg.attacks.iter().zip(&adaptive) {
                m.insert(
                    format!("adaptive_{}", a.metric()),
                    serde_json::json!(*correct as f64 / test.n.max(1) as f64),
                );
            }
        }
        crate::params::write_json(&ctx.out_path("metrics.json"), &metrics)?;
        if journal.replayed() > 0 {
            ctx.log(format!(
                "{} batches in all replayed from the journal of an interrupted run",
                journal.replayed()
            ));
        }
        ctx.log(format!("done: {metrics}"));
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests;
