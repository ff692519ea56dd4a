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
//! To add a case (e.g. NAT forward/reverse): program what it needs in
//! `setup` and push one `Case` there.

use std::net::{SocketAddr, SocketAddrV4};

use anyhow::{bail, Context as _, Result};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use xdp_common::{Flow, FlowKey, Reason, BACKEND_DOWN, MAX_FLOWS, PROTO_TCP, PROTO_UDP};
use xdplb::{
    addr,
    dataplane::Maps,
    loader::load_passthrough,
    program::{MAC_SWAP_PROGRAM, PASS_PROGRAM},
};

use crate::{
    fixture::{backends_with_table, Loaded, XDP_PASS, XDP_TX},
    frames::{self, Sources},
    harness::{on_cpu, Figure, Opts, Reference, Section},
    report::median_of,
};

pub const GROUP: &str = "per-packet";

pub const DESCRIPTION: &str = "Cost of one packet through the XDP program, measured as Katran's \
`katran_tester -perf_testing` does: separate `BPF_PROG_TEST_RUN` calls with `repeat = 1` (1,000,000 \
per case and repetition), averaging the duration the kernel reports per call, on one pinned CPU. \
(With `repeat > 1` the kernel does not reset the frame between iterations, so a rewriting program \
would measure its own output.) Two floors are measured the same way in the same run: `xdp_pass` \
(returns XDP_PASS: the cost of the test-run machinery itself) and `xdp_mac_swap` (swaps MACs, \
returns XDP_TX: the least any forwarding program can do). Every xdplb case is reported as its mean \
**minus that repetition's XDP_PASS floor** (the mean of the floor measured at the start and end of \
the repetition); the floors are reported raw. Cases run round-robin, 5 repetitions, the order \
rotated every repetition. Frames are 64–86 bytes; maps are populated directly (no daemon); \
services use 65,537-slot Maglev tables built by `xdplb::maglev::build`.";

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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Prog {
    Pass,
    MacSwap,
    Lb,
}

enum Flows {
    /// The same frame every call.
    Same,
    /// A new client endpoint (IPv4 source address and port) every call.
    /// With `recycle`, calls run in batches of `BATCH`, and before each
    /// batch (untimed) the flows the previous batch inserted are deleted,
    /// so every insert finds a free entry; without it nothing is deleted
    /// and, the table being full, every insert evicts.
    New { sources: Sources, dst: SocketAddr, recycle: bool, inserted: Vec<FlowKey> },
}

/// Calls per batch of a recycling new-flow case.
const BATCH: usize = 10_000;

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
            note: None,
            means: Vec::new(),
        }
    }

    fn new_flows(name: &'static str, net: u8, dst: SocketAddr, recycle: bool) -> Self {
        let frame = frames::packet(CLIENT_MAC, LB_MAC, sa("10.0.0.1:1"), dst, PROTO_TCP);
        Self {
            flows: Flows::New { sources: Sources::new(net), dst, recycle, inserted: Vec::new() },
            ..Self::same(name, frame, XDP_TX, Reason::FlowNew)
        }
    }

    fn floor(name: &'static str, prog: Prog, verdict: u32) -> Self {
        let frame = frames::packet(CLIENT_MAC, LB_MAC, sa("10.0.0.1:40000"), sa("10.0.100.1:80"), PROTO_TCP);
        Self { prog, reason: None, ..Self::same(name, frame, verdict, Reason::Tx) }
    }

    fn target(mut self, ns: f64) -> Self {
        self.target = Some(ns);
        self
    }

    fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
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
const MAC_ABOVE: &str = "xdp_mac_swap, above xdp_pass";
const EVICTION: &str = "new flow into a full flow table (LRU eviction)";

/// Programs the services and backends, and returns the cases.
fn setup(lb: &mut Loaded) -> Result<Vec<Case>> {
    let v4 = sa("10.0.100.1:80");
    let big = sa("10.0.100.2:80");
    let repick = sa("10.0.100.3:80");
    // Three backends behind TCP and UDP services on an IPv4 VIP and a TCP
    // service on an IPv6 VIP; 1,000 behind another VIP.
    let table = backends_with_table(lb, 0, 3, 20, TABLE, LB_MAC, LO_IFINDEX)?;
    lb.service(v4, PROTO_TCP, 0, 0, &table)?;
    lb.service(sa("10.0.100.1:53"), PROTO_UDP, 1, 2 * TABLE, &table)?;
    lb.service(sa("[fd00:100::1]:80"), PROTO_TCP, 2, 4 * TABLE, &table)?;
    let table = backends_with_table(lb, 100, 1000, 21, TABLE, LB_MAC, LO_IFINDEX)?;
    lb.service(big, PROTO_TCP, 3, 6 * TABLE, &table)?;
    // A service whose table names a backend marked down: a flow pinned to
    // it is re-picked on every packet, onto the same backend (the frame is
    // still forwarded: the datapath trusts the table).
    lb.backend(50, "10.22.0.1".parse()?, [0x02, 0xbe, 0, 22, 0, 1], LB_MAC, LO_IFINDEX, BACKEND_DOWN)?;
    lb.service(repick, PROTO_TCP, 4, 8 * TABLE, &vec![50; TABLE as usize])?;

    let packet = |src: &str, dst: SocketAddr, proto| frames::packet(CLIENT_MAC, LB_MAC, sa(src), dst, proto);
    Ok(vec![
        Case::same(NON_SERVICE, packet("10.0.0.1:40000", sa("10.0.0.2:22"), PROTO_TCP), XDP_PASS, Reason::PassNotService)
            .target(25.0)
            .note("TCP to an address that is no VIP: parse, one service look-up (miss), one counter"),
        Case::same(ESTABLISHED, packet("10.0.0.1:40000", v4, PROTO_TCP), XDP_TX, Reason::FlowHit)
            .target(75.0)
            .note("the same TCP frame every call; its flow was pinned by the untimed warm-up"),
        Case::same("established UDP flow", packet("10.0.0.1:40000", sa("10.0.100.1:53"), PROTO_UDP), XDP_TX, Reason::FlowHit),
        Case::same("established IPv6 TCP flow", packet("[fd00::1]:40000", sa("[fd00:100::1]:80"), PROTO_TCP), XDP_TX, Reason::FlowHit),
        Case::new_flows(NEW_FLOW, 1, v4, true).target(180.0).note(
            "a different client (source address and port) every call, so no call reuses a flow. \
             Calls run in batches of 10,000; before each batch (untimed, no syscall between timed \
             calls) the previous batch's flows are deleted, so every insert finds a free entry \
             (no eviction)",
        ),
        Case::new_flows("new flow, 1,000-backend service", 2, big, true)
            .note("as the new-flow case, against a service of 1,000 backends (65,537-slot table)"),
        Case::new_flows(EVICTION, 3, v4, false).note(
            "a different client every call and nothing deleted; the flow table was pre-filled so \
             this CPU's LRU list is full: every insert evicts (the steady state of a busy balancer)",
        ),
        Case::same("re-pick path (proxy for new flows in pps)", packet("10.0.0.9:40000", repick, PROTO_TCP), XDP_TX, Reason::FlowRepick)
            .note("a flow pinned to a backend that is down: flow hit, Maglev pick, flow re-insert on every packet; the pps benchmark's new-flow proxy, measured here to compare with the real new-flow case"),
        // NAT forward / reverse cases go here once NAT exists.
        Case::floor(MAC_ABOVE, Prog::MacSwap, XDP_TX),
    ])
}

/// Fills this CPU's share of the flow table so LRU inserts evict.
fn prefill_flows(maps: &mut Maps) -> Result<u64> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)? as u64;
    let n = u64::from(MAX_FLOWS) / cpus.max(1) + 1024;
    let dst = sa("10.0.100.1:80");
    let mut sources = Sources::new(200);
    for _ in 0..n {
        let src = SocketAddr::V4(sources.next().expect("endless"));
        let key = addr::flow_key(src, dst, PROTO_TCP);
        maps.flows.insert(key, Flow { backend: 0, ..Default::default() }, 0)?;
    }
    Ok(n)
}

/// Mean kernel-reported ns per call over `calls` timed calls, after
/// `warmup` untimed ones.
fn measure(prog: &Xdp, maps: &mut Maps, case: &mut Case, warmup: usize, calls: usize) -> Result<f64> {
    let before = case.reason.map(|r| maps.reason_count(r)).transpose()?;
    let mut total: u128 = 0;
    for i in 0..warmup + calls {
        if let Flows::New { recycle: true, inserted, .. } = &mut case.flows {
            if inserted.len() >= BATCH {
                for key in inserted.drain(..) {
                    // Already evicted is fine: the point is a free entry.
                    let _ = maps.flows.remove(&key);
                }
            }
        }
        if let Flows::New { sources, dst, inserted, .. } = &mut case.flows {
            let src: SocketAddrV4 = sources.next().expect("endless");
            frames::set_ipv4_source(&mut case.frame, src);
            inserted.push(addr::flow_key(SocketAddr::V4(src), *dst, PROTO_TCP));
        }
        let opts = TestRunOptions { data_in: Some(&case.frame), repeat: 1, ..Default::default() };
        let res = prog.test_run(opts).with_context(|| format!("BPF_PROG_TEST_RUN ({})", case.name))?;
        if res.return_value != case.verdict {
            bail!("{}: verdict {} instead of {}", case.name, res.return_value, case.verdict);
        }
        if i >= warmup {
            total += res.duration.as_nanos();
        }
    }
    if let Flows::New { recycle: false, inserted, .. } = &mut case.flows {
        inserted.clear();
    }
    if let (Some(reason), Some(before)) = (case.reason, before) {
        let delta = maps.reason_count(reason)? - before;
        // The warm-up's first call may pin an established flow anew.
        if delta + 1 < (warmup + calls) as u64 {
            bail!("{}: counter {} rose by {delta} over {} calls: not the path measured", case.name, reason.name(), warmup + calls);
        }
    }
    Ok(total as f64 / calls as f64)
}

/// The untimed calls before a case's timed ones: enough to warm caches and
/// pin an established flow, and for a recycling new-flow case one whole
/// batch, whose flows are deleted before the timed calls start.
fn warmup(case: &Case) -> usize {
    match case.flows {
        Flows::New { recycle: true, .. } => BATCH,
        _ => WARMUP,
    }
}

/// Static facts of a loaded program: instruction count and JIT size.
fn program_facts(name: &str, prog: &Xdp) -> String {
    let info = match prog.info() {
        Ok(i) => i,
        Err(e) => return format!("{name}: no program info ({e})"),
    };
    let id = info.id();
    let dump = crate::harness::run("bpftool", &["prog", "dump", "xlated", "id", &id.to_string()]);
    let lines = match &dump {
        Ok(text) => {
            let insns = text.lines().filter(|l| l.trim_start().split(':').next().is_some_and(|n| n.parse::<u32>().is_ok())).count();
            format!("{} lines of `bpftool prog dump xlated id {id}` ({insns} instructions, the rest source-line comments)", text.lines().count())
        }
        Err(e) => format!("bpftool failed: {e:#}"),
    };
    format!(
        "`{name}`: {lines}; {} bytes translated, {} bytes JIT-compiled, {} instructions processed by the verifier",
        info.size_translated().map_or("?".into(), |s| s.to_string()),
        info.size_jitted(),
        info.verified_instruction_count().map_or("?".into(), |s| s.to_string()),
    )
}

pub fn run(opts: &Opts) -> Result<Section> {
    let calls = if opts.quick { 20_000 } else { 1_000_000 };
    // The second CPU if there is one: CPU 0 takes more interrupts.
    let cpu = if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 { 1 } else { 0 };
    on_cpu(cpu, || measure_all(calls, cpu))
}

fn measure_all(calls: usize, cpu: usize) -> Result<Section> {
    let mut lb = Loaded::new("pp")?;
    let mut cases = setup(&mut lb)?;
    let (pass_ebpf, pass_name) = load_passthrough(PASS_PROGRAM)?;
    let (mac_ebpf, mac_name) = load_passthrough(MAC_SWAP_PROGRAM)?;
    let pass: &Xdp = pass_ebpf.program(&pass_name).context("xdp_pass")?.try_into()?;
    let mac: &Xdp = mac_ebpf.program(&mac_name).context("xdp_mac_swap")?.try_into()?;
    let (lb_prog, maps) = lb.parts();
    let prefilled = prefill_flows(maps)?;

    let mut floor = Case::floor(PASS_FLOOR, Prog::Pass, XDP_PASS);
    let mut floors = Vec::new();
    let started = std::time::Instant::now();
    for rep in 0..REPETITIONS {
        let mut order: Vec<usize> = (0..cases.len()).collect();
        order.rotate_left(rep % cases.len());
        let start = measure(pass, maps, &mut floor, WARMUP, calls)?;
        for &i in &order {
            let case = &mut cases[i];
            let prog = match case.prog {
                Prog::Pass => pass,
                Prog::MacSwap => mac,
                Prog::Lb => lb_prog,
            };
            let mean = measure(prog, maps, case, warmup(case), calls)?;
            case.means.push(mean);
        }
        let end = measure(pass, maps, &mut floor, WARMUP, calls)?;
        floors.push((start + end) / 2.0);
        println!("  per-packet: repetition {}/{REPETITIONS} done ({:.0?})", rep + 1, started.elapsed());
    }

    // Profiles of the new-flow and established cases: where the time of a
    // whole call (syscall included) goes, per symbol, in ns per call.
    let profile_calls = if calls < 1_000_000 { 100_000 } else { 2_000_000 };
    let mut profiles = Vec::new();
    for name in [NEW_FLOW, ESTABLISHED, EVICTION] {
        let case = cases.iter_mut().find(|c| c.name == name).expect("case exists");
        let w = warmup(case);
        let res = crate::profile::hottest(cpu, 14, || {
            let t = std::time::Instant::now();
            measure(lb_prog, maps, case, w, profile_calls)?;
            Ok(t.elapsed().as_nanos() as f64 / (w + profile_calls) as f64)
        });
        profiles.push(match res {
            Ok((wall, rows)) => format!(
                "- *{name}*: {wall:.0} ns of wall time per call (syscall included); top symbols, as ns per call: {}",
                rows.iter().map(|(p, s)| format!("`{s}` {:.0}", p / 100.0 * wall)).collect::<Vec<_>>().join(", ")
            ),
            Err(e) => format!("- *{name}*: no profile ({e:#})"),
        });
    }

    let mut figures = vec![
        Figure::new(GROUP, PASS_FLOOR, "ns", floors.clone(), false).note("mean of the floor measured at the start and at the end of each repetition"),
    ];
    let mut mac_raw = None;
    for c in &cases {
        let above: Vec<f64> = c.means.iter().zip(&floors).map(|(m, f)| m - f).collect();
        let mut fig = Figure::new(GROUP, c.name, "ns", above, false);
        if let Some(t) = c.target {
            let met = fig.median() <= t;
            fig = fig.target(&format!("<= {t} ns above XDP_PASS"), met);
        }
        if let Some(n) = &c.note {
            fig = fig.note(n.clone());
        }
        if c.prog == Prog::MacSwap {
            mac_raw = Some(c.means.clone());
        }
        figures.push(fig);
    }
    if let Some(raw) = mac_raw {
        figures.insert(1, Figure::new(GROUP, MAC_FLOOR, "ns", raw, false));
    }

    let mut problems = Vec::new();
    let (new, est, non) = (median_of(&figures, NEW_FLOW), median_of(&figures, ESTABLISHED), median_of(&figures, NON_SERVICE));
    if !(new > est && est > non) {
        problems.push(format!("per-packet ordering: expected new flow ({new:.1}) > established ({est:.1}) > non-service ({non:.1})"));
    }

    let source = "the issue's measurements of Katran (katran_tester -perf_testing, same method) on a machine of this type";
    let references = [("Katran, new flow", 365.0), ("Katran, established flow", 150.0), ("Katran, packet for no service", 57.0)]
        .into_iter()
        .map(|(case, value)| Reference { case: case.into(), unit: "ns".into(), value, source: source.into() })
        .collect();

    let d = |a: &str, b: &str| median_of(&figures, a) - median_of(&figures, b);
    let notes = vec![
        format!(
            "Setup: {calls} timed calls per case and repetition after {WARMUP} untimed ones, on CPU {cpu}. \
             The flow table was pre-filled with {prefilled} flows (this CPU's share of its {MAX_FLOWS} entries, \
             plus some) so the eviction case evicts; the other cases run against that table. Each case \
             checks on every call that the verdict is the expected one, and afterwards that the datapath \
             counter of the path it claims (flow_new, flow_hit, flow_repick, pass_not_service) rose once per call."
        ),
        format!(
            "Profiling evidence. Where the time goes (differences of medians above the floor): \
             established − no-service = {:.1} ns (flow look-up, backend look-up, MAC rewrite, three per-CPU counters); \
             new flow − established = {:.1} ns (Maglev slot read plus LRU insert, instead of a hit); \
             full-table insert − new flow = {:.1} ns (LRU eviction); xdp_mac_swap costs {:.1} ns above xdp_pass. \
             Program sizes (static):\n\n- {}\n- {}\n- {}\n\nSampling profiles (`perf record -e cpu-clock -C {cpu}` \
             over {profile_calls} more calls of a case; no hardware PMU here, so samples taken with interrupts \
             disabled are charged to the point where they are re-enabled, e.g. a spin-unlock; the JIT-compiled \
             program is `bpf_prog_<tag>_xdplb`):\n\n{}",
            d(ESTABLISHED, NON_SERVICE),
            d(NEW_FLOW, ESTABLISHED),
            d(EVICTION, NEW_FLOW),
            median_of(&figures, MAC_ABOVE),
            program_facts("xdplb", lb_prog),
            program_facts("xdp_pass", pass),
            program_facts("xdp_mac_swap", mac),
            profiles.join("\n"),
        ),
    ];
    Ok(Section { group: GROUP.into(), figures, references, notes, problems })
}
