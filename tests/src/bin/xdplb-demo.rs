//! `cargo xtask demo`: the load balancer end to end in veth namespaces.
//!
//! Builds a client, a load balancer and three backends (real HTTP servers
//! with the VIP on loopback) on one L2 segment, runs `xdplb` in native XDP
//! mode, sends a few hundred real connections to the VIP, and shows how
//! they were spread, where a sample flow goes, and the datapath counters.
//! Everything is torn down at the end, on error, and on Ctrl-C.

use std::{
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context as _, Result};
use xdplb_tests::{
    bin_path,
    lb::{dsr_config, requests, start_backends, Tally, Xdplb},
    require_root,
    topology::DsrTopology,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Fails once Ctrl-C was pressed, so `?` unwinds through the drops that
/// tear the topology down.
fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
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

fn print_tally(label: &str, tally: &Tally, total: usize) {
    println!("  {label}: {} of {total} connections answered, {} failed", tally.ok(), tally.failed.len());
    for (name, n) in &tally.served {
        let share = 100.0 * *n as f64 / total as f64;
        println!("    {name}  {n:>4}  {share:5.1}%  {}", "#".repeat((share / 2.0).round() as usize));
    }
    for (port, err) in tally.failed.iter().take(5) {
        println!("    failed from port {port}: {err}");
    }
}

fn demo() -> Result<()> {
    let xdplb = bin_path("xdplb")?;
    let testbackend = bin_path("xdplb-testbackend")?;

    println!("xdplb demo: client -> XDP load balancer (Maglev, direct server return) -> 3 HTTP backends");
    let mut topo = DsrTopology::with_tag("demo", 3).context("building the veth topology")?;
    println!(
        "  topology {}: client {} / {}, load balancer {} / {}, backends {}..{}, one L2 segment",
        topo.prefix(),
        topo.client_addr4(),
        topo.client_addr6(),
        topo.lb_addr4(),
        topo.lb_addr6(),
        topo.backend_addr4(1),
        topo.backend_addr4(topo.backend_count()),
    );
    topo.enable_xdp_tx(&xdplb)?;
    let _backends = start_backends(&topo, &testbackend)?;
    topo.wait_reachable()?;
    println!("  backends b1 b2 b3 serve HTTP on :80 with VIPs {} and {} on loopback", topo.vip4(), topo.vip6());
    check_interrupt()?;

    let lb = Xdplb::start(&xdplb, &topo, &dsr_config(&topo))?;
    println!("  xdplb attached to {}/{} in native XDP mode; maps pinned in {}", topo.lb().name(), topo.lb_iface(), lb.pin_dir.display());
    check_interrupt()?;

    let vip4: IpAddr = topo.vip4().into();
    let (first, count) = (40000u16, 300u16);
    println!("\n  {count} TCP connections to http://{vip4}:80/ from source ports {first}..{}", first + count - 1);
    let tally = requests(&topo, vip4, first..first + count);
    print_tally("IPv4", &tally, count.into());
    check_interrupt()?;

    let vip6: IpAddr = topo.vip6().into();
    println!("\n  100 TCP connections to http://[{vip6}]:80/");
    let tally6 = requests(&topo, vip6, 41000..41100);
    print_tally("IPv6", &tally6, 100);
    check_interrupt()?;

    let src = SocketAddr::new(topo.client_addr4().into(), first);
    let again = requests(&topo, vip4, first..first + 1);
    println!("\n  sample flow: {src} -> {vip4}:80");
    println!("    $ xdplb flow {src} {vip4}:80 tcp");
    for line in lb.cli(&["flow", &src.to_string(), &format!("{vip4}:80"), "tcp"])?.lines() {
        println!("    {line}");
    }
    println!("    the same source port again was served by: {}", again.served.keys().next().map_or("nobody", |s| s.as_str()));

    println!("\n  $ xdplb stats");
    for line in lb.cli(&["stats"])?.lines() {
        println!("    {line}");
    }

    println!("\n  tearing down (xdplb detaches, namespaces removed)");
    let failed = tally.failed.len() + tally6.failed.len();
    drop(lb);
    drop(topo);
    if failed > 0 {
        bail!("{failed} connections failed");
    }
    println!("done");
    Ok(())
}
