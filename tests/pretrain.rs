//! The `pretrain` kind through the binary: a synthetic-data run writes the encoder, curve and
//! metrics; a run killed with SIGKILL after an epoch resumes from its scratch checkpoint and
//! ends bit-identical to an uninterrupted run; a sweep over `m` of a PGD stage shares one node.

use std::time::Duration;

use crate::util::{Dir, drain, key_of, node, wait_exit, wait_until};

fn pipeline(epochs: usize) -> String {
    format!(
        r#"
name: pretrain-small
stages:
  data:
    kind: dataset
    params: {{source: synthetic, n_classes: 4, n_train: 160, n_test: 16, seed: 1}}
  pretrain:
    kind: pretrain
    inputs: {{dataset: data}}
    params:
      method: emp_ssl
      attack: free
      views: crop
      n_views: 4
      batch_size: 16
      epochs: {epochs}
      m: 2
      eps: 8/255
      width: 8
      hidden_dim: 32
      z_dim: 16
      seed: 5
"#
    )
}

fn entry_file(dir: &Dir, doc: &serde_json::Value, id: &str, file: &str) -> Vec<u8> {
    let key = key_of(doc, id);
    let path = dir
        .store
        .join("entries")
        .join(&key[..2])
        .join(&key)
        .join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn pretrain_writes_its_artifacts_and_a_killed_run_resumes_bit_identically() {
    // uninterrupted reference
    let a = Dir::new("pretrain-a");
    let pa = a.pipeline("p.yaml", &pipeline(6));
    let doc_a = a.json(&["run", &pa], 0);
    assert_eq!(node(&doc_a, "pretrain")["status"], "ran", "{doc_a:#}");
    let show = a.json(&["show", &pa, "pretrain"], 0);
    let m = &node(&show, "pretrain")["metrics"];
    for k in [
        "final_loss",
        "final_invariance",
        "final_tcr",
        "train_seconds",
        "train_minutes",
        "images_per_second",
    ] {
        assert!(m[k].as_f64().is_some_and(f64::is_finite), "{k} in {m}");
    }
    assert_eq!(m["device"], "cpu");
    assert_eq!(m["steps"], 6 * 10 * 2);
    let curve =
        String::from_utf8(entry_file(&a, &doc_a, "pretrain", "curve.jsonl")).expect("utf-8");
    let lines: Vec<serde_json::Value> = curve
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 6);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["epoch"], i);
        for k in [
            "loss",
            "invariance",
            "tcr",
            "lr",
            "seconds",
            "images_per_second",
        ] {
            assert!(l[k].as_f64().is_some(), "{k} in {l}");
        }
    }

    // the same pipeline in another store, killed once a checkpoint exists
    let b = Dir::new("pretrain-b");
    let pb = b.pipeline("p.yaml", &pipeline(6));
    let plan = b.json(&["plan", &pb], 0);
    let key = key_of(&plan, "pretrain");
    assert_eq!(key, key_of(&doc_a, "pretrain"), "same pipeline, same key");
    let state = b.store.join("scratch").join(&key).join("state.safetensors");
    let args = ["run", pb.as_str(), "--no-progress"];
    let mut child = b.spawn(&args);
    wait_until(
        Duration::from_secs(120),
        "the first epoch checkpoint",
        || {
            if let Ok(Some(s)) = child.try_wait() {
                panic!("pipe exited ({s}) before the first checkpoint");
            }
            state.is_file()
        },
    );
    child.kill().expect("SIGKILL pipe");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(
        status.code().is_none(),
        "pipe should have died of a signal: {status}"
    );
    drop(drain(child, &args));
    let plan = b.json(&["plan", &pb], 0);
    assert_eq!(
        node(&plan, "pretrain")["status"],
        "to-run",
        "the killed node is not cached"
    );

    let doc_b = b.json(&["run", &pb], 0);
    assert_eq!(node(&doc_b, "pretrain")["status"], "ran");
    let log = String::from_utf8(entry_file(&b, &doc_b, "pretrain", "log.txt")).expect("utf-8");
    assert!(
        log.contains("resumed from"),
        "the rerun did not resume:\n{log}"
    );
    assert_eq!(
        entry_file(&a, &doc_a, "pretrain", "encoder.safetensors"),
        entry_file(&b, &doc_b, "pretrain", "encoder.safetensors"),
        "the resumed run's encoder differs from the uninterrupted one"
    );
    assert!(
        !state.exists(),
        "the scratch checkpoint is removed on commit"
    );
}

#[test]
fn params_that_do_not_apply_share_one_node() {
    let d = Dir::new("pretrain-sweep");
    let yaml = pipeline(1)
        .replace("attack: free", "attack: pgd")
        .replace("      m: 2\n", "      pgd_steps: 1\n");
    let p = d.pipeline("p.yaml", &yaml);
    let plan = d.json(&["plan", &p, "--sweep", "pretrain.m=1,3,5"], 0);
    let keys: std::collections::BTreeSet<String> = plan["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["stage"] == "pretrain")
        .map(|n| n["key"].as_str().expect("key").to_string())
        .collect();
    assert_eq!(keys.len(), 1, "m does not apply to attack: pgd: {plan:#}");
    let plan = d.json(&["plan", &p, "--sweep", "pretrain.eps=4/255,8/255"], 0);
    let n = plan["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["stage"] == "pretrain")
        .count();
    assert_eq!(n, 2, "eps applies: {plan:#}");
    // a bad value is a spec error naming the stage and param, before anything runs
    let out = d.pipe(&["run", &p, "--set", "pretrain.eps=8/zero"]).code(2);
    assert!(
        out.stderr.contains("eps") && out.stderr.contains("8/255"),
        "{}",
        out.stderr
    );
}
