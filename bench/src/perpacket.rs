//! Per-packet cost of the datapath (group "per-packet"), measured as
//! Katran's `katran_tester -perf_testing` does: many separate
//! BPF_PROG_TEST_RUN calls with repeat = 1, averaging the duration the
//! kernel reports for each. With repeat > 1 the kernel would not reset the
//! frame between iterations, so a program that rewrites it would measure
//! its own output.
//!
//! Floors come from the same run, measured the same way: `xdp_pass` (the
//! least an XDP program can cost, including the test-run machinery) and
//! `xdp_mac_swap` (the least a forwarding program can cost). Every case is
//! reported as its cost above that repetition's XDP_PASS floor.
//!
//! Replication (flow pins reported to a ring buffer for the daemon) is
//! switched on and off between chunks, so a case with it on and the same
//! case with it off run on the same instance and flow table: on the first
//! instance, whose ring the benchmark drains before every chunk (the
//! daemon's normal state), and on a third instance whose ring is kept full
//! (the daemon fell behind: every report is lost and counted).
//!
//! To add a case (e.g. NAT forward/reverse): program what it needs in
//! `program_services` and push one `Case` in `cases`.

use std::net::{SocketAddr, SocketAddrV4};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use xdp_common::{
    replication::{COUNTS_MAP, COUNT_LOST, COUNT_WRITTEN, EVENTS_MAP},
    Flow, FlowKey, Reason, BACKEND_DOWN, MAX_OPENING_FLOWS, PROTO_TCP, PROTO_UDP,
};
use xdplb::{
    addr,
    dataplane::{Maps, SumPerCpu as _},
    loader::load_passthrough,
    program::{MAC_SWAP_PROGRAM, PASS_PROGRAM},
};

use crate::{
    fixture::{self, backends_with_table, Loaded, XDP_PASS, XDP_TX},
    frames::{self, NewFlows, Sources},
    harness::{on_cpu, Figure, Opts, Reference, Section},
    report::median_of,
};

pub const GROUP: &str = "per-packet";

pub const DESCRIPTION: &str = "Cost of one packet through the XDP program, measured as Katran's \
`katran_tester -perf_testing` does: separate `BPF_PROG_TEST_RUN` calls with `repeat = 1` \
(1,000,000 per case and repetition), averaging the duration the kernel reports per call, on one \
pinned CPU. (With `repeat > 1` the kernel does not reset the frame between iterations, so a \
rewriting program would measure its own output.) Two floors are measured the same way in the same \
run: `xdp_pass` (returns XDP_PASS: the cost of the test-run machinery itself) and `xdp_mac_swap` \
(swaps MACs, returns XDP_TX: the least any forwarding program can do). Every xdplb case is \
reported as its mean **minus that repetition's XDP_PASS floor**; the floors are reported raw. 5 \
repetitions; within one, every case and the floor run round-robin in chunks of 10,000 calls, the \
order rotated every round, so noise from the shared machine hits all of them alike. Frames: \
58-byte IPv4 TCP, 46-byte IPv4 UDP, 78-byte IPv6 TCP (no padding to 60); maps are populated \
directly (no daemon); services use 65,537-slot Maglev tables built by `xdplb::maglev::build`. \
Rows *with replication on* switch the reporting of pinned flows on in the globals before each of \
their chunks (off again before the other cases' chunks), on the same instance and flow table as \
the case they are compared to: the benchmark drains that instance's ring buffer (as the daemon \
does) before every such chunk, untimed, so every report is written. The *ring full* rows run on \
a third identical instance whose ring was filled beforehand and is never drained, so every \
report finds it full and is counted as lost; their baseline is a new-flow case with replication \
off on that instance.";

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// BPF_PROG_TEST_RUN runs XDP as if received on loopback: backends
/// reached through ifindex 1 are answered with XDP_TX.
const LO_IFINDEX: u32 = 1;
const TABLE: u32 = 65537;
/// Untimed calls before each timed run (warms caches, pins the flow of
/// an established case).
const WARMUP: usize = 1000;
const REPETITIONS: usize = 5;
/// Calls per profiled case (fewer than the free entries of the first
/// instance's table: the profile inserts without deleting).
const PROFILE_CALLS: usize = 100_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Prog {
    Pass,
    MacSwap,
    Lb,
    /// The second datapath instance, with a full flow table.
    LbFull,
    /// The third instance, whose replication ring is kept full.
    LbRingFull,
}

enum Flows {
    /// The same frame every call.
    Same,
    /// A new client endpoint (IPv4 source address and port) every call.
    /// With `recycle`, the flows a chunk of calls inserted are deleted
    /// (untimed) before the next chunk, so the table stays small and every
    /// insert finds a free entry; without it nothing is deleted (on the
    /// full-table instance every insert then evicts).
    New {
        sources: Sources,
        /// Boxed: a frame template is large next to `Same`.
        frames: Box<NewFlows>,
        dst: SocketAddr,
        proto: u8,
        recycle: bool,
        inserted: Vec<FlowKey>,
        /// NAT flows: recycling deletes both their translation entries.
        nat: bool,
        /// Recycle after every call (untimed) instead of every chunk, so
        /// every call finds the same tables.
        per_call: bool,
    },
}

/// Timed calls per chunk: a repetition runs every case (and the floor)
/// round-robin in chunks of this many calls, so noise from the shared
/// machine hits every case alike.
const CHUNK: usize = 10_000;
/// Untimed calls before each chunk (the previous chunk ran another case).
const CHUNK_WARMUP: usize = 100;

struct Case {
    name: &'static str,
    prog: Prog,
    frame: Vec<u8>,
    verdict: u32,
    flows: Flows,
    /// The counter every call must bump (checks the case measures the
    /// path it claims to).
    reason: Option<Reason>,
    /// Target on the median above the XDP_PASS floor, in ns.
    target: Option<f64>,
    /// Whether replication is on while the case runs.
    replicate: bool,
    /// The case with replication off this one is compared to.
    baseline: Option<&'static str>,
    note: Option<String>,
    /// Mean ns per call, one per repetition (raw, floor not subtracted).
    means: Vec<f64>,
}

impl Case {
    fn same(name: &'static str, frame: Vec<u8>, verdict: u32, reason: Reason) -> Self {
        Self {
            name,
            prog: Prog::Lb,
            frame,
            verdict,
            flows: Flows::Same,
            reason: Some(reason),
            target: None,
            replicate: false,
            baseline: None,
            note: None,
            means: Vec::new(),
        }
    }

    /// New TCP flows (SYNs): they go to the opening table.
    fn new_flows(name: &'static str, net: u8, dst: SocketAddr, recycle: bool) -> Self {
        Self::new_flows_of(name, net, dst, PROTO_TCP, recycle)
    }

    /// New flows over `proto`, a different client every call.
    fn new_flows_of(
        name: &'static str,
        net: u8,
        dst: SocketAddr,
        proto: u8,
        recycle: bool,
    ) -> Self {
        let frame = frames::packet(CLIENT_MAC, LB_MAC, sa("10.0.0.1:1"), dst, proto);
        Self {
            flows: Flows::New {
                sources: Sources::new(net),
                frames: Box::new(NewFlows::new(CLIENT_MAC, LB_MAC, dst, proto)),
                dst,
                proto,
                recycle,
                inserted: Vec::new(),
                nat: false,
                per_call: false,
            },
            ..Self::same(name, frame, XDP_TX, Reason::FlowNew)
        }
    }

    /// New TCP flows (SYNs) to a NAT service, each from its own address,
    /// on the NAT instance; each translation deleted right after its call.
    fn nat_new_flows(name: &'static str, net: u8, dst: SocketAddr) -> Self {
        let mut case = Self {
            prog: Prog::LbFull,
            reason: Some(Reason::NatNew),
            ..Self::new_flows(name, net, dst, true)
        };
        if let Flows::New {
            sources,
            nat,
            per_call,
            ..
        } = &mut case.flows
        {
            *sources = Sources::one_per_address(net);
            (*nat, *per_call) = (true, true);
        }
        case
    }

    fn floor(name: &'static str, prog: Prog, verdict: u32) -> Self {
        let frame = frames::packet(
            CLIENT_MAC,
            LB_MAC,
            sa("10.0.0.1:40000"),
            sa("10.0.100.1:80"),
            PROTO_TCP,
        );
        Self {
            prog,
            reason: None,
            ..Self::same(name, frame, verdict, Reason::Tx)
        }
    }

    fn target(mut self, ns: f64) -> Self {
        self.target = Some(ns);
        self
    }

    fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// The case with replication on, compared to `off` (the same case
    /// with it off, on the same instance).
    fn replicated(mut self, off: &'static str) -> Self {
        self.replicate = true;
        self.baseline = Some(off);
        self
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("valid socket address")
}

pub const NEW_FLOW: &str = "new flow: TCP SYN, Maglev pick + flow insert";
pub const ESTABLISHED: &str = "established flow (DSR, flow-table hit)";
pub const NON_SERVICE: &str = "packet for no service (XDP_PASS)";
const PASS_FLOOR: &str = "floor: xdp_pass (raw)";
const MAC_FLOOR: &str = "floor: xdp_mac_swap (raw)";
/// The MAC-swap floor runs among the cases; reported raw (MAC_FLOOR).
const MAC_CASE: &str = "xdp_mac_swap";
const EVICTION: &str = "new flow into a full opening table (LRU eviction)";
/// Replication reports a UDP flow as it is pinned (a TCP flow once its
/// client answers), so the replication cases open UDP flows.
const NEW_FLOW_UDP: &str = "new flow: UDP, Maglev pick + flow insert";
pub const NEW_FLOW_REPL: &str = "new UDP flow with replication on (pin reported to the ring)";
const RING_FULL: &str = "new UDP flow with replication on, ring full (report lost)";
const RING_FULL_OFF: &str = "new UDP flow, replication off (ring-full instance)";
const ESTABLISHED_REPL: &str = "established flow with replication on";
const NON_SERVICE_REPL: &str = "packet for no service with replication on";

/// Programs the services and backends the cases use.
fn program_services(lb: &mut Loaded) -> Result<()> {
    // BPF_PROG_TEST_RUN runs the program as if on loopback.
    lb.accept_macs(&[(LO_IFINDEX, LB_MAC)], &[])?;
    // Three backends behind TCP and UDP services on an IPv4 VIP and a TCP
    // service on an IPv6 VIP; 1,000 behind another VIP.
    let table = backends_with_table(lb, 0, 3, 20, TABLE, LB_MAC, LO_IFINDEX)?;
    fixture::service(lb, (VIP, PROTO_TCP), 0, 0, &table)?;
    fixture::service(lb, (sa("10.0.100.1:53"), PROTO_UDP), 1, 2 * TABLE, &table)?;
    fixture::service(
        lb,
        (sa("[fd00:100::1]:80"), PROTO_TCP),
        2,
        4 * TABLE,
        &table,
    )?;
    let table = backends_with_table(lb, 100, 1000, 21, TABLE, LB_MAC, LO_IFINDEX)?;
    fixture::service(lb, (BIG_VIP, PROTO_TCP), 3, 6 * TABLE, &table)?;
    // A service whose table names a backend marked down: a flow pinned to
    // it is re-picked on every packet, onto the same backend (the frame is
    // still forwarded: the datapath trusts the table).
    fixture::backend(
        lb,
        50,
        "10.22.0.1".parse()?,
        ([0x02, 0xbe, 0, 22, 0, 1], LB_MAC),
        LO_IFINDEX,
        BACKEND_DOWN,
    )?;
    fixture::service(
        lb,
        (REPICK_VIP, PROTO_TCP),
        4,
        8 * TABLE,
        &vec![50; TABLE as usize],
    )?;
    Ok(())
}

/// NAT service of the second instance: VIP:80 -> backend 0 at :8080, seen
/// from the SNAT address. Returns the reply frame of the NAT cases' flow
/// (after translating its first packet, which allocates the port).
fn program_nat(lb: &mut Loaded) -> Result<Vec<u8>> {
    let snat: std::net::IpAddr = "10.0.200.2".parse()?;
    fixture::nat_service(
        lb,
        (NAT_VIP, PROTO_TCP),
        (5, 10 * TABLE),
        (0, 8080),
        snat,
        (10000, 22768),
    )?;
    // The scan's service: another backend, whose range has one port free.
    fixture::nat_service(
        lb,
        (NAT_SCAN_VIP, PROTO_TCP),
        (6, 12 * TABLE),
        (1, 8080),
        snat,
        (SCAN_BASE, SCAN_PORTS),
    )?;
    let backend = lb.maps.backend(1)?;
    let now = xdplb::dataplane::monotonic_coarse_ns();
    for port in (SCAN_BASE..SCAN_BASE + SCAN_PORTS).filter(|p| *p != SCAN_FREE) {
        let key = addr::flow_key(
            SocketAddr::new(addr::from_words(backend.addr), 8080),
            SocketAddr::new(snat, port),
            PROTO_TCP,
        );
        let held = xdp_common::NatRev {
            client: addr::to_words("10.0.250.1".parse()?),
            vip: addr::to_words(NAT_SCAN_VIP.ip()),
            client_port_be: port.to_be(),
            vip_port_be: NAT_SCAN_VIP.port().to_be(),
            last_seen_ns: now,
            timeout_s: 3600,
            ..Default::default()
        };
        lb.maps.nat_rev.insert(key, held, 0)?;
    }
    let first = frames::opening(CLIENT_MAC, LB_MAC, sa("10.0.0.1:40000"), NAT_VIP, PROTO_TCP);
    let (prog, maps) = lb.parts();
    translate_once(prog, &first, "the first packet")?;
    let key = addr::flow_key(sa("10.0.0.1:40000"), NAT_VIP, PROTO_TCP);
    let fwd = maps
        .nat_fwd
        .get(&key, 0)
        .context("NAT: no flow after the first packet")?;
    let backend = maps.backend(fwd.backend)?;
    let from = SocketAddr::new(addr::from_words(backend.addr), 8080);
    let reply = frames::packet(
        backend.dst_mac,
        LB_MAC,
        from,
        SocketAddr::new(snat, u16::from_be(fwd.nat_port_be)),
        PROTO_TCP,
    );
    // The backend answers once: the flow is established, with the full
    // timeout, not the 5 s of an unanswered one (which would expire
    // during the measurement and make it a new flow again).
    translate_once(prog, &reply, "the first reply")?;
    Ok(reply)
}

/// Runs `frame` once; it must be translated (XDP_TX).
fn translate_once(prog: &Xdp, frame: &[u8], what: &str) -> Result<()> {
    let res = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat: 1,
        ..Default::default()
    })?;
    if res.return_value != XDP_TX {
        bail!(
            "NAT: {what} was not translated (verdict {})",
            res.return_value
        );
    }
    Ok(())
}

/// The UDP service of the first instance.
const UDP_VIP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(
    std::net::Ipv4Addr::new(10, 0, 100, 1),
    53,
));
const VIP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(
    std::net::Ipv4Addr::new(10, 0, 100, 1),
    80,
));
const BIG_VIP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(
    std::net::Ipv4Addr::new(10, 0, 100, 2),
    80,
));
const NAT_VIP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(
    std::net::Ipv4Addr::new(10, 0, 100, 4),
    80,
));
const NAT_SCAN_VIP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(
    std::net::Ipv4Addr::new(10, 0, 100, 5),
    80,
));
/// The scan service's port range, all held but `SCAN_FREE`.
const SCAN_BASE: u16 = 40000;
const SCAN_PORTS: u16 = 256;
const SCAN_FREE: u16 = SCAN_BASE + 200;
const NAT_NEW: &str = "NAT new flow: SYN, port taken by a random try, two inserts";
const NAT_NEW_SCAN: &str = "NAT new flow, one port of 256 free (range scan)";
const NAT_FORWARD: &str = "NAT established flow, forward (client to backend)";
const NAT_REVERSE: &str = "NAT established flow, reverse (backend to client)";
const REPICK_VIP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(
    std::net::Ipv4Addr::new(10, 0, 100, 3),
    80,
));

/// The cases, in the order they are reported.
fn cases() -> Vec<Case> {
    let packet =
        |src: &str, dst: SocketAddr, proto| frames::packet(CLIENT_MAC, LB_MAC, sa(src), dst, proto);
    vec![
        Case::same(
            NON_SERVICE,
            packet("10.0.0.1:40000", sa("10.0.0.2:22"), PROTO_TCP),
            XDP_PASS,
            Reason::PassNotService,
        )
        .target(25.0)
        .note("TCP to an address that is no VIP: parse, one service look-up (miss), one counter"),
        Case::same(
            ESTABLISHED,
            packet("10.0.0.1:40000", VIP, PROTO_TCP),
            XDP_TX,
            Reason::FlowHit,
        )
        .target(75.0)
        .note("the same TCP frame every call; its flow was pinned by the untimed warm-up"),
        Case::same(
            "established UDP flow",
            packet("10.0.0.1:40000", sa("10.0.100.1:53"), PROTO_UDP),
            XDP_TX,
            Reason::FlowHit,
        ),
        Case::same(
            "established IPv6 TCP flow",
            packet("[fd00::1]:40000", sa("[fd00:100::1]:80"), PROTO_TCP),
            XDP_TX,
            Reason::FlowHit,
        ),
        Case::new_flows(NEW_FLOW, 1, VIP, true).target(180.0).note(
            "a different client (source address and port) every call, so no call reuses a flow. \
             Before each chunk of calls (untimed, so no syscall runs between timed calls) the \
             flows the previous chunk inserted are deleted: every insert finds a free entry, in a \
             table holding at most ~20,000 flows",
        ),
        Case::new_flows("new flow, 1,000-backend service", 2, BIG_VIP, true)
            .note("as the new-flow case, against a service of 1,000 backends (65,537-slot table)"),
        Case {
            prog: Prog::LbFull,
            ..Case::new_flows(EVICTION, 3, VIP, false)
        }
        .note(
            "a different client every call and nothing deleted, on a second, identical datapath \
             whose opening table was pre-filled so this CPU's LRU list is full: every insert \
             evicts (the steady state of a busy balancer)",
        ),
        Case::same(
            "re-pick path (proxy for new flows in pps)",
            packet("10.0.0.9:40000", REPICK_VIP, PROTO_TCP),
            XDP_TX,
            Reason::FlowRepick,
        )
        .note(
            "a flow pinned to a backend that is down: flow hit, Maglev pick, flow re-insert on \
                every packet; the pps benchmark's new-flow proxy, measured here to compare with \
                the real new-flow case",
        ),
        Case {
            prog: Prog::LbFull,
            ..Case::same(
                NAT_FORWARD,
                packet("10.0.0.1:40000", NAT_VIP, PROTO_TCP),
                XDP_TX,
                Reason::FlowHit,
            )
        }
        .target(120.0)
        .note(
            "NAT service, established flow, client to backend: NAT-table hit, DNAT+SNAT rewrite, \
                incremental checksums (on the second instance, where NAT is enabled)",
        ),
        // The reply frame names the port the forward warm-up allocated:
        // `measure_all` fills it in.
        Case {
            prog: Prog::LbFull,
            ..Case::same(NAT_REVERSE, Vec::new(), XDP_TX, Reason::NatReply)
        }
        .target(120.0)
        .note(
            "NAT service, established flow, backend to client: service miss, reply-table hit, \
                rewrite back",
        ),
        Case::nat_new_flows(NAT_NEW, 11, NAT_VIP).note(
            "a TCP SYN from a new client address every call to a NAT service with 22,768 free \
                ports: source check, Maglev pick, a random port's reply key inserted, the \
                client-side entry inserted, DNAT+SNAT rewrite; the translation is deleted after \
                each call (untimed)",
        ),
        Case::nat_new_flows(NAT_NEW_SCAN, 12, NAT_SCAN_VIP).note(
            "as above, to a service whose 256 ports are all held by live flows but one: the \
                8 random tries miss, and the scan from a random port walks about half the \
                range (one look-up per port, 128 on average) to the free one; a wider range \
                scans proportionally longer",
        ),
        Case::new_flows_of(NEW_FLOW_UDP, 7, UDP_VIP, PROTO_UDP, true).note(
            "as the new-flow case, with UDP datagrams: a UDP flow goes straight to the flow \
             table (a TCP flow starts in the opening table); the baseline of the replication rows",
        ),
        Case::new_flows_of(NEW_FLOW_REPL, 4, UDP_VIP, PROTO_UDP, true)
            .replicated(NEW_FLOW_UDP)
            .note(
                "as the new UDP flow case (same instance, same flow table) with replication on: \
                 every insert also writes a 72-byte event to the ring buffer and bumps a per-CPU \
                 counter. The ring is drained (untimed) before every chunk, so it never fills. \
                 A TCP flow pays the same once its client answers (its second packet), not on \
                 its SYN",
            ),
        Case {
            prog: Prog::LbRingFull,
            ..Case::new_flows_of(RING_FULL_OFF, 6, UDP_VIP, PROTO_UDP, true)
        }
        .note("as the new UDP flow case, on the ring-full instance, replication off: the baseline"),
        Case {
            prog: Prog::LbRingFull,
            ..Case::new_flows_of(RING_FULL, 5, UDP_VIP, PROTO_UDP, true)
        }
        .replicated(RING_FULL_OFF)
        .note(
            "as the new-flow case, with replication on, on a third instance whose ring was filled \
             beforehand and is never drained: every report fails and bumps the lost counter (a \
             daemon that fell behind)",
        ),
        Case::same(
            ESTABLISHED_REPL,
            packet("10.0.0.1:40000", VIP, PROTO_TCP),
            XDP_TX,
            Reason::FlowHit,
        )
        .replicated(ESTABLISHED)
        .note("as the established case, with replication on: must not touch the ring"),
        Case::same(
            NON_SERVICE_REPL,
            packet("10.0.0.1:40000", sa("10.0.0.2:22"), PROTO_TCP),
            XDP_PASS,
            Reason::PassNotService,
        )
        .replicated(NON_SERVICE)
        .note("as the no-service case, with replication on: must not touch the ring"),
        Case::floor(MAC_CASE, Prog::MacSwap, XDP_TX),
    ]
}

/// An instance's ring of pinned flows, drained here in place of the
/// daemon, and its per-CPU written/lost counters.
struct Ring {
    events: RingBuf<MapData>,
    counts: PerCpuArray<MapData, u64>,
}

impl Ring {
    /// Takes the ring and counters out of `lb`.
    fn take(lb: &mut Loaded) -> Result<Self> {
        let mut take = |name: &str| {
            lb.datapath
                .ebpf
                .take_map(name)
                .with_context(|| format!("map {name} missing from the XDP object"))
        };
        Ok(Self {
            events: RingBuf::try_from(take(EVENTS_MAP)?)?,
            counts: PerCpuArray::try_from(take(COUNTS_MAP)?)?,
        })
    }

    /// Consumes every event in the ring; returns how many there were.
    fn drain(&mut self) -> u64 {
        let mut n = 0;
        while let Some(item) = self.events.next() {
            drop(item);
            n += 1;
        }
        n
    }

    /// Counter `slot` (COUNT_WRITTEN, COUNT_LOST) summed over the CPUs.
    fn count(&self, slot: u32) -> Result<u64> {
        Ok(self.counts.get(&slot, 0)?.sum())
    }
}

/// Fills this CPU's share of the opening table (where new TCP flows go)
/// so LRU inserts evict.
fn prefill_flows(maps: &mut Maps) -> Result<u64> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)? as u64;
    let n = u64::from(MAX_OPENING_FLOWS) / cpus.max(1) + 1024;
    let dst = sa("10.0.100.1:80");
    let mut sources = Sources::new(200);
    for _ in 0..n {
        let src = SocketAddr::V4(sources.next().expect("endless"));
        let key = addr::flow_key(src, dst, PROTO_TCP);
        maps.opening.insert(
            key,
            Flow {
                backend: 0,
                ..Default::default()
            },
            0,
        )?;
    }
    Ok(n)
}

/// Total kernel-reported ns of `calls` timed calls, after `warmup`
/// untimed ones.
fn measure(
    prog: &Xdp,
    maps: &mut Maps,
    case: &mut Case,
    warmup: usize,
    calls: usize,
) -> Result<u128> {
    if let Flows::New {
        recycle: true,
        inserted,
        nat,
        ..
    } = &mut case.flows
    {
        for key in inserted.drain(..) {
            forget(maps, &key, *nat).with_context(|| format!("{}: deleting a flow", case.name))?;
        }
    }
    let before = case.reason.map(|r| maps.reason_count(r)).transpose()?;
    let mut total: u128 = 0;
    for i in 0..warmup + calls {
        if let Flows::New {
            sources,
            frames,
            dst,
            proto,
            recycle,
            inserted,
            ..
        } = &mut case.flows
        {
            let src: SocketAddrV4 = sources.next().expect("endless");
            frames.write(src, &mut case.frame);
            if *recycle {
                inserted.push(addr::flow_key(SocketAddr::V4(src), *dst, *proto));
            }
        }
        let opts = TestRunOptions {
            data_in: Some(&case.frame),
            repeat: 1,
            ..Default::default()
        };
        let res = prog
            .test_run(opts)
            .with_context(|| format!("BPF_PROG_TEST_RUN ({})", case.name))?;
        if res.return_value != case.verdict {
            bail!(
                "{}: verdict {} instead of {}",
                case.name,
                res.return_value,
                case.verdict
            );
        }
        if i >= warmup {
            total += res.duration.as_nanos();
        }
        if let Flows::New {
            per_call: true,
            inserted,
            nat,
            ..
        } = &mut case.flows
        {
            for key in inserted.drain(..) {
                forget(maps, &key, *nat)
                    .with_context(|| format!("{}: deleting a flow", case.name))?;
            }
        }
    }
    if let (Some(reason), Some(before)) = (case.reason, before) {
        let delta = maps.reason_count(reason)? - before;
        // The first call may pin an established flow anew.
        if delta + 1 < (warmup + calls) as u64 {
            bail!(
                "{}: counter {} rose by {delta} over {} calls: not the path measured",
                case.name,
                reason.name(),
                warmup + calls
            );
        }
    }
    Ok(total)
}

/// Deletes a flow a case inserted: a new TCP flow from the opening table,
/// a UDP one from the flow table, a NAT one's two translation entries.
fn forget(maps: &mut Maps, key: &FlowKey, nat: bool) -> Result<()> {
    if nat {
        let fwd = maps.nat_fwd.get(key, 0)?;
        let backend = maps.backend(fwd.backend)?;
        let reply = addr::flow_key(
            SocketAddr::new(
                addr::from_words(backend.addr),
                u16::from_be(backend.port_be),
            ),
            SocketAddr::new(
                addr::from_words(fwd.snat_addr),
                u16::from_be(fwd.nat_port_be),
            ),
            key.proto,
        );
        maps.nat_rev.remove(&reply)?;
        maps.nat_fwd.remove(key)?;
    } else if key.proto == PROTO_TCP {
        maps.opening.remove(key)?;
    } else {
        maps.flows.remove(key)?;
    }
    Ok(())
}

/// What the cases run on: `progs` are xdp_pass, xdp_mac_swap and the
/// three xdplb instances (see [`Prog`]); `maps` the instances' maps,
/// `rings` their replication rings (taken from the first and the third).
struct Datapaths<'a> {
    progs: [&'a Xdp; 5],
    maps: [&'a mut Maps; 3],
    rings: [Option<Ring>; 3],
    /// Whether each instance's globals have replication on now.
    replicating: [bool; 3],
    /// Events drained from the first instance's ring.
    drained: u64,
}

impl Datapaths<'_> {
    /// [`measure`] on the case's program. On an instance with a ring it
    /// first switches replication on or off as the case wants, drains the
    /// ring of the first instance when the case replicates, and afterwards
    /// checks that the calls reported what the case claims: nothing with
    /// replication off; with it on, every new flow written (drained ring)
    /// or lost (full ring), nothing for other packets (the first call may
    /// pin an established flow anew).
    fn measure(&mut self, case: &mut Case, warmup: usize, calls: usize) -> Result<u128> {
        let (prog, i) = match case.prog {
            Prog::Pass => (self.progs[0], 0),
            Prog::MacSwap => (self.progs[1], 0),
            Prog::Lb => (self.progs[2], 0),
            Prog::LbFull => (self.progs[3], 1),
            Prog::LbRingFull => (self.progs[4], 2),
        };
        let lb = matches!(case.prog, Prog::Lb | Prog::LbFull | Prog::LbRingFull);
        if lb && self.replicating[i] != case.replicate {
            if self.rings[i].is_none() {
                bail!("{}: replication on an instance without a ring", case.name);
            }
            set_replicate(self.maps[i], case.replicate)?;
            self.replicating[i] = case.replicate;
        }
        let ring = match &mut self.rings[i] {
            Some(r) if lb => {
                if case.replicate && case.prog == Prog::Lb {
                    self.drained += r.drain();
                }
                Some(&*r)
            }
            _ => None,
        };
        let before = match ring {
            Some(r) => Some((r.count(COUNT_WRITTEN)?, r.count(COUNT_LOST)?)),
            None => None,
        };
        let total = measure(prog, &mut *self.maps[i], case, warmup, calls)?;
        if let (Some(ring), Some((written0, lost0))) = (ring, before) {
            let written = ring.count(COUNT_WRITTEN)? - written0;
            let lost = ring.count(COUNT_LOST)? - lost0;
            let n = (warmup + calls) as u64;
            let ok = match (&case.flows, case.prog) {
                _ if !case.replicate => written == 0 && lost == 0,
                (Flows::New { .. }, Prog::Lb) => written == n && lost == 0,
                (Flows::New { .. }, _) => written == 0 && lost == n,
                (Flows::Same, _) => written + lost <= 1,
            };
            if !ok {
                bail!(
                    "{}: {n} calls wrote {written} and lost {lost} ring events: not the path \
                     measured",
                    case.name
                );
            }
        }
        Ok(total)
    }
}

/// Switches the reporting of pinned flows on or off in `maps`' globals.
fn set_replicate(maps: &mut Maps, on: bool) -> Result<()> {
    let mut g = maps.globals.get(&0, 0)?;
    g.replicate = u32::from(on);
    maps.globals
        .set(0, g, 0)
        .context("switching replication in the globals")
}

/// Fills the ring of an instance with new flows' reports until one is
/// lost, with replication switched on for the fill; the flows are deleted
/// by the next measurement of `case`. Returns the events the ring held.
fn fill_ring(prog: &Xdp, maps: &mut Maps, ring: &Ring, case: &mut Case) -> Result<u64> {
    // 56 bytes an event with its header: a little over 74,898 fill 4 MiB.
    let calls = (xdp_common::replication::EVENTS_BYTES / 56 + 1000) as usize;
    set_replicate(maps, true)?;
    measure(prog, maps, case, 0, calls)?;
    set_replicate(maps, false)?;
    let (written, lost) = (ring.count(COUNT_WRITTEN)?, ring.count(COUNT_LOST)?);
    if lost == 0 {
        bail!(
            "{}: {calls} new flows did not fill the ring ({written} written)",
            case.name
        );
    }
    Ok(written)
}

/// Static facts of a loaded program: instruction count and JIT size.
fn program_facts(name: &str, prog: &Xdp) -> String {
    let info = match prog.info() {
        Ok(i) => i,
        Err(e) => return format!("{name}: no program info ({e})"),
    };
    let id = info.id();
    let dump = crate::harness::run(
        "bpftool",
        &["prog", "dump", "xlated", "id", &id.to_string()],
    );
    let lines = match &dump {
        Ok(text) => {
            let insns = text
                .lines()
                .filter(|l| {
                    l.trim_start()
                        .split(':')
                        .next()
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
                .count();
            format!(
                "{} lines of `bpftool prog dump xlated id {id}` ({insns} instructions, the rest \
                    source-line comments)",
                text.lines().count()
            )
        }
        Err(e) => format!("bpftool failed: {e:#}"),
    };
    format!(
        "`{name}`: {lines}; {} bytes translated, {} bytes JIT-compiled, {} instructions processed \
            by the verifier",
        info.size_translated().map_or("?".into(), |s| s.to_string()),
        info.size_jitted(),
        info.verified_instruction_count()
            .map_or("?".into(), |s| s.to_string()),
    )
}

/// The group of the replication cases' costs: each repetition's
/// difference to the same case with replication off.
pub const REPLICATION_GROUP: &str = "replication-datapath";

pub const REPLICATION_DESCRIPTION: &str = "What turning flow-state replication on costs the \
datapath per packet: measured by the per-packet benchmark (`cargo xtask bench`, or \
`xdplb-bench --only per-packet`), in the same run as the per-packet group, where the rows *with \
replication on* stand next to their ratio to the same case with replication off. Here each \
figure is, per repetition, the mean ns per call with replication on minus the mean of the same \
case with replication off on the same instance and flow table (replication is switched in the \
globals between chunks; both interleaved round-robin in the same repetition, so they share its \
noise), min / median / max over the repetitions. With replication on, every flow the \
datapath pins (a new flow, or a re-pick) is also written as a 72-byte event to a 4 MiB BPF ring \
buffer (`xdplb_flowev_v2`) that the daemon drains; established flows and packets for no service \
must not touch it. The benchmark drains the ring itself (no daemon) before every chunk of \
10,000 calls; a separate instance keeps its ring full to measure the cost when the daemon falls \
behind (against replication off on that instance). After every chunk the ring's written/lost \
counters (`xdplb_replc_v1`) are checked against the path the case claims.";

/// The replication group: per-repetition differences on − off, and what
/// the rings counted.
fn replication_section(cases: &[Case], dp: &Datapaths, ring_held: u64) -> Result<Section> {
    let means = |name: &str| {
        cases
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.means.clone())
            .expect("case exists")
    };
    let mut figures = Vec::new();
    for (on, label) in [
        (NEW_FLOW_REPL, "new flow: replication on − off"),
        (
            RING_FULL,
            "new flow, ring full (report lost): replication on − off",
        ),
        (ESTABLISHED_REPL, "established flow: replication on − off"),
        (
            NON_SERVICE_REPL,
            "packet for no service: replication on − off",
        ),
    ] {
        let case = cases.iter().find(|c| c.name == on).expect("case exists");
        let off = case.baseline.expect("replication cases have a baseline");
        let diff: Vec<f64> = case
            .means
            .iter()
            .zip(means(off))
            .map(|(a, b)| a - b)
            .collect();
        figures.push(
            Figure::new(REPLICATION_GROUP, label, "ns, on − off", diff, false)
                .note(format!("per repetition: \"{on}\" − \"{off}\"")),
        );
    }
    let ring = |i: usize| dp.rings[i].as_ref().expect("instance has a ring");
    let (written, lost) = (ring(0).count(COUNT_WRITTEN)?, ring(0).count(COUNT_LOST)?);
    let full_lost = ring(2).count(COUNT_LOST)?;
    let mut problems = Vec::new();
    if lost != 0 || written == 0 {
        problems.push(format!(
            "replication: the drained ring wrote {written} events and lost {lost} (want > 0, 0)"
        ));
    }
    let notes = vec![format!(
        "Ring counters at the end: the first instance's ring took {written} events (one per new \
         flow with replication on; the established case's flow was pinned with it off) and lost \
         {lost}; the benchmark drained {} of them. The ring-full instance's ring was filled \
         with {ring_held} events beforehand and lost {full_lost} reports. The same instance runs a \
         case with replication on and off, because identical instances differ by tens of ns \
         for the same case (compare the two replication-off new-flow rows of the per-packet \
         group). The differences are small next to the noise of one call (tens of ns on this \
         shared machine): read the median, and the min/max as the spread; established and \
         no-service differences within a few ns of 0 mean no cost.",
        dp.drained
    )];
    Ok(Section {
        group: REPLICATION_GROUP.into(),
        figures,
        notes,
        problems,
        ..Default::default()
    })
}

pub fn run(opts: &Opts) -> Result<Vec<Section>> {
    let calls = if opts.quick { 20_000 } else { 1_000_000 };
    // The second CPU if there is one: CPU 0 takes more interrupts.
    let cpu = if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        1
    } else {
        0
    };
    on_cpu(cpu, || measure_all(calls, cpu))
}

fn measure_all(calls: usize, cpu: usize) -> Result<Vec<Section>> {
    let mut main = Loaded::load("pp")?;
    let mut full = Loaded::load("ppfull")?;
    let mut ring_full = Loaded::load("ppring")?;
    for lb in [&mut main, &mut full, &mut ring_full] {
        program_services(lb)?;
    }
    let main_ring = Ring::take(&mut main)?;
    let full_ring = Ring::take(&mut ring_full)?;
    let reply = program_nat(&mut full)?;
    let mut cases = cases();
    for case in cases.iter_mut().filter(|c| c.name == NAT_REVERSE) {
        case.frame = reply.clone();
    }
    let (pass_ebpf, pass_name) = load_passthrough(PASS_PROGRAM)?;
    let (mac_ebpf, mac_name) = load_passthrough(MAC_SWAP_PROGRAM)?;
    let pass: &Xdp = pass_ebpf
        .program(&pass_name)
        .context("xdp_pass")?
        .try_into()?;
    let mac: &Xdp = mac_ebpf
        .program(&mac_name)
        .context("xdp_mac_swap")?
        .try_into()?;
    let (main_prog, main_maps) = main.parts();
    let (full_prog, full_maps) = full.parts();
    let prefilled = prefill_flows(full_maps)?;
    let (ring_prog, ring_maps) = ring_full.parts();
    let ring_case = cases
        .iter_mut()
        .find(|c| c.name == RING_FULL)
        .expect("case exists");
    let ring_held = fill_ring(ring_prog, ring_maps, &full_ring, ring_case)?;
    let mut dp = Datapaths {
        progs: [pass, mac, main_prog, full_prog, ring_prog],
        maps: [main_maps, full_maps, ring_maps],
        rings: [Some(main_ring), None, Some(full_ring)],
        replicating: [false; 3],
        drained: 0,
    };

    let mut floor = Case::floor(PASS_FLOOR, Prog::Pass, XDP_PASS);
    let mut floors = Vec::new();
    let started = std::time::Instant::now();
    // Index `cases.len()` stands for the floor.
    let n = cases.len() + 1;
    for i in 0..n {
        // Pins established flows, warms everything once.
        let case = if i == cases.len() {
            &mut floor
        } else {
            &mut cases[i]
        };
        dp.measure(case, WARMUP, 0)?;
    }
    let chunks = calls.div_ceil(CHUNK);
    for rep in 0..REPETITIONS {
        let mut totals = vec![0u128; n];
        for round in 0..chunks {
            crate::harness::interrupted()?;
            for k in 0..n {
                let i = (k + round + rep) % n;
                let case = if i == cases.len() {
                    &mut floor
                } else {
                    &mut cases[i]
                };
                totals[i] += dp.measure(case, CHUNK_WARMUP, CHUNK)?;
            }
        }
        let timed = (chunks * CHUNK) as f64;
        for (i, case) in cases.iter_mut().enumerate() {
            case.means.push(totals[i] as f64 / timed);
        }
        floors.push(totals[n - 1] as f64 / timed);
        println!(
            "  per-packet: repetition {}/{REPETITIONS} done ({:.0?})",
            rep + 1,
            started.elapsed()
        );
    }

    // Profiles: where the time of a whole call (syscall included) goes,
    // per symbol, in ns per call. The new-flow profile inserts without
    // deleting (no delete syscalls in the profile): into the first
    // instance's table, which has room for all of them.
    let mut profiles = Vec::new();
    let mut fresh = Case::new_flows(NEW_FLOW, 9, VIP, false);
    let established = cases
        .iter()
        .position(|c| c.name == ESTABLISHED)
        .expect("case exists");
    let eviction = cases
        .iter()
        .position(|c| c.name == EVICTION)
        .expect("case exists");
    for job in 0..3 {
        let case = match job {
            0 => &mut fresh,
            1 => &mut cases[established],
            _ => &mut cases[eviction],
        };
        let name = case.name;
        let dp = &mut dp;
        let res = crate::profile::hottest(14, || {
            let t = std::time::Instant::now();
            dp.measure(case, 0, PROFILE_CALLS)?;
            Ok(t.elapsed().as_nanos() as f64 / PROFILE_CALLS as f64)
        });
        profiles.push(match res {
            Ok((wall, rows)) => format!(
                "- *{name}*: {wall:.0} ns of wall time per call while profiled (syscall included); \
                 hottest symbols, share of samples (≈ ns per call): {}",
                rows.iter()
                    .map(|(p, s)| format!("`{s}` {p:.1} % ({:.0})", p / 100.0 * wall))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => format!("- *{name}*: no profile ({e:#})"),
        });
    }

    let mut figures = vec![Figure::new(GROUP, PASS_FLOOR, "ns", floors.clone(), false)
        .note("run as one more case, interleaved with the others")];
    for c in &cases {
        if c.prog == Prog::MacSwap {
            // Raw, compared with the XDP_PASS floor by ratio: its cost above
            // that floor is a few ns, within the noise of a difference.
            let fig =
                Figure::new(GROUP, MAC_FLOOR, "ns", c.means.clone(), false).baseline(PASS_FLOOR);
            figures.insert(1, fig);
            continue;
        }
        let above: Vec<f64> = c.means.iter().zip(&floors).map(|(m, f)| m - f).collect();
        let mut fig = Figure::new(GROUP, c.name, "ns", above, false);
        if let Some(t) = c.target {
            let met = fig.median() <= t;
            fig = fig.target(&format!("<= {t} ns above XDP_PASS"), met);
        }
        if let Some(n) = &c.note {
            fig = fig.note(n.clone());
        }
        if let Some(b) = c.baseline {
            fig = fig.baseline(b);
        }
        figures.push(fig);
    }
    let replication = replication_section(&cases, &dp, ring_held)?;

    let mut problems = Vec::new();
    let (new, est, non) = (
        median_of(&figures, NEW_FLOW),
        median_of(&figures, ESTABLISHED),
        median_of(&figures, NON_SERVICE),
    );
    if !(new > est && est > non) {
        problems.push(format!(
            "per-packet ordering: expected new flow ({new:.1}) > established ({est:.1}) > \
                non-service ({non:.1})"
        ));
    }

    // Like with like: Katran's figures above its own XDP_PASS floor, as
    // xdplb's are reported.
    let source = "Katran's per-CPU-LRU path measured side by side with xdplb on a machine of \
        this type (katran_tester -perf_testing, the same method), above its XDP_PASS floor; \
        raw 558 / 151 / 87 ns (figures from issue 10, \"Failover that fails fewer requests than \
        HAProxy\")";
    let references = [
        ("Katran, new flow, above the floor", 507.0),
        ("Katran, established flow, above the floor", 100.0),
        ("Katran, packet for no service, above the floor", 36.0),
    ]
    .into_iter()
    .map(|(case, value)| Reference {
        case: case.into(),
        unit: "ns".into(),
        value,
        source: source.into(),
    })
    .collect();

    let d = |a: &str, b: &str| median_of(&figures, a) - median_of(&figures, b);
    let notes = vec![
        format!(
            "Setup: {calls} timed calls per case and repetition, on CPU {cpu}, in chunks of \
             {CHUNK}: a repetition runs every case and the floor round-robin, one chunk each, \
             until each has its calls, the order rotated every round; every chunk starts with \
             {CHUNK_WARMUP} untimed calls. The eviction case runs on a second, identical datapath \
             whose opening table (new TCP flows) was pre-filled with {prefilled} flows (this \
             CPU's share of its {MAX_OPENING_FLOWS} entries, plus some); every other case runs \
             on the first, whose table \
             holds only the flows the cases insert. Each case checks on every call that the \
             verdict is the expected one, and afterwards that the datapath counter of the path it \
             claims (flow_new, flow_hit, flow_repick, pass_not_service) rose once per call."
        ),
        format!(
            "Profiling evidence. Where the time goes (differences of medians above the floor): \
             established − no-service = {:.1} ns (flow look-up, backend look-up, MAC rewrite, \
             three per-CPU counters); new flow − established = {:.1} ns (Maglev slot read plus LRU \
             insert, instead of a hit); full-table insert − new flow = {:.1} ns (LRU eviction); \
             xdp_mac_swap costs {:.1} ns more than xdp_pass. Program sizes (static):\n\n- {}\n- \
             {}\n- {}\n\nSampling profiles (`perf record -e cpu-clock -t <the benchmark thread>` \
             over {PROFILE_CALLS} more calls of a case, after the measurements; no hardware PMU \
             here, so samples taken with interrupts disabled are charged to the point where they \
             are re-enabled, e.g. a spin-unlock; the JIT-compiled program is \
             `bpf_prog_<tag>_xdplb`):\n\n{}",
            d(ESTABLISHED, NON_SERVICE),
            d(NEW_FLOW, ESTABLISHED),
            d(EVICTION, NEW_FLOW),
            d(MAC_FLOOR, PASS_FLOOR),
            program_facts("xdplb", main_prog),
            program_facts("xdp_pass", pass),
            program_facts("xdp_mac_swap", mac),
            profiles.join("\n"),
        ),
    ];
    let per_packet = Section {
        group: GROUP.into(),
        figures,
        references,
        notes,
        problems,
    };
    Ok(vec![per_packet, replication])
}
