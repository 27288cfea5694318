//! The subcommands.

use std::collections::BTreeSet;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use pipe_cache::Store;
use pipe_engine::{
    Error as EngineError, Observer, OnCorrupt, Outcome, Overrides, Plan, Registry, RunOptions,
    StatCache, Status,
};
use serde_json::{Value, json};

use crate::{Cli, Command, PipelineArgs};

/// Every stage kind this binary knows.
pub fn registry() -> Registry {
    let mut reg = Registry::new();
    pipe_stages::register_all(&mut reg);
    reg
}

/// Exit code for a spec / usage / store error, printed here (not through anyhow) so every
/// spec error stands on its own line.
const EXIT_USAGE: u8 = 2;
pub const EXIT_FAILED: u8 = 1;

pub fn dispatch(cli: Cli) -> Result<u8> {
    let store_path = cli.store.clone();
    // a bad value would change what `device: auto` means in keys: refuse it up front
    pipe_stages::device::auto_override().map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Exec { key } => crate::slurm::exec(&store_path, &key),
        Command::Run {
            pipeline,
            targets,
            jobs,
            gpus,
            keep_going,
            json,
            no_progress,
            no_recompute,
            executor,
            sbatch_args,
            slurm_poll,
            detach,
        } => {
            if detach && executor != crate::ExecutorArg::Slurm {
                anyhow::bail!("--detach is for `--executor slurm`");
            }
            let store = open_store(&store_path)?;
            let _lock = store.lock_shared()?;
            let cancel = crate::signals::install();
            let Some(plan) = load_plan(&pipeline, &store, &targets)? else {
                return Ok(EXIT_USAGE);
            };
            // re-hash what the run will read; a damaged entry is moved aside and recomputed
            let on_corrupt = if no_recompute {
                OnCorrupt::Fail
            } else {
                OnCorrupt::Recompute
            };
            let cancelled = || cancel.load(Ordering::Relaxed);
            let (plan, _moved) = pipe_engine::integrity::check_inputs(
                plan, &store, &targets, on_corrupt, &cancelled,
            )?;
            let mut opts = RunOptions {
                gpus,
                keep_going,
                ..RunOptions::default()
            };
            if executor == crate::ExecutorArg::Slurm {
                // nodes whose `device: auto` the submitting machine resolves for the compute nodes
                let auto = plan.graph.nodes.iter().zip(&plan.status).any(|(n, s)| {
                    matches!(s, Status::Run(_)) && n.params.get("device") == Some(&json!("auto"))
                });
                opts.executor =
                    crate::slurm::executor(&pipeline, &store, sbatch_args, slurm_poll, auto)?;
                opts.jobs = crate::slurm::DEFAULT_JOBS;
            } else if !sbatch_args.is_empty() {
                anyhow::bail!("--sbatch-arg is for `--executor slurm`");
            }
            if let Some(j) = jobs {
                opts.jobs = j.max(1);
            }
            if let (true, pipe_engine::Executor::Slurm(slurm)) = (detach, &opts.executor) {
                return crate::slurm::detach(&plan, &store, slurm, cancel, &pipeline, json);
            }
            let reg = registry();
            let mut observer: Box<dyn Observer> = if !no_progress && std::io::stderr().is_terminal()
            {
                Box::new(crate::progress::Bars::new())
            } else {
                Box::new(crate::progress::Lines::default())
            };
            let summary =
                pipe_engine::exec::run(&plan, &reg, &store, &opts, cancel, observer.as_mut());
            drop(observer);
            let (ran, cached, failed, skipped) = (
                summary.count("ran"),
                summary.count("cached"),
                summary.count("failed"),
                summary.count("skipped"),
            );
            if json {
                let nodes: Vec<Value> = plan
                    .graph
                    .nodes
                    .iter()
                    .zip(&summary.results)
                    .map(|(n, r)| {
                        let mut v = json!({
                            "id": n.id,
                            "stage": n.stages.first(),
                            "key": n.key.to_string(),
                            "status": r.outcome.as_str(),
                            "seconds": r.seconds,
                        });
                        if !n.aliases.is_empty() {
                            v["aliases"] = json!(n.aliases);
                        }
                        if let Outcome::Failed(m) = &r.outcome {
                            v["error"] = json!(m);
                        }
                        v
                    })
                    .collect();
                let doc = json!({
                    "pipeline": plan.graph.pipeline.name,
                    "nodes": nodes,
                    "ran": ran, "cached": cached, "failed": failed, "skipped": skipped,
                    "interrupted": summary.interrupted,
                });
                // the run is done: a reader that has gone loses the document, not the run
                let _ = writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&doc)?);
            }
            say!(
                "pipe: {ran} ran, {cached} cached, {failed} failed, {skipped} skipped{}",
                if summary.interrupted {
                    " (interrupted)"
                } else {
                    ""
                }
            );
            for (n, r) in plan.graph.nodes.iter().zip(&summary.results) {
                if let Outcome::Failed(m) = &r.outcome {
                    say!(
                        "failed: {}: {m}\n  (full log: pipe log {} {})",
                        n.id,
                        pipeline.file.display(),
                        n.id
                    );
                }
            }
            Ok(if summary.interrupted {
                crate::signals::exit_code()
            } else if summary.failed() {
                EXIT_FAILED
            } else {
                0
            })
        }
        Command::Plan {
            pipeline,
            targets,
            json,
        } => {
            let store = open_store_to_read(&store_path)?;
            let _lock = store.lock_shared()?;
            let Some(plan) = load_plan(&pipeline, &store, &targets)? else {
                return Ok(EXIT_USAGE);
            };
            let (cached, to_run, not_needed) = plan.counts();
            // a shell node runs arbitrary commands: plan shows each before anything runs
            let shell_command = |n: &pipe_engine::Node| -> Option<String> {
                let cmd = n.params.get("cmd").and_then(Value::as_str)?;
                (n.kind == "shell").then(|| cmd.to_string())
            };
            if json {
                let nodes: Vec<Value> = plan
                    .graph
                    .nodes
                    .iter()
                    .zip(&plan.status)
                    .map(|(n, s)| {
                        let mut v = json!({
                            "id": n.id, "stage": n.stages.first(), "key": n.key.to_string(),
                            "status": s.as_str(), "seconds": Value::Null,
                        });
                        if let Status::Run(r) = s {
                            v["reason"] = json!(r.to_string());
                            if let Some((id, when)) = slurm_job(&store, n) {
                                v["slurm_job"] = json!({"id": id, "submitted": when});
                            }
                            if let Some(r) = resume_point(&store, n) {
                                v["resumes"] = json!(r);
                            }
                        }
                        if !n.aliases.is_empty() {
                            v["aliases"] = json!(n.aliases);
                        }
                        // whatever its status, so scripts can audit every command
                        if let Some(cmd) = shell_command(n) {
                            v["command"] = json!(cmd);
                        }
                        v
                    })
                    .collect();
                let doc = json!({
                    "pipeline": plan.graph.pipeline.name, "nodes": nodes,
                    "cached": cached, "to_run": to_run, "not_needed": not_needed,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                let width = plan
                    .graph
                    .nodes
                    .iter()
                    .map(|n| n.id.len())
                    .max()
                    .unwrap_or(0);
                for (n, s) in plan.graph.nodes.iter().zip(&plan.status) {
                    let why = match s {
                        Status::Run(r) => {
                            let mut why = r.to_string();
                            if let Some(res) = resume_point(&store, n) {
                                why.push_str(&format!("; resumes from {res}"));
                            }
                            if let Some((id, when)) = slurm_job(&store, n) {
                                why.push_str(&format!("; Slurm job {id} submitted {when}"));
                            }
                            format!("  ({why})")
                        }
                        _ => String::new(),
                    };
                    println!(
                        "{:<10} {:<width$}  {}{why}",
                        s.as_str(),
                        n.id,
                        n.key.short()
                    );
                    // the command a shell node would run, every line of it, before it runs
                    if let (Status::Run(_), Some(cmd)) = (s, shell_command(n)) {
                        for (i, line) in cmd.lines().enumerate() {
                            println!("{:>12} {line}", if i == 0 { "$" } else { "" });
                        }
                    }
                }
                println!("{to_run} to run, {cached} cached, {not_needed} not needed");
            }
            Ok(0)
        }
        Command::Show {
            pipeline,
            stage,
            json,
        } => {
            let store = open_store_to_read(&store_path)?;
            let Some(plan) = load_plan(&pipeline, &store, &[])? else {
                return Ok(EXIT_USAGE);
            };
            let selected: Vec<usize> = match &stage {
                Some(s) => {
                    let sel = plan.graph.select(s);
                    if sel.is_empty() {
                        anyhow::bail!("no stage or node `{s}` in {}", pipeline.file.display());
                    }
                    sel
                }
                None => (0..plan.graph.nodes.len()).collect(),
            };
            let mut rows = Vec::new();
            for i in selected {
                let n = &plan.graph.nodes[i];
                let entry = store.get(n.key.key())?;
                let status = if entry.is_some() {
                    "cached"
                } else if store.failed_log(n.key.key()).is_some() {
                    "failed"
                } else {
                    "missing"
                };
                // A report's table, printed as Markdown under its row.
                let table = entry.as_ref().and_then(|e| {
                    e.file("table.md")
                        .ok()
                        .and_then(|p| std::fs::read_to_string(p).ok())
                });
                let metrics = entry.as_ref().and_then(|e| {
                    e.file("metrics.json")
                        .ok()
                        .and_then(|p| std::fs::read(p).ok())
                        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                });
                rows.push(json!({
                    "id": n.id,
                    "stage": n.stages.first(),
                    "key": n.key.to_string(),
                    "status": status,
                    "seconds": entry.as_ref().map(|e| e.manifest.meta.seconds),
                    "metrics": metrics,
                    "path": entry.as_ref().map(|e| e.dir.display().to_string()),
                    "params": n.params,
                    "table": table,
                }));
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({ "pipeline": plan.graph.pipeline.name, "nodes": rows })
                    )?
                );
            } else {
                for r in &rows {
                    let secs = r["seconds"]
                        .as_f64()
                        .map(|s| format!("{s:.2}s"))
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<8} {}  {}  {}",
                        r["status"].as_str().unwrap_or_default(),
                        r["id"].as_str().unwrap_or_default(),
                        &r["key"].as_str().unwrap_or_default()[..12],
                        secs
                    );
                    if let Some(m) = r["metrics"].as_object() {
                        for (k, v) in m {
                            println!("           {k} = {v}");
                        }
                    }
                    if let Some(t) = r["table"].as_str() {
                        println!("\n{t}");
                    }
                }
            }
            Ok(0)
        }
        Command::Log { pipeline, stage } => {
            let store = open_store_to_read(&store_path)?;
            let Some(plan) = load_plan(&pipeline, &store, &[])? else {
                return Ok(EXIT_USAGE);
            };
            let sel = plan.graph.select(&stage);
            if sel.is_empty() {
                anyhow::bail!("no stage or node `{stage}` in {}", pipeline.file.display());
            }
            let many = sel.len() > 1;
            for i in sel {
                let n = &plan.graph.nodes[i];
                if many {
                    println!("==> {} <==", n.id);
                }
                if let Some(e) = store.get(n.key.key())? {
                    let p = e.file(pipe_engine::stage::LOG_FILE)?;
                    print!(
                        "{}",
                        std::fs::read_to_string(&p)
                            .with_context(|| format!("reading {}", p.display()))?
                    );
                } else if let Some(p) = store.failed_log(n.key.key()) {
                    println!("(last attempt failed)");
                    print!(
                        "{}",
                        std::fs::read_to_string(&p)
                            .with_context(|| format!("reading {}", p.display()))?
                    );
                } else {
                    println!("(no log: {} has not run)", n.id);
                }
            }
            Ok(0)
        }
        Command::Gc {
            files,
            dry_run,
            unfinished,
        } => {
            let store = open_store(&store_path)?;
            let reg = registry();
            let mut keep = BTreeSet::new();
            let mut from_record = Vec::new();
            for f in &files {
                let mut stats = StatCache::open(store.root().join("statcache.json"));
                let p = match pipe_engine::spec::load_with(
                    f,
                    &reg,
                    &Overrides::default(),
                    &mut stats,
                ) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return Ok(EXIT_USAGE);
                    }
                };
                let g = pipe_engine::graph::build(p, &reg);
                keep.extend(g.nodes.iter().map(|n| *n.key.key()));
                // A key also depends on the environment (what `device: auto` resolves to,
                // PIPE_CUDA_MATH, PIPE_KERNELS, `${VAR}` in paths): the node ids of the file
                // keep the keys its last run gave them, so a gc from another shell or machine
                // (a Slurm login node, the CPU build on a GPU store) removes nothing it made.
                let record = pipe_engine::record::RunRecord::load(&store, f);
                for n in &g.nodes {
                    for id in n.ids() {
                        if let Some(r) = record.nodes.get(id)
                            && r.key.key() != n.key.key()
                            && keep.insert(*r.key.key())
                        {
                            from_record.push((f.display().to_string(), *r.key.key()));
                        }
                    }
                }
            }
            from_record.retain(|(_, k)| store.contains(k));
            if !from_record.is_empty() {
                let mut files: Vec<&str> = from_record.iter().map(|(f, _)| f.as_str()).collect();
                files.dedup();
                println!(
                    "kept {} entries that the last run of {} made under other keys than it expands \
                     to here (another device, PIPE_CUDA_MATH, PIPE_KERNELS or `${{VAR}}` value, or an \
                     edit since): a run in this environment, then gc, removes what it no longer uses",
                    from_record.len(),
                    files.join(", ")
                );
            }
            let report = store.gc_unfinished(&keep, dry_run, unfinished)?;
            let mb = report.freed_bytes as f64 / 1e6;
            if dry_run {
                for k in &report.removed {
                    println!("would remove {k}");
                }
                println!(
                    "would remove {} entries ({mb:.1} MB), keep {}",
                    report.removed.len(),
                    report.kept
                );
            } else {
                println!(
                    "removed {} entries ({mb:.1} MB) and {} staging folders, kept {}",
                    report.removed.len(),
                    report.tmp_removed,
                    report.kept
                );
            }
            if report.jobs_removed > 0 {
                let verb = if dry_run { "would remove" } else { "removed" };
                println!(
                    "{verb} {} Slurm job files of nodes that are done or no longer wanted",
                    report.jobs_removed
                );
            }
            if report.unfinished_scratch > 0 {
                let mb = report.unfinished_scratch_bytes as f64 / 1e6;
                let n = report.unfinished_scratch;
                if unfinished {
                    let verb = if dry_run { "would remove" } else { "removed" };
                    println!(
                        "{verb} the resumable work of {n} unfinished nodes none of these pipelines has ({mb:.1} MB)"
                    );
                } else {
                    println!(
                        "kept the resumable work of {n} unfinished nodes none of these pipelines has ({mb:.1} MB); `--unfinished` removes it"
                    );
                }
            }
            if report.corrupt_removed > 0 {
                let verb = if dry_run { "would remove" } else { "removed" };
                println!(
                    "{verb} {} damaged entries set aside in {}",
                    report.corrupt_removed,
                    store.root().join("corrupt").display()
                );
            }
            Ok(0)
        }
        Command::Verify { json } => {
            let store = open_store_to_read(&store_path)?;
            let _lock = store.lock_shared()?;
            let n = store.keys()?.len();
            let problems = store.verify(None)?;
            if json {
                let list: Vec<Value> = problems
                    .iter()
                    .map(|p| json!({"key": p.key().to_string(), "file": p.file(), "problem": p.to_string()}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"entries": n, "problems": list}))?
                );
            } else {
                for p in &problems {
                    println!("{p}");
                }
                println!("{n} entries checked, {} problem(s)", problems.len());
            }
            Ok(if problems.is_empty() { 0 } else { EXIT_FAILED })
        }
        Command::Devices { json } => crate::devices::run(json),
        Command::Bench { what } => crate::bench::run(what),
    }
}

pub(crate) fn open_store(path: &Path) -> Result<Store> {
    Store::open(path).with_context(|| format!("cannot open the store at {}", path.display()))
}

/// The store for a command that only reads it (`plan`, `show`, `log`, `verify`): opened as
/// usual, or, when it exists but cannot be written (a read-only mount, another user's folder),
/// read-only.
fn open_store_to_read(path: &Path) -> Result<Store> {
    let writable = Store::open(path);
    let unwritable = matches!(
        &writable,
        Err(pipe_cache::StoreError::Io { cause, .. })
            if matches!(
                cause.kind(),
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
            )
    );
    if unwritable && let Ok(store) = Store::open_read_only(path) {
        tracing::info!(
            "the store at {} cannot be written: opened read-only",
            path.display()
        );
        return Ok(store);
    }
    writable.with_context(|| format!("cannot open the store at {}", path.display()))
}

/// Loads, expands and plans a pipeline; prints spec errors and returns None on them.
pub fn load_plan(args: &PipelineArgs, store: &Store, targets: &[String]) -> Result<Option<Plan>> {
    let reg = registry();
    let mut ov = Overrides::default();
    for s in &args.set {
        ov.add_set(s)?;
    }
    for s in &args.sweep {
        ov.add_sweep(s)?;
    }
    let mut stats = StatCache::open(store.root().join("statcache.json"));
    let loaded = pipe_engine::spec::load_with(&args.file, &reg, &ov, &mut stats);
    stats.save();
    let pipeline = match loaded {
        Ok(p) => p,
        Err(EngineError::Spec(errors)) => {
            eprintln!("error: {errors}");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let graph = pipe_engine::graph::build(pipeline, &reg);
    Ok(Some(pipe_engine::plan::plan(graph, store, targets)?))
}

/// The Slurm job a `pipe run --executor slurm` submitted for `node` (its job file in the
/// store): id and submission time. A file read, no `squeue`: the job may have ended since.
fn slurm_job(store: &pipe_cache::Store, node: &pipe_engine::Node) -> Option<(String, String)> {
    let path = pipe_engine::slurm::job_file(store, node.key.key());
    let job: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some((
        job["job_id"].as_str()?.to_string(),
        job["submitted"]
            .as_str()
            .unwrap_or("at an unknown time")
            .to_string(),
    ))
}

/// What an interrupted run of `node` left to resume from in its scratch folder: a training
/// state (where it stopped, from the state's header and one small record) or journaled
/// batches (`evaluate`, `attack_dataset`, SLF's feature pass; from folder listings).
fn resume_point(store: &pipe_cache::Store, node: &pipe_engine::Node) -> Option<String> {
    let dir = store.scratch_path(node.key.key());
    let mut what = Vec::new();
    let state = dir.join(pipe_stages::nn::checkpoint::STATE_FILE);
    if state.is_file() {
        what.push(
            match pipe_stages::nn::checkpoint::read_resume_point(&state) {
                Some(at) => format!("its saved training state ({at})"),
                None => "its saved training state".to_string(),
            },
        );
    }
    let batches: usize = std::fs::read_dir(dir.join("journal"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|part| std::fs::read_dir(part.path()).ok())
        .map(|files| {
            files
                .flatten()
                .filter(|f| f.file_name().to_string_lossy().ends_with(".safetensors"))
                .count()
        })
        .sum();
    if batches > 0 {
        what.push(format!(
            "{batches} finished batch{} in its journal",
            if batches == 1 { "" } else { "es" }
        ));
    }
    (!what.is_empty()).then(|| what.join(" and "))
}
