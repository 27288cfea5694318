//! The engine-independent evaluation loop: clean and PGD accuracy of a [`Classifier`] on a
//! test split, and its accuracy on a stored adversarial set (see the module docs of
//! [`super`] for what is measured).

use std::time::Instant;

use candle::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::data::Split;
use crate::data::adversarial::AdversarialSet;
use crate::journal::Journal;
use crate::nn::attacks::{Norm, PgdConfig, pgd};
use crate::nn::augment::{EmpConfig, ImageBatch, MultiView, to_float};
use crate::nn::autoattack::{AaAttack, AaConfig, AaHooks, autoattack};
use crate::nn::classifier::Classifier;
use crate::nn::losses::cross_entropy_per_example;
use crate::rng::Rng;

/// Errors of the loops (candle, augmentation and data errors, cancellation).
pub type Error = pipe_engine::BoxError;

/// First word of the attack streams (`Rng::derive(seed, &[ATTACK_STREAM, norm, eps bits, batch])`).
const ATTACK_STREAM: u64 = 0x00a7_7ac4;
/// First word of the AutoAttack seeds (`Rng::derive(seed, &[AA_STREAM, eps bits, batch])`).
const AA_STREAM: u64 = 0x00aa_0a77;
/// First word of the n-crop view seed (`Rng::derive(seed, &[VIEW_STREAM])`).
pub(crate) const VIEW_STREAM: u64 = 0x5ee_0001;

/// One fully resolved PGD attack (what `metrics.json` records beside its accuracy).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackSpec {
    /// `linf`, `l2` or `l1`.
    pub norm: Norm,
    /// Radius ε.
    pub eps: f64,
    /// Step α.
    pub alpha: f64,
    /// Gradient steps.
    pub steps: usize,
    /// Random start (never for l_1, whose start is always zero).
    pub random_start: bool,
    /// Restarts; per example the one with the highest final cross-entropy is kept.
    pub restarts: usize,
}

impl AttackSpec {
    /// `pgd_linf_8/255` (see [`format_radius`]).
    pub fn name(&self) -> String {
        format!("pgd_{}_{}", norm_name(self.norm), format_radius(self.eps))
    }

    /// The accuracy's key in `metrics.json`: `pgd_linf_8/255_acc`.
    pub fn metric(&self) -> String {
        format!("{}_acc", self.name())
    }

    /// The [`PgdConfig`]: box projection on, the last iterate of each restart.
    pub fn pgd_config(&self) -> PgdConfig {
        PgdConfig {
            random_start: self.random_start,
            restarts: self.restarts,
            ..PgdConfig::new(self.norm, self.eps, self.alpha, self.steps)
        }
    }
}

/// `linf`, `l2` or `l1`.
pub fn norm_name(norm: Norm) -> &'static str {
    match norm {
        Norm::Linf => "linf",
        Norm::L2 => "l2",
        Norm::L1 => "l1",
    }
}

/// A radius as metric names print it: `k/255` when `255·eps` is an integer `k` (within
/// `1e-9`), else the shortest decimal that reads back as `eps` (`0.5`, `0.1`).
///
/// ```
/// use pipe_stages::kinds::evaluate::format_radius;
/// assert_eq!(format_radius(8.0 / 255.0), "8/255");
/// assert_eq!(format_radius(1.0), "255/255");
/// assert_eq!(format_radius(0.5), "0.5");
/// ```
pub fn format_radius(eps: f64) -> String {
    let k = eps * 255.0;
    if (k - k.round()).abs() < 1e-9 {
        format!("{}/255", k.round() as i64)
    } else {
        format!("{eps}")
    }
}

/// Callbacks from the loops to their runner (no-ops by default).
pub struct Hooks<'a> {
    /// `(done, total, message)` per batch.
    pub progress: &'a (dyn Fn(u64, u64, &str) + Sync),
    /// Log lines.
    pub log: &'a (dyn Fn(&str) + Sync),
    /// Polled between batches: stop with an error when true.
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
}

impl Default for Hooks<'_> {
    fn default() -> Self {
        Hooks {
            progress: &|_, _, _| {},
            log: &|_| {},
            cancelled: &|| false,
        }
    }
}

impl Hooks<'_> {
    /// An error when the run is being cancelled.
    ///
    /// # Errors
    /// `interrupted` when [`Hooks::cancelled`] says so.
    pub fn check(&self) -> Result<(), Error> {
        if (self.cancelled)() {
            Err("interrupted".into())
        } else {
            Ok(())
        }
    }
}

/// The indices of the seeded balanced subset of `per_class` test images per class, exactly
/// the images [`Split::balanced_subset`] picks for the same seed (in their original order);
/// all indices when `per_class` is `None`.
///
/// # Errors
/// A class with fewer than `per_class` images, or a split of more than 2⁶⁴ images.
pub fn subset_indices(
    test: &Split,
    classes: &[String],
    per_class: Option<usize>,
    seed: u64,
) -> crate::data::Result<Vec<usize>> {
    let Some(k) = per_class else {
        return Ok((0..test.n).collect());
    };
    // `balanced_subset` selects whole images; run it on 1×3 "images" that hold each index as
    // 8 little-endian bytes, so the selection is the library's own, not a copy of it.
    let mut bytes = Vec::with_capacity(test.n * 9);
    for i in 0..test.n as u64 {
        bytes.extend_from_slice(&i.to_le_bytes());
        bytes.push(0);
    }
    let tagged = Split {
        images: bytes,
        labels: test.labels.clone(),
        n: test.n,
        h: 1,
        w: 3,
    };
    let sub = tagged.balanced_subset(classes, k, seed, "test")?;
    Ok(sub
        .images
        .chunks_exact(9)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&c[..8]);
            u64::from_le_bytes(a) as usize
        })
        .collect())
}

/// Images `range` of `split` as a float tensor `(b, 3, h, w)` in `[0, 1]`.
///
/// # Errors
/// A range outside the split, or a tensor error.
pub fn batch_tensor(
    split: &Split,
    start: usize,
    len: usize,
    device: &Device,
) -> Result<Tensor, Error> {
    let il = split.image_len();
    let bytes = split
        .images
        .get(start * il..(start + len) * il)
        .ok_or_else(|| {
            format!(
                "images {start}..{} outside the split of {}",
                start + len,
                split.n
            )
        })?;
    let v = to_float(ImageBatch::new(bytes, len, split.h, split.w)?);
    Ok(Tensor::from_vec(
        v.data,
        (len, 3, split.h, split.w),
        device,
    )?)
}

/// How many of `logits`' argmaxes equal `labels`.
///
/// # Errors
/// Logits that are not `(b, classes)`.
pub fn count_correct(logits: &Tensor, labels: &[i64]) -> candle::Result<usize> {
    let pred = logits.argmax(1)?.to_vec1::<u32>()?;
    Ok(pred
        .iter()
        .zip(labels)
        .filter(|(p, l)| i64::from(**p) == **l)
        .count())
}

/// What [`evaluate`] measures.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalConfig {
    /// The attacks, each reported under [`AttackSpec::metric`].
    pub attacks: Vec<AttackSpec>,
    /// AutoAttack runs, each reported under `aa_linf_<eps>_acc` (full-image classifiers only).
    pub autoattack: Vec<AaConfig>,
    /// Test images per batch (per forward: `n_views` times as many rows for an n-crop head).
    pub batch_size: usize,
    /// Seeds the random starts and the n-crop views.
    pub seed: u64,
}

/// Counts from [`evaluate`].
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// Test images evaluated.
    pub n: usize,
    /// Correct on clean inputs.
    pub clean_correct: usize,
    /// Correct under each attack of the config, in its order.
    pub attack_correct: Vec<usize>,
    /// Per AutoAttack run of the config, in its order.
    pub autoattack: Vec<AaCounts>,
    /// Views per image of an n-crop head, `None` for the full-image head.
    pub n_views: Option<usize>,
    /// Wall-clock seconds of the loop.
    pub seconds: f64,
}

/// What one AutoAttack run found over the test images.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AaCounts {
    /// Robust to every attack of the run.
    pub robust: usize,
    /// Still robust after each attack of the run, in its order.
    pub after: Vec<usize>,
}

/// The classifier's forward in eval mode: the full-image head, or the n-crop head on
/// view-major views.
fn forward(clf: &Classifier, x: &Tensor, n_views: Option<usize>) -> candle::Result<Tensor> {
    match n_views {
        Some(n) => clf.logits_ncrop(x, n, false),
        None => clf.logits(x, false),
    }
}

/// The random-start stream of attack `spec` on batch `batch` (independent of the other
/// attacks of the node; the defence-aware attack of the same spec starts from the same draws).
pub(crate) fn attack_rng(seed: u64, spec: &AttackSpec, batch: usize) -> Rng {
    Rng::derive(
        seed,
        &[
            ATTACK_STREAM,
            norm_code(spec.norm),
            spec.eps.to_bits(),
            batch as u64,
        ],
    )
}

fn norm_code(norm: Norm) -> u64 {
    match norm {
        Norm::Linf => 0,
        Norm::L2 => 1,
        Norm::L1 => 2,
    }
}

/// Clean and PGD accuracy of `clf` on `test`, end to end through encoder and head in eval
/// mode, PGD maximising the cross-entropy (see the module docs of [`super`]).
///
/// # Errors
/// A classifier whose class count is below a label, candle or augmentation errors,
/// cancellation.
pub fn evaluate(
    clf: &Classifier,
    test: &Split,
    cfg: &EvalConfig,
    device: &Device,
    hooks: &Hooks<'_>,
) -> Result<EvalReport, Error> {
    evaluate_with(clf, test, cfg, device, hooks, &Journal::off(), None)
}

/// The journal part of [`evaluate_with`]'s batches.
const EVAL_PART: &str = "eval";

/// The journal record of one batch of [`evaluate_with`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct EvalBatch {
    /// First image and image count (checked on replay).
    start: usize,
    size: usize,
    clean: usize,
    attacks: Vec<usize>,
    autoattack: Vec<AaCounts>,
}

impl EvalBatch {
    /// Whether a replayed record is batch `(start, size)` of `cfg`.
    fn fits(&self, start: usize, size: usize, cfg: &EvalConfig) -> bool {
        self.start == start
            && self.size == size
            && self.attacks.len() == cfg.attacks.len()
            && self.autoattack.len() == cfg.autoattack.len()
            && self
                .autoattack
                .iter()
                .zip(&cfg.autoattack)
                .all(|(c, a)| c.after.len() == a.attacks.len())
    }
}

/// The journal name of attack `a`'s adversarial batch.
fn adv_name(a: usize) -> String {
    format!("adv/{a}")
}

/// The callback [`evaluate_with`] hands every attack's adversarial batch to.
pub type OnAdversarial<'a> = &'a mut dyn FnMut(usize, usize, &Tensor) -> candle::Result<()>;

/// [`evaluate`] with a [`Journal`] (finished batches are recorded, and replayed instead of
/// computed) that hands every attack's adversarial batch to `on_adversarial(attack index,
/// first image, batch)` (the test-time defence keeps them; with a callback the journal
/// records the adversarial images too).
///
/// # Errors
/// As [`evaluate`], or the callback's or the journal's error.
pub fn evaluate_with(
    clf: &Classifier,
    test: &Split,
    cfg: &EvalConfig,
    device: &Device,
    hooks: &Hooks<'_>,
    journal: &Journal,
    mut on_adversarial: Option<OnAdversarial<'_>>,
) -> Result<EvalReport, Error> {
    let start = Instant::now();
    if cfg.batch_size == 0 {
        return Err("batch_size must be at least 1".into());
    }
    let clf = clf.frozen()?;
    let ncrop = match clf.spec().ncrop {
        Some(s) => {
            let generator: MultiView = EmpConfig {
                n_views: s.n_views,
                scale: s.scale,
                ratio: s.ratio,
                size: test.h,
                ..EmpConfig::crop(s.n_views)
            }
            .build()?;
            Some((
                generator,
                s.n_views,
                Rng::derive(cfg.seed, &[VIEW_STREAM]).next_u64(),
            ))
        }
        None => None,
    };
    let n_views = ncrop.as_ref().map(|(_, n, _)| *n);
    if n_views.is_some() && !cfg.autoattack.is_empty() {
        return Err("autoattack needs a full-image classifier; this one has an n-crop head".into());
    }
    let mut clean_correct = 0;
    let mut attack_correct = vec![0; cfg.attacks.len()];
    let mut aa_counts: Vec<AaCounts> = cfg
        .autoattack
        .iter()
        .map(|a| AaCounts {
            robust: 0,
            after: vec![0; a.attacks.len()],
        })
        .collect();
    let keep = on_adversarial.is_some();
    let (mut done, mut replayed) = (0, 0);
    let batches = test.n.div_ceil(cfg.batch_size);
    for (batch, s) in (0..test.n).step_by(cfg.batch_size).enumerate() {
        hooks.check()?;
        let b = cfg.batch_size.min(test.n - s);
        let labels = &test.labels[s..s + b];
        let old = journal.get::<EvalBatch>(EVAL_PART, batch, |e| {
            e.record.fits(s, b, cfg)
                && (!keep || (0..cfg.attacks.len()).all(|a| e.tensors.contains_key(&adv_name(a))))
        });
        let rec = if let Some(e) = old {
            if let Some(f) = on_adversarial.as_mut() {
                for a in 0..cfg.attacks.len() {
                    f(a, s, e.tensor(&adv_name(a))?)?;
                }
            }
            replayed += 1;
            e.record
        } else {
            let input = match &ncrop {
                Some((generator, _, seed)) => {
                    let il = test.image_len();
                    let images =
                        ImageBatch::new(&test.images[s * il..(s + b) * il], b, test.h, test.w)?;
                    let v = generator.generate(images, *seed, batch as u64)?;
                    Tensor::from_vec(v.data, (v.n_views * v.batch, 3, v.height, v.width), device)?
                }
                None => batch_tensor(test, s, b, device)?,
            };
            let y = Tensor::from_slice(labels, b, device)?;
            let mut rec = EvalBatch {
                start: s,
                size: b,
                clean: count_correct(&forward(&clf, &input, n_views)?, labels)?,
                attacks: Vec::with_capacity(cfg.attacks.len()),
                autoattack: Vec::with_capacity(cfg.autoattack.len()),
            };
            // The n-crop objective gives every view row its image's loss: the sum is n times
            // the images' CE sum (same steps), and per-row restart selection picks per image.
            let objective = |xa: &Tensor| -> candle::Result<Tensor> {
                let ce = cross_entropy_per_example(&forward(&clf, xa, n_views)?, &y)?;
                match n_views {
                    Some(n) => Tensor::cat(&vec![&ce; n], 0),
                    None => Ok(ce),
                }
            };
            let mut advs = Vec::new();
            for (a, spec) in cfg.attacks.iter().enumerate() {
                let mut rng = attack_rng(cfg.seed, spec, batch);
                let res = pgd(&input, objective, &spec.pgd_config(), &mut rng)?;
                if let Some(f) = on_adversarial.as_mut() {
                    f(a, s, &res.adv)?;
                }
                rec.attacks
                    .push(count_correct(&forward(&clf, &res.adv, n_views)?, labels)?);
                if keep {
                    advs.push((adv_name(a), res.adv));
                }
            }
            for aa in &cfg.autoattack {
                hooks.check()?;
                let seed =
                    Rng::derive(cfg.seed, &[AA_STREAM, aa.eps.to_bits(), batch as u64]).next_u64();
                let mut model = |x: &Tensor| clf.logits(x, false);
                let stop = || (hooks.cancelled)();
                let after = |a: AaAttack, left: usize| {
                    (hooks.progress)(
                        done as u64,
                        test.n as u64,
                        &format!(
                            "autoattack {} on images {}..{}: {} robust after {}",
                            format_radius(aa.eps),
                            s,
                            s + b,
                            left,
                            a.name()
                        ),
                    );
                };
                let aa_hooks = AaHooks {
                    stop: &stop,
                    after_attack: &after,
                };
                let r = autoattack(&input, labels, &mut model, aa, seed, &aa_hooks)?;
                rec.autoattack.push(AaCounts {
                    robust: r.robust.iter().filter(|v| **v).count(),
                    after: r.robust_after.clone(),
                });
            }
            let named: Vec<(&str, &Tensor)> = advs.iter().map(|(k, v)| (k.as_str(), v)).collect();
            journal.put(EVAL_PART, batch, &rec, &named)?;
            rec
        };
        clean_correct += rec.clean;
        for (c, n) in attack_correct.iter_mut().zip(&rec.attacks) {
            *c += n;
        }
        for (counts, r) in aa_counts.iter_mut().zip(&rec.autoattack) {
            counts.robust += r.robust;
            for (c, n) in counts.after.iter_mut().zip(&r.after) {
                *c += n;
            }
        }
        done += b;
        let mut msg = format!("clean {:.3}", clean_correct as f64 / done as f64);
        for (spec, c) in cfg.attacks.iter().zip(&attack_correct) {
            msg.push_str(&format!(" {} {:.3}", spec.name(), *c as f64 / done as f64));
        }
        for (aa, c) in cfg.autoattack.iter().zip(&aa_counts) {
            msg.push_str(&format!(
                " aa_{} {:.3}",
                format_radius(aa.eps),
                c.robust as f64 / done as f64
            ));
        }
        (hooks.progress)(done as u64, test.n as u64, &msg);
    }
    if replayed > 0 {
        (hooks.log)(&format!(
            "evaluation: {replayed} of {batches} batches replayed from the journal of an interrupted run"
        ));
    }
    Ok(EvalReport {
        n: test.n,
        clean_correct,
        attack_correct,
        autoattack: aa_counts,
        n_views,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Counts from [`evaluate_transfer`].
#[derive(Clone, Debug, PartialEq)]
pub struct TransferReport {
    /// Images in the adversarial set.
    pub n: usize,
    /// Correct on the stored adversarial images.
    pub correct: usize,
    /// Correct on their clean originals (when the source split matches the set).
    pub clean_correct: Option<usize>,
    /// The attack config stored with the set.
    pub attack: Value,
}

/// Accuracy of `clf` on the stored images of `set` (the full-image forward, eval mode) and,
/// when `source` is the test split the set was made from (every source index inside it and
/// every label equal), on the clean originals too.
///
/// # Errors
/// candle errors, cancellation.
pub fn evaluate_transfer(
    clf: &Classifier,
    set: &AdversarialSet,
    source: Option<&Split>,
    batch_size: usize,
    device: &Device,
    hooks: &Hooks<'_>,
) -> Result<TransferReport, Error> {
    let clf = clf.frozen()?;
    let batch_size = batch_size.max(1);
    let originals: Option<Vec<usize>> = source.and_then(|src| {
        let idx: Option<Vec<usize>> = set
            .source_index
            .iter()
            .zip(&set.labels)
            .map(|(&i, &l)| {
                let i = usize::try_from(i).ok()?;
                (i < src.n && src.labels[i] == l && (src.h, src.w) == (set.h, set.w)).then_some(i)
            })
            .collect();
        if idx.is_none() {
            (hooks.log)("the adversarial set's source indices and labels do not match this dataset's test split: no transfer_clean_acc");
        }
        idx
    });
    let source_subset = match (source, &originals) {
        (Some(src), Some(idx)) => Some(src.select(idx)),
        _ => None,
    };
    let (mut correct, mut clean) = (0, 0);
    let il = set.image_len();
    for s in (0..set.n).step_by(batch_size) {
        hooks.check()?;
        let b = batch_size.min(set.n - s);
        let labels = &set.labels[s..s + b];
        let x = Tensor::from_slice(
            &set.images[s * il..(s + b) * il],
            (b, 3, set.h, set.w),
            device,
        )?;
        correct += count_correct(&clf.logits(&x, false)?, labels)?;
        if let Some(src) = &source_subset {
            let x = batch_tensor(src, s, b, device)?;
            clean += count_correct(&clf.logits(&x, false)?, labels)?;
        }
        (hooks.progress)((s + b) as u64, set.n as u64, "transfer");
    }
    Ok(TransferReport {
        n: set.n,
        correct,
        clean_correct: source_subset.map(|_| clean),
        attack: set.attack.clone(),
    })
}

fn frac(correct: usize, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        correct as f64 / n as f64
    }
}

/// The `metrics.json` of an evaluation (accuracies as fractions in `[0, 1]`).
pub fn metrics_json(
    cfg: &EvalConfig,
    report: &EvalReport,
    transfer: Option<&TransferReport>,
    seconds: f64,
    device: &str,
) -> Value {
    let mut m = Map::new();
    m.insert(
        "clean_acc".into(),
        json!(frac(report.clean_correct, report.n)),
    );
    let mut attacks = Map::new();
    for (spec, c) in cfg.attacks.iter().zip(&report.attack_correct) {
        m.insert(spec.metric(), json!(frac(*c, report.n)));
        attacks.insert(spec.metric(), json!(spec));
    }
    m.insert("attacks".into(), Value::Object(attacks));
    if !cfg.autoattack.is_empty() {
        let mut runs = Map::new();
        for (aa, c) in cfg.autoattack.iter().zip(&report.autoattack) {
            let metric = format!("aa_linf_{}_acc", format_radius(aa.eps));
            m.insert(metric.clone(), json!(frac(c.robust, report.n)));
            let after: Map<String, Value> = aa
                .attacks
                .iter()
                .zip(&c.after)
                .map(|(a, n)| (a.name().to_string(), json!(frac(*n, report.n))))
                .collect();
            runs.insert(metric, json!({"config": aa, "after": after}));
        }
        m.insert("autoattack".into(), Value::Object(runs));
    }
    m.insert("n_test".into(), json!(report.n));
    m.insert(
        "head".into(),
        json!(if report.n_views.is_some() {
            "ncrop"
        } else {
            "full_image"
        }),
    );
    if let Some(n) = report.n_views {
        m.insert("n_views".into(), json!(n));
    }
    if let Some(t) = transfer {
        m.insert("transfer_acc".into(), json!(frac(t.correct, t.n)));
        if let Some(c) = t.clean_correct {
            m.insert("transfer_clean_acc".into(), json!(frac(c, t.n)));
        }
        m.insert("transfer_n".into(), json!(t.n));
        m.insert("transfer_attack".into(), t.attack.clone());
    }
    m.insert("seconds".into(), json!(seconds));
    m.insert("device".into(), json!(device));
    Value::Object(m)
}

/// One row of `pipe bench evaluate`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// ResNet width.
    pub width: usize,
    /// Test images per batch.
    pub batch: usize,
    /// Images evaluated (timed).
    pub images: usize,
    /// PGD steps.
    pub steps: usize,
    /// Seconds for the timed images (clean forward + PGD + the adversarial forward).
    pub seconds: f64,
    /// `seconds` scaled to 1,000 images.
    pub seconds_per_1000: f64,
}

/// Times the evaluation of `images` synthetic 32×32 test images under l_inf PGD-`steps`
/// (ε = 8/255, α = 2/255, random start) against a seeded classifier of `width` with the
/// 4096-d `pre_feature` head, on the CPU.
///
/// # Errors
/// candle errors.
pub fn bench(width: usize, batch: usize, images: usize, steps: usize) -> Result<BenchRow, Error> {
    use crate::nn::classifier::{ClassifierSpec, FeatureKind};
    let spec = ClassifierSpec {
        width,
        hidden_dim: 4096,
        features: FeatureKind::PreFeature,
        classes: 10,
        ncrop: None,
        input_norm: false,
    };
    let (_vm, clf) = Classifier::build_seeded(&spec, 0, &Device::Cpu)?;
    let d = crate::data::synthetic(&crate::data::SyntheticConfig {
        n_classes: 10,
        n_train: 0,
        n_test: images,
        image_size: 32,
        seed: 0,
    });
    let cfg = EvalConfig {
        attacks: vec![AttackSpec {
            norm: Norm::Linf,
            eps: 8.0 / 255.0,
            alpha: 2.0 / 255.0,
            steps,
            random_start: true,
            restarts: 1,
        }],
        autoattack: Vec::new(),
        batch_size: batch,
        seed: 0,
    };
    let r = evaluate(&clf, &d.test, &cfg, &Device::Cpu, &Hooks::default())?;
    Ok(BenchRow {
        width,
        batch,
        images,
        steps,
        seconds: r.seconds,
        seconds_per_1000: r.seconds * 1000.0 / images.max(1) as f64,
    })
}
