//! Header parsing with bounds-checked access only. The result is the flow's
//! 5-tuple; nothing here writes to the packet.

use core::mem;

use aya_ebpf::programs::XdpContext;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use xdp_common::{is_v4_mapped, FlowKey, Reason, PROTO_TCP, PROTO_UDP, V4_MAPPED_PREFIX};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// IPv4 "more fragments" flag and fragment-offset mask, in the host-order
/// value of the flags/offset field.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// IPv6 next-header values that are extension headers (RFC 8200 and the
/// IANA registry): hop-by-hop, routing, fragment, ESP, AH, destination
/// options, mobility, HIP, shim6 and the two experimental values.
#[inline(always)]
fn is_ipv6_ext(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

/// Returns a pointer to a `T` at `offset` into the frame, or `None` when the
/// frame is too short: the only way this program touches packet memory.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Reads the 4-byte words of an address as they lie on the wire.
#[inline(always)]
fn words<const N: usize>(bytes: &[u8; N], out: &mut [u32; 4], first: usize) {
    let mut i = 0;
    while i * 4 < N {
        out[first + i] = u32::from_ne_bytes([
            bytes[i * 4],
            bytes[i * 4 + 1],
            bytes[i * 4 + 2],
            bytes[i * 4 + 3],
        ]);
        i += 1;
    }
}

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A parsed packet: TCP or UDP with its 5-tuple, or an ICMP/ICMPv6
/// message (ports zero) that may be an error about a NAT flow.
pub struct Packet {
    pub key: FlowKey,
    /// Offsets of the IP and L4 headers.
    pub l3: usize,
    pub l4: usize,
    pub ipv6: bool,
    /// A TCP segment's flags (0 for other protocols).
    pub tcp_flags: u8,
    /// A TCP segment's sequence number, host order (0 for other
    /// protocols): NAT tells a sender's FIN or RST from a stranger's by it.
    pub tcp_seq: u32,
}

impl Packet {
    /// A TCP segment with FIN or RST set.
    #[inline(always)]
    pub fn fin_or_rst(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }

    /// A TCP segment with RST set.
    #[inline(always)]
    pub fn rst(&self) -> bool {
        self.tcp_flags & TCP_RST != 0
    }

    /// A TCP SYN without ACK: a connection's first segment, or its
    /// retransmission.
    #[inline(always)]
    pub fn syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Offsets of the source and destination address fields of the IP header
/// at `l3`.
#[inline(always)]
pub fn addr_offsets(l3: usize, v6: bool) -> (usize, usize) {
    if v6 {
        (l3 + 8, l3 + 24)
    } else {
        (l3 + 12, l3 + 16)
    }
}

/// Parses Ethernet (with at most one VLAN tag), IPv4 or IPv6, then the
/// TCP/UDP ports. `Err` carries the reason the packet is left to the kernel.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassMalformed)?;
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut l3 = EthHdr::LEN;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: *const VlanHdr = ptr_at(ctx, l3).ok_or(Reason::PassMalformed)?;
        ether_type = u16::from_be(unsafe { (*vlan).ether_type });
        l3 += VlanHdr::LEN;
    }

    let mut key = FlowKey::default();
    let l4 = match ether_type {
        ETH_P_IP => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(Reason::PassMalformed)?;
            let ip = unsafe { &*ip };
            let ihl = usize::from(ip.vihl & 0x0f) * 4;
            if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
                return Err(Reason::PassMalformed);
            }
            key.proto = ip.proto;
            if key.proto != PROTO_TCP && key.proto != PROTO_UDP && key.proto != PROTO_ICMP {
                return Err(Reason::PassNotService);
            }
            // Only the first fragment carries ports, so no fragment can be
            // hashed like the rest of its flow: all go to the kernel.
            if u16::from_be_bytes(ip.frags) & (IP_MF | IP_OFFSET) != 0 {
                return Err(Reason::PassFragment);
            }
            key.src[..3].copy_from_slice(&V4_MAPPED_PREFIX);
            key.dst[..3].copy_from_slice(&V4_MAPPED_PREFIX);
            words(&ip.src_addr, &mut key.src, 3);
            words(&ip.dst_addr, &mut key.dst, 3);
            l3 + ihl
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(Reason::PassMalformed)?;
            let ip = unsafe { &*ip };
            // The kernel drops an IPv6 header of another version; rewriting
            // one would forward what no host accepts.
            if ip.vcf[0] >> 4 != 6 {
                return Err(Reason::PassMalformed);
            }
            key.proto = ip.next_hdr;
            if key.proto != PROTO_TCP && key.proto != PROTO_UDP && key.proto != PROTO_ICMPV6 {
                return Err(if is_ipv6_ext(key.proto) {
                    Reason::PassIpv6Ext
                } else {
                    Reason::PassNotService
                });
            }
            words(&ip.src_addr, &mut key.src, 0);
            words(&ip.dst_addr, &mut key.dst, 0);
            // Keys hold IPv4 as `::ffff:a.b.c.d`, so an IPv6 packet naming
            // such an address (never valid on the wire, RFC 4291 2.5.5.2)
            // would match IPv4 services, flows, NAT translations and
            // per-source limits, and be rewritten as IPv4 traffic.
            if is_v4_mapped(&key.src) || is_v4_mapped(&key.dst) {
                return Err(Reason::PassNotService);
            }
            l3 + Ipv6Hdr::LEN
        }
        _ => return Err(Reason::PassNotIp),
    };

    let ipv6 = ether_type == ETH_P_IPV6;
    let mut tcp_flags = 0;
    let mut tcp_seq = 0;
    // Both headers start with the two ports; require the whole header so a
    // truncated segment is never forwarded.
    let ports: *const [u16; 2] = match key.proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(Reason::PassMalformed)?;
            // Flags are the low bits of byte 13.
            tcp_flags = unsafe { *(tcp as *const u8).add(13) };
            tcp_seq = u32::from_be_bytes(unsafe { (*tcp).seq });
            tcp.cast()
        }
        PROTO_UDP => ptr_at::<UdpHdr>(ctx, l4)
            .ok_or(Reason::PassMalformed)?
            .cast(),
        // ICMP: no ports; the caller decides whether it is a NAT error.
        _ => {
            return Ok(Packet {
                key,
                l3,
                l4,
                ipv6,
                tcp_flags,
                tcp_seq,
            })
        }
    };
    let ports = unsafe { core::ptr::read_unaligned(ports) };
    key.sport_be = ports[0];
    key.dport_be = ports[1];
    Ok(Packet {
        key,
        l3,
        l4,
        ipv6,
        tcp_flags,
        tcp_seq,
    })
}
