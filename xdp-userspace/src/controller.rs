//! The control plane's model of the datapath: which services and backends
//! exist, their ids and table regions, and the Maglev tables programmed for
//! them. `apply` takes a configuration to the datapath touching only what
//! changed; health and admin state changes go through `set_health` and
//! `set_admin`.
//!
//! Order of writes, so that no packet ever sees a half-made state:
//! 1. backend entries (a backend is complete before any table names it);
//! 2. the new Maglev table, into the half of the service's region that the
//!    datapath is not reading;
//! 3. the service entry, pointing at that half: one map update, the swap;
//! 4. only then, backends that left the table are marked draining or down.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use tracing::{info, warn};
use xdp_common::{
    Backend, Service, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, MAGLEV_SLOTS, MAX_BACKENDS,
    MAX_SERVICES, SVC_F_HASH_SRC_ONLY,
};

use crate::{
    addr,
    config::{BackendConfig, Config, HashFields, InitialState, ServiceConfig},
    dataplane::Maps,
    maglev::{self, MaglevBackend},
    neigh,
};

/// Identity of a service: VIP, port, protocol number.
pub type ServiceId = (IpAddr, u16, u8);
/// Identity of a backend within a service.
pub type BackendAddr = (IpAddr, u16);

/// Whether an operator lets a backend take traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    Up,
    Drain,
    Down,
}

impl From<InitialState> for Admin {
    fn from(s: InitialState) -> Self {
        match s {
            InitialState::Up => Admin::Up,
            InitialState::Drain => Admin::Drain,
            InitialState::Down => Admin::Down,
        }
    }
}

/// One backend of one service.
#[derive(Clone, Debug, Serialize)]
pub struct BackendState {
    pub id: u32,
    pub config: BackendConfig,
    pub admin: Admin,
    pub healthy: bool,
    /// The MAC the datapath rewrites to, once resolved.
    pub mac: Option<[u8; 6]>,
    pub ifindex: u32,
    #[serde(skip)]
    src_mac: [u8; 6],
}

impl BackendState {
    /// Takes new flows: in the Maglev table.
    pub fn in_table(&self) -> bool {
        self.healthy && self.admin == Admin::Up && self.config.weight > 0
    }

    /// The datapath state (`BACKEND_*`).
    pub fn datapath_state(&self) -> u32 {
        if self.in_table() {
            BACKEND_ACTIVE
        } else if self.healthy && self.admin != Admin::Down {
            // Drained (admin or weight 0): established flows stay.
            BACKEND_DRAINING
        } else {
            BACKEND_DOWN
        }
    }

    fn entry(&self) -> Backend {
        Backend {
            addr: addr::to_words(self.config.address),
            dst_mac: self.mac.unwrap_or_default(),
            src_mac: self.src_mac,
            ifindex: self.ifindex,
            state: self.datapath_state(),
            port_be: self.config.port.to_be(),
            _pad: [0; 2],
        }
    }

    fn key(&self) -> String {
        SocketAddr::new(self.config.address, self.config.port).to_string()
    }
}

/// One service.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceState {
    pub id: u32,
    pub config: ServiceConfig,
    pub backends: BTreeMap<BackendAddr, BackendState>,
    /// First slot of the service's two table halves.
    region: u32,
    /// Which half the datapath reads (0 or 1).
    active_half: u32,
    /// The table the datapath reads, as backend ids (empty: none).
    #[serde(skip)]
    table: Vec<u32>,
}

impl ServiceState {
    fn table_base(&self, half: u32) -> u32 {
        self.region + half * self.config.table_size
    }

    fn entry(&self) -> Service {
        Service {
            id: self.id,
            flags: if self.config.hash == HashFields::Source { SVC_F_HASH_SRC_ONLY } else { 0 },
            table_base: self.table_base(self.active_half),
            table_size: if self.table.is_empty() { 0 } else { self.config.table_size },
        }
    }

    /// Backend by id.
    pub fn backend_by_id(&self, id: u32) -> Option<&BackendState> {
        self.backends.values().find(|b| b.id == id)
    }
}

/// First-fit allocator of id or slot ranges.
#[derive(Debug)]
struct Ranges {
    free: BTreeMap<u32, u32>, // start -> len
}

impl Ranges {
    fn new(len: u32) -> Self {
        Self { free: BTreeMap::from([(0, len)]) }
    }

    fn alloc(&mut self, len: u32) -> Option<u32> {
        let (&start, &have) = self.free.iter().find(|(_, &l)| l >= len)?;
        self.free.remove(&start);
        if have > len {
            self.free.insert(start + len, have - len);
        }
        Some(start)
    }

    fn release(&mut self, start: u32, len: u32) {
        let (mut start, mut len) = (start, len);
        if let Some((&s, &l)) = self.free.range(..start).next_back() {
            if s + l == start {
                self.free.remove(&s);
                start = s;
                len += l;
            }
        }
        if let Some(&l) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += l;
        }
        self.free.insert(start, len);
    }
}

/// How long to wait for a new backend's MAC before programming it
/// unresolved (the datapath then hands its packets to the kernel and
/// counts them until a refresh resolves it).
const RESOLVE_WAIT: Duration = Duration::from_secs(1);

/// The control plane's view of the datapath, and the only writer of its
/// maps.
pub struct Controller {
    pub maps: Maps,
    services: BTreeMap<ServiceId, ServiceState>,
    service_ids: Ranges,
    backend_ids: Ranges,
    slots: Ranges,
}

fn service_id(cfg: &ServiceConfig) -> ServiceId {
    (cfg.vip, cfg.port, cfg.protocol.number())
}

impl Controller {
    /// A controller for freshly loaded (or adopted) maps.
    pub fn new(maps: Maps) -> Self {
        Self {
            maps,
            services: BTreeMap::new(),
            service_ids: Ranges::new(MAX_SERVICES),
            backend_ids: Ranges::new(MAX_BACKENDS),
            slots: Ranges::new(MAGLEV_SLOTS),
        }
    }

    /// The services, in key order.
    pub fn services(&self) -> impl Iterator<Item = &ServiceState> {
        self.services.values()
    }

    /// A service by its name.
    pub fn service_by_name(&self, name: &str) -> Option<&ServiceState> {
        self.services.values().find(|s| s.config.name == name)
    }

    /// Takes the datapath to `config`: adds, changes and removes services
    /// and backends, rebuilding only the tables whose backends changed.
    /// Capacity is checked before anything is written.
    pub fn apply(&mut self, config: &Config) -> Result<()> {
        self.check_capacity(config)?;
        let wanted: BTreeMap<ServiceId, &ServiceConfig> =
            config.services.iter().map(|s| (service_id(s), s)).collect();
        let gone: Vec<ServiceId> = self.services.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for key in gone {
            self.remove_service(key)?;
        }
        for (key, cfg) in wanted {
            match self.services.get(&key) {
                Some(s) if s.config == *cfg => {}
                Some(s) if s.config.table_size != cfg.table_size => {
                    // A new table size needs a new region: re-create.
                    self.remove_service(key)?;
                    self.add_service(cfg)?;
                }
                Some(_) => self.update_service(key, cfg)?,
                None => self.add_service(cfg)?,
            }
        }
        Ok(())
    }

    fn check_capacity(&self, config: &Config) -> Result<()> {
        if config.services.len() > MAX_SERVICES as usize {
            bail!("{} services configured; the datapath holds at most {MAX_SERVICES}", config.services.len());
        }
        let backends: usize = config.services.iter().map(|s| s.backends.len()).sum();
        if backends > MAX_BACKENDS as usize {
            bail!("{backends} backends configured; the datapath holds at most {MAX_BACKENDS}");
        }
        let slots: u64 = config.services.iter().map(|s| 2 * u64::from(s.table_size)).sum();
        if slots > u64::from(MAGLEV_SLOTS) {
            bail!(
                "the services' Maglev tables need {slots} slots (two per table entry, for atomic swaps); \
                 the datapath holds {MAGLEV_SLOTS}: use fewer services or smaller table_size"
            );
        }
        Ok(())
    }

    fn add_service(&mut self, cfg: &ServiceConfig) -> Result<()> {
        let id = self.service_ids.alloc(1).context("no free service id")?;
        let Some(region) = self.slots.alloc(2 * cfg.table_size) else {
            self.service_ids.release(id, 1);
            bail!("no room for service {}'s Maglev table (fragmented); restart the daemon to compact", cfg.name);
        };
        self.maps.reset_counters(Some(id), None)?;
        let mut svc = ServiceState {
            id,
            config: cfg.clone(),
            backends: BTreeMap::new(),
            region,
            active_half: 0,
            table: Vec::new(),
        };
        for b in &cfg.backends {
            let state = self.new_backend(b)?;
            svc.backends.insert((b.address, b.port), state);
        }
        info!(service = %cfg.name, vip = %cfg.vip, port = cfg.port, protocol = %cfg.protocol, backends = svc.backends.len(), "service added");
        let key = service_id(cfg);
        self.services.insert(key, svc);
        self.sync(key)
    }

    fn update_service(&mut self, key: ServiceId, cfg: &ServiceConfig) -> Result<()> {
        let svc = self.services.get_mut(&key).expect("caller checked");
        let wanted: BTreeMap<BackendAddr, &BackendConfig> =
            cfg.backends.iter().map(|b| ((b.address, b.port), b)).collect();
        let removed: Vec<BackendAddr> = svc.backends.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        let mut leaving = Vec::new();
        for k in removed {
            leaving.push(svc.backends.remove(&k).expect("listed"));
        }
        let mut added = Vec::new();
        for (k, b) in &wanted {
            match svc.backends.get_mut(k) {
                Some(state) => {
                    if state.config.state != b.state {
                        state.admin = b.state.into();
                    }
                    state.config = (*b).clone();
                }
                None => added.push(**b),
            }
        }
        svc.config = cfg.clone();
        for b in added.iter() {
            let state = self.new_backend(b)?;
            self.services.get_mut(&key).expect("present").backends.insert((b.address, b.port), state);
        }
        self.sync(key)?;
        // Removed backends leave only after the new table is live.
        for mut b in leaving {
            b.healthy = false;
            self.maps.backends.set(b.id, b.entry(), 0)?;
            self.backend_ids.release(b.id, 1);
            info!(service = %cfg.name, backend = %b.key(), "backend removed");
        }
        Ok(())
    }

    fn remove_service(&mut self, key: ServiceId) -> Result<()> {
        let svc = self.services.remove(&key).expect("caller checked");
        let skey = addr::service_key(key.0, key.1, key.2);
        self.maps.services.remove(&skey).with_context(|| format!("removing service {}", svc.config.name))?;
        for b in svc.backends.values() {
            let mut gone = b.clone();
            gone.healthy = false;
            self.maps.backends.set(b.id, gone.entry(), 0)?;
            self.backend_ids.release(b.id, 1);
        }
        self.slots.release(svc.region, 2 * svc.config.table_size);
        self.service_ids.release(svc.id, 1);
        info!(service = %svc.config.name, "service removed");
        Ok(())
    }

    fn new_backend(&mut self, cfg: &BackendConfig) -> Result<BackendState> {
        let id = self.backend_ids.alloc(1).context("no free backend id")?;
        self.maps.reset_counters(None, Some(id))?;
        let mut state = BackendState {
            id,
            config: cfg.clone(),
            admin: cfg.state.into(),
            healthy: true,
            mac: None,
            ifindex: 0,
            src_mac: [0; 6],
        };
        match neigh::resolve(cfg.address, RESOLVE_WAIT) {
            Ok(hop) => {
                state.mac = hop.dst_mac;
                state.ifindex = hop.ifindex;
                state.src_mac = hop.src_mac;
                if hop.dst_mac.is_none() {
                    warn!(backend = %state.key(), iface = %hop.ifname, "backend MAC unresolved: its packets go to the kernel until it answers ARP/ND");
                }
                self.maps
                    .tx_ports
                    .insert(hop.ifindex, hop.ifindex, None, 0)
                    .with_context(|| format!("adding {} to the egress devmap", hop.ifname))?;
            }
            Err(err) => {
                self.backend_ids.release(id, 1);
                return Err(err.context(format!("backend {}", state.key())));
            }
        }
        Ok(state)
    }

    /// Writes a service's backends, rebuilds its table if its set of
    /// table members changed, swaps it in, and retires leavers.
    fn sync(&mut self, key: ServiceId) -> Result<()> {
        let svc = self.services.get_mut(&key).expect("caller checked");
        for b in svc.backends.values() {
            if b.in_table() {
                self.maps.backends.set(b.id, b.entry(), 0)?;
            }
        }
        let members: Vec<MaglevBackend> = svc
            .backends
            .values()
            .filter(|b| b.in_table())
            .map(|b| MaglevBackend { key: b.key(), id: b.id, weight: b.config.weight })
            .collect();
        let table = maglev::build(&members, svc.config.table_size)
            .with_context(|| format!("building the Maglev table of service {}", svc.config.name))?;
        let skey = addr::service_key(key.0, key.1, key.2);
        let exists = self.maps.services.get(&skey, 0).is_ok();
        if table != svc.table || !exists {
            let next = if exists { 1 - svc.active_half } else { svc.active_half };
            self.maps.write_table(svc.table_base(next), &table)?;
            svc.active_half = next;
            svc.table = table;
            self.maps.services.insert(skey, svc.entry(), 0).context("swapping in the new table")?;
            info!(service = %svc.config.name, members = members.len(), "Maglev table swapped in");
        }
        for b in svc.backends.values() {
            if !b.in_table() {
                self.maps.backends.set(b.id, b.entry(), 0)?;
            }
        }
        Ok(())
    }

    /// Re-reads backends' next hops and rewrites those that changed (a
    /// backend's MAC resolved late or changed). Cheap; call every few
    /// seconds.
    pub fn refresh_neighbours(&mut self) -> Result<()> {
        for svc in self.services.values_mut() {
            for b in svc.backends.values_mut() {
                let wait = if b.mac.is_none() { Duration::from_millis(100) } else { Duration::ZERO };
                let Ok(hop) = neigh::resolve(b.config.address, wait) else { continue };
                // Keep the last known MAC while the kernel re-verifies it.
                let mac = hop.dst_mac.or(b.mac);
                if (mac, hop.ifindex, hop.src_mac) != (b.mac, b.ifindex, b.src_mac) {
                    info!(backend = %b.key(), mac = ?mac, "backend next hop updated");
                    (b.mac, b.ifindex, b.src_mac) = (mac, hop.ifindex, hop.src_mac);
                    self.maps.backends.set(b.id, b.entry(), 0)?;
                    self.maps.tx_ports.insert(hop.ifindex, hop.ifindex, None, 0)?;
                }
            }
        }
        Ok(())
    }

    fn backend_mut(&mut self, service: &str, backend: BackendAddr) -> Result<(ServiceId, &mut BackendState)> {
        let (key, svc) = self
            .services
            .iter_mut()
            .find(|(_, s)| s.config.name == service)
            .with_context(|| format!("no service named {service:?}"))?;
        let b = svc
            .backends
            .get_mut(&backend)
            .with_context(|| format!("service {service:?} has no backend {}", SocketAddr::new(backend.0, backend.1)))?;
        Ok((*key, b))
    }

    /// Records a health-check verdict; rebuilds the table if it changed.
    pub fn set_health(&mut self, service: &str, backend: BackendAddr, healthy: bool) -> Result<bool> {
        let (key, b) = self.backend_mut(service, backend)?;
        if b.healthy == healthy {
            return Ok(false);
        }
        b.healthy = healthy;
        self.sync(key)?;
        Ok(true)
    }

    /// Sets a backend's admin state (drain/undrain/down); rebuilds the
    /// table if it changed.
    pub fn set_admin(&mut self, service: &str, backend: BackendAddr, admin: Admin) -> Result<bool> {
        let (key, b) = self.backend_mut(service, backend)?;
        if b.admin == admin {
            return Ok(false);
        }
        b.admin = admin;
        self.sync(key)?;
        Ok(true)
    }

    /// Backend ids currently taking new flows, per service name (for tests
    /// and status).
    pub fn table_members(&self, service: &str) -> BTreeSet<u32> {
        self.service_by_name(service).map(|s| s.table.iter().copied().collect()).unwrap_or_default()
    }
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
}
