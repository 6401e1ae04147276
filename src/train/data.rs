//! Which rows go into which micro-batch, deterministically from (seed, epoch).
//!
//! # Length-bucketed batching
//!
//! Padding a short prompt to the length of a long one wastes compute, so batches are built from
//! rows of similar length without giving up a random order:
//!
//! 1. the items (rows; for the pairwise loss, whole queries) are shuffled with a generator seeded
//!    by `(seed, epoch)`;
//! 2. the shuffled list is cut into windows of `bucket_batches × batch_size` items and each window
//!    is sorted by length (stable, so ties keep the shuffled order);
//! 3. each window is cut into batches of `batch_size` (only the epoch's last batch can be short);
//! 4. the batches are shuffled again, so the order in which lengths come is random too;
//! 5. consecutive batches form the accumulation groups of `grad_accum` micro-batches, one per
//!    optimizer step (the last group of an epoch may hold fewer).
//!
//! `bucket_batches = 0` skips steps 2 and 4 (plain shuffled batches). The generator is the
//! project's SplitMix64 with Fisher–Yates ([`crate::util::rng`]), so that a seed means the same
//! order on every platform and every version of the `rand` crate. Nothing else is random, so a resumed run rebuilds the plan
//! of its epoch and continues at the saved group index.
//!
//! With the pairwise loss an item is one query with all its candidates, `batch_size` counts
//! queries, and queries whose candidates all share one relevance (no pair to rank) are left out.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use super::config::{LossKind, TrainConfig};
use super::TrainError;
use crate::text::TokenStore;
use crate::util::rng::SplitMix64;

/// The rows of one micro-batch, and how many loss terms they contribute (rows, or ranked pairs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    pub rows: Vec<usize>,
    pub units: usize,
}

/// The micro-batches of one optimizer step. Each micro-batch's summed loss is divided by the
/// group's total `units`, so that accumulating them gives the mean over the whole group, exactly
/// as one big batch would (also when the last group of an epoch is short).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub micro: Vec<MicroBatch>,
    pub units: usize,
}

impl Group {
    pub fn rows(&self) -> usize {
        self.micro.iter().map(|m| m.rows.len()).sum()
    }
}

/// The training items of a split: rows, or queries (row lists) for the pairwise loss.
#[derive(Debug, Clone)]
pub struct Items {
    items: Vec<Vec<usize>>,
    lengths: Vec<usize>,
}

impl Items {
    pub fn new(store: &TokenStore, loss: LossKind) -> Self {
        let items: Vec<Vec<usize>> = match loss {
            LossKind::Pairwise => {
                let mut by_query: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
                for i in 0..store.len() {
                    by_query.entry(store.query_ids[i]).or_default().push(i);
                }
                by_query.into_values().filter(|rows| count_pairs(store, rows) > 0).collect()
            }
            _ => (0..store.len()).map(|i| vec![i]).collect(),
        };
        let lengths =
            items.iter().map(|rows| rows.iter().map(|&r| store.sequence(r).len()).max().unwrap_or(0)).collect();
        Self { items, lengths }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Micro-batches per epoch (the same every epoch).
    pub fn micro_batches(&self, batch_size: usize) -> usize {
        self.items.len().div_ceil(batch_size)
    }
}

/// Ranked pairs `(i, j)` with `relevance[i] > relevance[j]` among `rows` that share a query.
pub fn pairs(store: &TokenStore, rows: &[usize]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (a, &i) in rows.iter().enumerate() {
        for (b, &j) in rows.iter().enumerate() {
            if store.query_ids[i] == store.query_ids[j] && store.relevance[i] > store.relevance[j] {
                out.push((a, b));
            }
        }
    }
    out
}

fn count_pairs(store: &TokenStore, rows: &[usize]) -> usize {
    pairs(store, rows).len()
}

/// The epoch's accumulation groups (see the module docs).
/// Reads `loss`, `batch_size`, `grad_accum`, `bucket_batches` and `seed` from `cfg`.
pub fn epoch_plan(store: &TokenStore, items: &Items, cfg: &TrainConfig, epoch: usize) -> Vec<Group> {
    let (loss, batch_size, bucket_batches) = (cfg.loss, cfg.batch_size, cfg.bucket_batches);
    let mut rng = SplitMix64::stream(cfg.seed, "epoch order", epoch as u64);
    let mut order: Vec<usize> = (0..items.len()).collect();
    rng.shuffle(&mut order);
    if bucket_batches > 0 {
        for window in order.chunks_mut(bucket_batches * batch_size) {
            window.sort_by_key(|&i| items.lengths[i]);
        }
    }
    let mut batches: Vec<MicroBatch> = order
        .chunks(batch_size)
        .map(|chunk| {
            let rows: Vec<usize> = chunk.iter().flat_map(|&i| items.items[i].iter().copied()).collect();
            let units = match loss {
                LossKind::Pairwise => count_pairs(store, &rows),
                _ => rows.len(),
            };
            MicroBatch { rows, units }
        })
        .collect();
    if bucket_batches > 0 {
        rng.shuffle(&mut batches);
    }
    batches
        .chunks(cfg.grad_accum)
        .map(|c| Group { units: c.iter().map(|m| m.units).sum(), micro: c.to_vec() })
        .collect()
}

/// A left-padded batch: ids and mask `[B, T]` (u32), plus the count of real tokens.
pub struct Padded {
    pub ids: Tensor,
    pub mask: Tensor,
    pub tokens: usize,
    /// The ids as a flat host vector, `[B · T]`, padding as 0.
    pub flat_ids: Vec<u32>,
    pub seq_len: usize,
}

/// Left padding puts every prompt's last token at the last position, where the reranker reads
/// its score. Pads use id 0; the mask keeps them out of attention.
pub fn pad_left(store: &TokenStore, rows: &[usize], device: &Device) -> Result<Padded, TrainError> {
    let t = rows.iter().map(|&r| store.sequence(r).len()).max().unwrap_or(0);
    if t == 0 {
        return Err(TrainError::Config("a batch holds only empty prompts".into()));
    }
    let b = rows.len();
    let mut ids = vec![0u32; b * t];
    let mut mask = vec![0u32; b * t];
    let mut tokens = 0;
    for (k, &r) in rows.iter().enumerate() {
        let seq = store.sequence(r);
        let start = k * t + (t - seq.len());
        ids[start..start + seq.len()].copy_from_slice(seq);
        mask[start..start + seq.len()].iter_mut().for_each(|m| *m = 1);
        tokens += seq.len();
    }
    Ok(Padded {
        ids: Tensor::from_slice(&ids, (b, t), device)?,
        mask: Tensor::from_vec(mask, (b, t), device)?,
        tokens,
        flat_ids: ids,
        seq_len: t,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn store(lengths: &[usize], queries: &[u32], relevance: &[f32]) -> TokenStore {
        let mut s = TokenStore::default();
        s.offsets.push(0);
        for (i, &len) in lengths.iter().enumerate() {
            s.ids.extend((0..len).map(|k| (i * 10 + k) as u32 % 50 + 1));
            s.offsets.push(s.ids.len() as i64);
            s.labels.push(u8::from(relevance[i] >= 2.33));
            s.relevance.push(relevance[i]);
            s.query_ids.push(queries[i]);
            s.pair_ids.push(i as i64);
        }
        s.queries = (0..=queries.iter().copied().max().unwrap_or(0)).map(|q| format!("q{q}")).collect();
        s
    }

    fn plan_cfg(loss: LossKind, batch_size: usize, grad_accum: usize, bucket_batches: usize, seed: u64) -> TrainConfig {
        TrainConfig { loss, batch_size, grad_accum, bucket_batches, seed, ..TrainConfig::default() }
    }

    #[test]
    fn bucketed_plan_covers_every_row_once_and_cuts_padding() {
        let n = 200;
        let lengths: Vec<usize> = (0..n).map(|i| 5 + (i * 7919) % 90).collect();
        let s = store(&lengths, &(0..n as u32).collect::<Vec<_>>(), &vec![2.0; n]);
        let items = Items::new(&s, LossKind::Bce);
        let padded = |plan: &[Group]| -> usize {
            plan.iter()
                .flat_map(|g| &g.micro)
                .map(|m| m.rows.iter().map(|&r| lengths[r]).max().unwrap() * m.rows.len())
                .sum()
        };
        let bucketed = epoch_plan(&s, &items, &plan_cfg(LossKind::Bce, 4, 3, 8, 1), 0);
        let plain = epoch_plan(&s, &items, &plan_cfg(LossKind::Bce, 4, 3, 0, 1), 0);
        for plan in [&bucketed, &plain] {
            let mut rows: Vec<usize> = plan.iter().flat_map(|g| g.micro.iter().flat_map(|m| m.rows.clone())).collect();
            rows.sort();
            assert_eq!(rows, (0..n).collect::<Vec<_>>());
            assert_eq!(plan.len(), 50usize.div_ceil(3));
            assert!(plan.iter().all(|g| g.units == g.rows()));
        }
        assert!(padded(&bucketed) * 10 < padded(&plain) * 8, "{} vs {}", padded(&bucketed), padded(&plain));
        // Same seed and epoch → same plan; another epoch → another order.
        assert_eq!(bucketed, epoch_plan(&s, &items, &plan_cfg(LossKind::Bce, 4, 3, 8, 1), 0));
        assert_ne!(bucketed, epoch_plan(&s, &items, &plan_cfg(LossKind::Bce, 4, 3, 8, 1), 1));
    }

    #[test]
    fn pairwise_batches_hold_whole_queries_and_count_pairs() {
        // Query 0: relevances 3, 1, 2 → 3 pairs; query 1: all equal → dropped; query 2: 2 > 1 → 1 pair.
        let s = store(&[4, 5, 6, 3, 3, 7, 2], &[0, 0, 0, 1, 1, 2, 2], &[3.0, 1.0, 2.0, 2.0, 2.0, 2.0, 1.0]);
        let items = Items::new(&s, LossKind::Pairwise);
        assert_eq!(items.len(), 2);
        let plan = epoch_plan(&s, &items, &plan_cfg(LossKind::Pairwise, 1, 2, 0, 3), 0);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].units, 4);
        for m in &plan[0].micro {
            let q: Vec<u32> = m.rows.iter().map(|&r| s.query_ids[r]).collect();
            assert!(q.windows(2).all(|w| w[0] == w[1]));
            assert_eq!(m.units, if q[0] == 0 { 3 } else { 1 });
        }
    }

    #[test]
    fn left_padding_puts_every_last_token_at_the_end() {
        let s = store(&[2, 4], &[0, 0], &[1.0, 3.0]);
        let p = pad_left(&s, &[0, 1], &Device::Cpu).unwrap();
        let mask: Vec<Vec<u32>> = p.mask.to_vec2().unwrap();
        assert_eq!(mask, vec![vec![0, 0, 1, 1], vec![1, 1, 1, 1]]);
        let ids: Vec<Vec<u32>> = p.ids.to_vec2().unwrap();
        assert_eq!(&ids[0][2..], s.sequence(0));
        assert_eq!(p.tokens, 6);
    }
}
