//! Failover: a backend's server is killed (SIGKILL) under steady load;
//! how long until no new flow reaches it (the balancer reports it down),
//! and how many requests fail meanwhile, split by the backend they went
//! to. xdplb's health check against HAProxy's with the same settings (TCP
//! connect every 1 s, 500 ms timeout, rise 2, fall 3: xdplb's defaults),
//! on the same topology with `xdplb-testbackend` servers.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use xdplb_tests::{
    lb::{
        dsr_config, nat_config, start_backend, start_backends, Load, Sample, Xdplb, BACKEND_PORT,
    },
    netns::Netns,
    proc::Proc,
    topology::{Shape, Topology},
};

use crate::{
    e2e::{haproxy, tools},
    harness::{self, Figure, Opts},
};

pub const GROUP: &str = "failover";

/// The method, for the report.
pub const DESCRIPTION: &str = "The DSR topology with `xdplb-testbackend` on three backends. Per \
trial: every server runs and the balancer reports all three up; 4 client loops each open a new \
connection (one HTTP/1.0 GET) every 20 ms; after 0.5 s plus a delay that steps through the check \
interval from trial to trial, one backend's server (b1, b2, b3 in turn) is killed with SIGKILL \
(its host stays up and answers RST); the balancer's state is polled every 5 ms until it reports \
the backend down (xdplb: `backend list`, the moment its Maglev slots are swapped out; HAProxy: \
`show stat` on its stats socket): `*-detection` is the time from the kill to then. The load goes \
on for 0.5 s, the server is restarted and must rejoin. Failed requests are split by the backend \
they went to (xdplb: the flow table's pin, read with `xdplb flow` once the backend is back, or for \
the requests under way at the fault, read right after it, before the balancer can move them; \
HAProxy: its connection log). Both check alike: TCP connect every 1 s, 500 ms timeout, rise 2, \
fall 3 (xdplb's defaults). HAProxy keeps its defaults otherwise (retries 3, 500 ms apart, no \
`option redispatch`): a request sent to the dead server fails only after ~1.5 s and stalls its \
loop meanwhile, so it makes fewer requests and fewer failures than xdplb's, where the dead host's \
RST fails a request at once. Then the same with a host loss instead of a kill (`*-hostloss-*`: \
the backend's switch port goes down, nothing answers; 10 trials, 2 in the quick run). \
`xdplb-nat` is the same on the one-arm NAT testbed with xdplb in NAT \
mode and its defaults, `retry_refused` among them: the dead server's RST to a SYN is dropped and \
the client's retransmitted SYN goes to another backend.";

/// Both balancers' check interval; the daemon's documented bound on
/// detection is interval × fall + interval.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
const BOUND_MS: f64 = 4000.0;
/// Parallel request loops, each a new connection every `LOAD_EVERY`.
const LOADS: usize = 4;
const LOAD_EVERY: Duration = Duration::from_millis(20);
/// Source ports each loop may use in a trial (a trial lasts a few seconds:
/// at most a few hundred connections); trials never reuse one.
const PORTS_PER_LOAD: usize = 400;

#[derive(PartialEq)]
enum Health {
    Up,
    Down,
    Between,
}

/// A load balancer under test, as the trials see it.
trait Balancer {
    fn name(&self) -> &'static str;
    /// Where the load goes.
    fn target(&self) -> SocketAddr;
    /// Backend `i`'s state as the balancer reports it.
    fn health(&self, i: usize) -> Result<Health>;
    /// The backend (1-based) each failed source port went to, if known.
    /// Called once the killed backend is back up.
    fn backends_of(&self, ports: &[u16]) -> Result<Vec<Option<usize>>>;
}

/// One trial's outcome.
struct Trial {
    detection_ms: f64,
    requests: usize,
    failed_dead: usize,
    /// Every other failure, including `failed_unknown`.
    failed_healthy: usize,
    /// Failures whose backend is unknown (not proven to be the dead one).
    failed_unknown: usize,
    /// Requests that succeeded at least `SLOWED` late: their SYN went
    /// unanswered and was retransmitted (to another backend, or to the
    /// same once it was back).
    slowed: usize,
    /// Their median latency beyond the trial's median, ms (`None`: none).
    slowed_added_ms: Option<f64>,
}

/// A request this slow waited for a SYN retransmission (the first comes
/// after 1 s); no request of a healthy run takes a tenth of it.
const SLOWED: Duration = Duration::from_millis(900);

pub fn run(opts: &Opts) -> Result<Vec<Figure>> {
    tools::ensure_packages(&[("haproxy", "failover: the health checker compared")])?;
    let (kills, losses) = if opts.quick { (2, 2) } else { (20, 10) };
    let dir = tools::TempDir::new("failover")?;
    let mut topo = Topology::new(Shape::Dsr, "bfo", 3)?;
    let prefix = topo.prefix().to_owned();
    topo.enable_xdp_tx(&opts.xdplb)?;
    let mut servers = start_backends(&topo, &opts.testbackend)?;
    topo.wait_reachable()?;

    let restart = |i: usize| start_backend(&topo, &opts.testbackend, i, &[]);
    let mut bed = Bed {
        client: topo.client(),
        topo: &topo,
        servers: &mut servers,
        restart: &restart,
    };
    let xdplb = {
        let lb = Xdplb::start(&opts.xdplb, &topo, &dsr_config(&topo))?;
        let bal = XdplbBalancer {
            lb,
            name: "xdplb",
            target: SocketAddr::new(topo.vip4().into(), 80),
            client: topo.client_addr(false),
            backends: (1..=topo.backend_count())
                .map(|i| SocketAddr::new(topo.backend_addr(i, false), 80))
                .collect(),
        };
        run_all(&bal, &mut bed, kills, losses)?
    };
    let haproxy = {
        let config = haproxy::Config {
            bind: SocketAddr::new(topo.lb_addr(false), 80),
            servers: (1..=topo.backend_count())
                .map(|i| {
                    (
                        topo.backend_name(i),
                        SocketAddr::new(topo.backend_addr(i, false), 80),
                    )
                })
                .collect(),
            log: true,
        };
        let h = haproxy::Haproxy::start(topo.lb(), dir.path(), &config)?;
        let bal = HaproxyBalancer {
            h,
            target: config.bind,
        };
        run_all(&bal, &mut bed, kills, losses)?
    };
    drop(servers);
    drop(topo);
    let nat = nat_trials(opts, kills, losses)?;
    let left: Vec<String> = xdplb_tests::netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(figures(&xdplb, &haproxy, &nat))
}

/// The same trials with xdplb in NAT mode on the one-arm NAT testbed.
fn nat_trials(opts: &Opts, kills: usize, losses: usize) -> Result<Trials> {
    let mut topo = Topology::new(Shape::NatOneArm, "bfn", 3)?;
    topo.enable_xdp_tx(&opts.xdplb)?;
    let prefix = topo.prefix().to_owned();
    let mut servers = start_backends(&topo, &opts.testbackend)?;
    topo.wait_reachable()?;
    let restart = |i: usize| start_backend(&topo, &opts.testbackend, i, &[]);
    let mut bed = Bed {
        client: topo.client(),
        topo: &topo,
        servers: &mut servers,
        restart: &restart,
    };
    let trials = {
        let lb = Xdplb::start(&opts.xdplb, &topo, &nat_config(&topo, ""))?;
        let bal = XdplbBalancer {
            lb,
            name: "xdplb-nat",
            target: SocketAddr::new(topo.vip4().into(), 80),
            client: topo.client_addr(false),
            backends: (1..=topo.backend_count())
                .map(|i| SocketAddr::new(topo.backend_addr(i, false), BACKEND_PORT))
                .collect(),
        };
        run_all(&bal, &mut bed, kills, losses)?
    };
    drop(servers);
    drop(topo);
    let left: Vec<String> = xdplb_tests::netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(trials)
}

/// Starts backend `i`'s server again.
type Restart<'a> = dyn Fn(usize) -> Result<Proc> + 'a;

/// How a trial's backend dies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Its server is SIGKILLed: its host stays up and answers SYNs with RST.
    Kill,
    /// Its host vanishes: its switch port goes down, nothing answers.
    HostLoss,
}

/// What the trials run on: the client, the switch the backends hang off
/// (port `v-bI`), their servers, and how to restart one.
struct Bed<'a> {
    client: &'a Netns,
    topo: &'a Topology,
    servers: &'a mut [Proc],
    restart: &'a Restart<'a>,
}

/// One balancer's trials: process kills, then host losses.
struct Trials {
    kill: Vec<Trial>,
    host_loss: Vec<Trial>,
}

fn run_all(bal: &dyn Balancer, bed: &mut Bed, kills: usize, losses: usize) -> Result<Trials> {
    Ok(Trials {
        kill: run_trials(bal, bed, Fault::Kill, 0..kills)?,
        host_loss: run_trials(bal, bed, Fault::HostLoss, kills..kills + losses)?,
    })
}

fn run_trials(
    bal: &dyn Balancer,
    bed: &mut Bed,
    fault: Fault,
    numbers: std::ops::Range<usize>,
) -> Result<Vec<Trial>> {
    let what = match fault {
        Fault::Kill => "killing",
        Fault::HostLoss => "cutting off",
    };
    numbers
        .map(|t| {
            let victim = t % bed.servers.len() + 1;
            let trial = run_trial(bal, bed, fault, t, victim).with_context(|| {
                format!(
                    "failover: {} trial {} ({what} b{victim})",
                    bal.name(),
                    t + 1
                )
            })?;
            eprintln!(
                "failover: {:<9} trial {:>2}: {what} b{victim}: down after {:>6.0} ms; {} \
                    requests, failed {} to it, {} to healthy backends",
                bal.name(),
                t + 1,
                trial.detection_ms,
                trial.requests,
                trial.failed_dead,
                trial.failed_healthy
            );
            Ok(trial)
        })
        .collect()
}

/// Every server runs and is up; load; kill `victim`; wait for the
/// balancer to call it down; load a little longer; restart it and wait
/// until it rejoins; classify the failures.
fn run_trial(
    bal: &dyn Balancer,
    bed: &mut Bed,
    fault: Fault,
    t: usize,
    victim: usize,
) -> Result<Trial> {
    for i in 1..=bed.servers.len() {
        wait_for(bal, i, Health::Up, Duration::from_secs(10))?;
    }
    let loads = (0..LOADS)
        .map(|l| {
            Load::start_in(
                bed.client,
                bal.target(),
                LOAD_EVERY,
                10_000 + ((t * LOADS + l) * PORTS_PER_LOAD) as u16,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    // A kill at an even spread of phases of the check schedule over the
    // trials (golden-ratio steps), not always the same one.
    let phase = (t as f64 * 0.618_033_988_7).fract();
    std::thread::sleep(Duration::from_millis(500) + CHECK_INTERVAL.mul_f64(phase));
    let mut under_way: Vec<u16> = loads.iter().filter_map(Load::under_way).collect();
    let killed = Instant::now();
    match fault {
        Fault::Kill => bed.servers[victim - 1].kill(libc::SIGKILL)?,
        Fault::HostLoss => bed.topo.set_backend_link(victim, false)?,
    }
    // Where the requests under way at the fault went, read before the
    // balancer can move them: one that then fails and is moved (its next
    // segment re-picked once the backend is out, and reset by the new one)
    // still failed on the backend that died.
    under_way.extend(loads.iter().filter_map(Load::under_way));
    let at_fault: HashMap<u16, usize> = under_way
        .iter()
        .zip(bal.backends_of(&under_way)?)
        .filter_map(|(&p, b)| Some((p, b?)))
        .collect();
    let down = wait_for(bal, victim, Health::Down, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let samples: Vec<_> = loads.into_iter().flat_map(Load::stop).collect();
    let down = down?;
    match fault {
        Fault::Kill => bed.servers[victim - 1] = (bed.restart)(victim)?,
        Fault::HostLoss => bed.topo.set_backend_link(victim, true)?,
    }
    wait_for(bal, victim, Health::Up, Duration::from_secs(15))?;
    std::thread::sleep(Duration::from_millis(200)); // HAProxy logs a session when it ends
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.result.is_err()).collect();
    let to: Vec<Option<usize>> = bal
        .backends_of(&failed.iter().map(|s| s.port).collect::<Vec<_>>())?
        .into_iter()
        .zip(&failed)
        .map(|(at_end, s)| at_fault.get(&s.port).copied().or(at_end))
        .collect();
    let failed_dead = to.iter().filter(|b| **b == Some(victim)).count();
    for (s, b) in failed.iter().zip(&to).filter(|(_, b)| **b != Some(victim)) {
        let when = s.start.saturating_duration_since(killed).as_millis();
        let to = b.map_or("an unknown backend".into(), |b| format!("b{b}"));
        eprintln!(
            "failover: {}: a request to {to}, {when} ms after the kill, failed: {:?}",
            bal.name(),
            s.result
        );
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let ok: Vec<f64> = samples
        .iter()
        .filter(|s| s.result.is_ok())
        .map(|s| ms(s.elapsed))
        .collect();
    let slowed: Vec<f64> = ok.iter().copied().filter(|&e| e >= ms(SLOWED)).collect();
    let typical = harness::median(&ok);
    Ok(Trial {
        detection_ms: ms(down - killed),
        requests: samples.len(),
        failed_dead,
        failed_healthy: failed.len() - failed_dead,
        failed_unknown: to.iter().filter(|b| b.is_none()).count(),
        slowed: slowed.len(),
        slowed_added_ms: (!slowed.is_empty()).then(|| harness::median(&slowed) - typical),
    })
}

/// Polls backend `i` until the balancer reports `want`; returns when.
fn wait_for(bal: &dyn Balancer, i: usize, want: Health, limit: Duration) -> Result<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        if bal.health(i)? == want {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "b{i} not {} within {limit:?}",
                if want == Health::Up { "up" } else { "down" }
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// xdplb, DSR or NAT: the same daemon, API and flow look-up.
struct XdplbBalancer {
    lb: Xdplb,
    name: &'static str,
    target: SocketAddr,
    client: std::net::IpAddr,
    /// Backend `i` (1-based) is `backends[i - 1]`.
    backends: Vec<SocketAddr>,
}

impl Balancer for XdplbBalancer {
    fn name(&self) -> &'static str {
        self.name
    }
    fn target(&self) -> SocketAddr {
        self.target
    }
    fn health(&self, i: usize) -> Result<Health> {
        let b = self.lb.backend("web4", self.backends[i - 1].ip())?;
        Ok(match (b["health"].as_str(), b["state"].as_str()) {
            (Some("up"), Some("active")) => Health::Up,
            (Some("down"), _) => Health::Down,
            _ => Health::Between,
        })
    }
    /// The flow table (DSR) or the NAT table pins every flow to the
    /// backend its first packet went to; once that backend is active
    /// again, `xdplb flow` names it (NAT: while the translation lasts).
    fn backends_of(&self, ports: &[u16]) -> Result<Vec<Option<usize>>> {
        ports
            .iter()
            .map(|&p| {
                let f = self.lb.flow(SocketAddr::new(self.client, p), self.target)?;
                let pinned = f["established"] == true;
                Ok(pinned
                    .then(|| f["backend"].as_str()?.parse::<SocketAddr>().ok())
                    .flatten()
                    .and_then(|b| self.backends.iter().position(|x| *x == b))
                    .map(|i| i + 1))
            })
            .collect()
    }
}

struct HaproxyBalancer {
    h: haproxy::Haproxy,
    target: SocketAddr,
}

impl Balancer for HaproxyBalancer {
    fn name(&self) -> &'static str {
        "haproxy"
    }
    fn target(&self) -> SocketAddr {
        self.target
    }
    fn health(&self, i: usize) -> Result<Health> {
        let status = self.h.status()?;
        let s = status.get(&format!("b{i}")).map_or("", String::as_str);
        Ok(if s == "UP" {
            Health::Up
        } else if s.starts_with("DOWN") {
            Health::Down
        } else {
            Health::Between
        })
    }
    /// From HAProxy's connection log (client port → server).
    fn backends_of(&self, ports: &[u16]) -> Result<Vec<Option<usize>>> {
        let log = self.h.servers_by_port();
        Ok(ports
            .iter()
            .map(|p| log.get(p).and_then(|s| s.strip_prefix('b')?.parse().ok()))
            .collect())
    }
}

fn figures(xdplb: &Trials, haproxy: &Trials, nat: &Trials) -> Vec<Figure> {
    let fig = |case: &str, unit: &str, trials: &[Trial], f: fn(&Trial) -> f64| {
        Figure::new(GROUP, case, unit, trials.iter().map(f).collect(), false)
    };
    let unknown = |v: &[Trial], why: &str| {
        let n: usize = v.iter().map(|t| t.failed_unknown).sum();
        format!(
            "every failure not proven to have gone to the dead backend; {n} in all of \
            unknown backend ({why})"
        )
    };
    let requests = |v: &[Trial]| v.iter().map(|t| t.requests).sum::<usize>();
    let worst = |v: &[Trial], f: fn(&Trial) -> f64| v.iter().map(f).fold(0.0, f64::max);
    let detection: fn(&Trial) -> f64 = |t| t.detection_ms;
    let dead: fn(&Trial) -> f64 = |t| t.failed_dead as f64;
    let healthy: fn(&Trial) -> f64 = |t| t.failed_healthy as f64;
    let slowed: fn(&Trial) -> f64 = |t| t.slowed as f64;
    // The latency a retried request pays, over the trials that had any.
    let added = |case: String, v: &[Trial]| {
        let values: Vec<f64> = v.iter().filter_map(|t| t.slowed_added_ms).collect();
        (!values.is_empty()).then(|| {
            Figure::new(GROUP, &case, "ms", values, false).note(
                "median latency of the slowed requests beyond the trial's median, over the \
                 trials that had any",
            )
        })
    };
    let mut figures = Vec::new();
    // Process kills as `NAME-…`, host losses as `NAME-hostloss-…`.
    for (fault, pick) in [
        ("", (|t: &Trials| &t.kill) as fn(&Trials) -> &Vec<Trial>),
        ("-hostloss", |t: &Trials| &t.host_loss),
    ] {
        let (x, h, n) = (pick(xdplb), pick(haproxy), pick(nat));
        let name = |who: &str, what: &str| format!("{who}{fault}-{what}");
        let detect = |who: &str, v: &[Trial]| {
            let f = fig(&name(who, "detection"), "ms", v, detection);
            if who == "haproxy" {
                f
            } else {
                f.baseline(&name("haproxy", "detection")).target(
                    "every trial <= 4000 ms (interval x fall + interval)",
                    worst(v, detection) <= BOUND_MS,
                )
            }
        };
        figures.extend([
            detect("xdplb", x),
            fig(&name("xdplb", "failed-dead"), "requests", x, dead)
                .baseline(&name("haproxy", "failed-dead"))
                .note(format!(
                    "of {} requests in all; the flow table pins each to the dead backend",
                    requests(x)
                )),
            fig(&name("xdplb", "failed-healthy"), "requests", x, healthy)
                .target("0 in every trial", worst(x, healthy) == 0.0)
                .note(unknown(x, "with no flow pinned")),
            detect("haproxy", h),
            fig(&name("haproxy", "failed-dead"), "requests", h, dead).note(format!(
                "of {} requests in all; HAProxy's connection log names the dead server",
                requests(h)
            )),
            fig(&name("haproxy", "failed-healthy"), "requests", h, healthy)
                .note(unknown(h, "missing from HAProxy's log")),
            detect("xdplb-nat", n),
            fig(&name("xdplb-nat", "failed-dead"), "requests", n, dead)
                .baseline(&name("haproxy", "failed-dead"))
                .note(format!(
                    "of {} requests in all; refused or unanswered SYNs are retried on another \
                     backend (retry_refused)",
                    requests(n)
                )),
            fig(&name("xdplb-nat", "failed-healthy"), "requests", n, healthy)
                .target("0 in every trial", worst(n, healthy) == 0.0)
                .note(unknown(n, "no translation left to name it")),
        ]);
        for (who, v) in [("xdplb", x), ("haproxy", h), ("xdplb-nat", n)] {
            figures.push(
                fig(&name(who, "slowed"), "requests", v, slowed).note(format!(
                    "succeeded, but at least {} ms late: a SYN retransmitted (moved to \
                     another backend, or re-picked)",
                    SLOWED.as_millis()
                )),
            );
            figures.extend(added(name(who, "slowed-added-latency"), v));
        }
    }
    figures
}
