//! What several commands share: the pipeline file and its `--set` overrides, finding the artifact store,
//! and printing. One copy here keeps the commands' flags and output alike.

use std::path::PathBuf;

use serde::Serialize;

use super::Exit;
use crate::engine::config::{self, Overrides, Pipeline};
use crate::engine::store::Store;
use crate::engine::Stage;

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
