//! Test frames, built byte by byte (the same shapes as the fixture tests'
//! frames: Ethernet, IPv4 or IPv6, a TCP SYN or a UDP datagram with a
//! 4-byte payload).

use std::net::{IpAddr, SocketAddr};

use xdp_common::PROTO_TCP;

pub const ETH_IP: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;

/// Offsets into an untagged IPv4 frame.
const IPV4_CSUM: usize = 14 + 10;
const IPV4_SRC: usize = 14 + 12;
const IPV4_L4: usize = 14 + 20;

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn l4(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(24);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    if proto == PROTO_TCP {
        // seq 1, ack 0, data offset 5, SYN, window 0xffff, checksum and
        // urgent pointer 0 (nothing on the path checks L4 checksums).
        h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        h.extend_from_slice(&12u16.to_be_bytes());
        h.extend_from_slice(&[0, 0]);
    }
    h.extend_from_slice(b"data");
    h
}

/// A frame from `src` to `dst` over `proto` (TCP SYN or UDP), Ethernet
/// `src_mac` -> `dst_mac`.
pub fn packet(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
) -> Vec<u8> {
    let payload = l4(proto, src.port(), dst.port());
    let mut f = Vec::with_capacity(14 + 40 + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&ETH_IP.to_be_bytes());
            let mut h = vec![0x45, 0];
            h.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
            h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]); // DF
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend(h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&ETH_IPV6.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            f.extend_from_slice(&[proto, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
    f.extend(payload);
    f
}

/// Rewrites the IPv4 source address and port of an untagged IPv4 frame
/// built by [`packet`] (fixing the header checksum): a new flow without a
/// new allocation.
pub fn set_ipv4_source(frame: &mut [u8], src: std::net::SocketAddrV4) {
    frame[IPV4_SRC..IPV4_SRC + 4].copy_from_slice(&src.ip().octets());
    frame[IPV4_L4..IPV4_L4 + 2].copy_from_slice(&src.port().to_be_bytes());
    frame[IPV4_CSUM..IPV4_CSUM + 2].fill(0);
    let c = checksum(&frame[14..14 + 20]);
    frame[IPV4_CSUM..IPV4_CSUM + 2].copy_from_slice(&c.to_be_bytes());
}

/// An endless supply of distinct IPv4 client endpoints: ports 1024..=65535
/// of 10.`net`.0.1, then of 10.`net`.0.2, and so on (16 million flows
/// before it repeats).
pub struct Sources {
    net: u8,
    n: u64,
}

impl Sources {
    pub fn new(net: u8) -> Self {
        Self { net, n: 0 }
    }
}

impl Iterator for Sources {
    type Item = std::net::SocketAddrV4;
    fn next(&mut self) -> Option<Self::Item> {
        const PORTS: u64 = 65536 - 1024;
        let host = 1 + self.n / PORTS;
        let port = 1024 + (self.n % PORTS) as u16;
        self.n += 1;
        let ip = std::net::Ipv4Addr::new(10, self.net, (host >> 8) as u8, host as u8);
        Some(std::net::SocketAddrV4::new(ip, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewritten_source_keeps_a_valid_checksum() {
        let mut f = packet(
            [2; 6],
            [4; 6],
            "10.0.0.1:1000".parse().unwrap(),
            "10.0.100.1:80".parse().unwrap(),
            PROTO_TCP,
        );
        let want = packet(
            [2; 6],
            [4; 6],
            "10.9.8.7:4321".parse().unwrap(),
            "10.0.100.1:80".parse().unwrap(),
            PROTO_TCP,
        );
        set_ipv4_source(&mut f, "10.9.8.7:4321".parse().unwrap());
        assert_eq!(f, want);
        assert_eq!(checksum(&f[14..34]), 0);
        let mut s = Sources::new(3);
        assert_eq!(s.next().unwrap().to_string(), "10.3.0.1:1024");
        assert_eq!(s.nth(64511).unwrap().to_string(), "10.3.0.2:1024");
    }
}
