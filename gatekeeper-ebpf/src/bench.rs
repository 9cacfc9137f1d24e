//! Helper XDP programs for the benchmarks; never attached by the daemon.
//!
//! * `gk_empty`: passes everything; timed beside the real program so its cost can be subtracted.
//! * `gk_redirect`: sends every frame out of the interface in `BENCH_TARGET[0]`; with
//!   BPF_PROG_TEST_RUN in live-frames mode it is a line-rate traffic generator.
//! * `gk_sink`: counts the generator's frames (IPv4 UDP from port 4000) into `BENCH_SINK[0]`
//!   and drops them; anything else (neighbour discovery and the like) passes uncounted.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

#[map]
static BENCH_TARGET: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static BENCH_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn gk_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn gk_redirect(_ctx: XdpContext) -> u32 {
    let ifindex = BENCH_TARGET.get(0).copied().unwrap_or(0);
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

/// Source port of the generator's frames.
const GENERATOR_SPORT: u16 = 4000;

#[xdp]
pub fn gk_sink(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 42 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: 42 bytes (Ethernet, IPv4 without options, UDP) checked just above.
    let h = unsafe { core::ptr::read_unaligned(start as *const [u8; 42]) };
    let ours = h[12] == 0x08
        && h[13] == 0x00
        && h[14] == 0x45
        && h[23] == 17
        && u16::from_be_bytes([h[34], h[35]]) == GENERATOR_SPORT;
    if !ours {
        return xdp_action::XDP_PASS;
    }
    if let Some(c) = BENCH_SINK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
