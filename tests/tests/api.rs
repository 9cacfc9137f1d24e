//! The REST API against a real store and a loaded data plane: every object kind, merge patch,
//! dry runs, auth, and every error path changing nothing. Runs over the XDP program as
//! root, over the in-memory data plane otherwise (see `gatekeeper_tests::control`).

use chrono::Timelike as _;
use gatekeeper::{
    control::{Handle, Store, auth::Tokens},
    daemon::http_router,
};
use gatekeeper_tests::packet::{Frame, L4};
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-0123456789";
const READER: &str = "reader-token-0123456789";

struct Server {
    base: String,
    control: Handle,
    agent: ureq::Agent,
    store_path: std::path::PathBuf,
    _rt: tokio::runtime::Runtime,
}

impl Server {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("gk-api-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store_path = dir.join("state.db");
        let control = gatekeeper_tests::control::control(&store_path);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
        let tokens = Tokens::admin_reader(Some(ADMIN), Some(READER));
        let r = http_router(&control, &tokens, gatekeeper::config::DEFAULT_MAX_BODY_BYTES).unwrap();
        rt.spawn(async move { axum::serve(listener, r).await });
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Self { base, control, agent, store_path, _rt: rt }
    }

    fn call(&self, method: &str, path: &str, token: Option<&str>, ct: &str, body: Option<&str>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let auth = token.map(|t| format!("Bearer {t}"));
        macro_rules! go {
            ($req:expr) => {{
                let mut req = $req;
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                req
            }};
        }
        let resp = match (method, body) {
            ("GET", _) => go!(self.agent.get(&url)).call(),
            ("DELETE", _) => go!(self.agent.delete(&url)).call(),
            ("PUT", Some(b)) => go!(self.agent.put(&url)).content_type(ct).send(b),
            ("PATCH", Some(b)) => go!(self.agent.patch(&url)).content_type(ct).send(b),
            ("POST", Some(b)) => go!(self.agent.post(&url)).content_type(ct).send(b),
            _ => panic!("bad call"),
        };
        let mut resp = resp.expect("request");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let b = body.map(|b| b.to_string());
        self.call(method, path, Some(ADMIN), "application/json", b.as_deref())
    }

    /// The data plane's verdict (1 drop, 2 pass) on a TCP SYN.
    fn verdict(&self, src: &str, dst: &str, dport: u16) -> u32 {
        let f = Frame::new(src.parse().unwrap(), dst.parse().unwrap(), L4::Tcp { sport: 40000, dport }).build();
        self.control.lock().enforcer().dataplane().test_run(&f).unwrap()
    }

    fn audit_len(&self) -> usize {
        self.admin("GET", "/audit?limit=1000", None).1.as_array().map_or(0, Vec::len)
    }
}

fn seed(s: &Server) {
    for (name, ip, role) in [("hmi-1", "10.0.0.1", "hmi"), ("plc-1", "10.0.0.11", "plc"), ("eng-1", "10.0.0.2", "eng")]
    {
        let (st, _) = s.admin("PUT", &format!("/assets/{name}"), Some(json!({"ips": [ip], "tags": {"role": role}})));
        assert_eq!(st, 200, "PUT asset {name}");
    }
    assert_eq!(s.admin("PUT", "/segments/hmi", Some(json!({"selector": "role=hmi", "mode": "label"}))).0, 200);
    assert_eq!(s.admin("PUT", "/segments/plc", Some(json!({"selector": "role=plc", "mode": "enforce"}))).0, 200);
    assert_eq!(
        s.admin("PUT", "/rules/modbus", Some(json!({"from": "hmi", "to": "plc", "protocol": "tcp", "ports": [502]}))).0,
        200
    );
}

#[test]
fn objects_go_through_the_api_into_the_data_plane() {
    let s = Server::start("objects");
    seed(&s);
    assert_eq!(s.verdict("10.0.0.1", "10.0.0.11", 502), 2, "hmi -> plc modbus allowed");
    assert_eq!(s.verdict("10.0.0.2", "10.0.0.11", 502), 1, "eng -> plc denied");

    let (st, list) = s.admin("GET", "/assets?selector=role%20in%20(plc,eng)", None);
    assert_eq!(st, 200);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["plc-1", "eng-1"]);
    let (st, a) = s.admin("GET", "/assets/plc-1", None);
    assert_eq!((st, a["ips"][0].as_str()), (200, Some("10.0.0.11")));
    let (st, m) = s.admin("GET", "/segments/plc/members", None);
    assert_eq!((st, m["assets"][0]["name"].as_str()), (200, Some("plc-1")));

    // Merge patch: set one tag, remove another; the data plane follows.
    let patch = r#"{"tags": {"role": "hmi", "site": null}}"#;
    let (st, a) = s.call("PATCH", "/assets/eng-1", Some(ADMIN), "application/merge-patch+json", Some(patch));
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["tags"], json!({"role": "hmi"}));
    assert_eq!(s.verdict("10.0.0.2", "10.0.0.11", 502), 2, "eng-1 tagged hmi is allowed");
    let (st, _) =
        s.call("PATCH", "/assets/eng-1", Some(ADMIN), "application/json", Some(r#"{"tags": {"role": null}}"#));
    assert_eq!(st, 200);
    assert_eq!(s.verdict("10.0.0.2", "10.0.0.11", 502), 1, "untagged again: denied");

    // Dry run: the diff, nothing applied.
    let doc = "assets:\n  - {name: plc-1, ips: [10.0.0.11], tags: {role: plc}}\nsegments:\n  - {name: plc, selector: role=plc}\n";
    let before = s.audit_len();
    let (st, d) = s.call("POST", "/apply?dry_run=true&prune=true", Some(ADMIN), "application/yaml", Some(doc));
    assert_eq!(st, 200, "{d}");
    let ops: Vec<(String, String)> = d["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["op"].as_str().unwrap().into(), c["name"].as_str().unwrap().into()))
        .collect();
    assert!(
        ops.contains(&("delete".into(), "modbus".into())) && ops.contains(&("delete".into(), "hmi-1".into())),
        "{ops:?}"
    );
    assert_eq!(s.audit_len(), before, "a dry run records nothing");
    assert_eq!(s.verdict("10.0.0.1", "10.0.0.11", 502), 2, "a dry run applies nothing");
    // The real apply with prune replaces the state.
    let epoch_before = s.admin("GET", "/status", None).1["epoch"].as_u64().unwrap();
    let (st, _) = s.call("POST", "/apply?prune=true", Some(ADMIN), "application/yaml", Some(doc));
    assert_eq!(st, 200);
    assert_eq!(s.verdict("10.0.0.1", "10.0.0.11", 502), 1, "modbus rule gone");
    assert_eq!(s.admin("GET", "/rules", None).1, json!([]));

    let (st, status) = s.admin("GET", "/status", None);
    assert_eq!(st, 200);
    assert_eq!(status["objects"], json!({"assets": 1, "segments": 1, "rules": 0}));
    // The apply changed what packets see, so the epoch moved (a change that writes no map entry
    // leaves it where it is).
    assert!(status["epoch"].as_u64().unwrap() > epoch_before, "{status}");
    let audit = s.admin("GET", "/audit", None).1;
    assert_eq!(audit[0]["actor"], "admin");
    assert_eq!(audit[0]["action"], "apply");

    // The store holds exactly the state, across a reopen.
    let stored = Store::open(&s.store_path).unwrap().load().unwrap();
    assert_eq!(&stored, s.control.lock().doc());
}

#[test]
fn refused_requests_change_nothing() {
    let s = Server::start("refused");
    seed(&s);
    let before_audit = s.audit_len();
    let before_rules = s.admin("GET", "/rules", None).1;
    let epoch = s.admin("GET", "/status", None).1["epoch"].clone();

    // Auth.
    assert_eq!(s.call("GET", "/assets", None, "", None).0, 401);
    assert_eq!(s.call("GET", "/assets", Some("wrong-token-0123456789"), "", None).0, 401);
    assert_eq!(s.call("GET", "/assets", Some(READER), "", None).0, 200);
    let (st, p) = s.call("PUT", "/assets/x", Some(READER), "application/json", Some(r#"{"ips": ["10.0.0.9"]}"#));
    assert_eq!(st, 403, "{p}");
    assert_eq!(p["status"], 403);

    // Validation: precise, nothing applied.
    let (st, p) = s.admin("PUT", "/rules/bad", Some(json!({"from": "nope", "to": "plc"})));
    assert_eq!(st, 422, "{p}");
    assert_eq!(
        p["errors"][0],
        json!({"entry": "rules[1] \"bad\"", "field": "from", "reason": "unknown segment \"nope\""})
    );
    let (st, p) = s.admin("PUT", "/assets/x", Some(json!({"ips": ["10.0.0.300"]})));
    assert_eq!((st, p["errors"][0]["field"].as_str()), (422, Some("ips")));
    let (st, p) = s.admin("PUT", "/segments/s", Some(json!({"selector": "role in (x"})));
    assert_eq!((st, p["errors"][0]["field"].as_str()), (422, Some("selector")));
    let (st, p) = s.admin("PUT", "/assets/x", Some(json!({"ips": ["10.0.0.9"], "tagz": {}})));
    assert!(st == 400 && p["detail"].as_str().unwrap().contains("unknown field `tagz`"), "{st} {p}");
    let (st, _) = s.call("PUT", "/assets/x", Some(ADMIN), "application/json", Some("{not json"));
    assert_eq!(st, 400);
    let (st, _) = s.call("PUT", "/assets/x", Some(ADMIN), "text/plain", Some("{}"));
    assert_eq!(st, 415);
    let (st, _) = s.admin("PUT", "/assets/x", Some(json!({"name": "y", "ips": []})));
    assert_eq!(st, 400, "name in the body must match the path");
    assert_eq!(s.admin("GET", "/assets/nope", None).0, 404);
    assert_eq!(s.admin("DELETE", "/rules/nope", None).0, 404);
    let (st, p) = s.admin("DELETE", "/segments/plc", None);
    assert!(st == 409 && p["detail"].as_str().unwrap().contains("modbus"), "{st} {p}");

    assert_eq!(s.audit_len(), before_audit, "refused requests are not in the audit log");
    assert_eq!(s.admin("GET", "/rules", None).1, before_rules);
    assert_eq!(s.admin("GET", "/status", None).1["epoch"], epoch, "the data plane did not move");
    assert_eq!(s.verdict("10.0.0.1", "10.0.0.11", 502), 2);

    // The OpenAPI document is served and names the endpoints.
    let (st, doc) = s.call("GET", "/openapi.json", None, "", None);
    assert_eq!(st, 200);
    assert!(doc["paths"]["/api/v1/assets/{name}"]["patch"].is_object());
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(dir) = self.store_path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// One raw HTTP/1.1 request (for headers a client library would not send); returns the status.
fn raw(s: &Server, request: &[u8]) -> u16 {
    raw_response(s, request).0
}

/// One raw HTTP/1.1 request (`Connection: close`); returns the status and the whole response.
fn raw_response(s: &Server, request: &[u8]) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let addr = s.base.trim_start_matches("http://").split('/').next().unwrap().to_string();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    c.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    (text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

#[test]
fn auth_scheme_head_and_content_type_follow_http() {
    let s = Server::start("http-rules");
    seed(&s);
    let body = r#"{"ips": ["10.0.0.9"]}"#;
    let req = |auth: &str, method: &str, ct: &[u8]| -> Vec<u8> {
        let mut r = format!(
            "{method} /api/v1/assets/x HTTP/1.1\r\nHost: gk\r\nAuthorization: {auth}\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: ",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(ct);
        r.extend_from_slice(b"\r\n\r\n");
        r.extend_from_slice(body.as_bytes());
        r
    };
    // RFC 9110: the scheme is case-insensitive.
    assert_eq!(raw(&s, &req(&format!("bearer {ADMIN}"), "PUT", b"application/json")), 200);
    // A reader may HEAD what it may GET, and still not write.
    let head = format!(
        "HEAD /api/v1/assets HTTP/1.1\r\nHost: gk\r\nAuthorization: Bearer {READER}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(raw(&s, head.as_bytes()), 200);
    assert_eq!(raw(&s, &req(&format!("Bearer {READER}"), "PUT", b"application/json")), 403);
    // A Content-Type that is not ASCII is no JSON: 415, and nothing changes.
    let before = s.audit_len();
    assert_eq!(raw(&s, &req(&format!("Bearer {ADMIN}"), "PUT", b"application/j\xc3\xa9son")), 415);
    assert_eq!(s.audit_len(), before);
}

#[test]
fn parallel_merge_patches_on_one_asset_lose_nothing() {
    let s = Server::start("parallel-patch");
    seed(&s);
    let rounds = 20;
    std::thread::scope(|scope| {
        for t in 0..8 {
            let s = &s;
            scope.spawn(move || {
                for r in 0..rounds {
                    let patch = if t == 7 && r == rounds / 2 {
                        // The isolation among them: it must not be undone by a stale read.
                        json!({"tags": {"role": null}})
                    } else {
                        json!({"tags": {format!("t{t}"): format!("r{r}")}})
                    };
                    let body = patch.to_string();
                    let (st, v) =
                        s.call("PATCH", "/assets/plc-1", Some(ADMIN), "application/merge-patch+json", Some(&body));
                    assert_eq!(st, 200, "{v}");
                }
            });
        }
    });
    let (st, asset) = s.admin("GET", "/assets/plc-1", None);
    assert_eq!(st, 200);
    let tags = asset["tags"].as_object().unwrap();
    assert!(!tags.contains_key("role"), "the untag was lost: {tags:?}");
    for t in 0..8 {
        assert_eq!(tags[&format!("t{t}")], format!("r{}", rounds - 1), "thread {t}'s last patch was lost: {tags:?}");
    }
    let stored = Store::open(&s.store_path).unwrap().load().unwrap();
    assert_eq!(&stored, s.control.lock().doc(), "the store holds what is enforced");
}

#[test]
fn a_rule_created_through_the_api_expires_at_its_second() {
    let s = Server::start("expiry");
    seed(&s);
    assert_eq!(s.verdict("10.0.0.2", "10.0.0.11", 502), 1, "eng -> plc denied");
    // Whole seconds: `expires` is RFC 3339; the rule must stop matching within a second of it.
    let expires = chrono::Utc::now() + chrono::Duration::seconds(3);
    let expires = expires.with_nanosecond(0).unwrap();
    let rule = json!({"from": "any", "to": "plc", "protocol": "tcp", "ports": [502], "expires": expires.to_rfc3339()});
    assert_eq!(s.admin("PUT", "/rules/temporary", Some(rule)).0, 200);
    assert_eq!(s.verdict("10.0.0.2", "10.0.0.11", 502), 2, "allowed while the rule lives");
    // Bounded: the expiry plus 1.5 s.
    let deadline = expires + chrono::Duration::milliseconds(1500);
    let mut denied_at = None;
    while chrono::Utc::now() < deadline {
        if s.verdict("10.0.0.2", "10.0.0.11", 502) == 1 {
            denied_at = Some(chrono::Utc::now());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let denied_at = denied_at.expect("the rule created through the API never expired");
    assert!(denied_at >= expires, "denied before its expiry: {denied_at} < {expires}");
}

#[test]
fn a_deeply_nested_document_is_refused_before_parsing() {
    let s = Server::start("nested");
    seed(&s);
    let before = (s.audit_len(), s.admin("GET", "/rules", None).1);
    // 200 KB of nesting: a parser fed this spends seconds of CPU.
    let deep = format!("assets: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let (st, p) = s.call("POST", "/apply", Some(ADMIN), "application/yaml", Some(&deep));
    assert_eq!(st, 400, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("nested deeper than"), "{p}");
    assert_eq!((s.audit_len(), s.admin("GET", "/rules", None).1), before, "nothing changed");
}

#[test]
fn apply_never_opens_the_network_by_accident() {
    let s = Server::start("guarded-apply");
    seed(&s);
    let (st, rules_before) = s.admin("GET", "/segments", None);
    assert_eq!(st, 200);
    let audit = s.audit_len();
    // An empty document without prune deletes nothing.
    let (st, d) = s.call("POST", "/apply", Some(ADMIN), "application/json", Some("{}"));
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["changes"], json!([]), "a non-pruning apply of nothing changes nothing");
    assert_eq!(s.admin("GET", "/segments", None).1, rules_before);
    assert_eq!(s.verdict("10.0.0.2", "10.0.0.11", 502), 1, "still denied");
    // With prune it would delete every segment: refused, saying how much would open.
    let (st, p) = s.call("POST", "/apply?prune=true", Some(ADMIN), "application/json", Some("{}"));
    assert_eq!(st, 409, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("no segment in enforce mode"), "{p}");
    assert_eq!(s.audit_len(), audit, "refused: nothing recorded");
    assert_eq!(s.verdict("10.0.0.2", "10.0.0.11", 502), 1, "refused: nothing enforced");
    // Switching the enforce segment to label is the same opening, without prune.
    let label = r#"{"segments": [{"name": "plc", "selector": "role=plc", "mode": "label"}]}"#;
    let (st, p) = s.call("POST", "/apply", Some(ADMIN), "application/json", Some(label));
    assert_eq!(st, 409, "{p}");
    // A dry run tells how governance would move.
    let (st, d) =
        s.call("POST", "/apply?dry_run=true&prune=true&force=true", Some(ADMIN), "application/json", Some("{}"));
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["governance"]["governed_before"], 1, "{d}");
    assert_eq!(d["governance"]["newly_ungoverned"], 1, "{d}");
    assert_eq!(s.verdict("10.0.0.2", "10.0.0.11", 502), 1, "a dry run applies nothing");
    // Forced, it is applied: the operator said so.
    let (st, d) = s.call("POST", "/apply?prune=true&force=true", Some(ADMIN), "application/json", Some("{}"));
    assert_eq!(st, 200, "{d}");
    assert_eq!(s.admin("GET", "/segments", None).1, json!([]));
    assert_eq!(s.verdict("10.0.0.2", "10.0.0.11", 502), 2, "ungoverned now, as forced");
}

#[test]
fn if_match_writes_only_the_version_that_was_read() {
    let s = Server::start("if-match");
    seed(&s);
    let req = |method: &str, extra: &str, body: &str| -> Vec<u8> {
        format!(
            "{method} /api/v1/assets/plc-1 HTTP/1.1\r\nHost: gk\r\nAuthorization: Bearer {ADMIN}\r\nConnection: close\r\n{extra}Content-Type: application/merge-patch+json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let etag_of = |text: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix("etag: ").or_else(|| l.strip_prefix("ETag: ")))
            .map(|t| t.trim().to_string())
            .unwrap_or_else(|| panic!("no ETag in {text}"))
    };
    let (st, text) = raw_response(&s, &req("GET", "", ""));
    assert_eq!(st, 200, "{text}");
    let read = etag_of(&text);
    // Someone else changes the asset after we read it.
    let (st, text) = raw_response(&s, &req("PATCH", "", r#"{"tags": {"site": "a"}}"#));
    assert_eq!(st, 200, "{text}");
    let now = etag_of(&text);
    assert_ne!(read, now, "the version tag follows the asset");
    // Our write, made against what we read, is refused and changes nothing.
    let before = s.audit_len();
    let stale = format!("If-Match: {read}\r\n");
    let (st, text) = raw_response(&s, &req("PATCH", &stale, r#"{"tags": {"role": null}}"#));
    assert_eq!(st, 412, "{text}");
    assert_eq!(s.audit_len(), before, "refused: nothing recorded");
    assert_eq!(s.admin("GET", "/assets/plc-1", None).1["tags"]["role"], "plc");
    // Against the current version it applies.
    let fresh = format!("If-Match: {now}\r\n");
    assert_eq!(raw_response(&s, &req("PATCH", &fresh, r#"{"tags": {"role": null}}"#)).0, 200);
    assert!(s.admin("GET", "/assets/plc-1", None).1["tags"].get("role").is_none());
    // `*` matches any existing asset, and none that does not exist.
    let any = "If-Match: *\r\n";
    let missing = format!(
        "DELETE /api/v1/assets/nope HTTP/1.1\r\nHost: gk\r\nAuthorization: Bearer {ADMIN}\r\nConnection: close\r\n{any}\r\n"
    );
    assert_eq!(raw(&s, missing.as_bytes()), 412);
    assert_eq!(raw_response(&s, &req("PATCH", any, r#"{"tags": {"x": "y"}}"#)).0, 200);
}
