//! The command line: parses it and hands each command to its own module. The only place that uses anyhow
//! and decides exit codes: 0 ok, 1 a stage (or a check) failed, 2 usage or configuration error.
//!
//! One file per command holds that command's arguments and body, so a command reads top to bottom in one
//! place and adding one touches this file only to name it; what several commands share (loading a
//! pipeline, finding the store, printing) lives in `common`, the process setup in `process`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod bench;
mod common;
pub mod compare;
pub mod config;
pub mod dag;
pub mod exec;
pub mod export;
pub mod gc;
pub mod metrics;
mod process;
pub mod pull;
pub mod push;
pub mod rerank;
pub mod run;
pub mod show;
pub mod status;
pub mod sweep;
pub mod verify;
pub mod why;

pub use common::PipelineArgs;

use crate::engine::config::ConfigError;
use crate::engine::runner::EngineError;
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
    Run(run::Args),
    /// Run every point of the pipeline's sweep (same as `pipe run FILE --sweep`).
    Sweep(sweep::Args),
    /// Put runs side by side: run dirs, sweep dirs, or any directories holding run records.
    Compare(compare::Args),
    /// Score a predictions CSV (`query,relevance,score[,label]`) with the ranking and classification metrics.
    Metrics(metrics::Args),
    /// Device measurements (parity with the CPU, training-step speed); one JSON line each.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Rank documents for a query with a Qwen3 reranker (P(yes) per document).
    Rerank(rerank::RerankArgs),
    /// Write a trained model as a causal-LM or sequence-classification directory with a model card.
    Export(export::Args),
    /// Which stages are fresh or stale, and why.
    Status(status::Args),
    /// Upload stages' artifacts and the pipeline's run records to the remote store.
    Push(push::Args),
    /// Download stages' artifacts from the remote store into the local one.
    Pull(pull::Args),
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
    /// Compute one stage against the store (what a Slurm job runs).
    #[command(hide = true)]
    Exec(exec::Args),
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
            EngineError::Remote(crate::engine::remote::RemoteError::Url { .. }) => 2,
            EngineError::Store(_) | EngineError::UpstreamMissing(_) | EngineError::Remote(_) => 1,
        };
        Exit { code, error: e.into() }
    }
}

/// Runs one parsed command line.
pub fn run(cli: Cli, registry: &[Box<dyn Stage>]) -> Result<(), Exit> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Run(args) => run::run(args, registry, quiet),
        Command::Sweep(args) => sweep::run(args, registry, quiet),
        Command::Compare(args) => compare::run(args),
        Command::Metrics(args) => metrics::run(args),
        Command::Bench(cmd) => bench::run(cmd).map_err(Exit::failed),
        Command::Rerank(args) => rerank::run(args).map_err(Exit::failed),
        Command::Export(args) => export::run(args),
        Command::Status(args) => status::run(args, registry),
        Command::Push(args) => push::run(args, registry, quiet),
        Command::Pull(args) => pull::run(args, registry, quiet),
        Command::Why(args) => why::run(args, registry),
        Command::Dag(args) => dag::run(args, registry),
        Command::Config(args) => config::run(args, registry),
        Command::Show(args) => show::run(args, registry),
        Command::Verify(args) => verify::run(args, registry),
        Command::Gc(args) => gc::run(args, registry),
        Command::Exec(args) => exec::run(args, registry, quiet),
    }
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
