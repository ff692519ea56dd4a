//! API changes are all or nothing, and API input the daemon cannot mean is
//! refused: the real daemon in veth namespaces, driven through its CLI and
//! raw HTTP on its socket. Needs root.
//!
//! The state file is made unwritable by putting a non-empty directory where
//! the daemon writes: root ignores permission bits, not that.

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use xdplb_tests::{bed::Bed, lb::dsr_config};

fn bed(tag: &str) -> Bed {
    Bed::dsr(tag, 2, dsr_config)
}

/// Every backend of web4 as (address, admin, datapath state).
fn backend_states(bed: &Bed) -> Vec<(String, String, String)> {
    let list = bed.lb.json(&["backend", "list", "web4"]).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let field = |k: &str| b[k].as_str().unwrap().to_owned();
            (field("address"), field("admin"), field("state"))
        })
        .collect()
}

/// Where the datapath sends 32 sample flows, with the backend's state.
fn sample_routes(bed: &Bed) -> Vec<(String, String)> {
    (0..32)
        .map(|i| {
            let src = SocketAddr::new(bed.topo.client_addr(false), 40000 + i);
            let flow = bed.lb.flow(src, bed.vip()).unwrap();
            let field = |k: &str| flow[k].as_str().unwrap().to_owned();
            (field("backend"), field("backend_state"))
        })
        .collect()
}

#[test]
fn a_change_that_cannot_be_persisted_is_not_applied() {
    let bed = bed("atom");
    let b1 = bed.addr(1).to_string();
    let drain = ["backend", "drain", "web4", &b1];
    let (backends, routes) = (backend_states(&bed), sample_routes(&bed));
    assert!(
        routes
            .iter()
            .any(|(b, s)| b.starts_with(&b1) && s == "active"),
        "some sample flow goes to b1: {routes:?}"
    );

    // The new state cannot even be written (its temporary file is
    // blocked), then cannot be put in place (the state file is blocked).
    let state = bed.lb.dir.join("state.json");
    for blocked in [state.with_extension("json.tmp"), state.clone()] {
        std::fs::create_dir_all(blocked.join("obstacle")).unwrap();
        let err = bed.lb.cli(&drain).unwrap_err().to_string();
        assert!(err.contains("not changed"), "{}: {err}", blocked.display());
        assert_eq!(backend_states(&bed), backends, "{}", blocked.display());
        assert_eq!(
            sample_routes(&bed),
            routes,
            "the datapath changed: {}",
            blocked.display()
        );
        // A reload changes no run-time state: nothing to persist.
        bed.lb.cli(&["reload"]).unwrap();
        std::fs::remove_dir_all(&blocked).unwrap();
    }
    assert!(!state.exists());

    // Unblocked, the same change is applied and persisted.
    bed.lb.cli(&drain).unwrap();
    let drained = backend_states(&bed);
    assert!(
        drained
            .iter()
            .any(|(a, admin, _)| *a == b1 && admin == "drain"),
        "{drained:?}"
    );
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains("\"drain\""), "{text}");
}

/// The status line and body of a raw HTTP request on the API socket.
fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(socket).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: xdplb\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"));
    (status, answer)
}

#[test]
fn input_the_daemon_cannot_mean_is_refused() {
    let bed = bed("inp");
    let before = configured(&bed);
    let b1 = bed.addr(1);
    // Not a backend of this two-backend topology.
    let b3 = bed.addr(3);

    // Repeated keys: which one would win is a guess, so none does.
    let socket = bed.lb.socket();
    let body = format!(
        r#"{{"service": "web4", "backend": {{"address": "{b3}", "weight": 0, "weight": 100}}}}"#
    );
    let (status, answer) = http(&socket, "POST", "/v1/backends/add", &body);
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("duplicate field `weight`"), "{answer}");
    let body = format!(r#"{{"service": "web4", "service": "web6", "address": "{b1}"}}"#);
    let (status, answer) = http(&socket, "POST", "/v1/backends/drain", &body);
    assert_eq!(status, 400, "{answer}");

    // A flow whose source and destination are of two address families.
    let vip6 = SocketAddr::new(bed.topo.vip6().into(), 80);
    let err = bed
        .lb
        .cli(&["flow", "10.77.0.200:40000", &vip6.to_string(), "tcp"])
        .unwrap_err();
    assert!(format!("{err:#}").contains("address families"), "{err:#}");

    // A backend that is the VIP itself.
    let vip4 = bed.topo.vip4().to_string();
    let err = bed.lb.cli(&["backend", "add", "web4", &vip4]).unwrap_err();
    assert!(format!("{err:#}").contains("VIP itself"), "{err:#}");

    // Names that are paths or options.
    for name in ["..", ".", "a/b", "-x"] {
        let add = format!("service add --name={name} --vip=10.77.0.250 --port=81 --protocol=tcp");
        let err = bed.lb.cli_line(&add).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a valid name"),
            "{name}: {err:#}"
        );
    }

    // What the file defines: the file's version would win over a run-time
    // one, so adding it would answer "added" and change nothing.
    let add = "service add --name=web4 --vip=10.77.0.250 --port=81 --protocol=tcp";
    let err = format!("{:#}", bed.lb.cli_line(add).unwrap_err());
    assert!(
        err.contains("defined in the configuration file") && err.contains("xdplb.toml"),
        "{err}"
    );
    let b1 = b1.to_string();
    let err = bed
        .lb
        .cli(&["backend", "add", "web4", &b1, "--weight", "7"]);
    let err = format!("{:#}", err.unwrap_err());
    assert!(
        err.contains(&format!("already has backend {b1}:80")),
        "{err}"
    );

    assert_eq!(configured(&bed), before);
    let state = bed.lb.dir.join("state.json");
    assert!(!state.exists(), "a refused change was persisted");

    // A replacement the datapath cannot take (its backend has no route) is
    // refused while it is planned, and logs none of what it planned (the
    // old service's removal). The removal that follows is the one logged.
    let add = "service add --name=spare --port=81 --protocol=tcp";
    bed.lb
        .cli_line(&format!("{add} --vip=10.77.0.251"))
        .unwrap();
    let replace = format!("{add} --vip=10.77.0.252 --backend=192.0.2.1");
    let err = bed.lb.cli_line(&replace).unwrap_err();
    assert!(format!("{err:#}").contains("not changed"), "{err:#}");
    bed.lb.cli_line("service remove spare").unwrap();
    let removals = || {
        let log = bed.lb.proc.output();
        log.iter()
            .filter(|l| l.contains("service removed service=spare"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while removals() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(removals(), 1, "{}", bed.lb.proc.output_text());

    // A NAT service's backend named by its address alone: the one on the
    // service's port, or else the only one at that address; of several,
    // the port must be given.
    let b2 = bed.addr(2).to_string();
    bed.lb
        .cli_line("service add --name=ports --vip=10.77.0.253 --port=81 --protocol=tcp --mode=nat")
        .unwrap();
    for (addr, port) in [(&b1, "8080"), (&b1, "8081"), (&b2, "8080")] {
        let add = ["backend", "add", "ports", addr, "--port", port];
        bed.lb.cli(&add).unwrap();
    }
    let out = bed.lb.cli(&["backend", "drain", "ports", &b2]).unwrap();
    assert!(out.contains(&format!("backend {b2}:8080 of")), "{out}");
    let err = bed.lb.cli(&["backend", "drain", "ports", &b1]).unwrap_err();
    assert!(
        format!("{err:#}").contains(&format!("several backends at {b1} (ports 8080, 8081)")),
        "{err:#}"
    );
    let out = bed
        .lb
        .cli(&["backend", "drain", "ports", &b1, "--port", "8081"]);
    assert!(out.unwrap().contains(&format!("backend {b1}:8081 of")));
}

/// `xdplb service list --json` without what health checks change on their
/// own schedule (a check may complete between two reads).
fn configured(bed: &Bed) -> serde_json::Value {
    let mut services = bed.lb.json(&["service", "list"]).unwrap();
    for backend in services
        .as_array_mut()
        .into_iter()
        .flatten()
        .flat_map(|s| s["backends"].as_array_mut().into_iter().flatten())
    {
        if let Some(b) = backend.as_object_mut() {
            for volatile in ["last_check", "health", "state", "transitions"] {
                b.remove(volatile);
            }
        }
    }
    services
}

/// A backend refused for want of a route is accepted once the route
/// exists: the refusal is not remembered (it was, until a change that
/// succeeded made the daemon forget it, whatever the kernel's routes).
#[test]
fn a_backend_refused_for_want_of_a_route_is_accepted_once_routed() {
    let bed = bed("route");
    // TEST-NET-2: routed nowhere in the testbed until the route below.
    let add = ["backend", "add", "web4", "198.51.100.7"];
    let err = format!("{:#}", bed.lb.cli(&add).unwrap_err());
    assert!(err.contains("no route to backend 198.51.100.7"), "{err}");

    let lb_iface = bed.topo.lb_iface();
    bed.topo
        .lb()
        .exec(&["ip", "route", "add", "198.51.100.0/24", "dev", lb_iface])
        .unwrap();
    let added = bed.lb.cli(&add).unwrap();
    assert!(added.contains("added"), "{added}");
    let backend = bed.lb.backend("web4", "198.51.100.7".parse().unwrap());
    assert!(backend.is_ok(), "not listed after its add: {backend:?}");
}
