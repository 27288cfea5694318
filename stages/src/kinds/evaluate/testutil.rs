//! Test helpers shared by the `evaluate` and `attack_dataset` tests: synthetic data and a
//! small classifier trained on it once per test process.

use std::path::Path;
use std::sync::OnceLock;

use candle::{Device, Tensor};
use pipe_engine::{NormalizeCtx, ParamError};
use serde_json::Value;

use super::batch_tensor;
use crate::data::{Dataset, SyntheticConfig, synthetic};
use crate::nn::classifier::{Classifier, ClassifierSpec, FeatureKind, SPEC_FILE, WEIGHTS_FILE};
use crate::nn::init::trainable;
use crate::nn::losses::cross_entropy;
use crate::nn::optim::{Sgd, SgdConfig};
use crate::rng::Rng;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Normalizes `v` as params of `kind` through the registry.
pub(crate) fn normalize(kind: &str, v: Value) -> Result<Value, Vec<ParamError>> {
    let mut reg = pipe_engine::Registry::new();
    crate::register_all(&mut reg);
    let kind = reg.get(kind).expect("registered");
    kind.normalize(
        v,
        &NormalizeCtx {
            pipeline_dir: Path::new("."),
        },
    )
}

/// The `path: message` errors of params that must fail.
pub(crate) fn errors(kind: &str, v: Value) -> Vec<String> {
    match normalize(kind, v) {
        Ok(p) => panic!("expected errors, got {p}"),
        Err(e) => e
            .into_iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect(),
    }
}

/// 4 classes of 32×32 synthetic images: 256 train, 64 test (16 per class).
pub(crate) fn data() -> Dataset {
    synthetic(&SyntheticConfig {
        n_classes: 4,
        n_train: 256,
        n_test: 64,
        image_size: 32,
        seed: 5,
    })
}

/// The spec of the trained classifier: width 8, backbone features, 4 classes.
pub(crate) fn spec() -> ClassifierSpec {
    ClassifierSpec {
        width: 8,
        hidden_dim: 16,
        features: FeatureKind::Backbone,
        classes: 4,
        ncrop: None,
        input_norm: false,
    }
}

/// Epochs of the fixture's training.
const EPOCHS: usize = 6;

fn train() -> Result<(Vec<u8>, String), Error> {
    let d = data();
    let dev = Device::Cpu;
    let (vm, clf) = Classifier::build_seeded(&spec(), 1, &dev)?;
    let mut opt = Sgd::new_named(
        &trainable(&vm),
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            ..SgdConfig::default()
        },
    )?;
    let mut rng = Rng::new(2);
    for _ in 0..EPOCHS {
        let perm = rng.permutation(d.train.n);
        for chunk in perm.chunks(32) {
            let sub = d.train.select(chunk);
            let x = batch_tensor(&sub, 0, sub.n, &dev)?;
            let y = Tensor::from_slice(&sub.labels, sub.n, &dev)?;
            let loss = cross_entropy(&clf.logits(&x, true)?, &y)?;
            opt.step(&loss.backward()?)?;
        }
    }
    let tmp = crate::data::testutil::TempDir::new("evaluate-fixture");
    clf.save(&vm, tmp.path())?;
    Ok((
        std::fs::read(tmp.path().join(WEIGHTS_FILE))?,
        std::fs::read_to_string(tmp.path().join(SPEC_FILE))?,
    ))
}

fn trained() -> Result<&'static (Vec<u8>, String), Error> {
    static TRAINED: OnceLock<Result<(Vec<u8>, String), String>> = OnceLock::new();
    TRAINED
        .get_or_init(|| train().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| e.clone().into())
}

/// Writes the trained classifier into `dir` (`classifier.safetensors` + `classifier.json`),
/// with `spec` instead of its own when given (an n-crop head on the same weights).
pub(crate) fn write_classifier(dir: &Path, spec: Option<&ClassifierSpec>) -> Result<(), Error> {
    let (weights, own) = trained()?;
    std::fs::write(dir.join(WEIGHTS_FILE), weights)?;
    let text = match spec {
        Some(s) => serde_json::to_string_pretty(s)?,
        None => own.clone(),
    };
    std::fs::write(dir.join(SPEC_FILE), text)?;
    Ok(())
}

/// The trained classifier, loaded (optionally under another spec).
pub(crate) fn classifier_with(spec: Option<&ClassifierSpec>) -> Result<Classifier, Error> {
    let tmp = crate::data::testutil::TempDir::new("evaluate-load");
    write_classifier(tmp.path(), spec)?;
    let (_vm, clf) = Classifier::load(
        &tmp.path().join(WEIGHTS_FILE),
        &tmp.path().join(SPEC_FILE),
        &Device::Cpu,
    )?;
    Ok(clf)
}

/// The trained classifier.
pub(crate) fn trained_classifier() -> Result<Classifier, Error> {
    classifier_with(None)
}
