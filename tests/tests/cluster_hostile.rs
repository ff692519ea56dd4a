//! The replication listener against a hostile neighbour: one node (the lb
//! of a DSR or NAT testbed, real daemon, real XDP) whose only configured
//! peer is the client's address, where this test plays the peer. A backend's namespace
//! plays a stranger on the same segment. Needs root.
//!
//! - A stranger's TCP connection is closed at once and counted, never held
//!   for the 5 s a peer's request may take (anyone could otherwise hold
//!   connections and request buffers without limit).
//! - A peer's broken request (a length no message has) is counted.
//! - A peer that asks for a full copy and never reads does not hold the
//!   copy for ever: the node gives up once the puller would have.
//! - A peer that trickles a full copy does not hold a starting node (which
//!   pulls before it announces) for ever.
//! - A peer's newer pin replaces the one held; a restarted peer's
//!   messages from before the restart, replayed, are refused as stale (the
//!   pin stays), and so is an old full copy played back; a full
//!   copy under another key is refused and counted; a copy pulled after a
//!   gap fills in what was lost and replaces no pin held.
//! - A full copy that ends short is not taken for the peer's whole table.
//! - A SYN its backend never answered is not sent to the peer.
//! - A peer's NAT record never takes over a translation this node made
//!   (neither its replies nor its client's packets).

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use socket2::{Domain, Socket, Type};
use xdplb::cluster::replication::wire::{self, FlowRecord, Header, Key, Kind, Translation};
use xdplb_tests::{
    bed::served,
    bin_path,
    client::{self, restarting},
    cluster::wait_until,
    lb::{dsr_config, nat_config, LongLived, Xdplb, BACKEND_PORT},
    netns::exec_line,
    topology::{Shape, Topology},
};

const TESTBACKEND: &str = env!("CARGO_BIN_EXE_xdplb-testbackend");
const KEY: &str = "hostile test key, 32 bytes long!";
const PORT: u16 = 4700;
/// Pins the test installs, as the peer: their full copy (80 bytes a pin,
/// 3.2 MB) is far more than the node's send buffer (64 KiB, below) and
/// the idle reader's receive buffer can hold.
const PINS: u16 = 40_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn replication(lb: &Xdplb) -> serde_json::Value {
    lb.json(&["status"]).unwrap()["replication"].clone()
}

fn count(lb: &Xdplb, name: &str) -> u64 {
    replication(lb)[name].as_u64().unwrap()
}

/// Waits for `conn` to be closed by the far end; returns how long that
/// took, or `None` when it was still open after `within`.
fn closed_within(conn: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    conn.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    match restarting(|| conn.read(&mut buf)) {
        Ok(0) => Some(started.elapsed()),
        Ok(n) => panic!("the node sent {n} bytes to a refused connection"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(_) => Some(started.elapsed()), // reset: closed too
    }
}

#[test]
fn the_full_copy_service_refuses_strangers_broken_requests_and_idle_readers() {
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let (topo, _backends) = served(Shape::Dsr, "chst", 1, &xdplb, Path::new(TESTBACKEND));
    let (node, peer, config) = bed(&topo);
    // Send buffers of at most 64 KiB on the node: a full copy nobody reads
    // stalls after a few frames rather than vanishing into a 4 MiB buffer.
    topo.lb()
        .sysctl("net.ipv4.tcp_wmem", "4096 16384 65536")
        .unwrap();
    let lb = Xdplb::start(&xdplb, &topo, &config).unwrap();

    // A stranger's connections, which send nothing: each closed at once
    // (well under the 5 s a peer's request may take) and counted.
    let before = count(&lb, "unknown_sender");
    let held: Vec<Option<Duration>> = topo.backend(1).run(|| {
        let mut conns: Vec<TcpStream> =
            (0..20).map(|_| TcpStream::connect(node).unwrap()).collect();
        conns
            .iter_mut()
            .map(|c| closed_within(c, Duration::from_secs(2)))
            .collect()
    });
    assert!(
        held.iter().all(Option::is_some),
        "a stranger's connections were held open: {held:?}"
    );
    wait_until("20 strangers counted", Duration::from_secs(5), || {
        count(&lb, "unknown_sender") >= before + 20
    });

    // The peer announces a message longer than any the protocol sends:
    // closed at once, and counted as malformed.
    let before = count(&lb, "malformed");
    let closed = topo.client().run(|| {
        let mut c = TcpStream::connect(node).unwrap();
        c.write_all(&u32::MAX.to_be_bytes()).unwrap();
        closed_within(&mut c, Duration::from_secs(2))
    });
    assert!(closed.is_some(), "a 4 GiB request was not refused at once");
    wait_until("the broken request counted", Duration::from_secs(5), || {
        count(&lb, "malformed") > before
    });

    // The peer installs PINS pins, then asks for a full copy and never
    // reads it: the node gives up within the puller's own 10 s (plus a
    // margin for a loaded machine) and says so.
    let key = Key::new(KEY.as_bytes());
    let backend = SocketAddr::new(topo.backend_addr(1, false), 80);
    let vip: IpAddr = topo.vip(false);
    topo.client().run(|| {
        let udp = UdpSocket::bind(peer).unwrap();
        let records: Vec<FlowRecord> = (0..PINS)
            .map(|i| FlowRecord {
                service: (vip, 80, 6),
                client: SocketAddr::new([198, 18, (i >> 8) as u8, i as u8].into(), 40000),
                backend,
                nat: None,
            })
            .collect();
        for (seq, chunk) in records.chunks(wire::RECORDS_PER_DATAGRAM).enumerate() {
            let header = Header {
                kind: Kind::Flows,
                sender: 99,
                seq: seq as u64 + 1,
                sent_ms: now_ms(),
            };
            udp.send_to(&wire::encode(&key, &header, chunk), node)
                .unwrap();
            // Paced, so the node's socket buffer keeps up.
            if seq % 50 == 49 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    wait_until("most pins installed", Duration::from_secs(20), || {
        count(&lb, "installed") >= u64::from(PINS) * 9 / 10
    });
    let mut idle = topo.client().run(|| {
        let mut c = tiny_receiver(node);
        c.write_all(&request_frame(&key)).unwrap();
        c
    });
    let gave_up = "full copy not served: the peer did not take it";
    wait_until(
        "the node gives up on a reader that never reads",
        Duration::from_secs(20),
        || lb.proc.output_text().contains(gave_up),
    );
    // What the node had written before it gave up is all there is: the
    // copy never ends.
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut copy = Vec::new();
    let _ = idle.read_to_end(&mut copy);
    assert!(
        copy.len() < usize::from(PINS) * 80,
        "the whole copy ({} bytes) was delivered after the node gave up",
        copy.len()
    );
    // And the node still serves its real peers' requests.
    let served = topo.client().run(|| {
        let mut c = TcpStream::connect(node).unwrap();
        c.write_all(&request_frame(&key)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        all.len()
    });
    assert!(
        served >= usize::from(PINS) * 9 / 10 * 80,
        "a full copy of {served} bytes"
    );
}

/// A starting node pulls a full copy from its peers before it announces
/// anything. A peer that answers with a byte every second (each read
/// alone well within its timeout) must not hold the node there for ever:
/// it gives up once the pull's 10 s are over and starts.
#[test]
fn a_peer_that_trickles_a_full_copy_does_not_hold_a_starting_node() {
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let (topo, _backends) = served(Shape::Dsr, "chtr", 1, &xdplb, Path::new(TESTBACKEND));
    let (_, peer, config) = bed(&topo);
    // Bound in the client's namespace, where it stays; served from here.
    let listener = topo.client().run(|| TcpListener::bind(peer).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 4];
            conn.read_exact(&mut request).unwrap();
            // The longest message the protocol has, announced, then sent a
            // byte a second until the node hangs up.
            let mut out = (wire::MAX_MESSAGE as u32).to_be_bytes().to_vec();
            while !stop.load(Ordering::Relaxed) && conn.write_all(&out).is_ok() {
                out = vec![0];
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let started = Instant::now();
    let lb = Xdplb::start(&xdplb, &topo, &config);
    stop.store(true, Ordering::Relaxed);
    let lb = lb.expect("the node never became ready");
    println!("ready after {:?}", started.elapsed());
    let log = lb.proc.output_text();
    assert!(log.contains("no full copy: took longer than"), "{log}");
    trickler.join().unwrap();
}

/// A full copy recorded once and played back later by whoever answers at
/// the peer's address (its tags are valid) is refused as stale, like any
/// message older than 30 s: nothing of it is installed.
#[test]
fn an_old_full_copy_played_back_is_refused() {
    let hour_ago = now_ms() - 3_600_000;
    full_copy_is_refused(
        "chpb",
        &Key::new(KEY.as_bytes()),
        hour_ago,
        "stale",
        "a stale full copy",
    );
}

/// A full copy signed with another key (a node of another cluster, or a
/// forger) is refused and counted like any other message with a bad tag.
#[test]
fn a_full_copy_under_another_key_is_refused_and_counted() {
    let other = Key::new(b"another cluster's key, 32 bytes!");
    full_copy_is_refused(
        "chfk",
        &other,
        now_ms(),
        "bad_tag",
        "bad authentication tag",
    );
}

/// Plays the peer: answers the starting node's pull with a one-pin copy
/// signed with `key` and sent at `sent_ms`, and checks that the node
/// installed nothing, counted the copy under `counter` and logged `why`.
fn full_copy_is_refused(name: &str, key: &Key, sent_ms: u64, counter: &str, why: &str) {
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let (topo, _backends) = served(Shape::Dsr, name, 1, &xdplb, Path::new(TESTBACKEND));
    let (_, peer, config) = bed(&topo);
    let record = pin(&topo);
    let copy = full_copy(
        key,
        sent_ms,
        [(Kind::Flows, 0, vec![record]), (Kind::SyncEnd, 1, vec![])],
    );
    let player = answer_pull(&topo, peer, copy);
    let lb = Xdplb::start(&xdplb, &topo, &config).unwrap();
    player.join().unwrap();
    let r = replication(&lb);
    assert_eq!(r["installed"], 0, "{r}");
    assert_eq!(r[counter], 1, "{r}");
    let flow = lb
        .flow(record.client, SocketAddr::new(topo.vip(false), 80))
        .unwrap();
    assert_eq!(flow["established"], false, "{flow}");
    let log = lb.proc.output_text();
    assert!(log.contains(&format!("no full copy: {why}")), "{log}");
}

/// A pin of the bed's IPv4 service to b1, for a client no host has.
fn pin(topo: &Topology) -> FlowRecord {
    FlowRecord {
        service: (topo.vip(false), 80, 6),
        client: "198.18.0.1:40000".parse().unwrap(),
        backend: SocketAddr::new(topo.backend_addr(1, false), 80),
        nat: None,
    }
}

/// A full copy as a peer (run 5) sends it: each of `parts`, a message of
/// that kind, sequence number and records, signed with `key`, sent at
/// `sent_ms`, framed.
fn full_copy(key: &Key, sent_ms: u64, parts: [(Kind, u64, Vec<FlowRecord>); 2]) -> Vec<u8> {
    parts
        .into_iter()
        .flat_map(|(kind, seq, records)| {
            let header = Header {
                kind,
                sender: 5,
                seq,
                sent_ms,
            };
            let msg = wire::encode(key, &header, &records);
            let mut frame = (msg.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&msg);
            frame
        })
        .collect()
}

/// Plays the peer at `peer` (bound in the client's namespace): answers
/// the one pull that comes with `copy`.
fn answer_pull(topo: &Topology, peer: SocketAddr, copy: Vec<u8>) -> std::thread::JoinHandle<()> {
    let listener = topo.client().run(|| TcpListener::bind(peer).unwrap());
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut len = [0u8; 4];
        conn.read_exact(&mut len).unwrap();
        let mut request = vec![0u8; u32::from_be_bytes(len) as usize];
        conn.read_exact(&mut request).unwrap();
        // The node may hang up before reading it all.
        let _ = conn.write_all(&copy);
    })
}

/// A peer's messages replayed after it restarted (within the 30 s their
/// age allows) are refused: a run the peer left behind is not believed
/// again. Taking it for a new run reset the sequence check, so both runs'
/// messages could be replayed, alternately.
#[test]
fn a_restarted_peers_old_messages_are_not_believed_again() {
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let (topo, _backends) = served(Shape::Dsr, "chrp", 2, &xdplb, Path::new(TESTBACKEND));
    let (node, peer, config) = bed(&topo);
    let lb = Xdplb::start(&xdplb, &topo, &config).unwrap();
    let key = Key::new(KEY.as_bytes());
    let record = pin(&topo);
    let message = |run: u64, seq: u64, kind: Kind, records: &[FlowRecord]| {
        let header = Header {
            kind,
            sender: run,
            seq,
            sent_ms: now_ms(),
        };
        wire::encode(&key, &header, records)
    };
    // A pin of a service this node does not have: received, unmatched.
    let elsewhere = FlowRecord {
        service: (topo.vip(false), 81, 6),
        ..record
    };
    // Captured from the peer's run 1; then the peer restarts (run 2).
    let captured = message(1, 1, Kind::Flows, &[record, elsewhere]);
    let restarted = message(2, 1, Kind::Heartbeat, &[]);
    let udp = topo.client().run(|| UdpSocket::bind(peer).unwrap());
    let send = |msg: &[u8]| {
        udp.send_to(msg, node).unwrap();
    };
    send(&captured);
    wait_until(
        "the peer's message believed",
        Duration::from_secs(5),
        || count(&lb, "received") == 2,
    );
    let r = replication(&lb);
    assert_eq!(
        (r["installed"].as_u64(), r["unmatched"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    // The peer's next message moves the pin to b2 (the flow was re-picked
    // there): a peer's newer pin replaces the one held here.
    let moved = FlowRecord {
        backend: SocketAddr::new(topo.backend_addr(2, false), 80),
        ..record
    };
    send(&message(1, 2, Kind::Flows, &[moved]));
    let vip = SocketAddr::new(topo.vip(false), 80);
    let backend = || lb.flow(record.client, vip).unwrap()["backend"].clone();
    wait_until("the newer pin installed", Duration::from_secs(5), || {
        backend() == moved.backend.to_string()
    });
    send(&restarted);
    // The replay, twice: refused both times, as stale.
    std::thread::sleep(Duration::from_millis(200));
    let stale = count(&lb, "stale");
    send(&captured);
    send(&captured);
    wait_until("both replays refused", Duration::from_secs(5), || {
        count(&lb, "stale") == stale + 2
    });
    let r = replication(&lb);
    assert_eq!(r["received"], 3, "a replayed pin was believed: {r}");
    assert_eq!(
        backend(),
        moved.backend.to_string(),
        "a replay moved the pin back"
    );
}

/// A full copy pulled after a gap in a peer's messages fills in what was
/// lost, but does not replace a pin this node holds: a peer's message may
/// have installed it after the copy was taken.
#[test]
fn a_pulled_copy_does_not_replace_a_pin_held() {
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let (topo, _backends) = served(Shape::Dsr, "chpl", 2, &xdplb, Path::new(TESTBACKEND));
    let (node, peer, config) = bed(&topo);
    // Nothing answers its first pull: it starts with its own flows.
    let lb = Xdplb::start(&xdplb, &topo, &config).unwrap();
    let key = Key::new(KEY.as_bytes());
    let on = |b: usize, client: &str| FlowRecord {
        backend: SocketAddr::new(topo.backend_addr(b, false), 80),
        client: client.parse().unwrap(),
        ..pin(&topo)
    };
    let (held, lost) = (on(2, "198.18.0.1:40000"), on(2, "198.18.0.2:40000"));
    let message = |seq: u64, record: FlowRecord| {
        let header = Header {
            kind: Kind::Flows,
            sender: 7,
            seq,
            sent_ms: now_ms(),
        };
        wire::encode(&key, &header, &[record])
    };
    let udp = topo.client().run(|| UdpSocket::bind(peer).unwrap());
    udp.send_to(&message(1, held), node).unwrap();
    let vip = SocketAddr::new(topo.vip(false), 80);
    let backend = |r: &FlowRecord| lb.flow(r.client, vip).unwrap()["backend"].clone();
    wait_until("the pin held", Duration::from_secs(5), || {
        backend(&held) == held.backend.to_string()
    });
    // The copy the peer serves has the held flow on b1, and the lost one.
    let parts = [
        (Kind::Flows, 0, vec![on(1, "198.18.0.1:40000"), lost]),
        (Kind::SyncEnd, 2, vec![]),
    ];
    let player = answer_pull(&topo, peer, full_copy(&key, now_ms(), parts));
    // Message 2 lost: 3 shows the gap, and the node pulls.
    udp.send_to(&message(3, on(1, "198.18.0.3:40000")), node)
        .unwrap();
    player.join().unwrap();
    wait_until("the copy pulled", Duration::from_secs(5), || {
        !replication(&lb)["last_pull"].is_null()
    });
    assert_eq!(backend(&lost), lost.backend.to_string(), "the lost pin");
    assert_eq!(backend(&held), held.backend.to_string(), "the held pin");
}

/// A peer's NAT record that names this node's own SNAT address and port
/// (a peer configured with this node's SNAT address, say) for another
/// client is not installed, nor one for the client of this node's own
/// translation: the node's own entries stay, and its connection keeps
/// working.
#[test]
fn a_peers_record_never_turns_this_nodes_nat_replies_to_another_client() {
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let (topo, _backends) = served(Shape::NatOneArm, "chnt", 1, &xdplb, Path::new(TESTBACKEND));
    let (node, peer, config) = bed_with(&topo, &nat_config(&topo, ""));
    let lb = Xdplb::start(&xdplb, &topo, &config).unwrap();
    let b1 = topo.backend_addr(1, false);
    lb.wait_health("web4", b1, "up", Instant::now(), Duration::from_secs(10));
    let vip = SocketAddr::new(topo.vip(false), 80);
    let mut conn = LongLived::open(&topo, vip, 50000, 1).unwrap();
    // The SNAT address and port the backend sees this connection from.
    let seen = exec_line(
        topo.backend(1),
        &format!("ss -Htn state established sport = :{BACKEND_PORT}"),
    );
    let snat: SocketAddr = seen
        .split_whitespace()
        .last()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no connection at b1: {seen:?}"));
    let record = FlowRecord {
        service: (vip.ip(), 80, 6),
        client: "198.18.0.1:40000".parse().unwrap(),
        backend: SocketAddr::new(b1, BACKEND_PORT),
        nat: Some(Translation {
            snat,
            timeout_s: 3600,
        }),
    };
    // Nor is one for this very connection's client, from another SNAT
    // address (the peer's own): the forward entry this node made stays.
    let ours = exec_line(topo.client(), "ss -Htn state established dport = :80");
    let client: SocketAddr = (ours.split_whitespace().nth(2))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no connection at the client: {ours:?}"));
    let same_client = FlowRecord {
        client,
        nat: Some(Translation {
            snat: "198.18.0.99:40000".parse().unwrap(),
            timeout_s: 3600,
        }),
        ..record
    };
    let udp = topo.client().run(|| UdpSocket::bind(peer).unwrap());
    for (seq, record) in [(1, record), (2, same_client)] {
        let header = Header {
            kind: Kind::Flows,
            sender: 99,
            seq,
            sent_ms: now_ms(),
        };
        let msg = wire::encode(&Key::new(KEY.as_bytes()), &header, &[record]);
        udp.send_to(&msg, node).unwrap();
    }
    wait_until("the records received", Duration::from_secs(5), || {
        count(&lb, "received") == 2
    });
    assert_eq!(count(&lb, "installed"), 0, "{}", replication(&lb));
    let failed = conn.exchange(&[], 1);
    assert!(
        failed.is_empty(),
        "the node's own connection broke: {failed:?}"
    );
}

/// A full copy whose end says more flows were sent than came is not taken
/// for the peer's whole table: the pull fails (the starting node tries
/// the next peer, or says it starts with its own flows only), and no
/// full copy is reported as pulled.
#[test]
fn a_full_copy_that_ends_short_is_not_taken_for_complete() {
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let (topo, _backends) = served(Shape::Dsr, "chsh", 1, &xdplb, Path::new(TESTBACKEND));
    let (_, peer, config) = bed(&topo);
    // One pin, then an end that counts two.
    let parts = [
        (Kind::Flows, 0, vec![pin(&topo)]),
        (Kind::SyncEnd, 2, vec![]),
    ];
    let player = answer_pull(
        &topo,
        peer,
        full_copy(&Key::new(KEY.as_bytes()), now_ms(), parts),
    );
    let lb = Xdplb::start(&xdplb, &topo, &config).unwrap();
    player.join().unwrap();
    let log = lb.proc.output_text();
    assert!(
        log.contains("no full copy: the copy ended after 1 of 2 flows"),
        "{log}"
    );
    let r = replication(&lb);
    assert!(
        r["last_pull"].is_null(),
        "a short copy reported as pulled: {r}"
    );
}

/// Only flows their backend answered are sent to peers: a SYN left
/// unanswered (a spoofed one, a flood) stays this node's, so that a flood
/// cannot fill every node's table of established flows.
#[test]
fn an_unanswered_syn_is_not_sent_to_peers() {
    let xdplb = bin_path("xdplb").expect("xdplb binary (cargo build --bins)");
    let (topo, _backends) = served(Shape::Dsr, "chun", 1, &xdplb, Path::new(TESTBACKEND));
    let (_, peer, config) = bed(&topo);
    let udp = topo.client().run(|| UdpSocket::bind(peer).unwrap());
    let _lb = Xdplb::start(&xdplb, &topo, &config).unwrap();
    let vip = SocketAddr::new(topo.vip(false), 80);
    let client = topo.client_addr(false);
    // The backend's answers to the client go nowhere: its SYN stays
    // unanswered (the client sends it again) and its flow never opens.
    let blackhole = format!("ip route add blackhole {client}/32");
    exec_line(topo.backend(1), &blackhole);
    let unanswered = topo
        .client()
        .run(|| client::StreamConn::open(vip, Some(41000), Duration::from_millis(1500)).is_err());
    assert!(unanswered, "the backend answered through a blackhole route");
    exec_line(
        topo.backend(1),
        &format!("ip route del blackhole {client}/32"),
    );
    // An answered one after it, which is sent: the datapath reports in
    // order, so the first one would have come first.
    let _answered = LongLived::open(&topo, vip, 41001, 1).unwrap();
    let key = Key::new(KEY.as_bytes());
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sent = Vec::new();
    let mut buf = [0u8; 2048];
    while !sent.contains(&41001) {
        let (n, _) = restarting(|| udp.recv_from(&mut buf)).expect("no pin sent within 5 s");
        let (header, records) = wire::decode(&key, &buf[..n]).unwrap();
        if header.kind == Kind::Flows {
            sent.extend(records.iter().map(|r| r.client.port()));
        }
    }
    assert!(
        !sent.contains(&41000),
        "an unanswered SYN was sent: {sent:?}"
    );
}

/// The node's address, the peer's (the client's, where the tests play
/// the peer) and a configuration that replicates with that one peer.
fn bed(topo: &Topology) -> (SocketAddr, SocketAddr, String) {
    bed_with(topo, &dsr_config(topo))
}

/// [`bed`] with `services` (TOML).
fn bed_with(topo: &Topology, services: &str) -> (SocketAddr, SocketAddr, String) {
    let node = SocketAddr::new(topo.lb_addr(false), PORT);
    let peer = SocketAddr::new(topo.client_addr(false), PORT);
    let config = format!(
        "[cluster]\nreplication_listen = \"{node}\"\nreplication_key = \"{KEY}\"\n\
         [[cluster.peer]]\naddress = \"{peer}\"\n\n{services}"
    );
    (node, peer, config)
}

/// A full-copy request from the peer, as the TCP stream carries it.
fn request_frame(key: &Key) -> Vec<u8> {
    let header = Header {
        kind: Kind::SyncRequest,
        sender: 99,
        seq: 0,
        sent_ms: now_ms(),
    };
    let request = wire::encode(key, &header, &[]);
    let mut frame = (request.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&request);
    frame
}

/// A connection to `to` whose receive buffer (set before connecting, so the
/// window stays small) is the smallest the kernel allows: the node can hand
/// it only a few kilobytes.
fn tiny_receiver(to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .connect_timeout(&to.into(), Duration::from_secs(2))
        .unwrap();
    socket.into()
}
