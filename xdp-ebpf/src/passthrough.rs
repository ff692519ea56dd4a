//! Pass-through XDP programs with no maps.
//!
//! `xdp_pass` gives a veth the NAPI instance it needs to receive frames its
//! peer sends with XDP_TX/XDP_REDIRECT: without it (and GRO alone does not
//! suffice on every kernel) such frames queue and are never delivered.
//! `xdplb pass-through` attaches it. It is also the XDP_PASS floor the
//! benchmarks measure against, and `xdp_mac_swap` the XDP_TX floor.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Swaps the Ethernet addresses and bounces the frame: the least work any
/// forwarding XDP program can do.
#[xdp]
pub fn xdp_mac_swap(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let eth = start as *mut [u8; 12];
    // SAFETY: bounds checked above.
    unsafe {
        let mut macs = *eth;
        macs.rotate_left(6);
        *eth = macs;
    }
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
