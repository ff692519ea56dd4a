//! The metrics listener end to end: the real daemon in veth namespaces with
//! real HTTP backends and traffic. Its Prometheus scrape passes `promtool
//! check metrics` and its counters move with traffic; its status page,
//! loaded once in headless Chromium, shows a backend going down within 2 s
//! of the daemon's own transition, without a reload. Needs root.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};
use xdplb_tests::{
    bed::Bed,
    find_executable,
    lb::{dsr_config, dsr_config_with, Load},
    proc::Proc,
    topology::Topology,
    RemoveOnDrop,
};

/// Inside the load balancer's namespace (its own loopback), so a fixed
/// port does not collide with parallel tests.
const METRICS: &str = "127.0.0.1:9650";
const HEALTH: &str = "type = \"http\"\npath = \"/health\"\ninterval = \"200ms\"\n\
                      timeout = \"100ms\"\nrise = 2\nfall = 3\n";

/// Three HTTP backends, and the daemon with its metrics listener on.
fn bed(tag: &str) -> Bed {
    Bed::dsr(tag, 3, |topo| {
        format!(
            "[daemon]\nmetrics_listen = \"{METRICS}\"\n\n{}",
            dsr_config_with(topo, HEALTH)
        )
    })
}

/// `GET path` on the metrics listener, from the daemon's namespace:
/// status code and body.
fn get(bed: &Bed, path: &str) -> (u16, String) {
    bed.topo.lb().run(|| http_get(METRICS, path))
}

fn scrape(bed: &Bed) -> String {
    let (status, body) = get(bed, "/metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until every backend of web4 passed a health check.
fn wait_checked(bed: &Bed) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 1..=3 {
        while bed.backend(i)["last_check"] != json!("ok") {
            assert!(Instant::now() < deadline, "b{i} never passed a check");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A minimal HTTP/1.1 GET (one request, `Connection: close`).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "the test client reads only Content-Length bodies: {head}"
    );
    (status, body.to_owned())
}

/// The samples of an exposition: series (name and labels) -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("series value");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no series {series} in the scrape"))
}

/// Asserts that `promtool check metrics` passes `scrape`; skips (with the
/// reason printed) when promtool is not installed.
fn check_with_promtool(scrape: &str) {
    let Some(promtool) = find_executable("promtool") else {
        eprintln!(
            "SKIPPED the promtool check: promtool is not installed \
             (apt-get install -y prometheus; `cargo xtask setup` installs it)"
        );
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    // wait_with_output closes stdin (promtool's EOF) before it waits.
    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(scrape.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{report}\n--- scrape ---\n{scrape}"
    );
}

/// Where test artifacts go: the workspace's target directory.
fn artifact(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn scrape_passes_promtool_and_counters_move_with_traffic() {
    let bed = bed("met");
    wait_checked(&bed);
    let before = scrape(&bed);
    check_with_promtool(&before);
    let before = samples(&before);
    assert_eq!(value(&before, "xdplb_backends"), 6.0);
    assert_eq!(value(&before, "xdplb_adopted"), 0.0);
    let version = format!(
        "xdplb_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&before, &version), 1.0);

    let tally = bed.requests(40000..40060);
    assert_eq!(tally.ok(), 60, "requests failed: {:?}", tally.failed);
    // Series of backend `i` of web4: `name{service,backend,extra}`.
    let series = |name: &str, i: usize, extra: &str| {
        format!(
            "{name}{{service=\"web4\",backend=\"{}:80\"{extra}}}",
            bed.addr(i)
        )
    };
    let checks = |i| {
        series(
            "xdplb_backend_health_checks_total",
            i,
            ",result=\"success\"",
        )
    };
    // The requests may take less than a check interval (200 ms): scrape
    // again until every backend's next check ran too (the limit, 10 s, is
    // 50 intervals, for a loaded machine).
    let give_up = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(&bed);
        let now = samples(&text);
        let ran = (1..=3).all(|i| value(&now, &checks(i)) > value(&before, &checks(i)));
        if ran || Instant::now() > give_up {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::fs::write(artifact("metrics-scrape.txt"), &text).unwrap();
    check_with_promtool(&text);
    let after = samples(&text);

    let grew = |series: &str| value(&after, series) - value(&before, series);
    // Each request is a new flow of several packets (SYN, request, ACKs,
    // FIN) to the VIP; only the client's packets cross the datapath.
    assert!(grew("xdplb_datapath_packets_total{reason=\"flow_new\"}") >= 60.0);
    assert!(grew("xdplb_service_packets_total{service=\"web4\"}") >= 4.0 * 60.0);
    assert!(grew("xdplb_service_bytes_total{service=\"web4\"}") >= 60.0 * 60.0 * 4.0);
    // One new flow per request (each from its own client port), on the
    // service and on the backend that served it; health checks go to the
    // backends directly, not through the datapath.
    assert_eq!(
        grew("xdplb_service_new_flows_total{service=\"web4\"}"),
        60.0
    );
    assert_eq!(value(&after, "xdplb_flow_table_capacity"), 262_144.0);
    for i in 1..=3 {
        let name = bed.topo.backend_name(i);
        let served = tally.count(&name) as f64;
        let of_b = |name: &str| series(name, i, "");
        let packets = grew(&of_b("xdplb_backend_packets_total"));
        let bytes = grew(&of_b("xdplb_backend_bytes_total"));
        let new_flows = grew(&of_b("xdplb_backend_new_flows_total"));
        assert_eq!(new_flows, served, "{name}: new flows = requests served");
        // Each of them was answered (the client's ACK followed its SYN).
        let answered = grew(&of_b("xdplb_backend_flows_answered_total"));
        assert_eq!(answered, served, "{name}: every flow answered");
        assert!(
            packets >= 4.0 * served && bytes >= 60.0 * packets,
            "{name} served {served} requests: packets +{packets}, bytes +{bytes}"
        );
        assert_eq!(value(&after, &of_b("xdplb_backend_healthy")), 1.0);
        // The default weight.
        assert_eq!(value(&after, &of_b("xdplb_backend_weight")), 100.0);
        let state = series("xdplb_backend_state", i, ",state=\"active\"");
        assert_eq!(value(&after, &state), 1.0);
        assert!(
            grew(&checks(i)) >= 1.0,
            "health checks ran between the scrapes"
        );
        let latency = value(&after, &of_b("xdplb_backend_health_check_duration_seconds"));
        assert!(latency > 0.0 && latency < 0.1, "check latency {latency}");
    }
    assert!(
        tally.served.len() >= 2,
        "traffic spread: {:?}",
        tally.served
    );

    // The page and its JSON are there too, and nothing else is.
    let (status, page) = get(&bed, "/");
    assert_eq!(status, 200);
    assert!(page.contains("<title>xdplb status</title>"));
    assert!(!page.contains("http://") && !page.contains("https://") || page.contains("w3.org"));
    let (status, json) = get(&bed, "/api/status");
    assert_eq!(status, 200);
    let json: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["services"].as_array().unwrap().len(), 2);
    assert_eq!(
        get(&bed, "/v1/status").0,
        404,
        "the control API is not on this listener"
    );
}

// --- Chromium, driven over the DevTools protocol on a pipe -------------------

/// Headless Chromium with `--remote-debugging-pipe`: commands go to its fd
/// 3, answers come from its fd 4, each message a JSON text ended by NUL.
struct Chromium {
    proc: Proc,
    to: std::fs::File,
    from: std::fs::File,
    pending: Vec<u8>,
    next_id: u64,
    session: String,
    _profile: RemoveOnDrop,
}

/// A pipe whose ends are O_CLOEXEC and numbered above 10, so `dup2` onto
/// 3 and 4 in the child cannot clobber the other end.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let high = |fd: i32| {
        // SAFETY: fd is open; F_DUPFD_CLOEXEC returns a new fd >= 10.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        assert!(new >= 10);
        // SAFETY: both fds are open and owned here.
        unsafe {
            libc::close(fd);
            OwnedFd::from_raw_fd(new)
        }
    };
    (high(fds[0]), high(fds[1]))
}

impl Chromium {
    /// Opens `url` in Chromium inside `topo`'s load-balancer namespace.
    fn open(topo: &Topology, url: &str) -> Option<Self> {
        let Some(binary) = find_executable("chromium") else {
            eprintln!(
                "SKIPPED the status page test: chromium is not installed \
                 (apt-get install -y chromium; `cargo xtask setup` installs it)"
            );
            return None;
        };
        let profile = RemoveOnDrop(std::env::temp_dir().join(format!(
            "xdplb-chromium-{}-{}",
            std::process::id(),
            topo.prefix()
        )));
        let (commands_read, commands_write) = pipe();
        let (answers_read, answers_write) = pipe();
        let (child_in, child_out) = (commands_read.as_raw_fd(), answers_write.as_raw_fd());
        let mut cmd = topo.lb().command(binary);
        let flags = "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
                     --disable-background-networking --disable-component-update --disable-sync \
                     --hide-scrollbars --window-size=1200,900 --remote-debugging-pipe";
        cmd.args(flags.split(' '))
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg(url);
        // SAFETY: dup2 is async-signal-safe; the fds stay open in the parent
        // until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(child_in, 3) < 0 || libc::dup2(child_out, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let proc = Proc::spawn_with(&mut cmd, "chromium", false).expect("starting chromium");
        drop((commands_read, answers_write));
        let mut chromium = Chromium {
            proc,
            to: commands_write.into(),
            from: answers_read.into(),
            pending: Vec::new(),
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let target = loop {
            let targets = chromium.call("Target.getTargets", json!({}), false);
            let page = targets["targetInfos"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["type"] == "page" && t["url"].as_str() == Some(url));
            if let Some(page) = page {
                break page["targetId"].clone();
            }
            assert!(Instant::now() < deadline, "no page target: {targets}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let attached = chromium.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
            false,
        );
        chromium.session = attached["sessionId"].as_str().unwrap().to_owned();
        Some(chromium)
    }

    /// Sends one command and waits for its answer (events are skipped).
    fn call(&mut self, method: &str, params: Value, in_page: bool) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if in_page {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).expect("writing to chromium");
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == 0) {
                let raw: Vec<u8> = self.pending.drain(..=end).collect();
                let answer: Value = serde_json::from_slice(&raw[..end]).unwrap();
                if answer["id"] == json!(id) {
                    assert!(
                        answer.get("error").is_none(),
                        "{method} failed: {answer}\n{}",
                        self.proc.output_text()
                    );
                    return answer["result"].clone();
                }
                continue;
            }
            let mut chunk = [0u8; 65536];
            let n = self.from.read(&mut chunk).expect("reading from chromium");
            assert!(
                n > 0,
                "chromium closed its pipe:\n{}",
                self.proc.output_text()
            );
            self.pending.extend_from_slice(&chunk[..n]);
        }
    }

    /// Evaluates `expression` in the page; its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
            true,
        );
        result["result"]["value"].clone()
    }

    /// The page's backend rows: key -> health.
    fn backends(&mut self) -> BTreeMap<String, String> {
        let rows = self.eval(
            "[...document.querySelectorAll('tr[data-backend]')]\
             .map(r => [r.dataset.backend, r.dataset.health])",
        );
        let text = |v: &Value| v.as_str().unwrap().to_owned();
        rows.as_array()
            .into_iter()
            .flatten()
            .map(|r| (text(&r[0]), text(&r[1])))
            .collect()
    }

    fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}), true);
        let png = base64_decode(shot["data"].as_str().unwrap());
        std::fs::write(path, png).unwrap();
    }
}

/// Standard base64 (the screenshot's encoding in the DevTools protocol).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|group| {
            let n = group
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &d)| n | u32::from(d) << (18 - 6 * i));
            let bytes = n.to_be_bytes();
            bytes[1..group.len()].to_vec()
        })
        .collect()
}

#[test]
fn status_page_shows_a_backend_going_down_without_a_reload() {
    let mut bed = bed("page");
    wait_checked(&bed);
    let url = format!("http://{METRICS}/");
    let Some(mut chromium) = Chromium::open(&bed.topo, &url) else {
        return;
    };
    let load = Load::start(&bed.topo, bed.vip(), Duration::from_millis(10), 30000).unwrap();

    // Every backend of both services is listed, all up.
    let keys: Vec<String> = (1..=3)
        .flat_map(|i| {
            [
                format!("web4/{}:80", bed.topo.backend_addr(i, false)),
                format!("web6/[{}]:80", bed.topo.backend_addr(i, true)),
            ]
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let shown = chromium.backends();
        if keys
            .iter()
            .all(|k| shown.get(k).map(String::as_str) == Some("up"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "page shows {shown:?}, want {keys:?} up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let loaded_at = chromium.eval("document.body.dataset.loadedAt");
    let polls_before = chromium.eval("Number(document.body.dataset.polls)");
    // Some traffic history for the chart before the screenshot.
    std::thread::sleep(Duration::from_secs(6));

    // Kill b1's server; note when the daemon itself says it is down.
    bed.backends[0].kill(libc::SIGKILL).unwrap();
    let down_at = bed.wait_health(1, "down", Instant::now(), Duration::from_secs(10));
    let key = &keys[0];
    let shown_at = loop {
        if chromium.backends().get(key).map(String::as_str) == Some("down") {
            break Instant::now();
        }
        assert!(
            down_at.elapsed() < Duration::from_secs(5),
            "the page never showed {key} down"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let lag = shown_at - down_at;
    eprintln!("the page showed {key} down {lag:?} after the daemon's transition");
    assert!(lag < Duration::from_secs(2), "page lag {lag:?} (bound 2 s)");

    // The same page load all along, and it logged the change itself.
    assert_eq!(chromium.eval("document.body.dataset.loadedAt"), loaded_at);
    let events = chromium.eval("document.getElementById('events').innerText");
    assert!(
        events
            .as_str()
            .unwrap()
            .contains(&format!("{key} up/active/up → down/down/up")),
        "{events}"
    );
    // It kept polling (how often depends on the machine's load: a count
    // would flake on a busy CI host; that the count grew cannot).
    let polls = chromium.eval("Number(document.body.dataset.polls)");
    assert!(
        polls.as_f64().unwrap() > polls_before.as_f64().unwrap(),
        "polls {polls_before} then {polls}"
    );

    std::thread::sleep(Duration::from_secs(2));
    let shot = artifact("status-page.png");
    chromium.screenshot(&shot);
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    if std::env::var_os("XDPLB_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/status-page.png");
        std::fs::copy(&shot, docs).unwrap();
    }
    load.stop();
}

/// A service of `n` unchecked IPv6 backends on the lb's own segment (no
/// host has their addresses): megabytes of metrics.
fn many_backends(topo: &Topology, n: usize) -> String {
    let vip = topo.vip(true);
    let mut text = format!(
        "[[service]]\nname = \"many\"\nvip = \"{vip}\"\nport = 81\nprotocol = \"tcp\"\n\n\
         [service.health_check]\ntype = \"none\"\n\n"
    );
    for i in 0..n {
        text += &format!("[[service.backend]]\naddress = \"fd77::1:{i:x}\"\n\n");
    }
    text
}

/// Whether the listener answers `GET /` (no snapshot: cheap) within
/// `limit`.
fn answers(limit: Duration) -> bool {
    let Ok(mut stream) = TcpStream::connect(METRICS) else {
        return false;
    };
    stream.set_read_timeout(Some(limit)).unwrap();
    let asked = write!(stream, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut head = [0; 12];
    asked.is_ok() && stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// Clients that ask for a scrape of megabytes and never read it hold the
/// listener's 64 connection slots for the connection lifetime (30 s), not
/// for as long as they like, and then find their connections closed.
/// Meanwhile their scrapes, one snapshot at a time, keep no API change
/// waiting long.
#[test]
fn clients_that_never_read_their_answer_free_their_slots() {
    let bed = Bed::dsr("unread", 1, |topo| {
        format!(
            "[daemon]\nmetrics_listen = \"{METRICS}\"\n\n{}{}",
            dsr_config(topo),
            many_backends(topo, 3000)
        )
    });
    let size = get(&bed, "/metrics").1.len();
    // More than loopback's socket buffers hold: the answer is stuck.
    assert!(size > 4 << 20, "a scrape of {size} bytes");
    let lb = bed.topo.lb();
    let asked = Instant::now();
    let mut holders: Vec<TcpStream> = lb.run(|| {
        let addr: SocketAddr = METRICS.parse().unwrap();
        (0..64)
            .map(|_| {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                socket.set_recv_buffer_size(4096).unwrap();
                socket.connect(&addr.into()).unwrap();
                let mut stream = TcpStream::from(socket);
                write!(stream, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
                stream
            })
            .collect()
    });
    let b1 = bed.addr(1).to_string();
    let change = Instant::now();
    bed.lb.cli(&["backend", "drain", "web4", &b1]).unwrap();
    // Well under a second alone (about 0.4 s here with the 64 scrapes,
    // 21 s when each took its own snapshot at once); 10 s for a loaded
    // machine.
    let took = change.elapsed();
    assert!(took < Duration::from_secs(10), "a drain took {took:?}");
    assert!(
        !lb.run(|| answers(Duration::from_secs(2))),
        "the 64 holders did not take every slot"
    );
    // The lifetime, and 10 s for a loaded machine.
    let give_up = asked + Duration::from_secs(30 + 10);
    while !lb.run(|| answers(Duration::from_secs(1))) {
        assert!(Instant::now() < give_up, "the listener is still taken");
    }
    for holder in &mut holders {
        holder
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // What the daemon had sent, then the end of the connection (not a
        // read timeout).
        let read = std::io::copy(holder, &mut std::io::sink());
        let ended = match &read {
            Ok(n) => (*n as usize) < size,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(ended, "a holder's connection: {read:?}");
    }
}
