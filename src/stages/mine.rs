//! `mine`: hard negatives for each training query, between `split` and `tokenize`.
//!
//! A query-grouped loss (`train.loss = "group_ce"`) learns most from negatives the model finds
//! hard, and the labelled data has few per query. This stage ranks candidate documents (the train
//! split's products, or a `corpus` file) for each training query with BM25 ([`crate::text::bm25`],
//! the scorer analyze reports as a baseline) or a reranker (scored through
//! [`crate::model::score::score_all`], as evaluate and `pipe rerank` score), and appends the chosen
//! ones to `train.csv` as label-0 rows. Val and test pass through byte for byte, so no evaluation
//! query is touched and, with the default corpus, no document seen only in evaluation is mined.
//!
//! The selection ([`select`]) follows sentence-transformers' `mine_hard_negatives`: the query's
//! labelled documents never enter the ranking, ranks are 0-based, the window is
//! `range_min <= rank < range_max`, and a candidate scoring above the weakest positive minus
//! `margin` is dropped as a likely false negative. It is a pure function of scores, so the tests
//! check the rules without a model.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::Deserialize;

use super::table::Record;
use crate::engine::{
    Contract, ExternalInput, GpuDemand, JsonMap, Need, ParamError, StageContext, StageError, StageOutput, StageParams,
    TypedStage,
};
use crate::hub::HubSettings;
use crate::model::device::{compute_identity, parse_dtype};
use crate::model::{LoadOptions, ModelSource};
use crate::text::bm25::{tokenize, Bm25Index};
use crate::text::{PromptConfig, PromptEncoder, TokenizerSource};

pub const KIND: &str = "mine";
/// Bump when the same inputs and parameters would give different files.
pub const VERSION: u32 = 1;
const DEFAULTS: &str = include_str!("../../stages/mine.toml");

/// The column mine adds to the split's train table: 1 on a mined row, 0 on the split's own rows.
pub const MINED: &str = "mined";

/// The split's three tables in, the same three out (train with mined rows), so `tokenize` reads
/// either stage the same way.
pub const CONTRACT: Contract = Contract { needs: &[Need::always(&[super::split::KIND])], writes: &super::split::FILES };

/// The parameters that only the model miner reads: left out of the key for `miner = "bm25"`, so
/// setting a device or a model there reruns nothing.
const MODEL_ONLY: [&str; 9] = [
    "model",
    "prefilter",
    "tokenizer",
    "instruction",
    "max_length",
    "max_description_tokens",
    "device",
    "dtype",
    "batch_size",
];

pub struct Mine;

/// The parameters of `stages/mine.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MineParams {
    pub miner: String,
    pub negatives_per_query: i64,
    pub range_min: i64,
    pub range_max: i64,
    pub margin: f64,
    pub corpus: String,
    pub bm25_k1: f64,
    pub bm25_b: f64,
    pub model: String,
    pub prefilter: i64,
    pub tokenizer: String,
    pub instruction: String,
    pub max_length: i64,
    pub max_description_tokens: i64,
    pub device: String,
    pub dtype: String,
    pub batch_size: i64,
}

impl MineParams {
    fn uses_model(&self) -> bool {
        self.miner == "model"
    }
}

impl StageParams for MineParams {
    fn validate(&self) -> Result<(), ParamError> {
        if !matches!(self.miner.as_str(), "bm25" | "model") {
            return Err(ParamError::new("miner", format!("`{}`: expected \"bm25\" or \"model\"", self.miner)));
        }
        if self.negatives_per_query < 1 {
            return Err(ParamError::new(
                "negatives_per_query",
                format!("must be at least 1, found {}", self.negatives_per_query),
            ));
        }
        if self.range_min < 0 {
            return Err(ParamError::new(
                "range_min",
                format!("{} is negative; ranks are 0-based, write 0 to start at the top", self.range_min),
            ));
        }
        if self.range_max - self.range_min < self.negatives_per_query {
            return Err(ParamError::new(
                "range_max",
                format!(
                    "the window [range_min, range_max) = [{}, {}) holds {} ranks, fewer than negatives_per_query = {}; \
                     raise range_max to at least {}",
                    self.range_min,
                    self.range_max,
                    (self.range_max - self.range_min).max(0),
                    self.negatives_per_query,
                    self.range_min + self.negatives_per_query
                ),
            ));
        }
        if !self.margin.is_finite() {
            return Err(ParamError::new(
                "margin",
                format!("{} is not a finite number; a large negative margin turns the filter off", self.margin),
            ));
        }
        if !(self.bm25_k1.is_finite() && self.bm25_k1 >= 0.0) {
            return Err(ParamError::new("bm25_k1", format!("{} is not a number >= 0", self.bm25_k1)));
        }
        if !(0.0..=1.0).contains(&self.bm25_b) {
            return Err(ParamError::new("bm25_b", format!("{} is outside [0, 1]", self.bm25_b)));
        }
        if self.prefilter < 0 {
            return Err(ParamError::new("prefilter", format!("must be 0 (off) or more, found {}", self.prefilter)));
        }
        if self.batch_size < 1 {
            return Err(ParamError::new("batch_size", format!("must be at least 1, found {}", self.batch_size)));
        }
        super::check_device_and_dtype(&self.device, &self.dtype)?;
        TokenizerSource::parse(&self.tokenizer).map_err(|e| ParamError::new("tokenizer", e))?;
        if self.max_length < 1 {
            return Err(ParamError::new(
                "max_length",
                format!("must be a positive number of tokens, got {}", self.max_length),
            ));
        }
        if self.max_description_tokens < 0 {
            return Err(ParamError::new(
                "max_description_tokens",
                format!("must be 0 or more tokens, got {}", self.max_description_tokens),
            ));
        }
        if self.uses_model() && self.model.trim().is_empty() {
            return Err(ParamError::new(
                "model",
                "miner = \"model\" needs a reranker: set `model` to a local model directory or \
                 \"hf:<owner>/<name>[@revision]\" (or use miner = \"bm25\")",
            ));
        }
        Ok(())
    }
}

/// Why mining failed, before it becomes a [`StageError`] at the stage boundary.
#[derive(Debug, thiserror::Error)]
pub enum MineError {
    /// The corpus file is not a table of products: names the file, the line and what to fix.
    #[error("{file}:{line}: {message}")]
    Corpus { file: String, line: u64, message: String },
    #[error("{0}")]
    Model(#[from] crate::model::ModelError),
    #[error("{0}")]
    Text(#[from] crate::text::TextError),
}

impl From<MineError> for StageError {
    fn from(e: MineError) -> Self {
        match e {
            MineError::Corpus { file, line, message } => StageError::Data { file, line, message },
            MineError::Model(m) => StageError::param("model", m),
            MineError::Text(t) => StageError::param("tokenizer", t),
        }
    }
}

/// A candidate document.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub product_id: String,
    pub title: String,
    pub description: String,
}

/// What the window and margin rules keep for one query, and what they dropped.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Selection {
    /// Indices into the candidate slice, in rank order.
    pub picked: Vec<usize>,
    /// Candidates inside the window whose score was above `lowest_positive - margin`.
    pub dropped_margin: usize,
}

/// The rules of `stages/mine.toml` on one query's scored candidates (its labelled documents
/// already left out): rank by score, highest first, ties by index (the caller orders candidates by
/// product id); keep ranks `range_min..range_max`; walking them in order, drop each whose score is
/// above `lowest_positive - margin` and pick the first `n` others.
pub fn select(
    scores: &[f64],
    lowest_positive: f64,
    n: usize,
    range_min: usize,
    range_max: usize,
    margin: f64,
) -> Selection {
    let by_rank = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Only the window's ranks matter: partition out the top range_max (the order is total, so the
    // same set as a full sort) and sort those; 40k candidates per query add up over 8k queries.
    if range_max < order.len() {
        order.select_nth_unstable_by(range_max, by_rank);
        order.truncate(range_max);
    }
    order.sort_by(by_rank);
    let ceiling = lowest_positive - margin;
    let mut out = Selection::default();
    for &i in order.iter().take(range_max).skip(range_min) {
        if out.picked.len() == n {
            break;
        }
        if scores[i] > ceiling {
            out.dropped_margin += 1;
        } else {
            out.picked.push(i);
        }
    }
    out
}

/// One labelled row of the split's train table.
#[derive(Debug, Clone)]
struct Row {
    record: Record,
    label: bool,
}

/// Scores (query, document) pairs: BM25 or a reranker.
trait Scorer {
    fn score(&self, pairs: &[(&str, &Doc)], ctx: &StageContext) -> Result<Vec<f64>, StageError>;

    /// The query against every corpus document (corpus order) when the scorer has a cheap way to do
    /// that, as BM25's inverted index; `None` sends the candidates through [`Scorer::score`].
    fn score_corpus(&self, _query: &str) -> Option<Vec<f64>> {
        None
    }
}

/// BM25 over title + description, statistics from the corpus.
struct Bm25Scorer {
    index: Bm25Index,
}

fn doc_tokens(d: &Doc) -> Vec<String> {
    tokenize(&format!("{} {}", d.title, d.description))
}

impl Bm25Scorer {
    fn fit(corpus: &[Doc], k1: f64, b: f64) -> Self {
        let docs: Vec<Vec<String>> = corpus.iter().map(doc_tokens).collect();
        Bm25Scorer { index: Bm25Index::fit(&docs, k1, b) }
    }
}

impl Scorer for Bm25Scorer {
    fn score(&self, pairs: &[(&str, &Doc)], _ctx: &StageContext) -> Result<Vec<f64>, StageError> {
        Ok(pairs.iter().map(|(q, d)| self.index.bm25().score(&tokenize(q), &doc_tokens(d))).collect())
    }

    fn score_corpus(&self, query: &str) -> Option<Vec<f64>> {
        Some(self.index.score_all(&tokenize(query)))
    }
}

/// A Qwen3 reranker's P(yes), through the prompt encoder and batched scorer `pipe rerank` uses.
struct ModelScorer {
    encoder: PromptEncoder,
    reranker: crate::model::Reranker,
    device: candle_core::Device,
    batch_size: usize,
}

impl ModelScorer {
    fn open(ctx: &StageContext, p: &MineParams) -> Result<Self, StageError> {
        let source = TokenizerSource::parse(&p.tokenizer).map_err(|e| StageError::param("tokenizer", e))?;
        let json = source.read_json(ctx.root).map_err(|e| StageError::param("tokenizer", e))?;
        let tokenizer = crate::text::tokenizer::from_json(&json).map_err(|e| StageError::param("tokenizer", e))?;
        let config = PromptConfig {
            instruction: p.instruction.clone(),
            max_length: p.max_length as usize,
            max_description_tokens: p.max_description_tokens as usize,
        };
        let encoder = PromptEncoder::new(tokenizer, config).map_err(|e| StageError::param("max_length", e))?;
        let device = super::open_device(&p.device, ctx.gpus).map_err(|e| StageError::param("device", e))?;
        let spec = if p.model.starts_with("hf:") { p.model.clone() } else { ctx.path(&p.model).display().to_string() };
        let model: ModelSource = spec.parse().map_err(MineError::Model)?;
        let files = crate::model::resolve(&model, &HubSettings::from_env()).map_err(MineError::Model)?;
        let dtype = parse_dtype(&p.dtype).map_err(|e| StageError::param("dtype", e))?;
        let yn = encoder.yes_no();
        let reranker = crate::model::seqcls::load_reranker(
            &files,
            &LoadOptions { dtype, device: device.clone(), trainable: false },
            yn.yes,
            yn.no,
        )
        .map_err(MineError::Model)?;
        Ok(ModelScorer { encoder, reranker, device, batch_size: p.batch_size as usize })
    }
}

impl Scorer for ModelScorer {
    fn score(&self, pairs: &[(&str, &Doc)], ctx: &StageContext) -> Result<Vec<f64>, StageError> {
        let encoded: Vec<Vec<u32>> = pairs
            .iter()
            .map(|(q, d)| self.encoder.encode_pair(q, &d.title, &d.description).map(|e| e.ids))
            .collect::<Result<_, _>>()
            .map_err(MineError::Text)?;
        let seqs: Vec<&[u32]> = encoded.iter().map(Vec::as_slice).collect();
        let bar = ctx.bar(seqs.len() as u64, "scoring candidates");
        let scores = crate::model::score::score_all(&self.reranker, &seqs, self.batch_size, &self.device, |done| {
            bar.set_position(done as u64);
            ctx.check_cancel().is_ok()
        })
        .map_err(MineError::Model)?
        .ok_or(StageError::Cancelled)?;
        bar.finish_and_clear();
        Ok(scores.iter().map(|s| f64::from(s.p_yes)).collect())
    }
}

/// The split's train table, labelled rows in file order.
fn read_train(path: &Path) -> Result<Vec<Row>, StageError> {
    Ok(super::table::read_labeled(path)?.into_iter().map(|l| Row { record: l.record, label: l.label }).collect())
}

/// The distinct products of the train rows, first title and description seen, sorted by product id.
fn train_corpus(rows: &[Row]) -> Vec<Doc> {
    let mut seen = HashSet::new();
    let mut docs: Vec<Doc> = rows
        .iter()
        .filter(|r| seen.insert(r.record.product_id.as_str()))
        .map(|r| Doc {
            product_id: r.record.product_id.clone(),
            title: r.record.title.clone(),
            description: r.record.description.clone(),
        })
        .collect();
    docs.sort_by(|a, b| a.product_id.cmp(&b.product_id));
    docs
}

/// A corpus CSV: header with `product_id` and `title` (and optionally `description`); one document
/// per product id (the first row wins), sorted by product id.
pub fn read_corpus(path: &Path, shown: &str) -> Result<Vec<Doc>, MineError> {
    let bad = |line: u64, message: String| MineError::Corpus { file: shown.to_string(), line, message };
    let mut rdr = csv::ReaderBuilder::new().from_path(path).map_err(|e| bad(0, e.to_string()))?;
    let header = rdr.headers().map_err(|e| bad(1, e.to_string()))?.clone();
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let (Some(pid), Some(title)) = (col("product_id"), col("title")) else {
        return Err(bad(
            1,
            format!(
                "expected the columns product_id and title (description optional), found `{}`; a load or \
                 normalize table.csv has them",
                header.iter().collect::<Vec<_>>().join(",")
            ),
        ));
    };
    let description = col("description");
    let mut seen = HashSet::new();
    let mut docs = Vec::new();
    let mut rec = csv::StringRecord::new();
    loop {
        match rdr.read_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(bad(e.position().map_or(0, |p| p.line()), e.to_string())),
        }
        let line = rec.position().map_or(0, |p| p.line());
        let id = rec.get(pid).unwrap_or("").trim();
        if id.is_empty() {
            return Err(bad(line, "empty product_id".into()));
        }
        if seen.insert(id.to_string()) {
            docs.push(Doc {
                product_id: id.to_string(),
                title: rec.get(title).unwrap_or("").to_string(),
                description: description.and_then(|d| rec.get(d)).unwrap_or("").to_string(),
            });
        }
    }
    if docs.is_empty() {
        return Err(bad(1, "no documents: the corpus has a header and no rows".into()));
    }
    docs.sort_by(|a, b| a.product_id.cmp(&b.product_id));
    Ok(docs)
}

/// What mining one train table gives: the mined rows (in query order) and the counts.
#[derive(Debug, Default)]
pub struct Mined {
    pub rows: Vec<Record>,
    pub queries: usize,
    pub queries_mined: usize,
    pub queries_without_positive: usize,
    pub queries_short: usize,
    pub dropped_margin: usize,
    pub dropped_positive: usize,
    pub excluded_labelled_negative: usize,
}

/// Mine negatives for every query of `rows` from `corpus` with `scorer`.
fn mine(
    rows: &[Row],
    corpus: &[Doc],
    scorer: &dyn Scorer,
    prefilter: Option<&Bm25Scorer>,
    p: &MineParams,
    ctx: &StageContext,
) -> Result<Mined, StageError> {
    // Queries in order of first appearance, with their labelled products and positive documents.
    let mut order: Vec<&str> = Vec::new();
    let mut labelled: HashMap<&str, (HashSet<&str>, Vec<Doc>)> = HashMap::new();
    for r in rows {
        let e = labelled.entry(r.record.query.as_str()).or_insert_with(|| {
            order.push(r.record.query.as_str());
            Default::default()
        });
        e.0.insert(r.record.product_id.as_str());
        if r.label {
            e.1.push(Doc {
                product_id: r.record.product_id.clone(),
                title: r.record.title.clone(),
                description: r.record.description.clone(),
            });
        }
    }
    let mut out = Mined { queries: order.len(), ..Default::default() };
    let prefilter_k = p.prefilter as usize;
    let n = p.negatives_per_query as usize;
    let bar = ctx.bar(order.len() as u64, "ranking candidates per query");
    // Applies the window and margin to one query's scored candidates and keeps the picks.
    let take = |out: &mut Mined, q: &str, pos: &[f64], cands: &[usize], cand_scores: &[f64]| {
        let lowest = pos.iter().copied().fold(f64::INFINITY, f64::min);
        let sel = select(cand_scores, lowest, n, p.range_min as usize, p.range_max as usize, p.margin);
        out.dropped_margin += sel.dropped_margin;
        out.queries_mined += usize::from(!sel.picked.is_empty());
        out.queries_short += usize::from(sel.picked.len() < n);
        for j in sel.picked {
            let d = &corpus[cands[j]];
            out.rows.push(Record {
                id: String::new(),
                product_id: d.product_id.clone(),
                query: q.to_string(),
                title: d.title.clone(),
                description: d.description.clone(),
                relevance: 1.0,
            });
        }
    };
    // Per query: (query, positives, candidate indices into corpus), for scorers that score pairs.
    let mut plans: Vec<(&str, &[Doc], Vec<usize>)> = Vec::new();
    for (k, q) in order.iter().enumerate() {
        if k % 256 == 0 {
            ctx.check_cancel()?;
            bar.set_position(k as u64);
        }
        let (ids, positives) = &labelled[q];
        if positives.is_empty() {
            out.queries_without_positive += 1;
            continue;
        }
        let pos_ids: HashSet<&str> = positives.iter().map(|d| d.product_id.as_str()).collect();
        let mut cands = Vec::new();
        for (i, d) in corpus.iter().enumerate() {
            if pos_ids.contains(d.product_id.as_str()) {
                out.dropped_positive += 1;
            } else if ids.contains(d.product_id.as_str()) {
                out.excluded_labelled_negative += 1;
            } else {
                cands.push(i);
            }
        }
        if let Some(all) = scorer.score_corpus(q) {
            // Scored now, one query at a time: the candidates of every query together would not fit.
            let pairs: Vec<(&str, &Doc)> = positives.iter().map(|d| (*q, d)).collect();
            let pos = scorer.score(&pairs, ctx)?;
            let cand_scores: Vec<f64> = cands.iter().map(|&i| all[i]).collect();
            take(&mut out, q, &pos, &cands, &cand_scores);
            continue;
        }
        if let (Some(bm), true) = (prefilter, prefilter_k > 0 && cands.len() > prefilter_k) {
            let all = bm.index.score_all(&tokenize(q));
            let s: Vec<f64> = cands.iter().map(|&i| all[i]).collect();
            let mut idx: Vec<usize> = (0..cands.len()).collect();
            idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
            idx.truncate(prefilter_k);
            idx.sort_unstable();
            cands = idx.into_iter().map(|j| cands[j]).collect();
        }
        plans.push((q, positives, cands));
    }
    bar.finish_and_clear();
    ctx.check_cancel()?;
    // Every pair of every query in one call, so the model scorer fills its batches.
    let mut pairs: Vec<(&str, &Doc)> = Vec::new();
    for (q, positives, cands) in &plans {
        pairs.extend(positives.iter().map(|d| (*q, d)));
        pairs.extend(cands.iter().map(|&i| (*q, &corpus[i])));
    }
    if !pairs.is_empty() {
        let scores = scorer.score(&pairs, ctx)?;
        let mut at = 0;
        for (q, positives, cands) in &plans {
            let pos = &scores[at..at + positives.len()];
            at += positives.len();
            let cand_scores = &scores[at..at + cands.len()];
            at += cands.len();
            take(&mut out, q, pos, cands, cand_scores);
        }
    }
    // Fresh ids: after the largest integer id, or `mined-<n>` when ids are not all integers.
    let max_id: Option<i64> = rows
        .iter()
        .map(|r| r.record.id.trim().parse::<i64>().ok())
        .collect::<Option<Vec<i64>>>()
        .map(|v| v.into_iter().max().unwrap_or(0));
    for (k, r) in out.rows.iter_mut().enumerate() {
        r.id = match max_id {
            Some(m) => (m + 1 + k as i64).to_string(),
            None => format!("mined-{}", k + 1),
        };
    }
    Ok(out)
}

/// The split's train rows (mined = 0) then the mined rows (label 0, mined = 1), in the table's byte
/// conventions ([`super::table`]) with one more column.
fn write_train(path: &Path, rows: &[Row], mined: &[Record]) -> Result<(), StageError> {
    let name = path.display().to_string();
    let io = |e: csv::Error| StageError::Io { path: name.clone(), source: std::io::Error::other(e.to_string()) };
    let mut w = csv::WriterBuilder::new()
        .quote_style(csv::QuoteStyle::Necessary)
        .terminator(csv::Terminator::Any(b'\n'))
        .from_path(path)
        .map_err(io)?;
    let mut header: Vec<&str> = super::table::COLUMNS.to_vec();
    header.extend([super::table::LABEL, MINED]);
    w.write_record(&header).map_err(io)?;
    let all = rows.iter().map(|r| (&r.record, r.label, false)).chain(mined.iter().map(|r| (r, false, true)));
    for (r, label, is_mined) in all {
        let rel = format!("{}", r.relevance);
        w.write_record([
            r.id.as_str(),
            &r.product_id,
            &r.query,
            &r.title,
            &r.description,
            &rel,
            if label { "1" } else { "0" },
            if is_mined { "1" } else { "0" },
        ])
        .map_err(io)?;
    }
    w.flush().map_err(|e| StageError::io(path, e))
}

impl TypedStage for Mine {
    type Params = MineParams;
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const DEFAULTS: &'static str = DEFAULTS;
    const CONTRACT: Contract = CONTRACT;

    fn available(p: &MineParams) -> Result<(), ParamError> {
        if p.uses_model() {
            super::device_available(&p.device)
        } else {
            Ok(())
        }
    }

    fn gpus(p: &MineParams) -> GpuDemand {
        if p.uses_model() {
            super::device_gpus(&p.device)
        } else {
            GpuDemand::None
        }
    }

    fn canonical_key(params: &mut toml::Table) {
        if params.get("miner").and_then(|v| v.as_str()) == Some("bm25") {
            params.retain(|k, _| !MODEL_ONLY.contains(&k));
        } else {
            super::canonical_device(params);
        }
    }

    fn inputs(p: &MineParams) -> Vec<ExternalInput> {
        let mut v = Vec::new();
        if !p.corpus.is_empty() {
            v.push(ExternalInput::File(p.corpus.clone()));
        }
        if p.uses_model() {
            // CPU and GPU scores differ in the last bits: where it computes is part of the key.
            v.push(ExternalInput::Remote(compute_identity(&p.device)));
            if p.model.starts_with("hf:") {
                v.push(ExternalInput::Remote(p.model.clone()));
            } else {
                v.push(ExternalInput::Dir(p.model.clone()));
            }
            match TokenizerSource::parse(&p.tokenizer) {
                Ok(TokenizerSource::File(f)) => v.push(ExternalInput::File(f.display().to_string())),
                Ok(src) => v.push(ExternalInput::Remote(src.identity())),
                Err(_) => {}
            }
        }
        v
    }

    fn run(ctx: &StageContext, p: &MineParams) -> Result<StageOutput, StageError> {
        let split_dir = ctx.upstream_of(&[super::split::KIND])?.dir.clone();
        let rows = read_train(&split_dir.join(super::split::TRAIN_FILE))?;
        let corpus = if p.corpus.is_empty() {
            train_corpus(&rows)
        } else {
            let path = ctx.path(&p.corpus);
            if !path.is_file() {
                return Err(StageError::param(
                    "corpus",
                    format!("{} is not a file; name a CSV with product_id and title columns, or \"\" for the train split's products", p.corpus),
                ));
            }
            read_corpus(&path, &p.corpus)?
        };
        let bm25 = Bm25Scorer::fit(&corpus, p.bm25_k1, p.bm25_b);
        let mined = if p.uses_model() {
            let scorer = ModelScorer::open(ctx, p)?;
            mine(&rows, &corpus, &scorer, Some(&bm25), p, ctx)?
        } else {
            mine(&rows, &corpus, &bm25, None, p, ctx)?
        };
        write_train(&ctx.out.join(super::split::TRAIN_FILE), &rows, &mined.rows)?;
        for file in [super::split::VAL_FILE, super::split::TEST_FILE] {
            let (from, to) = (split_dir.join(file), ctx.out.join(file));
            std::fs::copy(&from, &to).map_err(|e| StageError::io(&from, e))?;
        }
        let mut metrics = JsonMap::new();
        metrics.insert("queries".into(), mined.queries.into());
        metrics.insert("queries_mined".into(), mined.queries_mined.into());
        metrics.insert("mined".into(), mined.rows.len().into());
        metrics.insert("dropped_margin".into(), mined.dropped_margin.into());
        metrics.insert("dropped_positive".into(), mined.dropped_positive.into());
        let mut stats = JsonMap::new();
        stats.insert("miner".into(), p.miner.clone().into());
        stats.insert("corpus_documents".into(), corpus.len().into());
        stats.insert("train_rows".into(), rows.len().into());
        stats.insert("queries_without_positive".into(), mined.queries_without_positive.into());
        stats.insert("queries_short".into(), mined.queries_short.into());
        stats.insert("excluded_labelled_negative".into(), mined.excluded_labelled_negative.into());
        Ok(StageOutput { metrics, stats })
    }
}

#[cfg(test)]
mod tests;
