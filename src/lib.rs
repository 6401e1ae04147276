//! `pipe`: declarative, cached, resumable ML pipelines.
//!
//! - [`engine`]: pipeline config (TOML, layered, strict) → DAG → content-addressed cache keys → an
//!   atomic store → the runner and its run records. Nothing in it knows about ML.
//! - [`stages`]: one module per stage kind behind the [`engine::Stage`] trait.
//! - [`model`]: a differentiable, padding-aware Qwen3 and the reranker head, checkpoint I/O.
//! - [`kernels`]: the custom ops with kernels of our own (attention softmax, norms, SwiGLU, AdamW,
//!   row scatter): each CUDA source with its launcher and the CPU loop it mirrors.
//! - [`text`]: the Qwen3-Reranker prompt, tokenizer loading (built-in, local, hub) and the token store.
//! - [`train`]: the training loop (AdamW, schedule, clipping, accumulation, checkpoints, resume),
//!   apart from the model; the `train` stage is its thin glue.
//! - [`metrics`]: ranking and classification metrics as pure functions.
//! - [`report`]: tables, SVG charts and self-contained HTML reports (the analyze stage's output).
//! - [`hub`]: the Hugging Face cache and downloads, one reading of `HF_*` for models, tokenizers
//!   and data.
//! - [`util`]: leaf helpers every layer may use: durable atomic writes, the seeded generator.

pub mod cli;
pub mod engine;
pub mod export;
pub mod hub;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod report;
pub mod stages;
pub mod text;
pub mod train;
pub mod util;
