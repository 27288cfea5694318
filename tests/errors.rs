//! Spec errors: exit code 2, every error at once, each naming file, line and YAML path; nothing
//! runs before the whole spec is valid.

use crate::util::Dir;

/// Runs `pipe run FILE` on `yaml` and returns stderr, checking exit code 2 and that no stage
/// command ran (they would append to `runs.log`).
fn spec_error(dir: &Dir, name: &str, yaml: &str) -> String {
    let p = dir.pipeline(name, yaml);
    let out = dir.pipe(&["run", &p]).code(2);
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout for a spec error: {}",
        out.stdout
    );
    assert_eq!(
        dir.read("runs.log"),
        "",
        "a stage ran although the spec is invalid"
    );
    // plan says the same, with the same exit code
    let plan = dir.pipe(&["plan", &p]).code(2);
    assert_eq!(plan.stderr, out.stderr);
    out.stderr
}

/// A valid stage that would run first if validation did not come before compute.
const INNOCENT: &str = r#"
  innocent:
    kind: shell
    params: {cmd: "echo innocent >> runs.log"}
"#;

#[test]
fn a_cycle_of_three_names_every_stage_on_it() {
    let dir = Dir::new("cycle");
    let yaml = format!(
        r#"
stages:{INNOCENT}
  alpha:
    kind: shell
    inputs: {{x: gamma}}
    params: {{cmd: "true"}}
  beta:
    kind: shell
    inputs: {{x: alpha}}
    params: {{cmd: "true"}}
  gamma:
    kind: shell
    inputs: {{x: beta}}
    params: {{cmd: "true"}}
"#
    );
    let err = spec_error(&dir, "cycle.yaml", &yaml);
    assert!(err.contains("cycle"), "{err}");
    for s in ["alpha", "beta", "gamma"] {
        assert!(err.contains(s), "the cycle error should name `{s}`: {err}");
    }
    assert!(
        !err.contains("innocent"),
        "innocent is not on the cycle: {err}"
    );
    assert!(
        err.contains("cycle.yaml:"),
        "the error names the file: {err}"
    );
}

#[test]
fn an_unknown_field_names_file_line_and_stage() {
    let dir = Dir::new("unknown-field");
    let yaml = "\
stages:
  train:
    kind: shell
    parms: {cmd: \"true\"}
";
    let err = spec_error(&dir, "typo.yaml", yaml);
    assert!(
        err.contains("typo.yaml:4:"),
        "file and line 4 expected: {err}"
    );
    assert!(
        err.contains("stages.train"),
        "the YAML path expected: {err}"
    );
    assert!(err.contains("parms"), "the unknown field expected: {err}");
    assert!(
        err.contains("params"),
        "the expected fields should be listed: {err}"
    );
}

#[test]
fn an_unknown_kind_is_named() {
    let dir = Dir::new("unknown-kind");
    let yaml = "\
stages:
  a:
    kind: shel
    params: {cmd: \"true\"}
";
    let err = spec_error(&dir, "kind.yaml", yaml);
    assert!(err.contains("kind.yaml:3:"), "{err}");
    assert!(err.contains("stages.a.kind"), "{err}");
    assert!(err.contains("`shel`"), "{err}");
    assert!(err.contains("shell"), "known kinds should be listed: {err}");
}

#[test]
fn an_input_naming_an_unknown_stage_is_named() {
    let dir = Dir::new("unknown-input");
    let yaml = "\
stages:
  a:
    kind: shell
    params: {cmd: \"true\"}
  b:
    kind: shell
    inputs: {data: ghost}
    params: {cmd: \"true\"}
";
    let err = spec_error(&dir, "input.yaml", yaml);
    assert!(err.contains("input.yaml:7:"), "{err}");
    assert!(err.contains("stages.b.inputs.data"), "{err}");
    assert!(err.contains("ghost"), "{err}");
}

#[test]
fn several_errors_are_reported_at_once() {
    let dir = Dir::new("many-errors");
    let yaml = format!(
        "\
stages:{INNOCENT}
  a:
    kind: shell
    parms: {{cmd: \"true\"}}
  b:
    kind: nosuch
    params: {{cmd: \"true\"}}
  c:
    kind: shell
    inputs: {{x: ghost}}
    params: {{cmd: \"true\"}}
  d:
    kind: shell
    params: {{cmd: [1, 2]}}
  e:
    kind: shell
    params: {{cmd: \"  \"}}
"
    );
    let err = spec_error(&dir, "many.yaml", &yaml);
    assert!(err.contains("5 errors"), "{err}");
    for want in [
        "stages.a.parms",
        "stages.b.kind",
        "nosuch",
        "stages.c.inputs.x",
        "ghost",
        "stages.d.params.cmd",
        "stages.e.params.cmd",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
    // one line per error, each with file:line:col
    let located = err.lines().filter(|l| l.contains("many.yaml:")).count();
    assert_eq!(located, 5, "{err}");
}

#[test]
fn duplicate_stage_ids_are_an_error() {
    let dir = Dir::new("duplicate");
    let yaml = "\
stages:
  a:
    kind: shell
    params: {cmd: \"echo first >> runs.log\"}
  a:
    kind: shell
    params: {cmd: \"echo second >> runs.log\"}
";
    let err = spec_error(&dir, "dup.yaml", yaml);
    assert!(err.contains("dup.yaml:5:"), "{err}");
    assert!(err.contains("duplicate"), "{err}");
}

#[test]
fn bad_overrides_and_missing_files_exit_2() {
    let dir = Dir::new("usage");
    let p = dir.pipeline(
        "ok.yaml",
        "stages:\n  a:\n    kind: shell\n    params: {cmd: \"echo a >> runs.log\"}\n",
    );
    let out = dir.pipe(&["run", &p, "--set", "nosuch.x=1"]).code(2);
    assert!(out.stderr.contains("nosuch"), "{}", out.stderr);
    let out = dir.pipe(&["run", &p, "--set", "a.x"]).code(2);
    assert!(out.stderr.contains("a.x"), "{}", out.stderr);
    let missing = dir.path("missing.yaml");
    let missing = missing.to_str().expect("utf-8");
    let out = dir.pipe(&["run", missing]).code(2);
    assert!(out.stderr.contains("missing.yaml"), "{}", out.stderr);
    dir.pipe(&["frobnicate"]).code(2);
    assert_eq!(dir.read("runs.log"), "");
}
