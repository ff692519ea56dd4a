//! Half-open TCP checks: a SYN sent from a raw socket, answered by a
//! SYN-ACK (something listens: healthy) or a reset (connection refused).
//! This host's kernel has no socket for the answer, so it resets the
//! backend's half of the handshake itself: the backend's application never
//! sees a connection, and nothing is left in TIME_WAIT.
//!
//! Why: a full connect makes, registers, connects, closes and deregisters
//! a socket per check. At 10,000 backends checked every second, a bare loop
//! of such connects cost 17.9 % of a core on this project's test machine, a
//! loop of these SYNs 5.6 %, and the whole daemon, sending its SYNs and
//! reading the answers in batches, 7.7 % (bench group control-plane).
//!
//! The answer is recognised by its source (the backend), destination port
//! (one port per address family, held by a socket bound to it and never
//! listening, so no connection of this host ever uses it) and
//! acknowledgement number (the SYN's random sequence number plus one). A
//! classic BPF filter on each raw socket keeps every other TCP segment of
//! this host out of it.
//!
//! Needs `CAP_NET_RAW`; without it the checker connects fully.

use std::{
    collections::{hash_map::Entry, HashMap},
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use etherparse::{TcpHeader, TcpOptionElement};
use socket2::{Protocol, SockFilter, Socket, Type};
use tokio::{
    runtime::Handle,
    sync::{oneshot, Notify},
    time::{self, MissedTickBehavior},
};

use super::{io_reason, lock, prefetch, seed, Deadline, Prober, Step, XorShift64};

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The SYN's TCP header: 20 bytes and an MSS option, as a real client's
/// SYN carries one (a SYN without options is valid, but unusual enough
/// that a middlebox may drop it).
const SYN_LEN: usize = 24;
const MSS: u16 = 1460;

/// How often answers are read, and overdue checks timed out, while any
/// check waits. Not on readiness: the answers to one probe-grid step
/// arrive within a moment of each other, and reading them together wakes
/// the thread once, not once per answer; and one timer for all checks
/// replaces one per check. Small beside a check's timeout, which ends up
/// to this much late.
const READ_EVERY: Duration = Duration::from_millis(5);

/// Answers read in one system call at most (`recvmmsg`).
const READ_BATCH: usize = 64;
/// What is read of an answer: room for an IPv4 header with options (60
/// bytes) and the 14 bytes of TCP header that [`read_answer`] reads.
const ANSWER_BYTES: usize = 128;

/// A backend, by address and port. Not `SocketAddr`: an IPv6 answer's
/// scope id need not match the one the target was written with.
type Peer = (IpAddr, u16);

/// The raw sockets and the checks waiting for an answer.
pub struct HalfOpen {
    v4: Family,
    /// `None` on a host without IPv6 (where no IPv6 backend is reachable
    /// either).
    v6: Option<Family>,
    state: Mutex<State>,
    /// Wakes the reader when the first SYN goes out after a quiet spell.
    sent: Notify,
}

/// One address family's sockets.
struct Family {
    /// Non-blocking, and read on a timer (see [`READ_EVERY`]).
    raw: OwnedFd,
    /// Holds `port`: bound, never listening.
    _port_holder: OwnedFd,
    port: u16,
}

struct State {
    waiting: HashMap<Peer, InFlight>,
    /// The source address this host uses towards each IPv4 backend, which
    /// the SYN's checksum covers (for IPv6 the kernel computes it). Asked
    /// of the routing table once per backend, and again after a check of it
    /// timed out: a changed route or address costs one check at most.
    sources: HashMap<Ipv4Addr, Ipv4Addr>,
    /// Connected to a backend to learn the source address towards it.
    router: UdpSocket,
    rng: XorShift64,
}

/// The SYNs of one batch of checks, made under the lock and then sent
/// together, one system call per address family (`sendmmsg`): at 10,000
/// checks a second, one `sendto` each cost more in system-call overhead
/// than the check's own user-space work.
#[derive(Default)]
struct Outbox {
    v4: Vec<Syn<libc::sockaddr_in>>,
    v6: Vec<Syn<libc::sockaddr_in6>>,
}

/// A SYN and where it goes.
struct Syn<A> {
    segment: [u8; SYN_LEN],
    to: A,
    peer: Peer,
}

/// Where a check's result goes.
pub(super) enum Waiter {
    /// A probe awaiting it ([`HalfOpen::probe`]).
    Task(oneshot::Sender<Result<(), String>>),
    /// A scheduled check, told as soon as the answer is read: no task, no
    /// channel and no wake-up per check. Weak: its target holds this
    /// checker, and a target removed meanwhile needs no result.
    Check(Weak<dyn Check>),
}

/// A scheduled check's end.
pub(super) trait Check: Send + Sync {
    /// The check's result, and how long it took.
    fn answered(&self, result: Result<(), String>, took: Duration);
}

impl Waiter {
    fn finish(self, result: Result<(), String>, took: Duration) {
        match self {
            Waiter::Task(tx) => drop(tx.send(result)),
            Waiter::Check(check) => {
                if let Some(check) = check.upgrade() {
                    check.answered(result, took);
                }
            }
        }
    }

    /// Nobody awaits the result any more.
    fn abandoned(&self) -> bool {
        matches!(self, Waiter::Task(tx) if tx.is_closed())
    }
}

/// A check waiting for an answer (since its deadline's start).
struct Pending {
    deadline: Deadline,
    waiter: Waiter,
}

/// The SYN sent to a backend, and the checks waiting for its answer. Two
/// checks of one backend at once (two services, or a suspicion's probe
/// during a scheduled one) share one SYN: a second SYN from the same port
/// would hit the backend's half-open connection of the first and be
/// answered with a bare ACK instead.
struct InFlight {
    seq: u32,
    waiters: Vec<Pending>,
}

/// What became of a SYN.
#[derive(Clone, Copy)]
enum Answer {
    Listening,
    Refused,
    TimedOut,
}

impl Answer {
    /// The check's result, worded as a connect's would be: `connect
    /// 10.0.0.1:80: connection refused`, `connect 10.0.0.1:80: timed out
    /// after 500ms`.
    fn result(self, target: SocketAddr, deadline: Deadline) -> Result<(), String> {
        let step = Step::Connect(target);
        match self {
            Answer::Listening => Ok(()),
            Answer::Refused => Err(format!("{step}: connection refused")),
            Answer::TimedOut => Err(format!("{step}: timed out after {:?}", deadline.timeout)),
        }
    }
}

impl HalfOpen {
    /// Opens the raw sockets and starts reading their answers on
    /// `runtime`.
    ///
    /// # Errors
    ///
    /// Without `CAP_NET_RAW`, or when a socket cannot be made.
    pub fn start(runtime: &Handle) -> io::Result<Arc<Self>> {
        let half_open = Arc::new(Self {
            v4: Family::open(libc::AF_INET)?,
            v6: Family::open(libc::AF_INET6).ok(),
            state: Mutex::new(State {
                waiting: HashMap::new(),
                sources: HashMap::new(),
                router: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?,
                rng: XorShift64::new(seed(&"half-open SYNs")),
            }),
            sent: Notify::new(),
        });
        runtime.spawn(Arc::clone(&half_open).read_answers());
        Ok(half_open)
    }

    /// Checks that something listens on `target`, within `deadline`. The
    /// errors read as a connect's would (see [`Answer::result`]).
    pub(super) async fn probe(&self, target: SocketAddr, deadline: Deadline) -> Result<(), String> {
        let (tx, result) = oneshot::channel();
        self.check([(target, deadline, Waiter::Task(tx))]);
        // Dropped unanswered: the checker is going away.
        result
            .await
            .unwrap_or_else(|_| Answer::TimedOut.result(target, deadline))
    }

    /// Starts checks, each of a target within a deadline; each result goes
    /// to its waiter.
    pub(super) fn check(&self, checks: impl IntoIterator<Item = (SocketAddr, Deadline, Waiter)>) {
        let mut failed = Vec::new();
        let mut outbox = Outbox::default();
        {
            let state = &mut *lock(&self.state);
            let quiet = state.waiting.is_empty();
            for (target, deadline, waiter) in checks {
                let peer = (target.ip(), target.port());
                let pending = Pending { deadline, waiter };
                if let Some(flight) = state.waiting.get_mut(&peer) {
                    flight.waiters.push(pending);
                    continue;
                }
                let seq = state.rng.next_u64() as u32;
                match self.make_syn(state, &mut outbox, target, seq) {
                    Ok(()) => {
                        let waiters = vec![pending];
                        state.waiting.insert(peer, InFlight { seq, waiters });
                    }
                    Err(e) => failed.push((target, e, vec![pending])),
                }
            }
            for (peer, e) in self.send(&outbox) {
                if let Some(flight) = state.waiting.remove(&peer) {
                    failed.push((SocketAddr::new(peer.0, peer.1), e, flight.waiters));
                }
            }
            if quiet && !state.waiting.is_empty() {
                self.sent.notify_one();
            }
        }
        // Told without the lock: a check's recording takes its own.
        for (target, e, waiters) in failed {
            let error = format!("{}: {}", Step::Connect(target), io_reason(&e));
            for p in waiters {
                p.waiter.finish(Err(error.clone()), Duration::ZERO);
            }
        }
    }

    /// Backends with a SYN unanswered.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        lock(&self.state).waiting.len()
    }

    /// Times out the checks whose deadline has passed. A backend that
    /// did not answer has the source address towards it asked for again
    /// next time.
    fn expire(&self, now: time::Instant) {
        let mut late = Vec::new();
        {
            let state = &mut *lock(&self.state);
            let sources = &mut state.sources;
            state.waiting.retain(|peer, flight| {
                let overdue = |p: &Pending| p.deadline.at <= now || p.waiter.abandoned();
                if flight.waiters.iter().any(overdue) {
                    let (over, waiting) = std::mem::take(&mut flight.waiters)
                        .into_iter()
                        .partition(overdue);
                    flight.waiters = waiting;
                    late.extend(over.into_iter().map(|p| (*peer, p)));
                    if let IpAddr::V4(ip) = peer.0 {
                        sources.remove(&ip);
                    }
                }
                !flight.waiters.is_empty()
            });
        }
        // Told without the lock: a check's recording takes its own.
        for ((ip, port), p) in late {
            let result = Answer::TimedOut.result(SocketAddr::new(ip, port), p.deadline);
            p.waiter.finish(result, now - p.deadline.start());
        }
    }

    /// Makes the SYN of a check of `target` and puts it in `outbox`.
    fn make_syn(
        &self,
        state: &mut State,
        outbox: &mut Outbox,
        target: SocketAddr,
        seq: u32,
    ) -> io::Result<()> {
        let peer = (target.ip(), target.port());
        match target {
            SocketAddr::V4(to) => {
                let source = match state.sources.get(to.ip()) {
                    Some(&source) => source,
                    None => {
                        state.router.connect(to)?;
                        let IpAddr::V4(source) = state.router.local_addr()?.ip() else {
                            unreachable!("an IPv4 socket has an IPv4 address")
                        };
                        state.sources.insert(*to.ip(), source);
                        source
                    }
                };
                let segment = syn(self.v4.port, to.port(), seq, Some((source, *to.ip())));
                let to = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(to.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                outbox.v4.push(Syn { segment, to, peer });
            }
            SocketAddr::V6(to) => {
                let v6 = self
                    .v6
                    .as_ref()
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::EAFNOSUPPORT))?;
                // The kernel fills in the checksum (IPV6_CHECKSUM).
                let segment = syn(v6.port, to.port(), seq, None);
                let to = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: 0,
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: to.ip().octets(),
                    },
                    sin6_scope_id: to.scope_id(),
                };
                outbox.v6.push(Syn { segment, to, peer });
            }
        }
        Ok(())
    }

    /// Sends `outbox`; returns the SYNs the kernel refused, and why.
    fn send(&self, outbox: &Outbox) -> Vec<(Peer, io::Error)> {
        let mut refused = Vec::new();
        send_all(&self.v4.raw, &outbox.v4, &mut refused);
        if let Some(v6) = &self.v6 {
            send_all(&v6.raw, &outbox.v6, &mut refused);
        }
        refused
    }

    /// Reads both families' answers, and times out overdue checks, every
    /// [`READ_EVERY`] while a check waits; for as long as the runtime runs.
    async fn read_answers(self: Arc<Self>) {
        let mut inbox = Inbox::new();
        let mut ticks = time::interval(READ_EVERY);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            if lock(&self.state).waiting.is_empty() {
                self.sent.notified().await;
                ticks.reset();
            }
            ticks.tick().await;
            for family in std::iter::once(&self.v4).chain(&self.v6) {
                // Until the socket is empty; other errors (ENOBUFS and the
                // like) lose answers, and their checks time out.
                while let Ok(read) = inbox.read(&family.raw) {
                    // An IPv4 raw socket reads the IP header too, an IPv6 one
                    // the TCP segment alone.
                    let segments = inbox.datagrams(read).filter_map(|(datagram, from)| {
                        let segment = match from {
                            IpAddr::V4(_) => ipv4_payload(datagram)?,
                            IpAddr::V6(_) => datagram,
                        };
                        Some((segment, from))
                    });
                    self.answer(family.port, segments);
                    if read < READ_BATCH {
                        break;
                    }
                }
            }
            self.expire(time::Instant::now());
        }
    }

    /// Completes the checks that `segments` (each from its source address,
    /// to `port`) answer.
    fn answer<'a>(&self, port: u16, segments: impl Iterator<Item = (&'a [u8], IpAddr)>) {
        let mut answered = Vec::new();
        {
            let state = &mut *lock(&self.state);
            for (segment, from) in segments {
                let Some((peer, ack, answer)) = read_answer(segment, from, port) else {
                    continue;
                };
                // Ours only if it acknowledges the SYN in flight.
                let Entry::Occupied(flight) = state.waiting.entry(peer) else {
                    continue;
                };
                if flight.get().seq.wrapping_add(1) != ack {
                    continue;
                }
                let target = SocketAddr::new(peer.0, peer.1);
                let waiters = flight.remove().waiters;
                answered.extend(waiters.into_iter().map(|p| (target, answer, p)));
            }
        }
        // Each check's target is touched once per interval, so its memory
        // is cold by now: fetch all of it at once, not one target after
        // the other. (A scheduled check is a `Prober`.)
        for (_, _, p) in &answered {
            if let Waiter::Check(check) = &p.waiter {
                prefetch(check, size_of::<Prober>());
            }
        }
        // Told without the lock: a check's recording takes its own.
        let now = time::Instant::now();
        for (target, answer, p) in answered {
            let took = now - p.deadline.start();
            p.waiter.finish(answer.result(target, p.deadline), took);
        }
    }
}

/// The backend, the acknowledgement number and what it answered, if
/// `segment` from `from` is a SYN-ACK or a reset to `port`.
fn read_answer(segment: &[u8], from: IpAddr, port: u16) -> Option<(Peer, u32, Answer)> {
    let tcp = segment.get(..14)?;
    let source_port = u16::from_be_bytes([tcp[0], tcp[1]]);
    let dest_port = u16::from_be_bytes([tcp[2], tcp[3]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    let flags = tcp[13];
    if dest_port != port {
        return None;
    }
    let answer = if flags & (SYN | ACK | RST) == SYN | ACK {
        Answer::Listening
    } else if flags & (RST | ACK) == RST | ACK {
        Answer::Refused
    } else {
        return None;
    };
    Some(((from, source_port), ack, answer))
}

impl Family {
    fn open(family: libc::c_int) -> io::Result<Self> {
        let (port_holder, port) = hold_port(family)?;
        let raw = Socket::new(family.into(), Type::RAW.nonblocking(), Some(Protocol::TCP))?;
        let fd = raw.as_raw_fd();
        if family == libc::AF_INET6 {
            set_option(fd, libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, 16)?;
        } else {
            // Don't fragment, as a TCP socket's SYN: a raw socket's default
            // lets its packets be fragmented, so each gets an IP ID from
            // the kernel's shared generator (a hash and an atomic on a
            // table of counters, 4 % of the checks' CPU at 10,000 a second).
            set_option(
                fd,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DO,
            )?;
        }
        attach_filter(&raw, family, port)?;
        // A second of answers at 10,000 checks a second arrives in bursts
        // of a probe-grid step's worth; the default buffer holds ~300.
        raw.set_recv_buffer_size(1 << 20)?;
        Ok(Self {
            raw: raw.into(),
            _port_holder: port_holder,
            port,
        })
    }
}

/// A TCP socket bound to a free port of `family`, never listening, and the
/// port.
fn hold_port(family: libc::c_int) -> io::Result<(OwnedFd, u16)> {
    let socket = Socket::new(family.into(), Type::STREAM, None)?;
    let any = if family == libc::AF_INET6 {
        socket.set_only_v6(true)?;
        IpAddr::from(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::from(Ipv4Addr::UNSPECIFIED)
    };
    // Port 0: the kernel picks a free port.
    socket.bind(&SocketAddr::new(any, 0).into())?;
    let bound = socket.local_addr()?.as_socket();
    let port = bound.expect("a TCP socket has an IP address").port();
    Ok((socket.into(), port))
}

/// Lets only TCP segments to `port` into the raw `socket`: without it,
/// the socket would get a copy of every TCP segment this host receives.
/// An IPv4 raw socket's filter sees the IP header first, an IPv6 one's the
/// TCP header.
fn attach_filter(socket: &Socket, family: libc::c_int, port: u16) -> io::Result<()> {
    let op = |code: u32, jt, jf, k| SockFilter::new(code as u16, jt, jf, k);
    let accept = op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX);
    let reject = op(libc::BPF_RET | libc::BPF_K, 0, 0, 0);
    let is_port = op(
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
        0,
        1,
        u32::from(port),
    );
    let mut program = if family == libc::AF_INET6 {
        // A = the destination port
        vec![op(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS, 0, 0, 2)]
    } else {
        vec![
            // X = the IP header's length; A = the destination port after it
            op(libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH, 0, 0, 0),
            op(libc::BPF_LD | libc::BPF_H | libc::BPF_IND, 0, 0, 2),
        ]
    };
    program.extend([is_port, accept, reject]);
    socket.attach_filter(&program)
}

/// A SYN from `source_port` to `dest_port` with sequence number `seq` and
/// an MSS option; checksummed for IPv4 `addresses` (source, destination),
/// left zero without (for IPv6 the kernel computes it).
fn syn(
    source_port: u16,
    dest_port: u16,
    seq: u32,
    addresses: Option<(Ipv4Addr, Ipv4Addr)>,
) -> [u8; SYN_LEN] {
    let mut header = TcpHeader::new(source_port, dest_port, seq, u16::MAX);
    header.syn = true;
    header
        .set_options(&[TcpOptionElement::MaximumSegmentSize(MSS)])
        .expect("an MSS option fits a TCP header");
    if let Some((source, dest)) = addresses {
        header.checksum = header
            .calc_checksum_ipv4_raw(source.octets(), dest.octets(), &[])
            .expect("a SYN without payload is small enough");
    }
    let mut segment = [0; SYN_LEN];
    segment.copy_from_slice(&header.to_bytes());
    segment
}

/// The TCP segment in an IPv4 packet as a raw socket reads it, if it is one.
fn ipv4_payload(packet: &[u8]) -> Option<&[u8]> {
    let header_len = usize::from(packet.first()? & 0x0f) * 4;
    (packet.get(9) == Some(&(libc::IPPROTO_TCP as u8))).then_some(())?;
    packet.get(header_len..)
}

/// Sets an int socket option (those socket2 lacks).
fn set_option(
    fd: i32,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the kernel reads an int from `value`, alive for the call.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Sends `syns` from `raw` in as few system calls as the kernel allows;
/// adds those it refused to `refused`.
fn send_all<A>(raw: &OwnedFd, syns: &[Syn<A>], refused: &mut Vec<(Peer, io::Error)>) {
    let mut iovecs: Vec<libc::iovec> = syns
        .iter()
        .map(|syn| libc::iovec {
            iov_base: syn.segment.as_ptr().cast_mut().cast(),
            iov_len: SYN_LEN,
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = syns
        .iter()
        .zip(&mut iovecs)
        .map(|(syn, iovec)| {
            // SAFETY: all-zero is a valid mmsghdr (no name, no control data).
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_name = (&raw const syn.to).cast_mut().cast();
            header.msg_hdr.msg_namelen = size_of::<A>() as libc::socklen_t;
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
            header
        })
        .collect();
    let mut next = 0;
    while next < headers.len() {
        let rest = &mut headers[next..];
        // SAFETY: every header points at its SYN, its address (an `A`, a
        // sockaddr of the socket's family) and its iovec, all alive for the
        // call.
        let sent = unsafe {
            libc::sendmmsg(
                raw.as_raw_fd(),
                rest.as_mut_ptr(),
                rest.len() as libc::c_uint,
                0,
            )
        };
        // The kernel stops at the first SYN it refuses and says how many it
        // sent before; sending from that one on gets its error.
        match usize::try_from(sent) {
            Ok(sent) if sent > 0 => next += sent,
            _ => {
                refused.push((syns[next].peer, io::Error::last_os_error()));
                next += 1;
            }
        }
    }
}

/// Buffers for up to [`READ_BATCH`] answers, read in one system call, and
/// the headers that point `recvmmsg` at them, built once.
struct Inbox(Box<Slots>);

struct Slots {
    headers: [libc::mmsghdr; READ_BATCH],
    iovecs: [libc::iovec; READ_BATCH],
    sources: [libc::sockaddr_storage; READ_BATCH],
    buffers: [[u8; ANSWER_BYTES]; READ_BATCH],
}

// SAFETY: the headers' pointers point into the same `Slots` only, which
// moves with the `Inbox` (only the box's pointer moves), so it can go to
// another thread whole.
unsafe impl Send for Inbox {}

impl Inbox {
    fn new() -> Self {
        // SAFETY: all-zero is a valid `Slots`: plain integers and null
        // pointers (no name, no data, no control data).
        let mut boxed: Box<Slots> = unsafe { Box::new_zeroed().assume_init() };
        // The pointers stay valid for the inbox's life: the slots are on the
        // heap, and never moved or freed before the inbox is dropped.
        let slots = &mut *boxed;
        for (i, header) in slots.headers.iter_mut().enumerate() {
            slots.iovecs[i] = libc::iovec {
                iov_base: slots.buffers[i].as_mut_ptr().cast(),
                iov_len: ANSWER_BYTES,
            };
            header.msg_hdr.msg_name = (&raw mut slots.sources[i]).cast();
            header.msg_hdr.msg_iov = &raw mut slots.iovecs[i];
            header.msg_hdr.msg_iovlen = 1;
        }
        Self(boxed)
    }

    /// Reads up to [`READ_BATCH`] datagrams from `raw`; how many.
    fn read(&mut self, raw: &OwnedFd) -> io::Result<usize> {
        // The kernel sets each length to the address it wrote (an IPv4
        // one's is too short for the next IPv6 read).
        for header in &mut self.0.headers {
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        // SAFETY: every header points at an iovec, a buffer and an address
        // of this inbox (see `Inbox::new`), valid for the lengths given; the
        // socket is non-blocking.
        let read = unsafe {
            libc::recvmmsg(
                raw.as_raw_fd(),
                self.0.headers.as_mut_ptr(),
                READ_BATCH as libc::c_uint,
                0,
                std::ptr::null_mut(),
            )
        };
        usize::try_from(read).map_err(|_| io::Error::last_os_error())
    }

    /// The first `read` datagrams (what [`Inbox::read`] returned): each
    /// one's bytes and source.
    fn datagrams(&self, read: usize) -> impl Iterator<Item = (&[u8], IpAddr)> {
        let slots = &*self.0;
        (0..read).map(move |i| {
            let length = slots.headers[i].msg_len as usize;
            (&slots.buffers[i][..length], source(&slots.sources[i]))
        })
    }
}

/// The address in `from`, as `recvmmsg` wrote it.
fn source(from: &libc::sockaddr_storage) -> IpAddr {
    if i32::from(from.ss_family) == libc::AF_INET6 {
        // SAFETY: the kernel wrote a sockaddr_in6.
        let a = unsafe { &*std::ptr::from_ref(from).cast::<libc::sockaddr_in6>() };
        IpAddr::from(a.sin6_addr.s6_addr)
    } else {
        // SAFETY: the kernel wrote a sockaddr_in.
        let a = unsafe { &*std::ptr::from_ref(from).cast::<libc::sockaddr_in>() };
        // `s_addr` holds the address in network order: its bytes as stored.
        IpAddr::from(a.sin_addr.s_addr.to_ne_bytes())
    }
}

fn check(rc: i32) -> io::Result<i32> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, time::Duration};

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(200);

    fn deadline() -> Deadline {
        Deadline::after(time::Instant::now(), TIMEOUT)
    }

    #[tokio::test]
    async fn ipv6_backends_are_checked_too() {
        let half_open = HalfOpen::start(&Handle::current()).expect("raw sockets (as root)");
        let listener = TcpListener::bind("[::1]:0").unwrap();
        let listening = listener.local_addr().unwrap();
        assert_eq!(half_open.probe(listening, deadline()).await, Ok(()));
        drop(listener);
        assert_eq!(
            half_open.probe(listening, deadline()).await,
            Err(format!("connect {listening}: connection refused"))
        );
    }

    #[tokio::test]
    async fn checks_of_one_backend_at_once_share_one_syn_and_its_answer() {
        let half_open = HalfOpen::start(&Handle::current()).expect("raw sockets (as root)");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(
            half_open.probe(target, deadline()),
            half_open.probe(target, deadline())
        );
        assert_eq!((a, b), (Ok(()), Ok(())));
        assert!(lock(&half_open.state).waiting.is_empty());
    }

    #[tokio::test]
    async fn an_unanswered_check_times_out_and_leaves_nothing_waiting() {
        let half_open = HalfOpen::start(&Handle::current()).expect("raw sockets (as root)");
        let (listener, _queued) = crate::health::tests::unanswering_listener();
        let target = listener.local_addr().unwrap();
        // Long enough that timing out a few times late exceeds the margin.
        let timeout = Duration::from_millis(500);
        let started = time::Instant::now();
        assert_eq!(
            half_open
                .probe(target, Deadline::after(started, timeout))
                .await,
            Err(format!("connect {target}: timed out after {timeout:?}"))
        );
        // Timed out on the reader's timer: late by one read period at most,
        // and a loaded machine's scheduling (1 s margin).
        let took = started.elapsed();
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(1),
            "took {took:?}"
        );
        assert!(lock(&half_open.state).waiting.is_empty());
        assert!(lock(&half_open.state).sources.is_empty());
    }

    /// A scheduled check that keeps what it was told.
    #[derive(Default)]
    struct Told(Mutex<Vec<Result<(), String>>>);

    impl Check for Told {
        fn answered(&self, result: Result<(), String>, _: Duration) {
            self.0.lock().unwrap().push(result);
        }
    }

    #[tokio::test]
    async fn a_syn_the_kernel_refuses_fails_its_check_alone() {
        let half_open = HalfOpen::start(&Handle::current()).expect("raw sockets (as root)");
        let listeners = [(); 2].map(|()| TcpListener::bind("127.0.0.1:0").unwrap());
        let [a, b] = listeners.each_ref().map(|l| l.local_addr().unwrap());
        // A raw socket may not send to the broadcast address (no
        // SO_BROADCAST): sendmmsg refuses that SYN, in the middle of the
        // batch. Its source is known, so the refusal is the send's.
        let refused = SocketAddr::from((Ipv4Addr::BROADCAST, 80));
        (lock(&half_open.state).sources).insert(Ipv4Addr::BROADCAST, Ipv4Addr::LOCALHOST);
        let told = [(); 3].map(|()| Arc::new(Told::default()));
        let check = |i: usize| Waiter::Check(Arc::downgrade(&told[i]) as Weak<dyn Check>);
        half_open.check([
            (a, deadline(), check(0)),
            (refused, deadline(), check(1)),
            (b, deadline(), check(2)),
        ]);
        assert_eq!(
            *told[1].0.lock().unwrap(),
            [Err(format!("connect {refused}: permission denied"))]
        );
        let started = time::Instant::now();
        while told.iter().any(|t| t.0.lock().unwrap().is_empty()) {
            assert!(started.elapsed() < 10 * TIMEOUT, "unanswered");
            time::sleep(READ_EVERY).await;
        }
        assert_eq!(*told[0].0.lock().unwrap(), [Ok(())]);
        assert_eq!(*told[2].0.lock().unwrap(), [Ok(())]);
        assert!(lock(&half_open.state).waiting.is_empty());
    }

    #[test]
    fn answers_to_other_syns_or_ports_are_ignored() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let half_open = HalfOpen::start(runtime.handle()).expect("raw sockets (as root)");
        let peer: Peer = (IpAddr::from([10, 0, 0, 2]), 80);
        let told = Arc::new(Told::default());
        let flight = InFlight {
            seq: 1000,
            waiters: vec![Pending {
                deadline: runtime.block_on(async { deadline() }),
                waiter: Waiter::Check(Arc::downgrade(&told) as Weak<dyn Check>),
            }],
        };
        lock(&half_open.state).waiting.insert(peer, flight);
        let port = half_open.v4.port;
        let answer = |to_port: u16, ack: u32, flags: u8| {
            let mut segment = [0u8; 20];
            segment[0..2].copy_from_slice(&80u16.to_be_bytes());
            segment[2..4].copy_from_slice(&to_port.to_be_bytes());
            segment[8..12].copy_from_slice(&ack.to_be_bytes());
            segment[13] = flags;
            half_open.answer(port, [(&segment[..], peer.0)].into_iter());
        };
        answer(port + 1, 1001, SYN | ACK); // another port
        answer(port, 1000, SYN | ACK); // not this SYN's acknowledgement
        answer(port, 1001, ACK); // a bare ACK
        assert!(told.0.lock().unwrap().is_empty());
        answer(port, 1001, RST | ACK);
        assert_eq!(
            *told.0.lock().unwrap(),
            [Err("connect 10.0.0.2:80: connection refused".to_owned())]
        );
        assert!(lock(&half_open.state).waiting.is_empty());
    }
}
