//! Running the real `xdplb` binary in a topology's load-balancer namespace,
//! and the traffic checks shared by the end-to-end tests and the demo.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU16, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{
    client,
    netns::Netns,
    proc::Proc,
    topology::{Shape, Topology},
};

/// A TOML configuration with one TCP service on port 80 of each VIP
/// (IPv4 and IPv6), every backend of the topology serving both, with the
/// default health check.
pub fn dsr_config(topo: &Topology) -> String {
    dsr_config_with(topo, "")
}

/// As [`dsr_config`], with `health_check` (TOML lines) as each service's
/// `[service.health_check]` table.
pub fn dsr_config_with(topo: &Topology, health_check: &str) -> String {
    let mut text = String::new();
    for v6 in [false, true] {
        let (fam, vip) = (if v6 { "6" } else { "4" }, topo.vip(v6));
        text += &format!(
            "[[service]]\nname = \"web{fam}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n\n"
        );
        if !health_check.is_empty() {
            text += &format!("[service.health_check]\n{health_check}\n\n");
        }
        for i in 1..=topo.backend_count() {
            let addr = topo.backend_addr(i, v6);
            text += &format!("[[service.backend]]\naddress = \"{addr}\"\n\n");
        }
    }
    text
}

/// A NAT configuration: TCP services on port 80 of both VIPs (`web4`,
/// `web6`) and UDP services on port 53 (`dns4`, `dns6`), every backend of
/// the topology serving all four on ports 8080 and 5353. `health_check`
/// (TOML lines, may be empty for the default TCP check) is the TCP
/// services' `[service.health_check]`; the UDP services are not checked.
pub fn nat_config(topo: &Topology, health_check: &str) -> String {
    let mut text = String::new();
    for v6 in [false, true] {
        let (fam, vip) = (if v6 { "6" } else { "4" }, topo.vip(v6));
        let backends = |port: u16| -> String {
            (1..=topo.backend_count())
                .map(|i| {
                    let addr = topo.backend_addr(i, v6);
                    format!("[[service.backend]]\naddress = \"{addr}\"\nport = {port}\n\n")
                })
                .collect()
        };
        text += &format!(
            "[[service]]\nname = \"web{fam}\"\nvip = \"{vip}\"\nport = 80\n\
             protocol = \"tcp\"\nmode = \"nat\"\n\n"
        );
        if !health_check.is_empty() {
            text += &format!("[service.health_check]\n{health_check}\n\n");
        }
        // Explicit values (the defaults), so the table is exercised. The
        // TCP timeout is written "60m" here and "1h" in e2e_nat's
        // documented-settings test, so both spellings are exercised.
        text += "[service.nat]\nports = \"20000-59999\"\ntcp_timeout = \"60m\"\n\
                 tcp_closing_timeout = \"10s\"\nudp_timeout = \"60s\"\n\n";
        text += &backends(BACKEND_PORT);
        text += &format!(
            "[[service]]\nname = \"dns{fam}\"\nvip = \"{vip}\"\nport = 53\n\
             protocol = \"udp\"\nmode = \"nat\"\n\n"
        );
        text += "[service.health_check]\ntype = \"none\"\n\n";
        text += &backends(BACKEND_UDP_PORT);
    }
    text
}

/// The `xdplb` daemon running in a load-balancer namespace, with its own
/// pin directory, API socket, state file and config file. Dropping it
/// stops the daemon and removes whatever it leaves: the XDP attachments,
/// pins, files.
pub struct Xdplb {
    pub proc: Proc,
    pub pin_dir: PathBuf,
    /// Holds the config, the API socket and the state file.
    pub dir: PathBuf,
    binary: PathBuf,
    lb: String,
    ifaces: Vec<String>,
}

impl Xdplb {
    /// Writes `config` and starts `binary run` on the topology's lb
    /// interfaces in native XDP mode; returns once the daemon is ready.
    pub fn start(binary: &Path, topo: &Topology, config: &str) -> Result<Self> {
        Self::start_in(binary, topo.lb(), &topo.lb_ifaces(), topo.prefix(), config)
    }

    /// Starts `binary run` in namespace `lb` on `ifaces`, with files named
    /// after the unique `prefix`.
    pub fn start_in(
        binary: &Path,
        lb: &Netns,
        ifaces: &[&str],
        prefix: &str,
        config: &str,
    ) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("xdplb-{prefix}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("xdplb.toml"), config)?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/xdplb-{prefix}"));
        let ifaces: Vec<String> = ifaces.iter().map(|i| i.to_string()).collect();
        let proc = spawn_unready(binary, lb, &ifaces, &dir, &pin_dir)?;
        let mut daemon = Self {
            proc,
            pin_dir,
            dir,
            binary: binary.to_owned(),
            lb: lb.name().to_owned(),
            ifaces,
        };
        // Not ready: dropping `daemon` removes what it left (pins, files).
        wait_ready(&mut daemon.proc)?;
        Ok(daemon)
    }

    /// The config file the daemon reads.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("xdplb.toml")
    }

    /// The daemon's API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// Replaces the config file (the daemon reads it on reload/restart).
    pub fn write_config(&self, config: &str) -> Result<()> {
        let path = self.config_path();
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))
    }

    /// Starts another daemon with the same files (after the last one was
    /// stopped or killed): it adopts the running datapath.
    pub fn restart(&mut self, topo: &Topology) -> Result<()> {
        self.proc = spawn_daemon(
            &self.binary,
            topo.lb(),
            &self.ifaces,
            &self.dir,
            &self.pin_dir,
        )?;
        Ok(())
    }

    /// Runs `xdplb ARGS --socket S` (the operator CLI) and returns its
    /// stdout, or an error with its stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.binary)
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()?;
        ensure!(
            out.status.success(),
            "xdplb {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`Xdplb::cli`] with `line`'s words (split at single spaces, as
    /// `netns::exec_line` does).
    pub fn cli_line(&self, line: &str) -> Result<String> {
        self.cli(&line.split(' ').collect::<Vec<_>>())
    }

    /// `cli` with `--json`, parsed.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut args = args.to_vec();
        args.push("--json");
        let text = self.cli(&args)?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing the output of xdplb {}: {text}", args.join(" ")))
    }

    /// `xdplb flow SRC DST tcp --json`: the daemon's answer.
    pub fn flow(&self, src: SocketAddr, dst: SocketAddr) -> Result<serde_json::Value> {
        self.json(&["flow", &src.to_string(), &dst.to_string(), "tcp"])
    }

    /// The backend view of `address` in service `service`, from the API.
    pub fn backend(&self, service: &str, address: IpAddr) -> Result<serde_json::Value> {
        let list = self.json(&["backend", "list", service])?;
        list.as_array()
            .and_then(|l| {
                l.iter()
                    .find(|b| b["address"].as_str() == Some(&address.to_string()))
            })
            .cloned()
            .with_context(|| format!("backend {address} not listed: {list}"))
    }

    /// Polls the health of backend `address` of `service` until it is
    /// `want`; returns when. Panics once `limit` has passed since `since`.
    pub fn wait_health(
        &self,
        service: &str,
        address: IpAddr,
        want: &str,
        since: Instant,
        limit: Duration,
    ) -> Instant {
        loop {
            let backend = self.backend(service, address).unwrap();
            if backend["health"] == want {
                return Instant::now();
            }
            assert!(
                since.elapsed() < limit,
                "{address} not {want} within {limit:?}: {backend}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs `xdplb detach ARGS --pin-dir P` on this daemon's pins.
    pub fn detach(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new(&self.binary)
            .arg("detach")
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output()
    }

    /// `xdplb stats` as text (for failure messages).
    pub fn stats_text(&self) -> String {
        self.cli(&["stats"])
            .unwrap_or_else(|e| format!("(xdplb stats failed: {e:#})"))
    }

    /// Stops the daemon the way Ctrl-C does (SIGINT: detach, remove pins)
    /// and waits for it.
    pub fn interrupt(&mut self) -> Result<()> {
        self.proc.kill(libc::SIGINT)?;
        match self.proc.wait_timeout(Duration::from_secs(10))? {
            Some(status) if status.success() => Ok(()),
            other => bail!(
                "xdplb did not exit cleanly on SIGINT: {other:?}\n{}",
                self.proc.output_text()
            ),
        }
    }
}

/// `binary run` in namespace `lb` on `ifaces` with the files in `dir`;
/// waits until it is ready.
fn spawn_daemon(
    binary: &Path,
    lb: &Netns,
    ifaces: &[String],
    dir: &Path,
    pin_dir: &Path,
) -> Result<Proc> {
    let mut proc = spawn_unready(binary, lb, ifaces, dir, pin_dir)?;
    wait_ready(&mut proc)?;
    Ok(proc)
}

/// [`spawn_daemon`] without waiting.
fn spawn_unready(
    binary: &Path,
    lb: &Netns,
    ifaces: &[String],
    dir: &Path,
    pin_dir: &Path,
) -> Result<Proc> {
    let mut cmd = lb.command(binary);
    cmd.args(["run", "--xdp-mode", "native"]);
    for iface in ifaces {
        cmd.args(["--iface", iface]);
    }
    cmd.arg("--config")
        .arg(dir.join("xdplb.toml"))
        .arg("--pin-dir")
        .arg(pin_dir)
        .arg("--api-socket")
        .arg(dir.join("api.sock"))
        .arg("--state-file")
        .arg(dir.join("state.json"));
    Proc::spawn_with(&mut cmd, "xdplb", false)
}

fn wait_ready(proc: &mut Proc) -> Result<()> {
    if let Err(err) = proc.wait_for_stdout_line("ready", Duration::from_secs(20)) {
        bail!(
            "xdplb did not become ready: {err:#}\n--- xdplb output ---\n{}",
            proc.output_text()
        );
    }
    Ok(())
}

impl Drop for Xdplb {
    fn drop(&mut self) {
        let _ = self.proc.terminate();
        let _ = self.detach(&["--all"]);
        // Belt and braces for a datapath whose pins are already gone.
        for iface in &self.ifaces {
            let _ = Command::new("ip")
                .args(["-n", &self.lb, "link", "set", "dev", iface, "xdp", "off"])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Outcome of a batch of requests from the client.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests served, per backend name.
    pub served: BTreeMap<String, usize>,
    /// Errors, with the source port that failed.
    pub failed: Vec<(u16, String)>,
}

impl Tally {
    /// Number of successful requests.
    pub fn ok(&self) -> usize {
        self.served.values().sum()
    }

    /// Requests served by backend `name`.
    pub fn count(&self, name: &str) -> usize {
        self.served.get(name).copied().unwrap_or(0)
    }
}

/// The port NAT backends serve HTTP on (the VIP's port is 80; DSR backends
/// serve 80, as DSR does not translate ports).
pub const BACKEND_PORT: u16 = 8080;
/// The port NAT backends answer UDP on (the VIP's UDP port is 53).
pub const BACKEND_UDP_PORT: u16 = 5353;

/// Starts `xdplb-testbackend` (at `binary`) in every backend namespace,
/// named after it (`b1`, `b2`, ...), and waits until each listens.
pub fn start_backends(topo: &Topology, binary: &Path) -> Result<Vec<Proc>> {
    (1..=topo.backend_count())
        .map(|i| start_backend(topo, binary, i, &[]))
        .collect()
}

/// Starts backend `i`'s server with `extra` arguments: HTTP on port 80 in
/// DSR, HTTP on [`BACKEND_PORT`] and UDP on [`BACKEND_UDP_PORT`] in NAT.
pub fn start_backend(topo: &Topology, binary: &Path, i: usize, extra: &[&str]) -> Result<Proc> {
    let name = topo.backend_name(i);
    let mut cmd = topo.backend(i).command(binary);
    cmd.args(["--name", &name]);
    if topo.shape() == Shape::Dsr {
        cmd.args(["--port", "80"]);
    } else {
        cmd.args(["--port", &BACKEND_PORT.to_string()])
            .args(["--udp-port", &BACKEND_UDP_PORT.to_string()]);
    }
    let mut p = Proc::spawn_with(cmd.args(extra), &name, false)?;
    p.wait_for_stdout_line("listening", Duration::from_secs(10))?;
    Ok(p)
}

/// One request of a [`Load`].
#[derive(Debug)]
pub struct Sample {
    pub start: Instant,
    /// How long the request took, to its answer or its error.
    pub elapsed: Duration,
    pub port: u16,
    /// The backend's name, or the error.
    pub result: Result<String, String>,
}

/// The failed requests among `samples`.
pub fn failures(samples: &[Sample]) -> Vec<&Sample> {
    samples.iter().filter(|s| s.result.is_err()).collect()
}

/// The samples started in `from..to` that failed.
pub fn failed_between(samples: &[Sample], from: Instant, to: Instant) -> Vec<&Sample> {
    let started = from..to;
    failures(samples)
        .into_iter()
        .filter(|s| started.contains(&s.start))
        .collect()
}

/// The backends that served the samples started after `t`.
pub fn served_after(samples: &[Sample], t: Instant) -> Vec<&str> {
    samples
        .iter()
        .filter(|s| s.start > t)
        .filter_map(|s| s.result.as_deref().ok())
        .collect()
}

/// Steady load from the client: a new TCP connection (one HTTP request)
/// every `every`, each from the next source port, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    /// The source port of the request under way (0: none).
    current: Arc<AtomicU16>,
    handle: std::thread::JoinHandle<Vec<Sample>>,
}

impl Load {
    /// Starts the load from the topology's client against `vip`, from
    /// source ports `first_port..`.
    pub fn start(
        topo: &Topology,
        vip: SocketAddr,
        every: Duration,
        first_port: u16,
    ) -> Result<Self> {
        Self::start_in(topo.client(), vip, every, first_port)
    }

    /// Starts the load from namespace `client`.
    pub fn start_in(
        client: &crate::netns::Netns,
        vip: SocketAddr,
        every: Duration,
        first_port: u16,
    ) -> Result<Self> {
        let ns = std::fs::File::open(client.path())?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let current = Arc::new(AtomicU16::new(0));
        let under_way = current.clone();
        let handle = std::thread::spawn(move || {
            // SAFETY: setns on a valid fd; affects only this thread.
            if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0
            {
                panic!("setns: {}", std::io::Error::last_os_error());
            }
            let mut samples = Vec::new();
            let mut port = first_port;
            let mut next = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                let start = Instant::now();
                under_way.store(port, Ordering::Relaxed);
                let result = client::get(vip, Some(port), Duration::from_secs(2))
                    .map_err(|e| format!("{e:#}"));
                under_way.store(0, Ordering::Relaxed);
                samples.push(Sample {
                    start,
                    elapsed: start.elapsed(),
                    port,
                    result,
                });
                port = port.checked_add(1).unwrap_or(first_port);
                next += every;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            samples
        });
        Ok(Self {
            stop,
            current,
            handle,
        })
    }

    /// The source port of the request under way, if one is.
    pub fn under_way(&self) -> Option<u16> {
        Some(self.current.load(Ordering::Relaxed)).filter(|&p| p != 0)
    }

    /// Stops the load and returns every request's outcome.
    pub fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("load thread panicked")
    }
}

/// Long-lived connections from the client, each pinned to some backend.
pub struct LongLived {
    /// (backend name, connection).
    pub conns: Vec<(String, client::StreamConn)>,
}

impl LongLived {
    /// Opens `n` `/stream` connections to `vip` from ports `first_port..`.
    pub fn open(topo: &Topology, vip: SocketAddr, first_port: u16, n: u16) -> Result<Self> {
        let conns = topo.client().run(|| {
            (first_port..first_port + n)
                .map(|port| {
                    let mut c = client::StreamConn::open(vip, Some(port), Duration::from_secs(3))?;
                    let hello = c.send_line("hello")?;
                    let name = hello.split(':').next().unwrap_or_default().to_owned();
                    Ok((name, c))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(Self { conns })
    }

    /// Exchanges one line on every connection whose backend is not in
    /// `except`; returns the failures (backend, error).
    pub fn exchange(&mut self, except: &[&str], round: usize) -> Vec<(String, String)> {
        let mut failures = Vec::new();
        for (name, c) in self
            .conns
            .iter_mut()
            .filter(|(n, _)| !except.contains(&n.as_str()))
        {
            let line = format!("round {round}");
            match c.send_line(&line) {
                Ok(reply) if reply == format!("{name}: {line}") => {}
                Ok(reply) => failures.push((name.clone(), format!("unexpected reply {reply:?}"))),
                Err(e) => failures.push((name.clone(), format!("{e:#}"))),
            }
        }
        failures
    }

    /// Backends that have at least one connection.
    pub fn backends(&self) -> std::collections::BTreeSet<String> {
        self.conns.iter().map(|(n, _)| n.clone()).collect()
    }
}
