//! The policy compiler: from a validated [`Policy`] to the contents of the data-plane maps.
//!
//! * Every prefix gets the *identity* of its segment set (LPM tries, see `segment`).
//! * TCP/UDP ports are folded into *port classes*: elementary intervals of the port ranges of
//!   port-restricted rules. Ports no such rule covers share class 0 with port-less packets,
//!   since exactly the same rules (those without a port restriction) match both.
//! * Each live rule becomes entries `(proto, port class, src identity | ANY, dst identity | ANY)`
//!   holding the lowest-slot allow and deny rule. The data plane does at most four lookups per
//!   flow start, whatever the number of rules or assets.
//!
//! The [`Compiler`] keeps identity numbers and rule slots stable across compilations, so a small
//! change to the policy is a small [`Delta`] to the maps. When only assets change (tags,
//! addresses, assets added or removed), [`Compiler::update_assets`] computes the delta from the
//! changed assets alone, without recompiling the policy: the cost of a tag change does not grow
//! with the number of assets.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use gatekeeper_common::{
    CFG_ANY_ANY, CFG_ANY_ENFORCE, CFG_ANY_MONITOR, CFG_DST_ANY, CFG_SRC_ANY, DEFAULT_HOST_ENTRIES,
    DEFAULT_POLICY_ENTRIES, DEFAULT_PREFIX_ENTRIES, DEFAULT_RULE_SLOTS, GOVERN_ENFORCE, GOVERN_MONITOR, GenConfig,
    ID_ANY, Identity, PROTO_ICMP, PROTO_ICMPV6, PROTO_OTHER, PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::policy::{Action, Endpoint, Mode, Policy, Protocol, Segment, membership};

/// Up to this many changed assets are looked up one by one in [`Compiler::update_assets`].
const FEW_CHANGES: usize = 8;

/// Flow-table idle timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_secs: u64,
    pub udp_secs: u64,
    pub icmp_secs: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { tcp_secs: 7200, udp_secs: 120, icmp_secs: 30 }
    }
}

/// How many entries each policy map may hold for one generation (the `GENERATIONS` generations
/// share each map equally), and how many rules have counter slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub hosts_v4: usize,
    pub prefixes_v4: usize,
    pub hosts_v6: usize,
    pub prefixes_v6: usize,
    pub policy: usize,
    pub rules: usize,
}

impl Capacity {
    /// What one generation may hold of maps with these sizes (each host hash and LPM trie
    /// holding `host_entries` and `prefix_entries`, for all generations together).
    pub fn of_maps(host_entries: u32, prefix_entries: u32, policy_entries: u32, rule_slots: u32) -> Self {
        let share = |n: u32| (n / gatekeeper_common::GENERATIONS) as usize;
        Self {
            hosts_v4: share(host_entries),
            prefixes_v4: share(prefix_entries),
            hosts_v6: share(host_entries),
            prefixes_v6: share(prefix_entries),
            policy: share(policy_entries),
            rules: rule_slots as usize,
        }
    }
}

impl Default for Capacity {
    fn default() -> Self {
        Self::of_maps(DEFAULT_HOST_ENTRIES, DEFAULT_PREFIX_ENTRIES, DEFAULT_POLICY_ENTRIES, DEFAULT_RULE_SLOTS)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("the policy needs {needed} {what} entries but the data plane holds {max}")]
    Capacity { what: &'static str, needed: usize, max: usize },
}

/// What one generation of the maps holds (keys carry generation 0 here).
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    pub v4: HashMap<Ipv4Net, Identity>,
    pub v6: HashMap<Ipv6Net, Identity>,
    /// Port classes for TCP (`[0]`) and UDP (`[1]`), one per port.
    pub port_classes: [Box<[u32]>; 2],
    pub policy: HashMap<PolicyKey, PolicyValue>,
    pub config: GenConfig,
    /// Rule name to counter slot.
    pub rule_slots: BTreeMap<String, u32>,
    /// Identity to its segment names (for status and debugging).
    pub identities: BTreeMap<u32, Vec<String>>,
    /// Entries of each prefix table: IPv4 hosts, shorter IPv4 prefixes, IPv6 hosts, shorter
    /// IPv6 prefixes. Kept with every change, so a status report does not walk the tables.
    pub counts: [usize; 4],
}

impl Compiled {
    /// What freshly created maps hold.
    pub fn empty() -> Self {
        Self {
            v4: HashMap::new(),
            v6: HashMap::new(),
            port_classes: [vec![0; 65536].into(), vec![0; 65536].into()],
            policy: HashMap::new(),
            config: GenConfig::default(),
            rule_slots: BTreeMap::new(),
            identities: BTreeMap::new(),
            counts: [0; 4],
        }
    }

    /// The identity of an address, as the program finds it: its host entry if there is one,
    /// else the longest matching shorter prefix (the host hash, then the LPM trie), else no
    /// segment at all.
    pub fn identity(&self, addr: std::net::IpAddr) -> Identity {
        match addr {
            std::net::IpAddr::V4(a) => longest_match(&self.v4, 32, |len| Ipv4Net::new(a, len).ok().map(|n| n.trunc())),
            std::net::IpAddr::V6(a) => longest_match(&self.v6, 128, |len| Ipv6Net::new(a, len).ok().map(|n| n.trunc())),
        }
    }
}

/// Tries every prefix of the address from the host length down. The compiled prefixes have
/// their host bits clear (the policy validator insists), so `net(len)` finds them exactly; this
/// costs at most 33 or 129 hash lookups, whatever the size of the policy.
fn longest_match<N: Eq + std::hash::Hash>(
    prefixes: &HashMap<N, Identity>,
    host_len: u8,
    net: impl Fn(u8) -> Option<N>,
) -> Identity {
    (0..=host_len).rev().find_map(|len| net(len).and_then(|n| prefixes.get(&n).copied())).unwrap_or_default()
}

/// Changes turning one [`Compiled`] into another; `None` values are deletions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    pub v4: Vec<(Ipv4Net, Option<Identity>)>,
    pub v6: Vec<(Ipv6Net, Option<Identity>)>,
    /// `(l4, port, class)`, l4 0 = TCP, 1 = UDP.
    pub ports: Vec<(u32, u16, u32)>,
    pub policy: Vec<(PolicyKey, Option<PolicyValue>)>,
    pub config: Option<GenConfig>,
    /// Counter slots newly given to a rule (to be zeroed before use).
    pub new_slots: Vec<u32>,
    /// Identities appearing (with their segment names) or disappearing; bookkeeping only.
    pub identities: Vec<(u32, Option<Vec<String>>)>,
    /// The new rule slots, when they change; bookkeeping only.
    pub rule_slots: Option<BTreeMap<String, u32>>,
}

impl Delta {
    /// Map entries this delta writes per generation.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len() + self.ports.len() + self.policy.len() + usize::from(self.config.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether applying this delta changes nothing a packet could see: no map entry and no rule
    /// counter to zero (only bookkeeping, if anything).
    pub fn writes_nothing(&self) -> bool {
        self.is_empty() && self.new_slots.is_empty()
    }
}

impl Compiled {
    /// Applies `delta` to this description of the maps.
    pub fn apply(&mut self, delta: &Delta) {
        /// Applies `changes` to `m`; returns how many keys `counted` picks were added and removed.
        fn upd<K: Eq + std::hash::Hash + Copy, V: Copy>(
            m: &mut HashMap<K, V>,
            changes: &[(K, Option<V>)],
            counted: impl Fn(&K) -> bool,
        ) -> [[usize; 2]; 2] {
            let mut n = [[0; 2]; 2];
            for (k, v) in changes {
                let (was, now) = match v {
                    Some(v) => (m.insert(*k, *v).is_some(), true),
                    None => (m.remove(k).is_some(), false),
                };
                if was != now {
                    n[usize::from(!counted(k))][usize::from(was)] += 1;
                }
            }
            n
        }
        let v4 = upd(&mut self.v4, &delta.v4, |n| n.prefix_len() == 32);
        let v6 = upd(&mut self.v6, &delta.v6, |n| n.prefix_len() == 128);
        for (i, [added, removed]) in v4.into_iter().chain(v6).enumerate() {
            self.counts[i] = (self.counts[i] + added).saturating_sub(removed);
        }
        upd(&mut self.policy, &delta.policy, |_| true);
        for &(l4, port, class) in &delta.ports {
            self.port_classes[l4 as usize & 1][usize::from(port)] = class;
        }
        if let Some(c) = delta.config {
            self.config = c;
        }
        for (id, names) in &delta.identities {
            match names {
                Some(n) => self.identities.insert(*id, n.clone()),
                None => self.identities.remove(id),
            };
        }
        if let Some(slots) = &delta.rule_slots {
            self.rule_slots = slots.clone();
        }
    }

    /// The contents with identity numbers replaced by their segment names, for comparing two
    /// compilations that numbered identities differently.
    #[allow(clippy::type_complexity)]
    pub fn canonical(
        &self,
    ) -> (BTreeMap<IpNet, (Vec<String>, u32)>, BTreeMap<(Option<Vec<String>>, Option<Vec<String>>, u8, u32), (u32, u32)>)
    {
        let name = |id: u32| self.identities.get(&id).cloned().unwrap_or_else(|| vec![format!("?{id}")]);
        let side = |id: u32| (id != ID_ANY).then(|| name(id));
        let prefixes = self
            .v4
            .iter()
            .map(|(n, i)| (IpNet::V4(*n), (name(i.id), i.flags)))
            .chain(self.v6.iter().map(|(n, i)| (IpNet::V6(*n), (name(i.id), i.flags))))
            .collect();
        let policy = self
            .policy
            .iter()
            .map(|(k, v)| ((side(k.src), side(k.dst), k.proto, k.port_class), (v.allow_rule, v.deny_rule)))
            .collect();
        (prefixes, policy)
    }
}

fn diff_maps<K: Copy + Eq + std::hash::Hash, V: Copy + PartialEq>(
    old: &HashMap<K, V>,
    new: &HashMap<K, V>,
) -> Vec<(K, Option<V>)> {
    let mut out: Vec<(K, Option<V>)> =
        new.iter().filter(|(k, v)| old.get(k) != Some(v)).map(|(k, v)| (*k, Some(*v))).collect();
    out.extend(old.keys().filter(|k| !new.contains_key(k)).map(|k| (*k, None)));
    out
}

/// The map writes that turn `old` into `new`.
pub fn diff(old: &Compiled, new: &Compiled) -> Delta {
    let mut ports = Vec::new();
    for l4 in 0..2 {
        for (port, (o, n)) in old.port_classes[l4].iter().zip(new.port_classes[l4].iter()).enumerate() {
            if o != n {
                ports.push((l4 as u32, port as u16, *n));
            }
        }
    }
    let old_slots: BTreeSet<u32> = old.rule_slots.values().copied().collect();
    let mut identities: Vec<(u32, Option<Vec<String>>)> = new
        .identities
        .iter()
        .filter(|(id, n)| old.identities.get(id) != Some(n))
        .map(|(id, n)| (*id, Some(n.clone())))
        .collect();
    identities.extend(old.identities.keys().filter(|id| !new.identities.contains_key(id)).map(|id| (*id, None)));
    Delta {
        v4: diff_maps(&old.v4, &new.v4),
        v6: diff_maps(&old.v6, &new.v6),
        ports,
        policy: diff_maps(&old.policy, &new.policy),
        config: (old.config != new.config).then_some(new.config),
        new_slots: new.rule_slots.values().copied().filter(|s| !old_slots.contains(s)).collect(),
        identities,
        rule_slots: (old.rule_slots != new.rule_slots).then(|| new.rule_slots.clone()),
    }
}

/// A live rule, ready to generate policy entries.
#[derive(Debug, Clone)]
struct RuleGen {
    slot: u32,
    action: Action,
    /// Segment index, or `None` for `any`.
    from: Option<usize>,
    to: Option<usize>,
    /// Protocol class and the port classes it covers.
    classes: Vec<(u8, Vec<u32>)>,
}

impl RuleGen {
    /// Emits every key of this rule for the given sides into `out` (lowest slot wins).
    fn emit(&self, srcs: &[u32], dsts: &[u32], out: &mut HashMap<PolicyKey, PolicyValue>) {
        for (proto, classes) in &self.classes {
            for &src in srcs {
                for &dst in dsts {
                    for &port_class in classes {
                        let key = PolicyKey { generation: 0, proto: *proto, _pad: [0; 2], port_class, src, dst };
                        let v = out.entry(key).or_default();
                        let field = match self.action {
                            Action::Allow => &mut v.allow_rule,
                            Action::Deny => &mut v.deny_rule,
                        };
                        *field = (*field).min(self.slot);
                    }
                }
            }
        }
    }

    /// Keys only (for deletions).
    fn keys(&self, srcs: &[u32], dsts: &[u32], out: &mut BTreeSet<PolicyKey>) {
        for (proto, classes) in &self.classes {
            for &src in srcs {
                for &dst in dsts {
                    for &port_class in classes {
                        out.insert(PolicyKey { generation: 0, proto: *proto, _pad: [0; 2], port_class, src, dst });
                    }
                }
            }
        }
    }
}

/// What the last full compilation knew, so asset changes can be compiled on their own.
#[derive(Debug, Default)]
struct Base {
    segments: Vec<Segment>,
    /// Asset name to (prefixes, segments selecting it).
    assets: HashMap<String, (Vec<IpNet>, Vec<usize>)>,
    /// Prefix to the segments naming it directly, with how many assets/CIDRs do.
    direct: HashMap<IpNet, BTreeMap<usize, u32>>,
    /// Direct prefixes per (family, length), to walk only lengths in use.
    lengths: [BTreeMap<u8, usize>; 2],
    /// Segment set to its identity and the number of prefixes that have it.
    sets: HashMap<Vec<usize>, (Identity, usize)>,
    id_sets: HashMap<u32, Vec<usize>>,
    /// Segment to the identities containing it.
    members: Vec<BTreeSet<u32>>,
    rules: Vec<RuleGen>,
    /// Segment to the rules naming it (from or to).
    rules_of: Vec<Vec<usize>>,
    counts: [usize; 4],
}

fn family(net: &IpNet) -> usize {
    usize::from(matches!(net, IpNet::V6(_)))
}

fn is_host(net: &IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

impl Base {
    /// The segments of `net`: its own and those of every direct prefix containing it.
    fn effective(&self, net: &IpNet) -> Vec<usize> {
        let mut set: BTreeSet<usize> = BTreeSet::new();
        for (&len, _) in self.lengths[family(net)].range(..=net.prefix_len()) {
            let Ok(outer) = IpNet::new(net.addr(), len) else { continue };
            if let Some(segs) = self.direct.get(&outer.trunc()) {
                set.extend(segs.keys());
            }
        }
        set.into_iter().collect()
    }

    fn add_direct(&mut self, net: IpNet, seg: usize) {
        let e = self.direct.entry(net).or_default();
        if e.is_empty() {
            *self.lengths[family(&net)].entry(net.prefix_len()).or_default() += 1;
        }
        *e.entry(seg).or_default() += 1;
    }

    fn remove_direct(&mut self, net: IpNet, seg: usize) {
        let Some(e) = self.direct.get_mut(&net) else { return };
        if let Some(c) = e.get_mut(&seg) {
            *c -= 1;
            if *c == 0 {
                e.remove(&seg);
            }
        }
        if e.is_empty() {
            self.direct.remove(&net);
            let l = self.lengths[family(&net)].entry(net.prefix_len()).or_default();
            *l = l.saturating_sub(1);
            if *l == 0 {
                self.lengths[family(&net)].remove(&net.prefix_len());
            }
        }
    }

    fn flags(&self, set: &[usize]) -> u32 {
        set.iter().fold(0, |f, &s| {
            f | match self.segments[s].mode {
                Mode::Enforce => GOVERN_ENFORCE,
                Mode::Monitor => GOVERN_MONITOR,
                Mode::Label => 0,
            }
        })
    }

    fn side(&self, seg: Option<usize>) -> Vec<u32> {
        match seg {
            None => vec![ID_ANY],
            Some(s) => self.members[s].iter().copied().collect(),
        }
    }

    fn segments_of(&self, tags: &BTreeMap<String, String>) -> Vec<usize> {
        membership::segments_of_asset(&self.segments, tags)
    }
}

/// Keeps identity numbers and rule slots stable from one compilation to the next.
#[derive(Debug, Default)]
pub struct Compiler {
    ids: HashMap<Vec<String>, u32>,
    next_id: u32,
    slots: HashMap<String, u32>,
    base: Option<Base>,
    pub timeouts: Timeouts,
    pub capacity: Capacity,
}

impl Compiler {
    pub fn new(timeouts: Timeouts, capacity: Capacity) -> Self {
        Self { timeouts, capacity, ..Default::default() }
    }

    /// Forgets what the last compilation knew (after the data plane refused it): the next change
    /// is compiled in full.
    pub fn reset(&mut self) {
        self.base = None;
    }

    fn check_counts(&self, counts: [usize; 4]) -> Result<(), CompileError> {
        let cap = self.capacity;
        for (what, needed, max) in [
            ("IPv4 host", counts[0], cap.hosts_v4),
            ("IPv4 prefix", counts[1], cap.prefixes_v4),
            ("IPv6 host", counts[2], cap.hosts_v6),
            ("IPv6 prefix", counts[3], cap.prefixes_v6),
        ] {
            if needed > max {
                return Err(CompileError::Capacity { what, needed, max });
            }
        }
        Ok(())
    }

    fn names(segments: &[Segment], set: &[usize]) -> Vec<String> {
        let mut v: Vec<String> = set.iter().map(|&s| segments[s].name.clone()).collect();
        v.sort();
        v
    }

    /// Compiles `policy` as it stands at `now` (expired rules are left out). On error the
    /// compiler's numbering is left as it was.
    pub fn compile(&mut self, policy: &Policy, now: DateTime<Utc>) -> Result<Compiled, CompileError> {
        let cap = self.capacity;
        if policy.rules.len() > cap.rules {
            return Err(CompileError::Capacity { what: "rule", needed: policy.rules.len(), max: cap.rules });
        }
        let mut base = Base { segments: policy.segments.clone(), ..Base::default() };

        let mut asset_segs = membership::segments_by_asset(policy);
        for (s, segment) in policy.segments.iter().enumerate() {
            for net in &segment.cidrs {
                base.add_direct(*net, s);
            }
        }
        for (i, asset) in policy.assets.iter().enumerate() {
            for net in &asset.prefixes {
                for &s in &asset_segs[i] {
                    base.add_direct(*net, s);
                }
            }
        }

        // Effective sets and their identities.
        let mut prefix_sets: Vec<(IpNet, Vec<usize>)> = Vec::with_capacity(base.direct.len());
        let mut counts = [0usize; 4];
        for net in base.direct.keys() {
            counts[family(net) * 2 + usize::from(!is_host(net))] += 1;
            prefix_sets.push((*net, base.effective(net)));
        }
        self.check_counts(counts)?;
        let mut ids: HashMap<Vec<String>, u32> = HashMap::new();
        let mut next_id = self.next_id;
        let mut identities = BTreeMap::new();
        let (mut v4, mut v6) = (HashMap::new(), HashMap::new());
        for (net, set) in prefix_sets {
            let ident = match base.sets.get_mut(&set) {
                Some((ident, n)) => {
                    *n += 1;
                    *ident
                }
                None => {
                    let key = Self::names(&base.segments, &set);
                    let id = match self.ids.get(&key) {
                        Some(&id) => id,
                        None => {
                            next_id += 1;
                            next_id
                        }
                    };
                    let ident = Identity { id, flags: base.flags(&set) };
                    identities.insert(id, key.clone());
                    ids.insert(key, id);
                    base.id_sets.insert(id, set.clone());
                    base.sets.insert(set, (ident, 1));
                    ident
                }
            };
            match net {
                IpNet::V4(n) => v4.insert(n, ident),
                IpNet::V6(n) => v6.insert(n, ident),
            };
        }
        base.members = vec![BTreeSet::new(); policy.segments.len()];
        for (set, (ident, _)) in &base.sets {
            for &s in set {
                base.members[s].insert(ident.id);
            }
        }
        let segment_index: HashMap<&str, usize> =
            policy.segments.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();

        // Rule slots: kept by name; new rules take the lowest free slot.
        let mut slots = BTreeMap::new();
        let mut used: BTreeSet<u32> = BTreeSet::new();
        for r in &policy.rules {
            if let Some(&s) = self.slots.get(&r.name) {
                slots.insert(r.name.clone(), s);
                used.insert(s);
            }
        }
        let mut free = (0..cap.rules as u32).filter(|s| !used.contains(s));
        for r in &policy.rules {
            if !slots.contains_key(&r.name) {
                // There are at most `cap.rules` rules, so a free slot always exists.
                let s = free.next().unwrap_or(0);
                slots.insert(r.name.clone(), s);
            }
        }

        // Port classes from live port-restricted rules.
        let live: Vec<_> = policy.rules.iter().filter(|r| r.live(now)).collect();
        let mut port_classes: [Box<[u32]>; 2] = [vec![0; 65536].into(), vec![0; 65536].into()];
        let mut max_class = [0u32; 2];
        for (l4, proto) in [(0, Protocol::Tcp), (1, Protocol::Udp)] {
            // Sweep the ports: a new class starts wherever the coverage changes, and only
            // covered intervals get a class (uncovered ones share class 0).
            let mut delta = vec![0i32; 65537];
            let mut starts = vec![false; 65537];
            for r in live.iter().filter(|r| r.protocol == proto) {
                for &(lo, hi) in &r.ports {
                    delta[usize::from(lo)] += 1;
                    delta[usize::from(hi) + 1] -= 1;
                    starts[usize::from(lo)] = true;
                    starts[usize::from(hi) + 1] = true;
                }
            }
            let (mut depth, mut class) = (0i32, 0u32);
            for port in 0..65536usize {
                depth += delta[port];
                if depth > 0 {
                    if starts[port] || port_classes[l4].get(port.wrapping_sub(1)).is_none_or(|&c| c == 0) {
                        class += 1;
                    }
                    port_classes[l4][port] = class;
                }
            }
            max_class[l4] = class;
        }

        // Policy entries.
        let mut entries: HashMap<PolicyKey, PolicyValue> = HashMap::new();
        let mut flags = 0;
        base.rules_of = vec![Vec::new(); policy.segments.len()];
        for r in &live {
            let seg = |e: &Endpoint| match e {
                Endpoint::Any => None,
                Endpoint::Segment(s) => segment_index.get(s.as_str()).copied(),
            };
            let protos: &[u8] = match r.protocol {
                Protocol::Any => &[PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6, PROTO_OTHER],
                Protocol::Tcp => &[PROTO_TCP],
                Protocol::Udp => &[PROTO_UDP],
                Protocol::Icmp => &[PROTO_ICMP],
                Protocol::Icmpv6 => &[PROTO_ICMPV6],
            };
            let classes = protos
                .iter()
                .map(|&proto| {
                    let l4 = match proto {
                        PROTO_TCP => Some(0),
                        PROTO_UDP => Some(1),
                        _ => None,
                    };
                    let classes: BTreeSet<u32> = match l4 {
                        Some(l4) if r.ports.is_empty() => (0..=max_class[l4]).collect(),
                        Some(l4) => r
                            .ports
                            .iter()
                            .flat_map(|&(lo, hi)| port_classes[l4][usize::from(lo)]..=port_classes[l4][usize::from(hi)])
                            .collect(),
                        None => BTreeSet::from([0]),
                    };
                    (proto, classes.into_iter().collect())
                })
                .collect();
            let g = RuleGen { slot: slots[&r.name], action: r.action, from: seg(&r.from), to: seg(&r.to), classes };
            // A rule naming a segment that does not exist matches nothing (validation prevents it).
            if matches!(r.from, Endpoint::Segment(_)) && g.from.is_none()
                || matches!(r.to, Endpoint::Segment(_)) && g.to.is_none()
            {
                continue;
            }
            flags |= match (g.from, g.to) {
                (None, None) => CFG_ANY_ANY,
                (None, _) => CFG_SRC_ANY,
                (_, None) => CFG_DST_ANY,
                _ => 0,
            };
            let (srcs, dsts) = (base.side(g.from), base.side(g.to));
            let work: usize = g.classes.iter().map(|(_, c)| c.len()).sum::<usize>() * srcs.len() * dsts.len();
            if entries.len() + work > cap.policy.saturating_mul(4) {
                return Err(CompileError::Capacity { what: "policy", needed: entries.len() + work, max: cap.policy });
            }
            g.emit(&srcs, &dsts, &mut entries);
            if entries.len() > cap.policy {
                return Err(CompileError::Capacity { what: "policy", needed: entries.len(), max: cap.policy });
            }
            let index = base.rules.len();
            for s in [g.from, g.to].into_iter().flatten().collect::<BTreeSet<_>>() {
                base.rules_of[s].push(index);
            }
            base.rules.push(g);
        }
        for s in &policy.segments {
            flags |= match s.mode {
                Mode::Enforce => CFG_ANY_ENFORCE,
                Mode::Monitor => CFG_ANY_MONITOR,
                Mode::Label => 0,
            };
        }
        let t = self.timeouts;
        let config = GenConfig {
            flags,
            _pad: 0,
            tcp_timeout_ns: t.tcp_secs.saturating_mul(1_000_000_000),
            udp_timeout_ns: t.udp_secs.saturating_mul(1_000_000_000),
            icmp_timeout_ns: t.icmp_secs.saturating_mul(1_000_000_000),
        };

        // Success: commit the numbering and what incremental updates need.
        for (i, asset) in policy.assets.iter().enumerate() {
            base.assets.insert(asset.name.clone(), (asset.prefixes.clone(), std::mem::take(&mut asset_segs[i])));
        }
        base.counts = counts;
        self.base = Some(base);
        self.ids = ids;
        self.next_id = next_id;
        self.slots = slots.iter().map(|(k, v)| (k.clone(), *v)).collect();
        Ok(Compiled { v4, v6, port_classes, policy: entries, config, rule_slots: slots, identities, counts })
    }

    /// The delta for a policy that differs from the last compiled one only in the assets named
    /// in `changed` (tags or addresses edited, assets added or removed). `applied` is what the
    /// maps hold: the result of the last compilation with every delta since applied to it.
    /// Falls back to a full compilation when there is no base to work from.
    pub fn update_assets(
        &mut self,
        policy: &Policy,
        changed: &[&str],
        applied: &Compiled,
        now: DateTime<Utc>,
    ) -> Result<Delta, CompileError> {
        // A few changes: a search each (it stops at the asset). Many (a reload): one pass over
        // the policy, not one search per changed asset.
        let given: Vec<(&str, Option<&crate::policy::Asset>)> = if changed.len() <= FEW_CHANGES {
            changed.iter().map(|n| (*n, policy.assets.iter().find(|a| a.name == *n))).collect()
        } else {
            let wanted: HashSet<&str> = changed.iter().copied().collect();
            let found: HashMap<&str, &crate::policy::Asset> = policy
                .assets
                .iter()
                .filter(|a| wanted.contains(a.name.as_str()))
                .map(|a| (a.name.as_str(), a))
                .collect();
            changed.iter().map(|n| (*n, found.get(n).copied())).collect()
        };
        self.update_assets_given(policy, &given, applied, now)
    }

    /// Like [`Compiler::update_assets`], with the changed assets given (`None`: removed), so
    /// nothing scans the whole asset list. `policy` is only used when a full compile is needed.
    pub fn update_assets_given(
        &mut self,
        policy: &Policy,
        changed: &[(&str, Option<&crate::policy::Asset>)],
        applied: &Compiled,
        now: DateTime<Utc>,
    ) -> Result<Delta, CompileError> {
        let Some(mut base) = self.base.take() else {
            return Ok(diff(applied, &self.compile(policy, now)?));
        };
        let names: Vec<&str> = changed.iter().map(|(n, _)| *n).collect();
        let assets: HashMap<&str, &crate::policy::Asset> =
            changed.iter().filter_map(|(n, a)| a.map(|a| (*n, a))).collect();
        let result = self.update_base(&mut base, &assets, &names, applied);
        // On error the base may be half-updated: it is dropped, and the next change is compiled
        // in full.
        if result.is_ok() {
            self.base = Some(base);
        }
        result
    }

    fn update_base(
        &mut self,
        base: &mut Base,
        assets: &HashMap<&str, &crate::policy::Asset>,
        changed: &[&str],
        applied: &Compiled,
    ) -> Result<Delta, CompileError> {
        // 1. Direct membership of the changed assets' prefixes.
        let mut touched: BTreeSet<IpNet> = BTreeSet::new();
        for name in changed {
            let new = assets.get(name).map(|a| (a.prefixes.clone(), base.segments_of(&a.tags)));
            let old = base.assets.remove(*name);
            if old == new {
                if let Some(o) = old {
                    base.assets.insert(name.to_string(), o);
                }
                continue;
            }
            if let Some((prefixes, segs)) = &old {
                for p in prefixes {
                    segs.iter().for_each(|&s| base.remove_direct(*p, s));
                    touched.insert(*p);
                }
            }
            if let Some((prefixes, segs)) = &new {
                for p in prefixes {
                    segs.iter().for_each(|&s| base.add_direct(*p, s));
                    touched.insert(*p);
                }
            }
            if let Some(n) = new {
                base.assets.insert(name.to_string(), n);
            }
        }
        // Prefixes nested inside a touched shorter prefix inherit its segments. (A nested prefix
        // not in the maps yet is new, so it is touched already.)
        let wider: Vec<IpNet> = touched.iter().filter(|n| !is_host(n)).copied().collect();
        if !wider.is_empty() {
            let in_maps = applied.v4.keys().map(|n| IpNet::V4(*n)).chain(applied.v6.keys().map(|n| IpNet::V6(*n)));
            let nested: Vec<IpNet> = in_maps.filter(|k| wider.iter().any(|w| w.contains(k) && w != k)).collect();
            touched.extend(nested);
        }

        // 2. New effective sets and identities.
        let mut delta = Delta::default();
        let mut changes: Vec<(IpNet, Option<Vec<usize>>, Option<Identity>)> = Vec::new();
        for net in &touched {
            let new_set = base.direct.contains_key(net).then(|| base.effective(net));
            let old_ident = match net {
                IpNet::V4(n) => applied.v4.get(n).copied(),
                IpNet::V6(n) => applied.v6.get(n).copied(),
            };
            let old_set = old_ident.and_then(|i| base.id_sets.get(&i.id).cloned());
            if new_set == old_set {
                continue;
            }
            changes.push((*net, new_set, old_ident));
        }
        let mut created: Vec<u32> = Vec::new();
        for (net, new_set, old_ident) in &changes {
            if let Some(old) = old_ident.and_then(|i| base.id_sets.get(&i.id).cloned())
                && let Some((_, n)) = base.sets.get_mut(&old)
            {
                *n = n.saturating_sub(1);
            }
            let ident = match new_set {
                None => None,
                Some(set) => Some(match base.sets.get_mut(set) {
                    Some((ident, n)) => {
                        *n += 1;
                        *ident
                    }
                    None => {
                        let key = Self::names(&base.segments, set);
                        self.next_id += 1;
                        let ident = Identity { id: self.next_id, flags: base.flags(set) };
                        self.ids.insert(key.clone(), ident.id);
                        base.id_sets.insert(ident.id, set.clone());
                        base.sets.insert(set.clone(), (ident, 1));
                        for &s in set {
                            base.members[s].insert(ident.id);
                        }
                        delta.identities.push((ident.id, Some(key)));
                        created.push(ident.id);
                        ident
                    }
                }),
            };
            let (was, now_is) = (old_ident.is_some(), ident.is_some());
            let slot = family(net) * 2 + usize::from(!is_host(net));
            if was && !now_is {
                base.counts[slot] -= 1;
            } else if !was && now_is {
                base.counts[slot] += 1;
            }
            match net {
                IpNet::V4(n) => delta.v4.push((*n, ident)),
                IpNet::V6(n) => delta.v6.push((*n, ident)),
            }
        }
        self.check_counts(base.counts)?;
        // Identities no prefix has any more.
        let freed: Vec<(Vec<usize>, Identity)> =
            base.sets.iter().filter(|(_, (_, n))| *n == 0).map(|(set, (ident, _))| (set.clone(), *ident)).collect();

        // 3. Policy entries of freed and created identities. Keys of a freed identity are made
        // from the members before this change as well as after, so none is left behind.
        let mut removed: BTreeSet<PolicyKey> = BTreeSet::new();
        for (set, ident) in &freed {
            let rules: BTreeSet<usize> = set.iter().flat_map(|&s| base.rules_of[s].iter().copied()).collect();
            for r in rules {
                let g = &base.rules[r];
                let from_has = g.from.is_some_and(|s| set.contains(&s));
                let to_has = g.to.is_some_and(|s| set.contains(&s));
                if from_has {
                    g.keys(&[ident.id], &base.side(g.to), &mut removed);
                }
                if to_has {
                    g.keys(&base.side(g.from), &[ident.id], &mut removed);
                }
            }
        }
        for (set, ident) in &freed {
            base.sets.remove(set);
            base.id_sets.remove(&ident.id);
            for &s in set {
                base.members[s].remove(&ident.id);
            }
            delta.identities.push((ident.id, None));
        }
        let mut added: HashMap<PolicyKey, PolicyValue> = HashMap::new();
        for id in &created {
            let Some(set) = base.id_sets.get(id) else { continue };
            let rules: BTreeSet<usize> = set.iter().flat_map(|&s| base.rules_of[s].iter().copied()).collect();
            for r in rules {
                let g = &base.rules[r];
                if g.from.is_some_and(|s| set.contains(&s)) {
                    g.emit(&[*id], &base.side(g.to), &mut added);
                }
                if g.to.is_some_and(|s| set.contains(&s)) {
                    g.emit(&base.side(g.from), &[*id], &mut added);
                }
            }
        }
        // Keys between two created identities are complete from either side; keys between a
        // created identity and a freed one were never added (the freed one left `members`).
        for k in removed {
            if !added.contains_key(&k) && applied.policy.contains_key(&k) {
                delta.policy.push((k, None));
            }
        }
        if applied.policy.len() + added.len() > self.capacity.policy {
            return Err(CompileError::Capacity {
                what: "policy",
                needed: applied.policy.len() + added.len(),
                max: self.capacity.policy,
            });
        }
        delta.policy.extend(added.into_iter().map(|(k, v)| (k, Some(v))));
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyDocument;

    fn policy(yaml: &str) -> Policy {
        PolicyDocument::from_yaml(yaml, "t").unwrap().validate("t").unwrap()
    }

    const BASE: &str = r#"
assets:
  - {name: hmi-1, ips: [10.0.0.5], tags: {role: hmi}}
  - {name: plc-1, ips: [10.0.0.10], tags: {role: plc}}
  - {name: plc-2, ips: [10.0.0.11], tags: {role: plc}}
segments:
  - {name: hmi, selector: role=hmi, mode: label}
  - {name: plc, selector: role=plc}
rules:
  - {name: modbus, from: hmi, to: plc, protocol: tcp, ports: [502]}
  - {name: s7, from: hmi, to: plc, protocol: tcp, ports: ["100-200"]}
  - {name: ping, from: any, to: plc, protocol: icmp}
"#;

    #[test]
    fn compiles_identities_classes_and_entries() {
        let mut c = Compiler::default();
        let out = c.compile(&policy(BASE), Utc::now()).unwrap();
        assert_eq!(out.v4.len(), 3);
        let plc = out.v4[&"10.0.0.10/32".parse().unwrap()];
        let hmi = out.v4[&"10.0.0.5/32".parse().unwrap()];
        assert_eq!(plc, out.v4[&"10.0.0.11/32".parse().unwrap()], "same segments, same identity");
        assert_eq!(plc.flags, GOVERN_ENFORCE);
        assert_eq!(hmi.flags, 0, "label segments govern nothing");
        let tcp = &out.port_classes[0];
        assert_eq!((tcp[99], tcp[100], tcp[200], tcp[201], tcp[502], tcp[503]), (0, 1, 1, 0, 2, 0));
        let key = |proto, port_class, src, dst| PolicyKey { generation: 0, proto, _pad: [0; 2], port_class, src, dst };
        assert_eq!(out.policy[&key(PROTO_TCP, 2, hmi.id, plc.id)].allow_rule, 0);
        assert_eq!(out.policy[&key(PROTO_TCP, 1, hmi.id, plc.id)].allow_rule, 1);
        assert!(!out.policy.contains_key(&key(PROTO_TCP, 0, hmi.id, plc.id)));
        assert_eq!(out.policy[&key(PROTO_ICMP, 0, ID_ANY, plc.id)].allow_rule, 2);
        assert_eq!(out.policy.len(), 3);
        assert_eq!(out.config.flags, CFG_ANY_ENFORCE | CFG_SRC_ANY);
    }

    #[test]
    fn a_tag_change_is_a_small_delta() {
        let mut c = Compiler::default();
        let before = c.compile(&policy(BASE), Utc::now()).unwrap();
        let after = c
            .compile(
                &policy(
                    &BASE.replace("plc-2, ips: [10.0.0.11], tags: {role: plc}", "plc-2, ips: [10.0.0.11], tags: {}"),
                ),
                Utc::now(),
            )
            .unwrap();
        let d = diff(&before, &after);
        assert_eq!(d.v4, vec![("10.0.0.11/32".parse().unwrap(), None)]);
        assert!(d.policy.is_empty() && d.ports.is_empty() && d.config.is_none());
        assert_eq!(diff(&after, &after), Delta::default());
    }

    #[test]
    fn deny_and_expiry() {
        let mut c = Compiler::default();
        let yaml = format!(
            "{BASE}  - {{name: no-plc-2, from: any, to: plc, action: deny, expires: 2000-01-01T00:00:00Z}}\n  - {{name: block, from: hmi, to: plc, protocol: tcp, ports: [502], action: deny}}\n"
        );
        let out = c.compile(&policy(&yaml), Utc::now()).unwrap();
        assert_eq!(out.rule_slots["block"], 4);
        let v: Vec<_> = out.policy.values().filter(|v| v.deny_rule != u32::MAX).collect();
        assert_eq!(v.len(), 1, "the expired deny rule compiles to nothing");
        assert_eq!(v[0].deny_rule, 4);
        assert_eq!(v[0].allow_rule, 0);
    }

    #[test]
    fn slots_are_stable_and_reused() {
        let mut c = Compiler::default();
        let a = c.compile(&policy(BASE), Utc::now()).unwrap();
        assert_eq!(a.rule_slots.values().copied().collect::<Vec<_>>(), vec![0, 2, 1]); // modbus, ping, s7
        let without_modbus = BASE.replace("  - {name: modbus, from: hmi, to: plc, protocol: tcp, ports: [502]}\n", "");
        let b = c.compile(&policy(&without_modbus), Utc::now()).unwrap();
        assert_eq!(b.rule_slots["s7"], 1);
        let again = format!("{without_modbus}  - {{name: new, from: hmi, to: plc}}\n");
        let c2 = c.compile(&policy(&again), Utc::now()).unwrap();
        assert_eq!(c2.rule_slots["new"], 0, "lowest free slot");
        assert_eq!(diff(&b, &c2).new_slots, vec![0]);
    }

    fn random_policy(rng: &mut fastrand::Rng) -> PolicyDocument {
        use crate::policy::{AssetSpec, RuleSpec, Scalar, SegmentSpec};
        let mut doc = PolicyDocument::default();
        for i in 0..rng.usize(3..12) {
            doc.assets.push(AssetSpec { name: format!("a{i}"), ..Default::default() });
        }
        let sels = ["role=plc", "role=hmi", "role in (plc,eng)", "site!=x", "site", "!q", "role=eng,site=y"];
        let nseg = rng.usize(2..6);
        for i in 0..nseg {
            let cidrs = if rng.u8(..4) == 0 {
                vec![["10.0.0.0/28", "10.0.1.0/24", "fd00::/120"][rng.usize(..3)].to_string()]
            } else {
                vec![]
            };
            let mode = [Mode::Enforce, Mode::Monitor, Mode::Label][rng.usize(..3)];
            doc.segments.push(SegmentSpec {
                name: format!("s{i}"),
                selector: Some(sels[rng.usize(..sels.len())].into()),
                cidrs,
                mode,
                description: None,
            });
        }
        for i in 0..rng.usize(1..8) {
            let ep = |rng: &mut fastrand::Rng| {
                if rng.u8(..5) == 0 { "any".to_string() } else { format!("s{}", rng.usize(..nseg)) }
            };
            let (protocol, ports) = match rng.u8(..3) {
                0 => (Protocol::Tcp, vec![Scalar::Int(i64::from([22u16, 502, 102][rng.usize(..3)]))]),
                1 => (Protocol::Udp, vec![]),
                _ => (Protocol::Any, vec![]),
            };
            let action = if rng.u8(..4) == 0 { Action::Deny } else { Action::Allow };
            doc.rules.push(RuleSpec {
                name: format!("r{i}"),
                from: ep(rng),
                to: ep(rng),
                protocol,
                ports,
                action,
                expires: None,
                description: None,
            });
        }
        doc
    }

    fn mutate_assets(rng: &mut fastrand::Rng, doc: &mut PolicyDocument) -> Vec<String> {
        use crate::policy::{AssetSpec, Scalar};
        let mut changed = Vec::new();
        for _ in 0..rng.usize(1..4) {
            let i = rng.usize(..doc.assets.len() + 1);
            if i == doc.assets.len() {
                let name = format!("new{}", rng.u32(..1000));
                if doc.assets.iter().any(|a| a.name == name) {
                    continue;
                }
                doc.assets.push(AssetSpec { name: name.clone(), ..Default::default() });
                changed.push(name);
                continue;
            }
            let a = &mut doc.assets[i];
            changed.push(a.name.clone());
            match rng.u8(..6) {
                0 => {
                    let name = doc.assets.remove(i).name;
                    changed.push(name);
                    continue;
                }
                1 | 2 => {
                    a.ips = (0..rng.usize(0..3))
                        .map(|_| {
                            [
                                "10.0.0.1",
                                "10.0.0.2",
                                "10.0.0.0/30",
                                "10.0.0.0/29",
                                "10.0.1.7",
                                "fd00::1",
                                "fd00::/124",
                                "10.0.0.9",
                            ][rng.usize(..8)]
                            .to_string()
                        })
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                }
                _ => {
                    a.tags.clear();
                    if rng.bool() {
                        a.tags.insert("role".into(), Scalar::Str(["plc", "hmi", "eng"][rng.usize(..3)].into()));
                    }
                    if rng.bool() {
                        a.tags.insert("site".into(), Scalar::Str(["x", "y"][rng.usize(..2)].into()));
                    }
                    if rng.u8(..4) == 0 {
                        a.tags.insert("q".into(), Scalar::Str("1".into()));
                    }
                }
            }
        }
        changed
    }

    #[test]
    fn incremental_asset_updates_match_a_full_compile() {
        for seed in 0..300 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut doc = random_policy(&mut rng);
            for _ in 0..6 {
                mutate_assets(&mut rng, &mut doc);
            }
            let now = Utc::now();
            let mut inc = Compiler::default();
            let mut applied = inc.compile(&doc.validate("t").unwrap(), now).unwrap();
            for step in 0..6 {
                let changed = mutate_assets(&mut rng, &mut doc);
                let policy = doc.validate("t").unwrap();
                let names: Vec<&str> = changed.iter().map(String::as_str).collect();
                let delta = inc.update_assets(&policy, &names, &applied, now).unwrap();
                applied.apply(&delta);
                let full = Compiler::default().compile(&policy, now).unwrap();
                assert_eq!(
                    applied.canonical(),
                    full.canonical(),
                    "seed {seed} step {step}: changed {changed:?}\n{}",
                    serde_saphyr::to_string(&doc).unwrap_or_default()
                );
                // Only identities in use are kept.
                let used: BTreeSet<u32> = applied.v4.values().chain(applied.v6.values()).map(|i| i.id).collect();
                let known: BTreeSet<u32> = applied.identities.keys().copied().collect();
                assert_eq!(used, known, "seed {seed} step {step}");
            }
        }
    }

    #[test]
    fn a_tag_change_writes_only_its_entries() {
        let mut c = Compiler::default();
        let p = policy(BASE);
        let mut applied = c.compile(&p, Utc::now()).unwrap();
        let moved = policy(
            &BASE.replace("plc-2, ips: [10.0.0.11], tags: {role: plc}", "plc-2, ips: [10.0.0.11], tags: {role: hmi}"),
        );
        let d = c.update_assets(&moved, &["plc-2"], &applied, Utc::now()).unwrap();
        let hmi = applied.v4[&"10.0.0.5/32".parse().unwrap()];
        assert_eq!(d.v4, vec![("10.0.0.11/32".parse().unwrap(), Some(hmi))], "joins the existing hmi identity");
        assert!(d.policy.is_empty(), "no identity appeared or vanished: {d:?}");
        applied.apply(&d);
        // Moving the last PLC out frees the plc identity and its entries.
        let none = policy(&BASE.replace("tags: {role: plc}", "tags: {}"));
        let d = c.update_assets(&none, &["plc-1", "plc-2"], &applied, Utc::now()).unwrap();
        assert_eq!(d.policy.len(), 3, "the three entries towards plc go: {d:?}");
        assert!(d.policy.iter().all(|(_, v)| v.is_none()));
    }

    #[test]
    fn capacity_is_checked_before_anything_changes() {
        let cap = Capacity { hosts_v4: 2, policy: 10, ..Capacity::default() };
        let mut c = Compiler::new(Timeouts::default(), cap);
        let err = c.compile(&policy(BASE), Utc::now()).unwrap_err();
        assert_eq!(err, CompileError::Capacity { what: "IPv4 host", needed: 3, max: 2 });
        assert!(c.ids.is_empty() && c.slots.is_empty() && c.base.is_none());
    }
}
