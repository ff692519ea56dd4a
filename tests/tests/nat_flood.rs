//! NAT under attack, through the real compiled XDP program
//! (BPF_PROG_TEST_RUN): a flood of spoofed SYNs, which no backend ever
//! answers, holds source ports only for the unanswered timeout
//! (`NAT_UNANSWERED_TIMEOUT_S`), while answered (established) translations
//! keep working; and one source address cannot hold more than
//! `NAT_UNANSWERED_PER_SOURCE` unanswered flows. Entries are aged through
//! the maps, not by sleeping. Needs root (BPF).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use aya::maps::HashMap;
use xdp_common::{
    map_names, Backend, NatSource, Reason, BACKEND_ACTIVE, NAT_F_ANSWERED,
    NAT_UNANSWERED_PER_SOURCE, NAT_UNANSWERED_TIMEOUT_S, PROTO_TCP,
};
use xdplb::addr;
use xdplb_tests::{
    datapath::{
        nat_service, TestDatapath, DEFAULT_TIMEOUTS, LO_IFINDEX, TABLE_SIZE, XDP_DROP, XDP_TX,
    },
    frame::{self, Seg},
};

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const VIP: &str = "10.0.100.1:80";
const BACKEND: &str = "10.0.1.11:8080";
const SNAT: &str = "10.0.1.1";
/// Source ports of the service: few, so the flood exhausts them fast.
const PORTS: u16 = 4096;
/// Spoofed SYNs in the flood.
const FLOOD: u32 = 1_000_000;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Nat {
    dp: TestDatapath,
    frame: Vec<u8>,
}

impl Nat {
    /// One NAT service at VIP with one backend, `PORTS` source ports,
    /// default timeouts.
    fn new() -> Self {
        let mut dp = TestDatapath::load("natflood").expect("loading the XDP program");
        dp.accept_macs(&[(LO_IFINDEX, LB_MAC)], &[]).unwrap();
        dp.set_nat_enabled(true).unwrap();
        let backend = sa(BACKEND);
        let b = Backend {
            addr: addr::to_words(backend.ip()),
            dst_mac: BACKEND_MAC,
            src_mac: LB_MAC,
            ifindex: LO_IFINDEX,
            state: BACKEND_ACTIVE,
            snat_addr: addr::to_words(SNAT.parse().unwrap()),
            port_be: backend.port().to_be(),
            ..Default::default()
        };
        dp.set_backend(0, b).unwrap();
        let svc = nat_service(0, 0, TABLE_SIZE, (20000, PORTS), DEFAULT_TIMEOUTS);
        dp.set_service(sa(VIP), PROTO_TCP, svc, &[0]).unwrap();
        Self {
            dp,
            frame: Vec::with_capacity(128),
        }
    }

    /// A client's TCP segment to the VIP; returns the verdict and, when
    /// translated, the source port it got.
    fn client(&mut self, client: SocketAddr, flags: u8) -> (u32, Option<u16>) {
        Seg::tcp(client, sa(VIP), flags, b"").write_frame(LB_MAC, CLIENT_MAC, &mut self.frame);
        let (verdict, out) = self.dp.run(&self.frame).unwrap();
        let port = (verdict == XDP_TX).then(|| u16::from_be_bytes([out[34], out[35]]));
        (verdict, port)
    }

    /// The backend's SYN-ACK to `port`: translated back to the client?
    fn backend_answers(&mut self, port: u16) -> u32 {
        let to = SocketAddr::new(SNAT.parse().unwrap(), port);
        let seg = Seg::tcp(sa(BACKEND), to, frame::SYN | frame::ACK, b"");
        self.dp.run(&seg.frame(LB_MAC, BACKEND_MAC)).unwrap().0
    }

    /// Makes every NAT entry look `secs` seconds older (and every source's
    /// last new flow), as if that much time had passed.
    fn age_all(&mut self, secs: u32) {
        let by = u64::from(secs) * 1_000_000_000 + 1;
        let maps = &mut self.dp.maps;
        let fwd: Vec<_> = maps.nat_fwd.iter().map(Result::unwrap).collect();
        for (k, mut v) in fwd {
            v.last_seen_ns -= by;
            maps.nat_fwd.insert(k, v, 0).unwrap();
        }
        let rev: Vec<_> = maps.nat_rev.iter().map(Result::unwrap).collect();
        for (k, mut v) in rev {
            v.last_seen_ns -= by;
            maps.nat_rev.insert(k, v, 0).unwrap();
        }
        let map = self.dp.datapath.ebpf.map_mut(map_names::NAT_SOURCES);
        let mut sources: HashMap<_, [u32; 4], NatSource> = HashMap::try_from(map.unwrap()).unwrap();
        let all: Vec<_> = sources.iter().map(Result::unwrap).collect();
        for (k, mut v) in all {
            v.last_ns -= by;
            sources.insert(k, v, 0).unwrap();
        }
    }

    fn reason(&self, r: Reason) -> u64 {
        self.dp.reason(r).unwrap()
    }
}

/// The n-th spoofed source: addresses all over 100.64.0.0/10, ports too.
fn spoofed(n: u32) -> SocketAddr {
    let a = Ipv4Addr::from(0x6440_0000 | (n.wrapping_mul(2_654_435_761) & 0x003f_ffff));
    SocketAddr::new(IpAddr::V4(a), 1024 + (n % 60000) as u16)
}

/// An established translation: SYN, the backend's SYN-ACK, an ACK.
fn establish(nat: &mut Nat, client: SocketAddr) -> u16 {
    let (verdict, port) = nat.client(client, frame::SYN);
    assert_eq!(verdict, XDP_TX, "{client}: SYN translated");
    let port = port.unwrap();
    assert_eq!(nat.backend_answers(port), XDP_TX, "{client}: SYN-ACK");
    let key = addr::flow_key(client, sa(VIP), PROTO_TCP);
    let fwd = nat.dp.maps.nat_fwd.get(&key, 0).unwrap();
    assert_eq!(
        (fwd.flags & NAT_F_ANSWERED, fwd.timeout_s),
        (NAT_F_ANSWERED, DEFAULT_TIMEOUTS.tcp),
        "answered: the full timeout"
    );
    port
}

/// The established flow still goes through on the same port, both ways.
fn still_works(nat: &mut Nat, client: SocketAddr, port: u16, when: &str) {
    assert_eq!(
        nat.client(client, frame::ACK | frame::PSH),
        (XDP_TX, Some(port)),
        "established flow {when}"
    );
    assert_eq!(nat.backend_answers(port), XDP_TX, "its reply {when}");
}

#[test]
fn a_spoofed_syn_flood_holds_ports_only_for_the_unanswered_timeout() {
    let mut nat = Nat::new();
    let alice = sa("192.0.2.1:40000");
    let port = establish(&mut nat, alice);

    for n in 0..FLOOD {
        let (verdict, _) = nat.client(spoofed(n), frame::SYN);
        assert!([XDP_TX, XDP_DROP].contains(&verdict), "verdict {verdict}");
        if n % 100_000 == 0 {
            still_works(&mut nat, alice, port, &format!("after {n} spoofed SYNs"));
        }
    }
    let (translated, refused) = (nat.reason(Reason::NatNew), nat.reason(Reason::DropNatFull));
    println!("{FLOOD} spoofed SYNs: {translated} translated, {refused} refused (ports full)");
    assert!(refused > 0, "the flood filled the {PORTS} ports");
    // Reclaiming a port drops its old flow's client side too: the flood
    // never holds more client-side entries than there are ports.
    let held = nat.dp.maps.nat_fwd.keys().count();
    assert!(held <= usize::from(PORTS) + 1, "{held} NAT_FWD entries");
    still_works(&mut nat, alice, port, "after the flood");

    // Right after the flood every port is held by an unanswered flow...
    let bob = sa("192.0.2.2:50000");
    assert_eq!(nat.client(bob, frame::SYN).0, XDP_DROP, "ports still held");
    // ... for the unanswered timeout only, not the TCP timeout (1 h).
    nat.age_all(NAT_UNANSWERED_TIMEOUT_S);
    let (verdict, bob_port) = nat.client(bob, frame::SYN);
    assert_eq!(
        verdict, XDP_TX,
        "a new client is served once the flood's flows expired"
    );
    assert_eq!(nat.backend_answers(bob_port.unwrap()), XDP_TX);
    still_works(&mut nat, alice, port, "after the timeout");
}

#[test]
fn one_source_holds_a_bounded_number_of_unanswered_flows() {
    let mut nat = Nat::new();
    let greedy = |p: u16| SocketAddr::new("198.51.100.7".parse().unwrap(), 10000 + p);
    let bound = NAT_UNANSWERED_PER_SOURCE as u16;
    let translated = (0..bound + 200)
        .filter(|&p| nat.client(greedy(p), frame::SYN).0 == XDP_TX)
        .count();
    assert_eq!(translated, usize::from(bound), "one source, unanswered");
    // Others are still served: the ports are not all gone.
    establish(&mut nat, sa("192.0.2.9:40000"));
    // An answer frees one place of the source's bound.
    let first = addr::flow_key(greedy(0), sa(VIP), PROTO_TCP);
    let port = u16::from_be(nat.dp.maps.nat_fwd.get(&first, 0).unwrap().nat_port_be);
    assert_eq!(nat.backend_answers(port), XDP_TX);
    assert_eq!(nat.client(greedy(bound + 300), frame::SYN).0, XDP_TX);
    assert_eq!(nat.client(greedy(bound + 301), frame::SYN).0, XDP_DROP);
    // And once its unanswered flows have expired, the source starts over.
    nat.age_all(NAT_UNANSWERED_TIMEOUT_S);
    assert_eq!(nat.client(greedy(bound + 302), frame::SYN).0, XDP_TX);
}
