//! Stage kinds. Each is one module behind [`crate::engine::Stage`]; `registry` lists them.
//!
//! The data stages hand each other CSV tables in the format of [`table`]:
//! `load` (raw files → table) → `normalize` (canonical text) → `split` (train/val/test + labels)
//! → optionally `mine` (hard negatives appended to train).

use crate::engine::{GpuDemand, ParamError, Stage};
use crate::model::device::DeviceSpec;
use crate::model::ModelError;

pub mod analyze;
pub mod evaluate;
pub mod export;
pub mod hub;
pub mod load;
pub mod mine;
pub mod normalize;
pub mod split;
pub mod table;
pub mod tokenize;
pub mod train;

#[cfg(test)]
mod tests;

/// The `device` and `dtype` parameters of every stage that runs the model, checked alike so that one
/// mistake reads the same in each.
pub(crate) fn check_device_and_dtype(device: &str, dtype: &str) -> Result<(), ParamError> {
    if device.parse::<DeviceSpec>().is_err() {
        return Err(ParamError::new("device", format!("expected auto, cpu, cuda or cuda:N, found {device:?}")));
    }
    if crate::model::device::parse_dtype(dtype).is_err() {
        return Err(ParamError::new("dtype", format!("expected f32, bf16 or f16, found {dtype:?}")));
    }
    Ok(())
}

/// The `device` parameter of a stage that computes, against what this build can compute on (the
/// shared half of `train`'s and `evaluate`'s [`crate::engine::TypedStage::available`]).
fn device_available(spec: &str) -> Result<(), ParamError> {
    spec.parse::<DeviceSpec>().and_then(DeviceSpec::available).map_err(|e| match e {
        ModelError::Config(message) => ParamError::new("device", message),
        other => ParamError::new("device", other),
    })
}

/// How many GPU slots a `device` parameter takes (train and evaluate share it): `cuda` takes
/// `gpus_per_stage` of the run's GPUs; `auto` does in a CUDA build, and runs on the CPU when the
/// run has no GPU; `cuda:N` is the user's choice and stays on N (holding N's slot when the run
/// manages N); `cpu` takes none.
fn device_gpus(spec: &str) -> GpuDemand {
    match spec.trim() {
        "cuda" | "gpu" => GpuDemand::Slots { optional: false },
        "auto" if candle_core::utils::cuda_is_available() => GpuDemand::Slots { optional: true },
        other => match other.parse::<DeviceSpec>() {
            Ok(DeviceSpec::Cuda(n)) => GpuDemand::Pinned(n),
            _ => GpuDemand::None,
        },
    }
}

/// The device a stage opens: the first GPU the runner assigned for `cuda` and `auto` (`auto` still
/// falls back to the CPU when it cannot be opened), else the parameter as written (`cuda:N` is
/// never moved).
fn open_device(spec: &str, gpus: &[usize]) -> Result<candle_core::Device, ModelError> {
    let parsed = spec.parse::<DeviceSpec>()?;
    match (device_gpus(spec), gpus.first()) {
        (GpuDemand::Slots { optional: true }, Some(&g)) => {
            Ok(DeviceSpec::Cuda(g).open().unwrap_or(candle_core::Device::Cpu))
        }
        (GpuDemand::Slots { optional: false }, Some(&g)) => DeviceSpec::Cuda(g).open(),
        _ => parsed.open(),
    }
}

/// `device = "cuda:3"` hashes as `cuda`: which GPU computed an artifact does not change it, so a
/// run on GPU 0 reuses what GPU 3 made. `cpu` and `auto` are kept as written (the key also holds
/// what `auto` resolved to).
fn canonical_device(params: &mut toml::Table) {
    if let Some(toml::Value::String(d)) = params.get_mut("device") {
        if matches!(d.parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(_))) {
            *d = "cuda".into();
        }
    }
}

/// Every stage kind this binary knows, in pipeline order.
pub fn registry() -> Vec<Box<dyn Stage>> {
    vec![
        Box::new(load::Load),
        Box::new(normalize::Normalize),
        Box::new(split::Split),
        Box::new(mine::Mine),
        Box::new(tokenize::Tokenize),
        Box::new(evaluate::Evaluate),
        Box::new(analyze::Analyze),
        Box::new(train::Train),
        Box::new(export::Export),
    ]
}

#[cfg(test)]
mod device_tests {
    use super::*;
    use crate::engine::Params;

    fn with_device(stage: &dyn Stage, device: &str) -> Params {
        let mut t: toml::Table = stage.defaults().parse().unwrap();
        t.insert("device".into(), device.into());
        Params(t)
    }

    #[test]
    fn train_and_evaluate_ask_for_gpus_by_device() {
        let cuda_build = candle_core::utils::cuda_is_available();
        for stage in [&train::Train as &dyn Stage, &evaluate::Evaluate] {
            let demand = |d: &str| stage.gpus(&with_device(stage, d));
            assert_eq!(demand("cpu"), GpuDemand::None);
            assert_eq!(demand("cuda"), GpuDemand::Slots { optional: false });
            assert_eq!(demand("cuda:2"), GpuDemand::Pinned(2));
            let auto = if cuda_build { GpuDemand::Slots { optional: true } } else { GpuDemand::None };
            assert_eq!(demand("auto"), auto);
        }
        // What the rest of the registry computes on never waits for a GPU.
        for stage in registry().iter().filter(|s| !["train", "evaluate"].contains(&s.kind())) {
            let p = Params(stage.defaults().parse().unwrap());
            assert_eq!(stage.gpus(&p), GpuDemand::None, "{}", stage.kind());
        }
    }

    #[test]
    fn the_key_holds_cuda_never_the_ordinal() {
        for stage in [&train::Train as &dyn Stage, &evaluate::Evaluate] {
            let keyed = |d: &str| stage.keyed_params(&with_device(stage, d));
            assert_eq!(keyed("cuda:3"), keyed("cuda"));
            assert_eq!(keyed("cuda:0")["device"].as_str(), Some("cuda"));
            assert_ne!(keyed("cpu"), keyed("cuda"));
            assert_eq!(keyed("auto")["device"].as_str(), Some("auto"), "auto stays as written");
        }
        // `recompute` is still left out of train's key.
        assert!(!train::Train.keyed_params(&with_device(&train::Train, "cpu")).contains_key("recompute"));
    }

    #[test]
    fn a_stage_opens_its_first_assigned_gpu_only_for_cuda_and_auto() {
        assert!(open_device("cpu", &[2]).unwrap().is_cpu(), "cpu ignores assigned GPUs");
        if !candle_core::utils::cuda_is_available() {
            // `cuda` on assigned GPU 2 in a build without CUDA: the error names the device it tried.
            assert!(open_device("cuda", &[2]).is_err());
            assert!(open_device("auto", &[]).unwrap().is_cpu());
        }
        // On a GPU machine: the assigned ordinal is the one opened, and a pinned `cuda:N` stays put.
        if let Some(n) = crate::model::device::cuda_device_count().filter(|n| *n > 0) {
            let name = |spec: &str, gpus: &[usize]| crate::model::device_name(&open_device(spec, gpus).unwrap());
            assert_eq!(name("cuda", &[n - 1]), format!("cuda:{}", n - 1));
            assert_eq!(name("auto", &[n - 1]), format!("cuda:{}", n - 1));
            assert_eq!(name("cuda:0", &[n - 1]), "cuda:0");
            let e = open_device("cuda", &[n]).unwrap_err().to_string();
            assert!(e.contains(&format!("cannot open CUDA device {n}")), "{e}");
        }
    }
}
