//! AdamW in one pass over a parameter's optimizer state, in place, on whichever device holds it.
//!
//! Why: written as tensor ops (as [`super::optim::adamw_tensors`] does) one update reads and writes the
//! parameter's f32 state about a dozen times and allocates as many temporaries, each the size of
//! the parameter (1.5 GB for the 4B model's embedding). Fused, it is one read of the gradient and one
//! read-modify-write of the state, and no allocation — which is what lets the 4B model's f32 masters
//! and moments sit on one 80 GB GPU.
//!
//! The state of a parameter of `n` elements is one f32 tensor `[3, n]`: master weights, first
//! moment, second moment. One buffer, so one in-place op may update all three. The arithmetic is
//! [`super::optim::adamw_dense`]'s, element for element; the CUDA kernel is compiled with NVRTC
//! without FMA contraction and with IEEE division and square root, so it rounds like the CPU loop.

use candle_core::{CpuStorage, InplaceOp2, Layout};

use super::optim::{adamw_dense, StepScalars};

/// One AdamW step of a `[3, n]` state (master | m | v) from an `[n]` f32 gradient.
pub struct FusedAdamW(pub StepScalars);

/// (offset of the state, n, offset of the gradient), both contiguous f32.
fn extents(state: &Layout, grad: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (s0, s1) = state
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused AdamW: the optimizer state is not contiguous".into()))?;
    let (g0, g1) = grad
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused AdamW: the gradient is not contiguous".into()))?;
    let n = g1 - g0;
    if s1 - s0 != 3 * n {
        return Err(candle_core::Error::Msg(format!(
            "fused AdamW: state of {} elements for a gradient of {n}; expected 3 × {n}",
            s1 - s0
        )));
    }
    Ok((s0, n, g0))
}

impl InplaceOp2 for FusedAdamW {
    fn name(&self) -> &'static str {
        "pipe-fused-adamw"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (start, n, g0) = extents(l1, l2)?;
        let (CpuStorage::F32(state), CpuStorage::F32(grad)) = (s1, s2) else {
            return Err(candle_core::Error::Msg("fused AdamW needs f32 state and gradient".into()));
        };
        let (p, rest) = state[start..start + 3 * n].split_at_mut(n);
        let (m, v) = rest.split_at_mut(n);
        adamw_dense(p, m, v, &grad[g0..g0 + n], &self.0);
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
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        let (start, n, g0) = extents(l1, l2)?;
        if n == 0 {
            return Ok(());
        }
        let dev = s1.device.clone();
        let func = dev.get_or_load_custom_func("pipe_adamw_f32", "pipe_fused_adamw", cuda::ptx()?)?;
        let grad = s2.as_cuda_slice::<f32>()?.slice(g0..g0 + n);
        let state = s1.as_cuda_slice_mut::<f32>()?;
        let mut state = state.slice_mut(start..start + 3 * n);
        let s = &self.0;
        let n64 = n as u64;
        const THREADS: u32 = 256;
        let blocks = (n as u64).div_ceil(THREADS as u64).min(1 << 20) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut b = func.builder();
        b.arg(&mut state);
        b.arg(&grad);
        b.arg(&n64);
        for x in [
            &s.decay,
            &s.one_minus_beta1,
            &s.beta2,
            &s.one_minus_beta2,
            &s.neg_step_size,
            &s.bias_correction2_sqrt,
            &s.eps,
            &s.grad_scale,
        ] {
            b.arg(x);
        }
        // SAFETY: the kernel reads `grad[0..n]` and writes `state[0..3n]`, both in bounds (checked
        // by `extents`); the arguments match its signature in order and type.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use std::sync::OnceLock;

    /// [`super::super::optim`]'s `update_one`, one thread per element (grid-stride).
    const SOURCE: &str = r#"
extern "C" __global__ void pipe_adamw_f32(
    float* state, const float* grad, unsigned long long n,
    float decay, float one_minus_beta1, float beta2, float one_minus_beta2,
    float neg_step_size, float bias_correction2_sqrt, float eps, float grad_scale)
{
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        float g = grad[i];
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
"#;

    /// Compiled once per process with NVRTC, rounding like the CPU loop
    /// ([`crate::model::nvrtc::ieee_options`]).
    pub(crate) fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<Result<String, String>> = OnceLock::new();
        crate::model::nvrtc::ptx(&PTX, "fused AdamW kernel", || SOURCE.to_string())
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

    #[test]
    fn mismatched_sizes_are_an_error() {
        let state = Tensor::zeros(3 * 10, candle_core::DType::F32, &Device::Cpu).unwrap();
        let g = Tensor::zeros(9, candle_core::DType::F32, &Device::Cpu).unwrap();
        let s = StepScalars::new(&AdamConfig::default(), 1e-3, 0.0, 1, 1.0);
        let e = state.inplace_op2(&g, &FusedAdamW(s)).unwrap_err().to_string();
        assert!(e.contains("3 × 9"), "{e}");
    }
}
