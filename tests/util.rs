//! Shared helpers: a temporary work dir with its own store, and a runner for the `pipe` binary.
//!
//! Each test gets a fresh [`Dir`] (ripgrep's `Dir`): `<tmp>/pipe-it-<pid>-<n>-<name>/`, with the
//! store at `store/` inside it, removed on drop. Pipelines are written into the work dir, so
//! shell stages (which run in the pipeline file's folder) can append to counter files there,
//! outside `$PIPE_OUT`, to show how often a command really ran.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// The binary under test.
pub const PIPE: &str = env!("CARGO_BIN_EXE_pipe");

/// A temporary work dir holding pipelines, counter files and a store; removed on drop.
pub struct Dir {
    /// The work dir (absolute).
    pub root: PathBuf,
    /// `<root>/store`, passed as `--store` to every command.
    pub store: PathBuf,
}

impl Dir {
    /// A fresh, empty work dir; `name` only makes it recognisable.
    pub fn new(name: &str) -> Dir {
        let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        let root = std::env::temp_dir().join(format!("pipe-it-{}-{id}-{name}", std::process::id()));
        if root.exists() {
            std::fs::remove_dir_all(&root).expect("remove a stale test dir");
        }
        std::fs::create_dir_all(&root).expect("create the test dir");
        let store = root.join("store");
        Dir { root, store }
    }

    /// `<root>/<rel>`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Writes `contents` to `<root>/<rel>` (creating parent folders) and returns the path.
    pub fn write(&self, rel: &str, contents: &str) -> PathBuf {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// Writes a pipeline YAML as `<root>/<name>` and returns its path (a `&str`, ready for args).
    pub fn pipeline(&self, name: &str, yaml: &str) -> String {
        self.write(name, yaml)
            .to_str()
            .expect("temp paths are UTF-8")
            .to_string()
    }

    /// Contents of `<root>/<rel>`, or "" when it does not exist.
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    /// Lines of `<root>/<rel>` (a counter file the stage commands append to).
    pub fn lines(&self, rel: &str) -> Vec<String> {
        self.read(rel).lines().map(str::to_string).collect()
    }

    /// How many lines of `<root>/<rel>` equal `line`.
    pub fn count(&self, rel: &str, line: &str) -> usize {
        self.lines(rel)
            .iter()
            .filter(|l| l.as_str() == line)
            .count()
    }

    /// `pipe --store <root>/store ARGS`, run in the work dir, with no stray env.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(PIPE);
        c.arg("--store")
            .arg(&self.store)
            .args(args)
            .current_dir(&self.root);
        c.env_remove("PIPE_STORE")
            .env_remove("PIPE_LOG")
            .env_remove("RUST_LOG");
        c.stdin(Stdio::null());
        c
    }

    /// Runs `pipe ARGS` to completion.
    pub fn pipe(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("start pipe");
        Output::from_process(args, out)
    }

    /// Runs `pipe ARGS` with environment variables set (`Some`) or removed (`None`).
    pub fn pipe_env(&self, args: &[&str], env: &[(&str, Option<&str>)]) -> Output {
        let mut c = self.command(args);
        for (k, v) in env {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        Output::from_process(args, c.output().expect("start pipe"))
    }

    /// Starts `pipe ARGS` in the background, stdout and stderr piped.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pipe")
    }

    /// Runs `pipe ARGS --json`, checks the exit code and returns the parsed document.
    pub fn json(&self, args: &[&str], code: i32) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        self.pipe(&a).code(code).json()
    }

    /// Committed entry folders in the store (`entries/<xx>/<hex>`), sorted.
    pub fn entries(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(shards) = std::fs::read_dir(self.store.join("entries")) else {
            return out;
        };
        for shard in shards {
            let shard = shard.expect("read entries/").path();
            if !shard.is_dir() {
                continue;
            }
            for e in std::fs::read_dir(&shard).expect("read a shard") {
                out.push(e.expect("read a shard entry").path());
            }
        }
        out.sort();
        out
    }

    /// Keys (folder names) of the committed entries.
    pub fn entry_keys(&self) -> Vec<String> {
        self.entries().iter().map(|p| file_name(p)).collect()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // entries may be read-only; make everything writable so removal succeeds
        make_writable(&self.root);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Adds owner rwx to `p` and everything below it (undoing a test's chmod).
pub fn make_writable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return;
    };
    if meta.file_type().is_symlink() {
        return;
    }
    let mode = meta.permissions().mode();
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode | 0o700));
    if meta.is_dir()
        && let Ok(rd) = std::fs::read_dir(p)
    {
        for e in rd.flatten() {
            make_writable(&e.path());
        }
    }
}

/// The last component of a path, as a String.
pub fn file_name(p: &Path) -> String {
    p.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

/// What a finished `pipe` command left.
#[derive(Debug)]
pub struct Output {
    /// The arguments (for messages).
    pub args: String,
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Stdout.
    pub stdout: String,
    /// Stderr.
    pub stderr: String,
}

impl Output {
    /// From a finished process.
    pub fn from_process(args: &[&str], out: std::process::Output) -> Output {
        Output {
            args: args.join(" "),
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts the exit code (showing stdout and stderr when it differs).
    #[track_caller]
    pub fn code(self, expected: i32) -> Output {
        assert_eq!(
            self.code, expected,
            "`pipe {}` exited with {} (expected {expected})\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args, self.code, self.stdout, self.stderr
        );
        self
    }

    /// Stdout parsed as one JSON document.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "`pipe {}`: stdout is not JSON ({e}):\n{}\n--- stderr:\n{}",
                self.args, self.stdout, self.stderr
            )
        })
    }
}

/// The node with `id` in a `--json` document.
#[track_caller]
pub fn node<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["nodes"]
        .as_array()
        .expect("`nodes` is an array")
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("no node `{id}` in {doc:#}"))
}

/// `id -> status` of every node in a `--json` document.
#[track_caller]
pub fn statuses(doc: &Value) -> BTreeMap<String, String> {
    doc["nodes"]
        .as_array()
        .expect("`nodes` is an array")
        .iter()
        .map(|n| {
            let id = n["id"].as_str().expect("node id is a string").to_string();
            let st = n["status"]
                .as_str()
                .expect("node status is a string")
                .to_string();
            (id, st)
        })
        .collect()
}

/// Builds an expected `id -> status` map.
pub fn expect(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
        .collect()
}

/// The `key` of node `id` in a `--json` document.
#[track_caller]
pub fn key_of(doc: &Value, id: &str) -> String {
    node(doc, id)["key"]
        .as_str()
        .expect("key is a string")
        .to_string()
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `limit`.
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` to exit for at most `limit`; kills it and panics past that.
#[track_caller]
pub fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pipe did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Collects the rest of a finished (or killed) child's output.
pub fn drain(child: Child, args: &[&str]) -> Output {
    let out = child.wait_with_output().expect("collect output");
    Output::from_process(args, out)
}

/// Sends `sig` to `pid` (a negative pid: a process group). Returns whether it was delivered.
pub fn signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill(2) only sends a signal; it reads or writes none of our memory.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, sig) };
    rc == 0
}

/// Live (not zombie) processes of process group `pgid`, from `/proc/<pid>/stat`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the last ')'
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                return false;
            };
            let mut f = rest.split_whitespace();
            let state = f.next();
            let pgrp = f.nth(1).and_then(|g| g.parse::<i32>().ok());
            state != Some("Z") && pgrp == Some(pgid)
        })
        .collect()
}

/// Processes (pids) whose working directory is `root`: every `pipe` started by [`Dir`] and
/// every `shell` stage command of its pipelines (they run in the pipeline's folder).
pub fn processes_in(root: &Path) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == root))
        .collect()
}

/// Parent pid of `pid` (from `/proc/<pid>/stat`), if it still exists.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// SIGKILLs every process working in `root` (see [`processes_in`]) except the `keep` pids and
/// their descendants, until none is left: the stage commands a killed `pipe` leaves behind
/// (they run in their own process group, so they outlive it). Returns how many were killed.
pub fn kill_strays(root: &Path, keep: &[u32]) -> usize {
    let mut killed = 0;
    let t0 = Instant::now();
    loop {
        let strays: Vec<i32> = processes_in(root)
            .into_iter()
            .filter(|&pid| {
                let mut p = pid;
                for _ in 0..64 {
                    if keep.iter().any(|&k| i32::try_from(k) == Ok(p)) {
                        return false;
                    }
                    match parent_of(p) {
                        Some(pp) if pp > 1 => p = pp,
                        _ => return true,
                    }
                }
                true
            })
            .collect();
        if strays.is_empty() || t0.elapsed() > Duration::from_secs(10) {
            return killed;
        }
        for pid in strays {
            if signal(pid, libc::SIGKILL) {
                killed += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the exclusive `flock` on `path` can be taken right now (then it is released again):
/// no live process holds it.
pub fn lock_is_free(path: &Path) -> bool {
    let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) else {
        return true;
    };
    f.try_lock().is_ok()
}

/// Names in `<store>/tmp/` that are staging folders (`<64 hex>.<pid>.<n>`).
pub fn staging_dirs(store: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(store.join("tmp")) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .map(|e| file_name(&e.path()))
        .filter(|n| {
            n.len() > 65
                && n.as_bytes()[64] == b'.'
                && n[..64].bytes().all(|b| b.is_ascii_hexdigit())
        })
        .collect();
    v.sort();
    v
}

/// A small seeded generator (splitmix64): reproducible "random" choices for loop tests.
pub struct Rng(u64);

impl Rng {
    /// Seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Every committed entry's `manifest.json` parses and names its own folder's key, and
/// `pipe verify` finds nothing wrong (exit 0). Returns the number of entries.
#[track_caller]
pub fn assert_store_sound(dir: &Dir, context: &str) -> usize {
    let entries = dir.entries();
    for e in &entries {
        let m = e.join("manifest.json");
        let bytes =
            std::fs::read(&m).unwrap_or_else(|err| panic!("{context}: {}: {err}", m.display()));
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|err| panic!("{context}: {} does not parse: {err}", m.display()));
        assert_eq!(
            v["key"].as_str(),
            Some(file_name(e).as_str()),
            "{context}: manifest of {} names another key",
            e.display()
        );
    }
    let out = dir.pipe(&["verify"]);
    assert_eq!(
        out.code, 0,
        "{context}: pipe verify found problems\n{}{}",
        out.stdout, out.stderr
    );
    assert!(
        out.stdout
            .contains(&format!("{} entries checked, 0 problem", entries.len())),
        "{context}: {}",
        out.stdout
    );
    entries.len()
}

/// A running `pipe` whose stderr is read as it comes, so a test can wait for a line (say, that
/// it is waiting for a lock) instead of sleeping; stdout is collected at the end.
pub struct Watched {
    /// The process.
    pub child: Child,
    args: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Watched {
    /// Starts `pipe ARGS` in `dir` (see [`Dir::spawn`]).
    pub fn spawn(dir: &Dir, args: &[&str]) -> Watched {
        use std::io::Read;
        let mut child = dir.spawn(args);
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let sink = std::sync::Arc::clone(&stderr);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().expect("stderr buffer").push_str(&text);
            }
        });
        Watched {
            child,
            args: args.iter().map(|a| (*a).to_string()).collect(),
            stderr,
            reader: Some(reader),
        }
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    /// Waits until its stderr contains `needle`; panics if it exits first or after `limit`.
    #[track_caller]
    pub fn wait_for(&mut self, needle: &str, limit: Duration) {
        let t0 = Instant::now();
        while !self.stderr().contains(needle) {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!(
                    "pipe exited ({s}) before printing {needle:?}:\n{}",
                    self.stderr()
                );
            }
            assert!(
                t0.elapsed() < limit,
                "no {needle:?} on stderr after {limit:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits at most `limit` for it to exit (see [`wait_exit`]) and returns its exit status
    /// and output.
    #[track_caller]
    pub fn finish(mut self, limit: Duration) -> (ExitStatus, Output) {
        let status = wait_exit(&mut self.child, limit);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut out = drain(self.child, &args);
        out.stderr = self.stderr.lock().expect("stderr buffer").clone();
        (status, out)
    }
}

/// `(relative path, contents)` of every file under `root`, sorted: compares a folder (a store,
/// its `entries/`) before and after something that must not change it.
pub fn snapshot(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).expect("below root");
                out.push((
                    rel.display().to_string(),
                    std::fs::read(&p).unwrap_or_default(),
                ));
            }
        }
    }
    out.sort();
    out
}
