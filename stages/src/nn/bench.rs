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
//! And, to show where a step's time goes, one layer of the first residual stage at the same
//! batch (`(batch, width, 32, 32)`, the largest activations): a 3x3 convolution forward, its
//! forward + backward (input and weight gradients), and batch norm + ReLU in training mode,
//! forward + backward.
//!
//! The convolutions are [`crate::nn::conv`]'s fast CPU op; `PIPE_KERNELS=candle` times candle's
//! own ops instead. On CUDA the same calls run candle's kernels (and `conv2d_composed`'s
//! backward), and each timed repetition ends with a device synchronisation.
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
    /// One 3x3 `width -> width` convolution of `(batch, width, 32, 32)`, forward, ms.
    pub conv3x3_forward_ms: f64,
    /// The same convolution forward + backward (input and weight gradients), ms.
    pub conv3x3_train_ms: f64,
    /// Batch norm + ReLU (training mode) of the same activations, forward + backward (input,
    /// gamma and beta gradients), ms.
    pub bn_relu_train_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median milliseconds of `f` over `reps` runs after a warm-up, each ended by a
/// synchronisation of `dev` (CUDA queues work; the CPU returns at once).
fn time(
    dev: &Device,
    reps: usize,
    mut f: impl FnMut() -> candle::Result<()>,
) -> candle::Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(ms))
}

/// Times forward, train step and PGD step of ResNet-18 at `width` on `batch` random images, and
/// one layer's convolution and batch norm, on `dev`.
///
/// # Errors
/// Any candle error.
pub fn bench_resnet(
    width: usize,
    batch: usize,
    reps: usize,
    dev: &Device,
) -> candle::Result<ModelTimings> {
    let dev = dev.clone();
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

    let forward_ms = time(&dev, reps, || {
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
    let train_step_ms = time(&dev, reps, || {
        let logits = head.forward(&net.forward_t(&x, true)?)?;
        let loss = cross_entropy(&logits, &y)?;
        opt.step(&loss.backward()?)
    })?;

    let pgd_cfg = PgdConfig {
        random_start: false,
        ..PgdConfig::new(Norm::Linf, 8.0 / 255.0, 2.0 / 255.0, 1)
    };
    let pgd_step_ms = time(&dev, reps, || {
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
    let (conv3x3_forward_ms, conv3x3_train_ms, bn_relu_train_ms) =
        bench_layer(width, batch, reps, &dev, &mut rng)?;
    Ok(ModelTimings {
        width,
        batch,
        forward_ms,
        train_step_ms,
        pgd_step_ms,
        conv3x3_forward_ms,
        conv3x3_train_ms,
        bn_relu_train_ms,
    })
}

/// [`bench_resnet`] on the CPU.
///
/// # Errors
/// Any candle error.
pub fn bench_resnet_cpu(width: usize, batch: usize, reps: usize) -> candle::Result<ModelTimings> {
    bench_resnet(width, batch, reps, &Device::Cpu)
}

/// [`ModelTimings`]'s one-layer numbers: conv forward, conv forward + backward, BN + ReLU
/// forward + backward, on `(batch, width, 32, 32)`.
fn bench_layer(
    width: usize,
    batch: usize,
    reps: usize,
    dev: &Device,
    rng: &mut Rng,
) -> candle::Result<(f64, f64, f64)> {
    use crate::nn::batch_norm::batch_norm;
    use crate::nn::conv::{Conv2d, Conv2dConfig, KernelImpl};
    let mut draw =
        |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| (rng.f32() - 0.5) * scale).collect() };
    let x = candle::Var::from_vec(
        draw(batch * width * 32 * 32, 2.0),
        (batch, width, 32, 32),
        dev,
    )?;
    let w = candle::Var::from_vec(draw(width * width * 9, 0.1), (width, width, 3, 3), dev)?;
    let conv = Conv2d::new(
        w.as_tensor().clone(),
        Conv2dConfig {
            stride: 1,
            padding: 1,
        },
    )
    .with_impl(KernelImpl::from_env());
    let fwd = time(dev, reps, || conv.forward(x.as_tensor()).map(|_| ()))?;
    let train = time(dev, reps, || {
        conv.forward(x.as_tensor())?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    let gamma = candle::Var::ones(width, DType::F32, dev)?;
    let beta = candle::Var::zeros(width, DType::F32, dev)?;
    let bn = candle_nn::BatchNorm::new_with_momentum(
        width,
        Tensor::zeros(width, DType::F32, dev)?,
        Tensor::ones(width, DType::F32, dev)?,
        gamma.as_tensor().clone(),
        beta.as_tensor().clone(),
        1e-5,
        0.1,
    )?;
    let bn_train = time(dev, reps, || {
        batch_norm(x.as_tensor(), &bn, true, true, KernelImpl::from_env())?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    Ok((fwd, train, bn_train))
}
