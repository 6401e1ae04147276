//! `pipe verify`: re-hashes every artifact in a store against its manifest, to catch files edited or
//! damaged after a stage wrote them (the cache trusts the store; this checks it).

use std::path::PathBuf;

use super::common::{print_json, store_for};
use super::Exit;
use crate::engine::store::{read_manifest, verify_dir};
use crate::engine::Stage;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The store (default: ./artifacts, or the pipeline's when --pipeline is given).
    #[arg(long)]
    pub artifacts: Option<PathBuf>,
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args, registry: &[Box<dyn Stage>]) -> Result<(), Exit> {
    let store = store_for(&args.artifacts, &args.pipeline, registry)?;
    let mut bad = Vec::new();
    let mut checked = 0;
    for (_, dir) in store.artifacts() {
        match read_manifest(&dir) {
            Ok(Some(m)) => {
                checked += 1;
                let problems = verify_dir(&dir, &m);
                if !problems.is_empty() {
                    bad.push((dir, problems));
                }
            }
            Ok(None) => bad.push((dir, vec!["no manifest: incomplete artifact".into()])),
            Err(e) => bad.push((dir, vec![e.to_string()])),
        }
    }
    if args.json {
        let list: Vec<serde_json::Value> =
            bad.iter().map(|(d, p)| serde_json::json!({"dir": d.display().to_string(), "problems": p})).collect();
        print_json(&serde_json::json!({"checked": checked, "corrupt": list}));
    } else {
        for (d, problems) in &bad {
            println!("{}", d.display());
            for p in problems {
                println!("  - {p}");
            }
        }
        println!(
            "verified {checked} artifact(s): {} ok, {} with problems",
            checked - bad.len().min(checked),
            bad.len()
        );
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Exit::failed(anyhow::anyhow!("{} artifact(s) do not match their manifest", bad.len())))
    }
}
