//! The deterministic random draws of the library (SplitMix64): the same numbers on every
//! machine and thread count, independent of burn's process-global generator, for everything
//! that must be reproducible from a seed (initial sparse structures, data orders, sampling).

use std::collections::HashSet;

/// The next SplitMix64 output of `state` (advanced).
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stream seed for `path` (a module path) under `seed`: FNV-1a of the path mixed with the
/// seed, so that every layer draws its own numbers.
pub fn path_seed(path: &str, seed: u64) -> u64 {
    let h = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A permutation of `0..n` from `seed` (Fisher-Yates driven by SplitMix64).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, (splitmix64(&mut state) % (i as u64 + 1)) as usize);
    }
    order
}

/// A uniform random subset of `k` flat indices in `[0, numel)`, sorted, deterministic in
/// `(path, seed)`, in O(k) memory (Floyd's sampling).
///
/// # Panics
/// If `k > numel`.
pub fn random_indices(path: &str, seed: u64, numel: usize, k: usize) -> Vec<u64> {
    assert!(k <= numel, "{k} indices out of {numel}");
    let mut state = path_seed(path, seed);
    let n = numel as u64;
    let mut chosen = HashSet::with_capacity(k);
    for j in n - k as u64..n {
        let t = splitmix64(&mut state) % (j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut out: Vec<u64> = chosen.into_iter().collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_a_fixed_function_of_the_seed() {
        // SplitMix64's published first output for state 0.
        assert_eq!(splitmix64(&mut 0), 0xE220_A839_7B1D_CDAF);
        let mut order = shuffled(10, 7);
        assert_eq!(order, shuffled(10, 7));
        assert_ne!(order, shuffled(10, 8));
        order.sort_unstable();
        assert_eq!(order, (0..10).collect::<Vec<_>>());
        let idx = random_indices("a.b", 3, 100, 10);
        assert_eq!(idx.len(), 10);
        assert!(idx.windows(2).all(|w| w[0] < w[1]) && idx[9] < 100);
        assert_ne!(idx, random_indices("a.c", 3, 100, 10));
    }
}
