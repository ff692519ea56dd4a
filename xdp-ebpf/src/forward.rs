//! The last step towards a backend: rewrite the Ethernet addresses to the
//! backend's next hop and send the frame on. DSR services send the frame
//! with IP and L4 untouched (the backend holds the VIP on a loopback
//! address and replies directly to the client); NAT services rewrite IP
//! and L4 first, then send the same way.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::eth::EthHdr;
use xdp_common::{Backend, Reason};

use crate::{maps::TX_PORTS, parse::ptr_at, stats::count};

/// Rewrites the MACs to `backend`'s next hop and sends the frame there;
/// returns the verdict, or `Err` with the reason the frame goes to the
/// kernel instead (checked before anything is written).
#[inline(always)]
pub fn send_to(ctx: &XdpContext, backend: &Backend) -> Result<u32, Reason> {
    if !backend.next_hop_resolved() {
        return Err(Reason::PassNoNeigh);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = backend.dst_mac;
        (*eth).src_addr = backend.src_mac;
    }
    send(ctx, backend.ifindex)
}

/// Sends the (rewritten) frame out of `ifindex`: XDP_TX when that is the
/// interface it came in on, XDP_REDIRECT through the devmap otherwise.
#[inline(always)]
pub fn send(ctx: &XdpContext, ifindex: u32) -> Result<u32, Reason> {
    if ifindex as usize == ctx.ingress_ifindex() {
        count(Reason::Tx);
        return Ok(xdp_action::XDP_TX);
    }
    match TX_PORTS.redirect(ifindex, 0) {
        Ok(verdict) => {
            count(Reason::Redirect);
            Ok(verdict)
        }
        Err(_) => {
            count(Reason::DropRedirect);
            Ok(xdp_action::XDP_DROP)
        }
    }
}
