//! End to end in veth namespaces: the demo topology (client, load balancer,
//! three backends running a real HTTP server with the VIP on loopback, one
//! L2 segment), the real `xdplb` binary attached in native XDP mode, and
//! real TCP connections from the client. Needs root.

use std::net::SocketAddr;

use xdp_common::Reason;
use xdplb::dataplane::Maps;
use xdplb_tests::{bed::Bed, lb::dsr_config, traffic::requests};

#[test]
fn dsr_balances_real_connections_over_ipv4_and_ipv6() {
    let mut bed = Bed::dsr("e2e", 3, dsr_config);

    // 300 connections from varied source ports, IPv4.
    let tally = bed.requests(30000..30300);
    assert!(
        tally.failed.is_empty(),
        "failed connections: {:?}",
        tally.failed
    );
    assert_eq!(tally.ok(), 300);
    for i in 1..=3 {
        let n = tally.count(&bed.topo.backend_name(i));
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
        let (first, again) = (bed.requests(port..port + 1), bed.requests(port..port + 1));
        assert_eq!(first.served, again.served, "source port {port}");
        let served_by = first.served.keys().next().unwrap().clone();
        let i: usize = served_by[1..].parse().unwrap();
        let src = SocketAddr::new(bed.topo.client_addr(false), port);
        let answer = bed.lb.flow(src, bed.vip()).unwrap();
        assert_eq!(
            answer["backend"],
            format!("{}:80", bed.addr(i)),
            "xdplb flow says {answer}, served by {served_by}"
        );
        assert_eq!(answer["established"], true, "{answer}");
    }

    // IPv6 VIP.
    let vip6 = SocketAddr::new(bed.topo.vip6().into(), 80);
    let tally6 = requests(bed.topo.client(), vip6, 31000..31060);
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
    let maps = Maps::open_pinned(&bed.lb.pin_dir).unwrap();
    let tx = maps.reason_count(Reason::Tx).unwrap();
    assert!(
        tx >= 2 * 370,
        "XDP_TX count {tx}: every client packet to the VIP is forwarded by XDP"
    );
    assert_eq!(maps.reason_count(Reason::PassNoNeigh).unwrap(), 0);
    drop(maps);

    // Ctrl-C (SIGINT) detaches and removes the pins.
    bed.lb.interrupt().unwrap();
    assert!(!bed.lb.pin_dir.exists(), "pins removed");
    let link = bed.lb_link();
    assert!(!link.contains("xdp"), "XDP detached: {link}");
}
