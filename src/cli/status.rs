//! `pipe status`: which stages of a pipeline are fresh or stale and every reason why, without running
//! anything: the cache keys computed against the store.

use super::common::{load, print_json, PipelineArgs};
use super::Exit;
use crate::engine::runner::{self, Engine};
use crate::engine::Stage;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub p: PipelineArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, registry: &[Box<dyn Stage>]) -> Result<(), Exit> {
    let pipeline = load(&args.p, registry)?;
    let engine = Engine::new(&pipeline, registry)?;
    let states = engine.status(&[]);
    if args.json {
        print_json(&serde_json::json!({ "pipeline": pipeline.name, "stages": states }));
    } else {
        let width = states.iter().map(|s| s.id.len()).max().unwrap_or(4);
        for s in &states {
            let key = s.key.as_deref().map(runner::short).unwrap_or("-");
            println!("{:<width$}  {:<5}  {key}", s.id, s.state);
            for r in &s.reasons {
                println!("{:<width$}    - {r}", "");
            }
        }
    }
    Ok(())
}
