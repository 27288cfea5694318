//! `pipe gc`: keeps what the given pipelines reference, removes the rest (`--dry-run` removes
//! nothing); `pipe verify` re-hashes entries and names a corrupted file.

use crate::util::{Dir, key_of, node, statuses};

fn pipeline(name: &str, value: u32) -> String {
    format!(
        r#"
name: {name}
stages:
  {name}_src:
    kind: shell
    params:
      cmd: echo {value} > "$PIPE_OUT/out.txt"
  {name}_double:
    kind: shell
    inputs: {{src: {name}_src}}
    params:
      cmd: echo $(( $(cat "$PIPE_IN_src/out.txt") * 2 )) > "$PIPE_OUT/out.txt"
"#
    )
}

fn keys(doc: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = doc["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["key"].as_str().expect("key").to_string())
        .collect();
    k.sort();
    k
}

#[test]
fn gc_keeps_referenced_entries_and_removes_the_rest() {
    let dir = Dir::new("gc");
    let a = dir.pipeline("a.yaml", &pipeline("a", 3));
    let b = dir.pipeline("b.yaml", &pipeline("b", 4));
    let ra = dir.json(&["run", &a], 0);
    let rb = dir.json(&["run", &b], 0);
    assert_eq!((ra["ran"].as_u64(), rb["ran"].as_u64()), (Some(2), Some(2)));
    let (ka, kb) = (keys(&ra), keys(&rb));
    let mut all: Vec<String> = ka.iter().chain(&kb).cloned().collect();
    all.sort();
    assert_eq!(dir.entry_keys(), all);

    // dry run: lists b's keys, removes nothing
    let dry = dir.pipe(&["gc", &a, "--dry-run"]).code(0);
    for k in &kb {
        assert!(
            dry.stdout.contains(k.as_str()),
            "dry run should list {k}:\n{}",
            dry.stdout
        );
    }
    for k in &ka {
        assert!(
            !dry.stdout.contains(k.as_str()),
            "dry run must not list a's {k}:\n{}",
            dry.stdout
        );
    }
    assert!(
        dry.stdout.contains("would remove 2 entries"),
        "{}",
        dry.stdout
    );
    assert_eq!(dir.entry_keys(), all, "a dry run removed something");

    // for real
    let gc = dir.pipe(&["gc", &a]).code(0);
    assert!(gc.stdout.contains("removed 2 entries"), "{}", gc.stdout);
    assert!(gc.stdout.contains("kept 2"), "{}", gc.stdout);
    assert_eq!(dir.entry_keys(), ka);
    let again = dir.json(&["run", &a], 0);
    assert!(
        statuses(&again).values().all(|s| s == "cached"),
        "{again:#}"
    );
    let plan_b = dir.json(&["plan", &b], 0);
    assert!(
        statuses(&plan_b).values().all(|s| s == "to-run"),
        "{plan_b:#}"
    );
    let verify = dir.pipe(&["verify"]).code(0);
    assert!(
        verify.stdout.contains("2 entries checked, 0 problem"),
        "{}",
        verify.stdout
    );

    // gc with both pipelines keeps everything
    dir.json(&["run", &b], 0);
    let gc = dir.pipe(&["gc", &a, &b]).code(0);
    assert!(gc.stdout.contains("removed 0 entries"), "{}", gc.stdout);
    assert_eq!(dir.entry_keys().len(), 4);

    // corrupt one committed file: verify exits 1 naming the entry and the file
    let show = dir.json(&["show", &a, "a_double"], 0);
    let path = node(&show, "a_double")["path"]
        .as_str()
        .expect("committed")
        .to_string();
    let file = std::path::Path::new(&path).join("out.txt");
    let mut bytes = std::fs::read(&file).expect("read out.txt");
    assert_eq!(bytes, b"6\n");
    bytes[0] ^= 0x01;
    let mut perm = std::fs::metadata(&file).expect("stat").permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&file, perm).expect("make writable");
    std::fs::write(&file, &bytes).expect("corrupt out.txt");
    let key = key_of(&show, "a_double");
    let verify = dir.pipe(&["verify"]).code(1);
    let bad: Vec<&str> = verify.stdout.lines().filter(|l| l.contains(&key)).collect();
    assert_eq!(bad.len(), 1, "{}", verify.stdout);
    assert!(bad[0].contains("out.txt"), "{}", verify.stdout);
    assert!(
        verify.stdout.contains("4 entries checked, 1 problem"),
        "{}",
        verify.stdout
    );
    let json = dir.pipe(&["verify", "--json"]).code(1).json();
    assert_eq!(json["entries"], 4);
    let problems = json["problems"].as_array().expect("problems");
    assert_eq!(problems.len(), 1, "{json:#}");
    assert_eq!(problems[0]["key"], key.as_str());
    assert_eq!(problems[0]["file"], "out.txt");
}

#[test]
fn gc_reports_the_unfinished_work_of_unkept_nodes_and_removes_it_on_request() {
    let dir = Dir::new("gc-unfinished");
    let a = dir.pipeline("a.yaml", &pipeline("a", 3));
    let c = dir.pipeline("c.yaml", &pipeline("c", 5));
    dir.json(&["run", &a], 0);
    // what an interrupted `c_src` leaves: a training state in its scratch folder
    let plan = dir.json(&["plan", &c], 0);
    let scratch = dir.store.join("scratch").join(key_of(&plan, "c_src"));
    std::fs::create_dir_all(&scratch).expect("mkdir");
    std::fs::write(scratch.join("state.safetensors"), vec![0u8; 2_000_000]).expect("state");
    // a pipeline that has the node keeps it without a word
    let out = dir.pipe(&["gc", &a, &c]).code(0).stdout;
    assert!(!out.contains("unfinished"), "{out}");
    assert!(scratch.join("state.safetensors").is_file());
    // one that does not: kept, and said
    let out = dir.pipe(&["gc", &a]).code(0).stdout;
    assert!(
        out.contains("kept the resumable work of 1 unfinished nodes none of these pipelines has (2.0 MB); `--unfinished` removes it"),
        "{out}"
    );
    assert!(scratch.join("state.safetensors").is_file());
    let out = dir
        .pipe(&["gc", &a, "--unfinished", "--dry-run"])
        .code(0)
        .stdout;
    assert!(
        out.contains("would remove the resumable work of 1 unfinished nodes"),
        "{out}"
    );
    assert!(
        scratch.join("state.safetensors").is_file(),
        "a dry run removed it"
    );
    let out = dir.pipe(&["gc", &a, "--unfinished"]).code(0).stdout;
    assert!(
        out.contains("removed the resumable work of 1 unfinished nodes"),
        "{out}"
    );
    assert!(!scratch.exists());
    // the kept pipeline's entries are all still there
    let again = dir.json(&["run", &a], 0);
    assert!(
        statuses(&again).values().all(|s| s == "cached"),
        "{again:#}"
    );
}
