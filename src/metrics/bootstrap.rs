//! Bootstrap intervals for the headline metrics, and paired intervals for the difference between
//! two systems scored on the same pairs.
//!
//! Why queries are the unit: a query's candidates are judged together and share its difficulty, so
//! pairs of one query are not independent draws; resampling pairs would make the intervals too
//! narrow. Each resample draws as many queries as there are, uniformly with replacement, and every
//! metric is recomputed on that multiset of queries with the conventions of [`crate::metrics`]
//! (per-query means over the queries not degenerate for the metric, counted with their
//! multiplicity; AUC over the union of the drawn queries' pairs).
//!
//! Why the systems are resampled together: a lift (model − baseline) is judged on the same draws
//! for both sides, which is what makes the interval of the difference narrower than the two
//! separate intervals suggest (the paired bootstrap of Koehn 2004; Efron & Tibshirani 1993, ch. 16).
//!
//! The interval is the percentile interval: the 2.5th and 97.5th percentiles of the resampled
//! values, with numpy's default linear interpolation between order statistics. The two-sided
//! p-value of a difference is `min(1, 2 · min(share ≤ 0, share ≥ 0))` of the resampled
//! differences: how often the resampling puts the difference on the other side of zero.
//!
//! Draws come from [`crate::util::rng`] (`stream(seed, "bootstrap", 0)`, then Lemire's `below(n)`
//! n times per resample), so a seed gives the same intervals on every machine; the committed numpy
//! script `tests/fixtures/metrics/bootstrap.py` replays the same draws.

use std::ops::Range;

use rayon::prelude::*;
use serde::Serialize;

use super::{check_options, prepare, query_metrics, Item, MetricsError, Options, Prediction};
use crate::util::rng::SplitMix64;

/// How many resamples, from which seed, at which confidence level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootstrapOptions {
    pub resamples: usize,
    pub seed: u64,
    /// 0.95 for a 95 % interval.
    pub level: f64,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        Self { resamples: 1000, seed: 0, level: 0.95 }
    }
}

/// Why intervals could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("bootstrap: {0}")]
    Mismatch(String),
    #[error("bootstrap: at least one resample is needed")]
    NoResamples,
    #[error("bootstrap: level {0} is not in (0, 1)")]
    Level(f64),
}

/// Per query (its text), a system's value of each metric, `None` where the query is degenerate for it.
pub type PerQuery = Vec<(String, Vec<Option<f64>>)>;

/// One system's predictions reduced to what a resample needs: each query's per-query metric
/// values, and its pairs for AUC.
#[derive(Debug, Clone)]
pub struct Sample {
    queries: Vec<String>,
    /// Metric keys (`ndcg@K`…, `map`, `mrr`, `p@K`…), then `auc` last.
    keys: Vec<String>,
    /// `[query][metric]`, `None` where the query is degenerate for the metric.
    per_query: Vec<Vec<Option<f64>>>,
    auc: Auc,
}

/// How a resample's AUC is found.
#[derive(Debug, Clone)]
enum Auc {
    /// From the pairs, in descending score order as (query index, label), cut into runs of equal
    /// scores.
    Pairs { pairs: Vec<(u32, bool)>, ties: Vec<Range<usize>> },
    /// The same on every resample (a random order's expectation, 0.5).
    Constant(Option<f64>),
}

impl Sample {
    pub fn new(rows: &[Prediction], opts: &Options) -> Result<Self, MetricsError> {
        let ks = check_options(opts)?;
        let prep = prepare(rows, opts)?;
        let mut keys: Vec<String> = ks.iter().map(|k| format!("ndcg@{k}")).collect();
        keys.extend(["map".to_string(), "mrr".to_string()]);
        keys.extend(ks.iter().map(|k| format!("p@{k}")));
        let mut per_query = Vec::with_capacity(prep.queries.len());
        let mut all: Vec<(u32, Item)> = Vec::with_capacity(prep.items.len());
        for (qi, (q, range)) in prep.queries.iter().enumerate() {
            let m = query_metrics(q, &prep.items[range.clone()], &ks);
            let mut row: Vec<Option<f64>> = m.ndcg.iter().map(|&(_, v)| v).collect();
            row.extend([m.average_precision, m.reciprocal_rank]);
            row.extend(m.precision_at.iter().map(|&(_, v)| v));
            per_query.push(row);
            all.extend(prep.items[range.clone()].iter().map(|&it| (qi as u32, it)));
        }
        keys.push("auc".into());
        all.sort_by(|a, b| b.1.score.total_cmp(&a.1.score));
        let mut ties: Vec<Range<usize>> = Vec::new();
        for (i, (_, it)) in all.iter().enumerate() {
            match ties.last_mut() {
                Some(g) if all[g.start].1.score == it.score => g.end = i + 1,
                _ => ties.push(i..i + 1),
            }
        }
        Ok(Self {
            queries: prep.queries.iter().map(|(q, _)| q.to_string()).collect(),
            keys,
            per_query,
            auc: Auc::Pairs { pairs: all.into_iter().map(|(q, it)| (q, it.label)).collect(), ties },
        })
    }

    /// A system known only by its per-query values (an expectation, not a scoring): `rows` maps each
    /// query to its values in the order of `keys` (without `auc`), and its AUC is `auc` on every
    /// resample. Pairs with a [`Sample::new`] of the same predictions.
    pub fn from_per_query(keys: &[String], mut rows: PerQuery, auc: Option<f64>) -> Self {
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut keys = keys.to_vec();
        keys.push("auc".into());
        let (queries, per_query) = rows.into_iter().unzip();
        Self { queries, keys, per_query, auc: Auc::Constant(auc) }
    }

    /// The metric keys, in the order of [`Distribution::values`].
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// Every metric on the multiset of queries given by `counts` (a multiplicity per query).
    fn evaluate(&self, counts: &[u32]) -> Vec<Option<f64>> {
        let metrics = self.keys.len() - 1;
        let (mut sum, mut n) = (vec![0.0f64; metrics], vec![0u64; metrics]);
        for (row, &c) in self.per_query.iter().zip(counts) {
            if c == 0 {
                continue;
            }
            for (j, v) in row.iter().enumerate() {
                if let Some(v) = v {
                    sum[j] += c as f64 * v;
                    n[j] += c as u64;
                }
            }
        }
        let mut out: Vec<Option<f64>> = sum.iter().zip(&n).map(|(s, &n)| (n > 0).then(|| s / n as f64)).collect();
        out.push(self.auc(counts));
        out
    }

    /// The Mann–Whitney AUC with each pair counted as often as its query was drawn (ties half).
    fn auc(&self, counts: &[u32]) -> Option<f64> {
        let (pairs, ties) = match &self.auc {
            Auc::Pairs { pairs, ties } => (pairs, ties),
            Auc::Constant(v) => return *v,
        };
        let weight = |q: u32| counts[q as usize] as f64;
        let (mut pos, mut neg) = (0.0, 0.0);
        for &(q, label) in pairs {
            if label {
                pos += weight(q);
            } else {
                neg += weight(q);
            }
        }
        if pos == 0.0 || neg == 0.0 {
            return None;
        }
        let (mut neg_above, mut wins) = (0.0, 0.0);
        for g in ties {
            let (mut p, mut n) = (0.0, 0.0);
            for &(q, label) in &pairs[g.clone()] {
                if label {
                    p += weight(q);
                } else {
                    n += weight(q);
                }
            }
            wins += p * ((neg - neg_above - n) + 0.5 * n);
            neg_above += n;
        }
        Some(wins / (pos * neg))
    }
}

/// The resampled values of every metric of one system: `values[metric][resample]`, `None` where a
/// resample left the metric undefined (every drawn query degenerate for it).
#[derive(Debug, Clone, PartialEq)]
pub struct Distribution {
    pub keys: Vec<String>,
    pub values: Vec<Vec<Option<f64>>>,
}

impl Distribution {
    fn metric(&self, key: &str) -> Option<&[Option<f64>]> {
        self.keys.iter().position(|k| k == key).map(|i| self.values[i].as_slice())
    }

    /// The percentile interval of one metric; `None` when no resample defined it.
    pub fn interval(&self, key: &str, level: f64) -> Option<[f64; 2]> {
        let mut v: Vec<f64> = self.metric(key)?.iter().flatten().copied().collect();
        percentile_interval(&mut v, level)
    }
}

/// The multiplicity of each of `n` queries in each resample, in draw order.
pub fn draws(n: usize, opts: &BootstrapOptions) -> Vec<Vec<u32>> {
    let mut rng = SplitMix64::stream(opts.seed, "bootstrap", 0);
    (0..opts.resamples)
        .map(|_| {
            let mut counts = vec![0u32; n];
            for _ in 0..n {
                counts[rng.below(n as u64) as usize] += 1;
            }
            counts
        })
        .collect()
}

/// Resamples every system on the same draws (they must have scored the same queries).
pub fn resample(systems: &[&Sample], opts: &BootstrapOptions) -> Result<Vec<Distribution>, BootstrapError> {
    if opts.resamples == 0 {
        return Err(BootstrapError::NoResamples);
    }
    if !(opts.level > 0.0 && opts.level < 1.0) {
        return Err(BootstrapError::Level(opts.level));
    }
    let Some(first) = systems.first() else { return Ok(Vec::new()) };
    if let Some(other) = systems.iter().find(|s| s.queries != first.queries) {
        return Err(BootstrapError::Mismatch(format!(
            "the systems scored different queries ({} and {}); a paired bootstrap needs the same ones",
            first.queries.len(),
            other.queries.len()
        )));
    }
    let counts = draws(first.queries.len(), opts);
    Ok(systems
        .iter()
        .map(|s| {
            let per_draw: Vec<Vec<Option<f64>>> = counts.par_iter().map(|c| s.evaluate(c)).collect();
            let values = (0..s.keys.len()).map(|j| per_draw.iter().map(|row| row[j]).collect::<Vec<_>>()).collect();
            Distribution { keys: s.keys.clone(), values }
        })
        .collect())
}

/// The paired interval and two-sided p-value of `a − b` for one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairedDifference {
    pub ci95: [f64; 2],
    pub p_value: f64,
}

impl PairedDifference {
    /// Whether the interval excludes zero.
    pub fn significant(&self) -> bool {
        self.ci95[0] > 0.0 || self.ci95[1] < 0.0
    }
}

/// `a − b` on each resample where both are defined; `None` when there is none.
pub fn paired(a: &Distribution, b: &Distribution, key: &str, level: f64) -> Option<PairedDifference> {
    let (xa, xb) = (a.metric(key)?, b.metric(key)?);
    let mut d: Vec<f64> = xa.iter().zip(xb).filter_map(|(x, y)| Some((*x)? - (*y)?)).collect();
    if d.is_empty() {
        return None;
    }
    let n = d.len() as f64;
    let below = d.iter().filter(|&&x| x <= 0.0).count() as f64 / n;
    let above = d.iter().filter(|&&x| x >= 0.0).count() as f64 / n;
    let p_value = (2.0 * below.min(above)).min(1.0);
    Some(PairedDifference { ci95: percentile_interval(&mut d, level)?, p_value })
}

/// The central `level` interval of `values` (numpy's default linear-interpolated percentiles).
pub fn percentile_interval(values: &mut [f64], level: f64) -> Option<[f64; 2]> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0 * 100.0;
    Some([percentile(values, tail), percentile(values, 100.0 - tail)])
}

/// numpy.percentile(sorted, q) with its default `linear` method (Hyndman & Fan type 7).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q / 100.0;
    let (lo, frac) = (h.floor() as usize, h - h.floor());
    match sorted.get(lo + 1) {
        Some(&next) if frac > 0.0 => sorted[lo] + frac * (next - sorted[lo]),
        _ => sorted[lo],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(q: &str, relevance: f64, score: f64) -> Prediction {
        Prediction { query: q.into(), relevance, score, label: None }
    }

    #[test]
    fn percentiles_match_numpy_linear() {
        // numpy.percentile([1, 2, 3, 4], [2.5, 97.5]) == [1.075, 3.925]
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        let [lo, hi] = percentile_interval(&mut v, 0.95).unwrap();
        assert!((lo - 1.075).abs() < 1e-12 && (hi - 3.925).abs() < 1e-12, "{lo} {hi}");
        assert_eq!(percentile_interval(&mut [7.0], 0.95), Some([7.0, 7.0]));
    }

    #[test]
    fn draws_are_reproducible_and_resample_every_query_count() {
        let opts = BootstrapOptions { resamples: 20, seed: 7, level: 0.95 };
        let a = draws(13, &opts);
        assert_eq!(a, draws(13, &opts));
        assert_ne!(a, draws(13, &BootstrapOptions { seed: 8, ..opts }));
        assert!(a.iter().all(|c| c.iter().sum::<u32>() == 13));
    }

    /// With every query drawn once the resample is the sample itself: the metrics equal
    /// `metrics::compute`'s.
    #[test]
    fn the_identity_draw_gives_the_plain_metrics() {
        let rows = vec![
            pred("a", 3.0, 0.9),
            pred("a", 1.0, 0.2),
            pred("a", 2.5, 0.2),
            pred("b", 1.0, 0.7),
            pred("b", 3.0, 0.1),
            pred("c", 2.0, 0.5),
        ];
        let opts = Options { ks: vec![1, 3], ..Options::default() };
        let s = Sample::new(&rows, &opts).unwrap();
        let got = s.evaluate(&[1, 1, 1]);
        let want = super::super::compute(&rows, &opts).unwrap();
        for (k, v) in s.keys().iter().zip(got) {
            assert_eq!(v, want.get(k), "{k}");
        }
    }

    /// A system compared with itself differs by exactly 0 on every resample: never significant.
    #[test]
    fn a_system_against_itself_is_not_significant() {
        let rows: Vec<Prediction> =
            (0..40).map(|i| pred(&format!("q{}", i % 8), 1.0 + (i % 3) as f64, (i * 7 % 11) as f64)).collect();
        let s = Sample::new(&rows, &Options::default()).unwrap();
        let d = resample(&[&s, &s], &BootstrapOptions { resamples: 50, ..Default::default() }).unwrap();
        let diff = paired(&d[0], &d[1], "auc", 0.95).unwrap();
        assert_eq!(diff.ci95, [0.0, 0.0]);
        assert_eq!(diff.p_value, 1.0);
        assert!(!diff.significant());
    }

    #[test]
    fn systems_must_score_the_same_queries() {
        let a = Sample::new(&[pred("a", 3.0, 0.9), pred("a", 1.0, 0.1)], &Options::default()).unwrap();
        let b = Sample::new(&[pred("b", 3.0, 0.9), pred("b", 1.0, 0.1)], &Options::default()).unwrap();
        assert!(matches!(resample(&[&a, &b], &BootstrapOptions::default()), Err(BootstrapError::Mismatch(_))));
    }

    /// The committed numpy reference (`tests/fixtures/metrics/bootstrap.py`) replays the same draws
    /// and recomputes every resample with scikit-learn: intervals and p-values agree to 1e-9.
    #[test]
    fn intervals_equal_the_numpy_reference() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics");
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("bootstrap.intervals.json")).unwrap()).unwrap();
        let mut reader = csv::Reader::from_path(dir.join("bootstrap.csv")).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for rec in reader.records() {
            let rec = rec.unwrap();
            let relevance: f64 = rec[1].parse().unwrap();
            a.push(pred(&rec[0], relevance, rec[2].parse().unwrap()));
            b.push(pred(&rec[0], relevance, rec[3].parse().unwrap()));
        }
        let ks = expected["ks"].as_array().unwrap().iter().map(|k| k.as_u64().unwrap() as usize).collect();
        let opts = Options { ks, ..Options::default() };
        let boot = BootstrapOptions {
            resamples: expected["resamples"].as_u64().unwrap() as usize,
            seed: expected["seed"].as_u64().unwrap(),
            level: 0.95,
        };
        let (sa, sb) = (Sample::new(&a, &opts).unwrap(), Sample::new(&b, &opts).unwrap());
        let d = resample(&[&sa, &sb], &boot).unwrap();
        let close = |x: f64, y: &serde_json::Value, what: &str| {
            let y = y.as_f64().unwrap();
            assert!((x - y).abs() < 1e-9, "{what}: pipe {x}, numpy {y}");
        };
        let (mut significant, mut not) = (0, 0);
        for key in sa.keys() {
            for (i, system) in ["a", "b"].iter().enumerate() {
                let want = &expected["systems"][system][key];
                let got = d[i].interval(key, 0.95).unwrap();
                close(got[0], &want[0], &format!("{system} {key} lo"));
                close(got[1], &want[1], &format!("{system} {key} hi"));
            }
            let want = &expected["a_minus_b"][key];
            let got = paired(&d[0], &d[1], key, 0.95).unwrap();
            close(got.ci95[0], &want["ci95"][0], &format!("a - b {key} lo"));
            close(got.ci95[1], &want["ci95"][1], &format!("a - b {key} hi"));
            close(got.p_value, &want["p_value"], &format!("a - b {key} p"));
            if got.significant() {
                significant += 1;
            } else {
                not += 1;
            }
        }
        // The fixture holds both kinds of lift, so both branches of the reports are exercised.
        assert!(significant > 0 && not > 0, "{significant} significant, {not} not");
    }
}
