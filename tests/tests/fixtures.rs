//! Packet fixtures through the real compiled XDP program (BPF_PROG_TEST_RUN),
//! table-driven as Katran's and Cilium's datapath tests are: each case has a
//! description, an input frame, the expected verdict and the expected output
//! frame. Maps are populated by the test itself. Needs root (BPF).

use std::net::{IpAddr, SocketAddr};

use xdp_common::{
    Backend, Reason, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, FLOW_F_RETRIED, PROTO_TCP,
    PROTO_UDP, SVC_F_HASH_SRC_ONLY, SVC_F_NO_BACKEND,
};
use xdplb::addr;
use xdplb_tests::{
    datapath::{dsr_service, TestDatapath, LO_IFINDEX, TABLE_SIZE, XDP_DROP, XDP_PASS, XDP_TX},
    frame::{self, with_macs, Seg},
};

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BACKEND_MACS: [[u8; 6]; 3] = [
    [0x02, 0, 0, 0, 0, 0x11],
    [0x02, 0, 0, 0, 0, 0x12],
    [0x02, 0, 0, 0, 0, 0x13],
];

/// A TCP SYN or UDP datagram with a 4-byte payload from `src` to `dst`,
/// client to load balancer, optionally VLAN-tagged.
fn packet(src: &str, dst: &str, proto: u8, vlan: Option<u16>) -> Vec<u8> {
    Seg::probe(sa(src), sa(dst), proto)
        .tagged(vlan)
        .frame(LB_MAC, CLIENT_MAC)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------- harness

/// The shared datapath harness with this file's backends and services.
struct Harness(TestDatapath);

impl Harness {
    fn set_backend(&mut self, id: u32, ip: &str, state: u32) {
        let b = Backend {
            addr: addr::to_words(ip.parse().unwrap()),
            dst_mac: BACKEND_MACS[id as usize],
            src_mac: LB_MAC,
            ifindex: LO_IFINDEX,
            state,
            port_be: 80u16.to_be(),
            ..Default::default()
        };
        self.0.set_backend(id, b).unwrap();
    }

    /// Programs a service whose table holds `members` (repeated to fill
    /// it) at `base`; no members: a service without backends.
    fn set_service(&mut self, vip: &str, proto: u8, id: u32, base: u32, members: &[u32]) {
        let mut svc = dsr_service(id, base, TABLE_SIZE);
        if members.is_empty() {
            svc.flags = SVC_F_NO_BACKEND;
        }
        self.0.set_service(sa(vip), proto, svc, members).unwrap();
    }

    /// One standard setup: backends 0..3 active; TCP and UDP services on
    /// an IPv4 and an IPv6 VIP, all served by backend 0 only (so the
    /// expected output is known without hashing), plus a three-backend
    /// service on port 8080.
    fn standard() -> Self {
        let mut h = Self(TestDatapath::load("fixture").expect("loading the XDP program"));
        h.0.accept_macs(&[(LO_IFINDEX, LB_MAC)], &[]).unwrap();
        for (id, ip) in ["10.0.0.11", "10.0.0.12", "10.0.0.13"].iter().enumerate() {
            h.set_backend(id as u32, ip, BACKEND_ACTIVE);
        }
        for (vip, proto, id, members) in [
            ("10.0.100.1:80", PROTO_TCP, 0, &[0][..]),
            ("10.0.100.1:53", PROTO_UDP, 1, &[0]),
            ("[fd00:100::1]:80", PROTO_TCP, 2, &[0]),
            ("[fd00:100::1]:53", PROTO_UDP, 3, &[0]),
            ("10.0.100.1:8080", PROTO_TCP, 4, &[0, 1, 2]),
        ] {
            h.set_service(vip, proto, id, 2 * id * TABLE_SIZE, members);
        }
        h
    }

    /// Runs the program on `input`: (verdict, output frame).
    fn run(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        self.0.run(input).unwrap()
    }

    fn reason(&self, r: Reason) -> u64 {
        self.0.reason(r).unwrap()
    }
}

// ---------------------------------------------------------------- cases

/// Which backend a forwarded frame went to, by its destination MAC.
fn backend_of(out: &[u8]) -> Option<usize> {
    BACKEND_MACS.iter().position(|m| out[..6] == m[..])
}

struct Case {
    what: &'static str,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
}

fn check(h: &mut Harness, cases: impl IntoIterator<Item = Case>) {
    for c in cases {
        let (verdict, out) = h.run(&c.input);
        assert_eq!(verdict, c.verdict, "{}: verdict", c.what);
        assert_eq!(out, c.output, "{}: output frame", c.what);
    }
}

/// Runs `input`, which must be forwarded to `backend`, as one [`Case`].
fn check_forwarded(h: &mut Harness, what: &'static str, input: &[u8], backend: usize) {
    check(h, [forwarded(what, input.to_vec(), backend)]);
}

fn forwarded(what: &'static str, input: Vec<u8>, backend: usize) -> Case {
    let output = with_macs(&input, BACKEND_MACS[backend], LB_MAC);
    Case {
        what,
        input,
        verdict: XDP_TX,
        output,
    }
}

fn untouched(what: &'static str, input: Vec<u8>) -> Case {
    Case {
        what,
        output: input.clone(),
        input,
        verdict: XDP_PASS,
    }
}

/// Service traffic all served by backend 0: (what, source, VIP, protocol,
/// VLAN).
#[rustfmt::skip]
const TO_BACKEND_0: [(&str, &str, &str, u8, Option<u16>); 6] = [
    ("TCP to IPv4 VIP", "10.0.0.1:40000", "10.0.100.1:80", PROTO_TCP, None),
    ("UDP to IPv4 VIP", "10.0.0.1:40000", "10.0.100.1:53", PROTO_UDP, None),
    ("TCP to IPv6 VIP", "[fd00::1]:40000", "[fd00:100::1]:80", PROTO_TCP, None),
    ("UDP to IPv6 VIP", "[fd00::1]:40000", "[fd00:100::1]:53", PROTO_UDP, None),
    ("802.1Q-tagged TCP to IPv4 VIP", "10.0.0.1:40001", "10.0.100.1:80", PROTO_TCP, Some(42)),
    ("802.1Q-tagged UDP to IPv6 VIP", "[fd00::1]:40001", "[fd00:100::1]:53", PROTO_UDP, Some(7)),
];

#[test]
fn service_traffic_is_forwarded_with_only_macs_rewritten() {
    let mut h = Harness::standard();
    let ipv4_options = {
        let mut seg = Seg::probe(sa("10.0.0.1:40002"), sa("10.0.100.1:80"), PROTO_TCP);
        // IHL 6: a 4-byte option (NOP NOP NOP EOL) before TCP.
        seg.ipv4_options = vec![1, 1, 1, 0];
        seg.frame(LB_MAC, CLIENT_MAC)
    };
    // An 802.1ad service tag (TPID 0x88a8) where the 802.1Q tag would be:
    // the parser must skip it as it skips a C-tag, or the frame goes to the
    // kernel and a provider-bridged client is never balanced.
    let s_tagged = {
        let mut f = packet("10.0.0.1:40003", "10.0.100.1:80", PROTO_TCP, Some(42));
        f[12..14].copy_from_slice(&[0x88, 0xa8]);
        f
    };
    let cases = TO_BACKEND_0
        .map(|(what, src, dst, proto, vlan)| forwarded(what, packet(src, dst, proto, vlan), 0));
    let options = forwarded("IPv4 with options (IHL honoured)", ipv4_options, 0);
    let s_tag = forwarded("802.1ad-tagged TCP to IPv4 VIP", s_tagged, 0);
    check(&mut h, cases.into_iter().chain([options, s_tag]));
    assert_eq!(h.reason(Reason::Tx), 8);
    assert_eq!(h.reason(Reason::FlowNew), 8);
}

/// Traffic to no service, none of it 802.1Q-tagged: (what, source,
/// destination, protocol).
#[rustfmt::skip]
const NOT_A_SERVICE: [(&str, &str, &str, u8); 7] = [
    ("TCP to another address (the host's own SSH)", "10.0.0.1:40000", "10.0.0.2:22", PROTO_TCP),
    ("TCP to the VIP on a port without service", "10.0.0.1:40000", "10.0.100.1:443", PROTO_TCP),
    ("UDP to a TCP service's VIP:port", "10.0.0.1:40000", "10.0.100.1:80", PROTO_UDP),
    ("TCP to a UDP service's VIP:port", "[fd00::1]:40000", "[fd00:100::1]:53", PROTO_TCP),
    ("IPv6 to another address", "[fd00::1]:40000", "[fd00::2]:80", PROTO_TCP),
    ("IPv6 to the IPv4 VIP's mapped form", "[fd00::1]:40000", "[::ffff:10.0.100.1]:80", PROTO_TCP),
    ("IPv6 from an IPv4-mapped source", "[::ffff:10.0.0.1]:40000", "[fd00:100::1]:80", PROTO_TCP),
];

#[test]
fn traffic_not_for_a_service_passes_unchanged() {
    let mut h = Harness::standard();
    let arp = {
        let mut request = vec![0, 1, 8, 0, 6, 4, 0, 1];
        request.extend_from_slice(&[0; 20]);
        frame::ethernet([0xff; 6], CLIENT_MAC, 0x0806, &request)
    };
    let icmp_to_vip = {
        // An echo request, id 1, sequence 1.
        let (client, vip) = (sa("10.0.0.1:0").ip(), sa("10.0.100.1:0").ip());
        let ip = frame::icmp_message(client, vip, 8, 0, [0, 1, 0, 1], &[]);
        frame::frame(LB_MAC, CLIENT_MAC, &ip)
    };
    let cases =
        NOT_A_SERVICE.map(|(what, src, dst, proto)| untouched(what, packet(src, dst, proto, None)));
    let others = [
        untouched("ICMP echo to the VIP", icmp_to_vip),
        untouched("ARP", arp),
    ];
    check(&mut h, cases.into_iter().chain(others));
    assert_eq!(h.reason(Reason::PassNotService), 8);
    assert_eq!(h.reason(Reason::PassNotIp), 1);
    assert_eq!(h.reason(Reason::Tx), 0);
}

#[test]
fn truncated_frames_pass_at_every_length_never_aborted() {
    let mut h = Harness::standard();
    let frames = [
        packet("10.0.0.1:40000", "10.0.100.1:80", PROTO_TCP, None),
        packet("10.0.0.1:40000", "10.0.100.1:53", PROTO_UDP, Some(5)),
        packet("[fd00::1]:40000", "[fd00:100::1]:80", PROTO_TCP, None),
        packet("[fd00::1]:40000", "[fd00:100::1]:53", PROTO_UDP, None),
    ];
    let mut runs = 0;
    for full in &frames {
        // The kernel refuses test frames shorter than an Ethernet header.
        // Every length up to the end of the L4 header is a truncation at or
        // inside a header boundary (the UDP/TCP payload is 4 bytes).
        for len in 14..full.len() - 4 {
            let input = &full[..len];
            let (verdict, out) = h.run(input);
            assert_eq!(
                verdict,
                XDP_PASS,
                "frame cut to {len} of {} bytes",
                full.len()
            );
            assert_eq!(out, input, "frame cut to {len} bytes must pass unchanged");
            runs += 1;
        }
    }
    // Every cut is either malformed or (for a cut before the ethertype's
    // IP header even starts) counted as malformed too: none forwarded.
    assert_eq!(h.reason(Reason::Tx), 0);
    assert_eq!(h.reason(Reason::PassMalformed), runs);
}

#[test]
fn fragments_and_ipv6_extension_headers_go_to_the_kernel() {
    let mut h = Harness::standard();
    let fragment = |frags: u16| {
        let mut seg = Seg::probe(sa("10.0.0.1:40000"), sa("10.0.100.1:80"), PROTO_TCP);
        seg.frag = frags;
        seg.frame(LB_MAC, CLIENT_MAC)
    };
    // An IPv6 packet whose first header after the fixed one is `next`, an
    // 8-byte extension header (next=TCP, PadN), then TCP to the VIP.
    let extension = |next: u8| {
        let (src, dst) = (sa("[fd00::1]:40000"), sa("[fd00:100::1]:80"));
        let mut payload = vec![PROTO_TCP, 0, 1, 4, 0, 0, 0, 0];
        payload.extend(Seg::probe(src, dst, PROTO_TCP).l4());
        let ip = frame::ip_packet(src.ip(), dst.ip(), next, 64, 0, &payload);
        frame::frame(LB_MAC, CLIENT_MAC, &ip)
    };
    check(
        &mut h,
        [
            untouched("first fragment (MF set)", fragment(0x2000)),
            untouched("later fragment (offset 185)", fragment(185)),
            untouched("IPv6 hop-by-hop options before TCP", extension(0)),
        ],
    );
    assert_eq!(h.reason(Reason::PassFragment), 2);
    assert_eq!(h.reason(Reason::PassIpv6Ext), 1);
    // Every extension header of RFC 8200 and the IANA registry is counted
    // as one (its own reason, not "not a service").
    for next in [43, 44, 50, 51, 60, 135, 139, 140, 253, 254] {
        let before = h.reason(Reason::PassIpv6Ext);
        check(
            &mut h,
            [untouched("IPv6 extension header", extension(next))],
        );
        let counted = h.reason(Reason::PassIpv6Ext) - before;
        assert_eq!(
            counted, 1,
            "next header {next}: ipv6_ext counted {counted} times"
        );
    }
    // A fragment with DF only is not a fragment.
    let (verdict, _) = h.run(&fragment(frame::DF));
    assert_eq!(verdict, XDP_TX, "DF-only packet is a whole packet");
}

#[test]
fn established_flows_keep_their_backend_when_the_table_changes() {
    let mut h = Harness::standard();
    let flow = packet("10.0.0.1:41000", "10.0.100.1:80", PROTO_TCP, None);
    check_forwarded(&mut h, "new flow picks backend 0", &flow, 0);

    // Swap in a table that only names backend 1 (the other half of the
    // region, as the control plane does).
    h.set_service("10.0.100.1:80", PROTO_TCP, 0, TABLE_SIZE, &[1]);
    check_forwarded(
        &mut h,
        "established flow keeps backend 0 after the swap",
        &flow,
        0,
    );
    let new_flow = packet("10.0.0.1:41001", "10.0.100.1:80", PROTO_TCP, None);
    check_forwarded(&mut h, "a new flow uses the new table", &new_flow, 1);
    assert_eq!(h.reason(Reason::FlowHit), 1);

    // Draining keeps the established flow.
    h.set_backend(0, "10.0.0.11", BACKEND_DRAINING);
    check_forwarded(&mut h, "draining backend keeps its flow", &flow, 0);

    // Down (or removed): the flow is re-picked from the current table.
    h.set_backend(0, "10.0.0.11", BACKEND_DOWN);
    check_forwarded(&mut h, "flow of a down backend is re-picked", &flow, 1);
    assert_eq!(h.reason(Reason::FlowRepick), 1);
    check_forwarded(&mut h, "and then stays on its new backend", &flow, 1);
    assert_eq!(h.reason(Reason::FlowHit), 3);
}

#[test]
fn kernel_and_userspace_pick_the_same_backend() {
    let mut h = Harness::standard();
    let vip = sa("10.0.100.1:8080");
    let mut used = [0u32; 3];
    for port in 20000..20300u16 {
        let src = SocketAddr::new("10.0.0.1".parse().unwrap(), port);
        let expected = h.0.maps.route(src, vip, PROTO_TCP).unwrap();
        assert!(!expected.established);
        let input = Seg::probe(src, vip, PROTO_TCP).frame(LB_MAC, CLIENT_MAC);
        let (verdict, out) = h.run(&input);
        assert_eq!(verdict, XDP_TX);
        let id = expected.backend_id as usize;
        assert_eq!(
            out,
            with_macs(&input, BACKEND_MACS[id], LB_MAC),
            "source port {port}"
        );
        assert!(
            h.0.maps.route(src, vip, PROTO_TCP).unwrap().established,
            "flow now in the flow table"
        );
        used[id] += 1;
    }
    assert!(
        used.iter().all(|&n| n > 50),
        "300 flows spread over 3 backends: {used:?}"
    );
}

#[test]
fn a_source_hashed_service_sends_all_of_a_clients_flows_to_one_backend() {
    let mut h = Harness::standard();
    let vip = sa("10.0.100.1:8081");
    let mut svc = dsr_service(5, 10 * TABLE_SIZE, TABLE_SIZE);
    svc.flags = SVC_F_HASH_SRC_ONLY;
    h.0.set_service(vip, PROTO_TCP, svc, &[0, 1, 2]).unwrap();
    let mut used = [0u32; 3];
    for client in 1..=60u8 {
        let addr = ip(&format!("10.0.1.{client}"));
        let mut picked = None;
        // Ports that a 5-tuple hash would spread over all three backends.
        for port in 30000..30010u16 {
            let src = SocketAddr::new(addr, port);
            let expected = h.0.maps.route(src, vip, PROTO_TCP).unwrap().backend_id as usize;
            let input = Seg::probe(src, vip, PROTO_TCP).frame(LB_MAC, CLIENT_MAC);
            let (verdict, out) = h.run(&input);
            assert_eq!(verdict, XDP_TX);
            let got = backend_of(&out);
            assert_eq!(got, Some(expected), "{src}: kernel and userspace agree");
            assert_eq!(
                *picked.get_or_insert(expected),
                expected,
                "{src}: as its other flows"
            );
        }
        used[picked.unwrap()] += 1;
    }
    assert!(
        used.iter().all(|&n| n > 5),
        "60 clients spread over 3 backends: {used:?}"
    );
}

#[test]
fn no_backend_drops_and_unresolved_next_hop_passes() {
    let mut h = Harness::standard();
    h.set_service("10.0.100.1:80", PROTO_TCP, 0, 0, &[]);
    let input = packet("10.0.0.1:40000", "10.0.100.1:80", PROTO_TCP, None);
    let (verdict, _) = h.run(&input);
    assert_eq!(verdict, XDP_DROP, "service without backends");
    assert_eq!(h.reason(Reason::DropNoBackend), 1);

    let mut unresolved = h.0.maps.backend(0).unwrap();
    unresolved.dst_mac = [0; 6];
    h.0.maps.backends.set(0, unresolved, 0).unwrap();
    let input = packet("10.0.0.1:40000", "10.0.100.1:53", PROTO_UDP, None);
    check(
        &mut h,
        [untouched("backend MAC unresolved: kernel gets it", input)],
    );
    assert_eq!(h.reason(Reason::PassNoNeigh), 1);
}

#[test]
fn counters_count_packets_bytes_and_new_flows_per_service_and_backend() {
    let mut h = Harness::standard();
    let a = packet("10.0.0.1:40000", "10.0.100.1:80", PROTO_TCP, None);
    let b = packet("[fd00::1]:40000", "[fd00:100::1]:53", PROTO_UDP, None);
    // A flow's first packet counts one new flow; its further packets none.
    h.run(&a);
    let new_flows = |h: &Harness| {
        let svc0 = h.0.maps.service_counters(0).unwrap().new_flows;
        (svc0, h.0.maps.backend_counters(0).unwrap().new_flows)
    };
    assert_eq!(new_flows(&h), (1, 1), "first packet of a flow");
    for _ in 0..2 {
        h.run(&a);
    }
    assert_eq!(new_flows(&h), (1, 1), "further packets of the flow");
    h.run(&b);
    let (a_len, b_len) = (a.len() as u64, b.len() as u64);
    let maps = &h.0.maps;
    for (what, c, expected) in [
        ("service 0", maps.service_counters(0), (3, 3 * a_len, 1)),
        ("service 3", maps.service_counters(3), (1, b_len, 1)),
        (
            "backend 0",
            maps.backend_counters(0),
            (4, 3 * a_len + b_len, 2),
        ),
    ] {
        let c = c.unwrap();
        assert_eq!((c.packets, c.bytes, c.new_flows), expected, "{what}");
    }
    let be1 = h.0.maps.backend_counters(1).unwrap();
    assert_eq!((be1.packets, be1.new_flows), (0, 0));
    assert_eq!(h.reason(Reason::FlowNew), 2);
    assert_eq!(h.reason(Reason::FlowHit), 2);
}

#[test]
fn frames_to_another_mac_pass_untouched_unless_the_mac_is_configured() {
    let mut h = Harness::standard();
    const OTHER_NODE: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
    const VRRP_MAC: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x01];
    const ALL_NODES: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
    let to = |mac: [u8; 6], src: &str, dst: &str, proto: u8| {
        with_macs(&packet(src, dst, proto, None), mac, CLIENT_MAC)
    };
    let foreign = [
        to(OTHER_NODE, "10.0.0.1:40000", "10.0.100.1:80", PROTO_TCP),
        to(OTHER_NODE, "[fd00::1]:40000", "[fd00:100::1]:53", PROTO_UDP),
        to([0xff; 6], "10.0.0.1:40001", "10.0.100.1:53", PROTO_UDP),
        to(ALL_NODES, "[fd00::1]:40001", "[fd00:100::1]:80", PROTO_TCP),
        to(VRRP_MAC, "10.0.0.1:40002", "10.0.100.1:8080", PROTO_TCP),
    ];
    let cases = foreign
        .iter()
        .map(|f| untouched("frame for another MAC", f.clone()));
    check(&mut h, cases);
    assert_eq!(h.reason(Reason::PassNotForUs), foreign.len() as u64);
    assert_eq!(
        h.reason(Reason::FlowNew),
        0,
        "no flow pinned for a frame not ours"
    );
    assert_eq!(h.reason(Reason::PassNotService), 0);

    // A configured extra MAC (a VRRP virtual MAC, say) is balanced...
    h.0.accept_macs(&[(LO_IFINDEX, LB_MAC)], &[VRRP_MAC])
        .unwrap();
    let input = to(VRRP_MAC, "10.0.0.1:40003", "10.0.100.1:80", PROTO_TCP);
    check_forwarded(&mut h, "frame to a configured extra MAC", &input, 0);
    // ...until the configuration drops it again.
    h.0.accept_macs(&[(LO_IFINDEX, LB_MAC)], &[]).unwrap();
    check(&mut h, [untouched("extra MAC removed", input)]);
    assert_eq!(h.reason(Reason::PassNotForUs), foreign.len() as u64 + 1);
    // The interface's own MAC still is.
    let own = packet("10.0.0.1:40004", "10.0.100.1:80", PROTO_TCP, None);
    check_forwarded(&mut h, "frame to the interface's MAC", &own, 0);
}

/// Passive detection's signals (`Signals`, per backend): a TCP flow is
/// answered when the client's second packet is not its SYN again; a SYN
/// again before that is a retransmission; a UDP flow counts as answered
/// when made (the datapath cannot tell). Once per flow, never per packet.
#[test]
fn flows_are_counted_answered_or_retransmitted_once() {
    let mut h = Harness::standard();
    let tcp = |src: &str, flags: u8| {
        Seg::tcp(sa(src), sa("10.0.100.1:80"), flags, b"").frame(LB_MAC, CLIENT_MAC)
    };
    let signals = |h: &Harness| h.0.maps.backend_signals(0).unwrap();
    // A client that gets the SYN-ACK: SYN, ACK, data.
    for flags in [frame::SYN, frame::ACK, frame::ACK | frame::PSH] {
        assert_eq!(h.run(&tcp("10.0.0.1:40000", flags)).0, XDP_TX);
    }
    assert_eq!((signals(&h).confirmed, signals(&h).syn_retransmits), (1, 0));
    // A client that gets nothing: its SYN, then the same SYN twice more.
    for _ in 0..3 {
        assert_eq!(h.run(&tcp("10.0.0.2:40000", frame::SYN)).0, XDP_TX);
    }
    assert_eq!((signals(&h).confirmed, signals(&h).syn_retransmits), (1, 2));
    // UDP: answered as made, whatever follows.
    let udp = packet("10.0.0.3:5000", "10.0.100.1:53", PROTO_UDP, None);
    for _ in 0..3 {
        assert_eq!(h.run(&udp).0, XDP_TX);
    }
    assert_eq!((signals(&h).confirmed, signals(&h).syn_retransmits), (2, 2));
    assert_eq!(h.0.maps.backend_counters(0).unwrap().new_flows, 3);
}

/// A TCP flow whose client sends its SYN again, unanswered, at least
/// `SYN_RETRANSMITTED_NS` after it was opened (its backend's host may be
/// gone: nothing answers) moves to another backend, once; a SYN sent again
/// sooner (a duplicate) does not move it, nor does one after it moved.
#[test]
fn an_unanswered_syn_retransmission_moves_the_flow_once() {
    let mut h = Harness::standard();
    let syn = Seg::tcp(sa("10.0.0.9:40000"), sa("10.0.100.1:8080"), frame::SYN, b"")
        .frame(LB_MAC, CLIENT_MAC);
    let key = addr::flow_key(sa("10.0.0.9:40000"), sa("10.0.100.1:8080"), PROTO_TCP);
    let sent_to = |out: &[u8]| backend_of(out).expect("sent to a backend");
    // Opened, then a duplicate straight away: same backend.
    let (verdict, out) = h.run(&syn);
    assert_eq!(verdict, XDP_TX);
    let first = sent_to(&out);
    assert_eq!(sent_to(&h.run(&syn).1), first, "a duplicate SYN stays");
    assert_eq!(h.reason(Reason::FlowRetry), 0);
    // The flow (still opening) looks 600 ms old (aged through the map, no
    // sleep).
    let age = |h: &mut Harness| {
        let mut f = h.0.maps.opening.get(&key, 0).unwrap();
        f.opened_ns -= 600_000_000;
        h.0.maps.opening.insert(key, f, 0).unwrap();
    };
    age(&mut h);
    let (verdict, out) = h.run(&syn);
    assert_eq!(verdict, XDP_TX);
    let second = sent_to(&out);
    assert_ne!(second, first, "the retransmission goes elsewhere");
    assert_eq!(h.reason(Reason::FlowRetry), 1);
    let f = h.0.maps.opening.get(&key, 0).unwrap();
    assert_eq!(
        (f.backend as usize, f.flags & FLOW_F_RETRIED),
        (second, FLOW_F_RETRIED)
    );
    // Once only: a later retransmission stays on the new backend.
    age(&mut h);
    assert_eq!(sent_to(&h.run(&syn).1), second);
    assert_eq!(h.reason(Reason::FlowRetry), 1);
}

/// TCP flows start in the small opening table and move to the flow table
/// with their client's first answer: a flood of SYNs from sources that
/// never answer churns only the opening table. Established flows keep
/// their backend through it, even when the Maglev table changes after.
#[test]
fn a_syn_flood_never_evicts_an_established_flow() {
    const FLOOD: u32 = 5_000_000;
    let mut h = Harness::standard();
    // The three-backend service starts with two: b3 is added after.
    h.set_service("10.0.100.1:8080", PROTO_TCP, 4, 8 * TABLE_SIZE, &[0, 1]);
    let vip = sa("10.0.100.1:8080");
    let seg = |src: SocketAddr, flags: u8| Seg::tcp(src, vip, flags, b"").frame(LB_MAC, CLIENT_MAC);
    let clients: Vec<SocketAddr> = (0..200u16)
        .map(|i| SocketAddr::from(([10, 1, 0, 1], 30000 + i)))
        .collect();
    let mut pinned = Vec::new();
    for &c in &clients {
        assert_eq!(h.run(&seg(c, frame::SYN)).0, XDP_TX);
        let (verdict, out) = h.run(&seg(c, frame::ACK));
        assert_eq!(verdict, XDP_TX);
        pinned.push(backend_of(&out).expect("sent to a backend"));
    }
    let first = addr::flow_key(clients[0], vip, PROTO_TCP);
    assert!(
        h.0.maps.flows.get(&first, 0).is_ok(),
        "answered: established"
    );

    let mut frame = Vec::new();
    for i in 0..FLOOD {
        let [_, a, b, c] = (i / 50_000).to_be_bytes();
        let src = SocketAddr::from(([10, 2 + a, b, c], 1024 + (i % 50_000) as u16));
        Seg::tcp(src, vip, frame::SYN, b"").write_frame(LB_MAC, CLIENT_MAC, &mut frame);
        assert_eq!(h.run(&frame).0, XDP_TX);
    }
    assert_eq!(h.reason(Reason::FlowNew), u64::from(FLOOD) + 200);

    // b3 joins: the Maglev table now sends a third of new flows to it.
    h.set_service("10.0.100.1:8080", PROTO_TCP, 4, 8 * TABLE_SIZE, &[0, 1, 2]);
    let moved: Vec<(SocketAddr, usize, Option<usize>)> = clients
        .iter()
        .zip(&pinned)
        .filter_map(|(&c, &was)| {
            let now = backend_of(&h.run(&seg(c, frame::ACK | frame::PSH)).1);
            (now != Some(was)).then_some((c, was, now))
        })
        .collect();
    assert!(moved.is_empty(), "established flows moved: {moved:?}");
    // Which they would have without their pins: b3 takes new flows.
    let picks: Vec<Option<usize>> = (0..60u16)
        .map(|i| {
            let src = SocketAddr::from(([10, 3, 0, 1], 1000 + i));
            backend_of(&h.run(&seg(src, frame::SYN)).1)
        })
        .collect();
    assert!(picks.contains(&Some(2)), "b3 takes new flows: {picks:?}");
}

const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x77];

/// A router's ICMP error about `packet` (an IP packet it could not
/// forward), sent to the packet's source `to`, as a frame to the load
/// balancer: IPv4 "fragmentation needed" (MTU 1400), quoting 548 bytes as
/// Linux does, or ICMPv6 "packet too big" (MTU 1280), quoting 1232.
fn too_big(to: SocketAddr, packet: &[u8]) -> Vec<u8> {
    let (router, icmp, max) = if to.is_ipv4() {
        (sa("10.0.200.1:0"), (3, 4, [0, 0, 0x05, 0x78]), 548)
    } else {
        (sa("[fd00:200::1]:0"), (2, 0, [0, 0, 0x05, 0x00]), 1232)
    };
    let quote = frame::quote(packet, max, true);
    let ip = frame::icmp_message(router.ip(), to.ip(), icmp.0, icmp.1, icmp.2, &quote);
    frame::frame(LB_MAC, ROUTER_MAC, &ip)
}

/// A DSR backend's reply (from the VIP) to `client`, big enough that a
/// router on the way sends it back as too big.
fn big_reply(vip: SocketAddr, client: SocketAddr, proto: u8) -> Vec<u8> {
    let payload = [0x5a; 1400];
    match proto {
        PROTO_TCP => Seg::tcp(vip, client, frame::ACK | frame::PSH, &payload).ip(),
        _ => Seg::udp(vip, client, &payload).ip(),
    }
}

/// DSR: a backend replies from the VIP, so a router that cannot forward a
/// too-big reply sends "fragmentation needed" / "packet too big" to the
/// VIP, that is here. Path MTU discovery needs it at the backend: it goes,
/// unchanged but for the MACs, to the flow's pinned backend (not the one
/// the table would pick now), or, for a flow unknown here, to the one the
/// table picks, pinning nothing.
#[test]
fn icmp_errors_about_dsr_flows_go_to_the_flows_backend() {
    let mut h = Harness::standard();
    // (VIP, service id in `standard`, protocol).
    let services = [
        ("10.0.100.1:80", 0, PROTO_TCP),
        ("10.0.100.1:53", 1, PROTO_UDP),
        ("[fd00:100::1]:80", 2, PROTO_TCP),
        ("[fd00:100::1]:53", 3, PROTO_UDP),
    ];
    for (n, &(vip, id, proto)) in services.iter().enumerate() {
        let vip = sa(vip);
        let client = if vip.is_ipv4() { "10.0.0.1" } else { "fd00::1" };
        let client = SocketAddr::new(client.parse().unwrap(), 40000);
        let stranger = SocketAddr::new(client.ip(), 40001);
        let first = Seg::probe(client, vip, proto).frame(LB_MAC, CLIENT_MAC);
        check_forwarded(&mut h, "the client's first packet", &first, 0);
        // The table now names backend 1 only: the flow stays on 0.
        h.set_service(&vip.to_string(), proto, id, (2 * id + 1) * TABLE_SIZE, &[1]);
        let about_flow = too_big(vip, &big_reply(vip, client, proto));
        let about_stranger = too_big(vip, &big_reply(vip, stranger, proto));
        check(
            &mut h,
            [
                forwarded("an error about a pinned flow", about_flow, 0),
                forwarded("an error about an unknown flow", about_stranger, 1),
            ],
        );
        let route = h.0.maps.route(stranger, vip, proto).unwrap();
        assert_eq!(
            route.backend_id, 1,
            "{vip}: the client's first packet's pick"
        );
        assert!(!route.established, "{vip}: an error pins no flow");
        assert_eq!(h.reason(Reason::DsrIcmp), 2 * n as u64 + 2, "{vip}");
    }
    assert_eq!(h.reason(Reason::FlowNew), 4);
    assert_eq!(h.reason(Reason::PassNotService), 0);
}

/// An ICMP error the load balancer has no flow for passes to the kernel
/// untouched, as before: about a packet not sent from a VIP, from a VIP
/// port or protocol without service, from a service without backends, or
/// addressed to another MAC; and an echo request is no error.
#[test]
fn icmp_errors_about_no_dsr_flow_pass_untouched() {
    let mut h = Harness::standard();
    h.set_service("10.0.100.1:8080", PROTO_TCP, 4, 8 * TABLE_SIZE, &[]);
    let error =
        |from: &str, to: &str, proto: u8| too_big(sa(from), &big_reply(sa(from), sa(to), proto));
    let echo = |from: &str, to: &str| {
        let ip = frame::icmp_message(ip(from), ip(to), 128, 0, [0, 1, 0, 1], &[]);
        frame::frame(LB_MAC, CLIENT_MAC, &ip)
    };
    // Sent to the VIP, quoting another address's packet.
    let misaddressed = {
        let reply = big_reply(sa("10.0.0.2:80"), sa("10.0.0.1:40000"), PROTO_TCP);
        let quote = frame::quote(&reply, 548, true);
        let ip = frame::icmp_message(ip("10.0.200.1"), ip("10.0.100.1"), 3, 4, [0; 4], &quote);
        frame::frame(LB_MAC, ROUTER_MAC, &ip)
    };
    let foreign = with_macs(
        &error("10.0.100.1:80", "10.0.0.1:40000", PROTO_TCP),
        [0x02, 0, 0, 0, 0, 0x99],
        ROUTER_MAC,
    );
    let not_service = [
        (
            "from another address",
            error("10.0.0.2:80", "10.0.0.1:40000", PROTO_TCP),
        ),
        (
            "from the VIP, no service on its port",
            error("10.0.100.1:443", "10.0.0.1:1", PROTO_TCP),
        ),
        (
            "from the VIP, TCP port, UDP",
            error("[fd00:100::1]:80", "[fd00::1]:1", PROTO_UDP),
        ),
        (
            "from a service without backends",
            error("10.0.100.1:8080", "10.0.0.1:1", PROTO_TCP),
        ),
        ("to the VIP, quoting another address's packet", misaddressed),
        (
            "an ICMPv6 echo request to the VIP",
            echo("fd00::1", "fd00:100::1"),
        ),
    ];
    let count = not_service.len() as u64;
    check(&mut h, not_service.map(|(what, f)| untouched(what, f)));
    check(&mut h, [untouched("to another MAC", foreign)]);
    assert_eq!(h.reason(Reason::PassNotService), count);
    assert_eq!(h.reason(Reason::PassNotForUs), 1);
    assert_eq!(h.reason(Reason::DsrIcmp), 0);
}
