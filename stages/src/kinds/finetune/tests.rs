use super::*;
use crate::data::testutil::{TempDir, four_classes};
use crate::data::{Dataset, SyntheticConfig, synthetic};
use crate::nn::checkpoint::Resumable;
use crate::nn::classifier::Classifier;
use crate::nn::heads::{EncoderConfig, HeadConfig, encoder};
use crate::nn::init::{InitRules, build_seeded, named_vars};
use crate::nn::losses::cross_entropy_per_example;
use crate::nn::resnet::ResNetConfig;
use crate::rng::Rng;
use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn params(v: Value) -> FinetuneParams {
    serde_json::from_value(v).unwrap_or_else(|e| panic!("valid params: {e}"))
}

fn normalize(v: Value) -> std::result::Result<Value, Vec<ParamError>> {
    let mut reg = pipe_engine::Registry::new();
    crate::register_all(&mut reg);
    let kind = reg.get("finetune").expect("registered");
    kind.normalize(
        v,
        &NormalizeCtx {
            pipeline_dir: Path::new("."),
        },
    )
}

fn norm_ok(v: Value) -> Value {
    normalize(v).unwrap_or_else(|e| panic!("valid params: {e:?}"))
}

fn errors(v: Value) -> Vec<String> {
    match normalize(v) {
        Ok(p) => panic!("expected errors, got {p}"),
        Err(e) => e
            .into_iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect(),
    }
}

#[test]
fn presets_fill_in_by_mode_and_head() {
    let c = params(json!({"mode": "slf"})).config();
    assert_eq!(
        (c.optimizer, c.lr, c.weight_decay, c.schedule.clone()),
        (OptimizerKind::Adam, 3e-4, 0.0, Schedule::Constant)
    );
    assert_eq!(
        (c.batch_size, c.epochs, c.drop_last, c.augment, c.head_init),
        (256, 20, true, false, HeadInit::Default)
    );
    assert_eq!((c.features, c.ncrop), (FeatureKind::PreFeature, None));
    let c = params(json!({"mode": "slf", "head": "ncrop"})).config();
    assert_eq!(
        (c.optimizer, c.lr, c.momentum, c.weight_decay),
        (OptimizerKind::Sgd, 0.03, 0.9, 5e-5)
    );
    assert_eq!(
        (c.schedule.clone(), c.batch_size, c.epochs),
        (Schedule::Cosine { t_max: 100 }, 100, 100)
    );
    let n = c.ncrop.expect("ncrop head");
    assert_eq!(
        (n.n_views, n.scale, n.ratio),
        (4, [0.08, 1.0], [0.75, 4.0 / 3.0])
    );
    let n = params(json!({"mode": "slf", "head": "ncrop", "views": "patch", "n_views": 16}))
        .config()
        .ncrop
        .expect("ncrop");
    assert_eq!(
        (n.n_views, n.scale, n.ratio),
        (16, [0.25, 0.25], [1.0, 1.0])
    );
    for mode in ["slf", "alf"] {
        let c = params(json!({"mode": mode, "preset": "air"})).config();
        assert_eq!(
            (c.optimizer, c.lr, c.momentum, c.weight_decay),
            (OptimizerKind::Sgd, 0.01, 0.9, 2e-4),
            "{mode}"
        );
        assert_eq!(
            (c.schedule.clone(), c.batch_size, c.epochs),
            (
                Schedule::Multistep {
                    milestones: vec![10, 20]
                },
                512,
                25
            )
        );
        assert_eq!(
            (c.drop_last, c.augment, c.head_init),
            (false, true, HeadInit::Zeros)
        );
    }
    let c = params(json!({"mode": "aff"})).config();
    assert_eq!(
        (c.lr, c.batch_size, c.epochs, c.schedule.clone()),
        (
            0.1,
            128,
            25,
            Schedule::Multistep {
                milestones: vec![15, 20]
            }
        )
    );
    assert_eq!(
        (c.eps, c.alpha, c.pgd_steps, c.beta),
        (8.0 / 255.0, 2.0 / 255.0, 10, 6.0)
    );
    // ALF defaults to the air preset too
    assert_eq!(
        params(json!({"mode": "alf"})).config(),
        params(json!({"mode": "alf", "preset": "air"})).config()
    );
    // a written value beats the preset
    let c =
        params(json!({"mode": "aff", "lr": 0.05, "milestones": [20, 5], "epochs": 30})).config();
    assert_eq!(
        (c.lr, c.epochs, c.schedule),
        (
            0.05,
            30,
            Schedule::Multistep {
                milestones: vec![5, 20]
            }
        )
    );
}

#[test]
fn schedules_step_per_epoch() {
    let c = params(json!({"mode": "aff"})).config();
    let lrs: Vec<f64> = [0, 14, 15, 19, 20, 24]
        .iter()
        .map(|&e| c.lr_at(e))
        .collect();
    let want = [0.1, 0.1, 0.01, 0.01, 0.001, 0.001];
    for (a, b) in lrs.iter().zip(want) {
        assert!((a - b).abs() < 1e-15, "{lrs:?}");
    }
    // R-CF's n-crop head: cosine with T_max = 100 whatever the epochs ([Q14])
    let c = params(json!({"mode": "slf", "head": "ncrop", "epochs": 20})).config();
    for e in [0usize, 7, 19, 50, 100] {
        let want = 0.03 * 0.5 * (1.0 + (std::f64::consts::PI * e as f64 / 100.0).cos());
        assert!((c.lr_at(e) - want).abs() < 1e-15, "epoch {e}");
    }
    assert_eq!(params(json!({"mode": "slf"})).config().lr_at(19), 3e-4);
}

#[test]
fn canonical_form_keys_equivalent_params_alike() {
    let a = norm_ok(json!({"mode": "slf"}));
    let b = norm_ok(json!({
        "mode": "slf", "preset": "cf_adam", "optimizer": "adam", "lr": 3e-4, "weight_decay": 0,
        "batch_size": 256, "epochs": 20, "drop_last": true, "augment": false, "features": "pre_feature",
        "head": "full", "schedule": "constant", "head_init": "default",
        // none of these apply to SLF with the full head and Adam
        "eps": 0.1, "alpha": 0.2, "pgd_steps": 3, "beta": 2, "n_views": 8, "views": "patch",
        "momentum": 0.5, "t_max": 7, "milestones": [1]
    }));
    assert_eq!(a, b);
    for k in [
        "preset",
        "eps",
        "alpha",
        "pgd_steps",
        "beta",
        "n_views",
        "views",
        "momentum",
        "t_max",
        "milestones",
    ] {
        assert!(a.get(k).is_none(), "{k} in {a}");
    }
    assert_eq!(a["lr"], json!(3e-4));
    assert_eq!(a["features"], json!("pre_feature"));
    // the per-pretraining presets fine-tune ACL-family encoders: the backbone feature
    assert_eq!(
        params(json!({"mode": "slf", "preset": "dynacl"}))
            .config()
            .features,
        FeatureKind::Backbone
    );
    assert_eq!(
        params(json!({"mode": "slf", "preset": "air"}))
            .config()
            .features,
        FeatureKind::PreFeature
    );
    // a preset and its values written out key alike
    let p = norm_ok(json!({"mode": "alf", "preset": "air"}));
    let w = norm_ok(json!({
        "mode": "alf", "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 2e-4,
        "schedule": "multistep", "milestones": [20, 10], "batch_size": 512, "epochs": 25,
        "drop_last": false, "augment": true, "head_init": "zeros", "eps": "8/255", "alpha": "2/255",
        "pgd_steps": 10, "beta": 1
    }));
    assert_eq!(p, w);
    assert!(p.get("beta").is_none());
    assert_eq!(p["milestones"], json!([10, 20]));
    assert_eq!(p["eps"], json!(8.0 / 255.0));
    // AFF keeps beta, ncrop keeps its draw and drops augment
    let f = norm_ok(json!({"mode": "aff"}));
    assert_eq!(
        (f["beta"].clone(), f["batch_size"].clone()),
        (json!(6.0), json!(128))
    );
    let n = norm_ok(json!({"mode": "slf", "head": "ncrop"}));
    assert_eq!(
        (n["n_views"].clone(), n["views"].clone(), n.get("augment")),
        (json!(4), json!("crop"), None)
    );
    assert_eq!(n["t_max"], json!(100));
    // what changes the run changes the params; the canonical form is a fixed point
    assert_ne!(a, norm_ok(json!({"mode": "slf", "lr": 1e-3})));
    assert_ne!(p, norm_ok(json!({"mode": "alf", "eps": "4/255"})));
    assert_ne!(a, norm_ok(json!({"mode": "slf", "features": "backbone"})));
    assert_eq!(norm_ok(a.clone()), a);
    assert_eq!(norm_ok(n.clone()), n);
    assert_eq!(norm_ok(f.clone()), f);
    // how often the state is written changes no result: not keyed
    let mut reg = pipe_engine::Registry::new();
    crate::register_all(&mut reg);
    let kind = reg.get("finetune").expect("registered");
    let often = norm_ok(json!({"mode": "aff", "checkpoint_minutes": 0}));
    assert_eq!(often["checkpoint_minutes"], json!(0.0));
    assert_eq!(
        kind.key_params(&often),
        kind.key_params(&norm_ok(json!({"mode": "aff"})))
    );
    let e = errors(json!({"mode": "aff", "checkpoint_minutes": "soon"}));
    assert!(e.iter().any(|m| m.contains("checkpoint_minutes")), "{e:?}");
    let e = errors(json!({"mode": "aff", "checkpoint_minutes": -2}));
    assert!(
        e.iter().any(|m| m.starts_with("checkpoint_minutes:")),
        "{e:?}"
    );
}

#[test]
fn bad_params_are_named() {
    let e = errors(json!({"mode": "alf", "head": "ncrop"}));
    assert!(
        e.iter()
            .any(|m| m.starts_with("head: the n-crop head is trained by `mode: slf` only")),
        "{e:?}"
    );
    let e = errors(json!({"mode": "slf", "head": "ncrop", "augment": true, "n_views": 0}));
    assert!(e.iter().any(|m| m.starts_with("augment:")), "{e:?}");
    assert!(e.iter().any(|m| m.starts_with("n_views:")), "{e:?}");
    let e = errors(json!({"mode": "aff", "batch_size": 1}));
    assert!(
        e.iter().any(|m| m.starts_with("batch_size: AFF trains BN")),
        "{e:?}"
    );
    let e =
        errors(json!({"mode": "slf", "lr": -1, "epochs": 0, "momentum": 1.0, "optimizer": "sgd"}));
    for k in ["lr:", "epochs:", "momentum:"] {
        assert!(e.iter().any(|m| m.starts_with(k)), "{k} {e:?}");
    }
    let e = errors(json!({"mode": "alf", "eps": "8/zero"}));
    assert!(
        e.iter()
            .any(|m| m.starts_with("eps:") && m.contains("8/255")),
        "{e:?}"
    );
    let e = errors(json!({"mode": "sft"}));
    assert!(e.iter().any(|m| m.starts_with("mode:")), "{e:?}");
    let e = errors(json!({"mode": "slf", "preset": "adam"}));
    assert!(e.iter().any(|m| m.starts_with("preset:")), "{e:?}");
    let e = errors(json!({"mode": "slf", "epoch": 3}));
    assert!(e.iter().any(|m| m.contains("epoch")), "{e:?}");
    let e = errors(json!({"mode": "slf", "schedule": "cosine", "t_max": 0}));
    assert!(e.iter().any(|m| m.starts_with("t_max:")), "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// Training on synthetic data at width 8.

const WIDTH: usize = 8;
const HIDDEN: usize = 32;

fn data(n_train: usize, n_test: usize) -> Dataset {
    four_classes(n_train, n_test, 32)
}

/// A pretrain-shaped encoder (backbone, pre_feature, projection), seeded.
fn pretrain_encoder(seed: u64) -> VarMap {
    let cfg = EncoderConfig {
        backbone: ResNetConfig {
            width: WIDTH,
            ..Default::default()
        },
        head: HeadConfig {
            hidden_dim: HIDDEN,
            z_dim: 16,
        },
    };
    let (vm, _) = build_seeded(
        seed,
        &InitRules::r_cf("encoder"),
        DType::F32,
        &Device::Cpu,
        |vb| encoder(&cfg, vb),
    )
    .expect("encoder builds");
    vm
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().expect("flat");
    match t.dtype() {
        DType::I64 => t
            .to_vec1::<i64>()
            .expect("i64")
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        _ => t
            .to_dtype(DType::F32)
            .expect("f32")
            .to_vec1::<f32>()
            .expect("f32")
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    }
}

fn values(vm: &VarMap) -> BTreeMap<String, Vec<u8>> {
    named_vars(vm)
        .into_iter()
        .map(|(n, v)| (n, bytes_of(v.as_tensor())))
        .collect()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F64)?.to_vec1::<f64>())
        .expect("values")
}

fn cfg(v: Value) -> FinetuneConfig {
    params(v).config()
}

fn run(
    c: FinetuneConfig,
    enc: &EncoderWeights,
    d: &Dataset,
) -> std::result::Result<Finetuned, trainer::Error> {
    finetune(
        c,
        enc,
        &d.train,
        d.classes.len(),
        &Device::Cpu,
        &TrainHooks::default(),
    )
}

/// The torchvision `resnet18` `state_dict` names without `fc`, written out independently of
/// our ResNet: stem, 4 layers of 2 basic blocks, 1x1 shortcuts in the first block of layers 2-4.
fn torchvision_resnet18_names() -> Vec<String> {
    let bn = |p: &str| {
        [
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ]
        .map(|s| format!("{p}.{s}"))
    };
    let mut v = vec!["conv1.weight".to_string()];
    v.extend(bn("bn1"));
    for l in 1..=4 {
        for b in 0..2 {
            let p = format!("layer{l}.{b}");
            v.push(format!("{p}.conv1.weight"));
            v.extend(bn(&format!("{p}.bn1")));
            v.push(format!("{p}.conv2.weight"));
            v.extend(bn(&format!("{p}.bn2")));
            if l > 1 && b == 0 {
                v.push(format!("{p}.downsample.0.weight"));
                v.extend(bn(&format!("{p}.downsample.1")));
            }
        }
    }
    v
}

fn expected_names(pre_feature: bool) -> Vec<String> {
    let mut v: Vec<String> = torchvision_resnet18_names()
        .into_iter()
        .map(|n| format!("encoder.{n}"))
        .collect();
    assert_eq!(
        v.len(),
        120,
        "torchvision's resnet18 has 122 tensors, fc.weight and fc.bias included"
    );
    if pre_feature {
        v.extend(["pre_feature.0.weight", "pre_feature.0.bias"].map(String::from));
        v.extend(
            [
                "weight",
                "bias",
                "running_mean",
                "running_var",
                "num_batches_tracked",
            ]
            .map(|s| format!("pre_feature.1.{s}")),
        );
    }
    v.extend(["classifier.weight", "classifier.bias"].map(String::from));
    v.sort();
    v
}

#[test]
fn the_architecture_is_read_off_the_shapes() -> TestResult {
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(0))?;
    assert_eq!(
        (enc.width(), enc.hidden_dim(), enc.has_pgd_branch()),
        (WIDTH, Some(HIDDEN), false)
    );
    let mut t: HashMap<String, Tensor> = named_vars(&pretrain_encoder(0))
        .into_iter()
        .filter(|(n, _)| n.starts_with("encoder."))
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let backbone_only = EncoderWeights::from_tensors(t.clone())?;
    assert_eq!(backbone_only.hidden_dim(), None);
    let d = data(16, 8);
    let err = run(
        cfg(json!({"mode": "slf", "epochs": 1, "batch_size": 8})),
        &backbone_only,
        &d,
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("use `features: backbone`"), "{err}");
    t.remove("encoder.conv1.weight");
    let err = EncoderWeights::from_tensors(t)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("no encoder.conv1.weight"), "{err}");
    Ok(())
}

#[test]
fn slf_learns_and_leaves_the_encoder_bit_identical() -> TestResult {
    let d = data(96, 8);
    let src = pretrain_encoder(1);
    let enc = EncoderWeights::from_varmap(&src)?;
    let out = run(
        cfg(json!({"mode": "slf", "lr": 0.1, "epochs": 60, "batch_size": 32, "seed": 2})),
        &enc,
        &d,
    )?;
    let acc = out.metrics["train_acc"].as_f64().ok_or("train_acc")?;
    assert!(
        acc > 0.7,
        "train accuracy {acc} on 4 classes (chance 0.25): {}",
        out.metrics
    );
    assert_eq!(out.metrics["epochs"], json!(60));
    assert_eq!(out.metrics["steps"], json!(60 * 3));
    let first = out.curve[0].loss;
    assert!(
        out.curve[59].loss < 0.7 * first,
        "loss {first} -> {}",
        out.curve[59].loss
    );
    // the head is all that changed: every encoder and pre_feature tensor (BN statistics and
    // counters included) is bit-identical to the pretrained one
    let before = values(&src);
    let after = values(&out.varmap);
    let mut compared = 0;
    for (name, bytes) in &after {
        if name.starts_with("classifier.") {
            continue;
        }
        assert_eq!(Some(bytes), before.get(name), "{name} changed");
        compared += 1;
    }
    assert_eq!(compared, 120 + 7);
    // and the accuracy the loop reports is the head's on the (unaugmented) training images
    let recomputed = accuracy(&out.classifier, &d.train, 0, &Device::Cpu)?;
    assert!(
        (recomputed - acc).abs() < 0.1,
        "final-epoch running accuracy {acc} vs eval {recomputed}"
    );
    Ok(())
}

#[test]
fn zero_head_init_and_pytorch_default_init() -> TestResult {
    let d = data(16, 8);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(1))?;
    let mut c = cfg(json!({"mode": "slf", "epochs": 1, "batch_size": 8, "head_init": "zeros"}));
    let t = Finetuner::new(c.clone(), &enc, &d.train, 4, &Device::Cpu)?;
    let vm = values(t.varmap());
    assert!(
        vm["classifier.weight"].iter().all(|&b| b == 0)
            && vm["classifier.bias"].iter().all(|&b| b == 0)
    );
    c.head_init = HeadInit::Default;
    let t = Finetuner::new(c, &enc, &d.train, 4, &Device::Cpu)?;
    let w = named_vars(t.varmap())
        .into_iter()
        .find(|(n, _)| n == "classifier.weight")
        .map(|(_, v)| to_f64(v.as_tensor()))
        .ok_or("no head")?;
    let bound = 1.0 / (HIDDEN as f64).sqrt();
    assert!(
        w.iter().all(|x| x.abs() <= bound) && w.iter().any(|x| x.abs() > bound / 2.0),
        "U(-1/sqrt(in), 1/sqrt(in))"
    );
    Ok(())
}

#[test]
fn checkpoint_names_are_torchvision_resnet18_plus_the_heads() -> TestResult {
    let d = data(16, 8);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(1))?;
    let tmp = TempDir::new("finetune-names");
    for (features, pre) in [("pre_feature", true), ("backbone", false)] {
        let out = run(
            cfg(json!({"mode": "slf", "features": features, "epochs": 1, "batch_size": 8})),
            &enc,
            &d,
        )?;
        let dir = tmp.path().join(features);
        std::fs::create_dir_all(&dir)?;
        out.classifier
            .save(&out.varmap, &dir)
            .map_err(|e| e.to_string())?;
        let names = crate::nn::checkpoint::tensor_names(dir.join(WEIGHTS_FILE))?;
        assert_eq!(names, expected_names(pre), "{features}");
        // the saved pair loads back (strictly) into the same classifier
        let (vm, clf) =
            Classifier::load(&dir.join(WEIGHTS_FILE), &dir.join(SPEC_FILE), &Device::Cpu)?;
        assert_eq!(values(&vm), values(&out.varmap));
        assert_eq!(clf.spec(), out.classifier.spec());
        assert_eq!((clf.spec().width, clf.spec().classes), (WIDTH, 4));
        let x = Tensor::from_vec(
            d.test
                .images
                .iter()
                .map(|&v| f32::from(v) / 255.0)
                .collect::<Vec<_>>(),
            (d.test.n, 3, 32, 32),
            &Device::Cpu,
        )?;
        let (a, b) = (clf.logits(&x, false)?, out.classifier.logits(&x, false)?);
        assert_eq!(to_f64(&a), to_f64(&b));
    }
    Ok(())
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    to_f64(a)
        .iter()
        .zip(to_f64(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn head(vm: &VarMap) -> (Tensor, Tensor) {
    let m: HashMap<String, candle::Var> = named_vars(vm).into_iter().collect();
    (
        m["classifier.weight"].as_tensor().clone(),
        m["classifier.bias"].as_tensor().clone(),
    )
}

#[test]
fn the_feature_cache_trains_the_same_head_as_the_per_batch_path() -> TestResult {
    let d = data(40, 8);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(4))?;
    for (p, passes) in [
        // no augmentation: one pass; augmentation: one pass per epoch; n-crop: views drawn once
        (
            json!({"mode": "slf", "epochs": 3, "batch_size": 16, "drop_last": false, "lr": 0.01}),
            1,
        ),
        (
            json!({"mode": "slf", "epochs": 3, "batch_size": 16, "augment": true, "preset": "air", "lr": 0.5}),
            3,
        ),
        (
            json!({"mode": "slf", "head": "ncrop", "n_views": 3, "epochs": 3, "batch_size": 16}),
            1,
        ),
    ] {
        let mut c = cfg(p.clone());
        let cached = run(c.clone(), &enc, &d)?;
        c.cache_features = false;
        let direct = run(c, &enc, &d)?;
        let (wc, bc) = head(&cached.varmap);
        let (wd, bd) = head(&direct.varmap);
        let (dw, db) = (max_diff(&wc, &wd), max_diff(&bc, &bd));
        assert!(dw < 1e-5 && db < 1e-5, "{p}: heads differ by {dw} / {db}");
        // and training moved the head well beyond that tolerance
        let init = Finetuner::new(cfg(p.clone()), &enc, &d.train, 4, &Device::Cpu)?;
        let (w0, _) = head(init.varmap());
        assert!(max_diff(&wc, &w0) > 1e-3, "{p}: the head did not train");
        for (a, b) in cached.curve.iter().zip(&direct.curve) {
            assert!(
                (a.loss - b.loss).abs() < 1e-5 && a.acc == b.acc,
                "{p}: {a:?} vs {b:?}"
            );
        }
        assert_eq!(
            cached.metrics["feature_seconds"].as_f64().map(|s| s > 0.0),
            Some(true)
        );
        assert_eq!(direct.metrics["feature_seconds"], json!(0.0));
        assert_eq!(cached.metrics["feature_passes"], json!(passes), "{p}");
        assert_eq!(direct.metrics["feature_passes"], json!(0));
    }
    Ok(())
}

#[test]
fn alf_and_aff_run_with_finite_losses() -> TestResult {
    let d = data(32, 8);
    let src = pretrain_encoder(5);
    let enc = EncoderWeights::from_varmap(&src)?;
    let before = values(&src);
    let small =
        |mode: &str| cfg(json!({"mode": mode, "epochs": 2, "batch_size": 16, "pgd_steps": 2}));
    // ALF: the head trains on PGD examples, the encoder does not move
    let alf = run(small("alf"), &enc, &d)?;
    assert!(
        alf.curve.iter().all(|e| e.loss.is_finite()),
        "{:?}",
        alf.curve
    );
    for (name, bytes) in values(&alf.varmap) {
        if !name.starts_with("classifier.") {
            assert_eq!(Some(&bytes), before.get(&name), "ALF changed {name}");
        }
    }
    // AFF: every parameter trains, BN statistics of the kept branch moved
    let aff = run(small("aff"), &enc, &d)?;
    assert!(
        aff.curve
            .iter()
            .all(|e| e.loss.is_finite() && e.natural_acc.is_some()),
        "{:?}",
        aff.curve
    );
    assert!(aff.metrics["train_acc_natural"].is_number());
    let after = values(&aff.varmap);
    for name in [
        "encoder.conv1.weight",
        "encoder.layer3.0.downsample.0.weight",
        "pre_feature.0.weight",
        "encoder.bn1.running_mean",
        "pre_feature.1.running_var",
    ] {
        assert_ne!(
            after.get(name),
            before.get(name),
            "AFF left {name} unchanged"
        );
    }
    assert!(after.keys().all(|n| !n.contains(".pgd.")));
    assert_eq!(
        after.keys().cloned().collect::<Vec<_>>(),
        expected_names(true)
    );
    Ok(())
}

#[test]
fn aff_keeps_the_pgd_branch_under_the_plain_names() -> TestResult {
    let d = data(32, 8);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(5))?;
    let mut t = Finetuner::new(
        cfg(json!({"mode": "aff", "epochs": 1, "batch_size": 16, "pgd_steps": 1})),
        &enc,
        &d.train,
        4,
        &Device::Cpu,
    )?;
    t.train_epoch(&TrainHooks::default())?;
    let dual = values(t.varmap());
    // both branches started equal and trained on different inputs
    assert_ne!(
        dual["encoder.bn1.running_mean"],
        dual["encoder.bn1.pgd.running_mean"]
    );
    assert_ne!(
        dual["pre_feature.1.weight"],
        dual["pre_feature.1.pgd.weight"]
    );
    let (vm, _) = t.finish()?;
    let single = values(&vm);
    for (name, bytes) in &single {
        let pgd = name
            .rsplit_once('.')
            .map(|(m, p)| format!("{m}.pgd.{p}"))
            .unwrap_or_default();
        let want = dual.get(&pgd).unwrap_or(&dual[name]);
        assert_eq!(bytes, want, "{name}");
    }
    assert_eq!(
        single["encoder.bn1.running_mean"],
        dual["encoder.bn1.pgd.running_mean"]
    );
    Ok(())
}

/// An ACL-style checkpoint: [`pretrain_encoder`] with every backbone BN tensor also under
/// `<bn>.pgd.`, 0.5 higher.
fn pgd_branch_checkpoint(seed: u64) -> candle::Result<HashMap<String, Tensor>> {
    let src = named_vars(&pretrain_encoder(seed));
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for (n, v) in &src {
        let tensor = v.as_tensor().clone();
        let bn_module = n
            .rsplit_once('.')
            .filter(|(m, _)| src.iter().any(|(o, _)| *o == format!("{m}.running_mean")));
        if let Some((m, p)) = bn_module.filter(|_| n.starts_with("encoder."))
            && tensor.dtype() == DType::F32
        {
            t.insert(format!("{m}.pgd.{p}"), (&tensor + 0.5)?);
        }
        t.insert(n.clone(), tensor);
    }
    Ok(t)
}

#[test]
fn an_encoder_with_a_pgd_branch_is_read_through_it() -> TestResult {
    let t = pgd_branch_checkpoint(6)?;
    let enc = EncoderWeights::from_tensors(t.clone())?;
    assert!(enc.has_pgd_branch());
    let d = data(16, 8);
    let out = run(
        cfg(json!({"mode": "slf", "epochs": 1, "batch_size": 8})),
        &enc,
        &d,
    )?;
    let got = values(&out.varmap);
    assert_eq!(
        got["encoder.bn1.running_var"],
        bytes_of(&t["encoder.bn1.pgd.running_var"])
    );
    assert_eq!(
        got["encoder.layer2.0.downsample.1.weight"],
        bytes_of(&t["encoder.layer2.0.downsample.1.pgd.weight"])
    );
    assert_eq!(
        got["encoder.conv1.weight"],
        bytes_of(&t["encoder.conv1.weight"])
    );
    // pre_feature has no pgd branch in this checkpoint: its own tensors are read
    assert_eq!(
        got["pre_feature.1.running_mean"],
        bytes_of(&t["pre_feature.1.running_mean"])
    );
    Ok(())
}

#[test]
fn ncrop_head_records_its_views_and_evaluates() -> TestResult {
    let d = data(32, 16);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(1))?;
    let out = run(
        cfg(
            json!({"mode": "slf", "head": "ncrop", "n_views": 2, "views": "patch", "epochs": 2, "batch_size": 16}),
        ),
        &enc,
        &d,
    )?;
    let spec = out.classifier.spec().ncrop.ok_or("ncrop spec")?;
    assert_eq!((spec.n_views, spec.scale), (2, [0.25, 0.25]));
    assert_eq!(out.metrics["head"], json!("ncrop"));
    let a = accuracy(&out.classifier, &d.test, 1, &Device::Cpu)?;
    assert!((0.0..=1.0).contains(&a));
    Ok(())
}

#[test]
fn render_views_matches_the_multi_view_generator() -> TestResult {
    // an image's views do not depend on the batch it is drawn with
    let d = data(6, 2);
    let spec = ncrop_spec(3, ViewKind::Crop);
    let p = ncrop_pipeline(&spec, 32);
    let whole = crate::nn::augment::MultiView::new(crate::nn::augment::MultiViewConfig {
        n_views: 3,
        pipeline: p.clone(),
        ..Default::default()
    })?
    .generate(
        crate::nn::augment::ImageBatch::new(&d.train.images, 6, 32, 32)?,
        9,
        4,
    )?;
    let some = render_views(&p, 3, &d.train, &[4, 1], 9, 4)?;
    let row = 3 * 32 * 32;
    for (j, i) in [4usize, 1].into_iter().enumerate() {
        for v in 0..3 {
            assert_eq!(
                &some[(v * 2 + j) * row..(v * 2 + j + 1) * row],
                whole.get(v, i),
                "view {v} of image {i}"
            );
        }
    }
    Ok(())
}

#[test]
fn cancellation_and_a_diverging_run_fail_clearly() -> TestResult {
    let d = data(16, 8);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(1))?;
    let hooks = TrainHooks {
        cancelled: &|| true,
        ..TrainHooks::default()
    };
    let c = cfg(json!({"mode": "alf", "epochs": 1, "batch_size": 8}));
    let err = finetune(c, &enc, &d.train, 4, &Device::Cpu, &hooks)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("cancelled during epoch 0, batch 0"), "{err}");
    let c = cfg(
        json!({"mode": "slf", "epochs": 5, "batch_size": 8, "optimizer": "sgd", "lr": 1e38, "momentum": 0.9}),
    );
    let err = run(c, &enc, &d)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.starts_with("epoch ") && err.contains("the loss is"),
        "{err}"
    );
    let c = cfg(json!({"mode": "slf", "batch_size": 64}));
    let err = run(c, &enc, &d)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("batch_size 64 is larger than the 16 training images"),
        "{err}"
    );
    Ok(())
}

/// A tiny EMP-SSL pretraining for the chains of [`run_chain`].
const TINY_EMP: &str = "{method: emp_ssl, n_views: 2, views: crop, batch_size: 16, epochs: 1, width: 8, hidden_dim: 32, z_dim: 16, seed: 2}";

/// Runs `data` (synthetic, 4 classes, 48 + 8 images) → `pre` (pretrain with `pre_params`) →
/// `ft` (finetune with `ft_params`) → `ev` (evaluate, PGD-1) through the engine and returns
/// the folder (kept alive), the plan and the store.
fn run_chain(
    tag: &str,
    pre_params: &str,
    ft_params: &str,
) -> std::result::Result<
    (TempDir, pipe_engine::plan::Plan, pipe_cache::Store),
    Box<dyn std::error::Error + Send + Sync>,
> {
    use pipe_engine::{Overrides, graph, spec};
    use std::sync::atomic::AtomicBool;
    let tmp = TempDir::new(tag);
    let dir = tmp.path();
    let yaml = format!(
        "stages:
  data:
    kind: dataset
    params: {{source: synthetic, n_classes: 4, n_train: 48, n_test: 8, seed: 1}}
  pre:
    kind: pretrain
    inputs: {{dataset: data}}
    params: {pre_params}
  ft:
    kind: finetune
    inputs: {{encoder: pre, dataset: data}}
    params: {ft_params}
  ev:
    kind: evaluate
    inputs: {{model: ft, dataset: data}}
    params: {{attacks: [{{eps: 8/255, steps: 1}}], batch_size: 8}}
"
    );
    let file = dir.join("p.yaml");
    std::fs::write(&file, yaml)?;
    let mut reg = pipe_engine::Registry::new();
    crate::register_all(&mut reg);
    let store = pipe_cache::Store::open(dir.join("store"))?;
    let p = spec::load(&file, &reg, &Overrides::default()).map_err(|e| format!("{e}"))?;
    let plan =
        pipe_engine::plan::plan(graph::build(p, &reg), &store, &[]).map_err(|e| format!("{e}"))?;
    let opts = pipe_engine::RunOptions {
        jobs: 1,
        gpus: 0,
        keep_going: false,
        pipe_version: "test".into(),
        ..Default::default()
    };
    let cancel = AtomicBool::new(false);
    let s = pipe_engine::exec::run(&plan, &reg, &store, &opts, &cancel, &mut pipe_engine::Quiet);
    assert!(!s.failed(), "{:?}", s.results);
    Ok((tmp, plan, store))
}

/// The `metrics.json` of an entry.
fn metrics_of(
    entry: &pipe_cache::Entry,
) -> std::result::Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    Ok(serde_json::from_slice(&std::fs::read(
        entry.file("metrics.json")?,
    )?)?)
}

/// The committed entry of node `id`.
fn entry_of_node(
    plan: &pipe_engine::plan::Plan,
    store: &pipe_cache::Store,
    id: &str,
) -> std::result::Result<pipe_cache::Entry, Box<dyn std::error::Error + Send + Sync>> {
    let node = plan
        .graph
        .nodes
        .iter()
        .find(|n| n.id == id)
        .ok_or(format!("no {id} node"))?;
    Ok(store
        .get(node.key.key())?
        .ok_or(format!("{id} not committed"))?)
}

#[test]
fn end_to_end_through_the_engine() -> TestResult {
    let (_tmp, plan, store) = run_chain(
        "finetune-e2e",
        TINY_EMP,
        "{mode: slf, epochs: 2, batch_size: 16, lr: 0.01, seed: 3}",
    )?;
    let entry = entry_of_node(&plan, &store, "ft")?;
    let names = crate::nn::checkpoint::tensor_names(entry.file(WEIGHTS_FILE)?)?;
    assert_eq!(names, expected_names(true));
    let (_, clf) = Classifier::load(
        &entry.file(WEIGHTS_FILE)?,
        &entry.file(SPEC_FILE)?,
        &Device::Cpu,
    )?;
    assert_eq!(
        (clf.spec().width, clf.spec().hidden_dim, clf.spec().classes),
        (8, 32, 4)
    );
    let m: Value = metrics_of(&entry)?;
    assert_eq!(
        (m["mode"].clone(), m["epochs"].clone(), m["n_train"].clone()),
        (json!("slf"), json!(2), json!(48))
    );
    assert!(m["train_acc"].is_number() && m["train_loss"].is_number() && m["seconds"].is_number());
    assert_eq!(m["curve"].as_array().map(Vec::len), Some(2));
    // `evaluate` consumes the artifact as it is
    let entry = entry_of_node(&plan, &store, "ev")?;
    let m: Value = metrics_of(&entry)?;
    let (clean, pgd) = (
        m["clean_acc"].as_f64().ok_or("clean_acc")?,
        m["pgd_linf_8/255_acc"].as_f64().ok_or("pgd acc")?,
    );
    assert!((0.0..=1.0).contains(&clean) && pgd <= clean, "{m}");
    Ok(())
}

#[test]
fn acl_encoder_is_finetuned_through_its_pgd_branch_and_normalisation() -> TestResult {
    let (_tmp, plan, store) = run_chain(
        "finetune-acl",
        "{method: air, dyn_aug: true, batch_size: 16, epochs: 2, pgd_steps: 1, width: 8, lr: 0.5, warmup_epochs: 1, seed: 2}",
        "{mode: slf, features: backbone, epochs: 2, batch_size: 16, lr: 0.01, seed: 3}",
    )?;
    let ft = entry_of_node(&plan, &store, "ft")?;
    let (_, clf) = Classifier::load(&ft.file(WEIGHTS_FILE)?, &ft.file(SPEC_FILE)?, &Device::Cpu)?;
    assert!(clf.spec().input_norm && clf.backbone().has_input_norm());
    let spec_text = std::fs::read_to_string(ft.file(SPEC_FILE)?)?;
    assert!(spec_text.contains("\"input_norm\": true"), "{spec_text}");
    // SLF keeps the encoder: the classifier's backbone is the pretrained `pgd` branch, input
    // normalisation included (checked against the pretrained model rebuilt from its file)
    let pre = entry_of_node(&plan, &store, "pre")?;
    let branches = vec!["normal".to_string(), "pgd".to_string()];
    let (vm, model) = crate::nn::init::build_seeded(
        0,
        &crate::nn::init::InitRules::default(),
        candle::DType::F32,
        &Device::Cpu,
        |vb| crate::nn::heads::acl_encoder(8, &branches, vb),
    )?;
    crate::nn::checkpoint::load(
        &vm,
        &pre.file(crate::kinds::pretrain::ENCODER_FILE)?,
        "",
        true,
    )?;
    let x = Tensor::rand(0f32, 1f32, (3, 3, 32, 32), &Device::Cpu)?;
    let want = model.backbone().forward_branch(&x, "pgd", false)?;
    let got = clf.backbone().forward_branch(&x, "normal", false)?;
    let diff = (want - got)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-5, "backbone features differ by {diff}");
    // and not the `normal` branch's
    let normal = model.backbone().forward_branch(&x, "normal", false)?;
    let other = (normal - clf.backbone().forward_branch(&x, "normal", false)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(
        other > 1e-4,
        "the normal branch gives the same features ({other})"
    );
    let ev = entry_of_node(&plan, &store, "ev")?;
    let m: Value = metrics_of(&ev)?;
    assert!(
        m["clean_acc"]
            .as_f64()
            .is_some_and(|a| (0.0..=1.0).contains(&a)),
        "{m}"
    );

    // AFF on the same kind of encoder: the dual-BN training copy keeps the normalisation too
    let (_tmp, plan, store) = run_chain(
        "finetune-acl-aff",
        "{method: acl, batch_size: 16, epochs: 1, pgd_steps: 1, width: 8, lr: 0.5, warmup_epochs: 1, seed: 2}",
        "{mode: aff, features: backbone, preset: dynacl, epochs: 1, batch_size: 16, pgd_steps: 1, seed: 3}",
    )?;
    let ft = entry_of_node(&plan, &store, "ft")?;
    let (_, clf) = Classifier::load(&ft.file(WEIGHTS_FILE)?, &ft.file(SPEC_FILE)?, &Device::Cpu)?;
    assert!(clf.spec().input_norm);
    let names = crate::nn::checkpoint::tensor_names(ft.file(WEIGHTS_FILE)?)?;
    assert!(
        names.iter().any(|n| n == "encoder.normalize.std"),
        "{names:?}"
    );
    let m: Value = metrics_of(&ft)?;
    assert!(m["train_loss"].as_f64().is_some_and(f64::is_finite), "{m}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Resume and [Q31].

/// Every variable of the trainer (AFF: the dual-BN copy, both branches) and of the finished
/// classifier, as bytes.
fn trainer_values(
    t: &Finetuner<'_>,
) -> std::result::Result<BTreeMap<String, Vec<u8>>, trainer::Error> {
    let mut out = values(t.varmap());
    let (vm, _) = t.finish()?;
    out.extend(
        values(&vm)
            .into_iter()
            .map(|(n, b)| (format!("final/{n}"), b)),
    );
    Ok(out)
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one() -> TestResult {
    let d = data(32, 8);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(5))?;
    let tmp = TempDir::new("finetune-resume");
    let hooks = TrainHooks::default();
    let cases = [
        // SLF on cached features: computed once (recomputed after the resume) and per epoch
        json!({"mode": "slf", "epochs": 2, "batch_size": 8, "seed": 4}),
        json!({"mode": "slf", "epochs": 2, "batch_size": 8, "augment": true, "optimizer": "sgd",
               "lr": 0.05, "momentum": 0.9, "seed": 4}),
        json!({"mode": "alf", "epochs": 2, "batch_size": 16, "pgd_steps": 2, "seed": 4,
               "milestones": [1]}),
        // AFF: every variable, both BN branches, SGD momentum, a rate step between the epochs
        json!({"mode": "aff", "epochs": 2, "batch_size": 16, "pgd_steps": 2, "seed": 4,
               "milestones": [1]}),
    ];
    for (i, p) in cases.iter().enumerate() {
        let c = cfg(p.clone());
        let mut whole = Finetuner::new(c.clone(), &enc, &d.train, 4, &Device::Cpu)?;
        whole.train_epoch(&hooks)?;
        whole.train_epoch(&hooks)?;
        // interrupted after epoch 1: the state is all that survives
        let path = tmp.path().join(format!("state-{i}.safetensors"));
        {
            let mut first = Finetuner::new(c.clone(), &enc, &d.train, 4, &Device::Cpu)?;
            first.train_epoch(&hooks)?;
            first.save_state(&path)?;
        }
        let mut resumed = Finetuner::new(c, &enc, &d.train, 4, &Device::Cpu)?;
        resumed.load_state(&path)?;
        assert_eq!(
            (resumed.epochs_done(), resumed.finished()),
            (1, false),
            "{p}"
        );
        resumed.train_epoch(&hooks)?;
        assert!(resumed.finished(), "{p}");
        let (a, b) = (trainer_values(&whole)?, trainer_values(&resumed)?);
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{p}"
        );
        for (name, bytes) in &a {
            assert!(b[name] == *bytes, "{p}: {name} differs after the resume");
        }
        assert_eq!(whole.steps(), resumed.steps(), "{p}");
        let strip = |t: &Finetuner<'_>| -> Vec<(f64, f64, f64, usize)> {
            t.curve()
                .iter()
                .map(|e| (e.loss, e.acc, e.lr, e.images))
                .collect()
        };
        assert_eq!(strip(&whole), strip(&resumed), "{p}");
        // the weights moved in the second epoch (the comparison is not vacuous)
        let mut one = Finetuner::new(cfg(p.clone()), &enc, &d.train, 4, &Device::Cpu)?;
        one.train_epoch(&hooks)?;
        assert_ne!(trainer_values(&one)?, a, "{p}");
    }
    Ok(())
}

#[test]
fn a_state_of_other_params_or_data_is_rejected_and_changes_nothing() -> TestResult {
    let d = data(32, 8);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(5))?;
    let tmp = TempDir::new("finetune-resume-bad");
    let hooks = TrainHooks::default();
    let base = json!({"mode": "aff", "epochs": 2, "batch_size": 16, "pgd_steps": 1});
    let path = tmp.path().join(STATE_FILE);
    let mut t = Finetuner::new(cfg(base.clone()), &enc, &d.train, 4, &Device::Cpu)?;
    t.train_epoch(&hooks)?;
    t.save_state(&path)?;
    let fresh =
        values(Finetuner::new(cfg(base.clone()), &enc, &d.train, 4, &Device::Cpu)?.varmap());
    let mut other = base.clone();
    other["lr"] = json!(0.05);
    let mut t = Finetuner::new(cfg(other), &enc, &d.train, 4, &Device::Cpu)?;
    let err = t
        .load_state(&path)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("other params or data")
            && err.contains("config.lr: 0.1 in the file, 0.05 now"),
        "{err}"
    );
    assert_eq!((t.epochs_done(), t.steps(), t.curve().len()), (0, 0, 0));
    assert_eq!(
        values(t.varmap()),
        fresh,
        "a rejected state changed the weights"
    );
    // the [Q31] switch changes the attack, so it is part of what must match
    let mut q31 = base.clone();
    q31["faithful"] = json!({"q31": false});
    let mut t = Finetuner::new(cfg(q31), &enc, &d.train, 4, &Device::Cpu)?;
    let err = t
        .load_state(&path)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("config.faithful.q31"), "{err}");
    // the same params on other data
    let d2 = synthetic(&SyntheticConfig {
        n_classes: 4,
        n_train: 32,
        n_test: 8,
        image_size: 32,
        seed: 4,
    });
    let mut t = Finetuner::new(cfg(base.clone()), &enc, &d2.train, 4, &Device::Cpu)?;
    let err = t
        .load_state(&path)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("data_blake3"), "{err}");
    // a file that is not a finetune state
    let enc_file = tmp.path().join("encoder.safetensors");
    crate::nn::checkpoint::save(&pretrain_encoder(5), &enc_file, "")?;
    let mut t = Finetuner::new(cfg(base), &enc, &d.train, 4, &Device::Cpu)?;
    let err = t
        .load_state(&enc_file)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("has no meta/json"), "{err}");
    assert_eq!(t.epochs_done(), 0);
    Ok(())
}

#[test]
fn faithful_q31_is_keyed_only_where_a_random_start_exists() {
    let alf = norm_ok(json!({"mode": "alf"}));
    assert_eq!(alf["faithful"], json!({"q31": true}));
    assert_eq!(norm_ok(json!({"mode": "alf", "faithful": true})), alf);
    assert_eq!(norm_ok(json!({"mode": "alf", "faithful": {}})), alf);
    let off = norm_ok(json!({"mode": "alf", "faithful": {"q31": false}}));
    assert_eq!(off["faithful"], json!({"q31": false}));
    assert_eq!(norm_ok(json!({"mode": "alf", "faithful": false})), off);
    assert_eq!(norm_ok(off.clone()), off);
    assert_eq!(
        norm_ok(json!({"mode": "aff", "faithful": false}))["faithful"],
        json!({"q31": false})
    );
    // SLF has no attack, ALF at eps 0 starts at x: the switch is dropped
    for p in [
        json!({"mode": "slf", "faithful": false}),
        json!({"mode": "alf", "eps": 0, "faithful": false}),
    ] {
        let n = norm_ok(p.clone());
        assert!(n.get("faithful").is_none(), "{p} -> {n}");
    }
    assert_eq!(
        norm_ok(json!({"mode": "slf", "faithful": {"q31": false}})),
        norm_ok(json!({"mode": "slf"}))
    );
    let e = errors(json!({"mode": "alf", "faithful": {"q6": true}}));
    assert!(
        e.iter().any(|m| m.contains("unknown switch faithful.q6")),
        "{e:?}"
    );
    let e = errors(json!({"mode": "alf", "faithful": {"q31": 1}}));
    assert!(
        e.iter()
            .any(|m| m.contains("faithful.q31: expected true or false")),
        "{e:?}"
    );
}

#[test]
fn faithful_q34b_is_keyed_only_for_aff_and_only_when_on() {
    // off by default (the first version's AFF), so every earlier AFF node keeps its key
    let aff = norm_ok(json!({"mode": "aff"}));
    assert_eq!(aff["faithful"], json!({"q31": true}));
    assert_eq!(
        norm_ok(json!({"mode": "aff", "faithful": {"q34b": false}})),
        aff
    );
    assert!(!cfg(json!({"mode": "aff"})).faithful.q34b);
    let on = norm_ok(json!({"mode": "aff", "faithful": {"q34b": true}}));
    assert_eq!(on["faithful"], json!({"q31": true, "q34b": true}));
    assert_eq!(norm_ok(json!({"mode": "aff", "faithful": true})), on);
    assert_eq!(norm_ok(on.clone()), on);
    assert!(cfg(json!({"mode": "aff", "faithful": true})).faithful.q34b);
    assert_eq!(
        norm_ok(json!({"mode": "aff", "faithful": false}))["faithful"],
        json!({"q31": false})
    );
    // SLF and ALF load no dual-BN copy: the switch is dropped and does nothing
    for mode in ["slf", "alf"] {
        assert_eq!(
            norm_ok(json!({"mode": mode, "faithful": {"q34b": true}})),
            norm_ok(json!({"mode": mode})),
            "{mode}"
        );
        assert!(!cfg(json!({"mode": mode, "faithful": true})).faithful.q34b);
    }
    let e = errors(json!({"mode": "aff", "faithful": {"q34b": "yes"}}));
    assert!(
        e.iter()
            .any(|m| m.contains("faithful.q34b: expected true or false")),
        "{e:?}"
    );
}

/// Mean and standard deviation of a tensor's values.
fn mean_std(t: &Tensor) -> (f64, f64) {
    let v = to_f64(t);
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn q34b_starts_the_backbone_bns_and_shortcut_convs_from_scratch() -> TestResult {
    let t = pgd_branch_checkpoint(7)?;
    let enc = EncoderWeights::from_tensors(t.clone())?;
    let d = data(32, 8);
    let aff = |faithful: Value| -> std::result::Result<Finetuner<'_>, trainer::Error> {
        Finetuner::new(
            cfg(
                json!({"mode": "aff", "epochs": 1, "batch_size": 16, "pgd_steps": 1,
                       "faithful": faithful}),
            ),
            &enc,
            &d.train,
            4,
            &Device::Cpu,
        )
    };
    // ResNet-18 has 20 BN modules in its backbone (stem, 2 per block, 3 shortcuts), each with
    // weight, bias, running mean and variance, in two branches
    let fresh: HashMap<&str, f64> = [
        ("weight", 1.0),
        ("bias", 0.0),
        ("running_mean", 0.0),
        ("running_var", 1.0),
    ]
    .into();
    let faithful = aff(json!({"q34b": true}))?;
    let dual: BTreeMap<String, Tensor> = named_vars(faithful.varmap())
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let mut bn_tensors = 0;
    for (name, tensor) in &dual {
        let Some((module, p)) = name.rsplit_once('.') else {
            continue;
        };
        let is_bn = dual.contains_key(&format!("{module}.running_mean"));
        if name.starts_with("encoder.") && is_bn && p != "num_batches_tracked" {
            bn_tensors += 1;
            let want = fresh[p];
            assert!(
                to_f64(tensor).iter().all(|&x| x == want),
                "{name} is not {want}"
            );
        }
    }
    assert_eq!(bn_tensors, 20 * 4 * 2);
    for (layer, c_out) in [(2, 2 * WIDTH), (3, 4 * WIDTH), (4, 8 * WIDTH)] {
        let name = format!("encoder.layer{layer}.0.downsample.0.weight");
        assert_ne!(bytes_of(&dual[&name]), bytes_of(&t[&name]), "{name}");
        // Kaiming-normal, fan-out (R-AIR's init of every conv): std sqrt(2 / c_out)
        let (mean, std) = mean_std(&dual[&name]);
        let want = (2.0 / c_out as f64).sqrt();
        assert!(mean.abs() < 0.25 * want, "{name}: mean {mean}");
        assert!(
            (std / want - 1.0).abs() < 0.3,
            "{name}: std {std}, want {want}"
        );
    }
    // the other convs and pre_feature (no counterpart in R-AIR) are pretrained
    for name in [
        "encoder.conv1.weight",
        "encoder.layer1.0.conv1.weight",
        "encoder.layer4.1.conv2.weight",
        "pre_feature.0.weight",
        "pre_feature.1.weight",
        "pre_feature.1.pgd.running_var",
    ] {
        let src = name.replace(".pgd.", ".");
        assert_eq!(bytes_of(&dual[name]), bytes_of(&t[&src]), "{name}");
    }
    // clean (the default): both branches from the checkpoint's `pgd` branch, shortcuts loaded
    let clean = aff(json!({}))?;
    let dual = values(clean.varmap());
    for name in [
        "encoder.bn1.weight",
        "encoder.bn1.pgd.weight",
        "encoder.layer3.0.downsample.1.running_var",
    ] {
        let src = name.replace(".pgd.", ".");
        let (m, p) = src.rsplit_once('.').ok_or("name")?;
        assert_eq!(dual[name], bytes_of(&t[&format!("{m}.pgd.{p}")]), "{name}");
    }
    assert_eq!(
        dual["encoder.layer2.0.downsample.0.weight"],
        bytes_of(&t["encoder.layer2.0.downsample.0.weight"])
    );
    // and the faithful copy trains
    let mut faithful = faithful;
    let stats = faithful.train_epoch(&TrainHooks::default())?;
    assert!(stats.loss.is_finite(), "{stats:?}");
    Ok(())
}

/// Images at the box edges: half the pixels 0, half 1, `(2, 3, 4, 4)`.
fn edge_images() -> candle::Result<Tensor> {
    let v: Vec<f32> = (0..96)
        .map(|i| if i % 2 == 0 { 0.0 } else { 1.0 })
        .collect();
    Tensor::from_vec(v, (2, 3, 4, 4), &Device::Cpu)
}

/// Min and max of a tensor.
fn range(t: &Tensor) -> candle::Result<(f32, f32)> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        }))
}

/// A 2-class model whose logits depend on every pixel: `(s, −s)` with `s` the pixel mean.
fn toy_logits(x: &Tensor) -> candle::Result<Tensor> {
    let s = x.flatten_from(1)?.mean_keepdim(1)?;
    Tensor::cat(&[&s, &s.neg()?], 1)
}

#[test]
fn q31_leaves_the_first_forward_outside_the_box_unless_switched_off() -> TestResult {
    let x = edge_images()?;
    let y = Tensor::new(&[0u32, 1], &Device::Cpu)?;
    for (faithful, outside) in [(json!(true), true), (json!({"q31": false}), false)] {
        // ALF: PGD's uniform start
        let c = cfg(json!({"mode": "alf", "pgd_steps": 1, "faithful": faithful}));
        assert_eq!(c.faithful.q31, outside);
        let mut first: Option<(f32, f32)> = None;
        let objective = |xa: &Tensor| {
            if first.is_none() {
                first = Some(range(xa)?);
            }
            cross_entropy_per_example(&toy_logits(xa)?, &y)
        };
        let adv = crate::nn::attacks::pgd(&x, objective, &c.alf_attack(), &mut Rng::new(1))?.adv;
        let (lo, hi) = first.ok_or("the objective never ran")?;
        assert_eq!(
            lo < 0.0 && hi > 1.0,
            outside,
            "ALF {faithful}: first forward in [{lo}, {hi}]"
        );
        assert!(lo >= -c.eps as f32 - 1e-6 && hi <= 1.0 + c.eps as f32 + 1e-6);
        let (lo, hi) = range(&adv)?;
        assert!(
            lo >= 0.0 && hi <= 1.0,
            "ALF {faithful}: result in [{lo}, {hi}]"
        );
        // AFF: TRADES' Gaussian start
        let c = cfg(json!({"mode": "aff", "pgd_steps": 1, "faithful": faithful}));
        let nat = toy_logits(&x)?;
        let mut first: Option<(f32, f32)> = None;
        let adv = trades_examples(
            &x,
            &nat,
            |xa| {
                if first.is_none() {
                    first = Some(range(xa)?);
                }
                toy_logits(xa)
            },
            &c,
            &mut Rng::new(1),
        )?;
        let (lo, hi) = first.ok_or("the model never ran")?;
        assert_eq!(
            lo < 0.0 && hi > 1.0,
            outside,
            "AFF {faithful}: first forward in [{lo}, {hi}]"
        );
        let (lo, hi) = range(&adv)?;
        assert!(
            lo >= 0.0 && hi <= 1.0,
            "AFF {faithful}: result in [{lo}, {hi}]"
        );
    }
    Ok(())
}

#[test]
fn the_augmentation_has_the_size_of_the_images() -> TestResult {
    // 40×40 images: RandomCrop(40, pad 4) and 40×40 n-crop views, not 32×32 windows of them
    let d = four_classes(8, 4, 40);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(4))?;
    for p in [
        json!({"mode": "slf", "augment": true, "preset": "air"}),
        json!({"mode": "alf", "augment": true}),
        json!({"mode": "slf", "head": "ncrop", "n_views": 2, "batch_size": 4}),
    ] {
        let t = Finetuner::new(cfg(p.clone()), &enc, &d.train, 4, &Device::Cpu)?;
        let size = t.augmentation().map(|a| a.size);
        assert_eq!(size, Some(40), "{p}");
    }
    Ok(())
}

#[test]
fn the_r_cf_robust_head_params_are_keyed_only_where_they_apply() {
    let alf = norm_ok(json!({"mode": "alf", "epochs": 2}));
    for same in [
        json!({"mode": "alf", "epochs": 2, "random_start": true}),
        json!({"mode": "alf", "epochs": 2, "clean_epochs_before": 0, "clean_epochs_after": 0}),
    ] {
        assert_eq!(norm_ok(same.clone()), alf, "{same}");
    }
    assert!(alf.get("random_start").is_none() && alf.get("clean_epochs_before").is_none());
    // a zero start has no random start for [Q31] to clamp
    let zero = norm_ok(json!({"mode": "alf", "epochs": 2, "random_start": false}));
    assert_eq!(zero["random_start"], json!(false));
    assert!(zero.get("faithful").is_none(), "{zero}");
    assert_ne!(zero, alf);
    // `epochs` stays the adversarial epochs as written
    let q13 = norm_ok(
        json!({"mode": "alf", "epochs": 2, "clean_epochs_before": 2, "clean_epochs_after": 2}),
    );
    assert_eq!(
        (
            &q13["epochs"],
            &q13["clean_epochs_before"],
            &q13["clean_epochs_after"]
        ),
        (&json!(2), &json!(2), &json!(2))
    );
    assert_eq!(norm_ok(q13.clone()), q13);
    let c = cfg(q13);
    assert_eq!((c.epochs, c.adversarial_epochs()), (6, 2));
    // the resume fingerprint (the serialised config) of a default run has neither field, so
    // states written before they existed still resume
    let plain = serde_json::to_value(cfg(json!({"mode": "alf", "epochs": 2}))).expect("json");
    assert!(plain.get("random_start").is_none() && plain.get("clean_epochs").is_none());
    let set = serde_json::to_value(&c).expect("json");
    assert_eq!(set["clean_epochs"], json!([2, 2]));
    let clean: Vec<bool> = (0..6).map(|e| c.clean_epoch(e)).collect();
    assert_eq!(clean, [true, true, false, false, true, true]);
    // other modes have no such switches
    for (p, name) in [
        (
            json!({"mode": "slf", "random_start": false}),
            "random_start",
        ),
        (
            json!({"mode": "aff", "clean_epochs_after": 1}),
            "clean_epochs_after",
        ),
        (
            json!({"mode": "slf", "clean_epochs_before": 1}),
            "clean_epochs_before",
        ),
    ] {
        let e = errors(p.clone());
        assert!(
            e.iter()
                .any(|m| m.starts_with(name) && m.contains("`mode: alf` only")),
            "{p}: {e:?}"
        );
    }
    let e = errors(json!({"mode": "alf", "epochs": 0, "clean_epochs_before": 2}));
    assert!(e.iter().any(|m| m.starts_with("epochs")), "{e:?}");
}

#[test]
fn the_r_cf_robust_head_attacks_from_the_clean_image_between_clean_epochs() -> TestResult {
    // the attack's first forward sees the clean images themselves
    let x = edge_images()?;
    let y = Tensor::new(&[0u32, 1], &Device::Cpu)?;
    let c = cfg(json!({"mode": "alf", "pgd_steps": 1, "random_start": false}));
    let mut first: Option<Tensor> = None;
    let objective = |xa: &Tensor| {
        if first.is_none() {
            first = Some(xa.clone());
        }
        cross_entropy_per_example(&toy_logits(xa)?, &y)
    };
    crate::nn::attacks::pgd(&x, objective, &c.alf_attack(), &mut Rng::new(1))?;
    assert_eq!(max_diff(&first.ok_or("the objective never ran")?, &x), 0.0);
    // a clean epoch of ALF trains the head exactly as SLF's per-batch path; the adversarial
    // epoch after it does not
    let d = data(48, 8);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(6))?;
    let base = json!({"optimizer": "adam", "lr": 0.01, "schedule": "constant", "weight_decay": 0,
                      "batch_size": 16, "drop_last": true, "augment": false, "head_init": "default",
                      "pgd_steps": 3, "alpha": 0.01, "seed": 3});
    let with = |extra: Value| {
        let mut v = base.clone();
        v.as_object_mut()
            .expect("map")
            .extend(extra.as_object().expect("map").clone());
        cfg(v)
    };
    let mut alf = Finetuner::new(
        with(json!({"mode": "alf", "epochs": 1, "random_start": false, "clean_epochs_before": 1})),
        &enc,
        &d.train,
        4,
        &Device::Cpu,
    )?;
    let mut slf_cfg = with(json!({"mode": "slf", "epochs": 2}));
    slf_cfg.cache_features = false;
    let mut slf = Finetuner::new(slf_cfg, &enc, &d.train, 4, &Device::Cpu)?;
    let hooks = TrainHooks::default();
    let (a0, s0) = (alf.train_epoch(&hooks)?, slf.train_epoch(&hooks)?);
    let ((wa, ba), (ws, bs)) = (head(alf.varmap()), head(slf.varmap()));
    assert!(
        max_diff(&wa, &ws) < 1e-6 && max_diff(&ba, &bs) < 1e-6,
        "clean epoch: the heads differ by {} / {}",
        max_diff(&wa, &ws),
        max_diff(&ba, &bs)
    );
    assert!(
        (a0.loss - s0.loss).abs() < 1e-6 && a0.acc == s0.acc,
        "{a0:?} vs {s0:?}"
    );
    let (a1, s1) = (alf.train_epoch(&hooks)?, slf.train_epoch(&hooks)?);
    assert!(alf.finished());
    let (wa, _) = head(alf.varmap());
    let (ws, _) = head(slf.varmap());
    assert!(
        max_diff(&wa, &ws) > 1e-4,
        "the adversarial epoch trained on clean inputs"
    );
    assert!(
        a1.loss > s1.loss,
        "PGD inputs: loss {} vs clean {}",
        a1.loss,
        s1.loss
    );
    Ok(())
}

#[test]
fn the_stage_resumes_from_the_state_in_its_scratch_folder() -> TestResult {
    use pipe_engine::{Overrides, graph, spec};
    use std::sync::atomic::AtomicBool;
    let tmp = TempDir::new("finetune-stage-resume");
    let dir = tmp.path();
    let base = "stages:
  data:
    kind: dataset
    params: {source: synthetic, n_classes: 4, n_train: 32, n_test: 8, seed: 1}
  pre:
    kind: pretrain
    inputs: {dataset: data}
    params: {method: emp_ssl, n_views: 2, views: crop, batch_size: 16, epochs: 1, width: 8, hidden_dim: 32, z_dim: 16, seed: 2}
";
    let ft = "  ft:
    kind: finetune
    inputs: {encoder: pre, dataset: data}
    params: {mode: aff, epochs: 2, batch_size: 16, pgd_steps: 1, milestones: [1], seed: 3}
";
    let mut reg = pipe_engine::Registry::new();
    crate::register_all(&mut reg);
    let store = pipe_cache::Store::open(dir.join("store"))?;
    let opts = pipe_engine::RunOptions {
        jobs: 1,
        gpus: 0,
        keep_going: false,
        pipe_version: "test".into(),
        ..Default::default()
    };
    let cancel = AtomicBool::new(false);
    let plan_of = |yaml: &str| -> std::result::Result<pipe_engine::plan::Plan, String> {
        let file = dir.join("p.yaml");
        std::fs::write(&file, yaml).map_err(|e| e.to_string())?;
        let p = spec::load(&file, &reg, &Overrides::default()).map_err(|e| format!("{e}"))?;
        pipe_engine::plan::plan(graph::build(p, &reg), &store, &[]).map_err(|e| format!("{e}"))
    };
    // the upstream nodes first
    let plan = plan_of(base)?;
    let s = pipe_engine::exec::run(&plan, &reg, &store, &opts, &cancel, &mut pipe_engine::Quiet);
    assert!(!s.failed(), "{:?}", s.results);
    let entry_of = |plan: &pipe_engine::plan::Plan, id: &str| -> std::result::Result<_, String> {
        let node = plan
            .graph
            .nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or(format!("no {id} node"))?;
        store
            .get(node.key.key())
            .map_err(|e| e.to_string())?
            .ok_or(format!("{id} not committed"))
    };
    let d = crate::data::load_dataset(&entry_of(&plan, "data")?.file(DATA_FILE)?)?;
    let enc =
        EncoderWeights::from_file(&entry_of(&plan, "pre")?.file(ENCODER_FILE)?, &Device::Cpu)?;
    // a run of `ft` killed after its first epoch: only its state is left in the scratch folder
    let full = plan_of(&format!("{base}{ft}"))?;
    let node = full
        .graph
        .nodes
        .iter()
        .find(|n| n.id == "ft")
        .ok_or("no ft node")?;
    let c = serde_json::from_value::<FinetuneParams>(node.params.clone())?.config();
    let mut first = Finetuner::new(c.clone(), &enc, &d.train, d.classes.len(), &Device::Cpu)?;
    first.train_epoch(&TrainHooks::default())?;
    first.save_state(&store.scratch_dir(node.key.key())?.join(STATE_FILE))?;
    let s = pipe_engine::exec::run(&full, &reg, &store, &opts, &cancel, &mut pipe_engine::Quiet);
    assert!(!s.failed(), "{:?}", s.results);
    let entry = entry_of(&full, "ft")?;
    let log = std::fs::read_to_string(entry.dir.join("log.txt"))?;
    assert!(log.contains("after epoch 1 of 2"), "{log}");
    assert!(log.contains("resumed from"), "{log}");
    let m: Value = metrics_of(&entry)?;
    assert_eq!(
        (m["epochs"].clone(), m["steps"].clone()),
        (json!(2), json!(4))
    );
    // the same classifier as an uninterrupted run
    let whole = run(c, &enc, &d)?;
    let (saved, _) = Classifier::load(
        &entry.file(WEIGHTS_FILE)?,
        &entry.file(SPEC_FILE)?,
        &Device::Cpu,
    )?;
    assert_eq!(values(&saved), values(&whole.varmap));
    Ok(())
}

/// Every cell of METHODS.md 10.3 (batch / lr / milestones / epochs per pretraining label,
/// downstream set and mode), typed in from the table, against the per-pretraining presets.
#[test]
fn r_air_presets_match_methods_10_3() {
    type Cell = (usize, f64, [usize; 2], usize);
    let long: Cell = (128, 0.1, [40, 60], 100);
    let short: Cell = (128, 0.1, [15, 20], 25);
    let lin = |lr: f64, epochs: usize| -> Cell { (512, lr, [10, 20], epochs) };
    // (preset, SLF, ALF, AFF)
    let table: [(&str, Cell, Cell, Cell); 10] = [
        ("acl", lin(0.01, 25), lin(0.01, 25), long),
        ("acl_cifar100", lin(0.05, 25), lin(0.05, 25), long),
        ("dynacl", lin(0.01, 25), lin(0.01, 25), short),
        ("dynacl_cifar100", lin(0.05, 25), lin(0.05, 25), short),
        ("acl_air", lin(0.005, 25), lin(0.01, 25), long),
        ("acl_air_cifar100", lin(0.1, 25), lin(0.1, 25), long),
        ("dynacl_air", lin(0.01, 5), lin(0.01, 25), short),
        ("dynacl_air_cifar100", lin(0.1, 25), lin(0.1, 25), short),
        ("dynacl_air_pp", lin(0.01, 25), lin(0.01, 4), short),
        ("dynacl_air_pp_cifar100", lin(0.1, 25), lin(0.1, 25), short),
    ];
    for (preset, slf, alf, aff) in table {
        for (mode, want) in [("slf", slf), ("alf", alf), ("aff", aff)] {
            let c = params(json!({"mode": mode, "preset": preset})).config();
            let Schedule::Multistep { milestones } = c.schedule.clone() else {
                panic!("{preset}/{mode}: {:?}", c.schedule)
            };
            assert_eq!(
                (c.batch_size, c.lr, milestones, c.epochs),
                (want.0, want.1, want.2.to_vec(), want.3),
                "{preset}/{mode}"
            );
            assert_eq!(
                (
                    c.optimizer,
                    c.momentum,
                    c.weight_decay,
                    c.drop_last,
                    c.augment,
                    c.head_init
                ),
                (OptimizerKind::Sgd, 0.9, 2e-4, false, true, HeadInit::Zeros),
                "{preset}/{mode}"
            );
        }
    }
    // a preset and its values written out key alike
    // AdvCL: R-ADV's SLF (milestones 15, 20; PyTorch's head init), R-AIR's fallback otherwise
    let c = params(json!({"mode": "slf", "preset": "advcl"})).config();
    assert_eq!(
        (
            c.batch_size,
            c.lr,
            c.epochs,
            c.weight_decay,
            c.head_init,
            c.augment
        ),
        (512, 0.01, 25, 2e-4, HeadInit::Default, true)
    );
    assert_eq!(
        c.schedule,
        Schedule::Multistep {
            milestones: vec![15, 20]
        }
    );
    for mode in ["alf", "aff"] {
        let c = params(json!({"mode": mode, "preset": "advcl"})).config();
        assert_eq!(
            (c.batch_size, c.lr, c.epochs, c.head_init),
            (128, 0.1, 25, HeadInit::Zeros)
        );
    }
    let a = normalize(json!({"mode": "aff", "preset": "acl"}));
    let b = normalize(
        json!({"mode": "aff", "preset": "air", "milestones": [40, 60], "epochs": 100, "features": "backbone"}),
    );
    assert_eq!(
        a.map_err(|e| format!("{e:?}")),
        b.map_err(|e| format!("{e:?}"))
    );
}

/// A run interrupted within an epoch: trains `c` to the end writing its state after every batch
/// (with the feature journal on), copying the state after `snap` batches aside; a fresh
/// trainer resumed from the copy, and one resumed from the state a cancellation after `snap`
/// batches writes, must both end bit-identical to the uninterrupted run. Returns the resume
/// point of the copy and the log lines of the resumed run.
fn finetune_mid_epoch(
    c: &FinetuneConfig,
    enc: &EncoderWeights,
    d: &Dataset,
    snap: usize,
    dir: &Path,
) -> std::result::Result<(crate::nn::checkpoint::ResumePoint, Vec<String>), trainer::Error> {
    use crate::data::testutil::{cancel_at_poll, copy_at_poll};
    use crate::journal::Journal;
    use std::sync::Mutex;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let make = || Finetuner::new(c.clone(), enc, &d.train, 4, &Device::Cpu);
    let every_batch = dir.join("every-batch.state");
    let copy = dir.join("copy.state");
    let mut full = make()?;
    full.checkpoint_to(every_batch.clone(), std::time::Duration::ZERO);
    full.journal_features(Journal::at(dir));
    let copy_at_snap = copy_at_poll(snap, every_batch.clone(), copy.clone());
    let hooks = TrainHooks {
        cancelled: &copy_at_snap,
        ..TrainHooks::default()
    };
    while !full.finished() {
        full.train_epoch(&hooks)?;
    }
    let want = trainer_values(&full)?;
    let curve = |t: &Finetuner<'_>| -> Vec<(f64, f64, Option<f64>, f64, usize)> {
        t.curve()
            .iter()
            .map(|e| (e.loss, e.acc, e.natural_acc, e.lr, e.images))
            .collect()
    };
    let lines = Mutex::new(Vec::new());
    let finish =
        |path: &Path| -> std::result::Result<crate::nn::checkpoint::ResumePoint, trainer::Error> {
            let mut r = make()?;
            r.journal_features(Journal::at(dir));
            r.load_state(path)?;
            let at = r.resume_point();
            let log = |l: &str| lines.lock().expect("lines").push(l.to_string());
            let hooks = TrainHooks {
                log: &log,
                ..TrainHooks::default()
            };
            while !r.finished() {
                r.train_epoch(&hooks)?;
            }
            assert!(
                trainer_values(&r)? == want,
                "resumed at {at:?}: other weights"
            );
            assert_eq!(curve(&r), curve(&full), "resumed at {at:?}");
            assert_eq!(r.steps(), full.steps());
            Ok(at)
        };
    let at = finish(&copy)?;
    let copy_lines = lines.lock().expect("lines").clone();
    // the state a cancellation writes (no other mid-epoch write: the interval is an hour)
    let on_cancel = dir.join("on-cancel.state");
    let mut k = make()?;
    k.checkpoint_to(on_cancel.clone(), std::time::Duration::from_secs(3600));
    let cancel_at_snap = cancel_at_poll(snap);
    let hooks = TrainHooks {
        cancelled: &cancel_at_snap,
        ..TrainHooks::default()
    };
    let err = loop {
        match k.train_epoch(&hooks) {
            Err(e) => break e.to_string(),
            Ok(_) if k.finished() => break String::new(),
            Ok(_) => {}
        }
    };
    assert!(err.contains("cancelled"), "{err}");
    assert_eq!(finish(&on_cancel)?, at, "the cancellation's state");
    Ok((at, copy_lines))
}

#[test]
fn a_run_resumes_mid_epoch_bit_identically() -> TestResult {
    use crate::nn::checkpoint::ResumePoint;
    let d = data(32, 8);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(5))?;
    let tmp = TempDir::new("finetune-mid-epoch");
    let at = |epochs_done, batches_done| ResumePoint {
        epochs_done,
        epochs: 2,
        batches_done,
    };
    // SLF on cached features (4 batches of 8): the poll before each feature chunk (one here)
    // and each batch; after batch 2 of epoch 2 the cache is replayed from the journal
    let c = cfg(json!({"mode": "slf", "epochs": 2, "batch_size": 8, "seed": 4}));
    let (r, lines) = finetune_mid_epoch(&c, &enc, &d, 7, tmp.path())?;
    assert_eq!(r, at(1, 2));
    assert!(
        lines.iter().any(|l| l.contains("(1 of 1 chunks replayed)")),
        "{lines:?}"
    );
    // SLF with per-epoch augmentation (a new feature pass each epoch), within epoch 1
    let c = cfg(
        json!({"mode": "slf", "epochs": 2, "batch_size": 8, "augment": true,
                       "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "seed": 4}),
    );
    assert_eq!(finetune_mid_epoch(&c, &enc, &d, 2, tmp.path())?.0, at(0, 1));
    // ALF and AFF: 2 batches of 16 per epoch, a rate step between the epochs; after batch 1
    // of epoch 2
    for mode in ["alf", "aff"] {
        let c = cfg(
            json!({"mode": mode, "epochs": 2, "batch_size": 16, "pgd_steps": 2,
                           "seed": 4, "milestones": [1]}),
        );
        assert_eq!(
            finetune_mid_epoch(&c, &enc, &d, 3, tmp.path())?.0,
            at(1, 1),
            "{mode}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// [Q35]: R-ADV's best-on-test selection.

#[test]
fn select_is_keyed_only_when_not_last_and_only_for_full_head_slf_and_alf() {
    let slf = norm_ok(json!({"mode": "slf"}));
    assert!(slf.get("select").is_none(), "{slf}");
    assert_eq!(norm_ok(json!({"mode": "slf", "select": "last"})), slf);
    assert_eq!(cfg(json!({"mode": "slf"})).select, Selection::Last);
    let best = norm_ok(json!({"mode": "slf", "select": "best_test_pgd20"}));
    assert_eq!(best["select"], json!("best_test_pgd20"));
    assert_ne!(best, slf);
    assert_eq!(norm_ok(best.clone()), best);
    assert_eq!(
        cfg(json!({"mode": "alf", "select": "best_test_pgd20"})).select,
        Selection::BestTestPgd20
    );
    for bad in [
        json!({"mode": "aff", "select": "best_test_pgd20"}),
        json!({"mode": "slf", "head": "ncrop", "select": "best_test_pgd20"}),
    ] {
        let e = errors(bad.clone());
        assert!(e.iter().any(|m| m.contains("select")), "{bad}: {e:?}");
    }
    let e = errors(json!({"mode": "slf", "select": "best"}));
    assert!(e.iter().any(|m| m.contains("best_test_pgd20")), "{e:?}");
}

/// The head (`classifier.*`) of a trainer, as bytes.
fn head_values(vm: &VarMap) -> BTreeMap<String, Vec<u8>> {
    values(vm)
        .into_iter()
        .filter(|(n, _)| n.starts_with("classifier."))
        .collect()
}

#[test]
fn best_test_pgd20_keeps_the_head_of_the_epoch_with_the_best_test_pgd_accuracy() -> TestResult {
    let d = data(64, 48);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(8))?;
    let hooks = TrainHooks::default();
    // SGD at a high rate: the head's test accuracies move from epoch to epoch
    let c = cfg(
        json!({"mode": "slf", "epochs": 5, "batch_size": 16, "optimizer": "sgd",
                       "lr": 2.0, "select": "best_test_pgd20", "seed": 4}),
    );
    let mut t = Finetuner::new(c.clone(), &enc, &d.train, 4, &Device::Cpu)?;
    // without the test split the run refuses to select
    assert!(t.train_epoch(&hooks).is_err());
    let mut t = Finetuner::new(c, &enc, &d.train, 4, &Device::Cpu)?;
    t.select_on(&d.test)?;
    let mut heads = Vec::new();
    while !t.finished() {
        t.train_epoch(&hooks)?;
        heads.push(head_values(t.varmap()));
    }
    let robust: Vec<f64> = t
        .curve()
        .iter()
        .map(|e| e.test_pgd_acc.expect("pgd acc"))
        .collect();
    let clean: Vec<f64> = t
        .curve()
        .iter()
        .map(|e| e.test_clean_acc.expect("clean acc"))
        .collect();
    // the first epoch with the highest PGD-20 accuracy (R-ADV's `>`)
    let best = robust
        .iter()
        .enumerate()
        .fold(0, |b, (i, &r)| if r > robust[b] { i } else { b });
    assert_eq!(t.selected_epoch(), Some(best), "{robust:?}");
    // the attack attacks: robust below clean somewhere, never above
    assert!(
        robust.iter().zip(&clean).all(|(r, c)| r <= c),
        "{robust:?} {clean:?}"
    );
    assert!(
        robust.iter().zip(&clean).any(|(r, c)| r < c),
        "{robust:?} {clean:?}"
    );
    let (vm, clf) = t.finish()?;
    assert_eq!(head_values(&vm), heads[best], "kept head of epoch {best}");
    // the trainer itself still holds the last epoch's head
    assert_eq!(head_values(t.varmap()), heads[heads.len() - 1]);
    // the kept classifier's clean test accuracy is the one recorded for its epoch
    let acc = accuracy(&clf, &d.test, 0, &Device::Cpu)?;
    assert!(
        (acc - clean[best]).abs() < 1e-12,
        "{acc} vs {}",
        clean[best]
    );
    let m = t.metrics("cpu");
    assert_eq!(m["selected_epoch"], json!(best + 1));
    assert_eq!(m["selected_test_pgd20_acc"], json!(robust[best]));
    assert_eq!(m["select"], json!("best_test_pgd20"));
    // a `last` run has none of it
    let mut last = Finetuner::new(
        cfg(json!({"mode": "slf", "epochs": 1, "batch_size": 16})),
        &enc,
        &d.train,
        4,
        &Device::Cpu,
    )?;
    last.train_epoch(&hooks)?;
    assert!(last.metrics("cpu").get("selected_epoch").is_none());
    assert!(last.curve()[0].test_pgd_acc.is_none());
    Ok(())
}

#[test]
fn a_resumed_selection_keeps_the_same_head() -> TestResult {
    let d = data(48, 32);
    let enc = EncoderWeights::from_varmap(&pretrain_encoder(9))?;
    let hooks = TrainHooks::default();
    let tmp = TempDir::new("finetune-select-resume");
    let c = cfg(
        json!({"mode": "slf", "epochs": 3, "batch_size": 16, "optimizer": "sgd",
                       "lr": 2.0, "select": "best_test_pgd20", "seed": 1}),
    );
    let mut whole = Finetuner::new(c.clone(), &enc, &d.train, 4, &Device::Cpu)?;
    whole.select_on(&d.test)?;
    while !whole.finished() {
        whole.train_epoch(&hooks)?;
    }
    for stop in [1, 2] {
        let path = tmp.path().join(format!("state-{stop}.safetensors"));
        {
            let mut first = Finetuner::new(c.clone(), &enc, &d.train, 4, &Device::Cpu)?;
            first.select_on(&d.test)?;
            for _ in 0..stop {
                first.train_epoch(&hooks)?;
            }
            first.save_state(&path)?;
        }
        let mut resumed = Finetuner::new(c.clone(), &enc, &d.train, 4, &Device::Cpu)?;
        resumed.select_on(&d.test)?;
        resumed.load_state(&path)?;
        while !resumed.finished() {
            resumed.train_epoch(&hooks)?;
        }
        assert_eq!(
            resumed.selected_epoch(),
            whole.selected_epoch(),
            "stop {stop}"
        );
        assert_eq!(
            trainer_values(&resumed)?,
            trainer_values(&whole)?,
            "stop {stop}"
        );
        let strip = |t: &Finetuner<'_>| -> Vec<(f64, f64, Option<f64>, Option<f64>)> {
            t.curve()
                .iter()
                .map(|e| (e.loss, e.acc, e.test_clean_acc, e.test_pgd_acc))
                .collect()
        };
        assert_eq!(strip(&resumed), strip(&whole), "stop {stop}");
    }
    Ok(())
}

#[test]
fn the_stage_selects_on_the_dataset_test_split() -> TestResult {
    let (_tmp, plan, store) = run_chain(
        "finetune-select",
        TINY_EMP,
        "{mode: slf, epochs: 2, batch_size: 16, lr: 0.01, seed: 3, select: best_test_pgd20}",
    )?;
    let entry = entry_of_node(&plan, &store, "ft")?;
    let m: Value = metrics_of(&entry)?;
    let curve = m["curve"].as_array().ok_or("curve")?;
    let robust: Vec<f64> = curve
        .iter()
        .map(|e| e["test_pgd_acc"].as_f64().ok_or("test_pgd_acc"))
        .collect::<std::result::Result<_, _>>()?;
    let kept = if robust[1] > robust[0] { 2 } else { 1 };
    assert_eq!(m["selected_epoch"], json!(kept), "{m}");
    assert_eq!(m["selected_test_pgd20_acc"], json!(robust[kept - 1]), "{m}");
    // eight test images: accuracies are multiples of 1/8
    assert!(
        robust.iter().all(|r| (r * 8.0).fract() == 0.0),
        "{robust:?}"
    );
    let log = std::fs::read_to_string(entry.file("log.txt")?)?;
    assert!(
        log.contains("select: best_test_pgd20, PGD-20 on the 8 test images"),
        "{log}"
    );
    assert!(
        log.contains(&format!("kept the head of epoch {kept}")),
        "{log}"
    );
    Ok(())
}
