//! `pipe config`: the configuration a run would use, every default and override filled in, as TOML:
//! what to read when a parameter's value is in doubt. The `[executor]` table comes last, defaults filled in.

use super::common::{load, PipelineArgs};
use super::Exit;
use crate::engine::Stage;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub p: PipelineArgs,
}

pub fn run(args: Args, registry: &[Box<dyn Stage>]) -> Result<(), Exit> {
    let pipeline = load(&args.p, registry)?;
    print!("{}\n{}", pipeline.to_toml(), pipeline.executor.to_toml(&pipeline.slurm));
    Ok(())
}
