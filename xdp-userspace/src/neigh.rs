//! Next-hop resolution for backends: which interface reaches a backend,
//! that interface's MAC, and the next hop's MAC from the kernel's neighbour
//! table, asked over rtnetlink. Operators never type a MAC address.
//!
//! A resolution of any number of backends costs one route look-up per
//! distinct address, one link dump and one neighbour dump (plus one more
//! neighbour dump per 20 ms spent waiting for unresolved ones). It is slow
//! only while waiting, so the daemon resolves without holding its lock:
//! [`Resolver::prepare`] before a change, [`Resolver::refresh`] every few
//! seconds and soon after the kernel announces a change of a next hop
//! ([`watch`]); the controller then reads the results without waiting.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    ops::RangeInclusive,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use netlink_packet_route::{
    link::{LinkAttribute, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    AddressFamily, RouteNetlinkMessage,
};
use tracing::warn;

use crate::{
    config::{Config, Mode, ServiceConfig},
    rtnl::{Announced, Events, Rtnl},
};

/// Where to send frames for one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub ifname: String,
    pub ifindex: u32,
    /// The egress interface's MAC: the rewritten frame's source.
    pub src_mac: [u8; 6],
    /// The next hop's MAC (the backend's, or its gateway's), or `None`
    /// while the kernel has not resolved it.
    pub dst_mac: Option<[u8; 6]>,
    /// Whose MAC `dst_mac` is: the backend, or its gateway.
    pub neighbour: IpAddr,
    /// This host's source address on the route (the default SNAT address).
    pub src_addr: Option<IpAddr>,
}

/// A backend address to resolve, and whether it may sit behind a router
/// (NAT backends may; direct-server-return backends may not: frames keep
/// the VIP as their destination IP, so a router would route them back).
pub type Target = (IpAddr, bool);

/// What resolving one target gave: its next hop, or why it has none.
pub type Resolved = Result<NextHop, String>;

/// How long a change waits for a new backend's MAC before programming it
/// unresolved (the datapath then hands its packets to the kernel and counts
/// them until a refresh resolves it).
const RESOLVE_WAIT: Duration = Duration::from_secs(1);
/// How long a refresh waits for MACs still unresolved.
const REFRESH_WAIT: Duration = Duration::from_millis(100);
/// Pause between neighbour dumps while waiting.
const POLL: Duration = Duration::from_millis(20);

/// Resolves next hops and keeps the last answers, so the controller can
/// plan a change from them without waiting on the kernel.
#[derive(Debug, Default)]
pub struct Resolver {
    known: Mutex<Known>,
}

/// The last answers, and the neighbours they name.
#[derive(Debug, Default)]
struct Known {
    hops: HashMap<Target, Resolved>,
    /// Every neighbour a resolved hop names, with the MACs they have for
    /// it: what announcements are compared with, in one look-up rather
    /// than a pass over every backend (thousands of backends may share
    /// one gateway, and a busy segment announces many neighbours).
    neighbours: HashMap<NeighbourKey, BTreeSet<Option<[u8; 6]>>>,
    /// The interfaces the datapath is attached to, with their MACs.
    attached: Vec<(u32, [u8; 6])>,
    /// Every egress interface a resolved hop names and every attached one,
    /// with the MACs known for it: a new MAC of the interface itself (an
    /// operator's change, a bond's failover) changes those hops' frames, or
    /// which frames the datapath balances.
    interfaces: HashMap<u32, BTreeSet<[u8; 6]>>,
    /// Every target's address and every resolved hop's neighbour: a route
    /// change concerns a hop only if its prefix covers one of them (a route
    /// elsewhere can never be the one a look-up of them picks).
    routed: BTreeSet<IpAddr>,
}

/// Every change rebuilds the index: changes come from a resolution, which
/// already costs a pass over its targets (a refresh re-resolves them all).
impl Known {
    /// Adds or replaces answers.
    fn extend(&mut self, resolved: impl IntoIterator<Item = (Target, Resolved)>) {
        self.hops.extend(resolved);
        self.reindex();
    }

    /// Forgets the answers for targets not in `wanted` (sorted).
    fn keep(&mut self, wanted: &[Target]) {
        self.hops.retain(|t, _| wanted.binary_search(t).is_ok());
        self.reindex();
    }

    fn reindex(&mut self) {
        self.neighbours.clear();
        self.interfaces.clear();
        self.routed = self.hops.keys().map(|&(addr, _)| addr).collect();
        for hop in self.hops.values().filter_map(|h| h.as_ref().ok()) {
            self.routed.insert(hop.neighbour);
            let key = (hop.ifindex, hop.neighbour);
            self.neighbours.entry(key).or_default().insert(hop.dst_mac);
            self.interfaces
                .entry(hop.ifindex)
                .or_default()
                .insert(hop.src_mac);
        }
        for &(ifindex, mac) in &self.attached {
            self.interfaces.entry(ifindex).or_default().insert(mac);
        }
    }
}

impl Resolver {
    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves the backends of `config` not resolved yet, or whose last
    /// look-up failed, waiting up to [`RESOLVE_WAIT`] for their MACs. Slow:
    /// call without holding locks that health checks or the API need.
    /// Forgets the answers for backends `config` no longer has.
    pub fn prepare(&self, config: &Config) {
        let wanted = targets(&config.services);
        // A failed look-up is asked again: it is what refused the change
        // that named the backend, and the refresh re-resolves only the
        // programmed backends, so a kept failure would refuse every later
        // change naming it even after the operator added the route.
        let missing: Vec<Target> = {
            let known = self.known();
            wanted
                .iter()
                .filter(|t| !known.hops.get(t).is_some_and(Result::is_ok))
                .copied()
                .collect()
        };
        let resolved = if missing.is_empty() {
            HashMap::new()
        } else {
            resolve_all(&missing, RESOLVE_WAIT)
        };
        let mut known = self.known();
        known.keep(&wanted);
        known.extend(resolved);
    }

    /// Re-resolves `targets` (waiting briefly for MACs still unresolved)
    /// and returns the answers, which later look-ups then see.
    pub fn refresh(&self, targets: &[Target]) -> HashMap<Target, Resolved> {
        let resolved = resolve_all(targets, REFRESH_WAIT);
        self.known()
            .extend(resolved.iter().map(|(t, r)| (*t, r.clone())));
        resolved
    }

    /// Sets the interfaces the datapath is attached to and their MACs, so
    /// that a change of one's MAC [`concerns`](Self::concerns) it too.
    pub fn attached(&self, interfaces: &[(u32, [u8; 6])]) {
        let mut known = self.known();
        known.attached = interfaces.to_vec();
        known.reindex();
    }

    /// The next hop of `target`: the last answer, or, if it was never
    /// resolved, resolved now (waiting up to [`RESOLVE_WAIT`]).
    pub fn hop(&self, target: Target) -> Resolved {
        if let Some(known) = self.known().hops.get(&target) {
            return known.clone();
        }
        let resolved = resolve_all(&[target], RESOLVE_WAIT);
        let hop = resolved[&target].clone();
        self.known().extend(resolved);
        hop
    }

    /// Whether the kernel's announcement `msg` may change a next hop or
    /// what the datapath balances:
    /// - a route whose prefix covers a target or a hop's neighbour (a
    ///   look-up of it may now answer differently);
    /// - a neighbour entry of a next hop whose usable MAC is no longer the
    ///   one last resolved;
    /// - an egress or attached interface whose own MAC is no longer the one
    ///   last known, or that is gone.
    ///
    /// Routine state changes (reachable, stale, carrier, with the same MAC)
    /// and other hosts' entries and routes concern nothing: neither this
    /// daemon's own VIP routes (docs/cluster.md) nor the routes a routing
    /// daemon installs elsewhere cost a refresh of every backend.
    pub fn concerns(&self, msg: &RouteNetlinkMessage) -> bool {
        let entry = match msg {
            RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => {
                // A family of no address of ours: nothing to re-resolve.
                let Some(covered) = covered(r) else {
                    return false;
                };
                return self.known().routed.range(covered).next().is_some();
            }
            RouteNetlinkMessage::NewLink(l) => {
                let mac = link_mac(l);
                let known = self.known();
                let macs = known.interfaces.get(&l.header.index);
                return macs.is_some_and(|macs| macs.iter().any(|m| Some(*m) != mac));
            }
            RouteNetlinkMessage::DelLink(l) => {
                return self.known().interfaces.contains_key(&l.header.index)
            }
            RouteNetlinkMessage::NewNeighbour(n) => neighbour_entry(n),
            RouteNetlinkMessage::DelNeighbour(n) => neighbour_entry(n).map(|(key, _)| (key, None)),
            _ => return false,
        };
        let Some((key, mac)) = entry else {
            return false;
        };
        self.known()
            .neighbours
            .get(&key)
            .is_some_and(|macs| macs.iter().any(|m| *m != mac))
    }
}

/// How long [`watch`] pauses before subscribing again after a failure.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// Calls `changed` (from a thread of its own) whenever the kernel announces
/// a change that [`Resolver::concerns`] `resolver`, or lost announcements.
/// The caller refreshes then; its periodic refresh stays the fallback for
/// whatever this misses. Announcements made after this returns are seen:
/// subscribe before the first resolution.
pub fn watch(resolver: Arc<Resolver>, changed: impl Fn() + Send + 'static) -> Result<()> {
    let subscribe = || {
        Events::subscribe(&[
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_NEIGH,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_IPV6_ROUTE,
        ])
        .context("subscribing to link, neighbour and route changes")
    };
    let mut events = subscribe()?;
    std::thread::Builder::new()
        .name("next-hop-events".into())
        .spawn(move || loop {
            match events.next() {
                Ok(Announced::Changes(msgs)) => {
                    if msgs.iter().any(|m| resolver.concerns(m)) {
                        changed();
                    }
                }
                Ok(Announced::Lost) => changed(),
                Err(e) => {
                    warn!("next hops: {e:#}; subscribing again");
                    loop {
                        std::thread::sleep(RESUBSCRIBE);
                        match subscribe() {
                            Ok(fresh) => break events = fresh,
                            Err(e) => warn!("next hops: {e:#}"),
                        }
                    }
                    // Changes made meanwhile were not announced to us.
                    changed();
                }
            }
        })
        .context("starting the next-hop event thread")?;
    Ok(())
}

/// Every distinct backend target of `services`.
pub(crate) fn targets<'a>(services: impl IntoIterator<Item = &'a ServiceConfig>) -> Vec<Target> {
    let mut targets: Vec<Target> = services
        .into_iter()
        .flat_map(|s| {
            let nat = s.mode == Mode::Nat;
            s.backends.iter().map(move |b| (b.address, nat))
        })
        .collect();
    targets.sort();
    targets.dedup();
    targets
}

/// Resolves every target; unresolved neighbours are solicited and polled
/// for up to `wait`, all together.
fn resolve_all(targets: &[Target], wait: Duration) -> HashMap<Target, Resolved> {
    match Rtnl::open().and_then(|mut rtnl| rtnl.resolve_all(targets, wait)) {
        Ok(resolved) => resolved,
        Err(err) => {
            let err = format!("{err:#}");
            targets.iter().map(|t| (*t, Err(err.clone()))).collect()
        }
    }
}

/// Resolves the next hop of one backend (see [`Target`] for `via_router`).
#[cfg(test)]
fn resolve(addr: IpAddr, wait: Duration, via_router: bool) -> Result<NextHop> {
    let target = (addr, via_router);
    resolve_all(&[target], wait)
        .remove(&target)
        .expect("one answer per target")
        .map_err(anyhow::Error::msg)
}

/// An interface's name and MAC (none on interfaces without one).
type Link = (String, Option<[u8; 6]>);

/// A route look-up's answer.
struct Route {
    ifindex: u32,
    /// The next hop: the gateway, or the backend itself.
    hop: IpAddr,
    src_addr: Option<IpAddr>,
}

/// A neighbour entry's key: the interface index and the address.
type NeighbourKey = (u32, IpAddr);

/// A neighbour entry's key and its MAC, if usable; `None` for entries
/// without an IP address (bridge forwarding entries).
fn neighbour_entry(n: &NeighbourMessage) -> Option<(NeighbourKey, Option<[u8; 6]>)> {
    let addr = n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => Some(IpAddr::V4(*a)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
        _ => None,
    })?;
    // As `ip neigh` users read it: an entry whose resolution failed or is
    // under way has no usable MAC.
    let usable = !matches!(
        n.header.state,
        NeighbourState::Failed | NeighbourState::Incomplete
    );
    let mac = n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(m) if usable => <[u8; 6]>::try_from(m.as_slice()).ok(),
        _ => None,
    });
    Some(((n.header.ifindex, addr), mac))
}

/// An interface's MAC, if it has an Ethernet one.
fn link_mac(l: &LinkMessage) -> Option<[u8; 6]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
        _ => None,
    })
}

/// The addresses a route's destination prefix covers (a default route's,
/// every address of its family); `None` for a route of another family.
fn covered(r: &RouteMessage) -> Option<RangeInclusive<IpAddr>> {
    let dest = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => route_address(d),
        _ => None,
    });
    let base = match (r.header.address_family, dest) {
        (_, Some(dest)) => dest,
        (AddressFamily::Inet, None) => Ipv4Addr::UNSPECIFIED.into(),
        (AddressFamily::Inet6, None) => Ipv6Addr::UNSPECIFIED.into(),
        _ => return None,
    };
    let len = u32::from(r.header.destination_prefix_length);
    Some(match base {
        IpAddr::V4(a) => {
            let (a, host) = (u32::from(a), u32::MAX.checked_shr(len).unwrap_or(0));
            IpAddr::from(Ipv4Addr::from(a & !host))..=Ipv4Addr::from(a | host).into()
        }
        IpAddr::V6(a) => {
            let (a, host) = (u128::from(a), u128::MAX.checked_shr(len).unwrap_or(0));
            IpAddr::from(Ipv6Addr::from(a & !host))..=Ipv6Addr::from(a | host).into()
        }
    })
}

/// An address a route names (its destination, gateway or source).
fn route_address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// The look-ups a resolution makes.
impl Rtnl {
    /// Interface index -> (name, MAC).
    fn links(&mut self) -> Result<HashMap<u32, Link>> {
        let answers = self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .map(|l| {
                let name = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                });
                (l.header.index, (name.unwrap_or_default(), link_mac(&l)))
            })
            .collect())
    }

    /// (interface index, address) -> MAC, for every usable neighbour.
    fn neighbours(&mut self) -> Result<HashMap<NeighbourKey, [u8; 6]>> {
        let msg = RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default());
        let answers = self.dump(msg)?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Some(n),
                _ => None,
            })
            .filter_map(|n| match neighbour_entry(&n)? {
                (key, Some(mac)) => Some((key, mac)),
                (_, None) => None,
            })
            .collect())
    }

    /// `ip route get ADDR`: the route the kernel would use for `addr`.
    fn route(&mut self, addr: IpAddr, via_router: bool) -> Result<Route> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.destination_prefix_length = if addr.is_ipv4() { 32 } else { 128 };
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(addr)));
        let answer = self
            .get(RouteNetlinkMessage::GetRoute(msg))
            .with_context(|| format!("no route to backend {addr}"))?;
        let RouteNetlinkMessage::NewRoute(route) = answer else {
            bail!("no route to backend {addr}");
        };
        match route.header.kind {
            RouteType::Unicast => {}
            RouteType::Local => {
                bail!("backend {addr} is a local address on this host, not a remote server")
            }
            kind => bail!("backend {addr} is a {kind:?} address, not a remote server"),
        }
        let mut out = Route {
            ifindex: 0,
            hop: addr,
            src_addr: None,
        };
        for a in &route.attributes {
            match a {
                RouteAttribute::Oif(i) => out.ifindex = *i,
                RouteAttribute::PrefSource(s) => out.src_addr = route_address(s),
                RouteAttribute::Gateway(gw) => {
                    let gw =
                        route_address(gw).with_context(|| format!("gateway of backend {addr}"))?;
                    if !via_router {
                        bail!(
                            "backend {addr} is reached through router {gw}: direct server \
                             return needs backends on a directly connected segment \
                             (use mode = \"nat\")"
                        );
                    }
                    out.hop = gw;
                }
                _ => {}
            }
        }
        if out.ifindex == 0 {
            bail!("no interface reaches backend {addr}");
        }
        Ok(out)
    }

    fn resolve_all(
        &mut self,
        targets: &[Target],
        wait: Duration,
    ) -> Result<HashMap<Target, Resolved>> {
        let links = self.links()?;
        let mut out: HashMap<Target, Resolved> = HashMap::new();
        // Target -> (the neighbour to look up, the hop so far).
        let mut pending: HashMap<Target, (IpAddr, NextHop)> = HashMap::new();
        for &(addr, via_router) in targets {
            let hop = self.route(addr, via_router).and_then(|route| {
                let (ifname, mac) = links
                    .get(&route.ifindex)
                    .with_context(|| format!("interface {} vanished", route.ifindex))?;
                let src_mac = mac.with_context(|| {
                    format!("interface {ifname:?} (towards {addr}) has no Ethernet address")
                })?;
                let hop = NextHop {
                    ifname: ifname.clone(),
                    ifindex: route.ifindex,
                    src_mac,
                    dst_mac: None,
                    neighbour: route.hop,
                    src_addr: route.src_addr,
                };
                Ok((route.hop, hop))
            });
            match hop {
                Ok(hop) => drop(pending.insert((addr, via_router), hop)),
                Err(e) => drop(out.insert((addr, via_router), Err(format!("{e:#}")))),
            }
        }
        let deadline = Instant::now() + wait;
        loop {
            let neighbours = self.neighbours()?;
            pending.retain(|target, (next, hop)| {
                hop.dst_mac = neighbours.get(&(hop.ifindex, *next)).copied();
                if hop.dst_mac.is_some() {
                    out.insert(*target, Ok(hop.clone()));
                }
                hop.dst_mac.is_none()
            });
            if pending.is_empty() || Instant::now() >= deadline {
                out.extend(pending.into_iter().map(|(t, (_, hop))| (t, Ok(hop))));
                return Ok(out);
            }
            for (addr, _) in pending.keys() {
                solicit(*addr);
            }
            std::thread::sleep(POLL);
        }
    }
}

/// Makes the kernel resolve `addr`'s next hop by sending it one empty UDP
/// datagram (to the discard port). Harmless to the backend; the kernel
/// queues the datagram until the neighbour answers.
fn solicit(addr: IpAddr) {
    let bind: SocketAddr = match addr {
        IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        IpAddr::V6(_) => "[::]:0".parse().unwrap(),
    };
    if let Ok(sock) = UdpSocket::bind(bind) {
        let _ = sock.send_to(&[], SocketAddr::new(addr, 9));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `ip ARGS` (in the calling thread's namespace).
    fn ip(args: &str) {
        let args: Vec<&str> = args.split_whitespace().collect();
        let out = std::process::Command::new("ip")
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }

    /// Runs `ip COMMAND` with `group` subscribed to, and waits for the
    /// first announcement `wanted` picks out.
    fn announced_after(
        group: u32,
        command: &str,
        wanted: impl Fn(&RouteNetlinkMessage) -> bool,
    ) -> RouteNetlinkMessage {
        let mut events = Events::subscribe(&[group]).unwrap();
        ip(command);
        loop {
            let Announced::Changes(msgs) = events.next().unwrap() else {
                panic!("announcements lost");
            };
            if let Some(m) = msgs.into_iter().find(&wanted) {
                return m;
            }
        }
    }

    /// A veth pair, both ends up, nh0 at 10.99.0.1/24.
    fn segment_up() {
        ip("link add nh0 type veth peer name nh1");
        ip("addr add 10.99.0.1/24 dev nh0");
        ip("link set nh0 up");
        ip("link set nh1 up");
    }

    /// A next hop out of nh0.
    fn nh0_hop(ifindex: u32, neighbour: IpAddr, src_mac: [u8; 6], dst_mac: [u8; 6]) -> NextHop {
        NextHop {
            ifname: "nh0".into(),
            ifindex,
            src_mac,
            dst_mac: Some(dst_mac),
            neighbour,
            src_addr: None,
        }
    }

    #[test]
    fn loopback_backend_is_refused() {
        let err = resolve("127.0.0.1".parse().unwrap(), Duration::ZERO, false).unwrap_err();
        assert!(err.to_string().contains("local"), "{err:#}");
    }

    /// The kernel's announcement of a neighbour's new MAC reaches a
    /// subscriber, and concerns a resolver whose hop has the old MAC only.
    #[test]
    fn a_changed_neighbour_mac_is_announced_and_concerns_its_hop() {
        crate::rtnl::in_new_netns(|| {
            segment_up();
            let announced = announced_after(
                libc::RTNLGRP_NEIGH,
                "neigh replace 10.99.0.2 lladdr 02:00:00:00:00:02 dev nh0 nud reachable",
                |m| {
                    matches!(m, RouteNetlinkMessage::NewNeighbour(n)
                        if neighbour_entry(n).is_some_and(|(k, _)| k.1.to_string() == "10.99.0.2"))
                },
            );
            let RouteNetlinkMessage::NewNeighbour(n) = &announced else {
                unreachable!()
            };
            let ((ifindex, addr), mac) = neighbour_entry(n).unwrap();
            assert_eq!(mac, Some([2, 0, 0, 0, 0, 2]));

            let resolver = Resolver::default();
            let hop = |mac| nh0_hop(ifindex, addr, [2, 0, 0, 0, 0, 1], mac);
            let know = |hop| resolver.known().extend([((addr, false), Ok(hop))]);
            let concerns = || resolver.concerns(&announced);
            know(hop([2, 0, 0, 0, 0, 2]));
            assert!(!concerns(), "same MAC: nothing to refresh");
            know(hop([2, 0, 0, 0, 0, 9]));
            assert!(concerns(), "new MAC: refresh");
            let other = ("10.99.0.3".parse().unwrap(), false);
            let mut known = resolver.known();
            known.extend([(other, Err("x".into()))]);
            known.keep(&[other]);
            drop(known);
            assert!(!concerns(), "not a next hop: nothing to refresh");
        });
    }

    /// The kernel's announcement of an interface's new MAC reaches a
    /// subscriber, and concerns a resolver whose hops leave through that
    /// interface, or that it is attached to, with the old MAC.
    #[test]
    fn a_changed_interface_mac_is_announced_and_concerns_its_hops() {
        crate::rtnl::in_new_netns(|| {
            ip("link add nh0 address 02:00:00:00:00:01 type veth peer name nh1");
            let new = [2, 0, 0, 0, 0, 7];
            let announced = announced_after(
                libc::RTNLGRP_LINK,
                "link set dev nh0 address 02:00:00:00:00:07",
                |m| matches!(m, RouteNetlinkMessage::NewLink(l) if link_mac(l) == Some(new)),
            );
            let RouteNetlinkMessage::NewLink(link) = &announced else {
                unreachable!()
            };
            let ifindex = link.header.index;
            let old = [2, 0, 0, 0, 0, 1];

            let resolver = Resolver::default();
            let concerns = || resolver.concerns(&announced);
            assert!(!concerns(), "no hop, not attached");
            let neighbour = "10.99.0.2".parse().unwrap();
            let hop = |src_mac| nh0_hop(ifindex, neighbour, src_mac, [2, 0, 0, 0, 0, 2]);
            let target = (neighbour, false);
            resolver.known().extend([(target, Ok(hop(old)))]);
            assert!(concerns(), "a hop's frames leave from it");
            resolver.known().extend([(target, Ok(hop(new)))]);
            assert!(!concerns(), "same MAC: nothing to refresh");
            resolver.known().keep(&[]);
            resolver.attached(&[(ifindex, old)]);
            assert!(concerns(), "the datapath is attached to it");
            resolver.attached(&[(ifindex + 1, old)]);
            assert!(!concerns(), "another interface");
        });
    }

    /// The kernel's announcement of a new route concerns a resolver only
    /// if the route's prefix covers a target or a hop's neighbour.
    #[test]
    fn a_route_change_concerns_only_the_hops_it_covers() {
        crate::rtnl::in_new_netns(|| {
            segment_up();
            let announced = announced_after(
                libc::RTNLGRP_IPV4_ROUTE,
                "route add 10.200.0.0/16 via 10.99.0.2",
                |m| {
                    matches!(m, RouteNetlinkMessage::NewRoute(r)
                        if r.header.destination_prefix_length == 16)
                },
            );
            let resolver = Resolver::default();
            let unresolved = |addr: &str| ((addr.parse().unwrap(), true), Err("x".into()));
            resolver
                .known()
                .extend([unresolved("10.99.0.5"), unresolved("10.201.0.1")]);
            assert!(!resolver.concerns(&announced), "no target under 10.200/16");
            resolver.known().extend([unresolved("10.200.3.4")]);
            assert!(resolver.concerns(&announced), "10.200.3.4 is under it");
        });
    }

    /// What a route's prefix covers: the default route, everything of its
    /// family; a host route, one address; nothing of the other family.
    #[test]
    fn a_route_covers_the_addresses_of_its_prefix() {
        let route = |family, dest: Option<&str>, len| {
            let mut r = RouteMessage::default();
            r.header.address_family = family;
            r.header.destination_prefix_length = len;
            let dest = dest.map(|d| d.parse::<IpAddr>().unwrap());
            r.attributes
                .extend(dest.map(|d| RouteAttribute::Destination(d.into())));
            covered(&r).unwrap()
        };
        let range = |low: &str, high: &str| low.parse().unwrap()..=high.parse().unwrap();
        assert_eq!(
            route(AddressFamily::Inet, None, 0),
            range("0.0.0.0", "255.255.255.255")
        );
        assert_eq!(
            route(AddressFamily::Inet, Some("10.1.2.3"), 32),
            range("10.1.2.3", "10.1.2.3")
        );
        assert_eq!(
            route(AddressFamily::Inet6, Some("fd00:1::"), 64),
            range("fd00:1::", "fd00:1::ffff:ffff:ffff:ffff")
        );
        assert_eq!(
            route(AddressFamily::Inet6, None, 0),
            range("::", &Ipv6Addr::from(u128::MAX).to_string())
        );
    }

    #[test]
    fn loopback_interface_has_a_next_hop_table_entry() {
        let mut nl = Rtnl::open().unwrap();
        let links = nl.links().unwrap();
        assert!(links.values().any(|(name, _)| name == "lo"), "{links:?}");
    }
}
