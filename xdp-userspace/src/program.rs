//! The compiled XDP program, embedded at build time by build.rs.

/// The eBPF object (ELF) built from xdp-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdplb"));

/// Name of the XDP program inside `OBJECT`.
pub const PROGRAM_NAME: &str = "xdplb";
