//! The API keeps to its OpenAPI document: the document gatekeeper serves is checked by a real
//! validator (`openapi-spec-validator`), then a schema-based fuzzer (`schemathesis`) drives the
//! live API through every operation and fails on any response the document does not describe
//! (status, content type, headers, body schema) and on any 5xx. Every error is
//! `application/problem+json`, axum's own (unknown route, wrong method, bad query, body over
//! the limit) included. The tools come from a venv the tests create (`gatekeeper_tests::python`).

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use gatekeeper::{
    api::serve::serve,
    control::{Handle, auth::Tokens},
    daemon::http_router,
};
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-0123456789";
const READER: &str = "reader-token-0123456789";
/// The keys of a path item that are operations.
const METHODS: [&str; 8] = ["get", "put", "post", "delete", "patch", "head", "options", "trace"];
/// Small, so the 413 test does not have to send megabytes.
const MAX_BODY: usize = 64 * 1024;

struct Server {
    addr: SocketAddr,
    dir: PathBuf,
    control: Handle,
    agent: ureq::Agent,
    _rt: tokio::runtime::Runtime,
}

impl Server {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("gk-contract-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let control = gatekeeper_tests::control::control(&dir.join("state.db"));
        // The Netskope worker runs as in the daemon, so a sync the fuzzer asks for is answered.
        gatekeeper::netskope_sync::spawn(control.clone()).unwrap();
        let router = http_router(&control, &Tokens::admin_reader(Some(ADMIN), Some(READER)), MAX_BODY).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        // The daemon's own server, which tells handlers the client's address.
        rt.spawn(async move { serve(listener, None, router).await });
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        Self { addr, dir, control, agent, _rt: rt }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A request with the admin token: status, content type, body as JSON (or `Null`), and
    /// the `Allow` header.
    fn call(&self, method: &str, path: &str, body: Option<(&str, &str)>) -> (u16, String, Value, String) {
        let url = self.url(path);
        let auth = format!("Bearer {ADMIN}");
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &auth).call(),
            (m, Some((ct, b))) => {
                let req = match m {
                    "PUT" => self.agent.put(&url),
                    "PATCH" => self.agent.patch(&url),
                    _ => self.agent.post(&url),
                };
                req.header("Authorization", &auth).content_type(ct).send(b)
            }
            ("POST", None) => self.agent.post(&url).header("Authorization", &auth).send_empty(),
            _ => panic!("bad call"),
        };
        let mut resp = resp.expect("request");
        let status = resp.status().as_u16();
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let (ct, allow) = (header("content-type"), header("allow"));
        let text = resp.body_mut().with_config().limit(16 << 20).read_to_string().unwrap_or_default();
        (status, ct, serde_json::from_str(&text).unwrap_or(Value::Null), allow)
    }
}

impl Server {
    /// A request head announcing a JSON body of `len` bytes, and a few of them: the status,
    /// content type and body of the answer.
    fn raw_head(&self, method: &str, path: &str, len: usize) -> (u16, String, Value, String) {
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect(self.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: gk\r\nAuthorization: Bearer {ADMIN}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{{"
        );
        c.write_all(head.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let ct = head
            .lines()
            .find_map(|l| l.strip_prefix("content-type: ").or_else(|| l.strip_prefix("Content-Type: ")))
            .unwrap_or("")
            .to_string();
        (status, ct, serde_json::from_str(body.trim()).unwrap_or(Value::Null), String::new())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn seed(s: &Server) {
    for (name, ip, role) in [("hmi-1", "10.0.0.1", "hmi"), ("plc-1", "10.0.0.11", "plc")] {
        let body = json!({"ips": [ip], "tags": {"role": role}}).to_string();
        assert_eq!(s.call("PUT", &format!("/api/v1/assets/{name}"), Some(("application/json", &body))).0, 200);
    }
    for (name, body) in [
        ("hmi", json!({"selector": "role=hmi", "mode": "label"})),
        ("plc", json!({"selector": "role=plc", "mode": "monitor"})),
    ] {
        let b = body.to_string();
        assert_eq!(s.call("PUT", &format!("/api/v1/segments/{name}"), Some(("application/json", &b))).0, 200);
    }
    let rule = json!({"from": "hmi", "to": "plc", "protocol": "tcp", "ports": [502]}).to_string();
    assert_eq!(s.call("PUT", "/api/v1/rules/modbus", Some(("application/json", &rule))).0, 200);
}

fn run(cmd: &mut Command, timeout: Duration) -> (bool, String) {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            return (status.success(), text);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{cmd:?} took longer than {timeout:?}:\n{}", String::from_utf8_lossy(&out.stdout));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_served_document_is_valid_openapi_and_describes_every_route() {
    let s = Server::start("document");
    let (st, ct, doc, _) = s.call("GET", "/api/v1/openapi.json", None);
    assert_eq!((st, ct.as_str()), (200, "application/json"));
    assert_eq!(doc["openapi"], "3.1.0");

    // Every operation has an operationId, a tag, and its errors as problem+json; every route
    // the router serves is in the document, this document's own included.
    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            assert!(ids.insert(id.to_string()), "operationId {id} twice");
            assert!(op["tags"].as_array().is_some_and(|t| !t.is_empty()), "{id}: no tag");
            for (status, resp) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    assert!(
                        resp["content"]["application/problem+json"].is_object(),
                        "{id}: error {status} is not problem+json: {resp}"
                    );
                }
            }
            let public = path == "/api/v1/openapi.json";
            assert_eq!(op["responses"]["401"].is_object(), !public, "{id}: 401 listed iff it needs a token");
        }
    }
    let want = [
        "/api/v1/assets",
        "/api/v1/assets/{name}",
        "/api/v1/segments",
        "/api/v1/segments/{name}",
        "/api/v1/segments/{name}/members",
        "/api/v1/rules",
        "/api/v1/rules/{name}",
        "/api/v1/apply",
        "/api/v1/status",
        "/api/v1/audit",
        "/api/v1/integrations/netskope",
        "/api/v1/integrations/netskope/sync",
        "/api/v1/integrations/netskope/apps",
        "/api/v1/integrations/netskope/apps/{id}",
        "/api/v1/integrations/netskope/apps/{id}/suggestions",
        "/api/v1/tokens",
        "/api/v1/tokens/{name}",
        "/api/v1/openapi.json",
        "/metrics",
    ];
    let have: Vec<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(have.len(), want.len(), "{have:?}");
    for p in want {
        assert!(have.contains(&p), "{p} is not in the document: {have:?}");
    }
    // The drift the hand-written document had: a listing's `generated` marker is in its schema,
    // YAML is a documented body of /apply, tag values are text or scalars.
    let schemas = &doc["components"]["schemas"];
    assert!(schemas["SegmentListed"]["properties"]["generated"].is_object(), "{}", schemas["SegmentListed"]);
    assert_eq!(schemas["Segment"]["additionalProperties"], false);
    assert!(doc["paths"]["/api/v1/apply"]["post"]["requestBody"]["content"]["application/yaml"].is_object());
    assert_eq!(schemas["Scalar"]["type"], json!(["string", "number", "boolean"]));

    let file = s.dir.join("openapi.json");
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let bin = gatekeeper_tests::python::venv_bin();
    let (ok, out) = run(Command::new(bin.join("openapi-spec-validator")).arg(&file), Duration::from_secs(120));
    assert!(ok, "openapi-spec-validator refused the document:\n{out}");
    assert!(out.contains("OK"), "{out}");
    // A broken document is refused by the same command (the validator is not a no-op).
    let mut broken = doc.clone();
    broken["paths"]["/api/v1/status"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] =
        json!({"$ref": "#/components/schemas/NoSuchSchema"});
    std::fs::write(&file, serde_json::to_string(&broken).unwrap()).unwrap();
    let (ok, out) = run(Command::new(bin.join("openapi-spec-validator")).arg(&file), Duration::from_secs(120));
    assert!(!ok, "a dangling $ref passed validation:\n{out}");
}

#[test]
fn every_error_is_problem_json() {
    let s = Server::start("problems");
    seed(&s);
    let problem = |what: &str, (st, ct, body, _): &(u16, String, Value, String), status: u16, slug: &str| {
        assert_eq!(*st, status, "{what}: {body}");
        assert_eq!(ct, "application/problem+json", "{what}");
        assert_eq!(body["status"], status, "{what}: {body}");
        assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()), "{what}: {body}");
        assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()), "{what}: {body}");
        let ty = body["type"].as_str().unwrap_or("");
        assert!(ty.ends_with(&format!("docs/problems.md#{slug}")), "{what}: type {ty}");
    };
    let r = s.call("GET", "/api/v1/no-such-thing", None);
    problem("unknown route", &r, 404, "no-route");
    let r = s.call("GET", "/nothing/at/all", None);
    problem("unknown route outside the API", &r, 404, "no-route");
    let r = s.call("POST", "/api/v1/status", Some(("application/json", "{}")));
    problem("wrong method", &r, 405, "method-not-allowed");
    assert!(r.3.contains("GET"), "a 405 keeps its Allow header: {:?}", r.3);
    let r = s.call("POST", "/api/v1/apply?dry_run=maybe", Some(("application/json", "{}")));
    problem("bad query", &r, 400, "invalid-query");
    assert!(r.2["detail"].as_str().unwrap().contains("dry_run"), "{}", r.2);
    let r = s.call("GET", "/api/v1/audit?limit=-3", None);
    problem("bad query", &r, 400, "invalid-query");
    // A body over the limit is refused from its Content-Length, before it is read: sent raw,
    // since a client still writing the body may see the connection close before the answer.
    let r = s.raw_head("POST", "/api/v1/apply?dry_run=true", MAX_BODY + 1);
    problem("body over the limit", &r, 413, "body-too-large");
    // One object's body is held to 1 MiB whatever the apply limit.
    let r = s.raw_head("PUT", "/api/v1/assets/x", gatekeeper::api::OBJECT_BODY_LIMIT + 1);
    problem("object body over its limit", &r, 413, "body-too-large");
    let r = s.call("PUT", "/api/v1/assets/x", Some(("text/plain", "{}")));
    problem("media type", &r, 415, "unsupported-media-type");
    let r = s.call("PUT", "/api/v1/assets/x", Some(("application/json", "{not json")));
    problem("broken JSON", &r, 400, "invalid-body");
    let r = s.call("PUT", "/api/v1/assets/x", Some(("application/json", r#"{"ips": ["not an address"]}"#)));
    problem("invalid policy", &r, 422, "invalid-policy");
    assert!(r.2["errors"][0]["field"].is_string(), "{}", r.2);
    let r = s.call("GET", "/api/v1/assets/nope", None);
    problem("missing object", &r, 404, "not-found");
    let r = s.call("GET", "/api/v1/integrations/netskope/apps/abc", None);
    problem("bad app id", &r, 400, "bad-request");
    let unauth = s.agent.get(s.url("/api/v1/status")).call().unwrap();
    assert_eq!(unauth.status().as_u16(), 401);
    assert_eq!(unauth.headers().get("www-authenticate").unwrap(), "Bearer", "a 401 says how to authenticate");
    assert_eq!(unauth.headers().get("content-type").unwrap(), "application/problem+json");
    let metrics = s.agent.get(s.url("/metrics")).call().unwrap();
    assert_eq!(metrics.status().as_u16(), 401);
    assert_eq!(metrics.headers().get("content-type").unwrap(), "application/problem+json", "/metrics too");
    // Refused requests changed nothing.
    assert_eq!(s.call("GET", "/api/v1/assets", None).2.as_array().map(Vec::len), Some(2));
}

#[test]
fn the_audit_log_records_the_token_name_and_client_address() {
    let s = Server::start("audit");
    seed(&s);
    let (st, _, rows, _) = s.call("GET", "/api/v1/audit?limit=1", None);
    assert_eq!(st, 200);
    assert_eq!(rows[0]["actor"], "admin", "{rows}");
    assert_eq!(rows[0]["address"], "127.0.0.1", "{rows}");
    assert_eq!(rows[0]["name"], "modbus");
    // The control path's own changes have no address.
    s.control
        .lock()
        .put_rule(&"test".into(), serde_json::from_value(json!({"name": "x", "from": "any", "to": "plc"})).unwrap())
        .unwrap();
    let (_, _, rows, _) = s.call("GET", "/api/v1/audit?limit=1", None);
    assert_eq!((rows[0]["actor"].as_str(), rows[0]["address"].as_str()), (Some("test"), None), "{rows}");
}

#[test]
fn tokens_created_through_the_api_act_at_once_survive_a_restart_and_are_revoked_at_once() {
    let s = Server::start("tokens");
    seed(&s);
    let body = json!({"name": "ci-bot", "role": "reader"}).to_string();
    let (st, _, created, _) = s.call("POST", "/api/v1/tokens", Some(("application/json", &body)));
    assert_eq!(st, 201, "{created}");
    let secret = created["token"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 64, "256 random bits, hex");
    let with = |token: &str, method: &str| -> u16 {
        let req = match method {
            "GET" => s.agent.get(s.url("/api/v1/assets")).header("Authorization", &format!("Bearer {token}")).call(),
            _ => s
                .agent
                .put(s.url("/api/v1/assets/x"))
                .header("Authorization", &format!("Bearer {token}"))
                .content_type("application/json")
                .send("{}"),
        };
        req.unwrap().status().as_u16()
    };
    assert_eq!(with(&secret, "GET"), 200, "accepted at once");
    assert_eq!(with(&secret, "PUT"), 403, "as a reader");
    let (_, _, list, _) = s.call("GET", "/api/v1/tokens", None);
    assert!(list.to_string().contains(r#"{"name":"ci-bot","origin":"api","role":"reader"}"#), "{list}");
    assert!(list.to_string().contains(r#"{"name":"admin","origin":"file","role":"admin"}"#), "{list}");
    assert!(!list.to_string().contains(&secret), "no secret in the listing");
    // Taken names, the daemon's names and bad ones are refused.
    let (st, ..) = s.call("POST", "/api/v1/tokens", Some(("application/json", &body)));
    assert_eq!(st, 409);
    let (st, ..) =
        s.call("POST", "/api/v1/tokens", Some(("application/json", r#"{"name": "Daemon", "role": "admin"}"#)));
    assert_eq!(st, 422);
    let (st, ..) = s.call("POST", "/api/v1/tokens", Some(("application/json", r#"{"name": "x", "role": "root"}"#)));
    assert_eq!(st, 400);
    // A file's token is not revoked through the API.
    assert_eq!(s.call("DELETE", "/api/v1/tokens/admin", None).0, 409);

    // Kept in the store (its hash only): a daemon started on the same store accepts it.
    let restarted = gatekeeper_tests::control::control(&s.dir.join("state.db"));
    assert!(restarted.credentials().get("ci-bot").is_some(), "survives a restart");
    let db = std::fs::read(s.dir.join("state.db")).unwrap();
    assert!(!db.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is not in the store");

    assert_eq!(s.call("DELETE", "/api/v1/tokens/ci-bot", None).0, 204);
    assert_eq!(with(&secret, "GET"), 401, "refused from the next request on");
    assert_eq!(s.call("DELETE", "/api/v1/tokens/ci-bot", None).0, 404);
    let (_, _, audit, _) = s.call("GET", "/api/v1/audit?limit=3", None);
    let rows: Vec<(&str, &str, &str)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["actor"].as_str().unwrap(), r["address"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(rows[..2], [("revoke token", "admin", "127.0.0.1"), ("create token", "admin", "127.0.0.1")], "{audit}");
    assert!(!audit.to_string().contains(&secret), "no secret in the audit log");
}

#[test]
fn a_schema_fuzzer_finds_no_response_the_document_does_not_describe() {
    let s = Server::start("fuzz");
    seed(&s);
    let (_, _, doc, _) = s.call("GET", "/api/v1/openapi.json", None);
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().keys().filter(|k| METHODS.contains(&k.as_str())).count())
        .sum();
    let bin = gatekeeper_tests::python::venv_bin();
    let report = s.dir.join("report.json");
    // From a file, not the URL: loaded from its URL, schemathesis leaves that operation out.
    let file = s.dir.join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let examples = std::env::var("GK_FUZZ_EXAMPLES").unwrap_or_else(|_| "25".into());
    let mut cmd = Command::new(bin.join("schemathesis"));
    cmd.current_dir(&s.dir)
        .env("SCHEMATHESIS_HOOKS", "")
        .arg("run")
        .arg(&file)
        .args(["--url", &s.url("")])
        .args(["-H", &format!("Authorization: Bearer {ADMIN}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,\
             response_schema_conformance,negative_data_rejection,unsupported_method,missing_required_header,\
             ignored_auth",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", &examples, "--seed", "1104", "--workers", "2", "--no-color"])
        .args(["--request-timeout", "30", "--generation-database", "none", "--suppress-health-check", "all"])
        .args(["--report", "json", "--report-json-path"])
        .arg(&report);
    let (ok, out) = run(&mut cmd, Duration::from_secs(900));
    assert!(ok, "schemathesis found responses the document does not describe:\n{out}");
    // It really ran every operation, and generated cases for them.
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&report).expect("the JSON report")).unwrap();
    let ops = &summary["operations"];
    assert_eq!(
        (ops["selected"].as_u64(), ops["tested"].as_u64()),
        (Some(operations as u64), Some(operations as u64)),
        "{ops}"
    );
    assert_eq!((ops["skipped"].as_u64(), ops["errored"].as_u64()), (Some(0), Some(0)), "{ops}");
    let generated = summary["test_cases"]["generated"].as_u64().unwrap_or(0);
    assert!(generated >= 10 * operations as u64, "only {generated} test cases for {operations} operations");
    eprintln!("schemathesis: {operations} operations, {generated} test cases, no failure");
}
