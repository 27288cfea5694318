use serde_json::json;

use super::*;
use crate::data::testutil::TempDir;
use crate::kinds::evaluate::testutil::{data, errors, normalize, trained_classifier};
use crate::nn::checkpoint::Resumable;
// (that training learns the contrastive task is checked on CIFAR-10: tests/defense_cifar.rs)

#[allow(unused_imports)]
use candle::DType;

type TestResult = std::result::Result<(), BoxError>;

fn params(epochs: usize) -> SslHeadParams {
    SslHeadParams {
        epochs,
        batch_size: 32,
        views: 2,
        lr: 1e-3,
        hidden_dim: 32,
        out_dim: 8,
        seed: 3,
        device: DeviceSpec::Cpu,
        augment: AugmentMode::Batch,
        checkpoint_minutes: None,
    }
}

fn quiet() -> (impl Fn(u64, u64, &str), impl Fn() -> bool) {
    (|_: u64, _: u64, _: &str| {}, || false)
}

/// Stopped after epoch 2 and resumed from the state file, the run ends bit-identical to an
/// uninterrupted one; a state of other params is refused and leaves the trainer fresh.
#[test]
fn a_resumed_run_is_bit_identical() -> TestResult {
    let d = data();
    let clf = trained_classifier()?;
    let p = params(3);
    let (progress, cancelled) = quiet();
    let mut whole = HeadTrainer::new(&p, &clf, &d.train, &Device::Cpu)?;
    while !whole.finished() {
        whole.train_epoch(&progress, &cancelled)?;
    }
    let tmp = TempDir::new("ssl-head-resume");
    let path = tmp.path().join(STATE_FILE);
    let mut first = HeadTrainer::new(&p, &clf, &d.train, &Device::Cpu)?;
    for _ in 0..2 {
        first.train_epoch(&progress, &cancelled)?;
    }
    first.save_state(&path)?;
    let mut resumed = HeadTrainer::new(&p, &clf, &d.train, &Device::Cpu)?;
    resumed.load_state(&path)?;
    assert_eq!(resumed.epochs_done(), 2);
    resumed.train_epoch(&progress, &cancelled)?;
    assert!(resumed.finished());
    let values = |t: &HeadTrainer<'_>| -> candle::Result<Vec<(String, Vec<f64>)>> {
        named_vars(t.varmap())
            .into_iter()
            .map(|(n, v)| {
                Ok((
                    n,
                    v.as_tensor()
                        .flatten_all()?
                        .to_dtype(DType::F64)?
                        .to_vec1::<f64>()?,
                ))
            })
            .collect()
    };
    assert_eq!(values(&whole)?, values(&resumed)?);
    let strip = |t: &HeadTrainer<'_>| -> Vec<f64> { t.curve().iter().map(|c| c.loss).collect() };
    assert_eq!(strip(&whole), strip(&resumed));

    let other = SslHeadParams { lr: 5e-4, ..p };
    let mut fresh = HeadTrainer::new(&other, &clf, &d.train, &Device::Cpu)?;
    let err = fresh.load_state(&path).expect_err("other params");
    assert!(err.to_string().contains("other params"), "{err}");
    assert_eq!(fresh.epochs_done(), 0);
    Ok(())
}

/// Interrupted within epoch 2 (256 images, 8 batches of 32 per epoch): resumed from the state
/// written after batch 3 during the run and from the one a cancellation before batch 4
/// writes, the run ends bit-identical to an uninterrupted one; a state written with another
/// `checkpoint_minutes` resumes too (it changes no result).
#[test]
fn a_run_resumes_mid_epoch_bit_identically() -> TestResult {
    use crate::data::testutil::{cancel_at_poll, copy_at_poll};
    let d = data();
    let clf = trained_classifier()?;
    let p = params(2);
    let tmp = TempDir::new("ssl-head-mid-epoch");
    let (every, copy, on_cancel) = (
        tmp.path().join("every.state"),
        tmp.path().join("copy.state"),
        tmp.path().join("cancel.state"),
    );
    let bits = |t: &HeadTrainer<'_>| -> candle::Result<Vec<(String, Vec<u64>)>> {
        named_vars(t.varmap())
            .into_iter()
            .map(|(n, v)| {
                let f = v
                    .as_tensor()
                    .flatten_all()?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?;
                Ok((n, f.iter().map(|x| x.to_bits()).collect()))
            })
            .collect()
    };
    let losses =
        |t: &HeadTrainer<'_>| -> Vec<u64> { t.curve().iter().map(|c| c.loss.to_bits()).collect() };
    let progress = |_: u64, _: u64, _: &str| {};
    let often = SslHeadParams {
        checkpoint_minutes: Some(0.0),
        ..p.clone()
    };
    let mut whole = HeadTrainer::new(&often, &clf, &d.train, &Device::Cpu)?;
    whole.checkpoint_to(every.clone(), std::time::Duration::ZERO);
    // polled before each batch: poll 11 is before batch 4 of epoch 2
    let snap = copy_at_poll(11, every, copy.clone());
    while !whole.finished() {
        whole.train_epoch(&progress, &snap)?;
    }
    let mut k = HeadTrainer::new(&p, &clf, &d.train, &Device::Cpu)?;
    k.checkpoint_to(on_cancel.clone(), std::time::Duration::from_secs(3600));
    let cancel = cancel_at_poll(11);
    let err = loop {
        if let Err(e) = k.train_epoch(&progress, &cancel) {
            break e.to_string();
        }
    };
    assert!(err.contains("cancelled"), "{err}");
    for state in [&copy, &on_cancel] {
        let mut r = HeadTrainer::new(&p, &clf, &d.train, &Device::Cpu)?;
        r.load_state(state)?;
        assert_eq!(
            r.resume_point(),
            crate::nn::checkpoint::ResumePoint {
                epochs_done: 1,
                epochs: 2,
                batches_done: 3
            }
        );
        while !r.finished() {
            r.train_epoch(&progress, &|| false)?;
        }
        assert!(bits(&r)? == bits(&whole)?, "{}", state.display());
        assert_eq!(losses(&r), losses(&whole), "{}", state.display());
    }
    // not keyed
    let key = |v: serde_json::Value| -> std::result::Result<Value, String> {
        let mut reg = pipe_engine::Registry::new();
        crate::register_all(&mut reg);
        let kind = reg.get("ssl_head").ok_or("registered")?;
        Ok(kind.key_params(&normalize("ssl_head", v).map_err(|e| format!("{e:?}"))?))
    };
    assert_eq!(key(json!({"checkpoint_minutes": 2}))?, key(json!({}))?);
    Ok(())
}

#[test]
fn params_have_r_mao_defaults_and_are_checked() {
    let p = normalize("ssl_head", json!({})).expect("defaults");
    assert_eq!(p["epochs"], 201);
    assert_eq!(p["batch_size"], 1024);
    assert_eq!(p["views"], 2);
    assert_eq!(p["lr"], 1e-4);
    assert_eq!(
        (p["hidden_dim"].clone(), p["out_dim"].clone()),
        (json!(128), json!(8))
    );
    assert!(
        p.get("augment").is_none(),
        "the batch-synchronous default is not written: {p}"
    );
    let q = normalize("ssl_head", json!({"augment": "per_image"})).expect("per image");
    assert_eq!(q["augment"], json!("per_image"));
    let e = errors(
        "ssl_head",
        json!({"views": 1, "epochs": 0, "lr": -1.0, "nope": 1}),
    );
    assert!(e.iter().any(|m| m.contains("nope")), "{e:?}");
    let e = errors("ssl_head", json!({"views": 1, "epochs": 0, "lr": -1.0}));
    for field in ["views", "epochs", "lr"] {
        assert!(e.iter().any(|m| m.starts_with(field)), "{field}: {e:?}");
    }
}
