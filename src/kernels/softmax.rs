//! The attention softmax, its mask and its backward pass as single row-wise kernels.
//!
//! Why: as tensor ops, `softmax(scale · S + bias)` over the `[B, heads, T, T]` scores is five
//! kernels (scale, cast to f32, add the mask, softmax, cast back) and its backward about eight,
//! each reading and writing `T × T` tensors of up to 4 bytes an element: on the GPU, for
//! Qwen3-0.6B at 16 × 512 tokens, that was half of a decoder layer's time. Here each direction is
//! one pass over a row. Neither op records a graph: [`crate::model::fused::attention`] calls them on
//! detached tensors and supplies the gradient itself.
//!
//! Both ops do the tensor ops' arithmetic, up to the order of the f32 sums: the scale multiplies the
//! score in the input dtype (the scale itself rounded to that dtype, as candle's `affine` does),
//! the sum with the f32 bias and the softmax are in f32, and the probabilities are rounded to the
//! input dtype. The backward recomputes the f32 probabilities from the scores (they are never
//! stored) and returns `scale · P ⊙ (dP − Σ dP ⊙ P)`, rounded to the dtype before the scale, as the
//! tensor ops' autograd did. The CPU loops below are the reference the CUDA kernels mirror.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, WithDType};
use rayon::prelude::*;

use super::{contiguous_start, on_float_storages};

/// `[B, heads, T, T]` scores and a `[B, 1, T, T]` f32 bias, both contiguous: (B, heads, T) and
/// the start offsets.
fn dims(scores: &Layout, bias: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, h, t, t2) = scores.shape().dims4()?;
    if t != t2 || bias.shape().dims() != [b, 1, t, t] {
        candle_core::bail!(
            "masked softmax: scores {:?} and bias {:?} must be [B, H, T, T] and [B, 1, T, T]",
            scores.shape(),
            bias.shape()
        );
    }
    let s0 = scores
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("masked softmax: scores must be contiguous".into()))?
        .0;
    let b0 = bias
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("masked softmax: bias must be contiguous".into()))?
        .0;
    Ok((b, h, t, s0, b0))
}

/// [`dims`], and the start offset of dP, which must have the scores' shape and be contiguous.
fn backward_dims(scores: &Layout, bias: &Layout, dp: &Layout) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let (b, h, t, s0, b0) = dims(scores, bias)?;
    if dp.shape() != scores.shape() {
        candle_core::bail!(
            "masked softmax backward: dP {:?} must have the scores' shape {:?}",
            dp.shape(),
            scores.shape()
        );
    }
    let g0 = dp
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("masked softmax backward: dP must be contiguous".into()))?
        .0;
    Ok((b, h, t, s0, b0, g0))
}

/// The scale as the dtype's `affine` applies it: rounded to the dtype.
fn dtype_scale<T: WithDType>(scale: f64) -> f32 {
    T::from_f64(scale).to_f64() as f32
}

/// One row's biased scores in f32, replaced by their exponentials `exp(v − max)`; returns the sum
/// of those.
fn row_exps<T: WithDType>(s: &[T], bias: &[f32], scale: f32, v: &mut [f32]) -> f32 {
    let mut m = f32::NEG_INFINITY;
    for ((x, b), out) in s.iter().zip(bias).zip(v.iter_mut()) {
        *out = T::from_f64((x.to_f64() as f32 * scale) as f64).to_f64() as f32 + b;
        m = m.max(*out);
    }
    let mut sum = 0f32;
    for x in v.iter_mut() {
        *x = (*x - m).exp();
        sum += *x;
    }
    sum
}

/// `softmax(scale · scores + bias)` over the last dim, in the scores' dtype.
#[derive(Debug, Clone, Copy)]
pub struct MaskedSoftmax {
    pub scale: f64,
}

/// `scale · P ⊙ (dP − Σ dP ⊙ P)` with `P` recomputed from (scores, bias); args: scores, bias, dP.
#[derive(Debug, Clone, Copy)]
pub struct MaskedSoftmaxBackward {
    pub scale: f64,
}

/// `scale · P ⊙ (dP − Σ dP ⊙ P)` from the probabilities the forward wrote; args: P, dP, both
/// `[B, H, T, T]` contiguous. The same arithmetic as [`MaskedSoftmaxBackward`] (in f32 the same
/// bits, since the stored f32 probabilities are the recomputed ones), without re-reading the
/// scores and the bias or recomputing the exponentials. For 16-bit dtypes it reads the rounded
/// probabilities, as transformers' eager attention does.
#[derive(Debug, Clone, Copy)]
pub struct SoftmaxBackwardFromProbs {
    pub scale: f64,
}

fn backward_from_probs_cpu<T: WithDType>(p: &[T], dp: &[T], t: usize, scale: f64) -> Vec<T> {
    let scale = dtype_scale::<T>(scale);
    let mut out = vec![T::zero(); p.len()];
    out.par_chunks_mut(t).enumerate().for_each(|(r, dst)| {
        let (p, g) = (&p[r * t..(r + 1) * t], &dp[r * t..(r + 1) * t]);
        let dot: f32 = p.iter().zip(g).map(|(p, g)| g.to_f64() as f32 * p.to_f64() as f32).sum();
        for ((d, p), g) in dst.iter_mut().zip(p).zip(g) {
            let ds = T::from_f64((p.to_f64() as f32 * (g.to_f64() as f32 - dot)) as f64).to_f64() as f32;
            *d = T::from_f64((ds * scale) as f64);
        }
    });
    out
}

impl CustomOp2 for SoftmaxBackwardFromProbs {
    fn name(&self) -> &'static str {
        "pipe-softmax-backward-from-probs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (t, p0, g0, n) = probs_dims(l1, l2)?;
        let out = on_float_storages!(
            storage,
            (s1, s2),
            |p, g| backward_from_probs_cpu(&p[p0..p0 + n], &g[g0..g0 + n], t, self.scale),
            "softmax backward: P and dP must share one float dtype"
        );
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (t, p0, g0, n) = probs_dims(l1, l2)?;
        let out = cuda::from_probs(s1, p0, s2, g0, n, t, self.scale)?;
        Ok((out, l1.shape().clone()))
    }
}

/// (T, offset of P, offset of dP, elements) of two contiguous `[..., T, T]` tensors of one shape.
fn probs_dims(p: &Layout, dp: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (_, _, t, t2) = p.shape().dims4()?;
    if t != t2 || dp.shape() != p.shape() {
        candle_core::bail!(
            "softmax backward: P {:?} and dP {:?} must be one [B, H, T, T] shape",
            p.shape(),
            dp.shape()
        );
    }
    let offset = |l: &Layout, what: &str| contiguous_start(l, "softmax backward", what);
    Ok((t, offset(p, "P")?, offset(dp, "dP")?, p.shape().elem_count()))
}

fn forward_cpu<T: WithDType>(s: &[T], bias: &[f32], b: usize, h: usize, t: usize, scale: f64) -> Vec<T> {
    let scale = dtype_scale::<T>(scale);
    let mut out = vec![T::zero(); b * h * t * t];
    out.par_chunks_mut(t).enumerate().for_each_init(
        || vec![0f32; t],
        |v, (r, dst)| {
            let (bi, i) = (r / (h * t), r % t);
            let sum = row_exps(&s[r * t..(r + 1) * t], &bias[(bi * t + i) * t..(bi * t + i + 1) * t], scale, v);
            for (d, e) in dst.iter_mut().zip(v.iter()) {
                *d = T::from_f64((e / sum) as f64);
            }
        },
    );
    out
}

#[allow(clippy::too_many_arguments)]
fn backward_cpu<T: WithDType>(s: &[T], bias: &[f32], dp: &[T], b: usize, h: usize, t: usize, scale: f64) -> Vec<T> {
    let scale = dtype_scale::<T>(scale);
    let mut out = vec![T::zero(); b * h * t * t];
    out.par_chunks_mut(t).enumerate().for_each_init(
        || vec![0f32; t],
        |v, (r, dst)| {
            let (bi, i) = (r / (h * t), r % t);
            let sum = row_exps(&s[r * t..(r + 1) * t], &bias[(bi * t + i) * t..(bi * t + i + 1) * t], scale, v);
            let g = &dp[r * t..(r + 1) * t];
            let dot: f32 = v.iter().zip(g).map(|(e, g)| g.to_f64() as f32 * (e / sum)).sum();
            for ((d, e), g) in dst.iter_mut().zip(v.iter()).zip(g) {
                let p = e / sum;
                let ds = T::from_f64((p * (g.to_f64() as f32 - dot)) as f64).to_f64() as f32;
                *d = T::from_f64((ds * scale) as f64);
            }
        },
    );
    out
}

fn f32_slice(s: &CpuStorage) -> Result<&[f32]> {
    match s {
        CpuStorage::F32(x) => Ok(x),
        _ => candle_core::bail!("masked softmax: the bias must be f32"),
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "pipe-masked-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, s0, b0) = dims(l1, l2)?;
        let bias = &f32_slice(s2)?[b0..];
        let n = b * h * t * t;
        let out = match s1 {
            CpuStorage::F32(x) => CpuStorage::F32(forward_cpu(&x[s0..s0 + n], bias, b, h, t, self.scale)),
            CpuStorage::BF16(x) => CpuStorage::BF16(forward_cpu(&x[s0..s0 + n], bias, b, h, t, self.scale)),
            CpuStorage::F16(x) => CpuStorage::F16(forward_cpu(&x[s0..s0 + n], bias, b, h, t, self.scale)),
            _ => candle_core::bail!("masked softmax: scores must be f32, bf16 or f16"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, h, t, s0, b0) = dims(l1, l2)?;
        let out = cuda::forward_or_backward(s1, s0, s2, b0, None, (b, h, t), self.scale)?;
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp3 for MaskedSoftmaxBackward {
    fn name(&self) -> &'static str {
        "pipe-masked-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, s0, b0, g0) = backward_dims(l1, l2, l3)?;
        let bias = &f32_slice(s2)?[b0..];
        let n = b * h * t * t;
        let out = on_float_storages!(
            storage,
            (s1, s3),
            |s, g| backward_cpu(&s[s0..s0 + n], bias, &g[g0..g0 + n], b, h, t, self.scale),
            "masked softmax backward: scores and dP must share one float dtype"
        );
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, h, t, s0, b0, g0) = backward_dims(l1, l2, l3)?;
        let out = cuda::forward_or_backward(s1, s0, s2, b0, Some((s3, g0)), (b, h, t), self.scale)?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaStorage, DType, Result};

    use crate::kernels::launch::{dtype_suffix, grid, launch, Module, FLOAT_TYPES, WARP_REDUCE};

    /// Rows of up to [`WARP_MAX_T`] columns: one warp per row, [`ROWS_PER_BLOCK`] rows per block;
    /// each lane keeps its `K` columns (`j = lane + 32 k`) in registers, so every element is read
    /// once and written once, and the row's reductions are warp shuffles with no block barrier.
    /// Why: the first version (one 128-thread block per row, still used for longer rows) re-read
    /// each row from cache for every pass and waited on three block barriers per row; on an H100
    /// its forward and backward moved the 0.6B model's `16 × 16 × 512 × 512` probabilities at
    /// about a fifth of the card's bandwidth and were most of attention's time. `K` is a template
    /// parameter (4, 8, 16, 32) so the per-lane arrays stay in registers.
    ///
    /// Every kernel takes the number of rows last and does nothing past it.
    /// `F32`, `BF16`, `F16`: [`FLOAT_TYPES`].
    const SOURCE: &str = r#"
__device__ float block_reduce(float v, bool is_max) {
  __shared__ float part[32];
  __shared__ float result;
  v = is_max ? warp_max(v) : warp_sum(v);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? part[lane] : (is_max ? __int_as_float(0xff800000) : 0.0f);
    v = is_max ? warp_max(v) : warp_sum(v);
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

// One element of scale · P ⊙ (dP − dot), rounded to the dtype before the scale as the tensor ops were.
template <typename D>
__device__ __forceinline__ typename D::S grad_of(float p, float dp, float dot, float scale) {
  return D::from(D::to(D::from(p * (dp - dot))) * scale);
}

template <typename D>
__device__ __forceinline__ float biased(const typename D::S* s, const float* bias, int j, float scale) {
  return D::to(D::from(D::to(s[j]) * scale)) + bias[j];
}

template <typename D>
__device__ void forward(const typename D::S* s, const float* bias, typename D::S* p, int t, int heads, float scale) {
  long long r = blockIdx.x;
  long long b = r / ((long long)heads * t), i = r % t;
  s += r * t; p += r * t; bias += (b * t + i) * t;
  float m = __int_as_float(0xff800000);
  for (int j = threadIdx.x; j < t; j += blockDim.x) m = fmaxf(m, biased<D>(s, bias, j, scale));
  m = block_reduce(m, true);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < t; j += blockDim.x) sum += expf(biased<D>(s, bias, j, scale) - m);
  sum = block_reduce(sum, false);
  for (int j = threadIdx.x; j < t; j += blockDim.x) p[j] = D::from(expf(biased<D>(s, bias, j, scale) - m) / sum);
}

template <typename D>
__device__ void backward(const typename D::S* s, const float* bias, const typename D::S* dp, typename D::S* ds,
                         int t, int heads, float scale) {
  long long r = blockIdx.x;
  long long b = r / ((long long)heads * t), i = r % t;
  s += r * t; dp += r * t; ds += r * t; bias += (b * t + i) * t;
  float m = __int_as_float(0xff800000);
  for (int j = threadIdx.x; j < t; j += blockDim.x) m = fmaxf(m, biased<D>(s, bias, j, scale));
  m = block_reduce(m, true);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < t; j += blockDim.x) sum += expf(biased<D>(s, bias, j, scale) - m);
  sum = block_reduce(sum, false);
  float dot = 0.0f;
  for (int j = threadIdx.x; j < t; j += blockDim.x) dot += D::to(dp[j]) * (expf(biased<D>(s, bias, j, scale) - m) / sum);
  dot = block_reduce(dot, false);
  for (int j = threadIdx.x; j < t; j += blockDim.x) {
    float p = expf(biased<D>(s, bias, j, scale) - m) / sum;
    ds[j] = grad_of<D>(p, D::to(dp[j]), dot, scale);
  }
}

template <typename D>
__device__ void backward_from_probs(const typename D::S* p, const typename D::S* dp, typename D::S* ds, int t, float scale) {
  long long r = blockIdx.x;
  p += r * t; dp += r * t; ds += r * t;
  float dot = 0.0f;
  for (int j = threadIdx.x; j < t; j += blockDim.x) dot += D::to(dp[j]) * D::to(p[j]);
  dot = block_reduce(dot, false);
  for (int j = threadIdx.x; j < t; j += blockDim.x)
    ds[j] = grad_of<D>(D::to(p[j]), D::to(dp[j]), dot, scale);
}

// This warp's row, or -1 past the last row (the whole warp leaves together).
__device__ __forceinline__ long long warp_row(int rows) {
  long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  return r < rows ? r : -1;
}

// Lane `lane`'s biased scores of the row in v[], the exponentials exp(v - max) after the call
// (0 past the row's end); returns their sum over the row.
template <typename D, int K>
__device__ __forceinline__ float warp_row_exps(const typename D::S* s, const float* bias, int t, float scale, int lane,
                                               float (&v)[K]) {
  float m = __int_as_float(0xff800000);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int j = lane + 32 * k;
    v[k] = j < t ? biased<D>(s, bias, j, scale) : __int_as_float(0xff800000);
    m = fmaxf(m, v[k]);
  }
  m = warp_max(m);
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int j = lane + 32 * k;
    v[k] = j < t ? expf(v[k] - m) : 0.0f;
    sum += v[k];
  }
  return warp_sum(sum);
}

template <typename D, int K>
__device__ void forward_warp(const typename D::S* s, const float* bias, typename D::S* p, int t, int heads, float scale,
                             int rows) {
  long long r = warp_row(rows);
  if (r < 0) return;
  int lane = threadIdx.x & 31;
  long long b = r / ((long long)heads * t), i = r % t;
  s += r * t; p += r * t; bias += (b * t + i) * t;
  float v[K];
  float sum = warp_row_exps<D, K>(s, bias, t, scale, lane, v);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int j = lane + 32 * k;
    if (j < t) p[j] = D::from(v[k] / sum);
  }
}

template <typename D, int K>
__device__ void backward_warp(const typename D::S* s, const float* bias, const typename D::S* dp, typename D::S* ds,
                              int t, int heads, float scale, int rows) {
  long long r = warp_row(rows);
  if (r < 0) return;
  int lane = threadIdx.x & 31;
  long long b = r / ((long long)heads * t), i = r % t;
  s += r * t; dp += r * t; ds += r * t; bias += (b * t + i) * t;
  float v[K], g[K];
  float sum = warp_row_exps<D, K>(s, bias, t, scale, lane, v);
  float dot = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int j = lane + 32 * k;
    g[k] = j < t ? D::to(dp[j]) : 0.0f;
    v[k] = v[k] / sum;
    dot += g[k] * v[k];
  }
  dot = warp_sum(dot);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int j = lane + 32 * k;
    if (j < t) ds[j] = grad_of<D>(v[k], g[k], dot, scale);
  }
}

template <typename D, int K>
__device__ void backward_from_probs_warp(const typename D::S* p, const typename D::S* dp, typename D::S* ds, int t,
                                         float scale, int rows) {
  long long r = warp_row(rows);
  if (r < 0) return;
  int lane = threadIdx.x & 31;
  p += r * t; dp += r * t; ds += r * t;
  float pv[K], g[K];
  float dot = 0.0f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int j = lane + 32 * k;
    pv[k] = j < t ? D::to(p[j]) : 0.0f;
    g[k] = j < t ? D::to(dp[j]) : 0.0f;
    dot += g[k] * pv[k];
  }
  dot = warp_sum(dot);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int j = lane + 32 * k;
    if (j < t) ds[j] = grad_of<D>(pv[k], g[k], dot, scale);
  }
}

#define KERNELS(NAME, D) \
extern "C" __global__ void pipe_softmax_bwd_p_##NAME(const D::S* p, const D::S* dp, D::S* ds, int t, float scale, int rows) \
  { if (blockIdx.x < rows) backward_from_probs<D>(p, dp, ds, t, scale); } \
extern "C" __global__ void pipe_softmax_fwd_##NAME(const D::S* s, const float* bias, D::S* p, int t, int heads, float scale, int rows) \
  { if (blockIdx.x < rows) forward<D>(s, bias, p, t, heads, scale); } \
extern "C" __global__ void pipe_softmax_bwd_##NAME(const D::S* s, const float* bias, const D::S* dp, D::S* ds, int t, int heads, float scale, int rows) \
  { if (blockIdx.x < rows) backward<D>(s, bias, dp, ds, t, heads, scale); }
#define WARP_KERNELS(NAME, D, K) \
extern "C" __global__ void pipe_softmax_bwd_p_w##K##_##NAME(const D::S* p, const D::S* dp, D::S* ds, int t, float scale, int rows) \
  { backward_from_probs_warp<D, K>(p, dp, ds, t, scale, rows); } \
extern "C" __global__ void pipe_softmax_fwd_w##K##_##NAME(const D::S* s, const float* bias, D::S* p, int t, int heads, float scale, int rows) \
  { forward_warp<D, K>(s, bias, p, t, heads, scale, rows); } \
extern "C" __global__ void pipe_softmax_bwd_w##K##_##NAME(const D::S* s, const float* bias, const D::S* dp, D::S* ds, int t, int heads, float scale, int rows) \
  { backward_warp<D, K>(s, bias, dp, ds, t, heads, scale, rows); }
#define ALL_KERNELS(NAME, D) KERNELS(NAME, D) WARP_KERNELS(NAME, D, 4) WARP_KERNELS(NAME, D, 8) \
  WARP_KERNELS(NAME, D, 16) WARP_KERNELS(NAME, D, 32)
ALL_KERNELS(f32, F32)
ALL_KERNELS(bf16, BF16)
ALL_KERNELS(f16, F16)
"#;

    /// Longest row the warp-per-row kernels take: 32 lanes × the largest `K`.
    pub const WARP_MAX_T: usize = 32 * 32;
    /// Rows (one warp each) per block of the warp-per-row kernels.
    const ROWS_PER_BLOCK: u32 = 4;

    /// The kernel `base` for `rows` rows of `t` columns (the warp-per-row one with the smallest `K`
    /// that holds `t`, else the block-per-row one), its launch shape and `rows` as the kernel's arg.
    fn kernel_for(base: &str, suffix: &str, rows: usize, t: usize) -> Result<(String, LaunchConfig, i32)> {
        let too_many = || candle_core::Error::Msg(format!("attention softmax: {rows} rows exceed one kernel launch"));
        let rows32 = i32::try_from(rows).map_err(|_| too_many())?;
        let rows_u = rows32 as u32;
        Ok(match [4usize, 8, 16, 32].into_iter().find(|k| 32 * k >= t) {
            Some(k) => {
                let blocks = rows_u.div_ceil(ROWS_PER_BLOCK).max(1);
                (format!("{base}_w{k}_{suffix}"), grid(blocks as usize, 32 * ROWS_PER_BLOCK, 0), rows32)
            }
            None => (format!("{base}_{suffix}"), grid(rows_u.max(1) as usize, 128, 0), rows32),
        })
    }

    /// The module: its kernels are every name [`forward_or_backward`] and [`from_probs`] can ask for.
    pub static MODULE: Module =
        Module::new("masked_softmax", "attention softmax kernels", &[FLOAT_TYPES, WARP_REDUCE, SOURCE], kernel_names);

    fn kernel_names() -> Result<Vec<String>> {
        let mut names = Vec::new();
        for base in ["pipe_softmax_fwd", "pipe_softmax_bwd", "pipe_softmax_bwd_p"] {
            for suffix in ["f32", "bf16", "f16"] {
                for t in [1, 128, 129, 256, 512, 1000, WARP_MAX_T, WARP_MAX_T + 1] {
                    names.push(kernel_for(base, suffix, 8, t)?.0);
                }
            }
        }
        names.dedup();
        Ok(names)
    }

    /// [`super::SoftmaxBackwardFromProbs`] over `n` contiguous elements in rows of `t`.
    pub fn from_probs(
        p: &CudaStorage,
        p0: usize,
        dp: &CudaStorage,
        g0: usize,
        n: usize,
        t: usize,
        scale: f64,
    ) -> Result<CudaStorage> {
        let dev = &p.device;
        let suffix = dtype_suffix(p.dtype(), "softmax backward")?;
        let (name, cfg, rows) = kernel_for("pipe_softmax_bwd_p", suffix, n / t.max(1), t)?;
        let func = MODULE.kernel(dev, &name)?;
        let t32 = t as i32;
        macro_rules! run {
            ($t:ty, $scale:expr) => {{
                let ps = p.as_cuda_slice::<$t>()?.slice(p0..p0 + n);
                let gs = dp.as_cuda_slice::<$t>()?.slice(g0..g0 + n);
                // SAFETY: one block per row writes every column of it.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let scale: f32 = $scale;
                // SAFETY: arguments in the kernel's order and types; indices stay below n.
                unsafe { launch!(func, cfg, [&ps, &gs, &out, &t32, &scale, &rows]) }?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match p.dtype() {
            DType::F32 => run!(f32, scale as f32),
            DType::BF16 => run!(half::bf16, half::bf16::from_f64(scale).to_f32()),
            _ => run!(half::f16, half::f16::from_f64(scale).to_f32()),
        })
    }

    /// Runs the forward (`dp = None`) or backward kernel over contiguous scores at offset `s0`, the
    /// bias at `b0` and dP at its offset; returns a new `[B, H, T, T]` tensor's storage.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_or_backward(
        scores: &CudaStorage,
        s0: usize,
        bias: &CudaStorage,
        b0: usize,
        dp: Option<(&CudaStorage, usize)>,
        (b, h, t): (usize, usize, usize),
        scale: f64,
    ) -> Result<CudaStorage> {
        let dev = &scores.device;
        let n = b * h * t * t;
        let bias = bias.as_cuda_slice::<f32>()?.slice(b0..b0 + b * t * t);
        let (t32, h32) = (t as i32, h as i32);
        let dtype = scores.dtype();
        let suffix = dtype_suffix(dtype, "masked softmax")?;
        let base = if dp.is_some() { "pipe_softmax_bwd" } else { "pipe_softmax_fwd" };
        let (name, cfg, rows) = kernel_for(base, suffix, b * h * t, t)?;
        let func = MODULE.kernel(dev, &name)?;
        macro_rules! run {
            ($t:ty, $scale:expr) => {{
                let s = scores.as_cuda_slice::<$t>()?.slice(s0..s0 + n);
                // SAFETY: every element of `out` is written by the kernel (one block per row, every
                // column of it) before it is read.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let scale: f32 = $scale;
                let g = match dp {
                    Some((dp, g0)) => Some(dp.as_cuda_slice::<$t>()?.slice(g0..g0 + n)),
                    None => None,
                };
                // SAFETY: the arguments match the kernel's signature in order and type; every index
                // it forms is below n (scores, dP, out) or b·t·t (bias).
                unsafe {
                    match &g {
                        Some(g) => launch!(func, cfg, [&s, &bias, g, &out, &t32, &h32, &scale, &rows]),
                        None => launch!(func, cfg, [&s, &bias, &out, &t32, &h32, &scale, &rows]),
                    }
                }?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(match dtype {
            DType::F32 => run!(f32, scale as f32),
            DType::BF16 => run!(half::bf16, half::bf16::from_f64(scale).to_f32()),
            _ => run!(half::f16, half::f16::from_f64(scale).to_f32()),
        })
    }
}
