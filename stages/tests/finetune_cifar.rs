//! On real CIFAR-10, SLF (the `finetune` kind's standard linear fine-tuning, the `cf_adam`
//! preset on the `pre_feature` output) on an EMP-SSL-pretrained encoder beats SLF on the same
//! encoder at its random initialisation.
//!
//! Settings of `pretrain_cifar.rs`: a balanced 2,000-image training subset (200 per class),
//! EMP-SSL at ResNet-18 width 8 (4 crop views per image, batch 50, LARS lr 0.3 cosine,
//! `z_dim` 128, `hidden_dim` 256), here for 2 epochs (instead of 3, to stay near a minute) with
//! 2 seeds. Each seed's trained encoder and the freshly initialised encoder of the same seed go
//! through [`finetune`] (SLF, `cf_adam`: Adam 3e-4, batch 256, `drop_last`, 20 epochs, on
//! features cached once) and are scored on 1,000 test images (100 per class) with
//! [`accuracy`].
//!
//! Measured on a 2-core machine (release): random init 13.8 / 12.9 % test accuracy, after
//! EMP-SSL 30.9 / 28.7 % (seeds 0 / 1), +16.4 points; about 60 s with the JPEG decoding on an
//! idle machine (90 s while another build ran). Each SLF takes 1-3 s, the feature pass
//! included: the encoder runs once over the 2,000 images, not once per batch and epoch.
//!
//! Needs `../shared/data/cifar10-jpeg.tar.gz` beside the repository; fails when it is missing.

use std::path::Path;
use std::time::Instant;

use candle::Device;
use pipe_stages::data::{Hooks, ReadOptions, read_image_folder};
use pipe_stages::kinds::finetune::{EncoderWeights, FinetuneParams, accuracy, finetune};
use pipe_stages::kinds::pretrain::{PretrainParams, Pretrainer, TrainHooks};
use serde_json::json;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Seeds (pretraining, init and SLF; the data subset is the same for all).
const SEEDS: u64 = 2;
/// Training / test images per class.
const TRAIN_PER_CLASS: usize = 200;
const TEST_PER_CLASS: usize = 100;
/// EMP-SSL epochs.
const PRETRAIN_EPOCHS: usize = 2;
/// Required gain of the seed-mean SLF test accuracy over random init (measured +16.4 points;
/// one epoch of pretraining already gave +15 and +18).
const MIN_GAIN: f64 = 0.08;
/// Required seed-mean SLF test accuracy after EMP-SSL (chance is 10 %).
const MIN_TRAINED: f64 = 0.22;

#[test]
fn slf_on_emp_ssl_beats_slf_on_random_init() -> Result<()> {
    let t0 = Instant::now();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/cifar10-jpeg.tar.gz");
    assert!(
        path.is_file(),
        "the CIFAR-10 ImageFolder archive is missing: expected {} (shared/data/cifar10-jpeg.tar.gz \
         in the folder beside the repository)",
        path.display()
    );
    let read = read_image_folder(
        &path,
        &ReadOptions {
            image_size: 32,
            resize: false,
        },
        &Hooks::none(),
    )?;
    let data = read
        .dataset
        .balanced_subset(Some(TRAIN_PER_CLASS), Some(TEST_PER_CLASS), 0)?;
    let k = data.classes.len();
    assert_eq!(
        k, 10,
        "expected the 10 CIFAR-10 classes, got {:?}",
        data.classes
    );
    println!(
        "decoded and subset in {:.1} s: {} train, {} test images",
        t0.elapsed().as_secs_f64(),
        data.train.n,
        data.test.n
    );

    let mut random_acc = Vec::new();
    let mut trained_acc = Vec::new();
    for seed in 0..SEEDS {
        let cfg = serde_json::from_value::<PretrainParams>(json!({
            "method": "emp_ssl", "attack": "none", "views": "crop",
            "width": 8, "hidden_dim": 256, "z_dim": 128,
            "n_views": 4, "batch_size": 50, "epochs": PRETRAIN_EPOCHS, "seed": seed,
        }))?
        .config();
        let fresh = Pretrainer::new(cfg.clone(), &data.train, &Device::Cpu)?;
        let started = Instant::now();
        let mut trainer = Pretrainer::new(cfg, &data.train, &Device::Cpu)?;
        while !trainer.finished() {
            trainer.train_epoch(&TrainHooks::default())?;
        }
        println!(
            "seed {seed}: EMP-SSL {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let slf = |name: &str, encoder: &EncoderWeights| -> Result<f64> {
            let started = Instant::now();
            let ft =
                serde_json::from_value::<FinetuneParams>(json!({"mode": "slf", "seed": seed}))?
                    .config();
            let out = finetune(
                ft,
                encoder,
                &data.train,
                k,
                &Device::Cpu,
                &TrainHooks::default(),
            )?;
            let acc = accuracy(&out.classifier, &data.test, 0, &Device::Cpu)?;
            println!(
                "seed {seed}: SLF on {name}: train {:.1} % test {:.1} % ({:.1} s, features {:.1} s)",
                100.0 * out.metrics["train_acc"].as_f64().unwrap_or(f64::NAN),
                100.0 * acc,
                started.elapsed().as_secs_f64(),
                out.metrics["feature_seconds"].as_f64().unwrap_or(f64::NAN)
            );
            Ok(acc)
        };
        random_acc.push(slf(
            "random init",
            &EncoderWeights::from_varmap(fresh.varmap())?,
        )?);
        trained_acc.push(slf(
            "EMP-SSL",
            &EncoderWeights::from_varmap(trainer.varmap())?,
        )?);
    }

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (random, trained) = (mean(&random_acc), mean(&trained_acc));
    println!(
        "mean SLF test accuracy over {SEEDS} seeds: random init {:.1} %, EMP-SSL {:.1} % ({:+.1} points); \
         {:.1} s in all",
        100.0 * random,
        100.0 * trained,
        100.0 * (trained - random),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        trained > random + MIN_GAIN,
        "SLF on EMP-SSL is not clearly better than on random init: mean test accuracy {:.1} % vs \
         {:.1} % (need +{:.1} points; per seed trained {trained_acc:?}, random {random_acc:?})",
        100.0 * trained,
        100.0 * random,
        100.0 * MIN_GAIN
    );
    assert!(
        trained > MIN_TRAINED,
        "SLF on EMP-SSL reaches only {:.1} % mean test accuracy (need {:.0} %; chance is 10 %)",
        100.0 * trained,
        100.0 * MIN_TRAINED
    );
    for (seed, (t, r)) in trained_acc.iter().zip(&random_acc).enumerate() {
        assert!(
            t > r,
            "seed {seed}: SLF on EMP-SSL {t} is not above random init's {r}"
        );
    }
    Ok(())
}
