//! Typed handles on the datapath's maps, and the writes and reads the
//! control plane makes through them.

use std::{
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::Arc,
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, DevMapHash, HashMap, IterableMap as _, Map, MapData, PerCpuArray},
    Ebpf,
};
use xdp_common::{hash::flow_hash, map_names as names, *};

use crate::addr;

/// Every map of the datapath.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub backends: Array<MapData, Backend>,
    pub maglev: Array<MapData, u32>,
    pub flows: HashMap<MapData, FlowKey, Flow>,
    /// TCP flows whose client has sent only its first packet (LRU).
    pub opening: HashMap<MapData, FlowKey, Flow>,
    pub reasons: PerCpuArray<MapData, u64>,
    pub service_stats: PerCpuArray<MapData, Counters>,
    pub backend_stats: PerCpuArray<MapData, Counters>,
    pub signals: PerCpuArray<MapData, Signals>,
    pub tx_ports: DevMapHash<MapData>,
    pub nat_fwd: HashMap<MapData, FlowKey, NatFwd>,
    pub nat_rev: HashMap<MapData, FlowKey, NatRev>,
    pub globals: Array<MapData, Globals>,
    /// Second descriptors of the NAT tables, for [`Maps::nat_sweeper`].
    nat_fds: [OwnedFd; 2],
    /// A second descriptor of the flow table, for [`Maps::flow_table`].
    flows_fd: OwnedFd,
    /// The Maglev array's memory, where tables are written.
    maglev_mem: MaglevMemory,
}

/// The Maglev array mapped into this process (the map is created
/// `BPF_F_MMAPABLE`): a table is written with one pass over memory.
struct MaglevMemory {
    /// One 8-byte element per slot: the kernel rounds an array's value
    /// size up to 8, and the `u32` backend id is its first 4 bytes.
    slots: std::ptr::NonNull<u64>,
}

// SAFETY: the mapping is owned by this value and only written through
// `&mut self` (the controller is the array's only writer).
unsafe impl Send for MaglevMemory {}
unsafe impl Sync for MaglevMemory {}

impl MaglevMemory {
    const BYTES: usize = MAGLEV_SLOTS as usize * std::mem::size_of::<u64>();

    fn map(fd: std::os::fd::BorrowedFd<'_>) -> Result<Self> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: a shared read-write mapping of the whole array, which
        // the kernel sized for MAGLEV_SLOTS elements of 8 bytes.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .context("mapping the Maglev array (BPF_F_MMAPABLE)");
        }
        let slots = std::ptr::NonNull::new(ptr.cast()).context("mmap returned null")?;
        Ok(Self { slots })
    }

    fn slots(&mut self) -> &mut [u64] {
        // SAFETY: the mapping is BYTES long and lives as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.slots.as_ptr(), MAGLEV_SLOTS as usize) }
    }
}

impl Drop for MaglevMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.slots.as_ptr().cast(), Self::BYTES) };
    }
}

/// A map by name, from a loaded program or from its pin.
trait Source {
    fn map(&mut self, name: &str) -> Result<Map>;
}

impl Source for &mut Ebpf {
    fn map(&mut self, name: &str) -> Result<Map> {
        self.take_map(name)
            .with_context(|| format!("map {name} missing from the XDP object"))
    }
}

impl Source for &Path {
    fn map(&mut self, name: &str) -> Result<Map> {
        let path = self.join(name);
        let data = MapData::from_pin(&path).with_context(|| {
            format!("opening pinned map {} (is xdplb running?)", path.display())
        })?;
        Ok(Map::from_map_data(data)?)
    }
}

impl Maps {
    fn from_source(mut src: impl Source) -> Result<Self> {
        macro_rules! typed {
            ($name:expr) => {
                src.map($name)?
                    .try_into()
                    .with_context(|| format!("map {} has an unexpected type", $name))?
            };
        }
        // A hash map and a second descriptor of it.
        let mut shared = |name: &str| -> Result<(Map, OwnedFd)> {
            let map = src.map(name)?;
            let (Map::HashMap(data) | Map::LruHashMap(data)) = &map else {
                bail!("map {name} has an unexpected type");
            };
            let fd = data.fd().as_fd().try_clone_to_owned()?;
            Ok((map, fd))
        };
        let (nat_fwd, fwd_fd) = shared(names::NAT_FWD)?;
        let (nat_rev, rev_fd) = shared(names::NAT_REV)?;
        let (flows, flows_fd) = shared(names::FLOWS)?;
        let maglev: Array<MapData, u32> = typed!(names::MAGLEV);
        let maglev_mem = MaglevMemory::map(maglev.map().fd().as_fd())?;
        Ok(Self {
            services: typed!(names::SERVICES),
            backends: typed!(names::BACKENDS),
            maglev,
            flows: flows.try_into()?,
            opening: typed!(names::OPENING),
            reasons: typed!(names::REASONS),
            service_stats: typed!(names::SERVICE_STATS),
            backend_stats: typed!(names::BACKEND_STATS),
            signals: typed!(names::SIGNALS),
            tx_ports: typed!(names::TX_PORTS),
            nat_fwd: nat_fwd.try_into()?,
            nat_rev: nat_rev.try_into()?,
            globals: typed!(names::GLOBALS),
            nat_fds: [fwd_fd, rev_fd],
            flows_fd,
            maglev_mem,
        })
    }

    /// Takes the maps out of a freshly loaded program.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Self::from_source(ebpf)
    }

    /// Opens the maps a running datapath pinned in `pin_dir`.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::from_source(pin_dir)
    }

    /// Deletes idle NAT entries (see [`NatSweeper`]); tests use this to put
    /// packets between the scan and the deletions (`after_scan`).
    #[doc(hidden)]
    pub fn sweep_nat_with(
        &mut self,
        now_ns: u64,
        after_scan: impl FnOnce(),
    ) -> Result<NatOccupancy> {
        sweep(&mut self.nat_fwd, &mut self.nat_rev, now_ns, after_scan)
    }

    /// The flow and NAT tables as replication uses them, with handles of
    /// their own, so that it runs beside whoever holds these maps.
    pub(crate) fn flow_table(&self) -> Result<FlowTable> {
        let data = MapData::from_fd(self.flows_fd.try_clone()?)?;
        Ok(FlowTable {
            flows: Map::LruHashMap(data).try_into()?,
            nat: self.nat_sweeper()?,
        })
    }

    /// A sweeper with handles of its own on the NAT tables, so that it runs
    /// beside whoever holds these maps.
    pub(crate) fn nat_sweeper(&self) -> Result<NatSweeper> {
        let open =
            |fd: &OwnedFd| -> Result<Map> { Ok(Map::HashMap(MapData::from_fd(fd.try_clone()?)?)) };
        Ok(NatSweeper {
            fwd: open(&self.nat_fds[0])?.try_into()?,
            rev: open(&self.nat_fds[1])?.try_into()?,
        })
    }

    /// Makes the control plane's writes, in order.
    pub(crate) fn write(&mut self, writes: &[Write]) -> Result<()> {
        for w in writes {
            match w {
                Write::Backend(id, b) => self
                    .backends
                    .set(*id, *b, 0)
                    .with_context(|| format!("writing backend {id}"))?,
                Write::Table { base, table } => self.write_table(*base, table)?,
                Write::Service(key, svc) => self
                    .services
                    .insert(key, svc, 0)
                    .context("swapping in a service's new table")?,
                Write::RemoveService(key) => {
                    self.services.remove(key).context("removing a service")?
                }
                Write::ResetCounters { service, backend } => {
                    self.reset_counters(*service, *backend)?
                }
                Write::TxPort(ifindex) => self
                    .tx_ports
                    .insert(*ifindex, *ifindex, None, 0)
                    .with_context(|| format!("adding ifindex {ifindex} to the egress devmap"))?,
                Write::Globals(g) => self
                    .globals
                    .set(0, g, 0)
                    .context("writing datapath globals")?,
            }
        }
        Ok(())
    }

    /// Writes Maglev table `table` at `base` in the flat array.
    pub fn write_table(&mut self, base: u32, table: &[u32]) -> Result<()> {
        let base = base as usize;
        let region = self
            .maglev_mem
            .slots()
            .get_mut(base..base + table.len())
            .context("a Maglev table beyond the array")?;
        // The datapath reads this region only once the service's entry
        // points at it, which is a later system call (a full barrier).
        for (slot, &id) in region.iter_mut().zip(table) {
            // The element's first 4 bytes, in the machine's byte order.
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&id.to_ne_bytes());
            *slot = u64::from_ne_bytes(bytes);
        }
        Ok(())
    }

    /// Reads one backend's datapath entry.
    pub fn backend(&self, id: u32) -> Result<Backend> {
        Ok(self.backends.get(&id, 0)?)
    }

    /// Every reason counter, summed over CPUs.
    pub fn reason_counts(&self) -> Result<Vec<(Reason, u64)>> {
        Reason::ALL
            .iter()
            .map(|&r| Ok((r, self.reasons.get(&(r as u32), 0)?.iter().sum())))
            .collect()
    }

    /// One reason counter, summed over CPUs.
    pub fn reason_count(&self, reason: Reason) -> Result<u64> {
        Ok(self.reasons.get(&(reason as u32), 0)?.iter().sum())
    }

    fn sum(map: &PerCpuArray<MapData, Counters>, id: u32) -> Result<Counters> {
        Ok(map
            .get(&id, 0)?
            .iter()
            .fold(Counters::default(), |a, c| Counters {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
                new_flows: a.new_flows + c.new_flows,
            }))
    }

    /// A service's counters, summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        Self::sum(&self.service_stats, id)
    }

    /// A backend's traffic signals, summed over CPUs.
    pub fn backend_signals(&self, id: u32) -> Result<Signals> {
        Ok(self
            .signals
            .get(&id, 0)?
            .iter()
            .fold(Signals::default(), |a, s| Signals {
                confirmed: a.confirmed + s.confirmed,
                refused: a.refused + s.refused,
                syn_retransmits: a.syn_retransmits + s.syn_retransmits,
            }))
    }

    /// A backend's counters, summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        Self::sum(&self.backend_stats, id)
    }

    /// Zeroes a service's or backend's counters (when its id is reused).
    pub(crate) fn reset_counters(
        &mut self,
        service: Option<u32>,
        backend: Option<u32>,
    ) -> Result<()> {
        let zero = || {
            aya::maps::PerCpuValues::try_from(vec![
                Counters::default();
                aya::util::nr_cpus().map_err(|(_, e)| e)?
            ])
            .map_err(anyhow::Error::from)
        };
        if let Some(id) = service {
            self.service_stats.set(id, zero()?, 0)?;
        }
        if let Some(id) = backend {
            self.backend_stats.set(id, zero()?, 0)?;
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
            let none = aya::maps::PerCpuValues::try_from(vec![Signals::default(); cpus])?;
            self.signals.set(id, none, 0)?;
        }
        Ok(())
    }

    /// Where the datapath sends a packet from `src` to `dst`, worked out
    /// from the maps exactly as the XDP program does: the flow table for
    /// an established flow whose backend still takes it, else the
    /// service's active Maglev table.
    pub fn route(&self, src: SocketAddr, dst: SocketAddr, proto: u8) -> Result<Route> {
        let service = self
            .services
            .get(&addr::service_key(dst.ip(), dst.port(), proto), 0)
            .with_context(|| format!("no service at {dst}/{}", proto_name(proto)))?;
        let key = addr::flow_key(src, dst, proto);
        let hash = flow_hash(&key, service.flags & SVC_F_HASH_SRC_ONLY != 0);
        // NAT flows are tracked in the NAT table, DSR flows in the flow table.
        let pinned = if service.flags & SVC_F_NAT != 0 {
            self.nat_fwd
                .get(&key, 0)
                .ok()
                .map(|f| (f.backend, f.flags & NAT_F_REPLICATED != 0))
        } else {
            // Established, or still opening (TCP flows that sent only
            // their first packet).
            let flow = self
                .flows
                .get(&key, 0)
                .or_else(|_| self.opening.get(&key, 0));
            flow.ok()
                .map(|f| (f.backend, f.flags & FLOW_F_REPLICATED != 0))
        };
        let live = |id: u32| self.backend(id).ok().filter(Backend::is_live);
        let replicated = pinned.is_some_and(|(_, r)| r);
        let pinned = pinned.map(|(id, _)| id);
        let has_table = service.flags & SVC_F_NO_BACKEND == 0 && service.table_size != 0;
        let slot = has_table.then(|| hash % service.table_size);
        let pick = slot
            .map(|slot| -> Result<(u32, Backend)> {
                let id = self.maglev.get(&(service.table_base + slot), 0)?;
                Ok((id, self.backend(id)?))
            })
            .transpose()?;
        let (id, backend, established) = match pinned.and_then(|id| live(id).map(|b| (id, b))) {
            Some((id, b)) => (id, b, true),
            None => {
                let Some((id, b)) = pick else {
                    bail!("service at {dst} has no backend taking new flows");
                };
                (id, b, false)
            }
        };
        let nat = (service.flags & SVC_F_NAT != 0)
            .then(|| self.nat_fwd.get(&key, 0).ok())
            .flatten()
            .map(|f| {
                let b = self.backend(f.backend).unwrap_or_default();
                let snat =
                    SocketAddr::new(addr::from_words(f.snat_addr), u16::from_be(f.nat_port_be));
                let backend = SocketAddr::new(addr::from_words(b.addr), u16::from_be(b.port_be));
                format!("{src} -> {dst} is translated to {snat} -> {backend}")
            });
        Ok(Route {
            nat,
            backend_id: id,
            backend: socket_addr(&backend),
            established,
            replicated: established && replicated,
            new_flow_backend: pick.map(|(_, b)| socket_addr(&b)),
            hash,
            slot,
        })
    }
}

/// The flow and NAT tables as replication uses them: every pin and
/// translation read for a peer's full copy, peers' installed. It writes
/// nothing but those, which the datapath writes too, so it needs no lock
/// shared with the controller.
pub(crate) struct FlowTable {
    flows: HashMap<MapData, FlowKey, Flow>,
    nat: NatSweeper,
}

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

impl FlowTable {
    /// Installs a peer's pin of `key` to backend `id`, marked replicated.
    /// With `overwrite` false a pin already here is kept (a full copy may
    /// be older than what this node learnt since). Returns whether it was
    /// written.
    pub fn install(&mut self, key: &FlowKey, id: u32, overwrite: bool) -> Result<bool> {
        let flow = Flow {
            backend: id,
            flags: FLOW_F_REPLICATED,
            opened_ns: monotonic_coarse_ns(),
        };
        let flags = if overwrite { 0 } else { BPF_NOEXIST };
        match self.flows.insert(key, flow, flags) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(e) => Err(e).context("installing a replicated flow"),
        }
    }

    /// Every pin in the table.
    pub fn pins(&self) -> impl Iterator<Item = (FlowKey, Flow)> + '_ {
        self.flows.iter().filter_map(Result::ok)
    }

    /// Installs a peer's NAT translation of client-side `key` to backend
    /// `id` (at `backend`, the reply entry's source) from `snat`, both
    /// directions, marked replicated and answered (only answered
    /// translations are replicated), stamped now, with `timeout_s`. A
    /// translation this node made itself is never replaced, nor, without
    /// `overwrite`, a replicated one. Returns whether it was written.
    pub fn install_nat(
        &mut self,
        key: &FlowKey,
        (id, backend): (u32, SocketAddr),
        snat: SocketAddr,
        timeout_s: u32,
        overwrite: bool,
    ) -> Result<bool> {
        if let Ok(old) = self.nat.fwd.get(key, 0) {
            if old.flags & NAT_F_REPLICATED == 0 || !overwrite {
                return Ok(false);
            }
        }
        let flags = NAT_F_REPLICATED | NAT_F_ANSWERED;
        let now = monotonic_coarse_ns();
        // The backend's replies: backend:port -> SNAT address:port.
        let reply_key = addr::flow_key(backend, snat, key.proto);
        let mut rev = NatRev {
            client: key.src,
            vip: key.dst,
            client_port_be: key.sport_be,
            vip_port_be: key.dport_be,
            flags,
            last_seen_ns: now,
            timeout_s,
            ..NatRev::default()
        };
        // The way to the client this node already found, if any, stays.
        if let Ok(old) = self.nat.rev.get(&reply_key, 0) {
            if old.client_key(key.proto) == *key {
                (rev.client_mac, rev.lb_mac, rev.ifindex) =
                    (old.client_mac, old.lb_mac, old.ifindex);
            }
        }
        let fwd = NatFwd {
            backend: id,
            nat_port_be: snat.port().to_be(),
            flags,
            last_seen_ns: now,
            timeout_s,
            _pad: 0,
            snat_addr: addr::to_words(snat.ip()),
        };
        // Reply side first: a client packet finding the forward entry can
        // then count on its replies being translated.
        self.nat
            .rev
            .insert(reply_key, rev, 0)
            .context("installing a replicated NAT reply entry")?;
        self.nat
            .fwd
            .insert(key, fwd, 0)
            .context("installing a replicated NAT translation")?;
        Ok(true)
    }

    /// Every live answered NAT translation in the table, by client-side
    /// key; `since_ns`: only those with a client packet after it.
    pub fn translations(&self, since_ns: u64) -> impl Iterator<Item = (FlowKey, NatFwd)> + '_ {
        let now = monotonic_coarse_ns();
        self.nat
            .fwd
            .iter()
            .filter_map(Result::ok)
            .filter(move |(_, f)| {
                f.flags & NAT_F_ANSWERED != 0 && !f.expired(now) && f.last_seen_ns > since_ns
            })
    }
}

/// Reclaims idle NAT entries. The controller never writes the NAT tables
/// (the datapath does); this only deletes, so it needs no lock shared with
/// the controller, and the daemon runs it without its own.
pub(crate) struct NatSweeper {
    fwd: HashMap<MapData, FlowKey, NatFwd>,
    rev: HashMap<MapData, FlowKey, NatRev>,
}

impl NatSweeper {
    /// Deletes idle NAT entries (their ports become free) and returns the
    /// tables' occupancy. An entry goes when it is past its idle timeout
    /// and so is its partner in the other direction.
    ///
    /// The datapath writes these entries while the sweep runs: a packet may
    /// refresh or replace an entry after it was read as idle. So each
    /// deletion re-reads the entry first and deletes it only if it is still
    /// the value judged idle. (The window left is the one between that
    /// read and the delete, two system calls apart; the datapath also
    /// reclaims an idle port itself when a new flow needs it.)
    pub fn sweep(&mut self, now_ns: u64) -> Result<NatOccupancy> {
        sweep(&mut self.fwd, &mut self.rev, now_ns, || ())
    }
}

fn sweep(
    nat_fwd: &mut HashMap<MapData, FlowKey, NatFwd>,
    nat_rev: &mut HashMap<MapData, FlowKey, NatRev>,
    now_ns: u64,
    after_scan: impl FnOnce(),
) -> Result<NatOccupancy> {
    let mut occupancy = NatOccupancy {
        capacity: MAX_NAT_FLOWS,
        ..Default::default()
    };
    let fwd: Vec<(FlowKey, NatFwd)> = nat_fwd.iter().filter_map(Result::ok).collect();
    let rev: Vec<(FlowKey, NatRev)> = nat_rev.iter().filter_map(Result::ok).collect();
    let fwd_idle: std::collections::HashMap<FlowKey, bool> =
        fwd.iter().map(|(k, f)| (*k, f.expired(now_ns))).collect();
    after_scan();
    let mut rev_idle_by_client = std::collections::HashMap::new();
    for (k, r) in &rev {
        let client_key = r.client_key(k.proto);
        let idle = r.expired(now_ns)
            && fwd_idle.get(&client_key).copied().unwrap_or(true)
            && nat_rev.get(k, 0).is_ok_and(|now| now == *r);
        // A reply entry refreshed since the scan keeps its partner too.
        rev_idle_by_client.insert(client_key, idle);
        if idle {
            let _ = nat_rev.remove(k);
            occupancy.reclaimed += 1;
        } else {
            occupancy.reverse += 1;
        }
    }
    for (k, f) in &fwd {
        if f.expired(now_ns)
            && rev_idle_by_client.get(k).copied().unwrap_or(true)
            && nat_fwd.get(k, 0).is_ok_and(|now| now == *f)
        {
            let _ = nat_fwd.remove(k);
        } else {
            occupancy.flows += 1;
        }
    }
    Ok(occupancy)
}

/// One write of the control plane to the maps. The controller plans a
/// change as a list of these (nothing touched), then makes them in order.
#[derive(Clone, Debug)]
pub(crate) enum Write {
    /// Backend id -> its entry.
    Backend(u32, Backend),
    /// A Maglev table at `base` in the flat array.
    Table {
        base: u32,
        table: Arc<Vec<u32>>,
    },
    /// A service's entry: the swap to its new table.
    Service(ServiceKey, Service),
    RemoveService(ServiceKey),
    /// Zeroes the counters of a reused service or backend id.
    ResetCounters {
        service: Option<u32>,
        backend: Option<u32>,
    },
    /// An egress interface the datapath may redirect to.
    TxPort(u32),
    Globals(Globals),
}

/// NAT table use after a sweep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NatOccupancy {
    /// Translated flows (client-side entries) still live.
    pub flows: u32,
    /// Reply entries, i.e. allocated source ports, still live.
    pub reverse: u32,
    /// Capacity of each table.
    pub capacity: u32,
    /// Entries removed by this sweep.
    pub reclaimed: u32,
}

/// The kernel's CLOCK_MONOTONIC_COARSE, the clock of
/// `bpf_ktime_get_coarse_ns` that stamps NAT entries.
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Where a flow goes, as `xdplb flow` reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Route {
    pub backend_id: u32,
    pub backend: SocketAddr,
    /// True when the flow table already pins the flow; false when the
    /// answer comes from the Maglev table (the flow is new).
    pub established: bool,
    /// The pin was replicated from a cluster peer (docs/cluster.md).
    pub replicated: bool,
    /// Where the Maglev table sends a new flow with this 5-tuple (differs
    /// from `backend` when the flow's pin predates a table change).
    pub new_flow_backend: Option<SocketAddr>,
    pub hash: u32,
    /// The Maglev slot a new flow hashes to.
    pub slot: Option<u32>,
    /// A NAT flow's live translation.
    pub nat: Option<String>,
}

/// A backend's `address:port`.
fn socket_addr(b: &Backend) -> SocketAddr {
    SocketAddr::new(addr::from_words(b.addr), u16::from_be(b.port_be))
}

/// "tcp"/"udp" for messages.
pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        n => format!("proto {n}"),
    }
}
