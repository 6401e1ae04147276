//! AdamW in one pass over a parameter's optimizer state, in place, on whichever device holds it.
//!
//! Why: written as tensor ops (as [`crate::train::optim::adamw_tensors`] does) one update reads and writes the
//! parameter's f32 state about a dozen times and allocates as many temporaries, each the size of
//! the parameter (1.5 GB for the 4B model's embedding). Fused, it is one read of the gradient and one
//! read-modify-write of the state, and no allocation — which is what lets the 4B model's f32 masters
//! and moments sit on one 80 GB GPU.
//!
//! The state of a parameter of `n` elements is one f32 tensor `[3, n]`: master weights, first
//! moment, second moment. One buffer, so one in-place op may update all three. The arithmetic is
//! [`crate::train::optim::adamw_dense`]'s (the CPU twin, which the host optimizer runs too), element for element; the CUDA kernel is compiled with NVRTC
//! without FMA contraction and with IEEE division and square root, so it rounds like the CPU loop.

use std::ops::Range;

use candle_core::{CpuStorage, InplaceOp2, Layout};

use super::{contiguous_range, write_f32};
use crate::train::optim::{adamw_dense, StepScalars};

/// One AdamW step of a `[3, n]` state (master | m | v) from an `[n]` gradient of any float dtype
/// (a single micro-batch's 16-bit gradient is used as it is, not widened into a copy first).
pub struct FusedAdamW(pub StepScalars);

/// A CPU gradient's elements `range` in f32 (borrowed when it is f32 already; 16-bit values widen
/// exactly).
fn widened<'a>(s: &'a CpuStorage, range: Range<usize>, op: &str) -> candle_core::Result<std::borrow::Cow<'a, [f32]>> {
    use std::borrow::Cow;
    Ok(match s {
        CpuStorage::F32(g) => Cow::Borrowed(&g[range]),
        CpuStorage::BF16(g) => Cow::Owned(g[range].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(g) => Cow::Owned(g[range].iter().map(|x| x.to_f32()).collect()),
        _ => candle_core::bail!("{op}: the gradient must be f32, bf16 or f16"),
    })
}

/// (offset of the state, n, offset of the gradient), both contiguous (the state f32).
fn extents(state: &Layout, grad: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (s0, n, g0) = packed(state, (grad, "gradient"), "fused AdamW")?;
    Ok((s0, n, g0))
}

/// (offset of the `[3, n]` state, n, offset of `other`), both contiguous; `what` names `other` and
/// `op` the op in the errors.
fn packed(state: &Layout, (other, what): (&Layout, &str), op: &str) -> candle_core::Result<(usize, usize, usize)> {
    let Range { start: s0, end: s1 } = contiguous_range(state, op, "the state")?;
    let Range { start: o0, end: o1 } = contiguous_range(other, op, &format!("the {what}"))?;
    let n = o1 - o0;
    if s1 - s0 != 3 * n {
        return Err(candle_core::Error::Msg(format!(
            "{op}: a state of {} elements for a {what} of {n}; expected 3 × {n}",
            s1 - s0
        )));
    }
    Ok((s0, n, o0))
}

impl InplaceOp2 for FusedAdamW {
    fn name(&self) -> &'static str {
        "pipe-fused-adamw"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (start, n, g0) = extents(l1, l2)?;
        let CpuStorage::F32(state) = s1 else {
            return Err(candle_core::Error::Msg("fused AdamW needs an f32 state".into()));
        };
        let grad = widened(s2, g0..g0 + n, "fused AdamW")?;
        let (p, rest) = state[start..start + 3 * n].split_at_mut(n);
        let (m, v) = rest.split_at_mut(n);
        adamw_dense(p, m, v, &grad, &self.0);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (start, n, g0) = extents(l1, l2)?;
        if n == 0 {
            return Ok(());
        }
        cuda::adamw(s1, start, s2, g0, n, &self.0)
    }
}

/// Partial sums of squares of one gradient (any float dtype), written in place into its slot of a shared
/// `[slots × PARTS]` f32 buffer (entries a gradient does not need stay as they were, zero).
///
/// Why: the global gradient norm needs Σ g² of every parameter. As tensor ops that is a squared
/// copy of each gradient and several reductions, about seven launches and allocations per
/// parameter (311 for Qwen3-0.6B); candle's CUDA reduction also gives each output one block. Here
/// it is one launch per parameter reading the gradient once, spread over up to `PARTS` blocks, and
/// one transfer of all partial sums per step. The CPU sums each part in f64.
pub struct SumSquaresInto {
    pub slot: usize,
}

impl SumSquaresInto {
    /// Partial sums per gradient.
    pub const PARTS: usize = 1024;
}

impl InplaceOp2 for SumSquaresInto {
    fn name(&self) -> &'static str {
        "pipe-sum-squares"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (p0, g0, n) = squares_extents(l1, l2, self.slot)?;
        let CpuStorage::F32(partials) = s1 else {
            return Err(candle_core::Error::Msg("sum of squares: the partials must be f32".into()));
        };
        let g = widened(s2, g0..g0 + n, "sum of squares")?;
        let chunk = n.div_ceil(Self::PARTS).max(1);
        for (k, c) in g.chunks(chunk).enumerate() {
            partials[p0 + k] = c.iter().map(|&x| x as f64 * x as f64).sum::<f64>() as f32;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (p0, g0, n) = squares_extents(l1, l2, self.slot)?;
        if n == 0 {
            return Ok(());
        }
        cuda::sum_squares(s1, p0, s2, g0, n)
    }
}

/// (offset of the slot in the partials, offset of the gradient, its length), both contiguous.
fn squares_extents(partials: &Layout, g: &Layout, slot: usize) -> candle_core::Result<(usize, usize, usize)> {
    let Range { start: q0, end: q1 } = contiguous_range(partials, "sum of squares", "the partials")?;
    let Range { start: g0, end: g1 } = contiguous_range(g, "sum of squares", "the gradient")?;
    if (slot + 1) * SumSquaresInto::PARTS > q1 - q0 {
        return Err(candle_core::Error::Msg(format!(
            "sum of squares: slot {slot} is outside partials of {} elements",
            q1 - q0
        )));
    }
    Ok((q0 + slot * SumSquaresInto::PARTS, g0, g1 - g0))
}

/// Writes the master weights (the first third of a `[3, n]` state) into the model's parameter in
/// its compute dtype, in place: what `Var::set(&master.to_dtype(..))` does with a temporary and a
/// second pass. Rounds to nearest even, as candle's casts do.
pub struct WriteMaster;

impl InplaceOp2 for WriteMaster {
    fn name(&self) -> &'static str {
        "pipe-write-master"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (p0, n, m0) = write_extents(l1, l2)?;
        let CpuStorage::F32(state) = s2 else {
            return Err(candle_core::Error::Msg("writing master weights: the state must be f32".into()));
        };
        write_f32(s1, p0, &state[m0..m0 + n])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (p0, n, m0) = write_extents(l1, l2)?;
        if n == 0 {
            return Ok(());
        }
        cuda::write_master(s1, p0, s2, m0, n)
    }
}

/// (offset of the parameter, n, offset of the state), both contiguous, the state `3n` long.
fn write_extents(param: &Layout, state: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (s0, n, p0) = packed(state, (param, "parameter"), "writing master weights")?;
    Ok((p0, n, s0))
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{CudaStorage, Result};

    use super::{StepScalars, SumSquaresInto};
    use crate::kernels::launch::{
        blocks, for_float_dtype, grid, launch, typed_names, Module, FLOAT_TYPES, INSTANCES, THREADS,
    };

    /// [`crate::train::optim`]'s `update_one`, one thread per element (grid-stride), for a gradient
    /// of any float dtype (`G::to` widens it exactly). `F32`, `BF16`, `F16`: [`FLOAT_TYPES`].
    const SOURCE: &str = r#"
template <typename G>
__device__ void adamw(
    float* state, const typename G::S* grad, unsigned long long n,
    float decay, float one_minus_beta1, float beta2, float one_minus_beta2,
    float neg_step_size, float bias_correction2_sqrt, float eps, float grad_scale)
{
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        float g = G::to(grad[i]);
        if (grad_scale != 1.0f) g = g * grad_scale;
        float p = state[i];
        if (decay != 1.0f) p = p * decay;
        float m = state[n + i];
        m = m + one_minus_beta1 * (g - m);
        float v = state[2 * n + i];
        v = v * beta2 + one_minus_beta2 * g * g;
        float denom = sqrtf(v) / bias_correction2_sqrt + eps;
        p = p + neg_step_size * m / denom;
        state[i] = p;
        state[n + i] = m;
        state[2 * n + i] = v;
    }
}
#define ADAMW(NAME, G) \
extern "C" __global__ void pipe_adamw_##NAME(float* state, const G::S* grad, unsigned long long n, \
    float decay, float one_minus_beta1, float beta2, float one_minus_beta2, \
    float neg_step_size, float bias_correction2_sqrt, float eps, float grad_scale) \
  { adamw<G>(state, grad, n, decay, one_minus_beta1, beta2, one_minus_beta2, neg_step_size, \
             bias_correction2_sqrt, eps, grad_scale); }
ADAMW(f32, F32)
ADAMW(bf16, BF16)
ADAMW(f16, F16)
"#;

    /// One block's sum of squares (grid-stride, then a warp and a block reduction) per partial.
    const SQUARES_SOURCE: &str = r#"
template <typename G>
__device__ void sum_squares(float* partials, const typename G::S* g, unsigned long long n) {
  __shared__ float warp_sums[32];
  float s = 0.0f;
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) { float x = G::to(g[i]); s += x * x; }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) partials[blockIdx.x] = s;
  }
}
#define SQUARES(NAME, G) \
extern "C" __global__ void pipe_sum_squares_##NAME(float* partials, const G::S* g, unsigned long long n) \
  { sum_squares<G>(partials, g, n); }
SQUARES(f32, F32)
SQUARES(bf16, BF16)
SQUARES(f16, F16)
"#;

    /// The master weights written back in the compute dtype.
    const WRITE_SOURCE: &str = r#"
template <typename D>
__device__ void write_master(typename D::S* dst, const float* master, unsigned long long n) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) dst[i] = D::from(master[i]);
}
#define KERNELS(NAME, D) \
extern "C" __global__ void pipe_write_master_##NAME(D::S* dst, const float* master, unsigned long long n) \
  { write_master<D>(dst, master, n); }
"#;

    const ADAMW: &str = "pipe_adamw";
    const SUM_SQUARES: &str = "pipe_sum_squares";
    const WRITE_MASTER: &str = "pipe_write_master";

    pub static MODULE: Module = Module::new(
        "fused_adamw",
        "fused AdamW kernels",
        &[FLOAT_TYPES, SOURCE, SQUARES_SOURCE, WRITE_SOURCE, INSTANCES],
        || Ok(typed_names(&[ADAMW, SUM_SQUARES, WRITE_MASTER])),
    );

    /// One step over `state[start..start + 3n]` from `grad[g0..g0 + n]`; `n > 0`.
    pub fn adamw(
        state: &mut CudaStorage,
        start: usize,
        grad: &CudaStorage,
        g0: usize,
        n: usize,
        s: &StepScalars,
    ) -> Result<()> {
        let func = MODULE.typed(&state.device, ADAMW, grad.dtype(), "fused AdamW's gradient")?;
        let mut state = state.as_cuda_slice_mut::<f32>()?.slice_mut(start..start + 3 * n);
        let n64 = n as u64;
        let cfg = grid(blocks(n, THREADS as usize, 1 << 20), THREADS, 0);
        macro_rules! run {
            ($t:ty) => {{
                let grad = grad.as_cuda_slice::<$t>()?.slice(g0..g0 + n);
                // SAFETY: the kernel reads `grad[0..n]` and writes `state[0..3n]`, both in bounds
                // (checked by `extents`); the arguments match its signature in order and type.
                unsafe {
                    launch!(
                        func,
                        cfg,
                        [
                            &mut state,
                            &grad,
                            &n64,
                            &s.decay,
                            &s.one_minus_beta1,
                            &s.beta2,
                            &s.one_minus_beta2,
                            &s.neg_step_size,
                            &s.bias_correction2_sqrt,
                            &s.eps,
                            &s.grad_scale,
                        ]
                    )
                }?;
            }};
        }
        for_float_dtype!(grad.dtype(), run);
        Ok(())
    }

    /// `grad[g0..g0 + n]`'s partial sums of squares into `partials[p0..]`; `n > 0`.
    pub fn sum_squares(partials: &mut CudaStorage, p0: usize, grad: &CudaStorage, g0: usize, n: usize) -> Result<()> {
        let func = MODULE.typed(&partials.device, SUM_SQUARES, grad.dtype(), "sum of squares")?;
        let blocks = blocks(n, THREADS as usize, SumSquaresInto::PARTS);
        let cfg = grid(blocks, THREADS, 0);
        let mut partials = partials.as_cuda_slice_mut::<f32>()?.slice_mut(p0..p0 + blocks);
        let n64 = n as u64;
        macro_rules! run {
            ($t:ty) => {{
                let g = grad.as_cuda_slice::<$t>()?.slice(g0..g0 + n);
                // SAFETY: the kernel reads g[0..n] and writes partials[0..blocks], both in bounds
                // (checked by `squares_extents`, blocks ≤ PARTS); the arguments match its signature.
                unsafe { launch!(func, cfg, [&mut partials, &g, &n64]) }?;
            }};
        }
        for_float_dtype!(grad.dtype(), run);
        Ok(())
    }

    /// `master[m0..m0 + n]` written into `param[p0..p0 + n]` in its dtype; `n > 0`.
    pub fn write_master(param: &mut CudaStorage, p0: usize, state: &CudaStorage, m0: usize, n: usize) -> Result<()> {
        let dtype = param.dtype();
        let func = MODULE.typed(&param.device, WRITE_MASTER, dtype, "writing master weights")?;
        let master = state.as_cuda_slice::<f32>()?.slice(m0..m0 + n);
        let n64 = n as u64;
        let cfg = grid(blocks(n, THREADS as usize, 1 << 20), THREADS, 0);
        macro_rules! run {
            ($t:ty) => {{
                let mut dst = param.as_cuda_slice_mut::<$t>()?.slice_mut(p0..p0 + n);
                // SAFETY: the kernel reads master[0..n] and writes dst[0..n], both in bounds
                // (checked by `write_extents`); the arguments match its signature.
                unsafe { launch!(func, cfg, [&mut dst, &master, &n64]) }?;
            }};
        }
        for_float_dtype!(dtype, run);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::train::config::AdamConfig;

    /// The op on a packed `[3, n]` tensor equals the flat-buffer loop on separate buffers, bit for
    /// bit, over several steps with decay, clipping scale and a state that starts mid-buffer.
    #[test]
    fn fused_update_equals_the_flat_loop() {
        let n = 1000;
        let mut p: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let mut packed: Vec<f32> = vec![9.0; 5]; // an offset: the state is a view into a bigger buffer
        packed.extend(&p);
        packed.extend(vec![0f32; 2 * n]);
        let big = Tensor::from_vec(packed, 5 + 3 * n, &Device::Cpu).unwrap();
        let state = big.narrow(0, 5, 3 * n).unwrap();
        for step in 1..=4u64 {
            let g: Vec<f32> = (0..n).map(|i| (((i as u64 * 13 + step * 7) % 29) as f32 - 14.0) / 9.0).collect();
            let s = StepScalars::new(&AdamConfig::default(), 1e-2 / step as f64, 0.1, step, 0.7);
            adamw_dense(&mut p, &mut m, &mut v, &g, &s);
            state.inplace_op2(&Tensor::from_vec(g, n, &Device::Cpu).unwrap(), &FusedAdamW(s)).unwrap();
        }
        let got: Vec<f32> = state.to_vec1().unwrap();
        assert_eq!(&got[..n], &p[..]);
        assert_eq!(&got[n..2 * n], &m[..]);
        assert_eq!(&got[2 * n..], &v[..]);
        assert_eq!(big.narrow(0, 0, 5).unwrap().to_vec1::<f32>().unwrap(), vec![9.0; 5], "outside the view untouched");
    }

    /// The in-place write equals `to_dtype` of the master, for each compute dtype, and leaves the
    /// moments alone.
    #[test]
    fn writing_the_master_equals_a_cast() {
        let n = 1001;
        let master: Vec<f32> = (0..n).map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 7.3).collect();
        let state = Tensor::from_vec([master.clone(), vec![5.0; 2 * n]].concat(), 3 * n, &Device::Cpu).unwrap();
        let want = Tensor::from_vec(master, (11, 91), &Device::Cpu).unwrap();
        for dtype in [candle_core::DType::F32, candle_core::DType::BF16, candle_core::DType::F16] {
            let param = Tensor::zeros((11, 91), dtype, &Device::Cpu).unwrap();
            param.inplace_op2(&state, &WriteMaster).unwrap();
            let want = want.to_dtype(dtype).unwrap().to_dtype(candle_core::DType::F32).unwrap();
            let got = param.to_dtype(candle_core::DType::F32).unwrap();
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        let short = Tensor::zeros(10, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(short.inplace_op2(&state, &WriteMaster).unwrap_err().to_string().contains("3 × 10"));
    }

    /// Each gradient's partial sums add up to its Σ g² (the host's f64 sum, to f32 rounding), in
    /// its own slot; a slot outside the buffer is an error.
    #[test]
    fn sums_of_squares_land_in_their_slots() {
        let parts = SumSquaresInto::PARTS;
        let partials = Tensor::zeros(3 * parts, candle_core::DType::F32, &Device::Cpu).unwrap();
        let grads: Vec<Vec<f32>> = [5usize, 4096 * 3 + 7, 1]
            .iter()
            .map(|&n| (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 256.0).collect())
            .collect();
        for (slot, g) in grads.iter().enumerate() {
            let t = Tensor::from_vec(g.clone(), g.len(), &Device::Cpu).unwrap();
            partials.inplace_op2(&t, &SumSquaresInto { slot }).unwrap();
        }
        let got: Vec<f32> = partials.to_vec1().unwrap();
        for (slot, g) in grads.iter().enumerate() {
            let want = crate::train::optim::sum_squares(g);
            let sum: f64 = got[slot * parts..(slot + 1) * parts].iter().map(|&x| x as f64).sum();
            assert!((sum - want).abs() <= 1e-6 * want, "slot {slot}: {sum} vs {want}");
        }
        let t = Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = partials.inplace_op2(&t, &SumSquaresInto { slot: 3 }).unwrap_err().to_string();
        assert!(e.contains("slot 3 is outside"), "{e}");
    }

    /// A 16-bit gradient gives the same update and the same sum of squares as the same values
    /// widened to f32 first, bit for bit.
    #[test]
    fn sixteen_bit_gradients_equal_their_widened_copies() {
        let n = 777;
        let g: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 16.0).collect();
        // master and first moment of either sign, a non-negative second moment
        let init: Vec<f32> = (0..3 * n)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
            .enumerate()
            .map(|(i, x)| if i >= 2 * n { x.abs() } else { x })
            .collect();
        let s = StepScalars::new(&AdamConfig::default(), 1e-2, 0.1, 3, 0.7);
        for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
            let narrow = Tensor::from_vec(g.clone(), n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let wide = narrow.to_dtype(candle_core::DType::F32).unwrap();
            let run = |grad: &Tensor| {
                let state = Tensor::from_vec(init.clone(), 3 * n, &Device::Cpu).unwrap();
                state.inplace_op2(grad, &FusedAdamW(s)).unwrap();
                let partials = Tensor::zeros(SumSquaresInto::PARTS, candle_core::DType::F32, &Device::Cpu).unwrap();
                partials.inplace_op2(grad, &SumSquaresInto { slot: 0 }).unwrap();
                (state.to_vec1::<f32>().unwrap(), partials.to_vec1::<f32>().unwrap())
            };
            assert_eq!(run(&narrow), run(&wide), "{dtype:?}");
        }
    }

    #[test]
    fn mismatched_sizes_are_an_error() {
        let state = Tensor::zeros(3 * 10, candle_core::DType::F32, &Device::Cpu).unwrap();
        let g = Tensor::zeros(9, candle_core::DType::F32, &Device::Cpu).unwrap();
        let s = StepScalars::new(&AdamConfig::default(), 1e-3, 0.0, 1, 1.0);
        let e = state.inplace_op2(&g, &FusedAdamW(s)).unwrap_err().to_string();
        assert!(e.contains("3 × 9"), "{e}");
    }
}
