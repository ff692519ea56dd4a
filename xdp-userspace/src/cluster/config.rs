//! The optional `[cluster]` section of the configuration file:
//!
//! ```toml
//! [cluster]
//! route_table = 200                      # announce VIPs in this kernel table
//! extra_macs = ["00:00:5e:00:01:01"]     # also balance frames to these MACs
//! ```
//!
//! Without it (or without `route_table`) nothing is announced; a node is
//! then a stand-alone load balancer, as before.

use serde::{Deserialize, Serialize, Serializer};

use super::macs::{parse_mac, show, Mac};

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
}

impl ClusterConfig {
    /// Whether the section changes nothing (so it is not serialized).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
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
}

impl RawCluster {
    /// Validates the section. `Err` is `(field, problem)`, for the caller's
    /// config error.
    pub fn validate(self) -> Result<ClusterConfig, (String, String)> {
        let route_table = match self.route_table {
            None => None,
            Some(t) if RESERVED_TABLES.contains(&t) => {
                return Err((
                    "cluster.route_table".into(),
                    format!("{t} is a table the kernel reserves (0, 253, 254, 255); use e.g. 200"),
                ))
            }
            Some(t) => Some(u32::try_from(t).map_err(|_| {
                (
                    "cluster.route_table".into(),
                    format!("{t} is out of range 1..=4294967295"),
                )
            })?),
        };
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
        Ok(ClusterConfig {
            route_table,
            extra_macs,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

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
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
