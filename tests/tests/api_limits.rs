//! The control API under abuse, against the real daemon: many connections
//! that announce large bodies and never send them must neither grow the
//! daemon's memory by what they announce nor lock the operator out.
//! Needs root.

use std::{
    io::{ErrorKind, Write as _},
    os::unix::net::UnixStream,
    process::Command,
    time::{Duration, Instant},
};

use xdplb_tests::{
    bin_path,
    lb::Xdplb,
    require_root,
    topology::{Shape, Topology},
};

const CONNECTIONS: usize = 900;
const ANNOUNCED: usize = 1024 * 1024;
/// What the daemon may grow by: 900 connections' worth of buffers and
/// tasks, far below the 900 MiB they announce.
const RSS_GROWTH_LIMIT_KIB: u64 = 40 * 1024;

/// The daemon's resident set size, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[test]
fn connections_announcing_big_bodies_do_not_grow_the_daemon_nor_block_status() {
    require_root();
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let mut topo = Topology::new(Shape::Dsr, "lim", 1).expect("topology");
    topo.enable_xdp_tx(&xdplb)
        .expect("pass-through on the lb's peer");
    let config = format!(
        "[[service]]\nname = \"web\"\nvip = \"{}\"\nport = 80\nprotocol = \"tcp\"\n\n\
         [[service.backend]]\naddress = \"{}\"\n",
        topo.vip4(),
        topo.backend_addr(1, false)
    );
    let lb = Xdplb::start(&xdplb, &topo, &config).expect("xdplb");
    let pid = lb.proc.pid();
    let start = Instant::now();
    lb.json(&["status"]).expect("status before");
    let unloaded = start.elapsed();
    // Plain curl speaks to the socket too.
    let curl = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--unix-socket"])
        .arg(lb.socket())
        .arg("http://localhost/v1/status")
        .output()
        .expect("running curl");
    let answer: serde_json::Value = serde_json::from_slice(&curl.stdout)
        .unwrap_or_else(|e| panic!("curl: {e}: {}", String::from_utf8_lossy(&curl.stderr)));
    assert_eq!(answer["services"], 1, "{answer}");
    let before = rss_kib(pid);

    // Each connection announces 1 MiB and sends 4 KiB of it, then stalls.
    let head = format!(
        "POST /v1/services/add HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {ANNOUNCED}\r\n\r\n{{\"name\": \"{}",
        "x".repeat(4096)
    );
    let mut held = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let mut stream =
            UnixStream::connect(lb.socket()).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        stream.set_nonblocking(true).unwrap();
        match stream.write_all(head.as_bytes()) {
            Ok(()) => {}
            // The daemon closed it already (evicted to make room).
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("connection {i}: {e}"),
        }
        held.push(stream);
    }

    // The operator still gets an answer, at once: the stalled connections
    // are evicted, not waited out (their timeout is 10 s).
    let start = Instant::now();
    let status = lb.json(&["status"]).expect("status while stalled");
    let took = start.elapsed();
    assert_eq!(status["services"], 1, "{status}");
    assert!(
        took < Duration::from_secs(5),
        "status took {took:?} (bound 5 s)"
    );
    // Give the daemon time to accept the backlog it can.
    std::thread::sleep(Duration::from_millis(500));
    let during = rss_kib(pid);
    eprintln!(
        "daemon RSS: {before} KiB before, {during} KiB with {CONNECTIONS} stalled connections \
         announcing {ANNOUNCED} bytes each; status answered in {took:?} ({unloaded:?} before)"
    );
    assert!(
        during.saturating_sub(before) < RSS_GROWTH_LIMIT_KIB,
        "RSS grew from {before} KiB to {during} KiB (limit +{RSS_GROWTH_LIMIT_KIB} KiB)"
    );
    drop(held);
    lb.json(&["status"]).expect("status after");
}
