//! `pipe compare`: runs side by side, from any number of artifact directories.
//!
//! Input is only run records (`run.json`), so runs made on another machine or by an older checkout
//! compare the same way as local ones. Parameters that are equal in every run fold into one header
//! line; the rest become columns, next to the metrics that matter.
//!
//! The engine does not know what a metric means, so it cannot say whether a difference is real:
//! whoever can ([`crate::report::uncertainty`], from the runs' predictions) attaches intervals,
//! paired differences against a baseline run and ties within noise as [`Uncertainty`], and the
//! renderings show them. Each run lists where its stages' artifacts are ([`Run::artifacts`]) for that.

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
    /// Stage id → (kind, artifact directory), for the stages whose artifact is still there: looked up
    /// in the store the record was found in first (a store copied from another machine keeps
    /// working), then at the path the record wrote.
    #[serde(skip)]
    pub artifacts: BTreeMap<String, (String, PathBuf)>,
}

/// What is known about the noise in a comparison, attached by a caller that can compute it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Uncertainty {
    /// Confidence level of every interval (0.95).
    pub level: f64,
    /// (run index, metric) → interval of that run's value.
    #[serde(skip)]
    pub intervals: BTreeMap<(usize, String), [f64; 2]>,
    /// The run the others are compared with (`--baseline`).
    #[serde(skip)]
    pub baseline: Option<usize>,
    /// (run index, metric) → the run's difference from the baseline.
    #[serde(skip)]
    pub deltas: BTreeMap<(usize, String), Delta>,
    /// With `--sort`, when it could be judged: the runs whose value of the sort metric is within
    /// noise of the first row's.
    #[serde(skip)]
    pub ties: Option<Vec<usize>>,
}

impl Uncertainty {
    fn is_empty(&self) -> bool {
        self.intervals.is_empty() && self.baseline.is_none() && self.ties.is_none()
    }
}

/// A run minus the baseline on one metric; interval and p-value when both scored the same pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Delta {
    pub diff: f64,
    pub ci95: Option<[f64; 2]>,
    pub p_value: Option<f64>,
}

impl Delta {
    /// `Some(false)` when the interval contains 0; `None` without an interval.
    pub fn significant(&self) -> Option<bool> {
        self.ci95.map(|[lo, hi]| lo > 0.0 || hi < 0.0)
    }
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

/// The store a run record lies in: the parent of the nearest `runs` directory above it.
fn store_of(record_dir: &Path) -> Option<&Path> {
    record_dir.ancestors().find(|a| a.file_name().is_some_and(|n| n == "runs")).and_then(Path::parent)
}

fn parse_run(root: &str, dir: &Path, v: &serde_json::Value) -> Run {
    let mut params = BTreeMap::new();
    let mut metrics = BTreeMap::new();
    let mut artifacts = BTreeMap::new();
    let store = store_of(dir);
    for s in v["stages"].as_array().into_iter().flatten() {
        let id = s["id"].as_str().unwrap_or("?");
        for (k, val) in s["params"].as_object().into_iter().flatten() {
            params.insert(format!("{id}.{k}"), val.clone());
        }
        flatten_metrics(id, &s["metrics"], &mut metrics);
        let kind = s["kind"].as_str().unwrap_or("?");
        let here = s["key"].as_str().zip(store).map(|(key, store)| store.join(kind).join(super::key::dir_name(key)));
        let recorded = s["dir"].as_str().map(PathBuf::from);
        if let Some(found) = here.into_iter().chain(recorded).find(|d| d.is_dir()) {
            artifacts.insert(id.to_string(), (kind.to_string(), found));
        }
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
        artifacts,
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
    /// The metric rows were sorted by (`--sort`).
    pub sorted_by: Option<String>,
    pub uncertainty: Uncertainty,
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
    let mut sorted_by = None;
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
        sorted_by = Some(m);
    }
    Ok(Comparison {
        runs,
        varying,
        constant,
        metrics: chosen,
        show_root: roots > 1,
        sorted_by,
        uncertainty: Uncertainty::default(),
    })
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
        if self.uncertainty.ties.is_some() {
            h.push("tie".to_string());
        }
        h
    }

    /// A metric cell: the value, and its interval when there is one.
    fn cell(&self, run: usize, metric: &str) -> String {
        let v = num(self.runs[run].metrics.get(metric));
        match self.uncertainty.intervals.get(&(run, metric.to_string())) {
            Some([lo, hi]) => format!("{v} [{}, {}]", num(Some(lo)), num(Some(hi))),
            None => v,
        }
    }

    /// A difference from the baseline: signed, its interval, and `n.s.` when the interval holds 0.
    fn delta_cell(&self, run: usize, metric: &str) -> String {
        match self.uncertainty.deltas.get(&(run, metric.to_string())) {
            None => "-".into(),
            Some(d) => {
                let mut out = format!("{:+.4}", d.diff);
                if let Some([lo, hi]) = d.ci95 {
                    out.push_str(&format!(" [{lo:+.4}, {hi:+.4}]"));
                }
                if d.significant() == Some(false) {
                    out.push_str(" n.s.");
                }
                out
            }
        }
    }

    /// The baseline section's header and rows (every run but the baseline), when there is one.
    fn baseline_rows(&self) -> Option<(String, Vec<String>, Vec<Vec<String>>)> {
        let b = self.uncertainty.baseline?;
        let mut header = vec!["run".to_string()];
        header.extend(self.metrics.iter().map(|m| format!("Δ {m}")));
        let rows = (0..self.runs.len())
            .filter(|&i| i != b)
            .map(|i| {
                let mut row = vec![self.runs[i].name.clone()];
                row.extend(self.metrics.iter().map(|m| self.delta_cell(i, m)));
                row
            })
            .collect();
        Some((self.runs[b].name.clone(), header, rows))
    }

    /// The lines under the table that say what the marks mean.
    fn legend(&self) -> Vec<String> {
        let mut out = Vec::new();
        let pct = (self.uncertainty.level * 100.0).round();
        if !self.uncertainty.intervals.is_empty() {
            out.push(format!("[lo, hi]: {pct} % bootstrap interval over queries"));
        }
        if self.uncertainty.ties.is_some() {
            if let Some(m) = &self.sorted_by {
                out.push(format!(
                    "tie: {m} within noise of the first row (paired {pct} % interval of the difference holds 0)"
                ));
            }
        }
        out
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
                    let v = self.cell(i, m);
                    row.push(if *b == Some(i) { mark(v) } else { v });
                }
                if let Some(ties) = &self.uncertainty.ties {
                    row.push(if ties.contains(&i) { "≈ first".into() } else { String::new() });
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
                for line in self.legend() {
                    out.push_str(&format!("{line}\n"));
                }
                if let Some((name, header, rows)) = self.baseline_rows() {
                    let pct = (self.uncertainty.level * 100.0).round();
                    out.push_str(&format!(
                        "\nagainst {name} (run − baseline; paired {pct} % interval; n.s.: the interval holds 0):\n"
                    ));
                    out.push_str(&align(&header, &rows));
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
                let legend = self.legend();
                if !legend.is_empty() {
                    out.push('\n');
                    for line in legend {
                        out.push_str(&format!("{line}  \n"));
                    }
                }
                if let Some((name, header, rows)) = self.baseline_rows() {
                    out.push_str(&format!("\nAgainst {name} (run − baseline; n.s.: the interval holds 0):\n\n"));
                    out.push_str(&format!("| {} |\n", header.join(" | ")));
                    out.push_str(&format!("|{}\n", header.iter().map(|_| "---|").collect::<String>()));
                    for r in rows {
                        out.push_str(&format!("| {} |\n", r.join(" | ")));
                    }
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
                let _ = w.write_record(self.csv_header());
                for r in self.csv_rows() {
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
                if !self.uncertainty.is_empty() {
                    v["uncertainty"] = self.uncertainty_json();
                }
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

impl Comparison {
    /// CSV keeps one number per cell: intervals and differences get columns of their own.
    fn csv_header(&self) -> Vec<String> {
        let mut h = self.header();
        if !self.uncertainty.intervals.is_empty() {
            h.extend(self.metrics.iter().flat_map(|m| [format!("{m} lo"), format!("{m} hi")]));
        }
        if self.uncertainty.baseline.is_some() {
            h.extend(
                self.metrics
                    .iter()
                    .flat_map(|m| [format!("Δ {m}"), format!("Δ {m} lo"), format!("Δ {m} hi"), format!("Δ {m} p")]),
            );
        }
        h
    }

    fn csv_rows(&self) -> Vec<Vec<String>> {
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
        (0..self.runs.len())
            .map(|i| {
                let r = &self.runs[i];
                let mut row = Vec::new();
                if self.show_root {
                    row.push(r.root.clone());
                }
                row.push(r.name.clone());
                row.push(r.status.clone());
                row.extend(self.varying.iter().map(|p| show(r.params.get(p))));
                row.extend(self.metrics.iter().map(|m| num(r.metrics.get(m))));
                if let Some(ties) = &self.uncertainty.ties {
                    row.push(if ties.contains(&i) { "1".into() } else { String::new() });
                }
                if !self.uncertainty.intervals.is_empty() {
                    for m in &self.metrics {
                        let ci = self.uncertainty.intervals.get(&(i, m.clone()));
                        row.extend([opt(ci.map(|c| c[0])), opt(ci.map(|c| c[1]))]);
                    }
                }
                if self.uncertainty.baseline.is_some() {
                    for m in &self.metrics {
                        let d = self.uncertainty.deltas.get(&(i, m.clone()));
                        let ci = d.and_then(|d| d.ci95);
                        row.extend([
                            opt(d.map(|d| d.diff)),
                            opt(ci.map(|c| c[0])),
                            opt(ci.map(|c| c[1])),
                            opt(d.and_then(|d| d.p_value)),
                        ]);
                    }
                }
                row
            })
            .collect()
    }

    fn uncertainty_json(&self) -> serde_json::Value {
        let u = &self.uncertainty;
        let mut intervals = serde_json::Map::new();
        for ((i, m), ci) in &u.intervals {
            let run = intervals.entry(self.runs[*i].name.clone()).or_insert_with(|| serde_json::json!({}));
            run[m] = serde_json::json!(ci);
        }
        let mut deltas = serde_json::Map::new();
        for ((i, m), d) in &u.deltas {
            let run = deltas.entry(self.runs[*i].name.clone()).or_insert_with(|| serde_json::json!({}));
            run[m] = serde_json::json!({"diff": d.diff, "ci95": d.ci95, "p_value": d.p_value, "significant": d.significant()});
        }
        serde_json::json!({
            "level": u.level,
            "intervals": intervals,
            "baseline": u.baseline.map(|b| self.runs[b].name.clone()),
            "deltas": deltas,
            "ties": u.ties.as_ref().map(|t| t.iter().map(|&i| self.runs[i].name.clone()).collect::<Vec<_>>()),
        })
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
