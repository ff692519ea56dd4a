//! The control plane's model of the datapath: which services and backends
//! exist, their ids and table regions, and the Maglev tables programmed for
//! them. `apply` takes a configuration to the datapath touching only what
//! changed; health and admin changes go through `set_health` and `set_admin`.
//! The controller owns the maps: it is their only writer, but for the NAT
//! sweeper it hands out, which only deletes idle NAT entries.
//!
//! Every change is planned, then written. Planning works on a copy of the
//! model and produces the complete new state as a list of map writes (ids,
//! table regions, Maglev tables, backend entries with their next hops,
//! which come resolved from `neigh::Resolver`) without touching the kernel;
//! if anything fails there (no route to a backend, no free id, no room
//! for a table) nothing is written and the model is unchanged. Only then
//! are the writes made, and the copy becomes the model.
//!
//! Order of writes, so that no packet ever sees a half-made state:
//! 1. backend entries (a backend is complete before any table names it);
//! 2. the new Maglev table, into the half of the service's region that the
//!    datapath is not reading;
//! 3. the service entry, pointing at that half: one map update, the swap;
//! 4. only then, backends that left the table are marked draining or down.
//!
//! A controller built over maps pinned by an earlier daemon adopts their
//! ids and regions (`adopt`), so flows pinned to backend ids keep their
//! backend across a daemon restart.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use tracing::{error, info, warn};
use xdp_common::{
    Backend, Globals, Service, SnatPool, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING,
    MAGLEV_SLOTS, MAX_BACKENDS, MAX_SERVICES, SVC_F_HASH_SRC_ONLY, SVC_F_NAT, SVC_F_NAT_RETRY,
    SVC_F_NO_BACKEND, SVC_F_SECOND_HALF, UNRESOLVED_MAC,
};

use crate::{
    addr,
    cluster::{fingerprint::fingerprint, macs::Mac},
    config::{Admin, AllDown, BackendConfig, Config, HashFields, Mode, ServiceConfig},
    dataplane::{Maps, NatSweeper, Write},
    maglev::{self, MaglevBackend},
    neigh::{self, Resolved, Resolver, Target},
};

/// Identity of a service: VIP, port, protocol number.
pub type ServiceId = (IpAddr, u16, u8);
/// Identity of a backend within a service.
pub type BackendAddr = (IpAddr, u16);
/// Service name -> each of its backends' health.
type Verdicts = HashMap<String, BTreeMap<BackendAddr, bool>>;

/// One backend of one service.
#[derive(Clone, Debug)]
pub struct BackendState {
    pub id: u32,
    pub config: BackendConfig,
    pub admin: Admin,
    pub healthy: bool,
    /// What the datapath was last told (`BACKEND_*`).
    pub state: u32,
    /// The MAC the datapath rewrites to, once resolved.
    pub mac: Option<[u8; 6]>,
    pub ifindex: u32,
    src_mac: [u8; 6],
    /// NAT: the source address the backend sees.
    pub snat: Option<IpAddr>,
    /// When the backend stopped taking new flows while keeping established
    /// ones (drain, weight 0); after the service's drain timeout those flows
    /// are moved too.
    draining_since: Option<Instant>,
}

impl BackendState {
    /// `address:port`, the backend's identity in messages and Maglev keys.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.config.address, self.config.port)
    }

    /// May take new flows, health allowing.
    fn eligible(&self) -> bool {
        self.admin == Admin::Up && self.config.weight > 0
    }

    fn entry(&self, service: u32) -> Backend {
        Backend {
            addr: addr::to_words(self.config.address),
            dst_mac: self.mac.unwrap_or(UNRESOLVED_MAC),
            src_mac: self.src_mac,
            ifindex: self.ifindex,
            state: self.state,
            snat_addr: self.snat.map(addr::to_words).unwrap_or_default(),
            service,
            port_be: self.config.port.to_be(),
            _pad: [0; 2],
        }
    }
}

/// One service.
#[derive(Clone, Debug)]
pub struct ServiceState {
    pub id: u32,
    pub config: ServiceConfig,
    pub backends: BTreeMap<BackendAddr, BackendState>,
    /// First slot of the service's two table halves.
    region: u32,
    /// Which half the datapath reads (0 or 1).
    active_half: u32,
    /// The table the datapath reads, as backend ids (empty: none).
    table: Arc<Vec<u32>>,
    /// Whether the service's entry is in the map (its table is live).
    programmed: bool,
    /// Whether the service is failing open (every backend unhealthy).
    pub failing_open: bool,
    /// The table's fingerprint, computed when the table is built (the API
    /// shows it on every call).
    fingerprint: String,
}

impl ServiceState {
    /// Each backend's health.
    fn verdicts(&self) -> BTreeMap<BackendAddr, bool> {
        self.backends.iter().map(|(k, b)| (*k, b.healthy)).collect()
    }

    fn table_base(&self, half: u32) -> u32 {
        self.region + half * self.config.table_size
    }

    /// Its SNAT addresses as the datapath reads them (none: count 0).
    fn snat_pool(&self) -> SnatPool {
        let mut pool = SnatPool::default();
        for (slot, a) in pool.addrs.iter_mut().zip(&self.config.nat.snat_addresses) {
            *slot = addr::to_words(*a);
            pool.count += 1;
        }
        pool
    }

    fn entry(&self) -> Service {
        let nat = &self.config.nat;
        let nat_mode = self.config.mode == Mode::Nat;
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        let flags = flag(self.config.hash == HashFields::Source, SVC_F_HASH_SRC_ONLY)
            | flag(self.table.is_empty(), SVC_F_NO_BACKEND)
            | flag(self.active_half == 1, SVC_F_SECOND_HALF)
            | flag(nat_mode, SVC_F_NAT)
            | flag(nat_mode && nat.retry_refused, SVC_F_NAT_RETRY);
        let secs = |d: Duration| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX);
        Service {
            id: self.id,
            flags,
            table_base: self.table_base(self.active_half),
            table_size: self.config.table_size,
            nat_port_base: nat.ports.0,
            // The range is inclusive and may hold 64512 ports: saturate.
            nat_port_count: u16::try_from(u32::from(nat.ports.1) - u32::from(nat.ports.0) + 1)
                .unwrap_or(u16::MAX),
            nat_tcp_timeout: secs(nat.tcp_timeout),
            nat_closing_timeout: secs(nat.tcp_closing_timeout),
            nat_udp_timeout: secs(nat.udp_timeout),
        }
    }

    /// Backend by id.
    pub fn backend_by_id(&self, id: u32) -> Option<&BackendState> {
        self.backends.values().find(|b| b.id == id)
    }

    /// The table the datapath reads (slot -> backend id; empty: none).
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// The fingerprint of [`Self::table`] (see `cluster::fingerprint`).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Number of backends taking new flows.
    pub fn active(&self) -> usize {
        self.backends
            .values()
            .filter(|b| b.state == BACKEND_ACTIVE)
            .count()
    }
}

/// First-fit allocator of id or slot ranges.
#[derive(Clone, Debug)]
struct Ranges {
    free: BTreeMap<u32, u32>, // start -> len
}

impl Ranges {
    fn new(len: u32) -> Self {
        Self {
            free: BTreeMap::from([(0, len)]),
        }
    }

    fn alloc(&mut self, len: u32) -> Option<u32> {
        let (&start, _) = self.free.iter().find(|(_, &l)| l >= len)?;
        self.take(start, len).then_some(start)
    }

    /// Allocates exactly `start..start + len`, if free.
    fn take(&mut self, start: u32, len: u32) -> bool {
        let Some((&s, &l)) = self.free.range(..=start).next_back() else {
            return false;
        };
        if s + l < start + len {
            return false;
        }
        self.free.remove(&s);
        if start > s {
            self.free.insert(s, start - s);
        }
        if s + l > start + len {
            self.free.insert(start + len, s + l - start - len);
        }
        true
    }

    fn release(&mut self, mut start: u32, mut len: u32) {
        if let Some((&s, &l)) = self.free.range(..start).next_back() {
            if s + l == start {
                self.free.remove(&s);
                start = s;
                len += l;
            }
        }
        if let Some(l) = self.free.remove(&(start + len)) {
            len += l;
        }
        self.free.insert(start, len);
    }
}

/// What an earlier daemon left in pinned maps, waiting to be matched
/// against the configuration.
#[derive(Clone, Debug, Default)]
struct Adoptable {
    /// Service key -> its entry.
    services: HashMap<ServiceId, Service>,
    /// (service id, address, port) -> (backend id, datapath state).
    backends: HashMap<(u32, IpAddr, u16), (u32, u32)>,
}

/// The control plane's view of the datapath, and the only writer of its
/// maps.
pub struct Controller {
    maps: Maps,
    model: Model,
    resolver: Arc<Resolver>,
    /// Backend ids and addresses as of the last `apply`, for replication.
    directory: SharedDirectory,
}

/// Which backend an id is, and which id a backend is: flow pins travel
/// between nodes by address, as ids are each node's own.
#[derive(Debug, Default)]
pub struct Directory {
    by_id: HashMap<u32, (ServiceId, SocketAddr)>,
    by_addr: HashMap<(ServiceId, SocketAddr), u32>,
}

impl Directory {
    fn of(model: &Model) -> Self {
        let mut d = Directory::default();
        for (key, s) in &model.services {
            for b in s.backends.values() {
                d.by_id.insert(b.id, (*key, b.addr()));
                d.by_addr.insert((*key, b.addr()), b.id);
            }
        }
        d
    }

    /// The service and address of backend `id`.
    pub fn backend(&self, id: u32) -> Option<(ServiceId, SocketAddr)> {
        self.by_id.get(&id).copied()
    }

    /// The id of `backend` of `service`.
    pub fn id(&self, service: ServiceId, backend: SocketAddr) -> Option<u32> {
        self.by_addr.get(&(service, backend)).copied()
    }
}

/// The controller's directory as it changes: read it with
/// `read().clone()` and drop the guard at once.
pub type SharedDirectory = Arc<RwLock<Arc<Directory>>>;

/// What the datapath holds (or, while a change is planned, will hold).
#[derive(Clone, Debug)]
struct Model {
    services: BTreeMap<ServiceId, ServiceState>,
    service_ids: Ranges,
    backend_ids: Ranges,
    slots: Ranges,
    all_down: AllDown,
    adoptable: Adoptable,
    /// `(ifindex, own MAC)` of every interface the datapath is attached to.
    interfaces: Vec<(u32, Mac)>,
    /// `[cluster] extra_macs`, as the datapath accepts them.
    extra_macs: Vec<Mac>,
    /// What the planned change will log once it is written (empty at rest):
    /// a change refused while planned, or whose writes fail, logs nothing.
    notes: Vec<Note>,
}

/// A log line of a planned change: `key=value` fields after the message, as
/// tracing prints them.
#[derive(Clone, Debug)]
enum Note {
    Info(String),
    Warn(String),
}

fn service_id(cfg: &ServiceConfig) -> ServiceId {
    (cfg.vip, cfg.port, cfg.protocol.number())
}

impl Controller {
    /// A controller for `maps`. If they hold an earlier daemon's state
    /// (pinned maps), it is adopted by the first `apply`: services and
    /// backends that are still configured keep their ids, regions and
    /// health; the rest are removed.
    pub fn new(maps: Maps) -> Result<Self> {
        let mut adoptable = Adoptable::default();
        for entry in maps.services.iter() {
            let (key, svc) = entry.context("reading pinned services")?;
            let id = (
                addr::from_words(key.addr),
                u16::from_be(key.port_be),
                key.proto,
            );
            adoptable.services.insert(id, svc);
        }
        if !adoptable.services.is_empty() {
            for id in 0..MAX_BACKENDS {
                let b = maps.backend(id)?;
                if b.addr != [0; 4] {
                    let key = (b.service, addr::from_words(b.addr), u16::from_be(b.port_be));
                    adoptable.backends.insert(key, (id, b.state));
                }
            }
            info!(
                services = adoptable.services.len(),
                backends = adoptable.backends.len(),
                "adopting a running datapath"
            );
        }
        Ok(Self {
            maps,
            model: Model {
                services: BTreeMap::new(),
                service_ids: Ranges::new(MAX_SERVICES),
                backend_ids: Ranges::new(MAX_BACKENDS),
                slots: Ranges::new(MAGLEV_SLOTS),
                all_down: AllDown::FailOpen,
                adoptable,
                interfaces: Vec::new(),
                extra_macs: Vec::new(),
                notes: Vec::new(),
            },
            resolver: Arc::default(),
            directory: Arc::default(),
        })
    }

    /// Whether this controller found a running datapath to adopt.
    pub fn adopting(&self) -> bool {
        !self.model.adoptable.services.is_empty()
    }

    /// The services, in key order.
    pub fn services(&self) -> impl Iterator<Item = &ServiceState> {
        self.model.services.values()
    }

    /// A service by its name.
    pub fn service_by_name(&self, name: &str) -> Option<&ServiceState> {
        self.model.services.values().find(|s| s.config.name == name)
    }

    /// The maps, to read (counters, `xdplb flow`); only the controller
    /// writes them.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The next-hop resolver `apply` reads. Resolve with it before
    /// `apply` (`Resolver::prepare`) without holding locks, and `apply`
    /// will not wait on the kernel.
    pub(crate) fn resolver(&self) -> Arc<Resolver> {
        self.resolver.clone()
    }

    /// Makes a planned change: writes it, then adopts the planned model.
    fn commit(&mut self, mut next: Model, writes: &[Write]) -> Result<()> {
        self.maps.write(writes)?;
        for note in next.notes.drain(..) {
            match note {
                Note::Info(text) => info!("{text}"),
                Note::Warn(text) => warn!("{text}"),
            }
        }
        self.model = next;
        Ok(())
    }

    /// Backend ids and addresses, kept current by every change.
    pub(crate) fn directory(&self) -> SharedDirectory {
        self.directory.clone()
    }

    /// The flow table, for replication (see `FlowTable`).
    pub(crate) fn flow_table(&self) -> Result<crate::dataplane::FlowTable> {
        self.maps.flow_table()
    }

    /// Takes the datapath to `config`: adds, changes and removes services
    /// and backends, rebuilding only the tables whose members changed.
    /// The whole change is planned first (capacity, ids, regions, tables,
    /// next hops); if any of it fails, nothing is written.
    pub fn apply(&mut self, config: &Config) -> Result<()> {
        let mut next = self.model.clone();
        let mut writes = Vec::new();
        next.apply(config, &self.resolver, &mut writes)?;
        self.commit(next, &writes)?;
        // Ids and addresses change only here (health and admin changes
        // keep them), so only here is the directory rebuilt.
        let directory = Arc::new(Directory::of(&self.model));
        *self.directory.write().unwrap_or_else(|p| p.into_inner()) = directory;
        Ok(())
    }

    /// Readies the datapath for an interface before it is attached there:
    /// frames to `mac` (and to the configured extra MACs) are balanced,
    /// and NAT replies to clients may leave through it.
    pub fn add_interface(&mut self, ifindex: u32, mac: Mac) -> Result<()> {
        let mut next = self.model.clone();
        next.interfaces.push((ifindex, mac));
        let writes = [Write::TxPort(ifindex), next.accepted_macs()];
        self.commit(next, &writes)?;
        self.resolver.attached(&self.model.interfaces);
        Ok(())
    }

    /// Follows the `i`th attached interface (in the order they were added)
    /// to its index and MAC now: a change of its own MAC (frames to the new
    /// one are balanced, the old one's passed), or an interface re-created
    /// under the same name, which has a new index (the datapath accepts
    /// MACs per ingress index, so until then it would pass every frame
    /// arriving there). Returns the old index and MAC if either changed.
    pub fn set_interface(
        &mut self,
        i: usize,
        ifindex: u32,
        mac: Mac,
    ) -> Result<Option<(u32, Mac)>> {
        let old = *self.model.interfaces.get(i).with_context(|| {
            format!(
                "the datapath is attached to {} interfaces, not {}",
                self.model.interfaces.len(),
                i + 1
            )
        })?;
        if old == (ifindex, mac) {
            return Ok(None);
        }
        let mut next = self.model.clone();
        next.interfaces[i] = (ifindex, mac);
        let mut writes = vec![next.accepted_macs()];
        if old.0 != ifindex {
            // NAT replies leave through the interface their client came in on.
            writes.extend([Write::TxPort(ifindex), Write::ForgetMacs(old.0)]);
        }
        self.commit(next, &writes)?;
        self.resolver.attached(&self.model.interfaces);
        Ok(Some(old))
    }

    /// The NAT sweeper: the one other writer of the maps, which only
    /// deletes idle NAT entries (tables the controller never writes), so it
    /// runs without the controller.
    pub(crate) fn nat_sweeper(&self) -> Result<NatSweeper> {
        self.maps.nat_sweeper()
    }

    /// Moves the flows of backends that have been draining longer than
    /// their service's drain timeout: the datapath re-picks them. Returns
    /// the backends it expired.
    pub fn expire_drains(&mut self, now: Instant) -> Result<Vec<(String, SocketAddr)>> {
        let is_over = |b: &BackendState, timeout: Duration| {
            b.draining_since
                .is_some_and(|t| now.duration_since(t) >= timeout)
        };
        // Usually nothing is draining: then the model is not even copied.
        if !self.model.services.values().any(|svc| {
            let timeout = svc.config.drain_timeout;
            svc.backends.values().any(|b| is_over(b, timeout))
        }) {
            return Ok(Vec::new());
        }
        let mut next = self.model.clone();
        let mut writes = Vec::new();
        let mut expired = Vec::new();
        for svc in next.services.values_mut() {
            let timeout = svc.config.drain_timeout;
            for b in svc.backends.values_mut() {
                if is_over(b, timeout) {
                    b.draining_since = None;
                    b.state = BACKEND_DOWN;
                    writes.push(Write::Backend(b.id, b.entry(svc.id)));
                    expired.push((svc.config.name.clone(), b.addr()));
                }
            }
        }
        self.commit(next, &writes)?;
        for (service, backend) in &expired {
            info!(
                %service,
                %backend,
                "drain timeout passed: remaining flows move to other backends"
            );
        }
        Ok(expired)
    }

    /// The backends' next-hop targets, for `Resolver::refresh`.
    pub(crate) fn next_hop_targets(&self) -> Vec<Target> {
        neigh::targets(self.services().map(|s| &s.config))
    }

    /// Rewrites the backends whose next hop changed in `hops` (a MAC
    /// resolved late or changed). Fast: resolve first, without locks.
    pub(crate) fn update_next_hops(&mut self, hops: &HashMap<Target, Resolved>) -> Result<()> {
        // The new (MAC, ifindex, source MAC) of `b`, if it changed.
        let changed = |svc: &ServiceConfig, b: &BackendState| {
            let via_router = svc.mode == Mode::Nat;
            let Some(Ok(hop)) = hops.get(&(b.config.address, via_router)) else {
                return None;
            };
            // Keep the last known MAC while the kernel re-verifies it.
            let now = (hop.dst_mac.or(b.mac), hop.ifindex, hop.src_mac);
            (now != (b.mac, b.ifindex, b.src_mac)).then_some(now)
        };
        // Usually nothing changed: then the model is not even copied.
        let services = || self.model.services.values();
        if !services().any(|s| s.backends.values().any(|b| changed(&s.config, b).is_some())) {
            return Ok(());
        }
        let mut next = self.model.clone();
        let mut writes = Vec::new();
        for svc in next.services.values_mut() {
            for b in svc.backends.values_mut() {
                let Some((mac, ifindex, src_mac)) = changed(&svc.config, b) else {
                    continue;
                };
                let note = format!("backend next hop updated backend={} mac={mac:?}", b.addr());
                next.notes.push(Note::Info(note));
                (b.mac, b.ifindex, b.src_mac) = (mac, ifindex, src_mac);
                writes.push(Write::TxPort(ifindex));
                writes.push(Write::Backend(b.id, b.entry(svc.id)));
            }
        }
        self.commit(next, &writes)
    }

    /// Records health-check verdicts `(service, backend, healthy)` as one
    /// change: a service gets one new table however many of its backends
    /// changed. (When a rack fails, hundreds of verdicts arrive at once; a
    /// rebuild each queued the last one 20 s behind the first.) Returns,
    /// per verdict, whether it changed anything, or why it was skipped (a
    /// backend removed meanwhile); the error is a failed write, which
    /// leaves everything as it was.
    pub fn set_health(
        &mut self,
        verdicts: &[(&str, BackendAddr, bool)],
    ) -> Result<Vec<Result<bool>>> {
        let mut next = self.model.clone();
        let mut changed = BTreeSet::new();
        let outcomes: Vec<Result<bool>> = verdicts
            .iter()
            .map(|&(service, backend, healthy)| {
                let (key, b) = next.backend_mut(service, backend)?;
                let change = b.healthy != healthy;
                b.healthy = healthy;
                if change {
                    changed.insert(key);
                }
                Ok(change)
            })
            .collect();
        if changed.is_empty() {
            return Ok(outcomes);
        }
        let mut writes = Vec::new();
        for key in changed {
            next.sync(key, &mut writes)?;
        }
        self.commit(next, &writes)?;
        Ok(outcomes)
    }

    /// Sets a backend's admin state (drain/undrain/down); rebuilds the
    /// table if it changed. Returns whether it did.
    pub fn set_admin(&mut self, service: &str, backend: BackendAddr, admin: Admin) -> Result<bool> {
        let mut next = self.model.clone();
        let (key, b) = next.backend_mut(service, backend)?;
        if b.admin == admin {
            return Ok(false);
        }
        b.admin = admin;
        let mut writes = Vec::new();
        next.sync(key, &mut writes)?;
        self.commit(next, &writes)?;
        Ok(true)
    }
}

impl Model {
    /// Plans the change to `config` into `writes`.
    fn apply(&mut self, config: &Config, hops: &Resolver, writes: &mut Vec<Write>) -> Result<()> {
        check_capacity(config)?;
        let all_down_changed = self.all_down != config.daemon.all_down;
        self.all_down = config.daemon.all_down;
        let wanted: BTreeMap<ServiceId, &ServiceConfig> =
            config.services.iter().map(|s| (service_id(s), s)).collect();
        let gone: Vec<ServiceId> = self
            .services
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        // The health of the backends of services re-created here (a new
        // VIP, port, protocol or table size), by service name: the health
        // checker keys its targets by service name and backend, so it keeps
        // their verdicts and reports no change. A dead backend re-created
        // healthy would take new flows until it came back and failed again.
        let mut verdicts = Verdicts::new();
        for key in gone {
            let svc = self.remove_service(key, writes);
            verdicts.insert(svc.config.name.clone(), svc.verdicts());
        }
        for (key, cfg) in wanted {
            match self.services.get(&key) {
                Some(s) if s.config == *cfg => {
                    if all_down_changed {
                        self.sync(key, writes)?;
                    }
                }
                Some(s) if s.config.table_size != cfg.table_size => {
                    // A new table size needs a new region: re-create.
                    let svc = self.remove_service(key, writes);
                    self.add_service(cfg, hops, writes, Some(&svc.verdicts()))?;
                }
                Some(_) => self.update_service(key, cfg, hops, writes)?,
                None => self.add_service(cfg, hops, writes, verdicts.get(&cfg.name))?,
            }
        }
        self.finish_adoption(writes);
        if self.extra_macs != config.cluster.extra_macs {
            self.extra_macs.clone_from(&config.cluster.extra_macs);
            if !self.interfaces.is_empty() {
                writes.push(self.accepted_macs());
            }
        }
        let nat_enabled = u32::from(self.services.values().any(|s| s.config.mode == Mode::Nat));
        let replicate = u32::from(config.cluster.replicating().is_some());
        writes.push(Write::Globals(Globals {
            nat_enabled,
            replicate,
        }));
        Ok(())
    }

    /// The write that makes the datapath balance frames to exactly the
    /// interfaces' own MACs and the extra MACs.
    fn accepted_macs(&self) -> Write {
        Write::AcceptedMacs {
            interfaces: self.interfaces.clone(),
            extra: self.extra_macs.clone(),
        }
    }

    /// Removes what an adopted datapath had that the configuration does not.
    fn finish_adoption(&mut self, writes: &mut Vec<Write>) {
        let adoptable = std::mem::take(&mut self.adoptable);
        for key in adoptable.services.keys() {
            if !self.services.contains_key(key) {
                writes.push(Write::RemoveService(addr::service_key(key.0, key.1, key.2)));
                self.notes.push(Note::Info(format!(
                    "service of the adopted datapath is no longer configured: removed vip={} \
                     port={}",
                    key.0, key.1
                )));
            }
        }
        for (id, _) in adoptable.backends.values() {
            if !self
                .services
                .values()
                .any(|s| s.backends.values().any(|b| b.id == *id))
            {
                writes.push(Write::Backend(*id, Backend::default()));
            }
        }
    }

    /// Adds service `cfg`; its backends found in `verdicts` (those of the
    /// service it re-creates) keep their health.
    fn add_service(
        &mut self,
        cfg: &ServiceConfig,
        hops: &Resolver,
        writes: &mut Vec<Write>,
        verdicts: Option<&BTreeMap<BackendAddr, bool>>,
    ) -> Result<()> {
        let key = service_id(cfg);
        let size = cfg.table_size;
        // An adopted service keeps its id and region: the datapath reads it.
        let adopted = self.adoptable.services.remove(&key).and_then(|s| {
            let half = u32::from(s.flags & SVC_F_SECOND_HALF != 0);
            let region = s.table_base.checked_sub(half * size)?;
            let taken = s.table_size == size
                && self.service_ids.take(s.id, 1)
                && (self.slots.take(region, 2 * size) || {
                    self.service_ids.release(s.id, 1);
                    false
                });
            taken.then_some((s.id, region, half))
        });
        let (id, region, active_half) = match adopted {
            Some(adopted) => adopted,
            None => {
                let id = self.service_ids.alloc(1).context("no free service id")?;
                let region = self.slots.alloc(2 * size).with_context(|| {
                    format!(
                        "no room for service {}'s Maglev table (fragmented); restart the \
                         daemon to compact",
                        cfg.name
                    )
                })?;
                writes.push(Write::ResetServiceCounters(id));
                (id, region, 0)
            }
        };
        let mut svc = ServiceState {
            id,
            config: cfg.clone(),
            backends: BTreeMap::new(),
            region,
            active_half,
            table: Arc::default(),
            programmed: adopted.is_some(),
            failing_open: false,
            fingerprint: fingerprint(&[], |_| None),
        };
        for b in &cfg.backends {
            let mut state = self.new_backend(id, cfg, b, hops, writes)?;
            if let Some(&healthy) = verdicts.and_then(|v| v.get(&(b.address, b.port))) {
                state.healthy = healthy;
            }
            svc.backends.insert((b.address, b.port), state);
        }
        self.notes.push(Note::Info(format!(
            "service added service={} vip={} port={} protocol={} backends={} adopted={}",
            cfg.name,
            cfg.vip,
            cfg.port,
            cfg.protocol,
            svc.backends.len(),
            adopted.is_some()
        )));
        self.services.insert(key, svc);
        self.sync(key, writes)
    }

    fn update_service(
        &mut self,
        key: ServiceId,
        cfg: &ServiceConfig,
        hops: &Resolver,
        writes: &mut Vec<Write>,
    ) -> Result<()> {
        let svc = self.services.get_mut(&key).expect("caller checked");
        let service_id = svc.id;
        let wanted: BTreeMap<BackendAddr, &BackendConfig> = cfg
            .backends
            .iter()
            .map(|b| ((b.address, b.port), b))
            .collect();
        let leaving: Vec<BackendState> = svc
            .backends
            .extract_if(.., |k, _| !wanted.contains_key(k))
            .map(|(_, b)| b)
            .collect();
        let mut added = Vec::new();
        for (k, b) in &wanted {
            match svc.backends.get_mut(k) {
                Some(state) => {
                    if state.config.state != b.state {
                        state.admin = b.state;
                    }
                    state.config = **b;
                }
                None => added.push(**b),
            }
        }
        svc.config = cfg.clone();
        for b in &added {
            let state = self.new_backend(service_id, cfg, b, hops, writes)?;
            let svc = self.services.get_mut(&key).expect("present");
            svc.backends.insert((b.address, b.port), state);
        }
        self.sync(key, writes)?;
        // Settings the table does not show (hashing, NAT ports, timeouts,
        // retries) reach the datapath in the service entry: write it even
        // when the table stayed the same.
        let svc = &self.services[&key];
        let skey = addr::service_key(key.0, key.1, key.2);
        let written = writes
            .iter()
            .any(|w| matches!(w, Write::Service(k, ..) if *k == skey));
        if svc.programmed && !written {
            writes.push(Write::Service(skey, svc.entry(), svc.snat_pool()));
        }
        // Removed backends leave only after the new table is live.
        for mut b in leaving {
            b.state = BACKEND_DOWN;
            writes.push(Write::Backend(b.id, b.entry(service_id)));
            self.backend_ids.release(b.id, 1);
            let note = format!("backend removed service={} backend={}", cfg.name, b.addr());
            self.notes.push(Note::Info(note));
        }
        Ok(())
    }

    fn remove_service(&mut self, key: ServiceId, writes: &mut Vec<Write>) -> ServiceState {
        let svc = self.services.remove(&key).expect("caller checked");
        writes.push(Write::RemoveService(addr::service_key(key.0, key.1, key.2)));
        for b in svc.backends.values() {
            writes.push(Write::Backend(b.id, Backend::default()));
            self.backend_ids.release(b.id, 1);
        }
        self.slots.release(svc.region, 2 * svc.config.table_size);
        self.service_ids.release(svc.id, 1);
        let note = format!("service removed service={}", svc.config.name);
        self.notes.push(Note::Info(note));
        svc
    }

    fn new_backend(
        &mut self,
        service: u32,
        svc: &ServiceConfig,
        cfg: &BackendConfig,
        hops: &Resolver,
        writes: &mut Vec<Write>,
    ) -> Result<BackendState> {
        let addr = SocketAddr::new(cfg.address, cfg.port);
        let nat = svc.mode == Mode::Nat;
        let hop = hops
            .hop((cfg.address, nat))
            .map_err(|e| anyhow::anyhow!("backend {addr}: {e}"))?;
        let snat = nat
            .then(|| svc.nat.snat_addresses.first().copied().or(hop.src_addr))
            .flatten();
        if nat && snat.is_none() {
            bail!("backend {addr}: no source address on the route to it; set nat.snat_address");
        }
        // An adopted backend keeps its id (flows are pinned to it) and the
        // health its datapath state implies. One the operator keeps from new
        // flows (down, weight 0, or drained past its drain timeout) is down
        // there whatever its health: it starts healthy, as a new backend
        // does, and its checks say otherwise if it is not.
        let adopted = self
            .adoptable
            .backends
            .remove(&(service, cfg.address, cfg.port))
            .filter(|(id, _)| self.backend_ids.take(*id, 1));
        let held_out = cfg.state != Admin::Up || cfg.weight == 0;
        let (id, healthy) = match adopted {
            Some((id, state)) => (id, state != BACKEND_DOWN || held_out),
            None => {
                let id = self.backend_ids.alloc(1).context("no free backend id")?;
                writes.push(Write::ResetBackendCounters(id));
                (id, true)
            }
        };
        if hop.dst_mac.is_none() {
            self.notes.push(Note::Warn(format!(
                "backend MAC unresolved: its packets go to the kernel until it answers ARP/ND \
                 backend={addr} iface={}",
                hop.ifname
            )));
        }
        writes.push(Write::TxPort(hop.ifindex));
        Ok(BackendState {
            id,
            config: *cfg,
            admin: cfg.state,
            healthy,
            state: BACKEND_DOWN,
            mac: hop.dst_mac,
            ifindex: hop.ifindex,
            src_mac: hop.src_mac,
            snat,
            draining_since: None,
        })
    }

    /// Plans a service's backends, rebuilds its table if its members
    /// changed, swaps it in, and retires leavers.
    fn sync(&mut self, key: ServiceId, writes: &mut Vec<Write>) -> Result<()> {
        let all_down = self.all_down;
        let svc = self.services.get_mut(&key).expect("caller checked");
        let eligible: Vec<&BackendState> = svc.backends.values().filter(|b| b.eligible()).collect();
        let healthy: Vec<&BackendState> = eligible.iter().copied().filter(|b| b.healthy).collect();
        let failing_open =
            healthy.is_empty() && !eligible.is_empty() && all_down == AllDown::FailOpen;
        let members = if failing_open { &eligible } else { &healthy };
        if members.is_empty() && !eligible.is_empty() && !svc.table.is_empty() {
            error!(service = %svc.config.name, "every backend is down: dropping new flows \
                (all_down = \"drop\")");
        }
        if failing_open && !svc.failing_open {
            error!(service = %svc.config.name, "every backend is down: failing open, new flows go \
                to all of them regardless of health");
        }
        svc.failing_open = failing_open;
        let member_addrs: HashMap<u32, SocketAddr> =
            members.iter().map(|b| (b.id, b.addr())).collect();
        let keyed: Vec<MaglevBackend> = members
            .iter()
            .map(|b| MaglevBackend {
                key: b.addr().to_string(),
                id: b.id,
                weight: b.config.weight,
            })
            .collect();
        let table = maglev::build(&keyed, svc.config.table_size)
            .with_context(|| format!("building the Maglev table of service {}", svc.config.name))?;

        let now = Instant::now();
        let new_state = |b: &BackendState| {
            if member_addrs.contains_key(&b.id) {
                BACKEND_ACTIVE
            } else if b.healthy && b.admin != Admin::Down {
                BACKEND_DRAINING
            } else {
                BACKEND_DOWN
            }
        };
        // 1. Joining backends are complete before a table names them.
        for b in svc.backends.values_mut() {
            let state = new_state(b);
            if state == BACKEND_ACTIVE && b.state != BACKEND_ACTIVE {
                b.state = state;
                b.draining_since = None;
                writes.push(Write::Backend(b.id, b.entry(svc.id)));
            }
        }
        // 2.+3. New table into the idle half, then the swap.
        let exists = svc.programmed;
        if *table != *svc.table || !exists {
            if exists {
                svc.active_half = 1 - svc.active_half;
            }
            let table = Arc::new(table);
            writes.push(Write::Table {
                base: svc.table_base(svc.active_half),
                table: table.clone(),
            });
            svc.fingerprint = fingerprint(&table, |id| member_addrs.get(&id).copied());
            svc.table = table;
            svc.programmed = true;
            writes.push(Write::Service(
                addr::service_key(key.0, key.1, key.2),
                svc.entry(),
                svc.snat_pool(),
            ));
            self.notes.push(Note::Info(format!(
                "Maglev table swapped in service={} members={}",
                svc.config.name,
                member_addrs.len()
            )));
        }
        // 4. Leavers stop only now.
        for b in svc.backends.values_mut() {
            let state = new_state(b);
            if state != b.state {
                b.draining_since = (state == BACKEND_DRAINING).then_some(now);
                b.state = state;
                writes.push(Write::Backend(b.id, b.entry(svc.id)));
            } else if !exists {
                writes.push(Write::Backend(b.id, b.entry(svc.id)));
            }
        }
        Ok(())
    }

    fn backend_mut(
        &mut self,
        service: &str,
        backend: BackendAddr,
    ) -> Result<(ServiceId, &mut BackendState)> {
        let (key, svc) = self
            .services
            .iter_mut()
            .find(|(_, s)| s.config.name == service)
            .with_context(|| format!("no service named {service:?}"))?;
        let b = svc.backends.get_mut(&backend).with_context(|| {
            format!(
                "service {service:?} has no backend {}",
                SocketAddr::new(backend.0, backend.1)
            )
        })?;
        Ok((*key, b))
    }
}

fn check_capacity(config: &Config) -> Result<()> {
    if config.services.len() > MAX_SERVICES as usize {
        bail!(
            "{} services configured; the datapath holds at most {MAX_SERVICES}",
            config.services.len()
        );
    }
    let backends: usize = config.services.iter().map(|s| s.backends.len()).sum();
    if backends > MAX_BACKENDS as usize {
        bail!("{backends} backends configured; the datapath holds at most {MAX_BACKENDS}");
    }
    let slots: u64 = config
        .services
        .iter()
        .map(|s| 2 * u64::from(s.table_size))
        .sum();
    if slots > u64::from(MAGLEV_SLOTS) {
        bail!(
            "the services' Maglev tables need {slots} slots (two per table entry, for atomic \
             swaps); the datapath holds {MAGLEV_SLOTS}: use fewer services or smaller table_size"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Ranges;

    #[test]
    fn ranges_allocate_first_fit_and_coalesce() {
        let mut r = Ranges::new(100);
        let a = r.alloc(30).unwrap();
        let b = r.alloc(30).unwrap();
        let c = r.alloc(40).unwrap();
        assert_eq!((a, b, c), (0, 30, 60));
        assert!(r.alloc(1).is_none());
        r.release(b, 30);
        r.release(a, 30);
        assert_eq!(r.alloc(60), Some(0), "freed neighbours coalesce");
        r.release(0, 60);
        r.release(60, 40);
        assert_eq!(r.alloc(100), Some(0));
    }

    #[test]
    fn ranges_take_exact_ranges() {
        let mut r = Ranges::new(100);
        assert!(r.take(40, 20));
        assert!(!r.take(50, 1), "already taken");
        assert!(!r.take(30, 20), "overlaps");
        assert_eq!(r.alloc(40), Some(0));
        assert_eq!(r.alloc(40), Some(60));
        r.release(40, 20);
        assert!(r.take(40, 20));
    }
}
