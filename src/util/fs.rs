//! Durable atomic file writes: what must survive a crash outside a stage's temp dir (run records,
//! state files, training checkpoints, the stat cache) is written to a temp file in the target's
//! directory, fsynced, renamed over the target, and the directory fsynced, so that after a crash
//! or power loss the path holds either the old contents or the new ones, never a torn file, and a
//! completed write is not lost.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically and durably, creating the parent directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = AtomicFile::new(path)?;
    f.file().write_all(bytes)?;
    f.commit()
}

/// A file being written in place of `target`: a temp file in the target's directory (so that the
/// rename cannot cross filesystems) that [`AtomicFile::commit`] fsyncs and renames over the
/// target. Dropped without a commit, it is removed and the target is untouched.
pub struct AtomicFile {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
}

impl AtomicFile {
    /// A fresh, empty temp file beside `target` (whose directory is created if needed). Uniquely
    /// named, so concurrent writers of one target (sweep points on threads) never share one.
    pub fn new(target: &Path) -> std::io::Result<Self> {
        let dir = parent(target);
        std::fs::create_dir_all(dir)?;
        Ok(AtomicFile { tmp: tempfile::NamedTempFile::new_in(dir)?, target: target.to_path_buf() })
    }

    /// The temp file's path, for writers that only take a path (they must write this very file,
    /// not replace it).
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// Fsyncs the temp file, renames it over the target and fsyncs the directory, so that the
    /// target holds the new contents, durably, or (after a crash before the rename) the old ones.
    pub fn commit(mut self) -> std::io::Result<()> {
        self.tmp.as_file_mut().flush()?;
        self.tmp.as_file().sync_all()?;
        self.tmp.persist(&self.target).map_err(|e| e.error)?;
        sync_dir(parent(&self.target))
    }
}

/// Fsyncs a directory, which makes a rename or a newly created entry in it durable. A filesystem
/// that cannot fsync a directory (it answers EINVAL) and a platform that cannot open one (Windows)
/// count as success: they offer no other way to do it.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let f = match File::open(dir) {
        Ok(f) => f,
        Err(_) if !cfg!(unix) => return Ok(()),
        Err(e) => return Err(e),
    };
    match f.sync_all() {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported) => Ok(()),
        r => r,
    }
}

/// Fsyncs a file's contents (and its metadata) by path.
pub fn sync_file(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_target_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        write_atomic(&path, b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn an_uncommitted_file_leaves_the_target_alone_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        write_atomic(&path, b"old").unwrap();
        let mut f = AtomicFile::new(&path).unwrap();
        f.file().write_all(b"half").unwrap();
        assert!(f.path().starts_with(dir.path()) && f.path() != path);
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        // A writer that takes a path writes the temp file; the commit puts it in place.
        let f = AtomicFile::new(&path).unwrap();
        std::fs::write(f.path(), b"by path").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"by path");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        assert_eq!(parent(Path::new("x.json")), Path::new("."));
        assert_eq!(parent(Path::new("a/x.json")), Path::new("a"));
    }
}
