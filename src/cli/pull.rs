//! `pipe pull`: downloads a pipeline's stages from the remote store into the local one (default: every
//! stage the remote has whose key is known), verified against the remote manifest and published like a
//! computed stage; what `pipe run` does before computing, without computing anything.

use super::common::{load, print_json, with_remote, PipelineArgs, RemoteArg};
use super::push::{open_remote, select};
use super::{process, Exit};
use crate::engine::runner::Engine;
use crate::engine::Stage;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub p: PipelineArgs,
    /// Stages to download (default: every stage the remote has).
    #[arg(value_name = "STAGE")]
    pub stages: Vec<String>,
    #[command(flatten)]
    pub remote: RemoteArg,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, registry: &[Box<dyn Stage>], quiet: bool) -> Result<(), Exit> {
    let pipeline = with_remote(load(&args.p, registry)?, args.remote.remote)?;
    let remote = open_remote(&pipeline)?;
    let wanted = select(&pipeline, &args.stages)?;
    // Keys downstream of a stage only the remote has are known through the remote's manifest.
    let engine = Engine::new(&pipeline, registry)?;
    engine.store.init().map_err(Exit::failed)?;
    engine.store.sweep_temp();
    process::install_interrupt_handler();
    let mut rows = Vec::new();
    let mut failed = false;
    for s in engine.status(&[]).into_iter().filter(|s| wanted.contains(&s.id)) {
        let (status, message) = match (&s.key, s.state, s.in_remote) {
            (Some(_), "fresh", _) => ("present", "already in the local store".to_string()),
            (Some(key), _, Some(true)) => {
                let _lock = engine.store.lock(&s.kind, key, &format!("pipe pull {}", s.id)).map_err(Exit::failed)?;
                let fetched = match engine.store.manifest(&s.kind, key).map_err(Exit::failed)? {
                    Some(_) => Ok(false),
                    None => match remote.manifest(&s.kind, key) {
                        Ok(Some(m)) => remote.fetch(&engine.store, &m).map(|()| true),
                        Ok(None) => Ok(false),
                        Err(e) => Err(e),
                    },
                };
                match fetched {
                    Ok(true) => ("fetched", engine.store.artifact_dir(&s.kind, key).display().to_string()),
                    Ok(false) => ("present", "already in the local store".to_string()),
                    Err(e) => {
                        failed = true;
                        ("failed", e.to_string())
                    }
                }
            }
            (Some(_), _, _) => {
                failed |= !args.stages.is_empty();
                ("missing", format!("not in {}", remote.url()))
            }
            (None, _, _) => {
                failed |= !args.stages.is_empty();
                ("unknown", "its key depends on an upstream stage neither store has".to_string())
            }
        };
        if !quiet && !args.json {
            eprintln!("  {:<10}  {status:<8}  {message}", s.id);
        }
        rows.push(serde_json::json!({"id": s.id, "kind": s.kind, "key": s.key, "status": status, "message": message}));
    }
    if args.json {
        print_json(&serde_json::json!({"remote": remote.url(), "stages": rows}));
    }
    if failed {
        return Err(Exit::failed(anyhow::anyhow!("some stages were not downloaded (see above)")));
    }
    Ok(())
}
