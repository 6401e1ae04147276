//! `tokenize`: each split's rows → Qwen3-Reranker prompt ids in a compact token store.
//!
//! Reads `train.csv`, `val.csv` and `test.csv` from the upstream `split` stage (or a `mine` stage,
//! which writes the same three tables, train with mined negatives and a `mined` column it ignores), builds every prompt
//! with [`crate::text::PromptEncoder`] (so training, evaluation and `pipe rerank` agree on the ids),
//! and writes one [`TokenStore`] per split — the file format is documented in
//! [`crate::text::store`] and in `stages/tokenize.toml` — plus the `tokenizer.json` it used.
//! Encoding runs on all cores with rayon; row order is preserved.

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::{
    Contract, ExternalInput, JsonMap, Need, ParamError, StageContext, StageError, StageOutput, StageParams, TypedStage,
};
use crate::text::{PromptConfig, PromptEncoder, TextError, TokenStore, TokenizerSource};

pub const KIND: &str = "tokenize";
/// Bump when the ids or the store layout change for the same inputs.
pub const VERSION: u32 = 1;
/// The splits the `split` stage writes, in this order.
pub const SPLITS: [&str; 3] = super::split::SPLITS;
/// The tokenizer the ids were made with, so that training, evaluation and the saved model use it.
pub const TOKENIZER: &str = "tokenizer.json";

/// The split tables (from `split`, or `mine` with the same files) in; one token store per split (the layout of [`TokenStore`]; `<s>.pair_ids.json`
/// only when ids are not integers) and the tokenizer out.
pub const CONTRACT: Contract = Contract {
    needs: &[Need::always(&[super::split::KIND, super::mine::KIND])],
    writes: &[
        "train.safetensors",
        "train.queries.json",
        "val.safetensors",
        "val.queries.json",
        "test.safetensors",
        "test.queries.json",
        TOKENIZER,
    ],
};

/// Rows per rayon task: small enough to balance two cores and to poll for Ctrl-C often.
const CHUNK: usize = 256;

pub struct Tokenize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeParams {
    pub tokenizer: String,
    pub instruction: String,
    pub max_length: i64,
    pub max_description_tokens: i64,
}

impl StageParams for TokenizeParams {
    fn validate(&self) -> Result<(), ParamError> {
        TokenizerSource::parse(&self.tokenizer).map_err(|e| ParamError::new("tokenizer", e))?;
        let n = self.max_length;
        if !(1..=i64::from(u32::MAX)).contains(&n) {
            return Err(ParamError::new("max_length", format!("must be a positive number of tokens, got {n}")));
        }
        let n = self.max_description_tokens;
        if n < 0 || n > i64::from(u32::MAX) {
            return Err(ParamError::new("max_description_tokens", format!("must be 0 or more tokens, got {n}")));
        }
        Ok(())
    }
}

/// One row of a split CSV; other columns (product_id) are not needed here.
#[derive(Debug, Deserialize)]
struct Row {
    id: String,
    query: String,
    title: String,
    #[serde(default)]
    description: String,
    relevance: f32,
    label: u8,
}

impl TypedStage for Tokenize {
    type Params = TokenizeParams;
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const DEFAULTS: &'static str = include_str!("../../stages/tokenize.toml");
    const CONTRACT: Contract = CONTRACT;

    fn inputs(p: &TokenizeParams) -> Vec<ExternalInput> {
        let Ok(src) = TokenizerSource::parse(&p.tokenizer) else {
            return Vec::new();
        };
        match &src {
            // Hashed by content by the engine. A directory is not accepted here (it could not be
            // hashed as one input); name the tokenizer.json inside it.
            TokenizerSource::File(p) => vec![ExternalInput::File(p.display().to_string())],
            _ => vec![ExternalInput::Remote(src.identity())],
        }
    }

    fn run(ctx: &StageContext, p: &TokenizeParams) -> Result<StageOutput, StageError> {
        let param = |key: &str, e: TextError| StageError::param(key, e);
        let source = TokenizerSource::parse(&p.tokenizer).map_err(|e| param("tokenizer", e))?;
        if let TokenizerSource::File(f) = &source {
            if ctx.path(&f.display().to_string()).is_dir() {
                return Err(StageError::param(
                    "tokenizer",
                    format!("{} is a directory; name the tokenizer.json inside it", f.display()),
                ));
            }
        }
        let json = source.read_json(ctx.root).map_err(|e| param("tokenizer", e))?;
        let tokenizer = crate::text::tokenizer::from_json(&json).map_err(|e| param("tokenizer", e))?;
        let config = PromptConfig {
            instruction: p.instruction.clone(),
            max_length: p.max_length as usize,
            max_description_tokens: p.max_description_tokens as usize,
        };
        let encoder = PromptEncoder::new(tokenizer, config).map_err(|e| match e {
            TextError::MaxLength { .. } => param("max_length", e),
            _ => param("tokenizer", e),
        })?;

        let split_dir = ctx.upstream_of(&[super::split::KIND, super::mine::KIND])?.dir.clone();
        let mut tables = Vec::new();
        for (split, file) in SPLITS.into_iter().zip(super::split::FILES) {
            tables.push((split, read_rows(&split_dir.join(file))?));
        }
        let total: usize = tables.iter().map(|(_, rows)| rows.len()).sum();
        let bar = ctx.bar(total as u64, "encoding prompts");

        let yes_no = encoder.yes_no();
        let metadata: std::collections::BTreeMap<String, String> = [
            ("tokenizer", source.identity()),
            ("instruction", p.instruction.clone()),
            ("max_length", p.max_length.to_string()),
            ("max_description_tokens", p.max_description_tokens.to_string()),
            ("prefix_tokens", encoder.prefix_ids().len().to_string()),
            ("suffix_tokens", encoder.suffix_ids().len().to_string()),
            ("yes_id", yes_no.yes.to_string()),
            ("no_id", yes_no.no.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();

        let mut split_stats = JsonMap::new();
        let mut all_lengths = Vec::with_capacity(total);
        let (mut all_desc_cut, mut all_body_cut) = (0usize, 0usize);
        for (split, rows) in &tables {
            let encoded: Vec<Vec<crate::text::Encoded>> = rows
                .par_chunks(CHUNK)
                .map(|chunk| {
                    ctx.check_cancel()?;
                    let out = chunk
                        .iter()
                        .map(|r| encoder.encode_pair(&r.query, &r.title, &r.description))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| StageError::failed(format!("{split}: {e}")))?;
                    bar.inc(chunk.len() as u64);
                    Ok(out)
                })
                .collect::<Result<_, StageError>>()?;
            let encoded: Vec<crate::text::Encoded> = encoded.into_iter().flatten().collect();

            let mut store = build_store(rows, &encoded);
            store.metadata = metadata.clone();
            store.write(ctx.out, split).map_err(|e| StageError::failed(e.to_string()))?;

            let lengths: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
            let desc_cut = encoded.iter().filter(|e| e.description_truncated).count();
            let body_cut = encoded.iter().filter(|e| e.body_truncated).count();
            let mut s = length_stats(&lengths);
            s.insert("pairs".into(), json!(rows.len()));
            s.insert("queries".into(), json!(store.queries.len()));
            s.insert("truncated_description".into(), json!(desc_cut));
            s.insert("truncated_sequence".into(), json!(body_cut));
            split_stats.insert(split.to_string(), Value::Object(s));
            all_lengths.extend(lengths);
            all_desc_cut += desc_cut;
            all_body_cut += body_cut;
        }
        bar.finish_and_clear();

        let tok_path = ctx.out.join(TOKENIZER);
        std::fs::write(&tok_path, &json).map_err(|e| StageError::io(&tok_path, e))?;

        let mut all = length_stats(&all_lengths);
        all.insert("pairs".into(), json!(total));
        all.insert("truncated_description".into(), json!(all_desc_cut));
        all.insert("truncated_sequence".into(), json!(all_body_cut));
        let mut stats = JsonMap::new();
        stats.insert("splits".into(), Value::Object(split_stats));
        stats.insert("all".into(), Value::Object(all.clone()));
        stats.insert("tokenizer".into(), json!(source.identity()));
        stats.insert("prefix_tokens".into(), json!(encoder.prefix_ids().len()));
        stats.insert("suffix_tokens".into(), json!(encoder.suffix_ids().len()));
        stats.insert("yes_id".into(), json!(yes_no.yes));
        stats.insert("no_id".into(), json!(yes_no.no));

        let mut metrics = JsonMap::new();
        for k in ["pairs", "len_p99", "len_max", "truncated_sequence"] {
            metrics.insert(k.into(), all[k].clone());
        }
        Ok(StageOutput { metrics, stats })
    }
}

fn read_rows(path: &Path) -> Result<Vec<Row>, StageError> {
    let file = path.display().to_string();
    let mut rdr = csv::ReaderBuilder::new().from_path(path).map_err(|e| match e.into_kind() {
        csv::ErrorKind::Io(io) => StageError::io(path, io),
        other => StageError::failed(format!("{file}: {other:?}")),
    })?;
    let headers = rdr.headers().map_err(|e| csv_error(&file, &e))?.clone();
    let mut rows = Vec::new();
    let mut record = csv::StringRecord::new();
    while rdr.read_record(&mut record).map_err(|e| csv_error(&file, &e))? {
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let data = |message: String| StageError::Data { file: file.clone(), line, message };
        let row: Row = record.deserialize(Some(&headers)).map_err(|e| data(csv_message(&e)))?;
        if row.label > 1 {
            return Err(data(format!("label must be 0 or 1, got {}", row.label)));
        }
        rows.push(row);
    }
    Ok(rows)
}

fn csv_error(file: &str, e: &csv::Error) -> StageError {
    StageError::Data {
        file: file.to_string(),
        line: e.position().map(|p| p.line()).unwrap_or(0),
        message: csv_message(e),
    }
}

/// The csv crate's messages repeat the position we already report; keep the cause only.
fn csv_message(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Deserialize { err, .. } => match err.field() {
            Some(f) => format!("field {}: {}", f + 1, err.kind()),
            None => err.kind().to_string(),
        },
        _ => e.to_string(),
    }
}

/// Rows and their encodings → the store's flat arrays; queries are numbered by first appearance.
fn build_store(rows: &[Row], encoded: &[crate::text::Encoded]) -> TokenStore {
    let n = rows.len();
    let mut store = TokenStore {
        ids: Vec::with_capacity(encoded.iter().map(|e| e.ids.len()).sum()),
        offsets: Vec::with_capacity(n + 1),
        labels: Vec::with_capacity(n),
        relevance: Vec::with_capacity(n),
        query_ids: Vec::with_capacity(n),
        pair_ids: Vec::with_capacity(n),
        ..TokenStore::default()
    };
    store.offsets.push(0);
    let mut query_index: HashMap<&str, u32> = HashMap::new();
    let numeric: Option<Vec<i64>> = rows.iter().map(|r| r.id.trim().parse::<i64>().ok()).collect();
    for (i, (row, enc)) in rows.iter().zip(encoded).enumerate() {
        store.ids.extend_from_slice(&enc.ids);
        store.offsets.push(store.ids.len() as i64);
        store.labels.push(row.label);
        store.relevance.push(row.relevance);
        let next = store.queries.len() as u32;
        let q = *query_index.entry(row.query.as_str()).or_insert_with(|| {
            store.queries.push(row.query.clone());
            next
        });
        store.query_ids.push(q);
        if numeric.is_none() {
            store.pair_ids.push(i as i64);
        }
    }
    match numeric {
        Some(ids) => store.pair_ids = ids,
        None => store.pair_keys = Some(rows.iter().map(|r| r.id.clone()).collect()),
    }
    store
}

/// Nearest-rank percentiles of prompt lengths (0 for an empty split).
fn length_stats(lengths: &[usize]) -> JsonMap {
    let mut sorted = lengths.to_vec();
    sorted.sort_unstable();
    let pct = |p: f64| -> usize {
        if sorted.is_empty() {
            return 0;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    };
    let mean = if sorted.is_empty() { 0.0 } else { sorted.iter().sum::<usize>() as f64 / sorted.len() as f64 };
    let mut m = JsonMap::new();
    m.insert("len_p50".into(), json!(pct(50.0)));
    m.insert("len_p90".into(), json!(pct(90.0)));
    m.insert("len_p99".into(), json!(pct(99.0)));
    m.insert("len_max".into(), json!(sorted.last().copied().unwrap_or(0)));
    m.insert("len_mean".into(), json!((mean * 100.0).round() / 100.0));
    m
}

#[cfg(test)]
mod tests;
