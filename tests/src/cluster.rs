//! The cluster testbed: three xdplb nodes behind a BIRD router doing ECMP
//! over BGP with BFD, in network namespaces, with real BIRD, the real
//! `xdplb` binary attached in native XDP mode (DSR or NAT) and real TCP
//! backends:
//!
//! ```text
//!   client 10.88.1.2 ── router 10.88.1.1 / 10.88.0.1 (BIRD: BGP+BFD, ECMP)
//!                                │
//!        ───────────── bridge (switch namespace) 10.88.0.0/24 ─────────────
//!         │             │             │           │        │        │
//!      n1 .21        n2 .22        n3 .23      b1 .11   b2 .12   b3 .13
//!   xdplb + BIRD  xdplb + BIRD  xdplb + BIRD   (VIP 10.88.100.1 on lo, DSR)
//! ```
//!
//! Each node's BIRD runs `examples/bird.conf` with this topology's
//! addresses substituted: the tests prove the shipped example works.
//!
//! In NAT mode node `i` translates to a pool of two SNAT addresses,
//! `10.88.200.i` and `10.88.201.i`, which it announces, and announces its
//! peers' as backups; the backends reach the SNAT addresses through the
//! router (their default route), which learns them over BGP.
//! Nodes replicate flow state to each other on port 4700 when
//! [`Replication`] says so. Needs root and BIRD 2 (`cargo xtask setup`
//! installs `bird2`).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::ensure;

use crate::{
    assert_within, bin_path,
    bird::Bird,
    client::{self, StreamConn},
    lb::{failures, Load, Xdplb},
    netns::{exec_line, unique_prefix, Netns},
    proc::Proc,
    switch, topology,
};

/// The service's VIP and port.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 88, 100, 1);
pub const ROUTER: &str = "10.88.0.1";
pub const NODES: usize = 3;
pub const BACKENDS: usize = 3;
pub const ROUTE_TABLE: u32 = 200;
/// The nodes' replication port.
pub const REPLICATION_PORT: u16 = 4700;
/// The cluster's shared replication key.
pub const KEY: &str = "cluster test key, 32 bytes long!";

/// The VIP as a socket address.
pub fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP), 80)
}

/// Node `i`'s address (1-based).
pub fn node_addr(i: usize) -> String {
    format!("10.88.0.{}", 20 + i)
}

/// Backend `i`'s address (1-based).
pub fn backend_addr(i: usize) -> String {
    format!("10.88.0.{}", 10 + i)
}

/// Node `i`'s replication address.
pub fn replication_addr(i: usize) -> SocketAddr {
    SocketAddr::new(node_addr(i).parse().unwrap(), REPLICATION_PORT)
}

/// Node `i`'s pool of SNAT addresses (NAT mode).
pub fn snat_addrs(i: usize) -> [String; 2] {
    [format!("10.88.200.{i}"), format!("10.88.201.{i}")]
}

/// Node `i`'s SNAT addresses as a TOML array.
fn snat_array(i: usize) -> String {
    format!("[\"{}\"]", snat_addrs(i).join("\", \""))
}

/// How the nodes forward to the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Dsr,
    Nat,
}

/// Whether and how the nodes replicate flow state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replication {
    /// No peers configured.
    None,
    /// Peers configured, replication on.
    On,
    /// Peers configured but `replicate = false`: what replication buys.
    Off,
}

/// The router's BIRD: one BGP+BFD session per node, routes merged into one
/// multipath kernel route.
fn router_bird_conf() -> String {
    let mut c = format!(
        "router id {ROUTER};\n\
         protocol device {{ }}\n\
         protocol kernel {{ merge paths on; ipv4 {{ import none; export all; }}; }}\n\
         protocol bfd {{ interface \"*\" {{ min rx interval 100 ms; min tx interval 100 ms; \
         multiplier 3; }}; }}\n\
         template bgp xdplb_node {{ local {ROUTER} as 65000; bfd on; connect retry time 1; \
         error wait time 1, 2; ipv4 {{ import all; export none; }}; }}\n"
    );
    for i in 1..=NODES {
        c += &format!(
            "protocol bgp n{i} from xdplb_node {{ neighbor {} as 65001; }}\n",
            node_addr(i)
        );
    }
    c
}

/// examples/bird.conf with node `i`'s addresses.
fn node_bird_conf(i: usize) -> String {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bird.conf");
    let text = std::fs::read_to_string(&example).expect("reading examples/bird.conf");
    assert!(
        text.contains("kernel table 200;"),
        "example announces table 200"
    );
    text.replace("192.0.2.11", &node_addr(i))
        .replace("192.0.2.1", ROUTER)
}

/// Node `i`'s xdplb configuration: the same services and backends on
/// every node, but listed in a different order on each (rotated by `i`),
/// which must not change the tables.
pub fn xdplb_conf(i: usize, mode: Mode, replication: Replication) -> String {
    let mut c = format!("[cluster]\nroute_table = {ROUTE_TABLE}\n");
    if replication != Replication::None {
        c += &format!(
            "replication_listen = \"{}\"\nreplication_key = \"{KEY}\"\nreplicate = {}\n",
            replication_addr(i),
            replication == Replication::On
        );
        for peer in (1..=NODES).filter(|&p| p != i) {
            c += &format!(
                "[[cluster.peer]]\naddress = \"{}\"\n",
                replication_addr(peer)
            );
            if mode == Mode::Nat {
                c += &format!("snat_addresses = {}\n", snat_array(peer));
            }
        }
    }
    let mode_line = match mode {
        Mode::Dsr => "",
        Mode::Nat => "mode = \"nat\"\n",
    };
    c += &format!(
        "\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\n\
         {mode_line}\n[service.health_check]\ninterval = \"500ms\"\n\n"
    );
    if mode == Mode::Nat {
        c += &format!("[service.nat]\nsnat_addresses = {}\n\n", snat_array(i));
    }
    for k in 0..BACKENDS {
        let b = (k + i) % BACKENDS + 1;
        c += &format!("[[service.backend]]\naddress = \"{}\"\n\n", backend_addr(b));
    }
    c
}

/// Everything the testbed starts; fields drop in order, processes before
/// the namespaces they run in.
pub struct Cluster {
    prefix: String,
    xdplb: PathBuf,
    pub mode: Mode,
    replication: Replication,
    pub daemons: Vec<Option<Xdplb>>,
    pub node_birds: Vec<Option<Bird>>,
    router_bird: Bird,
    _passthrough: Vec<Proc>,
    _backend_procs: Vec<Proc>,
    pub client: Netns,
    pub router: Netns,
    pub nodes: Vec<Netns>,
    _backends: Vec<Netns>,
    pub switch: Netns,
}

/// Sets `net.ipv4.conf.SCOPE.KEY` to `value` for each of `scopes`.
fn conf_sysctl(ns: &Netns, scopes: &[&str], key: &str, value: &str) {
    for scope in scopes {
        ns.sysctl(&format!("net.ipv4.conf.{scope}.{key}"), value)
            .unwrap();
    }
}

/// Namespace `PREFIX-NAME` with `eth0` (address `addr`) plugged into the
/// bridge as port `v-NAME`.
fn host_on_bridge(switch: &Netns, prefix: &str, name: &str, addr: &str) -> Netns {
    let ns = Netns::new(&format!("{prefix}-{name}")).unwrap();
    switch::plug(switch, &ns, &format!("v-{name}"), "eth0").unwrap();
    host_setup(&ns, addr);
    ns
}

fn host_setup(ns: &Netns, addr: &str) {
    conf_sysctl(ns, &["all", "default", "eth0"], "rp_filter", "0");
    exec_line(ns, &format!("ip addr add {addr}/24 dev eth0"));
    exec_line(ns, "ip link set eth0 up");
}

/// Starts `program ARGS` in `ns` and waits until it prints `ready_line`.
fn spawn_ready(ns: &Netns, program: &Path, args: &[&str], name: &str, ready_line: &str) -> Proc {
    let mut cmd = ns.command(program);
    cmd.args(args);
    let mut p = Proc::spawn_with(&mut cmd, name, false).unwrap();
    p.wait_for_stdout_line(ready_line, Duration::from_secs(10))
        .unwrap();
    p
}

/// Pings `addr` from `from` until it answers; panics after 10 s.
fn ping(from: &Netns, addr: &str) {
    topology::ping(from, addr.parse().unwrap(), Duration::from_secs(10)).unwrap();
}

fn ping_backends(from: &Netns) {
    for b in 1..=BACKENDS {
        ping(from, &backend_addr(b));
    }
}

impl Cluster {
    /// Builds the DSR testbed (see [`Cluster::build_in`]).
    pub fn build(replication: Replication) -> Self {
        Self::build_in(Mode::Dsr, replication)
    }

    /// Builds the testbed and starts everything; returns once the router
    /// has a BGP session with every node and routes the VIP to all of them.
    pub fn build_in(mode: Mode, replication: Replication) -> Self {
        crate::require_root();
        assert!(
            crate::which("bird") && crate::which("birdc"),
            "BIRD 2 is needed (apt-get install bird2, or cargo xtask setup)"
        );
        let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
        let testbackend = bin_path("xdplb-testbackend").expect("xdplb-testbackend binary");
        let prefix = unique_prefix("cl");
        let switch = switch::new(&format!("{prefix}-sw")).unwrap();

        let router = host_on_bridge(&switch, &prefix, "r", ROUTER);
        let client = Netns::new(&format!("{prefix}-c")).unwrap();
        switch::veth(&router, "eth1", &client, "eth0").unwrap();
        exec_line(&router, "ip addr add 10.88.1.1/24 dev eth1");
        exec_line(&router, "ip link set eth1 up");
        router.sysctl("net.ipv4.ip_forward", "1").unwrap();
        // NAT replies come in and go out on eth0: no ICMP redirect may
        // send a backend straight to a node, past the BGP routes.
        conf_sysctl(&router, &["all", "eth0"], "send_redirects", "0");
        // Spread flows over the next hops by 5-tuple, not address pair.
        router
            .sysctl("net.ipv4.fib_multipath_hash_policy", "1")
            .unwrap();
        host_setup(&client, "10.88.1.2");
        exec_line(&client, "ip route add default via 10.88.1.1");
        // XDP bounces the client's frames as they are: no checksum left to
        // offload (a real NIC's frames always carry full checksums).
        for (ns, dev) in [(&client, "eth0"), (&router, "eth0"), (&router, "eth1")] {
            exec_line(ns, &format!("ethtool -K {dev} tx off"));
        }

        let mut nodes = Vec::new();
        for i in 1..=NODES {
            let ns = host_on_bridge(&switch, &prefix, &format!("n{i}"), &node_addr(i));
            ns.sysctl("net.ipv4.ip_forward", "0").unwrap();
            exec_line(&ns, &format!("ip route add default via {ROUTER}"));
            if mode == Mode::Nat {
                // The datapath routes a dead peer's NAT replies to their
                // clients with the kernel's lookup, which needs it.
                conf_sysctl(&ns, &["eth0"], "forwarding", "1");
            }
            nodes.push(ns);
        }
        let mut backends = Vec::new();
        let mut backend_procs = Vec::new();
        for i in 1..=BACKENDS {
            let name = format!("b{i}");
            let ns = host_on_bridge(&switch, &prefix, &name, &backend_addr(i));
            conf_sysctl(&ns, &["all", "eth0"], "arp_ignore", "1");
            conf_sysctl(&ns, &["all", "eth0"], "arp_announce", "2");
            exec_line(&ns, &format!("ip addr add {VIP}/32 dev lo"));
            exec_line(&ns, &format!("ip route add default via {ROUTER}"));
            let args = ["--name", &name, "--port", "80"];
            backend_procs.push(spawn_ready(&ns, &testbackend, &args, &name, "listening"));
            backends.push(ns);
        }
        let mut passthrough = Vec::new();
        for (i, ns) in nodes.iter().enumerate() {
            // XDP_TX on a veth needs an XDP program on its peer.
            let args = ["pass-through", "--iface", &format!("v-n{}", i + 1)];
            passthrough.push(spawn_ready(&switch, &xdplb, &args, "pass-through", "ready"));
            ping_backends(ns);
        }
        ping(&client, ROUTER);
        let router_bird =
            Bird::start(&router, &format!("{prefix}-r"), &router_bird_conf()).unwrap();
        let mut cluster = Cluster {
            prefix,
            xdplb,
            mode,
            replication,
            daemons: (0..NODES).map(|_| None).collect(),
            node_birds: (0..NODES).map(|_| None).collect(),
            router_bird,
            _passthrough: passthrough,
            _backend_procs: backend_procs,
            client,
            router,
            nodes,
            _backends: backends,
            switch,
        };
        for i in 1..=NODES {
            cluster.start_node(i, "");
        }
        for i in 1..=NODES {
            cluster.wait_established(i);
        }
        cluster.wait_next_hops(NODES, Duration::from_secs(20));
        cluster
    }

    /// Starts node `i`'s daemon, then its BIRD; `run` tells files of a
    /// restarted node apart.
    fn start_node(&mut self, i: usize, run: &str) {
        let ns = &self.nodes[i - 1];
        let tag = format!("{}-n{i}{run}", self.prefix);
        let conf = xdplb_conf(i, self.mode, self.replication);
        let daemon =
            Xdplb::start_in(&self.xdplb, ns, &["eth0"], &tag, &conf).expect("starting xdplb");
        self.daemons[i - 1] = Some(daemon);
        self.node_birds[i - 1] = Some(Bird::start(ns, &tag, &node_bird_conf(i)).unwrap());
    }

    fn wait_established(&self, i: usize) {
        self.router_bird
            .wait_established(&format!("n{i}"), Duration::from_secs(20))
            .unwrap();
    }

    /// Node `i`'s daemon.
    pub fn daemon(&self, i: usize) -> &Xdplb {
        self.daemons[i - 1].as_ref().expect("node is alive")
    }

    /// Node `i`'s `xdplb status`.
    pub fn status(&self, i: usize) -> serde_json::Value {
        self.daemon(i).json(&["status"]).unwrap()
    }

    /// Node `i`'s count of packets for reason `name` (`xdplb stats`).
    pub fn reason(&self, i: usize, name: &str) -> u64 {
        self.daemon(i).json(&["stats"]).unwrap()["reasons"][name]
            .as_u64()
            .unwrap()
    }

    /// The router's next hops for the VIP.
    pub fn next_hops(&self) -> Vec<String> {
        self.next_hops_of(&VIP.to_string())
    }

    /// The router's next hops for host route `addr`.
    pub fn next_hops_of(&self, addr: &str) -> Vec<String> {
        let out = self
            .router
            .exec(&["ip", "-j", "route", "show", &format!("{addr}/32")])
            .unwrap();
        let routes: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        // No route indexes as null, which has no gateway; a route with one
        // next hop has its gateway on itself, an ECMP route under "nexthops".
        let route = &routes[0];
        let hops = route["nexthops"]
            .as_array()
            .map_or(std::slice::from_ref(route), Vec::as_slice);
        hops.iter()
            .filter_map(|h| h["gateway"].as_str().map(str::to_owned))
            .collect()
    }

    /// Polls the router's route every 5 ms until it has `n` next hops;
    /// returns how long that took.
    pub fn wait_next_hops(&self, n: usize, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let hops = self.next_hops();
            if hops.len() == n {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "router has next hops {hops:?} after {timeout:?}, expected {n}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Node `i` leaves gracefully (`xdplb cluster leave --quiet 2`), which
    /// returns once its routes are withdrawn and its flows quiet; the
    /// router has then dropped it. Returns the daemon's answer.
    pub fn leave(&self, i: usize) -> serde_json::Value {
        let left = self
            .daemon(i)
            .json(&["cluster", "leave", "--quiet", "2"])
            .unwrap();
        println!("n{i} cluster leave: {left}");
        assert_eq!(self.next_hops().len(), NODES - 1, "the router dropped n{i}");
        left
    }

    /// Node `i` leaves (see [`Cluster::leave`]) under a steady load of new
    /// connections (one every 10 ms from source ports 30000..), which
    /// starts 1 s before; `during` runs once it left, the load stops 1 s
    /// later, and not one of its requests may have failed. Returns what
    /// `during` returned.
    pub fn leave_under_load<T>(&self, i: usize, during: impl FnOnce() -> T) -> T {
        let load = Load::start_in(&self.client, vip(), Duration::from_millis(10), 30000).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        self.leave(i);
        let result = during();
        std::thread::sleep(Duration::from_secs(1));
        let samples = load.stop();
        let failed = failures(&samples);
        println!(
            "{:?} graceful leave: {} requests during the leave, {} failed",
            self.mode,
            samples.len(),
            failed.len()
        );
        assert!(
            failed.is_empty(),
            "requests failed during the leave: {failed:?}"
        );
        result
    }

    /// Node `i` joins again; returns once the router has every node.
    pub fn join(&self, i: usize) {
        self.daemon(i).cli(&["cluster", "join"]).unwrap();
        self.wait_next_hops(NODES, Duration::from_secs(10));
    }

    /// Node `i`'s count of new flows (DSR picks or NAT translations).
    pub fn new_flows(&self, i: usize) -> u64 {
        match self.mode {
            Mode::Dsr => self.reason(i, "flow_new"),
            Mode::Nat => self.reason(i, "nat_new"),
        }
    }

    /// Spread: 300 connections from source ports 20000..20300 all succeed
    /// and every node carries at least 15 % of them (new flows).
    pub fn assert_spread(&self) {
        let before: Vec<u64> = (1..=NODES).map(|i| self.new_flows(i)).collect();
        let failed: Vec<(u16, String)> = self.client.run(|| {
            (20000u16..20300)
                .filter_map(|port| {
                    client::get(vip(), Some(port), Duration::from_secs(3))
                        .err()
                        .map(|e| (port, format!("{e:#}")))
                })
                .collect()
        });
        assert!(failed.is_empty(), "failed connections: {failed:?}");
        let carried: Vec<u64> = (1..=NODES)
            .map(|i| self.new_flows(i) - before[i - 1])
            .collect();
        println!(
            "{:?} spread of 300 connections over the nodes (new flows per node): {carried:?}",
            self.mode
        );
        assert_eq!(carried.iter().sum::<u64>(), 300, "{carried:?}");
        for (i, n) in carried.iter().enumerate() {
            assert!(
                *n >= 45,
                "node n{} carried {n} of 300 (< 15 %): {carried:?}",
                i + 1
            );
        }
    }

    /// Routes in node `i`'s table 200.
    pub fn table(&self, i: usize) -> String {
        self.nodes[i - 1]
            .exec(&["ip", "route", "show", "table", &ROUTE_TABLE.to_string()])
            .unwrap()
    }

    /// Node `i` vanishes as if its host died: [`Cluster::kill_daemon`],
    /// then [`Cluster::cut_node`]. Returns the daemon (dead, still owning
    /// its pins) and the time until the router withdrew the node.
    pub fn kill_node(&mut self, i: usize) -> (Xdplb, Duration) {
        let daemon = self.kill_daemon(i);
        let (_, withdrawn) = self.cut_node(i);
        (daemon, withdrawn)
    }

    /// SIGKILLs node `i`'s daemon; returns it (dead, still owning its pins).
    pub fn kill_daemon(&mut self, i: usize) -> Xdplb {
        let mut daemon = self.daemons[i - 1].take().expect("node is alive");
        daemon.proc.kill(libc::SIGKILL).unwrap();
        let _ = daemon.proc.wait_timeout(Duration::from_secs(5));
        daemon
    }

    /// Node `i`'s host dies: its link is cut, then its BIRD killed (a
    /// killed BIRD's kernel would otherwise close the BGP session, which
    /// the router notices at once: that would not measure BFD). Returns
    /// the instant of the cut and the time from the BIRD's death until the
    /// router withdrew the node.
    pub fn cut_node(&mut self, i: usize) -> (Instant, Duration) {
        exec_line(&self.switch, &format!("ip link set v-n{i} down"));
        let cut = Instant::now();
        self.node_birds[i - 1].as_mut().unwrap().kill().unwrap();
        (cut, self.wait_next_hops(NODES - 1, Duration::from_secs(5)))
    }

    /// Node `i`, killed by [`Cluster::kill_node`], boots again: its old
    /// datapath and routes are gone (`dead` is dropped, which detaches
    /// and unpins it), its link comes up, and a new daemon and BIRD start.
    /// Returns once the router uses it again.
    pub fn reboot_node(&mut self, i: usize, dead: Xdplb) {
        drop(dead);
        self.node_birds[i - 1] = None;
        let ns = &self.nodes[i - 1];
        exec_line(ns, &format!("ip route flush table {ROUTE_TABLE}"));
        exec_line(&self.switch, &format!("ip link set v-n{i} up"));
        ping_backends(ns);
        self.start_node(i, "-again");
        self.wait_established(i);
        self.wait_next_hops(NODES, Duration::from_secs(10));
    }

    /// Runs `xdplb ARGS` on every live node.
    pub fn on_every_node(&self, args: &[&str]) {
        for d in self.daemons.iter().flatten() {
            d.cli(args).unwrap();
        }
    }

    /// What node `i` knows of the flow from `client` to the VIP.
    pub fn flow(&self, i: usize, client: SocketAddr) -> serde_json::Value {
        self.daemon(i).flow(client, vip()).unwrap()
    }

    /// Node `i`, back from [`Cluster::reboot_node`], pulled at least every
    /// long-lived connection before it announced, and none of `chatter`'s
    /// connections fails in the 2 s after.
    pub fn assert_rejoined(&self, i: usize, chatter: &Chatter) {
        let pull = self.status(i)["replication"]["last_pull"].clone();
        println!("{:?} rejoin: n{i} pulled {pull}", self.mode);
        assert!(
            pull["flows"].as_u64().unwrap() >= u64::from(LONG_LIVED),
            "{pull}"
        );
        std::thread::sleep(Duration::from_secs(2));
        let (failed, longest) = chatter.summary();
        println!(
            "{:?} rejoin: {} long-lived connections failed; longest stall {longest:?}",
            self.mode,
            failed.len()
        );
        assert!(
            failed.is_empty(),
            "connections failed at rejoin: {failed:?}"
        );
    }
}

/// Node `victim` died, carrying `moved` moved pins, and BFD withdrew it
/// after `withdrawn`: that must be under 1 s, and no connection of
/// `chatter` may have failed or stalled over 1 s.
pub fn assert_loss_unnoticed(chatter: &Chatter, victim: usize, moved: usize, withdrawn: Duration) {
    let (failed, longest) = chatter.summary();
    println!(
        "node loss: BFD withdrew n{victim} after {} ms; it carried {moved} moved pins; {} of \
         {LONG_LIVED} long-lived connections failed; longest stall {longest:?}",
        withdrawn.as_millis(),
        failed.len()
    );
    assert!(withdrawn < Duration::from_secs(1), "BFD took {withdrawn:?}");
    assert!(failed.is_empty(), "connections failed: {failed:?}");
    assert_within(
        "longest stall of a connection",
        longest,
        Duration::from_secs(1),
    );
}

/// Long-lived connections in the hard case.
pub const LONG_LIVED: u16 = 60;

/// Polls `check` every 50 ms until it holds; panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "{what}: not after {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Sets up the hard case: b3 leaves every node's tables, long-lived
/// connections open (all on b1 and b2), b3 comes back. Returns the
/// chatting connections, the node carrying the most connections whose
/// pin now differs from the Maglev pick, and those connections' clients.
pub fn hard_case(c: &Cluster) -> (Chatter, usize, Vec<SocketAddr>) {
    let b3 = backend_addr(3);
    c.on_every_node(&["backend", "remove", "web", &b3]);
    let chatter = Chatter::start(c, 40000, LONG_LIVED);
    let reached: BTreeSet<&str> = chatter.backends.iter().map(String::as_str).collect();
    assert_eq!(
        reached,
        BTreeSet::from(["b1", "b2"]),
        "b3 is out of the tables"
    );
    c.on_every_node(&["backend", "add", "web", &b3]);
    wait_until("b3 active on every node", Duration::from_secs(10), || {
        (1..=NODES).all(|i| c.status(i)["backends_active"] == 3)
    });
    // Per node, the connections it carries (a local pin) whose pin is not
    // what the Maglev table would pick now.
    let moved: Vec<Vec<SocketAddr>> = (1..=NODES)
        .map(|i| {
            chatter
                .reports()
                .iter()
                .map(|r| r.client)
                .filter(|&client| {
                    let f = c.flow(i, client);
                    f["established"] == true
                        && f["replicated"] == false
                        && f["new_flow_backend"] != f["backend"]
                })
                .collect()
        })
        .collect();
    let counts: Vec<usize> = moved.iter().map(Vec::len).collect();
    println!("hard case: connections whose pin differs from the Maglev pick, per node: {counts:?}");
    let victim = (1..=NODES).max_by_key(|&i| counts[i - 1]).unwrap();
    assert!(
        counts[victim - 1] > 0,
        "no node carries a moved pin ({counts:?}): the hard case did not happen"
    );
    (chatter, victim, moved[victim - 1].clone())
}

/// Long-lived connections exchanging a line every 50 ms, each on a
/// thread of its own (a stalled one holds up no other).
pub struct Chatter {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    reports: Vec<Arc<Mutex<ChatReport>>>,
    /// The backend each connection reached ("b1"...), in opening order.
    pub backends: Vec<String>,
}

/// How one [`Chatter`] connection fares.
#[derive(Clone, Debug)]
pub struct ChatReport {
    pub client: SocketAddr,
    pub exchanges: u64,
    /// The longest time between two successful exchanges.
    pub longest_gap: Duration,
    /// The error that ended it, if any.
    pub error: Option<String>,
}

impl Chatter {
    /// Opens `n` `/stream` connections from the client, source ports
    /// `first_port..`, and starts chatting on them.
    pub fn start(cluster: &Cluster, first_port: u16, n: u16) -> Self {
        let conns: Vec<StreamConn> = cluster.client.run(|| {
            (first_port..first_port + n)
                .map(|port| StreamConn::open(vip(), Some(port), Duration::from_secs(5)).unwrap())
                .collect()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (mut threads, mut reports, mut backends) = (Vec::new(), Vec::new(), Vec::new());
        for mut conn in conns {
            let hello = conn.send_line("hello").unwrap();
            backends.push(hello.split(':').next().unwrap_or_default().to_owned());
            let report = Arc::new(Mutex::new(ChatReport {
                client: conn.local_addr().unwrap(),
                exchanges: 0,
                longest_gap: Duration::ZERO,
                error: None,
            }));
            reports.push(report.clone());
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let result = conn.send_line("ping").and_then(|reply| {
                        ensure!(reply.ends_with(": ping"), "unexpected reply {reply:?}");
                        Ok(())
                    });
                    let mut r = report.lock().unwrap();
                    if let Err(e) = result {
                        r.error = Some(format!("{e:#}"));
                        return;
                    }
                    r.exchanges += 1;
                    r.longest_gap = r.longest_gap.max(last.elapsed());
                    last = Instant::now();
                    drop(r);
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        Self {
            stop,
            threads,
            reports,
            backends,
        }
    }

    /// How every connection has fared so far, in opening order.
    pub fn reports(&self) -> Vec<ChatReport> {
        self.reports
            .iter()
            .map(|r| r.lock().unwrap().clone())
            .collect()
    }

    /// The connections that failed, and the longest gap of the others.
    pub fn summary(&self) -> (Vec<ChatReport>, Duration) {
        let reports = self.reports();
        let longest = reports
            .iter()
            .filter(|r| r.error.is_none())
            .map(|r| r.longest_gap)
            .max()
            .unwrap_or_default();
        let failed = reports.into_iter().filter(|r| r.error.is_some()).collect();
        (failed, longest)
    }
}

impl Drop for Chatter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
