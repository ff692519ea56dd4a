//! Rare datapath events for the daemon's log (aya-log): at most one record
//! per reason, CPU and second. The packets behind them are dropped anyway,
//! and a flood of such packets must not become a flood of log records; the
//! exact counts are in the reason counters (`xdplb stats`).

use aya_ebpf::{
    helpers::bpf_ktime_get_coarse_ns, macros::map, maps::PerCpuArray, programs::XdpContext,
};
use aya_log_ebpf::warn;
use xdp_common::{Reason, REASON_COUNT};

/// When each reason was last logged on this CPU (coarse ns since boot).
/// Not pinned: a restarted daemon starts with a clean slate.
#[map(name = "xdplb_logt")]
static LAST_LOGGED: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT, 0);

const PERIOD_NS: u64 = 1_000_000_000;

/// Logs a dropped new flow, unless this CPU logged `reason` within the
/// last second.
#[inline(always)]
pub fn dropped(ctx: &XdpContext, reason: Reason) {
    let Some(last) = LAST_LOGGED.get_ptr_mut(reason as u32) else {
        return;
    };
    // SAFETY: a plain helper call; `last` is this CPU's slot, only written
    // while this program runs on it.
    unsafe {
        let now = bpf_ktime_get_coarse_ns();
        if now.wrapping_sub(*last) < PERIOD_NS {
            return;
        }
        *last = now;
    }
    match reason {
        Reason::DropNoBackend => warn!(
            ctx,
            "a service has no usable backend: dropping its new flows (stats: drop_no_backend)"
        ),
        Reason::DropNatFull => warn!(
            ctx,
            "NAT source ports exhausted: dropping new flows (stats: drop_nat_full)"
        ),
        _ => {}
    }
}
