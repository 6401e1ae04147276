//! Differentiable building blocks made only of primitive candle ops that have a backward pass.
//!
//! candle's fused `candle_nn::ops::rms_norm`, `candle_nn::rotary_emb::rope{,_i}` and
//! `softmax_last_dim` have no backward: a loss computed through them silently yields no gradient
//! for everything upstream. Each function here is written from `sqr`, `mean`, `sqrt`, `recip`,
//! `exp`, `sum`, `narrow`, `cat`, `matmul` and broadcasting arithmetic, all of which candle can
//! differentiate. The model runs RMSNorm, RoPE and attention through [`super::fused`] instead
//! (same values, far less memory and time); the versions here are the references those are
//! tested against, and the gradient tests below check them against finite differences.

use candle_core::{DType, Device, Module, Result, Tensor, D};

/// RMSNorm exactly as transformers' `Qwen3RMSNorm`: the statistics in f32 whatever the input
/// dtype, the result cast back before the weight multiplies it.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let inv_rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    xf.broadcast_mul(&inv_rms)?.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Softmax over the last dimension in f32. The row maximum is detached: softmax is invariant to
/// the shift, so its gradient through the max is exactly zero and need not be traced.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let max = xf.max_keepdim(D::Minus1)?.detach();
    let e = xf.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)?.to_dtype(dtype)
}

/// `softmax(q kᵀ · scale + bias) v` from primitive ops, keeping every intermediate for the
/// backward pass: the reference [`super::fused::attention`] is tested against. `q: [B, nh, T, d]`,
/// `k, v: [B, nkv, T, d]` contiguous. GQA without materialising repeated keys: query heads are
/// grouped by the key/value head they share, `[B, nkv, group·T, d]`, so one batched matmul per kv
/// head serves its group (transformers' head order: query head `h` uses kv head `h / group`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    let q = q.reshape((b, nkv, nh / nkv * t, d))?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = scores.reshape((b, nh, t, t))?.to_dtype(DType::F32)?.broadcast_add(bias)?;
    let probs = softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
    probs.reshape((b, nkv, nh / nkv * t, t))?.matmul(v)?.reshape((b, nh, t, d))
}

/// SiLU via candle's unary `silu`, which has a backward pass (checked in the tests).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// Cosine and sine tables for the positions `0..seq_len`, `[seq_len, head_dim]` each, laid out
/// as transformers does: the `head_dim / 2` frequencies repeated twice (`cat(freqs, freqs)`).
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    /// `[seq_len, head_dim / 2]`: the layout candle's fused RoPE kernel takes; `−sin` is its
    /// backward.
    cos_half: Tensor,
    sin_half: Tensor,
    neg_sin_half: Tensor,
}

impl RopeTables {
    /// The arithmetic mirrors transformers' default RoPE step by step in f32 (`base ** (2i/d)`,
    /// its reciprocal, then `position * inv_freq`) so that angles at long positions, where one f32
    /// rounding is worth ~1e-5 rad, agree with the reference bit for bit where possible.
    pub fn new(seq_len: usize, head_dim: usize, theta: f64, dtype: DType, device: &Device) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let exponent = (2 * i) as f32 / head_dim as f32;
                let p = theta.powf(exponent as f64) as f32;
                1.0f32 / p
            })
            .collect();
        let mut cos = Vec::with_capacity(seq_len * head_dim);
        let mut sin = Vec::with_capacity(seq_len * head_dim);
        for pos in 0..seq_len {
            let angles: Vec<f32> = inv_freq.iter().map(|f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| (*a as f64).cos() as f32));
                sin.extend(angles.iter().map(|a| (*a as f64).sin() as f32));
            }
        }
        let cos = Tensor::from_vec(cos, (seq_len, head_dim), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (seq_len, head_dim), device)?.to_dtype(dtype)?;
        let cos_half = cos.narrow(1, 0, half)?.contiguous()?;
        let sin_half = sin.narrow(1, 0, half)?.contiguous()?;
        let neg_sin_half = sin_half.neg()?;
        Ok(Self { cos, sin, cos_half, sin_half, neg_sin_half })
    }

    /// The same rotation through candle's fused kernel, with a backward pass
    /// ([`super::fused::rope_thd`]), on `x: [batch, seq, heads, head_dim]` as a projection's
    /// reshape leaves it.
    pub fn apply_thd(&self, x: &Tensor) -> Result<Tensor> {
        super::fused::rope_thd(x, &self.cos_half, &self.sin_half, &self.neg_sin_half)
    }

    /// `cos` and `sin` as `[seq_len, head_dim / 2]` (the halves the rotation pairs share).
    pub fn half_tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos_half, &self.sin_half)
    }

    /// `[weight | cos | sin]`, the one small input the q/k norm + RoPE kernels take
    /// ([`crate::kernels::norm_rope`]).
    pub fn norm_rope_tables(&self, weight: &Tensor) -> Result<Tensor> {
        crate::kernels::norm_rope::tables(weight, &self.cos_half, &self.sin_half)
    }

    /// Applies the rotation to `x: [batch, heads, seq, head_dim]` (any strides); the result is
    /// contiguous, which lets attention reshape it for free.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let half = d / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&self.cos)?.add(&rotated.broadcast_mul(&self.sin)?)
    }
}

/// The additive attention bias `[batch, 1, seq, seq]` for a causal model over a (left-)padded
/// batch: 0 where query `i` may see key `j` (`j <= i` and key `j` is a real token), `f32::MIN`
/// elsewhere. `f32::MIN` is what transformers' eager attention adds, and it stays finite: a query
/// row with no visible key (a padding position before the first real token, or a fully padded
/// sequence) gets uniform weights instead of the NaN that `-inf` would produce, and since every
/// real query gives such keys exactly zero weight, no gradient ever flows through those rows.
pub fn attention_bias(attention_mask: &Tensor) -> Result<Tensor> {
    let (b, t) = attention_mask.dims2()?;
    let device = attention_mask.device();
    let causal: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::MIN })).collect();
    let causal = Tensor::from_vec(causal, (1, t, t), device)?;
    // mask ∈ {0, 1}: m·MAX − MAX is exactly 0 for real tokens and f32::MIN for padding.
    let keys = attention_mask.to_dtype(DType::F32)?.affine(f32::MAX as f64, -(f32::MAX as f64))?.reshape((b, 1, t))?;
    // `minimum`, not a sum: two f32::MIN would overflow to -inf.
    causal.broadcast_minimum(&keys)?.unsqueeze(1)
}

/// A linear layer `y = x Wᵀ (+ b)` over the last dimension, with an optional LoRA adapter.
///
/// The weight is kept in the `[out, in]` layout of the checkpoint; the transposed view is handed
/// to the matmul (candle's gemm reads it through strides), so neither forward nor backward copies
/// the weight.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`); the base path never
    /// sees it. Inference copies ([`super::Qwen3::detached`]) drop it.
    pub lora_dropout: Option<LoraDropout>,
}

/// A low-rank update `scale · (x Aᵀ) Bᵀ` added to a frozen linear layer's output. The trainer owns
/// creating and naming `a: [r, in]` and `b: [out, r]`; the model only evaluates them.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// Inverted dropout whose masks come from a counter-based stream (the project's SplitMix64 at a
/// shared counter, [`crate::util::rng::at_counter`]) rather than candle's device RNG, which cannot
/// be seeded on the CPU. The trainer sets the counter from (seed, micro-batch index) before each
/// forward pass, so a run resumed from a checkpoint draws exactly the masks an uninterrupted run
/// would have drawn.
#[derive(Debug, Clone)]
pub struct LoraDropout {
    /// Probability of zeroing an element, in [0, 1).
    pub p: f32,
    pub stream: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl LoraDropout {
    /// `x ⊙ mask / (1 − p)` with a fresh mask, drawn from the next `x.elem_count()` counter values.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if self.p <= 0.0 {
            return Ok(x.clone());
        }
        let n = x.elem_count();
        let base = self.stream.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> = (0..n as u64)
            .map(|i| {
                let z = crate::util::rng::at_counter(base.wrapping_add(i));
                let u = (z >> 40) as f32 / (1u64 << 24) as f32;
                if u < self.p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

fn matmul_last(x: &Tensor, w_t: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, in_dim))?.matmul(w_t)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("rank >= 1") = w_t.dim(1)?;
    y.reshape(out_dims)
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, lora: None, lora_dropout: None }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = matmul_last(x, &self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let down = match &self.lora_dropout {
                Some(d) => matmul_last(&d.apply(x)?, &l.a.t()?)?,
                None => matmul_last(x, &l.a.t()?)?,
            };
            let up = matmul_last(&down, &l.b.t()?)?;
            y = (y + up.affine(l.scale, 0.0)?)?;
        }
        Ok(y)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Var;

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= tol, "max abs diff {d} > {tol}");
    }

    /// Deterministic values in [-1, 1) on the CPU (also used by `super::super::fused`'s tests).
    pub(crate) fn sample(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The largest |a − b| over the largest |b|, in f32 (any float dtypes); `b` must not be zero.
    pub(crate) fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let max = |t: Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
        let scale = max(b.clone());
        assert!(scale > 0.0, "the reference is zero");
        max((a - b).unwrap()) / scale
    }

    /// Central finite differences of a scalar function, to check the hand-built ops' gradients.
    fn numeric_grad(f: impl Fn(&Tensor) -> Tensor, x: &Tensor) -> Vec<f32> {
        let base: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        (0..base.len())
            .map(|i| {
                let mut p = base.clone();
                p[i] += eps;
                let mut m = base.clone();
                m[i] -= eps;
                let fp = f(&Tensor::from_vec(p, x.shape(), &Device::Cpu).unwrap());
                let fm = f(&Tensor::from_vec(m, x.shape(), &Device::Cpu).unwrap());
                let fp = fp.to_scalar::<f32>().unwrap();
                let fm = fm.to_scalar::<f32>().unwrap();
                (fp - fm) / (2.0 * eps)
            })
            .collect()
    }

    fn check_grad(f: impl Fn(&Tensor) -> Tensor, x: &Tensor) {
        let var = Var::from_tensor(x).unwrap();
        let grads = f(var.as_tensor()).backward().unwrap();
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .expect("no gradient reached the input")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let n = numeric_grad(&f, x);
        for (i, (a, b)) in g.iter().zip(&n).enumerate() {
            assert!((a - b).abs() < 2e-3 + 2e-2 * b.abs(), "grad[{i}]: {a} vs {b}");
        }
    }

    #[test]
    fn rms_norm_matches_definition_and_differentiates() {
        let x = sample(&[2, 3, 8], 1);
        let w = sample(&[8], 2);
        let y = rms_norm(&x, &w, 1e-6).unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let ws: Vec<f32> = w.to_vec1().unwrap();
        let mut expected = Vec::new();
        for row in xs.chunks(8) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / 8.0;
            let r = 1.0 / (ms + 1e-6).sqrt();
            expected.extend(row.iter().zip(&ws).map(|(v, w)| v * r * w));
        }
        close(&y, &Tensor::from_vec(expected, (2, 3, 8), &Device::Cpu).unwrap(), 1e-6);
        let proj = sample(&[2, 3, 8], 3);
        check_grad(|x| rms_norm(x, &w, 1e-6).unwrap().mul(&proj).unwrap().sum_all().unwrap(), &x);
        check_grad(|w| rms_norm(&x, w, 1e-6).unwrap().mul(&proj).unwrap().sum_all().unwrap(), &w);
    }

    #[test]
    fn softmax_matches_candle_and_differentiates() {
        let x = (sample(&[2, 5, 7], 4) * 3.0).unwrap();
        let ours = softmax_last_dim(&x).unwrap();
        let fused = candle_nn::ops::softmax_last_dim(&x).unwrap();
        close(&ours, &fused, 1e-6);
        let proj = sample(&[2, 5, 7], 5);
        check_grad(|x| softmax_last_dim(x).unwrap().mul(&proj).unwrap().sum_all().unwrap(), &x);
    }

    #[test]
    fn rope_matches_candle_fused_rope_and_differentiates() {
        let (b, h, t, d) = (2, 3, 5, 8);
        let x = sample(&[b, h, t, d], 6);
        let tables = RopeTables::new(t, d, 10_000.0, DType::F32, &Device::Cpu).unwrap();
        let ours = tables.apply(&x).unwrap();
        let cos = tables.cos.narrow(1, 0, d / 2).unwrap().contiguous().unwrap();
        let sin = tables.sin.narrow(1, 0, d / 2).unwrap().contiguous().unwrap();
        let fused = candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap();
        close(&ours, &fused, 1e-6);
        // Strided input (as attention passes it after a transpose) gives the same result.
        let xt = x.transpose(1, 2).unwrap().contiguous().unwrap();
        close(&tables.apply(&xt.transpose(1, 2).unwrap()).unwrap(), &ours, 0.0);
        let proj = sample(&[b, h, t, d], 7);
        check_grad(|x| tables.apply(x).unwrap().mul(&proj).unwrap().sum_all().unwrap(), &x);
    }

    #[test]
    fn silu_differentiates() {
        let x = (sample(&[3, 4], 8) * 4.0).unwrap();
        check_grad(|x| silu(x).unwrap().sum_all().unwrap(), &x);
    }

    #[test]
    fn attention_bias_is_causal_padding_aware_and_finite() {
        let mask = Tensor::new(&[[1u32, 1, 1], [0, 1, 1], [0, 0, 0]], &Device::Cpu).unwrap();
        let bias = attention_bias(&mask).unwrap();
        assert_eq!(bias.dims(), &[3, 1, 3, 3]);
        let v: Vec<Vec<Vec<f32>>> = bias.squeeze(1).unwrap().to_vec3().unwrap();
        let m = f32::MIN;
        assert_eq!(v[0], vec![vec![0., m, m], vec![0., 0., m], vec![0., 0., 0.]]);
        assert_eq!(v[1], vec![vec![m, m, m], vec![m, 0., m], vec![m, 0., 0.]]);
        assert!(v[2].iter().flatten().all(|x| *x == m));
        // A fully masked row softmaxes to finite uniform weights, not NaN.
        let scores = (Tensor::ones((3, 1, 3, 3), DType::F32, &Device::Cpu).unwrap() + &bias).unwrap();
        let p: Vec<f32> = softmax_last_dim(&scores).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(p.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn linear_with_zero_lora_is_the_base_layer_and_trains_the_adapter() {
        let x = sample(&[2, 3, 4], 9);
        let w = sample(&[5, 4], 10);
        let base = Linear::new(w.clone(), None);
        let a = Var::from_tensor(&sample(&[2, 4], 11)).unwrap();
        let b = Var::from_tensor(&Tensor::zeros((5, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let mut adapted = base.clone();
        adapted.lora = Some(LoraAdapter { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale: 2.0 });
        let y0 = base.forward(&x).unwrap();
        let y1 = adapted.forward(&x).unwrap();
        close(&y0, &y1, 0.0);
        let grads = y1.sum_all().unwrap().backward().unwrap();
        let gb = grads.get(b.as_tensor()).unwrap();
        assert!(gb.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }
}
