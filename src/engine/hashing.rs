//! Content hashing of files, with a stat cache that only skips re-hashing — it never replaces the hash.
//!
//! A file's identity is its blake3 content hash. Re-hashing a large dataset on every `pipe status` would
//! be slow (DVC's complaint), so the last hash is remembered beside (size, mtime, inode); if all three
//! still match, the remembered hash is reused. Moving the project keeps the cache: entries are keyed by
//! the project-relative path and the hash itself never depends on where the file lives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Files smaller than this are hashed on one thread; larger ones memory-mapped and hashed in parallel.
const PARALLEL_THRESHOLD: u64 = 4 << 20;

pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let len = std::fs::metadata(path)?.len();
    let mut h = blake3::Hasher::new();
    if len >= PARALLEL_THRESHOLD {
        h.update_mmap_rayon(path)?;
    } else {
        h.update_reader(std::fs::File::open(path)?)?;
    }
    Ok(h.finalize().to_hex().to_string())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    blake3: String,
}

/// Remembers file hashes across runs in `<store>/.cache/files.json`.
pub struct StatCache {
    path: PathBuf,
    entries: Mutex<(BTreeMap<String, Entry>, bool)>,
}

fn stat(path: &Path) -> std::io::Result<(u64, i128, u64)> {
    let m = std::fs::metadata(path)?;
    let mtime = m.modified()?.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Ok((m.len(), mtime, inode))
}

impl StatCache {
    pub fn open(store: &Path) -> Self {
        let path = store.join(".cache").join("files.json");
        let entries = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        StatCache { path, entries: Mutex::new((entries, false)) }
    }

    /// The content hash of `abs`, remembered under the project-relative `rel`.
    pub fn hash(&self, rel: &str, abs: &Path) -> std::io::Result<String> {
        let (size, mtime_ns, inode) = stat(abs)?;
        {
            let guard = self.entries.lock().expect("stat cache lock");
            if let Some(e) = guard.0.get(rel) {
                // A file modified within the mtime granularity of its last hash could change unseen:
                // only trust entries whose mtime is clearly in the past.
                if e.size == size && e.mtime_ns == mtime_ns && e.inode == inode {
                    return Ok(e.blake3.clone());
                }
            }
        }
        let blake3 = hash_file(abs)?;
        let recent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128 - mtime_ns < 2_000_000_000)
            .unwrap_or(true);
        if !recent {
            let mut guard = self.entries.lock().expect("stat cache lock");
            guard.0.insert(rel.to_string(), Entry { size, mtime_ns, inode, blake3: blake3.clone() });
            guard.1 = true;
        }
        Ok(blake3)
    }

    /// Persist new entries (atomically; losing them only costs a re-hash).
    pub fn save(&self) {
        let guard = self.entries.lock().expect("stat cache lock");
        if !guard.1 {
            return;
        }
        // Sweep points running on threads save concurrently; each write has its own temp file.
        if let Ok(bytes) = serde_json::to_vec(&guard.0) {
            let _ = crate::util::fs::write_atomic(&self.path, &bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_blake3_of_bytes_for_small_and_large_files() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0usize, 10, (5 << 20) + 3] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let p = dir.path().join(format!("f{size}"));
            std::fs::write(&p, &data).unwrap();
            assert_eq!(hash_file(&p).unwrap(), blake3::hash(&data).to_hex().to_string());
        }
    }

    #[test]
    fn stat_cache_notices_content_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.csv");
        std::fs::write(&p, b"one").unwrap();
        let cache = StatCache::open(dir.path());
        let h1 = cache.hash("a.csv", &p).unwrap();
        std::fs::write(&p, b"two!").unwrap();
        let h2 = cache.hash("a.csv", &p).unwrap();
        assert_ne!(h1, h2);
        assert_eq!(h2, blake3::hash(b"two!").to_hex().to_string());
    }
}
