//! Reports pinned flows to the daemon for replication to cluster peers
//! (`xdp_common::replication`). Only on the new-flow and re-pick paths
//! (DSR) and a NAT flow's first answer, and only when replication is on:
//! an established flow's packet never comes here.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use xdp_common::{
    replication::{FlowEvent, COUNTS, COUNT_LOST, COUNT_WRITTEN, EVENTS_BYTES, EVENT_NAT},
    FlowKey, NatFwd,
};

use crate::maps::GLOBALS;

#[map(name = "xdplb_flowev_v2")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

#[map(name = "xdplb_replc_v1")]
static COUNTS_MAP: PerCpuArray<u64> = PerCpuArray::pinned(COUNTS, 0);

/// Reports that `key` is now pinned to backend `id` (DSR).
#[inline(always)]
pub fn pinned(key: &FlowKey, id: u32) {
    report(&FlowEvent {
        key: *key,
        backend: id,
        ..FlowEvent::default()
    });
}

/// Reports NAT translation `f` of `key`, once its backend answered: a
/// flow that never is (a spoofed SYN) is never replicated.
#[inline(always)]
pub fn translated(key: &FlowKey, f: &NatFwd) {
    report(&FlowEvent {
        key: *key,
        backend: f.backend,
        nat_port_be: f.nat_port_be,
        flags: EVENT_NAT,
        snat_addr: f.snat_addr,
        timeout_s: f.timeout_s,
        _pad: 0,
    });
}

/// Writes `event` to the ring when replication is on. A full ring loses
/// the event (counted): the flow still works here, only its peers do not
/// learn it until they next pull a full copy.
#[inline(always)]
fn report(event: &FlowEvent) {
    if !GLOBALS.get(0).is_some_and(|g| g.replicate != 0) {
        return;
    }
    let slot = match EVENTS.output::<FlowEvent>(event, 0) {
        Ok(()) => COUNT_WRITTEN,
        Err(_) => COUNT_LOST,
    };
    if let Some(c) = COUNTS_MAP.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot, only written by this CPU while we run.
        unsafe { *c += 1 };
    }
}
