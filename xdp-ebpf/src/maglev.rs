//! Backend selection for a new flow: one look-up in the service's active
//! Maglev table, indexed by the flow hash shared with userspace.

use xdp_common::{hash::flow_hash, FlowKey, Service, SVC_F_HASH_SRC_ONLY, SVC_F_NO_BACKEND};

use crate::maps::MAGLEV;

/// The backend id for a new flow, or `None` when the service has no
/// backend that takes new flows.
#[inline(always)]
pub fn pick(service: &Service, key: &FlowKey) -> Option<u32> {
    if service.flags & SVC_F_NO_BACKEND != 0 || service.table_size == 0 {
        return None;
    }
    let hash = flow_hash(key, service.flags & SVC_F_HASH_SRC_ONLY != 0);
    let slot = service.table_base + hash % service.table_size;
    MAGLEV.get(slot).copied()
}

/// Slots tried by [`pick_other`]: a fixed few, never a loop over backends.
const OTHER_PROBES: u32 = 8;

/// A backend other than `avoid` for a flow that `avoid` refused: the first
/// of a few slots at fixed pseudo-random distances from the flow's own
/// that holds another backend (each of them does with probability 1 - the
/// avoided backend's share), else `avoid` again.
#[inline(always)]
pub fn pick_other(service: &Service, key: &FlowKey, avoid: u32) -> Option<u32> {
    if service.flags & SVC_F_NO_BACKEND != 0 || service.table_size == 0 {
        return None;
    }
    let hash = flow_hash(key, service.flags & SVC_F_HASH_SRC_ONLY != 0);
    let mut i = 1;
    while i <= OTHER_PROBES {
        // A prime multiplier (Knuth's 2654435761): the probes land on
        // different slots, with no period a small table shares.
        let at = hash.wrapping_add(i.wrapping_mul(0x9e37_79b1)) % service.table_size;
        if let Some(&id) = MAGLEV.get(service.table_base + at) {
            if id != avoid {
                return Some(id);
            }
        }
        i += 1;
    }
    Some(avoid)
}
