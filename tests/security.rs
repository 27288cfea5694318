//! Untrusted input through the binary (issue 9): hostile YAML (alias bombs, deep nesting),
//! numbers no param may hold, out-of-range and misplaced params, names that look like paths,
//! oversized sweeps, hostile archives, shell commands shown before they run, and diverging
//! training. Every spec problem exits 2 before anything runs, naming file, line, YAML path and
//! what was expected.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{Dir, PIPE, node, statuses};

/// `pipe plan` and `pipe run` both refuse the spec with exit code 2, print nothing on stdout
/// and run nothing; returns stderr.
fn refused(dir: &Dir, name: &str, yaml: &str) -> String {
    let p = dir.pipeline(name, yaml);
    let out = dir.pipe(&["run", &p]).code(2);
    assert!(out.stdout.is_empty(), "stdout: {}", out.stdout);
    assert!(dir.entries().is_empty(), "an entry was committed");
    assert_eq!(dir.read("runs.log"), "", "a stage ran");
    let plan = dir.pipe(&["plan", &p]).code(2);
    assert_eq!(plan.stderr, out.stderr);
    out.stderr
}

/// The error line of `stderr` about `path`, checked to name `file:line:`.
#[track_caller]
fn error_at<'a>(stderr: &'a str, file: &str, line: usize, path: &str) -> &'a str {
    let l = stderr
        .lines()
        .find(|l| l.contains(&format!(": {path}: ")))
        .unwrap_or_else(|| panic!("no error at `{path}` in:\n{stderr}"));
    assert!(
        l.contains(&format!("{file}:{line}:")),
        "`{path}` should be reported at {file}:{line}: {l}"
    );
    l
}

/// `stages:`, [`INNOCENT`], [`DATA`], then `body` (stage lines indented by two).
fn with_data(body: &str) -> String {
    format!("stages:\n{INNOCENT}{DATA}{body}")
}

/// `stages:`, [`INNOCENT`], then `body`.
fn with_innocent(body: &str) -> String {
    format!("stages:\n{INNOCENT}{body}")
}

/// `stages:`, [`DATA`], then `body`.
fn data_only(body: &str) -> String {
    format!("stages:\n{DATA}{body}")
}

/// A stage that appends to `runs.log` if anything runs before validation is complete.
const INNOCENT: &str = "  innocent: {kind: shell, params: {cmd: \"echo ran >> runs.log\"}}\n";

// ---------------------------------------------------------------------------------------------
// Hostile YAML

#[test]
fn a_billion_laughs_document_is_refused_quickly_in_bounded_memory() {
    let dir = Dir::new("laughs");
    // 9 levels of 9 aliases: 9^9 = 387,420,489 leaves once expanded
    let mut yaml = String::from("x-l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..=9 {
        let refs = vec![format!("*l{}", i - 1); 9].join(", ");
        yaml.push_str(&format!("x-l{i}: &l{i} [{refs}]\n"));
    }
    yaml.push_str("stages:\n");
    yaml.push_str(INNOCENT);
    yaml.push_str("  bomb: {kind: shell, params: {cmd: \"true\", laughs: *l9}}\n");
    let p = dir.pipeline("laughs.yaml", &yaml);
    // 1 GiB of address space is far more than the refusal needs and far less than the
    // expansion would
    let t0 = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 1048576; exec \"$0\" \"$@\"")
        .arg(PIPE)
        .arg("--store")
        .arg(&dir.store)
        .args(["plan", &p])
        .current_dir(&dir.root)
        .output()
        .expect("run pipe under ulimit");
    let elapsed = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{:?}: {stderr}", out.status);
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    assert!(
        stderr.contains("laughs.yaml") && stderr.contains("repetition limit exceeded"),
        "{stderr}"
    );
    assert!(stderr.contains("billion laughs"), "{stderr}");
    // and `run` refuses it too, running nothing
    refused(&dir, "laughs.yaml", &yaml);
}

#[test]
fn ten_thousand_nested_brackets_do_not_overflow_the_stack() {
    let dir = Dir::new("deep");
    for (name, open, close) in [("seq.yaml", "[", "]"), ("map.yaml", "{a: ", "}")] {
        let deep = format!("{}{}", open.repeat(10_000), close.repeat(10_000));
        // at the top, and inside a param
        for yaml in [
            format!("stages: {deep}\n"),
            format!(
                "stages:\n{INNOCENT}  s: {{kind: shell, params: {{cmd: \"true\", v: {deep}}}}}\n"
            ),
        ] {
            let err = refused(&dir, name, &yaml);
            assert!(err.contains("recursion limit exceeded"), "{err}");
            assert!(err.contains("nested more than 128 deep"), "{err}");
            let line = if yaml.starts_with("stages: ") { 1 } else { 3 };
            assert!(err.contains(&format!("{name}:{line}:")), "{err}");
        }
    }
}

#[test]
fn endless_binary_or_folder_paths_exit_2_naming_the_file() {
    let dir = Dir::new("files");
    let t0 = Instant::now();
    let out = dir.pipe(&["plan", "/dev/zero"]).code(2);
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(
        out.stderr.trim(),
        "error: /dev/zero: larger than 16 MiB: expected a pipeline file"
    );
    let bin = dir.path("bin.yaml");
    std::fs::write(
        &bin,
        b"stages:\n  a: {kind: shell, params: {cmd: \"\xff\xfe\"}}\n",
    )
    .expect("write");
    let out = dir.pipe(&["run", bin.to_str().expect("utf-8")]).code(2);
    assert!(
        out.stderr
            .contains("bin.yaml: stream did not contain valid UTF-8"),
        "{}",
        out.stderr
    );
    let out = dir
        .pipe(&["plan", dir.root.to_str().expect("utf-8")])
        .code(2);
    assert!(out.stderr.contains("Is a directory"), "{}", out.stderr);
    assert!(dir.entries().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Params

/// A tiny synthetic data set every ML stage below reads.
const DATA: &str =
    "  data: {kind: dataset, params: {source: synthetic, n_classes: 2, n_train: 32, n_test: 8}}\n";

#[test]
fn huge_and_non_finite_numbers_are_refused_naming_the_param() {
    let dir = Dir::new("huge");
    let yaml = with_data(
        r#"  a: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr, epochs: 1e400}}
  b: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr, epochs: 1.2e21}}
  c: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr, lr: .nan}}
  d: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr, eps: -.inf}}
  e: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr, alpha: "nan"}}
  f: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr, n_views: 2, batch_size: 1.8446744073709552e19}}
  g: {kind: pretrain, inputs: {dataset: data}, params: {method: emp_ssl, n_views: 1600000, hidden_dim: 100000000}}
  h: {kind: dataset, params: {source: synthetic, n_train: 100000000000}}
  i: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr, lr: 1e400}}
"#,
    );
    let err = refused(&dir, "huge.yaml", &yaml);
    let f = "huge.yaml";
    // serde_yaml reads 1e400 (beyond f64) as the string "1e400"
    assert!(
        error_at(&err, f, 4, "stages.a.params.epochs")
            .contains("invalid type: string \"1e400\", expected usize")
    );
    assert!(
        error_at(&err, f, 12, "stages.i.params.lr")
            .contains("expected a number or a fraction such as 8/255, got `1e400`")
    );
    assert!(error_at(&err, f, 5, "stages.b.params.epochs").contains("expected usize"));
    assert!(
        error_at(&err, f, 6, "stages.c.params.lr").contains("expected a finite number, got NaN")
    );
    assert!(
        error_at(&err, f, 7, "stages.d.params.eps").contains("expected a finite number, got -inf")
    );
    assert!(
        error_at(&err, f, 8, "stages.e.params.alpha").contains("expected a number or a fraction")
    );
    assert!(error_at(&err, f, 9, "stages.f.params.batch_size").contains("expected usize"));
    assert!(
        error_at(&err, f, 10, "stages.g.params.n_views")
            .contains("expected at most 1024, got 1600000")
    );
    assert!(error_at(&err, f, 10, "stages.g.params.hidden_dim").contains("expected at most 65536"));
    assert!(error_at(&err, f, 11, "stages.h.params.n_train").contains("GiB of pixels"));
    assert!(
        err.starts_with("error: 10 errors in pipeline spec"),
        "{err}"
    );

    // 2^70 written as an integer: serde_yaml refuses the document at that number (one error)
    let wide = with_data(
        "  a: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr, epochs: 1180591620717411303424}}\n",
    );
    let err = refused(&dir, "wide.yaml", &wide);
    let l = error_at(&err, "wide.yaml", 4, "stages.a.params.epochs");
    assert!(
        l.contains("the integer 1180591620717411303424 does not fit in 64 bits"),
        "{l}"
    );
}

#[test]
fn zero_and_negative_sizes_are_refused_naming_the_param() {
    let dir = Dir::new("sizes");
    let yaml = with_data(
        r#"  a: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr, epochs: 0}}
  b: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr, batch_size: -1}}
  c: {kind: pretrain, inputs: {dataset: data}, params: {method: emp_ssl, n_views: 0}}
  d: {kind: finetune, inputs: {encoder: c, dataset: data}, params: {mode: slf, epochs: 0, batch_size: 0}}
  e: {kind: evaluate, inputs: {model: d, dataset: data}, params: {batch_size: 0, attacks: [{eps: 8/255, restarts: 0}]}}
  f: {kind: dataset, params: {source: synthetic, n_classes: 0, image_size: 0}}
"#,
    );
    let err = refused(&dir, "sizes.yaml", &yaml);
    let f = "sizes.yaml";
    assert!(
        error_at(&err, f, 4, "stages.a.params.epochs").contains("expected an integer >= 1, got 0")
    );
    assert!(
        error_at(&err, f, 5, "stages.b.params.batch_size")
            .contains("invalid value: integer `-1`, expected usize")
    );
    assert!(
        error_at(&err, f, 6, "stages.c.params.n_views").contains("expected an integer >= 1, got 0")
    );
    assert!(error_at(&err, f, 7, "stages.d.params.epochs").contains(">= 1, got 0"));
    assert!(error_at(&err, f, 7, "stages.d.params.batch_size").contains(">= 1, got 0"));
    assert!(error_at(&err, f, 8, "stages.e.params.batch_size").contains(">= 1, got 0"));
    assert!(error_at(&err, f, 8, "stages.e.params.attacks[0].restarts").contains(">= 1, got 0"));
    assert!(error_at(&err, f, 9, "stages.f.params.n_classes").contains("expected a value in 2..="));
    assert!(
        error_at(&err, f, 9, "stages.f.params.image_size")
            .contains("expected a value in 8..=512, got 0")
    );
}

#[test]
fn eps_outside_0_1_is_refused_by_every_kind_naming_the_param() {
    let dir = Dir::new("eps");
    let yaml = with_data(
        r#"  pre_hi: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr, attack: pgd, eps: 2}}
  pre_lo: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr, attack: pgd, eps: -0.1, alpha: 3}}
  ft_hi: {kind: finetune, inputs: {encoder: pre_hi, dataset: data}, params: {mode: alf, eps: 2}}
  ft_lo: {kind: finetune, inputs: {encoder: pre_hi, dataset: data}, params: {mode: aff, eps: -0.1}}
  ev: {kind: evaluate, inputs: {model: ft_hi, dataset: data}, params: {attacks: [{eps: 2}, {norm: l2, eps: -0.1}, {eps: 8/255, alpha: 1.5}]}}
  adv_hi: {kind: attack_dataset, inputs: {model: ft_hi, dataset: data}, params: {eps: 2}}
  adv_lo: {kind: attack_dataset, inputs: {model: ft_hi, dataset: data}, params: {norm: l1, eps: -0.1}}
"#,
    );
    let err = refused(&dir, "eps.yaml", &yaml);
    let f = "eps.yaml";
    let within = "expected a value in [0, 1], got";
    assert!(error_at(&err, f, 4, "stages.pre_hi.params.eps").contains(&format!("{within} 2")));
    assert!(error_at(&err, f, 5, "stages.pre_lo.params.eps").contains(&format!("{within} -0.1")));
    assert!(error_at(&err, f, 5, "stages.pre_lo.params.alpha").contains(&format!("{within} 3")));
    assert!(error_at(&err, f, 6, "stages.ft_hi.params.eps").contains(&format!("{within} 2")));
    assert!(error_at(&err, f, 7, "stages.ft_lo.params.eps").contains(&format!("{within} -0.1")));
    assert!(
        error_at(&err, f, 8, "stages.ev.params.attacks[0].eps").contains(&format!("{within} 2"))
    );
    assert!(
        error_at(&err, f, 8, "stages.ev.params.attacks[1].eps")
            .contains("expected a number >= 0, got -0.1")
    );
    assert!(
        error_at(&err, f, 8, "stages.ev.params.attacks[2].alpha")
            .contains(&format!("{within} 1.5"))
    );
    assert!(error_at(&err, f, 9, "stages.adv_hi.params.eps").contains(&format!("{within} 2")));
    assert!(
        error_at(&err, f, 10, "stages.adv_lo.params.eps")
            .contains("expected a number >= 0, got -0.1")
    );
    assert!(
        err.starts_with("error: 10 errors in pipeline spec"),
        "{err}"
    );

    // an l_2 / l_1 radius above 1 is meaningful and accepted
    let ok = data_only(
        r#"  pre: {kind: pretrain, inputs: {dataset: data}, params: {method: simclr}}
  ft: {kind: finetune, inputs: {encoder: pre, dataset: data}, params: {mode: slf}}
  ev: {kind: evaluate, inputs: {model: ft, dataset: data}, params: {attacks: [{norm: l2, eps: 2}, {norm: l1, eps: 12}]}}
"#,
    );
    let p = dir.pipeline("ok.yaml", &ok);
    dir.pipe(&["plan", &p]).code(0);
}

#[test]
fn unknown_kinds_and_params_of_another_kind_are_named() {
    let dir = Dir::new("kinds");
    let yaml = with_data(
        r#"  pre: {kind: pretrian, inputs: {dataset: data}, params: {method: simclr}}
  ev:
    kind: evaluate
    inputs: {model: pre, dataset: data}
    params: {n_views: 4, attacks: [{eps: 8/255}]}
"#,
    );
    let err = refused(&dir, "kinds.yaml", &yaml);
    let kind = error_at(&err, "kinds.yaml", 4, "stages.pre.kind");
    assert!(
        kind.contains("unknown stage kind `pretrian`") && kind.contains("pretrain"),
        "{kind}"
    );
    let param = error_at(&err, "kinds.yaml", 8, "stages.ev.params.n_views");
    assert!(
        param.contains("unknown field `n_views`") && param.contains("`attacks`"),
        "a pretrain param on an evaluate stage names the field and the expected ones: {param}"
    );
}

#[test]
fn oversized_grids_are_refused_before_they_are_expanded() {
    let dir = Dir::new("grids");
    // 10^7 points in one stage: refused at once (it used to take 10 GB and minutes)
    let ten = "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]";
    let yaml = format!(
        "stages:\n{INNOCENT}  s:\n    kind: shell\n    params: {{cmd: \"true\"}}\n    sweep: {{a: {ten}, b: {ten}, c: {ten}, d: {ten}, e: {ten}, f: {ten}, g: {ten}}}\n"
    );
    let t0 = Instant::now();
    let err = refused(&dir, "grid.yaml", &yaml);
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    let l = error_at(&err, "grid.yaml", 6, "stages.s.sweep");
    assert!(
        l.contains("grid has 10000000 points") && l.contains("10000 allowed"),
        "{l}"
    );
    // --sweep counts too
    let p = dir.pipeline(
        "one.yaml",
        "stages:\n  s: {kind: shell, params: {cmd: \"true\"}, sweep: {a: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}}\n",
    );
    let values: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    let out = dir
        .pipe(&["plan", &p, "--sweep", &format!("s.b={}", values.join(","))])
        .code(2);
    assert!(
        out.stderr.contains("grid has 10010 points"),
        "{}",
        out.stderr
    );

    // each stage is small, but fan-out multiplies them: 1 + 300 + 300^2 + 300^3 instances
    let hundred: Vec<String> = (0..300).map(|i| i.to_string()).collect();
    let list = format!("[{}]", hundred.join(", "));
    let chain = with_innocent(
        &r#"  a: {kind: shell, params: {cmd: "true"}, sweep: {x: LIST}}
  b: {kind: shell, inputs: {i: a}, params: {cmd: "true"}, sweep: {y: LIST}}
  c: {kind: shell, inputs: {i: b}, params: {cmd: "true"}, sweep: {z: LIST}}
"#
        .replace("LIST", &list),
    );
    let t0 = Instant::now();
    let err = refused(&dir, "chain.yaml", &chain);
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t0.elapsed()
    );
    let l = error_at(&err, "chain.yaml", 5, "stages.c");
    assert!(
        l.contains("more than 100000 nodes")
            && l.contains("300 grid points")
            && l.contains("90301 instances before it"),
        "{l}"
    );
}

// ---------------------------------------------------------------------------------------------
// Names that look like paths

#[test]
fn names_that_look_like_paths_are_refused() {
    let dir = Dir::new("names");
    let yaml = with_innocent(
        r#"  "../up": {kind: shell, params: {cmd: "true"}}
  "a/b": {kind: shell, params: {cmd: "true"}}
  "/abs": {kind: shell, params: {cmd: "true"}}
  "nul\0id": {kind: shell, params: {cmd: "true"}}
  v:
    kind: shell
    params: {cmd: "true"}
    variants: {"../x": {}, ok: {}}
  i: {kind: shell, inputs: {"../slot": v}, params: {cmd: "true"}}
  o1: {kind: shell, params: {cmd: "true", outputs: [../x]}}
  o2: {kind: shell, params: {cmd: "true", outputs: [/tmp/pipe-abs-out]}}
  o3: {kind: shell, params: {cmd: "true", outputs: ["a\0b"]}}
  o4: {kind: shell, params: {cmd: "true", outputs: [sub/../../x]}}
  p: {kind: shell, params: {cmd: "true", "x=y": 1, z: "nul\0value"}}
  s: {kind: shell, params: {cmd: "true"}, sweep: {tag: [ok, "nul\0"]}}
"#,
    );
    let err = refused(&dir, "names.yaml", &yaml);
    let f = "names.yaml";
    assert!(error_at(&err, f, 3, "stages.../up").contains("invalid stage id `../up`"));
    assert!(error_at(&err, f, 4, "stages.a/b").contains("invalid stage id `a/b`"));
    assert!(error_at(&err, f, 5, "stages./abs").contains("invalid stage id `/abs`"));
    assert!(error_at(&err, f, 6, "stages.nul\\0id").contains("invalid stage id `nul\\0id`"));
    assert!(
        error_at(&err, f, 10, "stages.v.variants.../x").contains("invalid variant name `../x`")
    );
    assert!(error_at(&err, f, 11, "stages.i.inputs.../slot").contains("invalid slot name"));
    for (line, stage) in [(12, "o1"), (13, "o2"), (15, "o4")] {
        let l = error_at(&err, f, line, &format!("stages.{stage}.params.outputs[0]"));
        assert!(
            l.contains("expected a relative path inside $PIPE_OUT without `..`"),
            "{l}"
        );
    }
    assert!(
        error_at(&err, f, 14, "stages.o3.params.outputs[0]").contains("without NUL characters")
    );
    assert!(error_at(&err, f, 16, "stages.p.params.x=y").contains("without `=`"));
    assert!(error_at(&err, f, 16, "stages.p.params.z").contains("without NUL characters"));
    assert!(error_at(&err, f, 17, "stages.s.sweep.tag[1]").contains("without NUL characters"));
}

#[test]
fn values_that_look_like_paths_never_leave_the_staging_folder() {
    let dir = Dir::new("values");
    // sweep values become node ids and variables, never paths; a symlink pointing out of
    // $PIPE_OUT is refused at commit
    let yaml = "\
stages:
  s:
    kind: shell
    params: {cmd: 'printf \"%s\" \"$PIPE_PARAM_tag\" > \"$PIPE_OUT/out\"', outputs: [out]}
    sweep: {tag: [\"../../escape\", \"/tmp/pipe-abs-escape\", \"..\"]}
  link:
    kind: shell
    params: {cmd: 'ln -s /etc/passwd \"$PIPE_OUT/passwd\"'}
";
    let p = dir.pipeline("values.yaml", yaml);
    let before = listing(&dir.root);
    let doc = dir.json(&["run", &p, "--keep-going"], 1);
    let st = statuses(&doc);
    assert_eq!(st["s[tag=../../escape]"], "ran", "{doc:#}");
    assert_eq!(st["s[tag=/tmp/pipe-abs-escape]"], "ran");
    assert_eq!(st["s[tag=..]"], "ran");
    assert_eq!(st["link"], "failed");
    let why = node(&doc, "link")["error"].as_str().expect("an error");
    assert!(
        why.contains("passwd") && why.contains("symbolic links are not allowed"),
        "{why}"
    );
    // three entries, each holding its own value in `out`
    let entries = dir.entries();
    assert_eq!(entries.len(), 3);
    let mut outs: Vec<String> = entries
        .iter()
        .map(|e| std::fs::read_to_string(e.join("out")).expect("out"))
        .collect();
    outs.sort();
    assert_eq!(outs, ["..", "../../escape", "/tmp/pipe-abs-escape"]);
    // nothing appeared outside the store
    let mut after = listing(&dir.root);
    after.retain(|p| !p.starts_with("store"));
    let mut before_no_store = before;
    before_no_store.retain(|p| !p.starts_with("store"));
    assert_eq!(after, before_no_store);
    assert!(!Path::new("/tmp/pipe-abs-escape").exists());
}

/// Every path under `root`, relative, sorted (symlinks not followed).
fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            out.push(
                p.strip_prefix(root)
                    .expect("below root")
                    .display()
                    .to_string(),
            );
            if std::fs::symlink_metadata(&p).expect("lstat").is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------
// Archives

/// A tar entry with any path and type (the `tar` crate's own builders refuse `..` and
/// absolute paths, which is exactly what must be tested).
fn raw_entry(t: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_size(data.len() as u64);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
        h.set_link_name("/etc/passwd").expect("link name");
    }
    h.set_cksum();
    t.append(&h, data).expect("append");
}

#[test]
fn an_archive_with_a_hostile_entry_fails_its_node_and_writes_nothing() {
    use tar::EntryType as T;
    let dir = Dir::new("archive");
    let cases = [
        (
            "train/a/../../../evil.png",
            T::Regular,
            "its path contains `..`",
        ),
        ("/tmp/pipe-evil-abs.png", T::Regular, "its path is absolute"),
        (
            "train/a/link.png",
            T::Symlink,
            "symbolic links are not allowed",
        ),
        ("train/a/hard.png", T::Link, "hard links are not allowed"),
        ("train/a/fifo", T::Fifo, "device files are not allowed"),
        ("train/a/sda", T::Block, "device files are not allowed"),
    ];
    for (i, (evil, kind, reason)) in cases.into_iter().enumerate() {
        let mut t = tar::Builder::new(Vec::new());
        raw_entry(&mut t, "train/a/0.png", T::Regular, b"never decoded");
        raw_entry(&mut t, "test/a/0.png", T::Regular, b"never decoded");
        let data: &[u8] = if kind == T::Regular { b"evil" } else { b"" };
        raw_entry(&mut t, evil, kind, data);
        let archive = format!("evil{i}.tar");
        std::fs::write(dir.path(&archive), t.into_inner().expect("tar")).expect("write");
        let p = dir.pipeline(
            "archive.yaml",
            &format!("stages:\n  data: {{kind: dataset, params: {{source: imagefolder, root: {archive}}}}}\n"),
        );
        let before = listing(&dir.root);
        let out = dir.pipe(&["run", &p]).code(1);
        assert!(
            out.stderr
                .contains(&format!("refusing archive entry `{evil}`"))
                && out.stderr.contains(reason),
            "{evil}: {}",
            out.stderr
        );
        assert!(dir.entries().is_empty(), "{evil}: an entry was committed");
        let mut after = listing(&dir.root);
        after.retain(|p| !p.starts_with("store"));
        let mut expected = before;
        expected.retain(|p| !p.starts_with("store"));
        assert_eq!(
            after, expected,
            "{evil}: something was written next to the archive"
        );
        assert!(!Path::new("/tmp/pipe-evil-abs.png").exists());
        assert!(!dir.root.parent().expect("tmp").join("evil.png").exists());
    }
}

// ---------------------------------------------------------------------------------------------
// Shell commands are shown before they run

#[test]
fn plan_shows_the_command_of_every_shell_node_that_would_run() {
    let dir = Dir::new("plan-cmd");
    let yaml = data_only(
        r#"  fetch:
    kind: shell
    params:
      cmd: |
        echo one > "$PIPE_OUT/a"
        echo two >> "$PIPE_OUT/a"
  use: {kind: shell, inputs: {x: fetch}, params: {cmd: 'cat "$PIPE_IN_x/a" > "$PIPE_OUT/b"'}}
"#,
    );
    let p = dir.pipeline("cmd.yaml", &yaml);
    let out = dir.pipe(&["plan", &p]).code(0);
    let lines: Vec<&str> = out.stdout.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("to-run") && l.contains(" fetch "))
        .unwrap_or_else(|| panic!("no fetch line:\n{}", out.stdout));
    assert_eq!(lines[at + 1], "           $ echo one > \"$PIPE_OUT/a\"");
    assert_eq!(lines[at + 2], "             echo two >> \"$PIPE_OUT/a\"");
    let at = lines
        .iter()
        .position(|l| l.contains(" use "))
        .expect("a use line");
    assert_eq!(
        lines[at + 1],
        "           $ cat \"$PIPE_IN_x/a\" > \"$PIPE_OUT/b\""
    );
    // the dataset node runs no command
    let at = lines
        .iter()
        .position(|l| l.contains(" data "))
        .expect("a data line");
    assert!(lines[at + 1].starts_with("to-run"), "{}", out.stdout);

    let doc = dir.json(&["plan", &p], 0);
    assert_eq!(
        node(&doc, "fetch")["command"],
        "echo one > \"$PIPE_OUT/a\"\necho two >> \"$PIPE_OUT/a\"\n"
    );
    assert_eq!(
        node(&doc, "use")["command"],
        "cat \"$PIPE_IN_x/a\" > \"$PIPE_OUT/b\""
    );
    assert!(node(&doc, "data").get("command").is_none(), "{doc:#}");

    // once cached, the text plan lists the node without its command; JSON still says it
    dir.pipe(&["run", &p, "fetch"]).code(0);
    let out = dir.pipe(&["plan", &p]).code(0);
    assert!(!out.stdout.contains("echo one"), "{}", out.stdout);
    assert!(out.stdout.contains("$ cat"), "{}", out.stdout);
    let doc = dir.json(&["plan", &p], 0);
    assert_eq!(node(&doc, "fetch")["status"], "cached");
    assert!(node(&doc, "fetch")["command"].is_string());
}

// ---------------------------------------------------------------------------------------------
// Divergence

#[test]
fn a_diverging_pretrain_or_finetune_fails_its_node_and_leaves_no_entry() {
    let dir = Dir::new("diverge");
    let pre = "kind: pretrain, inputs: {dataset: data}, params: {method: emp_ssl, n_views: 2, \
               batch_size: 16, epochs: 1, width: 8, hidden_dim: 16, z_dim: 8, lars: false";
    let yaml = data_only(
        &r#"  pre: {PRE}}
  bad_pre: {PRE, lr: 1e30}}
  ft: {kind: finetune, inputs: {encoder: pre, dataset: data}, params: {mode: slf, optimizer: adam, epochs: 5, batch_size: 16, lr: 3e38}}
"#
        .replace("PRE", pre),
    );
    let p = dir.pipeline("diverge.yaml", &yaml);
    let doc = dir.json(&["run", &p, "--keep-going"], 1);
    let st = statuses(&doc);
    assert_eq!(st["data"], "ran", "{doc:#}");
    assert_eq!(st["pre"], "ran");
    assert_eq!(st["bad_pre"], "failed");
    assert_eq!(st["ft"], "failed");
    // EMP-SSL's loss reads normalized embeddings behind BN: it stays finite while the weights
    // blow up, so the weights themselves are checked after every epoch
    let e = node(&doc, "bad_pre")["error"].as_str().expect("an error");
    assert!(
        e.starts_with("epoch 0: the weights are not finite after its last step")
            && e.contains("lr 1e30")
            && e.contains("lower `lr`"),
        "{e}"
    );
    let e = node(&doc, "ft")["error"].as_str().expect("an error");
    assert!(
        e.contains("the loss is") && (e.contains("NaN") || e.contains("inf")),
        "{e}"
    );
    assert!(
        e.contains("lr 3e38"),
        "the error names the learning rate: {e}"
    );
    // entries for data and pre only
    assert_eq!(dir.entries().len(), 2);
    let plan = dir.json(&["plan", &p], 0);
    assert_eq!(node(&plan, "bad_pre")["status"], "to-run");
    assert_eq!(node(&plan, "ft")["status"], "to-run");
}
