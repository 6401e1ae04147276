//! The training loop: epochs of accumulation groups, validation, checkpoints, resume, the log.
//!
//! # Files in the scratch directory (kept across failures, removed by the engine on success)
//!
//! - `checkpoint.safetensors`: the latest step checkpoint — f32 masters and Adam moments of every
//!   trainable tensor, and in its header the loop state as JSON: step, epoch, the index of the
//!   next accumulation group in that epoch's plan, the optimizer's step counter, the f16 loss
//!   scale, best-so-far bookkeeping and timings. Written every `checkpoint_every` steps, at every
//!   epoch end and after every validation that improved the best metric, atomically.
//! - `best-<step>.safetensors`: the f32 masters at the best validation so far. A new one is written
//!   before the checkpoint that refers to it; older ones are deleted after.
//! - `epoch-<e>.safetensors`: the epoch-end checkpoints, the last `keep_checkpoints` of them
//!   (hard links to the step checkpoint of that moment, so they cost no space while current).
//! - `train_log.jsonl`: the log so far; on resume it is cut back to the checkpoint's step.
//! - `tensorboard/events.out.tfevents.*`: the same numbers as TensorBoard scalars, written as they
//!   happen so a live `tensorboard --logdir` shows the run; on resume cut back the same way.
//!
//! Nothing else is random: the data order comes from (seed, epoch) and LoRA dropout masks from
//! (seed, micro-batch number), so resuming from a checkpoint replays exactly the steps an
//! uninterrupted run takes, and on the CPU ends with the same weights.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::DType;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::checkpoint::{self, HostTensor};
use super::config::{BestMetric, Fault, TrainConfig};
use super::data::{epoch_plan, Group, Items};
use super::learner::Learner;
use super::loss::mean_loss;
use super::optimizer::LossScaler;
use super::schedule::Schedule;
use super::tensorboard::EventWriter;
use super::TrainError;
use crate::metrics::{self, Options, Prediction};
use crate::model::Qwen3;
use crate::text::TokenStore;

const CHECKPOINT: &str = "checkpoint.safetensors";
const LOG: &str = "train_log.jsonl";
/// The TensorBoard event directory in the scratch dir (and, copied, in the artifact).
pub const EVENTS: &str = "tensorboard";
/// Bump when the checkpoint's meaning changes: older checkpoints are then ignored, not misread.
const STATE_VERSION: u32 = 1;

/// The tokenized splits to train and validate on.
pub struct TrainData<'a> {
    pub train: &'a TokenStore,
    /// `None` or empty: no validation; the last weights are exported.
    pub val: Option<&'a TokenStore>,
    /// Where the train split's queries and documents are, for `match_loss`; `None` when it is 0.
    pub matching: Option<&'a super::Matching>,
}

/// Where and how the loop runs.
pub struct RunEnv<'a> {
    /// Survives failures; see the module docs for what goes in it.
    pub scratch: &'a Path,
    /// Polled between micro-batches (Ctrl-C); the last checkpoint stays for the next run.
    pub cancel: &'a AtomicBool,
    /// Its length is set to the total number of steps; use `ProgressBar::hidden()` when quiet.
    pub progress: ProgressBar,
    /// No messages on stderr.
    pub quiet: bool,
}

/// One validation pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ValResult {
    pub step: u64,
    pub loss: f64,
    pub auc: Option<f64>,
    pub ndcg10: Option<f64>,
}

impl ValResult {
    fn metric(&self, m: BestMetric) -> Option<f64> {
        match m {
            BestMetric::ValLoss => Some(self.loss).filter(|v| v.is_finite()),
            BestMetric::ValAuc => self.auc,
            BestMetric::ValNdcg10 => self.ndcg10,
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub steps: u64,
    /// The validation whose weights were exported (`None` without validation data).
    pub best: Option<ValResult>,
    /// Every validation, in order.
    pub validations: Vec<ValResult>,
    /// Wall time of the loop, summed over resumed attempts.
    pub train_seconds: f64,
    /// Training rows per second of time spent in training steps (validation and checkpoints excluded).
    pub samples_per_sec: f64,
    pub tokens_per_sec: f64,
    pub samples: u64,
    pub resumed_from: Option<u64>,
    pub stopped_early: bool,
    pub trainable_params: usize,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    /// Training items: rows, queries (pairwise, lambda) or groups (group_ce).
    pub items: usize,
    /// group_ce: queries left out for having no positive, or no negative.
    pub skipped_no_positive: usize,
    pub skipped_no_negative: usize,
}

/// The exported model (best weights, adapters merged, CPU, compute dtype) and the run's record.
pub struct Outcome {
    pub model: Qwen3,
    pub summary: Summary,
    /// `train_log.jsonl` in the scratch dir (copy it before the scratch dir goes).
    pub log: PathBuf,
    /// The TensorBoard event directory in the scratch dir (copy it too).
    pub events: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LoopState {
    version: u32,
    fingerprint: String,
    step: u64,
    adam_step: u64,
    epoch: usize,
    group: usize,
    scaler: Option<LossScaler>,
    best: Option<ValResult>,
    bad_validations: usize,
    validations: Vec<ValResult>,
    stopped_early: bool,
    train_seconds: f64,
    step_seconds: f64,
    samples: u64,
    tokens: u64,
    last_checkpoint: Option<u64>,
}

/// What identifies a run: every hyperparameter (but the fault), the model's shape and the data
/// size. A checkpoint with another fingerprint is never resumed from.
fn fingerprint(cfg: &TrainConfig, learner: &Learner, data: &TrainData) -> String {
    let mut c = cfg.clone();
    c.fault = None;
    // Changes how gradients are computed, not their values: a run that ran out of memory
    // resumes from its checkpoint with recomputation switched on.
    c.recompute = false;
    let text = format!(
        "{c:?}|{:?}|{:?}|{:?}|{}|{}",
        learner.model().config(),
        learner.dtype(),
        learner.trainable(),
        data.train.len(),
        data.val.map_or(0, |v| v.len())
    );
    blake3::hash(text.as_bytes()).to_hex()[..32].to_string()
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn checkpoint(&self) -> PathBuf {
        self.dir.join(CHECKPOINT)
    }
    fn best(&self, step: u64) -> PathBuf {
        self.dir.join(format!("best-{step}.safetensors"))
    }
    fn epoch(&self, e: usize) -> PathBuf {
        self.dir.join(format!("epoch-{e}.safetensors"))
    }
    fn log(&self) -> PathBuf {
        self.dir.join(LOG)
    }
    fn events(&self) -> PathBuf {
        self.dir.join(EVENTS)
    }
    /// `(number, path)` of files named `<prefix><number>.safetensors`.
    fn numbered(&self, prefix: &str) -> Vec<(u64, PathBuf)> {
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n = name.strip_prefix(prefix)?.strip_suffix(".safetensors")?.parse().ok()?;
                Some((n, e.path()))
            })
            .collect();
        out.sort();
        out
    }
}

/// Keeps only log lines up to `step` (a resumed run rewrites what came after).
fn truncate_log(path: &Path, step: u64) -> Result<(), TrainError> {
    let Ok(f) = std::fs::File::open(path) else { return Ok(()) };
    let kept: Vec<String> = std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut text = kept.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    // Atomic, so that a crash while rewriting cannot lose the steps the resumed run keeps.
    crate::util::fs::write_atomic(path, text.as_bytes()).map_err(|e| TrainError::io(path, e))
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Trains `model` (see [`Learner::new`] for how it is prepared) and returns the best weights.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: Qwen3,
    yes: u32,
    no: u32,
    dtype: DType,
    cfg: &TrainConfig,
    data: &TrainData,
    env: &RunEnv,
) -> Result<Outcome, TrainError> {
    let mut learner = Learner::new(model, yes, no, cfg, dtype)?;
    if cfg.match_loss > 0.0 {
        let m = data.matching.ok_or_else(|| TrainError::Config("match_loss > 0 needs the prompts' markers".into()))?;
        learner.set_matching(m.clone());
    }
    let items = Items::new(data.train, cfg.loss, cfg.group_size);
    if items.is_empty() {
        return Err(TrainError::Config(match cfg.loss {
            super::LossKind::Pairwise | super::LossKind::Lambda => {
                "the training split has no query with two candidates of different relevance".into()
            }
            super::LossKind::GroupCe => format!(
                "loss = \"group_ce\" found no query with both a positive and a negative candidate in the training \
                 split ({} without a positive, {} without a negative); use loss = \"bce\", or lower the split's \
                 relevance_threshold",
                items.skipped_no_positive, items.skipped_no_negative
            ),
            _ => "the training split is empty".into(),
        }));
    }
    let val = data.val.filter(|v| !v.is_empty());
    let steps_per_epoch = items.micro_batches(cfg.batch_size).div_ceil(cfg.grad_accum) as u64;
    let full = steps_per_epoch * cfg.epochs as u64;
    let total = if cfg.max_steps > 0 { cfg.max_steps.min(full) } else { full };
    let schedule = Schedule::new(cfg.learning_rate, cfg.warmup_ratio, total);
    let files = Files { dir: env.scratch.to_path_buf() };
    std::fs::create_dir_all(&files.dir).map_err(|e| TrainError::io(&files.dir, e))?;
    let fp = fingerprint(cfg, &learner, data);

    let mut st = LoopState {
        version: STATE_VERSION,
        fingerprint: fp.clone(),
        step: 0,
        adam_step: 0,
        epoch: 0,
        group: 0,
        scaler: learner.loss_scaler(),
        best: None,
        bad_validations: 0,
        validations: Vec::new(),
        stopped_early: false,
        train_seconds: 0.0,
        step_seconds: 0.0,
        samples: 0,
        tokens: 0,
        last_checkpoint: None,
    };
    let mut resumed_from = None;
    if files.checkpoint().is_file() {
        let (tensors, saved): (BTreeMap<String, HostTensor>, LoopState) = checkpoint::read(&files.checkpoint())?;
        if saved.version == STATE_VERSION && saved.fingerprint == fp {
            learner.load_state(&tensors, saved.adam_step, saved.scaler)?;
            st = saved;
            resumed_from = Some(st.step);
            if !env.quiet {
                env.progress.suspend(|| {
                    eprintln!("  resuming training from step {} (checkpoint in {})", st.step, files.dir.display())
                });
            }
        } else if !env.quiet {
            env.progress.suspend(|| {
                eprintln!("  ignoring a checkpoint from a different training setup in {}", files.dir.display())
            });
        }
    }
    if resumed_from.is_none() {
        for (_, p) in files.numbered("best-").into_iter().chain(files.numbered("epoch-")) {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(files.log());
    } else {
        truncate_log(&files.log(), st.step)?;
        // Best files newer than the checkpoint's are from steps this run will redo.
        let keep = st.best.map(|b| b.step);
        for (n, p) in files.numbered("best-") {
            if Some(n) != keep {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(files.log())
        .map_err(|e| TrainError::io(files.log(), e))?;
    let mut write_log = |v: serde_json::Value| -> Result<(), TrainError> {
        writeln!(log, "{v}").map_err(|e| TrainError::io(files.log(), e))
    };
    let mut events = EventWriter::open(&files.events(), resumed_from)?;
    if resumed_from.is_none() && cfg.loss == super::LossKind::GroupCe {
        // Step 0, so that a resumed run's truncation keeps it and analyze skips it (no loss).
        write_log(json!({
            "step": 0,
            "groups": items.len(),
            "queries_skipped_no_positive": items.skipped_no_positive,
            "queries_skipped_no_negative": items.skipped_no_negative,
        }))?;
    }

    env.progress.set_length(total);
    env.progress.set_position(st.step);
    env.progress.reset_eta();
    let segment_start = Instant::now();
    let base_seconds = st.train_seconds;
    let mut plan: Option<(usize, Vec<Group>)> = None;
    let mut ema: Option<f64> = None;

    while st.epoch < cfg.epochs && st.step < total && !st.stopped_early {
        if plan.as_ref().map(|(e, _)| *e) != Some(st.epoch) {
            let groups = epoch_plan(data.train, &items, cfg, st.epoch);
            plan = Some((st.epoch, groups));
        }
        let groups = &plan.as_ref().expect("set above").1;
        let group = &groups[st.group];
        let this_step = st.step + 1;
        let fix = |e: TrainError, last: Option<u64>| match e.at_step(this_step) {
            TrainError::NonFinite { what, value, .. } => {
                TrainError::NonFinite { step: this_step, what, value, last_checkpoint: last }
            }
            other => other,
        };

        let t0 = Instant::now();
        let inject_nan = cfg.fault == Some(Fault::NanLoss(this_step));
        let (mut loss, mut tokens, mut match_loss) = (0.0, 0usize, 0.0);
        for (k, micro) in group.micro.iter().enumerate() {
            if env.cancel.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let key = st.step * cfg.grad_accum as u64 + k as u64;
            let r = learner
                .accumulate(data.train, micro, group.units, key, inject_nan)
                .map_err(|e| fix(e, st.last_checkpoint))?;
            loss += r.loss;
            tokens += r.tokens;
            match_loss += r.match_loss;
        }
        let lr = schedule.lr(st.step);
        let report = learner.apply(lr).map_err(|e| fix(e, st.last_checkpoint))?;
        let dt = t0.elapsed().as_secs_f64().max(1e-9);
        let rows = group.rows();
        st.step = this_step;
        st.adam_step = learner.step();
        st.scaler = learner.loss_scaler();
        st.group += 1;
        st.samples += rows as u64;
        st.tokens += tokens as u64;
        st.step_seconds += dt;
        let epoch_done = st.group == groups.len();
        let epoch_pos = st.epoch as f64 + st.group as f64 / groups.len() as f64;
        let mut line = json!({
            "step": st.step,
            "epoch": round(epoch_pos, 4),
            "loss": loss,
            "lr": lr,
            "grad_norm": report.grad_norm,
            "samples_per_sec": round(rows as f64 / dt, 3),
            "tokens_per_sec": round(tokens as f64 / dt, 1),
        });
        if cfg.match_loss > 0.0 {
            line["match_loss"] = json!(match_loss);
        }
        write_log(line)?;
        let mut scalars = vec![
            ("train/loss", loss),
            ("train/learning_rate", lr),
            ("train/grad_norm", report.grad_norm),
            ("train/samples_per_sec", rows as f64 / dt),
            ("train/tokens_per_sec", tokens as f64 / dt),
            ("train/epoch", epoch_pos),
        ];
        if cfg.match_loss > 0.0 {
            scalars.push(("train/match_loss", match_loss));
        }
        events.scalars(st.step, &scalars)?;
        ema = Some(match ema {
            Some(e) => 0.9 * e + 0.1 * loss,
            None => loss,
        });
        env.progress.set_position(st.step);
        env.progress.set_message(format!(
            "epoch {}/{} loss {:.4} lr {:.2e} {:.1} samples/s",
            st.epoch + 1,
            cfg.epochs,
            ema.unwrap_or(loss),
            lr,
            st.samples as f64 / st.step_seconds
        ));

        let mut improved = false;
        let periodic = cfg.eval_every > 0 && st.step.is_multiple_of(cfg.eval_every);
        if let Some(val) = val {
            let finishing = st.step >= total || (epoch_done && st.epoch + 1 >= cfg.epochs);
            if periodic || epoch_done || finishing {
                let r = validate(&mut learner, val, cfg, st.step)?;
                write_log(json!({
                    "step": st.step,
                    "epoch": round(epoch_pos, 4),
                    "val_loss": r.loss,
                    "val_auc": r.auc,
                    "val_ndcg@10": r.ndcg10,
                }))?;
                let mut scalars = vec![("val/loss", r.loss)];
                scalars.extend(r.auc.map(|v| ("val/auc", v)));
                scalars.extend(r.ndcg10.map(|v| ("val/ndcg@10", v)));
                events.scalars(st.step, &scalars)?;
                st.validations.push(r);
                let old = st.best.and_then(|b| b.metric(cfg.best_metric));
                if cfg.best_metric.better(r.metric(cfg.best_metric), old) {
                    checkpoint::write(&files.best(st.step), &learner.masters()?, &json!({"step": st.step}))?;
                    st.best = Some(r);
                    st.bad_validations = 0;
                    improved = true;
                } else {
                    st.bad_validations += 1;
                    if cfg.early_stopping > 0 && st.bad_validations >= cfg.early_stopping {
                        st.stopped_early = true;
                    }
                }
            }
        }
        if epoch_done {
            st.epoch += 1;
            st.group = 0;
        }
        let stop_here = matches!(cfg.fault, Some(Fault::StopAfter(n) | Fault::AbortAfter(n)) if n == st.step);
        if epoch_done || improved || stop_here || st.step.is_multiple_of(cfg.checkpoint_every) {
            st.train_seconds = base_seconds + segment_start.elapsed().as_secs_f64();
            st.last_checkpoint = Some(st.step);
            checkpoint::write(&files.checkpoint(), &learner.state_tensors()?, &st)?;
            if improved {
                for (n, p) in files.numbered("best-") {
                    if n != st.step {
                        let _ = std::fs::remove_file(p);
                    }
                }
            }
            if epoch_done && cfg.keep_checkpoints > 0 {
                let link = files.epoch(st.epoch);
                let _ = std::fs::remove_file(&link);
                if std::fs::hard_link(files.checkpoint(), &link).is_err() {
                    std::fs::copy(files.checkpoint(), &link).map_err(|e| TrainError::io(&link, e))?;
                }
                let epochs = files.numbered("epoch-");
                let excess = epochs.len().saturating_sub(cfg.keep_checkpoints);
                for (_, p) in epochs.into_iter().take(excess) {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        match cfg.fault {
            Some(Fault::StopAfter(n)) if n == st.step => return Err(TrainError::Injected(n)),
            Some(Fault::AbortAfter(n)) if n == st.step => std::process::abort(),
            _ => {}
        }
    }
    st.train_seconds = base_seconds + segment_start.elapsed().as_secs_f64();
    env.progress.finish_and_clear();

    let best_masters = match st.best {
        Some(b) => {
            let (t, _): (BTreeMap<String, HostTensor>, serde_json::Value) = checkpoint::read(&files.best(b.step))?;
            Some(t)
        }
        None => None,
    };
    let model = learner.export(best_masters.as_ref(), dtype)?;
    let summary = Summary {
        steps: st.step,
        best: st.best,
        validations: st.validations.clone(),
        train_seconds: st.train_seconds,
        samples_per_sec: st.samples as f64 / st.step_seconds.max(1e-9),
        tokens_per_sec: st.tokens as f64 / st.step_seconds.max(1e-9),
        samples: st.samples,
        resumed_from,
        stopped_early: st.stopped_early,
        trainable_params: learner.trainable_count(),
        total_steps: total,
        steps_per_epoch,
        items: items.len(),
        skipped_no_positive: items.skipped_no_positive,
        skipped_no_negative: items.skipped_no_negative,
    };
    Ok(Outcome { model, summary, log: files.log(), events: files.events() })
}

/// Validation loss (the training objective's mean over the split), AUC and NDCG@10 of the logits.
pub fn validate(
    learner: &mut Learner,
    val: &TokenStore,
    cfg: &TrainConfig,
    step: u64,
) -> Result<ValResult, TrainError> {
    let rows: Vec<usize> = (0..val.len()).collect();
    let logits = learner.logits(val, &rows, cfg.eval_batch_size)?;
    let (loss, _) = mean_loss(cfg.loss, &logits, val, cfg.group_size);
    let preds: Vec<Prediction> = rows
        .iter()
        .map(|&i| Prediction {
            query: val.query(i).to_string(),
            relevance: val.relevance[i] as f64,
            score: logits[i] as f64,
            label: Some(val.labels[i] == 1),
        })
        .collect();
    let (auc, ndcg10) = match metrics::compute(&preds, &Options::default()) {
        Ok(m) => (m.auc, m.get("ndcg@10")),
        Err(_) => (None, None),
    };
    Ok(ValResult { step, loss, auc, ndcg10 })
}
