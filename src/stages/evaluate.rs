//! `evaluate`: score val and test with the trained (or base, or any) reranker and compute every metric.
//!
//! The scores feed [`crate::metrics`]; everything is written where `analyze` and `pipe compare`
//! expect it (formats in `stages/evaluate.toml`). Calibration for RMSE and the tuned threshold are
//! fitted on validation only.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use serde::Deserialize;

use crate::engine::{
    Contract, ExternalInput, GpuDemand, JsonMap, Need, ParamError, StageContext, StageError, StageOutput, StageParams,
    TypedStage, When,
};
use crate::hub::HubSettings;
use crate::metrics::{self, Prediction};
use crate::model::device::{compute_identity, parse_dtype};
use crate::model::score::score_all;
use crate::model::{LoadOptions, ModelError, ModelSource, Reranker};
use crate::text::TokenStore;

pub const KIND: &str = "evaluate";
/// Bump when the predictions or metrics for the same inputs change.
pub const VERSION: u32 = 1;
const DEFAULTS: &str = include_str!("../../stages/evaluate.toml");
const SPLITS: [&str; 2] = ["val", "test"];

/// `split,query,product_id,title,relevance,label,score,rank`, one row per scored pair (`analyze`
/// recomputes every metric from it).
pub const PREDICTIONS: &str = "predictions.csv";
/// `{"val": {…}, "test": {…}, "tuned_threshold": {…}}`.
pub const METRICS: &str = "evaluation_metrics.json";
/// Per split and relevance level: count, mean score, accuracy, share predicted positive.
pub const RELEVANCE_ANALYSIS: &str = "relevance_analysis.csv";

/// The `model` values that score the upstream train stage's model (`trained`) or the model it
/// started from (`base`, read from its manifest): only these need a train stage.
pub const MODELS_FROM_TRAIN: &[&str] = &["trained", "base"];

/// The token stores always; the train stage for [`MODELS_FROM_TRAIN`]; the split tables when
/// present, for product ids and titles in the predictions.
pub const CONTRACT: Contract = Contract {
    needs: &[
        Need::always(&[super::tokenize::KIND]),
        Need { kinds: &[super::train::KIND], when: When::ParamIs { key: "model", one_of: MODELS_FROM_TRAIN } },
        Need::optional(&[super::split::KIND]),
    ],
    writes: &[PREDICTIONS, METRICS, RELEVANCE_ANALYSIS],
};

pub struct Evaluate;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateParams {
    pub model: String,
    pub batch_size: i64,
    pub device: String,
    pub dtype: String,
    pub threshold: f64,
    pub k: Vec<i64>,
}

impl StageParams for EvaluateParams {
    fn validate(&self) -> Result<(), ParamError> {
        if self.batch_size < 1 {
            return Err(ParamError::new("batch_size", format!("must be at least 1, found {}", self.batch_size)));
        }
        super::check_device_and_dtype(&self.device, &self.dtype)?;
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(ParamError::new("threshold", format!("must be in [0, 1], found {}", self.threshold)));
        }
        if self.k.is_empty() || self.k.iter().any(|k| *k < 1) {
            return Err(ParamError::new("k", "expected a non-empty list of cut-offs >= 1"));
        }
        if self.model.is_empty() {
            return Err(ParamError::new(
                "model",
                "expected \"trained\", \"base\", a model directory or hf:<owner>/<name>",
            ));
        }
        Ok(())
    }
}

fn model_err(e: ModelError) -> StageError {
    StageError::Failed(e.to_string())
}

impl TypedStage for Evaluate {
    type Params = EvaluateParams;
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const DEFAULTS: &'static str = DEFAULTS;
    const CONTRACT: Contract = CONTRACT;

    fn available(p: &EvaluateParams) -> Result<(), ParamError> {
        super::device_available(&p.device)
    }

    fn gpus(p: &EvaluateParams) -> GpuDemand {
        super::device_gpus(&p.device)
    }

    fn canonical_key(params: &mut toml::Table) {
        super::canonical_device(params)
    }

    fn inputs(p: &EvaluateParams) -> Vec<ExternalInput> {
        // CPU and GPU scores differ in the last bits: where it computes is part of the key.
        let device = ExternalInput::Remote(compute_identity(&p.device));
        match p.model.as_str() {
            m if MODELS_FROM_TRAIN.contains(&m) => vec![device],
            hub if hub.starts_with("hf:") => vec![ExternalInput::Remote(hub.to_string()), device],
            dir => vec![ExternalInput::Dir(dir.to_string()), device],
        }
    }

    fn run(ctx: &StageContext, p: &EvaluateParams) -> Result<StageOutput, StageError> {
        let device = super::open_device(&p.device, ctx.gpus).map_err(model_err)?;
        let dtype = parse_dtype(&p.dtype).map_err(model_err)?;
        let tok_dir = &ctx.upstream_of(&[super::tokenize::KIND])?.dir;
        let model_dir = match p.model.as_str() {
            "trained" => Some(ctx.upstream_of(&[super::train::KIND])?.dir.join(super::train::MODEL_DIR)),
            _ => None,
        };
        let source: ModelSource = match (&model_dir, p.model.as_str()) {
            (Some(dir), _) => dir.display().to_string().parse().map_err(model_err)?,
            (None, "base") => base_model(ctx)?,
            (None, spec) => {
                let spec =
                    if spec.starts_with("hf:") { spec.to_string() } else { ctx.path(spec).display().to_string() };
                spec.parse().map_err(model_err)?
            }
        };
        let opts = LoadOptions { dtype, device: device.clone(), trainable: false };
        let model = crate::model::load(&source, &HubSettings::from_env(), &opts).map_err(model_err)?;

        // product ids and titles from the split stage, by row id, when it is upstream.
        let split_rows: HashMap<(String, String), (String, String)> =
            match ctx.optional_upstream(&[super::split::KIND])? {
                Some(u) => {
                    let mut m = HashMap::new();
                    for s in SPLITS {
                        let file = super::split::file_of(s).expect("evaluate scores splits that split writes");
                        for r in crate::stages::table::read_labeled(&u.dir.join(file))? {
                            m.insert((s.to_string(), r.record.id.clone()), (r.record.product_id, r.record.title));
                        }
                    }
                    m
                }
                None => HashMap::new(),
            };

        let stores: Vec<TokenStore> = SPLITS
            .iter()
            .map(|s| TokenStore::read(tok_dir, s).map_err(|e| StageError::Upstream(e.to_string())))
            .collect::<Result<_, _>>()?;
        let yes_no = yes_no_ids(&stores[0], tok_dir)?;
        let reranker = Reranker::new(model, yes_no.0, yes_no.1).map_err(model_err)?;
        let total: usize = stores.iter().map(|s| s.len()).sum();
        let bar = ctx.bar(total as u64, "scoring");
        let mut preds: Vec<Vec<Prediction>> = Vec::new();
        let mut csv = csv::Writer::from_writer(Vec::new());
        csv.write_record(["split", "query", "product_id", "title", "relevance", "label", "score", "rank"])
            .map_err(|e| StageError::failed(e.to_string()))?;
        let mut analysis = String::from("split,relevance,count,mean_score,accuracy,share_predicted_positive\n");
        let mut offset = 0u64;
        for (split, store) in SPLITS.iter().zip(&stores) {
            let seqs: Vec<&[u32]> = (0..store.len()).map(|i| store.sequence(i)).collect();
            let scores = score_all(&reranker, &seqs, p.batch_size as usize, &device, |done| {
                bar.set_position(offset + done as u64);
                ctx.check_cancel().is_ok()
            })
            .map_err(model_err)?
            .ok_or(StageError::Cancelled)?;
            offset += store.len() as u64;
            let rows: Vec<Prediction> = (0..store.len())
                .map(|i| Prediction {
                    query: store.query(i).to_string(),
                    relevance: store.relevance[i] as f64,
                    score: scores[i].p_yes as f64,
                    label: Some(store.labels[i] == 1),
                })
                .collect();
            let ranks = ranks_within_query(&rows);
            for (i, r) in rows.iter().enumerate() {
                let (pid, title) = split_rows.get(&(split.to_string(), store.pair_key(i))).cloned().unwrap_or_default();
                csv.write_record([
                    split.to_string(),
                    r.query.clone(),
                    pid,
                    title,
                    format!("{}", r.relevance),
                    u8::from(r.label == Some(true)).to_string(),
                    format!("{:.6}", r.score),
                    ranks[i].to_string(),
                ])
                .map_err(|e| StageError::failed(e.to_string()))?;
            }
            analysis.push_str(&relevance_analysis(split, &rows, p.threshold));
            preds.push(rows);
        }
        bar.finish_and_clear();
        let bytes = csv.into_inner().map_err(|e| StageError::failed(e.to_string()))?;
        write(ctx.out, PREDICTIONS, &bytes)?;
        write(ctx.out, RELEVANCE_ANALYSIS, analysis.as_bytes())?;

        let opts = metrics::Options {
            ks: p.k.iter().map(|k| *k as usize).collect(),
            threshold: p.threshold,
            ..Default::default()
        };
        let m = metrics::evaluate_split(&preds[0], &preds[1], &opts).map_err(|e| StageError::failed(e.to_string()))?;
        let mut all = JsonMap::new();
        all.insert("val".into(), serde_json::to_value(&m.val).expect("metrics serialize"));
        all.insert("test".into(), serde_json::to_value(&m.test).expect("metrics serialize"));
        let mut file = all.clone();
        if let Some(t) = &m.tuned {
            file.insert(
                "tuned_threshold".into(),
                serde_json::json!({"threshold": t.threshold, "val_f1": t.val_f1, "test": t.test}),
            );
        }
        write(ctx.out, METRICS, &serde_json::to_vec_pretty(&file).expect("json"))?;
        if !ctx.quiet {
            eprint!("{}", metrics::render_table(&[("val", &m.val), ("test", &m.test)]));
        }
        let mut stats = JsonMap::new();
        stats.insert("pairs".into(), serde_json::json!({"val": preds[0].len(), "test": preds[1].len()}));
        stats.insert("model".into(), serde_json::Value::String(source.to_string()));
        Ok(StageOutput { metrics: all, stats })
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StageError> {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).map_err(|e| StageError::io(&path, e))?;
    f.write_all(bytes).map_err(|e| StageError::io(&path, e))
}

/// The yes/no ids the tokenize stage recorded in its store, so scoring uses the very tokenizer that
/// made the ids; only a store without them makes us parse the (11 MB) tokenizer.json again.
fn yes_no_ids(store: &TokenStore, tok_dir: &Path) -> Result<(u32, u32), StageError> {
    let id = |k: &str| store.metadata.get(k).and_then(|v| v.parse::<u32>().ok());
    if let (Some(yes), Some(no)) = (id("yes_id"), id("no_id")) {
        return Ok((yes, no));
    }
    let tok = crate::text::load_tokenizer(&tok_dir.join(super::tokenize::TOKENIZER).display().to_string(), tok_dir)
        .map_err(|e| StageError::Upstream(e.to_string()))?;
    let ids = crate::text::yes_no_ids(&tok).map_err(|e| StageError::Upstream(e.to_string()))?;
    Ok((ids.yes, ids.no))
}

/// The model the upstream train stage started from (its `model` parameter, from its manifest).
fn base_model(ctx: &StageContext) -> Result<ModelSource, StageError> {
    let train = ctx.upstream_of(&[super::train::KIND])?;
    let manifest = crate::engine::store::read_manifest(&train.dir)
        .map_err(|e| StageError::Upstream(e.to_string()))?
        .ok_or_else(|| StageError::Upstream("the train artifact has no manifest".into()))?;
    let spec = manifest.key_inputs.params.get("model").and_then(|v| v.as_str()).unwrap_or("random").to_string();
    if spec == "random" {
        return Err(StageError::param(
            "model",
            "`base` is the train stage's starting model, but it was `random`: there is no pretrained base to score",
        ));
    }
    let spec = if spec.starts_with("hf:") { spec } else { ctx.path(&spec).display().to_string() };
    spec.parse().map_err(model_err)
}

/// 1-based rank within each query by descending score; ties keep input order.
fn ranks_within_query(rows: &[Prediction]) -> Vec<usize> {
    let mut by_query: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        by_query.entry(r.query.as_str()).or_default().push(i);
    }
    let mut ranks = vec![0; rows.len()];
    for idx in by_query.values_mut() {
        idx.sort_by(|&a, &b| {
            rows[b].score.partial_cmp(&rows[a].score).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
        });
        for (r, &i) in idx.iter().enumerate() {
            ranks[i] = r + 1;
        }
    }
    ranks
}

/// Per relevance level: count, mean score, accuracy at the threshold, share predicted positive.
fn relevance_analysis(split: &str, rows: &[Prediction], threshold: f64) -> String {
    let mut levels: Vec<(f64, Vec<&Prediction>)> = Vec::new();
    for r in rows {
        match levels.iter_mut().find(|(l, _)| (*l - r.relevance).abs() < 1e-9) {
            Some((_, v)) => v.push(r),
            None => levels.push((r.relevance, vec![r])),
        }
    }
    levels.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    let mut out = String::new();
    for (level, rs) in levels {
        let n = rs.len() as f64;
        let mean = rs.iter().map(|r| r.score).sum::<f64>() / n;
        let correct = rs.iter().filter(|r| (r.score >= threshold) == (r.label == Some(true))).count() as f64;
        let pos = rs.iter().filter(|r| r.score >= threshold).count() as f64;
        out.push_str(&format!("{split},{level},{},{mean:.6},{:.6},{:.6}\n", rs.len(), correct / n, pos / n));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(q: &str, rel: f64, score: f64) -> Prediction {
        Prediction { query: q.into(), relevance: rel, score, label: Some(rel >= 2.33) }
    }

    #[test]
    fn ranks_are_per_query_by_descending_score() {
        let rows = vec![pred("a", 3.0, 0.2), pred("b", 1.0, 0.9), pred("a", 1.0, 0.7), pred("a", 2.0, 0.2)];
        assert_eq!(ranks_within_query(&rows), vec![2, 1, 1, 3]);
    }

    #[test]
    fn relevance_analysis_counts_each_level() {
        let rows = vec![pred("a", 3.0, 0.9), pred("a", 3.0, 0.4), pred("b", 1.0, 0.6)];
        let out = relevance_analysis("test", &rows, 0.5);
        assert_eq!(out, "test,1,1,0.600000,0.000000,1.000000\ntest,3,2,0.650000,0.500000,0.500000\n");
    }
}
