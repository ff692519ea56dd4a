//! Veth-namespace testbeds for NAT mode and the daemon running on them
//! (their traffic helpers are in [`crate::traffic`]).
//!
//! Unlike the DSR testbed ([`crate::topology`]), NAT backends are plain
//! servers: no VIP anywhere, no ARP tweaks, no route change except a default
//! route to their subnet's gateway. They see the load balancer's SNAT
//! address as the client and answer it; the load balancer translates back.
//!
//! Three shapes ([`Shape`]):
//!
//! ```text
//! two-arm:   client ──(A)── eth0 lb eth1 ──(B: bridge br0)── b1 .. bN
//!            10.78.0.1      .0.2   10.78.1.1 (SNAT)          10.78.1.(10+i), default via 10.78.1.1
//!            fd78::1        ::2    fd78:1::1                 fd78:1::(10+i)
//!
//! one-arm:   client, lb, b1 .. bN on one bridge: 10.79.0.0/24, fd79::/64
//!            client .1, lb .2 (also the SNAT address), bi .(10+i), default via the lb
//!
//! mtu:
//!   client ── eth0 lb eth1 ── eth0 r1 eth1 ══(MTU 1400)══ eth0 r2 eth1 ──(bridge)── b1 .. bN
//!   10.80.0.1  .0.2  10.80.1.1  .1.2    10.80.2.1          .2.2    10.80.3.1       10.80.3.(10+i)
//!   fd80::1    ::2   fd80:1::1  1::2    fd80:2::1          2::2    fd80:3::1       fd80:3::(10+i)
//! ```
//!
//! The client routes the VIP (never configured on any host) via the lb.
//! The lb does not forward IP (the VIP is served by XDP or not at all)
//! except while [`NatTopology::set_lb_forwarding`] turns it on for a
//! baseline measurement without the load balancer.
//!
//! In the MTU shape every interface has MTU 1500 except the r1–r2 link:
//! TCP's MSS negotiation (1460 both ways) does not see that link, so a
//! full-sized segment from the client reaches r1 with DF set and r1 answers
//! ICMP "fragmentation needed" / ICMPv6 "packet too big" to its source, the
//! SNAT address. Only the load balancer translating that error back to the
//! client lets the client's TCP shrink its segments. Nothing clamps the MSS
//! (no firewall rule exists in fresh namespaces).
//!
//! veth notes: frames a veth sends with XDP_TX or XDP_REDIRECT reach the
//! peer only if the peer has NAPI (an XDP program), so every peer of an lb
//! interface runs `xdplb pass-through`. The client, backends and routers
//! have transmit checksum offload off: a veth hands CHECKSUM_PARTIAL
//! packets to its peer with the L4 checksum unfinished, which XDP on the lb
//! cannot see; the frame it then sends on as raw bytes would arrive with a
//! bad checksum (a real NIC's traffic always carries full checksums).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};

use crate::{
    lb::Xdplb,
    netns::{unique_prefix, Netns},
    proc::Proc,
    switch,
};

/// The largest number of backends (their addresses end in 10 + i).
pub const MAX_BACKENDS: usize = 89;
/// The port backends serve HTTP on (the VIP's port is 80).
pub const BACKEND_PORT: u16 = 8080;
/// The port backends answer UDP on (the VIP's UDP port is 53).
pub const BACKEND_UDP_PORT: u16 = 5353;
/// MTU of the r1–r2 link in the MTU shape.
pub const NARROW_MTU: u32 = 1400;

/// Which testbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Client and backends on two segments, the lb between them.
    TwoArm,
    /// Everything on one segment.
    OneArm,
    /// Two-arm with two routers and a narrow link between lb and backends.
    Mtu,
}

/// Addresses of one shape.
#[derive(Clone, Debug)]
struct Plan {
    client: (Ipv4Addr, Ipv6Addr),
    /// The lb's address on the client side.
    lb_front: (Ipv4Addr, Ipv6Addr),
    /// The lb's address towards the backends: the SNAT address.
    snat: (Ipv4Addr, Ipv6Addr),
    vip: (Ipv4Addr, Ipv6Addr),
    /// First three octets / first group(s) of the backends' subnet.
    backend_net: ([u8; 3], &'static str),
    /// The backends' default gateway.
    gateway: (Ipv4Addr, Ipv6Addr),
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("valid IPv6 address")
}

impl Plan {
    fn of(shape: Shape) -> Plan {
        match shape {
            Shape::TwoArm => Plan {
                client: (Ipv4Addr::new(10, 78, 0, 1), v6("fd78::1")),
                lb_front: (Ipv4Addr::new(10, 78, 0, 2), v6("fd78::2")),
                snat: (Ipv4Addr::new(10, 78, 1, 1), v6("fd78:1::1")),
                vip: (Ipv4Addr::new(10, 78, 100, 1), v6("fd78:100::1")),
                backend_net: ([10, 78, 1], "fd78:1::"),
                gateway: (Ipv4Addr::new(10, 78, 1, 1), v6("fd78:1::1")),
            },
            Shape::OneArm => Plan {
                client: (Ipv4Addr::new(10, 79, 0, 1), v6("fd79::1")),
                lb_front: (Ipv4Addr::new(10, 79, 0, 2), v6("fd79::2")),
                snat: (Ipv4Addr::new(10, 79, 0, 2), v6("fd79::2")),
                vip: (Ipv4Addr::new(10, 79, 100, 1), v6("fd79:100::1")),
                backend_net: ([10, 79, 0], "fd79::"),
                gateway: (Ipv4Addr::new(10, 79, 0, 2), v6("fd79::2")),
            },
            Shape::Mtu => Plan {
                client: (Ipv4Addr::new(10, 80, 0, 1), v6("fd80::1")),
                lb_front: (Ipv4Addr::new(10, 80, 0, 2), v6("fd80::2")),
                snat: (Ipv4Addr::new(10, 80, 1, 1), v6("fd80:1::1")),
                vip: (Ipv4Addr::new(10, 80, 100, 1), v6("fd80:100::1")),
                backend_net: ([10, 80, 3], "fd80:3::"),
                gateway: (Ipv4Addr::new(10, 80, 3, 1), v6("fd80:3::1")),
            },
        }
    }

    fn backend(&self, i: usize) -> (Ipv4Addr, Ipv6Addr) {
        assert!(
            (1..=MAX_BACKENDS).contains(&i),
            "backend index {i} out of range"
        );
        let [a, b, c] = self.backend_net.0;
        (
            Ipv4Addr::new(a, b, c, 10 + i as u8),
            v6(&format!("{}{}", self.backend_net.1, 10 + i)),
        )
    }
}

/// A NAT testbed. Dropping it stops the pass-through programs and deletes
/// every namespace (and with them the veths and bridges).
#[derive(Debug)]
pub struct NatTopology {
    shape: Shape,
    prefix: String,
    plan: Plan,
    /// Pass-through XDP programs on the peers of the lb's interfaces;
    /// dropped (detached) first.
    passthrough: Vec<Proc>,
    client: Netns,
    lb: Netns,
    /// r1, r2 in the MTU shape.
    routers: Vec<Netns>,
    backends: Vec<Netns>,
    switch: Netns,
}

impl NatTopology {
    /// Builds `shape` with `backends` backends and namespace names prefixed
    /// by a fresh [`unique_prefix`]`(tag)`, and attaches the pass-through
    /// program (`xdplb pass-through`, from the `xdplb` binary) to every
    /// peer of an lb interface. If any step fails, everything made so far
    /// is removed again.
    pub fn new(shape: Shape, tag: &str, backends: usize, xdplb: &Path) -> Result<NatTopology> {
        ensure!(
            (1..=MAX_BACKENDS).contains(&backends),
            "backend count {backends} out of range 1..={MAX_BACKENDS}"
        );
        for tool in ["ip", "sysctl", "ethtool", "ping"] {
            ensure!(
                crate::which(tool),
                "`{tool}` is needed to build the NAT test topology but was not found in PATH"
            );
        }
        let prefix = unique_prefix(tag);
        let plan = Plan::of(shape);
        let switch = switch::new(&format!("{prefix}-sw"))?;
        let client = host(&format!("{prefix}-client"))?;
        let lb = host(&format!("{prefix}-lb"))?;
        let mut topo = NatTopology {
            shape,
            prefix: prefix.clone(),
            plan: plan.clone(),
            passthrough: Vec::new(),
            client,
            lb,
            routers: Vec::new(),
            backends: Vec::new(),
            switch,
        };
        let (c4, c6) = plan.client;
        let (f4, f6) = plan.lb_front;
        let (s4, s6) = plan.snat;
        let (vip4, vip6) = plan.vip;

        // The client side and the lb.
        match shape {
            Shape::TwoArm | Shape::Mtu => {
                veth(&topo.client, "eth0", &topo.lb, "eth0")?;
                configure(
                    &topo.client,
                    "eth0",
                    &[format!("{c4}/24"), format!("{c6}/64")],
                    1500,
                )?;
                configure(
                    &topo.lb,
                    "eth0",
                    &[format!("{f4}/24"), format!("{f6}/64")],
                    1500,
                )?;
            }
            Shape::OneArm => {
                switch::plug(&topo.switch, &topo.client, "v-client", "eth0")?;
                switch::plug(&topo.switch, &topo.lb, "v-lb", "eth0")?;
                configure(
                    &topo.client,
                    "eth0",
                    &[format!("{c4}/24"), format!("{c6}/64")],
                    1500,
                )?;
                configure(
                    &topo.lb,
                    "eth0",
                    &[format!("{f4}/24"), format!("{f6}/64")],
                    1500,
                )?;
            }
        }
        tx_checksum_off(&topo.client, "eth0")?;
        topo.client.exec(&[
            "ip",
            "route",
            "add",
            &format!("{vip4}/32"),
            "via",
            &f4.to_string(),
        ])?;
        topo.client.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{vip6}/128"),
            "via",
            &f6.to_string(),
        ])?;
        topo.set_lb_forwarding(false)?;

        // The backend side.
        match shape {
            Shape::TwoArm => {
                switch::plug(&topo.switch, &topo.lb, "v-lb", "eth1")?;
                configure(
                    &topo.lb,
                    "eth1",
                    &[format!("{s4}/24"), format!("{s6}/64")],
                    1500,
                )?;
                // For the baseline (client straight to a backend, routed by
                // the lb's kernel while forwarding is on).
                let [a, b, c] = plan.backend_net.0;
                topo.client.exec(&[
                    "ip",
                    "route",
                    "add",
                    &format!("{a}.{b}.{c}.0/24"),
                    "via",
                    &f4.to_string(),
                ])?;
                topo.client.exec(&[
                    "ip",
                    "-6",
                    "route",
                    "add",
                    &format!("{}/64", plan.backend_net.1),
                    "via",
                    &f6.to_string(),
                ])?;
            }
            Shape::OneArm => {}
            Shape::Mtu => {
                let r1 = host(&format!("{prefix}-r1"))?;
                let r2 = host(&format!("{prefix}-r2"))?;
                veth(&topo.lb, "eth1", &r1, "eth0")?;
                configure(
                    &topo.lb,
                    "eth1",
                    &[format!("{s4}/24"), format!("{s6}/64")],
                    1500,
                )?;
                configure(
                    &r1,
                    "eth0",
                    &["10.80.1.2/24".into(), "fd80:1::2/64".into()],
                    1500,
                )?;
                veth(&r1, "eth1", &r2, "eth0")?;
                configure(
                    &r1,
                    "eth1",
                    &["10.80.2.1/24".into(), "fd80:2::1/64".into()],
                    NARROW_MTU,
                )?;
                configure(
                    &r2,
                    "eth0",
                    &["10.80.2.2/24".into(), "fd80:2::2/64".into()],
                    NARROW_MTU,
                )?;
                switch::plug(&topo.switch, &r2, "v-r2", "eth1")?;
                configure(
                    &r2,
                    "eth1",
                    &["10.80.3.1/24".into(), "fd80:3::1/64".into()],
                    1500,
                )?;
                for r in [&r1, &r2] {
                    r.sysctl("net.ipv4.ip_forward", "1")?;
                    r.sysctl("net.ipv6.conf.all.forwarding", "1")?;
                    for iface in ["eth0", "eth1"] {
                        tx_checksum_off(r, iface)?;
                    }
                }
                topo.lb
                    .exec(&["ip", "route", "add", "10.80.3.0/24", "via", "10.80.1.2"])?;
                topo.lb.exec(&[
                    "ip",
                    "-6",
                    "route",
                    "add",
                    "fd80:3::/64",
                    "via",
                    "fd80:1::2",
                ])?;
                r1.exec(&["ip", "route", "add", "10.80.3.0/24", "via", "10.80.2.2"])?;
                r1.exec(&[
                    "ip",
                    "-6",
                    "route",
                    "add",
                    "fd80:3::/64",
                    "via",
                    "fd80:2::2",
                ])?;
                r1.exec(&["ip", "route", "add", "10.80.0.0/24", "via", "10.80.1.1"])?;
                r1.exec(&["ip", "-6", "route", "add", "fd80::/64", "via", "fd80:1::1"])?;
                r2.exec(&["ip", "route", "add", "default", "via", "10.80.2.1"])?;
                r2.exec(&["ip", "-6", "route", "add", "default", "via", "fd80:2::1"])?;
                topo.routers = vec![r1, r2];
            }
        }

        for i in 1..=backends {
            let ns = host(&format!("{prefix}-b{i}"))?;
            switch::plug(&topo.switch, &ns, &format!("v-b{i}"), "eth0")?;
            let (b4, b6) = plan.backend(i);
            configure(&ns, "eth0", &[format!("{b4}/24"), format!("{b6}/64")], 1500)?;
            tx_checksum_off(&ns, "eth0")?;
            let (g4, g6) = plan.gateway;
            ns.exec(&["ip", "route", "add", "default", "via", &g4.to_string()])?;
            ns.exec(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                &g6.to_string(),
            ])?;
            topo.backends.push(ns);
        }

        // NAPI for frames the lb sends with XDP_TX/XDP_REDIRECT: on the
        // peer of each lb interface.
        let peers: Vec<(&Netns, &str)> = match shape {
            Shape::TwoArm => vec![(&topo.client, "eth0"), (&topo.switch, "v-lb")],
            Shape::OneArm => vec![(&topo.switch, "v-lb")],
            Shape::Mtu => vec![(&topo.client, "eth0"), (&topo.routers[0], "eth0")],
        };
        let mut passthrough = Vec::new();
        for (ns, iface) in peers {
            let mut cmd = ns.command(xdplb);
            cmd.args(["pass-through", "--iface", iface]);
            let mut p = Proc::spawn_with(
                &mut cmd,
                &format!("pass-through {iface}@{}", ns.name()),
                false,
            )?;
            p.wait_for_stdout_line("ready", Duration::from_secs(10))
                .with_context(|| {
                    format!(
                        "attaching the pass-through program to {iface} in {}",
                        ns.name()
                    )
                })?;
            passthrough.push(p);
        }
        topo.passthrough = passthrough;
        Ok(topo)
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

    /// Routers r1, r2 (MTU shape only).
    pub fn routers(&self) -> &[Netns] {
        &self.routers
    }

    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// Backend `i` (1-based).
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

    /// `b<i>`, the name backend `i`'s server answers with.
    pub fn backend_name(&self, i: usize) -> String {
        format!("b{i}")
    }

    /// Every namespace.
    pub fn namespaces(&self) -> Vec<&Netns> {
        let mut all = vec![&self.switch, &self.client, &self.lb];
        all.extend(self.routers.iter());
        all.extend(self.backends.iter());
        all
    }

    /// The lb interfaces the daemon attaches to.
    pub fn lb_ifaces(&self) -> Vec<&'static str> {
        match self.shape {
            Shape::OneArm => vec!["eth0"],
            Shape::TwoArm | Shape::Mtu => vec!["eth0", "eth1"],
        }
    }

    pub fn vip4(&self) -> Ipv4Addr {
        self.plan.vip.0
    }

    pub fn vip6(&self) -> Ipv6Addr {
        self.plan.vip.1
    }

    /// The VIP of `v6`'s family.
    pub fn vip(&self, v6: bool) -> IpAddr {
        if v6 {
            self.vip6().into()
        } else {
            self.vip4().into()
        }
    }

    pub fn client_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.plan.client.1.into()
        } else {
            self.plan.client.0.into()
        }
    }

    /// The lb's address on the client side.
    pub fn lb_front_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.plan.lb_front.1.into()
        } else {
            self.plan.lb_front.0.into()
        }
    }

    /// The address backends see as source: the lb's on their side.
    pub fn snat_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.plan.snat.1.into()
        } else {
            self.plan.snat.0.into()
        }
    }

    /// Backend `i`'s address (1-based).
    pub fn backend_addr(&self, i: usize, v6: bool) -> IpAddr {
        self.backend(i);
        let (a4, a6) = self.plan.backend(i);
        if v6 {
            a6.into()
        } else {
            a4.into()
        }
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
    /// in the one-arm shape), the routers from the lb. Fills neighbour
    /// tables, so the daemon resolves every next hop at once.
    pub fn wait_reachable(&self) -> Result<()> {
        let mut targets: Vec<(&Netns, IpAddr)> = Vec::new();
        for v6 in [false, true] {
            targets.push((&self.client, self.lb_front_addr(v6)));
            for i in 1..=self.backend_count() {
                targets.push((&self.lb, self.backend_addr(i, v6)));
                targets.push((&self.backends[i - 1], self.plan_gateway(v6)));
                if self.shape == Shape::OneArm {
                    targets.push((&self.client, self.backend_addr(i, v6)));
                }
            }
        }
        if self.shape == Shape::Mtu {
            targets.push((&self.lb, "10.80.1.2".parse().unwrap()));
            targets.push((&self.lb, "fd80:1::2".parse().unwrap()));
        }
        for (from, addr) in targets {
            ping(from, addr, Duration::from_secs(10))?;
        }
        Ok(())
    }

    fn plan_gateway(&self, v6: bool) -> IpAddr {
        if v6 {
            self.plan.gateway.1.into()
        } else {
            self.plan.gateway.0.into()
        }
    }
}

/// A namespace for a host: no DAD, no reverse-path filtering.
fn host(name: &str) -> Result<Netns> {
    let ns = Netns::new(name)?;
    for scope in ["all", "default"] {
        ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        ns.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
    }
    Ok(ns)
}

/// A veth pair: `a_if` in `a`, `b_if` in `b`.
fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.exec(&[
        "ip",
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    Ok(())
}

/// Addresses, MTU and link up for `iface`; no DAD on it.
fn configure(ns: &Netns, iface: &str, addrs: &[String], mtu: u32) -> Result<()> {
    ns.sysctl(&format!("net.ipv6.conf.{iface}.accept_dad"), "0")?;
    ns.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
    ns.exec(&["ip", "link", "set", iface, "mtu", &mtu.to_string()])?;
    for a in addrs {
        if a.contains(':') {
            ns.exec(&["ip", "-6", "addr", "add", a, "dev", iface, "nodad"])?;
        } else {
            ns.exec(&["ip", "addr", "add", a, "dev", iface])?;
        }
    }
    ns.exec(&["ip", "link", "set", iface, "up"])?;
    Ok(())
}

/// Transmit checksum offload off. A veth passes a locally sent TCP/UDP
/// packet to its peer as CHECKSUM_PARTIAL, its L4 checksum not computed
/// yet (only the pseudo-header sum is in the field); the XDP program on the
/// lb sees those bytes, updates them incrementally and sends the frame on
/// as raw bytes, so it would arrive with a wrong checksum and be dropped.
/// With `tx off` the sender's stack computes full checksums, as a real NIC
/// delivers them.
fn tx_checksum_off(ns: &Netns, iface: &str) -> Result<()> {
    ns.exec(&["ethtool", "-K", iface, "tx", "off"])?;
    Ok(())
}

/// Pings `addr` from `from` until it answers or `timeout` passes.
fn ping(from: &Netns, addr: IpAddr, timeout: Duration) -> Result<()> {
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

// ---------------------------------------------------------------- config

/// A NAT configuration: TCP services on port 80 of both VIPs (`web4`,
/// `web6`) and UDP services on port 53 (`dns4`, `dns6`), every backend of
/// the topology serving all four on ports 8080 and 5353. `health_check`
/// (TOML lines, may be empty for the default TCP check) is the TCP
/// services' `[service.health_check]`; the UDP services are not checked.
pub fn nat_config(topo: &NatTopology, health_check: &str) -> String {
    let mut text = String::new();
    for v6 in [false, true] {
        let fam = if v6 { "6" } else { "4" };
        let vip = topo.vip(v6);
        text += &format!(
            "[[service]]\nname = \"web{fam}\"\nvip = \"{vip}\"\nport = 80\n\
             protocol = \"tcp\"\nmode = \"nat\"\n\n"
        );
        if !health_check.is_empty() {
            text += &format!("[service.health_check]\n{health_check}\n\n");
        }
        // Explicit values (the defaults), so the table is exercised. The
        // TCP timeout is written "60m" here and "1h" in e2e_nat's
        // documented-settings test, so both spellings are exercised.
        text += "[service.nat]\nports = \"20000-59999\"\ntcp_timeout = \"60m\"\n\
                 tcp_closing_timeout = \"10s\"\nudp_timeout = \"60s\"\n\n";
        for i in 1..=topo.backend_count() {
            text += &format!(
                "[[service.backend]]\naddress = \"{}\"\nport = {BACKEND_PORT}\n\n",
                topo.backend_addr(i, v6)
            );
        }
        text += &format!(
            "[[service]]\nname = \"dns{fam}\"\nvip = \"{vip}\"\nport = 53\n\
             protocol = \"udp\"\nmode = \"nat\"\n\n"
        );
        text += "[service.health_check]\ntype = \"none\"\n\n";
        for i in 1..=topo.backend_count() {
            text += &format!(
                "[[service.backend]]\naddress = \"{}\"\nport = {BACKEND_UDP_PORT}\n\n",
                topo.backend_addr(i, v6)
            );
        }
    }
    text
}

// ---------------------------------------------------------------- daemon

/// Starts the daemon on every lb interface of `topo` (native XDP).
pub fn start_xdplb(binary: &Path, topo: &NatTopology, config: &str) -> Result<Xdplb> {
    Xdplb::start_in(binary, topo.lb(), &topo.lb_ifaces(), topo.prefix(), config)
}

/// Starts `xdplb-testbackend` in every backend namespace: HTTP on
/// [`BACKEND_PORT`], UDP on [`BACKEND_UDP_PORT`], named `b<i>`.
pub fn start_backends(topo: &NatTopology, binary: &Path) -> Result<Vec<Proc>> {
    (1..=topo.backend_count())
        .map(|i| start_backend(topo, binary, i))
        .collect()
}

/// Starts backend `i`'s server.
pub fn start_backend(topo: &NatTopology, binary: &Path, i: usize) -> Result<Proc> {
    let name = topo.backend_name(i);
    let mut cmd = topo.backend(i).command(binary);
    cmd.args([
        "--name",
        &name,
        "--port",
        &BACKEND_PORT.to_string(),
        "--udp-port",
        &BACKEND_UDP_PORT.to_string(),
    ]);
    let mut p = Proc::spawn_with(&mut cmd, &name, false)?;
    p.wait_for_stdout_line("listening", Duration::from_secs(10))?;
    Ok(p)
}
