//! The artifact store: `artifacts/<kind>/<key>/` directories that are either complete or absent.
//!
//! A stage writes into `artifacts/.tmp/<kind>-<key>-<pid>/`; on success its files are fsynced, the
//! manifest is written last, and the directory is renamed into place — one atomic step, so a crash
//! leaves at worst a temp dir, which the next run sweeps. A per-key lock file makes a second `pipe`
//! process *wait* for the first instead of computing the same key twice.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::key::{dir_name, KeyInputs};
use super::stage::JsonMap;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: manifest is unreadable: {message}")]
    Manifest { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

pub const MANIFEST: &str = "manifest.json";
pub const MANIFEST_SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub blake3: String,
    pub size: u64,
}

/// The completion marker and the explanation of an artifact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub kind: String,
    /// The stage id that produced it first (informational; ids are not part of the key).
    pub stage: String,
    pub key: String,
    pub key_inputs: KeyInputs,
    /// blake3 over the sorted file list: what downstream keys hash (early cutoff).
    pub output_hash: String,
    pub files: Vec<FileEntry>,
    pub started: String,
    pub finished: String,
    pub seconds: f64,
    pub tool_version: String,
    #[serde(default)]
    pub metrics: JsonMap,
    #[serde(default)]
    pub stats: JsonMap,
}

pub struct Store {
    pub root: PathBuf,
}

/// An exclusive hold on one key; released when dropped (or when the process dies, even by `kill -9`).
pub struct KeyLock {
    _file: File,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
    }

    /// Create the layout and mark the store as a cache directory (backup tools skip it).
    pub fn init(&self) -> Result<(), StoreError> {
        for d in [".tmp", ".locks", ".scratch", "runs"] {
            std::fs::create_dir_all(self.root.join(d)).map_err(io(&self.root))?;
        }
        let tag = self.root.join("CACHEDIR.TAG");
        if !tag.exists() {
            std::fs::write(
                &tag,
                "Signature: 8a477f597d28d172789f06886806bc55\n# This directory is a pipe artifact store.\n",
            )
            .map_err(io(&tag))?;
        }
        Ok(())
    }

    pub fn artifact_dir(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(dir_name(key))
    }

    pub fn scratch_dir(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(".scratch").join(format!("{kind}-{}", dir_name(key)))
    }

    /// The manifest of a complete artifact, or None when there is none (a dir without manifest is junk).
    pub fn manifest(&self, kind: &str, key: &str) -> Result<Option<Manifest>, StoreError> {
        read_manifest(&self.artifact_dir(kind, key))
    }

    fn lock_path(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(".locks").join(format!("{kind}-{}.lock", dir_name(key)))
    }

    fn open_lock(&self, kind: &str, key: &str) -> Result<(PathBuf, File), StoreError> {
        let path = self.lock_path(kind, key);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok((path, f))
    }

    /// Record the holder in the lock file, so that a waiting process can say whom it waits for.
    fn held(mut f: File, who: &str) -> KeyLock {
        let _ = f.set_len(0);
        let _ = write!(f, "{} {}", std::process::id(), who);
        KeyLock { _file: f }
    }

    /// Take the key's lock without waiting; None if another process holds it.
    pub fn try_lock(&self, kind: &str, key: &str, who: &str) -> Result<Option<KeyLock>, StoreError> {
        let (path, f) = self.open_lock(kind, key)?;
        match f.try_lock() {
            Ok(()) => Ok(Some(Self::held(f, who))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Io { path, source: e }),
        }
    }

    /// Who holds a key's lock (pid and stage), as written by the holder.
    pub fn lock_holder(&self, kind: &str, key: &str) -> String {
        let mut s = String::new();
        let _ = File::open(self.lock_path(kind, key)).and_then(|mut f| f.read_to_string(&mut s));
        s
    }

    /// Wait for the key's lock.
    pub fn lock(&self, kind: &str, key: &str, who: &str) -> Result<KeyLock, StoreError> {
        let (path, f) = self.open_lock(kind, key)?;
        f.lock().map_err(io(&path))?;
        Ok(Self::held(f, who))
    }

    /// A fresh temp dir for a key; any earlier temp dirs for the key are stale (we hold its lock).
    pub fn temp_dir(&self, kind: &str, key: &str) -> Result<PathBuf, StoreError> {
        let prefix = format!("{kind}-{}-", dir_name(key));
        let tmp_root = self.root.join(".tmp");
        if let Ok(rd) = std::fs::read_dir(&tmp_root) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp_root.join(format!("{prefix}{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(dir)
    }

    /// Remove temp dirs whose key is not locked by a live process (left by `kill -9` or a power cut).
    pub fn sweep_temp(&self) -> usize {
        let mut removed = 0;
        let Ok(rd) = std::fs::read_dir(self.root.join(".tmp")) else { return 0 };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            // <kind>-<dirkey>-<pid>
            let mut parts = name.rsplitn(3, '-');
            let (_pid, key, kind) = match (parts.next(), parts.next(), parts.next()) {
                (Some(p), Some(k), Some(kind)) => (p, k, kind),
                _ => continue,
            };
            if let Ok(Some(_lock)) = self.try_lock(kind, key, "sweep") {
                if std::fs::remove_dir_all(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Seal a finished temp dir: hash and fsync its files, write the manifest last. [`Store::publish`]
    /// then renames it into place; apart, so that the runner can hold off its interrupt handler for
    /// the rename alone rather than for the hashing.
    pub fn seal(&self, tmp: &Path, mut manifest: Manifest) -> Result<Manifest, StoreError> {
        let files = list_files(tmp)?;
        manifest.files = files;
        manifest.output_hash = output_hash(&manifest.files);
        let mpath = tmp.join(MANIFEST);
        let bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let mut f = File::create(&mpath).map_err(io(&mpath))?;
        f.write_all(&bytes).map_err(io(&mpath))?;
        f.sync_all().map_err(io(&mpath))?;
        sync_dir(tmp);
        Ok(manifest)
    }

    /// Rename a [sealed](Store::seal) temp dir into the store, replacing an artifact of the same key.
    pub fn publish(&self, tmp: &Path, manifest: &Manifest) -> Result<(), StoreError> {
        let dest = self.artifact_dir(&manifest.kind, &manifest.key);
        let parent = dest.parent().expect("artifact dir has a parent");
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        if dest.exists() {
            // A forced rerun, or junk without a manifest: move the old one aside, then replace.
            let trash =
                self.root.join(".tmp").join(format!("trash-{}-{}", dir_name(&manifest.key), std::process::id()));
            std::fs::rename(&dest, &trash).map_err(io(&dest))?;
            std::fs::rename(tmp, &dest).map_err(io(&dest))?;
            let _ = std::fs::remove_dir_all(&trash);
        } else {
            std::fs::rename(tmp, &dest).map_err(io(&dest))?;
        }
        sync_dir(parent);
        Ok(())
    }

    /// Every complete artifact in the store: (kind, dir).
    pub fn artifacts(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.root) else { return out };
        let mut kinds: Vec<_> = rd.flatten().filter(|e| e.path().is_dir()).collect();
        kinds.sort_by_key(|e| e.file_name());
        for k in kinds {
            let kind = k.file_name().to_string_lossy().to_string();
            // `runs/` holds run records, `slurm/` job logs and job records: not artifacts.
            if kind.starts_with('.') || kind == "runs" || kind == "slurm" {
                continue;
            }
            let Ok(rd) = std::fs::read_dir(k.path()) else { continue };
            let mut dirs: Vec<_> = rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
            dirs.sort();
            for d in dirs {
                out.push((kind.clone(), d));
            }
        }
        out
    }
}

pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>, StoreError> {
    let path = dir.join(MANIFEST);
    match std::fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice(&b).map(Some).map_err(|e| StoreError::Manifest { path, message: e.to_string() })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io { path, source: e }),
    }
}

/// Best effort, as everywhere in the store: an fsync that fails leaves the artifact as durable as
/// the filesystem makes it, and the manifest-last protocol still tells a complete one from junk.
fn sync_dir(dir: &Path) {
    let _ = crate::util::fs::sync_dir(dir);
}

/// All files under `dir` except the manifest, sorted, each hashed and fsynced.
pub fn list_files(dir: &Path) -> Result<Vec<FileEntry>, StoreError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io(&d))? {
            let e = e.map_err(io(&d))?;
            let p = e.path();
            let ft = e.file_type().map_err(io(&p))?;
            if ft.is_dir() {
                stack.push(p);
                continue;
            }
            let rel = p.strip_prefix(dir).expect("under dir").to_string_lossy().replace('\\', "/");
            if rel == MANIFEST {
                continue;
            }
            let _ = crate::util::fs::sync_file(&p);
            let size = std::fs::metadata(&p).map_err(io(&p))?.len();
            let blake3 = super::hashing::hash_file(&p).map_err(io(&p))?;
            out.push(FileEntry { path: rel, blake3, size });
        }
        sync_dir(&d);
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The content identity of an artifact: its files' names and hashes, nothing about when or how.
pub fn output_hash(files: &[FileEntry]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"pipe-output\0");
    for f in files {
        h.update(f.path.as_bytes());
        h.update(b"\0");
        h.update(f.blake3.as_bytes());
        h.update(b"\0");
    }
    h.finalize().to_hex().to_string()
}

/// Re-hash an artifact's files; return the problems found (empty when it matches its manifest).
pub fn verify_dir(dir: &Path, m: &Manifest) -> Vec<String> {
    let mut problems = Vec::new();
    let actual = match list_files(dir) {
        Ok(f) => f,
        Err(e) => return vec![e.to_string()],
    };
    for f in &m.files {
        match actual.iter().find(|a| a.path == f.path) {
            None => problems.push(format!("{}: missing", f.path)),
            Some(a) if a.blake3 != f.blake3 || a.size != f.size => {
                problems.push(format!("{}: content changed ({} bytes, expected {})", f.path, a.size, f.size))
            }
            Some(_) => {}
        }
    }
    for a in &actual {
        if !m.files.iter().any(|f| f.path == a.path) {
            problems.push(format!("{}: not in the manifest", a.path));
        }
    }
    problems
}

pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => {}
            }
        }
    }
    total
}
