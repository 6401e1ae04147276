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
}
