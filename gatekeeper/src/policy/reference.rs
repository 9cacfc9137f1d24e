//! The reference model: the data-plane semantics in plain Rust, straight from the definitions
//! in the README, with no maps, identities or port classes. The differential tests require the
//! XDP program to reach the same outcome, for the same rule, on every packet.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use chrono::{DateTime, Utc};
use gatekeeper_common as common;

use crate::{
    policy::membership::{SegmentSet, segments_of},
    policy::{Action, Endpoint, Mode, Policy, Protocol, Rule},
};

/// What happened to a packet; mirrors the `OUTCOME_*` counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    PassNonIp,
    PassNeighbor,
    PassUngoverned,
    PassFlow,
    PassAllowed,
    DropDenyRule,
    DropDefault,
    MonitorDenyRule,
    MonitorDefault,
    DropMalformed,
    MonitorMalformed,
    PassMalformed,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Self::PassNonIp,
        Self::PassNeighbor,
        Self::PassUngoverned,
        Self::PassFlow,
        Self::PassAllowed,
        Self::DropDenyRule,
        Self::DropDefault,
        Self::MonitorDenyRule,
        Self::MonitorDefault,
        Self::DropMalformed,
        Self::MonitorMalformed,
        Self::PassMalformed,
    ];

    /// Index of the data plane's counter for this outcome.
    pub fn counter(self) -> u32 {
        match self {
            Self::PassNonIp => common::OUTCOME_PASS_NON_IP,
            Self::PassNeighbor => common::OUTCOME_PASS_NEIGHBOR,
            Self::PassUngoverned => common::OUTCOME_PASS_UNGOVERNED,
            Self::PassFlow => common::OUTCOME_PASS_FLOW,
            Self::PassAllowed => common::OUTCOME_PASS_ALLOWED,
            Self::DropDenyRule => common::OUTCOME_DROP_DENY_RULE,
            Self::DropDefault => common::OUTCOME_DROP_DEFAULT,
            Self::MonitorDenyRule => common::OUTCOME_MONITOR_DENY_RULE,
            Self::MonitorDefault => common::OUTCOME_MONITOR_DEFAULT,
            Self::DropMalformed => common::OUTCOME_DROP_MALFORMED,
            Self::MonitorMalformed => common::OUTCOME_MONITOR_MALFORMED,
            Self::PassMalformed => common::OUTCOME_PASS_MALFORMED,
        }
    }

    pub fn drops(self) -> bool {
        matches!(self, Self::DropDenyRule | Self::DropDefault | Self::DropMalformed)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::PassNonIp => "pass_non_ip",
            Self::PassNeighbor => "pass_neighbor",
            Self::PassUngoverned => "pass_ungoverned",
            Self::PassFlow => "pass_flow",
            Self::PassAllowed => "pass_allowed",
            Self::DropDenyRule => "drop_deny_rule",
            Self::DropDefault => "drop_default",
            Self::MonitorDenyRule => "would_drop_deny_rule",
            Self::MonitorDefault => "would_drop_default",
            Self::DropMalformed => "drop_malformed",
            Self::MonitorMalformed => "would_drop_malformed",
            Self::PassMalformed => "pass_malformed",
        }
    }
}

/// The model's verdict on one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub outcome: Outcome,
    /// Slot of the rule that decided a flow start, if one did.
    pub rule: Option<u32>,
    /// An established flow was cut because the policy no longer allows it.
    pub revoked: bool,
    /// The address whose segments a policy drop (or would-drop) is charged to: the destination
    /// when it is in an enforce or monitor segment, else the source. `None` for every other
    /// outcome (malformed packets are nobody's).
    pub charged: Option<IpAddr>,
}

/// The header fields the semantics look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// Source and destination port, when rules can see them (TCP/UDP, not a later fragment).
    pub ports: Option<(u16, u16)>,
    /// Endpoint identifiers of a tracked flow (TCP/UDP ports, ICMP echo identifier twice).
    pub flow_ports: Option<(u16, u16)>,
    pub neighbor: bool,
    pub malformed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    NonIp,
    /// An IP packet too broken to read its addresses.
    Unattributable,
    Ip(Header),
}

fn is_vlan(ethertype: u16) -> bool {
    ethertype == common::ETH_P_8021Q || ethertype == common::ETH_P_8021AD
}

fn is_ext_header(proto: u8) -> bool {
    matches!(
        proto,
        common::IPV6_EXT_HOP_BY_HOP
            | common::IPV6_EXT_ROUTING
            | common::IPV6_EXT_FRAGMENT
            | common::IPV6_EXT_AH
            | common::IPV6_EXT_DEST_OPTS
    )
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parses an Ethernet frame as the semantics define it.
pub fn parse(frame: &[u8]) -> Frame {
    if frame.len() < 14 {
        return Frame::Unattributable;
    }
    let mut ethertype = be16(frame, 12);
    let mut at = 14;
    for _ in 0..common::MAX_VLAN_DEPTH {
        if !is_vlan(ethertype) {
            break;
        }
        if frame.len() < at + 4 {
            return Frame::Unattributable;
        }
        ethertype = be16(frame, at + 2);
        at += 4;
    }
    match ethertype {
        common::ETH_P_IP => parse_ipv4(frame, at),
        common::ETH_P_IPV6 => parse_ipv6(frame, at),
        t if is_vlan(t) => Frame::Unattributable,
        _ => Frame::NonIp,
    }
}

fn parse_ipv4(f: &[u8], at: usize) -> Frame {
    if f.len() < at + 20 || f[at] >> 4 != 4 {
        return Frame::Unattributable;
    }
    let mut h = Header {
        src: IpAddr::V4(Ipv4Addr::new(f[at + 12], f[at + 13], f[at + 14], f[at + 15])),
        dst: IpAddr::V4(Ipv4Addr::new(f[at + 16], f[at + 17], f[at + 18], f[at + 19])),
        proto: f[at + 9],
        ports: None,
        flow_ports: None,
        neighbor: false,
        malformed: false,
    };
    let ihl = usize::from(f[at] & 0x0f) * 4;
    if ihl < 20 || at + ihl > f.len() {
        h.malformed = true;
        return Frame::Ip(h);
    }
    if be16(f, at + 6) & 0x1fff != 0 {
        return Frame::Ip(h);
    }
    parse_l4(f, at + ihl, h, false)
}

fn parse_ipv6(f: &[u8], at: usize) -> Frame {
    if f.len() < at + 40 || f[at] >> 4 != 6 {
        return Frame::Unattributable;
    }
    let addr = |o: usize| {
        let b: [u8; 16] = f[o..o + 16].try_into().unwrap_or([0; 16]);
        IpAddr::V6(Ipv6Addr::from(b))
    };
    let mut h = Header {
        src: addr(at + 8),
        dst: addr(at + 24),
        proto: f[at + 6],
        ports: None,
        flow_ports: None,
        neighbor: false,
        malformed: false,
    };
    let mut at = at + 40;
    for _ in 0..common::MAX_EXT_HEADERS {
        if !is_ext_header(h.proto) {
            break;
        }
        let need = if h.proto == common::IPV6_EXT_FRAGMENT { 8 } else { 2 };
        if f.len() < at + need {
            h.malformed = true;
            return Frame::Ip(h);
        }
        let next = f[at];
        let len = usize::from(f[at + 1]);
        let fragment_offset = if h.proto == common::IPV6_EXT_FRAGMENT { be16(f, at + 2) >> 3 } else { 0 };
        at += match h.proto {
            common::IPV6_EXT_FRAGMENT => 8,
            common::IPV6_EXT_AH => (len + 2) * 4,
            _ => (len + 1) * 8,
        };
        h.proto = next;
        if fragment_offset != 0 {
            return Frame::Ip(h);
        }
    }
    if is_ext_header(h.proto) {
        h.malformed = true;
        return Frame::Ip(h);
    }
    parse_l4(f, at, h, true)
}

fn parse_l4(f: &[u8], at: usize, mut h: Header, v6: bool) -> Frame {
    let need = match h.proto {
        common::PROTO_TCP => 20,
        common::PROTO_UDP => 8,
        common::PROTO_ICMP | common::PROTO_ICMPV6 => 8,
        _ => 0,
    };
    if f.len() < at + need {
        h.malformed = true;
        return Frame::Ip(h);
    }
    match h.proto {
        common::PROTO_TCP | common::PROTO_UDP => {
            let ports = (be16(f, at), be16(f, at + 2));
            h.ports = Some(ports);
            h.flow_ports = Some(ports);
        }
        common::PROTO_ICMP | common::PROTO_ICMPV6 => {
            let ty = f[at];
            let echo = if v6 {
                h.proto == common::PROTO_ICMPV6
                    && (ty == common::ICMPV6_ECHO_REQUEST || ty == common::ICMPV6_ECHO_REPLY)
            } else {
                h.proto == common::PROTO_ICMP && (ty == common::ICMP_ECHO_REQUEST || ty == common::ICMP_ECHO_REPLY)
            };
            if echo {
                let id = be16(f, at + 4);
                h.flow_ports = Some((id, id));
            }
            h.neighbor = v6
                && h.proto == common::PROTO_ICMPV6
                && ((common::ICMPV6_NEIGHBOR_FIRST..=common::ICMPV6_NEIGHBOR_LAST).contains(&ty)
                    || ty == common::ICMPV6_MLDV2_REPORT);
        }
        _ => {}
    }
    Frame::Ip(h)
}

type Endpoint2 = (IpAddr, u16);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowId {
    proto: u8,
    lo: Endpoint2,
    hi: Endpoint2,
}

#[derive(Debug, Clone, Copy)]
struct FlowState {
    epoch: u64,
    /// The endpoint that opened the flow.
    opener: Endpoint2,
}

/// The model: a policy in force at a given time, and the flows it has seen.
#[derive(Debug, Clone)]
pub struct Reference {
    policy: Policy,
    now: DateTime<Utc>,
    slots: BTreeMap<String, u32>,
    epoch: u64,
    flows: HashMap<FlowId, FlowState>,
}

impl Reference {
    /// `slots` names each rule's counter slot (the compiler's choice, reported by it).
    pub fn new(policy: Policy, now: DateTime<Utc>, slots: BTreeMap<String, u32>) -> Self {
        Self { policy, now, slots, epoch: 0, flows: HashMap::new() }
    }

    /// Puts a new policy in force; flows stay and are judged again on their next packet.
    pub fn set_policy(&mut self, policy: Policy, now: DateTime<Utc>, slots: BTreeMap<String, u32>) {
        self.policy = policy;
        self.now = now;
        self.slots = slots;
        self.epoch += 1;
    }

    pub fn clear_flows(&mut self) {
        self.flows.clear();
    }

    fn has_mode(&self, mode: Mode) -> bool {
        self.policy.segments.iter().any(|s| s.mode == mode)
    }

    fn rule_matches(&self, r: &Rule, src: &SegmentSet, dst: &SegmentSet, proto: u8, dport: Option<u16>) -> bool {
        let side = |e: &Endpoint, set: &SegmentSet| match e {
            Endpoint::Any => true,
            Endpoint::Segment(name) => set.iter().any(|&i| self.policy.segments[i].name == *name),
        };
        r.live(self.now)
            && side(&r.from, src)
            && side(&r.to, dst)
            && (r.protocol == Protocol::Any || r.protocol.number() == Some(proto))
            && (r.ports.is_empty() || dport.is_some_and(|p| r.ports.iter().any(|&(lo, hi)| lo <= p && p <= hi)))
    }

    /// `Ok(rule)` when allowed, `Err(rule)` when denied (by a deny rule, or by default).
    fn decide(&self, src: &SegmentSet, dst: &SegmentSet, proto: u8, dport: Option<u16>) -> Result<u32, Option<u32>> {
        let first = |action: Action| {
            self.policy
                .rules
                .iter()
                .filter(|r| r.action == action && self.rule_matches(r, src, dst, proto, dport))
                .filter_map(|r| self.slots.get(&r.name).copied())
                .min()
        };
        if let Some(deny) = first(Action::Deny) {
            return Err(Some(deny));
        }
        first(Action::Allow).ok_or(None)
    }

    /// Judges one frame, updating the flow state as the data plane would.
    pub fn judge(&mut self, frame: &[u8]) -> Judgement {
        let j = |outcome, rule, revoked| Judgement { outcome, rule, revoked, charged: None };
        let h = match parse(frame) {
            Frame::NonIp => return j(Outcome::PassNonIp, None, false),
            Frame::Unattributable => {
                let outcome = if self.has_mode(Mode::Enforce) {
                    Outcome::DropMalformed
                } else if self.has_mode(Mode::Monitor) {
                    Outcome::MonitorMalformed
                } else {
                    Outcome::PassMalformed
                };
                return j(outcome, None, false);
            }
            Frame::Ip(h) => h,
        };
        if h.neighbor {
            return j(Outcome::PassNeighbor, None, false);
        }
        let flow_id = h.flow_ports.map(|(sp, dp)| {
            let (a, b) = ((h.src, sp), (h.dst, dp));
            FlowId { proto: h.proto, lo: a.min(b), hi: a.max(b) }
        });
        let flow = flow_id.and_then(|id| self.flows.get(&id).copied());
        if flow.is_some_and(|f| f.epoch == self.epoch) {
            return j(Outcome::PassFlow, None, false);
        }
        let src = segments_of(&self.policy, h.src);
        let dst = segments_of(&self.policy, h.dst);
        let modes: Vec<Mode> = src.iter().chain(dst.iter()).map(|&i| self.policy.segments[i].mode).collect();
        let enforce = modes.contains(&Mode::Enforce);
        if !enforce && !modes.contains(&Mode::Monitor) {
            let outcome = if h.malformed { Outcome::PassMalformed } else { Outcome::PassUngoverned };
            return j(outcome, None, false);
        }
        if h.malformed {
            return j(if enforce { Outcome::DropMalformed } else { Outcome::MonitorMalformed }, None, false);
        }
        let mut revoked = false;
        if let (Some(id), Some(f)) = (flow_id, flow) {
            let sport = h.flow_ports.map(|p| p.0).unwrap_or(0);
            let forward = f.opener == (h.src, sport);
            let (os, od) = if forward { (&src, &dst) } else { (&dst, &src) };
            let odport = h.ports.map(|(sp, dp)| if forward { dp } else { sp });
            if self.decide(os, od, h.proto, odport).is_ok() {
                self.flows.insert(id, FlowState { epoch: self.epoch, ..f });
                return j(Outcome::PassFlow, None, false);
            }
            self.flows.remove(&id);
            revoked = true;
        }
        match self.decide(&src, &dst, h.proto, h.ports.map(|p| p.1)) {
            Ok(rule) => {
                if let (Some(id), Some((sp, _))) = (flow_id, h.flow_ports) {
                    self.flows.insert(id, FlowState { epoch: self.epoch, opener: (h.src, sp) });
                }
                j(Outcome::PassAllowed, Some(rule), revoked)
            }
            Err(rule) => {
                let outcome = match (enforce, rule.is_some()) {
                    (true, true) => Outcome::DropDenyRule,
                    (true, false) => Outcome::DropDefault,
                    (false, true) => Outcome::MonitorDenyRule,
                    (false, false) => Outcome::MonitorDefault,
                };
                let governs = |set: &SegmentSet| set.iter().any(|&i| self.policy.segments[i].mode != Mode::Label);
                let charged = if governs(&dst) { h.dst } else { h.src };
                Judgement { charged: Some(charged), ..j(outcome, rule, revoked) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyDocument;

    #[test]
    fn outcome_counters_are_distinct_and_cover_the_map() {
        let mut seen: Vec<u32> = Outcome::ALL.iter().map(|o| o.counter()).collect();
        seen.sort();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
    }

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        ip.extend_from_slice(&tcp);
        eth(0x0800, &ip)
    }

    #[test]
    fn parse_edge_cases() {
        assert_eq!(parse(&[0; 13]), Frame::Unattributable);
        assert_eq!(parse(&eth(0x0806, &[0; 28])), Frame::NonIp);
        let f = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 1000, 502);
        let Frame::Ip(h) = parse(&f) else { panic!() };
        assert_eq!(h.ports, Some((1000, 502)));
        // Truncated TCP header.
        let Frame::Ip(h) = parse(&f[..f.len() - 1]) else { panic!() };
        assert!(h.malformed);
        // Three VLAN tags are not parsed through.
        let mut tagged = eth(0x8100, &[0, 1, 0x81, 0x00, 0, 2, 0x88, 0xa8, 0, 3, 0x08, 0x00]);
        tagged.extend_from_slice(&f[14..]);
        assert_eq!(parse(&tagged), Frame::Unattributable);
        // Two are.
        let mut tagged = eth(0x88a8, &[0, 1, 0x81, 0x00, 0, 2, 0x08, 0x00]);
        tagged.extend_from_slice(&f[14..]);
        assert!(matches!(parse(&tagged), Frame::Ip(Header { ports: Some((1000, 502)), .. })));
    }

    #[test]
    fn established_flow_is_cut_when_policy_stops_allowing_it() {
        let doc = |tag: &str| {
            PolicyDocument::from_yaml(
                &format!(
                    "assets:\n  - {{name: plc, ips: [10.0.0.2], tags: {{role: {tag}}}}}\n  - {{name: hmi, ips: [10.0.0.1], tags: {{role: hmi}}}}\nsegments:\n  - {{name: plc, selector: role=plc}}\n  - {{name: hmi, selector: role=hmi, mode: label}}\nrules:\n  - {{name: modbus, from: hmi, to: plc, protocol: tcp, ports: [502]}}\n"
                ),
                "t",
            )
            .unwrap()
            .validate("t")
            .unwrap()
        };
        let slots: BTreeMap<String, u32> = [("modbus".to_string(), 0)].into();
        let mut m = Reference::new(doc("plc"), Utc::now(), slots.clone());
        let req = ipv4_tcp([10, 0, 0, 1], [10, 0, 0, 2], 40000, 502);
        let reply = ipv4_tcp([10, 0, 0, 2], [10, 0, 0, 1], 502, 40000);
        let refused = m.judge(&reply);
        assert_eq!(refused.outcome, Outcome::DropDefault, "no flow yet");
        assert_eq!(
            refused.charged,
            Some(IpAddr::from([10, 0, 0, 2])),
            "the governed side (the PLC, sending) is charged"
        );
        assert_eq!(
            m.judge(&req),
            Judgement { outcome: Outcome::PassAllowed, rule: Some(0), revoked: false, charged: None }
        );
        assert_eq!(m.judge(&reply).outcome, Outcome::PassFlow);
        // Same policy again: the flow survives re-judgement.
        m.set_policy(doc("plc"), Utc::now(), slots.clone());
        assert_eq!(m.judge(&reply).outcome, Outcome::PassFlow);
        // Tag moved off the PLC segment... and onto nothing governed: traffic is ungoverned.
        m.set_policy(doc("other"), Utc::now(), slots.clone());
        assert_eq!(m.judge(&reply).outcome, Outcome::PassUngoverned);
    }
}
