//! The Slurm executor: every node that must run becomes one `sbatch` job running
//! `pipe exec NODE_KEY` on a compute node; the store sits on a file system both see.
//!
//! For each ready node the coordinator (a worker thread of [`crate::exec::run`], holding one
//! `-j` slot) writes the job file `jobs/<key>.json` into the store, saying which pipeline file
//! and overrides the key came from, and submits
//!
//! ```text
//! sbatch --parsable --job-name pipe:<node> --output <store>/jobs/<key>.out [--gres gpu:1]
//!        <--sbatch-arg ...> --wrap '<pipe> --store <store> exec <key>'
//! ```
//!
//! `pipe exec` loads that pipeline again, finds the node whose key is `<key>` (refusing if the
//! file changed meanwhile so that no node has it any more), and runs it as a local run would:
//! key lock, input re-check, stage, declared outputs, commit. The coordinator asks `squeue`
//! (once per poll for all the run's jobs: `squeue -h -u <uid> -o '%i %T'`) until the job has
//! left the queue, then looks in the store: an entry means `ran`; none means
//! `failed`, with the tail of the job's output in the message (the stage's own log is in the
//! store's `failed/`, as for a local run, so `pipe log` shows it). Ctrl-C `scancel`s the jobs in
//! flight. A node another run committed meanwhile is not submitted (`cached`); a node whose job
//! another run (an earlier, killed one, or one running beside this one) submitted and Slurm
//! still holds is not submitted again: the run waits for that job (its id is in the job file).
//! Deciding and submitting happen under `jobs/<key>.lock` (a `flock`), so two runs of
//! overlapping pipelines cannot both submit a key.
//!
//! [`submit_all`] (`pipe run --executor slurm --detach`) queues every node at once instead, each
//! job after its inputs' jobs (`--dependency=afterok`, `--kill-on-invalid-dep=yes`), and
//! returns; a later attached run adopts the queued jobs and reports them.
//!
//! A GPU node (one that claims the scheduler's `gpu` resource) asks for `--gres gpu:1`; how
//! many run at once is Slurm's business, so `--gpus` does not limit them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pipe_cache::{Store, now_rfc3339, write_atomic};
use serde_json::{Value, json};

use crate::exec::Outcome;
use crate::graph::Node;
use crate::stage::StageEvent;

/// How to submit to Slurm.
#[derive(Clone, Debug)]
pub struct SlurmOptions {
    /// The command that runs `pipe` on a compute node, up to (not including) `exec KEY`:
    /// `[<pipe>, --store, <store>]`.
    pub pipe: Vec<String>,
    /// Environment the job's command line sets (`PIPE_AUTO_DEVICE`, so that `device: auto`
    /// resolves there as it did for the key).
    pub env: Vec<(String, String)>,
    /// Extra `sbatch` arguments (`--partition gpu`, `--time 12:00:00`, ...).
    pub sbatch_args: Vec<String>,
    /// What `pipe exec` needs to rebuild the plan (pipeline file, overrides), written into each
    /// job file beside the node and key.
    pub job: Value,
    /// How often `squeue` is asked.
    pub poll: Duration,
    /// The `sbatch`, `squeue` and `scancel` programs (found on PATH by default).
    pub programs: [String; 3],
}

impl Default for SlurmOptions {
    fn default() -> Self {
        SlurmOptions {
            pipe: vec!["pipe".into()],
            env: Vec::new(),
            sbatch_args: Vec::new(),
            job: json!({}),
            poll: Duration::from_secs(5),
            programs: ["sbatch".into(), "squeue".into(), "scancel".into()],
        }
    }
}

/// The store's folder of job files and job outputs.
pub fn jobs_dir(store: &Store) -> PathBuf {
    store.root().join("jobs")
}

/// `jobs/<key>.json`.
pub fn job_file(store: &Store, key: &pipe_cache::Key) -> PathBuf {
    jobs_dir(store).join(format!("{}.json", key.hex()))
}

/// `jobs/<key>.out`: what the job printed.
pub fn job_output(store: &Store, key: &pipe_cache::Key) -> PathBuf {
    jobs_dir(store).join(format!("{}.out", key.hex()))
}

/// `jobs/<key>.lock`.
fn submission_lock_path(store: &Store, key: &pipe_cache::Key) -> PathBuf {
    jobs_dir(store).join(format!("{}.lock", key.hex()))
}

/// Takes `jobs/<key>.lock` (an exclusive `flock`, released when the file is dropped),
/// waiting while another run holds it.
fn lock_submission(
    store: &Store,
    key: &pipe_cache::Key,
    cancel: &AtomicBool,
) -> Result<std::fs::File, String> {
    let path = submission_lock_path(store, key);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {
                if cancel.load(Ordering::Relaxed) {
                    return Err("interrupted".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(format!("locking {}: {e}", path.display()));
            }
        }
    }
}

/// Quotes one word for `sh`.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,+@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The `sbatch` arguments for `node` (without the program).
pub fn sbatch_args(
    opts: &SlurmOptions,
    store: &Store,
    node: &Node,
    after: &[String],
) -> Vec<String> {
    let key = node.key.key();
    let mut wrap: Vec<String> = Vec::new();
    if !opts.env.is_empty() {
        wrap.push("env".into());
        wrap.extend(opts.env.iter().map(|(k, v)| format!("{k}={v}")));
    }
    wrap.extend(opts.pipe.iter().cloned());
    wrap.push("exec".into());
    wrap.push(key.hex());
    let mut args = vec![
        "--parsable".to_string(),
        "--job-name".into(),
        format!("pipe:{}", node.id),
        "--output".into(),
        job_output(store, key).display().to_string(),
    ];
    if node.resources.gpu {
        args.extend(["--gres".into(), "gpu:1".into()]);
    }
    if !after.is_empty() {
        // a failed input cancels the job instead of leaving it pending for ever
        args.push(format!("--dependency=afterok:{}", after.join(":")));
        args.push("--kill-on-invalid-dep=yes".into());
    }
    args.extend(opts.sbatch_args.iter().cloned());
    args.push("--wrap".into());
    args.push(
        wrap.iter()
            .map(|w| sh_quote(w))
            .collect::<Vec<_>>()
            .join(" "),
    );
    args
}

/// The last `n` lines of a file (empty if it cannot be read).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n    ")
}

/// Runs `program args`, returning stdout, or an error naming the program and its stderr.
fn call(program: &str, args: &[String]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `{program}`: {e} (is Slurm installed here?)"))?;
    if !out.status.success() {
        return Err(format!(
            "`{program}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where a job is, as `squeue` last said.
enum JobState {
    /// In the queue, in this state (`PENDING`, `RUNNING`, `COMPLETING`, ...).
    In(String),
    /// Gone from the queue.
    Ended,
}

/// The jobs of one run and their states, from one `squeue -u <uid>` per poll for all of them
/// (a thread per job asking `squeue -j` every few seconds would load the controller).
#[derive(Default)]
pub(crate) struct Queue {
    inner: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    /// Job id -> consecutive polls that did not list it.
    watched: HashMap<String, u32>,
    /// Job id -> state, from the last poll.
    states: HashMap<String, String>,
    last: Option<Instant>,
    /// Consecutive failed polls.
    failures: u32,
}

impl Queue {
    fn watch(&self, id: &str) {
        self.lock().watched.insert(id.to_string(), 0);
    }

    /// Whether `squeue` lists job `id` now (polling if the last poll is older than
    /// `opts.poll`; no when it cannot be asked).
    /// Whether job `id` is still queued or running, from a fresh `squeue`. A failing `squeue`
    /// (a busy controller) is asked again, [`SQUEUE_TRIES`] times in all; when it keeps
    /// failing, an error: "not listed" would submit the key a second time beside a job that
    /// may still be computing it.
    fn is_listed_now(
        &self,
        id: &str,
        opts: &SlurmOptions,
        cancel: &AtomicBool,
    ) -> Result<bool, String> {
        let mut error = String::new();
        for attempt in 0..SQUEUE_TRIES {
            if attempt > 0 {
                sleep_unless(cancel, opts.poll.max(Duration::from_millis(500)));
            }
            match poll(&opts.programs[1]) {
                Ok(states) => {
                    let mut q = self.lock();
                    q.states = states;
                    q.last = Some(Instant::now());
                    return Ok(q
                        .states
                        .get(id)
                        .is_some_and(|s| !ENDED.contains(&s.as_str())));
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    error = e;
                }
            }
        }
        Err(format!(
            "cannot tell whether Slurm job {id}, submitted earlier for this key, is still \
             queued ({error}), so it is not submitted again; run again when squeue answers"
        ))
    }

    fn forget(&self, id: &str) {
        self.lock().watched.remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state of job `id`, polling `squeue` if the last poll is older than `opts.poll`. A
    /// job counts as ended once two polls in a row did not list it (a job just submitted may
    /// not be listed yet).
    fn state(&self, id: &str, opts: &SlurmOptions) -> Result<JobState, String> {
        let mut q = self.lock();
        if q.last.is_none_or(|t| t.elapsed() >= opts.poll) {
            q.last = Some(Instant::now());
            match poll(&opts.programs[1]) {
                Ok(states) => {
                    q.failures = 0;
                    let QueueState { watched, .. } = &mut *q;
                    for (job, misses) in watched.iter_mut() {
                        *misses = if states.contains_key(job) {
                            0
                        } else {
                            *misses + 1
                        };
                    }
                    q.states = states;
                }
                Err(e) => {
                    // a busy controller: keep the last answer a while before giving up
                    q.failures += 1;
                    if q.failures > 20 {
                        return Err(format!("Slurm job {id}: {e}"));
                    }
                    tracing::warn!("{e}");
                }
            }
        }
        if q.watched.get(id).is_some_and(|&misses| misses >= 2) {
            return Ok(JobState::Ended);
        }
        Ok(match q.states.get(id) {
            Some(s) if !ENDED.contains(&s.as_str()) => JobState::In(s.clone()),
            Some(_) => JobState::Ended,
            None => JobState::In("PENDING".into()),
        })
    }
}

/// How many times an adoption check asks a failing `squeue` before it gives up.
const SQUEUE_TRIES: usize = 5;

/// States of a job that will not run again.
const ENDED: [&str; 10] = [
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
];

/// `squeue -h -u <uid> -o '%i %T'`: job id -> state, for every job of this user.
fn poll(squeue: &str) -> Result<HashMap<String, String>, String> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| format!("cannot tell this process's user: {e}"))?;
    let args = ["-h", "-u", &uid.to_string(), "-o", "%i %T"].map(str::to_string);
    let out = call(squeue, &args)?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect())
}

/// How a node's job came to be in the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Queued {
    /// The key is in the store: no job.
    Cached,
    /// A job another run submitted for this key is still queued: its id.
    Adopted(String),
    /// This run submitted it: its id.
    Submitted(String),
}

impl Queued {
    /// The job id, if there is a job.
    pub fn job(&self) -> Option<&str> {
        match self {
            Queued::Cached => None,
            Queued::Adopted(id) | Queued::Submitted(id) => Some(id),
        }
    }
}

/// Makes sure a job computes `node` (unless its key is in the store): adopts a job another run
/// submitted for the key if Slurm still holds it, else submits one that starts once the jobs
/// `after` have completed successfully (`--dependency=afterok`; none: at once).
fn ensure_job(
    opts: &SlurmOptions,
    queue: &Queue,
    store: &Store,
    node: &Node,
    after: &[String],
    cancel: &AtomicBool,
) -> Result<Queued, String> {
    let key = node.key.key();
    if store.contains(key) {
        return Ok(Queued::Cached);
    }
    let dir = jobs_dir(store);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let file = job_file(store, key);
    // One submitter per key at a time: two runs of overlapping pipelines both seeing no job
    // would submit the key twice. The lock is held only while deciding and submitting.
    let _submit_lock = lock_submission(store, key, cancel)?;
    if store.contains(key) {
        return Ok(Queued::Cached);
    }
    // a job an earlier run submitted for this key (that run was killed, or lost its login
    // session, or runs beside this one) and Slurm still holds: wait for it instead of
    // computing the key twice (a fresh `squeue`: the job may be seconds old)
    let earlier = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|j| j["job_id"].as_str().map(str::to_string));
    let earlier = match earlier {
        Some(id) => queue.is_listed_now(&id, opts, cancel)?.then_some(id),
        None => None,
    };
    if let Some(id) = earlier {
        tracing::info!(node = %node.id, job = %id, "adopted");
        return Ok(Queued::Adopted(id));
    }
    // that job may have committed the key and left the queue between the look at the store
    // above and squeue's answer (a job commits before its process ends): look again, or the
    // key would be computed twice
    if store.contains(key) {
        return Ok(Queued::Cached);
    }
    let mut job = opts.job.clone();
    if !job.is_object() {
        job = json!({});
    }
    job["key"] = json!(key.hex());
    job["node"] = json!(node.id);
    job["submitted"] = json!(now_rfc3339());
    if !after.is_empty() {
        job["after"] = json!(after);
    }
    let write = |job: &Value| -> Result<(), String> {
        let text = serde_json::to_vec_pretty(job).map_err(|e| e.to_string())?;
        write_atomic(&file, &text).map_err(|e| e.to_string())
    };
    write(&job)?;
    let _ = std::fs::remove_file(job_output(store, key));
    let [sbatch, _, _] = &opts.programs;
    let submitted = call(sbatch, &sbatch_args(opts, store, node, after))?;
    // `--parsable`: `<id>` or `<id>;<cluster>`
    let id = submitted
        .lines()
        .next()
        .and_then(|l| l.split(';').next())
        .map(str::trim)
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_'))
        .ok_or_else(|| format!("`{sbatch}` printed no job id: `{}`", submitted.trim()))?
        .to_string();
    job["job_id"] = json!(id);
    write(&job)?;
    tracing::info!(node = %node.id, job = %id, "submitted");
    Ok(Queued::Submitted(id))
}

/// `pipe run --executor slurm --detach`: queues a job for every node of `plan` that must run,
/// in topological order, each depending (`afterok`, `--kill-on-invalid-dep=yes`) on the jobs
/// of its inputs, and returns without waiting. Per node: `None` where nothing must run (cached
/// or not needed at plan time), else what [`ensure_job`] did or why it could not (a node whose
/// input got no job is not submitted).
pub fn submit_all(
    plan: &crate::plan::Plan,
    store: &Store,
    opts: &SlurmOptions,
    cancel: &AtomicBool,
) -> Vec<Option<Result<Queued, String>>> {
    let queue = Queue::default();
    let nodes = &plan.graph.nodes;
    let mut out: Vec<Option<Result<Queued, String>>> = vec![None; nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        if !matches!(plan.status[i], crate::plan::Status::Run(_)) {
            continue;
        }
        if cancel.load(Ordering::Relaxed) {
            out[i] = Some(Err("interrupted".into()));
            continue;
        }
        let mut deps: Vec<usize> = node.inputs.values().flatten().copied().collect();
        deps.sort_unstable();
        deps.dedup();
        let mut after = Vec::new();
        let mut missing = None;
        for j in deps {
            match &out[j] {
                Some(Ok(q)) => after.extend(q.job().map(str::to_string)),
                Some(Err(_)) => missing = Some(nodes[j].id.clone()),
                None => {}
            }
        }
        out[i] = Some(match missing {
            Some(up) => Err(format!("not submitted: its input `{up}` has no job")),
            None => ensure_job(opts, &queue, store, node, &after, cancel),
        });
    }
    out
}

/// Submits `node` and waits for its job; the outcome as [`crate::exec::run`] reports it.
pub(crate) fn run_node(
    opts: &SlurmOptions,
    queue: &Queue,
    store: &Store,
    node: &Node,
    cancel: &AtomicBool,
    report: &(dyn Fn(StageEvent) + Sync),
) -> Result<Outcome, String> {
    let key = node.key.key();
    let file = job_file(store, key);
    let output = job_output(store, key);
    let [_, _, scancel] = &opts.programs;
    let (id, ours) = match ensure_job(opts, queue, store, node, &[], cancel)? {
        Queued::Cached => return Ok(Outcome::Cached),
        Queued::Adopted(id) => {
            report(StageEvent::Log(format!(
                "Slurm job {id}, submitted by another run for this key, is still queued: waiting for it"
            )));
            (id, false)
        }
        Queued::Submitted(id) => {
            report(StageEvent::Log(format!("Slurm job {id} submitted")));
            (id, true)
        }
    };
    queue.watch(&id);
    let mut state = String::new();
    let t0 = Instant::now();
    let ended = loop {
        if cancel.load(Ordering::Relaxed) {
            queue.forget(&id);
            // only what this run submitted: another run's job (a run waiting on it, a watcher
            // of a detached DAG) is that run's to cancel, and goes on to commit its node
            if !ours {
                return Err(format!(
                    "interrupted (Slurm job {id}, submitted by another run, left running)"
                ));
            }
            let _ = call(scancel, std::slice::from_ref(&id));
            return Err(format!("interrupted (Slurm job {id} cancelled)"));
        }
        sleep_unless(cancel, opts.poll);
        if cancel.load(Ordering::Relaxed) {
            continue;
        }
        match queue.state(&id, opts) {
            Ok(JobState::Ended) => break Ok(()),
            Ok(JobState::In(now)) => {
                if now != state {
                    report(StageEvent::Progress {
                        done: 0,
                        total: 1,
                        message: format!("Slurm job {id} {}", now.to_lowercase()),
                    });
                    state = now;
                }
            }
            Err(e) => break Err(e),
        }
    };
    queue.forget(&id);
    ended?;
    tracing::info!(node = %node.id, job = %id, seconds = t0.elapsed().as_secs_f64(), "job ended");
    // The entry, as this machine sees it: on NFS a lookup may be cached for a while after the
    // compute node committed, so look again while the job's output says it committed (or says
    // nothing yet), and stop at once when it says `pipe exec` failed.
    let t1 = Instant::now();
    loop {
        if store.contains(key) {
            let _ = std::fs::remove_file(&file);
            let _ = std::fs::remove_file(&output);
            // safe to unlink while another run holds it: the key is committed, and a
            // submitter checks the store first thing under the lock
            let _ = std::fs::remove_file(submission_lock_path(store, key));
            return Ok(Outcome::Ran);
        }
        let text = std::fs::read_to_string(&output).unwrap_or_default();
        let said = exec_said(&text, &node.id);
        let patience = match said {
            Said::Failed => Duration::ZERO,
            Said::Committed => COMMIT_VISIBLE,
            Said::Nothing => OUTPUT_VISIBLE,
        };
        if t1.elapsed() >= patience || cancel.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if !output.exists() {
        return Err(format!(
            "Slurm job {id} ended without committing the node and left no output at {} \
             (is the store on a file system the compute nodes share?)",
            output.display()
        ));
    }
    Err(format!(
        "Slurm job {id} ended without committing the node; its output ({}) ends with:\n    {}",
        output.display(),
        tail(&output, 15)
    ))
}

/// How long a job's commit may take to show here once its output says it committed.
const COMMIT_VISIBLE: Duration = Duration::from_secs(120);
/// How long a job that ended with no verdict in its output may take to show its entry.
const OUTPUT_VISIBLE: Duration = Duration::from_secs(20);

/// What `pipe exec` printed last about `node`.
#[derive(Debug, PartialEq)]
enum Said {
    Committed,
    Failed,
    Nothing,
}

fn exec_said(output: &str, node: &str) -> Said {
    for line in output.lines().rev() {
        // slurmstepd's own verdicts: `slurmstepd-n1: error: *** JOB 12 ON n1 CANCELLED AT …
        // DUE TO TIME LIMIT ***`, `… Detected 1 oom-kill event(s) …`
        let stepd = line.starts_with("slurmstepd")
            && (line.contains("error: ***") || line.contains("oom-kill"));
        if line.starts_with(&format!("failed: {node}: ")) || line.starts_with("error: ") || stepd {
            return Said::Failed;
        }
        if let Some(rest) = line.strip_prefix(&format!("pipe exec: {node} "))
            && (rest.starts_with("ran (") || rest.starts_with("was cached already"))
        {
            return Said::Committed;
        }
    }
    Said::Nothing
}

/// Sleeps `d`, waking early when `cancel` is set.
fn sleep_unless(cancel: &AtomicBool, d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d && !cancel.load(Ordering::Relaxed) {
        std::thread::sleep((d - t.elapsed()).min(Duration::from_millis(100)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_of_pipe_exec_is_read_from_the_last_line_about_the_node() {
        let node = "b[n=2]";
        assert_eq!(exec_said("", node), Said::Nothing);
        assert_eq!(
            exec_said(
                "pipe exec: b[n=2] (ab12) on n1\n1/1 loss\npipe exec: b[n=2] ran (3.1 s)\n",
                node
            ),
            Said::Committed
        );
        assert_eq!(
            exec_said("pipe exec: b[n=2] was cached already (0.0 s)\n", node),
            Said::Committed
        );
        assert_eq!(
            exec_said(
                "pipe exec: b[n=2] (ab12) on n1\nfailed: b[n=2]: command exited with code 3\n",
                node
            ),
            Said::Failed
        );
        assert_eq!(exec_said("error: no job file x\n", node), Said::Failed);
        // another node's verdict says nothing about this one
        assert_eq!(
            exec_said("pipe exec: b[n=5] ran (1.0 s)\n", node),
            Said::Nothing
        );
        // killed by Slurm mid-run, without a word from `pipe exec`
        assert_eq!(
            exec_said(
                "pipe exec: b[n=2] (ab12) on n1\nslurmstepd-n1: error: *** JOB 12 ON n1 CANCELLED AT 2026-11-23T23:14:35 DUE TO TIME LIMIT ***\n",
                node
            ),
            Said::Failed
        );
        assert_eq!(
            exec_said(
                "slurmstepd: error: Detected 1 oom-kill event(s) in StepId=12.batch\n",
                node
            ),
            Said::Failed
        );
        // killed with no word from anyone (the machine went down): no verdict
        assert_eq!(
            exec_said("pipe exec: b[n=2] (ab12) on n1\n", node),
            Said::Nothing
        );
    }

    #[test]
    fn words_are_quoted_for_sh() {
        assert_eq!(sh_quote("/opt/pipe"), "/opt/pipe");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn a_gpu_node_asks_for_one_gpu_and_the_wrap_runs_pipe_exec_with_its_key() {
        let root = std::env::temp_dir().join(format!("pipe-slurm-unit-{}", std::process::id()));
        let store = Store::open(&root).expect("store");
        let key: pipe_cache::Key = "ab".repeat(32).parse().expect("key");
        let mut node = Node {
            key: crate::NodeKey(key),
            kind: "pretrain".into(),
            version: 1,
            id: "pretrain[m=3]".into(),
            aliases: Vec::new(),
            stages: vec!["pretrain".into()],
            params: json!({}),
            external: Default::default(),
            inputs: Default::default(),
            resources: crate::Resources { gpu: true },
            outputs: Vec::new(),
        };
        let opts = SlurmOptions {
            pipe: vec!["/opt/my pipe/pipe".into(), "--store".into(), "/s".into()],
            env: vec![("PIPE_AUTO_DEVICE".into(), "cuda".into())],
            sbatch_args: vec!["--time=1:00:00".into()],
            ..SlurmOptions::default()
        };
        let args = sbatch_args(&opts, &store, &node, &[]);
        let hex = "ab".repeat(32);
        let out = root.join("jobs").join(format!("{hex}.out"));
        assert_eq!(
            args,
            [
                "--parsable",
                "--job-name",
                "pipe:pretrain[m=3]",
                "--output",
                &out.display().to_string(),
                "--gres",
                "gpu:1",
                "--time=1:00:00",
                "--wrap",
                &format!("env PIPE_AUTO_DEVICE=cuda '/opt/my pipe/pipe' --store /s exec {hex}"),
            ]
        );
        node.resources.gpu = false;
        let args = sbatch_args(&opts, &store, &node, &["17".into(), "18".into()]);
        assert!(!args.contains(&"--gres".to_string()));
        // after its inputs' jobs, cancelled if one of them fails
        assert!(
            args.windows(2)
                .any(|w| w == ["--dependency=afterok:17:18", "--kill-on-invalid-dep=yes"]),
            "{args:?}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
