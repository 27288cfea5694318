//! EMP-SSL pretraining on real CIFAR-10 (experimental harness).

use std::path::Path;
use std::time::Instant;

use candle::{DType, Device, Tensor};
use pipe_stages::data::{Hooks, ReadOptions, Split, read_image_folder};
use pipe_stages::kinds::pretrain::{PretrainParams, Pretrainer, TrainHooks};
use pipe_stages::nn::heads::Encoder;
use serde_json::json;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// Features of every image of `split`, (n, d) f64 row-major.
fn features(enc: &Encoder, split: &Split, kind: &str, train: bool) -> Result<(Vec<f64>, usize)> {
    let chunk = 500;
    let mut out = Vec::new();
    let mut d = 0;
    let (h, w) = (split.h, split.w);
    let mut i = 0;
    while i < split.n {
        let m = chunk.min(split.n - i);
        let bytes = &split.images[i * split.image_len()..(i + m) * split.image_len()];
        let data: Vec<f32> = bytes.iter().map(|&v| f32::from(v) / 255.0).collect();
        let x = Tensor::from_vec(data, (m, 3, h, w), &Device::Cpu)?;
        let f = match kind {
            "backbone" => {
                let b = enc.backbone();
                b.forward_branch(&x, &b.branches()[0], train)?
            }
            _ => enc.features(&x, train)?,
        };
        d = f.dim(1)?;
        out.extend(f.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
        i += m;
    }
    Ok((out, d))
}

/// Standardises with the train mean / std, fits softmax regression, returns (train acc, test acc).
fn probe(
    xtr: &[f64],
    ytr: &[i64],
    xte: &[f64],
    yte: &[i64],
    d: usize,
    k: usize,
    steps: usize,
    lr: f64,
    l2: f64,
) -> Result<(f64, f64)> {
    let n = ytr.len();
    let mut mean = vec![0.0; d];
    let mut var = vec![0.0; d];
    for r in 0..n {
        for j in 0..d {
            mean[j] += xtr[r * d + j];
        }
    }
    for m in &mut mean {
        *m /= n as f64;
    }
    for r in 0..n {
        for j in 0..d {
            let c = xtr[r * d + j] - mean[j];
            var[j] += c * c;
        }
    }
    let std: Vec<f64> = var.iter().map(|v| (v / n as f64).sqrt().max(1e-6)).collect();
    let stdz = |x: &[f64]| -> Vec<f64> {
        x.chunks(d)
            .flat_map(|row| row.iter().enumerate().map(|(j, v)| (v - mean[j]) / std[j]))
            .collect()
    };
    let dev = Device::Cpu;
    let xtr_t = Tensor::from_vec(stdz(xtr), (n, d), &dev)?;
    let nte = yte.len();
    let xte_t = Tensor::from_vec(stdz(xte), (nte, d), &dev)?;
    let mut onehot = vec![0.0f64; n * k];
    for (r, &y) in ytr.iter().enumerate() {
        onehot[r * k + usize::try_from(y)?] = 1.0;
    }
    let y_t = Tensor::from_vec(onehot, (n, k), &dev)?;
    let mut wt = Tensor::zeros((d, k), DType::F64, &dev)?;
    let mut bt = Tensor::zeros((1, k), DType::F64, &dev)?;
    // Adam
    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
    let mut mw = wt.zeros_like()?;
    let mut vw = wt.zeros_like()?;
    let mut mb = bt.zeros_like()?;
    let mut vb = bt.zeros_like()?;
    let xtr_tt = xtr_t.t()?.contiguous()?;
    for s in 1..=steps {
        let logits = xtr_t.matmul(&wt)?.broadcast_add(&bt)?;
        let p = candle_nn::ops::softmax_last_dim(&logits)?;
        let g = ((p - &y_t)? / n as f64)?;
        let gw = (xtr_tt.matmul(&g)? + (&wt * l2)?)?;
        let gb = g.sum_keepdim(0)?;
        let c1 = 1.0 - f64::powi(b1, s as i32);
        let c2 = 1.0 - f64::powi(b2, s as i32);
        mw = ((&mw * b1)? + (&gw * (1.0 - b1))?)?;
        vw = ((&vw * b2)? + (gw.sqr()? * (1.0 - b2))?)?;
        mb = ((&mb * b1)? + (&gb * (1.0 - b1))?)?;
        vb = ((&vb * b2)? + (gb.sqr()? * (1.0 - b2))?)?;
        wt = (wt - (((&mw / c1)? / ((&vw / c2)?.sqrt()? + eps)?)? * lr)?)?;
        bt = (bt - (((&mb / c1)? / ((&vb / c2)?.sqrt()? + eps)?)? * lr)?)?;
    }
    let acc = |x: &Tensor, y: &[i64]| -> Result<f64> {
        let pred = x.matmul(&wt)?.broadcast_add(&bt)?.argmax(1)?.to_vec1::<u32>()?;
        let ok = pred
            .iter()
            .zip(y)
            .filter(|(p, y)| i64::from(**p) == **y)
            .count();
        Ok(ok as f64 / y.len() as f64)
    };
    Ok((acc(&xtr_t, ytr)?, acc(&xte_t, yte)?))
}

#[test]
fn emp_ssl_beats_random_init_on_cifar10() -> Result<()> {
    let t0 = Instant::now();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/cifar10-jpeg.tar.gz");
    assert!(
        path.is_file(),
        "CIFAR-10 archive not found at {} (expected ../shared/data/cifar10-jpeg.tar.gz beside the repository)",
        path.display()
    );
    let data = read_image_folder(
        &path,
        &ReadOptions {
            image_size: 32,
            resize: false,
        },
        &Hooks::none(),
    )?;
    let train_pc: usize = env_or("E_TRAIN_PC", 200);
    let test_pc: usize = env_or("E_TEST_PC", 100);
    let d = data
        .dataset
        .balanced_subset(Some(train_pc), Some(test_pc), 0)?;
    let k = d.classes.len();
    println!("decode+subset {:.1} s", t0.elapsed().as_secs_f64());
    let seeds: u64 = env_or("E_SEEDS", 2);
    let width: usize = env_or("E_WIDTH", 8);
    let hidden: usize = env_or("E_HIDDEN", 64);
    let zdim: usize = env_or("E_Z", 32);
    let nv: usize = env_or("E_NV", 4);
    let bs: usize = env_or("E_BS", 50);
    let epochs: usize = env_or("E_EPOCHS", 3);
    let lr: f64 = env_or("E_LR", 0.3);
    let views: String = env_or("E_VIEWS", "crop".to_string());
    let psteps: usize = env_or("E_PSTEPS", 300);
    let plr: f64 = env_or("E_PLR", 0.01);
    let pl2: f64 = env_or("E_PL2", 1e-3);
    let kinds = ["backbone", "h"];
    let modes = [false, true];
    let mut sums = std::collections::BTreeMap::<String, (f64, f64)>::new();
    for seed in 0..seeds {
        let cfg = serde_json::from_value::<PretrainParams>(json!({
            "method": "emp_ssl", "attack": "none", "width": width, "hidden_dim": hidden,
            "z_dim": zdim, "n_views": nv, "batch_size": bs, "epochs": epochs, "views": views,
            "lr": lr, "seed": seed,
        }))?
        .config();
        let rand = Pretrainer::new(cfg.clone(), &d.train, &Device::Cpu)?;
        let mut t = Pretrainer::new(cfg, &d.train, &Device::Cpu)?;
        let ts = Instant::now();
        while !t.finished() {
            let s = t.train_epoch(&TrainHooks::default())?;
            println!(
                "seed {seed} epoch {} loss {:.4} {:?} {:.1} s",
                s.epoch, s.loss, s.terms, s.seconds
            );
        }
        println!("seed {seed} train {:.1} s", ts.elapsed().as_secs_f64());
        for mode in modes {
            for kind in kinds {
                let tp = Instant::now();
                let mut accs = [0.0; 2];
                for (i, p) in [&rand, &t].iter().enumerate() {
                    let (ftr, dd) = features(p.encoder(), &d.train, kind, mode)?;
                    let (fte, _) = features(p.encoder(), &d.test, kind, mode)?;
                    let (tra, tea) =
                        probe(&ftr, &d.train.labels, &fte, &d.test.labels, dd, k, psteps, plr, pl2)?;
                    accs[i] = tea;
                    print!(
                        "  [{}] {kind} train_bn={mode}: train {:.3} test {:.3}",
                        if i == 0 { "rand" } else { "ssl" },
                        tra,
                        tea
                    );
                }
                println!("  ({:.1} s)", tp.elapsed().as_secs_f64());
                let e = sums.entry(format!("{kind} train_bn={mode}")).or_default();
                e.0 += accs[0] / seeds as f64;
                e.1 += accs[1] / seeds as f64;
            }
        }
    }
    for (key, (r, s)) in &sums {
        println!("MEAN {key}: rand {r:.4} ssl {s:.4} diff {:+.4}", s - r);
    }
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
