//! The veth-namespace testbeds: one [`Topology`] in four [`Shape`]s.
//!
//! Every shape has a `client`, an `lb` and backends `b1..bN`, and a `switch`
//! namespace holding the bridge backends are plugged into. Addresses follow
//! one scheme, 10.N.S.H and fdN:S::H: N is the shape's number (77 DSR,
//! 78 NAT two-arm, 79 NAT one-arm, 80 PMTU), S the segment, H the host
//! (client 1, lb 2, backend i 10+i, written in decimal digits in IPv6 too:
//! b1 is fd77::11); the VIPs are 10.N.100.1 and fdN:100::1.
//!
//! ```text
//! DSR:       switch namespace: bridge br0
//!     ┌────────────┬──────────────┬──────────┬─────┐
//!   v-client      v-lb          v-b1       v-b2   ...      (veth ends in `switch`)
//!     │            │              │          │
//!   eth0         eth0           eth0       eth0          (veth ends in each host)
//!  client          lb            b1         b2
//!  10.77.0.1    10.77.0.2     10.77.0.11  10.77.0.12
//!  fd77::1      fd77::2       fd77::11    fd77::12
//!
//! NAT one-arm: the same on 10.79.0.0/24, fd79::/64; backends' default route via the lb
//!
//! NAT two-arm:
//!   client ──(A)── eth0 lb eth1 ──(B: bridge br0)── b1 .. bN
//!   10.78.0.1      .0.2   10.78.1.1 (SNAT)          10.78.1.(10+i), default via 10.78.1.1
//!   fd78::1        ::2    fd78:1::1                 fd78:1::(10+i)
//!
//! PMTU:
//!   client ── eth0 lb eth1 ── eth0 r1 eth1 ══(MTU 1400)══ eth0 r2 eth1 ──(bridge)── b1 .. bN
//!   10.80.0.1  .0.2  10.80.1.1  .1.2    10.80.2.1          .2.2    10.80.3.1       10.80.3.(10+i)
//!   fd80::1    ::2   fd80:1::1  1::2    fd80:2::1          2::2    fd80:3::1       fd80:3::(10+i)
//! ```
//!
//! The client routes the VIPs via the lb, which does not forward IP (the
//! VIP is served by XDP or not at all) except while
//! [`Topology::set_lb_forwarding`] turns it on for a baseline measurement.
//!
//! DSR: each backend holds the VIPs on `lo` and neither answers ARP for them
//! nor uses them as ARP source, so the load balancer only has to rewrite MAC
//! addresses: replies go from the backend straight to the client.
//!
//! NAT: backends are plain servers with a default route to their segment's
//! gateway. They see the load balancer's SNAT address as the client and
//! answer it; the load balancer translates back.
//!
//! PMTU: every interface has MTU 1500 except the r1–r2 link: TCP's MSS
//! negotiation (1460 both ways) does not see that link, so a full-sized
//! segment from the client reaches r1 with DF set and r1 answers ICMP
//! "fragmentation needed" / ICMPv6 "packet too big" to its source, the SNAT
//! address. Only the load balancer translating that error back to the
//! client lets the client's TCP shrink its segments. Nothing clamps the MSS
//! (no firewall rule exists in fresh namespaces).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};

use crate::{
    netns::{unique_prefix, Netns},
    proc::Proc,
    switch,
};

/// The largest number of backends: their addresses end in 10 + i, which
/// stays two decimal digits.
pub const MAX_BACKENDS: usize = 89;
/// MTU of the r1–r2 link in the PMTU shape.
pub const NARROW_MTU: u32 = 1400;

/// Which testbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Client, lb and backends on one segment; backends hold the VIPs.
    Dsr,
    /// Client, lb and backends on one segment; backends route via the lb.
    NatOneArm,
    /// Client and backends on two segments, the lb between them.
    NatTwoArm,
    /// Two-arm with two routers and a narrow link between lb and backends.
    Pmtu,
}

/// An IPv4 and an IPv6 address.
type Pair = (Ipv4Addr, Ipv6Addr);

/// The address of `pair`'s family.
fn pick((a4, a6): Pair, v6: bool) -> IpAddr {
    if v6 {
        a6.into()
    } else {
        a4.into()
    }
}

impl Shape {
    /// Host `host` on segment `segment`: 10.N.S.H and fdN:S::H.
    fn addr(self, segment: u8, host: u8) -> Pair {
        let n = match self {
            Shape::Dsr => 77,
            Shape::NatTwoArm => 78,
            Shape::NatOneArm => 79,
            Shape::Pmtu => 80,
        };
        let v6 = format!("fd{n}:{segment}::{host}");
        (
            Ipv4Addr::new(10, n, segment, host),
            v6.parse().expect("valid IPv6 address"),
        )
    }

    /// Segment `segment`'s prefixes, for routes.
    fn subnet(self, segment: u8) -> (String, String) {
        let (net4, net6) = self.addr(segment, 0);
        (format!("{net4}/24"), format!("{net6}/64"))
    }

    /// Whether client, lb and backends share one segment.
    fn one_segment(self) -> bool {
        matches!(self, Shape::Dsr | Shape::NatOneArm)
    }

    /// The backends' segment.
    fn backend_segment(self) -> u8 {
        match self {
            Shape::Dsr | Shape::NatOneArm => 0,
            Shape::NatTwoArm => 1,
            Shape::Pmtu => 3,
        }
    }

    /// The backends' default gateway; none in DSR, where they answer the
    /// client directly.
    fn gateway(self) -> Option<Pair> {
        match self {
            Shape::Dsr => None,
            Shape::NatOneArm => Some(self.addr(0, 2)),
            Shape::NatTwoArm => Some(self.addr(1, 1)),
            Shape::Pmtu => Some(self.addr(3, 1)),
        }
    }
}

/// A testbed. Dropping it stops the pass-through programs and deletes every
/// namespace (and with them the veths and bridges).
///
/// Backends are numbered from 1, matching their names: `backend(1)` is `b1`.
#[derive(Debug)]
pub struct Topology {
    shape: Shape,
    prefix: String,
    /// Pass-through XDP programs on the peers of the lb's interfaces (see
    /// [`Topology::enable_xdp_tx`]); dropped (detached) first.
    passthrough: Vec<Proc>,
    // Any order works for the rest: every veth end dies with its namespace.
    client: Netns,
    lb: Netns,
    /// r1, r2 in the PMTU shape.
    routers: Vec<Netns>,
    backends: Vec<Netns>,
    switch: Netns,
}

impl Topology {
    /// Builds `shape` with `backends` backends (1..=[`MAX_BACKENDS`]).
    /// Namespaces are called `<prefix>-sw`, `<prefix>-client`, `<prefix>-lb`,
    /// `<prefix>-r1`, `<prefix>-r2` and `<prefix>-b<i>`, with a fresh
    /// [`unique_prefix`]`(tag)` (keep the tag short: e.g. the test's name, to
    /// tell leftovers apart). If any step fails, everything made so far is
    /// removed again.
    pub fn new(shape: Shape, tag: &str, backends: usize) -> Result<Topology> {
        ensure!(
            (1..=MAX_BACKENDS).contains(&backends),
            "backend count {backends} out of range 1..={MAX_BACKENDS}"
        );
        // Checked up front so a missing tool fails with a clear message
        // rather than half-way through.
        for tool in ["ip", "sysctl", "ethtool", "ping"] {
            ensure!(
                crate::which(tool),
                "`{tool}` is needed to build the test topology but was not found in PATH"
            );
        }
        let prefix = unique_prefix(tag);
        let name = |host: &str| format!("{prefix}-{host}");
        let a = |segment, host| shape.addr(segment, host);
        // Each Netns is owned as soon as it exists, so returning early with
        // `?` drops (deletes) everything made so far.
        let mut topo = Topology {
            shape,
            switch: switch::new(&name("sw"))?,
            client: host(&name("client"))?,
            lb: host(&name("lb"))?,
            routers: Vec::new(),
            backends: Vec::new(),
            passthrough: Vec::new(),
            prefix: prefix.clone(),
        };
        let (client, lb, sw) = (&topo.client, &topo.lb, &topo.switch);

        // The client side.
        if shape.one_segment() {
            switch::plug(sw, client, "v-client", "eth0")?;
            switch::plug(sw, lb, "v-lb", "eth0")?;
        } else {
            switch::veth(client, "eth0", lb, "eth0")?;
        }
        configure(client, "eth0", a(0, 1))?;
        configure(lb, "eth0", a(0, 2))?;
        tx_checksum_off(client, "eth0")?;
        let (vip4, vip6) = a(100, 1);
        route(
            client,
            (format!("{vip4}/32"), format!("{vip6}/128")),
            a(0, 2),
        )?;
        topo.set_lb_forwarding(false)?;

        // The backend side.
        let mut routers = Vec::new();
        match shape {
            Shape::Dsr | Shape::NatOneArm => {}
            Shape::NatTwoArm => {
                switch::plug(sw, lb, "v-lb", "eth1")?;
                configure(lb, "eth1", a(1, 1))?;
                // For the baseline (client straight to a backend, routed by
                // the lb's kernel while forwarding is on).
                route(client, shape.subnet(1), a(0, 2))?;
            }
            Shape::Pmtu => {
                let r1 = host(&name("r1"))?;
                let r2 = host(&name("r2"))?;
                switch::veth(lb, "eth1", &r1, "eth0")?;
                configure(lb, "eth1", a(1, 1))?;
                configure(&r1, "eth0", a(1, 2))?;
                switch::veth(&r1, "eth1", &r2, "eth0")?;
                for (r, iface) in [(&r1, "eth1"), (&r2, "eth0")] {
                    r.exec(&["ip", "link", "set", iface, "mtu", &NARROW_MTU.to_string()])?;
                }
                configure(&r1, "eth1", a(2, 1))?;
                configure(&r2, "eth0", a(2, 2))?;
                switch::plug(sw, &r2, "v-r2", "eth1")?;
                configure(&r2, "eth1", a(3, 1))?;
                for r in [&r1, &r2] {
                    r.sysctl("net.ipv4.ip_forward", "1")?;
                    r.sysctl("net.ipv6.conf.all.forwarding", "1")?;
                    for iface in ["eth0", "eth1"] {
                        tx_checksum_off(r, iface)?;
                    }
                }
                route(lb, shape.subnet(3), a(1, 2))?;
                route(&r1, shape.subnet(3), a(2, 2))?;
                route(&r1, shape.subnet(0), a(1, 1))?;
                route(&r2, ("default".into(), "default".into()), a(2, 1))?;
                routers = vec![r1, r2];
            }
        }

        for i in 1..=backends {
            let ns = host(&name(&format!("b{i}")))?;
            switch::plug(sw, &ns, &format!("v-b{i}"), "eth0")?;
            if shape == Shape::Dsr {
                // ARP flux control, as for any DSR real server: answer ARP
                // only for addresses on the asking interface (not the VIP on
                // lo), and never use the VIP as ARP source address.
                for scope in ["all", "eth0"] {
                    ns.sysctl(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
                    ns.sysctl(&format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
                }
            }
            configure(&ns, "eth0", a(shape.backend_segment(), 10 + i as u8))?;
            match shape.gateway() {
                None => {
                    ns.exec(&["ip", "addr", "add", &format!("{vip4}/32"), "dev", "lo"])?;
                    let vip6 = format!("{vip6}/128");
                    ns.exec(&["ip", "-6", "addr", "add", &vip6, "dev", "lo", "nodad"])?;
                }
                Some(gateway) => {
                    tx_checksum_off(&ns, "eth0")?;
                    route(&ns, ("default".into(), "default".into()), gateway)?;
                }
            }
            topo.backends.push(ns);
        }
        topo.routers = routers;
        Ok(topo)
    }

    /// Lets frames the lb sends with XDP_TX or XDP_REDIRECT reach the peer:
    /// a veth delivers frames its peer transmits from XDP only if it has
    /// NAPI, i.e. an XDP program itself (GRO alone leaves them queued on
    /// this kernel), so this runs `xdplb pass-through` (from the `xdplb`
    /// binary) on the peer of each lb interface, for the topology's
    /// lifetime.
    pub fn enable_xdp_tx(&mut self, xdplb: &Path) -> Result<()> {
        let peers = match self.shape {
            Shape::Dsr | Shape::NatOneArm => vec![(&self.switch, "v-lb")],
            Shape::NatTwoArm => vec![(&self.client, "eth0"), (&self.switch, "v-lb")],
            Shape::Pmtu => vec![(&self.client, "eth0"), (&self.routers[0], "eth0")],
        };
        for (ns, iface) in peers {
            let mut cmd = ns.command(xdplb);
            cmd.args(["pass-through", "--iface", iface]);
            let what = format!("pass-through {iface}@{}", ns.name());
            let mut p = Proc::spawn_with(&mut cmd, &what, false)?;
            p.wait_for_stdout_line("ready", Duration::from_secs(10))
                .with_context(|| format!("attaching {what}"))?;
            self.passthrough.push(p);
        }
        Ok(())
    }

    /// Replaces the lb's interface by a new one of the same name, MAC and
    /// addresses, as a NIC's driver reload or a re-created veth does: only
    /// its index changes. The pass-through on its peer (gone with the old
    /// pair) is attached again. One-segment shapes only.
    pub fn replug_lb(&mut self, xdplb: &Path) -> Result<()> {
        ensure!(
            self.shape.one_segment(),
            "replug_lb: the {:?} shape has more than one lb interface",
            self.shape
        );
        let mac = self.lb.mac("eth0")?;
        // Deleting one end deletes the pair; the pass-through held the
        // other end, so it goes (and is started again below).
        self.lb.exec(&["ip", "link", "del", "eth0"])?;
        self.passthrough.clear();
        switch::plug(&self.switch, &self.lb, "v-lb", "eth0")?;
        self.lb
            .exec(&["ip", "link", "set", "eth0", "address", &mac])?;
        configure(&self.lb, "eth0", self.shape.addr(0, 2))?;
        self.enable_xdp_tx(xdplb)
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The unique prefix of the namespace names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn client(&self) -> &Netns {
        &self.client
    }

    pub fn lb(&self) -> &Netns {
        &self.lb
    }

    /// The switch namespace holding the bridge and its ports (`v-lb`,
    /// `v-b<i>`, ...).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// Cuts (or restores) backend `i`'s link to the switch, as a host
    /// that vanishes (or comes back) would: nothing answers, not even RST.
    pub fn set_backend_link(&self, i: usize, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        self.switch
            .exec(&["ip", "link", "set", &format!("v-b{i}"), state])
            .map(drop)
    }

    /// Backend `i`'s namespace (1-based). Panics if `i` is not in
    /// `1..=backend_count()`.
    pub fn backend(&self, i: usize) -> &Netns {
        assert!(
            (1..=self.backends.len()).contains(&i),
            "backend index {i} out of range 1..={}",
            self.backends.len()
        );
        &self.backends[i - 1]
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// `b<i>`: what `xdplb-testbackend --name` is given, so responses
    /// identify the backend.
    pub fn backend_name(&self, i: usize) -> String {
        format!("b{i}")
    }

    /// Every namespace: switch, client, lb, routers, then backends in order.
    pub fn namespaces(&self) -> Vec<&Netns> {
        let mut all = vec![&self.switch, &self.client, &self.lb];
        all.extend(self.routers.iter());
        all.extend(self.backends.iter());
        all
    }

    /// The lb interface facing the client, `eth0` (its only one in the
    /// one-segment shapes).
    pub fn lb_iface(&self) -> &'static str {
        "eth0"
    }

    /// The lb interfaces the daemon attaches to.
    pub fn lb_ifaces(&self) -> Vec<&'static str> {
        if self.shape.one_segment() {
            vec!["eth0"]
        } else {
            vec!["eth0", "eth1"]
        }
    }

    pub fn vip4(&self) -> Ipv4Addr {
        self.shape.addr(100, 1).0
    }

    pub fn vip6(&self) -> Ipv6Addr {
        self.shape.addr(100, 1).1
    }

    /// The VIP of `v6`'s family.
    pub fn vip(&self, v6: bool) -> IpAddr {
        pick(self.shape.addr(100, 1), v6)
    }

    pub fn client_addr(&self, v6: bool) -> IpAddr {
        pick(self.shape.addr(0, 1), v6)
    }

    /// The lb's address on the client side.
    pub fn lb_addr(&self, v6: bool) -> IpAddr {
        pick(self.shape.addr(0, 2), v6)
    }

    /// The lb's address towards the backends: in NAT mode the SNAT address,
    /// the source backends see.
    pub fn snat_addr(&self, v6: bool) -> IpAddr {
        if self.shape.one_segment() {
            self.lb_addr(v6)
        } else {
            pick(self.shape.addr(1, 1), v6)
        }
    }

    /// Backend `i`'s address (1-based; `i` may lie beyond this topology's
    /// backends, for an address no backend holds).
    pub fn backend_addr(&self, i: usize, v6: bool) -> IpAddr {
        assert!(
            (1..=MAX_BACKENDS).contains(&i),
            "backend index {i} out of range"
        );
        pick(
            self.shape.addr(self.shape.backend_segment(), 10 + i as u8),
            v6,
        )
    }

    /// Turns IP forwarding on the lb on or off (both families). Off except
    /// for baseline measurements: then the VIP is served by XDP or not at
    /// all.
    pub fn set_lb_forwarding(&self, on: bool) -> Result<()> {
        let v = if on { "1" } else { "0" };
        self.lb.sysctl("net.ipv4.ip_forward", v)?;
        self.lb.sysctl("net.ipv6.conf.all.forwarding", v)?;
        Ok(())
    }

    /// Pings until answered (10 s at most each), over IPv4 and IPv6: the
    /// lb from the client, every backend from the lb (and from the client
    /// where they share a segment), every NAT backend's gateway from the
    /// backend, r1 from the lb. Besides checking the testbed works, this
    /// fills the neighbour tables, so the daemon resolves every next hop
    /// (the backends' MACs in DSR) at once.
    pub fn wait_reachable(&self) -> Result<()> {
        let mut targets: Vec<(&Netns, IpAddr)> = Vec::new();
        for v6 in [false, true] {
            targets.push((&self.client, self.lb_addr(v6)));
            for (i, ns) in (1..).zip(&self.backends) {
                targets.push((&self.lb, self.backend_addr(i, v6)));
                if self.shape.one_segment() {
                    targets.push((&self.client, self.backend_addr(i, v6)));
                }
                if let Some(gateway) = self.shape.gateway() {
                    targets.push((ns, pick(gateway, v6)));
                }
            }
            if self.shape == Shape::Pmtu {
                targets.push((&self.lb, pick(self.shape.addr(1, 2), v6)));
            }
        }
        for (from, addr) in targets {
            ping(from, addr, Duration::from_secs(10))?;
        }
        Ok(())
    }
}

/// A namespace for a host: no DAD (addresses usable at once), no
/// reverse-path filtering (DSR replies leave with the VIP as source).
fn host(name: &str) -> Result<Netns> {
    let ns = Netns::new(name)?;
    for scope in ["all", "default"] {
        ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        ns.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
    }
    Ok(ns)
}

/// Addresses (/24 and /64) and link up for `iface`; no DAD on it, set
/// before the link is up so even the link-local address skips it.
fn configure(ns: &Netns, iface: &str, (a4, a6): Pair) -> Result<()> {
    ns.sysctl(&format!("net.ipv6.conf.{iface}.accept_dad"), "0")?;
    ns.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
    ns.exec(&["ip", "addr", "add", &format!("{a4}/24"), "dev", iface])?;
    let a6 = format!("{a6}/64");
    ns.exec(&["ip", "-6", "addr", "add", &a6, "dev", iface, "nodad"])?;
    ns.exec(&["ip", "link", "set", iface, "up"])?;
    Ok(())
}

/// Routes `(to4, to6)` via `(via4, via6)` in `ns`.
fn route(ns: &Netns, (to4, to6): (String, String), (via4, via6): Pair) -> Result<()> {
    ns.exec(&["ip", "route", "add", &to4, "via", &via4.to_string()])?;
    ns.exec(&["ip", "-6", "route", "add", &to6, "via", &via6.to_string()])?;
    Ok(())
}

/// Transmit checksum offload off. A veth passes a locally sent TCP/UDP
/// packet to its peer as CHECKSUM_PARTIAL, its L4 checksum not computed
/// yet (only the pseudo-header sum is in the field); the XDP program on the
/// lb sees those bytes, updates them incrementally and sends the frame on
/// as raw bytes, so it would arrive with a wrong checksum and be dropped.
/// With `tx off` the sender's stack computes full checksums, as a real NIC
/// delivers them. Off on every host whose packets pass the lb: the client,
/// the NAT backends and the routers.
fn tx_checksum_off(ns: &Netns, iface: &str) -> Result<()> {
    ns.exec(&["ethtool", "-K", iface, "tx", "off"]).map(drop)
}

/// Pings `addr` from `from` until it answers or `timeout` passes.
pub(crate) fn ping(from: &Netns, addr: IpAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let addr_s = addr.to_string();
    loop {
        match from.exec(&["ping", "-n", "-q", "-c1", "-W1", &addr_s]) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| {
                    format!("{addr} unreachable from {} after {timeout:?}", from.name())
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}
