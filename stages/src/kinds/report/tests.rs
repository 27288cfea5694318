use std::path::Path;

use pipe_engine::{NormalizeCtx, TypedStage};
use serde_json::{Map, Value, json};

use super::*;

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("object")
}

fn link(kind: &str, key: &str, params: Value, metrics: Value) -> Link {
    Link {
        kind: kind.into(),
        key: key.repeat(64 / key.len()),
        params: obj(params),
        metrics: obj(metrics),
    }
}

/// An evaluate -> dataset -> finetune -> pretrain chain, like the store gives.
fn run(id: &str, pre: Value, minutes: f64, clean: f64, pgd: f64) -> Run {
    Run {
        chain: vec![
            link(
                "evaluate",
                &format!("e{id}"),
                json!({"preset": "sound", "seed": 0}),
                json!({
                    "clean_acc": clean,
                    "pgd_linf_8/255_acc": pgd,
                    "attacks": {"pgd_linf_8/255_acc": {"norm": "linf", "eps": 8.0/255.0, "steps": 20}},
                    "head": "full_image",
                    "seconds": 3.0
                }),
            ),
            link(
                "dataset",
                "d0",
                json!({"source": "synthetic", "seed": 0}),
                json!({"n_train": 100}),
            ),
            link(
                "finetune",
                &format!("f{id}"),
                json!({"mode": "slf", "epochs": 25, "seed": 0}),
                json!({"train_acc": 0.5, "seconds": 1.0}),
            ),
            link(
                "pretrain",
                &format!("p{id}"),
                pre,
                json!({"train_minutes": minutes}),
            ),
        ],
    }
}

fn params(v: Value) -> ReportParams {
    let p: ReportParams = serde_json::from_value(v).expect("params parse");
    assert!(Report::check(&p).is_empty(), "{:?}", Report::check(&p));
    Report::canonicalize(
        p,
        &NormalizeCtx {
            pipeline_dir: Path::new("."),
        },
    )
    .expect("canonical")
}

fn three_rows() -> Vec<Run> {
    vec![
        run(
            "1",
            json!({"method": "emp_ssl", "attack": "pgd", "views": "patch", "n_views": 16, "epochs": 30}),
            530.0,
            0.61,
            0.1695,
        ),
        run(
            "2",
            json!({"method": "emp_ssl", "attack": "free", "views": "crop", "n_views": 16, "epochs": 10, "m": 3}),
            97.0,
            0.7588,
            0.3334,
        ),
        run(
            "3",
            json!({"method": "simclr", "attack": "free", "views": "crop", "n_views": 2, "epochs": 167, "m": 3}),
            157.0,
            0.7025,
            0.245,
        ),
    ]
}

fn paper_params() -> ReportParams {
    params(json!({
        "title": "CIFAR-10",
        "columns": [
            {"clean_acc": "Clean"},
            {"pgd_linf_8/255_acc": "PGD(8/255)"},
            {"metric": "pretrain.train_minutes", "header": "Time (min)", "precision": 0}
        ],
        "rows": [
            {"match": {"method": "simclr", "attack": "free"}, "label": "Crop-based SimCLR-FreeAdv ({pretrain.n_views} crops, m={m}, {pretrain.epochs} epochs)"},
            {"match": {"method": "emp_ssl", "views": "patch"}, "label": "Patch-based EMP-SSL ({pretrain.n_views} patches, {pretrain.epochs} epochs)"},
            {"match": {"method": "emp_ssl", "attack": "free"}, "label": "CF-AMC-SSL ({pretrain.n_views} crops, m={m}, {pretrain.epochs} epochs)"}
        ]
    }))
}

#[test]
fn columns_parse_in_three_forms_and_resolve_defaults() {
    let p = params(json!({"columns": [
        "clean_acc",
        {"train_minutes": "Time (min)"},
        {"metric": "final_loss", "precision": 4}
    ], "precision": 1}));
    let c = &p.columns;
    assert_eq!(c[0].header.as_deref(), Some("clean_acc"));
    assert_eq!(
        (c[0].higher_is_better, c[0].percent, c[0].precision),
        (Some(true), Some(true), Some(1))
    );
    assert_eq!(c[1].header.as_deref(), Some("Time (min)"));
    assert_eq!(
        (c[1].higher_is_better, c[1].percent),
        (Some(false), Some(false))
    );
    assert_eq!(
        (c[2].higher_is_better, c[2].precision),
        (Some(false), Some(4))
    );
    // The canonical form reads back to itself (it is what gets keyed and run).
    let again: ReportParams =
        serde_json::from_value(serde_json::to_value(&p).expect("ser")).expect("de");
    assert_eq!(again.columns, p.columns);

    for bad in [
        json!({"columns": [3]}),
        json!({"columns": [{"metric": "a", "colour": "red"}]}),
        json!({"columns": [{"a": 1}]}),
    ] {
        assert!(
            serde_json::from_value::<ReportParams>(bad.clone()).is_err(),
            "{bad}"
        );
    }
    let dup: ReportParams =
        serde_json::from_value(json!({"columns": ["a", "a"], "sort": "b"})).expect("parses");
    let errs = Report::check(&dup);
    assert!(
        errs.iter().any(|e| e.message.contains("listed twice")),
        "{errs:?}"
    );
    assert!(errs.iter().any(|e| e.path == "sort"), "{errs:?}");
    let empty: ReportParams = serde_json::from_value(json!({"columns": []})).expect("parses");
    assert!(!Report::check(&empty).is_empty());
    let brace: ReportParams =
        serde_json::from_value(json!({"columns": ["a"], "label": "x {m"})).expect("parses");
    assert!(
        Report::check(&brace)
            .iter()
            .any(|e| e.message.contains("unclosed"))
    );
}

#[test]
fn rows_follow_the_rules_with_filled_labels_values_and_marks() {
    let t = build(&paper_params(), &three_rows()).expect("table");
    let labels: Vec<&str> = t.rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "Crop-based SimCLR-FreeAdv (2 crops, m=3, 167 epochs)",
            "Patch-based EMP-SSL (16 patches, 30 epochs)",
            "CF-AMC-SSL (16 crops, m=3, 10 epochs)",
        ]
    );
    let shown = |r: usize| -> Vec<String> {
        t.rows[r]
            .cells
            .iter()
            .map(|c| c.as_ref().expect("cell").shown.clone())
            .collect()
    };
    assert_eq!(shown(0), ["70.25", "24.50", "157"]);
    assert_eq!(shown(1), ["61.00", "16.95", "530"]);
    assert_eq!(shown(2), ["75.88", "33.34", "97"]);
    let marks = |r: usize| -> Vec<Mark> {
        t.rows[r]
            .cells
            .iter()
            .map(|c| c.as_ref().expect("cell").mark)
            .collect()
    };
    // Accuracies: higher is better. Time: lower is better.
    assert_eq!(marks(0), [Mark::Second, Mark::Second, Mark::Second]);
    assert_eq!(marks(1), [Mark::None, Mark::None, Mark::None]);
    assert_eq!(marks(2), [Mark::Best, Mark::Best, Mark::Best]);
    // Provenance: accuracy from the evaluate node with its attack config, time from pretrain.
    let c = t.rows[2].cells[1].as_ref().expect("cell");
    assert_eq!(c.source.kind, "evaluate");
    assert!(c.source.key.starts_with("e2e2"));
    let cfg = c.source.config.as_ref().expect("config");
    assert_eq!(cfg["steps"], 20);
    assert_eq!(cfg["head"], "full_image");
    let time = t.rows[2].cells[2].as_ref().expect("cell");
    assert_eq!((time.source.kind.as_str(), time.value), ("pretrain", 97.0));

    // Sorting by a column puts its best first.
    let mut p = paper_params();
    p.sort = Some("pretrain.train_minutes".into());
    let sorted = build(&p, &three_rows()).expect("table");
    let first: Vec<&str> = sorted
        .rows
        .iter()
        .map(|r| &r.cells[2].as_ref().expect("c").shown[..])
        .collect();
    assert_eq!(first, ["97", "157", "530"]);
}

#[test]
fn ties_share_the_mark_and_two_rows_get_no_second() {
    let mut runs = three_rows();
    // Row 3 ties row 2 once rounded to 2 digits.
    runs[2].chain[0]
        .metrics
        .insert("clean_acc".into(), json!(0.758_81));
    let t = build(&paper_params(), &runs).expect("table");
    let clean: Vec<Mark> = t
        .rows
        .iter()
        .map(|r| r.cells[0].as_ref().expect("c").mark)
        .collect();
    assert_eq!(clean, [Mark::Best, Mark::Second, Mark::Best]);

    let t2 = build(&paper_params(), &runs[..2]).expect("table");
    let marks: Vec<Mark> = t2
        .rows
        .iter()
        .map(|r| r.cells[1].as_ref().expect("c").mark)
        .collect();
    assert_eq!(marks, [Mark::None, Mark::Best]);
}

#[test]
fn names_are_qualified_or_unambiguous() {
    let runs = three_rows();
    let r = &runs[0];
    // `epochs` is in finetune and pretrain: an error naming both.
    let e = fill_template("{epochs}", r).expect_err("ambiguous");
    assert!(
        e.contains("finetune.epochs") && e.contains("pretrain.epochs"),
        "{e}"
    );
    assert_eq!(
        fill_template("{pretrain.epochs} / {finetune.epochs}", r).expect("ok"),
        "30 / 25"
    );
    // `seed` is in the run's own node: that one wins.
    assert_eq!(
        fill_template("{seed} {{braces}}", r).expect("ok"),
        "0 {braces}"
    );
    let missing = fill_template("m={m}", r).expect_err("no m in a pgd row");
    assert!(missing.contains("{m}"), "{missing}");
    // A metric two ancestor kinds have is ambiguous too; the run's own wins.
    assert!(r.metric("train_minutes").expect("ok").is_some());
    assert!(r.metric("seconds").expect("own").is_some());
    let mut no_own = r.clone();
    no_own.chain[0].metrics.remove("seconds");
    no_own.chain[1].metrics.insert("seconds".into(), json!(1));
    assert!(no_own.metric("seconds").is_err());
    // A metric name with a dot that is no kind stays whole.
    let mut dotted = r.clone();
    dotted.chain[0]
        .metrics
        .insert("pgd_l2_0.5_acc".into(), json!(0.25));
    assert!(dotted.metric("pgd_l2_0.5_acc").expect("ok").is_some());
}

#[test]
fn a_column_no_run_has_is_an_error_listing_the_metrics() {
    let p = params(json!({"columns": ["clean_acc", "pgd_linf_4/255_acc"]}));
    let e = build(&p, &three_rows()).expect_err("missing column");
    assert!(
        e.contains("pgd_linf_4/255_acc") && e.contains("evaluate.clean_acc"),
        "{e}"
    );
    // Present in one run only: a dash elsewhere, no error.
    let mut runs = three_rows();
    runs[0].chain[0]
        .metrics
        .insert("pgd_linf_4/255_acc".into(), json!(0.4));
    let t = build(&p, &runs).expect("table");
    assert!(t.rows[1].cells[1].is_none());
    assert!(markdown(&t).contains("| – |"));
}

#[test]
fn unmatched_runs_get_labels_from_the_params_that_differ() {
    let runs: Vec<Run> = [1, 3, 5]
        .iter()
        .map(|m| {
            run(
                &m.to_string(),
                json!({"method": "emp_ssl", "attack": "free", "m": m, "eps": 8.0/255.0}),
                1.0,
                0.5,
                0.2,
            )
        })
        .collect();
    let t = build(&params(json!({"columns": ["clean_acc"]})), &runs).expect("table");
    let labels: Vec<&str> = t.rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels, ["m=1", "m=3", "m=5"]);
    let t = build(
        &params(json!({"columns": ["clean_acc"], "label": "eps {eps}, m {m}"})),
        &runs,
    )
    .expect("table");
    assert_eq!(t.rows[0].label, "eps 8/255, m 1");
    // Fractions in a rule match the stored number.
    let p = params(
        json!({"columns": ["clean_acc"], "rows": [{"match": {"eps": "8/255", "m": 5}, "label": "five"}]}),
    );
    let t = build(&p, &runs).expect("table");
    assert_eq!(t.rows[0].label, "five");
}

#[test]
fn map_and_list_params_label_the_runs_that_differ_in_them() {
    // finetune variants that differ only inside a map param (one keyed only when on) and in
    // a list; the evaluate params' `attacks`, a list of maps, never labels
    let ft = |id: &str, faithful: Value, milestones: Value| {
        let mut r = run(id, json!({"method": "acl"}), 1.0, 0.5, 0.2);
        r.chain[2].params =
            obj(json!({"mode": "aff", "faithful": faithful, "milestones": milestones}));
        r.chain[3].key = "p0".repeat(32);
        r.chain[0].params = obj(
            json!({"attacks": [{"norm": "linf", "eps": 8.0 / 255.0 * f64::from(id.len() as u8)}]}),
        );
        r
    };
    let runs = vec![
        ft("a", json!({"q31": true}), json!([15, 20])),
        ft("bb", json!({"q31": true, "q34b": true}), json!([15, 20])),
        ft("ccc", json!({"q31": false}), json!([4, 5])),
    ];
    let t = build(&params(json!({"columns": ["clean_acc"]})), &runs).expect("table");
    let labels: Vec<&str> = t.rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "faithful.q31=true, milestones=[15, 20]",
            "faithful.q31=true, faithful.q34b=true, milestones=[15, 20]",
            "faithful.q31=false, milestones=[4, 5]",
        ]
    );
    // a run that has none of the varying params says so instead of showing its key
    let runs = vec![
        ft("a", json!({"q31": true}), json!([15, 20])),
        ft("bb", json!({"q31": true, "q34b": true}), json!([15, 20])),
    ];
    let t = build(&params(json!({"columns": ["clean_acc"]})), &runs).expect("table");
    let labels: Vec<&str> = t.rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels, ["faithful.q34b unset", "faithful.q34b=true"]);
    // runs alike in every param keep kind and key
    let runs = vec![
        ft("a", json!({"q31": true}), json!([15, 20])),
        ft("a", json!({"q31": true}), json!([15, 20])),
    ];
    let t = build(&params(json!({"columns": ["clean_acc"]})), &runs).expect("table");
    assert_eq!(
        t.rows[0].label,
        format!("evaluate {}", &runs[0].key()[..12])
    );
    // a numeric field of a map param is swept and plotted like a plain one
    let runs: Vec<Run> = [1, 10, 100]
        .iter()
        .map(|l| {
            let mut r = run(&format!("{l}"), json!({"method": "acl"}), 1.0, 0.5, 0.2);
            r.chain[0].params =
                obj(json!({"defense": {"method": "reverse", "adaptive_lambda": l}}));
            r
        })
        .collect();
    let xs = swept(&runs, None).expect("swept");
    assert_eq!(
        xs,
        [(
            "evaluate.defense.adaptive_lambda".to_string(),
            "defense.adaptive_lambda".to_string()
        )]
    );
    let t = build(&params(json!({"columns": ["clean_acc"]})), &runs).expect("table");
    assert_eq!(t.rows[0].label, "defense.adaptive_lambda=1");
    let p = plots(&t, &runs, &xs).expect("plots");
    assert_eq!(p[0].file, "plot_defense.adaptive_lambda_clean_acc.svg");
}

#[test]
fn markdown_csv_html_and_latex_carry_marks_and_sources() {
    let t = build(&paper_params(), &three_rows()).expect("table");
    let md = markdown(&t);
    let expected = "### CIFAR-10\n\n\
        | Row | Clean | PGD(8/255) | Time (min) |\n\
        |:---|---:|---:|---:|\n\
        | Crop-based SimCLR-FreeAdv (2 crops, m=3, 167 epochs) | *70.25* | *24.50* | *157* |\n\
        | Patch-based EMP-SSL (16 patches, 30 epochs) | 61.00 | 16.95 | 530 |\n\
        | CF-AMC-SSL (16 crops, m=3, 10 epochs) | **75.88** | **33.34** | **97** |\n\
        \nBest value per column in **bold**, second best in *italic*. Accuracies in %.\n";
    assert_eq!(md, expected);

    let c = csv(&t);
    let lines: Vec<&str> = c.lines().collect();
    assert_eq!(lines.len(), 4);
    assert!(lines[0].starts_with("row,Clean,PGD(8/255),Time (min),mark,run_key,Clean source"));
    assert!(lines[3].starts_with("\"CF-AMC-SSL (16 crops, m=3, 10 epochs)\",75.88,33.34,97,best:Clean;best:PGD(8/255);best:Time (min),"));
    assert!(lines[3].contains(&"e2".repeat(32)), "run key in the row");
    assert!(
        lines[3].contains("\"\"steps\"\":20"),
        "attack config quoted: {}",
        lines[3]
    );
    assert!(lines[3].contains(&format!("pretrain {} train_minutes", "p2".repeat(32))));

    let h = html(&t, &[("a plot".into(), "<svg></svg>".into())]);
    assert!(h.starts_with("<!DOCTYPE html>"));
    assert!(h.contains("<td class=\"best\" title=\"evaluate e2e2"));
    assert!(h.contains("&quot;steps&quot;:20"));
    assert!(h.contains("class=\"second\""));
    assert!(h.contains("<svg></svg>"));
    assert!(!h.contains("http"), "self-contained: no external resources");

    let tex = latex(&t);
    assert!(tex.contains("\\textcolor{red}{75.88}"));
    assert!(tex.contains("\\textcolor{blue}{70.25}"));
    assert!(tex.contains("Row & Clean & PGD(8/255) & Time (min) \\\\"));
    assert_eq!(render::tex_escape("a_b & 50% #1"), "a\\_b \\& 50\\% \\#1");
}

#[test]
fn swept_params_are_found_and_plotted_deterministically() {
    // Two rows (methods) x m in {1, 3, 5}: m is swept, method is not (not numeric).
    let mut runs = Vec::new();
    for (i, method) in ["emp_ssl", "simclr"].iter().enumerate() {
        for m in [1, 3, 5] {
            runs.push(run(
                &format!("{i}{m}"),
                json!({"method": method, "attack": "free", "m": m, "n_views": if i == 0 {16} else {2}}),
                f64::from(m),
                0.5 + 0.01 * f64::from(m),
                0.2,
            ));
        }
    }
    let xs = swept(&runs, None).expect("swept");
    assert_eq!(xs, [("pretrain.m".to_string(), "m".to_string())]);
    // The paper's rows vary in several params at once but sweep none.
    assert!(swept(&three_rows(), None).expect("ok").is_empty());
    assert!(swept(&runs, Some(&["method".into()])).is_err());
    assert!(swept(&runs, Some(&["lr".into()])).is_err());

    let p = params(json!({"columns": ["clean_acc", {"pretrain.train_minutes": "Time"}]}));
    let t = build(&p, &runs).expect("table");
    let a = plots(&t, &runs, &xs).expect("plots");
    let b = plots(&t, &runs, &xs).expect("plots");
    assert_eq!(a.len(), 2);
    assert_eq!(a[0].file, "plot_m_clean_acc.svg");
    assert_eq!(a[1].file, "plot_m_pretrain.train_minutes.svg");
    assert_eq!(a[0].svg, b[0].svg, "same input, same bytes");
    assert!(a[0].svg.starts_with("<svg"));
    assert!(
        a[0].svg.contains("method=emp_ssl, n_views=16"),
        "legend names the series"
    );
    assert!(
        a[0].svg.matches("<circle").count() >= 6,
        "one marker per point"
    );
}

#[test]
fn reals_print_as_the_papers_write_them() {
    assert_eq!(format_real(8.0 / 255.0), "8/255");
    assert_eq!(format_real(3.0), "3");
    assert_eq!(format_real(0.5), "0.5");
    assert_eq!(format_real(0.01), "0.01");
    assert_eq!(format_real(-2.0), "-2");
    // Only radii become fractions: 0.4 = 102/255 and 0.2 = 51/255, but a coreset fraction or
    // TCR's epsilon is not a radius.
    use super::table::format_value;
    assert_eq!(format_value("rcs_fraction", &json!(0.4)), "0.4");
    assert_eq!(format_value("pretrain.tcr_eps", &json!(0.2)), "0.2");
    assert_eq!(format_value("pretrain.eps", &json!(8.0 / 255.0)), "8/255");
    assert_eq!(format_value("alpha", &json!(2.0 / 255.0)), "2/255");
    assert_eq!(format_value("m", &json!(3)), "3");
    let runs = [run(
        "a",
        json!({"rcs_fraction": 0.4, "eps": 0.4}),
        1.0,
        0.5,
        0.2,
    )];
    let t = build(
        &params(json!({"columns": ["clean_acc"], "label": "{rcs_fraction} at {eps}"})),
        &runs,
    )
    .expect("table");
    assert_eq!(t.rows[0].label, "0.4 at 102/255");
}

/// A rule's object value matches the fields it writes: `{defense: {method: random}}` picks the
/// run whose `defense` param has that method, whatever its other fields.
#[test]
fn object_rules_match_the_fields_they_name() {
    let mut runs = three_rows();
    for (r, method) in runs.iter_mut().zip(["reverse", "random", "reverse"]) {
        r.chain[0].params.insert(
            "defense".into(),
            json!({"method": method, "eps": 16.0 / 255.0, "steps": 40}),
        );
    }
    let p = params(json!({
        "columns": [{"clean_acc": "Clean"}],
        "rows": [
            {"match": {"defense": {"method": "random"}}, "label": "noise"},
            {"match": {"defense": {"method": "reverse", "steps": 40}}, "label": "reversal"},
            {"match": {"defense": {"method": "reverse", "steps": 10}}, "label": "never"}
        ]
    }));
    let t = build(&p, &runs).expect("table");
    let labels: Vec<&str> = t.rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(labels, ["noise", "reversal", "reversal"]);
}
