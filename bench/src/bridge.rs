//! Section 2: packets per second through a lab bridge.
//!
//! `gen` and `sink` hosts hang off a bridge in an appliance namespace. The generator is
//! BPF_PROG_TEST_RUN in live-frames mode running `gk_redirect`: it transmits 64-byte UDP frames
//! into its veth as fast as the CPU allows. They arrive on the bridge port `p-gen`, where the
//! filter under test runs, cross the bridge, and are counted and dropped by `gk_sink` on the
//! sink host. The whole path runs on one pinned CPU, so packets per second is the inverse of
//! the CPU cost per packet, and a filter's own cost is `1e9/pps - 1e9/pps(no filter)`.
//!
//! Filters: none (an empty XDP program on `p-gen`, which veth needs to take redirected frames),
//! gatekeeper (its XDP program on `p-gen`), nftables with a concatenated set at the bridge
//! forward hook and at netdev ingress, and nftables as a linear rule list at the bridge forward
//! hook. nftables rules are stateless (the kernel has no bridge conntrack); gatekeeper's allowed
//! traffic is one UDP flow, so after its first packet it takes the flow-table fast path.

use std::{
    fmt::Write as _,
    fs::File,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::Instant,
};

use anyhow::{Context, bail};
use aya::{
    maps::{Array, PerCpuArray},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use chrono::Utc;
use gatekeeper::{
    compile::{Compiler, Timeouts},
    dataplane::{BpfDataplane as Dataplane, LoadOptions, XdpAttachMode, test_run_live_fd},
    policy::selector::Selector,
    policy::{Action, Asset, Endpoint, Mode, Policy, Protocol, Rule, Segment},
};
use gatekeeper_tests::{
    lab::{Lab, sh},
    packet::{Frame, L4},
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{Options, progress, stats};

pub const FILTERS: [&str; 5] = ["none", "gatekeeper", "nft-bridge-set", "nft-netdev-set", "nft-bridge-linear"];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub rules: usize,
    pub filter: String,
    /// allowed or denied.
    pub traffic: String,
    /// Packets per second, per round.
    pub pps: Vec<f64>,
    pub pps_median: f64,
    pub pps_max: f64,
    /// The filter's own cost per packet (ns), per round, against "none" of the same round.
    pub cost_ns: Vec<f64>,
    pub cost_ns_min: f64,
    pub cost_ns_median: f64,
}

/// Runs `f` with this thread inside network namespace `ns`, then returns to where it was.
fn in_ns<T>(ns: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    let target = File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("netns {ns}"))?;
    // SAFETY: setns with valid fds, affecting only this thread.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    let out = f();
    // SAFETY: as above.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns back: {}", std::io::Error::last_os_error());
    }
    out
}

fn nft(ns: &str, script: &str) -> anyhow::Result<String> {
    let path = std::env::temp_dir().join(format!("gk-bench-{}.nft", std::process::id()));
    std::fs::write(&path, script)?;
    let out = sh("ip", &["netns", "exec", ns, "nft", "-f", &path.display().to_string()]);
    let _ = std::fs::remove_file(&path);
    out
}

fn nft_dropped(ns: &str, family: &str) -> anyhow::Result<u64> {
    let out = sh("ip", &["netns", "exec", ns, "nft", "list", "counter", family, "gkbench", "gk_drop"])?;
    out.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .context("no packet count in nft output")
}

fn mac(ns: &str) -> anyhow::Result<[u8; 6]> {
    let out = sh("ip", &["-n", ns, "-o", "link", "show", "eth0"])?;
    let text = out.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).context("no MAC")?;
    let mut m = [0u8; 6];
    for (i, part) in text.split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(m)
}

fn src_addr(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, 1, (i >> 8) as u8, (i & 0xff) as u8)
}

fn port(i: usize) -> u16 {
    1000 + (i % 50_000) as u16
}

const SINK: &str = "10.0.0.2";

/// Gatekeeper's equivalent of the nftables rules: one allow per (source, port), sink enforced.
fn policy(rules: usize) -> Policy {
    let mut p = Policy::default();
    for i in 0..rules {
        let tags = [("id".to_string(), i.to_string())].into();
        p.assets.push(Asset {
            name: format!("src-{i}"),
            prefixes: vec![IpNet::from(std::net::IpAddr::V4(src_addr(i)))],
            tags,
        });
        p.segments.push(Segment {
            name: format!("s-{i}"),
            selector: Selector::parse(&format!("id={i}")).ok(),
            cidrs: vec![],
            mode: Mode::Label,
        });
        p.rules.push(Rule {
            name: format!("r-{i}"),
            from: Endpoint::Segment(format!("s-{i}")),
            to: Endpoint::Segment("sink".into()),
            protocol: Protocol::Udp,
            ports: vec![(port(i), port(i))],
            action: Action::Allow,
            expires: None,
        });
    }
    let sink: IpNet = format!("{SINK}/32").parse().unwrap_or_else(|_| IpNet::default());
    p.segments.push(Segment { name: "sink".into(), selector: None, cidrs: vec![sink], mode: Mode::Enforce });
    p
}

fn nft_script(filter: &str, rules: usize) -> String {
    let (family, hook) = match filter {
        "nft-netdev-set" => ("netdev", "type filter hook ingress device \"p-gen\" priority 0; policy accept;"),
        _ => ("bridge", "type filter hook forward priority 0; policy accept;"),
    };
    let mut s = format!("table {family} gkbench {{\n  counter gk_drop {{ }}\n");
    if filter == "nft-bridge-linear" {
        s += &format!("  chain c {{\n    {hook}\n");
        for i in 0..rules {
            let _ = writeln!(s, "    ip saddr {} ip daddr {SINK} udp dport {} accept", src_addr(i), port(i));
        }
    } else {
        s += "  set allow {\n    type ipv4_addr . ipv4_addr . inet_service\n    elements = {\n";
        for i in 0..rules {
            let _ = writeln!(s, "      {} . {SINK} . {},", src_addr(i), port(i));
        }
        s += "    }\n  }\n";
        s += &format!("  chain c {{\n    {hook}\n    ip saddr . ip daddr . udp dport @allow accept\n");
    }
    s += &format!("    ip daddr {SINK} counter name gk_drop drop\n  }}\n}}\n");
    s
}

struct Rig {
    lab: Lab,
    helpers: aya::Ebpf,
    generator: OwnedFd,
    empty_link: Option<XdpLinkId>,
    dataplane: Dataplane,
    compiler: Compiler,
}

impl Rig {
    fn new() -> anyhow::Result<Self> {
        let lab = Lab::new(&[("gen", 1), ("sink", 2)])?;
        let (app, gen_ns, sink_ns) =
            (lab.appliance.clone(), lab.host("gen").netns.clone(), lab.host("sink").netns.clone());
        // Bridge hooks of iptables would run for every configuration alike; keep only what is measured.
        for knob in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"] {
            let _ = sh("ip", &["netns", "exec", &app, "sysctl", "-qw", &format!("net.bridge.{knob}=0")]);
        }
        // No IPv6 chatter (router and neighbour solicitations) on the measured path.
        for ns in [&app, &gen_ns, &sink_ns] {
            let _ = sh("ip", &["netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        }
        let sink_mac = mac(&sink_ns)?;
        let mac_text: Vec<String> = sink_mac.iter().map(|b| format!("{b:02x}")).collect();
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &app,
                "bridge",
                "fdb",
                "replace",
                &mac_text.join(":"),
                "dev",
                "p-sink",
                "master",
                "static",
            ],
        )?;

        let mut helpers = aya::Ebpf::load(gatekeeper::dataplane::BENCH_OBJECT)?;
        for name in ["gk_empty", "gk_redirect", "gk_sink"] {
            let p: &mut Xdp = helpers.program_mut(name).context(name)?.try_into()?;
            p.load()?;
        }
        // Sink: count and drop on the sink host's eth0.
        in_ns(&sink_ns, || {
            let p: &mut Xdp = helpers.program_mut("gk_sink").context("gk_sink")?.try_into()?;
            p.attach("eth0", XdpMode::Driver).context("attaching the sink")?;
            Ok(())
        })?;
        // Generator: redirect into the gen host's eth0 (resolved in its namespace).
        let ifindex = in_ns(&gen_ns, || {
            // SAFETY: a NUL-terminated name.
            Ok(unsafe { libc::if_nametoindex(c"eth0".as_ptr()) })
        })?;
        let mut target: Array<_, u32> = Array::try_from(helpers.map_mut("BENCH_TARGET").context("BENCH_TARGET")?)?;
        target.set(0, ifindex, 0)?;
        let generator = {
            let p: &Xdp = helpers.program("gk_redirect").context("gk_redirect")?.try_into()?;
            p.fd()?.as_fd().try_clone_to_owned()?
        };
        let load = LoadOptions::default();
        let dataplane = Dataplane::load(load.clone())?;
        let compiler = Compiler::new(Timeouts::default(), load.capacity());
        let mut rig = Self { lab, helpers, generator, empty_link: None, dataplane, compiler };
        rig.attach_empty()?;
        Ok(rig)
    }

    fn attach_empty(&mut self) -> anyhow::Result<()> {
        let app = self.lab.appliance.clone();
        let helpers = &mut self.helpers;
        let id = in_ns(&app, || {
            let p: &mut Xdp = helpers.program_mut("gk_empty").context("gk_empty")?.try_into()?;
            Ok(p.attach("p-gen", XdpMode::Driver)?)
        })?;
        self.empty_link = Some(id);
        Ok(())
    }

    fn detach_empty(&mut self) -> anyhow::Result<()> {
        if let Some(id) = self.empty_link.take() {
            let p: &mut Xdp = self.helpers.program_mut("gk_empty").context("gk_empty")?.try_into()?;
            p.detach(id)?;
        }
        Ok(())
    }

    fn sink_count(&self) -> anyhow::Result<u64> {
        let m: PerCpuArray<_, u64> = PerCpuArray::try_from(self.helpers.map("BENCH_SINK").context("BENCH_SINK")?)?;
        Ok(m.get(&0, 0)?.iter().sum())
    }

    /// Sends `frames` frames; returns (elapsed seconds, delivered to the sink).
    fn blast(&self, frame: &[u8], frames: u32) -> anyhow::Result<(f64, u64)> {
        let gen_ns = self.lab.host("gen").netns.clone();
        let before = self.sink_count()?;
        let t = Instant::now();
        in_ns(&gen_ns, || Ok(test_run_live_fd(self.generator.as_fd(), frame, frames, 64)?))?;
        let elapsed = t.elapsed().as_secs_f64();
        Ok((elapsed, self.sink_count()? - before))
    }
}

/// A 64-byte (on the wire) UDP frame to the sink.
fn frame(src: std::net::Ipv4Addr, dport: u16, sink_mac: [u8; 6]) -> Vec<u8> {
    let mut f = Frame::new(
        std::net::IpAddr::V4(src),
        SINK.parse().unwrap_or(std::net::IpAddr::V4(src)),
        L4::Udp { sport: 4000, dport },
    )
    .build();
    f[..6].copy_from_slice(&sink_mac);
    f.resize(60, 0);
    f
}

pub fn run(opts: &Options) -> anyhow::Result<Vec<Cell>> {
    progress("bridge throughput: building the lab (gen -> bridge -> sink)");
    let mut rig = Rig::new()?;
    let sink_mac = mac(&rig.lab.host("sink").netns)?;
    let app = rig.lab.appliance.clone();
    let rounds = opts.bridge_rounds();
    let target_secs = if opts.smoke { 0.05 } else { 0.4 };
    // Calibrate the frame count on the unfiltered path.
    let probe = frame(src_addr(0), port(0), sink_mac);
    let (secs, _) = rig.blast(&probe, 50_000)?;
    let frames = ((50_000.0 / secs) * target_secs).clamp(10_000.0, 20_000_000.0) as u32;
    progress(&format!("  {frames} frames per measurement (~{target_secs} s)"));

    let mut out = Vec::new();
    for &rules in &opts.bridge_rules {
        let compiled = rig.compiler.compile(&policy(rules), Utc::now())?;
        rig.dataplane.apply(compiled)?;
        let allowed = frame(src_addr(rules - 1), port(rules - 1), sink_mac);
        let denied = frame(std::net::Ipv4Addr::new(10, 9, 9, 9), 7, sink_mac);
        // (filter, traffic) -> (pps per round, cost per round). Each filter's measurement is
        // paired with a no-filter measurement taken right before it, so drift between the two
        // (frequency, neighbours on the host) does not show up as the filter's cost.
        let mut cells: std::collections::BTreeMap<(String, String), (Vec<f64>, Vec<f64>)> = Default::default();
        for round in 0..rounds {
            progress(&format!("  {rules} rules, round {}/{rounds}", round + 1));
            // Rotate the order each round so no filter always runs first or last.
            let order: Vec<&str> =
                FILTERS.iter().cycle().skip(round % FILTERS.len()).take(FILTERS.len()).copied().collect();
            for filter in order {
                for (traffic, f) in [("allowed", &allowed), ("denied", &denied)] {
                    let base = measure(&mut rig, "none", traffic, f, frames, target_secs, &app, rules)?;
                    let pps = measure(&mut rig, filter, traffic, f, frames, target_secs, &app, rules)?;
                    let e = cells.entry((filter.to_string(), traffic.to_string())).or_default();
                    e.0.push(pps);
                    e.1.push(if filter == "none" { 0.0 } else { 1e9 / pps - 1e9 / base });
                }
            }
        }
        for ((filter, traffic), (pps, cost)) in cells {
            let (_, pps_median) = stats(&pps);
            let pps_max = pps.iter().copied().fold(f64::MIN, f64::max);
            let (cost_ns_min, cost_ns_median) = stats(&cost);
            out.push(Cell {
                rules,
                filter,
                traffic,
                pps,
                pps_median,
                pps_max,
                cost_ns: cost,
                cost_ns_min,
                cost_ns_median,
            });
        }
    }
    Ok(out)
}

/// Sets `filter` up, measures one kind of traffic through it, and takes it down again.
#[allow(clippy::too_many_arguments)]
fn measure(
    rig: &mut Rig,
    filter: &str,
    traffic: &str,
    f: &[u8],
    frames: u32,
    target_secs: f64,
    app: &str,
    rules: usize,
) -> anyhow::Result<f64> {
    match filter {
        "gatekeeper" => {
            rig.detach_empty()?;
            let dp = &mut rig.dataplane;
            in_ns(app, || Ok(dp.attach("p-gen", XdpAttachMode::Native)?))?;
        }
        "none" => {}
        f => {
            nft(app, &nft_script(f, rules))?;
        }
    }
    let result = (|| -> anyhow::Result<f64> {
        // Size the run for this filter: a slow one (a long linear rule list) gets fewer
        // frames, so every measurement takes about the same time.
        let (probe_secs, _) = rig.blast(f, 5_000)?;
        let frames = ((5_000.0 / probe_secs.max(1e-6)) * target_secs).clamp(5_000.0, f64::from(frames)) as u32;
        let dropped_before = drop_count(rig, filter, app)?;
        let (secs, delivered) = rig.blast(f, frames)?;
        let dropped = drop_count(rig, filter, app)? - dropped_before;
        if filter != "none" && traffic == "denied" && delivered > 0 {
            bail!("{filter}: {delivered} denied packets reached the sink");
        }
        if traffic == "allowed" && dropped > 0 {
            bail!("{filter}: {dropped} allowed packets were dropped");
        }
        let processed = delivered + dropped;
        if processed < u64::from(frames) / 2 {
            bail!("{filter} {traffic}: only {processed} of {frames} frames were processed");
        }
        Ok(processed as f64 / secs)
    })();
    match filter {
        "gatekeeper" => {
            rig.dataplane.detach_all()?;
            rig.attach_empty()?;
        }
        "none" => {}
        f => {
            let family = if f == "nft-netdev-set" { "netdev" } else { "bridge" };
            sh("ip", &["netns", "exec", app, "nft", "delete", "table", family, "gkbench"])?;
        }
    }
    result
}

fn drop_count(rig: &Rig, filter: &str, app: &str) -> anyhow::Result<u64> {
    Ok(match filter {
        "none" => 0,
        "gatekeeper" => rig.dataplane.stats()?.dropped(),
        "nft-netdev-set" => nft_dropped(app, "netdev")?,
        _ => nft_dropped(app, "bridge")?,
    })
}
