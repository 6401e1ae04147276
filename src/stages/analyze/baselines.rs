//! The baselines a model must beat: BM25 over product text, the share of the query's words the
//! product text contains, and a random order.
//!
//! On this data ranking metrics are high by chance (a random order scores NDCG@10 ≈ 0.91 on a
//! query-grouped split), so the random baseline is computed exactly where a closed form exists
//! rather than only sampled.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::metrics::bootstrap::PerQuery;
use crate::metrics::{Options, Prediction};
use crate::util::rng::SplitMix64;

/// Lowercased runs of letters and digits: `"1/2 in. Copper-Pipe"` → `1 2 in copper pipe`.
pub fn tokenize(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() {
            cur.extend(c.to_lowercase());
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Okapi BM25 document statistics.
#[derive(Debug, Clone)]
pub struct Bm25 {
    pub k1: f64,
    pub b: f64,
    /// Documents in the collection.
    pub n: usize,
    /// Mean document length in tokens.
    pub avgdl: f64,
    df: HashMap<String, usize>,
}

impl Bm25 {
    /// Statistics of a collection of (already tokenized) documents.
    pub fn fit<'a>(docs: impl IntoIterator<Item = &'a [String]>, k1: f64, b: f64) -> Bm25 {
        let (mut n, mut total) = (0usize, 0usize);
        let mut df: HashMap<String, usize> = HashMap::new();
        for d in docs {
            n += 1;
            total += d.len();
            let distinct: HashSet<&String> = d.iter().collect();
            for t in distinct {
                *df.entry(t.clone()).or_default() += 1;
            }
        }
        let avgdl = if n == 0 { 0.0 } else { total as f64 / n as f64 };
        Bm25 { k1, b, n, avgdl, df }
    }

    /// Lucene's IDF, `ln(1 + (N - df + 0.5) / (df + 0.5))`: never negative, so a word in most
    /// documents still counts a little instead of pulling the score down (as Robertson's original does).
    pub fn idf(&self, term: &str) -> f64 {
        let df = self.df.get(term).copied().unwrap_or(0) as f64;
        (1.0 + (self.n as f64 - df + 0.5) / (df + 0.5)).ln()
    }

    /// `Σ_t idf(t) · tf·(k1+1) / (tf + k1·(1 − b + b·|d|/avgdl))` over the query's tokens; a token
    /// repeated in the query counts each time (as Lucene and rank_bm25 do).
    pub fn score(&self, query: &[String], doc: &[String]) -> f64 {
        let norm = if self.avgdl > 0.0 { doc.len() as f64 / self.avgdl } else { 1.0 };
        let denom_k = self.k1 * (1.0 - self.b + self.b * norm);
        query
            .iter()
            .map(|t| {
                let tf = doc.iter().filter(|d| *d == t).count() as f64;
                if tf == 0.0 {
                    0.0
                } else {
                    self.idf(t) * tf * (self.k1 + 1.0) / (tf + denom_k)
                }
            })
            .sum()
    }
}

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
    fn tokenizer_keeps_letters_and_digits_only() {
        assert_eq!(toks("1/2 in. Copper-Pipe, ÅB"), ["1", "2", "in", "copper", "pipe", "åb"]);
        assert!(toks(" -- ").is_empty());
    }

    #[test]
    fn bm25_matches_a_hand_computed_score() {
        // Three documents; the query "angle bracket" against doc 0.
        let docs: Vec<Vec<String>> =
            ["angle bracket angle", "steel bracket with screws", "deck screws"].iter().map(|d| toks(d)).collect();
        let bm = Bm25::fit(docs.iter().map(Vec::as_slice), 1.2, 0.75);
        assert_eq!(bm.n, 3);
        assert!((bm.avgdl - 3.0).abs() < 1e-12); // (3 + 4 + 2) / 3
                                                 // idf(angle): df 1 → ln(1 + 2.5/1.5); idf(bracket): df 2 → ln(1 + 1.5/2.5).
        let idf_angle = (1.0f64 + 2.5 / 1.5).ln();
        let idf_bracket = (1.0f64 + 1.5 / 2.5).ln();
        assert!((bm.idf("angle") - idf_angle).abs() < 1e-15);
        // Doc 0 has |d| = 3 = avgdl, so the length norm is 1: denominators tf + 1.2.
        let want = idf_angle * 2.0 * 2.2 / (2.0 + 1.2) + idf_bracket * 1.0 * 2.2 / (1.0 + 1.2);
        let got = bm.score(&toks("angle bracket"), &docs[0]);
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // ≈ 0.98083 × 1.375 + 0.47000 × 1.0
        assert!((got - 1.81864).abs() < 1e-4, "{got}");
        // Doc 1 (|d| = 4) only matches "bracket": denominator 1 + 1.2·(0.25 + 0.75·4/3).
        let want1 = idf_bracket * 2.2 / (1.0 + 1.2 * (0.25 + 0.75 * 4.0 / 3.0));
        assert!((bm.score(&toks("angle bracket"), &docs[1]) - want1).abs() < 1e-12);
        assert_eq!(bm.score(&toks("angle bracket"), &docs[2]), 0.0);
        // An unseen word has the largest IDF and no match anywhere.
        assert!(bm.idf("zzz") > idf_angle);
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
