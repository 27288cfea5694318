//! Execution: a coordinator that owns all state and worker threads that run stages.
//!
//! The coordinator (this thread) keeps the ready set (nodes whose inputs are all available,
//! started in topological order, ties by index, so runs are deterministic), the free CPU slots
//! (`-j`) and GPU tokens (`--gpus`), and the results. Workers are scoped threads, one per
//! running node; they report through a channel (`Msg`), as cargo's job queue does. Cached
//! nodes never take a worker.
//!
//! A worker takes the node's key lock ([`Store::begin`]): if another `pipe run` committed the
//! key meanwhile the node counts as cached, so concurrent runs compute each key once. The worker
//! then re-hashes every input entry not already checked in this run ([`crate::integrity`]), so a
//! stage never reads damaged bytes; the stage fills a staging folder, the engine checks the
//! declared outputs and commits; a failed, panicking or interrupted stage never becomes an entry
//! (its log is kept in the store's `failed/`). On failure the coordinator stops starting nodes and lets running ones finish
//! (`--keep-going`: it skips only the failed node's dependents). On cancel (Ctrl-C) running
//! stages see [`StageCtx::is_cancelled`](crate::StageCtx::is_cancelled) and stop; finished nodes
//! stay committed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pipe_cache::{Begin, ManifestMeta, Store, now_rfc3339};

use crate::integrity::Intact;
use crate::plan::{Plan, Status};
use crate::record::RunRecord;
use crate::registry::Registry;
use crate::stage::{LOG_FILE, StageCtx, StageEvent};

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Parallel nodes (CPU slots).
    pub jobs: usize,
    /// GPU tokens: nodes that claim a GPU run at most this many at once.
    pub gpus: usize,
    /// Run independent branches after a failure.
    pub keep_going: bool,
    /// Recorded in manifests.
    pub pipe_version: String,
    /// Where nodes run: in this process, or as Slurm jobs.
    pub executor: Executor,
}

/// Where the nodes of a run are computed.
#[derive(Clone, Debug, Default)]
pub enum Executor {
    /// On worker threads of this process.
    #[default]
    Local,
    /// One Slurm job per node running `pipe exec NODE_KEY` ([`crate::slurm`]); `--gpus` does
    /// not apply (Slurm allocates the GPUs).
    Slurm(crate::slurm::SlurmOptions),
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1),
            gpus: 1,
            keep_going: false,
            pipe_version: env!("CARGO_PKG_VERSION").to_string(),
            executor: Executor::Local,
        }
    }
}

/// How a node ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Already in the store (at plan time, or committed by a concurrent run).
    Cached,
    /// Ran and committed.
    Ran,
    /// Failed (message with its causes).
    Failed(String),
    /// Not started: a dependency failed, or the run stopped.
    Skipped,
    /// Not needed by any target.
    NotNeeded,
}

impl Outcome {
    /// `cached`, `ran`, `failed`, `skipped`, `not-needed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Cached => "cached",
            Outcome::Ran => "ran",
            Outcome::Failed(_) => "failed",
            Outcome::Skipped => "skipped",
            Outcome::NotNeeded => "not-needed",
        }
    }
}

/// Result of one node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeResult {
    /// How it ended.
    pub outcome: Outcome,
    /// Wall seconds spent on it in this run (0 for cached).
    pub seconds: f64,
}

/// What the run reports as it goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The run starts.
    Start {
        /// Nodes that will run.
        to_run: usize,
        /// Nodes already cached.
        cached: usize,
    },
    /// A node starts.
    Started(usize),
    /// A node waits for another process holding its key lock.
    Waiting(usize, Option<u32>),
    /// A node reports progress or a log line.
    Stage(usize, StageEvent),
    /// A node ended.
    Finished(usize, NodeResult),
}

/// Receives [`Event`]s on the coordinator thread (the CLI draws progress bars; tests record).
pub trait Observer {
    /// Called for each event.
    fn event(&mut self, plan: &Plan, event: &Event);
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {
    fn event(&mut self, _: &Plan, _: &Event) {}
}

/// The outcome of a run.
#[derive(Clone, Debug)]
pub struct Summary {
    /// One result per node.
    pub results: Vec<NodeResult>,
    /// Whether the run was cancelled.
    pub interrupted: bool,
}

impl Summary {
    /// Number of nodes with `outcome` (compared by kind).
    pub fn count(&self, what: &str) -> usize {
        self.results
            .iter()
            .filter(|r| r.outcome.as_str() == what)
            .count()
    }
    /// Whether any node failed.
    pub fn failed(&self) -> bool {
        self.count("failed") > 0
    }
}

enum Msg {
    Event(Event),
    Done(NodeResult),
}

/// This machine's host name (recorded in manifests).
pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".into()
    }
}

/// Runs every node of `plan` that must run. Never panics on a stage panic.
pub fn run(
    plan: &Plan,
    registry: &Registry,
    store: &Store,
    opts: &RunOptions,
    cancel: &AtomicBool,
    observer: &mut dyn Observer,
) -> Summary {
    let nodes = &plan.graph.nodes;
    let n = nodes.len();
    let users = plan.graph.consumers();
    let mut results: Vec<Option<NodeResult>> = vec![None; n];
    let mut waiting_on = vec![0usize; n];
    let mut ready = BTreeSet::new();
    let (mut cached, mut to_run) = (0, 0);
    for i in 0..n {
        match plan.status[i] {
            Status::Cached => {
                cached += 1;
                results[i] = Some(NodeResult {
                    outcome: Outcome::Cached,
                    seconds: 0.0,
                });
            }
            Status::NotNeeded => {
                results[i] = Some(NodeResult {
                    outcome: Outcome::NotNeeded,
                    seconds: 0.0,
                })
            }
            Status::Run(_) => {
                to_run += 1;
                let mut deps: Vec<usize> = nodes[i].inputs.values().flatten().copied().collect();
                deps.sort_unstable();
                deps.dedup();
                waiting_on[i] = deps
                    .iter()
                    .filter(|&&j| matches!(plan.status[j], Status::Run(_)))
                    .count();
                if waiting_on[i] == 0 {
                    ready.insert(i);
                }
            }
        }
    }
    observer.event(plan, &Event::Start { to_run, cached });

    let jobs = opts.jobs.max(1);
    let (mut free_jobs, mut free_gpus) = (jobs, opts.gpus);
    let mut running = 0usize;
    let mut stop = false;
    let host = host();
    let intact = Intact::new(&plan.checked);
    let intact = &intact;
    let queue = crate::slurm::Queue::default();
    let queue = &queue;
    let (tx, rx) = mpsc::channel::<(usize, Msg)>();
    std::thread::scope(|scope| {
        loop {
            if cancel.load(Ordering::Relaxed) {
                stop = true;
            }
            if !stop {
                let candidates: Vec<usize> = ready.iter().copied().collect();
                for i in candidates {
                    if free_jobs == 0 {
                        break;
                    }
                    // Slurm hands out the GPUs of Slurm jobs
                    let gpu = nodes[i].resources.gpu && matches!(opts.executor, Executor::Local);
                    // with no GPU tokens at all the node starts and fails at once (below) rather
                    // than waiting forever
                    let no_gpus = gpu && opts.gpus == 0;
                    if gpu && !no_gpus && free_gpus == 0 {
                        continue;
                    }
                    ready.remove(&i);
                    free_jobs -= 1;
                    if gpu && !no_gpus {
                        free_gpus -= 1;
                    }
                    running += 1;
                    observer.event(plan, &Event::Started(i));
                    let tx = tx.clone();
                    let host = host.clone();
                    scope.spawn(move || {
                        let t0 = Instant::now();
                        let report = |e: StageEvent| {
                            let _ = tx.send((i, Msg::Event(Event::Stage(i, e))));
                        };
                        let on_wait = &mut |pid| {
                            let _ = tx.send((i, Msg::Event(Event::Waiting(i, pid))));
                        };
                        let outcome = if let Executor::Slurm(slurm) = &opts.executor {
                            match crate::slurm::run_node(
                                slurm, queue, store, &nodes[i], cancel, &report,
                            ) {
                                Ok(o) => o,
                                Err(_) if cancel.load(Ordering::Relaxed) => Outcome::Skipped,
                                Err(msg) => Outcome::Failed(msg),
                            }
                        } else if no_gpus {
                            Outcome::Failed("the node needs a GPU but --gpus is 0".into())
                        } else {
                            match run_node(
                                plan, i, registry, store, opts, cancel, &host, &report, on_wait,
                                intact,
                            ) {
                                Ok(o) => o,
                                // stopped by Ctrl-C: discarded, not a failure of the node
                                Err(_) if cancel.load(Ordering::Relaxed) => Outcome::Skipped,
                                Err(msg) => Outcome::Failed(msg),
                            }
                        };
                        let _ = tx.send((
                            i,
                            Msg::Done(NodeResult {
                                outcome,
                                seconds: t0.elapsed().as_secs_f64(),
                            }),
                        ));
                    });
                }
            }
            if running == 0 && (stop || ready.is_empty()) {
                break;
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok((_, Msg::Event(e))) => observer.event(plan, &e),
                Ok((i, Msg::Done(r))) => {
                    running -= 1;
                    free_jobs += 1;
                    if nodes[i].resources.gpu
                        && opts.gpus > 0
                        && matches!(opts.executor, Executor::Local)
                    {
                        free_gpus += 1;
                    }
                    match &r.outcome {
                        Outcome::Failed(_) => {
                            if opts.keep_going {
                                skip_dependents(
                                    i,
                                    &users,
                                    &mut results,
                                    &mut ready,
                                    plan,
                                    observer,
                                );
                            } else {
                                stop = true;
                            }
                        }
                        _ => {
                            for &u in &users[i] {
                                if matches!(plan.status[u], Status::Run(_)) && results[u].is_none()
                                {
                                    waiting_on[u] -= 1;
                                    if waiting_on[u] == 0 {
                                        ready.insert(u);
                                    }
                                }
                            }
                        }
                    }
                    observer.event(plan, &Event::Finished(i, r.clone()));
                    results[i] = Some(r);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    });
    let results: Vec<NodeResult> = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| {
                let r = NodeResult {
                    outcome: Outcome::Skipped,
                    seconds: 0.0,
                };
                observer.event(plan, &Event::Finished(i, r.clone()));
                r
            })
        })
        .collect();
    if let Err(e) = RunRecord::of(&plan.graph).save(store) {
        tracing::warn!("could not save the run record: {e}");
    }
    Summary {
        results,
        interrupted: cancel.load(Ordering::Relaxed),
    }
}

/// Runs node `i` of `plan` in this process, as a worker of [`run`] would (`pipe exec` on a
/// Slurm node): its inputs must be committed already. Stage events go to `report`.
///
/// # Errors
/// Why the node failed or was interrupted (nothing is committed then).
pub fn run_one(
    plan: &Plan,
    i: usize,
    registry: &Registry,
    store: &Store,
    opts: &RunOptions,
    cancel: &AtomicBool,
    report: &(dyn Fn(StageEvent) + Sync),
) -> Result<Outcome, String> {
    let intact = Intact::new(&BTreeSet::new());
    run_node(
        plan,
        i,
        registry,
        store,
        opts,
        cancel,
        &host(),
        report,
        &mut |pid| {
            report(StageEvent::Log(match pid {
                Some(p) => format!("waiting for the key lock held by pid {p}"),
                None => "waiting for the key lock".into(),
            }))
        },
        &intact,
    )
}

fn skip_dependents(
    failed: usize,
    users: &[Vec<usize>],
    results: &mut [Option<NodeResult>],
    ready: &mut BTreeSet<usize>,
    plan: &Plan,
    observer: &mut dyn Observer,
) {
    let mut stack = users[failed].clone();
    while let Some(u) = stack.pop() {
        if results[u].is_some() {
            continue;
        }
        ready.remove(&u);
        let r = NodeResult {
            outcome: Outcome::Skipped,
            seconds: 0.0,
        };
        observer.event(plan, &Event::Finished(u, r.clone()));
        results[u] = Some(r);
        stack.extend(users[u].iter().copied());
    }
}

#[allow(clippy::too_many_arguments)]
fn run_node(
    plan: &Plan,
    i: usize,
    registry: &Registry,
    store: &Store,
    opts: &RunOptions,
    cancel: &AtomicBool,
    host: &str,
    report: &(dyn Fn(StageEvent) + Sync),
    on_wait: &mut dyn FnMut(Option<u32>),
    intact: &Intact,
) -> Result<Outcome, String> {
    let node = &plan.graph.nodes[i];
    let kind = registry
        .get(&node.kind)
        .ok_or_else(|| format!("unknown kind `{}`", node.kind))?;
    let mut inputs = BTreeMap::new();
    let mut input_keys = BTreeMap::new();
    for (slot, ins) in &node.inputs {
        let mut arts = Vec::new();
        for &j in ins {
            let up = &plan.graph.nodes[j];
            let entry = store
                .get(up.key.key())
                .map_err(|e| format!("input `{slot}` ({}): {e}", up.id))?
                .ok_or_else(|| format!("input `{slot}` ({}) is missing from the store", up.id))?;
            arts.push(entry);
        }
        input_keys.insert(
            slot.clone(),
            ins.iter()
                .map(|&j| *plan.graph.nodes[j].key.key())
                .collect(),
        );
        inputs.insert(slot.clone(), arts);
    }
    let cancelled = || cancel.load(Ordering::Relaxed);
    let pending = match store.begin(node.key.key(), &cancelled, on_wait) {
        Ok(Begin::Cached(_)) => return Ok(Outcome::Cached),
        Ok(Begin::Pending(p)) => p,
        Err(pipe_cache::StoreError::Cancelled) => {
            return Err("interrupted while waiting for its lock".into());
        }
        Err(e) => return Err(e.to_string()),
    };
    // never hand a stage bytes that differ from its input's manifest (most inputs were checked
    // before the run started; this catches entries other runs committed meanwhile)
    for (slot, arts) in &inputs {
        for art in arts {
            intact.ensure(store, &art.key).map_err(|problems| {
                format!(
                    "input `{slot}` is damaged, not running the stage on it: {problems} \
                     (run again to move the entry aside and recompute it)"
                )
            })?;
        }
    }
    let input_keys_read: Vec<(String, pipe_cache::Key)> = inputs
        .iter()
        .flat_map(|(slot, arts)| arts.iter().map(move |a| (slot.clone(), a.key)))
        .collect();
    let log_path = pending.dir().join(LOG_FILE);
    let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let scratch = store
        .scratch_dir(node.key.key())
        .map_err(|e| e.to_string())?;
    let started = now_rfc3339();
    let t0 = Instant::now();
    tracing::info!(node = %node.id, key = %node.key.short(), "start");
    let mut ctx = StageCtx {
        node: &node.id,
        key: node.key,
        out: pending.dir(),
        scratch,
        pipeline_dir: &plan.graph.pipeline.dir,
        inputs,
        cancel,
        report,
        log: Mutex::new(log),
        store,
        intact,
    };
    let result = catch_unwind(AssertUnwindSafe(|| kind.run(&node.params, &mut ctx)));
    drop(ctx);
    // a user's command gets its inputs' folders: it must not have changed them (its output
    // would rest on bytes no manifest describes, and so would every later reader's)
    let result = match result {
        Ok(Ok(())) if kind.runs_user_code() => {
            Ok(inputs_unchanged(store, intact, &input_keys_read, cancel))
        }
        other => other,
    };
    let failure = match result {
        Ok(Ok(())) => {
            let missing: Vec<&str> = node
                .outputs
                .iter()
                .map(String::as_str)
                .filter(|f| !pending.dir().join(f).is_file())
                .collect();
            if missing.is_empty() {
                None
            } else {
                Some(format!(
                    "the stage did not write its declared output(s): {}",
                    missing.join(", ")
                ))
            }
        }
        Ok(Err(e)) => {
            let msg = error_chain(e.as_ref());
            Some(match kind.explain_failure(&node.params, &msg) {
                Some(hint) => format!("{msg}\n  hint: {hint}"),
                None => msg,
            })
        }
        Err(p) => Some(format!("panicked: {}", panic_message(p.as_ref()))),
    };
    if let Some(msg) = failure {
        // an interrupted node did not fail: keep no failed log, so the next plan says
        // "not in the store" rather than "failed last time"
        if !cancelled() {
            let mut text = std::fs::read_to_string(&log_path).unwrap_or_default();
            text.push_str(&format!("\nerror: {msg}\n"));
            // the staging folder's files go first (the key lock stays held): on a full disk
            // they are what filled it, and the failed log must still find room
            let _ = std::fs::remove_dir_all(pending.dir());
            let _ = store.save_failed_log(node.key.key(), &text);
        }
        tracing::info!(node = %node.id, "failed: {msg}");
        return Err(msg);
    }
    let meta = ManifestMeta {
        kind: node.kind.clone(),
        version: node.version,
        node: node.id.clone(),
        params: node.params.clone(),
        inputs: input_keys,
        external: node.external.clone(),
        started,
        finished: now_rfc3339(),
        seconds: t0.elapsed().as_secs_f64(),
        host: host.to_string(),
        pipe_version: opts.pipe_version.clone(),
        extra: BTreeMap::new(),
    };
    let entry = pending
        .commit(meta)
        .map_err(|e| format!("commit failed: {e}"))?;
    intact.insert(entry.key);
    tracing::info!(node = %node.id, seconds = t0.elapsed().as_secs_f64(), "done");
    Ok(Outcome::Ran)
}

/// `Ok` when every input entry of a finished user command still matches its manifest; else
/// the error naming the input, with the entry set aside (`corrupt/`) so the next run
/// recomputes it.
fn inputs_unchanged(
    store: &Store,
    intact: &Intact,
    inputs: &[(String, pipe_cache::Key)],
    cancel: &AtomicBool,
) -> Result<(), crate::BoxError> {
    for (slot, key) in inputs {
        intact.forget(key);
        if let Err(problems) = intact.ensure(store, key) {
            let cancelled = || cancel.load(Ordering::Relaxed);
            let aside = match store.quarantine(key, &cancelled) {
                Ok(Some(p)) => format!("; it is set aside in {}", p.display()),
                _ => String::new(),
            };
            return Err(format!(
                "the command changed its input `{slot}` ({problems}): a stage's inputs are \
                 read-only (write into $PIPE_OUT){aside}, and the next run recomputes it"
            )
            .into());
        }
    }
    Ok(())
}
