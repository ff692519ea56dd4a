//! The benchmarks' test frames, built by the test kit's frame builder
//! (`xdplb_tests::frame`, shared with the packet fixtures): Ethernet, IPv4
//! or IPv6, a TCP segment or a UDP datagram with a 4-byte payload.

use std::net::{SocketAddr, SocketAddrV4};

use xdplb_tests::frame::{self, Seg};

/// A frame from `src` to `dst` over `proto`, Ethernet `src_mac` ->
/// `dst_mac`: for TCP a data segment (ACK, PSH) of an established
/// connection, as almost every packet of a real flow is (a SYN sent again
/// and again would be counted as the client retransmitting its SYN, see
/// `xdp_common::Signals`); a UDP datagram otherwise.
pub fn packet(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
) -> Vec<u8> {
    let seg = if proto == xdp_common::PROTO_TCP {
        Seg::tcp(src, dst, frame::ACK | frame::PSH, b"data")
    } else {
        Seg::probe(src, dst, proto)
    };
    seg.frame(dst_mac, src_mac)
}

/// A flow's first frame from `src` to `dst` (a TCP SYN, or a UDP
/// datagram), Ethernet `src_mac` -> `dst_mac`: only a SYN opens a NAT
/// translation.
pub fn opening(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
) -> Vec<u8> {
    Seg::probe(src, dst, proto).frame(dst_mac, src_mac)
}

/// A new flow's first frame (a TCP SYN, or a UDP datagram) every call
/// without a new allocation: for a changing IPv4 source, rewritten in
/// place.
pub struct NewFlows {
    seg: Seg,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
}

impl NewFlows {
    /// Frames to `dst` over `proto`, Ethernet `src_mac` -> `dst_mac`.
    pub fn new(src_mac: [u8; 6], dst_mac: [u8; 6], dst: SocketAddr, proto: u8) -> Self {
        let seg = Seg::probe(SocketAddr::from(([0, 0, 0, 0], 0)), dst, proto);
        Self {
            seg,
            src_mac,
            dst_mac,
        }
    }

    /// Rewrites `frame` as the frame from `src` (all checksums valid).
    pub fn write(&mut self, src: SocketAddrV4, frame: &mut Vec<u8>) {
        self.seg.src = SocketAddr::V4(src);
        self.seg.write_frame(self.dst_mac, self.src_mac, frame);
    }
}

/// An endless supply of distinct IPv4 client endpoints: ports 1024..=65535
/// of 10.`net`.0.1, then of 10.`net`.0.2, and so on (16 million flows
/// before it repeats).
pub struct Sources {
    net: u8,
    n: u64,
    /// Source ports per address before the next address.
    ports: u64,
}

impl Sources {
    pub fn new(net: u8) -> Self {
        Self {
            net,
            n: 0,
            ports: 65536 - 1024,
        }
    }

    /// A new address for every endpoint (NAT bounds the unanswered flows
    /// of one source address), 65,536 of them in turn.
    pub fn one_per_address(net: u8) -> Self {
        Self {
            ports: 1,
            ..Self::new(net)
        }
    }
}

impl Iterator for Sources {
    type Item = std::net::SocketAddrV4;
    fn next(&mut self) -> Option<Self::Item> {
        let host = 1 + (self.n / self.ports) % 65536;
        let port = 1024 + (self.n % self.ports) as u16;
        self.n += 1;
        let ip = std::net::Ipv4Addr::new(10, self.net, (host >> 8) as u8, host as u8);
        Some(std::net::SocketAddrV4::new(ip, port))
    }
}

#[cfg(test)]
mod tests {
    use xdp_common::PROTO_TCP;
    use xdplb_tests::frame::verify;

    use super::*;

    #[test]
    fn rewritten_source_keeps_valid_checksums() {
        let dst = "10.0.100.1:80".parse().unwrap();
        let mut f = packet(
            [2; 6],
            [4; 6],
            "10.0.0.1:1000".parse().unwrap(),
            dst,
            PROTO_TCP,
        );
        let capacity = f.capacity();
        // A SYN (new flows open connections), not `packet`'s data segment.
        let want =
            Seg::probe("10.9.8.7:4321".parse().unwrap(), dst, PROTO_TCP).frame([4; 6], [2; 6]);
        NewFlows::new([2; 6], [4; 6], dst, PROTO_TCP)
            .write("10.9.8.7:4321".parse().unwrap(), &mut f);
        assert_eq!(f, want);
        assert_eq!(f.capacity(), capacity, "rewritten in place");
        assert_eq!(verify("rewritten", &f), ["IPv4 header", "TCP"]);
        let mut s = Sources::new(3);
        assert_eq!(s.next().unwrap().to_string(), "10.3.0.1:1024");
        assert_eq!(s.nth(64511).unwrap().to_string(), "10.3.0.2:1024");
    }
}
