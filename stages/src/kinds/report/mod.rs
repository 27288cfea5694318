//! `report`: the paper table from evaluate (and pretrain / finetune) nodes (METHODS.md 13).
//!
//! Inputs: `runs`, any number of nodes, usually `eval[*]`. Each run becomes one row. The
//! report follows each run's provenance through the store (`manifest.inputs`, breadth first),
//! so a row sees the params and `metrics.json` of its evaluate node *and* of the finetune,
//! pretrain and dataset nodes it came from. It only reads; it never recomputes a number.
//!
//! # Params
//! - `columns` (required): a list; each item is a metric name, `{metric: header}`, or
//!   `{metric, header, higher_is_better, percent, precision}`. A metric is looked up in the
//!   run's own `metrics.json` first, then in the one ancestor kind that has it; write
//!   `pretrain.train_minutes` to name the kind (an unqualified name that two ancestor kinds
//!   have is an error, not a guess). Defaults: `higher_is_better` false for names with
//!   `minutes`, `seconds`, `time`, `loss` or `err`, else true; `percent` (value x 100) for
//!   `*_acc`; `precision` from the report's `precision` (2).
//! - `rows`: a list of `{match: {param: value, ...}, label: "template"}`, in display order. A
//!   run takes the first rule whose params all match (`views: crop`, `pretrain.m: 3`,
//!   fractions such as `8/255` compare by value). Labels fill `{param}` / `{kind.param}` from
//!   the run's provenance: `"Crop-based EMP-FreeAdv ({pretrain.n_views} crops, m={m},
//!   {pretrain.epochs} epochs)"`. Runs no rule matches come after, labelled by `label`, or by
//!   default with the params that differ between the runs (`m=3, n_views=16`; fields of map
//!   params by their dotted names, `faithful.q34b=true`; `q34b unset` for a run that has
//!   none of them).
//! - `title`, `sort` (a column's metric: best first), `precision`, `plots` (params to plot on
//!   the x axis; default: every swept param, see [`plot`]; `[]` for none).
//!
//! Marks: per column the best value, and with three or more rows the second best, compared
//! as shown (after rounding); ties share the mark. Markdown bold / italic, HTML and LaTeX red /
//! blue, CSV a `mark` field.
//!
//! # Outputs
//! `table.md`, `table.csv` (with each cell's source: kind, key, metric and attack config),
//! `table.html` (self-contained: the table with a tooltip per cell, and the plots),
//! `table.tex` (booktabs + xcolor), `table.json` (everything, with each row's provenance) and
//! one `plot_<param>_<metric>.svg` per swept param and column. The same inputs give the same
//! bytes.

mod plot;
mod render;
mod table;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet, VecDeque};

use pipe_engine::{
    Artifact, BoxError, NormalizeCtx, ParamError, Slot, Slots, StageCtx, TypedStage,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use plot::{Plot, plots, swept};
pub use render::{csv, html, latex, markdown};
pub use table::{Cell, Link, Mark, Row, Run, Source, Table, build, fill_template, format_real};

/// The `report` kind.
pub struct Report;

/// One column.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Value")]
pub struct Column {
    /// Metric name (`clean_acc`, `pretrain.train_minutes`).
    pub metric: String,
    /// Header text (default: the metric name).
    pub header: Option<String>,
    /// Whether bigger is better (default from the name).
    pub higher_is_better: Option<bool>,
    /// Show x 100 (default for `*_acc`).
    pub percent: Option<bool>,
    /// Digits after the point (default: the report's `precision`).
    pub precision: Option<u32>,
}

/// The long form of a column.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnFull {
    metric: String,
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    higher_is_better: Option<bool>,
    #[serde(default)]
    percent: Option<bool>,
    #[serde(default)]
    precision: Option<u32>,
}

impl TryFrom<Value> for Column {
    type Error = String;
    fn try_from(v: Value) -> Result<Self, String> {
        let expected = "expected a metric name, `{metric: header}` or `{metric: ..., header: ..., \
                        higher_is_better: ..., percent: ..., precision: ...}`";
        match v {
            Value::String(metric) => Ok(Column {
                metric,
                header: None,
                higher_is_better: None,
                percent: None,
                precision: None,
            }),
            Value::Object(m) if m.contains_key("metric") => {
                let f: ColumnFull =
                    serde_json::from_value(Value::Object(m)).map_err(|e| e.to_string())?;
                Ok(Column {
                    metric: f.metric,
                    header: f.header,
                    higher_is_better: f.higher_is_better,
                    percent: f.percent,
                    precision: f.precision,
                })
            }
            Value::Object(m) if m.len() == 1 => {
                let (metric, header) = m.into_iter().next().expect("one entry");
                match header {
                    Value::String(h) => Ok(Column {
                        metric,
                        header: Some(h),
                        higher_is_better: None,
                        percent: None,
                        precision: None,
                    }),
                    other => Err(format!(
                        "the header of `{metric}` must be text, got {other}"
                    )),
                }
            }
            other => Err(format!("{expected}, got {other}")),
        }
    }
}

/// A row rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowRule {
    /// Params a run must have (all of them).
    #[serde(rename = "match", default)]
    pub when: BTreeMap<String, Value>,
    /// Label template.
    pub label: String,
}

/// Params of `report`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportParams {
    /// Caption.
    #[serde(default)]
    pub title: Option<String>,
    /// Columns, in order.
    pub columns: Vec<Column>,
    /// Row rules, in display order.
    #[serde(default)]
    pub rows: Vec<RowRule>,
    /// Label template for runs no rule matches.
    #[serde(default)]
    pub label: Option<String>,
    /// A column's metric to sort by, best first.
    #[serde(default)]
    pub sort: Option<String>,
    /// Digits after the point.
    #[serde(default = "default_precision")]
    pub precision: u32,
    /// Params to plot against each column (default: every swept param).
    #[serde(default)]
    pub plots: Option<Vec<String>>,
}

fn default_precision() -> u32 {
    2
}

impl TypedStage for Report {
    const KIND: &'static str = "report";
    // 2: nested params (`faithful.q34b`, `defense.adaptive_lambda`) and lists label and plot
    // runs no row rule names; a run with none of the varying params says which are unset
    const VERSION: u32 = 2;
    type Params = ReportParams;

    fn inputs() -> Slots {
        const S: &[Slot] = &[Slot::required("runs").many()];
        Slots::Fixed(S)
    }

    fn check(p: &ReportParams) -> Vec<ParamError> {
        let mut errors = Vec::new();
        if p.columns.is_empty() {
            errors.push(ParamError::new("columns", "expected at least one column"));
        }
        let mut seen = HashSet::new();
        for (i, c) in p.columns.iter().enumerate() {
            if c.metric.trim().is_empty() {
                errors.push(ParamError::new(
                    format!("columns[{i}]"),
                    "empty metric name",
                ));
            } else if !seen.insert(c.metric.as_str()) {
                errors.push(ParamError::new(
                    format!("columns[{i}]"),
                    format!("`{}` is listed twice", c.metric),
                ));
            }
            if c.precision.is_some_and(|d| d > 12) {
                errors.push(ParamError::new(
                    format!("columns[{i}].precision"),
                    "expected 0 to 12",
                ));
            }
        }
        if p.precision > 12 {
            errors.push(ParamError::new(
                "precision",
                format!("expected 0 to 12, got {}", p.precision),
            ));
        }
        if let Some(s) = &p.sort
            && !p.columns.iter().any(|c| &c.metric == s)
        {
            errors.push(ParamError::new(
                "sort",
                format!("`{s}` is not one of the columns' metrics"),
            ));
        }
        for (i, r) in p.rows.iter().enumerate() {
            if let Err(e) = check_template(&r.label) {
                errors.push(ParamError::new(format!("rows[{i}].label"), e));
            }
        }
        if let Some(l) = &p.label
            && let Err(e) = check_template(l)
        {
            errors.push(ParamError::new("label", e));
        }
        errors
    }

    fn canonicalize(
        mut p: ReportParams,
        _ctx: &NormalizeCtx<'_>,
    ) -> Result<ReportParams, Vec<ParamError>> {
        for c in &mut p.columns {
            c.header.get_or_insert_with(|| c.metric.clone());
            c.higher_is_better
                .get_or_insert_with(|| table::default_higher_is_better(&c.metric));
            c.percent
                .get_or_insert_with(|| table::default_percent(&c.metric));
            c.precision.get_or_insert(p.precision);
        }
        Ok(p)
    }

    fn outputs(_p: &ReportParams) -> Vec<String> {
        [
            "table.md",
            "table.csv",
            "table.html",
            "table.tex",
            "table.json",
        ]
        .map(String::from)
        .to_vec()
    }

    fn run(p: &ReportParams, ctx: &mut StageCtx<'_>) -> Result<(), BoxError> {
        let inputs = ctx.inputs("runs").to_vec();
        if inputs.is_empty() {
            return Err("input `runs` holds no nodes".into());
        }
        let mut runs = Vec::new();
        for a in &inputs {
            runs.push(provenance(ctx, a)?);
        }
        let table = build(p, &runs)?;
        let xs = swept(&runs, p.plots.as_deref())?;
        let plots = plots(&table, &runs, &xs)?;
        let write = |name: &str, text: &str| -> Result<(), BoxError> {
            let path = ctx.out_path(name);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()).into())
        };
        write("table.md", &markdown(&table))?;
        write("table.csv", &csv(&table))?;
        write("table.tex", &latex(&table))?;
        let figures: Vec<(String, String)> = plots
            .iter()
            .map(|p| (p.caption.clone(), p.svg.clone()))
            .collect();
        write("table.html", &html(&table, &figures))?;
        for pl in &plots {
            write(&pl.file, &pl.svg)?;
        }
        crate::params::write_json(&ctx.out_path("table.json"), &serde_json::to_value(&table)?)?;
        ctx.log(format!(
            "{} rows x {} columns, {} plots\n{}",
            table.rows.len(),
            table.columns.len(),
            plots.len(),
            markdown(&table)
        ));
        Ok(())
    }
}

/// Checks the braces of a label template (names are checked against the runs at run time).
fn check_template(t: &str) -> Result<(), String> {
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
            }
            '{' if !chars.by_ref().any(|c| c == '}') => {
                return Err(format!("unclosed `{{` in label `{t}`"));
            }
            '}' => return Err(format!("unmatched `}}` in label `{t}` (write `}}}}`)")),
            _ => {}
        }
    }
    Ok(())
}

/// The run of an input: it and its ancestors from the store, breadth first, each key once.
fn provenance(ctx: &StageCtx<'_>, start: &Artifact) -> Result<Run, BoxError> {
    let mut chain = Vec::new();
    let mut seen = HashSet::from([start.key]);
    let mut queue = VecDeque::from([start.clone()]);
    while let Some(e) = queue.pop_front() {
        for keys in e.manifest.meta.inputs.values() {
            for k in keys {
                if !seen.insert(*k) {
                    continue;
                }
                match ctx.entry(k)? {
                    Some(a) => queue.push_back(a),
                    None => ctx.log(format!(
                        "warning: input {} of {} {} is no longer in the store; its params and \
                         metrics are not in the report",
                        k.short(),
                        e.manifest.meta.kind,
                        e.key.short()
                    )),
                }
            }
        }
        chain.push(link(&e)?);
    }
    Ok(Run { chain })
}

fn link(e: &Artifact) -> Result<Link, BoxError> {
    let metrics = if e.manifest.files.contains_key("metrics.json") {
        let path = e.file("metrics.json")?;
        let bytes = std::fs::read(&path).map_err(|err| format!("{}: {err}", path.display()))?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(format!("{}: not a JSON object", path.display()).into()),
            Err(err) => return Err(format!("{}: {err}", path.display()).into()),
        }
    } else {
        Map::new()
    };
    Ok(Link {
        kind: e.manifest.meta.kind.clone(),
        key: e.key.hex(),
        params: e
            .manifest
            .meta
            .params
            .as_object()
            .cloned()
            .unwrap_or_default(),
        metrics,
    })
}
