//! The fake Netskope One tenant itself, driven with plain HTTP: the shapes the daemon's client
//! relies on (wrapped responses, bracketed names, list vs by-id keys, comma-separated hosts),
//! PATCH semantics and validation, the token, the sliding rate limit, injected faults, outages,
//! the request log and a bounded shutdown. No root needed.

use std::{
    io::Write,
    net::TcpStream,
    time::{Duration, Instant},
};

use gatekeeper_tests::netskope_fake::{Failure, FakeTenant, MAX_HOSTS};
use serde_json::{Value, json};

const TOKEN: &str = "nsk-fake-token-7d2e";

struct Client {
    base: String,
    agent: ureq::Agent,
    token: String,
}

/// A response: status, named headers, raw body.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

impl Client {
    fn new(tenant: &FakeTenant) -> Self {
        Self::with_token(tenant, TOKEN)
    }

    fn with_token(tenant: &FakeTenant, token: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Self { base: format!("{}/api/v2", tenant.url()), agent, token: token.into() }
    }

    fn finish(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Resp {
        let mut r = r.expect("HTTP exchange with the fake tenant");
        let headers =
            r.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string())).collect();
        Resp { status: r.status().as_u16(), headers, body: r.body_mut().read_to_string().unwrap() }
    }

    fn get(&self, path: &str) -> Resp {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if !self.token.is_empty() {
            req = req.header("Netskope-Api-Token", &self.token);
        }
        Self::finish(req.call())
    }

    fn patch_raw(&self, id: u64, body: &str) -> Resp {
        let req = self
            .agent
            .patch(format!("{}/steering/apps/private/{id}", self.base))
            .header("Netskope-Api-Token", &self.token)
            .content_type("application/json");
        Self::finish(req.send(body))
    }

    fn patch(&self, id: u64, body: Value) -> Resp {
        self.patch_raw(id, &body.to_string())
    }

    fn apps(&self) -> Resp {
        self.get("/steering/apps/private")
    }
}

/// Asserts a wrapped Netskope error with `status` whose message contains `needle`.
fn assert_error(r: &Resp, status: u16, needle: &str) {
    assert_eq!(r.status, status, "body: {}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "error", "{v}");
    let m = v["message"].as_str().unwrap_or_else(|| panic!("no message: {v}"));
    assert!(m.contains(needle), "message {m:?} lacks {needle:?}");
}

/// A tenant without the rate limit, for tests about other things.
fn unlimited() -> (FakeTenant, Client) {
    let t = FakeTenant::start(TOKEN);
    t.set_rate_limit(None);
    let c = Client::new(&t);
    (t, c)
}

#[test]
fn list_and_single_app_shapes() {
    let (t, c) = unlimited();
    let p = t.add_publisher("pub-east", "192.0.2.5");
    let p2 = t.add_publisher("pub-west", "192.0.2.6");
    let id =
        t.add_app("plc-access", &["10.0.0.10", "plc.example.local"], &[("tcp", "22,502,1024-2048"), ("udp", "161")]);
    let other = t.add_app("hmi", &[], &[("tcp", "443")]);
    t.assign_publisher(id, p);
    t.assign_publisher(id, p2);
    t.set_tags(id, &["ot", "plc"]);
    assert_ne!(id, other);
    assert_ne!(id, p, "app and publisher ids come from one counter");

    let v = c.apps().json();
    assert_eq!(v["status"], "success");
    assert_eq!(v["total"], 2);
    let apps = v["data"]["private_apps"].as_array().unwrap();
    assert_eq!(apps.len(), 2);
    let a = apps.iter().find(|a| a["app_id"] == id).expect("app listed by app_id");
    assert_eq!(a["app_name"], "[plc-access]");
    assert!(a.get("id").is_none() && a.get("name").is_none(), "list uses app_id/app_name only: {a}");
    assert_eq!(a["host"], "10.0.0.10,plc.example.local");
    assert_eq!(
        a["protocols"],
        json!([{"port": "22,502,1024-2048", "transport": "tcp"}, {"port": "161", "transport": "udp"}])
    );
    let spa = a["service_publisher_assignments"].as_array().unwrap();
    assert_eq!(spa.len(), 2);
    assert_eq!(spa[0]["publisher_id"], p);
    assert_eq!(spa[0]["publisher_name"], "pub-east");
    assert_eq!(spa[0]["primary"], true);
    assert_eq!(spa[1]["publisher_id"], p2);
    assert_eq!(spa[1]["primary"], false);
    assert_eq!(a["tags"], json!([{"tag_name": "ot"}, {"tag_name": "plc"}]));
    for extra in ["clientless_access", "use_publisher_dns", "trust_self_signed_certs"] {
        assert_eq!(a[extra], false, "{extra}");
    }
    let h = apps.iter().find(|a| a["app_id"] == other).unwrap();
    assert_eq!(h["app_name"], "[hmi]");
    assert_eq!(h["host"], "", "no hosts: an empty string");

    let r = c.get(&format!("/steering/apps/private/{id}"));
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap_or_default().starts_with("application/json"));
    let v = r.json();
    assert_eq!(v["status"], "success");
    let d = &v["data"];
    assert_eq!(d["id"], id);
    assert_eq!(d["name"], "[plc-access]");
    assert!(d.get("app_id").is_none() && d.get("app_name").is_none(), "by id uses id/name: {d}");
    assert_eq!(d["host"], "10.0.0.10,plc.example.local");
    assert_eq!(d["protocols"], a["protocols"]);
    assert_eq!(d["service_publisher_assignments"], a["service_publisher_assignments"]);

    assert_error(&c.get("/steering/apps/private/999999"), 404, "not found");
    assert_error(&c.get("/steering/apps/private/not-a-number"), 404, "not found");
    assert_error(&c.get("/steering/apps/nothing-here"), 404, "not found");
}

#[test]
fn publishers_shape() {
    let (t, c) = unlimited();
    let a = t.add_publisher("pub-a", "192.0.2.5");
    let b = t.add_publisher("pub-b", "");
    t.set_publisher_status(b, "not registered");
    let v = c.get("/infrastructure/publishers").json();
    assert_eq!(v["status"], "success");
    assert_eq!(v["total"], 2);
    let list = v["data"]["publishers"].as_array().unwrap();
    assert_eq!(list[0]["publisher_id"], a);
    assert_eq!(list[0]["publisher_name"], "pub-a");
    assert_eq!(list[0]["status"], "connected");
    assert_eq!(list[0]["assessment"]["ip_address"], "192.0.2.5");
    assert_eq!(list[1]["publisher_id"], b);
    assert_eq!(list[1]["status"], "not registered");

    t.remove_publisher(a);
    let v = c.get("/infrastructure/publishers").json();
    assert_eq!(v["total"], 1);
    assert_eq!(v["data"]["publishers"][0]["publisher_id"], b);
}

#[test]
fn patch_replaces_the_whole_host_list() {
    let (t, c) = unlimited();
    let id = t.add_app("plc-access", &["10.0.0.10", "10.0.0.11", "plc.example.local"], &[("tcp", "502")]);
    let other = t.add_app("untouched", &["10.9.9.9"], &[("tcp", "22")]);

    let r = c.patch(id, json!({"host": " 10.0.0.20 , ,plc2.example.local,"}));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["status"], "success");
    assert_eq!(v["data"]["id"], id, "PATCH answers with the by-id shape");
    assert_eq!(v["data"]["name"], "[plc-access]");
    assert_eq!(v["data"]["host"], "10.0.0.20,plc2.example.local", "trimmed, empty items dropped");
    assert_eq!(t.hosts(id), ["10.0.0.20", "plc2.example.local"], "old hosts are gone, not merged");
    assert_eq!(t.patches(id), 1);
    assert_eq!(c.get(&format!("/steering/apps/private/{id}")).json()["data"]["host"], "10.0.0.20,plc2.example.local");
    assert_eq!(t.hosts(other), ["10.9.9.9"]);
    assert_eq!(t.patches(other), 0);

    // Other fields are applied too; hosts stay when the body has none.
    let r = c.patch(id, json!({"protocols": [{"port": "22,502", "transport": "tcp"}], "app_name": "ignored"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["data"]["protocols"], json!([{"port": "22,502", "transport": "tcp"}]));
    assert_eq!(t.hosts(id), ["10.0.0.20", "plc2.example.local"]);
    assert_eq!(t.patches(id), 2);

    // An empty list is allowed.
    let r = c.patch(id, json!({"host": ""}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["data"]["host"], "");
    assert!(t.hosts(id).is_empty());
    assert_eq!(t.patches(id), 3);

    assert_error(&c.patch(424242, json!({"host": "10.0.0.1"})), 404, "not found");
}

#[test]
fn patch_validation() {
    let (t, c) = unlimited();
    let publ = t.add_publisher("pub-east", "192.0.2.5");
    let id = t.add_app("plc-access", &["10.0.0.10"], &[("tcp", "502")]);

    let too_many: Vec<String> = (0..=MAX_HOSTS).map(|i| format!("10.1.{}.{}", i / 250, i % 250 + 1)).collect();
    assert_eq!(too_many.len(), 501);
    assert_error(&c.patch(id, json!({"host": too_many.join(",")})), 400, "500");
    assert_eq!(t.hosts(id), ["10.0.0.10"], "a refused PATCH changes nothing");

    let r = c.patch(id, json!({"host": too_many[..MAX_HOSTS].join(",")}));
    assert_eq!(r.status, 200, "exactly 500 hosts is fine: {}", r.body);
    assert_eq!(t.hosts(id).len(), 500);

    assert_error(&c.patch(id, json!({"host": "10.0.0.1,192.0.2.5"})), 400, "192.0.2.5");
    assert_eq!(t.hosts(id).len(), 500);
    // Once the publisher is gone its address is an ordinary host.
    t.remove_publisher(publ);
    assert_eq!(c.patch(id, json!({"host": "10.0.0.1,192.0.2.5"})).status, 200);
    assert_eq!(t.hosts(id), ["10.0.0.1", "192.0.2.5"]);

    assert_error(&c.patch_raw(id, "{\"host\": \"10.0.0.1\""), 400, "JSON");
    assert_error(&c.patch_raw(id, ""), 400, "JSON");
    assert_error(&c.patch(id, json!(["10.0.0.1"])), 400, "object");
    assert_error(&c.patch(id, json!({"host": ["10.0.0.1"]})), 400, "host");
    assert_error(&c.patch(id, json!({"protocols": [{"port": "22", "transport": "icmp"}]})), 400, "transport");
    assert_eq!(t.hosts(id), ["10.0.0.1", "192.0.2.5"]);
    assert_eq!(t.patches(id), 2, "only the successful PATCHes count");
}

#[test]
fn token_is_required() {
    let t = FakeTenant::start(TOKEN);
    t.add_app("plc-access", &["10.0.0.10"], &[("tcp", "502")]);
    for token in ["", "wrong-token", "nsk-fake-token-7d2"] {
        let r = Client::with_token(&t, token).apps();
        assert_eq!(r.status, 401, "token {token:?}");
        assert_eq!(r.json(), json!({"status": "error", "message": "Unauthorized"}));
    }
    // A refused request neither consumes an injected fault nor fills the rate window.
    t.fail_next(1, Failure::StatusError("queued".into()));
    for _ in 0..6 {
        assert_eq!(Client::with_token(&t, "nope").apps().status, 401);
    }
    let c = Client::new(&t);
    assert_error(&c.apps(), 200, "queued");
    for _ in 0..4 {
        assert_eq!(c.apps().status, 200);
    }
    let log = t.requests();
    assert_eq!(log.iter().filter(|l| !l.token_ok).count(), 9);
    assert!(log.iter().filter(|l| !l.token_ok).all(|l| l.status == 401));
}

#[test]
fn rate_limit_is_a_sliding_second() {
    let t = FakeTenant::start(TOKEN);
    let c = Client::new(&t);

    let start = Instant::now();
    let statuses: Vec<Resp> = (0..5).map(|_| c.apps()).collect();
    assert!(start.elapsed() < Duration::from_millis(900), "5 local requests took {:?}", start.elapsed());
    assert_eq!(statuses.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200, 200, 200, 429]);
    let limited = &statuses[4];
    assert_eq!(limited.header("retry-after"), Some("1"));
    assert_eq!(limited.header("ratelimit-reset"), Some("1"));
    assert_error(limited, 429, "");

    // Sliding, not per calendar second: 2 at t0, 2 at t0+0.5 s, then after t0+1.1 s the first
    // two have left the window but the middle two still fill half of it.
    std::thread::sleep(Duration::from_millis(1100));
    let t0 = Instant::now();
    assert_eq!(c.apps().status, 200);
    assert_eq!(c.apps().status, 200);
    std::thread::sleep(Duration::from_millis(500));
    let t1 = Instant::now();
    assert_eq!(c.apps().status, 200);
    assert_eq!(c.apps().status, 200);
    std::thread::sleep(Duration::from_millis(600).saturating_sub(t1.elapsed()));
    assert_eq!(c.apps().status, 200);
    assert_eq!(c.apps().status, 200);
    assert!(t1.elapsed() < Duration::from_millis(950), "too slow to test the window: {:?}", t1.elapsed());
    assert!(t0.elapsed() >= Duration::from_millis(1000));
    assert_eq!(c.apps().status, 429, "4 requests in the last second");

    // The limit is the test's to change.
    t.set_rate_limit(None);
    assert!((0..20).all(|_| c.apps().status == 200));
    t.set_rate_limit(Some(1));
    std::thread::sleep(Duration::from_millis(1050));
    assert_eq!(c.apps().status, 200);
    assert_eq!(c.apps().status, 429);
    // Writes count like reads.
    let id = t.add_app("x", &[], &[]);
    assert_eq!(c.patch(id, json!({"host": "10.0.0.1"})).status, 429);
    assert_eq!(t.patches(id), 0);
    assert!(t.hosts(id).is_empty());
}

#[test]
fn injected_failures() {
    let (t, c) = unlimited();
    let id = t.add_app("plc-access", &["10.0.0.10"], &[("tcp", "502")]);

    t.fail_next(1, Failure::RateLimited { retry_after_secs: 7 });
    let r = c.apps();
    assert_error(&r, 429, "");
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.header("ratelimit-reset"), Some("7"));
    assert_eq!(c.apps().status, 200, "only one fault was queued");

    t.fail_next(2, Failure::ServerError(502));
    for _ in 0..2 {
        let r = c.get(&format!("/steering/apps/private/{id}"));
        assert_eq!(r.status, 502);
        assert!(r.header("content-type").unwrap_or_default().starts_with("text/html"));
        assert!(serde_json::from_str::<Value>(&r.body).is_err(), "a gateway's HTML: {}", r.body);
    }
    assert_eq!(c.get(&format!("/steering/apps/private/{id}")).status, 200);

    t.fail_next(1, Failure::ServerError(500));
    assert_error(&c.apps(), 500, "");
    t.fail_next(1, Failure::ServerError(503));
    assert_eq!(c.get("/infrastructure/publishers").status, 503);

    t.fail_next(1, Failure::StatusError("Internal error, try again".into()));
    let r = c.patch(id, json!({"host": "10.0.0.99"}));
    assert_error(&r, 200, "Internal error, try again");
    assert!(r.json().get("data").is_none());
    assert_eq!(t.hosts(id), ["10.0.0.10"], "a failed PATCH changes nothing");
    assert_eq!(t.patches(id), 0);

    // Write faults wait for a PATCH; reads pass.
    t.fail_next_writes(2, Failure::ServerError(503));
    assert_eq!(c.apps().status, 200);
    assert_eq!(c.get(&format!("/steering/apps/private/{id}")).status, 200);
    assert_eq!(c.patch(id, json!({"host": "10.0.0.99"})).status, 503);
    assert_eq!(c.patch(id, json!({"host": "10.0.0.99"})).status, 503);
    assert_eq!(t.hosts(id), ["10.0.0.10"]);
    let r = c.patch(id, json!({"host": "10.0.0.99"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(t.hosts(id), ["10.0.0.99"]);
    assert_eq!(t.patches(id), 1);

    // Queued faults run in order.
    t.fail_next(1, Failure::ServerError(500));
    t.fail_next(1, Failure::StatusError("second".into()));
    assert_eq!(c.apps().status, 500);
    assert_error(&c.apps(), 200, "second");
    assert_eq!(c.apps().status, 200);
}

#[test]
fn outage_refuses_everything_until_lifted() {
    let (t, c) = unlimited();
    let id = t.add_app("plc-access", &["10.0.0.10"], &[("tcp", "502")]);
    t.set_outage(true);
    assert_eq!(c.apps().status, 503);
    assert_eq!(c.get("/infrastructure/publishers").status, 503);
    assert_eq!(Client::with_token(&t, "wrong").apps().status, 503, "the outage comes before the token check");
    assert_eq!(c.patch(id, json!({"host": "10.0.0.11"})).status, 503);
    assert_eq!(t.hosts(id), ["10.0.0.10"]);
    assert_eq!(t.patches(id), 0);
    // The admin can still edit in the UI.
    t.set_hosts(id, &["10.0.0.12"]);
    t.set_outage(false);
    assert_eq!(c.apps().json()["data"]["private_apps"][0]["host"], "10.0.0.12");
    assert_eq!(c.patch(id, json!({"host": "10.0.0.11"})).status, 200);
    assert_eq!(t.hosts(id), ["10.0.0.11"]);
}

#[test]
fn request_log_and_admin_edits() {
    let t = FakeTenant::start(TOKEN);
    let c = Client::new(&t);
    let id = t.add_app("plc-access", &["10.0.0.10"], &[("tcp", "502")]);
    let before = Instant::now();

    assert_eq!(c.apps().status, 200);
    assert_eq!(Client::with_token(&t, "bad").get(&format!("/steering/apps/private/{id}")).status, 401);
    assert_eq!(c.patch(id, json!({"host": "10.0.0.11,10.0.0.12"})).status, 200);
    // Admin edits: not logged, not rate limited, not PATCHes.
    for _ in 0..10 {
        t.set_hosts(id, &[" 10.0.0.30 ", "", "plc.example.local"]);
    }
    assert_eq!(t.hosts(id), ["10.0.0.30", "plc.example.local"]);
    assert_eq!(c.get(&format!("/steering/apps/private/{id}")).status, 200);
    assert_eq!(c.get("/infrastructure/publishers").status, 200);
    assert_eq!(c.apps().status, 429, "four admitted requests, then the limit");

    let log = t.requests();
    let summary: Vec<(&str, String, u16, bool)> =
        log.iter().map(|l| (l.method.as_str(), l.path.clone(), l.status, l.token_ok)).collect();
    let one = format!("/api/v2/steering/apps/private/{id}");
    assert_eq!(
        summary,
        [
            ("GET", "/api/v2/steering/apps/private".to_string(), 200, true),
            ("GET", one.clone(), 401, false),
            ("PATCH", one.clone(), 200, true),
            ("GET", one, 200, true),
            ("GET", "/api/v2/infrastructure/publishers".to_string(), 200, true),
            ("GET", "/api/v2/steering/apps/private".to_string(), 429, true),
        ]
    );
    assert_eq!(log[2].body, r#"{"host":"10.0.0.11,10.0.0.12"}"#);
    assert!(log[0].body.is_empty());
    assert!(log[0].at >= before);
    assert!(log.windows(2).all(|w| w[0].at <= w[1].at), "in order");
    assert_eq!(t.patches(id), 1);

    t.delete_app(id);
    t.set_rate_limit(None);
    assert_error(&c.get(&format!("/steering/apps/private/{id}")), 404, "not found");
    assert_eq!(c.apps().json()["total"], 0);
    assert!(t.hosts(id).is_empty());
    assert_eq!(t.requests().len(), 8);
}

#[test]
fn wait_for_polls_and_gives_up() {
    let (t, c) = unlimited();
    let id = t.add_app("plc-access", &["10.0.0.10"], &[("tcp", "502")]);
    let base = c.base.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        let c = Client { base, agent: ureq::Agent::new_with_defaults(), token: TOKEN.into() };
        c.patch(id, json!({"host": "10.0.0.77"})).status
    });
    assert!(t.wait_for(Duration::from_secs(5), |t| t.hosts(id) == ["10.0.0.77"]));
    assert_eq!(writer.join().unwrap(), 200);

    let start = Instant::now();
    assert!(!t.wait_for(Duration::from_millis(200), |t| t.patches(id) > 1));
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(2), "{waited:?}");
}

#[test]
fn start_on_a_given_listener_and_drop_is_bounded() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = FakeTenant::start_on(listener, TOKEN);
    assert_eq!(t.url(), format!("http://{addr}"));
    let c = Client::new(&t);
    assert_eq!(c.apps().status, 200, "a keep-alive connection stays in the agent's pool");
    // A client stuck halfway through a request must not hold the shutdown.
    let mut stuck = TcpStream::connect(addr).unwrap();
    stuck.write_all(b"GET /api/v2/steering/apps/private HTTP/1.1\r\nHost: x\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));

    let start = Instant::now();
    drop(t);
    assert!(start.elapsed() < Duration::from_secs(5), "drop took {:?}", start.elapsed());
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(), "still listening");
    drop(stuck);
}
