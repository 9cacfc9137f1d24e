//! The data plane's apply guarantees, checked on the loaded program: a failed apply changes
//! nothing, and concurrent packets never see a mix of two policies. Needs root (BPF).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use gatekeeper::{
    compile::{Capacity, Compiler, Timeouts},
    dataplane::{BpfDataplane as Dataplane, LoadOptions, test_run_fd},
    policy::reference::{Outcome, Reference},
    policy::{Policy, PolicyDocument},
};
use gatekeeper_tests::packet::{Frame, L4};

fn policy(yaml: &str) -> Policy {
    PolicyDocument::from_yaml(yaml, "t").unwrap().validate("t").unwrap()
}

fn frames() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (s, d) in
        [("10.0.0.1", "10.0.0.2"), ("10.0.0.2", "10.0.0.1"), ("10.0.0.3", "10.0.0.2"), ("10.0.0.1", "10.0.0.3")]
    {
        for l4 in [L4::Other { proto: 47 }, L4::Icmp { ty: 3, id: 0 }] {
            out.push(Frame::new(s.parse().unwrap(), d.parse().unwrap(), l4).build());
        }
    }
    out
}

/// Checks every frame against the reference model for `p` (no flows involved: GRE and ICMP
/// errors are never tracked).
fn assert_enforces(dp: &Dataplane, p: &Policy, slots: std::collections::BTreeMap<String, u32>, what: &str) {
    let mut model = Reference::new(p.clone(), Utc::now(), slots);
    for f in frames() {
        let want = model.judge(&f).outcome;
        let got = dp.test_run(&f).unwrap();
        assert_eq!(got == 1, want.drops(), "{what}: frame {f:02x?}: kernel {got}, reference {want:?}");
    }
}

const SMALL_A: &str = "assets:\n  - {name: a, ips: [10.0.0.1], tags: {r: x}}\n  - {name: b, ips: [10.0.0.2], tags: {r: y}}\n\
segments:\n  - {name: x, selector: r=x, mode: label}\n  - {name: y, selector: r=y}\n\
rules:\n  - {name: x-to-y, from: x, to: y, protocol: icmp}\n";

#[test]
fn a_failed_apply_changes_nothing() {
    // A policy map of 8 entries (4 per generation) makes a large policy fail in the kernel,
    // after part of it was written to the inactive generation.
    let mut dp = Dataplane::load(LoadOptions { policy_entries: 8, ..LoadOptions::default() }).unwrap();
    let mut compiler = Compiler::new(Timeouts::default(), Capacity::default());
    let a = policy(SMALL_A);
    let ca = compiler.compile(&a, Utc::now()).unwrap();
    let slots_a = ca.rule_slots.clone();
    dp.apply(ca).unwrap();
    assert_enforces(&dp, &a, slots_a.clone(), "policy A");
    let epoch = dp.epoch();

    // Eight segments pairwise allowed: far more than 4 entries.
    let mut big = String::from("assets:\n");
    let mut segs = String::from("segments:\n");
    for i in 0..8 {
        big += &format!("  - {{name: h{i}, ips: [10.0.1.{i}], tags: {{n: \"{i}\"}}}}\n");
        segs += &format!("  - {{name: s{i}, selector: n={i}}}\n");
    }
    let big = format!(
        "{big}{segs}rules:\n  - {{name: all, from: any, to: any, protocol: tcp}}\n  - {{name: s0-s1, from: s0, to: s1}}\n  - {{name: s2-s3, from: s2, to: s3}}\n"
    );
    let cb = compiler.compile(&policy(&big), Utc::now()).unwrap();
    assert!(cb.policy.len() > 4);
    let err = dp.apply(cb).unwrap_err();
    assert!(err.to_string().contains("GK_POLICY"), "{err}");
    assert_eq!(dp.epoch(), epoch, "a failed apply must not flip the epoch");
    assert_enforces(&dp, &a, slots_a, "policy A after the failed apply");

    // The standby generation was restored: the next apply lands exactly.
    let c = policy(&SMALL_A.replace("tags: {r: x}", "tags: {r: z}"));
    let cc = compiler.compile(&c, Utc::now()).unwrap();
    let slots_c = cc.rule_slots.clone();
    dp.apply(cc).unwrap();
    assert_enforces(&dp, &c, slots_c, "policy C");
}

#[test]
fn a_change_no_packet_can_see_writes_nothing_and_keeps_the_epoch() {
    let mut dp = Dataplane::load(LoadOptions::default()).unwrap();
    let mut compiler = Compiler::new(Timeouts::default(), Capacity::default());
    let a = policy(SMALL_A);
    let ca = compiler.compile(&a, Utc::now()).unwrap();
    let slots = ca.rule_slots.clone();
    dp.apply(ca).unwrap();
    let epoch = dp.epoch();
    // A tag no selector uses and a description: the same maps.
    let restated = policy(&SMALL_A.replace("tags: {r: x}", "tags: {r: x, site: plant-2}, description: moved"));
    let report = dp.apply(compiler.compile(&restated, Utc::now()).unwrap()).unwrap();
    assert_eq!((report.entries, report.epoch, dp.epoch()), (0, epoch, epoch), "nothing written, no flip");
    assert_enforces(&dp, &restated, slots.clone(), "the restated policy");
    // A change packets can see still flips.
    let moved = policy(&SMALL_A.replace("tags: {r: x}", "tags: {r: y}"));
    let report = dp.apply(compiler.compile(&moved, Utc::now()).unwrap()).unwrap();
    assert!(report.entries > 0 && dp.epoch() == epoch + 1, "{report:?}");
}

/// Runs the program on `frame` in batches of 500 on its own thread until `stop`; returns the
/// packet count.
fn run_until(stop: Arc<AtomicBool>, prog: std::os::fd::OwnedFd, frame: Vec<u8>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        use std::os::fd::AsFd as _;
        let mut runs = 0u64;
        while !stop.load(Ordering::SeqCst) {
            test_run_fd(prog.as_fd(), &frame, 500).unwrap();
            runs += 500;
        }
        runs
    })
}

#[test]
fn packets_never_see_a_mix_of_two_policies() {
    // Under P1, 10.0.0.1 is in `x` and x -> y is allowed; under P2 it is in `z` and z -> y is
    // allowed. A packet mixing P2's identities with P1's rules (or the reverse) finds no rule
    // and is dropped, although each policy alone allows it.
    let p1 = policy(&SMALL_A.replace(", protocol: icmp", ""));
    let p2 = policy(
        "assets:\n  - {name: a, ips: [10.0.0.1], tags: {r: z}}\n  - {name: b, ips: [10.0.0.2], tags: {r: w}}\n\
segments:\n  - {name: z, selector: r=z, mode: label}\n  - {name: w, selector: r=w}\n\
rules:\n  - {name: z-to-w, from: z, to: w}\n",
    );
    let mut dp = Dataplane::load(LoadOptions::default()).unwrap();
    let mut compiler = Compiler::new(Timeouts::default(), Capacity::default());
    dp.apply(compiler.compile(&p1, Utc::now()).unwrap()).unwrap();
    let frame = Frame::new("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), L4::Other { proto: 47 }).build();

    // A second thread runs the program in batches on its own fd while this one flips policies.
    let stop = Arc::new(AtomicBool::new(false));
    let prog = dp.program_fd().unwrap();
    let runner = run_until(stop.clone(), prog, frame.clone());
    let mut applies = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < deadline {
        let p = if applies % 2 == 0 { &p2 } else { &p1 };
        dp.apply(compiler.compile(p, Utc::now()).unwrap()).unwrap();
        applies += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let runs = runner.join().unwrap();
    let stats = dp.stats().unwrap();
    let allowed = stats.by_outcome[Outcome::PassAllowed.counter() as usize].packets;
    eprintln!("{runs} packets over {applies} policy flips: {allowed} allowed, {} dropped", stats.dropped());
    assert!(applies > 20 && runs > 10_000, "too little overlap to mean anything");
    assert_eq!(stats.dropped(), 0, "a packet was judged by a mix of two policies");
    assert_eq!(allowed, runs);
}

/// Tag changes that only move addresses between existing identities are written into the
/// generation in force (no grace period to wait for). Under concurrent packets an address is
/// judged by its old identity or its new one, never by neither, and open flows are judged again.
#[test]
fn tag_changes_in_place_never_leave_an_address_unjudged() {
    let doc = |a_role: &str| {
        let lines = [
            "assets:".to_string(),
            format!("  - {{name: a, ips: [10.0.0.1], tags: {{r: {a_role}}}}}"),
            "  - {name: b, ips: [10.0.0.2], tags: {r: y}}".into(),
            "  - {name: keep-x, ips: [10.0.0.7], tags: {r: x}}".into(),
            "  - {name: keep-z, ips: [10.0.0.8], tags: {r: z}}".into(),
            "  - {name: keep-w, ips: [10.0.0.9], tags: {r: w}}".into(),
            "segments:".into(),
            "  - {name: x, selector: r=x, mode: label}".into(),
            "  - {name: z, selector: r=z, mode: label}".into(),
            "  - {name: w, selector: r=w, mode: label}".into(),
            "  - {name: y, selector: r=y}".into(),
            "rules:".into(),
            "  - {name: x-to-y, from: x, to: y}".into(),
            "  - {name: z-to-y, from: z, to: y}".into(),
        ];
        policy(&lines.join("\n"))
    };
    let (px, pz, pw) = (doc("x"), doc("z"), doc("w"));
    let mut dp = Dataplane::load(LoadOptions::default()).unwrap();
    let mut compiler = Compiler::new(Timeouts::default(), Capacity::default());
    dp.apply(compiler.compile(&px, Utc::now()).unwrap()).unwrap();

    // A TCP flow from a to b is open; moving a to `w` (no rule) cuts it on its next packet.
    let syn = Frame::new("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), L4::Tcp { sport: 41000, dport: 80 })
        .build();
    assert_eq!(dp.test_run(&syn).unwrap(), 2, "a in x reaches b");
    // A tag edit through the API: asset `a` alone, compiled incrementally.
    let mut moved = |dp: &mut Dataplane, p: &Policy| {
        let delta = compiler.update_assets(p, &["a"], dp.applied(), Utc::now()).unwrap();
        dp.apply_moves(delta).unwrap();
    };
    let before = dp.epoch();
    moved(&mut dp, &pw);
    assert_eq!(dp.epoch(), before.wrapping_add(gatekeeper_common::GENERATIONS), "written in place");
    assert_eq!(dp.test_run(&syn).unwrap(), 1, "the open flow is judged again and cut");
    moved(&mut dp, &px);

    let frame = Frame::new("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), L4::Other { proto: 47 }).build();
    let stop = Arc::new(AtomicBool::new(false));
    let prog = dp.program_fd().unwrap();
    let runner = run_until(stop.clone(), prog, frame.clone());
    let dropped_before = dp.stats().unwrap().dropped();
    let (mut moves, mut in_place) = (0u32, 0u32);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        let e = dp.epoch();
        moved(&mut dp, if moves % 2 == 0 { &pz } else { &px });
        in_place += u32::from(dp.epoch() == e.wrapping_add(gatekeeper_common::GENERATIONS));
        moves += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let runs = runner.join().unwrap();
    eprintln!("{runs} packets over {moves} tag changes ({in_place} in place)");
    assert!(moves > 100 && runs > 10_000, "too little overlap to mean anything");
    assert_eq!(in_place, moves, "every move between existing identities is written in place");
    assert_eq!(dp.stats().unwrap().dropped(), dropped_before, "a packet found its address in neither segment");

    // The same move as part of a whole new policy (a reload, POST /apply) flips the generation:
    // a change of several assets in one request is never shown to a packet half done.
    let e = dp.epoch();
    dp.apply(compiler.compile(&pw, Utc::now()).unwrap()).unwrap();
    assert_eq!(dp.epoch(), e.wrapping_add(1), "a whole-policy apply flips the generation");
    // The generations caught up with the hundreds of in-place moves (merged) and judge right.
    assert_eq!(dp.test_run(&frame).unwrap(), 1, "a in w: no rule to y");
    for p in [&pz, &pw, &px] {
        dp.apply(compiler.compile(p, Utc::now()).unwrap()).unwrap();
    }
    assert_eq!(dp.test_run(&frame).unwrap(), 2, "a in x again: x -> y");
    let stale = Frame::new("10.0.0.8".parse().unwrap(), "10.0.0.2".parse().unwrap(), L4::Other { proto: 47 }).build();
    assert_eq!(dp.test_run(&stale).unwrap(), 2, "keep-z still in z: z -> y");
}
