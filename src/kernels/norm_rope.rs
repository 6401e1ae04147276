//! The query/key path of attention — per-head RMSNorm, RoPE, and the move from the projection's
//! `[B, T, heads, d]` layout to attention's `[B, heads, T, d]` — as one kernel each way.
//!
//! Why: as three ops (candle's RMSNorm, candle's RoPE, a transpose made contiguous) the forward is
//! three passes over q and three over k, and the backward four each (transpose, RoPE with `−sin`,
//! RMSNorm's input gradient, its weight gradient). Here the forward is one pass, and the backward
//! one pass for the input gradient and one for the weight's partial sums.
//!
//! Arithmetic, in f32: the forward is candle's RMSNorm (`n = x / rms(x) · w`, rounded to the dtype,
//! as the separate op's output was) followed by the rotation of each pair `(i, i + d/2)`,
//! `(n₁ cos − n₂ sin, n₁ sin + n₂ cos)`, rounded once. The backward rotates the output gradient back
//! (`g₁ = dy₁ cos + dy₂ sin`, `g₂ = dy₂ cos − dy₁ sin`, kept in f32) and applies RMSNorm's backward
//! to it ([`super::norm`]'s formula). In f32 the CPU loops give the separate ops' bits.
//!
//! The rotation tables and the weight travel as one small tensor, `wcs = [w (d) | cos (T·d/2) |
//! sin (T·d/2)]` in the input dtype, so that each op has at most three inputs.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::on_float_storages;

/// `[B, heads, T, d]` from `x: [B, T, heads, d]`; args: x, wcs.
#[derive(Debug, Clone, Copy)]
pub struct NormRope {
    pub eps: f64,
}

/// One of the backward's two outputs for `dy: [B, heads, T, d]`; args: x, wcs, dy.
#[derive(Debug, Clone, Copy)]
pub struct NormRopeBackward {
    pub eps: f64,
    pub part: Part,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// `dx: [B, T, heads, d]` in x's dtype.
    Dx,
    /// Partial sums `[P, d]` (f32) of the weight's gradient.
    Dw,
}

/// Rows per partial sum of the weight gradient on the CPU.
const CPU_CHUNK: usize = 256;

/// (B, T, heads, d) and the offsets of x, wcs and (when given) dy, after checking every shape.
type Dims = ((usize, usize, usize, usize), usize, usize, usize);

fn dims(x: &Layout, wcs: &Layout, dy: Option<&Layout>) -> Result<Dims> {
    let (b, t, h, d) = x.shape().dims4()?;
    if d % 2 != 0 || wcs.shape().elem_count() != d + t * d || dy.is_some_and(|l| l.shape().dims() != [b, h, t, d]) {
        candle_core::bail!(
            "q/k norm and RoPE: x {:?}, tables {:?} and dy {:?} do not fit (x [B, T, H, d] with d even, \
             tables d + T·d, dy [B, H, T, d])",
            x.shape(),
            wcs.shape(),
            dy.map(|l| l.shape())
        );
    }
    let offset = |l: &Layout, what: &str| super::contiguous_start(l, "q/k norm and RoPE", what);
    let g0 = match dy {
        Some(l) => offset(l, "dy")?,
        None => 0,
    };
    Ok(((b, t, h, d), offset(x, "x")?, offset(wcs, "the tables")?, g0))
}

fn f<T: WithDType>(v: T) -> f32 {
    v.to_f64() as f32
}

fn forward_cpu<T: WithDType>(x: &[T], wcs: &[T], (b, t, h, d): (usize, usize, usize, usize), eps: f64) -> Vec<T> {
    let half = d / 2;
    let (w, tables) = wcs.split_at(d);
    let (cos, sin) = tables.split_at(t * half);
    let mut out = vec![T::zero(); b * t * h * d];
    out.par_chunks_mut(d).enumerate().for_each_init(
        || vec![0f32; d],
        |n, (o, dst)| {
            // Output row `o` is (batch, head, position).
            let (bi, hi, ti) = (o / (h * t), (o / t) % h, o % t);
            let src = &x[((bi * t + ti) * h + hi) * d..][..d];
            let sum2: f32 = src.iter().map(|&v| f(v) * f(v)).sum();
            let m = (sum2 / d as f32 + eps as f32).sqrt();
            for ((n, &s), &w) in n.iter_mut().zip(src).zip(w) {
                *n = f(T::from_f64((f(s) / m * f(w)) as f64));
            }
            for i in 0..half {
                let (c, s) = (f(cos[ti * half + i]), f(sin[ti * half + i]));
                dst[i] = T::from_f64((n[i] * c - n[i + half] * s) as f64);
                dst[i + half] = T::from_f64((n[i] * s + n[i + half] * c) as f64);
            }
        },
    );
    out
}

/// The output gradient of input row `r` rotated back into `g` (f32); returns 1 / rms of x's row.
#[allow(clippy::too_many_arguments)]
fn row_grad<T: WithDType>(
    x: &[T],
    wcs: &[T],
    dy: &[T],
    (_, t, h, d): (usize, usize, usize, usize),
    r: usize,
    eps: f64,
    g: &mut [f32],
) -> f32 {
    let half = d / 2;
    let (cos, sin) = wcs[d..].split_at(t * half);
    let (bi, ti, hi) = (r / (t * h), (r / h) % t, r % h);
    let dyr = &dy[((bi * h + hi) * t + ti) * d..][..d];
    for i in 0..half {
        let (c, s) = (f(cos[ti * half + i]), f(sin[ti * half + i]));
        let (a, b) = (f(dyr[i]), f(dyr[i + half]));
        g[i] = a * c + b * s;
        g[i + half] = b * c - a * s;
    }
    super::norm::inv_rms(&x[r * d..][..d], eps)
}

fn dx_cpu<T: WithDType>(x: &[T], wcs: &[T], dy: &[T], dims: (usize, usize, usize, usize), eps: f64) -> Vec<T> {
    let d = dims.3;
    let w = &wcs[..d];
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d).enumerate().for_each_init(
        || vec![0f32; d],
        |g, (r, dst)| {
            let inv = row_grad(x, wcs, dy, dims, r, eps, g);
            let xr = &x[r * d..][..d];
            let dot: f32 =
                xr.iter().zip(g.iter()).zip(w).map(|((&x, g), &w)| g * f(w) * (f(x) * inv)).sum::<f32>() / d as f32;
            for (((o, &x), g), &w) in dst.iter_mut().zip(xr).zip(g.iter()).zip(w) {
                *o = T::from_f64(((g * f(w) - f(x) * inv * dot) * inv) as f64);
            }
        },
    );
    out
}

fn dw_cpu<T: WithDType>(x: &[T], wcs: &[T], dy: &[T], dims: (usize, usize, usize, usize), eps: f64) -> Vec<f32> {
    let d = dims.3;
    let rows = x.len() / d;
    let parts: Vec<Vec<f32>> = (0..rows.div_ceil(CPU_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; d];
            let mut g = vec![0f32; d];
            for r in c * CPU_CHUNK..((c + 1) * CPU_CHUNK).min(rows) {
                let inv = row_grad(x, wcs, dy, dims, r, eps, &mut g);
                for ((a, g), &x) in acc.iter_mut().zip(&g).zip(&x[r * d..][..d]) {
                    *a += g * (f(x) * inv);
                }
            }
            acc
        })
        .collect();
    parts.concat()
}

impl CustomOp2 for NormRope {
    fn name(&self) -> &'static str {
        "pipe-qk-norm-rope"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let ((b, t, h, d), x0, w0, _) = dims(l1, l2, None)?;
        let n = b * t * h * d;
        let out = on_float_storages!(
            storage,
            (s1, s2),
            |x, w| forward_cpu(&x[x0..x0 + n], &w[w0..w0 + d + t * d], (b, t, h, d), self.eps),
            "q/k norm and RoPE: x and the tables must share one float dtype"
        );
        Ok((out, Shape::from((b, h, t, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (dims @ (b, t, h, d), x0, w0, _) = dims(l1, l2, None)?;
        let out = cuda::run(cuda::Kind::Forward, s1, x0, s2, w0, None, dims, self.eps)?;
        Ok((out.0, Shape::from((b, h, t, d))))
    }
}

impl CustomOp3 for NormRopeBackward {
    fn name(&self) -> &'static str {
        match self.part {
            Part::Dx => "pipe-qk-norm-rope-backward-dx",
            Part::Dw => "pipe-qk-norm-rope-backward-dw",
        }
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
        let (dims @ (b, t, h, d), x0, w0, g0) = dims(l1, l2, Some(l3))?;
        let (n, eps) = (b * t * h * d, self.eps);
        const MIXED: &str = "q/k norm and RoPE: x, the tables and dy must share one float dtype";
        if self.part == Part::Dx {
            let out = on_float_storages!(
                storage,
                (s1, s2, s3),
                |x, w, g| dx_cpu(&x[x0..x0 + n], &w[w0..w0 + d + t * d], &g[g0..g0 + n], dims, eps),
                MIXED
            );
            return Ok((out, l1.shape().clone()));
        }
        let parts = on_float_storages!(
            value,
            (s1, s2, s3),
            |x, w, g| dw_cpu(&x[x0..x0 + n], &w[w0..w0 + d + t * d], &g[g0..g0 + n], dims, eps),
            MIXED
        );
        let p = parts.len() / d;
        Ok((CpuStorage::F32(parts), Shape::from((p, d))))
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
        let (dims, x0, w0, g0) = dims(l1, l2, Some(l3))?;
        let kind = match self.part {
            Part::Dx => cuda::Kind::Dx,
            Part::Dw => cuda::Kind::Dw,
        };
        let (out, p) = cuda::run(kind, s1, x0, s2, w0, Some((s3, g0)), dims, self.eps)?;
        let shape = match self.part {
            Part::Dx => l1.shape().clone(),
            Part::Dw => Shape::from((p, dims.3)),
        };
        Ok((out, shape))
    }
}

/// `[w | cos | sin]` for [`NormRope`] and its backward, in x's dtype, from RoPE's `[T, d/2]` tables
/// (`crate::model::ops::RopeTables::norm_rope_tables` builds it from the model's).
pub fn tables(weight: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[&weight.detach().flatten_all()?, &cos.flatten_all()?, &sin.flatten_all()?], 0)
}

/// The forward without a graph: `x: [B, T, heads, d]` → `[B, heads, T, d]` contiguous.
pub fn norm_rope_forward(x: &Tensor, wcs: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(wcs, &NormRope { eps })
}

/// `(dx, dw)` for the output gradient `dy: [B, heads, T, d]`, without a graph; `dw` in the
/// weight's dtype.
pub fn norm_rope_backward(x: &Tensor, wcs: &Tensor, dy: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (x, dy) = (x.contiguous()?, dy.contiguous()?);
    let dx = x.apply_op3_no_bwd(wcs, &dy, &NormRopeBackward { eps, part: Part::Dx })?;
    let dw = x.apply_op3_no_bwd(wcs, &dy, &NormRopeBackward { eps, part: Part::Dw })?.sum(0)?.to_dtype(x.dtype())?;
    Ok((dx, dw))
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{CudaStorage, Result};

    use crate::kernels::launch::{
        blocks, for_float_dtype, grid, launch, typed_names, Module, FLOAT_TYPES, INSTANCES, THREADS, WARP_REDUCE,
    };

    pub enum Kind {
        Forward,
        Dx,
        Dw,
    }

    /// A warp per row (grid-stride); each lane takes whole rotation pairs `(i, i + d/2)`.
    /// `F32`, `BF16`, `F16`: [`FLOAT_TYPES`].
    const SOURCE: &str = r#"
template <typename D>
__device__ __forceinline__ float sum_squares(const typename D::S* x, int d, int lane) {
  float ss = 0.0f;
  for (int c = lane; c < d; c += 32) { float v = D::to(x[c]); ss += v * v; }
  return warp_sum(ss);
}

/* Output row o = (b, head, t); input row r = (b, t, head). */
template <typename D>
__device__ void forward(const typename D::S* x, const typename D::S* wcs, typename D::S* out,
                        int t, int heads, int d, float eps, long long rows) {
  int lane = threadIdx.x & 31, half = d / 2;
  long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
  long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
  const typename D::S* w = wcs; const typename D::S* cs = wcs + d; const typename D::S* sn = wcs + d + (long long)t * half;
  for (long long o = warp; o < rows; o += warps) {
    long long b = o / ((long long)heads * t); int h = (int)((o / t) % heads), ti = (int)(o % t);
    const typename D::S* xr = x + ((b * t + ti) * heads + h) * d;
    typename D::S* dst = out + o * d;
    float m = sqrtf(sum_squares<D>(xr, d, lane) / d + eps);
    for (int i = lane; i < half; i += 32) {
      float n1 = D::to(D::from(D::to(xr[i]) / m * D::to(w[i])));
      float n2 = D::to(D::from(D::to(xr[i + half]) / m * D::to(w[i + half])));
      float c = D::to(cs[ti * half + i]), s = D::to(sn[ti * half + i]);
      dst[i] = D::from(n1 * c - n2 * s);
      dst[i + half] = D::from(n1 * s + n2 * c);
    }
  }
}

/* The rotated-back gradient of one pair of input row (b, ti, h). */
template <typename D>
__device__ __forceinline__ void pair_grad(const typename D::S* dyr, const typename D::S* cs, const typename D::S* sn,
                                          int ti, int half, int i, float* g1, float* g2) {
  float c = D::to(cs[ti * half + i]), s = D::to(sn[ti * half + i]);
  float a = D::to(dyr[i]), bb = D::to(dyr[i + half]);
  *g1 = a * c + bb * s;
  *g2 = bb * c - a * s;
}

template <typename D>
__device__ void dx(const typename D::S* x, const typename D::S* wcs, const typename D::S* dy, typename D::S* out,
                   int t, int heads, int d, float eps, long long rows) {
  int lane = threadIdx.x & 31, half = d / 2;
  long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
  long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
  const typename D::S* w = wcs; const typename D::S* cs = wcs + d; const typename D::S* sn = wcs + d + (long long)t * half;
  for (long long r = warp; r < rows; r += warps) {
    long long b = r / ((long long)t * heads); int ti = (int)((r / heads) % t), h = (int)(r % heads);
    const typename D::S* xr = x + r * d;
    const typename D::S* dyr = dy + ((b * heads + h) * t + ti) * d;
    typename D::S* o = out + r * d;
    float inv = 1.0f / sqrtf(sum_squares<D>(xr, d, lane) / d + eps);
    float dot = 0.0f;
    for (int i = lane; i < half; i += 32) {
      float g1, g2;
      pair_grad<D>(dyr, cs, sn, ti, half, i, &g1, &g2);
      dot += g1 * D::to(w[i]) * (D::to(xr[i]) * inv) + g2 * D::to(w[i + half]) * (D::to(xr[i + half]) * inv);
    }
    dot = warp_sum(dot) / d;
    for (int i = lane; i < half; i += 32) {
      float g1, g2;
      pair_grad<D>(dyr, cs, sn, ti, half, i, &g1, &g2);
      o[i] = D::from((g1 * D::to(w[i]) - D::to(xr[i]) * inv * dot) * inv);
      o[i + half] = D::from((g2 * D::to(w[i + half]) - D::to(xr[i + half]) * inv * dot) * inv);
    }
  }
}

template <typename D>
__device__ void dw(const typename D::S* x, const typename D::S* wcs, const typename D::S* dy, float* partial,
                   int t, int heads, int d, float eps, long long rows) {
  extern __shared__ float acc[];
  for (int c = threadIdx.x; c < d; c += blockDim.x) acc[c] = 0.0f;
  __syncthreads();
  int lane = threadIdx.x & 31, half = d / 2;
  long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
  long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
  const typename D::S* cs = wcs + d; const typename D::S* sn = wcs + d + (long long)t * half;
  for (long long r = warp; r < rows; r += warps) {
    long long b = r / ((long long)t * heads); int ti = (int)((r / heads) % t), h = (int)(r % heads);
    const typename D::S* xr = x + r * d;
    const typename D::S* dyr = dy + ((b * heads + h) * t + ti) * d;
    float inv = 1.0f / sqrtf(sum_squares<D>(xr, d, lane) / d + eps);
    for (int i = lane; i < half; i += 32) {
      float g1, g2;
      pair_grad<D>(dyr, cs, sn, ti, half, i, &g1, &g2);
      atomicAdd(&acc[i], g1 * (D::to(xr[i]) * inv));
      atomicAdd(&acc[i + half], g2 * (D::to(xr[i + half]) * inv));
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += blockDim.x) partial[(long long)blockIdx.x * d + c] = acc[c];
}

#define KERNELS(NAME, D) \
extern "C" __global__ void pipe_norm_rope_fwd_##NAME(const D::S* x, const D::S* wcs, D::S* out, int t, int heads, int d, float eps, long long rows) \
  { forward<D>(x, wcs, out, t, heads, d, eps, rows); } \
extern "C" __global__ void pipe_norm_rope_dx_##NAME(const D::S* x, const D::S* wcs, const D::S* dy, D::S* out, int t, int heads, int d, float eps, long long rows) \
  { dx<D>(x, wcs, dy, out, t, heads, d, eps, rows); } \
extern "C" __global__ void pipe_norm_rope_dw_##NAME(const D::S* x, const D::S* wcs, const D::S* dy, float* partial, int t, int heads, int d, float eps, long long rows) \
  { dw<D>(x, wcs, dy, partial, t, heads, d, eps, rows); }
"#;

    const FORWARD: &str = "pipe_norm_rope_fwd";
    const DX: &str = "pipe_norm_rope_dx";
    const DW: &str = "pipe_norm_rope_dw";

    pub static MODULE: Module = Module::new(
        "qk_norm_rope",
        "q/k norm and RoPE kernels",
        &[FLOAT_TYPES, WARP_REDUCE, SOURCE, INSTANCES],
        || Ok(typed_names(&[FORWARD, DX, DW])),
    );

    /// Runs one of the three kernels; returns the output's storage and, for `Dw`, the number of
    /// partial sums (otherwise 0).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        kind: Kind,
        x: &CudaStorage,
        x0: usize,
        wcs: &CudaStorage,
        w0: usize,
        dy: Option<(&CudaStorage, usize)>,
        (b, t, h, d): (usize, usize, usize, usize),
        eps: f64,
    ) -> Result<(CudaStorage, usize)> {
        let dev = &x.device;
        let base = match kind {
            Kind::Forward => FORWARD,
            Kind::Dx => DX,
            Kind::Dw => DW,
        };
        let func = MODULE.typed(dev, base, x.dtype(), "q/k norm and RoPE")?;
        let rows = b * t * h;
        let n = rows * d;
        let blocks = match kind {
            // About 64 rows per block (8 per warp), at most 1024 partial sums.
            Kind::Dw => blocks(rows, 64, 1024),
            _ => blocks(rows, (THREADS / 32) as usize, 65_535),
        };
        let shared = if matches!(kind, Kind::Dw) { d * 4 } else { 0 };
        let cfg = grid(blocks, THREADS, shared);
        let (t32, h32, d32, eps32, rows64) = (t as i32, h as i32, d as i32, eps as f32, rows as i64);
        macro_rules! run {
            ($ty:ty) => {{
                let xs = x.as_cuda_slice::<$ty>()?.slice(x0..x0 + n);
                let ws = wcs.as_cuda_slice::<$ty>()?.slice(w0..w0 + d + t * d);
                let gs = match dy {
                    Some((g, g0)) => Some(g.as_cuda_slice::<$ty>()?.slice(g0..g0 + n)),
                    None => None,
                };
                if let (Kind::Dw, Some(gs)) = (&kind, &gs) {
                    // SAFETY: each block writes its whole row of partial sums.
                    let out = unsafe { dev.alloc::<f32>(blocks * d)? };
                    // SAFETY: arguments in the kernel's order and types; `d` floats of dynamic
                    // shared memory; indices stay below n, d + T·d and blocks·d.
                    unsafe { launch!(func, cfg, [&xs, &ws, gs, &out, &t32, &h32, &d32, &eps32, &rows64]) }?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                } else {
                    // SAFETY: every row is written by one warp, every column of it.
                    let out = unsafe { dev.alloc::<$ty>(n)? };
                    // SAFETY: arguments in the kernel's order and types; indices stay below n and
                    // d + T·d.
                    unsafe {
                        match &gs {
                            Some(gs) => launch!(func, cfg, [&xs, &ws, gs, &out, &t32, &h32, &d32, &eps32, &rows64]),
                            None => launch!(func, cfg, [&xs, &ws, &out, &t32, &h32, &d32, &eps32, &rows64]),
                        }
                    }?;
                    CudaStorage::wrap_cuda_slice(out, dev.clone())
                }
            }};
        }
        let out = for_float_dtype!(x.dtype(), run);
        Ok((out, if matches!(kind, Kind::Dw) { blocks } else { 0 }))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;
    use crate::model::ops::tests::{max_rel, sample};
    use crate::model::ops::RopeTables;

    /// Against the three separate ops (RMSNorm, RoPE, transpose) and their autograd: output, and
    /// the gradients of x and the weight; in f32 the output and dx have the same bits.
    #[test]
    fn equals_norm_then_rope_then_transpose() {
        let (b, t, h, d) = (2, 5, 3, 8);
        for (dtype, tol) in [(DType::F32, 1e-6f32), (DType::BF16, 2e-2), (DType::F16, 4e-3)] {
            let rope = RopeTables::new(t, d, 10_000.0, dtype, &Device::Cpu).unwrap();
            let x = (sample(&[b, t, h, d], 1) * 3.0).unwrap().to_dtype(dtype).unwrap();
            let w = ((sample(&[d], 2) * 0.5).unwrap() + 1.0).unwrap().to_dtype(dtype).unwrap();
            let dy = sample(&[b, h, t, d], 3).to_dtype(dtype).unwrap();
            let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
            let reference = rope
                .apply_thd(&crate::model::fused::rms_norm(xv.as_tensor(), wv.as_tensor(), 1e-6).unwrap())
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            let grads =
                (&reference * &dy).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
            let wcs = rope.norm_rope_tables(&w).unwrap();
            let ours = norm_rope_forward(&x, &wcs, 1e-6).unwrap();
            assert_eq!(ours.dims(), &[b, h, t, d]);
            let (dx, dw) = norm_rope_backward(&x, &wcs, &dy, 1e-6).unwrap();
            let (dx_ref, dw_ref) = (grads.get(xv.as_tensor()).unwrap(), grads.get(wv.as_tensor()).unwrap());
            if dtype == DType::F32 {
                assert_eq!(max_rel(&ours, &reference), 0.0, "forward");
                assert_eq!(max_rel(&dx, dx_ref), 0.0, "dx");
            }
            for (what, a, r) in [("forward", &ours, &reference), ("dx", &dx, dx_ref), ("dw", &dw, dw_ref)] {
                let e = max_rel(a, r);
                assert!(e <= tol, "{dtype:?} {what}: relative error {e} > {tol}");
            }
            assert_eq!(dw.dtype(), dtype);
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_an_error() {
        let rope = RopeTables::new(4, 8, 10_000.0, DType::F32, &Device::Cpu).unwrap();
        let wcs = rope.norm_rope_tables(&sample(&[8], 1)).unwrap();
        let x = sample(&[1, 5, 2, 8], 2); // 5 positions, tables for 4
        let e = norm_rope_forward(&x, &wcs, 1e-6).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
    }
}
