//! Two `pipe run`s of one pipeline on one store at the same time: both succeed and every node
//! is computed exactly once (the per-key lock makes the loser see the winner's entry).

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
