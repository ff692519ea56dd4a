//! Traffic helpers of the end-to-end tests: batches of requests and UDP
//! queries from the client, the backend's view of a connection, and bulk
//! transfers of a deterministic byte stream with the SHA-256 (`sha2`) of
//! what arrived.

use std::{
    collections::HashMap,
    io::{BufReader, Read as _, Write},
    net::SocketAddr,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use sha2::{Digest as _, Sha256};

use crate::{
    client::{self, read_head, read_response, restarting},
    lb::Tally,
    netns::Netns,
};

/// `digest` as lower-case hex.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Failures after which a batch of requests stops (the test has failed by
/// then; trying the rest would only take timeouts' worth of time).
const GIVE_UP_AFTER: usize = 3;

/// One HTTP GET of `/` to `addr` from each of `ports`, inside `client`.
/// Stops early after a few failures.
pub fn requests(
    client: &Netns,
    addr: SocketAddr,
    ports: impl Iterator<Item = u16> + Send,
) -> Tally {
    batch(client, ports, |port| {
        client::get(addr, Some(port), Duration::from_secs(3))
    })
}

/// One UDP query to `addr` from each of `ports`, inside `client`; the reply
/// must come from `addr` itself. Stops early after a few failures.
pub fn udp_queries(
    client: &Netns,
    addr: SocketAddr,
    ports: impl Iterator<Item = u16> + Send,
) -> Tally {
    batch(client, ports, |port| {
        client::udp_query(addr, Some(port), Duration::from_secs(2))
    })
}

/// `ask` from each of `ports` inside `client`, tallied by the backend name
/// it answers; stops after [`GIVE_UP_AFTER`] failures.
fn batch(
    client: &Netns,
    ports: impl Iterator<Item = u16> + Send,
    ask: impl Fn(u16) -> Result<String> + Send,
) -> Tally {
    client.run(move || {
        let mut tally = Tally::default();
        for port in ports {
            match ask(port) {
                Ok(name) => *tally.served.entry(name).or_default() += 1,
                Err(e) => tally.failed.push((port, format!("{e:#}"))),
            }
            if tally.failed.len() >= GIVE_UP_AFTER {
                break;
            }
        }
        tally
    })
}

/// `GET /peer` on `addr`: the backend's name and the address:port it saw
/// the connection come from.
pub fn peer(client: &Netns, addr: SocketAddr) -> Result<(String, SocketAddr)> {
    client.run(|| {
        let mut stream = client::connect(addr, None, Duration::from_secs(3))?;
        stream.write_all(b"GET /peer HTTP/1.0\r\nHost: xdplb\r\n\r\n")?;
        let (head, body) = read_response(stream).context("GET /peer")?;
        let seen: SocketAddr = body
            .parse()
            .with_context(|| format!("GET /peer answered {body:?}"))?;
        Ok((head.backend.unwrap_or_default(), seen))
    })
}

// ------------------------------------------------- bulk data and SHA-256

/// Size of the blocks of a [`Pattern`] stream.
pub const BLOCK: usize = 1 << 20;

/// A deterministic pseudo-random byte stream, the same in the test and in
/// `xdplb-testbackend`: a 1 MiB block of xorshift64* output, repeated, with
/// each block's first 8 bytes replaced by a value derived from the block's
/// index, so no two blocks are alike (a reordered or repeated block
/// changes the SHA-256). Cheap to produce: a copy per block.
pub struct Pattern {
    base: Vec<u8>,
}

impl Default for Pattern {
    fn default() -> Self {
        let mut x: u64 = 0x243f_6a88_85a3_08d3;
        let mut base = Vec::with_capacity(BLOCK);
        while base.len() < BLOCK {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            base.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        Pattern { base }
    }
}

impl Pattern {
    /// Block `index` of the stream.
    pub fn block(&self, index: u64, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.base);
        let stamp = index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ u64::from_le_bytes(self.base[..8].try_into().unwrap());
        out[..8].copy_from_slice(&stamp.to_le_bytes());
    }

    /// Writes the stream's first `n` bytes to `w`.
    pub fn write(&self, n: u64, w: &mut impl Write) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(BLOCK);
        let mut left = n;
        let mut index = 0;
        while left > 0 {
            self.block(index, &mut buf);
            let len = left.min(BLOCK as u64) as usize;
            w.write_all(&buf[..len])?;
            left -= len as u64;
            index += 1;
        }
        Ok(())
    }
}

/// The SHA-256 of the first `n` bytes of the [`Pattern`] stream (computed
/// once per size per process).
pub fn pattern_sha256(n: u64) -> Result<String> {
    static CACHE: OnceLock<Mutex<HashMap<u64, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(h) = cache.lock().unwrap().get(&n) {
        return Ok(h.clone());
    }
    let (pattern, mut block, mut sha) = (Pattern::default(), Vec::new(), Sha256::new());
    for (index, start) in (0..n).step_by(BLOCK).enumerate() {
        pattern.block(index as u64, &mut block);
        sha.update(&block[..(n - start).min(BLOCK as u64) as usize]);
    }
    let h = hex(&sha.finalize());
    cache.lock().unwrap().insert(n, h.clone());
    Ok(h)
}

/// One bulk transfer.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub bytes: u64,
    /// From the connect to the last byte (download) or to the answer
    /// (upload).
    pub elapsed: Duration,
    /// SHA-256 of what the receiving side got.
    pub sha256: String,
    /// The backend that served it (`X-Backend`).
    pub backend: String,
}

impl Transfer {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.elapsed.as_secs_f64()
    }
}

/// Downloads `n` bytes of the pattern stream from `xdplb-testbackend` at
/// `addr` (`GET /bytes?n=N`), hashing what arrives. Call inside the client
/// namespace ([`Netns::run`]).
pub fn download(addr: SocketAddr, n: u64, timeout: Duration) -> Result<Transfer> {
    let ctx = || format!("downloading {n} bytes from http://{addr}/bytes");
    let mut sha = Sha256::new();
    let start = Instant::now();
    let mut stream = client::connect(addr, None, timeout).with_context(ctx)?;
    write!(
        stream,
        "GET /bytes?n={n} HTTP/1.1\r\nHost: xdplb\r\nConnection: close\r\n\r\n"
    )
    .with_context(ctx)?;
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let head = read_head(&mut reader).with_context(ctx)?;
    ensure!(head.status == 200, "{}: status {}", ctx(), head.status);
    ensure!(
        head.content_length == Some(n),
        "{}: Content-Length {:?}",
        ctx(),
        head.content_length
    );
    // Reads larger than the BufReader's buffer bypass it once it is empty.
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while got < n {
        let want = (n - got).min(buf.len() as u64) as usize;
        let k = restarting(|| reader.read(&mut buf[..want]))
            .with_context(|| format!("{} after {got} bytes", ctx()))?;
        ensure!(k > 0, "{}: connection closed after {got} bytes", ctx());
        sha.update(&buf[..k]);
        got += k as u64;
    }
    Ok(Transfer {
        bytes: n,
        elapsed: start.elapsed(),
        sha256: hex(&sha.finalize()),
        backend: head.backend.unwrap_or_default(),
    })
}

/// Uploads `n` bytes of the pattern stream to `xdplb-testbackend` at
/// `addr` (`POST /sha256`), which answers the SHA-256 of what it received.
/// Call inside the client namespace.
pub fn upload(addr: SocketAddr, n: u64, timeout: Duration) -> Result<Transfer> {
    let ctx = || format!("uploading {n} bytes to http://{addr}/sha256");
    let pattern = Pattern::default();
    let start = Instant::now();
    let mut stream = client::connect(addr, None, timeout).with_context(ctx)?;
    write!(
        stream,
        "POST /sha256 HTTP/1.1\r\nHost: xdplb\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    )
    .with_context(ctx)?;
    pattern.write(n, &mut stream).with_context(ctx)?;
    let (head, body) = read_response(stream).with_context(ctx)?;
    Ok(Transfer {
        bytes: n,
        elapsed: start.elapsed(),
        sha256: body,
        backend: head.backend.unwrap_or_default(),
    })
}
