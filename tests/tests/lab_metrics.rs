//! `/metrics` on the metrics listener (`[metrics] listen`, no token) of a lab daemon: counters
//! move by exactly the packets a known burst sent, per interface, verdict and reason, per rule
//! and per segment. Needs root (network namespaces, XDP).

use std::{collections::BTreeMap, net::UdpSocket, time::Duration};

use gatekeeper_tests::lab::{Lab, Reach, Servers, gatekeeper_bin, in_netns};

const POLICY: &str = r#"
assets:
  - {name: hmi-1, ips: [10.0.0.1], tags: {role: hmi}}
  - {name: plc-1, ips: [10.0.0.11], tags: {role: plc}}
  - {name: hist-1, ips: [10.0.0.20], tags: {role: historian}}
segments:
  - {name: hmi, selector: role=hmi, mode: label}
  - {name: plc, selector: role=plc, mode: enforce}
  - {name: historian, selector: role=historian, mode: monitor}
rules:
  - {name: hmi-modbus, from: hmi, to: plc, protocol: tcp, ports: [502]}
"#;

/// Inside the appliance's own network namespace, so no port of the machine is taken.
const METRICS: &str = "127.0.0.1:9469";

/// One sample: metric name and labels.
type Key = (String, BTreeMap<String, String>);

/// Parses the text exposition into samples (comments skipped).
fn parse(text: &str) -> BTreeMap<Key, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').expect("a sample line has a value");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once("=\"").expect("label=\"value\"");
                (k.to_string(), v.trim_end_matches('"').to_string())
            })
            .collect();
        out.insert((name.to_string(), labels), value.parse().expect("a number"));
    }
    out
}

fn scrape(lab: &Lab) -> BTreeMap<Key, f64> {
    let text = in_netns(&lab.appliance, || -> anyhow::Result<String> {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut resp = agent.get(&format!("http://{METRICS}/metrics")).call()?;
        anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
        Ok(resp.body_mut().read_to_string()?)
    })
    .expect("netns")
    .expect("scrape without a token");
    parse(&text)
}

fn value(m: &BTreeMap<Key, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    m.get(&(name.to_string(), labels.clone())).copied().unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

/// Sends `n` UDP datagrams of `payload` bytes from `from` (bound address) to `to`.
fn burst(lab: &Lab, host: &str, from: &str, to: &str, n: usize, payload: usize) {
    let (from, to) = (from.to_string(), to.to_string());
    in_netns(&lab.host(host).netns, move || -> std::io::Result<()> {
        let s = UdpSocket::bind(&from)?;
        for _ in 0..n {
            s.send_to(&vec![0x5a; payload], &to)?;
            // Paced, so no datagram waits on ARP resolution and is dropped by the kernel first.
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    })
    .expect("netns")
    .expect("send the burst");
}

#[test]
fn counters_move_by_exactly_the_packets_sent() {
    let lab = Lab::new(&[("hmi", 1), ("plc", 11), ("hist", 20)]).expect("lab");
    let gatekeeper = gatekeeper_bin().expect("gatekeeper binary");
    let daemon =
        lab.start_daemon_with(&gatekeeper, POLICY, &format!("\n[metrics]\nlisten = \"{METRICS}\"\n")).expect("daemon");
    let servers = Servers::start(lab.host("plc"), &[502], &[]).expect("servers");
    // Resolve the neighbours first (ARP is counted as non_ip, outside what is compared).
    // (Pings to the PLC are dropped, to the historian would be: each resolves ARP all the same.)
    let _ = lab.host("hmi").ping(lab.host("plc").addr(false)).expect("ping");
    let _ = lab.host("hmi").ping(lab.host("hist").addr(false)).expect("ping");
    std::thread::sleep(Duration::from_millis(200));

    let before = scrape(&lab);
    let drop_default = [("interface", "p-hmi"), ("verdict", "drop"), ("reason", "default_deny")];
    let would_drop = [("interface", "p-hmi"), ("verdict", "would_drop"), ("reason", "default_deny")];
    // 37 datagrams no rule allows into the PLC segment (enforce): dropped.
    const DENIED: usize = 37;
    const PAYLOAD: usize = 100;
    burst(&lab, "hmi", "10.0.0.1:40001", "10.0.0.11:9999", DENIED, PAYLOAD);
    // 11 into the historian segment (monitor): would be dropped, pass.
    const WOULD: usize = 11;
    burst(&lab, "hmi", "10.0.0.1:40002", "10.0.0.20:9999", WOULD, PAYLOAD);
    // One allowed TCP connection: its SYN is the only packet the rule decides.
    let reach = lab.host("hmi").tcp(lab.host("plc").addr(false), 502, Duration::from_secs(3)).expect("tcp");
    assert!(matches!(reach, Reach::Echoed), "the allowed connection works: {reach:?}");
    std::thread::sleep(Duration::from_millis(200));
    let after = scrape(&lab);

    let moved = |name: &str, labels: &[(&str, &str)]| value(&after, name, labels) - value(&before, name, labels);
    assert_eq!(moved("gatekeeper_packets_total", &drop_default), DENIED as f64, "dropped packets on p-hmi");
    // Ethernet 14 + IPv4 20 + UDP 8 + payload, per frame.
    let frame = (14 + 20 + 8 + PAYLOAD) as f64;
    assert_eq!(moved("gatekeeper_bytes_total", &drop_default), DENIED as f64 * frame, "dropped bytes on p-hmi");
    assert_eq!(moved("gatekeeper_packets_total", &would_drop), WOULD as f64, "would-drop packets on p-hmi");
    assert_eq!(
        moved("gatekeeper_segment_drops_total", &[("segment", "plc"), ("verdict", "drop")]),
        DENIED as f64,
        "drops charged to the PLC segment"
    );
    // The historian answers the datagrams it is let through with ICMP port unreachable (rate
    // limited by its kernel), which no rule allows either: its would-drops are charged to its
    // own segment, the governed side.
    let replies = moved(
        "gatekeeper_packets_total",
        &[("interface", "p-hist"), ("verdict", "would_drop"), ("reason", "default_deny")],
    );
    assert!(replies >= 1.0, "the historian's port-unreachable replies");
    assert_eq!(
        moved("gatekeeper_segment_drops_total", &[("segment", "historian"), ("verdict", "would_drop")]),
        WOULD as f64 + replies,
        "would-drops charged to the historian segment: the datagrams to it and its replies"
    );
    assert_eq!(moved("gatekeeper_segment_drops_total", &[("segment", "plc"), ("verdict", "would_drop")]), 0.0);
    assert_eq!(moved("gatekeeper_rule_hits_total", &[("rule", "hmi-modbus")]), 1.0, "the SYN, decided by the rule");
    // Nothing arrived on the PLC's port that policy dropped: the replies were the flow's.
    assert_eq!(
        moved("gatekeeper_packets_total", &[("interface", "p-plc"), ("verdict", "drop"), ("reason", "default_deny")]),
        0.0
    );
    assert!(
        moved("gatekeeper_packets_total", &[("interface", "p-plc"), ("verdict", "pass"), ("reason", "flow")]) >= 1.0
    );

    // The gauges the dashboard and the alerts rely on.
    for port in ["p-hmi", "p-plc", "p-hist"] {
        let attached: Vec<_> = after
            .iter()
            .filter(|((n, l), v)| {
                n == "gatekeeper_xdp_attached" && l.get("interface").map(String::as_str) == Some(port) && **v == 1.0
            })
            .collect();
        assert_eq!(attached.len(), 1, "{port} attached once, with its mode");
    }
    assert_eq!(value(&after, "gatekeeper_assets", &[]), 3.0);
    assert_eq!(value(&after, "gatekeeper_segments", &[]), 3.0);
    assert_eq!(value(&after, "gatekeeper_rules", &[]), 1.0);
    assert_eq!(value(&after, "gatekeeper_segment_members", &[("segment", "plc")]), 1.0);
    assert_eq!(value(&after, "gatekeeper_map_entries", &[("map", "hosts_v4")]), 3.0);
    assert!(value(&after, "gatekeeper_map_capacity", &[("map", "hosts_v4")]) > 3.0);
    assert!(value(&after, "gatekeeper_flow_capacity", &[("family", "ipv4")]) > 0.0);
    assert_eq!(value(&after, "gatekeeper_last_apply_success", &[]), 1.0);
    assert!(value(&after, "gatekeeper_applies_total", &[("result", "ok")]) >= 1.0);
    assert!(value(&after, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(value(&after, "process_open_fds", &[]) > 0.0);

    drop(servers);
    daemon.stop().expect("stop");
}
