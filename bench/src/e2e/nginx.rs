//! nginx in every backend namespace of a topology, run by hand (not as a
//! service) with its own configuration, pid file and logs in a scratch
//! directory. Each serves a 100-byte `index.html` whose trimmed text is
//! the backend's name, so `xdplb_tests::client::get` tells who answered.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use xdplb_tests::{client, proc::Proc, topology::Topology};

/// Size of the file every request fetches.
pub const BODY_BYTES: usize = 100;

/// The nginx masters (one per backend); dropping stops them (SIGTERM:
/// fast shutdown, workers included).
pub struct Nginx {
    _procs: Vec<Proc>,
}

impl Nginx {
    /// Starts nginx in each backend namespace, one worker each, pinned to
    /// `cpu` if given; files under `dir`. Waits until each answers.
    pub fn start(topo: &Topology, dir: &Path, cpu: Option<usize>) -> Result<Self> {
        let mut procs = Vec::new();
        for i in 1..=topo.backend_count() {
            let name = topo.backend_name(i);
            let home = dir.join(format!("nginx-{name}"));
            std::fs::create_dir_all(home.join("www"))?;
            std::fs::create_dir_all(home.join("tmp"))?;
            let mut body = format!("{name}{}", " ".repeat(BODY_BYTES));
            body.truncate(BODY_BYTES - 1);
            body.push('\n');
            std::fs::write(home.join("www/index.html"), body)?;
            std::fs::write(home.join("nginx.conf"), config(&home, cpu))?;
            let mut cmd = topo.backend(i).command("nginx");
            cmd.arg("-p")
                .arg(&home)
                .arg("-e")
                .arg(home.join("error.log"));
            cmd.arg("-c")
                .arg(home.join("nginx.conf"))
                .args(["-g", "daemon off;"]);
            procs.push(Proc::spawn_with(&mut cmd, &format!("nginx-{name}"), false)?);
        }
        for (i, p) in procs.iter_mut().enumerate() {
            let addr = SocketAddr::new(topo.backend_addr(i + 1, false), 80);
            wait_serving(topo, addr, &topo.backend_name(i + 1), p)?;
        }
        Ok(Self { _procs: procs })
    }
}

fn config(home: &Path, cpu: Option<usize>) -> String {
    let h = home.display();
    // worker_cpu_affinity takes a bit mask, CPU 0 rightmost.
    let affinity = cpu
        .map(|c| format!("worker_cpu_affinity 1{};\n", "0".repeat(c)))
        .unwrap_or_default();
    format!(
        "worker_processes 1;
{affinity}pid {h}/nginx.pid;
error_log {h}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path {h}/tmp/body;
    proxy_temp_path {h}/tmp/proxy;
    fastcgi_temp_path {h}/tmp/fastcgi;
    uwsgi_temp_path {h}/tmp/uwsgi;
    scgi_temp_path {h}/tmp/scgi;
    server {{
        listen 0.0.0.0:80 backlog=4096;
        listen [::]:80 backlog=4096;
        root {h}/www;
    }}
}}
"
    )
}

/// Polls `addr` from the client until it answers with `name`.
fn wait_serving(topo: &Topology, addr: SocketAddr, name: &str, proc: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = topo
            .client()
            .run(|| client::get(addr, None, Duration::from_millis(500)));
        match got {
            Ok(body) if body == name => return Ok(()),
            Ok(body) => bail!("{addr} answered {body:?}, expected {name:?}"),
            Err(e) if Instant::now() > deadline || proc.try_wait()?.is_some() => {
                return Err(e).with_context(|| {
                    format!("nginx on {addr} not serving:\n{}", proc.output_text())
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}
