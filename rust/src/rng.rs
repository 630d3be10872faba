//! Counter-based random numbers: every draw is a pure function of its key, so a resumed run, another
//! batch split or another worker count draws the same numbers. The Python reference is
//! `python/smdm/rng.py`; both must agree bit for bit (tests check it).
//!
//! key(w0, w1, ..., wn) = fold of `h = splitmix64(h ^ w)` starting from h = 0.
//! uniform(h) = (h >> 11) * 2^-53, a double in [0, 1).

/// SplitMix64 finaliser (Steele, Lea, Flood 2014): a bijection on u64 with full avalanche.
#[inline(always)]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of a sequence of words: h = 0; for w in words: h = splitmix64(h ^ w).
#[inline]
pub fn key(words: &[u64]) -> u64 {
    words.iter().fold(0u64, |h, &w| splitmix64(h ^ w))
}

/// A double in [0, 1) from the top 53 bits.
#[inline(always)]
pub fn uniform(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Stream ids: the 4th key word, so draws for different purposes never collide.
pub mod stream {
    pub const TIME: u64 = 1; // t per sample: key(seed, step, sample, TIME, 0)
    pub const STRATIFIED: u64 = 2; // shared offset u of stratified t: key(seed, step, 0, STRATIFIED, 0)
    pub const TOKEN: u64 = 3; // token j of a sample: splitmix64(key(seed, step, sample, TOKEN) ^ j)
    pub const CROP: u64 = 4; // random-length crop: key(seed, step, 0, CROP, 0) and (.., 1)
    pub const UNCOND: u64 = 5; // prompt drop for CFG training: key(seed, step, sample, UNCOND, 0)
    pub const GUMBEL: u64 = 6; // sampler noise: splitmix64(key(seed, step, position, GUMBEL) ^ vocab_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_known_values() {
        // Reference values of the SplitMix64 generator seeded with 0: the first outputs of
        // `state += golden; mix(state)` are splitmix64(0), splitmix64(golden), ...
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn uniform_in_unit_interval() {
        assert_eq!(uniform(0), 0.0);
        assert!(uniform(u64::MAX) < 1.0);
    }

    #[test]
    fn key_depends_on_order() {
        assert_ne!(key(&[1, 2]), key(&[2, 1]));
    }
}
