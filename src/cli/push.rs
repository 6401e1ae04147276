//! `pipe push`: uploads the local artifacts of a pipeline's stages (default: every stage whose
//! artifact is in the local store) and the pipeline's run records to the remote store, for artifacts
//! computed before the remote was configured, or whose upload after a run failed.

use super::common::{load, print_json, with_remote, PipelineArgs, RemoteArg};
use super::Exit;
use crate::engine::config::{did_you_mean, Pipeline};
use crate::engine::remote::{Pushed, Remote};
use crate::engine::runner::Engine;
use crate::engine::Stage;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub p: PipelineArgs,
    /// Stages to upload (default: every stage with a local artifact).
    #[arg(value_name = "STAGE")]
    pub stages: Vec<String>,
    #[command(flatten)]
    pub remote: RemoteArg,
    /// Replace the remote's copy even when it has one (for a remote copy that fails verification).
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

/// The pipeline's remote, or a usage error saying how to name one.
pub(super) fn open_remote(pipeline: &Pipeline) -> Result<Remote, Exit> {
    let url = pipeline.remote.as_deref().ok_or_else(|| {
        Exit::usage(anyhow::anyhow!(
            "{}: `pipeline.remote`: no remote store configured\n  hint: add `remote = \"s3://bucket/prefix\"` to [pipeline], or pass --remote URL",
            pipeline.file.display()
        ))
    })?;
    Remote::open(url).map_err(|e| Exit::usage(anyhow::anyhow!(e)))
}

/// The selected stage ids, checked against the pipeline (all of them when none is named).
pub(super) fn select(pipeline: &Pipeline, named: &[String]) -> Result<Vec<String>, Exit> {
    let ids: Vec<&str> = pipeline.stages.iter().map(|s| s.id.as_str()).collect();
    for n in named {
        if !ids.contains(&n.as_str()) {
            let hint = did_you_mean(n, ids.iter().copied()).unwrap_or_default();
            return Err(Exit::usage(anyhow::anyhow!("no stage `{n}` in {} {hint}", pipeline.file.display())));
        }
    }
    Ok(if named.is_empty() { ids.iter().map(|s| s.to_string()).collect() } else { named.to_vec() })
}

pub fn run(args: Args, registry: &[Box<dyn Stage>], quiet: bool) -> Result<(), Exit> {
    let mut pipeline = with_remote(load(&args.p, registry)?, args.remote.remote)?;
    let remote = open_remote(&pipeline)?;
    let wanted = select(&pipeline, &args.stages)?;
    // The local state alone says what there is to upload.
    pipeline.remote = None;
    let engine = Engine::new(&pipeline, registry)?;
    let mut rows = Vec::new();
    let mut failed = false;
    for s in engine.status(&[]).into_iter().filter(|s| wanted.contains(&s.id)) {
        let (status, message) = match (&s.key, s.state) {
            (Some(key), "fresh") => match remote.push(&engine.store, &s.kind, key, args.force) {
                Ok(Pushed::Uploaded { files, bytes }) => ("uploaded", format!("{files} file(s), {bytes} bytes")),
                Ok(Pushed::AlreadyThere) => ("present", "the remote already has it".to_string()),
                Err(e) => {
                    failed = true;
                    ("failed", e.to_string())
                }
            },
            _ => {
                // Named explicitly, a stage that cannot be uploaded is an error; by default, a note.
                failed |= !args.stages.is_empty();
                ("skipped", "not in the local store (run it first)".to_string())
            }
        };
        if !quiet && !args.json {
            eprintln!("  {:<10}  {status:<8}  {message}", s.id);
        }
        rows.push(serde_json::json!({"id": s.id, "kind": s.kind, "key": s.key, "status": status, "message": message}));
    }
    // Run records, so that `pipe compare --remote` sees this machine's runs.
    let mut runs = 0;
    let mut dirs = vec![engine.store.root.join("runs").join(&pipeline.name)];
    while let Some(d) = dirs.pop() {
        if d.join("run.json").is_file() {
            match remote.has_run(&engine.store, &d).and_then(|has| {
                if has {
                    Ok(false)
                } else {
                    remote.push_run(&engine.store, &d)
                }
            }) {
                Ok(true) => runs += 1,
                Ok(false) => {}
                Err(e) => {
                    failed = true;
                    eprintln!("pipe: {e}");
                }
            }
            continue;
        }
        dirs.extend(std::fs::read_dir(&d).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    if args.json {
        print_json(&serde_json::json!({"remote": remote.url(), "stages": rows, "runs_uploaded": runs}));
    } else if !quiet {
        eprintln!("pipe: pushed to {}; {runs} run record(s) uploaded", remote.url());
    }
    if failed {
        return Err(Exit::failed(anyhow::anyhow!("some stages were not uploaded (see above)")));
    }
    Ok(())
}
