//! What lets several xdplb nodes stand side by side behind a router's ECMP
//! (docs/cluster.md): only frames addressed to this node are balanced
//! ([`macs`]), and the `[cluster]` configuration ([`config`]).

pub mod announce;
pub mod cli;
pub mod config;
pub mod fingerprint;
pub mod macs;
pub mod node;
pub mod replication;

pub use announce::ClusterView;
pub use config::{ClusterConfig, RawCluster};
pub use node::Node;

/// One line for `xdplb status`: the announcement state.
pub fn describe(view: Option<&ClusterView>) -> String {
    let Some(v) = view else {
        return "not announcing (no [cluster] route_table)".into();
    };
    let list = |vips: &[std::net::IpAddr]| {
        vips.iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut line = format!("{} in table {}", v.state, v.route_table);
    if !v.announced.is_empty() {
        line += &format!("; announced: {}", list(&v.announced));
    }
    if !v.backups.is_empty() {
        line += &format!("; backup for peers: {}", list(&v.backups));
    }
    if !v.withheld.is_empty() {
        line += &format!("; withheld: {}", list(&v.withheld));
    }
    line
}
