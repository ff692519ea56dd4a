//! NAT-mode packet fixtures through the real compiled XDP program
//! (BPF_PROG_TEST_RUN), in the style of `fixtures.rs`: the test programs the
//! maps itself (NAT services, backends with an SNAT address, the globals),
//! runs frames built by the test kit's frame builder, and compares each output
//! frame with an expected frame it also built from scratch.
//!
//! Every checksum of every output frame is verified a second way by
//! [`verify`]: the IPv4 header, TCP and UDP (pseudo-header included), ICMP
//! and ICMPv6 (pseudo-header included) checksums are recomputed from scratch
//! over the output bytes, inner (quoted) headers of ICMP errors too. Nothing
//! here shares code with the datapath's incremental updates.
//!
//! BPF_PROG_TEST_RUN runs the program as if the frame had been received on
//! loopback (ifindex 1), so backends get ifindex 1 and forwards are XDP_TX.
//! Needs root (BPF).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use xdp_common::{
    Backend, FlowKey, NatFwd, NatRev, Reason, SnatPool, BACKEND_ACTIVE, BACKEND_DOWN,
    NAT_F_ANSWERED, NAT_F_CLOSING, NAT_F_REFUSED, NAT_F_REPLICATED, NAT_UNANSWERED_TIMEOUT_S,
    PROTO_TCP, PROTO_UDP, SVC_F_NAT_RETRY,
};
use xdplb::{addr, dataplane::monotonic_coarse_ns};
use xdplb_tests::{
    datapath::{
        nat_service, TestDatapath, Timeouts, DEFAULT_TIMEOUTS, LO_IFINDEX, TABLE_SIZE, XDP_DROP,
        XDP_PASS, XDP_TX,
    },
    frame::{self, verify, Seg},
    netns::{unique_prefix, Netns},
};

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// The load balancer's MAC on the clients' side (the frames' destination).
const LB_MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
/// Its MAC on the backends' side (`Backend::src_mac`): deliberately not
/// the same, so a reply that took the wrong one shows.
const LB_MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

const VIP4: &str = "10.0.100.1";
const VIP6: &str = "fd00:100::1";
const SNAT4: &str = "10.0.1.1";
const SNAT6: &str = "fd00:1::1";
const BACKEND4: &str = "10.0.1.11";
const BACKEND6: &str = "fd00:1::11";
const ROUTER4: &str = "10.0.2.254";
const ROUTER6: &str = "fd00:2::fe";

/// The default timeouts of the configuration: 1h, 10s, 60s.
const TCP_TIMEOUT: u32 = DEFAULT_TIMEOUTS.tcp;
const UDP_TIMEOUT: u32 = DEFAULT_TIMEOUTS.udp;

fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x01, id as u8]
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------- harness

/// The shared datapath harness with NAT enabled and this file's backends
/// and services.
struct Harness {
    dp: TestDatapath,
}

impl Harness {
    fn new() -> Self {
        let mut dp = TestDatapath::load("natfix").expect("loading the XDP program");
        // Both of the load balancer's MACs are "for us" on loopback.
        dp.accept_macs(&[(LO_IFINDEX, LB_MAC_A)], &[LB_MAC_B])
            .unwrap();
        dp.set_nat_enabled(true).unwrap();
        Self { dp }
    }

    fn set_nat_enabled(&mut self, on: bool) {
        self.dp.set_nat_enabled(on).unwrap();
    }

    /// Backend `id` at `addr:port`, seen from the load balancer's `snat`
    /// address, reached over "loopback" (XDP_TX).
    fn set_backend(&mut self, id: u32, service: u32, addr: &str, port: u16, snat: &str) {
        let b = Backend {
            addr: addr::to_words(ip(addr)),
            dst_mac: backend_mac(id),
            src_mac: LB_MAC_B,
            ifindex: LO_IFINDEX,
            state: BACKEND_ACTIVE,
            snat_addr: addr::to_words(ip(snat)),
            service,
            port_be: port.to_be(),
            _pad: [0; 2],
        };
        self.dp.set_backend(id, b).unwrap();
    }

    /// A NAT service `id` at `vip:port/proto` whose table holds `members`
    /// (repeated to fill it), translating to source ports
    /// `ports.0 .. ports.0 + ports.1`.
    #[expect(clippy::too_many_arguments, reason = "one service row, spelled out")]
    fn set_service(
        &mut self,
        id: u32,
        vip: &str,
        port: u16,
        proto: u8,
        members: &[u32],
        ports: (u16, u16),
        t: Timeouts,
    ) {
        let svc = nat_service(id, id * 2 * TABLE_SIZE, TABLE_SIZE, ports, t);
        let vip = SocketAddr::new(ip(vip), port);
        self.dp.set_service(vip, proto, svc, members).unwrap();
    }

    /// The standard setup: NAT services on port 80 (TCP) and 53 (UDP) of
    /// an IPv4 and an IPv6 VIP, each with one backend on another port
    /// (8080, 5353), default port range and timeouts.
    fn standard() -> Self {
        let mut h = Self::new();
        let rows = [
            (VIP4, 80, PROTO_TCP, BACKEND4, 8080, SNAT4),
            (VIP4, 53, PROTO_UDP, BACKEND4, 5353, SNAT4),
            (VIP6, 80, PROTO_TCP, BACKEND6, 8080, SNAT6),
            (VIP6, 53, PROTO_UDP, BACKEND6, 5353, SNAT6),
        ];
        for (id, (vip, port, proto, backend, backend_port, snat)) in (0..).zip(rows) {
            h.set_backend(id, id, backend, backend_port, snat);
            let ports = (20000, 40000);
            h.set_service(id, vip, port, proto, &[id], ports, DEFAULT_TIMEOUTS);
        }
        h
    }

    /// One UDP NAT service, VIP4:53 to BACKEND4:5353, with a single source
    /// port (32000) and a 1 s UDP timeout.
    fn one_udp_port() -> Self {
        let mut h = Self::new();
        h.set_backend(0, 0, BACKEND4, 5353, SNAT4);
        let t = Timeouts {
            udp: 1,
            ..DEFAULT_TIMEOUTS
        };
        h.set_service(0, VIP4, 53, PROTO_UDP, &[0], (32000, 1), t);
        h
    }

    /// Runs the program on `input`: (verdict, output frame).
    fn run(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        self.dp.run(input).unwrap()
    }

    fn reason(&self, r: Reason) -> u64 {
        self.dp.reason(r).unwrap()
    }

    /// Makes the flow `client -> vip` look `by` older in both NAT tables,
    /// as if its last packets had passed that much earlier: the tests age
    /// entries through the maps instead of sleeping past a timeout.
    fn age(&mut self, client: SocketAddr, vip: SocketAddr, proto: u8, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap();
        let maps = &mut self.dp.maps;
        let key = addr::flow_key(client, vip, proto);
        let mut fwd = maps.nat_fwd.get(&key, 0).expect("a NAT_FWD entry to age");
        fwd.last_seen_ns -= by;
        maps.nat_fwd.insert(key, fwd, 0).unwrap();
        let b = maps.backend(fwd.backend).unwrap();
        let backend = SocketAddr::new(addr::from_words(b.addr), u16::from_be(b.port_be));
        let snat = SocketAddr::new(addr::from_words(b.snat_addr), u16::from_be(fwd.nat_port_be));
        let key = addr::flow_key(backend, snat, proto);
        let mut rev = maps.nat_rev.get(&key, 0).expect("a NAT_REV entry to age");
        rev.last_seen_ns -= by;
        maps.nat_rev.insert(key, rev, 0).unwrap();
    }

    /// NAT_FWD entry of the client's flow.
    fn fwd(&self, client: SocketAddr, vip: SocketAddr, proto: u8) -> Option<NatFwd> {
        self.dp
            .maps
            .nat_fwd
            .get(&addr::flow_key(client, vip, proto), 0)
            .ok()
    }

    /// NAT_REV entry of the backend's replies to `snat`.
    fn rev(&self, backend: SocketAddr, snat: SocketAddr, proto: u8) -> Option<NatRev> {
        self.dp
            .maps
            .nat_rev
            .get(&addr::flow_key(backend, snat, proto), 0)
            .ok()
    }

    /// Sends the client's `seg` through; it must be translated to `backend`
    /// (id `id`) from the SNAT address `snat`: returns the allocated port,
    /// after checking the output byte for byte and its checksums.
    fn forward(
        &mut self,
        what: &str,
        seg: &Seg,
        id: u32,
        backend: SocketAddr,
        snat: IpAddr,
    ) -> u16 {
        let (verdict, out) = self.run(&seg.frame(LB_MAC_A, CLIENT_MAC));
        assert_eq!(
            verdict,
            XDP_TX,
            "{what}: verdict (output:\n{})",
            frame::hex(&out)
        );
        let f = self
            .fwd(seg.src, seg.dst, seg.proto)
            .unwrap_or_else(|| panic!("{what}: no NAT_FWD entry"));
        assert_eq!(f.backend, id, "{what}: NAT_FWD backend");
        let port = u16::from_be(f.nat_port_be);
        let expected = seg
            .between(SocketAddr::new(snat, port), backend)
            .frame(backend_mac(id), LB_MAC_B);
        assert_eq!(
            frame::hex(&out),
            frame::hex(&expected),
            "{what}: output frame (translated to port {port})"
        );
        let checks = verify(what, &out);
        let l4 = if seg.proto == PROTO_TCP {
            "TCP"
        } else if seg.no_udp_checksum {
            "UDP without checksum"
        } else {
            "UDP"
        };
        let expect_checks: Vec<&str> = if seg.src.is_ipv4() {
            vec!["IPv4 header", l4]
        } else {
            vec![l4]
        };
        assert_eq!(checks, expect_checks, "{what}: checksums verified");
        port
    }

    /// Sends the backend's `seg` (backend -> snat:port) through; it must
    /// reach the client as `vip -> client`, checked byte for byte.
    fn reverse(&mut self, what: &str, seg: &Seg, id: u32, vip: SocketAddr, client: SocketAddr) {
        let (verdict, out) = self.run(&seg.frame(LB_MAC_B, backend_mac(id)));
        assert_eq!(
            verdict,
            XDP_TX,
            "{what}: verdict (output:\n{})",
            frame::hex(&out)
        );
        let expected = seg.between(vip, client).frame(CLIENT_MAC, LB_MAC_A);
        assert_eq!(
            frame::hex(&out),
            frame::hex(&expected),
            "{what}: output frame"
        );
        let checks = verify(what, &out);
        assert!(
            !checks.is_empty() && checks.iter().all(|c| c != "inner L4 cut short"),
            "{what}: {checks:?}"
        );
    }
}

// ---------------------------------------------------------------- cases

struct Flow {
    what: &'static str,
    client: SocketAddr,
    vip: SocketAddr,
    backend: SocketAddr,
    id: u32,
    snat: IpAddr,
    proto: u8,
}

fn standard_flows() -> Vec<Flow> {
    vec![
        Flow {
            what: "TCP over IPv4",
            client: sa("10.0.0.1:40000"),
            vip: sa("10.0.100.1:80"),
            backend: sa("10.0.1.11:8080"),
            id: 0,
            snat: ip(SNAT4),
            proto: PROTO_TCP,
        },
        Flow {
            what: "UDP over IPv4",
            client: sa("10.0.0.1:40001"),
            vip: sa("10.0.100.1:53"),
            backend: sa("10.0.1.11:5353"),
            id: 1,
            snat: ip(SNAT4),
            proto: PROTO_UDP,
        },
        Flow {
            what: "TCP over IPv6",
            client: sa("[fd00::1]:40002"),
            vip: sa("[fd00:100::1]:80"),
            backend: sa("[fd00:1::11]:8080"),
            id: 2,
            snat: ip(SNAT6),
            proto: PROTO_TCP,
        },
        Flow {
            what: "UDP over IPv6",
            client: sa("[fd00::1]:40003"),
            vip: sa("[fd00:100::1]:53"),
            backend: sa("[fd00:1::11]:5353"),
            id: 3,
            snat: ip(SNAT6),
            proto: PROTO_UDP,
        },
    ]
}

fn client_seg(f: &Flow, flags: u8, payload: &[u8]) -> Seg {
    if f.proto == PROTO_TCP {
        Seg::tcp(f.client, f.vip, flags, payload)
    } else {
        Seg::udp(f.client, f.vip, payload)
    }
}

fn backend_seg(f: &Flow, port: u16, flags: u8, payload: &[u8]) -> Seg {
    let to = SocketAddr::new(f.snat, port);
    if f.proto == PROTO_TCP {
        Seg::tcp(f.backend, to, flags, payload)
    } else {
        Seg::udp(f.backend, to, payload)
    }
}

#[test]
fn tcp_and_udp_are_translated_both_ways_over_ipv4_and_ipv6() {
    let mut h = Harness::standard();
    for f in standard_flows() {
        // The client's first packet: a new translation, VIP:80 -> backend:8080.
        let syn = client_seg(&f, frame::SYN, b"hello");
        let port = h.forward(f.what, &syn, f.id, f.backend, f.snat);
        assert!(
            (20000..60000).contains(&port),
            "{}: port {port} outside 20000-59999",
            f.what
        );

        // Both table entries, field by field.
        // Unanswered so far: the short timeout.
        let fwd = h.fwd(f.client, f.vip, f.proto).unwrap();
        let timeout = if f.proto == PROTO_TCP {
            TCP_TIMEOUT
        } else {
            UDP_TIMEOUT
        };
        assert_eq!(
            (fwd.flags, fwd.timeout_s),
            (0, NAT_UNANSWERED_TIMEOUT_S),
            "{}: {fwd:?}",
            f.what
        );
        assert!(fwd.last_seen_ns > 0, "{}: {fwd:?}", f.what);
        let rev = h
            .rev(f.backend, SocketAddr::new(f.snat, port), f.proto)
            .unwrap_or_else(|| panic!("{}: no NAT_REV entry for the reply key", f.what));
        assert_eq!(addr::from_words(rev.client), f.client.ip(), "{}", f.what);
        assert_eq!(addr::from_words(rev.vip), f.vip.ip(), "{}", f.what);
        assert_eq!(
            u16::from_be(rev.client_port_be),
            f.client.port(),
            "{}",
            f.what
        );
        assert_eq!(u16::from_be(rev.vip_port_be), f.vip.port(), "{}", f.what);
        assert_eq!(
            (rev.client_mac, rev.lb_mac),
            (CLIENT_MAC, LB_MAC_A),
            "{}: MACs of the client side",
            f.what
        );
        assert_eq!(rev.ifindex, LO_IFINDEX, "{}: ingress interface", f.what);
        assert_eq!(
            (rev.flags, rev.timeout_s),
            (0, NAT_UNANSWERED_TIMEOUT_S),
            "{}: {rev:?}",
            f.what
        );

        // The backend's reply to the allocated port goes back to the client,
        // and the flow, answered, gets the service's full timeout both ways.
        let reply = backend_seg(&f, port, frame::SYN | frame::ACK, b"world!");
        h.reverse(f.what, &reply, f.id, f.vip, f.client);
        let fwd = h.fwd(f.client, f.vip, f.proto).unwrap();
        let rev = h
            .rev(f.backend, SocketAddr::new(f.snat, port), f.proto)
            .unwrap();
        assert_eq!(
            [(fwd.flags, fwd.timeout_s), (rev.flags, rev.timeout_s)],
            [(NAT_F_ANSWERED, timeout); 2],
            "{}: answered",
            f.what
        );

        // The next client packet hits the same translation.
        let data = client_seg(&f, frame::ACK | frame::PSH, b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(
            h.forward(f.what, &data, f.id, f.backend, f.snat),
            port,
            "{}: same port for the same flow",
            f.what
        );
    }
    assert_eq!(h.reason(Reason::NatNew), 4);
    assert_eq!(h.reason(Reason::NatReply), 4);
    assert_eq!(h.reason(Reason::FlowHit), 4);
    assert_eq!(h.reason(Reason::Tx), 12);
    assert_eq!(h.reason(Reason::DropNatFull), 0);
    // Per-service and per-backend counters count the forwarded packets,
    // and one new flow (the translation) for the two packets of each flow.
    for id in 0..4 {
        let backend = h.dp.maps.backend_counters(id).unwrap();
        assert_eq!((backend.packets, backend.new_flows), (2, 1), "backend {id}");
        let service = h.dp.maps.service_counters(id).unwrap();
        assert_eq!((service.packets, service.new_flows), (2, 1), "service {id}");
    }
}

#[test]
fn udp_over_ipv4_without_checksum_keeps_none() {
    let mut h = Harness::standard();
    let f = &standard_flows()[1];
    let mut query = client_seg(f, 0, b"query");
    query.no_udp_checksum = true;
    let port = h.forward("UDP/IPv4, checksum 0", &query, f.id, f.backend, f.snat);
    let mut answer = backend_seg(f, port, 0, b"answer");
    answer.no_udp_checksum = true;
    h.reverse("UDP/IPv4 reply, checksum 0", &answer, f.id, f.vip, f.client);
    // The reply's output frame was compared byte for byte with a frame
    // whose UDP checksum is 0; say so explicitly too.
    let (_, out) = h.run(&answer.frame(LB_MAC_B, backend_mac(f.id)));
    assert_eq!(
        &out[14 + 20 + 6..14 + 20 + 8],
        &[0, 0],
        "UDP checksum stays 0"
    );
    assert_eq!(h.reason(Reason::NatReply), 2);
}

/// A UDP payload ending in a 16-bit word chosen so that the datagram
/// `src -> dst` (as `Seg::udp` builds it) sums to 0xffff: its checksum
/// computes to 0, which must be sent as 0xffff (0 means "no checksum").
/// That word is the checksum of the datagram with the word zeroed: adding
/// it makes the one's-complement sum 0xffff.
fn payload_for_zero_checksum(src: SocketAddr, dst: SocketAddr, prefix: &[u8]) -> Vec<u8> {
    assert!(prefix.len().is_multiple_of(2));
    let mut payload = prefix.to_vec();
    payload.extend_from_slice(&[0, 0]);
    let w = Seg::udp(src, dst, &payload).l4()[6..8].to_vec();
    let n = payload.len();
    payload[n - 2..].copy_from_slice(&w);
    payload
}

#[test]
fn a_udp_checksum_that_becomes_zero_is_sent_as_ffff() {
    let mut h = Harness::standard();
    let flows = standard_flows();
    for f in [&flows[1], &flows[3]] {
        let port = h.forward(f.what, &client_seg(f, 0, b"first"), f.id, f.backend, f.snat);
        let snat = SocketAddr::new(f.snat, port);
        // Forward: the translated datagram's checksum computes to 0.
        let payload = payload_for_zero_checksum(snat, f.backend, b"to-backend");
        let seg = client_seg(f, 0, &payload);
        assert_ne!(
            &seg.l4()[6..8],
            &[0xff, 0xff],
            "the client's own datagram has an ordinary checksum"
        );
        assert_eq!(
            &seg.between(snat, f.backend).l4()[6..8],
            &[0xff, 0xff],
            "test premise"
        );
        h.forward(f.what, &seg, f.id, f.backend, f.snat);
        // Reverse: the datagram translated back to the client's computes to 0.
        let payload = payload_for_zero_checksum(f.vip, f.client, b"to-the-client!");
        let reply = backend_seg(f, port, 0, &payload);
        assert_eq!(
            &reply.between(f.vip, f.client).l4()[6..8],
            &[0xff, 0xff],
            "test premise"
        );
        h.reverse(f.what, &reply, f.id, f.vip, f.client);
    }
}

#[test]
fn replies_matching_no_flow_pass_untouched() {
    let mut h = Harness::standard();
    let flows = standard_flows();
    let f = &flows[0];
    let port = h.forward(
        "setup",
        &client_seg(f, frame::SYN, b"x"),
        f.id,
        f.backend,
        f.snat,
    );
    let other_port = if port == 20000 { 20001 } else { port - 1 };
    let echo = {
        let m = frame::icmp_message(ip(BACKEND4), ip(SNAT4), 8, 0, [0, 1, 0, 1], &[]);
        frame::frame(LB_MAC_B, backend_mac(0), &m)
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "reply to a port with no translation",
            backend_seg(f, other_port, frame::ACK, b"x").frame(LB_MAC_B, backend_mac(0)),
        ),
        (
            "reply from another backend port",
            Seg::tcp(
                sa("10.0.1.11:8081"),
                SocketAddr::new(f.snat, port),
                frame::ACK,
                b"x",
            )
            .frame(LB_MAC_B, backend_mac(0)),
        ),
        (
            "reply from another host to the translated port",
            Seg::tcp(
                sa("10.0.1.99:8080"),
                SocketAddr::new(f.snat, port),
                frame::ACK,
                b"x",
            )
            .frame(LB_MAC_B, backend_mac(0)),
        ),
        (
            "UDP to a port translated for TCP",
            Seg::udp(f.backend, SocketAddr::new(f.snat, port), b"x")
                .frame(LB_MAC_B, backend_mac(0)),
        ),
        (
            "the host's own traffic (SSH to the SNAT address)",
            Seg::tcp(sa("10.0.1.11:50000"), sa("10.0.1.1:22"), frame::SYN, b"")
                .frame(LB_MAC_B, backend_mac(0)),
        ),
        ("ICMP echo request to the SNAT address", echo),
        (
            "IPv6 reply to a port with no translation",
            Seg::tcp(
                sa("[fd00:1::11]:8080"),
                sa("[fd00:1::1]:20000"),
                frame::ACK,
                b"x",
            )
            .frame(LB_MAC_B, backend_mac(2)),
        ),
    ];
    for (what, input) in &cases {
        let (verdict, out) = h.run(input);
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(out, *input, "{what}: must pass unchanged");
    }
    assert_eq!(h.reason(Reason::PassNotService), cases.len() as u64);
    assert_eq!(h.reason(Reason::NatReply), 0);

    // With NAT disabled in the globals, even a real reply is not looked up.
    h.set_nat_enabled(false);
    let reply = backend_seg(f, port, frame::ACK, b"x").frame(LB_MAC_B, backend_mac(0));
    let (verdict, out) = h.run(&reply);
    assert_eq!(
        (verdict, &out),
        (XDP_PASS, &reply),
        "NAT disabled: reply passes untouched"
    );
    assert_eq!(h.reason(Reason::NatReply), 0);
}

#[test]
fn fin_and_rst_mark_flows_closing() {
    let mut h = Harness::standard();
    let flows = standard_flows();
    for f in [&flows[0], &flows[2]] {
        // Client closes: FIN forward.
        let port = h.forward(
            f.what,
            &client_seg(f, frame::SYN, b""),
            f.id,
            f.backend,
            f.snat,
        );
        assert_eq!(
            h.fwd(f.client, f.vip, f.proto).unwrap().flags & NAT_F_CLOSING,
            0
        );
        h.forward(
            f.what,
            &client_seg(f, frame::FIN | frame::ACK, b""),
            f.id,
            f.backend,
            f.snat,
        );
        let fwd = h.fwd(f.client, f.vip, f.proto).unwrap();
        assert_eq!(
            fwd.flags & NAT_F_CLOSING,
            NAT_F_CLOSING,
            "{}: client FIN sets NAT_F_CLOSING on NAT_FWD: {fwd:?}",
            f.what
        );
        assert_eq!(
            fwd.timeout_s, DEFAULT_TIMEOUTS.closing,
            "{}: client FIN: NAT_FWD timeout becomes the closing timeout",
            f.what
        );
        assert_eq!(u16::from_be(fwd.nat_port_be), port);

        // Backend resets another flow: RST reverse.
        let g = Flow {
            client: SocketAddr::new(f.client.ip(), f.client.port() + 100),
            ..*f
        };
        let port = h.forward(
            g.what,
            &client_seg(&g, frame::SYN, b""),
            g.id,
            g.backend,
            g.snat,
        );
        h.reverse(
            g.what,
            &backend_seg(&g, port, frame::RST | frame::ACK, b""),
            g.id,
            g.vip,
            g.client,
        );
        let rev = h
            .rev(g.backend, SocketAddr::new(g.snat, port), g.proto)
            .unwrap();
        assert_eq!(
            rev.flags & NAT_F_CLOSING,
            NAT_F_CLOSING,
            "{}: backend RST sets NAT_F_CLOSING on NAT_REV: {rev:?}",
            g.what
        );

        // Client RST on a third flow.
        let k = Flow {
            client: SocketAddr::new(f.client.ip(), f.client.port() + 200),
            ..*f
        };
        h.forward(
            k.what,
            &client_seg(&k, frame::SYN, b""),
            k.id,
            k.backend,
            k.snat,
        );
        h.forward(
            k.what,
            &client_seg(&k, frame::RST, b""),
            k.id,
            k.backend,
            k.snat,
        );
        let fwd = h.fwd(k.client, k.vip, k.proto).unwrap();
        assert_eq!(
            (fwd.flags & NAT_F_CLOSING, fwd.timeout_s),
            (NAT_F_CLOSING, DEFAULT_TIMEOUTS.closing),
            "{}: client RST: {fwd:?}",
            k.what
        );
    }
}

/// After FIN/RST a flow expires after the short closing timeout, so its
/// port can be taken by a new flow then: that is what the closing timeout
/// is for. One port, closing timeout 1 s: the first flow closes, a second
/// client gets the port once the first has been idle for longer than that.
#[test]
fn a_closed_flows_port_is_reused_after_the_closing_timeout() {
    let mut h = Harness::new();
    h.set_backend(0, 0, BACKEND4, 8080, SNAT4);
    h.set_service(
        0,
        VIP4,
        80,
        PROTO_TCP,
        &[0],
        (31000, 1),
        Timeouts {
            tcp: 3600,
            closing: 1,
            udp: 60,
        },
    );
    let be = sa("10.0.1.11:8080");
    let vip = sa("10.0.100.1:80");
    let a = sa("10.0.0.1:40000");
    let b = sa("10.0.0.2:40000");
    assert_eq!(
        h.forward(
            "first client",
            &Seg::tcp(a, vip, frame::SYN, b""),
            0,
            be,
            ip(SNAT4)
        ),
        31000
    );
    h.reverse(
        "first client",
        &Seg::tcp(be, sa("10.0.1.1:31000"), frame::SYN | frame::ACK, b""),
        0,
        vip,
        a,
    );
    // Both sides close.
    h.forward(
        "first client",
        &Seg::tcp(a, vip, frame::FIN | frame::ACK, b""),
        0,
        be,
        ip(SNAT4),
    );
    h.reverse(
        "first client",
        &Seg::tcp(be, sa("10.0.1.1:31000"), frame::FIN | frame::ACK, b""),
        0,
        vip,
        a,
    );
    h.forward(
        "first client",
        &Seg::tcp(a, vip, frame::ACK, b""),
        0,
        be,
        ip(SNAT4),
    );

    // While the closed flow is within its closing timeout, the port is taken.
    let (verdict, _) = h.run(&Seg::tcp(b, vip, frame::SYN, b"").frame(LB_MAC_A, CLIENT_MAC));
    assert_eq!(
        verdict, XDP_DROP,
        "the only port is still held by the closing flow"
    );
    assert_eq!(h.reason(Reason::DropNatFull), 1);

    h.age(a, vip, PROTO_TCP, Duration::from_millis(1500));
    let rev = h.rev(be, sa("10.0.1.1:31000"), PROTO_TCP).unwrap();
    let (verdict, out) = h.run(&Seg::tcp(b, vip, frame::SYN, b"").frame(LB_MAC_A, CLIENT_MAC));
    assert_eq!(
        verdict,
        XDP_TX,
        "a flow closed (FIN both ways) and idle 1.5 s, past its 1 s closing timeout, \
         still holds its port: \
         NAT_FWD {:?}, NAT_REV {rev:?} (output {})",
        h.fwd(a, vip, PROTO_TCP),
        frame::hex(&out)
    );
    assert_eq!(
        h.forward(
            "second client",
            &Seg::tcp(b, vip, frame::ACK, b""),
            0,
            be,
            ip(SNAT4)
        ),
        31000
    );
    h.reverse(
        "reply now goes to the second client",
        &Seg::tcp(be, sa("10.0.1.1:31000"), frame::ACK, b""),
        0,
        vip,
        b,
    );
}

/// An idle UDP flow's port is reclaimed for a new flow after the UDP
/// timeout; the old flow, if it comes back, does not steal it back.
#[test]
fn an_idle_udp_flows_port_is_reclaimed() {
    let mut h = Harness::one_udp_port();
    let (be, vip) = (sa("10.0.1.11:5353"), sa("10.0.100.1:53"));
    let a = sa("10.0.0.1:5000");
    let b = sa("10.0.0.2:5000");
    assert_eq!(
        h.forward("first client", &Seg::udp(a, vip, b"q"), 0, be, ip(SNAT4)),
        32000
    );
    let (verdict, _) = h.run(&Seg::udp(b, vip, b"q").frame(LB_MAC_A, CLIENT_MAC));
    assert_eq!(verdict, XDP_DROP, "port held by a live flow");
    h.age(a, vip, PROTO_UDP, Duration::from_millis(1500));
    assert_eq!(
        h.forward(
            "second client after the timeout",
            &Seg::udp(b, vip, b"q"),
            0,
            be,
            ip(SNAT4)
        ),
        32000
    );
    h.reverse(
        "reply goes to the second client",
        &Seg::udp(be, sa("10.0.1.1:32000"), b"a"),
        0,
        vip,
        b,
    );
    let (verdict, _) = h.run(&Seg::udp(a, vip, b"q").frame(LB_MAC_A, CLIENT_MAC));
    assert_eq!(
        verdict, XDP_DROP,
        "the expired first flow cannot take the port back while the second uses it"
    );
    h.reverse(
        "reply still goes to the second client",
        &Seg::udp(be, sa("10.0.1.1:32000"), b"a"),
        0,
        vip,
        b,
    );
    assert_eq!(h.reason(Reason::DropNatFull), 2);
}

/// A flow is idle only when neither direction has seen a packet for its
/// timeout. A one-way UDP flow (the client sends, the backend never
/// answers: syslog, metrics) that keeps sending must keep its port: if a
/// new flow took it, both would share one reply key.
#[test]
fn a_one_way_udp_flow_that_keeps_sending_keeps_its_port() {
    let mut h = Harness::one_udp_port();
    let (be, vip) = (sa("10.0.1.11:5353"), sa("10.0.100.1:53"));
    let a = sa("10.0.0.1:5000");
    let b = sa("10.0.0.2:5000");
    assert_eq!(
        h.forward("one-way client", &Seg::udp(a, vip, b"m1"), 0, be, ip(SNAT4)),
        32000
    );
    h.age(a, vip, PROTO_UDP, Duration::from_millis(600));
    assert_eq!(
        h.forward(
            "one-way client, 0.6 s later",
            &Seg::udp(a, vip, b"m2"),
            0,
            be,
            ip(SNAT4)
        ),
        32000
    );
    h.age(a, vip, PROTO_UDP, Duration::from_millis(600));
    // 1.2 s after the reply entry was written, 0.6 s after the flow's last packet.
    let (verdict, out) = h.run(&Seg::udp(b, vip, b"q").frame(LB_MAC_A, CLIENT_MAC));
    assert_eq!(
        verdict,
        XDP_DROP,
        "a new flow took the only port from a flow that sent 0.6 s ago (UDP timeout 1 s): \
         NAT_FWD {:?}, NAT_REV {:?}, output {}",
        h.fwd(a, vip, PROTO_UDP),
        h.rev(be, sa("10.0.1.1:32000"), PROTO_UDP),
        frame::hex(&out)
    );
    assert_eq!(
        h.forward(
            "one-way client goes on",
            &Seg::udp(a, vip, b"m3"),
            0,
            be,
            ip(SNAT4)
        ),
        32000
    );
    h.reverse(
        "a late answer reaches the one-way client",
        &Seg::udp(be, sa("10.0.1.1:32000"), b"a"),
        0,
        vip,
        a,
    );
}

/// A pool of SNAT addresses: each address has the whole port range, so
/// two addresses with one port each hold two flows; replies to either are
/// translated back; a third flow finds no (address, port) left.
#[test]
fn a_pool_of_snat_addresses_multiplies_the_ports() {
    let mut h = Harness::new();
    h.set_backend(0, 0, "10.0.1.12", 8080, SNAT4);
    let timeouts = DEFAULT_TIMEOUTS;
    h.set_service(0, "10.0.100.2", 80, PROTO_TCP, &[0], (30000, 1), timeouts);
    let pool = ["10.0.1.1", "10.0.1.2"];
    let mut snat = SnatPool {
        count: 2,
        ..SnatPool::default()
    };
    for (slot, a) in snat.addrs.iter_mut().zip(pool) {
        *slot = addr::to_words(ip(a));
    }
    h.dp.maps.snat_pools.set(0, snat, 0).unwrap();
    let be = sa("10.0.1.12:8080");
    let vip = sa("10.0.100.2:80");
    let mut used = Vec::new();
    for n in 0..2 {
        let client = SocketAddr::new(ip("10.0.0.1"), 40000 + n);
        let input = Seg::tcp(client, vip, frame::SYN, b"").frame(LB_MAC_A, CLIENT_MAC);
        assert_eq!(h.run(&input).0, XDP_TX, "client {n}");
        let f = h.fwd(client, vip, PROTO_TCP).expect("translated");
        let from = addr::from_words(f.snat_addr);
        let port = u16::from_be(f.nat_port_be);
        assert_eq!(port, 30000);
        used.push(from);
        let reply = Seg::tcp(
            be,
            SocketAddr::new(from, port),
            frame::SYN | frame::ACK,
            b"",
        );
        h.reverse("the backend's answer", &reply, 0, vip, client);
    }
    used.sort();
    assert_eq!(used, [ip(pool[0]), ip(pool[1])], "one flow on each address");
    let input = Seg::tcp(sa("10.0.0.1:40002"), vip, frame::SYN, b"").frame(LB_MAC_A, CLIENT_MAC);
    assert_eq!(h.run(&input).0, XDP_DROP, "both addresses' one port taken");
    assert_eq!(h.reason(Reason::DropNatFull), 1);
}

/// Random tries miss the last free ports of a nearly full range; the scan
/// that follows them finds one whenever one is left.
#[test]
fn the_last_free_port_of_a_range_is_found() {
    const BASE: u16 = 30000;
    const COUNT: u16 = 1024;
    const FREE: u16 = BASE + 777;
    let mut h = Harness::new();
    h.set_backend(0, 0, "10.0.1.12", 8080, SNAT4);
    let timeouts = DEFAULT_TIMEOUTS;
    h.set_service(
        0,
        "10.0.100.2",
        80,
        PROTO_TCP,
        &[0],
        (BASE, COUNT),
        timeouts,
    );
    let be = sa("10.0.1.12:8080");
    let vip = sa("10.0.100.2:80");
    // Every port but one held by a live flow of another client.
    let now = monotonic_coarse_ns();
    for port in (BASE..BASE + COUNT).filter(|p| *p != FREE) {
        let client = SocketAddr::new(ip("10.0.9.1"), port);
        let rev = NatRev {
            client: addr::to_words(client.ip()),
            vip: addr::to_words(vip.ip()),
            client_port_be: client.port().to_be(),
            vip_port_be: vip.port().to_be(),
            last_seen_ns: now,
            timeout_s: 3600,
            ..NatRev::default()
        };
        let key = addr::flow_key(be, SocketAddr::new(ip(SNAT4), port), PROTO_TCP);
        h.dp.maps.nat_rev.insert(key, rev, 0).unwrap();
    }
    // New clients, one after the other, each given its port back after:
    // every one must find the free port.
    for n in 0..40 {
        let client = SocketAddr::new(ip("10.0.0.1"), 40000 + n);
        let syn = Seg::tcp(client, vip, frame::SYN, b"");
        let port = h.forward("a new client", &syn, 0, be, ip(SNAT4));
        assert_eq!(port, FREE, "client {n}: the one free port");
        let fwd_key = addr::flow_key(client, vip, PROTO_TCP);
        h.dp.maps.nat_fwd.remove(&fwd_key).unwrap();
        let rev_key = addr::flow_key(be, SocketAddr::new(ip(SNAT4), FREE), PROTO_TCP);
        h.dp.maps.nat_rev.remove(&rev_key).unwrap();
    }
    assert_eq!(h.reason(Reason::DropNatFull), 0);
    // With that port taken too, the range is full: the next client is
    // refused.
    let syn = Seg::tcp(sa("10.0.0.2:40000"), vip, frame::SYN, b"");
    h.forward("the last port's client", &syn, 0, be, ip(SNAT4));
    let input = Seg::tcp(sa("10.0.0.3:40000"), vip, frame::SYN, b"").frame(LB_MAC_A, CLIENT_MAC);
    assert_eq!(h.run(&input).0, XDP_DROP, "no port left");
    assert_eq!(h.reason(Reason::DropNatFull), 1);
}

#[test]
fn a_full_port_range_drops_new_flows_and_keeps_old_ones() {
    let mut h = Harness::new();
    h.set_backend(0, 0, "10.0.1.12", 8080, SNAT4);
    h.set_service(
        0,
        "10.0.100.2",
        80,
        PROTO_TCP,
        &[0],
        (30000, 2),
        DEFAULT_TIMEOUTS,
    );
    let be = sa("10.0.1.12:8080");
    let vip = sa("10.0.100.2:80");
    let clients = [
        sa("10.0.0.1:40000"),
        sa("10.0.0.2:40000"),
        sa("10.0.0.3:40000"),
    ];
    let p1 = h.forward(
        "client 1",
        &Seg::tcp(clients[0], vip, frame::SYN, b""),
        0,
        be,
        ip(SNAT4),
    );
    let p2 = h.forward(
        "client 2",
        &Seg::tcp(clients[1], vip, frame::SYN, b""),
        0,
        be,
        ip(SNAT4),
    );
    let mut ports = [p1, p2];
    ports.sort();
    assert_eq!(ports, [30000, 30001], "two flows, two ports of the range");

    let input = Seg::tcp(clients[2], vip, frame::SYN, b"").frame(LB_MAC_A, CLIENT_MAC);
    let (verdict, _) = h.run(&input);
    assert_eq!(
        verdict, XDP_DROP,
        "third client: no free port, the packet is dropped (not passed to the kernel)"
    );
    assert_eq!(h.reason(Reason::DropNatFull), 1, "drop_nat_full");
    assert!(
        h.fwd(clients[2], vip, PROTO_TCP).is_none(),
        "no NAT_FWD entry for the refused flow"
    );
    let rev_entries = h.dp.maps.nat_rev.keys().filter_map(Result::ok).count();
    assert_eq!(rev_entries, 2, "NAT_REV holds the two flows only");

    // The first two still translate, both ways, on their ports.
    for (client, port) in clients[..2].iter().zip([p1, p2]) {
        assert_eq!(
            h.forward(
                "established",
                &Seg::tcp(*client, vip, frame::ACK, b"more"),
                0,
                be,
                ip(SNAT4)
            ),
            port
        );
        h.reverse(
            "established reply",
            &Seg::tcp(be, SocketAddr::new(ip(SNAT4), port), frame::ACK, b"ok"),
            0,
            vip,
            *client,
        );
    }
    assert_eq!(h.reason(Reason::NatNew), 2);
    assert_eq!(h.reason(Reason::DropNatFull), 1);
}

/// ICMP errors sent to the SNAT address about a packet the load balancer
/// translated (so quoting snat:port -> backend:port) go to the client with
/// everything translated back: outer addresses, the quoted packet's
/// addresses, ports, header checksum and (when quoted) L4 checksum, and the
/// ICMP checksum.
#[test]
fn icmp_errors_about_translated_flows_are_translated_back() {
    let mut h = Harness::standard();
    let flows = standard_flows();
    let big = vec![0x5a; 1000];
    struct IcmpCase {
        what: &'static str,
        flow: usize,
        client_port: u16,
        payload: Vec<u8>,
        /// ICMP type, code, the 4 bytes after the checksum.
        icmp: (u8, u8, [u8; 4]),
        /// How much of the packet the router quotes.
        quote_max: usize,
        /// The router decremented the TTL / hop limit before quoting.
        decrement: bool,
        /// Checks `verify` must make on the output.
        checks: &'static [&'static str],
    }
    let frag_needed = (3, 4, [0, 0, 0x05, 0x78]); // MTU 1400
    let cases = vec![
        IcmpCase {
            what: "IPv4 fragmentation needed, whole packet quoted",
            flow: 0,
            client_port: 41000,
            payload: b"hello".to_vec(),
            icmp: frag_needed,
            quote_max: 548,
            decrement: false,
            checks: &["IPv4 header", "ICMP", "inner IPv4 header", "inner TCP"],
        },
        IcmpCase {
            what: "IPv4 fragmentation needed, 548 of 1040 bytes quoted (as Linux routers do), \
                   TTL decremented",
            flow: 0,
            client_port: 41001,
            payload: big.clone(),
            icmp: frag_needed,
            quote_max: 548,
            decrement: true,
            checks: &[
                "IPv4 header",
                "ICMP",
                "inner IPv4 header",
                "inner L4 cut short",
            ],
        },
        IcmpCase {
            what: "IPv4 fragmentation needed, header + 8 bytes quoted \
                   (RFC 792 minimum: no TCP checksum in the quote)",
            flow: 0,
            client_port: 41002,
            payload: big.clone(),
            icmp: frag_needed,
            quote_max: 28,
            decrement: false,
            checks: &[
                "IPv4 header",
                "ICMP",
                "inner IPv4 header",
                "inner L4 cut short",
            ],
        },
        IcmpCase {
            what: "IPv4 time exceeded",
            flow: 0,
            client_port: 41003,
            payload: b"ttl".to_vec(),
            icmp: (11, 0, [0; 4]),
            quote_max: 548,
            decrement: false,
            checks: &["IPv4 header", "ICMP", "inner IPv4 header", "inner TCP"],
        },
        IcmpCase {
            what: "IPv4 port unreachable about UDP",
            flow: 1,
            client_port: 41004,
            payload: b"query".to_vec(),
            icmp: (3, 3, [0; 4]),
            quote_max: 548,
            decrement: false,
            checks: &["IPv4 header", "ICMP", "inner IPv4 header", "inner UDP"],
        },
        IcmpCase {
            what: "ICMPv6 packet too big, whole packet quoted",
            flow: 2,
            client_port: 41005,
            payload: b"hello".to_vec(),
            icmp: (2, 0, [0, 0, 0x05, 0x00]), // MTU 1280
            quote_max: 1232,
            decrement: false,
            checks: &["ICMPv6", "inner TCP"],
        },
        IcmpCase {
            what: "ICMPv6 packet too big, 1232 of 1360 bytes quoted, hop limit decremented",
            flow: 2,
            client_port: 41006,
            payload: vec![0xa5; 1300],
            icmp: (2, 0, [0, 0, 0x05, 0x00]),
            quote_max: 1232,
            decrement: true,
            checks: &["ICMPv6", "inner L4 cut short"],
        },
        IcmpCase {
            what: "ICMPv6 port unreachable about UDP",
            flow: 3,
            client_port: 41007,
            payload: b"query".to_vec(),
            icmp: (1, 4, [0; 4]),
            quote_max: 1232,
            decrement: false,
            checks: &["ICMPv6", "inner UDP"],
        },
        IcmpCase {
            what: "ICMPv6 time exceeded",
            flow: 2,
            client_port: 41008,
            payload: b"hop".to_vec(),
            icmp: (3, 0, [0; 4]),
            quote_max: 1232,
            decrement: false,
            checks: &["ICMPv6", "inner TCP"],
        },
    ];
    for c in &cases {
        let f = &flows[c.flow];
        let client = SocketAddr::new(f.client.ip(), c.client_port);
        let flow = Flow { client, ..*f };
        // Only a SYN opens a TCP translation.
        h.forward(
            c.what,
            &client_seg(&flow, frame::SYN, b""),
            f.id,
            f.backend,
            f.snat,
        );
        let seg = client_seg(&flow, frame::ACK | frame::PSH, &c.payload);
        let port = h.forward(c.what, &seg, f.id, f.backend, f.snat);
        // What the load balancer sent, as the router got it: the output
        // of the forward run (already checked byte for byte).
        let (_, sent) = h.run(&seg.frame(LB_MAC_A, CLIENT_MAC));
        let sent_ip = &sent[14..];
        let router = if f.snat.is_ipv4() {
            ip(ROUTER4)
        } else {
            ip(ROUTER6)
        };
        let (t, code, rest) = c.icmp;
        let error = frame::icmp_message(
            router,
            f.snat,
            t,
            code,
            rest,
            &frame::quote(sent_ip, c.quote_max, c.decrement),
        );
        let input = frame::frame(LB_MAC_B, ROUTER_MAC, &error);

        let (verdict, out) = h.run(&input);
        assert_eq!(
            verdict,
            XDP_TX,
            "{}: verdict (output:\n{})",
            c.what,
            frame::hex(&out)
        );
        // Expected: from the VIP to the client, quoting the client's own
        // packet (as the router would have quoted it had there been no NAT).
        let original = seg.ip();
        let expected_ip = frame::icmp_message(
            f.vip.ip(),
            client.ip(),
            t,
            code,
            rest,
            &frame::quote(&original, c.quote_max, c.decrement),
        );
        // The router's TTL and IP id are kept on the outer header.
        let expected = frame::frame(CLIENT_MAC, LB_MAC_A, &expected_ip);
        assert_eq!(
            frame::hex(&out),
            frame::hex(&expected),
            "{}: output frame (translated port {port})",
            c.what
        );
        let checks = verify(c.what, &out);
        assert_eq!(checks, c.checks, "{}: checksums verified", c.what);
    }
    assert_eq!(h.reason(Reason::NatIcmp), cases.len() as u64);
}

#[test]
fn icmp_not_about_a_translated_flow_passes_untouched() {
    let mut h = Harness::standard();
    let flows = standard_flows();
    let f = &flows[0];
    let seg = client_seg(f, frame::SYN, b"");
    let port = h.forward("setup", &seg, f.id, f.backend, f.snat);
    let unknown = Seg::tcp(
        SocketAddr::new(f.snat, if port == 20000 { 20001 } else { port - 1 }),
        f.backend,
        frame::ACK,
        b"x",
    );
    let cases = vec![
        (
            "frag needed about a port with no translation",
            frame::icmp_message(ip(ROUTER4), ip(SNAT4), 3, 4, [0, 0, 5, 0x78], &unknown.ip()),
        ),
        (
            "frag needed about the lb's own traffic to another host",
            frame::icmp_message(
                ip(ROUTER4),
                ip(SNAT4),
                3,
                4,
                [0, 0, 5, 0x78],
                &Seg::tcp(sa("10.0.1.1:33000"), sa("10.0.9.9:443"), frame::ACK, b"x").ip(),
            ),
        ),
        (
            "ICMPv6 packet too big about a port with no translation",
            frame::icmp_message(
                ip(ROUTER6),
                ip(SNAT6),
                2,
                0,
                [0, 0, 5, 0],
                &Seg::tcp(
                    sa("[fd00:1::1]:20000"),
                    sa("[fd00:1::11]:8080"),
                    frame::ACK,
                    b"x",
                )
                .ip(),
            ),
        ),
        (
            // Found by the fuzzer: the quote matches a live translation,
            // but the error is addressed to another host.
            "frag needed quoting a live translation, addressed elsewhere",
            frame::icmp_message(
                ip(ROUTER4),
                ip("10.0.1.99"),
                3,
                4,
                [0, 0, 5, 0x78],
                &Seg::tcp(SocketAddr::new(f.snat, port), f.backend, frame::ACK, b"x").ip(),
            ),
        ),
        (
            "ICMPv6 echo request (not an error)",
            frame::icmp_message(ip(ROUTER6), ip(SNAT6), 128, 0, [0, 1, 0, 1], &[]),
        ),
    ];
    for (what, packet) in &cases {
        let input = frame::frame(LB_MAC_B, ROUTER_MAC, packet);
        let (verdict, out) = h.run(&input);
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(out, input, "{what}: must pass unchanged");
    }
    assert_eq!(h.reason(Reason::NatIcmp), 0);
}

#[test]
fn nat_flows_go_to_the_backend_userspace_predicts() {
    let mut h = Harness::new();
    let backends = ["10.0.1.21", "10.0.1.22", "10.0.1.23"];
    for (i, b) in backends.iter().enumerate() {
        h.set_backend(i as u32, 0, b, 8080, SNAT4);
    }
    h.set_service(
        0,
        VIP4,
        80,
        PROTO_TCP,
        &[0, 1, 2],
        (20000, 40000),
        DEFAULT_TIMEOUTS,
    );
    let vip = sa("10.0.100.1:80");
    let mut used = [0u32; 3];
    for port in 20000..20090u16 {
        let client = SocketAddr::new(ip("10.0.0.1"), port);
        let expected = h.dp.maps.route(client, vip, PROTO_TCP).unwrap();
        let id = expected.backend_id;
        let be = SocketAddr::new(ip(backends[id as usize]), 8080);
        assert_eq!(expected.backend, be);
        h.forward(
            "Maglev pick",
            &Seg::tcp(client, vip, frame::SYN, b""),
            id,
            be,
            ip(SNAT4),
        );
        used[id as usize] += 1;
    }
    assert!(
        used.iter().all(|&n| n > 15),
        "90 flows over 3 backends: {used:?}"
    );
    // Ports are distinct per backend (reply keys are unique).
    let rev: Vec<(FlowKey, NatRev)> = h.dp.maps.nat_rev.iter().filter_map(Result::ok).collect();
    assert_eq!(rev.len(), 90);
}

/// A service that retries refused flows (`retry_refused`, the default):
/// two backends; the one a flow first goes to refuses it (RST to the SYN).
fn retrying() -> Harness {
    let mut h = Harness::new();
    h.set_backend(0, 0, BACKEND4, 8080, SNAT4);
    h.set_backend(1, 0, "10.0.1.12", 8080, SNAT4);
    set_retrying_members(&mut h, &[0, 1]);
    h
}

/// Makes the retrying service's table hold `members`.
fn set_retrying_members(h: &mut Harness, members: &[u32]) {
    let mut svc = nat_service(0, 0, TABLE_SIZE, (20000, 40000), DEFAULT_TIMEOUTS);
    svc.flags |= SVC_F_NAT_RETRY;
    h.dp.set_service(sa("10.0.100.1:80"), PROTO_TCP, svc, members)
        .unwrap();
}

/// Backend `id` of the retrying service.
fn retrying_backend(id: u32) -> SocketAddr {
    if id == 0 {
        sa("10.0.1.11:8080")
    } else {
        sa("10.0.1.12:8080")
    }
}

/// The client's SYN: (backend id, port) it was translated to.
fn syn_goes_to(h: &mut Harness, client: SocketAddr) -> (u32, u16) {
    let seg = Seg::tcp(client, sa("10.0.100.1:80"), frame::SYN, b"");
    let (verdict, _) = h.run(&seg.frame(LB_MAC_A, CLIENT_MAC));
    assert_eq!(verdict, XDP_TX, "{client}: SYN forwarded");
    let f = h.fwd(client, sa("10.0.100.1:80"), PROTO_TCP).unwrap();
    (f.backend, u16::from_be(f.nat_port_be))
}

/// Backend `id` resets the flow translated to `port`: the verdict.
fn backend_resets(h: &mut Harness, id: u32, port: u16) -> u32 {
    let to = SocketAddr::new(ip(SNAT4), port);
    let seg = Seg::tcp(retrying_backend(id), to, frame::RST | frame::ACK, b"");
    h.run(&seg.frame(LB_MAC_B, backend_mac(id))).0
}

#[test]
fn a_refused_syn_is_retried_once_on_another_backend() {
    let mut h = retrying();
    let client = sa("10.0.0.1:40000");
    let (first, port) = syn_goes_to(&mut h, client);
    // The refusal does not reach the client...
    assert_eq!(
        backend_resets(&mut h, first, port),
        XDP_DROP,
        "RST swallowed"
    );
    assert_eq!(h.reason(Reason::NatRetry), 1);
    let f = h.fwd(client, sa("10.0.100.1:80"), PROTO_TCP).unwrap();
    assert_eq!(f.flags & NAT_F_REFUSED, NAT_F_REFUSED, "{f:?}");
    // ... its retransmitted SYN goes to the other backend, on a new port,
    // and the old reply entry is gone.
    let (second, new_port) = syn_goes_to(&mut h, client);
    assert_ne!(second, first, "moved to another backend");
    assert_eq!(h.reason(Reason::NatRetry), 2);
    assert_eq!(h.reason(Reason::NatNew), 1, "one flow, moved once");
    assert!(h
        .rev(
            retrying_backend(first),
            SocketAddr::new(ip(SNAT4), port),
            PROTO_TCP
        )
        .is_none());
    // A second refusal reaches the client (translated back): every
    // backend refusing must not leave the client waiting.
    assert_eq!(
        backend_resets(&mut h, second, new_port),
        XDP_TX,
        "second RST passed on"
    );
    assert_eq!(h.reason(Reason::NatRetry), 2);
}

#[test]
fn an_unanswered_syn_retransmission_is_moved_once() {
    let mut h = retrying();
    let client = sa("10.0.0.2:40000");
    let vip = sa("10.0.100.1:80");
    let (first, _) = syn_goes_to(&mut h, client);
    // An immediate duplicate is not a retransmission: same backend.
    assert_eq!(syn_goes_to(&mut h, client).0, first);
    // The backend's host is gone: nothing comes back; the client
    // retransmits its SYN a second later.
    h.age(client, vip, PROTO_TCP, Duration::from_secs(1));
    let (second, _) = syn_goes_to(&mut h, client);
    assert_ne!(second, first, "moved after an unanswered second");
    h.age(client, vip, PROTO_TCP, Duration::from_secs(1));
    assert_eq!(syn_goes_to(&mut h, client).0, second, "moved once only");
    assert_eq!(h.reason(Reason::NatRetry), 1);
}

#[test]
fn without_retry_a_refusal_reaches_the_client() {
    let mut h = retrying();
    let mut svc = nat_service(0, 0, TABLE_SIZE, (20000, 40000), DEFAULT_TIMEOUTS);
    svc.flags &= !SVC_F_NAT_RETRY;
    h.dp.set_service(sa("10.0.100.1:80"), PROTO_TCP, svc, &[0, 1])
        .unwrap();
    let client = sa("10.0.0.3:40000");
    let (first, port) = syn_goes_to(&mut h, client);
    assert_eq!(backend_resets(&mut h, first, port), XDP_TX);
    assert_eq!(h.reason(Reason::NatRetry), 0);
}

/// A flow whose backend went down mid-connection (its host is gone) moves
/// on its client's next segment to another backend, which knows nothing
/// of it and resets it: that reset must reach the client at once. Only a
/// refused SYN is retried; swallowing this reset left the client
/// retransmitting into resets it never saw until its own timeout.
#[test]
fn a_reset_of_a_flow_moved_mid_connection_reaches_the_client() {
    let mut h = retrying();
    let client = sa("10.0.0.4:40000");
    let vip = sa("10.0.100.1:80");
    let (first, port) = syn_goes_to(&mut h, client);
    let syn_ack = Seg::tcp(
        retrying_backend(first),
        SocketAddr::new(ip(SNAT4), port),
        frame::SYN | frame::ACK,
        b"",
    );
    let (verdict, _) = h.run(&syn_ack.frame(LB_MAC_B, backend_mac(first)));
    assert_eq!(verdict, XDP_TX, "the backend's answer reaches the client");
    // Its host goes down, and the daemon takes it out of the table.
    let mut gone = h.dp.maps.backend(first).unwrap();
    gone.state = BACKEND_DOWN;
    h.dp.set_backend(first, gone).unwrap();
    set_retrying_members(&mut h, &[1 - first]);
    // The client's request, retransmitted, goes to the other backend...
    let data = Seg::tcp(
        client,
        vip,
        frame::ACK | frame::PSH,
        b"GET / HTTP/1.0\r\n\r\n",
    );
    let (verdict, _) = h.run(&data.frame(LB_MAC_A, CLIENT_MAC));
    assert_eq!(verdict, XDP_TX);
    let moved = h.fwd(client, vip, PROTO_TCP).unwrap();
    assert_ne!(moved.backend, first, "{moved:?}");
    // ...which resets it: passed on to the client, not retried.
    let new_port = u16::from_be(moved.nat_port_be);
    assert_eq!(
        backend_resets(&mut h, moved.backend, new_port),
        XDP_TX,
        "the reset reaches the client"
    );
    assert_eq!(h.reason(Reason::NatRetry), 0);
}

#[test]
fn only_a_syn_opens_a_tcp_translation() {
    let mut h = Harness::standard();
    let f = &standard_flows()[0];
    let data = client_seg(f, frame::ACK | frame::PSH, b"data");
    let (verdict, _) = h.run(&data.frame(LB_MAC_A, CLIENT_MAC));
    assert_eq!(verdict, XDP_DROP, "a segment of an unknown flow");
    assert!(h.fwd(f.client, f.vip, f.proto).is_none(), "no port spent");
    assert_eq!(h.reason(Reason::DropNatNoFlow), 1);
    let port = h.forward(
        "SYN",
        &client_seg(f, frame::SYN, b""),
        f.id,
        f.backend,
        f.snat,
    );
    assert_eq!(h.forward("data", &data, f.id, f.backend, f.snat), port);
}

/// A translation replicated from a cluster peer: its reply entry has no
/// way back to the client yet (`ifindex` 0), as the daemon installs it.
fn replicate(h: &mut Harness, f: &Flow, port: u16) {
    let maps = &mut h.dp.maps;
    let key = addr::flow_key(f.client, f.vip, f.proto);
    let mut fwd = maps.nat_fwd.get(&key, 0).unwrap();
    fwd.flags |= NAT_F_REPLICATED | NAT_F_ANSWERED;
    maps.nat_fwd.insert(key, fwd, 0).unwrap();
    let rk = addr::flow_key(f.backend, SocketAddr::new(f.snat, port), f.proto);
    let rev = NatRev {
        flags: NAT_F_REPLICATED | NAT_F_ANSWERED,
        client_mac: [0; 6],
        lb_mac: [0; 6],
        ifindex: 0,
        ..maps.nat_rev.get(&rk, 0).unwrap()
    };
    maps.nat_rev.insert(rk, rev, 0).unwrap();
}

#[test]
fn a_replicated_reply_finds_its_client_through_the_kernels_routes() {
    // A namespace of its own: its routes and forwarding switch are the
    // test's (the program runs on its loopback).
    let ns = Netns::new(&unique_prefix("natrt")).unwrap();
    let f = &standard_flows()[0];
    let client_mac = [0x02, 0, 0, 0, 0xc1, 0x01];
    let mut h = ns.run(Harness::standard);
    let port = h.forward(
        "SYN",
        &client_seg(f, frame::SYN, b""),
        f.id,
        f.backend,
        f.snat,
    );
    replicate(&mut h, f, port);
    let reply = backend_seg(f, port, frame::ACK, b"answer");
    let translated = reply.between(f.vip, f.client);

    // Forwarding is off (a new namespace's default): the kernel's lookup
    // refuses, so the reply goes to the kernel translated, MACs untouched.
    let (verdict, out) = ns.run(|| h.run(&reply.frame(LB_MAC_B, backend_mac(f.id))));
    assert_eq!(verdict, XDP_PASS);
    let expected = translated.frame(LB_MAC_B, backend_mac(f.id));
    assert_eq!(frame::hex(&out), frame::hex(&expected));
    assert_eq!(h.reason(Reason::PassNoRoute), 1);

    // With a route to the client and its neighbour known, the reply goes
    // straight there, and the entry keeps the way for the next ones.
    for cmd in [
        "sysctl -qw net.ipv4.conf.lo.forwarding=1",
        "ip link add xlbrt0 address 02:00:00:00:0e:01 type veth peer name xlbrt1",
        "ip link set xlbrt1 up",
        "ip link set xlbrt0 up",
        "ip addr add 10.0.0.254/24 dev xlbrt0",
        "ip neigh replace 10.0.0.1 lladdr 02:00:00:00:c1:01 dev xlbrt0 nud permanent",
    ] {
        ns.exec(&cmd.split(' ').collect::<Vec<_>>()).unwrap();
    }
    let (verdict, out) = ns.run(|| h.run(&reply.frame(LB_MAC_B, backend_mac(f.id))));
    let veth_mac = [0x02, 0, 0, 0, 0x0e, 0x01];
    assert_eq!(
        frame::hex(&out),
        frame::hex(&translated.frame(client_mac, veth_mac))
    );
    // The veth is not one of the datapath's egress ports: the redirect
    // is refused and counted, which is fine here: the way was found.
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(h.reason(Reason::DropRedirect), 1);
    let rk = addr::flow_key(f.backend, SocketAddr::new(f.snat, port), f.proto);
    let rev = h.dp.maps.nat_rev.get(&rk, 0).unwrap();
    assert_eq!((rev.client_mac, rev.lb_mac), (client_mac, veth_mac));
    assert_ne!(rev.ifindex, 0);
    assert_eq!(h.reason(Reason::PassNoRoute), 1);
}
