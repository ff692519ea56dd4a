//! One datapath harness for the packet fixtures and the benchmarks: the
//! real compiled xdplb program, loaded with its maps pinned in a bpffs
//! directory of its own, populated directly (no daemon), and run on frames
//! with BPF_PROG_TEST_RUN. Needs root.
//!
//! BPF_PROG_TEST_RUN runs the program as if the frame had been received on
//! loopback, so backends get [`LO_IFINDEX`] and forwards are [`XDP_TX`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use xdp_common::{Backend, Globals, Reason, Service, SVC_F_NAT};
use xdplb::{addr, dataplane::Maps, loader::Datapath};

use crate::RemoveOnDrop;

/// XDP verdicts.
pub const XDP_DROP: u32 = 1;
/// See [`XDP_DROP`].
pub const XDP_PASS: u32 = 2;
/// See [`XDP_DROP`].
pub const XDP_TX: u32 = 3;

/// The interface BPF_PROG_TEST_RUN pretends a frame came in on.
pub const LO_IFINDEX: u32 = 1;

/// Slots of a small Maglev table (a prime), enough for fixtures.
pub const TABLE_SIZE: u32 = 251;

/// A bpffs directory of this process's own, removed with everything in it
/// when dropped, also on panic.
pub struct PinDir(RemoveOnDrop);

impl PinDir {
    /// A fresh directory name under /sys/fs/bpf tagged with `tag`, this
    /// process and a counter (not created: loading the program does).
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        Self(RemoveOnDrop(PathBuf::from(format!(
            "/sys/fs/bpf/xdplb-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0 .0
    }
}

/// NAT idle timeouts of a service, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Established TCP.
    pub tcp: u32,
    /// TCP after a FIN or RST.
    pub closing: u32,
    /// UDP.
    pub udp: u32,
}

/// The configuration's default timeouts: 1h, 10s, 60s.
pub const DEFAULT_TIMEOUTS: Timeouts = Timeouts {
    tcp: 3600,
    closing: 10,
    udp: 60,
};

/// A DSR service `id` whose table of `size` slots starts at `base`.
pub fn dsr_service(id: u32, base: u32, size: u32) -> Service {
    Service {
        id,
        table_base: base,
        table_size: size,
        ..Default::default()
    }
}

/// A NAT service `id` whose table of `size` slots starts at `base`,
/// translating to source ports `ports.0 .. ports.0 + ports.1`.
pub fn nat_service(id: u32, base: u32, size: u32, ports: (u16, u16), t: Timeouts) -> Service {
    Service {
        id,
        flags: SVC_F_NAT,
        table_base: base,
        table_size: size,
        nat_port_base: ports.0,
        nat_port_count: ports.1,
        nat_tcp_timeout: t.tcp,
        nat_closing_timeout: t.closing,
        nat_udp_timeout: t.udp,
    }
}

/// Runs `prog` once on `input`: (verdict, output frame). For a caller
/// that holds the maps borrowed too (see [`TestDatapath::parts`]).
pub fn run(prog: &Xdp, input: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; input.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let res = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(res.data_size_out as usize);
    Ok((res.return_value, out))
}

/// The loaded program and its maps; the pins are removed on drop (after
/// the program and maps are closed: fields drop in order).
pub struct TestDatapath {
    /// The program and its `Ebpf` object.
    pub datapath: Datapath,
    /// Its maps, taken from the object.
    pub maps: Maps,
    _pins: PinDir,
}

impl TestDatapath {
    /// Loads the program with its maps pinned in a new directory tagged
    /// with `tag`.
    pub fn load(tag: &str) -> Result<Self> {
        let pins = PinDir::new(tag);
        let mut datapath =
            Datapath::load(pins.path()).context("loading the xdplb program (needs root)")?;
        let maps = Maps::take(&mut datapath.ebpf)?;
        Ok(Self {
            datapath,
            maps,
            _pins: pins,
        })
    }

    /// Lets the program balance frames to `macs` (`(ifindex, MAC)` pairs)
    /// and to `anywhere` on any interface: it passes every other frame
    /// untouched. BPF_PROG_TEST_RUN runs the program as if on loopback
    /// ([`LO_IFINDEX`]).
    pub fn accept_macs(&mut self, macs: &[(u32, [u8; 6])], anywhere: &[[u8; 6]]) -> Result<()> {
        self.maps.accepted_macs.sync(macs, anywhere)
    }

    /// The bpffs directory the maps are pinned in.
    pub fn pin_dir(&self) -> &Path {
        self._pins.path()
    }

    /// The program and the maps, borrowed separately.
    pub fn parts(&mut self) -> (&Xdp, &mut Maps) {
        (self.datapath.program(), &mut self.maps)
    }

    /// Runs the program once on `input`: (verdict, output frame).
    pub fn run(&mut self, input: &[u8]) -> Result<(u32, Vec<u8>)> {
        run(self.datapath.program(), input)
    }

    /// How often the program counted `reason` so far.
    pub fn reason(&self, reason: Reason) -> Result<u64> {
        self.maps.reason_count(reason)
    }

    /// Writes backend `id`.
    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.maps
            .backends
            .set(id, backend, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    /// Points the service at `vip` over `proto` at `svc`, after writing its
    /// table: `members` repeated to fill `svc.table_size` slots (none for
    /// a service without backends).
    pub fn set_service(
        &mut self,
        vip: SocketAddr,
        proto: u8,
        svc: Service,
        members: &[u32],
    ) -> Result<()> {
        if !members.is_empty() {
            let table: Vec<u32> = (0..svc.table_size as usize)
                .map(|i| members[i % members.len()])
                .collect();
            self.maps.write_table(svc.table_base, &table)?;
        }
        self.maps
            .services
            .insert(addr::service_key(vip.ip(), vip.port(), proto), svc, 0)
            .with_context(|| format!("writing service {vip}"))
    }

    /// Turns NAT on or off (the globals' switch).
    pub fn set_nat_enabled(&mut self, on: bool) -> Result<()> {
        self.set_globals(|g| g.nat_enabled = u32::from(on))
    }

    /// Turns the reporting of pinned flows for replication on or off.
    pub fn set_replicate(&mut self, on: bool) -> Result<()> {
        self.set_globals(|g| g.replicate = u32::from(on))
    }

    fn set_globals(&mut self, change: impl FnOnce(&mut Globals)) -> Result<()> {
        let mut g = self.maps.globals.get(&0, 0)?;
        change(&mut g);
        Ok(self.maps.globals.set(0, g, 0)?)
    }
}
