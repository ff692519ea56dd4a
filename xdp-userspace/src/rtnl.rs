//! The daemon's one rtnetlink request helper: it sends a request and
//! collects the kernel's answers. Next hops (neigh.rs), announced routes
//! (cluster/announce.rs) and attached XDP programs (loader.rs) all ask the
//! kernel through it, instead of running iproute2. [`Events`] subscribes
//! to the kernel's announcements of changes (neigh.rs follows neighbours and
//! routes with it).

use std::io;

use anyhow::{Context as _, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr as NlAddr};

/// One rtnetlink socket, used for requests and their answers.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
        socket.bind_auto().context("binding an rtnetlink socket")?;
        socket
            .connect(&NlAddr::new(0, 0))
            .context("connecting an rtnetlink socket")?;
        Ok(Self { socket, seq: 0 })
    }

    /// Makes the kernel filter dumps by the request's fields and attributes
    /// (`NETLINK_GET_STRICT_CHK`, as iproute2 does); without it a route dump
    /// lists every table, whatever the request names.
    pub fn strict(self) -> Result<Self> {
        self.socket
            .set_netlink_get_strict_chk(true)
            .context("enabling strict rtnetlink dumps")?;
        Ok(self)
    }

    /// A dump: every object the request matches.
    pub fn dump(&mut self, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>> {
        self.exchange(msg, NLM_F_DUMP)
    }

    /// A look-up of one object (a link, a route).
    pub fn get(&mut self, msg: RouteNetlinkMessage) -> Result<RouteNetlinkMessage> {
        self.exchange(msg, NLM_F_ACK)?
            .into_iter()
            .next()
            .context("the kernel acknowledged an rtnetlink look-up without an answer")
    }

    /// A change (`NLM_F_CREATE | NLM_F_REPLACE`, ...), once the kernel
    /// acknowledged it.
    pub fn change(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<()> {
        self.exchange(msg, NLM_F_ACK | flags).map(drop)
    }

    /// Sends one request and collects its answers until the dump's end or
    /// the acknowledgement. A refusal is an [`io::Error`] with the kernel's
    /// errno (see [`errno`]).
    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut buf = vec![0; req.header.length as usize];
        req.serialize(&mut buf);
        self.socket
            .send(&buf, 0)
            .context("sending an rtnetlink request")?;
        let mut answers = Vec::new();
        loop {
            let (data, _) = self
                .socket
                .recv_from_full()
                .context("reading an rtnetlink answer")?;
            for msg in parse(&data).context("parsing an rtnetlink answer")? {
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    // A dump that failed midway (e.g. a route table that
                    // does not exist) ends with the errno in its Done.
                    NetlinkPayload::Done(d) if d.code < 0 => {
                        return Err(io::Error::from_raw_os_error(-d.code).into())
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io().into()),
                    // The acknowledgement: nothing follows.
                    NetlinkPayload::Error(_) => return Ok(answers),
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    _ => {}
                }
            }
        }
    }
}

/// The messages of one datagram, in order.
fn parse(data: &[u8]) -> Result<Vec<NetlinkMessage<RouteNetlinkMessage>>> {
    let mut messages = Vec::new();
    let mut off = 0;
    while off < data.len() {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])?;
        let len = msg.header.length as usize;
        messages.push(msg);
        if len == 0 {
            break;
        }
        off += len;
    }
    Ok(messages)
}

/// The receive buffer asked for a subscription: room for a burst of a few
/// thousand announcements (a gateway failover, a flushed neighbour table)
/// before the kernel drops some. The kernel caps it at `net.core.rmem_max`.
const EVENTS_BUFFER: usize = 4 << 20;

/// A subscription to the kernel's announcements of changes (`RTNLGRP_*`
/// groups). A socket of its own: on the requests' socket, announcements
/// would arrive between a request's answers.
pub struct Events {
    socket: Socket,
}

/// What one read of a subscription gave.
pub enum Announced {
    /// Announcements, in the order the kernel made them.
    Changes(Vec<RouteNetlinkMessage>),
    /// Some were lost (the socket's buffer overflowed, `ENOBUFS`, or one
    /// could not be parsed): whatever was derived from them must be read
    /// again in full.
    Lost,
}

impl Events {
    /// Joins `groups` (`libc::RTNLGRP_*`); announcements made from then on
    /// are queued for [`Events::next`].
    pub fn subscribe(groups: &[u32]) -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
        socket.bind_auto().context("binding an rtnetlink socket")?;
        for &group in groups {
            socket
                .add_membership(group)
                .with_context(|| format!("joining rtnetlink group {group}"))?;
        }
        // Best effort: a smaller buffer only makes `Lost` likelier.
        let _ = socket.set_rx_buf_sz(EVENTS_BUFFER);
        Ok(Self { socket })
    }

    /// Waits for the next announcements.
    pub fn next(&mut self) -> Result<Announced> {
        let data = match self.socket.recv_from_full() {
            Ok((data, _)) => data,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Announced::Lost),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                return Ok(Announced::Changes(Vec::new()))
            }
            Err(e) => return Err(e).context("reading rtnetlink announcements"),
        };
        let Ok(messages) = parse(&data) else {
            return Ok(Announced::Lost);
        };
        Ok(Announced::Changes(
            messages
                .into_iter()
                .filter_map(|m| match m.payload {
                    NetlinkPayload::InnerMessage(m) => Some(m),
                    _ => None,
                })
                .collect(),
        ))
    }
}

/// The kernel's errno when `err` is its refusal of a request.
pub fn errno(err: &anyhow::Error) -> Option<i32> {
    err.downcast_ref::<io::Error>()?.raw_os_error()
}

/// Runs `f` on a thread of its own in a new, empty network namespace (with
/// `lo` up), which the kernel frees when the thread ends, even if `f` panics.
#[cfg(test)]
pub(crate) fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) with CLONE_NEWNET moves only this thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
        }
        // Children start in the namespace of the thread that spawns them.
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("running ip");
        assert!(up.success(), "ip link set lo up: {up}");
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}
