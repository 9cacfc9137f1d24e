//! Kernel/user shared types: every BPF map's key and value, and the constants both sides agree on.
//!
//! Everything here is `#[repr(C)]` with explicit padding fields, because hash and LPM keys are
//! compared byte for byte: an implicit padding byte left uninitialised on one side would make
//! lookups miss. The layout of every type is pinned by `const` assertions below and by the
//! offset tests at the bottom of this file.
//!
//! # The maps (defined in `gatekeeper-ebpf/src/main.rs`, written by `gatekeeper::dataplane`)
//!
//! | map            | type              | key                  | value          | written by |
//! |----------------|-------------------|----------------------|----------------|------------|
//! | `GK_EPOCH`     | array\[1\]        | `u32` index 0        | `u32` epoch    | daemon: one store flips the policy generation (`gen = epoch % GENERATIONS`) |
//! | `GK_GEN_CONFIG`| array\[4\]        | `u32` generation     | [`GenConfig`]  | daemon, only for an inactive generation |
//! | `GK_HOSTS_V4`  | hash              | [`HostV4`]           | [`Identity`]   | daemon: an inactive generation; tag moves replace entries of the active one, each atomically (/32 entries) |
//! | `GK_HOSTS_V6`  | hash              | [`HostV6`]           | [`Identity`]   | daemon: an inactive generation; tag moves replace entries of the active one, each atomically (/128 entries) |
//! | `GK_IDS_V4`    | LPM trie          | [`LpmV4`]            | [`Identity`]   | daemon, only for an inactive generation (shorter prefixes) |
//! | `GK_IDS_V6`    | LPM trie          | [`LpmV6`]            | [`Identity`]   | daemon, only for an inactive generation (shorter prefixes) |
//! | `GK_PORT_CLASS`| array             | [`port_class_index`] | `u32` class    | daemon, only for an inactive generation |
//! | `GK_POLICY`    | hash              | [`PolicyKey`]        | [`PolicyValue`]| daemon: an inactive generation; tag moves add entries of appearing identities to the active one |
//! | `GK_FLOWS_V4`  | LRU hash          | [`FlowKeyV4`]        | [`FlowValue`]  | XDP program (create, refresh, revoke); daemon may clear |
//! | `GK_FLOWS_V6`  | LRU hash          | [`FlowKey`]          | [`FlowValue`]  | XDP program (create, refresh, revoke); daemon may clear |
//! | `GK_STATS`     | per-CPU array     | [`stats_index`]`(ifindex, OUTCOME_*)` | [`Counter`] | XDP program |
//! | `GK_RULE_STATS`| per-CPU array     | rule slot            | [`Counter`]    | XDP program; daemon zeroes a slot before reusing it |
//! | `GK_ID_DROPS`  | LRU per-CPU hash  | `u32` identity       | [`IdDrops`]    | XDP program (policy drops and would-drops, charged to one identity) |
//!
//! Host addresses (the usual asset) are looked up in a hash first: one lookup, whatever the
//! number of assets; only addresses not found there walk the LPM trie of shorter prefixes. Each
//! host entry already carries the segments of every prefix containing it.
//!
//! Policy maps hold four generations side by side (the generation is the first byte of every
//! key). The program reads the epoch once per packet and uses only that generation, so a packet
//! is judged entirely by the old policy or entirely by the new one, never by a mix. The daemon
//! writes only a generation that no packet can still be using: the one retired three flips ago,
//! once an RCU grace period begun after its retirement has passed.
#![no_std]

/// Version of the map layout. Pinned maps live under `<pin_dir>/v<LAYOUT_VERSION>/`; a daemon
/// finding pins of another version (or incompatible ones) never reuses them. Bump it with any
/// change to a map's key, value or type.
pub const LAYOUT_VERSION: u32 = 5;

/// Policy generations side by side in every policy map; the program uses `epoch % GENERATIONS`.
/// Four, not three: two flips can go by per grace period before an apply waits, and 2^32 is a
/// multiple of four, so `epoch` wrapping around never reuses the active generation.
pub const GENERATIONS: u32 = 4;

/// Identity of addresses that belong to no segment.
pub const ID_WORLD: u32 = 0;
/// Wildcard identity in [`PolicyKey`]: a rule whose `from` or `to` is `any`.
pub const ID_ANY: u32 = u32::MAX;
/// No rule: in [`PolicyValue`] fields and as "no deciding rule".
pub const NO_RULE: u32 = u32::MAX;

/// [`Identity::flags`]: the address is in at least one `enforce` segment.
pub const GOVERN_ENFORCE: u32 = 1;
/// [`Identity::flags`]: the address is in at least one `monitor` segment.
pub const GOVERN_MONITOR: u32 = 2;

/// [`GenConfig::flags`]: some segment of this generation enforces (malformed packets whose
/// addresses cannot be read are then dropped).
pub const CFG_ANY_ENFORCE: u32 = 1;
/// [`GenConfig::flags`]: some segment of this generation is in monitor mode.
pub const CFG_ANY_MONITOR: u32 = 2;
/// [`GenConfig::flags`]: some rule has `from: any` (look up `(ANY, dst)`).
pub const CFG_SRC_ANY: u32 = 4;
/// [`GenConfig::flags`]: some rule has `to: any` (look up `(src, ANY)`).
pub const CFG_DST_ANY: u32 = 8;
/// [`GenConfig::flags`]: some rule has both `from: any` and `to: any`.
pub const CFG_ANY_ANY: u32 = 16;

/// Protocol classes used in [`PolicyKey::proto`]. Rules can only name these protocols, so
/// folding every other IP protocol into [`PROTO_OTHER`] loses nothing.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_OTHER: u8 = 255;

// ---- Wire constants ------------------------------------------------------------------------
// Read by both parsers, the XDP program's and the reference model's
// (`gatekeeper::policy::reference`), so the two cannot disagree about which header is which.

/// Ethertype of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// Ethertype of IPv6.
pub const ETH_P_IPV6: u16 = 0x86DD;
/// Ethertype of an 802.1Q (customer) VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// Ethertype of an 802.1ad (service, "QinQ" outer) VLAN tag.
pub const ETH_P_8021AD: u16 = 0x88A8;
/// VLAN tags parsed through (802.1ad outer plus 802.1Q inner, in any order). A frame with more
/// cannot be seen into, so it is unattributable rather than let through unjudged.
pub const MAX_VLAN_DEPTH: usize = 2;

// IPv6 extension headers (next-header numbers) skipped on the way to the L4 header.

/// Hop-by-hop options: length in 8-octet units, not counting the first.
pub const IPV6_EXT_HOP_BY_HOP: u8 = 0;
/// Routing header: length in 8-octet units, not counting the first.
pub const IPV6_EXT_ROUTING: u8 = 43;
/// Fragment header: always 8 octets; a non-zero offset means no L4 header follows.
pub const IPV6_EXT_FRAGMENT: u8 = 44;
/// Authentication header: length in 4-octet units, not counting the first two.
pub const IPV6_EXT_AH: u8 = 51;
/// Destination options: length in 8-octet units, not counting the first.
pub const IPV6_EXT_DEST_OPTS: u8 = 60;
/// IPv6 extension headers followed before giving up; a longer chain is malformed. A fixed bound
/// keeps the XDP program's loop finite for the verifier.
pub const MAX_EXT_HEADERS: usize = 8;

/// ICMP echo reply: with the echo request, the only ICMP messages that open or match a flow.
pub const ICMP_ECHO_REPLY: u8 = 0;
/// ICMP echo request.
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMPv6 echo request: with the echo reply, the only ICMPv6 messages that open or match a flow.
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
/// ICMPv6 echo reply.
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// First of the ICMPv6 types that pass untouched (IPv6 cannot work without them):
/// 130-132 multicast listener query, report, done; 133-137 router solicitation and
/// advertisement, neighbour solicitation and advertisement, redirect.
pub const ICMPV6_NEIGHBOR_FIRST: u8 = 130;
/// Last of the contiguous range starting at [`ICMPV6_NEIGHBOR_FIRST`] (redirect).
pub const ICMPV6_NEIGHBOR_LAST: u8 = 137;
/// Multicast listener report version 2, which also passes untouched.
pub const ICMPV6_MLDV2_REPORT: u8 = 143;

/// Port class of packets that carry no port: non-first fragments, ICMP, other protocols.
/// Only rules without a port restriction cover it.
pub const PORT_CLASS_NONE: u32 = 0;
/// Port-class array: per generation, per L4 protocol (TCP, UDP), one entry per port.
pub const PORT_CLASS_ENTRIES: u32 = GENERATIONS * 2 * 65536;

/// Index of `port` for `l4` (0 = TCP, 1 = UDP) in generation `gen` of `GK_PORT_CLASS`.
#[inline(always)]
pub const fn port_class_index(generation: u32, l4: u32, port: u16) -> u32 {
    ((generation % GENERATIONS) << 17) | ((l4 & 1) << 16) | port as u32
}

/// Per-packet outcomes: every packet increments exactly one of these in `GK_STATS`, in the block
/// of the interface it arrived on.
pub const OUTCOME_PASS_NON_IP: u32 = 0;
pub const OUTCOME_PASS_NEIGHBOR: u32 = 1;
pub const OUTCOME_PASS_UNGOVERNED: u32 = 2;
pub const OUTCOME_PASS_FLOW: u32 = 3;
pub const OUTCOME_PASS_ALLOWED: u32 = 4;
pub const OUTCOME_DROP_DENY_RULE: u32 = 5;
pub const OUTCOME_DROP_DEFAULT: u32 = 6;
pub const OUTCOME_MONITOR_DENY_RULE: u32 = 7;
pub const OUTCOME_MONITOR_DEFAULT: u32 = 8;
pub const OUTCOME_DROP_MALFORMED: u32 = 9;
pub const OUTCOME_MONITOR_MALFORMED: u32 = 10;
pub const OUTCOME_PASS_MALFORMED: u32 = 11;
/// Events counted in addition to the outcome.
pub const EVENT_FLOW_REVOKED: u32 = 12;
pub const EVENT_FLOW_INSERT_FAILED: u32 = 13;
/// Counters in use in each interface's block of `GK_STATS` (outcomes, then events).
pub const STATS_COUNTERS: u32 = 14;
/// Each interface's block of `GK_STATS`: [`STATS_COUNTERS`] padded to a power of two.
pub const STATS_PER_INTERFACE: u32 = 16;
/// Interfaces with an ifindex below this have a block of their own in `GK_STATS`; the others
/// share block 0 (ifindex 0 is never a device). Bridge ports of an appliance have small
/// indexes; 512 blocks keep the per-CPU array at 128 KiB per CPU.
pub const STATS_IFINDEX_LIMIT: u32 = 512;
/// Entries of `GK_STATS`.
pub const STATS_ENTRIES: u32 = STATS_IFINDEX_LIMIT * STATS_PER_INTERFACE;
/// ifindex of the loopback device, whose block counts the frames of `BPF_PROG_TEST_RUN` (the
/// kernel runs them as if received on the loopback device of the caller's namespace).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// Index of counter `counter` (`OUTCOME_*` or `EVENT_*`) of interface `ifindex` in `GK_STATS`.
#[inline(always)]
pub const fn stats_index(ifindex: u32, counter: u32) -> u32 {
    let block = if ifindex < STATS_IFINDEX_LIMIT { ifindex } else { 0 };
    block * STATS_PER_INTERFACE + (counter % STATS_PER_INTERFACE)
}

/// Entries of `GK_ID_DROPS`: identities charged with drops at the same time. An LRU, so
/// identities of old policies age out; a live policy has far fewer identities than this.
pub const DEFAULT_ID_DROP_ENTRIES: u32 = 1 << 14;

/// Default map sizes (all generations together); the daemon can choose others at load time.
pub const DEFAULT_HOST_ENTRIES: u32 = 1 << 19;
pub const DEFAULT_PREFIX_ENTRIES: u32 = 1 << 16;
pub const DEFAULT_POLICY_ENTRIES: u32 = 1 << 20;
pub const DEFAULT_FLOW_ENTRIES: u32 = 1 << 17;
/// Rule slots available for per-rule counters.
pub const DEFAULT_RULE_SLOTS: u32 = 1 << 15;

/// Value of `GK_IDS_V4` / `GK_IDS_V6`: the segment-set identity of an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Identity {
    pub id: u32,
    /// `GOVERN_*` bits: the strongest modes among the address's segments.
    pub flags: u32,
}

/// LPM key data for IPv4: generation byte then address; prefix length counts the 8 bits of the
/// generation, so `/24` is stored with prefix length 32.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LpmV4 {
    pub generation: u8,
    pub addr: [u8; 4],
    pub _pad: [u8; 3],
}

/// LPM key data for IPv6, laid out like [`LpmV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LpmV6 {
    pub generation: u8,
    pub addr: [u8; 16],
    pub _pad: [u8; 3],
}

/// Key of `GK_HOSTS_V4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostV4 {
    pub generation: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 4],
}

/// Key of `GK_HOSTS_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostV6 {
    pub generation: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// Key of `GK_POLICY`: who talks to whom, on which protocol class and port class.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub generation: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
    pub port_class: u32,
    /// Source identity, or [`ID_ANY`] for rules `from: any`.
    pub src: u32,
    /// Destination identity, or [`ID_ANY`] for rules `to: any`.
    pub dst: u32,
}

/// Value of `GK_POLICY`: the first (lowest slot) matching allow and deny rules for the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub allow_rule: u32,
    pub deny_rule: u32,
}

impl Default for PolicyValue {
    fn default() -> Self {
        Self { allow_rule: NO_RULE, deny_rule: NO_RULE }
    }
}

/// Per-generation settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenConfig {
    /// `CFG_*` bits.
    pub flags: u32,
    pub _pad: u32,
    pub tcp_timeout_ns: u64,
    pub udp_timeout_ns: u64,
    pub icmp_timeout_ns: u64,
}

/// Key of `GK_FLOWS_V4`: the two endpoints in a canonical order so both directions share one
/// entry. IPv4 has its own flow table because a 16-byte key hashes and compares in much less
/// time than [`FlowKey`]'s 40 bytes (about 20 ns less per flow-table hit, measured).
/// ICMP echo flows use the echo identifier as both ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV4 {
    /// Addresses exactly as they appear on the wire (network byte order).
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Key of `GK_FLOWS_V6`: the two endpoints in a canonical order so both directions share one
/// entry. ICMPv6 echo flows use the echo identifier as both ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Address words exactly as they appear on the wire (network byte order).
    pub addr_lo: [u32; 4],
    pub addr_hi: [u32; 4],
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 2],
}

/// [`FlowValue::flags`]: the flow was opened by the `lo` endpoint.
pub const FLOW_ORIG_LO: u32 = 1;

/// Value of `GK_FLOWS_V4` and `GK_FLOWS_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `bpf_ktime_get_coarse_ns` of the last packet seen (refreshed at most once a second).
    pub last_seen_ns: u64,
    /// Policy epoch the flow was last judged under; a different epoch means re-judge.
    pub epoch: u32,
    pub flags: u32,
}

/// Value of `GK_STATS` and `GK_RULE_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Value of `GK_ID_DROPS`: packets a policy dropped (`enforce`) or would have dropped
/// (`monitor`), charged to the destination's identity when the destination is governed, else to
/// the source's. The daemon adds them up per segment of the identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdDrops {
    pub dropped: u64,
    pub would_drop: u64,
}

// Layouts are part of the kernel/user contract: any change must be deliberate.
const _: () = assert!(core::mem::size_of::<Identity>() == 8);
const _: () = assert!(core::mem::size_of::<LpmV4>() == 8);
const _: () = assert!(core::mem::size_of::<LpmV6>() == 20);
const _: () = assert!(core::mem::size_of::<HostV4>() == 8);
const _: () = assert!(core::mem::size_of::<HostV6>() == 20);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 16);
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);
const _: () = assert!(core::mem::size_of::<GenConfig>() == 32);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<FlowKeyV4>() == 16);
const _: () = assert!(core::mem::size_of::<FlowValue>() == 16);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!(core::mem::size_of::<IdDrops>() == 16);
const _: () = assert!(STATS_COUNTERS <= STATS_PER_INTERFACE);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, contain only integers and byte arrays, and have no
    // implicit padding (checked by the size assertions above and the offset tests below).
    unsafe impl aya::Pod for Identity {}
    unsafe impl aya::Pod for LpmV4 {}
    unsafe impl aya::Pod for LpmV6 {}
    unsafe impl aya::Pod for HostV4 {}
    unsafe impl aya::Pod for HostV6 {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for GenConfig {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowKeyV4 {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for IdDrops {}
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;

    use super::*;

    #[test]
    fn policy_key_layout() {
        assert_eq!(offset_of!(PolicyKey, generation), 0);
        assert_eq!(offset_of!(PolicyKey, proto), 1);
        assert_eq!(offset_of!(PolicyKey, port_class), 4);
        assert_eq!(offset_of!(PolicyKey, src), 8);
        assert_eq!(offset_of!(PolicyKey, dst), 12);
    }

    #[test]
    fn lpm_key_layout() {
        assert_eq!(offset_of!(LpmV4, generation), 0);
        assert_eq!(offset_of!(LpmV4, addr), 1);
        assert_eq!(offset_of!(LpmV6, addr), 1);
        assert_eq!(offset_of!(LpmV6, _pad), 17);
    }

    #[test]
    fn host_key_layout() {
        assert_eq!(offset_of!(HostV4, addr), 4);
        assert_eq!(offset_of!(HostV6, addr), 4);
    }

    #[test]
    fn flow_layout() {
        assert_eq!(offset_of!(FlowKey, addr_hi), 16);
        assert_eq!(offset_of!(FlowKey, port_lo), 32);
        assert_eq!(offset_of!(FlowKey, port_hi), 34);
        assert_eq!(offset_of!(FlowKey, proto), 36);
        assert_eq!(offset_of!(FlowKey, family), 37);
        assert_eq!(offset_of!(FlowKeyV4, addr_hi), 4);
        assert_eq!(offset_of!(FlowKeyV4, port_lo), 8);
        assert_eq!(offset_of!(FlowKeyV4, proto), 12);
        assert_eq!(offset_of!(FlowValue, epoch), 8);
        assert_eq!(offset_of!(GenConfig, tcp_timeout_ns), 8);
        assert_eq!(offset_of!(Identity, flags), 4);
        assert_eq!(offset_of!(PolicyValue, deny_rule), 4);
        assert_eq!(offset_of!(Counter, bytes), 8);
        assert_eq!(offset_of!(IdDrops, would_drop), 8);
    }

    #[test]
    fn stats_index_gives_each_small_ifindex_its_block() {
        assert_eq!(stats_index(0, OUTCOME_PASS_NON_IP), 0);
        assert_eq!(stats_index(LOOPBACK_IFINDEX, OUTCOME_DROP_DEFAULT), STATS_PER_INTERFACE + OUTCOME_DROP_DEFAULT);
        assert_eq!(
            stats_index(STATS_IFINDEX_LIMIT - 1, EVENT_FLOW_INSERT_FAILED) / STATS_PER_INTERFACE,
            STATS_IFINDEX_LIMIT - 1
        );
        assert!(stats_index(STATS_IFINDEX_LIMIT - 1, STATS_PER_INTERFACE - 1) < STATS_ENTRIES);
        // Large ifindexes share block 0.
        assert_eq!(stats_index(STATS_IFINDEX_LIMIT, OUTCOME_PASS_FLOW), OUTCOME_PASS_FLOW);
        assert_eq!(stats_index(u32::MAX, OUTCOME_PASS_FLOW), OUTCOME_PASS_FLOW);
    }

    #[test]
    fn port_class_index_separates_generations_and_protocols() {
        assert_eq!(port_class_index(0, 0, 0), 0);
        assert_eq!(port_class_index(0, 1, 0), 65536);
        assert_eq!(port_class_index(1, 0, 65535), 131072 + 65535);
        assert_eq!(port_class_index(GENERATIONS - 1, 1, 65535) + 1, PORT_CLASS_ENTRIES);
    }
}
