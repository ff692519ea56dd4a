//! NAT mode: the client's packet gets the backend as destination and the
//! load balancer's SNAT address (with an allocated port) as source; the
//! backend's reply comes back here and is translated back. Both directions
//! are tracked in hash maps (not LRU: a live flow is never evicted; a full
//! table refuses new flows instead). Idle entries are reclaimed by the
//! control plane's sweeper, and by this program when it needs the port.
//!
//! A flow the backend has not answered yet has a short timeout
//! (`NAT_UNANSWERED_TIMEOUT_S`) and counts against its source address's
//! bound (`NAT_UNANSWERED_PER_SOURCE`): spoofed SYNs, which are never
//! answered, hold source ports for seconds, and no one source holds many.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST},
    helpers::{bpf_fib_lookup, bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_loop},
    programs::XdpContext,
};
use network_types::eth::EthHdr;
use xdp_common::{
    nat_expired, nat_partner_expired, nat_track_seq, Backend, FlowKey, NatFwd, NatRev, NatSource,
    Reason, Service, ServiceKey, MAX_SNAT_POOL, NAT_F_ANSWERED, NAT_F_CLOSING, NAT_F_REFUSED,
    NAT_F_RETRIED, NAT_PORT_TRIES, NAT_UNANSWERED_PER_SOURCE, NAT_UNANSWERED_TIMEOUT_S, PROTO_TCP,
    PROTO_UDP, SVC_F_NAT_RETRY, SYN_RETRANSMITTED_NS,
};

use crate::{
    csum::{self, Diff},
    forward,
    icmp::Quoted,
    maglev,
    maps::{
        BACKENDS, NAT_FULL_UNTIL, NAT_FWD, NAT_REV, NAT_SCAN, NAT_SOURCES, SERVICES, SNAT_POOLS,
    },
    parse::{addr_offsets, ptr_at, Packet},
    replicate,
    stats::{self, count},
};

/// Address families, as `bpf_fib_lookup` takes them.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[inline(always)]
fn timeout(service: &Service, proto: u8, closing: bool) -> u32 {
    if proto == PROTO_UDP {
        service.nat_udp_timeout
    } else if closing {
        service.nat_closing_timeout
    } else {
        service.nat_tcp_timeout
    }
}

/// Whether a client's packet on an existing flow should move the flow to
/// another backend (`SVC_F_NAT_RETRY`): a SYN of a flow whose backend
/// refused it, or has not answered it by the client's retransmission; at
/// most once per flow.
#[inline(always)]
fn retry(service: &Service, f: &NatFwd, p: &Packet, now: u64) -> bool {
    service.flags & SVC_F_NAT_RETRY != 0
        && f.flags & (NAT_F_ANSWERED | NAT_F_RETRIED) == 0
        && p.syn()
        && (f.flags & NAT_F_REFUSED != 0
            || now.saturating_sub(f.last_seen_ns) >= SYN_RETRANSMITTED_NS)
}

/// Timeout of a flow the backend has not answered yet.
#[inline(always)]
fn unanswered_timeout(service: &Service, proto: u8) -> u32 {
    let full = timeout(service, proto, false);
    if full < NAT_UNANSWERED_TIMEOUT_S {
        full
    } else {
        NAT_UNANSWERED_TIMEOUT_S
    }
}

/// Counts a new flow against its source address's unanswered bound, or
/// refuses it when the source is at the bound. The count restarts when
/// the source made no new flow for the unanswered timeout (its
/// unanswered flows have all expired by then). Per-CPU races may miscount
/// by a few; the bound is a rough one.
#[inline(always)]
fn admit_source(src: &[u32; 4], now: u64) -> Result<(), Reason> {
    let Some(s) = NAT_SOURCES.get_ptr_mut(src) else {
        let first = NatSource {
            unanswered: 1,
            _pad: 0,
            last_ns: now,
        };
        let _ = NAT_SOURCES.insert(src, &first, 0);
        return Ok(());
    };
    // SAFETY: valid for this run.
    let s = unsafe { &mut *s };
    if nat_expired(s.last_ns, NAT_UNANSWERED_TIMEOUT_S, now) {
        s.unanswered = 0;
    }
    if s.unanswered >= NAT_UNANSWERED_PER_SOURCE {
        return Err(Reason::DropNatFull);
    }
    s.unanswered += 1;
    s.last_ns = now;
    Ok(())
}

/// The key of the backend's replies to a flow translated to `snat:port`.
#[inline(always)]
fn reply_key(backend: &Backend, snat: &[u32; 4], port_be: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: backend.addr,
        dst: *snat,
        sport_be: backend.port_be,
        dport_be: port_be,
        proto,
        _pad: [0; 3],
    }
}

/// A packet of a NAT service, from a client.
#[inline(always)]
pub fn forward(ctx: &XdpContext, p: &Packet, service: &Service) -> Result<u32, Reason> {
    let key = &p.key;
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // A flow being replaced: (its backend, its SNAT address and port,
    // moved for a retry).
    let mut stale: Option<(u32, [u32; 4], u16, bool)> = None;
    if let Some(f) = NAT_FWD.get_ptr_mut(key) {
        // SAFETY: valid for this run; only this flow's packets write it.
        let f = unsafe { &mut *f };
        let retrying = retry(service, f, p, now);
        if p.syn()
            && f.flags & NAT_F_ANSWERED == 0
            && now.saturating_sub(f.last_seen_ns) >= SYN_RETRANSMITTED_NS
        {
            stats::signal(f.backend, |s| &mut s.syn_retransmits);
        }
        match BACKENDS.get(f.backend).filter(|b| b.is_live()) {
            Some(backend) if !f.expired(now) && !retrying => {
                f.last_seen_ns = now;
                // Only the client's own FIN or RST closes: a stranger's,
                // far from the client's sequence numbers, is passed on
                // (the backend judges it) but changes nothing here.
                let own =
                    key.proto == PROTO_TCP && nat_track_seq(&mut f.flags, &mut f.seq, p.tcp_seq);
                if own && p.fin_or_rst() && f.flags & NAT_F_CLOSING == 0 {
                    f.flags |= NAT_F_CLOSING;
                    f.timeout_s = service.nat_closing_timeout;
                    // Both directions close together (FIN/RST are rare: the
                    // extra look-up is not on the common path).
                    let rk = reply_key(backend, &f.snat_addr, f.nat_port_be, key.proto);
                    if let Some(r) = NAT_REV.get_ptr_mut(&rk) {
                        close_rev(unsafe { &mut *r }, service.nat_closing_timeout);
                    }
                }
                count(Reason::FlowHit);
                let snat = (f.snat_addr, f.nat_port_be);
                return send_forward(ctx, p, f.backend, service, backend, snat, false);
            }
            _ => stale = Some((f.backend, f.snat_addr, f.nat_port_be, retrying)),
        }
    }
    // Only a SYN opens a TCP flow: anything else unknown here gets no
    // port (a cluster peer's translation may still be on its way).
    if stale.is_none() && key.proto == PROTO_TCP && !p.syn() {
        return Err(Reason::DropNatNoFlow);
    }
    // The translation sends its replies to this frame's source MAC: a
    // group address (no sender has one) would have every host on the
    // client's segment receive them, a stranger's whole download.
    sender_mac(ctx)?;
    let id = match stale {
        Some((refused, _, _, true)) => maglev::pick_other(service, key, refused),
        _ => maglev::pick(service, key),
    }
    .ok_or(Reason::DropNoBackend)?;
    let backend = BACKENDS.get(id).ok_or(Reason::DropNoBackend)?;
    if !backend.next_hop_resolved() {
        return Err(Reason::PassNoNeigh);
    }
    let retried = matches!(stale, Some((_, _, _, true)));
    if let Some((old_id, old_snat, old_port, _)) = stale {
        release(key, old_id, &old_snat, old_port, now);
    }
    if !retried {
        admit_source(&key.src, now)?;
    }
    let taken = allocate(ctx, p, service, id, backend, now)?;
    let (snat, port) = (taken.rk.dst, taken.port_be);
    // A TCP flow moved mid-connection (its backend went down) cannot be
    // retried: the new backend knows nothing of it and resets it, and
    // that reset must reach the client, as a second refusal does.
    let moved_mid_connection = key.proto == PROTO_TCP && !p.syn();
    let mut fwd = NatFwd {
        backend: id,
        nat_port_be: port,
        flags: if retried || moved_mid_connection {
            NAT_F_RETRIED
        } else {
            0
        },
        last_seen_ns: now,
        timeout_s: unanswered_timeout(service, key.proto),
        seq: 0,
        snat_addr: snat,
    };
    if key.proto == PROTO_TCP {
        nat_track_seq(&mut fwd.flags, &mut fwd.seq, p.tcp_seq);
    }
    if NAT_FWD.insert(key, &fwd, 0).is_err() {
        let _ = NAT_REV.remove(&taken.rk);
        return Err(Reason::DropNatFull);
    }
    count(if retried {
        Reason::NatRetry
    } else {
        Reason::NatNew
    });
    // Passive detection judges TCP only: a UDP flow need not be answered.
    if key.proto != PROTO_TCP {
        stats::signal(id, |s| &mut s.confirmed);
    }
    send_forward(ctx, p, id, service, backend, (snat, port), true)
}

/// A frame whose source MAC cannot be a sender's (a group address, group
/// bit set, or zero) is malformed.
#[inline(always)]
fn sender_mac(ctx: &XdpContext) -> Result<(), Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds checked.
    let mac = unsafe { (*eth).src_addr };
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(Reason::PassMalformed);
    }
    Ok(())
}

#[inline(always)]
fn close_rev(r: &mut NatRev, timeout_s: u32) {
    r.flags |= NAT_F_CLOSING;
    r.timeout_s = timeout_s;
}

/// Removes the reply entry of a flow's previous translation, if it is
/// still this flow's (its port may have been reclaimed by another flow)
/// and not the sweeper's to delete (see `nat_sweepable`).
#[inline(always)]
fn release(key: &FlowKey, backend_id: u32, snat: &[u32; 4], port_be: u16, now: u64) {
    let Some(backend) = BACKENDS.get(backend_id) else {
        return;
    };
    let rk = reply_key(backend, snat, port_be, key.proto);
    if let Some(r) = NAT_REV.get_ptr(&rk) {
        // SAFETY: valid for this run.
        let r = unsafe { &*r };
        if r.client_key(key.proto) == *key && !r.sweepable(now) {
            let _ = NAT_REV.remove(&rk);
        }
    }
}

/// Picks a source (SNAT address, port) pair whose reply key is free (or
/// whose flow is dead: see `NatRev::reclaimable`) and records the reply
/// entry there; the pair is the returned scan's `rk.dst` and `port_be`. A
/// few random pairs first; if all are taken (the range is getting full), a
/// scan of all pairs from a random one, which fails only when none is
/// free, and then no scan is tried again for this backend on this CPU for
/// `FULL_HOLD_NS`, so a full range costs a flood one scan per period, not
/// one per SYN.
#[inline(always)]
fn allocate(
    ctx: &XdpContext,
    p: &Packet,
    service: &Service,
    backend_id: u32,
    backend: &Backend,
    now: u64,
) -> Result<&'static PortScan, Reason> {
    let key = &p.key;
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds checked.
    let (client_mac, lb_mac) = unsafe { ((*eth).src_addr, (*eth).dst_addr) };
    let count_ports = u32::from(service.nat_port_count);
    if count_ports == 0 {
        return Err(Reason::DropNatFull);
    }
    // The scan's state lives in a per-CPU scratch entry, not on the stack:
    // the verifier counts this program's stack and the loop callback's
    // together, within 512 bytes.
    let scan = NAT_SCAN.get_ptr_mut(0).ok_or(Reason::DropNatFull)?;
    // SAFETY: this CPU's own entry, used only during this run.
    let scan = unsafe { &mut *scan };
    // Field by field: a whole-struct assignment would be built on the
    // stack first, and the verifier counts this program's stack and the
    // loop callback's together.
    scan.rk = reply_key(backend, &backend.snat_addr, 0, key.proto);
    scan.rev = NatRev {
        client: key.src,
        vip: key.dst,
        client_mac,
        lb_mac,
        client_port_be: key.sport_be,
        vip_port_be: key.dport_be,
        ifindex: ctx.ingress_ifindex() as u32,
        flags: 0,
        _pad: 0,
        last_seen_ns: now,
        timeout_s: unanswered_timeout(service, key.proto),
        // The backend's sequence numbers: tracked from its first answer.
        seq: 0,
    };
    scan.now = now;
    scan.base = u32::from(service.nat_port_base);
    scan.count = count_ports;
    scan.port_be = 0;
    scan.addrs = 1;
    // A pool of SNAT addresses multiplies the candidates.
    if let Some(pool) = SNAT_POOLS.get(service.id).filter(|p| p.count > 1) {
        scan.addrs = pool.count.min(MAX_SNAT_POOL as u32);
        scan.pool = pool.addrs;
    }
    let candidates = count_ports * scan.addrs;
    let mut i = 0;
    while i < NAT_PORT_TRIES {
        // SAFETY: a helper without arguments.
        let port = scan.candidate(unsafe { bpf_get_prandom_u32() });
        if take_port(scan, port) {
            scan.port_be = port;
            return Ok(scan);
        }
        i += 1;
    }
    let full_until = NAT_FULL_UNTIL
        .get_ptr_mut(backend_id)
        .ok_or(Reason::DropNatFull)?;
    // SAFETY: this CPU's own slot.
    let full_until = unsafe { &mut *full_until };
    if now < *full_until {
        return Err(Reason::DropNatFull);
    }
    // SAFETY: a helper without arguments.
    scan.start = unsafe { bpf_get_prandom_u32() };
    let callback = scan_port as *const () as *mut c_void;
    // SAFETY: `scan_port` takes no context (it finds `NAT_SCAN` itself).
    unsafe { bpf_loop(candidates, callback, core::ptr::null_mut(), 0) };
    if scan.port_be == 0 {
        *full_until = now + FULL_HOLD_NS;
        return Err(Reason::DropNatFull);
    }
    Ok(scan)
}

/// How long a backend whose whole port range was found taken gets no new
/// scan on that CPU.
const FULL_HOLD_NS: u64 = 100_000_000;

/// The state of one port allocation (`NAT_SCAN`).
#[repr(C)]
pub struct PortScan {
    /// The reply key being allocated; its destination port is tried.
    rk: FlowKey,
    rev: NatRev,
    now: u64,
    base: u32,
    count: u32,
    /// Where the scan starts in the range.
    start: u32,
    /// The port taken (network order), 0 if none yet.
    port_be: u16,
    /// The client-side key of a port's previous flow (here rather than on
    /// the callback's stack, which the verifier counts with the caller's).
    old_client: FlowKey,
    /// SNAT addresses to allocate from: `pool[..addrs]`, or the backend's
    /// own (already in `rk`) when 1.
    addrs: u32,
    pool: [[u32; 4]; MAX_SNAT_POOL],
}

impl PortScan {
    /// Candidate `n` (any `n`) of the (address, port) pairs: sets its
    /// address in `rk` and returns its port, network order.
    #[inline(always)]
    fn candidate(&mut self, n: u32) -> u16 {
        // `checked_*` and `get`: no panic paths (the verifier refuses
        // them), though `allocate` never scans an empty range.
        if self.addrs > 1 {
            let i = n
                .checked_div(self.count)
                .unwrap_or(0)
                .checked_rem(self.addrs);
            if let Some(addr) = self.pool.get(i.unwrap_or(0) as usize) {
                self.rk.dst = *addr;
            }
        }
        ((self.base + n.checked_rem(self.count).unwrap_or(0)) as u16).to_be()
    }
}

/// One step of the scan: tries port `start + i`; 1 stops the loop.
extern "C" fn scan_port(i: u32, _: *mut c_void) -> i64 {
    let Some(scan) = NAT_SCAN.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's own entry, which `allocate` filled.
    let scan = unsafe { &mut *scan };
    let port = scan.candidate(scan.start.wrapping_add(i));
    if take_port(scan, port) {
        scan.port_be = port;
        return 1;
    }
    0
}

/// Records the reply entry at `port` if its reply key is free or its flow
/// is dead (then the old flow's client side goes with it, so expired
/// flows, a flood's, never fill NAT_FWD).
#[inline(always)]
fn take_port(scan: &mut PortScan, port: u16) -> bool {
    scan.rk.dport_be = port;
    let rk = &scan.rk;
    let now = scan.now;
    let Some(old) = NAT_REV.get_ptr(rk) else {
        return NAT_REV
            .insert(rk, &scan.rev, u64::from(BPF_NOEXIST))
            .is_ok();
    };
    // SAFETY: valid for this run.
    let old = unsafe { &*old };
    if !old.expired(now) {
        // Held (the common case in a scan): no need to look at its partner.
        return false;
    }
    // Dead both ways: a one-way flow (the client sends, the backend never
    // answers) keeps its port while the client keeps sending.
    scan.old_client = old.client_key(rk.proto);
    // SAFETY: valid for this run.
    let partner = NAT_FWD.get_ptr(&scan.old_client).map(|f| unsafe { &*f });
    let partner_expired = nat_partner_expired(partner, rk, now);
    if !old.reclaimable(partner_expired, now) || NAT_REV.insert(rk, &scan.rev, 0).is_err() {
        return false;
    }
    if partner.is_some_and(|f| f.owns(rk)) {
        let _ = NAT_FWD.remove(&scan.old_client);
    }
    true
}

#[inline(always)]
fn send_forward(
    ctx: &XdpContext,
    p: &Packet,
    id: u32,
    service: &Service,
    backend: &Backend,
    // The translated source: our SNAT address (or, for a replicated flow,
    // the peer's that made it) and the allocated port.
    (snat, port_be): ([u32; 4], u16),
    // A constant at each call: the established path pays nothing for it.
    new_flow: bool,
) -> Result<u32, Reason> {
    // Checked before anything is rewritten: an unresolved next hop hands
    // the untouched packet to the kernel.
    if !backend.next_hop_resolved() {
        return Err(Reason::PassNoNeigh);
    }
    rewrite(ctx, p, &snat, port_be, &backend.addr, backend.port_be)?;
    let verdict = forward::send_to(ctx, backend)?;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    stats::count_forwarded(service.id, id, bytes, new_flow);
    Ok(verdict)
}

/// A TCP/UDP packet that matched no service: a backend's reply to a NAT
/// flow, or none of our business (`Err(PassNotService)`). ICMP errors
/// about NAT flows go to [`icmp_error`] instead.
#[inline(always)]
pub fn reverse(ctx: &XdpContext, p: &Packet) -> Result<u32, Reason> {
    let r = NAT_REV.get_ptr_mut(&p.key).ok_or(Reason::PassNotService)?;
    // SAFETY: valid for this run.
    let r = unsafe { &mut *r };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if r.expired(now) {
        // SAFETY: valid for this run.
        let partner = NAT_FWD
            .get_ptr(&r.client_key(p.key.proto))
            .map(|f| unsafe { &*f });
        if nat_partner_expired(partner, &p.key, now) {
            // A dead flow stays dead: its entries are not ours to refresh
            // (the sweeper may be deleting them), so this is no reply of
            // a translation.
            return Err(Reason::PassNotService);
        }
    }
    r.last_seen_ns = now;
    // Only the backend's own FIN or RST closes (see `forward`).
    let own = p.key.proto == PROTO_TCP && nat_track_seq(&mut r.flags, &mut r.seq, p.tcp_seq);
    if r.flags & NAT_F_ANSWERED == 0 {
        if p.rst() && refused(r, p.key.proto) {
            count(Reason::NatRetry);
            return Ok(xdp_action::XDP_DROP);
        }
        answered(r, p.key.proto);
    }
    if own && p.fin_or_rst() && r.flags & NAT_F_CLOSING == 0 {
        close_both(r, p.key.proto);
    }
    // A replicated entry's first reply here: the kernel's routing table
    // says where the client is (once per flow; the answer is kept).
    let routed = r.ifindex != 0 || route_to_client(ctx, r, p.ipv6);
    let (vip, vip_port, client, client_port) = (r.vip, r.vip_port_be, r.client, r.client_port_be);
    rewrite(ctx, p, &vip, vip_port, &client, client_port)?;
    if !routed {
        // The kernel may still know the way (and resolve the neighbour).
        count(Reason::PassNoRoute);
        return Ok(xdp_action::XDP_PASS);
    }
    count(Reason::NatReply);
    to_client(ctx, r)
}

/// Looks up the route from the VIP to the client of replicated entry `r`
/// (`bpf_fib_lookup`, as the kernel would forward it: needs forwarding on
/// the receiving interface) and keeps its next hop in `r`. False when
/// there is none, or its neighbour is not resolved yet.
#[inline(always)]
fn route_to_client(ctx: &XdpContext, r: &mut NatRev, v6: bool) -> bool {
    // SAFETY: a plain C struct; all-zero is its "no options" value.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.ifindex = ctx.ingress_ifindex() as u32;
    if v6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = r.vip;
        fib.__bindgen_anon_4.ipv6_dst = r.client;
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = r.vip[3];
        fib.__bindgen_anon_4.ipv4_dst = r.client[3];
    }
    // SAFETY: `fib` is a valid, initialised lookup of its own size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return false;
    }
    r.client_mac = fib.dmac;
    r.lb_mac = fib.smac;
    r.ifindex = fib.ifindex;
    true
}

/// The service a reply entry's flow belongs to.
#[inline(always)]
fn service_of(r: &NatRev, proto: u8) -> Option<&'static Service> {
    let skey = ServiceKey::new(r.vip, r.vip_port_be, proto);
    // SAFETY: service values are replaced whole, never written in place.
    unsafe { SERVICES.get(&skey) }
}

/// The backend reset a flow it never answered: it refused the connection
/// (no server listening: its host is up, its process is not). When the
/// service retries refused flows and this one was not moved yet, the flow
/// is marked so that the client's next SYN goes to another backend, and
/// the RST is dropped (returns true); otherwise the client gets it.
#[inline(always)]
fn refused(r: &NatRev, proto: u8) -> bool {
    let Some(f) = NAT_FWD.get_ptr_mut(&r.client_key(proto)) else {
        return false;
    };
    // SAFETY: valid for this run.
    let f = unsafe { &mut *f };
    stats::signal(f.backend, |s| &mut s.refused);
    let retries = service_of(r, proto).is_some_and(|s| s.flags & SVC_F_NAT_RETRY != 0);
    if !retries || f.flags & NAT_F_RETRIED != 0 {
        return false;
    }
    f.flags |= NAT_F_REFUSED;
    true
}

/// The backend's first answer: both directions get the service's full
/// timeout (closing, if a FIN or RST came first), and the flow no longer
/// counts against its source's unanswered bound. Once per flow.
#[inline(always)]
fn answered(r: &mut NatRev, proto: u8) {
    r.flags |= NAT_F_ANSWERED;
    if let Some(s) = NAT_SOURCES.get_ptr_mut(&r.client) {
        // SAFETY: valid for this run.
        let s = unsafe { &mut *s };
        s.unanswered = s.unanswered.saturating_sub(1);
    }
    let Some(service) = service_of(r, proto) else {
        return;
    };
    r.timeout_s = timeout(service, proto, r.flags & NAT_F_CLOSING != 0);
    if let Some(f) = NAT_FWD.get_ptr_mut(&r.client_key(proto)) {
        // SAFETY: valid for this run.
        let f = unsafe { &mut *f };
        f.flags |= NAT_F_ANSWERED;
        f.timeout_s = timeout(service, proto, f.flags & NAT_F_CLOSING != 0);
        // UDP flows were counted answered when made (see `forward`).
        if proto == PROTO_TCP {
            stats::signal(f.backend, |s| &mut s.confirmed);
        }
        // Worth its peers knowing now that it is a real flow.
        replicate::translated(&r.client_key(proto), f);
    }
}

/// A FIN or RST from the backend: both directions of the flow get the
/// service's closing timeout.
#[inline(always)]
fn close_both(r: &mut NatRev, proto: u8) {
    let Some(service) = service_of(r, proto) else {
        return;
    };
    close_rev(r, service.nat_closing_timeout);
    if let Some(f) = NAT_FWD.get_ptr_mut(&r.client_key(proto)) {
        // SAFETY: valid for this run.
        let f = unsafe { &mut *f };
        f.flags |= NAT_F_CLOSING;
        f.timeout_s = service.nat_closing_timeout;
    }
}

/// Sends a translated reply towards the client, back the way its packets
/// came (an ICMP error about a replicated flow not routed here yet goes to
/// the kernel).
#[inline(always)]
fn to_client(ctx: &XdpContext, r: &NatRev) -> Result<u32, Reason> {
    if r.ifindex == 0 {
        return Err(Reason::PassNoRoute);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds checked.
    unsafe {
        (*eth).dst_addr = r.client_mac;
        (*eth).src_addr = r.lb_mac;
    }
    forward::send(ctx, r.ifindex)
}

/// Offsets of a packet's address fields and L4 checksum.
#[inline(always)]
fn write_addr(ctx: &XdpContext, off: usize, addr: &[u32; 4], v6: bool) -> Result<(), Reason> {
    if v6 {
        let a: *mut [u32; 4] = ptr_at(ctx, off).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds checked; unaligned write.
        unsafe { core::ptr::write_unaligned(a, *addr) };
    } else {
        let a: *mut u32 = ptr_at(ctx, off).ok_or(Reason::PassMalformed)?;
        unsafe { core::ptr::write_unaligned(a, addr[3]) };
    }
    Ok(())
}

#[inline(always)]
fn read_u16(ctx: &XdpContext, off: usize) -> Result<u16, Reason> {
    let p: *const u16 = ptr_at(ctx, off).ok_or(Reason::PassMalformed)?;
    Ok(unsafe { core::ptr::read_unaligned(p) })
}

#[inline(always)]
fn write_u16(ctx: &XdpContext, off: usize, v: u16) -> Result<(), Reason> {
    let p: *mut u16 = ptr_at(ctx, off).ok_or(Reason::PassMalformed)?;
    unsafe { core::ptr::write_unaligned(p, v) };
    Ok(())
}

/// Rewrites addresses and ports of a TCP/UDP packet and updates the IPv4
/// header checksum and the L4 checksum (pseudo-header included).
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    p: &Packet,
    src: &[u32; 4],
    sport: u16,
    dst: &[u32; 4],
    dport: u16,
) -> Result<(), Reason> {
    let k = &p.key;
    let v6 = p.ipv6;
    let mut addrs = Diff::default();
    addrs.addr(&k.src, src, v6);
    addrs.addr(&k.dst, dst, v6);
    let mut l4 = addrs;
    l4.u16(k.sport_be, sport);
    l4.u16(k.dport_be, dport);

    let (src_off, dst_off) = addr_offsets(p.l3, p.ipv6);
    write_addr(ctx, src_off, src, v6)?;
    write_addr(ctx, dst_off, dst, v6)?;
    if !v6 {
        let check = read_u16(ctx, p.l3 + 10)?;
        write_u16(ctx, p.l3 + 10, addrs.apply(check))?;
    }
    write_u16(ctx, p.l4, sport)?;
    write_u16(ctx, p.l4 + 2, dport)?;
    if k.proto == PROTO_TCP {
        let check = read_u16(ctx, p.l4 + 16)?;
        write_u16(ctx, p.l4 + 16, l4.apply(check))?;
    } else {
        let check = read_u16(ctx, p.l4 + 6)?;
        // IPv4 UDP may carry no checksum (0); IPv6 UDP always does.
        if check != 0 || v6 {
            write_u16(ctx, p.l4 + 6, csum::udp(l4.apply(check)))?;
        }
    }
    Ok(())
}

/// An ICMP error (see `icmp::quoted`) sent to our SNAT address about a
/// packet we translated: translated back to the client, the quoted packet
/// included, so path MTU discovery works through the load balancer.
#[inline(always)]
pub fn icmp_error(ctx: &XdpContext, p: &Packet, q: &Quoted) -> Result<u32, Reason> {
    let v6 = p.ipv6;
    let (inner_l3, inner_l4, inner_proto) = (q.l3, q.l4, q.proto);
    let (inner_src, inner_dst) = (q.src, q.dst);
    let (inner_sport, inner_dport) = (q.sport_be, q.dport_be);
    let (inner_src_off, inner_dst_off) = addr_offsets(q.l3, v6);
    // The reply key: as the backend would answer the quoted packet.
    let rk = q.answered_flow();
    let r = NAT_REV.get_ptr(&rk).ok_or(Reason::PassNotService)?;
    // SAFETY: valid for this run.
    let r = unsafe { &*r };

    // Inner packet: src -> client, dst -> VIP.
    let mut inner_addrs = Diff::default();
    inner_addrs.addr(&inner_src, &r.client, v6);
    inner_addrs.addr(&inner_dst, &r.vip, v6);
    let mut inner_l4_diff = inner_addrs;
    inner_l4_diff.u16(inner_sport, r.client_port_be);
    inner_l4_diff.u16(inner_dport, r.vip_port_be);
    // What changes inside the ICMP message, for the ICMP checksum.
    let mut icmp = inner_l4_diff;

    write_addr(ctx, inner_src_off, &r.client, v6)?;
    write_addr(ctx, inner_dst_off, &r.vip, v6)?;
    write_u16(ctx, inner_l4, r.client_port_be)?;
    write_u16(ctx, inner_l4 + 2, r.vip_port_be)?;
    if !v6 {
        let old = read_u16(ctx, inner_l3 + 10)?;
        let new = inner_addrs.apply(old);
        write_u16(ctx, inner_l3 + 10, new)?;
        icmp.u16(old, new);
    }
    // The quoted L4 checksum, when the quote reaches it.
    let check_off = if inner_proto == PROTO_TCP {
        inner_l4 + 16
    } else {
        inner_l4 + 6
    };
    if let Ok(old) = read_u16(ctx, check_off) {
        if old != 0 || v6 || inner_proto == PROTO_TCP {
            let mut new = inner_l4_diff.apply(old);
            if inner_proto == PROTO_UDP {
                new = csum::udp(new);
            }
            write_u16(ctx, check_off, new)?;
            icmp.u16(old, new);
        }
    }

    // Outer header: from the VIP to the client.
    let mut outer = Diff::default();
    outer.addr(&p.key.src, &r.vip, v6);
    outer.addr(&p.key.dst, &r.client, v6);
    let (src_off, dst_off) = addr_offsets(p.l3, p.ipv6);
    write_addr(ctx, src_off, &r.vip, v6)?;
    write_addr(ctx, dst_off, &r.client, v6)?;
    if v6 {
        // ICMPv6's checksum covers a pseudo-header with the outer addresses.
        icmp.add(outer);
    } else {
        let old = read_u16(ctx, p.l3 + 10)?;
        write_u16(ctx, p.l3 + 10, outer.apply(old))?;
    }
    let old = read_u16(ctx, p.l4 + 2)?;
    write_u16(ctx, p.l4 + 2, icmp.apply(old))?;
    count(Reason::NatIcmp);
    to_client(ctx, r)
}
