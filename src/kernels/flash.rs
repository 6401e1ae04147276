//! Attention without the `T × T` probabilities: FlashAttention-2's tiling (Dao, 2023), forward and
//! backward, for left-padded causal batches with grouped-query heads.
//!
//! Why: the softmax kernels ([`super::softmax`]) are single passes, but they still write and read
//! the probabilities, `[B, heads, T, T]` — 134 MB a layer at 16 × 512 in bf16, kept for the
//! backward — and spend more time in those passes than in attention's two matmuls. Here a block of
//! `BLOCK_Q` query rows walks the keys `BLOCK_K` at a time with an online softmax (running maximum
//! `m` and sum `l`), so only the output and one log-sum-exp per row (`lse = m + ln l`) are stored;
//! the backward recomputes each tile's probabilities from `lse`.
//!
//! The loops here are the CPU twin of the CUDA kernels in [`cuda`] — the same tiles, the same
//! skipped tiles, the same arithmetic in f32 — and the reference they are checked against; the
//! tests hold this tiling to the materialising attention of [`crate::model::fused`].
//!
//! **The mask, and rows without a key.** A query row `i` of sequence `b` sees key `j` when
//! `j ≤ i` and `mask[b, j] = 1`; its scores are `scale · q·k` there and `f32::MIN` elsewhere, as
//! [`crate::model::ops::attention_bias`] makes them. A left-padded row before the first real token
//! sees no key at all; the materialising softmax then gives it equal weights over all `T` keys (every
//! score rounds to `f32::MIN`), and its gradient still flows through those weights. Such an *empty*
//! row is computed here with every score 0 — the same weights, `1/T`, and the same gradient formula —
//! so that both implementations agree on every row, padding included (the loss never reads those rows).
//!
//! **Skipped tiles.** A tile of keys is skipped for a tile of queries when none of its rows sees any
//! of its keys (all keys later than the tile's last row, or all keys padding) and the query tile has
//! no empty row; a skipped tile would contribute exactly 0. With causal masking that skips about half
//! the tiles at long T. MFU in `pipe bench train-step` still counts the full `T × T` (see
//! `train_flops_per_token`), so the saving shows as speed, not as a larger denominator.
//!
//! **The backward in two passes**, both deterministic: one per tile of keys (and KV head) that sums
//! `dK` and `dV` over every query head of its group and every query tile, and one per tile of
//! queries that sums `dQ` over the key tiles; no atomic adds, at the cost of computing the scores
//! and `dP` twice. `D_i = Σ_d dO_id · O_id` is computed once before both.

use rayon::prelude::*;

/// Query rows per tile (the CUDA kernel: 4 warps of 16 rows).
pub const BLOCK_Q: usize = 64;
/// Keys per tile.
pub const BLOCK_K: usize = 64;

/// The shapes of one attention call: `q: [b, heads, t, d]`, `k, v: [b, kv_heads, t, d]`,
/// `mask: [b, t]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub b: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub t: usize,
    pub d: usize,
}

impl Dims {
    pub fn check(&self, q: usize, k: usize, v: usize, mask: usize) -> Result<(), String> {
        let Dims { b, heads, kv_heads, t, d } = *self;
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(format!("flash attention: {heads} query heads is not a multiple of {kv_heads} KV heads"));
        }
        if q != b * heads * t * d || k != b * kv_heads * t * d || v != k || mask != b * t {
            return Err(format!(
                "flash attention: q, k, v and mask have {q}, {k}, {v} and {mask} elements; [{b}, {heads}, {t}, {d}], \
                 [{b}, {kv_heads}, {t}, {d}] twice and [{b}, {t}] expected"
            ));
        }
        Ok(())
    }
}

/// Per sequence, the index of its first real token (`t` when it has none): row `i` is empty when
/// `i < first[b]`.
pub fn first_real(mask: &[f32], b: usize, t: usize) -> Vec<usize> {
    (0..b).map(|s| mask[s * t..(s + 1) * t].iter().position(|&m| m != 0.0).unwrap_or(t)).collect()
}

/// Whether the key tile starting at `j0` is skipped for the query tile starting at `i0` (see the
/// module's doc): the query tile has no empty row and none of its rows sees any of the tile's keys.
pub fn skip_tile(i0: usize, j0: usize, t: usize, first: usize, mask: &[f32]) -> bool {
    let i_last = (i0 + BLOCK_Q).min(t) - 1;
    let j_end = (j0 + BLOCK_K).min(t);
    i0 >= first && (j0 > i_last || mask[j0..j_end].iter().all(|&m| m == 0.0))
}

/// The score of query row `i` and key `j` (see the module's doc on empty rows).
#[inline]
fn score(dot: f32, scale: f32, i: usize, j: usize, first: usize, mask: &[f32]) -> f32 {
    if i < first {
        0.0
    } else if j <= i && mask[j] != 0.0 {
        dot * scale
    } else {
        f32::MIN
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `(out [b, heads, t, d], lse [b, heads, t])` of `softmax(scale · q kᵀ + mask) v`, all f32.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], mask: &[f32], dims: Dims, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, heads, kv_heads, t, d } = dims;
    let group = heads / kv_heads;
    let first = first_real(mask, b, t);
    let q_tiles = t.div_ceil(BLOCK_Q);
    let mut out = vec![0f32; b * heads * t * d];
    let mut lse = vec![0f32; b * heads * t];
    // One task per (sequence, head, query tile), as one CUDA block.
    let tiles: Vec<(Vec<f32>, Vec<f32>)> = (0..b * heads * q_tiles)
        .into_par_iter()
        .map(|task| {
            let (s, h, qt) = (task / (heads * q_tiles), task / q_tiles % heads, task % q_tiles);
            let kvh = h / group;
            let (i0, i1) = (qt * BLOCK_Q, ((qt + 1) * BLOCK_Q).min(t));
            let rows = i1 - i0;
            let mask = &mask[s * t..(s + 1) * t];
            let qb = &q[((s * heads + h) * t) * d..];
            let kb = &k[((s * kv_heads + kvh) * t) * d..];
            let vb = &v[((s * kv_heads + kvh) * t) * d..];
            let (mut m, mut l) = (vec![f32::MIN; rows], vec![0f32; rows]);
            let mut acc = vec![0f32; rows * d];
            let mut p = vec![0f32; BLOCK_K];
            for j0 in (0..t).step_by(BLOCK_K) {
                if skip_tile(i0, j0, t, first[s], mask) {
                    continue;
                }
                let j1 = (j0 + BLOCK_K).min(t);
                for r in 0..rows {
                    let i = i0 + r;
                    let qi = &qb[i * d..(i + 1) * d];
                    let mut tile_max = f32::MIN;
                    for j in j0..j1 {
                        let sc = score(dot(qi, &kb[j * d..(j + 1) * d]), scale, i, j, first[s], mask);
                        p[j - j0] = sc;
                        tile_max = tile_max.max(sc);
                    }
                    let m_new = m[r].max(tile_max);
                    let correction = (m[r] - m_new).exp();
                    let mut sum = 0f32;
                    for pj in &mut p[..j1 - j0] {
                        *pj = (*pj - m_new).exp();
                        sum += *pj;
                    }
                    l[r] = l[r] * correction + sum;
                    m[r] = m_new;
                    let a = &mut acc[r * d..(r + 1) * d];
                    a.iter_mut().for_each(|x| *x *= correction);
                    for j in j0..j1 {
                        let pj = p[j - j0];
                        a.iter_mut().zip(&vb[j * d..(j + 1) * d]).for_each(|(x, &vj)| *x += pj * vj);
                    }
                }
            }
            for r in 0..rows {
                acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x /= l[r]);
            }
            let lse: Vec<f32> = (0..rows).map(|r| m[r] + l[r].ln()).collect();
            (acc, lse)
        })
        .collect();
    for (task, (acc, l)) in tiles.into_iter().enumerate() {
        let (s, h, qt) = (task / (heads * q_tiles), task / q_tiles % heads, task % q_tiles);
        let row0 = (s * heads + h) * t + qt * BLOCK_Q;
        out[row0 * d..row0 * d + acc.len()].copy_from_slice(&acc);
        lse[row0..row0 + l.len()].copy_from_slice(&l);
    }
    (out, lse)
}

/// `D_i = Σ_d dO_id · O_id` per row `[b · heads · t]`: the softmax backward's row term.
pub fn row_dots(out: &[f32], dout: &[f32], d: usize) -> Vec<f32> {
    out.par_chunks(d).zip(dout.par_chunks(d)).map(|(o, g)| dot(o, g)).collect()
}

/// `(dq, dk, dv)` of [`forward`] for the output gradient `dout`, from its `out` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dims: Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, heads, kv_heads, t, d } = dims;
    let group = heads / kv_heads;
    let first = first_real(mask, b, t);
    let delta = row_dots(out, dout, d);
    let (q_tiles, k_tiles) = (t.div_ceil(BLOCK_Q), t.div_ceil(BLOCK_K));
    // The probability and dS of row i (of head h) and key j: what both passes recompute.
    let p_ds = |s: usize, h: usize, i: usize, j: usize| -> (f32, f32) {
        let kvh = h / group;
        let row = (s * heads + h) * t + i;
        let qi = &q[row * d..(row + 1) * d];
        let kj = &k[((s * kv_heads + kvh) * t + j) * d..][..d];
        let vj = &v[((s * kv_heads + kvh) * t + j) * d..][..d];
        let sc = score(dot(qi, kj), scale, i, j, first[s], &mask[s * t..(s + 1) * t]);
        let p = (sc - lse[row]).exp();
        let dp = dot(&dout[row * d..(row + 1) * d], vj);
        (p, p * (dp - delta[row]))
    };
    // Pass 1: dK and dV, one task per (sequence, KV head, key tile).
    let kv: Vec<(Vec<f32>, Vec<f32>)> = (0..b * kv_heads * k_tiles)
        .into_par_iter()
        .map(|task| {
            let (s, kvh, kt) = (task / (kv_heads * k_tiles), task / k_tiles % kv_heads, task % k_tiles);
            let (j0, j1) = (kt * BLOCK_K, ((kt + 1) * BLOCK_K).min(t));
            let mask_s = &mask[s * t..(s + 1) * t];
            let (mut dk, mut dv) = (vec![0f32; (j1 - j0) * d], vec![0f32; (j1 - j0) * d]);
            for h in kvh * group..(kvh + 1) * group {
                for qt in 0..q_tiles {
                    let i0 = qt * BLOCK_Q;
                    if skip_tile(i0, j0, t, first[s], mask_s) {
                        continue;
                    }
                    for i in i0..(i0 + BLOCK_Q).min(t) {
                        let row = (s * heads + h) * t + i;
                        for j in j0..j1 {
                            let (p, ds) = p_ds(s, h, i, j);
                            let r = (j - j0) * d;
                            for c in 0..d {
                                dv[r + c] += p * dout[row * d + c];
                                dk[r + c] += ds * q[row * d + c];
                            }
                        }
                    }
                }
            }
            dk.iter_mut().for_each(|x| *x *= scale);
            (dk, dv)
        })
        .collect();
    // Pass 2: dQ, one task per (sequence, head, query tile).
    let dq_tiles: Vec<Vec<f32>> = (0..b * heads * q_tiles)
        .into_par_iter()
        .map(|task| {
            let (s, h, qt) = (task / (heads * q_tiles), task / q_tiles % heads, task % q_tiles);
            let kvh = h / group;
            let (i0, i1) = (qt * BLOCK_Q, ((qt + 1) * BLOCK_Q).min(t));
            let mask_s = &mask[s * t..(s + 1) * t];
            let mut dq = vec![0f32; (i1 - i0) * d];
            for kt in 0..k_tiles {
                let j0 = kt * BLOCK_K;
                if skip_tile(i0, j0, t, first[s], mask_s) {
                    continue;
                }
                for i in i0..i1 {
                    for j in j0..(j0 + BLOCK_K).min(t) {
                        let (_, ds) = p_ds(s, h, i, j);
                        let kj = &k[((s * kv_heads + kvh) * t + j) * d..][..d];
                        dq[(i - i0) * d..(i - i0 + 1) * d].iter_mut().zip(kj).for_each(|(x, &kc)| *x += ds * kc);
                    }
                }
            }
            dq.iter_mut().for_each(|x| *x *= scale);
            dq
        })
        .collect();
    let mut dq = vec![0f32; q.len()];
    for (task, tile) in dq_tiles.into_iter().enumerate() {
        let (s, h, qt) = (task / (heads * q_tiles), task / q_tiles % heads, task % q_tiles);
        let row0 = (s * heads + h) * t + qt * BLOCK_Q;
        dq[row0 * d..row0 * d + tile.len()].copy_from_slice(&tile);
    }
    let (mut dk, mut dv) = (vec![0f32; k.len()], vec![0f32; v.len()]);
    for (task, (tk, tv)) in kv.into_iter().enumerate() {
        let (s, kvh, kt) = (task / (kv_heads * k_tiles), task / k_tiles % kv_heads, task % k_tiles);
        let row0 = (s * kv_heads + kvh) * t + kt * BLOCK_K;
        dk[row0 * d..row0 * d + tk.len()].copy_from_slice(&tk);
        dv[row0 * d..row0 * d + tv.len()].copy_from_slice(&tv);
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused;
    use candle_core::{Device, Tensor};

    fn pattern(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + salt * 104_729) % 2003) as f32 - 1001.0) / 1001.0).collect()
    }

    fn max_rel(want: &[f32], got: &[f32]) -> f32 {
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs())).max(1e-12);
        want.iter().zip(got).fold(0f32, |a, (x, y)| a.max((x - y).abs())) / scale
    }

    /// The tiled forward and backward against the materialising attention (candle ops and the
    /// softmax kernels' CPU twins), on every row, padding rows included.
    fn check(dims: Dims, pads: &[usize]) {
        let Dims { b, heads, kv_heads, t, d } = dims;
        let scale = 1.0 / (d as f32).sqrt();
        let (q, k, v) =
            (pattern(b * heads * t * d, 1), pattern(b * kv_heads * t * d, 2), pattern(b * kv_heads * t * d, 3));
        let g = pattern(b * heads * t * d, 4);
        let mask: Vec<f32> = (0..b * t).map(|i| f32::from(u8::from(i % t >= pads[i / t]))).collect();
        let (out, lse) = forward(&q, &k, &v, &mask, dims, scale);
        let (dq, dk, dv) = backward(&q, &k, &v, &mask, &out, &lse, &g, dims, scale);

        let dev = Device::Cpu;
        let tq = Tensor::from_vec(q.clone(), (b, heads, t, d), &dev).unwrap();
        let tk = Tensor::from_vec(k.clone(), (b, kv_heads, t, d), &dev).unwrap();
        let tv = Tensor::from_vec(v.clone(), (b, kv_heads, t, d), &dev).unwrap();
        let tg = Tensor::from_vec(g.clone(), (b, heads, t, d), &dev).unwrap();
        let tmask = Tensor::from_vec(mask.iter().map(|&m| m as u32).collect::<Vec<_>>(), (b, t), &dev).unwrap();
        let bias = crate::model::ops::attention_bias(&tmask).unwrap();
        let want_out = fused::attention_forward(&tq, &tk, &tv, &bias, scale as f64).unwrap();
        let (wq, wk, wv) = fused::attention_backward(&tq, &tk, &tv, &bias, scale as f64, &tg).unwrap();
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (name, want, got) in
            [("out", flat(&want_out), &out), ("dq", flat(&wq), &dq), ("dk", flat(&wk), &dk), ("dv", flat(&wv), &dv)]
        {
            let err = max_rel(&want, got);
            assert!(err < 2e-5, "{dims:?} pads {pads:?}: {name} differs by {err} (relative to its largest value)");
        }
        // lse is the log of the row's softmax denominator: exp(score - lse) sums to 1 over the keys.
        let first = first_real(&mask, b, t);
        for s in 0..b {
            for i in [first[s].min(t - 1), t - 1] {
                let row = s * heads * t + i; // head 0
                let sum: f32 = (0..t)
                    .map(|j| {
                        let sc = score(
                            dot(&q[row * d..][..d], &k[(s * kv_heads * t + j) * d..][..d]),
                            scale,
                            i,
                            j,
                            first[s],
                            &mask[s * t..],
                        );
                        (sc - lse[row]).exp()
                    })
                    .sum();
                assert!((sum - 1.0).abs() < 1e-5, "row {i} of sequence {s}: probabilities sum to {sum}");
            }
        }
    }

    #[test]
    fn tiled_attention_equals_the_materialising_attention_with_gqa_and_left_padding() {
        // head_dim 64 and 128 (Qwen3's), T shorter than a tile, not a multiple of one, and several
        // tiles; sequences padded by 0, by less than a tile, by more than a tile.
        check(Dims { b: 2, heads: 4, kv_heads: 2, t: 37, d: 64 }, &[0, 5]);
        check(Dims { b: 3, heads: 4, kv_heads: 2, t: 150, d: 64 }, &[0, 20, 70]);
        check(Dims { b: 2, heads: 2, kv_heads: 1, t: 130, d: 128 }, &[3, 129]);
        check(Dims { b: 1, heads: 2, kv_heads: 2, t: 128, d: 128 }, &[64]);
    }

    #[test]
    fn tiles_that_see_no_key_are_skipped_and_tiles_with_empty_rows_are_not() {
        let t = 200;
        let mut mask = vec![1f32; t];
        mask[..70].iter_mut().for_each(|m| *m = 0.0); // 70 padding tokens: rows 0..70 are empty
        let first = first_real(&mask, 1, t)[0];
        assert_eq!(first, 70);
        // Query tile 0 (rows 0..64) is all empty rows: it sees every key tile, future ones too.
        assert!((0..4).all(|kt| !skip_tile(0, kt * BLOCK_K, t, first, &mask)));
        // Query tile 1 (rows 64..128) holds empty rows 64..70: nothing skipped either.
        assert!((0..4).all(|kt| !skip_tile(64, kt * BLOCK_K, t, first, &mask)));
        // Query tile 2 (rows 128..192): key tile 0 is all padding, tile 3 (keys 192..) all future.
        assert!(skip_tile(128, 0, t, first, &mask));
        assert!(!skip_tile(128, 64, t, first, &mask) && !skip_tile(128, 128, t, first, &mask));
        assert!(skip_tile(128, 192, t, first, &mask));
        // Without padding, a causal batch skips the tiles above the diagonal: 6 of 16 at T = 256.
        let full = vec![1f32; 256];
        let skipped = (0..4)
            .flat_map(|qt| (0..4).map(move |kt| (qt, kt)))
            .filter(|&(qt, kt)| skip_tile(qt * 64, kt * 64, 256, 0, &full))
            .count();
        assert_eq!(skipped, 6);
    }
}
