//! The NAT sweeper against the datapath, in the window where they race: the
//! sweeper has read both tables and judged a flow idle, then a packet of
//! that flow arrives (through the real program, BPF_PROG_TEST_RUN) before
//! the sweeper deletes. The sweeper must not delete the entry the packet
//! refreshed or replaced: the flow keeps its translation. Thousands of
//! rounds, alternating a client packet (which re-translates the idle flow)
//! and a backend reply (which refreshes the reply entry). Entries are aged
//! by writing their timestamps through the maps, not by sleeping. Needs
//! root (BPF).

use std::net::{Ipv4Addr, SocketAddr};

use xdp_common::{Backend, FlowKey, BACKEND_ACTIVE, PROTO_UDP};
use xdplb::{
    addr,
    dataplane::{monotonic_coarse_ns, Maps},
};
use xdplb_tests::{
    datapath::{self, nat_service, TestDatapath, LO_IFINDEX, TABLE_SIZE, XDP_TX},
    frame::Seg,
};

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const ROUNDS: usize = 2_000;

const CLIENT: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 0, 1), 5000);
const VIP: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 0, 100), 53);
const BACKEND: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 1, 0, 11), 53);
const SNAT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

/// A UDP datagram from `src` to `dst`, framed `macs[1]` -> `macs[0]`.
fn udp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), macs: [[u8; 6]; 2]) -> Vec<u8> {
    Seg::udp(SocketAddr::from(src), SocketAddr::from(dst), b"ping").frame(macs[0], macs[1])
}

/// One NAT service at VIP (UDP) with one backend, NAT on.
fn harness() -> TestDatapath {
    let mut h = TestDatapath::load("sweep").expect("loading the XDP program (needs root)");
    h.accept_macs(&[(LO_IFINDEX, LB_MAC)], &[]).unwrap();
    let backend = Backend {
        addr: addr::to_words(BACKEND.0.into()),
        dst_mac: BACKEND_MAC,
        src_mac: LB_MAC,
        ifindex: LO_IFINDEX,
        state: BACKEND_ACTIVE,
        snat_addr: addr::to_words(SNAT.into()),
        service: 0,
        port_be: BACKEND.1.to_be(),
        _pad: [0; 2],
    };
    h.set_backend(0, backend).unwrap();
    let timeouts = datapath::Timeouts {
        tcp: 60,
        closing: 10,
        udp: 60,
    };
    let service = nat_service(0, 0, TABLE_SIZE, (40000, 1000), timeouts);
    h.set_service(SocketAddr::from(VIP), PROTO_UDP, service, &[0])
        .unwrap();
    h.set_nat_enabled(true).unwrap();
    h
}

fn run(h: &mut TestDatapath, frame: &[u8]) -> u32 {
    h.run(frame).expect("BPF_PROG_TEST_RUN").0
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
    assert_eq!(run(&mut h, &to_vip), XDP_TX, "first packet");
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
        let (prog, maps) = h.parts();
        let occupancy = maps
            .sweep_nat_with(monotonic_coarse_ns(), || {
                let (verdict, _) = datapath::run(prog, packet).expect("BPF_PROG_TEST_RUN");
                assert_eq!(verdict, XDP_TX, "round {round}: packet");
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
