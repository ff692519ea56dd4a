//! The L2 segment every testbed shape is built on: a namespace holding one
//! bridge, and veth pairs plugging hosts into it (or linking two hosts).

use anyhow::Result;

use crate::netns::Netns;

/// The bridge's name inside the switch namespace.
pub const BRIDGE: &str = "br0";

/// A new namespace `name` with a bridge that forwards at once: no STP or
/// forward delay (ports forward as soon as they are up), no multicast
/// snooping (IPv6 neighbour discovery uses multicast and there is no
/// querier on the segment).
pub fn new(name: &str) -> Result<Netns> {
    let switch = Netns::new(name)?;
    switch.exec(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
    switch.exec(&[
        "ip",
        "link",
        "set",
        BRIDGE,
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
        "mcast_snooping",
        "0",
    ])?;
    switch.exec(&["ip", "link", "set", BRIDGE, "up"])?;
    Ok(switch)
}

/// Plugs `host` into `switch`: a veth pair, `port` on the bridge and
/// `host_if` in `host`.
pub fn plug(switch: &Netns, host: &Netns, port: &str, host_if: &str) -> Result<()> {
    veth(switch, port, host, host_if)?;
    switch.exec(&["ip", "link", "set", port, "master", BRIDGE, "up"])?;
    Ok(())
}

/// A veth pair: `a_if` in `a`, `b_if` in `b`.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.exec(&[
        "ip",
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    Ok(())
}
