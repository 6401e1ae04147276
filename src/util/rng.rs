//! The project's one seeded generator: SplitMix64 (Steele, Lea & Flood 2014; the seeding generator
//! of xoshiro) and the derivation of independent streams from (seed, purpose).
//!
//! Everything random in a pipeline goes through here: the split's shuffle (which decides split
//! membership and so every downstream cache key), random model initialisation, LoRA initialisation
//! and dropout masks, the training batch order and random sweep draws. The generator is written out
//! rather than taken from `rand` so that a seed means the same numbers on every platform and under
//! every dependency upgrade; any change to a function here changes trained models and cache keys.

/// SplitMix64's increment, the golden ratio in 64-bit fixed point.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function (a variant of MurmurHash3's finaliser): a bijection on u64 that
/// mixes every input bit into every output bit.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The value at position `index` of the sequence a zero-seeded [`SplitMix64`] walks, computed
/// without stepping (its state after `index` steps is `index · γ`), so that many draws can be
/// taken in parallel or replayed from a saved counter.
pub fn at_counter(index: u64) -> u64 {
    mix64(index.wrapping_mul(GAMMA))
}

/// A SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A generator for one purpose, independent of the others drawn from the same seed: see
    /// [`stream`].
    pub fn stream(seed: u64, purpose: &str, index: u64) -> Self {
        SplitMix64(stream(seed, purpose, index))
    }

    /// A generator keyed by (seed, name), e.g. one per tensor, so that a tensor's values do not
    /// depend on which other tensors are drawn: see [`keyed`].
    pub fn keyed(seed: u64, name: &str) -> Self {
        SplitMix64(keyed(seed, name))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix64(self.0)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in (0, 1], never 0, for a draw whose logarithm is taken (Box–Muller).
    pub fn next_f64_nonzero(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` without modulo bias (Lemire's multiply-and-reject).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0): empty range");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Fisher–Yates, from the last element down.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A generator state derived from a seed, a purpose and an index (an epoch, a micro-batch), so that
/// streams for different purposes do not overlap: the first 8 bytes of blake3(seed ‖ purpose ‖
/// index), little-endian.
pub fn stream(seed: u64, purpose: &str, index: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(purpose.as_bytes());
    h.update(&index.to_le_bytes());
    first_u64(h)
}

/// A generator state derived from a seed and a name: the first 8 bytes of blake3(seed ‖ name),
/// little-endian. (No index, unlike [`stream`]: the per-tensor initialisations were keyed this way
/// before the streams had indices, and trained models depend on it.)
pub fn keyed(seed: u64, name: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(name.as_bytes());
    first_u64(h)
}

fn first_u64(h: blake3::Hasher) -> u64 {
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_splitmix64() {
        // Vigna's splitmix64.c seeded with 0 and with 1234567.
        let mut r = SplitMix64::new(0);
        assert_eq!(
            [r.next_u64(), r.next_u64(), r.next_u64()],
            [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F]
        );
        let mut r = SplitMix64::new(1_234_567);
        assert_eq!(
            [r.next_u64(), r.next_u64(), r.next_u64()],
            [6_457_827_717_110_365_317, 3_203_168_211_198_807_973, 9_817_491_932_198_370_423]
        );
    }

    #[test]
    fn the_counter_form_walks_the_zero_seeded_sequence() {
        let mut r = SplitMix64::new(0);
        for i in 1..=100 {
            assert_eq!(at_counter(i), r.next_u64());
        }
        assert_eq!(at_counter(0), 0);
    }

    /// The derived states decide batch orders, dropout masks and initial weights: pinned, so a
    /// change that would alter trained models cannot pass unnoticed.
    #[test]
    fn derived_states_are_pinned() {
        assert_eq!(stream(11, "epoch order", 2), 0x215b_552b_5f31_a2d4);
        assert_eq!(stream(7, "lora dropout", 0), 0x2653_466b_c4e0_86ed);
        assert_eq!(keyed(3, "model.embed_tokens.weight"), 0x37c3_fda8_c558_82ac);
        assert_eq!(SplitMix64::stream(11, "epoch order", 2).next_u64(), 0xa775_3271_9245_c1a1);
        assert_eq!(SplitMix64::keyed(3, "model.embed_tokens.weight").next_u64(), 0x3d70_4cfb_53d6_dd35);
        assert_ne!(stream(11, "epoch order", 2), stream(11, "epoch order", 3));
        assert_ne!(stream(11, "epoch order", 2), stream(11, "lora dropout", 2));
    }

    #[test]
    fn bounded_draws_and_shuffles_are_deterministic_and_in_range() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        let draws: Vec<u64> = (0..1000).map(|_| a.below(10)).collect();
        assert!(draws.iter().all(|&d| d < 10));
        assert!((0..10).all(|v| draws.contains(&v)));
        assert_eq!(draws, (0..1000).map(|_| b.below(10)).collect::<Vec<_>>());
        let mut xs: Vec<usize> = (0..100).collect();
        SplitMix64::new(7).shuffle(&mut xs);
        assert_ne!(xs, (0..100).collect::<Vec<_>>());
        let mut sorted = xs.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        let mut r = SplitMix64::new(3);
        for _ in 0..1000 {
            let (u, v) = (r.next_f64(), r.next_f64_nonzero());
            assert!((0.0..1.0).contains(&u) && v > 0.0 && v <= 1.0);
        }
    }
}
