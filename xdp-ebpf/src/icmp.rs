//! ICMP errors about our flows: the one parser of an error's quoted packet,
//! shared by NAT (which translates the error back to its client) and DSR
//! (which sends it on to the flow's backend, see [`to_backend`]).

use aya_ebpf::programs::XdpContext;
use xdp_common::{FlowKey, Reason, ServiceKey, PROTO_TCP, PROTO_UDP, SVC_F_NAT, V4_MAPPED_PREFIX};

use crate::{
    conntrack::{self, Lookup},
    forward, maglev,
    maps::{BACKENDS, SERVICES},
    parse::{addr_offsets, ptr_at, Packet, PROTO_ICMP, PROTO_ICMPV6},
    stats::count,
};

/// Whether the packet is ICMP or ICMPv6 (the parser gave it no ports).
#[inline(always)]
pub fn is_icmp(p: &Packet) -> bool {
    p.key.proto == PROTO_ICMP || p.key.proto == PROTO_ICMPV6
}

/// The TCP/UDP packet an ICMP error quotes, sent from the address the
/// error is addressed to.
pub struct Quoted {
    /// Offsets of its IP and L4 headers in the frame.
    pub l3: usize,
    pub l4: usize,
    pub proto: u8,
    /// Its addresses (key words) and ports (network order).
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
}

impl Quoted {
    /// The flow the quoted packet answers: its reverse, as the peer that
    /// received it had sent.
    #[inline(always)]
    pub fn answered_flow(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// ICMP "destination unreachable" (port unreachable, fragmentation
/// needed...) and "time exceeded", and ICMPv6 "destination unreachable",
/// "packet too big" and "time exceeded": the quoted TCP/UDP packet, or
/// `Err` when `p` is no such error (another type, another quoted protocol)
/// or is not addressed to the quoted packet's source. Reads only.
#[inline(always)]
pub fn quoted(ctx: &XdpContext, p: &Packet) -> Result<Quoted, Reason> {
    let v6 = p.ipv6;
    let icmp_type: *const u8 = ptr_at(ctx, p.l4).ok_or(Reason::PassMalformed)?;
    let t = unsafe { *icmp_type };
    let is_error = if v6 {
        t == 1 || t == 2 || t == 3
    } else {
        t == 3 || t == 11
    };
    if !is_error {
        return Err(Reason::PassNotService);
    }
    let l3 = p.l4 + 8;
    let (l4, proto) = if v6 {
        let next: *const u8 = ptr_at(ctx, l3 + 6).ok_or(Reason::PassNotService)?;
        (l3 + 40, unsafe { *next })
    } else {
        let vihl: *const u8 = ptr_at(ctx, l3).ok_or(Reason::PassNotService)?;
        let ihl = usize::from(unsafe { *vihl } & 0x0f) * 4;
        if ihl < 20 {
            return Err(Reason::PassNotService);
        }
        let proto: *const u8 = ptr_at(ctx, l3 + 9).ok_or(Reason::PassNotService)?;
        (l3 + ihl, unsafe { *proto })
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Reason::PassNotService);
    }
    let mut q = Quoted {
        l3,
        l4,
        proto,
        src: [0; 4],
        dst: [0; 4],
        sport_be: 0,
        dport_be: 0,
    };
    let (src_off, dst_off) = addr_offsets(l3, v6);
    read_addr(ctx, src_off, &mut q.src, v6)?;
    read_addr(ctx, dst_off, &mut q.dst, v6)?;
    // Only an error sent to the address the quoted packet came from (our
    // SNAT address, a VIP) is about a packet of ours; one addressed
    // elsewhere is someone else's, whatever it quotes.
    if p.key.dst != q.src {
        return Err(Reason::PassNotService);
    }
    let ports: *const [u16; 2] = ptr_at(ctx, l4).ok_or(Reason::PassNotService)?;
    [q.sport_be, q.dport_be] = unsafe { core::ptr::read_unaligned(ports) };
    Ok(q)
}

#[inline(always)]
fn read_addr(ctx: &XdpContext, off: usize, out: &mut [u32; 4], v6: bool) -> Result<(), Reason> {
    if v6 {
        let a: *const [u32; 4] = ptr_at(ctx, off).ok_or(Reason::PassNotService)?;
        *out = unsafe { core::ptr::read_unaligned(a) };
    } else {
        let a: *const u32 = ptr_at(ctx, off).ok_or(Reason::PassNotService)?;
        let [a0, a1, a2] = V4_MAPPED_PREFIX;
        *out = [a0, a1, a2, unsafe { core::ptr::read_unaligned(a) }];
    }
    Ok(())
}

/// DSR: a backend replies from the VIP, so a router that cannot forward a
/// reply (too big for its next link, say) sends its error to the VIP, that
/// is here. Only the backend can act on it (path MTU discovery), so an
/// error quoting a packet from a DSR service's VIP:port goes, unchanged
/// but for the MACs, to the backend of the flow the packet belongs to: its
/// pinned one, else the one the service's table picks (nothing is pinned:
/// an error opens no flow). `Ok(None)`: not a DSR service's flow with a
/// backend, for the caller to handle as before.
#[inline(always)]
pub fn to_backend(ctx: &XdpContext, q: &Quoted) -> Result<Option<u32>, Reason> {
    let skey = ServiceKey::new(q.src, q.sport_be, q.proto);
    // SAFETY: service values are replaced whole, never written in place.
    let Some(service) = (unsafe { SERVICES.get(&skey) }) else {
        return Ok(None);
    };
    if service.flags & SVC_F_NAT != 0 {
        return Ok(None);
    }
    let key = q.answered_flow();
    let backend = match conntrack::lookup(&key) {
        Lookup::Hit(_, backend, _, _) => backend,
        // Unknown, or its backend is gone: the one its next packet gets.
        Lookup::Stale(_) | Lookup::Miss => {
            let Some(b) = maglev::pick(service, &key).and_then(|id| BACKENDS.get(id)) else {
                return Ok(None);
            };
            b
        }
    };
    crate::for_us(ctx)?;
    let verdict = forward::send_to(ctx, backend)?;
    count(Reason::DsrIcmp);
    Ok(Some(verdict))
}
