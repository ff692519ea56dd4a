//! The NAT sweeper against the datapath, in the window where they race: the
//! sweeper has read both tables and judged a flow dead, then, before it
//! deletes, something writes that flow's keys. Thousands of rounds, each
//! putting one of three writers in that window: a client packet (through
//! the real program, BPF_PROG_TEST_RUN) that makes a new translation with
//! the same 5-tuple, a peer's translation installed the way replication
//! does, and a backend reply to the dead flow (which must not revive it).
//! No live translation may be deleted. Entries are aged by writing their
//! timestamps through the maps, not by sleeping. Needs root (BPF).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use xdp_common::{
    Backend, FlowKey, Reason, BACKEND_ACTIVE, NAT_F_REPLICATED, NAT_RECLAIM_WINDOW_S,
    NAT_SWEEP_MARGIN_S, PROTO_UDP,
};
use xdplb::{
    addr,
    dataplane::{monotonic_coarse_ns, Maps, NatOccupancy},
};
use xdplb_tests::{
    datapath::{self, nat_service, TestDatapath, LO_IFINDEX, TABLE_SIZE, XDP_PASS, XDP_TX},
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
const UDP_TIMEOUT_S: u32 = 60;

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
        port_be: BACKEND.1.to_be(),
        ..Default::default()
    };
    h.set_backend(0, backend).unwrap();
    let timeouts = datapath::Timeouts {
        tcp: 60,
        closing: 10,
        udp: UDP_TIMEOUT_S,
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
    let fwd_key = addr::flow_key(CLIENT.into(), VIP.into(), PROTO_UDP);
    let rev_key = maps.nat_fwd.get(&fwd_key, 0).ok().map(|f| {
        let snat = (SNAT, u16::from_be(f.nat_port_be));
        addr::flow_key(BACKEND.into(), snat.into(), PROTO_UDP)
    });
    (fwd_key, rev_key)
}

/// The backend's reply to the flow translated to `rev_key`'s port.
fn reply(rev_key: FlowKey) -> Vec<u8> {
    let port = u16::from_be(rev_key.dport_be);
    udp_frame(BACKEND, (SNAT, port), [LB_MAC, BACKEND_MAC])
}

/// The backend answers the flow translated to `rev_key`'s port, so it is
/// no longer counted against its source's unanswered bound and has the
/// service's full timeout.
fn answer(h: &mut TestDatapath, rev_key: FlowKey) {
    assert_eq!(run(h, &reply(rev_key)), XDP_TX, "the backend's answer");
}

/// `to_vip` makes a new translation, which the backend [`answer`]s: its two keys.
fn answered_flow(h: &mut TestDatapath, to_vip: &[u8], what: &str) -> (FlowKey, FlowKey) {
    assert_eq!(run(h, to_vip), XDP_TX, "{what}");
    let (fwd_key, rev_key) = entries(&h.maps);
    let rev_key = rev_key.expect("the flow is translated");
    answer(h, rev_key);
    (fwd_key, rev_key)
}

/// Stamps the flow's two entries `ago` in the past.
fn stamp(maps: &mut Maps, fwd_key: FlowKey, rev_key: FlowKey, ago: Duration) {
    let at = monotonic_coarse_ns() - u64::try_from(ago.as_nanos()).unwrap();
    let mut fwd = maps.nat_fwd.get(&fwd_key, 0).unwrap();
    let mut rev = maps.nat_rev.get(&rev_key, 0).unwrap();
    fwd.last_seen_ns = at;
    rev.last_seen_ns = at;
    maps.nat_fwd.insert(fwd_key, fwd, 0).unwrap();
    maps.nat_rev.insert(rev_key, rev, 0).unwrap();
}

/// Long enough ago for the sweeper (past the UDP timeout, the datapath's
/// reclaim window and the margin), with 10 s to spare.
fn long_dead() -> Duration {
    Duration::from_secs(u64::from(
        UDP_TIMEOUT_S + NAT_RECLAIM_WINDOW_S + NAT_SWEEP_MARGIN_S + 10,
    ))
}

#[test]
fn the_sweeper_never_deletes_a_translation_made_in_its_window() {
    assert!(
        monotonic_coarse_ns() > 2 * u64::try_from(long_dead().as_nanos()).unwrap(),
        "the machine booted too recently to stamp entries that old"
    );
    let mut h = harness();
    let to_vip = udp_frame(CLIENT, VIP, [LB_MAC, CLIENT_MAC]);
    let (mut fwd_key, mut rev_key) = answered_flow(&mut h, &to_vip, "first packet");
    let passed_before = h.reason(Reason::PassNotService).unwrap();
    let mut replies_passed = 0;

    for round in 0..ROUNDS {
        stamp(&mut h.maps, fwd_key, rev_key, long_dead());
        let old = (
            h.maps.nat_fwd.get(&fwd_key, 0).unwrap(),
            h.maps.nat_rev.get(&rev_key, 0).unwrap(),
        );
        let reply = reply(rev_key);
        let (prog, maps) = h.parts();
        let kind = round % 3;
        let occupancy = maps
            .sweep_nat_with(monotonic_coarse_ns(), |maps| match kind {
                // The client again, same 5-tuple: a new translation (on
                // another port: the dead one's is the sweeper's now).
                0 => {
                    let (verdict, _) = datapath::run(prog, &to_vip).expect("BPF_PROG_TEST_RUN");
                    assert_eq!(verdict, XDP_TX, "round {round}: client packet");
                }
                // A peer's live translation of the same keys arrives.
                1 => {
                    let now = monotonic_coarse_ns();
                    let (mut fwd, mut rev) = old;
                    (fwd.last_seen_ns, rev.last_seen_ns) = (now, now);
                    (fwd.flags, rev.flags) = (NAT_F_REPLICATED, NAT_F_REPLICATED);
                    maps.nat_rev.insert(rev_key, rev, 0).unwrap();
                    maps.nat_fwd.insert(fwd_key, fwd, 0).unwrap();
                }
                // A late reply to the dead flow: not translated, nothing
                // refreshed.
                _ => {
                    let (verdict, _) = datapath::run(prog, &reply).expect("BPF_PROG_TEST_RUN");
                    assert_eq!(verdict, XDP_PASS, "round {round}: reply to a dead flow");
                    replies_passed += 1;
                }
            })
            .unwrap();

        match kind {
            0 => {
                let (now_fwd, now_rev) = entries(&h.maps);
                let now_rev = now_rev.unwrap_or_else(|| {
                    panic!("round {round}: the sweeper deleted the new translation")
                });
                assert_ne!(now_rev, rev_key, "round {round}: a new port");
                let rev = h.maps.nat_rev.get(&now_rev, 0).unwrap_or_else(|_| {
                    panic!("round {round}: the sweeper deleted the new reply entry")
                });
                assert_eq!(rev.client_key(PROTO_UDP), now_fwd, "round {round}");
                assert_eq!(occupancy.reclaimed, 1, "round {round}: the dead port");
                assert!(h.maps.nat_rev.get(&rev_key, 0).is_err(), "round {round}");
                rev_key = now_rev;
                answer(&mut h, rev_key);
            }
            1 => {
                let fwd = h.maps.nat_fwd.get(&fwd_key, 0);
                let rev = h.maps.nat_rev.get(&rev_key, 0);
                assert!(
                    fwd.is_ok_and(|f| f.flags == NAT_F_REPLICATED)
                        && rev.is_ok_and(|r| r.flags == NAT_F_REPLICATED),
                    "round {round}: the sweeper deleted the peer's translation"
                );
                assert_eq!(occupancy.reclaimed, 0, "round {round}");
            }
            _ => {
                assert_eq!(occupancy.reclaimed, 1, "round {round}: the dead flow goes");
                assert!(h.maps.nat_fwd.get(&fwd_key, 0).is_err(), "round {round}");
                // The next round starts from a new translation.
                let what = format!("round {round}: new flow");
                (fwd_key, rev_key) = answered_flow(&mut h, &to_vip, &what);
            }
        }
    }
    assert_eq!(
        h.reason(Reason::PassNotService).unwrap() - passed_before,
        replies_passed,
        "every reply to a dead flow passed as no service's"
    );
}

/// One sweep, with nothing written in its window.
fn sweep(maps: &mut Maps) -> NatOccupancy {
    maps.sweep_nat_with(monotonic_coarse_ns(), |_| ()).unwrap()
}

#[test]
fn a_flow_the_datapath_may_still_reclaim_is_left_to_it() {
    let mut h = harness();
    let to_vip = udp_frame(CLIENT, VIP, [LB_MAC, CLIENT_MAC]);
    let (fwd_key, rev_key) = answered_flow(&mut h, &to_vip, "first packet");
    // Dead, but within the reclaim window: the datapath's.
    let within = Duration::from_secs(u64::from(UDP_TIMEOUT_S + NAT_RECLAIM_WINDOW_S / 2));
    stamp(&mut h.maps, fwd_key, rev_key, within);
    let occupancy = sweep(&mut h.maps);
    // Left alone, though no longer counted as live.
    assert_eq!(occupancy.reclaimed, 0);
    assert_eq!((occupancy.flows, occupancy.reverse), (0, 0));
    assert!(h.maps.nat_fwd.get(&fwd_key, 0).is_ok());
    assert!(h.maps.nat_rev.get(&rev_key, 0).is_ok());
    // Past the window and the margin: the sweeper's.
    stamp(&mut h.maps, fwd_key, rev_key, long_dead());
    let occupancy = sweep(&mut h.maps);
    assert_eq!(occupancy.reclaimed, 1);
    assert!(h.maps.nat_fwd.get(&fwd_key, 0).is_err());
    assert!(h.maps.nat_rev.get(&rev_key, 0).is_err());
}
