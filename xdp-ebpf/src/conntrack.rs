//! Connection tracking: remembers each flow's backend so that established
//! flows keep it when the Maglev table changes.
//!
//! Two tables: a TCP flow starts in the small `OPENING` table and moves to
//! `FLOWS` with its client's first packet that is not its SYN again (the
//! client got the backend's answer). A flood of SYNs (or of stray
//! segments) from sources that never answer only churns `OPENING`: the LRU
//! never evicts an established flow to make room for one. UDP flows, which
//! cannot show an answer, go straight to `FLOWS`.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, maps::LruHashMap};
use xdp_common::{
    Backend, Flow, FlowKey, FLOW_F_CONFIRMED, FLOW_F_RETRIED, PROTO_TCP, SYN_RETRANSMITTED_NS,
};

use crate::maps::{BACKENDS, FLOWS, OPENING};

/// Which table a flow is in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `FLOWS`: answered TCP flows, UDP flows, pins replicated by peers.
    Established,
    /// `OPENING`: TCP flows whose client has sent only its first packet.
    Opening,
}

impl Table {
    #[inline(always)]
    fn map(self) -> &'static LruHashMap<FlowKey, Flow> {
        match self {
            Table::Established => &FLOWS,
            Table::Opening => &OPENING,
        }
    }
}

/// What the flow tables know about a packet's flow.
pub enum Lookup {
    /// Known, and its backend still accepts it (active, or draining:
    /// draining keeps established flows); the flow's entry and table.
    Hit(u32, &'static Backend, *mut Flow, Table),
    /// Known, but its backend was removed or went down: re-pick.
    Stale(Table),
    /// In neither table: a new flow.
    Miss,
}

/// Looks the flow up: `FLOWS` first (an established flow's packet pays
/// one look-up, as before), then, for TCP, `OPENING`.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Lookup {
    let (flow, table) = match FLOWS.get_ptr_mut(key) {
        Some(f) => (f, Table::Established),
        None if key.proto == PROTO_TCP => match OPENING.get_ptr_mut(key) {
            Some(f) => (f, Table::Opening),
            None => return Lookup::Miss,
        },
        None => return Lookup::Miss,
    };
    // SAFETY: the value pointer stays valid for this program run (RCU).
    let id = unsafe { (*flow).backend };
    match BACKENDS.get(id) {
        Some(b) if b.is_live() => Lookup::Hit(id, b, flow, table),
        _ => Lookup::Stale(table),
    }
}

/// The table a new (or re-picked) flow goes to: TCP flows start opening.
#[inline(always)]
pub fn table_for(key: &FlowKey) -> Table {
    if key.proto == PROTO_TCP {
        Table::Opening
    } else {
        Table::Established
    }
}

/// Pins the flow to `backend` in `table`. A full table evicts its least
/// recently used entry (LRU), so insertion only fails on a kernel error,
/// which leaves the flow untracked: its next packet is hashed again, to
/// the same backend unless the table changed meanwhile.
#[inline(always)]
pub fn pin(table: Table, key: &FlowKey, backend: u32, flags: u32) {
    let flow = Flow {
        backend,
        flags,
        // SAFETY: a plain helper call.
        opened_ns: unsafe { bpf_ktime_get_coarse_ns() },
    };
    let _ = table.map().insert(key, &flow, 0);
}

/// The client answered: an opening flow moves to `FLOWS`, confirmed.
#[inline(always)]
pub fn promote(key: &FlowKey, flow: *mut Flow) {
    // SAFETY: the value pointer stays valid for this program run (RCU).
    let mut f = unsafe { *flow };
    f.flags |= FLOW_F_CONFIRMED;
    let _ = FLOWS.insert(key, &f, 0);
    let _ = OPENING.remove(key);
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
