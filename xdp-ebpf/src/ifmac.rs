//! Only frames addressed to the receiving interface (or to a configured
//! extra MAC) are balanced; see `xdp_common::ifmac`.

use aya_ebpf::{macros::map, maps::HashMap, programs::XdpContext};
use network_types::eth::EthHdr;
use xdp_common::ifmac::{IfMacKey, MAX_IF_MACS};

use crate::parse::ptr_at;

#[map(name = "xdplb_ifmac_v1")]
pub static IF_MACS: HashMap<IfMacKey, u32> = HashMap::pinned(MAX_IF_MACS, 0);

/// True when the frame's destination MAC is one this interface accepts.
/// One hash look-up; a frame too short for an Ethernet header is not ours.
#[inline(always)]
pub fn for_us(ctx: &XdpContext) -> bool {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    let key = IfMacKey {
        ifindex: ctx.ingress_ifindex() as u32,
        // SAFETY: bounds-checked by ptr_at.
        mac: unsafe { (*eth).dst_addr },
        _pad: 0,
    };
    // SAFETY: read-only look-up of a plain value.
    unsafe { IF_MACS.get(&key) }.is_some()
}
