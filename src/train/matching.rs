//! An auxiliary objective for rerankers trained from scratch: at every document token, the head
//! also predicts whether that token occurs in the query.
//!
//! Why: relevance on product search is mostly lexical overlap, and a cross-encoder has to discover
//! it as a circuit spread over several layers (know which segment a token is in, find its copy
//! in the query, then gather the matches at the last position). From a random start none of its
//! parts lowers the relevance loss on its own, so a few hundred CPU steps find only the shortcut of
//! memorising which query words tend to be relevant. A dense per-token signal for the middle step
//! ("is this document token in the query") is cheap to derive from the prompt itself and lets the
//! model build the circuit within about 300 steps; the relevance loss then learns to use it.
//! The targets are the prompt's own token ids, so nothing outside the training pairs is used.
//!
//! The targets come from the prompt's structure: the query is what lies between the `\n<Query>:`
//! and `\n<Document>:` markers of the Qwen3-Reranker body, the document what follows, up to the
//! fixed suffix. Prompts where a marker is missing (a document truncated away) get no targets.

use candle_core::{DType, Device, Tensor};

use super::TrainError;
use crate::text::TokenStore;

/// Where a prompt's query and document tokens are, found from the body's markers.
#[derive(Debug, Clone, PartialEq)]
pub struct Matching {
    query_marker: Vec<u32>,
    doc_marker: Vec<u32>,
    /// Tokens of the fixed prefix and suffix around the body.
    prefix: usize,
    suffix: usize,
}

impl Matching {
    pub fn new(query_marker: Vec<u32>, doc_marker: Vec<u32>, prefix: usize, suffix: usize) -> Result<Self, TrainError> {
        if query_marker.is_empty() || doc_marker.is_empty() {
            return Err(TrainError::Config("the query and document markers must not be empty".into()));
        }
        Ok(Self { query_marker, doc_marker, prefix, suffix })
    }

    /// The markers as `tokenizer` encodes them, and the prefix/suffix lengths the tokenize stage
    /// recorded in `store`'s metadata.
    pub fn for_store(tokenizer: &tokenizers::Tokenizer, store: &TokenStore) -> Result<Self, TrainError> {
        let encode = |text: &str| -> Result<Vec<u32>, TrainError> {
            let enc = tokenizer
                .encode(text, false)
                .map_err(|e| TrainError::Config(format!("tokenizing the marker {text:?}: {e}")))?;
            Ok(enc.get_ids().to_vec())
        };
        let count = |key: &str| -> Result<usize, TrainError> {
            store.metadata.get(key).and_then(|v| v.parse().ok()).ok_or_else(|| {
                TrainError::Config(format!(
                    "match_loss needs the tokenize stage's `{key}` in the token store's metadata; \
                     rerun the tokenize stage"
                ))
            })
        };
        Self::new(encode("\n<Query>:")?, encode("\n<Document>:")?, count("prefix_tokens")?, count("suffix_tokens")?)
    }

    /// For one prompt: the index of its first document token and, per document token, whether
    /// that token id occurs among the query's tokens. `None` when a marker is missing.
    pub fn targets(&self, seq: &[u32]) -> Option<(usize, Vec<bool>)> {
        let end = seq.len().checked_sub(self.suffix)?;
        let body = seq.get(self.prefix..end)?;
        let q = find(body, &self.query_marker, 0)? + self.query_marker.len();
        let d = find(body, &self.doc_marker, q)?;
        let query = &body[q..d];
        let doc = &body[d + self.doc_marker.len()..];
        let hits = doc.iter().map(|t| query.contains(t)).collect();
        Some((self.prefix + d + self.doc_marker.len(), hits))
    }

    /// Whether any prompt of `store` has a document with targets (a loss that would see nothing
    /// is refused rather than silently skipped).
    pub fn finds_any(&self, store: &TokenStore) -> bool {
        (0..store.len()).any(|r| self.targets(store.sequence(r)).is_some_and(|(_, h)| !h.is_empty()))
    }

    /// Targets and weights `[B, T]` for a left-padded batch of `rows` (longest prompt `t`): each
    /// prompt's document tokens share weight 1 so every prompt counts once, however long.
    pub fn batch(
        &self,
        store: &TokenStore,
        rows: &[usize],
        t: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor), TrainError> {
        let b = rows.len();
        let (mut y, mut w) = (vec![0f32; b * t], vec![0f32; b * t]);
        for (k, &r) in rows.iter().enumerate() {
            let seq = store.sequence(r);
            let Some((start, hits)) = self.targets(seq) else { continue };
            if hits.is_empty() {
                continue;
            }
            let base = k * t + (t - seq.len()) + start;
            let share = 1.0 / hits.len() as f32;
            for (j, hit) in hits.iter().enumerate() {
                y[base + j] = f32::from(u8::from(*hit));
                w[base + j] = share;
            }
        }
        Ok((Tensor::from_vec(y, (b, t), device)?, Tensor::from_vec(w, (b, t), device)?))
    }
}

fn find(hay: &[u32], needle: &[u32], from: usize) -> Option<usize> {
    (from..=hay.len().checked_sub(needle.len())?).find(|&i| hay[i..i + needle.len()] == *needle)
}

/// `Σ w · BCE(x, y)` in f32, differentiable in `x` (`[B, T]` logits).
pub fn weighted_bce_sum(x: &Tensor, y: &Tensor, w: &Tensor) -> Result<Tensor, TrainError> {
    let x = x.to_dtype(DType::F32)?;
    // BCE(x, y) = softplus(x) − x·y, as the relevance loss.
    Ok(((super::loss::softplus(&x)? - (&x * y)?)? * w)?.sum_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matching() -> Matching {
        // prefix [1, 2], query marker [7, 8], doc marker [7, 9], suffix [3]
        Matching::new(vec![7, 8], vec![7, 9], 2, 1).unwrap()
    }

    #[test]
    fn targets_mark_document_tokens_found_in_the_query() {
        // prefix | instr 5 | qm | q: 20 21 | dm | d: 21 22 20 | suffix
        let seq = [1, 2, 5, 7, 8, 20, 21, 7, 9, 21, 22, 20, 3];
        let (start, hits) = matching().targets(&seq).unwrap();
        assert_eq!(start, 9);
        assert_eq!(hits, vec![true, false, true]);
    }

    #[test]
    fn a_prompt_without_its_document_marker_has_no_targets() {
        let seq = [1, 2, 5, 7, 8, 20, 21, 22, 3];
        assert_eq!(matching().targets(&seq), None);
        assert_eq!(matching().targets(&[1]), None);
    }

    #[test]
    fn batch_places_targets_after_left_padding_with_one_weight_per_prompt() {
        let mut s = TokenStore::default();
        for seq in [&[1u32, 2, 7, 8, 20, 7, 9, 20, 30, 3][..], &[1, 2, 7, 8, 20, 7, 9, 31, 3]] {
            s.ids.extend_from_slice(seq);
            s.offsets.push(s.ids.len() as i64 - seq.len() as i64);
        }
        s.offsets.push(s.ids.len() as i64);
        s.labels = vec![1, 0];
        let (y, w) = matching().batch(&s, &[0, 1], 10, &Device::Cpu).unwrap();
        let y: Vec<Vec<f32>> = y.to_vec2().unwrap();
        let w: Vec<Vec<f32>> = w.to_vec2().unwrap();
        assert_eq!(y[0][7..9], [1.0, 0.0]);
        assert_eq!(w[0][7..9], [0.5, 0.5]);
        // the second prompt is one shorter, so one pad on the left
        assert_eq!(y[1][8], 0.0);
        assert_eq!(w[1][8], 1.0);
        assert_eq!(w[0].iter().sum::<f32>() + w[1].iter().sum::<f32>(), 2.0);
    }

    #[test]
    fn the_real_tokenizer_finds_the_markers_of_a_real_prompt() {
        let tok = crate::text::tokenizer::builtin_qwen3().unwrap();
        let enc = crate::text::PromptEncoder::new(tok.clone(), crate::text::PromptConfig::default()).unwrap();
        let e = enc.encode_pair("angle bracket", "simpson strong-tie angle", "").unwrap();
        let mut store = TokenStore::default();
        store.metadata.insert("prefix_tokens".into(), enc.prefix_ids().len().to_string());
        store.metadata.insert("suffix_tokens".into(), enc.suffix_ids().len().to_string());
        let m = Matching::for_store(&tok, &store).unwrap();
        let (start, hits) = m.targets(&e.ids).unwrap();
        let doc: Vec<String> =
            e.ids[start..start + hits.len()].iter().map(|&t| tok.decode(&[t], false).unwrap()).collect();
        assert_eq!(doc.concat(), " simpson strong-tie angle");
        assert_eq!(hits.last(), Some(&true), "{doc:?} {hits:?}");
        assert_eq!(hits.iter().filter(|h| **h).count(), 1, "{doc:?} {hits:?}");
    }

    #[test]
    fn weighted_bce_matches_the_formula() {
        let x = Tensor::new(&[[0.0f32, 2.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[1.0f32, 0.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[[0.5f32, 0.25]], &Device::Cpu).unwrap();
        let got = weighted_bce_sum(&x, &y, &w).unwrap().to_scalar::<f32>().unwrap();
        let want = 0.5 * 2f32.ln() + 0.25 * (1.0 + 2f32.exp()).ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
