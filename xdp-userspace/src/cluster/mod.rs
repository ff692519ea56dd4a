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
    let mut line = format!("{} in table {}", v.state, v.route_table);
    let lists = [
        ("announced", &v.announced),
        ("backup for peers", &v.backups),
        ("withheld", &v.withheld),
    ];
    for (label, addrs) in lists.into_iter().filter(|(_, addrs)| !addrs.is_empty()) {
        let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        line += &format!("; {label}: {}", addrs.join(", "));
    }
    line
}
