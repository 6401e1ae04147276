//! `pipe rerank`: score documents for a query with any Qwen3 reranker, offline when the model is local.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::hub::HubSettings;
use crate::model::device::{parse_device, parse_dtype};
use crate::model::score::score_all;
use crate::model::{LoadOptions, ModelSource};
use crate::text::{load_tokenizer, PromptConfig, PromptEncoder};

#[derive(clap::Args, Debug)]
pub struct RerankArgs {
    /// A local Hugging Face model directory or `hf:<owner>/<name>[@revision]`: the causal LM or its
    /// `Qwen3ForSequenceClassification` export (told apart by `architectures` in config.json).
    #[arg(long)]
    pub model: String,
    /// Tokenizer: a tokenizer.json(.gz), `hf:…`, or `qwen3` (built in). Default: the model's tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<String>,
    #[arg(long, default_value = crate::text::DEFAULT_INSTRUCTION)]
    pub instruction: String,
    #[arg(long)]
    pub query: String,
    /// A document (repeatable).
    #[arg(long = "doc")]
    pub docs: Vec<String>,
    /// JSON Lines: each line a string, or an object with `doc`, or with `title` and optional `description`.
    #[arg(long)]
    pub docs_file: Option<PathBuf>,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    #[arg(long, default_value_t = crate::text::DEFAULT_MAX_LENGTH)]
    pub max_length: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Print one JSON object: {"query", "results": [{"index", "doc", "score", "logit", "rank"}]} in input order.
    #[arg(long)]
    pub json: bool,
}

enum Doc {
    Text(String),
    Product { title: String, description: String },
}

impl Doc {
    fn display(&self) -> String {
        match self {
            Doc::Text(t) => t.clone(),
            Doc::Product { title, description } if description.is_empty() => title.clone(),
            Doc::Product { title, description } => format!("{title}. {description}"),
        }
    }
}

fn read_docs_file(path: &Path) -> anyhow::Result<Vec<Doc>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        docs.push(match (&v, s("doc").or_else(|| s("text")), s("title")) {
            (serde_json::Value::String(t), _, _) => Doc::Text(t.clone()),
            (_, Some(d), _) => Doc::Text(d),
            (_, None, Some(title)) => Doc::Product { title, description: s("description").unwrap_or_default() },
            _ => bail!("{}: expected a JSON string or an object with `doc`, `text` or `title`", at()),
        });
    }
    Ok(docs)
}

pub fn run(a: RerankArgs) -> anyhow::Result<()> {
    let mut docs: Vec<Doc> = a.docs.iter().cloned().map(Doc::Text).collect();
    if let Some(f) = &a.docs_file {
        docs.extend(read_docs_file(f)?);
    }
    if docs.is_empty() {
        bail!("no documents: pass --doc TEXT (repeatable) or --docs-file FILE.jsonl");
    }
    let source: ModelSource = a.model.parse()?;
    let files = crate::model::resolve(&source, &HubSettings::from_env())?;
    let cwd = std::env::current_dir()?;
    let tokenizer = match (&a.tokenizer, &files.tokenizer) {
        (Some(spec), _) => load_tokenizer(spec, &cwd)?,
        (None, Some(path)) => load_tokenizer(&path.display().to_string(), &cwd)?,
        (None, None) => bail!(
            "{} has no tokenizer.json; pass --tokenizer (a tokenizer.json, hf:<owner>/<name>, or `qwen3` for the built-in Qwen3 tokenizer)",
            a.model
        ),
    };
    let config = PromptConfig { instruction: a.instruction.clone(), max_length: a.max_length, ..Default::default() };
    let encoder = PromptEncoder::new(tokenizer, config)?;
    let device = parse_device(&a.device)?;
    let yn = encoder.yes_no();
    // Either form: the causal LM (yes − no) or a `pipe export --format seq-cls` directory.
    let reranker = crate::model::seqcls::load_reranker(
        &files,
        &LoadOptions { dtype: parse_dtype(&a.dtype)?, device: device.clone(), trainable: false },
        yn.yes,
        yn.no,
    )?;
    let encoded: Vec<Vec<u32>> = docs
        .iter()
        .map(|d| match d {
            Doc::Text(t) => encoder.encode_document(&a.query, t).map(|e| e.ids),
            Doc::Product { title, description } => encoder.encode_pair(&a.query, title, description).map(|e| e.ids),
        })
        .collect::<Result<_, _>>()?;
    let seqs: Vec<&[u32]> = encoded.iter().map(Vec::as_slice).collect();
    let scores = score_all(&reranker, &seqs, a.batch_size, &device, |_| true)?.expect("never stopped");
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.sort_by(|&x, &y| {
        scores[y].p_yes.partial_cmp(&scores[x].p_yes).unwrap_or(std::cmp::Ordering::Equal).then(x.cmp(&y))
    });
    let mut rank = vec![0; docs.len()];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r + 1;
    }
    if a.json {
        let results: Vec<serde_json::Value> = (0..docs.len())
            .map(|i| {
                serde_json::json!({"index": i, "doc": docs[i].display(), "score": scores[i].p_yes, "logit": scores[i].logit, "rank": rank[i]})
            })
            .collect();
        println!("{}", serde_json::json!({"query": a.query, "results": results}));
    } else {
        println!("query: {}", a.query);
        for (r, &i) in order.iter().enumerate() {
            println!("{:>3}  {:.4}  {}", r + 1, scores[i].p_yes, docs[i].display());
        }
    }
    Ok(())
}
