//! The DSR demo/test topology.
//!
//! ```text
//!            switch namespace: bridge br0
//!     ┌────────────┬──────────────┬──────────┬─────┐
//!   v-client      v-lb          v-b1       v-b2   ...      (veth ends in `switch`)
//!     │            │              │          │
//!   eth0         eth0           eth0       eth0          (veth ends in each host)
//!  client          lb            b1         b2
//!  10.77.0.1    10.77.0.2     10.77.0.11  10.77.0.12
//!  fd77::1      fd77::2       fd77::11    fd77::12
//! ```
//!
//! The client routes the VIPs (10.77.100.1, fd77:100::1) via the lb, which
//! does not forward IP (so without XDP the VIP is unreachable). Each backend
//! holds the VIPs on `lo` and neither answers ARP for them nor uses them as
//! ARP source, so the load balancer only has to rewrite MAC addresses (direct
//! server return): replies go from the backend straight to the client.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};

use crate::{
    netns::{unique_prefix, Netns},
    proc::Proc,
    switch,
};

/// The IPv4 virtual IP served by the load balancer.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 100, 1);
/// The IPv6 virtual IP served by the load balancer.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0x100, 0, 0, 0, 0, 0, 1);
/// Prefix length of the IPv4 segment 10.77.0.0/24.
pub const PREFIX4: u8 = 24;
/// Prefix length of the IPv6 segment fd77::/64.
pub const PREFIX6: u8 = 64;
/// Interface name of every host's veth end inside its own namespace.
pub const HOST_IFACE: &str = "eth0";
/// The largest supported number of backends: backend i gets 10.77.0.(10+i)
/// and fd77::(10+i) written in decimal digits, which stays two digits.
pub const MAX_BACKENDS: usize = 89;

/// The DSR topology: `client`, `lb` and backends `b1..bN` on one L2 segment
/// (a bridge in a `switch` namespace). Dropping it deletes all namespaces,
/// which removes the veths and the bridge with them.
///
/// Backends are numbered from 1, matching their names: `backend(1)` is `b1`.
#[derive(Debug)]
pub struct DsrTopology {
    prefix: String,
    /// The pass-through XDP program on the lb's veth peer (see
    /// [`DsrTopology::enable_xdp_tx`]); dropped (detached) first.
    passthrough: Option<Proc>,
    // Field order is drop order; any order works since every veth end dies
    // with its namespace.
    client: Netns,
    lb: Netns,
    backends: Vec<Netns>,
    switch: Netns,
}

impl DsrTopology {
    /// Builds the topology with `backends` backends (1..=[`MAX_BACKENDS`]),
    /// with namespace names prefixed by a fresh [`unique_prefix`]`("dsr")`.
    pub fn new(backends: usize) -> anyhow::Result<DsrTopology> {
        Self::with_tag("dsr", backends)
    }

    /// Like [`DsrTopology::new`] with a custom tag in the namespace names
    /// (e.g. the test's name, to tell leftovers apart). Keep it short.
    ///
    /// Namespaces are called `<prefix>-sw`, `<prefix>-client`, `<prefix>-lb`
    /// and `<prefix>-b<i>`. If any step fails, everything created so far is
    /// removed again.
    pub fn with_tag(tag: &str, backends: usize) -> anyhow::Result<DsrTopology> {
        ensure!(
            (1..=MAX_BACKENDS).contains(&backends),
            "backend count {backends} out of range 1..={MAX_BACKENDS}"
        );
        // Checked up front so a missing tool fails with a clear message
        // rather than half-way through.
        for tool in ["ip", "sysctl", "ethtool", "ping"] {
            ensure!(
                crate::which(tool),
                "`{tool}` is needed to build the test topology but was not found in PATH{}",
                if tool == "ethtool" {
                    " (install the ethtool package; it enables GRO on the lb's veth peer, \
                     without which XDP_TX frames are dropped)"
                } else {
                    ""
                }
            );
        }
        let prefix = unique_prefix(tag);

        // Each Netns is owned as soon as it exists, so returning early with
        // `?` drops (deletes) everything made so far.
        let switch = switch::new(&format!("{prefix}-sw"))?;

        let client = Netns::new(&format!("{prefix}-client"))?;
        switch::plug(&switch, &client, "v-client", HOST_IFACE)?;
        configure_host(&client, client_addr4(), client_addr6())?;
        client.exec(&[
            "ip",
            "route",
            "add",
            &format!("{VIP4}/32"),
            "via",
            &lb_addr4().to_string(),
        ])?;
        client.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            &lb_addr6().to_string(),
        ])?;

        let lb = Netns::new(&format!("{prefix}-lb"))?;
        switch::plug(&switch, &lb, "v-lb", HOST_IFACE)?;
        configure_host(&lb, lb_addr4(), lb_addr6())?;
        // Never route: the VIP must be served by XDP or not at all.
        lb.sysctl("net.ipv4.ip_forward", "0")?;
        lb.sysctl("net.ipv6.conf.all.forwarding", "0")?;
        // The client's packets reach the load balancer's XDP program, which
        // bounces them to a backend as raw frames: an offloaded (partial)
        // checksum would arrive unfinished and the backend would drop the
        // segment. A real NIC's traffic always carries full checksums.
        client.exec(&["ethtool", "-K", HOST_IFACE, "tx", "off"])?;

        let mut backend_ns = Vec::with_capacity(backends);
        for i in 1..=backends {
            let ns = Netns::new(&format!("{prefix}-b{i}"))?;
            switch::plug(&switch, &ns, &format!("v-b{i}"), HOST_IFACE)?;
            // ARP flux control, as for any DSR real server: answer ARP only
            // for addresses on the asking interface (not the VIP on lo), and
            // never use the VIP as ARP source address.
            for scope in ["all", HOST_IFACE] {
                ns.sysctl(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
                ns.sysctl(&format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
            }
            configure_host(&ns, backend_addr4(i), backend_addr6(i))?;
            ns.exec(&["ip", "addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
            ns.exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{VIP6}/128"),
                "dev",
                "lo",
                "nodad",
            ])?;
            backend_ns.push(ns);
        }

        Ok(DsrTopology {
            prefix,
            passthrough: None,
            client,
            lb,
            backends: backend_ns,
            switch,
        })
    }

    /// Lets frames the lb sends with XDP_TX reach the switch: a veth
    /// delivers frames its peer transmits from XDP only if it has an XDP
    /// program itself (GRO alone leaves them queued on this kernel), so this
    /// runs `xdplb pass-through` on the lb's peer in the switch namespace,
    /// for the topology's lifetime.
    pub fn enable_xdp_tx(&mut self, xdplb: &Path) -> anyhow::Result<()> {
        let mut cmd = self.switch.command(xdplb);
        cmd.args(["pass-through", "--iface", "v-lb"]);
        let mut proc = Proc::spawn_with(&mut cmd, "pass-through", false)?;
        proc.wait_for_stdout_line("ready", Duration::from_secs(10))
            .context("attaching the pass-through XDP program to the lb's veth peer")?;
        self.passthrough = Some(proc);
        Ok(())
    }

    /// The unique prefix of this topology's namespace names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The client's namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The load balancer's namespace.
    pub fn lb(&self) -> &Netns {
        &self.lb
    }

    /// Backend `i`'s namespace (1-based: `backend(1)` is `b1`). Panics if
    /// `i` is not in `1..=backend_count()`.
    pub fn backend(&self, i: usize) -> &Netns {
        assert!(
            (1..=self.backends.len()).contains(&i),
            "backend index {i} out of range 1..={}",
            self.backends.len()
        );
        &self.backends[i - 1]
    }

    /// The switch namespace holding the bridge and the host-facing veth ends
    /// (`v-client`, `v-lb`, `v-b<i>`).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// All namespaces: switch, client, lb, then backends in order.
    pub fn namespaces(&self) -> Vec<&Netns> {
        let mut all = vec![&self.switch, &self.client, &self.lb];
        all.extend(self.backends.iter());
        all
    }

    /// Number of backends.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Backend `i`'s name, `b<i>` (what `xdplb-testbackend --name` should
    /// be given, so responses identify the backend).
    pub fn backend_name(&self, i: usize) -> String {
        format!("b{i}")
    }

    /// The interface the load balancer attaches to, in [`DsrTopology::lb`]: `eth0`.
    pub fn lb_iface(&self) -> &'static str {
        HOST_IFACE
    }

    /// The IPv4 VIP (10.77.100.1).
    pub fn vip4(&self) -> Ipv4Addr {
        VIP4
    }

    /// The IPv6 VIP (fd77:100::1).
    pub fn vip6(&self) -> Ipv6Addr {
        VIP6
    }

    /// Both VIPs, IPv4 first.
    pub fn vips(&self) -> [IpAddr; 2] {
        [IpAddr::V4(VIP4), IpAddr::V6(VIP6)]
    }

    /// The client's IPv4 address (10.77.0.1); same as the free [`client_addr4`].
    pub fn client_addr4(&self) -> Ipv4Addr {
        client_addr4()
    }

    /// The client's IPv6 address (fd77::1).
    pub fn client_addr6(&self) -> Ipv6Addr {
        client_addr6()
    }

    /// The lb's IPv4 address (10.77.0.2).
    pub fn lb_addr4(&self) -> Ipv4Addr {
        lb_addr4()
    }

    /// The lb's IPv6 address (fd77::2).
    pub fn lb_addr6(&self) -> Ipv6Addr {
        lb_addr6()
    }

    /// Backend `i`'s IPv4 address, 10.77.0.(10+i) (1-based).
    pub fn backend_addr4(&self, i: usize) -> Ipv4Addr {
        self.backend(i); // range check against this topology
        backend_addr4(i)
    }

    /// Backend `i`'s IPv6 address, fd77::(10+i) in decimal digits (1-based).
    pub fn backend_addr6(&self, i: usize) -> Ipv6Addr {
        self.backend(i); // range check against this topology
        backend_addr6(i)
    }

    /// MAC address of the lb's `eth0`.
    pub fn lb_mac(&self) -> anyhow::Result<String> {
        self.lb.mac(HOST_IFACE)
    }

    /// MAC address of backend `i`'s `eth0` (1-based).
    pub fn backend_mac(&self, i: usize) -> anyhow::Result<String> {
        self.backend(i).mac(HOST_IFACE)
    }

    /// MAC address of the client's `eth0`.
    pub fn client_mac(&self) -> anyhow::Result<String> {
        self.client.mac(HOST_IFACE)
    }

    /// Pings, with retries for up to ~10 s per target, the lb and every
    /// backend from the client, and every backend from the lb, over IPv4 and
    /// IPv6. Besides checking the segment works, this fills the neighbour
    /// tables: the load balancer looks up backends' MACs in the lb's.
    pub fn wait_reachable(&self) -> anyhow::Result<()> {
        let mut targets: Vec<(&Netns, IpAddr)> = vec![
            (&self.client, lb_addr4().into()),
            (&self.client, lb_addr6().into()),
        ];
        for i in 1..=self.backend_count() {
            for from in [&self.client, &self.lb] {
                targets.push((from, backend_addr4(i).into()));
                targets.push((from, backend_addr6(i).into()));
            }
        }
        for (from, addr) in targets {
            ping(from, addr, Duration::from_secs(10))?;
        }
        Ok(())
    }
}

/// The client's IPv4 address, 10.77.0.1.
pub fn client_addr4() -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 1)
}

/// The client's IPv6 address, fd77::1.
pub fn client_addr6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1)
}

/// The lb's IPv4 address, 10.77.0.2.
pub fn lb_addr4() -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 2)
}

/// The lb's IPv6 address, fd77::2.
pub fn lb_addr6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2)
}

/// Backend `i`'s IPv4 address, 10.77.0.(10+i) (1-based: b1 is 10.77.0.11).
pub fn backend_addr4(i: usize) -> Ipv4Addr {
    assert!(
        (1..=MAX_BACKENDS).contains(&i),
        "backend index {i} out of range"
    );
    Ipv4Addr::new(10, 77, 0, 10 + i as u8)
}

/// Backend `i`'s IPv6 address, fd77::(10+i) with the number's decimal digits
/// as the last group (b1 is fd77::11, b12 is fd77::22) for readability.
pub fn backend_addr6(i: usize) -> Ipv6Addr {
    assert!(
        (1..=MAX_BACKENDS).contains(&i),
        "backend index {i} out of range"
    );
    format!("fd77::{}", 10 + i)
        .parse()
        .expect("valid IPv6 address")
}

/// Common host setup: no DAD (addresses usable at once), no reverse-path
/// filtering (DSR replies leave with the VIP as source), addresses on eth0.
fn configure_host(ns: &Netns, addr4: Ipv4Addr, addr6: Ipv6Addr) -> anyhow::Result<()> {
    // Before any address exists, so even the link-local address skips DAD.
    for scope in ["all", "default", HOST_IFACE] {
        ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        ns.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")?;
    }
    ns.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{addr4}/{PREFIX4}"),
        "dev",
        HOST_IFACE,
    ])?;
    ns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{addr6}/{PREFIX6}"),
        "dev",
        HOST_IFACE,
        "nodad",
    ])?;
    ns.exec(&["ip", "link", "set", HOST_IFACE, "up"])?;
    Ok(())
}

/// Pings `addr` from `from` once a second until it answers or `timeout` passes.
fn ping(from: &Netns, addr: IpAddr, timeout: Duration) -> anyhow::Result<()> {
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
