//! `pipe dag`: the stage graph as text or Graphviz, to see what depends on what before running.

use super::common::{load, PipelineArgs};
use super::Exit;
use crate::engine::graph;
use crate::engine::Stage;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub p: PipelineArgs,
    /// Graphviz output.
    #[arg(long)]
    pub dot: bool,
}

pub fn run(args: Args, registry: &[Box<dyn Stage>]) -> Result<(), Exit> {
    let pipeline = load(&args.p, registry)?;
    let dag = graph::build(&pipeline)?;
    if args.dot {
        print!("{}", graph::render_dot(&pipeline, &dag));
    } else {
        print!("{}", graph::render_text(&pipeline, &dag));
    }
    Ok(())
}
