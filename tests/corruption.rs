//! Damaged entries: `pipe verify` names the entry and the file; `pipe run` re-hashes the entries
//! it will read, moves a damaged one aside into `store/corrupt/` and recomputes it in the same
//! run (so a stage never sees bad bytes), or with `--no-recompute` fails with exit code 2
//! naming entry and file, running nothing.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::util::{Dir, assert_store_sound, expect, key_of, node, snapshot, statuses};

/// up writes 200 kB of text and a number; mid copies up's data and adds `n`; down copies mid's
/// data and multiplies by `n`. Each appends its name to `runs.log`.
const CHAIN: &str = r#"
name: chain
stages:
  up:
    kind: shell
    params:
      cmd: |
        echo up >> runs.log
        yes "payload line" | head -c 200000 > "$PIPE_OUT/data.bin"
        echo 42 > "$PIPE_OUT/v.txt"
      outputs: [data.bin, v.txt]
  mid:
    kind: shell
    inputs: {u: up}
    params:
      n: 1
      cmd: |
        echo mid >> runs.log
        cp "$PIPE_IN_u/data.bin" "$PIPE_OUT/seen.bin"
        echo $(( $(cat "$PIPE_IN_u/v.txt") + $PIPE_PARAM_n )) > "$PIPE_OUT/v.txt"
      outputs: [seen.bin, v.txt]
  down:
    kind: shell
    inputs: {m: mid}
    params:
      n: 1
      cmd: |
        echo down >> runs.log
        cp "$PIPE_IN_m/seen.bin" "$PIPE_OUT/seen.bin"
        echo $(( $(cat "$PIPE_IN_m/v.txt") * $PIPE_PARAM_n )) > "$PIPE_OUT/v.txt"
      outputs: [seen.bin, v.txt]
"#;

/// What up writes into data.bin.
fn payload() -> Vec<u8> {
    b"payload line\n"
        .iter()
        .copied()
        .cycle()
        .take(200_000)
        .collect()
}

/// Runs the chain once (all three nodes run) and returns the pipeline path and the JSON.
fn first_run(dir: &Dir) -> (String, serde_json::Value) {
    let p = dir.pipeline("chain.yaml", CHAIN);
    let doc = dir.json(&["run", &p], 0);
    assert_eq!(doc["ran"], 3);
    (p, doc)
}

fn entry_dir(dir: &Dir, key: &str) -> PathBuf {
    dir.store.join("entries").join(&key[..2]).join(key)
}

/// Flips one byte of `file` in place, keeping its size and its mtime (so only a content hash,
/// not a stat check, can tell).
fn flip_byte(file: &Path, offset: u64) {
    let meta = std::fs::metadata(file).expect("stat the file");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(file)
        .expect("open for writing");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read a byte");
    b[0] ^= 0x20;
    f.write_all_at(&b, offset).expect("write it back");
    f.set_modified(meta.modified().expect("mtime"))
        .expect("restore the mtime");
    drop(f);
    let after = std::fs::metadata(file).expect("stat again");
    assert_eq!(after.len(), meta.len());
    assert_eq!(after.modified().ok(), meta.modified().ok());
}

/// Contents of `file` in the committed entry of node `id` (of the pipeline with `--set`s).
fn output(dir: &Dir, p: &str, sets: &[&str], id: &str, file: &str) -> Vec<u8> {
    let mut args = vec!["show", p, id];
    for s in sets {
        args.extend(["--set", s]);
    }
    let show = dir.json(&args, 0);
    let path = node(&show, id)["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{id} is not committed: {show:#}"))
        .to_string();
    std::fs::read(Path::new(&path).join(file)).unwrap_or_else(|e| panic!("{id}/{file}: {e}"))
}

/// Names in `store/corrupt/`, sorted.
fn quarantined(dir: &Dir) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.store.join("corrupt"))
        .map(|rd| {
            rd.flatten()
                .map(|e| crate::util::file_name(&e.path()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn verify_names_the_entry_and_the_file_of_a_flipped_byte() {
    let dir = Dir::new("verify-flip");
    let (_, doc) = first_run(&dir);
    let up = key_of(&doc, "up");
    assert_store_sound(&dir, "before the damage");
    flip_byte(&entry_dir(&dir, &up).join("data.bin"), 1234);

    let out = dir.pipe(&["verify"]).code(1);
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("entry "))
        .collect();
    assert_eq!(lines.len(), 1, "{}", out.stdout);
    assert!(lines[0].contains(&up), "{}", lines[0]);
    assert!(lines[0].contains("file data.bin"), "{}", lines[0]);
    assert!(
        out.stdout.contains("3 entries checked, 1 problem"),
        "{}",
        out.stdout
    );
    let doc = dir.pipe(&["verify", "--json"]).code(1).json();
    let problems = doc["problems"].as_array().expect("problems");
    assert_eq!(problems.len(), 1, "{doc:#}");
    assert_eq!(problems[0]["key"], up.as_str());
    assert_eq!(problems[0]["file"], "data.bin");
}

#[test]
fn run_moves_a_corrupt_input_aside_recomputes_it_and_the_stage_sees_the_right_bytes() {
    let dir = Dir::new("recompute");
    let (p, doc) = first_run(&dir);
    let up = key_of(&doc, "up");
    let data = entry_dir(&dir, &up).join("data.bin");
    flip_byte(&data, 5000);
    let damaged = std::fs::read(&data).expect("read the damaged file");
    assert_ne!(damaged, payload());

    // mid changes, so it reads up
    let out = dir.pipe(&["run", &p, "--set", "mid.n=2", "--json"]).code(0);
    let doc = out.json();
    assert_eq!(
        statuses(&doc),
        expect(&[("up", "ran"), ("mid", "ran"), ("down", "ran")])
    );
    assert_eq!(key_of(&doc, "up"), up, "same node, recomputed");
    let warning = out
        .stderr
        .lines()
        .find(|l| l.contains("is corrupt"))
        .unwrap_or_else(|| panic!("no warning:\n{}", out.stderr));
    assert!(
        warning.contains(&up) && warning.contains("file data.bin"),
        "{warning}"
    );
    assert!(
        warning.contains("corrupt/"),
        "says where it went: {warning}"
    );
    assert_eq!(dir.count("runs.log", "up"), 2, "up was recomputed");
    assert_eq!(dir.count("runs.log", "mid"), 2);

    // the stage saw the right bytes, and the entries are intact again
    assert!(output(&dir, &p, &[], "up", "data.bin") == payload());
    let n2 = ["mid.n=2"];
    assert!(
        output(&dir, &p, &n2, "mid", "seen.bin") == payload(),
        "mid saw damaged bytes"
    );
    assert_eq!(output(&dir, &p, &n2, "mid", "v.txt"), b"44\n");
    assert_eq!(output(&dir, &p, &n2, "down", "v.txt"), b"44\n");
    assert_eq!(quarantined(&dir), [format!("{up}.0")]);
    let aside = dir.store.join("corrupt").join(format!("{up}.0"));
    assert!(
        std::fs::read(aside.join("data.bin")).expect("kept aside") == damaged,
        "the damaged entry is kept for inspection"
    );
    assert_store_sound(&dir, "after the recompute");
    // gc clears the quarantine
    dir.pipe(&["gc", &p]).code(0);
    assert!(quarantined(&dir).is_empty());
}

#[test]
fn damage_two_levels_deep_is_found_and_recomputed_in_one_run() {
    let dir = Dir::new("recompute-chain");
    let (p, doc) = first_run(&dir);
    let (up, mid) = (key_of(&doc, "up"), key_of(&doc, "mid"));
    flip_byte(&entry_dir(&dir, &up).join("data.bin"), 10);
    flip_byte(&entry_dir(&dir, &mid).join("seen.bin"), 199_999);

    // down changes: it reads mid (damaged: recomputed), which reads up (damaged too)
    let out = dir
        .pipe(&["run", &p, "--set", "down.n=3", "--json"])
        .code(0);
    assert_eq!(
        statuses(&out.json()),
        expect(&[("up", "ran"), ("mid", "ran"), ("down", "ran")])
    );
    assert!(
        out.stderr.contains(&up) && out.stderr.contains(&mid),
        "{}",
        out.stderr
    );
    let mut expected = vec![format!("{up}.0"), format!("{mid}.0")];
    expected.sort();
    assert_eq!(quarantined(&dir), expected);
    assert!(output(&dir, &p, &["down.n=3"], "down", "seen.bin") == payload());
    assert_eq!(output(&dir, &p, &["down.n=3"], "down", "v.txt"), b"129\n");
    assert_eq!(dir.count("runs.log", "up"), 2);
    assert_eq!(dir.count("runs.log", "mid"), 2);
    assert_store_sound(&dir, "after the recompute");
}

#[test]
fn no_recompute_fails_with_2_naming_entry_and_file_and_changes_nothing() {
    let dir = Dir::new("no-recompute");
    let (p, doc) = first_run(&dir);
    let up = key_of(&doc, "up");
    flip_byte(&entry_dir(&dir, &up).join("data.bin"), 77);
    let before = snapshot(&dir.store.join("entries"));
    let log_before = dir.read("runs.log");

    let out = dir
        .pipe(&["run", &p, "--set", "mid.n=2", "--no-recompute", "--json"])
        .code(2);
    assert!(
        out.stdout.is_empty(),
        "no JSON for a run that did not start"
    );
    assert!(out.stderr.contains(&up), "{}", out.stderr);
    assert!(out.stderr.contains("file data.bin"), "{}", out.stderr);
    assert!(out.stderr.contains("node up"), "{}", out.stderr);
    assert!(out.stderr.contains("--no-recompute"), "{}", out.stderr);
    assert_eq!(dir.read("runs.log"), log_before, "nothing ran");
    assert_eq!(
        snapshot(&dir.store.join("entries")),
        before,
        "entries untouched"
    );
    assert!(quarantined(&dir).is_empty());

    // without the flag the same run repairs it
    dir.pipe(&["run", &p, "--set", "mid.n=2"]).code(0);
    assert_store_sound(&dir, "after the repair");
}

/// One kind of damage to up's entry, then `pipe run --set mid.n=2`: up is recomputed (or, with
/// `--no-recompute`, the run fails naming `what`).
fn damage_and_rerun(name: &str, damage: impl Fn(&Path), what: &str) {
    let dir = Dir::new(name);
    let (p, doc) = first_run(&dir);
    let up = key_of(&doc, "up");
    damage(&entry_dir(&dir, &up));
    let verify = dir.pipe(&["verify"]).code(1);
    assert!(verify.stdout.contains(&up), "{}", verify.stdout);

    let refused = dir
        .pipe(&["run", &p, "--set", "mid.n=2", "--no-recompute"])
        .code(2);
    assert!(
        refused.stderr.contains(&up) && refused.stderr.contains(what),
        "{name}: {}",
        refused.stderr
    );
    assert_eq!(dir.count("runs.log", "up"), 1);

    let out = dir.pipe(&["run", &p, "--set", "mid.n=2", "--json"]).code(0);
    assert_eq!(
        node(&out.json(), "up")["status"],
        "ran",
        "{name}: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&up),
        "{name}: no warning: {}",
        out.stderr
    );
    assert_eq!(dir.count("runs.log", "up"), 2);
    assert_eq!(quarantined(&dir), [format!("{up}.0")], "{name}");
    assert!(output(&dir, &p, &[], "up", "data.bin") == payload());
    assert_store_sound(&dir, name);
}

#[test]
fn a_truncated_or_deleted_file_is_recomputed() {
    damage_and_rerun(
        "truncated",
        |e| std::fs::write(e.join("data.bin"), b"short").expect("truncate"),
        "file data.bin",
    );
    damage_and_rerun(
        "deleted",
        |e| std::fs::remove_file(e.join("v.txt")).expect("delete"),
        "file v.txt is missing",
    );
}

#[test]
fn a_corrupt_manifest_is_recomputed() {
    damage_and_rerun(
        "bad-manifest",
        |e| std::fs::write(e.join("manifest.json"), b"{\"schema\": 1, \"ke").expect("garble"),
        "manifest",
    );
    // a manifest that parses but lists a wrong hash
    damage_and_rerun(
        "lying-manifest",
        |e| {
            let m = e.join("manifest.json");
            let text = std::fs::read_to_string(&m).expect("read manifest");
            let mut v: serde_json::Value = serde_json::from_str(&text).expect("parse manifest");
            v["files"]["v.txt"]["blake3"] = serde_json::json!("0".repeat(64));
            std::fs::write(&m, serde_json::to_vec_pretty(&v).expect("json")).expect("write");
        },
        "file v.txt",
    );
}

#[test]
fn a_missing_manifest_is_moved_aside_and_recomputed() {
    let dir = Dir::new("no-manifest");
    let (p, doc) = first_run(&dir);
    let up = key_of(&doc, "up");
    std::fs::remove_file(entry_dir(&dir, &up).join("manifest.json")).expect("delete manifest");
    let verify = dir.pipe(&["verify"]).code(1);
    assert!(
        verify.stdout.contains(&up) && verify.stdout.contains("manifest.json is missing"),
        "{}",
        verify.stdout
    );
    // without its manifest up is simply not in the store: to run when something needs it
    let plan = dir.json(&["plan", &p, "--set", "mid.n=2"], 0);
    assert_eq!(node(&plan, "up")["status"], "to-run");
    let out = dir.pipe(&["run", &p, "--set", "mid.n=2", "--json"]).code(0);
    assert_eq!(
        statuses(&out.json()),
        expect(&[("up", "ran"), ("mid", "ran"), ("down", "ran")])
    );
    assert!(
        out.stderr.contains(&up) && out.stderr.contains("no manifest.json"),
        "{}",
        out.stderr
    );
    assert_eq!(quarantined(&dir), [format!("{up}.0")]);
    assert!(output(&dir, &p, &[], "up", "data.bin") == payload());
    assert_store_sound(&dir, "after the recompute");
}

/// A `shell` command that writes into its input's entry folder (`$PIPE_IN_x`) fails its node,
/// and the changed input is set aside, so neither the command's output nor any later reader
/// rests on bytes that no manifest describes; the next run recomputes the input, and a
/// consumer that only reads it is cached from then on.
#[test]
fn a_command_that_changes_its_input_fails_and_the_input_is_recomputed() {
    let dir = Dir::new("writes-input");
    let p = dir.pipeline(
        "w.yaml",
        r#"
name: w
stages:
  up:
    kind: shell
    params: {cmd: 'echo 1 > "$PIPE_OUT/v"'}
  reader:
    kind: shell
    inputs: {x: up}
    params: {cmd: 'cat "$PIPE_IN_x/v" > "$PIPE_OUT/v"'}
  writer:
    kind: shell
    inputs: {x: up}
    params: {cmd: 'cat "$PIPE_IN_x/v" > "$PIPE_OUT/v"; echo 99 > "$PIPE_IN_x/v"'}
"#,
    );
    let doc = dir.json(&["run", &p, "-j", "1", "--keep-going"], 1);
    assert_eq!(node(&doc, "writer")["status"], "failed", "{doc:#}");
    let error = node(&doc, "writer")["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("changed its input `x`") && error.contains("set aside"),
        "{error}"
    );
    // nothing committed rests on the changed bytes, and the store is sound
    dir.pipe(&["verify"]).code(0);
    // the next run recomputes `up`; `reader` keeps its key and so its entry (made from the
    // original bytes, which `up` gives again)
    let doc = dir.json(&["run", &p, "-j", "1", "--keep-going"], 1);
    assert_eq!(node(&doc, "up")["status"], "ran", "{doc:#}");
    assert_eq!(node(&doc, "reader")["status"], "cached", "{doc:#}");
    assert_eq!(node(&doc, "writer")["status"], "failed", "{doc:#}");
}
