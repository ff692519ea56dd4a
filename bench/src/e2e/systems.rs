//! The systems measured end to end, each set up on the shared testbed and
//! torn down (by dropping its [`Running`]) before the next one. Adding one
//! is a unit struct implementing [`System`] and a line in [`all`].

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use xdplb_tests::{
    lb::{dsr_config, Xdplb},
    netns::Netns,
    topology::{Shape, Topology},
};

use super::{haproxy, nginx::Nginx};

/// The testbed every system runs on: the DSR topology (client, lb, three
/// backends on one segment, the pass-through program on the lb's peer)
/// with nginx on every backend.
pub struct Bed {
    // Field order is drop order: servers before their namespaces.
    _nginx: Nginx,
    pub topo: Topology,
    pub xdplb: PathBuf,
    /// Scratch directory for the systems' files.
    pub dir: PathBuf,
}

impl Bed {
    /// Builds the topology and starts nginx (pinned to `server_cpu`),
    /// with files under `dir`.
    pub fn new(xdplb: &Path, dir: &Path, server_cpu: Option<usize>) -> Result<Self> {
        let mut topo = Topology::new(Shape::Dsr, "bench", 3)?;
        topo.enable_xdp_tx(xdplb)?;
        // NAT replies pass the lb's XDP program as raw frames: on veth an
        // offloaded (partial) checksum would arrive unfinished. Off for
        // every system alike, as the client's is.
        for i in 1..=topo.backend_count() {
            topo.backend(i)
                .exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
        }
        topo.wait_reachable()?;
        Ok(Self {
            _nginx: Nginx::start(&topo, dir, server_cpu)?,
            topo,
            xdplb: xdplb.to_owned(),
            dir: dir.to_owned(),
        })
    }
}

/// How a system's own CPU cost is read.
#[derive(Clone, Copy, Debug)]
pub enum Cpu {
    /// Nothing to charge (the ceiling has no load balancer).
    None,
    /// utime+stime of this process.
    Process(u32),
    /// run_time_ns of this XDP program.
    XdpProgram(u32),
    /// The machine's softirq time above the ceiling run's (per request).
    SoftirqOverCeiling,
}

/// A system set up on the bed; dropping it tears the system down.
pub struct Running<'a> {
    /// Where the client sends its requests (port 80).
    pub target: IpAddr,
    pub cpu: Cpu,
    /// Backends expected to answer (names).
    pub backends: Vec<String>,
    _teardown: Box<dyn Teardown + 'a>,
}

/// Anything whose `Drop` undoes a setup.
pub trait Teardown {}
impl<T> Teardown for T {}

pub trait System {
    /// The case name in figures.
    fn name(&self) -> &'static str;
    fn setup<'a>(&self, bed: &'a Bed) -> Result<Running<'a>>;
}

/// The case name of the ceiling, the baseline of every ratio.
pub const CEILING: &str = "ceiling";

/// Every system, the ceiling first.
pub fn all() -> Vec<Box<dyn System>> {
    vec![
        Box::new(Ceiling),
        Box::new(XdplbDsr),
        Box::new(XdplbNat),
        Box::new(HaproxyTcp),
        Box::new(IptablesDnat),
    ]
}

fn all_backends(topo: &Topology) -> Vec<String> {
    (1..=topo.backend_count())
        .map(|i| topo.backend_name(i))
        .collect()
}

/// The client straight to backend 1's own address: no load balancer.
pub struct Ceiling;

impl System for Ceiling {
    fn name(&self) -> &'static str {
        CEILING
    }
    fn setup<'a>(&self, bed: &'a Bed) -> Result<Running<'a>> {
        Ok(Running {
            target: bed.topo.backend_addr(1, false),
            cpu: Cpu::None,
            backends: vec![bed.topo.backend_name(1)],
            _teardown: Box::new(()),
        })
    }
}

/// The real `xdplb run` on the lb in DSR mode (VIP on the backends' lo).
pub struct XdplbDsr;

impl System for XdplbDsr {
    fn name(&self) -> &'static str {
        "xdplb-dsr"
    }
    fn setup<'a>(&self, bed: &'a Bed) -> Result<Running<'a>> {
        let lb = Xdplb::start(&bed.xdplb, &bed.topo, &dsr_config(&bed.topo))?;
        wait_xdplb_ready(&lb, &bed.topo)?;
        let prog = xdp_prog_id(bed.topo.lb(), bed.topo.lb_iface())?;
        Ok(Running {
            target: bed.topo.vip4().into(),
            cpu: Cpu::XdpProgram(prog),
            backends: all_backends(&bed.topo),
            _teardown: Box::new(lb),
        })
    }
}

/// The real `xdplb run` on the lb in NAT mode, one-arm: the backends see
/// the lb's own address as source and answer it; the lb translates back.
pub struct XdplbNat;

impl System for XdplbNat {
    fn name(&self) -> &'static str {
        "xdplb-nat"
    }
    fn setup<'a>(&self, bed: &'a Bed) -> Result<Running<'a>> {
        let topo = &bed.topo;
        let mut config = format!(
            "[[service]]\nname = \"web4\"\nvip = \"{}\"\nport = 80\nprotocol = \"tcp\"\nmode = \
                \"nat\"\n",
            topo.vip4()
        );
        for i in 1..=topo.backend_count() {
            config += &format!(
                "[[service.backend]]\naddress = \"{}\"\n",
                topo.backend_addr(i, false)
            );
        }
        let lb = Xdplb::start(&bed.xdplb, topo, &config)?;
        wait_xdplb_ready(&lb, topo)?;
        let prog = xdp_prog_id(topo.lb(), topo.lb_iface())?;
        Ok(Running {
            target: topo.vip4().into(),
            cpu: Cpu::XdpProgram(prog),
            backends: all_backends(topo),
            _teardown: Box::new(lb),
        })
    }
}

/// Every backend of `web4` healthy, active, with its MAC resolved.
fn wait_xdplb_ready(lb: &Xdplb, topo: &Topology) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = lb.json(&["backend", "list", "web4"])?;
        let ready = list.as_array().is_some_and(|l| {
            l.len() == topo.backend_count()
                && l.iter()
                    .all(|b| b["health"] == "up" && b["state"] == "active" && b["mac"].is_string())
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("xdplb backends not ready: {list}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Id of the XDP program attached to `iface` in `ns`.
fn xdp_prog_id(ns: &Netns, iface: &str) -> Result<u32> {
    let out = ns.exec(&["ip", "-j", "-d", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let xdp = &v[0]["xdp"];
    xdp["prog"]["id"]
        .as_u64()
        .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
        .map(|id| id as u32)
        .with_context(|| format!("no XDP program on {iface}: {xdp}"))
}

/// HAProxy `mode tcp`, `balance roundrobin`, on the lb's own address,
/// connecting to the backends' own addresses.
pub struct HaproxyTcp;

impl System for HaproxyTcp {
    fn name(&self) -> &'static str {
        "haproxy"
    }
    fn setup<'a>(&self, bed: &'a Bed) -> Result<Running<'a>> {
        let topo = &bed.topo;
        let dir = bed.dir.join("haproxy");
        std::fs::create_dir_all(&dir)?;
        let config = haproxy::Config {
            bind: SocketAddr::new(topo.lb_addr(false), 80),
            servers: (1..=topo.backend_count())
                .map(|i| {
                    (
                        topo.backend_name(i),
                        SocketAddr::new(topo.backend_addr(i, false), 80),
                    )
                })
                .collect(),
            log: false,
        };
        let h = haproxy::Haproxy::start(topo.lb(), &dir, &config)?;
        Ok(Running {
            target: topo.lb_addr(false),
            cpu: Cpu::Process(h.pid()),
            backends: all_backends(topo),
            _teardown: Box::new(h),
        })
    }
}

/// kube-proxy's method: DNAT to a backend picked by `-m statistic --mode
/// random` rules on PREROUTING for the VIP, MASQUERADE so replies come
/// back through the lb, IP forwarding on (for this system only).
pub struct IptablesDnat;

impl System for IptablesDnat {
    fn name(&self) -> &'static str {
        "iptables-dnat"
    }
    fn setup<'a>(&self, bed: &'a Bed) -> Result<Running<'a>> {
        let topo = &bed.topo;
        // Owned from the start, so a failure below still cleans up.
        let guard = IptablesGuard(topo.lb());
        let ipt = |args: &str| -> Result<()> {
            let mut argv = vec!["iptables", "-w", "-t", "nat"];
            argv.extend(args.split_whitespace());
            topo.lb().exec(&argv).map(drop)
        };
        let n = topo.backend_count();
        ipt("-N BENCH-SVC")?;
        for i in 1..=n {
            ipt(&format!("-N BENCH-SEP-{i}"))?;
            ipt(&format!(
                "-A BENCH-SEP-{i} -p tcp -j DNAT --to-destination {}:80",
                topo.backend_addr(i, false)
            ))?;
            // kube-proxy: rule i of n matches with probability 1/(n-i+1);
            // the last one always.
            let pick = if i < n {
                format!(
                    "-m statistic --mode random --probability {:.11}",
                    1.0 / (n - i + 1) as f64
                )
            } else {
                String::new()
            };
            ipt(&format!("-A BENCH-SVC {pick} -j BENCH-SEP-{i}"))?;
        }
        ipt(&format!(
            "-A PREROUTING -d {}/32 -p tcp --dport 80 -j BENCH-SVC",
            topo.vip4()
        ))?;
        ipt("-A POSTROUTING -m conntrack --ctstate DNAT -j MASQUERADE")?;
        // Forwarding out of the interface it came in on: no ICMP redirects
        // (they would send the client straight to a backend).
        for scope in ["all", topo.lb_iface()] {
            topo.lb()
                .sysctl(&format!("net.ipv4.conf.{scope}.send_redirects"), "0")?;
        }
        topo.lb().sysctl("net.ipv4.ip_forward", "1")?;
        Ok(Running {
            target: topo.vip4().into(),
            cpu: Cpu::SoftirqOverCeiling,
            backends: all_backends(topo),
            _teardown: Box::new(guard),
        })
    }
}

/// Undoes [`IptablesDnat`]: forwarding off, rules and chains gone (with
/// iptables-nft, `-X` deletes the emptied built-in chains too), so no NAT
/// or conntrack hook is left on the lb's packets for the next system.
struct IptablesGuard<'a>(&'a Netns);

impl Drop for IptablesGuard<'_> {
    fn drop(&mut self) {
        let ns = self.0;
        let _ = ns.sysctl("net.ipv4.ip_forward", "0");
        for op in ["-F", "-X"] {
            let _ = ns.exec(&["iptables", "-w", "-t", "nat", op]);
        }
        for scope in ["all", "eth0"] {
            let _ = ns.sysctl(&format!("net.ipv4.conf.{scope}.send_redirects"), "1");
        }
    }
}
