//! Typed handles on the datapath's maps, and the writes and reads the
//! control plane makes through them.

use std::{
    net::SocketAddr,
    ops::Add,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    sync::Arc,
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, DevMapHash, HashMap, IterableMap as _, Map, MapData, PerCpuArray, PerCpuValues},
    Ebpf, Pod,
};
use xdp_common::{hash::flow_hash, map_names as names, *};

use crate::{
    addr,
    cluster::macs::{IfMacs, Mac},
};

/// A per-CPU map value summed over the CPUs: what the datapath counted on
/// all of them. The one way userspace reads a per-CPU counter
/// (`map.get(&key, 0)?.sum()`), for every type that adds up (`u64`,
/// [`Counters`], [`Signals`]).
pub trait SumPerCpu {
    type Output;
    fn sum(&self) -> Self::Output;
}

impl<V: Pod + Default + Add<Output = V>> SumPerCpu for PerCpuValues<V> {
    type Output = V;
    fn sum(&self) -> V {
        sum_per_cpu(self.iter().copied())
    }
}

/// The sum itself, also for per-CPU values read in a batch ([`totals`]).
fn sum_per_cpu<V: Default + Add<Output = V>>(values: impl Iterator<Item = V>) -> V {
    values.fold(V::default(), |a, v| a + v)
}

/// A per-CPU value of zero on every CPU.
fn zeroed<V: Pod + Default>() -> Result<PerCpuValues<V>> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    Ok(PerCpuValues::try_from(vec![V::default(); cpus])?)
}

/// Entries `0..count` of a per-CPU array, each summed over CPUs, read with
/// one `BPF_MAP_LOOKUP_BATCH` (Linux 5.6) instead of a lookup per entry.
fn totals<V: Pod + Default + Add<Output = V>>(map: &MapData, count: u32) -> Result<Vec<V>> {
    /// `union bpf_attr` as the batch commands read it.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    if count == 0 {
        return Ok(Vec::new());
    }
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    // The kernel lays each CPU's value out on 8 bytes' alignment.
    let stride = std::mem::size_of::<V>().next_multiple_of(8);
    let mut keys = vec![0u32; count as usize];
    let mut values = vec![0u8; count as usize * cpus * stride];
    let mut next = 0u32;
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: std::ptr::from_mut(&mut next) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the buffers hold `count` keys and values, as the kernel is
    // told; it writes nothing else.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<BatchAttr>(),
        )
    };
    // ENOENT: the array ended before `count` entries; `attr.count` says
    // how many were read.
    let error = std::io::Error::last_os_error();
    if rc != 0 && error.raw_os_error() != Some(libc::ENOENT) {
        return Err(error).context("BPF_MAP_LOOKUP_BATCH on a per-CPU array");
    }
    Ok(values
        .chunks_exact(cpus * stride)
        .take(attr.count as usize)
        .map(|entry| {
            sum_per_cpu(entry.chunks_exact(stride).map(|cpu| {
                // SAFETY: each chunk starts with one V as the kernel wrote it.
                unsafe { std::ptr::read_unaligned(cpu.as_ptr().cast::<V>()) }
            }))
        })
        .collect())
}

/// A handle of its own on the hash map `map` (a second descriptor), for a
/// user beside whoever holds `map`.
fn reopen<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> Result<HashMap<MapData, K, V>> {
    let fd = map.map().fd().as_fd().try_clone_to_owned()?;
    Ok(Map::from_map_data(MapData::from_fd(fd)?)?.try_into()?)
}

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
    pub snat_pools: Array<MapData, SnatPool>,
    /// The destination MACs the datapath balances frames to.
    pub accepted_macs: IfMacs,
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
        let maglev: Array<MapData, u32> = typed!(names::MAGLEV);
        let maglev_mem = MaglevMemory::map(maglev.map().fd().as_fd())?;
        Ok(Self {
            services: typed!(names::SERVICES),
            backends: typed!(names::BACKENDS),
            maglev,
            flows: typed!(names::FLOWS),
            opening: typed!(names::OPENING),
            reasons: typed!(names::REASONS),
            service_stats: typed!(names::SERVICE_STATS),
            backend_stats: typed!(names::BACKEND_STATS),
            signals: typed!(names::SIGNALS),
            tx_ports: typed!(names::TX_PORTS),
            nat_fwd: typed!(names::NAT_FWD),
            nat_rev: typed!(names::NAT_REV),
            globals: typed!(names::GLOBALS),
            snat_pools: typed!(names::SNAT_POOLS),
            accepted_macs: IfMacs::from_map(src.map(xdp_common::ifmac::MAP_NAME)?)?,
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

    /// Deletes dead NAT entries (see [`NatSweeper`]); tests use this to put
    /// packets between the scan and the deletions (`before_delete`).
    #[doc(hidden)]
    pub fn sweep_nat_with(
        &mut self,
        now_ns: u64,
        before_delete: impl FnOnce(&mut Self),
    ) -> Result<NatOccupancy> {
        let mut sweeper = self.nat_sweeper()?;
        sweeper.sweep_with(now_ns, || before_delete(self))
    }

    /// The flow and NAT tables as replication uses them, with handles of
    /// their own, so that it runs beside whoever holds these maps.
    pub(crate) fn flow_table(&self) -> Result<FlowTable> {
        Ok(FlowTable {
            flows: reopen(&self.flows)?,
            nat: self.nat_sweeper()?,
        })
    }

    /// A sweeper with handles of its own on the NAT tables, so that it runs
    /// beside whoever holds these maps.
    pub(crate) fn nat_sweeper(&self) -> Result<NatSweeper> {
        Ok(NatSweeper {
            fwd: reopen(&self.nat_fwd)?,
            rev: reopen(&self.nat_rev)?,
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
                Write::Service(key, svc, pool) => {
                    // The pool first: the entry is what makes it used.
                    self.snat_pools
                        .set(svc.id, pool, 0)
                        .context("writing a service's SNAT addresses")?;
                    self.services
                        .insert(key, svc, 0)
                        .context("swapping in a service's new table")?
                }
                Write::RemoveService(key) => {
                    self.services.remove(key).context("removing a service")?
                }
                Write::ResetServiceCounters(id) => self.service_stats.set(*id, zeroed()?, 0)?,
                Write::ResetBackendCounters(id) => {
                    self.backend_stats.set(*id, zeroed()?, 0)?;
                    self.signals.set(*id, zeroed()?, 0)?;
                }
                Write::TxPort(ifindex) => self
                    .tx_ports
                    .insert(*ifindex, *ifindex, None, 0)
                    .with_context(|| format!("adding ifindex {ifindex} to the egress devmap"))?,
                Write::AcceptedMacs { interfaces, extra } => {
                    self.accepted_macs.sync(interfaces, extra)?
                }
                Write::ForgetMacs(ifindex) => self.accepted_macs.forget(*ifindex)?,
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
            .map(|&r| Ok((r, self.reasons.get(&(r as u32), 0)?.sum())))
            .collect()
    }

    /// One reason counter, summed over CPUs.
    pub fn reason_count(&self, reason: Reason) -> Result<u64> {
        Ok(self.reasons.get(&(reason as u32), 0)?.sum())
    }

    /// A service's counters, summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        Ok(self.service_stats.get(&id, 0)?.sum())
    }

    /// A backend's traffic signals, summed over CPUs.
    pub fn backend_signals(&self, id: u32) -> Result<Signals> {
        Ok(self.signals.get(&id, 0)?.sum())
    }

    /// A backend's counters, summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        Ok(self.backend_stats.get(&id, 0)?.sum())
    }

    /// The signals of backend ids `0..count`, summed over CPUs, in one
    /// system call (for passive detection, which reads every backend many
    /// times a second).
    pub fn all_backend_signals(&self, count: u32) -> Result<Vec<Signals>> {
        totals(self.signals.map(), count)
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
        let translated = service.flags & SVC_F_NAT != 0;
        let translation = translated.then(|| self.nat_fwd.get(&key, 0).ok()).flatten();
        // NAT flows are tracked in the NAT table, DSR flows in the flow table.
        let pinned = if translated {
            translation.map(|f| (f.backend, f.flags & NAT_F_REPLICATED != 0))
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
        let has_table = service.flags & SVC_F_NO_BACKEND == 0 && service.table_size != 0;
        let slot = has_table.then(|| hash % service.table_size);
        let pick = slot
            .map(|slot| -> Result<(u32, Backend)> {
                let id = self.maglev.get(&(service.table_base + slot), 0)?;
                Ok((id, self.backend(id)?))
            })
            .transpose()?;
        // The pin while its backend is live, else the Maglev table's pick.
        let (id, backend, established) = pinned
            .and_then(|(id, _)| Some((id, live(id)?, true)))
            .or(pick.map(|(id, b)| (id, b, false)))
            .with_context(|| format!("service at {dst} has no backend taking new flows"))?;
        let nat = translation.map(|f| {
            let backend = socket_addr(&self.backend(f.backend).unwrap_or_default());
            let snat = SocketAddr::new(addr::from_words(f.snat_addr), u16::from_be(f.nat_port_be));
            format!("{src} -> {dst} is translated to {snat} -> {backend}")
        });
        Ok(Route {
            nat,
            backend_id: id,
            backend: socket_addr(&backend),
            established,
            replicated: established && pinned.is_some_and(|(_, replicated)| replicated),
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
    /// translation this node made itself is never replaced (neither side),
    /// nor, without `overwrite`, a replicated one. Returns whether it was
    /// written.
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
        if let Ok(old) = self.nat.rev.get(&reply_key, 0) {
            // A reply entry this node made carries its own translation's
            // replies: a peer's record naming the same SNAT address and
            // port (a peer configured with this node's SNAT address) must
            // not turn them to another client.
            if old.flags & NAT_F_REPLICATED == 0 {
                return Ok(false);
            }
            // The way to the client this node already found, if any, stays.
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
            seq: 0,
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

/// Deletes dead NAT entries the datapath no longer reclaims itself. The
/// controller never writes the NAT tables (the datapath does, and
/// replication installs peers' translations); this only deletes, so it
/// needs no lock shared with the controller, and the daemon runs it
/// without its own.
pub(crate) struct NatSweeper {
    fwd: HashMap<MapData, FlowKey, NatFwd>,
    rev: HashMap<MapData, FlowKey, NatRev>,
}

impl NatSweeper {
    /// Deletes the entries of flows dead for longer than the datapath's
    /// reclaim window (`nat_sweepable`) and returns the tables' occupancy.
    ///
    /// The datapath writes these tables while the sweep runs, and the
    /// kernel cannot delete an entry only if it still holds a given value.
    /// The age rules make the race harmless: no packet refreshes a dead
    /// flow, and the datapath never reuses the port of one dead that long.
    /// What is left is a new flow taking a dead flow's key (the same client
    /// 5-tuple; or a peer's translation installed by replication): each
    /// deletion takes the entry out and gets back what it held, and puts
    /// back at once whatever is not the entry it judged dead.
    pub fn sweep(&mut self, now_ns: u64) -> Result<NatOccupancy> {
        self.sweep_with(now_ns, || ())
    }

    /// [`NatSweeper::sweep`], calling `before_delete` between the scan and
    /// the first deletion.
    fn sweep_with(&mut self, now_ns: u64, before_delete: impl FnOnce()) -> Result<NatOccupancy> {
        let fwd: Vec<(FlowKey, NatFwd)> = self.fwd.iter().filter_map(Result::ok).collect();
        let rev: Vec<(FlowKey, NatRev)> = self.rev.iter().filter_map(Result::ok).collect();
        let fwd_by_key: std::collections::HashMap<FlowKey, NatFwd> = fwd.iter().copied().collect();
        // Client sides whose translation keeps its reply side.
        let mut kept = std::collections::HashSet::new();
        let mut dead_rev = Vec::new();
        for (k, r) in &rev {
            let client = r.client_key(k.proto);
            let partner = fwd_by_key.get(&client).filter(|f| f.owns(k));
            if r.sweepable(now_ns) && partner.is_none_or(|f| f.sweepable(now_ns)) {
                dead_rev.push((*k, *r));
            } else if partner.is_some() {
                kept.insert(client);
            }
        }
        let dead_fwd: Vec<(FlowKey, NatFwd)> = fwd
            .iter()
            .filter(|(k, f)| f.sweepable(now_ns) && !kept.contains(k))
            .copied()
            .collect();
        before_delete();
        let mut reclaimed = 0;
        for (k, r) in &dead_rev {
            reclaimed += usize::from(take_if(&mut self.rev, k, r)?);
        }
        for (k, f) in &dead_fwd {
            take_if(&mut self.fwd, k, f)?;
        }
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let live_fwd = fwd.iter().filter(|(_, f)| !f.expired(now_ns)).count();
        let live_rev = rev.iter().filter(|(k, r)| {
            let partner = fwd_by_key.get(&r.client_key(k.proto));
            !r.expired(now_ns) || !nat_partner_expired(partner, k, now_ns)
        });
        Ok(NatOccupancy {
            flows: count(live_fwd),
            reverse: count(live_rev.count()),
            capacity: MAX_NAT_FLOWS,
            reclaimed: count(reclaimed),
        })
    }
}

/// Deletes `key` from `map` if it still holds `judged`: takes the entry
/// out and gets back what it held, in one step
/// (BPF_MAP_LOOKUP_AND_DELETE_ELEM), and puts anything else back, unless
/// the datapath made the key anew meanwhile. True if `judged` went.
fn take_if<V: aya::Pod + PartialEq>(
    map: &mut HashMap<MapData, FlowKey, V>,
    key: &FlowKey,
    judged: &V,
) -> Result<bool> {
    let held = lookup_and_delete::<FlowKey, V>(map.map().fd().as_fd(), key);
    match held.context("deleting a NAT entry")? {
        None => Ok(false),
        Some(held) if held == *judged => Ok(true),
        Some(held) => {
            match map.insert(key, held, BPF_NOEXIST) {
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                r => r.context("putting back a live NAT entry")?,
            }
            Ok(false)
        }
    }
}

/// BPF_MAP_LOOKUP_AND_DELETE_ELEM on a hash map (Linux 5.14): `None` if
/// the key is not there. aya offers it for queues and stacks only.
fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    map: std::os::fd::BorrowedFd<'_>,
    key: &K,
) -> std::io::Result<Option<V>> {
    /// The map-element member of the kernel's `union bpf_attr`.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` names a key and a value buffer of the map's own key
    // and value types, both alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if rc == 0 {
        // SAFETY: the kernel wrote the whole value.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        e => Err(e),
    }
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
    /// A service's entry (the swap to its new table), and its SNAT
    /// addresses.
    Service(ServiceKey, Service, SnatPool),
    RemoveService(ServiceKey),
    /// Zeroes the counters of a reused service id.
    ResetServiceCounters(u32),
    /// Zeroes the counters and signals of a reused backend id.
    ResetBackendCounters(u32),
    /// An egress interface the datapath may redirect to.
    TxPort(u32),
    /// The MACs frames are balanced to: each interface's own
    /// `(ifindex, MAC)`, plus `extra` on every one of them.
    AcceptedMacs {
        interfaces: Vec<(u32, Mac)>,
        extra: Vec<Mac>,
    },
    /// No MAC is balanced on this index any more: the interface that had
    /// it was re-created under a new one.
    ForgetMacs(u32),
    Globals(Globals),
}

/// NAT table use after a sweep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NatOccupancy {
    /// Translated flows (client-side entries) still live.
    pub flows: u32,
    /// Source ports held by flows still live (a dead flow's port is free
    /// to the datapath, though its entry may not be deleted yet).
    pub reverse: u32,
    /// Capacity of each table.
    pub capacity: u32,
    /// Source ports this sweep freed (reverse entries it deleted).
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
fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        n => format!("proto {n}"),
    }
}
