//! A tiny version of `pipelines/cf_amc_ssl_cpu.yaml` through the binary: two of the seven rows
//! (CF-AMC-SSL and crop-based SimCLR with PGD) on synthetic data, through every stage kind
//! (dataset, pretrain, finetune, attack_dataset, evaluate, report, shell). The table has the
//! right rows, columns and marks; a second run is fully cached; a recomputed report is
//! byte-identical; `--set` on one pretrain param reruns only that row's nodes and the report.

use std::collections::BTreeMap;

use crate::util::{Dir, key_of, statuses};

const PIPELINE: &str = r#"
name: cf_amc_ssl_tiny
defaults:
  pretrain: {width: 8, hidden_dim: 32, z_dim: 16, eps: 8/255, alpha: 0.01, seed: 0}
  finetune: {seed: 0}
  evaluate: {attacks: [{norm: linf, eps: 4/255, steps: 3}, {norm: linf, eps: 8/255, steps: 3}], seed: 0}
x-columns: &columns
  - {clean_acc: Clean}
  - {"pgd_linf_4/255_acc": PGD(4/255)}
  - {"pgd_linf_8/255_acc": PGD(8/255)}
  - {transfer_acc: Stored L2}
  - {metric: pretrain.train_minutes, header: Time (min), precision: 3}
stages:
  data:
    kind: dataset
    params: {source: synthetic, n_classes: 4, n_train: 96, n_test: 32, seed: 3}
  pretrain_emp:
    kind: pretrain
    inputs: {dataset: data}
    params: {method: emp_ssl, n_views: 4, batch_size: 16}
    variants:
      cf_amc_ssl: {attack: free, views: crop, epochs: 1, m: 2}
  pretrain_simclr:
    kind: pretrain
    inputs: {dataset: data}
    params: {method: simclr, n_views: 2, batch_size: 32}
    variants:
      crop_simclr_pgd: {attack: pgd, views: crop, epochs: 1, pgd_steps: 2}
  linear_emp: {kind: finetune, inputs: {encoder: pretrain_emp, dataset: data}, params: {mode: slf, preset: cf_adam, batch_size: 32, epochs: 3}}
  linear_simclr: {kind: finetune, inputs: {encoder: pretrain_simclr, dataset: data}, params: {mode: slf, preset: cf_adam, batch_size: 32, epochs: 3}}
  adv_emp: {kind: attack_dataset, inputs: {model: linear_emp, dataset: data}, params: {norm: l2, eps: 0.5, alpha: 0.2, steps: 2}}
  adv_simclr: {kind: attack_dataset, inputs: {model: linear_simclr, dataset: data}, params: {norm: l2, eps: 0.5, alpha: 0.2, steps: 2}}
  eval_emp: {kind: evaluate, inputs: {model: linear_emp, dataset: data, adversarial: adv_emp}, params: {preset: sound}}
  eval_simclr: {kind: evaluate, inputs: {model: linear_simclr, dataset: data, adversarial: adv_simclr}, params: {preset: sound}}
  table:
    kind: report
    inputs: {runs: ["eval_emp[*]", "eval_simclr[*]"]}
    params:
      title: tiny
      columns: *columns
      rows:
        - {match: {method: simclr, attack: pgd, views: crop}, label: "Crop-based SimCLR ({pretrain.n_views} crops, {pretrain.pgd_steps}-step PGD, {pretrain.epochs} epochs)"}
        - {match: {method: emp_ssl, attack: free, views: crop}, label: "CF-AMC-SSL ({pretrain.n_views} crops, m={m}, {pretrain.epochs} epochs)"}
  copy:
    kind: shell
    inputs: {report: table}
    params: {cmd: 'cp "$PIPE_IN_report/table.md" "$PIPE_OUT/table.md"', outputs: [table.md]}
"#;

fn entry_path(dir: &Dir, key: &str, file: &str) -> std::path::PathBuf {
    dir.store
        .join("entries")
        .join(&key[..2])
        .join(key)
        .join(file)
}

#[test]
fn tiny_cf_amc_ssl_table_runs_caches_and_reruns_one_row() {
    let dir = Dir::new("report-e2e");
    let p = dir.pipeline("cf.yaml", PIPELINE);

    let first = dir.json(&["run", &p], 0);
    let st = statuses(&first);
    assert_eq!(st.len(), 11, "{st:?}");
    assert!(st.values().all(|s| s == "ran"), "{st:?}");
    let table_key = key_of(&first, "table");
    let md = std::fs::read_to_string(entry_path(&dir, &table_key, "table.md")).expect("table.md");

    // Rows in rule order with their labels, columns in order.
    let lines: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
    assert_eq!(
        lines[0], "| Row | Clean | PGD(4/255) | PGD(8/255) | Stored L2 | Time (min) |",
        "{md}"
    );
    assert_eq!(lines.len(), 4, "header, rule, two rows:\n{md}");
    assert!(
        lines[2].starts_with("| Crop-based SimCLR (2 crops, 2-step PGD, 1 epochs) |"),
        "{md}"
    );
    assert!(
        lines[3].starts_with("| CF-AMC-SSL (4 crops, m=2, 1 epochs) |"),
        "{md}"
    );
    // Two rows: every column marks its best (both when tied) and nothing as second.
    for col in 1..=5 {
        let bold = lines[2..]
            .iter()
            .filter(|l| {
                l.split('|')
                    .nth(col + 1)
                    .is_some_and(|c| c.trim().starts_with("**"))
            })
            .count();
        assert!(bold >= 1, "column {col} has a best mark:\n{md}");
    }
    let italic = lines[2..]
        .iter()
        .flat_map(|l| l.split('|'))
        .any(|c| c.trim().starts_with('*') && !c.trim().starts_with("**"));
    assert!(!italic, "no second-best mark with two rows:\n{md}");
    // Values are the evaluate nodes' numbers, robust <= clean.
    let csv = std::fs::read_to_string(entry_path(&dir, &table_key, "table.csv")).expect("csv");
    let eval_emp = key_of(&first, "eval_emp[cf_amc_ssl]");
    let row = csv
        .lines()
        .find(|l| l.contains(&eval_emp))
        .expect("the CF-AMC row names its evaluate key");
    let metrics: serde_json::Value = serde_json::from_slice(
        &std::fs::read(entry_path(&dir, &eval_emp, "metrics.json")).expect("metrics"),
    )
    .expect("json");
    let clean = metrics["clean_acc"].as_f64().expect("clean") * 100.0;
    assert!(
        row.contains(&format!(",{clean:.2},")),
        "{row} has clean {clean:.2}"
    );
    assert!(
        row.contains("\"\"steps\"\":3"),
        "the attack config is in the CSV: {row}"
    );
    for f in ["table.html", "table.tex", "table.json"] {
        assert!(entry_path(&dir, &table_key, f).is_file(), "{f}");
    }
    // The shell stage saw the same table.
    let copy = std::fs::read_to_string(entry_path(&dir, &key_of(&first, "copy"), "table.md"))
        .expect("copy");
    assert_eq!(copy, md);
    // `pipe show FILE table` prints it.
    let show = dir.pipe(&["show", &p, "table"]).code(0);
    assert!(
        show.stdout
            .contains("| CF-AMC-SSL (4 crops, m=2, 1 epochs) |"),
        "{}",
        show.stdout
    );

    // Second run: fully cached.
    let second = dir.json(&["run", &p], 0);
    assert!(
        statuses(&second).values().all(|s| s == "cached"),
        "{second:#}"
    );

    // The report recomputed from the same entries gives the same bytes.
    let entry = entry_path(&dir, &table_key, "");
    std::fs::remove_dir_all(&entry).expect("remove the report entry");
    let third = dir.json(&["run", &p, "table"], 0);
    assert_eq!(statuses(&third)["table"], "ran");
    for f in [
        "table.md",
        "table.csv",
        "table.html",
        "table.tex",
        "table.json",
    ] {
        let again = std::fs::read(entry_path(&dir, &table_key, f)).expect(f);
        if f == "table.md" {
            assert_eq!(
                String::from_utf8(again).expect("utf-8"),
                md,
                "byte-identical {f}"
            );
        } else {
            assert!(!again.is_empty(), "{f}");
        }
    }

    // One pretrain param of one row: only that row's chain and the report (and its copy) rerun.
    let fourth = dir.json(&["run", &p, "--set", "pretrain_simclr.epochs=2"], 0);
    let st = statuses(&fourth);
    let ran: BTreeMap<&str, &str> = st
        .iter()
        .filter(|(_, s)| s.as_str() == "ran")
        .map(|(k, s)| (k.as_str(), s.as_str()))
        .collect();
    let expected = [
        "adv_simclr[crop_simclr_pgd]",
        "copy",
        "eval_simclr[crop_simclr_pgd]",
        "linear_simclr[crop_simclr_pgd]",
        "pretrain_simclr[crop_simclr_pgd]",
        "table",
    ];
    assert_eq!(ran.keys().copied().collect::<Vec<_>>(), expected, "{st:?}");
    assert!(
        st.iter()
            .filter(|(k, _)| !expected.contains(&k.as_str()))
            .all(|(_, s)| s == "cached"),
        "{st:?}"
    );
    let new_key = key_of(&fourth, "table");
    assert_ne!(new_key, table_key);
    let md2 = std::fs::read_to_string(entry_path(&dir, &new_key, "table.md")).expect("table.md");
    assert!(
        md2.contains("| Crop-based SimCLR (2 crops, 2-step PGD, 2 epochs) |"),
        "{md2}"
    );
    assert!(
        md2.contains("| CF-AMC-SSL (4 crops, m=2, 1 epochs) |"),
        "{md2}"
    );
}
