//! Running the real `xdplb` binary in a topology's load-balancer namespace,
//! and the traffic checks shared by the end-to-end tests and the demo.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{client, proc::Proc, topology::DsrTopology};

/// A TOML configuration with one TCP service on port 80 of each VIP
/// (IPv4 and IPv6), every backend of the topology serving both.
pub fn dsr_config(topo: &DsrTopology) -> String {
    let mut text = String::new();
    for (name, vip) in [("web4", topo.vip4().to_string()), ("web6", topo.vip6().to_string())] {
        text += &format!("[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n\n");
        for i in 1..=topo.backend_count() {
            let addr = if name == "web4" { topo.backend_addr4(i).to_string() } else { topo.backend_addr6(i).to_string() };
            text += &format!("[[service.backend]]\naddress = \"{addr}\"\n\n");
        }
    }
    text
}

/// The `xdplb` daemon running in the lb namespace, with its own pin
/// directory and config file. Dropping it stops the daemon and removes
/// whatever it may have left: pins, the XDP attachment, the config file.
pub struct Xdplb {
    pub proc: Proc,
    pub pin_dir: PathBuf,
    pub config: PathBuf,
    binary: PathBuf,
    lb: String,
    iface: String,
}

impl Xdplb {
    /// Writes `config` to a temporary file and starts `binary run` on the
    /// topology's lb interface in native XDP mode; returns once the daemon
    /// says it is ready.
    pub fn start(binary: &Path, topo: &DsrTopology, config: &str) -> Result<Self> {
        let tag = topo.prefix();
        let config_path = std::env::temp_dir().join(format!("xdplb-{tag}.toml"));
        std::fs::write(&config_path, config).with_context(|| format!("writing {}", config_path.display()))?;
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/xdplb-{tag}"));
        let mut cmd = topo.lb().command(binary);
        cmd.args(["run", "--xdp-mode", "native", "--iface", topo.lb_iface(), "--config"])
            .arg(&config_path)
            .arg("--pin-dir")
            .arg(&pin_dir);
        let proc = Proc::spawn_with(&mut cmd, "xdplb", false)?;
        let mut lb = Self {
            proc,
            pin_dir,
            config: config_path,
            binary: binary.to_owned(),
            lb: topo.lb().name().to_owned(),
            iface: topo.lb_iface().to_owned(),
        };
        if let Err(err) = lb.proc.wait_for_stdout_line("ready", Duration::from_secs(20)) {
            bail!("xdplb did not become ready: {err:#}\n--- xdplb output ---\n{}", lb.proc.output_text());
        }
        Ok(lb)
    }

    /// `xdplb flow SRC DST tcp` against this daemon's pinned maps.
    pub fn flow(&self, src: SocketAddr, dst: SocketAddr) -> Result<String> {
        let out = Command::new(&self.binary)
            .args(["flow", &src.to_string(), &dst.to_string(), "tcp", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()?;
        if !out.status.success() {
            bail!("xdplb flow failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Xdplb {
    fn drop(&mut self) {
        let _ = self.proc.terminate();
        // Belt and braces for a daemon that died before cleaning up.
        let _ = Command::new("ip").args(["-n", &self.lb, "link", "set", "dev", &self.iface, "xdp", "off"]).status();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_file(&self.config);
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
}

/// Sends one HTTP GET to `vip:80` from each of `ports` (each its own TCP
/// connection, from that source port), inside the client namespace.
pub fn requests(topo: &DsrTopology, vip: IpAddr, ports: impl Iterator<Item = u16> + Send) -> Tally {
    topo.client().run(move || {
        let mut tally = Tally::default();
        for port in ports {
            match client::get(SocketAddr::new(vip, 80), Some(port), Duration::from_secs(3)) {
                Ok(name) => *tally.served.entry(name).or_default() += 1,
                Err(e) => tally.failed.push((port, format!("{e:#}"))),
            }
        }
        tally
    })
}

/// Starts `xdplb-testbackend` (at `binary`) in every backend namespace,
/// named after it (`b1`, `b2`, ...), and waits until each listens.
pub fn start_backends(topo: &DsrTopology, binary: &Path) -> Result<Vec<Proc>> {
    (1..=topo.backend_count())
        .map(|i| {
            let name = topo.backend_name(i);
            let mut cmd = topo.backend(i).command(binary);
            cmd.args(["--name", &name, "--port", "80"]);
            let mut p = Proc::spawn_with(&mut cmd, &name, false)?;
            p.wait_for_stdout_line("listening", Duration::from_secs(10))?;
            Ok(p)
        })
        .collect()
}
