//! The control plane against the number of backends (group
//! "control-plane"): one real `xdplb run` with 10, 1,000 and 10,000
//! backends, all health-checked (TCP connect every 1 s), and what an
//! operator sees: how long it takes to become ready, how long `status` and
//! a reload that changes one weight take, how long a dead backend takes to
//! be marked down, and the daemon's CPU and memory while it only checks.
//!
//! The backends (NAT mode) are addresses on the loopback of one namespace
//! behind a router hop, all served by one listener; a backend "dies" when
//! a firewall rule there resets connections to its address.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use xdplb_tests::{
    lb::Xdplb,
    netns::{unique_prefix, Netns},
    proc::Proc,
};

use crate::harness::{Figure, Opts, Section};

pub const GROUP: &str = "control-plane";

pub const DESCRIPTION: &str = "The control plane against the number of backends: one real `xdplb \
run` (native XDP on a veth) with 10 (one service), 1,000 and 10,000 backends (10 services of 100 \
or 1,000), every backend health-checked with the defaults (TCP connect every 1 s, 500 ms \
timeout, rise 2, fall 3). The services are in NAT mode: the backends are addresses on the \
loopback of one namespace, one router hop away (so every next hop is resolved through a route \
and a neighbour), all served by one `xdplb-testbackend`; DSR would need all of them on the \
load balancer's segment, 10,000 neighbour entries, past the kernel's global neighbour-table \
limit (`gc_thresh3`, 1,024 by default). Per size and repetition: **ready** = from starting the \
daemon to its `ready` line; **status** = the median time of 10 `xdplb status --json` calls (the \
CLI process included); **reload** = `xdplb reload` after one backend's weight changed in the \
file; **detection** = from a firewall rule that resets connections to one backend to `xdplb \
backend list` showing it down (polled every 50 ms; it depends on where in its check interval \
the backend dies: 2 to 3 s with fall 3; the 10-backend figure is the baseline of the others); \
**cpu** = the daemon's user + system time over 10 s of steady checks, as a share of one core; \
**rss** = its resident memory then. 3 repetitions per size (1 in `--quick`, sizes 10 and 1,000 \
only).";

/// The targets at 10,000 backends.
const READY_TARGET_MS: f64 = 3000.0;
const API_TARGET_MS: f64 = 100.0;
const CPU_TARGET: f64 = 10.0;

const LB_NET: &str = "10.83.0";
/// Backends: 10.84.x.y, VIPs 10.85.0.s.
const BACKEND_NET: u8 = 84;

/// The two namespaces and the backends' server.
struct Bed {
    lb: Netns,
    be: Netns,
    _server: Proc,
}

impl Bed {
    fn build(opts: &Opts, backends: usize) -> Result<Self> {
        let prefix = unique_prefix("cps");
        let lb = Netns::new(&format!("{prefix}-lb"))?;
        let be = Netns::new(&format!("{prefix}-be"))?;
        lb.exec(&[
            "ip",
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            be.name(),
        ])?;
        lb.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{LB_NET}.1/24"),
            "dev",
            "eth0",
        ])?;
        be.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{LB_NET}.2/24"),
            "dev",
            "eth0",
        ])?;
        for ns in [&lb, &be] {
            ns.exec(&["ip", "link", "set", "lo", "up"])?;
            ns.exec(&["ip", "link", "set", "eth0", "up"])?;
        }
        lb.exec(&[
            "ip",
            "route",
            "add",
            &format!("10.{BACKEND_NET}.0.0/16"),
            "via",
            &format!("{LB_NET}.2"),
        ])?;
        let batch: String = (0..backends)
            .map(|i| format!("address add {}/32 dev lo\n", backend_addr(i)))
            .collect();
        let file = std::env::temp_dir().join(format!("{prefix}-addrs"));
        std::fs::write(&file, batch)?;
        let added = be.exec(&["ip", "-batch", &file.to_string_lossy()]);
        let _ = std::fs::remove_file(&file);
        added.context("adding the backends' addresses")?;
        let mut cmd = be.command(&opts.testbackend);
        cmd.args(["--name", "all", "--port", "80"]);
        let mut server = Proc::spawn_with(&mut cmd, "backends", false)?;
        server.wait_for_stdout_line("listening", Duration::from_secs(10))?;
        Ok(Self {
            lb,
            be,
            _server: server,
        })
    }
}

fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, BACKEND_NET, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// `services` services sharing `backends` backends equally.
fn config(services: usize, backends: usize) -> String {
    let per = backends / services;
    let mut c = String::with_capacity(backends * 48);
    for s in 0..services {
        c += &format!(
            "[[service]]\nname = \"s{s}\"\nvip = \"10.85.0.{}\"\nport = 80\n\
             protocol = \"tcp\"\nmode = \"nat\"\n\n",
            s + 1
        );
        for i in s * per..(s + 1) * per {
            c += &format!("[[service.backend]]\naddress = \"{}\"\n", backend_addr(i));
        }
        c += "\n";
    }
    c
}

/// (user + system CPU seconds, resident bytes) of process `pid`, from /proc.
fn usage(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces).
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // SAFETY: sysconf with a constant name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (fields[11].parse::<f64>()? + fields[12].parse::<f64>()?) / ticks;
    // SAFETY: sysconf with a constant name.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    Ok((cpu, fields[21].parse::<u64>()? * page))
}

/// How long `f` took, and its result.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    let started = Instant::now();
    let value = f()?;
    Ok((value, started.elapsed()))
}

/// One repetition's figures.
struct Sample {
    ready_ms: f64,
    status_ms: f64,
    reload_ms: f64,
    detection_ms: f64,
    cpu_percent: f64,
    rss_mib: f64,
}

fn measure(opts: &Opts, backends: usize) -> Result<Sample> {
    let services = if backends >= 100 { 10 } else { 1 };
    let bed = Bed::build(opts, backends)?;
    let text = config(services, backends);
    let prefix = unique_prefix("cpsd");
    let (daemon, ready) =
        timed(|| Xdplb::start_in(&opts.xdplb, &bed.lb, &["eth0"], &prefix, &text))?;
    // Every backend up (rise 2: two checks after the start).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = daemon.json(&["status"])?;
        if v["backends_active"].as_u64() == Some(backends as u64) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{backends} backends: only {} active after 60 s",
            v["backends_active"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut status: Vec<f64> = (0..10)
        .map(|_| Ok(timed(|| daemon.json(&["status"]))?.1.as_secs_f64() * 1e3))
        .collect::<Result<_>>()?;
    status.sort_by(f64::total_cmp);

    let (cpu0, _) = usage(daemon.proc.pid())?;
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let (cpu1, rss) = usage(daemon.proc.pid())?;
    let cpu_percent = (cpu1 - cpu0) / window.elapsed().as_secs_f64() * 100.0;

    let changed = text.replacen(
        &format!("address = \"{}\"\n", backend_addr(0)),
        &format!("address = \"{}\"\nweight = 50\n", backend_addr(0)),
        1,
    );
    daemon.write_config(&changed)?;
    let (_, reload) = timed(|| daemon.cli(&["reload"]))?;

    // The last backend of the last service dies: resets from its host.
    let victim = backend_addr(backends - 1);
    let service = format!("s{}", services - 1);
    let rule = [
        "-p",
        "tcp",
        "-d",
        &victim.to_string(),
        "--dport",
        "80",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ];
    bed.be
        .exec(&[&["iptables", "-I", "INPUT"][..], &rule[..]].concat())?;
    let killed = Instant::now();
    while daemon.backend(&service, victim.into())?["health"] != "down" {
        ensure!(
            killed.elapsed() < Duration::from_secs(30),
            "{victim} not marked down in 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let detection = killed.elapsed();
    Ok(Sample {
        ready_ms: ready.as_secs_f64() * 1e3,
        status_ms: status[status.len() / 2],
        reload_ms: reload.as_secs_f64() * 1e3,
        detection_ms: detection.as_secs_f64() * 1e3,
        cpu_percent,
        rss_mib: rss as f64 / (1 << 20) as f64,
    })
}

pub fn run(opts: &Opts) -> Result<Section> {
    let (sizes, repetitions): (&[usize], usize) = if opts.quick {
        (&[10, 1000], 1)
    } else {
        (&[10, 1000, 10_000], 3)
    };
    ensure!(
        opts.xdplb.exists() && opts.testbackend.exists(),
        "control-plane needs {} and {}",
        opts.xdplb.display(),
        opts.testbackend.display()
    );
    let mut section = Section {
        group: GROUP.into(),
        ..Default::default()
    };
    for &n in sizes {
        let mut samples = Vec::new();
        for r in 0..repetitions {
            let s = measure(opts, n).with_context(|| format!("{n} backends, run {}", r + 1))?;
            println!(
                "control-plane: {n} backends: ready {:.0} ms, status {:.1} ms, reload {:.1} ms, \
                 detection {:.0} ms, cpu {:.1} %, rss {:.1} MiB",
                s.ready_ms, s.status_ms, s.reload_ms, s.detection_ms, s.cpu_percent, s.rss_mib
            );
            samples.push(s);
        }
        let figure = |what: &str, unit: &str, f: fn(&Sample) -> f64| {
            Figure::new(
                GROUP,
                &format!("{what}, {n} backends"),
                unit,
                samples.iter().map(f).collect(),
                false,
            )
        };
        let at_scale = n == 10_000;
        let mut ready = figure("ready", "ms", |s| s.ready_ms);
        let mut status = figure("status", "ms", |s| s.status_ms);
        let mut reload = figure("reload of one weight", "ms", |s| s.reload_ms);
        let mut detection = figure("detection", "ms", |s| s.detection_ms);
        let mut cpu = figure("cpu", "% of a core", |s| s.cpu_percent);
        if at_scale {
            let met = ready.max() < READY_TARGET_MS;
            ready = ready.target(&format!("< {READY_TARGET_MS} ms"), met);
            let met = status.max() < API_TARGET_MS;
            status = status.target(&format!("< {API_TARGET_MS} ms"), met);
            let met = reload.max() < API_TARGET_MS;
            reload = reload.target(&format!("< {API_TARGET_MS} ms"), met);
            let met = cpu.median() < CPU_TARGET;
            cpu = cpu.target(&format!("< {CPU_TARGET} % of a core"), met);
        }
        if n != sizes[0] {
            detection = detection.baseline(&format!("detection, {} backends", sizes[0]));
            if at_scale {
                // Within 10 % of the 10-backend figure (compared in the
                // report's ratio column; here against its median).
                let base = section
                    .figures
                    .iter()
                    .find(|f| f.case == format!("detection, {} backends", sizes[0]))
                    .map_or(f64::NAN, Figure::median);
                let met = detection.median() <= base * 1.1;
                detection = detection.target("within 10 % of 10 backends", met);
            }
        }
        let rss = figure("rss", "MiB", |s| s.rss_mib);
        section
            .figures
            .extend([ready, status, reload, detection, cpu, rss]);
    }
    Ok(section)
}
