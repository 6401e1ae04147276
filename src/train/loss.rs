//! The three objectives, as a differentiable SUM over a micro-batch (the trainer divides by the
//! accumulation group's size) and as plain f64 numbers for validation.
//!
//! All of them are computed in f32 whatever the compute dtype, in numerically stable forms:
//! `softplus(x) = max(x, 0) + log(1 + e^{−|x|})` never exponentiates a large positive number.

use candle_core::{DType, Tensor};

use super::config::LossKind;
use super::data::pairs;
use super::TrainError;
use crate::text::TokenStore;

/// The MSE target: relevance 1..3 mapped onto P(yes) 0..1.
pub fn mse_target(relevance: f32) -> f32 {
    (relevance - 1.0) / 2.0
}

pub(crate) fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// Σ of the per-unit losses of one micro-batch; `logit: [B]` in row order of `rows`.
pub fn micro_loss(kind: LossKind, logit: &Tensor, store: &TokenStore, rows: &[usize]) -> Result<Tensor, TrainError> {
    let x = logit.to_dtype(DType::F32)?;
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
    };
    Ok(loss)
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

/// The mean loss over a whole split from its logits (row order), and how many units it averages.
pub fn mean_loss(kind: LossKind, logits: &[f32], store: &TokenStore) -> (f64, usize) {
    let (mut sum, mut n) = (0.0f64, 0usize);
    match kind {
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
            let sum = micro_loss(kind, x.as_tensor(), &s, &[0, 1, 2]).unwrap();
            let (mean, n) = mean_loss(kind, &logits, &s);
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
                let num = (mean_loss(kind, &up, &s).0 - mean_loss(kind, &down, &s).0) * n as f64 / (2.0 * h as f64);
                assert!((g[i] as f64 - num).abs() < 1e-3, "{kind:?} grad {i}: {} vs {num}", g[i]);
            }
        }
    }

    #[test]
    fn bce_is_finite_for_extreme_logits() {
        let s = store();
        let x = Tensor::new(&[80.0f32, -80.0, -90.0], &Device::Cpu).unwrap();
        let l = micro_loss(LossKind::Bce, &x, &s, &[0, 1, 2]).unwrap().to_scalar::<f32>().unwrap();
        assert!((l - 90.0).abs() < 1e-3, "{l}");
    }
}
