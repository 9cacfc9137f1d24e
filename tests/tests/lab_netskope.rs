//! The Netskope integration in the lab: the real daemon, a fake tenant inside the appliance
//! namespace, real traffic. Publishers reach a mapped PLC through the bridge while other
//! clients stay blocked; a push pending during an outage survives `kill -9`; the token never
//! reaches the log. Needs root (network namespaces, XDP).

use std::time::Duration;

use gatekeeper_tests::lab::{Lab, Reach, Servers, gatekeeper_bin, in_netns};
use serde_json::{Value, json};

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(3);
const ADMIN: &str = "admin-secret-token-0002";
const NS_TOKEN: &str = "nsk-lab-secret-token-77a1c3";

const POLICY: &str = gatekeeper_tests::lab::HMI_PLC_POLICY;

/// A request to the daemon's API, made from inside the appliance namespace.
fn api(lab: &Lab, method: &'static str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("http://127.0.0.1:8081/api/v1{path}");
    in_netns(&lab.appliance, move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let auth = format!("Bearer {ADMIN}");
        let resp = match (method, body) {
            ("GET", _) => agent.get(&url).header("Authorization", &auth).call(),
            ("POST", b) => agent.post(&url).header("Authorization", &auth).send_json(b.unwrap_or(json!({}))),
            ("PUT", Some(b)) => agent.put(&url).header("Authorization", &auth).send_json(&b),
            ("PATCH", Some(b)) => agent.patch(&url).header("Authorization", &auth).send_json(&b),
            _ => panic!("bad call"),
        };
        let mut resp = resp.expect("API request");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    })
    .unwrap()
}

/// Runs the gatekeeper CLI inside the appliance namespace.
fn cli(lab: &Lab, token: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    lab.cli(&gatekeeper_bin().unwrap(), "http://127.0.0.1:8081", token, args).unwrap()
}

#[test]
fn publishers_reach_mapped_plcs_and_pushes_survive_a_crash() {
    let lab = Lab::new(&[("hmi", 1), ("eng", 2), ("pub", 5), ("plc1", 11)]).expect("lab (needs root, iproute2)");
    let _servers = Servers::start(lab.host("plc1"), &[22, 502], &[]).expect("echo servers");
    let tcp = |from: &str, port: u16, timeout| lab.host(from).tcp(lab.host("plc1").addr(false), port, timeout).unwrap();
    let bin = gatekeeper_bin().unwrap();

    let tenant = lab.netskope_tenant(NS_TOKEN).unwrap();
    let app = tenant.add_app("plc-access", &["plc.example.local"], &[("tcp", "502")]);
    let publisher = tenant.add_publisher("pub-lab", "10.0.0.5");
    tenant.assign_publisher(app, publisher);

    let (admin, ns_token) =
        (lab.secret("admin.token", ADMIN).unwrap(), lab.secret("netskope.token", NS_TOKEN).unwrap());
    let extra = format!(
        "\n[api]\nlisten = \"127.0.0.1:8081\"\nadmin_token_file = {:?}\n\n[netskope]\ntenant_url = {:?}\ntoken_file = {:?}\nsync_interval = \"1h\"\n",
        admin.display().to_string(),
        tenant.url(),
        ns_token.display().to_string()
    );
    let daemon = lab.start_daemon_with(&bin, POLICY, &extra).unwrap();
    let synced = tenant.wait_for(Duration::from_secs(10), |_| {
        api(&lab, "GET", "/integrations/netskope", None).1["last_sync"]["ok"] == true
    });
    assert!(synced, "no sync at start:\n{}", daemon.log());

    // Before the mapping the publisher is one more blocked client.
    assert_eq!(tcp("pub", 502, SHORT), Reach::Silent);
    // Mapped with the CLI, as an operator would.
    let (code, out, err) = cli(&lab, &admin, &["netskope", "apps"]);
    assert!(code == 0 && out.contains("plc-access") && out.contains("false"), "{out}{err}");
    let (code, _, err) = cli(&lab, &admin, &["netskope", "map", &app.to_string(), "nope"]);
    assert!(code == 1 && err.contains("unknown segment"), "{err}");
    let (code, out, err) = cli(&lab, &admin, &["netskope", "map", &app.to_string(), "plc"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(tcp("pub", 502, LONG), Reach::Echoed, "the publisher reaches the mapped PLC");
    assert_eq!(tcp("pub", 22, SHORT), Reach::Silent, "only on the app's ports");
    assert_eq!(tcp("eng", 502, SHORT), Reach::Silent, "other clients stay blocked");
    assert_eq!(tcp("hmi", 502, LONG), Reach::Echoed, "the user rules still apply");
    assert!(
        tenant.wait_for(Duration::from_secs(2), |t| t.hosts(app) == ["plc.example.local", "10.0.0.11"]),
        "{:?}",
        tenant.hosts(app)
    );

    // Netskope goes down, a PLC joins the segment, the daemon is killed before it can push.
    tenant.set_outage(true);
    let (st, _) = api(&lab, "PUT", "/assets/plc-9", Some(json!({"ips": ["10.0.0.19"], "tags": {"role": "plc"}})));
    assert_eq!(st, 200);
    std::thread::sleep(Duration::from_millis(1000));
    daemon.kill().unwrap();
    assert_eq!(tcp("pub", 502, LONG), Reach::Echoed, "pinned enforcement keeps the mapping's rules");
    assert_eq!(tcp("eng", 502, SHORT), Reach::Silent);
    tenant.set_outage(false);
    assert!(!tenant.hosts(app).contains(&"10.0.0.19".to_string()), "pushed during the outage?");

    // A new daemon delivers what was pending, and enforces the generated rules from the store.
    let daemon = lab.start_daemon_with(&bin, POLICY, &extra).unwrap();
    assert!(
        tenant.wait_for(Duration::from_secs(15), |t| t.hosts(app).contains(&"10.0.0.19".to_string())),
        "pending push lost across the restart: {:?}\n{}",
        tenant.hosts(app),
        daemon.log()
    );
    assert_eq!(tcp("pub", 502, LONG), Reach::Echoed);
    assert_eq!(tcp("eng", 502, SHORT), Reach::Silent);
    let (code, out, _) = cli(&lab, &admin, &["netskope", "status", "-o", "json"]);
    let status: Value = serde_json::from_str(&out).unwrap();
    assert!(code == 0 && status["token_set"] == true && !out.contains(NS_TOKEN), "{out}");
    let log = daemon.stop().unwrap();
    assert!(!log.contains(NS_TOKEN) && !log.contains(ADMIN), "a token reached the log");
    assert!(tenant.requests().iter().all(|r| r.token_ok), "every request carried the token");
    // The store keeps the API token's hash and neither token.
    let mut db = Vec::new();
    for f in ["state.db", "state.db-wal"] {
        db.extend(std::fs::read(lab.dir.join(f)).unwrap_or_default());
    }
    let contains = |needle: &[u8]| db.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(NS_TOKEN.as_bytes()) && !contains(ADMIN.as_bytes()), "a token is in the database");
    assert!(contains(gatekeeper::control::auth::token_hash(ADMIN).as_bytes()), "the admin token's hash is stored");
    lab.detach(&bin).unwrap();
}
