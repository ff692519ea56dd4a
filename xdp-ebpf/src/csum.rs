//! Incremental Internet checksum updates (RFC 1624): when a field changes
//! from `m` to `m'`, the checksum `HC` becomes `~(~HC + ~m + m')`. Fields
//! and checksums are handled as the native-endian values of their wire
//! bytes; the one's-complement sum is byte-order independent (RFC 1071),
//! so no byte swapping is needed.

/// A running `Σ(~m + m')` over changed 16-bit words.
#[derive(Clone, Copy, Default)]
pub struct Diff(u32);

impl Diff {
    #[inline(always)]
    pub fn u16(&mut self, old: u16, new: u16) {
        self.0 += u32::from(!old) + u32::from(new);
    }

    #[inline(always)]
    pub fn u32(&mut self, old: u32, new: u32) {
        self.u16(old as u16, new as u16);
        self.u16((old >> 16) as u16, (new >> 16) as u16);
    }

    #[inline(always)]
    pub fn addr(&mut self, old: &[u32; 4], new: &[u32; 4], v6: bool) {
        if v6 {
            self.u32(old[0], new[0]);
            self.u32(old[1], new[1]);
            self.u32(old[2], new[2]);
        }
        self.u32(old[3], new[3]);
    }

    /// Adds another diff (a checksum field that itself lies inside the
    /// checksummed data changed too).
    #[inline(always)]
    pub fn add(&mut self, other: Diff) {
        self.0 = fold32(self.0) + fold32(other.0);
    }

    /// The updated checksum.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        !fold(u32::from(!check) + fold32(self.0))
    }
}

#[inline(always)]
fn fold32(s: u32) -> u32 {
    (s & 0xffff) + (s >> 16)
}

#[inline(always)]
fn fold(s: u32) -> u16 {
    let s = fold32(s);
    fold32(s) as u16
}

/// Writes a checksum computed by `apply` into a UDP checksum field, where 0
/// means "none" and must be sent as 0xffff.
#[inline(always)]
pub fn udp(check: u16) -> u16 {
    if check == 0 {
        0xffff
    } else {
        check
    }
}
