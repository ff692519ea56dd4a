//! `xdplb run`: the always-on daemon. It loads (or adopts) the datapath,
//! programs it from the configuration plus the operator's run-time
//! changes, attaches it, then serves: health checks, the API, SIGHUP
//! reloads, drain timeouts and next-hop refreshes.
//!
//! Stopping: SIGTERM (a service manager's stop or restart) and SIGKILL leave
//! the datapath attached and forwarding with its last tables, for the next
//! `xdplb run` to adopt; SIGINT (Ctrl-C at a terminal) detaches and removes
//! every pin, as `xdplb detach --all` does.

use std::{
    net::SocketAddr,
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
    api::{self, ApiError, BackendRef, Done, Request},
    config::{Config, Mode, ServiceConfig},
    controller::{state_name, Admin, Controller, ServiceState},
    dataplane::{monotonic_coarse_ns, proto_name, Maps, NatOccupancy},
    health::{CheckTarget, HealthChecker, HealthEvent},
    loader::{self, AttachMode, Datapath},
    state::Overlay,
};

/// What `xdplb run` was asked to do.
pub struct Options {
    pub config: PathBuf,
    pub ifaces: Vec<String>,
    pub mode: AttachMode,
    /// Overrides of the config file's `[daemon]` paths.
    pub pin_dir: Option<PathBuf>,
    pub api_socket: Option<PathBuf>,
    pub state_file: Option<PathBuf>,
}

/// Health probes running at once, at most.
const MAX_CONCURRENT_CHECKS: usize = 64;

/// Everything the API, the health checker and the signal handlers share.
struct Daemon {
    inner: Mutex<Inner>,
    config_path: PathBuf,
    state_file: PathBuf,
    pin_dir: PathBuf,
    started: Instant,
    adopted: bool,
    interfaces: Vec<api::InterfaceView>,
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
    /// Accepted MACs and announced VIPs (docs/cluster.md).
    cluster: crate::cluster::Node,
}

impl Inner {
    /// Re-derives accepted MACs and announced routes; a failure is logged
    /// and retried on the next tick, never undoes the change that led here.
    fn sync_cluster(&mut self) {
        if let Err(e) = self.cluster.sync(&self.config, &self.controller) {
            error!("cluster: {e:#}");
        }
    }
}

impl Daemon {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the datapath as it was;
        // keep serving rather than poisoning every later call.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change of the overlay and/or the file: merge, validate,
    /// program, persist. A change that does not validate changes nothing.
    fn change(
        &self,
        reload_file: bool,
        edit: impl FnOnce(&mut Overlay, &Config) -> Result<String, ApiError>,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let file = if reload_file {
            Config::load(&self.config_path).map_err(|e| ApiError::bad_request(e.to_string()))?
        } else {
            inner.file.clone()
        };
        let mut overlay = inner.overlay.clone();
        let message = edit(&mut overlay, &inner.config)?;
        let merged = overlay
            .merge(&file)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        inner
            .controller
            .apply(&merged)
            .map_err(|e| ApiError::internal(format!("{e:#}")))?;
        overlay
            .save(&self.state_file)
            .map_err(|e| ApiError::internal(format!("{e:#}")))?;
        let targets = check_targets(&merged, &inner.controller);
        inner.health.update(targets);
        (inner.file, inner.overlay, inner.config) = (file, overlay, merged);
        inner.sync_cluster();
        info!("{message}");
        Ok(json!(Done { message }))
    }

    fn on_health(&self, event: HealthEvent) {
        let mut inner = self.lock();
        let (ip, port) = event.backend;
        let verdict = if event.healthy { "UP" } else { "DOWN" };
        match inner
            .controller
            .set_health(&event.service, event.backend, event.healthy)
        {
            Ok(_) => {
                inner.sync_cluster();
                let took = event.at.elapsed();
                if event.healthy {
                    info!(service = %event.service, backend = %SocketAddr::new(ip, port), detail = %event.detail, "backend is {verdict}");
                } else {
                    warn!(service = %event.service, backend = %SocketAddr::new(ip, port), detail = %event.detail, table_swap_ms = took.as_millis() as u64, "backend is {verdict}: new flows avoid it, its established flows move on their next packet");
                }
            }
            // The backend was removed meanwhile.
            Err(e) => warn!("health event for {}: {e:#}", event.service),
        }
    }

    fn tick(&self) {
        let mut inner = self.lock();
        if let Err(e) = inner.controller.expire_drains(Instant::now()) {
            error!("expiring drains: {e:#}");
        }
        inner.sync_cluster();
        let nat_in_use = inner.config.services.iter().any(|s| s.mode == Mode::Nat);
        inner.nat = if nat_in_use {
            match inner.controller.maps.sweep_nat(monotonic_coarse_ns()) {
                Ok(o) => Some(o),
                Err(e) => {
                    error!("sweeping NAT tables: {e:#}");
                    None
                }
            }
        } else {
            None
        };
    }

    fn refresh(&self) {
        if let Err(e) = self.lock().controller.refresh_neighbours() {
            warn!("refreshing backend next hops: {e:#}");
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

/// The configured backend `r` names, as `address:port`.
fn backend_ref(config: &Config, r: &BackendRef) -> Result<SocketAddr, ApiError> {
    let svc = service_config(config, &r.service)?;
    let addr = SocketAddr::new(r.address, r.port.unwrap_or(svc.port));
    if !svc
        .backends
        .iter()
        .any(|b| SocketAddr::new(b.address, b.port) == addr)
    {
        return Err(ApiError::not_found(format!(
            "service {:?} has no backend {addr}",
            r.service
        )));
    }
    Ok(addr)
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
                    inner
                        .controller
                        .service_by_name(name)
                        .ok_or_else(|| ApiError::not_found(format!("no service named {name:?}")))?;
                }
                let views: Vec<_> = inner
                    .controller
                    .services()
                    .filter(|s| service.as_ref().is_none_or(|n| *n == s.config.name))
                    .flat_map(|s| service_view(&inner, s).backends)
                    .collect();
                Ok(json!(views))
            }
            Request::AddService(table) => self.change(false, |o, _| {
                Ok(format!("service {} added", o.add_service(table)))
            }),
            Request::RemoveService { name } => self.change(false, |o, config| {
                if !config.services.iter().any(|s| s.name == name) {
                    return Err(ApiError::not_found(format!("no service named {name:?}")));
                }
                o.remove_service(&name);
                Ok(format!("service {name} removed"))
            }),
            Request::AddBackend { service, backend } => self.change(false, |o, config| {
                let port = service_config(config, &service)?.port;
                let addr = o.add_backend(&service, backend, port).ok_or_else(|| {
                    ApiError::bad_request("backend.address: missing or not an IP address")
                })?;
                Ok(format!("backend {addr} added to service {service}"))
            }),
            Request::RemoveBackend(r) => self.change(false, |o, config| {
                let addr = backend_ref(config, &r)?;
                o.remove_backend(&r.service, addr, service_config(config, &r.service)?.port);
                Ok(format!("backend {addr} removed from service {}", r.service))
            }),
            Request::Drain(r) => self.set_admin(&r, Admin::Drain),
            Request::Undrain(r) => self.set_admin(&r, Admin::Up),
            Request::Reload => self.change(true, |_, _| {
                Ok(format!("reloaded {}", self.config_path.display()))
            }),
            Request::Flow { src, dst, protocol } => {
                let proto = match protocol.as_str() {
                    "tcp" => xdp_common::PROTO_TCP,
                    "udp" => xdp_common::PROTO_UDP,
                    p => {
                        return Err(ApiError::bad_request(format!(
                            "unknown protocol {p:?} (expected tcp or udp)"
                        )))
                    }
                };
                let inner = self.lock();
                let route = inner
                    .controller
                    .maps
                    .route(src, dst, proto)
                    .map_err(|e| ApiError::not_found(format!("{e:#}")))?;
                let svc = inner
                    .controller
                    .services()
                    .find(|s| {
                        s.config.vip == dst.ip()
                            && s.config.port == dst.port()
                            && s.config.protocol.number() == proto
                    })
                    .ok_or_else(|| {
                        ApiError::not_found(format!("no service at {dst}/{}", proto_name(proto)))
                    })?;
                let backend_state = svc
                    .backend_by_id(route.backend_id)
                    .map_or("down", |b| state_name(b.state));
                Ok(json!(api::FlowView {
                    service: svc.config.name.clone(),
                    backend: route.backend,
                    backend_state: backend_state.into(),
                    established: route.established,
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
                let maps = &inner.controller.maps;
                let reasons = maps
                    .reason_counts()
                    .map_err(|e| ApiError::internal(format!("{e:#}")))?
                    .into_iter()
                    .map(|(r, n)| (r.name().to_owned(), n))
                    .collect();
                let services = inner
                    .controller
                    .services()
                    .map(|s| {
                        let c = maps.service_counters(s.id).unwrap_or_default();
                        api::ServiceStatsView {
                            name: s.config.name.clone(),
                            packets: c.packets,
                            bytes: c.bytes,
                            backends: s
                                .backends
                                .values()
                                .map(|b| {
                                    let c = maps.backend_counters(b.id).unwrap_or_default();
                                    api::BackendStatsView {
                                        address: b.config.address,
                                        port: b.config.port,
                                        packets: c.packets,
                                        bytes: c.bytes,
                                    }
                                })
                                .collect(),
                        }
                    })
                    .collect();
                let nat = inner.nat;
                Ok(json!(api::StatsView {
                    reasons,
                    services,
                    nat
                }))
            }
        }
    }
}

impl Daemon {
    fn set_admin(&self, r: &BackendRef, admin: Admin) -> Result<Value, ApiError> {
        let verb = if admin == Admin::Drain {
            "drained"
        } else {
            "undrained"
        };
        self.change(false, |o, config| {
            let addr = backend_ref(config, r)?;
            o.set_admin(&r.service, addr, admin);
            Ok(format!("backend {addr} of service {} {verb}", r.service))
        })
    }

    fn status(&self) -> api::StatusView {
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
            fingerprints: services
                .iter()
                .map(|s| {
                    (
                        s.config.name.clone(),
                        crate::cluster::service_fingerprint(s),
                    )
                })
                .collect(),
            cluster: inner.cluster.view(),
        }
    }
}

fn service_view(inner: &Inner, s: &ServiceState) -> api::ServiceView {
    let maps = &inner.controller.maps;
    let health = inner.health.status();
    let c = maps.service_counters(s.id).unwrap_or_default();
    let cfg: &ServiceConfig = &s.config;
    api::ServiceView {
        name: cfg.name.clone(),
        vip: cfg.vip,
        port: cfg.port,
        protocol: cfg.protocol.to_string(),
        mode: cfg.mode.to_string(),
        table_size: cfg.table_size,
        hash: cfg.hash.to_string(),
        fingerprint: crate::cluster::service_fingerprint(s),
        packets: c.packets,
        bytes: c.bytes,
        backends: s
            .backends
            .values()
            .map(|b| {
                let c = maps.backend_counters(b.id).unwrap_or_default();
                let check = health.iter().find(|t| {
                    t.service == cfg.name && t.backend == (b.config.address, b.config.port)
                });
                api::BackendView {
                    service: cfg.name.clone(),
                    address: b.config.address,
                    port: b.config.port,
                    weight: b.config.weight,
                    admin: b.admin.name().into(),
                    health: if b.healthy { "up" } else { "down" }.into(),
                    state: state_name(b.state).into(),
                    mac: b.mac.map(|m| {
                        m.iter()
                            .map(|x| format!("{x:02x}"))
                            .collect::<Vec<_>>()
                            .join(":")
                    }),
                    packets: c.packets,
                    bytes: c.bytes,
                    last_check: check.and_then(|t| t.last_result.clone()).map(|r| match r {
                        Ok(()) => "ok".to_owned(),
                        Err(e) => e,
                    }),
                    transitions: check.map_or(0, |t| t.transitions),
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
            warn!(service = %s.name, "NAT ports {a}-{b} overlap this host's ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range): set nat.ports outside it, or reserve them with net.ipv4.ip_local_reserved_ports");
        }
    }
}

/// Removes the pins when dropped, unless disarmed: a first start that fails
/// half way leaves nothing behind (an adopted datapath is never removed).
struct PinGuard<'a>(Option<&'a Path>);

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        if let Some(dir) = self.0 {
            if let Err(err) = loader::remove_pins(dir) {
                warn!("{err:#}");
            }
        }
    }
}

/// Runs the daemon until a signal stops it.
pub fn run(opts: Options) -> Result<()> {
    // Everything that can be checked is checked before anything is loaded.
    let file = Config::load(&opts.config)?;
    for iface in &opts.ifaces {
        loader::interface_index(iface)?;
    }
    let pin_dir = opts.pin_dir.unwrap_or_else(|| file.daemon.pin_dir.clone());
    let api_socket = opts
        .api_socket
        .unwrap_or_else(|| file.daemon.api_socket.clone());
    let state_file = opts
        .state_file
        .unwrap_or_else(|| file.daemon.state_file.clone());
    let mut overlay = Overlay::load(&state_file)?;
    let config = overlay.merge(&file)?;

    let fresh = !pin_dir.join(xdp_common::map_names::SERVICES).exists();
    let mut datapath = Datapath::load(&pin_dir)?;
    let mut guard = PinGuard(fresh.then_some(pin_dir.as_path()));
    let maps = Maps::take(&mut datapath.ebpf)?;
    let if_macs = crate::cluster::macs::IfMacs::take(&mut datapath.ebpf)?;
    let mut node = crate::cluster::Node::new(if_macs, &state_file);
    let mut controller = Controller::new(maps)?;
    let adopted = controller.adopting();
    controller.apply(&config)?;
    warn_port_overlap(&config);
    let mut interfaces = Vec::new();
    for iface in &opts.ifaces {
        // Replies to NAT clients leave through the interface the client
        // came in on, which may be any of ours: all are redirect targets.
        let ifindex = loader::interface_index(iface)?;
        controller
            .maps
            .tx_ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("adding {iface} to the egress devmap"))?;
        // Frames to this interface's MAC only, written before the program
        // is attached so it never balances (or drops) one it should pass.
        let mac = crate::cluster::macs::interface_mac(iface)?;
        node.add_interface(ifindex, mac, &config)?;
        let attached = datapath.attach_pinned(iface, opts.mode)?;
        info!(%iface, mode = attached.name(), "XDP program attached");
        interfaces.push(api::InterfaceView {
            name: iface.clone(),
            mode: attached.name().into(),
        });
    }
    guard.0 = None;
    // Attached: the VIPs this node can serve may be announced.
    if let Err(e) = node.sync(&config, &controller) {
        error!("cluster: {e:#}");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let targets = check_targets(&config, &controller);
        let health = HealthChecker::spawn(targets, MAX_CONCURRENT_CHECKS, events_tx);
        let daemon = Arc::new(Daemon {
            inner: Mutex::new(Inner {
                controller, file, overlay, config, health, nat: None, cluster: node,
            }),
            config_path: opts.config.clone(),
            state_file,
            pin_dir: pin_dir.clone(),
            started: Instant::now(),
            adopted,
            interfaces,
        });
        let handler: Arc<dyn api::Handler> = daemon.clone();
        let socket = api_socket.clone();
        let mut api = tokio::spawn(async move { api::server::serve(&socket, handler).await });
        // "ready" means the API answers: wait until it accepts connections
        // (a stale socket left by a killed daemon refuses them), or fails.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::os::unix::net::UnixStream::connect(&api_socket).is_err() && !api.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!("ready");
        use std::io::Write as _;
        std::io::stdout().flush()?;

        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks = 0u64;
        let detach = loop {
            tokio::select! {
                _ = term.recv() => break false,
                _ = int.recv() => break true,
                _ = hup.recv() => {
                    let d = daemon.clone();
                    match tokio::task::spawn_blocking(move || api::Handler::handle(&*d, Request::Reload)).await? {
                        Ok(_) => {}
                        Err(e) => error!("reload refused, running state unchanged: {e}"),
                    }
                }
                Some(event) = events.recv() => {
                    let d = daemon.clone();
                    tokio::task::spawn_blocking(move || d.on_health(event)).await?;
                }
                _ = tick.tick() => {
                    ticks += 1;
                    let d = daemon.clone();
                    tokio::task::spawn_blocking(move || {
                        d.tick();
                        if ticks.is_multiple_of(5) {
                            d.refresh();
                        }
                    }).await?;
                }
                res = &mut api => {
                    // The API server only returns on error: a daemon that
                    // cannot be controlled must say so, not run blind.
                    error!("API server stopped: {:#}", res.map_err(anyhow::Error::from).and_then(|r| r).err().unwrap_or_else(|| anyhow::anyhow!("exited")));
                    break false;
                }
            }
        };
        api.abort();
        if detach {
            // The datapath is about to go: stop attracting traffic first.
            if let Err(e) = daemon.lock().cluster.withdraw_all() {
                error!("cluster: withdrawing routes: {e:#}");
            }
        }
        anyhow::Ok(detach)
    });
    let _ = std::fs::remove_file(&api_socket);
    let detach = result?;
    if detach {
        info!("interrupted: detaching and removing pins");
        for iface in loader::pinned_interfaces(&pin_dir)? {
            loader::detach(&pin_dir, &iface)?;
        }
        drop(datapath);
        loader::remove_pins(&pin_dir)?;
    } else {
        info!("terminated: the datapath keeps forwarding; `xdplb run` adopts it, `xdplb detach --all` removes it");
    }
    Ok(())
}
