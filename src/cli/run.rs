//! `pipe run`: runs the stale stages of one pipeline and writes its run record; a pipeline with a sweep
//! runs its base configuration unless `--sweep` (or a multi-valued `--set`) asks for every point.

use super::common::{load, print_json, with_remote, PipelineArgs, RemoteArg};
use super::{process, sweep, Exit};
use crate::engine::runner::{self, Engine, RunOptions};
use crate::engine::Stage;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub p: PipelineArgs,
    /// Rerun this stage even if cached (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Run only this stage and what it needs.
    #[arg(long, value_name = "STAGE")]
    pub until: Option<String>,
    /// Show what would run, run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Run every point of the pipeline's `[sweep]` (implied by multi-valued `--set a.b=1,2`).
    #[arg(long)]
    pub sweep: bool,
    /// Sweep points to run at once (independent CPU work; one GPU wants 1).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    #[command(flatten)]
    pub remote: RemoteArg,
}

pub fn run(args: Args, registry: &[Box<dyn Stage>], quiet: bool) -> Result<(), Exit> {
    let Args { p, force, until, dry_run, json, sweep, jobs, remote } = args;
    let pipeline = with_remote(load(&p, registry)?, remote.remote)?;
    let multi = pipeline
        .sweep
        .as_ref()
        .is_some_and(|s| s.grid.iter().any(|(k, _)| p.sets.iter().any(|x| x.starts_with(&format!("{k}=")))));
    if sweep || multi {
        return sweep::run_points(&pipeline, &p.file, registry, jobs, json, quiet);
    }
    if let (Some(_), false) = (&pipeline.sweep, quiet || json) {
        eprintln!(
            "pipe: {} defines a sweep; this runs its base configuration only (add --sweep for every point)",
            p.file.display()
        );
    }
    let engine = Engine::new(&pipeline, registry)?;
    process::install_interrupt_handler();
    let opts = RunOptions { force, until, dry_run, quiet: quiet || json, ..Default::default() };
    let record = engine.run(&opts)?;
    if json {
        let stages: Vec<serde_json::Value> = record
            .stages
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id, "kind": s.kind, "status": s.status, "key": s.key,
                    "seconds": s.seconds, "dir": s.dir, "reason": s.reason, "warning": s.warning,
                })
            })
            .collect();
        print_json(&serde_json::json!({
            "pipeline": record.pipeline,
            "run_dir": record.run_dir,
            "status": record.status,
            "stages": stages,
        }));
    } else if !quiet {
        eprintln!("{}", runner::summary(&record));
    }
    if record.status == "failed" {
        let failed = record.stages.iter().find(|s| s.status == runner::Status::Failed);
        let msg = failed
            .map(|s| format!("stage `{}` ({}) failed: {}", s.id, s.kind, s.reason.as_deref().unwrap_or("")))
            .unwrap_or_else(|| "a stage failed".into());
        return Err(Exit::failed(anyhow::anyhow!(msg)));
    }
    Ok(())
}
