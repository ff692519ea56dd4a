//! The replication protocol's messages: a fixed header, flow records, and
//! an HMAC-SHA256 of both under the cluster's shared key. Flow updates and
//! heartbeats travel as UDP datagrams; a full copy travels over TCP as
//! length-prefixed messages of the same format.
//!
//! ```text
//! header (32 bytes): "XLBR" | version u8 | kind u8 | records u16
//!                    | sender u64 | seq u64 | sent_ms u64
//! record (80 bytes): vip [16] | vip port u16 | proto u8 | 0 u8
//!                    | client [16] | client port u16 | backend [16] | port u16
//!                    | snat [16] | snat port u16 | flags u8 | 0 u8 | timeout u32
//! flags: 1 = a NAT translation (snat, snat port and timeout are set)
//! tag (32 bytes):    HMAC-SHA256(key, header | records)
//! ```
//!
//! Addresses are 16 bytes (IPv4 as `::ffff:a.b.c.d`), integers big-endian.
//! Backends go by address and port, never by a node's local id.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::controller::ServiceId;

const MAGIC: &[u8; 4] = b"XLBR";
const VERSION: u8 = 2;
const HEADER_LEN: usize = 32;
const RECORD_LEN: usize = 80;
const RECORD_F_NAT: u8 = 1;
const TAG_LEN: usize = 32;

/// Records per UDP datagram: the datagram stays under 1,400 bytes, so it
/// is never fragmented on an Ethernet path.
pub const RECORDS_PER_DATAGRAM: usize = (1400 - HEADER_LEN - TAG_LEN) / RECORD_LEN;
/// Records per message of a full copy (TCP).
pub const RECORDS_PER_FRAME: usize = 1024;
/// Longest message, header to tag.
pub const MAX_MESSAGE: usize = HEADER_LEN + RECORDS_PER_FRAME * RECORD_LEN + TAG_LEN;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Flows the sender pinned (or, in a full copy, holds).
    Flows = 1,
    /// "I am here, and `seq` is my last flow message": lets a peer notice
    /// messages it missed.
    Heartbeat = 2,
    /// Asks for a full copy (TCP).
    SyncRequest = 3,
    /// Ends a full copy; `seq` is the number of records sent.
    SyncEnd = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Kind::Flows,
            2 => Kind::Heartbeat,
            3 => Kind::SyncRequest,
            4 => Kind::SyncEnd,
            _ => return None,
        })
    }
}

/// A message's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// The sending daemon's run: random at each start, so a restarted
    /// peer's sequence numbers are not taken for replays.
    pub sender: u64,
    /// Flows: this message's number in the sender's run (from 1);
    /// heartbeat: the last flow message's number.
    pub seq: u64,
    /// Wall-clock milliseconds when sent (replication lag).
    pub sent_ms: u64,
}

/// One flow pin, as it travels between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowRecord {
    pub service: ServiceId,
    pub client: SocketAddr,
    pub backend: SocketAddr,
    /// A NAT flow's translation; `None` for a DSR pin.
    pub nat: Option<Translation>,
}

/// What a NAT flow is translated to, beside its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// The SNAT address and allocated port the backend sees.
    pub snat: SocketAddr,
    /// The idle timeout in force, seconds.
    pub timeout_s: u32,
}

/// Why a message was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad authentication tag (a different shared key?)")]
    BadTag,
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// The cluster's shared key, ready to sign and verify.
#[derive(Clone)]
pub struct Key(Hmac<Sha256>);

impl Key {
    pub fn new(secret: &[u8]) -> Self {
        Self(Hmac::new_from_slice(secret).expect("HMAC takes keys of any length"))
    }
}

/// Encodes a message.
pub fn encode(key: &Key, header: &Header, records: &[FlowRecord]) -> Vec<u8> {
    assert!(records.len() <= RECORDS_PER_FRAME, "too many records");
    let mut out = Vec::with_capacity(HEADER_LEN + records.len() * RECORD_LEN + TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(header.kind as u8);
    out.extend_from_slice(&(records.len() as u16).to_be_bytes());
    out.extend_from_slice(&header.sender.to_be_bytes());
    out.extend_from_slice(&header.seq.to_be_bytes());
    out.extend_from_slice(&header.sent_ms.to_be_bytes());
    for r in records {
        let (vip, port, proto) = r.service;
        out.extend_from_slice(&v6(vip).octets());
        out.extend_from_slice(&port.to_be_bytes());
        out.extend_from_slice(&[proto, 0]);
        let unspecified = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0);
        let snat = r.nat.map_or(unspecified, |t| t.snat);
        for a in [r.client, r.backend, snat] {
            out.extend_from_slice(&v6(a.ip()).octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        let flags = if r.nat.is_some() { RECORD_F_NAT } else { 0 };
        out.extend_from_slice(&[flags, 0]);
        out.extend_from_slice(&r.nat.map_or(0, |t| t.timeout_s).to_be_bytes());
    }
    let mut mac = key.0.clone();
    mac.update(&out);
    out.extend_from_slice(&mac.finalize().into_bytes());
    out
}

/// Decodes a message, checking its tag before anything else is believed.
pub fn decode(key: &Key, msg: &[u8]) -> Result<(Header, Vec<FlowRecord>), WireError> {
    if msg.len() < HEADER_LEN + TAG_LEN {
        return Err(WireError::Malformed("shorter than a header"));
    }
    let (body, tag) = msg.split_at(msg.len() - TAG_LEN);
    let mut mac = key.0.clone();
    mac.update(body);
    mac.verify_slice(tag).map_err(|_| WireError::BadTag)?;
    if &body[..4] != MAGIC || body[4] != VERSION {
        return Err(WireError::Malformed("unknown magic or version"));
    }
    let kind = Kind::from_u8(body[5]).ok_or(WireError::Malformed("unknown kind"))?;
    let count = u16::from_be_bytes([body[6], body[7]]) as usize;
    if body.len() != HEADER_LEN + count * RECORD_LEN {
        return Err(WireError::Malformed(
            "length does not match the record count",
        ));
    }
    let u64_at = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    let header = Header {
        kind,
        sender: u64_at(8),
        seq: u64_at(16),
        sent_ms: u64_at(24),
    };
    let records = body[HEADER_LEN..]
        .chunks_exact(RECORD_LEN)
        .map(|r| {
            let addr = |i: usize| {
                let octets: [u8; 16] = r[i..i + 16].try_into().expect("16 bytes");
                let port = u16::from_be_bytes([r[i + 16], r[i + 17]]);
                SocketAddr::new(Ipv6Addr::from(octets).to_canonical(), port)
            };
            let vip = addr(0);
            let nat = (r[74] & RECORD_F_NAT != 0).then(|| Translation {
                snat: addr(56),
                timeout_s: u32::from_be_bytes(r[76..80].try_into().expect("4 bytes")),
            });
            FlowRecord {
                service: (vip.ip(), vip.port(), r[18]),
                client: addr(20),
                backend: addr(38),
                nat,
            }
        })
        .collect();
    Ok((header, records))
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u16) -> FlowRecord {
        FlowRecord {
            service: ("10.0.0.100".parse().unwrap(), 80, 6),
            client: SocketAddr::new("192.0.2.7".parse().unwrap(), 40000 + i),
            backend: "[2001:db8::11]:8080".parse().unwrap(),
            // Every other record a NAT translation.
            nat: (i % 2 == 1).then(|| Translation {
                snat: SocketAddr::new("10.0.200.1".parse().unwrap(), 10000 + i),
                timeout_s: 3600,
            }),
        }
    }

    fn header(kind: Kind) -> Header {
        Header {
            kind,
            sender: 0x1234_5678_9abc_def0,
            seq: 42,
            sent_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_full_datagram_round_trips_under_1400_bytes() {
        let key = Key::new(b"0123456789abcdef");
        let records: Vec<_> = (0..RECORDS_PER_DATAGRAM as u16).map(record).collect();
        let msg = encode(&key, &header(Kind::Flows), &records);
        assert!(msg.len() <= 1400, "{}", msg.len());
        assert_eq!(decode(&key, &msg), Ok((header(Kind::Flows), records)));
        let empty = encode(&key, &header(Kind::Heartbeat), &[]);
        assert_eq!(decode(&key, &empty), Ok((header(Kind::Heartbeat), vec![])));
    }

    #[test]
    fn another_key_or_any_changed_byte_is_refused() {
        let key = Key::new(b"0123456789abcdef");
        let msg = encode(&key, &header(Kind::Flows), &[record(1)]);
        let other = Key::new(b"0123456789abcdeF");
        assert_eq!(decode(&other, &msg), Err(WireError::BadTag));
        for i in 0..msg.len() {
            let mut bad = msg.clone();
            bad[i] ^= 1;
            assert_eq!(decode(&key, &bad), Err(WireError::BadTag), "byte {i}");
        }
        for len in 0..msg.len() {
            assert!(decode(&key, &msg[..len]).is_err(), "truncated to {len}");
        }
    }

    #[test]
    fn a_signed_but_inconsistent_message_is_malformed() {
        let key = Key::new(b"0123456789abcdef");
        let mut msg = encode(&key, &header(Kind::Flows), &[record(1)]);
        msg[7] = 2; // claims two records, carries one
        msg.truncate(msg.len() - TAG_LEN);
        let mut mac = key.0.clone();
        mac.update(&msg);
        msg.extend_from_slice(&mac.finalize().into_bytes());
        assert!(matches!(decode(&key, &msg), Err(WireError::Malformed(_))));
    }
}
