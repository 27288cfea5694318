//! The `pretrain` kind through the binary: a synthetic-data run writes the encoder, curve and
//! metrics; a run killed with SIGKILL within its first epoch resumes from its scratch state and
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

    // the same pipeline in another store, writing its state after every batch (not keyed),
    // killed as soon as a state exists: after the first batch or two of epoch 1
    let b = Dir::new("pretrain-b");
    let pb = b.pipeline(
        "p.yaml",
        &pipeline(6).replace(
            "      seed: 5\n",
            "      seed: 5\n      checkpoint_minutes: 0\n",
        ),
    );
    let plan = b.json(&["plan", &pb], 0);
    let key = key_of(&plan, "pretrain");
    assert_eq!(
        key,
        key_of(&doc_a, "pretrain"),
        "same pipeline, same key (checkpoint_minutes is not keyed)"
    );
    let state = b.store.join("scratch").join(&key).join("state.safetensors");
    let args = ["run", pb.as_str(), "--no-progress"];
    let mut child = b.spawn(&args);
    wait_until(Duration::from_secs(120), "the first training state", || {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("pipe exited ({s}) before the first checkpoint");
        }
        state.is_file()
    });
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
    // plan says the rerun resumes, and from where (the state's own record)
    assert!(
        node(&plan, "pretrain")["resumes"].as_str().is_some_and(
            |r| r.starts_with("its saved training state (in epoch 1 of 6 after batch ")
        ),
        "{plan:#}"
    );

    let doc_b = b.json(&["run", &pb], 0);
    assert_eq!(node(&doc_b, "pretrain")["status"], "ran");
    let log = String::from_utf8(entry_file(&b, &doc_b, "pretrain", "log.txt")).expect("utf-8");
    assert!(
        log.contains("resumed from") && log.contains("in epoch 1 of 6 after batch"),
        "the rerun did not resume within epoch 1:\n{log}"
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

fn advcl_pipeline(label_seed: u64, ce_weight: f64) -> String {
    format!(
        r#"
name: advcl-small
stages:
  data:
    kind: dataset
    params: {{source: synthetic, n_classes: 4, n_train: 48, n_test: 16, seed: 1}}
  simclr:
    kind: pretrain
    inputs: {{dataset: data}}
    params: {{method: simclr, batch_size: 16, epochs: 1, width: 4, hidden_dim: 16, z_dim: 8}}
  clusters:
    kind: pseudo_labels
    inputs: {{encoder: simclr, dataset: data}}
    params: {{ks: [2, 4], seed: {label_seed}}}
  advcl:
    kind: pretrain
    inputs: {{dataset: data, labels: clusters}}
    params: {{method: advcl, batch_size: 16, epochs: 1, width: 4, pgd_steps: 1, warmup_epochs: 1, ce_weight: {ce_weight}}}
  head:
    kind: finetune
    inputs: {{encoder: advcl, dataset: data}}
    params: {{mode: slf, preset: advcl, epochs: 1, batch_size: 16}}
"#
    )
}

/// AdvCL end to end: a SimCLR encoder, its k-means pseudo-labels, AdvCL on them (two extra
/// epochs, [Q50]) and a linear head through the `pgd` branch; the label seed moves the labels'
/// and AdvCL's keys, not SimCLR's; a `labels` input on another method is refused.
#[test]
fn advcl_trains_on_pseudo_labels_from_a_pretrained_encoder() {
    let dir = Dir::new("advcl-e2e");
    let p = dir.pipeline("p.yaml", &advcl_pipeline(0, 0.2));
    let doc = dir.json(&["run", &p], 0);
    for id in ["simclr", "clusters", "advcl", "head"] {
        assert_eq!(node(&doc, id)["status"], "ran", "{doc:#}");
    }
    let show = dir.json(&["show", &p, "clusters"], 0);
    let m = &node(&show, "clusters")["metrics"];
    assert_eq!(
        (m["n_train"].as_u64(), m["n_test"].as_u64()),
        (Some(48), Some(16))
    );
    for k in ["inertia_2", "inertia_4", "purity_2", "purity_4"] {
        assert!(m[k].as_f64().is_some_and(f64::is_finite), "{k} in {m}");
    }
    assert!(m["purity_4"].as_f64().is_some_and(|v| v >= 0.25), "{m}");
    let show = dir.json(&["show", &p, "advcl"], 0);
    let m = &node(&show, "advcl")["metrics"];
    assert_eq!(m["epochs"], 3, "{m}");
    for k in ["final_loss", "final_contrast", "final_pseudo_ce"] {
        assert!(m[k].as_f64().is_some_and(f64::is_finite), "{k} in {m}");
    }
    let labels = entry_file(&dir, &doc, "clusters", "labels.safetensors");
    assert!(labels.len() > 8 * (48 + 16));

    // another label seed: the labels and everything downstream are new, SimCLR is cached
    let p2 = dir.pipeline("p2.yaml", &advcl_pipeline(1, 0.2));
    let plan = dir.json(&["plan", &p2], 0);
    assert_eq!(key_of(&plan, "simclr"), key_of(&doc, "simclr"));
    for id in ["clusters", "advcl", "head"] {
        assert_ne!(key_of(&plan, id), key_of(&doc, id), "{id}");
    }
    // a param of AdvCL moves AdvCL's key only
    let p3 = dir.pipeline("p3.yaml", &advcl_pipeline(0, 0.5));
    let plan = dir.json(&["plan", &p3], 0);
    assert_eq!(key_of(&plan, "clusters"), key_of(&doc, "clusters"));
    assert_ne!(key_of(&plan, "advcl"), key_of(&doc, "advcl"));

    // AdvCL without labels, and labels on another method, are plan-time errors at the stage's
    // `inputs` line: nothing runs
    let no_labels = advcl_pipeline(0, 0.3).replace(
        "inputs: {dataset: data, labels: clusters}",
        "inputs: {dataset: data}",
    );
    let at = no_labels
        .lines()
        .position(|l| l == "  advcl:")
        .map(|i| i + 3)
        .expect("the advcl stage");
    let p4 = dir.pipeline("p4.yaml", &no_labels);
    let out = dir.pipe(&["run", &p4]).code(2);
    assert!(
        out.stderr.contains("pseudo-labels")
            && out.stderr.contains("`labels` input")
            && out.stderr.contains(&format!("p4.yaml:{at}"))
            && out.stderr.contains("stages.advcl.inputs"),
        "line {at}: {}",
        out.stderr
    );
    let other = format!(
        "{}  other:\n    kind: pretrain\n    inputs: {{dataset: data, labels: clusters}}\n    \
         params: {{method: simclr, batch_size: 16, epochs: 1, width: 4, hidden_dim: 16, z_dim: 8}}\n",
        advcl_pipeline(0, 0.2)
    );
    let p5 = dir.pipeline("p5.yaml", &other);
    let out = dir.pipe(&["run", &p5]).code(2);
    let at = other.lines().count() - 1;
    assert!(
        out.stderr.contains(&format!("p5.yaml:{at}"))
            && out.stderr.contains("stages.other.inputs.labels"),
        "line {at}: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("read by method advcl only"),
        "{}",
        out.stderr
    );
}
