//! Every custom op with a kernel of our own: its CUDA source and launcher, and beside them the CPU
//! loop the kernel mirrors (its twin, and the reference it is tested against).
//!
//! Why one place: the kernels serve both the model (attention softmax, RMSNorm backward, q/k norm
//! with RoPE, SwiGLU) and the trainer (AdamW, gradient sums of squares, master write-back,
//! embedding-gradient scatter), and each used to repeat the compile-load-launch code beside its own
//! op. Here that code is written once ([`launch`], built only with the `cuda` feature), and
//! [`MODULES`] lists every NVRTC module for `pipe bench kernels`, which compiles them all without a
//! GPU. The model and the trainer call the ops; nothing here knows about either, except that the
//! AdamW op's CPU twin is the optimizer's own loop ([`crate::train::optim::adamw_dense`]).
//!
//! - [`softmax`]: the attention softmax with its mask, and its two backward passes.
//! - [`flash`]: attention tiled with an online softmax, forward and backward, never holding `T × T`.
//! - [`norm`]: RMSNorm's backward (input gradient; the weight gradient's partial sums).
//! - [`norm_rope`]: per-head RMSNorm, RoPE and the move to attention's layout, both ways.
//! - [`swiglu`]: the MLP's gate `silu(gate) · up`, both ways.
//! - [`adamw`]: one AdamW step over a parameter's packed state, a gradient's partial sums of
//!   squares, and the master weights written back in the compute dtype.
//! - [`scatter`]: gathered rows' gradients added into an f32 accumulator in place.
//!
//! Each op computes in f32 and rounds where the tensor ops it replaces round; the CUDA sources are
//! compiled without FMA contraction and with IEEE division and square root so that they round like
//! their CPU twins.

use candle_core::{CpuStorage, Layout, Result};

pub mod adamw;
pub mod flash;
#[cfg(feature = "cuda")]
pub mod launch;
pub mod norm;
pub mod norm_rope;
pub mod scatter;
pub mod softmax;
pub mod swiglu;

/// Every NVRTC module, for `pipe bench kernels` to compile and to look each kernel name up in.
#[cfg(feature = "cuda")]
pub static MODULES: [&launch::Module; 7] = [
    &norm::cuda::MODULE,
    &flash::cuda::MODULE,
    &softmax::cuda::MODULE,
    &swiglu::cuda::MODULE,
    &norm_rope::cuda::MODULE,
    &adamw::cuda::MODULE,
    &scatter::cuda::MODULE,
];

/// The element range of a contiguous layout (from its start offset); `op` and `what` name the op and
/// its input in the error for any other layout.
pub fn contiguous_range(l: &Layout, op: &str, what: &str) -> Result<std::ops::Range<usize>> {
    l.contiguous_offsets()
        .map(|(start, end)| start..end)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))
}

/// The start offset of a contiguous layout; see [`contiguous_range`].
pub fn contiguous_start(l: &Layout, op: &str, what: &str) -> Result<usize> {
    Ok(contiguous_range(l, op, what)?.start)
}

/// Writes `src` into a float CPU storage from element `start`, rounding to nearest even for 16-bit
/// dtypes (as candle's casts do).
pub fn write_f32(dst: &mut CpuStorage, start: usize, src: &[f32]) -> Result<()> {
    let end = start + src.len();
    match dst {
        CpuStorage::F32(d) => d[start..end].copy_from_slice(src),
        CpuStorage::BF16(d) => d[start..end].iter_mut().zip(src).for_each(|(o, &x)| *o = half::bf16::from_f32(x)),
        CpuStorage::F16(d) => d[start..end].iter_mut().zip(src).for_each(|(o, &x)| *o = half::f16::from_f32(x)),
        _ => candle_core::bail!("writing f32 values into a non-float storage"),
    }
    Ok(())
}

/// A CPU twin run on CPU storages that share one float dtype: `$body` with each `$v` bound to its
/// storage's slice, its value wrapped in a storage of that dtype (`=> storage`) or returned as it is
/// (`=> value`); any other combination of dtypes is the error `$err`.
macro_rules! on_float_storages {
    (storage, ($($s:expr),+), |$($v:ident),+| $body:expr, $err:expr) => {
        match ($($s),+) {
            ($(candle_core::CpuStorage::F32($v)),+) => candle_core::CpuStorage::F32($body),
            ($(candle_core::CpuStorage::BF16($v)),+) => candle_core::CpuStorage::BF16($body),
            ($(candle_core::CpuStorage::F16($v)),+) => candle_core::CpuStorage::F16($body),
            _ => candle_core::bail!("{}", $err),
        }
    };
    (value, ($($s:expr),+), |$($v:ident),+| $body:expr, $err:expr) => {
        match ($($s),+) {
            ($(candle_core::CpuStorage::F32($v)),+) => $body,
            ($(candle_core::CpuStorage::BF16($v)),+) => $body,
            ($(candle_core::CpuStorage::F16($v)),+) => $body,
            _ => candle_core::bail!("{}", $err),
        }
    };
}
pub(crate) use on_float_storages;
