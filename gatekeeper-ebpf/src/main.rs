//! The gatekeeper XDP program: microsegmentation on every bridge port.
//!
//! Per packet: parse (through VLAN tags and IPv6 extension headers, in `parse`), look up the flow
//! table (fast path for established flows), find the segment-set identity of source and
//! destination (host hash, else LPM trie), and judge a new flow against the compiled allow-list.
//! Every packet ends in exactly one `OUTCOME_*` counter of the interface it arrived on; a policy
//! drop is also charged to one identity (`GK_ID_DROPS`), for drops per segment. The maps are described in one place,
//! `gatekeeper-common`.
//!
//! Semantics are defined by the plain-Rust reference model in `gatekeeper::policy::reference`;
//! the differential tests hold this program to it.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    helpers::bpf_ktime_get_coarse_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use gatekeeper_common::{
    CFG_ANY_ANY, CFG_ANY_ENFORCE, CFG_ANY_MONITOR, CFG_DST_ANY, CFG_SRC_ANY, Counter, DEFAULT_FLOW_ENTRIES,
    DEFAULT_HOST_ENTRIES, DEFAULT_ID_DROP_ENTRIES, DEFAULT_POLICY_ENTRIES, DEFAULT_PREFIX_ENTRIES, DEFAULT_RULE_SLOTS,
    EVENT_FLOW_INSERT_FAILED, EVENT_FLOW_REVOKED, FLOW_ORIG_LO, FlowKey, FlowKeyV4, FlowValue, GENERATIONS,
    GOVERN_ENFORCE, GenConfig, HostV4, HostV6, ID_ANY, IdDrops, Identity, LpmV4, LpmV6, NO_RULE, OUTCOME_DROP_DEFAULT,
    OUTCOME_DROP_DENY_RULE, OUTCOME_DROP_MALFORMED, OUTCOME_MONITOR_DEFAULT, OUTCOME_MONITOR_DENY_RULE,
    OUTCOME_MONITOR_MALFORMED, OUTCOME_PASS_ALLOWED, OUTCOME_PASS_FLOW, OUTCOME_PASS_MALFORMED, OUTCOME_PASS_NEIGHBOR,
    OUTCOME_PASS_NON_IP, OUTCOME_PASS_UNGOVERNED, PORT_CLASS_ENTRIES, PORT_CLASS_NONE, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_OTHER, PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue, STATS_ENTRIES, port_class_index, stats_index,
};
use parse::{Packet, Parsed, parse};

// ---- Maps (documented in gatekeeper-common) -------------------------------------------------

#[map]
static GK_EPOCH: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static GK_GEN_CONFIG: Array<GenConfig> = Array::with_max_entries(GENERATIONS, 0);
// Hashes are not preallocated: sized for large policies, they only use memory for what is
// there, and a lookup never aliases a recycled element.
#[map]
static GK_HOSTS_V4: HashMap<HostV4, Identity> = HashMap::with_max_entries(DEFAULT_HOST_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static GK_HOSTS_V6: HashMap<HostV6, Identity> = HashMap::with_max_entries(DEFAULT_HOST_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static GK_IDS_V4: LpmTrie<LpmV4, Identity> = LpmTrie::with_max_entries(DEFAULT_PREFIX_ENTRIES, 0);
#[map]
static GK_IDS_V6: LpmTrie<LpmV6, Identity> = LpmTrie::with_max_entries(DEFAULT_PREFIX_ENTRIES, 0);
#[map]
static GK_PORT_CLASS: Array<u32> = Array::with_max_entries(PORT_CLASS_ENTRIES, 0);
#[map]
static GK_POLICY: HashMap<PolicyKey, PolicyValue> =
    HashMap::with_max_entries(DEFAULT_POLICY_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static GK_FLOWS_V4: LruHashMap<FlowKeyV4, FlowValue> = LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);
#[map]
static GK_FLOWS_V6: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);
#[map]
static GK_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);
#[map]
static GK_RULE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DEFAULT_RULE_SLOTS, 0);
#[map]
static GK_ID_DROPS: LruPerCpuHashMap<u32, IdDrops> = LruPerCpuHashMap::with_max_entries(DEFAULT_ID_DROP_ENTRIES, 0);

/// A flow's `last_seen_ns` is rewritten at most once per second: timeouts are whole seconds,
/// and fewer writes keep a busy flow's entry from bouncing between CPUs.
const NS_PER_SEC: u64 = 1_000_000_000;

// ---- Lookups ----------------------------------------------------------------------------------

/// The identity of an address: a host entry if there is one (one hash lookup), else the
/// longest matching shorter prefix.
#[inline(always)]
fn identity(generation: u32, family: u8, addr: &[u32; 4]) -> Identity {
    let g = generation as u8;
    if family == 4 {
        let bytes = addr[0].to_ne_bytes();
        // SAFETY: non-preallocated hash: the element is not recycled under us; copied at once.
        if let Some(v) = unsafe { GK_HOSTS_V4.get(&HostV4 { generation: g, _pad: [0; 3], addr: bytes }) } {
            return *v;
        }
        let key = Key::new(8 + 32, LpmV4 { generation: g, addr: bytes, _pad: [0; 3] });
        GK_IDS_V4.get(&key).copied().unwrap_or_default()
    } else {
        // SAFETY: [u32; 4] and [u8; 16] have the same size; every bit pattern is valid.
        let bytes: [u8; 16] = unsafe { core::mem::transmute(*addr) };
        // SAFETY: as above.
        if let Some(v) = unsafe { GK_HOSTS_V6.get(&HostV6 { generation: g, _pad: [0; 3], addr: bytes }) } {
            return *v;
        }
        let key = Key::new(8 + 128, LpmV6 { generation: g, addr: bytes, _pad: [0; 3] });
        GK_IDS_V6.get(&key).copied().unwrap_or_default()
    }
}

#[inline(always)]
fn proto_class(proto: u8) -> u8 {
    match proto {
        PROTO_ICMP | PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => proto,
        _ => PROTO_OTHER,
    }
}

#[inline(always)]
fn port_class(generation: u32, p: &Packet, dport: u16) -> u32 {
    if !p.has_ports {
        return PORT_CLASS_NONE;
    }
    let l4 = if p.proto == PROTO_TCP { 0 } else { 1 };
    GK_PORT_CLASS.get(port_class_index(generation, l4, dport)).copied().unwrap_or(PORT_CLASS_NONE)
}

#[inline(always)]
fn merge(key: &PolicyKey, allow: &mut u32, deny: &mut u32) {
    // SAFETY: the map is not preallocated, so an element is never recycled under us; the value
    // is copied out at once.
    if let Some(v) = unsafe { GK_POLICY.get(key) } {
        let v = *v;
        if v.allow_rule < *allow {
            *allow = v.allow_rule;
        }
        if v.deny_rule < *deny {
            *deny = v.deny_rule;
        }
    }
}

/// Judges a flow start: `(allowed, deciding rule or NO_RULE)`. Deny beats allow; among rules of
/// the deciding action the lowest slot counts.
#[inline(always)]
fn decide(cfg_flags: u32, generation: u32, proto: u8, port_class: u32, src: u32, dst: u32) -> (bool, u32) {
    let mut allow = NO_RULE;
    let mut deny = NO_RULE;
    let mut key =
        PolicyKey { generation: generation as u8, proto: proto_class(proto), _pad: [0; 2], port_class, src, dst };
    merge(&key, &mut allow, &mut deny);
    if cfg_flags & CFG_DST_ANY != 0 {
        key.dst = ID_ANY;
        merge(&key, &mut allow, &mut deny);
    }
    if cfg_flags & CFG_SRC_ANY != 0 {
        key.src = ID_ANY;
        key.dst = dst;
        merge(&key, &mut allow, &mut deny);
    }
    if cfg_flags & CFG_ANY_ANY != 0 {
        key.src = ID_ANY;
        key.dst = ID_ANY;
        merge(&key, &mut allow, &mut deny);
    }
    if deny != NO_RULE {
        (false, deny)
    } else if allow != NO_RULE {
        (true, allow)
    } else {
        (false, NO_RULE)
    }
}

/// A flow's key in its family's table.
#[derive(Clone, Copy)]
enum Flow {
    V4(FlowKeyV4),
    V6(FlowKey),
}

impl Flow {
    #[inline(always)]
    fn get_ptr_mut(&self) -> Option<*mut FlowValue> {
        match self {
            Self::V4(k) => GK_FLOWS_V4.get_ptr_mut(k),
            Self::V6(k) => GK_FLOWS_V6.get_ptr_mut(k),
        }
    }

    #[inline(always)]
    fn insert(&self, v: &FlowValue) -> Result<(), i32> {
        match self {
            Self::V4(k) => GK_FLOWS_V4.insert(k, v, 0),
            Self::V6(k) => GK_FLOWS_V6.insert(k, v, 0),
        }
    }

    #[inline(always)]
    fn remove(&self) {
        let _ = match self {
            Self::V4(k) => GK_FLOWS_V4.remove(k),
            Self::V6(k) => GK_FLOWS_V6.remove(k),
        };
    }
}

/// The flow key in canonical order, and whether the packet's source is the `lo` endpoint.
#[inline(always)]
fn flow_key(p: &Packet) -> (Flow, bool) {
    let src_lo = (p.src[0], p.src[1], p.src[2], p.src[3], p.sport) <= (p.dst[0], p.dst[1], p.dst[2], p.dst[3], p.dport);
    let (a, pa, b, pb) = if src_lo { (p.src, p.sport, p.dst, p.dport) } else { (p.dst, p.dport, p.src, p.sport) };
    let key = if p.family == 4 {
        // IPv4 addresses sit in the first word; the others are zero.
        Flow::V4(FlowKeyV4 { addr_lo: a[0], addr_hi: b[0], port_lo: pa, port_hi: pb, proto: p.proto, _pad: [0; 3] })
    } else {
        Flow::V6(FlowKey {
            addr_lo: a,
            addr_hi: b,
            port_lo: pa,
            port_hi: pb,
            proto: p.proto,
            family: p.family,
            _pad: [0; 2],
        })
    };
    (key, src_lo)
}

#[inline(always)]
fn flow_timeout(cfg: &GenConfig, proto: u8) -> u64 {
    match proto {
        PROTO_TCP => cfg.tcp_timeout_ns,
        PROTO_UDP => cfg.udp_timeout_ns,
        _ => cfg.icmp_timeout_ns,
    }
}

#[inline(always)]
fn count(map: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU value, and XDP runs with preemption off: no concurrent writer.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// No identity is charged with the packet (it was not dropped by the policy).
const NO_CHARGE: u32 = u32::MAX;

/// What [`judge`] decided about a packet.
struct Verdict {
    /// `OUTCOME_*`.
    outcome: u32,
    /// Deciding rule slot, or `NO_RULE`.
    rule: u32,
    /// The identity a policy (would-)drop is charged to, or [`NO_CHARGE`].
    charged: u32,
}

#[inline(always)]
const fn verdict(outcome: u32, rule: u32) -> Verdict {
    Verdict { outcome, rule, charged: NO_CHARGE }
}

/// A denied flow start, charged to the destination when it is governed, else to the source.
#[inline(always)]
fn denied(enforce: bool, rule: u32, src: &Identity, dst: &Identity) -> Verdict {
    let outcome = match (enforce, rule != NO_RULE) {
        (true, true) => OUTCOME_DROP_DENY_RULE,
        (true, false) => OUTCOME_DROP_DEFAULT,
        (false, true) => OUTCOME_MONITOR_DENY_RULE,
        (false, false) => OUTCOME_MONITOR_DEFAULT,
    };
    let charged = if dst.flags != 0 { dst.id } else { src.id };
    Verdict { outcome, rule, charged }
}

/// Adds a policy (would-)drop to the charged identity's counter.
#[inline(always)]
fn charge(id: u32, enforce: bool) {
    if let Some(c) = GK_ID_DROPS.get_ptr_mut(&id) {
        // SAFETY: per-CPU value, preemption off: no concurrent writer. An LRU element recycled
        // under us would only miscount a drop of an identity that is aging out.
        unsafe {
            if enforce {
                (*c).dropped += 1;
            } else {
                (*c).would_drop += 1;
            }
        }
    } else {
        let first = if enforce { IdDrops { dropped: 1, would_drop: 0 } } else { IdDrops { dropped: 0, would_drop: 1 } };
        // A failed insert loses one count; nothing else depends on it.
        let _ = GK_ID_DROPS.insert(&id, &first, 0);
    }
}

// ---- The program --------------------------------------------------------------------------------

#[xdp]
pub fn gatekeeper(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let ifindex = ctx.ingress_ifindex() as u32;
    let Verdict { outcome, rule, charged } = judge(&ctx, ifindex, bytes);
    count(&GK_STATS, stats_index(ifindex, outcome), bytes);
    if rule != NO_RULE {
        // Out-of-range slots find no counter: the per-CPU array bounds the index itself.
        count(&GK_RULE_STATS, rule, bytes);
    }
    if charged != NO_CHARGE {
        charge(charged, outcome == OUTCOME_DROP_DENY_RULE || outcome == OUTCOME_DROP_DEFAULT);
    }
    match outcome {
        OUTCOME_DROP_DENY_RULE | OUTCOME_DROP_DEFAULT | OUTCOME_DROP_MALFORMED => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn judge(ctx: &XdpContext, ifindex: u32, bytes: u64) -> Verdict {
    // One read of the epoch decides the generation for the whole packet.
    let epoch = GK_EPOCH.get(0).copied().unwrap_or(0);
    let generation = epoch % GENERATIONS;
    let cfg = GK_GEN_CONFIG.get(generation).copied().unwrap_or_default();

    let p = match parse(ctx) {
        Parsed::NonIp => return verdict(OUTCOME_PASS_NON_IP, NO_RULE),
        Parsed::Unattributable => {
            // Nobody can say which segment this packet governs: assume the strictest mode present.
            let outcome = if cfg.flags & CFG_ANY_ENFORCE != 0 {
                OUTCOME_DROP_MALFORMED
            } else if cfg.flags & CFG_ANY_MONITOR != 0 {
                OUTCOME_MONITOR_MALFORMED
            } else {
                OUTCOME_PASS_MALFORMED
            };
            return verdict(outcome, NO_RULE);
        }
        Parsed::Ip(p) => p,
    };
    if p.neighbor {
        return verdict(OUTCOME_PASS_NEIGHBOR, NO_RULE);
    }

    let (fkey, src_lo) = if p.trackable { flow_key(&p) } else { (Flow::V4(FlowKeyV4::default()), false) };
    // Flow state before the policy: an established flow under the current epoch costs one lookup.
    // The coarse clock (tick resolution) is plenty for timeouts of seconds, and much cheaper.
    let mut now = 0;
    let mut stale: Option<FlowValue> = None;
    if p.trackable {
        if let Some(fv) = fkey.get_ptr_mut() {
            now = unsafe { bpf_ktime_get_coarse_ns() };
            // SAFETY: LRU elements can be recycled under us; we copy the value out and only
            // write back plain integers, which at worst refresh an unrelated entry.
            let v = unsafe { *fv };
            let age = now.saturating_sub(v.last_seen_ns);
            if age <= flow_timeout(&cfg, p.proto) {
                if v.epoch == epoch {
                    if age > NS_PER_SEC {
                        unsafe { (*fv).last_seen_ns = now };
                    }
                    return verdict(OUTCOME_PASS_FLOW, NO_RULE);
                }
                stale = Some(v);
            }
        }
    }

    let src = identity(generation, p.family, &p.src);
    let dst = identity(generation, p.family, &p.dst);
    let governing = src.flags | dst.flags;
    if governing == 0 {
        let outcome = if p.malformed { OUTCOME_PASS_MALFORMED } else { OUTCOME_PASS_UNGOVERNED };
        return verdict(outcome, NO_RULE);
    }
    let enforce = governing & GOVERN_ENFORCE != 0;
    if p.malformed {
        let outcome = if enforce { OUTCOME_DROP_MALFORMED } else { OUTCOME_MONITOR_MALFORMED };
        return verdict(outcome, NO_RULE);
    }

    // A flow opened under an older policy is judged again, in its original direction.
    if let Some(v) = stale {
        let orig_lo = v.flags & FLOW_ORIG_LO != 0;
        let (os, od, odport) = if orig_lo == src_lo { (src.id, dst.id, p.dport) } else { (dst.id, src.id, p.sport) };
        let pc = port_class(generation, &p, odport);
        let (allowed, _) = decide(cfg.flags, generation, p.proto, pc, os, od);
        if allowed {
            let renewed = FlowValue { last_seen_ns: now, epoch, flags: v.flags };
            if fkey.insert(&renewed).is_err() {
                count(&GK_STATS, stats_index(ifindex, EVENT_FLOW_INSERT_FAILED), bytes);
            }
            return verdict(OUTCOME_PASS_FLOW, NO_RULE);
        }
        fkey.remove();
        count(&GK_STATS, stats_index(ifindex, EVENT_FLOW_REVOKED), bytes);
    }

    let pc = port_class(generation, &p, p.dport);
    let (allowed, rule) = decide(cfg.flags, generation, p.proto, pc, src.id, dst.id);
    if !allowed {
        return denied(enforce, rule, &src, &dst);
    }
    if p.trackable {
        if now == 0 {
            now = unsafe { bpf_ktime_get_coarse_ns() };
        }
        let value = FlowValue { last_seen_ns: now, epoch, flags: if src_lo { FLOW_ORIG_LO } else { 0 } };
        if fkey.insert(&value).is_err() {
            count(&GK_STATS, stats_index(ifindex, EVENT_FLOW_INSERT_FAILED), bytes);
        }
    }
    verdict(OUTCOME_PASS_ALLOWED, rule)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
