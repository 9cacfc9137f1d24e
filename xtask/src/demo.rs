//! `cargo xtask demo`: the real daemon on a lab bridge, a sample OT policy, real traffic, and
//! Netskope private access following segment membership (against a fake tenant in the lab).

use std::{
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::bail;
use gatekeeper_tests::{
    lab::{Host, Lab, Reach, Servers, echo},
    netskope_fake::FakeTenant,
};

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
const ADMIN_TOKEN: &str = "demo-admin-token-5d1e0c";
const NETSKOPE_TOKEN: &str = "demo-netskope-token-93b2f7";

/// Runs the gatekeeper CLI in the appliance namespace, where the API listens.
fn cli(lab: &Lab, bin: &Path, token: &Path, args: &[&str]) -> anyhow::Result<String> {
    let (code, out, err) = lab.cli(bin, "http://127.0.0.1:8080", token, args)?;
    if code != 0 {
        bail!("gatekeeper {}: {}", args.join(" "), err.trim());
    }
    Ok(out)
}

fn indent(text: &str) -> String {
    text.trim_end().lines().map(|l| format!("      {l}")).collect::<Vec<_>>().join("\n")
}

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

    step(
        "Building the lab: four OT hosts and a Netskope publisher on a Linux bridge, each in its own network namespace",
    );
    let lab = Lab::new(&[("hmi", 1), ("eng", 2), ("npa", 5), ("plc1", 11), ("plc2", 12)])?;
    let names = [("hmi", "hmi-1"), ("eng", "eng-ws"), ("npa", "npa-pub"), ("plc1", "plc-1"), ("plc2", "plc-2")];
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

    // The Netskope tenant is a fake one in the appliance namespace (tests/src/netskope_fake.rs):
    // one private app for the PLCs, with a host an admin typed, and one publisher.
    let tenant = lab.netskope_tenant(NETSKOPE_TOKEN)?;
    let app = tenant.add_app("plc-access", &["historian.plant.local"], &[("tcp", "502")]);
    let publisher = tenant.add_publisher("npa-plant-1", "10.0.0.5");
    tenant.assign_publisher(app, publisher);
    let (admin, ns_token) = (lab.secret("admin.token", ADMIN_TOKEN)?, lab.secret("netskope.token", NETSKOPE_TOKEN)?);
    let extra = format!(
        "\n[api]\nlisten = \"127.0.0.1:8080\"\nadmin_token_file = {:?}\n\n[netskope]\ntenant_url = {:?}\ntoken_file = {:?}\n",
        admin.display().to_string(),
        tenant.url(),
        ns_token.display().to_string()
    );

    step("Starting gatekeeper on every bridge port with the sample OT policy (xtask/demo/policy.yaml)");
    let mut daemon = lab.start_daemon_with(&bin, POLICY, &extra)?;
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
    step(
        "Netskope One: users reach the PLCs through private app \"plc-access\" (publisher rules generated); its hosts follow the plc segment",
    );
    let cli = |args: &[&str]| cli(&lab, &bin, &admin, args);
    if !tenant.wait_for(Duration::from_secs(10), |t| t.requests().iter().any(|r| r.path.contains("publishers"))) {
        bail!("gatekeeper did not sync with the Netskope tenant:\n{}", daemon.log());
    }
    eprintln!("    $ gatekeeper netskope apps\n{}", indent(&cli(&["netskope", "apps"])?));
    let started = Instant::now();
    eprintln!(
        "    $ gatekeeper netskope map {app} plc\n{}",
        indent(&cli(&["netskope", "map", &app.to_string(), "plc"])?)
    );
    let in_step = |t: &FakeTenant| t.hosts(app).len() == 5;
    let synced = tenant.wait_for(Duration::from_secs(5), in_step);
    eprintln!("    private app hosts after {} ms: {}", started.elapsed().as_millis(), tenant.hosts(app).join(", "));
    wrong += usize::from(!synced);
    for (port, allow, what) in [(502, true, "Modbus/TCP"), (22, false, "SSH")] {
        let reach = lab.host("npa").tcp(
            lab.host("plc1").addr(false),
            port,
            Duration::from_millis(if allow { 3000 } else { 800 }),
        )?;
        let passed = reach != Reach::Silent;
        wrong += usize::from(passed != allow);
        eprintln!(
            "    npa-pub -> plc-1   {:<34} {:<8} {}{}",
            format!("{what} tcp/{port}"),
            if allow { "allow" } else { "deny" },
            if passed { "ALLOWED" } else { "BLOCKED" },
            if passed == allow { "" } else { "   <-- UNEXPECTED" }
        );
    }
    let started = Instant::now();
    eprintln!(
        "    $ gatekeeper untag plc-2 role      # plc-2 is taken out of service\n{}",
        indent(&cli(&["untag", "plc-2", "role"])?)
    );
    let gone = tenant.wait_for(Duration::from_secs(5), |t| !t.hosts(app).iter().any(|h| h == "10.0.0.12"));
    eprintln!(
        "    plc-2 left the private app after {} ms: {}  (the admin's historian.plant.local stays)",
        started.elapsed().as_millis(),
        tenant.hosts(app).join(", ")
    );
    wrong += usize::from(!gone);

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
    if log.contains(NETSKOPE_TOKEN) || log.contains(ADMIN_TOKEN) {
        bail!("a token reached the daemon's log");
    }
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
