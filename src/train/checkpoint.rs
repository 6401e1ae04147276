//! Resumable training state on disk: one safetensors file of f32 tensors (master weights, Adam
//! moments) with the loop's position and history as JSON in its header, written atomically
//! ([`crate::util::fs::AtomicFile`]: a temp file in the same directory, fsync, rename, fsync the
//! directory), so a run killed at any instant leaves either the previous checkpoint or the new
//! one, never a torn file.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use super::TrainError;
use crate::util::fs::AtomicFile;

/// The header key that holds the JSON state.
const STATE_KEY: &str = "pipe_train_state";

/// A named f32 tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Serialised one tensor at a time, so that writing never holds a second copy of the state.
struct View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl safetensors::View for &View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            Cow::Borrowed(bytemuck::cast_slice(self.data))
        } else {
            Cow::Owned(self.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        }
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

fn ckpt_err(path: &Path, message: impl Into<String>) -> TrainError {
    TrainError::Checkpoint { path: path.to_path_buf(), message: message.into() }
}

/// Writes `tensors` and the JSON `state` to `path` atomically.
pub fn write<S: Serialize>(path: &Path, tensors: &BTreeMap<String, HostTensor>, state: &S) -> Result<(), TrainError> {
    let dir = path.parent().ok_or_else(|| ckpt_err(path, "no parent directory"))?;
    let views: Vec<(&str, View)> =
        tensors.iter().map(|(k, t)| (k.as_str(), View { shape: &t.shape, data: &t.data })).collect();
    let json = serde_json::to_string(state).map_err(|e| ckpt_err(path, e.to_string()))?;
    let meta = HashMap::from([(STATE_KEY.to_string(), json)]);
    let tmp = AtomicFile::new(path).map_err(|e| TrainError::io(dir, e))?;
    safetensors::serialize_to_file(views.iter().map(|(k, v)| (*k, v)), Some(meta), tmp.path())
        .map_err(|e| ckpt_err(path, e.to_string()))?;
    tmp.commit().map_err(|e| TrainError::io(path, e))
}

/// Reads a file written by [`write`].
pub fn read<S: for<'de> Deserialize<'de>>(path: &Path) -> Result<(BTreeMap<String, HostTensor>, S), TrainError> {
    let file = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    // SAFETY: the checkpoint lives in the stage's private scratch dir and is only ever replaced
    // by rename, never modified in place, so the mapped bytes cannot change under us.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| TrainError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| ckpt_err(path, e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| ckpt_err(path, e.to_string()))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| ckpt_err(path, "not a pipe training checkpoint (no state in the header)"))?;
    let state: S = serde_json::from_str(json).map_err(|e| ckpt_err(path, format!("bad state: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(ckpt_err(path, format!("tensor `{name}` is {:?}, expected F32", view.dtype())));
        }
        // safetensors aligns tensor data, so the fast path is the one taken; the slow one covers
        // unaligned bytes and big-endian hosts.
        let data: Vec<f32> = match bytemuck::try_cast_slice::<u8, f32>(view.data()) {
            Ok(v) if cfg!(target_endian = "little") => v.to_vec(),
            _ => view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
        };
        out.insert(name, HostTensor { shape: view.shape().to_vec(), data });
    }
    Ok((out, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_tensors_and_state_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let mut t = BTreeMap::new();
        t.insert("a".to_string(), HostTensor { shape: vec![2, 2], data: vec![1.0, -2.0, 3.5, f32::MIN_POSITIVE] });
        write(&path, &t, &serde_json::json!({"step": 7})).unwrap();
        let (back, state): (_, serde_json::Value) = read(&path).unwrap();
        assert_eq!(back, t);
        assert_eq!(state["step"], 7);
        write(&path, &BTreeMap::new(), &serde_json::json!({"step": 8})).unwrap();
        let (back, state): (BTreeMap<String, HostTensor>, serde_json::Value) = read(&path).unwrap();
        assert!(back.is_empty());
        assert_eq!(state["step"], 8);
        // Only the checkpoint is left in the directory: no temp files.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
