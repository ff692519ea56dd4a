//! Flow-state replication between two real daemons (group
//! "replication"): how many new flows per second node A reports and sends,
//! how many node B installs, with what lag and what losses.
//!
//! Two `xdplb run` daemons in namespaces of their own on one L2 segment (a
//! bridge), configured as each other's replication peers, serve the same
//! DSR service. A packet generator in a third namespace sends UDP
//! datagrams, each from a new client endpoint (a new flow, reported as it
//! is pinned: a TCP flow is reported only once its client answers, which a
//! generator's SYNs never do), to the VIP at node A's MAC, paced at
//! an offered rate, through an AF_PACKET socket. A's XDP program pins each
//! new flow and reports it to its ring; A's daemon drains the ring and
//! sends the pins to B over UDP; B installs them in its flow table. Both
//! daemons' status (`xdplb status --json`) is polled while the load runs
//! and until the counters settle.
//!
//! The backends exist only as static neighbour entries (health checks
//! off): the balanced datagrams leave A with XDP_TX and are dropped by the
//! veth (its peer runs no XDP program), which is after everything
//! measured here happened.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;
use xdp_common::PROTO_UDP;
use xdplb_tests::{
    lb::Xdplb,
    netns::{unique_prefix, Netns},
    switch,
};

use crate::{
    frames::{NewFlows, Sources},
    harness::{median, Figure, Opts, Section},
    pps::parse_mac,
};

pub const GROUP: &str = "replication";

pub const DESCRIPTION: &str = "Flow-state replication between two real `xdplb run` daemons \
(`cargo xtask bench`, or `xdplb-bench --only replication`; not part of `--quick`). Nodes A and B \
sit in network namespaces on one bridge, each with XDP attached (native mode) to its veth, \
configured as each other's replication peer (`[cluster] replication_listen`, one \
`[[cluster.peer]]`, `replicate = true`) and serving the same DSR service (3 backends that exist \
as static neighbour entries; health checks `type = \"none\"`). A generator in a third namespace \
sends UDP datagrams, each from a new client address and port (a new flow, reported as it is \
pinned; a TCP flow is reported once its client answers), to the VIP at A's MAC through an \
AF_PACKET socket (`sendmmsg`, 32 frames a call, qdisc bypassed), paced to an offered rate for a \
fixed time. A's XDP program pins each flow and reports it to its ring buffer; A's daemon drains \
the ring and sends the pins to B in UDP datagrams; B checks and installs them. Both daemons' \
`xdplb status --json` is polled every ~100 ms during the load and until the counters stop moving. \
Figures per offered rate, one sample per run: **A pinned/s** = A's `ring_written` rise ÷ the \
generator's sending time (what reached A's datapath: at high rates the generator cannot keep \
the pace or the veth path drops frames before XDP, so this can be below the offered rate); **A \
sent/s** = A's `sent_flows` rise ÷ the time until it stopped rising (at least the sending \
time); **B received/s** = the flows B received from A in UDP messages (`peers[A].received`) ÷ \
the time until that stopped rising; **received ÷ pinned**; **catch-up** = how long after the \
generator's last frame B received its last flow; **lag** = the largest `peers[A].lag_ms` B \
reported during the run (receive time minus the send time stamped in the datagram: the network \
and B's receive queue, not the time a pin waited in A's ring); **A ring lost** = A's `ring_lost` \
rise; **B missed** = flow messages from A that B saw a sequence gap for (it then pulls a full \
copy over TCP, which installs what was missed: B's `installed` includes those, so the \
throughput figures use `received`). Every run uses new client endpoints. The machine has 2 \
cores shared by the generator, the veth/bridge path, both daemons and other work: these are the \
rates of this setup, not of a dedicated machine.";

/// Offered new flows per second, and how long each run offers them.
const RATES: [u32; 3] = [20_000, 50_000, 100_000];
const LOAD: Duration = Duration::from_secs(2);
const REPETITIONS: usize = 3;
/// Between two status polls of both daemons.
const POLL: Duration = Duration::from_millis(100);
/// The counters count as settled when unchanged this long after the load.
const SETTLED: Duration = Duration::from_millis(500);
/// Longest wait for the counters to settle after the load.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames per sendmmsg call.
const BATCH: usize = 32;

const KEY: &str = "xdplb bench replication key, 32 b";
const PORT: u16 = 4700;
const VIP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 78, 100, 1), 80));
const NET: &str = "10.78.0";
const GEN_ADDR: &str = "10.78.0.2";
const NODE_A: &str = "10.78.0.21";
const NODE_B: &str = "10.78.0.22";
/// Backends: these hosts, MACs 02:be:00:00:00:<host>.
const BACKENDS: [u8; 3] = [11, 12, 13];

fn replication_addr(node: &str) -> SocketAddr {
    SocketAddr::new(node.parse().expect("address"), PORT)
}

fn config(me: &str, peer: &str) -> String {
    let mut c = format!(
        "[cluster]\nreplication_listen = \"{}\"\nreplication_key = \"{KEY}\"\nreplicate = true\n\
         [[cluster.peer]]\naddress = \"{}\"\n\n[[service]]\nname = \"web\"\nvip = \"{}\"\n\
         port = 80\nprotocol = \"udp\"\n\n[service.health_check]\ntype = \"none\"\n\n",
        replication_addr(me),
        replication_addr(peer),
        VIP.ip()
    );
    for b in BACKENDS {
        c += &format!("[[service.backend]]\naddress = \"{NET}.{b}\"\n\n");
    }
    c
}

/// A host on the segment: namespace, `eth0` with `addr`, static neighbour
/// entries for the backends.
fn host(switch: &Netns, name: &str, port: &str, addr: &str) -> Result<Netns> {
    let ns = Netns::new(name)?;
    switch::plug(switch, &ns, port, "eth0")?;
    ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    ns.exec(&["ip", "link", "set", "eth0", "up"])?;
    for b in BACKENDS {
        ns.exec(&[
            "ip",
            "neigh",
            "replace",
            &format!("{NET}.{b}"),
            "lladdr",
            &format!("02:be:00:00:00:{b:02x}"),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
    }
    Ok(ns)
}

/// Sends raw Ethernet frames out of one interface: an AF_PACKET socket
/// that bypasses the qdisc and receives nothing, many frames a call.
struct Sender {
    fd: OwnedFd,
}

impl Sender {
    /// A sender on `iface` of the calling thread's namespace.
    fn open(iface: &str) -> Result<Self> {
        let ifindex = xdplb::loader::interface_index(iface)?;
        // SAFETY: socket(2) with constant arguments; protocol 0: the
        // socket is for sending only.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned to us and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a pointer to an int and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: bind with a pointer to a sockaddr_ll and its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("binding to {iface}: {}", std::io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Sends `frames` in one call; returns how many went (0 when the
    /// device's queue is full for now).
    fn send(&self, frames: &[Vec<u8>]) -> Result<usize> {
        let mut iov: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: mmsghdr is plain data; zero is a valid value.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: every header points at one iovec, which points into a
        // frame; all outlive the call.
        let n = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN) => Ok(0),
                _ => Err(e).context("sendmmsg"),
            };
        }
        Ok(n as usize)
    }
}

/// New flows' first datagrams from ever new client endpoints, paced.
struct Generator {
    sender: Sender,
    flows: NewFlows,
    sources: Sources,
    batch: Vec<Vec<u8>>,
}

impl Generator {
    /// Offers `rate` new flows per second for `load`; returns the frames
    /// sent and how long sending took.
    fn offer(&mut self, rate: u32, load: Duration) -> Result<(u64, Duration)> {
        let total = (f64::from(rate) * load.as_secs_f64()) as u64;
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            let due = start + Duration::from_secs_f64(sent as f64 / f64::from(rate));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let n = BATCH.min((total - sent) as usize);
            for f in &mut self.batch[..n] {
                let src = self.sources.next().expect("endless");
                self.flows.write(src, f);
            }
            let mut done = 0;
            let mut idle = 0;
            while done < n {
                let k = self.sender.send(&self.batch[done..n])?;
                if k == 0 {
                    idle += 1;
                    if idle > 1000 {
                        bail!("the generator's interface accepts no frames");
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                done += k;
            }
            sent += n as u64;
        }
        Ok((sent, start.elapsed()))
    }
}

/// A daemon's API, callable from any thread (`Xdplb` holds a process
/// handle that is not `Sync`).
struct Api {
    binary: PathBuf,
    socket: PathBuf,
}

/// The replication counters of both nodes at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    a_written: u64,
    a_lost: u64,
    a_sent: u64,
    b_installed: u64,
    b_unmatched: u64,
    /// B's view of A: flows received from it in UDP messages, messages
    /// missed (sequence gaps), full copies pulled after a gap.
    b_received: u64,
    b_missed: u64,
    b_resyncs: u64,
    b_lag_ms: u64,
    b_max_lag_ms: u64,
}

impl Api {
    fn new(binary: &Path, lb: &Xdplb) -> Self {
        Self {
            binary: binary.to_owned(),
            socket: lb.socket(),
        }
    }

    /// `status["replication"]`.
    fn replication(&self) -> Result<Value> {
        let out = Command::new(&self.binary)
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .context("running xdplb status")?;
        if !out.status.success() {
            bail!(
                "xdplb status failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let v: Value = serde_json::from_slice(&out.stdout).context("parsing xdplb status")?;
        Ok(v["replication"].clone())
    }
}

fn field(v: &Value, name: &str) -> Result<u64> {
    v[name]
        .as_u64()
        .with_context(|| format!("no {name} in the replication status: {v}"))
}

/// B's entry for peer `peer`.
fn peer_of(v: &Value, peer: SocketAddr) -> Result<Value> {
    v["peers"]
        .as_array()
        .and_then(|ps| {
            ps.iter()
                .find(|p| p["address"] == peer.to_string().as_str())
        })
        .cloned()
        .with_context(|| format!("no peer {peer} in the replication status: {v}"))
}

fn read(a: &Api, b: &Api) -> Result<Counters> {
    let (ra, rb) = (a.replication()?, b.replication()?);
    let pa = peer_of(&rb, replication_addr(NODE_A))?;
    Ok(Counters {
        a_written: field(&ra, "ring_written")?,
        a_lost: field(&ra, "ring_lost")?,
        a_sent: field(&ra, "sent_flows")?,
        b_installed: field(&rb, "installed")?,
        b_unmatched: field(&rb, "unmatched")?,
        b_received: field(&pa, "received")?,
        b_missed: field(&pa, "missed")?,
        b_resyncs: field(&pa, "resyncs")?,
        b_lag_ms: field(&pa, "lag_ms")?,
        b_max_lag_ms: field(&pa, "max_lag_ms")?,
    })
}

/// What one run measured.
struct Run {
    offered: u64,
    pinned: u64,
    sent: u64,
    received: u64,
    /// Including the flows of full copies pulled.
    installed: u64,
    ring_lost: u64,
    missed: u64,
    resyncs: u64,
    unmatched: u64,
    sending: Duration,
    /// Since the generator started, when each count last rose.
    sent_done: Duration,
    received_done: Duration,
    max_lag_ms: u64,
}

/// Whether the counts have not moved for [`SETTLED`] up to the last
/// sample.
fn settled(samples: &[(Duration, Counters)]) -> bool {
    let key = |c: &Counters| (c.a_written, c.a_sent, c.b_received, c.b_installed);
    let Some(&(t_last, last)) = samples.last() else {
        return false;
    };
    let since = samples
        .iter()
        .rev()
        .take_while(|(_, c)| key(c) == key(&last))
        .last()
        .map_or(t_last, |(t, _)| *t);
    t_last.saturating_sub(since) >= SETTLED
}

/// One run: `rate` new flows per second for `load`, polling both nodes.
fn run_once(gen: &mut Generator, a: &Api, b: &Api, rate: u32, load: Duration) -> Result<Run> {
    let before = read(a, b)?;
    let samples: Mutex<Vec<(Duration, Counters)>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let (offered, sending) = std::thread::scope(|s| -> Result<(u64, Duration)> {
        let poller = s.spawn(|| -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let c = read(a, b)?;
                samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((start.elapsed(), c));
                std::thread::sleep(POLL);
            }
            Ok(())
        });
        let sent = gen.offer(rate, load);
        // Wait for the counters to settle.
        let settle_start = Instant::now();
        let result = loop {
            std::thread::sleep(POLL);
            if poller.is_finished() {
                break Ok(());
            }
            if sent.is_err() || settled(&samples.lock().unwrap_or_else(|p| p.into_inner())) {
                break Ok(());
            }
            if settle_start.elapsed() > SETTLE_TIMEOUT {
                break Ok(());
            }
        };
        stop.store(true, Ordering::Relaxed);
        poller.join().expect("poller panicked")?;
        result.and(sent)
    })?;
    let samples = samples.into_inner().unwrap_or_else(|p| p.into_inner());
    let last = samples.last().context("no status sample")?.1;
    // When each count reached its final value: between the first sample
    // showing it and the one before (their midpoint).
    let done = |get: fn(&Counters) -> u64| {
        let i = samples
            .iter()
            .position(|(_, c)| get(c) == get(&last))
            .unwrap_or(0);
        match i {
            0 => samples[0].0,
            _ => (samples[i - 1].0 + samples[i].0) / 2,
        }
    };
    Ok(Run {
        offered,
        pinned: last.a_written - before.a_written,
        sent: last.a_sent - before.a_sent,
        received: last.b_received - before.b_received,
        installed: last.b_installed - before.b_installed,
        ring_lost: last.a_lost - before.a_lost,
        missed: last.b_missed - before.b_missed,
        resyncs: last.b_resyncs - before.b_resyncs,
        unmatched: last.b_unmatched - before.b_unmatched,
        sending,
        sent_done: done(|c| c.a_sent).max(sending),
        received_done: done(|c| c.b_received).max(sending),
        max_lag_ms: samples.iter().map(|(_, c)| c.b_lag_ms).max().unwrap_or(0),
    })
}

/// Waits until both nodes have heard each other.
fn wait_peers_up(a: &Api, b: &Api) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (ra, rb) = (a.replication()?, b.replication()?);
        let up = |r: &Value, peer: &str| {
            peer_of(r, replication_addr(peer)).is_ok_and(|p| p["state"] == "up")
        };
        if up(&ra, NODE_B) && up(&rb, NODE_A) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the nodes did not hear each other within 15 s: A {ra}, B {rb}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn run(opts: &Opts) -> Result<Vec<Section>> {
    if opts.quick {
        println!("  replication: skipped with --quick (two daemons, ~35 s)");
        return Ok(Vec::new());
    }
    let prefix = unique_prefix("xbrep");
    let switch = switch::new(&format!("{prefix}-sw"))?;
    let gen_ns = host(&switch, &format!("{prefix}-g"), "v-g", GEN_ADDR)?;
    let a_ns = host(&switch, &format!("{prefix}-a"), "v-a", NODE_A)?;
    let b_ns = host(&switch, &format!("{prefix}-b"), "v-b", NODE_B)?;
    // The bridge learns where A's MAC is before the load (no flooding).
    gen_ns.exec(&["ping", "-n", "-q", "-c1", "-W2", NODE_A])?;
    a_ns.exec(&["ping", "-n", "-q", "-c1", "-W2", NODE_B])?;
    let a_mac = parse_mac(&a_ns.mac("eth0")?)?;
    let gen_mac = parse_mac(&gen_ns.mac("eth0")?)?;

    let a = Xdplb::start_in(
        &opts.xdplb,
        &a_ns,
        &["eth0"],
        &format!("{prefix}-a"),
        &config(NODE_A, NODE_B),
    )?;
    let b = Xdplb::start_in(
        &opts.xdplb,
        &b_ns,
        &["eth0"],
        &format!("{prefix}-b"),
        &config(NODE_B, NODE_A),
    )?;
    let (api_a, api_b) = (Api::new(&opts.xdplb, &a), Api::new(&opts.xdplb, &b));
    wait_peers_up(&api_a, &api_b)?;

    let sender = gen_ns.run(|| Sender::open("eth0"))?;
    let flows = NewFlows::new(gen_mac, a_mac, VIP, PROTO_UDP);
    let template = crate::frames::packet(gen_mac, a_mac, "10.79.0.1:1".parse()?, VIP, PROTO_UDP);
    let mut gen = Generator {
        sender,
        flows,
        sources: Sources::new(79),
        batch: vec![template; BATCH],
    };
    // Warm-up: the first flows, caches, the peers' sequence state.
    run_once(&mut gen, &api_a, &api_b, 5_000, Duration::from_millis(200))?;

    let mut runs: Vec<Vec<Run>> = RATES.iter().map(|_| Vec::new()).collect();
    for rep in 0..REPETITIONS {
        for k in 0..RATES.len() {
            crate::harness::interrupted()?;
            // Rotate the order of the rates from one repetition to the next.
            let i = (k + rep) % RATES.len();
            let run = run_once(&mut gen, &api_a, &api_b, RATES[i], LOAD)?;
            println!(
                "  replication: {} flows/s offered: {} frames sent by the generator in {:.2} s; A \
                 pinned {}, sent {}, ring lost {}; B received {} (lag up to {} ms), missed {} \
                 messages, pulled {} full copies, installed {}",
                RATES[i],
                run.offered,
                run.sending.as_secs_f64(),
                run.pinned,
                run.sent,
                run.ring_lost,
                run.received,
                run.max_lag_ms,
                run.missed,
                run.resyncs,
                run.installed,
            );
            runs[i].push(run);
        }
        println!("  replication: repetition {}/{REPETITIONS} done", rep + 1);
    }
    let end = read(&api_a, &api_b)?;
    drop((a, b));
    drop((gen, gen_ns, a_ns, b_ns, switch));

    let mut figures = Vec::new();
    let mut problems = Vec::new();
    for (rate, runs) in RATES.iter().zip(&runs) {
        let of = |f: &dyn Fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
        let label = |what: &str| format!("{what} ({}k flows/s offered)", rate / 1000);
        let pinned_case = label("A pinned");
        let rates = [
            (
                pinned_case.clone(),
                of(&|r| r.pinned as f64 / r.sending.as_secs_f64()),
                format!(
                    "A's ring_written rise ÷ the generator's sending time; the generator sent \
                     {:.0} frames per run (median) in {:.2} s",
                    median(&of(&|r| r.offered as f64)),
                    median(&of(&|r| r.sending.as_secs_f64()))
                ),
            ),
            (
                label("A sent"),
                of(&|r| r.sent as f64 / r.sent_done.as_secs_f64()),
                "A's sent_flows rise ÷ the time until it stopped rising".to_owned(),
            ),
            (
                label("B received"),
                of(&|r| r.received as f64 / r.received_done.as_secs_f64()),
                "flows B received from A in UDP messages (peers[A].received) ÷ the time until \
                 the count stopped rising"
                    .to_owned(),
            ),
        ];
        for (case, samples, note) in rates {
            let mut f = Figure::new(GROUP, &case, "flows/s", samples, true).note(note);
            if case != pinned_case {
                f = f.baseline(&pinned_case);
            }
            figures.push(f);
        }
        figures.push(
            Figure::new(
                GROUP,
                &label("B received ÷ A pinned"),
                "fraction",
                of(&|r| r.received as f64 / r.pinned.max(1) as f64),
                true,
            )
            .note(
                "below 1 when messages were missed; B then pulls a full copy over TCP, which \
                 installs the missing flows (not counted here)",
            ),
        );
        figures.push(
            Figure::new(
                GROUP,
                &label("catch-up after the load"),
                "ms (catch-up)",
                of(&|r| r.received_done.saturating_sub(r.sending).as_secs_f64() * 1e3),
                false,
            )
            .note("from the generator's last frame until B's received count stopped rising"),
        );
        figures.push(
            Figure::new(
                GROUP,
                &label("lag"),
                "ms (lag)",
                of(&|r| r.max_lag_ms as f64),
                false,
            )
            .note("the largest peers[A].lag_ms B reported during the run (whole ms)"),
        );
        figures.push(
            Figure::new(
                GROUP,
                &label("A ring lost"),
                "events",
                of(&|r| r.ring_lost as f64),
                false,
            )
            .note("pins A's datapath could not report (ring full)"),
        );
        figures.push(
            Figure::new(
                GROUP,
                &label("B missed"),
                "messages",
                of(&|r| r.missed as f64),
                false,
            )
            .note(format!(
                "flow messages from A that B saw a sequence gap for; full copies B pulled \
                 after a gap, per run: {:?}; flows B installed per run, pulls included: {:?}",
                runs.iter().map(|r| r.resyncs).collect::<Vec<_>>(),
                runs.iter().map(|r| r.installed).collect::<Vec<_>>()
            )),
        );
        for (n, r) in runs.iter().enumerate() {
            if r.received == 0 || r.installed == 0 {
                problems.push(format!(
                    "replication at {rate} flows/s, run {}: B received {} and installed {}",
                    n + 1,
                    r.received,
                    r.installed
                ));
            }
            if r.unmatched > 0 {
                problems.push(format!(
                    "replication at {rate} flows/s, run {}: B could not match {} pins to its \
                     service",
                    n + 1,
                    r.unmatched
                ));
            }
        }
    }
    let notes = vec![format!(
        "Setup: offered rates {} new flows/s, {:.1} s each, {REPETITIONS} repetitions (rates \
         in a rotating order), after a 0.2 s warm-up; status polled every {} ms plus the time \
         the polls take (each runs `xdplb status --json` on both nodes); a count's end is \
         placed midway between the last poll before it stopped and the first after, so the \
         catch-up times and the spans of the sent and received rates are accurate to about half \
         a polling round. \
         Over the whole benchmark B's `max_lag_ms` for A was {} ms, A's ring lost {} events and \
         B missed {} messages from A and pulled {} full copies. Ratios: A sent and B received \
         to A pinned.",
        RATES.map(|r| r.to_string()).join(", "),
        LOAD.as_secs_f64(),
        POLL.as_millis(),
        end.b_max_lag_ms,
        end.a_lost,
        end.b_missed,
        end.b_resyncs,
    )];
    Ok(vec![Section {
        group: GROUP.into(),
        figures,
        notes,
        problems,
        ..Default::default()
    }])
}
