//! `pipe compare`: runs side by side, from any number of artifact directories.
//!
//! Input is only run records (`run.json`), so runs made on another machine or by an older checkout
//! compare the same way as local ones. Parameters that are equal in every run fold into one header
//! line; the rest become columns, next to the metrics that matter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Metric columns shown by default, matched as suffixes of `<stage>.<metric>` names.
pub const DEFAULT_METRICS: &[&str] =
    &["test.ndcg@10", "test.map", "test.mrr", "test.auc", "test.f1", "val_loss", "train_seconds", "samples_per_sec"];

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// The PATH argument it was found under.
    pub root: String,
    /// The sweep point name, or the run id.
    pub name: String,
    pub run_dir: String,
    pub pipeline: String,
    pub status: String,
    pub params: BTreeMap<String, serde_json::Value>,
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{0}: no run records (run.json) found there")]
    NoRuns(String),
    #[error("{path}: {message}")]
    Bad { path: String, message: String },
    #[error("unknown metric `{0}`; available: {1}")]
    UnknownMetric(String, String),
}

fn flatten_metrics(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, f64>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                flatten_metrics(&format!("{prefix}.{k}"), v, out);
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.insert(prefix.to_string(), f);
            }
        }
        _ => {}
    }
}

fn parse_run(root: &str, dir: &Path, v: &serde_json::Value) -> Run {
    let mut params = BTreeMap::new();
    let mut metrics = BTreeMap::new();
    for s in v["stages"].as_array().into_iter().flatten() {
        let id = s["id"].as_str().unwrap_or("?");
        for (k, val) in s["params"].as_object().into_iter().flatten() {
            params.insert(format!("{id}.{k}"), val.clone());
        }
        flatten_metrics(id, &s["metrics"], &mut metrics);
    }
    let name = v["sweep"]["point"].as_str().or(v["run_id"].as_str()).unwrap_or("?").to_string();
    Run {
        root: root.to_string(),
        name,
        run_dir: dir.display().to_string(),
        pipeline: v["pipeline"].as_str().unwrap_or("?").to_string(),
        status: v["status"].as_str().unwrap_or("?").to_string(),
        params,
        metrics,
    }
}

/// Every run record at or below each path, in path order then by start time.
pub fn find_runs(paths: &[PathBuf]) -> Result<Vec<Run>, CompareError> {
    let mut runs = Vec::new();
    for p in paths {
        let root = p.display().to_string();
        let mut found: Vec<(String, PathBuf, serde_json::Value)> = Vec::new();
        let mut stack = vec![p.clone()];
        while let Some(d) = stack.pop() {
            let rec = d.join("run.json");
            if rec.is_file() {
                let v: serde_json::Value = std::fs::read(&rec)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .ok_or_else(|| CompareError::Bad {
                        path: rec.display().to_string(),
                        message: "not a readable run record".into(),
                    })?;
                found.push((v["started"].as_str().unwrap_or("").to_string(), d.clone(), v));
                continue;
            }
            if let Ok(rd) = std::fs::read_dir(&d) {
                let mut subs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
                subs.retain(|s| !s.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')));
                stack.extend(subs);
            }
        }
        if found.is_empty() {
            return Err(CompareError::NoRuns(root));
        }
        found.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        runs.extend(found.iter().map(|(_, d, v)| parse_run(&root, d, v)));
    }
    Ok(runs)
}

/// (param, old, new)
type ParamDiff = (String, String, String);
/// (metric, old, new, change)
type MetricDiff = (String, String, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Markdown,
    Csv,
    Json,
}

/// Lower is better for losses, errors and durations; higher for everything else.
pub fn lower_is_better(metric: &str) -> bool {
    ["loss", "rmse", "seconds"].iter().any(|w| metric.contains(w))
}

pub struct Comparison {
    pub runs: Vec<Run>,
    pub varying: Vec<String>,
    pub constant: Vec<(String, serde_json::Value)>,
    pub metrics: Vec<String>,
    pub show_root: bool,
}

fn resolve_metric(all: &[String], want: &str) -> Vec<String> {
    if all.iter().any(|m| m == want) {
        return vec![want.to_string()];
    }
    all.iter().filter(|m| m.ends_with(&format!(".{want}")) || m.ends_with(want)).cloned().collect()
}

pub fn build(
    mut runs: Vec<Run>,
    metrics: Option<&[String]>,
    sort: Option<&str>,
    roots: usize,
) -> Result<Comparison, CompareError> {
    let mut all_params: Vec<String> = runs.iter().flat_map(|r| r.params.keys().cloned()).collect();
    all_params.sort();
    all_params.dedup();
    let (mut varying, mut constant) = (Vec::new(), Vec::new());
    for p in all_params {
        let first = runs[0].params.get(&p);
        if runs.iter().all(|r| r.params.get(&p) == first) {
            constant.push((p, first.cloned().unwrap_or(serde_json::Value::Null)));
        } else {
            varying.push(p);
        }
    }
    let mut all_metrics: Vec<String> = runs.iter().flat_map(|r| r.metrics.keys().cloned()).collect();
    all_metrics.sort();
    all_metrics.dedup();
    let chosen: Vec<String> = match metrics {
        Some(list) => {
            let mut out = Vec::new();
            for m in list {
                let r = resolve_metric(&all_metrics, m);
                if r.is_empty() {
                    return Err(CompareError::UnknownMetric(m.clone(), all_metrics.join(", ")));
                }
                out.extend(r);
            }
            out
        }
        None => {
            // Defaults match a stage's own metric exactly (`evaluate.test.auc`), not a baseline's
            // (`analyze.bm25.test.auc`).
            let d: Vec<String> = DEFAULT_METRICS
                .iter()
                .flat_map(|want| {
                    all_metrics.iter().filter(move |m| m.split_once('.').is_some_and(|(_, rest)| rest == *want))
                })
                .cloned()
                .collect();
            if d.is_empty() {
                all_metrics.iter().take(8).cloned().collect()
            } else {
                d
            }
        }
    };
    if let Some(s) = sort {
        let m = resolve_metric(&all_metrics, s)
            .into_iter()
            .next()
            .ok_or_else(|| CompareError::UnknownMetric(s.to_string(), all_metrics.join(", ")))?;
        let low = lower_is_better(&m);
        runs.sort_by(|a, b| {
            let (x, y) = (a.metrics.get(&m), b.metrics.get(&m));
            let ord = match (x, y) {
                (Some(x), Some(y)) => x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal),
                (Some(_), None) => return std::cmp::Ordering::Less,
                (None, Some(_)) => return std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            if low {
                ord
            } else {
                ord.reverse()
            }
        });
    }
    Ok(Comparison { runs, varying, constant, metrics: chosen, show_root: roots > 1 })
}

fn show(v: Option<&serde_json::Value>) -> String {
    match v {
        None => "-".into(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) if n.is_f64() => {
            super::sweep::fmt_value(&toml::Value::Float(n.as_f64().unwrap_or(f64::NAN)))
        }
        Some(other) => other.to_string(),
    }
}

/// Metrics: four decimals for scores and losses, one for large values (seconds, samples/s).
fn num(v: Option<&f64>) -> String {
    match v {
        None => "-".into(),
        Some(f) if f.abs() >= 100.0 => format!("{f:.1}"),
        Some(f) => format!("{f:.4}"),
    }
}

impl Comparison {
    fn best(&self, metric: &str) -> Option<usize> {
        let low = lower_is_better(metric);
        let vals: Vec<(usize, f64)> =
            self.runs.iter().enumerate().filter_map(|(i, r)| r.metrics.get(metric).map(|v| (i, *v))).collect();
        if vals.len() < 2 {
            return None;
        }
        vals.into_iter().reduce(|a, b| if (low && b.1 < a.1) || (!low && b.1 > a.1) { b } else { a }).map(|(i, _)| i)
    }

    fn header(&self) -> Vec<String> {
        let mut h = Vec::new();
        if self.show_root {
            h.push("root".to_string());
        }
        h.push("run".to_string());
        h.push("status".to_string());
        h.extend(self.varying.iter().cloned());
        h.extend(self.metrics.iter().cloned());
        h
    }

    fn rows(&self, mark: &dyn Fn(String) -> String) -> Vec<Vec<String>> {
        let best: Vec<Option<usize>> = self.metrics.iter().map(|m| self.best(m)).collect();
        self.runs
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut row = Vec::new();
                if self.show_root {
                    row.push(r.root.clone());
                }
                row.push(r.name.clone());
                row.push(r.status.clone());
                row.extend(self.varying.iter().map(|p| show(r.params.get(p))));
                for (m, b) in self.metrics.iter().zip(&best) {
                    let v = num(r.metrics.get(m));
                    row.push(if *b == Some(i) { mark(v) } else { v });
                }
                row
            })
            .collect()
    }

    fn constant_line(&self) -> String {
        let parts: Vec<String> = self.constant.iter().map(|(k, v)| format!("{k}={}", show(Some(v)))).collect();
        format!("constant: {}", if parts.is_empty() { "(none)".into() } else { parts.join(", ") })
    }

    /// With exactly two runs: parameter changes and metric deltas, second minus first.
    fn diff(&self) -> Option<(Vec<ParamDiff>, Vec<MetricDiff>)> {
        if self.runs.len() != 2 {
            return None;
        }
        let (a, b) = (&self.runs[0], &self.runs[1]);
        let params = self.varying.iter().map(|p| (p.clone(), show(a.params.get(p)), show(b.params.get(p)))).collect();
        let metrics = self
            .metrics
            .iter()
            .map(|m| {
                let (x, y) = (a.metrics.get(m), b.metrics.get(m));
                let d = match (x, y) {
                    (Some(x), Some(y)) => format!("{:+.4}", y - x),
                    _ => "-".into(),
                };
                (m.clone(), num(x), num(y), d)
            })
            .collect();
        Some((params, metrics))
    }

    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Table => {
                let rows = self.rows(&|v| format!("{v} *"));
                let mut out = format!("{}\n", self.constant_line());
                out.push_str(&align(&self.header(), &rows));
                if self.runs.iter().any(|_| true) && !self.metrics.is_empty() {
                    out.push_str("* best in column\n");
                }
                if let Some((p, m)) = self.diff() {
                    out.push_str("\nparams diff:\n");
                    out.push_str(&align(
                        &["param".into(), "old".into(), "new".into()],
                        &p.into_iter().map(|(a, b, c)| vec![a, b, c]).collect::<Vec<_>>(),
                    ));
                    out.push_str("\nmetrics diff:\n");
                    out.push_str(&align(
                        &["metric".into(), "old".into(), "new".into(), "change".into()],
                        &m.into_iter().map(|(a, b, c, d)| vec![a, b, c, d]).collect::<Vec<_>>(),
                    ));
                }
                out
            }
            Format::Markdown => {
                let rows = self.rows(&|v| format!("**{v}**"));
                let mut out = format!("{}\n\n", self.constant_line());
                let h = self.header();
                out.push_str(&format!("| {} |\n", h.join(" | ")));
                out.push_str(&format!("|{}\n", h.iter().map(|_| "---|").collect::<String>()));
                for r in rows {
                    out.push_str(&format!("| {} |\n", r.join(" | ")));
                }
                if let Some((p, m)) = self.diff() {
                    out.push_str("\n| param | old | new |\n|---|---|---|\n");
                    for (a, b, c) in p {
                        out.push_str(&format!("| {a} | {b} | {c} |\n"));
                    }
                    out.push_str("\n| metric | old | new | change |\n|---|---|---|---|\n");
                    for (a, b, c, d) in m {
                        out.push_str(&format!("| {a} | {b} | {c} | {d} |\n"));
                    }
                }
                out
            }
            Format::Csv => {
                let mut w = csv::Writer::from_writer(Vec::new());
                let _ = w.write_record(self.header());
                for r in self.rows(&|v| v) {
                    let _ = w.write_record(r);
                }
                String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
            }
            Format::Json => {
                let best: serde_json::Map<String, serde_json::Value> = self
                    .metrics
                    .iter()
                    .filter_map(|m| {
                        self.best(m).map(|i| (m.clone(), serde_json::Value::String(self.runs[i].name.clone())))
                    })
                    .collect();
                let mut v = serde_json::json!({
                    "constant": self.constant.iter().cloned().collect::<serde_json::Map<_, _>>(),
                    "varying": self.varying,
                    "metrics": self.metrics,
                    "best": best,
                    "runs": self.runs,
                });
                if let Some((p, m)) = self.diff() {
                    v["diff"] = serde_json::json!({
                        "params": p.iter().map(|(k, a, b)| serde_json::json!({"param": k, "old": a, "new": b})).collect::<Vec<_>>(),
                        "metrics": m.iter().map(|(k, a, b, d)| serde_json::json!({"metric": k, "old": a, "new": b, "change": d})).collect::<Vec<_>>(),
                    });
                }
                format!("{}\n", serde_json::to_string_pretty(&v).expect("json"))
            }
        }
    }
}

fn align(header: &[String], rows: &[Vec<String>]) -> String {
    let n = header.len();
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        format!("{}\n", s.join("  ").trim_end())
    };
    let mut out = line(header);
    out.push_str(&line(&w.iter().map(|n| "-".repeat(*n)).collect::<Vec<_>>()));
    for r in rows {
        out.push_str(&line(r));
    }
    out
}
