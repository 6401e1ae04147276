//! `train`: thin glue between the engine and [`crate::train`]. It turns the parameters (documented
//! in `stages/train.toml`) into a [`TrainConfig`], loads the starting model and the tokenize
//! stage's token store, runs [`crate::train::train`] with the stage's scratch dir for resumable
//! checkpoints, and writes `model/` (HF layout), `train_log.jsonl` and the TensorBoard event file
//! (`tensorboard/`, written live into the scratch dir while training).

use std::path::Path;

use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::{
    Contract, ExternalInput, GpuDemand, JsonMap, Need, ParamError, StageContext, StageError, StageOutput, StageParams,
    TypedStage,
};
use crate::hub::HubSettings;
use crate::model::{self, DeviceSpec, LoadOptions, ModelSource, Qwen3Config, SaveOptions};
use crate::text::TokenStore;
use crate::train::{self, BestMetric, Fault, LoraConfig, LossKind, Mode, RunEnv, TrainConfig, TrainData, TrainError};

pub const KIND: &str = "train";
/// Bump when the artifact's meaning changes for the same parameters.
/// 2: the TensorBoard event files (`tensorboard/`). (The group losses came with a new parameter,
/// `group_size`, which changes every train key without a bump.)
pub const VERSION: u32 = 2;
/// The trained weights, in Hugging Face layout (what `evaluate` with `model = "trained"` loads).
pub const MODEL_DIR: &str = "model";
/// One JSON object per optimizer step and per validation (what `analyze` draws the loss curve from).
pub const TRAIN_LOG: &str = "train_log.jsonl";
/// TensorBoard event files of the run (`tensorboard --logdir artifacts/` shows them).
pub const EVENTS_DIR: &str = crate::train::trainer::EVENTS;

/// The token stores and tokenizer in; the model and the log out.
pub const CONTRACT: Contract =
    Contract { needs: &[Need::always(&[super::tokenize::KIND])], writes: &[MODEL_DIR, TRAIN_LOG, EVENTS_DIR] };

/// The environment variable of the testing hook (see `stages/train.toml`).
pub const FAULT_ENV: &str = "PIPE_TRAIN_FAULT";

pub struct Train;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    model: String,
    mode: String,
    freeze_embeddings: bool,
    loss: String,
    group_size: i64,
    epochs: i64,
    batch_size: i64,
    grad_accum: i64,
    learning_rate: f64,
    weight_decay: f64,
    warmup_ratio: f64,
    max_grad_norm: f64,
    seed: i64,
    device: String,
    dtype: String,
    eval_every: i64,
    eval_batch_size: i64,
    early_stopping: i64,
    best_metric: String,
    keep_checkpoints: i64,
    max_steps: i64,
    checkpoint_every: i64,
    bucket_batches: i64,
    recompute: bool,
    match_loss: f64,
    lora: LoraParams,
    init: InitParams,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoraParams {
    r: i64,
    alpha: f64,
    dropout: f64,
    target_modules: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InitParams {
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: i64,
    head_dim: i64,
    rope_theta: f64,
    tie_word_embeddings: bool,
    seed: i64,
}

fn param(key: &str, message: impl std::fmt::Display) -> StageError {
    StageError::param(key, message)
}

fn count(key: &str, v: i64, min: i64) -> Result<usize, ParamError> {
    if v < min {
        return Err(ParamError::new(key, format!("must be at least {min}, got {v}")));
    }
    Ok(v as usize)
}

impl StageParams for TrainParams {
    fn validate(&self) -> Result<(), ParamError> {
        self.config()?;
        self.init_config()?;
        if self.model != "random" {
            self.model.parse::<ModelSource>().map_err(|e| ParamError::new("model", e))?;
        }
        self.device.parse::<DeviceSpec>().map_err(|e| ParamError::new("device", e))?;
        model::parse_dtype(&self.dtype).map_err(|e| ParamError::new("dtype", e))?;
        Ok(())
    }
}

impl TrainParams {
    /// The trainer's typed configuration; every error names its parameter.
    fn config(&self) -> Result<TrainConfig, ParamError> {
        let mode = match self.mode.as_str() {
            "full" => Mode::Full,
            "lora" => Mode::Lora(LoraConfig {
                r: count("lora.r", self.lora.r, 1)?,
                alpha: self.lora.alpha,
                dropout: self.lora.dropout as f32,
                target_modules: self.lora.target_modules.clone(),
            }),
            other => return Err(ParamError::new("mode", format!("`{other}` is not one of full, lora"))),
        };
        let cfg = TrainConfig {
            mode,
            freeze_embeddings: self.freeze_embeddings,
            loss: self.loss.parse::<LossKind>().map_err(|e| ParamError::new("loss", e))?,
            group_size: count("group_size", self.group_size, 0)?,
            epochs: count("epochs", self.epochs, 1)?,
            batch_size: count("batch_size", self.batch_size, 1)?,
            grad_accum: count("grad_accum", self.grad_accum, 1)?,
            learning_rate: self.learning_rate,
            weight_decay: self.weight_decay,
            warmup_ratio: self.warmup_ratio,
            max_grad_norm: self.max_grad_norm,
            seed: count("seed", self.seed, 0)? as u64,
            eval_every: count("eval_every", self.eval_every, 0)? as u64,
            eval_batch_size: count("eval_batch_size", self.eval_batch_size, 1)?,
            early_stopping: count("early_stopping", self.early_stopping, 0)?,
            best_metric: self.best_metric.parse::<BestMetric>().map_err(|e| ParamError::new("best_metric", e))?,
            keep_checkpoints: count("keep_checkpoints", self.keep_checkpoints, 0)?,
            max_steps: count("max_steps", self.max_steps, 0)? as u64,
            checkpoint_every: count("checkpoint_every", self.checkpoint_every, 1)? as u64,
            bucket_batches: count("bucket_batches", self.bucket_batches, 0)?,
            recompute: self.recompute,
            match_loss: self.match_loss,
            adam: Default::default(),
            backend: Default::default(),
            fault: None,
        };
        cfg.validate().map_err(|e| ParamError::new(e.key, e.message))?;
        Ok(cfg)
    }

    fn init_config(&self) -> Result<(Qwen3Config, u64), ParamError> {
        let i = &self.init;
        let mut cfg = Qwen3Config::tiny(
            count("init.vocab_size", i.vocab_size, 1)?,
            count("init.hidden_size", i.hidden_size, 1)?,
            count("init.intermediate_size", i.intermediate_size, 1)?,
            count("init.num_hidden_layers", i.num_hidden_layers, 1)?,
            count("init.num_attention_heads", i.num_attention_heads, 1)?,
            count("init.num_key_value_heads", i.num_key_value_heads, 1)?,
            count("init.head_dim", i.head_dim, 2)?,
            i.tie_word_embeddings,
        );
        if !cfg.num_attention_heads.is_multiple_of(cfg.num_key_value_heads) {
            return Err(ParamError::new("init.num_key_value_heads", "must divide init.num_attention_heads"));
        }
        if !cfg.head_dim.is_multiple_of(2) {
            return Err(ParamError::new("init.head_dim", "must be even (RoPE rotates pairs)"));
        }
        if !(i.rope_theta.is_finite() && i.rope_theta > 0.0) {
            return Err(ParamError::new("init.rope_theta", "must be positive"));
        }
        cfg.rope_theta = i.rope_theta;
        Ok((cfg, count("init.seed", i.seed, 0)? as u64))
    }
}

/// Files of a local model directory, for the cache key (hashed by content by the engine).
fn model_dir_inputs(dir: &str, root_relative: &Path) -> Vec<ExternalInput> {
    let join = |f: &str| format!("{}/{f}", dir.trim_end_matches('/'));
    let index = root_relative.join("model.safetensors.index.json");
    let mut out = vec![ExternalInput::File(join("config.json"))];
    if index.is_file() {
        out.push(ExternalInput::File(join("model.safetensors.index.json")));
        if let Ok(text) = std::fs::read_to_string(&index) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                let mut shards: Vec<String> = v["weight_map"]
                    .as_object()
                    .map(|m| m.values().filter_map(|f| f.as_str().map(str::to_string)).collect())
                    .unwrap_or_default();
                shards.sort();
                shards.dedup();
                out.extend(shards.iter().map(|s| ExternalInput::File(join(s))));
            }
        }
    } else {
        out.push(ExternalInput::File(join("model.safetensors")));
    }
    out
}

fn to_stage(e: TrainError) -> StageError {
    match e {
        TrainError::Cancelled => StageError::Cancelled,
        other => StageError::Failed(other.to_string()),
    }
}

fn bar(ctx: &StageContext) -> ProgressBar {
    if ctx.quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("  {prefix:.bold} [{bar:30.cyan/blue}] step {pos}/{len} {msg} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_prefix(ctx.id.to_string());
    bar
}

fn read_split(dir: &Path, split: &str) -> Result<TokenStore, StageError> {
    TokenStore::read(dir, split).map_err(|e| StageError::Upstream(e.to_string()))
}

fn meta_id(store: &TokenStore, key: &str) -> Result<u32, StageError> {
    store
        .metadata
        .get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| StageError::Upstream(format!("the token store does not record `{key}`; rerun tokenize")))
}

impl TypedStage for Train {
    type Params = TrainParams;
    const KIND: &'static str = KIND;
    const VERSION: u32 = VERSION;
    const DEFAULTS: &'static str = include_str!("../../stages/train.toml");
    const CONTRACT: Contract = CONTRACT;
    const UNKEYED: &'static [&'static str] = &["recompute"];

    fn available(p: &TrainParams) -> Result<(), ParamError> {
        super::device_available(&p.device)
    }

    fn gpus(p: &TrainParams) -> GpuDemand {
        super::device_gpus(&p.device)
    }

    fn canonical_key(params: &mut toml::Table) {
        super::canonical_device(params)
    }

    fn inputs(p: &TrainParams) -> Vec<ExternalInput> {
        let device = ExternalInput::Remote(crate::model::device::compute_identity(&p.device));
        let spec = p.model.as_str();
        let mut inputs = match spec.parse::<ModelSource>() {
            _ if spec == "random" => Vec::new(),
            Ok(ModelSource::Hub { repo, revision }) => vec![ExternalInput::Remote(format!("hf:{repo}@{revision}"))],
            // Relative paths resolve against the project root, which `inputs` does not see; the
            // directory listing only matters for sharded checkpoints, found when run from the root.
            Ok(ModelSource::Dir(d)) => model_dir_inputs(spec, &d),
            Err(_) => Vec::new(),
        };
        inputs.push(device);
        inputs
    }

    fn run(ctx: &StageContext, p: &TrainParams) -> Result<StageOutput, StageError> {
        let mut cfg = p.config()?;
        if let Ok(f) = std::env::var(FAULT_ENV) {
            if !f.is_empty() {
                cfg.fault = Some(f.parse::<Fault>().map_err(|e| StageError::Failed(format!("{FAULT_ENV}: {e}")))?);
            }
        }
        let device = super::open_device(&p.device, ctx.gpus).map_err(|e| param("device", e))?;
        let dtype = model::parse_dtype(&p.dtype).map_err(|e| param("dtype", e))?;

        let tok_dir = ctx.upstream_of(&[super::tokenize::KIND])?.dir.clone();
        let train_store = read_split(&tok_dir, "train")?;
        let val_store = read_split(&tok_dir, "val")?;
        let (yes, no) = (meta_id(&train_store, "yes_id")?, meta_id(&train_store, "no_id")?);

        // Masters are f32: load f32 and let the learner cast the compute copy.
        let base = if p.model == "random" {
            let (qcfg, seed) = p.init_config()?;
            model::random(&qcfg, seed, DType::F32, &device, false).map_err(|e| param("init", e))?
        } else {
            let source = match p.model.parse::<ModelSource>().map_err(|e| param("model", e))? {
                ModelSource::Dir(d) => ModelSource::Dir(ctx.path(&d.display().to_string())),
                hub => hub,
            };
            let opts = LoadOptions { dtype: DType::F32, device: device.clone(), trainable: false };
            model::load(&source, &HubSettings::from_env(), &opts).map_err(|e| param("model", e))?
        };
        let max_id = train_store.ids.iter().chain(&val_store.ids).copied().max().unwrap_or(0) as usize;
        if max_id >= base.config().vocab_size {
            return Err(param(
                if p.model == "random" { "init.vocab_size" } else { "model" },
                format!(
                    "the tokenizer produces id {max_id} but the model's vocabulary has {} entries",
                    base.config().vocab_size
                ),
            ));
        }

        let matching = if cfg.match_loss > 0.0 {
            let path = tok_dir.join(super::tokenize::TOKENIZER);
            let tok = tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| StageError::Upstream(format!("{}: {e}", path.display())))?;
            let m = train::Matching::for_store(&tok, &train_store).map_err(|e| param("match_loss", e))?;
            if !m.finds_any(&train_store) {
                return Err(param(
                    "match_loss",
                    "no training prompt has a query between `<Query>:` and `<Document>:` and a document after it \
                     (the Qwen3-Reranker prompt); set match_loss = 0",
                ));
            }
            Some(m)
        } else {
            None
        };
        let data = TrainData { train: &train_store, val: Some(&val_store), matching: matching.as_ref() };
        let env = RunEnv { scratch: ctx.scratch, cancel: ctx.cancel, progress: bar(ctx), quiet: ctx.quiet };
        let outcome = train::train(base, yes, no, dtype, &cfg, &data, &env).map_err(to_stage)?;

        let model_dir = ctx.out.join(MODEL_DIR);
        let tokenizer = tok_dir.join(super::tokenize::TOKENIZER);
        let opts = SaveOptions {
            dtype: Some(dtype),
            tokenizer: tokenizer.is_file().then_some(tokenizer),
            max_shard_bytes: None,
        };
        model::save(&outcome.model, &model_dir, &opts)
            .map_err(|e| StageError::failed(format!("saving the model: {e}")))?;
        let log_dst = ctx.out.join(TRAIN_LOG);
        std::fs::copy(&outcome.log, &log_dst).map_err(|e| StageError::io(&log_dst, e))?;
        let events_dst = ctx.out.join(EVENTS_DIR);
        std::fs::create_dir_all(&events_dst).map_err(|e| StageError::io(&events_dst, e))?;
        for src in crate::train::tensorboard::event_files(&outcome.events) {
            let dst = events_dst.join(src.file_name().expect("a listed file has a name"));
            std::fs::copy(&src, &dst).map_err(|e| StageError::io(&dst, e))?;
        }

        let s = &outcome.summary;
        let best = s.best;
        let mut metrics = JsonMap::new();
        metrics.insert("val_loss".into(), json!(best.map(|b| b.loss).filter(|v| v.is_finite())));
        metrics.insert("val_auc".into(), json!(best.and_then(|b| b.auc)));
        metrics.insert("val_ndcg@10".into(), json!(best.and_then(|b| b.ndcg10)));
        metrics.insert("best_step".into(), json!(best.map(|b| b.step)));
        metrics.insert("steps".into(), json!(s.steps));
        metrics.insert("train_seconds".into(), json!((s.train_seconds * 1000.0).round() / 1000.0));
        metrics.insert("samples_per_sec".into(), json!((s.samples_per_sec * 1000.0).round() / 1000.0));

        let mut stats = JsonMap::new();
        stats.insert("device".into(), json!(model::device_name(&device)));
        stats.insert("hardware".into(), json!(model::hardware(&device)));
        stats.insert("dtype".into(), json!(model::dtype_name(dtype)));
        stats.insert("trainable_params".into(), json!(s.trainable_params));
        stats.insert("train_pairs".into(), json!(train_store.len()));
        stats.insert("val_pairs".into(), json!(val_store.len()));
        stats.insert("steps_per_epoch".into(), json!(s.steps_per_epoch));
        stats.insert("total_steps".into(), json!(s.total_steps));
        stats.insert("samples".into(), json!(s.samples));
        stats.insert("tokens_per_sec".into(), json!((s.tokens_per_sec * 10.0).round() / 10.0));
        stats.insert("resumed_from_step".into(), json!(s.resumed_from));
        stats.insert("stopped_early".into(), json!(s.stopped_early));
        stats.insert("train_items".into(), json!(s.items));
        if cfg.loss == LossKind::GroupCe {
            stats.insert("queries_skipped_no_positive".into(), json!(s.skipped_no_positive));
            stats.insert("queries_skipped_no_negative".into(), json!(s.skipped_no_negative));
        }
        stats.insert(
            "validations".into(),
            Value::Array(
                s.validations
                    .iter()
                    .map(|v| json!({"step": v.step, "val_loss": v.loss, "val_auc": v.auc, "val_ndcg@10": v.ndcg10}))
                    .collect(),
            ),
        );
        Ok(StageOutput { metrics, stats })
    }
}

#[cfg(test)]
mod tests;
