//! What the kernels compiled at run time with NVRTC share: how a PTX module is compiled once per
//! process, and the 16-bit float conversions their sources use.
//!
//! Why NVRTC rather than build-time nvcc: the default build must not need CUDA at all, and the CUDA
//! build here has no GPU to test against; compiling at first use keeps the kernel source next to its
//! CPU twin and needs nothing beyond the CUDA libraries the binary already loads.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

/// `F32`, `BF16` and `F16` with `to(x) -> float` and `from(float) -> S` (round to nearest even):
/// 16-bit floats as raw words, so that a source needs no header (NVRTC has none of the CUDA
/// toolkit's on its include path).
pub const FLOAT_TYPES: &str = r#"
typedef unsigned short u16;
struct F32 { typedef float S;
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; } };
struct BF16 { typedef u16 S;
  static __device__ __forceinline__ float to(u16 x) { return __uint_as_float(((unsigned int)x) << 16); }
  static __device__ __forceinline__ u16 from(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16); } };
struct F16 { typedef u16 S;
  static __device__ __forceinline__ float to(u16 h) { float f; asm("{ cvt.f32.f16 %0, %1;}\n" : "=f"(f) : "h"(h)); return f; }
  static __device__ __forceinline__ u16 from(float f) { u16 h; asm("{ cvt.rn.f16.f32 %0, %1;}\n" : "=h"(h) : "f"(f)); return h; } };
"#;

/// `warp_sum` and `warp_max`: a float reduced over the 32 lanes of a warp, every lane getting the result.
pub const WARP_REDUCE: &str = r#"
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
"#;

/// The suffix of a kernel instantiated for `dtype` (`KERNELS(f32, F32)` … in the sources); `what`
/// names the op in the error for other dtypes.
pub fn dtype_suffix(dtype: candle_core::DType, what: &str) -> candle_core::Result<&'static str> {
    use candle_core::DType;
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        other => candle_core::bail!("{what}: {other:?} is not supported (f32, bf16 or f16)"),
    })
}

/// `$run!(T)` for the storage element type of a float dtype: `f32`, `half::bf16`, else `half::f16`
/// (callers have checked the dtype with [`dtype_suffix`] when they loaded the kernel).
macro_rules! for_float_dtype {
    ($dtype:expr, $run:ident) => {
        match $dtype {
            candle_core::DType::F32 => $run!(f32),
            candle_core::DType::BF16 => $run!(half::bf16),
            _ => $run!(half::f16),
        }
    };
}
pub(crate) use for_float_dtype;

/// Options that round like the CPU loops the kernels mirror: no FMA contraction, IEEE division and
/// square root, no flush-to-zero.
pub fn ieee_options() -> CompileOptions {
    CompileOptions {
        fmad: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        ..Default::default()
    }
}

/// The PTX of `source`, compiled on first use and kept in `cell`; `what` names the kernels in the
/// error.
pub fn ptx(
    cell: &'static OnceLock<Result<String, String>>,
    what: &str,
    source: impl FnOnce() -> String,
) -> candle_core::Result<&'static str> {
    cell.get_or_init(|| compile_ptx_with_opts(source(), ieee_options()).map(|p| p.to_src()).map_err(|e| e.to_string()))
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("compiling the {what} with NVRTC: {e}")))
}
