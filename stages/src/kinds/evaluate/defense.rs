//! `evaluate`'s `defense` param: the test-time reverse attack of METHODS.md 12 (R-MAO,
//! R-DLSP) on the clean test images and on every PGD attack's adversarial images.
//!
//! `defense: {preset, method, norm, eps, alpha, steps, views, project_box, select,
//! batch_size}`; what is left out comes from the preset:
//!
//! | preset | norm | eps | alpha | steps | views | project_box | select | batch_size |
//! |---|---|---|---|---|---|---|---|---|
//! | `r_mao` (default) | `linf` | 16/255 | 2/255 | 40 | 4 | true | `last` | 512 |
//! | `r_dlsp` | `attack` | 8/255 | 2/255 | 5 | 2 | false | `best_measured` | 256 |
//!
//! `augment: per_image` draws every image's augmentation on its own instead of once per batch
//! (R-MAO's batch-synchronous draws are the default, \[Q55\]); the SSL-loss measurement then
//! draws per image too.
//!
//! `norm: attack` reverses in each attack's own norm (R-DLSP's coupling, \[Q57\]; the clean
//! images in l_inf). `method: random` is R-DLSP's `--task random` baseline (`x + U(−ε, ε)`
//! in the box; only `eps` and `batch_size` apply). Canonicalization writes every field that
//! applies out and drops `preset`, so equivalent settings key alike; a node without `defense`
//! keys as before the param existed.
//!
//! The images are processed in one seeded random order (R-MAO shuffles its test set), the
//! same batches for the clean set and every attack, because the SSL loss of an image depends
//! on the other images of its batch (its negatives). Metrics: `clean_reversed_acc` and per
//! attack `pgd_<norm>_<eps>_reversed_acc` (`_noised_acc` for `random`), and `defense`: the
//! resolved config and, per set, the mean SSL loss (4 views, seeded draws, head in eval mode)
//! before and after (R-MAO's "clean / adv / adaadv contrastive" log).
//!
//! `adaptive_lambda: λ_S` (R-MAO's `--attack_type adapt`, METHODS uses λ_S = 10) adds the
//! defence-aware attack: every PGD attack again, from the same random start, maximising
//! `mean CE − λ_S · L_ssl` (`adaptive_views` views, default 2, fresh draws per step) so that
//! the reversal finds little SSL loss left to lower; reported as `adaptive_pgd_<norm>_<eps>_acc`
//! (undefended) and `adaptive_pgd_<norm>_<eps>_reversed_acc`. With λ_S = 0 it is exactly the
//! plain attack.

use candle::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::runner::{AttackSpec, Error, Hooks, count_correct, format_radius};
use crate::data::Split;
use crate::journal::Journal;
use crate::nn::attacks::{Norm, Select};
use crate::nn::classifier::Classifier;
use crate::nn::defense::{
    AugmentMode, ReverseConfig, SslHead, SyncAugment, random_noise, reverse, ssl_loss,
};
use crate::params::{Checks, de_real_opt};
use crate::rng::Rng;

const ORDER_STREAM: u64 = 0xdef0;
const REVERSE_STREAM: u64 = 0xdef1;
const LOSS_STREAM: u64 = 0xdef2;
const ADAPTIVE_DRAWS: u64 = 0xdef4;
/// Views of the SSL-loss measurement.
pub const LOSS_VIEWS: usize = 4;

/// Whose settings fill the fields a `defense` leaves out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefensePreset {
    /// R-MAO (the official code).
    #[default]
    RMao,
    /// R-DLSP (HEAD).
    RDlsp,
}

/// What is done to the inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefenseMethod {
    /// The reverse attack (minimise the SSL loss).
    #[default]
    Reverse,
    /// Uniform noise in the l_inf ball (R-DLSP's baseline).
    Random,
}

/// The reversal's norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefenseNorm {
    /// l_inf.
    Linf,
    /// l_2.
    L2,
    /// l_1.
    L1,
    /// The norm of the attack being reversed (l_inf for clean images).
    Attack,
}

/// The `defense` param as written (module docs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefenseParam {
    /// Fills what is left out (dropped by canonicalization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<DefensePreset>,
    /// Reverse or random.
    #[serde(default)]
    pub method: DefenseMethod,
    /// Norm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm: Option<DefenseNorm>,
    /// Radius.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub eps: Option<f64>,
    /// Step.
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub alpha: Option<f64>,
    /// Steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Views of the SSL loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views: Option<usize>,
    /// Box after every step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_box: Option<bool>,
    /// Returned iterate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<Select>,
    /// Images per reversal batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// R-MAO's defence-aware attack: with a weight λ_S here, every PGD attack is also run
    /// maximising `CE − λ_S · L_ssl` (none unless asked for).
    #[serde(
        default,
        deserialize_with = "de_real_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub adaptive_lambda: Option<f64>,
    /// Views of the adaptive attack's SSL term (R-MAO: 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_views: Option<usize>,
    /// One augmentation draw per batch (R-MAO, \[Q55\]) or per image.
    #[serde(default, skip_serializing_if = "AugmentMode::is_batch")]
    pub augment: AugmentMode,
}

/// R-MAO's defence-aware attack (`adaptive_attack_pgd`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct AdaptiveSpec {
    /// λ_S.
    pub lambda: f64,
    /// Views of the SSL term.
    pub views: usize,
    /// Per-image draws (the defence's mode).
    #[serde(skip)]
    pub per_image: bool,
}

/// A resolved defence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DefenseSpec {
    /// Reverse or random.
    pub method: DefenseMethod,
    /// Norm.
    pub norm: DefenseNorm,
    /// Radius.
    pub eps: f64,
    /// Step.
    pub alpha: f64,
    /// Steps.
    pub steps: usize,
    /// Views.
    pub views: usize,
    /// Box after every step.
    pub project_box: bool,
    /// Returned iterate.
    pub select: Select,
    /// Images per batch.
    pub batch_size: usize,
    /// The defence-aware attack, if asked for.
    pub adaptive: Option<AdaptiveSpec>,
    /// Batch-synchronous or per-image augmentation draws.
    pub augment: AugmentMode,
}

impl DefenseParam {
    /// The defence completed by its preset.
    pub fn resolve(&self) -> DefenseSpec {
        let (norm, eps, alpha, steps, views, project_box, select, batch) =
            match self.preset.unwrap_or_default() {
                DefensePreset::RMao => {
                    let r = ReverseConfig::r_mao();
                    (
                        DefenseNorm::Linf,
                        r.eps,
                        r.alpha,
                        r.steps,
                        r.views,
                        r.project_box,
                        r.select,
                        512,
                    )
                }
                DefensePreset::RDlsp => {
                    let r = ReverseConfig::r_dlsp(Norm::Linf);
                    (
                        DefenseNorm::Attack,
                        r.eps,
                        r.alpha,
                        r.steps,
                        r.views,
                        r.project_box,
                        r.select,
                        256,
                    )
                }
            };
        DefenseSpec {
            method: self.method,
            norm: self.norm.unwrap_or(norm),
            eps: self.eps.unwrap_or(eps),
            alpha: self.alpha.unwrap_or(alpha),
            steps: self.steps.unwrap_or(steps),
            views: self.views.unwrap_or(views),
            project_box: self.project_box.unwrap_or(project_box),
            select: self.select.unwrap_or(select),
            batch_size: self.batch_size.unwrap_or(batch),
            adaptive: self.adaptive_lambda.map(|lambda| AdaptiveSpec {
                lambda,
                views: self.adaptive_views.unwrap_or(2),
                per_image: self.augment == AugmentMode::PerImage,
            }),
            augment: self.augment,
        }
    }

    /// The keyed form: every field that applies written out, no preset.
    pub fn canonical(&self) -> DefenseParam {
        let s = self.resolve();
        let reverse = s.method == DefenseMethod::Reverse;
        DefenseParam {
            preset: None,
            method: s.method,
            norm: reverse.then_some(s.norm),
            eps: Some(s.eps),
            alpha: reverse.then_some(s.alpha),
            steps: reverse.then_some(s.steps),
            views: reverse.then_some(s.views),
            project_box: reverse.then_some(s.project_box),
            select: reverse.then_some(s.select),
            batch_size: Some(s.batch_size),
            adaptive_lambda: s.adaptive.filter(|_| reverse).map(|a| a.lambda),
            adaptive_views: s.adaptive.filter(|_| reverse).map(|a| a.views),
            augment: if reverse {
                s.augment
            } else {
                AugmentMode::Batch
            },
        }
    }

    /// Range checks, paths under `defense`.
    pub(crate) fn check(&self, e: &mut Checks) {
        let s = self.resolve();
        if !(s.eps.is_finite() && s.eps >= 0.0) {
            e.require(false, "defense.eps", || {
                format!("{} must be a finite number >= 0", s.eps)
            });
        }
        if s.norm == DefenseNorm::Linf || s.method == DefenseMethod::Random {
            e.within("defense.eps", s.eps, 0.0, 1.0);
        }
        e.non_negative("defense.alpha", s.alpha);
        e.require(s.views >= 2, "defense.views", || {
            format!("the SSL loss needs at least 2 views, got {}", s.views)
        });
        if let Some(a) = s.adaptive {
            e.non_negative("defense.adaptive_lambda", a.lambda);
            e.require(a.views >= 2, "defense.adaptive_views", || {
                format!("the SSL loss needs at least 2 views, got {}", a.views)
            });
            e.require(
                s.method == DefenseMethod::Reverse,
                "defense.adaptive_lambda",
                || "the defence-aware attack targets the reversal's SSL loss: it needs `method: reverse`".into(),
            );
        }
        e.require(s.batch_size >= 2, "defense.batch_size", || {
            format!(
                "the SSL loss contrasts the images of a batch: at least 2, got {}",
                s.batch_size
            )
        });
    }
}

impl DefenseSpec {
    /// Metric suffix: `reversed` or `noised`.
    pub fn suffix(&self) -> &'static str {
        match self.method {
            DefenseMethod::Reverse => "reversed",
            DefenseMethod::Random => "noised",
        }
    }

    /// The reversal of images attacked in `attack_norm` (`None`: clean).
    pub fn reverse_config(&self, attack_norm: Option<Norm>) -> ReverseConfig {
        let norm = match self.norm {
            DefenseNorm::Linf => Norm::Linf,
            DefenseNorm::L2 => Norm::L2,
            DefenseNorm::L1 => Norm::L1,
            DefenseNorm::Attack => attack_norm.unwrap_or(Norm::Linf),
        };
        ReverseConfig {
            norm,
            eps: self.eps,
            alpha: self.alpha,
            steps: self.steps,
            views: self.views,
            project_box: self.project_box,
            select: self.select,
        }
    }
}

/// A note for the log when an l_inf reversal's radius is not twice an l_inf attack's ε, as
/// R-MAO's is (it evaluates one radius at a time and reverses at `2ε`: `r_mao`'s 16/255 is that
/// for 8/255). Every set is reversed at the one radius of the spec, so a node attacking at
/// several radii reverses some of them at another ratio than R-MAO would.
pub fn radius_note(spec: &DefenseSpec, attacks: &[AttackSpec]) -> Option<String> {
    if spec.method != DefenseMethod::Reverse || spec.norm != DefenseNorm::Linf {
        return None;
    }
    let off: Vec<String> = attacks
        .iter()
        .filter(|a| a.norm == Norm::Linf && (2.0 * a.eps - spec.eps).abs() > 1e-9)
        .map(|a| format!("{} (R-MAO: {})", a.name(), format_radius(2.0 * a.eps)))
        .collect();
    (!off.is_empty()).then(|| {
        format!(
            "note: every set is reversed at eps {}; R-MAO reverses at twice the attack's eps, \
             which differs for {}; one evaluate node per radius with `defense.eps` set follows it",
            format_radius(spec.eps),
            off.join(", ")
        )
    })
}

/// One defended set: the clean images or one attack's.
#[derive(Clone, Debug, PartialEq)]
pub struct DefendedSet {
    /// `clean` or the attack's name (`pgd_linf_8/255`).
    pub name: String,
    /// Correct after the defence.
    pub correct: usize,
    /// Mean SSL loss before and after (reverse only).
    pub ssl_loss: Option<(f64, f64)>,
}

/// The input images of one set, `(n, 3, h, w)` floats in image order.
pub struct SetImages<'a> {
    /// `clean` or the attack's name.
    pub name: String,
    /// The attack's norm (`None`: clean).
    pub norm: Option<Norm>,
    /// `n · 3 · h · w` values.
    pub data: &'a [f32],
}

/// Runs the defence on every set (module docs).
///
/// # Errors
/// Tensor errors or cancellation.
#[allow(clippy::too_many_arguments)]
pub fn defend(
    clf: &Classifier,
    head: Option<&SslHead>,
    test: &Split,
    sets: &[SetImages<'_>],
    spec: &DefenseSpec,
    seed: u64,
    device: &Device,
    hooks: &Hooks<'_>,
    journal: &Journal,
) -> Result<Vec<DefendedSet>, Error> {
    let clf = clf.frozen()?;
    let head = head.map(SslHead::frozen).transpose()?;
    let aug = SyncAugment::r_mao(test.h).per_image(spec.augment == AugmentMode::PerImage);
    let order = Rng::derive(seed, &[ORDER_STREAM]).permutation(test.n);
    let total = (sets.len() * test.n) as u64;
    let mut out = Vec::new();
    for (si, set) in sets.iter().enumerate() {
        let mut correct = 0;
        let (mut before, mut after, mut seen) = (0.0, 0.0, 0usize);
        let part = format!("defense-{si}");
        for (k, idx) in order.chunks(spec.batch_size).enumerate() {
            hooks.check()?;
            let old = journal
                .get::<DefendBatch>(&part, k, |e| {
                    let r = &e.record;
                    r.set == set.name && r.first == idx[0] && r.size == idx.len()
                })
                .map(|e| e.record);
            let rec = match old {
                Some(r) => r,
                None => {
                    let r = defend_batch(
                        &clf,
                        head.as_ref(),
                        &aug,
                        test,
                        set,
                        idx,
                        spec,
                        [seed, si as u64, k as u64],
                        device,
                    )?;
                    journal.put(&part, k, &r, &[])?;
                    r
                }
            };
            correct += rec.correct;
            if let Some((b, a)) = rec.ssl_loss {
                before += b * idx.len() as f64;
                after += a * idx.len() as f64;
                seen += idx.len();
            }
            let done = (si * test.n + (k * spec.batch_size + idx.len()).min(test.n)) as u64;
            (hooks.progress)(
                done,
                total,
                &format!(
                    "defence ({}) on {}: {:.3} correct so far",
                    spec.suffix(),
                    set.name,
                    correct as f64 / (k * spec.batch_size + idx.len()) as f64
                ),
            );
        }
        out.push(DefendedSet {
            name: set.name.clone(),
            correct,
            ssl_loss: (seen > 0).then(|| (before / seen as f64, after / seen as f64)),
        });
    }
    Ok(out)
}

/// The journal record of one batch of [`defend`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct DefendBatch {
    /// The set's name, the batch's first image and its size (checked on replay).
    set: String,
    first: usize,
    size: usize,
    /// Correct after the defence.
    correct: usize,
    /// The batch's mean SSL loss before and after (with a head and at least two images).
    ssl_loss: Option<(f64, f64)>,
}

/// [`defend`] on the images `idx` of `set`; `ids` = `[seed, set index, batch index]`.
#[allow(clippy::too_many_arguments)]
fn defend_batch(
    clf: &Classifier,
    head: Option<&SslHead>,
    aug: &SyncAugment,
    test: &Split,
    set: &SetImages<'_>,
    idx: &[usize],
    spec: &DefenseSpec,
    [seed, si, k]: [u64; 3],
    device: &Device,
) -> Result<DefendBatch, Error> {
    let il = 3 * test.h * test.w;
    let mut x = Vec::with_capacity(idx.len() * il);
    for &i in idx {
        x.extend_from_slice(&set.data[i * il..(i + 1) * il]);
    }
    let x = Tensor::from_vec(x, (idx.len(), 3, test.h, test.w), device)?;
    let labels: Vec<i64> = idx.iter().map(|&i| test.labels[i]).collect();
    let mut rng = Rng::derive(seed, &[REVERSE_STREAM, si, k]);
    let defended = match (spec.method, head) {
        (DefenseMethod::Random, _) => random_noise(&x, spec.eps, &mut rng)?,
        (DefenseMethod::Reverse, Some(h)) => {
            reverse(clf, h, aug, &x, &spec.reverse_config(set.norm), &mut rng)?
        }
        (DefenseMethod::Reverse, None) => {
            return Err("the reverse defence needs an `ssl_head` input".into());
        }
    };
    let correct = count_correct(&clf.logits(&defended, false)?, &labels)?;
    let ssl_loss = match head {
        Some(h) if idx.len() >= 2 => {
            // the same draws before and after
            let mut lr = Rng::derive(seed, &[LOSS_STREAM, k]);
            let draws: Vec<_> = (0..LOSS_VIEWS)
                .map(|_| aug.draw(&mut lr, idx.len(), test.h, test.w))
                .collect();
            let value = |t: &Tensor| -> candle::Result<f64> {
                let l = ssl_loss(clf, h, aug, t, &draws, false, false)?;
                Ok(f64::from(
                    l.to_dtype(candle::DType::F32)?.to_scalar::<f32>()?,
                ))
            };
            Some((value(&x)?, value(&defended)?))
        }
        _ => None,
    };
    Ok(DefendBatch {
        set: set.name.clone(),
        first: idx[0],
        size: idx.len(),
        correct,
        ssl_loss,
    })
}

/// The journal record of one batch of [`adaptive_attacks`] (its images are the tensor `adv`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct AdaptiveBatch {
    /// First image and size (checked on replay).
    start: usize,
    size: usize,
    /// Correct on the batch's adversarial images.
    correct: usize,
}

/// R-MAO's defence-aware attack on `test` for every attack of `attacks`: PGD (the attack's
/// norm, ε, α, steps, start and restarts) maximising `mean CE(F(x + δ), y) − λ_S · L_ssl(x + δ)`
/// with fresh draws of `views` views at every step, in the evaluation's batches of `batch`.
/// Returns per attack the images and how many the undefended classifier still gets right.
///
/// # Errors
/// Tensor errors or cancellation.
#[allow(clippy::too_many_arguments)]
pub fn adaptive_attacks(
    clf: &Classifier,
    head: &SslHead,
    test: &Split,
    attacks: &[AttackSpec],
    adaptive: &AdaptiveSpec,
    batch: usize,
    seed: u64,
    device: &Device,
    hooks: &Hooks<'_>,
    journal: &Journal,
) -> Result<Vec<(Vec<f32>, usize)>, Error> {
    use crate::nn::losses::cross_entropy_per_example;
    let clf = clf.frozen()?;
    let head = head.frozen()?;
    let aug = SyncAugment::r_mao(test.h).per_image(adaptive.per_image);
    let il = 3 * test.h * test.w;
    let mut out = Vec::new();
    for (a, spec) in attacks.iter().enumerate() {
        let mut images = vec![0f32; test.n * il];
        let mut correct = 0;
        let part = format!("adaptive-{a}");
        for (k, s) in (0..test.n).step_by(batch.max(1)).enumerate() {
            hooks.check()?;
            let b = batch.min(test.n - s);
            let labels = &test.labels[s..s + b];
            let old = journal.get::<AdaptiveBatch>(&part, k, |e| {
                e.record.start == s && e.record.size == b && e.tensors.contains_key("adv")
            });
            let (adv, rec) = match old {
                Some(e) => (e.tensor("adv")?.clone(), e.record),
                None => {
                    let x = super::batch_tensor(test, s, b, device)?;
                    let y = Tensor::from_slice(labels, b, device)?;
                    let mut draws = Rng::derive(seed, &[ADAPTIVE_DRAWS, a as u64, k as u64]);
                    let objective = |xa: &Tensor| -> candle::Result<Tensor> {
                        let ce =
                            (cross_entropy_per_example(&clf.logits(xa, false)?, &y)? / b as f64)?;
                        let d: Vec<_> = (0..adaptive.views)
                            .map(|_| aug.draw(&mut draws, b, test.h, test.w))
                            .collect();
                        let ssl = ssl_loss(&clf, &head, &aug, xa, &d, false, false)?;
                        // Σ_b of this is mean CE − λ L_ssl (R-MAO's loss)
                        ce.broadcast_sub(&(ssl * (adaptive.lambda / b as f64))?)
                    };
                    // the plain attack's start: with λ_S = 0 this is exactly the plain attack
                    let mut rng = super::runner::attack_rng(seed, spec, k);
                    let adv =
                        crate::nn::attacks::pgd(&x, objective, &spec.pgd_config(), &mut rng)?.adv;
                    let rec = AdaptiveBatch {
                        start: s,
                        size: b,
                        correct: count_correct(&clf.logits(&adv, false)?, labels)?,
                    };
                    journal.put(&part, k, &rec, &[("adv", &adv)])?;
                    (adv, rec)
                }
            };
            correct += rec.correct;
            let v = adv.flatten_all()?.to_vec1::<f32>()?;
            images[s * il..s * il + v.len()].copy_from_slice(&v);
            (hooks.progress)(
                (s + b) as u64,
                test.n as u64,
                &format!(
                    "defence-aware {}: {:.3} correct so far",
                    spec.name(),
                    correct as f64 / (s + b) as f64
                ),
            );
        }
        out.push((images, correct));
    }
    Ok(out)
}

/// The defence's entries of `metrics.json`.
pub fn defense_metrics(
    m: &mut Map<String, Value>,
    spec: &DefenseSpec,
    sets: &[DefendedSet],
    n: usize,
) {
    let mut losses = Map::new();
    for s in sets {
        m.insert(
            format!("{}_{}_acc", s.name, spec.suffix()),
            json!(if n == 0 {
                0.0
            } else {
                s.correct as f64 / n as f64
            }),
        );
        if let Some((b, a)) = s.ssl_loss {
            losses.insert(s.name.clone(), json!({"before": b, "after": a}));
        }
    }
    let mut config = serde_json::to_value(spec).unwrap_or(Value::Null);
    if let (DefenseMethod::Random, Value::Object(c)) = (spec.method, &mut config) {
        c.retain(|k, _| matches!(k.as_str(), "method" | "eps" | "batch_size"));
    }
    m.insert(
        "defense".into(),
        json!({"config": config, "ssl_loss": Value::Object(losses)}),
    );
}

/// `clean` and the attacks' names, with their norms.
pub fn set_names(attacks: &[AttackSpec]) -> Vec<(String, Option<Norm>)> {
    std::iter::once(("clean".to_string(), None))
        .chain(attacks.iter().map(|a| (a.name(), Some(a.norm))))
        .collect()
}
