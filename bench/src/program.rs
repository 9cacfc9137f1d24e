//! Section 1: the XDP program's own cost per packet through BPF_PROG_TEST_RUN, net of an empty
//! XDP program timed the same way in the same run.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, OwnedFd},
};

use anyhow::{Context, bail};
use chrono::Utc;
use gatekeeper::{
    compile::{Compiler, Timeouts},
    dataplane::{BpfDataplane as Dataplane, LoadOptions, test_run_fd},
};
use gatekeeper_tests::packet::{Frame, L4, arp};
use serde::{Deserialize, Serialize};

use crate::{Options, progress, stats, synth};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub rules: usize,
    pub assets: usize,
    /// allowed (judged by the rules every time: an untracked ICMP error), new-flow (an allowed TCP
    /// SYN opening a flow), flow-hit, denied, non-ip.
    pub kind: String,
    pub family: String,
    /// hot: one packet repeated; cold: many distinct addresses from the populated maps.
    pub temp: String,
    /// Net cost per round (measured minus the empty program), ns.
    pub net_ns: Vec<f64>,
    pub net_ns_min: f64,
    pub net_ns_median: f64,
    /// Expected XDP action (1 drop, 2 pass), checked on every run.
    pub action: u32,
}

struct Empty {
    _ebpf: aya::Ebpf,
    fd: OwnedFd,
}

fn load_empty() -> anyhow::Result<Empty> {
    let mut ebpf = aya::Ebpf::load(gatekeeper::dataplane::BENCH_OBJECT)?;
    let prog: &mut aya::programs::Xdp = ebpf.program_mut("gk_empty").context("gk_empty")?.try_into()?;
    prog.load()?;
    let fd = prog.fd()?.as_fd().try_clone_to_owned()?;
    Ok(Empty { _ebpf: ebpf, fd })
}

/// Mean ns per run of one frame repeated.
fn hot(fd: &OwnedFd, frame: &[u8], repeat: u32, action: u32) -> anyhow::Result<f64> {
    let (ret, ns) = test_run_fd(fd.as_fd(), frame, repeat)?;
    if action != 0 && ret != action {
        bail!("expected XDP action {action}, got {ret}");
    }
    Ok(f64::from(ns))
}

/// Mean ns per packet over distinct frames, each run once.
fn per_packet(fd: &OwnedFd, frames: &[Vec<u8>], action: u32) -> anyhow::Result<f64> {
    let mut total = 0u64;
    for f in frames {
        let (ret, ns) = test_run_fd(fd.as_fd(), f, 1)?;
        if action != 0 && ret != action {
            bail!("expected XDP action {action}, got {ret}");
        }
        total += u64::from(ns);
    }
    Ok(total as f64 / frames.len().max(1) as f64)
}

fn tcp(src: usize, dst: usize, v6: bool, sport: u16, dport: u16) -> Vec<u8> {
    Frame::new(synth::addr(src, v6), synth::addr(dst, v6), L4::Tcp { sport, dport }).build()
}

/// Destination unreachable (ICMP type 3, ICMPv6 type 1): allowed by rule 1/2, never tracked.
fn icmp_error(src: usize, dst: usize, v6: bool) -> Vec<u8> {
    Frame::new(synth::addr(src, v6), synth::addr(dst, v6), L4::Icmp { ty: if v6 { 1 } else { 3 }, id: 0 }).build()
}

pub fn run(opts: &Options) -> anyhow::Result<Vec<Cell>> {
    let empty = load_empty()?;
    let load = LoadOptions { host_entries: 1 << 22, rule_slots: 1 << 17, ..LoadOptions::default() };
    let mut dp = Dataplane::load(load.clone())?;
    let prog = dp.program_fd()?;
    let mut compiler = Compiler::new(Timeouts::default(), load.capacity());
    let (repeat, k) = if opts.smoke { (2_000, 64) } else { (200_000, 2048) };
    let mut cells = Vec::new();
    let mut rng_state = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: usize| {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        (rng_state % n.max(1) as u64) as usize
    };
    for &assets in &opts.assets {
        for &rules in &opts.rules {
            let segments = (assets / 4).clamp(2, 100);
            progress(&format!("program cost: {assets} assets, {rules} rules: compiling and applying"));
            let policy = synth::policy(assets, segments, rules);
            let t = std::time::Instant::now();
            let compiled = compiler.compile(&policy, Utc::now())?;
            let report = dp.apply(compiled)?;
            progress(&format!(
                "  applied in {:.2} s ({} entries written); measuring",
                t.elapsed().as_secs_f64(),
                report.entries
            ));
            dp.clear_flows()?;
            let members = |s: usize| (assets + segments - 1 - s) / segments;
            let mut rounds: BTreeMap<(String, String, String), (u32, Vec<f64>)> = BTreeMap::new();
            let mut sport = 1024u16;
            for round in 0..opts.rounds {
                for v6 in [false, true] {
                    let fam = if v6 { "v6" } else { "v4" };
                    let mut next_sport = || {
                        sport = if sport >= 65000 { 1024 } else { sport + 1 };
                        sport
                    };
                    // Baselines: the empty program on the same kinds of input.
                    let base_hot = hot(&empty.fd, &tcp(0, 1, v6, 1, 502), repeat, 2)?;
                    let cold_allowed: Vec<Vec<u8>> = (0..k)
                        .map(|_| {
                            let (a, b) = (
                                synth::member(0, rnd(members(0)), segments),
                                synth::member(1, rnd(members(1)), segments),
                            );
                            tcp(a, b, v6, next_sport(), 502)
                        })
                        .collect();
                    let base_cold = per_packet(&empty.fd, &cold_allowed, 2)?;
                    let hot_allowed: Vec<Vec<u8>> =
                        (0..k).map(|_| tcp(0, synth::member(1, 0, segments), v6, next_sport(), 502)).collect();
                    let base_pp = per_packet(&empty.fd, &hot_allowed, 2)?;
                    let mut record = |kind: &str, temp: &str, action: u32, ns: f64, base: f64| {
                        let e = rounds.entry((kind.into(), fam.into(), temp.into())).or_insert((action, vec![]));
                        e.1.push(ns - base);
                    };
                    // Allowed by a rule, judged by the rules every time.
                    let allowed = icmp_error(0, synth::member(1, 0, segments), v6);
                    record("allowed", "hot", 2, hot(&prog, &allowed, repeat, 2)?, base_hot);
                    let cold_icmp: Vec<Vec<u8>> = (0..k)
                        .map(|_| {
                            icmp_error(
                                synth::member(0, rnd(members(0)), segments),
                                synth::member(1, rnd(members(1)), segments),
                                v6,
                            )
                        })
                        .collect();
                    let base_cold_icmp = per_packet(&empty.fd, &cold_icmp, 2)?;
                    record("allowed", "cold", 2, per_packet(&prog, &cold_icmp, 2)?, base_cold_icmp);
                    // New flows: each packet an allowed TCP SYN with its own source port, run once.
                    record("new-flow", "hot", 2, per_packet(&prog, &hot_allowed, 2)?, base_pp);
                    record("new-flow", "cold", 2, per_packet(&prog, &cold_allowed, 2)?, base_cold);
                    // Flow hits: the flows just opened.
                    record("flow-hit", "hot", 2, hot(&prog, &hot_allowed[0], repeat, 2)?, base_hot);
                    record("flow-hit", "cold", 2, per_packet(&prog, &cold_allowed, 2)?, base_cold);
                    // Denied by default (a port no rule allows).
                    let denied = tcp(0, synth::member(1, 0, segments), v6, 40000, synth::DENIED_PORT);
                    record("denied", "hot", 1, hot(&prog, &denied, repeat, 1)?, base_hot);
                    let cold_denied: Vec<Vec<u8>> = (0..k)
                        .map(|_| {
                            tcp(rnd(assets), synth::member(1, rnd(members(1)), segments), v6, 40000, synth::DENIED_PORT)
                        })
                        .collect();
                    let base_cold_denied = per_packet(&empty.fd, &cold_denied, 2)?;
                    record("denied", "cold", 1, per_packet(&prog, &cold_denied, 1)?, base_cold_denied);
                }
                let a = arp();
                let base = hot(&empty.fd, &a, repeat, 2)?;
                let ns = hot(&prog, &a, repeat, 2)?;
                let e = rounds.entry(("non-ip".into(), "-".into(), "hot".into())).or_insert((2, vec![]));
                e.1.push(ns - base);
                let _ = round;
            }
            for ((kind, family, temp), (action, net)) in rounds {
                let (min, median) = stats(&net);
                cells.push(Cell {
                    rules,
                    assets,
                    kind,
                    family,
                    temp,
                    net_ns: net,
                    net_ns_min: min,
                    net_ns_median: median,
                    action,
                });
            }
        }
    }
    Ok(cells)
}
