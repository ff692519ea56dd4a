//! `cargo xtask demo`: the load balancer end to end in veth namespaces.
//!
//! Builds a client, a load balancer and three backends (real HTTP servers
//! with the VIP on loopback) on one L2 segment, runs `xdplb` in native XDP
//! mode, sends a few hundred real connections to the VIP, and shows how
//! they were spread, where a sample flow goes, and the datapath counters.
//! Then a three-node cluster behind a BIRD router loses the node carrying
//! the most connections, under load, and none of them is lost.
//! Everything is torn down at the end, on error, and on Ctrl-C.

use std::{
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use xdplb_tests::{
    bin_path,
    cluster::{hard_case, vip, Cluster, Replication, LONG_LIVED, NODES, VIP},
    lb::{dsr_config_with, failures, start_backend, start_backends, Load, Tally, Xdplb},
    require_root,
    topology::{Shape, Topology},
    traffic::requests,
};

/// The demo's health check: fast enough to watch.
const HEALTH_CHECK: &str =
    "type = \"tcp\"\ninterval = \"500ms\"\ntimeout = \"250ms\"\nrise = 2\nfall = 3";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Fails once Ctrl-C was pressed, so `?` unwinds through the drops that
/// tear the topology down.
fn check_interrupt() -> Result<()> {
    ensure!(!INTERRUPTED.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

fn main() -> ExitCode {
    require_root();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("demo failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `text` indented, line by line.
fn show(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

fn print_tally(label: &str, tally: &Tally, total: usize) {
    println!(
        "  {label}: {} of {total} connections answered, {} failed",
        tally.ok(),
        tally.failed.len()
    );
    for (name, n) in &tally.served {
        let share = 100.0 * *n as f64 / total as f64;
        println!(
            "    {name}  {n:>4}  {share:5.1}%  {}",
            "#".repeat((share / 2.0).round() as usize)
        );
    }
    for (port, err) in tally.failed.iter().take(5) {
        println!("    failed from port {port}: {err}");
    }
}

fn demo() -> Result<()> {
    let xdplb = bin_path("xdplb")?;
    let testbackend = bin_path("xdplb-testbackend")?;

    println!(
        "xdplb demo: client -> XDP load balancer (Maglev, direct server return) -> 3 HTTP backends"
    );
    let mut topo = Topology::new(Shape::Dsr, "demo", 3).context("building the veth topology")?;
    println!(
        "  topology {}: client {} / {}, load balancer {} / {}, backends {}..{}, one L2 segment",
        topo.prefix(),
        topo.client_addr(false),
        topo.client_addr(true),
        topo.lb_addr(false),
        topo.lb_addr(true),
        topo.backend_addr(1, false),
        topo.backend_addr(topo.backend_count(), false),
    );
    topo.enable_xdp_tx(&xdplb)?;
    let mut backends = start_backends(&topo, &testbackend)?;
    topo.wait_reachable()?;
    println!(
        "  backends b1 b2 b3 serve HTTP on :80 with VIPs {} and {} on loopback",
        topo.vip4(),
        topo.vip6()
    );
    check_interrupt()?;

    let lb = Xdplb::start(&xdplb, &topo, &dsr_config_with(&topo, HEALTH_CHECK))?;
    println!(
        "  xdplb attached to {}/{} in native XDP mode; maps pinned in {}",
        topo.lb().name(),
        topo.lb_iface(),
        lb.pin_dir.display()
    );
    check_interrupt()?;

    let vip4: IpAddr = topo.vip4().into();
    let (first, count) = (40000u16, 300u16);
    println!(
        "\n  {count} TCP connections to http://{vip4}:80/ from source ports {first}..{}",
        first + count - 1
    );
    let tally = requests(
        topo.client(),
        SocketAddr::new(vip4, 80),
        first..first + count,
    );
    print_tally("IPv4", &tally, count.into());
    check_interrupt()?;

    let vip6: IpAddr = topo.vip6().into();
    println!("\n  100 TCP connections to http://[{vip6}]:80/");
    let tally6 = requests(topo.client(), SocketAddr::new(vip6, 80), 41000..41100);
    print_tally("IPv6", &tally6, 100);
    check_interrupt()?;

    let src = SocketAddr::new(topo.client_addr(false), first);
    let again = requests(topo.client(), SocketAddr::new(vip4, 80), first..first + 1);
    println!("\n  sample flow: {src} -> {vip4}:80");
    println!("    $ xdplb flow {src} {vip4}:80 tcp");
    show(&lb.cli(&["flow", &src.to_string(), &format!("{vip4}:80"), "tcp"])?);
    println!(
        "    the same source port again was served by: {}",
        again.served.keys().next().map_or("nobody", |s| s.as_str())
    );

    println!("\n  $ xdplb stats");
    show(&lb.cli(&["stats"])?);

    check_interrupt()?;
    failover(&topo, &lb, &mut backends, &testbackend)?;

    println!("\n  tearing down (xdplb detaches, namespaces removed)");
    let failed = tally.failed.len() + tally6.failed.len();
    drop(lb);
    drop(topo);
    if failed > 0 {
        bail!("{failed} connections failed");
    }
    check_interrupt()?;
    cluster_node_loss()?;
    println!("done");
    Ok(())
}

/// Three xdplb nodes behind a BIRD router (ECMP over BGP+BFD), replicating
/// flow state; the node carrying the most connections dies under load.
fn cluster_node_loss() -> Result<()> {
    println!(
        "\nxdplb cluster demo: client -> router (BIRD, ECMP over BGP+BFD) -> 3 xdplb nodes \
         replicating flows -> 3 backends"
    );
    let mut c = Cluster::build(Replication::On);
    println!("  the router's next hops for {VIP}: {:?}", c.next_hops());
    println!(
        "\n  b3 leaves the tables; {LONG_LIVED} long-lived connections open (on b1 and b2), \
         exchanging a line every 50 ms; b3 comes back"
    );
    let (chatter, victim, moved) = hard_case(&c);
    println!(
        "  n{victim} carries {} connections whose backend is no longer Maglev's pick; every \
         node holds every connection's pin (replicated):",
        moved.len()
    );
    if let Some(client) = moved.first() {
        for i in 1..=NODES {
            let f = c.flow(i, *client);
            let text = |k: &str| f[k].as_str().unwrap_or("-").to_owned();
            println!(
                "    n{i}: {client} -> backend {} (replicated: {}, a new flow would go to {})",
                text("backend"),
                f["replicated"],
                text("new_flow_backend")
            );
        }
    }
    check_interrupt()?;
    let load = Load::start_in(&c.client, vip(), Duration::from_millis(10), 30000)?;
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "\n  and a new connection every 10 ms; n{victim} dies now (xdplb and BIRD SIGKILLed, \
         link down)"
    );
    let (_dead, withdrawn) = c.kill_node(victim);
    std::thread::sleep(Duration::from_secs(2));
    let samples = load.stop();
    let (failed, longest) = chatter.summary();
    let new_failed = failures(&samples).len();
    println!(
        "  BFD: the router withdrew n{victim} {} ms after its link went down",
        withdrawn.as_millis()
    );
    println!(
        "  long-lived connections: {} of {LONG_LIVED} lost, longest pause {} ms",
        failed.len(),
        longest.as_millis()
    );
    println!(
        "  new connections: {new_failed} of {} failed (a SYN hashed to n{victim} before the \
         withdrawal is retried by the client's TCP)",
        samples.len()
    );
    let survivor = if victim == 1 { 2 } else { 1 };
    println!("\n  $ xdplb status   (on n{survivor})");
    show(&c.daemon(survivor).cli(&["status"])?);
    println!("\n  tearing down the cluster");
    if !failed.is_empty() {
        bail!("{} long-lived connections were lost", failed.len());
    }
    Ok(())
}

/// Kills a backend's server under load and shows the failover, then brings
/// it back.
fn failover(
    topo: &Topology,
    lb: &Xdplb,
    backends: &mut [xdplb_tests::proc::Proc],
    testbackend: &std::path::Path,
) -> Result<()> {
    println!("\n  failover (health check: tcp every 500ms, fall 3, rise 2)");
    println!("    $ xdplb status");
    show(&lb.cli(&["status"])?);
    let vip = SocketAddr::new(topo.vip4().into(), 80);
    let victim = topo.backend_addr(2, false);
    let health = |want: &str| -> Result<bool> { Ok(lb.backend("web4", victim)?["health"] == want) };

    let load = Load::start(topo, vip, Duration::from_millis(10), 20000)?;
    std::thread::sleep(Duration::from_millis(500));
    println!("\n    steady load: a new connection every 10 ms; killing b2's server ({victim}) now");
    let killed = Instant::now();
    backends[1].kill(libc::SIGKILL)?;
    while !health("down")? {
        check_interrupt()?;
        std::thread::sleep(Duration::from_millis(5));
    }
    let moved = killed.elapsed();
    std::thread::sleep(Duration::from_millis(1000));
    let samples = load.stop();
    let swap = killed + moved;
    // Failed requests that started at a time `when` accepts.
    let failed = |when: &dyn Fn(Instant) -> bool| {
        failures(&samples).iter().filter(|s| when(s.start)).count()
    };
    let failed_before = failed(&|t| t < swap);
    let failed_after = failed(&|t| t >= swap);
    let others_failed = failed(&|t| t < killed);
    println!(
        "    b2 marked down and its traffic moved {} ms after the kill",
        moved.as_millis()
    );
    println!(
        "    {} requests: {failed_before} failed before the swap (flows hashed to the dead \
         b2), {failed_after} after it, {others_failed} before the kill",
        samples.len()
    );
    println!("    $ xdplb backend list web4");
    show(&lb.cli(&["backend", "list", "web4"])?);

    let restarted = Instant::now();
    backends[1] = start_backend(topo, testbackend, 2, &[])?;
    while !health("up")? {
        check_interrupt()?;
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "\n    b2's server restarted: back in the table {} ms later",
        restarted.elapsed().as_millis()
    );
    let tally = requests(topo.client(), vip, 45000..45150);
    print_tally("after recovery", &tally, 150);
    if failed_after > 0 || others_failed > 0 {
        bail!("requests failed outside the failover window");
    }
    Ok(())
}
