//! Fine-tuning a Qwen3 reranker, apart from the model and from the engine (burn-train's split:
//! the model exposes a forward pass, the learner owns the loop, checkpoints and metrics).
//!
//! - [`config`]: the hyperparameters as typed values ([`TrainConfig`]).
//! - [`data`]: deterministic, length-bucketed batches and accumulation groups per epoch.
//! - [`matching`]: an auxiliary per-token objective (is this document token in the query?) that
//!   lets models trained from scratch find lexical matching.
//! - [`loss`]: BCE, MSE on P(yes), and RankNet pairwise, as differentiable sums and as f64 means.
//! - [`optim`]: AdamW with torch's arithmetic over flat f32 buffers, global-norm clipping (on the
//!   device, the same AdamW is one in-place op: [`crate::kernels::adamw`]).
//! - [`schedule`]: linear warmup then linear decay, as transformers.
//! - [`lora`]: adapters (PEFT's initialisation) and merging them for export.
//! - [`optimizer`]: the trainable parameters' f32 masters, AdamW moments, gradient accumulation,
//!   lazy decay, f16 loss scaling, the step and its save/load (torch.optim's place).
//! - [`learner`]: how gradients are computed: the forward/backward strategy (hand-written layer
//!   backward, autograd, recomputation, LoRA), handing each gradient to the optimizer.
//! - [`checkpoint`]: atomic resumable checkpoints.
//! - [`trainer`]: the loop: epochs, validation, best/epoch/step checkpoints, resume, the log.
//!
//! The `train` stage ([`crate::stages::train`]) only turns parameters and upstream artifacts into
//! calls to [`trainer::train`] and writes the result.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod learner;
pub mod lora;
pub mod loss;
pub mod matching;
pub mod optim;
pub mod optimizer;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

use std::path::{Path, PathBuf};

pub use config::{AdamConfig, BestMetric, Fault, LoraConfig, LossKind, Mode, OptimizerBackend, TrainConfig};
pub use learner::Learner;
pub use matching::Matching;
pub use optimizer::{LossScaler, Optimizer, StepReport};
pub use schedule::Schedule;
pub use trainer::{train, Outcome, RunEnv, Summary, TrainData, ValResult};

use crate::model::ModelError;

/// Keeps glibc from returning freed memory to the kernel after every op.
///
/// A training step allocates and frees the same multi-megabyte activations hundreds of times.
/// glibc's default trims the top of the heap as soon as 2× its (adaptive) mmap threshold is free,
/// so every step page-faults its activations back in: about a third of a CPU step went to the
/// kernel (page faults, zeroing) on the benchmark in `benches/train_cpu.rs`. Raising the trim
/// threshold and pinning the mmap threshold at glibc's own dynamic maximum (32 MiB) keeps the
/// memory in the process; it is still reused, so the footprint does not grow. No-op elsewhere.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters; glibc serialises it with its own
            // locks and it is valid to call at any time.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}

/// Everything that can stop training, each naming what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(
        "step {step}: the {what} is not finite ({value}); stopping. {}",
        match last_checkpoint {
            Some(s) => format!("The last good checkpoint (step {s}) is kept and the next run resumes from it; \
                                lower learning_rate or max_grad_norm, or use dtype = \"f32\", before rerunning"),
            None => "No checkpoint was written yet; lower learning_rate or max_grad_norm, or use dtype = \"f32\"".into(),
        }
    )]
    NonFinite { step: u64, what: &'static str, value: f64, last_checkpoint: Option<u64> },
    #[error(
        "out of GPU memory{}: {message}. Set recompute = true (resumes from the last checkpoint, same \
         result), lower batch_size (and raise grad_accum to keep the effective batch batch_size × \
         grad_accum), or shorten prompts with the tokenize stage's max_length",
        step.map(|s| format!(" at step {s}")).unwrap_or_default()
    )]
    OutOfMemory { step: Option<u64>, message: String },
    #[error("{0}")]
    Config(String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("interrupted")]
    Cancelled,
    /// A fault injected on purpose (see [`Fault`]).
    #[error("injected fault: stopped after step {0}")]
    Injected(u64),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    pub(crate) fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io { path: path.as_ref().to_path_buf(), source }
    }

    /// Recognises the CUDA out-of-memory error candle passes through as text.
    fn is_oom_text(text: &str) -> bool {
        text.contains("CUDA_ERROR_OUT_OF_MEMORY") || text.to_ascii_lowercase().contains("out of memory")
    }

    /// Attaches the step an error happened at, turning a CUDA OOM into [`TrainError::OutOfMemory`].
    pub fn at_step(self, step: u64) -> Self {
        match self {
            Self::Candle(_) | Self::Model(_) if Self::is_oom_text(&self.to_string()) => {
                Self::OutOfMemory { step: Some(step), message: self.to_string() }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_oom_becomes_an_actionable_error() {
        let e = TrainError::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ))
        .at_step(12);
        let text = e.to_string();
        assert!(matches!(e, TrainError::OutOfMemory { step: Some(12), .. }), "{text}");
        for hint in ["recompute", "batch_size", "grad_accum", "max_length"] {
            assert!(text.contains(hint), "{hint}: {text}");
        }
        let other = TrainError::Candle(candle_core::Error::Msg("shape mismatch".into())).at_step(3);
        assert!(matches!(other, TrainError::Candle(_)));
    }
}
