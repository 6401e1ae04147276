//! The command line: parses it and hands each command to its own module. The only place that uses anyhow
//! and decides exit codes: 0 ok, 1 a stage (or a check) failed, 2 usage or configuration error.
//!
//! One file per command holds that command's arguments and body, so a command reads top to bottom in one
//! place and adding one touches this file only to name it; what several commands share (loading a
//! pipeline, finding the store, printing) lives in `common`, the process setup in `process`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod bench;
mod common;
pub mod config;
pub mod dag;
pub mod gc;
mod process;
pub mod rerank;
pub mod show;
pub mod status;
pub mod verify;
pub mod why;

pub use common::PipelineArgs;

use crate::engine::config::ConfigError;
use crate::engine::runner::{self, Engine, EngineError, RunOptions};
use crate::engine::Stage;

#[derive(Parser, Debug)]
#[command(name = "pipe", version, about = "Declarative, cached, resumable ML pipelines", long_about = None)]
pub struct Cli {
    /// No progress output on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the stale stages of a pipeline in dependency order.
    Run {
        #[command(flatten)]
        p: PipelineArgs,
        /// Rerun this stage even if cached (repeatable).
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Run only this stage and what it needs.
        #[arg(long, value_name = "STAGE")]
        until: Option<String>,
        /// Show what would run, run nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print exactly one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Run every point of the pipeline's `[sweep]` (implied by multi-valued `--set a.b=1,2`).
        #[arg(long)]
        sweep: bool,
        /// Sweep points to run at once (independent CPU work; one GPU wants 1).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
    },
    /// Run every point of the pipeline's sweep (same as `pipe run FILE --sweep`).
    Sweep {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        #[arg(long)]
        json: bool,
    },
    /// Put runs side by side: run dirs, sweep dirs, or any directories holding run records.
    Compare {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Sort rows by this metric (best first).
        #[arg(long)]
        sort: Option<String>,
        /// Metric columns, comma-separated (suffixes of `<stage>.<metric>` names).
        #[arg(long, value_delimiter = ',')]
        metrics: Option<Vec<String>>,
        #[arg(long, value_enum, default_value = "table")]
        format: CompareFormat,
        /// Also draw each metric against each swept numeric parameter into this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// Score a predictions CSV (`query,relevance,score[,label]`) with the ranking and classification metrics.
    Metrics {
        file: PathBuf,
        /// Cutoffs for NDCG@K and P@K.
        #[arg(long, value_delimiter = ',', default_value = "1,3,5,10")]
        k: Vec<usize>,
        /// Decision threshold on the score for accuracy/precision/recall/F1.
        #[arg(long, default_value_t = 0.5)]
        threshold: f64,
        /// NDCG gain: `linear` (relevance − 1) or `exp` (2^(relevance − 1) − 1).
        #[arg(long, default_value = "linear")]
        gain: String,
        /// Validation predictions: calibrate RMSE and tune the threshold there, report on FILE.
        #[arg(long)]
        val: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Device measurements (parity with the CPU, training-step speed); one JSON line each.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Rank documents for a query with a Qwen3 reranker (P(yes) per document).
    Rerank(rerank::RerankArgs),
    /// Which stages are fresh or stale, and why.
    Status(status::Args),
    /// Why one stage would run.
    Why(why::Args),
    /// Print the stage graph.
    Dag(dag::Args),
    /// Print the resolved configuration (every default filled in) as TOML.
    Config(config::Args),
    /// Print a stage's artifact directory and manifest.
    Show(show::Args),
    /// Re-hash every artifact in the store and report those that no longer match their manifest.
    Verify(verify::Args),
    /// Remove artifacts that no kept run record references.
    Gc(gc::Args),
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum CompareFormat {
    Table,
    Markdown,
    Csv,
    Json,
}

/// An error that carries its exit code.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Exit {
    /// Exit code 1: a stage, a check or the file system failed.
    pub fn failed(error: impl Into<anyhow::Error>) -> Self {
        Exit { code: 1, error: error.into() }
    }

    /// Exit code 2: the command line or the configuration is wrong; nothing ran.
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Exit { code: 2, error: error.into() }
    }
}

impl From<ConfigError> for Exit {
    fn from(e: ConfigError) -> Self {
        Exit::usage(e)
    }
}

impl From<EngineError> for Exit {
    fn from(e: EngineError) -> Self {
        let code = match e {
            EngineError::Config(_) | EngineError::Usage(_) => 2,
            EngineError::Store(_) => 1,
        };
        Exit { code, error: e.into() }
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli, registry: &[Box<dyn Stage>]) -> Result<(), Exit> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Sweep { p, jobs, json } => run_sweep(&p, registry, jobs, json, quiet),
        Command::Run { p, force, until, dry_run, json, sweep, jobs } => {
            let pipeline = common::load(&p, registry)?;
            let multi = pipeline
                .sweep
                .as_ref()
                .is_some_and(|s| s.grid.iter().any(|(k, _)| p.sets.iter().any(|x| x.starts_with(&format!("{k}=")))));
            if sweep || multi {
                return run_sweep(&p, registry, jobs, json, quiet);
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
                            "seconds": s.seconds, "dir": s.dir, "reason": s.reason,
                        })
                    })
                    .collect();
                let out = serde_json::json!({
                    "pipeline": record.pipeline,
                    "run_dir": record.run_dir,
                    "status": record.status,
                    "stages": stages,
                });
                println!("{out}");
            } else if !quiet {
                eprintln!("{}", runner::summary(&record));
            }
            if record.status == "failed" {
                let failed = record.stages.iter().find(|s| s.status == runner::Status::Failed);
                let msg = failed
                    .map(|s| format!("stage `{}` ({}) failed: {}", s.id, s.kind, s.reason.as_deref().unwrap_or("")))
                    .unwrap_or_else(|| "a stage failed".into());
                return Err(Exit { code: 1, error: anyhow::anyhow!(msg) });
            }
            Ok(())
        }
        Command::Compare { paths, sort, metrics, format, plot } => {
            compare(&paths, sort.as_deref(), metrics.as_deref(), format, plot.as_deref())
        }
        Command::Metrics { file, k, threshold, gain, val, json } => metrics_cmd(&file, k, threshold, &gain, val, json),
        Command::Bench(cmd) => bench::run(cmd).map_err(Exit::failed),
        Command::Rerank(args) => rerank::run(args).map_err(Exit::failed),
        Command::Status(args) => status::run(args, registry),
        Command::Why(args) => why::run(args, registry),
        Command::Dag(args) => dag::run(args, registry),
        Command::Config(args) => config::run(args, registry),
        Command::Show(args) => show::run(args, registry),
        Command::Verify(args) => verify::run(args, registry),
        Command::Gc(args) => gc::run(args, registry),
    }
}

fn run_sweep(p: &PipelineArgs, registry: &[Box<dyn Stage>], jobs: usize, json: bool, quiet: bool) -> Result<(), Exit> {
    let pipeline = common::load(p, registry)?;
    if pipeline.sweep.is_none() {
        return Err(Exit {
            code: 2,
            error: anyhow::anyhow!(
                "{}: `sweep`: the pipeline defines no sweep; add `[sweep.grid]` or pass `--set stage.param=a,b`",
                p.file.display()
            ),
        });
    }
    process::install_interrupt_handler();
    let report = crate::engine::sweep::run_sweep(&pipeline, registry, jobs.max(1), quiet || json)?;
    // A sweep's own report page: the sweep table and one chart per swept parameter and metric.
    let sweep_dir = PathBuf::from(&report.sweep_dir);
    if let Ok(runs) = crate::engine::compare::find_runs(std::slice::from_ref(&sweep_dir)) {
        let mut page = crate::report::html::Page::new(format!("pipe sweep {}", report.sweep_id));
        page.raw(&crate::report::sweep::sweep_section(&runs));
        let _ = std::fs::write(sweep_dir.join("report.html"), page.finish());
    }
    if json {
        println!("{}", serde_json::to_string(&report).expect("report serializes"));
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
        return Err(Exit { code: 1, error: anyhow::anyhow!("sweep {}: some points failed", report.sweep_id) });
    }
    Ok(())
}

fn compare(
    paths: &[PathBuf],
    sort: Option<&str>,
    metrics: Option<&[String]>,
    format: CompareFormat,
    plot: Option<&std::path::Path>,
) -> Result<(), Exit> {
    use crate::engine::compare;
    let bad = |e: compare::CompareError| Exit { code: 2, error: e.into() };
    let runs = compare::find_runs(paths).map_err(bad)?;
    let c = compare::build(runs, metrics, sort, paths.len()).map_err(bad)?;
    let f = match format {
        CompareFormat::Table => compare::Format::Table,
        CompareFormat::Markdown => compare::Format::Markdown,
        CompareFormat::Csv => compare::Format::Csv,
        CompareFormat::Json => compare::Format::Json,
    };
    print!("{}", c.render(f));
    if let Some(path) = plot {
        let charts = crate::report::sweep::sweep_charts(&c);
        if charts.is_empty() {
            return Err(Exit {
                code: 2,
                error: anyhow::anyhow!(
                    "--plot {}: nothing to draw: no numeric parameter varies between these runs, or they have no metrics",
                    path.display()
                ),
            });
        }
        std::fs::write(path, crate::report::sweep::stacked_svg(&charts))
            .map_err(|e| Exit { code: 1, error: anyhow::anyhow!("{}: {e}", path.display()) })?;
        eprintln!("pipe: {} chart(s) written to {}", charts.len(), path.display());
    }
    Ok(())
}

fn metrics_cmd(
    file: &std::path::Path,
    k: Vec<usize>,
    threshold: f64,
    gain: &str,
    val: Option<PathBuf>,
    json: bool,
) -> Result<(), Exit> {
    use crate::metrics;
    let bad = |e: metrics::ReadError| Exit { code: 2, error: e.into() };
    let invalid = |e: metrics::MetricsError| Exit { code: 2, error: e.into() };
    let gain = match gain {
        "linear" => metrics::Gain::Linear,
        "exp" => metrics::Gain::Exp,
        other => return Err(Exit { code: 2, error: anyhow::anyhow!("--gain {other}: expected `linear` or `exp`") }),
    };
    let opts = metrics::Options { ks: k, threshold, gain, ..Default::default() };
    let rows = metrics::read_predictions(file).map_err(bad)?;
    match val {
        None => {
            let m = metrics::compute(&rows, &opts).map_err(invalid)?;
            if json {
                println!("{}", serde_json::to_string(&m).expect("metrics serialize"));
            } else {
                print!("{}", metrics::render_table(&[(&file.display().to_string(), &m)]));
                println!(
                    "note: rmse is calibrated on these same rows (in-sample); pass --val VAL.csv for a held-out figure"
                );
            }
        }
        Some(v) => {
            let val_rows = metrics::read_predictions(&v).map_err(bad)?;
            let s = metrics::evaluate_split(&val_rows, &rows, &opts).map_err(invalid)?;
            if json {
                println!("{}", serde_json::to_string(&s.test).expect("metrics serialize"));
            } else {
                print!("{}", metrics::render_table(&[("val", &s.val), ("test", &s.test)]));
                if let Some(t) = &s.tuned {
                    println!("threshold tuned on val: {:.4} (val F1 {:.4})", t.threshold, t.val_f1);
                }
            }
        }
    }
    Ok(())
}

/// Entry point used by `main.rs`.
pub fn main_with(registry: &[Box<dyn Stage>]) -> ExitCode {
    let cli = Cli::parse();
    process::init_tracing(cli.quiet);
    match run(cli, registry) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {:#}", e.error);
            ExitCode::from(e.code)
        }
    }
}
