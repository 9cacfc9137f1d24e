//! Synthetic OT policies of a given size, built directly as validated [`Policy`] values.
//!
//! Asset `i` (from 0) has `10.0.0.0 + i + 1` and `fd00::(i+1)` and the tag `seg=<i mod S>`;
//! segment `s` selects `seg=s` in enforce mode. Rules connect segment pairs on TCP ports drawn
//! from a list of industrial and IT service ports, the way real OT allow-lists look: few
//! services, many device groups.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use gatekeeper::{
    policy::selector::Selector,
    policy::{Action, Asset, Endpoint, Mode, Policy, Protocol, Rule, Segment},
};
use ipnet::IpNet;

/// Ports the rules use: Modbus, S7, EtherNet/IP, DNP3, OPC UA, IEC 104, BACnet, and IT services.
pub const PORTS: [u16; 32] = [
    502, 102, 44818, 20000, 4840, 2404, 47808, 1911, 789, 18245, 5007, 34962, 34963, 34964, 2222, 1089, 22, 23, 80,
    443, 445, 3389, 5985, 5986, 161, 162, 123, 53, 8080, 8443, 1433, 3306,
];
/// A port no rule uses: traffic to it is denied by default.
pub const DENIED_PORT: u16 = 9;

pub fn v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000u32 + i as u32 + 1)
}

pub fn v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + i as u128 + 1)
}

pub fn addr(i: usize, ipv6: bool) -> IpAddr {
    if ipv6 { IpAddr::V6(v6(i)) } else { IpAddr::V4(v4(i)) }
}

/// The asset index of the `k`-th member of segment `s` (of `segments`).
pub fn member(s: usize, k: usize, segments: usize) -> usize {
    s + k * segments
}

/// `assets` assets in `segments` segments with `rules` rules (at least 3). Rule 0 allows segment 0
/// to segment 1 on TCP 502 (new flows and flow hits in the benchmarks); rules 1 and 2 allow ICMP
/// and ICMPv6 between them (ICMP errors are not tracked, so they are judged by the policy every
/// time: the "allowed" packets).
pub fn policy(assets: usize, segments: usize, rules: usize) -> Policy {
    let segments = segments.max(2);
    let mut p = Policy::default();
    for i in 0..assets {
        let mut tags = BTreeMap::new();
        tags.insert("seg".to_string(), (i % segments).to_string());
        let prefixes = vec![IpNet::from(IpAddr::V4(v4(i))), IpNet::from(IpAddr::V6(v6(i)))];
        p.assets.push(Asset { name: format!("asset-{i}"), prefixes, tags });
    }
    for s in 0..segments {
        let selector = Selector::parse(&format!("seg={s}")).ok();
        p.segments.push(Segment { name: format!("seg-{s}"), selector, cidrs: vec![], mode: Mode::Enforce });
    }
    // A cheap deterministic spread of segment pairs and ports.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for j in 0..rules {
        let (from, to, port) = if j < 3 {
            (0, 1, 502)
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (
                (x % segments as u64) as usize,
                ((x >> 20) % segments as u64) as usize,
                PORTS[(x >> 40) as usize % PORTS.len()],
            )
        };
        p.rules.push(Rule {
            name: format!("rule-{j}"),
            from: Endpoint::Segment(format!("seg-{from}")),
            to: Endpoint::Segment(format!("seg-{to}")),
            protocol: [Protocol::Tcp, Protocol::Icmp, Protocol::Icmpv6, Protocol::Tcp][j.min(3)],
            ports: if j == 1 || j == 2 { vec![] } else { vec![(port, port)] },
            action: Action::Allow,
            expires: None,
        });
    }
    p
}
