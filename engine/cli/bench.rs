//! `pipe bench`: timings reported in the issue notes.
//!
//! `pipe bench engine`, on generated pipelines of shell stages:
//! 1. plan: load + validate + expand + key + plan a generated pipeline of N nodes (a DAG where
//!    stage i reads stage i-1 and stage i/2), against an empty store, in process.
//! 2. cached run: a chain of M shell stages is run once, then `pipe run` (this binary, as a
//!    child process, so process start, parse, plan and store checks all count) is timed on the
//!    fully cached pipeline.
//!
//! `pipe bench augment`: views/s of the 16-view EMP generator at batch 100, on the default rayon
//! pool and on a one-thread pool (per core). `pipe bench decode`: decoding a whole ImageFolder
//! archive (CIFAR-10 as JPEGs: 60,000 images).
//!
//! `pipe bench evaluate`: seconds to evaluate synthetic 32×32 test images (default 1,000) with
//! the `evaluate` stage's loop under l_inf PGD-20 (8/255, step 2/255, random start) against a
//! seeded ResNet-18 + 4096-d `pre_feature` + linear head, batch 100: clean forward, 20
//! forward/backward steps and the adversarial forward per batch.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use pipe_cache::Store;
use pipe_engine::Overrides;
use serde_json::json;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn dag_yaml(n: usize) -> String {
    let mut s = String::from("name: bench_dag\nstages:\n");
    for i in 0..n {
        let _ = writeln!(
            s,
            "  s{i}:\n    kind: shell\n    params: {{cmd: 'true', index: {i}, lr: 0.1}}"
        );
        if i > 0 {
            let _ = write!(s, "    inputs: {{prev: s{}", i - 1);
            if i / 2 != i - 1 {
                let _ = write!(s, ", half: s{}", i / 2);
            }
            s.push_str("}\n");
        }
    }
    s
}

fn chain_yaml(n: usize) -> String {
    let mut s = String::from("name: bench_chain\nstages:\n");
    for i in 0..n {
        let _ = writeln!(
            s,
            "  c{i}:\n    kind: shell\n    params: {{cmd: 'echo {i} > \"$PIPE_OUT/out.txt\"'}}"
        );
        if i > 0 {
            let _ = writeln!(s, "    inputs: {{prev: c{}}}", i - 1);
        }
    }
    s
}

pub fn run(what: crate::BenchWhat) -> Result<u8> {
    match what {
        crate::BenchWhat::Engine {
            nodes,
            chain,
            reps,
            json,
        } => engine(nodes, chain, reps, json),
        crate::BenchWhat::Augment {
            batch,
            views,
            reps,
            json,
        } => augment(batch, views, reps, json),
        crate::BenchWhat::Decode { path, reps, json } => decode(&path, reps, json),
        crate::BenchWhat::Nn {
            widths,
            batch,
            reps,
            device,
            json,
        } => nn(&widths, batch, reps, &device, json),
        crate::BenchWhat::Pretrain {
            widths,
            batch,
            views,
            steps,
            m,
            methods,
            attacks,
            device,
            json,
        } => {
            let device = device.parse().map_err(anyhow::Error::msg)?;
            pretrain(
                &widths, batch, views, steps, m, &methods, &attacks, device, json,
            )
        }
        crate::BenchWhat::Defense {
            batch,
            reps,
            device,
            json,
        } => defense(batch, reps, &device, json),
        crate::BenchWhat::Evaluate {
            widths,
            batch,
            images,
            steps,
            json,
        } => evaluate(&widths, batch, images, steps, json),
    }
}

/// What a benchmark's numbers depend on beyond its arguments: the kernels (`fast`, or `candle`
/// under `PIPE_KERNELS=candle`) and how CUDA computes f32 (`PIPE_CUDA_MATH`).
fn math_and_kernels() -> (&'static str, &'static str) {
    let kernels = match pipe_stages::nn::conv::KernelImpl::from_env() {
        pipe_stages::nn::conv::KernelImpl::Candle => "candle",
        pipe_stages::nn::conv::KernelImpl::Fast => "fast",
    };
    (kernels, pipe_stages::device::CudaMath::current().name())
}

fn defense(batch: usize, reps: usize, device: &str, json_out: bool) -> Result<u8> {
    let spec: pipe_stages::device::DeviceSpec = device.parse().map_err(anyhow::Error::msg)?;
    let dev = spec.open().map_err(|e| anyhow::anyhow!("{e}"))?;
    let rows = pipe_stages::nn::defense::bench_augment(batch.max(1), reps, &dev)?;
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"device": device, "threads": rayon::current_num_threads(),
                        "kernels": math_and_kernels().0, "cuda_math": math_and_kernels().1,
                        "rows": rows})
            )?
        );
    } else {
        println!("on {device}: one view of R-MAO's augmentation, forward + input gradient");
        for r in &rows {
            println!(
                "{:<15} batch {}: {:9.2} ms per view  {:10.0} images/s",
                r.mode, r.batch, r.ms_per_view, r.images_per_second
            );
        }
    }
    Ok(0)
}

fn evaluate(
    widths: &[usize],
    batch: usize,
    images: usize,
    steps: usize,
    json_out: bool,
) -> Result<u8> {
    let mut rows = Vec::new();
    for &width in widths {
        let r = pipe_stages::kinds::evaluate::bench(width, batch, images, steps)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if !json_out {
            println!(
                "width {:>3}, batch {}: {} images under PGD-{} (linf 8/255, alpha 2/255) in {:8.1} s  = {:8.1} s per 1,000 images",
                r.width, r.batch, r.images, r.steps, r.seconds, r.seconds_per_1000
            );
        }
        rows.push(r);
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"threads": rayon::current_num_threads(), "rows": rows})
            )?
        );
    }
    Ok(0)
}

#[allow(clippy::too_many_arguments)]
fn pretrain(
    widths: &[usize],
    batch: usize,
    views: usize,
    steps: usize,
    m: usize,
    methods: &[String],
    attacks: &[String],
    device: pipe_stages::device::DeviceSpec,
    json_out: bool,
) -> Result<u8> {
    let wanted = |list: &[String], x: &str| list.is_empty() || list.iter().any(|l| l == x);
    const METHODS: [&str; 5] = ["simclr", "emp_ssl", "acl", "air", "advcl"];
    const ATTACKS: [&str; 3] = ["none", "pgd", "free"];
    for (list, known, what) in [
        (methods, &METHODS[..], "method"),
        (attacks, &ATTACKS[..], "attack"),
    ] {
        if let Some(bad) = list.iter().find(|l| !known.contains(&l.as_str())) {
            anyhow::bail!(
                "unknown {what} {bad:?}: expected one of {}",
                known.join(", ")
            );
        }
    }
    use pipe_stages::device::DeviceSpec;
    use pipe_stages::kinds::pretrain::{PretrainParams, bench_mode};
    // what `auto` resolves to here, for the report
    let on = match device {
        DeviceSpec::Auto if device.backend() == "cuda" => "cuda:0".to_string(),
        DeviceSpec::Auto => "cpu".to_string(),
        d => d.to_string(),
    };
    let (kernels, math) = math_and_kernels();
    if !json_out {
        println!("on {on} (kernels {kernels}, CUDA f32 math {math})");
    }
    let mut rows = Vec::new();
    for &width in widths {
        for method in METHODS {
            for attack in ATTACKS {
                // the ACL family has no free-adversarial variant; AdvCL is PGD only
                let acl = matches!(method, "acl" | "air");
                if !wanted(methods, method)
                    || !wanted(attacks, attack)
                    || (acl && attack == "free")
                    || (method == "advcl" && attack != "pgd")
                {
                    continue;
                }
                let n_views = if method == "emp_ssl" { views } else { 2 };
                let p: PretrainParams = serde_json::from_value(json!({
                    "method": method, "attack": attack, "width": width, "batch_size": batch,
                    "n_views": n_views, "m": m, "views": "crop",
                }))?;
                let r =
                    bench_mode(p.config(), steps, device).map_err(|e| anyhow::anyhow!("{e}"))?;
                if !json_out {
                    println!(
                        "width {:>3} {:>7} {:>4}: batch {} x {:>2} views  {:8.2} s/batch  {:7.1} img/s  CIFAR-10 epoch {:7.1} min  state write {:.2} s ({:.0} MB)",
                        r.width,
                        method,
                        attack,
                        r.batch,
                        r.n_views,
                        r.seconds_per_batch,
                        r.images_per_second,
                        r.cifar10_epoch_seconds / 60.0,
                        r.state_write_seconds,
                        r.state_bytes as f64 / 1e6
                    );
                }
                rows.push(r);
            }
        }
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"threads": rayon::current_num_threads(), "device": on,
                        "kernels": kernels, "cuda_math": math, "rows": rows})
            )?
        );
    }
    Ok(0)
}

fn nn(widths: &[usize], batch: usize, reps: usize, device: &str, json_out: bool) -> Result<u8> {
    let spec: pipe_stages::device::DeviceSpec = device.parse().map_err(anyhow::Error::msg)?;
    let dev = spec.open().map_err(|e| anyhow::anyhow!("{e}"))?;
    let (kernels, math) = math_and_kernels();
    if !json_out {
        println!("on {device} (kernels {kernels}, CUDA f32 math {math})");
    }
    let mut rows = Vec::new();
    for &w in widths {
        let t = pipe_stages::nn::bench::bench_resnet(w, batch, reps, &dev)?;
        if !json_out {
            println!(
                "ResNet-18 width {:>3}, batch {}: forward {:8.1} ms   train step {:8.1} ms   PGD step {:8.1} ms",
                t.width, t.batch, t.forward_ms, t.train_step_ms, t.pgd_step_ms
            );
            println!(
                "  one {}-channel 32x32 layer: conv3x3 forward {:8.1} ms, forward + backward {:8.1} ms; BN + ReLU forward + backward {:8.1} ms",
                t.width, t.conv3x3_forward_ms, t.conv3x3_train_ms, t.bn_relu_train_ms
            );
        }
        rows.push(t);
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "threads": rayon::current_num_threads(), "device": device,
                "kernels": kernels, "cuda_math": math, "rows": rows
            }))?
        );
    }
    Ok(0)
}

fn augment(batch: usize, views: usize, reps: usize, json_out: bool) -> Result<u8> {
    let threads = rayon::current_num_threads();
    let all = pipe_stages::nn::augment::bench_emp(batch, views, reps);
    let one_pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let one = one_pool.install(|| pipe_stages::nn::augment::bench_emp(batch, views, reps));
    if json_out {
        let doc = json!({"batch": batch, "views": views, "threads": threads, "views_per_s": all, "views_per_s_one_thread": one});
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "EMP generator, {views} views x batch {batch}: {all:9.0} views/s on {threads} threads, {one:9.0} views/s on 1 thread (target >= 20,000 per core)"
        );
    }
    Ok(0)
}

fn decode(path: &Path, reps: usize, json_out: bool) -> Result<u8> {
    let mut secs = Vec::new();
    let mut images = 0;
    for _ in 0..reps.max(1) {
        let (s, n) = pipe_stages::data::bench_decode(path)
            .with_context(|| format!("decoding {}", path.display()))?;
        secs.push(s);
        images = n;
    }
    let m = median(secs.clone());
    if json_out {
        let doc = json!({"path": path.display().to_string(), "images": images, "seconds_median": m, "seconds": secs, "threads": rayon::current_num_threads()});
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "decode {}: {images} images in {m:.2} s (median of {}), {:.0} images/s on {} threads",
            path.display(),
            secs.len(),
            images as f64 / m,
            rayon::current_num_threads()
        );
    }
    Ok(0)
}

fn engine(nodes: usize, chain: usize, reps: usize, json_out: bool) -> Result<u8> {
    let reps = reps.max(1);
    let dir = std::env::temp_dir().join(format!("pipe-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = bench_in(&dir, nodes, chain, reps);
    let _ = std::fs::remove_dir_all(&dir);
    let (plan_ms, run_ms, first_run_s) = result?;
    if json_out {
        let doc = json!({
            "plan_nodes": nodes, "plan_ms_median": median(plan_ms.clone()), "plan_ms_min": plan_ms.iter().copied().fold(f64::INFINITY, f64::min),
            "chain_stages": chain, "cached_run_ms_median": median(run_ms.clone()), "cached_run_ms_min": run_ms.iter().copied().fold(f64::INFINITY, f64::min),
            "first_run_s": first_run_s, "reps": reps,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "plan, {nodes} nodes:              median {:7.2} ms  (min {:.2} ms, {reps} reps; target < 50 ms)",
            median(plan_ms.clone()),
            plan_ms.iter().copied().fold(f64::INFINITY, f64::min)
        );
        println!(
            "cached `pipe run`, {chain} stages: median {:7.2} ms  (min {:.2} ms, {reps} reps; target < 100 ms)",
            median(run_ms.clone()),
            run_ms.iter().copied().fold(f64::INFINITY, f64::min)
        );
        println!("(first, uncached run of the chain: {first_run_s:.2} s)");
    }
    Ok(0)
}

/// The child gets SIGTERM when this process dies, even by SIGKILL (Linux `PR_SET_PDEATHSIG`),
/// so a killed benchmark leaves no `pipe run` writing into its temporary store.
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt as _;
        #[allow(unsafe_code)]
        // SAFETY: `prctl` is async-signal-safe; the closure touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

fn bench_in(
    dir: &Path,
    nodes: usize,
    chain: usize,
    reps: usize,
) -> Result<(Vec<f64>, Vec<f64>, f64)> {
    let reg = crate::commands::registry();
    let dag = dir.join("dag.yaml");
    std::fs::write(&dag, dag_yaml(nodes))?;
    let store = Store::open(dir.join("store"))?;
    let mut plan_ms = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        let p = pipe_engine::spec::load(&dag, &reg, &Overrides::default())?;
        let g = pipe_engine::graph::build(p, &reg);
        let plan = pipe_engine::plan::plan(g, &store, &[])?;
        plan_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        if plan.graph.nodes.len() != nodes {
            bail!("expected {nodes} nodes, planned {}", plan.graph.nodes.len());
        }
    }

    let file = dir.join("chain.yaml");
    std::fs::write(&file, chain_yaml(chain))?;
    let exe = std::env::current_exe()?;
    let store_dir = dir.join("store");
    let pipe = |args: &[&str]| -> Result<std::process::Output> {
        let mut cmd = Command::new(&exe);
        cmd.args(args).arg(&file).arg("--store").arg(&store_dir);
        die_with_parent(&mut cmd);
        cmd.output().context("running pipe")
    };
    let t0 = Instant::now();
    let out = pipe(&["run", "--json"])?;
    let first_run_s = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("first run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut run_ms = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        let out = pipe(&["run", "--json"])?;
        run_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        if doc["cached"].as_u64() != Some(chain as u64) {
            bail!("cached run was not fully cached: {doc}");
        }
    }
    Ok((plan_ms, run_ms, first_run_s))
}
