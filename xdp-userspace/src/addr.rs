//! Conversions between std's addresses and the datapath's wire-format keys.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use xdp_common::{FlowKey, ServiceKey};

/// An address as the datapath stores it: the 16 wire bytes of the IPv6
/// address, IPv4 as `::ffff:a.b.c.d`, read as four native-endian words.
pub fn to_words(addr: IpAddr) -> [u32; 4] {
    let v6 = match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let b = v6.octets();
    core::array::from_fn(|i| {
        u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
    })
}

/// The inverse of [`to_words`]; IPv4-mapped addresses come back as IPv4.
pub fn from_words(words: [u32; 4]) -> IpAddr {
    let mut b = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(b).to_canonical()
}

/// The map key of the service at `vip:port` over `proto`.
pub fn service_key(vip: IpAddr, port: u16, proto: u8) -> ServiceKey {
    ServiceKey::new(to_words(vip), port.to_be(), proto)
}

/// The flow-table key of a packet from `src` to `dst` over `proto`.
pub fn flow_key(src: SocketAddr, dst: SocketAddr, proto: u8) -> FlowKey {
    FlowKey {
        src: to_words(src.ip()),
        dst: to_words(dst.ip()),
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto,
        _pad: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_both_families() {
        for a in ["10.1.2.3", "fd00::1", "::ffff:1.2.3.4"] {
            let ip: IpAddr = a.parse().unwrap();
            let back = from_words(to_words(ip));
            assert_eq!(back.to_canonical(), ip.to_canonical(), "{a}");
        }
    }

    #[test]
    fn ipv4_words_hold_wire_bytes() {
        let w = to_words("10.1.2.3".parse().unwrap());
        assert_eq!(w[3].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(w[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(
            w[..3],
            xdp_common::V4_MAPPED_PREFIX,
            "the datapath's prefix"
        );
    }
}
