//! Packet fixtures through the real compiled XDP program (BPF_PROG_TEST_RUN),
//! table-driven as Katran's and Cilium's datapath tests are: each case has a
//! description, an input frame, the expected verdict and the expected output
//! frame. Maps are populated by the test itself. Needs root (BPF).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions};
use xdp_common::{
    Backend, Reason, Service, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, PROTO_TCP, PROTO_UDP,
    SVC_F_NO_BACKEND,
};
use xdplb::{addr, dataplane::Maps, loader::Datapath};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BACKEND_MACS: [[u8; 6]; 3] = [
    [0x02, 0, 0, 0, 0, 0x11],
    [0x02, 0, 0, 0, 0, 0x12],
    [0x02, 0, 0, 0, 0, 0x13],
];
/// BPF_PROG_TEST_RUN runs the program as if received on loopback.
const LO_IFINDEX: u32 = 1;
const TABLE_SIZE: u32 = 251;

// ---------------------------------------------------------------- frames

/// Builds test frames byte by byte, independently of the datapath's code.
mod frame {
    pub const ETH_IP: u16 = 0x0800;
    pub const ETH_IPV6: u16 = 0x86dd;

    pub fn eth(dst: [u8; 6], src: [u8; 6], ether_type: u16, vlan: Option<u16>) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        if let Some(vid) = vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&ether_type.to_be_bytes());
        f
    }

    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// An IPv4 header (with `options` appended, a multiple of 4 bytes).
    pub fn ipv4(
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        payload_len: usize,
        frags: u16,
        options: &[u8],
    ) -> Vec<u8> {
        let ihl = (20 + options.len()) / 4;
        let mut h = vec![0x40 | ihl as u8, 0];
        h.extend_from_slice(&((ihl * 4 + payload_len) as u16).to_be_bytes());
        h.extend_from_slice(&[0x12, 0x34]);
        h.extend_from_slice(&frags.to_be_bytes());
        h.extend_from_slice(&[64, proto, 0, 0]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(options);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    pub fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload_len: usize) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(payload_len as u16).to_be_bytes());
        h.extend_from_slice(&[next, 64]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h
    }

    /// A TCP SYN with a 4-byte payload (checksum left zero: DSR never
    /// touches L4, and the test compares bytes).
    pub fn tcp(sport: u16, dport: u16) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        h.extend_from_slice(b"data");
        h
    }

    pub fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&sport.to_be_bytes());
        h.extend_from_slice(&dport.to_be_bytes());
        h.extend_from_slice(&12u16.to_be_bytes());
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(b"data");
        h
    }
}

/// A frame from `src` to `dst` over `proto`, optionally VLAN-tagged.
fn packet(src: SocketAddr, dst: SocketAddr, proto: u8, vlan: Option<u16>) -> Vec<u8> {
    let l4 = if proto == PROTO_TCP {
        frame::tcp(src.port(), dst.port())
    } else {
        frame::udp(src.port(), dst.port())
    };
    let mut f;
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f = frame::eth(LB_MAC, CLIENT_MAC, frame::ETH_IP, vlan);
            f.extend(frame::ipv4(s.octets(), d.octets(), proto, l4.len(), 0, &[]));
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f = frame::eth(LB_MAC, CLIENT_MAC, frame::ETH_IPV6, vlan);
            f.extend(frame::ipv6(s.octets(), d.octets(), proto, l4.len()));
        }
        _ => unreachable!("mixed families"),
    }
    f.extend(l4);
    f
}

/// `input` with its Ethernet addresses replaced: what DSR must output.
fn with_macs(input: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

// ---------------------------------------------------------------- harness

/// The real program, loaded with its maps pinned in a directory of its
/// own that is removed when the harness drops (also on panic).
struct Harness {
    datapath: Datapath,
    maps: Maps,
    pin_dir: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Harness {
    fn new() -> Self {
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/xdplb-fixture-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut datapath = Datapath::load(&pin_dir).unwrap_or_else(|e| {
            let _ = std::fs::remove_dir_all(&pin_dir);
            panic!("loading the XDP program (tests need root): {e:#}")
        });
        let maps = Maps::take(&mut datapath.ebpf).unwrap();
        // BPF_PROG_TEST_RUN runs the program as if on loopback: frames to
        // LB_MAC are "for us" there.
        xdplb::cluster::macs::IfMacs::take(&mut datapath.ebpf)
            .unwrap()
            .sync(&[(LO_IFINDEX, LB_MAC)], &[])
            .unwrap();
        Self {
            datapath,
            maps,
            pin_dir,
        }
    }

    fn set_backend(&mut self, id: u32, ip: &str, state: u32) {
        let b = Backend {
            addr: addr::to_words(ip.parse().unwrap()),
            dst_mac: BACKEND_MACS[id as usize],
            src_mac: LB_MAC,
            ifindex: LO_IFINDEX,
            state,
            service: 0,
            snat_addr: [0; 4],
            port_be: 80u16.to_be(),
            _pad: [0; 2],
        };
        self.maps.backends.set(id, b, 0).unwrap();
    }

    /// Programs a service whose table holds `table` (repeated to fill it)
    /// at `base`.
    fn set_service(
        &mut self,
        vip: &str,
        port: u16,
        proto: u8,
        id: u32,
        base: u32,
        members: &[u32],
    ) {
        if !members.is_empty() {
            let table: Vec<u32> = (0..TABLE_SIZE as usize)
                .map(|i| members[i % members.len()])
                .collect();
            self.maps.write_table(base, &table).unwrap();
        }
        let key = addr::service_key(vip.parse().unwrap(), port, proto);
        let flags = if members.is_empty() {
            SVC_F_NO_BACKEND
        } else {
            0
        };
        let svc = Service {
            id,
            flags,
            table_base: base,
            table_size: TABLE_SIZE,
            ..Default::default()
        };
        self.maps.services.insert(key, svc, 0).unwrap();
    }

    /// One standard setup: backends 0..3 active; TCP and UDP services on
    /// an IPv4 and an IPv6 VIP, all served by backend 0 only (so the
    /// expected output is known without hashing), plus a three-backend
    /// service on port 8080.
    fn standard() -> Self {
        let mut h = Self::new();
        for (id, ip) in ["10.0.0.11", "10.0.0.12", "10.0.0.13"].iter().enumerate() {
            h.set_backend(id as u32, ip, BACKEND_ACTIVE);
        }
        h.set_service("10.0.100.1", 80, PROTO_TCP, 0, 0, &[0]);
        h.set_service("10.0.100.1", 53, PROTO_UDP, 1, 2 * TABLE_SIZE, &[0]);
        h.set_service("fd00:100::1", 80, PROTO_TCP, 2, 4 * TABLE_SIZE, &[0]);
        h.set_service("fd00:100::1", 53, PROTO_UDP, 3, 6 * TABLE_SIZE, &[0]);
        h.set_service("10.0.100.1", 8080, PROTO_TCP, 4, 8 * TABLE_SIZE, &[0, 1, 2]);
        h
    }

    /// Runs the program on `input`: (verdict, output frame).
    fn run(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; input.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let res = self
            .datapath
            .program()
            .test_run(opts)
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }

    fn reason(&self, r: Reason) -> u64 {
        self.maps.reason_count(r).unwrap()
    }
}

// ---------------------------------------------------------------- cases

struct Case {
    what: &'static str,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
}

fn check(h: &mut Harness, cases: Vec<Case>) {
    for c in cases {
        let (verdict, out) = h.run(&c.input);
        assert_eq!(verdict, c.verdict, "{}: verdict", c.what);
        assert_eq!(out, c.output, "{}: output frame", c.what);
    }
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

#[test]
fn service_traffic_is_forwarded_with_only_macs_rewritten() {
    let mut h = Harness::standard();
    let ipv4_options = {
        let l4 = frame::tcp(40002, 80);
        let mut f = frame::eth(LB_MAC, CLIENT_MAC, frame::ETH_IP, None);
        // IHL 6: a 4-byte option (NOP NOP NOP EOL) before TCP.
        f.extend(frame::ipv4(
            [10, 0, 0, 1],
            [10, 0, 100, 1],
            PROTO_TCP,
            l4.len(),
            0,
            &[1, 1, 1, 0],
        ));
        f.extend(l4);
        f
    };
    check(
        &mut h,
        vec![
            forwarded(
                "TCP to IPv4 VIP",
                packet(sa("10.0.0.1:40000"), sa("10.0.100.1:80"), PROTO_TCP, None),
                0,
            ),
            forwarded(
                "UDP to IPv4 VIP",
                packet(sa("10.0.0.1:40000"), sa("10.0.100.1:53"), PROTO_UDP, None),
                0,
            ),
            forwarded(
                "TCP to IPv6 VIP",
                packet(
                    sa("[fd00::1]:40000"),
                    sa("[fd00:100::1]:80"),
                    PROTO_TCP,
                    None,
                ),
                0,
            ),
            forwarded(
                "UDP to IPv6 VIP",
                packet(
                    sa("[fd00::1]:40000"),
                    sa("[fd00:100::1]:53"),
                    PROTO_UDP,
                    None,
                ),
                0,
            ),
            forwarded(
                "802.1Q-tagged TCP to IPv4 VIP",
                packet(
                    sa("10.0.0.1:40001"),
                    sa("10.0.100.1:80"),
                    PROTO_TCP,
                    Some(42),
                ),
                0,
            ),
            forwarded(
                "802.1Q-tagged UDP to IPv6 VIP",
                packet(
                    sa("[fd00::1]:40001"),
                    sa("[fd00:100::1]:53"),
                    PROTO_UDP,
                    Some(7),
                ),
                0,
            ),
            forwarded("IPv4 with options (IHL honoured)", ipv4_options, 0),
        ],
    );
    assert_eq!(h.reason(Reason::Tx), 7);
    assert_eq!(h.reason(Reason::FlowNew), 7);
}

#[test]
fn traffic_not_for_a_service_passes_unchanged() {
    let mut h = Harness::standard();
    let arp = {
        let mut f = frame::eth([0xff; 6], CLIENT_MAC, 0x0806, None);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&[0; 20]);
        f
    };
    let icmp_to_vip = {
        let mut f = frame::eth(LB_MAC, CLIENT_MAC, frame::ETH_IP, None);
        f.extend(frame::ipv4([10, 0, 0, 1], [10, 0, 100, 1], 1, 8, 0, &[]));
        f.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
        f
    };
    check(
        &mut h,
        vec![
            untouched(
                "TCP to another address (the host's own SSH)",
                packet(sa("10.0.0.1:40000"), sa("10.0.0.2:22"), PROTO_TCP, None),
            ),
            untouched(
                "TCP to the VIP on a port without service",
                packet(sa("10.0.0.1:40000"), sa("10.0.100.1:443"), PROTO_TCP, None),
            ),
            untouched(
                "UDP to a TCP service's VIP:port",
                packet(sa("10.0.0.1:40000"), sa("10.0.100.1:80"), PROTO_UDP, None),
            ),
            untouched(
                "TCP to a UDP service's VIP:port",
                packet(
                    sa("[fd00::1]:40000"),
                    sa("[fd00:100::1]:53"),
                    PROTO_TCP,
                    None,
                ),
            ),
            untouched(
                "IPv6 to another address",
                packet(sa("[fd00::1]:40000"), sa("[fd00::2]:80"), PROTO_TCP, None),
            ),
            untouched("ICMP echo to the VIP", icmp_to_vip),
            untouched("ARP", arp),
        ],
    );
    assert_eq!(h.reason(Reason::PassNotService), 6);
    assert_eq!(h.reason(Reason::PassNotIp), 1);
    assert_eq!(h.reason(Reason::Tx), 0);
}

#[test]
fn truncated_frames_pass_at_every_length_never_aborted() {
    let mut h = Harness::standard();
    let frames = [
        packet(sa("10.0.0.1:40000"), sa("10.0.100.1:80"), PROTO_TCP, None),
        packet(
            sa("10.0.0.1:40000"),
            sa("10.0.100.1:53"),
            PROTO_UDP,
            Some(5),
        ),
        packet(
            sa("[fd00::1]:40000"),
            sa("[fd00:100::1]:80"),
            PROTO_TCP,
            None,
        ),
        packet(
            sa("[fd00::1]:40000"),
            sa("[fd00:100::1]:53"),
            PROTO_UDP,
            None,
        ),
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
        let l4 = frame::tcp(40000, 80);
        let mut f = frame::eth(LB_MAC, CLIENT_MAC, frame::ETH_IP, None);
        f.extend(frame::ipv4(
            [10, 0, 0, 1],
            [10, 0, 100, 1],
            PROTO_TCP,
            l4.len(),
            frags,
            &[],
        ));
        f.extend(l4);
        f
    };
    let hop_by_hop = {
        let l4 = frame::tcp(40000, 80);
        let mut f = frame::eth(LB_MAC, CLIENT_MAC, frame::ETH_IPV6, None);
        let src: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
        let dst: std::net::Ipv6Addr = "fd00:100::1".parse().unwrap();
        f.extend(frame::ipv6(src.octets(), dst.octets(), 0, 8 + l4.len()));
        f.extend_from_slice(&[PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]); // next=TCP, PadN
        f.extend(l4);
        f
    };
    check(
        &mut h,
        vec![
            untouched("first fragment (MF set)", fragment(0x2000)),
            untouched("later fragment (offset 185)", fragment(185)),
            untouched("IPv6 hop-by-hop options before TCP", hop_by_hop),
        ],
    );
    assert_eq!(h.reason(Reason::PassFragment), 2);
    assert_eq!(h.reason(Reason::PassIpv6Ext), 1);
    // A fragment with DF only is not a fragment.
    let df = fragment(0x4000);
    let (verdict, _) = h.run(&df);
    assert_eq!(verdict, XDP_TX, "DF-only packet is a whole packet");
}

#[test]
fn established_flows_keep_their_backend_when_the_table_changes() {
    let mut h = Harness::standard();
    let vip = sa("10.0.100.1:80");
    let flow = packet(sa("10.0.0.1:41000"), vip, PROTO_TCP, None);
    check(
        &mut h,
        vec![forwarded("new flow picks backend 0", flow.clone(), 0)],
    );

    // Swap in a table that only names backend 1 (the other half of the
    // region, as the control plane does).
    h.set_service("10.0.100.1", 80, PROTO_TCP, 0, TABLE_SIZE, &[1]);
    check(
        &mut h,
        vec![
            forwarded(
                "established flow keeps backend 0 after the swap",
                flow.clone(),
                0,
            ),
            forwarded(
                "a new flow uses the new table",
                packet(sa("10.0.0.1:41001"), vip, PROTO_TCP, None),
                1,
            ),
        ],
    );
    assert_eq!(h.reason(Reason::FlowHit), 1);

    // Draining keeps the established flow.
    h.set_backend(0, "10.0.0.11", BACKEND_DRAINING);
    check(
        &mut h,
        vec![forwarded(
            "draining backend keeps its flow",
            flow.clone(),
            0,
        )],
    );

    // Down (or removed): the flow is re-picked from the current table.
    h.set_backend(0, "10.0.0.11", BACKEND_DOWN);
    check(
        &mut h,
        vec![forwarded(
            "flow of a down backend is re-picked",
            flow.clone(),
            1,
        )],
    );
    assert_eq!(h.reason(Reason::FlowRepick), 1);
    check(
        &mut h,
        vec![forwarded("and then stays on its new backend", flow, 1)],
    );
    assert_eq!(h.reason(Reason::FlowHit), 3);
}

#[test]
fn kernel_and_userspace_pick_the_same_backend() {
    let mut h = Harness::standard();
    let vip = sa("10.0.100.1:8080");
    let mut used = [0u32; 3];
    for port in 20000..20300u16 {
        let src = SocketAddr::new("10.0.0.1".parse().unwrap(), port);
        let expected = h.maps.route(src, vip, PROTO_TCP).unwrap();
        assert!(!expected.established);
        let input = packet(src, vip, PROTO_TCP, None);
        let (verdict, out) = h.run(&input);
        assert_eq!(verdict, XDP_TX);
        let id = expected.backend_id as usize;
        assert_eq!(
            out,
            with_macs(&input, BACKEND_MACS[id], LB_MAC),
            "source port {port}"
        );
        assert!(
            h.maps.route(src, vip, PROTO_TCP).unwrap().established,
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
fn no_backend_drops_and_unresolved_next_hop_passes() {
    let mut h = Harness::standard();
    h.set_service("10.0.100.1", 80, PROTO_TCP, 0, 0, &[]);
    let input = packet(sa("10.0.0.1:40000"), sa("10.0.100.1:80"), PROTO_TCP, None);
    let (verdict, _) = h.run(&input);
    assert_eq!(verdict, XDP_DROP, "service without backends");
    assert_eq!(h.reason(Reason::DropNoBackend), 1);

    let mut unresolved = h.maps.backend(0).unwrap();
    unresolved.dst_mac = [0; 6];
    h.maps.backends.set(0, unresolved, 0).unwrap();
    let input = packet(sa("10.0.0.1:40000"), sa("10.0.100.1:53"), PROTO_UDP, None);
    check(
        &mut h,
        vec![untouched("backend MAC unresolved: kernel gets it", input)],
    );
    assert_eq!(h.reason(Reason::PassNoNeigh), 1);
}

#[test]
fn counters_count_packets_and_bytes_per_service_and_backend() {
    let mut h = Harness::standard();
    let a = packet(sa("10.0.0.1:40000"), sa("10.0.100.1:80"), PROTO_TCP, None);
    let b = packet(
        sa("[fd00::1]:40000"),
        sa("[fd00:100::1]:53"),
        PROTO_UDP,
        None,
    );
    for _ in 0..3 {
        h.run(&a);
    }
    h.run(&b);
    let svc0 = h.maps.service_counters(0).unwrap();
    assert_eq!((svc0.packets, svc0.bytes), (3, 3 * a.len() as u64));
    let svc3 = h.maps.service_counters(3).unwrap();
    assert_eq!((svc3.packets, svc3.bytes), (1, b.len() as u64));
    let be0 = h.maps.backend_counters(0).unwrap();
    assert_eq!(
        (be0.packets, be0.bytes),
        (4, 3 * a.len() as u64 + b.len() as u64)
    );
    assert_eq!(h.maps.backend_counters(1).unwrap().packets, 0);
    assert_eq!(h.reason(Reason::FlowNew), 2);
    assert_eq!(h.reason(Reason::FlowHit), 2);
}

#[test]
fn frames_to_another_mac_pass_untouched_unless_the_mac_is_configured() {
    let mut h = Harness::standard();
    const OTHER_NODE: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
    const VRRP_MAC: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x01];
    let to = |mac: [u8; 6], src: &str, dst: &str, proto: u8| {
        with_macs(&packet(sa(src), sa(dst), proto, None), mac, CLIENT_MAC)
    };
    let foreign = [
        to(OTHER_NODE, "10.0.0.1:40000", "10.0.100.1:80", PROTO_TCP),
        to(OTHER_NODE, "[fd00::1]:40000", "[fd00:100::1]:53", PROTO_UDP),
        to([0xff; 6], "10.0.0.1:40001", "10.0.100.1:53", PROTO_UDP),
        to(
            [0x33, 0x33, 0, 0, 0, 1],
            "[fd00::1]:40001",
            "[fd00:100::1]:80",
            PROTO_TCP,
        ),
        to(VRRP_MAC, "10.0.0.1:40002", "10.0.100.1:8080", PROTO_TCP),
    ];
    check(
        &mut h,
        foreign
            .iter()
            .map(|f| untouched("frame for another MAC", f.clone()))
            .collect(),
    );
    assert_eq!(h.reason(Reason::PassNotForUs), foreign.len() as u64);
    assert_eq!(
        h.reason(Reason::FlowNew),
        0,
        "no flow pinned for a frame not ours"
    );
    assert_eq!(h.reason(Reason::PassNotService), 0);

    // A configured extra MAC (a VRRP virtual MAC, say) is balanced...
    let mut macs = xdplb::cluster::macs::IfMacs::open_pinned(&h.pin_dir).unwrap();
    macs.sync(&[(LO_IFINDEX, LB_MAC)], &[VRRP_MAC]).unwrap();
    let input = to(VRRP_MAC, "10.0.0.1:40003", "10.0.100.1:80", PROTO_TCP);
    let (verdict, out) = h.run(&input);
    assert_eq!(verdict, XDP_TX, "frame to a configured extra MAC");
    assert_eq!(out, with_macs(&input, BACKEND_MACS[0], LB_MAC));
    // ...until the configuration drops it again.
    macs.sync(&[(LO_IFINDEX, LB_MAC)], &[]).unwrap();
    check(&mut h, vec![untouched("extra MAC removed", input)]);
    assert_eq!(h.reason(Reason::PassNotForUs), foreign.len() as u64 + 1);
    // The interface's own MAC still is.
    let own = packet(sa("10.0.0.1:40004"), sa("10.0.100.1:80"), PROTO_TCP, None);
    check(
        &mut h,
        vec![forwarded("frame to the interface's MAC", own, 0)],
    );
}
