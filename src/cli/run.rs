//! `pipe run`: runs the stale stages of one pipeline and writes its run record; a pipeline with a sweep
//! runs its base configuration unless `--sweep` (or a multi-valued `--set`) asks for every point.

use super::common::{gpu_pool, load, print_json, with_remote, PipelineArgs, RemoteArg};
use super::{process, sweep, Exit};
use crate::engine::runner::{self, Engine, RunOptions, RunRecord};
use crate::engine::slurm::{self, DriverOptions, ExecutorKind};
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
    /// Sweep points (or, without a sweep, independent stages) to run at once; compute stages wait
    /// for GPUs of their own (see `--gpus`).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// GPU ordinals stages may compute on, e.g. `0,1,2,3` (default: `[executor] gpus`, else every
    /// GPU this process sees). Local executor only: Slurm gives each job its GPUs.
    #[arg(long, value_name = "N,N,…")]
    pub gpus: Option<String>,
    /// Where stale stages run: `local` (this process) or `slurm` (one sbatch job per stage);
    /// default `[executor] kind`, else local.
    #[arg(long, value_name = "local|slurm")]
    pub executor: Option<ExecutorKind>,
    /// With the Slurm executor: return once the jobs are submitted (`pipe status` follows them).
    #[arg(long)]
    pub detach: bool,
    #[command(flatten)]
    pub remote: RemoteArg,
}

pub fn run(args: Args, registry: &[Box<dyn Stage>], quiet: bool) -> Result<(), Exit> {
    let Args { p, force, until, dry_run, json, sweep, jobs, gpus, executor, detach, remote } = args;
    let pipeline = with_remote(load(&p, registry)?, remote.remote)?;
    let multi = pipeline
        .sweep
        .as_ref()
        .is_some_and(|s| s.grid.iter().any(|(k, _)| p.sets.iter().any(|x| x.starts_with(&format!("{k}=")))));
    let on_slurm = executor.unwrap_or(pipeline.executor.kind) == ExecutorKind::Slurm && !dry_run;
    if detach && !on_slurm {
        return Err(Exit::usage(anyhow::anyhow!(
            "--detach needs the Slurm executor: add `--executor slurm` or `[executor] kind = \"slurm\"` to {}",
            p.file.display()
        )));
    }
    if on_slurm && gpus.is_some() {
        return Err(Exit::usage(anyhow::anyhow!(
            "--gpus is for the local executor; under Slurm each job gets its GPUs from `[stages.<id>.resources] gpus` in {}",
            p.file.display()
        )));
    }
    let driver = on_slurm.then(|| driver_options(detach, quiet || json)).transpose()?;
    if sweep || multi {
        return match driver {
            Some(d) => sweep::run_points_slurm(&pipeline, &p.file, registry, &d, json),
            None => {
                let pool = gpu_pool(&pipeline, gpus.as_deref(), registry)?;
                sweep::run_points(&pipeline, &p.file, registry, jobs, pool, json, quiet)
            }
        };
    }
    if let (Some(_), false) = (&pipeline.sweep, quiet || json) {
        eprintln!(
            "pipe: {} defines a sweep; this runs its base configuration only (add --sweep for every point)",
            p.file.display()
        );
    }
    let engine = Engine::new(&pipeline, registry)?;
    process::install_interrupt_handler();
    let mut opts = RunOptions { force, until, dry_run, quiet: quiet || json, jobs, ..Default::default() };
    let record = match driver {
        None => {
            opts.gpus = Some(gpu_pool(&pipeline, gpus.as_deref(), registry)?);
            engine.run(&opts)?
        }
        Some(d) => {
            let run_id = format!("{}-{}", crate::engine::time::compact_now(), std::process::id());
            opts.run_dir = Some(engine.store.root.join("runs").join(&pipeline.name).join(run_id));
            let targets = [slurm::Target { engine: &engine, opts }];
            let outcome = slurm::run(&targets, &d).map_err(slurm_exit)?;
            if d.detach {
                return detached(&pipeline.name, &outcome.jobs, json, quiet);
            }
            outcome.records.into_iter().next().expect("one target, one record")
        }
    };
    print_record(&record, json, quiet)
}

/// The Slurm driver's settings for this process.
pub(super) fn driver_options(detach: bool, quiet: bool) -> Result<DriverOptions, Exit> {
    let exe = std::env::current_exe().map_err(|e| Exit::failed(anyhow::anyhow!("cannot find the pipe binary: {e}")))?;
    let cwd = std::env::current_dir().map_err(|e| Exit::failed(anyhow::anyhow!("no working directory: {e}")))?;
    Ok(DriverOptions { detach, quiet, exe, cwd, poll: std::time::Duration::from_millis(1000) })
}

pub(super) fn slurm_exit(e: slurm::SlurmError) -> Exit {
    match e {
        slurm::SlurmError::Engine(e) => e.into(),
        other => Exit::failed(other),
    }
}

/// `--detach`: the jobs as submitted; the run record is written by a later `pipe run`.
fn detached(pipeline: &str, jobs: &[slurm::SubmittedJob], json: bool, quiet: bool) -> Result<(), Exit> {
    if json {
        print_json(&serde_json::json!({ "pipeline": pipeline, "status": "submitted", "jobs": jobs }));
    } else if !quiet {
        eprintln!(
            "pipe: {} job(s) submitted; `pipe status` follows them, `pipe run` again collects the run record",
            jobs.len()
        );
    }
    Ok(())
}

fn print_record(record: &RunRecord, json: bool, quiet: bool) -> Result<(), Exit> {
    if json {
        let stages: Vec<serde_json::Value> = record
            .stages
            .iter()
            .map(|s| {
                let mut v = serde_json::json!({
                    "id": s.id, "kind": s.kind, "status": s.status, "key": s.key,
                    "seconds": s.seconds, "dir": s.dir, "reason": s.reason, "gpus": s.gpus,
                    "warning": s.warning,
                });
                if let Some(j) = s.slurm_job {
                    v["slurm_job"] = j.into();
                }
                v
            })
            .collect();
        print_json(&serde_json::json!({
            "pipeline": record.pipeline,
            "run_dir": record.run_dir,
            "status": record.status,
            "stages": stages,
        }));
    } else if !quiet {
        eprintln!("{}", runner::summary(record));
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
