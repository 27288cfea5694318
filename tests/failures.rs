//! A failing node: exit code 1, `failed` with its stderr tail, dependents skipped, never cached,
//! its log kept for `pipe log`; `--keep-going` runs independent branches.

use crate::util::{Dir, expect, node, statuses};

/// `a_bad` fails with exit 3; `b_dep` needs it; `c_indep` is independent.
const FAILING: &str = r#"
name: failing
stages:
  a_bad:
    kind: shell
    params:
      cmd: |
        echo a_bad >> runs.log
        echo "partial" > "$PIPE_OUT/partial.txt"
        echo "to stdout before failing"
        echo "first stderr line" >&2
        echo "boom: the disk is made of cheese" >&2
        exit 3
  b_dep:
    kind: shell
    inputs: {up: a_bad}
    params:
      cmd: echo b_dep >> runs.log
  c_indep:
    kind: shell
    params:
      cmd: echo c_indep >> runs.log; echo ok > "$PIPE_OUT/ok.txt"
"#;

#[test]
fn a_failing_node_exits_1_and_is_not_cached() {
    let dir = Dir::new("fail");
    let p = dir.pipeline("failing.yaml", FAILING);
    let doc = dir.json(&["run", &p, "--keep-going"], 1);
    assert_eq!(
        statuses(&doc),
        expect(&[
            ("a_bad", "failed"),
            ("b_dep", "skipped"),
            ("c_indep", "ran")
        ])
    );
    assert_eq!(
        (
            doc["ran"].as_u64(),
            doc["failed"].as_u64(),
            doc["skipped"].as_u64(),
            doc["cached"].as_u64()
        ),
        (Some(1), Some(1), Some(1), Some(0))
    );
    let error = node(&doc, "a_bad")["error"]
        .as_str()
        .expect("a failed node has an error")
        .to_string();
    assert!(error.contains("code 3"), "{error}");
    assert!(
        error.contains("boom: the disk is made of cheese"),
        "stderr tail expected: {error}"
    );
    assert!(error.contains("first stderr line"), "{error}");
    assert!(
        !error.contains("to stdout"),
        "stdout is not stderr: {error}"
    );
    assert!(node(&doc, "c_indep").get("error").is_none());
    assert_eq!(
        dir.count("runs.log", "b_dep"),
        0,
        "a dependent of a failed node must not run"
    );

    // the failed node left no entry: only c_indep is in the store
    let keys = dir.entry_keys();
    assert_eq!(
        keys,
        [node(&doc, "c_indep")["key"]
            .as_str()
            .expect("key")
            .to_string()]
    );
    for e in dir.entries() {
        assert!(
            !e.join("partial.txt").exists(),
            "a failed node's output was committed"
        );
    }

    // the next run tries it again
    let plan = dir.json(&["plan", &p], 0);
    assert_eq!(
        statuses(&plan),
        expect(&[
            ("a_bad", "to-run"),
            ("b_dep", "to-run"),
            ("c_indep", "cached")
        ])
    );
    let show = dir.json(&["show", &p, "a_bad"], 0);
    assert_eq!(node(&show, "a_bad")["status"], "failed");
    assert!(node(&show, "a_bad")["path"].is_null());

    // its log: stdout and stderr of the failed attempt
    let log = dir.pipe(&["log", &p, "a_bad"]).code(0);
    assert!(log.stdout.contains("failed"), "{}", log.stdout);
    assert!(
        log.stdout.contains("to stdout before failing"),
        "{}",
        log.stdout
    );
    assert!(
        log.stdout.contains("boom: the disk is made of cheese"),
        "{}",
        log.stdout
    );
    let log = dir.pipe(&["log", &p, "b_dep"]).code(0);
    assert!(log.stdout.contains("has not run"), "{}", log.stdout);

    // human output names the failure too
    let out = dir.pipe(&["run", &p, "--keep-going"]).code(1);
    assert!(out.stderr.contains("a_bad"), "{}", out.stderr);
    assert!(
        out.stderr.contains("boom: the disk is made of cheese"),
        "{}",
        out.stderr
    );
    assert_eq!(
        dir.count("runs.log", "a_bad"),
        2,
        "a failed node is retried"
    );
    assert_eq!(dir.count("runs.log", "c_indep"), 1, "c_indep stays cached");
}

#[test]
fn without_keep_going_a_failure_stops_the_run() {
    let dir = Dir::new("fail-stop");
    let p = dir.pipeline("failing.yaml", FAILING);
    let doc = dir.json(&["run", &p, "-j", "1"], 1);
    assert_eq!(
        statuses(&doc),
        expect(&[
            ("a_bad", "failed"),
            ("b_dep", "skipped"),
            ("c_indep", "skipped")
        ])
    );
    assert_eq!(doc["skipped"], 2);
    assert_eq!(dir.count("runs.log", "c_indep"), 0);
    assert!(dir.entries().is_empty());

    // once fixed, the failed node runs and its dependents follow
    let fixed = FAILING.replace("exit 3", "exit 0");
    let p = dir.pipeline("failing.yaml", &fixed);
    let doc = dir.json(&["run", &p], 0);
    assert_eq!(
        statuses(&doc),
        expect(&[("a_bad", "ran"), ("b_dep", "ran"), ("c_indep", "ran")])
    );
    assert_eq!(dir.count("runs.log", "b_dep"), 1);
}

#[test]
fn a_missing_declared_output_fails_the_node() {
    let dir = Dir::new("outputs");
    let p = dir.pipeline(
        "outputs.yaml",
        r#"
stages:
  a:
    kind: shell
    params:
      cmd: echo x > "$PIPE_OUT/one.txt"
      outputs: [one.txt, two.txt]
"#,
    );
    let doc = dir.json(&["run", &p], 1);
    assert_eq!(node(&doc, "a")["status"], "failed");
    let error = node(&doc, "a")["error"]
        .as_str()
        .expect("error")
        .to_string();
    assert!(error.contains("two.txt"), "{error}");
    assert!(!error.contains("one.txt"), "one.txt was written: {error}");
    assert!(dir.entries().is_empty());
}
