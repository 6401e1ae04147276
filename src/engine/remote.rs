//! The remote artifact store: a bucket (S3, Google Cloud Storage, Azure) or a directory (`file://`)
//! that a team shares, so that one machine's artifacts are another's cache hits.
//!
//! The layout mirrors the local store: `<prefix>/<kind>/<key>/<files…>` with the artifact's
//! `manifest.json` uploaded **last**, so an artifact whose upload was cut short has no manifest and is
//! invisible: the manifest is the only thing a reader trusts, exactly as in the local store. A download
//! goes into the local store's temp dir under the key's lock, every file's blake3 is checked against
//! the manifest while it streams, and the directory is published with [`Store::publish`], the step a
//! computed stage ends with. Run records travel under `<prefix>/runs/…`, at the same relative path as
//! in the local store.
//!
//! `object_store` is async; this module owns a small current-thread tokio runtime and blocks on it, so
//! nothing outside it sees a future. Credentials come only from the providers' standard environment
//! variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`), and every message this module produces is scrubbed of
//! their values and of the URL's user info, so they cannot reach a log, a run record or an error.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::path::{Path as ObjPath, PathPart};
use object_store::{ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use tokio::io::AsyncWriteExt;

use super::key::dir_name;
use super::runner::{CURRENT_TEMP, INTERRUPTED};
use super::store::{output_hash, read_manifest, Manifest, Store, StoreError, MANIFEST};

/// What a remote URL may look like (said in every URL error).
pub const URL_FORMS: &str =
    "write `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix` or `file:///absolute/path`";

/// Test hook: milliseconds to sleep before each object is transferred, so that a test can kill a
/// process mid-transfer deterministically. Not a user setting.
pub const DELAY_VAR: &str = "PIPE_TEST_TRANSFER_DELAY_MS";

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote `{url}`: {message}")]
    Url { url: String, message: String },
    #[error("{object}: {message}")]
    Transfer { object: String, message: String },
    #[error(transparent)]
    Corrupt(Box<Corrupt>),
    #[error("{object}: {message}")]
    BadManifest { object: String, message: String },
    #[error("{path}: {message}")]
    Local { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("interrupted")]
    Interrupted,
}

/// The remote copy does not match its own manifest; nothing was published locally.
#[derive(Debug, thiserror::Error)]
#[error(
    "{object}: blake3 {actual}, but the manifest says {expected}: the remote copy of {kind} {short} is \
     damaged, and nothing was stored locally for that key\n  hint: from a machine whose copy passes \
     `pipe verify`, run `pipe push PIPELINE --force {stage}`, or delete {manifest} so that the stage is \
     recomputed and uploaded again"
)]
pub struct Corrupt {
    pub object: String,
    pub expected: String,
    pub actual: String,
    pub kind: String,
    pub short: String,
    pub stage: String,
    pub manifest: String,
}

/// Whether `url` names a remote this build can open (checked when the pipeline file is loaded, so a
/// typo fails before anything runs).
pub fn check_url(url: &str) -> Result<(), RemoteError> {
    let bad = |message: String| RemoteError::Url { url: redact_url(url), message };
    let parsed = url::Url::parse(url).map_err(|e| bad(format!("not a URL ({e})")))?;
    match parsed.scheme() {
        "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" => {
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(bad("names no bucket".into()));
            }
            Ok(())
        }
        "file" => parsed.to_file_path().map(|_| ()).map_err(|_| bad("not an absolute local path".into())),
        other => Err(bad(format!("unsupported scheme `{other}`"))),
    }
}

/// The URL without user info or query string (an Azure SAS token travels in the query): what every
/// message, record and reason shows.
pub fn redact_url(url: &str) -> String {
    const SCHEMES: [&str; 8] = ["s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "file"];
    match url::Url::parse(url) {
        // `user:secret@host` parses as scheme `user`: show nothing of what is not a remote URL.
        Ok(u) if !SCHEMES.contains(&u.scheme()) => format!("{}:…", u.scheme()),
        Ok(mut u) => {
            let had_query = u.query().is_some();
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            let mut s = u.to_string();
            if had_query {
                s.push_str("?…");
            }
            s
        }
        // Not parseable: show only the scheme, never the rest (it may hold a secret).
        Err(_) => match url.split_once("://") {
            Some((scheme, _)) if scheme.chars().all(|c| c.is_ascii_alphanumeric()) => format!("{scheme}://…"),
            _ => "(not a URL)".into(),
        },
    }
}

/// The values of the credential variables that are set: scrubbed from every message.
fn secrets(url: &str) -> Vec<String> {
    let mut out: Vec<String> = std::env::vars()
        .filter(|(k, _)| {
            let k = k.to_ascii_uppercase();
            (k.starts_with("AWS_") || k.starts_with("GOOGLE_") || k.starts_with("AZURE_"))
                && ["KEY", "SECRET", "TOKEN", "SAS", "PASSWORD", "CREDENTIAL"].iter().any(|w| k.contains(w))
        })
        .map(|(_, v)| v)
        .collect();
    if let Ok(u) = url::Url::parse(url) {
        out.extend(u.password().map(str::to_string));
        if !u.username().is_empty() {
            out.push(u.username().to_string());
        }
        out.extend(u.query().map(str::to_string));
    }
    // Short values would blank out ordinary words; real secrets are long.
    out.retain(|v| v.len() >= 6);
    out.sort_by_key(|v| std::cmp::Reverse(v.len()));
    out
}

fn scrub(text: &str, secrets: &[String]) -> String {
    let mut t = text.to_string();
    for s in secrets {
        t = t.replace(s.as_str(), "***");
    }
    t
}

/// What [`Remote::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Uploaded {
        files: usize,
        bytes: u64,
    },
    /// The remote already had a complete artifact for the key (first upload wins; `--force` replaces).
    AlreadyThere,
}

pub struct Remote {
    /// The redacted URL, without a trailing slash.
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    rt: tokio::runtime::Runtime,
    secrets: Vec<String>,
    delay: Option<Duration>,
}

impl Remote {
    /// Connects lazily: opening only parses the URL and reads the environment; the first request
    /// is the first network traffic.
    pub fn open(url: &str) -> Result<Remote, RemoteError> {
        check_url(url)?;
        let secrets = secrets(url);
        let shown = redact_url(url).trim_end_matches('/').to_string();
        let bad =
            |e: object_store::Error| RemoteError::Url { url: shown.clone(), message: scrub(&e.to_string(), &secrets) };
        let parsed = url::Url::parse(url).expect("checked");
        // Fail within seconds, not object_store's default of minutes, when the server is unreachable.
        let retry = RetryConfig { max_retries: 3, retry_timeout: Duration::from_secs(30), ..Default::default() };
        // Set on top of the environment's client settings (`with_client_options` would replace them,
        // `AWS_ALLOW_HTTP` included).
        let connect = (ClientConfigKey::ConnectTimeout, "10s");
        // The bucket comes from the URL's host; the builders ignore its path, which is our prefix.
        let bucket_url = format!("{}://{}", parsed.scheme(), parsed.host_str().unwrap_or_default());
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            "file" => {
                let dir = parsed.to_file_path().expect("checked");
                std::fs::create_dir_all(&dir)
                    .map_err(|e| RemoteError::Local { path: dir.clone(), message: e.to_string() })?;
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(bad)?)
            }
            "s3" | "s3a" => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(bucket_url)
                    .with_retry(retry)
                    .with_config(object_store::aws::AmazonS3ConfigKey::Client(connect.0), connect.1)
                    .build()
                    .map_err(bad)?,
            ),
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(bucket_url)
                    .with_retry(retry)
                    .with_config(object_store::gcp::GoogleConfigKey::Client(connect.0), connect.1)
                    .build()
                    .map_err(bad)?,
            ),
            _ => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(bucket_url)
                    .with_retry(retry)
                    .with_config(object_store::azure::AzureConfigKey::Client(connect.0), connect.1)
                    .build()
                    .map_err(bad)?,
            ),
        };
        let prefix = if parsed.scheme() == "file" {
            ObjPath::default()
        } else {
            ObjPath::from_iter(parsed.path().split('/').filter(|s| !s.is_empty()).map(PathPart::from))
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| RemoteError::Url {
            url: shown.clone(),
            message: format!("cannot start the I/O runtime: {e}"),
        })?;
        let delay = std::env::var(DELAY_VAR).ok().and_then(|v| v.parse().ok()).map(Duration::from_millis);
        Ok(Remote { url: shown, store, prefix, rt, secrets, delay })
    }

    /// The redacted URL: safe to print and to record.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn obj(&self, rel: &str) -> ObjPath {
        ObjPath::from_iter(
            self.prefix.parts().chain(rel.split('/').filter(|s| !s.is_empty()).map(|s| PathPart::from(s).to_owned())),
        )
    }

    /// The object's full URL, for messages.
    fn show(&self, rel: &str) -> String {
        format!("{}/{}", self.url, rel.trim_start_matches('/'))
    }

    fn transfer(&self, rel: &str, e: impl std::fmt::Display) -> RemoteError {
        RemoteError::Transfer { object: self.show(rel), message: scrub(&e.to_string(), &self.secrets) }
    }

    fn pause(&self) {
        if let Some(d) = self.delay {
            std::thread::sleep(d);
        }
    }

    fn artifact_rel(kind: &str, key: &str, file: &str) -> String {
        format!("{kind}/{}/{file}", dir_name(key))
    }

    /// The remote's manifest for a key, or None when the remote has no complete artifact for it.
    pub fn manifest(&self, kind: &str, key: &str) -> Result<Option<Manifest>, RemoteError> {
        let rel = Self::artifact_rel(kind, key, MANIFEST);
        let obj = self.obj(&rel);
        let got = self.rt.block_on(async { self.store.get(&obj).await?.bytes().await });
        let bytes = match got {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.transfer(&rel, e)),
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| RemoteError::BadManifest { object: self.show(&rel), message: format!("unreadable: {e}") })?;
        if m.key != key || m.kind != kind {
            return Err(RemoteError::BadManifest {
                object: self.show(&rel),
                message: format!("is the manifest of {} {}, not of {kind} {}", m.kind, m.key, key),
            });
        }
        Ok(Some(m))
    }

    /// Download the artifact `m` describes into the local store and publish it. The caller holds the
    /// key's lock. On any error the temp dir is removed and nothing is published.
    pub fn fetch(&self, store: &Store, m: &Manifest) -> Result<(), RemoteError> {
        let tmp = {
            // Registered under the same lock and flag as a computing stage's temp dir, so Ctrl-C
            // removes a half-downloaded artifact too (a `kill -9` leaves it for `sweep_temp`).
            let mut running = CURRENT_TEMP.lock().expect("temp lock");
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Err(RemoteError::Interrupted);
            }
            let tmp = store.temp_dir(&m.kind, &m.key)?;
            running.push(tmp.clone());
            tmp
        };
        let forget = |t: &Path| CURRENT_TEMP.lock().expect("temp lock").retain(|p| p != t);
        let fail = |e: RemoteError| {
            let _ = std::fs::remove_dir_all(&tmp);
            forget(&tmp);
            Err(e)
        };
        if let Err(e) = self.download_into(&tmp, m) {
            return fail(e);
        }
        let published = {
            let mut running = CURRENT_TEMP.lock().expect("temp lock");
            if INTERRUPTED.load(Ordering::SeqCst) {
                Err(RemoteError::Interrupted)
            } else {
                let r = store.publish(&tmp, m);
                if r.is_ok() {
                    running.retain(|p| p != &tmp);
                }
                r.map_err(RemoteError::from)
            }
        };
        match published {
            Ok(()) => Ok(()),
            Err(e) => fail(e),
        }
    }

    fn download_into(&self, tmp: &Path, m: &Manifest) -> Result<(), RemoteError> {
        let mrel = Self::artifact_rel(&m.kind, &m.key, MANIFEST);
        let corrupt = |object: String, expected: String, actual: String| {
            RemoteError::Corrupt(Box::new(Corrupt {
                object,
                expected,
                actual,
                kind: m.kind.clone(),
                short: dir_name(&m.key).to_string(),
                stage: m.stage.clone(),
                manifest: self.show(&mrel),
            }))
        };
        // The output hash is what downstream keys are built from: it must describe these files.
        let listed = output_hash(&m.files);
        if listed != m.output_hash {
            return Err(corrupt(
                self.show(&mrel),
                format!("output_hash {}", m.output_hash),
                format!("{listed} over its file list"),
            ));
        }
        for f in &m.files {
            let safe = Path::new(&f.path).components().all(|c| matches!(c, Component::Normal(_)));
            if !safe || f.path.is_empty() || f.path == MANIFEST {
                return Err(RemoteError::BadManifest {
                    object: self.show(&mrel),
                    message: format!("lists `{}`, which is not a relative path inside the artifact", f.path),
                });
            }
            let rel = Self::artifact_rel(&m.kind, &m.key, &f.path);
            let dest = tmp.join(&f.path);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| RemoteError::Local { path: parent.to_path_buf(), message: e.to_string() })?;
            }
            self.pause();
            let (hash, size) = self.get_to_file(&rel, &dest)?;
            if hash != f.blake3 || size != f.size {
                return Err(corrupt(
                    self.show(&rel),
                    format!("{} ({} bytes)", f.blake3, f.size),
                    format!("{hash} ({size} bytes)"),
                ));
            }
        }
        let mpath = tmp.join(MANIFEST);
        let bytes = serde_json::to_vec_pretty(m).expect("manifest serializes");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&mpath)?;
            f.write_all(&bytes)?;
            f.sync_all()
        };
        write().map_err(|e| RemoteError::Local { path: mpath.clone(), message: e.to_string() })?;
        let _ = crate::util::fs::sync_dir(tmp);
        Ok(())
    }

    /// Stream one object to a file, hashing as it arrives: (blake3, size).
    fn get_to_file(&self, rel: &str, dest: &Path) -> Result<(String, u64), RemoteError> {
        let obj = self.obj(rel);
        let local = |e: std::io::Error| RemoteError::Local { path: dest.to_path_buf(), message: e.to_string() };
        let mut file = std::fs::File::create(dest).map_err(local)?;
        let mut h = blake3::Hasher::new();
        let mut size = 0u64;
        self.rt.block_on(async {
            let mut stream = self.store.get(&obj).await.map_err(|e| self.transfer(rel, e))?.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.transfer(rel, e))?;
                h.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk).map_err(local)?;
            }
            Ok::<_, RemoteError>(())
        })?;
        file.sync_all().map_err(local)?;
        Ok((h.finalize().to_hex().to_string(), size))
    }

    /// Upload one local file, hashing what is sent: (blake3, size).
    fn put_file(&self, src: &Path, rel: &str) -> Result<(String, u64), RemoteError> {
        let local = |e: std::io::Error| RemoteError::Local { path: src.to_path_buf(), message: e.to_string() };
        let mut file = std::fs::File::open(src).map_err(local)?;
        let mut h = blake3::Hasher::new();
        let mut size = 0u64;
        let obj = self.obj(rel);
        self.rt.block_on(async {
            // Small files go up in one PUT, large ones as a multipart upload.
            let mut w = object_store::buffered::BufWriter::new(self.store.clone(), obj);
            let mut buf = vec![0u8; 4 << 20];
            loop {
                let n = file.read(&mut buf).map_err(local)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                size += n as u64;
                w.write_all(&buf[..n]).await.map_err(|e| self.transfer(rel, e))?;
            }
            w.shutdown().await.map_err(|e| self.transfer(rel, e))
        })?;
        Ok((h.finalize().to_hex().to_string(), size))
    }

    /// Upload a complete local artifact, its files first and its manifest last. A remote that already
    /// has the key keeps its copy unless `force`, which first deletes the remote manifest so that the
    /// artifact is invisible while it is replaced.
    pub fn push(&self, store: &Store, kind: &str, key: &str, force: bool) -> Result<Pushed, RemoteError> {
        let dir = store.artifact_dir(kind, key);
        let mpath = dir.join(MANIFEST);
        let Some(m) = read_manifest(&dir)? else {
            return Err(RemoteError::Local {
                path: dir,
                message: "no complete artifact here to upload; run the pipeline first".into(),
            });
        };
        let mrel = Self::artifact_rel(kind, key, MANIFEST);
        if force {
            match self.rt.block_on(self.store.delete(&self.obj(&mrel))) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.transfer(&mrel, e)),
            }
        } else if self.manifest(kind, key)?.is_some() {
            return Ok(Pushed::AlreadyThere);
        }
        let mut bytes = 0;
        for f in &m.files {
            let rel = Self::artifact_rel(kind, key, &f.path);
            self.pause();
            let (hash, size) = self.put_file(&dir.join(&f.path), &rel)?;
            if hash != f.blake3 {
                // The manifest is not uploaded, so the remote never shows this damaged copy.
                return Err(RemoteError::Local {
                    path: dir.join(&f.path),
                    message: format!(
                        "blake3 {hash}, but the local manifest says {}: the local artifact is damaged and was not \
                         published to the remote (run `pipe verify`, then rerun the stage with --force)",
                        f.blake3
                    ),
                });
            }
            bytes += size;
        }
        let mbytes =
            std::fs::read(&mpath).map_err(|e| RemoteError::Local { path: mpath.clone(), message: e.to_string() })?;
        self.pause();
        self.rt
            .block_on(self.store.put(&self.obj(&mrel), PutPayload::from(mbytes)))
            .map_err(|e| self.transfer(&mrel, e))?;
        Ok(Pushed::Uploaded { files: m.files.len(), bytes })
    }

    /// Upload a run record (`run.json`, `pipeline.toml`) to the same path relative to the prefix as it
    /// has relative to the local store. Returns false when the run dir is not inside the store.
    pub fn push_run(&self, store: &Store, run_dir: &Path) -> Result<bool, RemoteError> {
        let Ok(rel) = run_dir.strip_prefix(&store.root) else { return Ok(false) };
        let rel = rel.to_string_lossy().replace('\\', "/");
        for name in ["pipeline.toml", "run.json"] {
            let src = run_dir.join(name);
            let Ok(bytes) = std::fs::read(&src) else { continue };
            let orel = format!("{rel}/{name}");
            self.rt
                .block_on(self.store.put(&self.obj(&orel), PutPayload::from(bytes)))
                .map_err(|e| self.transfer(&orel, e))?;
        }
        Ok(true)
    }

    /// Whether the remote has a run record at this store-relative run dir.
    pub fn has_run(&self, store: &Store, run_dir: &Path) -> Result<bool, RemoteError> {
        let Ok(rel) = run_dir.strip_prefix(&store.root) else { return Ok(false) };
        let orel = format!("{}/run.json", rel.to_string_lossy().replace('\\', "/"));
        match self.rt.block_on(self.store.head(&self.obj(&orel))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.transfer(&orel, e)),
        }
    }

    /// Download every run record under `<prefix>/runs/` into `dest/runs/…`; the number of records.
    pub fn pull_runs(&self, dest: &Path) -> Result<usize, RemoteError> {
        let runs = self.obj("runs");
        let metas: Vec<object_store::ObjectMeta> = self
            .rt
            .block_on(self.store.list(Some(&runs)).collect::<Vec<_>>())
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| self.transfer("runs/", e))?;
        let mut n = 0;
        for meta in metas {
            let Some(parts) = meta.location.prefix_match(&self.prefix) else { continue };
            let rel: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
            let name = rel.last().map(String::as_str).unwrap_or_default();
            if !matches!(name, "run.json" | "pipeline.toml") || rel.iter().any(|p| p == ".." || p.is_empty()) {
                continue;
            }
            let rel = rel.join("/");
            let target = dest.join(&rel);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| RemoteError::Local { path: parent.to_path_buf(), message: e.to_string() })?;
            }
            self.get_to_file(&rel, &target)?;
            n += usize::from(name == "run.json");
        }
        Ok(n)
    }
}

/// What the runner's lookup of a stale stage in the remote found.
pub enum Fetch {
    /// Downloaded, verified and published: the manifest and the seconds it took.
    Fetched(Box<Manifest>, f64),
    /// The remote has no complete artifact for the key: compute it.
    Absent,
    /// The remote could not be asked (unreachable, denied): compute the stage, with this warning.
    Unavailable(String),
    /// The remote copy failed verification: the stage fails with this message, nothing is published.
    Refused(String),
}

/// The runner's step before computing a stale stage; the caller holds the key's lock.
pub fn fetch_stage(remote: &Remote, store: &Store, kind: &str, key: &str, id: &str, quiet: bool) -> Fetch {
    let start = std::time::Instant::now();
    let m = match remote.manifest(kind, key) {
        Ok(Some(m)) => m,
        Ok(None) => return Fetch::Absent,
        Err(e) => return Fetch::Unavailable(format!("could not look `{id}` up in the remote ({e}); computed it here")),
    };
    if !quiet {
        eprintln!("  {id}: fetching {} file(s) from {}", m.files.len(), remote.url());
    }
    match remote.fetch(store, &m) {
        Ok(()) => Fetch::Fetched(Box::new(m), start.elapsed().as_secs_f64()),
        Err(RemoteError::Interrupted) => Fetch::Refused("interrupted".into()),
        Err(e @ (RemoteError::Corrupt(_) | RemoteError::BadManifest { .. })) => Fetch::Refused(e.to_string()),
        Err(e) => Fetch::Refused(format!("fetching from the remote failed: {e}")),
    }
}

/// The runner's step after computing a stage: upload it; a failure is a warning (returned), since
/// the artifact is safe in the local store and `retry` uploads it later.
pub fn upload_stage(
    remote: &Remote,
    store: &Store,
    kind: &str,
    key: &str,
    id: &str,
    retry: &str,
    quiet: bool,
) -> Option<String> {
    if !quiet {
        eprintln!("  {id}: uploading to {}", remote.url());
    }
    match remote.push(store, kind, key, false) {
        Ok(_) => None,
        Err(e) => Some(format!(
            "upload to {} failed: {e}; the artifact is complete locally: retry with `{retry}`",
            remote.url()
        )),
    }
}

/// After a run: its record goes to the remote too, for `pipe compare --remote`. Best effort.
pub fn push_record(remote: &Remote, store: &Store, run_dir: &Path, quiet: bool) {
    if let Err(e) = remote.push_run(store, run_dir) {
        if !quiet {
            eprintln!("pipe: warning: the run record was not uploaded ({e}); `pipe push` retries");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_user_info_and_query() {
        assert_eq!(redact_url("s3://AKIAXX:hunter2secret@bkt/team"), "s3://bkt/team");
        assert_eq!(redact_url("az://ctr/p?sv=2020&sig=abcdef"), "az://ctr/p?…");
        assert_eq!(redact_url("s3://[odd:pw@x"), "s3://x");
        // Unparseable: nothing after the scheme is shown.
        assert_eq!(redact_url("s3://user:pw@[::1"), "s3://…");
        assert_eq!(redact_url("user:pw@nowhere"), "user:…");
        assert_eq!(redact_url("no url at all"), "(not a URL)");
    }

    #[test]
    fn scrub_removes_every_secret() {
        let s = vec!["verysecretvalue".to_string()];
        assert_eq!(scrub("auth failed for verysecretvalue at x", &s), "auth failed for *** at x");
    }

    #[test]
    fn unsupported_or_bucketless_urls_are_refused() {
        assert!(check_url("s3://bkt/prefix").is_ok());
        assert!(check_url("file:///tmp/x").is_ok());
        let e = check_url("ftp://host/x").unwrap_err().to_string();
        assert!(e.contains("unsupported scheme `ftp`"), "{e}");
        assert!(check_url("relative/path").is_err());
    }
}
