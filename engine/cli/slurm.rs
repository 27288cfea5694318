//! `pipe run --executor slurm` (the submitting side) and `pipe exec NODE_KEY` (what each job
//! runs). The engine's `slurm` module documents the protocol.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pipe_cache::{Key, Store};
use pipe_engine::slurm::{SlurmOptions, job_file};
use pipe_engine::{Executor, Outcome, RunOptions, StageEvent};
use serde_json::{Value, json};

use crate::PipelineArgs;

/// How long a job queued after its inputs' jobs waits for their entries to show on its machine.
const INPUT_VISIBLE: Duration = Duration::from_secs(60);

/// Jobs in the queue at once unless `-j` says otherwise.
pub const DEFAULT_JOBS: usize = 256;

/// The executor of `pipe run --executor slurm`.
pub fn executor(
    pipeline: &PipelineArgs,
    store: &Store,
    sbatch_args: Vec<String>,
    poll_seconds: f64,
    runs_auto_nodes: bool,
) -> Result<Executor> {
    if !(poll_seconds.is_finite() && poll_seconds > 0.0) {
        bail!("--slurm-poll: expected a positive number of seconds, got {poll_seconds}");
    }
    let exe = std::env::current_exe().context("cannot find this pipe binary")?;
    let file = std::path::absolute(&pipeline.file)
        .with_context(|| format!("{}", pipeline.file.display()))?;
    let auto = pipe_stages::device::auto_backend();
    if runs_auto_nodes
        && auto == "cpu"
        && pipe_stages::device::auto_override()
            .ok()
            .flatten()
            .is_none()
    {
        eprintln!(
            "pipe: `device: auto` resolves to the CPU here, so its nodes are keyed, and their Slurm \
             jobs compute, on the CPU; to plan them for GPU nodes, set {}=cuda",
            pipe_stages::device::AUTO_DEVICE_ENV
        );
    }
    Ok(Executor::Slurm(SlurmOptions {
        pipe: vec![
            exe.display().to_string(),
            "--store".into(),
            store.root().display().to_string(),
        ],
        env: vec![
            (
                pipe_stages::device::AUTO_DEVICE_ENV.to_string(),
                auto.to_string(),
            ),
            // the jobs compute in the math and with the kernels the nodes were keyed with
            (
                pipe_stages::device::CUDA_MATH_ENV.to_string(),
                pipe_stages::device::CudaMath::current().name().to_string(),
            ),
            (
                pipe_stages::nn::conv::KERNELS_ENV.to_string(),
                pipe_stages::nn::conv::KernelImpl::from_env()
                    .name()
                    .to_string(),
            ),
        ],
        sbatch_args,
        job: json!({
            "pipeline": file.display().to_string(),
            "set": pipeline.set,
            "sweep": pipeline.sweep,
            "auto_device": auto,
        }),
        poll: Duration::from_secs_f64(poll_seconds),
        ..SlurmOptions::default()
    }))
}

/// `pipe exec KEY`: computes the node with that key of the job file's pipeline.
pub fn exec(store_path: &Path, key: &str) -> Result<u8> {
    let key: Key = key
        .parse()
        .map_err(|e| anyhow::anyhow!("`{key}` is not a node key (64 hex digits): {e}"))?;
    let store = crate::commands::open_store(store_path)?;
    let _lock = store.lock_shared()?;
    let cancel = crate::signals::install();
    let path = job_file(&store, &key);
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "no job file {} (`pipe exec` computes the nodes `pipe run --executor slurm` \
             submits)",
            path.display()
        )
    })?;
    let job: Value =
        serde_json::from_slice(&text).with_context(|| format!("{}", path.display()))?;
    let strings = |field: &str| -> Result<Vec<String>> {
        match &job[field] {
            Value::Null => Ok(Vec::new()),
            v => serde_json::from_value(v.clone())
                .with_context(|| format!("{}: `{field}`", path.display())),
        }
    };
    let Some(file) = job["pipeline"].as_str() else {
        bail!("{}: expected a `pipeline` file", path.display());
    };
    let auto = pipe_stages::device::auto_backend();
    if let Some(planned) = job["auto_device"].as_str()
        && planned != auto
    {
        bail!(
            "`device: auto` was {planned} when this job was planned but is {auto} here; \
             set {}={planned} (the job's command line does)",
            pipe_stages::device::AUTO_DEVICE_ENV
        );
    }
    let args = PipelineArgs {
        file: file.into(),
        set: strings("set")?,
        sweep: strings("sweep")?,
    };
    let Some(plan) = crate::commands::load_plan(&args, &store, &[])? else {
        return Ok(2);
    };
    let Some(i) = plan.graph.nodes.iter().position(|n| n.key.key() == &key) else {
        bail!(
            "{} has no node with key {} any more (node `{}` had it when the job was submitted, \
             {}): the pipeline or its inputs changed; run `pipe run --executor slurm` again",
            file,
            key.short(),
            job["node"].as_str().unwrap_or("?"),
            job["submitted"].as_str().unwrap_or("at an unknown time"),
        );
    };
    let node = &plan.graph.nodes[i];
    eprintln!(
        "pipe exec: {} ({}) on {}",
        node.id,
        node.key.short(),
        pipe_engine::exec::host()
    );
    // a job queued with `--detach` starts as soon as its inputs' jobs exit, and any job may
    // land on a node whose NFS client still caches an input's entry as missing (an earlier
    // job there looked it up): on a shared file system entries can take a moment to show here
    {
        let t = Instant::now();
        let mut told = false;
        while let Some(up) = node
            .inputs
            .values()
            .flatten()
            .map(|&j| &plan.graph.nodes[j])
            .find(|up| !store.contains(up.key.key()))
        {
            if t.elapsed() >= INPUT_VISIBLE || cancel.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            if !told {
                eprintln!(
                    "pipe exec: waiting for the entry of input `{}` to show here",
                    up.id
                );
                told = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // progress into the job's output: every log line, and progress at most every 30 s
    let last = Mutex::new(None::<Instant>);
    let report = |e: StageEvent| match e {
        StageEvent::Log(l) => eprintln!("{l}"),
        StageEvent::Progress {
            done,
            total,
            message,
        } => {
            let mut last = last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if done == total || last.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                eprintln!("{done}/{total} {message}");
                *last = Some(Instant::now());
            }
        }
    };
    let t0 = Instant::now();
    let reg = crate::commands::registry();
    let outcome = pipe_engine::exec::run_one(
        &plan,
        i,
        &reg,
        &store,
        &RunOptions::default(),
        cancel,
        &report,
    );
    let seconds = t0.elapsed().as_secs_f64();
    match outcome {
        Ok(o) => {
            let what = if o == Outcome::Cached {
                "was cached already"
            } else {
                "ran"
            };
            eprintln!("pipe exec: {} {what} ({seconds:.1} s)", node.id);
            Ok(0)
        }
        Err(msg) => {
            eprintln!("failed: {}: {msg}", node.id);
            Ok(if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                crate::signals::exit_code()
            } else {
                1
            })
        }
    }
}

/// `pipe run --executor slurm --detach`: queues every node that must run and exits.
pub fn detach(
    plan: &pipe_engine::Plan,
    store: &Store,
    opts: &SlurmOptions,
    cancel: &std::sync::atomic::AtomicBool,
    pipeline: &PipelineArgs,
    json: bool,
) -> Result<u8> {
    use pipe_engine::slurm::Queued;
    let queued = pipe_engine::slurm::submit_all(plan, store, opts, cancel);
    let (mut submitted, mut adopted, mut cached, mut failed) = (0, 0, 0, 0);
    let mut nodes = Vec::new();
    for ((n, s), q) in plan.graph.nodes.iter().zip(&plan.status).zip(&queued) {
        let (status, job, error) = match q {
            None => (s.as_str(), None, None),
            Some(Ok(Queued::Cached)) => {
                cached += 1;
                ("cached", None, None)
            }
            Some(Ok(Queued::Adopted(id))) => {
                adopted += 1;
                eprintln!(
                    "queued: {} (Slurm job {id}, submitted by another run)",
                    n.id
                );
                ("queued", Some(id.clone()), None)
            }
            Some(Ok(Queued::Submitted(id))) => {
                submitted += 1;
                eprintln!("queued: {} (Slurm job {id})", n.id);
                ("queued", Some(id.clone()), None)
            }
            Some(Err(e)) => {
                failed += 1;
                eprintln!("failed: {}: {e}", n.id);
                ("failed", None, Some(e.clone()))
            }
        };
        if json {
            let mut v = json!({
                "id": n.id, "stage": n.stages.first(), "key": n.key.to_string(),
                "status": status,
            });
            if let Some(id) = job {
                v["job"] = json!(id);
            }
            if let Some(e) = error {
                v["error"] = json!(e);
            }
            nodes.push(v);
        }
    }
    if json {
        let doc = json!({
            "pipeline": plan.graph.pipeline.name, "nodes": nodes,
            "submitted": submitted, "adopted": adopted, "cached": cached + plan.counts().0,
            "failed": failed,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    eprintln!(
        "pipe: {} queued ({submitted} submitted now, {adopted} already queued), {failed} not \
         submitted; `pipe run {} --executor slurm` waits for them and reports",
        submitted + adopted,
        pipeline.file.display()
    );
    Ok(if cancel.load(std::sync::atomic::Ordering::Relaxed) {
        crate::signals::exit_code()
    } else if failed > 0 {
        crate::commands::EXIT_FAILED
    } else {
        0
    })
}
