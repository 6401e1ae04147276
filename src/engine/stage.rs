//! The one trait every stage kind implements, and what the runner hands it.
//!
//! The engine (config, DAG, cache, store, runner, CLI) only sees this trait: a stage is a kind name, an
//! implementation version, embedded documented defaults, the external inputs it reads, and a `run`
//! that writes files into a directory. Everything ML-specific lives behind it in `crate::stages`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};
use serde::de::DeserializeOwned;

use super::params::Params;

/// Metrics and statistics a stage reports; they land in its manifest and in the run record.
pub type JsonMap = serde_json::Map<String, serde_json::Value>;

/// An input a stage reads from outside the store. Its identity goes into the cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalInput {
    /// A file relative to the project root (or absolute); hashed by content, never by mtime or path.
    File(String),
    /// A directory relative to the project root: every file in it, by relative path and content.
    Dir(String),
    /// Something the engine cannot hash (a hub id with a revision): the string itself is the identity.
    Remote(String),
}

/// What a finished stage reports besides its files.
#[derive(Debug, Default, Clone)]
pub struct StageOutput {
    /// Headline numbers (losses, AUC, …): shown by `pipe status`, copied into run records for `pipe compare`.
    pub metrics: JsonMap,
    /// Descriptive statistics (row counts, histograms): kept in the manifest only.
    pub stats: JsonMap,
}

/// Why a stage failed. Stages keep their own typed errors and convert into this at the boundary.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Bad input data: points at the file and line so the user can fix it.
    #[error("{file}:{line}: {message}")]
    Data { file: String, line: u64, message: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// A parameter value that only turns out wrong when the stage runs (a missing file, say).
    #[error("parameter `{key}`: {message}")]
    Param { key: String, message: String },
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("interrupted")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Other(#[from] Box<dyn std::error::Error + Send + Sync>),
}

impl StageError {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        StageError::Io { path: path.as_ref().display().to_string(), source }
    }
    pub fn failed(msg: impl Into<String>) -> Self {
        StageError::Failed(msg.into())
    }
}

/// One upstream stage's committed artifact.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub id: String,
    pub kind: String,
    pub dir: PathBuf,
}

/// Everything a stage may touch while it runs.
pub struct StageContext<'a> {
    /// The stage's id in the pipeline (`split`, `train_lora`, …).
    pub id: &'a str,
    pub params: &'a Params,
    /// Project root: relative paths in parameters resolve against it.
    pub root: &'a Path,
    /// Temp dir inside the store; renamed into place only if `run` returns Ok.
    pub out: &'a Path,
    /// Directory tied to the cache key that survives failures (train checkpoints); removed on success.
    pub scratch: &'a Path,
    pub upstream: &'a [Upstream],
    /// No progress bars or chatter on stderr (`--quiet`, `--json`).
    pub quiet: bool,
    /// Set by Ctrl-C/SIGTERM; long loops should poll it through [`StageContext::check_cancel`].
    pub cancel: &'a AtomicBool,
}

impl StageContext<'_> {
    /// Typed view of the parameters; they were already type-checked against the defaults.
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, StageError> {
        self.params.decode().map_err(|e| StageError::Failed(format!("parameters: {e}")))
    }

    /// Resolve a path parameter against the project root.
    pub fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root.join(p)
        }
    }

    /// The single upstream artifact of a given kind; a clear error when it is missing or ambiguous.
    pub fn upstream_of(&self, kind: &str) -> Result<&Upstream, StageError> {
        let mut found = self.upstream.iter().filter(|u| u.kind == kind);
        match (found.next(), found.next()) {
            (Some(u), None) => Ok(u),
            (None, _) => Err(StageError::Upstream(format!(
                "stage `{}` needs an upstream stage of kind `{kind}`; add it to `needs`",
                self.id
            ))),
            (Some(_), Some(_)) => Err(StageError::Upstream(format!(
                "stage `{}` has more than one upstream stage of kind `{kind}`",
                self.id
            ))),
        }
    }

    pub fn check_cancel(&self) -> Result<(), StageError> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// A progress bar on stderr (hidden when quiet): anything that takes seconds shows one.
    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        if self.quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template("  {prefix:.bold} {msg} [{bar:30.cyan/blue}] {pos}/{len} {per_sec} eta {eta}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_prefix(self.id.to_string());
        bar.set_message(what.to_string());
        bar
    }
}

/// A stage kind. Implementations are registered in `crate::stages::registry`.
pub trait Stage: Send + Sync {
    /// The `kind = "..."` name in pipeline files; also the store bucket `artifacts/<kind>/`.
    fn kind(&self) -> &'static str;
    /// Bump when the meaning of the output changes: every cached artifact of this kind goes stale.
    fn version(&self) -> u32;
    /// The documented defaults (`stages/<kind>.toml`, embedded): the bottom config layer and the schema.
    fn defaults(&self) -> &'static str;
    /// Value checks beyond types (ratios sum to one, a known enum value). Return (key, message).
    fn check(&self, _params: &Params) -> Result<(), (String, String)> {
        Ok(())
    }
    /// Top-level parameters that change how the stage computes but never what it outputs (a
    /// memory/speed trade-off): left out of the cache key, so switching one reuses the artifact.
    fn unkeyed(&self) -> &'static [&'static str] {
        &[]
    }
    /// Files or remote ids outside the store that the output depends on.
    fn inputs(&self, _params: &Params) -> Vec<ExternalInput> {
        Vec::new()
    }
    fn run(&self, ctx: &StageContext) -> Result<StageOutput, StageError>;
}
