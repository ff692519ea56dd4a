//! Next-hop resolution for backends: which interface reaches a backend,
//! that interface's MAC, and the backend's MAC from the kernel's neighbour
//! table. Operators never type a MAC address.
//!
//! This asks iproute2 (`ip -j`) rather than speaking rtnetlink directly: it
//! runs only when backends are (re)programmed and every few seconds to
//! notice MAC changes, never per packet, and `ip` is already a requirement
//! of every host that runs xdplb.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

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

#[derive(Deserialize)]
struct Route {
    #[serde(rename = "type")]
    kind: Option<String>,
    dev: Option<String>,
    gateway: Option<String>,
    prefsrc: Option<String>,
}

#[derive(Deserialize)]
struct Link {
    ifindex: u32,
    address: Option<String>,
}

#[derive(Deserialize)]
struct Neigh {
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

fn ip_json<T: for<'de> Deserialize<'de>>(args: &[&str]) -> Result<Vec<T>> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .with_context(|| {
            format!(
                "running `ip -j {}` (is iproute2 installed?)",
                args.join(" ")
            )
        })?;
    if !out.status.success() {
        bail!(
            "`ip -j {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&text)
        .with_context(|| format!("parsing `ip -j {}` output", args.join(" ")))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The index and MAC of interface `ifname` in this network namespace.
pub fn interface(ifname: &str) -> Result<(u32, [u8; 6])> {
    let links: Vec<Link> = ip_json(&["link", "show", "dev", ifname])
        .with_context(|| format!("unknown interface {ifname:?}"))?;
    let link = links
        .into_iter()
        .next()
        .with_context(|| format!("unknown interface {ifname:?}"))?;
    let mac = link
        .address
        .as_deref()
        .and_then(parse_mac)
        .with_context(|| format!("interface {ifname:?} has no Ethernet address"))?;
    Ok((link.ifindex, mac))
}

fn neighbour_mac(addr: IpAddr, ifname: &str) -> Result<Option<[u8; 6]>> {
    let addr = addr.to_string();
    let entries: Vec<Neigh> = ip_json(&["neigh", "show", "to", &addr, "dev", ifname])?;
    Ok(entries.iter().find_map(|n| {
        let usable = !n.state.iter().any(|s| s == "FAILED" || s == "INCOMPLETE");
        n.lladdr.as_deref().filter(|_| usable).and_then(parse_mac)
    }))
}

/// Makes the kernel resolve `addr`'s MAC by sending it one empty UDP
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

/// Resolves the next hop of a backend. A direct-server-return backend
/// (`via_router` false) must be on a directly connected segment: frames keep
/// the VIP as their destination IP, so a router on the way would route them
/// back. A NAT backend may sit behind a router; the next hop is then the
/// router. An unresolved neighbour is solicited and polled for up to `wait`.
pub fn resolve(addr: IpAddr, wait: Duration, via_router: bool) -> Result<NextHop> {
    let target = addr.to_string();
    let routes: Vec<Route> = ip_json(&["route", "get", &target])?;
    let route = routes
        .into_iter()
        .next()
        .with_context(|| format!("no route to backend {addr}"))?;
    if let Some(kind) = route.kind.as_deref().filter(|k| *k != "unicast") {
        bail!("backend {addr} is a {kind} address on this host, not a remote server");
    }
    let hop = match route.gateway {
        Some(gw) if via_router => gw.parse().with_context(|| format!("gateway {gw:?} of backend {addr}"))?,
        Some(gw) => bail!(
            "backend {addr} is reached through router {gw}: direct server return needs backends on a directly connected segment (use mode = \"nat\")"
        ),
        None => addr,
    };
    let ifname = route
        .dev
        .with_context(|| format!("no interface reaches backend {addr}"))?;
    let (ifindex, src_mac) = interface(&ifname)?;
    let deadline = Instant::now() + wait;
    let mut dst_mac = neighbour_mac(hop, &ifname)?;
    while dst_mac.is_none() && Instant::now() < deadline {
        solicit(addr);
        std::thread::sleep(Duration::from_millis(20));
        dst_mac = neighbour_mac(hop, &ifname)?;
    }
    let src_addr = route.prefsrc.and_then(|a| a.parse().ok());
    Ok(NextHop {
        ifname,
        ifindex,
        src_mac,
        dst_mac,
        src_addr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_macs() {
        assert_eq!(parse_mac("02:00:0a:ff:00:01"), Some([2, 0, 10, 255, 0, 1]));
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:02"), None);
        assert_eq!(parse_mac("zz:00:0a:ff:00:01"), None);
    }

    #[test]
    fn loopback_backend_is_refused() {
        let err = resolve("127.0.0.1".parse().unwrap(), Duration::ZERO, false).unwrap_err();
        assert!(err.to_string().contains("local"), "{err:#}");
    }
}
