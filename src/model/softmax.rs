//! The attention softmax, its mask and its backward pass as single row-wise kernels.
//!
//! Why: as tensor ops, `softmax(scale · S + bias)` over the `[B, heads, T, T]` scores is five
//! kernels (scale, cast to f32, add the mask, softmax, cast back) and its backward about eight,
//! each reading and writing `T × T` tensors of up to 4 bytes an element: on the GPU, for
//! Qwen3-0.6B at 16 × 512 tokens, that was half of a decoder layer's time. Here each direction is
//! one pass over a row. Neither op records a graph: [`super::fused::attention`] calls them on
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
        let out = match (s1, s2) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => {
                CpuStorage::F32(backward_from_probs_cpu(&p[p0..p0 + n], &g[g0..g0 + n], t, self.scale))
            }
            (CpuStorage::BF16(p), CpuStorage::BF16(g)) => {
                CpuStorage::BF16(backward_from_probs_cpu(&p[p0..p0 + n], &g[g0..g0 + n], t, self.scale))
            }
            (CpuStorage::F16(p), CpuStorage::F16(g)) => {
                CpuStorage::F16(backward_from_probs_cpu(&p[p0..p0 + n], &g[g0..g0 + n], t, self.scale))
            }
            _ => candle_core::bail!("softmax backward: P and dP must share one float dtype"),
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
        let (t, p0, g0, n) = probs_dims(l1, l2)?;
        let out = cuda::launch_from_probs(s1, p0, s2, g0, n, t, self.scale)?;
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
    let offset = |l: &Layout, what: &str| {
        Ok::<_, candle_core::Error>(super::storage::contiguous_range(l, "softmax backward", what)?.start)
    };
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
        let out = cuda::launch(cuda::Kind::Forward, s1, s0, s2, b0, None, (b, h, t), self.scale)?;
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
        let out = match (s1, s3) {
            (CpuStorage::F32(s), CpuStorage::F32(g)) => {
                CpuStorage::F32(backward_cpu(&s[s0..s0 + n], bias, &g[g0..g0 + n], b, h, t, self.scale))
            }
            (CpuStorage::BF16(s), CpuStorage::BF16(g)) => {
                CpuStorage::BF16(backward_cpu(&s[s0..s0 + n], bias, &g[g0..g0 + n], b, h, t, self.scale))
            }
            (CpuStorage::F16(s), CpuStorage::F16(g)) => {
                CpuStorage::F16(backward_cpu(&s[s0..s0 + n], bias, &g[g0..g0 + n], b, h, t, self.scale))
            }
            _ => candle_core::bail!("masked softmax backward: scores and dP must share one float dtype"),
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (b, h, t, s0, b0, g0) = backward_dims(l1, l2, l3)?;
        let out = cuda::launch(cuda::Kind::Backward, s1, s0, s2, b0, Some((s3, g0)), (b, h, t), self.scale)?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, DType, Result};

    pub enum Kind {
        Forward,
        Backward,
    }

    /// One block per row; the row's scores are read three times (max, sum, write), from cache
    /// after the first. `F32`, `BF16`, `F16`: [`crate::model::nvrtc::FLOAT_TYPES`].
    const SOURCE: &str = r#"
__device__ float block_reduce(float v, bool is_max) {
  __shared__ float part[32];
  __shared__ float result;
  for (int o = 16; o > 0; o >>= 1) { float w = __shfl_xor_sync(0xffffffffu, v, o); v = is_max ? fmaxf(v, w) : v + w; }
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? part[lane] : (is_max ? __int_as_float(0xff800000) : 0.0f);
    for (int o = 16; o > 0; o >>= 1) { float w = __shfl_xor_sync(0xffffffffu, v, o); v = is_max ? fmaxf(v, w) : v + w; }
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
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
    ds[j] = D::from(D::to(D::from(p * (D::to(dp[j]) - dot))) * scale);
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
    ds[j] = D::from(D::to(D::from(D::to(p[j]) * (D::to(dp[j]) - dot))) * scale);
}

#define KERNELS(NAME, D) \
extern "C" __global__ void pipe_softmax_bwd_p_##NAME(const D::S* p, const D::S* dp, D::S* ds, int t, float scale) \
  { backward_from_probs<D>(p, dp, ds, t, scale); } \
extern "C" __global__ void pipe_softmax_fwd_##NAME(const D::S* s, const float* bias, D::S* p, int t, int heads, float scale) \
  { forward<D>(s, bias, p, t, heads, scale); } \
extern "C" __global__ void pipe_softmax_bwd_##NAME(const D::S* s, const float* bias, const D::S* dp, D::S* ds, int t, int heads, float scale) \
  { backward<D>(s, bias, dp, ds, t, heads, scale); }
KERNELS(f32, F32)
KERNELS(bf16, BF16)
KERNELS(f16, F16)
"#;

    pub(crate) fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        crate::model::nvrtc::ptx(&PTX, "attention softmax kernels", || {
            format!("{}{SOURCE}", crate::model::nvrtc::FLOAT_TYPES)
        })
    }

    /// [`super::SoftmaxBackwardFromProbs`] over `n` contiguous elements in rows of `t`.
    pub fn launch_from_probs(
        p: &CudaStorage,
        p0: usize,
        dp: &CudaStorage,
        g0: usize,
        n: usize,
        t: usize,
        scale: f64,
    ) -> Result<CudaStorage> {
        let dev = p.device.clone();
        let rows = (n / t.max(1)) as u32;
        let cfg = LaunchConfig { grid_dim: (rows.max(1), 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let suffix = crate::model::nvrtc::dtype_suffix(p.dtype(), "softmax backward")?;
        let func =
            dev.get_or_load_custom_func(&format!("pipe_softmax_bwd_p_{suffix}"), "pipe_masked_softmax", ptx()?)?;
        let t32 = t as i32;
        macro_rules! run {
            ($t:ty, $scale:expr) => {{
                let ps = p.as_cuda_slice::<$t>()?.slice(p0..p0 + n);
                let gs = dp.as_cuda_slice::<$t>()?.slice(g0..g0 + n);
                // SAFETY: one block per row writes every column of it.
                let out = unsafe { dev.alloc::<$t>(n)? };
                let scale: f32 = $scale;
                let mut b = func.builder();
                b.arg(&ps);
                b.arg(&gs);
                b.arg(&out);
                b.arg(&t32);
                b.arg(&scale);
                // SAFETY: arguments in the kernel's order and types; indices stay below n.
                unsafe { b.launch(cfg) }.w()?;
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
    pub fn launch(
        kind: Kind,
        scores: &CudaStorage,
        s0: usize,
        bias: &CudaStorage,
        b0: usize,
        dp: Option<(&CudaStorage, usize)>,
        (b, h, t): (usize, usize, usize),
        scale: f64,
    ) -> Result<CudaStorage> {
        let dev = scores.device.clone();
        let n = b * h * t * t;
        let rows = (b * h * t) as u32;
        let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let bias = bias.as_cuda_slice::<f32>()?.slice(b0..b0 + b * t * t);
        let (t32, h32) = (t as i32, h as i32);
        let dtype = scores.dtype();
        let suffix = crate::model::nvrtc::dtype_suffix(dtype, "masked softmax")?;
        let name = match kind {
            Kind::Forward => format!("pipe_softmax_fwd_{suffix}"),
            Kind::Backward => format!("pipe_softmax_bwd_{suffix}"),
        };
        let func = dev.get_or_load_custom_func(&name, "pipe_masked_softmax", ptx()?)?;
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
                let mut builder = func.builder();
                builder.arg(&s);
                builder.arg(&bias);
                if let Some(g) = &g {
                    builder.arg(g);
                }
                builder.arg(&out);
                builder.arg(&t32);
                builder.arg(&h32);
                builder.arg(&scale);
                // SAFETY: the arguments match the kernel's signature in order and type; every index
                // it forms is below n (scores, dP, out) or b·t·t (bias).
                unsafe { builder.launch(cfg) }.w()?;
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
