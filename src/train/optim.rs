//! AdamW with torch.optim.AdamW's arithmetic, on flat f32 buffers (CPU) or f32 tensors (GPU).
//!
//! One update of a parameter `p` with gradient `g` at step `t` (1-based), in torch's order and
//! rounding (each scalar computed in f64 and rounded to f32 once, as torch does with Python floats):
//!
//! ```text
//! p ← p · (1 − lr·wd)                          (decoupled weight decay; skipped for norms/biases)
//! m ← m + (1 − β1)·(g − m)                     (torch's lerp)
//! v ← v·β2 + ((1 − β2)·g)·g                    (torch's addcmul)
//! p ← p + (−lr / (1 − β1^t))·m / (√v / √(1 − β2^t) + ε)
//! ```
//!
//! The embedding (151,669 rows for Qwen3) dominates the optimizer's cost while a batch touches a
//! few hundred rows. For a row whose moments are still exactly zero and whose gradient is zero,
//! the formula above reduces exactly to `p ← p·(1 − lr·wd)` (m and v stay 0 and the Adam term is
//! `0 / ε = 0`), so [`adamw_rows`] applies only that multiplication there and the full update to
//! rows that were ever touched. The result is bit-for-bit the dense update.
//!
//! That multiplication still streams the whole table through memory every step. With
//! [`RowState::lazy`], never-touched rows are skipped and the caller records each step's factor;
//! [`apply_pending_decay`] later applies the recorded factors to a row one after the other — the
//! same f32 multiplications in the same order, so again bit for bit, but with the row held in
//! registers instead of re-read from memory each step.

use rayon::prelude::*;

use super::config::AdamConfig;

/// The scalars of one step, rounded to f32 once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepScalars {
    /// `1 − lr·wd`, or exactly 1 when the parameter takes no weight decay.
    pub decay: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `−lr / (1 − β1^t)`.
    pub neg_step_size: f32,
    /// `√(1 − β2^t)`.
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    /// Multiplies every gradient element first (gradient clipping and loss-scale removal); 1 = none.
    pub grad_scale: f32,
}

impl StepScalars {
    /// `step` is 1-based (the bias correction of the first update uses t = 1).
    pub fn new(adam: &AdamConfig, lr: f64, weight_decay: f64, step: u64, grad_scale: f32) -> Self {
        let t = step as f64;
        let bc1 = 1.0 - adam.beta1.powf(t);
        let bc2 = 1.0 - adam.beta2.powf(t);
        Self {
            decay: if weight_decay != 0.0 { (1.0 - lr * weight_decay) as f32 } else { 1.0 },
            one_minus_beta1: (1.0 - adam.beta1) as f32,
            beta2: adam.beta2 as f32,
            one_minus_beta2: (1.0 - adam.beta2) as f32,
            neg_step_size: (-(lr / bc1)) as f32,
            bias_correction2_sqrt: bc2.sqrt() as f32,
            eps: adam.eps as f32,
            grad_scale,
        }
    }
}

#[inline(always)]
fn update_one(p: &mut f32, m: &mut f32, v: &mut f32, g: f32, s: &StepScalars) {
    let g = if s.grad_scale != 1.0 { g * s.grad_scale } else { g };
    if s.decay != 1.0 {
        *p *= s.decay;
    }
    *m += s.one_minus_beta1 * (g - *m);
    *v = *v * s.beta2 + s.one_minus_beta2 * g * g;
    let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
    *p += s.neg_step_size * *m / denom;
}

/// Elements per rayon task: big enough to amortise scheduling, small enough to split a layer.
const CHUNK: usize = 1 << 15;

/// The dense update of a whole parameter.
pub fn adamw_dense(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &StepScalars) {
    assert!(p.len() == m.len() && p.len() == v.len() && p.len() == g.len(), "AdamW buffers differ in length");
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                update_one(&mut p[i], &mut m[i], &mut v[i], g[i], s);
            }
        });
}

/// Which rows of a `[rows, cols]` parameter carry a gradient.
pub struct RowState<'a> {
    pub cols: usize,
    /// `live[r]`: row `r` may have non-zero moments (it was touched at some step).
    pub live: &'a mut [bool],
    /// `touched[r]`: row `r` has a gradient this step (elsewhere the gradient is exactly zero).
    pub touched: &'a [bool],
    /// Leave rows that were never live untouched: the caller owes them this step's decay.
    pub lazy: bool,
}

/// Applies recorded decay factors to a row in order (see the module docs).
pub fn apply_pending_decay(row: &mut [f32], factors: &[f32]) {
    for x in row {
        let mut v = *x;
        for &f in factors {
            v *= f;
        }
        *x = v;
    }
}

/// The same update for a `[rows, cols]` parameter whose gradient is zero outside touched rows:
/// rows that were never live only decay.
pub fn adamw_rows(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], rows: RowState, s: &StepScalars) {
    let RowState { cols, live, touched, lazy } = rows;
    let rows = live.len();
    assert!(p.len() == rows * cols && m.len() == p.len() && v.len() == p.len() && g.len() == p.len());
    assert_eq!(touched.len(), rows);
    let rows_per_task = (CHUNK / cols.max(1)).max(1);
    let width = rows_per_task * cols;
    p.par_chunks_mut(width)
        .zip(m.par_chunks_mut(width))
        .zip(v.par_chunks_mut(width))
        .zip(g.par_chunks(width))
        .zip(live.par_chunks_mut(rows_per_task))
        .zip(touched.par_chunks(rows_per_task))
        .for_each(|(((((p, m), v), g), live), touched)| {
            for r in 0..live.len() {
                let span = r * cols..(r + 1) * cols;
                if touched[r] {
                    live[r] = true;
                }
                if live[r] {
                    let (p, m, v, g) = (&mut p[span.clone()], &mut m[span.clone()], &mut v[span.clone()], &g[span]);
                    for i in 0..cols {
                        update_one(&mut p[i], &mut m[i], &mut v[i], g[i], s);
                    }
                } else if s.decay != 1.0 && !lazy {
                    for x in &mut p[span] {
                        *x *= s.decay;
                    }
                }
            }
        });
}

/// Σ g² in f64 (the caller takes the square root of the sum over all parameters). The chunk
/// sums are added in a fixed order: rayon's own reduction tree depends on work stealing, and a
/// last-bit difference in the norm would make clipping, hence resumed runs, irreproducible.
pub fn sum_squares(g: &[f32]) -> f64 {
    let parts: Vec<f64> =
        g.par_chunks(CHUNK).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).collect();
    parts.iter().sum()
}

/// torch's `clip_grad_norm_` factor: `max_norm / (norm + 1e-6)`, clamped to at most 1
/// (0 disables clipping).
pub fn clip_factor(norm: f64, max_norm: f64) -> f32 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    let coef = (max_norm / (norm + 1e-6)) as f32;
    coef.min(1.0)
}

/// The dense update written as candle tensor ops: the formulas once more, as an independent
/// cross-check of the loops in the tests (the device path is fused: [`crate::kernels::adamw`]).
/// Returns the new (p, m, v).
pub fn adamw_tensors(
    p: &candle_core::Tensor,
    m: &candle_core::Tensor,
    v: &candle_core::Tensor,
    g: &candle_core::Tensor,
    s: &StepScalars,
) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor, candle_core::Tensor)> {
    let g = if s.grad_scale != 1.0 { g.affine(s.grad_scale as f64, 0.0)? } else { g.clone() };
    let p = if s.decay != 1.0 { p.affine(s.decay as f64, 0.0)? } else { p.clone() };
    let m = (m + (g.sub(m)?.affine(s.one_minus_beta1 as f64, 0.0))?)?;
    let v = (v.affine(s.beta2 as f64, 0.0)? + g.affine(s.one_minus_beta2 as f64, 0.0)?.mul(&g)?)?;
    let denom = (v.sqrt()?.affine(1.0 / s.bias_correction2_sqrt as f64, 0.0)? + s.eps as f64)?;
    let p = (p + m.affine(s.neg_step_size as f64, 0.0)?.div(&denom)?)?;
    Ok((p, m, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AdamW written out in f64 from the formulas of Loshchilov & Hutter / torch's docs, for a
    /// scalar parameter over several steps.
    fn reference(p0: f64, grads: &[f64], lr: &[f64], wd: f64) -> f64 {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (t, (&g, &lr)) in grads.iter().zip(lr).enumerate() {
            let t = (t + 1) as f64;
            p *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let m_hat = m / (1.0 - b1.powf(t));
            let v_hat = v / (1.0 - b2.powf(t));
            p -= lr * m_hat / (v_hat.sqrt() + eps);
        }
        p
    }

    #[test]
    fn dense_update_matches_hand_computed_adamw() {
        let grads = [[0.5f32, -2.0, 1e-3, 0.0], [0.25, -1.0, 3e-3, 0.0], [-0.75, 4.0, -2e-3, 0.0]];
        let lrs = [1e-3, 5e-4, 2e-3];
        let p0 = [1.0f32, -0.5, 0.25, 2.0];
        let (mut p, mut m, mut v) = (p0.to_vec(), vec![0.0; 4], vec![0.0; 4]);
        for (t, (g, &lr)) in grads.iter().zip(&lrs).enumerate() {
            let s = StepScalars::new(&AdamConfig::default(), lr, 0.01, t as u64 + 1, 1.0);
            adamw_dense(&mut p, &mut m, &mut v, g, &s);
        }
        for i in 0..4 {
            let gs: Vec<f64> = grads.iter().map(|g| g[i] as f64).collect();
            let want = reference(p0[i] as f64, &gs, &lrs, 0.01);
            assert!((p[i] as f64 - want).abs() < 1e-6, "element {i}: {} vs {want}", p[i]);
        }
        // The first step of Adam moves by about lr·sign(g): 1 − 1e-3·0.01 decay, then −1e-3.
        let s = StepScalars::new(&AdamConfig::default(), 1e-3, 0.01, 1, 1.0);
        let (mut p, mut m, mut v) = (vec![1.0f32], vec![0.0], vec![0.0]);
        adamw_dense(&mut p, &mut m, &mut v, &[0.5], &s);
        assert!((p[0] as f64 - (1.0 * (1.0 - 1e-5) - 1e-3 * 0.5 / (0.5 + 1e-8))).abs() < 1e-7, "{}", p[0]);
        assert!((m[0] - 0.05).abs() < 1e-8 && (v[0] - 0.00025).abs() < 1e-9);
    }

    #[test]
    fn row_sparse_update_equals_the_dense_update_bit_for_bit() {
        let (rows, cols) = (7usize, 5usize);
        let n = rows * cols;
        let init: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
        let (mut pd, mut md, mut vd) = (init.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let (mut ps, mut ms, mut vs) = (init.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let mut live = vec![false; rows];
        let (mut pl, mut ml, mut vl) = (init.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let (mut live_lazy, mut factors, mut applied) = (vec![false; rows], Vec::new(), vec![0usize; rows]);
        // Steps touch different rows; untouched rows have exactly zero gradient.
        for (step, touched_rows) in [vec![1usize, 4], vec![4], vec![0, 6], vec![]].iter().enumerate() {
            let mut g = vec![0.0f32; n];
            let mut touched = vec![false; rows];
            for &r in touched_rows {
                touched[r] = true;
                for c in 0..cols {
                    g[r * cols + c] = ((r + c + step) as f32 - 3.0) * 0.1;
                }
            }
            let s = StepScalars::new(&AdamConfig::default(), 1e-2, 0.1, step as u64 + 1, 1.0);
            adamw_dense(&mut pd, &mut md, &mut vd, &g, &s);
            adamw_rows(
                &mut ps,
                &mut ms,
                &mut vs,
                &g,
                RowState { cols, live: &mut live, touched: &touched, lazy: false },
                &s,
            );
            // The lazy variant: skipped rows catch up on their recorded factors before being read.
            factors.push(s.decay);
            for (r, &t) in touched.iter().enumerate() {
                if t && !live_lazy[r] {
                    apply_pending_decay(&mut pl[r * cols..(r + 1) * cols], &factors[applied[r]..factors.len() - 1]);
                    applied[r] = factors.len() - 1;
                }
            }
            adamw_rows(
                &mut pl,
                &mut ml,
                &mut vl,
                &g,
                RowState { cols, live: &mut live_lazy, touched: &touched, lazy: true },
                &s,
            );
            assert_eq!(pd, ps, "step {step}");
            assert_eq!(md, ms);
            assert_eq!(vd, vs);
            assert_eq!(md, ml);
        }
        for r in 0..rows {
            if !live_lazy[r] {
                apply_pending_decay(&mut pl[r * cols..(r + 1) * cols], &factors[applied[r]..]);
            }
        }
        assert_eq!(pd, pl, "the lazily decayed rows caught up exactly");
        assert_eq!(live, vec![true, true, false, false, true, false, true]);
        // Never-touched rows only decayed: 4 steps of ×(1 − 1e-3).
        let want = init[2 * cols] * 0.999f32 * 0.999 * 0.999 * 0.999;
        assert_eq!(ps[2 * cols], want);
    }

    #[test]
    fn tensor_update_matches_the_host_kernel() {
        use candle_core::{Device, Tensor};
        let n = 1000;
        let p0: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) / 5.0).collect();
        let g: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) / 3.0).collect();
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let t = |x: &[f32]| Tensor::from_slice(x, n, &Device::Cpu).unwrap();
        let (mut tp, mut tm, mut tv) = (t(&p0), t(&m), t(&v));
        for step in 1..=3 {
            let s = StepScalars::new(&AdamConfig::default(), 1e-2, 0.01, step, 0.5);
            adamw_dense(&mut p, &mut m, &mut v, &g, &s);
            (tp, tm, tv) = adamw_tensors(&tp, &tm, &tv, &t(&g), &s).unwrap();
        }
        let tp: Vec<f32> = tp.to_vec1().unwrap();
        for i in 0..n {
            assert!((tp[i] - p[i]).abs() <= 1e-6 * p[i].abs().max(1.0), "{i}: {} vs {}", tp[i], p[i]);
        }
    }

    #[test]
    fn clipping_scales_to_the_limit() {
        let g = [3.0f32, 4.0];
        let norm = sum_squares(&g).sqrt();
        assert_eq!(norm, 5.0);
        let f = clip_factor(norm, 1.0);
        let clipped: Vec<f32> = g.iter().map(|x| x * f).collect();
        let after = sum_squares(&clipped).sqrt();
        assert!((after - 1.0).abs() < 1e-6, "{after}");
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(100.0, 0.0), 1.0);
    }
}
