//! The controller plans a change completely before it writes: a change that
//! fails while planning (here: a backend with no route, listed after a
//! service whose table the same change rebuilds) leaves every map
//! byte-identical. Real maps of the loaded program, real next hops from
//! rtnetlink in a veth namespace. Needs root (BPF, namespaces).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use xdp_common::{
    Backend, Globals, Service, ServiceKey, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING,
    MAX_BACKENDS, SVC_F_HASH_SRC_ONLY,
};
use xdplb::{
    config::{Admin, Config},
    controller::Controller,
    dataplane::Maps,
    loader::Datapath,
};
use xdplb_tests::{
    datapath::PinDir,
    netns::{exec_line, unique_prefix, Netns},
};

const TABLE_SIZE: u32 = 251;

/// Everything the controller may write, read back from the kernel.
#[derive(Debug, PartialEq)]
struct Snapshot {
    services: Vec<(ServiceKey, Service)>,
    backends: Vec<Backend>,
    /// The slots every service of these tests can use.
    maglev: Vec<u32>,
    tx_ports: Vec<u32>,
    globals: Globals,
}

fn snapshot(maps: &Maps) -> Snapshot {
    let mut services: Vec<(ServiceKey, Service)> =
        maps.services.iter().map(Result::unwrap).collect();
    services.sort_by_key(|(k, _)| (k.addr, k.port_be, k.proto));
    let mut tx_ports: Vec<u32> = maps.tx_ports.keys().map(Result::unwrap).collect();
    tx_ports.sort();
    Snapshot {
        services,
        backends: (0..MAX_BACKENDS)
            .map(|i| maps.backend(i).unwrap())
            .collect(),
        maglev: (0..8 * TABLE_SIZE)
            .map(|i| maps.maglev.get(&i, 0).unwrap())
            .collect(),
        tx_ports,
        globals: maps.globals.get(&0, 0).unwrap(),
    }
}

/// `services`: (name, VIP, backends) on TCP port 80.
fn config(services: &[(&str, &str, &[&str])]) -> Config {
    config_with("", "", services)
}

/// `head`, then `services` as [`config`] writes them, with `options` in
/// each service's section.
fn config_with(head: &str, options: &str, services: &[(&str, &str, &[&str])]) -> Config {
    let mut text = head.to_owned();
    for (name, vip, backends) in services {
        text += &format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n\
             table_size = {TABLE_SIZE}\n{options}"
        );
        for b in *backends {
            text += &format!("[[service.backend]]\naddress = \"{b}\"\n");
        }
    }
    Config::parse(&text, "test").unwrap()
}

/// A namespace with a segment on which backends 10.1.0.11 to .13 are
/// resolved neighbours, and the program loaded with its maps pinned in a
/// directory of its own (removed when dropped, after the program).
fn bed() -> (Netns, PinDir, Datapath, Maps) {
    let ns = Netns::new(&unique_prefix("plan")).unwrap();
    let neighbours = (11..=13).map(|i| {
        format!("ip neigh replace 10.1.0.{i} lladdr 02:00:00:00:00:{i} dev v0 nud permanent")
    });
    let setup = [
        "ip link add v0 type veth peer name v1",
        "ip link set v0 up",
        "ip link set v1 up",
        "ip addr add 10.1.0.1/24 dev v0",
    ];
    for cmd in setup.map(String::from).into_iter().chain(neighbours) {
        exec_line(&ns, &cmd);
    }
    let pins = PinDir::new("plan");
    let mut datapath = Datapath::load(pins.path()).unwrap();
    let maps = Maps::take(&mut datapath.ebpf).unwrap();
    (ns, pins, datapath, maps)
}

#[test]
fn a_change_that_fails_while_planning_writes_nothing() {
    let (ns, _pins, _datapath, maps) = bed();

    ns.run(move || {
        let mut controller = Controller::new(maps).unwrap();
        controller
            .apply(&config(&[("a", "10.0.0.1", &["10.1.0.11"])]))
            .unwrap();
        let before = snapshot(controller.maps());

        // "a" changes (its table is rebuilt) and comes first in key order;
        // "b"'s backend has no route: the change fails while planning.
        let failing = config(&[
            ("a", "10.0.0.1", &["10.1.0.11", "10.1.0.12"]),
            ("b", "10.0.0.2", &["192.0.2.1"]),
        ]);
        let err = controller.apply(&failing).unwrap_err();
        assert!(format!("{err:#}").contains("no route"), "{err:#}");
        assert_eq!(
            snapshot(controller.maps()),
            before,
            "a change refused while planning wrote to the maps"
        );
        let a = controller.service_by_name("a").unwrap();
        assert_eq!(a.backends.len(), 1, "the model is unchanged too");
        assert!(controller.service_by_name("b").is_none());

        // The same change without the bad service goes through: the
        // snapshot above does see writes.
        controller
            .apply(&config(&[("a", "10.0.0.1", &["10.1.0.11", "10.1.0.12"])]))
            .unwrap();
        let after = snapshot(controller.maps());
        assert_ne!(after, before);
        let a = controller.service_by_name("a").unwrap();
        assert_eq!(a.active(), 2);
        for b in a.backends.values() {
            let entry = controller.maps().backend(b.id).unwrap();
            assert_eq!(entry.state, BACKEND_ACTIVE);
            assert!(entry.next_hop_resolved(), "{entry:?}");
        }

        // A removed service takes its entry and its backends' with it.
        let ids: Vec<u32> = a.backends.values().map(|b| b.id).collect();
        controller.apply(&config(&[])).unwrap();
        let empty = snapshot(controller.maps());
        assert_eq!(empty.services, vec![]);
        for id in ids {
            assert_eq!(
                empty.backends[id as usize],
                Backend::default(),
                "backend {id}"
            );
        }
    });
}

/// A change the Maglev table does not show (here the hash, which leaves
/// the same backends in every slot) still reaches the service's entry,
/// which is where the datapath reads it; and back.
#[test]
fn a_change_only_the_service_entry_shows_is_written() {
    let (ns, _pins, _datapath, maps) = bed();

    ns.run(move || {
        let mut controller = Controller::new(maps).unwrap();
        let services: &[(&str, &str, &[&str])] = &[("a", "10.0.0.1", &["10.1.0.11"])];
        let flags = |c: &Controller| {
            let entries = snapshot(c.maps()).services;
            assert_eq!(entries.len(), 1, "{entries:?}");
            entries[0].1.flags & SVC_F_HASH_SRC_ONLY
        };
        controller.apply(&config(services)).unwrap();
        assert_eq!(flags(&controller), 0);
        let table = snapshot(controller.maps()).maglev;
        let source = config_with("", "hash = \"source\"\n", services);
        controller.apply(&source).unwrap();
        assert_eq!(snapshot(controller.maps()).maglev, table, "same table");
        assert_eq!(flags(&controller), SVC_F_HASH_SRC_ONLY, "hash = source");
        controller.apply(&config(services)).unwrap();
        assert_eq!(flags(&controller), 0, "hash = 5-tuple again");
    });
}

/// Health verdicts applied as one batch, drains that expire, and admin
/// states: the controller's periodic and event paths, on real maps.
#[test]
fn verdicts_apply_as_a_batch_and_drains_expire_only_after_their_timeout() {
    let (ns, _pins, _datapath, maps) = bed();

    ns.run(move || {
        let mut controller = Controller::new(maps).unwrap();
        let backends = ["10.1.0.11", "10.1.0.12", "10.1.0.13"];
        let drain = "drain_timeout = \"1s\"\n";
        controller
            .apply(&config_with("", drain, &[("a", "10.0.0.1", &backends)]))
            .unwrap();
        let addr = |last: u8| (IpAddr::from([10, 1, 0, last]), 80);

        // Two verdicts and one for a backend that is not there: the two
        // apply, the third says why not.
        let outcomes = controller
            .set_health(&[
                ("a", addr(11), false),
                ("a", addr(12), false),
                ("a", addr(99), false),
            ])
            .unwrap();
        assert!(
            matches!(outcomes[..2], [Ok(true), Ok(true)]),
            "{outcomes:?}"
        );
        assert!(outcomes[2].is_err(), "{outcomes:?}");
        let a = controller.service_by_name("a").unwrap();
        assert_eq!(a.active(), 1);
        assert!(a.table().iter().all(|&id| id == a.backends[&addr(13)].id));
        // The same verdicts again change nothing.
        let again = controller
            .set_health(&[("a", addr(11), false), ("a", addr(12), false)])
            .unwrap();
        assert!(matches!(again[..], [Ok(false), Ok(false)]), "{again:?}");

        // A drain expires after drain_timeout, not before.
        controller.set_health(&[("a", addr(11), true)]).unwrap();
        controller.set_admin("a", addr(11), Admin::Drain).unwrap();
        let drained = Instant::now();
        assert!(controller.expire_drains(drained).unwrap().is_empty());
        let expired = controller
            .expire_drains(drained + Duration::from_millis(1100))
            .unwrap();
        assert_eq!(expired.len(), 1, "{expired:?}");
        let b = &controller.service_by_name("a").unwrap().backends[&addr(11)];
        assert_eq!(controller.maps().backend(b.id).unwrap().state, BACKEND_DOWN);
        assert!(controller
            .expire_drains(drained + Duration::from_secs(5))
            .unwrap()
            .is_empty());

        // The admin states of a healthy backend as the datapath sees them
        // (docs/configuration.md): drain keeps its established flows, down
        // moves them at once, up takes new flows again.
        let state = |c: &Controller| {
            let b = &c.service_by_name("a").unwrap().backends[&addr(12)];
            c.maps().backend(b.id).unwrap().state
        };
        controller.set_health(&[("a", addr(12), true)]).unwrap();
        assert_eq!(state(&controller), BACKEND_ACTIVE);
        for (admin, want) in [
            (Admin::Drain, BACKEND_DRAINING),
            (Admin::Down, BACKEND_DOWN),
            (Admin::Up, BACKEND_ACTIVE),
        ] {
            controller.set_admin("a", addr(12), admin).unwrap();
            assert_eq!(state(&controller), want, "admin {admin:?}");
        }
    });
}

/// Which destination MACs the datapath balances is the controller's to
/// write, like every other map: each interface's own MAC, added before the
/// program is attached there and followed when it (or the interface's
/// index) changes, and
/// `[cluster] extra_macs` on every one of them, following reloads.
#[test]
fn accepted_macs_follow_the_interfaces_and_the_configured_extra_macs() {
    const OWN: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    const VRRP: [u8; 6] = [0, 0, 0x5e, 0, 0x01, 0x01];
    let (ns, _pins, _datapath, maps) = bed();

    ns.run(move || {
        let config = |extra: &str| {
            let head = format!("[cluster]\nextra_macs = [{extra}]\n");
            config_with(&head, "", &[("a", "10.0.0.1", &["10.1.0.11"])])
        };
        let accepted = |c: &Controller| {
            let mut macs = c.maps().accepted_macs.entries();
            macs.sort();
            macs
        };
        let mut controller = Controller::new(maps).unwrap();
        controller.apply(&config("\"00:00:5e:00:01:01\"")).unwrap();
        assert_eq!(accepted(&controller), vec![], "no interface yet");

        let v0 = xdplb::loader::interface_index("v0").unwrap();
        controller.add_interface(v0, OWN).unwrap();
        assert_eq!(accepted(&controller), vec![(v0, VRRP), (v0, OWN)]);
        assert_eq!(snapshot(controller.maps()).tx_ports, vec![v0]);

        // A reload without the extra MAC takes it away, and only it.
        controller.apply(&config("")).unwrap();
        assert_eq!(accepted(&controller), vec![(v0, OWN)]);
        controller.apply(&config("\"00:00:5e:00:01:01\"")).unwrap();
        assert_eq!(accepted(&controller), vec![(v0, VRRP), (v0, OWN)]);

        // The interface's own MAC changes: the new one is balanced, the
        // old one no longer.
        const NEW: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
        assert_eq!(
            controller.set_interface(0, v0, NEW).unwrap(),
            Some((v0, OWN))
        );
        assert_eq!(accepted(&controller), vec![(v0, VRRP), (v0, NEW)]);
        assert_eq!(controller.set_interface(0, v0, NEW).unwrap(), None);
        assert!(controller.set_interface(1, v0, NEW).is_err());

        // The interface is re-created under its name (a driver reload): a
        // new index, here lo's. Frames arriving there are balanced, and it
        // is a redirect target.
        let lo = xdplb::loader::interface_index("lo").unwrap();
        assert_eq!(
            controller.set_interface(0, lo, NEW).unwrap(),
            Some((v0, NEW))
        );
        assert_eq!(accepted(&controller), vec![(lo, VRRP), (lo, NEW)]);
        assert!(snapshot(controller.maps()).tx_ports.contains(&lo));
    });
}
