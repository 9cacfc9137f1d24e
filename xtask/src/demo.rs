//! `cargo xtask demo`: the real daemon on a lab bridge, a sample OT policy, real traffic.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::bail;
use gatekeeper_tests::lab::{Host, Lab, Reach, Servers, echo};

use crate::step;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; the lab has been torn down");
    }
    Ok(())
}

const POLICY: &str = include_str!("../demo/policy.yaml");

enum Probe {
    Tcp(u16),
    Ping,
}

struct Case {
    from: &'static str,
    to: &'static str,
    probe: Probe,
    v6: bool,
    what: &'static str,
    allow: bool,
}

const fn case(from: &'static str, to: &'static str, probe: Probe, v6: bool, what: &'static str, allow: bool) -> Case {
    Case { from, to, probe, v6, what, allow }
}

pub fn run() -> anyhow::Result<()> {
    crate::require_root("cargo xtask demo")?;
    crate::setup::all()?;
    crate::build(false)?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_interrupt as *const () as libc::sighandler_t);
    }
    let bin = crate::workspace_root().join("target/debug/gatekeeper");

    step("Building the lab: four OT hosts on a Linux bridge, each in its own network namespace");
    let lab = Lab::new(&[("hmi", 1), ("eng", 2), ("plc1", 11), ("plc2", 12)])?;
    let names = [("hmi", "hmi-1"), ("eng", "eng-ws"), ("plc1", "plc-1"), ("plc2", "plc-2")];
    fn label_of<'a>(names: &[(&str, &'a str)], h: &'a str) -> &'a str {
        names.iter().find(|(n, _)| *n == h).map_or(h, |(_, l)| *l)
    }
    let label = |h| label_of(&names, h);
    for h in &lab.hosts {
        eprintln!("    {:<7} {:<10} {:<14} bridge port {}", label(h.name.as_str()), h.ipv4, h.ipv6, h.port);
    }
    let _servers: Vec<Servers> = ["plc1", "plc2"]
        .iter()
        .map(|h| Servers::start(lab.host(h), &[22, 502, 3389, 445], &[]))
        .collect::<anyhow::Result<_>>()?;
    check_interrupt()?;

    step("Starting gatekeeper on every bridge port with the sample OT policy (xtask/demo/policy.yaml)");
    let mut daemon = lab.start_daemon(&bin, POLICY)?;
    for line in daemon.log().lines().filter(|l| l.contains("attached") || l.contains("applied policy")) {
        eprintln!("    {}", line.split_once("INFO ").map_or(line, |(_, r)| r).trim());
    }

    let cases = [
        case("hmi", "plc1", Probe::Tcp(502), false, "Modbus/TCP", true),
        case("hmi", "plc2", Probe::Tcp(502), true, "Modbus/TCP over IPv6", true),
        case("hmi", "plc1", Probe::Ping, false, "ping", true),
        case("hmi", "plc1", Probe::Tcp(22), false, "SSH", false),
        case("eng", "plc1", Probe::Tcp(502), false, "Modbus/TCP", false),
        case("eng", "plc1", Probe::Tcp(3389), false, "RDP", false),
        case("eng", "plc2", Probe::Ping, true, "ping over IPv6", false),
        case("plc1", "plc2", Probe::Tcp(502), false, "lateral Modbus write", false),
        case("plc1", "plc2", Probe::Tcp(445), true, "lateral SMB over IPv6", false),
        case("plc2", "hmi", Probe::Tcp(502), false, "PLC opening a session", false),
    ];
    step("Sending real traffic through the bridge");
    eprintln!("    {:<7}    {:<7} {:<34} {:<8} observed", "from", "to", "traffic", "policy");
    let mut wrong = 0;
    for c in &cases {
        check_interrupt()?;
        let (from, to): (&Host, &Host) = (lab.host(c.from), lab.host(c.to));
        let addr = to.addr(c.v6);
        let timeout = Duration::from_millis(if c.allow { 3000 } else { 800 });
        let (passed, how) = match c.probe {
            Probe::Tcp(port) => match from.tcp(addr, port, timeout)? {
                Reach::Echoed => (true, "ALLOWED  connected, reply came back"),
                Reach::Refused => (true, "ALLOWED  (refused by the host)"),
                Reach::Silent => (false, "BLOCKED  dropped at the bridge"),
            },
            Probe::Ping => {
                if from.ping(addr)? {
                    (true, "ALLOWED  echo reply received")
                } else {
                    (false, "BLOCKED  dropped at the bridge")
                }
            }
        };
        let port = match c.probe {
            Probe::Tcp(p) => format!("{} tcp/{p}", c.what),
            Probe::Ping => c.what.to_string(),
        };
        let ok = passed == c.allow;
        wrong += usize::from(!ok);
        eprintln!(
            "    {:<7} -> {:<7} {:<34} {:<8} {}{}",
            label(c.from),
            label(c.to),
            port,
            if c.allow { "allow" } else { "deny" },
            how,
            if ok { "" } else { "   <-- UNEXPECTED" }
        );
    }

    check_interrupt()?;
    step("Incident: hmi-1 is compromised. Removing its role tag (SIGHUP reload) isolates it at once");
    let plc = lab.host("plc1").addr(false);
    let session = lab.host("hmi").connect(plc, 502, Duration::from_secs(3))?;
    let Ok(mut session) = session else { bail!("hmi-1 could not open a Modbus session to plc-1") };
    let before = echo(&mut session, b"read holding registers\n", Duration::from_secs(3));
    eprintln!("    open Modbus session hmi-1 -> plc-1 before: {}", if before { "working" } else { "NOT working" });
    let quarantined = POLICY.replace("tags: {role: hmi, site: plant-1}", "tags: {site: plant-1, quarantine: \"yes\"}");
    if let Err(e) = daemon.reload(&quarantined)? {
        bail!("the quarantine policy was rejected: {e}");
    }
    let after = echo(&mut session, b"write single coil\n", Duration::from_millis(800));
    eprintln!(
        "    the same session after the tag removal: {}",
        if after { "STILL WORKING <-- UNEXPECTED" } else { "cut" }
    );
    let new = lab.host("hmi").tcp(plc, 502, Duration::from_millis(800))?;
    eprintln!(
        "    a new session hmi-1 -> plc-1: {}",
        if new == Reach::Silent { "blocked" } else { "ALLOWED <-- UNEXPECTED" }
    );
    wrong += usize::from(!before) + usize::from(after) + usize::from(new != Reach::Silent);

    step("Stopping gatekeeper (SIGTERM; enforcement stays pinned), then `gatekeeper detach`");
    let log = daemon.stop()?;
    if let Some(line) = log.lines().find(|l| l.contains("gatekeeper stopped")) {
        eprintln!("    {}", line.split_once("INFO ").map_or(line, |(_, r)| r).trim());
    }
    lab.detach(&bin)?;
    step("Tearing down the lab");
    drop(lab);
    if wrong > 0 {
        bail!("{wrong} result(s) differed from the policy");
    }
    eprintln!("Demo complete: the sample policy was enforced on real traffic.");
    Ok(())
}
