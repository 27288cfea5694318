//! CPU against CUDA: the building blocks give the same numbers on both devices (f32, within
//! rounding). Compiled only in a `cuda` build; each test returns early, saying so on stderr,
//! where no CUDA device is usable. Run on a GPU machine with
//! `scripts/cuda-cargo test --release --features cuda -p pipe-stages cuda_vs_cpu -- --nocapture`.
//!
//! The CPU side runs this crate's own CPU kernels (the im2col conv, the fused batch norm, the
//! fused SGD / LARS step); the CUDA side runs candle's, this crate's CUDA kernels (the fused
//! batch norm and residual ReLU of `stages/cuda/batch_norm.cu`) and the host round trip of the
//! Cholesky log-det, so each test also checks that a custom op handles CUDA storage.

use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use candle::backprop::GradStore;
use candle::{DType, Device, Module, ModuleT, Result, Tensor, Var};
use candle_nn::{BatchNorm, VarBuilder, VarMap};

use crate::device::cuda_usable;
use crate::nn::batch_norm::{add_relu, batch_norm};
use crate::nn::conv::{Conv2d, Conv2dConfig, KernelImpl};
use crate::nn::init::{InitRules, init_seeded, trainable};
use crate::nn::linalg::logdet_spd;
use crate::nn::losses::{EmpLossConfig, emp_loss};
use crate::nn::optim::{Lars, LarsConfig};
use crate::nn::resnet::{ResNetConfig, resnet18};

/// cuBLAS's `f32` math is process-wide: the TF32 test holds this for writing while it switches
/// to TF32, every other test holds it for reading (so it computes in `f32` even when the tests
/// run in parallel).
static GEMM_MATH: RwLock<()> = RwLock::new(());

/// `cuda:0` (with the read side of [`GEMM_MATH`]), or `None` (with a note on stderr) where no
/// CUDA device is usable.
fn gpu() -> Option<(Device, RwLockReadGuard<'static, ()>)> {
    let math = GEMM_MATH.read().unwrap_or_else(PoisonError::into_inner);
    if !cuda_usable() {
        eprintln!("no usable CUDA device: CPU-vs-CUDA test skipped");
        return None;
    }
    match Device::new_cuda(0) {
        Ok(d) => Some((d, math)),
        Err(e) => {
            eprintln!("cuda:0 does not open ({e}): CPU-vs-CUDA test skipped");
            None
        }
    }
}

/// Deterministic f32 values `offset + scale · sin(0.37 i + phase)` on the CPU.
fn wave(dims: &[usize], phase: f64, scale: f64, offset: f64) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (offset + scale * (0.37 * i as f64 + phase).sin()) as f32)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// `max |a - b| / max(max |b|, 1)`, on the host in f64 (infinite when either holds a NaN or inf).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let host = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()
    };
    let (a, b) = (host(a)?, host(b)?);
    if a.len() != b.len() {
        candle::bail!("{} values against {}", a.len(), b.len())
    }
    if a.iter().chain(&b).any(|v| !v.is_finite()) {
        return Ok(f64::INFINITY);
    }
    let scale = b.iter().fold(1f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    Ok(diff / scale)
}

#[track_caller]
fn close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    let e = rel_err(a, b)?;
    assert!(
        e <= tol,
        "{what}: CUDA vs CPU relative error {e:e} > {tol:e}"
    );
    Ok(())
}

fn grad(g: &GradStore, t: &Tensor, what: &str) -> Result<Tensor> {
    g.get(t)
        .cloned()
        .ok_or_else(|| candle::Error::Msg(format!("no gradient for {what}")))
}

#[test]
fn cuda_vs_cpu_conv2d_forward_and_both_gradients() -> Result<()> {
    let Some((dev, _fp32)) = gpu() else {
        return Ok(());
    };
    // on CUDA the convolution's backward is `conv2d_composed`'s (no `conv_transpose2d`); a
    // non-square input with stride 2 needs a different output padding per axis
    let cases = [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0)]
        .into_iter()
        .flat_map(|c| [(c, 16), (c, 12)]);
    for ((k, stride, padding), width) in cases {
        let x0 = wave(&[4, 8, 16, width], 0.1, 1.0, 0.0)?;
        let w0 = (wave(&[16, 8, k, k], 1.3, 1.0, 0.0)? * 0.3)?;
        let out = |n: usize| (n + 2 * padding - k) / stride + 1;
        let r0 = wave(&[4, 16, out(16), out(width)], 2.9, 1.0, 0.0)?;
        let mut outs = Vec::new();
        for d in [&Device::Cpu, &dev] {
            let x = Var::from_tensor(&x0.to_device(d)?)?;
            let w = Var::from_tensor(&w0.to_device(d)?)?;
            let conv = Conv2d::new(w.as_tensor().clone(), Conv2dConfig { stride, padding })
                .with_impl(KernelImpl::Fast);
            let y = conv.forward(x.as_tensor())?;
            let g = (&y * r0.to_device(d)?)?.sum_all()?.backward()?;
            outs.push([
                y,
                grad(&g, x.as_tensor(), "x")?,
                grad(&g, w.as_tensor(), "w")?,
            ]);
        }
        for (i, name) in ["y", "dx", "dw"].iter().enumerate() {
            close(
                &format!("conv k{k} s{stride} 16x{width} {name}"),
                &outs[1][i],
                &outs[0][i],
                1e-4,
            )?;
        }
    }
    Ok(())
}

/// The fused BN (+ ReLU) and residual ReLU: this crate's CUDA kernels (`PIPE_KERNELS` fast)
/// and candle's ops (`candle`) on the GPU against the fused CPU op. The shapes cover a small
/// map, a channel split into several parts (80 · 16 · 16 values a channel) and BatchNorm1d.
#[test]
fn cuda_vs_cpu_batch_norm_relu_and_add_relu() -> Result<()> {
    let Some((dev, _fp32)) = gpu() else {
        return Ok(());
    };
    for dims in [&[6, 5, 7, 7][..], &[80, 8, 16, 16], &[300, 40]] {
        let c = dims[1];
        for train in [true, false] {
            for relu in [false, true] {
                let mut outs = Vec::new();
                for (d, imp) in [
                    (&Device::Cpu, KernelImpl::Fast),
                    (&dev, KernelImpl::Fast),
                    (&dev, KernelImpl::Candle),
                ] {
                    let gamma = Var::from_tensor(&wave(&[c], 0.3, 0.5, 1.0)?.to_device(d)?)?;
                    let beta = Var::from_tensor(&wave(&[c], 1.1, 0.4, 0.1)?.to_device(d)?)?;
                    let bn = BatchNorm::new_with_momentum(
                        c,
                        wave(&[c], 2.0, 0.3, 0.2)?.to_device(d)?,
                        wave(&[c], 0.7, 0.2, 1.1)?.to_device(d)?,
                        gamma.as_tensor().clone(),
                        beta.as_tensor().clone(),
                        1e-5,
                        0.1,
                    )?;
                    let x = Var::from_tensor(&wave(dims, 0.1, 2.0, 0.3)?.to_device(d)?)?;
                    let skip = Var::from_tensor(&wave(dims, 0.7, 1.0, 0.0)?.to_device(d)?)?;
                    let y = batch_norm(x.as_tensor(), &bn, train, relu, imp)?;
                    let y = add_relu(&y, skip.as_tensor(), imp)?;
                    let r = wave(dims, 2.9, 1.0, 0.2)?.to_device(d)?;
                    let g = (&y * r)?.sum_all()?.backward()?;
                    outs.push([
                        y.clone(),
                        grad(&g, x.as_tensor(), "x")?,
                        grad(&g, gamma.as_tensor(), "gamma")?,
                        grad(&g, beta.as_tensor(), "beta")?,
                        grad(&g, skip.as_tensor(), "skip")?,
                        bn.running_mean().clone(),
                        bn.running_var().clone(),
                    ]);
                }
                let names = [
                    "y",
                    "dx",
                    "dgamma",
                    "dbeta",
                    "dskip",
                    "running_mean",
                    "running_var",
                ];
                for (k, kernels) in [(1, "fast"), (2, "candle")] {
                    for (i, name) in names.iter().enumerate() {
                        let what =
                            format!("bn {dims:?} train={train} relu={relu} {kernels} {name}");
                        close(&what, &outs[k][i], &outs[0][i], 1e-4)?;
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn cuda_vs_cpu_logdet_and_the_emp_loss_gradient() -> Result<()> {
    let Some((dev, _fp32)) = gpu() else {
        return Ok(());
    };
    // 4 views of 16 unit rows in 8 dimensions: the TCR term takes a Cholesky log-det on the host
    let z0 = wave(&[64, 8], 0.4, 1.0, 0.1)?;
    let mut outs = Vec::new();
    for d in [&Device::Cpu, &dev] {
        let z = Var::from_tensor(&z0.to_device(d)?)?;
        let unit = z
            .as_tensor()
            .broadcast_div(&z.as_tensor().sqr()?.sum_keepdim(1)?.sqrt()?)?;
        let loss = emp_loss(&unit, 4, &EmpLossConfig::default())?;
        let g = loss.total.backward()?;
        let a = (z.as_tensor().t()?.matmul(z.as_tensor())? / 64.0)?.broadcast_add(&Tensor::eye(
            8,
            DType::F32,
            d,
        )?)?;
        let ld = logdet_spd(&a)?;
        assert!(
            ld.device().same_device(d),
            "logdet_spd came back on another device"
        );
        outs.push([loss.total, loss.tcr, grad(&g, z.as_tensor(), "z")?, ld]);
    }
    for (i, name) in ["total", "tcr", "dz", "logdet"].iter().enumerate() {
        close(&format!("emp {name}"), &outs[1][i], &outs[0][i], 1e-4)?;
    }
    Ok(())
}

/// A width-8 ResNet-18 with the same seeded weights on both devices: a train-mode forward,
/// the gradients of every parameter, and one LARS step (the fused CPU step against candle's
/// ops on CUDA).
#[test]
fn cuda_vs_cpu_resnet_train_step_with_lars() -> Result<()> {
    let Some((dev, _fp32)) = gpu() else {
        return Ok(());
    };
    let cfg = ResNetConfig {
        width: 8,
        ..Default::default()
    };
    let build = |d: &Device| -> Result<(VarMap, crate::nn::resnet::ResNet)> {
        let varmap = VarMap::new();
        let net = resnet18(
            &cfg,
            VarBuilder::from_varmap(&varmap, DType::F32, d).pp("encoder"),
        )?;
        Ok((varmap, net))
    };
    let (cpu_map, cpu_net) = build(&Device::Cpu)?;
    init_seeded(&cpu_map, 3, &InitRules::default())?;
    let (gpu_map, gpu_net) = build(&dev)?;
    {
        let cpu_vars = cpu_map
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("poisoned".into()))?;
        let gpu_vars = gpu_map
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("poisoned".into()))?;
        for (name, v) in gpu_vars.iter() {
            let src = cpu_vars
                .get(name)
                .ok_or_else(|| candle::Error::Msg(format!("{name} missing on the CPU")))?;
            v.set(&src.as_tensor().to_device(&dev)?)?;
        }
    }
    let x0 = wave(&[8, 3, 32, 32], 0.0, 0.5, 0.5)?;
    let mut results = Vec::new();
    for (map, net, d) in [
        (&cpu_map, &cpu_net, &Device::Cpu),
        (&gpu_map, &gpu_net, &dev),
    ] {
        let params = trainable(map);
        let mut opt = Lars::new_named(&params, LarsConfig::default())?;
        let y = net.forward_t(&x0.to_device(d)?, true)?;
        let r = wave(y.dims(), 1.7, 1.0, 0.0)?.to_device(d)?;
        let g = (&y * r)?.sum_all()?.backward()?;
        let mut grads = Vec::new();
        for (name, v) in &params {
            grads.push((name.clone(), grad(&g, v.as_tensor(), name)?));
        }
        opt.step(&g)?;
        let after: Vec<(String, Tensor)> = params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        results.push((y, grads, after));
    }
    let (cpu, gpu) = (&results[0], &results[1]);
    close("resnet features", &gpu.0, &cpu.0, 1e-4)?;
    for ((name, a), (_, b)) in gpu.1.iter().zip(&cpu.1) {
        close(&format!("grad {name}"), a, b, 1e-3)?;
    }
    for ((name, a), (_, b)) in gpu.2.iter().zip(&cpu.2) {
        close(&format!("after LARS {name}"), a, b, 1e-4)?;
    }
    Ok(())
}

/// One AIR step (input normalisation, dual BN, R-AIR's head, joint PGD through the `pgd`
/// branch, NT-Xent on both branches, SIR / AIR, R-AIR's LARS) gives the same loss, terms and
/// updated weights on CUDA as on the CPU. The views and the PGD start come from our host RNG,
/// so both devices see the same inputs; a sign step may flip where a gradient is ~0, hence the
/// looser tolerance.
#[test]
fn cuda_vs_cpu_air_step() -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use crate::kinds::pretrain::{PretrainParams, Pretrainer};
    let Some((dev, _fp32)) = gpu() else {
        return Ok(());
    };
    let d = crate::data::synthetic(&crate::data::SyntheticConfig {
        n_classes: 4,
        n_train: 16,
        n_test: 4,
        image_size: 32,
        seed: 5,
    });
    let cfg = serde_json::from_value::<PretrainParams>(serde_json::json!({
        "method": "air", "width": 8, "batch_size": 16, "epochs": 1, "pgd_steps": 2,
        "warmup_epochs": 0, "lr": 0.5, "seed": 1,
    }))?
    .config();
    let mut cpu = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
    let mut cuda = Pretrainer::new(cfg, &d.train, &dev)?;
    let images = cpu.batch_images(0, 0);
    let a = cpu.train_batch(&images, 0)?;
    let b = cuda.train_batch(&images, 0)?;
    same_step("AIR", &a, &b, &cpu, &cuda)
}

/// One AdvCL step (views, high-pass matmul, the joint x_cl / x_ce attack in train mode, SupCon
/// + pseudo-label CE, SGD) on CUDA against the CPU from the same seed and labels.
#[test]
fn cuda_vs_cpu_advcl_step() -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use crate::kinds::pretrain::{PretrainParams, Pretrainer};
    let Some((dev, _fp32)) = gpu() else {
        return Ok(());
    };
    let d = crate::data::synthetic(&crate::data::SyntheticConfig {
        n_classes: 4,
        n_train: 16,
        n_test: 4,
        image_size: 32,
        seed: 5,
    });
    let cfg = serde_json::from_value::<PretrainParams>(serde_json::json!({
        "method": "advcl", "width": 8, "batch_size": 16, "epochs": 1, "pgd_steps": 2,
        "warmup_epochs": 0, "seed": 1,
    }))?
    .config();
    let ks = [2usize, 5];
    let labels: Vec<Vec<u32>> = ks
        .iter()
        .map(|&k| (0..16).map(|i| (i % k) as u32).collect())
        .collect();
    let mut cpu = Pretrainer::advcl(cfg.clone(), &d.train, &ks, labels.clone(), &Device::Cpu)?;
    let mut cuda = Pretrainer::advcl(cfg, &d.train, &ks, labels, &dev)?;
    let idx = cpu.batch_indices(0, 0);
    let images = cpu.batch_images(0, 0);
    let a = cpu.train_batch_indexed(&idx, &images, 0)?;
    let b = cuda.train_batch_indexed(&idx, &images, 0)?;
    same_step("AdvCL", &a, &b, &cpu, &cuda)
}

/// One pretraining step on the CPU (`a`, `cpu`) and on CUDA (`b`, `cuda`) gave the same loss,
/// terms and weights.
fn same_step(
    what: &str,
    a: &crate::kinds::pretrain::BatchStats,
    b: &crate::kinds::pretrain::BatchStats,
    cpu: &crate::kinds::pretrain::Pretrainer<'_>,
    cuda: &crate::kinds::pretrain::Pretrainer<'_>,
) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use crate::kinds::pretrain::Pretrainer;
    assert!(
        (a.loss - b.loss).abs() < 1e-3 * a.loss.abs().max(1.0),
        "{what} loss {a:?} vs {b:?}"
    );
    for ((k, x), (_, y)) in a.terms.iter().zip(&b.terms) {
        assert!(
            (x - y).abs() < 2e-3 * x.abs().max(1.0),
            "{what} {k}: {x} vs {y}"
        );
    }
    let values = |t: &Pretrainer<'_>| -> Result<Vec<(String, Tensor)>> {
        crate::nn::init::named_vars(t.varmap())
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().to_device(&Device::Cpu)?)))
            .collect()
    };
    for ((name, x), (_, y)) in values(cuda)?.iter().zip(&values(cpu)?) {
        if x.dtype().is_float() {
            close(&format!("after the {what} step {name}"), x, y, 1e-2)?;
        }
    }
    Ok(())
}

/// The test-time defence: the batch-synchronous augmentation (crop, flip, the jitter with the
/// hue round trip, grayscale), the SSL loss through classifier and head, and its gradient wrt
/// the input (what the reversal steps on).
#[test]
fn cuda_vs_cpu_defense_ssl_loss_and_input_gradient()
-> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use crate::nn::classifier::{Classifier, ClassifierSpec, FeatureKind};
    use crate::nn::defense::{
        SslHeadConfig, SyncAugment, ViewDraw, ssl_head, ssl_loss, sync_views,
    };
    use crate::nn::init::build_seeded;
    use crate::rng::Rng;
    let Some((gpu, _fp32)) = gpu() else {
        return Ok(());
    };
    let spec = ClassifierSpec {
        width: 8,
        hidden_dim: 0,
        features: FeatureKind::Backbone,
        classes: 10,
        ncrop: None,
        input_norm: false,
    };
    let cfg = SslHeadConfig {
        in_dim: 64,
        hidden_dim: 32,
        out_dim: 8,
    };
    let aug = SyncAugment::r_mao(32);
    let x = wave(&[6, 3, 32, 32], 0.3, 0.45, 0.5)?;
    let mut rng = Rng::new(3);
    let mut draws: Vec<_> = (0..4).map(|_| aug.draw_shared(&mut rng, 32, 32)).collect();
    // make sure the hue round trip and the grayscale run
    if let Some(j) = draws[0].jitter.as_mut() {
        j.hue = Some(0.15);
    }
    draws[1].grayscale = true;
    let run = |dev: &Device| -> Result<(Tensor, Tensor, Tensor)> {
        let (_cvm, clf) = Classifier::build_seeded(&spec, 1, dev)?;
        let (_hvm, head) = build_seeded(2, &InitRules::default(), DType::F32, dev, |vb| {
            ssl_head(&cfg, vb)
        })?;
        let xv = Var::from_tensor(&x.to_device(dev)?)?;
        let draws: Vec<ViewDraw> = draws.iter().cloned().map(ViewDraw::Shared).collect();
        let views = sync_views(&aug, xv.as_tensor(), &draws)?;
        let loss = ssl_loss(
            &clf.frozen()?,
            &head.frozen()?,
            &aug,
            xv.as_tensor(),
            &draws,
            false,
            false,
        )?;
        let g = grad(&loss.backward()?, xv.as_tensor(), "input")?;
        Ok((views, loss, g))
    };
    let (v_cpu, l_cpu, g_cpu) = run(&Device::Cpu)?;
    let (v_gpu, l_gpu, g_gpu) = run(&gpu)?;
    close("augmented views", &v_gpu, &v_cpu, 1e-5)?;
    close("SSL loss", &l_gpu, &l_cpu, 1e-4)?;
    close("input gradient", &g_gpu, &g_cpu, 1e-3)?;
    Ok(())
}

/// `PIPE_CUDA_MATH=tf32` is keyed because it changes the numbers: cuBLAS's TF32 compute type
/// rounds the products' inputs to a 10-bit mantissa, so a matmul moves away from the exact
/// (f64) product by far more than the `f32` one, yet stays within TF32's rounding.
#[test]
fn cuda_vs_cpu_tf32_matmuls_are_coarser_than_f32_ones() -> Result<()> {
    struct BackToFp32;
    impl Drop for BackToFp32 {
        fn drop(&mut self) {
            crate::device::CudaMath::Fp32.apply_to_candle();
        }
    }
    let _only_this = GEMM_MATH.write().unwrap_or_else(PoisonError::into_inner);
    if !cuda_usable() {
        eprintln!("no usable CUDA device: CPU-vs-CUDA test skipped");
        return Ok(());
    }
    let dev = Device::new_cuda(0)?;
    let (a, b) = (
        wave(&[256, 512], 0.1, 1.0, 0.0)?,
        wave(&[512, 192], 0.7, 1.0, 0.1)?,
    );
    let exact = a.to_dtype(DType::F64)?.matmul(&b.to_dtype(DType::F64)?)?;
    let on_gpu = || a.to_device(&dev)?.matmul(&b.to_device(&dev)?);
    let fp32 = rel_err(&on_gpu()?, &exact)?;
    let _restore = BackToFp32;
    crate::device::CudaMath::Tf32.apply_to_candle();
    let tf32 = rel_err(&on_gpu()?, &exact)?;
    eprintln!("matmul 256x512x192 against f64: f32 {fp32:e}, tf32 {tf32:e}");
    assert!(fp32 < 1e-5, "f32 matmul error {fp32:e}");
    assert!(
        tf32 > 10.0 * fp32,
        "TF32 matmul error {tf32:e} vs f32 {fp32:e}: TF32 not in use?"
    );
    assert!(tf32 < 1e-2, "TF32 matmul error {tf32:e}");
    Ok(())
}
