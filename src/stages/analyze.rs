//! `analyze`: the model's test scores next to the baselines they must beat, where it errs, and a
//! report a person can open.
//!
//! Reads, by upstream kind:
//! - `evaluate`: `predictions.csv` (`split,query,product_id,title,relevance,label,score,rank`,
//!   split `val`|`test`, score = P(yes)) and `evaluation_metrics.json` (`{"val": {…}, "test": {…}}`);
//! - `split`: `train.csv`, `val.csv`, `test.csv` (descriptions for BM25, train queries for the
//!   frequency slices, train products for BM25's statistics);
//! - `train`, optional: `train_log.jsonl` (lines with `loss`, or with `val_loss`).
//!
//! Every system (the model, BM25 over title + description, BM25 over titles, the share of query
//! words in the title and in title + description, random) is measured by the same [`crate::metrics`]
//! code on exactly the pairs the model scored, so a lift is never an artefact of two definitions.
//! Each also gets bootstrap intervals over test queries, all on the same resamples, so that each lift
//! has a paired interval that says whether it is more than noise ([`crate::metrics::bootstrap`]). The model's numbers are recomputed from `predictions.csv`, and
//! checked against `evaluation_metrics.json` (the report notes any difference).
//!
//! Writes `analysis.json` (everything, machine-readable), `report.md` and `report.html`.

mod baselines;
mod render;
mod slices;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use baselines::{expected_random, overlap, random_per_query, random_scores, tokenize, Bm25, RandomExpectation};
pub use slices::{has_digits_or_units, length_slice, Calibration, ConfidentErrors, QuerySlice, RelevanceSlice};

use super::table::{self, Labeled};
use crate::engine::{
    Contract, JsonMap, Need, ParamError, StageContext, StageError, StageOutput, StageParams, TypedStage,
};
use crate::metrics::bootstrap::{self, BootstrapOptions, Distribution, Sample};
use crate::metrics::{self, Gain, Metrics, Options, Prediction};

pub const KIND: &str = "analyze";
/// Bump when the same inputs and parameters would give different files.
/// 2: bootstrap intervals, paired lifts with p-values, the lexical-overlap baselines.
pub const VERSION: u32 = 2;
const DEFAULTS: &str = include_str!("../../stages/analyze.toml");

/// Files the stage writes.
pub const ANALYSIS_FILE: &str = "analysis.json";
pub const REPORT_MD: &str = "report.md";
pub const REPORT_HTML: &str = "report.html";

/// The predictions and the split tables always; the train log when there is a train stage (without
/// one, a zero-shot evaluation, the loss chart is left out and the report says so).
pub const CONTRACT: Contract = Contract {
    needs: &[
        Need::always(&[super::evaluate::KIND]),
        Need::always(&[super::split::KIND]),
        Need::optional(&[super::train::KIND]),
    ],
    writes: &[ANALYSIS_FILE, REPORT_MD, REPORT_HTML],
};

/// The metrics lifts are reported for (the headline NDCG is added in front).
const LIFT_METRICS: [&str; 3] = ["map", "mrr", "auc"];

/// The systems the model's lifts are measured against, by id.
const BASELINES: [&str; 5] = ["bm25", "bm25_title", "overlap", "overlap_title", "random"];

pub struct Analyze;

/// The parameters of `stages/analyze.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnalyzeParams {
    pub k: Vec<i64>,
    pub threshold: f64,
    pub gain: String,
    pub bm25_k1: f64,
    pub bm25_b: f64,
    pub bm25_fields: String,
    pub bm25_idf: String,
    pub random_seeds: i64,
    pub seed: i64,
    pub top_errors: i64,
    pub frequent_min: i64,
    pub calibration_bins: i64,
    pub bootstrap_resamples: i64,
    pub bootstrap_seed: i64,
}

impl StageParams for AnalyzeParams {
    fn validate(&self) -> Result<(), ParamError> {
        let err = |k: &str, m: String| Err(ParamError::new(k, m));
        if self.k.is_empty() {
            return err("k", "the list is empty; give at least one cut-off, e.g. [1, 3, 5, 10]".into());
        }
        if let Some(bad) = self.k.iter().find(|&&k| k < 1) {
            return err("k", format!("{bad} is not a cut-off; every K must be an integer >= 1"));
        }
        if !self.threshold.is_finite() {
            return err("threshold", format!("{} is not a finite number", self.threshold));
        }
        if !matches!(self.gain.as_str(), "linear" | "exp") {
            return err("gain", format!("`{}`: expected \"linear\" or \"exp\"", self.gain));
        }
        if !(self.bm25_k1.is_finite() && self.bm25_k1 >= 0.0) {
            return err("bm25_k1", format!("{} is not a number >= 0", self.bm25_k1));
        }
        if !(0.0..=1.0).contains(&self.bm25_b) {
            return err("bm25_b", format!("{} is outside [0, 1]", self.bm25_b));
        }
        if !matches!(self.bm25_fields.as_str(), "title+description" | "title") {
            return err("bm25_fields", format!("`{}`: expected \"title+description\" or \"title\"", self.bm25_fields));
        }
        if !matches!(self.bm25_idf.as_str(), "train" | "candidates") {
            return err("bm25_idf", format!("`{}`: expected \"train\" or \"candidates\"", self.bm25_idf));
        }
        for (key, v, min) in [
            ("random_seeds", self.random_seeds, 1),
            ("seed", self.seed, 0),
            ("top_errors", self.top_errors, 0),
            ("frequent_min", self.frequent_min, 1),
            ("calibration_bins", self.calibration_bins, 1),
            ("bootstrap_resamples", self.bootstrap_resamples, 1),
            ("bootstrap_seed", self.bootstrap_seed, 0),
        ] {
            if v < min {
                return err(key, format!("{v} is below the minimum {min}"));
            }
        }
        Ok(())
    }
}

impl AnalyzeParams {
    pub fn options(&self) -> Options {
        Options {
            ks: self.k.iter().map(|&k| k as usize).collect(),
            threshold: self.threshold,
            gain: if self.gain == "exp" { Gain::Exp } else { Gain::Linear },
            ..Options::default()
        }
    }

    /// NDCG@10 when 10 is a cut-off, else the largest K.
    pub fn headline_k(&self) -> usize {
        if self.k.contains(&10) {
            10
        } else {
            self.k.iter().copied().max().unwrap_or(10) as usize
        }
    }
}

/// Which evaluated split a prediction belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Val,
    Test,
}

/// One row of the evaluate stage's `predictions.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredPair {
    pub part: Part,
    pub query: String,
    pub product_id: String,
    pub title: String,
    pub relevance: f64,
    pub label: bool,
    pub score: f64,
    pub rank: usize,
}

impl ScoredPair {
    /// This pair as the metrics read it, scored `score` (its own or a baseline's).
    pub fn prediction(&self, score: f64) -> Prediction {
        Prediction { query: self.query.clone(), relevance: self.relevance, score, label: Some(self.label) }
    }
}

#[derive(Debug, Deserialize)]
struct PredictionRow {
    split: String,
    query: String,
    product_id: String,
    title: String,
    relevance: f64,
    label: String,
    score: f64,
    rank: usize,
}

/// Read `predictions.csv` (columns by header name; extra columns are ignored).
pub fn read_scored(path: &Path) -> Result<Vec<ScoredPair>, StageError> {
    let name = path.display().to_string();
    let mut rdr = csv::Reader::from_path(path).map_err(|e| csv_err(&name, e))?;
    let mut out = Vec::new();
    for row in rdr.deserialize::<PredictionRow>() {
        let row = row.map_err(|e| csv_err(&name, e))?;
        let line = out.len() as u64 + 2;
        let bad = |message: String| StageError::Data { file: name.clone(), line, message };
        let part = match row.split.as_str() {
            "val" => Part::Val,
            "test" => Part::Test,
            other => return Err(bad(format!("split `{other}`: expected `val` or `test`"))),
        };
        let label = match row.label.as_str() {
            "1" | "true" => true,
            "0" | "false" => false,
            other => return Err(bad(format!("label `{other}`: expected 0 or 1"))),
        };
        if !row.score.is_finite() {
            return Err(bad(format!("score `{}` is not a finite number", row.score)));
        }
        out.push(ScoredPair {
            part,
            query: row.query,
            product_id: row.product_id,
            title: row.title,
            relevance: row.relevance,
            label,
            score: row.score,
            rank: row.rank,
        });
    }
    Ok(out)
}

fn csv_err(name: &str, e: csv::Error) -> StageError {
    let line = e.position().map_or(1, |p| p.line());
    match e.into_kind() {
        csv::ErrorKind::Io(source) => StageError::Io { path: name.to_string(), source },
        csv::ErrorKind::Deserialize { err, .. } => StageError::Data {
            file: name.to_string(),
            line,
            message: format!("{err} (expected the columns split,query,product_id,title,relevance,label,score,rank)"),
        },
        other => StageError::Data { file: name.to_string(), line, message: format!("{other:?}") },
    }
}

/// A train-loss point and a validation point of `train_log.jsonl`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrainLog {
    /// (step, loss)
    pub train: Vec<(f64, f64)>,
    /// (step, val_loss, val_auc, val_ndcg@10)
    pub val: Vec<(f64, f64, Option<f64>, Option<f64>)>,
    pub last_lr: Option<f64>,
    /// Mean over the train lines that report it.
    pub samples_per_sec: Option<f64>,
    /// Lines with neither `loss` nor `val_loss` (future event kinds), skipped.
    pub other_lines: usize,
}

/// Read `train_log.jsonl`: each line one JSON object with `loss` (a training step) or `val_loss`
/// (a validation pass), both with `step`.
pub fn read_train_log(path: &Path) -> Result<TrainLog, StageError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?;
    let mut log = TrainLog::default();
    let (mut sps_sum, mut sps_n) = (0.0, 0usize);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| StageError::Data { file: name.clone(), line: i as u64 + 1, message };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        let step = || num("step").ok_or_else(|| bad("missing a numeric `step`".into()));
        if let Some(loss) = num("loss") {
            log.train.push((step()?, loss));
            log.last_lr = num("lr").or(log.last_lr);
            if let Some(s) = num("samples_per_sec") {
                sps_sum += s;
                sps_n += 1;
            }
        } else if let Some(val_loss) = num("val_loss") {
            log.val.push((step()?, val_loss, num("val_auc"), num("val_ndcg@10")));
        } else {
            log.other_lines += 1;
        }
    }
    log.samples_per_sec = (sps_n > 0).then(|| sps_sum / sps_n as f64);
    Ok(log)
}

/// Metric values by JSON key, in a fixed order; serialises as an object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scores(pub Vec<(String, Option<f64>)>);

impl Scores {
    pub fn get(&self, key: &str) -> Option<f64> {
        self.0.iter().find(|(k, _)| k == key).and_then(|(_, v)| *v)
    }
}

impl From<&Metrics> for Scores {
    fn from(m: &Metrics) -> Scores {
        Scores(m.entries())
    }
}

impl Serialize for Scores {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// One scorer's numbers on validation and test.
#[derive(Debug, Clone, Serialize)]
pub struct System {
    /// `model`, `bm25`, `bm25_title`, `random`, `random_sampled`: the prefix of the stage's metric keys.
    pub id: String,
    pub label: String,
    pub val: Option<Scores>,
    pub test: Scores,
    /// F1 on test at the threshold that maximises F1 on validation.
    pub tuned_f1: Option<f64>,
    /// 95 % bootstrap interval of each headline test metric, resampling queries (empty for the
    /// mean of sampled random scorings, whose spread is `random_seeds`).
    pub test_ci95: BTreeMap<String, [f64; 2]>,
}

/// The model minus one baseline on one test metric.
#[derive(Debug, Clone, Serialize)]
pub struct Lift {
    pub baseline: String,
    pub metric: String,
    pub model: Option<f64>,
    pub base: Option<f64>,
    pub lift: Option<f64>,
    /// `lift / (1 - base)`: the share of the room above the baseline that the model took.
    pub headroom: Option<f64>,
    /// Paired 95 % bootstrap interval of the lift (both systems on the same resampled queries).
    pub ci95: Option<[f64; 2]>,
    /// Two-sided: how often the resampled lift falls on the other side of zero, doubled.
    pub p_value: Option<f64>,
    /// False when the interval contains 0: the lift is within noise.
    pub significant: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataSummary {
    pub val_pairs: usize,
    pub val_queries: usize,
    pub test_pairs: usize,
    pub test_queries: usize,
    pub test_positive_rate: f64,
    /// Pairs in the split's val/test files that the model did not score (evaluate may subsample);
    /// baselines are measured on the scored pairs only.
    pub split_pairs_not_scored: usize,
    pub train_queries: usize,
    /// Test queries whose exact text occurs in train (0 for a query-grouped split).
    pub test_queries_seen_in_train: usize,
    /// Documents BM25's statistics came from.
    pub bm25_documents: usize,
    pub bm25_avgdl: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SlicesOut {
    pub relevance: Vec<RelevanceSlice>,
    pub query_length: Vec<QuerySlice>,
    pub digits_units: Vec<QuerySlice>,
    pub frequency: Vec<QuerySlice>,
}

/// The per-seed spread of the sampled random baseline.
#[derive(Debug, Clone, Serialize)]
pub struct SeedSpread {
    pub seeds: usize,
    /// Standard deviation over seeds of each test metric.
    pub test_sd: Scores,
}

/// ROC and PR curves on test, per system.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Curves {
    pub roc: Vec<(String, Vec<(f64, f64)>)>,
    pub pr: Vec<(String, Vec<(f64, f64)>)>,
    pub test_positive_rate: f64,
}

/// How the recomputed model metrics compare with the evaluate stage's `evaluation_metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvaluateCheck {
    pub found: bool,
    pub compared: usize,
    /// `split.key: evaluate vs analyze` for values that differ by more than 1e-9.
    pub differences: Vec<String>,
}

/// Everything `analysis.json` holds; the reports are rendered from it.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    pub stage: String,
    pub params: AnalyzeParams,
    pub headline_k: usize,
    pub data: DataSummary,
    pub systems: Vec<System>,
    pub random_seeds: SeedSpread,
    pub lifts: Vec<Lift>,
    pub slices: SlicesOut,
    pub calibration: Calibration,
    pub errors: ConfidentErrors,
    /// Score distribution per relevance grade: (grade, test scores) — for the chart only.
    #[serde(skip)]
    pub score_by_relevance: Vec<(f64, Vec<f64>)>,
    pub curves: Curves,
    /// `None` when the pipeline has no train stage upstream.
    pub training: Option<TrainLog>,
    pub evaluate_check: EvaluateCheck,
}

impl Analysis {
    pub fn system(&self, id: &str) -> Option<&System> {
        self.systems.iter().find(|s| s.id == id)
    }

    /// The flat metric keys of the stage's output (`bm25.test.auc`, `lift.bm25.auc`, …).
    pub fn metric_keys(&self) -> JsonMap {
        let mut m = JsonMap::new();
        let nd = format!("ndcg@{}", self.headline_k);
        let keys: Vec<&str> = [nd.as_str()].into_iter().chain(LIFT_METRICS).collect();
        for s in self.systems.iter().filter(|s| BASELINES.contains(&s.id.as_str())) {
            for (part, scores) in [("val", s.val.as_ref()), ("test", Some(&s.test))] {
                let Some(scores) = scores else { continue };
                for k in &keys {
                    if let Some(v) = scores.get(k) {
                        m.insert(format!("{}.{part}.{k}", s.id), v.into());
                    }
                }
            }
        }
        for l in &self.lifts {
            if let Some(v) = l.lift {
                m.insert(format!("lift.{}.{}", l.baseline, l.metric), v.into());
            }
        }
        m.insert("calibration.ece".into(), self.calibration.ece.into());
        m
    }
}

fn metrics_err(what: &str) -> impl Fn(metrics::MetricsError) -> StageError + '_ {
    move |e| StageError::failed(format!("{what}: {e}"))
}

/// Validation and test metrics of one scorer, the calibration and threshold fitted on validation.
fn measure(
    what: &str,
    val: &[Prediction],
    test: &[Prediction],
    opts: &Options,
) -> Result<(Option<Metrics>, Metrics, Option<f64>), StageError> {
    if val.is_empty() {
        let t = metrics::compute(test, opts).map_err(metrics_err(what))?;
        return Ok((None, t, None));
    }
    let s = metrics::evaluate_split(val, test, opts).map_err(metrics_err(what))?;
    let tuned = s.tuned.map(|t| t.test.f1);
    Ok((Some(s.val), s.test, tuned))
}

/// Mean and standard deviation, key by key, of several scorings' entries.
fn mean_sd(runs: &[Vec<(String, Option<f64>)>]) -> (Scores, Scores) {
    let Some(first) = runs.first() else { return (Scores::default(), Scores::default()) };
    let mut mean = Vec::new();
    let mut sd = Vec::new();
    for (i, (key, _)) in first.iter().enumerate() {
        let vals: Vec<f64> = runs.iter().filter_map(|r| r[i].1).collect();
        if vals.is_empty() {
            mean.push((key.clone(), None));
            sd.push((key.clone(), None));
            continue;
        }
        let n = vals.len() as f64;
        let m = vals.iter().sum::<f64>() / n;
        let var = if vals.len() > 1 { vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        mean.push((key.clone(), Some(m)));
        sd.push((key.clone(), Some(var.sqrt())));
    }
    (Scores(mean), Scores(sd))
}

/// BM25 statistics and per-pair scores for one choice of fields.
struct Bm25Run {
    scores_val: Vec<f64>,
    scores_test: Vec<f64>,
    documents: usize,
    avgdl: f64,
}

fn run_bm25(
    p: &AnalyzeParams,
    title_only: bool,
    train: &[Labeled],
    pairs: &[&ScoredPair],
    descriptions: &HashMap<&str, &str>,
) -> Bm25Run {
    let doc = |title: &str, pid: &str| -> Vec<String> {
        if title_only {
            tokenize(title)
        } else {
            tokenize(&format!("{title} {}", descriptions.get(pid).copied().unwrap_or("")))
        }
    };
    let mut seen: HashSet<&str> = HashSet::new();
    let corpus: Vec<Vec<String>> = if p.bm25_idf == "train" {
        train
            .iter()
            .filter(|r| seen.insert(&r.record.product_id))
            .map(|r| doc(&r.record.title, &r.record.product_id))
            .collect()
    } else {
        pairs.iter().filter(|r| seen.insert(&r.product_id)).map(|r| doc(&r.title, &r.product_id)).collect()
    };
    let bm = Bm25::fit(corpus.iter().map(Vec::as_slice), p.bm25_k1, p.bm25_b);
    let (mut scores_val, mut scores_test) = (Vec::new(), Vec::new());
    for r in pairs {
        let s = bm.score(&tokenize(&r.query), &doc(&r.title, &r.product_id));
        match r.part {
            Part::Val => scores_val.push(s),
            Part::Test => scores_test.push(s),
        }
    }
    Bm25Run { scores_val, scores_test, documents: bm.n, avgdl: bm.avgdl }
}

/// The whole analysis from already-read inputs (no I/O): what `run` writes, and what tests inspect.
pub fn analyze(
    id: &str,
    p: &AnalyzeParams,
    scored: &[ScoredPair],
    split: &[Vec<Labeled>; 3],
    evaluation: Option<&serde_json::Value>,
    training: Option<TrainLog>,
) -> Result<Analysis, StageError> {
    p.validate()?;
    let opts = p.options();
    // Validation rows first, then test, each in file order: every scorer's vectors line up with these.
    let pairs: Vec<&ScoredPair> =
        scored.iter().filter(|s| s.part == Part::Val).chain(scored.iter().filter(|s| s.part == Part::Test)).collect();
    let val: Vec<&ScoredPair> = pairs.iter().copied().filter(|s| s.part == Part::Val).collect();
    let test: Vec<ScoredPair> = pairs.iter().filter(|s| s.part == Part::Test).map(|s| (*s).clone()).collect();
    if test.is_empty() {
        return Err(StageError::Upstream("predictions.csv has no `test` rows: nothing to analyze".into()));
    }

    // The scored pairs must come from this split; the baselines read their descriptions there.
    let [train, split_val, split_test] = split;
    let mut in_split: HashMap<(&str, &str), Part> = HashMap::new();
    let mut descriptions: HashMap<&str, &str> = HashMap::new();
    for (rows, part) in [(split_val, Some(Part::Val)), (split_test, Some(Part::Test)), (train, None)] {
        for r in rows {
            descriptions.entry(&r.record.product_id).or_insert(&r.record.description);
            if let Some(part) = part {
                in_split.insert((&r.record.query, &r.record.product_id), part);
            }
        }
    }
    let mut scored_keys: HashSet<(&str, &str)> = HashSet::new();
    for s in &pairs {
        match in_split.get(&(s.query.as_str(), s.product_id.as_str())) {
            Some(&part) if part == s.part => {}
            found => {
                return Err(StageError::Upstream(format!(
                    "predictions.csv scores query `{}` × product {} as {:?}, but the split has it {}: \
                     the evaluate and split upstreams do not match",
                    s.query,
                    s.product_id,
                    s.part,
                    match found {
                        Some(p) => format!("in {p:?}"),
                        None => "in neither val nor test".to_string(),
                    }
                )));
            }
        }
        scored_keys.insert((&s.query, &s.product_id));
    }
    let split_pairs_not_scored = split_val
        .iter()
        .chain(split_test)
        .filter(|r| !scored_keys.contains(&(&r.record.query, &r.record.product_id)))
        .count();

    let to_preds = |rows: &[&ScoredPair], scores: &[f64]| -> Vec<Prediction> {
        rows.iter().zip(scores).map(|(r, &s)| r.prediction(s)).collect()
    };
    let test_refs: Vec<&ScoredPair> = test.iter().collect();
    let model_val = to_preds(&val, &val.iter().map(|r| r.score).collect::<Vec<_>>());
    let model_test = to_preds(&test_refs, &test.iter().map(|r| r.score).collect::<Vec<_>>());

    // Every system that scores pairs: (id, label, val scores, test scores).
    let title_only = p.bm25_fields == "title";
    let main = run_bm25(p, title_only, train, &pairs, &descriptions);
    let mut scorers: Vec<(&str, &str, Vec<f64>, Vec<f64>)> =
        vec![("model", "model", val.iter().map(|r| r.score).collect(), test.iter().map(|r| r.score).collect())];
    // BM25 over the chosen fields, and over titles alone beside it.
    let bm25_label = if title_only { "BM25 (title)" } else { "BM25 (title + description)" };
    scorers.push(("bm25", bm25_label, main.scores_val.clone(), main.scores_test.clone()));
    if !title_only {
        let titles = run_bm25(p, true, train, &pairs, &descriptions);
        scorers.push(("bm25_title", "BM25 (title)", titles.scores_val, titles.scores_test));
    }
    // The share of the query's words in the title, and in title + description.
    for (sid, label, with_description) in [
        ("overlap_title", "lexical overlap (title)", false),
        ("overlap", "lexical overlap (title + description)", true),
    ] {
        let score = |r: &ScoredPair| {
            let doc = if with_description {
                format!("{} {}", r.title, descriptions.get(r.product_id.as_str()).copied().unwrap_or(""))
            } else {
                r.title.clone()
            };
            overlap(&tokenize(&r.query), &tokenize(&doc))
        };
        scorers.push((sid, label, val.iter().map(|r| score(r)).collect(), test.iter().map(score).collect()));
    }

    let boot =
        BootstrapOptions { resamples: p.bootstrap_resamples as usize, seed: p.bootstrap_seed as u64, level: 0.95 };
    let mut systems = Vec::new();
    let mut samples: Vec<Sample> = Vec::new();
    let mut model_val_test = None;
    for (sid, label, scores_val, scores_test) in &scorers {
        let test_preds = to_preds(&test_refs, scores_test);
        let (v, t, tuned) = measure(sid, &to_preds(&val, scores_val), &test_preds, &opts)?;
        samples.push(Sample::new(&test_preds, &opts).map_err(metrics_err(sid))?);
        if *sid == "model" {
            model_val_test = Some((v.clone(), t.clone()));
        }
        systems.push(System {
            id: sid.to_string(),
            label: label.to_string(),
            val: v.as_ref().map(Scores::from),
            test: Scores::from(&t),
            tuned_f1: tuned,
            test_ci95: BTreeMap::new(),
        });
    }
    let (mv, mt) = model_val_test.expect("the model is the first scorer");

    // Random: the exact expectation, and the mean over seeded scorings.
    let exact_val = (!val.is_empty()).then(|| Scores(expected_random(&model_val, &opts).entries()));
    let exact_test = Scores(expected_random(&model_test, &opts).entries());
    let (random_rows, random_auc) = random_per_query(&model_test, &opts);
    let keys: Vec<String> = samples[0].keys().iter().filter(|k| *k != "auc").cloned().collect();
    samples.push(Sample::from_per_query(&keys, random_rows, random_auc));
    systems.push(System {
        id: "random".into(),
        label: "random (exact expectation)".into(),
        val: exact_val,
        test: exact_test,
        tuned_f1: None,
        test_ci95: BTreeMap::new(),
    });

    // Intervals: every system on the same resampled queries, so that lifts are paired.
    let hk = p.headline_k();
    let nd = format!("ndcg@{hk}");
    let headline: Vec<&str> = [nd.as_str()].into_iter().chain(LIFT_METRICS).chain(["p@1"]).collect();
    let dists: Vec<Distribution> = bootstrap::resample(&samples.iter().collect::<Vec<_>>(), &boot)
        .map_err(|e| StageError::failed(format!("bootstrap: {e}")))?;
    for (system, dist) in systems.iter_mut().zip(&dists) {
        for metric in &headline {
            if let Some(ci) = dist.interval(metric, boot.level) {
                system.test_ci95.insert(metric.to_string(), ci);
            }
        }
    }

    let (mut runs_val, mut runs_test, mut runs_f1) = (Vec::new(), Vec::new(), Vec::new());
    for s in 0..p.random_seeds as u64 {
        let seed = (p.seed as u64).wrapping_mul(1_000_003).wrapping_add(s);
        let scores = random_scores(pairs.len(), seed);
        let (v, t, tuned) = measure(
            "random",
            &to_preds(&val, &scores[..val.len()]),
            &to_preds(&test_refs, &scores[val.len()..]),
            &opts,
        )?;
        if let Some(v) = v {
            runs_val.push(v.entries());
        }
        runs_test.push(t.entries());
        runs_f1.push(vec![("f1".to_string(), tuned)]);
    }
    let (val_mean, _) = mean_sd(&runs_val);
    let (test_mean, test_sd) = mean_sd(&runs_test);
    let (f1_mean, _) = mean_sd(&runs_f1);
    systems.push(System {
        id: "random_sampled".into(),
        label: format!("random (mean of {} seeds)", p.random_seeds),
        val: (!runs_val.is_empty()).then_some(val_mean),
        test: test_mean,
        tuned_f1: f1_mean.get("f1"),
        test_ci95: BTreeMap::new(),
    });

    // Lifts on test, each with its paired interval.
    let model = &systems[0].test;
    let mut lifts = Vec::new();
    for (base, dist) in systems.iter().zip(&dists).filter(|(s, _)| BASELINES.contains(&s.id.as_str())) {
        for metric in [nd.as_str()].into_iter().chain(LIFT_METRICS) {
            let (m, b) = (model.get(metric), base.test.get(metric));
            let lift = m.zip(b).map(|(m, b)| m - b);
            let paired = bootstrap::paired(&dists[0], dist, metric, boot.level);
            lifts.push(Lift {
                baseline: base.id.clone(),
                metric: metric.to_string(),
                model: m,
                base: b,
                lift,
                headroom: lift.zip(b).and_then(|(l, b)| (b < 1.0).then(|| l / (1.0 - b))),
                ci95: paired.map(|d| d.ci95),
                p_value: paired.map(|d| d.p_value),
                significant: paired.map(|d| d.significant()),
            });
        }
    }

    // Slices on test.
    let ndcg_k = {
        let mut ks: Vec<usize> = opts.ks.clone();
        ks.sort_unstable();
        ks.dedup();
        ks.iter().position(|&k| k == hk).unwrap_or(0)
    };
    let model_pq = metrics::per_query(&model_test, &opts).map_err(metrics_err("model"))?;
    let bm25_pq = metrics::per_query(&to_preds(&test_refs, &main.scores_test), &opts).map_err(metrics_err("bm25"))?;
    let model_map: slices::PerQuery = model_pq.iter().map(|q| (q.query.as_str(), q)).collect();
    let bm25_map: slices::PerQuery = bm25_pq.iter().map(|q| (q.query.as_str(), q)).collect();
    let freq = slices::TrainFrequency::new(train.iter().map(|r| r.record.query.as_str()));
    let fmin = p.frequent_min as usize;
    let qs = |order: &[&str], key: &dyn Fn(&str) -> String| {
        slices::query_slices(&test, &model_map, &bm25_map, ndcg_k, p.threshold, order, key)
    };
    let slices_out = SlicesOut {
        relevance: slices::relevance_slices(&test, p.threshold),
        query_length: qs(&["1 word", "2 words", "3 words", "4+ words"], &|q| length_slice(q).to_string()),
        digits_units: qs(&["with digits or units", "without"], &|q| {
            if has_digits_or_units(q) { "with digits or units" } else { "without" }.to_string()
        }),
        frequency: qs(&["frequent", "long tail", "unseen word"], &|q| freq.slice(q, fmin).to_string()),
    };

    let mut by_rel: Vec<(f64, Vec<f64>)> = Vec::new();
    for r in &slices_out.relevance {
        let scores = test.iter().filter(|t| (t.relevance - r.relevance).abs() < 1e-9).map(|t| t.score).collect();
        by_rel.push((r.relevance, scores));
    }

    let test_labels: Vec<bool> = test.iter().map(|t| t.label).collect();
    let positive_rate = test_labels.iter().filter(|&&l| l).count() as f64 / test.len() as f64;
    let mut curves = Curves { test_positive_rate: positive_rate, ..Default::default() };
    let test_scores: Vec<f64> = test.iter().map(|t| t.score).collect();
    for (name, scores) in [("model", &test_scores), ("BM25", &main.scores_test)] {
        if let Some((roc, pr)) = slices::curves(scores, &test_labels, 400) {
            curves.roc.push((name.to_string(), roc));
            curves.pr.push((name.to_string(), pr));
        }
    }

    let test_queries: HashSet<&str> = test.iter().map(|t| t.query.as_str()).collect();
    let val_queries: HashSet<&str> = val.iter().map(|t| t.query.as_str()).collect();
    let data = DataSummary {
        val_pairs: val.len(),
        val_queries: val_queries.len(),
        test_pairs: test.len(),
        test_queries: test_queries.len(),
        test_positive_rate: positive_rate,
        split_pairs_not_scored,
        train_queries: train.iter().map(|r| r.record.query.as_str()).collect::<HashSet<_>>().len(),
        test_queries_seen_in_train: test_queries.iter().filter(|q| freq.seen(q)).count(),
        bm25_documents: main.documents,
        bm25_avgdl: main.avgdl,
    };

    let evaluate_check = check_evaluation(evaluation, mv.as_ref(), &mt);

    Ok(Analysis {
        stage: id.to_string(),
        params: p.clone(),
        headline_k: hk,
        data,
        random_seeds: SeedSpread { seeds: p.random_seeds as usize, test_sd },
        lifts,
        slices: slices_out,
        calibration: slices::calibration(&test, p.calibration_bins as usize),
        errors: slices::confident_errors(&test, &main.scores_test, p.threshold, p.top_errors as usize),
        score_by_relevance: by_rel,
        curves,
        training,
        evaluate_check,
        systems,
    })
}

fn check_evaluation(evaluation: Option<&serde_json::Value>, val: Option<&Metrics>, test: &Metrics) -> EvaluateCheck {
    let Some(ev) = evaluation else {
        return EvaluateCheck { found: false, compared: 0, differences: Vec::new() };
    };
    let (mut compared, mut differences) = (0, Vec::new());
    for (part, ours) in [("val", val), ("test", Some(test))] {
        let (Some(ours), Some(theirs)) = (ours, ev.get(part).and_then(|v| v.as_object())) else { continue };
        for (key, v) in ours.entries() {
            let Some(t) = theirs.get(&key) else { continue };
            compared += 1;
            match (t.as_f64(), v) {
                (Some(a), Some(b)) if (a - b).abs() <= 1e-9 => {}
                (None, None) => {}
                (a, b) => differences.push(format!("{part}.{key}: evaluate {a:?} vs analyze {b:?}")),
            }
        }
    }
    EvaluateCheck { found: true, compared, differences }
}

/// The upstream of a kind if the pipeline has one; an error if it has several.
impl TypedStage for Analyze {
    type Params = AnalyzeParams;
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const DEFAULTS: &'static str = DEFAULTS;
    const CONTRACT: Contract = CONTRACT;

    fn run(ctx: &StageContext, p: &AnalyzeParams) -> Result<StageOutput, StageError> {
        let eval_dir = &ctx.upstream_of(&[super::evaluate::KIND])?.dir;
        let split_dir = &ctx.upstream_of(&[super::split::KIND])?.dir;
        let train_dir = ctx.optional_upstream(&[super::train::KIND])?.map(|u| &u.dir);

        let scored = read_scored(&eval_dir.join(super::evaluate::PREDICTIONS))?;
        let metrics_path = eval_dir.join(super::evaluate::METRICS);
        let evaluation: Option<serde_json::Value> = if metrics_path.is_file() {
            let bytes = std::fs::read(&metrics_path).map_err(|e| StageError::io(&metrics_path, e))?;
            Some(serde_json::from_slice(&bytes).map_err(|e| StageError::Data {
                file: metrics_path.display().to_string(),
                line: e.line() as u64,
                message: format!("not JSON: {e}"),
            })?)
        } else {
            None
        };
        let mut split: [Vec<Labeled>; 3] = Default::default();
        for (i, file) in super::split::FILES.iter().enumerate() {
            split[i] = table::read_labeled(&split_dir.join(file))?;
        }
        let training = match train_dir {
            Some(d) => Some(read_train_log(&d.join(super::train::TRAIN_LOG))?),
            None => None,
        };
        ctx.check_cancel()?;

        let analysis = analyze(ctx.id, p, &scored, &split, evaluation.as_ref(), training)?;
        ctx.check_cancel()?;
        let json =
            serde_json::to_string_pretty(&analysis).map_err(|e| StageError::failed(format!("analysis.json: {e}")))?;
        write(ctx.out, ANALYSIS_FILE, format!("{json}\n"))?;
        let (md, html, plots) = render::render(&analysis).map_err(|e| StageError::failed(e.to_string()))?;
        write(ctx.out, REPORT_MD, md)?;
        write(ctx.out, REPORT_HTML, html)?;

        let mut stats = JsonMap::new();
        stats.insert("test_pairs".into(), analysis.data.test_pairs.into());
        stats.insert("test_queries".into(), analysis.data.test_queries.into());
        stats.insert("val_pairs".into(), analysis.data.val_pairs.into());
        stats.insert("split_pairs_not_scored".into(), analysis.data.split_pairs_not_scored.into());
        stats.insert("plots".into(), plots.into());
        stats.insert("has_train_log".into(), analysis.training.is_some().into());
        stats.insert("evaluate_metrics_differences".into(), analysis.evaluate_check.differences.len().into());
        Ok(StageOutput { metrics: analysis.metric_keys(), stats })
    }
}

/// `(report.md, report.html, charts)` of an analysis, as the stage writes them.
pub fn render_report(a: &Analysis) -> Result<(String, String, usize), crate::report::plots::PlotError> {
    render::render(a)
}

fn write(dir: &Path, name: &str, text: String) -> Result<(), StageError> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|e| StageError::io(&path, e))
}
