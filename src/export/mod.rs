//! `pipe export`: a trained reranker out of the store, in the form a serving stack loads, with a
//! model card.
//!
//! Two formats: `causal` (the Qwen3 causal LM, as training and `evaluate` use it; scored as
//! `logit(yes) − logit(no)`) and `seq-cls` (`Qwen3ForSequenceClassification` with one label, see
//! [`crate::model::seqcls`]), which vLLM, text-embeddings-inference and sentence-transformers'
//! `CrossEncoder` take. Either directory gets the tokenizer files, a `README.md` model card built
//! by [`card`] from the train artifact's manifest, the run record that produced it and the
//! manifests of the stages of that run, and the train stage's TensorBoard event files under
//! `runs/` (the Hugging Face hub shows them).
//!
//! The same code runs as `pipe export` (card provenance from the run record that produced the train
//! artifact) and as the `export` stage kind ([`crate::stages::export`]; provenance from its
//! upstream artifacts, since the run record of the run in progress is not written yet).

pub mod card;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device};
use serde_json::{json, Value};

use crate::model::{self, LoadOptions, ModelError, ModelSource, Qwen3Config, SaveOptions};
use crate::text::TextError;

pub use card::{Card, Provenance};

/// The two layouts `pipe export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Causal,
    SeqCls,
}

impl FromStr for Format {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self, ExportError> {
        match s {
            "causal" => Ok(Format::Causal),
            "seq-cls" => Ok(Format::SeqCls),
            other => Err(ExportError::Usage(format!("`--format {other}`: expected `causal` or `seq-cls`"))),
        }
    }
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Causal => "causal",
            Format::SeqCls => "seq-cls",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error("{path}: {message}")]
    Source { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io { path: path.to_path_buf(), source }
}

/// What `pipe export` was asked for.
#[derive(Debug, Clone)]
pub struct Request {
    /// A train-stage artifact directory (holding `manifest.json` and `model/`), its `model/`, or
    /// any Qwen3 model directory.
    pub src: PathBuf,
    pub format: Format,
    pub out: PathBuf,
    /// Replace an existing, non-empty `out`.
    pub force: bool,
    /// The card's `license`; `None`: the base model's when known (see [`card`]), else `other`.
    pub license: Option<String>,
    /// Storage dtype; `None`: the source's. The seq-cls row is computed in f32 either way.
    pub dtype: Option<DType>,
}

/// What was written, for the CLI's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exported {
    pub out: PathBuf,
    pub format: &'static str,
    pub architecture: String,
    pub yes_id: u32,
    pub no_id: u32,
    pub pad_token_id: u32,
    /// The train artifact's key when the source was one.
    pub train_key: Option<String>,
    /// The run record the card's metrics came from.
    pub run_record: Option<PathBuf>,
    pub files: Vec<String>,
}

/// The model directory and, for a train artifact, the artifact directory.
fn locate(src: &Path) -> Result<(PathBuf, Option<PathBuf>), ExportError> {
    let manifest = |d: &Path| d.join(crate::engine::store::MANIFEST).is_file();
    if manifest(src) && src.join(crate::stages::train::MODEL_DIR).join("config.json").is_file() {
        return Ok((src.join(crate::stages::train::MODEL_DIR), Some(src.to_path_buf())));
    }
    if src.join("config.json").is_file() {
        let parent = src.parent().filter(|p| manifest(p) && src.file_name().is_some_and(|n| n == "model"));
        return Ok((src.to_path_buf(), parent.map(Path::to_path_buf)));
    }
    Err(ExportError::Source {
        path: src.to_path_buf(),
        message: "neither a train-stage artifact (manifest.json + model/) nor a model directory (config.json); \
                  `pipe show train PIPELINE.toml` prints the train artifact's directory"
            .into(),
    })
}

/// The pad token's text and id: the source's `tokenizer_config.json` when it names one, else
/// Qwen's `<|endoftext|>`, else the tokenizer's own padding setting.
fn pad_token(model_dir: &Path, tok: &tokenizers::Tokenizer) -> Result<(String, u32), ExportError> {
    let cfg_path = model_dir.join("tokenizer_config.json");
    let named =
        std::fs::read_to_string(&cfg_path).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok()).and_then(|v| {
            match &v["pad_token"] {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
                _ => None,
            }
        });
    let candidates =
        named.into_iter().chain(["<|endoftext|>".to_string()]).chain(tok.get_padding().map(|p| p.pad_token.clone()));
    for c in candidates {
        if let Some(id) = tok.token_to_id(&c) {
            return Ok((c, id));
        }
    }
    Err(ExportError::Source {
        path: model_dir.join("tokenizer.json"),
        message: "no pad token: the tokenizer has no `<|endoftext|>` and no padding setting, and there is no \
                  tokenizer_config.json naming `pad_token`; add one beside tokenizer.json"
            .into(),
    })
}

/// `tokenizer_config.json` for a directory that has none (a train artifact keeps only
/// `tokenizer.json`): what transformers needs to pad like Qwen3-Reranker (left, with the pad token
/// the seq-cls config names).
fn tokenizer_config(tok: &tokenizers::Tokenizer, pad: &str, max_len: usize) -> Value {
    let eos = tok.token_to_id("<|im_end|>").map(|_| "<|im_end|>");
    json!({
        "tokenizer_class": "Qwen2Tokenizer",
        "pad_token": pad,
        "eos_token": eos,
        "bos_token": null,
        "unk_token": null,
        "padding_side": "left",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": false,
        "split_special_tokens": false,
        "errors": "replace",
    })
}

fn copy_dir(src: &Path, dst: &Path) -> Result<(), ExportError> {
    std::fs::create_dir_all(dst).map_err(io(dst))?;
    for e in std::fs::read_dir(src).map_err(io(src))?.flatten() {
        let (from, to) = (e.path(), dst.join(e.file_name()));
        if from.is_dir() {
            copy_dir(&from, &to)?;
        } else {
            std::fs::copy(&from, &to).map_err(io(&from))?;
        }
    }
    Ok(())
}

/// The storage dtype named by the source config (the trained model's compute dtype), f32 if none.
fn stored_dtype(cfg: &Qwen3Config) -> DType {
    cfg.dtype.as_deref().and_then(|d| model::parse_dtype(d).ok()).unwrap_or(DType::F32)
}

/// Exports what `req.src` names (see [`Request::src`]); a train artifact's card comes from the
/// store's run records.
pub fn export(req: &Request) -> Result<Exported, ExportError> {
    let (model_dir, artifact) = locate(&req.src)?;
    let provenance = artifact.as_deref().map(Provenance::from_train_artifact).transpose()?;
    export_model(&model_dir, provenance, req)
}

/// Writes the export of the causal model in `model_dir` into a fresh directory beside `req.out`
/// and renames it into place, so a failed export never leaves a half-written model where a server
/// would load it. `provenance` feeds the card (and names the train artifact whose TensorBoard
/// files are copied); `req.src` is not read.
pub fn export_model(model_dir: &Path, provenance: Option<Provenance>, req: &Request) -> Result<Exported, ExportError> {
    let model_dir = model_dir.to_path_buf();
    let artifact = provenance.as_ref().map(|p| p.train_dir.clone());
    let files = model::resolve(&ModelSource::Dir(model_dir.clone()), &Default::default())?;
    let cfg = Qwen3Config::from_file(&files.config)?;
    if model::seqcls::is_seq_cls(&cfg) {
        return Err(ExportError::Source {
            path: files.config.clone(),
            message: "is already a seq-cls export; export from the causal model (the train artifact)".into(),
        });
    }
    let tok_path = files.tokenizer.clone().ok_or_else(|| ExportError::Source {
        path: model_dir.clone(),
        message: "has no tokenizer.json; the export needs it (the yes/no ids, the pad token, and for serving)".into(),
    })?;
    let tok = crate::text::load_tokenizer(&tok_path.display().to_string(), Path::new("."))?;
    let yn = crate::text::prompt::yes_no_ids(&tok)?;
    let (pad, pad_id) = pad_token(&model_dir, &tok)?;

    if req.out.exists() {
        let empty = std::fs::read_dir(&req.out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !empty && !req.force {
            return Err(ExportError::Usage(format!(
                "{} exists and is not empty; pass --force to replace it",
                req.out.display()
            )));
        }
    }
    let parent = req.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let tmp = tempfile::Builder::new().prefix(".pipe-export-").tempdir_in(parent).map_err(io(parent))?;
    let dir = tmp.path();

    let dtype = req.dtype.unwrap_or_else(|| stored_dtype(&cfg));
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, trainable: false };
    let qwen = model::load_files(&files, &opts)?;
    let architecture = match req.format {
        Format::Causal => {
            model::save(&qwen, dir, &SaveOptions { dtype: Some(dtype), tokenizer: None, max_shard_bytes: None })?;
            "Qwen3ForCausalLM"
        }
        Format::SeqCls => {
            model::seqcls::save(&qwen, yn.yes, yn.no, pad_id, dir, Some(dtype))?;
            model::seqcls::ARCHITECTURE
        }
    };
    std::fs::copy(&tok_path, dir.join("tokenizer.json")).map_err(io(&tok_path))?;
    let mut copied_config = false;
    for extra in ["tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"] {
        let p = model_dir.join(extra);
        if p.is_file() {
            std::fs::copy(&p, dir.join(extra)).map_err(io(&p))?;
            copied_config |= extra == "tokenizer_config.json";
        }
    }
    if !copied_config {
        let v = tokenizer_config(&tok, &pad, cfg.max_position_embeddings);
        let p = dir.join("tokenizer_config.json");
        std::fs::write(&p, serde_json::to_string_pretty(&v).expect("JSON") + "\n").map_err(io(&p))?;
    }
    if let Some(events) = artifact.as_ref().map(|a| a.join(crate::stages::train::EVENTS_DIR)).filter(|p| p.is_dir()) {
        copy_dir(&events, &dir.join("runs"))?;
    }
    let card = Card {
        format: req.format,
        architecture: architecture.to_string(),
        model_config: cfg.clone(),
        yes_id: yn.yes,
        no_id: yn.no,
        pad_token: pad.clone(),
        pad_token_id: pad_id,
        license: req.license.clone(),
        provenance: provenance.clone(),
    };
    let readme = dir.join("README.md");
    std::fs::write(&readme, card.render()).map_err(io(&readme))?;

    let mut names: Vec<String> = walk(dir);
    names.sort();
    if req.out.exists() {
        std::fs::remove_dir_all(&req.out).map_err(io(&req.out))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, &req.out).map_err(io(&req.out))?;
    Ok(Exported {
        out: req.out.clone(),
        format: req.format.as_str(),
        architecture: architecture.to_string(),
        yes_id: yn.yes,
        no_id: yn.no,
        pad_token_id: pad_id,
        train_key: provenance.as_ref().map(|p| p.train.key.clone()),
        run_record: provenance.as_ref().and_then(|p| p.run_record.clone()),
        files: names,
    })
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.display().to_string());
            }
        }
    }
    out
}
