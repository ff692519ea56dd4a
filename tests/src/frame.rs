//! One frame builder for every datapath fixture and benchmark, on top of
//! `etherparse`'s `PacketBuilder`: Ethernet (optionally 802.1Q-tagged),
//! IPv4 or IPv6, TCP, UDP and ICMP, every checksum computed over the whole
//! header or segment, never incrementally, so nothing here shares code with
//! the datapath's incremental updates. [`verify`] checks the checksums of a
//! frame the datapath wrote, recomputed by `etherparse` as well.

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv6Header, IpFragOffset, IpHeaders, IpNumber,
    Ipv4Header, Ipv4Options, Ipv6FlowLabel, Ipv6Header, PacketBuilder, PacketBuilderStep,
    TcpHeader, UdpHeader, VlanId,
};

/// TCP flags, as in the header's flag byte.
pub const FIN: u8 = 0x01;
/// See [`FIN`].
pub const SYN: u8 = 0x02;
/// See [`FIN`].
pub const RST: u8 = 0x04;
/// See [`FIN`].
pub const PSH: u8 = 0x08;
/// See [`FIN`].
pub const ACK: u8 = 0x10;

/// IP protocol numbers the fixtures use.
pub const TCP: u8 = 6;
/// See [`TCP`].
pub const UDP: u8 = 17;
/// See [`TCP`].
pub const ICMP: u8 = 1;
/// See [`TCP`].
pub const ICMPV6: u8 = 58;

/// The IPv4 flags/fragment-offset field of a whole packet with DF set.
pub const DF: u16 = 0x4000;

/// A TCP segment or UDP datagram, and the IP packet and frame around it.
#[derive(Clone, Debug)]
pub struct Seg {
    /// Source endpoint.
    pub src: SocketAddr,
    /// Destination endpoint.
    pub dst: SocketAddr,
    /// [`TCP`] or [`UDP`].
    pub proto: u8,
    /// TCP flags ([`SYN`] etc.); ignored for UDP.
    pub flags: u8,
    /// TCP sequence number.
    pub seq: u32,
    /// The L4 payload.
    pub payload: Vec<u8>,
    /// UDP over IPv4 sent without a checksum (field 0).
    pub no_udp_checksum: bool,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IPv4 identification, or the IPv6 flow label.
    pub id: u16,
    /// IPv4 flags and fragment offset, as on the wire ([`DF`] by default).
    pub frag: u16,
    /// IPv4 options (a multiple of 4 bytes).
    pub ipv4_options: Vec<u8>,
    /// An 802.1Q tag with this VLAN id.
    pub vlan: Option<u16>,
}

impl Seg {
    /// A TCP segment with `flags` carrying `payload`.
    pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8, payload: &[u8]) -> Seg {
        Seg {
            src,
            dst,
            proto: TCP,
            flags,
            seq: 0x1234_5678,
            payload: payload.to_vec(),
            no_udp_checksum: false,
            ttl: 64,
            id: 0x2a2a,
            frag: DF,
            ipv4_options: Vec::new(),
            vlan: None,
        }
    }

    /// A UDP datagram carrying `payload`.
    pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Seg {
        Seg {
            proto: UDP,
            flags: 0,
            seq: 0,
            id: 0x2b2b,
            ..Seg::tcp(src, dst, 0, payload)
        }
    }

    /// A TCP SYN or a UDP datagram (by `proto`) with a 4-byte payload: the
    /// first packet of a flow, as the DSR fixtures and the bench send it.
    pub fn probe(src: SocketAddr, dst: SocketAddr, proto: u8) -> Seg {
        if proto == TCP {
            Seg::tcp(src, dst, SYN, b"data")
        } else {
            Seg::udp(src, dst, b"data")
        }
    }

    /// The same segment between other endpoints (what translation must
    /// turn it into): payload, flags, TTL and id unchanged.
    pub fn between(&self, src: SocketAddr, dst: SocketAddr) -> Seg {
        Seg {
            src,
            dst,
            ..self.clone()
        }
    }

    /// The same segment, 802.1Q-tagged with `vid` (or untagged for `None`).
    pub fn tagged(self, vid: Option<u16>) -> Seg {
        Seg { vlan: vid, ..self }
    }

    /// The IP header (its lengths and checksum filled in on writing), with
    /// the IPv4 fields `etherparse` has no constructor argument for.
    fn ip_headers(&self) -> IpHeaders {
        let mut ip = ip_headers(self.src.ip(), self.dst.ip(), self.proto, self.ttl, self.id);
        if let IpHeaders::Ipv4(h, _) = &mut ip {
            h.dont_fragment = self.frag & 0x4000 != 0;
            h.more_fragments = self.frag & 0x2000 != 0;
            h.fragment_offset = IpFragOffset::try_new(self.frag & 0x1fff).expect("13 bits");
            h.options = Ipv4Options::try_from(&self.ipv4_options[..])
                .expect("IPv4 options: 4n bytes, <= 40");
        }
        ip
    }

    /// The L4 header and payload, checksum computed from scratch.
    pub fn l4(&self) -> Vec<u8> {
        let ip = self.ip();
        let ihl = if self.src.is_ipv4() {
            usize::from(ip[0] & 0x0f) * 4
        } else {
            Ipv6Header::LEN
        };
        ip[ihl..].to_vec()
    }

    /// The IP packet (no Ethernet header).
    pub fn ip(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(PacketBuilder::ip(self.ip_headers()), &mut out);
        out
    }

    /// The Ethernet frame `src_mac` -> `dst_mac`, tagged if [`Seg::vlan`].
    pub fn frame(&self, dst_mac: [u8; 6], src_mac: [u8; 6]) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.payload.len());
        self.write_frame(dst_mac, src_mac, &mut out);
        out
    }

    /// Like [`Seg::frame`], into `out` (cleared first): a new frame without
    /// a new allocation, for benchmarks that change the source every call.
    pub fn write_frame(&self, dst_mac: [u8; 6], src_mac: [u8; 6], out: &mut Vec<u8>) {
        out.clear();
        let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
        let ip = match self.vlan {
            Some(vid) => eth
                .single_vlan(VlanId::try_new(vid).expect("VLAN id below 4096"))
                .ip(self.ip_headers()),
            None => eth.ip(self.ip_headers()),
        };
        self.write(ip, out);
    }

    fn write(&self, ip: PacketBuilderStep<IpHeaders>, out: &mut Vec<u8>) {
        let start = out.len();
        let (sport, dport) = (self.src.port(), self.dst.port());
        if self.proto == TCP {
            let mut t = TcpHeader::new(sport, dport, self.seq, 64240);
            t.acknowledgment_number = 0x0a0b_0c0d;
            t.fin = self.flags & FIN != 0;
            t.syn = self.flags & SYN != 0;
            t.rst = self.flags & RST != 0;
            t.psh = self.flags & PSH != 0;
            t.ack = self.flags & ACK != 0;
            ip.tcp_header(t).write(out, &self.payload)
        } else {
            ip.udp(sport, dport).write(out, &self.payload)
        }
        .expect("writing a test frame");
        if self.proto == UDP && self.no_udp_checksum {
            let udp_end = out.len() - self.payload.len();
            out[udp_end - 2..udp_end].fill(0);
        }
        debug_assert!(out.len() > start);
    }
}

/// An IPv4 header with DF (or an IPv6 header whose flow label is `id`)
/// for `proto`; lengths and checksum are filled in when written.
fn ip_headers(src: IpAddr, dst: IpAddr, proto: u8, ttl: u8, id: u16) -> IpHeaders {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = Ipv4Header::new(0, ttl, IpNumber(proto), s.octets(), d.octets())
                .expect("empty payload fits");
            h.identification = id;
            h.dont_fragment = true;
            IpHeaders::Ipv4(h, Default::default())
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
            Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::try_new(u32::from(id)).expect("20 bits"),
                payload_length: 0,
                next_header: IpNumber(proto),
                hop_limit: ttl,
                source: s.octets(),
                destination: d.octets(),
            },
            Default::default(),
        ),
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
}

/// An IP packet (IPv4 with DF, or IPv6) of protocol `proto` around
/// `payload`, written as is (for headers the builder has no step for).
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, ttl: u8, id: u16, payload: &[u8]) -> Vec<u8> {
    // Headers only: the builder would interpret `proto` (e.g. an IPv6
    // extension header) where this writes it as is.
    let mut out = match ip_headers(src, dst, proto, ttl, id) {
        IpHeaders::Ipv4(mut h, _) => {
            h.set_payload_len(payload.len()).expect("payload fits");
            h.header_checksum = h.calc_header_checksum();
            h.to_bytes().to_vec()
        }
        IpHeaders::Ipv6(mut h, _) => {
            h.set_payload_length(payload.len()).expect("payload fits");
            h.to_bytes().to_vec()
        }
    };
    out.extend_from_slice(payload);
    out
}

/// An ICMP (IPv4) or ICMPv6 message (an error, or an echo) from `src` to `dst` with
/// `rest` (the 4 bytes after the checksum) and `quote` (the quoted packet), as an
/// IP packet; checksums from scratch.
pub fn icmp_message(
    src: IpAddr,
    dst: IpAddr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    quote: &[u8],
) -> Vec<u8> {
    let proto = if src.is_ipv4() { ICMP } else { ICMPV6 };
    let ip = PacketBuilder::ip(ip_headers(src, dst, proto, 63, 0x3c3c));
    let mut out = Vec::new();
    if src.is_ipv4() {
        ip.icmpv4_raw(icmp_type, code, rest).write(&mut out, quote)
    } else {
        ip.icmpv6_raw(icmp_type, code, rest).write(&mut out, quote)
    }
    .expect("writing an ICMP error");
    out
}

/// What a router quotes of `packet` in an ICMP error: the packet as it
/// arrived there, TTL/hop limit decremented if `decrement` (IPv4 header
/// checksum recomputed), cut to `max` bytes.
pub fn quote(packet: &[u8], max: usize, decrement: bool) -> Vec<u8> {
    let mut q = packet.to_vec();
    if decrement {
        if q[0] >> 4 == 4 {
            let (mut h, _) = Ipv4Header::from_slice(&q).expect("an IPv4 header");
            h.time_to_live -= 1;
            h.header_checksum = h.calc_header_checksum();
            let bytes = h.to_bytes();
            q[..bytes.len()].copy_from_slice(&bytes);
        } else {
            q[7] -= 1;
        }
    }
    q.truncate(max);
    q
}

/// `ip_packet` in an Ethernet frame `src_mac` -> `dst_mac` (the ether type
/// from the IP version).
pub fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], ip_packet: &[u8]) -> Vec<u8> {
    let ether_type = if ip_packet[0] >> 4 == 4 {
        EtherType::IPV4
    } else {
        EtherType::IPV6
    };
    ethernet(dst_mac, src_mac, ether_type.0, ip_packet)
}

/// `payload` in an Ethernet frame of `ether_type` (e.g. ARP).
pub fn ethernet(dst_mac: [u8; 6], src_mac: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let header = Ethernet2Header {
        source: src_mac,
        destination: dst_mac,
        ether_type: EtherType(ether_type),
    };
    let mut f = header.to_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// `input` with its Ethernet addresses replaced: what DSR must output.
pub fn with_macs(input: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out
}

/// `bytes` as hex, 16 to a line (for readable frame mismatches).
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| {
            c.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Independent verification of every checksum in an untagged output
/// frame: the IPv4 header, TCP, UDP, ICMP and ICMPv6 checksums (inner,
/// quoted headers of ICMP errors too) are recomputed by `etherparse` and
/// compared with the frame's. Panics naming the bad checksum; returns the
/// checks it made, in order, so a test can also assert that nothing was
/// skipped.
pub fn verify(what: &str, frame: &[u8]) -> Vec<String> {
    let mut v = Verifier {
        what,
        frame,
        done: Vec::new(),
    };
    let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    assert!(
        ether_type == EtherType::IPV4.0 || ether_type == EtherType::IPV6.0,
        "{what}: not IP"
    );
    let (src, dst, proto, message, _) = v.ip(&frame[14..], false, "");
    match proto {
        TCP | UDP => v.l4(src, dst, proto, message, ""),
        ICMP | ICMPV6 => {
            let name = v.icmp(src, dst, message);
            v.done.push(name.to_owned());
            let (isrc, idst, iproto, imessage, complete) = v.ip(&message[8..], true, "inner ");
            if complete {
                v.l4(isrc, idst, iproto, imessage, "inner ");
            } else {
                v.done.push("inner L4 cut short".to_owned());
            }
        }
        p => panic!("{what}: unexpected protocol {p}"),
    }
    v.done
}

struct Verifier<'a> {
    what: &'a str,
    frame: &'a [u8],
    done: Vec<String>,
}

impl Verifier<'_> {
    fn check(&self, found: u16, computed: u16, check: &str) {
        assert!(
            found == computed,
            "{}: bad {check} in output frame ({found:#06x}, computed {computed:#06x}):\n{}",
            self.what,
            hex(self.frame)
        );
    }

    /// (src, dst, proto, L4 message, whole message present) of an IP
    /// packet, after verifying an IPv4 header checksum. `quoted`: the
    /// packet may be cut short (inside an ICMP error).
    fn ip<'p>(
        &mut self,
        p: &'p [u8],
        quoted: bool,
        prefix: &str,
    ) -> (IpAddr, IpAddr, u8, &'p [u8], bool) {
        let what = self.what;
        let (src, dst, proto, start, end) = if p[0] >> 4 == 4 {
            let (h, _) = Ipv4Header::from_slice(p)
                .unwrap_or_else(|e| panic!("{what}: {prefix}IPv4 header: {e}"));
            let name = format!("{prefix}IPv4 header checksum");
            self.check(h.header_checksum, h.calc_header_checksum(), &name);
            self.done.push(format!("{prefix}IPv4 header"));
            let end = usize::from(h.total_len);
            if !quoted {
                assert_eq!(end, p.len(), "{what}: IPv4 total length vs frame");
            }
            let (s, d) = (IpAddr::from(h.source), IpAddr::from(h.destination));
            (s, d, h.protocol.0, h.header_len(), end)
        } else {
            let (h, _) = Ipv6Header::from_slice(p)
                .unwrap_or_else(|e| panic!("{what}: {prefix}IPv6 header: {e}"));
            let end = Ipv6Header::LEN + usize::from(h.payload_length);
            if !quoted {
                assert_eq!(end, p.len(), "{what}: IPv6 payload length vs frame");
            }
            let (s, d) = (IpAddr::from(h.source), IpAddr::from(h.destination));
            (s, d, h.next_header.0, Ipv6Header::LEN, end)
        };
        (src, dst, proto, &p[start..end.min(p.len())], end <= p.len())
    }

    /// Verifies an ICMP or ICMPv6 checksum; returns which.
    fn icmp(&self, src: IpAddr, dst: IpAddr, m: &[u8]) -> &'static str {
        match (src, dst) {
            (IpAddr::V4(_), IpAddr::V4(_)) => {
                let (h, payload) = Icmpv4Header::from_slice(m).expect("an ICMP header");
                let computed = h.icmp_type.calc_checksum(payload);
                self.check(h.checksum, computed, "ICMP checksum");
                "ICMP"
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let (h, payload) = Icmpv6Header::from_slice(m).expect("an ICMPv6 header");
                let computed = h
                    .icmp_type
                    .calc_checksum(s.octets(), d.octets(), payload)
                    .expect("ICMPv6 length");
                self.check(h.checksum, computed, "ICMPv6 checksum");
                "ICMPv6"
            }
            _ => panic!("{}: mixed address families", self.what),
        }
    }

    fn l4(&mut self, src: IpAddr, dst: IpAddr, proto: u8, m: &[u8], prefix: &str) {
        let (name, found, computed) = match proto {
            TCP => {
                let (h, payload) = TcpHeader::from_slice(m).expect("a TCP header");
                let computed = by_family(
                    src,
                    dst,
                    |s, d| h.calc_checksum_ipv4_raw(s, d, payload),
                    |s, d| h.calc_checksum_ipv6_raw(s, d, payload),
                );
                ("TCP", h.checksum, computed.expect("TCP length"))
            }
            UDP => {
                let (h, payload) = UdpHeader::from_slice(m).expect("a UDP header");
                if src.is_ipv4() && h.checksum == 0 {
                    self.done.push(format!("{prefix}UDP without checksum"));
                    return;
                }
                let computed = by_family(
                    src,
                    dst,
                    |s, d| h.calc_checksum_ipv4_raw(s, d, payload),
                    |s, d| h.calc_checksum_ipv6_raw(s, d, payload),
                );
                ("UDP", h.checksum, computed.expect("UDP length"))
            }
            _ => panic!("{}: unexpected protocol {proto}", self.what),
        };
        self.check(found, computed, &format!("{prefix}{name} checksum"));
        self.done.push(format!("{prefix}{name}"));
    }
}

/// `v4` or `v6` applied to the addresses' octets, by address family.
fn by_family<T>(
    src: IpAddr,
    dst: IpAddr,
    v4: impl FnOnce([u8; 4], [u8; 4]) -> T,
    v6: impl FnOnce([u8; 16], [u8; 16]) -> T,
) -> T {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => v4(s.octets(), d.octets()),
        (IpAddr::V6(s), IpAddr::V6(d)) => v6(s.octets(), d.octets()),
        _ => panic!("mixed address families: {src} -> {dst}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn built_frames_verify_and_flipped_bits_do_not() {
        let seg = Seg::tcp(sa("10.0.0.1:1"), sa("10.0.0.2:2"), SYN, b"abc");
        let good = seg.frame([2; 6], [4; 6]);
        assert_eq!(verify("good", &good), ["IPv4 header", "TCP"]);
        for (what, byte) in [("IPv4 header", 14 + 8), ("TCP payload", good.len() - 1)] {
            let mut bad = good.clone();
            bad[byte] ^= 1;
            let r = std::panic::catch_unwind(|| verify(what, &bad));
            assert!(r.is_err(), "{what}: corruption not detected");
        }
        let udp6 = Seg::udp(sa("[fd00::1]:1"), sa("[fd00::2]:2"), b"abcde").frame([2; 6], [4; 6]);
        assert_eq!(verify("udp6", &udp6), ["UDP"]);
        let mut bad = udp6.clone();
        bad[14 + 8] ^= 0x80; // source address
        assert!(
            std::panic::catch_unwind(|| verify("udp6", &bad)).is_err(),
            "pseudo-header not covered"
        );
    }

    #[test]
    fn tagged_and_optioned_frames_have_the_wire_layout() {
        let mut seg = Seg::probe(sa("10.0.0.1:1000"), sa("10.0.100.1:80"), TCP).tagged(Some(42));
        seg.ipv4_options = vec![1, 1, 1, 0];
        seg.frag = 185;
        let f = seg.frame([2; 6], [4; 6]);
        assert_eq!(
            &f[12..18],
            &[0x81, 0x00, 0x00, 42, 0x08, 0x00],
            "802.1Q tag"
        );
        assert_eq!(f[18], 0x46, "IHL 6");
        assert_eq!(&f[18 + 6..18 + 8], &[0, 185], "flags and offset");
        assert_eq!(f.len(), 14 + 4 + 24 + 20 + 4);
    }
}
