//! RMSNorm's backward pass as two row-wise kernels (input gradient; weight-gradient partial sums).
//!
//! Why: as tensor ops the backward of `w · x / rms(x)` is about fourteen f32 kernels over the
//! input's shape, four times per decoder layer (two of them over `[tokens, heads, head_dim]`); on
//! the GPU each costs a launch and a full pass over memory. Here it is two passes. Both recompute
//! `1 / rms(x)` per row; neither records a graph ([`crate::model::fused::rms_norm`] calls them).
//!
//! With `n = x / rms(x)` (f32): `dx = (g·w − n · mean(g·w·n)) / rms(x)`, rounded to x's dtype, and
//! `dw = Σ_rows g·n`, returned as partial sums `[P, H]` (f32) for the caller to add up, so that no
//! kernel needs a global atomic. The CPU loops are the reference the CUDA kernels mirror.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, WithDType};
use rayon::prelude::*;

use super::on_float_storages;

/// `dx` of RMSNorm; args: x `[..., H]`, w `[H]`, g (x's shape), all one float dtype, contiguous.
#[derive(Debug, Clone, Copy)]
pub struct RmsNormBackwardDx {
    pub eps: f64,
}

/// Partial sums of `dw` of RMSNorm, `[P, H]` f32; args: x `[..., H]`, g (x's shape).
#[derive(Debug, Clone, Copy)]
pub struct RmsNormBackwardDw {
    pub eps: f64,
}

/// Rows per partial sum on the CPU.
const CPU_CHUNK: usize = 256;

fn offset(l: &Layout, what: &str) -> Result<usize> {
    super::contiguous_start(l, "RMSNorm backward", what)
}

/// (rows, H) of x, after checking g (and w) against it.
fn shape(x: &Layout, g: &Layout, w: Option<&Layout>) -> Result<(usize, usize)> {
    let h =
        *x.shape().dims().last().ok_or_else(|| candle_core::Error::Msg("RMSNorm backward: x is a scalar".into()))?;
    if g.shape() != x.shape() || w.is_some_and(|w| w.shape().dims() != [h]) {
        candle_core::bail!(
            "RMSNorm backward: x {:?}, g {:?} and w {:?} do not fit",
            x.shape(),
            g.shape(),
            w.map(|w| w.shape())
        );
    }
    Ok((x.shape().elem_count() / h.max(1), h))
}

/// `1 / rms(x)` of one row, in f32 (also [`super::norm_rope`]'s).
pub(super) fn inv_rms<T: WithDType>(x: &[T], eps: f64) -> f32 {
    let ss: f32 = x
        .iter()
        .map(|v| {
            let v = v.to_f64() as f32;
            v * v
        })
        .sum();
    1.0 / (ss / x.len() as f32 + eps as f32).sqrt()
}

fn dx_cpu<T: WithDType>(x: &[T], w: &[T], g: &[T], h: usize, eps: f64) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(h).zip(x.par_chunks(h)).zip(g.par_chunks(h)).for_each(|((d, x), g)| {
        let inv = inv_rms(x, eps);
        let f = |v: &T| v.to_f64() as f32;
        let dot: f32 = x.iter().zip(g).zip(w).map(|((x, g), w)| f(g) * f(w) * (f(x) * inv)).sum::<f32>() / h as f32;
        for (((d, x), g), w) in d.iter_mut().zip(x).zip(g).zip(w) {
            *d = T::from_f64(((f(g) * f(w) - f(x) * inv * dot) * inv) as f64);
        }
    });
    out
}

fn dw_cpu<T: WithDType>(x: &[T], g: &[T], h: usize, eps: f64) -> Vec<f32> {
    let parts: Vec<Vec<f32>> = x
        .par_chunks(h * CPU_CHUNK)
        .zip(g.par_chunks(h * CPU_CHUNK))
        .map(|(x, g)| {
            let mut acc = vec![0f32; h];
            for (x, g) in x.chunks(h).zip(g.chunks(h)) {
                let inv = inv_rms(x, eps);
                for ((a, x), g) in acc.iter_mut().zip(x).zip(g) {
                    *a += g.to_f64() as f32 * (x.to_f64() as f32 * inv);
                }
            }
            acc
        })
        .collect();
    parts.concat()
}

impl CustomOp3 for RmsNormBackwardDx {
    fn name(&self) -> &'static str {
        "pipe-rms-norm-backward-dx"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, h) = shape(lx, lg, Some(lw))?;
        let (ox, ow, og, n) = (offset(lx, "x")?, offset(lw, "w")?, offset(lg, "g")?, rows * h);
        let out = on_float_storages!(
            storage,
            (sx, sw, sg),
            |x, w, g| dx_cpu(&x[ox..ox + n], &w[ow..ow + h], &g[og..og + n], h, self.eps),
            "RMSNorm backward: x, w and g must share one float dtype"
        );
        Ok((out, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, h) = shape(lx, lg, Some(lw))?;
        let (ox, ow, og) = (offset(lx, "x")?, offset(lw, "w")?, offset(lg, "g")?);
        let out = cuda::dx(sx, ox, sw, ow, sg, og, rows, h, self.eps)?;
        Ok((out, lx.shape().clone()))
    }
}

impl CustomOp2 for RmsNormBackwardDw {
    fn name(&self) -> &'static str {
        "pipe-rms-norm-backward-dw"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sg: &CpuStorage, lg: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, h) = shape(lx, lg, None)?;
        let (ox, og, n) = (offset(lx, "x")?, offset(lg, "g")?, rows * h);
        let parts = on_float_storages!(
            value,
            (sx, sg),
            |x, g| dw_cpu(&x[ox..ox + n], &g[og..og + n], h, self.eps),
            "RMSNorm backward: x and g must share one float dtype"
        );
        let p = parts.len() / h.max(1);
        Ok((CpuStorage::F32(parts), Shape::from((p, h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, h) = shape(lx, lg, None)?;
        let (ox, og) = (offset(lx, "x")?, offset(lg, "g")?);
        let (out, p) = cuda::dw(sx, ox, sg, og, rows, h, self.eps)?;
        Ok((out, Shape::from((p, h))))
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{CudaStorage, Result};

    use crate::kernels::launch::{
        blocks, for_float_dtype, grid, launch, typed_names, Module, FLOAT_TYPES, INSTANCES, THREADS, WARP_REDUCE,
    };

    /// A warp per row (grid-stride). `F32`, `BF16`, `F16`: [`FLOAT_TYPES`].
    const SOURCE: &str = r#"
template <typename D>
__device__ __forceinline__ float inv_rms(const typename D::S* x, int h, float eps, int lane) {
  float ss = 0.0f;
  for (int c = lane; c < h; c += 32) { float v = D::to(x[c]); ss += v * v; }
  ss = warp_sum(ss);
  return 1.0f / sqrtf(ss / h + eps);
}

template <typename D>
__device__ void dx(const typename D::S* x, const typename D::S* w, const typename D::S* g, typename D::S* out,
                   long long rows, int h, float eps) {
  int lane = threadIdx.x & 31;
  long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
  long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
  for (long long r = warp; r < rows; r += warps) {
    const typename D::S* xr = x + r * h; const typename D::S* gr = g + r * h; typename D::S* o = out + r * h;
    float inv = inv_rms<D>(xr, h, eps, lane);
    float dot = 0.0f;
    for (int c = lane; c < h; c += 32) dot += D::to(gr[c]) * D::to(w[c]) * (D::to(xr[c]) * inv);
    dot = warp_sum(dot) / h;
    for (int c = lane; c < h; c += 32) o[c] = D::from((D::to(gr[c]) * D::to(w[c]) - D::to(xr[c]) * inv * dot) * inv);
  }
}

template <typename D>
__device__ void dw(const typename D::S* x, const typename D::S* g, float* partial, long long rows, int h, float eps) {
  extern __shared__ float acc[];
  for (int c = threadIdx.x; c < h; c += blockDim.x) acc[c] = 0.0f;
  __syncthreads();
  int lane = threadIdx.x & 31;
  long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
  long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
  for (long long r = warp; r < rows; r += warps) {
    const typename D::S* xr = x + r * h; const typename D::S* gr = g + r * h;
    float inv = inv_rms<D>(xr, h, eps, lane);
    for (int c = lane; c < h; c += 32) atomicAdd(&acc[c], D::to(gr[c]) * (D::to(xr[c]) * inv));
  }
  __syncthreads();
  for (int c = threadIdx.x; c < h; c += blockDim.x) partial[(long long)blockIdx.x * h + c] = acc[c];
}

#define KERNELS(NAME, D) \
extern "C" __global__ void pipe_rms_dx_##NAME(const D::S* x, const D::S* w, const D::S* g, D::S* out, long long rows, int h, float eps) \
  { dx<D>(x, w, g, out, rows, h, eps); } \
extern "C" __global__ void pipe_rms_dw_##NAME(const D::S* x, const D::S* g, float* partial, long long rows, int h, float eps) \
  { dw<D>(x, g, partial, rows, h, eps); }
"#;

    const DX: &str = "pipe_rms_dx";
    const DW: &str = "pipe_rms_dw";

    pub static MODULE: Module = Module::new(
        "rms_norm_backward",
        "RMSNorm backward kernels",
        &[FLOAT_TYPES, WARP_REDUCE, SOURCE, INSTANCES],
        || Ok(typed_names(&[DX, DW])),
    );

    #[allow(clippy::too_many_arguments)]
    pub fn dx(
        x: &CudaStorage,
        ox: usize,
        w: &CudaStorage,
        ow: usize,
        g: &CudaStorage,
        og: usize,
        rows: usize,
        h: usize,
        eps: f64,
    ) -> Result<CudaStorage> {
        let dev = &x.device;
        let func = MODULE.typed(dev, DX, x.dtype(), "RMSNorm backward")?;
        let n = rows * h;
        let cfg = grid(blocks(rows, (THREADS / 32) as usize, 8192), THREADS, 0);
        let (rows64, h32, eps32) = (rows as i64, h as i32, eps as f32);
        macro_rules! run {
            ($t:ty) => {{
                let xs = x.as_cuda_slice::<$t>()?.slice(ox..ox + n);
                let ws = w.as_cuda_slice::<$t>()?.slice(ow..ow + h);
                let gs = g.as_cuda_slice::<$t>()?.slice(og..og + n);
                // SAFETY: every element is written: each row by one warp, every column of it.
                let out = unsafe { dev.alloc::<$t>(n)? };
                // SAFETY: arguments in the kernel's order and types; indices stay below rows·h.
                unsafe { launch!(func, cfg, [&xs, &ws, &gs, &out, &rows64, &h32, &eps32]) }?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(for_float_dtype!(x.dtype(), run))
    }

    pub fn dw(
        x: &CudaStorage,
        ox: usize,
        g: &CudaStorage,
        og: usize,
        rows: usize,
        h: usize,
        eps: f64,
    ) -> Result<(CudaStorage, usize)> {
        let dev = &x.device;
        let func = MODULE.typed(dev, DW, x.dtype(), "RMSNorm backward")?;
        let n = rows * h;
        // About 64 rows per block (8 per warp), at most 1024 partial sums.
        let blocks = blocks(rows, 64, 1024);
        let cfg = grid(blocks, THREADS, h * 4);
        let (rows64, h32, eps32) = (rows as i64, h as i32, eps as f32);
        // SAFETY: each block writes its whole row of partial sums.
        let out = unsafe { dev.alloc::<f32>(blocks * h)? };
        macro_rules! run {
            ($t:ty) => {{
                let xs = x.as_cuda_slice::<$t>()?.slice(ox..ox + n);
                let gs = g.as_cuda_slice::<$t>()?.slice(og..og + n);
                // SAFETY: arguments in the kernel's order and types; `h` floats of dynamic shared
                // memory; indices stay below rows·h and blocks·h.
                unsafe { launch!(func, cfg, [&xs, &gs, &out, &rows64, &h32, &eps32]) }?;
            }};
        }
        for_float_dtype!(x.dtype(), run);
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), blocks))
    }
}
