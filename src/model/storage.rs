//! What the custom ops share about the storages candle hands them.

use candle_core::{CpuStorage, Layout, Result};

/// The element range of a contiguous layout (from its start offset); `op` and `what` name the op and
/// its input in the error for any other layout.
pub fn contiguous_range(l: &Layout, op: &str, what: &str) -> Result<std::ops::Range<usize>> {
    l.contiguous_offsets()
        .map(|(start, end)| start..end)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))
}

/// Writes `src` into a float CPU storage from element `start`, rounding to nearest even for 16-bit
/// dtypes (as candle's casts do).
pub fn write_f32(dst: &mut CpuStorage, start: usize, src: &[f32]) -> Result<()> {
    let end = start + src.len();
    match dst {
        CpuStorage::F32(d) => d[start..end].copy_from_slice(src),
        CpuStorage::BF16(d) => d[start..end].iter_mut().zip(src).for_each(|(o, &x)| *o = half::bf16::from_f32(x)),
        CpuStorage::F16(d) => d[start..end].iter_mut().zip(src).for_each(|(o, &x)| *o = half::f16::from_f32(x)),
        _ => candle_core::bail!("writing f32 values into a non-float storage"),
    }
    Ok(())
}
