//! The single-logit `Qwen3ForSequenceClassification` form of a Qwen3 reranker, which serving
//! stacks (vLLM, text-embeddings-inference, sentence-transformers' `CrossEncoder`) load.
//!
//! The causal reranker's logit is `h · W_yes − h · W_no` at the last prompt token (`h` the
//! final-normed hidden state), which equals `h · (W_yes − W_no)`: one linear row. The export keeps
//! the decoder under the names transformers gives `Qwen3ForSequenceClassification` (`model.…`),
//! drops the LM head and stores that row as `score.weight: [1, hidden]`. transformers pools the
//! last token that is not `pad_token_id`; pipe's prompts end in the assistant header, never in the
//! pad token, so with either padding side that is the prompt's last token, the one pipe scores.
//!
//! The row is computed in f32 from the stored rows and only then cast to the storage dtype: taking
//! the difference in bf16 would round it a second time.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::checkpoint::{self, load_with_config, to_raw, write_safetensors, LoadOptions, ModelFiles};
use super::config::Qwen3Config;
use super::qwen3::Qwen3;
use super::{ModelError, Reranker};

/// The `architectures` entry of a sequence-classification export.
pub const ARCHITECTURE: &str = "Qwen3ForSequenceClassification";
/// The name transformers gives the classification head's weight.
pub const SCORE: &str = "score.weight";

/// Whether a config describes a sequence-classification model (by its `architectures`).
pub fn is_seq_cls(cfg: &Qwen3Config) -> bool {
    cfg.extra
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(ARCHITECTURE)))
}

/// `W_yes − W_no` as `[1, hidden]` f32 on the CPU, from the LM head (or the tied embedding).
pub fn score_row(model: &Qwen3, yes: u32, no: u32) -> Result<Tensor, ModelError> {
    if yes == no {
        return Err(ModelError::Input("the yes and no token ids are equal".into()));
    }
    let rows = model.lm_head_rows(&[yes, no])?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    Ok((rows.narrow(0, 0, 1)? - rows.narrow(0, 1, 1)?)?)
}

/// The `config.json` of the export: the decoder's config with the classification fields
/// transformers reads (one label, the pad token that marks padding for its last-token pooling).
pub fn config_json(cfg: &Qwen3Config, dtype: &str, pad_token_id: u32) -> Value {
    let mut v = cfg.to_hf_json(Some(dtype));
    let m = v.as_object_mut().expect("to_hf_json returns an object");
    m.insert("architectures".into(), json!([ARCHITECTURE]));
    m.insert("id2label".into(), json!({"0": "LABEL_0"}));
    m.insert("label2id".into(), json!({"LABEL_0": 0}));
    m.insert("num_labels".into(), json!(1));
    m.insert("pad_token_id".into(), json!(pad_token_id));
    let mut sorted: Vec<(String, Value)> = std::mem::take(m).into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Object(sorted.into_iter().collect())
}

/// Writes `config.json` and `model.safetensors` of the seq-cls form of `model` into `dir`
/// (created), in `dtype` (`None`: the model's). The tokenizer is the caller's business.
pub fn save(
    model: &Qwen3,
    yes: u32,
    no: u32,
    pad_token_id: u32,
    dir: &Path,
    dtype: Option<DType>,
) -> Result<(), ModelError> {
    let dtype = dtype.unwrap_or(model.dtype());
    let dname = checkpoint::dtype_name(dtype)?;
    let score = score_row(model, yes, no)?;
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
    let config = serde_json::to_string_pretty(&config_json(model.config(), dname, pad_token_id))
        .expect("a JSON value always serialises");
    let cpath = dir.join(checkpoint::CONFIG);
    std::fs::write(&cpath, config + "\n").map_err(|source| ModelError::Io { path: cpath.clone(), source })?;
    let mut raws = Vec::new();
    for (name, t) in model.params().iter().filter(|(n, _)| *n != "lm_head.weight") {
        raws.push((name, to_raw(t, dtype)?));
    }
    raws.push((SCORE, to_raw(&score, dtype)?));
    write_safetensors(&dir.join(checkpoint::SINGLE), &raws)
}

/// Loads a seq-cls export: the decoder and its score row `[1, hidden]`.
///
/// The decoder is built as if its embeddings were tied, only so that no `lm_head.weight` is
/// expected; the reranker never reads that head, it reads the score row.
pub fn load(files: &ModelFiles, opts: &LoadOptions) -> Result<(Qwen3, Tensor), ModelError> {
    let cfg = Qwen3Config::from_file(&files.config)?;
    if !is_seq_cls(&cfg) {
        return Err(ModelError::Config(format!(
            "{}: `architectures` does not name {ARCHITECTURE}",
            files.config.display()
        )));
    }
    let labels = cfg.extra.get("id2label").and_then(Value::as_object).map_or(1, |m| m.len());
    if labels != 1 {
        return Err(ModelError::Config(format!(
            "{}: a reranker export has one label, this config has {labels} (id2label); \
             export it again with `pipe export --format seq-cls`",
            files.config.display()
        )));
    }
    let mut body = cfg.clone();
    body.tie_word_embeddings = true;
    let (model, mut extra) = load_with_config(files, body, opts, &[(SCORE, vec![1, cfg.hidden_size])])?;
    Ok((model, extra.remove(0)))
}

/// A reranker from either form of a model directory, told apart by `architectures` in its
/// config: the causal LM (scored as `yes − no`) or the seq-cls export (scored by its one row).
pub fn load_reranker(files: &ModelFiles, opts: &LoadOptions, yes: u32, no: u32) -> Result<Reranker, ModelError> {
    let cfg = Qwen3Config::from_file(&files.config)?;
    if is_seq_cls(&cfg) {
        let (model, score) = load(files, opts)?;
        Reranker::with_score_row(model, score, yes, no)
    } else {
        Reranker::new(checkpoint::load_files(files, opts)?, yes, no)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{random, resolve, ModelSource};

    fn tiny(tied: bool) -> Qwen3 {
        let cfg = Qwen3Config::tiny(32, 8, 16, 1, 2, 1, 4, tied);
        random(&cfg, 3, DType::F32, &Device::Cpu, false).unwrap()
    }

    #[test]
    fn score_row_is_the_yes_row_minus_the_no_row_of_the_head_or_the_tied_embedding() {
        for tied in [false, true] {
            let m = tiny(tied);
            let head = if tied { "model.embed_tokens.weight" } else { "lm_head.weight" };
            let w: Vec<Vec<f32>> = m.params().get(head).unwrap().to_vec2().unwrap();
            let row: Vec<Vec<f32>> = score_row(&m, 5, 9).unwrap().to_vec2().unwrap();
            assert_eq!(row.len(), 1);
            for (j, v) in row[0].iter().enumerate() {
                assert_eq!(*v, w[5][j] - w[9][j], "tied={tied} column {j}");
            }
        }
    }

    #[test]
    fn export_round_trips_and_scores_like_the_causal_model() {
        for tied in [false, true] {
            let m = tiny(tied);
            let dir = tempfile::tempdir().unwrap();
            save(&m, 5, 9, 31, dir.path(), None).unwrap();
            let cfg: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
            assert_eq!(cfg["architectures"], json!([ARCHITECTURE]));
            assert_eq!(cfg["pad_token_id"], 31);
            assert_eq!(cfg["num_labels"], 1);
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(dir.path().join("model.safetensors")) }
                .unwrap();
            let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
            assert!(names.contains(&SCORE.to_string()));
            assert!(!names.iter().any(|n| n.starts_with("lm_head")), "{names:?}");

            let files = resolve(&ModelSource::Dir(dir.path().into()), &Default::default()).unwrap();
            assert!(checkpoint::load_files(&files, &LoadOptions::default()).is_err());
            let seq = load_reranker(&files, &LoadOptions::default(), 5, 9).unwrap();
            assert!(seq.is_seq_cls());
            let causal = Reranker::new(m, 5, 9).unwrap();
            let ids = Tensor::new(&[[0u32, 3, 4, 7], [1, 2, 30, 6]], &Device::Cpu).unwrap();
            let mask = Tensor::new(&[[0u32, 1, 1, 1], [1, 1, 1, 1]], &Device::Cpu).unwrap();
            let a = causal.scores(&ids, &mask).unwrap();
            let b = seq.scores(&ids, &mask).unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!((x.logit - y.logit).abs() < 1e-6, "tied={tied}: {} vs {}", x.logit, y.logit);
                assert!(x.logit.abs() > 1e-4, "a zero logit would make the comparison vacuous");
            }
        }
    }
}
