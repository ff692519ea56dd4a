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

/// One API call. HTTP mapping (all paths under `/v1`; bodies and answers
/// are JSON; answers are 200 with the value, or 4xx/5xx with
/// `{"error": "..."}`):
///
/// | request | HTTP |
/// |---|---|
/// | `Status` | `GET /v1/status` |
/// | `ListServices` | `GET /v1/services` |
/// | `AddService` | `POST /v1/services/add`, body: a `[[service]]` table of the config file, as JSON |
/// | `RemoveService` | `POST /v1/services/remove`, body `{"name": ...}` |
/// | `ListBackends` | `GET /v1/backends` or `GET /v1/backends?service=NAME` |
/// | `AddBackend` | `POST /v1/backends/add`, body `{"service": ..., "backend": {a [[service.backend]] table as JSON}}` |
/// | `RemoveBackend` | `POST /v1/backends/remove`, body [`BackendRef`] |
/// | `Drain` / `Undrain` | `POST /v1/backends/drain` / `.../undrain`, body [`BackendRef`] |
/// | `Reload` | `POST /v1/reload` |
/// | `Flow` | `GET /v1/flow?src=IP:PORT&dst=IP:PORT&protocol=tcp` (IPv6 as `[addr]:port`, percent-encoded) |
/// | `Stats` | `GET /v1/stats` |
/// | `ClusterLeave` / `ClusterJoin` | `POST /v1/cluster/leave` / `.../join` |
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    Status,
    ListServices,
    AddService(serde_json::Value),
    RemoveService {
        name: String,
    },
    ListBackends {
        service: Option<String>,
    },
    AddBackend {
        service: String,
        backend: serde_json::Value,
    },
    RemoveBackend(BackendRef),
    Drain(BackendRef),
    Undrain(BackendRef),
    Reload,
    Flow {
        src: SocketAddr,
        dst: SocketAddr,
        protocol: String,
    },
    Stats,
    /// Withdraw every VIP route (docs/cluster.md).
    ClusterLeave,
    /// Announce again.
    ClusterJoin,
}

/// Names one backend of one service; `port` defaults to the service's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRef {
    pub service: String,
    pub address: IpAddr,
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
    /// 400: the request is wrong (bad config, unknown backend, ...).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
    /// 404: no such service/backend.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: message.into(),
        }
    }
    /// 500: the daemon failed to do something it should be able to.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
        }
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
    /// Service name -> Maglev table fingerprint (docs/cluster.md).
    #[serde(default)]
    pub fingerprints: BTreeMap<String, String>,
    /// Announcement state, when `[cluster] route_table` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceView {
    pub name: String,
    /// "native" or "generic".
    pub mode: String,
}

/// One service with its backends (`GET /v1/services`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub mode: String,
    pub table_size: u32,
    pub hash: String,
    /// Fingerprint of the Maglev table (equal on nodes that agree).
    #[serde(default)]
    pub fingerprint: String,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendView>,
}

/// One backend (`GET /v1/backends`, and inside [`ServiceView`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub service: String,
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// Operator state: "up", "drain" or "down".
    pub admin: String,
    /// Health-check verdict: "up" or "down" ("up" when checks are off).
    pub health: String,
    /// What the datapath does: "active" (takes new flows), "draining"
    /// (keeps established flows only) or "down" (flows are re-picked).
    pub state: String,
    /// Next-hop MAC, once resolved.
    pub mac: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    /// The last health check's result, if any ran.
    pub last_check: Option<String>,
    /// Health state changes since the daemon started.
    pub transitions: u64,
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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatsView {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendStatsView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatsView {
    pub address: IpAddr,
    pub port: u16,
    pub packets: u64,
    pub bytes: u64,
}

/// `GET /v1/flow`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    pub service: String,
    pub backend: SocketAddr,
    /// The backend's datapath state ("active", "draining", "down").
    pub backend_state: String,
    /// True when the flow table already pins the flow; false when it is
    /// answered from the Maglev table (a new flow would go there).
    pub established: bool,
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
