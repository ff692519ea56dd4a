//! Client helpers for talking to backends or the VIP. Sockets belong to the
//! network namespace of the thread that creates them, so call these inside
//! [`crate::netns::Netns::run`] on the client namespace; the returned
//! connections may then be used from any thread.

use std::{
    io::{BufRead, BufReader, Read as _, Write as _},
    mem,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::RawFd,
    time::Duration,
};

use anyhow::{ensure, Context as _};
use socket2::{Domain, Socket, Type};

/// Connects a TCP socket to `addr`, from `src_port` if given, giving up
/// after `timeout` (which also becomes the read and write timeout).
///
/// The socket has SO_REUSEADDR (so a source port can be bound again right
/// away) and SO_LINGER 0, so closing it sends RST instead of FIN and leaves
/// no TIME_WAIT on the client that would block reusing the same 4-tuple.
pub fn connect(
    addr: SocketAddr,
    src_port: Option<u16>,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    // std cannot bind before connecting, hence socket2.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).context("socket()")?;
    socket.set_reuse_address(true)?;
    socket.set_linger(Some(Duration::ZERO))?;
    if let Some(port) = src_port {
        let local = unspecified(addr, port);
        let bound = socket.bind(&local.into());
        bound.with_context(|| format!("bind to {local}"))?;
    }
    // socket2 connects without blocking and polls, again after EINTR (see
    // `restarting`), where a blocking connect with a timeout would fail.
    let from = from_port(src_port);
    (socket.connect_timeout(&addr.into(), nonzero(timeout)))
        .with_context(|| format!("connect to {addr}{from} within {timeout:?}"))?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(nonzero(timeout)))?;
    stream.set_write_timeout(Some(nonzero(timeout)))?;
    Ok(stream)
}

/// Fetches `http://addr/` with HTTP/1.0 (one request per connection) and
/// returns the body trimmed, which for `xdplb-testbackend` is the name of
/// the backend that answered. Fails unless the status is 200.
pub fn get(addr: SocketAddr, src_port: Option<u16>, timeout: Duration) -> anyhow::Result<String> {
    let mut stream = connect(addr, src_port, timeout)?;
    let ctx = || format!("GET http://{addr}/{}", from_port(src_port));
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: xdplb\r\n\r\n")
        .with_context(ctx)?;
    let (_, body) = read_response(stream).with_context(ctx)?;
    Ok(body)
}

/// Reads a whole response ended by the connection's close: its head and
/// its body trimmed. Fails unless the status is 200.
pub(crate) fn read_response(stream: TcpStream) -> anyhow::Result<(Head, String)> {
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader)?;
    let mut body = String::new();
    reader.read_to_string(&mut body)?;
    ensure!(
        head.status == 200,
        "status {}: {}",
        head.status,
        body.trim()
    );
    Ok((head, body.trim().to_owned()))
}

/// Sends one UDP datagram to `addr` (from `src_port` if given) and returns
/// the reply trimmed (`xdplb-testbackend --udp-port` answers its name).
/// Fails on timeout or if the reply comes from another address than `addr`
/// (a DSR backend must answer from the VIP).
pub fn udp_query(
    addr: SocketAddr,
    src_port: Option<u16>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let local = unspecified(addr, src_port.unwrap_or(0));
    let sock = UdpSocket::bind(local).with_context(|| format!("binding UDP {local}"))?;
    sock.set_read_timeout(Some(nonzero(timeout)))?;
    sock.send_to(b"query\n", addr)
        .with_context(|| format!("sending to UDP {addr}"))?;
    let mut buf = [0u8; 1500];
    let (n, from) = restarting(|| sock.recv_from(&mut buf))
        .with_context(|| format!("waiting for a reply from UDP {addr} (timeout {timeout:?})"))?;
    ensure!(from == addr, "UDP reply came from {from}, expected {addr}");
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// A persistent HTTP/1.1 keep-alive connection for sending repeated requests
/// over one TCP connection (so all land on the same backend).
#[derive(Debug)]
pub struct Conn {
    reader: BufReader<TcpStream>,
    peer: SocketAddr,
}

impl Conn {
    /// Connects like [`connect`].
    pub fn connect(
        addr: SocketAddr,
        src_port: Option<u16>,
        timeout: Duration,
    ) -> anyhow::Result<Conn> {
        Ok(Conn {
            reader: BufReader::new(connect(addr, src_port, timeout)?),
            peer: addr,
        })
    }

    /// The connection's local address (the client's source port).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.reader.get_ref().local_addr()?)
    }

    /// Sends `GET path` with keep-alive and returns the trimmed body (the
    /// backend's name for `xdplb-testbackend`). Fails unless status is 200.
    pub fn get(&mut self, path: &str) -> anyhow::Result<String> {
        let ctx = || format!("keep-alive GET http://{}{path}", self.peer);
        let req = format!("GET {path} HTTP/1.1\r\nHost: xdplb\r\nConnection: keep-alive\r\n\r\n");
        self.reader
            .get_mut()
            .write_all(req.as_bytes())
            .with_context(ctx)?;
        let head = read_head(&mut self.reader).with_context(ctx)?;
        let len = head
            .content_length
            .with_context(|| format!("{}: no Content-Length", ctx()))?;
        let mut body = vec![0; usize::try_from(len)?];
        self.reader.read_exact(&mut body).with_context(ctx)?;
        let body = String::from_utf8_lossy(&body).trim().to_owned();
        ensure!(
            head.status == 200,
            "{}: status {}: {body}",
            ctx(),
            head.status
        );
        Ok(body)
    }
}

/// A long-lived connection to `xdplb-testbackend`'s `/stream` endpoint,
/// which echoes each line prefixed with the backend's name.
#[derive(Debug)]
pub struct StreamConn {
    reader: BufReader<TcpStream>,
    peer: SocketAddr,
}

impl StreamConn {
    /// Connects like [`connect`] and requests `/stream`.
    pub fn open(
        addr: SocketAddr,
        src_port: Option<u16>,
        timeout: Duration,
    ) -> anyhow::Result<StreamConn> {
        let mut stream = connect(addr, src_port, timeout)?;
        let ctx = || format!("GET http://{addr}/stream");
        stream
            .write_all(b"GET /stream HTTP/1.1\r\nHost: xdplb\r\n\r\n")
            .with_context(ctx)?;
        let mut reader = BufReader::new(stream);
        let head = read_head(&mut reader).with_context(ctx)?;
        ensure!(head.status == 200, "{}: status {}", ctx(), head.status);
        Ok(StreamConn { reader, peer: addr })
    }

    /// The connection's local address (the client's source port).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.reader.get_ref().local_addr()?)
    }

    /// Sends `line` (without newline) and returns the echoed line, e.g.
    /// `"b2: hello"`, without its newline.
    pub fn send_line(&mut self, line: &str) -> anyhow::Result<String> {
        let ctx = || format!("stream to {}", self.peer);
        self.reader
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .with_context(ctx)?;
        let mut reply = String::new();
        let n = self.reader.read_line(&mut reply).with_context(ctx)?;
        ensure!(n > 0, "{}: connection closed", ctx());
        Ok(reply.trim_end_matches(['\r', '\n']).to_owned())
    }
}

/// Status line and the headers the clients care about.
pub(crate) struct Head {
    pub status: u16,
    pub content_length: Option<u64>,
    /// `X-Backend`: the name of the backend that answered.
    pub backend: Option<String>,
}

/// Reads an HTTP response's status line and headers.
pub(crate) fn read_head(reader: &mut impl BufRead) -> anyhow::Result<Head> {
    let mut line = String::new();
    ensure!(
        reader.read_line(&mut line)? > 0,
        "connection closed before a response"
    );
    // "HTTP/1.1 200 OK"
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let mut head = Head {
        status,
        content_length: None,
        backend: None,
    };
    loop {
        line.clear();
        ensure!(
            reader.read_line(&mut line)? > 0,
            "connection closed in headers"
        );
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                head.content_length = Some(
                    v.trim()
                        .parse()
                        .with_context(|| format!("bad header {l:?}"))?,
                );
            } else if k.trim().eq_ignore_ascii_case("x-backend") {
                head.backend = Some(v.trim().to_owned());
            }
        }
    }
    Ok(head)
}

/// The unspecified address of `addr`'s family, port `port`.
fn unspecified(addr: SocketAddr, port: u16) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        SocketAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
    }
}

fn from_port(src_port: Option<u16>) -> String {
    src_port
        .map(|p| format!(" from port {p}"))
        .unwrap_or_default()
}

/// std rejects zero timeouts; treat zero as the smallest one.
fn nonzero(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

/// Sets socket option `name` at `level` of `fd` to `value`.
pub fn setsockopt<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> anyhow::Result<()> {
    // SAFETY: value points to a live T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "setsockopt({level}, {name}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Calls `call` again while it fails with EINTR. A socket call with a
/// timeout fails so, even without a signal handler, when this process is
/// stopped and continued (signal(7)); a frozen and thawed cgroup does the
/// same. That is no failure of what a test watches.
pub fn restarting<T>(mut call: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            result => return result,
        }
    }
}

/// `addr` as a C sockaddr (in a sockaddr_storage) and its length.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
