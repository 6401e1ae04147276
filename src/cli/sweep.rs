//! `pipe sweep` and `pipe run --sweep`: runs every point of a pipeline's sweep grid, each point its own
//! run, and writes the sweep's report page. One implementation for both spellings.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::common::{gpu_pool, load, print_json, PipelineArgs};
use super::{process, Exit};
use crate::engine::config::Pipeline;
use crate::engine::slots::GpuPool;
use crate::engine::Stage;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub p: PipelineArgs,
    /// Points to run at once; their compute stages wait for GPUs of their own.
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// GPU ordinals stages may compute on, e.g. `0,1,2,3` (default: `[executor] gpus`, else every
    /// GPU this process sees).
    #[arg(long, value_name = "N,N,…")]
    pub gpus: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, registry: &[Box<dyn Stage>], quiet: bool) -> Result<(), Exit> {
    let pipeline = load(&args.p, registry)?;
    if pipeline.executor.kind == crate::engine::executor::ExecutorKind::Slurm {
        let d = super::run::driver_options(false, quiet || args.json)?;
        return run_points_slurm(&pipeline, &args.p.file, registry, &d, args.json);
    }
    let pool = gpu_pool(&pipeline, args.gpus.as_deref(), registry)?;
    run_points(&pipeline, &args.p.file, registry, args.jobs, pool, args.json, quiet)
}

/// Runs the sweep of `pipeline`, loaded from `file` (named in messages), `jobs` points at a time,
/// their compute stages on the GPUs of `pool`.
pub(super) fn run_points(
    pipeline: &Pipeline,
    file: &Path,
    registry: &[Box<dyn Stage>],
    jobs: usize,
    pool: Arc<GpuPool>,
    json: bool,
    quiet: bool,
) -> Result<(), Exit> {
    if pipeline.sweep.is_none() {
        return Err(Exit::usage(anyhow::anyhow!(
            "{}: `sweep`: the pipeline defines no sweep; add `[sweep.grid]` or pass `--set stage.param=a,b`",
            file.display()
        )));
    }
    process::install_interrupt_handler();
    let report = crate::engine::sweep::run_sweep(pipeline, registry, jobs.max(1), quiet || json, Some(pool))?;
    finish(report, json, quiet)
}

/// [`run_points`] through Slurm: each point's stale stages are jobs.
pub(super) fn run_points_slurm(
    pipeline: &Pipeline,
    file: &Path,
    registry: &[Box<dyn Stage>],
    d: &crate::engine::slurm::DriverOptions,
    json: bool,
) -> Result<(), Exit> {
    if pipeline.sweep.is_none() {
        return Err(Exit::usage(anyhow::anyhow!(
            "{}: `sweep`: the pipeline defines no sweep; add `[sweep.grid]` or pass `--set stage.param=a,b`",
            file.display()
        )));
    }
    process::install_interrupt_handler();
    let (report, _) = crate::engine::sweep::run_sweep_slurm(pipeline, registry, d).map_err(super::run::slurm_exit)?;
    if d.detach {
        if json {
            print_json(&report);
        }
        return Ok(());
    }
    finish(report, json, d.quiet)
}

fn finish(report: crate::engine::sweep::SweepReport, json: bool, quiet: bool) -> Result<(), Exit> {
    // A sweep's own report page: the sweep table and one chart per swept parameter and metric.
    let sweep_dir = PathBuf::from(&report.sweep_dir);
    if let Ok(runs) = crate::engine::compare::find_runs(std::slice::from_ref(&sweep_dir)) {
        let mut page = crate::report::html::Page::new(format!("pipe sweep {}", report.sweep_id));
        page.raw(&crate::report::sweep::sweep_section(&runs));
        let _ = std::fs::write(sweep_dir.join("report.html"), page.finish());
    }
    if json {
        print_json(&report);
    } else if !quiet {
        for pt in &report.points {
            eprintln!("  {:<7} {}  {}", pt.status, pt.name, pt.error.as_deref().unwrap_or(""));
        }
        eprintln!(
            "pipe: sweep {} — compare with `pipe compare {}`; report: {}",
            report.status,
            report.sweep_dir,
            sweep_dir.join("report.html").display()
        );
    }
    if report.status != "ok" {
        return Err(Exit::failed(anyhow::anyhow!("sweep {}: some points failed", report.sweep_id)));
    }
    Ok(())
}
