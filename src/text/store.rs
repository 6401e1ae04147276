//! The token store: one split's prompts as flat arrays, so that training reads them without parsing.
//!
//! Files for a split `<s>` (`train`, `val`, `test`) in the tokenize stage's output directory:
//!
//! - `<s>.safetensors` with tensors (all little-endian, 1-D, `n` = number of pairs):
//!   - `ids` U32 `[total]`: every prompt's token ids, concatenated in row order;
//!   - `offsets` I64 `[n + 1]`: prompt `i` is `ids[offsets[i]..offsets[i + 1]]`; `offsets[0] = 0`,
//!     non-decreasing, `offsets[n] = total`;
//!   - `labels` U8 `[n]`: 0/1 relevance label;
//!   - `relevance` F32 `[n]`: the graded relevance in [1, 3];
//!   - `query_ids` U32 `[n]`: index into `<s>.queries.json` (pairs of one query share it, which is
//!     what per-query ranking metrics group by);
//!   - `pair_ids` I64 `[n]`: the row's original `id` when every id in the split is an integer,
//!     otherwise the row index, with the original ids in `<s>.pair_ids.json`;
//!
//!   and string metadata (`__metadata__`): `format` = `pipe-token-store`, `format_version`, `split`,
//!   `pair_ids` (`row_id` or `row_index`), plus whatever the writer adds (the tokenize stage records
//!   the tokenizer identity, the prompt parameters, prefix/suffix lengths and the yes/no ids).
//! - `<s>.queries.json`: JSON array of the distinct query strings, in order of first appearance.
//! - `<s>.pair_ids.json`: JSON array of the original ids as strings, only when they are not all integers.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};

use super::TextError;

pub const FORMAT: &str = "pipe-token-store";
pub const FORMAT_VERSION: &str = "1";

/// One split's tokenized pairs, in row order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenStore {
    pub ids: Vec<u32>,
    pub offsets: Vec<i64>,
    pub labels: Vec<u8>,
    pub relevance: Vec<f32>,
    pub query_ids: Vec<u32>,
    pub pair_ids: Vec<i64>,
    pub queries: Vec<String>,
    /// The original ids when they are not integers (then `pair_ids` are row indices).
    pub pair_keys: Option<Vec<String>>,
    /// Free-form provenance written into the safetensors header (the `format*`, `split` and
    /// `pair_ids` keys are managed by the store itself).
    pub metadata: BTreeMap<String, String>,
}

impl TokenStore {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Token ids of pair `i`.
    pub fn sequence(&self, i: usize) -> &[u32] {
        &self.ids[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
    /// The query text of pair `i`.
    pub fn query(&self, i: usize) -> &str {
        &self.queries[self.query_ids[i] as usize]
    }
    /// The original id of pair `i` as text.
    pub fn pair_key(&self, i: usize) -> String {
        match &self.pair_keys {
            Some(keys) => keys[i].clone(),
            None => self.pair_ids[i].to_string(),
        }
    }

    /// Every invariant a reader relies on; called before writing and after reading.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.len();
        for (name, len) in [
            ("relevance", self.relevance.len()),
            ("query_ids", self.query_ids.len()),
            ("pair_ids", self.pair_ids.len()),
        ] {
            if len != n {
                return Err(format!("`{name}` has {len} entries, `labels` has {n}"));
            }
        }
        if self.offsets.len() != n + 1 {
            return Err(format!("`offsets` has {} entries, expected {}", self.offsets.len(), n + 1));
        }
        if self.offsets[0] != 0 || self.offsets[n] != self.ids.len() as i64 {
            return Err(format!(
                "`offsets` must run from 0 to {} (the number of ids), found {}..{}",
                self.ids.len(),
                self.offsets[0],
                self.offsets[n]
            ));
        }
        if let Some(i) = self.offsets.windows(2).position(|w| w[1] < w[0]) {
            return Err(format!("`offsets` decrease at {i}"));
        }
        if let Some(q) = self.query_ids.iter().find(|&&q| q as usize >= self.queries.len()) {
            return Err(format!("query id {q} but only {} queries", self.queries.len()));
        }
        if let Some(keys) = &self.pair_keys {
            if keys.len() != n {
                return Err(format!("{} pair keys for {n} pairs", keys.len()));
            }
        }
        Ok(())
    }

    /// Write `<split>.safetensors`, `<split>.queries.json` and, if needed, `<split>.pair_ids.json`.
    pub fn write(&self, dir: &Path, split: &str) -> Result<(), TextError> {
        let st = dir.join(format!("{split}.safetensors"));
        self.validate().map_err(|message| TextError::Store { path: st.display().to_string(), message })?;
        let n = self.len();
        // Largest alignment first so that every tensor starts aligned once the header is padded to 8.
        let tensors: [(&str, &str, usize, Vec<u8>); 6] = [
            ("offsets", "I64", n + 1, le_bytes(&self.offsets, i64::to_le_bytes)),
            ("pair_ids", "I64", n, le_bytes(&self.pair_ids, i64::to_le_bytes)),
            ("ids", "U32", self.ids.len(), le_bytes(&self.ids, u32::to_le_bytes)),
            ("query_ids", "U32", n, le_bytes(&self.query_ids, u32::to_le_bytes)),
            ("relevance", "F32", n, le_bytes(&self.relevance, f32::to_le_bytes)),
            ("labels", "U8", n, self.labels.clone()),
        ];
        let mut meta = self.metadata.clone();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("format_version".into(), FORMAT_VERSION.into());
        meta.insert("split".into(), split.into());
        let kind = if self.pair_keys.is_some() { "row_index" } else { "row_id" };
        meta.insert("pair_ids".into(), kind.into());
        let bytes = serialize_deterministic(&meta, &tensors);
        std::fs::write(&st, bytes).map_err(|e| TextError::io(&st, e))?;
        write_json(&dir.join(format!("{split}.queries.json")), &self.queries)?;
        if let Some(keys) = &self.pair_keys {
            write_json(&dir.join(format!("{split}.pair_ids.json")), keys)?;
        }
        Ok(())
    }

    /// Read a split written by [`TokenStore::write`], checking every invariant.
    pub fn read(dir: &Path, split: &str) -> Result<Self, TextError> {
        let st = dir.join(format!("{split}.safetensors"));
        let err = |message: String| TextError::Store { path: st.display().to_string(), message };
        let bytes = std::fs::read(&st).map_err(|e| TextError::io(&st, e))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
        let mut metadata: BTreeMap<String, String> =
            header.metadata().clone().unwrap_or_default().into_iter().collect();
        if metadata.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(err(format!("not a {FORMAT} file")));
        }
        if metadata.get("format_version").map(String::as_str) != Some(FORMAT_VERSION) {
            return Err(err(format!(
                "format version {:?}, this build reads {FORMAT_VERSION}",
                metadata.get("format_version")
            )));
        }
        let by_row_index = metadata.get("pair_ids").map(String::as_str) == Some("row_index");
        for k in ["format", "format_version", "split", "pair_ids"] {
            metadata.remove(k);
        }
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
        let get = |name: &str, dtype: Dtype| -> Result<&[u8], TextError> {
            let t = tensors.tensor(name).map_err(|e| err(format!("`{name}`: {e}")))?;
            if t.dtype() != dtype || t.shape().len() != 1 {
                return Err(err(format!("`{name}` is {:?} {:?}, expected 1-D {dtype:?}", t.dtype(), t.shape())));
            }
            Ok(t.data())
        };
        let queries: Vec<String> = read_json(&dir.join(format!("{split}.queries.json")))?;
        let pair_keys = if by_row_index { Some(read_json(&dir.join(format!("{split}.pair_ids.json")))?) } else { None };
        let store = TokenStore {
            ids: from_le(get("ids", Dtype::U32)?, u32::from_le_bytes),
            offsets: from_le(get("offsets", Dtype::I64)?, i64::from_le_bytes),
            labels: get("labels", Dtype::U8)?.to_vec(),
            relevance: from_le(get("relevance", Dtype::F32)?, f32::from_le_bytes),
            query_ids: from_le(get("query_ids", Dtype::U32)?, u32::from_le_bytes),
            pair_ids: from_le(get("pair_ids", Dtype::I64)?, i64::from_le_bytes),
            queries,
            pair_keys,
            metadata,
        };
        store.validate().map_err(err)?;
        Ok(store)
    }
}

/// A safetensors file whose bytes depend only on its content. The safetensors crate writes the
/// `__metadata__` map in `HashMap` order, which differs from run to run and would defeat the
/// engine's early cutoff (an unchanged output must hash the same), so the header is built here with
/// sorted metadata and a fixed tensor order.
fn serialize_deterministic(meta: &BTreeMap<String, String>, tensors: &[(&str, &str, usize, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(meta));
    let mut start = 0usize;
    for (name, dtype, len, data) in tensors {
        let end = start + data.len();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": [len], "data_offsets": [start, end]}),
        );
        start = end;
    }
    let mut text = serde_json::to_string(&header).expect("header serializes");
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + start);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    for (.., data) in tensors {
        out.extend_from_slice(data);
    }
    out
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * N);
    for &x in v {
        out.extend_from_slice(&f(x));
    }
    out
}

fn from_le<T, const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    b.chunks_exact(N).map(|c| f(c.try_into().expect("chunks_exact"))).collect()
}

fn write_json<T: serde::Serialize + ?Sized>(path: &Path, v: &T) -> Result<(), TextError> {
    let text = serde_json::to_string(v).expect("strings serialize");
    std::fs::write(path, text).map_err(|e| TextError::io(path, e))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, TextError> {
    let text = std::fs::read(path).map_err(|e| TextError::io(path, e))?;
    serde_json::from_slice(&text)
        .map_err(|e| TextError::Store { path: path.display().to_string(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pair_keys: Option<Vec<String>>) -> TokenStore {
        TokenStore {
            ids: vec![1, 2, 3, 4, 5, 6],
            offsets: vec![0, 2, 2, 6],
            labels: vec![1, 0, 1],
            relevance: vec![3.0, 1.0, 2.33],
            query_ids: vec![0, 1, 0],
            pair_ids: vec![17, 4, 99],
            queries: vec!["angle bracket".into(), "ünïcode".into()],
            pair_keys,
            metadata: [("tokenizer".to_string(), "builtin:qwen3:x".to_string())].into(),
        }
    }

    #[test]
    fn round_trips_with_numeric_and_textual_ids() {
        let dir = tempfile::tempdir().unwrap();
        let a = sample(None);
        a.write(dir.path(), "train").unwrap();
        let back = TokenStore::read(dir.path(), "train").unwrap();
        assert_eq!(back, a);
        assert_eq!(back.sequence(2), [3, 4, 5, 6]);
        assert!(back.sequence(1).is_empty());
        assert_eq!(back.query(1), "ünïcode");
        assert_eq!(back.pair_key(2), "99");
        assert!(!dir.path().join("train.pair_ids.json").exists());
        // Same content, same bytes: the store's hash must not change when a stage reruns.
        let first = std::fs::read(dir.path().join("train.safetensors")).unwrap();
        a.write(dir.path(), "train").unwrap();
        assert_eq!(std::fs::read(dir.path().join("train.safetensors")).unwrap(), first);

        let mut b = sample(Some(vec!["a-1".into(), "b".into(), "c".into()]));
        b.pair_ids = vec![0, 1, 2];
        b.write(dir.path(), "val").unwrap();
        let back = TokenStore::read(dir.path(), "val").unwrap();
        assert_eq!(back, b);
        assert_eq!(back.pair_key(0), "a-1");
    }

    #[test]
    fn an_empty_split_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let empty = TokenStore { offsets: vec![0], ..TokenStore::default() };
        empty.write(dir.path(), "test").unwrap();
        let back = TokenStore::read(dir.path(), "test").unwrap();
        assert!(back.is_empty());
        assert_eq!(back.offsets, [0]);
    }

    #[test]
    fn inconsistent_stores_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sample(None);
        s.offsets = vec![0, 3, 2, 6];
        assert!(s.write(dir.path(), "x").unwrap_err().to_string().contains("decrease"));
        let mut s = sample(None);
        s.query_ids[0] = 5;
        assert!(s.write(dir.path(), "x").is_err());
        let mut s = sample(None);
        s.offsets[3] = 5;
        assert!(s.write(dir.path(), "x").is_err());
        // A safetensors file that is not a token store.
        let data = [0u8; 4];
        let t = safetensors::tensor::TensorView::new(Dtype::U8, vec![4], &data).unwrap();
        safetensors::tensor::serialize_to_file(vec![("w", t)], None, &dir.path().join("m.safetensors")).unwrap();
        let e = TokenStore::read(dir.path(), "m").unwrap_err().to_string();
        assert!(e.contains("not a pipe-token-store"), "{e}");
    }
}
