//! Flow-state replication in the cluster testbed (`xdplb_tests::cluster`):
//! three nodes behind a BIRD router doing ECMP over BGP+BFD, DSR.
//!
//! The hard case: long-lived connections are opened while one backend is
//! out of the tables, then it comes back, so the Maglev table now picks it
//! for some of them; they stay pinned to their first backend on the node
//! carrying them. When that node dies, ECMP moves them to the survivors
//! (and, as Linux's multipath hashing is not resilient, moves others
//! between the survivors too). With replication every node holds every
//! pin and no connection notices; without it (`replicate = false`, the
//! second test) exactly the moved pins are reset.
//!
//! Run with `--nocapture` to see the measured figures.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use xdplb::cluster::replication::wire::{self, FlowRecord, Header, Key, Kind};
use xdplb_tests::{
    cluster::{
        assert_loss_unnoticed, backend_addr, hard_case, node_addr, replication_addr, vip,
        wait_until, Chatter, Cluster, Replication, KEY, NODES, REPLICATION_PORT,
    },
    netns::exec_line,
};

fn replication(c: &Cluster, i: usize) -> serde_json::Value {
    c.status(i)["replication"].clone()
}

/// Node `i`'s view of peer `peer`.
fn peer(c: &Cluster, i: usize, peer: usize) -> serde_json::Value {
    let r = replication(c, i);
    let addr = replication_addr(peer).to_string();
    r["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["address"] == addr.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("n{i} has no peer {addr}: {r}"))
}

#[test]
fn replicated_pins_survive_node_loss_rejoin_and_partition() {
    let mut c = Cluster::build(Replication::On);
    wait_until("every peer heard", Duration::from_secs(10), || {
        (1..=NODES).all(|i| {
            replication(&c, i)["peers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["state"] == "up")
        })
    });

    // The hard case, with replication: every node knows every connection.
    let (chatter, victim, moved) = hard_case(&c);
    let clients: Vec<SocketAddr> = chatter.reports().iter().map(|r| r.client).collect();
    for i in 1..=NODES {
        let unknown: Vec<&SocketAddr> = clients
            .iter()
            .filter(|&&client| c.flow(i, client)["established"] != true)
            .collect();
        assert!(unknown.is_empty(), "n{i} does not know {unknown:?}");
    }
    let status = replication(&c, victim);
    println!("n{victim} replication before it dies: {status}");
    assert!(status["sent_flows"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(status["ring_lost"], 0, "{status}");

    let (dead, withdrawn) = c.kill_node(victim);
    std::thread::sleep(Duration::from_secs(2));
    assert_loss_unnoticed(&chatter, victim, moved.len(), withdrawn);

    // Rejoin: the rebooted node pulls every pin before it announces, so
    // the connections ECMP moves back to it keep their backends.
    c.reboot_node(victim, dead);
    c.assert_rejoined(victim, &chatter);
    drop(chatter);

    partition(&c);
    wrong_key(&c);
}

/// The replication link between n1 and n3 is cut both ways while both
/// keep serving; when it returns, each sees the gap and pulls what it
/// missed.
fn partition(c: &Cluster) {
    let n3 = &c.nodes[2];
    let n1 = node_addr(1);
    let rules = |op: &str| {
        for proto in ["udp", "tcp"] {
            for (chain, dir) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
                let rule = format!("{chain} {dir} {n1} -p {proto} --dport {REPLICATION_PORT}");
                exec_line(n3, &format!("iptables {op} {rule} -j DROP"));
            }
        }
    };
    rules("-A");
    wait_until("n3 sees n1 silent", Duration::from_secs(10), || {
        peer(c, 3, 1)["state"] == "silent"
    });
    // New connections during the partition: all served.
    let during = Chatter::start(c, 50000, 40);
    let carried_by_n1: Vec<SocketAddr> = during
        .reports()
        .iter()
        .map(|r| r.client)
        .filter(|&client| {
            let f = c.flow(1, client);
            f["established"] == true && f["replicated"] == false
        })
        .collect();
    assert!(!carried_by_n1.is_empty(), "n1 carries none of 40 flows");
    for &client in &carried_by_n1 {
        assert_eq!(
            c.flow(3, client)["established"],
            false,
            "n3 learnt {client} through the partition"
        );
    }
    rules("-D");
    let healed = wait_until(
        "n3 pulls what it missed from n1",
        Duration::from_secs(10),
        || peer(c, 3, 1)["resyncs"].as_u64().unwrap() >= 1,
    );
    let view = peer(c, 3, 1);
    println!("partition: n3 caught up {healed:?} after the link returned; its view of n1: {view}");
    assert!(view["missed"].as_u64().unwrap() > 0, "{view}");
    for &client in &carried_by_n1 {
        assert_eq!(
            c.flow(3, client)["established"],
            true,
            "n3 still lacks {client}"
        );
    }
    let (failed, _) = during.summary();
    assert!(
        failed.is_empty(),
        "connections failed in the partition: {failed:?}"
    );
}

/// A message under another key, and one under the right key from a host
/// that is not a peer: both ignored, counted and logged.
fn wrong_key(c: &Cluster) {
    let before = replication(c, 1);
    let record = FlowRecord {
        service: (vip().ip(), 80, 6),
        client: "10.88.1.2:60000".parse().unwrap(),
        backend: SocketAddr::new(backend_addr(1).parse().unwrap(), 80),
        nat: None,
    };
    let header = Header {
        kind: Kind::Flows,
        sender: 7,
        seq: 1,
        sent_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    };
    let forged = wire::encode(&Key::new(b"not the cluster's key"), &header, &[record]);
    let stranger = wire::encode(&Key::new(KEY.as_bytes()), &header, &[record]);
    // A minute old: refused for its age (before its sender is looked at),
    // as a captured message replayed later is.
    let old = Header {
        sent_ms: header.sent_ms - 60_000,
        ..header
    };
    let aged = wire::encode(&Key::new(KEY.as_bytes()), &old, &[record]);
    c.client.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(&forged, replication_addr(1)).unwrap();
        s.send_to(&stranger, replication_addr(1)).unwrap();
        s.send_to(&aged, replication_addr(1)).unwrap();
    });
    let counted = |now: &serde_json::Value, what: &str| {
        now[what].as_u64().unwrap() - before[what].as_u64().unwrap()
    };
    wait_until("n1 counts all three", Duration::from_secs(5), || {
        let now = replication(c, 1);
        ["bad_tag", "unknown_sender", "stale"]
            .iter()
            .all(|what| counted(&now, what) > 0)
    });
    let now = replication(c, 1);
    assert_eq!(counted(&now, "unknown_sender"), 1, "{now}");
    assert_eq!(
        c.flow(1, record.client)["established"],
        false,
        "a refused message installed a pin"
    );
    let log = c.daemon(1).proc.output_text();
    assert!(log.contains("replication: refused a message"), "{log}");
}

#[test]
fn without_replication_the_moved_pins_are_reset() {
    let mut c = Cluster::build(Replication::Off);
    let (chatter, victim, moved) = hard_case(&c);
    let (_dead, withdrawn) = c.kill_node(victim);
    // A moved pin's connection is reset once its next segment reaches
    // another node; one lost while the node died is resent only after
    // TCP's backoff (seconds on a loaded machine). 15 s: a give-up limit.
    let failed = || -> BTreeSet<SocketAddr> {
        let (failed, _) = chatter.summary();
        failed.iter().map(|r| r.client).collect()
    };
    let give_up = Instant::now() + Duration::from_secs(15);
    while !moved.iter().all(|m| failed().contains(m)) && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(100));
    }
    let failed = failed();
    println!(
        "without replication: n{victim} withdrawn after {} ms; {} of its {} moved pins and {} \
         connections in all reset",
        withdrawn.as_millis(),
        moved.iter().filter(|m| failed.contains(m)).count(),
        moved.len(),
        failed.len()
    );
    let survived: Vec<&SocketAddr> = moved.iter().filter(|m| !failed.contains(m)).collect();
    assert!(
        survived.is_empty(),
        "moved pins survived without replication: {survived:?}"
    );
}
