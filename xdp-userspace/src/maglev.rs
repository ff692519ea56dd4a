//! Maglev lookup-table builder (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016, section 3.4), with weights.
//!
//! Each backend walks its own permutation of the table's slots, derived from
//! its key, and the backends take turns claiming the next free slot of their
//! permutation until the table is full. Because a backend's permutation
//! depends only on its own key, adding or removing one backend leaves most
//! slots with their owner (the paper's "minimal disruption"), and because the
//! turns are round-robin, equal backends get counts that differ by at most
//! one slot. Weights scale how often a backend takes its turn.

/// One backend as the table builder sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Stable identity (e.g. "10.0.0.11:80"): it alone fixes the backend's
    /// permutation, so the same key lands on mostly the same slots in every
    /// rebuild, whatever the backend's `id` or position in the list.
    pub key: String,
    /// The value written into the backend's slots.
    pub id: u32,
    /// Relative share of the slots; 0 takes the backend out of the table.
    pub weight: u32,
}

/// Why a table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MaglevError {
    /// The permutations only cover every slot when the size is prime.
    #[error("table size {0} is not a prime")]
    NotPrime(u32),
    /// Every backend with weight > 0 needs at least one slot.
    #[error("table size {0} is smaller than the number of backends with weight > 0 ({1})")]
    TooSmall(u32, usize),
    /// Two backends with one key would share a permutation, and the order
    /// between them (hence the table) would depend on the input order.
    #[error("duplicate backend key {0}")]
    DuplicateKey(String),
}

/// Seeds of the two hashes of a key: the slot a backend's permutation starts
/// at and its stride. They must be distinct so the two are independent.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b; // "maglevsk"

/// Builds a table of `size` slots, each holding the `id` of a backend.
///
/// `size` must be prime. Backends with weight 0 get no slots; if no backend
/// has weight > 0 the table is empty. Shares are proportional to weight, and
/// the result does not depend on the order of `backends`.
pub fn build(backends: &[MaglevBackend], size: u32) -> Result<Vec<u32>, MaglevError> {
    // Sorting by key makes the turn order, hence the table, independent of
    // the input order.
    let mut sorted: Vec<&MaglevBackend> = backends.iter().collect();
    sorted.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    if let Some(pair) = sorted.windows(2).find(|p| p[0].key == p[1].key) {
        return Err(MaglevError::DuplicateKey(pair[0].key.clone()));
    }
    if !is_prime(size) {
        return Err(MaglevError::NotPrime(size));
    }
    sorted.retain(|b| b.weight > 0);
    if sorted.is_empty() {
        return Ok(Vec::new());
    }
    if (size as usize) < sorted.len() {
        return Err(MaglevError::TooSmall(size, sorted.len()));
    }

    let m = u64::from(size);
    // Per backend: the next slot of its permutation and its stride. The
    // permutation is (offset + j * skip) % m for j = 0, 1, ...; keeping the
    // current slot and adding `skip` yields the same sequence without a
    // division per probe. With m prime and 1 <= skip < m it visits every slot
    // once in m steps, so a backend always finds a free slot.
    let mut next: Vec<u32> = sorted
        .iter()
        .map(|b| (hash64(b.key.as_bytes(), OFFSET_SEED) % m) as u32)
        .collect();
    let skip: Vec<u32> = sorted
        .iter()
        .map(|b| (hash64(b.key.as_bytes(), SKIP_SEED) % (m - 1) + 1) as u32)
        .collect();
    // Weighted turns: every round each backend earns its weight in credit and
    // takes a slot when the credit reaches the largest weight. The heaviest
    // backends take a slot every round, a backend of weight w in w/max of the
    // rounds, and equal weights alternate strictly. Credit never exceeds
    // 2 * max - 1 after earning, so one `if` is enough per round.
    let max_weight = sorted
        .iter()
        .map(|b| u64::from(b.weight))
        .max()
        .unwrap_or(1);
    let mut credit = vec![0u64; sorted.len()];

    // Slots first hold the index into `sorted`; EMPTY cannot be an index
    // because there are at most `size` <= u32::MAX backends.
    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; size as usize];
    let mut filled: u64 = 0;
    'fill: loop {
        for (i, b) in sorted.iter().enumerate() {
            credit[i] += u64::from(b.weight);
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let mut slot = next[i];
            while table[slot as usize] != EMPTY {
                slot = advance(slot, skip[i], m);
            }
            table[slot as usize] = i as u32;
            next[i] = advance(slot, skip[i], m);
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    for slot in &mut table {
        *slot = sorted[*slot as usize].id;
    }
    Ok(table)
}

/// The slot after `slot` in a permutation of stride `skip` over `m` slots.
#[inline]
fn advance(slot: u32, skip: u32, m: u64) -> u32 {
    // u64 because slot + skip can exceed u32::MAX for sizes above 2^31.
    let s = u64::from(slot) + u64::from(skip);
    (if s >= m { s - m } else { s }) as u32
}

/// Whether `n` is prime (trial division: at most ~2^16 steps for a u32,
/// and only run once per table build).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// 64-bit FNV-1a of `bytes` started from a seeded state, then the
/// MurmurHash3 finalizer. Written out rather than taken from `std::hash`
/// because tables must be identical across builds and Rust releases (std's
/// DefaultHasher promises neither); the finalizer spreads every input bit
/// over the output so the two seeded hashes of one key are unrelated.
fn hash64(bytes: &[u8], seed: u64) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const M: u32 = 65537;

    /// `n` backends of weight 1, with ids unlike their indexes so a mix-up
    /// between the two would show.
    fn equal(n: usize) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                key: format!("10.0.{}.{}:80", i / 256, i % 256),
                id: 1000 + i as u32,
                weight: 1,
            })
            .collect()
    }

    fn counts(table: &[u32]) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for &id in table {
            *c.entry(id).or_insert(0) += 1;
        }
        c
    }

    #[test]
    fn every_slot_filled() {
        for (size, ns) in [
            (251u32, &[1usize, 2, 7, 100, 251][..]),
            (M, &[1, 3, 10, 1000][..]),
        ] {
            for &n in ns {
                let backends = equal(n);
                let table = build(&backends, size).unwrap();
                assert_eq!(table.len(), size as usize);
                let c = counts(&table);
                // Every slot holds a real id and every backend has a slot.
                assert_eq!(c.len(), n, "size {size}, n {n}");
                assert!(backends.iter().all(|b| c.contains_key(&b.id)));
            }
        }
    }

    #[test]
    fn equal_weights_share_within_one_percent() {
        for n in [3usize, 10, 100, 655] {
            let table = build(&equal(n), M).unwrap();
            let ideal = f64::from(M) / n as f64;
            let worst = counts(&table)
                .values()
                .map(|&c| (c as f64 - ideal).abs() / ideal)
                .fold(0.0, f64::max);
            println!("n {n}: worst relative deviation {worst:.5}");
            assert!(worst <= 0.01, "n {n}: deviation {worst}");
        }
    }

    #[test]
    fn removing_one_backend_moves_few_other_slots() {
        for n in [10usize, 100] {
            let before_backends = equal(n);
            let removed = before_backends[n / 2].id;
            let after_backends: Vec<_> = before_backends
                .iter()
                .filter(|b| b.id != removed)
                .cloned()
                .collect();
            let before = build(&before_backends, M).unwrap();
            let after = build(&after_backends, M).unwrap();
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(old, new)| **old != removed && old != new)
                .count();
            let fraction = moved as f64 / f64::from(M);
            println!("n {n}: {moved} other slots moved ({fraction:.5} of the table)");
            assert!(fraction <= 0.01, "n {n}: {fraction} of the slots moved");
        }
    }

    #[test]
    fn weights_give_proportional_shares() {
        let mut backends: Vec<_> = (1..=4u32)
            .map(|w| MaglevBackend {
                key: format!("b{w}"),
                id: w,
                weight: w,
            })
            .collect();
        backends.push(MaglevBackend {
            key: "idle".into(),
            id: 99,
            weight: 0,
        });
        let table = build(&backends, M).unwrap();
        let c = counts(&table);
        assert!(!c.contains_key(&99));
        for w in 1..=4u32 {
            let share = c[&w] as f64 / f64::from(M);
            let want = f64::from(w) / 10.0;
            assert!((share - want).abs() <= 0.01, "weight {w}: share {share}");
        }
    }

    #[test]
    fn input_order_does_not_matter() {
        let mut backends = equal(100);
        backends[7].weight = 5;
        let want = build(&backends, M).unwrap();
        // xorshift64 driving a Fisher-Yates shuffle.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5 {
            for i in (1..backends.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                backends.swap(i, (state % (i as u64 + 1)) as usize);
            }
            assert_eq!(build(&backends, M).unwrap(), want);
        }
    }

    #[test]
    fn bad_input_is_rejected() {
        let err = |n, size| build(&equal(n), size).err();
        assert!(matches!(err(3, 65536), Some(MaglevError::NotPrime(65536))));
        assert!(matches!(err(3, 1), Some(MaglevError::NotPrime(1))));
        assert!(matches!(err(8, 7), Some(MaglevError::TooSmall(7, 8))));
        let mut dup = equal(3);
        dup[2].key = dup[0].key.clone();
        assert!(matches!(build(&dup, M), Err(MaglevError::DuplicateKey(_))));
    }

    #[test]
    fn no_weighted_backend_gives_empty_table() {
        assert_eq!(build(&[], M).unwrap(), Vec::<u32>::new());
        let mut idle = equal(3);
        idle.iter_mut().for_each(|b| b.weight = 0);
        assert_eq!(build(&idle, M).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        for p in [251, 65537, 131071, 1_048_573, 4_294_967_291] {
            assert!(is_prime(p), "{p}");
        }
        for c in [65535, 1_048_575, 4_294_967_295, 65521 * 65521] {
            assert!(!is_prime(c), "{c}");
        }
    }

    /// Pins the key hash (values checked against an independent Python
    /// implementation): a change would silently remap every service's table
    /// on upgrade.
    #[test]
    fn hash_is_stable() {
        let hash = |seed| hash64(b"10.0.0.11:80", seed);
        assert_eq!(hash(OFFSET_SEED), 13_755_648_692_792_765_667);
        assert_eq!(hash(SKIP_SEED), 6_487_596_998_330_045_596);
    }

    /// Not a test: prints build times. Run with
    /// `cargo test --release -p xdp-userspace --lib maglev -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn print_build_time() {
        for (size, n) in [(M, 100usize), (M, 1000), (131_071, 1000), (1_048_573, 1000)] {
            let backends = equal(n);
            let runs = 20u32;
            let start = std::time::Instant::now();
            for _ in 0..runs {
                std::hint::black_box(build(std::hint::black_box(&backends), size).unwrap());
            }
            let per_build = start.elapsed() / runs;
            println!("size {size}, {n} backends: {per_build:?} per build");
        }
    }
}
