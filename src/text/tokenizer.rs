//! Where a tokenizer comes from.
//!
//! A spec is one of:
//! - `qwen3`: the real Qwen3 tokenizer (Apache-2.0, see `data/tokenizers/qwen3/NOTICE`), embedded in
//!   the binary from a gzip copy so that the quickstart and the tests need neither network nor
//!   `../shared`;
//! - `hf:<owner>/<name>[@revision]`: `tokenizer.json` of a Hugging Face Hub model, found where model
//!   loading finds the model ([`crate::hub`]): the local HF cache is looked at first (`HF_HUB_CACHE`,
//!   else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), so a cached model works offline; with
//!   `HF_HUB_OFFLINE=1` nothing is downloaded;
//! - anything else: a local path to a `tokenizer.json`, a gzipped one (detected by its magic bytes,
//!   whatever its name), or a directory holding `tokenizer.json` (a model directory).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tokenizers::Tokenizer;

use super::TextError;
use crate::hub::{HubSettings, RepoKind};

/// The spec of the embedded tokenizer.
pub const BUILTIN_QWEN3: &str = "qwen3";

static QWEN3_GZ: &[u8] = include_bytes!("../../data/tokenizers/qwen3/tokenizer.json.gz");

/// A parsed tokenizer spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    BuiltinQwen3,
    /// A path as given (relative paths resolve against the project root when loading).
    File(PathBuf),
    Hub {
        repo: String,
        revision: String,
    },
}

impl TokenizerSource {
    pub fn parse(spec: &str) -> Result<Self, TextError> {
        let bad = |message: &str| TextError::Spec { spec: spec.to_string(), message: message.to_string() };
        if spec == BUILTIN_QWEN3 {
            return Ok(TokenizerSource::BuiltinQwen3);
        }
        if let Some(id) = spec.strip_prefix("hf:") {
            let (repo, revision) = match id.split_once('@') {
                Some((r, rev)) => (r, rev),
                None => (id, "main"),
            };
            let parts: Vec<&str> = repo.split('/').collect();
            if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(bad("expected hf:<owner>/<name>[@revision], e.g. hf:Qwen/Qwen3-Reranker-0.6B"));
            }
            if revision.is_empty() {
                return Err(bad("empty revision after `@`"));
            }
            return Ok(TokenizerSource::Hub { repo: repo.to_string(), revision: revision.to_string() });
        }
        if spec.trim().is_empty() {
            return Err(bad("empty; use `qwen3`, `hf:<owner>/<name>[@revision]` or a path to tokenizer.json"));
        }
        Ok(TokenizerSource::File(PathBuf::from(spec)))
    }

    /// A stable identity for cache keys: the content digest of the embedded file, or the hub id with
    /// its revision. Local files are hashed by the engine instead (see [`Self::local_file`]).
    pub fn identity(&self) -> String {
        match self {
            TokenizerSource::BuiltinQwen3 => format!("builtin:qwen3:{}", builtin_qwen3_digest()),
            TokenizerSource::Hub { repo, revision } => format!("hf:{repo}@{revision}"),
            TokenizerSource::File(p) => p.display().to_string(),
        }
    }

    /// The file that will be read, for a local spec (a directory resolves to its `tokenizer.json`).
    pub fn local_file(&self, root: &Path) -> Option<PathBuf> {
        match self {
            TokenizerSource::File(p) => Some(resolve_local(root, p)),
            _ => None,
        }
    }

    /// The tokenizer.json text, decompressed when needed (fetched from the hub or its cache for `hf:`).
    pub fn read_json(&self, root: &Path) -> Result<Vec<u8>, TextError> {
        match self {
            TokenizerSource::BuiltinQwen3 => gunzip(QWEN3_GZ, "builtin qwen3"),
            TokenizerSource::File(p) => read_maybe_gz(&resolve_local(root, p)),
            TokenizerSource::Hub { repo, revision } => {
                let path = hub_file(&HubSettings::from_env(), repo, revision, "tokenizer.json")?;
                read_maybe_gz(&path)
            }
        }
    }

    pub fn load(&self, root: &Path) -> Result<Tokenizer, TextError> {
        match self {
            TokenizerSource::BuiltinQwen3 => builtin_qwen3(),
            _ => from_json(&self.read_json(root)?),
        }
    }
}

/// Parse a spec and load it; relative paths resolve against `root`.
pub fn load_tokenizer(spec: &str, root: &Path) -> Result<Tokenizer, TextError> {
    TokenizerSource::parse(spec)?.load(root)
}

/// The embedded Qwen3 tokenizer. Parsed once per process (about half a second); callers get clones.
pub fn builtin_qwen3() -> Result<Tokenizer, TextError> {
    static PARSED: OnceLock<Result<Tokenizer, String>> = OnceLock::new();
    PARSED
        .get_or_init(|| gunzip(QWEN3_GZ, "builtin qwen3").and_then(|json| from_json(&json)).map_err(|e| e.to_string()))
        .clone()
        .map_err(TextError::Tokenizer)
}

/// blake3 of the embedded gzip bytes: the built-in tokenizer's identity in cache keys.
pub fn builtin_qwen3_digest() -> &'static str {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST.get_or_init(|| blake3::hash(QWEN3_GZ).to_hex().to_string())
}

pub fn from_json(json: &[u8]) -> Result<Tokenizer, TextError> {
    Tokenizer::from_bytes(json).map_err(TextError::tok)
}

fn resolve_local(root: &Path, p: &Path) -> PathBuf {
    let abs = if p.is_absolute() { p.to_path_buf() } else { root.join(p) };
    if abs.is_dir() {
        abs.join("tokenizer.json")
    } else {
        abs
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, TextError> {
    let bytes = std::fs::read(path).map_err(|e| TextError::io(path, e))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        gunzip(&bytes, &path.display().to_string())
    } else {
        Ok(bytes)
    }
}

fn gunzip(bytes: &[u8], what: &str) -> Result<Vec<u8>, TextError> {
    let mut out = Vec::with_capacity(bytes.len() * 6);
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).map_err(|e| TextError::io(what, e))?;
    Ok(out)
}

/// A file of a hub model (`tokenizer.json`), from the cache or downloaded ([`crate::hub`]).
pub fn hub_file(hub: &HubSettings, repo: &str, revision: &str, file: &str) -> Result<PathBuf, TextError> {
    hub.repo(RepoKind::Model, repo, revision).get(file).map_err(|e| TextError::Offline {
        repo: repo.to_string(),
        revision: revision.to_string(),
        file: file.to_string(),
        cache: hub.cache_description(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(TokenizerSource::parse("qwen3").unwrap(), TokenizerSource::BuiltinQwen3);
        assert_eq!(
            TokenizerSource::parse("hf:Qwen/Qwen3-Reranker-0.6B").unwrap(),
            TokenizerSource::Hub { repo: "Qwen/Qwen3-Reranker-0.6B".into(), revision: "main".into() }
        );
        assert_eq!(
            TokenizerSource::parse("hf:Qwen/Qwen3-Reranker-0.6B@abc123").unwrap().identity(),
            "hf:Qwen/Qwen3-Reranker-0.6B@abc123"
        );
        assert_eq!(TokenizerSource::parse("models/tok.json").unwrap(), TokenizerSource::File("models/tok.json".into()));
        for bad in ["hf:Qwen", "hf:/x", "hf:a/b/c", "hf:a/b@", ""] {
            assert!(TokenizerSource::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn builtin_is_the_real_qwen3_tokenizer() {
        let t = builtin_qwen3().unwrap();
        assert_eq!(t.get_vocab_size(true), 151_669);
        assert_eq!(t.encode("Hello world", false).unwrap().get_ids(), [9707, 1879]);
        assert_eq!(t.token_to_id("<|im_start|>"), Some(151644));
        let id = TokenizerSource::BuiltinQwen3.identity();
        assert_eq!(id, format!("builtin:qwen3:{}", blake3::hash(QWEN3_GZ).to_hex()));
    }

    #[test]
    fn local_files_plain_gzipped_or_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let json = gunzip(QWEN3_GZ, "builtin").unwrap();
        std::fs::create_dir(dir.path().join("model")).unwrap();
        std::fs::write(dir.path().join("model/tokenizer.json"), &json).unwrap();
        // A gzip named without .gz still loads: the magic bytes decide.
        std::fs::write(dir.path().join("tok.bin"), QWEN3_GZ).unwrap();
        for spec in ["model", "model/tokenizer.json", "tok.bin"] {
            let t = load_tokenizer(spec, dir.path()).unwrap();
            assert_eq!(t.token_to_id("yes"), Some(9693), "{spec}");
        }
        let src = TokenizerSource::parse("model").unwrap();
        assert_eq!(src.local_file(dir.path()).unwrap(), dir.path().join("model/tokenizer.json"));
        let err = load_tokenizer("missing.json", dir.path()).unwrap_err().to_string();
        assert!(err.contains("missing.json"), "{err}");
        std::fs::write(dir.path().join("broken.json"), b"{not json").unwrap();
        assert!(matches!(load_tokenizer("broken.json", dir.path()), Err(TextError::Tokenizer(_))));
    }

    #[test]
    fn hub_cache_is_used_offline_and_a_miss_says_what_to_do() {
        let cache = tempfile::tempdir().unwrap();
        let hub = HubSettings::offline_at(cache.path());
        let err = hub_file(&hub, "Qwen/Qwen3-Reranker-0.6B", "main", "tokenizer.json").unwrap_err().to_string();
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
        assert!(err.contains("point `tokenizer` at a local file"), "{err}");

        // The layout huggingface_hub writes: refs/<branch> holds the commit, snapshots/<commit>/<file>.
        let repo_dir = cache.path().join("models--Qwen--Qwen3-Reranker-0.6B");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
        std::fs::create_dir_all(repo_dir.join("snapshots").join(commit)).unwrap();
        let file = repo_dir.join("snapshots").join(commit).join("tokenizer.json");
        std::fs::write(&file, b"{}").unwrap();
        assert_eq!(hub_file(&hub, "Qwen/Qwen3-Reranker-0.6B", "main", "tokenizer.json").unwrap(), file);
        assert_eq!(hub_file(&hub, "Qwen/Qwen3-Reranker-0.6B", commit, "tokenizer.json").unwrap(), file);
        assert!(hub_file(&hub, "Qwen/Qwen3-Reranker-0.6B", "v2", "tokenizer.json").is_err());
    }
}
