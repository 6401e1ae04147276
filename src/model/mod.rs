//! A differentiable, padding-aware Qwen3 and the reranker head, with checkpoint I/O.
//!
//! - [`config`]: `config.json` in the transformers 4.x and 5.x layouts, written back for both.
//! - [`device`]: the `device` / `dtype` parameters every computing stage shares.
//! - [`ops`]: RMSNorm, RoPE, softmax, the attention mask and `Linear` (with a LoRA hook), built only
//!   from candle ops that have a backward pass.
//! - [`fused`]: the same RMSNorm, RoPE and attention through candle's fused kernels, with
//!   hand-written backward passes that recompute rather than keep `seq × seq` tensors; their
//!   row-wise kernels (CPU loops and CUDA) are in [`crate::kernels`].
//! - [`backward`]: a decoder layer's backward pass written out by hand (matmuls and the fused
//!   kernels), which full fine-tuning uses instead of autograd.
//! - [`qwen3`]: the decoder. Parameters live in a [`ParamMap`] keyed by their Hugging Face names, as
//!   `candle_core::Var`s when trainable, so a trainer can run `loss.backward()` and read each
//!   gradient from the `GradStore` by name.
//! - [`reranker`]: `logit = h_last · (W_yes − W_no)` and the losses the trainer needs.
//! - [`seqcls`]: the single-logit `Qwen3ForSequenceClassification` export (`score = W_yes − W_no`)
//!   and loading either form as a [`Reranker`].
//! - [`checkpoint`]: local dirs and `hf:` ids, single and sharded safetensors, save in the layout
//!   transformers loads, and a deterministic `random` initialisation.
//!
//! Position ids: like transformers' `Qwen3Model.forward` called with an attention mask and no
//! `position_ids` (which is how Qwen3-Reranker is run), positions are `0..T-1` for every row, so
//! left padding does not shift them. RoPE only sees position differences between real tokens, so
//! a sequence's score does not depend on how much padding its batch added (up to float rounding).

pub mod backward;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod fused;
pub mod ops;
pub mod qwen3;
pub mod reranker;
pub mod score;
pub mod seqcls;

pub use checkpoint::{load, load_files, random, resolve, save, LoadOptions, ModelFiles, ModelSource, SaveOptions};
pub use config::Qwen3Config;
pub use device::{device_name, dtype_name, hardware, parse_device, parse_dtype, DeviceSpec};
pub use ops::{Linear, LoraAdapter, LoraDropout};
pub use qwen3::{LayerInputs, ParamMap, Qwen3};
pub use reranker::{bce_with_logits, mse_on_probability, RerankOutput, RerankScore, Reranker};

use std::path::PathBuf;

/// Everything that can go wrong in the model layer, each variant naming the file or tensor at
/// fault so that the CLI can print an actionable message.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("tensor `{name}` is missing from the checkpoint at {location}")]
    MissingTensor { name: String, location: String },
    #[error("tensor `{name}` has shape {got:?}, the config implies {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("unsupported dtype `{0}` (expected float32, bfloat16 or float16)")]
    UnsupportedDtype(String),
    #[error("invalid model source `{source_str}`: {reason}")]
    BadSource { source_str: String, reason: String },
    #[error(
        "could not fetch `{file}` of `{repo}` from the Hugging Face hub and it is not in the local \
         cache ({cache}): {reason}. If the model is in another Hugging Face cache, set HF_HUB_CACHE \
         (or HF_HOME) to it; if you are offline, download the model once elsewhere and pass its \
         directory (containing config.json and model.safetensors) instead of the hf: id, e.g. \
         `--model path/to/Qwen3-Reranker-0.6B`"
    )]
    Hub { repo: String, file: String, cache: String, reason: String },
    #[error("{path}: not a model directory: {reason}")]
    NotAModelDir { path: PathBuf, reason: String },
    #[error("bad model input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
