//! The NAT sweeper against the datapath, in the window where they race: the
//! sweeper has read both tables and judged a flow idle, then a packet of
//! that flow arrives (through the real program, BPF_PROG_TEST_RUN) before
//! the sweeper deletes. The sweeper must not delete the entry the packet
//! refreshed or replaced: the flow keeps its translation. Thousands of
//! rounds, alternating a client packet (which re-translates the idle flow)
//! and a backend reply (which refreshes the reply entry). Entries are aged
//! by writing their timestamps through the maps, not by sleeping. Needs
//! root (BPF).

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun, TestRunOptions};
use xdp_common::{Backend, FlowKey, Globals, Service, BACKEND_ACTIVE, PROTO_UDP, SVC_F_NAT};
use xdplb::{
    addr,
    dataplane::{monotonic_coarse_ns, Maps},
    loader::Datapath,
};

const XDP_TX: u32 = 3;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
/// BPF_PROG_TEST_RUN runs the program as if received on loopback.
const LO_IFINDEX: u32 = 1;
const TABLE_SIZE: u32 = 251;
const ROUNDS: usize = 2_000;

const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 0, 1), 5000);
const VIP: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 0, 100), 53);
const BACKEND: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 1, 0, 11), 53);
const SNAT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0: none, as IPv4 allows).
fn udp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), macs: [[u8; 6]; 2]) -> Vec<u8> {
    let payload = b"ping";
    let mut f = Vec::new();
    f.extend_from_slice(&macs[0]);
    f.extend_from_slice(&macs[1]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + 8 + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, PROTO_UDP, 0, 0]);
    ip.extend_from_slice(&src.0.octets());
    ip.extend_from_slice(&dst.0.octets());
    let sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    let check = !((sum & 0xffff) + (sum >> 16)) as u16;
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&src.1.to_be_bytes());
    f.extend_from_slice(&dst.1.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// The loaded program and its maps, pinned in a directory of their own
/// that is removed when dropped (also on panic).
struct Harness {
    datapath: Datapath,
    maps: Maps,
    pin_dir: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn run(datapath: &mut Datapath, frame: &[u8]) -> u32 {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..Default::default()
    };
    datapath
        .program()
        .test_run(opts)
        .expect("BPF_PROG_TEST_RUN")
        .return_value
}

fn harness() -> Harness {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/xdplb-sweep-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut datapath = Datapath::load(&pin_dir).unwrap_or_else(|e| {
        let _ = std::fs::remove_dir_all(&pin_dir);
        panic!("loading the XDP program (tests need root): {e:#}")
    });
    let maps = Maps::take(&mut datapath.ebpf).unwrap();
    let mut h = Harness {
        datapath,
        maps,
        pin_dir,
    };
    let m = &mut h.maps;
    m.backends
        .set(
            0,
            Backend {
                addr: addr::to_words(BACKEND.0.into()),
                dst_mac: BACKEND_MAC,
                src_mac: LB_MAC,
                ifindex: LO_IFINDEX,
                state: BACKEND_ACTIVE,
                snat_addr: addr::to_words(SNAT.into()),
                service: 0,
                port_be: BACKEND.1.to_be(),
                _pad: [0; 2],
            },
            0,
        )
        .unwrap();
    m.write_table(0, &[0; TABLE_SIZE as usize]).unwrap();
    let service = Service {
        id: 0,
        flags: SVC_F_NAT,
        table_base: 0,
        table_size: TABLE_SIZE,
        nat_port_base: 40000,
        nat_port_count: 1000,
        nat_tcp_timeout: 60,
        nat_closing_timeout: 10,
        nat_udp_timeout: 60,
    };
    m.services
        .insert(
            addr::service_key(VIP.0.into(), VIP.1, PROTO_UDP),
            service,
            0,
        )
        .unwrap();
    m.globals.set(0, Globals { nat_enabled: 1 }, 0).unwrap();
    h
}

/// The flow's two entries: (client-side key, reply key).
fn entries(maps: &Maps) -> (FlowKey, Option<FlowKey>) {
    let fwd_key = addr::flow_key(
        (CLIENT.0, CLIENT.1).into(),
        (VIP.0, VIP.1).into(),
        PROTO_UDP,
    );
    let rev_key = maps.nat_fwd.get(&fwd_key, 0).ok().map(|f| {
        addr::flow_key(
            (BACKEND.0, BACKEND.1).into(),
            (SNAT, u16::from_be(f.nat_port_be)).into(),
            PROTO_UDP,
        )
    });
    (fwd_key, rev_key)
}

#[test]
fn the_sweeper_never_deletes_a_flow_a_packet_refreshed_after_its_scan() {
    let mut h = harness();
    let to_vip = udp_frame(CLIENT, VIP, [LB_MAC, CLIENT_MAC]);
    assert_eq!(run(&mut h.datapath, &to_vip), XDP_TX, "first packet");
    let (fwd_key, rev_key) = entries(&h.maps);
    let rev_key = rev_key.expect("the flow is translated");
    let port = u16::from_be(rev_key.dport_be);
    let reply = udp_frame(BACKEND, (SNAT, port), [LB_MAC, BACKEND_MAC]);

    for round in 0..ROUNDS {
        // Both entries idle: stamped at boot time.
        let mut fwd = h.maps.nat_fwd.get(&fwd_key, 0).unwrap();
        let mut rev = h.maps.nat_rev.get(&rev_key, 0).unwrap();
        fwd.last_seen_ns = 0;
        rev.last_seen_ns = 0;
        h.maps.nat_fwd.insert(fwd_key, fwd, 0).unwrap();
        h.maps.nat_rev.insert(rev_key, rev, 0).unwrap();

        let packet = if round % 2 == 0 { &to_vip } else { &reply };
        let datapath = &mut h.datapath;
        let occupancy = h
            .maps
            .sweep_nat_with(monotonic_coarse_ns(), || {
                assert_eq!(run(datapath, packet), XDP_TX, "round {round}: packet");
            })
            .unwrap();

        assert_eq!(
            occupancy.reclaimed, 0,
            "round {round}: the sweeper deleted a refreshed entry"
        );
        let (_, now_rev) = entries(&h.maps);
        assert_eq!(
            now_rev,
            Some(rev_key),
            "round {round}: the flow lost or changed its translation"
        );
        let rev = h.maps.nat_rev.get(&rev_key, 0).unwrap();
        assert_eq!(rev.client_key(PROTO_UDP), fwd_key, "round {round}");
    }

    // And an idle flow no packet touches is still reclaimed.
    let mut fwd = h.maps.nat_fwd.get(&fwd_key, 0).unwrap();
    let mut rev = h.maps.nat_rev.get(&rev_key, 0).unwrap();
    fwd.last_seen_ns = 0;
    rev.last_seen_ns = 0;
    h.maps.nat_fwd.insert(fwd_key, fwd, 0).unwrap();
    h.maps.nat_rev.insert(rev_key, rev, 0).unwrap();
    let occupancy = h.maps.sweep_nat_with(monotonic_coarse_ns(), || ()).unwrap();
    assert_eq!(occupancy.reclaimed, 1);
    assert!(h.maps.nat_fwd.get(&fwd_key, 0).is_err());
    assert!(h.maps.nat_rev.get(&rev_key, 0).is_err());
}
