//! Identical choices on every node: two controllers given the same
//! backends and weights, listed in other orders and learnt in another
//! order (so with other local ids), build the same Maglev table, shown by
//! the same fingerprint; a different weight or backend changes it. Real
//! datapaths (loaded, not attached) in a namespace of their own; needs root.

use std::path::PathBuf;

use xdplb::{config::Config, controller::Controller, dataplane::Maps, loader::Datapath};
use xdplb_tests::{
    netns::{exec_line, unique_prefix, Netns},
    require_root,
};

/// A controller programming a datapath of its own (loaded, never attached),
/// its pins removed on drop.
struct Builder {
    controller: Option<Controller>,
    _datapath: Datapath,
    pin_dir: PathBuf,
}

impl Drop for Builder {
    fn drop(&mut self) {
        self.controller.take();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

impl Builder {
    fn new(tag: &str) -> Self {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/xdplb-{}", unique_prefix(tag)));
        let mut datapath = Datapath::load(&pin_dir).expect("loading the XDP program");
        let maps = Maps::take(&mut datapath.ebpf).unwrap();
        Self {
            controller: Some(Controller::new(maps).unwrap()),
            _datapath: datapath,
            pin_dir,
        }
    }

    /// Applies a one-service configuration with `backends` (last octet,
    /// weight), in that order.
    fn apply(&mut self, backends: &[(u8, u32)]) {
        let mut text = "[[service]]\nname = \"web\"\nvip = \"10.99.100.1\"\nport = 80\n\
                        protocol = \"tcp\"\n\n"
            .to_owned();
        for (octet, weight) in backends {
            text += &format!(
                "[[service.backend]]\naddress = \"10.99.0.{octet}\"\nweight = {weight}\n\n"
            );
        }
        let config = Config::parse(&text, "test").unwrap();
        self.controller.as_mut().unwrap().apply(&config).unwrap();
    }

    fn fingerprint(&self) -> String {
        let controller = self.controller.as_ref().unwrap();
        controller
            .service_by_name("web")
            .unwrap()
            .fingerprint()
            .to_owned()
    }
}

#[test]
fn nodes_build_identical_tables_whatever_the_order_and_ids_of_their_backends() {
    require_root();
    // Backends need a next hop: a veth with static neighbours, in a
    // namespace of its own.
    let ns = Netns::new(&unique_prefix("clfp")).unwrap();
    exec_line(&ns, "ip link add eth0 type veth peer name eth1");
    exec_line(&ns, "ip link set eth0 up");
    exec_line(&ns, "ip link set eth1 up");
    exec_line(&ns, "ip addr add 10.99.0.1/24 dev eth0");
    for octet in 11..=14 {
        let neigh = format!("10.99.0.{octet} lladdr 02:00:00:00:00:{octet}");
        exec_line(
            &ns,
            &format!("ip neigh replace {neigh} dev eth0 nud permanent"),
        );
    }
    ns.run(|| {
        let mut a = Builder::new("fpa");
        a.apply(&[(11, 1), (12, 1), (13, 2)]);
        // Node b learnt its backends in another order (so other local
        // ids), and lists them in another order.
        let mut b = Builder::new("fpb");
        b.apply(&[(14, 1), (13, 2)]);
        b.apply(&[(13, 2), (14, 1), (12, 1), (11, 1)]);
        b.apply(&[(13, 2), (12, 1), (11, 1)]);
        let (fa, fb) = (a.fingerprint(), b.fingerprint());
        println!("fingerprints: {fa} and {fb}");
        assert_eq!(
            fa, fb,
            "same backends and weights, another order and other ids"
        );
        assert_eq!(fa.len(), 8);

        b.apply(&[(13, 2), (12, 1), (11, 2)]);
        assert_ne!(b.fingerprint(), fa, "a weight changed");
        b.apply(&[(13, 2), (12, 1), (11, 1)]);
        assert_eq!(b.fingerprint(), fa, "and back");
        b.apply(&[(13, 2), (12, 1)]);
        assert_ne!(b.fingerprint(), fa, "a backend removed");
    });
}
