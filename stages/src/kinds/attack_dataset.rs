//! `attack_dataset`: an adversarial copy of the test split against a classifier (PGD l_inf /
//! l_2 / l_1, restarts, optional early stop; METHODS.md 9), stored as an artifact that
//! `evaluate` (its `adversarial` input) and transfer experiments read.
//!
//! # Inputs
//!
//! - `model` (required): a classifier artifact (`classifier.safetensors` + `classifier.json`).
//! - `dataset` (required): a dataset artifact; its test split is attacked.
//!
//! # Params
//!
//! | param | default | meaning |
//! |---|---|---|
//! | `norm` | `linf` | `linf`, `l2` or `l1` |
//! | `eps` | 8/255 | radius (every norm, as the reference; later scripts use 1.0 for l_1) |
//! | `alpha` | 2/255 | step size |
//! | `steps` | 10 | PGD iterations (the reference README runs 5; its sweep 5/10/15/50) |
//! | `restarts` | 1 | per example, the restart with the highest final cross-entropy is kept |
//! | `random_start` | true | l_inf uniform / l_2 uniform-radius start (l_1 always starts at zero) |
//! | `early_stop` | false | each step updates only the examples still correctly classified (R-DLSP `--eval`) |
//! | `batch_size` | 64 | images per batch |
//! | `test_subset` | all | a seeded balanced subset of this many test images per class (the same images `evaluate` picks for the same seed) |
//! | `seed` | 0 | random starts and the subset |
//! | `device` | `auto` | `auto`, `cpu` or `cuda:N` (the backend is keyed, the ordinal is not) |
//!
//! `eps` and `alpha` accept fractions (`8/255`). `random_start` is keyed as `false` where it
//! cannot matter (l_1, ε = 0).
//!
//! # The attack
//!
//! PGD of METHODS.md 2.5 ([`crate::nn::attacks::pgd`], or
//! [`crate::nn::attacks::pgd_early_stop`] with `early_stop`) maximising the cross-entropy of
//! the classifier's full-image forward in eval mode: per-norm start and step, projection onto
//! the ε-ball and the box `[0, 1]` after every step, the last iterate. With early stop, an
//! example takes a step only while the forward at its current iterate classifies it correctly,
//! so it keeps the first iterate that fools the model. An n-crop classifier is attacked through
//! its head on the whole image (the stored images are images, not views).
//!
//! # Outputs
//!
//! - `adversarial.safetensors` ([`crate::data::adversarial`]): `images` F32 `[N, 3, H, W]`
//!   (float, so the perturbation is kept exactly), `labels` I64 `[N]`, `loss` F32 `[N]` (the
//!   cross-entropy of the classifier at each stored image), `source_index` I64 `[N]` (the
//!   image's index in the dataset's test split); metadata `classes` and `attack` (the resolved
//!   config: the params, `name` such as `pgd_linf_8/255`, `forward`).
//! - `metrics.json`: `clean_acc`, `adv_acc` (fractions in `[0, 1]`), `clean_mean_loss`,
//!   `mean_loss` (mean cross-entropy at the adversarial images), `n`, `name`, `attack` (the
//!   config), `seconds`, `device`.
//!
//! # Crashes
//!
//! Every finished batch (its images, losses and counts) is recorded in the node's scratch
//! folder ([`crate::journal`]); a run of the same key after a crash replays them and attacks
//! only the rest, giving the artifact an uninterrupted run gives.

use std::time::Instant;

use candle::{DType, Device, Tensor};
use pipe_engine::{
    BoxError, NormalizeCtx, ParamError, Resources, Slot, Slots, StageCtx, TypedStage,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::data::Split;
use crate::data::adversarial::{ADVERSARIAL_FILE, AdversarialSet};
use crate::device::DeviceSpec;
use crate::journal::Journal;
use crate::kinds::evaluate::{
    self, AttackSpec, Error, Hooks, batch_tensor, count_correct, subset_indices,
};
use crate::nn::attacks::{Norm, pgd, pgd_early_stop};
use crate::nn::classifier::Classifier;
use crate::nn::losses::cross_entropy_per_example;
use crate::params::{Checks, de_real};
use crate::rng::Rng;

/// The `attack_dataset` kind.
pub struct AttackDataset;

/// First word of the attack streams (`Rng::derive(seed, &[ADV_STREAM, batch])`).
const ADV_STREAM: u64 = 0x00ad_d5e7;

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn default_eps() -> f64 {
    8.0 / 255.0
}
fn default_alpha() -> f64 {
    2.0 / 255.0
}
fn default_steps() -> usize {
    10
}
fn default_batch() -> usize {
    64
}

/// Params of `attack_dataset` (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackDatasetParams {
    /// `linf`, `l2` or `l1`.
    #[serde(default)]
    pub norm: Norm,
    /// Radius ε.
    #[serde(default = "default_eps", deserialize_with = "de_real")]
    pub eps: f64,
    /// Step α.
    #[serde(default = "default_alpha", deserialize_with = "de_real")]
    pub alpha: f64,
    /// PGD iterations.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Restarts.
    #[serde(default = "one")]
    pub restarts: usize,
    /// Random start.
    #[serde(default = "yes")]
    pub random_start: bool,
    /// Update only the examples still correctly classified.
    #[serde(default)]
    pub early_stop: bool,
    /// Images per batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Test images per class (a seeded balanced subset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_subset: Option<usize>,
    /// Seed.
    #[serde(default)]
    pub seed: u64,
    /// Device.
    #[serde(default)]
    pub device: DeviceSpec,
}

impl AttackDatasetParams {
    /// The attack.
    pub fn attack(&self) -> AttackSpec {
        AttackSpec {
            norm: self.norm,
            eps: self.eps,
            alpha: self.alpha,
            steps: self.steps,
            random_start: self.random_start && self.norm != Norm::L1 && self.eps != 0.0,
            restarts: self.restarts,
        }
    }

    /// The resolved config.
    pub fn config(&self) -> AttackDatasetConfig {
        AttackDatasetConfig {
            attack: self.attack(),
            early_stop: self.early_stop,
            batch_size: self.batch_size,
            seed: self.seed,
        }
    }

    /// The canonical form that is keyed.
    pub fn canonical(&self) -> AttackDatasetParams {
        AttackDatasetParams {
            random_start: self.attack().random_start,
            ..self.clone()
        }
    }

    /// The config recorded with the set and in `metrics.json`.
    pub fn record(&self) -> Value {
        let a = self.attack();
        json!({
            "name": a.name(),
            "norm": a.norm, "eps": a.eps, "alpha": a.alpha, "steps": a.steps,
            "random_start": a.random_start, "restarts": a.restarts,
            "early_stop": self.early_stop, "batch_size": self.batch_size,
            "test_subset": self.test_subset, "seed": self.seed,
            "objective": "cross_entropy", "mode": "eval", "forward": "full_image",
        })
    }
}

/// What [`attack_split`] runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttackDatasetConfig {
    /// The PGD attack.
    pub attack: AttackSpec,
    /// Step only the examples still correctly classified.
    pub early_stop: bool,
    /// Images per batch.
    pub batch_size: usize,
    /// Seeds the random starts.
    pub seed: u64,
}

/// What [`attack_split`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct AttackOutcome {
    /// The adversarial set (its `attack` metadata is `Value::Null`: the caller records it).
    pub set: AdversarialSet,
    /// Correct on the clean images.
    pub clean_correct: usize,
    /// Correct on the adversarial images.
    pub adv_correct: usize,
    /// Mean cross-entropy on the clean images.
    pub clean_mean_loss: f64,
    /// Mean cross-entropy on the adversarial images.
    pub mean_loss: f64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The journal part of [`attack_split`]'s batches.
const JOURNAL_PART: &str = "attack";

/// The journal record of one batch of [`attack_split`] (its images and losses are the
/// tensors `adv` and `loss`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct AttackBatch {
    /// First image and size (checked on replay).
    start: usize,
    size: usize,
    clean_correct: usize,
    adv_correct: usize,
    /// The batch's summed clean cross-entropy.
    clean_loss: f64,
}

/// Attacks the images `indices` of `test` (see the module docs), recording finished batches
/// in `journal` and replaying those it holds.
///
/// # Errors
/// Indices outside the split, candle errors, cancellation.
#[allow(clippy::too_many_arguments)]
pub fn attack_split(
    clf: &Classifier,
    test: &Split,
    indices: &[usize],
    classes: &[String],
    cfg: &AttackDatasetConfig,
    device: &Device,
    hooks: &Hooks<'_>,
    journal: &Journal,
) -> Result<AttackOutcome, Error> {
    let start = Instant::now();
    if cfg.batch_size == 0 {
        return Err("batch_size must be at least 1".into());
    }
    if let Some(bad) = indices.iter().find(|&&i| i >= test.n) {
        return Err(format!("index {bad} outside the test split of {}", test.n).into());
    }
    let sub = test.select(indices);
    let clf = clf.frozen()?;
    let pgd_cfg = cfg.attack.pgd_config();
    let n = sub.n;
    let mut images = Vec::with_capacity(n * sub.image_len());
    let mut loss = Vec::with_capacity(n);
    let (mut clean_correct, mut adv_correct, mut clean_loss) = (0, 0, 0.0f64);
    for (batch, s) in (0..n).step_by(cfg.batch_size).enumerate() {
        hooks.check()?;
        let b = cfg.batch_size.min(n - s);
        let labels = &sub.labels[s..s + b];
        let old = journal.get::<AttackBatch>(JOURNAL_PART, batch, |e| {
            let r = &e.record;
            r.start == s
                && r.size == b
                && ["adv", "loss"].iter().all(|t| e.tensors.contains_key(*t))
        });
        let (rec, adv, adv_loss) = match old {
            Some(e) => (
                e.record.clone(),
                e.tensor("adv")?.clone(),
                e.tensor("loss")?.clone(),
            ),
            None => {
                let y = Tensor::from_slice(labels, b, device)?;
                let x = batch_tensor(&sub, s, b, device)?;
                let clean = clf.logits(&x, false)?;
                let mut rng = Rng::derive(cfg.seed, &[ADV_STREAM, batch as u64]);
                let res = if cfg.early_stop {
                    let objective = |xa: &Tensor| -> candle::Result<(Tensor, Tensor)> {
                        let logits = clf.logits(xa, false)?;
                        let ce = cross_entropy_per_example(&logits, &y)?;
                        let still_correct = logits.argmax(1)?.to_dtype(DType::I64)?.eq(&y)?;
                        Ok((ce, still_correct))
                    };
                    pgd_early_stop(&x, objective, &pgd_cfg, &mut rng)?
                } else {
                    let objective =
                        |xa: &Tensor| cross_entropy_per_example(&clf.logits(xa, false)?, &y);
                    pgd(&x, objective, &pgd_cfg, &mut rng)?
                };
                let logits = clf.logits(&res.adv, false)?;
                let adv_loss = cross_entropy_per_example(&logits, &y)?;
                let rec = AttackBatch {
                    start: s,
                    size: b,
                    clean_correct: count_correct(&clean, labels)?,
                    adv_correct: count_correct(&logits, labels)?,
                    clean_loss: cross_entropy_per_example(&clean, &y)?
                        .to_dtype(DType::F64)?
                        .sum_all()?
                        .to_scalar::<f64>()?,
                };
                journal.put(
                    JOURNAL_PART,
                    batch,
                    &rec,
                    &[("adv", &res.adv), ("loss", &adv_loss)],
                )?;
                (rec, res.adv, adv_loss)
            }
        };
        clean_correct += rec.clean_correct;
        clean_loss += rec.clean_loss;
        adv_correct += rec.adv_correct;
        loss.extend(adv_loss.to_vec1::<f32>()?);
        images.extend(adv.flatten_all()?.to_vec1::<f32>()?);
        (hooks.progress)(
            (s + b) as u64,
            n as u64,
            &format!(
                "clean {:.3} adversarial {:.3}",
                clean_correct as f64 / (s + b) as f64,
                adv_correct as f64 / (s + b) as f64
            ),
        );
    }
    let mean = |v: f64| if n == 0 { 0.0 } else { v / n as f64 };
    let mean_loss = mean(loss.iter().map(|&l| f64::from(l)).sum());
    Ok(AttackOutcome {
        set: AdversarialSet {
            images,
            labels: sub.labels.clone(),
            loss,
            source_index: indices.iter().map(|&i| i as i64).collect(),
            n,
            h: sub.h,
            w: sub.w,
            classes: classes.to_vec(),
            attack: Value::Null,
        },
        clean_correct,
        adv_correct,
        clean_mean_loss: mean(clean_loss),
        mean_loss,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The `metrics.json` of a finished run (accuracies as fractions in `[0, 1]`).
pub fn metrics_json(out: &AttackOutcome, record: &Value, device: &str) -> Value {
    let n = out.set.n;
    let frac = |c: usize| if n == 0 { 0.0 } else { c as f64 / n as f64 };
    json!({
        "clean_acc": frac(out.clean_correct),
        "adv_acc": frac(out.adv_correct),
        "clean_mean_loss": out.clean_mean_loss,
        "mean_loss": out.mean_loss,
        "n": n,
        "name": record["name"],
        "attack": record,
        "seconds": out.seconds,
        "device": device,
    })
}

impl TypedStage for AttackDataset {
    const KIND: &'static str = "attack_dataset";
    const VERSION: u32 = 1;
    type Params = AttackDatasetParams;

    fn inputs() -> Slots {
        const S: &[Slot] = &[Slot::required("model"), Slot::required("dataset")];
        Slots::Fixed(S)
    }

    fn check(p: &AttackDatasetParams) -> Vec<ParamError> {
        let mut e = Checks::default();
        evaluate::check_attack(&mut e, "", p.norm, p.eps, Some(p.alpha), p.restarts);
        e.positive("batch_size", p.batch_size);
        if let Some(k) = p.test_subset {
            e.positive("test_subset", k);
        }
        e.device(p.device);
        e.into_errors()
    }

    fn canonicalize(
        p: AttackDatasetParams,
        _ctx: &NormalizeCtx<'_>,
    ) -> Result<AttackDatasetParams, Vec<ParamError>> {
        Ok(p.canonical())
    }

    fn key_params(p: &AttackDatasetParams) -> Value {
        crate::params::key_with_backend(p, p.device)
    }

    fn outputs(_: &AttackDatasetParams) -> Vec<String> {
        vec![ADVERSARIAL_FILE.into(), "metrics.json".into()]
    }

    fn resources(p: &AttackDatasetParams) -> Resources {
        crate::params::device_resources(p.device)
    }

    fn explain_failure(params: &serde_json::Value, message: &str) -> Option<String> {
        crate::device::out_of_memory_hint(params, message, &["batch_size"])
    }

    fn run(p: &AttackDatasetParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        let ctx = &*ctx;
        let device = p.device.open()?;
        let clf = evaluate::load_model(ctx, &device)?;
        let dataset = evaluate::load_data(ctx, &clf)?;
        if clf.spec().ncrop.is_some() {
            ctx.log("n-crop classifier: attacking its head on whole images (the stored images are images, not views)");
        }
        let indices = subset_indices(&dataset.test, &dataset.classes, p.test_subset, p.seed)?;
        let record = p.record();
        ctx.log(format!("attacking {} test images: {record}", indices.len()));
        let progress = |done: u64, total: u64, msg: &str| ctx.progress(done, total, msg);
        let log = |msg: &str| ctx.log(msg);
        let cancelled = || ctx.is_cancelled();
        let hooks = Hooks {
            progress: &progress,
            log: &log,
            cancelled: &cancelled,
        };
        // finished batches survive a crash: a rerun of this key replays them
        let journal = Journal::at(ctx.scratch_dir());
        let mut out = attack_split(
            &clf,
            &dataset.test,
            &indices,
            &dataset.classes,
            &p.config(),
            &device,
            &hooks,
            &journal,
        )?;
        if journal.replayed() > 0 {
            ctx.log(format!(
                "{} batches replayed from the journal of an interrupted run",
                journal.replayed()
            ));
        }
        out.set.attack = record.clone();
        out.set.write(&ctx.out_path(ADVERSARIAL_FILE))?;
        let metrics = metrics_json(&out, &record, p.device.backend());
        crate::params::write_json(&ctx.out_path("metrics.json"), &metrics)?;
        ctx.log(format!("done: {metrics}"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::evaluate::testutil;
    use serde_json::json;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

    fn normalize(v: Value) -> std::result::Result<Value, Vec<ParamError>> {
        testutil::normalize("attack_dataset", v)
    }

    #[test]
    fn defaults_canonical_form_and_named_errors() -> TestResult {
        let a = normalize(json!({})).map_err(|e| format!("{e:?}"))?;
        let b = normalize(
            json!({"norm": "linf", "eps": "8/255", "alpha": "2/255", "steps": 10, "restarts": 1,
            "random_start": true, "early_stop": false, "batch_size": 64, "seed": 0}),
        )
        .map_err(|e| format!("{e:?}"))?;
        assert_eq!(a, b);
        assert_eq!(a["eps"], json!(8.0 / 255.0));
        // random_start cannot matter for l_1: keyed alike
        let c = normalize(json!({"norm": "l1", "eps": 1, "random_start": true}))
            .map_err(|e| format!("{e:?}"))?;
        let d = normalize(json!({"norm": "l1", "eps": 1, "random_start": false}))
            .map_err(|e| format!("{e:?}"))?;
        assert_eq!(c, d);
        assert_ne!(
            a,
            normalize(json!({"early_stop": true})).map_err(|e| format!("{e:?}"))?
        );
        let e = testutil::errors(
            "attack_dataset",
            json!({"eps": -1, "alpha": "1/0", "batch_size": 0}),
        );
        assert!(e.iter().any(|m| m.starts_with("alpha:")), "{e:?}");
        let e = testutil::errors(
            "attack_dataset",
            json!({"eps": -1, "restarts": 0, "batch_size": 0, "test_subset": 0}),
        );
        for p in ["eps:", "restarts:", "batch_size:", "test_subset:"] {
            assert!(e.iter().any(|m| m.starts_with(p)), "{p} {e:?}");
        }
        let e = testutil::errors("attack_dataset", json!({"norm": "l3"}));
        assert!(e.iter().any(|m| m.starts_with("norm:")), "{e:?}");
        let e = testutil::errors("attack_dataset", json!({"eps": 0.1, "step": 3}));
        assert!(e.iter().any(|m| m.contains("step")), "{e:?}");
        Ok(())
    }

    fn run(
        p: &AttackDatasetParams,
        clf: &Classifier,
        d: &crate::data::Dataset,
    ) -> std::result::Result<(Vec<usize>, AttackOutcome), Error> {
        let idx = subset_indices(&d.test, &d.classes, p.test_subset, p.seed)?;
        let out = attack_split(
            clf,
            &d.test,
            &idx,
            &d.classes,
            &p.config(),
            &Device::Cpu,
            &Hooks::default(),
            &Journal::off(),
        )?;
        Ok((idx, out))
    }

    #[test]
    fn an_interrupted_run_resumes_from_its_journal_bit_identically() -> TestResult {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let d = testutil::data();
        let clf = testutil::trained_classifier()?;
        let p = params(json!({"steps": 3, "test_subset": 5, "batch_size": 6, "seed": 2}));
        let (idx, fresh) = run(&p, &clf, &d)?;
        assert!(idx.len() > 12, "at least three batches");
        let tmp = crate::data::testutil::TempDir::new("attack-dataset-journal");
        let attack = |hooks: &Hooks<'_>, journal: &Journal| {
            attack_split(
                &clf,
                &d.test,
                &idx,
                &d.classes,
                &p.config(),
                &Device::Cpu,
                hooks,
                journal,
            )
        };
        // interrupted before its third batch
        let polls = AtomicUsize::new(0);
        let cancelled = || polls.fetch_add(1, Ordering::Relaxed) >= 2;
        let hooks = Hooks {
            cancelled: &cancelled,
            ..Hooks::default()
        };
        let first = Journal::at(tmp.path());
        let err = attack(&hooks, &first).err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("interrupted"));
        assert_eq!(first.replayed(), 0);
        // the rerun replays the two finished batches and gives the uninterrupted result
        let again = Journal::at(tmp.path());
        let resumed = attack(&Hooks::default(), &again)?;
        assert_eq!(again.replayed(), 2);
        assert_eq!(resumed.set, fresh.set);
        assert_eq!(
            (resumed.clean_correct, resumed.adv_correct),
            (fresh.clean_correct, fresh.adv_correct)
        );
        assert_eq!(
            (
                resumed.clean_mean_loss.to_bits(),
                resumed.mean_loss.to_bits()
            ),
            (fresh.clean_mean_loss.to_bits(), fresh.mean_loss.to_bits())
        );
        // a record of another batch layout is not replayed
        let other = AttackDatasetConfig {
            batch_size: 5,
            ..p.config()
        };
        let third = Journal::at(tmp.path());
        let r = attack_split(
            &clf,
            &d.test,
            &idx,
            &d.classes,
            &other,
            &Device::Cpu,
            &Hooks::default(),
            &third,
        )?;
        assert_eq!(third.replayed(), 0);
        assert_eq!(r.set.labels, fresh.set.labels);
        Ok(())
    }

    fn params(v: Value) -> AttackDatasetParams {
        serde_json::from_value(v).unwrap_or_else(|e| panic!("valid params: {e}"))
    }

    #[test]
    fn stored_images_stay_in_the_ball_and_box_and_losses_recompute() -> TestResult {
        let d = testutil::data();
        let clf = testutil::trained_classifier()?;
        let tmp = crate::data::testutil::TempDir::new("attack-dataset-ball");
        for (norm, eps, alpha) in [
            ("linf", 8.0 / 255.0, 2.0 / 255.0),
            ("l2", 0.5, 0.15),
            ("l1", 4.0, 2.0),
        ] {
            let p = params(
                json!({"norm": norm, "eps": eps, "alpha": alpha, "steps": 5, "restarts": 2,
                "test_subset": 6, "batch_size": 10, "seed": 3}),
            );
            let (idx, mut out) = run(&p, &clf, &d)?;
            assert_eq!(idx.len(), 24);
            assert_eq!(out.set.n, 24);
            out.set.attack = p.record();
            // through the file
            let path = tmp.path().join(format!("{norm}.safetensors"));
            out.set.write(&path)?;
            let set = AdversarialSet::load(&path)?;
            assert_eq!(set, out.set);
            assert_eq!(
                set.attack["name"],
                json!(format!("pgd_{norm}_{}", evaluate::format_radius(eps)))
            );
            assert_eq!(set.classes, d.classes);
            let mut moved = 0;
            for (i, &src) in idx.iter().enumerate() {
                assert_eq!(set.source_index[i], src as i64);
                assert_eq!(set.labels[i], d.test.labels[src]);
                let orig: Vec<f64> = d
                    .test
                    .image(src)
                    .iter()
                    .map(|&v| f64::from(v) / 255.0)
                    .collect();
                let adv = set.image(i);
                assert!(
                    adv.iter().all(|v| (0.0..=1.0).contains(v)),
                    "{norm}: outside the box"
                );
                let delta: Vec<f64> = adv
                    .iter()
                    .zip(&orig)
                    .map(|(a, o)| f64::from(*a) - o)
                    .collect();
                let size = match norm {
                    "linf" => delta.iter().fold(0.0f64, |m, v| m.max(v.abs())),
                    "l2" => delta.iter().map(|v| v * v).sum::<f64>().sqrt(),
                    _ => delta.iter().map(|v| v.abs()).sum::<f64>(),
                };
                assert!(
                    size <= eps * (1.0 + 1e-5) + 1e-6,
                    "{norm}: image {i} moved {size} > {eps}"
                );
                if size > eps / 2.0 {
                    moved += 1;
                }
            }
            assert!(
                moved > 12,
                "{norm}: only {moved} of 24 images moved by more than eps/2"
            );
            // per-example losses: a fresh forward of the stored images in one batch
            let x = Tensor::from_slice(&set.images, (set.n, 3, set.h, set.w), &Device::Cpu)?;
            let y = Tensor::from_slice(&set.labels, set.n, &Device::Cpu)?;
            let logits = clf.logits(&x, false)?;
            let ce = cross_entropy_per_example(&logits, &y)?.to_vec1::<f32>()?;
            for (a, b) in ce.iter().zip(&set.loss) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                    "{norm}: loss {b} vs recomputed {a}"
                );
            }
            let mean: f64 = ce.iter().map(|&v| f64::from(v)).sum::<f64>() / 24.0;
            assert!((mean - out.mean_loss).abs() < 1e-4, "{norm}");
            assert_eq!(
                out.adv_correct,
                count_correct(&logits, &set.labels)?,
                "{norm}"
            );
            // clean numbers: the same images through the plain forward
            let xc = batch_tensor(&d.test.select(&idx), 0, 24, &Device::Cpu)?;
            assert_eq!(
                out.clean_correct,
                count_correct(&clf.logits(&xc, false)?, &set.labels)?
            );
            assert!(out.adv_correct <= out.clean_correct, "{norm}: {out:?}");
            assert!(
                out.mean_loss > out.clean_mean_loss,
                "{norm}: the attack did not raise the loss"
            );
            // evaluate's transfer accuracy on the set is the white-box accuracy
            let t = evaluate::evaluate_transfer(
                &clf,
                &set,
                Some(&d.test),
                7,
                &Device::Cpu,
                &Hooks::default(),
            )?;
            assert_eq!(
                (t.correct, t.clean_correct),
                (out.adv_correct, Some(out.clean_correct))
            );
            let m = metrics_json(&out, &set.attack, "cpu");
            assert_eq!(m["adv_acc"], json!(out.adv_correct as f64 / 24.0));
            assert_eq!(m["name"], set.attack["name"]);
        }
        Ok(())
    }

    #[test]
    fn early_stop_keeps_the_first_fooling_iterate() -> TestResult {
        let d = testutil::data();
        let clf = testutil::trained_classifier()?;
        let base = json!({"eps": 16.0 / 255.0, "alpha": 2.0 / 255.0, "steps": 8, "random_start": false,
            "test_subset": 8, "batch_size": 16});
        let mut es = base.clone();
        es["early_stop"] = json!(true);
        let (idx, plain) = run(&params(base), &clf, &d)?;
        let (_, early) = run(&params(es), &clf, &d)?;
        assert_eq!(plain.clean_correct, early.clean_correct);
        assert!(plain.adv_correct < plain.clean_correct, "{plain:?}");
        // examples evolve independently (eval mode): an example the early-stopped attack never
        // fooled was never fooled on the plain trajectory either
        assert!(
            early.adv_correct <= plain.adv_correct,
            "{} > {}",
            early.adv_correct,
            plain.adv_correct
        );
        let sub = d.test.select(&idx);
        let x = batch_tensor(&sub, 0, sub.n, &Device::Cpu)?;
        let clean_pred = clf.logits(&x, false)?.argmax(1)?.to_vec1::<u32>()?;
        let (mut frozen, mut stepped) = (0, 0);
        for (i, &pred) in clean_pred.iter().enumerate() {
            let orig: Vec<f32> = sub.image(i).iter().map(|&v| f32::from(v) / 255.0).collect();
            let same_es = early.set.image(i) == orig.as_slice();
            if i64::from(pred) != sub.labels[i] {
                // misclassified from the start: never stepped
                assert!(same_es, "image {i} is misclassified but was perturbed");
                frozen += 1;
            } else {
                assert!(!same_es, "image {i} is correct but was not perturbed");
                stepped += 1;
                // the plain attack took all 8 steps on the same trajectory, the early-stopped
                // one stopped at the first iterate that fooled the model: it stays fooled
                let fooled = |img: &[f32]| -> candle::Result<bool> {
                    let xa = Tensor::from_slice(img, (1, 3, sub.h, sub.w), &Device::Cpu)?;
                    Ok(
                        i64::from(clf.logits(&xa, false)?.argmax(1)?.to_vec1::<u32>()?[0])
                            != sub.labels[i],
                    )
                };
                if fooled(plain.set.image(i))? {
                    assert!(
                        fooled(early.set.image(i))?,
                        "image {i}: plain PGD fools it, early-stopped PGD kept a correct one"
                    );
                }
            }
        }
        assert!(
            frozen > 0 && stepped > 0,
            "{frozen} misclassified, {stepped} attacked"
        );
        Ok(())
    }
}
