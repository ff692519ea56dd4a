//! Connection tracking: remembers each flow's backend so that established
//! flows keep it when the Maglev table changes.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use xdp_common::{Backend, Flow, FlowKey, FLOW_F_CONFIRMED, FLOW_F_RETRIED, SYN_RETRANSMITTED_NS};

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
    let flow = Flow {
        backend,
        flags,
        // SAFETY: a plain helper call.
        opened_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    let _ = FLOWS.insert(key, &flow, 0);
}

/// Whether a SYN of this unconfirmed flow is its client's retransmission
/// (see `SYN_RETRANSMITTED_NS`) and the flow was not moved before: the
/// backend did not answer in time, so the flow moves.
#[inline(always)]
pub fn retransmitted(flow: *mut Flow) -> bool {
    // SAFETY: the value pointer stays valid for this program run (RCU).
    let f = unsafe { &*flow };
    f.flags & FLOW_F_RETRIED == 0
        && unsafe { bpf_ktime_get_coarse_ns() }.saturating_sub(f.opened_ns) >= SYN_RETRANSMITTED_NS
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
