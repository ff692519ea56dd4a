//! The real xdplb program, loaded with its maps pinned in a directory of
//! the bench's own, and populated directly (as tests/tests/fixtures.rs
//! does): no daemon involved.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, Result};
use aya::programs::Xdp;
use xdp_common::{Backend, Globals, Service, BACKEND_ACTIVE, SVC_F_NAT};
use xdplb::{
    addr,
    dataplane::Maps,
    loader::Datapath,
    maglev::{self, MaglevBackend},
};

use crate::harness::PinDir;

pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// The loaded program and its maps; the pins are removed on drop (after
/// the program and maps are closed: fields drop in order).
pub struct Loaded {
    pub datapath: Datapath,
    pub maps: Maps,
    _pins: PinDir,
}

impl Loaded {
    pub fn new(tag: &str) -> Result<Self> {
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

    /// Lets the program balance frames to `mac` arriving on `ifindex` (it
    /// passes every other frame untouched).
    pub fn accept_mac(&mut self, ifindex: u32, mac: [u8; 6]) -> Result<()> {
        xdplb::cluster::macs::IfMacs::take(&mut self.datapath.ebpf)?.sync(&[(ifindex, mac)], &[])
    }

    /// The program and the maps, borrowed separately.
    pub fn parts(&mut self) -> (&Xdp, &mut Maps) {
        let prog: &Xdp = self.datapath.program();
        (prog, &mut self.maps)
    }

    /// Writes backend `id`: frames to it leave through `ifindex` with
    /// these MACs.
    pub fn backend(
        &mut self,
        id: u32,
        ip: IpAddr,
        dst_mac: [u8; 6],
        src_mac: [u8; 6],
        ifindex: u32,
        state: u32,
    ) -> Result<()> {
        let b = Backend {
            addr: addr::to_words(ip),
            dst_mac,
            src_mac,
            ifindex,
            state,
            port_be: 80u16.to_be(),
            ..Default::default()
        };
        self.maps
            .backends
            .set(id, b, 0)
            .with_context(|| format!("writing backend {id}"))
    }

    /// Writes `table` at `base` of the Maglev array and points the service
    /// at `vip` over `proto` at it.
    #[allow(clippy::needless_update)] // Service grows fields (NAT) that default to zero.
    pub fn service(
        &mut self,
        vip: SocketAddr,
        proto: u8,
        id: u32,
        base: u32,
        table: &[u32],
    ) -> Result<()> {
        self.maps.write_table(base, table)?;
        let svc = Service {
            id,
            flags: 0,
            table_base: base,
            table_size: table.len() as u32,
            ..Default::default()
        };
        self.maps
            .services
            .insert(addr::service_key(vip.ip(), vip.port(), proto), svc, 0)
            .with_context(|| format!("writing service {vip}"))
    }
}

impl Loaded {
    /// A NAT service at `vip` whose table names `backend` only, which
    /// listens on `backend_port` and sees `snat` as source; NAT enabled.
    #[expect(clippy::too_many_arguments, reason = "one fixture row, spelled out")]
    pub fn nat_service(
        &mut self,
        vip: SocketAddr,
        proto: u8,
        id: u32,
        base: u32,
        backend: u32,
        backend_port: u16,
        snat: IpAddr,
    ) -> Result<()> {
        let mut b = self.maps.backend(backend)?;
        b.snat_addr = addr::to_words(snat);
        b.port_be = backend_port.to_be();
        self.maps.backends.set(backend, b, 0)?;
        self.maps.write_table(base, &vec![backend; 251])?;
        let svc = Service {
            id,
            flags: SVC_F_NAT,
            table_base: base,
            table_size: 251,
            nat_port_base: 10000,
            nat_port_count: 22768,
            nat_tcp_timeout: 3600,
            nat_closing_timeout: 10,
            nat_udp_timeout: 60,
        };
        self.maps
            .services
            .insert(addr::service_key(vip.ip(), vip.port(), proto), svc, 0)?;
        self.maps.globals.set(0, Globals { nat_enabled: 1 }, 0)?;
        Ok(())
    }
}

/// `n` active backends, ids `first..first + n`, at 10.`net`.x.y, with
/// their Maglev table of `size` slots (built by xdplb::maglev::build).
pub fn backends_with_table(
    loaded: &mut Loaded,
    first: u32,
    n: u32,
    net: u8,
    size: u32,
    lb_mac: [u8; 6],
    ifindex: u32,
) -> Result<Vec<u32>> {
    let mut members = Vec::new();
    for i in 0..n {
        let ip = IpAddr::from([10, net, (i >> 8) as u8, i as u8 + 1]);
        let mac = [0x02, 0xbe, 0, net, (i >> 8) as u8, i as u8];
        loaded.backend(first + i, ip, mac, lb_mac, ifindex, BACKEND_ACTIVE)?;
        members.push(MaglevBackend {
            key: format!("{ip}:80"),
            id: first + i,
            weight: 1,
        });
    }
    Ok(maglev::build(&members, size)?)
}
