//! `pipe show`: where a stage's current artifact lives and its manifest, the way into a run's outputs
//! without computing cache keys by hand.

use super::common::{load, PipelineArgs};
use super::Exit;
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
        return Err(Exit::usage(anyhow::anyhow!("no stage `{stage}` in {}", p.file.display())));
    };
    match &s.dir {
        Some(dir) => {
            println!("{}", dir.display());
            let m = std::fs::read_to_string(dir.join("manifest.json")).map_err(Exit::failed)?;
            println!("{m}");
            Ok(())
        }
        None => {
            let why: Vec<String> = s.reasons.iter().map(|r| r.to_string()).collect();
            Err(Exit::failed(anyhow::anyhow!(
                "stage `{stage}` has no current artifact ({}); run `pipe run {}` first",
                why.join("; "),
                p.file.display()
            )))
        }
    }
}
