//! The `device` and `dtype` parameters shared by every stage that computes (train, evaluate,
//! rerank), parsed in one place so that they mean the same thing everywhere.
//!
//! `device`: `auto` picks CUDA device 0 when pipe was built with the `cuda` feature and a GPU
//! answers, the CPU otherwise; `cpu`; `cuda` (= `cuda:0`); `cuda:N`. Asking for CUDA from a build
//! without the feature is an error that says how to rebuild, never a silent fall back to the CPU.
//! `dtype`: `f32`, `bf16`, `f16` (also the long names `float32`, `bfloat16`, `float16`).

use candle_core::{DType, Device};

use super::ModelError;

/// A parsed `device` parameter, before any device is opened (so that config checks are cheap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        let bad = || {
            ModelError::Config(format!("device `{s}` is not one of `auto`, `cpu`, `cuda`, `cuda:N` (N = GPU index)"))
        };
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse::<usize>().map(Self::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl DeviceSpec {
    /// Whether this build can compute on the device at all (CUDA is a compile-time feature), without
    /// opening it: cheap enough for the check when a pipeline is loaded, so a CPU-only build refuses
    /// `cuda` before any stage runs. Whether the GPU answers is only known by [`DeviceSpec::open`].
    pub fn available(self) -> Result<(), ModelError> {
        match self {
            Self::Cuda(_) if !candle_core::utils::cuda_is_available() => Err(ModelError::Config(
                "device `cuda` requested but this pipe was built without CUDA support; rebuild with \
                 `cargo build --release --features cuda`, or set device = \"cpu\""
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// Opens the device. `auto` never fails: a CUDA build whose GPU cannot be opened runs on the CPU.
    pub fn open(self) -> Result<Device, ModelError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(tuned(d));
                    }
                }
                Ok(Device::Cpu)
            }
            Self::Cuda(n) => {
                self.available()?;
                Device::new_cuda(n)
                    .map(tuned)
                    .map_err(|e| ModelError::Config(format!("cannot open CUDA device {n}: {e}")))
            }
        }
    }
}

/// Settings that make candle's CUDA allocations cheap for a training loop, applied once per device
/// when it is opened.
///
/// - The stream-ordered memory pool (`cuMemAllocAsync`, which candle uses) returns freed memory
///   to the driver at every synchronisation unless told to keep it; a training step synchronises
///   (to read its loss) and then allocates the same buffers again, each a fresh mapping. Keeping
///   the memory pooled makes those allocations cheap; the memory is still reused within the pool.
/// - Per-tensor CUDA events (cudarc's cross-stream tracking: two events per allocation, records on
///   every launch) are not needed: everything `pipe` runs on a device uses that device's one
///   stream, in order.
fn tuned(d: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(c) = &d {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        let stream = c.cuda_stream();
        let ctx = stream.context();
        // SAFETY: the pool is the device's default one, alive as long as the context; the value
        // is a u64 as CU_MEMPOOL_ATTR_RELEASE_THRESHOLD requires. Failure only loses the speed-up.
        unsafe {
            if let Ok(pool) = result::device::get_default_mem_pool(ctx.cu_device()) {
                let mut keep = u64::MAX;
                let _ = result::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut keep as *mut u64 as *mut std::ffi::c_void,
                );
            }
            // SAFETY: see above — one stream per device, so no cross-stream hazards to track.
            c.disable_event_tracking();
        }
    }
    d
}

/// What a `device` parameter computes on here — `cpu` or `cuda` — for cache keys: results differ in
/// the last bits between the two, so `device = "auto"` must not let a CPU run reuse a GPU artifact.
/// An unparsable spec yields the spec itself (config checks reject it before any key is made).
pub fn compute_identity(spec: &str) -> String {
    match spec.parse::<DeviceSpec>() {
        Ok(DeviceSpec::Cpu) => "compute:cpu".into(),
        Ok(DeviceSpec::Cuda(_)) => "compute:cuda".into(),
        Ok(DeviceSpec::Auto) if candle_core::utils::cuda_is_available() => "compute:cuda".into(),
        Ok(DeviceSpec::Auto) => "compute:cpu".into(),
        Err(_) => format!("compute:{spec}"),
    }
}

/// How many GPUs the CUDA driver shows this process: `None` in a build without CUDA; 0 when the
/// driver does not answer (no GPU, or the link-time stub).
pub fn cuda_device_count() -> Option<usize> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        Some(CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0))
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// Parses and opens a `device` parameter in one step.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    spec.parse::<DeviceSpec>()?.open()
}

/// A short name for logs and stats: `cpu`, `cuda:0`.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

/// What the model card and manifest call the hardware: the device alone does not say how fast a
/// run should have been (`cuda:0` on an H100 or a T4, `cpu` on 2 cores or 64). Best effort: the GPU's
/// name from `nvidia-smi` where it answers, the CPU's model from `/proc/cpuinfo` and the threads used.
pub fn hardware(device: &Device) -> String {
    let cpu = cpu_model().unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    match device {
        Device::Cuda(_) => {
            let id = match device.location() {
                candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
                _ => 0,
            };
            let gpu = std::process::Command::new("nvidia-smi")
                .args(["--query-gpu=name", "--format=csv,noheader", "-i", &id.to_string()])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "an NVIDIA GPU".into());
            format!("{gpu} (cuda:{id}), host CPU {cpu}")
        }
        _ => format!("{cpu}, {threads} threads"),
    }
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// Parses a `dtype` parameter (floating point only).
pub fn parse_dtype(spec: &str) -> Result<DType, ModelError> {
    match spec.trim() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(ModelError::UnsupportedDtype(format!("{other} (expected f32, bf16 or f16)"))),
    }
}

/// The short name [`parse_dtype`] accepts.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn compute_identity_resolves_auto() {
        assert_eq!(super::compute_identity("cpu"), "compute:cpu");
        assert_eq!(super::compute_identity("cuda:1"), "compute:cuda");
        let auto = if candle_core::utils::cuda_is_available() { "compute:cuda" } else { "compute:cpu" };
        assert_eq!(super::compute_identity("auto"), auto);
    }

    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        for bad in ["", "cuda:", "cuda:x", "tpu", "cuda:-1"] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        // Without the feature, `auto` is the CPU and an explicit `cuda` is an actionable error.
        if !candle_core::utils::cuda_is_available() {
            assert!(matches!(parse_device("auto").unwrap(), Device::Cpu));
            assert!(parse_device("cuda").unwrap_err().to_string().contains("--features cuda"));
            assert!(DeviceSpec::Cuda(1).available().unwrap_err().to_string().contains("--features cuda"));
        }
        assert!(DeviceSpec::Auto.available().is_ok() && DeviceSpec::Cpu.available().is_ok());
    }

    #[test]
    fn parses_dtypes() {
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("float16").unwrap(), DType::F16);
        assert_eq!(parse_dtype("f32").unwrap(), DType::F32);
        assert!(parse_dtype("f64").is_err());
        for d in [DType::F32, DType::BF16, DType::F16] {
            assert_eq!(parse_dtype(dtype_name(d)).unwrap(), d);
        }
    }
}
