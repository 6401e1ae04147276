//! The MLP's gate, `a = silu(gate) · up`, forward and backward, each as one element-wise kernel.
//!
//! Why: differentiated op by op, `silu` alone is about six kernels over `[tokens, intermediate]`
//! (the widest activation of a layer, three times the hidden size) and the product two more, each
//! a full pass over memory plus the zero-fill and add candle's autograd does for every input. This
//! is one pass that reads `gate`, `up` and `da` and writes both gradients. With `s = σ(gate)` in
//! f32: `dgate = da · up · s · (1 + gate · (1 − s))`, `dup = da · gate · s`, each rounded once to
//! the inputs' dtype. The forward is likewise one pass, `a = gate · s · up` in f32, rounded once
//! (candle's `silu` then a product rounds twice in 16-bit dtypes). The result is `[2, ...]`: `dgate` then `dup`, so that one allocation holds
//! both and each is a contiguous view. The CPU loop is the reference the CUDA kernel mirrors.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::on_float_storages;

/// `silu(gate) · up`; args: gate, up — one shape, one float dtype, contiguous.
#[derive(Debug, Clone, Copy)]
pub struct SwigluForward;

/// `[dgate; dup]` of `silu(gate) · up`; args: gate, up, da — one shape, one float dtype, contiguous.
#[derive(Debug, Clone, Copy)]
pub struct SwigluBackward;

fn offset(l: &Layout, what: &str) -> Result<usize> {
    super::contiguous_start(l, "SwiGLU", what)
}

fn check(g: &Layout, u: &Layout, da: &Layout) -> Result<(usize, usize, usize, Shape)> {
    if g.shape() != u.shape() || g.shape() != da.shape() {
        candle_core::bail!("SwiGLU backward: gate {:?}, up {:?} and da {:?} differ", g.shape(), u.shape(), da.shape());
    }
    let mut dims = vec![2];
    dims.extend_from_slice(g.shape().dims());
    Ok((offset(g, "gate")?, offset(u, "up")?, offset(da, "da")?, Shape::from(dims)))
}

fn forward_cpu<T: WithDType>(g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); g.len()];
    const CHUNK: usize = 4096;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let base = c * CHUNK;
        for (i, o) in out.iter_mut().enumerate() {
            let (x, y) = (g[base + i].to_f64() as f32, u[base + i].to_f64() as f32);
            *o = T::from_f64((x / (1.0 + (-x).exp()) * y) as f64);
        }
    });
    out
}

impl CustomOp2 for SwigluForward {
    fn name(&self) -> &'static str {
        "pipe-swiglu"
    }

    fn cpu_fwd(&self, sg: &CpuStorage, lg: &Layout, su: &CpuStorage, lu: &Layout) -> Result<(CpuStorage, Shape)> {
        let (og, ou, _, _) = check(lg, lu, lg)?;
        let n = lg.shape().elem_count();
        let out = on_float_storages!(
            storage,
            (sg, su),
            |g, u| forward_cpu(&g[og..og + n], &u[ou..ou + n]),
            "SwiGLU: gate and up must share one float dtype"
        );
        Ok((out, lg.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
        su: &candle_core::CudaStorage,
        lu: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (og, ou, _, _) = check(lg, lu, lg)?;
        let out = cuda::run(sg, og, su, ou, None, lg.shape().elem_count())?;
        Ok((out, lg.shape().clone()))
    }
}

/// `silu(gate) · up` without a graph ([`crate::model::fused::swiglu`] attaches the backward).
pub fn swiglu_forward(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &SwigluForward)
}

/// The two gradients of one element, in f32.
#[inline]
fn grads(g: f32, u: f32, da: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-g).exp());
    (da * u * (s * (1.0 + g * (1.0 - s))), da * (g * s))
}

fn cpu<T: WithDType>(g: &[T], u: &[T], da: &[T]) -> Vec<T> {
    let n = g.len();
    let mut out = vec![T::zero(); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    const CHUNK: usize = 4096;
    dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (dg, du))| {
        let base = c * CHUNK;
        for (i, (dg, du)) in dg.iter_mut().zip(du.iter_mut()).enumerate() {
            let j = base + i;
            let (a, b) = grads(g[j].to_f64() as f32, u[j].to_f64() as f32, da[j].to_f64() as f32);
            *dg = T::from_f64(a as f64);
            *du = T::from_f64(b as f64);
        }
    });
    out
}

impl CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "pipe-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        su: &CpuStorage,
        lu: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (og, ou, od, shape) = check(lg, lu, ld)?;
        let n = lg.shape().elem_count();
        let out = on_float_storages!(
            storage,
            (sg, su, sd),
            |g, u, d| cpu(&g[og..og + n], &u[ou..ou + n], &d[od..od + n]),
            "SwiGLU backward: gate, up and da must share one float dtype"
        );
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
        su: &candle_core::CudaStorage,
        lu: &Layout,
        sd: &candle_core::CudaStorage,
        ld: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (og, ou, od, shape) = check(lg, lu, ld)?;
        let out = cuda::run(sg, og, su, ou, Some((sd, od)), lg.shape().elem_count())?;
        Ok((out, shape))
    }
}

/// `[dgate; dup]` split into its two halves (contiguous views, no copy).
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, da: &Tensor) -> Result<(Tensor, Tensor)> {
    let both = gate.contiguous()?.apply_op3_no_bwd(&up.contiguous()?, &da.contiguous()?, &SwigluBackward)?;
    Ok((both.get(0)?, both.get(1)?))
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{CudaStorage, Result};

    use crate::kernels::launch::{
        blocks, for_float_dtype, grid, launch, typed_names, Module, FLOAT_TYPES, INSTANCES, THREADS,
    };

    /// Grid-stride over elements. `F32`, `BF16`, `F16`: [`FLOAT_TYPES`].
    const SOURCE: &str = r#"
template <typename D>
__device__ void swiglu_fwd(const typename D::S* g, const typename D::S* u, typename D::S* out, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    float x = D::to(g[i]);
    out[i] = D::from(x / (1.0f + expf(-x)) * D::to(u[i]));
  }
}
template <typename D>
__device__ void swiglu_bwd(const typename D::S* g, const typename D::S* u, const typename D::S* da,
                           typename D::S* out, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    float x = D::to(g[i]), y = D::to(u[i]), d = D::to(da[i]);
    float s = 1.0f / (1.0f + expf(-x));
    out[i] = D::from(d * y * (s * (1.0f + x * (1.0f - s))));
    out[n + i] = D::from(d * (x * s));
  }
}
#define KERNELS(NAME, D) \
extern "C" __global__ void pipe_swiglu_fwd_##NAME(const D::S* g, const D::S* u, D::S* out, long long n) \
  { swiglu_fwd<D>(g, u, out, n); } \
extern "C" __global__ void pipe_swiglu_bwd_##NAME(const D::S* g, const D::S* u, const D::S* da, D::S* out, long long n) \
  { swiglu_bwd<D>(g, u, da, out, n); }
"#;

    const FORWARD: &str = "pipe_swiglu_fwd";
    const BACKWARD: &str = "pipe_swiglu_bwd";

    pub static MODULE: Module = Module::new("swiglu", "SwiGLU kernels", &[FLOAT_TYPES, SOURCE, INSTANCES], || {
        Ok(typed_names(&[FORWARD, BACKWARD]))
    });

    /// The forward (`da = None`; `n` outputs) or the backward (`2n`: dgate then dup).
    pub fn run(
        g: &CudaStorage,
        og: usize,
        u: &CudaStorage,
        ou: usize,
        da: Option<(&CudaStorage, usize)>,
        n: usize,
    ) -> Result<CudaStorage> {
        let dev = &g.device;
        let (base, outputs) = if da.is_some() { (BACKWARD, 2 * n) } else { (FORWARD, n) };
        let func = MODULE.typed(dev, base, g.dtype(), "SwiGLU")?;
        let cfg = grid(blocks(n, THREADS as usize, 65_536), THREADS, 0);
        let n64 = n as i64;
        macro_rules! run {
            ($t:ty) => {{
                let gs = g.as_cuda_slice::<$t>()?.slice(og..og + n);
                let us = u.as_cuda_slice::<$t>()?.slice(ou..ou + n);
                let ds = match da {
                    Some((da, od)) => Some(da.as_cuda_slice::<$t>()?.slice(od..od + n)),
                    None => None,
                };
                // SAFETY: the grid-stride loop writes every output element.
                let out = unsafe { dev.alloc::<$t>(outputs)? };
                // SAFETY: arguments in the kernel's order and types; indices stay below `outputs`.
                unsafe {
                    match &ds {
                        Some(ds) => launch!(func, cfg, [&gs, &us, ds, &out, &n64]),
                        None => launch!(func, cfg, [&gs, &us, &out, &n64]),
                    }
                }?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        Ok(for_float_dtype!(g.dtype(), run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::tests::{max_rel, sample};
    use candle_core::{DType, Var};

    #[test]
    fn equals_autograd_of_silu_times_up_within_one_rounding() {
        for (dtype, tol) in [(DType::F32, 1e-6f32), (DType::BF16, 4e-3), (DType::F16, 5e-4)] {
            let g = (sample(&[3, 7, 11], 1) * 6.0).unwrap().to_dtype(dtype).unwrap();
            let u = sample(&[3, 7, 11], 2).to_dtype(dtype).unwrap();
            let da = sample(&[3, 7, 11], 3).to_dtype(dtype).unwrap();
            // The reference: autograd in f32 on the same (rounded) inputs; 16-bit results may differ
            // from it by their one final rounding.
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let (gv, uv) = (Var::from_tensor(&f32(&g)).unwrap(), Var::from_tensor(&f32(&u)).unwrap());
            let y = (gv.as_tensor().silu().unwrap() * uv.as_tensor()).unwrap();
            let grads = (y * f32(&da)).unwrap().sum_all().unwrap().backward().unwrap();
            let (dg, du) = swiglu_backward(&g, &u, &da).unwrap();
            assert_eq!(dg.dims(), g.dims());
            for (ours, reference) in
                [(dg, grads.get(gv.as_tensor()).unwrap()), (du, grads.get(uv.as_tensor()).unwrap())]
            {
                let d = max_rel(&ours, reference);
                assert!(d <= tol, "{dtype:?}: max relative difference {d} > {tol}");
            }
        }
    }

    #[test]
    fn forward_equals_silu_times_up_within_one_rounding() {
        for (dtype, tol) in [(DType::F32, 1e-6f32), (DType::BF16, 4e-3), (DType::F16, 5e-4)] {
            let g = (sample(&[3, 7, 11], 4) * 6.0).unwrap().to_dtype(dtype).unwrap();
            let u = sample(&[3, 7, 11], 5).to_dtype(dtype).unwrap();
            let ours = swiglu_forward(&g, &u).unwrap();
            assert_eq!((ours.dims(), ours.dtype()), (g.dims(), dtype));
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let reference = (f32(&g).silu().unwrap() * f32(&u)).unwrap();
            let d = max_rel(&ours, &reference);
            assert!(d <= tol, "{dtype:?}: max relative difference {d} > {tol}");
        }
    }

    #[test]
    fn a_wrong_shape_is_an_error() {
        let a = sample(&[2, 3], 1);
        let b = sample(&[3, 2], 2);
        assert!(swiglu_backward(&a, &b, &a).unwrap_err().to_string().contains("differ"));
    }
}
