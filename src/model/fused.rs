//! Fused forward passes with hand-written backward passes: RMSNorm, RoPE, the attention core and
//! the MLP's SwiGLU gate.
//!
//! Why: written from primitive ops ([`super::ops`]), every intermediate of these functions stays
//! alive in candle's graph until the backward pass. For attention that is five or six
//! `[batch, heads, seq, seq]` tensors per layer (scores, scaled, f32, biased, exponentials,
//! probabilities): about 1.7 GB per layer for 16 × 512 tokens of Qwen3-0.6B, 49 GB over its 28
//! layers, which does not fit an 80 GB GPU next to the optimizer state. Each function here instead
//! computes its output on detached inputs (so its intermediates are freed at once; the forward
//! uses candle's fused kernels, or ours in [`crate::kernels::softmax`]), then attaches that output to the graph through
//! a custom op whose backward recomputes what it needs from the inputs alone. The attention
//! backward recomputes the probabilities from q and k, as FlashAttention does, so no
//! `seq × seq` tensor outlives the layer that made it.
//!
//! Each is checked against its primitive-op twin in [`super::ops`] (values and gradients, f32,
//! bf16 and f16) in the tests below, and the whole model against PyTorch in
//! `tests/model_parity.rs`. On the GPU, `pipe bench parity` holds CUDA to the CPU.

use std::sync::Mutex;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use crate::kernels;

type Backward = Box<dyn Fn(&[&Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// A custom op whose "forward" hands over an output computed beforehand; its backward is a
/// closure over tensor ops. The output is taken (not cloned) so the graph does not keep a second
/// reference to it.
struct Attached {
    name: &'static str,
    out: Mutex<Option<Tensor>>,
    backward: Backward,
}

/// A contiguous copy of `s` as `layout` describes it (candle's `try_clone` copies the whole
/// buffer and ignores the layout, which is wrong for a view at an offset).
fn copy_out<S>(s: &S, layout: &Layout) -> Result<S>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: every element of `dst` is written by `copy_strided_src` before it is read.
    let mut dst = unsafe { s.device().alloc_uninit(layout.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, layout)?;
    Ok(dst)
}

impl Attached {
    fn take(&self) -> Result<Tensor> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned lock", self.name)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((copy_out(s, layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{}: output is not on the CPU", self.name),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((copy_out(s, layout)?, layout.shape().clone())),
            _ => candle_core::bail!("{}: output is not on a CUDA device", self.name),
        }
    }
}

impl CustomOp1 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, a: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok((self.backward)(&[a], g)?.into_iter().next().flatten())
    }
}

impl CustomOp2 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut grads = (self.backward)(&[a, b], g)?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten()))
    }
}

impl CustomOp3 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut grads = (self.backward)(&[a, b, c], g)?.into_iter();
        Ok((grads.next().flatten(), grads.next().flatten(), grads.next().flatten()))
    }
}

/// `out`, computed from `args` without a graph, as the result of an op over `args` whose backward
/// is `backward(args, grad_out)`. Without gradient tracking on any input it is `out` itself.
fn attach(name: &'static str, args: &[&Tensor], out: Tensor, backward: Backward) -> Result<Tensor> {
    if !args.iter().any(|a| a.track_op()) {
        return Ok(out);
    }
    let op = Attached { name, out: Mutex::new(Some(out)), backward };
    match args {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => candle_core::bail!("{name}: 1 to 3 inputs, got {}", args.len()),
    }
}

/// RMSNorm as transformers' `Qwen3RMSNorm`: statistics in f32, then the weight. The forward is
/// candle's fused kernel (which multiplies by the weight before rounding to a 16-bit dtype, one
/// rounding fewer than the reference; f32 is unaffected). The backward ([`crate::kernels::norm`]), in f32,
/// recomputes `n = x / rms(x)` and returns `dx = (g·w − n·mean(g·w·n)) / rms(x)` and `dw = Σ g·n`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let out = candle_nn::ops::rms_norm(&x.detach(), &weight.detach(), eps as f32)?;
    let backward: Backward = Box::new(move |args, g| {
        let (dx, dw) = rms_norm_backward(&args[0].detach(), &args[1].detach(), g, eps)?;
        Ok(vec![Some(dx), Some(dw)])
    });
    attach("fused-rms-norm", &[&x, weight], out, backward)
}

/// `(dx, dw)` of [`rms_norm`] for the output gradient `g`, without a graph.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (x, w, g) = (x.contiguous()?, w.contiguous()?, g.contiguous()?);
    let dx = x.apply_op3_no_bwd(&w, &g, &kernels::norm::RmsNormBackwardDx { eps })?;
    let dw = x.apply_op2_no_bwd(&g, &kernels::norm::RmsNormBackwardDw { eps })?.sum(0)?.to_dtype(w.dtype())?;
    Ok((dx, dw))
}

/// The MLP's gate `silu(gate) · up` as one kernel ([`crate::kernels::swiglu`]), in f32 with one rounding;
/// its backward is one kernel too.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let out = kernels::swiglu::swiglu_forward(&gate.detach(), &up.detach())?;
    let backward: Backward = Box::new(|args, g| {
        let (dg, du) = kernels::swiglu::swiglu_backward(&args[0].detach(), &args[1].detach(), g)?;
        Ok(vec![Some(dg), Some(du)])
    });
    attach("fused-swiglu", &[&gate, &up], out, backward)
}

/// Attention's query/key path in one kernel each way ([`crate::kernels::norm_rope`]): per-head RMSNorm with
/// `weight`, RoPE, and `x: [B, T, heads, d]` → `[B, heads, T, d]` contiguous.
pub fn qk_norm_rope(x: &Tensor, weight: &Tensor, rope: &super::ops::RopeTables, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let wcs = rope.norm_rope_tables(weight)?;
    let out = kernels::norm_rope::norm_rope_forward(&x.detach(), &wcs, eps)?;
    let backward: Backward = Box::new(move |args, g| {
        let (dx, dw) = kernels::norm_rope::norm_rope_backward(&args[0].detach(), &wcs, g, eps)?;
        Ok(vec![Some(dx), Some(dw)])
    });
    attach("fused-qk-norm-rope", &[&x, weight], out, backward)
}

/// RoPE over `x: [batch, seq, heads, head_dim]` (contiguous, as a projection reshapes to), with
/// `cos`/`sin` of shape `[seq, head_dim / 2]` in x's dtype. The rotation is orthogonal, so its
/// backward is the same kernel with `−sin`.
pub fn rope_thd(x: &Tensor, cos: &Tensor, sin: &Tensor, neg_sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let out = candle_nn::rotary_emb::rope_thd(&x.detach(), cos, sin)?;
    let (cos, neg_sin) = (cos.clone(), neg_sin.clone());
    let backward: Backward =
        Box::new(move |_, g| Ok(vec![Some(candle_nn::rotary_emb::rope_thd(&g.contiguous()?, &cos, &neg_sin)?)]));
    attach("fused-rope", &[&x], out, backward)
}

/// `softmax(q kᵀ · scale + bias) v` for grouped-query attention: `q: [B, nh, T, d]`,
/// `k, v: [B, nkv, T, d]`, `bias: [B, 1, T, T]` (f32, additive). Scores are scaled in the input
/// dtype and soft-maxed in f32, as transformers' eager attention does, by one kernel
/// ([`crate::kernels::softmax`]). The backward recomputes the scores and returns
/// `dV = Pᵀ dO`, `dS = P ⊙ (dO Vᵀ − rowsum(dO Vᵀ ⊙ P))`, `dQ = scale · dS K`, `dK = scale · dSᵀ Q`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let bias = bias.contiguous()?;
    let out = attention_forward(&q.detach(), &k.detach(), &v.detach(), &bias, scale)?;
    let backward: Backward = Box::new(move |args, g| {
        let (dq, dk, dv) =
            attention_backward(&args[0].detach(), &args[1].detach(), &args[2].detach(), &bias, scale, g)?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
    });
    attach("fused-attention", &[&q, &k, &v], out, backward)
}

/// [`attention`]'s output without a graph; `q`, `k`, `v` contiguous.
pub fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    let p = probabilities(&scores(q, k)?, bias, scale)?;
    p.reshape((b, nkv, nh / nkv * t, t))?.matmul(v)?.reshape((b, nh, t, d))
}

/// [`attention_forward`] that also returns the probabilities `[B, nh, T, T]` (input dtype), for
/// [`attention_backward_from_probs`].
pub fn attention_forward_keeping_probs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let (b, nh, t, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    let p = probabilities(&scores(q, k)?, bias, scale)?;
    let out = p.reshape((b, nkv, nh / nkv * t, t))?.matmul(v)?.reshape((b, nh, t, d))?;
    Ok((out, p))
}

/// [`attention_backward`] from the forward's probabilities: no scores matmul, no softmax pass and
/// no bias read. In f32 the same bits as recomputing; in 16-bit dtypes it reads the rounded
/// probabilities.
pub fn attention_backward_from_probs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &Tensor,
    scale: f64,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward_through(q, k, v, p, g, |dp| p.apply_op2_no_bwd(dp, &kernels::softmax::SoftmaxBackwardFromProbs { scale }))
}

/// `(dq, dk, dv)` of [`attention`] for the output gradient `g`, recomputing the probabilities from
/// `q` and `k` (contiguous); no graph.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    g: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let s = scores(q, k)?;
    let p = probabilities(&s, bias, scale)?;
    backward_through(q, k, v, &p, g, |dp| {
        s.apply_op3_no_bwd(bias, dp, &kernels::softmax::MaskedSoftmaxBackward { scale })
    })
}

/// `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = softmax_backward(dP)`, `dQ = dS K`, `dK = dSᵀ Q` (the scale
/// is inside `softmax_backward`), with query heads grouped by their key/value head.
fn backward_through(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: &Tensor,
    g: &Tensor,
    softmax_backward: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, nh, t, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    let rows = nh / nkv * t;
    let g = g.contiguous()?.reshape((b, nkv, rows, d))?;
    let dv = p.reshape((b, nkv, rows, t))?.t()?.matmul(&g)?;
    let dp = g.matmul(&v.t()?)?.reshape((b, nh, t, t))?;
    let ds = softmax_backward(&dp)?.reshape((b, nkv, rows, t))?;
    let dq = ds.matmul(k)?.reshape((b, nh, t, d))?;
    let dk = ds.t()?.matmul(&q.reshape((b, nkv, rows, d))?)?;
    Ok((dq, dk, dv))
}

/// The raw scores `q kᵀ`, `[B, nh, T, T]`, in the input dtype.
fn scores(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let nkv = k.dim(1)?;
    q.reshape((b, nkv, nh / nkv * t, d))?.matmul(&k.t()?)?.reshape((b, nh, t, t))
}

/// The attention probabilities in the input dtype, `[B, nh, T, T]`.
fn probabilities(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    scores.apply_op2_no_bwd(bias, &kernels::softmax::MaskedSoftmax { scale })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops;
    use candle_core::{DType, Device, Var};

    fn sample(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        ops::tests::sample(shape, seed).to_dtype(dtype).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Output and gradients of `fused` and `reference` (same inputs, same projection of the
    /// output to a scalar) agree within `tol`; every gradient is non-zero.
    fn same_values_and_grads(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Tensor,
        reference: impl Fn(&[Tensor]) -> Tensor,
        tol: f32,
    ) {
        let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
            let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts);
            let proj = sample(y.dims(), 99, y.dtype());
            let loss = y.mul(&proj).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let gs: Vec<Tensor> = ts.iter().map(|t| grads.get(t).expect("an input got no gradient").clone()).collect();
            (y, gs)
        };
        let (yf, gf) = run(&fused);
        let (yr, gr) = run(&reference);
        assert_eq!(yf.dims(), yr.dims());
        assert_eq!(yf.dtype(), yr.dtype());
        let d = max_diff(&yf, &yr);
        assert!(d <= tol, "output differs by {d} > {tol}");
        for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
            assert_eq!(a.dims(), b.dims(), "grad {i} shape");
            let scale = b.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let scale = scale.to_scalar::<f32>().unwrap();
            assert!(scale > 0.0, "reference grad {i} is zero");
            let d = max_diff(a, b);
            assert!(d <= tol * scale.max(1.0), "grad {i} differs by {d} (scale {scale}) > {tol}");
        }
    }

    #[test]
    fn fused_rms_norm_equals_the_primitive_one() {
        // 600 rows: the weight gradient is summed from several partial sums.
        for (dtype, tol, rows) in
            [(DType::F32, 2e-5, 5), (DType::BF16, 3e-2, 5), (DType::F16, 1e-2, 5), (DType::F32, 2e-5, 200)]
        {
            let x = (sample(&[3, rows, 16], 1, dtype) * 3.0).unwrap();
            let w = sample(&[16], 2, dtype);
            same_values_and_grads(
                &[x, w],
                |t| rms_norm(&t[0], &t[1], 1e-6).unwrap(),
                |t| ops::rms_norm(&t[0], &t[1], 1e-6).unwrap(),
                tol,
            );
        }
    }

    #[test]
    fn fused_rope_equals_the_primitive_one() {
        let (b, t, h, d) = (2, 6, 3, 8);
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 2e-2)] {
            let tables = ops::RopeTables::new(t, d, 10_000.0, dtype, &Device::Cpu).unwrap();
            let x = sample(&[b, t, h, d], 3, dtype);
            same_values_and_grads(
                &[x],
                |x| tables.apply_thd(&x[0]).unwrap(),
                |x| tables.apply(&x[0].transpose(1, 2).unwrap()).unwrap().transpose(1, 2).unwrap(),
                tol,
            );
        }
    }

    #[test]
    fn fused_attention_equals_the_primitive_one_with_padding_and_gqa() {
        let (b, nh, nkv, t, d) = (2, 4, 2, 5, 8);
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [0, 0, 1, 1, 1]], &Device::Cpu).unwrap();
        let bias = ops::attention_bias(&mask).unwrap();
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2), (DType::F16, 1e-2)] {
            let q = (sample(&[b, nh, t, d], 4, dtype) * 2.0).unwrap();
            let k = (sample(&[b, nkv, t, d], 5, dtype) * 2.0).unwrap();
            let v = sample(&[b, nkv, t, d], 6, dtype);
            let scale = (d as f64).powf(-0.5);
            same_values_and_grads(
                &[q, k, v],
                |x| attention(&x[0], &x[1], &x[2], &bias, scale).unwrap(),
                |x| ops::attention(&x[0], &x[1], &x[2], &bias, scale).unwrap(),
                tol,
            );
        }
    }

    #[test]
    fn the_backward_from_kept_probabilities_equals_the_recomputing_one() {
        let (b, nh, nkv, t, d) = (2, 4, 2, 5, 8);
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [0, 0, 1, 1, 1]], &Device::Cpu).unwrap();
        let bias = ops::attention_bias(&mask).unwrap();
        let scale = (d as f64).powf(-0.5);
        for (dtype, tol) in [(DType::F32, 0.0), (DType::BF16, 2e-2), (DType::F16, 4e-3)] {
            let q = (sample(&[b, nh, t, d], 4, dtype) * 2.0).unwrap();
            let k = (sample(&[b, nkv, t, d], 5, dtype) * 2.0).unwrap();
            let v = sample(&[b, nkv, t, d], 6, dtype);
            let g = sample(&[b, nh, t, d], 7, dtype);
            let (out, p) = attention_forward_keeping_probs(&q, &k, &v, &bias, scale).unwrap();
            assert_eq!(max_diff(&out, &attention_forward(&q, &k, &v, &bias, scale).unwrap()), 0.0);
            let kept = attention_backward_from_probs(&q, &k, &v, &p, scale, &g).unwrap();
            let recomputed = attention_backward(&q, &k, &v, &bias, scale, &g).unwrap();
            for (i, (a, r)) in
                [(kept.0, recomputed.0), (kept.1, recomputed.1), (kept.2, recomputed.2)].iter().enumerate()
            {
                let scale = r.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let scale = scale.to_scalar::<f32>().unwrap();
                assert!(scale > 0.0);
                let diff = max_diff(a, r);
                assert!(diff <= tol * scale, "{dtype:?} gradient {i}: {diff} (scale {scale})");
            }
        }
    }

    #[test]
    fn fused_swiglu_equals_the_primitive_one() {
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 3e-2), (DType::F16, 1e-2)] {
            let g = (sample(&[2, 5, 12], 11, dtype) * 4.0).unwrap();
            let u = sample(&[2, 5, 12], 12, dtype);
            same_values_and_grads(
                &[g, u],
                |t| swiglu(&t[0], &t[1]).unwrap(),
                |t| (ops::silu(&t[0]).unwrap() * &t[1]).unwrap(),
                tol,
            );
        }
    }

    #[test]
    fn without_gradient_tracking_the_output_is_returned_as_is() {
        let x = sample(&[2, 3, 8], 7, DType::F32);
        let w = sample(&[8], 8, DType::F32);
        let y = rms_norm(&x, &w, 1e-6).unwrap();
        assert!(!y.track_op());
        assert!(max_diff(&y, &ops::rms_norm(&x, &w, 1e-6).unwrap()) < 1e-5);
    }
}
