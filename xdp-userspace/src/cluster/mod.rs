//! What lets several xdplb nodes stand side by side behind a router's ECMP
//! (docs/cluster.md): only frames addressed to this node are balanced
//! ([`macs`]), and the `[cluster]` configuration ([`config`]).

pub mod config;
pub mod fingerprint;
pub mod macs;

pub use config::{ClusterConfig, RawCluster};

/// The fingerprint of `service`'s Maglev table (see [`fingerprint`]).
pub fn service_fingerprint(service: &crate::controller::ServiceState) -> String {
    fingerprint::fingerprint(service.table(), |id| {
        service.backend_by_id(id).map(|b| b.addr())
    })
}
