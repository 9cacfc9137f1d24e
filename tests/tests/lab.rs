//! Real traffic through the lab bridge with the daemon enforcing a policy file: TCP, UDP and
//! ICMP, IPv4 and IPv6, replies, monitor mode, reloads, cut sessions, rejected policies, and a
//! clean detach. Needs root (network namespaces, XDP).

use std::time::Duration;

use gatekeeper_tests::{
    lab::{Lab, RawSocket, Reach, Servers, echo, gatekeeper_bin},
    packet::{Frame, L4},
};

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(3);

const HOSTS: &[(&str, u8)] = &[("hmi", 1), ("eng", 2), ("plc1", 11), ("plc2", 12), ("hist", 20), ("office", 30)];

/// The lab policy; `hmi_tags` lets tests move the HMI in and out of its segment.
fn policy(hmi_tags: &str) -> String {
    format!(
        r#"
assets:
  - {{name: hmi-1, ips: [10.0.0.1, "fd00::1"], tags: {hmi_tags}}}
  - {{name: eng-ws, ips: [10.0.0.2, "fd00::2"], tags: {{role: eng}}}}
  - {{name: plc-1, ips: [10.0.0.11, "fd00::b"], tags: {{role: plc}}}}
  - {{name: plc-2, ips: [10.0.0.12, "fd00::c"], tags: {{role: plc}}}}
  - {{name: historian, ips: [10.0.0.20, "fd00::14"], tags: {{role: historian}}}}
segments:
  - {{name: hmi, selector: role=hmi, mode: label}}
  - {{name: eng, selector: role=eng, mode: label}}
  - {{name: plc, selector: role=plc, mode: enforce}}
  - {{name: historian, selector: role=historian, mode: monitor}}
rules:
  - {{name: hmi-modbus, from: hmi, to: plc, protocol: tcp, ports: [502]}}
  - {{name: hmi-enip-io, from: hmi, to: plc, protocol: udp, ports: [2222]}}
  - {{name: hmi-ping, from: hmi, to: plc, protocol: icmp}}
  - {{name: hmi-ping6, from: hmi, to: plc, protocol: icmpv6}}
  - {{name: plc-to-historian, from: plc, to: historian, protocol: tcp, ports: [4840]}}
"#
    )
}

const HMI: &str = "{role: hmi}";

struct Setup {
    lab: Lab,
    _servers: Vec<Servers>,
}

fn setup() -> Setup {
    let lab = Lab::new(HOSTS).expect("lab (needs root, iproute2)");
    let servers = ["plc1", "plc2", "hist", "office"]
        .iter()
        .map(|h| Servers::start(lab.host(h), &[22, 502, 4840], &[2222]).expect("echo servers"))
        .collect();
    Setup { lab, _servers: servers }
}

fn tcp(lab: &Lab, from: &str, to: &str, port: u16, v6: bool, timeout: Duration) -> Reach {
    lab.host(from).tcp(lab.host(to).addr(v6), port, timeout).expect("tcp attempt")
}

#[test]
fn enforces_segments_with_real_traffic_v4_and_v6() {
    let s = setup();
    let lab = &s.lab;
    // Before the daemon: everything reaches everything.
    assert_eq!(tcp(lab, "eng", "plc1", 502, false, LONG), Reach::Echoed);
    let daemon = lab.start_daemon(&gatekeeper_bin().unwrap(), &policy(HMI)).unwrap();
    assert_eq!(lab.xdp_attached().unwrap().len(), HOSTS.len(), "XDP on every bridge port");

    for v6 in [false, true] {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        // Allowed: HMI to PLC Modbus, with replies (the echo comes back).
        assert_eq!(tcp(lab, "hmi", "plc1", 502, v6, LONG), Reach::Echoed, "{fam} hmi->plc1:502");
        assert_eq!(tcp(lab, "hmi", "plc2", 502, v6, LONG), Reach::Echoed, "{fam} hmi->plc2:502");
        // Denied port to an allowed peer.
        assert_eq!(tcp(lab, "hmi", "plc1", 22, v6, SHORT), Reach::Silent, "{fam} hmi->plc1:22");
        // Engineering workstation has no rule.
        assert_eq!(tcp(lab, "eng", "plc1", 502, v6, SHORT), Reach::Silent, "{fam} eng->plc1:502");
        // Lateral movement between PLCs.
        assert_eq!(tcp(lab, "plc1", "plc2", 502, v6, SHORT), Reach::Silent, "{fam} plc1->plc2:502");
        assert_eq!(tcp(lab, "plc1", "plc2", 22, v6, SHORT), Reach::Silent, "{fam} plc1->plc2:22");
        // The PLC cannot open a connection back to the HMI (replies only).
        assert_eq!(tcp(lab, "plc1", "hmi", 502, v6, SHORT), Reach::Silent, "{fam} plc1->hmi:502");
        // UDP: allowed port with its reply; denied source.
        let udp = |from: &str, to: &str, t| lab.host(from).udp(lab.host(to).addr(v6), 2222, t).unwrap();
        assert_eq!(udp("hmi", "plc1", LONG), Reach::Echoed, "{fam} udp hmi->plc1:2222");
        assert_eq!(udp("eng", "plc1", SHORT), Reach::Silent, "{fam} udp eng->plc1:2222");
        // ICMP echo.
        assert!(lab.host("hmi").ping(lab.host("plc1").addr(v6)).unwrap(), "{fam} ping hmi->plc1");
        assert!(!lab.host("eng").ping(lab.host("plc1").addr(v6)).unwrap(), "{fam} ping eng->plc1");
        // Ungoverned traffic passes untouched.
        assert_eq!(tcp(lab, "eng", "office", 22, v6, LONG), Reach::Echoed, "{fam} eng->office (ungoverned)");
        // Monitor mode: not allowed, but passes.
        assert_eq!(tcp(lab, "eng", "hist", 4840, v6, LONG), Reach::Echoed, "{fam} eng->historian (monitor)");
        assert_eq!(tcp(lab, "plc1", "hist", 4840, v6, LONG), Reach::Echoed, "{fam} plc1->historian (allowed)");
    }
    let log = daemon.stop().unwrap();
    // The counters printed on exit saw the drops and the monitor-mode would-drops.
    let field = |name: &str| -> u64 {
        let line = log.lines().find(|l| l.contains("gatekeeper stopped")).expect("stop line");
        let v = line.split(&format!("{name}=")).nth(1).expect(name);
        v.split_whitespace().next().and_then(|n| n.parse().ok()).expect(name)
    };
    assert!(field("dropped") > 0 && field("would_drop") > 0, "{log}");
    // SIGTERM leaves enforcement in place: the program stays pinned on every port.
    assert_eq!(lab.xdp_attached().unwrap().len(), HOSTS.len(), "XDP detached on SIGTERM");
    assert_eq!(tcp(lab, "eng", "plc1", 502, false, SHORT), Reach::Silent, "denied traffic passes after SIGTERM");
    // `gatekeeper detach` removes it: no XDP left and traffic flows again.
    lab.detach(&gatekeeper_bin().unwrap()).unwrap();
    assert!(lab.xdp_attached().unwrap().is_empty(), "XDP still attached after detach");
    assert!(!lab.pin_dir().exists(), "pins left behind");
    assert_eq!(tcp(lab, "eng", "plc1", 502, false, LONG), Reach::Echoed);
}

#[test]
fn tag_change_on_reload_opens_and_cuts_established_sessions() {
    let s = setup();
    let lab = &s.lab;
    let mut daemon = lab.start_daemon(&gatekeeper_bin().unwrap(), &policy("{}")).unwrap();
    // Without its tag the HMI cannot reach the PLC.
    assert_eq!(tcp(lab, "hmi", "plc1", 502, false, SHORT), Reach::Silent);
    // Tag it: allowed after the reload.
    daemon.reload(&policy(HMI)).unwrap().unwrap();
    let plc = lab.host("plc1").addr(false);
    let mut session = lab.host("hmi").connect(plc, 502, LONG).unwrap().expect("connect after tagging");
    assert!(echo(&mut session, b"read coils\n", LONG), "established Modbus session works");
    let plc6 = lab.host("plc1").addr(true);
    let mut session6 = lab.host("hmi").connect(plc6, 502, LONG).unwrap().expect("connect v6 after tagging");
    assert!(echo(&mut session6, b"read coils\n", LONG));
    // A reload that keeps the HMI tagged keeps the session.
    daemon.reload(&policy("{role: hmi, site: plant-1}")).unwrap().unwrap();
    assert!(echo(&mut session, b"still here\n", LONG), "unrelated change keeps established sessions");
    // The HMI is compromised: remove its tag. The open session is cut at once.
    daemon.reload(&policy("{quarantine: 'yes'}")).unwrap().unwrap();
    assert!(!echo(&mut session, b"write coil\n", SHORT), "session survived the tag removal");
    assert!(!echo(&mut session6, b"write coil\n", SHORT), "IPv6 session survived the tag removal");
    assert_eq!(tcp(lab, "hmi", "plc1", 502, false, SHORT), Reach::Silent, "new sessions blocked too");
    daemon.stop().unwrap();
}

#[test]
fn broken_policy_on_reload_leaves_the_old_one_in_force() {
    let s = setup();
    let lab = &s.lab;
    let mut daemon = lab.start_daemon(&gatekeeper_bin().unwrap(), &policy(HMI)).unwrap();
    assert_eq!(tcp(lab, "hmi", "plc1", 502, false, LONG), Reach::Echoed);

    let broken = policy(HMI).replace("from: hmi, to: plc, protocol: tcp", "from: hmi, to: plcs, protocol: tcp");
    let err = daemon.reload(&broken).unwrap().expect_err("broken policy applied");
    assert!(err.contains("policy.yaml") && err.contains("rules[0] \"hmi-modbus\": to:"), "{err}");
    assert!(err.contains("unknown segment"), "{err}");
    let garbage = "assets: [ {name: x, ips: [10.0.0.1] ";
    let err = daemon.reload(garbage).unwrap().expect_err("garbage applied");
    assert!(err.contains("policy.yaml"), "{err}");
    let bad_cidr = policy(HMI).replace("10.0.0.11", "10.0.0.311");
    let err = daemon.reload(&bad_cidr).unwrap().expect_err("bad address applied");
    assert!(err.contains("10.0.0.311"), "{err}");

    // The old policy is still enforced, exactly.
    assert_eq!(tcp(lab, "hmi", "plc1", 502, false, LONG), Reach::Echoed);
    assert_eq!(tcp(lab, "eng", "plc1", 502, false, SHORT), Reach::Silent);
    assert_eq!(tcp(lab, "plc1", "plc2", 502, true, SHORT), Reach::Silent);
    daemon.stop().unwrap();
}

#[test]
fn daemon_refuses_to_start_on_a_broken_policy() {
    let lab = Lab::new(&[("a", 1), ("b", 2)]).unwrap();
    let err = lab.start_daemon(&gatekeeper_bin().unwrap(), "segments:\n  - {name: s, selector: 'role in (x'}\n");
    let msg = format!("{:#}", err.err().expect("daemon started with a broken policy"));
    assert!(msg.contains("selector") && msg.contains("segments[0]"), "{msg}");
    assert!(lab.xdp_attached().unwrap().is_empty(), "nothing attached");
}

/// Sends a TCP SYN from `from` to `to` in `vlans` tags and reports whether it reached `to`.
fn tagged_syn_arrives(
    lab: &Lab,
    from: &str,
    to: &str,
    v6: bool,
    vlans: &[(u16, u16)],
    sport: u16,
    wait: Duration,
) -> bool {
    let (src, dst) = (lab.host(from).addr(v6), lab.host(to).addr(v6));
    let mut frame = Frame::new(src, dst, L4::Tcp { sport, dport: 502 });
    frame.vlans = vlans.to_vec();
    let mut bytes = frame.build();
    bytes[..6].copy_from_slice(&[0xff; 6]); // broadcast: the bridge floods it to every port
    let octets = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    let watch = RawSocket::open(lab.host(to)).unwrap();
    RawSocket::open(lab.host(from)).unwrap().send(&bytes).unwrap();
    let ports = [sport.to_be_bytes(), 502u16.to_be_bytes()].concat();
    watch.saw(&[&octets(src), &octets(dst), &ports], wait)
}

#[test]
fn vlan_and_qinq_tagged_traffic_is_judged_like_untagged() {
    let lab = Lab::new(&[("hmi", 1), ("eng", 2), ("plc1", 11)]).unwrap();
    let q: &[(u16, u16)] = &[(0x8100, 100)];
    let qinq: &[(u16, u16)] = &[(0x88a8, 200), (0x8100, 10)];
    let triple: &[(u16, u16)] = &[(0x88a8, 200), (0x8100, 10), (0x8100, 11)];
    // Without gatekeeper the bridge forwards tagged frames (the baseline that makes the
    // negative checks below meaningful).
    assert!(tagged_syn_arrives(&lab, "eng", "plc1", false, qinq, 47000, LONG), "bridge does not forward QinQ");
    let policy = policy(HMI);
    let daemon = lab.start_daemon(&gatekeeper_bin().unwrap(), &policy).unwrap();
    let mut sport = 47001;
    for v6 in [false, true] {
        for tags in [q, qinq] {
            let what = format!("v6={v6} tags={tags:x?}");
            sport += 1;
            assert!(tagged_syn_arrives(&lab, "hmi", "plc1", v6, tags, sport, LONG), "allowed {what}");
            sport += 1;
            assert!(!tagged_syn_arrives(&lab, "eng", "plc1", v6, tags, sport, SHORT), "denied {what} got through");
        }
        // Three tags are more than the data plane parses: dropped, even from the HMI.
        sport += 1;
        assert!(!tagged_syn_arrives(&lab, "hmi", "plc1", v6, triple, sport, SHORT), "triple-tagged frame got through");
    }
    daemon.stop().unwrap();
}

#[test]
fn an_expiring_rule_stops_matching_without_a_reload() {
    let s = setup();
    let lab = &s.lab;
    let expires = chrono::Utc::now() + chrono::Duration::seconds(4);
    let policy = policy(HMI).replace(
        "{name: hmi-modbus, from: hmi, to: plc, protocol: tcp, ports: [502]}",
        &format!(
            "{{name: hmi-modbus, from: hmi, to: plc, protocol: tcp, ports: [502], expires: {}}}",
            expires.to_rfc3339()
        ),
    );
    let daemon = lab.start_daemon(&gatekeeper_bin().unwrap(), &policy).unwrap();
    let plc = lab.host("plc1").addr(false);
    let mut session = lab.host("hmi").connect(plc, 502, LONG).unwrap().expect("allowed before expiry");
    assert!(echo(&mut session, b"before\n", LONG));
    let wait = (expires - chrono::Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(800);
    std::thread::sleep(wait);
    assert!(!echo(&mut session, b"after\n", SHORT), "session outlived its rule");
    assert_eq!(tcp(lab, "hmi", "plc1", 502, false, SHORT), Reach::Silent, "expired rule still matches");
    assert!(daemon.log().contains("reason=\"rule expiry\""), "{}", daemon.log());
    daemon.stop().unwrap();
}

#[test]
fn idle_flows_age_out() {
    use gatekeeper_tests::lab::in_netns;
    use std::net::UdpSocket;
    let lab = Lab::new(&[("hmi", 1), ("plc1", 11)]).unwrap();
    let policy = "assets:\n  - {name: hmi, ips: [10.0.0.1], tags: {role: hmi}}\n  - {name: plc, ips: [10.0.0.11], tags: {role: plc}}\n\
segments:\n  - {name: hmi, selector: role=hmi, mode: label}\n  - {name: plc, selector: role=plc}\n\
rules:\n  - {name: io, from: hmi, to: plc, protocol: udp, ports: [2222]}\n";
    let daemon =
        lab.start_daemon_with(&gatekeeper_bin().unwrap(), policy, "[dataplane.flow_timeouts]\nudp = 2\n").unwrap();
    let hmi = in_netns(&lab.host("hmi").netns, || UdpSocket::bind("10.0.0.1:40000")).unwrap().unwrap();
    let plc = in_netns(&lab.host("plc1").netns, || UdpSocket::bind("10.0.0.11:2222")).unwrap().unwrap();
    hmi.set_read_timeout(Some(SHORT)).unwrap();
    plc.set_read_timeout(Some(LONG)).unwrap();
    let mut buf = [0u8; 16];
    // Unsolicited PLC -> HMI: no rule, no flow.
    plc.send_to(b"unsolicited", "10.0.0.1:40000").unwrap();
    assert!(hmi.recv_from(&mut buf).is_err(), "unsolicited datagram passed");
    // The HMI opens the flow; the PLC's answers ride on it.
    hmi.send_to(b"open", "10.0.0.11:2222").unwrap();
    assert!(plc.recv_from(&mut buf).is_ok(), "allowed datagram");
    plc.send_to(b"reply", "10.0.0.1:40000").unwrap();
    assert!(hmi.recv_from(&mut buf).is_ok(), "reply on the flow");
    std::thread::sleep(Duration::from_millis(500));
    plc.send_to(b"reply", "10.0.0.1:40000").unwrap();
    assert!(hmi.recv_from(&mut buf).is_ok(), "flow still alive after 0.5 s");
    // Idle past the 2 s UDP timeout: the flow is gone.
    std::thread::sleep(Duration::from_millis(3500));
    plc.send_to(b"late", "10.0.0.1:40000").unwrap();
    assert!(hmi.recv_from(&mut buf).is_err(), "reply passed after the flow idled out");
    daemon.stop().unwrap();
}

#[test]
fn daemon_names_an_interface_it_cannot_attach_to() {
    let lab = Lab::new(&[("a", 1), ("b", 2)]).unwrap();
    let config = lab.dir.join("bad.toml");
    let policy = lab.dir.join("p.yaml");
    std::fs::write(&policy, "segments: [{name: s, cidrs: [10.0.0.0/24]}]\n").unwrap();
    std::fs::write(
        &config,
        format!(
            "[dataplane]\ninterfaces = [\"p-a\", \"nosuch0\"]\npin_dir = {:?}\n[store]\npath = {:?}\n[policy]\nfile = {:?}\n",
            lab.pin_dir().display().to_string(),
            lab.dir.join("state.db").display().to_string(),
            policy.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", lab.appliance))
        .arg("--")
        .arg(gatekeeper_bin().unwrap())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("nosuch0"), "{stderr}");
    assert!(lab.xdp_attached().unwrap().is_empty(), "p-a left attached after the failure");
}

#[test]
fn kill_and_restart_keep_enforcing_without_a_gap() {
    let s = setup();
    let lab = &s.lab;
    let bin = gatekeeper_bin().unwrap();
    let daemon = lab.start_daemon(&bin, &policy(HMI)).unwrap();
    let plc = lab.host("plc1").addr(false);
    let mut session = lab.host("hmi").connect(plc, 502, LONG).unwrap().expect("allowed session");
    assert!(echo(&mut session, b"before\n", LONG));

    // kill -9: no clean-up at all. The pinned program keeps enforcing, flows included.
    daemon.kill().unwrap();
    assert_eq!(lab.xdp_attached().unwrap().len(), HOSTS.len(), "XDP gone with the daemon");
    assert!(echo(&mut session, b"daemon dead\n", LONG), "allowed session cut by the crash");
    assert_eq!(
        tcp(lab, "eng", "plc1", 502, false, SHORT),
        Reach::Silent,
        "denied traffic passes while the daemon is dead"
    );
    assert_eq!(
        tcp(lab, "hmi", "plc2", 502, false, LONG),
        Reach::Echoed,
        "new allowed session while the daemon is dead"
    );

    // A new daemon adopts the pinned maps and swaps its program onto the pinned links.
    let daemon = lab.start_daemon(&bin, &policy(HMI)).unwrap();
    let log = daemon.log();
    assert!(log.contains("adopted the pinned data plane"), "{log}");
    assert!(log.contains("mode=\"replaced\"") || log.contains("mode=replaced"), "{log}");
    assert_eq!(lab.xdp_attached().unwrap().len(), HOSTS.len());
    assert!(echo(&mut session, b"after restart\n", LONG), "allowed session cut by the restart");
    assert_eq!(tcp(lab, "eng", "plc1", 502, false, SHORT), Reach::Silent, "denied traffic passes after the restart");
    assert_eq!(tcp(lab, "plc1", "plc2", 502, true, SHORT), Reach::Silent);

    // A restart with a changed policy file enforces the new one (the old state is not kept).
    daemon.kill().unwrap();
    let daemon = lab.start_daemon(&bin, &policy("{role: eng}")).unwrap();
    assert!(!echo(&mut session, b"hmi untagged\n", SHORT), "session of an untagged HMI survived the restart");
    assert_eq!(tcp(lab, "hmi", "plc1", 502, false, SHORT), Reach::Silent);
    daemon.stop().unwrap();
    lab.detach(&bin).unwrap();
    assert!(lab.xdp_attached().unwrap().is_empty());
}

#[test]
fn incompatible_pins_are_replaced_cleanly() {
    let s = setup();
    let lab = &s.lab;
    let bin = gatekeeper_bin().unwrap();
    // A stale pin of an incompatible map where ours would go: never reused.
    let daemon = lab.start_daemon(&bin, &policy(HMI)).unwrap();
    daemon.kill().unwrap();
    let flows = gatekeeper::dataplane::pin_version_dir(&lab.pin_dir()).join("maps/GK_FLOWS_V4");
    assert!(flows.exists());
    // Restart with a different flow-table size: the pinned maps no longer fit.
    let daemon = lab.start_daemon_with(&bin, &policy(HMI), "flow_table_size = 4096\n").unwrap();
    let log = daemon.log();
    assert!(log.contains("incompatible"), "{log}");
    assert!(!log.contains("adopted the pinned data plane"), "{log}");
    assert_eq!(lab.xdp_attached().unwrap().len(), HOSTS.len());
    assert_eq!(tcp(lab, "hmi", "plc1", 502, false, LONG), Reach::Echoed);
    assert_eq!(tcp(lab, "eng", "plc1", 502, false, SHORT), Reach::Silent);
    daemon.stop().unwrap();
    lab.detach(&bin).unwrap();
}

/// Runs the gatekeeper CLI inside the appliance namespace (where the API listens).
fn cli(lab: &Lab, token: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    lab.cli(&gatekeeper_bin().unwrap(), "http://127.0.0.1:8080", token, args).unwrap()
}

#[test]
fn api_and_cli_drive_the_data_plane_with_real_traffic() {
    let s = setup();
    let lab = &s.lab;
    let admin = lab.secret("admin.token", "admin-secret-token-0001").unwrap();
    let reader = lab.secret("reader.token", "reader-secret-token-0001").unwrap();
    let extra = format!(
        "\n[api]\nlisten = \"127.0.0.1:8080\"\nadmin_token_file = {:?}\nreader_token_file = {:?}\n",
        admin.display().to_string(),
        reader.display().to_string()
    );
    let daemon = lab.start_daemon_with(&gatekeeper_bin().unwrap(), &policy("{}"), &extra).unwrap();
    assert!(daemon.log().contains("API listening"), "{}", daemon.log());
    assert_eq!(tcp(lab, "hmi", "plc1", 502, false, SHORT), Reach::Silent);

    // A tag through the CLI (a merge patch) opens Modbus for real traffic.
    let (code, out, err) = cli(lab, &admin, &["tag", "hmi-1", "role=hmi"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(tcp(lab, "hmi", "plc1", 502, false, LONG), Reach::Echoed, "PATCH did not open the flow");
    let mut session = lab.host("hmi").connect(lab.host("plc1").addr(true), 502, LONG).unwrap().expect("v6 session");
    assert!(echo(&mut session, b"x\n", LONG));
    let (code, out, _) = cli(lab, &admin, &["get", "assets", "-o", "json"]);
    assert_eq!(code, 0);
    let assets: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(assets[0]["tags"]["role"], "hmi");

    // A reader token cannot write; nothing changes.
    let (code, _, err) = cli(lab, &reader, &["untag", "hmi-1", "role"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("403"), "{err}");
    assert!(echo(&mut session, b"y\n", LONG));
    let (code, out, _) = cli(lab, &reader, &["get", "rules"]);
    assert_eq!(code, 0);
    assert!(out.contains("hmi-modbus") && out.starts_with("NAME"), "{out}");

    // Untag: the open session is cut at once.
    let (code, _, err) = cli(lab, &admin, &["untag", "hmi-1", "role"]);
    assert_eq!(code, 0, "{err}");
    assert!(!echo(&mut session, b"z\n", SHORT), "session survived the untag");

    // A refused apply: exit 1, the problems listed, nothing changed.
    let bad = lab.dir.join("bad.yaml");
    std::fs::write(&bad, "rules:\n  - {name: r, from: nowhere, to: plc}\n").unwrap();
    let (code, _, err) = cli(lab, &admin, &["apply", "-f", &bad.display().to_string()]);
    assert_eq!(code, 1);
    assert!(err.contains("422") && err.contains("unknown segment \"nowhere\""), "{err}");
    let (code, out, _) = cli(lab, &admin, &["status"]);
    assert!(code == 0 && out.contains("epoch") && out.contains("p-plc1"), "{out}");
    let (code, out, _) = cli(lab, &admin, &["audit"]);
    assert!(code == 0 && out.contains("patch asset") && out.contains("admin"), "{out}");
    // Nothing listening: exit 3.
    let out = std::process::Command::new(gatekeeper_bin().unwrap())
        .args(["--api", "http://127.0.0.1:9", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    daemon.stop().unwrap();
}

#[test]
fn pins_of_an_older_layout_are_taken_over() {
    let s = setup();
    let lab = &s.lab;
    let bin = gatekeeper_bin().unwrap();
    let daemon = lab.start_daemon(&bin, &policy(HMI)).unwrap();
    daemon.kill().unwrap();
    // Make the running enforcement look like an older version's: its pins under v0/.
    let current = gatekeeper::dataplane::pin_version_dir(&lab.pin_dir());
    let old = lab.pin_dir().join("v0");
    std::fs::rename(&current, &old).unwrap();
    assert_eq!(tcp(lab, "eng", "plc1", 502, false, SHORT), Reach::Silent, "the old program still enforces");
    let daemon = lab.start_daemon(&bin, &policy(HMI)).unwrap();
    let log = daemon.log();
    assert!(!log.contains("adopted the pinned data plane"), "{log}");
    assert!(
        log.contains("mode=\"replaced\"") || log.contains("mode=replaced"),
        "the old links were not taken over: {log}"
    );
    assert_eq!(lab.xdp_attached().unwrap().len(), HOSTS.len(), "one program per port");
    assert!(!old.join("links/p-plc1").exists(), "old link pins left behind");
    assert_eq!(tcp(lab, "hmi", "plc1", 502, false, LONG), Reach::Echoed);
    assert_eq!(tcp(lab, "eng", "plc1", 502, false, SHORT), Reach::Silent);
    daemon.stop().unwrap();
    lab.detach(&bin).unwrap();
    assert!(lab.xdp_attached().unwrap().is_empty());
}
