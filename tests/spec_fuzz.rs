//! Property tests of the spec parser (issue 9): whatever the text, `pipe_engine::spec::parse_with`
//! with the real stage kinds (`pipe_stages::register_all`) returns either a valid pipeline, which
//! then expands into a graph of keyed nodes, or a non-empty list of errors, each naming the
//! file, a line inside the text (when it has one) and a non-empty message. It never panics, and
//! it answers within a second.
//!
//! Generators:
//! - YAML-ish documents from a grammar: mappings, sequences and scalars in block and flow
//!   style, anchors, aliases (some undefined), merge keys, tags, odd numbers (`1e400`, `2^70`,
//!   `.nan`, `0x..`), odd strings (`..`, `/`, NUL, `${VAR}`), shaped like a pipeline (real kinds,
//!   real param names, inputs, sweeps, variants) or not;
//! - arbitrary bytes and token soup;
//! - mutations of the shipped pipelines (`pipelines/*.yaml`): a scalar replaced by a value of
//!   another type or by NaN / inf / huge / negative / zero numbers, a key deleted, renamed or
//!   copied into another mapping (a pretrain param on an evaluate stage), a line duplicated
//!   (duplicate keys), deleted or cut.
//!
//! Each test runs [`DEFAULT_CASES`] cases (`PROPTEST_CASES=N` for more; `PIPE_FUZZ_SHOW=1` prints
//! the grammar's invalid documents with their errors) from a fixed seed, so that CI checks the
//! same documents every time and a failure reproduces; `PIPE_FUZZ_SEED=N` picks another seed,
//! `PIPE_FUZZ_SEED=random` a new one per run (printed), to explore. The shipped pipelines'
//! data root is pointed at a two-image folder in a temp dir, so valid mutations get as far as
//! expansion without reading the real data set.

use std::cell::{Cell, RefCell};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pipe_engine::{Overrides, Registry, StatCache};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_yaml::Value as Y;

/// Cases per test unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 3000;

/// The slowest a single parse may be.
const PARSE_LIMIT: Duration = Duration::from_secs(1);

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// The seed of every runner: [`DEFAULT_SEED`] unless `PIPE_FUZZ_SEED` says otherwise.
const DEFAULT_SEED: u64 = 0x5eed_f022;

fn seed() -> u64 {
    match std::env::var("PIPE_FUZZ_SEED") {
        Err(_) => DEFAULT_SEED,
        Ok(s) if s == "random" => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            (t as u64) ^ (u64::from(std::process::id()) << 32)
        }
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("PIPE_FUZZ_SEED: expected a number or `random`, got `{s}`")),
    }
}

fn runner() -> TestRunner {
    let seed = seed();
    eprintln!("spec_fuzz: seed {seed} (PIPE_FUZZ_SEED={seed} reproduces this run)");
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases: cases(),
        // failures print the generated text; no regression files in the source tree
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

fn registry() -> Registry {
    let mut reg = Registry::new();
    pipe_stages::register_all(&mut reg);
    reg
}

/// A temp folder holding `data/`, a two-image ImageFolder tree (never decoded at plan time),
/// removed on drop.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("pipe-fuzz-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for split in ["train", "test"] {
            let d = dir.join("data").join(split).join("a");
            std::fs::create_dir_all(&d).expect("create the fixture");
            std::fs::write(d.join("0.png"), b"not decoded at plan time").expect("write");
        }
        Fixture { dir }
    }

    /// The (unwritten) pipeline file: its folder is the fixture.
    fn file(&self) -> PathBuf {
        self.dir.join("fuzz.yaml")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What every input must give: a pipeline that expands, or located errors with messages.
/// Returns whether the text was a valid pipeline.
fn check(
    text: &str,
    file: &Path,
    reg: &Registry,
    stats: &mut StatCache,
) -> Result<bool, TestCaseError> {
    let t0 = Instant::now();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        pipe_engine::spec::parse_with(text, file, reg, &Overrides::default(), stats)
    }))
    .map_err(|_| TestCaseError::fail(format!("the parser panicked on:\n{text}")))?;
    let elapsed = t0.elapsed();
    prop_assert!(
        elapsed < PARSE_LIMIT,
        "parsing took {elapsed:?} on:\n{text}"
    );
    let lines = text.split('\n').count();
    match result {
        Ok(pipeline) => {
            prop_assert!(!pipeline.stages.is_empty(), "a valid pipeline has stages");
            for s in &pipeline.stages {
                prop_assert!(!s.grid.is_empty(), "stage {} has no grid point", s.id);
            }
            let graph = std::panic::catch_unwind(AssertUnwindSafe(|| {
                pipe_engine::graph::build(pipeline, reg)
            }))
            .map_err(|_| TestCaseError::fail(format!("expansion panicked on:\n{text}")))?;
            prop_assert!(!graph.nodes.is_empty(), "no nodes from:\n{text}");
            Ok(true)
        }
        Err(errors) => {
            prop_assert!(!errors.0.is_empty(), "an empty error list for:\n{text}");
            let shown = errors.to_string();
            prop_assert!(shown.contains("fuzz.yaml"), "{shown}");
            for e in &errors.0 {
                prop_assert_eq!(&e.file, file);
                prop_assert!(
                    !e.message.trim().is_empty(),
                    "an error without a message at `{}` for:\n{}",
                    e.path,
                    text
                );
                if let Some(line) = e.line {
                    prop_assert!(
                        (1..=lines).contains(&line),
                        "error `{e}` points at line {line} of a {lines}-line text:\n{text}"
                    );
                }
            }
            Ok(false)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The grammar.

const KINDS: &[&str] = &[
    "dataset",
    "shell",
    "pretrain",
    "evaluate",
    "attack_dataset",
    "finetune",
    "report",
    "nosuch",
];

const PARAMS: &[&str] = &[
    "cmd",
    "outputs",
    "source",
    "root",
    "download",
    "n_classes",
    "n_train",
    "n_test",
    "image_size",
    "resize",
    "train_per_class",
    "test_per_class",
    "seed",
    "method",
    "attack",
    "views",
    "n_views",
    "epochs",
    "batch_size",
    "m",
    "eps",
    "alpha",
    "pgd_steps",
    "scale",
    "ratio",
    "lr",
    "momentum",
    "weight_decay",
    "nesterov",
    "width",
    "hidden_dim",
    "z_dim",
    "temperature",
    "device",
    "mode",
    "preset",
    "attacks",
    "norm",
    "steps",
    "restarts",
    "random_start",
    "test_subset",
    "head",
    "features",
    "optimizer",
    "schedule",
    "beta",
    "faithful",
    "augment",
    "drop_last",
    "columns",
    "rows",
    "title",
    "match",
    "label",
    "metric",
    "header",
    "precision",
];

const SCALARS: &[&str] = &[
    // odd numbers
    "1e400",
    "-1e400",
    "1180591620717411303424",
    "-9223372036854775809",
    "18446744073709551616",
    "9007199254740993",
    "0x7fffffffffffffff",
    "0o777",
    "0b101",
    "+12",
    ".nan",
    ".NaN",
    "-.inf",
    ".inf",
    "-0",
    "-0.0",
    "1_000",
    "0.",
    "1e-400",
    "4.9e-324",
    "8/255",
    "1/0",
    "0/0",
    "-0.1",
    "2",
    "0",
    "-1",
    "1",
    "3",
    "16",
    "0.5",
    "1.0",
    "100000000000",
    // null / bool spellings
    "~",
    "null",
    "true",
    "false",
    "yes",
    "on",
    // strings
    "'quoted'",
    "\"nul \\0 inside\"",
    "\"tab\\tand \\u2028 line separator\"",
    "\"\"",
    "''",
    "../escape",
    "../../outside/x",
    "/nonexistent-pipe-fuzz/abs",
    "a/b",
    "data",
    "data/train",
    // a variable that is always set, in a path that never exists: `${HOME}` was here, and as a
    // dataset root it made parse time depend on the size of the machine's home folder (every
    // file below an external root is hashed), which failed the time limit on CI
    "${PATH}/nonexistent-pipe-fuzz",
    "${PIPE_FUZZ_SURELY_UNSET}",
    "${PIPE_FUZZ_SURELY_UNSET:-data}",
    "'${'",
    "crop",
    "patch",
    "pgd",
    "free",
    "none",
    "simclr",
    "emp_ssl",
    "slf",
    "alf",
    "aff",
    "linf",
    "l2",
    "l1",
    "sound",
    "faithful_emp",
    "custom",
    "cifar10",
    "cifar100",
    "synthetic",
    "imagefolder",
    "auto",
    "hf",
    "cpu",
    "auto",
    "cuda:0",
    "cuda:99999999999999999999",
    "echo hi",
    "'true'",
    "x[*]",
    "s0",
    "s1[*]",
    "'s0[*]'",
    "clean_acc",
    "\"pgd_linf_8/255_acc\"",
    "emoji-🦀",
    "\"\\x00\\x01\\x7f\"",
];

const TAGS: &[&str] = &[
    "!!str", "!!int", "!!float", "!!bool", "!!null", "!!binary", "!!map", "!!seq", "!custom",
    "!<tag:x>",
];

/// A YAML tree before decoration (anchors, aliases, tags and style are chosen at rendering).
#[derive(Clone, Debug)]
enum Node {
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => proptest::sample::select(SCALARS).prop_map(str::to_string),
        2 => proptest::sample::select(PARAMS).prop_map(str::to_string),
        1 => proptest::sample::select(KINDS).prop_map(str::to_string),
        1 => any::<i64>().prop_map(|i| i.to_string()),
        1 => any::<f64>().prop_map(|f| format!("{f:e}")),
        1 => "[a-z_]{0,12}",
        1 => any::<String>().prop_map(|s| format!("{s:?}")),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => proptest::sample::select(PARAMS).prop_map(str::to_string),
        1 => proptest::sample::select(&["kind", "inputs", "params", "sweep", "variants",
            "description", "stages", "defaults", "name", "x-a", "<<", "dataset", "encoder",
            "model", "runs", "adversarial", "s0", "s1", "s2"][..]).prop_map(str::to_string),
        1 => scalar(),
    ]
}

fn tree() -> impl Strategy<Value = Node> {
    scalar()
        .prop_map(Node::Scalar)
        .prop_recursive(5, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Node::Seq),
                proptest::collection::vec((key(), inner), 0..5).prop_map(Node::Map),
            ]
        })
}

/// Valid values of the params of each kind (the templates' material).
type Table = &'static [(&'static str, &'static [&'static str])];

const TEMPLATES: &[(&str, Table)] = &[
    (
        "shell",
        &[
            ("cmd", &["echo hi", "'true'", "\"cat $PIPE_PARAMS\""]),
            ("outputs", &["[a.txt]", "[]", "[sub/b.txt]"]),
            ("lr", &["0.1", "8/255", "x"]),
            ("count", &["1", "10"]),
        ],
    ),
    (
        "dataset",
        &[
            ("source", &["synthetic"]),
            ("n_train", &["20", "40"]),
            ("n_test", &["10"]),
            ("n_classes", &["2", "4"]),
            ("image_size", &["16", "32"]),
            ("seed", &["0", "7"]),
        ],
    ),
    (
        "pretrain",
        &[
            ("method", &["simclr", "emp_ssl"]),
            ("attack", &["none", "pgd", "free"]),
            ("views", &["crop", "patch"]),
            ("n_views", &["2"]),
            ("epochs", &["1", "2"]),
            ("batch_size", &["4", "8"]),
            ("m", &["1", "3"]),
            ("eps", &["8/255", "0.03", "0"]),
            ("alpha", &["0.01", "2/255"]),
            ("width", &["8", "16"]),
            ("lr", &["0.3", "1e-3"]),
        ],
    ),
    (
        "finetune",
        &[
            ("mode", &["slf", "alf", "aff"]),
            ("epochs", &["1", "2"]),
            ("batch_size", &["4", "8"]),
            ("lr", &["0.1", "3e-4"]),
            ("eps", &["8/255", "0"]),
        ],
    ),
    (
        "evaluate",
        &[
            ("preset", &["sound", "faithful_emp", "faithful_simclr"]),
            (
                "attacks",
                &[
                    "[{eps: 8/255}]",
                    "[{norm: l2, eps: 0.5}, {norm: linf, eps: 4/255}]",
                    "[]",
                ],
            ),
            ("batch_size", &["16"]),
        ],
    ),
    (
        "attack_dataset",
        &[
            ("norm", &["linf", "l2", "l1"]),
            ("eps", &["8/255", "0.5"]),
            ("steps", &["1", "5"]),
        ],
    ),
    (
        "report",
        &[
            (
                "columns",
                &[
                    "[{clean_acc: Clean}]",
                    "[{metric: pretrain.train_minutes, header: T}]",
                ],
            ),
            ("title", &["t"]),
            ("precision", &["1", "3"]),
        ],
    ),
];

/// The inputs a templated stage of `kind` at position `index` connects (to earlier stages).
fn template_inputs(kind: &str, index: usize) -> Vec<(String, Node)> {
    let prev = |n: usize| Node::Scalar(format!("s{}", index.saturating_sub(n)));
    let first = Node::Scalar("s0".into());
    match kind {
        "pretrain" => vec![("dataset".into(), first)],
        "finetune" => vec![("encoder".into(), prev(1)), ("dataset".into(), first)],
        "evaluate" | "attack_dataset" => {
            vec![("model".into(), prev(1)), ("dataset".into(), first)]
        }
        "report" => vec![(
            "runs".into(),
            Node::Scalar(format!("s{}[*]", index.saturating_sub(1))),
        )],
        "shell" if index > 0 => vec![("x".into(), prev(1))],
        _ => Vec::new(),
    }
}

/// A stage built from [`TEMPLATES`]: valid values, maybe a sweep or variants over valid values,
/// and sometimes one foreign param or odd value (mostly valid pipelines, so the normalization
/// and expansion paths are reached too).
fn template(index: usize) -> impl Strategy<Value = (String, Node)> {
    (
        0..TEMPLATES.len(),
        proptest::collection::vec((any::<usize>(), any::<usize>()), 0..5),
        proptest::option::of((any::<usize>(), any::<usize>(), any::<usize>())),
        proptest::option::weighted(0.15, (key(), scalar())),
    )
        .prop_map(move |(k, picks, fan, odd)| {
            // the first stage is the data set everything reads
            let (kind, table) = if index == 0 {
                TEMPLATES[1]
            } else {
                TEMPLATES[k]
            };
            let mut params: Vec<(String, Node)> = Vec::new();
            let mut set = |name: &str, value: &str| {
                params.retain(|(n, _)| n != name);
                params.push((name.to_string(), Node::Scalar(value.to_string())));
            };
            if kind == "shell" {
                set("cmd", "echo hi");
            }
            if kind == "report" {
                set("columns", "[{clean_acc: Clean}]");
            }
            if kind == "dataset" {
                set("source", "synthetic");
            }
            if kind == "pretrain" {
                set("method", "simclr");
            }
            if kind == "finetune" {
                set("mode", "slf");
            }
            for (p, v) in picks {
                let (name, values) = table[p % table.len()];
                set(name, values[v % values.len()]);
            }
            if let Some((name, value)) = odd {
                set(&name, &value);
            }
            let mut fields = vec![
                ("kind".to_string(), Node::Scalar(kind.to_string())),
                (
                    "inputs".to_string(),
                    Node::Map(template_inputs(kind, index)),
                ),
                ("params".to_string(), Node::Map(params)),
            ];
            if let Some((p, a, b)) = fan {
                let (name, values) = table[p % table.len()];
                let pair = vec![
                    Node::Scalar(values[a % values.len()].to_string()),
                    Node::Scalar(values[b % values.len()].to_string()),
                ];
                if a % 2 == 0 {
                    fields.push((
                        "sweep".into(),
                        Node::Map(vec![(name.to_string(), Node::Seq(pair))]),
                    ));
                } else {
                    let variants = pair
                        .into_iter()
                        .enumerate()
                        .map(|(i, v)| (format!("v{i}"), Node::Map(vec![(name.to_string(), v)])))
                        .collect();
                    fields.push(("variants".into(), Node::Map(variants)));
                }
            }
            (format!("s{index}"), Node::Map(fields))
        })
}

/// A stage: from the templates, or free-form with real kinds and param names.
fn stage(index: usize) -> BoxedStrategy<(String, Node)> {
    prop_oneof![4 => template(index), 1 => free_stage(index)].boxed()
}

/// A free-form stage: real kinds and param names, any values.
fn free_stage(index: usize) -> impl Strategy<Value = (String, Node)> {
    let params = proptest::collection::vec(
        (
            key(),
            prop_oneof![3 => scalar().prop_map(Node::Scalar), 1 => tree()],
        ),
        0..6,
    );
    let inputs = proptest::collection::vec(
        (
            proptest::sample::select(&["dataset", "encoder", "model", "runs", "x", "bad-slot"][..]),
            prop_oneof![
                proptest::sample::select(
                    &["s0", "s1", "s2", "s0[*]", "s1[*]", "ghost", "s0/..", ""][..]
                )
                .prop_map(|s| Node::Scalar(s.to_string())),
                tree(),
            ],
        ),
        0..3,
    );
    let sweep = proptest::collection::vec(
        (
            key(),
            proptest::collection::vec(scalar().prop_map(Node::Scalar), 0..4),
        ),
        0..3,
    );
    let variants = proptest::collection::vec(
        (
            prop_oneof![
                "[a-z]{1,6}",
                Just("../x".to_string()),
                Just("a/b".to_string())
            ],
            proptest::collection::vec((key(), scalar().prop_map(Node::Scalar)), 0..4),
        ),
        0..3,
    );
    (
        proptest::sample::select(KINDS),
        params,
        inputs,
        sweep,
        variants,
        any::<u8>(),
    )
        .prop_map(move |(kind, params, inputs, sweep, variants, mask)| {
            let mut fields = vec![("kind".to_string(), Node::Scalar(kind.to_string()))];
            if mask & 1 != 0 {
                fields.push(("params".into(), Node::Map(params)));
            }
            if mask & 2 != 0 {
                let inputs = inputs
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect();
                fields.push(("inputs".into(), Node::Map(inputs)));
            }
            if mask & 4 != 0 {
                let sweep = sweep.into_iter().map(|(k, v)| (k, Node::Seq(v))).collect();
                fields.push(("sweep".into(), Node::Map(sweep)));
            }
            if mask & 8 != 0 {
                let variants = variants
                    .into_iter()
                    .map(|(k, v)| (k, Node::Map(v)))
                    .collect();
                fields.push(("variants".into(), Node::Map(variants)));
            }
            if mask & 16 != 0 {
                fields.push(("parms".into(), Node::Scalar("{}".into())));
            }
            (format!("s{index}"), Node::Map(fields))
        })
}

/// A pipeline-shaped document.
fn pipeline() -> impl Strategy<Value = Node> {
    (
        proptest::collection::vec(0usize..3, 1..4),
        proptest::option::of(proptest::collection::vec(
            (
                proptest::sample::select(KINDS),
                proptest::collection::vec((key(), scalar().prop_map(Node::Scalar)), 0..4),
            ),
            0..3,
        )),
        proptest::option::of(tree()),
    )
        .prop_flat_map(|(ids, defaults, extra)| {
            let stages: Vec<_> = ids.into_iter().enumerate().map(|(i, _)| stage(i)).collect();
            (stages, Just(defaults), Just(extra))
        })
        .prop_map(|(stages, defaults, extra)| {
            let mut top = vec![("name".to_string(), Node::Scalar("fuzz".into()))];
            if let Some(d) = defaults {
                let d = d
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), Node::Map(v)))
                    .collect();
                top.push(("defaults".into(), Node::Map(d)));
            }
            if let Some(x) = extra {
                top.push(("x-anchors".into(), x));
            }
            top.push(("stages".into(), Node::Map(stages)));
            Node::Map(top)
        })
}

/// A small deterministic generator for the rendering decisions (proptest draws its seed).
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// True with probability `p` percent.
    fn chance(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

struct Render {
    dice: Dice,
    /// 0: plain YAML; 1 to 3: ever more anchors, aliases, merges and tags.
    heat: u64,
    anchors: usize,
    out: String,
}

impl Render {
    /// A decoration in front of a node: an anchor and / or a tag.
    fn props(&mut self) -> String {
        let mut s = String::new();
        if self.dice.chance(6 * self.heat) {
            s.push_str(&format!("&a{} ", self.anchors));
            self.anchors += 1;
        }
        if self.dice.chance(2 * self.heat) {
            s.push_str(TAGS[self.dice.below(TAGS.len())]);
            s.push(' ');
        }
        s
    }

    /// An alias to a defined anchor (mostly) or an undefined one, instead of the node.
    fn alias(&mut self) -> Option<String> {
        if !self.dice.chance(3 * self.heat) {
            return None;
        }
        let n = if self.anchors > 0 && self.dice.chance(90) {
            self.dice.below(self.anchors)
        } else {
            self.anchors + 7
        };
        Some(format!("*a{n}"))
    }

    fn key_text(&mut self, k: &str) -> String {
        if self.dice.chance(2 * self.heat) {
            format!("{k:?}")
        } else if k.is_empty() {
            "''".into()
        } else {
            k.to_string()
        }
    }

    fn flow(&mut self, n: &Node) -> String {
        if let Some(a) = self.alias() {
            return a;
        }
        let props = self.props();
        match n {
            Node::Scalar(s) => format!("{props}{s}"),
            Node::Seq(items) => {
                let parts: Vec<String> = items.iter().map(|i| self.flow(i)).collect();
                format!("{props}[{}]", parts.join(", "))
            }
            Node::Map(entries) => {
                let mut parts: Vec<String> = entries
                    .iter()
                    .map(|(k, v)| {
                        let k = self.key_text(k);
                        format!("{k}: {}", self.flow(v))
                    })
                    .collect();
                if self.anchors > 0 && self.dice.chance(4 * self.heat) {
                    let a = self.dice.below(self.anchors);
                    parts.insert(0, format!("<<: *a{a}"));
                }
                format!("{props}{{{}}}", parts.join(", "))
            }
        }
    }

    fn block(&mut self, n: &Node, indent: usize) {
        let pad = " ".repeat(indent);
        match n {
            Node::Map(entries) if !entries.is_empty() && !self.dice.chance(15) => {
                if self.anchors > 0 && self.dice.chance(3 * self.heat) {
                    let a = self.dice.below(self.anchors);
                    self.out.push_str(&format!("{pad}<<: *a{a}\n"));
                }
                for (k, v) in entries {
                    let k = self.key_text(k);
                    self.out.push_str(&format!("{pad}{k}:"));
                    self.value(v, indent);
                }
            }
            Node::Seq(items) if !items.is_empty() && !self.dice.chance(15) => {
                for item in items {
                    self.out.push_str(&format!("{pad}-"));
                    self.value(item, indent);
                }
            }
            other => {
                let f = self.flow(other);
                self.out.push_str(&format!("{pad}{f}\n"));
            }
        }
    }

    /// The value after `key:` or `-`: inline, or a nested block.
    fn value(&mut self, v: &Node, indent: usize) {
        match v {
            Node::Scalar(_) => {
                let f = self.flow(v);
                self.out.push_str(&format!(" {f}\n"));
            }
            _ if self.dice.chance(40) => {
                let f = self.flow(v);
                self.out.push_str(&format!(" {f}\n"));
            }
            _ => {
                if let Some(a) = self.alias() {
                    self.out.push_str(&format!(" {a}\n"));
                    return;
                }
                let props = self.props();
                self.out.push_str(&format!(" {}\n", props.trim_end()));
                self.block(v, indent + 2);
            }
        }
    }
}

fn render(n: &Node, seed: u64) -> String {
    let mut r = Render {
        dice: Dice(seed),
        heat: seed % 4,
        anchors: 0,
        out: String::new(),
    };
    if r.dice.chance(5) {
        r.out.push_str("%YAML 1.2\n---\n");
    }
    r.block(n, 0);
    if r.dice.chance(3) {
        r.out.push_str("---\nstages: {}\n");
    }
    r.out
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ": ",
    "- ",
    "\n",
    "  ",
    "\t",
    "&a",
    "*a",
    "<<",
    "!!str",
    "'",
    "\"",
    "#",
    "stages",
    "kind",
    "shell",
    "cmd",
    "params",
    "---",
    "...",
    "? ",
    "|",
    ">",
    "%YAML 1.2",
    ",",
    "\\",
    "\u{feff}",
    "\r\n",
    "\0",
    "pretrain",
    "epochs",
    "1e400",
    "&",
    "*",
    "!",
    "@",
    "`",
];

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn grammar_documents_never_panic() {
    let fx = Fixture::new("grammar");
    let reg = registry();
    let stats = RefCell::new(StatCache::in_memory());
    let file = fx.file();
    let (valid, total) = (Cell::new(0u32), Cell::new(0u32));
    let doc = prop_oneof![3 => pipeline(), 1 => tree()];
    runner()
        .run(&(doc, any::<u64>()), |(node, seed)| {
            let text = render(&node, seed);
            total.set(total.get() + 1);
            if check(&text, &file, &reg, &mut stats.borrow_mut())? {
                valid.set(valid.get() + 1);
            } else if std::env::var_os("PIPE_FUZZ_SHOW").is_some()
                && let Err(e) = pipe_engine::spec::parse(&text, &file, &reg, &Overrides::default())
            {
                // what the grammar gets wrong most, to keep it producing valid pipelines
                eprintln!("----\n{text}\n=> {e}");
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (valid, total) = (valid.get(), total.get());
    eprintln!("grammar: {total} documents, {valid} valid pipelines");
    assert!(total >= cases(), "ran {total} cases");
    assert!(valid > 0, "the grammar never produced a valid pipeline");
}

#[test]
fn bytes_and_token_soup_never_panic() {
    let fx = Fixture::new("bytes");
    let reg = registry();
    let stats = RefCell::new(StatCache::in_memory());
    let file = fx.file();
    let text = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        proptest::collection::vec(proptest::sample::select(TOKENS), 0..80).prop_map(|t| t.concat()),
        proptest::collection::vec(proptest::sample::select(TOKENS), 0..40).prop_map(|t| format!(
            "stages:\n  a:\n    kind: shell\n    params: {}\n",
            t.concat()
        )),
    ];
    runner()
        .run(&text, |text| {
            check(&text, &file, &reg, &mut stats.borrow_mut()).map(|_| ())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The shipped pipelines, with their data root pointed at the fixture's `data/`.
fn shipped() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).expect("list pipelines/") {
        let p = e.expect("a pipelines/ entry").path();
        if p.extension().and_then(|x| x.to_str()) != Some("yaml") {
            continue;
        }
        let mut text = std::fs::read_to_string(&p).expect("read a pipeline");
        // `root: "${PIPE_DATA:-...}..."` -> `root: "data"`, the fixture's image folder
        while let Some(i) = text.find("\"${PIPE_DATA") {
            let end = text[i + 1..].find('"').map_or(text.len(), |j| i + j + 2);
            text.replace_range(i..end, "\"data\"");
        }
        text = text.replace("download: true", "download: false");
        out.push((p.display().to_string(), text));
    }
    out.sort();
    assert!(out.len() >= 5, "the shipped pipelines: {out:?}");
    out
}

/// Replacement values: other types, and the numbers no param may hold.
fn replacements() -> Vec<Y> {
    let num = |f: f64| Y::Number(serde_yaml::Number::from(f));
    let text = |s: &str| Y::String(s.to_string());
    vec![
        num(f64::NAN),
        num(f64::INFINITY),
        num(f64::NEG_INFINITY),
        num(1e308),
        num(-1e308),
        num(1.180_591_620_717_411_3e21),
        num(-0.1),
        num(2.0),
        num(0.5),
        Y::Number(serde_yaml::Number::from(0)),
        Y::Number(serde_yaml::Number::from(-1)),
        Y::Number(serde_yaml::Number::from(i64::MIN)),
        Y::Number(serde_yaml::Number::from(u64::MAX)),
        Y::Null,
        Y::Bool(true),
        text(""),
        text("x"),
        text("8/0"),
        text("nan"),
        text("-inf"),
        text("../escape"),
        text("/abs/out"),
        text("a\0b"),
        Y::Sequence(vec![]),
        Y::Sequence(vec![num(1.0), text("y")]),
        Y::Mapping(serde_yaml::Mapping::new()),
        serde_yaml::from_str("{eps: 2, norm: linf}").expect("a mapping"),
        Y::Tagged(Box::new(serde_yaml::value::TaggedValue {
            tag: serde_yaml::value::Tag::new("custom"),
            value: text("v"),
        })),
    ]
}

/// A step on the way to a node of a YAML value.
#[derive(Clone, Debug)]
enum Step {
    Key(Y),
    Index(usize),
}

fn paths(v: &Y, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(prefix.clone());
    match v {
        Y::Mapping(m) => {
            for (k, item) in m {
                prefix.push(Step::Key(k.clone()));
                paths(item, prefix, out);
                prefix.pop();
            }
        }
        Y::Sequence(s) => {
            for (i, item) in s.iter().enumerate() {
                prefix.push(Step::Index(i));
                paths(item, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Y, path: &[Step]) -> Option<&'a mut Y> {
    let mut cur = v;
    for s in path {
        cur = match (s, cur) {
            (Step::Key(k), Y::Mapping(m)) => m.get_mut(k)?,
            (Step::Index(i), Y::Sequence(s)) => s.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// One mutation: `(op, which node, which value)`.
type Mutation = (u8, usize, usize);

fn mutate_value(text: &str, muts: &[Mutation]) -> Option<String> {
    let mut doc: Y = serde_yaml::from_str(text).ok()?;
    let values = replacements();
    for &(op, which, value) in muts {
        let mut all = Vec::new();
        paths(&doc, &mut Vec::new(), &mut all);
        let path = all[which % all.len()].clone();
        match op % 4 {
            // replace the node by another value
            0 => {
                if let Some(n) = at(&mut doc, &path) {
                    *n = values[value % values.len()].clone();
                }
            }
            // delete it from its mapping or sequence
            1 => {
                let Some((last, parent)) = path.split_last() else {
                    continue;
                };
                match (last, at(&mut doc, parent)) {
                    (Step::Key(k), Some(Y::Mapping(m))) => {
                        m.remove(k);
                    }
                    (Step::Index(i), Some(Y::Sequence(s))) if *i < s.len() => {
                        s.remove(*i);
                    }
                    _ => {}
                }
            }
            // rename a key to a param name (an unknown or misplaced param)
            2 => {
                let Some((Step::Key(k), parent)) = path.split_last() else {
                    continue;
                };
                if let Some(Y::Mapping(m)) = at(&mut doc, parent)
                    && let Some(v) = m.remove(k)
                {
                    m.insert(Y::String(PARAMS[value % PARAMS.len()].into()), v);
                }
            }
            // copy the entry into another mapping (a pretrain param on an evaluate stage)
            _ => {
                let Some((Step::Key(k), parent)) = path.split_last() else {
                    continue;
                };
                let Some(v) = at(&mut doc, parent)
                    .and_then(|p| p.as_mapping().and_then(|m| m.get(k)).cloned())
                else {
                    continue;
                };
                let maps: Vec<Vec<Step>> = all
                    .iter()
                    .filter(|p| matches!(at(&mut doc, p), Some(Y::Mapping(_))))
                    .cloned()
                    .collect();
                if let Some(target) = maps.get(value % maps.len().max(1))
                    && let Some(Y::Mapping(m)) = at(&mut doc, target)
                {
                    m.insert(k.clone(), v);
                }
            }
        }
    }
    serde_yaml::to_string(&doc).ok()
}

fn mutate_text(text: &str, muts: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for &(op, which, value) in muts {
        if lines.is_empty() {
            break;
        }
        let i = which % lines.len();
        match op % 5 {
            // a duplicate key (or list item)
            0 => {
                let l = lines[i].clone();
                lines.insert(i, l);
            }
            1 => {
                lines.remove(i);
            }
            // the value after the first `: ` replaced by an odd scalar
            2 => {
                if let Some(j) = lines[i].find(": ") {
                    lines[i].truncate(j + 2);
                    lines[i].push_str(SCALARS[value % SCALARS.len()]);
                }
            }
            // cut the line short (unbalanced brackets, open quotes)
            3 => {
                let l = &mut lines[i];
                let mut cut = value % (l.len() + 1);
                while !l.is_char_boundary(cut) {
                    cut -= 1;
                }
                l.truncate(cut);
            }
            // re-indent (a key moves to another mapping)
            _ => {
                let l = lines[i].trim_start().to_string();
                lines[i] = format!("{}{l}", " ".repeat(value % 9));
            }
        }
    }
    lines.join("\n")
}

#[test]
fn mutated_shipped_pipelines_never_panic() {
    let fx = Fixture::new("mutations");
    let reg = registry();
    let stats = RefCell::new(StatCache::in_memory());
    let file = fx.file();
    let pipelines = shipped();
    // unmutated, every shipped pipeline is valid (so mutations start from a valid document)
    for (name, text) in &pipelines {
        let ok = check(text, &file, &reg, &mut stats.borrow_mut())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(ok, "{name} does not parse against the fixture");
    }
    let (valid, total) = (Cell::new(0u32), Cell::new(0u32));
    let strategy = (
        0..pipelines.len(),
        any::<bool>(),
        proptest::collection::vec((any::<u8>(), any::<usize>(), any::<usize>()), 1..4),
    );
    runner()
        .run(&strategy, |(which, by_value, muts)| {
            let text = &pipelines[which].1;
            let mutated = if by_value {
                mutate_value(text, &muts).unwrap_or_else(|| mutate_text(text, &muts))
            } else {
                mutate_text(text, &muts)
            };
            total.set(total.get() + 1);
            if check(&mutated, &file, &reg, &mut stats.borrow_mut())? {
                valid.set(valid.get() + 1);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (valid, total) = (valid.get(), total.get());
    eprintln!("mutations: {total} documents, {valid} still valid");
    assert!(total >= cases(), "ran {total} cases");
}
