//! A cluster of three xdplb nodes behind a BIRD router doing ECMP over
//! BGP with BFD (the testbed in `xdplb_tests::cluster`), without flow
//! replication: spread, identical tables, graceful leave, node loss.
//!
//! Run with `--nocapture` to see the measured figures.

use std::time::Duration;

use xdplb_tests::{
    client::StreamConn,
    cluster::{node_addr, vip, Cluster, Replication, NODES, VIP},
    lb::{failures, Load},
};

#[test]
fn three_nodes_behind_ecmp_spread_leave_and_survive_a_node_loss() {
    let mut c = Cluster::build(Replication::None);
    let vip_route = VIP.to_string();

    // Every node announces; the router has one route with three next hops.
    let mut hops = c.next_hops();
    hops.sort();
    assert_eq!(hops, (1..=NODES).map(node_addr).collect::<Vec<_>>());
    // Identical tables although each node lists the backends in another
    // order.
    let mut prints = Vec::new();
    for i in 1..=NODES {
        let status = c.status(i);
        assert_eq!(status["cluster"]["state"], "announcing", "n{i}: {status}");
        assert_eq!(status["cluster"]["announced"][0], vip_route, "n{i}");
        prints.push(status["fingerprints"]["web"].as_str().unwrap().to_owned());
    }
    println!("table fingerprints: {prints:?}");
    assert!(
        prints.iter().all(|p| *p == prints[0] && p.len() == 8),
        "{prints:?}"
    );

    c.assert_spread();

    // Graceful leave of n3 under a steady load: zero failed requests.
    let flows = c.leave_under_load(3, || {
        assert!(!c.table(3).contains(&vip_route), "n3 withdrew its route");
        let status = c.status(3);
        assert_eq!(status["cluster"]["state"], "left", "{status}");
        assert_eq!(status["cluster"]["withheld"][0], vip_route, "{status}");
        let text = c.daemon(3).cli(&["status"]).unwrap();
        assert!(
            text.contains(&format!("cluster:     left in table 200; withheld: {VIP}")),
            "{text}"
        );
        c.new_flows(3)
    });
    assert_eq!(c.new_flows(3), flows, "no new flows reach a node that left");
    c.join(3);

    // Node loss: long-lived connections, a steady load, then n2 vanishes.
    let mut long: Vec<StreamConn> = c.client.run(|| {
        (40000u16..40030)
            .map(|port| {
                let mut s = StreamConn::open(vip(), Some(port), Duration::from_secs(5)).unwrap();
                s.send_line("hello").unwrap();
                s
            })
            .collect()
    });
    let load = Load::start_in(&c.client, vip(), Duration::from_millis(10), 45000).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // A SIGKILLed daemon leaves its route: BIRD still announces n2.
    let daemon = c.kill_daemon(2);
    assert!(c.table(2).contains(&vip_route), "route kept after SIGKILL");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.next_hops().len(),
        NODES,
        "a killed daemon is not withdrawn"
    );
    // The host dies: BFD must notice (see `Cluster::cut_node`).
    let (cut, withdrawn) = c.cut_node(2);
    println!(
        "node loss: BFD withdrew n2 after {} ms",
        withdrawn.as_millis()
    );
    std::thread::sleep(Duration::from_secs(1));
    let samples = load.stop();
    println!(
        "node loss: {} new connections around the loss, {} failed",
        samples.len(),
        failures(&samples).len()
    );
    // New connections may fail only while the router still sends to n2:
    // those started from one client timeout (2 s) before the cut until the
    // withdrawal, plus 0.5 s for the router's cached neighbour/route.
    let window =
        (cut - Duration::from_millis(2500))..(cut + withdrawn + Duration::from_millis(500));
    let outside: Vec<_> = failures(&samples)
        .into_iter()
        .filter(|s| !window.contains(&s.start))
        .collect();
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
        !c.table(1).contains(&vip_route),
        "route withdrawn on SIGINT"
    );
    c.wait_next_hops(1, Duration::from_secs(5));
    assert_eq!(c.next_hops(), [node_addr(3)]);
}
