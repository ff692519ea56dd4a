//! A short fingerprint of a service's Maglev table, so operators (and
//! tests) can check that every node of a cluster makes the same choices.
//!
//! Local backend ids differ between nodes (they depend on the order
//! backends were added), so the fingerprint hashes each slot's backend by
//! its address and port, never by id: two nodes with the same backends,
//! weights and health show the same fingerprint whatever their ids.

use std::{collections::HashMap, net::SocketAddr};

/// FNV-1a, 64-bit: tiny, stable across builds and platforms (std's
/// `DefaultHasher` promises neither), and good enough to tell tables apart.
fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The fingerprint of `table` (slot -> backend id), naming each id's
/// backend through `addr_of`: 8 hex digits, or `"empty"` for a table with
/// no backend. An id `addr_of` does not know hashes as "unknown", which no
/// real backend matches.
pub fn fingerprint(table: &[u32], addr_of: impl Fn(u32) -> Option<SocketAddr>) -> String {
    if table.is_empty() {
        return "empty".into();
    }
    // Hash each backend's identity once, then fold one word per slot: a
    // status call on a 65,537-slot table costs well under a millisecond.
    let mut per_id: HashMap<u32, u64> = HashMap::new();
    let mut h = fnv1a(FNV_OFFSET, &(table.len() as u64).to_le_bytes());
    for id in table {
        let word = *per_id.entry(*id).or_insert_with(|| match addr_of(*id) {
            Some(a) => fnv1a(FNV_OFFSET, a.to_string().as_bytes()),
            None => fnv1a(FNV_OFFSET, b"unknown"),
        });
        h = fnv1a(h, &word.to_le_bytes());
    }
    format!("{:08x}", (h >> 32) ^ (h & 0xffff_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maglev::{build, MaglevBackend};

    const SIZE: u32 = 65537;

    fn backend(addr: &str, id: u32, weight: u32) -> MaglevBackend {
        MaglevBackend {
            key: addr.into(),
            id,
            weight,
        }
    }

    /// Builds the table and fingerprints it, resolving ids through the
    /// backends given.
    fn print(backends: &[MaglevBackend]) -> String {
        let table = build(backends, SIZE).unwrap();
        fingerprint(&table, |id| {
            backends
                .iter()
                .find(|b| b.id == id)
                .map(|b| b.key.parse().unwrap())
        })
    }

    #[test]
    fn same_backends_in_another_order_with_other_ids_give_the_same_fingerprint() {
        let a = [
            backend("10.0.0.11:80", 0, 1),
            backend("10.0.0.12:80", 1, 2),
            backend("10.0.0.13:80", 2, 1),
        ];
        let b = [
            backend("10.0.0.13:80", 7, 1),
            backend("10.0.0.11:80", 9, 1),
            backend("10.0.0.12:80", 3, 2),
        ];
        assert_eq!(print(&a), print(&b));
        assert_eq!(print(&a).len(), 8);
    }

    #[test]
    fn a_different_weight_or_backend_changes_it() {
        let base = [backend("10.0.0.11:80", 0, 1), backend("10.0.0.12:80", 1, 1)];
        let weight = [backend("10.0.0.11:80", 0, 1), backend("10.0.0.12:80", 1, 2)];
        let port = [backend("10.0.0.11:80", 0, 1), backend("10.0.0.12:81", 1, 1)];
        assert_ne!(print(&base), print(&weight));
        assert_ne!(print(&base), print(&port));
        // The same slots, two backends of one host told apart by port
        // alone (the tables above differ in their slots too).
        let by_port = |id: u32| Some(SocketAddr::from(([10, 0, 0, 11], 80 + id as u16)));
        assert_ne!(fingerprint(&[0, 1], by_port), fingerprint(&[0, 0], by_port));
        assert_eq!(fingerprint(&[], |_| None), "empty");
    }
}
