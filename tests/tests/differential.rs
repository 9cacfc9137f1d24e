//! Differential tests: the loaded XDP program, run through BPF_PROG_TEST_RUN, must reach the
//! reference model's outcome (and deciding rule, and flow revocation) on every packet, for
//! random policies and random packets, with flows carried across policy changes.
//!
//! The in-memory data plane ([`FakeDataplane`]) is held to the same model on flow starts.
//!
//! The XDP test needs root (BPF); the fake data plane's needs none. Seeds are fixed so CI is
//! reproducible; `GK_DIFF_SEEDS=100` runs more of the XDP test, `GK_DIFF_SEED=n` replays one.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use chrono::{DateTime, Duration, Utc};
use gatekeeper::{
    compile::{Capacity, Compiler, Timeouts},
    dataplane::{BpfDataplane as Dataplane, Dataplane as _, LoadOptions, fake::FakeDataplane},
    policy::reference::{Outcome, Reference},
    policy::{Action, AssetSpec, Mode, PolicyDocument, Protocol, RuleSpec, Scalar, SegmentSpec},
};
use gatekeeper_common::{EVENT_FLOW_REVOKED, NO_RULE, OUTCOME_PASS_FLOW, STATS_COUNTERS};
use gatekeeper_tests::packet::{Frame, L4, arp};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Addresses: a small pool so that policies and packets collide often.
fn v4(rng: &mut fastrand::Rng) -> IpAddr {
    // 203.0.113.x is outside every generated segment most of the time.
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
    let selectors = [
        "role=plc",
        "role=hmi",
        "role in (plc,scada)",
        "site!=a",
        "site",
        "!quarantine",
        "role=eng,site=b",
        "role notin (hmi)",
    ];
    let nseg = rng.usize(1..6);
    for i in 0..nseg {
        let selector = (rng.u8(..5) != 0).then(|| selectors[rng.usize(..selectors.len())].to_string());
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

/// Edits a few assets of `doc`: new tags, new addresses, removal, or a new asset.
fn mutate_assets(rng: &mut fastrand::Rng, doc: &mut PolicyDocument) -> Vec<String> {
    let mut changed = Vec::new();
    for _ in 0..rng.usize(1..4) {
        let i = rng.usize(..doc.assets.len() + 1);
        if i == doc.assets.len() {
            let name = format!("added-{}", rng.u32(..100_000));
            if doc.assets.iter().all(|a| a.name != name) {
                let tags = [("role".to_string(), Scalar::Str(ROLES[rng.usize(..ROLES.len())].into()))].into();
                doc.assets.push(AssetSpec { name: name.clone(), ips: vec![prefix(rng)], tags, description: None });
                changed.push(name);
            }
            continue;
        }
        changed.push(doc.assets[i].name.clone());
        match rng.u8(..4) {
            0 => {
                doc.assets.remove(i);
            }
            1 => {
                doc.assets[i].ips = (0..rng.usize(1..3))
                    .map(|_| prefix(rng))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect()
            }
            _ => {
                let a = &mut doc.assets[i];
                a.tags.insert("role".into(), Scalar::Str(ROLES[rng.usize(..ROLES.len())].into()));
                if rng.bool() {
                    a.tags.remove("quarantine");
                } else {
                    a.tags.insert("quarantine".into(), Scalar::Str("yes".into()));
                }
            }
        }
    }
    changed
}

fn random_frame(rng: &mut fastrand::Rng) -> Vec<u8> {
    if rng.u8(..30) == 0 {
        return arp();
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
    let mut f = Frame::new(src, dst, l4);
    if rng.u8(..6) == 0 {
        let tpids = [0x8100, 0x88a8];
        f.vlans = (0..rng.usize(1..4)).map(|_| (tpids[rng.usize(..2)], rng.u16(1..4095))).collect();
    }
    if family6 && rng.u8(..5) == 0 {
        let kinds = [0u8, 43, 60, 51, 44];
        f.ext = (0..rng.usize(1..11))
            .map(|_| {
                let k = kinds[rng.usize(..kinds.len())];
                (k, if k == 44 { if rng.u8(..3) == 0 { rng.u8(1..20) } else { 0 } } else { rng.u8(0..3) })
            })
            .collect();
    }
    if !family6 && rng.u8(..10) == 0 {
        f.frag_offset = rng.u16(1..200);
    }
    if !family6 && rng.u8(..15) == 0 {
        f.ihl = [0, 3, 6, 15][rng.usize(..4)];
    }
    if rng.u8(..30) == 0 {
        f.version = Some(rng.u8(0..16));
    }
    if rng.u8(..10) == 0 {
        let len = f.build().len();
        f.truncate = Some(rng.usize(14..=len));
    }
    f.build()
}

/// [`random_frame`], plus now and then a runt frame (shorter than an Ethernet header). Only
/// for the fake data plane: `BPF_PROG_TEST_RUN` refuses frames shorter than an Ethernet header,
/// and drawing them inside [`random_frame`] would change what every seed of the XDP test
/// generates.
fn random_frame_or_runt(rng: &mut fastrand::Rng) -> Vec<u8> {
    if rng.u8(..40) == 0 { vec![0; rng.usize(0..14)] } else { random_frame(rng) }
}

struct Counters {
    outcomes: Vec<u64>,
}

fn counters(dp: &Dataplane) -> Counters {
    Counters { outcomes: dp.stats().expect("stats").by_outcome.iter().map(|c| c.packets).collect() }
}

/// Runs one seed: a dataplane, a sequence of random policies, random packets under each.
fn run_seed(dp: &mut Dataplane, seed: u64, policies: usize, packets: usize) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    let now = Utc::now();
    let mut compiler = Compiler::new(Timeouts::default(), Capacity::default());
    let mut model: Option<Reference> = None;
    dp.clear_flows().expect("clear flows");
    let mut checked = 0;
    let mut history: Vec<Frame> = Vec::new();
    let mut doc = PolicyDocument::default();
    for round in 0..policies {
        // Half the changes edit only assets (tags, addresses, added, removed) and go through the
        // incremental compiler, the way a tag edit does; the others replace the whole policy.
        let incremental = round > 0 && rng.bool();
        let changed = if incremental {
            mutate_assets(&mut rng, &mut doc)
        } else {
            doc = random_policy(&mut rng, now);
            vec![]
        };
        let yaml = serde_saphyr::to_string(&doc).unwrap_or_default();
        let policy =
            doc.validate("random").unwrap_or_else(|e| panic!("seed {seed}: generated policy invalid: {e}\n{yaml}"));
        if incremental {
            let names: Vec<&str> = changed.iter().map(String::as_str).collect();
            let delta = compiler.update_assets(&policy, &names, dp.applied(), now).expect("incremental compile");
            // The API's path: moves between existing identities are written in place.
            dp.apply_moves(delta).expect("apply delta");
        } else {
            let compiled = compiler.compile(&policy, now).expect("compile");
            dp.apply(compiled).expect("apply");
        }
        let slots = dp.applied().rule_slots.clone();
        match &mut model {
            None => model = Some(Reference::new(policy, now, slots)),
            Some(m) => m.set_policy(policy, now, slots),
        }
        let m = model.as_mut().expect("model");
        // Every charge the kernel made this round, against those the model expected: no packet
        // the model charges nobody with may charge an identity.
        let charges_before = total_charges(dp);
        let mut expected_charges = 0u64;
        for i in 0..packets {
            // Replies and repeats of earlier packets exercise the flow table.
            let frame = if !history.is_empty() && rng.u8(..3) == 0 {
                let f = history[rng.usize(..history.len())].clone();
                if rng.bool() { f.reply().build() } else { f.build() }
            } else {
                random_frame(&mut rng)
            };
            // Remember plain frames for later replies.
            if let gatekeeper::policy::reference::Frame::Ip(h) = gatekeeper::policy::reference::parse(&frame)
                && !h.malformed
                && let Some((sp, dp_)) = h.flow_ports
            {
                let l4 = match h.proto {
                    6 => L4::Tcp { sport: sp, dport: dp_ },
                    17 => L4::Udp { sport: sp, dport: dp_ },
                    _ => L4::Icmp { ty: if h.src.is_ipv6() { 128 } else { 8 }, id: sp },
                };
                if h.ports.is_some() || matches!(h.proto, 1 | 58) {
                    history.push(Frame::new(h.src, h.dst, l4));
                }
            }
            let expected = m.judge(&frame);
            let slot_before = expected.rule.map(|s| dp.rule_counter(s).expect("rule counter").packets);
            // The identity the model says is charged with a policy drop, and its count before.
            let charged = expected.charged.map(|addr| dp.applied().identity(addr).id);
            let charged_before = charged.map(|id| dp.id_drops(id).expect("id drops"));
            let before = counters(dp);
            let action = dp.test_run(&frame).expect("test_run");
            let after = counters(dp);
            let delta: Vec<u64> = after.outcomes.iter().zip(&before.outcomes).map(|(a, b)| a - b).collect();
            let got_outcome = Outcome::ALL.iter().copied().find(|o| delta[o.counter() as usize] == 1);
            let revoked = delta[EVENT_FLOW_REVOKED as usize] == 1;
            let want_action = if expected.outcome.drops() { XDP_DROP } else { XDP_PASS };
            let rule_ok = match (expected.rule, slot_before) {
                (Some(s), Some(b)) => dp.rule_counter(s).expect("rule counter").packets == b + 1,
                _ => true,
            };
            let charge_ok = match (charged, charged_before) {
                (Some(id), Some(b)) => {
                    let a = dp.id_drops(id).expect("id drops");
                    let (dropped, would) = if expected.outcome.drops() { (1, 0) } else { (0, 1) };
                    expected_charges += 1;
                    a.dropped == b.dropped + dropped && a.would_drop == b.would_drop + would
                }
                _ => true,
            };
            if action != want_action
                || got_outcome != Some(expected.outcome)
                || revoked != expected.revoked
                || !rule_ok
                || !charge_ok
            {
                panic!(
                    "seed {seed} policy round {round} packet {i}: kernel action {action} outcome {:?} revoked {revoked} \
                     rule counter ok {rule_ok} charge ok {charge_ok}; reference {:?}\nframe: {}\nparsed: {:?}\npolicy:\n{yaml}",
                    got_outcome.map(Outcome::name),
                    expected,
                    frame.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                    gatekeeper::policy::reference::parse(&frame),
                );
            }
            checked += 1;
        }
        assert_eq!(
            total_charges(dp) - charges_before,
            expected_charges,
            "seed {seed} policy round {round}: identities charged with drops the model charges nobody with\npolicy:\n{yaml}"
        );
        if history.len() > 200 {
            history.drain(..100);
        }
    }
    checked
}

/// The fake's drops by charged identity.
fn charges(dp: &FakeDataplane) -> BTreeMap<u32, gatekeeper_common::IdDrops> {
    dp.counters(&[]).expect("counters").id_drops.into_iter().collect()
}

/// Drops and would-drops charged to any identity so far.
fn total_charges(dp: &Dataplane) -> u64 {
    let snapshot = dp.counters(&[]).expect("counters");
    snapshot.id_drops.iter().map(|(_, d)| d.dropped + d.would_drop).sum()
}

#[test]
fn xdp_program_matches_reference_model() {
    let mut dp = Dataplane::load(LoadOptions::default()).expect("load the XDP program (needs root)");
    let seeds: Vec<u64> = match (std::env::var("GK_DIFF_SEED"), std::env::var("GK_DIFF_SEEDS")) {
        (Ok(s), _) => vec![s.parse().expect("GK_DIFF_SEED")],
        (_, Ok(n)) => (0..n.parse().expect("GK_DIFF_SEEDS")).collect(),
        _ => (0..24).collect(),
    };
    let mut total = 0;
    let mut by_outcome: BTreeMap<&str, u64> = BTreeMap::new();
    let mut revoked = 0;
    for &seed in &seeds {
        let before = counters(&dp);
        total += run_seed(&mut dp, seed, 6, 150);
        let after = counters(&dp);
        revoked += after.outcomes[EVENT_FLOW_REVOKED as usize] - before.outcomes[EVENT_FLOW_REVOKED as usize];
        for o in Outcome::ALL {
            *by_outcome.entry(o.name()).or_default() +=
                after.outcomes[o.counter() as usize] - before.outcomes[o.counter() as usize];
        }
    }
    eprintln!("{total} packets agreed over {} seeds; {revoked} flows revoked; outcomes: {by_outcome:?}", seeds.len());
    assert!(revoked > 0, "no flow was revoked by a policy change: widen the generator");
    // The generator must reach every outcome, or the comparison proves less than it claims.
    for o in Outcome::ALL {
        if o == Outcome::MonitorMalformed && seeds.len() < 10 {
            continue;
        }
        assert!(by_outcome[o.name()] > 0, "no packet ended as {}: widen the generator", o.name());
    }
}

/// Random policies and packets: the fake data plane's outcome, deciding rule and action must be
/// the reference model's on flow starts (the model's flows are cleared before every packet, as
/// the fake has no flow table). Policies follow one another on one fake, through `apply`. The
/// fake reports its outcome and deciding rule only through its counters, so each packet must
/// move exactly one outcome counter and at most one rule counter, by one packet. Needs no root.
#[test]
fn fake_data_plane_matches_reference_model_on_flow_starts() {
    const POLICIES: u64 = 30;
    const PACKETS: usize = 200;
    let now = Utc::now();
    let mut compiler = Compiler::new(Timeouts::default(), Capacity::default());
    let mut dp = FakeDataplane::new(&LoadOptions::default());
    let outcomes =
        |dp: &FakeDataplane| -> Vec<u64> { dp.stats().expect("stats").by_outcome.iter().map(|c| c.packets).collect() };
    let mut expected_counts = vec![0u64; STATS_COUNTERS as usize];
    for seed in 0..POLICIES {
        let mut rng = fastrand::Rng::with_seed(seed);
        let doc = random_policy(&mut rng, now);
        let yaml = serde_saphyr::to_string(&doc).unwrap_or_default();
        let policy = doc.validate("random").unwrap_or_else(|e| panic!("seed {seed}: invalid policy: {e}\n{yaml}"));
        let compiled = compiler.compile(&policy, now).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{yaml}"));
        let report = dp.apply(compiled.clone()).expect("the fake never fails");
        assert_eq!(dp.applied(), &compiled, "seed {seed}: apply must leave the compiled maps");
        assert_eq!((report.epoch, dp.epoch()), (seed as u32 + 1, seed as u32 + 1));
        // Every slot a rule of the compiled maps can decide with.
        let slots: BTreeSet<u32> = compiled
            .rule_slots
            .values()
            .copied()
            .chain(compiled.policy.values().flat_map(|v| [v.allow_rule, v.deny_rule]))
            .filter(|&s| s != NO_RULE)
            .collect();
        let rule_counts =
            |dp: &FakeDataplane| -> Vec<u64> { slots.iter().map(|&s| dp.rule_counter(s).packets).collect() };
        let mut model = Reference::new(policy, now, dp.applied().rule_slots.clone());
        for i in 0..PACKETS {
            let frame = random_frame_or_runt(&mut rng);
            model.clear_flows();
            let want = model.judge(&frame);
            let (outcomes_before, rules_before) = (outcomes(&dp), rule_counts(&dp));
            let charges_before = charges(&dp);
            let act = dp.test_run(&frame).expect("test_run");
            let moved = |after: Vec<u64>, before: Vec<u64>| -> Vec<(usize, u64)> {
                after.iter().zip(&before).map(|(a, b)| a - b).enumerate().filter(|&(_, d)| d != 0).collect()
            };
            // `None` when no counter or more than one moved, or one moved by more than a packet.
            let outcome = match moved(outcomes(&dp), outcomes_before)[..] {
                [(o, 1)] => Outcome::ALL.into_iter().find(|x| x.counter() as usize == o),
                _ => None,
            };
            let rule = match moved(rule_counts(&dp), rules_before)[..] {
                [] => Ok(None),
                [(r, 1)] => Ok(slots.iter().nth(r).copied()),
                ref more => Err(format!("rule counters moved: {more:?}")),
            };
            let want_act = if want.outcome.drops() { XDP_DROP } else { XDP_PASS };
            // The identity charged with a policy drop: only the model's, by one packet.
            let mut want_charges = charges_before.clone();
            if let Some(addr) = want.charged {
                let d = want_charges.entry(dp.applied().identity(addr).id).or_default();
                if want.outcome.drops() {
                    d.dropped += 1;
                } else {
                    d.would_drop += 1;
                }
            }
            let charged_ok = charges(&dp) == want_charges;
            assert!(
                outcome == Some(want.outcome) && rule == Ok(want.rule) && act == want_act && charged_ok,
                "seed {seed} packet {i}: fake {outcome:?} rule {rule:?} action {act} charges ok {charged_ok}; reference {want:?}\n\
                 frame: {}\nparsed: {:?}\npolicy:\n{yaml}",
                frame.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                gatekeeper::policy::reference::parse(&frame),
            );
            expected_counts[want.outcome.counter() as usize] += 1;
        }
    }
    assert_eq!(outcomes(&dp), expected_counts, "one counter per judged packet, in its outcome");
    // The generator must reach every outcome a stateless judge can give, or agreeing proves less
    // than it claims.
    for o in Outcome::ALL.into_iter().filter(|o| o.counter() != OUTCOME_PASS_FLOW) {
        assert!(expected_counts[o.counter() as usize] > 0, "no packet ended as {}: widen the generator", o.name());
    }
}
