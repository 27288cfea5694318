//! Timings of the model hot paths on this machine (`pipe bench nn`, `cargo bench --bench nn`).
//!
//! At a given width and batch, on the CPU, with a seeded ResNet-18 (CIFAR stem) + linear
//! classifier and cross-entropy on random 32x32 inputs:
//! - **forward**: eval-mode forward of the backbone + classifier;
//! - **train step**: train-mode forward, backward, one SGD (momentum 0.9, Nesterov, wd 5e-4) step;
//! - **PGD step**: one l_inf PGD step (eval-mode forward, backward to the input, sign step,
//!   projections) through [`crate::nn::attacks::pgd`] with `steps = 1`, no random start, on
//!   the frozen backbone ([`crate::nn::resnet::ResNet::frozen`]: no parameter gradients), as
//!   the stages run attacks.
//!
//! The convolutions are [`crate::nn::conv`]'s fast CPU op; `PIPE_CONV=candle` times candle's
//! own conv instead.
//!
//! Each number is the median of `reps` timed repetitions after one warm-up.

use std::time::Instant;

use candle::{DType, Device, Module, ModuleT, Tensor};
use serde::Serialize;

use crate::nn::attacks::{Norm, PgdConfig, pgd};
use crate::nn::heads::{ClassifierConfig, linear_classifier};
use crate::nn::init::{InitRules, build_seeded, trainable};
use crate::nn::losses::{cross_entropy, cross_entropy_per_example};
use crate::nn::optim::{Sgd, SgdConfig};
use crate::nn::resnet::{ResNetConfig, resnet18};
use crate::rng::Rng;

/// Median milliseconds of each hot path.
#[derive(Clone, Debug, Serialize)]
pub struct ModelTimings {
    /// ResNet width (64 = the paper's).
    pub width: usize,
    /// Images per batch.
    pub batch: usize,
    /// Eval forward, ms.
    pub forward_ms: f64,
    /// Forward + backward + SGD step, ms.
    pub train_step_ms: f64,
    /// One PGD step (gradient wrt the input), ms.
    pub pgd_step_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn time(reps: usize, mut f: impl FnMut() -> candle::Result<()>) -> candle::Result<f64> {
    f()?;
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        f()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(ms))
}

/// Times forward, train step and PGD step of ResNet-18 at `width` on `batch` CPU images.
///
/// # Errors
/// Any candle error.
pub fn bench_resnet(width: usize, batch: usize, reps: usize) -> candle::Result<ModelTimings> {
    let dev = Device::Cpu;
    let cfg = ResNetConfig {
        width,
        ..ResNetConfig::default()
    };
    let classes = ClassifierConfig {
        in_dim: cfg.feature_dim(),
        num_classes: 10,
    };
    let (varmap, (net, head)) = build_seeded(0, &InitRules::default(), DType::F32, &dev, |vb| {
        Ok((
            resnet18(&cfg, vb.pp("encoder"))?,
            linear_classifier(&classes, vb.pp("classifier"))?,
        ))
    })?;
    let mut rng = Rng::new(1);
    let x: Vec<f32> = (0..batch * 3 * 32 * 32).map(|_| rng.f32()).collect();
    let x = Tensor::from_vec(x, (batch, 3, 32, 32), &dev)?;
    let y: Vec<u32> = (0..batch).map(|_| rng.below(10) as u32).collect();
    let y = Tensor::from_vec(y, batch, &dev)?;

    let forward_ms = time(reps, || {
        let logits = head.forward(&net.forward_t(&x, false)?)?;
        logits.sum_all()?.to_scalar::<f32>().map(|_| ())
    })?;

    let mut opt = Sgd::new_named(
        &trainable(&varmap),
        SgdConfig {
            lr: 0.01,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 5e-4,
        },
    )?;
    let train_step_ms = time(reps, || {
        let logits = head.forward(&net.forward_t(&x, true)?)?;
        let loss = cross_entropy(&logits, &y)?;
        opt.step(&loss.backward()?)
    })?;

    let pgd_cfg = PgdConfig {
        random_start: false,
        ..PgdConfig::new(Norm::Linf, 8.0 / 255.0, 2.0 / 255.0, 1)
    };
    let pgd_step_ms = time(reps, || {
        // Built inside the timed step, as a stage would per attack batch (it copies no data).
        let frozen = net.frozen()?;
        let r = pgd(
            &x,
            |xa| cross_entropy_per_example(&head.forward(&frozen.forward_t(xa, false)?)?, &y),
            &pgd_cfg,
            &mut rng,
        )?;
        r.adv.sum_all()?.to_scalar::<f32>().map(|_| ())
    })?;
    Ok(ModelTimings {
        width,
        batch,
        forward_ms,
        train_step_ms,
        pgd_step_ms,
    })
}
