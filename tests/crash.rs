//! Crashes and interrupts: `kill -9` of `pipe` mid-node leaves no entry and the next run
//! completes the node; Ctrl-C stops within seconds with exit code 130, keeping finished nodes.

use std::time::{Duration, Instant};

use crate::util::{Dir, drain, node, signal, statuses, wait_exit, wait_until};

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
    let p = dir.pipeline("crashy.yaml", &slow_pipeline("3"));
    dir.write("slow.flag", "");
    let args = ["run", p.as_str(), "--json"];
    let mut child = dir.spawn(&args);
    let pgid = wait_started(&dir, &mut child);

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
    // the stage's own process group outlives pipe (it is its own group): end it too
    signal(-pgid, libc::SIGKILL);

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

    std::fs::remove_file(dir.path("slow.flag")).expect("remove the flag");
    let doc = dir.json(&["run", &p], 0);
    assert_eq!(
        statuses(&doc),
        crate::util::expect(&[("up", "cached"), ("slow", "ran")])
    );
}
