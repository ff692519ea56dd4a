//! NAT in the cluster testbed (`xdplb_tests::cluster`, NAT mode): each
//! node translates to a pool of two SNAT addresses of its own, which it
//! announces, and announces its peers' SNAT addresses as backups (a longer
//! BGP path).
//! Translations are replicated once their backend answers, so when a node
//! dies the routers move its SNAT address to the survivors, which already
//! hold its translations: its connections continue, with the same source
//! address and port at the backend.
//!
//! Run with `--nocapture` to see the measured figures.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use xdp_common::{NAT_F_REPLICATED, PROTO_TCP};
use xdplb::{addr, dataplane::Maps};
use xdplb_tests::{
    client::StreamConn,
    cluster::{
        assert_loss_unnoticed, hard_case, node_addr, snat_addrs, vip, wait_until, Cluster, Mode,
        Replication, NODES,
    },
    lb::{failures, Load},
};

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Waits (up to 10 s) until the router sends both of node `i`'s SNAT
/// addresses to `i` only.
fn wait_snat_at_owner(c: &Cluster, i: usize) {
    let what = format!("n{i}'s SNAT addresses routed to n{i} only");
    wait_until(&what, Duration::from_secs(10), || {
        snat_addrs(i)
            .iter()
            .all(|a| c.next_hops_of(a) == [node_addr(i)])
    });
}

/// Waits (up to 5 s) until the router sends both of node `i`'s SNAT
/// addresses to its peers; returns how long that took.
fn wait_snat_at_peers(c: &Cluster, i: usize) -> Duration {
    let what = format!("n{i}'s SNAT addresses routed to its peers");
    wait_until(&what, Duration::from_secs(5), || {
        snat_addrs(i)
            .iter()
            .all(|a| c.next_hops_of(a).len() == NODES - 1)
    })
}

/// Opens a connection and, once every node holds its translation, checks
/// that each peer's copy (read from the nodes' pinned NAT tables) has the
/// idle timeout of the node that made it: a copy that expires early is
/// no copy when that node dies. Checked at once, as the maker sends a
/// busy translation again every `REFRESH` (10 s), which would hide a
/// wrong first copy.
fn assert_copies_keep_the_timeout(c: &Cluster) {
    let mut conn = c
        .client
        .run(|| StreamConn::open(vip(), Some(47000), Duration::from_secs(5)))
        .unwrap();
    conn.send_line("hello").unwrap();
    let client = conn.local_addr().unwrap();
    wait_until(
        "every node holds the new translation",
        Duration::from_secs(5),
        || (1..=NODES).all(|i| c.flow(i, client)["established"] == true),
    );
    let key = addr::flow_key(client, vip(), PROTO_TCP);
    let entries: Vec<_> = (1..=NODES)
        .map(|i| {
            let maps = Maps::open_pinned(&c.daemon(i).pin_dir).unwrap();
            (i, maps.nat_fwd.get(&key, 0).unwrap())
        })
        .collect();
    let (copies, made): (Vec<_>, Vec<_>) = entries
        .iter()
        .partition(|(_, f)| f.flags & NAT_F_REPLICATED != 0);
    assert_eq!(made.len(), 1, "one node made the translation: {entries:?}");
    let (maker, made) = made[0];
    for (i, copy) in copies {
        assert_eq!(
            copy.timeout_s, made.timeout_s,
            "n{i}'s copy of n{maker}'s translation: {copy:?}, made: {made:?}"
        );
    }
}

#[test]
fn nat_translations_survive_node_loss_and_rejoin() {
    let mut c = Cluster::build_in(Mode::Nat, Replication::On);

    // Each node announces its own SNAT addresses and backs up its peers';
    // the router sends each SNAT address to its owner only.
    for i in 1..=NODES {
        let view = c.status(i)["cluster"].clone();
        let backups = sorted(
            (1..=NODES)
                .filter(|&p| p != i)
                .flat_map(snat_addrs)
                .collect(),
        );
        let announced = view["announced"].as_array().unwrap();
        for snat in snat_addrs(i) {
            assert!(announced.contains(&snat.into()), "n{i}: {view}");
        }
        assert_eq!(view["backups"], serde_json::json!(backups), "n{i}: {view}");
        wait_snat_at_owner(&c, i);
    }

    c.assert_spread();
    assert_copies_keep_the_timeout(&c);

    // Graceful leave of n3 under a steady load: it withdraws its VIP and
    // its SNAT address; its translations continue on its peers.
    c.leave_under_load(3, || wait_snat_at_peers(&c, 3));
    c.join(3);
    wait_snat_at_owner(&c, 3);

    // The hard case: some connections' pins differ from the Maglev pick.
    // Every node holds every translation once it is answered.
    let (chatter, victim, moved) = hard_case(&c);
    let clients: Vec<SocketAddr> = chatter.reports().iter().map(|r| r.client).collect();
    wait_until(
        "every node holds every translation",
        Duration::from_secs(5),
        || {
            (1..=NODES).all(|i| {
                clients
                    .iter()
                    .all(|&client| c.flow(i, client)["established"] == true)
            })
        },
    );
    let example = c.flow((victim % NODES) + 1, moved[0]);
    println!("a moved pin of n{victim}, as a peer holds it: {example}");
    assert_eq!(example["replicated"], true, "{example}");
    // "CLIENT -> VIP is translated to SNAT:PORT -> BACKEND"
    let snat_of = |flow: &serde_json::Value| -> String {
        let nat = flow["nat"].as_str().unwrap_or_default();
        let to = nat.split(" is translated to ").nth(1).unwrap_or_default();
        let source = to.split(" -> ").next().unwrap_or_default();
        source
            .rsplit_once(':')
            .map(|(a, _)| a)
            .unwrap_or_default()
            .into()
    };
    assert!(
        snat_addrs(victim).contains(&snat_of(&example)),
        "the peer translates to the dead node's SNAT address: {example}"
    );
    // Each node's long-lived connections use both addresses of its pool.
    let used: BTreeSet<String> = clients
        .iter()
        .map(|&client| snat_of(&c.flow(1, client)))
        .collect();
    println!("SNAT addresses the long-lived connections use: {used:?}");
    for snat in (1..=NODES).flat_map(snat_addrs) {
        assert!(used.contains(&snat), "no connection uses {snat}: {used:?}");
    }

    let survivors: Vec<usize> = (1..=NODES).filter(|&i| i != victim).collect();
    let replies =
        |c: &Cluster| -> u64 { survivors.iter().map(|&i| c.reason(i, "nat_reply")).sum() };
    let replies_before = replies(&c);
    // New connections every 10 ms around the loss, too.
    let load = Load::start_in(&c.client, vip(), Duration::from_millis(10), 45000).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    let (dead, withdrawn) = c.kill_node(victim);
    let withdrawn_at = Instant::now();
    let taken_over = wait_snat_at_peers(&c, victim);
    std::thread::sleep(Duration::from_secs(2));
    let samples = load.stop();
    // New connections may fail only while the router still sends to the
    // dead node: from one client timeout (2 s) before the kill until the
    // withdrawal, plus 0.5 s for the router's cached neighbour/route.
    let window =
        (killed - Duration::from_millis(2500))..(withdrawn_at + Duration::from_millis(500));
    let new_failed = failures(&samples);
    let outside: Vec<_> = new_failed
        .iter()
        .filter(|s| !window.contains(&s.start))
        .collect();
    println!(
        "NAT node loss: {} new connections around the loss, {} failed; n{victim}'s SNAT \
         addresses moved to the survivors {} ms after its withdrawal",
        samples.len(),
        new_failed.len(),
        taken_over.as_millis()
    );
    assert!(
        outside.is_empty(),
        "new connections failed after the withdrawal: {outside:?}"
    );
    for snat in snat_addrs(victim) {
        assert_eq!(
            sorted(c.next_hops_of(&snat)),
            survivors.iter().map(|&i| node_addr(i)).collect::<Vec<_>>()
        );
    }
    assert_loss_unnoticed(&chatter, victim, moved.len(), withdrawn);
    assert!(
        replies(&c) > replies_before,
        "the survivors translate replies"
    );
    for &i in &survivors {
        assert_eq!(c.reason(i, "pass_no_route"), 0, "n{i} found every client");
    }

    // Rejoin: the rebooted node pulls every translation before it
    // announces, so the connections ECMP moves back to it keep theirs.
    c.reboot_node(victim, dead);
    wait_snat_at_owner(&c, victim);
    c.assert_rejoined(victim, &chatter);
}
