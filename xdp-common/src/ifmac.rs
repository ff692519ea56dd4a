//! The "is this frame for us?" table: which destination MACs each
//! interface accepts for balancing. A frame whose destination MAC is not
//! listed for the interface it arrived on (flooded by a bridge that forgot
//! a MAC, seen by a NIC in promiscuous mode, ...) is passed untouched, so
//! two nodes that both see it never both forward it.

/// Name of the pinned map: `IfMacKey` -> `u32` (1 = accepted).
pub const MAP_NAME: &str = "xdplb_ifmac_v1";

/// Interfaces x MACs the table holds: each attached interface's own MAC
/// plus the configured extra MACs, for up to 64 interfaces.
pub const MAX_IF_MACS: u32 = 1024;

/// One accepted (interface, destination MAC) pair.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IfMacKey {
    /// The receiving interface's index (XDP's `ingress_ifindex`).
    pub ifindex: u32,
    /// The destination MAC, as on the wire.
    pub mac: [u8; 6],
    pub _pad: u16,
}

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, no padding holes (size checked below).
unsafe impl aya::Pod for IfMacKey {}

const _: () = assert!(core::mem::size_of::<IfMacKey>() == 4 + 6 + 2);
