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
