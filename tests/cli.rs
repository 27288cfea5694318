//! The CLI surface: `show --json` (metrics, path), `--sweep`/`--set` from the command line,
//! targets, `log`, the shell stage's environment, where the store is, and `devices`.

use std::path::Path;

use crate::util::{Dir, PIPE, expect, key_of, node, statuses};

fn read(path: &str, file: &str) -> String {
    std::fs::read_to_string(Path::new(path).join(file))
        .unwrap_or_else(|e| panic!("{path}/{file}: {e}"))
}

#[test]
fn show_json_has_metrics_and_path() {
    let dir = Dir::new("show");
    let p = dir.pipeline(
        "show.yaml",
        r#"
name: show
stages:
  train:
    kind: shell
    params:
      cmd: |
        printf '{"acc": 0.875, "loss": 1.5, "epochs": 3}' > "$PIPE_OUT/metrics.json"
  plain:
    kind: shell
    params:
      cmd: echo hi > "$PIPE_OUT/x.txt"
"#,
    );
    let before = dir.json(&["show", &p], 0);
    assert_eq!(before["pipeline"], "show");
    assert_eq!(
        statuses(&before),
        expect(&[("plain", "missing"), ("train", "missing")])
    );
    assert!(node(&before, "train")["path"].is_null());
    assert!(node(&before, "train")["metrics"].is_null());

    let run = dir.json(&["run", &p], 0);
    let show = dir.json(&["show", &p], 0);
    let train = node(&show, "train");
    assert_eq!(train["status"], "cached");
    assert_eq!(train["stage"], "train");
    assert_eq!(train["key"], key_of(&run, "train").as_str());
    assert_eq!(
        train["metrics"],
        serde_json::json!({"acc": 0.875, "loss": 1.5, "epochs": 3})
    );
    assert!(
        train["seconds"].as_f64().is_some_and(|s| s >= 0.0),
        "{train:#}"
    );
    let path = train["path"].as_str().expect("path of a cached node");
    assert!(
        Path::new(path).starts_with(dir.store.join("entries")),
        "{path}"
    );
    assert!(path.ends_with(key_of(&run, "train").as_str()), "{path}");
    assert_eq!(
        read(path, "metrics.json"),
        r#"{"acc": 0.875, "loss": 1.5, "epochs": 3}"#
    );
    assert!(Path::new(path).join("manifest.json").is_file());
    let plain = node(&show, "plain");
    assert!(plain["metrics"].is_null(), "no metrics.json: {plain:#}");
    assert_eq!(read(plain["path"].as_str().expect("path"), "x.txt"), "hi\n");

    // one stage selected
    let one = dir.json(&["show", &p, "train"], 0);
    assert_eq!(one["nodes"].as_array().map(Vec::len), Some(1));
    // the human table lists the metrics
    let text = dir.pipe(&["show", &p]).code(0);
    assert!(text.stdout.contains("acc = 0.875"), "{}", text.stdout);
    // an unknown stage is a usage error
    let out = dir.pipe(&["show", &p, "nope"]).code(2);
    assert!(out.stderr.contains("nope"), "{}", out.stderr);
}

const SWEEPABLE: &str = r#"
name: sweepable
stages:
  a:
    kind: shell
    params:
      n: 0
      cmd: echo "a $PIPE_PARAM_n" >> runs.log; echo "$PIPE_PARAM_n" > "$PIPE_OUT/v"
  b:
    kind: shell
    inputs: {up: a}
    params:
      scale: 1
      cmd: echo $(( $(cat "$PIPE_IN_up/v") * PIPE_PARAM_scale )) > "$PIPE_OUT/v"
"#;

#[test]
fn sweep_and_set_from_the_command_line() {
    let dir = Dir::new("cli-sweep");
    let p = dir.pipeline("sweepable.yaml", SWEEPABLE);
    let plan = dir.json(&["plan", &p, "--sweep", "a.n=1,2"], 0);
    assert_eq!(
        statuses(&plan),
        expect(&[
            ("a[n=1]", "to-run"),
            ("a[n=2]", "to-run"),
            ("b[n=1]", "to-run"),
            ("b[n=2]", "to-run")
        ])
    );
    assert!(
        node(&plan, "a[n=1]")["reason"]
            .as_str()
            .is_some_and(|r| r.contains("new")),
        "{plan:#}"
    );
    let doc = dir.json(&["run", &p, "--sweep", "a.n=1,2", "--set", "b.scale=7"], 0);
    assert_eq!(doc["ran"], 4);
    assert_eq!(
        (dir.count("runs.log", "a 1"), dir.count("runs.log", "a 2")),
        (1, 1)
    );
    let show = dir.json(
        &["show", &p, "b", "--sweep", "a.n=1,2", "--set", "b.scale=7"],
        0,
    );
    for n in [1, 2] {
        let b = node(&show, &format!("b[n={n}]"));
        assert_eq!(
            read(b["path"].as_str().expect("committed"), "v"),
            format!("{}\n", 7 * n)
        );
        assert_eq!(
            b["params"]["scale"], 7,
            "--set values are YAML scalars: {b:#}"
        );
    }
    // a sweep value that was in the file's sweep is shared: n=2 is cached
    let doc = dir.json(&["run", &p, "--sweep", "a.n=2,3", "--set", "b.scale=7"], 0);
    assert_eq!(node(&doc, "a[n=2]")["status"], "cached");
    assert_eq!(node(&doc, "a[n=3]")["status"], "ran");
    // --set a.n=2 without a sweep is the same node as the sweep's n=2 variant
    let doc = dir.json(&["run", &p, "--set", "a.n=2", "--set", "b.scale=7"], 0);
    assert_eq!(statuses(&doc), expect(&[("a", "cached"), ("b", "cached")]));
}

#[test]
fn targets_build_only_what_they_need() {
    let dir = Dir::new("targets");
    let p = dir.pipeline("sweepable.yaml", SWEEPABLE);
    let doc = dir.json(&["run", &p, "a"], 0);
    assert_eq!(node(&doc, "a")["status"], "ran");
    assert_ne!(node(&doc, "b")["status"], "ran", "{doc:#}");
    assert_eq!(dir.entries().len(), 1);
    let doc = dir.json(&["run", &p], 0);
    assert_eq!(statuses(&doc), expect(&[("a", "cached"), ("b", "ran")]));
    dir.pipe(&["run", &p, "nosuch"]).code(2);
}

#[test]
fn identical_stages_are_one_node() {
    let dir = Dir::new("dedup");
    let p = dir.pipeline(
        "dedup.yaml",
        r#"
stages:
  first:
    kind: shell
    params: {cmd: "echo same >> runs.log; echo 1 > \"$PIPE_OUT/v\""}
  second:
    kind: shell
    params: {cmd: "echo same >> runs.log; echo 1 > \"$PIPE_OUT/v\""}
  both:
    kind: shell
    inputs: {x: first, y: second}
    params: {cmd: "cat \"$PIPE_IN_x/v\" \"$PIPE_IN_y/v\" > \"$PIPE_OUT/v\""}
"#,
    );
    let doc = dir.json(&["run", &p], 0);
    assert_eq!(doc["ran"], 2, "{doc:#}");
    assert_eq!(dir.count("runs.log", "same"), 1);
    let ids: Vec<&str> = doc["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 2, "{doc:#}");
    let show = dir.json(&["show", &p, "both"], 0);
    assert_eq!(
        read(
            node(&show, "both")["path"].as_str().expect("committed"),
            "v"
        ),
        "1\n1\n"
    );
}

#[test]
fn the_shell_stage_sees_its_environment_and_runs_in_the_pipeline_folder() {
    let dir = Dir::new("env");
    let p = dir.pipeline(
        "sub/env.yaml",
        r#"
stages:
  up:
    kind: shell
    params:
      cmd: echo upstream > "$PIPE_OUT/u.txt"
  probe:
    kind: shell
    inputs: {data: up}
    params:
      lr: 0.25
      name: crop
      flag: true
      list: [1, 2]
      cmd: |
        pwd > "$PIPE_OUT/pwd"
        echo local > written-here.txt
        cat "$PIPE_IN_data/u.txt" > "$PIPE_OUT/in"
        cp "$PIPE_PARAMS" "$PIPE_OUT/params.json"
        echo "$PIPE_NODE $PIPE_KEY" > "$PIPE_OUT/ids"
        echo "$PIPE_PARAM_lr|$PIPE_PARAM_name|$PIPE_PARAM_flag|${PIPE_PARAM_list-unset}" > "$PIPE_OUT/scalars"
        echo "to the log"
        echo "to stderr" >&2
"#,
    );
    let run = dir.json(&["run", &p], 0);
    let show = dir.json(&["show", &p, "probe"], 0);
    let path = node(&show, "probe")["path"]
        .as_str()
        .expect("committed")
        .to_string();
    let sub = dir.path("sub").canonicalize().expect("sub/");
    assert_eq!(
        Path::new(read(&path, "pwd").trim())
            .canonicalize()
            .expect("pwd"),
        sub
    );
    assert_eq!(dir.read("sub/written-here.txt"), "local\n");
    assert_eq!(read(&path, "in"), "upstream\n");
    let params: serde_json::Value =
        serde_json::from_str(&read(&path, "params.json")).expect("PIPE_PARAMS is JSON");
    assert_eq!(params["lr"], 0.25);
    assert_eq!(params["name"], "crop");
    assert_eq!(params["flag"], true);
    assert_eq!(params["list"], serde_json::json!([1, 2]));
    assert!(
        params["cmd"]
            .as_str()
            .is_some_and(|c| c.contains("PIPE_PARAMS"))
    );
    assert_eq!(
        read(&path, "ids"),
        format!("probe {}\n", key_of(&run, "probe"))
    );
    assert_eq!(read(&path, "scalars"), "0.25|crop|true|unset\n");
    let log = dir.pipe(&["log", &p, "probe"]).code(0);
    assert!(log.stdout.contains("to the log"), "{}", log.stdout);
    assert!(log.stdout.contains("to stderr"), "{}", log.stdout);
}

#[test]
fn the_store_comes_from_pipe_store_when_no_flag_is_given() {
    let dir = Dir::new("env-store");
    let p = dir.pipeline("sweepable.yaml", SWEEPABLE);
    let elsewhere = dir.path("elsewhere");
    let out = std::process::Command::new(PIPE)
        .args(["run", &p, "--json"])
        .current_dir(&dir.root)
        .env("PIPE_STORE", &elsewhere)
        .output()
        .expect("run pipe");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(elsewhere.join("entries").is_dir());
    assert!(!dir.store.exists(), "--store's default dir was used");
    assert!(!dir.path(".pipe").exists(), "the default store was used");
}

/// `--store` given as a relative path while the pipeline file lives in another folder: the
/// shell command runs in the pipeline's folder, so `$PIPE_OUT` etc. must be absolute.
#[test]
fn a_relative_store_path_works_with_a_pipeline_in_another_folder() {
    let dir = Dir::new("relative-store");
    dir.pipeline(
        "pipelines/rel.yaml",
        r#"
stages:
  a:
    kind: shell
    params:
      cmd: echo 41 > "$PIPE_OUT/v"
  b:
    kind: shell
    inputs: {up: a}
    params:
      cmd: echo $(( $(cat "$PIPE_IN_up/v") + 1 )) > "$PIPE_OUT/v"
"#,
    );
    let args = [
        "--store",
        "rel-store",
        "run",
        "pipelines/rel.yaml",
        "--json",
    ];
    let out = std::process::Command::new(PIPE)
        .args(args)
        .current_dir(&dir.root)
        .env_remove("PIPE_STORE")
        .output()
        .expect("run pipe");
    let out = crate::util::Output::from_process(&args, out).code(0);
    assert_eq!(statuses(&out.json()), expect(&[("a", "ran"), ("b", "ran")]));
    assert!(dir.path("rel-store/entries").is_dir());
}

#[test]
fn plan_text_says_what_and_why() {
    let dir = Dir::new("plan-text");
    let p = dir.pipeline("sweepable.yaml", SWEEPABLE);
    let out = dir.pipe(&["plan", &p]).code(0);
    assert!(out.stdout.contains("2 to run, 0 cached"), "{}", out.stdout);
    assert!(out.stdout.contains("new node"), "{}", out.stdout);
    dir.json(&["run", &p], 0);
    let out = dir.pipe(&["plan", &p, "--set", "a.n=5"]).code(0);
    assert!(out.stdout.contains("n: 0 -> 5"), "{}", out.stdout);
    assert!(out.stdout.contains("2 to run, 0 cached"), "{}", out.stdout);
    let out = dir.pipe(&["run", &p]).code(0);
    assert!(out.stderr.contains("0 ran, 2 cached"), "{}", out.stderr);
}

#[test]
fn every_shipped_pipeline_plans_cleanly() {
    let dir = crate::util::Dir::new("shipped");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut n = 0;
    for e in std::fs::read_dir(&root).expect("pipelines/") {
        let path = e.expect("entry").path();
        if path.extension().is_some_and(|x| x == "yaml") {
            let p = path.to_str().expect("utf-8 path");
            let doc = dir.json(&["plan", p], 0);
            assert!(!doc["nodes"].as_array().expect("nodes").is_empty(), "{p}");
            n += 1;
        }
    }
    assert!(n >= 3, "found {n} pipelines");
}

/// `pipe devices` on the CPU-only build (the default): the CPU, no CUDA device and the reason,
/// `auto` resolving to the CPU; and no store is created or needed.
#[test]
fn devices_lists_the_cpu_and_why_there_is_no_cuda() {
    let dir = Dir::new("devices");
    let j = dir.json(&["devices"], 0);
    assert_eq!(j["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(j["cuda_built"], cfg!(feature = "cuda"));
    assert!(j["cpu_threads"].as_u64().is_some_and(|n| n >= 1), "{j}");
    assert!(j["cpu_logical"].as_u64().is_some_and(|n| n >= 1), "{j}");
    assert_eq!(j["cuda_math"], "fp32");
    let text = dir.pipe(&["devices"]).code(0).stdout;
    assert!(text.contains("\ncpu "), "{text}");
    if !cfg!(feature = "cuda") {
        assert_eq!(j["auto"], "cpu");
        assert_eq!(j["cuda_devices"], serde_json::json!([]));
        assert!(j["cuda_kernels_for"].is_null());
        let why = j["cuda_unavailable"].as_str().unwrap_or_default();
        assert!(why.contains("without the `cuda` feature"), "{j}");
        assert!(text.contains("built without CUDA"), "{text}");
        assert!(
            text.contains("cuda     none usable: this pipe was built without"),
            "{text}"
        );
        assert!(text.ends_with("auto     cpu\n"), "{text}");
    }
    assert!(!dir.store.exists(), "`pipe devices` touched the store");
}

/// A pipeline `name`: synthetic data (32 training images) and one SimCLR pretraining of a
/// width-8 ResNet per `(id, more params)` (`", epochs: 2"`; one epoch unless they say).
fn tiny_pretrain(name: &str, nodes: &[(&str, &str)]) -> String {
    let mut yaml = format!(
        "name: {name}\nstages:\n  data:\n    kind: dataset\n    params: {{source: synthetic, \
         n_classes: 4, n_train: 32, n_test: 8, seed: 1}}\n"
    );
    for (id, more) in nodes {
        let epochs = if more.contains("epochs:") {
            ""
        } else {
            ", epochs: 1"
        };
        yaml += &format!(
            "  {id}:\n    kind: pretrain\n    inputs: {{dataset: data}}\n    params: {{method: \
             simclr, attack: none, views: crop, batch_size: 16, width: 8, hidden_dim: 32\
             {epochs}{more}}}\n"
        );
    }
    yaml
}

/// `PIPE_KERNELS=candle` (candle's conv and batch norm, to compare with) is keyed: a comparison
/// run gets training nodes of its own instead of the default kernels' cached ones, while the
/// data node (no kernels) and the keys under unset / `fast` stay; a misspelt value, which
/// would compute and key as `fast`, is refused.
#[test]
fn pipe_kernels_candle_is_keyed_and_a_bad_value_refused() {
    let dir = Dir::new("kernels");
    let p = dir.pipeline("p.yaml", &tiny_pretrain("p", &[("pre", "")]));
    let keys = |v: Option<&str>| {
        let plan = dir
            .pipe_env(&["plan", &p, "--json"], &[("PIPE_KERNELS", v)])
            .code(0)
            .json();
        (key_of(&plan, "data"), key_of(&plan, "pre"))
    };
    let unset = keys(None);
    assert_eq!(keys(Some("fast")), unset);
    let candle = keys(Some("candle"));
    assert_eq!(
        candle.0, unset.0,
        "the data node computes nothing with kernels"
    );
    assert_ne!(candle.1, unset.1, "a candle-kernel run is another node");
    let bad = dir
        .pipe_env(&["plan", &p], &[("PIPE_KERNELS", Some("candel"))])
        .code(2);
    assert!(
        bad.stderr.contains("PIPE_KERNELS") && bad.stderr.contains("candel"),
        "{}",
        bad.stderr
    );
}

/// `pipe gc` keys the pipeline in its own environment, where `device: auto` (or
/// `PIPE_CUDA_MATH`, `PIPE_KERNELS`, a `${VAR}` root) may give other keys than the run had: a
/// Slurm login node without the run's `PIPE_AUTO_DEVICE=cuda`, the CPU build on a GPU store.
/// Here the run was on the CPU and gc believes `auto` is CUDA: it keeps the run's entries (the
/// file's last run record) and says why; after an edit and a rerun the old entry goes.
#[test]
fn gc_keeps_what_the_last_run_made_whatever_the_environment_keys() {
    let dir = Dir::new("gc-env");
    let p = dir.pipeline("p.yaml", &tiny_pretrain("p", &[("pre", "")]));
    let run = dir.json(&["run", &p], 0);
    assert_eq!(run["ran"], 2, "{run:#}");
    let before = dir.entry_keys();
    let cuda = [("PIPE_AUTO_DEVICE", Some("cuda"))];
    let plan = dir.pipe_env(&["plan", &p, "--json"], &cuda).code(0).json();
    assert_eq!(
        statuses(&plan)["pre"],
        "to-run",
        "the premise: another key here"
    );
    let dry = dir.pipe_env(&["gc", &p, "--dry-run"], &cuda).code(0);
    assert!(
        dry.stdout.contains("would remove 0 entries"),
        "{}",
        dry.stdout
    );
    assert!(
        dry.stdout.contains("kept 1 entries that the last run of"),
        "{}",
        dry.stdout
    );
    let gc = dir.pipe_env(&["gc", &p], &cuda).code(0);
    assert!(gc.stdout.contains("removed 0 entries"), "{}", gc.stdout);
    assert_eq!(dir.entry_keys(), before);
    // an edit and a run: the file's nodes now have their new keys, and gc removes the old one
    let p = dir.pipeline("p.yaml", &tiny_pretrain("p", &[("pre", ", seed: 7")]));
    assert_eq!(dir.json(&["run", &p], 0)["ran"], 1);
    let gc = dir.pipe(&["gc", &p]).code(0);
    assert!(gc.stdout.contains("removed 1 entries"), "{}", gc.stdout);
    assert!(!gc.stdout.contains("the last run of"), "{}", gc.stdout);
    assert_eq!(dir.entry_keys().len(), 2);
}

/// `PIPE_AUTO_DEVICE` fixes what `device: auto` means: it changes the key of a training node
/// (the backend is keyed) and not of the data; `cuda` on a machine that cannot compute on CUDA
/// fails the node instead of computing CPU numbers under a CUDA key; a bad value is refused.
#[test]
fn pipe_auto_device_fixes_what_auto_means_in_keys_and_at_run_time() {
    let dir = Dir::new("auto-device");
    let p = dir.pipeline("auto.yaml", &tiny_pretrain("auto", &[("pretrain", "")]));
    let plan = |auto: Option<&str>| {
        dir.pipe_env(&["plan", &p, "--json"], &[("PIPE_AUTO_DEVICE", auto)])
            .code(0)
            .json()
    };
    let (cpu, cuda) = (plan(Some("cpu")), plan(Some("cuda")));
    assert_eq!(node(&cpu, "data")["key"], node(&cuda, "data")["key"]);
    assert_ne!(
        node(&cpu, "pretrain")["key"],
        node(&cuda, "pretrain")["key"]
    );
    if !cfg!(feature = "cuda") {
        let unset = plan(None);
        assert_eq!(
            node(&unset, "pretrain")["key"],
            node(&cpu, "pretrain")["key"]
        );
        let run = crate::util::Output::from_process(
            &["run"],
            dir.command(&["run", &p, "--json"])
                .env("PIPE_AUTO_DEVICE", "cuda")
                .output()
                .expect("pipe run"),
        )
        .code(1);
        let err = node(&run.json(), "pretrain")["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            err.contains("device auto is cuda:0 here (PIPE_AUTO_DEVICE=cuda)"),
            "{err}"
        );
    }
    let bad = dir
        .pipe_env(&["devices"], &[("PIPE_AUTO_DEVICE", Some("gpu"))])
        .code(2);
    assert!(
        bad.stderr
            .contains("PIPE_AUTO_DEVICE: expected `cpu` or `cuda`, got `gpu`"),
        "{}",
        bad.stderr
    );
}

/// `PIPE_CUDA_MATH=tf32` moves the key of a node that computes on CUDA (TF32 numbers are not
/// fp32 numbers) and of no CPU node; `fp32` is the default and keys as before; a bad value, or
/// `tf32` with `NVIDIA_TF32_OVERRIDE=0` (which would turn TF32 off unseen), is refused.
#[test]
fn pipe_cuda_math_is_keyed_on_cuda_nodes_only() {
    let dir = Dir::new("cuda-math");
    let yaml = tiny_pretrain("math", &[("gpu", ""), ("cpu", ", device: cpu")]);
    let p = dir.pipeline("math.yaml", &yaml);
    let plan = |math: Option<&str>| {
        // `auto` keys as CUDA whatever this machine has
        let env = [
            ("PIPE_AUTO_DEVICE", Some("cuda")),
            ("NVIDIA_TF32_OVERRIDE", None),
            ("PIPE_CUDA_MATH", math),
        ];
        dir.pipe_env(&["plan", &p, "--json"], &env).code(0).json()
    };
    let (unset, fp32, tf32) = (plan(None), plan(Some("fp32")), plan(Some("tf32")));
    for id in ["data", "gpu", "cpu"] {
        assert_eq!(node(&unset, id)["key"], node(&fp32, id)["key"], "{id}");
    }
    assert_eq!(node(&fp32, "cpu")["key"], node(&tf32, "cpu")["key"]);
    assert_ne!(node(&fp32, "gpu")["key"], node(&tf32, "gpu")["key"]);
    // what pipe's own CUDA libraries read: fp32 pins NVIDIA_TF32_OVERRIDE=0 (cuDNN computes
    // f32 convolutions in TF32 by default), tf32 leaves it as it was
    for (math, over, want) in [
        ("fp32", None, serde_json::json!("0")),
        ("fp32", Some("1"), serde_json::json!("0")),
        ("tf32", None, serde_json::Value::Null),
        ("tf32", Some("1"), serde_json::json!("1")),
    ] {
        let env = [
            ("PIPE_CUDA_MATH", Some(math)),
            ("NVIDIA_TF32_OVERRIDE", over),
        ];
        let devices = dir.pipe_env(&["devices", "--json"], &env).code(0).json();
        assert_eq!(devices["cuda_math"], math);
        assert_eq!(devices["nvidia_tf32_override"], want, "{math} {over:?}");
    }
    // a shell stage's command gets the environment pipe was started with, not the
    // NVIDIA_TF32_OVERRIDE=0 that fp32 sets for pipe's own CUDA libraries
    let env = dir.pipeline(
        "env.yaml",
        r#"
name: env
stages:
  env:
    kind: shell
    params:
      cmd: printf %s "${NVIDIA_TF32_OVERRIDE-unset}" > "$PIPE_OUT/v.txt"
      outputs: [v.txt]
"#,
    );
    for (math, over, want) in [
        (None, None, "unset"),
        (Some("fp32"), Some("1"), "1"),
        (Some("tf32"), None, "unset"),
        (Some("fp32"), Some("0"), "0"),
    ] {
        // the node's key does not depend on the setting: a fresh store for each run
        let _ = std::fs::remove_dir_all(&dir.store);
        let vars = [("NVIDIA_TF32_OVERRIDE", over), ("PIPE_CUDA_MATH", math)];
        dir.pipe_env(&["run", &env], &vars).code(0);
        let v = crate::caching::entry_file(&dir, &env, "env", "v.txt");
        assert_eq!(v, want, "{math:?} {over:?}");
    }
    for (env, want) in [
        (
            [("PIPE_CUDA_MATH", "bf16"), ("NVIDIA_TF32_OVERRIDE", "")],
            "PIPE_CUDA_MATH: expected `fp32` or `tf32`, got `bf16`",
        ),
        (
            [("PIPE_CUDA_MATH", "tf32"), ("NVIDIA_TF32_OVERRIDE", "0")],
            "PIPE_CUDA_MATH=tf32, but NVIDIA_TF32_OVERRIDE=0 turns TF32 off",
        ),
    ] {
        let bad = dir
            .pipe_env(&["plan", &p], &env.map(|(k, v)| (k, Some(v))))
            .code(2);
        assert!(bad.stderr.contains(want), "{}", bad.stderr);
    }
}

/// Without a terminal (or with `--no-progress`) a run prints each node's progress as plain
/// lines, at most one per 30 s but always its first and last report: a four-step pretraining
/// gives two lines, the last at 4/4 with the rate.
#[test]
fn plain_output_reports_progress_first_and_last_and_throttles_between() {
    let dir = Dir::new("progress-lines");
    let yaml = tiny_pretrain("lines", &[("pretrain", ", epochs: 2, device: cpu")]);
    let p = dir.pipeline("lines.yaml", &yaml);
    let out = dir.pipe(&["run", &p, "--no-progress"]).code(0);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("  ...     pretrain: "))
        .collect();
    assert_eq!(lines.len(), 2, "{}", out.stderr);
    assert!(
        lines[0].starts_with("  ...     pretrain: 1/4 epoch 1/2 loss "),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("  ...     pretrain: 4/4 epoch 2/2 loss ")
            && lines[1].ends_with(" img/s"),
        "{lines:?}"
    );
}

/// `pipe bench nn` times the whole network and one layer's convolution and batch norm (where a
/// step's time goes), names what it ran on, and refuses a device this build cannot open.
#[test]
fn bench_nn_times_the_net_and_one_layer() {
    let dir = Dir::new("bench-nn");
    let j = dir.json(
        &[
            "bench", "nn", "--widths", "2", "--batch", "2", "--reps", "1",
        ],
        0,
    );
    assert_eq!(
        (&j["device"], &j["kernels"]),
        (&"cpu".into(), &"fast".into())
    );
    let row = &j["rows"][0];
    for k in [
        "forward_ms",
        "train_step_ms",
        "pgd_step_ms",
        "conv3x3_forward_ms",
        "conv3x3_train_ms",
        "bn_relu_train_ms",
    ] {
        assert!(row[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {row}");
    }
    if !cfg!(feature = "cuda") {
        let out = dir
            .pipe(&[
                "bench", "nn", "--widths", "2", "--batch", "2", "--device", "cuda:0",
            ])
            .code(2);
        assert!(
            out.stderr.contains("without the `cuda` feature"),
            "{}",
            out.stderr
        );
    }
}

/// `pipe bench pretrain` times the ACL family (no free-adversarial variant) and AdvCL (PGD
/// only) too, and refuses a method it does not know.
#[test]
fn bench_pretrain_covers_the_acl_family() {
    let dir = Dir::new("bench-acl");
    let j = dir.json(
        &[
            "bench",
            "pretrain",
            "--methods",
            "acl,air,advcl",
            "--widths",
            "2",
            "--batch",
            "4",
            "--steps",
            "1",
        ],
        0,
    );
    // the settings the numbers depend on are in the report
    assert_eq!(
        (&j["kernels"], &j["cuda_math"]),
        (&"fast".into(), &"fp32".into())
    );
    let rows: Vec<(String, String, u64)> = j["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            assert!(
                r["images_per_second"].as_f64().is_some_and(|v| v > 0.0),
                "{r}"
            );
            (
                r["method"].as_str().unwrap_or_default().to_string(),
                r["attack"].as_str().unwrap_or_default().to_string(),
                r["n_views"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    let want: Vec<(String, String, u64)> = [
        ("acl", "none"),
        ("acl", "pgd"),
        ("air", "none"),
        ("air", "pgd"),
        ("advcl", "pgd"),
    ]
    .iter()
    .map(|(m, a)| (m.to_string(), a.to_string(), 2))
    .collect();
    assert_eq!(rows, want);
    let out = dir
        .pipe(&["bench", "pretrain", "--methods", "byol"])
        .code(2);
    assert!(
        out.stderr.contains("unknown method \"byol\""),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

/// Node keys do not move when the code grows: the keys of `pipelines/cf_amc_ssl_cpu.yaml` as
/// the version before the ACL family (7d3e598) computed them, checked against a store it wrote
/// (every node `cached`). Adding a method or a quirk switch must not change them: a changed key
/// silently recomputes every cached result of every user. Change a pinned value only together
/// with a deliberate key change (a kind's version or `KEY_SCHEMA`). Moved deliberately since:
/// `robust_emp` (its params became R-CF's: zero-init PGD, clean epochs around the adversarial
/// ones, \[Q13\]), `faithful_emp` and `table` (`evaluate` version 2: R-AA's APGD step rule),
/// `table` again (`report` version 2: map and list params in default labels).
#[test]
fn keys_of_the_cf_amc_ssl_pipeline_are_pinned() {
    let dir = Dir::new("pinned-keys");
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/cf_amc_ssl_cpu.yaml");
    let out = dir
        .command(&["plan", file.to_str().expect("utf-8"), "--json"])
        .env_remove("PIPE_DATA")
        .env_remove("PIPE_AUTO_DEVICE")
        .output()
        .expect("start pipe");
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let key = |id: &str| -> String {
        plan["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["id"] == id))
            .and_then(|n| n["key"].as_str())
            .unwrap_or_else(|| panic!("no node {id}"))
            .to_string()
    };
    for (id, pinned) in [
        (
            "data",
            "3d0ed51bb8d9fb0422944073909a1e13df995a8c3f65bae151496375abbb7807",
        ),
        (
            "pretrain_emp[patch_emp_pgd]",
            "58a9032d017eb00d11520c954f2701accb684fbf8c1e4b3dfc522c55d216f3c4",
        ),
        (
            "pretrain_emp[cf_amc_ssl]",
            "eb37a4d06b1283ef5a02e2b714c025528acb4bcd32f6d8d5dfbb0b53aac4fbfe",
        ),
        (
            "pretrain_simclr[crop_simclr_pgd]",
            "0b8997f8ff12c0ca44bac36d7636535f8f7e1911169462ebfd2643ae1e5a7809",
        ),
        (
            "pretrain_simclr[crop_simclr_free]",
            "42fedf2b4c481d469cbf17abc1947b6198b1137aec10046a2f99c3cfd16b6cfb",
        ),
        (
            "robust_emp[cf_amc_ssl]",
            "4506ff5fa6e92e409d2071061fc77ba91e4bd32c064891bd553498bfaa3963a5",
        ),
        (
            "faithful_emp[cf_amc_ssl]",
            "c385c592621327ff654fc79d582c0d16e0a414035d4756bfaad874de8acc4b9f",
        ),
        (
            "table",
            "d90db44ed3d09e080acc369004a183be159a5be610c5bb61b94ae0dc03f68c22",
        ),
    ] {
        assert_eq!(key(id), pinned, "the key of {id} moved");
    }
}

#[test]
fn plan_says_what_an_interrupted_node_resumes_from() {
    let dir = Dir::new("cli-resume-point");
    let p = dir.pipeline(
        "p.yaml",
        "stages:\n  a:\n    kind: shell\n    params: {cmd: 'true'}\n",
    );
    let plan = dir.json(&["plan", &p], 0);
    assert!(node(&plan, "a")["resumes"].is_null(), "{plan:#}");
    // what an interrupted evaluation leaves: journaled batches, then a training state too
    let key = node(&plan, "a")["key"].as_str().expect("key").to_string();
    let scratch = dir.store.join("scratch").join(&key);
    for (part, batch) in [("eval", 0), ("eval", 1), ("defense-0", 0)] {
        let f = scratch.join(format!("journal/{part}/{batch:07}.safetensors"));
        std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
        std::fs::write(&f, b"x").expect("write");
    }
    // an unfinished write is not a batch
    std::fs::write(
        scratch.join("journal/eval/.0000002.safetensors.tmp.1.0"),
        b"x",
    )
    .expect("tmp");
    let plan = dir.json(&["plan", &p], 0);
    assert_eq!(
        node(&plan, "a")["resumes"],
        "3 finished batches in its journal"
    );
    std::fs::write(scratch.join("state.safetensors"), b"x").expect("state");
    let text = dir.pipe(&["plan", &p]).code(0).stdout;
    assert!(
        text.contains(
            "resumes from its saved training state and 3 finished batches in its journal"
        ),
        "{text}"
    );
}
