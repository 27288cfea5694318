//! Integration tests of pipe-engine: spec validation, sweep expansion and keys, planning and
//! execution, all with the fake stage kinds of `pipe_engine::testing` (no ML).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pipe_cache::Store;
use pipe_engine::key::{KEY_SCHEMA, KeyPreimage};
use pipe_engine::{
    Event, Graph, Node, NodeKey, Observer, Outcome, Overrides, Pipeline, Plan, Reason, Registry,
    RunOptions, SpecError, SpecErrors, Status, Summary, graph, spec,
};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A temp dir unique to this process and test, removed on drop (also when the test panics).
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!(
            "pipe-engine-test-{}-{n}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    pipe_engine::testing::register(&mut r);
    r
}

fn parse_with(yaml: &str, overrides: &Overrides) -> Result<Pipeline, SpecErrors> {
    spec::parse(yaml, Path::new("p.yaml"), &registry(), overrides)
}

fn parse(yaml: &str) -> Result<Pipeline, SpecErrors> {
    parse_with(yaml, &Overrides::default())
}

fn errors(yaml: &str) -> Vec<SpecError> {
    match parse(yaml) {
        Ok(_) => panic!("expected spec errors for:\n{yaml}"),
        Err(e) => e.0,
    }
}

/// The only error of a spec.
fn one_error(yaml: &str) -> SpecError {
    let errs = errors(yaml);
    assert_eq!(errs.len(), 1, "expected exactly one error, got {errs:#?}");
    errs.into_iter().next().expect("one error")
}

fn build(yaml: &str) -> Graph {
    build_with(yaml, &Overrides::default())
}

fn build_with(yaml: &str, overrides: &Overrides) -> Graph {
    let p = match parse_with(yaml, overrides) {
        Ok(p) => p,
        Err(e) => panic!("spec should be valid: {e}"),
    };
    graph::build(p, &registry())
}

fn ids(g: &Graph) -> Vec<String> {
    g.nodes.iter().map(|n| n.id.clone()).collect()
}

fn idx(g: &Graph, id: &str) -> usize {
    g.find(id)
        .unwrap_or_else(|| panic!("no node `{id}` in {:?}", ids(g)))
}

fn node<'a>(g: &'a Graph, id: &str) -> &'a Node {
    &g.nodes[idx(g, id)]
}

fn key_of(g: &Graph, id: &str) -> NodeKey {
    node(g, id).key
}

fn opts(jobs: usize, gpus: usize, keep_going: bool) -> RunOptions {
    RunOptions {
        jobs,
        gpus,
        keep_going,
        pipe_version: "test".into(),
        ..Default::default()
    }
}

/// Records every event with the time it arrived.
#[derive(Default)]
struct Recorder {
    events: Vec<(Instant, Event)>,
}

impl Observer for Recorder {
    fn event(&mut self, _: &Plan, event: &Event) {
        self.events.push((Instant::now(), event.clone()));
    }
}

impl Recorder {
    /// The largest number of `nodes` running at once, from Started / Finished events.
    fn max_concurrent(&self, nodes: &[usize]) -> usize {
        let (mut now, mut max) = (0usize, 0usize);
        for (_, e) in &self.events {
            match e {
                Event::Started(i) if nodes.contains(i) => {
                    now += 1;
                    max = max.max(now);
                }
                Event::Finished(i, _) if nodes.contains(i) => now = now.saturating_sub(1),
                _ => {}
            }
        }
        max
    }
    fn started(&self) -> Vec<usize> {
        self.events
            .iter()
            .filter_map(|(_, e)| {
                if let Event::Started(i) = e {
                    Some(*i)
                } else {
                    None
                }
            })
            .collect()
    }
}

/// Sets `flag` when a chosen event arrives (simulates Ctrl-C at a chosen moment).
struct CancelOn<'a> {
    flag: &'a AtomicBool,
    when: Box<dyn Fn(&Event) -> bool + 'a>,
    rec: Recorder,
}

impl Observer for CancelOn<'_> {
    fn event(&mut self, plan: &Plan, event: &Event) {
        if (self.when)(event) {
            self.flag.store(true, Ordering::SeqCst);
        }
        self.rec.event(plan, event);
    }
}

/// A store plus a pipeline file in a fresh temp dir.
struct Env {
    tmp: TempDir,
    store: Store,
    reg: Registry,
}

impl Env {
    fn new(name: &str) -> Env {
        let tmp = TempDir::new(name);
        let store = Store::open(tmp.path().join("store")).expect("open store");
        Env {
            tmp,
            store,
            reg: registry(),
        }
    }
    fn file(&self) -> PathBuf {
        self.tmp.path().join("pipeline.yaml")
    }
    fn graph(&self, yaml: &str) -> Graph {
        std::fs::write(self.file(), yaml).expect("write pipeline");
        let p = match spec::parse(yaml, &self.file(), &self.reg, &Overrides::default()) {
            Ok(p) => p,
            Err(e) => panic!("spec should be valid: {e}"),
        };
        graph::build(p, &self.reg)
    }
    fn plan(&self, yaml: &str) -> Plan {
        self.plan_targets(yaml, &[])
    }
    fn plan_targets(&self, yaml: &str, targets: &[&str]) -> Plan {
        let targets: Vec<String> = targets.iter().map(|s| (*s).to_string()).collect();
        pipe_engine::plan::plan(self.graph(yaml), &self.store, &targets).expect("plan")
    }
    fn run(&self, plan: &Plan, o: &RunOptions) -> (Summary, Recorder) {
        let cancel = AtomicBool::new(false);
        let mut rec = Recorder::default();
        let s = pipe_engine::exec::run(plan, &self.reg, &self.store, o, &cancel, &mut rec);
        (s, rec)
    }
    fn read_out(&self, plan: &Plan, id: &str) -> String {
        let k = key_of(&plan.graph, id);
        let entry = self
            .store
            .get(k.key())
            .expect("store get")
            .expect("entry present");
        std::fs::read_to_string(entry.file("out.txt").expect("out.txt listed"))
            .expect("read out.txt")
    }
    fn contains(&self, plan: &Plan, id: &str) -> bool {
        self.store.contains(key_of(&plan.graph, id).key())
    }
}

fn status<'a>(plan: &'a Plan, id: &str) -> &'a Status {
    &plan.status[idx(&plan.graph, id)]
}

fn outcome<'a>(plan: &Plan, s: &'a Summary, id: &str) -> &'a Outcome {
    &s.results[idx(&plan.graph, id)].outcome
}

// ---------------------------------------------------------------------------------------------
// 1. spec errors
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_kind_points_at_the_kind_line() {
    let e = one_error("name: t\nstages:\n  ok: {kind: echo}\n  x:\n    kind: nope\n");
    assert_eq!(e.path, "stages.x.kind");
    assert_eq!((e.line, e.col), (Some(5), Some(5)));
    assert_eq!(e.file, PathBuf::from("p.yaml"));
    assert!(
        e.message.contains("unknown stage kind `nope`"),
        "{}",
        e.message
    );
    // what was expected: the known kinds
    assert!(
        e.message.contains("echo") && e.message.contains("bounded"),
        "{}",
        e.message
    );
    let shown = e.to_string();
    assert!(shown.starts_with("p.yaml:5:5: stages.x.kind: "), "{shown}");
}

#[test]
fn unknown_param_names_the_field() {
    let e = one_error(
        "stages:\n  d: {kind: echo}\n  x:\n    kind: bounded\n    inputs: {data: d}\n    params:\n      epochs: 3\n      epoch: 4\n",
    );
    assert_eq!(e.path, "stages.x.params.epoch");
    assert_eq!(e.line, Some(8));
    assert!(e.message.contains("epoch"), "{}", e.message);
    assert!(e.message.contains("unknown field"), "{}", e.message);
}

#[test]
fn unknown_params_do_not_hide_the_range_errors_of_the_rest() {
    let errs = errors(
        "stages:\n  d: {kind: echo}\n  x:\n    kind: bounded\n    inputs: {data: d}\n    params: {epoch: 4, epochs: 0, eps: 2, foo: 1}\n",
    );
    let mut got: Vec<(&str, &str)> = errs
        .iter()
        .map(|e| (e.path.as_str(), e.message.as_str()))
        .collect();
    got.sort_unstable();
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[0].0, "stages.x.params.epoch");
    assert!(got[0].1.contains("unknown field `epoch`"), "{got:?}");
    assert_eq!(
        got[1],
        ("stages.x.params.epochs", "expected at least 1, got 0")
    );
    assert_eq!(got[2].0, "stages.x.params.eps");
    assert!(got[2].1.contains("[0, 1]"), "{got:?}");
    assert_eq!(got[3].0, "stages.x.params.foo");
    assert!(got[3].1.contains("unknown field `foo`"), "{got:?}");
    // a wrong type still ends the reading of that stage's params with that error
    let errs = errors(
        "stages:\n  d: {kind: echo}\n  x:\n    kind: bounded\n    inputs: {data: d}\n    params: {epochs: ten, eps: 2, foo: 1}\n",
    );
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["stages.x.params.epochs"], "{errs:?}");
}

#[test]
fn mistyped_param() {
    let e = one_error(
        "stages:\n  d: {kind: echo}\n  x:\n    kind: bounded\n    inputs: {data: d}\n    params:\n      epochs: ten\n",
    );
    assert_eq!(e.path, "stages.x.params.epochs");
    assert_eq!(e.line, Some(7));
    assert!(
        e.message.contains("invalid type") && e.message.contains("expected"),
        "{}",
        e.message
    );
}

#[test]
fn out_of_range_params_are_all_reported() {
    let errs = errors(
        "stages:\n  d: {kind: echo}\n  x:\n    kind: bounded\n    inputs: {data: d}\n    params:\n      epochs: 0\n      eps: 2\n",
    );
    let got: Vec<(&str, Option<usize>)> = errs.iter().map(|e| (e.path.as_str(), e.line)).collect();
    assert_eq!(
        got,
        [
            ("stages.x.params.epochs", Some(7)),
            ("stages.x.params.eps", Some(8))
        ]
    );
    assert!(
        errs[0].message.contains("at least 1"),
        "{}",
        errs[0].message
    );
    assert!(errs[1].message.contains("[0, 1]"), "{}", errs[1].message);
}

#[test]
fn missing_required_input() {
    let e = one_error("stages:\n  x:\n    kind: bounded\n    params: {epochs: 1}\n");
    assert_eq!(e.path, "stages.x.inputs");
    // no `inputs:` is written: the stage itself is pointed at
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("missing input `data`"), "{}", e.message);
}

#[test]
fn input_naming_an_unknown_stage() {
    let e = one_error(
        "stages:\n  a: {kind: echo}\n  b:\n    kind: echo\n    inputs:\n      x: ghost\n",
    );
    assert_eq!(e.path, "stages.b.inputs.x");
    assert_eq!(e.line, Some(6));
    assert!(e.message.contains("unknown stage `ghost`"), "{}", e.message);
}

#[test]
fn cycle_names_every_stage() {
    let e = one_error(
        "stages:\n  a:\n    kind: echo\n    inputs: {x: c}\n  b:\n    kind: echo\n    inputs: {x: a}\n  c:\n    kind: echo\n    inputs: {x: b}\n  free: {kind: echo}\n",
    );
    assert!(e.message.contains("a -> b -> c -> a"), "{}", e.message);
    assert!(!e.message.contains("free"), "{}", e.message);
    assert_eq!(e.path, "stages.a.inputs");
    assert_eq!(e.line, Some(4));
}

#[test]
fn self_loop_is_a_cycle() {
    let e = one_error("stages:\n  a:\n    kind: echo\n    inputs: {x: a}\n");
    assert!(e.message.contains("a -> a"), "{}", e.message);
}

#[test]
fn duplicate_stage_ids_are_all_reported() {
    let errs = errors(
        "stages:\n  a: {kind: echo}\n  b: {kind: echo}\n  a: {kind: echo}\n  b: {kind: echo}\n  a: {kind: sum}\n",
    );
    let got: Vec<(&str, Option<usize>)> = errs.iter().map(|e| (e.path.as_str(), e.line)).collect();
    assert_eq!(
        got,
        [
            ("stages.a", Some(4)),
            ("stages.b", Some(5)),
            ("stages.a", Some(6))
        ]
    );
    assert!(
        errs[0].message.contains("duplicate") && errs[0].message.contains("line 2"),
        "{}",
        errs[0].message
    );
    assert!(errs[1].message.contains("line 3"), "{}", errs[1].message);
    assert!(errs[2].message.contains("line 2"), "{}", errs[2].message);
}

#[test]
fn many_errors_reported_at_once_sorted_by_line() {
    let yaml = "\
name: multi
stages:
  a:
    kind: nope
  b:
    kind: bounded
    inputs: {data: ghost}
    params: {epochs: 0}
  c:
    kind: bounded
    params: {epochs: 2, epoch: 3}
  d:
    kind: echo
    params: {n: ten}
extra: 1
";
    let errs = errors(yaml);
    let got: Vec<(Option<usize>, &str)> = errs.iter().map(|e| (e.line, e.path.as_str())).collect();
    assert_eq!(
        got,
        [
            (Some(4), "stages.a.kind"),
            (Some(7), "stages.b.inputs.data"),
            (Some(8), "stages.b.params.epochs"),
            (Some(9), "stages.c.inputs"),
            (Some(11), "stages.c.params.epoch"),
            (Some(14), "stages.d.params.n"),
            (Some(15), "extra"),
        ]
    );
    let msgs: Vec<&str> = errs.iter().map(|e| e.message.as_str()).collect();
    assert!(msgs[0].contains("unknown stage kind"), "{}", msgs[0]);
    assert!(msgs[1].contains("unknown stage `ghost`"), "{}", msgs[1]);
    assert!(msgs[2].contains("at least 1"), "{}", msgs[2]);
    assert!(msgs[3].contains("missing input `data`"), "{}", msgs[3]);
    assert!(msgs[4].contains("unknown field `epoch`"), "{}", msgs[4]);
    assert!(msgs[5].contains("invalid type"), "{}", msgs[5]);
    assert!(msgs[6].contains("unknown field `extra`"), "{}", msgs[6]);
    let text = SpecErrors(errs.clone()).to_string();
    assert!(text.starts_with("7 errors in pipeline spec"), "{text}");
    assert!(text.contains("p.yaml:15:1: extra: unknown field"), "{text}");
}

/// A misspelt name gets "did you mean" with the one close name, wherever the file names
/// something: a kind, a stage, a variant, an input slot, a param, a top-level field, `--set`.
#[test]
fn misspelt_names_suggest_the_close_name() {
    let yaml = "\
nmae: hints
stages:
  data:
    kind: bounde
    params: {epochs: 1}
  v:
    kind: echo
    variants: {small: {n: 1}, large: {n: 2}}
  b:
    kind: bounded
    inputs: {dta: dat}
    params: {epochs: 1, esp: 0.1}
  c:
    kind: bounded
    inputs: {data: \"v[smal]\"}
    params: {epochs: 1}
";
    let o = Overrides {
        set: vec![("dtaa".into(), "epochs".into(), serde_json::json!(2))],
        ..Overrides::default()
    };
    let errs = parse_with(yaml, &o).expect_err("misspelt names").0;
    let has = |path: &str, text: &str| {
        assert!(
            errs.iter()
                .any(|e| e.path == path && e.message.contains(text)),
            "no error at {path} saying {text}: {errs:#?}"
        );
    };
    has("nmae", "unknown field `nmae` (did you mean `name`?)");
    has(
        "stages.data.kind",
        "unknown stage kind `bounde` (did you mean `bounded`?)",
    );
    has(
        "stages.b.inputs.dta",
        "no input `dta` (did you mean `data`?)",
    );
    has(
        "stages.b.inputs.dta",
        "unknown stage `dat` (did you mean `data`?)",
    );
    has(
        "stages.b.params.esp",
        "unknown field `esp` (did you mean `eps`?)",
    );
    has(
        "stages.c.inputs.data",
        "no variant `smal` (did you mean `small`?)",
    );
    has(
        "--set dtaa.epochs",
        "no stage `dtaa` in this pipeline (did you mean `data`?)",
    );
    // nothing close: no guess
    let e = one_error("stages:\n  a: {kind: echo, params: {zzzz: 1}}\n");
    assert!(!e.message.contains("did you mean"), "{}", e.message);
}

#[test]
fn unknown_top_level_field() {
    let e = one_error("name: t\nstages:\n  a: {kind: echo}\nstage_defaults: {}\n");
    assert_eq!(e.path, "stage_defaults");
    assert_eq!((e.line, e.col), (Some(4), Some(1)));
    assert!(
        e.message.contains("unknown field `stage_defaults`"),
        "{}",
        e.message
    );
    assert!(e.message.contains("`stages`"), "{}", e.message);
}

#[test]
fn unknown_stage_field() {
    let e = one_error("stages:\n  a:\n    kind: echo\n    parms: {text: hi}\n");
    assert_eq!(e.path, "stages.a.parms");
    assert!(e.message.contains("unknown field `parms`"), "{}", e.message);
    assert_eq!((e.line, e.col), (Some(4), Some(5)));
}

#[test]
fn param_error_from_defaults_points_at_defaults() {
    let e = one_error(
        "defaults:\n  bounded:\n    epochs: 0\nstages:\n  d: {kind: echo}\n  x:\n    kind: bounded\n    inputs: {data: d}\n",
    );
    assert_eq!(e.path, "defaults.bounded.epochs");
    assert_eq!(e.line, Some(3));
    assert!(e.message.contains("at least 1"), "{}", e.message);

    // an unknown param in defaults too
    let e = one_error(
        "defaults:\n  bounded: {epochs: 1, epoch: 2}\nstages:\n  d: {kind: echo}\n  x:\n    kind: bounded\n    inputs: {data: d}\n",
    );
    assert_eq!(e.path, "defaults.bounded.epoch");
    assert_eq!(e.line, Some(2));

    // defaults apply, but the stage's own params win
    let p = parse(
        "defaults:\n  bounded: {epochs: 0, eps: 0.25}\nstages:\n  d: {kind: echo}\n  x:\n    kind: bounded\n    inputs: {data: d}\n    params: {epochs: 7}\n",
    )
    .expect("stage params override the bad default");
    let x = p.stages.iter().find(|s| s.id == "x").expect("stage x");
    assert_eq!(x.grid[0].params, json!({"epochs": 7, "eps": 0.25}));
}

#[test]
fn param_error_from_sweep_points_at_the_sweep() {
    let errs = errors(
        "stages:\n  d: {kind: echo}\n  x:\n    kind: bounded\n    inputs: {data: d}\n    params: {epochs: 1}\n    sweep:\n      eps: [0.5, 3, 4]\n",
    );
    // one error per bad value, all at the sweep axis
    assert_eq!(errs.len(), 2, "{errs:#?}");
    for e in &errs {
        assert_eq!(e.path, "stages.x.sweep.eps", "{e:?}");
        assert_eq!(e.line, Some(8));
    }
    assert!(
        errs.iter().any(|e| e.message.contains("got 3")),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.message.contains("got 4")),
        "{errs:#?}"
    );
}

#[test]
fn param_error_from_sweep_each_bad_value_at_the_sweep_path() {
    let errs = errors(
        "stages:\n  d: {kind: echo}\n  x:\n    kind: bounded\n    inputs: {data: d}\n    params: {epochs: 1}\n    sweep:\n      epochs: [1, 0]\n",
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].path, "stages.x.sweep.epochs");
    assert_eq!(errs[0].line, Some(8));
    assert!(
        errs[0].message.contains("at least 1"),
        "{}",
        errs[0].message
    );
}

#[test]
fn yaml_syntax_error_has_a_line() {
    let e = one_error("name: t\nstages:\n  a: {kind: echo\n  b: {kind: echo}\n");
    assert!(e.message.starts_with("invalid YAML"), "{}", e.message);
    // the unclosed flow mapping of `a` is noticed where `b` starts
    assert_eq!((e.line, e.col), (Some(4), Some(4)), "{e:?}");
    assert_eq!(e.path, "");
    // the position is not repeated inside the message
    assert!(!e.message.contains(" at line "), "{}", e.message);
}

#[test]
fn nan_param_is_rejected() {
    let e = one_error("stages:\n  a:\n    kind: echo\n    params:\n      x: .nan\n");
    assert_eq!(e.path, "stages.a.params.x");
    assert_eq!(e.line, Some(5));
    assert!(e.message.contains("finite"), "{}", e.message);
    // and in a sweep
    let e = one_error("stages:\n  a:\n    kind: echo\n    sweep:\n      x: [1, .inf]\n");
    assert!(e.path.starts_with("stages.a.sweep.x"), "{e:?}");
    assert_eq!(e.line, Some(5));
}

#[test]
fn merge_keys_work() {
    let yaml = "\
stages:
  a: &stage_a
    kind: echo
    params: &base {text: hi, n: 3}
  b:
    kind: echo
    params:
      <<: *base
      n: 4
  c:
    <<: *stage_a
    inputs: {x: b}
";
    let p = parse(yaml).expect("merge keys are valid");
    let params = |id: &str| {
        p.stages.iter().find(|s| s.id == id).expect("stage").grid[0]
            .params
            .clone()
    };
    assert_eq!(params("a"), json!({"text": "hi", "n": 3, "x": 0.0}));
    assert_eq!(params("b"), json!({"text": "hi", "n": 4, "x": 0.0}));
    assert_eq!(params("c"), json!({"text": "hi", "n": 3, "x": 0.0}));
    let c = p.stages.iter().find(|s| s.id == "c").expect("stage c");
    assert_eq!(c.kind, "echo");

    // a param error inside a merged stage still has a line (the stage that merged it)
    let e = one_error(
        "stages:\n  d: {kind: echo}\n  x: &bx\n    kind: bounded\n    inputs: {data: d}\n    params: {epochs: 1}\n  y:\n    <<: *bx\n    params: {epochs: 0}\n",
    );
    assert_eq!(e.path, "stages.y.params.epochs");
    assert_eq!(e.line, Some(9));
}

#[test]
fn x_fields_hold_anchors_and_other_top_level_fields_are_errors() {
    let yaml = "\
x-base: &base {text: hi, n: 3}
x-stage: &st
  kind: echo
stages:
  a: {<<: *st, params: *base}
";
    let p = parse(yaml).expect("x- fields are ignored");
    assert_eq!(
        p.stages[0].grid[0].params,
        json!({"text": "hi", "n": 3, "x": 0.0})
    );
    let e = one_error("extras: 1\nstages:\n  a: {kind: echo}\n");
    assert_eq!(e.path, "extras");
    assert!(e.message.contains("`x-`"), "{}", e.message);
}

// ---------------------------------------------------------------------------------------------
// 2. sweeps and the graph
// ---------------------------------------------------------------------------------------------

#[test]
fn grid_broadcast_and_gather() {
    let g = build(
        "stages:\n  a:\n    kind: echo\n    sweep: {x: [0.5, 1.5], n: [1, 2, 3]}\n  b:\n    kind: echo\n    inputs: {in: a}\n  r:\n    kind: echo\n    inputs:\n      rows: a[*]\n",
    );
    let a_ids = [
        "a[x=0.5,n=1]",
        "a[x=0.5,n=2]",
        "a[x=0.5,n=3]",
        "a[x=1.5,n=1]",
        "a[x=1.5,n=2]",
        "a[x=1.5,n=3]",
    ];
    let b_ids: Vec<String> = a_ids.iter().map(|s| s.replacen('a', "b", 1)).collect();
    let mut want: Vec<String> = a_ids.iter().map(|s| (*s).to_string()).collect();
    want.extend(b_ids.iter().cloned());
    want.push("r".into());
    assert_eq!(ids(&g), want);
    // params of the grid points
    assert_eq!(
        node(&g, "a[x=1.5,n=2]").params,
        json!({"text": "", "n": 2, "x": 1.5})
    );
    // broadcast: each b reads the a of the same coordinates
    for (a, b) in a_ids.iter().zip(&b_ids) {
        let bn = node(&g, b);
        assert_eq!(bn.inputs.get("in"), Some(&vec![idx(&g, a)]), "{b}");
        assert_eq!(bn.stages, ["b"]);
    }
    // gather: one node with every a in its slot, in expansion order
    let r = node(&g, "r");
    let all: Vec<usize> = a_ids.iter().map(|a| idx(&g, a)).collect();
    assert_eq!(r.inputs.get("rows"), Some(&all));
    assert_eq!(r.inputs.len(), 1);
    assert_eq!(g.instances["r"].len(), 1);
    assert_eq!(g.select("a").len(), 6);
}

#[test]
fn two_inputs_from_one_sweep_are_joined_not_crossed() {
    let g = build(
        "stages:\n  a: {kind: echo, sweep: {n: [1, 2, 3]}}\n  b: {kind: echo, params: {text: B}, inputs: {in: a}}\n  c: {kind: echo, params: {text: C}, inputs: {in: a}}\n  d: {kind: echo, inputs: {x: b, y: c}}\n",
    );
    let d: Vec<&Node> = g.nodes.iter().filter(|n| n.stages == ["d"]).collect();
    assert_eq!(d.len(), 3, "{:?}", ids(&g));
    for v in 1..=3 {
        let dn = node(&g, &format!("d[n={v}]"));
        assert_eq!(dn.inputs["x"], vec![idx(&g, &format!("b[n={v}]"))]);
        assert_eq!(dn.inputs["y"], vec![idx(&g, &format!("c[n={v}]"))]);
    }
    assert_eq!(g.nodes.len(), 12);
}

#[test]
fn independent_sweeps_cross() {
    let g = build(
        "stages:\n  a: {kind: echo, sweep: {n: [1, 2]}}\n  b: {kind: echo, sweep: {x: [1, 2, 3]}}\n  d: {kind: echo, inputs: {p: a, q: b}}\n",
    );
    assert_eq!(g.select("d").len(), 6);
    assert!(g.find("d[n=2,x=3]").is_some(), "{:?}", ids(&g));
}

#[test]
fn variants_and_variants_times_sweep() {
    let g = build(
        "stages:\n  a:\n    kind: echo\n    variants:\n      v1: {text: one}\n      v2: {text: two}\n",
    );
    assert_eq!(ids(&g), ["a[v1]", "a[v2]"]);
    assert_eq!(node(&g, "a[v2]").params["text"], "two");

    let g = build(
        "stages:\n  a:\n    kind: echo\n    params: {text: base, n: 9}\n    variants:\n      v1: {text: one}\n      v2: {}\n    sweep: {n: [1, 2]}\n  b: {kind: echo, inputs: {in: a}}\n",
    );
    let want = [
        "a[v1,n=1]",
        "a[v1,n=2]",
        "a[v2,n=1]",
        "a[v2,n=2]",
        "b[v1,n=1]",
        "b[v1,n=2]",
        "b[v2,n=1]",
        "b[v2,n=2]",
    ];
    assert_eq!(ids(&g), want);
    // layering: params < variant < sweep point
    assert_eq!(
        node(&g, "a[v1,n=2]").params,
        json!({"text": "one", "n": 2, "x": 0.0})
    );
    assert_eq!(
        node(&g, "a[v2,n=1]").params,
        json!({"text": "base", "n": 1, "x": 0.0})
    );
}

/// `stage[variant]` reads one variant of its input (each variant can get its own downstream
/// settings), keeps the upstream's sweep, and joins with other inputs on the variant axis;
/// an unknown variant, or a stage without variants, is an error at the input's line.
#[test]
fn a_variant_selector_reads_one_variant() {
    let g = build(
        "stages:
  a:
    kind: echo
    variants:
      v1: {text: one}
      v2: {text: two}
    sweep: {n: [1, 2]}
  b1: {kind: echo, params: {text: first}, inputs: {in: 'a[v1]'}}
  b2: {kind: echo, params: {text: second}, inputs: {in: 'a[v2]'}}
  c: {kind: echo, inputs: {in: [b1, 'a[v1]']}}
  r: {kind: echo, inputs: {rows: ['b1[*]', 'b2[*]']}}
",
    );
    let of = |stage: &str| -> Vec<String> {
        ids(&g)
            .into_iter()
            .filter(|i| i.starts_with(&format!("{stage}[")))
            .collect()
    };
    assert_eq!(of("b1"), ["b1[v1,n=1]", "b1[v1,n=2]"]);
    assert_eq!(of("b2"), ["b2[v2,n=1]", "b2[v2,n=2]"]);
    assert_eq!(node(&g, "b2[v2,n=2]").inputs["in"], [idx(&g, "a[v2,n=2]")]);
    assert_eq!(node(&g, "b2[v2,n=2]").params["text"], "second");
    // a join on the variant and sweep axes: c pairs b1[v1,n] with a[v1,n]
    assert_eq!(of("c"), ["c[v1,n=1]", "c[v1,n=2]"]);
    assert_eq!(
        node(&g, "c[v1,n=2]").inputs["in"],
        [idx(&g, "b1[v1,n=2]"), idx(&g, "a[v1,n=2]")]
    );
    assert_eq!(node(&g, "r").inputs["rows"].len(), 4);

    let e = one_error(
        "stages:
  a:
    kind: echo
    variants: {v1: {}, v2: {text: x}}
  b:
    kind: echo
    inputs:
      in: a[v3]
",
    );
    assert_eq!((e.path.as_str(), e.line), ("stages.b.inputs.in", Some(8)));
    assert!(
        e.message.contains("no variant `v3` (its variants: v1, v2)"),
        "{}",
        e.message
    );
    let e = one_error(
        "stages:
  a: {kind: echo}
  b:
    kind: echo
    inputs:
      in: a[v1]
",
    );
    assert!(
        e.message.contains("stage `a` has no variants"),
        "{}",
        e.message
    );
    let e = one_error(
        "stages:
  a: {kind: echo}
  b:
    kind: echo
    inputs:
      in: a[v 1]
",
    );
    assert!(e.message.contains("`stage[variant]`"), "{}", e.message);
}

#[test]
fn identical_points_collapse_to_one_node() {
    // `1` and `1.0` of a float param: one node, and one downstream node
    let g = build(
        "stages:\n  a: {kind: echo, sweep: {x: [1, 1.0, 2]}}\n  b: {kind: echo, inputs: {in: a}}\n",
    );
    assert_eq!(g.select("a").len(), 2, "{:?}", ids(&g));
    assert_eq!(g.select("b").len(), 2, "{:?}", ids(&g));
    assert_eq!(g.instances["a"].len(), 3);
    assert_eq!(g.instances["a"][0].node, g.instances["a"][1].node);
    assert_ne!(g.instances["a"][0].node, g.instances["a"][2].node);

    // variants that resolve to the same params: one node, the other id is an alias
    let g = build(
        "stages:\n  a:\n    kind: echo\n    variants:\n      v1: {text: same}\n      v2: {text: same}\n",
    );
    assert_eq!(g.nodes.len(), 1);
    assert_eq!(g.nodes[0].id, "a[v1]");
    assert_eq!(g.nodes[0].aliases, ["a[v2]"]);
    assert_eq!(g.find("a[v2]"), Some(0));

    // two stages with identical kind, params and inputs: one node
    let g = build(
        "stages:\n  a: {kind: echo, params: {text: t}}\n  b: {kind: echo, params: {text: t}}\n",
    );
    assert_eq!(g.nodes.len(), 1);
    assert_eq!(g.nodes[0].aliases, ["b"]);
    assert_eq!(g.nodes[0].stages, ["a", "b"]);
}

#[test]
fn set_override_replaces_a_sweep_axis() {
    let yaml = "stages:\n  a: {kind: echo, sweep: {n: [1, 2, 3], x: [0.5, 1.5]}}\n  b: {kind: echo, inputs: {in: a}}\n";
    let mut o = Overrides::default();
    o.add_set("a.n=5").expect("valid --set");
    let g = build_with(yaml, &o);
    assert_eq!(ids(&g), ["a[x=0.5]", "a[x=1.5]", "b[x=0.5]", "b[x=1.5]"]);
    assert_eq!(node(&g, "a[x=1.5]").params["n"], 5);

    // --set on a plain param
    let mut o = Overrides::default();
    o.add_set("b.text=hello world").expect("valid --set");
    let g = build_with(yaml, &o);
    assert_eq!(g.select("b").len(), 6);
    assert_eq!(node(&g, "b[n=2,x=0.5]").params["text"], "hello world");
}

#[test]
fn sweep_override_adds_or_replaces_an_axis() {
    let yaml = "stages:\n  a: {kind: echo, params: {n: 7}}\n  b: {kind: echo, inputs: {in: a}, sweep: {x: [1, 2]}}\n";
    let mut o = Overrides::default();
    o.add_sweep("a.n=1,2,3").expect("valid --sweep");
    let g = build_with(yaml, &o);
    assert_eq!(g.select("a").len(), 3);
    assert_eq!(ids(&g)[..3], ["a[n=1]", "a[n=2]", "a[n=3]"]);
    assert_eq!(g.select("b").len(), 6);
    assert!(g.find("b[n=3,x=2]").is_some(), "{:?}", ids(&g));

    let mut o = Overrides::default();
    o.add_sweep("b.x=0.25, 0.75, 1.25").expect("valid --sweep");
    let g = build_with(yaml, &o);
    assert_eq!(ids(&g), ["a", "b[x=0.25]", "b[x=0.75]", "b[x=1.25]"]);

    // --set and --sweep of the same param: which one was meant cannot be guessed, so neither
    // is silently dropped
    let mut o = Overrides::default();
    o.add_set("a.n=5").expect("set");
    o.add_sweep("a.n=8,9").expect("sweep");
    let errs = parse_with(yaml, &o).expect_err("both on a.n").0;
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].path, "--sweep a.n");
    assert!(errs[0].message.contains("--set a.n"), "{errs:#?}");
}

#[test]
fn overrides_naming_unknown_stages_or_params_are_errors() {
    let yaml = "stages:\n  a: {kind: echo}\n";
    let mut o = Overrides::default();
    o.add_set("zz.n=5").expect("well formed");
    o.add_sweep("yy.n=1,2").expect("well formed");
    let errs = parse_with(yaml, &o).expect_err("unknown stages").0;
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs.iter()
            .any(|e| e.path == "--set zz.n" && e.message.contains("no stage `zz`")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.path == "--sweep yy.n" && e.message.contains("no stage `yy`")),
        "{errs:#?}"
    );

    let mut o = Overrides::default();
    o.add_set("a.bogus=1").expect("well formed");
    let errs = parse_with(yaml, &o).expect_err("unknown param").0;
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].path.contains("bogus") && errs[0].message.contains("bogus"),
        "{errs:#?}"
    );

    let mut o = Overrides::default();
    assert!(o.add_set("no-dot=1").is_err());
    assert!(o.add_set("a.n").is_err());
    assert!(o.add_sweep("a.n=1,,2").is_err());
}

#[test]
fn key_ignores_yaml_key_order_and_number_spelling() {
    let a = build("stages:\n  a: {kind: echo, params: {text: hi, n: 3, x: 1}}\n");
    let b = build(
        "stages:\n  a:\n    kind: echo\n    params:\n      x: 1.0\n      n: 3\n      text: hi\n",
    );
    assert_eq!(key_of(&a, "a"), key_of(&b, "a"));
    // a default written out equals the default
    let c = build("stages:\n  a: {kind: echo, params: {text: hi, n: 3}}\n");
    let d = build("stages:\n  a: {kind: echo, params: {text: hi, n: 3, x: 0}}\n");
    assert_eq!(key_of(&c, "a"), key_of(&d, "a"));
    assert_ne!(key_of(&a, "a"), key_of(&c, "a"));
    // the stage id is not in the key
    let e = build("stages:\n  renamed: {kind: echo, params: {text: hi, n: 3}}\n");
    assert_eq!(key_of(&c, "a"), key_of(&e, "renamed"));
}

#[test]
fn key_is_the_documented_preimage() {
    let g = build(
        "stages:\n  a: {kind: echo, params: {text: hi, n: 3}}\n  b: {kind: echo, inputs: {in: a}}\n",
    );
    let pa = json!({"text": "hi", "n": 3, "x": 0});
    let ka = KeyPreimage {
        schema: KEY_SCHEMA,
        kind: "echo",
        version: 1,
        params: &pa,
        inputs: Default::default(),
        external: Default::default(),
    }
    .finish();
    assert_eq!(key_of(&g, "a"), ka);
    let pb = json!({"text": "", "n": 0, "x": 0});
    let kb = KeyPreimage {
        schema: KEY_SCHEMA,
        kind: "echo",
        version: 1,
        params: &pb,
        inputs: [("in", vec![ka])].into_iter().collect(),
        external: Default::default(),
    }
    .finish();
    assert_eq!(key_of(&g, "b"), kb);
}

#[test]
fn changed_param_changes_node_and_descendants_only() {
    let spec = |b_text: &str| {
        format!(
            "stages:\n  a: {{kind: echo, params: {{text: A}}}}\n  b: {{kind: echo, params: {{text: {b_text}}}, inputs: {{in: a}}}}\n  s: {{kind: echo, params: {{text: S}}, inputs: {{in: a}}}}\n  c: {{kind: echo, params: {{text: C}}, inputs: {{in: b}}}}\n  d: {{kind: echo, inputs: {{p: c, q: s}}}}\n"
        )
    };
    let g1 = build(&spec("B"));
    let g2 = build(&spec("B2"));
    assert_eq!(key_of(&g1, "a"), key_of(&g2, "a"), "ancestor");
    assert_eq!(key_of(&g1, "s"), key_of(&g2, "s"), "sibling");
    assert_ne!(key_of(&g1, "b"), key_of(&g2, "b"), "changed node");
    assert_ne!(key_of(&g1, "c"), key_of(&g2, "c"), "child");
    assert_ne!(key_of(&g1, "d"), key_of(&g2, "d"), "grandchild");
}

// ---------------------------------------------------------------------------------------------
// 3. plan and exec
// ---------------------------------------------------------------------------------------------

const CHAIN: &str = "stages:\n  a: {kind: echo, params: {text: A}}\n  b: {kind: echo, params: {text: B}, inputs: {in: a}}\n  c: {kind: echo, params: {text: C}, inputs: {in: b}}\n";

#[test]
fn run_twice_second_is_all_cached() {
    let env = Env::new("twice");
    let plan = env.plan(CHAIN);
    assert!(
        plan.status.iter().all(|s| *s == Status::Run(Reason::New)),
        "{:?}",
        plan.status
    );
    assert_eq!(plan.counts(), (0, 3, 0));
    let (s, rec) = env.run(&plan, &opts(2, 1, false));
    assert!(!s.failed() && !s.interrupted);
    assert_eq!(s.count("ran"), 3);
    assert_eq!(
        rec.events.first().map(|e| e.1.clone()),
        Some(Event::Start {
            to_run: 3,
            cached: 0
        })
    );
    assert_eq!(env.store.keys().expect("keys").len(), 3);
    // chain content: each echo prepends its text to its input's
    assert_eq!(env.read_out(&plan, "a"), "A");
    assert_eq!(env.read_out(&plan, "b"), "BA");
    assert_eq!(env.read_out(&plan, "c"), "CBA");

    let plan2 = env.plan(CHAIN);
    assert!(
        plan2.status.iter().all(|s| *s == Status::Cached),
        "{:?}",
        plan2.status
    );
    let (s2, rec2) = env.run(&plan2, &opts(2, 1, false));
    assert!(
        s2.results.iter().all(|r| r.outcome == Outcome::Cached),
        "{:?}",
        s2.results
    );
    assert_eq!(s2.count("cached"), 3);
    assert!(rec2.started().is_empty(), "cached nodes take no worker");
    assert_eq!(
        rec2.events.first().map(|e| e.1.clone()),
        Some(Event::Start {
            to_run: 0,
            cached: 3
        })
    );
}

#[test]
fn gather_runs_and_concatenates_in_order() {
    let env = Env::new("gather");
    let yaml = "stages:\n  a: {kind: echo, sweep: {text: [x, y, z]}}\n  r:\n    kind: echo\n    params: {text: '>'}\n    inputs:\n      rows: a[*]\n";
    let plan = env.plan(yaml);
    let (s, _) = env.run(&plan, &opts(3, 1, false));
    assert_eq!(s.count("ran"), 4);
    assert_eq!(env.read_out(&plan, "r"), ">xyz");
}

#[test]
fn changed_middle_param_reruns_it_and_descendants() {
    let env = Env::new("middle");
    let yaml1 = "stages:\n  a: {kind: echo, params: {text: A}}\n  b: {kind: echo, params: {text: B, n: 1}, inputs: {in: a}}\n  s: {kind: echo, params: {text: S}, inputs: {in: a}}\n  c: {kind: echo, params: {text: C}, inputs: {in: b}}\n";
    let (s, _) = env.run(&env.plan(yaml1), &opts(2, 1, false));
    assert_eq!(s.count("ran"), 4);

    let yaml2 = yaml1.replace("{text: B, n: 1}", "{text: B, n: 2}");
    let plan = env.plan(&yaml2);
    assert_eq!(*status(&plan, "a"), Status::Cached);
    assert_eq!(*status(&plan, "s"), Status::Cached);
    assert_eq!(
        *status(&plan, "b"),
        Status::Run(Reason::ParamsChanged(vec!["n: 1 -> 2".into()]))
    );
    match status(&plan, "c") {
        Status::Run(Reason::InputsChanged(slots)) => assert_eq!(slots, &["in"]),
        other => panic!("c should run because its input changed, got {other:?}"),
    }
    let (s, _) = env.run(&plan, &opts(2, 1, false));
    assert_eq!(s.count("ran"), 2);
    assert_eq!(s.count("cached"), 2);
    assert_eq!(*outcome(&plan, &s, "b"), Outcome::Ran);
    assert_eq!(*outcome(&plan, &s, "c"), Outcome::Ran);
}

const FAILING: &str = "stages:\n  f: {kind: fail, params: {message: boom}}\n  g: {kind: echo, inputs: {in: f}}\n  h: {kind: echo, params: {text: H}}\n  h2: {kind: echo, params: {text: I}, inputs: {in: h}}\n";

#[test]
fn failing_node_is_not_cached_and_its_dependents_are_skipped() {
    let env = Env::new("fail");
    let plan = env.plan(FAILING);
    let (s, rec) = env.run(&plan, &opts(1, 1, false));
    assert!(s.failed());
    assert!(!s.interrupted);
    assert_eq!(*outcome(&plan, &s, "f"), Outcome::Failed("boom".into()));
    assert_eq!(*outcome(&plan, &s, "g"), Outcome::Skipped);
    // without --keep-going, nodes not yet started are skipped too
    assert_eq!(*outcome(&plan, &s, "h"), Outcome::Skipped);
    assert_eq!(*outcome(&plan, &s, "h2"), Outcome::Skipped);
    assert_eq!(rec.started(), [idx(&plan.graph, "f")]);
    assert!(!env.contains(&plan, "f"));
    assert!(env.store.keys().expect("keys").is_empty());
    // every node got a Finished event
    let finished = rec
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Finished(..)))
        .count();
    assert_eq!(finished, 4);
    // the failed attempt's log is kept
    let f_key = key_of(&plan.graph, "f");
    let log = env.store.failed_log(f_key.key()).expect("failed log kept");
    let text = std::fs::read_to_string(log).expect("read failed log");
    assert!(
        text.contains("about to fail") && text.contains("boom"),
        "{text}"
    );
    // next plan: it failed before
    let plan2 = env.plan(FAILING);
    assert_eq!(*status(&plan2, "f"), Status::Run(Reason::FailedBefore));
}

#[test]
fn a_kind_can_add_a_hint_to_its_failure() {
    let env = Env::new("fail-hint");
    let plan = env.plan("stages:\n  f: {kind: fail, params: {message: wants a hint}}\n");
    let (s, _) = env.run(&plan, &opts(1, 1, false));
    let want = "wants a hint\n  hint: the params were {\"message\":\"wants a hint\"}";
    assert_eq!(*outcome(&plan, &s, "f"), Outcome::Failed(want.into()));
    let log = env
        .store
        .failed_log(key_of(&plan.graph, "f").key())
        .expect("failed log kept");
    let text = std::fs::read_to_string(log).expect("read failed log");
    assert!(text.contains(&format!("error: {want}")), "{text}");
}

#[test]
fn keep_going_runs_independent_branches() {
    let env = Env::new("keepgoing");
    let plan = env.plan(FAILING);
    let (s, _) = env.run(&plan, &opts(1, 1, true));
    assert!(s.failed());
    assert_eq!(*outcome(&plan, &s, "f"), Outcome::Failed("boom".into()));
    assert_eq!(*outcome(&plan, &s, "g"), Outcome::Skipped);
    assert_eq!(*outcome(&plan, &s, "h"), Outcome::Ran);
    assert_eq!(*outcome(&plan, &s, "h2"), Outcome::Ran);
    assert_eq!(
        (s.count("failed"), s.count("skipped"), s.count("ran")),
        (1, 1, 2)
    );
    assert_eq!(env.read_out(&plan, "h2"), "IH");
    assert!(!env.contains(&plan, "f"));
    assert!(!env.contains(&plan, "g"));
}

#[test]
fn panicking_stage_fails_only_its_node() {
    let env = Env::new("panic");
    let yaml = "stages:\n  p: {kind: panic, params: {message: kaboom}}\n  after: {kind: echo, inputs: {in: p}}\n  e: {kind: echo, params: {text: E}}\n";
    let plan = env.plan(yaml);
    let (s, _) = env.run(&plan, &opts(2, 1, true));
    match outcome(&plan, &s, "p") {
        Outcome::Failed(m) => assert!(m.contains("kaboom") && m.contains("panic"), "{m}"),
        other => panic!("panicking node should fail, got {other:?}"),
    }
    assert_eq!(*outcome(&plan, &s, "after"), Outcome::Skipped);
    assert_eq!(*outcome(&plan, &s, "e"), Outcome::Ran);
    assert!(!env.contains(&plan, "p"));
    assert!(env.contains(&plan, "e"));
}

#[test]
fn cancel_before_run_runs_nothing() {
    let env = Env::new("cancel0");
    let plan = env.plan(CHAIN);
    let cancel = AtomicBool::new(true);
    let mut rec = Recorder::default();
    let s = pipe_engine::exec::run(
        &plan,
        &env.reg,
        &env.store,
        &opts(2, 1, false),
        &cancel,
        &mut rec,
    );
    assert!(s.interrupted);
    assert!(rec.started().is_empty());
    assert_eq!(s.count("skipped"), 3);
    assert_eq!(s.count("ran"), 0);
    assert!(env.store.keys().expect("keys").is_empty());
}

#[test]
fn cancel_between_nodes_keeps_finished_ones() {
    let env = Env::new("cancel1");
    let plan = env.plan(CHAIN);
    let a = idx(&plan.graph, "a");
    let cancel = AtomicBool::new(false);
    let mut obs = CancelOn {
        flag: &cancel,
        when: Box::new(move |e| matches!(e, Event::Finished(i, _) if *i == a)),
        rec: Recorder::default(),
    };
    let s = pipe_engine::exec::run(
        &plan,
        &env.reg,
        &env.store,
        &opts(2, 1, false),
        &cancel,
        &mut obs,
    );
    assert!(s.interrupted);
    assert_eq!(*outcome(&plan, &s, "a"), Outcome::Ran);
    assert_eq!(*outcome(&plan, &s, "b"), Outcome::Skipped);
    assert_eq!(*outcome(&plan, &s, "c"), Outcome::Skipped);
    assert!(env.contains(&plan, "a"));
    assert!(!env.contains(&plan, "b"));
    let plan2 = env.plan(CHAIN);
    assert_eq!(*status(&plan2, "a"), Status::Cached);
    assert!(matches!(status(&plan2, "b"), Status::Run(_)));
}

#[test]
fn cancel_during_a_node_discards_it() {
    let env = Env::new("cancel2");
    let yaml = "stages:\n  slow: {kind: sleep, params: {ms: 20000}}\n";
    let plan = env.plan(yaml);
    let cancel = AtomicBool::new(false);
    let mut obs = CancelOn {
        flag: &cancel,
        when: Box::new(|e| matches!(e, Event::Started(_))),
        rec: Recorder::default(),
    };
    let t0 = Instant::now();
    let s = pipe_engine::exec::run(
        &plan,
        &env.reg,
        &env.store,
        &opts(1, 1, false),
        &cancel,
        &mut obs,
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "cancel should stop a running stage: {:?}",
        t0.elapsed()
    );
    assert!(s.interrupted);
    assert_ne!(*outcome(&plan, &s, "slow"), Outcome::Ran);
    assert!(!env.contains(&plan, "slow"));
    assert!(env.store.keys().expect("keys").is_empty());
}

#[test]
fn independent_nodes_run_in_parallel() {
    let env = Env::new("parallel");
    let yaml = "stages:\n  s1: {kind: sleep, params: {ms: 300, tag: '1'}}\n  s2: {kind: sleep, params: {ms: 300, tag: '2'}}\n  s3: {kind: sleep, params: {ms: 300, tag: '3'}}\n  s4: {kind: sleep, params: {ms: 300, tag: '4'}}\n";
    let plan = env.plan(yaml);
    assert_eq!(plan.graph.nodes.len(), 4);
    let t0 = Instant::now();
    let (s, rec) = env.run(&plan, &opts(4, 1, false));
    let wall = t0.elapsed();
    assert_eq!(s.count("ran"), 4);
    assert!(
        wall < Duration::from_millis(900),
        "4 x 300 ms with -j4 took {wall:?}"
    );
    assert!(wall >= Duration::from_millis(300), "{wall:?}");
    let all: Vec<usize> = (0..4).collect();
    assert_eq!(
        rec.max_concurrent(&all),
        4,
        "all four should be running at once"
    );
    for r in &s.results {
        assert!(r.seconds >= 0.3, "{r:?}");
    }

    // -j1: strictly one at a time
    let env = Env::new("serial");
    let yaml = yaml.replace("ms: 300", "ms: 30");
    let plan = env.plan(&yaml);
    let (s, rec) = env.run(&plan, &opts(1, 1, false));
    assert_eq!(s.count("ran"), 4);
    assert_eq!(rec.max_concurrent(&all), 1);
}

#[test]
fn gpu_nodes_are_exclusive() {
    let env = Env::new("gpu");
    let yaml = "stages:\n  g1: {kind: sleep, params: {ms: 150, gpu: true, tag: '1'}}\n  g2: {kind: sleep, params: {ms: 150, gpu: true, tag: '2'}}\n  c1: {kind: sleep, params: {ms: 150, tag: c}}\n";
    let plan = env.plan(yaml);
    let (g1, g2, c1) = (
        idx(&plan.graph, "g1"),
        idx(&plan.graph, "g2"),
        idx(&plan.graph, "c1"),
    );
    assert!(plan.graph.nodes[g1].resources.gpu && !plan.graph.nodes[c1].resources.gpu);
    let (s, rec) = env.run(&plan, &opts(4, 1, false));
    assert_eq!(s.count("ran"), 3);
    assert_eq!(
        rec.max_concurrent(&[g1, g2]),
        1,
        "two gpu nodes overlapped with --gpus 1"
    );
    // the non-gpu node still runs beside a gpu one
    assert_eq!(rec.max_concurrent(&[g1, g2, c1]), 2);

    // the same two nodes without gpu overlap under -j2
    let env = Env::new("nogpu");
    let yaml = yaml.replace("gpu: true", "gpu: false");
    let plan = env.plan(&yaml);
    let (g1, g2) = (idx(&plan.graph, "g1"), idx(&plan.graph, "g2"));
    let (s, rec) = env.run(&plan, &opts(2, 1, false));
    assert_eq!(s.count("ran"), 3);
    assert_eq!(rec.max_concurrent(&[g1, g2]), 2);

    // --gpus 2 lets both gpu nodes run at once
    let env = Env::new("gpu2");
    let yaml = yaml.replace("gpu: false", "gpu: true");
    let plan = env.plan(&yaml);
    let (g1, g2) = (idx(&plan.graph, "g1"), idx(&plan.graph, "g2"));
    let (_, rec) = env.run(&plan, &opts(4, 2, false));
    assert_eq!(rec.max_concurrent(&[g1, g2]), 2);
}

#[test]
fn gpu_node_without_gpu_tokens_does_not_hang() {
    // `pipe run --gpus 0` on a pipeline with a gpu node must end (fail or skip that node),
    // not wait forever for a token that never comes.
    let env = Env::new("gpu0");
    let yaml = "stages:\n  g: {kind: sleep, params: {ms: 1, gpu: true}}\n  c: {kind: echo, params: {text: C}}\n";
    let plan = env.plan(yaml);
    let cancel = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel();
    let finished = std::thread::scope(|scope| {
        scope.spawn(|| {
            let s = pipe_engine::exec::run(
                &plan,
                &env.reg,
                &env.store,
                &opts(2, 0, false),
                &cancel,
                &mut Recorder::default(),
            );
            let _ = tx.send(s);
        });
        let r = rx.recv_timeout(Duration::from_secs(5));
        if r.is_err() {
            // unblock the coordinator so the scope can end
            cancel.store(true, Ordering::SeqCst);
        }
        r
    });
    let s = finished.expect("exec::run with gpus = 0 and a gpu node never returned");
    assert_ne!(*outcome(&plan, &s, "g"), Outcome::Ran);
    assert_eq!(*outcome(&plan, &s, "c"), Outcome::Ran);
    assert!(!s.interrupted);
}

#[test]
fn deleted_intermediate_under_a_cached_consumer_is_not_needed() {
    let env = Env::new("notneeded");
    let yaml = "stages:\n  a: {kind: echo, params: {text: A}}\n  b: {kind: echo, params: {text: B}, inputs: {in: a}}\n";
    let plan = env.plan(yaml);
    let (s, _) = env.run(&plan, &opts(2, 1, false));
    assert_eq!(s.count("ran"), 2);
    let a_key = key_of(&plan.graph, "a");
    std::fs::remove_dir_all(env.store.entry_dir(a_key.key())).expect("remove a's entry");
    assert!(!env.store.contains(a_key.key()));

    let plan2 = env.plan(yaml);
    assert_eq!(*status(&plan2, "a"), Status::NotNeeded);
    assert_eq!(*status(&plan2, "b"), Status::Cached);
    assert_eq!(plan2.counts(), (1, 0, 1));
    let (s2, rec) = env.run(&plan2, &opts(2, 1, false));
    assert_eq!(*outcome(&plan2, &s2, "a"), Outcome::NotNeeded);
    assert_eq!(*outcome(&plan2, &s2, "b"), Outcome::Cached);
    assert!(rec.started().is_empty());
    assert!(!env.store.contains(a_key.key()));

    // asking for `a` explicitly rebuilds it, and the reason says it is gone from the store
    let plan3 = env.plan_targets(yaml, &["a"]);
    assert_eq!(*status(&plan3, "a"), Status::Run(Reason::NotInStore));
}

#[test]
fn targets_limit_what_runs() {
    let env = Env::new("targets");
    let plan = env.plan_targets(CHAIN, &["a"]);
    assert!(matches!(status(&plan, "a"), Status::Run(_)));
    assert_eq!(*status(&plan, "b"), Status::NotNeeded);
    assert_eq!(*status(&plan, "c"), Status::NotNeeded);
    let (s, rec) = env.run(&plan, &opts(2, 1, false));
    assert_eq!(*outcome(&plan, &s, "a"), Outcome::Ran);
    assert_eq!(*outcome(&plan, &s, "b"), Outcome::NotNeeded);
    assert_eq!(*outcome(&plan, &s, "c"), Outcome::NotNeeded);
    assert_eq!(rec.started(), [idx(&plan.graph, "a")]);
    assert!(env.contains(&plan, "a"));
    assert!(!env.contains(&plan, "b"));
    assert_eq!(
        env.store.keys().expect("keys"),
        vec![*key_of(&plan.graph, "a").key()]
    );

    // a middle target pulls in what it needs (a is cached now)
    let plan = env.plan_targets(CHAIN, &["b"]);
    assert_eq!(*status(&plan, "a"), Status::Cached);
    assert!(matches!(status(&plan, "b"), Status::Run(_)));
    assert_eq!(*status(&plan, "c"), Status::NotNeeded);

    // a target that names nothing is an error
    let g = env.graph(CHAIN);
    assert!(pipe_engine::plan::plan(g, &env.store, &["nope".to_string()]).is_err());
}

// ---------------------------------------------------------------------------------------------
// integrity: damaged inputs
// ---------------------------------------------------------------------------------------------

/// Overwrites node `id`'s `out.txt` in the store (same length, other bytes).
fn damage_out(env: &Env, plan: &Plan, id: &str) {
    let entry = env
        .store
        .get(key_of(&plan.graph, id).key())
        .expect("store get")
        .expect("entry present");
    let path = entry.file("out.txt").expect("out.txt listed");
    let text = std::fs::read_to_string(&path).expect("read out.txt");
    std::fs::write(&path, text.to_lowercase()).expect("damage out.txt");
}

#[test]
fn check_inputs_moves_damaged_inputs_aside_and_the_plan_reruns_them() {
    use pipe_engine::integrity::{OnCorrupt, check_inputs};
    let env = Env::new("integrity");
    let plan = env.plan(CHAIN);
    let (s, _) = env.run(&plan, &opts(2, 1, false));
    assert_eq!(s.count("ran"), 3);
    damage_out(&env, &plan, "a");
    damage_out(&env, &plan, "b");

    // c changes: it reads b (damaged), whose recompute reads a (damaged too)
    let changed = CHAIN.replace("text: C", "text: D");
    assert_ne!(changed, CHAIN);
    let plan = env.plan(&changed);
    assert_eq!(*status(&plan, "a"), Status::Cached);
    assert_eq!(*status(&plan, "b"), Status::Cached);
    let never = || false;
    let (plan, found) =
        check_inputs(plan, &env.store, &[], OnCorrupt::Recompute, &never).expect("check");
    let moved: Vec<&str> = found.iter().map(|c| c.node.as_str()).collect();
    assert_eq!(
        moved,
        ["b", "a"],
        "b is found first, then a through b's recompute"
    );
    for c in &found {
        assert_eq!(c.problems.len(), 1, "{c}");
        assert_eq!(c.problems[0].file(), Some("out.txt"));
        let aside = c.moved_to.as_ref().expect("moved");
        assert!(
            aside.starts_with(env.store.root().join("corrupt")),
            "{}",
            aside.display()
        );
        assert!(c.to_string().contains(&c.key.to_string()), "{c}");
    }
    for id in ["a", "b"] {
        assert!(
            matches!(status(&plan, id), Status::Run(Reason::Corrupt(w)) if w.contains("out.txt")),
            "{id}: {:?}",
            status(&plan, id)
        );
    }
    let (s, _) = env.run(&plan, &opts(2, 1, false));
    assert_eq!(s.count("ran"), 3, "{:?}", s.results);
    assert_eq!(env.read_out(&plan, "c"), "DBA");
    assert_eq!(env.store.verify(None).expect("verify"), []);
}

#[test]
fn check_inputs_fail_mode_names_entry_and_file_and_moves_nothing() {
    use pipe_engine::integrity::{OnCorrupt, check_inputs};
    let env = Env::new("integrity-fail");
    let plan = env.plan(CHAIN);
    env.run(&plan, &opts(2, 1, false));
    damage_out(&env, &plan, "b");
    let b = *key_of(&plan.graph, "b").key();
    let plan = env.plan(&CHAIN.replace("text: C", "text: D"));
    let never = || false;
    match check_inputs(plan, &env.store, &[], OnCorrupt::Fail, &never) {
        Err(pipe_engine::Error::Corrupt(found)) => {
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].key, b);
            assert_eq!(found[0].moved_to, None);
            let msg = pipe_engine::Error::Corrupt(found).to_string();
            assert!(
                msg.contains(&b.to_string()) && msg.contains("file out.txt"),
                "{msg}"
            );
            assert!(msg.contains("node b"), "{msg}");
        }
        other => panic!("expected Error::Corrupt, got {:?}", other.map(|(_, f)| f)),
    }
    assert!(env.store.contains(&b), "fail mode moves nothing");
}

#[test]
fn exec_refuses_to_hand_a_damaged_input_to_a_stage() {
    // without check_inputs (a library caller, or an entry another run committed meanwhile) the
    // worker re-hashes the input itself and fails the node rather than feed it bad bytes
    let env = Env::new("integrity-exec");
    let plan = env.plan(CHAIN);
    env.run(&plan, &opts(2, 1, false));
    damage_out(&env, &plan, "b");
    let plan = env.plan(&CHAIN.replace("text: C", "text: D"));
    let (s, _) = env.run(&plan, &opts(2, 1, false));
    match outcome(&plan, &s, "c") {
        Outcome::Failed(msg) => {
            assert!(msg.contains("damaged") && msg.contains("out.txt"), "{msg}");
            assert!(
                msg.contains(&key_of(&plan.graph, "b").key().to_string()),
                "{msg}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(!env.contains(&plan, "c"));
}
