//! The report's data model: runs with their provenance, and the table built from them
//! (labels, cells, marks, sources). Engine-independent: the stage gathers [`Run`]s from the
//! store, tests build them by hand.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Map, Value};

use super::{Column, ReportParams, RowRule};
use crate::params::parse_real;

/// Kind names a qualified name (`pretrain.epochs`) may start with.
const KINDS: [&str; 8] = [
    "dataset",
    "pretrain",
    "finetune",
    "evaluate",
    "attack_dataset",
    "shell",
    "report",
    "test_time_defense",
];

/// One entry of a run's provenance.
#[derive(Clone, Debug, Serialize)]
pub struct Link {
    /// Its kind.
    pub kind: String,
    /// Its key (hex).
    pub key: String,
    /// Its resolved params (an object).
    pub params: Map<String, Value>,
    /// Its `metrics.json` (empty when it has none).
    #[serde(skip)]
    pub metrics: Map<String, Value>,
}

/// A row's provenance: the input node itself first, then its ancestors, nearest first
/// (breadth first over `manifest.inputs`, each key once).
#[derive(Clone, Debug)]
pub struct Run {
    /// The chain; never empty.
    pub chain: Vec<Link>,
}

/// Where a name was found.
enum Found<'a> {
    Yes(&'a Link, &'a Value),
    No,
}

/// Splits `pretrain.epochs` into (`Some("pretrain")`, `epochs`); a name whose prefix is no
/// kind (`pgd_l2_0.5_acc`) stays whole.
fn split_qualified(name: &str) -> (Option<&str>, &str) {
    match name.split_once('.') {
        Some((k, rest)) if KINDS.contains(&k) => (Some(k), rest),
        _ => (None, name),
    }
}

impl Run {
    /// The key of the input node (the row's identity).
    pub fn key(&self) -> &str {
        &self.chain[0].key
    }

    /// The first link of each kind, in chain order.
    fn firsts(&self) -> Vec<&Link> {
        let mut seen = BTreeSet::new();
        self.chain
            .iter()
            .filter(|l| seen.insert(l.kind.as_str()))
            .collect()
    }

    /// Looks `name` up in `field` of the links: `kind.name` in the first link of that kind;
    /// a bare name in the run's own node first, else in the one ancestor kind that has it.
    fn lookup<'a>(
        &'a self,
        name: &str,
        field: impl Fn(&'a Link) -> &'a Map<String, Value>,
        what: &str,
    ) -> Result<Found<'a>, String> {
        let (kind, bare) = split_qualified(name);
        if let Some(kind) = kind {
            return Ok(self
                .chain
                .iter()
                .find(|l| l.kind == kind)
                .and_then(|l| field(l).get(bare).map(|v| Found::Yes(l, v)))
                .unwrap_or(Found::No));
        }
        let own = &self.chain[0];
        if let Some(v) = field(own).get(name) {
            return Ok(Found::Yes(own, v));
        }
        let hits: Vec<(&Link, &Value)> = self
            .firsts()
            .into_iter()
            .skip(1)
            .filter_map(|l| field(l).get(name).map(|v| (l, v)))
            .collect();
        match hits.as_slice() {
            [] => Ok(Found::No),
            [(l, v)] => Ok(Found::Yes(l, v)),
            many => Err(format!(
                "the {what} `{name}` is ambiguous in the provenance of {} {}: {}; qualify it",
                own.kind,
                short(&own.key),
                many.iter()
                    .map(|(l, v)| format!("`{}.{name}` ({})", l.kind, format_value(name, v)))
                    .collect::<Vec<_>>()
                    .join(" or ")
            )),
        }
    }

    /// A param of the run or an ancestor (see [`Run::lookup`]).
    pub fn param(&self, name: &str) -> Result<Option<&Value>, String> {
        Ok(match self.lookup(name, |l| &l.params, "param")? {
            Found::Yes(_, v) => Some(v),
            Found::No => None,
        })
    }

    /// A metric with the link it came from.
    pub fn metric(&self, name: &str) -> Result<Option<(&Link, &Value)>, String> {
        Ok(match self.lookup(name, |l| &l.metrics, "metric")? {
            Found::Yes(l, v) => Some((l, v)),
            Found::No => None,
        })
    }

    /// Every param of the first link of each kind, as `kind.param`: the fields of a map param
    /// as `kind.param.field` (`finetune.faithful.q34b`, `evaluate.defense.adaptive_lambda`),
    /// lists of scalars as they are (`finetune.milestones`); lists holding maps (`attacks`)
    /// are left out.
    pub fn flat_params(&self) -> BTreeMap<String, Value> {
        fn flatten(prefix: String, v: &Value, out: &mut BTreeMap<String, Value>) {
            match v {
                Value::Object(m) => {
                    for (k, v) in m {
                        flatten(format!("{prefix}.{k}"), v, out);
                    }
                }
                Value::Array(a) if a.iter().any(|x| x.is_object() || x.is_array()) => {}
                _ => {
                    out.insert(prefix, v.clone());
                }
            }
        }
        let mut out = BTreeMap::new();
        for l in self.firsts() {
            for (k, v) in &l.params {
                flatten(format!("{}.{k}", l.kind), v, &mut out);
            }
        }
        out
    }
}

/// First 12 hex digits of a key.
pub fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

/// Param names whose values are perturbation radii or step sizes in pixel units, shown as
/// `k/255` when they are multiples of 1/255 (`eps`, `alpha`, `pretrain.eps`, ...). Any other
/// param keeps its decimal form: `rcs_fraction: 0.4` and `tcr_eps: 0.2` are not radii even though
/// 0.4 = 102/255.
fn is_radius(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    matches!(last, "eps" | "alpha" | "epsilon" | "step_size")
}

/// A param value as a label shows it: integers without a fraction, radii (see [`is_radius`]) as
/// `k/255`, other reals in their shortest round-trip form, strings bare.
pub fn format_value(name: &str, v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() && is_radius(name) => format_real(x),
            Some(x) if n.is_f64() => format_plain(x),
            _ => n.to_string(),
        },
        Value::Array(a) => format!(
            "[{}]",
            a.iter()
                .map(|x| format_value(name, x))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// `3` for 3.0, else the shortest round-trip form.
fn format_plain(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        return format!("{}", x as i64);
    }
    format!("{x}")
}

/// A radius: `3` for 3.0, `8/255` for 0.0313…, else the shortest round-trip form.
pub fn format_real(x: f64) -> String {
    let k = x * 255.0;
    if x.fract() != 0.0 && x.abs() < 1.0 && (k - k.round()).abs() < 1e-9 && k.round() != 0.0 {
        return format!("{}/255", k.round() as i64);
    }
    format_plain(x)
}

/// Whether a param value equals what a row rule asks for: numbers within 1e-12 (relative),
/// a fraction string against a number by value, anything else by JSON equality.
fn value_matches(actual: &Value, wanted: &Value) -> bool {
    let num = |v: &Value| match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => parse_real(s).ok(),
        _ => None,
    };
    if (actual.is_number() || wanted.is_number())
        && let (Some(a), Some(b)) = (num(actual), num(wanted))
    {
        return (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0);
    }
    // an object matches when every field written in the rule matches (`{defense: {method:
    // random}}` picks the runs whose `defense` param has that method)
    if let (Value::Object(a), Value::Object(w)) = (actual, wanted) {
        return w
            .iter()
            .all(|(k, wv)| a.get(k).is_some_and(|av| value_matches(av, wv)));
    }
    actual == wanted
}

/// Fills `{name}` / `{kind.name}` placeholders from the run's params; `{{` and `}}` are braces.
///
/// # Errors
/// An unknown or ambiguous name, or an unclosed brace.
pub fn fill_template(template: &str, run: &Run) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let c = rest.as_bytes()[i];
        let after = &rest[i + 1..];
        if after.as_bytes().first() == Some(&c) {
            out.push(c as char);
            rest = &after[1..];
            continue;
        }
        if c == b'}' {
            return Err(format!(
                "unmatched `}}` in label `{template}` (write `}}}}`)"
            ));
        }
        let Some(j) = after.find('}') else {
            return Err(format!("unclosed `{{` in label `{template}`"));
        };
        let name = after[..j].trim();
        match run.param(name)? {
            Some(v) => out.push_str(&format_value(name, v)),
            None => {
                return Err(format!(
                    "label `{template}` names `{{{name}}}`, a param that {} {} and its inputs do \
                     not have",
                    run.chain[0].kind,
                    short(run.key())
                ));
            }
        }
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// How a cell is marked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mark {
    /// Best of its column.
    Best,
    /// Second best.
    Second,
    /// Neither.
    None,
}

/// Where a cell's number came from.
#[derive(Clone, Debug, Serialize)]
pub struct Source {
    /// Kind of the node whose `metrics.json` holds it.
    pub kind: String,
    /// Its key.
    pub key: String,
    /// The metric name in that file.
    pub metric: String,
    /// The attack config stored beside the number (evaluate), with the head that was attacked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
}

impl Source {
    /// `evaluate 1a2b3c4d5e6f pgd_linf_8/255_acc {"alpha":…}`: one line for CSV and tooltips.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {} {}", self.kind, self.key, self.metric);
        if let Some(c) = &self.config {
            s.push(' ');
            s.push_str(&c.to_string());
        }
        s
    }
}

/// One cell.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    /// The number as stored.
    pub value: f64,
    /// The number as shown (scaled to % where the column says so, rounded).
    pub shown: String,
    /// Best / second-best mark.
    pub mark: Mark,
    /// Provenance.
    pub source: Source,
}

/// One row.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Its label.
    pub label: String,
    /// Key of the input node it comes from.
    pub run: String,
    /// One cell per column (`None`: the metric is not in this run's provenance).
    pub cells: Vec<Option<Cell>>,
    /// Every node of its provenance (kind, key, params).
    pub provenance: Vec<Link>,
}

/// The whole table.
#[derive(Clone, Debug, Serialize)]
pub struct Table {
    /// Caption.
    pub title: Option<String>,
    /// Columns with every default resolved.
    pub columns: Vec<Column>,
    /// Rows in display order.
    pub rows: Vec<Row>,
}

impl Column {
    /// Precision, `percent` and direction resolved (after canonicalization they always are).
    pub fn precision_or(&self, default: u32) -> u32 {
        self.precision.unwrap_or(default)
    }
    /// Whether bigger values are better.
    pub fn higher(&self) -> bool {
        self.higher_is_better
            .unwrap_or_else(|| default_higher_is_better(&self.metric))
    }
    /// Whether the value is a fraction shown in %.
    pub fn is_percent(&self) -> bool {
        self.percent
            .unwrap_or_else(|| default_percent(&self.metric))
    }
    /// The header text.
    pub fn title(&self) -> &str {
        self.header.as_deref().unwrap_or(&self.metric)
    }
}

/// Times, losses and errors are better small; anything else (accuracies) better large.
pub fn default_higher_is_better(metric: &str) -> bool {
    let m = metric.to_ascii_lowercase();
    !["minutes", "seconds", "time", "loss", "err"]
        .iter()
        .any(|w| m.contains(w))
}

/// Accuracies (`*_acc`) are fractions, shown in %.
pub fn default_percent(metric: &str) -> bool {
    metric.ends_with("_acc") || metric.ends_with("_accuracy")
}

/// Builds the table from the runs (in input order).
///
/// # Errors
/// An ambiguous name, a label naming a missing param, a metric that is not a number, a column
/// found in no run.
pub fn build(p: &ReportParams, runs: &[Run]) -> Result<Table, String> {
    // Rule order, then input order; unmatched runs after, in input order.
    let mut placed: Vec<(usize, usize, String)> = Vec::new();
    let auto = auto_labels(runs);
    for (i, run) in runs.iter().enumerate() {
        let rule = match_rule(&p.rows, run)?;
        let label = match (rule, &p.label) {
            (Some((_, r)), _) => fill_template(&r.label, run)?,
            (None, Some(t)) => fill_template(t, run)?,
            (None, None) => auto[i].clone(),
        };
        placed.push((rule.map_or(usize::MAX, |(j, _)| j), i, label));
    }
    placed.sort_by_key(|(rule, i, _)| (*rule, *i));

    let mut rows = Vec::new();
    for (_, i, label) in placed {
        let run = &runs[i];
        let mut cells = Vec::new();
        for c in &p.columns {
            cells.push(cell(c, run, p.precision)?);
        }
        rows.push(Row {
            label,
            run: run.key().to_string(),
            cells,
            provenance: run.chain.clone(),
        });
    }
    for (j, c) in p.columns.iter().enumerate() {
        if !rows.is_empty() && rows.iter().all(|r| r.cells[j].is_none()) {
            let available: BTreeSet<String> = runs
                .iter()
                .flat_map(|r| {
                    r.chain.iter().flat_map(|l| {
                        l.metrics
                            .iter()
                            .filter(|(_, v)| v.is_number())
                            .map(|(k, _)| format!("{}.{k}", l.kind))
                    })
                })
                .collect();
            return Err(format!(
                "column `{}`: no run has this metric; numeric metrics in the runs' provenance: {}",
                c.metric,
                available.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        mark_column(&mut rows, j, c.higher());
    }
    if let Some(by) = &p.sort {
        let j = p
            .columns
            .iter()
            .position(|c| &c.metric == by)
            .ok_or_else(|| format!("sort: `{by}` is not one of the columns' metrics"))?;
        let higher = p.columns[j].higher();
        let rank = |r: &Row| {
            r.cells[j]
                .as_ref()
                .map(shown_value)
                .map(|v| if higher { -v } else { v })
                .unwrap_or(f64::INFINITY)
        };
        rows.sort_by(|a, b| rank(a).total_cmp(&rank(b)));
    }
    Ok(Table {
        title: p.title.clone(),
        columns: p.columns.clone(),
        rows,
    })
}

fn match_rule<'a>(rules: &'a [RowRule], run: &Run) -> Result<Option<(usize, &'a RowRule)>, String> {
    for (j, r) in rules.iter().enumerate() {
        let mut all = true;
        for (name, wanted) in &r.when {
            match run.param(name)? {
                Some(v) if value_matches(v, wanted) => {}
                _ => {
                    all = false;
                    break;
                }
            }
        }
        if all {
            return Ok(Some((j, r)));
        }
    }
    Ok(None)
}

fn cell(c: &Column, run: &Run, precision: u32) -> Result<Option<Cell>, String> {
    let Some((link, v)) = run.metric(&c.metric)? else {
        return Ok(None);
    };
    let value = v.as_f64().ok_or_else(|| {
        format!(
            "column `{}`: {} {} has `{}` = {v}, not a number",
            c.metric,
            link.kind,
            short(&link.key),
            split_qualified(&c.metric).1
        )
    })?;
    let bare = split_qualified(&c.metric).1;
    let config = link
        .metrics
        .get("attacks")
        .and_then(|a| a.get(bare))
        .map(|a| {
            let mut cfg = a.clone();
            if let (Value::Object(m), Some(h)) = (&mut cfg, link.metrics.get("head")) {
                m.insert("head".into(), h.clone());
            }
            cfg
        });
    let scaled = if c.is_percent() { value * 100.0 } else { value };
    let prec = c.precision_or(precision) as usize;
    Ok(Some(Cell {
        value,
        shown: format!("{scaled:.prec$}"),
        mark: Mark::None,
        source: Source {
            kind: link.kind.clone(),
            key: link.key.clone(),
            metric: bare.to_string(),
            config,
        },
    }))
}

fn shown_value(c: &Cell) -> f64 {
    c.shown.parse().unwrap_or(f64::NAN)
}

/// Marks the best value of column `j` (every row that shows it) and, with 3 or more values,
/// the second best. Compares the numbers as shown, so equal-looking cells get equal marks.
fn mark_column(rows: &mut [Row], j: usize, higher: bool) {
    let mut vals: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.cells[j].as_ref().map(shown_value))
        .filter(|v| v.is_finite())
        .collect();
    if vals.len() < 2 {
        return;
    }
    let n = vals.len();
    vals.sort_by(|a, b| {
        if higher {
            b.total_cmp(a)
        } else {
            a.total_cmp(b)
        }
    });
    vals.dedup();
    let best = vals[0];
    let second = if n >= 3 { vals.get(1).copied() } else { None };
    for r in rows.iter_mut() {
        if let Some(c) = r.cells[j].as_mut() {
            let v = shown_value(c);
            c.mark = if v == best {
                Mark::Best
            } else if Some(v) == second {
                Mark::Second
            } else {
                Mark::None
            };
        }
    }
}

/// The params that differ between runs (`kind.param`), and how each is displayed: bare when
/// no other varying param has the same name.
pub fn varying_params(runs: &[Run]) -> Vec<(String, String)> {
    let flats: Vec<BTreeMap<String, Value>> = runs.iter().map(Run::flat_params).collect();
    let keys: BTreeSet<&String> = flats.iter().flat_map(|f| f.keys()).collect();
    let varying: Vec<String> = keys
        .into_iter()
        .filter(|k| {
            let first = flats[0].get(*k);
            flats.iter().any(|f| f.get(*k) != first)
        })
        .cloned()
        .collect();
    let bare = |k: &str| {
        k.split_once('.')
            .map_or(k.to_string(), |(_, b)| b.to_string())
    };
    varying
        .iter()
        .map(|k| {
            let b = bare(k);
            let unique = varying.iter().filter(|o| bare(o) == b).count() == 1;
            (k.clone(), if unique { b } else { k.clone() })
        })
        .collect()
}

/// Labels for runs no rule names: `name=value` of every param that differs between the runs
/// (`m=3, n_views=16`); for a run that has none of them (each is set only on other runs:
/// params keyed only away from their default, or that do not apply), `name unset` for each;
/// the run's kind and key when all runs are alike.
fn auto_labels(runs: &[Run]) -> Vec<String> {
    let varying = varying_params(runs);
    runs.iter()
        .map(|r| {
            let flat = r.flat_params();
            let parts: Vec<String> = varying
                .iter()
                .filter_map(|(k, shown)| {
                    flat.get(k)
                        .map(|v| format!("{shown}={}", format_value(k, v)))
                })
                .collect();
            if !parts.is_empty() {
                parts.join(", ")
            } else if varying.is_empty() {
                format!("{} {}", r.chain[0].kind, short(r.key()))
            } else {
                varying
                    .iter()
                    .map(|(_, shown)| format!("{shown} unset"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        })
        .collect()
}
