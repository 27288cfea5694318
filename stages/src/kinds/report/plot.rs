//! Plots of each swept param against each column, as SVG (plotters' SVG backend: text is
//! emitted as `<text>`, no font files are read, output is deterministic).
//!
//! A param is *swept* when it is numeric, differs between the runs, and some group of runs
//! that agree on every other differing param has two or more values of it: a sweep over `m`
//! crossed with the rows of a table gives one line per row, with `m` on the x axis.

use std::collections::BTreeMap;

use plotters::prelude::*;
use serde_json::Value;

use super::table::{Run, Table, format_value, varying_params};

/// One plot: file name and SVG text.
pub struct Plot {
    /// `plot_<param>_<metric>.svg`.
    pub file: String,
    /// Caption (`pgd_linf_8/255_acc vs m`).
    pub caption: String,
    /// The SVG.
    pub svg: String,
}

/// Line colours, in order (colour-blind safe Okabe-Ito palette).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(240, 228, 66),
];

/// Keeps file names to `[A-Za-z0-9_.-]`.
fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The swept params (`kind.param`, display name). With `wanted`, exactly those (bare or
/// qualified names), else every param that qualifies (see the module docs).
///
/// # Errors
/// A wanted name that does not vary or is not numeric.
pub fn swept(runs: &[Run], wanted: Option<&[String]>) -> Result<Vec<(String, String)>, String> {
    let varying = varying_params(runs);
    let flats: Vec<BTreeMap<String, Value>> = runs.iter().map(Run::flat_params).collect();
    let numeric = |k: &str| flats.iter().filter_map(|f| f.get(k)).all(Value::is_number);
    let is_swept = |k: &str| {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for f in &flats {
            let Some(x) = f.get(k) else { continue };
            let rest: Vec<String> = varying
                .iter()
                .filter(|(o, _)| o != k)
                .map(|(o, _)| f.get(o).map_or("-".into(), Value::to_string))
                .collect();
            let xs = groups.entry(rest.join("\u{1f}")).or_default();
            let x = x.to_string();
            if !xs.contains(&x) {
                xs.push(x);
            }
        }
        groups.values().any(|xs| xs.len() >= 2)
    };
    match wanted {
        None => Ok(varying
            .iter()
            .filter(|(k, _)| numeric(k) && is_swept(k))
            .cloned()
            .collect()),
        Some(names) => names
            .iter()
            .map(|n| {
                let hit = varying
                    .iter()
                    .find(|(k, shown)| k == n || shown == n || k.ends_with(&format!(".{n}")));
                match hit {
                    Some((k, s)) if numeric(k) => Ok((k.clone(), s.clone())),
                    Some((k, _)) => Err(format!("plots: `{k}` is not numeric")),
                    None => Err(format!(
                        "plots: `{n}` does not vary between the runs (params that do: {})",
                        varying
                            .iter()
                            .map(|(_, s)| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                }
            })
            .collect(),
    }
}

/// One plot per (swept param, column).
///
/// # Errors
/// A plotting failure (should not happen with the SVG backend).
pub fn plots(table: &Table, runs: &[Run], xs: &[(String, String)]) -> Result<Vec<Plot>, String> {
    let varying = varying_params(runs);
    let by_key: BTreeMap<&str, &Run> = runs.iter().map(|r| (r.key(), r)).collect();
    let mut out = Vec::new();
    for (x_key, x_name) in xs {
        for (j, col) in table.columns.iter().enumerate() {
            // Series: rows grouped by the other varying params.
            let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
            for row in &table.rows {
                let (Some(run), Some(cell)) = (by_key.get(row.run.as_str()), &row.cells[j]) else {
                    continue;
                };
                let flat = run.flat_params();
                let Some(x) = flat.get(x_key).and_then(Value::as_f64) else {
                    continue;
                };
                let y: f64 = cell.shown.parse().unwrap_or(cell.value);
                let name: Vec<String> = varying
                    .iter()
                    .filter(|(k, _)| k != x_key)
                    .filter_map(|(k, s)| flat.get(k).map(|v| format!("{s}={}", format_value(k, v))))
                    .collect();
                series.entry(name.join(", ")).or_default().push((x, y));
            }
            if series.values().all(|p| p.is_empty()) {
                continue;
            }
            for pts in series.values_mut() {
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            let caption = format!("{} vs {x_name}", col.title());
            let svg = draw(&caption, x_name, col.title(), &series)?;
            out.push(Plot {
                file: format!("plot_{}_{}.svg", file_safe(x_name), file_safe(&col.metric)),
                caption,
                svg,
            });
        }
    }
    Ok(out)
}

fn range(v: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let lo = v.clone().fold(f64::INFINITY, f64::min);
    let hi = v.fold(f64::NEG_INFINITY, f64::max);
    let pad = if hi > lo {
        (hi - lo) * 0.08
    } else {
        lo.abs().max(1.0) * 0.1
    };
    (lo - pad, hi + pad)
}

fn draw(
    caption: &str,
    x_name: &str,
    y_name: &str,
    series: &BTreeMap<String, Vec<(f64, f64)>>,
) -> Result<String, String> {
    let all = series.values().flatten();
    let (x0, x1) = range(all.clone().map(|p| p.0));
    let (y0, y1) = range(all.map(|p| p.1));
    let mut svg = String::new();
    {
        let e = |e: DrawingAreaErrorKind<std::io::Error>| format!("plot `{caption}`: {e}");
        let root = SVGBackend::with_string(&mut svg, (560, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(52)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(x_name)
            .y_desc(y_name)
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(e)?;
        let labelled = series.len() > 1 || series.keys().any(|k| !k.is_empty());
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let s = chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(e)?;
            if labelled {
                s.label(if name.is_empty() { "all" } else { name })
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
            }
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(e)?;
        }
        if labelled {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(180, 180, 180))
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(e)?;
        }
        root.present().map_err(e)?;
    }
    Ok(svg)
}
