//! End to end in veth namespaces: the demo topology (client, load balancer,
//! three backends running a real HTTP server with the VIP on loopback, one
//! L2 segment), the real `xdplb` binary attached in native XDP mode, and
//! real TCP connections from the client. Needs root.

use std::{net::SocketAddr, path::Path};

use xdp_common::Reason;
use xdplb::dataplane::Maps;
use xdplb_tests::{
    bin_path,
    lb::{dsr_config, requests, start_backends, Xdplb},
    require_root,
    topology::{Shape, Topology},
};

const TESTBACKEND: &str = env!("CARGO_BIN_EXE_xdplb-testbackend");

#[test]
fn dsr_balances_real_connections_over_ipv4_and_ipv6() {
    require_root();
    let xdplb_bin = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let mut topo = Topology::new(Shape::Dsr, "e2e", 3).expect("building the topology");
    topo.enable_xdp_tx(&xdplb_bin)
        .expect("pass-through on the lb's peer");
    let _backends = start_backends(&topo, Path::new(TESTBACKEND)).expect("starting backends");
    topo.wait_reachable().expect("segment reachable");
    let lb = Xdplb::start(&xdplb_bin, &topo, &dsr_config(&topo)).expect("starting xdplb");

    // 300 connections from varied source ports, IPv4.
    let vip4 = topo.vip4().into();
    let tally = requests(&topo, vip4, 30000..30300);
    assert!(
        tally.failed.is_empty(),
        "failed connections: {:?}",
        tally.failed
    );
    assert_eq!(tally.ok(), 300);
    for i in 1..=3 {
        let n = tally
            .served
            .get(&topo.backend_name(i))
            .copied()
            .unwrap_or(0);
        let share = n as f64 / 300.0;
        assert!(
            (0.20..=0.47).contains(&share),
            "backend b{i} served {n}/300: {:?}",
            tally.served
        );
    }

    // The same source port reaches the same backend again, and `xdplb flow`
    // names that backend.
    for port in [30000u16, 30001, 30002, 30150, 30299] {
        let first = requests(&topo, vip4, port..port + 1);
        let again = requests(&topo, vip4, port..port + 1);
        assert_eq!(first.served, again.served, "source port {port}");
        let served_by = first.served.keys().next().unwrap().clone();
        let i: usize = served_by[1..].parse().unwrap();
        let src = SocketAddr::new(topo.client_addr(false), port);
        let answer = lb.flow(src, SocketAddr::new(vip4, 80)).unwrap();
        assert_eq!(
            answer["backend"],
            format!("{}:80", topo.backend_addr(i, false)),
            "xdplb flow says {answer}, served by {served_by}"
        );
        assert_eq!(answer["established"], true, "{answer}");
    }

    // IPv6 VIP.
    let tally6 = requests(&topo, topo.vip6().into(), 31000..31060);
    assert!(
        tally6.failed.is_empty(),
        "failed IPv6 connections: {:?}",
        tally6.failed
    );
    assert_eq!(
        tally6.served.len(),
        3,
        "all backends used over IPv6: {:?}",
        tally6.served
    );

    // The traffic went through XDP, not the kernel's forwarding.
    let maps = Maps::open_pinned(&lb.pin_dir).unwrap();
    let tx = maps.reason_count(Reason::Tx).unwrap();
    assert!(
        tx >= 2 * 370,
        "XDP_TX count {tx}: every client packet to the VIP is forwarded by XDP"
    );
    assert_eq!(maps.reason_count(Reason::PassNoNeigh).unwrap(), 0);
    drop(maps);

    // Ctrl-C (SIGINT) detaches and removes the pins.
    let mut lb = lb;
    lb.interrupt().unwrap();
    assert!(!lb.pin_dir.exists(), "pins removed");
    let link = topo
        .lb()
        .exec(&["ip", "link", "show", "dev", "eth0"])
        .unwrap();
    assert!(!link.contains("xdp"), "XDP detached: {link}");
}
