//! Map keys, values and constants shared by the xdplb datapath (the XDP
//! program in `xdp-ebpf`) and its control plane (`xdp-userspace`).
//!
//! Every type is `#[repr(C)]` and laid out by hand so that it has no padding
//! holes: the kernel compares hash-map keys byte for byte, and uninitialised
//! padding would make equal keys differ. Addresses are kept as four `u32`
//! words holding the bytes exactly as they appear on the wire (IPv4 as an
//! IPv4-mapped IPv6 address), and ports in network byte order, so the
//! datapath copies them from the packet without conversion.
#![no_std]

pub mod hash;
pub mod ifmac;
pub mod replication;

/// Names of the pinned/bpffs-visible maps. The `_vN` suffix is the format
/// version: a change to a key or value layout gets a new name, so a daemon
/// never adopts a map whose format it does not understand. Kernel object
/// names are limited to 15 bytes, hence the abbreviations.
pub mod map_names {
    /// `ServiceKey` -> `Service`.
    pub const SERVICES: &str = "xdplb_svc_v1";
    /// Backend id -> `Backend`.
    pub const BACKENDS: &str = "xdplb_be_v1";
    /// Flat array of backend ids: every service's Maglev tables (v2:
    /// memory-mappable).
    pub const MAGLEV: &str = "xdplb_maglev_v2";
    /// `FlowKey` -> `Flow`, the connection-tracking table (LRU; v2: the
    /// time the flow was opened added).
    pub const FLOWS: &str = "xdplb_flow_v2";
    /// `FlowKey` -> `Flow`: TCP flows whose client has sent only its first
    /// packet so far (LRU, small): a flood of SYNs churns this table, never
    /// the one of answered flows.
    pub const OPENING: &str = "xdplb_open_v1";
    /// Per-CPU counter per `Reason` (v5: 23 reasons, `dsr_icmp` added).
    pub const REASONS: &str = "xdplb_stats_v5";
    /// Per-CPU `Counters` per service id (v2: `new_flows` added).
    pub const SERVICE_STATS: &str = "xdplb_svcst_v2";
    /// Per-CPU `Counters` per backend id (v2: `new_flows` added).
    pub const BACKEND_STATS: &str = "xdplb_best_v2";
    /// NAT, client side: the client's `FlowKey` -> `NatFwd` (v2: the
    /// SNAT address added).
    pub const NAT_FWD: &str = "xdplb_natf_v2";
    /// NAT, backend side: the backend's reply `FlowKey` -> `NatRev`.
    pub const NAT_REV: &str = "xdplb_natr_v1";
    /// NAT: source address (`[u32; 4]`) -> `NatSource` (LRU).
    pub const NAT_SOURCES: &str = "xdplb_natsrc_v1";
    /// One `Globals` value (v2: `replicate` added).
    pub const GLOBALS: &str = "xdplb_glob_v2";
    /// Per-CPU `Signals` per backend id: what the traffic says of it.
    pub const SIGNALS: &str = "xdplb_besig_v1";
    /// DEVMAP_HASH of egress interfaces for XDP_REDIRECT, keyed by ifindex.
    pub const TX_PORTS: &str = "xdplb_txport_v1";
    /// NAT: service id -> `SnatPool`.
    pub const SNAT_POOLS: &str = "xdplb_snatpool_v1";
    /// NAT: per CPU, backend id -> until when its port range counts as
    /// full (`bpf_ktime_get_coarse_ns`).
    pub const NAT_FULL_UNTIL: &str = "xdplb_natfull_v1";
}

/// Capacity of the services map.
pub const MAX_SERVICES: u32 = 1024;
/// Capacity of the backends array; backend ids are indices into it.
pub const MAX_BACKENDS: u32 = 16384;
/// Default (and most common) Maglev table size: a prime, as Maglev needs.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;
/// Largest table size a service may ask for.
pub const MAX_TABLE_SIZE: u32 = 1_048_573;
/// Slots in the flat Maglev array shared by all services. Every service
/// owns two regions of its table size (double buffering), so this holds 32
/// services at the default size (16 MiB of kernel memory).
pub const MAGLEV_SLOTS: u32 = 64 * DEFAULT_TABLE_SIZE;
/// Capacity of the connection-tracking table.
pub const MAX_FLOWS: u32 = 262_144;
/// Capacity of the table of TCP flows still opening (a second of new
/// flows at 65k/s has room; a flood evicts only its own kind).
pub const MAX_OPENING_FLOWS: u32 = 65_536;
/// Capacity of each NAT table (flows translated at once).
pub const MAX_NAT_FLOWS: u32 = 262_144;
/// Random source ports tried for a new NAT flow before the datapath scans
/// the whole range for a free one.
pub const NAT_PORT_TRIES: u32 = 8;
/// Capacity of the egress-interface devmap.
pub const MAX_TX_PORTS: u32 = 64;

/// IP protocol numbers a service may use.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Identifies a service: VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// VIP, wire bytes; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u32; 4],
    /// Port, network byte order.
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey {
    #[inline(always)]
    pub const fn new(addr: [u32; 4], port_be: u16, proto: u8) -> Self {
        Self {
            addr,
            port_be,
            proto,
            _pad: 0,
        }
    }
}

/// `Service::flags`: hash the source address only (client affinity).
pub const SVC_F_HASH_SRC_ONLY: u32 = 1;
/// `Service::flags`: no backend takes new flows; new flows are dropped.
pub const SVC_F_NO_BACKEND: u32 = 1 << 1;
/// `Service::flags`: a NAT service (DNAT + SNAT) rather than DSR.
pub const SVC_F_NAT: u32 = 1 << 3;
/// `Service::flags`: NAT: a new TCP flow that its backend refuses (RST to
/// the SYN) or leaves unanswered until the client retransmits its SYN is
/// moved to another backend, once.
pub const SVC_F_NAT_RETRY: u32 = 1 << 4;
/// `Service::flags`: the active table is the second half of the service's
/// region. The datapath ignores it; a restarted daemon reads it to find the
/// region (`table_base - table_size`) it adopts.
pub const SVC_F_SECOND_HALF: u32 = 1 << 2;

/// A service's state as the datapath sees it. The control plane replaces
/// the whole value in one map update, which is what makes a table swap
/// atomic: a packet reads either the old `table_base` or the new one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Index into the per-service counters.
    pub id: u32,
    /// `SVC_F_*` bits.
    pub flags: u32,
    /// First slot of the active Maglev table in the flat array.
    pub table_base: u32,
    /// Number of slots of the table (a prime).
    pub table_size: u32,
    /// NAT: first source port of the SNAT range, and how many ports it has.
    pub nat_port_base: u16,
    pub nat_port_count: u16,
    /// NAT idle timeouts in seconds: TCP established, TCP after FIN/RST, UDP.
    pub nat_tcp_timeout: u32,
    pub nat_closing_timeout: u32,
    pub nat_udp_timeout: u32,
}

/// `Backend::state`: not in use, or removed / marked down. Flows pinned to
/// it are re-picked on their next packet.
pub const BACKEND_DOWN: u32 = 0;
/// In the Maglev table: takes new flows and keeps established ones.
pub const BACKEND_ACTIVE: u32 = 1;
/// Out of the Maglev table, but established flows keep using it.
pub const BACKEND_DRAINING: u32 = 2;

/// The next-hop MAC of a backend whose neighbour is not resolved yet: its
/// packets go to the kernel (`Reason::PassNoNeigh`).
pub const UNRESOLVED_MAC: [u8; 6] = [0; 6];

/// A backend as the datapath sees it: where to send its frames.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Address, wire bytes; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u32; 4],
    /// The next hop's MAC (the backend's own on an L2 segment); all zero
    /// while the neighbour is unresolved.
    pub dst_mac: [u8; 6],
    /// The egress interface's MAC.
    pub src_mac: [u8; 6],
    /// Egress interface.
    pub ifindex: u32,
    /// `BACKEND_*`.
    pub state: u32,
    /// NAT: the load balancer's address the backend sees as source.
    pub snat_addr: [u32; 4],
    /// Id of the service the backend belongs to (a backend shared by two
    /// services has two ids). Lets a restarted daemon adopt backend ids, so
    /// flows pinned to them keep their backend.
    pub service: u32,
    /// Backend port, network byte order (used by NAT services).
    pub port_be: u16,
    pub _pad: [u8; 2],
}

impl Backend {
    /// Whether flows pinned to this backend stay on it: active, or
    /// draining (draining keeps established flows). Anything else
    /// (removed, down) makes its flows re-pick.
    #[inline(always)]
    pub const fn is_live(&self) -> bool {
        self.state == BACKEND_ACTIVE || self.state == BACKEND_DRAINING
    }

    /// Whether the next hop's MAC is known, so frames can be sent to it.
    #[inline(always)]
    pub fn next_hop_resolved(&self) -> bool {
        self.dst_mac != UNRESOLVED_MAC
    }
}

/// The first three words of an IPv4 address as the maps store it
/// (`::ffff:a.b.c.d`, wire bytes read as native-endian words).
pub const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_be(0x0000_ffff)];

/// Whether `addr` (key words) is IPv4-mapped, that is how the maps store
/// an IPv4 address. Word by word: a slice comparison would be a `bcmp`
/// call, which BPF has not.
#[inline(always)]
pub fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    let [a0, a1, a2] = V4_MAPPED_PREFIX;
    addr[0] == a0 && addr[1] == a1 && addr[2] == a2
}

/// Connection-tracking key: the packet's 5-tuple as received.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `Flow::flags`: the pin was made by a peer and replicated here; this
/// node has not carried the flow itself (yet).
pub const FLOW_F_REPLICATED: u32 = 1;
/// `Flow::flags`: the client sent a second packet after its first: the
/// backend answered (counted once, in `Signals::confirmed`).
pub const FLOW_F_CONFIRMED: u32 = 2;
/// `Flow::flags`: the flow was moved to another backend because its
/// client retransmitted its SYN unanswered; it is not moved again.
pub const FLOW_F_RETRIED: u32 = 4;

/// A SYN of a flow still unanswered this long after it was opened is the
/// client's retransmission (Linux retransmits after 1 s at first; no stack
/// before 200 ms), not a duplicate: the flow moves to another backend.
pub const SYN_RETRANSMITTED_NS: u64 = 500_000_000;

/// Connection-tracking value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    /// The backend this flow is pinned to.
    pub backend: u32,
    /// `FLOW_F_*` bits.
    pub flags: u32,
    /// `bpf_ktime_get_coarse_ns` when the flow was pinned.
    pub opened_ns: u64,
}

/// `NatFwd::flags` / `NatRev::flags`: the flow saw a FIN or RST; it
/// expires after the short closing timeout.
pub const NAT_F_CLOSING: u16 = 1;
/// `NatFwd::flags` / `NatRev::flags`: the backend has answered; the flow
/// has the service's full timeout from then on.
pub const NAT_F_ANSWERED: u16 = 2;
/// `NatFwd::flags`: the backend refused the flow's SYN (the RST was not
/// passed on): the client's next SYN goes to another backend.
pub const NAT_F_REFUSED: u16 = 4;
/// `NatFwd::flags`: the flow was moved to another backend once already;
/// it is not moved again (a second refusal reaches the client).
pub const NAT_F_RETRIED: u16 = 8;
/// `NatFwd::flags` / `NatRev::flags`: the translation was made by a
/// cluster peer and replicated here (docs/cluster.md). Its reply entry
/// learns the way back to the client from the kernel's routing table on
/// its first reply (`NatRev::ifindex` is 0 until then).
pub const NAT_F_REPLICATED: u16 = 16;
/// `NatFwd::flags` / `NatRev::flags`: the entry's `seq` holds its sender's
/// highest TCP sequence number (see [`nat_track_seq`]). Not set in an
/// entry replicated from a peer until its first segment here.
pub const NAT_F_SEQ: u16 = 32;

/// How far, either way, a TCP segment's sequence number may be from the
/// highest its sender was seen using for the segment to count as that
/// sender's: only such a FIN or RST closes a NAT flow. Without it, a
/// stranger spoofing a client's 5-tuple (its address known, its port
/// guessed: one segment per port) cut every connection of that client
/// idle for longer than `tcp_closing_timeout`; now a blind guess needs
/// 2^32 / 2^21 = 2,048 segments per port. Wider than one segment plus the
/// reordering between a sender's segments; a sender's own FIN or RST is
/// within it (a RST answering a segment carries that segment's ACK, up to
/// the data in flight behind). One ignored is harmless: the flow keeps its
/// idle timeout instead of the closing one.
pub const NAT_SEQ_WINDOW: u32 = 1 << 20;

/// Tracks a TCP segment's sequence number `seq` in an entry's `flags`
/// ([`NAT_F_SEQ`]) and `highest`: whether it is plausibly the sender's
/// (the first one tracked always is). Only such a segment moves `highest`
/// forward, so a stranger's segment far away cannot carry the window to
/// where its next one would be taken for the sender's.
#[inline(always)]
pub fn nat_track_seq(flags: &mut u16, highest: &mut u32, seq: u32) -> bool {
    if *flags & NAT_F_SEQ == 0 {
        *flags |= NAT_F_SEQ;
        *highest = seq;
        return true;
    }
    let ahead = seq.wrapping_sub(*highest);
    if ahead <= NAT_SEQ_WINDOW {
        *highest = seq;
        true
    } else {
        // Behind (a retransmission, a reordered segment) by at most the
        // window: the sender's, but `highest` stays.
        ahead >= NAT_SEQ_WINDOW.wrapping_neg()
    }
}

/// Idle timeout, seconds, of a NAT flow the backend has not answered yet
/// (a SYN, a first datagram), like netfilter's SYN_SENT/UNREPLIED states
/// but short: a flood of spoofed SYNs holds the source ports for seconds,
/// not for the established timeout.
pub const NAT_UNANSWERED_TIMEOUT_S: u32 = 5;
/// Unanswered NAT flows one source address may hold at once (roughly:
/// the count resets once the source made no new flow for the unanswered
/// timeout). A source over it gets `drop_nat_full` for its new flows.
pub const NAT_UNANSWERED_PER_SOURCE: u32 = 1024;
/// Source addresses tracked for that bound (LRU).
pub const MAX_NAT_SOURCES: u32 = 65536;

/// SNAT addresses of one NAT service at most.
pub const MAX_SNAT_POOL: usize = 8;

/// The SNAT addresses a NAT service translates to, by service id: a new
/// flow gets a free (address, port) of `addrs[..count]` x the port range,
/// so capacity grows with the addresses. `count` 0: the backend's own
/// `snat_addr` alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatPool {
    pub count: u32,
    pub _pad: u32,
    pub addrs: [[u32; 4]; MAX_SNAT_POOL],
}

/// Unanswered NAT flows of one source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatSource {
    pub unanswered: u32,
    pub _pad: u32,
    /// When the source last made a NAT flow.
    pub last_ns: u64,
}

/// Whether a NAT entry last seen at `last_seen_ns` is past its idle
/// timeout at `now_ns` (both `bpf_ktime_get_coarse_ns`). A flow is dead
/// once both its entries are (a missing partner counts as expired), and
/// the datapath never brings a dead flow back: no packet refreshes it.
#[inline(always)]
pub const fn nat_expired(last_seen_ns: u64, timeout_s: u32, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) > timeout_s as u64 * 1_000_000_000
}

/// Who may remove a dead flow's entries depends on how long it has been
/// dead, so the datapath and the daemon's sweeper never act on the same
/// entry: the datapath may reuse a dead flow's port (and drop its entries)
/// for this long after its timeout (short: dead entries hold table space
/// until someone removes them) ...
pub const NAT_RECLAIM_WINDOW_S: u32 = 10;
/// ... then nobody touches it for this long (more than any datapath run
/// can take between reading a clock and writing an entry) ...
pub const NAT_SWEEP_MARGIN_S: u32 = 2;

/// ... and from then on only the sweeper deletes it.
#[inline(always)]
pub const fn nat_sweepable(last_seen_ns: u64, timeout_s: u32, now_ns: u64) -> bool {
    let after = timeout_s.saturating_add(NAT_RECLAIM_WINDOW_S + NAT_SWEEP_MARGIN_S);
    nat_expired(last_seen_ns, after, now_ns)
}

/// NAT state of a flow, looked up by the client's 5-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatFwd {
    pub backend: u32,
    /// The allocated source port, network byte order.
    pub nat_port_be: u16,
    pub flags: u16,
    /// `bpf_ktime_get_coarse_ns` of the last packet.
    pub last_seen_ns: u64,
    /// Idle timeout now in force, seconds.
    pub timeout_s: u32,
    /// The highest sequence number of the client's segments (TCP, with
    /// [`NAT_F_SEQ`]): see [`nat_track_seq`].
    pub seq: u32,
    /// The SNAT address the flow is translated to: the one of the node
    /// that made the translation, which a replicated flow keeps.
    pub snat_addr: [u32; 4],
}

/// NAT state of a flow, looked up by the backend's reply 5-tuple
/// (backend:port -> SNAT address:allocated port): how to send it back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatRev {
    pub client: [u32; 4],
    pub vip: [u32; 4],
    /// The client-side next hop (the original frame's source MAC) and our
    /// MAC on that side (its destination MAC).
    pub client_mac: [u8; 6],
    pub lb_mac: [u8; 6],
    pub client_port_be: u16,
    pub vip_port_be: u16,
    /// The interface the client's packets came in on; 0 in a replicated
    /// entry until its first reply looked the way to the client up.
    pub ifindex: u32,
    pub flags: u16,
    pub _pad: u16,
    pub last_seen_ns: u64,
    pub timeout_s: u32,
    /// The highest sequence number of the backend's segments (TCP, with
    /// [`NAT_F_SEQ`]): see [`nat_track_seq`].
    pub seq: u32,
}

impl NatFwd {
    /// Past its idle timeout at `now_ns` (see [`nat_expired`]).
    #[inline(always)]
    pub const fn expired(&self, now_ns: u64) -> bool {
        nat_expired(self.last_seen_ns, self.timeout_s, now_ns)
    }

    /// Whether `reply_key` (a `NatRev` key: backend -> SNAT address and
    /// port) is this translation's reply side. A reply entry's client key
    /// alone does not say so: the client may have made a new translation
    /// with the same 5-tuple since.
    #[inline(always)]
    pub fn owns(&self, reply_key: &FlowKey) -> bool {
        self.nat_port_be == reply_key.dport_be && self.snat_addr == reply_key.dst
    }

    /// Only the sweeper may delete this entry now (see [`nat_sweepable`]).
    #[inline(always)]
    pub const fn sweepable(&self, now_ns: u64) -> bool {
        nat_sweepable(self.last_seen_ns, self.timeout_s, now_ns)
    }
}

/// Whether a flow's partner entry (looked up by key, `None` if missing)
/// counts as expired at `now_ns`.
#[inline(always)]
pub fn nat_partner_expired(partner: Option<&NatFwd>, reply_key: &FlowKey, now_ns: u64) -> bool {
    partner.is_none_or(|f| !f.owns(reply_key) || f.expired(now_ns))
}

impl NatRev {
    /// Past its idle timeout at `now_ns` (see [`nat_expired`]).
    #[inline(always)]
    pub const fn expired(&self, now_ns: u64) -> bool {
        nat_expired(self.last_seen_ns, self.timeout_s, now_ns)
    }

    /// The datapath may reuse this reply entry's port: its flow is dead
    /// (`partner_expired`: see [`nat_partner_expired`]) and has not been
    /// for longer than [`NAT_RECLAIM_WINDOW_S`].
    #[inline(always)]
    pub const fn reclaimable(&self, partner_expired: bool, now_ns: u64) -> bool {
        let window = self.timeout_s.saturating_add(NAT_RECLAIM_WINDOW_S);
        partner_expired && self.expired(now_ns) && !nat_expired(self.last_seen_ns, window, now_ns)
    }

    /// Only the sweeper may delete this entry now (see [`nat_sweepable`]).
    #[inline(always)]
    pub const fn sweepable(&self, now_ns: u64) -> bool {
        nat_sweepable(self.last_seen_ns, self.timeout_s, now_ns)
    }

    /// The client-side key (the `NatFwd` entry's) of the flow this reply
    /// entry belongs to.
    #[inline(always)]
    pub const fn client_key(&self, proto: u8) -> FlowKey {
        FlowKey {
            src: self.client,
            dst: self.vip,
            sport_be: self.client_port_be,
            dport_be: self.vip_port_be,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Datapath-wide settings, one value at index 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Globals {
    /// Non-zero when some service is in NAT mode: only then do packets
    /// that match no service pay a reverse NAT look-up.
    pub nat_enabled: u32,
    /// Non-zero when flows are replicated to cluster peers: only then is
    /// a pinned flow reported (`replication`).
    pub replicate: u32,
}

/// Packet, byte and new-flow counters (per CPU in the maps; summed by
/// userspace).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded (whole frames, as received).
    pub bytes: u64,
    /// Flows whose first packet was forwarded: DSR flows pinned in the flow
    /// table (`flow_new`) and NAT translations made (`nat_new`).
    pub new_flows: u64,
}

impl core::ops::Add for Counters {
    type Output = Self;

    /// Two CPUs' counters together.
    fn add(self, o: Self) -> Self {
        Self {
            packets: self.packets + o.packets,
            bytes: self.bytes + o.bytes,
            new_flows: self.new_flows + o.new_flows,
        }
    }
}

/// What a backend's traffic says about it, for the daemon's passive
/// failure detection (docs/operations.md, "Passive detection"): per CPU, per backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Signals {
    /// New flows: `Counters::new_flows` again, so that the detector reads
    /// one map, not two (at 10,000 backends each read is most of its cost).
    pub opened: u64,
    /// New flows that got an answer: DSR, the client's second packet (it
    /// got the backend's SYN-ACK); NAT, the backend's first reply.
    pub confirmed: u64,
    /// NAT: the backend's RST to a flow it never answered.
    pub refused: u64,
    /// A SYN again for a flow still unanswered: the client retransmits.
    pub syn_retransmits: u64,
}

impl core::ops::Add for Signals {
    type Output = Self;

    /// Two CPUs' signals together.
    fn add(self, o: Self) -> Self {
        Self {
            opened: self.opened + o.opened,
            confirmed: self.confirmed + o.confirmed,
            refused: self.refused + o.refused,
            syn_retransmits: self.syn_retransmits + o.syn_retransmits,
        }
    }
}

/// Why the datapath did what it did with a packet: one per-CPU counter each.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed.
    PassNotIp = 0,
    /// IP but not addressed to a service: passed.
    PassNotService,
    /// Truncated or malformed headers: passed.
    PassMalformed,
    /// IPv4 fragment to a VIP: passed (see docs/datapath.md).
    PassFragment,
    /// IPv6 with extension headers before L4 to a VIP: passed.
    PassIpv6Ext,
    /// The chosen backend's next hop is not resolved: passed to the kernel.
    PassNoNeigh,
    /// The service has no backend taking new flows: dropped.
    DropNoBackend,
    /// Forwarded with XDP_TX (same interface).
    Tx,
    /// Forwarded with XDP_REDIRECT (another interface).
    Redirect,
    /// A new flow got a backend from the Maglev table.
    FlowNew,
    /// A packet matched an established flow.
    FlowHit,
    /// An established flow's backend was gone; the flow was re-picked.
    FlowRepick,
    /// The redirect to another interface failed: dropped.
    DropRedirect,
    /// NAT: a new flow was translated (backend picked, port allocated).
    NatNew,
    /// NAT: a reply was translated back to the client.
    NatReply,
    /// NAT: no free source port or a full NAT table: new flow dropped.
    DropNatFull,
    /// NAT: an ICMP error about a translated flow was translated back.
    NatIcmp,
    /// Destination MAC is not the receiving interface's (nor a configured
    /// extra MAC): passed untouched, never balanced.
    PassNotForUs,
    /// NAT: a backend refused a new flow (RST to its SYN, counted on the
    /// dropped RST) or left it unanswered until the client retransmitted
    /// its SYN (counted on that SYN, which went to another backend).
    NatRetry,
    /// NAT: a reply to a translation replicated from a cluster peer, with
    /// no route to its client here (is forwarding off on the interface?):
    /// translated and passed to the kernel.
    PassNoRoute,
    /// NAT: a TCP segment other than a SYN of a flow with no translation
    /// (one whose translation a cluster peer has not replicated here yet,
    /// or a stray or flooded ACK): dropped, so no port is spent on it and
    /// the client's retransmission finds the translation.
    DropNatNoFlow,
    /// DSR: a flow whose client retransmitted its SYN unanswered moved to
    /// another backend (once).
    FlowRetry,
    /// DSR: an ICMP error about a flow (a router's "fragmentation needed"
    /// about a backend's reply, sent to the VIP) was sent to the flow's
    /// backend.
    DsrIcmp,
}

/// Number of `Reason` counters.
pub const REASON_COUNT: u32 = 23;

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::PassNotIp,
        Reason::PassNotService,
        Reason::PassMalformed,
        Reason::PassFragment,
        Reason::PassIpv6Ext,
        Reason::PassNoNeigh,
        Reason::DropNoBackend,
        Reason::Tx,
        Reason::Redirect,
        Reason::FlowNew,
        Reason::FlowHit,
        Reason::FlowRepick,
        Reason::DropRedirect,
        Reason::NatNew,
        Reason::NatReply,
        Reason::DropNatFull,
        Reason::NatIcmp,
        Reason::PassNotForUs,
        Reason::NatRetry,
        Reason::PassNoRoute,
        Reason::DropNatNoFlow,
        Reason::FlowRetry,
        Reason::DsrIcmp,
    ];

    /// Stable name used by the CLI, logs and tests.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotService => "pass_not_service",
            Reason::PassMalformed => "pass_malformed",
            Reason::PassFragment => "pass_fragment",
            Reason::PassIpv6Ext => "pass_ipv6_ext",
            Reason::PassNoNeigh => "pass_no_neigh",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::Tx => "tx",
            Reason::Redirect => "redirect",
            Reason::FlowNew => "flow_new",
            Reason::FlowHit => "flow_hit",
            Reason::FlowRepick => "flow_repick",
            Reason::DropRedirect => "drop_redirect",
            Reason::NatNew => "nat_new",
            Reason::NatReply => "nat_reply",
            Reason::DropNatFull => "drop_nat_full",
            Reason::NatIcmp => "nat_icmp",
            Reason::PassNotForUs => "pass_not_for_us",
            Reason::NatRetry => "nat_retry",
            Reason::PassNoRoute => "pass_no_route",
            Reason::DropNatNoFlow => "drop_nat_no_flow",
            Reason::FlowRetry => "flow_retry",
            Reason::DsrIcmp => "dsr_icmp",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all types are repr(C), Copy, and have no padding holes (checked
    // by the size assertions below), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::NatFwd {}
    unsafe impl aya::Pod for super::NatRev {}
    unsafe impl aya::Pod for super::Globals {}
    unsafe impl aya::Pod for super::NatSource {}
    unsafe impl aya::Pod for super::SnatPool {}
    unsafe impl aya::Pod for super::Signals {}
}

// No holes: each size is the sum of its fields.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<ServiceKey>() == 16 + 2 + 1 + 1);
    assert!(size_of::<Service>() == 16 + 2 + 2 + 12);
    assert!(size_of::<Backend>() == 16 + 6 + 6 + 4 + 4 + 16 + 4 + 2 + 2);
    assert!(size_of::<NatFwd>() == 4 + 2 + 2 + 8 + 4 + 4 + 16);
    assert!(size_of::<NatRev>() == 16 + 16 + 6 + 6 + 2 + 2 + 4 + 2 + 2 + 8 + 4 + 4);
    assert!(size_of::<Globals>() == 4 + 4);
    assert!(size_of::<NatSource>() == 4 + 4 + 8);
    assert!(size_of::<Signals>() == 8 * 4);
    assert!(size_of::<FlowKey>() == 16 + 16 + 2 + 2 + 1 + 3);
    assert!(size_of::<Flow>() == 4 + 4 + 8);
    assert!(size_of::<Counters>() == 8 + 8 + 8);
    assert!(Reason::ALL.len() == REASON_COUNT as usize);
};
