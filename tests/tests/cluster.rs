//! A cluster of three xdplb nodes behind a BIRD router doing ECMP over
//! BGP with BFD, in network namespaces, with real BIRD, the real `xdplb`
//! binary attached in native XDP mode (DSR) and real TCP connections:
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
//! addresses substituted: the test proves the shipped example works.
//! Needs root and BIRD 2 (`cargo xtask setup` installs `bird2`).
//!
//! Run with `--nocapture` to see the measured figures.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use xdplb_tests::{
    bin_path,
    bird::Bird,
    client::{self, StreamConn},
    lb::{Load, Xdplb},
    netns::{unique_prefix, Netns},
    proc::Proc,
    require_root, switch,
};

const TESTBACKEND: &str = env!("CARGO_BIN_EXE_xdplb-testbackend");
const VIP: Ipv4Addr = Ipv4Addr::new(10, 88, 100, 1);
const ROUTER: &str = "10.88.0.1";
const NODES: usize = 3;
const BACKENDS: usize = 3;
const ROUTE_TABLE: u32 = 200;

fn node_addr(i: usize) -> String {
    format!("10.88.0.{}", 20 + i)
}

fn backend_addr(i: usize) -> String {
    format!("10.88.0.{}", 10 + i)
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

/// The nodes' xdplb configuration: the same services and backends on
/// every node, but listed in a different order on each (rotated by `i`),
/// which must not change the tables.
fn xdplb_conf(i: usize) -> String {
    let mut c = format!(
        "[cluster]\nroute_table = {ROUTE_TABLE}\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         port = 80\nprotocol = \"tcp\"\n\n[service.health_check]\ninterval = \"500ms\"\n\n"
    );
    for k in 0..BACKENDS {
        let b = (k + i) % BACKENDS + 1;
        c += &format!("[[service.backend]]\naddress = \"{}\"\n\n", backend_addr(b));
    }
    c
}

/// Everything the test starts; fields drop in order, processes before the
/// namespaces they run in.
struct Cluster {
    prefix: String,
    xdplb: PathBuf,
    daemons: Vec<Option<Xdplb>>,
    node_birds: Vec<Option<Bird>>,
    router_bird: Option<Bird>,
    passthrough: Vec<Proc>,
    _backend_procs: Vec<Proc>,
    client: Netns,
    router: Netns,
    nodes: Vec<Netns>,
    backends: Vec<Netns>,
    switch: Netns,
}

/// Creates a veth `port` (in `switch`, on the bridge) <-> `eth0` in `host`.
fn plug(switch: &Netns, host: &Netns, port: &str) {
    switch::plug(switch, host, port, "eth0").unwrap();
}

fn host_setup(ns: &Netns, addr: &str) {
    for scope in ["all", "default"] {
        ns.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")
            .unwrap();
    }
    ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"])
        .unwrap();
    ns.exec(&["ip", "link", "set", "eth0", "up"]).unwrap();
    ns.sysctl("net.ipv4.conf.eth0.rp_filter", "0").unwrap();
}

fn ping(from: &Netns, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while from
        .exec(&["ping", "-n", "-q", "-c1", "-W1", addr])
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "{addr} unreachable from {}",
            from.name()
        );
    }
}

impl Cluster {
    fn build() -> Self {
        let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
        let prefix = unique_prefix("cl");
        let switch = switch::new(&format!("{prefix}-sw")).unwrap();

        let router = Netns::new(&format!("{prefix}-r")).unwrap();
        plug(&switch, &router, "v-r");
        host_setup(&router, ROUTER);
        let client = Netns::new(&format!("{prefix}-c")).unwrap();
        router
            .exec(&[
                "ip",
                "link",
                "add",
                "eth1",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                client.name(),
            ])
            .unwrap();
        router
            .exec(&["ip", "addr", "add", "10.88.1.1/24", "dev", "eth1"])
            .unwrap();
        router.exec(&["ip", "link", "set", "eth1", "up"]).unwrap();
        router.sysctl("net.ipv4.ip_forward", "1").unwrap();
        // Spread flows over the next hops by 5-tuple, not address pair.
        router
            .sysctl("net.ipv4.fib_multipath_hash_policy", "1")
            .unwrap();
        host_setup(&client, "10.88.1.2");
        client
            .exec(&["ip", "route", "add", "default", "via", "10.88.1.1"])
            .unwrap();
        // XDP bounces the client's frames as they are: no checksum left to
        // offload (a real NIC's frames always carry full checksums).
        for (ns, dev) in [(&client, "eth0"), (&router, "eth0"), (&router, "eth1")] {
            ns.exec(&["ethtool", "-K", dev, "tx", "off"]).unwrap();
        }

        let mut nodes = Vec::new();
        for i in 1..=NODES {
            let ns = Netns::new(&format!("{prefix}-n{i}")).unwrap();
            plug(&switch, &ns, &format!("v-n{i}"));
            host_setup(&ns, &node_addr(i));
            ns.sysctl("net.ipv4.ip_forward", "0").unwrap();
            nodes.push(ns);
        }
        let mut backends = Vec::new();
        for i in 1..=BACKENDS {
            let ns = Netns::new(&format!("{prefix}-b{i}")).unwrap();
            plug(&switch, &ns, &format!("v-b{i}"));
            for scope in ["all", "eth0"] {
                ns.sysctl(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1")
                    .unwrap();
                ns.sysctl(&format!("net.ipv4.conf.{scope}.arp_announce"), "2")
                    .unwrap();
            }
            host_setup(&ns, &backend_addr(i));
            ns.exec(&["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"])
                .unwrap();
            ns.exec(&["ip", "route", "add", "default", "via", ROUTER])
                .unwrap();
            backends.push(ns);
        }
        let mut cluster = Cluster {
            prefix,
            xdplb,
            daemons: Vec::new(),
            node_birds: Vec::new(),
            router_bird: None,
            passthrough: Vec::new(),
            _backend_procs: Vec::new(),
            client,
            router,
            nodes,
            backends,
            switch,
        };
        cluster.start();
        cluster
    }

    fn start(&mut self) {
        for (i, ns) in self.backends.iter().enumerate() {
            let name = format!("b{}", i + 1);
            let mut cmd = ns.command(TESTBACKEND);
            cmd.args(["--name", &name, "--port", "80"]);
            let mut p = Proc::spawn_with(&mut cmd, &name, false).unwrap();
            p.wait_for_stdout_line("listening", Duration::from_secs(10))
                .unwrap();
            self._backend_procs.push(p);
        }
        for (i, ns) in self.nodes.iter().enumerate() {
            // XDP_TX on a veth needs an XDP program on its peer.
            let mut cmd = self.switch.command(&self.xdplb);
            cmd.args(["pass-through", "--iface", &format!("v-n{}", i + 1)]);
            let mut p = Proc::spawn_with(&mut cmd, "pass-through", false).unwrap();
            p.wait_for_stdout_line("ready", Duration::from_secs(10))
                .unwrap();
            self.passthrough.push(p);
            for b in 1..=BACKENDS {
                ping(ns, &backend_addr(b));
            }
        }
        ping(&self.client, ROUTER);
        self.router_bird = Some(
            Bird::start(
                &self.router,
                &format!("{}-r", self.prefix),
                &router_bird_conf(),
            )
            .unwrap(),
        );
        for i in 1..=NODES {
            let ns = &self.nodes[i - 1];
            let tag = format!("{}-n{i}", self.prefix);
            let daemon = Xdplb::start_in(&self.xdplb, ns, &["eth0"], &tag, &xdplb_conf(i))
                .expect("starting xdplb");
            self.daemons.push(Some(daemon));
            let bird = Bird::start(ns, &tag, &node_bird_conf(i)).unwrap();
            self.node_birds.push(Some(bird));
        }
        let router = self.router_bird.as_ref().unwrap();
        for i in 1..=NODES {
            router
                .wait_established(&format!("n{i}"), Duration::from_secs(20))
                .unwrap();
        }
    }

    fn daemon(&self, i: usize) -> &Xdplb {
        self.daemons[i - 1].as_ref().expect("node is alive")
    }

    /// The router's next hops for the VIP.
    fn next_hops(&self) -> Vec<String> {
        let out = self
            .router
            .exec(&["ip", "-j", "route", "show", &format!("{VIP}/32")])
            .unwrap();
        let routes: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_default();
        let Some(route) = routes.as_array().and_then(|r| r.first()) else {
            return Vec::new();
        };
        match route["nexthops"].as_array() {
            Some(hops) => hops
                .iter()
                .filter_map(|h| h["gateway"].as_str().map(str::to_owned))
                .collect(),
            None => route["gateway"]
                .as_str()
                .map(|g| vec![g.to_owned()])
                .unwrap_or_default(),
        }
    }

    /// Polls the router's route every 5 ms until it has `n` next hops;
    /// returns how long that took.
    fn wait_next_hops(&self, n: usize, timeout: Duration) -> Duration {
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

    /// Node `i`'s count of new flows (DSR picks).
    fn new_flows(&self, i: usize) -> u64 {
        let stats = self.daemon(i).json(&["stats"]).unwrap();
        stats["reasons"]["flow_new"].as_u64().unwrap()
    }

    /// Routes in node `i`'s table 200.
    fn table(&self, i: usize) -> String {
        self.nodes[i - 1]
            .exec(&["ip", "route", "show", "table", &ROUTE_TABLE.to_string()])
            .unwrap()
    }
}

/// Failures among `samples`, as (source port, error).
fn failures(samples: &[xdplb_tests::lb::Sample]) -> Vec<(u16, String)> {
    samples
        .iter()
        .filter_map(|s| s.result.as_ref().err().map(|e| (s.port, e.clone())))
        .collect()
}

#[test]
fn three_nodes_behind_ecmp_spread_leave_and_survive_a_node_loss() {
    require_root();
    assert!(
        xdplb_tests::which("bird") && xdplb_tests::which("birdc"),
        "BIRD 2 is needed (apt-get install bird2, or cargo xtask setup)"
    );
    let mut c = Cluster::build();
    let vip = SocketAddr::new(IpAddr::V4(VIP), 80);

    // Every node announces; the router has one route with three next hops.
    c.wait_next_hops(NODES, Duration::from_secs(20));
    let mut hops = c.next_hops();
    hops.sort();
    assert_eq!(hops, (1..=NODES).map(node_addr).collect::<Vec<_>>());
    for i in 1..=NODES {
        let status = c.daemon(i).json(&["status"]).unwrap();
        assert_eq!(status["cluster"]["state"], "announcing", "n{i}: {status}");
        assert_eq!(status["cluster"]["announced"][0], VIP.to_string(), "n{i}");
    }

    // Identical tables although each node lists the backends in another
    // order.
    let prints: Vec<String> = (1..=NODES)
        .map(|i| {
            let status = c.daemon(i).json(&["status"]).unwrap();
            status["fingerprints"]["web"].as_str().unwrap().to_owned()
        })
        .collect();
    println!("table fingerprints: {prints:?}");
    assert!(
        prints.iter().all(|p| *p == prints[0] && p.len() == 8),
        "{prints:?}"
    );

    // Spread: 300 connections, every node carries at least 15 %.
    let before: Vec<u64> = (1..=NODES).map(|i| c.new_flows(i)).collect();
    let failed: Vec<(u16, String)> = c.client.run(|| {
        (20000u16..20300)
            .filter_map(|port| {
                client::get(vip, Some(port), Duration::from_secs(3))
                    .err()
                    .map(|e| (port, format!("{e:#}")))
            })
            .collect()
    });
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    let carried: Vec<u64> = (1..=NODES)
        .map(|i| c.new_flows(i) - before[i - 1])
        .collect();
    println!("spread of 300 connections over the nodes (new flows per node): {carried:?}");
    assert_eq!(carried.iter().sum::<u64>(), 300, "{carried:?}");
    for (i, n) in carried.iter().enumerate() {
        assert!(
            *n >= 45,
            "node n{} carried {n} of 300 (< 15 %): {carried:?}",
            i + 1
        );
    }

    // Graceful leave of n3 under a steady load: zero failed requests.
    let load = Load::start_in(&c.client, vip, Duration::from_millis(10), 30000).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let left = c
        .daemon(3)
        .json(&["cluster", "leave", "--quiet", "2"])
        .unwrap();
    println!("n3 cluster leave: {left}");
    assert_eq!(c.next_hops().len(), NODES - 1, "the router dropped n3");
    assert!(
        !c.table(3).contains(&VIP.to_string()),
        "n3 withdrew its route"
    );
    let status = c.daemon(3).json(&["status"]).unwrap();
    assert_eq!(status["cluster"]["state"], "left", "{status}");
    assert_eq!(
        status["cluster"]["withheld"][0],
        VIP.to_string(),
        "{status}"
    );
    let text = c.daemon(3).cli(&["status"]).unwrap();
    assert!(
        text.contains(&format!("cluster:     left in table 200; withheld: {VIP}")),
        "{text}"
    );
    let flows = c.new_flows(3);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.new_flows(3), flows, "no new flows reach a node that left");
    let samples = load.stop();
    let failed = failures(&samples);
    println!(
        "graceful leave: {} requests during the leave, {} failed",
        samples.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed during the leave: {failed:?}"
    );
    c.daemon(3).cli(&["cluster", "join"]).unwrap();
    c.wait_next_hops(NODES, Duration::from_secs(10));

    // Node loss: long-lived connections, a steady load, then n2 vanishes.
    let mut long: Vec<StreamConn> = c.client.run(|| {
        (40000u16..40030)
            .map(|port| {
                let mut s = StreamConn::open(vip, Some(port), Duration::from_secs(5)).unwrap();
                s.send_line("hello").unwrap();
                s
            })
            .collect()
    });
    let load = Load::start_in(&c.client, vip, Duration::from_millis(10), 45000).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // A SIGKILLed daemon leaves its route: BIRD still announces n2.
    let mut daemon = c.daemons[1].take().unwrap();
    daemon.proc.kill(libc::SIGKILL).unwrap();
    let _ = daemon.proc.wait_timeout(Duration::from_secs(5));
    assert!(
        c.table(2).contains(&VIP.to_string()),
        "route kept after SIGKILL"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.next_hops().len(),
        NODES,
        "a killed daemon is not withdrawn"
    );
    // The host dies: link cut first, then BIRD killed (a killed BIRD's
    // kernel would otherwise close the BGP session, which the router
    // notices at once: that would not measure BFD).
    c.switch
        .exec(&["ip", "link", "set", "v-n2", "down"])
        .unwrap();
    let cut = Instant::now();
    c.node_birds[1].as_mut().unwrap().kill().unwrap();
    let withdrawn = c.wait_next_hops(NODES - 1, Duration::from_secs(5));
    println!(
        "node loss: BFD withdrew n2 after {} ms",
        withdrawn.as_millis()
    );
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.stop();
    let failed = failures(&samples);
    println!(
        "node loss: {} new connections around the loss, {} failed",
        samples.len(),
        failed.len()
    );
    // New connections may fail only while the router still sends to n2:
    // those started from one client timeout (2 s) before the cut until the
    // withdrawal, plus 0.5 s for the router's cached neighbour/route.
    let window =
        (cut - Duration::from_millis(2500))..(cut + withdrawn + Duration::from_millis(500));
    let outside = failures(
        &samples
            .into_iter()
            .filter(|s| !window.contains(&s.start))
            .collect::<Vec<_>>(),
    );
    let broken: Vec<String> = long
        .iter_mut()
        .enumerate()
        .filter_map(|(k, s)| s.send_line("after").err().map(|e| format!("#{k}: {e:#}")))
        .collect();
    println!(
        "node loss: {} of {} long-lived connections broken",
        broken.len(),
        long.len()
    );
    assert!(
        withdrawn < Duration::from_secs(1),
        "BFD took {withdrawn:?} to withdraw the lost node"
    );
    assert!(
        broken.is_empty(),
        "long-lived connections broken: {broken:?}"
    );
    assert!(
        outside.is_empty(),
        "new connections failed outside the withdrawal window: {outside:?}"
    );
    drop(daemon);

    // Ctrl-C detaches the datapath: the route goes first.
    c.daemons[0].as_mut().unwrap().interrupt().unwrap();
    assert!(
        !c.table(1).contains(&VIP.to_string()),
        "route withdrawn on SIGINT"
    );
    c.wait_next_hops(1, Duration::from_secs(5));
    assert_eq!(c.next_hops(), [node_addr(3)]);
}
