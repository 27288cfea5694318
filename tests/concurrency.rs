//! Concurrent `pipe run`s on one store: two runs of one pipeline, and four runs of different,
//! overlapping pipelines, all succeed and compute every node exactly once (the per-key lock
//! makes the loser see the winner's entry); a run killed while it holds a key lock does not
//! block the others (the kernel drops a dead process's `flock`s).

use std::collections::BTreeMap;

use crate::util::{Dir, Output, key_of, statuses};

/// a, b independent; c needs both; d needs c. Each appends `<round> <stage>` to `runs.log`
/// when it starts, then sleeps a little so the two runs overlap.
fn diamond(round: u32) -> String {
    format!(
        r#"
name: diamond
defaults:
  shell: {{round: {round}}}
stages:
  a:
    kind: shell
    params:
      cmd: echo "$PIPE_PARAM_round a" >> runs.log; sleep 0.3; echo 1 > "$PIPE_OUT/v"
  b:
    kind: shell
    params:
      cmd: echo "$PIPE_PARAM_round b" >> runs.log; sleep 0.3; echo 2 > "$PIPE_OUT/v"
  c:
    kind: shell
    inputs: {{x: a, y: b}}
    params:
      cmd: |
        echo "$PIPE_PARAM_round c" >> runs.log
        sleep 0.3
        echo $(( $(cat "$PIPE_IN_x/v") + $(cat "$PIPE_IN_y/v") )) > "$PIPE_OUT/v"
  d:
    kind: shell
    inputs: {{x: c}}
    params:
      cmd: echo "$PIPE_PARAM_round d" >> runs.log; sleep 0.3; echo $(( $(cat "$PIPE_IN_x/v") * 3 )) > "$PIPE_OUT/v"
"#
    )
}

fn run_two_at_once(dir: &Dir, pipeline: &str) -> (Output, Output) {
    let args = ["run", pipeline, "--json", "-j", "2"];
    let barrier = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        let spawn = || {
            s.spawn(|| {
                let mut cmd = dir.command(&args);
                barrier.wait();
                Output::from_process(&args, cmd.output().expect("start pipe"))
            })
        };
        let (one, two) = (spawn(), spawn());
        (
            one.join().expect("first run thread"),
            two.join().expect("second run thread"),
        )
    })
}

#[test]
fn two_concurrent_runs_both_succeed_and_compute_each_node_once() {
    let dir = Dir::new("concurrent");
    for round in 0..2 {
        let p = dir.pipeline("diamond.yaml", &diamond(round));
        let (one, two) = run_two_at_once(&dir, &p);
        let (one, two) = (one.code(0).json(), two.code(0).json());
        let (s1, s2) = (statuses(&one), statuses(&two));
        let ids: Vec<&str> = s1.keys().map(String::as_str).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert_eq!(s1.keys().collect::<Vec<_>>(), s2.keys().collect::<Vec<_>>());
        let mut ran = BTreeMap::new();
        for id in s1.keys() {
            let mut pair = [s1[id].as_str(), s2[id].as_str()];
            pair.sort();
            assert_eq!(
                pair,
                ["cached", "ran"],
                "round {round}, node {id}: one run computes it, the other reuses it"
            );
            ran.insert(id.clone(), dir.count("runs.log", &format!("{round} {id}")));
        }
        assert_eq!(
            ran.values().copied().collect::<Vec<_>>(),
            [1, 1, 1, 1],
            "command runs per node, round {round}"
        );
        assert_eq!(
            one["ran"].as_u64().expect("ran") + two["ran"].as_u64().expect("ran"),
            4
        );
        for id in s1.keys() {
            assert_eq!(key_of(&one, id), key_of(&two, id), "node {id}");
        }
    }
    // both rounds are in the store, each entry complete, and the values are right
    assert_eq!(dir.entries().len(), 8);
    for e in dir.entries() {
        assert!(e.join("manifest.json").is_file(), "{}", e.display());
    }
    dir.pipe(&["verify"]).code(0);
    let p = dir.pipeline("diamond.yaml", &diamond(1));
    let show = dir.json(&["show", &p, "d"], 0);
    let path = crate::util::node(&show, "d")["path"]
        .as_str()
        .expect("d committed")
        .to_string();
    assert_eq!(
        std::fs::read_to_string(std::path::Path::new(&path).join("v")).expect("v"),
        "9\n"
    );
}

/// Stage definitions shared by the overlapping pipelines below (same definition, same key, in
/// whichever file): each appends `<round> <name>` to `runs.log`, sleeps a little so the runs
/// overlap, and writes a number into `v`.
fn stage(name: &str) -> &'static str {
    match name {
        "a" => {
            "    kind: shell\n    params:\n      cmd: echo \"$PIPE_PARAM_round a\" >> runs.log; sleep 0.2; echo 1 > \"$PIPE_OUT/v\"\n"
        }
        "b" => {
            "    kind: shell\n    inputs: {x: a}\n    params:\n      cmd: echo \"$PIPE_PARAM_round b\" >> runs.log; sleep 0.2; echo $(( $(cat \"$PIPE_IN_x/v\") + 1 )) > \"$PIPE_OUT/v\"\n"
        }
        "c" => {
            "    kind: shell\n    inputs: {x: b}\n    params:\n      cmd: echo \"$PIPE_PARAM_round c\" >> runs.log; sleep 0.2; echo $(( $(cat \"$PIPE_IN_x/v\") * 10 )) > \"$PIPE_OUT/v\"\n"
        }
        "d" => {
            "    kind: shell\n    inputs: {x: b}\n    params:\n      cmd: echo \"$PIPE_PARAM_round d\" >> runs.log; sleep 0.2; echo $(( $(cat \"$PIPE_IN_x/v\") + 5 )) > \"$PIPE_OUT/v\"\n"
        }
        "e" => {
            "    kind: shell\n    inputs: {x: a}\n    params:\n      cmd: echo \"$PIPE_PARAM_round e\" >> runs.log; sleep 0.2; echo $(( $(cat \"$PIPE_IN_x/v\") * 3 )) > \"$PIPE_OUT/v\"\n"
        }
        _ => {
            "    kind: shell\n    params:\n      cmd: echo \"$PIPE_PARAM_round f\" >> runs.log; sleep 0.2; echo 9 > \"$PIPE_OUT/v\"\n"
        }
    }
}

/// A pipeline of the given stages (from [`stage`]) in `round`.
fn overlapping(name: &str, stages: &[&str], round: u32) -> String {
    let mut y = format!("name: {name}\ndefaults:\n  shell: {{round: {round}}}\nstages:\n");
    for s in stages {
        y.push_str(&format!("  {s}:\n{}", stage(s)));
    }
    y
}

#[test]
fn four_concurrent_runs_of_overlapping_pipelines_compute_every_node_once() {
    let dir = Dir::new("four");
    let pipelines: [(&str, &[&str]); 4] = [
        ("p1", &["a", "b", "c"]),
        ("p2", &["a", "b", "d"]),
        ("p3", &["a", "e"]),
        ("p4", &["a", "b", "c", "d", "e", "f"]),
    ];
    let expected = [
        ("a", "1"),
        ("b", "2"),
        ("c", "20"),
        ("d", "7"),
        ("e", "3"),
        ("f", "9"),
    ];
    for round in 0..2 {
        let files: Vec<String> = pipelines
            .iter()
            .map(|(name, stages)| {
                dir.pipeline(&format!("{name}.yaml"), &overlapping(name, stages, round))
            })
            .collect();
        let barrier = std::sync::Barrier::new(files.len());
        let (dir, barrier) = (&dir, &barrier);
        let outs: Vec<Output> = std::thread::scope(|s| {
            let handles: Vec<_> = files
                .iter()
                .map(|f| {
                    s.spawn(move || {
                        let args = ["run", f.as_str(), "--json", "-j", "2"];
                        let mut child = {
                            barrier.wait();
                            dir.spawn(&args)
                        };
                        // a deadlock shows up as a timeout here
                        crate::util::wait_exit(&mut child, std::time::Duration::from_secs(90));
                        crate::util::drain(child, &args)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("run thread"))
                .collect()
        });
        let mut ran = 0;
        for out in outs {
            let out = out.code(0);
            assert!(
                !out.stderr.contains("FAILED") && !out.stderr.contains("error"),
                "round {round}: {}",
                out.stderr
            );
            let doc = out.json();
            assert_eq!(doc["failed"], 0, "round {round}");
            for (id, st) in statuses(&doc) {
                assert!(st == "ran" || st == "cached", "round {round}: {id} is {st}");
            }
            ran += doc["ran"].as_u64().expect("ran");
        }
        assert_eq!(
            ran, 6,
            "round {round}: six distinct nodes, each computed by one run"
        );
        for (id, _) in expected {
            assert_eq!(
                dir.count("runs.log", &format!("{round} {id}")),
                1,
                "round {round}: command runs of {id}"
            );
        }
        let show = dir.json(&["show", &files[3]], 0);
        for (id, v) in expected {
            let path = crate::util::node(&show, id)["path"]
                .as_str()
                .unwrap_or_else(|| panic!("{id} committed"))
                .to_string();
            assert_eq!(
                std::fs::read_to_string(std::path::Path::new(&path).join("v")).expect("v"),
                format!("{v}\n"),
                "round {round}: value of {id}"
            );
        }
    }
    assert_eq!(
        crate::util::assert_store_sound(&dir, "after both rounds"),
        12
    );
    assert_eq!(crate::util::staging_dirs(&dir.store), Vec::<String>::new());
}

#[test]
fn a_run_killed_while_holding_a_key_lock_does_not_block_the_others() {
    use std::time::Duration;

    use crate::util::{Watched, kill_strays, signal, wait_exit, wait_until};

    let dir = Dir::new("killed-holder");
    let p = dir.pipeline(
        "held.yaml",
        r#"
name: held
stages:
  up:
    kind: shell
    params:
      cmd: echo up >> runs.log; echo 5 > "$PIPE_OUT/v"
  slow:
    kind: shell
    inputs: {up: up}
    params:
      cmd: |
        echo slow >> runs.log
        if [ -e slow.flag ]; then
          echo $$ > started.tmp && mv started.tmp started
          sleep 30
        fi
        echo $(( $(cat "$PIPE_IN_up/v") * 2 )) > "$PIPE_OUT/v"
"#,
    );
    dir.write("slow.flag", "");
    let args = ["run", p.as_str(), "--json"];
    let mut holder = dir.spawn(&args);
    wait_until(
        Duration::from_secs(20),
        "the holder to start `slow`",
        || dir.path("started").exists(),
    );
    let pgid: i32 = dir.read("started").trim().parse().expect("pid in marker");
    let mut others: Vec<Watched> = (0..3).map(|_| Watched::spawn(&dir, &args)).collect();
    // each reaches `slow` and blocks on its lock, held by the holder (and says so)
    for o in &mut others {
        o.wait_for("waiting slow for its lock", Duration::from_secs(30));
    }
    std::fs::remove_file(dir.path("slow.flag")).expect("remove the flag");
    holder.kill().expect("SIGKILL the holder");
    wait_exit(&mut holder, Duration::from_secs(10));
    signal(-pgid, libc::SIGKILL); // its stage command, in its own process group
    let keep: Vec<u32> = others.iter().map(|o| o.child.id()).collect();
    kill_strays(&dir.root, &keep);

    let mut ran = 0;
    for o in others {
        let (status, out) = o.finish(Duration::from_secs(60));
        assert_eq!(status.code(), Some(0), "{}", out.stderr);
        let st = crate::util::node(&out.json(), "slow")["status"]
            .as_str()
            .expect("status")
            .to_string();
        assert!(st == "ran" || st == "cached", "{st}");
        ran += usize::from(st == "ran");
    }
    assert_eq!(ran, 1, "exactly one of the others computed `slow`");
    assert_eq!(
        dir.count("runs.log", "slow"),
        2,
        "the killed attempt and one recompute"
    );
    assert_eq!(dir.count("runs.log", "up"), 1);
    assert_eq!(crate::util::assert_store_sound(&dir, "after the kill"), 2);
    assert_eq!(crate::util::staging_dirs(&dir.store), Vec::<String>::new());
    let show = dir.json(&["show", &p, "slow"], 0);
    let path = crate::util::node(&show, "slow")["path"]
        .as_str()
        .expect("committed")
        .to_string();
    assert_eq!(
        std::fs::read_to_string(std::path::Path::new(&path).join("v")).expect("v"),
        "10\n"
    );
}
