//! Node loss (group "node-loss"): a load-balancer host dies under load;
//! how long until traffic goes elsewhere, how many new connections fail
//! or stall, how many long-lived connections are reset, and how long the
//! survivors pause. The three-node xdplb cluster (BGP+BFD, ECMP, flow
//! replication) against the classic pair of load balancers: keepalived
//! VRRP active/standby in front of one xdplb node at a time.
//!
//! Both run on the cluster testbed of the test kit
//! (`xdplb_tests::cluster`): the same client, router, bridge and backends.
//! For the VRRP pair the nodes' BIRDs are stopped, n1 and n2 run xdplb
//! without a `[cluster]` section, keepalived in each holds a virtual
//! address on the bridge for the VRRP master, and the router has a static
//! route for the VIP via that address.

use std::{
    collections::BTreeSet,
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use xdplb_tests::{
    client,
    cluster::{
        backend_addr, vip, wait_until, Chatter, Cluster, Replication, BACKENDS, LONG_LIVED, NODES,
        VIP,
    },
    lb::Xdplb,
    netns::unique_prefix,
    proc::Proc,
};

use crate::{
    e2e::tools,
    harness::{interrupted, Figure, Opts, Section},
};

pub const GROUP: &str = "node-loss";

/// The method, for the report.
pub const DESCRIPTION: &str = "A load-balancer host dies under load (`xdplb-bench --only \
node-loss`; not part of `--quick`). Testbed: the test kit's cluster topology (client, a router, \
three xdplb nodes and three `xdplb-testbackend` servers on one bridge, DSR, in network \
namespaces). **cluster**: the three nodes announce the VIP to the router's BIRD over BGP with \
BFD (100 ms, multiplier 3), the router spreads connections over them by ECMP (5-tuple hash), \
and the nodes replicate flow state. **vrrp**: the classic pair of load balancers, keepalived \
VRRPv3 active/standby (`advert_int 0.1`, priorities 150/100, preemption) in front of one xdplb \
node at a time: n1 and n2 run xdplb without `[cluster]` (no shared flow state, as with \
keepalived in front of LVS without a sync daemon), the master holds a virtual address on the \
bridge, and the router routes the VIP to it with a static route. Per trial: one backend (b3) \
leaves every node's tables, 60 long-lived connections open (each exchanges a line every 50 ms \
on a thread of its own), b3 comes back, so about a third of the connections are pinned to a \
backend other than the one the Maglev table picks now (the case where flow state matters); \
then the client opens a new connection (one HTTP/1.0 GET, 2 s timeout) every 10 ms, each on a \
thread of its own, for 0.5 s; then a node vanishes as a dead host would: its \
xdplb is SIGKILLed, its link to the bridge is cut, its BIRD or keepalived SIGKILLed (cluster: \
the node carrying the most connections whose pin differs from the Maglev pick; vrrp: the \
master). The load goes on for 2 s after the router sends elsewhere. **detection** = from the \
cut until the router no longer sends to the dead node (cluster: its ECMP route has 2 next \
hops, BFD having withdrawn the node; vrrp: its neighbour entry for the virtual address names \
the standby's MAC, after the standby's gratuitous ARP), polled every 5 ms. **failed-new** = new \
connections that failed (reset, or no answer in 2 s); **slow-new** = new connections that \
succeeded but took 0.5 s or more (their SYN went to the dead node and was retransmitted after \
1 s); **reset** = long-lived connections that failed; **paused** = long-lived connections that \
survived but went 250 ms or more without an exchange; **longest-pause** = the longest time \
between two exchanges of a long-lived connection that survived. Then the node boots again \
and rejoins (cluster: it pulls the flow table before it announces; vrrp: it takes the master \
role back) before the next trial. The cluster's trials run first, then the pair's, \
each on a testbed of its own built once.";

/// Trials per setup.
const TRIALS: usize = 10;
/// How often the client opens a new connection, and how long it waits.
const NEW_EVERY: Duration = Duration::from_millis(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Load before the kill, and after the router sends elsewhere.
const BEFORE: Duration = Duration::from_millis(500);
const AFTER: Duration = Duration::from_secs(2);
/// A new connection that took this long lost a packet on the way.
const SLOW: Duration = Duration::from_millis(500);
/// A long-lived connection (a line every 50 ms) silent this long paused.
const PAUSE: Duration = Duration::from_millis(250);
/// The VRRP virtual address the router routes the VIP to.
const VRRP_ADDR: &str = "10.88.0.30";

/// One trial's outcome.
struct Trial {
    detection_ms: f64,
    new_conns: usize,
    failed_new: usize,
    slow_new: usize,
    reset: usize,
    /// Surviving long-lived connections that paused.
    paused: usize,
    longest_pause_ms: f64,
    /// Connections on the killed node whose pin differs from the Maglev pick.
    moved: usize,
}

/// A setup under test: its testbed, how a node dies and comes back.
trait Setup {
    fn name(&self) -> &'static str;
    fn cluster(&self) -> &Cluster;
    /// The node to kill, given each live node's count of connections
    /// whose pin differs from the Maglev pick (`None` for a node that
    /// runs no xdplb).
    fn victim(&self, moved: &[Option<usize>]) -> usize;
    /// Node `i` dies; returns the time from its link cut until the router
    /// sends elsewhere.
    fn kill(&mut self, i: usize) -> Result<Duration>;
    /// Node `i` boots again and takes its place back.
    fn restore(&mut self, i: usize) -> Result<()>;
}

pub fn run(opts: &Opts) -> Result<Vec<Section>> {
    if opts.quick {
        println!("node-loss: skipped in --quick (it takes minutes)");
        return Ok(Vec::new());
    }
    tools::ensure_packages(&[
        ("bird2", "node-loss: the cluster's BGP+BFD routers"),
        ("keepalived", "node-loss: the VRRP active/standby baseline"),
    ])?;
    ensure!(
        opts.xdplb.exists() && opts.testbackend.exists(),
        "node-loss needs {} and {} (the bench builds them unless --no-build)",
        opts.xdplb.display(),
        opts.testbackend.display()
    );
    let mut section = Section {
        group: GROUP.into(),
        ..Default::default()
    };
    let cluster = {
        let mut setup = ClusterSetup::build()?;
        run_trials(&mut setup, 40_000)?
    };
    section.figures.extend(figures("cluster", &cluster));
    // The baseline must not cost the cluster's figures if it cannot run.
    let vrrp = crate::harness::catch(|| {
        let mut setup = VrrpSetup::build(opts)?;
        run_trials(&mut setup, 50_000)
    });
    match vrrp {
        Ok(vrrp) => {
            section.figures.extend(figures("vrrp", &vrrp));
            for f in &mut section.figures {
                if f.case.starts_with("cluster-") && f.unit == "ms" {
                    let base = f.case.replacen("cluster-", "vrrp-", 1);
                    f.baseline = Some(base);
                }
            }
        }
        Err(e) => {
            interrupted()?;
            eprintln!("node-loss: the VRRP baseline failed: {e:#}");
            section.notes.push(format!(
                "The keepalived VRRP baseline could not run: {e:#}. Only the cluster's figures \
                 are reported."
            ));
        }
    }
    let moved = |name: &str| {
        section
            .figures
            .iter()
            .find(|f| f.case == format!("{name}-moved"))
            .map(|f| f.samples.iter().map(|&n| n as u64).collect::<Vec<_>>())
    };
    if let Some(m) = moved("cluster") {
        section.notes.push(format!(
            "Connections on the killed node whose pin differed from the Maglev pick, per \
             cluster trial: {m:?}."
        ));
    }
    if let Some(m) = moved("vrrp") {
        section.notes.push(format!(
            "The same on the VRRP master, per trial: {m:?}; the standby has no flow state, so \
             it sends each of them to the backend its Maglev table picks, which resets it."
        ));
    }
    section.figures.retain(|f| !f.case.ends_with("-moved"));
    Ok(vec![section])
}

fn run_trials(setup: &mut dyn Setup, first_port: u16) -> Result<Vec<Trial>> {
    (0..TRIALS)
        .map(|t| {
            interrupted()?;
            let trial = run_trial(setup, t, first_port)
                .with_context(|| format!("node-loss: {} trial {}", setup.name(), t + 1))?;
            eprintln!(
                "node-loss: {:<7} trial {:>2}: detection {:>4.0} ms; {} new connections, {} \
                 failed, {} slow; {} of {LONG_LIVED} long-lived reset ({} moved pins on the \
                 node), {} paused, longest pause {:.0} ms",
                setup.name(),
                t + 1,
                trial.detection_ms,
                trial.new_conns,
                trial.failed_new,
                trial.slow_new,
                trial.reset,
                trial.moved,
                trial.paused,
                trial.longest_pause_ms
            );
            Ok(trial)
        })
        .collect()
}

/// Long-lived connections after a backend change, load, a node's death,
/// more load; then the node comes back.
fn run_trial(setup: &mut dyn Setup, t: usize, first_port: u16) -> Result<Trial> {
    let ports = first_port + (t as u16) * LONG_LIVED;
    let (chatter, moved) = moved_connections(setup.cluster(), ports)?;
    let victim = setup.victim(&moved);
    let load = NewConns::start(setup.cluster(), 10_000 + (t as u16) * 500)?;
    std::thread::sleep(BEFORE);
    let detection = setup.kill(victim)?;
    std::thread::sleep(AFTER);
    let conns = load.stop();
    let (failed, longest) = chatter.summary();
    let chatter_paused = chatter
        .reports()
        .iter()
        .filter(|r| r.error.is_none() && r.longest_gap >= PAUSE)
        .count();
    drop(chatter);
    setup.restore(victim)?;
    Ok(Trial {
        detection_ms: detection.as_secs_f64() * 1000.0,
        new_conns: conns.len(),
        failed_new: conns.iter().filter(|c| c.failed).count(),
        slow_new: conns.iter().filter(|c| !c.failed && c.took >= SLOW).count(),
        reset: failed.len(),
        paused: chatter_paused,
        longest_pause_ms: longest.as_secs_f64() * 1000.0,
        moved: moved[victim - 1].unwrap_or(0),
    })
}

/// One new connection's outcome.
struct NewConn {
    took: Duration,
    failed: bool,
}

/// New connections from the client, one every `NEW_EVERY` from the next
/// source port, each on a thread of its own: one that waits for a lost
/// SYN holds up no other. Stopped on drop too, so an error leaves no
/// thread behind.
struct NewConns {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<NewConn>>>,
}

impl NewConns {
    fn start(c: &Cluster, first_port: u16) -> Result<Self> {
        let ns = std::fs::File::open(c.client.path())?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            // SAFETY: setns on a valid fd; affects only this thread, and
            // the threads it spawns share its namespaces.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!("setns: {}", std::io::Error::last_os_error());
            }
            let mut conns = Vec::new();
            let mut port = first_port;
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                conns.push(std::thread::spawn(move || {
                    let start = Instant::now();
                    let result = client::get(vip(), Some(port), CONNECT_TIMEOUT);
                    NewConn {
                        took: start.elapsed(),
                        failed: result.is_err(),
                    }
                }));
                port += 1;
                next += NEW_EVERY;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            conns.into_iter().filter_map(|t| t.join().ok()).collect()
        });
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    fn stop(mut self) -> Vec<NewConn> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.handle.take().expect("running");
        handle.join().unwrap_or_default()
    }
}

impl Drop for NewConns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Runs `xdplb ARGS` on every node that runs xdplb.
fn on_live_nodes(c: &Cluster, args: &[&str]) -> Result<()> {
    for d in c.daemons.iter().flatten() {
        d.cli(args)?;
    }
    Ok(())
}

/// b3 leaves every node's tables, `LONG_LIVED` connections open from
/// source ports `first_port..` (so all go to b1 and b2), b3 comes back.
/// Returns the chatting connections and, per node, how many of them it
/// carries with a pin that differs from what its Maglev table picks now.
fn moved_connections(c: &Cluster, first_port: u16) -> Result<(Chatter, Vec<Option<usize>>)> {
    let b3 = backend_addr(BACKENDS);
    on_live_nodes(c, &["backend", "remove", "web", &b3])?;
    let chatter = Chatter::start(c, first_port, LONG_LIVED);
    let reached: BTreeSet<&str> = chatter.backends.iter().map(String::as_str).collect();
    ensure!(
        reached == BTreeSet::from(["b1", "b2"]),
        "with b3 out of the tables the connections reached {reached:?}"
    );
    on_live_nodes(c, &["backend", "add", "web", &b3])?;
    let active = |d: &Xdplb| {
        d.json(&["status"])
            .is_ok_and(|s| s["backends_active"] == BACKENDS)
    };
    wait_until("b3 active on every node", Duration::from_secs(10), || {
        c.daemons.iter().flatten().all(active)
    });
    let clients: Vec<_> = chatter.reports().iter().map(|r| r.client).collect();
    let mut moved = Vec::new();
    for d in &c.daemons {
        let Some(d) = d else {
            moved.push(None);
            continue;
        };
        let mut n = 0;
        for &client in &clients {
            let f = d.flow(client, vip())?;
            if f["established"] == true
                && f["replicated"] == false
                && f["new_flow_backend"] != f["backend"]
            {
                n += 1;
            }
        }
        moved.push(Some(n));
    }
    Ok((chatter, moved))
}

/// The cluster: three nodes, ECMP over BGP+BFD, flow replication on.
struct ClusterSetup {
    c: Cluster,
    /// The killed node's daemon, dead but still owning its datapath.
    dead: Option<Xdplb>,
}

impl ClusterSetup {
    fn build() -> Result<Self> {
        let c = Cluster::build(Replication::On);
        let s = Self { c, dead: None };
        s.wait_peers_up();
        Ok(s)
    }

    /// Every node hears every peer (replication heartbeats).
    fn wait_peers_up(&self) {
        wait_until("every replication peer up", Duration::from_secs(10), || {
            (1..=NODES).all(|i| {
                self.c.daemon(i).json(&["status"]).is_ok_and(|s| {
                    s["replication"]["peers"]
                        .as_array()
                        .is_some_and(|p| p.iter().all(|p| p["state"] == "up"))
                })
            })
        });
    }
}

impl Setup for ClusterSetup {
    fn name(&self) -> &'static str {
        "cluster"
    }

    fn cluster(&self) -> &Cluster {
        &self.c
    }

    fn victim(&self, moved: &[Option<usize>]) -> usize {
        (1..=NODES).max_by_key(|&i| moved[i - 1]).unwrap_or(1)
    }

    /// The node's daemon and then its host die
    /// ([`Cluster::kill_daemon`], [`Cluster::cut_node`]), timed from the
    /// link cut.
    fn kill(&mut self, i: usize) -> Result<Duration> {
        self.dead = Some(self.c.kill_daemon(i));
        let (cut, _) = self.c.cut_node(i);
        Ok(cut.elapsed())
    }

    fn restore(&mut self, i: usize) -> Result<()> {
        let dead = self.dead.take().context("no dead node")?;
        self.c.reboot_node(i, dead);
        self.wait_peers_up();
        Ok(())
    }
}

/// keepalived VRRP active/standby: n1 (priority 150) and n2 (100), each
/// running xdplb alone; n3 runs nothing.
struct VrrpSetup {
    keepalived: Vec<Option<Proc>>,
    dead: Option<Xdplb>,
    xdplb: PathBuf,
    macs: Vec<String>,
    tag: String,
    dir: tools::TempDir,
    restarts: usize,
    /// Dropped last: processes above go first.
    c: Cluster,
}

/// xdplb's configuration on a VRRP node: the cluster's service and
/// backends, no `[cluster]` section.
fn single_node_conf() -> String {
    let mut c = format!(
        "[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\n\n\
         [service.health_check]\ninterval = \"500ms\"\n\n"
    );
    for b in 1..=BACKENDS {
        c += &format!("[[service.backend]]\naddress = \"{}\"\n\n", backend_addr(b));
    }
    c
}

/// keepalived's configuration on node `i` (1 is the master).
fn keepalived_conf(i: usize) -> String {
    let (state, priority) = if i == 1 {
        ("MASTER", 150)
    } else {
        ("BACKUP", 100)
    };
    format!(
        "global_defs {{\n  router_id n{i}\n  vrrp_version 3\n}}\n\
         vrrp_instance lb {{\n  state {state}\n  interface eth0\n  virtual_router_id 51\n  \
         priority {priority}\n  advert_int 0.1\n  virtual_ipaddress {{\n    {VRRP_ADDR}/24 dev \
         eth0\n  }}\n}}\n"
    )
}

impl VrrpSetup {
    fn build(opts: &Opts) -> Result<Self> {
        ensure!(
            xdplb_tests::which("keepalived"),
            "keepalived not found (Debian package keepalived)"
        );
        let mut c = Cluster::build(Replication::None);
        // No BGP: the router withdraws every node's route.
        for b in &mut c.node_birds {
            *b = None;
        }
        c.wait_next_hops(0, Duration::from_secs(10));
        for d in &mut c.daemons {
            *d = None;
        }
        let macs = (1..=NODES)
            .map(|i| c.nodes[i - 1].mac("eth0"))
            .collect::<Result<Vec<_>>>()?;
        let mut s = Self {
            keepalived: Vec::new(),
            dead: None,
            xdplb: opts.xdplb.clone(),
            macs,
            tag: unique_prefix("nlv"),
            dir: tools::TempDir::new("node-loss")?,
            restarts: 0,
            c,
        };
        for i in 1..=2 {
            s.c.daemons[i - 1] = Some(s.start_xdplb(i)?);
            s.keepalived.push(Some(s.start_keepalived(i)?));
        }
        s.c.router.exec(&[
            "ip",
            "route",
            "replace",
            &format!("{VIP}/32"),
            "via",
            VRRP_ADDR,
            "dev",
            "eth0",
        ])?;
        s.wait_master(1)?;
        Ok(s)
    }

    fn start_xdplb(&mut self, i: usize) -> Result<Xdplb> {
        self.restarts += 1;
        let tag = format!("{}-n{i}-{}", self.tag, self.restarts);
        Xdplb::start_in(
            &self.xdplb,
            &self.c.nodes[i - 1],
            &["eth0"],
            &tag,
            &single_node_conf(),
        )
    }

    fn start_keepalived(&self, i: usize) -> Result<Proc> {
        let dir = self.dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("keepalived.conf");
        std::fs::write(&conf, keepalived_conf(i))?;
        let mut cmd = self.c.nodes[i - 1].command("keepalived");
        cmd.arg("--dont-fork")
            .arg("--log-console")
            .arg("--no-syslog")
            .arg("--vrrp")
            .arg("--dont-respawn")
            .arg("--use-file")
            .arg(&conf)
            .arg("--pid")
            .arg(dir.join("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(dir.join("vrrp.pid"));
        Proc::spawn_with(&mut cmd, &format!("keepalived-n{i}"), false)
    }

    /// Whether node `i` holds the virtual address.
    fn holds(&self, i: usize) -> bool {
        self.c.nodes[i - 1]
            .exec(&["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
            .is_ok_and(|out| out.contains(&format!("inet {VRRP_ADDR}/")))
    }

    /// The MAC the router's neighbour entry for the virtual address names.
    fn router_neighbour(&self) -> Option<String> {
        let out = self
            .c
            .router
            .exec(&["ip", "-j", "neigh", "show", VRRP_ADDR, "dev", "eth0"])
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(out.trim()).ok()?;
        v.as_array()?.first()?["lladdr"].as_str().map(str::to_owned)
    }

    /// Waits until node `i` alone holds the virtual address and the router
    /// sends to it (its neighbour entry learned afresh).
    fn wait_master(&self, i: usize) -> Result<()> {
        let other = 3 - i;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.holds(i) || self.holds(other) {
            if Instant::now() > deadline {
                bail!(
                    "n{i} is not the only VRRP master after 10 s\n{}",
                    self.keepalived_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self
            .c
            .router
            .exec(&["ip", "neigh", "flush", "to", VRRP_ADDR, "dev", "eth0"]);
        let _ = self
            .c
            .router
            .exec(&["ping", "-n", "-q", "-c1", "-W1", VRRP_ADDR]);
        let want = &self.macs[i - 1];
        ensure!(
            self.router_neighbour().as_ref() == Some(want),
            "the router's neighbour entry for {VRRP_ADDR} is {:?}, not n{i}'s {want}",
            self.router_neighbour()
        );
        Ok(())
    }

    fn keepalived_logs(&self) -> String {
        self.keepalived
            .iter()
            .flatten()
            .map(|p| format!("--- {} ---\n{}", p.label(), p.output_text()))
            .collect()
    }
}

/// SIGKILLs `p` and its children (keepalived's VRRP process), children
/// first.
fn kill_tree(p: &mut Proc) -> Result<()> {
    let pid = p.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children.split_whitespace() {
        if let Ok(child) = child.parse::<libc::pid_t>() {
            // SAFETY: plain syscall; the child is not reaped by us, and its
            // parent (alive until the kill below) has not reaped it either.
            unsafe { libc::kill(child, libc::SIGKILL) };
        }
    }
    p.kill(libc::SIGKILL)?;
    let _ = p.wait_timeout(Duration::from_secs(5));
    Ok(())
}

impl Setup for VrrpSetup {
    fn name(&self) -> &'static str {
        "vrrp"
    }

    fn cluster(&self) -> &Cluster {
        &self.c
    }

    fn victim(&self, _moved: &[Option<usize>]) -> usize {
        1
    }

    fn kill(&mut self, i: usize) -> Result<Duration> {
        let mut daemon = self.c.daemons[i - 1].take().context("node is alive")?;
        daemon.proc.kill(libc::SIGKILL)?;
        let _ = daemon.proc.wait_timeout(Duration::from_secs(5));
        self.dead = Some(daemon);
        self.c
            .switch
            .exec(&["ip", "link", "set", &format!("v-n{i}"), "down"])?;
        let cut = Instant::now();
        let mut k = self.keepalived[i - 1].take().context("keepalived runs")?;
        kill_tree(&mut k)?;
        let standby = &self.macs[2 - i];
        let deadline = cut + Duration::from_secs(10);
        while self.router_neighbour().as_ref() != Some(standby) {
            if Instant::now() > deadline {
                bail!(
                    "the router's neighbour entry for {VRRP_ADDR} is still {:?} 10 s after the \
                     cut\n{}",
                    self.router_neighbour(),
                    self.keepalived_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(cut.elapsed())
    }

    fn restore(&mut self, i: usize) -> Result<()> {
        drop(self.dead.take());
        let ns = &self.c.nodes[i - 1];
        // The killed keepalived left the address behind.
        let _ = ns.exec(&[
            "ip",
            "addr",
            "del",
            &format!("{VRRP_ADDR}/24"),
            "dev",
            "eth0",
        ]);
        self.c
            .switch
            .exec(&["ip", "link", "set", &format!("v-n{i}"), "up"])?;
        for b in 1..=BACKENDS {
            wait_until("backend reachable", Duration::from_secs(10), || {
                ns.exec(&["ping", "-n", "-q", "-c1", "-W1", &backend_addr(b)])
                    .is_ok()
            });
        }
        self.c.daemons[i - 1] = Some(self.start_xdplb(i)?);
        self.keepalived[i - 1] = Some(self.start_keepalived(i)?);
        self.wait_master(i)
    }
}

fn figures(name: &str, trials: &[Trial]) -> Vec<Figure> {
    let fig = |case: &str, unit: &str, f: fn(&Trial) -> f64| {
        Figure::new(
            GROUP,
            &format!("{name}-{case}"),
            unit,
            trials.iter().map(f).collect(),
            false,
        )
    };
    let new_conns: usize = trials.iter().map(|t| t.new_conns).sum();
    let worst = |f: fn(&Trial) -> f64| trials.iter().map(f).fold(0.0, f64::max);
    let mut detection = fig("detection", "ms", |t| t.detection_ms);
    let mut reset = fig("reset", "connections", |t| t.reset as f64)
        .note(format!("of {LONG_LIVED} long-lived connections per trial"));
    if name == "cluster" {
        detection = detection.target(
            "every trial < 1000 ms (BFD: 3 x 100 ms, plus the router's update)",
            worst(|t| t.detection_ms) < 1000.0,
        );
        reset = reset.target(
            "0 in every trial (replicated flow state)",
            worst(|t| t.reset as f64) == 0.0,
        );
    }
    vec![
        detection,
        fig("failed-new", "connections", |t| t.failed_new as f64).note(format!(
            "of {new_conns} new connections in all trials (about {} per trial)",
            new_conns / trials.len().max(1)
        )),
        fig("slow-new", "connections", |t| t.slow_new as f64),
        reset,
        fig("paused", "connections", |t| t.paused as f64),
        fig("longest-pause", "ms", |t| t.longest_pause_ms),
        fig("moved", "connections", |t| t.moved as f64),
    ]
}
