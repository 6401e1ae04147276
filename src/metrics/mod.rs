//! Ranking and classification metrics as pure functions over scored (query, candidate) pairs.
//!
//! Every number `pipe` prints about a model comes from here, so that `pipe metrics`, the evaluate
//! stage and the analyze stage's baselines cannot disagree about what a metric means. Nothing in this
//! module does I/O except [`read_predictions`], which only turns a CSV file into [`Prediction`]s.
//!
//! # What is computed
//!
//! Per query, then averaged over queries: NDCG@K on graded gains, average precision (MAP), reciprocal
//! rank (MRR), precision@K on binary labels, and the Spearman correlation of score and relevance.
//! Over all pairs at once: accuracy, precision, recall and F1 at a score threshold (a pair is predicted
//! positive when `score >= threshold`), ROC AUC, and the RMSE of a relevance prediction obtained by
//! calibrating scores with isotonic regression ([`Isotonic`]).
//!
//! # Conventions
//!
//! **Degenerate queries.** A query is degenerate for a metric when the target that metric reads takes
//! a single value over the query's candidates: the gain for NDCG, the relevance for Spearman, the
//! binary label for MAP, MRR and P@K. That covers a query with one candidate, one whose labels are all
//! equal (all relevant or none), and one whose ideal DCG is zero (all gains zero). On such a query every
//! order of the candidates scores the same (or the metric is undefined), so it says nothing about the
//! model: **it is excluded from that metric's mean**, and [`Coverage`] reports how many queries each
//! mean is over. A mean over no queries is `None` (`null` in JSON). This is the one place where values
//! differ from scikit-learn's, which returns a constant for some of these cases (0 for an all-zero
//! `ndcg_score` query, 1 for an all-equal nonzero one, 0 with a warning for `average_precision_score`
//! without positives) and raises for a one-candidate `ndcg_score`; on every other query the values are
//! scikit-learn's, and the fixtures under `tests/fixtures/metrics/` check that to 1e-9.
//!
//! **Tied scores.** NDCG averages the gain over each group of tied candidates, which is the mean DCG
//! over all orders of the ties (scikit-learn's `ndcg_score` with `ignore_ties=False`). MRR and P@K
//! likewise take their expectation over the orders of tied candidates. Average precision follows
//! scikit-learn's `average_precision_score`, which steps through distinct score thresholds, so a tie
//! group enters the precision-recall curve as one step. AUC counts a tied positive/negative pair as
//! half (the Mann–Whitney statistic with mid-ranks). Spearman uses mid-ranks (scipy's `spearmanr`); a
//! query whose scores are all tied (but whose relevance varies) scores 0, the value random
//! tie-breaking averages to, rather than scipy's `nan`.
//!
//! **Other choices.** Gains are `relevance - 1` ([`Gain::Linear`]) or `2^(relevance - 1) - 1`
//! ([`Gain::Exp`]); relevance below 1 is an error because a negative gain has no meaning in NDCG. The
//! ideal order for NDCG comes from the query's own candidates. P@K divides by `min(K, n)`, so a query
//! with fewer than K candidates is measured over all of them. Precision, recall and F1 are 0 when
//! their denominator is 0 (scikit-learn's `zero_division` default). Without an explicit label a pair is
//! relevant when `relevance >= 2.33` ([`Options::positive_relevance`]).

pub mod bootstrap;
mod calibrate;
mod classify;
mod ranking;
mod read;
mod table;

#[cfg(test)]
mod tests;

use std::ops::Range;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};

pub use calibrate::Isotonic;
pub use classify::{classify, roc_auc, tune_threshold, Classification, TunedThreshold};
pub use read::{parse_predictions, read_predictions, ReadError};
pub use table::render_table;

/// One scored (query, candidate) pair: the unit every metric reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Candidates are grouped into queries by this exact string.
    pub query: String,
    /// Graded relevance (1 to 3 on the Home Depot data).
    pub relevance: f64,
    /// Higher means more relevant; only order matters to the ranking metrics and AUC.
    pub score: f64,
    /// Binary relevance; `None` derives it as `relevance >= Options::positive_relevance`.
    pub label: Option<bool>,
}

/// How a relevance grade becomes an NDCG gain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gain {
    /// `relevance - 1`: grades 1..3 become gains 0..2.
    #[default]
    Linear,
    /// `2^(relevance - 1) - 1`: rewards the top grade more, as in the Burges et al. formulation.
    Exp,
}

impl Gain {
    pub fn of(self, relevance: f64) -> f64 {
        let g = relevance - 1.0;
        match self {
            Gain::Linear => g,
            Gain::Exp => g.exp2() - 1.0,
        }
    }
}

/// The knobs of a metrics computation; the defaults are the project's published ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Cut-offs for NDCG@K and P@K; they also name the JSON keys (`ndcg@K`, `p@K`).
    pub ks: Vec<usize>,
    /// Classification threshold on the score (positive when `score >= threshold`).
    pub threshold: f64,
    pub gain: Gain,
    /// Relevance from which a pair without an explicit label counts as relevant.
    pub positive_relevance: f64,
}

impl Default for Options {
    fn default() -> Self {
        Options { ks: vec![1, 3, 5, 10], threshold: 0.5, gain: Gain::Linear, positive_relevance: 2.33 }
    }
}

/// Why metrics could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricsError {
    #[error("no predictions to score")]
    Empty,
    #[error("the list of cut-offs K is empty")]
    NoCutoffs,
    #[error("cut-off K must be at least 1")]
    ZeroCutoff,
    #[error("{what} {value} is not a finite number")]
    BadOption { what: &'static str, value: f64 },
    #[error("query `{query}`: {what} is {value}, expected a finite number")]
    NonFinite { query: String, what: &'static str, value: f64 },
    #[error("query `{query}`: relevance {relevance} gives a negative gain; relevance must be at least 1")]
    NegativeGain { query: String, relevance: f64 },
}

/// How many queries each per-query mean is over (the rest were degenerate for it; see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    /// Queries whose gains are not all equal: NDCG@K for every K.
    pub ndcg: usize,
    /// Queries with both a relevant and a non-relevant candidate: MAP, MRR and P@K.
    pub binary: usize,
    /// Queries whose relevance is not all equal: Spearman.
    pub spearman: usize,
}

/// The headline numbers for one set of predictions.
///
/// Serialises to exactly the keys `ndcg@K… map mrr p@K… accuracy precision recall f1 auc spearman
/// rmse queries pairs` in that order (K following [`Options::ks`]); `None` becomes `null`.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// `(K, NDCG@K)` in the order of [`Options::ks`].
    pub ndcg: AtK,
    pub map: Option<f64>,
    pub mrr: Option<f64>,
    /// `(K, P@K)` in the order of [`Options::ks`].
    pub precision_at: AtK,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// `None` when all pairs share one label.
    pub auc: Option<f64>,
    pub spearman: Option<f64>,
    /// RMSE of the calibrated relevance prediction against the true relevance.
    pub rmse: f64,
    pub queries: usize,
    pub pairs: usize,
    /// Not serialised: the JSON keys are fixed. Shown by [`render_table`].
    pub coverage: Coverage,
    /// The threshold accuracy/precision/recall/F1 were taken at. Not serialised.
    pub threshold: f64,
}

impl Metrics {
    /// `(key, value)` for every metric in JSON order, without the `queries`/`pairs` counts.
    pub fn entries(&self) -> Vec<(String, Option<f64>)> {
        let mut out = Vec::with_capacity(self.ndcg.len() + self.precision_at.len() + 9);
        out.extend(self.ndcg.iter().map(|&(k, v)| (format!("ndcg@{k}"), v)));
        out.push(("map".into(), self.map));
        out.push(("mrr".into(), self.mrr));
        out.extend(self.precision_at.iter().map(|&(k, v)| (format!("p@{k}"), v)));
        out.push(("accuracy".into(), Some(self.accuracy)));
        out.push(("precision".into(), Some(self.precision)));
        out.push(("recall".into(), Some(self.recall)));
        out.push(("f1".into(), Some(self.f1)));
        out.push(("auc".into(), self.auc));
        out.push(("spearman".into(), self.spearman));
        out.push(("rmse".into(), Some(self.rmse)));
        out
    }

    /// One metric by its JSON key (`"ndcg@10"`, `"auc"`, …); `None` when absent or undefined.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.entries().into_iter().find(|(k, _)| k == key).and_then(|(_, v)| v)
    }
}

impl Serialize for Metrics {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let entries = self.entries();
        let mut map = serializer.serialize_map(Some(entries.len() + 2))?;
        for (k, v) in &entries {
            map.serialize_entry(k, v)?;
        }
        map.serialize_entry("queries", &self.queries)?;
        map.serialize_entry("pairs", &self.pairs)?;
        map.end()
    }
}

/// One query's per-query metrics, for error slices (query length, digits, frequency) and debugging.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueryMetrics {
    pub query: String,
    pub candidates: usize,
    /// `(K, NDCG@K)`; `None` when the query is degenerate for NDCG.
    pub ndcg: AtK,
    pub average_precision: Option<f64>,
    pub reciprocal_rank: Option<f64>,
    pub precision_at: AtK,
    pub spearman: Option<f64>,
}

/// Validation metrics, test metrics, and the F1-maximising threshold carried from one to the other.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitMetrics {
    /// Its `rmse` is calibrated on validation itself (in-sample, so optimistic).
    pub val: Metrics,
    /// Its `rmse` is calibrated on validation: the held-out figure to report.
    pub test: Metrics,
    /// `None` when validation has no relevant pair to tune on.
    pub tuned: Option<TunedSplit>,
}

/// The threshold that maximises F1 on validation, and what it gives on test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TunedSplit {
    pub threshold: f64,
    pub val_f1: f64,
    pub test: Classification,
}

/// `(K, value)` for each cut-off, in the order of [`Options::ks`].
pub type AtK = Vec<(usize, Option<f64>)>;

/// A pair after validation: the gain and label resolved, ready to rank.
#[derive(Debug, Clone, Copy)]
struct Item {
    score: f64,
    relevance: f64,
    gain: f64,
    label: bool,
}

/// Rows in canonical order: by query, then score descending. Every sum runs in this order, which is
/// what makes the results bit-for-bit independent of the order of the input rows.
struct Prepared<'a> {
    items: Vec<Item>,
    /// Per query: its name and its range in `items`.
    queries: Vec<(&'a str, Range<usize>)>,
}

fn check_options(opts: &Options) -> Result<Vec<usize>, MetricsError> {
    if opts.ks.is_empty() {
        return Err(MetricsError::NoCutoffs);
    }
    if opts.ks.contains(&0) {
        return Err(MetricsError::ZeroCutoff);
    }
    for (what, value) in [("threshold", opts.threshold), ("positive_relevance", opts.positive_relevance)] {
        if !value.is_finite() {
            return Err(MetricsError::BadOption { what, value });
        }
    }
    // Duplicates would repeat a JSON key; sorting keeps `ndcg@1 … ndcg@10` readable whatever the input.
    let mut ks = opts.ks.clone();
    ks.sort_unstable();
    ks.dedup();
    Ok(ks)
}

fn prepare<'a>(rows: &'a [Prediction], opts: &Options) -> Result<Prepared<'a>, MetricsError> {
    if rows.is_empty() {
        return Err(MetricsError::Empty);
    }
    let mut order: Vec<(&'a str, Item)> = Vec::with_capacity(rows.len());
    for r in rows {
        for (what, value) in [("score", r.score), ("relevance", r.relevance)] {
            if !value.is_finite() {
                return Err(MetricsError::NonFinite { query: r.query.clone(), what, value });
            }
        }
        let gain = opts.gain.of(r.relevance);
        if gain < 0.0 {
            return Err(MetricsError::NegativeGain { query: r.query.clone(), relevance: r.relevance });
        }
        let label = r.label.unwrap_or(r.relevance >= opts.positive_relevance);
        order.push((&r.query, Item { score: r.score, relevance: r.relevance, gain, label }));
    }
    order.sort_by(|(qa, a), (qb, b)| {
        qa.cmp(qb)
            .then(b.score.total_cmp(&a.score))
            .then(a.relevance.total_cmp(&b.relevance))
            .then(a.label.cmp(&b.label))
    });
    let mut queries: Vec<(&'a str, Range<usize>)> = Vec::new();
    for (i, (q, _)) in order.iter().enumerate() {
        match queries.last_mut() {
            Some((last, range)) if last == q => range.end = i + 1,
            _ => queries.push((q, i..i + 1)),
        }
    }
    Ok(Prepared { items: order.into_iter().map(|(_, it)| it).collect(), queries })
}

/// Mean of the defined values; `None` when there are none.
fn mean_defined(values: impl Iterator<Item = Option<f64>>) -> (Option<f64>, usize) {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values.flatten() {
        sum += v;
        n += 1;
    }
    ((n > 0).then(|| sum / n as f64), n)
}

fn query_metrics(name: &str, items: &[Item], ks: &[usize]) -> QueryMetrics {
    let ties = ranking::tie_groups(items);
    QueryMetrics {
        query: name.to_string(),
        candidates: items.len(),
        ndcg: ks.iter().map(|&k| (k, ranking::ndcg(items, &ties, k))).collect(),
        average_precision: ranking::average_precision(items, &ties),
        reciprocal_rank: ranking::reciprocal_rank(items, &ties),
        precision_at: ks.iter().map(|&k| (k, ranking::precision_at(items, &ties, k))).collect(),
        spearman: ranking::spearman(items, &ties),
    }
}

/// Per-query metrics in query order (sorted by query string).
pub fn per_query(rows: &[Prediction], opts: &Options) -> Result<Vec<QueryMetrics>, MetricsError> {
    let ks = check_options(opts)?;
    let prep = prepare(rows, opts)?;
    Ok(prep.queries.iter().map(|(q, range)| query_metrics(q, &prep.items[range.clone()], &ks)).collect())
}

/// All metrics, with the relevance calibration fitted on these same rows.
///
/// This is what `pipe metrics FILE` reports: with a single file there is no validation set, so the
/// RMSE is in-sample (optimistic by the calibration's fit). Use [`evaluate_split`] or
/// [`compute_calibrated`] for a held-out RMSE.
pub fn compute(rows: &[Prediction], opts: &Options) -> Result<Metrics, MetricsError> {
    check_options(opts)?;
    let calibration = Isotonic::fit_predictions(rows)?;
    compute_calibrated(rows, opts, &calibration)
}

/// All metrics, with the RMSE of `calibration`'s relevance prediction (fitted elsewhere, on validation).
pub fn compute_calibrated(
    rows: &[Prediction],
    opts: &Options,
    calibration: &Isotonic,
) -> Result<Metrics, MetricsError> {
    let ks = check_options(opts)?;
    let prep = prepare(rows, opts)?;
    let per: Vec<QueryMetrics> =
        prep.queries.iter().map(|(q, range)| query_metrics(q, &prep.items[range.clone()], &ks)).collect();

    let at_k = |pick: fn(&QueryMetrics) -> &AtK| -> (Vec<_>, usize) {
        let mut n = 0;
        let v = ks
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let (m, count) = mean_defined(per.iter().map(|q| pick(q)[i].1));
                n = count;
                (k, m)
            })
            .collect();
        (v, n)
    };
    let (ndcg, ndcg_n) = at_k(|q| &q.ndcg);
    let (precision_at, _) = at_k(|q| &q.precision_at);
    let (map, binary_n) = mean_defined(per.iter().map(|q| q.average_precision));
    let (mrr, _) = mean_defined(per.iter().map(|q| q.reciprocal_rank));
    let (spearman, spearman_n) = mean_defined(per.iter().map(|q| q.spearman));

    let scores: Vec<f64> = prep.items.iter().map(|it| it.score).collect();
    let labels: Vec<bool> = prep.items.iter().map(|it| it.label).collect();
    let class = classify(&scores, &labels, opts.threshold);
    let sq: f64 = prep.items.iter().map(|it| (calibration.predict(it.score) - it.relevance).powi(2)).sum();

    Ok(Metrics {
        ndcg,
        map,
        mrr,
        precision_at,
        accuracy: class.accuracy,
        precision: class.precision,
        recall: class.recall,
        f1: class.f1,
        auc: roc_auc(&scores, &labels),
        spearman,
        rmse: (sq / prep.items.len() as f64).sqrt(),
        queries: prep.queries.len(),
        pairs: prep.items.len(),
        coverage: Coverage { ndcg: ndcg_n, binary: binary_n, spearman: spearman_n },
        threshold: opts.threshold,
    })
}

/// Validation and test metrics the way the evaluate stage reports them: the calibration for test's
/// RMSE and the F1-maximising threshold are both fitted on validation, never on test.
pub fn evaluate_split(val: &[Prediction], test: &[Prediction], opts: &Options) -> Result<SplitMetrics, MetricsError> {
    check_options(opts)?;
    let calibration = Isotonic::fit_predictions(val)?;
    let val_metrics = compute_calibrated(val, opts, &calibration)?;
    let test_metrics = compute_calibrated(test, opts, &calibration)?;
    let label = |r: &Prediction| r.label.unwrap_or(r.relevance >= opts.positive_relevance);
    let val_scores: Vec<f64> = val.iter().map(|r| r.score).collect();
    let val_labels: Vec<bool> = val.iter().map(label).collect();
    let test_scores: Vec<f64> = test.iter().map(|r| r.score).collect();
    let test_labels: Vec<bool> = test.iter().map(label).collect();
    let tuned = tune_threshold(&val_scores, &val_labels).map(|t| TunedSplit {
        threshold: t.threshold,
        val_f1: t.f1,
        test: classify(&test_scores, &test_labels, t.threshold),
    });
    Ok(SplitMetrics { val: val_metrics, test: test_metrics, tuned })
}
