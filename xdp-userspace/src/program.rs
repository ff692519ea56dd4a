//! The compiled XDP programs, embedded at build time by build.rs.

/// The load balancer's eBPF object (ELF), built from xdp-ebpf/src/main.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdplb"));

/// Name of the load balancer's XDP program inside `OBJECT`.
pub const PROGRAM_NAME: &str = "xdplb";

/// The pass-through programs (no maps), built from xdp-ebpf/src/passthrough.rs.
pub static PASSTHROUGH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdplb-passthrough"));

/// Returns XDP_PASS: gives a veth the NAPI it needs to receive XDP_TX frames.
pub const PASS_PROGRAM: &str = "xdp_pass";

/// Swaps MACs and returns XDP_TX: the benchmarks' forwarding floor.
pub const MAC_SWAP_PROGRAM: &str = "xdp_mac_swap";
