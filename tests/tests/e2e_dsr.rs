//! End to end in veth namespaces: the demo topology (client, load balancer,
//! three backends running a real HTTP server with the VIP on loopback, one
//! L2 segment), the real `xdplb` binary attached in native XDP mode, and
//! real TCP connections from the client; and path MTU discovery through DSR,
//! with the client namespace as the router in front of a narrower link.
//! Needs root.

use std::{net::SocketAddr, time::Duration};

use xdp_common::Reason;
use xdplb::dataplane::Maps;
use xdplb_tests::{
    bed::Bed,
    lb::dsr_config,
    netns::{exec_line, unique_prefix, Netns},
    traffic::{download, pattern_sha256, requests},
};

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

/// Path MTU discovery through DSR. A backend answers from the VIP, so a
/// router that cannot forward its full-sized replies sends "fragmentation
/// needed" / "packet too big" to the VIP, that is to the load balancer,
/// which must pass it on to the backend: else the download stalls in a
/// black hole. Here the client namespace is that router: a far client sits
/// behind it on a 1400-byte link and advertises the MSS of a 1500-byte
/// path (as a client behind a tunnel does when nothing clamps the MSS).
#[test]
fn path_mtu_discovery_reaches_dsr_backends() {
    let bed = Bed::dsr("dmtu", 1, dsr_config);
    let (router, b1) = (bed.topo.client(), bed.topo.backend(1));
    let far = Netns::new(&format!("{}-far", unique_prefix("dmtu"))).unwrap();
    let far_name = far.name();
    for (ns, line) in [
        (
            router,
            format!("ip link add narrow type veth peer name eth0 netns {far_name}"),
        ),
        (router, "ip link set narrow mtu 1400 up".into()),
        (router, "ip addr add 10.77.200.1/24 dev narrow".into()),
        (router, "ip addr add fd77:200::1/64 dev narrow nodad".into()),
        (router, "sysctl -qw net.ipv4.ip_forward=1".into()),
        (router, "sysctl -qw net.ipv6.conf.all.forwarding=1".into()),
        (&far, "ip link set eth0 mtu 1400 up".into()),
        (&far, "ip addr add 10.77.200.2/24 dev eth0".into()),
        (&far, "ip addr add fd77:200::2/64 dev eth0 nodad".into()),
        (
            &far,
            "ip route add default via 10.77.200.1 advmss 1460".into(),
        ),
        (
            &far,
            "ip -6 route add default via fd77:200::1 advmss 1440".into(),
        ),
        (b1, "ip route add 10.77.200.0/24 via 10.77.0.1".into()),
        (b1, "ip -6 route add fd77:200::/64 via fd77::1".into()),
    ] {
        exec_line(ns, &line);
    }
    let n = 4 << 20;
    let want = pattern_sha256(n).unwrap();
    for (v6, far_addr) in [(false, "10.77.200.2"), (true, "fd77:200::2")] {
        let vip = SocketAddr::new(bed.topo.vip(v6), 80);
        // A stalled download fails at its 30 s read timeout.
        let got = far.run(|| download(vip, n, Duration::from_secs(30)));
        let got = got.unwrap_or_else(|e| panic!("{vip}: {e:#}\n{}", bed.lb.stats_text()));
        assert_eq!(got.sha256, want, "{vip}: the download arrived changed");
        let route = exec_line(b1, &format!("ip route get {far_addr}"));
        assert!(
            route.contains("mtu 1400"),
            "{vip}: b1 learned the path MTU: {route}"
        );
    }
    let maps = Maps::open_pinned(&bed.lb.pin_dir).unwrap();
    let forwarded = maps.reason_count(Reason::DsrIcmp).unwrap();
    assert!(forwarded >= 2, "ICMP errors sent to b1: {forwarded}");
}
