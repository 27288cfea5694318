use super::*;
use crate::nn::checkpoint::Resumable;
use crate::nn::init::named_vars;
use candle::{D, Device, Tensor};
use serde_json::json;

type TestResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn params(v: Value) -> PretrainParams {
    serde_json::from_value(v).unwrap_or_else(|e| panic!("valid params: {e}"))
}

fn normalize(v: Value) -> std::result::Result<Value, Vec<ParamError>> {
    let mut reg = pipe_engine::Registry::new();
    crate::register_all(&mut reg);
    let kind = reg.get("pretrain").expect("registered");
    kind.normalize(
        v,
        &NormalizeCtx {
            pipeline_dir: Path::new("."),
        },
    )
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
fn a_gpu_out_of_memory_failure_names_the_resolved_batch_size_and_views() -> TestResult {
    let mut reg = pipe_engine::Registry::new();
    crate::register_all(&mut reg);
    let kind = reg.get("pretrain").expect("registered");
    let p =
        normalize(json!({"method": "emp_ssl", "attack": "free"})).map_err(|e| format!("{e:?}"))?;
    // what candle's CUDA backend reports (cudarc's `DriverError` Debug form) with our causes
    let oom = "train step 3: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
    let hint = kind.explain_failure(&p, oom).ok_or("no hint")?;
    assert!(
        hint.starts_with(
            "the GPU ran out of memory: lower `batch_size` (here 100) or `n_views` (here 16)"
        ),
        "{hint}"
    );
    let p = normalize(json!({"method": "emp_ssl", "attack": "free", "batch_size": 20}))
        .map_err(|e| format!("{e:?}"))?;
    let hint = kind.explain_failure(&p, oom).ok_or("no hint")?;
    assert!(hint.contains("`batch_size` (here 20)"), "{hint}");
    assert_eq!(
        kind.explain_failure(&p, "the dataset has no test split"),
        None
    );
    Ok(())
}

#[test]
fn defaults_follow_method_and_attack() {
    let c = params(json!({"method": "emp_ssl"})).config();
    assert_eq!(
        (c.views, c.n_views, c.batch_size, c.epochs, c.z_dim),
        (ViewKind::Patch, 64, 128, 30, 1024)
    );
    assert_eq!((c.scale, c.ratio), ([0.25, 0.25], [1.0, 1.0]));
    let c = params(json!({"method": "emp_ssl", "attack": "pgd"})).config();
    assert_eq!(
        (c.views, c.n_views, c.batch_size, c.epochs, c.pgd_steps),
        (ViewKind::Crop, 16, 128, 30, 5)
    );
    assert!((c.eps - 8.0 / 255.0).abs() < 1e-15 && c.alpha == 0.01);
    let c = params(json!({"method": "emp_ssl", "attack": "free"})).config();
    assert_eq!((c.n_views, c.batch_size, c.epochs, c.m), (16, 100, 10, 3));
    let c = params(json!({"method": "simclr", "attack": "free"})).config();
    assert_eq!(
        (c.n_views, c.batch_size, c.epochs, c.z_dim),
        (2, 512, 167, 128)
    );
    assert_eq!(
        (c.temperature, c.base_temperature, c.lr, c.width),
        (0.07, 0.07, 0.3, 64)
    );
    let c = params(json!({"method": "simclr"})).config();
    assert_eq!((c.views, c.epochs), (ViewKind::Crop, 500));
    assert!(c.faithful.q6 && c.faithful.q7 && c.faithful.q8 && c.faithful.q10);
}

#[test]
fn canonical_form_keys_equivalent_params_alike() -> TestResult {
    // written defaults, fractions and params that do not apply normalise to the same value
    let a = normalize(json!({"method": "emp_ssl", "attack": "pgd", "m": 5, "temperature": 0.5}))
        .map_err(|e| format!("{e:?}"))?;
    let b = normalize(json!({
        "method": "emp_ssl", "attack": "pgd", "eps": "8/255", "alpha": 0.01, "n_views": 16,
        "views": "crop", "faithful": {"q6": false, "q10": false}
    }))
    .map_err(|e| format!("{e:?}"))?;
    assert_eq!(a, b);
    assert!(a.get("m").is_none() && a.get("temperature").is_none());
    assert_eq!(a["faithful"], json!({"q7": true, "q8": true}));
    let c = normalize(json!({"method": "emp_ssl", "attack": "pgd", "faithful": {"q7": false}}))
        .map_err(|e| format!("{e:?}"))?;
    assert_ne!(a, c, "an applicable switch changes the params");
    let d = normalize(json!({"method": "emp_ssl", "attack": "pgd", "eps": "4/255"}))
        .map_err(|e| format!("{e:?}"))?;
    assert_ne!(a, d);
    // standard training drops every attack param
    let s = normalize(
        json!({"method": "simclr", "eps": 0.1, "m": 2, "pgd_steps": 9, "faithful": false}),
    )
    .map_err(|e| format!("{e:?}"))?;
    for k in ["eps", "alpha", "m", "pgd_steps", "patch_sim", "tcr"] {
        assert!(s.get(k).is_none(), "{k} in {s}");
    }
    assert_eq!(s["faithful"], json!({}));
    assert_eq!(s["temperature"], json!(0.07));
    // how often the state is written changes no result: not keyed
    let mut reg = pipe_engine::Registry::new();
    crate::register_all(&mut reg);
    let kind = reg.get("pretrain").ok_or("registered")?;
    let key = |v: Value| -> std::result::Result<Value, String> {
        Ok(kind.key_params(&normalize(v).map_err(|e| format!("{e:?}"))?))
    };
    let often = json!({"method": "emp_ssl", "attack": "free", "checkpoint_minutes": 0.5});
    assert_eq!(
        normalize(often.clone()).map_err(|e| format!("{e:?}"))?["checkpoint_minutes"],
        json!(0.5)
    );
    assert_eq!(
        key(often)?,
        key(json!({"method": "emp_ssl", "attack": "free"}))?
    );
    Ok(())
}

#[test]
fn bad_params_are_named() {
    let e = errors(json!({"method": "simclr", "n_views": 4, "epochs": 0, "scale": [0.5, 0.2]}));
    assert!(
        e.iter()
            .any(|m| m.starts_with("n_views: SimCLR uses exactly 2 views")),
        "{e:?}"
    );
    assert!(e.iter().any(|m| m.starts_with("epochs:")), "{e:?}");
    assert!(e.iter().any(|m| m.starts_with("scale:")), "{e:?}");
    let e = errors(json!({"method": "emp_ssl", "faithful": {"q9": true}}));
    assert!(
        e.iter().any(|m| m.contains("unknown switch faithful.q9")),
        "{e:?}"
    );
    let e = errors(json!({"method": "emp_ssl", "eps": "8/zero"}));
    assert!(
        e.iter()
            .any(|m| m.starts_with("eps:") && m.contains("8/255")),
        "{e:?}"
    );
    let e = errors(json!({"method": "emp_ssl", "checkpoint_minutes": -1}));
    assert!(
        e.iter().any(|m| m.starts_with("checkpoint_minutes:")),
        "{e:?}"
    );
    let e = errors(json!({"method": "byol"}));
    assert!(e.iter().any(|m| m.starts_with("method:")), "{e:?}");
    let e = errors(json!({"method": "emp_ssl", "epoch": 3}));
    assert!(e.iter().any(|m| m.contains("epoch")), "{e:?}");
    let e = errors(json!({"method": "emp_ssl", "lr": -1, "batch_size": 1}));
    assert!(
        e.iter().any(|m| m.starts_with("lr:")) && e.iter().any(|m| m.starts_with("batch_size:")),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Training on synthetic data at width 8.

fn data(n: usize) -> crate::data::Dataset {
    crate::data::testutil::four_classes(n, 8, 32)
}

fn small(method: &str, attack: &str) -> PretrainConfig {
    let emp = method == "emp_ssl";
    params(json!({
        "method": method, "attack": attack, "width": 8, "hidden_dim": 32, "z_dim": 16,
        "n_views": if emp { 4 } else { 2 }, "batch_size": 16, "epochs": 2, "m": 2,
        "pgd_steps": 2, "lr": 0.3, "views": "crop", "seed": 1,
    }))
    .config()
}

fn values(vm: &candle_nn::VarMap) -> Vec<(String, Vec<u8>)> {
    named_vars(vm)
        .into_iter()
        .map(|(n, v)| {
            let t = v.as_tensor().flatten_all().expect("flat");
            let bytes = match t.dtype() {
                candle::DType::I64 => t
                    .to_vec1::<i64>()
                    .expect("i64")
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                _ => t
                    .to_dtype(candle::DType::F32)
                    .expect("f32")
                    .to_vec1::<f32>()
                    .expect("f32")
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            };
            (n, bytes)
        })
        .collect()
}

#[test]
fn six_modes_train_with_finite_losses_and_checkpoints_load_back() -> TestResult {
    let d = data(64);
    let tmp = crate::data::testutil::TempDir::new("pretrain-six");
    for method in ["simclr", "emp_ssl"] {
        for attack in ["none", "pgd", "free"] {
            let cfg = small(method, attack);
            let mut t = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
            while !t.finished() {
                t.train_epoch(&TrainHooks::default())?;
            }
            let curve = t.curve();
            assert_eq!(curve.len(), 2);
            assert!(
                curve.iter().all(|e| e.loss.is_finite()),
                "{method}/{attack}: {curve:?}"
            );
            let m = if attack == "free" { 2 } else { 1 };
            assert_eq!(t.steps(), 2 * 4 * m, "{method}/{attack}: optimiser updates");
            if method == "emp_ssl" {
                assert!(
                    curve[0].terms.contains_key("invariance") && curve[0].terms.contains_key("tcr")
                );
            }
            if attack == "none" {
                assert!(
                    curve[1].loss < curve[0].loss,
                    "{method}: loss did not decrease: {curve:?}"
                );
            }
            // the checkpoint loads back into a fresh encoder with every tensor equal
            let path = tmp.path().join(format!("{method}-{attack}.safetensors"));
            t.save_encoder(&path)?;
            let (fresh, _) = crate::nn::init::build_seeded(
                99,
                &crate::nn::init::InitRules::r_cf("encoder"),
                candle::DType::F32,
                &Device::Cpu,
                |vb| crate::nn::heads::encoder(&cfg.encoder(), vb),
            )?;
            crate::nn::checkpoint::load(&fresh, &path, "", true)?;
            assert_eq!(values(&fresh), values(t.varmap()), "{method}/{attack}");
            let names = crate::nn::checkpoint::tensor_names(&path)?;
            assert!(
                names
                    .iter()
                    .any(|n| n == "encoder.layer4.1.bn2.running_var")
            );
            assert!(
                names.iter().any(|n| n == "pre_feature.0.weight")
                    && names.iter().any(|n| n == "projection.3.bias")
            );
        }
    }
    Ok(())
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .and_then(|a| {
            a.flatten_all()?
                .max(D::Minus1)?
                .to_dtype(candle::DType::F64)?
                .to_scalar::<f64>()
        })
        .expect("max")
}

fn min_max(t: &Tensor) -> (f64, f64) {
    let f = t
        .flatten_all()
        .expect("flat")
        .to_dtype(candle::DType::F64)
        .expect("f64");
    (
        f.min(0).and_then(|v| v.to_scalar::<f64>()).expect("min"),
        f.max(0).and_then(|v| v.to_scalar::<f64>()).expect("max"),
    )
}

#[test]
fn free_delta_persists_stays_in_the_ball_and_in_the_box_when_clean() -> TestResult {
    let d = data(64);
    for (method, faithful) in [("emp_ssl", false), ("simclr", false), ("emp_ssl", true)] {
        let mut cfg = small(method, "free");
        cfg.faithful.q10 = faithful;
        let mut t = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
        let eps = cfg.eps;
        for b in 0..3 {
            let images = t.batch_images(0, b);
            if b == 2 {
                // at the start of batch 3 the perturbation built on batches 1-2 is still there
                let delta = t.free_delta().ok_or("no delta after two batches")?;
                assert!(max_abs(delta) > 0.0, "{method}: delta was reset");
            }
            t.train_batch(&images, b as u64)?;
            let delta = t.free_delta().ok_or("no delta")?.clone();
            assert!(
                max_abs(&delta) <= eps + 1e-6,
                "{method}: |delta| {} > eps {eps}",
                max_abs(&delta)
            );
            // after the ascent δ is re-projected into the box of the current batch (both modes)
            let x = t.views_for(&images, b as u64)?;
            let target = if method == "simclr" {
                x.narrow(0, x.dim(0)? / 2, x.dim(0)? / 2)?
            } else {
                x
            };
            let (lo, hi) = min_max(&(target + &delta)?);
            assert!(
                lo >= -1e-6 && hi <= 1.0 + 1e-6,
                "{method}: x + delta in [{lo}, {hi}]"
            );
        }
    }
    Ok(())
}

#[test]
fn clean_free_mode_reprojects_on_a_new_batch_faithful_does_not() -> TestResult {
    // [Q10]: the first replay of batch 2 sees x2 + δ1; only the clean mode boxes it for x2.
    let d = data(64);
    let mut outside = [0.0f64; 2];
    for (i, q10) in [true, false].into_iter().enumerate() {
        let mut cfg = small("emp_ssl", "free");
        cfg.faithful.q10 = q10;
        cfg.m = 1;
        cfg.eps = 0.2; // large, so boundary pixels certainly leave the box
        cfg.alpha = 0.2;
        let t = &mut Pretrainer::new(cfg, &d.train, &Device::Cpu)?;
        let b0 = t.batch_images(0, 0);
        t.train_batch(&b0, 0)?;
        let b1 = t.batch_images(0, 1);
        let x1 = t.views_for(&b1, 1)?;
        let mut fd = FreeDeltaProbe::new(t.free_delta().ok_or("delta")?, !q10);
        fd.0.new_batch(&x1)?;
        let (lo, hi) = min_max(&(&x1 + fd.0.delta())?);
        outside[i] = (-lo).max(hi - 1.0).max(0.0);
    }
    assert!(
        outside[0] > 0.01,
        "faithful: x + delta stays inside ({})",
        outside[0]
    );
    assert!(
        outside[1] < 1e-6,
        "clean: x + delta leaves the box ({})",
        outside[1]
    );
    Ok(())
}

struct FreeDeltaProbe(crate::nn::attacks::FreeDelta);
impl FreeDeltaProbe {
    fn new(delta: &Tensor, clean: bool) -> Self {
        Self(crate::nn::attacks::FreeDelta::from_tensor(delta, clean))
    }
}

#[test]
fn same_seed_same_bits_and_resume_is_bit_identical() -> TestResult {
    let d = data(64);
    let tmp = crate::data::testutil::TempDir::new("pretrain-resume");
    for (method, attack) in [("emp_ssl", "free"), ("simclr", "pgd")] {
        let cfg = small(method, attack);
        let run = |epochs: usize| -> std::result::Result<Pretrainer<'_>, trainer::Error> {
            let mut t = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
            for _ in 0..epochs {
                t.train_epoch(&TrainHooks::default())?;
            }
            Ok(t)
        };
        let a = run(2)?;
        let b = run(2)?;
        assert_eq!(
            values(a.varmap()),
            values(b.varmap()),
            "{method}/{attack}: same seed, other bits"
        );
        // stop after epoch 1, resume in a fresh trainer from the saved state
        let path = tmp.path().join(format!("{method}-{attack}.state"));
        run(1)?.save_state(&path)?;
        let mut r = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
        r.load_state(&path)?;
        assert_eq!((r.epochs_done(), r.steps()), (1, a.steps() / 2));
        r.train_epoch(&TrainHooks::default())?;
        assert!(r.finished());
        assert_eq!(
            values(r.varmap()),
            values(a.varmap()),
            "{method}/{attack}: resumed run differs"
        );
        let losses = |t: &Pretrainer<'_>| t.curve().iter().map(|e| e.loss).collect::<Vec<_>>();
        assert_eq!(losses(&r), losses(&a));
        // a state that does not fit changes nothing: one tensor of the wrong shape (the last
        // checked), or counters past the run
        let saved = candle::safetensors::load(&path, &Device::Cpu)?;
        for (name, bad) in [
            (
                "meta/curve_json",
                crate::nn::checkpoint::json_tensor(&vec![0u8; 3])?,
            ),
            ("meta/counters", Tensor::new(&[9i64, 999], &Device::Cpu)?),
            // a mid-epoch state past the epoch's 4 batches
            (
                "meta/epoch_progress_json",
                crate::nn::checkpoint::json_tensor(&json!({
                    "batches": 4, "loss_sum": 0.0, "terms": {}, "images": 64, "seconds": 1.0
                }))?,
            ),
            (
                "optim/nonsense",
                Tensor::zeros(3, candle::DType::F32, &Device::Cpu)?,
            ),
        ] {
            let mut t = saved.clone();
            t.insert(name.into(), bad);
            let broken = tmp.path().join("broken.state");
            crate::nn::checkpoint::save_tensors(&t, &broken)?;
            let mut f = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
            let fresh = values(f.varmap());
            let e = f
                .load_state(&broken)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("broken.state"), "{name}: {e}");
            assert_eq!(
                values(f.varmap()),
                fresh,
                "{name}: a failed load changed weights"
            );
            assert_eq!(
                (f.epochs_done(), f.steps(), f.curve().len()),
                (0, 0, 0),
                "{name}"
            );
        }
        // another seed gives other weights
        let mut other = cfg.clone();
        other.seed = 2;
        let o = Pretrainer::new(other, &d.train, &Device::Cpu)?;
        assert_ne!(values(o.varmap()), values(a.varmap()));
    }
    Ok(())
}

#[test]
fn a_diverging_run_fails_naming_epoch_and_batch() -> TestResult {
    let d = data(64);
    let mut cfg = small("emp_ssl", "none");
    cfg.lars = false;
    cfg.lr = 1e30;
    let mut t = Pretrainer::new(cfg, &d.train, &Device::Cpu)?;
    let err = match t.train_epoch(&TrainHooks::default()) {
        Ok(s) => panic!("expected divergence, got {s:?}"),
        Err(e) => e.to_string(),
    };
    assert!(err.starts_with("epoch 0, batch "), "{err}");
    assert!(err.contains("the loss is"), "{err}");
    Ok(())
}

#[test]
fn batch_larger_than_the_data_is_an_error() {
    let d = data(8);
    let err = Pretrainer::new(small("simclr", "none"), &d.train, &Device::Cpu)
        .err()
        .map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("batch_size 16 is larger than the 8 training images")));
}

// ---------------------------------------------------------------------------------------------
// The ACL family (METHODS.md 5, 6).

#[test]
fn acl_family_defaults_keys_and_errors() -> TestResult {
    // R-AIR's defaults (METHODS.md 15, rows 57-69)
    let c = params(json!({"method": "acl"})).config();
    assert_eq!(
        (
            c.attack,
            c.n_views,
            c.batch_size,
            c.epochs,
            c.pgd_steps,
            c.warmup_epochs
        ),
        (AttackMode::Pgd, 2, 512, 1000, 5, 10)
    );
    assert_eq!(
        (c.lr, c.weight_decay, c.lars_eta, c.momentum),
        (5.0, 1e-6, 1e-3, 0.9)
    );
    assert!((c.eps - 8.0 / 255.0).abs() < 1e-15 && (c.alpha - 2.0 / 255.0).abs() < 1e-15);
    assert_eq!((c.temperature, c.base_temperature), (0.5, 0.5));
    assert!(!c.dyn_aug && c.lambda1 == 0.0 && c.faithful.q31);
    assert_eq!(c.branches(), ["normal", "pgd"]);
    let c = params(json!({"method": "air", "dyn_aug": true})).config();
    assert!(c.dyn_aug && (c.lambda1, c.lambda2) == (0.5, 0.5) && c.faithful.q28);
    // the CF-AMC-SSL defaults are untouched
    let c = params(json!({"method": "simclr"})).config();
    assert_eq!(
        (c.lr, c.weight_decay, c.lars_eta, c.attack),
        (0.3, 1e-4, 0.005, AttackMode::None)
    );

    // DynACL's schedule, 0-based epochs, E = 200, K = 50
    let c = params(json!({"method": "acl", "dyn_aug": true, "epochs": 200})).config();
    let s: Vec<f64> = [0, 49, 50, 99, 100, 199]
        .iter()
        .map(|&e| c.strength(e))
        .collect();
    assert_eq!(s, [1.0, 1.0, 0.75, 0.75, 0.5, 0.25]);
    assert!((c.omega(150) - 2.0 / 3.0 * 0.75).abs() < 1e-15 && c.omega(10) == 0.0);
    let c = params(json!({"method": "acl", "dyn_aug": true, "epochs": 4, "dyn_k": 2})).config();
    let s: Vec<f64> = (0..4).map(|e| c.strength(e)).collect();
    assert_eq!(s, [1.0, 1.0, 0.5, 0.5]);
    let plain = params(json!({"method": "acl", "epochs": 200})).config();
    assert_eq!((plain.strength(150), plain.omega(150)), (1.0, 0.0));
    // R-AIR keeps the last partial batch: 1000 images at 512 are 2 batches
    assert_eq!(c.iters_per_epoch(1000), 2);
    assert_eq!(small("simclr", "none").iters_per_epoch(1000), 62);

    // keying: CF-only params drop out, ACL params count, AIR's λ only for AIR
    let a = normalize(json!({"method": "acl"})).map_err(|e| format!("{e:?}"))?;
    let b = normalize(json!({
        "method": "acl", "attack": "pgd", "alpha": "2/255", "views": "patch", "nesterov": false,
        "z_dim": 7, "hidden_dim": 9, "lambda1": 3, "m": 4, "lars_clip": false, "dyn_k": 3,
        "faithful": {"q7": false, "q28": false}
    }))
    .map_err(|e| format!("{e:?}"))?;
    assert_eq!(a, b);
    assert_eq!(a["faithful"], json!({"q31": true}));
    for k in [
        "views",
        "scale",
        "z_dim",
        "lambda1",
        "base_temperature",
        "m",
    ] {
        assert!(a.get(k).is_none(), "{k} in {a}");
    }
    for changed in [
        json!({"method": "acl", "dyn_aug": true}),
        json!({"method": "acl", "dyn_aug": true, "dyn_k": 10}),
        json!({"method": "acl", "warmup_epochs": 5}),
        json!({"method": "acl", "faithful": {"q31": false}}),
        json!({"method": "acl", "attack": "none"}),
        json!({"method": "air"}),
    ] {
        let n = normalize(changed.clone()).map_err(|e| format!("{e:?}"))?;
        assert_ne!(a, n, "{changed}");
    }
    let air = normalize(json!({"method": "air"})).map_err(|e| format!("{e:?}"))?;
    let air2 =
        normalize(json!({"method": "air", "lambda1": 0.25})).map_err(|e| format!("{e:?}"))?;
    assert_ne!(air, air2);
    assert_eq!(air["faithful"], json!({"q28": true, "q31": true}));

    let e = errors(json!({"method": "air", "attack": "free", "n_views": 4, "lambda2": -1}));
    assert!(
        e.iter()
            .any(|m| m.starts_with("attack: ACL / AIR train with")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("n_views: ACL / AIR uses exactly 2 views")),
        "{e:?}"
    );
    assert!(e.iter().any(|m| m.starts_with("lambda2:")), "{e:?}");
    Ok(())
}

fn small_acl(method: &str, extra: Value) -> PretrainConfig {
    let mut v = json!({
        "method": method, "width": 8, "batch_size": 16, "epochs": 2, "pgd_steps": 2,
        "lr": 0.5, "warmup_epochs": 1, "seed": 1,
    });
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    params(v).config()
}

#[test]
fn acl_and_air_train_on_dual_bn_and_write_a_normalised_checkpoint() -> TestResult {
    // 40 images at batch 16: two full batches and a partial one of 8 (kept, as in R-AIR)
    let d = data(40);
    let tmp = crate::data::testutil::TempDir::new("pretrain-acl");
    let train = |cfg: PretrainConfig| -> std::result::Result<Pretrainer<'_>, trainer::Error> {
        let mut t = Pretrainer::new(cfg, &d.train, &Device::Cpu)?;
        while !t.finished() {
            t.train_epoch(&TrainHooks::default())?;
        }
        Ok(t)
    };
    let acl = train(small_acl("acl", json!({})))?;
    assert_eq!((acl.iters_per_epoch(), acl.steps()), (3, 6));
    let curve = acl.curve();
    assert_eq!(curve[0].images, 40);
    assert!(curve.iter().all(|e| e.loss.is_finite()), "{curve:?}");
    let (nat, adv) = (curve[0].terms["nat_cl"], curve[0].terms["adv_cl"]);
    // ω = 0: the loss is the sum of the two contrastive terms
    assert!((curve[0].loss - (nat + adv)).abs() < 1e-5, "{curve:?}");
    assert!(nat != adv, "{curve:?}");

    // AIR with λ1 = λ2 = 0 trains exactly the same parameters (the extra forward of the
    // original images moves only the normal branch's running statistics)
    let air0 = train(small_acl("air", json!({"lambda1": 0, "lambda2": 0})))?;
    let trainable_values = |t: &Pretrainer<'_>| -> Vec<(String, Vec<u8>)> {
        values(t.varmap())
            .into_iter()
            .filter(|(n, _)| !crate::nn::init::is_buffer(n))
            .collect()
    };
    assert_eq!(trainable_values(&air0), trainable_values(&acl));
    assert_ne!(values(air0.varmap()), values(acl.varmap()));
    // AIR's total is the weighted sum of its four terms
    let air = train(small_acl("air", json!({"lambda1": 0.5, "lambda2": 2.0})))?;
    let e = &air.curve()[1];
    let expected =
        e.terms["nat_cl"] + e.terms["adv_cl"] + 0.5 * e.terms["sir"] + 2.0 * e.terms["air"];
    assert!((e.loss - expected).abs() < 1e-5, "{e:?}");
    assert_ne!(trainable_values(&air), trainable_values(&acl));

    // the checkpoint: R-AIR's layout under our names, read by `finetune` through `pgd`
    let path = tmp.path().join("acl.safetensors");
    acl.save_encoder(&path)?;
    let names = crate::nn::checkpoint::tensor_names(&path)?;
    for n in [
        "encoder.normalize.mean",
        "encoder.normalize.std",
        "encoder.bn1.weight",
        "encoder.bn1.pgd.weight",
        "encoder.layer4.1.bn2.pgd.running_var",
        "projection.fc1.bias",
        "projection.bn3.pgd.running_mean",
    ] {
        assert!(names.iter().any(|m| m == n), "{n} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("pre_feature.")));
    let enc = crate::kinds::finetune::EncoderWeights::from_file(&path, &Device::Cpu)?;
    assert!(enc.has_pgd_branch() && enc.has_input_norm());
    assert_eq!((enc.width(), enc.hidden_dim()), (8, None));

    // plain contrastive learning (R-AIR without --ACL_DS) has one branch and one term
    let cl = train(small_acl("acl", json!({"attack": "none"})))?;
    assert_eq!(cl.backbone().branches(), ["normal"]);
    assert!(cl.curve()[0].terms.is_empty() && cl.curve()[1].loss.is_finite());
    Ok(())
}

#[test]
fn dynacl_resume_is_bit_identical() -> TestResult {
    let d = data(40);
    let tmp = crate::data::testutil::TempDir::new("pretrain-acl-resume");
    let cfg = small_acl("air", json!({"dyn_aug": true}));
    let run = |epochs: usize| -> std::result::Result<Pretrainer<'_>, trainer::Error> {
        let mut t = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
        for _ in 0..epochs {
            t.train_epoch(&TrainHooks::default())?;
        }
        Ok(t)
    };
    let a = run(2)?;
    let path = tmp.path().join("air.state");
    run(1)?.save_state(&path)?;
    let mut r = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
    r.load_state(&path)?;
    r.train_epoch(&TrainHooks::default())?;
    assert_eq!(values(r.varmap()), values(a.varmap()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RCS (METHODS.md 7).

#[test]
fn rcs_defaults_split_schedule_and_keys() -> TestResult {
    let c = params(json!({"method": "rcs"})).config();
    assert_eq!(
        (
            c.attack,
            c.batch_size,
            c.epochs,
            c.rcs_warmup,
            c.rcs_every,
            c.rcs_pgd_steps
        ),
        (AttackMode::Pgd, 512, 1000, 100, 20, 3)
    );
    assert_eq!(
        (c.rcs_fraction, c.rcs_lr, c.rcs_val_fraction),
        (0.2, 0.01, 0.01)
    );
    assert!(c.faithful.q38 && c.faithful.q41 && c.faithful.q43);
    // R-RCS on CIFAR-10: 49,500 + 500 images, a budget of 9,900 = 19 batches of 512
    let s = rcs::split(50_000, &c);
    assert_eq!(
        (s.train.len(), s.val.len(), s.budget, s.pool.len()),
        (49_500, 500, 9_900, 50_000)
    );
    assert_eq!(s.budget / c.batch_size, 19);
    let mut seen = s.train.clone();
    seen.extend(&s.val);
    seen.sort_unstable();
    assert_eq!(seen, (0..50_000).collect::<Vec<_>>());
    let clean = params(json!({"method": "rcs", "faithful": {"q41": false}})).config();
    assert_eq!(rcs::split(50_000, &clean).pool, s.train);
    // whole set for epochs 1..100, a selection at 101, 121, ..., the last coreset between
    let at = |e1: usize| rcs::schedule(&c, e1 - 1);
    assert_eq!(
        [at(1), at(100), at(101), at(102), at(120), at(121)],
        [
            (false, false),
            (false, false),
            (true, true),
            (false, true),
            (false, true),
            (true, true)
        ]
    );
    // keys: RCS params only for RCS; each one counts
    let a = normalize(json!({"method": "rcs"})).map_err(|e| format!("{e:?}"))?;
    assert_eq!(
        a["faithful"],
        json!({"q31": true, "q38": true, "q41": true, "q43": true})
    );
    let acl =
        normalize(json!({"method": "acl", "rcs_fraction": 0.5})).map_err(|e| format!("{e:?}"))?;
    assert!(acl.get("rcs_fraction").is_none(), "{acl}");
    for changed in [
        json!({"method": "rcs", "rcs_fraction": 0.1}),
        json!({"method": "rcs", "rcs_every": 10}),
        json!({"method": "rcs", "rcs_lr": 0.001}),
        json!({"method": "rcs", "faithful": {"q38": false}}),
        json!({"method": "rcs", "dyn_aug": true}),
    ] {
        let n = normalize(changed.clone()).map_err(|e| format!("{e:?}"))?;
        assert_ne!(a, n, "{changed}");
    }
    let e = errors(json!({"method": "rcs", "attack": "none", "rcs_fraction": 0, "rcs_every": 0}));
    for k in ["attack:", "rcs_fraction:", "rcs_every:"] {
        assert!(e.iter().any(|m| m.starts_with(k)), "{k} {e:?}");
    }
    Ok(())
}

/// RCS on 200 images (198 + 2 validation): the whole set for epoch 1, then a fresh
/// selection of a quarter of the pool (49 images, 3 batches of 16) every epoch.
fn small_rcs(epochs: usize) -> PretrainConfig {
    small_acl(
        "rcs",
        json!({"epochs": epochs, "rcs_warmup": 2, "rcs_every": 1, "rcs_fraction": 0.25,
               "pgd_steps": 1, "rcs_pgd_steps": 1}),
    )
}

#[test]
fn rcs_trains_on_the_selected_coreset_and_resumes_bit_identically() -> TestResult {
    // 200 images: 198 + 2 validation; fraction 0.25 of 198 = 49 images = 3 batches of 16
    let d = data(200);
    let cfg = small_rcs(3);
    let tmp = crate::data::testutil::TempDir::new("pretrain-rcs");
    let mut t = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
    let head_before = |t: &Pretrainer<'_>| -> Vec<(String, Vec<u8>)> {
        values(t.varmap())
            .into_iter()
            .filter(|(n, _)| rcs::HEAD_PARAMS.contains(&n.as_str()))
            .collect()
    };
    // epoch 1: the whole set (faithful: validation images included), 13 batches
    let e1 = t.train_epoch(&TrainHooks::default())?;
    assert_eq!((e1.images, t.steps(), t.coreset()), (200, 13, None));
    let nat = e1.terms["nat_cl"];
    let adv = e1.terms["adv_cl"];
    assert!(
        (e1.loss - 0.5 * (nat + adv)).abs() < 1e-5,
        "[Q43] halves the loss: {e1:?}"
    );
    // epoch 2 selects: the selection leaves the weights as they were
    let state = tmp.path().join("before-selection.state");
    t.save_state(&state)?;
    let head = head_before(&t);
    let sel = {
        let mut probe = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
        probe.load_state(&state)?;
        let Some(model) = probe.acl_model() else {
            return Err("no ACL model".into());
        };
        let split = rcs::split(200, &cfg);
        let views = crate::nn::augment::DynAclConfig::with_strength(1.0).config();
        let views = crate::nn::augment::MultiView::new(crate::nn::augment::MultiViewConfig {
            layout: crate::nn::augment::Layout::ViewMajor,
            ..views
        })?;
        let chosen = rcs::Selector {
            model,
            varmap: probe.varmap(),
            images: &d.train,
            split: &split,
            views: &views,
            cfg: &cfg,
            device: &Device::Cpu,
        }
        .select(1, &TrainHooks::default())?;
        assert_eq!(
            head_before(&probe),
            head,
            "the head is restored after the greedy steps"
        );
        chosen
    };
    assert_eq!(sel.len(), 48);
    let mut uniq = sel.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), 48, "a batch is picked at most once");
    let e2 = t.train_epoch(&TrainHooks::default())?;
    assert_eq!(
        t.coreset(),
        Some(sel.as_slice()),
        "the trainer selects the same coreset"
    );
    assert_eq!((e2.images, t.steps()), (48, 16));
    // R-RCS's per-epoch schedule: L = 3 batches, fast-forwarded by epoch · L
    let sched = WarmupCosineRef {
        base: 0.5,
        warmup: 3,
        total: 9,
    };
    assert!(
        (e2.lr - sched.lr(3 + 2)).abs() < 1e-12,
        "{} vs {}",
        e2.lr,
        sched.lr(5)
    );
    // epoch 3 (after warm-up, between selections): a fresh selection since every = 1
    let a = {
        t.train_epoch(&TrainHooks::default())?;
        values(t.varmap())
    };
    // resumed from the state before the selection: the same bits
    let mut r = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
    r.load_state(&state)?;
    while !r.finished() {
        r.train_epoch(&TrainHooks::default())?;
    }
    assert_eq!(values(r.varmap()), a);
    Ok(())
}

#[test]
fn r_emp_input_normalisation_is_keyed_trained_around_and_carried_to_the_classifier() -> TestResult {
    use crate::kinds::finetune::{EncoderWeights, Finetuner};
    // keyed only when set; the other families refuse it
    let norm = |v: Value| normalize(v).unwrap_or_else(|e| panic!("valid params: {e:?}"));
    let plain = norm(json!({"method": "emp_ssl"}));
    assert!(plain.get("input_norm").is_none(), "{plain}");
    assert_eq!(
        norm(json!({"method": "emp_ssl", "input_norm": "none"})),
        plain
    );
    let half = norm(json!({"method": "emp_ssl", "input_norm": "half"}));
    assert_eq!(half["input_norm"], json!("half"));
    let e = errors(json!({"method": "acl", "input_norm": "half"}));
    assert!(e.iter().any(|m| m.starts_with("input_norm")), "{e:?}");
    // the buffers hold 0.5, training leaves them there, and the classifier reads them
    let d = data(32);
    let mut cfg = small("emp_ssl", "none");
    cfg.input_norm = InputNormKind::Half;
    cfg.epochs = 1;
    let mut t = Pretrainer::new(cfg, &d.train, &Device::Cpu)?;
    t.train_epoch(&TrainHooks::default())?;
    let tmp = crate::data::testutil::TempDir::new("pretrain-input-norm");
    let path = tmp.path().join("encoder.safetensors");
    t.save_encoder(&path)?;
    let saved = candle::safetensors::load(&path, &Device::Cpu)?;
    for name in ["encoder.normalize.mean", "encoder.normalize.std"] {
        let v = saved.get(name).ok_or(name)?.to_vec1::<f32>()?;
        assert_eq!(v, [0.5; 3], "{name}");
    }
    let enc = EncoderWeights::from_file(&path, &Device::Cpu)?;
    assert!(enc.has_input_norm());
    let ft: crate::kinds::finetune::FinetuneParams =
        serde_json::from_value(json!({"mode": "slf", "epochs": 1, "batch_size": 16}))?;
    let ft = ft.config();
    let f = Finetuner::new(ft, &enc, &d.train, 4, &Device::Cpu)?;
    let mean = named_vars(f.varmap())
        .into_iter()
        .find(|(n, _)| n == "encoder.normalize.mean")
        .ok_or("no normalisation in the classifier")?;
    assert_eq!(
        mean.1.as_tensor().flatten_all()?.to_vec1::<f32>()?,
        [0.5; 3]
    );
    Ok(())
}

#[test]
fn views_have_the_size_of_the_images() -> TestResult {
    // 40×40 images: every method's views are 40×40 (the references' RandomResizedCrop(32) on
    // CIFAR), not 32×32 crops of them
    let d = crate::data::testutil::four_classes(16, 4, 40);
    for (cfg, views) in [
        (small("emp_ssl", "none"), 4),
        (small("simclr", "none"), 2),
        (small_acl("acl", json!({})), 2),
    ] {
        let t = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
        let x = t.views_for(&d.train.images[..2 * d.train.image_len()], 0)?;
        assert_eq!(x.dims(), [2 * views, 3, 40, 40], "{:?}", cfg.method);
    }
    Ok(())
}

#[test]
fn rcs_trains_on_r_rcs_initial_coreset_before_its_first_selection() -> TestResult {
    // warm-up 2, every 3: epochs 1-2 the whole set; epoch 3 neither selects ((3 − 1) mod 3 ≠ 0)
    // nor follows a selection, so R-RCS trains on `Coreset.__init__`'s random subset; 4 selects
    let d = data(200);
    let cfg = small_acl(
        "rcs",
        json!({"epochs": 3, "rcs_warmup": 2, "rcs_every": 3, "rcs_fraction": 0.25,
               "pgd_steps": 1, "rcs_pgd_steps": 1}),
    );
    let plan: Vec<(bool, bool)> = (0..4).map(|e| rcs::schedule(&cfg, e)).collect();
    assert_eq!(
        plan,
        [(false, false), (false, false), (false, true), (true, true)]
    );
    let split = rcs::split(200, &cfg);
    let initial = rcs::initial_coreset(&split, &cfg);
    let mut uniq = initial.clone();
    uniq.dedup();
    assert_eq!(
        (initial.len(), uniq.len()),
        (49, 49),
        "⌊0.25 · 198⌋ distinct images"
    );
    assert!(initial.iter().all(|i| split.pool.contains(i)));
    assert_ne!(
        initial,
        rcs::initial_coreset(&split, &small_acl("rcs", json!({"seed": 2})))
    );
    let mut t = Pretrainer::new(cfg, &d.train, &Device::Cpu)?;
    for _ in 0..2 {
        let e = t.train_epoch(&TrainHooks::default())?;
        assert_eq!((e.images, t.coreset()), (200, None));
    }
    let lines = std::sync::Mutex::new(Vec::<String>::new());
    let log = |l: &str| lines.lock().expect("lock").push(l.to_string());
    let e3 = t.train_epoch(&TrainHooks {
        log: &log,
        ..TrainHooks::default()
    })?;
    assert!(e3.loss.is_finite(), "{e3:?}");
    assert_eq!((e3.images, t.coreset()), (49, Some(initial.as_slice())));
    let lines = lines.into_inner().expect("lock");
    assert!(
        lines.iter().any(|l| l.contains("no coreset selected yet")),
        "{lines:?}"
    );
    Ok(())
}

/// ACL's warm-up + cosine (R-AIR `cosine_annealing` with `LambdaLR`), written out: the rate of
/// the update `t` (0-based) is `base · f(t + 1)`.
struct WarmupCosineRef {
    base: f64,
    warmup: usize,
    total: usize,
}

impl WarmupCosineRef {
    fn lr(&self, t: usize) -> f64 {
        let s = (t + 1) as f64;
        let (w, n) = (self.warmup as f64, self.total as f64);
        let min = 1e-6 / self.base;
        let f = if s < w {
            s / w
        } else {
            min + (1.0 - min) * 0.5 * (1.0 + ((s - w) / (n - w) * std::f64::consts::PI).cos())
        };
        self.base * f
    }
}

#[test]
fn the_canonical_form_reads_back_as_itself_and_keys_only_what_applies() -> TestResult {
    use pipe_engine::TypedStage;
    for v in [
        json!({"method": "simclr", "attack": "pgd", "faithful": {"q7": false}}),
        json!({"method": "emp_ssl", "attack": "free"}),
        json!({"method": "air", "faithful": false}),
        json!({"method": "rcs", "faithful": {"q41": false}}),
    ] {
        let n = normalize(v.clone()).map_err(|e| format!("{e:?}"))?;
        let p: PretrainParams = serde_json::from_value(n.clone())?;
        assert_eq!(serde_json::to_value(&p)?, n, "{v}");
        // the key: the four CF-AMC-SSL switches always (as the first version keyed them), the
        // later ones where they apply
        let k = <Pretrain as TypedStage>::key_params(&p);
        let f = k["faithful"].as_object().ok_or("faithful")?;
        for q in ["q6", "q7", "q8", "q10"] {
            assert!(f.contains_key(q), "{v}: {k}");
        }
        let later: Vec<&String> = f
            .keys()
            .filter(|q| !["q6", "q7", "q8", "q10"].contains(&q.as_str()))
            .collect();
        let expected: Vec<&str> = match v["method"].as_str() {
            Some("air") => vec!["q28", "q31"],
            Some("rcs") => vec!["q31", "q38", "q41", "q43"],
            _ => vec![],
        };
        assert_eq!(later, expected, "{v}: {k}");
        assert_eq!(k["device"], "cpu");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// AdvCL (METHODS.md 8).

#[test]
fn advcl_defaults_keys_and_errors() -> TestResult {
    let c = params(json!({"method": "advcl"})).config();
    assert_eq!(
        (c.attack, c.epochs, c.batch_size, c.pgd_steps, c.n_views),
        (AttackMode::Pgd, 1000, 512, 5, 2)
    );
    assert!((c.eps - 8.0 / 255.0).abs() < 1e-15 && (c.alpha - 2.0 / 255.0).abs() < 1e-15);
    assert_eq!(
        (c.lr, c.momentum, c.weight_decay, c.warmup_epochs),
        (0.5, 0.9, 1e-4, 10)
    );
    assert_eq!(
        (c.temperature, c.base_temperature, c.ce_weight, c.hf_radius),
        (0.5, 0.07, 0.2, 8.0)
    );
    assert_eq!((c.scale, c.z_dim), ([0.2, 1.0], 128));
    // [Q50]: R-ADV's loop runs epochs 0..=1001
    assert_eq!(c.run_epochs(), 1002);
    let clean = params(json!({"method": "advcl", "faithful": {"q50": false}})).config();
    assert_eq!(clean.run_epochs(), 1000);
    // what does not apply is dropped: these all key alike
    let key = |v: Value| -> Value {
        let p: PretrainParams = serde_json::from_value(normalize(v).expect("valid")).expect("p");
        Pretrain::key_params(&p)
    };
    let base = key(json!({"method": "advcl"}));
    for extra in [
        json!({"nesterov": false}),
        json!({"lars": false, "lars_eta": 0.1}),
        json!({"views": "patch", "z_dim": 64, "hidden_dim": 8}),
        json!({"lambda1": 3, "rcs_fraction": 0.5, "dyn_aug": true}),
        json!({"ce_weight": 0.2, "hf_radius": 8, "alpha": "2/255"}),
        // switches added after AdvCL's first version keep its keys while on
        json!({"faithful": {"q48": true}}),
    ] {
        let mut v = json!({"method": "advcl"});
        if let (Value::Object(m), Value::Object(e)) = (&mut v, extra.clone()) {
            m.extend(e);
        }
        assert_eq!(key(v), base, "{extra}");
    }
    for extra in [
        json!({"ce_weight": 0.5}),
        json!({"hf_radius": 4}),
        json!({"faithful": {"q47": false}}),
        json!({"faithful": {"q48": false}}),
        json!({"warmup_epochs": 2}),
    ] {
        let mut v = json!({"method": "advcl"});
        if let (Value::Object(m), Value::Object(e)) = (&mut v, extra.clone()) {
            m.extend(e);
        }
        assert_ne!(key(v), base, "{extra}");
    }
    // the AdvCL params and switches stay out of the other methods' keys
    let simclr = key(json!({"method": "simclr"}));
    assert!(simclr.get("ce_weight").is_none() && simclr["faithful"].get("q47").is_none());
    let e = errors(json!({"method": "advcl", "attack": "none", "ce_weight": -1, "hf_radius": -2}));
    assert!(e.iter().any(|m| m.starts_with("attack:")), "{e:?}");
    assert!(e.iter().any(|m| m.starts_with("ce_weight:")), "{e:?}");
    assert!(e.iter().any(|m| m.starts_with("hf_radius:")), "{e:?}");
    Ok(())
}

fn small_advcl(extra: Value) -> PretrainConfig {
    let mut v = json!({
        "method": "advcl", "width": 8, "batch_size": 16, "epochs": 2, "pgd_steps": 2,
        "warmup_epochs": 1, "seed": 1,
    });
    if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
        m.extend(e);
    }
    params(v).config()
}

/// Two pseudo-label sets of the synthetic images: K = 2 and K = 3 by index.
fn advcl_labels(n: usize) -> (Vec<usize>, Vec<Vec<u32>>) {
    let ks = vec![2, 3];
    let labels = ks
        .iter()
        .map(|&k| (0..n).map(|i| ((i * 7) % k) as u32).collect())
        .collect();
    (ks, labels)
}

/// `-log softmax(row)[y]` in f64.
fn ce_f64(row: &[f32], y: u32) -> f64 {
    let m = row
        .iter()
        .fold(f64::NEG_INFINITY, |a, &v| a.max(f64::from(v)));
    let lse = m + row
        .iter()
        .map(|&v| (f64::from(v) - m).exp())
        .sum::<f64>()
        .ln();
    lse - f64::from(row[y as usize])
}

#[test]
fn advcl_loss_is_supcon_plus_the_weighted_pseudo_label_ce() -> TestResult {
    let d = data(40);
    let (ks, labels) = advcl_labels(40);
    let cfg = small_advcl(json!({"ce_weight": 0.7}));
    let t = Pretrainer::advcl(cfg.clone(), &d.train, &ks, labels.clone(), &Device::Cpu)?;
    let idx = t.batch_indices(0, 0);
    let images = t.batch_images(0, 0);
    let batch = t.advcl_batch(&idx, &images, 0)?;
    // x_HF is the high-pass of x_o and may be negative; x_o is a crop of the image
    assert!(min_max(&batch.hf).0 < 0.0);
    let (x_cl, x_ce) = t.advcl_attack(&batch, 0)?;
    let (loss, contrast, ce) = t.advcl_loss(&batch, &x_cl, &x_ce)?;
    let (loss, contrast, ce) = (scalar_f64(&loss)?, scalar_f64(&contrast)?, scalar_f64(&ce)?);
    assert!(
        (loss - (contrast + 0.7 * ce)).abs() < 1e-5,
        "{loss} {contrast} {ce}"
    );
    // the CE term from the heads' logits, written out: mean over the batch, mean over sets
    let m = t.advcl_model().expect("advcl model");
    let f = m.features(&x_ce, "pgd_ce", true)?;
    let logits = m.pseudo_logits(&f)?;
    let mut want = 0.0;
    for (s, l) in logits.iter().enumerate() {
        let rows = l.to_vec2::<f32>()?;
        let per: f64 = rows
            .iter()
            .zip(&idx)
            .map(|(r, &i)| ce_f64(r, labels[s][i]))
            .sum::<f64>();
        want += per / rows.len() as f64;
    }
    want /= 2.0;
    assert!((ce - want).abs() < 1e-4, "{ce} vs {want}");
    // the contrastive term is SupCon of [x_cl through pgd; x1; x2; x_HF through normal]
    let z = Tensor::cat(
        &[
            &m.embed(&x_cl, "pgd", true)?,
            &m.embed(&batch.x1, "normal", true)?,
            &m.embed(&batch.x2, "normal", true)?,
            &m.embed(&batch.hf, "normal", true)?,
        ],
        0,
    )?;
    let sc = scalar_f64(&crate::nn::losses::supcon(&z, 4, 0.5, 0.07)?)?;
    assert!((contrast - sc).abs() < 1e-4, "{contrast} vs {sc}");
    // [Q45]: SupCon's base temperature 0.07 scales the term by 0.5 / 0.07 against τ_b = τ
    let plain = scalar_f64(&crate::nn::losses::supcon(&z, 4, 0.5, 0.5)?)?;
    assert!((contrast / plain - 0.5 / 0.07).abs() < 1e-3);

    // the attacks: each in the ε-ball around x_o and in the box, different from each other,
    // and both raise the objective above the clean start
    for a in [&x_cl, &x_ce] {
        let dlt = (a - &batch.xo)?;
        assert!(max_abs(&dlt) <= 8.0 / 255.0 + 1e-6);
        let (lo, hi) = min_max(a);
        assert!(lo >= 0.0 && hi <= 1.0);
        assert!(max_abs(&dlt) > 1.0 / 255.0, "the attack moved");
    }
    assert!(max_abs(&(&x_cl - &x_ce)?) > 0.0);
    let objective = |xc: &Tensor, xe: &Tensor| -> std::result::Result<f64, trainer::Error> {
        let (_, c, e) = t.advcl_loss(&batch, xc, xe)?;
        Ok(scalar_f64(&c)? + 0.7 * scalar_f64(&e)?)
    };
    let at_start = objective(&batch.xo, &batch.xo)?;
    let at_adv = objective(&x_cl, &x_ce)?;
    assert!(at_adv > at_start, "{at_adv} <= {at_start}");
    Ok(())
}

fn values_of(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(candle::DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32")
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn scalar_f64(t: &Tensor) -> std::result::Result<f64, trainer::Error> {
    Ok(t.to_dtype(candle::DType::F64)?.to_scalar::<f64>()?)
}

#[test]
fn advcl_q48_switches_the_clamps_of_the_start_and_the_hf_view() -> TestResult {
    let d = data(40);
    let (ks, labels) = advcl_labels(40);
    let batch_of = |extra: Value| -> std::result::Result<_, trainer::Error> {
        let t = Pretrainer::advcl(
            small_advcl(extra),
            &d.train,
            &ks,
            labels.clone(),
            &Device::Cpu,
        )?;
        let idx = t.batch_indices(0, 0);
        let images = t.batch_images(0, 0);
        let batch = t.advcl_batch(&idx, &images, 0)?;
        let adv = t.advcl_attack(&batch, 0)?;
        Ok((batch, adv))
    };
    let min = |t: &Tensor| -> candle::Result<f32> { t.flatten_all()?.min(0)?.to_scalar::<f32>() };
    // [Q48]: the high-frequency view of real-looking images goes below 0 unless clamped
    let (faithful, (cl, _)) = batch_of(json!({}))?;
    assert!(
        min(&faithful.hf)? < 0.0,
        "the HF view is never negative here"
    );
    let (clean, (cl_clean, _)) = batch_of(json!({"faithful": {"q48": false}}))?;
    assert!(min(&clean.hf)? >= 0.0);
    assert_eq!(max_abs(&(&faithful.xo - &clean.xo)?), 0.0, "the same views");
    assert!(
        max_abs(&(&cl - &cl_clean)?) > 0.0,
        "the clamps change the attack"
    );
    Ok(())
}

#[test]
fn advcl_trains_keeps_r_adv_bookkeeping_and_resumes_bit_identically() -> TestResult {
    let d = data(40);
    let (ks, labels) = advcl_labels(40);
    let tmp = crate::data::testutil::TempDir::new("pretrain-advcl");
    let counter = |t: &Pretrainer<'_>, name: &str| -> i64 {
        named_vars(t.varmap())
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor().to_scalar::<i64>().expect("i64"))
            .unwrap_or_else(|| panic!("{name}"))
    };
    // [Q47] faithful: per step, 2 PGD steps x (x_cl, x_ce, x1, x2, x_HF) forwards in train
    // mode, then the training forwards: pgd 2 + 1, pgd_ce 2 + 1, normal 3 · 2 + 3
    for (q47, pgd, normal) in [(true, 3, 9), (false, 1, 3)] {
        let cfg = small_advcl(json!({"faithful": {"q47": q47}}));
        let mut t = Pretrainer::advcl(cfg, &d.train, &ks, labels.clone(), &Device::Cpu)?;
        let idx = t.batch_indices(0, 0);
        let images = t.batch_images(0, 0);
        let s = t.train_batch_indexed(&idx, &images, 0)?;
        assert!(s.loss.is_finite());
        assert_eq!(
            counter(&t, "encoder.bn1.pgd.num_batches_tracked"),
            pgd,
            "q47 {q47}"
        );
        assert_eq!(counter(&t, "encoder.bn1.pgd_ce.num_batches_tracked"), pgd);
        assert_eq!(counter(&t, "encoder.bn1.num_batches_tracked"), normal);
    }
    // faithful [Q47] replays the clean views' effect on the running statistics instead of
    // re-running their forwards: the same attack and update, statistics equal to rounding
    let one = |reforward: bool| -> std::result::Result<Pretrainer<'_>, trainer::Error> {
        let cfg = small_advcl(json!({"pgd_steps": 3}));
        let mut t = Pretrainer::advcl(cfg, &d.train, &ks, labels.clone(), &Device::Cpu)?;
        t.set_advcl_reforward(reforward);
        let idx = t.batch_indices(0, 0);
        let images = t.batch_images(0, 0);
        t.train_batch_indexed(&idx, &images, 0)?;
        Ok(t)
    };
    let (fast, slow) = (one(false)?, one(true)?);
    let (vf, vs) = (named_vars(fast.varmap()), named_vars(slow.varmap()));
    assert_eq!(vf.len(), vs.len());
    for ((name, a), (_, b)) in vf.iter().zip(&vs) {
        let (a, b) = (a.as_tensor(), b.as_tensor());
        if !crate::nn::init::is_buffer(name) {
            assert_eq!(values_of(a), values_of(b), "{name}");
        } else if name.ends_with("num_batches_tracked") {
            assert_eq!(a.to_scalar::<i64>()?, b.to_scalar::<i64>()?, "{name}");
        } else {
            let scale = max_abs(b).max(1.0);
            assert!(max_abs(&(a - b)?) < 1e-5 * scale, "{name}");
        }
    }
    assert_eq!(counter(&fast, "encoder.bn1.num_batches_tracked"), 12);

    // a whole run: q50 adds two epochs; 40 images at batch 16 keep a last batch of 8
    let cfg = small_advcl(json!({}));
    let run = |epochs: usize| -> std::result::Result<Pretrainer<'_>, trainer::Error> {
        let mut t = Pretrainer::advcl(cfg.clone(), &d.train, &ks, labels.clone(), &Device::Cpu)?;
        for _ in 0..epochs {
            t.train_epoch(&TrainHooks::default())?;
        }
        Ok(t)
    };
    let full = {
        let mut t = run(0)?;
        while !t.finished() {
            t.train_epoch(&TrainHooks::default())?;
        }
        t
    };
    assert_eq!(
        (full.curve().len(), full.iters_per_epoch(), full.steps()),
        (4, 3, 12)
    );
    let e = &full.curve()[3];
    assert!((e.loss - (e.terms["contrast"] + 0.2 * e.terms["pseudo_ce"])).abs() < 1e-5);
    // AdvCL's learning rate: no warm-up at batch 16 (the reference warms up above 256), the
    // per-epoch cosine at e = epoch + 1 (beyond E = 2 in the two extra epochs); the curve's
    // `lr` is the rate of the epoch's last update, here the epoch's own
    let eta_min = 0.5 * 1e-3;
    let cos =
        |e: f64| eta_min + (0.5 - eta_min) * 0.5 * (1.0 + (std::f64::consts::PI * e / 2.0).cos());
    for (k, e) in full.curve().iter().enumerate() {
        assert!((e.lr - cos(k as f64 + 1.0)).abs() < 1e-12, "{k}: {}", e.lr);
    }
    // resumed after epoch 2 of 4: the same bits
    let path = tmp.path().join("advcl.state");
    run(2)?.save_state(&path)?;
    let mut r = run(0)?;
    r.load_state(&path)?;
    while !r.finished() {
        r.train_epoch(&TrainHooks::default())?;
    }
    assert_eq!(values(r.varmap()), values(full.varmap()));
    // the checkpoint: R-ADV's heads under our names; `finetune` reads the pgd branch
    let ck = tmp.path().join("advcl.safetensors");
    full.save_encoder(&ck)?;
    let names = crate::nn::checkpoint::tensor_names(&ck)?;
    for n in [
        "encoder.bn1.weight",
        "encoder.bn1.pgd.weight",
        "encoder.layer3.0.downsample.1.pgd_ce.running_mean",
        "projection.0.bias",
        "projection.1.running_var",
        "projection.3.weight",
        "pseudo.fc_002.weight",
        "pseudo.fc_003.bias",
    ] {
        assert!(names.iter().any(|m| m == n), "{n} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("encoder.normalize")));
    let enc = crate::kinds::finetune::EncoderWeights::from_file(&ck, &Device::Cpu)?;
    assert!(enc.has_pgd_branch() && !enc.has_input_norm());
    // labels from another dataset are refused
    let bad = Pretrainer::advcl(cfg.clone(), &d.train, &ks, advcl_labels(39).1, &Device::Cpu);
    assert!(
        bad.err()
            .is_some_and(|e| e.to_string().contains("another dataset"))
    );
    assert!(Pretrainer::new(cfg, &d.train, &Device::Cpu).is_err());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Mid-epoch states.

/// What a run must reproduce after a mid-epoch resume: every variable's bits, and the curve
/// but for its timings.
fn outcome(t: &Pretrainer<'_>) -> (Vec<(String, Vec<u8>)>, Vec<Value>) {
    let curve = t
        .curve()
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(e).expect("curve json");
            if let Value::Object(m) = &mut v {
                m.remove("seconds");
                m.remove("images_per_second");
            }
            v
        })
        .collect();
    (values(t.varmap()), curve)
}

/// Trains `make()` to the end with a state write after every batch, copying the state written
/// after `snap` batches of the run (counted over all epochs) aside; then resumes a fresh trainer
/// from that copy, and another from the state a cancellation after `snap` batches writes (with
/// an interval too long to write any other mid-epoch state). Both must end bit-identical to the
/// uninterrupted run; returns the `(epochs, batches)` the copy resumed at.
fn mid_epoch_resume<'d>(
    make: &dyn Fn() -> std::result::Result<Pretrainer<'d>, trainer::Error>,
    snap: usize,
    dir: &std::path::Path,
) -> std::result::Result<(usize, usize), trainer::Error> {
    use crate::data::testutil::{cancel_at_poll, copy_at_poll};
    let every_batch = dir.join("every-batch.state");
    let copy = dir.join("copy.state");
    let _ = std::fs::remove_file(&every_batch);
    let mut full = make()?;
    full.checkpoint_to(every_batch.clone(), std::time::Duration::ZERO);
    let copy_at_snap = copy_at_poll(snap, every_batch.clone(), copy.clone());
    let hooks = TrainHooks {
        cancelled: &copy_at_snap,
        ..TrainHooks::default()
    };
    while !full.finished() {
        full.train_epoch(&hooks)?;
    }
    let want = outcome(&full);
    // an uninterrupted run without states is the same run
    let mut plain = make()?;
    while !plain.finished() {
        plain.train_epoch(&TrainHooks::default())?;
    }
    assert!(outcome(&plain) == want, "writing states changed the run");

    let finish = |path: &std::path::Path| -> std::result::Result<(usize, usize), trainer::Error> {
        let mut r = make()?;
        r.load_state(path)?;
        let at = (r.epochs_done(), r.batches_done());
        while !r.finished() {
            r.train_epoch(&TrainHooks::default())?;
        }
        assert!(
            outcome(&r) == want,
            "resumed from {} at {at:?}: another run",
            path.display()
        );
        Ok(at)
    };
    let at = finish(&copy)?;

    let on_cancel = dir.join("on-cancel.state");
    let _ = std::fs::remove_file(&on_cancel);
    let mut c = make()?;
    c.checkpoint_to(on_cancel.clone(), std::time::Duration::from_secs(3600));
    let cancel_at_snap = cancel_at_poll(snap);
    let hooks = TrainHooks {
        cancelled: &cancel_at_snap,
        ..TrainHooks::default()
    };
    let mut err = None;
    while !c.finished() {
        if let Err(e) = c.train_epoch(&hooks) {
            err = Some(e.to_string());
            break;
        }
    }
    assert!(
        err.as_deref().is_some_and(|e| e.contains("cancelled")),
        "{err:?}"
    );
    assert_eq!(finish(&on_cancel)?, at, "the cancellation's state");
    Ok(at)
}

#[test]
fn a_run_resumes_mid_epoch_bit_identically() -> TestResult {
    // 64 images, batch 16: 4 batches per epoch; 6 = after batch 2 of epoch 2
    let d = data(64);
    let tmp = crate::data::testutil::TempDir::new("pretrain-mid-epoch");
    for (method, attack) in [("emp_ssl", "free"), ("simclr", "pgd"), ("emp_ssl", "none")] {
        let cfg = small(method, attack);
        let make = || Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu);
        let at = mid_epoch_resume(&make, 6, tmp.path())?;
        assert_eq!(at, (1, 2), "{method}/{attack}");
    }
    // DynACL (the view strength changes per epoch), after batch 1 of epoch 1
    let d40 = data(40);
    let cfg = small_acl("air", json!({"dyn_aug": true}));
    let make = || Pretrainer::new(cfg.clone(), &d40.train, &Device::Cpu);
    assert_eq!(mid_epoch_resume(&make, 1, tmp.path())?, (0, 1));
    // AdvCL (pseudo-labels by image index, a per-epoch schedule, the last partial batch
    // kept: 3 batches per epoch)
    let (ks, labels) = advcl_labels(40);
    let cfg = small_advcl(json!({}));
    let make = || Pretrainer::advcl(cfg.clone(), &d40.train, &ks, labels.clone(), &Device::Cpu);
    assert_eq!(mid_epoch_resume(&make, 4, tmp.path())?, (1, 1));
    Ok(())
}

#[test]
fn an_rcs_epoch_resumed_mid_way_keeps_its_coreset() -> TestResult {
    // as in the RCS test: epoch 1 trains 13 batches on the whole set, epoch 2 selects 48
    // images (3 batches); the state after batch 1 of epoch 2 must not select again. The
    // cancellation flag is polled before each of those 13 batches, before each of the
    // selection's 13 candidate chunks of the 198-image pool, then before each batch of epoch
    // 2: poll 27 comes after its first batch.
    let d = data(200);
    let cfg = small_rcs(2);
    let tmp = crate::data::testutil::TempDir::new("pretrain-rcs-mid-epoch");
    let make = || Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu);
    assert_eq!(mid_epoch_resume(&make, 27, tmp.path())?, (1, 1));
    Ok(())
}

#[test]
fn a_cancelled_epoch_writes_its_progress() -> TestResult {
    let d = data(64);
    let tmp = crate::data::testutil::TempDir::new("pretrain-cancelled-epoch");
    let cfg = small("emp_ssl", "free");
    let path = tmp.path().join("state");
    let mut t = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
    t.checkpoint_to(path.clone(), std::time::Duration::ZERO);
    let cancel = crate::data::testutil::cancel_at_poll(2);
    let hooks = TrainHooks {
        cancelled: &cancel,
        ..TrainHooks::default()
    };
    assert!(t.train_epoch(&hooks).is_err());
    let saved = candle::safetensors::load(&path, &Device::Cpu)?;
    let progress: Value = {
        let t = &saved["meta/epoch_progress_json"];
        serde_json::from_slice(&t.to_vec1::<u8>()?)?
    };
    assert_eq!(
        (progress["batches"].clone(), progress["images"].clone()),
        (json!(2), json!(32))
    );
    // and a trainer resumes from it (states past their epoch: the bad-state list above)
    let mut r = Pretrainer::new(cfg, &d.train, &Device::Cpu)?;
    r.load_state(&path)?;
    assert_eq!((r.epochs_done(), r.batches_done(), r.steps()), (0, 2, 4));
    Ok(())
}
