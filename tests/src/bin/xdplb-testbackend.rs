//! Test backend for the DSR testbed: a tiny HTTP server (and optional UDP
//! echo) that identifies itself by name.
//!
//! ```text
//! xdplb-testbackend --name b1 [--port 80] [--udp-port 53] [--flap N] [--verbose]
//! ```
//!
//! * `GET <any path>`: `200 OK`, header `X-Backend: <name>`, body `<name>\n`;
//!   keep-alive when requested (HTTP/1.1 default, HTTP/1.0 with
//!   `Connection: keep-alive`), so one connection can carry many requests.
//! * `GET /stream`: headers, then the connection stays open and every line
//!   the client sends is echoed back as `<name>: <line>` (for long-lived
//!   connection tests).
//! * `GET /health` with `--flap N`: every Nth request answers `503` (a
//!   backend that fails one health check in N).
//! * `GET /bytes?n=N`: `N` bytes of the pseudo-random pattern stream of
//!   `xdplb_tests::traffic::Pattern` (bulk download tests).
//! * `POST /sha256`: reads the `Content-Length` bytes of the body and
//!   answers their SHA-256, lower-case hex (bulk upload tests).
//! * `GET /peer`: the address and port the connection came from, as this
//!   backend sees it (the SNAT address and port under NAT).
//! * UDP on `--udp-port`: every datagram is answered with `<name>\n`, sent
//!   from the address it was sent to (the VIP, under DSR).
//!
//! Sockets listen on `[::]` with IPV6_V6ONLY off, so both the IPv4 and the
//! IPv6 VIP are served. Prints `listening ...` on stdout once bound.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    mem,
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::Arc,
};

use sha2::{Digest as _, Sha256};
use socket2::{Domain, Socket, Type};
use xdplb_tests::{
    client::{restarting, setsockopt},
    traffic::{hex, Pattern},
};

/// A tiny HTTP (and optional UDP) server that identifies itself by name.
#[derive(clap::Parser)]
#[command(name = "xdplb-testbackend")]
struct Config {
    /// The name this backend answers with.
    #[arg(long)]
    name: String,
    /// TCP port of the HTTP server.
    #[arg(long, default_value_t = 80)]
    port: u16,
    /// UDP port of the name service, if any.
    #[arg(long)]
    udp_port: Option<u16>,
    /// Every Nth `/health` request answers 503.
    #[arg(long, value_name = "N")]
    flap: Option<u64>,
    /// Log every connection on standard error.
    #[arg(short, long)]
    verbose: bool,
    /// `/health` requests so far, for `flap`.
    #[arg(skip)]
    health_requests: std::sync::atomic::AtomicU64,
}

fn main() {
    let config = Arc::new(<Config as clap::Parser>::parse());
    let listener = dual_stack_socket(Type::STREAM, config.port)
        .unwrap_or_else(|e| fail(&format!("TCP [::]:{}: {e}", config.port)));
    let listener = TcpListener::from(listener);
    if let Some(port) = config.udp_port {
        let fd = dual_stack_socket(Type::DGRAM, port)
            .unwrap_or_else(|e| fail(&format!("UDP [::]:{port}: {e}")));
        let config = config.clone();
        std::thread::spawn(move || udp_loop(fd, &config));
    }
    let udp_note = config
        .udp_port
        .map(|p| format!(", udp [::]:{p}"))
        .unwrap_or_default();
    // Callers wait for this line before sending traffic.
    println!(
        "listening: {} on tcp [::]:{}{udp_note}",
        config.name, config.port
    );
    let _ = std::io::stdout().flush();

    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let config = config.clone();
                std::thread::spawn(move || {
                    let peer = stream
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    if let Err(e) = serve(stream, &config) {
                        if config.verbose {
                            eprintln!("{}: connection from {peer}: {e}", config.name);
                        }
                    }
                });
            }
            Err(e) => eprintln!("{}: accept: {e}", config.name),
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("xdplb-testbackend: {msg}");
    std::process::exit(1);
}

/// One connection: HTTP requests until the client or the protocol closes it.
fn serve(stream: TcpStream, config: &Config) -> std::io::Result<()> {
    let name = &config.name;
    let peer = stream.peer_addr()?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let request_line = line.trim_end().to_owned();
        if request_line.is_empty() {
            // Tolerate stray CRLFs between pipelined requests.
            continue;
        }
        let mut parts = request_line.split_whitespace();
        let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
        else {
            return respond_error(&mut out, "400 Bad Request", name);
        };

        let mut connection = String::new();
        let mut content_length = 0usize;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                let (k, v) = (k.trim(), v.trim());
                if k.eq_ignore_ascii_case("connection") {
                    connection = v.to_ascii_lowercase();
                } else if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.parse().unwrap_or(0);
                }
            }
        }
        let mut upload_sha256 = None;
        if method == "POST" && path == "/sha256" {
            upload_sha256 = Some(hash_body(&mut reader, content_length as u64)?);
        } else {
            // Discard any request body so the next request parses cleanly.
            std::io::copy(
                &mut (&mut reader).take(content_length as u64),
                &mut std::io::sink(),
            )?;
        }
        if config.verbose {
            eprintln!("{name}: {peer} {request_line}");
        }

        let version = if version == "HTTP/1.0" {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        };
        let keep_alive = match version {
            "HTTP/1.0" => connection.contains("keep-alive"),
            _ => !connection.contains("close"),
        };
        let conn_header = if keep_alive { "keep-alive" } else { "close" };
        let body = if let Some(hex) = upload_sha256 {
            format!("{hex}\n")
        } else {
            if method != "GET" && method != "HEAD" {
                return respond_error(&mut out, "405 Method Not Allowed", name);
            }
            if let Some(n) = path.strip_prefix("/bytes?n=") {
                let Ok(n) = n.parse::<u64>() else {
                    return respond_error(&mut out, "400 Bad Request", name);
                };
                let bytes = "application/octet-stream";
                out.write_all(ok_head(version, name, conn_header, bytes, Some(n)).as_bytes())?;
                if method == "GET" {
                    Pattern::default().write(n, &mut out)?;
                }
                if !keep_alive {
                    return Ok(());
                }
                continue;
            }
            if path == "/stream" {
                // No Content-Length: the body is the echo stream, ended by close.
                out.write_all(ok_head(version, name, "close", TEXT, None).as_bytes())?;
                loop {
                    line.clear();
                    if reader.read_line(&mut line)? == 0 {
                        return Ok(());
                    }
                    writeln!(out, "{name}: {}", line.trim_end_matches(['\r', '\n']))?;
                }
            }
            if path == "/health" {
                let n = config
                    .health_requests
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                if config.flap.is_some_and(|every| n.is_multiple_of(every)) {
                    return respond_error(&mut out, "503 Service Unavailable", name);
                }
            }
            if path == "/peer" {
                let seen = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
                format!("{seen}\n")
            } else {
                format!("{name}\n")
            }
        };
        let len = Some(body.len() as u64);
        let mut response = ok_head(version, name, conn_header, TEXT, len);
        // HEAD has no body; GET and the upload's POST do.
        if method != "HEAD" {
            response.push_str(&body);
        }
        // One write per response, so keep-alive replies are single segments.
        out.write_all(response.as_bytes())?;
        if !keep_alive {
            return Ok(());
        }
    }
}

/// SHA-256 of the next `len` bytes of the request (`sha2` is optimised
/// even in the dev profile: see the workspace's Cargo.toml).
fn hash_body(reader: &mut BufReader<TcpStream>, len: u64) -> std::io::Result<String> {
    let mut sha = Sha256::new();
    // Reads larger than the BufReader's buffer bypass it once it is empty.
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = restarting(|| reader.read(&mut buf[..want]))?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("body ended {left} bytes early"),
            ));
        }
        sha.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hex(&sha.finalize()))
}

fn respond_error(out: &mut TcpStream, status: &str, name: &str) -> std::io::Result<()> {
    let body = format!("{status}\n");
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nX-Backend: {name}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

const TEXT: &str = "text/plain";

/// The status line and headers of a `200 OK` from backend `name`; without
/// `len`, no Content-Length (a body the connection's close ends).
fn ok_head(
    version: &str,
    name: &str,
    connection: &str,
    content_type: &str,
    len: Option<u64>,
) -> String {
    let length = len
        .map(|n| format!("Content-Length: {n}\r\n"))
        .unwrap_or_default();
    format!(
        "{version} 200 OK\r\n{length}Content-Type: {content_type}\r\nX-Backend: {name}\r\n\
         Connection: {connection}\r\n\r\n"
    )
}

/// A socket on `[::]:port` that also accepts IPv4 (IPV6_V6ONLY explicitly
/// off rather than relying on the namespace's bindv6only default), with
/// SO_REUSEADDR so a restarted backend can rebind at once; TCP sockets are
/// put in listening state.
fn dual_stack_socket(ty: Type, port: u16) -> std::io::Result<OwnedFd> {
    let socket = Socket::new(Domain::IPV6, ty, None)?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    if ty == Type::DGRAM {
        // Learn each datagram's destination address, to reply from it.
        let on: libc::c_int = 1;
        let raw = socket.as_raw_fd();
        setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, &on)
            .map_err(std::io::Error::other)?;
    }
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    if ty == Type::STREAM {
        socket.listen(1024)?;
    }
    Ok(socket.into())
}

/// UDP echo: answers every datagram with `<name>\n`.
///
/// A socket bound to the wildcard address would reply from the address the
/// route to the client picks (eth0's), not the VIP the client sent to, and
/// the client would discard it. So the destination address of each request
/// (IPV6_PKTINFO, which on a dual-stack socket also covers IPv4 as
/// v4-mapped addresses) is set as the source of the reply.
fn udp_loop(fd: OwnedFd, config: &Config) {
    let raw = fd.as_raw_fd();
    let reply = format!("{}\n", config.name);
    let mut buf = [0u8; 2048];
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 32];
    loop {
        // SAFETY: all-zero is a valid sockaddr_in6 / msghdr.
        let mut peer: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = (&raw mut peer).cast();
        msg.msg_namelen = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&control) as _;
        // SAFETY: msg points to live buffers of the stated sizes.
        let n = unsafe { libc::recvmsg(raw, &raw mut msg, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            fail(&format!("UDP recvmsg: {err}"));
        }

        let mut local: Option<libc::in6_addr> = None;
        // SAFETY: walking the control messages the kernel just wrote.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::IPPROTO_IPV6
                    && (*cmsg).cmsg_type == libc::IPV6_PKTINFO
                {
                    let info = libc::CMSG_DATA(cmsg)
                        .cast::<libc::in6_pktinfo>()
                        .read_unaligned();
                    local = Some(info.ipi6_addr);
                }
                cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
            }
        }
        if config.verbose {
            let peer_ip = Ipv6Addr::from(peer.sin6_addr.s6_addr);
            eprintln!(
                "{}: UDP from [{peer_ip}]:{}",
                config.name,
                u16::from_be(peer.sin6_port)
            );
        }

        let mut out_iov = libc::iovec {
            iov_base: reply.as_ptr() as *mut _,
            iov_len: reply.len(),
        };
        // SAFETY: all-zero msghdr is valid; fields set below.
        let mut out: libc::msghdr = unsafe { mem::zeroed() };
        out.msg_name = (&raw mut peer).cast();
        out.msg_namelen = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        out.msg_iov = &raw mut out_iov;
        out.msg_iovlen = 1;
        let mut out_control = [0u64; 8];
        if let Some(addr) = local {
            // SAFETY: out_control is aligned and large enough for one
            // in6_pktinfo control message (CMSG_SPACE(20) = 40 bytes).
            unsafe {
                let space = libc::CMSG_SPACE(mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
                out.msg_control = out_control.as_mut_ptr().cast();
                out.msg_controllen = space as _;
                let cmsg = libc::CMSG_FIRSTHDR(&raw const out);
                (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<libc::in6_pktinfo>() as u32) as _;
                // Interface 0: let routing choose; only the source matters.
                let info = libc::in6_pktinfo {
                    ipi6_addr: addr,
                    ipi6_ifindex: 0,
                };
                libc::CMSG_DATA(cmsg)
                    .cast::<libc::in6_pktinfo>()
                    .write_unaligned(info);
            }
        }
        // SAFETY: out points to live buffers of the stated sizes.
        if unsafe { libc::sendmsg(raw, &raw const out, 0) } < 0 && config.verbose {
            eprintln!(
                "{}: UDP sendmsg: {}",
                config.name,
                std::io::Error::last_os_error()
            );
        }
    }
}
