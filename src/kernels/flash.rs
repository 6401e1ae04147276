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

use candle_core::{DType, Device, Result, Tensor};
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
    pub fn check(&self, q: usize, k: usize, v: usize, mask: usize) -> std::result::Result<(), String> {
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

/// The shapes of `q`, `k`, `v` and `mask` as [`Dims`], checked.
fn tensor_dims(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Dims> {
    let (b, heads, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let dims = Dims { b, heads, kv_heads, t, d };
    if k.dims() != [b, kv_heads, t, d] || v.dims() != k.dims() || mask.dims() != [b, t] {
        candle_core::bail!(
            "flash attention: q {:?}, k {:?}, v {:?}, mask {:?}; expected [B, H, T, D], [B, KV, T, D] twice and [B, T]",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.dims()
        );
    }
    dims.check(q.elem_count(), k.elem_count(), v.elem_count(), mask.elem_count()).map_err(candle_core::Error::Msg)?;
    Ok(dims)
}

fn host(x: &Tensor) -> Result<Vec<f32>> {
    x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()
}

/// `(out [b, heads, t, d] in q's dtype, lse [b, heads, t] in f32)` of masked causal attention,
/// `mask: [b, t]` with 1 for real tokens (any dtype). No graph: the caller keeps `out` and `lse` for
/// [`attention_backward`]. On a CUDA device the tensor-core kernels run (bf16 or f16, head_dim 64
/// or 128; see [`cuda::supports`]); elsewhere the CPU loops above, in f32.
pub fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let dims = tensor_dims(q, k, v, mask)?;
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return cuda::forward(q, k, v, mask, dims, scale as f32);
    }
    let (o, l) = forward(&host(q)?, &host(k)?, &host(v)?, &host(mask)?, dims, scale as f32);
    let Dims { b, heads, t, d, .. } = dims;
    let out = Tensor::from_vec(o, (b, heads, t, d), q.device())?.to_dtype(q.dtype())?;
    Ok((out, Tensor::from_vec(l, (b, heads, t), q.device())?))
}

/// `(dq, dk, dv)` of [`attention_forward`] for the output gradient `dout`, in q's dtype.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = tensor_dims(q, k, v, mask)?;
    if out.dims() != q.dims() || dout.dims() != q.dims() || lse.dims() != &q.dims()[..3] {
        candle_core::bail!(
            "flash attention backward: out {:?}, dout {:?} and lse {:?} must be q's shape {:?} (lse without D)",
            out.dims(),
            dout.dims(),
            lse.dims(),
            q.dims()
        );
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        // D_i = Σ dO ⊙ O, once, in f32.
        let delta = (dout.to_dtype(DType::F32)? * out.to_dtype(DType::F32)?)?.sum(3)?;
        return cuda::backward(q, k, v, mask, lse, &delta, dout, dims, scale as f32);
    }
    let (dq, dk, dv) = backward(
        &host(q)?,
        &host(k)?,
        &host(v)?,
        &host(mask)?,
        &host(out)?,
        &host(lse)?,
        &host(dout)?,
        dims,
        scale as f32,
    );
    let back = |x: Vec<f32>, like: &Tensor| Tensor::from_vec(x, like.shape(), like.device())?.to_dtype(like.dtype());
    Ok((back(dq, q)?, back(dk, k)?, back(dv, v)?))
}

/// Whether the CUDA kernels take `dtype` at `head_dim` (false in a build without CUDA).
pub fn cuda_supports(dtype: DType, head_dim: usize) -> bool {
    #[cfg(feature = "cuda")]
    return cuda::supports(dtype, head_dim);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dtype, head_dim);
        false
    }
}

#[cfg(feature = "cuda")]
pub mod cuda {
    //! FlashAttention-2 on tensor cores: `mma.sync.m16n8k16` with bf16 or f16 operands and f32
    //! accumulators (sm_80 and later: A100, H100, H200).
    //!
    //! Why mma.sync and not Hopper's wgmma: wgmma needs sm_90a, shared-memory matrix descriptors,
    //! asynchronous warpgroup pipelines and (to pay off) TMA loads — a kernel several times this
    //! size that only a Hopper can run, where this one runs on every GPU since Ampere and is what
    //! FlashAttention-2 itself uses. A block is 4 warps; each warp owns 16 query rows (forward, dQ)
    //! or 16 keys (dK, dV). The fragment layouts are the PTX ISA's for m16n8k16: lane `g = lane / 4`,
    //! `c = lane % 4`; A holds rows g and g + 8, columns 2c, 2c + 1, 2c + 8, 2c + 9; B holds
    //! column g, rows 2c, 2c + 1, 2c + 8, 2c + 9; C holds rows g and g + 8, columns 2c and 2c + 1.
    //! A C tile of scores becomes the A operand of the next product without leaving registers.

    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, DType, Result, Storage, StorageRef, Tensor};

    use super::{Dims, BLOCK_K, BLOCK_Q};
    use crate::kernels::launch::{for_float_dtype, launch, Module, FLOAT_TYPES};

    const SOURCE: &str = r#"
#define BQ 64
#define BK 64
#define QC 32
#define PAD 8
#define FULL 0xffffffffu
#define NEG_MAX (-3.402823466e38f)
template <typename D> struct Mma;
template <> struct Mma<BF16> {
  static __device__ __forceinline__ void run(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } };
template <> struct Mma<F16> {
  static __device__ __forceinline__ void run(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } };
__device__ __forceinline__ unsigned pack(u16 lo, u16 hi) { return (unsigned)lo | ((unsigned)hi << 16); }
/* Two adjacent elements of row `r` (0 past the end) as one operand register. */
__device__ __forceinline__ unsigned load2(const u16* base, int r, int col, int t, int hd) {
  return r < t ? *(const unsigned*)(base + (long long)r * hd + col) : 0u;
}
/* The sequence's first real token (t when none), for the whole block. */
__device__ int first_real(const float* m, int t, int* slot) {
  if (threadIdx.x == 0) *slot = t;
  __syncthreads();
  for (int j = threadIdx.x; j < t; j += blockDim.x) if (m[j] != 0.0f) { atomicMin(slot, j); break; }
  __syncthreads();
  return *slot;
}
/* The module doc's rule, block-uniform (every thread must call it). */
__device__ bool skip_tile(int i0, int j0, int t, int first, const float* m) {
  int i_last = min(i0 + BQ, t) - 1;
  int j = j0 + (int)threadIdx.x;
  bool real = threadIdx.x < BK && j < t && m[j] != 0.0f;
  bool any_real = __syncthreads_or(real) != 0;
  return i0 >= first && (j0 > i_last || !any_real);
}
/* Score of row i and key j; `live` is false past the sequence's end. */
__device__ __forceinline__ float score(float dot, float scale, int i, int j, int t, int first, const float* m, bool* live) {
  *live = j < t;
  if (j >= t) return NEG_MAX;
  if (i < first) return 0.0f;
  return (j <= i && m[j] != 0.0f) ? dot * scale : NEG_MAX;
}
/* rows x HD elements from global rows [r0, r0 + rows) to shared memory, zeros past t. */
template <int HD>
__device__ void tile_load(u16 (*dst)[HD + PAD], const u16* src, int r0, int rows, int t) {
  for (int e = threadIdx.x; e < rows * HD / 8; e += blockDim.x) {
    int r = e / (HD / 8), c = (e % (HD / 8)) * 8;
    uint4 x = make_uint4(0u, 0u, 0u, 0u);
    if (r0 + r < t) x = *(const uint4*)(src + (long long)(r0 + r) * HD + c);
    *(uint4*)&dst[r][c] = x;
  }
}
/* A fragments of 16 rows [r0, r0 + 16) x HD from global memory. */
template <int HD>
__device__ void frag_rows(unsigned (*a)[4], const u16* base, int r0, int t) {
  int g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
  #pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    int col = kk * 16 + c * 2;
    a[kk][0] = load2(base, r0 + g, col, t, HD);
    a[kk][1] = load2(base, r0 + g + 8, col, t, HD);
    a[kk][2] = load2(base, r0 + g, col + 8, t, HD);
    a[kk][3] = load2(base, r0 + g + 8, col + 8, t, HD);
  }
}
/* The A operand of keys (or queries) [16 kk, 16 kk + 16) from a C tile pair, rounded to D. */
template <typename D>
__device__ __forceinline__ void c_to_a(unsigned* a, const float* c0, const float* c1) {
  a[0] = pack(D::from(c0[0]), D::from(c0[1]));
  a[1] = pack(D::from(c0[2]), D::from(c0[3]));
  a[2] = pack(D::from(c1[0]), D::from(c1[1]));
  a[3] = pack(D::from(c1[2]), D::from(c1[3]));
}
/* B operand from a row-major shared tile read down its rows: rows k0 + 2c, +1, +8, +9 of column n. */
template <int HD>
__device__ __forceinline__ void b_down(unsigned* b, u16 (*s)[HD + PAD], int k0, int n) {
  int c = threadIdx.x & 3;
  b[0] = pack(s[k0 + 2 * c][n], s[k0 + 2 * c + 1][n]);
  b[1] = pack(s[k0 + 2 * c + 8][n], s[k0 + 2 * c + 9][n]);
}
/* B operand from a row-major shared tile read along row n: columns k0 + 2c, +1 and k0 + 2c + 8, +9. */
template <int HD>
__device__ __forceinline__ void b_along(unsigned* b, u16 (*s)[HD + PAD], int k0, int n) {
  int c = threadIdx.x & 3;
  b[0] = *(const unsigned*)&s[n][k0 + 2 * c];
  b[1] = *(const unsigned*)&s[n][k0 + 2 * c + 8];
}
/* acc[HD/8] += C · S: C the accumulator tiles of this warp's 16 rows over K columns (rounded to D
   as the A operand), S a row-major shared tile of K rows read down its rows. */
template <typename D, int HD, int K>
__device__ __forceinline__ void accumulate(float (*acc)[4], float (*c)[4], u16 (*s)[HD + PAD]) {
  int g = (threadIdx.x & 31) >> 2;
  #pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    unsigned a[4];
    c_to_a<D>(a, c[2 * kk], c[2 * kk + 1]);
    #pragma unroll
    for (int n = 0; n < HD / 8; ++n) { unsigned bb[2]; b_down<HD>(bb, s, kk * 16, n * 8 + g); Mma<D>::run(acc[n], a, bb[0], bb[1]); }
  }
}
/* Rows g and g + 8 of this warp's accumulator tiles, times `mul` (per row), to `base` rows `rows` (< t). */
template <typename D, int HD>
__device__ __forceinline__ void store_rows(u16* base, float (*acc)[4], const int* rows, const float* mul, int t) {
  int c = threadIdx.x & 3;
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= t) continue;
    u16* row = base + (long long)rows[r] * HD;
    #pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      row[n * 8 + 2 * c] = D::from(acc[n][2 * r] * mul[r]);
      row[n * 8 + 2 * c + 1] = D::from(acc[n][2 * r + 1] * mul[r]);
    }
  }
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(FULL, x, 1));
  return fmaxf(x, __shfl_xor_sync(FULL, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(FULL, x, 1);
  return x + __shfl_xor_sync(FULL, x, 2);
}

/* Where a query-tile block (forward, dQ) stands: grid (query tiles, heads, batch), 4 warps of 16 rows. */
struct QueryTile {
  int h, b, kvh, g, c, i0, rows[2], first;
  const float* m;
  long long head;           /* first row of (b, h) in q, out, dout, lse, delta */
  long long kv;             /* first row of (b, kvh) in k and v */
};
__device__ QueryTile query_tile(const float* mask, int heads, int kv_heads, int t, int* first_slot) {
  QueryTile q;
  q.h = blockIdx.y; q.b = blockIdx.z; q.kvh = q.h / (heads / kv_heads);
  q.g = (threadIdx.x & 31) >> 2; q.c = threadIdx.x & 3;
  q.i0 = blockIdx.x * BQ;
  q.rows[0] = q.i0 + (threadIdx.x >> 5) * 16 + q.g; q.rows[1] = q.rows[0] + 8;
  q.m = mask + (long long)q.b * t;
  q.first = first_real(q.m, t, first_slot);
  q.head = (long long)(q.b * heads + q.h) * t;
  q.kv = (long long)(q.b * kv_heads + q.kvh) * t;
  return q;
}
/* S = Q Kᵀ for this warp's 16 rows and a tile of BK keys in shared memory. */
template <typename D, int HD>
__device__ __forceinline__ void scores(float (*s)[4], unsigned (*qa)[4], u16 (*ks)[HD + PAD], int g) {
  #pragma unroll
  for (int n = 0; n < BK / 8; ++n) {
    s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    #pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) { unsigned bb[2]; b_along<HD>(bb, ks, kk * 16, n * 8 + g); Mma<D>::run(s[n], qa[kk], bb[0], bb[1]); }
  }
}

/* Grid (query tiles, heads, batch), 128 threads. */
template <typename D, int HD>
__device__ void flash_fwd(const u16* q, const u16* k, const u16* v, const float* mask, u16* out, float* lse,
                          int heads, int kv_heads, int t, float scale) {
  __shared__ __align__(16) u16 ks[BK][HD + PAD];
  __shared__ __align__(16) u16 vs[BK][HD + PAD];
  __shared__ int first_slot;
  const QueryTile qt = query_tile(mask, heads, kv_heads, t, &first_slot);
  const int g = qt.g, c = qt.c, i0 = qt.i0, first = qt.first;
  const int* rows = qt.rows;
  const float* m = qt.m;
  const u16* kb = k + qt.kv * HD;
  const u16* vb = v + qt.kv * HD;
  unsigned qa[HD / 16][4];
  frag_rows<HD>(qa, q + qt.head * HD, rows[0] - g, t);
  float o[HD / 8][4];
  #pragma unroll
  for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float mx[2] = {NEG_MAX, NEG_MAX}, l[2] = {0.0f, 0.0f};
  for (int j0 = 0; j0 < t; j0 += BK) {
    if (skip_tile(i0, j0, t, first, m)) continue;
    __syncthreads();
    tile_load<HD>(ks, kb, j0, BK, t);
    tile_load<HD>(vs, vb, j0, BK, t);
    __syncthreads();
    float s[BK / 8][4];
    scores<D, HD>(s, qa, ks, g);
    float tmax[2] = {NEG_MAX, NEG_MAX};
    bool live[BK / 8][4];
    #pragma unroll
    for (int n = 0; n < BK / 8; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        int i = rows[e >> 1], j = j0 + n * 8 + 2 * c + (e & 1);
        s[n][e] = score(s[n][e], scale, i, j, t, first, m, &live[n][e]);
        if (live[n][e]) tmax[e >> 1] = fmaxf(tmax[e >> 1], s[n][e]);
      }
    float corr[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mnew = fmaxf(mx[r], quad_max(tmax[r]));
      corr[r] = expf(mx[r] - mnew);
      mx[r] = mnew;
      l[r] *= corr[r];
    }
    #pragma unroll
    for (int n = 0; n < BK / 8; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        float p = live[n][e] ? expf(s[n][e] - mx[e >> 1]) : 0.0f;
        s[n][e] = p;
        l[e >> 1] += p;
      }
    #pragma unroll
    for (int n = 0; n < HD / 8; ++n) { o[n][0] *= corr[0]; o[n][1] *= corr[0]; o[n][2] *= corr[1]; o[n][3] *= corr[1]; }
    accumulate<D, HD, BK>(o, s, vs);
  }
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = quad_sum(l[r]);
    int i = rows[r];
    if (i < t) {
      u16* orow = out + (qt.head + i) * HD;
      #pragma unroll
      for (int n = 0; n < HD / 8; ++n) {
        orow[n * 8 + 2 * c] = D::from(o[n][2 * r] / sum);
        orow[n * 8 + 2 * c + 1] = D::from(o[n][2 * r + 1] / sum);
      }
      if (c == 0) lse[qt.head + i] = mx[r] + logf(sum);
    }
  }
}

/* dQ. Grid (query tiles, heads, batch), 128 threads; delta = rowsum(dO * O) in f32. */
template <typename D, int HD>
__device__ void flash_bwd_dq(const u16* q, const u16* k, const u16* v, const float* mask, const float* lse,
                             const float* delta, const u16* dout, u16* dq, int heads, int kv_heads, int t, float scale) {
  __shared__ __align__(16) u16 ks[BK][HD + PAD];
  __shared__ __align__(16) u16 vs[BK][HD + PAD];
  __shared__ int first_slot;
  const QueryTile qt = query_tile(mask, heads, kv_heads, t, &first_slot);
  const int g = qt.g, c = qt.c, i0 = qt.i0, first = qt.first;
  const int* rows = qt.rows;
  const float* m = qt.m;
  const long long head = qt.head;
  const u16* kb = k + qt.kv * HD;
  const u16* vb = v + qt.kv * HD;
  unsigned qa[HD / 16][4], da[HD / 16][4];
  frag_rows<HD>(qa, q + head * HD, rows[0] - g, t);
  frag_rows<HD>(da, dout + head * HD, rows[0] - g, t);
  float row_lse[2], row_delta[2];
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_lse[r] = rows[r] < t ? lse[head + rows[r]] : 0.0f;
    row_delta[r] = rows[r] < t ? delta[head + rows[r]] : 0.0f;
  }
  float acc[HD / 8][4];
  #pragma unroll
  for (int n = 0; n < HD / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  for (int j0 = 0; j0 < t; j0 += BK) {
    if (skip_tile(i0, j0, t, first, m)) continue;
    __syncthreads();
    tile_load<HD>(ks, kb, j0, BK, t);
    tile_load<HD>(vs, vb, j0, BK, t);
    __syncthreads();
    /* S = Q Kᵀ and dP = dO Vᵀ: the same product with other operands. */
    float s[BK / 8][4], dp[BK / 8][4];
    scores<D, HD>(s, qa, ks, g);
    scores<D, HD>(dp, da, vs, g);
    #pragma unroll
    for (int n = 0; n < BK / 8; ++n) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        int i = rows[e >> 1], j = j0 + n * 8 + 2 * c + (e & 1);
        bool live;
        float sc = score(s[n][e], scale, i, j, t, first, m, &live);
        float p = (live && i < t) ? expf(sc - row_lse[e >> 1]) : 0.0f;
        s[n][e] = p * (dp[n][e] - row_delta[e >> 1]);
      }
    }
    accumulate<D, HD, BK>(acc, s, ks);
  }
  const float mul[2] = {scale, scale};
  store_rows<D, HD>(dq + head * HD, acc, rows, mul, t);
}

/* dK and dV. Grid (key tiles, KV heads, batch), 128 threads: each warp owns 16 keys and walks every
   query head of its group and every query tile, QC rows at a time. */
template <typename D, int HD>
__device__ void flash_bwd_dkdv(const u16* q, const u16* k, const u16* v, const float* mask, const float* lse,
                               const float* delta, const u16* dout, u16* dk, u16* dv, int heads, int kv_heads, int t,
                               float scale) {
  __shared__ __align__(16) u16 qs[QC][HD + PAD];
  __shared__ __align__(16) u16 ds[QC][HD + PAD];
  __shared__ float lse_s[QC], delta_s[QC];
  __shared__ int first_slot;
  const int kvh = blockIdx.y, b = blockIdx.z, group = heads / kv_heads;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
  const int j0 = blockIdx.x * BK, c0 = j0 + warp * 16 + g, keys[2] = {c0, c0 + 8};
  const float* m = mask + (long long)b * t;
  const int first = first_real(m, t, &first_slot);
  const long long kvrow = (long long)(b * kv_heads + kvh) * t;
  unsigned ka[HD / 16][4], va[HD / 16][4];
  frag_rows<HD>(ka, k + kvrow * HD, j0 + warp * 16, t);
  frag_rows<HD>(va, v + kvrow * HD, j0 + warp * 16, t);
  float gk[HD / 8][4], gv[HD / 8][4];
  #pragma unroll
  for (int n = 0; n < HD / 8; ++n)
    #pragma unroll
    for (int e = 0; e < 4; ++e) gk[n][e] = gv[n][e] = 0.0f;
  for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
    const long long head = (long long)(b * heads + h) * t;
    for (int i0 = 0; i0 < t; i0 += BQ) {
      if (skip_tile(i0, j0, t, first, m)) continue;
      for (int ic = i0; ic < min(i0 + BQ, t); ic += QC) {
        __syncthreads();
        tile_load<HD>(qs, q + head * HD, ic, QC, t);
        tile_load<HD>(ds, dout + head * HD, ic, QC, t);
        if (threadIdx.x < QC) {
          int i = ic + threadIdx.x;
          lse_s[threadIdx.x] = i < t ? lse[head + i] : 0.0f;
          delta_s[threadIdx.x] = i < t ? delta[head + i] : 0.0f;
        }
        __syncthreads();
        /* Transposed scores and dP: rows are this warp's keys, columns the chunk's queries. */
        float st[QC / 8][4], dpt[QC / 8][4];
        #pragma unroll
        for (int n = 0; n < QC / 8; ++n) {
          #pragma unroll
          for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.0f;
          #pragma unroll
          for (int kk = 0; kk < HD / 16; ++kk) {
            unsigned bb[2];
            b_along<HD>(bb, qs, kk * 16, n * 8 + g); Mma<D>::run(st[n], ka[kk], bb[0], bb[1]);
            b_along<HD>(bb, ds, kk * 16, n * 8 + g); Mma<D>::run(dpt[n], va[kk], bb[0], bb[1]);
          }
          #pragma unroll
          for (int e = 0; e < 4; ++e) {
            int jj = keys[e >> 1], col = n * 8 + 2 * c + (e & 1), i = ic + col;
            bool live;
            float sc = score(st[n][e], scale, i, jj, t, first, m, &live);
            float p = (live && i < t) ? expf(sc - lse_s[col]) : 0.0f;
            st[n][e] = p;
            dpt[n][e] = p * (dpt[n][e] - delta_s[col]);
          }
        }
        accumulate<D, HD, QC>(gv, st, ds);  /* dV += Pᵀ dO */
        accumulate<D, HD, QC>(gk, dpt, qs); /* dK += dSᵀ Q (scaled at the end) */
      }
    }
  }
  const float by_scale[2] = {scale, scale}, by_one[2] = {1.0f, 1.0f};
  store_rows<D, HD>(dk + kvrow * HD, gk, keys, by_scale, t);
  store_rows<D, HD>(dv + kvrow * HD, gv, keys, by_one, t);
}

#define FLASH(NAME, D, HD) \
extern "C" __global__ void __launch_bounds__(128) pipe_flash_fwd_##NAME##_d##HD(const u16* q, const u16* k, \
    const u16* v, const float* mask, u16* out, float* lse, int heads, int kv_heads, int t, float scale) \
  { flash_fwd<D, HD>(q, k, v, mask, out, lse, heads, kv_heads, t, scale); } \
extern "C" __global__ void __launch_bounds__(128) pipe_flash_bwd_dq_##NAME##_d##HD(const u16* q, const u16* k, \
    const u16* v, const float* mask, const float* lse, const float* delta, const u16* dout, u16* dq, int heads, \
    int kv_heads, int t, float scale) \
  { flash_bwd_dq<D, HD>(q, k, v, mask, lse, delta, dout, dq, heads, kv_heads, t, scale); } \
extern "C" __global__ void __launch_bounds__(128) pipe_flash_bwd_dkdv_##NAME##_d##HD(const u16* q, const u16* k, \
    const u16* v, const float* mask, const float* lse, const float* delta, const u16* dout, u16* dk, u16* dv, \
    int heads, int kv_heads, int t, float scale) \
  { flash_bwd_dkdv<D, HD>(q, k, v, mask, lse, delta, dout, dk, dv, heads, kv_heads, t, scale); }
FLASH(bf16, BF16, 64)
FLASH(bf16, BF16, 128)
FLASH(f16, F16, 64)
FLASH(f16, F16, 128)
"#;

    /// The instantiated dtypes and head dims.
    const DTYPES: [&str; 2] = ["bf16", "f16"];
    const HEAD_DIMS: [usize; 2] = [64, 128];
    const BASES: [&str; 3] = ["pipe_flash_fwd", "pipe_flash_bwd_dq", "pipe_flash_bwd_dkdv"];

    pub static MODULE: Module = Module::new_for_arch(
        "flash",
        "FlashAttention kernels",
        &[FLOAT_TYPES, SOURCE],
        || {
            Ok(BASES
                .iter()
                .flat_map(|b| DTYPES.iter().flat_map(move |t| HEAD_DIMS.iter().map(move |d| format!("{b}_{t}_d{d}"))))
                .collect())
        },
        "compute_80",
    );

    /// Whether the kernels take these inputs: bf16 or f16, head_dim 64 or 128.
    pub fn supports(dtype: DType, head_dim: usize) -> bool {
        matches!(dtype, DType::BF16 | DType::F16) && HEAD_DIMS.contains(&head_dim)
    }

    fn kernel_name(base: &str, dtype: DType, d: usize) -> String {
        format!("{base}_{}_d{d}", if dtype == DType::BF16 { "bf16" } else { "f16" })
    }

    /// A contiguous tensor's storage, start offset and length; the 16-byte loads need a start at a
    /// multiple of 8 elements.
    fn view<'a>(x: &'a Tensor, what: &str) -> Result<(StorageRef<'a>, usize)> {
        let (storage, layout) = x.storage_and_layout();
        let start = crate::kernels::contiguous_start(layout, "flash attention", what)?;
        if start % 8 != 0 {
            candle_core::bail!("flash attention: {what} starts at element {start}, not a multiple of 8");
        }
        Ok((storage, start))
    }

    fn cuda(s: &Storage) -> Result<&CudaStorage> {
        match s {
            Storage::Cuda(s) => Ok(s),
            _ => candle_core::bail!("flash attention: every input must be on the same CUDA device"),
        }
    }

    fn wrap(s: CudaStorage, shape: &[usize]) -> Tensor {
        Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
    }

    fn config(blocks: (usize, usize, usize)) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (blocks.0 as u32, blocks.1 as u32, blocks.2 as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        dims: Dims,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        let Dims { b, heads, kv_heads, t, d } = dims;
        if !supports(q.dtype(), d) || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
            candle_core::bail!(
                "flash attention: {:?} with head_dim {d} is not supported (bf16 or f16; 64 or 128)",
                q.dtype()
            );
        }
        let mask = mask.to_dtype(DType::F32)?.contiguous()?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let ((sq, oq), (sk, ok), (sv, ov), (sm, om)) =
            (view(&q, "q")?, view(&k, "k")?, view(&v, "v")?, view(&mask, "mask")?);
        let (sq, sk, sv, sm) = (cuda(&sq)?, cuda(&sk)?, cuda(&sv)?, cuda(&sm)?);
        let dev = &sq.device;
        let func = MODULE.kernel(dev, &kernel_name("pipe_flash_fwd", q.dtype(), d))?;
        let (nq, nk) = (b * heads * t * d, b * kv_heads * t * d);
        let cfg = config((t.div_ceil(BLOCK_Q), heads, b));
        let (h32, kv32, t32) = (heads as i32, kv_heads as i32, t as i32);
        let ms = sm.as_cuda_slice::<f32>()?.slice(om..om + b * t);
        // SAFETY: every row < t of every (sequence, head) is written by its block.
        let lse = unsafe { dev.alloc::<f32>(b * heads * t)? };
        macro_rules! run {
            ($ty:ty) => {{
                let qs = sq.as_cuda_slice::<$ty>()?.slice(oq..oq + nq);
                let kss = sk.as_cuda_slice::<$ty>()?.slice(ok..ok + nk);
                let vs = sv.as_cuda_slice::<$ty>()?.slice(ov..ov + nk);
                // SAFETY: as above.
                let out = unsafe { dev.alloc::<$ty>(nq)? };
                // SAFETY: arguments in the kernel's order and types; blocks index rows < t only.
                unsafe { launch!(func, cfg, [&qs, &kss, &vs, &ms, &out, &lse, &h32, &kv32, &t32, &scale]) }?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = for_float_dtype!(q.dtype(), run);
        let lse = CudaStorage::wrap_cuda_slice(lse, dev.clone());
        Ok((wrap(out, &[b, heads, t, d]), wrap(lse, &[b, heads, t])))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        lse: &Tensor,
        delta: &Tensor,
        dout: &Tensor,
        dims: Dims,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let Dims { b, heads, kv_heads, t, d } = dims;
        if !supports(q.dtype(), d) || [k.dtype(), v.dtype(), dout.dtype()].iter().any(|&x| x != q.dtype()) {
            candle_core::bail!(
                "flash attention backward: {:?} with head_dim {d} is not supported (bf16 or f16; 64 or 128)",
                q.dtype()
            );
        }
        let mask = mask.to_dtype(DType::F32)?.contiguous()?;
        let (lse, delta) = (lse.to_dtype(DType::F32)?.contiguous()?, delta.to_dtype(DType::F32)?.contiguous()?);
        let (q, k, v, dout) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, dout.contiguous()?);
        let ((sq, oq), (sk, ok), (sv, ov), (sg, og)) =
            (view(&q, "q")?, view(&k, "k")?, view(&v, "v")?, view(&dout, "dout")?);
        let ((sm, om), (sl, ol), (sd, od)) = (view(&mask, "mask")?, view(&lse, "lse")?, view(&delta, "delta")?);
        let (sq, sk, sv, sg) = (cuda(&sq)?, cuda(&sk)?, cuda(&sv)?, cuda(&sg)?);
        let (sm, sl, sd) = (cuda(&sm)?, cuda(&sl)?, cuda(&sd)?);
        let dev = &sq.device;
        let dq_fn = MODULE.kernel(dev, &kernel_name("pipe_flash_bwd_dq", q.dtype(), d))?;
        let kv_fn = MODULE.kernel(dev, &kernel_name("pipe_flash_bwd_dkdv", q.dtype(), d))?;
        let (nq, nk, rows) = (b * heads * t * d, b * kv_heads * t * d, b * heads * t);
        let (h32, kv32, t32) = (heads as i32, kv_heads as i32, t as i32);
        let ms = sm.as_cuda_slice::<f32>()?.slice(om..om + b * t);
        let ls = sl.as_cuda_slice::<f32>()?.slice(ol..ol + rows);
        let dls = sd.as_cuda_slice::<f32>()?.slice(od..od + rows);
        macro_rules! run {
            ($ty:ty) => {{
                let qs = sq.as_cuda_slice::<$ty>()?.slice(oq..oq + nq);
                let kss = sk.as_cuda_slice::<$ty>()?.slice(ok..ok + nk);
                let vs = sv.as_cuda_slice::<$ty>()?.slice(ov..ov + nk);
                let gs = sg.as_cuda_slice::<$ty>()?.slice(og..og + nq);
                // SAFETY: every row < t of each output is written by exactly one block.
                let (dq, dk, dv) = unsafe { (dev.alloc::<$ty>(nq)?, dev.alloc::<$ty>(nk)?, dev.alloc::<$ty>(nk)?) };
                // SAFETY: arguments in the kernels' order and types; blocks index rows < t only.
                unsafe {
                    launch!(
                        dq_fn,
                        config((t.div_ceil(BLOCK_Q), heads, b)),
                        [&qs, &kss, &vs, &ms, &ls, &dls, &gs, &dq, &h32, &kv32, &t32, &scale]
                    )?;
                    launch!(
                        kv_fn,
                        config((t.div_ceil(BLOCK_K), kv_heads, b)),
                        [&qs, &kss, &vs, &ms, &ls, &dls, &gs, &dk, &dv, &h32, &kv32, &t32, &scale]
                    )?;
                }
                (
                    CudaStorage::wrap_cuda_slice(dq, dev.clone()),
                    CudaStorage::wrap_cuda_slice(dk, dev.clone()),
                    CudaStorage::wrap_cuda_slice(dv, dev.clone()),
                )
            }};
        }
        let (dq, dk, dv) = for_float_dtype!(q.dtype(), run);
        Ok((wrap(dq, &[b, heads, t, d]), wrap(dk, &[b, kv_heads, t, d]), wrap(dv, &[b, kv_heads, t, d])))
    }
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

    #[test]
    fn the_tensor_api_keeps_the_dtype_and_names_a_bad_shape() {
        let dev = Device::Cpu;
        let (b, heads, kv, t, d) = (2, 4, 2, 9, 64);
        let q = Tensor::from_vec(pattern(b * heads * t * d, 1), (b, heads, t, d), &dev).unwrap();
        let k = Tensor::from_vec(pattern(b * kv * t * d, 2), (b, kv, t, d), &dev).unwrap();
        let v = Tensor::from_vec(pattern(b * kv * t * d, 3), (b, kv, t, d), &dev).unwrap();
        let mask = Tensor::new(&[[1u32; 9], [0, 0, 1, 1, 1, 1, 1, 1, 1]], &dev).unwrap();
        let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
        let (out, lse) = attention_forward(&bf(&q), &bf(&k), &bf(&v), &mask, 0.125).unwrap();
        assert_eq!((out.dims(), out.dtype()), (&[b, heads, t, d][..], DType::BF16));
        assert_eq!((lse.dims(), lse.dtype()), (&[b, heads, t][..], DType::F32));
        let (dq, dk, dv) = attention_backward(&bf(&q), &bf(&k), &bf(&v), &mask, &out, &lse, &bf(&q), 0.125).unwrap();
        assert_eq!((dq.dtype(), dk.dims(), dv.dims()), (DType::BF16, &[b, kv, t, d][..], &[b, kv, t, d][..]));
        // Three query heads cannot share two KV heads; a mask of the wrong length is named.
        let q3 = q.narrow(1, 0, 3).unwrap().contiguous().unwrap();
        assert!(attention_forward(&q3, &k, &v, &mask, 0.125)
            .unwrap_err()
            .to_string()
            .contains("multiple of 2 KV heads"));
        let short = mask.narrow(1, 0, 8).unwrap();
        assert!(attention_forward(&q, &k, &v, &short, 0.125).unwrap_err().to_string().contains("mask [2, 8]"));
    }
}
