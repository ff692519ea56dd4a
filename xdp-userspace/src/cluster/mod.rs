//! What lets several xdplb nodes stand side by side behind a router's ECMP
//! (docs/cluster.md): only frames addressed to this node are balanced
//! ([`macs`]), and the `[cluster]` configuration ([`config`]).

pub mod config;
pub mod macs;

pub use config::{ClusterConfig, RawCluster};
