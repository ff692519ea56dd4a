//! The Prometheus exposition, built from one [`Snapshot`] of the API's
//! views with the `prometheus-client` crate (OpenMetrics text).
//!
//! Names start with `xdplb_`, counters end in `_total`, values are in base
//! units (seconds, bytes). Labels only take values bounded by the
//! configuration (service names, backend addresses) or by the code
//! (datapath reasons, states), so the number of series stays bounded.
//! docs/operations.md lists every metric.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{text::encode as encode_text, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde_json::Value;

use super::Snapshot;

/// The `Content-Type` of the OpenMetrics exposition (what Prometheus asks
/// for in its `Accept` header).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The `Content-Type` of the classic Prometheus text format (for everyone
/// else: curl, `promtool check metrics`, older scrapers).
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    service: String,
    /// `IP:PORT`, IPv6 as `[IP]:PORT`.
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendStateLabels {
    service: String,
    backend: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckResultLabels {
    service: String,
    backend: String,
    /// "success" or "failure".
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

type Gauges<L> = Family<L, Gauge>;
type Counters<L> = Family<L, Counter>;
type SecondsGauges<L> = Family<L, Gauge<f64, AtomicU64>>;

/// The datapath states and operator states a backend can be in; every one
/// is exported (1 for the current, 0 for the others) so a query can select
/// on the label without missing series.
const STATES: [&str; 3] = ["active", "draining", "down"];
const ADMIN_STATES: [&str; 3] = ["up", "drain", "down"];

/// Renders the snapshot as an OpenMetrics exposition.
pub fn encode(snapshot: &Snapshot) -> String {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    metrics.fill(snapshot);
    let mut text = String::new();
    encode_text(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

/// Turns `encode`'s OpenMetrics text into the classic Prometheus text
/// format. The two differ only where OpenMetrics names a counter family
/// without its `_total` suffix (its samples have it in both) and in the
/// `# UNIT` and `# EOF` lines, which the classic format lacks.
pub fn to_classic(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let family = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let name = rest.split(' ').next()?;
            counters
                .contains(&name)
                .then_some((prefix, name, &rest[name.len()..]))
        });
        match family {
            Some((prefix, name, rest)) => out.push_str(&format!("{prefix}{name}_total{rest}")),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn u64_of(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

fn i64_of(value: &Value) -> i64 {
    i64::try_from(u64_of(value)).unwrap_or(i64::MAX)
}

fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// `IP:PORT` of a backend view (IPv6 bracketed).
fn backend_label(backend: &Value) -> String {
    let address = str_of(&backend["address"]);
    let port = u64_of(&backend["port"]);
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

#[derive(Default)]
struct Metrics {
    build_info: Gauges<VersionLabels>,
    adopted: Gauge,
    uptime: Gauge,
    services: Gauge,
    backends: Gauge,
    backends_active: Gauge,
    service_packets: Counters<ServiceLabels>,
    service_bytes: Counters<ServiceLabels>,
    service_new_flows: Counters<ServiceLabels>,
    backend_packets: Counters<BackendLabels>,
    backend_bytes: Counters<BackendLabels>,
    backend_new_flows: Counters<BackendLabels>,
    backend_answered: Counters<BackendLabels>,
    backend_refused: Counters<BackendLabels>,
    backend_syn_retransmits: Counters<BackendLabels>,
    backend_suspicions: Counters<BackendLabels>,
    backend_weight: Gauges<BackendLabels>,
    backend_healthy: Gauges<BackendLabels>,
    backend_state: Gauges<BackendStateLabels>,
    backend_admin: Gauges<BackendStateLabels>,
    transitions: Counters<BackendLabels>,
    checks: Counters<CheckResultLabels>,
    check_duration: SecondsGauges<BackendLabels>,
    last_check_ok: Gauges<BackendLabels>,
    datapath: Counters<ReasonLabels>,
    nat_flows: Gauge,
    nat_ports: Gauge,
    nat_capacity: Gauge,
    flow_capacity: Gauge,
    replication_sent: Counter,
    replication_installed: Counter,
    replication_ring_lost: Counter,
    replication_refused: Counter,
    replication_missed: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        // Registered clones share their values with the ones kept here.
        let m = &metrics;
        registry.register(
            "xdplb_build_info",
            "The daemon's version (always 1)",
            m.build_info.clone(),
        );
        registry.register(
            "xdplb_adopted",
            "1 if this daemon adopted a running datapath",
            m.adopted.clone(),
        );
        registry.register(
            "xdplb_uptime_seconds",
            "Seconds since the daemon started",
            m.uptime.clone(),
        );
        registry.register("xdplb_services", "Services configured", m.services.clone());
        registry.register(
            "xdplb_backends",
            "Backends configured, all services",
            m.backends.clone(),
        );
        registry.register(
            "xdplb_backends_active",
            "Backends taking new flows",
            m.backends_active.clone(),
        );
        registry.register(
            "xdplb_service_packets",
            "Packets to the service's VIP",
            m.service_packets.clone(),
        );
        registry.register(
            "xdplb_service_bytes",
            "Bytes to the service's VIP",
            m.service_bytes.clone(),
        );
        registry.register(
            "xdplb_service_new_flows",
            "New flows to the service's VIP (DSR flows pinned, NAT translations made)",
            m.service_new_flows.clone(),
        );
        registry.register(
            "xdplb_backend_packets",
            "Packets forwarded to the backend",
            m.backend_packets.clone(),
        );
        registry.register(
            "xdplb_backend_bytes",
            "Bytes forwarded to the backend",
            m.backend_bytes.clone(),
        );
        registry.register(
            "xdplb_backend_new_flows",
            "New flows sent to the backend",
            m.backend_new_flows.clone(),
        );
        registry.register(
            "xdplb_backend_flows_answered",
            "New flows that got an answer (passive detection)",
            m.backend_answered.clone(),
        );
        registry.register(
            "xdplb_backend_flows_refused",
            "NAT: new flows the backend reset without answering",
            m.backend_refused.clone(),
        );
        registry.register(
            "xdplb_backend_syn_retransmits",
            "SYNs sent again for flows the backend had not answered",
            m.backend_syn_retransmits.clone(),
        );
        registry.register(
            "xdplb_backend_suspicions",
            "Times the backend's traffic made it a suspect (each probed at once)",
            m.backend_suspicions.clone(),
        );
        registry.register(
            "xdplb_backend_weight",
            "The backend's configured weight",
            m.backend_weight.clone(),
        );
        registry.register(
            "xdplb_backend_healthy",
            "Health-check verdict: 1 up, 0 down (1 when checks are off)",
            m.backend_healthy.clone(),
        );
        registry.register(
            "xdplb_backend_state",
            "Datapath state: 1 for the current one (active, draining, down)",
            m.backend_state.clone(),
        );
        registry.register(
            "xdplb_backend_admin_state",
            "Operator state: 1 for the current one (up, drain, down)",
            m.backend_admin.clone(),
        );
        registry.register(
            "xdplb_backend_health_transitions",
            "Health verdict changes since the daemon started",
            m.transitions.clone(),
        );
        registry.register(
            "xdplb_backend_health_checks",
            "Health probes run, by result (success, failure)",
            m.checks.clone(),
        );
        registry.register(
            "xdplb_backend_health_check_duration_seconds",
            "How long the latest health probe took",
            m.check_duration.clone(),
        );
        registry.register(
            "xdplb_backend_health_check_last_success",
            "1 if the latest health probe succeeded, 0 if it failed",
            m.last_check_ok.clone(),
        );
        registry.register(
            "xdplb_datapath_packets",
            "Packets seen by the XDP program, by outcome (see docs/datapath.md)",
            m.datapath.clone(),
        );
        registry.register(
            "xdplb_nat_flows",
            "NAT: translated flows live",
            m.nat_flows.clone(),
        );
        registry.register(
            "xdplb_nat_ports_in_use",
            "NAT: allocated source ports (reply entries) live",
            m.nat_ports.clone(),
        );
        registry.register(
            "xdplb_nat_capacity",
            "NAT: capacity of each NAT table",
            m.nat_capacity.clone(),
        );
        // Capacity only, no entry count: counting the LRU flow table's
        // entries means one system call per entry (about 0.3 s of CPU for a
        // full table, see docs/operations.md), too much for every scrape.
        registry.register(
            "xdplb_flow_table_capacity",
            "Capacity of the DSR flow table (LRU: a full table evicts its oldest flows)",
            m.flow_capacity.clone(),
        );
        registry.register(
            "xdplb_replication_sent_flows",
            "Flow pins sent to cluster peers",
            m.replication_sent.clone(),
        );
        registry.register(
            "xdplb_replication_installed_flows",
            "Flow pins from cluster peers installed here",
            m.replication_installed.clone(),
        );
        registry.register(
            "xdplb_replication_ring_lost",
            "Flow pins lost because the datapath's ring was full",
            m.replication_ring_lost.clone(),
        );
        registry.register(
            "xdplb_replication_refused_messages",
            "Replication messages refused (bad key, not a peer, malformed, stale)",
            m.replication_refused.clone(),
        );
        registry.register(
            "xdplb_replication_missed_messages",
            "Replication messages from peers lost on the way (sequence gaps)",
            m.replication_missed.clone(),
        );
        metrics
    }

    fn fill(&self, snapshot: &Snapshot) {
        let status = &snapshot.status;
        self.build_info
            .get_or_create(&VersionLabels {
                version: str_of(&status["version"]).to_owned(),
            })
            .set(1);
        self.adopted
            .set(i64::from(status["adopted"].as_bool() == Some(true)));
        self.uptime.set(i64_of(&status["uptime_s"]));
        self.services.set(i64_of(&status["services"]));
        self.backends.set(i64_of(&status["backends"]));
        self.backends_active.set(i64_of(&status["backends_active"]));

        for service in snapshot.services.as_array().into_iter().flatten() {
            let name = str_of(&service["name"]).to_owned();
            let labels = ServiceLabels {
                service: name.clone(),
            };
            for (family, key) in [
                (&self.service_packets, "packets"),
                (&self.service_bytes, "bytes"),
                (&self.service_new_flows, "new_flows"),
            ] {
                family.get_or_create(&labels).inc_by(u64_of(&service[key]));
            }
            for backend in service["backends"].as_array().into_iter().flatten() {
                self.fill_backend(snapshot, &name, backend);
            }
        }

        for (reason, count) in snapshot.stats["reasons"].as_object().into_iter().flatten() {
            self.datapath
                .get_or_create(&ReasonLabels {
                    reason: reason.clone(),
                })
                .inc_by(u64_of(count));
        }
        self.flow_capacity.set(i64::from(xdp_common::MAX_FLOWS));
        let r = &snapshot.stats["replication"];
        if r.is_object() {
            self.replication_sent.inc_by(u64_of(&r["sent_flows"]));
            self.replication_installed.inc_by(u64_of(&r["installed"]));
            self.replication_ring_lost.inc_by(u64_of(&r["ring_lost"]));
            let refused = ["bad_tag", "unknown_sender", "malformed", "stale"];
            self.replication_refused
                .inc_by(refused.iter().map(|k| u64_of(&r[*k])).sum());
            let missed = r["peers"].as_array().into_iter().flatten();
            self.replication_missed
                .inc_by(missed.map(|p| u64_of(&p["missed"])).sum());
        }
        let nat = &snapshot.stats["nat"];
        if nat.is_object() {
            self.nat_flows.set(i64_of(&nat["flows"]));
            self.nat_ports.set(i64_of(&nat["reverse"]));
            self.nat_capacity.set(i64_of(&nat["capacity"]));
        }
    }

    fn fill_backend(&self, snapshot: &Snapshot, service: &str, backend: &Value) {
        let labels = BackendLabels {
            service: service.to_owned(),
            backend: backend_label(backend),
        };
        let with_state = |state: &str| BackendStateLabels {
            service: labels.service.clone(),
            backend: labels.backend.clone(),
            state: state.to_owned(),
        };
        let passive = &backend["passive"];
        for (family, value) in [
            (&self.backend_packets, &backend["packets"]),
            (&self.backend_bytes, &backend["bytes"]),
            (&self.backend_new_flows, &backend["new_flows"]),
            (&self.backend_answered, &passive["answered"]),
            (&self.backend_refused, &passive["refused"]),
            (&self.backend_syn_retransmits, &passive["syn_retransmits"]),
            (&self.backend_suspicions, &passive["suspicions"]),
            (&self.transitions, &backend["transitions"]),
        ] {
            family.get_or_create(&labels).inc_by(u64_of(value));
        }
        self.backend_weight
            .get_or_create(&labels)
            .set(i64_of(&backend["weight"]));
        self.backend_healthy
            .get_or_create(&labels)
            .set(i64::from(str_of(&backend["health"]) == "up"));
        for (family, states, key) in [
            (&self.backend_state, STATES, "state"),
            (&self.backend_admin, ADMIN_STATES, "admin"),
        ] {
            for state in states {
                let current = str_of(&backend[key]) == state;
                family
                    .get_or_create(&with_state(state))
                    .set(i64::from(current));
            }
        }
        if let Some(last) = backend["last_check"].as_str() {
            self.last_check_ok
                .get_or_create(&labels)
                .set(i64::from(last == "ok"));
        }
        let figures = snapshot
            .checks
            .iter()
            .find(|c| c.service == labels.service && c.backend == labels.backend);
        if let Some(figures) = figures {
            let result = |result: &str| CheckResultLabels {
                service: labels.service.clone(),
                backend: labels.backend.clone(),
                result: result.to_owned(),
            };
            self.checks
                .get_or_create(&result("success"))
                .inc_by(figures.checks.saturating_sub(figures.failures));
            self.checks
                .get_or_create(&result("failure"))
                .inc_by(figures.failures);
            if let Some(seconds) = figures.last_duration_s {
                self.check_duration.get_or_create(&labels).set(seconds);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::web::CheckFigures;

    fn snapshot() -> Snapshot {
        let backend = |address: &str, health: &str, state: &str| {
            json!({"service": "web", "address": address, "port": 80, "weight": 2,
                   "admin": "up", "health": health, "state": state, "mac": null,
                   "packets": 10, "bytes": 1000, "new_flows": 3, "last_check": "ok",
                   "transitions": 1})
        };
        Snapshot {
            status: json!({"version": "9.9.9", "pid": 1, "uptime_s": 42, "adopted": true,
                           "services": 1, "backends": 2, "backends_active": 1}),
            services: json!([{"name": "web", "packets": 20, "bytes": 2000, "new_flows": 6,
                              "backends": [
                backend("10.0.0.1", "up", "active"), backend("fd00::2", "down", "down")]}]),
            stats: json!({"reasons": {"flow_new": 3, "pass_not_ip": 7},
                          "nat": {"flows": 4, "reverse": 5, "capacity": 65536, "reclaimed": 0}}),
            checks: vec![CheckFigures {
                service: "web".into(),
                backend: "[fd00::2]:80".into(),
                checks: 10,
                failures: 4,
                last_duration_s: Some(0.25),
            }],
        }
    }

    #[test]
    fn exposes_the_views() {
        let text = encode(&snapshot());
        for line in [
            "xdplb_build_info{version=\"9.9.9\"} 1",
            "xdplb_adopted 1",
            "xdplb_uptime_seconds 42",
            "xdplb_service_packets_total{service=\"web\"} 20",
            "xdplb_backend_bytes_total{service=\"web\",backend=\"10.0.0.1:80\"} 1000",
            "xdplb_service_new_flows_total{service=\"web\"} 6",
            "xdplb_backend_new_flows_total{service=\"web\",backend=\"10.0.0.1:80\"} 3",
            "xdplb_backend_healthy{service=\"web\",backend=\"[fd00::2]:80\"} 0",
            "xdplb_backend_state{service=\"web\",backend=\"[fd00::2]:80\",state=\"down\"} 1",
            "xdplb_backend_state{service=\"web\",backend=\"[fd00::2]:80\",state=\"active\"} 0",
            "xdplb_backend_health_checks_total{service=\"web\",backend=\"[fd00::2]:80\",\
             result=\"failure\"} 4",
            "xdplb_backend_health_checks_total{service=\"web\",backend=\"[fd00::2]:80\",\
             result=\"success\"} 6",
            "xdplb_backend_health_check_duration_seconds{service=\"web\",\
             backend=\"[fd00::2]:80\"} 0.25",
            "xdplb_datapath_packets_total{reason=\"flow_new\"} 3",
            "xdplb_nat_ports_in_use 5",
            "xdplb_flow_table_capacity 262144",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn exposes_replication_counters_summed_over_reasons_and_peers() {
        let mut snapshot = snapshot();
        let peer = |missed: u64| json!({"address": "10.0.0.2:7946", "missed": missed});
        snapshot.stats["replication"] = json!({
            "sent_flows": 11, "installed": 12, "ring_lost": 13,
            "bad_tag": 1, "unknown_sender": 2, "malformed": 4, "stale": 8,
            "peers": [peer(3), peer(5)]});
        let text = encode(&snapshot);
        for line in [
            "xdplb_replication_sent_flows_total 11",
            "xdplb_replication_installed_flows_total 12",
            "xdplb_replication_ring_lost_total 13",
            // Every kind of refusal, replays and stale messages included.
            "xdplb_replication_refused_messages_total 15",
            "xdplb_replication_missed_messages_total 8",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn classic_format_names_counter_families_with_total() {
        let text = to_classic(&encode(&snapshot()));
        for part in [
            "# TYPE xdplb_service_packets_total counter\n",
            "# HELP xdplb_service_packets_total Packets",
            "# TYPE xdplb_uptime_seconds gauge\n",
        ] {
            assert!(text.contains(part), "no {part:?} in\n{text}");
        }
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    }
}
