//! The xdplb XDP program: parse, service look-up, connection tracking,
//! Maglev, rewrite, stats. Each step lives in its own module; this file only
//! wires them together and turns every outcome into a verdict.
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod events;
mod forward;
mod icmp;
mod ifmac;
mod maglev;
mod maps;
mod nat;
mod parse;
mod replicate;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use xdp_common::{
    Backend, FlowKey, Reason, Service, ServiceKey, FLOW_F_CONFIRMED, FLOW_F_RETRIED, SVC_F_NAT,
};

use crate::{
    conntrack::{Lookup, Table},
    maps::{BACKENDS, GLOBALS, SERVICES},
};

#[xdp]
pub fn xdplb(ctx: XdpContext) -> u32 {
    match balance(&ctx) {
        Ok(verdict) => verdict,
        // Whatever went wrong, the kernel gets the frame unchanged: every
        // check that can fail comes before the first write (headers were
        // bounds-checked by the parser). Never XDP_ABORTED.
        Err(reason @ (Reason::DropNoBackend | Reason::DropNatFull)) => {
            stats::count(reason);
            events::dropped(&ctx, reason);
            xdp_action::XDP_DROP
        }
        // Not worth a log line: stray segments are common.
        Err(Reason::DropNatNoFlow) => {
            stats::count(Reason::DropNatNoFlow);
            xdp_action::XDP_DROP
        }
        Err(reason) => {
            stats::count(reason);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<u32, Reason> {
    let packet = parse::parse(ctx)?;
    let key = &packet.key;
    let service_key = ServiceKey::new(key.dst, key.dport_be, key.proto);
    // SAFETY: service values are replaced whole by the control plane, never
    // written in place, so a reader sees one version or the other.
    let Some(service) = (unsafe { SERVICES.get(&service_key) }) else {
        // Not for a service: maybe a reply to a NAT flow (only looked up
        // when NAT is in use, to keep other traffic's cost down), or an
        // ICMP error about a flow (ICMP has no ports: never a service's).
        let nat = GLOBALS.get(0).is_some_and(|g| g.nat_enabled != 0);
        if icmp::is_icmp(&packet) {
            return icmp_error(ctx, &packet, nat);
        }
        if nat {
            for_us(ctx)?;
            return nat::reverse(ctx, &packet);
        }
        return Err(Reason::PassNotService);
    };
    for_us(ctx)?;
    if service.flags & SVC_F_NAT != 0 {
        return nat::forward(ctx, &packet, service);
    }

    // Three arms, each with its own `deliver`: the new-flow flag is a
    // constant in each, so an established flow's packet pays nothing for it.
    match conntrack::lookup(key) {
        Lookup::Hit(id, backend, flow, table) => {
            // The first packet after the SYN tells whether the backend
            // answered: the client's ACK (confirmed), or its SYN again.
            if !conntrack::confirmed(flow) {
                if packet.syn() {
                    stats::signal(id, |s| &mut s.syn_retransmits);
                    // Unanswered for long: the backend's host may be gone
                    // (nothing answers); the retransmission goes elsewhere.
                    if conntrack::retransmitted(flow) {
                        let other = maglev::pick_other(service, key, id);
                        let other = other.ok_or(Reason::DropNoBackend)?;
                        let backend = BACKENDS.get(other).ok_or(Reason::DropNoBackend)?;
                        conntrack::pin(table, key, other, FLOW_F_RETRIED);
                        if table == Table::Established {
                            replicate::pinned(key, other);
                        }
                        stats::count(Reason::FlowRetry);
                        return deliver(ctx, service, other, backend, false);
                    }
                } else {
                    stats::signal(id, |s| &mut s.confirmed);
                    match table {
                        // Answered: established now, and worth its
                        // peers knowing.
                        Table::Opening => {
                            conntrack::promote(key, flow);
                            replicate::pinned(key, id);
                        }
                        Table::Established => conntrack::confirm(flow),
                    }
                }
            }
            stats::count(Reason::FlowHit);
            deliver(ctx, service, id, backend, false)
        }
        // The flow's backend went away: re-pinned in the same table,
        // counted in flow_repick, not as a new flow (the client did not
        // open one); an established one is confirmed already.
        Lookup::Stale(table) => {
            let flags = match table {
                Table::Established => FLOW_F_CONFIRMED,
                Table::Opening => 0,
            };
            let (id, backend) = pick_and_pin(service, key, table, flags)?;
            stats::count(Reason::FlowRepick);
            deliver(ctx, service, id, backend, false)
        }
        Lookup::Miss => {
            // Only TCP says whether the backend answered (a UDP client's
            // second datagram proves nothing): it starts opening, other
            // flows start established and confirmed.
            let table = conntrack::table_for(key);
            let udp_like = table == Table::Established;
            let flags = if udp_like { FLOW_F_CONFIRMED } else { 0 };
            let (id, backend) = pick_and_pin(service, key, table, flags)?;
            if udp_like {
                stats::signal(id, |s| &mut s.confirmed);
            }
            stats::count(Reason::FlowNew);
            deliver(ctx, service, id, backend, true)
        }
    }
}

/// An ICMP error about one of our flows: a DSR flow's goes to its backend;
/// else, with NAT on, a translated flow's is translated back to its client.
/// Anything else (an echo, an error about someone else's packet) is
/// passed as before.
#[inline(always)]
fn icmp_error(ctx: &XdpContext, packet: &parse::Packet, nat: bool) -> Result<u32, Reason> {
    let quoted = icmp::quoted(ctx, packet);
    if let Ok(q) = &quoted {
        if let Some(verdict) = icmp::to_backend(ctx, q)? {
            return Ok(verdict);
        }
    }
    if !nat {
        return Err(Reason::PassNotService);
    }
    for_us(ctx)?;
    nat::icmp_error(ctx, packet, &quoted?)
}

/// Before any balancing decision (NAT replies included): a frame another
/// host was meant to receive is that host's to forward, not ours. Checked
/// only once the frame is known to be a service's (or a possible NAT
/// reply's), so other traffic does not pay for the look-up.
#[inline(always)]
fn for_us(ctx: &XdpContext) -> Result<(), Reason> {
    if ifmac::for_us(ctx) {
        Ok(())
    } else {
        Err(Reason::PassNotForUs)
    }
}

/// Picks a backend for a flow from the service's Maglev table and pins the
/// flow to it in `table`; an established pin is reported to the cluster's
/// other nodes (an opening one is, once answered).
#[inline(always)]
fn pick_and_pin(
    service: &Service,
    key: &FlowKey,
    table: Table,
    flags: u32,
) -> Result<(u32, &'static Backend), Reason> {
    let id = maglev::pick(service, key).ok_or(Reason::DropNoBackend)?;
    let backend = BACKENDS.get(id).ok_or(Reason::DropNoBackend)?;
    conntrack::pin(table, key, id, flags);
    if table == Table::Established {
        replicate::pinned(key, id);
    }
    Ok((id, backend))
}

/// Sends the packet to its backend and counts it (and its flow, if new).
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    service: &Service,
    id: u32,
    backend: &Backend,
    new_flow: bool,
) -> Result<u32, Reason> {
    let verdict = forward::send_to(ctx, backend)?;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    stats::count_forwarded(service.id, id, bytes, new_flow);
    Ok(verdict)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
