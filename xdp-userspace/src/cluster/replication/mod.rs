//! Flow-state replication (docs/cluster.md): every node tells its peers
//! which backend each of its flows is pinned to (and, in NAT mode, what it
//! is translated to), so that whichever node ECMP sends a flow to next
//! keeps it on that backend, with the same translation.
//!
//! - The datapath reports each pin it makes through a ring buffer
//!   (`xdp_common::replication`); [`Replicator::spawn`] drains it, turns
//!   backend ids into addresses ([`Directory`]) and sends the pins to
//!   every peer as UDP datagrams ([`wire`]), signed with the shared key.
//! - Peers' datagrams are checked (tag, sender, sequence, age) and their
//!   pins installed in the flow table marked replicated, where they age
//!   (LRU) like local ones.
//! - Every second each node sends a heartbeat carrying its last sequence
//!   number: a peer that missed messages (a partition, a full socket
//!   buffer) sees the gap, counts it, and pulls a full copy over TCP.
//! - A starting node pulls a full copy before it announces any VIP
//!   ([`Replicator::pull_initial`]).
//! - NAT translations age on a timeout, not in an LRU: every
//!   [`REFRESH`] a node sends again the ones it made that saw traffic
//!   since, so a long-lived flow's copies outlive its timeout too.

pub mod wire;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    Ebpf,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{unix::AsyncFd, AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::UdpSocket,
    sync::mpsc,
};
use tracing::{info, warn};
use wire::{FlowRecord, Header, Key, Kind, Translation, WireError};
use xdp_common::{
    replication::{FlowEvent, COUNTS_MAP, COUNT_LOST, COUNT_WRITTEN, EVENTS_MAP, EVENT_NAT},
    FlowKey, NatFwd, NAT_F_REPLICATED,
};

use super::config::Replication;
use crate::{
    addr,
    controller::{Controller, Directory, SharedDirectory},
    dataplane::{monotonic_coarse_ns, FlowTable, SumPerCpu as _},
};

/// A message older (or newer) than this by the receiver's clock is
/// refused: a captured message replayed later must not re-install pins.
/// Nodes' clocks must agree to within it (NTP).
const MAX_AGE: Duration = Duration::from_secs(30);
/// A peer not heard from for this long is shown as silent.
const SILENT_AFTER: Duration = Duration::from_secs(3);
/// How often heartbeats go out.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Least time between two full copies pulled from one peer.
const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// A full copy that takes longer than this is abandoned.
const PULL_TIMEOUT: Duration = Duration::from_secs(10);
/// Least time between two log lines about refused messages.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How often a node sends its active NAT translations again (well below
/// the shortest NAT timeout that makes sense, UDP's 30 s default).
pub const REFRESH: Duration = Duration::from_secs(10);

/// The replication sockets, bound before anything else starts so that an
/// address in use stops the daemon with a clear error.
pub struct Sockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

impl Sockets {
    pub fn bind(cfg: &Replication) -> Result<Self> {
        let why = || format!("[cluster] replication_listen {}", cfg.listen);
        let udp = std::net::UdpSocket::bind(cfg.listen).with_context(why)?;
        let tcp = std::net::TcpListener::bind(cfg.listen).with_context(why)?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok(Self { udp, tcp })
    }
}

/// The datapath's ring of pinned flows.
pub struct Ring(RingBuf<MapData>);

/// One peer as this node sees it.
#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    /// The peer's current run and the last sequence number seen in it.
    run: Option<(u64, u64)>,
    /// Runs it had before, and when each ended (see [`Peer::seen`]).
    retired: Vec<(u64, Instant)>,
    heard: Option<Instant>,
    received: u64,
    /// Flow messages the sequence numbers show were lost.
    missed: u64,
    /// Full copies pulled from it after a gap.
    resyncs: u64,
    last_resync: Option<Instant>,
    lag_ms: u64,
    max_lag_ms: u64,
    send_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    sent_flows: u64,
    sent_messages: u64,
    /// Pins that could not be named (their backend id was unknown).
    unsent: u64,
    received: u64,
    installed: u64,
    /// Received pins of a service or backend this node does not have.
    unmatched: u64,
    bad_tag: u64,
    unknown_sender: u64,
    malformed: u64,
    /// Replayed, duplicated or too old.
    stale: u64,
    last_refusal_log: Option<Instant>,
    last_pull: Option<PullReport>,
}

/// What a full copy brought.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullReport {
    pub from: SocketAddr,
    pub flows: u64,
    pub installed: u64,
    pub ms: u64,
}

/// How long a peer's past run stays refused after it ended: a message of
/// it can pass the age check for up to twice MAX_AGE after it was sent
/// (clocks apart by up to MAX_AGE), and it was sent before the run ended.
const RETIRED_FOR: Duration = Duration::from_secs(2 * MAX_AGE.as_secs());
/// Past runs remembered per peer (a peer restarts far less often).
const MAX_RETIRED: usize = 8;

impl Peer {
    /// Whether `run` is one this peer has left behind: its messages now
    /// are replays, or a dead predecessor's late datagrams.
    fn retired(&mut self, run: u64) -> bool {
        self.retired
            .retain(|(_, ended)| ended.elapsed() <= RETIRED_FOR);
        self.retired.iter().any(|&(r, _)| r == run)
    }

    /// Records `seq` as the last number seen in `run`. A new run retires
    /// the current one: were a message of that run believed again, it
    /// would become current with no sequence seen, and every message of
    /// both runs from the last 30 s could be replayed, alternately.
    fn seen(&mut self, run: u64, seq: u64) {
        if let Some((old, _)) = self.run.filter(|&(old, _)| old != run) {
            if self.retired.len() == MAX_RETIRED {
                self.retired.remove(0);
            }
            self.retired.push((old, Instant::now()));
        }
        self.run = Some((run, seq));
    }
}

/// Everything the replication tasks share.
struct Shared {
    listen: SocketAddr,
    key: Key,
    /// This run's id (see `wire::Header::sender`).
    run: u64,
    /// The last flow message's sequence number.
    seq: AtomicU64,
    directory: SharedDirectory,
    table: Mutex<FlowTable>,
    counts: PerCpuArray<MapData, u64>,
    peers: Mutex<Vec<Peer>>,
    counters: Mutex<Counters>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This node's replication: see the module documentation.
#[derive(Clone)]
pub struct Replicator {
    shared: Arc<Shared>,
}

impl Replicator {
    /// Takes the datapath's ring and counters out of `ebpf`; the
    /// controller provides the flow table and backend directory.
    pub fn new(
        cfg: &Replication,
        ebpf: &mut Ebpf,
        controller: &Controller,
    ) -> Result<(Self, Ring)> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the XDP object"))
        };
        let events = RingBuf::try_from(take(EVENTS_MAP)?)?;
        let counts = PerCpuArray::try_from(take(COUNTS_MAP)?)?;
        // Random, so that a restarted daemon's numbering is never taken
        // for a replay of its predecessor's (the clock, should
        // /dev/urandom be unreadable).
        let run = random().unwrap_or_else(now_ms);
        let peers = cfg
            .peers
            .iter()
            .map(|&addr| Peer {
                addr,
                run: None,
                retired: Vec::new(),
                heard: None,
                received: 0,
                missed: 0,
                resyncs: 0,
                last_resync: None,
                lag_ms: 0,
                max_lag_ms: 0,
                send_errors: 0,
            })
            .collect();
        let shared = Arc::new(Shared {
            listen: cfg.listen,
            key: Key::new(cfg.key.as_bytes()),
            run,
            seq: AtomicU64::new(0),
            directory: controller.directory(),
            table: Mutex::new(controller.flow_table()?),
            counts,
            peers: Mutex::new(peers),
            counters: Mutex::default(),
        });
        Ok((Self { shared }, Ring(events)))
    }

    /// Pulls a full copy of the flow table from the first peer that gives
    /// one; blocking. A node calls this before it announces anything, so
    /// that it never carries a flow it does not know. When no peer
    /// answers (the first node of a cluster) it says so and goes on.
    pub fn pull_initial(&self) {
        let peers: Vec<SocketAddr> = lock(&self.shared.peers).iter().map(|p| p.addr).collect();
        for peer in peers {
            match self.pull(peer) {
                Ok(report) => {
                    info!(
                        %peer,
                        flows = report.flows,
                        installed = report.installed,
                        ms = report.ms,
                        "replication: pulled the cluster's flows before announcing"
                    );
                    return;
                }
                Err(e) => warn!(%peer, "replication: no full copy: {e:#}"),
            }
        }
        warn!("replication: no peer gave a full copy; starting with this node's flows only");
    }

    /// Pulls a full copy from `peer` and installs the pins this node does
    /// not have yet.
    fn pull(&self, peer: SocketAddr) -> Result<PullReport> {
        let started = Instant::now();
        let mut stream = TcpStream::connect_timeout(&peer, Duration::from_secs(1))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let request = wire::encode(&self.shared.key, &self.header(Kind::SyncRequest, 0), &[]);
        stream.write_all(&framed(&request))?;
        let mut stream = Deadlined {
            stream,
            deadline: started + PULL_TIMEOUT,
        };
        let (mut flows, mut installed) = (0u64, 0u64);
        loop {
            let frame = read_frame(&mut stream)?;
            let (header, records) = wire::decode(&self.shared.key, &frame)
                .inspect_err(|e| self.refused(peer, Refusal::Wire(e.clone())))?;
            // As old a limit as for any message: a copy recorded once and
            // played back later by whoever answers at the peer's address
            // carries a valid tag too.
            if now_ms().abs_diff(header.sent_ms) > MAX_AGE.as_millis() as u64 {
                self.refused(peer, Refusal::Stale);
                bail!(
                    "a stale full copy (sent {} ms ago)",
                    now_ms() as i64 - header.sent_ms as i64
                );
            }
            match header.kind {
                Kind::Flows => {
                    flows += records.len() as u64;
                    installed += self.install(&records, false);
                }
                Kind::SyncEnd if header.seq == flows => break,
                Kind::SyncEnd => bail!("the copy ended after {flows} of {} flows", header.seq),
                kind => bail!("unexpected {kind:?} message in a full copy"),
            }
        }
        let report = PullReport {
            from: peer,
            flows,
            installed,
            ms: started.elapsed().as_millis() as u64,
        };
        lock(&self.shared.counters).last_pull = Some(report.clone());
        Ok(report)
    }

    fn header(&self, kind: Kind, seq: u64) -> Header {
        Header {
            kind,
            sender: self.shared.run,
            seq,
            sent_ms: now_ms(),
        }
    }

    /// Installs peers' pins; returns how many were written.
    fn install(&self, records: &[FlowRecord], overwrite: bool) -> u64 {
        let directory = self.directory();
        let mut table = lock(&self.shared.table);
        let (mut installed, mut unmatched) = (0, 0);
        for r in records {
            let Some(id) = directory.id(r.service, r.backend) else {
                unmatched += 1;
                continue;
            };
            let (vip, port, proto) = r.service;
            let key = addr::flow_key(r.client, SocketAddr::new(vip, port), proto);
            let written = match r.nat {
                None => table.install(&key, id, overwrite),
                Some(t) => table.install_nat(&key, (id, r.backend), t.snat, t.timeout_s, overwrite),
            };
            match written {
                Ok(true) => installed += 1,
                Ok(false) => {}
                Err(e) => warn!("replication: {e:#}"),
            }
        }
        drop(table);
        let mut c = lock(&self.shared.counters);
        c.received += records.len() as u64;
        c.installed += installed;
        c.unmatched += unmatched;
        installed
    }

    fn directory(&self) -> Arc<Directory> {
        self.shared
            .directory
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts the tasks: the ring reader, the receiver, the heartbeat and
    /// the full-copy server. Call inside the daemon's runtime.
    pub fn spawn(&self, ring: Ring, sockets: Sockets) -> Result<()> {
        let udp = Arc::new(tokio::net::UdpSocket::from_std(sockets.udp)?);
        let tcp = tokio::net::TcpListener::from_std(sockets.tcp)?;
        // SAFETY: the ring owns its descriptor and the AsyncFd owns the
        // ring, so the descriptor stays open while it is registered.
        let ring = unsafe { AsyncFd::register_with_interest(ring.0, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("registering the ring: {e}"))?;
        let (resync_tx, resync_rx) = mpsc::unbounded_channel();
        tokio::spawn(self.clone().send_pins(ring, udp.clone()));
        tokio::spawn(self.clone().receive(udp.clone(), resync_tx));
        tokio::spawn(self.clone().heartbeat(udp.clone()));
        tokio::spawn(self.clone().refresh(udp));
        tokio::spawn(self.clone().resync(resync_rx));
        tokio::spawn(self.clone().serve_copies(tcp));
        info!(listen = %self.shared.listen, "replication: running");
        Ok(())
    }

    /// Drains the datapath's ring and sends its pins to every peer.
    async fn send_pins(self, mut ring: AsyncFd<RingBuf<MapData>>, udp: Arc<UdpSocket>) {
        loop {
            match ring.readable_mut().await {
                // Readiness is cleared before draining: a pin submitted
                // meanwhile wakes the next wait instead of being missed.
                Ok(mut guard) => guard.clear_ready(),
                Err(e) => {
                    warn!("replication: the datapath's ring failed, no more pins sent: {e}");
                    return;
                }
            }
            let mut events = Vec::new();
            while let Some(item) = ring.get_mut().next() {
                if item.len() >= std::mem::size_of::<FlowEvent>() {
                    // SAFETY: the datapath writes whole FlowEvents (Pod);
                    // the length is checked and the read is unaligned.
                    events.push(unsafe { (item.as_ptr() as *const FlowEvent).read_unaligned() });
                }
            }
            if !events.is_empty() {
                let records = self.name(&events);
                self.send(&udp, &records).await;
            }
        }
    }

    /// The pins as they travel: backends by address.
    fn name(&self, events: &[FlowEvent]) -> Vec<FlowRecord> {
        let directory = self.directory();
        let records: Vec<FlowRecord> = events
            .iter()
            .filter_map(|e| {
                let nat = (e.flags & EVENT_NAT != 0)
                    .then(|| translation(e.snat_addr, e.nat_port_be, e.timeout_s));
                record(&directory, &e.key, e.backend, nat)
            })
            .collect();
        lock(&self.shared.counters).unsent += (events.len() - records.len()) as u64;
        records
    }

    /// Sends pins to every peer, as many datagrams as they need.
    async fn send(&self, udp: &UdpSocket, records: &[FlowRecord]) {
        let peers: Vec<SocketAddr> = lock(&self.shared.peers).iter().map(|p| p.addr).collect();
        for chunk in records.chunks(wire::RECORDS_PER_DATAGRAM) {
            let seq = self.shared.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let msg = wire::encode(&self.shared.key, &self.header(Kind::Flows, seq), chunk);
            self.send_to_all(udp, &peers, &msg).await;
            let mut c = lock(&self.shared.counters);
            c.sent_flows += chunk.len() as u64;
            c.sent_messages += 1;
        }
    }

    async fn send_to_all(&self, udp: &UdpSocket, peers: &[SocketAddr], msg: &[u8]) {
        for &peer in peers {
            if udp.send_to(msg, peer).await.is_err() {
                // Unreachable for now (a partition): the heartbeat that
                // gets through later shows the gap, and the peer pulls.
                if let Some(p) = lock(&self.shared.peers).iter_mut().find(|p| p.addr == peer) {
                    p.send_errors += 1;
                }
            }
        }
    }

    /// Every [`REFRESH`], sends again the NAT translations this node made
    /// that saw a client packet since the last time.
    async fn refresh(self, udp: Arc<UdpSocket>) {
        let mut tick = tokio::time::interval(REFRESH);
        let mut since = monotonic_coarse_ns();
        loop {
            tick.tick().await;
            let now = monotonic_coarse_ns();
            let me = self.clone();
            let records = tokio::task::spawn_blocking(move || {
                let directory = me.directory();
                let table = lock(&me.shared.table);
                table
                    .translations(since)
                    .filter(|(_, f)| f.flags & NAT_F_REPLICATED == 0)
                    .filter_map(|(key, f)| nat_record(&directory, &key, &f))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            since = now;
            if !records.is_empty() {
                self.send(&udp, &records).await;
            }
        }
    }

    /// Sends a heartbeat to every peer each second.
    async fn heartbeat(self, udp: Arc<UdpSocket>) {
        let peers: Vec<SocketAddr> = lock(&self.shared.peers).iter().map(|p| p.addr).collect();
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tick.tick().await;
            let seq = self.shared.seq.load(Ordering::Relaxed);
            let msg = wire::encode(&self.shared.key, &self.header(Kind::Heartbeat, seq), &[]);
            self.send_to_all(&udp, &peers, &msg).await;
        }
    }

    /// Receives peers' datagrams.
    async fn receive(self, udp: Arc<UdpSocket>, resync: mpsc::UnboundedSender<SocketAddr>) {
        let mut buf = vec![0u8; 2048];
        loop {
            match udp.recv_from(&mut buf).await {
                Ok((n, from)) => self.receive_one(&buf[..n], from, &resync),
                Err(e) => warn!("replication: receiving: {e}"),
            }
        }
    }

    fn receive_one(
        &self,
        msg: &[u8],
        from: SocketAddr,
        resync: &mpsc::UnboundedSender<SocketAddr>,
    ) {
        let (header, records) = match wire::decode(&self.shared.key, msg) {
            Ok(m) => m,
            Err(e) => return self.refused(from, Refusal::Wire(e)),
        };
        let now = now_ms();
        if now.abs_diff(header.sent_ms) > MAX_AGE.as_millis() as u64 {
            return self.refused(from, Refusal::Stale);
        }
        // Dropped before every `refused()`: `view()` takes the counters
        // and then the peers, so holding the peers while taking the
        // counters could deadlock with it.
        let mut peers = lock(&self.shared.peers);
        let Some(peer) = peers.iter_mut().find(|p| p.addr == from) else {
            drop(peers);
            return self.refused(from, Refusal::UnknownSender);
        };
        if peer.retired(header.sender) {
            drop(peers);
            return self.refused(from, Refusal::Stale);
        }
        peer.heard = Some(Instant::now());
        let last = peer
            .run
            .filter(|(run, _)| *run == header.sender)
            .map(|(_, seq)| seq);
        if matches!(header.kind, Kind::SyncRequest | Kind::SyncEnd) {
            drop(peers);
            return self.refused(from, Refusal::Wire(WireError::Malformed("TCP-only kind")));
        }
        match sequence(header.kind, last, header.seq) {
            Sequence::Stale => {
                drop(peers);
                return self.refused(from, Refusal::Stale);
            }
            Sequence::Known => return,
            Sequence::Next { missed } => {
                if missed > 0 {
                    peer.missed += missed;
                    let _ = resync.send(from);
                }
                peer.seen(header.sender, header.seq);
            }
        }
        if header.kind == Kind::Flows {
            peer.received += records.len() as u64;
            peer.lag_ms = now.saturating_sub(header.sent_ms);
            peer.max_lag_ms = peer.max_lag_ms.max(peer.lag_ms);
            drop(peers);
            self.install(&records, true);
        }
    }

    /// Counts a refused message and logs it (at most every 10 s).
    fn refused(&self, from: SocketAddr, why: Refusal) {
        let mut c = lock(&self.shared.counters);
        match &why {
            Refusal::Wire(WireError::BadTag) => c.bad_tag += 1,
            Refusal::Wire(WireError::Malformed(_)) => c.malformed += 1,
            Refusal::UnknownSender => c.unknown_sender += 1,
            Refusal::Stale => c.stale += 1,
        }
        let now = Instant::now();
        if c.last_refusal_log
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL)
        {
            c.last_refusal_log = Some(now);
            warn!(
                %from,
                bad_tag = c.bad_tag,
                unknown_sender = c.unknown_sender,
                malformed = c.malformed,
                stale = c.stale,
                "replication: refused a message: {why} (counts so far; next report in 10 s at most)"
            );
        }
    }

    /// Pulls a full copy from each peer that showed a gap (at most one per
    /// peer every 2 s).
    async fn resync(self, mut gaps: mpsc::UnboundedReceiver<SocketAddr>) {
        while let Some(peer) = gaps.recv().await {
            {
                let mut peers = lock(&self.shared.peers);
                let Some(p) = peers.iter_mut().find(|p| p.addr == peer) else {
                    continue;
                };
                if p.last_resync.is_some_and(|t| t.elapsed() < RESYNC_INTERVAL) {
                    continue;
                }
                p.last_resync = Some(Instant::now());
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.pull(peer)).await {
                Ok(Ok(report)) => {
                    info!(
                        %peer,
                        flows = report.flows,
                        installed = report.installed,
                        "replication: messages were lost; pulled a full copy"
                    );
                    if let Some(p) = lock(&self.shared.peers).iter_mut().find(|p| p.addr == peer) {
                        p.resyncs += 1;
                    }
                }
                Ok(Err(e)) => warn!(%peer, "replication: pulling a full copy after a gap: {e:#}"),
                Err(e) => warn!(%peer, "replication: pull task: {e}"),
            }
        }
    }

    /// Serves full copies to peers.
    async fn serve_copies(self, listener: tokio::net::TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, from)) => {
                    // A stranger is refused before a byte is read: were
                    // it checked after the request, anyone could hold
                    // connections (and request buffers) for 5 s each.
                    if !self.is_peer_host(from) {
                        self.refused(from, Refusal::UnknownSender);
                        continue;
                    }
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.serve_copy(stream, from).await {
                            warn!(%from, "replication: full copy not served: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    warn!("replication: accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn serve_copy(self, mut stream: tokio::net::TcpStream, from: SocketAddr) -> Result<()> {
        let request = tokio::time::timeout(Duration::from_secs(5), async {
            let mut msg = vec![0u8; frame_len(stream.read_u32().await?)?];
            stream.read_exact(&mut msg).await?;
            anyhow::Ok(msg)
        })
        .await
        .context("no request within 5 s")
        .and_then(|read| read);
        let request = match request {
            Ok(request) => request,
            Err(e) => {
                let why = WireError::Malformed("no complete full-copy request");
                self.refused(from, Refusal::Wire(why));
                return Err(e);
            }
        };
        let header = match wire::decode(&self.shared.key, &request) {
            Ok((h, _)) if h.kind == Kind::SyncRequest => h,
            Ok(_) => {
                let why = WireError::Malformed("not a full-copy request");
                self.refused(from, Refusal::Wire(why));
                bail!("not a full-copy request");
            }
            Err(e) => {
                self.refused(from, Refusal::Wire(e));
                bail!("refused");
            }
        };
        if now_ms().abs_diff(header.sent_ms) > MAX_AGE.as_millis() as u64 {
            self.refused(from, Refusal::Stale);
            bail!("a stale request");
        }
        let me = self.clone();
        let records = tokio::task::spawn_blocking(move || me.export()).await?;
        // The puller gives up after PULL_TIMEOUT: a copy still not taken
        // by then serves no one, and a peer that stopped reading would
        // otherwise hold the task and the copy (up to 20 MiB) for ever.
        tokio::time::timeout(PULL_TIMEOUT, async {
            for chunk in records.chunks(wire::RECORDS_PER_FRAME) {
                let msg = wire::encode(&self.shared.key, &self.header(Kind::Flows, 0), chunk);
                stream.write_all(&framed(&msg)).await?;
            }
            let end = self.header(Kind::SyncEnd, records.len() as u64);
            stream
                .write_all(&framed(&wire::encode(&self.shared.key, &end, &[])))
                .await?;
            stream.flush().await
        })
        .await
        .with_context(|| format!("the peer did not take it within {PULL_TIMEOUT:?}"))??;
        info!(%from, flows = records.len(), "replication: served a full copy");
        Ok(())
    }

    /// Whether `from` is a configured peer's host (by address only: a
    /// full copy is asked for from an ephemeral port).
    fn is_peer_host(&self, from: SocketAddr) -> bool {
        lock(&self.shared.peers)
            .iter()
            .any(|p| p.addr.ip() == from.ip())
    }

    /// Every pin in the flow table and every answered NAT translation
    /// (local and replicated), by address.
    fn export(&self) -> Vec<FlowRecord> {
        let directory = self.directory();
        let table = lock(&self.shared.table);
        let pins = table
            .pins()
            .filter_map(|(key, flow)| record(&directory, &key, flow.backend, None));
        let nat = table
            .translations(0)
            .filter_map(|(key, f)| nat_record(&directory, &key, &f));
        pins.chain(nat).collect()
    }

    /// What `xdplb status` and `xdplb stats` show.
    pub fn view(&self) -> ReplicationView {
        let ring = |slot| self.shared.counts.get(&slot, 0).map_or(0, |v| v.sum());
        let c = lock(&self.shared.counters);
        let peers = lock(&self.shared.peers)
            .iter()
            .map(|p| PeerView {
                address: p.addr,
                state: match p.heard {
                    None => "never heard",
                    Some(t) if t.elapsed() > SILENT_AFTER => "silent",
                    Some(_) => "up",
                }
                .into(),
                heard_ms_ago: p.heard.map(|t| t.elapsed().as_millis() as u64),
                received: p.received,
                missed: p.missed,
                resyncs: p.resyncs,
                lag_ms: p.lag_ms,
                max_lag_ms: p.max_lag_ms,
                send_errors: p.send_errors,
            })
            .collect();
        ReplicationView {
            listen: self.shared.listen,
            ring_written: ring(COUNT_WRITTEN),
            ring_lost: ring(COUNT_LOST),
            sent_flows: c.sent_flows,
            sent_messages: c.sent_messages,
            unsent: c.unsent,
            received: c.received,
            installed: c.installed,
            unmatched: c.unmatched,
            bad_tag: c.bad_tag,
            unknown_sender: c.unknown_sender,
            malformed: c.malformed,
            stale: c.stale,
            last_pull: c.last_pull.clone(),
            peers,
        }
    }
}

/// Why a message was not believed.
enum Refusal {
    Wire(WireError),
    UnknownSender,
    Stale,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Wire(e) => write!(f, "{e}"),
            Refusal::UnknownSender => f.write_str("not from a configured peer"),
            Refusal::Stale => f.write_str("replayed, duplicated, or older than 30 s"),
        }
    }
}

/// What a peer's UDP message's sequence number says, given the last one
/// seen in the sender's current run (`None`: nothing heard of this run).
#[derive(Debug, PartialEq, Eq)]
enum Sequence {
    /// A replayed, duplicated or older flow message: refused, so that a
    /// captured message cannot re-install pins.
    Stale,
    /// In order, or after `missed` lost flow messages (a full copy is
    /// pulled then); the run's last number becomes the message's.
    Next { missed: u64 },
    /// A heartbeat that tells nothing new.
    Known,
}

/// See [`Sequence`]. Flow messages are numbered one after the other; a
/// heartbeat repeats the number of its sender's last flow message.
fn sequence(kind: Kind, last: Option<u64>, seq: u64) -> Sequence {
    let Some(last) = last else {
        return Sequence::Next { missed: 0 };
    };
    match kind {
        Kind::Flows if seq > last => Sequence::Next {
            missed: seq - last - 1,
        },
        Kind::Flows => Sequence::Stale,
        _ if seq > last => Sequence::Next { missed: seq - last },
        _ => Sequence::Known,
    }
}

/// A pin of `key` to backend `id`, named by address.
fn record(
    directory: &Directory,
    key: &FlowKey,
    id: u32,
    nat: Option<Translation>,
) -> Option<FlowRecord> {
    let (service, backend) = directory.backend(id)?;
    let client = SocketAddr::new(addr::from_words(key.src), u16::from_be(key.sport_be));
    Some(FlowRecord {
        service,
        client,
        backend,
        nat,
    })
}

/// NAT translation `f` of `key`, named by address.
fn nat_record(directory: &Directory, key: &FlowKey, f: &NatFwd) -> Option<FlowRecord> {
    let nat = translation(f.snat_addr, f.nat_port_be, f.timeout_s);
    record(directory, key, f.backend, Some(nat))
}

fn translation(snat: [u32; 4], port_be: u16, timeout_s: u32) -> Translation {
    Translation {
        snat: SocketAddr::new(addr::from_words(snat), u16::from_be(port_be)),
        timeout_s,
    }
}

/// The lines `xdplb status` and `xdplb stats` print about replication.
pub fn describe(v: &ReplicationView) -> String {
    let mut out = format!(
        "replication: on {}: sent {} flows in {} messages ({} unnamed), datapath ring lost {}; \
         received {} ({} installed, {} unmatched); refused {} with a bad key, {} from \
         unknown senders, {} malformed, {} stale\n",
        v.listen,
        v.sent_flows,
        v.sent_messages,
        v.unsent,
        v.ring_lost,
        v.received,
        v.installed,
        v.unmatched,
        v.bad_tag,
        v.unknown_sender,
        v.malformed,
        v.stale,
    );
    if let Some(p) = &v.last_pull {
        out += &format!(
            "  last full copy: {} flows from {} in {} ms ({} new here)\n",
            p.flows, p.from, p.ms, p.installed
        );
    }
    for p in &v.peers {
        let heard = p
            .heard_ms_ago
            .map_or_else(String::new, |ms| format!(", heard {ms} ms ago"));
        out += &format!(
            "  peer {}: {}{heard}; received {}, missed {} messages, {} resyncs, lag {} ms \
             (max {}), {} send errors\n",
            p.address,
            p.state,
            p.received,
            p.missed,
            p.resyncs,
            p.lag_ms,
            p.max_lag_ms,
            p.send_errors
        );
    }
    out
}

/// Replication as `xdplb status` and `xdplb stats` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationView {
    pub listen: SocketAddr,
    /// Pins the datapath reported, and those lost because the ring was
    /// full.
    pub ring_written: u64,
    pub ring_lost: u64,
    pub sent_flows: u64,
    pub sent_messages: u64,
    /// Pins not sent: their backend was unknown by then.
    pub unsent: u64,
    /// Pins received from peers, and those installed (new or changed).
    pub received: u64,
    pub installed: u64,
    /// Received pins of a service or backend this node does not have.
    pub unmatched: u64,
    /// Messages refused: wrong key, not from a peer, malformed, replayed
    /// or too old.
    pub bad_tag: u64,
    pub unknown_sender: u64,
    pub malformed: u64,
    pub stale: u64,
    /// The last full copy pulled.
    pub last_pull: Option<PullReport>,
    pub peers: Vec<PeerView>,
}

/// One peer in [`ReplicationView`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    pub address: SocketAddr,
    /// "up", "silent" (nothing for 3 s: down or partitioned) or "never
    /// heard".
    pub state: String,
    pub heard_ms_ago: Option<u64>,
    pub received: u64,
    /// Messages lost on the way (sequence gaps), and full copies pulled to
    /// make up for them.
    pub missed: u64,
    pub resyncs: u64,
    /// Replication lag of its last message, and the largest seen.
    pub lag_ms: u64,
    pub max_lag_ms: u64,
    pub send_errors: u64,
}

fn random() -> Option<u64> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .ok()?;
    Some(u64::from_ne_bytes(b))
}

/// `msg` as a full copy's TCP stream carries it: after its length (4 bytes,
/// big-endian), in one buffer, so that each frame is one write.
fn framed(msg: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(4 + msg.len());
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(msg);
    frame
}

/// The length a frame announces, unless no message of the protocol is
/// that long.
fn frame_len(announced: u32) -> Result<usize> {
    let len = announced as usize;
    if len > wire::MAX_MESSAGE {
        bail!("a {len}-byte message is longer than any the protocol sends");
    }
    Ok(len)
}

/// A full copy's stream as the puller reads it: each read waits at most
/// for the time left before the copy's deadline (and [`READ_TIMEOUT`]). A
/// timeout per read alone let a peer that trickles a byte every few seconds
/// stretch a pull for ever, and a starting node pulls before it announces
/// anything.
struct Deadlined {
    stream: TcpStream,
    deadline: Instant,
}

/// The longest a puller waits for a peer's next bytes.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

impl std::io::Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            self.stream.set_read_timeout(Some(left.min(READ_TIMEOUT)))?;
            match self.stream.read(buf) {
                // A read that timed out says EAGAIN: say which limit ran out.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                read => return read,
            }
        }
        let why = if Instant::now() >= self.deadline {
            format!("took longer than {PULL_TIMEOUT:?}")
        } else {
            format!("the peer sent nothing for {READ_TIMEOUT:?}")
        };
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why))
    }
}

/// Reads a [`framed`] message.
fn read_frame(r: &mut impl std::io::Read) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let mut msg = vec![0u8; frame_len(u32::from_be_bytes(len))?];
    r.read_exact(&mut msg)?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_show_replays_and_losses() {
        use Kind::{Flows, Heartbeat};
        // The first message of a run is in order, whatever its number.
        assert_eq!(sequence(Flows, None, 7), Sequence::Next { missed: 0 });
        assert_eq!(sequence(Heartbeat, None, 7), Sequence::Next { missed: 0 });
        // Flow messages: the next number is in order, skipped ones were
        // lost, and the same number again or an older one is a replay.
        assert_eq!(sequence(Flows, Some(7), 8), Sequence::Next { missed: 0 });
        assert_eq!(sequence(Flows, Some(7), 10), Sequence::Next { missed: 2 });
        assert_eq!(sequence(Flows, Some(7), 7), Sequence::Stale);
        assert_eq!(sequence(Flows, Some(7), 3), Sequence::Stale);
        // A heartbeat repeats the last flow message's number: one beyond
        // it shows flow messages lost.
        assert_eq!(sequence(Heartbeat, Some(7), 7), Sequence::Known);
        assert_eq!(sequence(Heartbeat, Some(7), 6), Sequence::Known);
        assert_eq!(
            sequence(Heartbeat, Some(7), 9),
            Sequence::Next { missed: 2 }
        );
    }

    /// A pull whose deadline passes while a read waits says so: the read's
    /// own timeout reports only EAGAIN ("Resource temporarily unavailable").
    #[test]
    fn a_pull_past_its_deadline_says_so() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _silent_peer = listener.accept().unwrap();
        let mut stream = Deadlined {
            stream,
            deadline: Instant::now() + Duration::from_millis(100),
        };
        let e = read_frame(&mut stream).unwrap_err();
        assert_eq!(e.to_string(), "took longer than 10s");
        // Once past it, no read waits at all.
        let e = read_frame(&mut stream).unwrap_err();
        assert_eq!(e.to_string(), "took longer than 10s");
    }
}
