//! The TOML configuration: its types, parsing and validation.
//!
//! Parsing is two-staged. Serde reads the text into private `Raw*` structs
//! whose optional fields are `Option`s and whose numbers are plain `i64`s;
//! that stage reports syntax, type and unknown-field errors. Validation then
//! applies defaults and checks every value, producing the public, fully
//! resolved types. Keeping numbers as `i64` until validation is what lets a
//! bad port or weight be reported as "out of range" with its field name,
//! rather than as a deserializer type error.
//!
//! Both stages stop at the first problem and return it as one
//! [`ConfigError`]; nothing else happens on the way (no files written, no
//! maps touched), so a daemon can check a new configuration before it lets
//! go of the old one. The format is documented in `docs/configuration.md`.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize, Serializer};
use xdp_common::{DEFAULT_TABLE_SIZE, MAGLEV_SLOTS, MAX_BACKENDS, MAX_SERVICES, MAX_TABLE_SIZE};

use crate::maglev::is_prime;

/// Default `daemon.api_socket`.
pub const DEFAULT_API_SOCKET: &str = "/run/xdplb/xdplb.sock";
/// Default `daemon.state_file`.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/xdplb/state.json";
/// Default `daemon.pin_dir`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xdplb";

/// Smallest accepted `table_size`: the largest prime below 256. Smaller
/// tables spread load too unevenly to be useful.
const MIN_TABLE_SIZE: u32 = 251;

/// A valid configuration, with every default applied.
///
/// It serializes with the file's own key names (`service`, `backend`,
/// durations as `"30s"`), so the TOML serialization of a `Config` is itself
/// a configuration that parses back to the same value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Config {
    pub daemon: DaemonConfig,
    /// `[cluster]` (optional; see docs/cluster.md).
    #[serde(skip_serializing_if = "crate::cluster::ClusterConfig::is_default")]
    pub cluster: crate::cluster::ClusterConfig,
    /// In file order.
    #[serde(rename = "service")]
    pub services: Vec<ServiceConfig>,
}

/// The `[daemon]` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DaemonConfig {
    /// Unix socket of the control API.
    pub api_socket: PathBuf,
    /// Where runtime state (admin states, weights) is persisted.
    pub state_file: PathBuf,
    /// bpffs directory the maps are pinned in.
    pub pin_dir: PathBuf,
    pub all_down: AllDown,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            api_socket: DEFAULT_API_SOCKET.into(),
            state_file: DEFAULT_STATE_FILE.into(),
            pin_dir: DEFAULT_PIN_DIR.into(),
            all_down: AllDown::FailOpen,
        }
    }
}

/// What a service does when the health checks fail every one of its
/// backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllDown {
    /// Ignore the health verdicts and keep spreading new flows over the
    /// backends: when all fail at once, the checker or its network path is
    /// the likelier culprit, and serving something beats serving nothing.
    FailOpen,
    /// Drop the service's new flows.
    Drop,
}

/// One `[[service]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceConfig {
    /// Unique among services; `[a-zA-Z0-9_.-]{1,64}`.
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: Mode,
    /// Maglev table size: a prime in `251..=MAX_TABLE_SIZE`.
    pub table_size: u32,
    pub hash: HashFields,
    /// How long a drained or removed backend keeps its established flows.
    #[serde(serialize_with = "serialize_duration")]
    pub drain_timeout: Duration,
    pub health_check: HealthCheck,
    /// NAT settings (used when `mode` is `nat`).
    #[serde(skip_serializing_if = "NatConfig::is_default")]
    pub nat: NatConfig,
    /// In file order.
    #[serde(rename = "backend")]
    pub backends: Vec<BackendConfig>,
}

/// `[service.nat]`: how a NAT service translates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NatConfig {
    /// The source address backends see; default: the load balancer's own
    /// address on the route to each backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_address: Option<IpAddr>,
    /// Source ports allocated to translated flows, inclusive.
    #[serde(serialize_with = "serialize_port_range")]
    pub ports: (u16, u16),
    /// Idle timeout of an established TCP flow.
    #[serde(serialize_with = "serialize_duration")]
    pub tcp_timeout: Duration,
    /// Idle timeout of a TCP flow after FIN or RST.
    #[serde(serialize_with = "serialize_duration")]
    pub tcp_closing_timeout: Duration,
    /// Idle timeout of a UDP flow.
    #[serde(serialize_with = "serialize_duration")]
    pub udp_timeout: Duration,
}

impl NatConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            snat_address: None,
            // Below Linux's default ephemeral range (32768-60999): the SNAT
            // address is usually this host's own, and its own connections
            // (health checks among them) must not use a translated port.
            ports: (10000, 32767),
            tcp_timeout: Duration::from_secs(3600),
            tcp_closing_timeout: Duration::from_secs(10),
            udp_timeout: Duration::from_secs(60),
        }
    }
}

fn serialize_port_range<S: Serializer>(r: &(u16, u16), s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}-{}", r.0, r.1))
}

impl ServiceConfig {
    /// The identity of a service: no two services share it, and the
    /// datapath looks services up by it.
    pub fn key(&self) -> (IpAddr, u16, Protocol) {
        (self.vip, self.port, self.protocol)
    }
}

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number, as the datapath keys services.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => xdp_common::PROTO_TCP,
            Protocol::Udp => xdp_common::PROTO_UDP,
        }
    }
}

/// How packets reach a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Direct server return: the frame is re-addressed to the backend's MAC
    /// and the IP packet is left untouched, so the backend answers the
    /// client directly from the VIP.
    Dsr,
    /// Address translation. Accepted so that configurations can name it;
    /// the datapath does not implement it yet.
    Nat,
}

/// Which packet fields pick a backend for a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HashFields {
    /// Source and destination address and port, and protocol.
    #[serde(rename = "5-tuple")]
    FiveTuple,
    /// The source address only: a client's flows all go to one backend.
    #[serde(rename = "source")]
    Source,
}

/// A service's health check. It probes every backend of the service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    #[serde(flatten)]
    pub kind: CheckKind,
    #[serde(serialize_with = "serialize_duration")]
    pub interval: Duration,
    /// At most `interval`.
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    /// Consecutive successes that bring a failed backend back.
    pub rise: u32,
    /// Consecutive failures that take a backend out.
    pub fall: u32,
    /// Port to probe; `None` probes each backend's own port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
            port: None,
        }
    }
}

/// What a health probe does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum CheckKind {
    /// No probing: backends are always healthy.
    None,
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.1 request whose response status must be one of
    /// `expect_status`.
    Http {
        method: String,
        /// Request target; starts with `/`.
        path: String,
        expect_status: Vec<u16>,
        /// `Host` header; `None` sends the backend's address.
        #[serde(skip_serializing_if = "Option::is_none")]
        host: Option<String>,
    },
}

/// One `[[service.backend]]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BackendConfig {
    /// Same address family as the service's VIP.
    pub address: IpAddr,
    pub port: u16,
    /// Relative share of new flows, `0..=10000`; 0 takes no new flows.
    pub weight: u32,
    pub state: InitialState,
}

/// The administrative state a backend starts in; the API changes it at
/// runtime. It is independent of health: only a backend that is `Up`,
/// healthy and of weight > 0 takes new flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialState {
    /// Takes new flows.
    Up,
    /// Takes no flows; its established flows move to other backends.
    Down,
    /// Takes no new flows; its established flows stay until they end or
    /// the service's `drain_timeout` passes.
    Drain,
}

/// Displays each enum as it is spelled in the file.
macro_rules! display_as_toml {
    ($($ty:ident { $($variant:ident => $text:literal),+ })+) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $($ty::$variant => $text),+ })
            }
        }
    )+};
}

display_as_toml! {
    AllDown { FailOpen => "fail-open", Drop => "drop" }
    Protocol { Tcp => "tcp", Udp => "udp" }
    Mode { Dsr => "dsr", Nat => "nat" }
    HashFields { FiveTuple => "5-tuple", Source => "source" }
    InitialState { Up => "up", Down => "down", Drain => "drain" }
}

/// Why a configuration was rejected: which file, which field, what is wrong.
///
/// `field` names services by name and backends by their 0-based position
/// in the service, e.g. `service "web" backend[2].weight`; a service whose
/// name is missing or invalid is named by position, `service[0]`. Errors
/// found while parsing add the line and column to `problem`. `field` is
/// empty when the file as a whole is at fault (it cannot be read).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("config {file}: {}{problem}", field_prefix(.field))]
pub struct ConfigError {
    pub file: String,
    pub field: String,
    pub problem: String,
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

impl Config {
    /// Reads and validates a file. Errors look like: `config
    /// /etc/xdplb.toml: service "web" backend[2].weight: 20000 is out of
    /// range 0..=10000`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: origin.clone(),
            field: String::new(),
            problem: format!("cannot read it: {e}"),
        })?;
        Config::parse(&text, &origin)
    }

    /// Same from a string; `origin` is the name used in messages (the file
    /// path).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(text, origin, &e))?;
        Validator { origin }.config(raw)
    }
}

// ---------------------------------------------------------------------------
// Raw (as written) forms. Fields without a default are not `Option`s, so
// serde itself reports them missing.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: Option<RawDaemon>,
    cluster: Option<crate::cluster::RawCluster>,
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    api_socket: Option<PathBuf>,
    state_file: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    all_down: Option<AllDown>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    port: i64,
    protocol: Protocol,
    mode: Option<Mode>,
    table_size: Option<i64>,
    hash: Option<HashFields>,
    drain_timeout: Option<String>,
    health_check: Option<RawHealthCheck>,
    nat: Option<RawNat>,
    #[serde(default)]
    backend: Vec<RawBackend>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNat {
    snat_address: Option<String>,
    ports: Option<String>,
    tcp_timeout: Option<String>,
    tcp_closing_timeout: Option<String>,
    udp_timeout: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    #[serde(rename = "type")]
    kind: Option<RawCheckType>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<i64>,
    fall: Option<i64>,
    port: Option<i64>,
    method: Option<String>,
    path: Option<String>,
    expect_status: Option<Vec<i64>>,
    host: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawCheckType {
    None,
    Tcp,
    Http,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    port: Option<i64>,
    weight: Option<i64>,
    state: Option<InitialState>,
}

// ---------------------------------------------------------------------------
// Validation.

struct Validator<'a> {
    origin: &'a str,
}

type Checked<T> = Result<T, ConfigError>;

impl Validator<'_> {
    fn fail<T>(&self, field: impl Into<String>, problem: impl Into<String>) -> Checked<T> {
        Err(ConfigError {
            file: self.origin.to_owned(),
            field: field.into(),
            problem: problem.into(),
        })
    }

    fn config(&self, raw: RawConfig) -> Checked<Config> {
        let daemon = self.daemon(raw.daemon)?;
        let cluster = match raw.cluster.unwrap_or_default().validate() {
            Ok(c) => c,
            Err((field, problem)) => return self.fail(field, problem),
        };
        if raw.service.len() > MAX_SERVICES as usize {
            return self.fail(
                "service",
                format!(
                    "{} services configured; the datapath holds at most {MAX_SERVICES}",
                    raw.service.len()
                ),
            );
        }
        let mut services: Vec<ServiceConfig> = Vec::with_capacity(raw.service.len());
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut by_key: HashMap<(IpAddr, u16, Protocol), usize> = HashMap::new();
        let (mut backends, mut slots) = (0usize, 0u64);
        for (i, raw) in raw.service.into_iter().enumerate() {
            if let Some(first) = by_name.get(&raw.name) {
                return self.fail(
                    format!("service[{i}].name"),
                    format!(
                        "duplicate service name {:?} (service[{first}] has it too)",
                        raw.name
                    ),
                );
            }
            let svc = self.service(i, raw)?;
            let at = format!("service {:?}", svc.name);
            if let Some(&first) = by_key.get(&svc.key()) {
                return self.fail(
                    at,
                    format!(
                        "duplicate service: {}/{} is already defined by service {:?}",
                        SocketAddr::new(svc.vip, svc.port),
                        svc.protocol,
                        services[first].name
                    ),
                );
            }
            // Capacity of the datapath's maps: a configuration that cannot
            // fit is as invalid as a malformed one, and saying so here names
            // the service where it overflows.
            backends += svc.backends.len();
            if backends > MAX_BACKENDS as usize {
                return self.fail(
                    format!("{at} backend"),
                    format!(
                        "{backends} backends in this and the previous services; \
                         the datapath holds at most {MAX_BACKENDS}"
                    ),
                );
            }
            // Two table regions per service, so a new table can be written
            // while the datapath reads the old one.
            slots += 2 * u64::from(svc.table_size);
            if slots > u64::from(MAGLEV_SLOTS) {
                return self.fail(
                    format!("{at} table_size"),
                    format!(
                        "the Maglev tables of this and the previous services need {slots} slots \
                         (2 × table_size each); the datapath holds {MAGLEV_SLOTS}"
                    ),
                );
            }
            by_name.insert(svc.name.clone(), i);
            by_key.insert(svc.key(), i);
            services.push(svc);
        }
        Ok(Config {
            daemon,
            cluster,
            services,
        })
    }

    fn daemon(&self, raw: Option<RawDaemon>) -> Checked<DaemonConfig> {
        let (raw, default) = (raw.unwrap_or_default(), DaemonConfig::default());
        Ok(DaemonConfig {
            api_socket: self.absolute("daemon.api_socket", raw.api_socket, default.api_socket)?,
            state_file: self.absolute("daemon.state_file", raw.state_file, default.state_file)?,
            pin_dir: self.absolute("daemon.pin_dir", raw.pin_dir, default.pin_dir)?,
            all_down: raw.all_down.unwrap_or(default.all_down),
        })
    }

    /// A daemon's working directory is arbitrary, so relative paths would
    /// point somewhere different depending on how it was started.
    fn absolute(&self, field: &str, path: Option<PathBuf>, default: PathBuf) -> Checked<PathBuf> {
        match path {
            None => Ok(default),
            Some(p) if p.is_absolute() => Ok(p),
            Some(p) => self.fail(
                field,
                format!("{:?} is not an absolute path", p.display().to_string()),
            ),
        }
    }

    fn service(&self, index: usize, raw: RawService) -> Checked<ServiceConfig> {
        if !valid_name(&raw.name) {
            return self.fail(
                format!("service[{index}].name"),
                format!(
                    "{:?} is not a valid name: use 1 to 64 of a-z A-Z 0-9 _ . -",
                    raw.name
                ),
            );
        }
        let at = format!("service {:?}", raw.name);
        let vip = self.address(&format!("{at} vip"), &raw.vip)?;
        let port = self.int(&format!("{at} port"), raw.port, 1..=65535)?;
        let mode = raw.mode.unwrap_or(Mode::Dsr);
        let table_size = match raw.table_size {
            None => DEFAULT_TABLE_SIZE,
            Some(n) => {
                let field = format!("{at} table_size");
                let n: u32 = self.int(
                    &field,
                    n,
                    i64::from(MIN_TABLE_SIZE)..=i64::from(MAX_TABLE_SIZE),
                )?;
                if !is_prime(n) {
                    return self.fail(
                        field,
                        format!("{n} is not a prime (Maglev needs a prime table size)"),
                    );
                }
                n
            }
        };
        let drain_timeout = match raw.drain_timeout {
            None => Duration::from_secs(30),
            Some(s) => self.duration(&format!("{at} drain_timeout"), &s)?,
        };
        let health_check = self.health_check(&at, raw.health_check.unwrap_or_default())?;
        if mode == Mode::Dsr && raw.nat.is_some() {
            return self.fail(
                format!("{at} nat"),
                "NAT settings need mode = \"nat\"".to_owned(),
            );
        }
        let nat = self.nat(&at, raw.nat.unwrap_or_default(), vip)?;

        let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.backend.len());
        let mut seen: HashMap<(IpAddr, u16), usize> = HashMap::new();
        for (i, raw) in raw.backend.into_iter().enumerate() {
            let at = format!("{at} backend[{i}]");
            let b = self.backend(&at, raw, vip, port, mode)?;
            if let Some(first) = seen.insert((b.address, b.port), i) {
                return self.fail(
                    at,
                    format!(
                        "duplicate backend {} (same as backend[{first}])",
                        SocketAddr::new(b.address, b.port)
                    ),
                );
            }
            backends.push(b);
        }
        // Maglev gives every backend of weight > 0 at least one slot. Those
        // of weight 0 count too, so that no later change of weight or state
        // can make the table impossible to build.
        if backends.len() > table_size as usize {
            return self.fail(
                format!("{at} table_size"),
                format!(
                    "{table_size} is smaller than the number of backends ({})",
                    backends.len()
                ),
            );
        }
        Ok(ServiceConfig {
            name: raw.name,
            vip,
            port,
            protocol: raw.protocol,
            mode,
            table_size,
            hash: raw.hash.unwrap_or(HashFields::FiveTuple),
            drain_timeout,
            health_check,
            nat,
            backends,
        })
    }

    fn nat(&self, service: &str, raw: RawNat, vip: IpAddr) -> Checked<NatConfig> {
        let at = |field: &str| format!("{service} nat.{field}");
        let default = NatConfig::default();
        let snat_address = match raw.snat_address {
            None => None,
            Some(a) => {
                let addr = self.address(&at("snat_address"), &a)?;
                if addr.is_ipv4() != vip.is_ipv4() {
                    return self.fail(
                        at("snat_address"),
                        format!("{addr} is not of the VIP's address family"),
                    );
                }
                Some(addr)
            }
        };
        let ports = match raw.ports {
            None => default.ports,
            Some(text) => {
                let parsed = text.split_once('-').and_then(|(a, b)| {
                    Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
                });
                match parsed {
                    Some((a, b)) if 1024 <= a && a <= b => (a, b),
                    _ => {
                        return self.fail(
                            at("ports"),
                            format!("{text:?} is not a port range FIRST-LAST within 1024-65535"),
                        )
                    }
                }
            }
        };
        let dur = |field: &str, v: Option<String>, d: Duration| -> Checked<Duration> {
            match v {
                None => Ok(d),
                Some(s) => self.duration(&at(field), &s),
            }
        };
        Ok(NatConfig {
            snat_address,
            ports,
            tcp_timeout: dur("tcp_timeout", raw.tcp_timeout, default.tcp_timeout)?,
            tcp_closing_timeout: dur(
                "tcp_closing_timeout",
                raw.tcp_closing_timeout,
                default.tcp_closing_timeout,
            )?,
            udp_timeout: dur("udp_timeout", raw.udp_timeout, default.udp_timeout)?,
        })
    }

    fn health_check(&self, service: &str, raw: RawHealthCheck) -> Checked<HealthCheck> {
        let at = |field: &str| format!("{service} health_check.{field}");
        let default = HealthCheck::default();
        let kind = raw.kind.unwrap_or(RawCheckType::Tcp);
        let interval = match raw.interval {
            None => default.interval,
            Some(s) => self.duration(&at("interval"), &s)?,
        };
        // The default timeout shrinks with a short interval, so that setting
        // only `interval` never makes the defaults contradict each other.
        let timeout = match raw.timeout {
            None => default.timeout.min(interval),
            Some(s) => self.duration(&at("timeout"), &s)?,
        };
        if timeout > interval {
            return self.fail(
                at("timeout"),
                format!(
                    "{} is longer than the interval ({}): a probe must end before the next starts",
                    format_duration(timeout),
                    format_duration(interval)
                ),
            );
        }
        let rise = raw
            .rise
            .map_or(Ok(default.rise), |n| self.int(&at("rise"), n, 1..=100))?;
        let fall = raw
            .fall
            .map_or(Ok(default.fall), |n| self.int(&at("fall"), n, 1..=100))?;
        let port = raw
            .port
            .map(|n| self.int(&at("port"), n, 1..=65535))
            .transpose()?;

        let kind = match kind {
            RawCheckType::Http => CheckKind::Http {
                method: self.http_method(&at("method"), raw.method)?,
                path: self.http_path(&at("path"), raw.path)?,
                expect_status: self.statuses(&at("expect_status"), raw.expect_status)?,
                host: raw.host.map(|h| self.host(&at("host"), h)).transpose()?,
            },
            other => {
                // HTTP settings on a non-HTTP check are a mistake about
                // what gets probed, not something to ignore.
                let http_only = [
                    ("method", raw.method.is_some()),
                    ("path", raw.path.is_some()),
                    ("expect_status", raw.expect_status.is_some()),
                    ("host", raw.host.is_some()),
                ];
                if let Some((field, _)) = http_only.iter().find(|(_, set)| *set) {
                    return self.fail(at(field), "only valid with type = \"http\"");
                }
                if other == RawCheckType::None {
                    CheckKind::None
                } else {
                    CheckKind::Tcp
                }
            }
        };
        Ok(HealthCheck {
            kind,
            interval,
            timeout,
            rise,
            fall,
            port,
        })
    }

    fn http_method(&self, field: &str, method: Option<String>) -> Checked<String> {
        let Some(method) = method else {
            return Ok("GET".into());
        };
        // An RFC 9110 token: anything else would corrupt the request line.
        let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if method.is_empty() || !method.chars().all(tchar) {
            return self.fail(field, format!("{method:?} is not a valid HTTP method"));
        }
        Ok(method)
    }

    fn http_path(&self, field: &str, path: Option<String>) -> Checked<String> {
        let Some(path) = path else {
            return Ok("/".into());
        };
        if !path.starts_with('/') {
            return self.fail(field, format!("{path:?} must start with \"/\""));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return self.fail(
                field,
                format!("{path:?} contains whitespace or control characters"),
            );
        }
        Ok(path)
    }

    fn statuses(&self, field: &str, statuses: Option<Vec<i64>>) -> Checked<Vec<u16>> {
        let Some(statuses) = statuses else {
            return Ok(vec![200]);
        };
        if statuses.is_empty() {
            return self.fail(field, "is empty: list at least one status");
        }
        statuses
            .iter()
            .enumerate()
            .map(|(i, &s)| self.int(&format!("{field}[{i}]"), s, 100..=599))
            .collect()
    }

    fn host(&self, field: &str, host: String) -> Checked<String> {
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return self.fail(field, format!("{host:?} is not a valid Host header value"));
        }
        Ok(host)
    }

    fn backend(
        &self,
        at: &str,
        raw: RawBackend,
        vip: IpAddr,
        service_port: u16,
        mode: Mode,
    ) -> Checked<BackendConfig> {
        let address = self.address(&format!("{at}.address"), &raw.address)?;
        if address.is_ipv4() != vip.is_ipv4() {
            return self.fail(
                format!("{at}.address"),
                format!(
                    "{address} is {} but the VIP {vip} is {}",
                    family(address),
                    family(vip)
                ),
            );
        }
        let port = match raw.port {
            None => service_port,
            Some(n) => self.int(&format!("{at}.port"), n, 1..=65535)?,
        };
        // DSR leaves the packet's headers as the client sent them, so the
        // backend sees the service's port whatever is configured here.
        if mode == Mode::Dsr && port != service_port {
            return self.fail(
                format!("{at}.port"),
                format!(
                    "{port} differs from the service port {service_port}, which mode \"dsr\" cannot translate \
                     (use mode = \"nat\", or health_check.port to probe another port)"
                ),
            );
        }
        let weight = raw
            .weight
            .map_or(Ok(100), |n| self.int(&format!("{at}.weight"), n, 0..=10000))?;
        Ok(BackendConfig {
            address,
            port,
            weight,
            state: raw.state.unwrap_or(InitialState::Up),
        })
    }

    /// A unicast address as the datapath can key it.
    fn address(&self, field: &str, text: &str) -> Checked<IpAddr> {
        let Ok(addr) = text.parse::<IpAddr>() else {
            return self.fail(field, format!("{text:?} is not an IPv4 or IPv6 address"));
        };
        let unusable = match addr {
            IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_broadcast(),
            IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
        };
        if unusable {
            return self.fail(field, format!("{addr} is not a unicast address"));
        }
        // The datapath stores IPv4 as IPv4-mapped IPv6, so `::ffff:a.b.c.d`
        // would silently alias the IPv4 address.
        if let IpAddr::V6(a) = addr {
            if let Some(v4) = a.to_ipv4_mapped() {
                return self.fail(field, format!("{addr} is IPv4-mapped: write it as {v4}"));
            }
        }
        Ok(addr)
    }

    fn int<T: TryFrom<i64>>(&self, field: &str, n: i64, range: RangeInclusive<i64>) -> Checked<T> {
        match T::try_from(n) {
            Ok(v) if range.contains(&n) => Ok(v),
            _ => self.fail(
                field,
                format!("{n} is out of range {}..={}", range.start(), range.end()),
            ),
        }
    }

    fn duration(&self, field: &str, text: &str) -> Checked<Duration> {
        parse_duration(text).map_err(|problem| ConfigError {
            file: self.origin.to_owned(),
            field: field.to_owned(),
            problem: format!("{text:?} {problem}"),
        })
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Parses `<n>ms`, `<n>s` or `<n>m` with `n` a positive integer. The error
/// completes a sentence that starts with the quoted text.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (digits, unit_ms) = if let Some(d) = text.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = text.strip_suffix('s') {
        (d, 1000)
    } else if let Some(d) = text.strip_suffix('m') {
        (d, 60_000)
    } else if let Some(d) = text.strip_suffix('h') {
        (d, 3_600_000)
    } else {
        return Err("is not a duration: write <n>ms, <n>s, <n>m or <n>h, e.g. \"500ms\"".into());
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(
            "is not a duration: the number must be a whole number, e.g. \"1500ms\" for 1.5s".into(),
        );
    }
    let ms = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_ms))
        .ok_or("is too long")?;
    if ms == 0 {
        return Err("must be longer than zero".into());
    }
    Ok(Duration::from_millis(ms))
}

/// The inverse of [`parse_duration`] for whole milliseconds, in the largest
/// unit that is exact.
fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn serialize_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

// ---------------------------------------------------------------------------
// Parse errors. toml reports a byte span and a message but not the key
// path (it only prints one when it has no span), so the path is recovered
// from the text at the span.

fn toml_error(text: &str, origin: &str, err: &toml::de::Error) -> ConfigError {
    // One line, like every other error; and the raw structs read numbers
    // as i64 only to range-check them later, which users need not know.
    let message = err
        .message()
        .trim_end()
        .replace('\n', "; ")
        .replace("expected i64", "expected an integer");
    let Some(span) = err.span() else {
        return ConfigError {
            file: origin.to_owned(),
            field: String::new(),
            problem: message,
        };
    };
    let offset = span.start.min(text.len());
    let line = text[..offset].matches('\n').count() + 1;
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    let location = format!("line {line}, column {column}");
    let (field, problem) = match statement_path(text, offset) {
        Some(path) if !path.is_empty() => (
            render_path(&path, &service_names(text)),
            format!("{message} ({location})"),
        ),
        _ => (location, message),
    };
    ConfigError {
        file: origin.to_owned(),
        field,
        problem,
    }
}

/// One key of a path; `index` is set for array-of-tables elements.
#[derive(Clone, Debug, PartialEq)]
struct Segment {
    key: String,
    index: Option<usize>,
}

/// The names of the services, where the document parses as TOML, so that
/// paths can name services as validation errors do.
fn service_names(text: &str) -> Vec<Option<String>> {
    let Ok(doc) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let Some(toml::Value::Array(services)) = doc.get("service") else {
        return Vec::new();
    };
    services
        .iter()
        .map(|s| {
            s.get("name")
                .and_then(|n| n.as_str())
                .filter(|n| valid_name(n))
                .map(str::to_owned)
        })
        .collect()
}

/// `service "web" backend[1].port`, or `service[0].backend[1].port` when
/// the service's name is unknown.
fn render_path(path: &[Segment], names: &[Option<String>]) -> String {
    let seg = |s: &Segment| match s.index {
        Some(i) => format!("{}[{i}]", s.key),
        None => s.key.clone(),
    };
    let rest = |from: usize| path[from..].iter().map(seg).collect::<Vec<_>>().join(".");
    if let Some(Segment {
        key,
        index: Some(i),
    }) = path.first()
    {
        if let (true, Some(Some(name))) = (key == "service", names.get(*i)) {
            let rest = rest(1);
            return if rest.is_empty() {
                format!("service {name:?}")
            } else {
                format!("service {name:?} {rest}")
            };
        }
    }
    rest(0)
}

/// The key path of the statement (table header or `key = value`) that
/// contains byte `offset`. A lexer just precise enough to find statement
/// boundaries: it skips strings, comments and multi-line arrays, and counts
/// `[[array]]` headers to index array-of-tables elements.
fn statement_path(text: &str, offset: usize) -> Option<Vec<Segment>> {
    let b = text.as_bytes();
    let mut table: Vec<Segment> = Vec::new();
    // Per array-of-tables (dotted name): elements seen so far.
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut found = None;
    let mut i = 0;
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() || i > offset {
            return found;
        }
        match b[i] {
            b'#' => i = line_end(b, i),
            b'[' => {
                let end = line_end(b, i);
                let is_array = b.get(i + 1) == Some(&b'[');
                let header = &text[i + if is_array { 2 } else { 1 }..end];
                let keys = split_key(header.split(']').next().unwrap_or(""));
                let name = keys.join(".");
                if is_array {
                    *counts.entry(name.clone()).or_insert(0) += 1;
                    // A new element starts its nested arrays afresh.
                    counts.retain(|k, _| !k.starts_with(&format!("{name}.")));
                }
                table = (1..=keys.len())
                    .map(|n| Segment {
                        key: keys[n - 1].clone(),
                        index: counts.get(&keys[..n].join(".")).map(|c| c - 1),
                    })
                    .collect();
                found = Some(table.clone());
                i = end;
            }
            _ => {
                let eq = key_end(b, i);
                let mut path = table.clone();
                path.extend(
                    split_key(&text[i..eq])
                        .into_iter()
                        .map(|key| Segment { key, index: None }),
                );
                found = Some(path);
                i = value_end(b, eq + 1);
            }
        }
    }
}

fn line_end(b: &[u8], from: usize) -> usize {
    b[from..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |p| from + p)
}

/// Index of the `=` after a key (or of the line end if there is none).
fn key_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i] != b'=' && b[i] != b'\n' {
        if b[i] == b'"' || b[i] == b'\'' {
            i = string_end(b, i);
        } else {
            i += 1;
        }
    }
    i.min(b.len())
}

/// Index of the newline that ends a value starting at `i`.
fn value_end(b: &[u8], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' => {
                i = string_end(b, i);
                continue;
            }
            b'#' => {
                i = line_end(b, i);
                continue;
            }
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'\n' if depth == 0 => return i,
            _ => {}
        }
        i += 1;
    }
    i
}

/// Index just past the string starting at `i` (basic or literal, single or
/// multi-line); an unterminated single-line string ends at the line end.
fn string_end(b: &[u8], i: usize) -> usize {
    let quote = b[i];
    let escapes = quote == b'"';
    if b[i..].starts_with(&[quote; 3]) {
        let mut j = i + 3;
        while j < b.len() {
            if escapes && b[j] == b'\\' {
                j += 2;
            } else if b[j..].starts_with(&[quote; 3]) {
                // Up to two quotes may end the content right before the delimiter.
                let mut end = j + 3;
                while end < b.len() && b[end] == quote && end < j + 5 {
                    end += 1;
                }
                return end;
            } else {
                j += 1;
            }
        }
        return b.len();
    }
    let mut j = i + 1;
    while j < b.len() && b[j] != b'\n' {
        if escapes && b[j] == b'\\' {
            j += 2;
        } else if b[j] == quote {
            return j + 1;
        } else {
            j += 1;
        }
    }
    j.min(b.len())
}

/// Splits a dotted key, unquoting quoted parts.
fn split_key(key: &str) -> Vec<String> {
    let b = key.as_bytes();
    let (mut parts, mut start, mut i) = (Vec::new(), 0, 0);
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' => i = string_end(b, i),
            b'.' => {
                parts.push(&key[start..i]);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    parts.push(&key[start..]);
    parts
        .into_iter()
        .map(|p| {
            let p = p.trim();
            let quoted = p.len() >= 2
                && (p.starts_with('"') && p.ends_with('"')
                    || p.starts_with('\'') && p.ends_with('\''));
            if quoted {
                p[1..p.len() - 1].to_owned()
            } else {
                p.to_owned()
            }
        })
        .filter(|p| !p.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/xdplb.toml";

    /// Every key of the format, none left at its default.
    const FULL: &str = r#"
[daemon]
api_socket = "/run/lb/api.sock"
state_file = "/var/lib/lb/state.json"
pin_dir = "/sys/fs/bpf/lb"
all_down = "drop"

[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
mode = "dsr"
table_size = 251
hash = "source"
drain_timeout = "2m"

[service.health_check]
type = "http"
interval = "2s"
timeout = "1500ms"
rise = 5
fall = 7
port = 8080
method = "HEAD"
path = "/healthz?full=1"
expect_status = [200, 204]
host = "example.com"

[[service.backend]]
address = "10.0.0.11"
weight = 300
state = "drain"

[[service.backend]]
address = "10.0.0.12"
port = 80

[[service]]
name = "dns6"
vip = "2001:db8::53"
port = 53
protocol = "udp"
mode = "nat"

[service.health_check]
type = "none"

[[service.backend]]
address = "2001:db8::1"
port = 5353
weight = 0
state = "down"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, FILE)
    }

    /// A one-service config with `extra` appended (e.g. a backend table).
    fn service(extra: &str) -> String {
        format!("[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n{extra}")
    }

    /// Asserts the config fails on `field` with a problem containing `needle`.
    #[track_caller]
    fn rejects(text: &str, field: &str, needle: &str) -> ConfigError {
        let err = parse(text).expect_err("config should be rejected");
        assert_eq!(err.field, field, "{err}");
        assert!(
            err.problem.contains(needle),
            "problem lacks {needle:?}: {err}"
        );
        assert_eq!(err.file, FILE);
        err
    }

    #[test]
    fn full_example_parses_with_every_field() {
        let c = parse(FULL).unwrap();
        assert_eq!(
            c.daemon,
            DaemonConfig {
                api_socket: "/run/lb/api.sock".into(),
                state_file: "/var/lib/lb/state.json".into(),
                pin_dir: "/sys/fs/bpf/lb".into(),
                all_down: AllDown::Drop,
            }
        );
        let web = &c.services[0];
        assert_eq!(
            *web,
            ServiceConfig {
                name: "web".into(),
                vip: "10.0.0.100".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                mode: Mode::Dsr,
                table_size: 251,
                hash: HashFields::Source,
                drain_timeout: Duration::from_secs(120),
                health_check: HealthCheck {
                    kind: CheckKind::Http {
                        method: "HEAD".into(),
                        path: "/healthz?full=1".into(),
                        expect_status: vec![200, 204],
                        host: Some("example.com".into()),
                    },
                    interval: Duration::from_secs(2),
                    timeout: Duration::from_millis(1500),
                    rise: 5,
                    fall: 7,
                    port: Some(8080),
                },
                nat: NatConfig::default(),
                backends: vec![
                    BackendConfig {
                        address: "10.0.0.11".parse().unwrap(),
                        port: 80,
                        weight: 300,
                        state: InitialState::Drain,
                    },
                    BackendConfig {
                        address: "10.0.0.12".parse().unwrap(),
                        port: 80,
                        weight: 100,
                        state: InitialState::Up,
                    },
                ],
            }
        );
        let dns = &c.services[1];
        assert_eq!(
            dns.key(),
            ("2001:db8::53".parse().unwrap(), 53, Protocol::Udp)
        );
        assert_eq!(dns.mode, Mode::Nat);
        assert_eq!(dns.health_check.kind, CheckKind::None);
        assert_eq!(
            dns.backends,
            [BackendConfig {
                address: "2001:db8::1".parse().unwrap(),
                port: 5353,
                weight: 0,
                state: InitialState::Down,
            }]
        );
    }

    #[test]
    fn minimal_service_gets_defaults() {
        let c = parse(&service("[[service.backend]]\naddress = \"10.0.0.11\"\n")).unwrap();
        assert_eq!(c.daemon, DaemonConfig::default());
        assert_eq!(c.daemon.all_down, AllDown::FailOpen);
        let s = &c.services[0];
        assert_eq!(s.mode, Mode::Dsr);
        assert_eq!(s.table_size, 65537);
        assert_eq!(s.hash, HashFields::FiveTuple);
        assert_eq!(s.drain_timeout, Duration::from_secs(30));
        assert_eq!(s.health_check, HealthCheck::default());
        assert_eq!(s.health_check.kind, CheckKind::Tcp);
        assert_eq!(
            s.backends,
            [BackendConfig {
                address: "10.0.0.11".parse().unwrap(),
                port: 80,
                weight: 100,
                state: InitialState::Up
            }]
        );
    }

    #[test]
    fn http_check_defaults() {
        let c = parse(&service("[service.health_check]\ntype = \"http\"\n")).unwrap();
        assert_eq!(
            c.services[0].health_check.kind,
            CheckKind::Http {
                method: "GET".into(),
                path: "/".into(),
                expect_status: vec![200],
                host: None
            }
        );
    }

    #[test]
    fn empty_file_and_service_without_backends_are_valid() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert!(parse(&service("")).unwrap().services[0].backends.is_empty());
    }

    #[test]
    fn default_timeout_shrinks_to_a_short_interval() {
        let c = parse(&service("[service.health_check]\ninterval = \"200ms\"\n")).unwrap();
        assert_eq!(
            c.services[0].health_check.timeout,
            Duration::from_millis(200)
        );
    }

    #[test]
    fn serialized_config_parses_back_to_itself() {
        let c = parse(FULL).unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(parse(&text).unwrap(), c, "{text}");
    }

    #[test]
    fn documented_examples_parse() {
        let doc = include_str!("../../docs/configuration.md");
        let examples: Vec<&str> = doc
            .split("```toml\n")
            .skip(1)
            .map(|block| block.split("```").next().unwrap())
            .collect();
        assert_eq!(examples.len(), 2);
        for example in examples {
            parse(example).unwrap_or_else(|e| panic!("{e}\n{example}"));
        }
    }

    #[test]
    fn protocol_number_and_display() {
        assert_eq!((Protocol::Tcp.number(), Protocol::Udp.number()), (6, 17));
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!(Protocol::Udp.to_string(), "udp");
    }

    #[test]
    fn display_names_file_field_and_problem() {
        let err = parse(&service(
            "[[service.backend]]\naddress = \"10.0.0.1\"\n[[service.backend]]\naddress = \"10.0.0.2\"\n\
             [[service.backend]]\naddress = \"10.0.0.3\"\nweight = 20000\n",
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "config /etc/xdplb.toml: service \"web\" backend[2].weight: 20000 is out of range 0..=10000"
        );
    }

    #[test]
    fn load_reads_the_file_and_names_it_in_errors() {
        let path =
            std::env::temp_dir().join(format!("xdplb-config-test-{}.toml", std::process::id()));
        std::fs::write(&path, service("").replace("port = 80", "port = 0")).unwrap();
        let err = Config::load(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(err.file, path.display().to_string());
        assert!(
            err.to_string().starts_with(&format!(
                "config {}: service \"web\" port: ",
                path.display()
            )),
            "{err}"
        );
        assert!(err.problem.contains("out of range"), "{err}");

        let err = Config::load(Path::new("/nonexistent/xdplb.toml")).unwrap_err();
        assert_eq!(err.field, "");
        assert!(
            err.to_string()
                .starts_with("config /nonexistent/xdplb.toml: cannot read it: "),
            "{err}"
        );
    }

    // --- parse-stage errors: path, line and column recovered from the span

    #[test]
    fn unknown_field_in_backend() {
        let text = service("[[service.backend]]\naddress = \"10.0.0.11\"\nwieght = 5\n");
        let err = rejects(
            &text,
            "service \"web\" backend[0].wieght",
            "unknown field `wieght`",
        );
        assert!(err.problem.contains("(line 8, column 1)"), "{err}");
        assert!(
            err.problem.contains("`weight`"),
            "lists the expected fields: {err}"
        );
    }

    #[test]
    fn unknown_fields_elsewhere() {
        rejects("colour = 1\n", "colour", "unknown field `colour`");
        rejects(
            "[daemon]\napi_sock = \"/x\"\n",
            "daemon.api_sock",
            "unknown field `api_sock`",
        );
        rejects(
            &service("[service.health_check]\nkind = \"tcp\"\n"),
            "service \"web\" health_check.kind",
            "unknown field `kind`",
        );
        rejects(
            &service("vips = []\n"),
            "service \"web\" vips",
            "unknown field",
        );
    }

    #[test]
    fn parse_errors_in_a_later_service_name_it() {
        let text = format!(
            "{}\n{}",
            service(""),
            service("")
                .replace("web", "api")
                .replace("port = 80", "port = 80\nmode = \"tunnel\"")
        );
        rejects(&text, "service \"api\" mode", "unknown variant `tunnel`");
    }

    #[test]
    fn missing_required_field_names_the_table() {
        let err = rejects(
            "[[service]]\nname = \"web\"\nport = 80\nprotocol = \"tcp\"\n",
            "service \"web\"",
            "missing field `vip`",
        );
        assert!(err.problem.contains("line 1, column 1"), "{err}");
        rejects(
            &service("[[service.backend]]\nport = 80\n"),
            "service \"web\" backend[0]",
            "missing field `address`",
        );
    }

    #[test]
    fn wrong_type_and_bad_enum() {
        rejects(
            &service("table_size = \"big\"\n"),
            "service \"web\" table_size",
            "invalid type",
        );
        rejects(
            &service("").replace("\"tcp\"", "\"sctp\""),
            "service \"web\" protocol",
            "unknown variant `sctp`",
        );
        rejects(
            "[daemon]\nall_down = \"maybe\"\n",
            "daemon.all_down",
            "expected `fail-open` or `drop`",
        );
    }

    #[test]
    fn syntax_error_reports_line_and_column() {
        let err = rejects(
            "[[service]]\nname = \"web\nport = 80\n",
            "service[0].name",
            "line 2, column",
        );
        assert!(
            err.to_string()
                .starts_with("config /etc/xdplb.toml: service[0].name: "),
            "{err}"
        );
    }

    #[test]
    fn statement_path_skips_strings_comments_and_arrays() {
        let text = "# [not] a header\n[[service]]\nname = \"a # ]\" # c\nx = [\n  1,\n  [2],\n]\n\
                    [[service.backend]]\n[[service]]\n[[service.backend]]\n[[service.backend]]\n\"a.b\".c = '''\n[x]\n'''\nport = 1\n";
        let at = |needle: &str| statement_path(text, text.find(needle).unwrap()).unwrap();
        let seg = |key: &str, index| Segment {
            key: key.into(),
            index,
        };
        assert_eq!(at("  [2]"), [seg("service", Some(0)), seg("x", None)]);
        assert_eq!(
            at("[x]"),
            [
                seg("service", Some(1)),
                seg("backend", Some(1)),
                seg("a.b", None),
                seg("c", None)
            ]
        );
        assert_eq!(
            at("port = 1"),
            [
                seg("service", Some(1)),
                seg("backend", Some(1)),
                seg("port", None)
            ]
        );
    }

    // --- validation rules

    #[test]
    fn invalid_service_name() {
        rejects(
            &service("").replace("\"web\"", "\"my web\""),
            "service[0].name",
            "not a valid name",
        );
        let long = "a".repeat(65);
        rejects(
            &service("").replace("web", &long),
            "service[0].name",
            "not a valid name",
        );
    }

    #[test]
    fn duplicate_service_name() {
        let text = format!(
            "{}{}",
            service(""),
            service("").replace("port = 80", "port = 81")
        );
        rejects(&text, "service[1].name", "duplicate service name \"web\"");
    }

    #[test]
    fn duplicate_service_key_names_both_services() {
        let text = format!("{}{}", service(""), service("").replace("web", "web2"));
        let err = rejects(&text, "service \"web2\"", "duplicate service");
        assert!(
            err.problem.contains("10.0.0.100:80/tcp") && err.problem.contains("\"web\""),
            "{err}"
        );
        // Another protocol on the same address and port is another service.
        let text = format!(
            "{}{}",
            service(""),
            service("").replace("web", "web2").replace("tcp", "udp")
        );
        assert_eq!(parse(&text).unwrap().services.len(), 2);
    }

    #[test]
    fn invalid_addresses() {
        rejects(
            &service("").replace("10.0.0.100", "10.0.0.300"),
            "service \"web\" vip",
            "not an IPv4 or IPv6 address",
        );
        rejects(
            &service("").replace("10.0.0.100", "0.0.0.0"),
            "service \"web\" vip",
            "not a unicast address",
        );
        rejects(
            &service("").replace("10.0.0.100", "ff02::1"),
            "service \"web\" vip",
            "not a unicast address",
        );
        rejects(
            &service("").replace("10.0.0.100", "::ffff:10.0.0.100"),
            "service \"web\" vip",
            "IPv4-mapped",
        );
        rejects(
            &service("[[service.backend]]\naddress = \"backend1\"\n"),
            "service \"web\" backend[0].address",
            "not an IPv4",
        );
    }

    #[test]
    fn port_out_of_range() {
        rejects(
            &service("").replace("port = 80", "port = 0"),
            "service \"web\" port",
            "0 is out of range 1..=65535",
        );
        rejects(
            &service("").replace("port = 80", "port = 65536"),
            "service \"web\" port",
            "out of range",
        );
        rejects(
            &service("[[service.backend]]\naddress = \"10.0.0.1\"\nport = 0\n"),
            "service \"web\" backend[0].port",
            "out of range",
        );
        rejects(
            &service("[service.health_check]\nport = 70000\n"),
            "service \"web\" health_check.port",
            "out of range",
        );
    }

    #[test]
    fn table_size_must_be_a_prime_in_range() {
        rejects(
            &service("table_size = 65536\n"),
            "service \"web\" table_size",
            "65536 is not a prime",
        );
        rejects(
            &service("table_size = 241\n"),
            "service \"web\" table_size",
            "out of range 251..=1048573",
        );
        rejects(
            &service("table_size = 1048583\n"),
            "service \"web\" table_size",
            "out of range",
        );
        assert_eq!(
            parse(&service("table_size = 1048573\n")).unwrap().services[0].table_size,
            MAX_TABLE_SIZE
        );
    }

    #[test]
    fn table_size_must_hold_every_backend() {
        let backends: String = (1..=252)
            .map(|i| {
                format!(
                    "[[service.backend]]\naddress = \"10.1.{}.{}\"\n",
                    i / 200,
                    i % 200
                )
            })
            .collect();
        rejects(
            &service(&format!("table_size = 251\n{backends}")),
            "service \"web\" table_size",
            "smaller than the number of backends (252)",
        );
    }

    #[test]
    fn maglev_capacity_is_checked() {
        // 32 services of the default size fill the flat table exactly.
        let many: String = (0..33)
            .map(|i| {
                service("")
                    .replace("web", &format!("s{i}"))
                    .replace("port = 80", &format!("port = {}", i + 1))
            })
            .collect();
        rejects(&many, "service \"s32\" table_size", "need 4325442 slots");
        let fits: String = many
            .split("[[service]]")
            .take(33)
            .collect::<Vec<_>>()
            .join("[[service]]");
        assert_eq!(parse(&fits).unwrap().services.len(), 32);
    }

    #[test]
    fn backend_family_must_match_vip() {
        rejects(
            &service("[[service.backend]]\naddress = \"2001:db8::1\"\n"),
            "service \"web\" backend[0].address",
            "is IPv6 but the VIP 10.0.0.100 is IPv4",
        );
    }

    #[test]
    fn duplicate_backend() {
        let b = "[[service.backend]]\naddress = \"10.0.0.11\"\n";
        let err = rejects(
            &service(&format!("{b}{b}")),
            "service \"web\" backend[1]",
            "duplicate backend 10.0.0.11:80",
        );
        assert!(err.problem.contains("backend[0]"), "{err}");
    }

    #[test]
    fn weight_out_of_range() {
        rejects(
            &service("[[service.backend]]\naddress = \"10.0.0.1\"\nweight = -1\n"),
            "service \"web\" backend[0].weight",
            "out of range 0..=10000",
        );
        rejects(
            &service("[[service.backend]]\naddress = \"10.0.0.1\"\nweight = 10001\n"),
            "service \"web\" backend[0].weight",
            "out of range",
        );
    }

    #[test]
    fn dsr_backend_port_must_be_the_service_port() {
        let b = "[[service.backend]]\naddress = \"10.0.0.1\"\nport = 8080\n";
        rejects(
            &service(b),
            "service \"web\" backend[0].port",
            "differs from the service port 80",
        );
        assert_eq!(
            parse(&service(&format!("mode = \"nat\"\n{b}")))
                .unwrap()
                .services[0]
                .backends[0]
                .port,
            8080
        );
    }

    #[test]
    fn health_timeout_must_not_exceed_interval() {
        rejects(
            &service("[service.health_check]\ninterval = \"1s\"\ntimeout = \"1001ms\"\n"),
            "service \"web\" health_check.timeout",
            "1001ms is longer than the interval (1s)",
        );
    }

    #[test]
    fn rise_and_fall_out_of_range() {
        rejects(
            &service("[service.health_check]\nrise = 0\n"),
            "service \"web\" health_check.rise",
            "0 is out of range 1..=100",
        );
        rejects(
            &service("[service.health_check]\nfall = 101\n"),
            "service \"web\" health_check.fall",
            "out of range 1..=100",
        );
    }

    #[test]
    fn invalid_durations() {
        let drain = |d: &str| service(&format!("drain_timeout = \"{d}\"\n"));
        rejects(
            &drain("0s"),
            "service \"web\" drain_timeout",
            "longer than zero",
        );
        rejects(
            &drain("1d"),
            "service \"web\" drain_timeout",
            "not a duration",
        );
        rejects(
            &drain("1.5s"),
            "service \"web\" drain_timeout",
            "whole number",
        );
        rejects(&drain("s"), "service \"web\" drain_timeout", "whole number");
        rejects(
            &drain("99999999999999999999m"),
            "service \"web\" drain_timeout",
            "too long",
        );
        rejects(
            &service("[service.health_check]\ninterval = \"1 s\"\n"),
            "service \"web\" health_check.interval",
            "not a duration",
        );
    }

    #[test]
    fn http_path_must_start_with_slash() {
        let hc = "[service.health_check]\ntype = \"http\"\n";
        rejects(
            &service(&format!("{hc}path = \"health\"\n")),
            "service \"web\" health_check.path",
            "must start with \"/\"",
        );
        rejects(
            &service(&format!("{hc}path = \"/a b\"\n")),
            "service \"web\" health_check.path",
            "whitespace",
        );
    }

    #[test]
    fn http_status_out_of_range() {
        let hc = "[service.health_check]\ntype = \"http\"\n";
        rejects(
            &service(&format!("{hc}expect_status = [200, 600]\n")),
            "service \"web\" health_check.expect_status[1]",
            "600 is out of range 100..=599",
        );
        rejects(
            &service(&format!("{hc}expect_status = []\n")),
            "service \"web\" health_check.expect_status",
            "empty",
        );
    }

    #[test]
    fn http_method_and_host_are_checked() {
        let hc = "[service.health_check]\ntype = \"http\"\n";
        rejects(
            &service(&format!("{hc}method = \"GET /\"\n")),
            "service \"web\" health_check.method",
            "not a valid HTTP method",
        );
        rejects(
            &service(&format!("{hc}host = \"\"\n")),
            "service \"web\" health_check.host",
            "not a valid Host",
        );
    }

    #[test]
    fn http_settings_need_an_http_check() {
        rejects(
            &service("[service.health_check]\npath = \"/\"\n"),
            "service \"web\" health_check.path",
            "only valid with type = \"http\"",
        );
    }

    #[test]
    fn daemon_paths_must_be_absolute() {
        rejects(
            "[daemon]\nstate_file = \"state.json\"\n",
            "daemon.state_file",
            "not an absolute path",
        );
    }

    #[test]
    fn duration_formatting_round_trips() {
        for text in ["1ms", "1500ms", "2s", "90s", "3m"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}

#[cfg(test)]
mod nat_tests {
    use super::*;

    const NAT: &str = r#"
[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
protocol = "tcp"
mode = "nat"
[service.nat]
snat_address = "10.1.0.2"
ports = "30000-30999"
tcp_timeout = "10m"
[[service.backend]]
address = "10.1.0.11"
port = 8080
"#;

    #[test]
    fn nat_settings_parse_with_defaults() {
        let c = Config::parse(NAT, "nat.toml").unwrap();
        let nat = &c.services[0].nat;
        assert_eq!(nat.snat_address, Some("10.1.0.2".parse().unwrap()));
        assert_eq!(nat.ports, (30000, 30999));
        assert_eq!(nat.tcp_timeout, Duration::from_secs(600));
        assert_eq!(nat.udp_timeout, NatConfig::default().udp_timeout);
        assert_eq!(
            c.services[0].backends[0].port, 8080,
            "NAT maps VIP:80 to backend:8080"
        );
    }

    #[test]
    fn bad_nat_settings_are_refused() {
        for (from, to, needle) in [
            (
                "ports = \"30000-30999\"",
                "ports = \"30999-30000\"",
                "nat.ports",
            ),
            (
                "snat_address = \"10.1.0.2\"",
                "snat_address = \"fd00::2\"",
                "nat.snat_address",
            ),
            (
                "tcp_timeout = \"10m\"",
                "tcp_timeout = \"soon\"",
                "nat.tcp_timeout",
            ),
            ("mode = \"nat\"", "mode = \"dsr\"", "nat"),
        ] {
            let err = Config::parse(&NAT.replace(from, to), "nat.toml").unwrap_err();
            assert!(err.field.ends_with(needle), "{err}");
        }
    }
}
