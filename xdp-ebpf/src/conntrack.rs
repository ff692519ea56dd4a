//! Connection tracking: remembers each flow's backend so that established
//! flows keep it when the Maglev table changes.

use xdp_common::{Backend, Flow, FlowKey};

use crate::maps::{BACKENDS, FLOWS};

/// What the flow table knows about a packet's flow.
pub enum Lookup {
    /// Established, and its backend still accepts it (active, or draining:
    /// draining keeps established flows).
    Hit(u32, &'static Backend),
    /// Established, but its backend was removed or went down: re-pick.
    Stale,
    /// Not in the table: a new flow.
    Miss,
}

#[inline(always)]
pub fn lookup(key: &FlowKey) -> Lookup {
    let Some(flow) = FLOWS.get_ptr(key) else {
        return Lookup::Miss;
    };
    // SAFETY: the value pointer stays valid for this program run (RCU).
    let id = unsafe { (*flow).backend };
    match BACKENDS.get(id) {
        Some(b) if b.is_live() => Lookup::Hit(id, b),
        _ => Lookup::Stale,
    }
}

/// Pins the flow to `backend`. A full table evicts its least recently used
/// entry (LRU), so insertion only fails on a kernel error, which leaves the
/// flow untracked: its next packet is hashed again, to the same backend
/// unless the table changed meanwhile.
#[inline(always)]
pub fn pin(key: &FlowKey, backend: u32) {
    let _ = FLOWS.insert(key, &Flow { backend, flags: 0 }, 0);
}
