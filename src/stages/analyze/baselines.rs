//! The baselines a model must beat: BM25 over product text ([`crate::text::bm25`], shared with `mine`), the share of the query's words the
//! product text contains, and a random order.
//!
//! On this data ranking metrics are high by chance (a random order scores NDCG@10 ≈ 0.91 on a
//! query-grouped split), so the random baseline is computed exactly where a closed form exists
//! rather than only sampled.

use std::collections::{BTreeMap, HashSet};

use crate::metrics::bootstrap::PerQuery;
use crate::metrics::{Options, Prediction};
use crate::util::rng::SplitMix64;

pub use crate::text::bm25::{tokenize, Bm25};

/// The share of the query's distinct words that occur in the document: no statistics, no learning.
/// Why it is a baseline: relevance on product search is mostly lexical overlap, so a model that does
/// not beat this has learned nothing a string match does not already know. 0 for a query without
/// words.
pub fn overlap(query: &[String], doc: &[String]) -> f64 {
    let words: HashSet<&String> = query.iter().collect();
    if words.is_empty() {
        return 0.0;
    }
    let doc: HashSet<&String> = doc.iter().collect();
    words.iter().filter(|w| doc.contains(*w)).count() as f64 / words.len() as f64
}

/// Uniform scores in [0, 1) from the project's fixed generator, so a seed means the same draw forever.
pub fn random_scores(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.next_f64()).collect()
}

/// The exact expectation of the ranking metrics under a uniformly random order of each query's
/// candidates, averaged over queries with the metrics module's convention (a query whose target is
/// constant is left out of that metric's mean).
#[derive(Debug, Clone, PartialEq)]
pub struct RandomExpectation {
    pub ndcg: Vec<(usize, Option<f64>)>,
    pub map: Option<f64>,
    pub mrr: Option<f64>,
    pub precision_at: Vec<(usize, Option<f64>)>,
    /// 0.5 whenever both labels occur.
    pub auc: Option<f64>,
}

impl RandomExpectation {
    /// `(key, value)` with the metric JSON keys.
    pub fn entries(&self) -> Vec<(String, Option<f64>)> {
        let mut out: Vec<(String, Option<f64>)> = self.ndcg.iter().map(|&(k, v)| (format!("ndcg@{k}"), v)).collect();
        out.push(("map".into(), self.map));
        out.push(("mrr".into(), self.mrr));
        out.extend(self.precision_at.iter().map(|&(k, v)| (format!("p@{k}"), v)));
        out.push(("auc".into(), self.auc));
        out
    }
}

fn discount(position: usize) -> f64 {
    1.0 / ((position + 1) as f64).log2()
}

/// Per query with `n` candidates of which `m` are relevant, under a uniformly random order:
/// - E[DCG@K] = mean gain × Σ_{p≤min(K,n)} 1/log2(p+1), since every candidate is equally likely at
///   every position; divided by the query's ideal DCG@K.
/// - E[AP] = (H_n + (m−1)/(n−1) · (n − H_n)) / n (H_n the harmonic number): position p is relevant
///   with probability m/n, and then holds 1 + (p−1)(m−1)/(n−1) relevant candidates in expectation.
/// - E[RR] = Σ_r P(first relevant at r)/r with P(first at r) = m/(n−r+1) · Π_{j<r} (n−m−j+1)/(n−j+1).
/// - E[P@K] = m/n.
pub fn expected_random(rows: &[Prediction], opts: &Options) -> RandomExpectation {
    let (per_query, auc) = random_per_query(rows, opts);
    let ks = sorted_ks(opts);
    let column = |j: usize| {
        let (mut sum, mut n) = (0.0, 0usize);
        for v in per_query.iter().filter_map(|(_, row)| row[j]) {
            sum += v;
            n += 1;
        }
        (n > 0).then(|| sum / n as f64)
    };
    let nk = ks.len();
    RandomExpectation {
        ndcg: ks.iter().enumerate().map(|(i, &k)| (k, column(i))).collect(),
        map: column(nk),
        mrr: column(nk + 1),
        precision_at: ks.iter().enumerate().map(|(i, &k)| (k, column(nk + 2 + i))).collect(),
        auc,
    }
}

fn sorted_ks(opts: &Options) -> Vec<usize> {
    let mut ks = opts.ks.clone();
    ks.sort_unstable();
    ks.dedup();
    ks
}

/// The expectations of [`expected_random`] query by query (sorted by query): NDCG@K for each K,
/// AP, RR, then P@K for each K, `None` where the query is degenerate for the metric; and the
/// expected AUC, 0.5 whenever both labels occur. What the bootstrap resamples.
pub fn random_per_query(rows: &[Prediction], opts: &Options) -> (PerQuery, Option<f64>) {
    let ks = sorted_ks(opts);
    let mut by_query: BTreeMap<&str, Vec<&Prediction>> = BTreeMap::new();
    for r in rows {
        by_query.entry(&r.query).or_default().push(r);
    }
    let label = |r: &Prediction| r.label.unwrap_or(r.relevance >= opts.positive_relevance);
    let (mut any_pos, mut any_neg) = (false, false);
    let mut out = Vec::with_capacity(by_query.len());
    for (query, cands) in by_query {
        let n = cands.len();
        let mut row: Vec<Option<f64>> = Vec::with_capacity(2 * ks.len() + 2);
        let mut gains: Vec<f64> = cands.iter().map(|r| opts.gain.of(r.relevance)).collect();
        gains.sort_by(|a, b| b.total_cmp(a));
        let graded = gains.first() != gains.last();
        let mean_gain = gains.iter().sum::<f64>() / n as f64;
        for &k in &ks {
            row.push(graded.then(|| {
                let top = k.min(n);
                let ideal: f64 = (1..=top).map(|p| gains[p - 1] * discount(p)).sum();
                let expected: f64 = mean_gain * (1..=top).map(discount).sum::<f64>();
                expected / ideal
            }));
        }
        let m = cands.iter().filter(|r| label(r)).count();
        any_pos |= m > 0;
        any_neg |= m < n;
        if m == 0 || m == n {
            row.extend(std::iter::repeat_n(None, ks.len() + 2));
        } else {
            let (nf, mf) = (n as f64, m as f64);
            let h: f64 = (1..=n).map(|i| 1.0 / i as f64).sum();
            row.push(Some((h + (mf - 1.0) / (nf - 1.0) * (nf - h)) / nf));
            let (mut rr, mut none_before) = (0.0, 1.0);
            for r in 1..=(n - m + 1) {
                let rf = r as f64;
                rr += none_before * mf / (nf - rf + 1.0) / rf;
                none_before *= (nf - mf - rf + 1.0) / (nf - rf + 1.0);
            }
            row.push(Some(rr));
            row.extend(std::iter::repeat_n(Some(mf / nf), ks.len()));
        }
        out.push((query.to_string(), row));
    }
    (out, (any_pos && any_neg).then_some(0.5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics;

    fn toks(s: &str) -> Vec<String> {
        tokenize(s)
    }

    #[test]
    fn overlap_is_the_share_of_distinct_query_words_in_the_document() {
        let title = toks("1/2 in. Copper-Pipe Elbow");
        // Every query word is in the title, whatever the punctuation and case.
        assert_eq!(overlap(&toks("copper pipe 1/2 in"), &title), 1.0);
        // Two of five distinct words (pipe, elbow, pvc, 3, 4); the repeated "pipe" counts once.
        assert_eq!(overlap(&toks("pipe pipe elbow pvc 3/4"), &title), 2.0 / 5.0);
        assert_eq!(overlap(&toks("angle bracket"), &toks("Simpson Strong-Tie 90 degree angle")), 0.5);
        assert_eq!(overlap(&toks("gazebo"), &title), 0.0);
        assert_eq!(overlap(&[], &title), 0.0);
    }

    #[test]
    fn random_scores_are_uniform_and_reproducible() {
        let a = random_scores(10_000, 7);
        assert_eq!(a, random_scores(10_000, 7));
        assert_ne!(a, random_scores(10_000, 8));
        assert!(a.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }

    fn pred(q: &str, rel: f64, label: bool, score: f64) -> Prediction {
        Prediction { query: q.into(), relevance: rel, score, label: Some(label) }
    }

    #[test]
    fn exact_random_expectation_equals_the_metrics_of_an_all_tied_order() {
        // The metrics module averages NDCG, MRR and P@K over the orders of tied candidates, so a
        // constant score gives exactly the expectation under a random order.
        let rows = vec![
            pred("a", 3.0, true, 0.0),
            pred("a", 1.0, false, 0.0),
            pred("a", 2.0, false, 0.0),
            pred("a", 2.67, true, 0.0),
            pred("a", 1.33, false, 0.0),
            pred("b", 3.0, true, 0.0),
            pred("b", 1.0, false, 0.0),
            pred("c", 2.0, true, 0.0), // degenerate for every metric: one candidate
            pred("d", 1.0, false, 0.0),
            pred("d", 2.5, false, 0.0), // degenerate for MAP/MRR/P@K only
        ];
        let opts = Options::default();
        let tied = metrics::compute(&rows, &opts).unwrap();
        let exact = expected_random(&rows, &opts);
        for (key, v) in exact.entries() {
            if key == "map" {
                continue;
            }
            let m = tied.get(&key);
            assert!((v.unwrap() - m.unwrap()).abs() < 1e-12, "{key}: {v:?} vs {m:?}");
        }
        // MAP: average precision treats a tie group as one step, so check the closed form against
        // the mean over all 5! = 120 orders of query "a" (m = 2, n = 5) and 2 orders of "b".
        let labels_a = [true, false, false, true, false];
        let mut perm: Vec<usize> = (0..5).collect();
        let (mut total, mut count) = (0.0, 0usize);
        permute(&mut perm, 0, &mut |p| {
            let (mut hits, mut ap) = (0.0, 0.0);
            for (pos, &i) in p.iter().enumerate() {
                if labels_a[i] {
                    hits += 1.0;
                    ap += hits / (pos + 1) as f64;
                }
            }
            total += ap / 2.0;
            count += 1;
        });
        let ap_a = total / count as f64;
        let ap_b = (1.0 + 0.5) / 2.0;
        assert!((exact.map.unwrap() - (ap_a + ap_b) / 2.0).abs() < 1e-12, "{:?} vs {}", exact.map, (ap_a + ap_b) / 2.0);
        assert_eq!(exact.auc, Some(0.5));
    }

    fn permute(v: &mut Vec<usize>, i: usize, f: &mut dyn FnMut(&[usize])) {
        if i == v.len() {
            f(v);
            return;
        }
        for j in i..v.len() {
            v.swap(i, j);
            permute(v, i + 1, f);
            v.swap(i, j);
        }
    }

    #[test]
    fn seeded_random_scores_average_to_the_exact_expectation() {
        let mut rows = Vec::new();
        for q in 0..40 {
            for c in 0..(3 + q % 5) {
                let rel = 1.0 + ((q * 7 + c * 3) % 9) as f64 / 4.0;
                rows.push(pred(&format!("q{q}"), rel, rel >= 2.33, 0.0));
            }
        }
        let opts = Options::default();
        let exact = expected_random(&rows, &opts);
        let seeds = 300;
        let mut ndcg10 = 0.0;
        let mut map = 0.0;
        for s in 0..seeds {
            let scores = random_scores(rows.len(), s);
            let scored: Vec<Prediction> =
                rows.iter().zip(scores).map(|(r, score)| Prediction { score, ..r.clone() }).collect();
            let m = metrics::compute(&scored, &opts).unwrap();
            ndcg10 += m.get("ndcg@10").unwrap() / seeds as f64;
            map += m.get("map").unwrap() / seeds as f64;
        }
        assert!((ndcg10 - exact.ndcg[3].1.unwrap()).abs() < 0.005, "{ndcg10} vs {:?}", exact.ndcg[3]);
        assert!((map - exact.map.unwrap()).abs() < 0.01, "{map} vs {:?}", exact.map);
    }
}
