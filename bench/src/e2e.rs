//! End to end: the same client load (wrk, keep-alive and one request per
//! connection) through each system on one veth topology, against nginx on
//! three backends, with the client straight to one backend as the ceiling.
//! Systems alternate across repetitions; each is set up, measured and torn
//! down in turn.

pub mod cpu;
pub mod haproxy;
pub mod nginx;
pub mod systems;
pub mod tools;
pub mod wrk;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{ensure, Context as _, Result};
use systems::{Bed, Cpu, System, CEILING};
use xdplb_tests::{topology::Topology, traffic::requests};

use crate::harness::{median, Figure, Opts};

/// wrk connections (one thread).
const CONNECTIONS: u32 = 32;
/// Who xdplb's systems must beat on every figure.
const RIVALS: [&str; 2] = ["haproxy", "iptables-dnat"];

/// The method, for the report (every `e2e-*` group).
pub const DESCRIPTION: &str = "One veth topology on this host: client, load balancer and three \
backends (nginx, one worker each, all pinned to the first CPU, serving a 100-byte file) on one \
bridge. wrk (one thread, 32 connections, pinned to the last CPU) runs keep-alive requests \
(e2e-keepalive, and the latency figures e2e-p50/e2e-p99 from the same run: a closed loop at \
saturation), then one request per connection with `Connection: close` (e2e-newconn). Systems: \
`ceiling` (the client straight to one backend, the baseline of every ratio), `xdplb-dsr` (the real \
`xdplb run`, VIP on the backends' loopback), `xdplb-nat` (the same in NAT mode, one-arm: backends \
answer the lb's address), `haproxy` (`mode tcp`, `balance roundrobin`, on the lb's address), \
`iptables-dnat` (kube-proxy's method: a `-m statistic --mode random` DNAT chain on PREROUTING plus \
MASQUERADE, IP forwarding on for it alone). Every system runs with what XDP forwarding on veth \
needs: the client's tx checksum offload off, and xdplb's pass-through XDP program on the lb's veth \
peer; kernel.bpf_stats_enabled=1 throughout. Each system is set up, checked to spread requests \
over the expected backends, warmed up for 1 s, measured and torn down, in an order rotated every \
repetition; TIME_WAIT sockets are dropped between systems. e2e-cpu is each load balancer's own CPU \
during the keep-alive run per 1000 requests, measured differently per system (see each figure's \
note); IPv4 only. On this single host every load balancer's work (its veth and bridge hops \
included) runs on the same CPUs as the client and the servers, so it comes straight out of the \
ceiling's throughput, most visibly per new connection. Behind a load balancer the three nginx \
workers share the servers' CPU where the ceiling's one has it alone: at saturation their time \
slices add a tail of several ms to p99 (a check with xdplb and one backend gave the ceiling's \
p99).";

/// One system's numbers from one repetition.
struct Sample {
    cpu: Cpu,
    keepalive: wrk::Report,
    newconn: wrk::Report,
    /// The system's own CPU during the keep-alive run, ms per 1000 requests.
    own_cpu: Option<f64>,
    /// The machine's softirq time during the keep-alive run, ms per 1000 requests.
    softirq: f64,
}

pub fn run(opts: &Opts) -> Result<Vec<Figure>> {
    tools::ensure_packages(&[
        ("nginx", "e2e: backends"),
        ("haproxy", "e2e: a load balancer compared"),
        ("wrk", "e2e: the client load"),
        ("iptables", "e2e: kube-proxy-style DNAT compared"),
        ("bpftool", "e2e: the XDP program's run time"),
    ])?;
    let (reps, secs) = if opts.quick { (1, 3) } else { (3, 10) };
    let dir = tools::TempDir::new("e2e")?;
    let _stats = tools::Sysctl::set("kernel.bpf_stats_enabled", "1")?;
    // With two CPUs or more: the servers on the first, wrk on the last.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (server_cpu, wrk_cpu) = if cpus > 1 {
        (Some(0), Some(cpus - 1))
    } else {
        (None, None)
    };
    let bed = Bed::new(&opts.xdplb, dir.path(), server_cpu)?;
    let prefix = bed.topo.prefix().to_owned();
    let systems = systems::all();
    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    for rep in 0..reps {
        for k in 0..systems.len() {
            let system = &systems[(k + rep) % systems.len()];
            let first_port = 61000 + ((rep * systems.len() + k) * 40) as u16;
            let s = measure(
                &bed,
                system.as_ref(),
                Duration::from_secs(secs),
                wrk_cpu,
                first_port,
            )
            .with_context(|| format!("e2e: {} (repetition {})", system.name(), rep + 1))?;
            eprintln!(
                "e2e: {:<14} rep {}: {:>6.0} req/s keep-alive, {:>6.0} conn/s, p50 {:.3} ms, p99 \
                    {:.3} ms",
                system.name(),
                rep + 1,
                s.keepalive.per_sec,
                s.newconn.per_sec,
                s.keepalive.p50_ms,
                s.keepalive.p99_ms
            );
            samples.entry(system.name()).or_default().push(s);
        }
    }
    drop(bed);
    let left: Vec<String> = xdplb_tests::netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(figures(&systems, &samples))
}

/// Sets `system` up, checks it spreads requests as expected, measures,
/// tears it down.
fn measure(
    bed: &Bed,
    system: &dyn System,
    duration: Duration,
    wrk_cpu: Option<usize>,
    first_port: u16,
) -> Result<Sample> {
    forget_time_wait(&bed.topo);
    let running = system.setup(bed)?;
    let tally = requests(
        bed.topo.client(),
        SocketAddr::new(running.target, 80),
        first_port..first_port + 30,
    );
    ensure!(
        tally.failed.is_empty(),
        "requests failed: {:?}",
        tally.failed
    );
    let served: Vec<&String> = tally.served.keys().collect();
    ensure!(
        served == running.backends.iter().collect::<Vec<_>>(),
        "served by {:?}, expected {:?}",
        tally.served,
        running.backends
    );
    let wrk = |close, duration| wrk::Run {
        client: bed.topo.client(),
        url: format!("http://{}/", running.target),
        duration,
        connections: CONNECTIONS,
        close,
        cpu: wrk_cpu,
    };
    wrk(false, Duration::from_secs(1)).run()?; // warm-up
    let before = (own_cpu_ns(running.cpu)?, cpu::softirq_ns()?);
    let keepalive = wrk(false, duration).run()?;
    let after = (own_cpu_ns(running.cpu)?, cpu::softirq_ns()?);
    let newconn = wrk(true, duration).run()?;
    let per_1000 = |ns: u64| ns as f64 / 1e6 / keepalive.requests as f64 * 1000.0;
    Ok(Sample {
        cpu: running.cpu,
        own_cpu: before.0.zip(after.0).map(|(b, a)| per_1000(a - b)),
        softirq: per_1000(after.1 - before.1),
        keepalive,
        newconn,
    })
}

/// Drops every TIME_WAIT socket on the testbed, so no system meets the
/// last one's: a SYN whose 4-tuple is still in TIME_WAIT with a newer
/// timestamp (say, HAProxy's and then MASQUERADE's connections from the
/// lb's address) is dropped by PAWS and retried a second later.
fn forget_time_wait(topo: &Topology) {
    for ns in topo.namespaces() {
        let _ = ns.exec(&["ss", "-K", "-t", "state", "time-wait"]);
    }
}

fn own_cpu_ns(cpu: Cpu) -> Result<Option<u64>> {
    Ok(match cpu {
        Cpu::Process(pid) => Some(cpu::process_ns(pid)?),
        Cpu::XdpProgram(id) => Some(cpu::bpf_prog_ns(id)?.0),
        Cpu::None | Cpu::SoftirqOverCeiling => None,
    })
}

/// A figure's samples, by case name.
type Values<'a> = &'a dyn Fn(&str) -> Vec<f64>;

/// The figures of every group; targets for xdplb's systems.
fn figures(systems: &[Box<dyn System>], samples: &BTreeMap<&str, Vec<Sample>>) -> Vec<Figure> {
    let ceiling = &samples[CEILING];
    let softirq_over_ceiling = |n: &str| -> Vec<f64> {
        samples[n]
            .iter()
            .zip(ceiling)
            .map(|(s, c)| s.softirq - c.softirq)
            .collect()
    };
    let cpu = |n: &str| -> Vec<f64> {
        samples[n]
            .iter()
            .zip(softirq_over_ceiling(n))
            .map(|(s, over)| s.own_cpu.unwrap_or(over))
            .collect()
    };
    let groups: [(&str, &str, bool, Values); 5] = [
        ("e2e-keepalive", "req/s", true, &|n| {
            samples[n].iter().map(|s| s.keepalive.per_sec).collect()
        }),
        ("e2e-newconn", "conn/s", true, &|n| {
            samples[n].iter().map(|s| s.newconn.per_sec).collect()
        }),
        ("e2e-p50", "ms", false, &|n| {
            samples[n].iter().map(|s| s.keepalive.p50_ms).collect()
        }),
        ("e2e-p99", "ms", false, &|n| {
            samples[n].iter().map(|s| s.keepalive.p99_ms).collect()
        }),
        ("e2e-cpu", "ms/1000 req", false, &cpu),
    ];
    let mut out = Vec::new();
    for (group, unit, higher, values) in groups {
        let med = |n: &str| median(&values(n));
        for name in systems.iter().map(|s| s.name()) {
            let is_cpu = group == "e2e-cpu";
            if is_cpu && name == CEILING {
                continue;
            }
            let mut f = Figure::new(group, name, unit, values(name), higher);
            if !is_cpu {
                f = f.baseline(CEILING);
            }
            if name.starts_with("xdplb") {
                let x = med(name);
                let ahead = RIVALS
                    .iter()
                    .all(|r| if higher { x > med(r) } else { x < med(r) });
                let (target, vs_ceiling) = match group {
                    "e2e-keepalive" | "e2e-newconn" => (
                        ">= 0.9x ceiling, above haproxy and iptables-dnat",
                        x >= 0.9 * med(CEILING),
                    ),
                    "e2e-p99" => (
                        "<= 1.1x ceiling, below haproxy and iptables-dnat",
                        x <= 1.1 * med(CEILING),
                    ),
                    _ => ("below haproxy and iptables-dnat", true),
                };
                f = f.target(target, ahead && vs_ceiling);
            }
            let errors: u64 = samples[name]
                .iter()
                .map(|s| s.keepalive.errors + s.newconn.errors)
                .sum();
            if is_cpu {
                f = f.note(cpu_note(
                    samples[name][0].cpu,
                    median(&softirq_over_ceiling(name)),
                ));
            } else if errors > 0 {
                f = f.note(format!(
                    "wrk reported {errors} socket errors or non-2xx answers over all runs"
                ));
            }
            out.push(f);
        }
    }
    out
}

/// What a CPU figure measures; `softirq`: the machine's softirq time above
/// the ceiling's (median, ms per 1000 requests), comparable across systems.
fn cpu_note(cpu: Cpu, softirq: f64) -> String {
    let what = match cpu {
        Cpu::Process(_) => {
            "the process's utime+stime (/proc/PID/stat, all threads); the kernel's \
            softirq work for its sockets is not in it"
        }
        Cpu::XdpProgram(_) => {
            "the XDP program's own run time (bpf run_time_ns); the veth and \
            bridge hops and XDP_TX are not in it"
        }
        Cpu::SoftirqOverCeiling => {
            "approximate: the whole machine's softirq time (/proc/stat) \
            per 1000 requests minus the ceiling run's in the same repetition; includes the extra \
            veth and bridge hops"
        }
        Cpu::None => "",
    };
    format!(
        "{what}; for comparison, the machine's softirq time above the ceiling's: {softirq:.2} \
        ms/1000 req"
    )
}
