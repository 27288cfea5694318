//! `pipe run --executor slurm` and `pipe exec` against a stand-in Slurm: `sbatch` runs the job's
//! `--wrap` command in the background in a session of its own (its pid is the job id) and
//! records its arguments, `squeue` says RUNNING while that process lives, `scancel` sends
//! SIGTERM to its session. Everything else is the real protocol: job files in the store, one
//! `pipe exec NODE_KEY` per node, results read back from the store.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::caching::entry_file;
use crate::util::{Dir, Output, drain, group_members, node, statuses, wait_exit, wait_until};

const SBATCH: &str = r#"#!/bin/sh
# stand-in sbatch: one file of arguments per submission, the job in the background; a job
# with `--dependency=afterok:A:B` waits for A and B to exit and ends without running (code 1)
# if one of them failed or vanished; every job leaves its exit code in exit.<id>
printf '%s\n' "$@" > "$FAKE_SLURM/sbatch.$(date +%s%N).$$"
out=/dev/null; wrap=""; deps=""
while [ $# -gt 0 ]; do
  case "$1" in
    --output) out="$2"; shift 2 ;;
    --wrap) wrap="$2"; shift 2 ;;
    --job-name|--gres) shift 2 ;;
    --dependency=afterok:*) deps=$(echo "${1#--dependency=afterok:}" | tr ':' ' '); shift ;;
    *) shift ;;
  esac
done
[ -n "$wrap" ] || { echo "sbatch: error: no --wrap" >&2; exit 1; }
script="$FAKE_SLURM/job.$(date +%s%N).$$"
{
  echo 'done_with() { echo "$1" > "$FAKE_SLURM/exit.$$.tmp"; mv "$FAKE_SLURM/exit.$$.tmp" "$FAKE_SLURM/exit.$$"; exit "$1"; }'
  echo "for d in $deps; do"
  echo '  while [ ! -f "$FAKE_SLURM/exit.$d" ]; do'
  echo '    kill -0 "$d" 2>/dev/null || [ -f "$FAKE_SLURM/exit.$d" ] || done_with 1'
  echo '    sleep 0.02'
  echo '  done'
  echo '  [ "$(cat "$FAKE_SLURM/exit.$d")" = 0 ] || done_with 1'
  echo 'done'
  printf '%s\n' "$wrap"
  echo 'done_with $?'
} > "$script"
setsid sh "$script" > "$out" 2>&1 < /dev/null &
echo "$!" >> "$FAKE_SLURM/jobs.log"
echo "$!"
"#;

const SQUEUE: &str = r#"#!/bin/sh
# stand-in squeue -h -u UID -o '%i %T': every submitted job whose process lives (not a zombie)
echo "$*" >> "$FAKE_SLURM/squeue.log"
[ -f "$FAKE_SLURM/squeue.fail" ] && { echo "squeue: error: Socket timed out" >&2; exit 1; }
[ -f "$FAKE_SLURM/jobs.log" ] || exit 0
while read -r id; do
  state=$(cut -d' ' -f3 "/proc/$id/stat" 2>/dev/null)
  case "$state" in ""|Z) ;; *) echo "$id RUNNING" ;; esac
done < "$FAKE_SLURM/jobs.log"
"#;

const SCANCEL: &str = r#"#!/bin/sh
echo "$1" >> "$FAKE_SLURM/scancel.log"
kill -s TERM -- "-$1"
"#;

/// A work dir whose `pipe` sees the stand-in Slurm first on PATH.
struct Cluster {
    dir: Dir,
    bin: PathBuf,
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        let dir = Dir::new(name);
        let bin = dir.path("fake-slurm");
        std::fs::create_dir_all(&bin).expect("fake-slurm/");
        for (name, text) in [("sbatch", SBATCH), ("squeue", SQUEUE), ("scancel", SCANCEL)] {
            let p = dir.write(&format!("fake-slurm/{name}"), text);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        Cluster { dir, bin }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = self.dir.command(args);
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("{}:{path}", self.bin.display()))
            .env("FAKE_SLURM", &self.bin)
            .env_remove("PIPE_AUTO_DEVICE");
        c
    }

    fn pipe(&self, args: &[&str]) -> Output {
        Output::from_process(args, self.command(args).output().expect("start pipe"))
    }

    /// `pipe run FILE --executor slurm --slurm-poll 0.05 EXTRA...`, checking the exit code.
    fn run(&self, file: &str, extra: &[&str], code: i32) -> Output {
        let mut args = vec!["run", file, "--executor", "slurm", "--slurm-poll", "0.05"];
        args.extend_from_slice(extra);
        self.pipe(&args).code(code)
    }

    /// A cluster running [`SLOW`]'s job whose submitting run was killed (`kill -9`): the job
    /// goes on, orphaned. Returns the cluster and the pipeline file.
    fn with_orphan_job(name: &str) -> (Cluster, String) {
        let c = Cluster::new(name);
        let p = c.dir.pipeline("adopt.yaml", SLOW);
        let args = ["run", &p, "--executor", "slurm", "--slurm-poll", "0.05"];
        let mut first = c.spawn_until_started(&args);
        first.kill().expect("SIGKILL the submitting run");
        let _ = wait_exit(&mut first, Duration::from_secs(10));
        drain(first, &args);
        (c, p)
    }

    /// After [`Cluster::with_orphan_job`]: a run of `p` gets the orphaned job's result, `ran`
    /// (the job ended while the run waited for it) or `cached` (on a machine so slow that it
    /// ended before the run planned), never from a second job.
    fn rerun_gets_the_orphans_result(&self, p: &str) {
        let doc = self.run(p, &["--json"], 0).json();
        let status = node(&doc, "slow")["status"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(status == "ran" || status == "cached", "{doc:#}");
        assert_eq!(self.submissions().len(), 1, "the key was submitted twice");
        assert_eq!(self.dir.count("runs.log", "run"), 1);
    }

    /// Starts `pipe ARGS` in the background and waits until its job's command has written the
    /// `started` marker.
    fn spawn_until_started(&self, args: &[&str]) -> std::process::Child {
        let child = self
            .command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start pipe");
        wait_until(
            Duration::from_secs(20),
            "the job's command to start",
            || self.dir.path("started").exists(),
        );
        child
    }

    /// The arguments of every submission, in order.
    fn submissions(&self) -> Vec<Vec<String>> {
        // `sbatch.<ns since 1970>.<pid>`: the names sort by time
        let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(&self.bin)
            .expect("fake-slurm/")
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().to_string(), e.path()))
            .filter(|(name, _)| name.starts_with("sbatch."))
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|(_, p)| {
                std::fs::read_to_string(p)
                    .expect("a submission")
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .collect()
    }
}

/// The value after `flag` in one submission's arguments.
fn arg<'a>(sub: &'a [String], flag: &str) -> &'a str {
    let i = sub
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {sub:?}"));
    &sub[i + 1]
}

const SWEEP: &str = r#"
name: cluster
stages:
  a:
    kind: shell
    params:
      cmd: echo a >> runs.log; echo 10 > "$PIPE_OUT/v"
      outputs: [v]
  b:
    kind: shell
    inputs: {up: a}
    sweep: {n: [2, 5]}
    params:
      cmd: echo "b $PIPE_PARAM_n" >> runs.log; echo $(( $(cat "$PIPE_IN_up/v") * PIPE_PARAM_n )) > "$PIPE_OUT/v"
      outputs: [v]
"#;

#[test]
fn every_node_runs_as_one_slurm_job_with_the_keys_of_a_local_run() {
    let c = Cluster::new("slurm");
    let p = c.dir.pipeline("cluster.yaml", SWEEP);
    let out = c.run(&p, &["--sbatch-arg=--partition=gpu", "--json"], 0);
    let doc = out.json();
    assert_eq!(
        statuses(&doc),
        crate::util::expect(&[("a", "ran"), ("b[n=2]", "ran"), ("b[n=5]", "ran")])
    );
    assert_eq!(entry_file(&c.dir, &p, "b[n=2]", "v"), "20\n");
    assert_eq!(entry_file(&c.dir, &p, "b[n=5]", "v"), "50\n");
    assert_eq!(c.dir.count("runs.log", "a"), 1);

    // one job per node, `a` first (its dependents wait for its entry)
    let subs = c.submissions();
    assert_eq!(subs.len(), 3, "{subs:?}");
    assert_eq!(arg(&subs[0], "--job-name"), "pipe:a");
    for sub in &subs {
        assert!(sub.contains(&"--parsable".to_string()), "{sub:?}");
        assert!(sub.contains(&"--partition=gpu".to_string()), "{sub:?}");
        assert!(
            !sub.contains(&"--gres".to_string()),
            "shell nodes need no GPU: {sub:?}"
        );
        let name = arg(sub, "--job-name")
            .strip_prefix("pipe:")
            .expect("pipe:<node>");
        let key = node(&doc, name)["key"].as_str().expect("key").to_string();
        let wrap = arg(sub, "--wrap");
        assert!(
            wrap.contains(&format!(" exec {key}"))
                && wrap.contains("PIPE_AUTO_DEVICE=cpu")
                && wrap.contains("PIPE_CUDA_MATH=fp32")
                && wrap.contains("PIPE_KERNELS=fast"),
            "{wrap}"
        );
        assert!(
            arg(sub, "--output").ends_with(&format!("jobs/{key}.out")),
            "{sub:?}"
        );
    }
    // one `squeue` per poll for all the run's jobs, listing this user's jobs
    let polls = std::fs::read_to_string(c.bin.join("squeue.log")).expect("squeue was asked");
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("me"));
    assert!(
        polls.lines().all(|l| l == format!("-h -u {uid} -o %i %T")),
        "{polls}"
    );
    // finished jobs leave no job file or output behind
    let left: Vec<_> = std::fs::read_dir(c.dir.store.join("jobs"))
        .expect("jobs/")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // the same nodes locally: all cached under the same keys; and nothing is resubmitted
    let local = c.dir.json(&["run", &p], 0);
    for id in ["a", "b[n=2]", "b[n=5]"] {
        assert_eq!(node(&local, id)["status"], "cached");
        assert_eq!(node(&local, id)["key"], node(&doc, id)["key"]);
    }
    let again = c
        .pipe(&["run", &p, "--executor", "slurm", "--json"])
        .code(0)
        .json();
    assert_eq!(again["cached"], 3);
    assert_eq!(c.submissions().len(), 3);
}

#[test]
fn a_failed_job_fails_its_node_with_the_output_and_pipe_log_shows_the_stage_log() {
    let c = Cluster::new("slurm-fail");
    let p = c.dir.pipeline(
        "fail.yaml",
        r#"
name: fail
stages:
  up:
    kind: shell
    params: {cmd: 'echo 1 > "$PIPE_OUT/v"'}
  bad:
    kind: shell
    inputs: {up: up}
    params: {cmd: 'echo "boom from the job" >&2; exit 3'}
  after:
    kind: shell
    inputs: {x: bad}
    params: {cmd: 'true'}
"#,
    );
    let out = c.run(&p, &["--json"], 1);
    let doc = out.json();
    assert_eq!(
        statuses(&doc),
        crate::util::expect(&[("up", "ran"), ("bad", "failed"), ("after", "skipped")])
    );
    let err = node(&doc, "bad")["error"]
        .as_str()
        .expect("error")
        .to_string();
    assert!(
        err.contains("Slurm job") && err.contains("boom from the job") && err.contains("code 3"),
        "{err}"
    );
    assert_eq!(c.submissions().len(), 2, "`after` is never submitted");
    let log = c.dir.pipe(&["log", &p, "bad"]).code(0);
    assert!(log.stdout.contains("boom from the job"), "{}", log.stdout);

    // the failed job's file stays: `pipe exec` reruns it by hand, and refuses once the
    // pipeline no longer has that node
    let key = node(&doc, "bad")["key"].as_str().expect("key").to_string();
    assert!(c.dir.store.join(format!("jobs/{key}.json")).is_file());
    let again = c.pipe(&["exec", &key]).code(1);
    assert!(
        again.stderr.contains("boom from the job"),
        "{}",
        again.stderr
    );
    c.dir.pipeline(
        "fail.yaml",
        &std::fs::read_to_string(&p)
            .expect("read")
            .replace("exit 3", "exit 0"),
    );
    let changed = c.pipe(&["exec", &key]).code(2);
    assert!(
        changed.stderr.contains("has no node with key") && changed.stderr.contains("`bad`"),
        "{}",
        changed.stderr
    );
    let bad = c.pipe(&["exec", "xyz"]).code(2);
    assert!(bad.stderr.contains("not a node key"), "{}", bad.stderr);
    let unknown = c.pipe(&["exec", &"0".repeat(64)]).code(2);
    assert!(unknown.stderr.contains("no job file"), "{}", unknown.stderr);
}

#[test]
fn sigterm_cancels_the_jobs_in_flight() {
    let c = Cluster::new("slurm-cancel");
    let p = c.dir.pipeline(
        "slow.yaml",
        r#"
name: slow
stages:
  slow:
    kind: shell
    params: {cmd: 'echo $$ > started.tmp && mv started.tmp started; sleep 120'}
"#,
    );
    let args = ["run", &p, "--executor", "slurm", "--slurm-poll", "0.05"];
    let mut child = c.spawn_until_started(&args);
    let pid = i32::try_from(child.id()).expect("pid");
    crate::util::signal(pid, libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let out = drain(child, &args);
    assert_eq!(status.code(), Some(143), "{}", out.stderr);
    let cancelled = std::fs::read_to_string(c.bin.join("scancel.log")).expect("scancel was called");
    let job: i32 = cancelled
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("scancel got `{cancelled}`: {e}"));
    assert_eq!(c.submissions().len(), 1);
    // the job (`pipe exec`, its own session in the stand-in) is gone, and so is the stage's
    // command with its `sleep` (`pipe exec` stopped it as a local run does)
    let stage: i32 = c
        .dir
        .read("started")
        .trim()
        .parse()
        .expect("the stage's pid");
    wait_until(Duration::from_secs(20), "the cancelled job to end", || {
        group_members(job).is_empty() && group_members(stage).is_empty()
    });
    let show: Value = c.dir.json(&["show", &p], 0);
    assert_ne!(node(&show, "slow")["status"], "cached");
}

/// One slow shell node that logs its run and marks its start (`started`).
const SLOW: &str = r#"
name: slow
stages:
  slow:
    kind: shell
    params:
      cmd: |
        echo run >> runs.log
        echo $$ > started.tmp && mv started.tmp started
        sleep 3
        echo 7 > "$PIPE_OUT/v"
      outputs: [v]
"#;

#[test]
fn a_rerun_after_the_submitting_run_was_killed_waits_for_the_job_in_flight() {
    let (c, p) = Cluster::with_orphan_job("slurm-adopt");

    // the job goes on without it; the next run finds it queued and waits for it
    c.rerun_gets_the_orphans_result(&p);
    assert_eq!(entry_file(&c.dir, &p, "slow", "v"), "7\n");
}

/// A rerun after the submitter was killed, while `squeue` fails (a busy controller): the
/// job the killed run submitted may still be computing the key, so the rerun fails the node
/// saying why instead of submitting it a second time; once `squeue` answers, the job's result
/// is there.
#[test]
fn a_failing_squeue_never_makes_a_rerun_submit_a_key_again() {
    let (c, p) = Cluster::with_orphan_job("slurm-squeue-down");
    std::fs::write(c.bin.join("squeue.fail"), "").expect("break squeue");
    let out = c.run(&p, &["--json"], 1);
    let error = node(&out.json(), "slow")["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("cannot tell whether Slurm job") && error.contains("Socket timed out"),
        "{error}"
    );
    assert_eq!(c.submissions().len(), 1, "the key was submitted twice");
    std::fs::remove_file(c.bin.join("squeue.fail")).expect("mend squeue");
    c.rerun_gets_the_orphans_result(&p);
}

/// Two runs of one key: the second waits for the first one's job. Ctrl-C in the second stops
/// its waiting and leaves the job alone: the first run, which nobody interrupted, completes.
#[test]
fn ctrl_c_in_a_run_waiting_for_another_runs_job_leaves_that_job_running() {
    let c = Cluster::new("slurm-adopted-ctrl-c");
    let p = c
        .dir
        .pipeline("adopt.yaml", &SLOW.replace("sleep 3", "sleep 5"));
    let args = ["run", &p, "--executor", "slurm", "--slurm-poll", "0.05"];
    let first = c.spawn_until_started(&args);
    let mut second = c
        .command(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the second run");
    // time for the second run to plan and find the job queued
    std::thread::sleep(Duration::from_millis(1500));
    let pid = i32::try_from(second.id()).expect("pid");
    crate::util::signal(pid, libc::SIGINT);
    let status = wait_exit(&mut second, Duration::from_secs(20));
    let out = drain(second, &args);
    assert_eq!(status.code(), Some(130), "{}", out.stderr);
    let out = Output::from_process(&args, first.wait_with_output().expect("wait"));
    out.code(0);
    assert!(
        !c.bin.join("scancel.log").exists(),
        "the first run's job was cancelled"
    );
    assert_eq!(c.submissions().len(), 1);
    assert_eq!(entry_file(&c.dir, &p, "slow", "v"), "7\n");
}

#[test]
fn two_runs_at_once_submit_each_key_once() {
    let c = Cluster::new("slurm-twice");
    let p = c.dir.pipeline(
        "twice.yaml",
        &format!(
            "{SLOW}  after:
    kind: shell
    inputs: {{up: slow}}
    params:
      cmd: echo after >> runs.log; cp \"$PIPE_IN_up/v\" \"$PIPE_OUT/v\"
      outputs: [v]
"
        ),
    );
    let args = [
        "run",
        &p,
        "--executor",
        "slurm",
        "--slurm-poll",
        "0.05",
        "--json",
    ];
    let spawn = || {
        c.command(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start pipe")
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let out = Output::from_process(&args, child.wait_with_output().expect("wait"));
        let doc = out.code(0).json();
        for id in ["slow", "after"] {
            let status = node(&doc, id)["status"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(status == "ran" || status == "cached", "{id}: {doc:#}");
        }
    }
    // each key went to Slurm once, and each command ran once
    assert_eq!(c.submissions().len(), 2, "{:?}", c.submissions());
    assert_eq!(c.dir.count("runs.log", "run"), 1);
    assert_eq!(c.dir.count("runs.log", "after"), 1);
    assert_eq!(entry_file(&c.dir, &p, "after", "v"), "7\n");
}

#[test]
fn detach_queues_every_node_after_its_inputs_and_a_later_run_reports() {
    let c = Cluster::new("slurm-detach");
    let p = c.dir.pipeline("cluster.yaml", SWEEP);
    let doc = c.run(&p, &["--detach", "--json"], 0).json();
    let job = |id: &str| {
        node(&doc, id)["job"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    for id in ["a", "b[n=2]", "b[n=5]"] {
        assert_eq!(node(&doc, id)["status"], "queued", "{doc:#}");
        assert!(!job(id).is_empty(), "{doc:#}");
    }
    assert_eq!(
        (doc["submitted"].as_u64(), doc["failed"].as_u64()),
        (Some(3), Some(0))
    );
    // one job per node at once, `b` after `a`
    let subs = c.submissions();
    assert_eq!(subs.len(), 3, "{subs:?}");
    for sub in &subs {
        let name = arg(sub, "--job-name");
        let dep = sub.iter().find(|a| a.starts_with("--dependency="));
        if name == "pipe:a" {
            assert!(dep.is_none(), "{sub:?}");
        } else {
            assert_eq!(dep, Some(&format!("--dependency=afterok:{}", job("a"))));
            assert!(sub.contains(&"--kill-on-invalid-dep=yes".to_string()));
        }
    }
    // the jobs run without any pipe waiting; a later run waits for them and reports
    let done = c.run(&p, &["--json"], 0).json();
    for id in ["a", "b[n=2]", "b[n=5]"] {
        let status = node(&done, id)["status"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(status == "ran" || status == "cached", "{id}: {done:#}");
    }
    assert_eq!(c.submissions().len(), 3, "a key was submitted twice");
    assert_eq!(c.dir.count("runs.log", "a"), 1);
    assert_eq!(entry_file(&c.dir, &p, "b[n=2]", "v"), "20\n");
    assert_eq!(entry_file(&c.dir, &p, "b[n=5]", "v"), "50\n");
    // queued again: everything is cached, nothing is submitted
    let again = c.run(&p, &["--detach", "--json"], 0).json();
    assert_eq!(again["cached"], 3, "{again:#}");
    assert_eq!(c.submissions().len(), 3);
    // --detach is Slurm's
    let local = c.dir.pipe(&["run", &p, "--detach"]).code(2);
    assert!(
        local.stderr.contains("--detach is for `--executor slurm`"),
        "{}",
        local.stderr
    );
}

#[test]
fn a_detached_failure_cancels_the_jobs_after_it() {
    let c = Cluster::new("slurm-detach-fail");
    let p = c.dir.pipeline(
        "fail.yaml",
        r#"
name: fail
stages:
  bad:
    kind: shell
    params: {cmd: 'sleep 1; echo "boom from the job" >&2; exit 3'}
  after:
    kind: shell
    params: {cmd: 'echo after >> runs.log'}
    inputs: {x: bad}
"#,
    );
    let queued = c.run(&p, &["--detach", "--json"], 0).json();
    assert_eq!(c.submissions().len(), 2);
    // `pipe plan` names the queued jobs (from their job files, no squeue)
    let plan = c.dir.json(&["plan", &p], 0);
    for id in ["bad", "after"] {
        assert_eq!(
            node(&plan, id)["slurm_job"]["id"],
            node(&queued, id)["job"],
            "{plan:#}"
        );
    }
    let text = c.dir.pipe(&["plan", &p]).code(0).stdout;
    let job = node(&queued, "bad")["job"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        text.contains(&format!("Slurm job {job} submitted")),
        "{text}"
    );
    // the later run adopts the failing job (still running) and the one queued after it
    let doc = c.run(&p, &["--json"], 1).json();
    assert_eq!(
        statuses(&doc),
        crate::util::expect(&[("bad", "failed"), ("after", "skipped")])
    );
    let err = node(&doc, "bad")["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("boom from the job"), "{err}");
    // `after`'s job ended without running its command, and nothing was submitted again
    wait_until(Duration::from_secs(10), "after's job to end", || {
        std::fs::read_dir(&c.bin)
            .expect("fake-slurm/")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("exit."))
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".tmp"))
            .count()
            == 2
    });
    assert_eq!(c.dir.count("runs.log", "after"), 0);
    assert_eq!(c.submissions().len(), 2);
}
