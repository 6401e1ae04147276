//! Pair-level classification metrics: the scores read as a relevant/not-relevant decision.

use serde::Serialize;

/// Confusion-matrix summaries at one threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Classification {
    pub accuracy: f64,
    /// 0 when nothing is predicted positive (scikit-learn's `zero_division` default).
    pub precision: f64,
    /// 0 when no pair is relevant.
    pub recall: f64,
    /// 0 when there are neither relevant pairs nor positive predictions.
    pub f1: f64,
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Accuracy, precision, recall and F1 with a pair predicted positive when `score >= threshold`.
///
/// `scores` and `labels` are parallel; an empty input gives all zeros.
pub fn classify(scores: &[f64], labels: &[bool], threshold: f64) -> Classification {
    debug_assert_eq!(scores.len(), labels.len());
    let (mut tp, mut fp, mut fn_, mut tn) = (0usize, 0usize, 0usize, 0usize);
    for (&s, &l) in scores.iter().zip(labels) {
        match (s >= threshold, l) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => tn += 1,
        }
    }
    Classification {
        accuracy: ratio(tp + tn, scores.len()),
        precision: ratio(tp, tp + fp),
        recall: ratio(tp, tp + fn_),
        f1: ratio(2 * tp, 2 * tp + fp + fn_),
    }
}

/// Indices sorted by score descending, and the runs of equal scores among them.
fn by_score_desc(scores: &[f64]) -> (Vec<usize>, Vec<std::ops::Range<usize>>) {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    for i in 0..idx.len() {
        match groups.last_mut() {
            Some(g) if scores[idx[g.start]] == scores[idx[i]] => g.end = i + 1,
            _ => groups.push(i..i + 1),
        }
    }
    (idx, groups)
}

/// ROC AUC with a tied relevant/non-relevant pair counted as half (scikit-learn's `roc_auc_score`).
///
/// `None` when all pairs share one label: the ROC curve is undefined there.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    debug_assert_eq!(scores.len(), labels.len());
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let (idx, groups) = by_score_desc(scores);
    // Walking from the top, every negative not yet seen scores strictly below the current group.
    let (mut negatives_above, mut wins) = (0usize, 0.0);
    for g in groups {
        let pos = idx[g.clone()].iter().filter(|&&i| labels[i]).count();
        let neg = g.len() - pos;
        let below = negatives - negatives_above - neg;
        wins += pos as f64 * (below as f64 + 0.5 * neg as f64);
        negatives_above += neg;
    }
    Some(wins / (positives as f64 * negatives as f64))
}

/// The F1-maximising threshold found on one set of predictions (validation), to apply to another.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TunedThreshold {
    /// Halfway between the last score predicted positive and the next lower score, so that
    /// unseen scores in that gap are split evenly; the lowest score itself when all are positive.
    pub threshold: f64,
    /// F1 on the predictions it was tuned on.
    pub f1: f64,
}

/// Search every cut between distinct scores for the highest F1; among equal F1s the highest
/// threshold wins (fewest positive predictions). `None` when no pair is relevant (F1 is 0 anywhere).
pub fn tune_threshold(scores: &[f64], labels: &[bool]) -> Option<TunedThreshold> {
    debug_assert_eq!(scores.len(), labels.len());
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 {
        return None;
    }
    let (idx, groups) = by_score_desc(scores);
    let (mut tp, mut predicted) = (0usize, 0usize);
    let mut best: Option<(f64, usize)> = None; // (f1, group index)
    for (gi, g) in groups.iter().enumerate() {
        tp += idx[g.clone()].iter().filter(|&&i| labels[i]).count();
        predicted += g.len();
        let f1 = 2.0 * tp as f64 / (predicted + positives) as f64;
        if best.is_none_or(|(b, _)| f1 > b) {
            best = Some((f1, gi));
        }
    }
    let (f1, gi) = best?;
    let chosen = scores[idx[groups[gi].start]];
    let threshold = match groups.get(gi + 1) {
        Some(next) => {
            let lower = scores[idx[next.start]];
            let mid = chosen / 2.0 + lower / 2.0;
            // Adjacent floats have no midpoint strictly between them; keep the cut exact then.
            if mid > lower && mid <= chosen {
                mid
            } else {
                chosen
            }
        }
        None => chosen,
    };
    Some(TunedThreshold { threshold, f1 })
}
