//! The veth testbeds themselves, without a load balancer: namespaces are
//! entered and removed, and the DSR topology carries traffic between the
//! client and the test backends directly. Needs root.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use xdplb_tests::{
    client,
    lb::start_backend,
    netns::{self, exec_line, unique_prefix, Netns},
    topology::{Shape, Topology},
};

/// Routes the client's traffic for the VIPs via `via(v6)`.
fn route_vips(topo: &Topology, via: impl Fn(bool) -> IpAddr) {
    for (v6, family, len) in [(false, "-4", 32), (true, "-6", 128)] {
        let (vip, via) = (format!("{}/{len}", topo.vip(v6)), via(v6).to_string());
        let route = ["ip", family, "route", "replace", &vip, "via", &via];
        topo.client().exec(&route).unwrap();
    }
}

/// Builds the topology, runs a test backend in each backend namespace
/// and talks to each directly (no load balancer), then checks teardown
/// leaves no namespace behind.
#[test]
fn topology_smoke() {
    xdplb_tests::require_root();
    let backend_bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_xdplb-testbackend"));
    let names: Vec<String>;
    {
        let topo = Topology::new(Shape::Dsr, "smoke", 3).unwrap();
        names = topo
            .namespaces()
            .iter()
            .map(|n| n.name().to_owned())
            .collect();
        let listed = netns::list().unwrap();
        for n in &names {
            assert!(
                listed.contains(n),
                "{n} missing from ip netns list: {listed:?}"
            );
        }

        let procs: Vec<_> = (1..=topo.backend_count())
            .map(|i| start_backend(&topo, &backend_bin, i, &["--udp-port", "53"]).unwrap())
            .collect();

        topo.wait_reachable().unwrap();
        // The lb must have learned the backends' MACs from the pings.
        let neigh = exec_line(topo.lb(), "ip neigh show dev eth0");
        for i in 1..=topo.backend_count() {
            let mac = topo.backend(i).mac("eth0").unwrap();
            assert!(
                neigh.contains(&mac),
                "lb neighbour table lacks b{i} ({mac}):\n{neigh}"
            );
        }
        let forwarding = exec_line(topo.lb(), "sysctl -n net.ipv4.ip_forward");
        assert_eq!(forwarding.trim(), "0");

        let timeout = Duration::from_secs(5);
        // GET http://addr/ (from `port` if given) and a UDP query to addr:53,
        // from the client.
        let get = |addr, port| {
            let get = || client::get(SocketAddr::new(addr, 80), port, timeout);
            topo.client().run(get).unwrap()
        };
        let udp = |addr| {
            let query = || client::udp_query(SocketAddr::new(addr, 53), None, timeout);
            topo.client().run(query).unwrap()
        };
        for i in 1..=topo.backend_count() {
            let want = topo.backend_name(i);
            for addr in [false, true].map(|v6| topo.backend_addr(i, v6)) {
                assert_eq!(get(addr, None), want, "GET http://{addr}/");
                // Same source port twice in a row: the RST close must
                // leave no TIME_WAIT blocking the 4-tuple.
                for _ in 0..2 {
                    let got = get(addr, Some(40000 + i as u16));
                    assert_eq!(got, want, "GET http://{addr}/ from fixed port");
                }
                assert_eq!(udp(addr), want, "UDP {addr}:53");
            }
            // Keep-alive and the /stream echo on one connection each.
            let addr = SocketAddr::new(topo.backend_addr(i, true), 80);
            let mut conn = topo
                .client()
                .run(|| client::Conn::connect(addr, None, timeout))
                .unwrap();
            for _ in 0..3 {
                assert_eq!(conn.get("/").unwrap(), want);
            }
            let mut stream = topo
                .client()
                .run(|| client::StreamConn::open(addr, None, timeout))
                .unwrap();
            for n in 0..3 {
                assert_eq!(
                    stream.send_line(&format!("hello {n}")).unwrap(),
                    format!("{want}: hello {n}")
                );
            }
        }

        // Without a load balancer the VIP leads nowhere: the lb does not
        // forward, and backends must not answer ARP for it.
        let vip = SocketAddr::new(topo.vip(false), 80);
        let res = topo
            .client()
            .run(|| client::get(vip, None, Duration::from_millis(500)));
        assert!(
            res.is_err(),
            "VIP answered without a load balancer: {res:?}"
        );
        let arp = exec_line(topo.client(), &format!("ip neigh show {}", topo.vip4()));
        assert!(
            arp.trim().is_empty(),
            "client resolved the VIP itself: {arp}"
        );

        // Emulate the load balancer's job without XDP: route the VIPs
        // from the client straight to one backend's address, so frames
        // for the VIP reach that backend's MAC unchanged, as DSR
        // delivers them. The backend must accept them (VIP on lo) and
        // answer from the VIP, for TCP and UDP.
        for i in [1, topo.backend_count()] {
            let want = topo.backend_name(i);
            route_vips(&topo, |v6| topo.backend_addr(i, v6));
            for vip in [false, true].map(|v6| topo.vip(v6)) {
                assert_eq!(get(vip, None), want, "GET http://{vip}/ routed to b{i}");
                assert_eq!(udp(vip), want, "UDP {vip}:53 routed to b{i}");
            }
        }
        route_vips(&topo, |v6| topo.lb_addr(v6));

        drop(procs);
    }
    let listed = netns::list().unwrap();
    for n in &names {
        assert!(!listed.contains(n), "{n} left behind: {listed:?}");
    }
}

#[test]
fn run_enters_namespace_and_propagates_panics() {
    xdplb_tests::require_root();
    let ns = Netns::new(&unique_prefix("run")).unwrap();
    // A fresh namespace has only lo. (/proc/thread-self, not
    // /proc/self: the latter shows the main thread's namespace.)
    let links = ns.run(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap());
    assert!(!links.contains("eth0") && links.contains("lo:"), "{links}");
    // Programs started via command() are in the namespace but keep the
    // host's mounts, so the real bpffs stays visible.
    let links = ns.exec(&["ip", "-o", "link"]).unwrap();
    assert_eq!(links.lines().count(), 1, "{links}");
    let fs_type = |cmd: &mut std::process::Command| {
        let out = cmd
            .args(["-f", "-c", "%T", "/sys/fs/bpf"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let host = fs_type(&mut std::process::Command::new("stat"));
    if host == "bpf_fs" {
        assert_eq!(fs_type(&mut ns.command("stat")), "bpf_fs");
    }
    let caught =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ns.run(|| panic!("boom"))));
    assert!(caught.is_err());
    let err = ns.exec(&["ip", "link", "show", "nope0"]).unwrap_err();
    assert!(format!("{err:#}").contains("ip link show nope0"), "{err:#}");
    let name = ns.name().to_owned();
    drop(ns);
    assert!(!netns::list().unwrap().contains(&name));
}
