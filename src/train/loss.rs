//! The objectives, as a differentiable SUM over a micro-batch (the trainer divides by the
//! accumulation group's size) and as plain f64 numbers for validation.
//!
//! All of them are computed in f32 whatever the compute dtype, in numerically stable forms:
//! `softplus(x) = max(x, 0) + log(1 + e^{−|x|})` never exponentiates a large positive number.
//!
//! # The listwise losses
//!
//! Scoring stays pointwise (each prompt's yes − no logit `s`); only the objective looks at several
//! of one query's rows at once. A micro-batch's lists (groups or queries, of unequal lengths) are
//! gathered into a `[G, L]` score matrix with a 0/1 mask; a padded slot repeats the list's first
//! score, so it never raises the row maximum, and the mask zeroes it out of every sum, which also
//! zeroes its gradient.
//!
//! - `group_ce` (FlagEmbedding's listwise cross-entropy over `train_group_size` candidates, the
//!   positive first): `L = log Σ_{k: mask_k} e^{s_k} − s_0`, computed as
//!   `m + log Σ mask_k e^{s_k − m} − s_0` with `m = max_k s_k` held constant (the log-sum-exp is
//!   the same for any `m`, so its gradient, the masked softmax minus the one-hot positive, is
//!   exact). Built from primitive ops: candle's fused `softmax_last_dim` has no backward.
//! - `lambda`: LambdaRank's NDCG-swap weighted logistic loss, the "LambdaRank" instance of the
//!   LambdaLoss framework (Wang et al., CIKM 2018, eq. 12; Burges, MSR-TR-2010-82, §4):
//!   `L = Σ_{i,j: G_i > G_j} |ΔNDCG_ij| · log(1 + e^{−(s_i − s_j)})`, with gains `G = 2^r − 1`
//!   of the relevance `r`, and `|ΔNDCG_ij| = |G_i − G_j| · |1/log2(1 + ρ_i) − 1/log2(1 + ρ_j)| /
//!   maxDCG`, where `ρ` is the 1-based rank by the current scores (descending, ties by position)
//!   and `maxDCG = Σ_k G_(k) / log2(1 + k)` over the gains sorted descending. The weights are
//!   constants of the step (no gradient flows through the ranks, as in LambdaRank).

use candle_core::{DType, Tensor};

use super::config::LossKind;
use super::data::{eval_lists, pairs, MicroBatch};
use super::TrainError;
use crate::text::TokenStore;

/// The MSE target: relevance 1..3 mapped onto P(yes) 0..1.
pub fn mse_target(relevance: f32) -> f32 {
    (relevance - 1.0) / 2.0
}

pub(crate) fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// The lambda loss's gain of a relevance grade.
pub fn lambda_gain(relevance: f32) -> f64 {
    (relevance as f64).exp2() - 1.0
}

/// Lists of positions into a score vector, padded into an index `[G·L]` (a padded slot repeats
/// the list's first position) and a mask `[G, L]`.
fn pad_lists(lists: &[Vec<usize>]) -> (Vec<u32>, Vec<f32>, usize) {
    let l = lists.iter().map(Vec::len).max().unwrap_or(0);
    let (mut index, mut mask) = (Vec::with_capacity(lists.len() * l), Vec::with_capacity(lists.len() * l));
    for list in lists {
        for k in 0..l {
            index.push(list.get(k).copied().unwrap_or(list[0]) as u32);
            mask.push(if k < list.len() { 1.0 } else { 0.0 });
        }
    }
    (index, mask, l)
}

/// Σ over `lists` of the group softmax cross-entropy, each list's positive at position 0; `x: [B]`
/// f32 scores, lists as positions into it (see the module docs).
pub fn group_ce_sum(x: &Tensor, lists: &[Vec<usize>]) -> Result<Tensor, TrainError> {
    let device = x.device();
    if lists.is_empty() {
        return Ok(Tensor::zeros((), DType::F32, device)?);
    }
    let (index, mask, l) = pad_lists(lists);
    let g = lists.len();
    let s = x.index_select(&Tensor::from_vec(index, g * l, device)?, 0)?.reshape((g, l))?;
    let mask = Tensor::from_vec(mask, (g, l), device)?.to_dtype(x.dtype())?;
    let m = s.max_keepdim(1)?.detach();
    let lse = ((s.broadcast_sub(&m)?.exp()? * mask)?.sum_keepdim(1)?.log()? + m)?;
    Ok((lse - s.narrow(1, 0, 1)?)?.sum_all()?)
}

/// The constant `|ΔNDCG_ij|` weights of one list, `[L, L]` row-major (zero where `G_i ≤ G_j` or
/// past the list's end), from its current scores and gains.
pub fn lambda_weights(scores: &[f64], gains: &[f64], l: usize) -> Vec<f64> {
    let n = scores.len();
    let mut w = vec![0.0f64; l * l];
    let mut by_score: Vec<usize> = (0..n).collect();
    by_score.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut rank = vec![0usize; n];
    for (k, &i) in by_score.iter().enumerate() {
        rank[i] = k + 1;
    }
    let mut ideal = gains.to_vec();
    ideal.sort_by(|a, b| b.total_cmp(a));
    let max_dcg: f64 = ideal.iter().enumerate().map(|(k, g)| g / (k as f64 + 2.0).log2()).sum();
    if max_dcg <= 0.0 {
        return w;
    }
    let discount = |r: usize| 1.0 / (r as f64 + 1.0).log2();
    for i in 0..n {
        for j in 0..n {
            if gains[i] > gains[j] {
                w[i * l + j] = (gains[i] - gains[j]) * (discount(rank[i]) - discount(rank[j])).abs() / max_dcg;
            }
        }
    }
    w
}

/// Σ over `lists` of the lambda loss; `gains[k]` is the gain of list k's members, in order.
pub fn lambda_sum(x: &Tensor, lists: &[Vec<usize>], gains: &[Vec<f64>]) -> Result<Tensor, TrainError> {
    let device = x.device();
    if lists.is_empty() {
        return Ok(Tensor::zeros((), DType::F32, device)?);
    }
    let (index, _, l) = pad_lists(lists);
    let g = lists.len();
    let host: Vec<f64> = x.to_dtype(DType::F64)?.to_vec1()?;
    let mut w = Vec::with_capacity(g * l * l);
    for (list, gain) in lists.iter().zip(gains) {
        let scores: Vec<f64> = list.iter().map(|&p| host[p]).collect();
        w.extend(lambda_weights(&scores, gain, l));
    }
    let s = x.index_select(&Tensor::from_vec(index, g * l, device)?, 0)?.reshape((g, l))?;
    let diff = s.unsqueeze(2)?.broadcast_sub(&s.unsqueeze(1)?)?;
    let w = Tensor::from_vec(w, (g, l, l), device)?.to_dtype(x.dtype())?;
    Ok((softplus(&diff.neg()?)? * w)?.sum_all()?)
}

/// Σ of the per-unit losses of one micro-batch; `logit: [B]` in row order of `micro.rows`.
pub fn micro_loss(
    kind: LossKind,
    logit: &Tensor,
    store: &TokenStore,
    micro: &MicroBatch,
) -> Result<Tensor, TrainError> {
    let rows = &micro.rows;
    let x = logit.to_dtype(DType::F32)?.contiguous()?; // the match_loss path hands over a column view
    let device = x.device();
    let loss = match kind {
        LossKind::Bce => {
            let y: Vec<f32> = rows.iter().map(|&r| f32::from(store.labels[r])).collect();
            let y = Tensor::from_vec(y, rows.len(), device)?;
            // BCE(x, y) = softplus(x) − x·y
            (softplus(&x)? - (&x * &y)?)?.sum_all()?
        }
        LossKind::Mse => {
            let y: Vec<f32> = rows.iter().map(|&r| mse_target(store.relevance[r])).collect();
            let y = Tensor::from_vec(y, rows.len(), device)?;
            (candle_nn::ops::sigmoid(&x)? - y)?.sqr()?.sum_all()?
        }
        LossKind::Pairwise => {
            let p = pairs(store, rows);
            if p.is_empty() {
                return Ok(Tensor::zeros((), DType::F32, device)?);
            }
            let hi: Vec<u32> = p.iter().map(|&(i, _)| i as u32).collect();
            let lo: Vec<u32> = p.iter().map(|&(_, j)| j as u32).collect();
            let n = hi.len();
            let diff = (x.index_select(&Tensor::from_vec(hi, n, device)?, 0)?
                - x.index_select(&Tensor::from_vec(lo, n, device)?, 0)?)?;
            softplus(&diff.neg()?)?.sum_all()?
        }
        LossKind::GroupCe => group_ce_sum(&x, &micro.lists)?,
        LossKind::Lambda => {
            let gains: Vec<Vec<f64>> = micro
                .lists
                .iter()
                .map(|list| list.iter().map(|&p| lambda_gain(store.relevance[rows[p]])).collect())
                .collect();
            lambda_sum(&x, &micro.lists, &gains)?
        }
    };
    Ok(loss)
}

/// The group softmax cross-entropy of one group's scores (positive first), in f64.
pub fn group_ce_f64(scores: &[f64]) -> f64 {
    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + scores.iter().map(|s| (s - m).exp()).sum::<f64>().ln() - scores[0]
}

/// The lambda loss of one query's scores and gains, in f64.
pub fn lambda_f64(scores: &[f64], gains: &[f64]) -> f64 {
    let n = scores.len();
    let w = lambda_weights(scores, gains, n);
    let mut sum = 0.0;
    for i in 0..n {
        for j in 0..n {
            if w[i * n + j] != 0.0 {
                sum += w[i * n + j] * softplus_f64(-(scores[i] - scores[j]));
            }
        }
    }
    sum
}

fn softplus_f64(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid_f64(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The mean loss over a whole split from its logits (row order), and how many units it averages
/// (for group_ce, the groups of [`eval_lists`]).
pub fn mean_loss(kind: LossKind, logits: &[f32], store: &TokenStore, group_size: usize) -> (f64, usize) {
    let (mut sum, mut n) = (0.0f64, 0usize);
    match kind {
        LossKind::GroupCe | LossKind::Lambda => {
            for list in eval_lists(store, kind, group_size) {
                let scores: Vec<f64> = list.iter().map(|&r| logits[r] as f64).collect();
                sum += match kind {
                    LossKind::GroupCe => group_ce_f64(&scores),
                    _ => {
                        lambda_f64(&scores, &list.iter().map(|&r| lambda_gain(store.relevance[r])).collect::<Vec<_>>())
                    }
                };
                n += 1;
            }
        }
        LossKind::Bce => {
            for (i, &x) in logits.iter().enumerate() {
                let x = x as f64;
                sum += softplus_f64(x) - x * f64::from(store.labels[i]);
                n += 1;
            }
        }
        LossKind::Mse => {
            for (i, &x) in logits.iter().enumerate() {
                sum += (sigmoid_f64(x as f64) - mse_target(store.relevance[i]) as f64).powi(2);
                n += 1;
            }
        }
        LossKind::Pairwise => {
            let mut by_query: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
            for i in 0..store.len() {
                by_query.entry(store.query_ids[i]).or_default().push(i);
            }
            for rows in by_query.values() {
                for (a, b) in pairs(store, rows) {
                    sum += softplus_f64(-(logits[rows[a]] as f64 - logits[rows[b]] as f64));
                    n += 1;
                }
            }
        }
    }
    (if n > 0 { sum / n as f64 } else { f64::NAN }, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn store() -> TokenStore {
        TokenStore {
            offsets: vec![0, 1, 2, 3],
            ids: vec![1, 2, 3],
            labels: vec![1, 0, 1],
            relevance: vec![3.0, 1.0, 2.0],
            query_ids: vec![0, 0, 0],
            pair_ids: vec![0, 1, 2],
            queries: vec!["q".into()],
            ..TokenStore::default()
        }
    }

    #[test]
    fn tensor_losses_match_the_host_formulas_and_differentiate() {
        let s = store();
        let logits = [0.7f32, -1.2, 2.5];
        for kind in [LossKind::Bce, LossKind::Mse, LossKind::Pairwise] {
            let x = Var::new(&logits, &Device::Cpu).unwrap();
            let sum = micro_loss(kind, x.as_tensor(), &s, &MicroBatch::pointwise(vec![0, 1, 2], 3)).unwrap();
            let (mean, n) = mean_loss(kind, &logits, &s, 8);
            assert_eq!(n, 3, "{kind:?}"); // 3 rows, or the pairs 3>1, 3>2, 2>1
            let got = sum.to_scalar::<f32>().unwrap() as f64 / n as f64;
            assert!((got - mean).abs() < 1e-6, "{kind:?}: {got} vs {mean}");
            // Central differences of the host formula agree with the backward pass.
            let g: Vec<f32> = sum.backward().unwrap().get(x.as_tensor()).unwrap().to_vec1().unwrap();
            for i in 0..3 {
                let h = 1e-3f32;
                let mut up = logits;
                up[i] += h;
                let mut down = logits;
                down[i] -= h;
                let num =
                    (mean_loss(kind, &up, &s, 8).0 - mean_loss(kind, &down, &s, 8).0) * n as f64 / (2.0 * h as f64);
                assert!((g[i] as f64 - num).abs() < 1e-3, "{kind:?} grad {i}: {} vs {num}", g[i]);
            }
        }
    }

    /// `tests/fixtures/losses/losses.json`, written by `make_losses.py` beside it (numpy, f64).
    fn reference() -> serde_json::Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/losses/losses.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn f64s(v: &serde_json::Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    }

    fn lists(v: &serde_json::Value) -> Vec<Vec<usize>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_array().unwrap().iter().map(|p| p.as_u64().unwrap() as usize).collect())
            .collect()
    }

    /// The loss of one case through the candle code path, its value and its autograd gradient.
    fn candle_loss(kind: &str, case: &serde_json::Value, dtype: DType) -> (f64, Vec<f64>) {
        let scores = f64s(&case["scores"]);
        let lists = lists(&case["lists"]);
        let x =
            Var::from_tensor(&Tensor::new(scores.as_slice(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let sum = match kind {
            "group_ce" => group_ce_sum(x.as_tensor(), &lists).unwrap(),
            _ => {
                let gains: Vec<Vec<f64>> = case["relevance"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| f64s(r).iter().map(|&r| lambda_gain(r as f32)).collect())
                    .collect();
                lambda_sum(x.as_tensor(), &lists, &gains).unwrap()
            }
        };
        let grad = sum.backward().unwrap().get(x.as_tensor()).unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        (sum.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(), grad)
    }

    /// The f64 host formula of one case, for finite differences.
    fn host_loss(kind: &str, case: &serde_json::Value, scores: &[f64]) -> f64 {
        let lists = lists(&case["lists"]);
        lists
            .iter()
            .enumerate()
            .map(|(k, list)| {
                let s: Vec<f64> = list.iter().map(|&p| scores[p]).collect();
                match kind {
                    "group_ce" => group_ce_f64(&s),
                    _ => {
                        let gains: Vec<f64> =
                            f64s(&case["relevance"][k]).iter().map(|&r| lambda_gain(r as f32)).collect();
                        lambda_f64(&s, &gains)
                    }
                }
            })
            .sum()
    }

    #[test]
    fn listwise_losses_and_gradients_equal_the_numpy_reference_padding_included() {
        let r = reference();
        let mut padded_cases = 0;
        for kind in ["group_ce", "lambda"] {
            for case in r[kind].as_array().unwrap() {
                let name = format!("{kind} {}", case["name"]);
                let (want, want_grad) = (case["loss"].as_f64().unwrap(), f64s(&case["grad"]));
                let mask = case["mask"].as_array().unwrap();
                padded_cases += usize::from(mask.iter().any(|row| f64s(row).contains(&0.0)));
                // f64 through candle: the formula, to 1e-6.
                let (loss, grad) = candle_loss(kind, case, DType::F64);
                assert!((loss - want).abs() < 1e-6, "{name}: {loss} vs {want}");
                for (k, (g, w)) in grad.iter().zip(&want_grad).enumerate() {
                    assert!((g - w).abs() < 1e-6, "{name}: d/ds{k} {g} vs {w}");
                }
                // f32, as training computes it: the same within f32 rounding.
                let (loss, grad) = candle_loss(kind, case, DType::F32);
                assert!((loss - want).abs() < 1e-5 * want.abs().max(1.0), "{name} f32: {loss} vs {want}");
                for (k, (g, w)) in grad.iter().zip(&want_grad).enumerate() {
                    assert!((g - w).abs() < 1e-5, "{name} f32: d/ds{k} {g} vs {w}");
                }
                // The host formula (validation loss) agrees, and central differences of it give the gradient.
                let scores = f64s(&case["scores"]);
                // 1e-6, not tighter: the store keeps relevance in f32 (2.33 is not 2.33 there).
                assert!((host_loss(kind, case, &scores) - want).abs() < 1e-6, "{name}: host formula");
                for k in 0..scores.len() {
                    let h = 1e-6;
                    let (mut up, mut down) = (scores.clone(), scores.clone());
                    up[k] += h;
                    down[k] -= h;
                    let num = (host_loss(kind, case, &up) - host_loss(kind, case, &down)) / (2.0 * h);
                    assert!(
                        (num - want_grad[k]).abs() < 1e-6,
                        "{name}: finite difference d/ds{k} {num} vs {}",
                        want_grad[k]
                    );
                }
            }
        }
        assert!(padded_cases >= 4, "the fixture must exercise padding in both losses");
    }

    #[test]
    fn padding_and_list_order_do_not_change_a_groups_loss() {
        // One group alone, and the same group beside a longer one (so it is padded): same loss,
        // and the padded slot's row (the positive, repeated) gets no extra gradient.
        let scores = [0.3f64, -1.2, 2.0, 0.5, 0.1, -0.4];
        let x = Var::new(&scores, &Device::Cpu).unwrap();
        let alone = group_ce_sum(x.as_tensor(), &[vec![0, 1]]).unwrap();
        let both = group_ce_sum(x.as_tensor(), &[vec![0, 1], vec![2, 3, 4, 5]]).unwrap();
        let other = group_ce_sum(x.as_tensor(), &[vec![2, 3, 4, 5]]).unwrap();
        let v = |t: &Tensor| t.to_scalar::<f64>().unwrap();
        assert!((v(&both) - v(&alone) - v(&other)).abs() < 1e-12);
        let g: Vec<f64> = both.backward().unwrap().get(x.as_tensor()).unwrap().to_vec1().unwrap();
        let p1 = 1.0 / (1.0 + (scores[0] - scores[1]).exp());
        assert!((g[0] + p1).abs() < 1e-12 && (g[1] - p1).abs() < 1e-12, "{g:?}");
        // The lambda loss of a list is unchanged by a longer neighbour too.
        let gains = vec![vec![7.0, 1.0], vec![0.0, 3.0, 1.0, 0.0]];
        let both = lambda_sum(x.as_tensor(), &[vec![0, 1], vec![2, 3, 4, 5]], &gains).unwrap();
        let alone = lambda_sum(x.as_tensor(), &[vec![0, 1]], &gains[..1]).unwrap();
        let other = lambda_sum(x.as_tensor(), &[vec![2, 3, 4, 5]], &gains[1..]).unwrap();
        assert!((v(&both) - v(&alone) - v(&other)).abs() < 1e-12);
        assert!(v(&alone) > 0.0);
    }

    #[test]
    fn lambda_weights_are_ndcg_swaps() {
        // Gains 3 (ranked 2nd) and 0 (ranked 1st): swapping them moves NDCG from 3/log2(3)/3 to 1.
        let w = lambda_weights(&[1.0, 2.0], &[3.0, 0.0], 2);
        let ndcg_now = 3.0 / 3f64.log2() / 3.0;
        assert!((w[1] - (1.0 - ndcg_now)).abs() < 1e-12, "{w:?}");
        assert_eq!((w[0], w[2], w[3]), (0.0, 0.0, 0.0));
        // No gain anywhere: nothing to learn.
        assert!(lambda_weights(&[1.0, 2.0], &[0.0, 0.0], 2).iter().all(|&x| x == 0.0));
    }

    #[test]
    fn bce_is_finite_for_extreme_logits() {
        let s = store();
        let x = Tensor::new(&[80.0f32, -80.0, -90.0], &Device::Cpu).unwrap();
        let l = micro_loss(LossKind::Bce, &x, &s, &MicroBatch::pointwise(vec![0, 1, 2], 3))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 90.0).abs() < 1e-3, "{l}");
    }
}
