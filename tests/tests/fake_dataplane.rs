//! The in-memory data plane ([`FakeDataplane`]) on hand-picked cases: verdicts on a small Modbus
//! policy in enforce and monitor mode, IPv6 and unattributable frames, applies following the
//! compiled policy and moving the epoch, attachments as bookkeeping. Its agreement with the
//! reference model on random policies and packets is in `differential.rs`.
//!
//! Needs no root: nothing here loads BPF.

use std::net::IpAddr;

use chrono::Utc;
use gatekeeper::{
    compile::{Capacity, Compiled, Compiler, Timeouts, diff},
    dataplane::{Dataplane, LoadOptions, XdpAttachMode, fake::FakeDataplane},
    policy::{Policy, PolicyDocument},
};
use gatekeeper_common::{
    ETH_P_8021AD, ETH_P_8021Q, OUTCOME_DROP_DEFAULT, OUTCOME_DROP_MALFORMED, OUTCOME_MONITOR_DEFAULT,
    OUTCOME_PASS_ALLOWED, OUTCOME_PASS_MALFORMED, OUTCOME_PASS_NEIGHBOR, OUTCOME_PASS_NON_IP, OUTCOME_PASS_UNGOVERNED,
    STATS_COUNTERS,
};
use gatekeeper_tests::packet::{Frame, L4, arp};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn tcp(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    Frame::new(ip(src), ip(dst), L4::Tcp { sport, dport }).build()
}

/// Runs `frame` through the fake: `(XDP action, OUTCOME_*)`. The outcome is the one counter the
/// packet moved (the fake reports it only through its counters), so this counts the packet once.
fn run(dp: &FakeDataplane, frame: &[u8]) -> (u32, u32) {
    let packets =
        |dp: &FakeDataplane| -> Vec<u64> { dp.stats().expect("stats").by_outcome.iter().map(|c| c.packets).collect() };
    let before = packets(dp);
    let action = dp.test_run(frame).expect("test_run");
    let moved: Vec<(usize, u64)> =
        packets(dp).iter().zip(&before).map(|(a, b)| a - b).enumerate().filter(|&(_, d)| d != 0).collect();
    match moved[..] {
        [(outcome, 1)] => (action, outcome as u32),
        _ => panic!("one packet must move exactly one outcome counter by one: {moved:?}"),
    }
}

/// The outcome of `frame` (counted once, like any packet the fake runs).
fn outcome(dp: &FakeDataplane, frame: &[u8]) -> u32 {
    run(dp, frame).1
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
    let modbus = tcp("10.0.0.1", "10.0.0.2", 40000, 502);
    let cases: [(&str, Vec<u8>, u32, u32); 9] = [
        ("hmi->plc tcp/502", modbus.clone(), XDP_PASS, OUTCOME_PASS_ALLOWED),
        ("eng->plc tcp/502", tcp("10.0.0.3", "10.0.0.2", 40000, 502), XDP_DROP, OUTCOME_DROP_DEFAULT),
        ("hmi->plc tcp/503", tcp("10.0.0.1", "10.0.0.2", 40000, 503), XDP_DROP, OUTCOME_DROP_DEFAULT),
        (
            "hmi->plc udp/502",
            Frame::new(ip("10.0.0.1"), ip("10.0.0.2"), L4::Udp { sport: 40000, dport: 502 }).build(),
            XDP_DROP,
            OUTCOME_DROP_DEFAULT,
        ),
        // Stateless: the reply of an allowed flow is judged as a flow of its own.
        ("plc->hmi reply", tcp("10.0.0.2", "10.0.0.1", 502, 40000), XDP_DROP, OUTCOME_DROP_DEFAULT),
        ("eng->hmi (labels only)", tcp("10.0.0.3", "10.0.0.1", 40000, 502), XDP_PASS, OUTCOME_PASS_UNGOVERNED),
        ("arp", arp(), XDP_PASS, OUTCOME_PASS_NON_IP),
        ("truncated tcp", modbus[..modbus.len() - 1].to_vec(), XDP_DROP, OUTCOME_DROP_MALFORMED),
        ("runt frame", vec![0; 10], XDP_DROP, OUTCOME_DROP_MALFORMED),
    ];
    let mut compiler = compiler();
    let enforce = fake_with(&policy("enforce", "eng"), &mut compiler);
    let monitor = fake_with(&policy("monitor", "eng"), &mut compiler);
    for (name, frame, act, outcome) in &cases {
        assert_eq!(run(&enforce, frame), (*act, *outcome), "enforce: {name}");
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
    let ns = Frame::new(ip("fd00::1"), ip("fd00::2"), L4::Icmp { ty: 135, id: 0 }).build();
    assert_eq!(outcome(&dp, &ns), OUTCOME_PASS_NEIGHBOR, "neighbour discovery passes untouched");
    let ping = Frame::new(ip("fd00::1"), ip("fd00::2"), L4::Icmp { ty: 128, id: 7 }).build();
    assert_eq!(dp.test_run(&ping).expect("test_run"), XDP_DROP, "no rule allows ICMPv6 to the PLC");
    let mut three_tags = Frame::new(ip("192.0.2.1"), ip("192.0.2.2"), L4::Udp { sport: 1, dport: 2 });
    three_tags.vlans = vec![(ETH_P_8021AD, 1), (ETH_P_8021Q, 2), (ETH_P_8021Q, 3)];
    assert_eq!(outcome(&dp, &three_tags.build()), OUTCOME_DROP_MALFORMED, "unattributable under enforce");
    let label_only = fake_with(&policy("label", "eng"), &mut compiler);
    assert_eq!(outcome(&label_only, &three_tags.build()), OUTCOME_PASS_MALFORMED, "no governing segment");
    let mut two_tags = Frame::new(ip("10.0.0.1"), ip("10.0.0.2"), L4::Tcp { sport: 40000, dport: 502 });
    two_tags.vlans = vec![(ETH_P_8021AD, 1), (ETH_P_8021Q, 2)];
    assert_eq!(dp.test_run(&two_tags.build()).expect("test_run"), XDP_PASS, "two VLAN tags are parsed through");
}

#[test]
fn applies_follow_the_compiled_policy_and_move_the_epoch() {
    let now = Utc::now();
    let mut compiler = compiler();
    let mut dp = FakeDataplane::new(&LoadOptions::default());
    assert_eq!((dp.applied(), dp.epoch()), (&Compiled::empty(), 0));
    let eng = tcp("10.0.0.3", "10.0.0.2", 40000, 502);
    assert_eq!(outcome(&dp, &eng), OUTCOME_PASS_UNGOVERNED, "empty maps govern nothing");

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
    assert_eq!(outcome(&dp, &eng), OUTCOME_MONITOR_DEFAULT);
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
    assert_eq!((stats.by_outcome.len(), stats.total()), (STATS_COUNTERS as usize, 0));
}
