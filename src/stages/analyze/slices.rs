//! Where the model goes wrong: test metrics by slice, the most confident errors, calibration, and
//! the ROC and precision-recall curves.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::baselines::tokenize;
use super::ScoredPair;
use crate::metrics::{classify, roc_auc, QueryMetrics};

/// Unit words that mark a measurement query. `in` only with its dot: bare "in" is mostly the
/// preposition ("built in microwave").
const UNIT_WORDS: &[&str] = &[
    "in.", "inch", "inches", "ft", "ft.", "feet", "foot", "gal", "gal.", "gallon", "gallons", "lb", "lb.", "lbs",
    "lbs.", "pound", "pounds", "oz", "oz.", "ounce", "sq", "sq.", "cu", "cu.", "volt", "volts", "watt", "watts", "amp",
    "amps", "mm", "cm", "yd", "yd.", "qt", "qt.", "btu",
];

/// Whether a query asks for a measurement: it contains a digit or a unit word (by whitespace token,
/// lowercased, trailing commas dropped).
pub fn has_digits_or_units(query: &str) -> bool {
    query.chars().any(|c| c.is_ascii_digit())
        || query.split_whitespace().any(|w| UNIT_WORDS.contains(&w.to_lowercase().trim_end_matches(',')))
}

/// Words by whitespace, the way a user typed them.
pub fn query_length(query: &str) -> usize {
    query.split_whitespace().count()
}

/// The query-length slice name.
pub fn length_slice(query: &str) -> &'static str {
    match query_length(query) {
        0 | 1 => "1 word",
        2 => "2 words",
        3 => "3 words",
        _ => "4+ words",
    }
}

/// How often each word occurs in the train split's queries (counted once per distinct query).
#[derive(Debug, Default)]
pub struct TrainFrequency {
    word_queries: HashMap<String, usize>,
    queries: HashSet<String>,
}

impl TrainFrequency {
    pub fn new<'a>(train_queries: impl IntoIterator<Item = &'a str>) -> TrainFrequency {
        let mut f = TrainFrequency::default();
        for q in train_queries {
            if f.queries.insert(q.to_string()) {
                let words: HashSet<String> = tokenize(q).into_iter().collect();
                for w in words {
                    *f.word_queries.entry(w).or_default() += 1;
                }
            }
        }
        f
    }

    /// The number of train queries containing the query's rarest word (0 for a query without words).
    pub fn rarest_word(&self, query: &str) -> usize {
        tokenize(query).iter().map(|w| self.word_queries.get(w).copied().unwrap_or(0)).min().unwrap_or(0)
    }

    /// Whether this exact query string occurs in train (never, with a query-grouped split).
    pub fn seen(&self, query: &str) -> bool {
        self.queries.contains(query)
    }

    pub fn slice(&self, query: &str, frequent_min: usize) -> &'static str {
        match self.rarest_word(query) {
            0 => "unseen word",
            n if n < frequent_min => "long tail",
            _ => "frequent",
        }
    }
}

/// Metrics of the test queries in one slice.
#[derive(Debug, Clone, Serialize)]
pub struct QuerySlice {
    pub name: String,
    pub queries: usize,
    pub pairs: usize,
    pub positives: usize,
    /// Mean headline NDCG over the slice's non-degenerate queries; `None` if there are none.
    pub ndcg: Option<f64>,
    pub map: Option<f64>,
    pub mrr: Option<f64>,
    /// Pair-level AUC within the slice.
    pub auc: Option<f64>,
    pub accuracy: f64,
    /// The BM25 baseline's NDCG on the same queries, for the lift within the slice.
    pub bm25_ndcg: Option<f64>,
}

/// Test pairs at one relevance grade.
#[derive(Debug, Clone, Serialize)]
pub struct RelevanceSlice {
    pub relevance: f64,
    pub pairs: usize,
    pub positives: usize,
    pub mean_score: f64,
    /// Share of the pairs with score >= threshold.
    pub predicted_positive: f64,
    pub accuracy: f64,
    /// Mean rank within the query (1 = top).
    pub mean_rank: f64,
}

fn mean_of(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let (mut s, mut n) = (0.0, 0usize);
    for v in values.flatten() {
        s += v;
        n += 1;
    }
    (n > 0).then(|| s / n as f64)
}

/// Per-query metrics by query string, for one system.
pub type PerQuery<'a> = HashMap<&'a str, &'a QueryMetrics>;

/// The headline NDCG of one query (`ndcg_k` is its index in the K list).
fn ndcg_of(q: Option<&&QueryMetrics>, ndcg_k: usize) -> Option<f64> {
    q.and_then(|q| q.ndcg.get(ndcg_k).and_then(|(_, v)| *v))
}

/// Group the test pairs by `key(query)` and measure each group; groups come out in `order`.
pub fn query_slices(
    test: &[ScoredPair],
    model: &PerQuery,
    bm25: &PerQuery,
    ndcg_k: usize,
    threshold: f64,
    order: &[&str],
    key: impl Fn(&str) -> String,
) -> Vec<QuerySlice> {
    let mut groups: BTreeMap<String, Vec<&ScoredPair>> = BTreeMap::new();
    for p in test {
        groups.entry(key(&p.query)).or_default().push(p);
    }
    let mut names: Vec<String> = order.iter().map(|s| s.to_string()).collect();
    names.extend(groups.keys().filter(|k| !order.contains(&k.as_str())).cloned());
    names
        .into_iter()
        .map(|name| {
            let pairs = groups.get(&name).map(Vec::as_slice).unwrap_or(&[]);
            let queries: Vec<&str> = {
                let mut q: Vec<&str> = pairs.iter().map(|p| p.query.as_str()).collect();
                q.sort_unstable();
                q.dedup();
                q
            };
            let scores: Vec<f64> = pairs.iter().map(|p| p.score).collect();
            let labels: Vec<bool> = pairs.iter().map(|p| p.label).collect();
            QuerySlice {
                queries: queries.len(),
                pairs: pairs.len(),
                positives: labels.iter().filter(|&&l| l).count(),
                ndcg: mean_of(queries.iter().map(|q| ndcg_of(model.get(q), ndcg_k))),
                map: mean_of(queries.iter().map(|q| model.get(q).and_then(|m| m.average_precision))),
                mrr: mean_of(queries.iter().map(|q| model.get(q).and_then(|m| m.reciprocal_rank))),
                auc: roc_auc(&scores, &labels),
                accuracy: classify(&scores, &labels, threshold).accuracy,
                bm25_ndcg: mean_of(queries.iter().map(|q| ndcg_of(bm25.get(q), ndcg_k))),
                name,
            }
        })
        .collect()
}

/// Test pairs by relevance grade, ascending.
pub fn relevance_slices(test: &[ScoredPair], threshold: f64) -> Vec<RelevanceSlice> {
    let mut groups: BTreeMap<i64, Vec<&ScoredPair>> = BTreeMap::new();
    for p in test {
        // Grades are multiples of 1/12 at most; thousandths key them exactly and sort numerically.
        groups.entry((p.relevance * 1000.0).round() as i64).or_default().push(p);
    }
    groups
        .into_values()
        .map(|ps| {
            let n = ps.len() as f64;
            let scores: Vec<f64> = ps.iter().map(|p| p.score).collect();
            let labels: Vec<bool> = ps.iter().map(|p| p.label).collect();
            RelevanceSlice {
                relevance: ps[0].relevance,
                pairs: ps.len(),
                positives: labels.iter().filter(|&&l| l).count(),
                mean_score: scores.iter().sum::<f64>() / n,
                predicted_positive: scores.iter().filter(|&&s| s >= threshold).count() as f64 / n,
                accuracy: classify(&scores, &labels, threshold).accuracy,
                mean_rank: ps.iter().map(|p| p.rank as f64).sum::<f64>() / n,
            }
        })
        .collect()
}

/// One bin of the calibration table.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationBin {
    pub lo: f64,
    pub hi: f64,
    pub count: usize,
    /// `None` for an empty bin.
    pub mean_score: Option<f64>,
    pub positive_rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub bins: Vec<CalibrationBin>,
    /// Expected calibration error: Σ_bins count/N · |mean score − positive rate|.
    pub ece: f64,
    /// Scores outside [0, 1], counted in the end bins.
    pub out_of_range: usize,
}

pub fn calibration(pairs: &[ScoredPair], bins: usize) -> Calibration {
    let mut sums = vec![(0usize, 0.0f64, 0usize); bins];
    let mut out_of_range = 0;
    for p in pairs {
        if !(0.0..=1.0).contains(&p.score) {
            out_of_range += 1;
        }
        let b = ((p.score * bins as f64).floor().max(0.0) as usize).min(bins - 1);
        sums[b].0 += 1;
        sums[b].1 += p.score;
        sums[b].2 += usize::from(p.label);
    }
    let total = pairs.len().max(1) as f64;
    let mut ece = 0.0;
    let bins = sums
        .iter()
        .enumerate()
        .map(|(i, &(count, s, pos))| {
            let (mean_score, positive_rate) =
                if count == 0 { (None, None) } else { (Some(s / count as f64), Some(pos as f64 / count as f64)) };
            if let (Some(m), Some(r)) = (mean_score, positive_rate) {
                ece += count as f64 / total * (m - r).abs();
            }
            CalibrationBin {
                lo: i as f64 / bins as f64,
                hi: (i + 1) as f64 / bins as f64,
                count,
                mean_score,
                positive_rate,
            }
        })
        .collect();
    Calibration { bins, ece, out_of_range }
}

/// A test pair the model got confidently wrong.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorCase {
    pub query: String,
    pub product_id: String,
    pub title: String,
    pub relevance: f64,
    pub label: bool,
    pub score: f64,
    pub rank: usize,
    pub bm25: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfidentErrors {
    /// Irrelevant pairs with score >= threshold, highest score first.
    pub false_positives: Vec<ErrorCase>,
    /// Relevant pairs with score < threshold, lowest score first.
    pub false_negatives: Vec<ErrorCase>,
}

pub fn confident_errors(test: &[ScoredPair], bm25: &[f64], threshold: f64, top: usize) -> ConfidentErrors {
    let case = |i: usize| {
        let p = &test[i];
        ErrorCase {
            query: p.query.clone(),
            product_id: p.product_id.clone(),
            title: p.title.clone(),
            relevance: p.relevance,
            label: p.label,
            score: p.score,
            rank: p.rank,
            bm25: bm25[i],
        }
    };
    let tie = |a: usize, b: usize| (&test[a].query, &test[a].product_id).cmp(&(&test[b].query, &test[b].product_id));
    let mut fp: Vec<usize> = (0..test.len()).filter(|&i| !test[i].label && test[i].score >= threshold).collect();
    fp.sort_by(|&a, &b| test[b].score.total_cmp(&test[a].score).then(tie(a, b)));
    let mut fn_: Vec<usize> = (0..test.len()).filter(|&i| test[i].label && test[i].score < threshold).collect();
    fn_.sort_by(|&a, &b| test[a].score.total_cmp(&test[b].score).then(tie(a, b)));
    ConfidentErrors {
        false_positives: fp.into_iter().take(top).map(case).collect(),
        false_negatives: fn_.into_iter().take(top).map(case).collect(),
    }
}

/// Points of a curve, (x, y).
pub type Curve = Vec<(f64, f64)>;

/// ROC curve points (FPR, TPR) and precision-recall points (recall, precision), one per distinct
/// score, from the top; `None` when one label is missing. At most `max_points` each (evenly thinned,
/// ends kept), which keeps an SVG of a large test split small without changing its shape visibly.
pub fn curves(scores: &[f64], labels: &[bool], max_points: usize) -> Option<(Curve, Curve)> {
    let pos = labels.iter().filter(|&&l| l).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut roc = vec![(0.0, 0.0)];
    let mut pr = Vec::new();
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < idx.len() {
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            if labels[idx[i]] {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        roc.push((fp as f64 / neg as f64, tp as f64 / pos as f64));
        pr.push((tp as f64 / pos as f64, tp as f64 / (tp + fp) as f64));
    }
    Some((thin(roc, max_points), thin(pr, max_points)))
}

fn thin(points: Vec<(f64, f64)>, max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max || max < 2 {
        return points;
    }
    let last = points.len() - 1;
    (0..max).map(|j| points[j * last / (max - 1)]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_features() {
        assert!(has_digits_or_units("2x4 lumber"));
        assert!(has_digits_or_units("copper pipe 1/2 in."));
        assert!(has_digits_or_units("5 Gal. bucket"));
        assert!(has_digits_or_units("twelve volt battery"));
        assert!(!has_digits_or_units("built in microwave"));
        assert!(!has_digits_or_units("angle bracket"));
        assert_eq!(length_slice("a"), "1 word");
        assert_eq!(length_slice("  a  b "), "2 words");
        assert_eq!(length_slice("a b c d e"), "4+ words");
        let f = TrainFrequency::new(["angle bracket", "l bracket", "bracket", "deck screws", "bracket"]);
        assert_eq!(f.rarest_word("bracket"), 3);
        assert_eq!(f.rarest_word("angle bracket"), 1);
        assert_eq!(f.rarest_word("angle zebra"), 0);
        assert_eq!(f.slice("bracket", 3), "frequent");
        assert_eq!(f.slice("angle bracket", 3), "long tail");
        assert_eq!(f.slice("zebra", 3), "unseen word");
        assert!(f.seen("l bracket") && !f.seen("l  bracket"));
    }

    #[test]
    fn curves_step_through_distinct_scores() {
        let scores = [0.9, 0.8, 0.8, 0.3];
        let labels = [true, false, true, false];
        let (roc, pr) = curves(&scores, &labels, 100).unwrap();
        assert_eq!(roc, vec![(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]);
        assert_eq!(pr, vec![(0.5, 1.0), (1.0, 2.0 / 3.0), (1.0, 0.5)]);
        assert!(curves(&scores, &[true; 4], 100).is_none());
        let long: Vec<(f64, f64)> = (0..1000).map(|i| (i as f64, 0.0)).collect();
        let t = thin(long, 11);
        assert_eq!(t.len(), 11);
        assert_eq!((t[0].0, t[10].0), (0.0, 999.0));
    }
}
