//! `pipe status`: which stages of a pipeline are fresh or stale and every reason why, without running
//! anything: the cache keys computed against the store. With `--remote`, also which stale stages the
//! remote store holds (those `pipe run` would fetch rather than compute).

use super::common::{load, print_json, PipelineArgs};
use super::Exit;
use crate::engine::runner::{self, Engine};
use crate::engine::slurm;
use crate::engine::Stage;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub p: PipelineArgs,
    #[arg(long)]
    pub json: bool,
    /// Also ask the remote store which stale stages it has: `--remote` alone for `[pipeline] remote`,
    /// or `--remote URL`. Without it, status never touches the network.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    pub remote: Option<String>,
}

pub fn run(args: Args, registry: &[Box<dyn Stage>]) -> Result<(), Exit> {
    let mut pipeline = load(&args.p, registry)?;
    match args.remote.as_deref() {
        None => pipeline.remote = None,
        Some("") if pipeline.remote.is_none() => {
            return Err(Exit::usage(anyhow::anyhow!(
                "{}: `pipeline.remote`: --remote without a URL needs `remote = \"s3://bucket/prefix\"` in [pipeline]\n  hint: pass --remote URL",
                args.p.file.display()
            )))
        }
        Some("") => {}
        Some(url) => pipeline = super::common::with_remote(pipeline, Some(url.to_string()))?,
    }
    let engine = Engine::new(&pipeline, registry)?;
    let states = engine.status(&[]);
    // Stale stages a Slurm job is computing right now (a detached `pipe run`).
    let jobs = slurm::active_jobs(&engine);
    if args.json {
        let mut v = serde_json::to_value(&states).expect("states serialize");
        for s in v.as_array_mut().expect("an array") {
            if let Some((job, state)) = s["id"].as_str().and_then(|id| jobs.get(id)) {
                s["slurm_job"] = (*job).into();
                s["slurm_state"] = state.clone().into();
            }
        }
        print_json(&serde_json::json!({ "pipeline": pipeline.name, "stages": v }));
    } else {
        let width = states.iter().map(|s| s.id.len()).max().unwrap_or(4);
        for s in &states {
            let key = s.key.as_deref().map(runner::short).unwrap_or("-");
            if let Some((job, state)) = jobs.get(&s.id) {
                let what = if state == "PENDING" { "pending" } else { "running" };
                println!("{:<width$}  {what} (slurm job {job})  {key}", s.id);
                continue;
            }
            let remote = match (s.in_remote, &engine.remote) {
                (Some(true), Some(r)) => format!("  in {}", r.url()),
                (Some(false), Some(_)) => "  not in the remote".to_string(),
                _ => String::new(),
            };
            println!("{:<width$}  {:<5}  {key}{remote}", s.id, s.state);
            for r in &s.reasons {
                println!("{:<width$}    - {r}", "");
            }
        }
    }
    Ok(())
}
