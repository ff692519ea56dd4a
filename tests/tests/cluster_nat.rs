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
    net::SocketAddr,
    time::{Duration, Instant},
};

use xdplb_tests::{
    assert_within, client,
    cluster::{
        hard_case, node_addr, snat_addrs, vip, wait_until, Cluster, Mode, Replication, LONG_LIVED,
        NODES,
    },
    lb::Load,
    require_root,
};

fn require_bird() {
    require_root();
    assert!(
        xdplb_tests::which("bird") && xdplb_tests::which("birdc"),
        "BIRD 2 is needed (apt-get install bird2, or cargo xtask setup)"
    );
}

fn reason(c: &Cluster, i: usize, name: &str) -> u64 {
    c.daemon(i).json(&["stats"]).unwrap()["reasons"][name]
        .as_u64()
        .unwrap()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn nat_translations_survive_node_loss_and_rejoin() {
    require_bird();
    let mut c = Cluster::build_in(Mode::Nat, Replication::On);
    c.wait_next_hops(NODES, Duration::from_secs(20));

    // Each node announces its own SNAT addresses and backs up its peers';
    // the router sends each SNAT address to its owner only.
    for i in 1..=NODES {
        let view = c.daemon(i).json(&["status"]).unwrap()["cluster"].clone();
        let backups = sorted(
            (1..=NODES)
                .filter(|&p| p != i)
                .flat_map(snat_addrs)
                .collect(),
        );
        for snat in snat_addrs(i) {
            let announced = view["announced"].as_array().unwrap();
            assert!(announced.contains(&snat.clone().into()), "n{i}: {view}");
        }
        assert_eq!(view["backups"], serde_json::json!(backups), "n{i}: {view}");
        wait_until(
            &format!("n{i}'s SNAT addresses routed to it only"),
            Duration::from_secs(10),
            || {
                snat_addrs(i)
                    .iter()
                    .all(|a| c.next_hops_of(a) == [node_addr(i)])
            },
        );
    }

    // Spread: 300 connections, every node translates at least 15 %.
    let before: Vec<u64> = (1..=NODES).map(|i| c.new_flows(i)).collect();
    let failed: Vec<(u16, String)> = c.client.run(|| {
        (20000u16..20300)
            .filter_map(|port| {
                client::get(vip(), Some(port), Duration::from_secs(3))
                    .err()
                    .map(|e| (port, format!("{e:#}")))
            })
            .collect()
    });
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    let carried: Vec<u64> = (1..=NODES)
        .map(|i| c.new_flows(i) - before[i - 1])
        .collect();
    println!("NAT spread of 300 connections over the nodes (translations per node): {carried:?}");
    assert_eq!(carried.iter().sum::<u64>(), 300, "{carried:?}");
    assert!(carried.iter().all(|&n| n >= 45), "{carried:?}");

    // Graceful leave of n3 under a steady load: it withdraws its VIP and
    // its SNAT address; its translations continue on its peers.
    let load = Load::start_in(&c.client, vip(), Duration::from_millis(10), 30000).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    c.leave(3);
    wait_until(
        "n3's SNAT addresses routed to its peers",
        Duration::from_secs(5),
        || {
            snat_addrs(3)
                .iter()
                .all(|a| c.next_hops_of(a).len() == NODES - 1)
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.stop();
    let failed: Vec<_> = samples.iter().filter(|s| s.result.is_err()).collect();
    println!(
        "NAT graceful leave: {} requests during the leave, {} failed",
        samples.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed during the leave: {failed:?}"
    );
    c.join(3);
    wait_until(
        "n3's SNAT addresses back at n3",
        Duration::from_secs(10),
        || {
            snat_addrs(3)
                .iter()
                .all(|a| c.next_hops_of(a) == [node_addr(3)])
        },
    );

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
    let used: std::collections::BTreeSet<String> = clients
        .iter()
        .map(|&client| snat_of(&c.flow(1, client)))
        .collect();
    println!("SNAT addresses the long-lived connections use: {used:?}");
    for i in 1..=NODES {
        for snat in snat_addrs(i) {
            assert!(used.contains(&snat), "no connection uses {snat}: {used:?}");
        }
    }

    let survivors: Vec<usize> = (1..=NODES).filter(|&i| i != victim).collect();
    let replies_before: u64 = survivors.iter().map(|&i| reason(&c, i, "nat_reply")).sum();
    // New connections every 10 ms around the loss, too.
    let load = Load::start_in(&c.client, vip(), Duration::from_millis(10), 45000).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    let (dead, withdrawn) = c.kill_node(victim);
    let withdrawn_at = Instant::now();
    let taken_over = wait_until(
        "the dead node's SNAT addresses routed to the survivors",
        Duration::from_secs(5),
        || {
            snat_addrs(victim)
                .iter()
                .all(|a| c.next_hops_of(a).len() == NODES - 1)
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let samples = load.stop();
    // New connections may fail only while the router still sends to the
    // dead node: from one client timeout (2 s) before the kill until the
    // withdrawal, plus 0.5 s for the router's cached neighbour/route.
    let window =
        (killed - Duration::from_millis(2500))..(withdrawn_at + Duration::from_millis(500));
    let new_failed = samples.iter().filter(|s| s.result.is_err()).count();
    let outside: Vec<_> = samples
        .iter()
        .filter(|s| s.result.is_err() && !window.contains(&s.start))
        .collect();
    println!(
        "NAT node loss: {} new connections around the loss, {new_failed} failed",
        samples.len()
    );
    assert!(
        outside.is_empty(),
        "new connections failed after the withdrawal: {outside:?}"
    );
    let (failed, longest) = chatter.summary();
    println!(
        "NAT node loss: BFD withdrew n{victim} after {} ms (its SNAT addresses moved to the \
         survivors {} ms later); it carried {} moved pins; {} of {LONG_LIVED} long-lived \
         connections failed; longest stall {longest:?}",
        withdrawn.as_millis(),
        taken_over.as_millis(),
        moved.len(),
        failed.len()
    );
    for snat in snat_addrs(victim) {
        assert_eq!(
            sorted(c.next_hops_of(&snat)),
            survivors.iter().map(|&i| node_addr(i)).collect::<Vec<_>>()
        );
    }
    assert!(withdrawn < Duration::from_secs(1), "BFD took {withdrawn:?}");
    assert!(failed.is_empty(), "connections failed: {failed:?}");
    assert_within(
        "longest stall of a connection",
        longest,
        Duration::from_secs(1),
    );
    let replies_after: u64 = survivors.iter().map(|&i| reason(&c, i, "nat_reply")).sum();
    assert!(
        replies_after > replies_before,
        "the survivors translate replies"
    );
    for &i in &survivors {
        assert_eq!(reason(&c, i, "pass_no_route"), 0, "n{i} found every client");
    }

    // Rejoin: the rebooted node pulls every translation before it
    // announces, so the connections ECMP moves back to it keep theirs.
    c.reboot_node(victim, dead);
    wait_until(
        "the SNAT addresses back at their owner",
        Duration::from_secs(10),
        || {
            snat_addrs(victim)
                .iter()
                .all(|a| c.next_hops_of(a) == [node_addr(victim)])
        },
    );
    let pull = c.daemon(victim).json(&["status"]).unwrap()["replication"]["last_pull"].clone();
    println!("NAT rejoin: n{victim} pulled {pull}");
    assert!(
        pull["flows"].as_u64().unwrap() >= u64::from(LONG_LIVED),
        "{pull}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let (failed, longest) = chatter.summary();
    println!(
        "NAT rejoin: {} long-lived connections failed; longest stall {longest:?}",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "connections failed at rejoin: {failed:?}"
    );
}
