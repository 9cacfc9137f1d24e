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
//! change to the policy is a small [`Delta`] to the maps.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use gatekeeper_common::{
    CFG_ANY_ANY, CFG_ANY_ENFORCE, CFG_ANY_MONITOR, CFG_DST_ANY, CFG_SRC_ANY, GOVERN_ENFORCE, GOVERN_MONITOR,
    DEFAULT_HOST_ENTRIES, DEFAULT_POLICY_ENTRIES, DEFAULT_PREFIX_ENTRIES, DEFAULT_RULE_SLOTS, GenConfig, ID_ANY, ID_WORLD,
    Identity, PROTO_ICMP, PROTO_ICMPV6, PROTO_OTHER, PROTO_TCP, PROTO_UDP,
    PolicyKey, PolicyValue,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    policy::{Action, Endpoint, Mode, Policy, Protocol},
    segment,
};

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

/// How many entries each policy map may hold for one generation (half the map: during an apply
/// the old and the new generation are both present), and how many rules have counter slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub hosts_v4: usize,
    pub prefixes_v4: usize,
    pub hosts_v6: usize,
    pub prefixes_v6: usize,
    pub policy: usize,
    pub rules: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        let half = |n: u32| n as usize / 2;
        Self {
            hosts_v4: half(DEFAULT_HOST_ENTRIES),
            prefixes_v4: half(DEFAULT_PREFIX_ENTRIES),
            hosts_v6: half(DEFAULT_HOST_ENTRIES),
            prefixes_v6: half(DEFAULT_PREFIX_ENTRIES),
            policy: half(DEFAULT_POLICY_ENTRIES),
            rules: DEFAULT_RULE_SLOTS as usize,
        }
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
        }
    }
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
}

impl Delta {
    /// Map entries this delta writes per generation.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len() + self.ports.len() + self.policy.len() + usize::from(self.config.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    Delta {
        v4: diff_maps(&old.v4, &new.v4),
        v6: diff_maps(&old.v6, &new.v6),
        ports,
        policy: diff_maps(&old.policy, &new.policy),
        config: (old.config != new.config).then_some(new.config),
        new_slots: new.rule_slots.values().copied().filter(|s| !old_slots.contains(s)).collect(),
    }
}

/// Keeps identity numbers and rule slots stable from one compilation to the next.
#[derive(Debug, Default)]
pub struct Compiler {
    ids: HashMap<Vec<String>, u32>,
    next_id: u32,
    slots: HashMap<String, u32>,
    pub timeouts: Timeouts,
    pub capacity: Capacity,
}

impl Compiler {
    pub fn new(timeouts: Timeouts, capacity: Capacity) -> Self {
        Self { timeouts, capacity, ..Default::default() }
    }

    /// Compiles `policy` as it stands at `now` (expired rules are left out). On error the
    /// compiler's numbering is left as it was.
    pub fn compile(&mut self, policy: &Policy, now: DateTime<Utc>) -> Result<Compiled, CompileError> {
        let cap = self.capacity;
        if policy.rules.len() > cap.rules {
            return Err(CompileError::Capacity { what: "rule", needed: policy.rules.len(), max: cap.rules });
        }
        let effective = segment::effective(&segment::direct_members(policy));
        // Host entries go to the host hashes, shorter prefixes to the LPM tries.
        let (mut h4, mut n4, mut h6, mut n6) = (0, 0, 0, 0);
        for net in effective.keys() {
            match net {
                IpNet::V4(n) if n.prefix_len() == 32 => h4 += 1,
                IpNet::V4(_) => n4 += 1,
                IpNet::V6(n) if n.prefix_len() == 128 => h6 += 1,
                IpNet::V6(_) => n6 += 1,
            }
        }
        for (what, needed, max) in [
            ("IPv4 host", h4, cap.hosts_v4),
            ("IPv4 prefix", n4, cap.prefixes_v4),
            ("IPv6 host", h6, cap.hosts_v6),
            ("IPv6 prefix", n6, cap.prefixes_v6),
        ] {
            if needed > max {
                return Err(CompileError::Capacity { what, needed, max });
            }
        }
        let (n4, n6) = (h4 + n4, h6 + n6);

        // Identities: stable numbers for segment sets still in use, fresh ones for new sets.
        let mut sets: BTreeMap<Vec<usize>, Identity> = BTreeMap::new();
        for segs in effective.values() {
            sets.entry(segs.iter().copied().collect()).or_default();
        }
        let names = |set: &[usize]| -> Vec<String> {
            let mut v: Vec<String> = set.iter().map(|&s| policy.segments[s].name.clone()).collect();
            v.sort();
            v
        };
        let mut ids: HashMap<Vec<String>, u32> = HashMap::new();
        let mut next_id = self.next_id;
        let mut identities = BTreeMap::new();
        for (set, ident) in &mut sets {
            let key = names(set);
            let id = if set.is_empty() {
                ID_WORLD
            } else if let Some(&id) = self.ids.get(&key) {
                id
            } else {
                next_id += 1;
                next_id
            };
            ident.id = id;
            for &s in set.iter() {
                ident.flags |= match policy.segments[s].mode {
                    Mode::Enforce => GOVERN_ENFORCE,
                    Mode::Monitor => GOVERN_MONITOR,
                    Mode::Label => 0,
                };
            }
            identities.insert(id, key.clone());
            ids.insert(key, id);
        }
        let mut v4 = HashMap::with_capacity(n4);
        let mut v6 = HashMap::with_capacity(n6);
        for (net, segs) in &effective {
            let set: Vec<usize> = segs.iter().copied().collect();
            let ident = sets[&set];
            match net {
                IpNet::V4(n) => v4.insert(*n, ident),
                IpNet::V6(n) => v6.insert(*n, ident),
            };
        }
        // Segment index to the identities containing it.
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); policy.segments.len()];
        for (set, ident) in &sets {
            for &s in set {
                members[s].push(ident.id);
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
        for r in &live {
            let slot = slots[&r.name];
            let side = |e: &Endpoint| -> Vec<u32> {
                match e {
                    Endpoint::Any => vec![ID_ANY],
                    Endpoint::Segment(s) => segment_index.get(s.as_str()).map(|&i| members[i].clone()).unwrap_or_default(),
                }
            };
            let (srcs, dsts) = (side(&r.from), side(&r.to));
            flags |= match (&r.from, &r.to) {
                (Endpoint::Any, Endpoint::Any) => CFG_ANY_ANY,
                (Endpoint::Any, _) => CFG_SRC_ANY,
                (_, Endpoint::Any) => CFG_DST_ANY,
                _ => 0,
            };
            let protos: &[u8] = match r.protocol {
                Protocol::Any => &[PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6, PROTO_OTHER],
                Protocol::Tcp => &[PROTO_TCP],
                Protocol::Udp => &[PROTO_UDP],
                Protocol::Icmp => &[PROTO_ICMP],
                Protocol::Icmpv6 => &[PROTO_ICMPV6],
            };
            for &proto in protos {
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
                for &src in &srcs {
                    for &dst in &dsts {
                        for &port_class in &classes {
                            let key = PolicyKey { generation: 0, proto, _pad: [0; 2], port_class, src, dst };
                            let v = entries.entry(key).or_default();
                            let field = match r.action {
                                Action::Allow => &mut v.allow_rule,
                                Action::Deny => &mut v.deny_rule,
                            };
                            *field = (*field).min(slot);
                            // Entries only grow: stop as soon as the table is too big.
                            if entries.len() > cap.policy {
                                return Err(CompileError::Capacity {
                                    what: "policy",
                                    needed: entries.len(),
                                    max: cap.policy,
                                });
                            }
                        }
                    }
                }
            }
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

        // Success: commit the numbering.
        self.ids = ids;
        self.next_id = next_id;
        self.slots = slots.iter().map(|(k, v)| (k.clone(), *v)).collect();
        Ok(Compiled { v4, v6, port_classes, policy: entries, config, rule_slots: slots, identities })
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
        let after = c.compile(&policy(&BASE.replace("plc-2, ips: [10.0.0.11], tags: {role: plc}", "plc-2, ips: [10.0.0.11], tags: {}")), Utc::now()).unwrap();
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

    #[test]
    fn capacity_is_checked_before_anything_changes() {
        let cap = Capacity { hosts_v4: 2, policy: 10, ..Capacity::default() };
        let mut c = Compiler::new(Timeouts::default(), cap);
        let err = c.compile(&policy(BASE), Utc::now()).unwrap_err();
        assert_eq!(err, CompileError::Capacity { what: "IPv4 host", needed: 3, max: 2 });
        assert!(c.ids.is_empty() && c.slots.is_empty());
    }
}
