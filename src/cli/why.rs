//! `pipe why`: the reasons one stage would run (or the artifact it would reuse), for when `status` of a
//! whole pipeline is more than the question.

use super::common::{load, PipelineArgs};
use super::Exit;
use crate::engine::config;
use crate::engine::runner::Engine;
use crate::engine::Stage;

#[derive(clap::Args, Debug)]
pub struct Args {
    pub stage: String,
    #[command(flatten)]
    pub p: PipelineArgs,
}

pub fn run(args: Args, registry: &[Box<dyn Stage>]) -> Result<(), Exit> {
    let Args { stage, p } = args;
    let pipeline = load(&p, registry)?;
    let engine = Engine::new(&pipeline, registry)?;
    let states = engine.status(&[]);
    let Some(s) = states.iter().find(|s| s.id == stage) else {
        let ids: Vec<&str> = pipeline.stages.iter().map(|s| s.id.as_str()).collect();
        let hint = config::did_you_mean(&stage, ids.iter().copied()).unwrap_or_default();
        return Err(Exit::usage(anyhow::anyhow!("no stage `{stage}` in {} {hint}", p.file.display())));
    };
    if s.reasons.is_empty() {
        println!("{} is fresh: {}", s.id, s.dir.as_deref().map(|d| d.display().to_string()).unwrap_or_default());
    } else {
        println!("{} is stale:", s.id);
        for r in &s.reasons {
            println!("  - {r}");
        }
    }
    Ok(())
}
