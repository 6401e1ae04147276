//! Per-query ranking metrics over one query's candidates, already sorted by score descending.
//!
//! Each returns `None` when the query is degenerate for it (see the module docs of
//! [`crate::metrics`]); tie handling is described there too. All are linear in the query's size
//! except the sorts for the ideal order and the relevance ranks.

use std::ops::Range;

use super::Item;

/// Runs of equal scores, in the (descending) order of `items`.
pub(super) fn tie_groups(items: &[Item]) -> Vec<Range<usize>> {
    let mut groups: Vec<Range<usize>> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if items[g.start].score == it.score => g.end = i + 1,
            _ => groups.push(i..i + 1),
        }
    }
    groups
}

/// The DCG position discount, `1 / log2(rank + 1)` for a 1-based rank.
fn discount(position: usize) -> f64 {
    1.0 / ((position + 2) as f64).log2()
}

fn all_equal(items: &[Item], value: impl Fn(&Item) -> f64) -> bool {
    items.iter().all(|it| value(it) == value(&items[0]))
}

fn count_labels(items: &[Item]) -> usize {
    items.iter().filter(|it| it.label).count()
}

/// NDCG@k with tie-averaged DCG (scikit-learn's `ndcg_score`, `ignore_ties=False`).
pub(super) fn ndcg(items: &[Item], ties: &[Range<usize>], k: usize) -> Option<f64> {
    if all_equal(items, |it| it.gain) {
        return None;
    }
    let cut = k.min(items.len());
    let mut dcg = 0.0;
    for g in ties.iter().take_while(|g| g.start < cut) {
        let mean_gain = items[g.clone()].iter().map(|it| it.gain).sum::<f64>() / g.len() as f64;
        let discounts: f64 = (g.start..g.end.min(cut)).map(discount).sum();
        dcg += mean_gain * discounts;
    }
    let mut ideal: Vec<f64> = items.iter().map(|it| it.gain).collect();
    ideal.sort_unstable_by(|a, b| b.total_cmp(a));
    let idcg: f64 = ideal.iter().take(cut).enumerate().map(|(i, g)| g * discount(i)).sum();
    Some(dcg / idcg)
}

/// Average precision as scikit-learn's `average_precision_score`: one precision-recall step per
/// distinct score, so a tie group counts at the precision of the whole group.
pub(super) fn average_precision(items: &[Item], ties: &[Range<usize>]) -> Option<f64> {
    let positives = count_labels(items);
    if positives == 0 || positives == items.len() {
        return None;
    }
    let (mut tp, mut ap) = (0usize, 0.0);
    for g in ties {
        let hits = count_labels(&items[g.clone()]);
        tp += hits;
        if hits > 0 {
            ap += (hits as f64 / positives as f64) * (tp as f64 / g.end as f64);
        }
    }
    Some(ap)
}

/// Expected reciprocal rank of the first relevant candidate over the orders of tied candidates.
pub(super) fn reciprocal_rank(items: &[Item], ties: &[Range<usize>]) -> Option<f64> {
    let positives = count_labels(items);
    if positives == 0 || positives == items.len() {
        return None;
    }
    let g = ties.iter().find(|g| items[g.start..g.end].iter().any(|it| it.label))?;
    let (m, p) = (g.len(), count_labels(&items[g.clone()]));
    // P(first relevant is the r-th of the group) = C(m-r, p-1) / C(m, p), stepped by its ratio.
    let mut prob = p as f64 / m as f64;
    let mut expected = 0.0;
    for r in 1..=m - p + 1 {
        expected += prob / (g.start + r) as f64;
        if r < m - p + 1 {
            prob *= (m - r - p + 1) as f64 / (m - r) as f64;
        }
    }
    Some(expected)
}

/// Expected share of relevant candidates in the top `min(k, n)` over the orders of tied candidates.
pub(super) fn precision_at(items: &[Item], ties: &[Range<usize>], k: usize) -> Option<f64> {
    let positives = count_labels(items);
    if positives == 0 || positives == items.len() {
        return None;
    }
    let cut = k.min(items.len());
    let mut hits = 0.0;
    for g in ties.iter().take_while(|g| g.start < cut) {
        let inside = g.end.min(cut) - g.start;
        hits += count_labels(&items[g.clone()]) as f64 * inside as f64 / g.len() as f64;
    }
    Some(hits / cut as f64)
}

/// Mid-ranks (1-based, ascending) of `values`.
fn mid_ranks(values: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < idx.len() {
        let mut end = start + 1;
        while end < idx.len() && values[idx[end]] == values[idx[start]] {
            end += 1;
        }
        let rank = (start + end + 1) as f64 / 2.0;
        for &i in &idx[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// Spearman's rho between score and relevance (Pearson on mid-ranks, as scipy's `spearmanr`).
pub(super) fn spearman(items: &[Item], ties: &[Range<usize>]) -> Option<f64> {
    if all_equal(items, |it| it.relevance) {
        return None;
    }
    if ties.len() == 1 {
        return Some(0.0);
    }
    let n = items.len();
    // `items` are in descending score order, so ascending mid-ranks count from the end.
    let mut score_rank = vec![0.0; n];
    for g in ties {
        let rank = (n + 1) as f64 - (g.start + g.end + 1) as f64 / 2.0;
        score_rank[g.clone()].fill(rank);
    }
    let rel: Vec<f64> = items.iter().map(|it| it.relevance).collect();
    let rel_rank = mid_ranks(&rel);
    let mean = (n + 1) as f64 / 2.0;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (a, b) in score_rank.iter().zip(&rel_rank) {
        let (da, db) = (a - mean, b - mean);
        sab += da * db;
        saa += da * da;
        sbb += db * db;
    }
    Some((sab / (saa * sbb).sqrt()).clamp(-1.0, 1.0))
}
