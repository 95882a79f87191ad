//! What one work item of CPU paged attention (`paged_attention`) is: the element types it
//! reads, the keys and queries it covers, and the layout of its partial result. The kernels
//! that attend an item are in attention_tile.rs (portable) and attention_avx512.rs.

/// Keys per tile: one 512-bit register of fp32 scores.
pub const TILE: usize = 16;

/// An element the kernel reads and writes: fp32, or bf16 held as its bits.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Whether the type is [`Bf16`] (the SIMD loaders convert by shifting its bits).
    const IS_BF16: bool;
    /// The value as fp32 (exact for both types).
    fn to_f32(self) -> f32;
    /// The fp32 value rounded to this type (round to nearest even, as torch rounds).
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    const IS_BF16: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

/// A bfloat16 value as its 16 bits (the top half of the fp32 with the same value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Elem for Bf16 {
    const IS_BF16: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        if x.is_nan() {
            return Bf16(0x7fc0);
        }
        let bits = x.to_bits();
        let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
        Bf16((rounded >> 16) as u16)
    }
}

/// The keys one work item reads: KV heads `kv_lo..kv_lo + kv_count` of one request, keys
/// `key_lo..key_hi`.
pub struct ItemKeys<'a, T> {
    /// The layer's K cache, [NB, B, NKV, D] flat.
    pub k_cache: &'a [T],
    /// The layer's V cache, same layout.
    pub v_cache: &'a [T],
    /// This request's row of the block table (cache block of each B keys).
    pub block_table: &'a [i32],
    /// Tokens per cache block (B).
    pub block_size: usize,
    /// KV heads per token (NKV).
    pub num_kv_heads: usize,
    /// First KV head attended with.
    pub kv_lo: usize,
    /// KV heads attended with (all of them for a decode, so a block's rows are read in order).
    pub kv_count: usize,
    /// Head dimension (D).
    pub head_dim: usize,
    /// First key position covered.
    pub key_lo: usize,
    /// One past the last key position covered.
    pub key_hi: usize,
}

impl<T> ItemKeys<'_, T> {
    /// Element offsets in the cache of keys `first..first + out.len()` (at most a tile), head 0.
    /// One division per run instead of one per key: per-key `/` and `%` by the block size took
    /// half of a decode tile's time (measured on the 2-core EPYC).
    #[inline(always)]
    pub fn key_offsets(&self, first: usize, out: &mut [usize]) {
        let stride = self.num_kv_heads * self.head_dim;
        let (mut column, mut offset) = (first / self.block_size, first % self.block_size);
        let mut block_row = self.block_table[column] as usize * self.block_size;
        for (i, slot) in out.iter_mut().enumerate() {
            if i > 0 && offset == self.block_size {
                column += 1;
                offset = 0;
                block_row = self.block_table[column] as usize * self.block_size;
            }
            *slot = (block_row + offset) * stride;
            offset += 1;
        }
    }
}

/// The query side of one work item: `rows` consecutive positions x `kv_count` x `group` heads.
pub struct ItemQueries<'a> {
    /// Query vectors, scaled, fp32: [rows, kv_count, group, D] (a token's heads are adjacent).
    pub q: &'a [f32],
    /// Query rows (consecutive positions).
    pub rows: usize,
    /// Query heads sharing one KV head (G = NH / NKV).
    pub group: usize,
    /// Position of the first row.
    pub first_pos: usize,
    /// Sliding window W: a row at position p sees keys j with p - j < W.
    pub window: Option<usize>,
}

impl ItemQueries<'_> {
    /// The keys of `j_lo..j_hi` that row `r` sees (at or before its position, inside the
    /// window), as a range; None if it sees none of them.
    #[inline(always)]
    pub fn visible(&self, r: usize, j_lo: usize, j_hi: usize) -> Option<(usize, usize)> {
        let pos = self.first_pos + r;
        let lo = self
            .window
            .map_or(0, |w| (pos + 1).saturating_sub(w))
            .max(j_lo);
        let hi = (pos + 1).min(j_hi);
        (lo < hi).then_some((lo, hi))
    }
}

/// An item's partial result `out` = [M*D acc | M max | M sum] split into its three parts and
/// reset for accumulation (acc and sum 0, max -inf).
pub fn reset_partials(out: &mut [f32], m: usize, d: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let (acc, stats) = out.split_at_mut(m * d);
    let (maxes, sums) = stats.split_at_mut(m);
    acc.fill(0.0);
    maxes.fill(f32::NEG_INFINITY);
    sums.fill(0.0);
    (acc, maxes, sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(Bf16::from_f32(1.0).0, 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(Bf16::from_f32(1.0 + 1.0 / 256.0).0, 0x3f80);
        assert_eq!(Bf16::from_f32(1.0 + 3.0 / 256.0).0, 0x3f82);
        assert_eq!(Bf16(0xc0a0).to_f32(), -5.0);
        assert!(Bf16::from_f32(f32::NAN).to_f32().is_nan());
    }
}
