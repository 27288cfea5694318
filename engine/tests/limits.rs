//! Size limits of spec expansion (issue 9): a stage's grid and a pipeline's instances are
//! counted before they are built, and the count matches what the graph builds.

use std::path::Path;

use pipe_engine::spec::{MAX_GRID_POINTS, MAX_INSTANCES};
use pipe_engine::{Overrides, Pipeline, Registry, SpecErrors, graph, spec};

fn registry() -> Registry {
    let mut r = Registry::new();
    pipe_engine::testing::register(&mut r);
    r
}

fn parse(yaml: &str) -> Result<Pipeline, SpecErrors> {
    spec::parse(
        yaml,
        Path::new("p.yaml"),
        &registry(),
        &Overrides::default(),
    )
}

fn values(n: usize) -> String {
    let v: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    format!("[{}]", v.join(", "))
}

#[test]
fn a_grid_over_the_limit_is_refused_before_expansion() {
    assert_eq!(MAX_GRID_POINTS, 10_000);
    let ten = values(10);
    // 10^5 points in sweeps
    let e = parse(&format!(
        "stages:\n  a:\n    kind: echo\n    sweep: {{n: {ten}, x: {ten}, text: {ten}, b: {ten}, c: {ten}}}\n"
    ))
    .expect_err("too many points");
    assert_eq!(e.0.len(), 1, "{e}");
    assert_eq!(e.0[0].path, "stages.a.sweep");
    assert_eq!(e.0[0].line, Some(4));
    assert!(
        e.0[0]
            .message
            .starts_with("the stage's grid has 100000 points"),
        "{e}"
    );
    // variants times sweep: 101 x 100 = 10,100
    let variants: Vec<String> = (0..101).map(|i| format!("v{i}: {{}}")).collect();
    let e = parse(&format!(
        "stages:\n  a:\n    kind: echo\n    variants: {{{}}}\n    sweep: {{n: {}}}\n",
        variants.join(", "),
        values(100)
    ))
    .expect_err("too many points");
    assert!(e.0[0].message.contains("10100 points"), "{e}");
    // a product past usize is still a clean error
    let many: Vec<String> = (0..20).map(|i| format!("p{i}: {}", values(10))).collect();
    let e = parse(&format!(
        "stages:\n  a:\n    kind: echo\n    sweep: {{{}}}\n",
        many.join(", ")
    ))
    .expect_err("10^20 points");
    assert!(e.0[0].message.contains("grid has too many points"), "{e}");
    // exactly at the limit is fine
    let p = parse(&format!(
        "stages:\n  a: {{kind: echo, sweep: {{n: {}, x: {}}}}}\n",
        values(100),
        values(100)
    ))
    .expect("10,000 points");
    assert_eq!(p.stages[0].grid.len(), 10_000);
}

#[test]
fn fan_out_over_the_limit_is_refused_naming_the_stage() {
    assert_eq!(MAX_INSTANCES, 100_000);
    let l = values(100);
    let e = parse(&format!(
        "stages:\n  a: {{kind: echo, sweep: {{n: {l}}}}}\n  b: {{kind: echo, inputs: {{i: a}}, sweep: {{x: {l}}}}}\n  c: {{kind: echo, inputs: {{i: b}}, sweep: {{x: {l}}}}}\n  d: {{kind: echo}}\n"
    ))
    .expect_err("10^6 instances");
    assert_eq!(e.0.len(), 1, "{e}");
    assert_eq!(e.0[0].path, "stages.c");
    assert_eq!(e.0[0].line, Some(4));
    assert!(
        e.0[0].message.contains("more than 100000 nodes")
            && e.0[0].message.contains("its 100 grid points")
            && e.0[0].message.contains("10100 instances before it"),
        "{e}"
    );
    // gathering does not multiply: the report of 10,100 instances is one instance
    let p = parse(&format!(
        "stages:\n  a: {{kind: echo, sweep: {{n: {l}}}}}\n  b: {{kind: echo, inputs: {{i: a}}, sweep: {{x: {l}}}}}\n  r: {{kind: echo, inputs: {{rows: \"b[*]\"}}}}\n"
    ))
    .expect("a gather of 10,000");
    assert_eq!(graph::count_instances(&p.stages, MAX_INSTANCES), Ok(10_101));
}

#[test]
fn the_count_matches_the_graph() {
    let yaml = "\
stages:
  a: {kind: echo, sweep: {n: [1, 2, 3]}}
  v: {kind: echo, variants: {p: {text: P}, q: {text: Q}}}
  b: {kind: echo, params: {text: B}, inputs: {in: a}}
  c: {kind: echo, params: {text: C}, inputs: {in: a}, sweep: {x: [0.5, 1.5]}}
  d: {kind: echo, inputs: {x: b, y: c, z: v}}
  r: {kind: echo, inputs: {rows: [\"d[*]\", \"v[*]\"]}}
  s: {kind: sum, inputs: {terms: d}, sweep: {value: [1, 2]}}
";
    let p = parse(yaml).expect("valid");
    let counted = graph::count_instances(&p.stages, MAX_INSTANCES).expect("small");
    let g = graph::build(p.clone(), &registry());
    let built: usize = g.instances.values().map(Vec::len).sum();
    // a 3, v 2, b 3, c 6, d 3*2 (join on n) * 2 (v) = 12, r 1, s 12 * 2 = 24
    assert_eq!(built, 3 + 2 + 3 + 6 + 12 + 1 + 24);
    assert_eq!(counted, built);
    // the limit is exact: one below the total fails at the last stage
    let e = graph::count_instances(&p.stages, built - 1).expect_err("one over");
    assert_eq!((e.stage.as_str(), e.grid, e.before), ("s", 2, built - 24));
}
