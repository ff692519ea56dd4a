//! Announcement rules on one node (no BIRD needed): the daemon keeps a
//! servable VIP's host route in `[cluster] route_table`, withdraws it when
//! no backend can take new flows (with `all_down = "drop"`), keeps it while
//! failing open, brings it back on recovery, follows a reload that changes
//! or drops the table, and keeps its "left" state across a restart. The
//! DSR testbed, the real daemon and real health checks; needs root.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use xdplb_tests::{
    bed::served,
    bin_path,
    lb::{dsr_config, dsr_config_with, start_backend, start_backends, Xdplb},
    netns::exec_line,
    require_root,
    topology::{Shape, Topology},
};

const TESTBACKEND: &str = env!("CARGO_BIN_EXE_xdplb-testbackend");

/// Polls `table` in the lb namespace until `want(routes)` holds.
fn wait_table(topo: &Topology, table: &str, what: &str, want: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let all = ["-4", "-6"]
            .map(|family| {
                let show = ["ip", family, "route", "show", "table", table];
                topo.lb().exec(&show).unwrap_or_default()
            })
            .concat();
        if want(&all) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: table {table} holds {all:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vip_is_announced_exactly_while_the_node_can_serve_it() {
    require_root();
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let topo = Topology::new(Shape::Dsr, "ann", 1).unwrap();
    let mut backends = start_backends(&topo, Path::new(TESTBACKEND)).unwrap();
    topo.wait_reachable().unwrap();
    let services = dsr_config_with(
        &topo,
        "interval = \"200ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 2",
    );
    let config = |table: Option<u32>| {
        let cluster = table.map_or(String::new(), |t| format!("[cluster]\nroute_table = {t}\n"));
        format!("[daemon]\nall_down = \"drop\"\n{cluster}\n{services}")
    };
    let (vip4, vip6) = (topo.vip4().to_string(), topo.vip6().to_string());
    let both = |r: &str| r.contains(&vip4) && r.contains(&vip6);
    let none = |r: &str| !r.contains(&vip4) && !r.contains(&vip6);
    let reload = |lb: &Xdplb, table| {
        lb.write_config(&config(table)).unwrap();
        lb.cli(&["reload"]).unwrap();
    };
    let mut lb = Xdplb::start(&xdplb, &topo, &config(Some(201))).unwrap();
    wait_table(&topo, "201", "announced at start", both);
    let routes = exec_line(topo.lb(), "ip route show table 201");
    assert!(
        routes.contains(&format!("{vip4} dev lo proto static")),
        "{routes}"
    );

    // Its only backend dies: nothing can serve the VIPs (all_down = drop).
    backends[0].kill(libc::SIGKILL).unwrap();
    wait_table(&topo, "201", "withdrawn when every backend is down", none);
    // Failing open, the node still serves (the datapath spreads new flows
    // over every backend), so the VIPs are announced with the backend
    // still down, and withdrawn again once all_down is "drop".
    let fail_open = config(Some(201)).replace("all_down = \"drop\"", "all_down = \"fail-open\"");
    lb.write_config(&fail_open).unwrap();
    lb.cli(&["reload"]).unwrap();
    wait_table(&topo, "201", "announced while failing open", both);
    reload(&lb, Some(201));
    wait_table(&topo, "201", "withdrawn again with all_down = drop", none);
    backends[0] = start_backend(&topo, Path::new(TESTBACKEND), 1, &[]).unwrap();
    wait_table(&topo, "201", "announced again on recovery", both);

    // A reload moves the routes to another table, then drops announcement.
    reload(&lb, Some(202));
    wait_table(&topo, "202", "moved to the new table", both);
    wait_table(&topo, "201", "gone from the old table", none);
    reload(&lb, None);
    wait_table(&topo, "202", "withdrawn when route_table is unset", none);
    let err = lb.cli(&["cluster", "join"]).unwrap_err();
    assert!(
        format!("{err:#}").contains("no [cluster] route_table"),
        "{err:#}"
    );

    // Left survives a restart of the daemon.
    reload(&lb, Some(201));
    wait_table(&topo, "201", "announced again", both);
    lb.cli(&["cluster", "leave", "--no-wait"]).unwrap();
    wait_table(&topo, "201", "withdrawn on leave", none);
    lb.proc.kill(libc::SIGKILL).unwrap();
    let _ = lb.proc.wait_timeout(Duration::from_secs(5));
    lb.restart(&topo).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    wait_table(&topo, "201", "still withdrawn after a restart", none);
    let status = lb.json(&["status"]).unwrap();
    assert_eq!(status["cluster"]["state"], "left", "{status}");
    lb.cli(&["cluster", "join"]).unwrap();
    wait_table(&topo, "201", "announced on join", both);
}

/// `xdplb cluster leave` waits for the new-flow counters to stay flat,
/// then says the node is safe to stop. A `join` meanwhile (another
/// operator, a script) announces the node again: leave must fail then,
/// not call an announced node safe to stop.
#[test]
fn leave_fails_when_the_node_joins_again_while_it_waits() {
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let (topo, _backends) = served(Shape::Dsr, "anj", 1, &xdplb, Path::new(TESTBACKEND));
    let config = format!("[cluster]\nroute_table = 201\n\n{}", dsr_config(&topo));
    let lb = Xdplb::start(&xdplb, &topo, &config).unwrap();
    let vip4 = topo.vip4().to_string();
    wait_table(&topo, "201", "announced at start", |r| r.contains(&vip4));
    // The waiting leave runs beside (Xdplb is not shared between threads).
    let mut leave = std::process::Command::new(&xdplb);
    leave.args(["cluster", "leave", "--quiet", "2", "--socket"]);
    let leave = leave.arg(lb.socket()).stdout(std::process::Stdio::piped());
    let leave = leave.stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_table(&topo, "201", "withdrawn on leave", |r| !r.contains(&vip4));
    lb.cli(&["cluster", "join"]).unwrap();
    let out = leave.wait_with_output().unwrap();
    wait_table(&topo, "201", "announced on join", |r| r.contains(&vip4));
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "leave succeeded after a join: {said}"
    );
    assert!(said.contains("joined again"), "{said}");
}
