//! NAT mode end to end, in veth namespaces (`xdplb_tests::topology`):
//! plain backends (no VIP, default route to their gateway) serving HTTP on
//! 8080 and UDP on 5353 behind VIP:80 and VIP:53, the real daemon attached
//! to the lb's interfaces in native XDP mode, real TCP and UDP from the
//! client. Two-arm (client and backends on two segments, XDP_REDIRECT
//! between them) and one-arm (one segment, XDP_TX) testbeds; a testbed with
//! a narrow link behind the lb for path MTU discovery through translated
//! ICMP errors; failover under load. Needs root.
//!
//! The tests take turns (a lock): they share two CPUs, and the throughput
//! figures they print (run with `--nocapture` to see them) would mean
//! nothing with another test's traffic in the same cores.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use xdp_common::Reason;
use xdplb::dataplane::Maps;
use xdplb_tests::{
    assert_within,
    bed::served,
    bin_path,
    lb::{
        failed_between, failures, nat_config, served_after, start_backend, Load, Tally, Xdplb,
        BACKEND_PORT,
    },
    netns::exec_line,
    proc::Proc,
    topology::{Shape, Topology},
    traffic::{download, pattern_sha256, peer, requests, udp_queries, upload, Transfer},
    RemoveOnDrop, SCHEDULING_MARGIN,
};

const TESTBACKEND: &str = env!("CARGO_BIN_EXE_xdplb-testbackend");
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Per-read/write timeout of a bulk transfer: a stalled transfer fails
/// after this long without progress.
const STALL: Duration = Duration::from_secs(20);

static TURN: Mutex<()> = Mutex::new(());

/// [`download`] or [`upload`].
type Transferring = fn(SocketAddr, u64, Duration) -> anyhow::Result<Transfer>;

fn take_turn() -> MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// A testbed with backends serving, and (once started) the daemon.
/// Fields drop in order: daemon, backends, topology.
struct Bed {
    lb: Option<Xdplb>,
    backends: Vec<Proc>,
    topo: Topology,
    xdplb: PathBuf,
}

impl Bed {
    fn new(shape: Shape, tag: &str, backends: usize) -> Bed {
        let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
        let (topo, backends) = served(shape, tag, backends, &xdplb, Path::new(TESTBACKEND));
        Bed {
            lb: None,
            backends,
            topo,
            xdplb,
        }
    }

    fn start_lb(&mut self, health_check: &str) {
        let config = nat_config(&self.topo, health_check);
        self.lb = Some(Xdplb::start(&self.xdplb, &self.topo, &config).expect("starting xdplb"));
    }

    fn lb(&self) -> &Xdplb {
        self.lb.as_ref().expect("daemon started")
    }

    fn reason(&self, r: Reason) -> u64 {
        Maps::open_pinned(&self.lb().pin_dir)
            .unwrap()
            .reason_count(r)
            .unwrap()
    }

    fn vip(&self, v6: bool, port: u16) -> SocketAddr {
        SocketAddr::new(self.topo.vip(v6), port)
    }

    /// `download` or `upload` of `n` bytes over `addr`, from the client;
    /// a failure panics with the daemon's counters.
    fn transfer(&self, how: Transferring, addr: SocketAddr, n: u64) -> Transfer {
        self.topo
            .client()
            .run(|| how(addr, n, STALL))
            .unwrap_or_else(|e| {
                panic!(
                    "{e:#}\n{}",
                    self.lb.as_ref().map(Xdplb::stats_text).unwrap_or_default()
                )
            })
    }
}

fn family(v6: bool) -> &'static str {
    if v6 {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// The path of the transfers through the load balancer.
const VIA_LB: &str = "client -> VIP:80 -> xdplb NAT -> :8080";

/// A measured transfer in both directions over one path.
struct Row {
    path: String,
    down: Transfer,
    up: Transfer,
}

fn print_rows(title: &str, rows: &[Row]) {
    let mut text = format!("\n{title}\n");
    for r in rows {
        text += &format!(
            "  {:<44} download {:>7.1} MiB/s ({:>5.2} s, {})   \
             upload {:>7.1} MiB/s ({:>5.2} s, {})\n",
            r.path,
            r.down.mib_per_s(),
            r.down.elapsed.as_secs_f64(),
            r.down.backend,
            r.up.mib_per_s(),
            r.up.elapsed.as_secs_f64(),
            r.up.backend
        );
    }
    eprintln!("{text}");
}

/// [`both_ways`] over IPv4 and IPv6: `addr(v6)`, `path` naming the route
/// after the family.
fn both_families(bed: &Bed, n: u64, addr: impl Fn(bool) -> SocketAddr, path: &str) -> Vec<Row> {
    let row = |v6| both_ways(bed, addr(v6), n, format!("{} {path}", family(v6)));
    [false, true].map(row).into()
}

/// Downloads and uploads `n` bytes over `addr`; both must arrive intact.
fn both_ways(bed: &Bed, addr: SocketAddr, n: u64, path: String) -> Row {
    let want = pattern_sha256(n).unwrap();
    let down = bed.transfer(download, addr, n);
    assert_eq!(
        down.sha256, want,
        "{path}: downloaded {n} bytes differ (SHA-256)"
    );
    let up = bed.transfer(upload, addr, n);
    assert_eq!(
        up.sha256, want,
        "{path}: the backend received different bytes than were uploaded (SHA-256)"
    );
    Row { path, down, up }
}

/// HTTP, UDP and the backends' view of the client, through both VIPs.
fn check_services(bed: &Bed) {
    let topo = &bed.topo;
    let n = topo.backend_count();
    for v6 in [false, true] {
        let fam = family(v6);
        let base = if v6 { 31000 } else { 30000 };
        let tally = requests(topo.client(), bed.vip(v6, 80), base..base + 150);
        assert!(
            tally.failed.is_empty(),
            "{fam}: failed HTTP requests through the VIP: {:?}\n{}",
            tally.failed,
            bed.lb().stats_text()
        );
        assert_eq!(tally.ok(), 150);
        assert_shares(&tally, n, 150, &format!("{fam} HTTP"));

        // The backend sees the SNAT address and a port of the range.
        let (_, seen) = peer(topo.client(), bed.vip(v6, 80)).unwrap();
        assert_eq!(
            seen.ip(),
            topo.snat_addr(v6),
            "{fam}: the backend sees the connection come from the SNAT address"
        );
        assert!(
            (20000..=59999).contains(&seen.port()),
            "{fam}: SNAT port {} outside 20000-59999",
            seen.port()
        );

        let udp = udp_queries(topo.client(), bed.vip(v6, 53), base + 500..base + 560);
        assert!(
            udp.failed.is_empty(),
            "{fam}: failed UDP queries through the VIP: {:?}\n{}",
            udp.failed,
            bed.lb().stats_text()
        );
        assert_eq!(
            udp.served.len(),
            n,
            "{fam}: every backend answers UDP: {:?}",
            udp.served
        );
    }
}

fn assert_shares(tally: &Tally, backends: usize, total: usize, what: &str) {
    for i in 1..=backends {
        let got = tally.count(&format!("b{i}"));
        let share = got as f64 / total as f64;
        let even = 1.0 / backends as f64;
        assert!(
            share > even * 0.6 && share < even * 1.4,
            "{what}: b{i} served {got}/{total}: {:?}",
            tally.served
        );
    }
}

fn assert_counters_sane(bed: &Bed) {
    let maps = Maps::open_pinned(&bed.lb().pin_dir).unwrap();
    let counts: Vec<(Reason, u64)> = maps.reason_counts().unwrap();
    let get = |r: Reason| counts.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n);
    let text = counts
        .iter()
        .map(|(r, n)| format!("{}={n}", r.name()))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(get(Reason::NatNew) >= 2 * 150 + 2 * 60, "nat_new: {text}");
    assert!(get(Reason::NatReply) > 0, "nat_reply: {text}");
    for r in [
        Reason::DropNatFull,
        Reason::DropRedirect,
        Reason::PassNoNeigh,
        Reason::DropNoBackend,
    ] {
        assert_eq!(get(r), 0, "{}: {text}", r.name());
    }
}

#[test]
fn two_arm_nat_serves_http_udp_and_gigabytes_both_ways() {
    let _turn = take_turn();
    let mut bed = Bed::new(Shape::NatTwoArm, "n2a", 3);

    // Baseline: the same transfers from the client straight to b1, routed
    // by the lb's kernel (IP forwarding on for this only; no XDP program on
    // the lb's interfaces; the pass-through programs on their peers and the
    // checksum settings as in the measurement through the load balancer).
    bed.topo.set_lb_forwarding(true).unwrap();
    let to_b1 = |v6| SocketAddr::new(bed.topo.backend_addr(1, v6), BACKEND_PORT);
    let baseline = both_families(&bed, GIB, to_b1, "client -> b1, lb kernel forwarding");
    bed.topo.set_lb_forwarding(false).unwrap();
    print_rows(
        "Baseline, two-arm testbed without the load balancer, 1 GiB each way, SHA-256 checked:",
        &baseline,
    );

    bed.start_lb("");
    check_services(&bed);
    let mut rows = both_families(&bed, GIB, |v6| bed.vip(v6, 80), VIA_LB);
    rows.extend(baseline);
    print_rows(
        "NAT, two-arm (XDP_REDIRECT eth0 <-> eth1), 1 GiB each way, SHA-256 checked, \
         and the baseline:",
        &rows,
    );

    assert_counters_sane(&bed);
    let redirects = bed.reason(Reason::Redirect);
    assert!(
        redirects > 2 * (GIB / 1500),
        "the GiB transfers went through XDP_REDIRECT: redirect={redirects}"
    );
    assert_eq!(
        bed.reason(Reason::Tx),
        0,
        "two-arm: nothing goes back out of the interface it came in on"
    );
}

#[test]
fn one_arm_nat_serves_http_udp_and_bulk_transfers_both_ways() {
    let _turn = take_turn();
    let mut bed = Bed::new(Shape::NatOneArm, "n1a", 3);
    // Baseline: the client straight to b1 on the shared segment.
    let to_b1 = |v6| SocketAddr::new(bed.topo.backend_addr(1, v6), BACKEND_PORT);
    let baseline = both_families(
        &bed,
        64 * MIB,
        to_b1,
        "client -> b1 directly (same segment)",
    );
    bed.start_lb("");
    check_services(&bed);
    let mut rows = both_families(&bed, 64 * MIB, |v6| bed.vip(v6, 80), VIA_LB);
    rows.extend(baseline);
    print_rows(
        "NAT, one-arm (XDP_TX), 64 MiB each way, SHA-256 checked:",
        &rows,
    );

    assert_counters_sane(&bed);
    assert!(
        bed.reason(Reason::Tx) > 4 * (64 * MIB / 1500),
        "one-arm: XDP_TX both ways"
    );
    assert_eq!(bed.reason(Reason::Redirect), 0, "one-arm: no redirect");
}

#[test]
fn path_mtu_discovery_works_through_translated_icmp_errors() {
    let _turn = take_turn();
    let mut bed = Bed::new(Shape::Pmtu, "nmtu", 2);
    bed.start_lb("");
    let n = 16 * MIB;
    let want = pattern_sha256(n).unwrap();
    let mut icmp_before = bed.reason(Reason::NatIcmp);
    assert_eq!(icmp_before, 0);
    let mut rows = Vec::new();
    for v6 in [false, true] {
        let fam = family(v6);
        let vip = bed.vip(v6, 80);
        let first = requests(bed.topo.client(), vip, 45000..45001);
        assert!(
            first.failed.is_empty(),
            "{fam}: the VIP does not answer at all: {:?}\n{}",
            first.failed,
            bed.lb().stats_text()
        );
        // Client -> backend: full-sized segments meet the 1400-byte link
        // at r1, which tells the SNAT address; the lb must pass it on.
        let up = bed.transfer(upload, vip, n);
        assert_eq!(
            up.sha256, want,
            "{fam}: upload through the narrow link arrived changed"
        );
        let icmp = bed.reason(Reason::NatIcmp);
        assert!(
            icmp > icmp_before,
            "{fam}: no ICMP error was translated (nat_icmp {icmp_before} -> {icmp}), \
             yet the upload completed: did the path MTU really shrink?\n{}",
            bed.lb().stats_text()
        );
        icmp_before = icmp;
        let route = exec_line(bed.topo.client(), &format!("ip route get {}", vip.ip()));
        assert!(
            route.contains("mtu 1400"),
            "{fam}: the client learned the path MTU to the VIP: {route}"
        );
        // Backend -> client: the backend learns its path MTU from r2 itself.
        let down = bed.transfer(download, vip, n);
        assert_eq!(
            down.sha256, want,
            "{fam}: download through the narrow link arrived changed"
        );
        rows.push(Row {
            path: format!("{fam} VIP:80 through a 1400-byte link"),
            down,
            up,
        });
    }
    print_rows("NAT, path MTU 1400 behind the lb, 16 MiB each way:", &rows);
}

#[test]
fn failover_in_nat_mode_under_load() {
    let _turn = take_turn();
    let interval = Duration::from_millis(200);
    let (rise, fall) = (2, 3);
    let mut bed = Bed::new(Shape::NatTwoArm, "nfo", 3);
    bed.start_lb(&format!(
        "type = \"tcp\"\ninterval = \"{}ms\"\ntimeout = \"100ms\"\nrise = {rise}\nfall = {fall}\n",
        interval.as_millis()
    ));
    let vip = bed.vip(false, 80);
    let first = requests(bed.topo.client(), vip, 45000..45003);
    assert!(
        first.failed.is_empty(),
        "the VIP does not answer before the test starts: {:?}\n{}",
        first.failed,
        bed.lb().stats_text()
    );
    let b1: IpAddr = bed.topo.backend_addr(1, false);
    assert_eq!(bed.lb().backend("web4", b1).unwrap()["health"], "up");
    let load = Load::start_in(bed.topo.client(), vip, Duration::from_millis(5), 20000).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // Kill b1's server: its host stays up and answers SYNs with RST.
    let killed = Instant::now();
    bed.backends[0].kill(libc::SIGKILL).unwrap();
    // A give-up limit, far above bound + margin (asserted below).
    let down = bed
        .lb()
        .wait_health("web4", b1, "down", killed, Duration::from_secs(3));
    assert_within(
        "NAT failover: detection",
        down - killed,
        interval * fall + interval,
    );

    std::thread::sleep(Duration::from_secs(1));
    let samples = load.stop();
    // A request still in flight at the kill dies with its server: only
    // those that started well before it must have succeeded.
    let before = failed_between(
        &samples,
        samples[0].start,
        killed - Duration::from_millis(50),
    );
    let after = failed_between(&samples, down, Instant::now());
    eprintln!(
        "NAT failover: {} requests, {} failed between the kill and the swap, {} after",
        samples.len(),
        failed_between(&samples, killed, down).len(),
        after.len()
    );
    assert!(
        before.is_empty(),
        "failures of requests started before the kill: {before:?}"
    );
    assert!(
        after.is_empty(),
        "new connections failed after the swap: {after:?}\n{}",
        bed.lb().stats_text()
    );
    let served_after = served_after(&samples, down);
    assert!(
        served_after.len() > 50,
        "load went on after the swap: {}",
        served_after.len()
    );
    assert!(
        !served_after.contains(&"b1"),
        "nothing reaches the dead backend after the swap"
    );

    // b1 comes back and takes new connections again.
    bed.backends[0] = start_backend(&bed.topo, Path::new(TESTBACKEND), 1, &[]).unwrap();
    // rise checks, one interval for the first to come round, one spare,
    // plus the stated margin for a loaded machine.
    let limit = interval * (rise + 2) + SCHEDULING_MARGIN;
    bed.lb()
        .wait_health("web4", b1, "up", Instant::now(), limit);
    let tally = requests(bed.topo.client(), vip, 40000..40150);
    assert!(tally.failed.is_empty(), "{:?}", tally.failed);
    assert!(
        tally.count("b1") > 20,
        "b1 gets new connections again: {:?}",
        tally.served
    );
}

/// The `[service.nat]` table as the design documents it (defaults spelled
/// out, no snat_address) is a valid configuration.
#[test]
fn the_documented_nat_settings_are_accepted() {
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let path = std::env::temp_dir().join(format!("xdplb-natcheck-{}.toml", std::process::id()));
    let _cleanup = RemoveOnDrop(path.clone());
    std::fs::write(
        &path,
        "[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n\
         mode = \"nat\"\n\n\
         [service.nat]\nports = \"20000-59999\"\ntcp_timeout = \"1h\"\n\
         tcp_closing_timeout = \"10s\"\nudp_timeout = \"60s\"\n\n\
         [[service.backend]]\naddress = \"10.0.1.11\"\nport = 8080\n",
    )
    .unwrap();
    let out = std::process::Command::new(&xdplb)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xdplb check refused the documented NAT settings: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A backend whose server is killed (its host up, so it answers SYNs with
/// RST) before any health check notices: with `retry_refused` (the
/// default) each refused connection is moved to another backend and
/// succeeds about a second later (the client's SYN retransmission); with
/// it off, the connections hashed to the dead backend fail.
#[test]
fn connections_refused_by_a_killed_backend_succeed_on_another() {
    let _turn = take_turn();
    let mut bed = Bed::new(Shape::NatOneArm, "nrt", 3);
    // No health checks: the datapath alone must save these connections.
    bed.start_lb("type = \"none\"\n");
    let vip = bed.vip(false, 80);
    let warm = requests(bed.topo.client(), vip, 45000..45003);
    assert!(warm.failed.is_empty(), "{:?}", warm.failed);
    // Reaped before the first connection: a server still dying completes
    // handshakes, then resets them, and no balancer can retry those.
    bed.backends[0].crash().unwrap();

    let reasons = |bed: &Bed| bed.lb().json(&["stats"]).unwrap()["reasons"].clone();
    let started = Instant::now();
    let tally = requests(bed.topo.client(), vip, 46000..46060);
    let retried = reasons(&bed)["nat_retry"].as_u64().unwrap();
    eprintln!(
        "retry on: 60 connections in {:?}, {} failed, served {:?}, nat_retry {retried}",
        started.elapsed(),
        tally.failed.len(),
        tally.served
    );
    assert!(tally.failed.is_empty(), "{:?}", tally.failed);
    assert!(!tally.served.contains_key("b1"), "{:?}", tally.served);
    assert!(retried > 0, "some connections were hashed to the dead b1");

    // The same with the setting off: the refusals reach the clients.
    let config = std::fs::read_to_string(bed.lb().config_path()).unwrap();
    let off = config.replace(
        "udp_timeout = \"60s\"\n",
        "udp_timeout = \"60s\"\nretry_refused = false\n",
    );
    assert_ne!(off, config);
    bed.lb().write_config(&off).unwrap();
    bed.lb().cli(&["reload"]).unwrap();
    let tally = requests(bed.topo.client(), vip, 47000..47060);
    eprintln!(
        "retry off: {} of 60 connections failed, served {:?}",
        tally.failed.len(),
        tally.served
    );
    assert!(
        !tally.failed.is_empty(),
        "connections hashed to b1 fail without retry"
    );
    assert_eq!(reasons(&bed)["nat_retry"].as_u64().unwrap(), retried);
}

/// Connection churn through a two-arm NAT service with a pool of two SNAT
/// addresses: new connections (one request each, the server closing) as
/// fast as one client thread makes them for 3 s, then paced at that rate
/// for 60 s. The port range is sized from the rate, so that about a third
/// of the (address, port) pairs are held at the steady state (every closed
/// flow keeps its port for `tcp_closing_timeout`, 10 s): random tries alone
/// would then miss a free one about once in 3^8 new flows, and the scan
/// must find it. Pacing keeps the run from outgrowing the range: unpaced,
/// a run once went 1.6x faster than its warm-up and really filled it. No
/// SYN may be refused while pairs remain, no request may fail, and both
/// addresses carry flows.
#[test]
fn connection_churn_is_never_refused_a_port_while_ports_remain() {
    const CLOSING_S: f64 = 10.0;
    const RUN: Duration = Duration::from_secs(60);
    let _turn = take_turn();
    let mut bed = Bed::new(Shape::NatTwoArm, "nch", 3);
    bed.start_lb("type = \"none\"\n");
    let vip = bed.vip(false, 80);
    let warm = Load::start_in(bed.topo.client(), vip, Duration::ZERO, 10000).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let warm = warm.stop();
    assert!(warm.iter().all(|s| s.result.is_ok()), "warm-up failed");
    let rate = warm.len() as f64 / 3.0;
    // A second SNAT address on the lb's backend side.
    let snat = bed.topo.snat_addr(false);
    let IpAddr::V4(first) = snat else {
        unreachable!("IPv4")
    };
    let second = IpAddr::from([first.octets()[0], first.octets()[1], first.octets()[2], 250]);
    let shown = exec_line(bed.topo.lb(), &format!("ip -o addr show to {snat}"));
    let iface = shown.split_whitespace().nth(1).unwrap();
    let add = format!("ip addr add {second}/32 dev {iface}");
    exec_line(bed.topo.lb(), &add);
    // Ports per backend and address for a third of the pairs held: rate x
    // closing timeout flows held, spread over 3 backends and 2 addresses.
    let ports = ((rate * CLOSING_S * 3.0 / 6.0) as u32).clamp(1000, 63000);
    let config = std::fs::read_to_string(bed.lb().config_path()).unwrap();
    let range = format!("ports = \"2000-{}\"", 2000 + ports - 1);
    let pool = format!("snat_addresses = [\"{snat}\", \"{second}\"]\n{range}");
    let sized = config.replacen("ports = \"20000-59999\"", &pool, 1);
    assert_ne!(sized, config);
    bed.lb().write_config(&sized).unwrap();
    bed.lb().cli(&["reload"]).unwrap();
    let refused_before = bed.reason(Reason::DropNatFull);

    let every = Duration::from_secs_f64(1.0 / rate);
    let load = Load::start_in(bed.topo.client(), vip, every, 10000).unwrap();
    let started = Instant::now();
    let mut peak = 0;
    while started.elapsed() < RUN {
        std::thread::sleep(Duration::from_secs(2));
        let stats = bed.lb().json(&["stats"]).unwrap();
        peak = peak.max(stats["nat"]["reverse"].as_u64().unwrap_or(0));
    }
    let samples = load.stop();
    let failed = failures(&samples);
    let refused = bed.reason(Reason::DropNatFull) - refused_before;
    let capacity = 2 * 3 * u64::from(ports);
    // Both addresses carry flows (their reply entries name them).
    let maps = Maps::open_pinned(&bed.lb().pin_dir).unwrap();
    let on = |a: IpAddr| {
        let words = xdplb::addr::to_words(a);
        maps.nat_rev
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.dst == words)
            .count()
    };
    let (on_first, on_second) = (on(snat), on(second));
    eprintln!(
        "churn: {} connections in {:?} ({:.0}/s; warm-up {rate:.0}/s), {} failed, \
         drop_nat_full {refused}; {range} x 2 addresses x 3 backends: peak {peak} of \
         {capacity} in use ({on_first} and {on_second} reply entries on the two addresses) \
         ({:.0} %)",
        samples.len(),
        RUN,
        samples.len() as f64 / RUN.as_secs_f64(),
        failed.len(),
        100.0 * peak as f64 / capacity as f64
    );
    assert!(
        peak < capacity,
        "the range was really full: the test measures nothing"
    );
    assert!(on_first > 0 && on_second > 0, "both SNAT addresses in use");
    assert_eq!(refused, 0, "SYNs refused a port while ports remained");
    assert!(
        failed.is_empty(),
        "failed: {:?}",
        &failed[..failed.len().min(5)]
    );
}

/// A backend's host vanishes (its link is cut: no RST, nothing answers)
/// while it is still in the table (no health checks here): every new
/// connection hashed to it has its retransmitted SYN moved to another
/// backend and succeeds, a second late; concurrent ones too.
#[test]
fn connections_to_a_vanished_host_succeed_on_another() {
    let _turn = take_turn();
    let mut bed = Bed::new(Shape::NatOneArm, "nhl", 3);
    bed.start_lb("type = \"none\"\n");
    let vip = bed.vip(false, 80);
    let every = Duration::from_millis(30);
    let loads: Vec<Load> = (0..6u16)
        .map(|k| Load::start_in(bed.topo.client(), vip, every, 20000 + k * 1000).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let cut = Instant::now();
    bed.topo.set_backend_link(1, false).unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    let samples: Vec<_> = loads.into_iter().flat_map(Load::stop).collect();
    let retried = bed.reason(Reason::NatRetry);
    let (during, after): (Vec<_>, Vec<_>) =
        failures(&samples).into_iter().partition(|s| s.start < cut);
    eprintln!(
        "NAT host loss: {} requests, nat_retry {retried}, failed: {} under way at the cut, {} \
         started after it",
        samples.len(),
        during.len(),
        after.len()
    );
    assert!(retried > 0, "no SYN retransmission went elsewhere");
    assert!(
        after.is_empty(),
        "connections started after the cut failed: {after:?}\n{}",
        bed.lb().stats_text()
    );
}
