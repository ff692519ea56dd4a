//! The flow hash that indexes Maglev tables. It lives here, compiled into
//! both the XDP program and the control plane, so `xdplb flow` answers with
//! exactly the backend the datapath picks.
//!
//! It is the MurmurHash3 (x86, 32-bit) block mix and finaliser over a fixed
//! number of 32-bit words: no loops, no tables, a handful of multiplies, which
//! the BPF verifier accepts without bounds reasoning.

use crate::FlowKey;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;
/// Fixed seed: the hash must be the same in every process and across
/// restarts, or a restarted daemon would move flows.
const SEED: u32 = 0x7864_706c; // "xdpl"

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32, len_words: u32) -> u32 {
    h ^= len_words * 4;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a flow's 5-tuple; with `src_only`, of its source address alone
/// (every connection from one client then reaches the same backend).
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, src_only: bool) -> u32 {
    let mut h = SEED;
    h = mix(h, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    if src_only {
        return finish(h, 4);
    }
    h = mix(h, key.dst[0]);
    h = mix(h, key.dst[1]);
    h = mix(h, key.dst[2]);
    h = mix(h, key.dst[3]);
    h = mix(h, (key.sport_be as u32) << 16 | key.dport_be as u32);
    h = mix(h, key.proto as u32);
    finish(h, 10)
}
