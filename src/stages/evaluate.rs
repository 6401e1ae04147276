//! `evaluate`: score val and test with the trained (or base, or any) reranker and compute every metric.
//!
//! The scores feed [`crate::metrics`]; everything is written where `analyze` and `pipe compare`
//! expect it (formats in `stages/evaluate.toml`). Calibration for RMSE and the tuned threshold are
//! fitted on validation only.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use serde::Deserialize;

use crate::engine::{ExternalInput, JsonMap, Params, Stage, StageContext, StageError, StageOutput};
use crate::hub::HubSettings;
use crate::metrics::{self, Prediction};
use crate::model::device::{parse_device, parse_dtype};
use crate::model::score::score_all;
use crate::model::{LoadOptions, ModelError, ModelSource, Reranker};
use crate::text::TokenStore;

/// Bump when the predictions or metrics for the same inputs change.
pub const VERSION: u32 = 1;
const DEFAULTS: &str = include_str!("../../stages/evaluate.toml");
const SPLITS: [&str; 2] = ["val", "test"];

pub struct Evaluate;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvaluateParams {
    model: String,
    batch_size: i64,
    device: String,
    dtype: String,
    threshold: f64,
    k: Vec<i64>,
}

fn model_err(e: ModelError) -> StageError {
    StageError::Failed(e.to_string())
}

impl Stage for Evaluate {
    fn kind(&self) -> &'static str {
        "evaluate"
    }
    fn version(&self) -> u32 {
        VERSION
    }
    fn defaults(&self) -> &'static str {
        DEFAULTS
    }
    fn check(&self, p: &Params) -> Result<(), (String, String)> {
        let bs = p.i64("batch_size").unwrap_or(0);
        if bs < 1 {
            return Err(("batch_size".into(), format!("must be at least 1, found {bs}")));
        }
        let dev = p.str("device").unwrap_or("");
        if dev.parse::<crate::model::device::DeviceSpec>().is_err() {
            return Err(("device".into(), format!("expected auto, cpu, cuda or cuda:N, found {dev:?}")));
        }
        let dt = p.str("dtype").unwrap_or("");
        if parse_dtype(dt).is_err() {
            return Err(("dtype".into(), format!("expected f32, bf16 or f16, found {dt:?}")));
        }
        let t = p.f64("threshold").unwrap_or(-1.0);
        if !(0.0..=1.0).contains(&t) {
            return Err(("threshold".into(), format!("must be in [0, 1], found {t}")));
        }
        let ks =
            p.get("k").and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|v| v.as_integer()).collect::<Vec<_>>());
        match ks {
            Some(ks) if !ks.is_empty() && ks.iter().all(|k| *k >= 1) => {}
            _ => return Err(("k".into(), "expected a non-empty list of cut-offs >= 1".into())),
        }
        let m = p.str("model").unwrap_or("");
        if m.is_empty() {
            return Err((
                "model".into(),
                "expected \"trained\", \"base\", a model directory or hf:<owner>/<name>".into(),
            ));
        }
        Ok(())
    }
    fn inputs(&self, p: &Params) -> Vec<ExternalInput> {
        // CPU and GPU scores differ in the last bits: where it computes is part of the key.
        let device = ExternalInput::Remote(crate::model::device::compute_identity(p.str("device").unwrap_or("auto")));
        match p.str("model").unwrap_or("trained") {
            "trained" | "base" => vec![device],
            hub if hub.starts_with("hf:") => vec![ExternalInput::Remote(hub.to_string()), device],
            dir => vec![ExternalInput::Dir(dir.to_string()), device],
        }
    }

    fn run(&self, ctx: &StageContext) -> Result<StageOutput, StageError> {
        let p: EvaluateParams = ctx.params()?;
        let device = parse_device(&p.device).map_err(model_err)?;
        let dtype = parse_dtype(&p.dtype).map_err(model_err)?;
        let tok_dir = &ctx.upstream_of("tokenize")?.dir;
        let model_dir = match p.model.as_str() {
            "trained" => Some(ctx.upstream_of("train")?.dir.join("model")),
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
        let split_rows: HashMap<(String, String), (String, String)> = match ctx.upstream_of("split") {
            Ok(u) => {
                let mut m = HashMap::new();
                for s in SPLITS {
                    for r in crate::stages::table::read_labeled(&u.dir.join(format!("{s}.csv")))? {
                        m.insert((s.to_string(), r.record.id.clone()), (r.record.product_id, r.record.title));
                    }
                }
                m
            }
            Err(_) => HashMap::new(),
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
        write(ctx.out, "predictions.csv", &bytes)?;
        write(ctx.out, "relevance_analysis.csv", analysis.as_bytes())?;

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
        write(ctx.out, "evaluation_metrics.json", &serde_json::to_vec_pretty(&file).expect("json"))?;
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
    let tok = crate::text::load_tokenizer(&tok_dir.join("tokenizer.json").display().to_string(), tok_dir)
        .map_err(|e| StageError::Upstream(e.to_string()))?;
    let ids = crate::text::yes_no_ids(&tok).map_err(|e| StageError::Upstream(e.to_string()))?;
    Ok((ids.yes, ids.no))
}

/// The model the upstream train stage started from (its `model` parameter, from its manifest).
fn base_model(ctx: &StageContext) -> Result<ModelSource, StageError> {
    let train = ctx.upstream_of("train")?;
    let manifest = crate::engine::store::read_manifest(&train.dir)
        .map_err(|e| StageError::Upstream(e.to_string()))?
        .ok_or_else(|| StageError::Upstream("the train artifact has no manifest".into()))?;
    let spec = manifest.key_inputs.params.get("model").and_then(|v| v.as_str()).unwrap_or("random").to_string();
    if spec == "random" {
        return Err(StageError::Param {
            key: "model".into(),
            message:
                "`base` is the train stage's starting model, but it was `random`: there is no pretrained base to score"
                    .into(),
        });
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
