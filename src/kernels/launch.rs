//! What every kernel module shares on the GPU: how its PTX is compiled (once per process), loaded on
//! a device and launched, and the 16-bit float conversions the sources use.
//!
//! Why NVRTC rather than build-time nvcc: the default build must not need CUDA at all, and the CUDA
//! build here has no GPU to test against; compiling at first use keeps the kernel source next to its
//! CPU twin and needs nothing beyond the CUDA libraries the binary already loads.
//!
//! Why one helper: each kernel module used to carry its own `OnceLock`, compile call, module load,
//! dtype-suffix lookup, launch configuration and argument pushing; the copies drifted (module names,
//! error wording) and were most of the repeated code in the tree.

use std::sync::{Arc, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, LaunchArgs, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Result};

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

/// The dtype suffixes every float kernel is instantiated for, by [`INSTANCES`].
pub const SUFFIXES: [&str; 3] = ["f32", "bf16", "f16"];

/// The last part of a source that defines its kernels in a `KERNELS(NAME, D)` macro: one instance
/// per dtype of [`SUFFIXES`].
pub const INSTANCES: &str = "KERNELS(f32, F32)\nKERNELS(bf16, BF16)\nKERNELS(f16, F16)\n";

/// Threads per block of the grid-stride kernels.
pub const THREADS: u32 = 256;

/// What can go wrong compiling a kernel module or looking a kernel up in it; it reaches candle's
/// callers as a wrapped [`candle_core::Error`].
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("compiling the {what} with NVRTC: {message}")]
    Compile { what: &'static str, message: String },
    #[error("{op}: {dtype:?} is not supported (f32, bf16 or f16)")]
    Dtype { op: String, dtype: DType },
    #[error("the {module} PTX has no kernel `{kernel}`, which src/kernels/ launches")]
    MissingKernel { module: &'static str, kernel: String },
}

impl From<KernelError> for candle_core::Error {
    fn from(e: KernelError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// The suffix of a kernel instantiated for `dtype`; `op` names the op in the error for other dtypes.
pub fn dtype_suffix(dtype: DType, op: &str) -> std::result::Result<&'static str, KernelError> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        dtype => return Err(KernelError::Dtype { op: op.to_string(), dtype }),
    })
}

/// `base` instantiated for every dtype of [`SUFFIXES`], for a module's list of kernel names.
pub fn typed_names(bases: &[&str]) -> Vec<String> {
    bases.iter().flat_map(|b| SUFFIXES.iter().map(move |s| format!("{b}_{s}"))).collect()
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

/// Launches `$func` with `$cfg` and the arguments in order, as a `candle_core::Result`. It expands to
/// the unsafe launch itself, so the caller writes the `unsafe` block and its SAFETY argument: the
/// arguments match the kernel's parameters in order and type, and every index the kernel forms
/// from them stays inside the buffers passed.
macro_rules! launch {
    ($func:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let mut builder = $func.builder();
        $(builder.arg($arg);)*
        candle_core::cuda_backend::WrapErr::w(builder.launch($cfg))
    }};
}
pub(crate) use launch;

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

/// One NVRTC module: its source (the parts in order), compiled on first use and kept for the
/// process, and the names of every kernel its launchers can ask for.
pub struct Module {
    /// The name `pipe bench kernels` reports it under; `pipe_{name}` is the name candle caches the
    /// loaded module under on each device.
    pub name: &'static str,
    /// What its kernels are, for errors.
    pub what: &'static str,
    parts: &'static [&'static str],
    kernels: fn() -> Result<Vec<String>>,
    /// The virtual architecture to compile for, when the source needs more than NVRTC's default
    /// (tensor-core `mma.sync` with bf16 needs `compute_80`).
    arch: Option<&'static str>,
    ptx: OnceLock<std::result::Result<String, String>>,
}

impl Module {
    pub const fn new(
        name: &'static str,
        what: &'static str,
        parts: &'static [&'static str],
        kernels: fn() -> Result<Vec<String>>,
    ) -> Self {
        Self { name, what, parts, kernels, arch: None, ptx: OnceLock::new() }
    }

    /// [`Self::new`] for a source that needs the virtual architecture `arch`, e.g. `compute_80`.
    pub const fn new_for_arch(
        name: &'static str,
        what: &'static str,
        parts: &'static [&'static str],
        kernels: fn() -> Result<Vec<String>>,
        arch: &'static str,
    ) -> Self {
        Self { name, what, parts, kernels, arch: Some(arch), ptx: OnceLock::new() }
    }

    /// The PTX, compiled on the first call with [`ieee_options`].
    pub fn ptx(&self) -> Result<&str> {
        let ptx = self.ptx.get_or_init(|| {
            let options = CompileOptions { arch: self.arch, ..ieee_options() };
            compile_ptx_with_opts(self.parts.concat(), options).map(|p| p.to_src()).map_err(|e| e.to_string())
        });
        match ptx {
            Ok(ptx) => Ok(ptx),
            Err(message) => Err(KernelError::Compile { what: self.what, message: message.clone() }.into()),
        }
    }

    /// Every kernel name the launchers can form.
    pub fn kernels(&self) -> Result<Vec<String>> {
        (self.kernels)()
    }

    /// Compiles the module and finds every kernel of [`Self::kernels`] in the PTX: a name that the
    /// Rust side forms and the source does not define would otherwise fail only on a GPU. Returns
    /// the PTX's size in bytes and the number of kernels checked.
    pub fn check(&self) -> Result<(usize, usize)> {
        let ptx = self.ptx()?;
        let kernels = self.kernels()?;
        for kernel in &kernels {
            if !ptx.contains(&format!(".entry {kernel}(")) {
                return Err(KernelError::MissingKernel { module: self.name, kernel: kernel.clone() }.into());
            }
        }
        Ok((ptx.len(), kernels.len()))
    }

    /// The kernel `kernel` on `dev`'s stream, loading the module on `dev` the first time.
    pub fn kernel(&self, dev: &CudaDevice, kernel: &str) -> Result<Kernel> {
        let func = dev.get_or_load_custom_func(kernel, &format!("pipe_{}", self.name), self.ptx()?)?;
        Ok(Kernel { func: func.into_cuda_function(), stream: dev.cuda_stream() })
    }

    /// The kernel `{base}_{suffix}` for `dtype`; `op` names the op in the error for other dtypes.
    pub fn typed(&self, dev: &CudaDevice, base: &str, dtype: DType, op: &str) -> Result<Kernel> {
        self.kernel(dev, &format!("{base}_{}", dtype_suffix(dtype, op)?))
    }
}

/// A loaded kernel and the stream it launches on (candle's own handle for the pair is not public).
pub struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    /// An empty argument list for one launch; [`launch!`] fills and launches it.
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// A one-dimensional launch of `blocks` blocks of `threads` threads with `shared` bytes of dynamic
/// shared memory.
pub fn grid(blocks: usize, threads: u32, shared: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared as u32 }
}

/// Enough blocks of `per_block` work items for `n` items, at least one and at most `max` (a
/// grid-stride kernel covers the rest).
pub fn blocks(n: usize, per_block: usize, max: usize) -> usize {
    n.div_ceil(per_block).clamp(1, max)
}
