//! Okapi BM25 over product text, and the word tokenizer it uses.
//!
//! Shared by `analyze` (the BM25 baselines a model must beat) and `mine` (`miner = "bm25"` ranks a
//! query's candidate documents with it), so that a BM25 score means the same thing in both places.

use std::collections::{HashMap, HashSet};

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

/// BM25 over a fixed collection through an inverted index, for scoring one query against every
/// document: the `mine` stage ranks each training query against the whole corpus (8k queries × 40k
/// products on the Home Depot data), which pair by pair re-reads every document for every query.
/// Scores are bit for bit [`Bm25::score`]'s: the same terms, added in the query's order.
#[derive(Debug, Clone)]
pub struct Bm25Index {
    bm: Bm25,
    /// Term → (document, term frequency) for every document containing it.
    postings: HashMap<String, Vec<(u32, u32)>>,
    /// Each document's `k1 · (1 − b + b·|d|/avgdl)`.
    denom_k: Vec<f64>,
}

impl Bm25Index {
    pub fn fit(docs: &[Vec<String>], k1: f64, b: f64) -> Bm25Index {
        let bm = Bm25::fit(docs.iter().map(Vec::as_slice), k1, b);
        let mut postings: HashMap<String, Vec<(u32, u32)>> = HashMap::new();
        let mut denom_k = Vec::with_capacity(docs.len());
        for (i, d) in docs.iter().enumerate() {
            let mut tf: HashMap<&String, u32> = HashMap::new();
            for t in d {
                *tf.entry(t).or_default() += 1;
            }
            for (t, n) in tf {
                postings.entry(t.clone()).or_default().push((i as u32, n));
            }
            let norm = if bm.avgdl > 0.0 { d.len() as f64 / bm.avgdl } else { 1.0 };
            denom_k.push(bm.k1 * (1.0 - bm.b + bm.b * norm));
        }
        for p in postings.values_mut() {
            p.sort_unstable();
        }
        Bm25Index { bm, postings, denom_k }
    }

    /// The collection's statistics, to score documents outside it with the same IDF and length norm.
    pub fn bm25(&self) -> &Bm25 {
        &self.bm
    }

    /// The query's score against every document of the collection, in the collection's order.
    pub fn score_all(&self, query: &[String]) -> Vec<f64> {
        let mut out = vec![0.0f64; self.denom_k.len()];
        let k1 = self.bm.k1;
        for t in query {
            let Some(post) = self.postings.get(t) else { continue };
            let idf = self.bm.idf(t);
            for &(d, n) in post {
                let tf = n as f64;
                out[d as usize] += idf * tf * (k1 + 1.0) / (tf + self.denom_k[d as usize]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_index_scores_every_document_exactly_as_pair_by_pair() {
        let docs: Vec<Vec<String>> =
            ["angle bracket angle", "steel bracket with screws", "deck screws", "", "1/2 in. copper pipe angle"]
                .iter()
                .map(|d| toks(d))
                .collect();
        let index = Bm25Index::fit(&docs, 1.2, 0.75);
        let pairwise = Bm25::fit(docs.iter().map(Vec::as_slice), 1.2, 0.75);
        for q in ["angle bracket", "screws screws deck", "copper", "nothing here", "angle angle pipe 1"] {
            let q = toks(q);
            let all = index.score_all(&q);
            assert_eq!(all.len(), docs.len());
            for (d, got) in docs.iter().zip(&all) {
                // Bit for bit: mining must rank the same with either.
                assert_eq!(got.to_bits(), pairwise.score(&q, d).to_bits(), "{q:?} vs {d:?}");
            }
        }
        assert!(index.score_all(&toks("angle"))[0] > index.score_all(&toks("angle"))[4]);
    }
}
