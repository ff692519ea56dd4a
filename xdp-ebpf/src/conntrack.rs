//! Connection tracking: remembers each flow's backend so that established
//! flows keep it when the Maglev table changes.

use xdp_common::{Backend, Flow, FlowKey, FLOW_F_CONFIRMED};

use crate::maps::{BACKENDS, FLOWS};

/// What the flow table knows about a packet's flow.
pub enum Lookup {
    /// Established, and its backend still accepts it (active, or draining:
    /// draining keeps established flows); the flow's entry.
    Hit(u32, &'static Backend, *mut Flow),
    /// Established, but its backend was removed or went down: re-pick.
    Stale,
    /// Not in the table: a new flow.
    Miss,
}

#[inline(always)]
pub fn lookup(key: &FlowKey) -> Lookup {
    let Some(flow) = FLOWS.get_ptr_mut(key) else {
        return Lookup::Miss;
    };
    // SAFETY: the value pointer stays valid for this program run (RCU).
    let id = unsafe { (*flow).backend };
    match BACKENDS.get(id) {
        Some(b) if b.is_live() => Lookup::Hit(id, b, flow),
        _ => Lookup::Stale,
    }
}

/// Pins the flow to `backend`. A full table evicts its least recently used
/// entry (LRU), so insertion only fails on a kernel error, which leaves the
/// flow untracked: its next packet is hashed again, to the same backend
/// unless the table changed meanwhile.
#[inline(always)]
pub fn pin(key: &FlowKey, backend: u32, flags: u32) {
    let _ = FLOWS.insert(key, &Flow { backend, flags }, 0);
}

/// Whether the flow's client was seen answering (a second packet).
#[inline(always)]
pub fn confirmed(flow: *mut Flow) -> bool {
    // SAFETY: the value pointer stays valid for this program run (RCU).
    unsafe { (*flow).flags & FLOW_F_CONFIRMED != 0 }
}

/// Marks the flow confirmed (a racing write of the same bit on another
/// CPU is harmless).
#[inline(always)]
pub fn confirm(flow: *mut Flow) {
    // SAFETY: as above.
    unsafe { (*flow).flags |= FLOW_F_CONFIRMED };
}
