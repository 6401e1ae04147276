//! Hugging Face checkpoints in and out, and deterministic random initialisation.
//!
//! A model source is a local directory or `hf:<owner>/<name>[@revision]`. Hub ids resolve through
//! the local Hugging Face cache first (so a cached model works offline), then a download, both by
//! [`crate::hub`], which tokenizer and data loading share. Weights are read through a memory map
//! (single `model.safetensors` or a sharded `model.safetensors.index.json`) one tensor at a time
//! and cast to the requested dtype. Saving writes the layout
//! `transformers.AutoModelForCausalLM.from_pretrained` reads unchanged.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use super::config::Qwen3Config;
use super::qwen3::{ParamMap, Qwen3};
use super::ModelError;
use crate::hub::{HubError, HubRepo, HubSettings, RepoKind};
use crate::util::rng::SplitMix64;

pub(super) const CONFIG: &str = "config.json";
pub(super) const SINGLE: &str = "model.safetensors";
pub(super) const INDEX: &str = "model.safetensors.index.json";
pub(super) const TOKENIZER: &str = "tokenizer.json";

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory holding `config.json` and the safetensors weights.
    Dir(PathBuf),
    /// `hf:<owner>/<name>[@revision]`; `revision` defaults to `main`.
    Hub { repo: String, revision: String },
}

impl FromStr for ModelSource {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        let Some(id) = s.strip_prefix("hf:") else {
            if s.is_empty() {
                return Err(ModelError::BadSource { source_str: s.into(), reason: "empty path".into() });
            }
            return Ok(Self::Dir(PathBuf::from(s)));
        };
        let bad = |reason: &str| ModelError::BadSource { source_str: s.into(), reason: reason.into() };
        let (repo, revision) = match id.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => return Err(bad("empty revision after `@`")),
            None => (id, "main"),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(bad("expected hf:<owner>/<name>[@revision]"));
        }
        Ok(Self::Hub { repo: repo.into(), revision: revision.into() })
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(p) => write!(f, "{}", p.display()),
            Self::Hub { repo, revision } => write!(f, "hf:{repo}@{revision}"),
        }
    }
}

/// The files of one model on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    pub config: PathBuf,
    /// One file, or every shard named by the index (sorted, deduplicated).
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.to_path_buf(), source }
}

pub(super) fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })
}

/// The shard file names an index refers to.
fn index_shards(index: &Path) -> Result<Vec<String>, ModelError> {
    let v = read_json(index)?;
    let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| ModelError::NotAModelDir {
        path: index.to_path_buf(),
        reason: "no `weight_map` object".into(),
    })?;
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let f = file.as_str().ok_or_else(|| ModelError::NotAModelDir {
            path: index.to_path_buf(),
            reason: format!("weight_map[{name}] is not a string"),
        })?;
        if f.contains('/') || f.contains('\\') || f == ".." {
            return Err(ModelError::NotAModelDir {
                path: index.to_path_buf(),
                reason: format!("shard `{f}` is not a plain file name"),
            });
        }
        files.insert(f.to_owned());
    }
    Ok(files.into_iter().collect())
}

fn resolve_dir(dir: &Path) -> Result<ModelFiles, ModelError> {
    let not_model = |reason: String| ModelError::NotAModelDir { path: dir.to_path_buf(), reason };
    if !dir.is_dir() {
        return Err(not_model("no such directory".into()));
    }
    let config = dir.join(CONFIG);
    if !config.is_file() {
        return Err(not_model(format!("{CONFIG} is missing")));
    }
    let index = dir.join(INDEX);
    let weights = if index.is_file() {
        let shards: Vec<PathBuf> = index_shards(&index)?.into_iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = shards.iter().find(|p| !p.is_file()) {
            return Err(not_model(format!("shard {} named by {INDEX} is missing", missing.display())));
        }
        shards
    } else if dir.join(SINGLE).is_file() {
        vec![dir.join(SINGLE)]
    } else {
        return Err(not_model(format!("neither {SINGLE} nor {INDEX} is present")));
    };
    let tokenizer = Some(dir.join(TOKENIZER)).filter(|p| p.is_file());
    Ok(ModelFiles { config, weights, tokenizer })
}

/// The whole model from the cache, or `None` if any file is missing there.
fn resolve_cached(repo: &HubRepo) -> Option<ModelFiles> {
    let config = repo.cached(CONFIG)?;
    let weights = match repo.cached(INDEX) {
        Some(index) => index_shards(&index).ok()?.iter().map(|f| repo.cached(f)).collect::<Option<Vec<_>>>()?,
        None => vec![repo.cached(SINGLE)?],
    };
    Some(ModelFiles { config, weights, tokenizer: repo.cached(TOKENIZER) })
}

fn resolve_hub(repo: &str, revision: &str, hub: &HubSettings) -> Result<ModelFiles, ModelError> {
    let r = hub.repo(RepoKind::Model, repo, revision);
    // A fully cached model needs no request, even online.
    if let Some(files) = resolve_cached(&r) {
        return Ok(files);
    }
    let hub_err = |file: &str, e: HubError| ModelError::Hub {
        repo: format!("{repo}@{revision}"),
        file: file.into(),
        cache: hub.cache_description(),
        reason: e.to_string(),
    };
    let config = r.get(CONFIG).map_err(|e| hub_err(CONFIG, e))?;
    let weights = match r.get(INDEX) {
        Ok(index) => {
            let mut out = Vec::new();
            for shard in index_shards(&index)? {
                out.push(r.get(&shard).map_err(|e| hub_err(&shard, e))?);
            }
            out
        }
        Err(_) => vec![r.get(SINGLE).map_err(|e| hub_err(SINGLE, e))?],
    };
    Ok(ModelFiles { config, weights, tokenizer: r.get(TOKENIZER).ok() })
}

/// Finds a model's files on disk, downloading a hub model that is not cached yet.
pub fn resolve(source: &ModelSource, hub: &HubSettings) -> Result<ModelFiles, ModelError> {
    match source {
        ModelSource::Dir(d) => resolve_dir(d),
        ModelSource::Hub { repo, revision } => resolve_hub(repo, revision, hub),
    }
}

/// How to materialise the weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Every parameter is cast to this dtype (f32 for training and the parity tests).
    pub dtype: DType,
    pub device: Device,
    /// Hold parameters as `Var`s (one extra copy per tensor at load time) so gradients reach them.
    pub trainable: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::F32, device: Device::Cpu, trainable: false }
    }
}

fn check_float(dtype: DType, name: &str) -> Result<(), ModelError> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        other => Err(ModelError::UnsupportedDtype(format!("{other:?} (tensor `{name}`)"))),
    }
}

fn finish(t: Tensor, trainable: bool) -> Result<Tensor, ModelError> {
    Ok(if trainable { Var::from_tensor(&t)?.as_tensor().clone() } else { t })
}

/// Loads a resolved causal-LM checkpoint. Tensors are read from the memory map one at a time and
/// cast, so peak memory is the model in the target dtype plus one tensor. A tied model ignores a
/// stored `lm_head.weight` (as transformers does); other unused tensors are reported with a
/// warning. A sequence-classification export has no LM head to read, so it is refused here with
/// the way to load it ([`super::seqcls::load_reranker`]) rather than failing on a missing tensor.
pub fn load_files(files: &ModelFiles, opts: &LoadOptions) -> Result<Qwen3, ModelError> {
    let cfg = Qwen3Config::from_file(&files.config)?;
    if super::seqcls::is_seq_cls(&cfg) {
        return Err(ModelError::NotAModelDir {
            path: files.config.clone(),
            reason: "this is a Qwen3ForSequenceClassification export (one score row, no LM head); \
                     `pipe rerank --model` loads it, training and evaluate need the causal-LM model it was exported from"
                .into(),
        });
    }
    Ok(load_with_config(files, cfg, opts, &[])?.0)
}

/// Loads the decoder `cfg` describes plus the `extra` tensors (name, shape), returned apart.
pub(super) fn load_with_config(
    files: &ModelFiles,
    cfg: Qwen3Config,
    opts: &LoadOptions,
    extra: &[(&str, Vec<usize>)],
) -> Result<(Qwen3, Vec<Tensor>), ModelError> {
    check_float(opts.dtype, "requested dtype")?;
    // SAFETY: the files are opened read-only; like every mmap-based loader (transformers and
    // candle included) we rely on nobody truncating a checkpoint while it is being read.
    let st = unsafe { MmapedSafetensors::multi(&files.weights)? };
    let location = || files.weights.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    let read = |name: &str, shape: &[usize]| -> Result<Tensor, ModelError> {
        let view =
            st.get(name).map_err(|_| ModelError::MissingTensor { name: name.to_owned(), location: location() })?;
        if view.shape() != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_owned(),
                expected: shape.to_vec(),
                got: view.shape().to_vec(),
            });
        }
        let t = st.load(name, &opts.device)?;
        check_float(t.dtype(), name)?;
        finish(t.to_dtype(opts.dtype)?, opts.trainable)
    };
    let mut params = ParamMap::new();
    let expected = cfg.param_shapes();
    for (name, shape) in &expected {
        params.insert(name.clone(), read(name, shape)?);
    }
    let extras = extra.iter().map(|(name, shape)| read(name, shape)).collect::<Result<Vec<_>, _>>()?;
    let known: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).chain(extra.iter().map(|(n, _)| *n)).collect();
    let mut unused: Vec<String> = Vec::new();
    for path in &files.weights {
        // SAFETY: as above.
        let one = unsafe { MmapedSafetensors::new(path)? };
        for (name, _) in one.tensors() {
            let tied_head = cfg.tie_word_embeddings && name == "lm_head.weight";
            if !(known.contains(name.as_str()) || tied_head) {
                unused.push(name);
            }
        }
    }
    if !unused.is_empty() {
        unused.sort();
        // transformers only warns here too; a stray buffer should not make a model unusable.
        tracing::warn!("checkpoint {} holds tensors this Qwen3 config does not use (ignored): {unused:?}", location());
    }
    Ok((Qwen3::new(cfg, params)?, extras))
}

/// Resolves and loads in one step.
pub fn load(source: &ModelSource, hub: &HubSettings, opts: &LoadOptions) -> Result<Qwen3, ModelError> {
    load_files(&resolve(source, hub)?, opts)
}

/// How to write a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct SaveOptions {
    /// Storage dtype; `None` keeps the model's.
    pub dtype: Option<DType>,
    /// A `tokenizer.json` (or `tokenizer.json.gz`, decompressed) to place beside the weights so
    /// the directory is a complete model for transformers and for `pipe rerank`.
    pub tokenizer: Option<PathBuf>,
    /// Split the weights into `model-0000k-of-0000n.safetensors` shards of at most this many bytes
    /// (a tensor larger than the limit gets a shard of its own), with an index, as
    /// `save_pretrained(max_shard_size=…)` does. `None`: one `model.safetensors`.
    pub max_shard_bytes: Option<u64>,
}

pub(super) fn dtype_name(d: DType) -> Result<&'static str, ModelError> {
    match d {
        DType::F32 => Ok("float32"),
        DType::BF16 => Ok("bfloat16"),
        DType::F16 => Ok("float16"),
        other => Err(ModelError::UnsupportedDtype(format!("{other:?}"))),
    }
}

/// A tensor's bytes in safetensors' little-endian layout.
pub(super) struct Raw {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

pub(super) fn to_raw(t: &Tensor, dtype: DType) -> Result<Raw, ModelError> {
    let flat = t.to_dtype(dtype)?.flatten_all()?.to_device(&Device::Cpu)?;
    let (st_dtype, data): (_, Vec<u8>) = match dtype {
        DType::F32 => (safetensors::Dtype::F32, flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::BF16 => (
            safetensors::Dtype::BF16,
            flat.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        ),
        DType::F16 => (
            safetensors::Dtype::F16,
            flat.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        ),
        other => return Err(ModelError::UnsupportedDtype(format!("{other:?}"))),
    };
    Ok(Raw { dtype: st_dtype, shape: t.dims().to_vec(), data })
}

pub(super) fn write_safetensors(path: &Path, tensors: &[(&str, Raw)]) -> Result<(), ModelError> {
    // transformers 4.x refuses safetensors files whose metadata lacks format=pt.
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(tensors.iter().map(|(n, r)| (*n, r)), Some(meta), path)
        .map_err(|e| ModelError::Io { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })
}

pub(super) fn copy_tokenizer(src: &Path, dst: &Path) -> Result<(), ModelError> {
    let is_gz = src.extension().is_some_and(|e| e == "gz");
    if is_gz {
        let f = fs::File::open(src).map_err(io_err(src))?;
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(f).read_to_end(&mut text).map_err(io_err(src))?;
        let mut out = fs::File::create(dst).map_err(io_err(dst))?;
        out.write_all(&text).map_err(io_err(dst))?;
    } else {
        fs::copy(src, dst).map_err(io_err(src))?;
    }
    Ok(())
}

/// Writes `config.json` and the weights (plus `tokenizer.json` when given) into `dir`, creating
/// it. Weight files from an earlier save in the same directory are removed first, so a stale
/// index can never shadow the new weights. A tied model writes no `lm_head.weight`, like
/// `save_pretrained`.
pub fn save(model: &Qwen3, dir: &Path, opts: &SaveOptions) -> Result<(), ModelError> {
    let dtype = opts.dtype.unwrap_or(model.dtype());
    let dname = dtype_name(dtype)?;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let shard = name.starts_with("model-") && name.ends_with(".safetensors");
        if name == SINGLE || name == INDEX || shard {
            fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
        }
    }
    let config =
        serde_json::to_string_pretty(&model.config().to_hf_json(Some(dname))).expect("a JSON value always serialises");
    let cpath = dir.join(CONFIG);
    fs::write(&cpath, config + "\n").map_err(io_err(&cpath))?;

    let names: Vec<(&str, &Tensor)> = model.params().iter().collect();
    let elem = dtype.size_in_bytes() as u64;
    // Greedy shard assignment in name order, like transformers' `shard_checkpoint`.
    let mut shards: Vec<Vec<(&str, &Tensor)>> = vec![Vec::new()];
    let mut current = 0u64;
    for (name, t) in names {
        let bytes = t.elem_count() as u64 * elem;
        if let Some(max) = opts.max_shard_bytes {
            let last = shards.last().expect("never empty");
            if !last.is_empty() && current + bytes > max {
                shards.push(Vec::new());
                current = 0;
            }
        }
        current += bytes;
        shards.last_mut().expect("never empty").push((name, t));
    }
    if opts.max_shard_bytes.is_none() {
        let raws =
            shards[0].iter().map(|(n, t)| Ok((*n, to_raw(t, dtype)?))).collect::<Result<Vec<_>, ModelError>>()?;
        write_safetensors(&dir.join(SINGLE), &raws)?;
    } else {
        let n = shards.len();
        let mut weight_map = BTreeMap::new();
        let mut total = 0u64;
        for (k, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
            // One shard's bytes in memory at a time.
            let raws =
                shard.iter().map(|(name, t)| Ok((*name, to_raw(t, dtype)?))).collect::<Result<Vec<_>, ModelError>>()?;
            for (name, r) in &raws {
                total += r.data.len() as u64;
                weight_map.insert(name.to_string(), Value::from(file.clone()));
            }
            write_safetensors(&dir.join(&file), &raws)?;
        }
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        let ipath = dir.join(INDEX);
        fs::write(&ipath, serde_json::to_string_pretty(&index).expect("a JSON value always serialises") + "\n")
            .map_err(io_err(&ipath))?;
    }
    if let Some(tok) = &opts.tokenizer {
        copy_tokenizer(tok, &dir.join(TOKENIZER))?;
    }
    Ok(())
}

/// Normal(0, std) values by Box–Muller, from a stream keyed by (seed, tensor name), so each
/// tensor's values do not depend on which other tensors the config has.
fn normal_values(seed: u64, name: &str, n: usize, std: f64) -> Vec<f32> {
    // The project's own generator, so a seed gives the same weights on every platform and every
    // version of the `rand` crate (random models feed content-addressed caches).
    let mut rng = SplitMix64::keyed(seed, name);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (rng.next_f64_nonzero(), rng.next_f64_nonzero());
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// A freshly initialised model as transformers' `_init_weights` would make it: matrices from
/// Normal(0, `initializer_range`), norm weights 1, biases 0. Deterministic in `seed`.
pub fn random(
    cfg: &Qwen3Config,
    seed: u64,
    dtype: DType,
    device: &Device,
    trainable: bool,
) -> Result<Qwen3, ModelError> {
    check_float(dtype, "requested dtype")?;
    let mut params = ParamMap::new();
    for (name, shape) in cfg.param_shapes() {
        let n: usize = shape.iter().product();
        let values = if shape.len() >= 2 {
            normal_values(seed, &name, n, cfg.initializer_range)
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            vec![1.0; n]
        };
        let t = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
        params.insert(name, finish(t, trainable)?);
    }
    Qwen3::new(cfg.clone(), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            "hf:Qwen/Qwen3-Reranker-0.6B".parse::<ModelSource>().unwrap(),
            ModelSource::Hub { repo: "Qwen/Qwen3-Reranker-0.6B".into(), revision: "main".into() }
        );
        assert_eq!(
            "hf:a/b@v1.0".parse::<ModelSource>().unwrap(),
            ModelSource::Hub { repo: "a/b".into(), revision: "v1.0".into() }
        );
        assert_eq!("models/tiny".parse::<ModelSource>().unwrap(), ModelSource::Dir("models/tiny".into()));
        for bad in ["hf:noslash", "hf:a/b/c", "hf:a/b@", "hf:/b", ""] {
            assert!(bad.parse::<ModelSource>().is_err(), "{bad}");
        }
    }

    #[test]
    fn normal_init_is_deterministic_and_has_the_requested_spread() {
        let a = normal_values(7, "x", 20_000, 0.02);
        assert_eq!(a, normal_values(7, "x", 20_000, 0.02));
        assert_ne!(a, normal_values(8, "x", 20_000, 0.02));
        assert_ne!(a, normal_values(7, "y", 20_000, 0.02));
        let mean = a.iter().map(|v| *v as f64).sum::<f64>() / a.len() as f64;
        let sd = (a.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64).sqrt();
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((sd - 0.02).abs() < 1e-3, "{sd}");
    }
}
