//! `pipe exec` (internal, hidden from the help): what a Slurm job runs. Computes one stage of a
//! pipeline, loaded with the same overrides as the `pipe run` that submitted it, against the shared
//! store where its upstream jobs left their artifacts, through the runner's ordinary path (cache
//! check, per-key lock, temp dir, atomic publish, checkpoints in the store's scratch dir).

use std::path::PathBuf;

use super::common::{load, with_remote, PipelineArgs};
use super::{process, Exit};
use crate::engine::runner::{Engine, Status};
use crate::engine::Stage;
use crate::util::fs::write_atomic;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The pipeline file (TOML).
    #[arg(long)]
    pub pipeline: PathBuf,
    /// The stage to compute.
    #[arg(long)]
    pub stage: String,
    /// The same `--set` overrides as the submitting run.
    #[arg(long = "set", value_name = "STAGE.PARAM=VALUE")]
    pub sets: Vec<String>,
    /// Recompute even if the artifact exists.
    #[arg(long)]
    pub force: bool,
    /// Write `{"status": "ran"|"cached", …}` here (`%j`: the Slurm job id), so that the submitting run
    /// can tell a stage its job computed from one the job found already stored.
    #[arg(long, value_name = "PATH")]
    pub outcome: Option<String>,
    /// The submitting run's remote store (its `--remote`, else the file's `[pipeline] remote`): the job
    /// fetches the stage from it when it is there and uploads what it computes.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
}

pub fn run(args: Args, registry: &[Box<dyn Stage>], quiet: bool) -> Result<(), Exit> {
    let p = PipelineArgs { file: args.pipeline, sets: args.sets };
    let pipeline = with_remote(load(&p, registry)?, args.remote)?;
    let engine = Engine::new(&pipeline, registry)?;
    process::install_interrupt_handler();
    if !quiet {
        eprintln!("pipe exec: stage {} of {} ({})", args.stage, pipeline.name, p.file.display());
    }
    let rec = engine.run_stage(&args.stage, args.force, quiet)?;
    if let Some(pattern) = &args.outcome {
        let job = std::env::var("SLURM_JOB_ID").unwrap_or_else(|_| "local".into());
        let path = PathBuf::from(pattern.replace("%j", &job));
        let v = serde_json::json!({ "stage": rec.id, "status": rec.status, "key": rec.key, "seconds": rec.seconds });
        if let Err(e) = write_atomic(&path, &serde_json::to_vec(&v).expect("serializes")) {
            eprintln!("pipe exec: cannot write {}: {e}", path.display());
        }
    }
    match rec.status {
        Status::Failed => Err(Exit::failed(anyhow::anyhow!(
            "stage `{}` ({}) failed: {}",
            rec.id,
            rec.kind,
            rec.reason.as_deref().unwrap_or("")
        ))),
        st => {
            if !quiet {
                eprintln!(
                    "pipe exec: {} {} {:.2}s {}",
                    rec.id,
                    st.as_str(),
                    rec.seconds,
                    rec.dir.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}
