//! An in-memory data plane behind the [`Dataplane`] trait, for control-plane tests (REST API,
//! TLS, Netskope) that cannot load the XDP program (no root, no BPF).
//!
//! It holds what the maps would hold as one [`Compiled`]: there is a single copy and no packet
//! runs concurrently with an apply, so generations, grace periods and in-place moves have
//! nothing to protect here. Attachments are bookkeeping only. [`FakeDataplane::test_run`] judges
//! a frame by interpreting the compiled maps the way the XDP program's `judge` does, **without a
//! flow table**: every packet is judged as the first packet of a new flow.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use gatekeeper_common::{
    CFG_ANY_ANY, CFG_ANY_ENFORCE, CFG_ANY_MONITOR, CFG_DST_ANY, CFG_SRC_ANY, Counter, GOVERN_ENFORCE, ID_ANY, Identity,
    NO_RULE, OUTCOME_DROP_DEFAULT, OUTCOME_DROP_DENY_RULE, OUTCOME_DROP_MALFORMED, OUTCOME_MONITOR_DEFAULT,
    OUTCOME_MONITOR_DENY_RULE, OUTCOME_MONITOR_MALFORMED, OUTCOME_PASS_ALLOWED, OUTCOME_PASS_MALFORMED,
    OUTCOME_PASS_NEIGHBOR, OUTCOME_PASS_NON_IP, OUTCOME_PASS_UNGOVERNED, PORT_CLASS_NONE, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_OTHER, PROTO_TCP, PROTO_UDP, PolicyKey, STATS_ENTRIES,
};
use ipnet::{Ipv4Net, Ipv6Net};

use super::{ApplyReport, Dataplane, DataplaneError, FlowCounter, LoadOptions, Stats, XdpAttachMode};
use crate::{
    compile::{Compiled, Delta, diff},
    policy::reference::{self, Frame, Header},
};

/// XDP actions, as `BPF_PROG_TEST_RUN` reports them (`enum xdp_action` in the kernel).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// The mode [`FakeDataplane::attach`] reports.
const FAKE_MODE: &str = "fake";

/// What the program's per-CPU counters would hold, summed.
#[derive(Debug)]
struct Counters {
    /// Indexed by `OUTCOME_*` / `EVENT_*`, like `GK_STATS`.
    by_outcome: Vec<Counter>,
    /// By rule slot, like `GK_RULE_STATS` (sparse: most slots are never used).
    by_rule: BTreeMap<u32, Counter>,
}

/// The in-memory data plane: see the module documentation.
#[derive(Debug)]
pub struct FakeDataplane {
    applied: Compiled,
    epoch: u32,
    /// Rule counter slots, as in `GK_RULE_STATS`: a rule beyond them is not counted.
    rule_slots: u32,
    attachments: Vec<(String, &'static str)>,
    /// Behind a lock because [`Dataplane::test_run`] counts through `&self`.
    counters: Mutex<Counters>,
}

impl FakeDataplane {
    /// Empty maps, as a freshly loaded program has; `options` gives the rule-slot capacity etc.
    pub fn new(options: &LoadOptions) -> Self {
        Self {
            applied: Compiled::empty(),
            epoch: 0,
            rule_slots: options.rule_slots,
            attachments: Vec::new(),
            counters: Mutex::new(Counters {
                by_outcome: vec![Counter::default(); STATS_ENTRIES as usize],
                by_rule: BTreeMap::new(),
            }),
        }
    }

    /// The counter of the rule in `slot`: the packets [`Dataplane::test_run`] saw it decide.
    pub fn rule_counter(&self, slot: u32) -> Counter {
        self.counters().by_rule.get(&slot).copied().unwrap_or_default()
    }

    /// The counters; a panic elsewhere cannot leave them half-updated (each update is a few
    /// additions), so a poisoned lock is still good to read.
    fn counters(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every apply ends here: one copy of the maps, so applying is trivially atomic.
    fn apply_now(&mut self, delta: Delta, started: Instant) -> ApplyReport {
        {
            // A slot newly given to a rule starts from zero, as the real apply zeroes it.
            let mut counters = self.counters();
            for slot in &delta.new_slots {
                counters.by_rule.remove(slot);
            }
        }
        self.applied.apply(&delta);
        self.epoch = self.epoch.wrapping_add(1);
        let elapsed = started.elapsed();
        ApplyReport { epoch: self.epoch, entries: delta.len(), enforced_after: elapsed, total: elapsed }
    }

    /// `(OUTCOME_*, deciding rule slot or NO_RULE)` for `frame`, judged as the XDP program
    /// judges a packet that starts a flow (there is no flow table here).
    fn judge(&self, frame: &[u8]) -> (u32, u32) {
        let compiled = &self.applied;
        let h = match reference::parse(frame) {
            Frame::NonIp => return (OUTCOME_PASS_NON_IP, NO_RULE),
            Frame::Unattributable => return (unattributable(compiled.config.flags), NO_RULE),
            Frame::Ip(h) => h,
        };
        if h.neighbor {
            return (OUTCOME_PASS_NEIGHBOR, NO_RULE);
        }
        let src = identity(compiled, h.src);
        let dst = identity(compiled, h.dst);
        let governing = src.flags | dst.flags;
        if governing == 0 {
            let outcome = if h.malformed { OUTCOME_PASS_MALFORMED } else { OUTCOME_PASS_UNGOVERNED };
            return (outcome, NO_RULE);
        }
        let enforce = governing & GOVERN_ENFORCE != 0;
        if h.malformed {
            let outcome = if enforce { OUTCOME_DROP_MALFORMED } else { OUTCOME_MONITOR_MALFORMED };
            return (outcome, NO_RULE);
        }
        let (allowed, rule) = decide(compiled, proto_class(h.proto), port_class(compiled, &h), src.id, dst.id);
        if allowed { (OUTCOME_PASS_ALLOWED, rule) } else { denied(enforce, rule) }
    }
}

/// A frame whose addresses cannot be read governs no known segment: assume the strictest mode
/// the policy has.
fn unattributable(cfg_flags: u32) -> u32 {
    if cfg_flags & CFG_ANY_ENFORCE != 0 {
        OUTCOME_DROP_MALFORMED
    } else if cfg_flags & CFG_ANY_MONITOR != 0 {
        OUTCOME_MONITOR_MALFORMED
    } else {
        OUTCOME_PASS_MALFORMED
    }
}

/// The identity of an address: its host entry if there is one, else the longest matching
/// shorter prefix (the program's host hash, then its LPM trie), else no segment at all.
fn identity(compiled: &Compiled, addr: IpAddr) -> Identity {
    match addr {
        IpAddr::V4(a) => longest_match(&compiled.v4, 32, |len| Ipv4Net::new(a, len).ok().map(|n| n.trunc())),
        IpAddr::V6(a) => longest_match(&compiled.v6, 128, |len| Ipv6Net::new(a, len).ok().map(|n| n.trunc())),
    }
}

/// Tries every prefix of the address from the host length down. The compiled prefixes have
/// their host bits clear (the policy validator insists), so `net(len)` finds them exactly; this
/// costs at most 33 or 129 hash lookups, whatever the size of the policy.
fn longest_match<N: Eq + std::hash::Hash>(
    prefixes: &std::collections::HashMap<N, Identity>,
    host_len: u8,
    net: impl Fn(u8) -> Option<N>,
) -> Identity {
    (0..=host_len).rev().find_map(|len| net(len).and_then(|n| prefixes.get(&n).copied())).unwrap_or_default()
}

/// Rules can only name these protocols, so the compiler keys every other one as `PROTO_OTHER`.
fn proto_class(proto: u8) -> u8 {
    match proto {
        PROTO_ICMP | PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => proto,
        _ => PROTO_OTHER,
    }
}

/// The destination port's class; packets without ports (ICMP, other protocols, later
/// fragments) share `PORT_CLASS_NONE` with ports no port-restricted rule covers.
fn port_class(compiled: &Compiled, h: &Header) -> u32 {
    let Some((_, dport)) = h.ports else { return PORT_CLASS_NONE };
    // Only TCP and UDP carry ports; `port_classes` is `[TCP, UDP]`.
    let l4 = if h.proto == PROTO_TCP { 0 } else { 1 };
    compiled.port_classes[l4].get(usize::from(dport)).copied().unwrap_or(PORT_CLASS_NONE)
}

/// Judges a flow start as the program's `decide` does: `(allowed, deciding rule or NO_RULE)`.
/// The exact `(src, dst)` key always; a wildcard key only when the `CFG_*` flags say some rule
/// has `any` on that side (the program skips lookups that cannot hit, so entries the flags do
/// not announce are invisible to it, and to us). Deny beats allow; the lowest slot counts.
fn decide(compiled: &Compiled, proto: u8, port_class: u32, src: u32, dst: u32) -> (bool, u32) {
    let flags = compiled.config.flags;
    let lookups = [
        (true, src, dst),
        (flags & CFG_DST_ANY != 0, src, ID_ANY),
        (flags & CFG_SRC_ANY != 0, ID_ANY, dst),
        (flags & CFG_ANY_ANY != 0, ID_ANY, ID_ANY),
    ];
    let (mut allow, mut deny) = (NO_RULE, NO_RULE);
    for (_, src, dst) in lookups.into_iter().filter(|&(enabled, _, _)| enabled) {
        // Compiled keys carry generation 0 (the default).
        let key = PolicyKey { proto, port_class, src, dst, ..PolicyKey::default() };
        if let Some(v) = compiled.policy.get(&key) {
            allow = allow.min(v.allow_rule);
            deny = deny.min(v.deny_rule);
        }
    }
    if deny != NO_RULE {
        (false, deny)
    } else if allow != NO_RULE {
        (true, allow)
    } else {
        (false, NO_RULE)
    }
}

/// The outcome of a flow start no rule allows: dropped under an enforcing segment, counted as
/// would-drop when only monitoring segments govern it.
fn denied(enforce: bool, rule: u32) -> (u32, u32) {
    let outcome = match (enforce, rule != NO_RULE) {
        (true, true) => OUTCOME_DROP_DENY_RULE,
        (true, false) => OUTCOME_DROP_DEFAULT,
        (false, true) => OUTCOME_MONITOR_DENY_RULE,
        (false, false) => OUTCOME_MONITOR_DEFAULT,
    };
    (outcome, rule)
}

/// The XDP action for an outcome: only the `DROP_*` outcomes drop.
fn action(outcome: u32) -> u32 {
    match outcome {
        OUTCOME_DROP_DENY_RULE | OUTCOME_DROP_DEFAULT | OUTCOME_DROP_MALFORMED => XDP_DROP,
        _ => XDP_PASS,
    }
}

fn add(counter: &mut Counter, bytes: u64) {
    counter.packets += 1;
    counter.bytes += bytes;
}

impl Dataplane for FakeDataplane {
    fn applied(&self) -> &Compiled {
        &self.applied
    }

    fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Never fails.
    fn apply(&mut self, new: Compiled) -> Result<ApplyReport, DataplaneError> {
        let started = Instant::now();
        let delta = diff(&self.applied, &new);
        Ok(self.apply_now(delta, started))
    }

    /// Never fails.
    fn apply_delta(&mut self, delta: Delta) -> Result<ApplyReport, DataplaneError> {
        Ok(self.apply_now(delta, Instant::now()))
    }

    /// Like [`Dataplane::apply_delta`]: with a single copy of the maps, writing "in place" is
    /// no different, so the epoch moves by one here too.
    fn apply_moves(&mut self, delta: Delta) -> Result<ApplyReport, DataplaneError> {
        Ok(self.apply_now(delta, Instant::now()))
    }

    /// Records the interface (once) and reports the mode `"fake"`, whatever was asked.
    fn attach(&mut self, interface: &str, _mode: XdpAttachMode) -> Result<&'static str, DataplaneError> {
        if !self.attachments.iter().any(|(i, _)| i == interface) {
            self.attachments.push((interface.to_string(), FAKE_MODE));
        }
        Ok(FAKE_MODE)
    }

    fn attachments(&self) -> Vec<(String, &'static str)> {
        self.attachments.clone()
    }

    fn detach_all(&mut self) -> Result<(), DataplaneError> {
        self.attachments.clear();
        Ok(())
    }

    fn took_over(&self) -> bool {
        false
    }

    /// The outcomes of the frames [`Dataplane::test_run`] judged (no other traffic exists).
    fn stats(&self) -> Result<Stats, DataplaneError> {
        Ok(Stats { by_outcome: self.counters().by_outcome.clone() })
    }

    /// There is no flow table.
    fn flow_counter(&self) -> Result<Option<FlowCounter>, DataplaneError> {
        Ok(None)
    }

    /// Judges `frame` as the XDP program judges a packet that **starts a flow**: this data plane
    /// is stateless, with no flow table, so every packet is judged as a new flow. A reply, or
    /// any later packet of a flow the real program would pass as established, is judged on its
    /// own here (usually dropped under an enforcing segment), and policy changes revoke nothing.
    /// Counts one packet and the frame's bytes in the outcome's counter, and in the deciding
    /// rule's counter when a rule decided. Returns the XDP action (1 drop, 2 pass).
    fn test_run(&self, frame: &[u8]) -> Result<u32, DataplaneError> {
        let (outcome, rule) = self.judge(frame);
        let bytes = frame.len() as u64;
        let mut counters = self.counters();
        if let Some(c) = counters.by_outcome.get_mut(outcome as usize) {
            add(c, bytes);
        }
        // Out-of-range slots have no counter, as in the program.
        if rule != NO_RULE && rule < self.rule_slots {
            add(counters.by_rule.entry(rule).or_default(), bytes);
        }
        Ok(action(outcome))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
    };

    use chrono::{DateTime, Duration, Utc};
    use gatekeeper_common::{OUTCOME_PASS_FLOW, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::{
        compile::{Capacity, Compiler, Timeouts},
        policy::{
            Action, AssetSpec, Mode, Policy, PolicyDocument, Protocol, RuleSpec, Scalar, SegmentSpec,
            reference::{Outcome, Reference},
        },
    };

    // ---- Frames ---------------------------------------------------------------------------

    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    const ETH_P_ARP: u16 = 0x0806;
    const ETH_P_8021Q: u16 = 0x8100;
    const ETH_P_8021AD: u16 = 0x88a8;
    /// IPv6 extension headers: hop-by-hop, routing, fragment, AH, destination options.
    const EXT_HEADERS: [u8; 5] = [0, 43, 44, 51, 60];
    const EXT_FRAGMENT: u8 = 44;
    const EXT_AH: u8 = 51;

    /// What sits above the IP header.
    #[derive(Debug, Clone, Copy)]
    enum L4 {
        Tcp {
            sport: u16,
            dport: u16,
        },
        Udp {
            sport: u16,
            dport: u16,
        },
        /// ICMP or ICMPv6, by the packet's family.
        Icmp {
            ty: u8,
            id: u16,
        },
        Other {
            proto: u8,
        },
    }

    impl L4 {
        fn proto(self, v6: bool) -> u8 {
            match self {
                Self::Tcp { .. } => PROTO_TCP,
                Self::Udp { .. } => PROTO_UDP,
                Self::Icmp { .. } if v6 => PROTO_ICMPV6,
                Self::Icmp { .. } => PROTO_ICMP,
                Self::Other { proto } => proto,
            }
        }

        fn bytes(self) -> Vec<u8> {
            let with_ports = |len: usize, sport: u16, dport: u16| {
                let mut b = vec![0u8; len];
                b[0..2].copy_from_slice(&sport.to_be_bytes());
                b[2..4].copy_from_slice(&dport.to_be_bytes());
                b
            };
            match self {
                Self::Tcp { sport, dport } => {
                    let mut b = with_ports(20, sport, dport);
                    b[12] = 5 << 4; // data offset
                    b[13] = 0x02; // SYN
                    b
                }
                Self::Udp { sport, dport } => with_ports(8, sport, dport),
                Self::Icmp { ty, id } => {
                    let mut b = vec![0u8; 8];
                    b[0] = ty;
                    b[4..6].copy_from_slice(&id.to_be_bytes());
                    b
                }
                Self::Other { .. } => vec![0xab; 8],
            }
        }
    }

    /// A frame description with knobs for the awkward cases; [`Pkt::build`] renders it.
    #[derive(Debug, Clone)]
    struct Pkt {
        src: IpAddr,
        dst: IpAddr,
        l4: L4,
        /// VLAN TPIDs, outermost first.
        vlans: Vec<u16>,
        /// IPv6 extension headers: (type, length field); for a fragment header the length field
        /// is taken as the fragment offset.
        ext: Vec<(u8, u8)>,
        /// IPv4 fragment offset (8-octet units).
        frag_offset: u16,
        /// IPv4 header length in words.
        ihl: u8,
        /// Overrides the version nibble.
        version: Option<u8>,
        /// Cuts the frame to this many bytes.
        truncate: Option<usize>,
    }

    impl Pkt {
        fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
            Self { src, dst, l4, vlans: vec![], ext: vec![], frag_offset: 0, ihl: 5, version: None, truncate: None }
        }

        fn tcp(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
            Self::new(ip(src), ip(dst), L4::Tcp { sport, dport }).build()
        }

        fn build(&self) -> Vec<u8> {
            let v6 = self.src.is_ipv6();
            let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
            for (vid, tpid) in (1u16..).zip(&self.vlans) {
                f.extend_from_slice(&tpid.to_be_bytes());
                f.extend_from_slice(&vid.to_be_bytes());
            }
            f.extend_from_slice(&(if v6 { ETH_P_IPV6 } else { ETH_P_IP }).to_be_bytes());
            let l4 = self.l4.bytes();
            if v6 {
                self.ipv6(&mut f, l4.len())
            } else {
                self.ipv4(&mut f, l4.len())
            }
            f.extend_from_slice(&l4);
            if let Some(n) = self.truncate {
                f.truncate(n);
            }
            f
        }

        fn ipv4(&self, f: &mut Vec<u8>, l4_len: usize) {
            let header = 20 + usize::from(self.ihl.saturating_sub(5)) * 4;
            let mut ip = vec![0u8; header];
            ip[0] = (self.version.unwrap_or(4) << 4) | (self.ihl & 0x0f);
            ip[2..4].copy_from_slice(&((header + l4_len) as u16).to_be_bytes());
            ip[6..8].copy_from_slice(&(self.frag_offset & 0x1fff).to_be_bytes());
            ip[8] = 64;
            ip[9] = self.l4.proto(false);
            ip[12..16].copy_from_slice(&v4_octets(self.src));
            ip[16..20].copy_from_slice(&v4_octets(self.dst));
            f.extend_from_slice(&ip);
        }

        fn ipv6(&self, f: &mut Vec<u8>, l4_len: usize) {
            let next: Vec<u8> =
                self.ext.iter().map(|e| e.0).skip(1).chain(std::iter::once(self.l4.proto(true))).collect();
            let mut chain = Vec::new();
            for (&(ty, len), &next) in self.ext.iter().zip(&next) {
                let mut h = match ty {
                    EXT_FRAGMENT => {
                        let mut h = vec![0u8; 8];
                        h[2..4].copy_from_slice(&(u16::from(len) << 3).to_be_bytes());
                        h
                    }
                    EXT_AH => vec![0u8; (usize::from(len) + 2) * 4],
                    _ => vec![0u8; (usize::from(len) + 1) * 8],
                };
                h[0] = next;
                if ty != EXT_FRAGMENT {
                    h[1] = len;
                }
                chain.extend_from_slice(&h);
            }
            let mut ip = vec![0u8; 40];
            ip[0] = self.version.unwrap_or(6) << 4;
            ip[4..6].copy_from_slice(&((chain.len() + l4_len) as u16).to_be_bytes());
            ip[6] = self.ext.first().map_or(self.l4.proto(true), |e| e.0);
            ip[7] = 64;
            ip[8..24].copy_from_slice(&v6_octets(self.src));
            ip[24..40].copy_from_slice(&v6_octets(self.dst));
            f.extend_from_slice(&ip);
            f.extend_from_slice(&chain);
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn v4_octets(a: IpAddr) -> [u8; 4] {
        match a {
            IpAddr::V4(a) => a.octets(),
            IpAddr::V6(_) => [0; 4],
        }
    }

    fn v6_octets(a: IpAddr) -> [u8; 16] {
        match a {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        }
    }

    fn arp() -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&[0; 20]);
        f
    }

    // ---- Random policies and frames (as in tests/tests/differential.rs) --------------------

    /// A small address pool, so that policies and packets collide often.
    fn v4(rng: &mut fastrand::Rng) -> IpAddr {
        if rng.u8(..10) == 0 {
            return IpAddr::V4(Ipv4Addr::new(203, 0, 113, rng.u8(1..4)));
        }
        IpAddr::V4(Ipv4Addr::new(10, 0, rng.u8(0..2), rng.u8(0..12)))
    }

    fn v6(rng: &mut fastrand::Rng) -> IpAddr {
        if rng.u8(..10) == 0 {
            return IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(rng.u8(1..4))));
        }
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, u16::from(rng.u8(0..2)), 0, 0, 0, u16::from(rng.u8(0..12))))
    }

    const PORTS: [u16; 8] = [22, 80, 102, 443, 502, 1000, 1005, 20000];
    const ROLES: [&str; 4] = ["plc", "hmi", "eng", "scada"];
    const SELECTORS: [&str; 8] = [
        "role=plc",
        "role=hmi",
        "role in (plc,scada)",
        "site!=a",
        "site",
        "!quarantine",
        "role=eng,site=b",
        "role notin (hmi)",
    ];

    fn prefix(rng: &mut fastrand::Rng) -> String {
        let v6net = rng.bool();
        let addr = if v6net { v6(rng) } else { v4(rng) };
        let host = if v6net { 128 } else { 32 };
        let len = match rng.u8(..6) {
            0 => host - 4,
            1 => host - 8,
            _ => host,
        };
        ipnet::IpNet::new(addr, len).map(|n| n.trunc().to_string()).unwrap_or_else(|_| addr.to_string())
    }

    fn random_policy(rng: &mut fastrand::Rng, now: DateTime<Utc>) -> PolicyDocument {
        let mut doc = PolicyDocument::default();
        for i in 0..rng.usize(1..9) {
            let mut tags = BTreeMap::new();
            tags.insert("role".into(), Scalar::Str(ROLES[rng.usize(..ROLES.len())].into()));
            if rng.bool() {
                tags.insert("site".into(), Scalar::Str(if rng.bool() { "a" } else { "b" }.into()));
            }
            if rng.u8(..4) == 0 {
                tags.insert("quarantine".into(), Scalar::Str("yes".into()));
            }
            let ips = (0..rng.usize(1..3)).map(|_| prefix(rng)).collect();
            doc.assets.push(AssetSpec { name: format!("asset-{i}"), ips, tags, description: None });
        }
        let nseg = rng.usize(1..6);
        for i in 0..nseg {
            let selector = (rng.u8(..5) != 0).then(|| SELECTORS[rng.usize(..SELECTORS.len())].to_string());
            let cidrs = if selector.is_none() || rng.u8(..4) == 0 {
                (0..rng.usize(1..3)).map(|_| prefix(rng)).collect()
            } else {
                vec![]
            };
            let mode = match rng.u8(..5) {
                0 => Mode::Monitor,
                1 => Mode::Label,
                _ => Mode::Enforce,
            };
            doc.segments.push(SegmentSpec { name: format!("seg-{i}"), selector, cidrs, mode, description: None });
        }
        let endpoint = |rng: &mut fastrand::Rng| {
            if rng.u8(..5) == 0 { "any".to_string() } else { format!("seg-{}", rng.usize(..nseg)) }
        };
        for i in 0..rng.usize(0..9) {
            let protocol = match rng.u8(..6) {
                0 => Protocol::Any,
                1 | 2 => Protocol::Tcp,
                3 => Protocol::Udp,
                4 => Protocol::Icmp,
                _ => Protocol::Icmpv6,
            };
            let mut ports = vec![];
            if matches!(protocol, Protocol::Tcp | Protocol::Udp) && rng.bool() {
                for _ in 0..rng.usize(1..3) {
                    let p = PORTS[rng.usize(..PORTS.len())];
                    ports.push(if rng.u8(..3) == 0 {
                        Scalar::Str(format!("{}-{}", p, p.saturating_add(rng.u16(0..600))))
                    } else {
                        Scalar::Int(i64::from(p))
                    });
                }
            }
            let expires = match rng.u8(..8) {
                0 => Some(now - Duration::hours(1)),
                1 => Some(now + Duration::hours(1)),
                _ => None,
            };
            doc.rules.push(RuleSpec {
                name: format!("rule-{i}"),
                from: endpoint(rng),
                to: endpoint(rng),
                protocol,
                ports,
                action: if rng.u8(..4) == 0 { Action::Deny } else { Action::Allow },
                expires,
                description: None,
            });
        }
        doc
    }

    fn random_frame(rng: &mut fastrand::Rng) -> Vec<u8> {
        match rng.u8(..40) {
            0 => return arp(),
            1 => return vec![0; rng.usize(0..14)], // not even an Ethernet header
            _ => {}
        }
        let family6 = rng.bool();
        let (src, dst) = if family6 { (v6(rng), v6(rng)) } else { (v4(rng), v4(rng)) };
        let port = |rng: &mut fastrand::Rng| {
            if rng.bool() { PORTS[rng.usize(..PORTS.len())].wrapping_add(rng.u16(0..3)) } else { rng.u16(1024..1040) }
        };
        let l4 = match rng.u8(..10) {
            0..=3 => L4::Tcp { sport: port(rng), dport: port(rng) },
            4 | 5 => L4::Udp { sport: port(rng), dport: port(rng) },
            6 | 7 => {
                let ty = if family6 {
                    [128, 129, 1, 133, 135, 136, 143, 130, 138][rng.usize(..9)]
                } else {
                    [8, 0, 3, 11][rng.usize(..4)]
                };
                L4::Icmp { ty, id: rng.u16(1..4) }
            }
            8 => L4::Other { proto: [47, 132, 50][rng.usize(..3)] },
            _ => L4::Icmp { ty: 8, id: 1 },
        };
        let mut p = Pkt::new(src, dst, l4);
        if rng.u8(..6) == 0 {
            p.vlans = (0..rng.usize(1..4)).map(|_| [ETH_P_8021Q, ETH_P_8021AD][rng.usize(..2)]).collect();
        }
        if family6 && rng.u8(..5) == 0 {
            p.ext = (0..rng.usize(1..11))
                .map(|_| {
                    let ty = EXT_HEADERS[rng.usize(..EXT_HEADERS.len())];
                    let later_fragment = ty == EXT_FRAGMENT && rng.u8(..3) == 0;
                    let len = if later_fragment {
                        rng.u8(1..20)
                    } else if ty == EXT_FRAGMENT {
                        0
                    } else {
                        rng.u8(0..3)
                    };
                    (ty, len)
                })
                .collect();
        }
        if !family6 && rng.u8(..10) == 0 {
            p.frag_offset = rng.u16(1..200);
        }
        if !family6 && rng.u8(..15) == 0 {
            p.ihl = [0, 3, 6, 15][rng.usize(..4)];
        }
        if rng.u8(..30) == 0 {
            p.version = Some(rng.u8(0..16));
        }
        if rng.u8(..10) == 0 {
            let len = p.build().len();
            p.truncate = Some(rng.usize(14..=len));
        }
        p.build()
    }

    fn outcome_of(counter: u32) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.counter() == counter)
    }

    fn hex(frame: &[u8]) -> String {
        frame.iter().map(|b| format!("{b:02x}")).collect()
    }

    // ---- Tests ------------------------------------------------------------------------------

    /// Random policies and packets: the fake's outcome, deciding rule and action must be the
    /// reference model's on flow starts (the model's flows are cleared before every packet, as
    /// the fake has no flow table). Policies follow one another on one fake, through `apply`.
    #[test]
    fn verdicts_match_the_reference_model_on_flow_starts() {
        const POLICIES: u64 = 30;
        const PACKETS: usize = 200;
        let now = Utc::now();
        let mut compiler = Compiler::new(Timeouts::default(), Capacity::default());
        let mut dp = FakeDataplane::new(&LoadOptions::default());
        let mut expected_counts = vec![0u64; STATS_ENTRIES as usize];
        for seed in 0..POLICIES {
            let mut rng = fastrand::Rng::with_seed(seed);
            let doc = random_policy(&mut rng, now);
            let yaml = serde_yaml::to_string(&doc).unwrap_or_default();
            let policy = doc.validate("random").unwrap_or_else(|e| panic!("seed {seed}: invalid policy: {e}\n{yaml}"));
            let compiled = compiler.compile(&policy, now).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{yaml}"));
            let report = dp.apply(compiled.clone()).expect("the fake never fails");
            assert_eq!(dp.applied(), &compiled, "seed {seed}: apply must leave the compiled maps");
            assert_eq!((report.epoch, dp.epoch()), (seed as u32 + 1, seed as u32 + 1));
            let mut model = Reference::new(policy, now, dp.applied().rule_slots.clone());
            for i in 0..PACKETS {
                let frame = random_frame(&mut rng);
                model.clear_flows();
                let want = model.judge(&frame);
                let want_rule = want.rule.unwrap_or(NO_RULE);
                let (outcome, rule) = dp.judge(&frame);
                let act = dp.test_run(&frame).expect("test_run");
                let want_act = if want.outcome.drops() { XDP_DROP } else { XDP_PASS };
                assert!(
                    outcome_of(outcome) == Some(want.outcome) && rule == want_rule && act == want_act,
                    "seed {seed} packet {i}: fake {:?} rule {rule} action {act}; reference {want:?}\nframe: {}\n\
                     parsed: {:?}\npolicy:\n{yaml}",
                    outcome_of(outcome),
                    hex(&frame),
                    reference::parse(&frame),
                );
                expected_counts[want.outcome.counter() as usize] += 1;
            }
        }
        let stats = dp.stats().expect("stats");
        let counted: Vec<u64> = stats.by_outcome.iter().map(|c| c.packets).collect();
        assert_eq!(counted, expected_counts, "one counter per judged packet, in its outcome");
        // The generator must reach every outcome a stateless judge can give, or agreeing proves
        // less than it claims.
        for o in Outcome::ALL.into_iter().filter(|o| o.counter() != OUTCOME_PASS_FLOW) {
            assert!(expected_counts[o.counter() as usize] > 0, "no packet ended as {}: widen the generator", o.name());
        }
    }

    fn policy(mode: &str, eng_role: &str) -> Policy {
        let yaml = format!(
            "assets:\n\
             \x20 - {{name: hmi-1, ips: [10.0.0.1], tags: {{role: hmi}}}}\n\
             \x20 - {{name: eng-1, ips: [10.0.0.3], tags: {{role: {eng_role}}}}}\n\
             \x20 - {{name: plc-1, ips: [10.0.0.2, \"fd00::2\"], tags: {{role: plc}}}}\n\
             segments:\n\
             \x20 - {{name: plc, selector: role=plc, mode: {mode}}}\n\
             \x20 - {{name: hmi, selector: role=hmi, mode: label}}\n\
             \x20 - {{name: eng, selector: role=eng, mode: label}}\n\
             rules:\n\
             \x20 - {{name: hmi-to-plc-modbus, from: hmi, to: plc, protocol: tcp, ports: [502]}}\n"
        );
        PolicyDocument::from_yaml(&yaml, "t").and_then(|d| d.validate("t")).expect("test policy")
    }

    fn fake_with(policy: &Policy, compiler: &mut Compiler) -> FakeDataplane {
        let mut dp = FakeDataplane::new(&LoadOptions::default());
        dp.apply(compiler.compile(policy, Utc::now()).expect("compile")).expect("apply");
        dp
    }

    fn compiler() -> Compiler {
        Compiler::new(Timeouts::default(), Capacity::default())
    }

    #[test]
    fn modbus_allow_rule_in_enforce_and_monitor_mode() {
        let modbus = Pkt::tcp("10.0.0.1", "10.0.0.2", 40000, 502);
        let cases: [(&str, Vec<u8>, u32, u32); 9] = [
            ("hmi->plc tcp/502", modbus.clone(), XDP_PASS, OUTCOME_PASS_ALLOWED),
            ("eng->plc tcp/502", Pkt::tcp("10.0.0.3", "10.0.0.2", 40000, 502), XDP_DROP, OUTCOME_DROP_DEFAULT),
            ("hmi->plc tcp/503", Pkt::tcp("10.0.0.1", "10.0.0.2", 40000, 503), XDP_DROP, OUTCOME_DROP_DEFAULT),
            (
                "hmi->plc udp/502",
                Pkt::new(ip("10.0.0.1"), ip("10.0.0.2"), L4::Udp { sport: 40000, dport: 502 }).build(),
                XDP_DROP,
                OUTCOME_DROP_DEFAULT,
            ),
            // Stateless: the reply of an allowed flow is judged as a flow of its own.
            ("plc->hmi reply", Pkt::tcp("10.0.0.2", "10.0.0.1", 502, 40000), XDP_DROP, OUTCOME_DROP_DEFAULT),
            ("eng->hmi (labels only)", Pkt::tcp("10.0.0.3", "10.0.0.1", 40000, 502), XDP_PASS, OUTCOME_PASS_UNGOVERNED),
            ("arp", arp(), XDP_PASS, OUTCOME_PASS_NON_IP),
            ("truncated tcp", modbus[..modbus.len() - 1].to_vec(), XDP_DROP, OUTCOME_DROP_MALFORMED),
            ("runt frame", vec![0; 10], XDP_DROP, OUTCOME_DROP_MALFORMED),
        ];
        let mut compiler = compiler();
        let enforce = fake_with(&policy("enforce", "eng"), &mut compiler);
        let monitor = fake_with(&policy("monitor", "eng"), &mut compiler);
        for (name, frame, act, outcome) in &cases {
            assert_eq!(enforce.test_run(frame).expect("test_run"), *act, "enforce: {name}");
            assert_eq!(enforce.judge(frame).0, *outcome, "enforce: {name}");
            assert_eq!(monitor.test_run(frame).expect("test_run"), XDP_PASS, "monitor passes everything: {name}");
        }
        let stats = enforce.stats().expect("stats");
        assert_eq!((stats.total(), stats.dropped(), stats.malformed()), (9, 6, 2), "one count per test_run");
        let slot = enforce.applied().rule_slots["hmi-to-plc-modbus"];
        assert_eq!(enforce.rule_counter(slot).packets, 1, "the allow rule decided one flow start");
        let stats = monitor.stats().expect("stats");
        assert_eq!((stats.dropped(), stats.would_drop()), (0, 6), "monitor counts what it would drop");
    }

    #[test]
    fn ipv6_and_unattributable_frames() {
        let mut compiler = compiler();
        let dp = fake_with(&policy("enforce", "eng"), &mut compiler);
        let ns = Pkt::new(ip("fd00::1"), ip("fd00::2"), L4::Icmp { ty: 135, id: 0 }).build();
        assert_eq!(dp.judge(&ns).0, OUTCOME_PASS_NEIGHBOR, "neighbour discovery passes untouched");
        let ping = Pkt::new(ip("fd00::1"), ip("fd00::2"), L4::Icmp { ty: 128, id: 7 }).build();
        assert_eq!(dp.test_run(&ping).expect("test_run"), XDP_DROP, "no rule allows ICMPv6 to the PLC");
        let mut three_tags = Pkt::new(ip("192.0.2.1"), ip("192.0.2.2"), L4::Udp { sport: 1, dport: 2 });
        three_tags.vlans = vec![ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q];
        assert_eq!(dp.judge(&three_tags.build()).0, OUTCOME_DROP_MALFORMED, "unattributable under enforce");
        let label_only = fake_with(&policy("label", "eng"), &mut compiler);
        assert_eq!(label_only.judge(&three_tags.build()).0, OUTCOME_PASS_MALFORMED, "no governing segment");
        let mut two_tags = Pkt::new(ip("10.0.0.1"), ip("10.0.0.2"), L4::Tcp { sport: 40000, dport: 502 });
        two_tags.vlans = vec![ETH_P_8021AD, ETH_P_8021Q];
        assert_eq!(dp.test_run(&two_tags.build()).expect("test_run"), XDP_PASS, "two VLAN tags are parsed through");
    }

    #[test]
    fn applies_follow_the_compiled_policy_and_move_the_epoch() {
        let now = Utc::now();
        let mut compiler = compiler();
        let mut dp = FakeDataplane::new(&LoadOptions::default());
        assert_eq!((dp.applied(), dp.epoch()), (&Compiled::empty(), 0));
        let eng = Pkt::tcp("10.0.0.3", "10.0.0.2", 40000, 502);
        assert_eq!(dp.judge(&eng).0, OUTCOME_PASS_UNGOVERNED, "empty maps govern nothing");

        let first = compiler.compile(&policy("enforce", "eng"), now).expect("compile");
        let report = dp.apply(first.clone()).expect("apply");
        assert_eq!((report.epoch, report.entries), (1, diff(&Compiled::empty(), &first).len()));
        assert_eq!(dp.applied(), &first);
        assert_eq!(dp.test_run(&eng).expect("test_run"), XDP_DROP);

        // A tag edit through the incremental compiler: the engineering workstation becomes an HMI.
        let retagged = policy("enforce", "hmi");
        let delta = compiler.update_assets(&retagged, &["eng-1"], dp.applied(), now).expect("update");
        let mut expected = dp.applied().clone();
        expected.apply(&delta);
        let entries = delta.len();
        let report = dp.apply_moves(delta).expect("apply_moves");
        assert_eq!((report.epoch, report.entries, dp.applied()), (2, entries, &expected));
        assert_eq!(dp.test_run(&eng).expect("test_run"), XDP_PASS, "now allowed as an HMI");

        let monitor = compiler.compile(&policy("monitor", "eng"), now).expect("compile");
        let report = dp.apply_delta(diff(dp.applied(), &monitor)).expect("apply_delta");
        assert_eq!((report.epoch, dp.applied()), (3, &monitor));
        assert_eq!(dp.judge(&eng).0, OUTCOME_MONITOR_DEFAULT);
        assert!(report.enforced_after <= report.total);
    }

    #[test]
    fn attachments_are_bookkeeping() {
        let mut dp = FakeDataplane::new(&LoadOptions::default());
        assert_eq!(dp.attach("eth1", XdpAttachMode::Native).expect("attach"), "fake");
        assert_eq!(dp.attach("eth2", XdpAttachMode::Auto).expect("attach"), "fake");
        assert_eq!(dp.attach("eth1", XdpAttachMode::Generic).expect("attach"), "fake");
        assert_eq!(dp.attachments(), vec![("eth1".to_string(), "fake"), ("eth2".to_string(), "fake")]);
        assert!(!dp.took_over());
        assert!(dp.flow_counter().expect("flow counter").is_none());
        dp.detach_all().expect("detach");
        assert!(dp.attachments().is_empty());
        let stats = dp.stats().expect("stats");
        assert_eq!((stats.by_outcome.len(), stats.total()), (STATS_ENTRIES as usize, 0));
    }
}
