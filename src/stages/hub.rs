//! `hf://datasets/<owner>/<repo>/<file>` paths: find the file in the local Hugging Face cache, or
//! download it into that cache.
//!
//! The cache is looked at first so a pipeline whose data was fetched once keeps working offline,
//! and with `HF_HUB_OFFLINE=1` nothing is downloaded. The cache directory follows the Hugging Face
//! convention (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`); hf-hub 0.4's
//! own `Cache::from_env` only knows `HF_HOME`, so the directory is worked out here.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo, RepoType};

use crate::engine::StageError;

/// A parsed `hf://datasets/<owner>/<repo>/<file>` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfPath {
    /// `owner/repo`.
    pub repo: String,
    /// The file inside the repository; may contain `/`.
    pub file: String,
}

pub const PREFIX: &str = "hf://";

/// `None` for a local path; `Some(Err(message))` for an `hf://` path that is malformed.
pub fn parse(spec: &str) -> Option<Result<HfPath, String>> {
    let rest = spec.strip_prefix(PREFIX)?;
    let shape = "expected hf://datasets/<owner>/<repo>/<file>";
    let Some(rest) = rest.strip_prefix("datasets/") else {
        return Some(Err(format!("`{spec}`: only dataset repositories are supported; {shape}")));
    };
    let mut parts = rest.splitn(3, '/');
    let (owner, repo, file) = (parts.next(), parts.next(), parts.next());
    Some(match (owner, repo, file) {
        (Some(o), Some(r), Some(f)) if !o.is_empty() && !r.is_empty() && !f.is_empty() && !f.ends_with('/') => {
            Ok(HfPath { repo: format!("{o}/{r}"), file: f.to_string() })
        }
        _ => Err(format!("`{spec}`: {shape}")),
    })
}

/// Where a file is looked for and whether it may be downloaded.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// `None` when the environment names no cache directory (no HF_HUB_CACHE, HF_HOME or HOME).
    pub cache_dir: Option<PathBuf>,
    pub offline: bool,
    pub progress: bool,
}

impl HubSettings {
    /// The settings the environment asks for (`HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE`).
    pub fn from_env(progress: bool) -> Self {
        let cache_dir =
            cache_dir_from(std::env::var_os("HF_HUB_CACHE"), std::env::var_os("HF_HOME"), std::env::var_os("HOME"));
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| truthy(&v));
        HubSettings { cache_dir, offline, progress }
    }
}

fn truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// The hub cache directory by the Hugging Face precedence rules.
pub fn cache_dir_from(
    hf_hub_cache: Option<OsString>,
    hf_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let set = |v: Option<OsString>| v.filter(|s| !s.is_empty()).map(PathBuf::from);
    set(hf_hub_cache)
        .or_else(|| set(hf_home).map(|h| h.join("hub")))
        .or_else(|| set(home).map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// The cached copy of `path` at `revision`, if there is one. `revision` may be a branch or tag
/// (resolved through the cache's `refs/`) or a commit hash (looked up in `snapshots/` directly).
pub fn cached(path: &HfPath, revision: &str, cache_dir: &Path) -> Option<PathBuf> {
    let repo = Repo::with_revision(path.repo.clone(), RepoType::Dataset, revision.to_string());
    let folder = cache_dir.join(repo.folder_name());
    Cache::new(cache_dir.to_path_buf()).repo(repo).get(&path.file).or_else(|| {
        let direct = folder.join("snapshots").join(revision).join(&path.file);
        direct.is_file().then_some(direct)
    })
}

/// A local file for `spec`: from the cache, else downloaded (unless offline).
pub fn resolve(
    spec: &str,
    path: &HfPath,
    revision: &str,
    key: &str,
    settings: &HubSettings,
) -> Result<PathBuf, StageError> {
    let Some(cache_dir) = &settings.cache_dir else {
        return Err(StageError::Param {
            key: key.to_string(),
            message: format!(
                "{spec}: cannot find the Hugging Face cache; set HF_HUB_CACHE or HF_HOME, or set \
                 `{key}` to a local file"
            ),
        });
    };
    if let Some(p) = cached(path, revision, cache_dir) {
        return Ok(p);
    }
    let advice = format!(
        "download it where there is network, or set `{key}` to a local copy of the file \
         (for example `{key} = \"data/{}\"`)",
        path.file.rsplit('/').next().unwrap_or(&path.file)
    );
    if settings.offline {
        return Err(StageError::Param {
            key: key.to_string(),
            message: format!(
                "{spec} (revision `{revision}`) is not in the Hugging Face cache at {} and \
                 HF_HUB_OFFLINE forbids downloading it; {advice}",
                cache_dir.display()
            ),
        });
    }
    let download = || -> Result<PathBuf, hf_hub::api::sync::ApiError> {
        let mut builder =
            hf_hub::api::sync::ApiBuilder::from_cache(Cache::new(cache_dir.clone())).with_progress(settings.progress);
        if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint);
        }
        let repo = Repo::with_revision(path.repo.clone(), RepoType::Dataset, revision.to_string());
        builder.build()?.repo(repo).get(&path.file)
    };
    download().map_err(|e| StageError::Param {
        key: key.to_string(),
        message: format!("could not download {spec} (revision `{revision}`): {e}; {advice}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dataset_paths_and_rejects_others() {
        assert_eq!(parse("data/train.csv"), None);
        assert_eq!(
            parse("hf://datasets/bstds/home_depot/data/train-00000.parquet"),
            Some(Ok(HfPath { repo: "bstds/home_depot".into(), file: "data/train-00000.parquet".into() }))
        );
        for bad in ["hf://bstds/home_depot/x.parquet", "hf://datasets/bstds/home_depot", "hf://datasets//r/f"] {
            assert!(matches!(parse(bad), Some(Err(_))), "{bad}");
        }
    }

    #[test]
    fn cache_dir_follows_hugging_face_precedence() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(cache_dir_from(s("/c"), s("/h"), s("/u")), Some(PathBuf::from("/c")));
        assert_eq!(cache_dir_from(None, s("/h"), s("/u")), Some(PathBuf::from("/h/hub")));
        assert_eq!(cache_dir_from(s(""), None, s("/u")), Some(PathBuf::from("/u/.cache/huggingface/hub")));
        assert_eq!(cache_dir_from(None, None, None), None);
    }

    #[test]
    fn finds_cached_files_by_branch_and_by_commit_and_refuses_to_download_offline() {
        let dir = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = dir.path().join("datasets--bstds--home_depot");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        let snap = repo.join("snapshots").join(commit).join("data");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("x.jsonl"), "{}").unwrap();
        let p = parse("hf://datasets/bstds/home_depot/data/x.jsonl").unwrap().unwrap();
        assert_eq!(cached(&p, "main", dir.path()), Some(snap.join("x.jsonl")));
        assert_eq!(cached(&p, commit, dir.path()), Some(snap.join("x.jsonl")));
        assert_eq!(cached(&p, "dev", dir.path()), None);

        let settings = HubSettings { cache_dir: Some(dir.path().into()), offline: true, progress: false };
        let missing = parse("hf://datasets/bstds/home_depot/data/y.parquet").unwrap().unwrap();
        let e =
            resolve("hf://datasets/bstds/home_depot/data/y.parquet", &missing, "main", "path", &settings).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("HF_HUB_OFFLINE") && msg.contains("`path = \"data/y.parquet\"`"), "{msg}");
    }
}
