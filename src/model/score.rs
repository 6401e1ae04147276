//! Batched inference: many token sequences → reranker scores, with as little padding as possible.
//!
//! Sequences are sorted by length and cut into batches, so each batch pads only to its own longest
//! member (left padding, as the reranker head reads the last position). Results come back in input
//! order. Shared by the evaluate stage and `pipe rerank`.

use candle_core::{Device, Tensor};

use super::{ModelError, RerankScore, Reranker};

/// Left-pad `seqs` into `[B, T]` ids (u32) and a 0/1 mask.
pub fn left_pad(seqs: &[&[u32]], pad_id: u32, device: &Device) -> Result<(Tensor, Tensor), ModelError> {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut mask = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        let pad = t - s.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(s);
        mask.extend(std::iter::repeat_n(0u8, pad));
        mask.extend(std::iter::repeat_n(1u8, s.len()));
    }
    let ids = Tensor::from_vec(ids, (seqs.len(), t), device)?;
    let mask = Tensor::from_vec(mask, (seqs.len(), t), device)?;
    Ok((ids, mask))
}

/// Score every sequence; `progress` is called with the number of sequences finished so far and
/// returns false to stop early (Ctrl-C), in which case the result is `None`.
pub fn score_all(
    reranker: &Reranker,
    seqs: &[&[u32]],
    batch_size: usize,
    device: &Device,
    mut progress: impl FnMut(usize) -> bool,
) -> Result<Option<Vec<RerankScore>>, ModelError> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    // Longest first: a memory problem shows up in the first batch, not after an hour.
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let mut out = vec![RerankScore { logit: 0.0, p_yes: 0.5 }; seqs.len()];
    let mut done = 0;
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i]).collect();
        let (ids, mask) = left_pad(&batch, 0, device)?;
        let scores = reranker.scores(&ids, &mask)?;
        for (&i, s) in chunk.iter().zip(scores) {
            out[i] = s;
        }
        done += chunk.len();
        if !progress(done) {
            return Ok(None);
        }
    }
    Ok(Some(out))
}
