//! Caching: a second run computes nothing, `--set` reruns exactly the changed node and what
//! depends on it, and a sweep shares its upstream node.

use crate::util::{Dir, expect, key_of, node, statuses};

/// numbers -> total: `seq 1 n`, then the sum. Each command appends its name to `runs.log`.
const ARITH: &str = r#"
name: arith
stages:
  numbers:
    kind: shell
    params:
      n: 4
      cmd: |
        echo numbers >> runs.log
        seq 1 "$PIPE_PARAM_n" > "$PIPE_OUT/numbers.txt"
      outputs: [numbers.txt]
  total:
    kind: shell
    inputs: {numbers: numbers}
    params:
      cmd: |
        echo total >> runs.log
        awk '{ s += $1 } END { print s }' "$PIPE_IN_numbers/numbers.txt" > "$PIPE_OUT/total.txt"
      outputs: [total.txt]
"#;

/// Reads `file` from the committed entry of node `id` (its path from `pipe show --json`).
pub fn entry_file(dir: &Dir, pipeline: &str, id: &str, file: &str) -> String {
    let doc = dir.json(&["show", pipeline, id], 0);
    let path = node(&doc, id)["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{id} has no entry: {doc:#}"))
        .to_string();
    std::fs::read_to_string(std::path::Path::new(&path).join(file))
        .unwrap_or_else(|e| panic!("read {file} of {id} in {path}: {e}"))
}

#[test]
fn second_run_is_all_cached() {
    let dir = Dir::new("twice");
    let p = dir.pipeline("arith.yaml", ARITH);

    let first = dir.json(&["run", &p], 0);
    assert_eq!(
        statuses(&first),
        expect(&[("numbers", "ran"), ("total", "ran")])
    );
    assert_eq!(
        (first["ran"].as_u64(), first["cached"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(first["pipeline"], "arith");
    assert_eq!(
        entry_file(&dir, &p, "numbers", "numbers.txt"),
        "1\n2\n3\n4\n"
    );
    assert_eq!(entry_file(&dir, &p, "total", "total.txt"), "10\n");

    let second = dir.json(&["run", &p], 0);
    assert_eq!(
        statuses(&second),
        expect(&[("numbers", "cached"), ("total", "cached")])
    );
    assert_eq!(second["ran"], 0);
    assert_eq!(second["cached"], 2);
    assert_eq!(
        (second["failed"].as_u64(), second["skipped"].as_u64()),
        (Some(0), Some(0))
    );
    for id in ["numbers", "total"] {
        assert_eq!(
            key_of(&first, id),
            key_of(&second, id),
            "key of {id} changed between runs"
        );
        assert_eq!(key_of(&first, id).len(), 64);
    }
    // the commands really ran once each
    assert_eq!(dir.lines("runs.log"), ["numbers", "total"]);

    let plan = dir.json(&["plan", &p], 0);
    assert_eq!(
        statuses(&plan),
        expect(&[("numbers", "cached"), ("total", "cached")])
    );
    assert_eq!(
        (plan["cached"].as_u64(), plan["to_run"].as_u64()),
        (Some(2), Some(0))
    );
}

#[test]
fn changing_a_param_in_the_file_reruns_downstream_only() {
    let dir = Dir::new("edit");
    let p = dir.pipeline("arith.yaml", ARITH);
    dir.json(&["run", &p], 0);
    // editing the file: same as --set, but through the YAML
    let p = dir.pipeline("arith.yaml", &ARITH.replace("n: 4", "n: 5"));
    let doc = dir.json(&["run", &p], 0);
    assert_eq!(
        statuses(&doc),
        expect(&[("numbers", "ran"), ("total", "ran")])
    );
    assert_eq!(entry_file(&dir, &p, "total", "total.txt"), "15\n");
    // YAML key order inside params does not change keys
    let reordered = ARITH.replace(
        "      n: 4\n      cmd: |\n        echo numbers >> runs.log\n        seq 1 \"$PIPE_PARAM_n\" > \"$PIPE_OUT/numbers.txt\"\n",
        "      cmd: |\n        echo numbers >> runs.log\n        seq 1 \"$PIPE_PARAM_n\" > \"$PIPE_OUT/numbers.txt\"\n      n: 4\n",
    );
    assert_ne!(reordered, ARITH, "the replacement must apply");
    let p = dir.pipeline("arith.yaml", &reordered);
    let doc = dir.json(&["run", &p], 0);
    assert_eq!(
        statuses(&doc),
        expect(&[("numbers", "cached"), ("total", "cached")])
    );
}

/// a -> b -> c, and an independent d. Each writes a number derived from its input.
const CHAIN: &str = r#"
name: chain
stages:
  a:
    kind: shell
    params:
      x: 1
      cmd: echo a >> runs.log; echo "$PIPE_PARAM_x" > "$PIPE_OUT/v"
  b:
    kind: shell
    inputs: {up: a}
    params:
      x: 2
      cmd: echo b >> runs.log; echo $(( $(cat "$PIPE_IN_up/v") + PIPE_PARAM_x )) > "$PIPE_OUT/v"
  c:
    kind: shell
    inputs: {up: b}
    params:
      cmd: echo c >> runs.log; echo $(( $(cat "$PIPE_IN_up/v") * 10 )) > "$PIPE_OUT/v"
  d:
    kind: shell
    params:
      cmd: echo d >> runs.log; echo 7 > "$PIPE_OUT/v"
"#;

#[test]
fn set_on_a_middle_node_reruns_exactly_it_and_its_descendants() {
    let dir = Dir::new("set");
    let p = dir.pipeline("chain.yaml", CHAIN);
    let first = dir.json(&["run", &p], 0);
    assert_eq!(first["ran"], 4);
    assert_eq!(entry_file(&dir, &p, "c", "v"), "30\n");

    let plan = dir.json(&["plan", &p, "--set", "b.x=5"], 0);
    assert_eq!(
        statuses(&plan),
        expect(&[
            ("a", "cached"),
            ("b", "to-run"),
            ("c", "to-run"),
            ("d", "cached")
        ])
    );
    let why_b = node(&plan, "b")["reason"]
        .as_str()
        .expect("b has a reason")
        .to_string();
    assert!(
        why_b.contains("x: 2 -> 5"),
        "b's reason should name the param change: {why_b}"
    );
    let why_c = node(&plan, "c")["reason"]
        .as_str()
        .expect("c has a reason")
        .to_string();
    assert!(
        why_c.contains("input"),
        "c's reason should say its input changed: {why_c}"
    );
    assert!(
        node(&plan, "a").get("reason").is_none(),
        "a cached node has no reason: {plan:#}"
    );
    assert_eq!(
        (plan["cached"].as_u64(), plan["to_run"].as_u64()),
        (Some(2), Some(2))
    );
    // plan computes nothing
    assert_eq!(dir.lines("runs.log").len(), 4);

    let doc = dir.json(&["run", &p, "--set", "b.x=5"], 0);
    assert_eq!(
        statuses(&doc),
        expect(&[("a", "cached"), ("b", "ran"), ("c", "ran"), ("d", "cached")])
    );
    assert_eq!(
        (doc["ran"].as_u64(), doc["cached"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(key_of(&doc, "a"), key_of(&first, "a"));
    assert_eq!(key_of(&doc, "d"), key_of(&first, "d"));
    assert_ne!(key_of(&doc, "b"), key_of(&first, "b"));
    assert_ne!(key_of(&doc, "c"), key_of(&first, "c"));
    let counts: Vec<usize> = ["a", "b", "c", "d"]
        .iter()
        .map(|s| dir.count("runs.log", s))
        .collect();
    assert_eq!(counts, [1, 2, 2, 1], "a, b, c, d command runs");
    assert_eq!(
        entry_file(&dir, &p, "c", "v"),
        "30\n",
        "without --set, c is the old node"
    );
    let out = dir
        .pipe(&["show", &p, "c", "--json", "--set", "b.x=5"])
        .code(0)
        .json();
    let path = node(&out, "c")["path"]
        .as_str()
        .expect("c is committed")
        .to_string();
    assert_eq!(
        std::fs::read_to_string(std::path::Path::new(&path).join("v")).expect("c's v"),
        "60\n"
    );

    // both versions stay in the store: back to the file's value, everything is cached
    let back = dir.json(&["run", &p], 0);
    assert_eq!(back["ran"], 0);
    assert_eq!(back["cached"], 4);
}

/// a -> b (swept over n) -> c, and `report` gathering every b.
const SWEEP: &str = r#"
name: sweep
stages:
  a:
    kind: shell
    params:
      cmd: echo a >> runs.log; echo 10 > "$PIPE_OUT/v"
  b:
    kind: shell
    inputs: {up: a}
    sweep: {n: [1, 2, 3]}
    params:
      cmd: echo "b $PIPE_PARAM_n" >> runs.log; echo $(( $(cat "$PIPE_IN_up/v") * PIPE_PARAM_n )) > "$PIPE_OUT/v"
  c:
    kind: shell
    inputs: {up: b}
    params:
      cmd: echo c >> runs.log; echo $(( $(cat "$PIPE_IN_up/v") + 1 )) > "$PIPE_OUT/v"
  report:
    kind: shell
    inputs: {rows: "b[*]"}
    params:
      cmd: |
        echo report >> runs.log
        printf '%s\n' "$PIPE_IN_rows" > "$PIPE_OUT/rows.txt"
        for d in $(echo "$PIPE_IN_rows" | tr ':' ' '); do cat "$d/v"; done | sort -n > "$PIPE_OUT/values.txt"
      outputs: [rows.txt, values.txt]
"#;

#[test]
fn sweep_shares_the_upstream_node_fans_out_and_gathers() {
    let dir = Dir::new("sweep");
    let p = dir.pipeline("sweep.yaml", SWEEP);
    let doc = dir.json(&["run", &p], 0);
    assert_eq!(
        statuses(&doc),
        expect(&[
            ("a", "ran"),
            ("b[n=1]", "ran"),
            ("b[n=2]", "ran"),
            ("b[n=3]", "ran"),
            ("c[n=1]", "ran"),
            ("c[n=2]", "ran"),
            ("c[n=3]", "ran"),
            ("report", "ran"),
        ])
    );
    assert_eq!(node(&doc, "b[n=2]")["stage"], "b");
    assert_eq!(node(&doc, "c[n=3]")["stage"], "c");
    // a ran once, each b once
    assert_eq!(dir.count("runs.log", "a"), 1);
    for n in 1..=3 {
        assert_eq!(dir.count("runs.log", &format!("b {n}")), 1);
    }
    assert_eq!(dir.count("runs.log", "c"), 3);
    assert_eq!(dir.count("runs.log", "report"), 1);
    // values: b = 10 n, c = 10 n + 1
    for n in 1..=3 {
        assert_eq!(
            entry_file(&dir, &p, &format!("b[n={n}]"), "v"),
            format!("{}\n", 10 * n)
        );
        assert_eq!(
            entry_file(&dir, &p, &format!("c[n={n}]"), "v"),
            format!("{}\n", 10 * n + 1)
        );
    }
    assert_eq!(entry_file(&dir, &p, "report", "values.txt"), "10\n20\n30\n");
    // PIPE_IN_rows is exactly the three b entry folders
    let rows = entry_file(&dir, &p, "report", "rows.txt");
    let mut got: Vec<String> = rows.trim_end().split(':').map(String::from).collect();
    got.sort();
    let show = dir.json(&["show", &p, "b"], 0);
    let mut want: Vec<String> = show["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["path"].as_str().expect("b is committed").to_string())
        .collect();
    want.sort();
    assert_eq!(want.len(), 3, "{show:#}");
    assert_eq!(got, want);

    // one more value: only the new b and c, and the report, run
    let doc = dir.json(&["run", &p, "--sweep", "b.n=1,2,3,4"], 0);
    let st = statuses(&doc);
    assert_eq!(st["a"], "cached");
    assert_eq!(
        (
            st["b[n=4]"].as_str(),
            st["c[n=4]"].as_str(),
            st["report"].as_str()
        ),
        ("ran", "ran", "ran")
    );
    assert_eq!(
        (st["b[n=1]"].as_str(), st["c[n=3]"].as_str()),
        ("cached", "cached")
    );
    assert_eq!(doc["ran"], 3);
    assert_eq!(dir.count("runs.log", "a"), 1);
    let show = dir.json(&["show", &p, "report", "--sweep", "b.n=1,2,3,4"], 0);
    let path = node(&show, "report")["path"]
        .as_str()
        .expect("report committed")
        .to_string();
    assert_eq!(
        std::fs::read_to_string(std::path::Path::new(&path).join("values.txt")).expect("values"),
        "10\n20\n30\n40\n"
    );
}

#[test]
fn hello_pipeline_sums_powers_and_caches() {
    let dir = Dir::new("hello");
    let hello = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/hello.yaml");
    let first = dir.json(&["run", hello], 0);
    assert_eq!(first["ran"], 5, "{first:#}");
    assert_eq!(first["failed"], 0);
    let second = dir.json(&["run", hello], 0);
    assert_eq!(
        (second["ran"].as_u64(), second["cached"].as_u64()),
        (Some(0), Some(5))
    );
    assert!(
        statuses(&second).values().all(|s| s == "cached"),
        "{second:#}"
    );

    let table = entry_file(&dir, hello, "table", "table.jsonl");
    let rows: Vec<serde_json::Value> = table
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("row `{l}`: {e}")))
        .collect();
    let mut pairs: Vec<(i64, i64)> = rows
        .iter()
        .map(|r| {
            (
                r["power"].as_i64().expect("power"),
                r["sum"].as_i64().expect("sum"),
            )
        })
        .collect();
    pairs.sort();
    assert_eq!(pairs, [(1, 55), (2, 385), (3, 3025)]);

    // show --json reads each square's metrics.json
    let show = dir.json(&["show", hello, "square"], 0);
    for (power, sum) in [(1, 55), (2, 385), (3, 3025)] {
        let n = node(&show, &format!("square[power={power}]"));
        assert_eq!(n["status"], "cached");
        assert_eq!(n["metrics"]["sum"], sum, "{n:#}");
    }
}

/// `n: 10.0` and `n: 10` are one key, so the command sees one input for both: the params as
/// keyed (`PIPE_PARAM_n=10`, `"n": 10` in `$PIPE_PARAMS`), whichever spelling ran first.
#[test]
fn a_shell_command_sees_its_params_as_they_are_keyed() {
    let dir = Dir::new("keyed-params");
    let p = dir.pipeline(
        "k.yaml",
        r#"
name: k
stages:
  s:
    kind: shell
    params:
      n: 10.0
      cmd: echo "n=$PIPE_PARAM_n" > "$PIPE_OUT/out.txt"; grep '"n"' "$PIPE_PARAMS" >> "$PIPE_OUT/out.txt"
"#,
    );
    let doc = dir.json(&["run", &p], 0);
    let key = key_of(&doc, "s");
    assert_eq!(
        key,
        key_of(&dir.json(&["plan", &p, "--set", "s.n=10"], 0), "s")
    );
    let out = entry_file(&dir, &p, "s", "out.txt");
    assert_eq!(out.lines().next(), Some("n=10"), "{out}");
    assert!(
        out.contains("\"n\": 10\n") || out.contains("\"n\": 10,"),
        "{out}"
    );
    assert!(!out.contains("10.0"), "{out}");
}
