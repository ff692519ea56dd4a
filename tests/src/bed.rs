//! The end-to-end testbed most daemon tests share: a [`Topology`] (DSR, unless
//! said otherwise) with
//! `xdplb-testbackend` serving HTTP on every backend, the pass-through on
//! the lb's peer, and the real daemon running a given configuration.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    bin_path,
    lb::{start_backend, start_backends, Tally, Xdplb},
    netns::exec_line,
    proc::Proc,
    require_root,
    topology::{Shape, Topology},
    traffic,
};

/// Every bed's first steps, before its daemon starts: the topology of
/// `shape` (namespaces tagged `tag`) with `backends` backends, the
/// pass-through on the lb's peers, `testbackend` serving on every backend,
/// all reachable. Panics (the test fails) if any step fails; needs root.
pub fn served(
    shape: Shape,
    tag: &str,
    backends: usize,
    xdplb: &Path,
    testbackend: &Path,
) -> (Topology, Vec<Proc>) {
    require_root();
    let mut topo = Topology::new(shape, tag, backends).expect("topology");
    topo.enable_xdp_tx(xdplb)
        .expect("pass-through on the lb's peers");
    let backends = start_backends(&topo, testbackend).expect("backends");
    topo.wait_reachable().expect("testbed reachable");
    (topo, backends)
}

/// The DSR testbed with the daemon on it. Fields drop in order: daemon,
/// backends, topology.
pub struct Bed {
    pub lb: Xdplb,
    /// Backend `i`'s server is `backends[i - 1]`.
    pub backends: Vec<Proc>,
    pub topo: Topology,
    /// The `xdplb` binary.
    pub xdplb: PathBuf,
    testbackend: PathBuf,
}

impl Bed {
    /// Builds the DSR topology (namespaces tagged `tag`) with `backends`
    /// backends, starts their servers, waits until everything is reachable
    /// and starts the daemon with `config(&topo)`. Panics (the test fails)
    /// if any step fails; needs root.
    pub fn dsr(tag: &str, backends: usize, config: impl FnOnce(&Topology) -> String) -> Self {
        Self::new(Shape::Dsr, tag, backends, config)
    }

    /// [`Bed::dsr`] in another shape.
    pub fn new(
        shape: Shape,
        tag: &str,
        backends: usize,
        config: impl FnOnce(&Topology) -> String,
    ) -> Self {
        let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
        let testbackend = bin_path("xdplb-testbackend").expect("xdplb-testbackend binary");
        let (topo, backends) = served(shape, tag, backends, &xdplb, &testbackend);
        let lb = Xdplb::start(&xdplb, &topo, &config(&topo)).expect("xdplb");
        Self {
            lb,
            backends,
            topo,
            xdplb,
            testbackend,
        }
    }

    /// The IPv4 VIP, port 80 (service `web4`).
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.topo.vip4().into(), 80)
    }

    /// Backend `i`'s IPv4 address.
    pub fn addr(&self, i: usize) -> IpAddr {
        self.topo.backend_addr(i, false)
    }

    /// Backend `i` of `web4` as the API shows it.
    pub fn backend(&self, i: usize) -> serde_json::Value {
        self.lb.backend("web4", self.addr(i)).unwrap()
    }

    /// Backend `i`'s health in `web4` (`up`, `down`, ...).
    pub fn health(&self, i: usize) -> String {
        self.backend(i)["health"].as_str().unwrap().to_owned()
    }

    /// Polls backend `i`'s health until it is `want`; returns when.
    /// Panics once `limit` has passed since `since`.
    pub fn wait_health(&self, i: usize, want: &str, since: Instant, limit: Duration) -> Instant {
        self.lb
            .wait_health("web4", self.addr(i), want, since, limit)
    }

    /// `ip link show` of the lb's interface (names an attached program).
    pub fn lb_link(&self) -> String {
        let show = format!("ip link show dev {}", self.topo.lb_iface());
        exec_line(self.topo.lb(), &show)
    }

    /// Stops backend `i`'s server (if it still runs) and starts it again
    /// with `extra` arguments (see [`start_backend`]).
    pub fn restart_backend(&mut self, i: usize, extra: &[&str]) {
        self.backends[i - 1].terminate().unwrap();
        self.backends[i - 1] = start_backend(&self.topo, &self.testbackend, i, extra).unwrap();
    }

    /// One HTTP GET to the IPv4 VIP from each of `ports`, from the client
    /// (see [`traffic::requests`]).
    pub fn requests(&self, ports: impl Iterator<Item = u16> + Send) -> Tally {
        traffic::requests(self.topo.client(), self.vip(), ports)
    }
}
