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
    fmt::Display,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use xdp_common::{
    Backend, NatFwd, NatRev, Reason, SnatPool, BACKEND_ACTIVE, BACKEND_DOWN, NAT_F_ANSWERED,
    NAT_F_CLOSING, NAT_F_REFUSED, NAT_F_REPLICATED, NAT_F_SEQ, NAT_RECLAIM_WINDOW_S,
    NAT_SWEEP_MARGIN_S, NAT_UNANSWERED_TIMEOUT_S, PROTO_TCP, PROTO_UDP, SVC_F_NAT_RETRY,
};
use xdplb::{addr, dataplane::monotonic_coarse_ns};
use xdplb_tests::{
    datapath::{
        nat_service, TestDatapath, Timeouts, DEFAULT_TIMEOUTS, LO_IFINDEX, TABLE_SIZE, XDP_DROP,
        XDP_PASS, XDP_TX,
    },
    frame::{self, verify, Seg},
    netns::{exec_line, unique_prefix, Netns},
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

/// The standard services, id = index: (what, VIP, port, protocol, backend,
/// backend port, SNAT address).
const STANDARD: [(&str, &str, u16, u8, &str, u16, &str); 4] = [
    ("TCP over IPv4", VIP4, 80, PROTO_TCP, BACKEND4, 8080, SNAT4),
    ("UDP over IPv4", VIP4, 53, PROTO_UDP, BACKEND4, 5353, SNAT4),
    ("TCP over IPv6", VIP6, 80, PROTO_TCP, BACKEND6, 8080, SNAT6),
    ("UDP over IPv6", VIP6, 53, PROTO_UDP, BACKEND6, 5353, SNAT6),
];

fn backend_mac(id: u32) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x01, id as u8]
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `seg` as the client sends it to the load balancer.
fn from_client(seg: &Seg) -> Vec<u8> {
    seg.frame(LB_MAC_A, CLIENT_MAC)
}

/// `seg` as backend `id` sends it to the load balancer.
fn from_backend(seg: &Seg, id: u32) -> Vec<u8> {
    seg.frame(LB_MAC_B, backend_mac(id))
}

/// Compares frames as hex dumps, so a mismatch shows where.
fn assert_frame(out: &[u8], expected: &[u8], what: impl Display) {
    assert_eq!(frame::hex(out), frame::hex(expected), "{what}");
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

    /// Backend `id` at `backend`, seen from the load balancer's `snat`
    /// address, reached over "loopback" (XDP_TX).
    fn set_backend(&mut self, id: u32, service: u32, backend: SocketAddr, snat: IpAddr) {
        let b = Backend {
            addr: addr::to_words(backend.ip()),
            dst_mac: backend_mac(id),
            src_mac: LB_MAC_B,
            ifindex: LO_IFINDEX,
            state: BACKEND_ACTIVE,
            snat_addr: addr::to_words(snat),
            service,
            port_be: backend.port().to_be(),
            _pad: [0; 2],
        };
        self.dp.set_backend(id, b).unwrap();
    }

    /// A NAT service `id` at `vip/proto` whose table holds `members`
    /// (repeated to fill it), translating to source ports
    /// `ports.0 .. ports.0 + ports.1`.
    fn set_service(
        &mut self,
        id: u32,
        vip: SocketAddr,
        proto: u8,
        members: &[u32],
        ports: (u16, u16),
        t: Timeouts,
    ) {
        let svc = nat_service(id, id * 2 * TABLE_SIZE, TABLE_SIZE, ports, t);
        self.dp.set_service(vip, proto, svc, members).unwrap();
    }

    /// The standard setup: NAT services on port 80 (TCP) and 53 (UDP) of
    /// an IPv4 and an IPv6 VIP, each with one backend on another port
    /// (8080, 5353), default port range and timeouts.
    fn standard() -> Self {
        let mut h = Self::new();
        for f in standard_flows() {
            h.set_backend(f.id, f.id, f.backend, f.snat);
            let ports = (20000, 40000);
            h.set_service(f.id, f.vip, f.proto, &[f.id], ports, DEFAULT_TIMEOUTS);
        }
        h
    }

    /// One NAT service at `vip/proto`: backend 0 at `backend`, from SNAT4,
    /// with the source ports `ports` and timeouts `t`.
    fn one_service(
        vip: SocketAddr,
        proto: u8,
        backend: SocketAddr,
        ports: (u16, u16),
        t: Timeouts,
    ) -> Self {
        let mut h = Self::new();
        h.set_backend(0, 0, backend, ip(SNAT4));
        h.set_service(0, vip, proto, &[0], ports, t);
        h
    }

    /// One UDP NAT service, VIP4:53 to BACKEND4:5353, with a single source
    /// port (32000) and a 1 s UDP timeout, and the flows of two clients
    /// (10.0.0.1 and 10.0.0.2, port 5000) to it.
    fn one_udp_port() -> (Self, [Flow; 2]) {
        let t = Timeouts {
            udp: 1,
            ..DEFAULT_TIMEOUTS
        };
        let (be, vip) = (sa("10.0.1.11:5353"), sa("10.0.100.1:53"));
        let clients = ["10.0.0.1:5000", "10.0.0.2:5000"];
        let flows = clients.map(|c| Flow::one_backend(sa(c), vip, be, PROTO_UDP));
        (Self::one_service(vip, PROTO_UDP, be, (32000, 1), t), flows)
    }

    /// Runs the program on `input`: (verdict, output frame).
    fn run(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        self.dp.run(input).unwrap()
    }

    /// Runs the program on `input`, which it must forward (XDP_TX): the
    /// output frame.
    fn run_tx(&mut self, what: &str, input: &[u8]) -> Vec<u8> {
        let (verdict, out) = self.run(input);
        assert_eq!(
            verdict,
            XDP_TX,
            "{what}: verdict (output:\n{})",
            frame::hex(&out)
        );
        out
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
        let key = addr::flow_key(client, vip, proto);
        self.dp.maps.nat_fwd.get(&key, 0).ok()
    }

    /// NAT_REV entry of the backend's replies to `snat`.
    fn rev(&self, backend: SocketAddr, snat: SocketAddr, proto: u8) -> Option<NatRev> {
        let key = addr::flow_key(backend, snat, proto);
        self.dp.maps.nat_rev.get(&key, 0).ok()
    }

    /// Sends the client's `seg` through; it must be translated to `to`'s
    /// backend (`to.id` at `to.backend`) from its SNAT address: returns the
    /// allocated port, after checking the output byte for byte and its
    /// checksums.
    fn forward(&mut self, what: &str, seg: &Seg, to: &Flow) -> u16 {
        let out = self.run_tx(what, &from_client(seg));
        let f = self
            .fwd(seg.src, seg.dst, seg.proto)
            .unwrap_or_else(|| panic!("{what}: no NAT_FWD entry"));
        assert_eq!(f.backend, to.id, "{what}: NAT_FWD backend");
        let port = u16::from_be(f.nat_port_be);
        let expected = seg
            .between(SocketAddr::new(to.snat, port), to.backend)
            .frame(backend_mac(to.id), LB_MAC_B);
        let message = format!("{what}: output frame (translated to port {port})");
        assert_frame(&out, &expected, message);
        let l4 = if seg.proto == PROTO_TCP {
            "TCP"
        } else if seg.no_udp_checksum {
            "UDP without checksum"
        } else {
            "UDP"
        };
        let ipv4_header = seg.src.is_ipv4().then_some("IPv4 header");
        let expect_checks: Vec<_> = ipv4_header.into_iter().chain([l4]).collect();
        let checks = verify(what, &out);
        assert_eq!(checks, expect_checks, "{what}: checksums verified");
        port
    }

    /// [`Harness::forward`] of `f`'s client segment with `flags` and
    /// `payload`: the allocated port.
    fn client_sends(&mut self, what: &str, f: &Flow, flags: u8, payload: &[u8]) -> u16 {
        self.forward(what, &client_seg(f, flags, payload), f)
    }

    /// [`Harness::reverse`] of `f`'s backend segment to `port` with `flags`
    /// and `payload`.
    fn backend_sends(&mut self, what: &str, f: &Flow, port: u16, flags: u8, payload: &[u8]) {
        self.reverse(what, &backend_seg(f, port, flags, payload), f);
    }

    /// Sends backend `f.id`'s `seg` (backend -> snat:port) through; it must
    /// reach `f.client` as `f.vip -> f.client`, checked byte for byte.
    fn reverse(&mut self, what: &str, seg: &Seg, f: &Flow) {
        let out = self.run_tx(what, &from_backend(seg, f.id));
        let expected = seg.between(f.vip, f.client).frame(CLIENT_MAC, LB_MAC_A);
        assert_frame(&out, &expected, format!("{what}: output frame"));
        let checks = verify(what, &out);
        assert!(
            !checks.is_empty() && checks.iter().all(|c| c != "inner L4 cut short"),
            "{what}: {checks:?}"
        );
    }
}

// ---------------------------------------------------------------- cases

/// A client's flow to a VIP, and the backend and SNAT address it is
/// translated to.
#[derive(Clone, Copy)]
struct Flow {
    what: &'static str,
    client: SocketAddr,
    vip: SocketAddr,
    backend: SocketAddr,
    id: u32,
    snat: IpAddr,
    proto: u8,
}

impl Flow {
    /// `client`'s flow to `vip` through backend 0 at `backend`, from SNAT4
    /// (the services of one backend).
    fn one_backend(client: SocketAddr, vip: SocketAddr, backend: SocketAddr, proto: u8) -> Flow {
        Flow {
            what: "",
            client,
            vip,
            backend,
            id: 0,
            snat: ip(SNAT4),
            proto,
        }
    }

    /// The same flow from the client's port `port`.
    fn with_client_port(&self, port: u16) -> Flow {
        let client = SocketAddr::new(self.client.ip(), port);
        Flow { client, ..*self }
    }
}

/// A flow to each standard service: from 10.0.0.1 or fd00::1, ports
/// 40000 + id.
fn standard_flows() -> Vec<Flow> {
    let flow = |(id, (what, vip, port, proto, backend, backend_port, snat))| {
        let client = if vip == VIP4 { "10.0.0.1" } else { "fd00::1" };
        Flow {
            what,
            client: SocketAddr::new(ip(client), 40000 + id as u16),
            vip: SocketAddr::new(ip(vip), port),
            backend: SocketAddr::new(ip(backend), backend_port),
            id,
            snat: ip(snat),
            proto,
        }
    };
    (0..).zip(STANDARD).map(flow).collect()
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
        let what = f.what;
        // The client's first packet: a new translation, VIP:80 -> backend:8080.
        let port = h.client_sends(what, &f, frame::SYN, b"hello");
        assert!(
            (20000..60000).contains(&port),
            "{what}: port {port} outside 20000-59999"
        );

        // Both table entries, field by field.
        // Unanswered so far: the short timeout. A TCP side's sequence
        // numbers are tracked from its first segment.
        let (tracked, client_seq) = if f.proto == PROTO_TCP {
            (NAT_F_SEQ, client_seg(&f, frame::SYN, b"").seq)
        } else {
            (0, 0)
        };
        let unanswered = (0, NAT_UNANSWERED_TIMEOUT_S);
        let fwd = h.fwd(f.client, f.vip, f.proto).unwrap();
        let client_side = (fwd.flags, fwd.timeout_s, fwd.seq);
        let expected = (tracked, NAT_UNANSWERED_TIMEOUT_S, client_seq);
        assert_eq!(client_side, expected, "{what}: {fwd:?}");
        assert!(fwd.last_seen_ns > 0, "{what}: {fwd:?}");
        let snat = SocketAddr::new(f.snat, port);
        let rev = h
            .rev(f.backend, snat, f.proto)
            .unwrap_or_else(|| panic!("{what}: no NAT_REV entry for the reply key"));
        let endpoint =
            |words, port_be| SocketAddr::new(addr::from_words(words), u16::from_be(port_be));
        assert_eq!(endpoint(rev.client, rev.client_port_be), f.client, "{what}");
        assert_eq!(endpoint(rev.vip, rev.vip_port_be), f.vip, "{what}");
        assert_eq!(
            (rev.client_mac, rev.lb_mac),
            (CLIENT_MAC, LB_MAC_A),
            "{what}: MACs of the client side"
        );
        assert_eq!(rev.ifindex, LO_IFINDEX, "{what}: ingress interface");
        assert_eq!((rev.flags, rev.timeout_s), unanswered, "{what}: {rev:?}");

        // The backend's reply to the allocated port goes back to the client,
        // and the flow, answered, gets the service's full timeout both ways.
        let reply = backend_seg(&f, port, frame::SYN | frame::ACK, b"world!");
        h.reverse(what, &reply, &f);
        let fwd = h.fwd(f.client, f.vip, f.proto).unwrap();
        let rev = h.rev(f.backend, snat, f.proto).unwrap();
        let timeout = if f.proto == PROTO_TCP {
            DEFAULT_TIMEOUTS.tcp
        } else {
            DEFAULT_TIMEOUTS.udp
        };
        assert_eq!(
            [(fwd.flags, fwd.timeout_s), (rev.flags, rev.timeout_s)],
            [(NAT_F_ANSWERED | tracked, timeout); 2],
            "{what}: answered"
        );

        // The next client packet hits the same translation.
        let data = client_seg(&f, frame::ACK | frame::PSH, b"GET / HTTP/1.0\r\n\r\n");
        let again = h.forward(what, &data, &f);
        assert_eq!(again, port, "{what}: same port for the same flow");
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
    let port = h.forward("UDP/IPv4, checksum 0", &query, f);
    let mut answer = backend_seg(f, port, 0, b"answer");
    answer.no_udp_checksum = true;
    h.reverse("UDP/IPv4 reply, checksum 0", &answer, f);
    // The reply's output frame was compared byte for byte with a frame
    // whose UDP checksum is 0; say so explicitly too.
    let (_, out) = h.run(&from_backend(&answer, f.id));
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
        let port = h.client_sends(f.what, f, 0, b"first");
        let snat = SocketAddr::new(f.snat, port);
        // Forward: the translated datagram's checksum computes to 0.
        let payload = payload_for_zero_checksum(snat, f.backend, b"to-backend");
        let seg = client_seg(f, 0, &payload);
        assert_ne!(
            &seg.l4()[6..8],
            &[0xff, 0xff],
            "the client's own datagram has an ordinary checksum"
        );
        let translated = seg.between(snat, f.backend);
        assert_eq!(&translated.l4()[6..8], &[0xff, 0xff], "test premise");
        h.forward(f.what, &seg, f);
        // Reverse: the datagram translated back to the client's computes to 0.
        let payload = payload_for_zero_checksum(f.vip, f.client, b"to-the-client!");
        let reply = backend_seg(f, port, 0, &payload);
        let translated = reply.between(f.vip, f.client);
        assert_eq!(&translated.l4()[6..8], &[0xff, 0xff], "test premise");
        h.reverse(f.what, &reply, f);
    }
}

#[test]
fn replies_matching_no_flow_pass_untouched() {
    let mut h = Harness::standard();
    let flows = standard_flows();
    let f = &flows[0];
    let port = h.client_sends("setup", f, frame::SYN, b"x");
    let other_port = if port == 20000 { 20001 } else { port - 1 };
    let to_port = SocketAddr::new(f.snat, port);
    let ack = |from: &str| from_backend(&Seg::tcp(sa(from), to_port, frame::ACK, b"x"), 0);
    let ssh = Seg::tcp(sa("10.0.1.11:50000"), sa("10.0.1.1:22"), frame::SYN, b"");
    let echo = frame::icmp_message(ip(BACKEND4), ip(SNAT4), 8, 0, [0, 1, 0, 1], &[]);
    // The IPv4 reply's addresses written as IPv6 (`::ffff:a.b.c.d`): the
    // datapath's keys store IPv4 that way, but no IPv4 flow is IPv6.
    let mapped = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), a.port()),
        IpAddr::V6(_) => a,
    };
    let mapped_reply = Seg::tcp(mapped(f.backend), mapped(to_port), frame::ACK, b"x");
    // A router's "fragmentation needed" about a translated reply (VIP ->
    // client), sent to the VIP: the client side's business, not a
    // backend's (a DSR service's would go to its backend).
    let about_reply = {
        let reply = Seg::tcp(f.vip, f.client, frame::ACK, &[0; 1400]).ip();
        let quote = frame::quote(&reply, 548, true);
        let error = frame::icmp_message(ip(ROUTER4), f.vip.ip(), 3, 4, [0, 0, 5, 0x78], &quote);
        frame::frame(LB_MAC_A, ROUTER_MAC, &error)
    };
    let cases = [
        (
            "reply to a port with no translation",
            from_backend(&backend_seg(f, other_port, frame::ACK, b"x"), 0),
        ),
        ("reply from another backend port", ack("10.0.1.11:8081")),
        (
            "reply from another host to the translated port",
            ack("10.0.1.99:8080"),
        ),
        (
            "UDP to a port translated for TCP",
            from_backend(&Seg::udp(f.backend, to_port, b"x"), 0),
        ),
        (
            "the host's own traffic (SSH to the SNAT address)",
            from_backend(&ssh, 0),
        ),
        (
            "ICMP echo request to the SNAT address",
            frame::frame(LB_MAC_B, backend_mac(0), &echo),
        ),
        (
            "IPv6 reply to a port with no translation",
            from_backend(&backend_seg(&flows[2], 20000, frame::ACK, b"x"), 2),
        ),
        (
            "IPv6 in the IPv4-mapped form of a translated reply",
            from_backend(&mapped_reply, 0),
        ),
        ("an ICMP error about a reply, sent to the VIP", about_reply),
    ];
    for (what, input) in &cases {
        let (verdict, out) = h.run(input);
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(out, *input, "{what}: must pass unchanged");
    }
    assert_eq!(h.reason(Reason::PassNotService), cases.len() as u64);
    assert_eq!(h.reason(Reason::NatReply), 0);

    // With NAT disabled in the globals, even a real reply is not looked up.
    h.dp.set_nat_enabled(false).unwrap();
    let reply = from_backend(&backend_seg(f, port, frame::ACK, b"x"), 0);
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
        let port = h.client_sends(f.what, f, frame::SYN, b"");
        let fwd = h.fwd(f.client, f.vip, f.proto).unwrap();
        assert_eq!(fwd.flags & NAT_F_CLOSING, 0);
        h.client_sends(f.what, f, frame::FIN | frame::ACK, b"");
        let fwd = h.fwd(f.client, f.vip, f.proto).unwrap();
        assert_eq!(
            (fwd.flags & NAT_F_CLOSING, fwd.timeout_s),
            (NAT_F_CLOSING, DEFAULT_TIMEOUTS.closing),
            "{}: client FIN sets NAT_F_CLOSING on NAT_FWD and the closing timeout: {fwd:?}",
            f.what
        );
        assert_eq!(u16::from_be(fwd.nat_port_be), port);

        // Backend resets another flow: RST reverse.
        let g = f.with_client_port(f.client.port() + 100);
        let port = h.client_sends(g.what, &g, frame::SYN, b"");
        h.backend_sends(g.what, &g, port, frame::RST | frame::ACK, b"");
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
        let k = f.with_client_port(f.client.port() + 200);
        h.client_sends(k.what, &k, frame::SYN, b"");
        h.client_sends(k.what, &k, frame::RST, b"");
        let fwd = h.fwd(k.client, k.vip, k.proto).unwrap();
        assert_eq!(
            (fwd.flags & NAT_F_CLOSING, fwd.timeout_s),
            (NAT_F_CLOSING, DEFAULT_TIMEOUTS.closing),
            "{}: client RST: {fwd:?}",
            k.what
        );
    }
}

/// A FIN or RST far from its sender's sequence numbers is a stranger's
/// (spoofing a client's, or a backend's, 5-tuple blindly): it must not
/// mark the flow closing, or one spoofed segment per guessed client port
/// would cut every connection of that client idle for longer than
/// `tcp_closing_timeout`. It is still forwarded (the endpoint answers it
/// itself, RFC 5961), and so is a stray data segment, which must not move
/// the tracked sequence next to the stray FIN or RST either. The sender's
/// own FIN or RST closes, also across the sequence numbers' wrap.
#[test]
fn a_fin_or_rst_out_of_its_senders_window_does_not_close_a_flow() {
    let mut h = Harness::standard();
    let flows = standard_flows();
    // Half the sequence space away: as far as a blind guess can be.
    let at = |seg: Seg, seq: u32| Seg { seq, ..seg };
    let far = |seg: Seg| Seg {
        seq: seg.seq.wrapping_add(0x8000_0000),
        ..seg
    };
    let mut client_port = 41000;
    for f in [&flows[0], &flows[2]] {
        for flags in [frame::RST, frame::RST | frame::ACK, frame::FIN | frame::ACK] {
            for isn in [0x1234_5678, 0xffff_ff00] {
                client_port += 1;
                let f = f.with_client_port(client_port);
                let what = format!("{}, flags {flags:#04x}, ISN {isn:#x}", f.what);
                let syn = at(client_seg(&f, frame::SYN, b""), isn);
                let port = h.forward(&what, &syn, &f);
                h.backend_sends(&what, &f, port, frame::SYN | frame::ACK, b"");
                let data = at(client_seg(&f, frame::ACK, &[7; 0x1ff]), isn + 1);
                h.forward(&what, &data, &f);
                h.forward(&what, &far(data.clone()), &f);
                h.forward(&what, &far(at(client_seg(&f, flags, b""), isn)), &f);
                let ack = backend_seg(&f, port, frame::ACK, b"");
                h.reverse(&what, &far(ack), &f);
                h.reverse(&what, &far(backend_seg(&f, port, flags, b"")), &f);
                let snat = SocketAddr::new(f.snat, port);
                let states = |h: &Harness| {
                    let fwd = h.fwd(f.client, f.vip, f.proto).unwrap();
                    let rev = h.rev(f.backend, snat, f.proto).unwrap();
                    let closing = |flags: u16| flags & NAT_F_CLOSING;
                    [
                        (closing(fwd.flags), fwd.timeout_s),
                        (closing(rev.flags), rev.timeout_s),
                    ]
                };
                let open = (0, DEFAULT_TIMEOUTS.tcp);
                assert_eq!(states(&h), [open; 2], "{what}: strays left the flow open");
                let own = at(client_seg(&f, flags, b""), isn.wrapping_add(0x200));
                h.forward(&what, &own, &f);
                let closing = (NAT_F_CLOSING, DEFAULT_TIMEOUTS.closing);
                assert_eq!(states(&h), [closing; 2], "{what}: the client's own closes");
            }
        }
    }
}

/// A translation's replies go back to the MAC its client's first packet
/// came from. A frame from a group address (broadcast, multicast: no
/// sender has one) or from the zero MAC is malformed and makes none: else
/// a stranger on the client's segment could have a flow's replies, a whole
/// download, sent to every host there.
#[test]
fn a_frame_from_a_group_or_zero_mac_makes_no_translation() {
    let mut h = Harness::standard();
    let macs = [
        [0xff; 6],
        [0x01, 0, 0x5e, 0, 0, 0x01],
        [0x33, 0x33, 0, 0, 0, 0x01],
        [0; 6],
    ];
    let mut cases = 0;
    for f in standard_flows() {
        for mac in macs {
            let input = client_seg(&f, frame::SYN, b"").frame(LB_MAC_A, mac);
            let (verdict, out) = h.run(&input);
            let what = format!("{} from {mac:02x?}", f.what);
            assert_eq!(verdict, XDP_PASS, "{what}");
            assert_eq!(out, input, "{what}: must pass unchanged");
            assert!(
                h.fwd(f.client, f.vip, f.proto).is_none(),
                "{what}: no translation"
            );
            cases += 1;
        }
    }
    assert_eq!(h.reason(Reason::PassMalformed), cases);
    assert_eq!(h.reason(Reason::NatNew), 0);
}

/// After FIN/RST a flow expires after the short closing timeout, so its
/// port can be taken by a new flow then: that is what the closing timeout
/// is for. One port, closing timeout 1 s: the first flow closes, a second
/// client gets the port once the first has been idle for longer than that.
#[test]
fn a_closed_flows_port_is_reused_after_the_closing_timeout() {
    let (be, vip) = (sa("10.0.1.11:8080"), sa("10.0.100.1:80"));
    let t = Timeouts {
        closing: 1,
        ..DEFAULT_TIMEOUTS
    };
    let mut h = Harness::one_service(vip, PROTO_TCP, be, (31000, 1), t);
    let a = Flow::one_backend(sa("10.0.0.1:40000"), vip, be, PROTO_TCP);
    let b = Flow::one_backend(sa("10.0.0.2:40000"), vip, be, PROTO_TCP);
    let first = "first client";
    assert_eq!(h.client_sends(first, &a, frame::SYN, b""), 31000);
    h.backend_sends(first, &a, 31000, frame::SYN | frame::ACK, b"");
    // Both sides close.
    h.client_sends(first, &a, frame::FIN | frame::ACK, b"");
    h.backend_sends(first, &a, 31000, frame::FIN | frame::ACK, b"");
    h.client_sends(first, &a, frame::ACK, b"");

    // While the closed flow is within its closing timeout, the port is taken.
    let (verdict, _) = h.run(&from_client(&client_seg(&b, frame::SYN, b"")));
    assert_eq!(
        verdict, XDP_DROP,
        "the only port is still held by the closing flow"
    );
    assert_eq!(h.reason(Reason::DropNatFull), 1);

    h.age(a.client, vip, PROTO_TCP, Duration::from_millis(1500));
    let rev = h.rev(be, sa("10.0.1.1:31000"), PROTO_TCP).unwrap();
    let (verdict, out) = h.run(&from_client(&client_seg(&b, frame::SYN, b"")));
    assert_eq!(
        verdict,
        XDP_TX,
        "a flow closed (FIN both ways) and idle 1.5 s, past its 1 s closing timeout, \
         still holds its port: \
         NAT_FWD {:?}, NAT_REV {rev:?} (output {})",
        h.fwd(a.client, vip, PROTO_TCP),
        frame::hex(&out)
    );
    assert_eq!(h.client_sends("second client", &b, frame::ACK, b""), 31000);
    h.backend_sends(
        "reply now goes to the second client",
        &b,
        31000,
        frame::ACK,
        b"",
    );
}

/// An idle UDP flow's port is reclaimed for a new flow after the UDP
/// timeout; the old flow, if it comes back, does not steal it back.
/// A translation that died stays dead when its client makes a new one of
/// the same 5-tuple: the client's NAT_FWD entry is then the new
/// translation's, which does not own the old reply entry, so a late reply
/// to the old port is no reply of a translation (it would otherwise be
/// sent into the new one's connection).
#[test]
fn a_late_reply_to_a_dead_translation_is_not_sent_into_its_new_one() {
    let mut h = Harness::standard();
    let f = standard_flows()[1];
    let old = h.client_sends("first translation", &f, 0, b"q1");
    let old_rev = h.rev(f.backend, SocketAddr::new(f.snat, old), f.proto);
    let timeout = old_rev
        .expect("the first translation's reply entry")
        .timeout_s;
    // Past its timeout and the datapath's reclaim window: the new
    // translation neither reuses nor removes the old reply entry, which is
    // the sweeper's to delete from now on.
    let past = timeout + NAT_RECLAIM_WINDOW_S + NAT_SWEEP_MARGIN_S + 1;
    h.age(f.client, f.vip, f.proto, Duration::from_secs(past.into()));
    let new = h.client_sends("new translation of the same 5-tuple", &f, 0, b"q2");
    assert_ne!(
        new, old,
        "a reply entry the datapath may not reclaim kept its port"
    );
    let old_rev = h.rev(f.backend, SocketAddr::new(f.snat, old), f.proto);
    assert!(
        old_rev.is_some(),
        "the old reply entry is left to the sweeper"
    );

    let late = from_backend(&backend_seg(&f, old, 0, b"late"), f.id);
    let (verdict, out) = h.run(&late);
    assert_eq!(verdict, XDP_PASS, "a late reply to the dead translation");
    assert_eq!(
        out, late,
        "a late reply to the dead translation passes unchanged"
    );
    assert_eq!(h.reason(Reason::NatReply), 0);
    h.backend_sends("a reply to the new translation", &f, new, 0, b"a2");
}

#[test]
fn an_idle_udp_flows_port_is_reclaimed() {
    let (mut h, [a, b]) = Harness::one_udp_port();
    assert_eq!(h.client_sends("first client", &a, 0, b"q"), 32000);
    let (verdict, _) = h.run(&from_client(&client_seg(&b, 0, b"q")));
    assert_eq!(verdict, XDP_DROP, "port held by a live flow");
    h.age(a.client, a.vip, PROTO_UDP, Duration::from_millis(1500));
    let port = h.client_sends("second client after the timeout", &b, 0, b"q");
    assert_eq!(port, 32000);
    let answer = backend_seg(&b, 32000, 0, b"a");
    h.reverse("reply goes to the second client", &answer, &b);
    let (verdict, _) = h.run(&from_client(&client_seg(&a, 0, b"q")));
    assert_eq!(
        verdict, XDP_DROP,
        "the expired first flow cannot take the port back while the second uses it"
    );
    h.reverse("reply still goes to the second client", &answer, &b);
    assert_eq!(h.reason(Reason::DropNatFull), 2);
}

/// A flow is idle only when neither direction has seen a packet for its
/// timeout. A one-way UDP flow (the client sends, the backend never
/// answers: syslog, metrics) that keeps sending must keep its port: if a
/// new flow took it, both would share one reply key.
#[test]
fn a_one_way_udp_flow_that_keeps_sending_keeps_its_port() {
    let (mut h, [a, b]) = Harness::one_udp_port();
    assert_eq!(h.client_sends("one-way client", &a, 0, b"m1"), 32000);
    h.age(a.client, a.vip, PROTO_UDP, Duration::from_millis(600));
    let port = h.client_sends("one-way client, 0.6 s later", &a, 0, b"m2");
    assert_eq!(port, 32000);
    h.age(a.client, a.vip, PROTO_UDP, Duration::from_millis(600));
    // 1.2 s after the reply entry was written, 0.6 s after the flow's last packet.
    let (verdict, out) = h.run(&from_client(&client_seg(&b, 0, b"q")));
    assert_eq!(
        verdict,
        XDP_DROP,
        "a new flow took the only port from a flow that sent 0.6 s ago (UDP timeout 1 s): \
         NAT_FWD {:?}, NAT_REV {:?}, output {}",
        h.fwd(a.client, a.vip, PROTO_UDP),
        h.rev(a.backend, sa("10.0.1.1:32000"), PROTO_UDP),
        frame::hex(&out)
    );
    assert_eq!(
        h.client_sends("one-way client goes on", &a, 0, b"m3"),
        32000
    );
    h.backend_sends(
        "a late answer reaches the one-way client",
        &a,
        32000,
        0,
        b"a",
    );
}

/// A pool of SNAT addresses: each address has the whole port range, so
/// two addresses with one port each hold two flows; replies to either are
/// translated back; a third flow finds no (address, port) left.
#[test]
fn a_pool_of_snat_addresses_multiplies_the_ports() {
    let (be, vip) = (sa("10.0.1.12:8080"), sa("10.0.100.2:80"));
    let mut h = Harness::one_service(vip, PROTO_TCP, be, (30000, 1), DEFAULT_TIMEOUTS);
    let pool = ["10.0.1.1", "10.0.1.2"];
    let mut snat = SnatPool {
        count: 2,
        ..SnatPool::default()
    };
    for (slot, a) in snat.addrs.iter_mut().zip(pool) {
        *slot = addr::to_words(ip(a));
    }
    h.dp.maps.snat_pools.set(0, snat, 0).unwrap();
    let mut used = Vec::new();
    let first = Flow::one_backend(sa("10.0.0.1:40000"), vip, be, PROTO_TCP);
    for n in 0..2 {
        let client = first.with_client_port(40000 + n);
        let input = from_client(&client_seg(&client, frame::SYN, b""));
        assert_eq!(h.run(&input).0, XDP_TX, "client {n}");
        let f = h.fwd(client.client, vip, PROTO_TCP).expect("translated");
        let from = addr::from_words(f.snat_addr);
        let port = u16::from_be(f.nat_port_be);
        assert_eq!(port, 30000);
        used.push(from);
        let to = SocketAddr::new(from, port);
        let reply = Seg::tcp(be, to, frame::SYN | frame::ACK, b"");
        h.reverse("the backend's answer", &reply, &client);
    }
    used.sort();
    assert_eq!(used, [ip(pool[0]), ip(pool[1])], "one flow on each address");
    let input = from_client(&Seg::tcp(sa("10.0.0.1:40002"), vip, frame::SYN, b""));
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
    let (be, vip) = (sa("10.0.1.12:8080"), sa("10.0.100.2:80"));
    let mut h = Harness::one_service(vip, PROTO_TCP, be, (BASE, COUNT), DEFAULT_TIMEOUTS);
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
    let client = |c: &str| Flow::one_backend(sa(c), vip, be, PROTO_TCP);
    let first = client("10.0.0.1:40000");
    for n in 0..40 {
        let f = first.with_client_port(40000 + n);
        let port = h.client_sends("a new client", &f, frame::SYN, b"");
        assert_eq!(port, FREE, "client {n}: the one free port");
        let fwd_key = addr::flow_key(f.client, vip, PROTO_TCP);
        h.dp.maps.nat_fwd.remove(&fwd_key).unwrap();
        let rev_key = addr::flow_key(be, SocketAddr::new(ip(SNAT4), FREE), PROTO_TCP);
        h.dp.maps.nat_rev.remove(&rev_key).unwrap();
    }
    assert_eq!(h.reason(Reason::DropNatFull), 0);
    // With that port taken too, the range is full: the next client is
    // refused.
    let last = client("10.0.0.2:40000");
    h.client_sends("the last port's client", &last, frame::SYN, b"");
    let input = from_client(&Seg::tcp(sa("10.0.0.3:40000"), vip, frame::SYN, b""));
    assert_eq!(h.run(&input).0, XDP_DROP, "no port left");
    assert_eq!(h.reason(Reason::DropNatFull), 1);
}

#[test]
fn a_full_port_range_drops_new_flows_and_keeps_old_ones() {
    let (be, vip) = (sa("10.0.1.12:8080"), sa("10.0.100.2:80"));
    let mut h = Harness::one_service(vip, PROTO_TCP, be, (30000, 2), DEFAULT_TIMEOUTS);
    let clients = ["10.0.0.1:40000", "10.0.0.2:40000", "10.0.0.3:40000"]
        .map(|c| Flow::one_backend(sa(c), vip, be, PROTO_TCP));
    let p1 = h.client_sends("client 1", &clients[0], frame::SYN, b"");
    let p2 = h.client_sends("client 2", &clients[1], frame::SYN, b"");
    let mut ports = [p1, p2];
    ports.sort();
    assert_eq!(ports, [30000, 30001], "two flows, two ports of the range");

    let (verdict, _) = h.run(&from_client(&client_seg(&clients[2], frame::SYN, b"")));
    assert_eq!(
        verdict, XDP_DROP,
        "third client: no free port, the packet is dropped (not passed to the kernel)"
    );
    assert_eq!(h.reason(Reason::DropNatFull), 1, "drop_nat_full");
    assert!(
        h.fwd(clients[2].client, vip, PROTO_TCP).is_none(),
        "no NAT_FWD entry for the refused flow"
    );
    let rev_entries = h.dp.maps.nat_rev.keys().filter_map(Result::ok).count();
    assert_eq!(rev_entries, 2, "NAT_REV holds the two flows only");

    // The first two still translate, both ways, on their ports.
    for (c, port) in clients[..2].iter().zip([p1, p2]) {
        assert_eq!(h.client_sends("established", c, frame::ACK, b"more"), port);
        h.backend_sends("established reply", c, port, frame::ACK, b"ok");
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
        payload: Vec<u8>,
        /// ICMP type, code, the 4 bytes after the checksum.
        icmp: (u8, u8, [u8; 4]),
        /// How much of the packet the router quotes.
        quote_max: usize,
        /// The router decremented the TTL / hop limit before quoting.
        decrement: bool,
        /// Checks `verify` must make on the output.
        checks: Vec<&'static str>,
    }
    // MTU 1400, 1280.
    let (frag_needed, too_big) = ((3, 4, [0, 0, 0x05, 0x78]), (2, 0, [0, 0, 0x05, 0x00]));
    let v4 = |inner| vec!["IPv4 header", "ICMP", "inner IPv4 header", inner];
    let v6 = |inner| vec!["ICMPv6", inner];
    // Each case's client port is 41000 + its index.
    let cases = [
        IcmpCase {
            what: "IPv4 fragmentation needed, whole packet quoted",
            flow: 0,
            payload: b"hello".to_vec(),
            icmp: frag_needed,
            quote_max: 548,
            decrement: false,
            checks: v4("inner TCP"),
        },
        IcmpCase {
            what: "IPv4 fragmentation needed, 548 of 1040 bytes quoted (as Linux routers do), \
                   TTL decremented",
            flow: 0,
            payload: big.clone(),
            icmp: frag_needed,
            quote_max: 548,
            decrement: true,
            checks: v4("inner L4 cut short"),
        },
        IcmpCase {
            what: "IPv4 fragmentation needed, header + 8 bytes quoted \
                   (RFC 792 minimum: no TCP checksum in the quote)",
            flow: 0,
            payload: big.clone(),
            icmp: frag_needed,
            quote_max: 28,
            decrement: false,
            checks: v4("inner L4 cut short"),
        },
        IcmpCase {
            what: "IPv4 time exceeded",
            flow: 0,
            payload: b"ttl".to_vec(),
            icmp: (11, 0, [0; 4]),
            quote_max: 548,
            decrement: false,
            checks: v4("inner TCP"),
        },
        IcmpCase {
            what: "IPv4 port unreachable about UDP",
            flow: 1,
            payload: b"query".to_vec(),
            icmp: (3, 3, [0; 4]),
            quote_max: 548,
            decrement: false,
            checks: v4("inner UDP"),
        },
        IcmpCase {
            what: "ICMPv6 packet too big, whole packet quoted",
            flow: 2,
            payload: b"hello".to_vec(),
            icmp: too_big,
            quote_max: 1232,
            decrement: false,
            checks: v6("inner TCP"),
        },
        IcmpCase {
            what: "ICMPv6 packet too big, 1232 of 1360 bytes quoted, hop limit decremented",
            flow: 2,
            payload: vec![0xa5; 1300],
            icmp: too_big,
            quote_max: 1232,
            decrement: true,
            checks: v6("inner L4 cut short"),
        },
        IcmpCase {
            what: "ICMPv6 port unreachable about UDP",
            flow: 3,
            payload: b"query".to_vec(),
            icmp: (1, 4, [0; 4]),
            quote_max: 1232,
            decrement: false,
            checks: v6("inner UDP"),
        },
        IcmpCase {
            what: "ICMPv6 time exceeded",
            flow: 2,
            payload: b"hop".to_vec(),
            icmp: (3, 0, [0; 4]),
            quote_max: 1232,
            decrement: false,
            checks: v6("inner TCP"),
        },
    ];
    for (n, c) in (0..).zip(&cases) {
        let what = c.what;
        let f = flows[c.flow].with_client_port(41000 + n);
        // Only a SYN opens a TCP translation.
        h.client_sends(what, &f, frame::SYN, b"");
        let seg = client_seg(&f, frame::ACK | frame::PSH, &c.payload);
        let port = h.forward(what, &seg, &f);
        // What the load balancer sent, as the router got it: the output
        // of the forward run (already checked byte for byte).
        let (_, sent) = h.run(&from_client(&seg));
        let router = if f.snat.is_ipv4() { ROUTER4 } else { ROUTER6 };
        let (t, code, rest) = c.icmp;
        let quote = frame::quote(&sent[14..], c.quote_max, c.decrement);
        let error = frame::icmp_message(ip(router), f.snat, t, code, rest, &quote);
        // Anyone can send such an error: it must change no NAT state
        // (no closing, no refresh keeping a dead flow alive).
        let snat = SocketAddr::new(f.snat, port);
        let state = |h: &Harness| {
            (
                h.fwd(f.client, f.vip, f.proto),
                h.rev(f.backend, snat, f.proto),
            )
        };
        let before = state(&h);
        let out = h.run_tx(what, &frame::frame(LB_MAC_B, ROUTER_MAC, &error));
        assert_eq!(state(&h), before, "{what}: NAT entries after the error");
        // Expected: from the VIP to the client, quoting the client's own
        // packet (as the router would have quoted it had there been no NAT).
        let quote = frame::quote(&seg.ip(), c.quote_max, c.decrement);
        let expected_ip = frame::icmp_message(f.vip.ip(), f.client.ip(), t, code, rest, &quote);
        // The router's TTL and IP id are kept on the outer header.
        let expected = frame::frame(CLIENT_MAC, LB_MAC_A, &expected_ip);
        assert_frame(
            &out,
            &expected,
            format!("{what}: output frame (translated port {port})"),
        );
        assert_eq!(verify(what, &out), c.checks, "{what}: checksums verified");
    }
    assert_eq!(h.reason(Reason::NatIcmp), cases.len() as u64);
}

#[test]
fn icmp_not_about_a_translated_flow_passes_untouched() {
    let mut h = Harness::standard();
    let flows = standard_flows();
    let f = &flows[0];
    let port = h.client_sends("setup", f, frame::SYN, b"");
    let other_port = if port == 20000 { 20001 } else { port - 1 };
    // An IPv4 "fragmentation needed" from the router to `to` quoting `quote`.
    let frag_needed = |to: IpAddr, quote: Seg| {
        frame::icmp_message(ip(ROUTER4), to, 3, 4, [0, 0, 5, 0x78], &quote.ip())
    };
    let to_backend =
        |f: &Flow, port| Seg::tcp(SocketAddr::new(f.snat, port), f.backend, frame::ACK, b"x");
    let (unknown, live) = (to_backend(f, other_port), to_backend(f, port));
    let v6_unknown = to_backend(&flows[2], 20000);
    let own = Seg::tcp(sa("10.0.1.1:33000"), sa("10.0.9.9:443"), frame::ACK, b"x");
    let cases = [
        (
            "frag needed about a port with no translation",
            frag_needed(ip(SNAT4), unknown),
        ),
        (
            "frag needed about the lb's own traffic to another host",
            frag_needed(ip(SNAT4), own),
        ),
        (
            "ICMPv6 packet too big about a port with no translation",
            frame::icmp_message(ip(ROUTER6), ip(SNAT6), 2, 0, [0, 0, 5, 0], &v6_unknown.ip()),
        ),
        (
            // Found by the fuzzer: the quote matches a live translation,
            // but the error is addressed to another host.
            "frag needed quoting a live translation, addressed elsewhere",
            frag_needed(ip("10.0.1.99"), live),
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
    for (i, b) in (0..).zip(backends) {
        h.set_backend(i, 0, SocketAddr::new(ip(b), 8080), ip(SNAT4));
    }
    let vip = sa("10.0.100.1:80");
    let ports = (20000, 40000);
    h.set_service(0, vip, PROTO_TCP, &[0, 1, 2], ports, DEFAULT_TIMEOUTS);
    let mut used = [0u32; 3];
    for port in 20000..20090u16 {
        let client = SocketAddr::new(ip("10.0.0.1"), port);
        let expected = h.dp.maps.route(client, vip, PROTO_TCP).unwrap();
        let id = expected.backend_id;
        let be = SocketAddr::new(ip(backends[id as usize]), 8080);
        assert_eq!(expected.backend, be);
        let f = Flow {
            id,
            ..Flow::one_backend(client, vip, be, PROTO_TCP)
        };
        h.client_sends("Maglev pick", &f, frame::SYN, b"");
        used[id as usize] += 1;
    }
    assert!(
        used.iter().all(|&n| n > 15),
        "90 flows over 3 backends: {used:?}"
    );
    // Ports are distinct per backend (reply keys are unique).
    let rev_entries = h.dp.maps.nat_rev.keys().filter_map(Result::ok).count();
    assert_eq!(rev_entries, 90);
}

/// A service that retries refused flows (`retry_refused`, the default):
/// two backends; the one a flow first goes to refuses it (RST to the SYN).
fn retrying() -> Harness {
    let mut h = Harness::new();
    for id in 0..2 {
        h.set_backend(id, 0, retrying_backend(id), ip(SNAT4));
    }
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
    sa(["10.0.1.11:8080", "10.0.1.12:8080"][id as usize])
}

/// The client's SYN: (backend id, port) it was translated to.
fn syn_goes_to(h: &mut Harness, client: SocketAddr) -> (u32, u16) {
    let seg = Seg::tcp(client, sa("10.0.100.1:80"), frame::SYN, b"");
    let (verdict, _) = h.run(&from_client(&seg));
    assert_eq!(verdict, XDP_TX, "{client}: SYN forwarded");
    let f = h.fwd(client, sa("10.0.100.1:80"), PROTO_TCP).unwrap();
    (f.backend, u16::from_be(f.nat_port_be))
}

/// Backend `id` resets the flow translated to `port`: the verdict.
fn backend_resets(h: &mut Harness, id: u32, port: u16) -> u32 {
    let to = SocketAddr::new(ip(SNAT4), port);
    let seg = Seg::tcp(retrying_backend(id), to, frame::RST | frame::ACK, b"");
    h.run(&from_backend(&seg, id)).0
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
    let old_snat = SocketAddr::new(ip(SNAT4), port);
    assert!(h
        .rev(retrying_backend(first), old_snat, PROTO_TCP)
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
    let to = SocketAddr::new(ip(SNAT4), port);
    let syn_ack = Seg::tcp(retrying_backend(first), to, frame::SYN | frame::ACK, b"");
    let (verdict, _) = h.run(&from_backend(&syn_ack, first));
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
    let (verdict, _) = h.run(&from_client(&data));
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
    let (verdict, _) = h.run(&from_client(&data));
    assert_eq!(verdict, XDP_DROP, "a segment of an unknown flow");
    assert!(h.fwd(f.client, f.vip, f.proto).is_none(), "no port spent");
    assert_eq!(h.reason(Reason::DropNatNoFlow), 1);
    let port = h.client_sends("SYN", f, frame::SYN, b"");
    assert_eq!(h.forward("data", &data, f), port);
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
    let port = h.client_sends("SYN", f, frame::SYN, b"");
    replicate(&mut h, f, port);
    let reply = backend_seg(f, port, frame::ACK, b"answer");
    let translated = reply.between(f.vip, f.client);

    // Forwarding is off (a new namespace's default): the kernel's lookup
    // refuses, so the reply goes to the kernel translated, MACs untouched.
    let (verdict, out) = ns.run(|| h.run(&from_backend(&reply, f.id)));
    assert_eq!(verdict, XDP_PASS);
    assert_frame(&out, &from_backend(&translated, f.id), "MACs untouched");
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
        exec_line(&ns, cmd);
    }
    let (verdict, out) = ns.run(|| h.run(&from_backend(&reply, f.id)));
    let veth_mac = [0x02, 0, 0, 0, 0x0e, 0x01];
    let expected = translated.frame(client_mac, veth_mac);
    assert_frame(&out, &expected, "to the client's neighbour");
    // The veth is not one of the datapath's egress ports: the redirect
    // is refused and counted, which is fine here: the way was found.
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(h.reason(Reason::DropRedirect), 1);
    let snat = SocketAddr::new(f.snat, port);
    let rev = h.rev(f.backend, snat, f.proto).unwrap();
    assert_eq!((rev.client_mac, rev.lb_mac), (client_mac, veth_mac));
    assert_ne!(rev.ifindex, 0);
    assert_eq!(h.reason(Reason::PassNoRoute), 1);
}
