//! `xdplb run`: the always-on daemon. It loads (or adopts) the datapath,
//! programs it from the configuration plus the operator's run-time
//! changes, attaches it, then serves: health checks, the API, SIGHUP
//! reloads, drain timeouts and next-hop refreshes (on the kernel's link,
//! neighbour and route announcements, and every 5 s as a fallback).
//!
//! Stopping: SIGTERM (a service manager's stop or restart) and SIGKILL leave
//! the datapath attached and forwarding with its last tables, for the next
//! `xdplb run` to adopt; SIGINT (Ctrl-C at a terminal) detaches and removes
//! every pin, as `xdplb detach --all` does.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    api::{self, ApiError, BackendRef, DatapathState, Done, Request},
    cluster::{
        macs::{interface_mac, show, Mac},
        replication::{self, Replicator},
    },
    config::{Admin, Config, Mode, ServiceConfig, ServiceKey},
    controller::{Controller, ServiceState},
    dataplane::{monotonic_coarse_ns, Maps, NatOccupancy, NatSweeper},
    health::{CheckTarget, HealthChecker, HealthEvent},
    loader::{self, AttachMode, Datapath},
    lock::PinDirLock,
    neigh::{self, Resolver},
    passive,
    state::{Overlay, Staged},
    systemd,
};

/// What `xdplb run` was asked to do: its command-line arguments.
#[derive(clap::Args)]
pub struct Options {
    /// The TOML configuration.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Interface to attach to (repeatable).
    #[arg(long = "iface", short, value_name = "IFACE", required = true)]
    pub ifaces: Vec<String>,
    /// XDP attach mode.
    #[arg(
        long = "xdp-mode",
        value_name = "XDP_MODE",
        value_enum,
        default_value = "auto"
    )]
    pub mode: AttachMode,
    /// bpffs directory for maps and links (default: the config's `daemon.pin_dir`).
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// API socket (default: the config's `daemon.api_socket`).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Run-time state file (default: the config's `daemon.state_file`).
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Run even if the pin directory's bpffs is private to this mount
    /// namespace (as under `ip netns exec`): the datapath's pins then
    /// vanish with the daemon and no restart can adopt them.
    #[arg(long)]
    pub allow_private_bpffs: bool,
}

/// How often next hops are re-resolved when the kernel announces nothing:
/// the fallback for announcements lost or never made (a neighbour whose MAC
/// changed without the kernel being told, until its entry is re-verified).
/// Less often past [`NEXT_HOP_FALLBACK_RATE`] targets a second.
const NEXT_HOP_PERIOD: Duration = Duration::from_secs(5);
/// Next-hop targets the fallback re-resolves a second at most (every 10 s
/// at 10,000 backends), so that its cost stays bounded at any scale: each is
/// a route look-up over netlink, about 3.5 µs of CPU. Announced changes are
/// followed at once whatever the scale.
const NEXT_HOP_FALLBACK_RATE: u32 = 1000;
/// How long a refresh waits after a next hop's announced change, so that a
/// burst (a gateway failover, a flushed table: hundreds of announcements)
/// is one refresh, not hundreds.
const NEXT_HOP_SETTLE: Duration = Duration::from_millis(50);

/// Open files kept for everything but health probes: the API's
/// connections (`api::server::MAX_CONNECTIONS`), maps, programs, links,
/// netlink sockets, the state and log files.
const RESERVED_FILES: u64 = 256;

/// Raises the soft limit on open files to the hard limit: every health
/// check holds a socket, every API client one more, and the default soft
/// limit (often 1024, or less under a service manager) is not the
/// administrator's intent the hard limit is. Returns the soft limit in
/// force (1024 if unknown).
fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: valid pointers; plain system calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let soft = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                warn!(
                    "raising the open-files limit to {}: {}",
                    limit.rlim_max,
                    std::io::Error::last_os_error()
                );
                return soft;
            }
        }
    }
    limit.rlim_cur
}

/// Health probes that may run at once: as many as the open-files limit
/// (`files`) leaves after [`RESERVED_FILES`] (each full connect holds a
/// socket; a half-open TCP check holds none and takes no slot). A probe
/// holds its slot until it is answered or times out, so a fixed small cap
/// let silent backends starve the checks of the others: with 64 slots and
/// 10,000 backends of which a few per cent dropped SYNs (500 ms timeouts),
/// every backend was checked about every 3.3 s instead of every 1 s. Each
/// backend has at most one probe in flight, so their number bounds this
/// anyway.
fn probe_slots(files: u64) -> usize {
    usize::try_from(files.saturating_sub(RESERVED_FILES))
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Everything the API, the health checker and the signal handlers share.
struct Daemon {
    inner: Mutex<Inner>,
    /// Held through a whole change, so that the slow part (resolving new
    /// backends' next hops) runs without `inner`: health events and reads
    /// never wait behind it.
    changing: Mutex<()>,
    /// The controller's next-hop resolver, used without `inner`.
    resolver: Arc<Resolver>,
    /// The controller's NAT sweeper, used without `inner`.
    sweeper: Mutex<NatSweeper>,
    config_path: PathBuf,
    state_file: PathBuf,
    pin_dir: PathBuf,
    started: Instant,
    adopted: bool,
    /// In the order they were added to the controller: the `i`th is the
    /// controller's interface `i` (see `Controller::set_interface`).
    interfaces: Vec<api::InterfaceView>,
    /// Times the datapath was found detached and attached again, and why
    /// it was last.
    repairs: Mutex<(u64, Option<String>)>,
    /// Flow-state replication to cluster peers, when configured.
    replicator: Option<Replicator>,
}

struct Inner {
    controller: Controller,
    /// The configuration file as last loaded.
    file: Config,
    /// The operator's run-time changes on top of it.
    overlay: Overlay,
    /// `file` + `overlay`: what the datapath is programmed with.
    config: Config,
    health: HealthChecker,
    /// NAT table use at the last sweep (when a NAT service exists).
    nat: Option<NatOccupancy>,
    /// Announced VIPs (docs/cluster.md).
    cluster: crate::cluster::Node,
    /// Passive failure detection, and its suspicions per (service,
    /// backend): how many, and the last one's numbers.
    passive: passive::Detector,
    suspicions: HashMap<(String, (IpAddr, u16)), (u64, String)>,
}

impl Inner {
    /// Re-derives the announced routes; a failure is logged and retried
    /// on the next tick, never undoes the change that led here.
    fn sync_cluster(&mut self) {
        if let Err(e) = self.cluster.sync(&self.config, &self.controller) {
            error!("cluster: {e:#}");
        }
    }
}

impl Daemon {
    fn repairs_lock(&self) -> MutexGuard<'_, (u64, Option<String>)> {
        self.repairs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the datapath as it was;
        // keep serving rather than poisoning every later call.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change of the overlay and/or the file: merge, validate,
    /// persist, program. The change is all or nothing: one that does not
    /// validate, cannot be persisted or cannot be programmed leaves both the
    /// maps and the state file as they were.
    fn change(
        &self,
        reload_file: bool,
        edit: impl FnOnce(&mut Overlay, &Config) -> Result<String, ApiError>,
    ) -> Result<Value, ApiError> {
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let (file, mut overlay, config) = {
            let inner = self.lock();
            (
                inner.file.clone(),
                inner.overlay.clone(),
                inner.config.clone(),
            )
        };
        let file = if reload_file {
            let new = Config::load(&self.config_path)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            if new.cluster.replication != file.cluster.replication {
                return Err(ApiError::bad_request(
                    "not changed: [cluster] replication settings (replication_listen, \
                     replication_key, replicate, peers) take effect at the next start; restart \
                     the daemon to change them",
                ));
            }
            if let Some(key) = file.daemon.start_only_change(&new.daemon) {
                return Err(ApiError::bad_request(format!(
                    "not changed: daemon.{key} takes effect at the next start; restart the \
                     daemon to change it"
                )));
            }
            new
        } else {
            file
        };
        let message = edit(&mut overlay, &config)?;
        let merged = overlay
            .merge(&file)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        // Slow (next hops of new backends), so without the lock; `apply`
        // then finds them resolved.
        self.resolver.prepare(&merged);
        // Written and flushed first, put in place last: a change that could
        // not be persisted would be lost at the next start. One that leaves
        // the run-time changes as they are (a reload) has nothing to persist,
        // and does not need a writable state directory.
        let staged = (self.lock().overlay != overlay)
            .then(|| overlay.stage(&self.state_file))
            .transpose()
            .map_err(|e| {
                ApiError::internal(format!("not changed: cannot persist the change: {e:#}"))
            })?;
        let mut inner = self.lock();
        let applied = inner
            .controller
            .apply(&merged)
            .context("cannot program the datapath")
            .and_then(|()| {
                staged
                    .map_or(Ok(()), Staged::commit)
                    .context("cannot persist the change")
            });
        if let Err(e) = applied {
            // Back to the configuration the state file still describes.
            let Inner {
                controller, config, ..
            } = &mut *inner;
            if let Err(undo) = controller.apply(config) {
                error!("restoring the previous configuration after a failed change: {undo:#}");
            }
            return Err(ApiError::internal(format!("not changed: {e:#}")));
        }
        let targets = check_targets(&merged, &inner.controller);
        inner.health.update(targets);
        (inner.file, inner.overlay, inner.config) = (file, overlay, merged);
        inner.sync_cluster();
        info!("{message}");
        Ok(json!(Done { message }))
    }

    /// Applies health verdicts, all that arrived together in one change
    /// (see `Controller::set_health`).
    fn on_health(&self, events: &[HealthEvent]) {
        let mut inner = self.lock();
        let verdicts: Vec<_> = events
            .iter()
            .map(|e| (e.service.as_str(), e.backend, e.healthy))
            .collect();
        let outcomes = match inner.controller.set_health(&verdicts) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                error!("applying {} health verdicts: {e:#}", events.len());
                return;
            }
        };
        inner.sync_cluster();
        for (event, outcome) in events.iter().zip(outcomes) {
            let (service, detail) = (&event.service, &event.detail);
            let backend = SocketAddr::new(event.backend.0, event.backend.1);
            match outcome {
                Ok(_) if event.healthy => info!(%service, %backend, %detail, "backend is UP"),
                Ok(_) => warn!(
                    %service, %backend, %detail,
                    table_swap_ms = event.at.elapsed().as_millis() as u64,
                    "backend is DOWN: new flows avoid it, its established flows move on their \
                     next packet"
                ),
                // The backend was removed meanwhile.
                Err(e) => warn!("health event for {service}: {e:#}"),
            }
        }
    }

    /// Passive detection's look at the traffic: each suspect is logged
    /// with its numbers and probed at once (see `passive`). Returns when
    /// to look again: at 10,000 backends, waking every 25 ms to find it
    /// too early cost more than the looks.
    fn passive(&self) -> Duration {
        let mut inner = self.lock();
        let Inner {
            controller,
            passive,
            health,
            suspicions,
            ..
        } = &mut *inner;
        let (suspects, read) = passive.tick(controller, Instant::now());
        for s in suspects {
            // A backend without checks cannot be probed: its suspicions
            // are counted (views) but not logged, once a second each.
            if health.suspect(&s.service, s.backend, s.why.clone()) {
                let backend = SocketAddr::new(s.backend.0, s.backend.1);
                warn!(service = %s.service, %backend, "suspected by its traffic: {}; probing it \
                    now, it goes down only if the probe fails", s.why);
            }
            let entry = suspicions.entry((s.service, s.backend)).or_default();
            entry.0 += 1;
            entry.1 = s.why;
        }
        paced(passive::PERIOD, read, passive::MAX_JUDGED)
    }

    /// Once a second: expires drains, re-derives the announced routes and
    /// sweeps the NAT tables.
    fn tick(&self) -> Duration {
        let nat_in_use = {
            let mut inner = self.lock();
            if let Err(e) = inner.controller.expire_drains(Instant::now()) {
                error!("expiring drains: {e:#}");
            }
            inner.sync_cluster();
            inner.config.services.iter().any(|s| s.mode == Mode::Nat)
        };
        // Reading the NAT tables is slow when they are full: without the lock.
        let nat = if nat_in_use {
            let mut sweeper = self.sweeper.lock().unwrap_or_else(|p| p.into_inner());
            sweeper
                .sweep(monotonic_coarse_ns())
                .inspect_err(|e| error!("sweeping NAT tables: {e:#}"))
                .ok()
        } else {
            None
        };
        self.lock().nat = nat;
        Duration::from_secs(1)
    }

    /// Re-resolves backends' next hops without the lock, then writes the
    /// ones that changed, and follows the attached interfaces (see
    /// [`Self::follow_interfaces`]). Returns how many next hops it
    /// re-resolved.
    fn refresh(&self) -> usize {
        let targets = self.lock().controller.next_hop_targets();
        let hops = self.resolver.refresh(&targets);
        if let Err(e) = self.lock().controller.update_next_hops(&hops) {
            warn!("refreshing backend next hops: {e:#}");
        }
        self.follow_interfaces();
        targets.len()
    }

    /// Follows a change of an attached interface's own MAC (an
    /// administrator's `ip link set address`, a bond's failover) or of its
    /// index (the interface deleted and re-created under its name, see
    /// [`repair_attachments`]): the datapath must keep balancing the frames
    /// that arrive on it.
    fn follow_interfaces(&self) {
        let now: Vec<Result<(u32, Mac)>> = (self.interfaces.iter())
            .map(|i| {
                loader::interface_index(&i.name)
                    .and_then(|index| Ok((index, interface_mac(&i.name)?)))
            })
            .collect();
        let mut inner = self.lock();
        for (i, (iface, now)) in self.interfaces.iter().zip(now).enumerate() {
            let iface = &iface.name;
            let changed = now.and_then(|(index, mac)| {
                let old = inner.controller.set_interface(i, index, mac)?;
                Ok(old.map(|old| (old, (index, mac))))
            });
            match changed {
                Ok(Some(((old_index, _), (index, mac)))) if old_index != index => warn!(%iface,
                    "the interface was re-created (index {old_index}, now {index}, MAC {}); \
                    frames to it are balanced again", show(&mac)),
                Ok(Some(((_, old), (_, new)))) => warn!(%iface, "the interface's MAC changed \
                    from {} to {}; frames to the new one are balanced now", show(&old), show(&new)),
                Ok(None) => {}
                Err(e) => warn!(%iface, "following the interface's MAC: {e:#}"),
            }
        }
    }
}

/// One health-check target per backend whose service checks it.
fn check_targets(config: &Config, controller: &Controller) -> Vec<CheckTarget> {
    config
        .services
        .iter()
        .flat_map(|s| {
            let state = controller.service_by_name(&s.name);
            s.backends.iter().map(move |b| CheckTarget {
                service: s.name.clone(),
                backend: (b.address, b.port),
                check: s.health_check.clone(),
                initially_healthy: state
                    .and_then(|st| st.backends.get(&(b.address, b.port)))
                    .is_none_or(|st| st.healthy),
            })
        })
        .collect()
}

/// The configured service named `name`.
fn service_config<'a>(config: &'a Config, name: &str) -> Result<&'a ServiceConfig, ApiError> {
    config
        .services
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| ApiError::not_found(format!("no service named {name:?}")))
}

/// The configured backend `r` names, as `address:port`. Without a port:
/// the backend on the service's port, or else the only one at that address
/// (NAT backends often listen on another port than the VIP's).
fn backend_ref(config: &Config, r: &BackendRef) -> Result<SocketAddr, ApiError> {
    let svc = service_config(config, &r.service)?;
    let at_address: Vec<SocketAddr> = svc
        .backends
        .iter()
        .map(|b| SocketAddr::new(b.address, b.port))
        .filter(|a| a.ip() == r.address)
        .collect();
    let wanted = SocketAddr::new(r.address, r.port.unwrap_or(svc.port));
    match at_address[..] {
        _ if at_address.contains(&wanted) => Ok(wanted),
        [only] if r.port.is_none() => Ok(only),
        [_, _, ..] if r.port.is_none() => {
            let ports: Vec<String> = at_address.iter().map(|a| a.port().to_string()).collect();
            Err(ApiError::not_found(format!(
                "service {:?} has several backends at {} (ports {}): give the port",
                r.service,
                r.address,
                ports.join(", ")
            )))
        }
        _ => Err(ApiError::not_found(format!(
            "service {:?} has no backend {wanted}",
            r.service
        ))),
    }
}

impl api::Handler for Daemon {
    fn handle(&self, request: Request) -> Result<Value, ApiError> {
        match request {
            Request::Status => Ok(json!(self.status())),
            Request::ListServices => {
                let inner = self.lock();
                Ok(json!(inner
                    .controller
                    .services()
                    .map(|s| service_view(&inner, s))
                    .collect::<Vec<_>>()))
            }
            Request::ListBackends { service } => {
                let inner = self.lock();
                if let Some(name) = &service {
                    service_config(&inner.config, name)?;
                }
                let views: Vec<_> = inner
                    .controller
                    .services()
                    .filter(|s| service.as_ref().is_none_or(|n| *n == s.config.name))
                    .flat_map(|s| service_view(&inner, s).backends)
                    .collect();
                Ok(json!(views))
            }
            Request::AddService(spec) => self.change(false, |o, config| {
                // The file's service wins over a run-time one of its name
                // (see `state`): adding it would change nothing, while
                // answering that it was added.
                if service_config(config, &spec.name).is_ok() && !o.adds_service(&spec.name) {
                    return Err(ApiError::new(
                        409,
                        format!(
                            "service {:?} is defined in the configuration file {}: change it \
                             there and reload",
                            spec.name,
                            self.config_path.display()
                        ),
                    ));
                }
                Ok(format!("service {} added", o.add_service(*spec)))
            }),
            Request::RemoveService { name } => self.change(false, |o, config| {
                service_config(config, &name)?;
                o.remove_service(&name);
                Ok(format!("service {name} removed"))
            }),
            Request::AddBackend { service, backend } => self.change(false, |o, config| {
                let svc = service_config(config, &service)?;
                let addr = o.add_backend(&service, backend, svc.port);
                // One from the file would win over the new one, whatever
                // its weight: refused like a duplicate of a run-time one.
                if svc
                    .backends
                    .iter()
                    .any(|b| SocketAddr::new(b.address, b.port) == addr)
                {
                    return Err(ApiError::new(
                        409,
                        format!("service {service:?} already has backend {addr}"),
                    ));
                }
                Ok(format!("backend {addr} added to service {service}"))
            }),
            Request::RemoveBackend(r) => self.change(false, |o, config| {
                let addr = backend_ref(config, &r)?;
                o.remove_backend(&r.service, addr, service_config(config, &r.service)?.port);
                Ok(format!("backend {addr} removed from service {}", r.service))
            }),
            Request::Drain(r) => self.set_admin(&r, Admin::Drain, "drained"),
            Request::Undrain(r) => self.set_admin(&r, Admin::Up, "undrained"),
            Request::Reload => self.change(true, |_, _| {
                Ok(format!("reloaded {}", self.config_path.display()))
            }),
            Request::Flow { src, dst, protocol } => {
                api::check_flow(src, dst)?;
                let key = ServiceKey {
                    vip: dst.ip(),
                    port: dst.port(),
                    protocol,
                };
                let inner = self.lock();
                let svc = inner
                    .controller
                    .services()
                    .find(|s| s.config.key() == key)
                    .ok_or_else(|| ApiError::not_found(format!("no service at {key}")))?;
                let route = inner
                    .controller
                    .maps()
                    .route(src, dst, protocol.number())
                    .map_err(|e| ApiError::not_found(format!("{e:#}")))?;
                let backend_state = svc
                    .backend_by_id(route.backend_id)
                    .map_or(DatapathState::Down, |b| DatapathState::of(b.state));
                Ok(json!(api::FlowView {
                    service: svc.config.name.clone(),
                    backend: route.backend,
                    backend_state,
                    established: route.established,
                    replicated: route.replicated,
                    new_flow_backend: route.new_flow_backend,
                    hash: route.hash,
                    slot: route.slot,
                    nat: route.nat,
                }))
            }
            Request::ClusterLeave | Request::ClusterJoin => {
                let mut inner = self.lock();
                if inner.config.cluster.route_table.is_none() {
                    return Err(ApiError::bad_request(
                        "no [cluster] route_table configured: this node announces nothing",
                    ));
                }
                let (result, message) = if request == Request::ClusterLeave {
                    (inner.cluster.leave(), "left: every VIP route withdrawn")
                } else {
                    (inner.cluster.join(), "joined: servable VIPs announced")
                };
                result.map_err(|e| ApiError::internal(format!("{e:#}")))?;
                info!("cluster: {message}");
                Ok(json!(Done {
                    message: message.into()
                }))
            }
            Request::Stats => {
                let inner = self.lock();
                let maps = inner.controller.maps();
                let reasons = maps
                    .reason_counts()
                    .map_err(|e| ApiError::internal(format!("{e:#}")))?
                    .into_iter()
                    .map(|(r, n)| (r.name().to_owned(), n))
                    .collect();
                let services = inner
                    .controller
                    .services()
                    .map(|s| api::ServiceStatsView {
                        name: s.config.name.clone(),
                        traffic: maps.service_counters(s.id).unwrap_or_default().into(),
                        backends: s
                            .backends
                            .values()
                            .map(|b| api::BackendStatsView {
                                address: b.config.address,
                                port: b.config.port,
                                traffic: maps.backend_counters(b.id).unwrap_or_default().into(),
                            })
                            .collect(),
                    })
                    .collect();
                let nat = inner.nat;
                drop(inner);
                Ok(json!(api::StatsView {
                    reasons,
                    services,
                    nat,
                    replication: self.replicator.as_ref().map(Replicator::view),
                }))
            }
        }
    }
}

impl Daemon {
    fn set_admin(&self, r: &BackendRef, admin: Admin, verb: &str) -> Result<Value, ApiError> {
        self.change(false, |o, config| {
            let addr = backend_ref(config, r)?;
            o.set_admin(&r.service, addr, admin);
            Ok(format!("backend {addr} of service {} {verb}", r.service))
        })
    }

    fn status(&self) -> api::StatusView {
        let (datapath_repairs, datapath_problem) = self.repairs_lock().clone();
        let inner = self.lock();
        let services: Vec<&ServiceState> = inner.controller.services().collect();
        api::StatusView {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            config: self.config_path.display().to_string(),
            pin_dir: self.pin_dir.display().to_string(),
            adopted: self.adopted,
            interfaces: self.interfaces.clone(),
            services: services.len(),
            backends: services.iter().map(|s| s.backends.len()).sum(),
            backends_active: services.iter().map(|s| s.active()).sum(),
            datapath_repairs,
            datapath_problem,
            fingerprints: services
                .iter()
                .map(|s| (s.config.name.clone(), s.fingerprint().to_owned()))
                .collect(),
            cluster: inner.cluster.view(),
            replication: self.replicator.as_ref().map(Replicator::view),
        }
    }
}

fn service_view(inner: &Inner, s: &ServiceState) -> api::ServiceView {
    let maps = inner.controller.maps();
    let cfg: &ServiceConfig = &s.config;
    api::ServiceView {
        name: cfg.name.clone(),
        vip: cfg.vip,
        port: cfg.port,
        protocol: cfg.protocol,
        mode: cfg.mode,
        table_size: cfg.table_size,
        hash: cfg.hash,
        fingerprint: s.fingerprint().to_owned(),
        traffic: maps.service_counters(s.id).unwrap_or_default().into(),
        backends: s
            .backends
            .values()
            .map(|b| {
                let check = inner
                    .health
                    .status_of(&cfg.name, (b.config.address, b.config.port));
                api::BackendView {
                    service: cfg.name.clone(),
                    address: b.config.address,
                    port: b.config.port,
                    weight: b.config.weight,
                    admin: b.admin,
                    health: b.healthy.into(),
                    state: DatapathState::of(b.state),
                    mac: b.mac.as_ref().map(show),
                    traffic: maps.backend_counters(b.id).unwrap_or_default().into(),
                    last_check: check
                        .as_ref()
                        .and_then(|t| t.last_result.clone())
                        .map(|r| r.map_or_else(|e| e, |()| "ok".to_owned())),
                    transitions: check.as_ref().map_or(0, |t| t.transitions),
                    passive: {
                        let signals = maps.backend_signals(b.id).unwrap_or_default();
                        let key = (cfg.name.clone(), (b.config.address, b.config.port));
                        let (suspicions, last) =
                            inner.suspicions.get(&key).cloned().unwrap_or_default();
                        api::PassiveView {
                            answered: signals.confirmed,
                            refused: signals.refused,
                            syn_retransmits: signals.syn_retransmits,
                            suspicions,
                            last_suspicion: (suspicions > 0).then_some(last),
                        }
                    },
                }
            })
            .collect(),
    }
}

/// Warns when a NAT service's source ports overlap the kernel's ephemeral
/// range: this host's own connections could then collide with translated
/// flows on the SNAT address.
fn warn_port_overlap(config: &Config) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut it = text
        .split_whitespace()
        .filter_map(|n| n.parse::<u16>().ok());
    let (Some(lo), Some(hi)) = (it.next(), it.next()) else {
        return;
    };
    for s in config.services.iter().filter(|s| s.mode == Mode::Nat) {
        let (a, b) = s.nat.ports;
        if a <= hi && lo <= b {
            warn!(
                service = %s.name,
                "NAT ports {a}-{b} overlap this host's ephemeral ports {lo}-{hi} \
                 (net.ipv4.ip_local_port_range): set nat.ports outside it, or reserve them \
                 with net.ipv4.ip_local_reserved_ports"
            );
        }
    }
}

/// Removes the pins when dropped, unless disarmed: a first start that fails
/// half way leaves nothing behind (an adopted datapath is never removed).
struct PinGuard<'a>(Option<&'a Path>);

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        if let Some(Err(err)) = self.0.map(loader::remove_pins) {
            warn!("{err:#}");
        }
    }
}

/// Runs the daemon until a signal stops it.
pub fn run(opts: Options) -> Result<()> {
    let open_files = raise_open_files_limit();
    // Everything that can be checked is checked before anything is loaded.
    let file = Config::load(&opts.config)?;
    let mut indexes = HashMap::new();
    for iface in &opts.ifaces {
        // Twice the same interface (or one of its altnames) would be
        // attached twice, the second time "adopting" the first.
        if let Some(first) = indexes.insert(loader::interface_index(iface)?, iface) {
            anyhow::bail!("--iface {iface} is given twice (--iface {first} is the same interface)");
        }
    }
    let pin_dir = opts.pin_dir.unwrap_or_else(|| file.daemon.pin_dir.clone());
    let api_socket = opts
        .api_socket
        .unwrap_or_else(|| file.daemon.api_socket.clone());
    let state_file = opts
        .state_file
        .unwrap_or_else(|| file.daemon.state_file.clone());
    // One daemon per datapath: the pin directory is locked before anything
    // in it is adopted, replaced or removed, and held until exit.
    refuse_live_socket(&api_socket)?;
    loader::ensure_bpffs(&pin_dir)?;
    if !opts.allow_private_bpffs {
        loader::check_bpffs_visible_from_host(&pin_dir)?;
    }
    let _lock = PinDirLock::acquire(&pin_dir)?;
    let metrics_listener = file
        .daemon
        .metrics_listen
        .map(crate::web::bind)
        .transpose()?;
    let replication_sockets = file
        .cluster
        .replicating()
        .map(replication::Sockets::bind)
        .transpose()?;
    let mut overlay = Overlay::load(&state_file)?;
    let config = overlay.merge(&file)?;

    let fresh = !pin_dir.join(xdp_common::map_names::SERVICES).exists();
    let mut datapath = Datapath::load(&pin_dir)?;
    let mut guard = PinGuard(fresh.then_some(pin_dir.as_path()));
    let maps = Maps::take(&mut datapath.ebpf)?;
    let mut node = crate::cluster::Node::new(&state_file);
    let mut controller = Controller::new(maps)?;
    let adopted = controller.adopting();
    let resolver = controller.resolver();
    let sweeper = controller.nat_sweeper()?;
    // Subscribed before the first resolution, so that no change after it
    // goes unannounced. A full channel already holds a pending refresh.
    let (hops_changed_tx, hops_changed) = mpsc::channel(1);
    if let Err(e) = neigh::watch(resolver.clone(), move || {
        let _ = hops_changed_tx.try_send(());
    }) {
        warn!("{e:#}; next hops are only refreshed every {NEXT_HOP_PERIOD:?}");
    }
    resolver.prepare(&config);
    controller.apply(&config)?;
    let replication = match (config.cluster.replicating(), replication_sockets) {
        (Some(cfg), Some(sockets)) => {
            let (replicator, ring) = Replicator::new(cfg, &mut datapath.ebpf, &controller)?;
            Some((replicator, ring, sockets))
        }
        _ => None,
    };
    warn_port_overlap(&config);
    let mut interfaces = Vec::new();
    for iface in &opts.ifaces {
        // Replies to NAT clients leave through the interface the client
        // came in on, which may be any of ours: all are redirect targets.
        // Frames to this interface's MAC only, written before the program
        // is attached so it never balances (or drops) one it should pass.
        let ifindex = loader::interface_index(iface)?;
        let mac = interface_mac(iface)?;
        controller
            .add_interface(ifindex, mac)
            .with_context(|| format!("readying the datapath for {iface}"))?;
        crate::cluster::node::check_forwarding(iface, &config);
        let attached = datapath.attach_pinned(iface, opts.mode)?;
        info!(%iface, mode = attached.name(), "XDP program attached");
        interfaces.push(api::InterfaceView {
            name: iface.clone(),
            mode: attached.name().into(),
        });
    }
    guard.0 = None;
    // A node that joins learns the cluster's flows before it announces
    // anything: ECMP may send it any of them the moment it does.
    if let Some((replicator, ..)) = &replication {
        replicator.pull_initial();
    }
    // Attached: the VIPs this node can serve may be announced.
    if let Err(e) = node.sync(&config, &controller) {
        error!("cluster: {e:#}");
    }
    let logger = datapath.logger.take();
    let datapath = Arc::new(Mutex::new(datapath));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let replicator = replication
            .map(|(replicator, ring, sockets)| replicator.spawn(ring, sockets).map(|()| replicator))
            .transpose()?;
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let targets = check_targets(&config, &controller);
        let health = HealthChecker::spawn(targets, probe_slots(open_files), events_tx)
            .context("starting the health checks")?;
        let daemon = Arc::new(Daemon {
            inner: Mutex::new(Inner {
                controller,
                file,
                overlay,
                config,
                health,
                nat: None,
                cluster: node,
                passive: passive::Detector::default(),
                suspicions: HashMap::new(),
            }),
            changing: Mutex::new(()),
            resolver,
            sweeper: Mutex::new(sweeper),
            config_path: opts.config.clone(),
            state_file,
            pin_dir: pin_dir.clone(),
            started: Instant::now(),
            adopted,
            interfaces,
            repairs: Mutex::new((0, None)),
            replicator,
        });
        let handler: Arc<dyn api::Handler> = daemon.clone();
        let socket = api_socket.clone();
        let mut api = tokio::spawn(async move { api::server::serve(&socket, handler).await });
        if let Some(listener) = metrics_listener {
            let d = daemon.clone();
            let health: crate::web::HealthSource = Arc::new(move || d.lock().health.status());
            let sources = crate::web::Sources {
                handler: daemon.clone(),
                health,
            };
            tokio::spawn(async move {
                if let Err(e) = crate::web::serve(listener, sources).await {
                    error!("metrics listener stopped: {e:#}");
                }
            });
        }
        // "ready" means the API answers: wait until it accepts connections
        // (a stale socket left by a killed daemon refuses them), or fails.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::os::unix::net::UnixStream::connect(&api_socket).is_err()
            && !api.is_finished()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if api.is_finished() {
            let res = (&mut api).await?;
            return Err(res.err().unwrap_or_else(|| anyhow::anyhow!("exited")))
                .context("the API server stopped before the daemon was ready");
        }
        println!("ready");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        systemd::notify("READY=1");
        let mut watchdog = systemd::watchdog_period().map(tokio::time::interval);
        if let Some(logger) = logger {
            tokio::spawn(forward_datapath_logs(logger));
        }
        // Off the main loop, so that checking the attachments (it waits for
        // the datapath's lock and asks the kernel) never delays a health event.
        let watcher = tokio::spawn(watch_attachments(
            datapath.clone(),
            opts.ifaces.clone(),
            opts.mode,
            daemon.clone(),
        ));

        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        // The periodic work runs in tasks of its own, so that a slow round
        // (a refresh waits up to 100 ms for unresolved neighbours) never
        // holds up a health event in this loop.
        let periodic = [
            every(daemon.clone(), Daemon::tick),
            every(daemon.clone(), Daemon::passive),
            tokio::spawn(refresh_next_hops(daemon.clone(), hops_changed)),
        ];
        let detach = loop {
            tokio::select! {
                _ = term.recv() => break false,
                _ = async { watchdog.as_mut().expect("checked").tick().await },
                    if watchdog.is_some() => systemd::notify("WATCHDOG=1"),
                _ = int.recv() => break true,
                _ = hup.recv() => {
                    systemd::notify("RELOADING=1");
                    let d = daemon.clone();
                    let reload = move || api::Handler::handle(&*d, Request::Reload);
                    if let Err(e) = tokio::task::spawn_blocking(reload).await? {
                        error!("reload refused, running state unchanged: {e}");
                    }
                    systemd::notify("READY=1");
                }
                Some(event) = events.recv() => {
                    // With every verdict that is waiting: one change for all.
                    let mut batch = vec![event];
                    while let Ok(event) = events.try_recv() {
                        batch.push(event);
                    }
                    let d = daemon.clone();
                    tokio::task::spawn_blocking(move || d.on_health(&batch)).await?;
                }
                res = &mut api => {
                    // The API server only returns on error: a daemon that
                    // cannot be controlled must say so, not run blind.
                    let why = res
                        .map_err(anyhow::Error::from)
                        .and_then(|r| r)
                        .err()
                        .unwrap_or_else(|| anyhow::anyhow!("exited"));
                    error!("API server stopped: {why:#}");
                    break false;
                }
            }
        };
        api.abort();
        for task in periodic {
            task.abort();
        }
        if detach {
            // The datapath is about to go: stop attracting traffic first.
            if let Err(e) = daemon.lock().cluster.withdraw_all() {
                error!("cluster: withdrawing routes: {e:#}");
            }
        }
        watcher.abort();
        systemd::notify("STOPPING=1");
        anyhow::Ok(detach)
    });
    // Dropping the runtime drops the API server, which removes its socket
    // (and only its own: a socket it failed to bind is another daemon's).
    drop(runtime);
    let detach = result?;
    if detach {
        info!("interrupted: detaching and removing pins");
        for iface in loader::pinned_interfaces(&pin_dir)? {
            loader::detach(&pin_dir, &iface)?;
        }
        drop(datapath);
        loader::remove_pins(&pin_dir)?;
    } else {
        info!(
            "terminated: the datapath keeps forwarding; `xdplb run` adopts it, `xdplb detach \
            --all` removes it"
        );
    }
    Ok(())
}

/// Refuses to start when another daemon answers on `socket`: starting
/// would take its API away (the server would fail to bind after the
/// datapath was already touched).
fn refuse_live_socket(socket: &Path) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        anyhow::bail!(
            "another xdplb daemon is already serving {}; stop it or choose another --api-socket",
            socket.display()
        );
    }
    Ok(())
}

/// Logs the datapath's records (rare drops, rate-limited in the program)
/// as they arrive in its ring buffer.
async fn forward_datapath_logs(logger: loader::DatapathLogger) {
    use tokio::io::{unix::AsyncFd, Interest};
    // SAFETY: the logger owns the ring buffer's descriptor, and the AsyncFd
    // owns the logger: the descriptor stays open while it is registered.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let Ok(mut logger) = registered.inspect_err(|err| warn!("polling the datapath's log: {err}"))
    else {
        return;
    };
    loop {
        let Ok(mut ready) = logger.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

/// Once a second, [`repair_attachments`] on a blocking thread.
async fn watch_attachments(
    datapath: Arc<Mutex<Datapath>>,
    ifaces: Vec<String>,
    mode: AttachMode,
    daemon: Arc<Daemon>,
) {
    let ifaces = Arc::new(ifaces);
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        let (datapath, ifaces, daemon) = (datapath.clone(), ifaces.clone(), daemon.clone());
        let check = tokio::task::spawn_blocking(move || {
            let mut datapath = datapath.lock().unwrap_or_else(|p| p.into_inner());
            repair_attachments(&mut datapath, &ifaces, mode, &daemon);
        });
        if let Err(err) = check.await {
            error!("checking the XDP attachments: {err}");
        }
    }
}

/// Checks that the datapath is still attached to each
/// interface as this daemon left it; when it is not (its link pin was
/// removed, e.g. by `xdplb detach --force`, or the link was detached),
/// says so and attaches it again.
fn repair_attachments(datapath: &mut Datapath, ifaces: &[String], mode: AttachMode, d: &Daemon) {
    for iface in ifaces {
        let checked = datapath
            .attachment_problem(iface)
            .inspect_err(|err| warn!("checking the XDP attachment on {iface}: {err:#}"));
        let Ok(Some(problem)) = checked else {
            continue;
        };
        error!(%iface, "the datapath was detached under the daemon: {problem}; attaching again");
        let outcome = match datapath.reattach(iface, mode) {
            Ok(attached) => {
                info!(%iface, mode = attached.name(), "XDP program attached again");
                // A re-created interface has a new index: balanced at once,
                // not at the next refresh.
                d.follow_interfaces();
                format!("{iface}: {problem}; attached again")
            }
            Err(err) => {
                error!(%iface, "attaching again failed: {err:#}");
                format!("{iface}: {problem}; attaching again failed: {err:#}")
            }
        };
        let mut repairs = d.repairs_lock();
        repairs.0 += 1;
        repairs.1 = Some(outcome);
    }
}

/// Runs [`Daemon::refresh`] on the blocking pool [`NEXT_HOP_SETTLE`] after
/// `changed` says the kernel announced a change of a next hop, and after
/// [`NEXT_HOP_PERIOD`] without one (less often at scale, see [`paced`]).
/// One task, so refreshes never overlap: an older refresh's answers could
/// otherwise land after a newer one's.
async fn refresh_next_hops(daemon: Arc<Daemon>, mut changed: mpsc::Receiver<()>) {
    // The daemon has just resolved.
    let mut targets = daemon.lock().controller.next_hop_targets().len();
    loop {
        tokio::select! {
            () = tokio::time::sleep(paced(NEXT_HOP_PERIOD, targets, NEXT_HOP_FALLBACK_RATE)) => {}
            // `None` (the watcher never started) disables this branch.
            Some(()) = changed.recv() => {
                tokio::time::sleep(NEXT_HOP_SETTLE).await;
                // What was announced while settling, this refresh sees;
                // what is announced during it makes another one.
                while changed.try_recv().is_ok() {}
            }
        }
        let d = daemon.clone();
        match tokio::task::spawn_blocking(move || d.refresh()).await {
            Ok(refreshed) => targets = refreshed,
            Err(e) => error!("refreshing next hops panicked: {e}"),
        }
    }
}

/// The pause between two rounds of periodic work over `items` (passive
/// detection's looks, the next-hop fallback): `least`, or longer when that
/// would take more than `per_second` items a second, so that the work's
/// cost stays bounded at any scale.
fn paced(least: Duration, items: usize, per_second: u32) -> Duration {
    let items = u32::try_from(items).unwrap_or(u32::MAX);
    least.max(Duration::from_secs(1) * items / per_second)
}

/// Runs `work(daemon)` on the blocking pool, in a task of its own, again
/// and again, each time after the pause the last round returned.
fn every(daemon: Arc<Daemon>, work: fn(&Daemon) -> Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let d = daemon.clone();
            match tokio::task::spawn_blocking(move || work(&d)).await {
                Ok(pause) => tokio::time::sleep(pause).await,
                Err(e) => {
                    error!("periodic work panicked: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    })
}
