//! The sweep section of a report: the runs of a sweep side by side, and each key metric against each
//! swept numeric parameter.
//!
//! It reads the same [`Run`]s as `pipe compare`, and picks parameters and metrics with
//! [`compare::build`], so the report and the command line never disagree about what varied.

use std::fmt::Write as _;

use super::html::{self, escape, Cell, Table};
use super::plots::{self, LineChart, Mark, Series};
use crate::engine::compare::{self, Run};

/// At most this many charts, so a wide sweep does not bury the rest of the report.
const MAX_PLOTS: usize = 8;

/// HTML for a sweep: a `<h2>`, the table (constant parameters folded into one line, best value per
/// metric in bold) and one chart per (swept numeric parameter, metric). Empty when there are no runs.
pub fn sweep_section(runs: &[Run]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let Ok(cmp) = compare::build(runs.to_vec(), None, None, 1) else {
        return String::new();
    };
    let mut s = String::from("<h2>Sweep</h2>\n");
    let constant: Vec<String> = cmp.constant.iter().map(|(k, v)| format!("{k}={}", show(v))).collect();
    let _ = writeln!(
        s,
        "<p class=\"note\">{} runs; constant: {}</p>",
        cmp.runs.len(),
        escape(&if constant.is_empty() { "(none)".to_string() } else { constant.join(", ") })
    );
    let mut header: Vec<&str> = vec!["run", "status"];
    header.extend(cmp.varying.iter().map(String::as_str));
    header.extend(cmp.metrics.iter().map(String::as_str));
    let mut t = Table::new(&header);
    for r in &cmp.runs {
        let mut row = vec![Cell::text(&r.name), Cell::text(&r.status)];
        row.extend(cmp.varying.iter().map(|p| Cell::Num(r.params.get(p).map_or("-".into(), show))));
        for m in &cmp.metrics {
            let v = r.metrics.get(m);
            let best = best_run(&cmp.runs, m).is_some_and(|b| std::ptr::eq(b, r));
            let text = v.map_or("-".to_string(), |v| format!("{v:.4}"));
            row.push(Cell::Num(if best { format!("{text} ★") } else { text }));
        }
        t.row(row);
    }
    s.push_str(&t.html());
    if cmp.metrics.iter().any(|m| best_run(&cmp.runs, m).is_some()) {
        s.push_str("<p class=\"note\">★ best in column</p>\n");
    }

    for (i, svg) in sweep_charts(&cmp).iter().enumerate() {
        s.push_str(&html::figure(&format!("sweep-{i}"), svg));
    }
    s
}

/// One chart per (swept numeric parameter, metric), at most [`MAX_PLOTS`]; learning-rate-like
/// parameters that span decades go on a log axis. Shared by the sweep page and `pipe compare --plot`.
pub fn sweep_charts(cmp: &compare::Comparison) -> Vec<plots::Svg> {
    let mut out = Vec::new();
    'outer: for p in &cmp.varying {
        let xs: Vec<Option<f64>> = cmp.runs.iter().map(|r| r.params.get(p).and_then(|v| v.as_f64())).collect();
        if xs.iter().any(Option::is_none) {
            continue; // a string or missing parameter: the table shows it
        }
        let xs: Vec<f64> = xs.into_iter().flatten().collect();
        let (lo, hi) = xs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        let log = lo > 0.0 && hi / lo >= 20.0;
        for m in &cmp.metrics {
            if out.len() == MAX_PLOTS {
                break 'outer;
            }
            let points: Vec<(f64, f64)> = cmp
                .runs
                .iter()
                .zip(&xs)
                .filter_map(|(r, &x)| r.metrics.get(m).map(|&y| (if log { x.log10() } else { x }, y)))
                .collect();
            if points.is_empty() {
                continue;
            }
            let chart = LineChart {
                title: format!("{m} against {p}"),
                x_label: if log { format!("log10({p})") } else { p.clone() },
                y_label: m.clone(),
                x_range: None,
                y_range: None,
                series: vec![Series { name: m.clone(), points, mark: Mark::Points }],
                references: vec![],
            };
            if let Ok(svg) = plots::line_chart(&chart) {
                out.push(svg);
            }
        }
    }
    out
}

/// The charts of [`sweep_charts`] stacked into one standalone SVG document (`pipe compare --plot`).
pub fn stacked_svg(charts: &[plots::Svg]) -> String {
    const W: usize = 720;
    const H: usize = 420;
    let mut body = String::new();
    for (i, c) in charts.iter().enumerate() {
        // Each chart is a complete <svg> element; nest it at its own offset.
        let inner = c.svg.replacen("<svg", &format!("<svg x=\"0\" y=\"{}\"", i * H), 1);
        body.push_str(&format!("<g><title>{}</title>\n{inner}</g>\n", html::escape(&c.title)));
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" viewBox=\"0 0 {W} {}\">\n{body}</svg>\n",
        H * charts.len().max(1),
        H * charts.len().max(1)
    )
}

fn best_run<'a>(runs: &'a [Run], metric: &str) -> Option<&'a Run> {
    let low = compare::lower_is_better(metric);
    let vals: Vec<(&Run, f64)> = runs.iter().filter_map(|r| r.metrics.get(metric).map(|v| (r, *v))).collect();
    if vals.len() < 2 {
        return None;
    }
    vals.into_iter().reduce(|a, b| if (low && b.1 < a.1) || (!low && b.1 > a.1) { b } else { a }).map(|(r, _)| r)
}

fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) if n.is_f64() => {
            crate::engine::sweep::fmt_value(&toml::Value::Float(n.as_f64().unwrap_or(f64::NAN)))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn run(name: &str, lr: f64, r: i64, ndcg: f64, loss: f64) -> Run {
        let mut params = BTreeMap::new();
        params.insert("train.learning_rate".to_string(), serde_json::json!(lr));
        params.insert("train.r".to_string(), serde_json::json!(r));
        params.insert("train.loss".to_string(), serde_json::json!("bce"));
        let mut metrics = BTreeMap::new();
        metrics.insert("evaluate.test.ndcg@10".to_string(), ndcg);
        metrics.insert("train.val_loss".to_string(), loss);
        Run {
            root: "artifacts".into(),
            name: name.into(),
            run_dir: format!("artifacts/runs/q/s/{name}"),
            pipeline: "q".into(),
            status: "ok".into(),
            params,
            metrics,
            artifacts: BTreeMap::new(),
        }
    }

    #[test]
    fn sweep_section_tables_varying_params_and_plots_numeric_ones() {
        let runs = vec![
            run("learning_rate=1e-06,r=8", 1e-6, 8, 0.93, 0.40),
            run("learning_rate=1e-05,r=8", 1e-5, 8, 0.95, 0.35),
            run("learning_rate=1e-04,r=16", 1e-4, 16, 0.94, 0.38),
        ];
        let s = sweep_section(&runs);
        assert!(s.contains("constant: train.loss=bce"), "{s}");
        assert!(s.contains("<th>train.learning_rate</th><th>train.r</th>"), "{s}");
        // Highest NDCG and lowest loss are starred, in the same run.
        assert!(s.contains("<td>0.9500 ★</td><td>0.3500 ★</td>"), "{s}");
        // 2 numeric swept params × 2 metrics; the learning rate spans 100× so it is plotted as log10.
        assert_eq!(s.matches("<figure class=\"plot\"").count(), 4);
        assert_eq!(s.matches("<svg").count(), 4);
        assert!(s.contains(">\nlog10(train.learning_rate)\n</text>"), "{s}");
        assert!(s.contains(">\ntrain.r\n</text>"));
        assert_eq!(sweep_section(&[]), "");
    }
}
