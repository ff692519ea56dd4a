//! The datapath's "is this frame for us?" table (`xdp_common::ifmac`): for
//! every attached interface, its own MAC plus the configured extra MACs
//! (`[cluster] extra_macs`, e.g. a VRRP virtual MAC). Frames to any other
//! destination MAC are passed untouched and counted as `pass_not_for_us`.
//! The table is one of the [`Maps`](crate::dataplane::Maps), written by
//! the controller (`Controller::add_interface` and `apply`).

use std::{collections::BTreeSet, os::fd::AsRawFd as _};

use anyhow::{bail, Context as _, Result};
use aya::maps::{HashMap, Map, MapData};
use socket2::{Domain, Socket, Type};
use xdp_common::ifmac::{IfMacKey, MAP_NAME};

/// A MAC address as on the wire.
pub type Mac = [u8; 6];

/// Handle on the pinned MAC table.
pub struct IfMacs {
    map: HashMap<MapData, IfMacKey, u32>,
}

impl IfMacs {
    pub(crate) fn from_map(map: Map) -> Result<Self> {
        let map = map
            .try_into()
            .with_context(|| format!("map {MAP_NAME} has an unexpected type"))?;
        Ok(Self { map })
    }

    /// Makes the table hold exactly, for each `(ifindex, own MAC)` of
    /// `interfaces`, that MAC and every one of `extra`. Entries of other
    /// interfaces (attached by another daemon sharing the pins? none today)
    /// are left alone; stale MACs of these interfaces are removed. Inserts
    /// come before removals, so a MAC that stays is never missing.
    pub fn sync(&mut self, interfaces: &[(u32, Mac)], extra: &[Mac]) -> Result<()> {
        let wanted: BTreeSet<(u32, Mac)> = interfaces
            .iter()
            .flat_map(|&(ifindex, own)| {
                std::iter::once(own)
                    .chain(extra.iter().copied())
                    .map(move |mac| (ifindex, mac))
            })
            .collect();
        for &(ifindex, mac) in &wanted {
            let key = IfMacKey {
                ifindex,
                mac,
                _pad: 0,
            };
            self.map
                .insert(key, 1, 0)
                .with_context(|| format!("accepting MAC {} on ifindex {ifindex}", show(&mac)))?;
        }
        let ours: BTreeSet<u32> = interfaces.iter().map(|&(i, _)| i).collect();
        self.remove_where(|k| ours.contains(&k.ifindex) && !wanted.contains(&(k.ifindex, k.mac)))
    }

    /// Removes every MAC accepted on `ifindex`.
    pub fn forget(&mut self, ifindex: u32) -> Result<()> {
        self.remove_where(|k| k.ifindex == ifindex)
    }

    fn remove_where(&mut self, stale: impl Fn(&IfMacKey) -> bool) -> Result<()> {
        let keys: Vec<IfMacKey> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(stale)
            .collect();
        for k in keys {
            self.map.remove(&k).with_context(|| {
                format!("removing MAC {} of ifindex {}", show(&k.mac), k.ifindex)
            })?;
        }
        Ok(())
    }

    /// Every accepted (ifindex, MAC) pair.
    pub fn entries(&self) -> Vec<(u32, Mac)> {
        self.map
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.ifindex, k.mac))
            .collect()
    }
}

/// The Ethernet address of `iface` in the calling thread's network
/// namespace (SIOCGIFHWADDR; sysfs would show the namespace it was
/// mounted in, which is not ours when the daemon was started by setns).
pub fn interface_mac(iface: &str) -> Result<Mac> {
    if iface.len() >= libc::IFNAMSIZ || iface.contains('\0') {
        bail!("{iface:?} is not an interface name");
    }
    let socket =
        Socket::new(Domain::IPV4, Type::DGRAM, None).context("socket() for SIOCGIFHWADDR")?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the NUL-terminated name and writes the
    // hardware address into `req`, which outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading the MAC address of interface {iface:?}"));
    }
    // SAFETY: the ioctl filled the hwaddr member of the union.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    if hw.sa_family != libc::ARPHRD_ETHER {
        bail!(
            "interface {iface:?} is not an Ethernet interface (hardware type {})",
            hw.sa_family
        );
    }
    Ok(std::array::from_fn(|i| hw.sa_data[i] as u8))
}

/// Parses `aa:bb:cc:dd:ee:ff` (case-insensitive).
pub fn parse_mac(text: &str) -> Result<Mac, String> {
    // Each part must be exactly two hex digits: "2:0:0:0:0:0" is refused.
    let bytes: Option<Vec<u8>> = text
        .split(':')
        .map(|part| {
            u8::from_str_radix(part, 16)
                .ok()
                .filter(|_| part.len() == 2)
        })
        .collect();
    bytes
        .and_then(|bytes| Mac::try_from(bytes).ok())
        .ok_or_else(|| format!("{text:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)"))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn show(mac: &Mac) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_shows_macs() {
        let mac = parse_mac("02:00:5E:00:01:0a").unwrap();
        assert_eq!(mac, [2, 0, 0x5e, 0, 1, 10]);
        assert_eq!(show(&mac), "02:00:5e:00:01:0a");
        for bad in [
            "",
            "02:00:5e:00:01",
            "02:00:5e:00:01:0a:00",
            "0g:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?} accepted");
        }
    }
}
