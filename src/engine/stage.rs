//! The one trait every stage kind implements, and what the runner hands it.
//!
//! The engine (config, DAG, cache, store, runner, CLI) only sees [`Stage`]: a stage is a kind name, an
//! implementation version, embedded documented defaults, a [`Contract`] (the upstream kinds it reads
//! and the files it writes), the external inputs it reads, and a `run` that writes files into a
//! directory. Everything ML-specific lives behind it in `crate::stages`, where each kind implements
//! [`TypedStage`] once and gets [`Stage`] from it, so `check`, `inputs` and `run` all see the same
//! decoded, validated parameter struct.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

use super::params::{ParamError, Params, StageParams};
use super::slots::GpuDemand;

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
    /// A parameter that turned out wrong while running; `key` is relative to the stage.
    pub fn param(key: impl Into<String>, message: impl std::fmt::Display) -> Self {
        StageError::Param { key: key.into(), message: message.to_string() }
    }
}

impl From<ParamError> for StageError {
    fn from(e: ParamError) -> Self {
        StageError::Param { key: e.key, message: e.message }
    }
}

/// When a stage reads an upstream kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Always,
    /// Read when present (analyze draws the loss curve when there is a train stage), never missed.
    Optional,
    /// Read only when the string parameter `key` is one of `one_of` (evaluate reads the train
    /// stage's model only for `model = "trained"` or `"base"`). Data, not code, so the engine can
    /// check it at load and say which value made the upstream necessary.
    ParamIs {
        key: &'static str,
        one_of: &'static [&'static str],
    },
}

/// One upstream a stage reads: exactly one stage of any of `kinds` (split reads `normalize`, or
/// `load` when the pipeline does not normalize).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub kinds: &'static [&'static str],
    pub when: When,
}

impl Need {
    pub const fn always(kinds: &'static [&'static str]) -> Self {
        Need { kinds, when: When::Always }
    }
    pub const fn optional(kinds: &'static [&'static str]) -> Self {
        Need { kinds, when: When::Optional }
    }
    /// Whether these parameters make the upstream necessary.
    pub fn required(&self, params: &Params) -> bool {
        match self.when {
            When::Always => true,
            When::Optional => false,
            When::ParamIs { key, one_of } => {
                params.get(key).and_then(|v| v.as_str()).is_some_and(|v| one_of.contains(&v))
            }
        }
    }
}

/// What a stage kind reads from its upstream stages and what it leaves in its artifact directory.
///
/// Declared once per kind, next to the file-name constants that the producer writes with and the
/// consumers read with, so a file is named in one place. The engine checks `needs` against each
/// stage's `needs` list when the pipeline is loaded (a pipeline missing an upstream fails before
/// anything runs, not after the upstream stages have run) and `writes` after each run (a stage that
/// forgot a file fails instead of caching an artifact its consumers cannot read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contract {
    pub needs: &'static [Need],
    /// Files (or directories) relative to the artifact directory, always present after a run.
    pub writes: &'static [&'static str],
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
    /// GPU ordinals the run's slot pool gave this stage, the first to compute on; empty when it
    /// asked for none ([`Stage::gpus`]) or runs outside a pool. Never part of the cache key.
    pub gpus: &'a [usize],
}

impl StageContext<'_> {
    /// Resolve a path parameter against the project root.
    pub fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root.join(p)
        }
    }

    /// The single upstream artifact of one of `kinds`. The engine checked the contract at load, so
    /// the errors here only reach a stage run by hand (tests) with the wrong upstreams.
    pub fn upstream_of(&self, kinds: &[&str]) -> Result<&Upstream, StageError> {
        self.optional_upstream(kinds)?.ok_or_else(|| {
            StageError::Upstream(format!(
                "stage `{}` needs an upstream stage of kind `{}`; add it to `needs`",
                self.id,
                kinds.join("` or `")
            ))
        })
    }

    /// The upstream artifact of one of `kinds` when there is one; more than one is an error.
    pub fn optional_upstream(&self, kinds: &[&str]) -> Result<Option<&Upstream>, StageError> {
        let found: Vec<&Upstream> = self.upstream.iter().filter(|u| kinds.contains(&u.kind.as_str())).collect();
        match found.as_slice() {
            [] => Ok(None),
            [u] => Ok(Some(u)),
            _ => Err(StageError::Upstream(format!(
                "stage `{}` has more than one upstream stage of kind `{}`",
                self.id,
                kinds.join("` or `")
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

/// A stage kind as the engine sees it. Stage modules implement [`TypedStage`] instead and get this
/// from the blanket impl; the engine never sees their parameter structs.
pub trait Stage: Send + Sync {
    /// The `kind = "..."` name in pipeline files; also the store bucket `artifacts/<kind>/`.
    fn kind(&self) -> &'static str;
    /// Bump when the meaning of the output changes: every cached artifact of this kind goes stale.
    fn version(&self) -> u32;
    /// The documented defaults (`stages/<kind>.toml`, embedded): the bottom config layer and the schema.
    fn defaults(&self) -> &'static str;
    /// The upstream kinds it reads and the files it writes.
    fn contract(&self) -> Contract;
    /// Value checks beyond types (ratios sum to one, a known enum value), made at load.
    fn check(&self, params: &Params) -> Result<(), ParamError>;
    /// Whether this build can run the stage as configured (a CUDA device in a build without CUDA).
    /// Apart from `check` because such a pipeline is still valid: `pipe config`, `status` and
    /// `dag` work on it anywhere; only the commands that compute refuse it, before anything runs.
    fn available(&self, params: &Params) -> Result<(), ParamError>;
    /// Top-level parameters that change how the stage computes but never what it outputs (a
    /// memory/speed trade-off): left out of the cache key, so switching one reuses the artifact.
    fn unkeyed(&self) -> &'static [&'static str];
    /// The parameters as the cache key hashes them: without [`Stage::unkeyed`] ones, and with
    /// spellings that cannot change the output made canonical (`cuda:3` hashes as `cuda`), so an
    /// artifact is reused whichever GPU computed it.
    fn keyed_params(&self, params: &Params) -> toml::Table;
    /// Files or remote ids outside the store that the output depends on.
    fn inputs(&self, params: &Params) -> Vec<ExternalInput>;
    /// Whether the stage computes on a GPU with these parameters: the runner then waits for free
    /// GPU slots and hands their ordinals over in [`StageContext::gpus`].
    fn gpus(&self, params: &Params) -> GpuDemand;
    fn run(&self, ctx: &StageContext) -> Result<StageOutput, StageError>;
}

/// A stage kind with its parameter struct: what each module in `crate::stages` implements.
///
/// The parameters are decoded from the resolved table into `Self::Params` and validated by
/// [`StageParams::validate`] in one place (the blanket [`Stage`] impl), for the load-time check, the
/// cache key's inputs and the run alike, so no stage reads a parameter by name or keeps a default
/// of its own: the defaults are `stages/<kind>.toml` only.
pub trait TypedStage: Send + Sync {
    type Params: StageParams;
    const KIND: &'static str;
    const VERSION: u32;
    const DEFAULTS: &'static str;
    const CONTRACT: Contract;
    const UNKEYED: &'static [&'static str] = &[];
    // Associated functions, not methods: a kind is stateless, and `Tokenize.run(&ctx)` stays
    // unambiguous with both traits in scope.
    fn available(_params: &Self::Params) -> Result<(), ParamError> {
        Ok(())
    }
    fn inputs(_params: &Self::Params) -> Vec<ExternalInput> {
        Vec::new()
    }
    /// Rewrite, in the table the key hashes, values whose spelling changes nothing in the output.
    fn canonical_key(_params: &mut toml::Table) {}
    fn gpus(_params: &Self::Params) -> GpuDemand {
        GpuDemand::None
    }
    fn run(ctx: &StageContext, params: &Self::Params) -> Result<StageOutput, StageError>;
}

impl<T: TypedStage> Stage for T {
    fn kind(&self) -> &'static str {
        T::KIND
    }
    fn version(&self) -> u32 {
        T::VERSION
    }
    fn defaults(&self) -> &'static str {
        T::DEFAULTS
    }
    fn contract(&self) -> Contract {
        T::CONTRACT
    }
    fn check(&self, params: &Params) -> Result<(), ParamError> {
        params.decode::<T::Params>()?.validate()
    }
    fn available(&self, params: &Params) -> Result<(), ParamError> {
        T::available(&params.decode::<T::Params>()?)
    }
    fn unkeyed(&self) -> &'static [&'static str] {
        T::UNKEYED
    }
    fn keyed_params(&self, params: &Params) -> toml::Table {
        let mut t = params.0.clone();
        t.retain(|name, _| !T::UNKEYED.contains(&name));
        T::canonical_key(&mut t);
        t
    }
    fn gpus(&self, params: &Params) -> GpuDemand {
        params.decode::<T::Params>().map(|p| T::gpus(&p)).unwrap_or_default()
    }
    fn inputs(&self, params: &Params) -> Vec<ExternalInput> {
        // Only called on parameters that passed `check` at load.
        params.decode::<T::Params>().map(|p| T::inputs(&p)).unwrap_or_default()
    }
    fn run(&self, ctx: &StageContext) -> Result<StageOutput, StageError> {
        let p = ctx.params.decode::<T::Params>()?;
        p.validate()?;
        T::run(ctx, &p)
    }
}
