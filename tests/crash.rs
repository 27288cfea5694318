//! Crashes and interrupts: `kill -9` of `pipe` mid-node leaves no entry and the next run
//! completes the node (once, and then at random moments in a loop: staging, hashing, commit,
//! lock waits); Ctrl-C and SIGTERM stop within seconds with exit codes 130 and 143, keeping
//! finished nodes, removing staging folders and releasing every lock.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::util::{
    Dir, Rng, Watched, assert_store_sound, drain, group_members, kill_strays, lock_is_free, node,
    signal, staging_dirs, statuses, wait_exit, wait_until,
};

/// `up` is quick; `slow` writes a partial file, then (while `slow.flag` exists in the work dir)
/// records its process group in `started` and sleeps. The flag lives outside the key, so the
/// rerun without it is the same node.
fn slow_pipeline(secs: &str) -> String {
    format!(
        r#"
name: crashy
stages:
  up:
    kind: shell
    params:
      cmd: echo up >> runs.log; echo 5 > "$PIPE_OUT/v"
  slow:
    kind: shell
    inputs: {{up: up}}
    params:
      cmd: |
        echo slow >> runs.log
        echo partial > "$PIPE_OUT/partial.txt"
        if [ -e slow.flag ]; then
          echo $$ > started.tmp && mv started.tmp started
          sleep {secs}
        fi
        echo $(( $(cat "$PIPE_IN_up/v") * 2 )) > "$PIPE_OUT/done.txt"
      outputs: [done.txt]
"#
    )
}

/// Waits for the `started` marker and returns the process group of the stage command.
fn wait_started(dir: &Dir, child: &mut std::process::Child) -> i32 {
    wait_until(Duration::from_secs(20), "the slow node to start", || {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("pipe exited ({s}) before the slow node started");
        }
        dir.path("started").exists()
    });
    dir.read("started")
        .trim()
        .parse()
        .expect("the marker holds the shell's pid")
}

/// Every committed entry has its manifest (no half entry).
fn assert_no_partial_entries(dir: &Dir) {
    for e in dir.entries() {
        assert!(
            e.join("manifest.json").is_file(),
            "entry without manifest: {}",
            e.display()
        );
    }
}

#[test]
fn kill_9_mid_node_leaves_no_entry_and_the_next_run_completes_it() {
    let dir = Dir::new("kill9");
    let p = dir.pipeline("crashy.yaml", &slow_pipeline("120"));
    dir.write("slow.flag", "");
    let args = ["run", p.as_str(), "--json"];
    let mut child = dir.spawn(&args);
    let pgid = wait_started(&dir, &mut child);
    assert!(
        !group_members(pgid).is_empty(),
        "the stage's process group {pgid} runs before the kill"
    );

    child.kill().expect("SIGKILL pipe"); // std's kill is SIGKILL
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert!(
        status.code().is_none(),
        "pipe should have died of a signal: {status}"
    );
    let out = drain(child, &args);
    assert!(
        out.stdout.is_empty(),
        "a killed run prints no JSON: {}",
        out.stdout
    );
    // the stage's command (its own process group, so no signal to pipe reaches it) and the
    // `sleep` it started are killed by the watchdog when pipe dies
    let t0 = std::time::Instant::now();
    while !group_members(pgid).is_empty() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = group_members(pgid);
    signal(-pgid, libc::SIGKILL);
    assert!(
        left.is_empty(),
        "the killed run's stage command outlived it: pids {left:?} of group {pgid}"
    );

    let show = dir.json(&["show", &p], 0);
    assert_eq!(
        node(&show, "up")["status"],
        "cached",
        "a finished upstream node stays: {show:#}"
    );
    let slow = node(&show, "slow");
    assert_ne!(slow["status"], "cached", "{show:#}");
    assert!(slow["path"].is_null(), "{show:#}");
    let slow_key = slow["key"].as_str().expect("key").to_string();
    assert_no_partial_entries(&dir);
    let keys = dir.entry_keys();
    assert_eq!(keys.len(), 1, "only `up` is committed: {keys:?}");
    assert!(!keys.contains(&slow_key));
    for e in dir.entries() {
        assert!(
            !e.join("partial.txt").exists(),
            "the partial output became an entry"
        );
    }
    let verify = dir.pipe(&["verify"]).code(0);
    assert!(
        verify.stdout.contains("1 entries checked, 0 problem"),
        "{}",
        verify.stdout
    );

    // the next run (no sleep now: same key) completes it; `up` is not recomputed
    std::fs::remove_file(dir.path("slow.flag")).expect("remove the flag");
    let plan = dir.json(&["plan", &p], 0);
    assert_eq!(statuses(&plan)["slow"], "to-run");
    let doc = dir.json(&["run", &p], 0);
    assert_eq!(node(&doc, "up")["status"], "cached");
    assert_eq!(node(&doc, "slow")["status"], "ran");
    assert_eq!(
        node(&doc, "slow")["key"],
        slow_key.as_str(),
        "same node as the killed one"
    );
    assert_eq!(dir.count("runs.log", "up"), 1);
    assert_eq!(dir.count("runs.log", "slow"), 2);
    let show = dir.json(&["show", &p, "slow"], 0);
    let path = node(&show, "slow")["path"]
        .as_str()
        .expect("slow is committed now")
        .to_string();
    assert_eq!(
        std::fs::read_to_string(std::path::Path::new(&path).join("done.txt")).expect("done.txt"),
        "10\n"
    );
    assert_no_partial_entries(&dir);
    // the crashed attempt's staging folder was cleared when the key was taken again
    let tmp: Vec<String> = std::fs::read_dir(dir.store.join("tmp"))
        .expect("tmp/")
        .map(|e| crate::util::file_name(&e.expect("tmp item").path()))
        .filter(|n| n.starts_with(&slow_key))
        .collect();
    assert!(tmp.is_empty(), "leftover staging dirs: {tmp:?}");
    let verify = dir.pipe(&["verify"]).code(0);
    assert!(
        verify.stdout.contains("2 entries checked, 0 problem"),
        "{}",
        verify.stdout
    );
}

#[test]
fn ctrl_c_stops_within_seconds_with_130_and_keeps_finished_nodes() {
    let dir = Dir::new("sigint");
    let p = dir.pipeline("crashy.yaml", &slow_pipeline("5"));
    dir.write("slow.flag", "");
    let args = ["run", p.as_str(), "--json"];
    let mut child = dir.spawn(&args);
    let pgid = wait_started(&dir, &mut child);

    let pid = i32::try_from(child.id()).expect("pid fits i32");
    let t0 = Instant::now();
    assert!(signal(pid, libc::SIGINT), "send SIGINT");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let took = t0.elapsed();
    signal(-pgid, libc::SIGKILL); // in case the stage's command outlived pipe
    let out = drain(child, &args);
    assert_eq!(
        status.code(),
        Some(130),
        "exit code after Ctrl-C\n{}",
        out.stderr
    );
    assert!(
        took < Duration::from_secs(3),
        "pipe took {took:?} to stop after SIGINT"
    );
    let doc = out.json();
    assert_eq!(doc["interrupted"], true);
    assert_eq!(node(&doc, "up")["status"], "ran");
    let st = node(&doc, "slow")["status"]
        .as_str()
        .expect("status")
        .to_string();
    assert!(
        st != "ran" && st != "cached",
        "an interrupted node is not done: {st}"
    );

    let show = dir.json(&["show", &p], 0);
    assert_eq!(node(&show, "up")["status"], "cached");
    assert_ne!(node(&show, "slow")["status"], "cached");
    assert_eq!(dir.entries().len(), 1);
    assert_no_partial_entries(&dir);
    let slow_key = node(&show, "slow")["key"]
        .as_str()
        .expect("key")
        .to_string();
    assert_stopped_cleanly(&dir, &slow_key);

    std::fs::remove_file(dir.path("slow.flag")).expect("remove the flag");
    let doc = dir.json(&["run", &p], 0);
    assert_eq!(
        statuses(&doc),
        crate::util::expect(&[("up", "cached"), ("slow", "ran")])
    );
}

/// After a signal stopped a run: no staging folder is left in `tmp/`, no key lock (nor the
/// store lock) is held, and a new run could take the interrupted node's lock at once.
#[track_caller]
fn assert_stopped_cleanly(dir: &Dir, key: &str) {
    assert_eq!(
        staging_dirs(&dir.store),
        Vec::<String>::new(),
        "staging left behind"
    );
    let lock = dir.store.join("locks").join(format!("{key}.lock"));
    assert!(lock.is_file(), "{} was never taken", lock.display());
    assert!(lock_is_free(&lock), "{} is still held", lock.display());
    assert!(
        lock_is_free(&dir.store.join("lock")),
        "the store lock is still held"
    );
    for l in std::fs::read_dir(dir.store.join("locks"))
        .expect("locks/")
        .flatten()
    {
        assert!(
            lock_is_free(&l.path()),
            "{} is still held",
            l.path().display()
        );
    }
}

#[test]
fn sigterm_stops_within_seconds_with_143_removing_staging_and_releasing_locks() {
    let dir = Dir::new("sigterm");
    let p = dir.pipeline("crashy.yaml", &slow_pipeline("30"));
    dir.write("slow.flag", "");
    let args = ["run", p.as_str(), "--json"];
    let mut child = dir.spawn(&args);
    let pgid = wait_started(&dir, &mut child);
    // the staging folder of `slow` exists while it runs
    assert_eq!(staging_dirs(&dir.store).len(), 1, "one node is staging");

    let pid = i32::try_from(child.id()).expect("pid fits i32");
    let t0 = Instant::now();
    assert!(signal(pid, libc::SIGTERM), "send SIGTERM");
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let took = t0.elapsed();
    let stage_gone = !signal(pgid, 0);
    signal(-pgid, libc::SIGKILL);
    let out = drain(child, &args);
    assert_eq!(
        status.code(),
        Some(143),
        "exit code after SIGTERM\n{}",
        out.stderr
    );
    assert!(
        took < Duration::from_secs(5),
        "pipe took {took:?} to stop after SIGTERM"
    );
    assert!(stage_gone, "the stage's command outlived pipe's SIGTERM");
    assert!(out.stderr.contains("terminating"), "{}", out.stderr);
    let doc = out.json();
    assert_eq!(doc["interrupted"], true);
    assert_eq!(node(&doc, "up")["status"], "ran");
    assert_eq!(node(&doc, "slow")["status"], "skipped");
    let slow_key = node(&doc, "slow")["key"].as_str().expect("key").to_string();
    assert_stopped_cleanly(&dir, &slow_key);
    assert_eq!(
        assert_store_sound(&dir, "after SIGTERM"),
        1,
        "only `up` is committed"
    );

    // the next run starts at once (nothing to wait for) and completes `slow`
    std::fs::remove_file(dir.path("slow.flag")).expect("remove the flag");
    let args = ["run", p.as_str(), "--json"];
    let mut next = dir.spawn(&args);
    let status = wait_exit(&mut next, Duration::from_secs(30));
    let out = drain(next, &args);
    assert_eq!(status.code(), Some(0), "{}", out.stderr);
    assert!(
        !out.stderr.contains("waiting"),
        "the next run waited: {}",
        out.stderr
    );
    assert_eq!(
        statuses(&out.json()),
        crate::util::expect(&[("up", "cached"), ("slow", "ran")])
    );
}

/// What a shell command leaves running in its group when it exits (`cmd &`) is killed then: a
/// leftover that would write into the committed entry a second later never does, and one that
/// holds stderr open does not keep the node, and the run, from finishing.
#[test]
fn leftovers_of_a_finished_command_are_killed_before_its_entry_is_committed() {
    let dir = Dir::new("leftovers");
    let p = dir.pipeline(
        "left.yaml",
        r#"
name: left
stages:
  a:
    kind: shell
    params:
      cmd: |
        echo good > "$PIPE_OUT/v"
        (sleep 1; echo late >> "$PIPE_OUT/v"; echo late > late.marker) </dev/null >/dev/null 2>&1 &
        sleep 60 &
        echo done
"#,
    );
    let args = ["run", p.as_str(), "--json"];
    let mut child = dir.spawn(&args);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let out = drain(child, &args);
    assert_eq!(status.code(), Some(0), "{}", out.stderr);
    assert_eq!(node(&out.json(), "a")["status"], "ran");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !dir.path("late.marker").exists(),
        "a leftover of the command ran on after its node was committed"
    );
    let verify = dir.pipe(&["verify"]).code(0);
    assert!(
        verify.stdout.contains("1 entries checked, 0 problem"),
        "{}",
        verify.stdout
    );
}

/// `pipe run ... 2>&1 | head`: the reader of pipe's output goes away early. The run ignores
/// SIGPIPE, and its progress lines and summary go nowhere instead of panicking on the write:
/// every node runs and the run ends 0.
#[test]
fn a_run_whose_output_reader_has_gone_completes() {
    use std::process::Stdio;
    let dir = Dir::new("epipe");
    let p = dir.pipeline("crashy.yaml", &slow_pipeline("1"));
    dir.write("slow.flag", "");
    let mut child = dir
        .command(&["run", p.as_str(), "--no-progress", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pipe");
    // the reader leaves before pipe writes anything
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status}");
    let show = dir.json(&["show", p.as_str()], 0);
    assert_eq!(
        statuses(&show),
        crate::util::expect(&[("up", "cached"), ("slow", "cached")])
    );
}

/// `pipe gc` during a run waits for the store lock, and says so at the default log level (it
/// may wait for days), then does its work.
#[test]
fn gc_during_a_run_says_it_waits_for_the_store_lock() {
    let dir = Dir::new("gc-wait");
    let p = dir.pipeline("crashy.yaml", &slow_pipeline("2"));
    dir.write("slow.flag", "");
    let args = ["run", p.as_str()];
    let mut run = dir.spawn(&args);
    wait_started(&dir, &mut run);
    let gc = dir.pipe(&["gc", p.as_str()]).code(0);
    assert!(
        gc.stderr.contains("waiting for the exclusive store lock")
            && gc.stderr.contains("`pipe run`"),
        "{}",
        gc.stderr
    );
    let status = wait_exit(&mut run, Duration::from_secs(30));
    drain(run, &args);
    assert_eq!(status.code(), Some(0));
}

/// `nohup pipe run ... &`: a SIGHUP that was ignored when pipe started (the terminal hanging
/// up on a run started under nohup) stays ignored, and the run completes; SIGTERM still stops
/// it as usual (the run above).
#[test]
fn sighup_ignored_at_start_stays_ignored_and_the_run_completes() {
    use std::process::Stdio;
    let dir = Dir::new("nohup");
    let p = dir.pipeline("crashy.yaml", &slow_pipeline("2"));
    dir.write("slow.flag", "");
    // `trap "" HUP` then `exec`: pipe starts with SIGHUP ignored, as under nohup
    let pipe = dir.command(&[]).get_program().to_owned();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("trap '' HUP; exec \"$0\" \"$@\"")
        .arg(pipe)
        .args(["--store", dir.store.to_str().expect("utf-8 store path")])
        .args(["run", p.as_str(), "--json"])
        .current_dir(&dir.root)
        .env_remove("PIPE_STORE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pipe under sh");
    wait_started(&dir, &mut child);
    let pid = i32::try_from(child.id()).expect("pid fits i32");
    assert!(signal(pid, libc::SIGHUP), "send SIGHUP");
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let out = drain(child, &["run"]);
    assert_eq!(status.code(), Some(0), "{}", out.stderr);
    assert!(!out.stderr.contains("terminating"), "{}", out.stderr);
    assert_eq!(
        statuses(&out.json()),
        crate::util::expect(&[("up", "ran"), ("slow", "ran")])
    );
}

#[test]
fn sigterm_while_waiting_for_a_lock_stops_the_waiter_only() {
    let dir = Dir::new("sigterm-wait");
    let p = dir.pipeline("crashy.yaml", &slow_pipeline("4"));
    dir.write("slow.flag", "");
    let args = ["run", p.as_str(), "--json"];
    let mut holder = dir.spawn(&args);
    let pgid = wait_started(&dir, &mut holder);
    let mut waiter = Watched::spawn(&dir, &args);
    waiter.wait_for("waiting slow for its lock", Duration::from_secs(20));
    let pid = i32::try_from(waiter.child.id()).expect("pid fits i32");
    let t0 = Instant::now();
    assert!(signal(pid, libc::SIGTERM), "send SIGTERM");
    let (status, out) = waiter.finish(Duration::from_secs(20));
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(143), "{}", out.stderr);
    assert!(
        took < Duration::from_secs(5),
        "the waiter took {took:?} to stop"
    );
    assert_eq!(node(&out.json(), "slow")["status"], "skipped");

    // the holder was not disturbed: it finishes `slow`
    let status = wait_exit(&mut holder, Duration::from_secs(30));
    signal(-pgid, libc::SIGKILL);
    let out = drain(holder, &args);
    assert_eq!(status.code(), Some(0), "{}", out.stderr);
    assert_eq!(node(&out.json(), "slow")["status"], "ran");
    assert_eq!(dir.count("runs.log", "slow"), 1, "`slow` ran once");
    assert_eq!(assert_store_sound(&dir, "after the holder finished"), 2);
    assert_eq!(staging_dirs(&dir.store), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// kill -9 at random moments, repeatedly
// ---------------------------------------------------------------------------------------------

/// Size of `gen`'s big output: a few MB, so hashing and fsync take a moment.
const BIG: usize = 3_000_000;

/// gen writes three files (one of 3 MB) in two folders; copy copies the big one and measures
/// it; head reads its start and the small one; join needs copy and head. Every command appends
/// `<round> <stage>` to `runs.log`. A new round gives every node a new key.
fn loop_pipeline(round: usize) -> String {
    format!(
        r#"
name: crashloop
defaults:
  shell: {{round: {round}}}
stages:
  gen:
    kind: shell
    params:
      cmd: |
        echo "$PIPE_PARAM_round gen" >> runs.log
        yes "gen $PIPE_PARAM_round" | head -c {BIG} > "$PIPE_OUT/big.bin"
        echo "small $PIPE_PARAM_round" > "$PIPE_OUT/small.txt"
        mkdir -p "$PIPE_OUT/sub"
        echo "round $PIPE_PARAM_round" > "$PIPE_OUT/sub/meta.txt"
      outputs: [big.bin, small.txt, sub/meta.txt]
  copy:
    kind: shell
    inputs: {{g: gen}}
    params:
      cmd: |
        echo "$PIPE_PARAM_round copy" >> runs.log
        cp "$PIPE_IN_g/big.bin" "$PIPE_OUT/copy.bin"
        wc -c < "$PIPE_IN_g/big.bin" | tr -d ' ' > "$PIPE_OUT/size.txt"
      outputs: [copy.bin, size.txt]
  head:
    kind: shell
    inputs: {{g: gen}}
    params:
      cmd: |
        echo "$PIPE_PARAM_round head" >> runs.log
        head -c 20 "$PIPE_IN_g/big.bin" > "$PIPE_OUT/head.txt"
        cat "$PIPE_IN_g/small.txt" "$PIPE_IN_g/sub/meta.txt" >> "$PIPE_OUT/head.txt"
      outputs: [head.txt]
  join:
    kind: shell
    inputs: {{c: copy, h: head}}
    params:
      cmd: |
        echo "$PIPE_PARAM_round join" >> runs.log
        cat "$PIPE_IN_c/size.txt" "$PIPE_IN_h/head.txt" > "$PIPE_OUT/join.txt"
      outputs: [join.txt]
"#
    )
}

/// The bytes `gen` writes into big.bin in `round`.
fn big_bytes(round: usize) -> Vec<u8> {
    format!("gen {round}\n").bytes().cycle().take(BIG).collect()
}

/// Checks every output of `round` against what the commands must have written.
#[track_caller]
fn assert_loop_outputs(dir: &Dir, p: &str, round: usize) {
    let show = dir.json(&["show", p], 0);
    let read = |id: &str, file: &str| -> Vec<u8> {
        let path = node(&show, id)["path"]
            .as_str()
            .unwrap_or_else(|| panic!("round {round}: {id} is not committed: {show:#}"))
            .to_string();
        std::fs::read(Path::new(&path).join(file))
            .unwrap_or_else(|e| panic!("round {round}: {id}/{file}: {e}"))
    };
    let big = big_bytes(round);
    assert!(
        read("gen", "big.bin") == big,
        "round {round}: gen/big.bin differs"
    );
    assert!(
        read("copy", "copy.bin") == big,
        "round {round}: copy/copy.bin differs"
    );
    assert_eq!(read("copy", "size.txt"), format!("{BIG}\n").into_bytes());
    let head = format!(
        "{}small {round}\nround {round}\n",
        String::from_utf8_lossy(&big[..20])
    );
    assert_eq!(String::from_utf8_lossy(&read("head", "head.txt")), head);
    assert_eq!(
        String::from_utf8_lossy(&read("join", "join.txt")),
        format!("{BIG}\n{head}")
    );
}

/// Where a killed run was, read from its `PIPE_LOG=pipe_cache=debug,pipe_engine=info` stderr:
/// for each key its last step (waiting for the lock, lock taken, stage running, hashing, manifest
/// written, renamed); the steps of the keys still in flight at the kill.
fn phases_at_kill(stderr: &str) -> Vec<&'static str> {
    let mut last: BTreeMap<String, &'static str> = BTreeMap::new();
    for raw in stderr.lines() {
        let line = strip_ansi(raw);
        let Some(at) = line.find("key=") else {
            continue;
        };
        let key: String = line[at + 4..].chars().take(12).collect();
        let phase = if line.contains("waiting for lock on") {
            "waiting for a key lock"
        } else if line.contains("key lock taken") {
            "lock taken, before the stage"
        } else if line.contains("commit: hashing outputs") {
            "hashing and fsyncing outputs"
        } else if line.contains("commit: manifest written") {
            "manifest written, before the rename"
        } else if line.contains("commit: renamed into entries")
            || line.contains("already committed by another writer")
        {
            "committed"
        } else if line.contains(" start") {
            "stage running (staging)"
        } else {
            continue;
        };
        last.insert(key, phase);
    }
    let mut inflight: Vec<&'static str> = last
        .values()
        .copied()
        .filter(|p| *p != "committed")
        .collect();
    if inflight.is_empty() {
        inflight.push(if last.is_empty() {
            "before any node started"
        } else {
            "between nodes (nothing in flight)"
        });
    }
    inflight
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Starts `pipe run P -j 2` logging its steps; with `pause`, each commit sleeps 30 ms twice
/// (a debug-build hook) so that kills land inside commits often.
fn spawn_logged(dir: &Dir, p: &str, pause: bool) -> Child {
    let mut cmd = dir.command(&["run", p, "--json", "-j", "2"]);
    cmd.env("PIPE_LOG", "pipe_cache=debug,pipe_engine=info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if pause {
        cmd.env("PIPE_CACHE_TEST_PAUSE_MS", "30");
    }
    cmd.spawn().expect("start pipe")
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `kill -9` of `pipe run` at seeded random moments, `PIPE_TEST_KILL_ITERATIONS` times (30 by
/// default; `PIPE_TEST_SEED` picks another sequence). Half the iterations run two `pipe run`s of
/// the pipeline at once and kill one of them (holder or waiter of a key lock); the other must
/// still finish. Half set the commit-pause hook so kills land inside commits. After each kill:
/// every manifest parses, `pipe verify` is clean, and the next run completes with every output
/// right and no staging folder left.
#[test]
fn kill_9_at_random_moments_never_leaves_a_partial_or_unreadable_entry() {
    let iterations = env_number("PIPE_TEST_KILL_ITERATIONS", 30);
    let seed = env_number("PIPE_TEST_SEED", 0x5eed_2026);
    let mut rng = Rng::new(seed);
    let dir = Dir::new("killloop");

    // calibration: how long an undisturbed run takes here (the median of three)
    let mut took = Vec::new();
    for round in 0..3 {
        let p = dir.pipeline("loop.yaml", &loop_pipeline(1000 + round));
        let t0 = Instant::now();
        let doc = dir.json(&["run", &p, "-j", "2"], 0);
        took.push(t0.elapsed());
        assert_eq!(doc["ran"], 4);
        assert_loop_outputs(&dir, &p, 1000 + round);
    }
    took.sort();
    let full = took[1];

    let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
    let (mut pairs, mut survivors_waited, mut strays) = (0, 0, 0);
    for round in 1..=iterations as usize {
        let p = dir.pipeline("loop.yaml", &loop_pipeline(round));
        let pair = rng.below(2) == 0;
        let pause = rng.below(2) == 0;
        // two runs at once share 2 cores; the pause adds 60 ms per commit, two at a time
        let window =
            full.as_millis() as u64 * if pair { 3 } else { 2 } / 2 + if pause { 120 } else { 0 };
        let delay = Duration::from_millis(rng.below(window.max(1)));
        let victim_index = usize::from(pair && rng.below(2) == 0);
        let mut children = vec![spawn_logged(&dir, &p, pause)];
        if pair {
            pairs += 1;
            children.push(spawn_logged(&dir, &p, pause));
        }
        std::thread::sleep(delay);
        let mut victim = children.remove(victim_index);
        let _ = victim.kill(); // SIGKILL; it may have finished already
        let status = wait_exit(&mut victim, Duration::from_secs(10));
        let out = drain(victim, &["run", &p]);
        let context = format!(
            "round {round} (seed {seed:#x}, kill after {delay:?}, pair {pair}, pause {pause})"
        );
        if status.code().is_some() {
            assert_eq!(status.code(), Some(0), "{context}: {}", out.stderr);
            *seen.entry("finished before the kill").or_default() += 1;
        } else {
            for phase in phases_at_kill(&out.stderr) {
                *seen.entry(phase).or_default() += 1;
            }
        }
        let keep: Vec<u32> = children.iter().map(Child::id).collect();
        strays += kill_strays(&dir.root, &keep);
        for mut other in children {
            let status = wait_exit(&mut other, Duration::from_secs(60));
            let out = drain(other, &["run", &p]);
            assert_eq!(
                status.code(),
                Some(0),
                "{context}: the other run failed:\n{}",
                out.stderr
            );
            if out.stderr.contains("waiting for lock") {
                survivors_waited += 1;
            }
        }
        strays += kill_strays(&dir.root, &[]);

        assert_store_sound(&dir, &context);
        let doc = dir.json(&["run", &p, "-j", "2"], 0);
        for (id, st) in statuses(&doc) {
            assert!(st == "ran" || st == "cached", "{context}: {id} is {st}");
        }
        assert_loop_outputs(&dir, &p, round);
        assert_eq!(staging_dirs(&dir.store), Vec::<String>::new(), "{context}");
        assert_store_sound(&dir, &context);
        if round % 10 == 0 {
            dir.pipe(&["gc", &p]).code(0);
            assert_eq!(
                dir.entries().len(),
                4,
                "{context}: gc keeps this round only"
            );
        }
    }
    eprintln!(
        "kill loop: {iterations} iterations (seed {seed:#x}, undisturbed run {full:?}), \
         {pairs} with two concurrent runs ({survivors_waited} survivors waited on a lock), \
         {strays} stray stage processes killed; where the kills landed: {seen:#?}"
    );
}
