//! `pipe export`: a train artifact (or a model directory) out as a causal-LM or a
//! sequence-classification model directory with a model card.

use std::path::PathBuf;

use super::Exit;
use crate::export::{self, ExportError, Format, Request};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A train-stage artifact directory (`pipe show train PIPELINE.toml` prints it), its `model/`,
    /// or any Qwen3 causal-LM directory.
    pub src: PathBuf,
    /// `causal` (Qwen3ForCausalLM, scored as yes − no) or `seq-cls` (Qwen3ForSequenceClassification,
    /// one logit: what vLLM, text-embeddings-inference and sentence-transformers' CrossEncoder load).
    #[arg(long, default_value = "seq-cls")]
    pub format: String,
    /// The directory to write (created; replaced only with --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` if it exists and is not empty.
    #[arg(long)]
    pub force: bool,
    /// The model card's license (default: apache-2.0 for a Qwen/ base model, else `other`).
    #[arg(long)]
    pub license: Option<String>,
    /// Storage dtype: f32, bf16 or f16 (default: the source model's). In bf16 the score row
    /// `W_yes − W_no` is rounded once more than the two rows it comes from.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Print one JSON object describing what was written.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<(), Exit> {
    let format: Format = a.format.parse().map_err(Exit::usage)?;
    let dtype = a.dtype.as_deref().map(crate::model::parse_dtype).transpose().map_err(Exit::usage)?;
    let req = Request { src: a.src, format, out: a.out, force: a.force, license: a.license, dtype };
    let done = export::export(&req).map_err(|e| match e {
        ExportError::Usage(_) | ExportError::Source { .. } => Exit::usage(e),
        other => Exit::failed(other),
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&done).expect("serialisable"));
    } else {
        eprintln!(
            "exported {} ({}, yes {} − no {}, pad {}) to {}",
            done.format,
            done.architecture,
            done.yes_id,
            done.no_id,
            done.pad_token_id,
            done.out.display()
        );
        match &done.run_record {
            Some(r) => eprintln!("  model card from {}", r.display()),
            None if done.train_key.is_some() => {
                eprintln!("  no run record names this artifact (pipe gc?); the card has no metrics")
            }
            None => eprintln!("  not a train artifact: the card has no provenance"),
        }
    }
    Ok(())
}
