//! `pseudo_labels`: AdvCL's cluster pseudo-labels (METHODS.md 8.1, the engine recipe of
//! \[Q51\]): backbone features of every training and test image from a pretrained encoder,
//! l2-normalised, clustered by k-means (k-means++ seeding, Lloyd until no assignment changes)
//! once per `K`. `pretrain` with `method: advcl` reads them through its `labels` input.
//!
//! R-ADV ships labels from k-means on an unreleased ImageNet-pretrained contrastive model
//! ("ClusterFit"); this kind recomputes them from any encoder the pipeline has (a `pretrain`
//! node: SimCLR on the same images is the closest stand-in), a documented deviation.
//!
//! # Inputs
//!
//! - `encoder` (required): a `pretrain` artifact (`encoder.safetensors`), any method.
//! - `dataset` (required): the dataset whose train split AdvCL pretrains on.
//!
//! # Params
//!
//! | param | default | meaning |
//! |---|---|---|
//! | `ks` | `[2, 10, 50, 100, 500]` | cluster counts, one label set (and one AdvCL head) each, in this order |
//! | `branch` | `normal` | the encoder's BN branch the features are read through (`pgd` for an adversarially pretrained dual-BN encoder) |
//! | `max_iter` | 300 | Lloyd passes at most (the log says when a `K` stopped before converging) |
//! | `seed` | 0 | the k-means++ draws (one stream per `K`) |
//! | `device` | `auto` | `auto`, `cpu` or `cuda:N` (the backend is keyed, the ordinal is not) |
//!
//! Features are the encoder's backbone output (`8 · width`, after the average pool) in eval
//! mode, on the un-augmented images, with the encoder's own input normalisation if it has one.
//!
//! # Outputs
//!
//! - `labels.safetensors` ([`PseudoLabels`]): `ks` U32 `[len(ks)]`, and per `K`
//!   `train_{K}` / `test_{K}` U32 (`0..K`, one per image of the split, in the dataset's order).
//! - `metrics.json`: per `K` the k-means `inertia_{K}` (of the training features),
//!   `iterations_{K}`, `converged_{K}`, the smallest / largest cluster, and `purity_{K}` (the
//!   share of training images whose cluster's majority class is their own class: how much of
//!   the labels the clusters recover); `seconds`, `n_train`, `n_test`, `feature_dim`, `device`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use pipe_engine::{BoxError, ParamError, Resources, Slot, Slots, StageCtx, TypedStage};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::data::{self, Split, tensor_io::DATA_FILE};
use crate::device::DeviceSpec;
use crate::kinds::pretrain::ENCODER_FILE;
use crate::nn::checkpoint;
use crate::nn::heads::{ENCODER, l2_normalize};
use crate::nn::kmeans::kmeans;
use crate::nn::resnet::{DEFAULT_BRANCH, INPUT_NORM, ResNet, ResNetConfig, resnet18};
use crate::params::Checks;
use crate::rng::Rng;

/// The `pseudo_labels` kind.
pub struct PseudoLabelsKind;

/// The label file.
pub const LABELS_FILE: &str = "labels.safetensors";

/// R-ADV's cluster counts.
pub const ADVCL_KS: [usize; 5] = [2, 10, 50, 100, 500];

/// Images per encoder call.
const CHUNK: usize = 256;

/// First word of the k-means streams (`Rng::derive(seed, &[KMEANS_STREAM, K])`).
const KMEANS_STREAM: u64 = 0x4b4d_4541; // "KMEA"

type Result<T> = std::result::Result<T, BoxError>;

fn default_ks() -> Vec<usize> {
    ADVCL_KS.to_vec()
}
fn default_branch() -> String {
    DEFAULT_BRANCH.to_string()
}
fn default_max_iter() -> usize {
    300
}

/// Params of `pseudo_labels` (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PseudoLabelsParams {
    /// Cluster counts.
    #[serde(default = "default_ks")]
    pub ks: Vec<usize>,
    /// BN branch of the encoder.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// Lloyd passes at most.
    #[serde(default = "default_max_iter")]
    pub max_iter: usize,
    /// Seed.
    #[serde(default)]
    pub seed: u64,
    /// Device.
    #[serde(default)]
    pub device: DeviceSpec,
}

/// Pseudo-label sets of a dataset's two splits (see the module docs for the file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PseudoLabels {
    /// Cluster counts, in head order.
    pub ks: Vec<usize>,
    /// Per `K`, the label of every training image.
    pub train: Vec<Vec<u32>>,
    /// Per `K`, the label of every test image.
    pub test: Vec<Vec<u32>>,
}

impl PseudoLabels {
    /// Writes the file atomically.
    ///
    /// # Errors
    /// I/O or tensor errors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        let ks: Vec<u32> = self.ks.iter().map(|&k| k as u32).collect();
        t.insert("ks".to_string(), Tensor::new(ks.as_slice(), &dev)?);
        for (i, k) in self.ks.iter().enumerate() {
            t.insert(
                format!("train_{k}"),
                Tensor::new(self.train[i].as_slice(), &dev)?,
            );
            t.insert(
                format!("test_{k}"),
                Tensor::new(self.test[i].as_slice(), &dev)?,
            );
        }
        checkpoint::save_tensors(&t, path)?;
        Ok(())
    }

    /// Reads and checks a label file (every label below its `K`).
    ///
    /// # Errors
    /// I/O or format errors, naming the file and the tensor.
    pub fn load(path: &Path) -> Result<Self> {
        let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let t = candle::safetensors::load(path, &Device::Cpu).map_err(|e| at(&e))?;
        let get = |name: &str| -> Result<Vec<u32>> {
            let v = t.get(name).ok_or_else(|| {
                at(&format!(
                    "no tensor `{name}` (is it a `pseudo_labels` artifact?)"
                ))
            })?;
            Ok(v.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?)
        };
        let ks: Vec<usize> = get("ks")?.into_iter().map(|k| k as usize).collect();
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for &k in &ks {
            for (split, out) in [("train", &mut train), ("test", &mut test)] {
                let name = format!("{split}_{k}");
                let v = get(&name)?;
                if let Some(bad) = v.iter().find(|&&l| l as usize >= k) {
                    return Err(
                        at(&format!("`{name}` holds label {bad}, not below K = {k}")).into(),
                    );
                }
                out.push(v);
            }
        }
        Ok(Self { ks, train, test })
    }
}

impl PseudoLabelsParams {
    fn check_errors(&self) -> Vec<ParamError> {
        let mut e = Checks::default();
        e.require(!self.ks.is_empty(), "ks", || {
            "expected at least one cluster count".into()
        });
        for (i, &k) in self.ks.iter().enumerate() {
            e.require(k >= 1, &format!("ks[{i}]"), || {
                "expected a cluster count >= 1, got 0".into()
            });
            e.require(!self.ks[..i].contains(&k), &format!("ks[{i}]"), || {
                format!("{k} is listed twice")
            });
        }
        e.require(
            crate::nn::resnet::validate_branches(std::slice::from_ref(&self.branch)).is_ok(),
            "branch",
            || format!("`{}` is not a BN branch name", self.branch),
        );
        e.positive("max_iter", self.max_iter);
        e.device(self.device);
        e.into_errors()
    }
}

impl TypedStage for PseudoLabelsKind {
    const KIND: &'static str = "pseudo_labels";
    const VERSION: u32 = 1;
    type Params = PseudoLabelsParams;

    fn inputs() -> Slots {
        const S: &[Slot] = &[Slot::required("encoder"), Slot::required("dataset")];
        Slots::Fixed(S)
    }

    fn check(p: &PseudoLabelsParams) -> Vec<ParamError> {
        p.check_errors()
    }

    fn key_params(p: &PseudoLabelsParams) -> Value {
        crate::params::key_with_backend(p, p.device)
    }

    fn outputs(_: &PseudoLabelsParams) -> Vec<String> {
        [LABELS_FILE, "metrics.json"]
            .iter()
            .map(|s| (*s).to_string())
            .collect()
    }

    fn resources(p: &PseudoLabelsParams) -> Resources {
        crate::params::device_resources(p.device)
    }

    fn explain_failure(params: &serde_json::Value, message: &str) -> Option<String> {
        crate::device::out_of_memory_hint(params, message, &[])
    }

    fn run(p: &PseudoLabelsParams, ctx: &mut StageCtx<'_>) -> Result<()> {
        let ctx = &*ctx;
        let enc_path = crate::params::input_file(ctx, "encoder", ENCODER_FILE, "pretrain")?;
        let data_path = crate::params::input_file(ctx, "dataset", DATA_FILE, "dataset")?;
        let dataset = data::load_dataset(&data_path)?;
        let device = p.device.open()?;
        let backbone = load_backbone(&enc_path, &p.branch, &device)?;
        ctx.log(format!(
            "encoder: width {}, branches {:?}, reading `{}`; {} training and {} test images",
            backbone.width(),
            backbone.branches(),
            p.branch,
            dataset.train.n,
            dataset.test.n
        ));
        let progress = |done: u64, total: u64, msg: &str| ctx.progress(done, total, msg);
        let log = |msg: &str| ctx.log(msg);
        let start = Instant::now();
        let (labels, mut metrics) = compute(
            &backbone,
            &p.branch,
            &dataset.train,
            &dataset.test,
            p,
            &device,
            &progress,
            &log,
        )?;
        labels.save(&ctx.out_path(LABELS_FILE))?;
        for (k, v) in purity(&labels, &dataset.train.labels) {
            metrics.insert(format!("purity_{k}"), json!(v));
        }
        metrics.insert("seconds".into(), json!(start.elapsed().as_secs_f64()));
        metrics.insert("device".into(), json!(p.device.backend()));
        let metrics = Value::Object(metrics);
        crate::params::write_json(&ctx.out_path("metrics.json"), &metrics)?;
        ctx.log(format!("done: {metrics}"));
        Ok(())
    }
}

/// The backbone of an encoder checkpoint with the BN branches it holds (its default one and
/// `branch`), ready for eval-mode forwards through `branch`.
///
/// # Errors
/// A file that is not an encoder, or one without `branch`.
pub fn load_backbone(path: &Path, branch: &str, device: &Device) -> Result<ResNet> {
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let tensors = candle::safetensors::load(path, device).map_err(|e| at(&e))?;
    let width = match tensors.get("encoder.conv1.weight").map(Tensor::dims) {
        Some(&[w, 3, 3, 3]) if w > 0 => w,
        Some(other) => {
            return Err(at(&format!(
                "encoder.conv1.weight has shape {other:?}, expected (width, 3, 3, 3)"
            ))
            .into());
        }
        None => {
            return Err(at(&"no encoder.conv1.weight (is it a `pretrain` artifact?)").into());
        }
    };
    let mut branches = vec![DEFAULT_BRANCH.to_string()];
    if branch != DEFAULT_BRANCH {
        if !tensors.contains_key(&format!("encoder.bn1.{branch}.weight")) {
            return Err(at(&format!(
                "the encoder has no BN branch `{branch}` (no encoder.bn1.{branch}.weight)"
            ))
            .into());
        }
        branches.push(branch.to_string());
    }
    let input_norm = tensors.contains_key(&format!("encoder.{INPUT_NORM}.mean"));
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Ok(resnet18(
        &ResNetConfig {
            width,
            branches,
            input_norm,
        },
        vb.pp(ENCODER),
    )
    .map_err(|e| at(&e))?)
}

/// The l2-normalised eval-mode backbone features `(n, 8w)` of a split.
///
/// # Errors
/// Tensor errors.
pub fn features(
    backbone: &ResNet,
    branch: &str,
    split: &Split,
    device: &Device,
    progress: &dyn Fn(usize),
) -> Result<Tensor> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < split.n {
        let len = CHUNK.min(split.n - start);
        let x = crate::kinds::evaluate::batch_tensor(split, start, len, device)?;
        out.push(l2_normalize(&backbone.forward_branch(&x, branch, false)?)?);
        start += len;
        progress(start);
    }
    if out.is_empty() {
        return Err("the split has no images".into());
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// Features of both splits, then k-means per `K` on the training features; each test image
/// gets its nearest training centre. Returns the labels and the k-means metrics.
///
/// # Errors
/// `K` larger than the training split, or tensor errors.
#[allow(clippy::too_many_arguments)]
pub fn compute(
    backbone: &ResNet,
    branch: &str,
    train: &Split,
    test: &Split,
    p: &PseudoLabelsParams,
    device: &Device,
    progress: &(dyn Fn(u64, u64, &str) + Sync),
    log: &(dyn Fn(&str) + Sync),
) -> Result<(PseudoLabels, Map<String, Value>)> {
    if let Some(&k) = p.ks.iter().find(|&&k| k > train.n) {
        return Err(format!("ks asks for {k} clusters of {} training images", train.n).into());
    }
    let total = (train.n + test.n + p.ks.len()) as u64;
    let ftrain = features(backbone, branch, train, device, &|d| {
        progress(d as u64, total, "features (train)");
    })?;
    let ftest = if test.n > 0 {
        Some(features(backbone, branch, test, device, &|d| {
            progress((train.n + d) as u64, total, "features (test)");
        })?)
    } else {
        None
    };
    let mut metrics = Map::new();
    metrics.insert("n_train".into(), json!(train.n));
    metrics.insert("n_test".into(), json!(test.n));
    metrics.insert("feature_dim".into(), json!(ftrain.dim(1)?));
    let mut out = PseudoLabels {
        ks: p.ks.clone(),
        train: Vec::new(),
        test: Vec::new(),
    };
    for (i, &k) in p.ks.iter().enumerate() {
        let t0 = Instant::now();
        let mut rng = Rng::derive(p.seed, &[KMEANS_STREAM, k as u64]);
        let r = kmeans(&ftrain, k, p.max_iter, &mut rng)?;
        let mut sizes = vec![0usize; k];
        r.labels.iter().for_each(|&l| sizes[l as usize] += 1);
        log(&format!(
            "K = {k}: {} Lloyd passes{}, inertia {:.4}, clusters of {}..{} images, {:.1} s",
            r.iterations,
            if r.converged {
                ""
            } else {
                " (max_iter reached: not converged)"
            },
            r.inertia,
            sizes.iter().min().unwrap_or(&0),
            sizes.iter().max().unwrap_or(&0),
            t0.elapsed().as_secs_f64()
        ));
        metrics.insert(format!("inertia_{k}"), json!(r.inertia));
        metrics.insert(format!("iterations_{k}"), json!(r.iterations));
        metrics.insert(format!("converged_{k}"), json!(r.converged));
        metrics.insert(format!("smallest_{k}"), json!(sizes.iter().min()));
        metrics.insert(format!("largest_{k}"), json!(sizes.iter().max()));
        let test_labels = match &ftest {
            Some(f) => nearest(f, &r.centroids, k, device)?,
            None => Vec::new(),
        };
        out.train.push(r.labels);
        out.test.push(test_labels);
        progress(
            (train.n + test.n + i + 1) as u64,
            total,
            &format!("k-means K = {k}"),
        );
    }
    Ok((out, metrics))
}

/// The nearest centre (squared Euclidean, first on ties) of every row of `f`.
fn nearest(f: &Tensor, centroids: &[f32], k: usize, device: &Device) -> Result<Vec<u32>> {
    let d = f.dim(1)?;
    let c = Tensor::from_slice(centroids, (k, d), device)?;
    let dist = c
        .sqr()?
        .sum(1)?
        .unsqueeze(0)?
        .broadcast_sub(&(f.matmul(&c.t()?)? * 2.0)?)?;
    Ok(dist.argmin(candle::D::Minus1)?.to_vec1::<u32>()?)
}

/// Per `K`, the share of training images in a cluster whose majority class is their own.
pub fn purity(labels: &PseudoLabels, classes: &[i64]) -> Vec<(usize, f64)> {
    labels
        .ks
        .iter()
        .zip(&labels.train)
        .map(|(&k, assign)| {
            let mut counts: HashMap<(u32, i64), usize> = HashMap::new();
            for (a, c) in assign.iter().zip(classes) {
                *counts.entry((*a, *c)).or_default() += 1;
            }
            let mut best = vec![0usize; k];
            for ((a, _), n) in counts {
                best[a as usize] = best[a as usize].max(n);
            }
            let n = assign.len().max(1);
            (k, best.iter().sum::<usize>() as f64 / n as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_bad_files_are_named() -> Result<()> {
        let dir = crate::data::testutil::TempDir::new("pseudo-labels");
        let l = PseudoLabels {
            ks: vec![2, 3],
            train: vec![vec![0, 1, 1], vec![2, 0, 1]],
            test: vec![vec![1], vec![2]],
        };
        let path = dir.path().join(LABELS_FILE);
        l.save(&path)?;
        assert_eq!(PseudoLabels::load(&path)?, l);
        let bad = PseudoLabels {
            ks: vec![2],
            train: vec![vec![0, 2]],
            test: vec![vec![]],
        };
        bad.save(&path)?;
        let e = PseudoLabels::load(&path)
            .expect_err("a label above K")
            .to_string();
        assert!(e.contains("train_2") && e.contains("label 2"), "{e}");
        // purity: K = 2 puts classes (5) and (5, 6) together: 2 of 3 images in their
        // cluster's majority class
        let p = purity(&l, &[5, 5, 6]);
        assert_eq!(p[0].0, 2);
        assert!((p[0].1 - 2.0 / 3.0).abs() < 1e-12, "{p:?}");
        assert!((p[1].1 - 1.0).abs() < 1e-12, "singleton clusters are pure");
        let p = purity(
            &PseudoLabels {
                ks: vec![2],
                train: vec![vec![0, 0, 1, 1]],
                test: vec![vec![]],
            },
            &[1, 1, 1, 2],
        );
        assert!((p[0].1 - 0.75).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn params_are_checked() {
        let p: PseudoLabelsParams = serde_json::from_value(json!({})).expect("defaults");
        assert_eq!(p.ks, ADVCL_KS);
        assert!(p.check_errors().is_empty());
        let p: PseudoLabelsParams =
            serde_json::from_value(json!({"ks": [10, 0, 10], "max_iter": 0})).expect("parse");
        let e: Vec<String> = p
            .check_errors()
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect();
        assert!(e.iter().any(|e| e.contains("ks[1]")), "{e:?}");
        assert!(
            e.iter().any(|e| e.contains("ks[2]") && e.contains("twice")),
            "{e:?}"
        );
        assert!(e.iter().any(|e| e.contains("max_iter")), "{e:?}");
    }
}

#[cfg(test)]
mod backbone_tests {
    use super::*;
    use crate::kinds::pretrain::{PretrainParams, Pretrainer};

    /// An ACL checkpoint (input normalisation, `normal` + `pgd` branches) read back through
    /// either branch gives the trained backbone's own eval-mode features; a missing branch is
    /// named; the labels of a whole run are deterministic and in range.
    #[test]
    fn features_come_from_the_chosen_branch_of_the_checkpoint() -> Result<()> {
        let d = crate::data::synthetic(&crate::data::SyntheticConfig {
            n_classes: 3,
            n_train: 24,
            n_test: 6,
            image_size: 32,
            seed: 2,
        });
        let cfg = serde_json::from_value::<PretrainParams>(json!({
            "method": "acl", "width": 4, "batch_size": 8, "epochs": 1, "pgd_steps": 1,
            "warmup_epochs": 0, "seed": 3,
        }))?
        .config();
        let mut t = Pretrainer::new(cfg, &d.train, &Device::Cpu)?;
        t.train_epoch(&crate::kinds::pretrain::TrainHooks::default())?;
        let tmp = crate::data::testutil::TempDir::new("pseudo-labels-acl");
        let path = tmp.path().join("encoder.safetensors");
        t.save_encoder(&path)?;
        let x = crate::kinds::evaluate::batch_tensor(&d.train, 0, 24, &Device::Cpu)?;
        for branch in ["normal", "pgd"] {
            let loaded = load_backbone(&path, branch, &Device::Cpu)?;
            assert!(loaded.has_input_norm());
            let got = features(&loaded, branch, &d.train, &Device::Cpu, &|_| {})?;
            let want = l2_normalize(&t.backbone().forward_branch(&x, branch, false)?)?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{branch}: {diff}");
        }
        let e = load_backbone(&path, "pgd_ce", &Device::Cpu).expect_err("no such branch");
        assert!(e.to_string().contains("no BN branch `pgd_ce`"), "{e}");
        let backbone = load_backbone(&path, "pgd", &Device::Cpu)?;
        let p: PseudoLabelsParams = serde_json::from_value(json!({"ks": [3, 5], "branch": "pgd"}))?;
        let run = || {
            compute(
                &backbone,
                "pgd",
                &d.train,
                &d.test,
                &p,
                &Device::Cpu,
                &|_, _, _| {},
                &|_| {},
            )
        };
        let (a, _) = run()?;
        let (b, _) = run()?;
        assert_eq!(a, b);
        assert_eq!((a.train[1].len(), a.test[1].len()), (24, 6));
        assert!(a.train[1].iter().chain(&a.test[1]).all(|&l| l < 5));
        let big: PseudoLabelsParams = serde_json::from_value(json!({"ks": [25]}))?;
        let e = compute(
            &backbone,
            "pgd",
            &d.train,
            &d.test,
            &big,
            &Device::Cpu,
            &|_, _, _| {},
            &|_| {},
        )
        .expect_err("more clusters than images");
        assert!(e.to_string().contains("25 clusters of 24"), "{e}");
        Ok(())
    }
}
