//! The Netskope integration end to end against the fake tenant: import, mapping, membership
//! pushes within 2 s, admin hosts untouched, generated rules in the data plane, outages and
//! rate limits delaying but never losing updates (also across a restart), drift correction,
//! Netskope's limits reported, and the token never shown. Runs over the XDP program as root,
//! over the in-memory data plane otherwise (see `gatekeeper_tests::control`).

use std::time::{Duration, Instant};

use gatekeeper::{
    control::{Handle, auth::Tokens},
    daemon::http_router,
};
use gatekeeper_tests::{
    netskope_fake::{Failure, FakeTenant},
    packet::{Frame, L4},
};
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-0123456789";
const NS_TOKEN: &str = "nsk-secret-token-4f1c9a7e2b";

struct Server {
    base: String,
    control: Handle,
    agent: ureq::Agent,
    rt: Option<tokio::runtime::Runtime>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// A daemon over `store_path` as `gatekeeper run` builds it: the stored integration is
    /// loaded and enforced, and the Netskope worker runs.
    fn start(store_path: &std::path::Path) -> Self {
        let control = gatekeeper_tests::control::control(store_path);
        let worker = Some(gatekeeper::netskope_sync::spawn(control.clone()).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let r =
            http_router(&control, &Tokens::admin_reader(Some(ADMIN), None), gatekeeper::config::DEFAULT_MAX_BODY_BYTES)
                .unwrap();
        rt.spawn(async move { axum::serve(listener, r).await });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(150)))
            .build()
            .into();
        Self { base, control, agent, rt: Some(rt), worker }
    }

    /// Stops the API and the worker, as a killed daemon would (nothing is flushed).
    fn kill(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        // The worker ends when its channel closes; wait for it, so nothing of this "daemon"
        // can still reach Netskope.
        self.control.lock().netskope_disconnect();
        if let Some(w) = self.worker.take() {
            w.join().unwrap();
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {ADMIN}");
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &auth).call(),
            ("PUT", Some(b)) => self.agent.put(&url).header("Authorization", &auth).send_json(&b),
            ("PATCH", Some(b)) => self.agent.patch(&url).header("Authorization", &auth).send_json(&b),
            ("POST", b) => self.agent.post(&url).header("Authorization", &auth).send_json(b.unwrap_or(json!({}))),
            _ => panic!("bad call"),
        };
        let mut resp = resp.expect("request");
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap_or_default())
    }

    fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (st, text) = self.call(method, &format!("/api/v1{path}"), body);
        (st, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (st, v) = self.api(method, path, body);
        assert!((200..300).contains(&st), "{method} {path}: {st} {v}");
        v
    }

    fn verdict(&self, src: &str, dst: &str, dport: u16) -> u32 {
        let f = Frame::new(src.parse().unwrap(), dst.parse().unwrap(), L4::Tcp { sport: 40000, dport }).build();
        self.control.lock().enforcer().dataplane().test_run(&f).unwrap()
    }
}

fn store_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gk-netskope-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("state.db")
}

/// Assets, segments and one user rule; returns the fake app's id.
fn seed(s: &Server, tenant: &FakeTenant) -> u64 {
    for (name, ip, role) in [
        ("hmi-1", "10.0.0.1", "hmi"),
        ("plc-1", "10.0.0.11", "plc"),
        ("plc-2", "10.0.0.12", "spare"),
        ("eng-1", "10.0.0.2", "eng"),
    ] {
        s.ok("PUT", &format!("/assets/{name}"), Some(json!({"ips": [ip], "tags": {"role": role}})));
    }
    s.ok("PUT", "/segments/hmi", Some(json!({"selector": "role=hmi", "mode": "label"})));
    s.ok("PUT", "/segments/plc", Some(json!({"selector": "role=plc", "mode": "enforce"})));
    s.ok("PUT", "/rules/modbus", Some(json!({"from": "hmi", "to": "plc", "protocol": "tcp", "ports": [502]})));
    let app = tenant.add_app("plc-access", &["plc.example.local", "10.0.0.11"], &[("tcp", "22,502"), ("udp", "161")]);
    let publisher = tenant.add_publisher("pub-plant-1", "192.0.2.5");
    tenant.assign_publisher(app, publisher);
    app
}

fn configure(s: &Server, tenant: &FakeTenant) {
    let v = s.ok(
        "PUT",
        "/integrations/netskope",
        Some(json!({"tenant_url": tenant.url(), "token": NS_TOKEN, "sync_interval": "1h"})),
    );
    assert_eq!(v["token_set"], true);
    let v = s.ok("POST", "/integrations/netskope/sync", None);
    assert_eq!(v["ok"], true, "{v}");
}

fn has(tenant: &FakeTenant, app: u64, host: &str, want: bool, within: Duration) -> bool {
    tenant.wait_for(within, |t| t.hosts(app).iter().any(|h| h == host) == want)
}

#[test]
fn private_apps_follow_segment_membership() {
    let tenant = FakeTenant::start(NS_TOKEN);
    let path = store_path("follow");
    let s = Server::start(&path);
    let app = seed(&s, &tenant);
    configure(&s, &tenant);

    // Imported inactive, the name without Netskope's brackets.
    let apps = s.ok("GET", "/integrations/netskope/apps", None);
    let a = &apps.as_array().unwrap()[0];
    assert_eq!((a["id"].as_u64(), a["name"].as_str()), (Some(app), Some("plc-access")));
    assert_eq!(a["mapping"]["active"], false);
    assert_eq!(a["hosts"], json!(["plc.example.local", "10.0.0.11"]));
    let sug = s.ok("GET", &format!("/integrations/netskope/apps/{app}/suggestions"), None);
    assert_eq!(sug["suggestions"][0]["segment"], "plc", "{sug}");
    let patches = tenant.patches(app);

    // Bad mappings are refused and change nothing.
    let (st, _) = s.api(
        "PUT",
        &format!("/integrations/netskope/apps/{app}"),
        Some(json!({"segments": ["nope"], "active": true})),
    );
    assert_eq!(st, 422);
    assert_eq!(
        s.api("PUT", "/integrations/netskope/apps/999", Some(json!({"segments": ["plc"], "active": true}))).0,
        404
    );

    // Mapping: generated rules let the publishers reach the PLCs on the app's ports.
    assert_eq!(s.verdict("192.0.2.5", "10.0.0.11", 502), 1, "publisher blocked before the mapping");
    s.ok("PUT", &format!("/integrations/netskope/apps/{app}"), Some(json!({"segments": ["plc"], "active": true})));
    assert_eq!(s.verdict("192.0.2.5", "10.0.0.11", 502), 2, "publisher reaches the mapped PLC");
    assert_eq!(s.verdict("192.0.2.5", "10.0.0.11", 23), 1, "only on the app's ports");
    assert_eq!(s.verdict("10.0.0.2", "10.0.0.11", 502), 1, "other clients stay blocked");
    let rules = s.ok("GET", "/rules", None);
    let generated: Vec<&Value> =
        rules.as_array().unwrap().iter().filter(|r| r["generated"]["by"] == "netskope").collect();
    assert_eq!(generated.len(), 2, "{rules}");
    assert_eq!(s.api("DELETE", &format!("/rules/{}", generated[0]["name"].as_str().unwrap()), None).0, 409);
    assert_eq!(s.api("PUT", "/segments/netskope-publishers", Some(json!({"cidrs": ["10.9.9.9"]}))).0, 409);
    assert_eq!(s.api("DELETE", "/segments/plc", None).0, 409, "a mapped segment cannot go");
    // 10.0.0.11 was typed by the admin: already there, so no write was needed.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(tenant.patches(app), patches, "nothing to change, no PATCH");

    // Tag added: the address reaches the app within 2 s.
    let t = Instant::now();
    s.ok("PATCH", "/assets/plc-2", Some(json!({"tags": {"role": "plc"}})));
    assert!(has(&tenant, app, "10.0.0.12", true, Duration::from_secs(2)), "added within 2 s: {:?}", tenant.hosts(app));
    eprintln!("tag added -> in the private app after {:?}", t.elapsed());
    assert_eq!(s.verdict("192.0.2.5", "10.0.0.12", 502), 2);

    // Tag removed: gone from the app within 2 s (users lose it); the data plane follows at once.
    let t = Instant::now();
    s.ok("PATCH", "/assets/plc-2", Some(json!({"tags": {"role": null}})));
    let members = s.ok("GET", "/segments/plc/members", None);
    assert!(!members.to_string().contains("10.0.0.12"), "{members}");
    assert!(
        has(&tenant, app, "10.0.0.12", false, Duration::from_secs(2)),
        "removed within 2 s: {:?}",
        tenant.hosts(app)
    );
    eprintln!("tag removed -> out of the private app after {:?}", t.elapsed());
    // The admin's hosts survive, including 10.0.0.11 though plc-1 is a member.
    s.ok("DELETE", "/assets/plc-1", None);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(tenant.hosts(app), ["plc.example.local", "10.0.0.11"], "admin-typed hosts are never touched");

    // Every push is audited; the token shows nowhere.
    let audit = s.call("GET", "/api/v1/audit?limit=1000", None).1;
    assert!(audit.contains("\"push\""), "{audit}");
    for path in
        ["/api/v1/integrations/netskope", "/api/v1/integrations/netskope/apps", "/api/v1/audit?limit=1000", "/metrics"]
    {
        let (_, text) = s.call("GET", path, None);
        assert!(!text.contains(NS_TOKEN), "{path} shows the token");
    }
    let metrics = s.call("GET", "/metrics", None).1;
    assert!(metrics.contains("gatekeeper_netskope_pushes_total{result=\"ok\"}"), "{metrics}");
    assert!(metrics.contains("gatekeeper_netskope_api_responses_total{code=\"200\"}"), "{metrics}");
    assert!(metrics.contains("gatekeeper_netskope_syncs_total{result=\"ok\"}"), "{metrics}");
    assert!(metrics.contains("gatekeeper_netskope_pending_pushes 0"), "{metrics}");
    assert!(
        metrics.contains(&format!("gatekeeper_netskope_managed_hosts{{app=\"plc-access\",app_id=\"{app}\"}}")),
        "{metrics}"
    );
    let last_sync = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gatekeeper_netskope_last_successful_sync_timestamp_seconds "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_default();
    assert!(last_sync > 1.7e9, "{metrics}");
    assert!(tenant.requests().iter().all(|r| r.status != 429), "the client stays under the rate limit");
    s.kill();
    // The token set through the API lives in a 0600 file beside the store, not in the database.
    let token_file = path.with_file_name("netskope.token");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), NS_TOKEN);
    let mut db = std::fs::read(&path).unwrap();
    db.extend(std::fs::read(path.with_file_name("state.db-wal")).unwrap_or_default());
    assert!(!db.windows(NS_TOKEN.len()).any(|w| w == NS_TOKEN.as_bytes()), "the token is in the database");
}

#[test]
fn outages_and_rate_limits_delay_but_never_lose_updates() {
    let tenant = FakeTenant::start(NS_TOKEN);
    let path = store_path("outage");
    let s = Server::start(&path);
    let app = seed(&s, &tenant);
    configure(&s, &tenant);
    s.ok("PUT", &format!("/integrations/netskope/apps/{app}"), Some(json!({"segments": ["plc"], "active": true})));

    // A 429 storm with Retry-After: late, not lost, and every wait as long as Netskope asked,
    // also across the client's rounds of retries.
    tenant.fail_next_writes(4, Failure::RateLimited { retry_after_secs: 2 });
    s.ok("PATCH", "/assets/plc-2", Some(json!({"tags": {"role": "plc"}})));
    assert!(has(&tenant, app, "10.0.0.12", true, Duration::from_secs(20)), "{:?}", tenant.hosts(app));
    let patches: Vec<_> = tenant.requests().into_iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.iter().filter(|r| r.status == 429).count(), 4);
    for w in patches.windows(2).filter(|w| w[0].status == 429) {
        let gap = w[1].at.duration_since(w[0].at);
        assert!(gap >= Duration::from_millis(1900), "retried {gap:?} after a Retry-After of 2 s");
    }

    // 5xx and a 200 carrying status "error".
    tenant.fail_next(2, Failure::ServerError(503));
    tenant.fail_next_writes(1, Failure::StatusError("internal".into()));
    s.ok("PATCH", "/assets/eng-1", Some(json!({"tags": {"role": "plc"}})));
    assert!(has(&tenant, app, "10.0.0.2", true, Duration::from_secs(20)), "{:?}", tenant.hosts(app));

    // An outage, then the daemon dies with the push pending; a new one delivers it.
    tenant.set_outage(true);
    s.ok("PATCH", "/assets/plc-2", Some(json!({"tags": {"role": null}})));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(tenant.hosts(app).contains(&"10.0.0.12".to_string()), "Netskope is down: nothing changed yet");
    let pending = s.ok("GET", "/integrations/netskope", None)["pending_pushes"].as_u64();
    assert_eq!(pending, Some(1));
    s.kill();
    tenant.set_outage(false);
    let s = Server::start(&path);
    assert!(has(&tenant, app, "10.0.0.12", false, Duration::from_secs(20)), "{:?}", tenant.hosts(app));
    assert!(tenant.hosts(app).contains(&"10.0.0.2".to_string()));
    assert!(tenant.wait_for(Duration::from_secs(5), |_| {
        s.ok("GET", "/integrations/netskope", None)["pending_pushes"].as_u64() == Some(0)
    }));
    s.kill();
}

#[test]
fn sync_corrects_drift_reports_limits_and_follows_deletions() {
    let tenant = FakeTenant::start(NS_TOKEN);
    let path = store_path("drift");
    let s = Server::start(&path);
    let app = seed(&s, &tenant);
    configure(&s, &tenant);
    s.ok("PUT", &format!("/integrations/netskope/apps/{app}"), Some(json!({"segments": ["plc"], "active": true})));
    s.ok("PATCH", "/assets/plc-2", Some(json!({"tags": {"role": "plc"}})));
    assert!(has(&tenant, app, "10.0.0.12", true, Duration::from_secs(2)));

    // Someone removes the managed host by hand: the next sync puts it back and says so.
    tenant.set_hosts(app, &["plc.example.local", "10.0.0.11"]);
    s.ok("POST", "/integrations/netskope/sync", None);
    assert!(has(&tenant, app, "10.0.0.12", true, Duration::from_secs(5)), "{:?}", tenant.hosts(app));
    let audit = s.call("GET", "/api/v1/audit?limit=100", None).1;
    assert!(audit.contains("drift corrected"), "{audit}");

    // A publisher's address and the 500-host cap: reported with the reason, never cut silently.
    s.ok("PUT", "/assets/pub-twin", Some(json!({"ips": ["192.0.2.5"], "tags": {"role": "plc"}})));
    s.ok("PUT", "/assets/plc-3", Some(json!({"ips": ["10.0.0.13"], "tags": {"role": "plc"}})));
    s.ok("PUT", "/assets/plc-4", Some(json!({"ips": ["10.0.0.14"], "tags": {"role": "plc"}})));
    let many: Vec<String> = (0..498).map(|i| format!("h{i}.example.local")).collect();
    let many_refs: Vec<&str> = many.iter().map(String::as_str).collect();
    tenant.set_hosts(app, &many_refs);
    s.ok("POST", "/integrations/netskope/sync", None);
    assert!(tenant.wait_for(Duration::from_secs(5), |t| t.hosts(app).len() == 500), "{}", tenant.hosts(app).len());
    // The tenant has the hosts once the PATCH arrives; the daemon records what it left out
    // when the push's answer comes back, a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let st = loop {
        let st = s.ok("GET", "/integrations/netskope", None);
        if st["pending_pushes"] == 0 || std::time::Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let refused = st["refused_hosts"].as_array().unwrap();
    assert!(
        refused.iter().any(|r| r["host"] == "192.0.2.5" && r["reason"].as_str().unwrap().contains("publisher")),
        "{st}"
    );
    assert!(refused.iter().any(|r| r["reason"].as_str().unwrap().contains("500")), "{st}");
    let metrics = s.call("GET", "/metrics", None).1;
    assert!(metrics.contains("gatekeeper_netskope_refused_hosts{"), "{metrics}");

    // Deleted in Netskope: shown as gone, its generated rules stop.
    assert_eq!(s.verdict("192.0.2.5", "10.0.0.11", 502), 2);
    tenant.delete_app(app);
    s.ok("POST", "/integrations/netskope/sync", None);
    let a = s.ok("GET", &format!("/integrations/netskope/apps/{app}"), None);
    assert_eq!(a["state"], "gone");
    assert_eq!(s.verdict("192.0.2.5", "10.0.0.11", 502), 1, "the mapping stopped");
    assert!(!s.ok("GET", "/rules", None).to_string().contains("netskope-"), "generated rules removed");

    // A wrong token: the sync fails with Netskope's answer and changes nothing.
    let (st, _) = s.api(
        "PUT",
        "/integrations/netskope",
        Some(json!({"tenant_url": tenant.url(), "token": "wrong-token-000000000000", "sync_interval": "1h"})),
    );
    assert_eq!(st, 200);
    let (st, v) = s.api("POST", "/integrations/netskope/sync", None);
    assert_eq!(st, 502, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("401"), "{v}");
    assert_eq!(s.api("PUT", "/integrations/netskope", Some(json!({"tenant_url": "ftp://x"}))).0, 422);

    // Disconnecting removes the generated objects and the token file.
    assert!(s.ok("GET", "/segments", None).to_string().contains("netskope-publishers"));
    assert_eq!(s.api("DELETE", "/integrations/netskope", None).0, 204);
    assert_eq!(s.ok("GET", "/integrations/netskope", None)["configured"], false);
    assert!(!s.ok("GET", "/segments", None).to_string().contains("netskope-publishers"));
    assert!(!path.with_file_name("netskope.token").exists());
    assert_eq!(s.api("DELETE", "/integrations/netskope", None).0, 404);
    s.kill();
}

#[test]
fn lost_replies_and_refused_apps_neither_orphan_hosts_nor_block_others() {
    let tenant = FakeTenant::start(NS_TOKEN);
    let s = Server::start(&store_path("lost"));
    let app = seed(&s, &tenant);
    let hmi_app = tenant.add_app("hmi-access", &[], &[("tcp", "443")]);
    configure(&s, &tenant);
    s.ok("PUT", &format!("/integrations/netskope/apps/{app}"), Some(json!({"segments": ["plc"], "active": true})));
    s.ok("PUT", &format!("/integrations/netskope/apps/{hmi_app}"), Some(json!({"segments": ["hmi"], "active": true})));
    assert!(has(&tenant, hmi_app, "10.0.0.1", true, Duration::from_secs(2)));

    // Netskope applies the PATCH but every answer is lost: the host is still known as ours.
    tenant.lose_next_write_replies(4);
    s.ok("PATCH", "/assets/plc-2", Some(json!({"tags": {"role": "plc"}})));
    assert!(has(&tenant, app, "10.0.0.12", true, Duration::from_secs(10)));
    assert!(tenant.wait_for(Duration::from_secs(15), |t| t.requests().iter().filter(|r| r.status == 504).count() >= 4));
    s.ok("PATCH", "/assets/plc-2", Some(json!({"tags": {"role": null}})));
    assert!(
        has(&tenant, app, "10.0.0.12", false, Duration::from_secs(10)),
        "a host added under a lost reply was orphaned: {:?}",
        tenant.hosts(app)
    );

    // A publisher added in Netskope since the last sync makes app 1's push fail (400) until the
    // next sync; app 2's change still goes out within 2 s.
    tenant.add_publisher("pub-new", "10.0.0.13");
    s.ok("PUT", "/assets/plc-3", Some(json!({"ips": ["10.0.0.13"], "tags": {"role": "plc"}})));
    std::thread::sleep(Duration::from_millis(600));
    s.ok("PUT", "/assets/hmi-2", Some(json!({"ips": ["10.0.0.3"], "tags": {"role": "hmi"}})));
    assert!(
        has(&tenant, hmi_app, "10.0.0.3", true, Duration::from_secs(2)),
        "one refused app held up another: {:?}",
        tenant.hosts(hmi_app)
    );
    // After a sync the publisher's address is known and reported instead of pushed.
    s.ok("POST", "/integrations/netskope/sync", None);
    assert!(tenant.wait_for(Duration::from_secs(10), |_| {
        s.ok("GET", "/integrations/netskope", None)["refused_hosts"].to_string().contains("10.0.0.13")
    }));
    assert!(!tenant.hosts(app).contains(&"10.0.0.13".to_string()));
    s.kill();
}

#[test]
fn a_retry_after_date_is_waited_out() {
    let tenant = FakeTenant::start(NS_TOKEN);
    let s = Server::start(&store_path("dated"));
    let app = seed(&s, &tenant);
    configure(&s, &tenant);
    s.ok("PUT", &format!("/integrations/netskope/apps/{app}"), Some(json!({"segments": ["plc"], "active": true})));

    // Retry-After as an HTTP date 3 s ahead (whole seconds: a wait of 2 to 3 s) and no
    // RateLimit-Reset: a client that ignored the date would come back after its default 1 s.
    tenant.fail_next_writes(2, Failure::RateLimitedUntil { retry_after_secs: 3 });
    s.ok("PATCH", "/assets/plc-2", Some(json!({"tags": {"role": "plc"}})));
    assert!(has(&tenant, app, "10.0.0.12", true, Duration::from_secs(20)), "{:?}", tenant.hosts(app));
    let patches: Vec<_> = tenant.requests().into_iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.iter().filter(|r| r.status == 429).count(), 2, "{patches:?}");
    for w in patches.windows(2).filter(|w| w[0].status == 429) {
        let gap = w[1].at.duration_since(w[0].at);
        assert!(gap >= Duration::from_millis(1900), "retried {gap:?} after a Retry-After date 3 s ahead");
    }
    s.kill();
}

#[test]
fn hostile_names_and_hosts_cannot_bend_a_request() {
    let tenant = FakeTenant::start(NS_TOKEN);
    let s = Server::start(&store_path("hostile"));
    seed(&s, &tenant);
    let name = "plc & hmi/../x?y=1#z %41 é";
    let admin = ["odd host&x=1?y#z", "100%.example.local", "a/../b"];
    let app = tenant.add_app(name, &admin, &[("tcp", "502")]);
    configure(&s, &tenant);
    let a = s.ok("GET", &format!("/integrations/netskope/apps/{app}"), None);
    assert_eq!((a["name"].as_str(), &a["hosts"]), (Some(name), &json!(admin)), "{a}");

    s.ok("PUT", &format!("/integrations/netskope/apps/{app}"), Some(json!({"segments": ["plc"], "active": true})));
    assert!(has(&tenant, app, "10.0.0.11", true, Duration::from_secs(2)), "{:?}", tenant.hosts(app));
    let mut want: Vec<&str> = admin.to_vec();
    want.push("10.0.0.11");
    assert_eq!(tenant.hosts(app), want, "the admin's odd hosts went out as they were");

    // Every request reached one of the fixed targets: no name, host or query in a URL.
    let requests = tenant.requests();
    assert!(requests.iter().any(|r| r.method == "PATCH"));
    for r in &requests {
        let fixed = ["/api/v2/steering/apps/private", "/api/v2/infrastructure/publishers"].contains(&r.path.as_str());
        let by_id = r.path.strip_prefix("/api/v2/steering/apps/private/").is_some_and(|id| id.parse::<u64>().is_ok());
        assert!(fixed || by_id, "{} {}", r.method, r.path);
        assert_eq!(r.status, 200, "{} {}", r.method, r.path);
    }
    s.kill();
}
