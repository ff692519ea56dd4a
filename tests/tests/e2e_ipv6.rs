//! IPv6 end to end, in veth namespaces with real backends and the real
//! daemon: an IPv6 VIP with IPv6 backends in DSR and in NAT (two-arm and
//! one-arm) mode, balanced, failing over when a backend dies and taking
//! it back when it returns (the half-open health check and passive
//! detection over IPv6), next hops resolved and followed through IPv6
//! neighbour discovery, and `xdplb flow` for an IPv6 client. The IPv4
//! side of each is in e2e_dsr, e2e_nat, e2e_control and passive; the
//! bounds and the failed requests allowed are theirs. Needs root.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use xdplb_tests::{
    assert_within,
    bed::Bed,
    lb::{
        dsr_config_with, failed_between, nat_config, served_after, start_backend, Load, Xdplb,
        BACKEND_PORT,
    },
    netns::exec_line,
    proc::Proc,
    topology::{Shape, Topology},
    traffic::{peer, requests},
};

const TESTBACKEND: &str = env!("CARGO_BIN_EXE_xdplb-testbackend");
const RISE: u32 = 2;
const FALL: u32 = 3;

/// TCP (half-open) checks every `interval`, rise 2, fall 3.
fn health_check(interval: Duration) -> String {
    let (interval, timeout) = (interval.as_millis(), interval.as_millis() / 2);
    format!(
        "type = \"tcp\"\ninterval = \"{interval}ms\"\ntimeout = \"{timeout}ms\"\n\
         rise = {RISE}\nfall = {FALL}\n"
    )
}

/// Checks every 200 ms, as e2e_control's and e2e_nat's failover tests.
const FAST: Duration = Duration::from_millis(200);
/// Checks every second (3-4 s to notice a dead backend), as passive's: a
/// quicker detection can only be the passive one.
const SLOW: Duration = Duration::from_secs(1);

/// A bed of `shape` with three backends, checked every `interval`.
fn bed(shape: Shape, tag: &str, interval: Duration) -> Bed {
    Bed::new(shape, tag, 3, |topo| {
        let check = health_check(interval);
        match shape {
            Shape::Dsr => dsr_config_with(topo, &check),
            _ => nat_config(topo, &check),
        }
    })
}

/// The IPv6 service `web6` (VIP port 80) of a running bed.
struct Web6<'a> {
    lb: &'a Xdplb,
    backends: &'a mut [Proc],
    topo: &'a Topology,
    /// How often its backends are checked.
    interval: Duration,
}

impl<'a> Web6<'a> {
    fn of(bed: &'a mut Bed, interval: Duration) -> Self {
        Web6 {
            lb: &bed.lb,
            backends: &mut bed.backends,
            topo: &bed.topo,
            interval,
        }
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.topo.vip6().into(), 80)
    }

    fn backend(&self, i: usize) -> serde_json::Value {
        let addr = self.topo.backend_addr(i, true);
        self.lb.backend("web6", addr).unwrap()
    }

    /// 150 requests to the VIP from `first_port..`: all answered, each
    /// backend serving its share (the bounds e2e_dsr allows a third).
    fn assert_balanced(&self, first_port: u16) {
        let total = 150;
        let tally = requests(
            self.topo.client(),
            self.vip(),
            first_port..first_port + total,
        );
        assert!(
            tally.failed.is_empty(),
            "failed IPv6 connections: {:?}\n{}",
            tally.failed,
            self.lb.stats_text()
        );
        for i in 1..=self.topo.backend_count() {
            let n = tally.count(&self.topo.backend_name(i));
            let share = n as f64 / f64::from(total);
            assert!(
                (0.20..=0.47).contains(&share),
                "b{i} served {n}/{total}: {:?}",
                tally.served
            );
        }
    }

    /// One request from the client's `port`, then `xdplb flow` for that
    /// IPv6 client: it names the backend that answered, established.
    /// Returns the answer.
    fn assert_flow_named(&self, port: u16, backend_port: u16) -> serde_json::Value {
        let tally = requests(self.topo.client(), self.vip(), port..port + 1);
        let name = tally.served.keys().next().expect("answered").clone();
        let i: usize = name[1..].parse().unwrap();
        let src = SocketAddr::new(self.topo.client_addr(true), port);
        let answer = self.lb.flow(src, self.vip()).unwrap();
        let want = SocketAddr::new(self.topo.backend_addr(i, true), backend_port);
        assert_eq!(answer["backend"], want.to_string(), "{answer}");
        assert_eq!(answer["established"], true, "{answer}");
        answer
    }

    /// Kills b1's server under steady load on the VIP, then starts it
    /// again. Asserts what the IPv4 failover tests do: b1 goes down within
    /// `promised` (plus the kit's margin); no request started well before
    /// the kill or after the swap fails; nothing reaches b1 after it; b1
    /// rejoins within rise checks and serves again. Returns b1's view from
    /// while it was down.
    fn fail_over_and_recover(&mut self, what: &str, promised: Duration) -> serde_json::Value {
        let b1 = self.topo.backend_addr(1, true);
        assert_eq!(self.backend(1)["health"], "up", "{what}");
        let load = Load::start(self.topo, self.vip(), Duration::from_millis(5), 20000).unwrap();
        std::thread::sleep(Duration::from_millis(300));

        // b1's host stays up and answers SYNs with RST.
        let killed = Instant::now();
        self.backends[0].kill(libc::SIGKILL).unwrap();
        // A give-up limit, far above bound + margin (asserted below).
        let limit = Duration::from_secs(8);
        let down = self.lb.wait_health("web6", b1, "down", killed, limit);
        assert_within(&format!("{what}: detection"), down - killed, promised);

        std::thread::sleep(Duration::from_secs(1));
        let samples = load.stop();
        // A request still in flight at the kill dies with its server.
        let early = killed - Duration::from_millis(50);
        let before = failed_between(&samples, samples[0].start, early);
        let after = failed_between(&samples, down, Instant::now());
        eprintln!(
            "{what}: {} requests, {} failed between the kill and the swap, {} after",
            samples.len(),
            failed_between(&samples, killed, down).len(),
            after.len()
        );
        assert!(
            before.is_empty(),
            "{what}: failed before the kill: {before:?}"
        );
        assert!(
            after.is_empty(),
            "{what}: new connections failed after the swap: {after:?}\n{}",
            self.lb.stats_text()
        );
        let served_after = served_after(&samples, down);
        assert!(
            served_after.len() > 50,
            "{what}: load went on after the swap: {}",
            served_after.len()
        );
        assert!(
            !served_after.contains(&"b1"),
            "{what}: nothing reaches the dead backend after the swap"
        );
        let view = self.backend(1);

        // Only the scheduled (half-open) checks bring b1 back.
        let restarted = Instant::now();
        self.backends[0] = start_backend(self.topo, Path::new(TESTBACKEND), 1, &[]).unwrap();
        let limit = Duration::from_secs(10);
        let up = self.lb.wait_health("web6", b1, "up", restarted, limit);
        // rise checks, one interval for the first to come round, one for
        // the server to start listening (e2e_control's bound).
        let bound = self.interval * (RISE + 1) + self.interval;
        assert_within(&format!("{what}: rejoined after"), up - restarted, bound);
        let tally = requests(self.topo.client(), self.vip(), 40000..40150);
        assert!(tally.failed.is_empty(), "{what}: {:?}", tally.failed);
        assert!(
            tally.count("b1") > 20,
            "{what}: b1 gets new connections again: {:?}",
            tally.served
        );
        view
    }
}

#[test]
fn dsr_balances_and_fails_over_an_ipv6_service() {
    let mut bed = bed(Shape::Dsr, "v6dsr", FAST);
    let mut web6 = Web6::of(&mut bed, FAST);
    web6.assert_balanced(30000);
    let answer = web6.assert_flow_named(30500, 80);
    assert_eq!(answer["nat"], serde_json::Value::Null, "{answer}");
    web6.fail_over_and_recover("DSR IPv6 failover", FAST * FALL + FAST);
}

#[test]
fn nat_balances_and_fails_over_ipv6_in_both_shapes() {
    for (shape, tag) in [(Shape::NatTwoArm, "v6nat2"), (Shape::NatOneArm, "v6nat1")] {
        let mut bed = bed(shape, tag, FAST);
        let mut web6 = Web6::of(&mut bed, FAST);
        web6.assert_balanced(30000);
        // The backend sees the SNAT address; the client, the VIP.
        let (_, seen) = peer(web6.topo.client(), web6.vip()).unwrap();
        let snat = web6.topo.snat_addr(true);
        assert_eq!(seen.ip(), snat, "{shape:?}");
        let answer = web6.assert_flow_named(30500, BACKEND_PORT);
        let nat = answer["nat"].as_str().unwrap_or_default();
        assert!(
            nat.contains(&format!("translated to [{snat}]:")),
            "{answer}"
        );
        let what = format!("NAT {shape:?} IPv6 failover");
        web6.fail_over_and_recover(&what, FAST * FALL + FAST);
    }
}

#[test]
fn a_dead_ipv6_backend_is_suspected_from_its_traffic() {
    let mut bed = bed(Shape::Dsr, "v6pas", SLOW);
    let mut web6 = Web6::of(&mut bed, SLOW);
    // passive's promise: under 300 ms under load.
    let b1 = web6.fail_over_and_recover("IPv6 passive", Duration::from_millis(300));
    assert!(b1["passive"]["suspicions"].as_u64().unwrap() >= 1, "{b1}");
    let why = b1["passive"]["last_suspicion"].as_str().unwrap_or_default();
    assert!(why.contains("unanswered"), "{b1}");
}

/// Makes `ns`'s neighbour entry for `addr` on `dev` say `mac`, reachable.
fn set_neighbour(ns: &xdplb_tests::netns::Netns, addr: &str, mac: &str, dev: &str) {
    let line = format!("ip neigh replace {addr} lladdr {mac} dev {dev} nud reachable");
    exec_line(ns, &line);
}

/// Polls until the API shows backend `i` of `web6` at `mac`; returns how
/// long that took. Panics after `limit`.
fn wait_mac(web6: &Web6, i: usize, mac: &str, limit: Duration) -> Duration {
    let since = Instant::now();
    loop {
        let view = web6.backend(i);
        if view["mac"] == mac {
            return since.elapsed();
        }
        assert!(since.elapsed() < limit, "b{i} never at {mac}: {view}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Next hops of IPv6 backends come from neighbour discovery: a backend
/// the lb has no neighbour entry for is solicited and resolved, and a
/// backend's new MAC reaches the datapath on the kernel's announcement
/// (e2e_control's bound for IPv4).
#[test]
fn ipv6_next_hops_are_resolved_and_followed() {
    let mut bed = bed(Shape::Dsr, "v6nh", FAST);
    let web6 = Web6::of(&mut bed, FAST);
    let (lb, topo) = (web6.lb, web6.topo);
    let dev = topo.lb_iface();

    // b3 leaves, the lb forgets its IPv6 neighbour, b3 comes back.
    let b3 = topo.backend_addr(3, true).to_string();
    lb.cli(&["backend", "remove", "web6", &b3]).unwrap();
    exec_line(topo.lb(), &format!("ip -6 neigh del {b3} dev {dev}"));
    lb.cli(&["backend", "add", "web6", &b3]).unwrap();
    let mac3 = topo.backend(3).mac("eth0").unwrap();
    wait_mac(&web6, 3, &mac3, Duration::from_secs(5));
    web6.assert_balanced(30000);

    // b1 gets new MACs, three times in a row (see e2e_control for why).
    let b1 = topo.backend_addr(1, true).to_string();
    let old = topo.backend(1).mac("eth0").unwrap();
    wait_mac(&web6, 1, &old, Duration::from_secs(5));
    for round in 1..=3u8 {
        let new = format!("02:5e:00:00:06:{round:02x}");
        exec_line(
            topo.backend(1),
            &format!("ip link set dev eth0 address {new}"),
        );
        // What b1's unsolicited neighbour advertisement would do, exact.
        let changed = Instant::now();
        set_neighbour(topo.lb(), &b1, &new, dev);
        // A give-up limit, far above the bound asserted below.
        wait_mac(&web6, 1, &new, Duration::from_secs(4));
        let what = format!("round {round}: IPv6 MAC change to datapath");
        assert_within(&what, changed.elapsed(), Duration::from_millis(50));
    }
    // The datapath's entry is right, not only the API's view.
    web6.assert_balanced(31000);
}
