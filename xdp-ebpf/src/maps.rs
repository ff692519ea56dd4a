//! The datapath's maps. Names and formats are in `xdp_common::map_names`;
//! every map is pinned by name so a restarted daemon adopts it (the loader
//! sets the pin directory).

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use xdp_common::{
    Backend, Counters, Flow, FlowKey, Globals, NatFwd, NatRev, NatSource, Service, ServiceKey,
    Signals, SnatPool, MAGLEV_SLOTS, MAX_BACKENDS, MAX_FLOWS, MAX_NAT_FLOWS, MAX_NAT_SOURCES,
    MAX_OPENING_FLOWS, MAX_SERVICES, MAX_TX_PORTS, REASON_COUNT,
};

use crate::nat::PortScan;

/// BPF_F_NO_COMMON_LRU: one LRU list per CPU, so CPUs never contend on a
/// shared list lock when they insert flows (Katran keeps per-CPU LRUs for
/// the same reason). The hash table itself stays shared, so userspace sees
/// every flow in one map.
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

#[map(name = "xdplb_svc_v1")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "xdplb_be_v1")]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// BPF_F_MMAPABLE: the control plane writes a whole table (65,537 slots)
/// with one copy into its memory mapping, not one system call per slot.
const BPF_F_MMAPABLE: u32 = 1 << 10;

#[map(name = "xdplb_maglev_v2")]
pub static MAGLEV: Array<u32> = Array::pinned(MAGLEV_SLOTS, BPF_F_MMAPABLE);

#[map(name = "xdplb_flow_v2")]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(MAX_FLOWS, BPF_F_NO_COMMON_LRU);

#[map(name = "xdplb_open_v1")]
pub static OPENING: LruHashMap<FlowKey, Flow> =
    LruHashMap::pinned(MAX_OPENING_FLOWS, BPF_F_NO_COMMON_LRU);

#[map(name = "xdplb_stats_v5")]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::pinned(REASON_COUNT, 0);

#[map(name = "xdplb_svcst_v2")]
pub static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_SERVICES, 0);

#[map(name = "xdplb_best_v2")]
pub static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

#[map(name = "xdplb_besig_v1")]
pub static SIGNALS: PerCpuArray<Signals> = PerCpuArray::pinned(MAX_BACKENDS, 0);

#[map(name = "xdplb_txport_v1")]
pub static TX_PORTS: DevMapHash = DevMapHash::pinned(MAX_TX_PORTS, 0);

/// NAT tables: plain (preallocated) hash maps, so a live translation is
/// never evicted; a full table refuses new flows instead.
#[map(name = "xdplb_natf_v2")]
pub static NAT_FWD: HashMap<FlowKey, NatFwd> = HashMap::pinned(MAX_NAT_FLOWS, 0);

#[map(name = "xdplb_natr_v1")]
pub static NAT_REV: HashMap<FlowKey, NatRev> = HashMap::pinned(MAX_NAT_FLOWS, 0);

/// Unanswered NAT flows per source address (`nat::sources`).
#[map(name = "xdplb_natsrc_v1")]
pub static NAT_SOURCES: LruHashMap<[u32; 4], NatSource> = LruHashMap::pinned(MAX_NAT_SOURCES, 0);

/// Per backend, per CPU: until when its NAT port range counts as full
/// (`nat::allocate`).
#[map(name = "xdplb_natfull_v1")]
pub static NAT_FULL_UNTIL: PerCpuArray<u64> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// SNAT addresses per NAT service id (`nat::allocate`).
#[map(name = "xdplb_snatpool_v1")]
pub static SNAT_POOLS: Array<SnatPool> = Array::pinned(MAX_SERVICES, 0);

/// Scratch space of a port allocation (one per CPU, not pinned).
#[map(name = "xdplb_natscan")]
pub static NAT_SCAN: PerCpuArray<PortScan> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "xdplb_glob_v2")]
pub static GLOBALS: Array<Globals> = Array::pinned(1, 0);
