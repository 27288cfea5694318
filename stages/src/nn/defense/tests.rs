use candle::{DType, Device, Tensor, Var};

use super::*;
use crate::nn::augment::color::GRAY_WEIGHTS;
use crate::nn::augment::pipeline::{Plan, Scratch};
use crate::nn::augment::{CropBox, Interpolation};
use crate::nn::classifier::{ClassifierSpec, FeatureKind};
use crate::nn::init::{InitRules, build_seeded};

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// `n` random RGB images with grey pixels and channel ties mixed in (the hue formula's edge
/// cases).
fn images(n: usize, h: usize, w: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let hw = h * w;
    let mut out = vec![0u8; n * 3 * hw];
    for i in 0..n {
        let img = &mut out[i * 3 * hw..(i + 1) * 3 * hw];
        for p in 0..hw {
            let mut px = [0u8; 3];
            for v in &mut px {
                *v = rng.below(256) as u8;
            }
            match rng.below(8) {
                0 => px = [px[0]; 3], // grey
                1 => px[1] = px[0],   // r == g
                2 => px[2] = px[1],   // g == b
                3 => px[2] = px[0],   // r == b
                _ => {}
            }
            for c in 0..3 {
                img[c * hw + p] = px[c];
            }
        }
    }
    out
}

fn to_tensor(data: &[u8], n: usize, h: usize, w: usize) -> candle::Result<Tensor> {
    let v: Vec<f32> = data.iter().map(|&b| f32::from(b) / 255.0).collect();
    Tensor::from_vec(v, (n, 3, h, w), &Device::Cpu)
}

/// The tensor augmentation equals the host view pipeline applied image by image with the
/// same decisions (Pillow's grey weights on both sides, the host's).
#[test]
fn sync_augment_matches_the_host_pipeline_image_by_image() -> TestResult {
    let (n, worst) = (3usize, std::cell::Cell::new(0f32));
    let mut cases = 0;
    for (side, antialias) in [(32usize, false), (40, false), (40, true)] {
        let mut cfg = r_mao_augment(32);
        cfg.geometry = Geometry::ResizedCrop(RandomResizedCrop {
            antialias,
            ..RandomResizedCrop::default()
        });
        let aug = SyncAugment::new(cfg.clone(), GRAY_WEIGHTS.map(f64::from))?;
        let data = images(n, side, side, side as u64);
        let x = to_tensor(&data, n, side, side)?;
        let plan = Plan::new(&cfg, side, side);
        let mut rng = Rng::new(7);
        let mut draws: Vec<ViewParams> = (0..40)
            .map(|_| aug.draw_shared(&mut rng, side, side))
            .collect();
        // every op alone too, hue in both directions, a flip of the whole image
        let base = draws[0];
        for (k, hue) in [(0u8, None), (3, Some(0.17f32)), (3, Some(-0.2))] {
            let mut d = base;
            let mut j = d.jitter.expect("jitter is always applied");
            j.order = [k, (k + 1) % 4, (k + 2) % 4, (k + 3) % 4];
            if hue.is_some() {
                j.hue = hue;
            }
            d.jitter = Some(j);
            draws.push(d);
        }
        if side == 32 {
            draws.push(ViewParams {
                geometry: ViewGeometry::Full,
                flip: true,
                jitter: None,
                grayscale: true,
                blur_sigma: None,
                solarize: false,
            });
        }
        for d in &draws {
            let got = aug.apply_shared(&x, d)?;
            assert_eq!(got.dims(), &[n, 3, 32, 32]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            let il = 3 * side * side;
            let mut scratch = Scratch::default();
            for i in 0..n {
                let mut want = vec![0f32; 3 * 32 * 32];
                plan.render(&data[i * il..(i + 1) * il], d, &mut want, &mut scratch);
                for (a, b) in got[i * want.len()..(i + 1) * want.len()].iter().zip(&want) {
                    let diff = (a - b).abs();
                    worst.set(worst.get().max(diff));
                    assert!(diff < 1e-4, "{side}×{side} {d:?}: {a} vs {b}");
                }
            }
            cases += 1;
        }
    }
    eprintln!("{cases} draws, worst difference {:.2e}", worst.get());
    Ok(())
}

/// The batch really is synchronous: the same decisions for every image, so an image's view
/// does not depend on which batch it is in.
#[test]
fn one_draw_is_shared_by_the_batch() -> TestResult {
    let aug = SyncAugment::r_mao(32);
    let data = images(4, 32, 32, 3);
    let x = to_tensor(&data, 4, 32, 32)?;
    let d = aug.draw_shared(&mut Rng::new(11), 32, 32);
    let all = aug.apply_shared(&x, &d)?;
    let one = aug.apply_shared(&x.narrow(0, 2, 1)?, &d)?;
    let diff = (all.narrow(0, 2, 1)? - one)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-6, "{diff}");
    Ok(())
}

/// `Σ w ⊙ A(x)` differentiated by candle equals central differences in f64, with every op in
/// the chain (crop, flip, the four jitter ops including hue, grayscale).
#[test]
fn gradients_through_the_augmentation_match_finite_differences() -> TestResult {
    let (n, side) = (2usize, 8usize);
    let mut cfg = r_mao_augment(32);
    cfg.size = 6;
    let aug = SyncAugment::new(cfg, TORCH_GRAY)?;
    let mut rng = Rng::new(5);
    let xs: Vec<f64> = (0..n * 3 * side * side)
        .map(|_| rng.uniform(0.1, 0.9))
        .collect();
    let ws: Vec<f64> = (0..n * 3 * 36).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let dev = Device::Cpu;
    let w = Tensor::from_vec(ws, (n, 3, 6, 6), &dev)?;
    let mut draws = Vec::new();
    while draws.len() < 4 {
        let d = aug.draw_shared(&mut rng, side, side);
        // keep crops that sample several pixels and mix flips / greys
        if matches!(d.geometry, ViewGeometry::Crop(CropBox { height, width, .. }) if height > 3 && width > 3)
        {
            draws.push(d);
        }
    }
    let mut checked = 0;
    for (k, d) in draws.iter().enumerate() {
        let mut d = *d;
        d.grayscale = k == 3;
        d.flip = k % 2 == 1;
        let f =
            |x: &Tensor| -> candle::Result<Tensor> { (aug.apply_shared(x, &d)? * &w)?.sum_all() };
        let var = Var::from_tensor(&Tensor::from_vec(xs.clone(), (n, 3, side, side), &dev)?)?;
        let grads = f(var.as_tensor())?.backward()?;
        let g = grads
            .get(var.as_tensor())
            .expect("a gradient")
            .flatten_all()?
            .to_vec1::<f64>()?;
        let h = 1e-6;
        for i in (0..xs.len()).step_by(7) {
            let mut plus = xs.clone();
            plus[i] += h;
            let mut minus = xs.clone();
            minus[i] -= h;
            let fp = f(&Tensor::from_vec(plus, (n, 3, side, side), &dev)?)?.to_scalar::<f64>()?;
            let fm = f(&Tensor::from_vec(minus, (n, 3, side, side), &dev)?)?.to_scalar::<f64>()?;
            let fd = (fp - fm) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "draw {k} {d:?}, element {i}: autograd {} vs differences {fd}",
                g[i]
            );
            checked += 1;
        }
    }
    assert!(checked > 50);
    Ok(())
}

/// At a pixel whose maximum is shared by two channels, the hue round trip sends the gradient
/// of `max` to the first channel only, not split: torchvision 0.29 gives `[1, 0, 0]` here
/// (`stages/tests/defense_reference.py`, last line).
#[test]
fn channel_ties_take_torchs_gradient() -> TestResult {
    let dev = Device::Cpu;
    // r = g = 0.6 (both maximal), b = 0.2; a hue shift of 0.1
    let x = Var::from_tensor(&Tensor::new(&[0.6f64, 0.6, 0.2], &dev)?.reshape((1, 3, 1, 1))?)?;
    let y = adjust_hue(x.as_tensor(), &Tensor::new(0.1f64, &Device::Cpu)?)?;
    // V = max(r, g, b) is the largest output channel for any hue shift
    let v = y.max_keepdim(1)?.sum_all()?;
    let g = v.backward()?;
    let g = g
        .get(x.as_tensor())
        .expect("grad")
        .flatten_all()?
        .to_vec1::<f64>()?;
    assert_eq!(g, vec![1.0, 0.0, 0.0], "{g:?}");
    Ok(())
}

fn tiny_classifier(seed: u64) -> candle::Result<(candle_nn::VarMap, Classifier)> {
    let spec = ClassifierSpec {
        width: 4,
        hidden_dim: 0,
        features: FeatureKind::Backbone,
        classes: 10,
        ncrop: None,
        input_norm: false,
    };
    Classifier::build_seeded(&spec, seed, &Device::Cpu)
}

fn tiny_head(seed: u64, in_dim: usize) -> candle::Result<(candle_nn::VarMap, SslHead)> {
    let cfg = SslHeadConfig {
        in_dim,
        hidden_dim: 16,
        out_dim: 8,
    };
    build_seeded(
        seed,
        &InitRules::default(),
        DType::F32,
        &Device::Cpu,
        |vb| ssl_head(&cfg, vb),
    )
}

fn named(vm: &candle_nn::VarMap, name: &str) -> candle::Result<Vec<f64>> {
    let data = vm.data().lock().expect("varmap");
    data.get(name)
        .unwrap_or_else(|| panic!("no {name}"))
        .as_tensor()
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1()
}

/// The SSL loss against the head and (L1x) written out in f64 on the host from the
/// classifier's features: eval-mode BN with its running statistics, l2 normalisation,
/// `−s(a, first positive) + log Σ_{k≠a} exp s(a, k)` averaged over the `V B` anchors.
#[test]
fn ssl_loss_matches_the_head_and_l1x_written_out() -> TestResult {
    let (_cvm, clf) = tiny_classifier(1)?;
    let (hvm, head) = tiny_head(2, 32)?;
    // non-trivial running statistics
    {
        let data = hvm.data().lock().expect("varmap");
        data["bn3.running_mean"].set(&Tensor::from_vec(
            (0..16).map(|i| 0.01 * i as f32).collect::<Vec<_>>(),
            16,
            &Device::Cpu,
        )?)?;
        data["bn3.running_var"].set(&Tensor::from_vec(
            (0..16).map(|i| 0.5 + 0.1 * i as f32).collect::<Vec<_>>(),
            16,
            &Device::Cpu,
        )?)?;
    }
    let aug = SyncAugment::r_mao(32);
    let (b, views) = (5usize, 4usize);
    let x = to_tensor(&images(b, 32, 32, 9), b, 32, 32)?;
    let mut rng = Rng::new(3);
    let draws: Vec<ViewDraw> = (0..views)
        .map(|_| ViewDraw::Shared(aug.draw_shared(&mut rng, 32, 32)))
        .collect();
    let got = ssl_loss(&clf, &head, &aug, &x, &draws, false, false)?.to_scalar::<f32>()?;

    let f = clf
        .features(&sync_views(&aug, &x, &draws)?, false)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    let (w1, b1) = (named(&hvm, "linear.weight")?, named(&hvm, "linear.bias")?);
    let (w2, b2) = (named(&hvm, "linear2.weight")?, named(&hvm, "linear2.bias")?);
    let (gamma, beta) = (named(&hvm, "bn3.weight")?, named(&hvm, "bn3.bias")?);
    let (mean, var) = (
        named(&hvm, "bn3.running_mean")?,
        named(&hvm, "bn3.running_var")?,
    );
    let z: Vec<Vec<f64>> = f
        .iter()
        .map(|row| {
            let hid: Vec<f64> = (0..16)
                .map(|j| {
                    let y = b1[j] + (0..32).map(|i| w1[j * 32 + i] * row[i]).sum::<f64>();
                    let y = (y - mean[j]) / (var[j] + 1e-5).sqrt() * gamma[j] + beta[j];
                    y.max(0.0)
                })
                .collect();
            let out: Vec<f64> = (0..8)
                .map(|o| b2[o] + (0..16).map(|j| w2[o * 16 + j] * hid[j]).sum::<f64>())
                .collect();
            let norm = out.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            out.iter().map(|v| v / norm).collect()
        })
        .collect();
    let n = views * b;
    let mut total = 0.0;
    for a in 0..n {
        let s = |k: usize| z[a].iter().zip(&z[k]).map(|(p, q)| p * q).sum::<f64>() / 0.2;
        let first = if a / b == 0 { b + a % b } else { a % b };
        let lse = (0..n)
            .filter(|&k| k != a)
            .map(|k| s(k).exp())
            .sum::<f64>()
            .ln();
        total += lse - s(first);
    }
    let want = total / n as f64;
    assert!(
        (f64::from(got) - want).abs() < 1e-4 * want.abs().max(1.0),
        "{got} vs {want}"
    );
    Ok(())
}

/// The reversal stays in its ball and the box and moves; with an augmentation without
/// randomness (the objective is then a fixed function) it lowers the SSL loss. R-DLSP's
/// variant keeps the measured best and may leave the box. (That the purification lowers the
/// loss on augmentations it never saw, with a trained head, is checked on CIFAR-10 in
/// `tests/defense_cifar.rs`.)
#[test]
fn reversal_lowers_the_ssl_loss_within_its_ball() -> TestResult {
    let (_cvm, clf) = tiny_classifier(4)?;
    let clf = clf.frozen()?;
    let (_hvm, head) = tiny_head(5, 32)?;
    let head = head.frozen()?;
    let b = 16;
    let x = to_tensor(&images(b, 32, 32, 21), b, 32, 32)?;
    let fixed = SyncAugment::new(PipelineConfig::default(), TORCH_GRAY)?;
    let draws: Vec<ViewDraw> = (0..2)
        .map(|_| fixed.draw(&mut Rng::new(0), b, 32, 32))
        .collect();
    let loss = |x: &Tensor| -> candle::Result<f32> {
        ssl_loss(&clf, &head, &fixed, x, &draws, false, false)?.to_scalar::<f32>()
    };
    let cfg = ReverseConfig {
        steps: 10,
        views: 2,
        ..ReverseConfig::r_mao()
    };
    let purified = reverse(&clf, &head, &fixed, &x, &cfg, &mut Rng::new(1))?;
    let (before, after) = (loss(&x)?, loss(&purified)?);
    eprintln!("SSL loss: {before:.4} -> {after:.4}");
    assert!(after < before - 1e-3, "{before} -> {after}");

    let aug = SyncAugment::r_mao(32);
    let cfg = ReverseConfig {
        steps: 5,
        ..ReverseConfig::r_mao()
    };
    let purified = reverse(&clf, &head, &aug, &x, &cfg, &mut Rng::new(1))?;
    let delta = (&purified - &x)?;
    let linf = delta.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(f64::from(linf) <= cfg.eps + 1e-6, "{linf}");
    assert!(
        linf > 0.5 * cfg.eps as f32,
        "the reversal moved little: {linf}"
    );
    let (lo, hi) = (
        purified.min_all()?.to_scalar::<f32>()?,
        purified.max_all()?.to_scalar::<f32>()?,
    );
    assert!(lo >= 0.0 && hi <= 1.0, "{lo} {hi}");

    // same seed, same result
    let again = reverse(&clf, &head, &aug, &x, &cfg, &mut Rng::new(1))?;
    assert_eq!(
        (again - &purified)?.abs()?.max_all()?.to_scalar::<f32>()?,
        0.0
    );

    // R-DLSP: l_2 ball, no box after the steps
    let dlsp = ReverseConfig {
        eps: 0.5,
        alpha: 0.1,
        ..ReverseConfig::r_dlsp(Norm::L2)
    };
    let p2 = reverse(&clf, &head, &aug, &x, &dlsp, &mut Rng::new(2))?;
    let l2 = (&p2 - &x)?
        .sqr()?
        .flatten_from(1)?
        .sum(1)?
        .sqrt()?
        .max_all()?;
    assert!(f64::from(l2.to_scalar::<f32>()?) <= 0.5 + 1e-5);
    Ok(())
}

#[test]
fn random_noise_stays_in_the_ball_and_box() -> TestResult {
    let x = to_tensor(&images(3, 32, 32, 1), 3, 32, 32)?;
    let y = random_noise(&x, 8.0 / 255.0, &mut Rng::new(0))?;
    let d = (&y - &x)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(d <= 8.0 / 255.0 + 1e-6 && d > 7.0 / 255.0, "{d}");
    assert!(y.min_all()?.to_scalar::<f32>()? >= 0.0 && y.max_all()?.to_scalar::<f32>()? <= 1.0);
    let _ = Interpolation::Bilinear;
    Ok(())
}

#[test]
fn unsupported_pipelines_are_refused() {
    let mut cfg = r_mao_augment(32);
    cfg.solarize_p = 0.1;
    assert!(SyncAugment::new(cfg, TORCH_GRAY).is_err());
}

/// Per-image mode: every image gets its own draw, and each image's view is the host
/// pipeline's view of that image under its own decisions.
#[test]
fn per_image_draws_follow_each_images_own_decisions() -> TestResult {
    let mut cfg = r_mao_augment(32);
    cfg.geometry = Geometry::ResizedCrop(RandomResizedCrop {
        antialias: false,
        ..RandomResizedCrop::default()
    });
    let aug = SyncAugment::new(cfg.clone(), GRAY_WEIGHTS.map(f64::from))?.per_image(true);
    assert!(aug.is_per_image());
    let n = 5;
    let data = images(n, 32, 32, 77);
    let x = to_tensor(&data, n, 32, 32)?;
    let d = aug.draw(&mut Rng::new(8), n, 32, 32);
    let ViewDraw::PerImage(ps) = &d else {
        panic!("per-image draws expected")
    };
    assert_eq!(ps.len(), n);
    assert!(ps.windows(2).any(|w| w[0].geometry != w[1].geometry));
    let got = aug.apply(&x, &d)?.flatten_all()?.to_vec1::<f32>()?;
    let plan = Plan::new(&cfg, 32, 32);
    let mut scratch = Scratch::default();
    let il = 3 * 32 * 32;
    for (i, p) in ps.iter().enumerate() {
        let mut want = vec![0f32; il];
        plan.render(&data[i * il..(i + 1) * il], p, &mut want, &mut scratch);
        for (a, b) in got[i * il..(i + 1) * il].iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "image {i}: {a} vs {b}");
        }
    }
    // a per-image draw of another batch size is refused
    assert!(aug.apply(&x.narrow(0, 0, 3)?, &d).is_err());
    Ok(())
}

/// The batched per-image path (per-image matrices, one jitter pass per op-order group, a
/// grayscale blend) gives each image what its draw gives it alone, values and input
/// gradient, with images with and without jitter and grayscale in one batch.
#[test]
fn batched_per_image_views_equal_each_image_alone() -> TestResult {
    let mut cfg = r_mao_augment(32);
    cfg.jitter.p = 0.6;
    cfg.grayscale_p = 0.5;
    let aug = SyncAugment::new(cfg, TORCH_GRAY)?.per_image(true);
    let n = 24;
    let x = to_tensor(&images(n, 32, 32, 5), n, 32, 32)?.to_dtype(DType::F64)?;
    let weights = Tensor::randn(0f64, 1.0, (n, 3, 32, 32), &Device::Cpu)?;
    for seed in 0..3 {
        let d = aug.draw(&mut Rng::new(100 + seed), n, 32, 32);
        let ViewDraw::PerImage(ps) = &d else {
            panic!("per-image draws expected")
        };
        assert!(ps.iter().any(|p| p.jitter.is_none()) && ps.iter().any(|p| p.jitter.is_some()));
        assert!(ps.iter().any(|p| p.grayscale) && ps.iter().any(|p| !p.grayscale));
        let orders: std::collections::BTreeSet<_> = ps
            .iter()
            .filter_map(|p| p.jitter.as_ref().map(|j| j.order))
            .collect();
        assert!(orders.len() > 3, "several op-order groups");
        // batched
        let v = Var::from_tensor(&x)?;
        let y = aug.apply(v.as_tensor(), &d)?;
        let g = (&y * &weights)?.sum_all()?.backward()?;
        let (got, got_grad) = (
            y.flatten_all()?.to_vec1::<f64>()?,
            g.get(v.as_tensor())
                .ok_or("no gradient")?
                .flatten_all()?
                .to_vec1::<f64>()?,
        );
        // image by image
        let v1 = Var::from_tensor(&x)?;
        let views: Vec<Tensor> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| aug.apply_shared(&v1.as_tensor().narrow(0, i, 1)?, p))
            .collect::<candle::Result<_>>()?;
        let y1 = Tensor::cat(&views, 0)?;
        let g1 = (&y1 * &weights)?.sum_all()?.backward()?;
        let (want, want_grad) = (
            y1.flatten_all()?.to_vec1::<f64>()?,
            g1.get(v1.as_tensor())
                .ok_or("no gradient")?
                .flatten_all()?
                .to_vec1::<f64>()?,
        );
        let worst = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max)
        };
        assert!(worst(&got, &want) < 1e-12, "values: {}", worst(&got, &want));
        assert!(
            worst(&got_grad, &want_grad) < 1e-10,
            "gradients: {}",
            worst(&got_grad, &want_grad)
        );
    }
    Ok(())
}

/// The augmentation and its input gradient against torchvision's tensor transforms
/// (`stages/tests/defense_reference.py`, torch 2.15 / torchvision 0.29, f64 but for
/// torchvision's float32 hue step, the factors rounded to f32 as our draws hold them): three
/// draws
/// (a flipped crop with the hue shift first; the whole image with every op and grayscale; a
/// small crop upsampled), on a u8-quantised batch where channel ties occur.
#[test]
fn matches_torchvision_values_and_gradients() -> TestResult {
    use crate::nn::augment::JitterParams;
    let (b, c, h, w) = (2usize, 3usize, 32usize, 32usize);
    let n = b * c * h * w;
    let dev = Device::Cpu;
    let wave = |f: &dyn Fn(f64) -> f64| -> candle::Result<Tensor> {
        Tensor::from_vec(
            (0..n).map(|k| f(k as f64)).collect::<Vec<f64>>(),
            (b, c, h, w),
            &dev,
        )
    };
    let x0: Vec<f64> = (0..n)
        .map(|k| (255.0 * (0.5 + 0.45 * (0.37 * k as f64 + 0.3).sin())).round() / 255.0)
        .collect();
    let wt = wave(&|k| (0.11 * k).cos())?;
    let vt = wave(&|k| (0.07 * k).sin())?;
    // (top, left, height, width), flip, order, (brightness, contrast, saturation, hue), gray;
    // torchvision's numbers: sum, weighted, grad_sum, grad_v, grad_max
    #[allow(clippy::type_complexity)]
    let cases: [(
        (usize, usize, usize, usize),
        bool,
        [u8; 4],
        (f32, f32, f32, f32),
        bool,
        [f64; 5],
    ); 3] = [
        (
            (3, 5, 20, 24),
            true,
            [3, 0, 2, 1],
            (1.3, 0.7, 1.5, 0.12),
            false,
            [
                3420.2039905457,
                -1.1528366767,
                1.2883584685,
                -25.4663284061,
                3.0158629222,
            ],
        ),
        (
            (0, 0, 32, 32),
            false,
            [0, 1, 2, 3],
            (0.6, 1.6, 0.3, -0.18),
            true,
            [
                2021.5740146207,
                -2.4095817437,
                -2.4569778210,
                -1.0184284197,
                1.8357457682,
            ],
        ),
        (
            (10, 2, 9, 13),
            false,
            [2, 3, 1, 0],
            (1.0, 1.2, 1.0, 0.05),
            false,
            [
                3069.9297695761,
                -4.5326331213,
                -6.6682931570,
                3.6747249097,
                3.2995249543,
            ],
        ),
    ];
    let aug = SyncAugment::r_mao(32);
    for (i, ((top, left, height, width), flip, order, (bf, cf, sf, hf), gray, want)) in
        cases.into_iter().enumerate()
    {
        let p = ViewParams {
            geometry: ViewGeometry::Crop(CropBox {
                top,
                left,
                height,
                width,
            }),
            flip,
            jitter: Some(JitterParams {
                order,
                brightness: Some(bf),
                contrast: Some(cf),
                saturation: Some(sf),
                hue: Some(hf),
            }),
            grayscale: gray,
            blur_sigma: None,
            solarize: false,
        };
        let x = Var::from_tensor(&Tensor::from_vec(x0.clone(), (b, c, h, w), &dev)?)?;
        let y = aug.apply_shared(x.as_tensor(), &p)?;
        let obj = (&y * &wt)?.sum_all()?;
        let g = obj.backward()?;
        let g = g.get(x.as_tensor()).expect("a gradient");
        let got = [
            y.sum_all()?.to_scalar::<f64>()?,
            obj.to_scalar::<f64>()?,
            g.sum_all()?.to_scalar::<f64>()?,
            (g * &vt)?.sum_all()?.to_scalar::<f64>()?,
            g.abs()?.max_all()?.to_scalar::<f64>()?,
        ];
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, e)| (a - e).abs() / e.abs().max(1.0))
            .fold(0f64, f64::max);
        eprintln!("draw {i}: worst relative difference to torchvision {worst:.1e}");
        for (k, (a, e)) in got.iter().zip(want).enumerate() {
            // torchvision's `adjust_hue` converts to float32 and back (`to_dtype_image`), so the
            // reference is only float32-accurate: measured 2.9e-7 .. 3.1e-6
            assert!(
                (a - e).abs() <= 2e-5 * e.abs().max(1.0),
                "draw {i}, quantity {k}: ours {a} vs torchvision {e}"
            );
        }
    }
    Ok(())
}

/// The SSL loss's (L1x) against R-MAO's own construction at 4 views ([Q54]: the first positive
/// is the target, the other two sit in the denominator), `stages/tests/defense_reference.py`.
#[test]
fn l1x_matches_r_mao_with_four_views() -> TestResult {
    let (v, b, d) = (4usize, 3usize, 5usize);
    let z: Vec<f64> = (0..v * b * d)
        .map(|k| (0.9 * k as f64 + 0.2).sin())
        .collect();
    let z = Tensor::from_vec(z, (v * b, d), &Device::Cpu)?;
    let z = l2_normalize(&z)?;
    let got = info_nce_first_positive(&z, v, SSL_TEMPERATURE)?.to_scalar::<f64>()?;
    assert!((got - 5.266980707013).abs() < 1e-10, "{got}");
    Ok(())
}
