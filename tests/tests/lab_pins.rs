//! Where the daemon pins, and who may use the pins: a daemon whose pins would die with it (started
//! with `ip netns exec`, which gives it a private mount namespace with a fresh /sys) refuses to
//! start unless `ephemeral = true`, and then never claims that enforcement stays; a bpffs mounted
//! in the host's mount namespace outside /sys works under `ip netns exec` and survives `kill -9`;
//! a second daemon on the same `pin_dir` refuses to start naming the first one's pid, with the
//! first one still enforcing; `gatekeeper detach` refuses while a daemon runs. Needs root.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use gatekeeper_tests::lab::{Daemon, DaemonSpec, Exited, Lab, Launcher, Reach, Servers, gatekeeper_bin};

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(3);

const HOSTS: &[(&str, u8)] = &[("hmi", 1), ("eng", 2), ("plc1", 11)];

/// The HMI may reach the PLC's Modbus port; the engineering workstation may not.
const POLICY: &str = r#"
assets:
  - {name: hmi-1, ips: [10.0.0.1], tags: {role: hmi}}
  - {name: eng-ws, ips: [10.0.0.2], tags: {role: eng}}
  - {name: plc-1, ips: [10.0.0.11], tags: {role: plc}}
segments:
  - {name: hmi, selector: role=hmi, mode: label}
  - {name: eng, selector: role=eng, mode: label}
  - {name: plc, selector: role=plc, mode: enforce}
rules:
  - {name: hmi-modbus, from: hmi, to: plc, protocol: tcp, ports: [502]}
"#;

/// [`POLICY`] plus a rule that lets the engineering workstation in too.
fn open_policy() -> String {
    format!("{POLICY}  - {{name: eng-modbus, from: eng, to: plc, protocol: tcp, ports: [502]}}\n")
}

struct Setup {
    lab: Lab,
    _servers: Servers,
}

fn setup() -> Setup {
    let lab = Lab::new(HOSTS).expect("lab (needs root, iproute2)");
    let servers = Servers::start(lab.host("plc1"), &[502], &[]).expect("echo servers");
    Setup { lab, _servers: servers }
}

fn tcp(lab: &Lab, from: &str, to: &str, timeout: Duration) -> Reach {
    lab.host(from).tcp(lab.host(to).addr(false), 502, timeout).expect("tcp attempt")
}

fn started(r: Result<Daemon, Exited>) -> Daemon {
    match r {
        Ok(d) => d,
        Err(e) => panic!("the daemon did not start ({}):\n{}", e.status, e.log),
    }
}

fn refused(r: Result<Daemon, Exited>, what: &str) -> Exited {
    match r {
        Ok(d) => {
            let log = d.log();
            drop(d);
            panic!("{what}; log:\n{log}")
        }
        Err(e) => e,
    }
}

/// Waits (up to 5 s: the kernel releases links asynchronously) until no port shows a program.
fn wait_detached(lab: &Lab, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attached = lab.xdp_attached().unwrap();
        if attached.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "{why}: XDP still attached after 5 s: {attached:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_daemon_under_ip_netns_exec_refuses_to_start_unless_ephemeral() {
    let s = setup();
    let lab = &s.lab;
    let bin = gatekeeper_bin().unwrap();
    assert_eq!(tcp(lab, "eng", "plc1", LONG), Reach::Echoed, "before any daemon");

    // Its pins would be in a bpffs of its own private mount namespace, gone when it stops.
    let spec = DaemonSpec { name: "netns-exec", launcher: Launcher::IpNetnsExec, ..DaemonSpec::default() };
    let exited = refused(
        lab.try_start_daemon(&bin, POLICY, spec).unwrap(),
        "the daemon started under `ip netns exec`, where its pins die with it",
    );
    let log = &exited.log;
    assert!(!exited.status.success(), "{}: {log}", exited.status);
    for needed in ["refusing to pin", "mount namespace", "ip netns exec", "nsenter --net=", "ephemeral = true"] {
        assert!(log.contains(needed), "the refusal does not say {needed:?}:\n{log}");
    }
    assert!(!log.contains("mounted bpffs"), "mounted a bpffs before refusing:\n{log}");
    // The network is untouched.
    assert!(lab.xdp_attached().unwrap().is_empty(), "XDP attached by a refused daemon");
    assert_eq!(tcp(lab, "eng", "plc1", LONG), Reach::Echoed, "traffic changed by a refused daemon");

    // Asked for explicitly, ephemeral enforcement starts and enforces while the daemon runs.
    let spec = || DaemonSpec {
        name: "ephemeral",
        extra: "ephemeral = true",
        launcher: Launcher::IpNetnsExec,
        ..DaemonSpec::default()
    };
    let daemon = started(lab.try_start_daemon(&bin, POLICY, spec()).unwrap());
    assert_eq!(lab.xdp_attached().unwrap().len(), HOSTS.len(), "XDP on every bridge port");
    assert_eq!(tcp(lab, "hmi", "plc1", LONG), Reach::Echoed, "allowed traffic (ephemeral)");
    assert_eq!(tcp(lab, "eng", "plc1", SHORT), Reach::Silent, "denied traffic passes (ephemeral)");
    // On SIGTERM it says that enforcement ends, and it does.
    let log = daemon.stop().unwrap();
    assert!(!log.contains("enforcement stays"), "an ephemeral daemon claims enforcement stays:\n{log}");
    assert!(log.contains("enforcement ends with this process"), "{log}");
    wait_detached(lab, "after an ephemeral daemon's SIGTERM");
    assert_eq!(tcp(lab, "eng", "plc1", LONG), Reach::Echoed, "after an ephemeral daemon stopped");
    // kill -9 ends it too: ephemeral means exactly as long as the process.
    let daemon = started(lab.try_start_daemon(&bin, POLICY, spec()).unwrap());
    assert_eq!(tcp(lab, "eng", "plc1", SHORT), Reach::Silent, "denied traffic passes (ephemeral, restarted)");
    daemon.kill().unwrap();
    wait_detached(lab, "after an ephemeral daemon's kill -9");
    assert!(!lab.pin_dir().exists(), "an ephemeral daemon pinned");
}

/// A bpffs mounted in the test's (the host's) mount namespace; unmounted on drop, which
/// releases every pin in it.
struct HostBpffs(PathBuf);

impl HostBpffs {
    fn mount(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir).output().unwrap();
        assert!(out.status.success(), "mount -t bpf: {}", String::from_utf8_lossy(&out.stderr));
        Self(dir.to_path_buf())
    }
}

impl Drop for HostBpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_host_bpffs_outside_sys_keeps_enforcing_after_kill_under_ip_netns_exec() {
    let s = setup();
    let lab = &s.lab;
    let bin = gatekeeper_bin().unwrap();
    // The fix the refusal suggests: a bpffs mounted in the host's mount namespace, outside /sys
    // (which `ip netns exec` replaces), is the same bpffs in the daemon's private namespace.
    let bpffs = HostBpffs::mount(&lab.dir.join("bpffs"));
    let pin_dir = bpffs.0.join("gatekeeper");
    let spec = DaemonSpec {
        name: "host-bpffs",
        launcher: Launcher::IpNetnsExec,
        pin_dir: Some(pin_dir.clone()),
        ..Default::default()
    };
    let daemon = started(lab.try_start_daemon(&bin, POLICY, spec).unwrap());
    assert_eq!(tcp(lab, "eng", "plc1", SHORT), Reach::Silent, "denied traffic passes");
    daemon.kill().unwrap();
    // kill -9: the pins, the program and the policy stay.
    assert_eq!(lab.xdp_attached().unwrap().len(), HOSTS.len(), "XDP gone with a daemon under ip netns exec");
    assert_eq!(tcp(lab, "eng", "plc1", SHORT), Reach::Silent, "denied traffic passes after kill -9");
    assert_eq!(tcp(lab, "hmi", "plc1", LONG), Reach::Echoed, "allowed traffic after kill -9");
    let out = Command::new(&bin).args(["detach", "--pin-dir"]).arg(&pin_dir).output().unwrap();
    assert!(out.status.success(), "detach: {}", String::from_utf8_lossy(&out.stderr));
    wait_detached(lab, "after detach");
    assert_eq!(tcp(lab, "eng", "plc1", LONG), Reach::Echoed, "after detach");
}

#[test]
fn a_second_daemon_on_the_same_pin_dir_is_refused_and_the_first_keeps_enforcing() {
    let s = setup();
    let lab = &s.lab;
    let bin = gatekeeper_bin().unwrap();
    let mut first = lab.start_daemon(&bin, POLICY).unwrap();
    let pid = first.pid().expect("first daemon's pid");
    assert_eq!(tcp(lab, "eng", "plc1", SHORT), Reach::Silent, "denied traffic passes");

    // Another daemon, with its own store and a policy that lets the workstation in, on the same
    // pin directory: refused before it touches a pin, naming the first one.
    let second = || DaemonSpec { name: "second", extra: "detach_on_exit = true", ..DaemonSpec::default() };
    let exited = refused(
        lab.try_start_daemon(&bin, &open_policy(), second()).unwrap(),
        "a second daemon started on the same pin_dir",
    );
    let log = &exited.log;
    assert!(!exited.status.success(), "{}: {log}", exited.status);
    assert!(log.contains(&format!("pid {pid}")), "the refusal does not name the first daemon's pid {pid}:\n{log}");
    assert!(log.contains("pin_dir") && log.contains(&lab.pin_dir().display().to_string()), "{log}");
    assert!(!log.contains("adopted the pinned data plane"), "{log}");
    // The first daemon still enforces its own policy and still answers.
    assert_eq!(lab.xdp_attached().unwrap().len(), HOSTS.len());
    assert_eq!(tcp(lab, "eng", "plc1", SHORT), Reach::Silent, "denied traffic passes after the second daemon");
    assert_eq!(tcp(lab, "hmi", "plc1", LONG), Reach::Echoed, "allowed traffic after the second daemon");
    first.reload(POLICY).unwrap().expect("the first daemon reloads");

    // `gatekeeper detach` while the daemon runs is refused too, naming it; nothing changes.
    let out = Command::new(&bin).args(["detach", "--pin-dir"]).arg(lab.pin_dir()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "detach removed a running daemon's pins: {stderr}");
    assert!(stderr.contains(&format!("pid {pid}")) && stderr.contains("stop it first"), "{stderr}");
    assert!(lab.pin_dir().exists(), "pins removed under a running daemon");
    assert_eq!(tcp(lab, "eng", "plc1", SHORT), Reach::Silent, "denied traffic passes after a refused detach");

    // Once the first has stopped (its enforcement stays), the second may take over.
    let log = first.stop().unwrap();
    assert!(log.contains("enforcement stays in place"), "{log}");
    assert_eq!(tcp(lab, "eng", "plc1", SHORT), Reach::Silent, "denied traffic passes after SIGTERM");
    let second = started(lab.try_start_daemon(&bin, &open_policy(), second()).unwrap());
    assert!(second.log().contains("adopted the pinned data plane"), "{}", second.log());
    assert_eq!(tcp(lab, "eng", "plc1", LONG), Reach::Echoed, "the second daemon's policy is not enforced");
    // The daemon holding the lock removes its own pins on the way out (`detach_on_exit`).
    let log = second.stop().unwrap();
    assert!(log.contains("detached; gatekeeper stopped"), "{log}");
    assert!(!lab.pin_dir().exists(), "pins left behind by detach_on_exit");
    wait_detached(lab, "after detach_on_exit");
    assert_eq!(tcp(lab, "eng", "plc1", LONG), Reach::Echoed, "after detach_on_exit");
}
