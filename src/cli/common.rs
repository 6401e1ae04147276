//! What several commands share: the pipeline file and its `--set` overrides, finding the artifact store,
//! and printing. One copy here keeps the commands' flags and output alike.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::Exit;
use crate::engine::config::{self, Overrides, Pipeline};
use crate::engine::executor::{self, Visible};
use crate::engine::slots::GpuPool;
use crate::engine::store::Store;
use crate::engine::{GpuDemand, Stage};

#[derive(clap::Args, Debug, Clone)]
pub struct PipelineArgs {
    /// The pipeline file (TOML).
    pub file: PathBuf,
    /// Override a parameter: `--set split.seed=7` (repeatable; beats PIPE_* variables and the file).
    #[arg(long = "set", value_name = "STAGE.PARAM=VALUE")]
    pub sets: Vec<String>,
}

/// The pipeline with every layer applied: stage defaults, the file, `PIPE_*` variables, `--set`.
pub(super) fn load(p: &PipelineArgs, registry: &[Box<dyn Stage>]) -> Result<Pipeline, Exit> {
    Ok(config::load(&p.file, &Overrides::from_env(p.sets.clone()), registry)?)
}

/// The GPU slots of this process: `--gpus` (as typed), else `[executor] gpus`, else every GPU the
/// process sees. A bad list is a usage error (exit 2) before anything runs. The CUDA driver is only
/// asked how many GPUs there are when the answer matters (a list to check, a stage that wants a GPU,
/// a sweep whose points may): a cached CPU run stays as fast as it was.
pub(super) fn gpu_pool(
    pipeline: &Pipeline,
    flag: Option<&str>,
    registry: &[Box<dyn Stage>],
) -> Result<Arc<GpuPool>, Exit> {
    let flag = match flag {
        Some(raw) => {
            Some(executor::parse_gpu_list(raw).map_err(|m| Exit::usage(anyhow::anyhow!("--gpus {raw}: {m}")))?)
        }
        None => None,
    };
    let wants_gpu = pipeline
        .stages
        .iter()
        .any(|s| registry.iter().find(|r| r.kind() == s.kind).is_some_and(|r| r.gpus(&s.params) != GpuDemand::None));
    let probe = || {
        if flag.is_some() || pipeline.executor.gpus.is_some() || wants_gpu || pipeline.sweep.is_some() {
            crate::model::device::cuda_device_count()
        } else {
            None
        }
    };
    let visible = Visible::from_env(&probe).map_err(|m| Exit::usage(anyhow::anyhow!(m)))?;
    let file = pipeline.file.display().to_string();
    let (gpus, _) = executor::resolve_gpus(&pipeline.executor, &file, flag.as_deref(), &visible)?;
    Ok(Arc::new(GpuPool::new(gpus, pipeline.executor.gpus_per_stage, pipeline.executor.stages_per_gpu)))
}

/// `--remote URL` for the commands that talk to the remote store; it replaces `[pipeline] remote`.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoteArg {
    /// The remote artifact store (`s3://bucket/prefix`, `gs://…`, `az://…`, `file:///path`); default
    /// `[pipeline] remote`. Credentials come from the standard AWS_*, GOOGLE_*, AZURE_* variables.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
}

/// The pipeline with `--remote` applied (checked like the file's `[pipeline] remote`).
pub(super) fn with_remote(mut pipeline: Pipeline, remote: Option<String>) -> Result<Pipeline, Exit> {
    if let Some(url) = remote {
        crate::engine::remote::check_url(&url)
            .map_err(|e| Exit::usage(anyhow::anyhow!("--remote: {e}\n  hint: {}", crate::engine::remote::URL_FORMS)))?;
        pipeline.remote = Some(url);
    }
    Ok(pipeline)
}

/// The store `verify` and `gc` work on: `--artifacts`, else the one `--pipeline` names, else ./artifacts.
pub(super) fn store_for(
    artifacts: &Option<PathBuf>,
    pipeline: &Option<PathBuf>,
    registry: &[Box<dyn Stage>],
) -> Result<Store, Exit> {
    if let Some(a) = artifacts {
        return Ok(Store::new(a));
    }
    if let Some(p) = pipeline {
        let pl = config::load(p, &Overrides::default(), registry)?;
        return Ok(Store::new(pl.artifacts));
    }
    Ok(Store::new("artifacts"))
}

/// `--json` output: one compact JSON object on one line of stdout.
pub(super) fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string(value).expect("JSON output serializes"));
}

pub(super) fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}
