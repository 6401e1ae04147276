//! The Hugging Face Hub, as model loading, tokenizer loading and data loading all reach it: one
//! reading of the environment and one cache layout, so that a file one of them finds, the others
//! find too.
//!
//! The settings follow the Python `huggingface_hub`, which is what fills the caches this reads:
//! - cache directory: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (an
//!   empty value counts as unset). hf-hub's own `Cache::from_env` knows only `HF_HOME`, and
//!   clusters point `HF_HUB_CACHE` at shared storage, so the directory is worked out here;
//! - `HF_HUB_OFFLINE`: true for `1`, `ON`, `YES` or `TRUE` in any case, anything else (`0`, `off`,
//!   `false`, empty) means online;
//! - `HF_ENDPOINT`: the server to download from (`https://huggingface.co` by default);
//! - `HF_TOKEN`, else the token file (`HF_TOKEN_PATH`, else `$HF_HOME/token`), for gated repos.
//!
//! A file is looked up in the cache first, by branch or tag through `refs/<revision>` and by a
//! pinned commit directly in `snapshots/<commit>/`, so cached files work offline and without a
//! request; otherwise, unless offline, hf-hub downloads it into the same cache.

use std::cell::OnceCell;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where downloads come from when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The kind of a hub repository; it decides the cache folder (`models--…`, `datasets--…`) and
/// the download URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    fn hf(self) -> hf_hub::RepoType {
        match self {
            RepoKind::Model => hf_hub::RepoType::Model,
            RepoKind::Dataset => hf_hub::RepoType::Dataset,
        }
    }

    fn folder_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
}

/// Where hub files are looked for and whether, from where and as whom they may be downloaded.
/// Built from an environment lookup ([`HubSettings::from_lookup`]) so that tests can pass their
/// own variables instead of changing the process environment.
#[derive(Clone, Default)]
pub struct HubSettings {
    /// The hub cache root (the directory holding `models--owner--name`); `None` when the
    /// environment names none (no HF_HUB_CACHE, HF_HOME or HOME).
    pub cache_dir: Option<PathBuf>,
    /// `HF_ENDPOINT`, without a trailing `/`; `None` for [`DEFAULT_ENDPOINT`].
    pub endpoint: Option<String>,
    /// Never touch the network; only the cache answers.
    pub offline: bool,
    /// Show a progress bar while downloading.
    pub progress: bool,
    /// `HF_TOKEN`.
    pub token: Option<String>,
    /// Where `huggingface-cli login` keeps the token, read when `token` is `None`.
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token itself (settings end up in error reports and logs).
        f.debug_struct("HubSettings")
            .field("cache_dir", &self.cache_dir)
            .field("endpoint", &self.endpoint)
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

/// `huggingface_hub`'s truthiness of an environment variable (`constants._is_true`): `1`, `ON`,
/// `YES`, `TRUE`, in any case; everything else is false.
pub fn is_true(value: &str) -> bool {
    matches!(value.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

impl HubSettings {
    /// The settings the process environment asks for; no progress bar.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// The settings from `get` (an environment variable's value by name); no progress bar.
    pub fn from_lookup(get: impl Fn(&str) -> Option<OsString>) -> Self {
        let path = |name: &str| get(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let text = |name: &str| get(name).and_then(|v| v.into_string().ok()).filter(|v| !v.is_empty());
        let hf_home = path("HF_HOME").or_else(|| path("HOME").map(|h| h.join(".cache").join("huggingface")));
        HubSettings {
            cache_dir: path("HF_HUB_CACHE").or_else(|| hf_home.as_ref().map(|h| h.join("hub"))),
            endpoint: text("HF_ENDPOINT").map(|e| e.trim_end_matches('/').to_string()).filter(|e| !e.is_empty()),
            offline: text("HF_HUB_OFFLINE").is_some_and(|v| is_true(&v)),
            progress: false,
            token: text("HF_TOKEN"),
            token_file: path("HF_TOKEN_PATH").or_else(|| hf_home.map(|h| h.join("token"))),
        }
    }

    /// Only the cache at `cache_dir`, never the network.
    pub fn offline_at(cache_dir: impl Into<PathBuf>) -> Self {
        HubSettings { cache_dir: Some(cache_dir.into()), offline: true, ..Default::default() }
    }

    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    pub fn endpoint(&self) -> &str {
        self.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT)
    }

    /// The cache directory for messages: the path, or why there is none.
    pub fn cache_description(&self) -> String {
        match &self.cache_dir {
            Some(d) => d.display().to_string(),
            None => "no cache directory: none of HF_HUB_CACHE, HF_HOME or HOME is set".to_string(),
        }
    }

    /// One repository at one revision (a branch, a tag or a commit hash).
    pub fn repo(&self, kind: RepoKind, id: &str, revision: &str) -> HubRepo<'_> {
        HubRepo { settings: self, kind, id: id.to_string(), revision: revision.to_string(), api: OnceCell::new() }
    }

    fn token(&self) -> Option<String> {
        self.token.clone().or_else(|| {
            let text = std::fs::read_to_string(self.token_file.as_ref()?).ok()?;
            Some(text.trim().to_string()).filter(|t| !t.is_empty())
        })
    }
}

/// Why a hub file could not be had. Callers add what to do about it in their own terms (a local
/// path for the parameter or flag at hand).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("there is no Hugging Face cache to look in or download to (set HF_HUB_CACHE or HF_HOME)")]
    NoCache,
    #[error("HF_HUB_OFFLINE is set")]
    Offline,
    #[error("the download from {endpoint} failed ({message})")]
    Download { endpoint: String, message: String },
}

/// A repository at a revision; made by [`HubSettings::repo`]. The download client is built on
/// the first download and reused for the repository's other files.
pub struct HubRepo<'a> {
    settings: &'a HubSettings,
    kind: RepoKind,
    id: String,
    revision: String,
    api: OnceCell<Result<hf_hub::api::sync::ApiRepo, String>>,
}

impl HubRepo<'_> {
    /// The cached copy of `file`, if there is one; never downloads.
    pub fn cached(&self, file: &str) -> Option<PathBuf> {
        cached(self.settings.cache_dir.as_deref()?, self.kind, &self.id, &self.revision, file)
    }

    /// `file` from the cache, else downloaded into it unless offline.
    pub fn get(&self, file: &str) -> Result<PathBuf, HubError> {
        let Some(cache_dir) = &self.settings.cache_dir else { return Err(HubError::NoCache) };
        if let Some(p) = cached(cache_dir, self.kind, &self.id, &self.revision, file) {
            return Ok(p);
        }
        if self.settings.offline {
            return Err(HubError::Offline);
        }
        let endpoint = self.settings.endpoint();
        let failed = |message: String| HubError::Download { endpoint: endpoint.to_string(), message };
        let api = self.api.get_or_init(|| {
            hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache_dir.clone()))
                .with_progress(self.settings.progress)
                .with_endpoint(endpoint.to_string())
                .with_token(self.settings.token())
                .build()
                .map(|api| {
                    api.repo(hf_hub::Repo::with_revision(self.id.clone(), self.kind.hf(), self.revision.clone()))
                })
                .map_err(|e| format!("the hub client could not start: {e}"))
        });
        api.as_ref().map_err(|e| failed(e.clone()))?.get(file).map_err(|e| failed(e.to_string()))
    }
}

/// The cache folder of a repository: `models--owner--name`, `datasets--owner--name`.
pub fn folder_name(kind: RepoKind, id: &str) -> String {
    format!("{}--{}", kind.folder_prefix(), id.replace('/', "--"))
}

/// The cached copy of `file` of `id` at `revision` under `cache_dir`, if there is one: a branch or
/// tag resolves through `refs/<revision>` to its commit; a commit hash names its snapshot directly
/// (a pinned commit usually has no ref of its own).
pub fn cached(cache_dir: &Path, kind: RepoKind, id: &str, revision: &str, file: &str) -> Option<PathBuf> {
    let base = cache_dir.join(folder_name(kind, id));
    let snapshot = |commit: &str| {
        let p = base.join("snapshots").join(commit).join(file);
        (!commit.is_empty() && p.is_file()).then_some(p)
    };
    let by_ref = std::fs::read_to_string(base.join("refs").join(revision)).ok();
    by_ref.and_then(|commit| snapshot(commit.trim())).or_else(|| snapshot(revision))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> HubSettings {
        let env: HashMap<String, OsString> = vars.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        HubSettings::from_lookup(|name| env.get(name).cloned())
    }

    #[test]
    fn offline_is_true_exactly_as_in_huggingface_hub() {
        for v in ["1", "ON", "on", "Yes", "YES", "true", "TRUE", "True"] {
            assert!(settings(&[("HF_HUB_OFFLINE", v)]).offline, "{v} must mean offline");
        }
        for v in ["0", "off", "OFF", "false", "no", "", "2", "y", "enabled"] {
            assert!(!settings(&[("HF_HUB_OFFLINE", v)]).offline, "{v:?} must mean online");
        }
        assert!(!settings(&[]).offline);
    }

    #[test]
    fn cache_dir_follows_hugging_face_precedence_and_ignores_empty_values() {
        let cache = |vars: &[(&str, &str)]| settings(vars).cache_dir;
        assert_eq!(cache(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("HOME", "/u")]), Some("/c".into()));
        assert_eq!(cache(&[("HF_HOME", "/h"), ("HOME", "/u")]), Some("/h/hub".into()));
        assert_eq!(cache(&[("HF_HUB_CACHE", ""), ("HF_HOME", "/h")]), Some("/h/hub".into()));
        assert_eq!(
            cache(&[("HF_HUB_CACHE", ""), ("HF_HOME", ""), ("HOME", "/u")]),
            Some("/u/.cache/huggingface/hub".into())
        );
        assert_eq!(cache(&[]), None);
        let no_cache = settings(&[]).repo(RepoKind::Model, "a/b", "main").get("config.json");
        assert_eq!(no_cache, Err(HubError::NoCache));
    }

    #[test]
    fn endpoint_and_token_come_from_the_environment() {
        let s = settings(&[("HF_ENDPOINT", "http://127.0.0.1:9/"), ("HF_HOME", "/h")]);
        assert_eq!(s.endpoint(), "http://127.0.0.1:9");
        assert_eq!(settings(&[("HF_ENDPOINT", "")]).endpoint(), DEFAULT_ENDPOINT);
        assert_eq!(s.token_file, Some("/h/token".into()));
        assert_eq!(s.token, None);
        let s = settings(&[("HF_TOKEN", "hf_secret"), ("HF_TOKEN_PATH", "/t"), ("HF_HUB_CACHE", "/c")]);
        assert_eq!((s.token.as_deref(), s.token_file.as_deref()), (Some("hf_secret"), Some(Path::new("/t"))));
        assert!(!format!("{s:?}").contains("hf_secret"), "the token must not be printed");
    }

    /// The layout huggingface_hub writes: `refs/<branch>` holds the commit, files live in
    /// `snapshots/<commit>/`.
    fn fake_repo(cache: &Path, kind: RepoKind, id: &str, commit: &str, file: &str) -> PathBuf {
        let base = cache.join(folder_name(kind, id));
        std::fs::create_dir_all(base.join("refs")).unwrap();
        std::fs::write(base.join("refs/main"), commit).unwrap();
        let path = base.join("snapshots").join(commit).join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "{}").unwrap();
        path
    }

    #[test]
    fn cached_files_are_found_by_branch_and_by_commit_per_repo_kind() {
        let dir = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let data = fake_repo(dir.path(), RepoKind::Dataset, "bstds/home_depot", commit, "data/x.jsonl");
        let model = fake_repo(dir.path(), RepoKind::Model, "acme/tiny", commit, "config.json");
        let c = |kind, id, rev, file| cached(dir.path(), kind, id, rev, file);
        assert_eq!(c(RepoKind::Dataset, "bstds/home_depot", "main", "data/x.jsonl"), Some(data.clone()));
        assert_eq!(c(RepoKind::Dataset, "bstds/home_depot", commit, "data/x.jsonl"), Some(data));
        assert_eq!(c(RepoKind::Dataset, "bstds/home_depot", "dev", "data/x.jsonl"), None);
        assert_eq!(c(RepoKind::Model, "bstds/home_depot", "main", "data/x.jsonl"), None, "kinds do not mix");
        assert_eq!(c(RepoKind::Model, "acme/tiny", "main", "config.json"), Some(model.clone()));
        assert_eq!(c(RepoKind::Model, "acme/tiny", commit, "config.json"), Some(model.clone()));

        // Offline, the cache still answers; a miss is refused without a request.
        let s = HubSettings::offline_at(dir.path());
        assert_eq!(s.repo(RepoKind::Model, "acme/tiny", "main").get("config.json"), Ok(model));
        assert_eq!(s.repo(RepoKind::Model, "acme/tiny", "main").get("model.safetensors"), Err(HubError::Offline));
    }

    #[test]
    fn online_a_miss_is_a_download_failure_not_offline() {
        let dir = tempfile::tempdir().unwrap();
        let hf = dir.path().join("hub");
        let s = settings(&[
            ("HF_HUB_CACHE", hf.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "off"),
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ]);
        let err = s.repo(RepoKind::Model, "acme/absent", "main").get("config.json").unwrap_err();
        assert!(matches!(&err, HubError::Download { endpoint, .. } if endpoint == "http://127.0.0.1:9"), "{err}");
    }
}
