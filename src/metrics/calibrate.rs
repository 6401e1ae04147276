//! Score → relevance calibration, so that a ranker's scores (logits, probabilities, BM25) can be
//! judged by RMSE against the graded relevance the way the Kaggle leaderboard judged submissions.

use serde::Serialize;

use super::{MetricsError, Prediction};

/// A non-decreasing piecewise-linear map from score to relevance, fitted by isotonic regression.
///
/// Isotonic rather than linear because scores come on any scale (a logit, a probability, a BM25
/// sum) and only their order is meaningful; the fit assumes a higher score means more relevant.
/// It reproduces scikit-learn's `IsotonicRegression(out_of_bounds="clip")`: equal scores are first
/// merged into their mean relevance, pool-adjacent-violators fits the means weighted by their
/// counts, a score between two fitted ones is interpolated linearly, and a score outside the fitted
/// range takes the value at the nearer end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Isotonic {
    /// Distinct fitted scores, ascending.
    x: Vec<f64>,
    /// Fitted relevance at each of `x`, non-decreasing.
    y: Vec<f64>,
}

impl Isotonic {
    /// Fit on parallel `scores` and `targets`; `None` when empty or when a value is not finite.
    pub fn fit(scores: &[f64], targets: &[f64]) -> Option<Isotonic> {
        if scores.is_empty() || scores.len() != targets.len() || scores.iter().chain(targets).any(|v| !v.is_finite()) {
            return None;
        }
        let mut pairs: Vec<(f64, f64)> = scores.iter().copied().zip(targets.iter().copied()).collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));

        // Distinct scores with the mean target and the count behind it.
        let mut x: Vec<f64> = Vec::new();
        let mut sums: Vec<(f64, f64)> = Vec::new(); // (sum of targets, weight)
        for (s, t) in pairs {
            if x.last() == Some(&s) {
                let last = sums.last_mut().expect("parallel to x");
                last.0 += t;
                last.1 += 1.0;
            } else {
                x.push(s);
                sums.push((t, 1.0));
            }
        }

        // Pool adjacent violators: blocks of (weighted mean, weight, number of distinct scores).
        let mut blocks: Vec<(f64, f64, usize)> = Vec::with_capacity(x.len());
        for &(sum, w) in &sums {
            let mut block = (sum / w, w, 1usize);
            while let Some(&(prev_mean, prev_w, prev_n)) = blocks.last() {
                if prev_mean < block.0 {
                    break;
                }
                blocks.pop();
                let w = prev_w + block.1;
                block = ((prev_mean * prev_w + block.0 * block.1) / w, w, prev_n + block.2);
            }
            blocks.push(block);
        }
        let y: Vec<f64> = blocks.iter().flat_map(|&(mean, _, n)| std::iter::repeat_n(mean, n)).collect();
        Some(Isotonic { x, y })
    }

    /// Fit relevance on the score of `rows`.
    pub fn fit_predictions(rows: &[Prediction]) -> Result<Isotonic, MetricsError> {
        let scores: Vec<f64> = rows.iter().map(|r| r.score).collect();
        let targets: Vec<f64> = rows.iter().map(|r| r.relevance).collect();
        if let Some(bad) = rows.iter().find(|r| !r.score.is_finite() || !r.relevance.is_finite()) {
            let (what, value) = if bad.score.is_finite() { ("relevance", bad.relevance) } else { ("score", bad.score) };
            return Err(MetricsError::NonFinite { query: bad.query.clone(), what, value });
        }
        Isotonic::fit(&scores, &targets).ok_or(MetricsError::Empty)
    }

    /// The calibrated relevance for a score.
    pub fn predict(&self, score: f64) -> f64 {
        if score.is_nan() {
            return f64::NAN;
        }
        let last = self.x.len() - 1;
        if score <= self.x[0] {
            return self.y[0];
        }
        if score >= self.x[last] {
            return self.y[last];
        }
        // First fitted score above `score`; it exists and is not the first, by the checks above.
        let hi = self.x.partition_point(|&x| x <= score);
        let lo = hi - 1;
        let slope = (self.y[hi] - self.y[lo]) / (self.x[hi] - self.x[lo]);
        self.y[lo] + slope * (score - self.x[lo])
    }
}
