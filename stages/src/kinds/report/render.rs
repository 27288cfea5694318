//! The table as Markdown, CSV, HTML and LaTeX. Pure functions of the [`Table`]: the same table
//! gives the same bytes (no timestamps, no paths).

use std::fmt::Write;

use super::table::{Mark, Table, short};

/// The legend line under the table.
fn legend(t: &Table, best: &str, second: &str) -> String {
    let mut s = format!("Best value per column {best}, second best {second}.");
    if t.columns.iter().any(|c| c.is_percent()) {
        s.push_str(" Accuracies in %.");
    }
    s
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

/// Markdown: best in **bold**, second in *italic* (the paper's red / blue).
pub fn markdown(t: &Table) -> String {
    let mut s = String::new();
    if let Some(title) = &t.title {
        let _ = writeln!(s, "### {}\n", md_escape(title));
    }
    s.push_str("| Row |");
    for c in &t.columns {
        let _ = write!(s, " {} |", md_escape(c.title()));
    }
    s.push_str("\n|:---|");
    for _ in &t.columns {
        s.push_str("---:|");
    }
    s.push('\n');
    for r in &t.rows {
        let _ = write!(s, "| {} |", md_escape(&r.label));
        for c in &r.cells {
            let text = match c {
                None => "–".to_string(),
                Some(c) => match c.mark {
                    Mark::Best => format!("**{}**", c.shown),
                    Mark::Second => format!("*{}*", c.shown),
                    Mark::None => c.shown.clone(),
                },
            };
            let _ = write!(s, " {text} |");
        }
        s.push('\n');
    }
    let _ = writeln!(s, "\n{}", legend(t, "in **bold**", "in *italic*"));
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// CSV: the label, the shown values, then the row's run key and each cell's source (kind,
/// key, metric and attack config) so every number can be traced.
pub fn csv(t: &Table) -> String {
    let mut head = vec!["row".to_string()];
    head.extend(t.columns.iter().map(|c| c.title().to_string()));
    head.push("mark".into());
    head.push("run_key".into());
    head.extend(t.columns.iter().map(|c| format!("{} source", c.title())));
    let mut s = head
        .iter()
        .map(|h| csv_field(h))
        .collect::<Vec<_>>()
        .join(",");
    s.push('\n');
    for r in &t.rows {
        let mut f = vec![r.label.clone()];
        f.extend(
            r.cells
                .iter()
                .map(|c| c.as_ref().map_or(String::new(), |c| c.shown.clone())),
        );
        // Marks as one field: `best:Clean;second:PGD(4/255)`.
        let marks: Vec<String> = r
            .cells
            .iter()
            .zip(&t.columns)
            .filter_map(|(c, col)| match c.as_ref().map(|c| c.mark) {
                Some(Mark::Best) => Some(format!("best:{}", col.title())),
                Some(Mark::Second) => Some(format!("second:{}", col.title())),
                _ => None,
            })
            .collect();
        f.push(marks.join(";"));
        f.push(r.run.clone());
        f.extend(
            r.cells
                .iter()
                .map(|c| c.as_ref().map_or(String::new(), |c| c.source.describe())),
        );
        s.push_str(&f.iter().map(|x| csv_field(x)).collect::<Vec<_>>().join(","));
        s.push('\n');
    }
    s
}

/// Escapes text for HTML content and attribute values.
pub fn html_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A self-contained page: the table (best red, second blue, a tooltip with each cell's source
/// on hover) and the plots inline.
pub fn html(t: &Table, plots: &[(String, String)]) -> String {
    let title = t.title.clone().unwrap_or_else(|| "pipe report".into());
    let mut s = String::new();
    s.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    let _ = writeln!(s, "<title>{}</title>", html_escape(&title));
    s.push_str(
        "<style>\n\
         body{font-family:system-ui,sans-serif;margin:2em;color:#222}\n\
         table{border-collapse:collapse;margin:1em 0}\n\
         th,td{padding:.3em .8em;border-bottom:1px solid #ccc}\n\
         th{border-bottom:2px solid #444;text-align:right}\n\
         th:first-child,td:first-child{text-align:left}\n\
         td{text-align:right;font-variant-numeric:tabular-nums}\n\
         td[title]{cursor:help}\n\
         .best{color:#c00;font-weight:bold}\n\
         .second{color:#00c}\n\
         .legend{color:#555;font-size:.9em}\n\
         figure{display:inline-block;margin:.5em}\n\
         </style>\n</head>\n<body>\n",
    );
    let _ = writeln!(s, "<h1>{}</h1>", html_escape(&title));
    s.push_str("<table>\n<thead><tr><th>Row</th>");
    for c in &t.columns {
        let _ = write!(
            s,
            "<th title=\"{}\">{}</th>",
            html_escape(&c.metric),
            html_escape(c.title())
        );
    }
    s.push_str("</tr></thead>\n<tbody>\n");
    for r in &t.rows {
        let _ = write!(
            s,
            "<tr><td title=\"run {}\">{}</td>",
            html_escape(&r.run),
            html_escape(&r.label)
        );
        for c in &r.cells {
            match c {
                None => s.push_str("<td>–</td>"),
                Some(c) => {
                    let class = match c.mark {
                        Mark::Best => " class=\"best\"",
                        Mark::Second => " class=\"second\"",
                        Mark::None => "",
                    };
                    let _ = write!(
                        s,
                        "<td{class} title=\"{}\">{}</td>",
                        html_escape(&c.source.describe()),
                        html_escape(&c.shown)
                    );
                }
            }
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody>\n</table>\n");
    let _ = writeln!(
        s,
        "<p class=\"legend\">{} Hover a cell for the node and attack config that produced it.</p>",
        html_escape(&legend(t, "in red", "in blue"))
    );
    if !plots.is_empty() {
        s.push_str("<h2>Plots</h2>\n");
        for (name, svg) in plots {
            let _ = writeln!(
                s,
                "<figure>\n{svg}\n<figcaption>{}</figcaption>\n</figure>",
                html_escape(name)
            );
        }
    }
    s.push_str("</body>\n</html>\n");
    s
}

/// Escapes LaTeX specials in text.
pub fn tex_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '\\' => o.push_str("\\textbackslash{}"),
            '&' | '%' | '$' | '#' | '_' | '{' | '}' => {
                o.push('\\');
                o.push(ch);
            }
            '~' => o.push_str("\\textasciitilde{}"),
            '^' => o.push_str("\\textasciicircum{}"),
            '–' => o.push_str("--"),
            c => o.push(c),
        }
    }
    o
}

/// A `table` float with a booktabs `tabular`; best in red, second in blue (needs the
/// `booktabs` and `xcolor` packages). Each row ends with a comment naming its run key.
pub fn latex(t: &Table) -> String {
    let mut s =
        String::from("% pipe report: needs \\usepackage{booktabs} and \\usepackage{xcolor}\n");
    s.push_str("\\begin{table}[t]\n\\centering\n");
    if let Some(title) = &t.title {
        let _ = writeln!(s, "\\caption{{{}}}", tex_escape(title));
    }
    let _ = writeln!(s, "\\begin{{tabular}}{{l{}}}", "r".repeat(t.columns.len()));
    s.push_str("\\toprule\nRow");
    for c in &t.columns {
        let _ = write!(s, " & {}", tex_escape(c.title()));
    }
    s.push_str(" \\\\\n\\midrule\n");
    for r in &t.rows {
        s.push_str(&tex_escape(&r.label));
        for c in &r.cells {
            let text = match c {
                None => "--".to_string(),
                Some(c) => match c.mark {
                    Mark::Best => format!("\\textcolor{{red}}{{{}}}", c.shown),
                    Mark::Second => format!("\\textcolor{{blue}}{{{}}}", c.shown),
                    Mark::None => c.shown.clone(),
                },
            };
            let _ = write!(s, " & {text}");
        }
        let _ = writeln!(s, " \\\\ % run {}", short(&r.run));
    }
    s.push_str("\\bottomrule\n\\end{tabular}\n\\end{table}\n");
    s
}
