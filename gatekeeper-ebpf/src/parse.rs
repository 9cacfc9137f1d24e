//! Header parsing: Ethernet, up to `MAX_VLAN_DEPTH` VLAN tags, IPv4 or IPv6 (through up to
//! `MAX_EXT_HEADERS` extension headers), and the L4 fields the policy looks at.
//!
//! Every helper is `#[inline(always)]`, and every packet read goes through `load`, which checks
//! the bounds against `data_end` immediately before the access: the verifier must find that check
//! on the path to each read, and an out-of-line helper or a check LLVM had moved away would hide
//! it. The reference model (`gatekeeper::policy::reference`) parses the same way, with the same
//! `gatekeeper_common` constants.

use aya_ebpf::programs::XdpContext;
use gatekeeper_common::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST, ICMPV6_MLDV2_REPORT, ICMPV6_NEIGHBOR_FIRST, ICMPV6_NEIGHBOR_LAST, IPV6_EXT_AH,
    IPV6_EXT_DEST_OPTS, IPV6_EXT_FRAGMENT, IPV6_EXT_HOP_BY_HOP, IPV6_EXT_ROUTING, MAX_EXT_HEADERS, MAX_VLAN_DEPTH,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

const ETH_HLEN: usize = 14;

/// A parsed IP packet. Addresses are kept as the words found on the wire.
#[derive(Clone, Copy)]
pub(crate) struct Packet {
    pub(crate) family: u8,
    pub(crate) proto: u8,
    /// The L4 ports are meaningful for rules (TCP/UDP, not a non-first fragment).
    pub(crate) has_ports: bool,
    /// The packet belongs to a tracked flow kind (TCP, UDP, ICMP echo) and has its ports/id.
    pub(crate) trackable: bool,
    /// ICMPv6 neighbour discovery or multicast listener message: passes untouched.
    pub(crate) neighbor: bool,
    /// The header chain is broken or truncated after the addresses.
    pub(crate) malformed: bool,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) src: [u32; 4],
    pub(crate) dst: [u32; 4],
}

impl Packet {
    #[inline(always)]
    fn new(family: u8, proto: u8, src: [u32; 4], dst: [u32; 4]) -> Self {
        Self {
            family,
            proto,
            has_ports: false,
            trackable: false,
            neighbor: false,
            malformed: false,
            sport: 0,
            dport: 0,
            src,
            dst,
        }
    }
}

pub(crate) enum Parsed {
    NonIp,
    /// An IP packet too broken to read its addresses from.
    Unattributable,
    Ip(Packet),
}

/// Reads `N` bytes at `offset`, checking the bounds immediately before the access so that the
/// verifier sees the check (LLVM may not move it past the load).
#[inline(always)]
fn load<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + N > end {
        return None;
    }
    // SAFETY: bounds checked above; `[u8; N]` has alignment 1.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) })
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// Native-endian on purpose: addresses stay in wire order, as the map keys store them.
#[inline(always)]
fn word(b: &[u8; 4]) -> u32 {
    u32::from_ne_bytes(*b)
}

#[inline(always)]
pub(crate) fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = load::<ETH_HLEN>(ctx, 0) else {
        return Parsed::Unattributable;
    };
    let mut ethertype = be16(eth[12], eth[13]);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_DEPTH {
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let Some(tag) = load::<4>(ctx, offset) else {
                return Parsed::Unattributable;
            };
            ethertype = be16(tag[2], tag[3]);
            offset += 4;
        }
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, offset),
        ETH_P_IPV6 => parse_ipv6(ctx, offset),
        // A third VLAN tag: we cannot see what is inside, so we cannot let it through unjudged.
        ETH_P_8021Q | ETH_P_8021AD => Parsed::Unattributable,
        _ => Parsed::NonIp,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Parsed {
    let Some(h) = load::<20>(ctx, offset) else {
        return Parsed::Unattributable;
    };
    if h[0] >> 4 != 4 {
        return Parsed::Unattributable;
    }
    let mut p = Packet::new(
        4,
        h[9],
        [word(&[h[12], h[13], h[14], h[15]]), 0, 0, 0],
        [word(&[h[16], h[17], h[18], h[19]]), 0, 0, 0],
    );
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 || offset + ihl > ctx.data_end() - ctx.data() {
        p.malformed = true;
        return Parsed::Ip(p);
    }
    // A non-first fragment carries no L4 header: it is judged without ports.
    if be16(h[6], h[7]) & 0x1fff != 0 {
        return Parsed::Ip(p);
    }
    parse_l4(ctx, offset + ihl, p)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Parsed {
    let Some(h) = load::<40>(ctx, offset) else {
        return Parsed::Unattributable;
    };
    if h[0] >> 4 != 6 {
        return Parsed::Unattributable;
    }
    let mut p = Packet::new(
        6,
        h[6],
        [
            word(&[h[8], h[9], h[10], h[11]]),
            word(&[h[12], h[13], h[14], h[15]]),
            word(&[h[16], h[17], h[18], h[19]]),
            word(&[h[20], h[21], h[22], h[23]]),
        ],
        [
            word(&[h[24], h[25], h[26], h[27]]),
            word(&[h[28], h[29], h[30], h[31]]),
            word(&[h[32], h[33], h[34], h[35]]),
            word(&[h[36], h[37], h[38], h[39]]),
        ],
    );
    let mut offset = offset + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match p.proto {
            // Length in 8-octet units, not counting the first.
            IPV6_EXT_HOP_BY_HOP | IPV6_EXT_ROUTING | IPV6_EXT_DEST_OPTS => {
                let Some(e) = load::<2>(ctx, offset) else {
                    p.malformed = true;
                    return Parsed::Ip(p);
                };
                p.proto = e[0];
                offset += (e[1] as usize + 1) * 8;
            }
            // Length in 4-octet units, not counting the first two.
            IPV6_EXT_AH => {
                let Some(e) = load::<2>(ctx, offset) else {
                    p.malformed = true;
                    return Parsed::Ip(p);
                };
                p.proto = e[0];
                offset += (e[1] as usize + 2) * 4;
            }
            IPV6_EXT_FRAGMENT => {
                let Some(e) = load::<8>(ctx, offset) else {
                    p.malformed = true;
                    return Parsed::Ip(p);
                };
                p.proto = e[0];
                offset += 8;
                if be16(e[2], e[3]) >> 3 != 0 {
                    // Non-first fragment: no L4 header here.
                    return Parsed::Ip(p);
                }
            }
            _ => return parse_l4(ctx, offset, p),
        }
    }
    match p.proto {
        // Still inside the extension header chain: too long to follow.
        IPV6_EXT_HOP_BY_HOP | IPV6_EXT_ROUTING | IPV6_EXT_DEST_OPTS | IPV6_EXT_AH | IPV6_EXT_FRAGMENT => {
            p.malformed = true;
            Parsed::Ip(p)
        }
        _ => parse_l4(ctx, offset, p),
    }
}

#[inline(always)]
fn parse_l4(ctx: &XdpContext, offset: usize, mut p: Packet) -> Parsed {
    // Headers claimed to run past the end of the frame.
    if ctx.data() + offset > ctx.data_end() {
        p.malformed = true;
        return Parsed::Ip(p);
    }
    match p.proto {
        PROTO_TCP => {
            let Some(t) = load::<20>(ctx, offset) else {
                p.malformed = true;
                return Parsed::Ip(p);
            };
            p.sport = be16(t[0], t[1]);
            p.dport = be16(t[2], t[3]);
            p.has_ports = true;
            p.trackable = true;
        }
        PROTO_UDP => {
            let Some(u) = load::<8>(ctx, offset) else {
                p.malformed = true;
                return Parsed::Ip(p);
            };
            p.sport = be16(u[0], u[1]);
            p.dport = be16(u[2], u[3]);
            p.has_ports = true;
            p.trackable = true;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            let Some(i) = load::<8>(ctx, offset) else {
                p.malformed = true;
                return Parsed::Ip(p);
            };
            let ty = i[0];
            let echo = if p.family == 4 {
                p.proto == PROTO_ICMP && (ty == ICMP_ECHO_REQUEST || ty == ICMP_ECHO_REPLY)
            } else {
                p.proto == PROTO_ICMPV6 && (ty == ICMPV6_ECHO_REQUEST || ty == ICMPV6_ECHO_REPLY)
            };
            if echo {
                // Both directions of an echo exchange share the identifier.
                let id = be16(i[4], i[5]);
                p.sport = id;
                p.dport = id;
                p.trackable = true;
            }
            p.neighbor = p.family == 6
                && p.proto == PROTO_ICMPV6
                && ((ICMPV6_NEIGHBOR_FIRST..=ICMPV6_NEIGHBOR_LAST).contains(&ty) || ty == ICMPV6_MLDV2_REPORT);
        }
        _ => {}
    }
    Parsed::Ip(p)
}
