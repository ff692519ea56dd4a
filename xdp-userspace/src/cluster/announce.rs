//! Announcement: the daemon keeps each VIP it can serve as a host route
//! (`VIP/32` or `/128`, `dev lo`) in a dedicated kernel routing table; a
//! routing daemon (BIRD, FRR) exports that table to the routers over BGP.
//! Removing the route withdraws the node from the VIP's ECMP group.
//!
//! NAT in a cluster adds SNAT addresses: this node's own, like a VIP, and
//! its peers' as backups, at [`BACKUP_METRIC`], which the routing daemon
//! exports with a longer path: routers send a peer's NAT replies here
//! only once the peer is gone.
//!
//! The table is xdplb's alone: every host route in it is taken to be one
//! this daemon (or its predecessor) added, so a restarted daemon adopts
//! them and removes the ones it no longer wants.
//!
//! Routes are written with iproute2's `ip` (the workspace has no netlink
//! crate yet); a failed write leaves the remembered set unchanged, so the
//! next sync retries it.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tracing::info;

/// The metric of a backup announcement (a peer's SNAT address); the
/// routing daemon's export filter makes such routes less preferred
/// (examples/bird.conf).
pub const BACKUP_METRIC: u32 = 1000;

/// A host route in the table: the address and its metric (0, or
/// [`BACKUP_METRIC`]).
pub type Announced = (IpAddr, u32);

/// What `xdplb status` shows about announcement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The kernel routing table VIPs are announced in.
    pub route_table: u32,
    /// "announcing" or "left" (after `xdplb cluster leave`).
    pub state: String,
    /// VIPs (and own SNAT addresses) whose route is in the table now.
    pub announced: Vec<IpAddr>,
    /// Peers' SNAT addresses announced as backups.
    #[serde(default)]
    pub backups: Vec<IpAddr>,
    /// Addresses this node could announce but does not (left).
    pub withheld: Vec<IpAddr>,
}

/// The routes this daemon keeps in its table.
pub struct Announcer {
    /// The table the routes in `announced` are in.
    table: Option<u32>,
    announced: BTreeSet<Announced>,
    /// What the last sync could announce.
    servable: BTreeSet<Announced>,
    /// Whether the table's existing routes were read since `table` was set.
    adopted: bool,
    /// Present while the node has left (survives daemon restarts, so an
    /// upgrade during maintenance does not bring the node back early).
    left_marker: PathBuf,
}

impl Announcer {
    /// An announcer whose "left" state is kept next to `state_file`.
    pub fn new(state_file: &Path) -> Self {
        let mut marker = state_file.as_os_str().to_owned();
        marker.push(".left");
        Self {
            table: None,
            announced: BTreeSet::new(),
            servable: BTreeSet::new(),
            adopted: false,
            left_marker: marker.into(),
        }
    }

    /// Whether the operator made this node leave.
    pub fn left(&self) -> bool {
        self.left_marker.exists()
    }

    /// Makes `table` hold exactly the routes of `servable` (none when the
    /// node has left; nothing at all when `table` is `None`). A change of
    /// table withdraws everything from the old one first.
    pub fn sync(&mut self, table: Option<u32>, servable: BTreeSet<Announced>) -> Result<()> {
        self.servable = servable;
        if self.table != table {
            if let Some(old) = self.table {
                for &r in std::mem::take(&mut self.announced).iter() {
                    route("del", r, old)?;
                    info!(addr = %r.0, table = old, "route withdrawn (route table changed)");
                }
            }
            self.table = table;
            self.adopted = false;
        }
        let Some(table) = table else {
            return Ok(());
        };
        if !self.adopted {
            self.announced = list_routes(table)?;
            self.adopted = true;
        }
        let wanted: BTreeSet<Announced> = if self.left() {
            BTreeSet::new()
        } else {
            self.servable.clone()
        };
        for &r in wanted.difference(&self.announced.clone()) {
            route("replace", r, table)?;
            self.announced.insert(r);
            info!(addr = %r.0, metric = r.1, table, "route announced");
        }
        for &r in self.announced.clone().difference(&wanted) {
            route("del", r, table)?;
            self.announced.remove(&r);
            info!(addr = %r.0, metric = r.1, table, "route withdrawn");
        }
        Ok(())
    }

    /// `xdplb cluster leave`: withdraws every route, and keeps them
    /// withdrawn (across restarts) until [`Announcer::join`].
    pub fn leave(&mut self) -> Result<()> {
        std::fs::write(&self.left_marker, b"left by `xdplb cluster leave`\n")
            .with_context(|| format!("writing {}", self.left_marker.display()))?;
        self.sync(self.table, self.servable.clone())
    }

    /// `xdplb cluster join`: announces again what can be served.
    pub fn join(&mut self) -> Result<()> {
        match std::fs::remove_file(&self.left_marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing {}", self.left_marker.display()))
            }
        }
        self.sync(self.table, self.servable.clone())
    }

    /// Withdraws every route (the datapath is being detached) without
    /// marking the node as left.
    pub fn withdraw_all(&mut self) -> Result<()> {
        let servable = std::mem::take(&mut self.servable);
        let table = self.table;
        self.sync(None, BTreeSet::new())?;
        (self.table, self.servable) = (table, servable);
        Ok(())
    }

    /// The status view, when announcement is configured.
    pub fn view(&self) -> Option<ClusterView> {
        let table = self.table?;
        let addrs = |routes: &mut dyn Iterator<Item = &Announced>, backup: bool| {
            routes
                .filter(|r| (r.1 == BACKUP_METRIC) == backup)
                .map(|r| r.0)
                .collect()
        };
        Some(ClusterView {
            route_table: table,
            state: if self.left() { "left" } else { "announcing" }.into(),
            announced: addrs(&mut self.announced.iter(), false),
            backups: addrs(&mut self.announced.iter(), true),
            withheld: self
                .servable
                .difference(&self.announced)
                .map(|r| r.0)
                .collect(),
        })
    }
}

/// `ip route <verb> ADDR/len dev lo table T metric M`.
fn route(verb: &str, (addr, metric): Announced, table: u32) -> Result<()> {
    let (family, len) = match addr {
        IpAddr::V4(_) => ("-4", 32),
        IpAddr::V6(_) => ("-6", 128),
    };
    let prefix = format!("{addr}/{len}");
    let table = table.to_string();
    let metric = metric.to_string();
    let mut args = vec![
        family, "route", verb, &prefix, "dev", "lo", "table", &table, "metric", &metric,
    ];
    if verb == "replace" {
        // `proto static`: BIRD's `learn` imports it like any route it did
        // not make itself.
        args.extend(["proto", "static"]);
    }
    let out = Command::new("ip")
        .args(&args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // Deleting a route someone already removed is what we wanted.
        if verb == "del" && err.contains("No such process") {
            return Ok(());
        }
        bail!("ip {}: {}", args.join(" "), err.trim());
    }
    Ok(())
}

/// One route of `ip -j route show`.
#[derive(Deserialize)]
struct ListedRoute {
    dst: String,
    #[serde(default)]
    metric: u32,
}

/// The host routes in `table` (both families).
fn list_routes(table: u32) -> Result<BTreeSet<Announced>> {
    let mut found = BTreeSet::new();
    for family in ["-4", "-6"] {
        let table_arg = table.to_string();
        let out = Command::new("ip")
            .args([family, "-j", "route", "show", "table", &table_arg])
            .output()
            .context("running ip (iproute2)")?;
        if !out.status.success() {
            // A table the kernel never held a route in does not exist yet.
            if String::from_utf8_lossy(&out.stderr).contains("table does not exist") {
                continue;
            }
            bail!(
                "ip {family} route show table {table}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // An empty table prints nothing at all, not `[]`.
        if text.trim().is_empty() {
            continue;
        }
        let routes: Vec<ListedRoute> = serde_json::from_str(&text)
            .with_context(|| format!("parsing `ip -j route show table {table}`"))?;
        found.extend(
            routes
                .iter()
                .filter_map(|r| Some((host_route(&r.dst)?, r.metric))),
        );
    }
    Ok(found)
}

/// The address of a host route's destination (`10.0.0.1`, `10.0.0.1/32`,
/// `fd00::1/128`); `None` for wider prefixes.
fn host_route(dst: &str) -> Option<IpAddr> {
    match dst.split_once('/') {
        None => dst.parse().ok(),
        Some((addr, len)) => {
            let addr: IpAddr = addr.parse().ok()?;
            let full = if addr.is_ipv4() { "32" } else { "128" };
            (len == full).then_some(addr)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_host_routes_are_ours() {
        assert_eq!(host_route("10.0.0.1"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(host_route("10.0.0.1/32"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(host_route("fd00::1/128"), Some("fd00::1".parse().unwrap()));
        assert_eq!(host_route("fd00::1"), Some("fd00::1".parse().unwrap()));
        assert_eq!(host_route("10.0.0.0/24"), None);
        assert_eq!(host_route("default"), None);
    }
}
