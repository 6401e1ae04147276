//! Adding gathered rows' gradients into a row-sparse parameter's f32 accumulator, in place.
//!
//! Why not candle's `index_add`: it is out of place (a copy of the whole accumulator, 620 MB for
//! Qwen3's embedding in f32, per call), and its CUDA kernel runs one thread per column that walks
//! all the ids in sequence, so 8,192 token positions become 8,192 dependent read-add-writes on
//! 1,024 threads. Here the host, which has the ids anyway, sorts the positions by row once
//! ([`Plan`]); the kernel gives each distinct row a block that sums its positions in position
//! order, in f32, and adds the sum into the accumulator: no atomics, so the result does not depend
//! on scheduling, and the CPU loop (the reference) rounds the same way.

use candle_core::{CpuStorage, Device, InplaceOp3, Layout, Result, Tensor, WithDType};

use super::contiguous_start;

/// The positions of a batch grouped by destination row, as one u32 tensor:
/// `[starts (u + 1) | rows (u) | order (n)]`, `u` distinct rows, `n` positions.
pub struct Plan {
    packed: Tensor,
    distinct: usize,
    /// One past the largest destination row.
    end: usize,
}

impl Plan {
    /// `ids[i]` is the destination row of source row `i`.
    pub fn new(ids: &[u32], device: &Device) -> Result<Self> {
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_by_key(|&i| ids[i as usize]); // stable: each row's positions stay in order
        let mut starts = Vec::new();
        let mut rows = Vec::new();
        for (k, &i) in order.iter().enumerate() {
            let id = ids[i as usize];
            if rows.last() != Some(&id) {
                rows.push(id);
                starts.push(k as u32);
            }
        }
        starts.push(order.len() as u32);
        let distinct = rows.len();
        let end = rows.last().map_or(0, |&r| r as usize + 1);
        let packed = [starts, rows, order].concat();
        let n = packed.len();
        Ok(Self { packed: Tensor::from_vec(packed, n, device)?, distinct, end })
    }

    /// `acc[ids[i]] += g[i]` for every row `i` of `g: [n, cols]` (any float dtype), into the
    /// contiguous f32 accumulator `acc: [rows, cols]`.
    pub fn add_into(&self, acc: &Tensor, g: &Tensor) -> Result<()> {
        let rows = acc.dim(0)?;
        if self.end > rows {
            candle_core::bail!("row scatter: row {} is outside the accumulator's {rows} rows", self.end - 1);
        }
        acc.inplace_op3(&g.contiguous()?, &self.packed, &ScatterRows { distinct: self.distinct })
    }
}

struct ScatterRows {
    distinct: usize,
}

/// (acc offset, acc rows, cols, g offset, n, plan offset), checking shapes and dtypes.
fn extents(
    acc: &Layout,
    g: &Layout,
    plan: &Layout,
    distinct: usize,
) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let contiguous = |l: &Layout, what: &str| contiguous_start(l, "row scatter", what);
    let (rows, cols) = acc.shape().dims2()?;
    let (n, gcols) = g.shape().dims2()?;
    if gcols != cols || plan.shape().elem_count() != 2 * distinct + 1 + n {
        candle_core::bail!(
            "row scatter: accumulator {:?}, rows {:?} and a plan of {} do not fit",
            acc.shape(),
            g.shape(),
            plan.shape().elem_count()
        );
    }
    Ok((contiguous(acc, "the accumulator")?, rows, cols, contiguous(g, "the rows")?, n, contiguous(plan, "the plan")?))
}

/// `Plan::add_into` has checked every row against the accumulator.
fn cpu<T: WithDType>(acc: &mut [f32], g: &[T], plan: &[u32], distinct: usize, cols: usize) -> Result<()> {
    let (starts, rest) = plan.split_at(distinct + 1);
    let (ids, order) = rest.split_at(distinct);
    let mut sum = vec![0f32; cols];
    for s in 0..distinct {
        let row = ids[s] as usize;
        sum.iter_mut().for_each(|x| *x = 0.0);
        for &i in &order[starts[s] as usize..starts[s + 1] as usize] {
            let src = &g[i as usize * cols..(i as usize + 1) * cols];
            sum.iter_mut().zip(src).for_each(|(a, b)| *a += b.to_f64() as f32);
        }
        acc[row * cols..(row + 1) * cols].iter_mut().zip(&sum).for_each(|(a, b)| *a += b);
    }
    Ok(())
}

impl InplaceOp3 for ScatterRows {
    fn name(&self) -> &'static str {
        "pipe-scatter-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (a0, rows, cols, g0, n, p0) = extents(l1, l2, l3, self.distinct)?;
        let (CpuStorage::F32(acc), CpuStorage::U32(plan)) = (s1, s3) else {
            candle_core::bail!("row scatter: the accumulator must be f32 and the plan u32");
        };
        let acc = &mut acc[a0..a0 + rows * cols];
        let plan = &plan[p0..p0 + 2 * self.distinct + 1 + n];
        match s2 {
            CpuStorage::F32(g) => cpu(acc, &g[g0..g0 + n * cols], plan, self.distinct, cols),
            CpuStorage::BF16(g) => cpu(acc, &g[g0..g0 + n * cols], plan, self.distinct, cols),
            CpuStorage::F16(g) => cpu(acc, &g[g0..g0 + n * cols], plan, self.distinct, cols),
            _ => candle_core::bail!("row scatter: the rows must be f32, bf16 or f16"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (a0, rows, cols, g0, n, p0) = extents(l1, l2, l3, self.distinct)?;
        if self.distinct == 0 {
            return Ok(());
        }
        cuda::scatter_rows(s1, a0, (rows, cols), s2, g0, s3, p0, n, self.distinct)
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{CudaStorage, Result};

    use crate::kernels::launch::{for_float_dtype, grid, launch, typed_names, Module, FLOAT_TYPES, INSTANCES, THREADS};

    /// A block per distinct row (grid-stride), a thread per column. `F32`, `BF16`, `F16`:
    /// [`FLOAT_TYPES`].
    const SOURCE: &str = r#"
template <typename D>
__device__ void scatter_rows(float* acc, const typename D::S* g, const unsigned int* plan, int u, int rows, int cols) {
  const unsigned int* starts = plan;
  const unsigned int* ids = plan + u + 1;
  const unsigned int* order = plan + 2 * u + 1;
  for (int s = blockIdx.x; s < u; s += gridDim.x) {
    long long row = ids[s];
    if (row >= rows) continue;
    unsigned int b = starts[s], e = starts[s + 1];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
      float sum = 0.0f;
      for (unsigned int j = b; j < e; ++j) sum += D::to(g[(long long)order[j] * cols + c]);
      acc[row * cols + c] += sum;
    }
  }
}
#define KERNELS(NAME, D) \
extern "C" __global__ void pipe_scatter_rows_##NAME(float* acc, const D::S* g, const unsigned int* plan, int u, int rows, int cols) \
  { scatter_rows<D>(acc, g, plan, u, rows, cols); }
"#;

    const SCATTER_ROWS: &str = "pipe_scatter_rows";

    pub static MODULE: Module =
        Module::new("scatter_rows", "row scatter kernel", &[FLOAT_TYPES, SOURCE, INSTANCES], || {
            Ok(typed_names(&[SCATTER_ROWS]))
        });

    /// `g[g0..g0 + n·cols]`'s rows added into `acc[a0..a0 + rows·cols]` by the plan at `p0` of its
    /// `distinct > 0` rows.
    #[allow(clippy::too_many_arguments)]
    pub fn scatter_rows(
        acc: &mut CudaStorage,
        a0: usize,
        (rows, cols): (usize, usize),
        g: &CudaStorage,
        g0: usize,
        plan: &CudaStorage,
        p0: usize,
        n: usize,
        distinct: usize,
    ) -> Result<()> {
        let func = MODULE.typed(&acc.device, SCATTER_ROWS, g.dtype(), "row scatter")?;
        let plan = plan.as_cuda_slice::<u32>()?.slice(p0..p0 + 2 * distinct + 1 + n);
        let mut acc = acc.as_cuda_slice_mut::<f32>()?.slice_mut(a0..a0 + rows * cols);
        let cfg = grid(distinct.min(65_535), THREADS, 0);
        let (u32_, rows32, cols32) = (distinct as i32, rows as i32, cols as i32);
        macro_rules! run {
            ($t:ty) => {{
                let g = g.as_cuda_slice::<$t>()?.slice(g0..g0 + n * cols);
                // SAFETY: arguments in the kernel's order and types; the plan's positions are below
                // n (built by `Plan::new`), and the kernel skips rows at or above `rows`.
                unsafe { launch!(func, cfg, [&mut acc, &g, &plan, &u32_, &rows32, &cols32]) }?;
            }};
        }
        for_float_dtype!(g.dtype(), run);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;

    /// Repeated, unordered ids into an accumulator that already holds values: each row gets the
    /// sum of its positions, other rows are untouched; bf16 rows are widened exactly.
    #[test]
    fn adds_each_position_into_its_row() {
        let dev = Device::Cpu;
        let ids = [3u32, 0, 3, 5, 3, 0];
        let cols = 4;
        let g: Vec<f32> = (0..ids.len() * cols).map(|i| (i as f32 - 7.0) * 0.25).collect();
        for dtype in [DType::F32, DType::BF16] {
            let acc = Tensor::from_vec(vec![1f32; 6 * cols], (6, cols), &dev).unwrap();
            let rows = Tensor::from_vec(g.clone(), (ids.len(), cols), &dev).unwrap().to_dtype(dtype).unwrap();
            Plan::new(&ids, &dev).unwrap().add_into(&acc, &rows).unwrap();
            let mut want = vec![1f32; 6 * cols];
            for (i, &id) in ids.iter().enumerate() {
                for c in 0..cols {
                    want[id as usize * cols + c] += g[i * cols + c];
                }
            }
            assert_eq!(acc.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "{dtype:?}");
        }
    }

    #[test]
    fn a_row_outside_the_accumulator_is_an_error() {
        let dev = Device::Cpu;
        let acc = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let g = Tensor::ones((1, 3), DType::F32, &dev).unwrap();
        let e = Plan::new(&[2], &dev).unwrap().add_into(&acc, &g).unwrap_err().to_string();
        assert!(e.contains("row 2 is outside"), "{e}");
        let e = Plan::new(&[0, 1], &dev).unwrap().add_into(&acc, &g).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
    }
}
