//! The daemon's life cycle with the real binary in veth namespaces: one
//! daemon per pin directory, `detach` under a running daemon, `ip netns
//! exec`, the open-files limit, systemd notifications, the attach error
//! in auto mode, plain-text logs. Needs root.

use std::{
    iter::repeat_with,
    os::unix::{net::UnixDatagram, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use xdplb_tests::{
    bed::Bed,
    bin_path,
    client::restarting,
    lb::{dsr_config, start_backends, Xdplb},
    netns::{exec_line, unique_prefix},
    proc::Proc,
    require_root,
    topology::{Shape, Topology},
    RemoveOnDrop,
};

const TESTBACKEND: &str = env!("CARGO_BIN_EXE_xdplb-testbackend");

/// A topology (one backend) and the path of the xdplb binary.
fn topology(tag: &str) -> (Topology, PathBuf) {
    require_root();
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let topo = Topology::new(Shape::Dsr, tag, 1).expect("topology");
    (topo, xdplb)
}

/// `xdplb run --xdp-mode native` on the lb's interface with `lb`'s config,
/// `pin_dir`, `socket` and `state`, to spawn in the lb namespace.
fn run_cmd(xdplb: &Path, topo: &Topology, lb: &Xdplb, files: [&Path; 3]) -> Command {
    let mut cmd = topo.lb().command(xdplb);
    cmd.args(["run", "--xdp-mode", "native", "--iface", topo.lb_iface()]);
    let [pin_dir, socket, state] = files;
    with_files(&mut cmd, [&lb.config_path(), pin_dir, socket, state]);
    cmd
}

/// Adds `--config`, `--pin-dir`, `--api-socket` and `--state-file` with
/// `paths` to `cmd`.
fn with_files(cmd: &mut Command, paths: [&Path; 4]) {
    let flags = ["--config", "--pin-dir", "--api-socket", "--state-file"];
    for (flag, path) in flags.into_iter().zip(paths) {
        cmd.arg(flag).arg(path);
    }
}

/// A fresh directory holding an empty `xdplb.toml`, and an unused pin
/// directory, both named after a unique prefix and removed on drop.
struct Scratch {
    dir: RemoveOnDrop,
    pins: RemoveOnDrop,
}

impl Scratch {
    fn new(tag: &str) -> Self {
        let prefix = unique_prefix(tag);
        let dir = std::env::temp_dir().join(format!("xdplb-{prefix}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("xdplb.toml"), "").unwrap();
        let pins = PathBuf::from(format!("/sys/fs/bpf/xdplb-{prefix}"));
        Self {
            dir: RemoveOnDrop(dir),
            pins: RemoveOnDrop(pins),
        }
    }

    /// Adds the scratch files to `cmd` (see [`with_files`]).
    fn add_to(&self, cmd: &mut Command) {
        let dir = &self.dir.0;
        let (config, socket, state) = (
            dir.join("xdplb.toml"),
            dir.join("api.sock"),
            dir.join("state.json"),
        );
        with_files(cmd, [&config, &self.pins.0, &socket, &state]);
    }
}

/// Runs `cmd` to its end (at most 20 s; killed then) and returns whether it
/// succeeded, and its output.
fn run_to_end(cmd: &mut Command) -> (bool, String) {
    let mut proc = Proc::spawn(cmd).unwrap();
    let status = proc.wait_timeout(Duration::from_secs(20)).unwrap();
    proc.drain_output(Duration::from_secs(2));
    let text = proc.output().join("\n");
    let Some(status) = status else {
        let _ = proc.terminate();
        panic!("still running after 20 s (it should have refused to start):\n{text}");
    };
    (status.success(), text)
}

/// The ids of the XDP programs on the lb's interface.
fn xdp_ids(topo: &Topology) -> String {
    let show = format!("ip -j link show dev {}", topo.lb_iface());
    let out = exec_line(topo.lb(), &show);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["xdp"].to_string()
}

#[test]
fn one_daemon_per_pin_dir_and_a_killed_daemons_successor_starts() {
    let (topo, xdplb) = topology("lock");
    let mut lb = Xdplb::start(&xdplb, &topo, "").expect("xdplb");
    let attached = xdp_ids(&topo);
    assert!(attached.contains("\"id\""), "{attached}");

    // Same pin directory, its own socket and state: refused, naming the
    // holder, and touching nothing.
    let (other_socket, state2) = (lb.dir.join("other.sock"), lb.dir.join("state2.json"));
    let mut cmd = run_cmd(&xdplb, &topo, &lb, [&lb.pin_dir, &other_socket, &state2]);
    let (ok, text) = run_to_end(&mut cmd);
    assert!(!ok, "a second daemon started on the same pin dir:\n{text}");
    let pid = format!("PID {}", lb.proc.pid());
    assert!(
        text.contains(&pid) && text.contains("already drives"),
        "error should name {pid}:\n{text}"
    );
    assert!(!other_socket.exists(), "the refused daemon made a socket");
    assert_eq!(xdp_ids(&topo), attached, "the refused daemon touched XDP");
    assert!(lb.pin_dir.join("links").join(topo.lb_iface()).exists());
    assert!(
        lb.json(&["status"]).is_ok(),
        "the first daemon stopped answering"
    );

    // Another pin directory but the live daemon's socket: refused before
    // anything is made, and the live socket is never removed.
    let other_pins = PathBuf::from(format!("{}-other", lb.pin_dir.display()));
    let _other_pins = RemoveOnDrop(other_pins.clone());
    let mut cmd = run_cmd(&xdplb, &topo, &lb, [&other_pins, &lb.socket(), &state2]);
    let (ok, text) = run_to_end(&mut cmd);
    assert!(!ok, "a second daemon started on a live socket:\n{text}");
    assert!(text.contains("already serving"), "{text}");
    assert!(!other_pins.exists(), "the refused daemon made pins");
    let status = lb
        .json(&["status"])
        .expect("the live daemon's socket survives");
    assert_eq!(status["pid"], lb.proc.pid(), "{status}");

    // The kernel drops the lock with its holder: after SIGKILL, the next
    // daemon starts (and adopts the datapath).
    lb.proc.kill(libc::SIGKILL).unwrap();
    lb.proc.wait_timeout(Duration::from_secs(5)).unwrap();
    lb.restart(&topo)
        .expect("the successor of a SIGKILLed daemon starts");
    let status = lb.json(&["status"]).unwrap();
    assert_eq!(status["interfaces"][0]["mode"], "adopted", "{status}");
    assert_eq!(status["pid"], lb.proc.pid(), "{status}");
}

#[test]
fn detach_is_refused_under_a_daemon_and_a_forced_detach_is_repaired() {
    let (topo, xdplb) = topology("detach");
    let lb = Xdplb::start(&xdplb, &topo, "").expect("xdplb");
    let link = lb.pin_dir.join("links").join(topo.lb_iface());

    let out = lb.detach(&["--all"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "detach under a running daemon succeeded"
    );
    assert!(
        err.contains(&format!("PID {}", lb.proc.pid())) && err.contains("--force"),
        "{err}"
    );
    assert!(link.exists(), "the refused detach removed the link");

    // --force detaches; the daemon notices at its next once-a-second
    // check and attaches again.
    let out = lb.detach(&["--force", "--iface", topo.lb_iface()]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let detached_at = Instant::now();
    assert!(!xdp_ids(&topo).contains("\"id\""), "still attached");
    // One check period (1 s) plus a 1 s margin for a loaded machine.
    let limit = Duration::from_secs(2);
    let status = loop {
        let status = lb.json(&["status"]).unwrap();
        if status["datapath_repairs"].as_u64() >= Some(1) {
            break status;
        }
        assert!(
            detached_at.elapsed() < limit,
            "not repaired within {limit:?}: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = detached_at.elapsed();
    eprintln!("detach noticed and repaired in {took:?}");
    let problem = status["datapath_problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("removed") && problem.contains("attached again"),
        "{status}"
    );
    assert!(xdp_ids(&topo).contains("\"id\""), "not attached again");
    assert!(link.exists(), "the link is not pinned again");
    // The maps stayed: a successor can still adopt them.
    assert!(lb.pin_dir.join(xdp_common::map_names::SERVICES).exists());
    let text = lb.proc.output_text();
    assert!(text.contains("detached under the daemon"), "{text}");
}

/// The index of the lb's interface.
fn ifindex(topo: &Topology) -> u64 {
    let show = format!("ip -j link show dev {}", topo.lb_iface());
    let v: serde_json::Value = serde_json::from_str(&exec_line(topo.lb(), &show)).unwrap();
    v[0]["ifindex"].as_u64().expect("ifindex")
}

/// An interface that goes away and comes back under the same name and MAC
/// (a NIC's driver reloaded, a veth re-created) has a new index: the
/// daemon attaches to it again and balances what arrives on it, where it
/// used to pass every frame to the kernel (`pass_not_for_us`: it accepted
/// the MAC on the old index only).
#[test]
fn a_recreated_interface_is_attached_again_and_balanced() {
    let mut bed = Bed::dsr("replug", 2, dsr_config);
    let tally = bed.requests(30000..30020);
    assert!(tally.failed.is_empty(), "before: {:?}", tally.failed);

    let old = ifindex(&bed.topo);
    bed.topo
        .replug_lb(&bed.xdplb)
        .expect("re-creating the lb's interface");
    assert_ne!(ifindex(&bed.topo), old, "the new interface has a new index");
    let replugged = Instant::now();
    bed.topo.wait_reachable().expect("testbed reachable again");
    // Attached again at the next once-a-second check; the backends' next
    // hops are re-resolved on the kernel's announcements, at worst by the
    // 5 s fallback refresh. Plus a 3 s margin for a loaded machine.
    let limit = Duration::from_secs(1 + 5 + 3);
    let mut port = 31000;
    while !bed.requests(port..port + 1).failed.is_empty() {
        let stats = bed.lb.json(&["stats"]).unwrap();
        assert!(
            replugged.elapsed() < limit,
            "nothing served within {limit:?} of the re-creation: reasons {}, status {}",
            stats["reasons"],
            bed.lb.json(&["status"]).unwrap()
        );
        port += 1;
    }
    eprintln!(
        "serving again {:?} after the re-creation",
        replugged.elapsed()
    );
    let status = bed.lb.json(&["status"]).unwrap();
    assert!(status["datapath_repairs"].as_u64() >= Some(1), "{status}");
    let tally = bed.requests(32000..32050);
    assert!(tally.failed.is_empty(), "after: {:?}", tally.failed);
    assert_eq!(tally.ok(), 50, "{:?}", tally.served);
}

#[test]
fn ip_netns_exec_is_refused_with_the_way_out() {
    let (topo, xdplb) = topology("nsx");
    let scratch = Scratch::new("nsx");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", topo.lb().name()])
        .arg(&xdplb)
        .args(["run", "--iface", topo.lb_iface()]);
    scratch.add_to(&mut cmd);
    let (ok, text) = run_to_end(&mut cmd);
    assert!(!ok, "started in a private mount namespace:\n{text}");
    assert!(
        text.contains("private to this mount namespace")
            && text.contains(&format!("nsenter --net=/run/netns/{} ", topo.lb().name())),
        "{text}"
    );
    assert!(!scratch.pins.0.exists(), "pins made on the host");
    assert!(!xdp_ids(&topo).contains("\"id\""), "attached anyway");
}

#[test]
fn the_open_files_limit_is_raised_and_health_checks_work() {
    let (topo, xdplb) = topology("nofile");
    let _backends = start_backends(&topo, Path::new(TESTBACKEND)).expect("backends");
    topo.wait_reachable().expect("segment reachable");
    // HTTP checks, which hold a descriptor each (a half-open TCP check
    // holds none).
    let config = format!(
        "[[service]]\nname = \"web\"\nvip = \"{}\"\nport = 80\nprotocol = \"tcp\"\n\
         [service.health_check]\ntype = \"http\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\n\
         [[service.backend]]\naddress = \"{}\"\n",
        topo.vip4(),
        topo.backend_addr(1, false)
    );
    // A first daemon sets up the files; the one under test replaces it.
    let mut lb = Xdplb::start(&xdplb, &topo, &config).expect("xdplb");
    lb.proc.terminate().unwrap();
    let state = lb.dir.join("state.json");
    let mut cmd = run_cmd(&xdplb, &topo, &lb, [&lb.pin_dir, &lb.socket(), &state]);
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    lb.proc = Proc::spawn_with(&mut cmd, "xdplb", false).unwrap();
    lb.proc
        .wait_for_stdout_line("ready", Duration::from_secs(20))
        .unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", lb.proc.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3..5], ["4096", "4096"], "{line}");
    // Health checks run: the backend is up, and stays up for 2 s.
    let deadline = Instant::now() + Duration::from_secs(5);
    let ip = topo.backend_addr(1, false);
    while lb.backend("web", ip).unwrap()["last_check"] != "ok" {
        assert!(Instant::now() < deadline, "{}", lb.proc.output_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    let b = lb.backend("web", ip).unwrap();
    assert_eq!(b["health"], "up", "{b}");
    assert_eq!(b["last_check"], "ok", "{b}");
}

#[test]
fn systemd_hears_ready_after_the_api_answers_then_watchdog_pings() {
    let (topo, xdplb) = topology("notify");
    let scratch = Scratch::new("notify");
    let notify_path = scratch.dir.0.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut lb = Xdplb::start(&xdplb, &topo, "").expect("xdplb");
    lb.proc.terminate().unwrap();
    let state2 = lb.dir.join("state2.json");
    let mut cmd = run_cmd(&xdplb, &topo, &lb, [&lb.pin_dir, &lb.socket(), &state2]);
    // 400 ms: the daemon pings every 200 ms.
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "400000");
    lb.proc = Proc::spawn_with(&mut cmd, "xdplb", false).unwrap();
    let mut buf = [0u8; 512];
    let mut recv = || {
        let n = restarting(|| notify.recv(&mut buf)).expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert_eq!(first, "READY=1");
    // READY=1 comes only once the API answers.
    let status = lb.json(&["status"]).expect("the API answers at READY=1");
    assert_eq!(status["pid"], lb.proc.pid());

    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        assert_eq!(recv(), "WATCHDOG=1");
        pings += 1;
    }
    // 1.5 s at one ping per 200 ms is 7 or 8; allow a loaded machine half.
    assert!(pings >= 4, "{pings} watchdog pings in 1.5 s");

    // The next notification that is not a watchdog ping.
    let mut notice = || repeat_with(&mut recv).find(|m| m != "WATCHDOG=1").unwrap();
    lb.proc.kill(libc::SIGHUP).unwrap();
    let mut seen = Vec::new();
    while !seen.contains(&"READY=1".to_owned()) {
        seen.push(notice());
    }
    assert_eq!(seen, ["RELOADING=1", "READY=1"]);
    lb.proc.terminate().unwrap();
    assert_eq!(notice(), "STOPPING=1");
    // Logs go to a pipe here: plain text, no colour codes.
    lb.proc.drain_output(Duration::from_secs(2));
    let text = lb.proc.output_text();
    assert!(
        !text.contains('\u{1b}'),
        "ANSI codes in a piped log:\n{text}"
    );
}

#[test]
fn an_interface_another_program_holds_is_refused_with_that_reason() {
    let (topo, xdplb) = topology("auto");
    // Another program holds the interface natively: native attach fails
    // (busy), and auto mode does not try generic mode, which would meet the
    // same program (native and generic cannot coexist).
    let mut pass_through = topo.lb().command(&xdplb);
    pass_through.args(["pass-through", "--iface", topo.lb_iface()]);
    let mut holder = Proc::spawn(&mut pass_through).unwrap();
    holder
        .wait_for_stdout_line("ready", Duration::from_secs(20))
        .unwrap();
    let scratch = Scratch::new("auto");
    let mut cmd = topo.lb().command(&xdplb);
    cmd.args(["run", "--xdp-mode", "auto", "--iface", topo.lb_iface()]);
    scratch.add_to(&mut cmd);
    let (ok, text) = run_to_end(&mut cmd);
    assert!(!ok, "attached over another program:\n{text}");
    let err = text.lines().last().unwrap_or_default();
    assert!(
        err.contains("another XDP program is attached to") && !err.contains("generic"),
        "{text}"
    );
    assert!(!err.contains("Skb"), "{err}");
    holder.terminate().unwrap();
}

#[test]
fn the_datapath_logs_drops_without_a_backend_at_most_once_a_second_per_cpu() {
    let (topo, xdplb) = topology("alog");
    topo.wait_reachable().expect("segment reachable");
    // A service with no backend: the datapath drops its new flows.
    let config = format!(
        "[[service]]\nname = \"web\"\nvip = \"{}\"\nport = 80\nprotocol = \"tcp\"\n",
        topo.vip4()
    );
    let lb = Xdplb::start(&xdplb, &topo, &config).expect("xdplb");
    let vip = std::net::SocketAddr::new(topo.vip4().into(), 80);
    let started = Instant::now();
    let attempts = 100;
    topo.client().run(|| {
        for _ in 0..attempts {
            // Each attempt sends one SYN, which is dropped.
            let _ = std::net::TcpStream::connect_timeout(&vip, Duration::from_millis(20));
        }
    });
    let elapsed = started.elapsed();
    // The record of the last second's drop arrives within the poll.
    std::thread::sleep(Duration::from_millis(500));
    let stats = lb.json(&["stats"]).unwrap();
    let drops = stats["reasons"]["drop_no_backend"].as_u64().unwrap_or(0);
    assert!(drops >= attempts, "{stats}");
    let logged: Vec<String> = lb
        .proc
        .output()
        .into_iter()
        .filter(|l| l.contains("no usable backend"))
        .collect();
    let records = logged.len();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // At most one per CPU per started second (plus the second begun at 0).
    let bound = cpus * (elapsed.as_secs() as usize + 2);
    eprintln!("{drops} drops in {elapsed:?}: {records} log records (bound {bound})");
    assert!(
        records >= 1,
        "no record of the drops:\n{}",
        lb.proc.output_text()
    );
    assert!(
        records <= bound,
        "{records} records for {drops} drops in {elapsed:?}:\n{}",
        lb.proc.output_text()
    );
    assert!(logged[0].contains("WARN"), "{}", logged[0]);
}
