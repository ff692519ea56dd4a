//! A cluster of three xdplb nodes behind a BIRD router doing ECMP over
//! BGP with BFD (the testbed in `xdplb_tests::cluster`), without flow
//! replication: spread, identical tables, graceful leave, node loss.
//!
//! Run with `--nocapture` to see the measured figures.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use xdplb_tests::{
    client::{self, StreamConn},
    cluster::{node_addr, Cluster, Replication, NODES, VIP},
    lb::Load,
    require_root,
};

/// Failures among `samples`, as (source port, error).
fn failures(samples: &[xdplb_tests::lb::Sample]) -> Vec<(u16, String)> {
    samples
        .iter()
        .filter_map(|s| s.result.as_ref().err().map(|e| (s.port, e.clone())))
        .collect()
}

#[test]
fn three_nodes_behind_ecmp_spread_leave_and_survive_a_node_loss() {
    require_root();
    assert!(
        xdplb_tests::which("bird") && xdplb_tests::which("birdc"),
        "BIRD 2 is needed (apt-get install bird2, or cargo xtask setup)"
    );
    let mut c = Cluster::build(Replication::None);
    let vip = SocketAddr::new(IpAddr::V4(VIP), 80);

    // Every node announces; the router has one route with three next hops.
    c.wait_next_hops(NODES, Duration::from_secs(20));
    let mut hops = c.next_hops();
    hops.sort();
    assert_eq!(hops, (1..=NODES).map(node_addr).collect::<Vec<_>>());
    for i in 1..=NODES {
        let status = c.daemon(i).json(&["status"]).unwrap();
        assert_eq!(status["cluster"]["state"], "announcing", "n{i}: {status}");
        assert_eq!(status["cluster"]["announced"][0], VIP.to_string(), "n{i}");
    }

    // Identical tables although each node lists the backends in another
    // order.
    let prints: Vec<String> = (1..=NODES)
        .map(|i| {
            let status = c.daemon(i).json(&["status"]).unwrap();
            status["fingerprints"]["web"].as_str().unwrap().to_owned()
        })
        .collect();
    println!("table fingerprints: {prints:?}");
    assert!(
        prints.iter().all(|p| *p == prints[0] && p.len() == 8),
        "{prints:?}"
    );

    // Spread: 300 connections, every node carries at least 15 %.
    let before: Vec<u64> = (1..=NODES).map(|i| c.new_flows(i)).collect();
    let failed: Vec<(u16, String)> = c.client.run(|| {
        (20000u16..20300)
            .filter_map(|port| {
                client::get(vip, Some(port), Duration::from_secs(3))
                    .err()
                    .map(|e| (port, format!("{e:#}")))
            })
            .collect()
    });
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    let carried: Vec<u64> = (1..=NODES)
        .map(|i| c.new_flows(i) - before[i - 1])
        .collect();
    println!("spread of 300 connections over the nodes (new flows per node): {carried:?}");
    assert_eq!(carried.iter().sum::<u64>(), 300, "{carried:?}");
    for (i, n) in carried.iter().enumerate() {
        assert!(
            *n >= 45,
            "node n{} carried {n} of 300 (< 15 %): {carried:?}",
            i + 1
        );
    }

    // Graceful leave of n3 under a steady load: zero failed requests.
    let load = Load::start_in(&c.client, vip, Duration::from_millis(10), 30000).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    c.leave(3);
    assert!(
        !c.table(3).contains(&VIP.to_string()),
        "n3 withdrew its route"
    );
    let status = c.daemon(3).json(&["status"]).unwrap();
    assert_eq!(status["cluster"]["state"], "left", "{status}");
    assert_eq!(
        status["cluster"]["withheld"][0],
        VIP.to_string(),
        "{status}"
    );
    let text = c.daemon(3).cli(&["status"]).unwrap();
    assert!(
        text.contains(&format!("cluster:     left in table 200; withheld: {VIP}")),
        "{text}"
    );
    let flows = c.new_flows(3);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.new_flows(3), flows, "no new flows reach a node that left");
    let samples = load.stop();
    let failed = failures(&samples);
    println!(
        "graceful leave: {} requests during the leave, {} failed",
        samples.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed during the leave: {failed:?}"
    );
    c.join(3);

    // Node loss: long-lived connections, a steady load, then n2 vanishes.
    let mut long: Vec<StreamConn> = c.client.run(|| {
        (40000u16..40030)
            .map(|port| {
                let mut s = StreamConn::open(vip, Some(port), Duration::from_secs(5)).unwrap();
                s.send_line("hello").unwrap();
                s
            })
            .collect()
    });
    let load = Load::start_in(&c.client, vip, Duration::from_millis(10), 45000).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // A SIGKILLed daemon leaves its route: BIRD still announces n2.
    let mut daemon = c.daemons[1].take().unwrap();
    daemon.proc.kill(libc::SIGKILL).unwrap();
    let _ = daemon.proc.wait_timeout(Duration::from_secs(5));
    assert!(
        c.table(2).contains(&VIP.to_string()),
        "route kept after SIGKILL"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.next_hops().len(),
        NODES,
        "a killed daemon is not withdrawn"
    );
    // The host dies: link cut first, then BIRD killed (a killed BIRD's
    // kernel would otherwise close the BGP session, which the router
    // notices at once: that would not measure BFD).
    c.switch
        .exec(&["ip", "link", "set", "v-n2", "down"])
        .unwrap();
    let cut = Instant::now();
    c.node_birds[1].as_mut().unwrap().kill().unwrap();
    let withdrawn = c.wait_next_hops(NODES - 1, Duration::from_secs(5));
    println!(
        "node loss: BFD withdrew n2 after {} ms",
        withdrawn.as_millis()
    );
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.stop();
    let failed = failures(&samples);
    println!(
        "node loss: {} new connections around the loss, {} failed",
        samples.len(),
        failed.len()
    );
    // New connections may fail only while the router still sends to n2:
    // those started from one client timeout (2 s) before the cut until the
    // withdrawal, plus 0.5 s for the router's cached neighbour/route.
    let window =
        (cut - Duration::from_millis(2500))..(cut + withdrawn + Duration::from_millis(500));
    let outside = failures(
        &samples
            .into_iter()
            .filter(|s| !window.contains(&s.start))
            .collect::<Vec<_>>(),
    );
    let broken: Vec<String> = long
        .iter_mut()
        .enumerate()
        .filter_map(|(k, s)| s.send_line("after").err().map(|e| format!("#{k}: {e:#}")))
        .collect();
    println!(
        "node loss: {} of {} long-lived connections broken",
        broken.len(),
        long.len()
    );
    assert!(
        withdrawn < Duration::from_secs(1),
        "BFD took {withdrawn:?} to withdraw the lost node"
    );
    assert!(
        broken.is_empty(),
        "long-lived connections broken: {broken:?}"
    );
    assert!(
        outside.is_empty(),
        "new connections failed outside the withdrawal window: {outside:?}"
    );
    drop(daemon);

    // Ctrl-C detaches the datapath: the route goes first.
    c.daemons[0].as_mut().unwrap().interrupt().unwrap();
    assert!(
        !c.table(1).contains(&VIP.to_string()),
        "route withdrawn on SIGINT"
    );
    c.wait_next_hops(1, Duration::from_secs(5));
    assert_eq!(c.next_hops(), [node_addr(3)]);
}
