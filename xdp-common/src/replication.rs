//! Flow-state replication between cluster nodes (docs/cluster.md): the
//! datapath reports every flow it pins to a backend through a ring buffer;
//! the daemon sends them to its peers, which install them in their own
//! flow tables marked [`crate::FLOW_F_REPLICATED`].

use crate::FlowKey;

/// Name of the ring buffer of [`FlowEvent`]s.
pub const EVENTS_MAP: &str = "xdplb_flowev_v1";
/// Name of the per-CPU counters, indexed by `COUNT_*`.
pub const COUNTS_MAP: &str = "xdplb_replc_v1";

/// Bytes of the ring buffer: about 70,000 events, half a second of new
/// flows at 140k/s before the daemon must have drained it.
pub const EVENTS_BYTES: u32 = 4 << 20;

/// Events written to the ring.
pub const COUNT_WRITTEN: u32 = 0;
/// Events lost because the ring was full (the daemon fell behind).
pub const COUNT_LOST: u32 = 1;
/// Number of counters.
pub const COUNTS: u32 = 2;

/// A flow the datapath pinned (new, or re-picked because its backend
/// went away): the flow's key and its backend's id on this node. The
/// daemon turns the id into the backend's address before it leaves the
/// node, as ids are local.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    pub key: FlowKey,
    pub backend: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, no padding holes (size checked below).
unsafe impl aya::Pod for FlowEvent {}

const _: () = assert!(core::mem::size_of::<FlowEvent>() == 40 + 4 + 4);
