//! The control API: HTTP+JSON on a root-only Unix socket.
//!
//! This module is the contract: the requests the daemon understands, how
//! they map onto HTTP, and the JSON shapes it answers with. `server` serves
//! it, `client` calls it (the CLI), the daemon implements [`Handler`].

pub mod client;
pub mod server;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};
use xdp_common::{Counters, BACKEND_ACTIVE, BACKEND_DRAINING};

pub use crate::config::{Admin, BackendSpec, HashFields, Mode, Protocol, ServiceSpec};

/// One API call. HTTP mapping (all paths under `/v1`; bodies and answers
/// are JSON; answers are 200 with the value, or 4xx/5xx with
/// `{"error": "..."}`):
///
/// | request | HTTP |
/// |---|---|
/// | `Status` | `GET /v1/status` |
/// | `ListServices` | `GET /v1/services` |
/// | `AddService` | `POST /v1/services/add`, body: a [`ServiceSpec`] (a `[[service]]` table) |
/// | `RemoveService` | `POST /v1/services/remove`, body `{"name": ...}` |
/// | `ListBackends` | `GET /v1/backends` or `GET /v1/backends?service=NAME` |
/// | `AddBackend` | `POST /v1/backends/add`, body `{"service": ..., "backend": BackendSpec}` |
/// | `RemoveBackend` | `POST /v1/backends/remove`, body [`BackendRef`] |
/// | `Drain` / `Undrain` | `POST /v1/backends/drain` / `.../undrain`, body [`BackendRef`] |
/// | `Reload` | `POST /v1/reload` |
/// | `Flow` | `GET /v1/flow?src=IP:PORT&dst=IP:PORT&protocol=tcp` (IPv6 `[addr]:port`, encoded) |
/// | `Stats` | `GET /v1/stats` |
/// | `ClusterLeave` / `ClusterJoin` | `POST /v1/cluster/leave` / `.../join` |
///
/// Bodies are read into typed structs that refuse unknown and repeated
/// keys: `{"port": 80, "port": 81}` is an error, not the last one winning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Status,
    ListServices,
    AddService(Box<ServiceSpec>),
    RemoveService {
        name: String,
    },
    ListBackends {
        service: Option<String>,
    },
    AddBackend {
        service: String,
        backend: BackendSpec,
    },
    RemoveBackend(BackendRef),
    Drain(BackendRef),
    Undrain(BackendRef),
    Reload,
    Flow {
        src: SocketAddr,
        dst: SocketAddr,
        protocol: Protocol,
    },
    Stats,
    /// Withdraw every VIP route (docs/cluster.md).
    ClusterLeave,
    /// Announce again.
    ClusterJoin,
}

/// Names one backend of one service (an API body, the CLI's arguments).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    /// The service's name.
    pub service: String,
    /// The backend's address.
    pub address: IpAddr,
    /// The backend's port, when the service has several backends on one
    /// address [default: the service's, or the only one at the address].
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// An error answer: HTTP status and message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    /// 400: the request is wrong (bad config, unknown backend, ...).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }
    /// 404: no such service/backend.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }
    /// 500: the daemon failed to do something it should be able to.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }
}

/// What the daemon implements.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request with a JSON value (one of the views below).
    fn handle(&self, request: Request) -> Result<serde_json::Value, ApiError>;
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub pid: u32,
    pub uptime_s: u64,
    pub config: String,
    pub pin_dir: String,
    /// Whether this run adopted a running datapath (hot restart).
    pub adopted: bool,
    pub interfaces: Vec<InterfaceView>,
    pub services: usize,
    pub backends: usize,
    /// Backends taking new flows.
    pub backends_active: usize,
    /// Times the daemon found its program detached and attached it again.
    #[serde(default)]
    pub datapath_repairs: u64,
    /// The last such problem, and what came of the repair.
    #[serde(default)]
    pub datapath_problem: Option<String>,
    /// Service name -> Maglev table fingerprint (docs/cluster.md).
    #[serde(default)]
    pub fingerprints: BTreeMap<String, String>,
    /// Announcement state, when `[cluster] route_table` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterView>,
    /// Flow-state replication, when peers are configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<crate::cluster::replication::ReplicationView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceView {
    pub name: String,
    /// How the program is attached: "native", "generic", or "adopted"
    /// (the link an earlier daemon pinned, its mode unchanged).
    pub mode: String,
}

/// One service with its backends (`GET /v1/services`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: Mode,
    pub table_size: u32,
    pub hash: HashFields,
    /// Fingerprint of the Maglev table (equal on nodes that agree).
    #[serde(default)]
    pub fingerprint: String,
    #[serde(flatten)]
    pub traffic: Traffic,
    pub backends: Vec<BackendView>,
}

/// One backend (`GET /v1/backends`, and inside [`ServiceView`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub service: String,
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// Operator state.
    pub admin: Admin,
    /// Health-check verdict (`up` when checks are off).
    pub health: Health,
    /// What the datapath does with the backend.
    pub state: DatapathState,
    /// Next-hop MAC, once resolved.
    pub mac: Option<String>,
    #[serde(flatten)]
    pub traffic: Traffic,
    /// The last health check's result, if any ran.
    pub last_check: Option<String>,
    /// Health state changes since the daemon started.
    pub transitions: u64,
    /// What the traffic says of the backend (absent from older daemons).
    #[serde(default)]
    pub passive: PassiveView,
}

/// What the datapath forwarded for a service or a backend. Its fields are
/// written into the view's own JSON object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    /// Flows whose first packet the datapath forwarded (absent from older
    /// daemons' answers).
    #[serde(default)]
    pub new_flows: u64,
}

impl Traffic {
    /// Packets, bytes and new flows, in that order.
    pub fn values(self) -> [u64; 3] {
        [self.packets, self.bytes, self.new_flows]
    }
}

impl From<Counters> for Traffic {
    fn from(c: Counters) -> Self {
        Self {
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
        }
    }
}

/// Passive failure detection's view of a backend (docs/operations.md, "Passive detection").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassiveView {
    /// New flows that got an answer (DSR: the client's second packet;
    /// NAT: the backend's reply).
    pub answered: u64,
    /// NAT: new flows the backend reset without answering.
    pub refused: u64,
    /// SYNs clients sent again for flows still unanswered.
    pub syn_retransmits: u64,
    /// Times the traffic made it a suspect (each time it was probed at
    /// once), and the numbers behind the last one.
    pub suspicions: u64,
    pub last_suspicion: Option<String>,
}

/// `GET /v1/stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    /// Per-reason datapath counters (see docs/datapath.md).
    pub reasons: BTreeMap<String, u64>,
    pub services: Vec<ServiceStatsView>,
    /// NAT table occupancy, when a NAT service exists.
    #[serde(default)]
    pub nat: Option<crate::dataplane::NatOccupancy>,
    /// Flow-state replication, when peers are configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<crate::cluster::replication::ReplicationView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatsView {
    pub name: String,
    #[serde(flatten)]
    pub traffic: Traffic,
    pub backends: Vec<BackendStatsView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatsView {
    pub address: IpAddr,
    pub port: u16,
    #[serde(flatten)]
    pub traffic: Traffic,
}

/// `GET /v1/flow`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    pub service: String,
    pub backend: SocketAddr,
    /// The backend's datapath state.
    pub backend_state: DatapathState,
    /// True when the flow table already pins the flow; false when it is
    /// answered from the Maglev table (a new flow would go there).
    pub established: bool,
    /// The pin came from a cluster peer (absent from older daemons).
    #[serde(default)]
    pub replicated: bool,
    /// Where the Maglev table would send a new flow with this 5-tuple.
    #[serde(default)]
    pub new_flow_backend: Option<SocketAddr>,
    pub hash: u32,
    pub slot: Option<u32>,
    /// A NAT flow's live translation.
    #[serde(default)]
    pub nat: Option<String>,
}

/// Answer of the calls that change something.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// What happened, for humans ("backend 10.0.0.1:80 of web drained").
    pub message: String,
}

/// Refuses a flow no packet can have: a source and a destination of two
/// address families, or an IPv4-mapped IPv6 address (the datapath keys IPv4
/// as IPv4-mapped IPv6, so `::ffff:a.b.c.d` would alias the IPv4 address).
pub fn check_flow(src: SocketAddr, dst: SocketAddr) -> Result<(), ApiError> {
    for addr in [src.ip(), dst.ip()] {
        if let Some(problem) = crate::config::ipv4_mapped(addr) {
            return Err(ApiError::bad_request(problem));
        }
    }
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(ApiError::bad_request(format!(
            "source {src} and destination {dst} are of different address families"
        )));
    }
    Ok(())
}

/// A backend's health-check verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Passing (or not checked).
    Up,
    /// Failing.
    Down,
}

impl From<bool> for Health {
    fn from(healthy: bool) -> Self {
        if healthy {
            Health::Up
        } else {
            Health::Down
        }
    }
}

/// What the datapath does with a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathState {
    /// Takes new flows.
    Active,
    /// Keeps its established flows, takes no new ones.
    Draining,
    /// Takes nothing: its flows are re-picked on their next packet.
    Down,
}

impl DatapathState {
    /// The state a `BACKEND_*` value of the datapath's backend entry means.
    pub fn of(state: u32) -> Self {
        match state {
            BACKEND_ACTIVE => Self::Active,
            BACKEND_DRAINING => Self::Draining,
            _ => Self::Down,
        }
    }
}

macro_rules! display_as_json {
    ($($ty:ident)+) => {$(
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let json = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
                f.write_str(json.as_str().unwrap_or_default())
            }
        }
    )+};
}

display_as_json!(Health DatapathState);

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn repeated_keys_in_bodies_are_refused() {
        let service = r#"{"name": "web", "vip": "10.0.0.100", "port": 80, "port": 81,
                          "protocol": "tcp"}"#;
        let err = serde_json::from_str::<ServiceSpec>(service).unwrap_err();
        assert!(err.to_string().contains("duplicate field `port`"), "{err}");
        let backend = r#"{"address": "10.0.0.1", "weight": 1, "weight": 100}"#;
        assert!(serde_json::from_str::<BackendSpec>(backend).is_err());
        let r = r#"{"service": "web", "address": "10.0.0.1", "service": "db"}"#;
        assert!(serde_json::from_str::<BackendRef>(r).is_err());
    }

    #[test]
    fn flows_across_address_families_are_refused() {
        let check = |src: &str, dst: &str| check_flow(src.parse().unwrap(), dst.parse().unwrap());
        assert!(check("10.0.0.1:1", "10.0.0.2:80").is_ok());
        assert!(check("[fd00::1]:1", "[fd00::2]:80").is_ok());
        for (src, dst) in [
            ("10.0.0.1:1", "[fd00::2]:80"),
            ("[fd00::1]:1", "10.0.0.2:80"),
            ("[::ffff:10.0.0.1]:1", "[fd00::2]:80"),
        ] {
            let err = check(src, dst).unwrap_err();
            assert_eq!(err.status, 400, "{src} {dst}");
        }
    }

    #[test]
    fn views_use_the_lowercase_names() {
        let b = BackendView {
            service: "web".into(),
            address: "10.0.0.1".parse().unwrap(),
            port: 80,
            weight: 1,
            admin: Admin::Drain,
            health: Health::Down,
            state: DatapathState::Draining,
            mac: None,
            traffic: Traffic::default(),
            last_check: None,
            transitions: 0,
            passive: Default::default(),
        };
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(
            (&v["admin"], &v["health"], &v["state"]),
            (&json!("drain"), &json!("down"), &json!("draining"))
        );
        assert_eq!(DatapathState::of(BACKEND_ACTIVE).to_string(), "active");
        assert_eq!(Health::Up.to_string(), "up");
    }
}
