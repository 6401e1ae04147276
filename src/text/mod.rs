//! Text → token ids for Qwen3-Reranker: the prompt, the tokenizer, and the token store on disk.
//!
//! - [`prompt`]: the official Qwen3-Reranker prompt, byte for byte, and [`PromptEncoder`], which
//!   turns (query, title, description) or (query, document) into the exact ids the Python reference
//!   produces, truncating the description and then the body but never the prefix or suffix.
//! - [`tokenizer`]: where a tokenizer comes from: a local `tokenizer.json` (or `.json.gz`), a Hugging
//!   Face Hub id `hf:owner/name[@revision]` (cache first, so it works offline once cached), or the
//!   built-in `qwen3`, embedded in the binary so that a fresh machine without network can run.
//! - [`bm25`]: Okapi BM25 and its word tokenizer, shared by `analyze`'s baselines and `mine`'s miner.
//! - [`store`]: the compact per-split token store the tokenize stage writes and training and
//!   evaluation read.
//!
//! The tokenize stage, the evaluate stage and `pipe rerank` all go through this module so that a pair
//! is tokenized the same way everywhere.

pub mod bm25;
pub mod prompt;
pub mod store;
pub mod tokenizer;

pub use prompt::{
    format_body, join_document, yes_no_ids, Encoded, PromptConfig, PromptEncoder, YesNoIds, DEFAULT_INSTRUCTION,
    DEFAULT_MAX_DESCRIPTION_TOKENS, DEFAULT_MAX_LENGTH, PREFIX, SUFFIX,
};
pub use store::TokenStore;
pub use tokenizer::{load_tokenizer, TokenizerSource};

/// Everything that can go wrong between a tokenizer spec and token ids on disk.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// The tokenizers crate failed to parse a tokenizer file or to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid tokenizer `{spec}`: {message}")]
    Spec { spec: String, message: String },
    /// A hub file is not cached and the network may not (or cannot) be used.
    #[error(
        "`{file}` of hf:{repo}@{revision} is not in the Hugging Face cache ({cache}) and {why}; \
         download it once with network access, or point `tokenizer` at a local file \
         (a path to tokenizer.json or tokenizer.json.gz), or use the built-in `qwen3`"
    )]
    Offline { repo: String, revision: String, file: String, cache: String, why: String },
    /// A token the reranker head needs (`yes`, `no`) is missing from the vocabulary.
    #[error("the tokenizer has no token `{0}`; a Qwen3-Reranker tokenizer is required")]
    MissingToken(String),
    /// `max_length` leaves no room for the body once the prefix and suffix are in.
    #[error("max_length {max_length} is too small: the prompt prefix and suffix alone take {fixed} tokens")]
    MaxLength { max_length: usize, fixed: usize },
    /// A token store on disk is malformed or inconsistent.
    #[error("token store {path}: {message}")]
    Store { path: String, message: String },
}

impl TextError {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        TextError::Io { path: path.as_ref().display().to_string(), source }
    }
    pub(crate) fn tok(e: impl std::fmt::Display) -> Self {
        TextError::Tokenizer(e.to_string())
    }
}
