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
//! Routes are written over rtnetlink, as `ip route` would write them; a
//! failed write leaves the remembered set unchanged, so the next sync
//! retries it.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::{
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    AddressFamily, RouteNetlinkMessage,
};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::rtnl::{self, Rtnl};

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
                    del_route(r, old)?;
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
            replace_route(r, table)?;
            self.announced.insert(r);
            info!(addr = %r.0, metric = r.1, table, "route announced");
        }
        for &r in self.announced.clone().difference(&wanted) {
            del_route(r, table)?;
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            res => res.with_context(|| format!("removing {}", self.left_marker.display()))?,
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
        let announced = |backup: bool| {
            (self.announced.iter())
                .filter(|r| (r.1 == BACKUP_METRIC) == backup)
                .map(|r| r.0)
                .collect()
        };
        Some(ClusterView {
            route_table: table,
            state: if self.left() { "left" } else { "announcing" }.into(),
            announced: announced(false),
            backups: announced(true),
            withheld: self
                .servable
                .difference(&self.announced)
                .map(|r| r.0)
                .collect(),
        })
    }
}

/// The kernel gives `lo` this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// `ip route replace ADDR/len dev lo table T metric M proto static`.
fn replace_route(r: Announced, table: u32) -> Result<()> {
    let mut msg = route_message(r, table);
    // `proto static`: BIRD's `learn` imports it like any route it did not
    // make itself. Link scope is what `ip` gives a route with no gateway.
    msg.header.protocol = RouteProtocol::Static;
    msg.header.scope = RouteScope::Link;
    msg.header.kind = RouteType::Unicast;
    Rtnl::open()?
        .change(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .with_context(|| format!("adding route {} metric {} to table {table}", r.0, r.1))
}

/// `ip route del ADDR/len dev lo table T metric M`.
fn del_route(r: Announced, table: u32) -> Result<()> {
    let mut msg = route_message(r, table);
    // Any scope, type and protocol, as `ip route del` asks.
    msg.header.scope = RouteScope::NoWhere;
    match Rtnl::open()?.change(RouteNetlinkMessage::DelRoute(msg), 0) {
        // Deleting a route someone already removed is what we wanted.
        Err(e) if rtnl::errno(&e) == Some(libc::ESRCH) => Ok(()),
        res => {
            res.with_context(|| format!("removing route {} metric {} from table {table}", r.0, r.1))
        }
    }
}

/// The fields `ip route replace` and `ip route del` share:
/// `ADDR/len dev lo table T metric M`.
fn route_message((addr, metric): Announced, table: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    msg.header.destination_prefix_length = host_prefix_len(addr);
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(addr)));
    // The header's table field has 8 bits; wider ids go in RTA_TABLE.
    match u8::try_from(table) {
        Ok(table) => msg.header.table = table,
        Err(_) => {
            msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
            msg.attributes.push(RouteAttribute::Table(table));
        }
    }
    msg.attributes
        .push(RouteAttribute::Priority(kernel_metric(addr, metric)));
    msg.attributes.push(RouteAttribute::Oif(LOOPBACK_IFINDEX));
    msg
}

/// The prefix length of a host route to `addr`: 32 or 128.
fn host_prefix_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// The host routes in `table` (both families), as `ip route show table T`
/// lists them.
fn list_routes(table: u32) -> Result<BTreeSet<Announced>> {
    // Strict, so the kernel lists only `table`, as it does for `ip`.
    let mut nl = Rtnl::open()?.strict()?;
    let mut found = BTreeSet::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.attributes.push(RouteAttribute::Table(table));
        let routes = match nl.dump(RouteNetlinkMessage::GetRoute(msg)) {
            // A table the kernel never held a route in does not exist yet.
            Err(e) if rtnl::errno(&e) == Some(libc::ENOENT) => continue,
            res => res.with_context(|| format!("listing the routes of table {table}"))?,
        };
        found.extend(routes.iter().filter_map(|m| match m {
            RouteNetlinkMessage::NewRoute(r) => host_route(r, table),
            _ => None,
        }));
    }
    Ok(found)
}

/// The kernel stores an IPv6 route's metric 0 as this, its default
/// (`IP6_RT_PRIO_USER`): the announcer writes and reads it as 0, so that a
/// restarted daemon recognises its own routes.
const IPV6_DEFAULT_METRIC: u32 = 1024;

/// The metric the kernel shows for a route of `addr` written at `metric`.
fn kernel_metric(addr: IpAddr, metric: u32) -> u32 {
    if addr.is_ipv6() && metric == 0 {
        IPV6_DEFAULT_METRIC
    } else {
        metric
    }
}

/// The address and metric of `route` if it is a host route of `table`.
fn host_route(route: &RouteMessage, table: u32) -> Option<Announced> {
    let (mut dst, mut metric, mut in_table) = (None, 0, u32::from(route.header.table));
    for a in &route.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some(IpAddr::V6(*a)),
            RouteAttribute::Priority(m) => metric = *m,
            RouteAttribute::Table(t) => in_table = *t,
            _ => {}
        }
    }
    let dst = dst?;
    let metric = if dst.is_ipv6() && metric == IPV6_DEFAULT_METRIC {
        0
    } else {
        metric
    };
    (in_table == table && route.header.destination_prefix_length == host_prefix_len(dst))
        .then_some((dst, metric))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use serde_json::{json, Value};

    use super::*;

    fn ip(args: &[&str]) -> Vec<u8> {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        out.stdout
    }

    /// Every detail `ip -d -j route show table T` gives of one family's routes.
    fn shown(family: &str, table: u32) -> Value {
        let table = table.to_string();
        serde_json::from_slice(&ip(&[family, "-d", "-j", "route", "show", "table", &table]))
            .unwrap()
    }

    /// A restarted daemon finds its routes in the table and keeps them: an
    /// IPv6 route announced at metric 0 reads back as 1024 (the kernel's
    /// default), which once made the new daemon withdraw it for good.
    #[test]
    fn a_restarted_announcer_keeps_the_routes_it_finds() {
        rtnl::in_new_netns(|| {
            let table = 4321;
            let state = std::env::temp_dir().join(format!("xdplb-announce-{}", std::process::id()));
            let v4: IpAddr = "10.9.9.9".parse().unwrap();
            let v6: IpAddr = "fd00::9".parse().unwrap();
            let wanted = BTreeSet::from([(v4, 0), (v6, 0), (v6, BACKUP_METRIC)]);
            Announcer::new(&state)
                .sync(Some(table), wanted.clone())
                .unwrap();
            assert_eq!(list_routes(table).unwrap(), wanted);
            let mut restarted = Announcer::new(&state);
            restarted.sync(Some(table), wanted.clone()).unwrap();
            assert_eq!(list_routes(table).unwrap(), wanted);
            let view = restarted.view().unwrap();
            assert_eq!(view.announced, vec![v4, v6]);
            assert_eq!(view.backups, vec![v6]);
        });
    }

    #[test]
    fn routes_are_the_ones_ip_writes() {
        rtnl::in_new_netns(|| {
            let v4: IpAddr = "10.9.9.9".parse().unwrap();
            let v6: IpAddr = "fd00::9".parse().unwrap();
            // A table above 255 (RTA_TABLE) and one below (the header's field).
            for (table, by_ip) in [(1234, 1235), (7, 8)] {
                assert_eq!(
                    list_routes(table).unwrap(),
                    BTreeSet::new(),
                    "no such table yet"
                );
                replace_route((v4, BACKUP_METRIC), table).unwrap();
                replace_route((v6, 5), table).unwrap();
                // What the daemon ran before it spoke rtnetlink itself.
                for (family, dst, metric) in
                    [("-4", "10.9.9.9/32", "1000"), ("-6", "fd00::9/128", "5")]
                {
                    let t = by_ip.to_string();
                    ip(&[
                        family, "route", "replace", dst, "dev", "lo", "table", &t, "metric",
                        metric, "proto", "static",
                    ]);
                    assert_eq!(
                        shown(family, table),
                        shown(family, by_ip),
                        "{family} table {table}"
                    );
                }
                assert_eq!(
                    shown("-4", table),
                    json!([{"type": "unicast", "dst": "10.9.9.9", "dev": "lo",
                        "protocol": "static", "scope": "link", "metric": 1000, "flags": []}])
                );
                assert_eq!(shown("-6", table)[0]["metric"], 5);

                // Only host routes are the announcer's.
                let t = table.to_string();
                ip(&["route", "add", "10.9.0.0/16", "dev", "lo", "table", &t]);
                let both = BTreeSet::from([(v4, BACKUP_METRIC), (v6, 5)]);
                assert_eq!(list_routes(table).unwrap(), both);
                // Replacing again changes nothing.
                replace_route((v4, BACKUP_METRIC), table).unwrap();
                assert_eq!(list_routes(table).unwrap(), both);

                del_route((v4, BACKUP_METRIC), table).unwrap();
                del_route((v6, 5), table).unwrap();
                assert_eq!(list_routes(table).unwrap(), BTreeSet::new());
                del_route((v4, BACKUP_METRIC), table).expect("deleting an absent route");
                del_route((v6, 5), table).expect("deleting an absent route");
                // The other table was left alone.
                assert_eq!(list_routes(by_ip).unwrap(), both);
            }
        });
    }
}
