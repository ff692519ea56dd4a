//! Per-CPU counters: no atomics needed, userspace sums the CPUs.

use xdp_common::{Counters, Reason, Signals};

use crate::maps::{BACKEND_STATS, REASONS, SERVICE_STATS, SIGNALS};

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add(counters: Option<*mut Counters>, bytes: u64, new_flow: bool) {
    if let Some(c) = counters {
        // SAFETY: as above, a per-CPU slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}

/// Counts a forwarded packet against its service and backend, and, when it
/// is a new flow's first, the new flow. Callers pass `new_flow` as a
/// constant so that, once inlined, an established flow's packet pays
/// nothing for it (no test, no add).
#[inline(always)]
pub fn count_forwarded(service: u32, backend: u32, bytes: u64, new_flow: bool) {
    add(SERVICE_STATS.get_ptr_mut(service), bytes, new_flow);
    add(BACKEND_STATS.get_ptr_mut(backend), bytes, new_flow);
    if new_flow {
        signal(backend, |s| &mut s.opened);
    }
}

/// Counts one of a backend's signals (`Signals`): a rare event per flow
/// (its first answer, a refusal, a retransmitted SYN), never per packet.
#[inline(always)]
pub fn signal(backend: u32, which: fn(&mut Signals) -> &mut u64) {
    if let Some(s) = SIGNALS.get_ptr_mut(backend) {
        // SAFETY: a per-CPU slot, only written by this CPU while we run.
        unsafe { *which(&mut *s) += 1 };
    }
}
