//! This node's part in a cluster, as the daemon drives it: which VIPs it
//! announces ([`Announcer`]), re-derived from the configuration and the
//! controller's state after every change and health transition. (Which
//! frames the datapath accepts is the controller's: `IfMacs`.)

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use anyhow::Result;
use tracing::warn;

use super::announce::{Announced, Announcer, ClusterView, BACKUP_METRIC};
use crate::{config::Config, controller::Controller};

/// The daemon's cluster state.
pub struct Node {
    announcer: Announcer,
}

impl Node {
    /// A node; `state_file` locates the "left" marker.
    pub fn new(state_file: &Path) -> Self {
        Self {
            announcer: Announcer::new(state_file),
        }
    }

    /// Brings the announced routes in line with `config` and the
    /// controller's backend states. Call only while the datapath is
    /// attached: a VIP is announced only when this node forwards it.
    pub fn sync(&mut self, config: &Config, controller: &Controller) -> Result<()> {
        self.announcer
            .sync(config.cluster.route_table, announced(config, controller))
    }

    /// `xdplb cluster leave`.
    pub fn leave(&mut self) -> Result<()> {
        self.announcer.leave()
    }

    /// `xdplb cluster join`.
    pub fn join(&mut self) -> Result<()> {
        self.announcer.join()
    }

    /// Withdraws every route: the datapath is about to be detached.
    pub fn withdraw_all(&mut self) -> Result<()> {
        self.announcer.withdraw_all()
    }

    /// What `xdplb status` shows (`None`: no `[cluster] route_table`).
    pub fn view(&self) -> Option<ClusterView> {
        self.announcer.view()
    }
}

/// Warns when this node backs up its peers' SNAT addresses but `iface`
/// does not forward: the datapath finds the way back to a dead peer's
/// clients with the kernel's route lookup, which refuses on such an
/// interface (those replies then count as `pass_no_route`).
pub fn check_forwarding(iface: &str, config: &Config) {
    let peers = &config.cluster.peer_snat_addresses;
    let families = [
        ("ipv4", peers.iter().any(IpAddr::is_ipv4)),
        ("ipv6", peers.iter().any(IpAddr::is_ipv6)),
    ];
    for family in families.iter().filter(|f| f.1).map(|f| f.0) {
        let path = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
            warn!(
                "{iface}: {family} forwarding is off, so replies to a dead peer's NAT \
                 translations cannot be routed back to their clients; enable it with \
                 `sysctl net.{family}.conf.{iface}.forwarding=1` (docs/cluster.md)"
            );
        }
    }
}

/// What this node announces while attached: the VIPs it can serve, its
/// own SNAT addresses, and its peers' SNAT addresses as backups.
fn announced(config: &Config, controller: &Controller) -> BTreeSet<Announced> {
    let own = servable(controller)
        .into_iter()
        .chain(config.snat_addresses())
        .map(|a| (a, 0));
    let backups = (config.cluster.peer_snat_addresses.iter()).map(|&a| (a, BACKUP_METRIC));
    own.chain(backups).collect()
}

/// The VIPs this node can serve: those of every service with a backend
/// taking new flows (failing open counts: the datapath then spreads over
/// every backend). A VIP shared by several services (ports) is servable
/// when any of them is.
fn servable(controller: &Controller) -> BTreeSet<IpAddr> {
    controller
        .services()
        .filter(|s| s.active() > 0 || s.failing_open)
        .map(|s| s.config.vip)
        .collect()
}
