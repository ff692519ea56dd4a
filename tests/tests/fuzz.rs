//! Packet fuzzer: random frames and mutations of valid ones through the
//! real compiled program (BPF_PROG_TEST_RUN) with DSR and NAT services
//! programmed, checking on every frame what a stranger may rely on:
//!
//! - the verdict is never XDP_ABORTED;
//! - a passed or dropped frame comes back byte-identical;
//! - a frame forwarded for a DSR service differs from its input only in the
//!   two MAC addresses;
//! - a frame rewritten for a NAT service (or an ICMP error about one of its
//!   translations) whose input checksums were valid has valid checksums,
//!   every one recomputed from scratch by the test kit's `verify`;
//! - nothing else is rewritten at all.
//!
//! Every run takes a fresh seed and prints it; `XDPLB_FUZZ_SEED=S` replays a
//! run and `XDPLB_FUZZ_FRAMES=N` sets its length (default 1,000,000 frames:
//! CI runs that; `cargo xtask fuzz --frames N --seed S` runs longer). At the
//! end the test checks that every kind of outcome above actually occurred,
//! so a fuzzer that stopped reaching the datapath's paths fails too.
//! Needs root (BPF).

use std::{
    cell::Cell,
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    panic::{self, AssertUnwindSafe},
    time::Instant,
};

use etherparse::{LaxNetSlice, LaxSlicedPacket, TransportSlice};
use xdp_common::{
    Backend, Reason, Service, BACKEND_ACTIVE, PROTO_TCP, PROTO_UDP, SVC_F_NO_BACKEND,
};
use xdplb::addr;
use xdplb_tests::{
    datapath::{
        dsr_service, nat_service, TestDatapath, DEFAULT_TIMEOUTS, LO_IFINDEX, TABLE_SIZE, XDP_DROP,
        XDP_PASS, XDP_TX,
    },
    frame::{self, verify, Seg, ACK, FIN, PSH, RST, SYN},
};

const XDP_ABORTED: u32 = 0;
const XDP_REDIRECT: u32 = 4;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// DSR services: (VIP, port, protocol), each served by backends 0..3.
const DSR: [(&str, u16, u8); 3] = [
    ("10.0.100.1", 80, PROTO_TCP),
    ("10.0.100.1", 53, PROTO_UDP),
    ("fd00:100::1", 80, PROTO_TCP),
];
/// NAT services: (VIP, port, protocol, backend, backend port, SNAT address).
#[rustfmt::skip]
const NAT: [(&str, u16, u8, &str, u16, &str); 4] = [
    ("10.0.200.1", 80, PROTO_TCP, "10.0.1.21", 8080, "10.0.1.1"),
    ("10.0.200.1", 53, PROTO_UDP, "10.0.1.21", 5353, "10.0.1.1"),
    ("fd00:200::1", 80, PROTO_TCP, "fd00:1::21", 8080, "fd00:1::1"),
    ("fd00:200::1", 53, PROTO_UDP, "fd00:1::21", 5353, "fd00:1::1"),
];
/// A service without backends: its traffic is dropped.
const EMPTY: (&str, u16, u8) = ("10.0.100.9", 80, PROTO_TCP);

/// xorshift64*: small, fast and reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.replace('_', "").parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?}: {e}")))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A translation the datapath made, learnt from a rewritten frame, so the
/// fuzzer can send replies and ICMP errors that hit it.
#[derive(Clone, Copy)]
struct Translation {
    backend: SocketAddr,
    snat: SocketAddr,
    proto: u8,
}

/// The programmed datapath plus what the fuzzer learnt of it.
struct Fuzzer {
    dp: TestDatapath,
    rng: Rng,
    live: VecDeque<Translation>,
    counts: Counts,
}

#[derive(Default, Debug)]
struct Counts {
    frames: u64,
    passed: u64,
    dropped: u64,
    dsr_forwards: u64,
    nat_rewrites: u64,
    nat_rewrites_verified: u64,
}

impl Fuzzer {
    fn new(seed: u64) -> Self {
        let mut dp = TestDatapath::load("fuzz").expect("loading the XDP program (needs root)");
        dp.accept_macs(&[(LO_IFINDEX, LB_MAC)], &[]).unwrap();
        dp.set_nat_enabled(true).unwrap();
        // An active backend at `addr:port` behind `dst_mac`.
        let backend = |addr: &str, port: u16, dst_mac, service, snat_addr| Backend {
            addr: addr::to_words(ip(addr)),
            dst_mac,
            src_mac: LB_MAC,
            ifindex: LO_IFINDEX,
            state: BACKEND_ACTIVE,
            service,
            snat_addr,
            port_be: port.to_be(),
            _pad: [0; 2],
        };
        for id in 0..3u32 {
            let mac = [0x02, 0, 0, 0, 0, 0x11 + id as u8];
            let b = backend(&format!("10.0.0.{}", 11 + id), 80, mac, 0, [0; 4]);
            dp.set_backend(id, b).unwrap();
        }
        for (id, (vip, port, proto)) in (0u32..).zip(DSR) {
            let svc = dsr_service(id, id * 2 * TABLE_SIZE, TABLE_SIZE);
            let vip = SocketAddr::new(ip(vip), port);
            dp.set_service(vip, proto, svc, &[0, 1, 2]).unwrap();
        }
        let first_nat = DSR.len() as u32;
        for (id, (vip, port, proto, be, be_port, snat)) in (first_nat..).zip(NAT) {
            let mac = [0x02, 0, 0, 0, 0x01, id as u8];
            let b = backend(be, be_port, mac, id, addr::to_words(ip(snat)));
            dp.set_backend(id, b).unwrap();
            let (base, ports) = (id * 2 * TABLE_SIZE, (20000, 4000));
            let svc = nat_service(id, base, TABLE_SIZE, ports, DEFAULT_TIMEOUTS);
            let vip = SocketAddr::new(ip(vip), port);
            dp.set_service(vip, proto, svc, &[id]).unwrap();
        }
        let empty_id = first_nat + NAT.len() as u32;
        let svc = Service {
            flags: SVC_F_NO_BACKEND,
            ..dsr_service(empty_id, empty_id * 2 * TABLE_SIZE, TABLE_SIZE)
        };
        dp.set_service(SocketAddr::new(ip(EMPTY.0), EMPTY.1), EMPTY.2, svc, &[])
            .unwrap();
        Self {
            dp,
            rng: Rng(seed | 1),
            live: VecDeque::new(),
            counts: Counts::default(),
        }
    }

    /// A client at 10.0.0.host or fd00::host, host 1 to 250.
    fn client(&mut self, v6: bool) -> SocketAddr {
        let port = 1024 + self.rng.below(64_000) as u16;
        let host = self.rng.below(250) + 1;
        let ip = if v6 {
            IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, host as u16])
        } else {
            IpAddr::from([10, 0, 0, host as u8])
        };
        SocketAddr::new(ip, port)
    }

    /// A valid frame of one of the kinds the datapath handles.
    fn valid(&mut self) -> Vec<u8> {
        let payload_len = self.rng.below(64);
        let payload: Vec<u8> = (0..payload_len).map(|_| self.rng.next() as u8).collect();
        let mut seg = match self.rng.below(10) {
            // Client to a DSR, NAT or the empty service.
            0..=2 => {
                let (vip, port, proto) = *self.rng.pick(&DSR);
                self.toward_service(ip(vip), port, proto, &payload)
            }
            3..=5 => {
                let (vip, port, proto, ..) = *self.rng.pick(&NAT);
                self.toward_service(ip(vip), port, proto, &payload)
            }
            6 => self.toward_service(ip(EMPTY.0), EMPTY.1, EMPTY.2, &payload),
            // A backend's reply to a live translation.
            7 if !self.live.is_empty() => {
                let t = self.live[self.rng.below(self.live.len())];
                self.seg(t.backend, t.snat, t.proto, &payload)
            }
            // An ICMP error about a live translation or a DSR flow, or
            // quoting garbage.
            8 => return self.icmp_error(),
            // Not for any service.
            _ => {
                let v6 = self.rng.chance(30);
                let src = self.client(v6);
                let dst = self.client(v6);
                let proto = *self.rng.pick(&[PROTO_TCP, PROTO_UDP]);
                self.seg(src, dst, proto, &payload)
            }
        };
        if self.rng.chance(10) {
            seg = seg.tagged(Some(self.rng.below(4095) as u16 + 1));
        }
        if seg.src.is_ipv4() && self.rng.chance(10) {
            seg.ipv4_options = vec![1; 4 * (1 + self.rng.below(10))];
        }
        if seg.src.is_ipv4() && self.rng.chance(5) {
            // A fragment: more-fragments set and/or an offset.
            seg.frag = *self.rng.pick(&[0x2000, 0x0010, 0x2010]);
        }
        seg.frame(LB_MAC, CLIENT_MAC)
    }

    fn toward_service(&mut self, vip: IpAddr, port: u16, proto: u8, payload: &[u8]) -> Seg {
        let client = self.client(vip.is_ipv6());
        self.seg(client, SocketAddr::new(vip, port), proto, payload)
    }

    fn seg(&mut self, src: SocketAddr, dst: SocketAddr, proto: u8, payload: &[u8]) -> Seg {
        if proto == PROTO_TCP {
            let flags = [SYN, SYN, ACK, ACK | PSH, FIN | ACK, RST, SYN | ACK, 0xff];
            Seg::tcp(src, dst, *self.rng.pick(&flags), payload)
        } else {
            let mut s = Seg::udp(src, dst, payload);
            s.no_udp_checksum = src.is_ipv4() && self.rng.chance(10);
            s
        }
    }

    /// An ICMP error from a router about a packet sent from the address it
    /// is addressed to: a live translation's (to the SNAT address) or a DSR
    /// backend's reply to a client (to the VIP); sometimes cut short or
    /// replaced by garbage.
    fn icmp_error(&mut self) -> Vec<u8> {
        let (from, to, proto) = if self.live.is_empty() || self.rng.chance(50) {
            let (vip, port, proto) = *self.rng.pick(&DSR);
            let client = self.client(vip.contains(':'));
            (SocketAddr::new(ip(vip), port), client, proto)
        } else {
            let t = self.live[self.rng.below(self.live.len())];
            (t.snat, t.backend, t.proto)
        };
        let mut quoted = if proto == PROTO_TCP {
            Seg::tcp(from, to, ACK, b"quoted data")
        } else {
            Seg::udp(from, to, b"quoted data")
        }
        .ip();
        if self.rng.chance(20) {
            for b in quoted.iter_mut().skip(self.rng.below(40)) {
                *b = self.rng.next() as u8;
            }
        }
        let max = 8 + self.rng.below(quoted.len() + 8);
        let quote = frame::quote(&quoted, max, false);
        // (router, [(ICMP type, code, the 4 bytes after the checksum)]):
        // too big, unreachable, time exceeded.
        let (router, errors): (_, [(u8, u8, [u8; 4]); 3]) = if from.is_ipv4() {
            (
                "10.0.1.254",
                [(3, 4, [0, 0, 5, 0xdc]), (3, 3, [0; 4]), (11, 0, [0; 4])],
            )
        } else {
            (
                "fd00:1::fe",
                [(2, 0, [0, 0, 5, 0xdc]), (1, 4, [0; 4]), (3, 0, [0; 4])],
            )
        };
        let (kind, code, rest) = *self.rng.pick(&errors);
        let packet = frame::icmp_message(ip(router), from.ip(), kind, code, rest, &quote);
        frame::frame(LB_MAC, CLIENT_MAC, &packet)
    }

    /// One mutation of `f`, chosen at random.
    fn mutate(&mut self, f: &mut Vec<u8>) {
        let r = &mut self.rng;
        match r.below(8) {
            0 => {
                for _ in 0..1 + r.below(8) {
                    if !f.is_empty() {
                        let i = r.below(f.len());
                        f[i] ^= 1 << r.below(8);
                    }
                }
            }
            1 => {
                let keep = r.below(f.len() + 1);
                f.truncate(keep);
            }
            2 if f.len() > 20 => {
                // A length or header-length field set to anything: IPv4
                // IHL/total length, IPv6 payload length, UDP length, TCP
                // data offset (by position in an untagged frame).
                let at = *r.pick(&[14usize, 16, 17, 18, 19, 38, 39, 46, 58, 59]);
                if at < f.len() {
                    f[at] = r.next() as u8;
                }
            }
            3 => {
                // Stack up to three VLAN tags (802.1Q and 802.1ad).
                for _ in 0..1 + r.below(3) {
                    if f.len() >= 14 {
                        let tpid = *r.pick(&[[0x81u8, 0x00], [0x88, 0xa8]]);
                        let tag = [tpid[0], tpid[1], r.next() as u8 & 0x0f, r.next() as u8];
                        f.splice(12..12, tag);
                    }
                }
            }
            4 if f.len() > 34 => {
                // An IPv6 extension header or an odd protocol number.
                let v6 = f.get(12..14) == Some(&[0x86, 0xdd]);
                let at = if v6 { 20 } else { 23 };
                f[at] = *r.pick(&[0u8, 43, 44, 50, 51, 60, 135, 1, 58, 132, 255]);
            }
            5 => {
                let extra = r.below(64);
                f.extend((0..extra).map(|_| r.next() as u8));
            }
            6 if !f.is_empty() => {
                let start = r.below(f.len());
                let end = (start + 1 + r.below(16)).min(f.len());
                for b in &mut f[start..end] {
                    *b = r.next() as u8;
                }
            }
            _ => {
                // An ether type of the datapath's choosing over random bytes.
                let ty = *r.pick(&[[0x08u8, 0x00], [0x86, 0xdd], [0x81, 0x00], [0x08, 0x06]]);
                if f.len() >= 14 {
                    f[12..14].copy_from_slice(&ty);
                }
            }
        }
    }

    /// A frame of random bytes (sometimes with an IP ether type).
    fn random(&mut self) -> Vec<u8> {
        let len = self.rng.below(160);
        let mut f: Vec<u8> = (0..len).map(|_| self.rng.next() as u8).collect();
        if f.len() >= 14 && self.rng.chance(70) {
            f[..6].copy_from_slice(&LB_MAC);
            let ty = *self.rng.pick(&[[0x08u8, 0x00], [0x86, 0xdd]]);
            f[12..14].copy_from_slice(&ty);
            if f.len() > 14 {
                f[14] = if ty[0] == 0x08 { 0x45 } else { 0x60 };
            }
        }
        f
    }

    fn frame(&mut self) -> Vec<u8> {
        match self.rng.below(10) {
            0 => self.random(),
            1..=3 => self.valid(),
            _ => {
                let mut f = self.valid();
                for _ in 0..1 + self.rng.below(3) {
                    self.mutate(&mut f);
                }
                f
            }
        }
    }

    fn run_one(&mut self, n: u64, seed: u64) {
        let mut input = self.frame();
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header
        // (EINVAL), and no driver hands one to XDP.
        while input.len() < 14 {
            input = self.frame();
        }
        let (verdict, out) = self.dp.run(&input).expect("BPF_PROG_TEST_RUN");
        let fail = |why: &str| -> ! {
            panic!(
                "frame {n} of seed {seed:#x}: {why}\ninput:\n{}\noutput:\n{}",
                frame::hex(&input),
                frame::hex(&out)
            )
        };
        self.counts.frames += 1;
        match verdict {
            XDP_ABORTED => fail("XDP_ABORTED"),
            XDP_PASS | XDP_DROP if out != input => fail("a passed or dropped frame was changed"),
            XDP_PASS => self.counts.passed += 1,
            XDP_DROP => self.counts.dropped += 1,
            XDP_TX | XDP_REDIRECT => {
                if out.len() != input.len() || out.len() < 14 {
                    fail("a forwarded frame changed length");
                }
                let dst = destination(&input);
                if out[12..] == input[12..] {
                    if !dst.is_some_and(|d| DSR.iter().any(|s| ip(s.0) == d)) {
                        fail("forwarded unchanged but not to a DSR VIP");
                    }
                    self.counts.dsr_forwards += 1;
                } else {
                    let nat_dst =
                        dst.is_some_and(|d| NAT.iter().any(|s| ip(s.0) == d || ip(s.5) == d));
                    if !nat_dst {
                        fail("rewritten beyond the MACs but not addressed to a NAT service");
                    }
                    self.counts.nat_rewrites += 1;
                    if checksums_valid(&input) {
                        if !checksums_valid(&out) {
                            fail("a NAT rewrite of a valid frame has an invalid checksum");
                        }
                        self.counts.nat_rewrites_verified += 1;
                    }
                    self.learn(&out);
                }
            }
            v => fail(&format!("unknown verdict {v}")),
        }
    }

    /// Remembers the translation of a client-to-backend rewrite.
    fn learn(&mut self, out: &[u8]) {
        let Some((src, dst, proto)) = endpoints(out) else {
            return;
        };
        let translated = NAT
            .iter()
            .any(|s| ip(s.5) == src.ip() && ip(s.3) == dst.ip());
        if !translated {
            return;
        }
        if self.live.len() == 64 {
            self.live.pop_front();
        }
        self.live.push_back(Translation {
            backend: dst,
            snat: src,
            proto,
        });
    }
}

/// The IP source and destination of a frame, if it parses (tags skipped;
/// lax, as a truncated or padded frame still has them).
fn addresses(s: &LaxSlicedPacket) -> Option<(IpAddr, IpAddr)> {
    match s.net.as_ref()? {
        LaxNetSlice::Ipv4(v4) => Some((
            v4.header().source_addr().into(),
            v4.header().destination_addr().into(),
        )),
        LaxNetSlice::Ipv6(v6) => Some((
            v6.header().source_addr().into(),
            v6.header().destination_addr().into(),
        )),
        _ => None,
    }
}

/// The IP destination of a frame, if it parses.
fn destination(f: &[u8]) -> Option<IpAddr> {
    addresses(&LaxSlicedPacket::from_ethernet(f).ok()?).map(|(_, dst)| dst)
}

/// (source, destination, protocol) of a TCP or UDP frame.
fn endpoints(f: &[u8]) -> Option<(SocketAddr, SocketAddr, u8)> {
    let s = LaxSlicedPacket::from_ethernet(f).ok()?;
    let (src, dst) = addresses(&s)?;
    let (sport, dport, proto) = match s.transport? {
        TransportSlice::Tcp(t) => (t.source_port(), t.destination_port(), PROTO_TCP),
        TransportSlice::Udp(u) => (u.source_port(), u.destination_port(), PROTO_UDP),
        _ => return None,
    };
    let (src, dst) = (SocketAddr::new(src, sport), SocketAddr::new(dst, dport));
    Some((src, dst, proto))
}

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Whether every checksum of `f` verifies (`frame::verify`, which panics
/// on the first bad one; its message is silenced here).
fn checksums_valid(f: &[u8]) -> bool {
    let untagged = untag(f);
    QUIET.with(|q| q.set(true));
    let ok = panic::catch_unwind(AssertUnwindSafe(|| verify("fuzz", &untagged))).is_ok();
    QUIET.with(|q| q.set(false));
    ok
}

/// `f` without its VLAN tags (`verify` reads untagged frames).
fn untag(f: &[u8]) -> Vec<u8> {
    let mut out = f.to_vec();
    while out.len() >= 18 && matches!(out[12..14], [0x81, 0x00] | [0x88, 0xa8]) {
        out.drain(12..16);
    }
    out
}

#[test]
fn fuzzed_frames_never_abort_and_rewrite_only_what_they_may() {
    xdplb_tests::require_root();
    let seed = env_u64("XDPLB_FUZZ_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
    });
    let frames = env_u64("XDPLB_FUZZ_FRAMES").unwrap_or(1_000_000);
    println!("fuzz: seed {seed:#x}, {frames} frames (replay: XDPLB_FUZZ_SEED={seed:#x})");
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if !QUIET.with(Cell::get) {
            default_hook(info);
        }
    }));

    let started = Instant::now();
    let mut fuzzer = Fuzzer::new(seed);
    for n in 0..frames {
        fuzzer.run_one(n, seed);
    }
    let c = &fuzzer.counts;
    println!(
        "fuzz: {c:?} in {:.1} s (seed {seed:#x})",
        started.elapsed().as_secs_f64()
    );
    // The fuzzer must have reached every outcome it checks (with fewer than
    // 10,000 frames some may by chance not occur).
    if frames >= 10_000 {
        assert!(c.passed > 0, "no frame was passed: {c:?}");
        assert!(c.dropped > 0, "no frame was dropped: {c:?}");
        assert!(c.dsr_forwards > 0, "no DSR forward: {c:?}");
        assert!(
            c.nat_rewrites_verified > 0,
            "no verified NAT rewrite: {c:?}"
        );
        let dsr_icmp = fuzzer.dp.reason(Reason::DsrIcmp).unwrap();
        assert!(dsr_icmp > 0, "no ICMP error sent to a DSR backend: {c:?}");
    }
}

/// Mutations of `base` (byte flips, deletions, duplications, splices of
/// tokens the grammar knows), `n` of them from `rng`.
fn mutated_texts(base: &str, tokens: &[&str], n: usize, rng: &mut Rng) -> Vec<Vec<u8>> {
    let base = base.as_bytes();
    (0..n)
        .map(|_| {
            let mut t = base.to_vec();
            for _ in 0..1 + rng.below(6) {
                let at = rng.below(t.len() + 1);
                match rng.below(5) {
                    0 if at < t.len() => t[at] ^= 1 << rng.below(8),
                    1 if at < t.len() => {
                        let end = (at + 1 + rng.below(40)).min(t.len());
                        t.drain(at..end);
                    }
                    2 => {
                        let len = rng.below(200).min(t.len() - at.min(t.len()));
                        let piece = t[at..at + len].to_vec();
                        let times = 1 + rng.below(50);
                        for _ in 0..times {
                            t.splice(at..at, piece.iter().copied());
                        }
                    }
                    3 => {
                        let tok = rng.pick(tokens).as_bytes().to_vec();
                        t.splice(at..at, tok);
                    }
                    _ => t.insert(at, rng.next() as u8),
                }
            }
            t
        })
        .collect()
}

/// The configuration parser on mutated example configurations: never a
/// panic, every answer within a second, every error one line.
#[test]
fn fuzzed_configurations_are_refused_quickly_on_one_line() {
    let seed = env_u64("XDPLB_FUZZ_SEED").unwrap_or(0x5eed_c0f1);
    println!("config fuzz: seed {seed:#x}");
    let mut rng = Rng(seed | 1);
    let example = include_str!("../../examples/xdplb.toml");
    let tokens = [
        "[[service]]",
        "[[service.backend]]",
        "[daemon]",
        "[cluster]",
        "= ",
        "\"",
        "'''",
        "\n",
        "[",
        "]",
        "{",
        "}",
        ",",
        ".",
        "a.b.c.d.e.f",
        "port = 99999",
        "weight = -1",
        "vip = \"::\"",
        "mode = \"nat\"",
        "[service.nat]",
        "ports = \"1-0\"",
        "1e999",
        "\u{0}",
        "\u{202e}",
        "table_size = 4",
    ];
    let texts = mutated_texts(example, &tokens, 5_000, &mut rng);
    for (i, text) in texts.iter().enumerate() {
        let text = String::from_utf8_lossy(text);
        let started = Instant::now();
        let result = xdplb::config::Config::parse(&text, "fuzz.toml");
        let took = started.elapsed();
        assert!(
            took.as_secs_f64() < 1.0,
            "config {i} of seed {seed:#x} took {took:?}:\n{text}"
        );
        if let Err(e) = result {
            let message = e.to_string();
            assert!(
                !message.contains('\n') && message.len() < 1_000,
                "config {i} of seed {seed:#x}: error not one short line: {message:?}"
            );
        }
    }
}

/// The API's request router on mutated requests: never a panic, and
/// everything it accepts is a request that maps back to the same route.
#[test]
fn fuzzed_api_requests_are_refused_or_understood() {
    use xdplb::api::server::{path_of, route};
    let seed = env_u64("XDPLB_FUZZ_SEED").unwrap_or(0x5eed_a910);
    println!("API fuzz: seed {seed:#x}");
    let mut rng = Rng(seed | 1);
    let bodies = [
        concat!(
            r#"{"name":"web","vip":"10.0.0.1","port":80,"protocol":"tcp","#,
            r#""backend":[{"address":"10.0.0.2"}]}"#
        ),
        r#"{"service":"web","backend":{"address":"10.0.0.3","port":8080,"weight":5}}"#,
        r#"{"service":"web","address":"10.0.0.2","port":80}"#,
        r#"{"name":"web"}"#,
    ];
    let targets = [
        ("POST", "/v1/services/add"),
        ("POST", "/v1/backends/add"),
        ("POST", "/v1/backends/drain"),
        ("POST", "/v1/services/remove"),
        (
            "GET",
            "/v1/flow?src=10.0.0.9%3A4000&dst=10.0.0.1%3A80&protocol=tcp",
        ),
        ("GET", "/v1/backends?service=web"),
    ];
    let tokens = [
        "\"", "{", "}", "[", ",", ":", "%", "%zz", "?", "&", "=", "\\u0000", "1e400",
    ];
    let (mut accepted, mut refused) = (0u32, 0u32);
    for _ in 0..2_000 {
        let (method, target) = *rng.pick(&targets);
        let body = *rng.pick(&bodies);
        let target = &mutated_texts(target, &tokens, 1, &mut rng)[0];
        let body = &mutated_texts(body, &tokens, 1, &mut rng)[0];
        let target = String::from_utf8_lossy(target);
        match route(method, &target, body) {
            Ok(request) => {
                accepted += 1;
                let (m, path, again) = path_of(&request);
                let back = route(m, &path, again.as_deref().unwrap_or_default())
                    .unwrap_or_else(|e| panic!("{request:?} does not route back: {e:?}"));
                assert_eq!(back, request, "round trip of {method} {target}");
            }
            Err(_) => refused += 1,
        }
    }
    println!("API fuzz: {accepted} accepted, {refused} refused");
    assert!(
        refused > 0 && accepted > 0,
        "the mutations reached both outcomes"
    );
}
