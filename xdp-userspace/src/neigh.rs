//! Next-hop resolution for backends: which interface reaches a backend,
//! that interface's MAC, and the next hop's MAC from the kernel's neighbour
//! table, asked over rtnetlink. Operators never type a MAC address.
//!
//! A resolution of any number of backends costs one route look-up per
//! distinct address, one link dump and one neighbour dump (plus one more
//! neighbour dump per 20 ms spent waiting for unresolved ones). It is slow
//! only while waiting, so the daemon resolves without holding its lock:
//! [`Resolver::prepare`] before a change, [`Resolver::refresh`] every few
//! seconds; the controller then reads the results without waiting.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use netlink_packet_route::{
    link::{LinkAttribute, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    AddressFamily, RouteNetlinkMessage,
};

use crate::{
    config::{Config, Mode},
    rtnl::Rtnl,
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
    known: Mutex<HashMap<Target, Resolved>>,
}

impl Resolver {
    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Resolved>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves the backends of `config` not resolved yet, waiting up to
    /// [`RESOLVE_WAIT`] for their MACs. Slow: call without holding locks
    /// that health checks or the API need.
    /// Forgets the answers for backends `config` no longer has.
    pub fn prepare(&self, config: &Config) {
        let wanted = targets(config);
        let missing: Vec<Target> = {
            let known = self.known();
            wanted
                .iter()
                .filter(|t| !known.contains_key(t))
                .copied()
                .collect()
        };
        let resolved = if missing.is_empty() {
            HashMap::new()
        } else {
            resolve_all(&missing, RESOLVE_WAIT)
        };
        let mut known = self.known();
        known.retain(|t, _| wanted.binary_search(t).is_ok());
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

    /// The next hop of `target`: the last answer, or, if it was never
    /// resolved, resolved now (waiting up to [`RESOLVE_WAIT`]).
    pub fn hop(&self, target: Target) -> Resolved {
        if let Some(known) = self.known().get(&target) {
            return known.clone();
        }
        let resolved = resolve_all(&[target], RESOLVE_WAIT);
        let hop = resolved[&target].clone();
        self.known().extend(resolved);
        hop
    }
}

/// Every distinct backend target of `config`.
fn targets(config: &Config) -> Vec<Target> {
    let mut targets: Vec<Target> = config
        .services
        .iter()
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
    match Netlink::open().and_then(|mut nl| nl.resolve_all(targets, wait)) {
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

/// The look-ups a resolution makes.
struct Netlink {
    rtnl: Rtnl,
}

impl Netlink {
    fn open() -> Result<Self> {
        Ok(Self {
            rtnl: Rtnl::open()?,
        })
    }

    /// Interface index -> (name, MAC).
    fn links(&mut self) -> Result<HashMap<u32, Link>> {
        let answers = self
            .rtnl
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
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
                let mac = l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
                    _ => None,
                });
                (l.header.index, (name.unwrap_or_default(), mac))
            })
            .collect())
    }

    /// (interface index, address) -> MAC, for every usable neighbour.
    fn neighbours(&mut self) -> Result<HashMap<(u32, IpAddr), [u8; 6]>> {
        let msg = RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default());
        let answers = self.rtnl.dump(msg)?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Some(n),
                _ => None,
            })
            // As `ip neigh` users read it: an entry whose resolution failed
            // or is under way has no usable MAC.
            .filter(|n| {
                !matches!(
                    n.header.state,
                    NeighbourState::Failed | NeighbourState::Incomplete
                )
            })
            .filter_map(|n| {
                let addr = n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        Some(IpAddr::V4(*a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        Some(IpAddr::V6(*a))
                    }
                    _ => None,
                })?;
                let mac = n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(m) => {
                        <[u8; 6]>::try_from(m.as_slice()).ok()
                    }
                    _ => None,
                })?;
                Some(((n.header.ifindex, addr), mac))
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
            .rtnl
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
        let ip = |a: &RouteAddress| match a {
            RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
            RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
            _ => None,
        };
        let mut out = Route {
            ifindex: 0,
            hop: addr,
            src_addr: None,
        };
        for a in &route.attributes {
            match a {
                RouteAttribute::Oif(i) => out.ifindex = *i,
                RouteAttribute::PrefSource(s) => out.src_addr = ip(s),
                RouteAttribute::Gateway(gw) => {
                    let gw = ip(gw).with_context(|| format!("gateway of backend {addr}"))?;
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

    #[test]
    fn loopback_backend_is_refused() {
        let err = resolve("127.0.0.1".parse().unwrap(), Duration::ZERO, false).unwrap_err();
        assert!(err.to_string().contains("local"), "{err:#}");
    }

    #[test]
    fn loopback_interface_has_a_next_hop_table_entry() {
        let mut nl = Netlink::open().unwrap();
        let links = nl.links().unwrap();
        assert!(links.values().any(|(name, _)| name == "lo"), "{links:?}");
    }
}
