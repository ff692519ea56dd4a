//! HAProxy in `mode tcp` in a namespace, run by hand (`haproxy -f CONF
//! -db`) with its configuration and stats socket in a scratch directory.
//! Health checks: TCP connect, `inter 1s rise 2 fall 3`, 500 ms timeout
//! (xdplb's defaults).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use xdplb_tests::{netns::Netns, proc::Proc};

/// The load-balancing part of the configuration.
pub struct Config {
    pub bind: SocketAddr,
    /// (server name, address).
    pub servers: Vec<(String, SocketAddr)>,
    /// Log every connection (`option tcplog`) to stdout, for
    /// [`Haproxy::servers_by_port`].
    pub log: bool,
}

/// A running HAProxy; dropping it stops it.
pub struct Haproxy {
    proc: Proc,
    socket: PathBuf,
}

impl Haproxy {
    /// Writes the configuration under `dir`, starts HAProxy in `ns` and
    /// waits until every server is UP.
    pub fn start(ns: &Netns, dir: &Path, config: &Config) -> Result<Self> {
        let socket = dir.join("haproxy.sock");
        let conf = dir.join("haproxy.cfg");
        std::fs::write(&conf, render(config, &socket))?;
        let mut cmd = ns.command("haproxy");
        cmd.arg("-f").arg(&conf).arg("-db");
        let proc = Proc::spawn_with(&mut cmd, "haproxy", false)?;
        let mut h = Self { proc, socket };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status = h.status();
            if let Ok(s) = &status {
                if s.len() == config.servers.len() && s.values().all(|v| v == "UP") {
                    return Ok(h);
                }
            }
            if Instant::now() > deadline || h.proc.try_wait()?.is_some() {
                bail!("haproxy not ready ({status:?}):\n{}", h.proc.output_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Each server's status from `show stat` ("UP", "UP 1/3", "DOWN", ...).
    pub fn status(&self) -> Result<BTreeMap<String, String>> {
        let text = self.command("show stat")?;
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .context("empty show stat")?
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .with_context(|| format!("no {name} column"))
        };
        let (px, sv, st) = (col("pxname")?, col("svname")?, col("status")?);
        let mut out = BTreeMap::new();
        for l in lines {
            let f: Vec<&str> = l.split(',').collect();
            if f.len() > st && f[px] == "be" && f[sv] != "BACKEND" {
                out.insert(f[sv].to_owned(), f[st].to_owned());
            }
        }
        Ok(out)
    }

    /// The server each logged connection went to, by client source port.
    pub fn servers_by_port(&self) -> BTreeMap<u16, String> {
        // `option tcplog`, raw: "10.77.0.1:40000 [date] fe be/b1 0/0/5 ..."
        self.proc
            .output()
            .iter()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let port = w.first()?.rsplit_once(':')?.1.parse().ok()?;
                let server = w.get(3)?.strip_prefix("be/")?;
                Some((port, server.to_owned()))
            })
            .collect()
    }

    /// One command on the stats socket; its answer.
    fn command(&self, cmd: &str) -> Result<String> {
        let mut s = UnixStream::connect(&self.socket)
            .with_context(|| format!("connecting {}", self.socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("{cmd}\n").as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    }
}

fn render(c: &Config, socket: &Path) -> String {
    let (log_global, log_defaults) = if c.log {
        (
            "    log stdout format raw local0\n",
            "    log global\n    option tcplog\n",
        )
    } else {
        ("", "")
    };
    let servers: String = c
        .servers
        .iter()
        .map(|(name, addr)| format!("    server {name} {addr} check inter 1s rise 2 fall 3\n"))
        .collect();
    format!(
        "global
    maxconn 8000
    stats socket {} mode 600 level admin
{log_global}
defaults
    mode tcp
{log_defaults}    timeout connect 500ms
    timeout check 500ms
    timeout client 30s
    timeout server 30s

frontend fe
    bind {}
    default_backend be

backend be
    balance roundrobin
{servers}",
        socket.display(),
        c.bind
    )
}
