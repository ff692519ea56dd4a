//! Per-CPU counters: no atomics needed, userspace sums the CPUs.

use xdp_common::{Counters, Reason};

use crate::maps::{BACKEND_STATS, REASONS, SERVICE_STATS};

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add(counters: Option<*mut Counters>, bytes: u64) {
    if let Some(c) = counters {
        // SAFETY: as above, a per-CPU slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Counts a forwarded packet against its service and backend.
#[inline(always)]
pub fn count_forwarded(service: u32, backend: u32, bytes: u64) {
    add(SERVICE_STATS.get_ptr_mut(service), bytes);
    add(BACKEND_STATS.get_ptr_mut(backend), bytes);
}
