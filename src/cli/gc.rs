//! `pipe gc`: frees the store of artifacts no kept run record references; with `--keep-runs` it first
//! drops old run records. The cache never deletes on its own, so this is how a store shrinks.

use std::path::PathBuf;

use super::common::{human_bytes, print_json, store_for};
use super::Exit;
use crate::engine::Stage;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub artifacts: Option<PathBuf>,
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// Keep only the newest N run records per pipeline (default: keep all).
    #[arg(long, value_name = "N")]
    pub keep_runs: Option<usize>,
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, registry: &[Box<dyn Stage>]) -> Result<(), Exit> {
    let store = store_for(&args.artifacts, &args.pipeline, registry)?;
    let report = crate::engine::gc::gc(&store, args.keep_runs, args.dry_run);
    if args.json {
        print_json(&report);
    } else {
        let verb = if args.dry_run { "would remove" } else { "removed" };
        for r in &report.runs_removed {
            println!("{verb} run record {r}");
        }
        for a in &report.artifacts_removed {
            println!("{verb} {a}");
        }
        println!(
            "{verb} {} run record(s) and {} artifact(s), {} freed; {} artifact(s) kept",
            report.runs_removed.len(),
            report.artifacts_removed.len(),
            human_bytes(report.bytes_freed),
            report.artifacts_kept
        );
    }
    Ok(())
}
