//! Flow-state replication between cluster nodes (docs/cluster.md): the
//! datapath reports every flow it pins to a backend (DSR) and every NAT
//! translation its backend answered through a ring buffer; the daemon
//! sends them to its peers, which install them in their own tables marked
//! [`crate::FLOW_F_REPLICATED`] or [`crate::NAT_F_REPLICATED`].

use crate::FlowKey;

/// Name of the ring buffer of [`FlowEvent`]s.
/// (v2: NAT translations added.)
pub const EVENTS_MAP: &str = "xdplb_flowev_v2";
/// Name of the per-CPU counters, indexed by `COUNT_*`.
pub const COUNTS_MAP: &str = "xdplb_replc_v1";

/// Bytes of the ring buffer: about 52,000 events, a third of a second of
/// new flows at 140k/s before the daemon must have drained it.
pub const EVENTS_BYTES: u32 = 4 << 20;

/// Events written to the ring.
pub const COUNT_WRITTEN: u32 = 0;
/// Events lost because the ring was full (the daemon fell behind).
pub const COUNT_LOST: u32 = 1;
/// Number of counters.
pub const COUNTS: u32 = 2;

/// `FlowEvent::flags`: a NAT translation (its backend answered), not a
/// DSR pin.
pub const EVENT_NAT: u16 = 1;

/// A flow the datapath pinned (DSR: new, or re-picked because its backend
/// went away; NAT: a translation once its backend answered): the flow's
/// key and its backend's id on this node. The daemon turns the id into
/// the backend's address before it leaves the node, as ids are local.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent {
    pub key: FlowKey,
    pub backend: u32,
    /// NAT: the allocated source port, network byte order.
    pub nat_port_be: u16,
    /// `EVENT_*` bits.
    pub flags: u16,
    /// NAT: the SNAT address.
    pub snat_addr: [u32; 4],
    /// NAT: the idle timeout in force, seconds.
    pub timeout_s: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, no padding holes (size checked below).
unsafe impl aya::Pod for FlowEvent {}

const _: () = assert!(core::mem::size_of::<FlowEvent>() == 40 + 4 + 2 + 2 + 16 + 4 + 4);
