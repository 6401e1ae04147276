//! `hf://datasets/<owner>/<repo>/<file>` paths: find the file in the local Hugging Face cache, or
//! download it into that cache.
//!
//! The cache is looked at first so a pipeline whose data was fetched once keeps working offline,
//! and with `HF_HUB_OFFLINE=1` nothing is downloaded. Cache and download are [`crate::hub`]'s, the
//! same as for models and tokenizers; this module adds the `hf://` syntax and the load stage's
//! messages.

use std::path::PathBuf;

use crate::engine::StageError;
use crate::hub::{HubError, HubSettings, RepoKind};

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

/// A local file for `spec`: from the cache, else downloaded (unless offline).
pub fn resolve(
    spec: &str,
    path: &HfPath,
    revision: &str,
    key: &str,
    settings: &HubSettings,
) -> Result<PathBuf, StageError> {
    let err = |message: String| StageError::Param { key: key.to_string(), message };
    let advice = format!(
        "download it where there is network, or set `{key}` to a local copy of the file \
         (for example `{key} = \"data/{}\"`)",
        path.file.rsplit('/').next().unwrap_or(&path.file)
    );
    settings.repo(RepoKind::Dataset, &path.repo, revision).get(&path.file).map_err(|e| match e {
        HubError::NoCache => err(format!(
            "{spec}: cannot find the Hugging Face cache; set HF_HUB_CACHE or HF_HOME, or set `{key}` to a local file"
        )),
        HubError::Offline => err(format!(
            "{spec} (revision `{revision}`) is not in the Hugging Face cache at {} and \
             HF_HUB_OFFLINE forbids downloading it; {advice}",
            settings.cache_description()
        )),
        HubError::Download { .. } => err(format!("could not download {spec} (revision `{revision}`): {e}; {advice}")),
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
    fn finds_cached_files_by_branch_and_by_commit_and_refuses_to_download_offline() {
        let dir = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = dir.path().join("datasets--bstds--home_depot");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), commit).unwrap();
        let snap = repo.join("snapshots").join(commit).join("data");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("x.jsonl"), "{}").unwrap();
        let spec = "hf://datasets/bstds/home_depot/data/x.jsonl";
        let p = parse(spec).unwrap().unwrap();
        let settings = HubSettings::offline_at(dir.path());
        for rev in ["main", commit] {
            assert_eq!(resolve(spec, &p, rev, "path", &settings).unwrap(), snap.join("x.jsonl"), "{rev}");
        }
        assert!(resolve(spec, &p, "dev", "path", &settings).is_err());

        let missing = parse("hf://datasets/bstds/home_depot/data/y.parquet").unwrap().unwrap();
        let e =
            resolve("hf://datasets/bstds/home_depot/data/y.parquet", &missing, "main", "path", &settings).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("HF_HUB_OFFLINE") && msg.contains("`path = \"data/y.parquet\"`"), "{msg}");
    }
}
