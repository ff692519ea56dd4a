//! The optional `[cluster]` section of the configuration file:
//!
//! ```toml
//! [cluster]
//! route_table = 200                      # announce VIPs in this kernel table
//! extra_macs = ["00:00:5e:00:01:01"]     # also balance frames to these MACs
//! replication_listen = "10.0.0.21:4700"  # flow replication (UDP + TCP)
//! replication_key = "a shared secret of 16 characters or more"
//!
//! [[cluster.peer]]
//! address = "10.0.0.22:4700"
//! snat_addresses = ["10.0.200.22"]       # NAT: taken over if the peer dies
//! ```
//!
//! Without it (or without `route_table`) nothing is announced; a node is
//! then a stand-alone load balancer, as before. Without peers nothing is
//! replicated.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize, Serializer};

use super::macs::{parse_mac, show, Mac};
use crate::config::ipv4_mapped;

/// Kernel routing tables xdplb must not take over: unspec, default, main
/// and local.
const RESERVED_TABLES: [i64; 4] = [0, 253, 254, 255];

/// The validated `[cluster]` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClusterConfig {
    /// The kernel routing table the daemon keeps announceable VIPs in (a
    /// routing daemon such as BIRD exports it); `None`: no announcement.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_table: Option<u32>,
    /// Destination MACs balanced on every attached interface besides the
    /// interface's own (e.g. a VRRP virtual MAC).
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "serialize_macs"
    )]
    pub extra_macs: Vec<Mac>,
    /// Flow-state replication to the peers (`None`: no peers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<Replication>,
    /// The peers' SNAT addresses: announced by this node too, as backups
    /// (a longer BGP path), so a dead peer's NAT replies reach a node that
    /// holds its replicated translations.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peer_snat_addresses: Vec<IpAddr>,
}

/// Where and with whom this node exchanges flow state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Replication {
    /// This node's replication address: UDP for flow updates, TCP for
    /// full copies.
    pub listen: SocketAddr,
    /// The cluster's shared key: every message carries an HMAC-SHA256 of
    /// it. Never shown.
    #[serde(skip)]
    pub key: String,
    /// The other nodes' replication addresses.
    pub peers: Vec<SocketAddr>,
    /// `replicate = false`: neither send nor pull flow state (the peers
    /// are still listed). For measuring what replication buys.
    pub enabled: bool,
}

/// Shortest shared key accepted: 16 bytes, 128 bits if random.
const MIN_KEY_LEN: usize = 16;

impl ClusterConfig {
    /// The replication settings when flows are replicated.
    pub fn replicating(&self) -> Option<&Replication> {
        self.replication.as_ref().filter(|r| r.enabled)
    }
}

fn serialize_macs<S: Serializer>(macs: &[Mac], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(macs.iter().map(show))
}

/// `[cluster]` as written.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    route_table: Option<i64>,
    #[serde(default)]
    extra_macs: Vec<String>,
    replication_listen: Option<SocketAddr>,
    replication_key: Option<String>,
    replicate: Option<bool>,
    #[serde(default)]
    peer: Vec<RawPeer>,
}

/// `[[cluster.peer]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    address: SocketAddr,
    #[serde(default)]
    snat_addresses: Vec<IpAddr>,
}

impl RawCluster {
    /// Validates the section. `Err` is `(field, problem)`, for the caller's
    /// config error.
    pub fn validate(self) -> Result<ClusterConfig, (String, String)> {
        let route_table = self.route_table.map(|t| {
            if RESERVED_TABLES.contains(&t) {
                return Err(format!(
                    "{t} is a table the kernel reserves (0, 253, 254, 255); use e.g. 200"
                ));
            }
            u32::try_from(t).map_err(|_| format!("{t} is out of range 1..=4294967295"))
        });
        let route_table = route_table
            .transpose()
            .map_err(|e| ("cluster.route_table".into(), e))?;
        let mut extra_macs = Vec::with_capacity(self.extra_macs.len());
        for (i, text) in self.extra_macs.iter().enumerate() {
            let mac = parse_mac(text).map_err(|e| (format!("cluster.extra_macs[{i}]"), e))?;
            if mac[0] & 1 != 0 {
                return Err((
                    format!("cluster.extra_macs[{i}]"),
                    format!("{text} is a multicast/broadcast MAC; only unicast MACs can be ours"),
                ));
            }
            if !extra_macs.contains(&mac) {
                extra_macs.push(mac);
            }
        }
        let replication = self.replication()?;
        let mut peer_snat_addresses = Vec::new();
        for (i, p) in self.peer.iter().enumerate() {
            for (j, a) in p.snat_addresses.iter().enumerate() {
                let field = || format!("cluster.peer[{i}].snat_addresses[{j}]");
                if let Some(problem) = ipv4_mapped(*a) {
                    return Err((field(), problem));
                }
                if peer_snat_addresses.contains(a) {
                    return Err((
                        field(),
                        format!("{a} is listed twice; each node has SNAT addresses of its own"),
                    ));
                }
                peer_snat_addresses.push(*a);
            }
        }
        Ok(ClusterConfig {
            route_table,
            extra_macs,
            replication,
            peer_snat_addresses,
        })
    }

    fn replication(&self) -> Result<Option<Replication>, (String, String)> {
        let fail = |field: &str, problem: String| Err((format!("cluster.{field}"), problem));
        if self.peer.is_empty() {
            if self.replication_listen.is_some() || self.replication_key.is_some() {
                return fail(
                    "peer",
                    "replication_listen/replication_key are set but no [[cluster.peer]] is \
                    listed"
                        .into(),
                );
            }
            return Ok(None);
        }
        let Some(listen) = self.replication_listen else {
            return fail(
                "replication_listen",
                "peers are listed: this node's replication address is required".into(),
            );
        };
        let Some(key) = self.replication_key.clone() else {
            return fail(
                "replication_key",
                "peers are listed: the cluster's shared key is required".into(),
            );
        };
        if key.len() < MIN_KEY_LEN {
            return fail(
                "replication_key",
                format!(
                    "{} bytes is too short; use at least {MIN_KEY_LEN}",
                    key.len()
                ),
            );
        }
        if listen.ip().is_unspecified() {
            return fail(
                "replication_listen",
                format!("{listen}: give this node's own address, which its peers send to"),
            );
        }
        if let Some(problem) = ipv4_mapped(listen.ip()) {
            return fail("replication_listen", problem);
        }
        let family = |a: SocketAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
        let mut peers = Vec::with_capacity(self.peer.len());
        for (i, p) in self.peer.iter().enumerate() {
            let field = format!("peer[{i}].address");
            if let Some(problem) = ipv4_mapped(p.address.ip()) {
                return fail(&field, problem);
            }
            // Updates go out of the socket bound to `listen`, and peers
            // answer to it: one of the other family can never be reached.
            if p.address.is_ipv4() != listen.is_ipv4() {
                return fail(
                    &field,
                    format!(
                        "{} is {} but replication_listen {listen} is {}: peers are reached \
                         from that address, so they must be of its family",
                        p.address,
                        family(p.address),
                        family(listen)
                    ),
                );
            }
            if p.address == listen || peers.contains(&p.address) {
                return fail(
                    &field,
                    format!("{} is listed twice (or is this node's own)", p.address),
                );
            }
            peers.push(p.address);
        }
        Ok(Some(Replication {
            listen,
            key,
            peers,
            enabled: self.replicate.unwrap_or(true),
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    /// Replication to one peer, whose table takes any further keys.
    const REPLICATING: &str = "replication_listen = \"10.0.0.1:4700\"\n\
                               replication_key = \"0123456789abcdef\"\n\
                               [[cluster.peer]]\naddress = \"10.0.0.2:4700\"";

    fn parse(cluster: &str) -> Result<Config, String> {
        Config::parse(&format!("[cluster]\n{cluster}\n"), "test.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn the_section_is_optional() {
        let none = Config::parse("", "test.toml").unwrap();
        assert_eq!(none.cluster.route_table, None);
        let c = parse("route_table = 200\nextra_macs = [\"00:00:5E:00:01:01\"]").unwrap();
        assert_eq!(c.cluster.route_table, Some(200));
        assert_eq!(c.cluster.extra_macs, [[0, 0, 0x5e, 0, 1, 1]]);
        assert_eq!(c.cluster.replication, None);
        let c = parse(REPLICATING).unwrap();
        let r = c.cluster.replicating().unwrap();
        assert_eq!(r.peers, ["10.0.0.2:4700".parse().unwrap()]);
        assert_eq!(r.key, "0123456789abcdef");
        assert!(c.cluster.peer_snat_addresses.is_empty());
        let v6 = REPLICATING
            .replace("10.0.0.1:", "[fd00::1]:")
            .replace("10.0.0.2:", "[fd00::2]:");
        let r = parse(&v6).unwrap().cluster.replicating().unwrap().clone();
        assert_eq!(r.listen, "[fd00::1]:4700".parse().unwrap(), "IPv6 peers");
        assert_eq!(r.peers, ["[fd00::2]:4700".parse().unwrap()]);
        let c = parse(&format!("{REPLICATING}\nsnat_addresses = [\"10.0.200.2\"]")).unwrap();
        assert_eq!(
            c.cluster.peer_snat_addresses,
            ["10.0.200.2".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_field_named() {
        for (text, needle) in [
            (
                "route_table = 254",
                "cluster.route_table: 254 is a table the kernel reserves",
            ),
            ("route_table = 0", "cluster.route_table: 0 is a table"),
            (
                "route_table = -1",
                "cluster.route_table: -1 is out of range",
            ),
            (
                "extra_macs = [\"01:00:5e:00:00:01\"]",
                "cluster.extra_macs[0]: 01:00:5e",
            ),
            (
                "extra_macs = [\"nonsense\"]",
                "cluster.extra_macs[0]: \"nonsense\" is not a MAC",
            ),
            ("peers = 3", "unknown field"),
            (
                "replication_key = \"0123456789abcdef\"",
                "cluster.peer: replication_listen/replication_key are set",
            ),
            (
                "[[cluster.peer]]\naddress = \"10.0.0.2:1\"",
                "cluster.replication_listen: peers are listed",
            ),
            (
                "replication_listen = \"10.0.0.1:1\"\nreplication_key = \"short\"\n\
                 [[cluster.peer]]\naddress = \"10.0.0.2:1\"",
                "cluster.replication_key: 5 bytes is too short",
            ),
            (
                "replication_listen = \"10.0.0.1:1\"\nreplication_key = \"0123456789abcdef\"\n\
                 [[cluster.peer]]\naddress = \"10.0.0.1:1\"",
                "cluster.peer[0].address: 10.0.0.1:1 is listed twice",
            ),
            (
                "replication_listen = \"[fd00::1]:1\"\nreplication_key = \"0123456789abcdef\"\n\
                 [[cluster.peer]]\naddress = \"10.0.0.2:1\"",
                "cluster.peer[0].address: 10.0.0.2:1 is IPv4 but replication_listen \
                 [fd00::1]:1 is IPv6",
            ),
            (
                "replication_listen = \"10.0.0.1:1\"\nreplication_key = \"0123456789abcdef\"\n\
                 [[cluster.peer]]\naddress = \"[fd00::2]:1\"",
                "cluster.peer[0].address: [fd00::2]:1 is IPv6 but replication_listen",
            ),
            (
                "replication_listen = \"10.0.0.1:1\"\nreplication_key = \"0123456789abcdef\"\n\
                 [[cluster.peer]]\naddress = \"[::ffff:10.0.0.2]:1\"",
                "cluster.peer[0].address: ::ffff:10.0.0.2 is IPv4-mapped: write it as 10.0.0.2",
            ),
            (
                "replication_listen = \"[::ffff:10.0.0.1]:1\"\n\
                 replication_key = \"0123456789abcdef\"\n\
                 [[cluster.peer]]\naddress = \"[fd00::2]:1\"",
                "cluster.replication_listen: ::ffff:10.0.0.1 is IPv4-mapped",
            ),
            (
                &format!("{REPLICATING}\nsnat_addresses = [\"::ffff:10.9.9.9\"]"),
                "cluster.peer[0].snat_addresses[0]: ::ffff:10.9.9.9 is IPv4-mapped",
            ),
            (
                "replication_listen = \"10.0.0.1:1\"\nreplication_key = \"0123456789abcdef\"\n\
                 [[cluster.peer]]\naddress = \"10.0.0.2:1\"\n\
                 [[cluster.peer]]\naddress = \"10.0.0.2:1\"",
                "cluster.peer[1].address: 10.0.0.2:1 is listed twice",
            ),
            (
                "replication_listen = \"0.0.0.0:1\"\nreplication_key = \"0123456789abcdef\"\n\
                 [[cluster.peer]]\naddress = \"10.0.0.2:1\"",
                "cluster.replication_listen: 0.0.0.0:1: give this node's own address",
            ),
            (
                "replication_listen = \"10.0.0.1:1\"\nreplication_key = \"0123456789abcdef\"\n\
                 [[cluster.peer]]\naddress = \"10.0.0.2:1\"\nsnat_addresses = [\"10.9.9.9\"]\n\
                 [[cluster.peer]]\naddress = \"10.0.0.3:1\"\nsnat_addresses = [\"10.9.9.9\"]",
                "cluster.peer[1].snat_addresses[0]: 10.9.9.9 is listed twice",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
