//! The benchmarks' services and backends, written into the test kit's
//! datapath harness (`xdplb_tests::datapath`, shared with the packet
//! fixtures): the real program, populated directly, no daemon involved.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, Result};
use xdp_common::{Backend, BACKEND_ACTIVE};
use xdplb::{
    addr,
    maglev::{self, MaglevBackend},
};
use xdplb_tests::datapath::{dsr_service, nat_service as nat_service_row, DEFAULT_TIMEOUTS};
pub use xdplb_tests::datapath::{TestDatapath as Loaded, XDP_PASS, XDP_TX};

/// Writes backend `id` of `lb`: frames to it leave through `ifindex` with
/// these MACs.
pub fn backend(
    lb: &mut Loaded,
    id: u32,
    ip: IpAddr,
    macs: ([u8; 6], [u8; 6]),
    ifindex: u32,
    state: u32,
) -> Result<()> {
    let (dst_mac, src_mac) = macs;
    let b = Backend {
        addr: addr::to_words(ip),
        dst_mac,
        src_mac,
        ifindex,
        state,
        port_be: 80u16.to_be(),
        ..Default::default()
    };
    lb.set_backend(id, b)
}

/// Writes `table` at `base` of the Maglev array and points the service at
/// `vip` over `proto` at it.
pub fn service(
    lb: &mut Loaded,
    (vip, proto): (SocketAddr, u8),
    id: u32,
    base: u32,
    table: &[u32],
) -> Result<()> {
    lb.set_service(vip, proto, dsr_service(id, base, table.len() as u32), table)
}

/// A NAT service at `vip` whose table names `backend` only, which listens
/// on `backend_port` and sees `snat` as source; NAT enabled.
pub fn nat_service(
    lb: &mut Loaded,
    (vip, proto): (SocketAddr, u8),
    (id, base): (u32, u32),
    (backend, backend_port): (u32, u16),
    snat: IpAddr,
    ports: (u16, u16),
) -> Result<()> {
    let mut b = lb.maps.backend(backend)?;
    b.snat_addr = addr::to_words(snat);
    b.port_be = backend_port.to_be();
    lb.set_backend(backend, b)?;
    let svc = nat_service_row(id, base, 251, ports, DEFAULT_TIMEOUTS);
    lb.set_service(vip, proto, svc, &[backend])
        .context("writing the NAT service")?;
    lb.set_nat_enabled(true)
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
        // Wrapping, as release builds always did: .0 hosts are fine on a test run.
        let ip = IpAddr::from([10, net, (i >> 8) as u8, (i as u8).wrapping_add(1)]);
        let mac = [0x02, 0xbe, 0, net, (i >> 8) as u8, i as u8];
        backend(
            loaded,
            first + i,
            ip,
            (mac, lb_mac),
            ifindex,
            BACKEND_ACTIVE,
        )?;
        members.push(MaglevBackend {
            key: format!("{ip}:80"),
            id: first + i,
            weight: 1,
        });
    }
    Ok(maglev::build(&members, size)?)
}
