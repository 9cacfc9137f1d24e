//! A fake Netskope One tenant served by axum: the REST API v2 shapes and behaviour gatekeeper's
//! Netskope client must cope with (wrapped responses, bracketed names, `app_id`/`app_name` in the
//! list but `id`/`name` by id, hosts as one comma-separated string, PATCH replacing the whole host
//! list, the 500-host cap, publisher addresses refused, ~4 requests/s with 429 and `Retry-After`),
//! plus faults a test injects (429 storms, 5xx, HTTP 200 with `"status": "error"`, outages).
//!
//! The server runs on its own thread and tokio runtime, so plain `#[test]`s can use it. Every
//! request is handled under one lock of the shared state: the checks (outage, token, faults, rate
//! limit), the change and the log entry happen together, so the log order is the order the fake
//! decided in.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{FromRequest, Request, State as AxState},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::sync::watch;

/// Netskope refuses a private app with more hosts than this.
pub const MAX_HOSTS: usize = 500;

/// Largest request body read; 500 hosts fit many times over.
const BODY_LIMIT: usize = 1 << 20;

/// How long Drop lets open connections finish before the server is cut off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A fault to answer with instead of the real response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// 429 with `Retry-After` and `RateLimit-Reset` set to `retry_after_secs`.
    RateLimited { retry_after_secs: u64 },
    /// 429 with `Retry-After` as an HTTP date `retry_after_secs` from now (the date has whole
    /// seconds, so the wait it means is a little shorter), and no `RateLimit-Reset`.
    RateLimitedUntil { retry_after_secs: u64 },
    /// This status code. 502, 503 and 504 come with an HTML body, as a gateway in front of the
    /// tenant sends them; any other code with a wrapped JSON error. An invalid code becomes 500.
    ServerError(u16),
    /// HTTP 200 with `{"status": "error", "message": ...}`.
    StatusError(String),
}

/// One HTTP request the tenant received.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    /// The request target as received (path and query, if any).
    pub path: String,
    pub status: u16,
    pub token_ok: bool,
    pub body: String,
    /// When the request was handled.
    pub at: Instant,
}

#[derive(Debug, Clone)]
struct App {
    name: String,
    hosts: Vec<String>,
    /// (transport, port spec)
    protocols: Vec<(String, String)>,
    publishers: Vec<u64>,
    tags: Vec<String>,
}

#[derive(Debug, Clone)]
struct Publisher {
    name: String,
    ip: String,
    status: String,
}

#[derive(Debug)]
struct State {
    token: String,
    apps: BTreeMap<u64, App>,
    publishers: BTreeMap<u64, Publisher>,
    /// One counter for apps and publishers, so an id never names both.
    next_id: u64,
    rate_limit: Option<u32>,
    /// Requests admitted in the last second (the sliding window).
    window: VecDeque<Instant>,
    faults: VecDeque<Failure>,
    write_faults: VecDeque<Failure>,
    /// PATCHes to apply and then answer with a 504, as if the reply were lost on the way.
    lost_replies: usize,
    outage: bool,
    log: Vec<Logged>,
    patches: BTreeMap<u64, usize>,
}

type Shared = Arc<Mutex<State>>;

/// A running fake tenant; dropping it stops the server.
pub struct FakeTenant {
    state: Shared,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeTenant {
    /// Listens on 127.0.0.1 on a free port.
    pub fn start(token: &str) -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").expect("bind the fake tenant"), token)
    }

    /// Serves on a listener the caller created (e.g. inside a network namespace: a socket belongs
    /// to the netns it was created in, whichever thread serves it later).
    pub fn start_on(listener: TcpListener, token: &str) -> Self {
        let addr = listener.local_addr().expect("fake tenant listener address");
        listener.set_nonblocking(true).expect("fake tenant listener nonblocking");
        let state = Arc::new(Mutex::new(State {
            token: token.to_string(),
            apps: BTreeMap::new(),
            publishers: BTreeMap::new(),
            next_id: 100,
            rate_limit: Some(4),
            window: VecDeque::new(),
            faults: VecDeque::new(),
            write_faults: VecDeque::new(),
            lost_replies: 0,
            outage: false,
            log: Vec::new(),
            patches: BTreeMap::new(),
        }));
        // Built here rather than in the thread so a failure panics in the test that asked.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("fake tenant runtime");
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(listener).expect("fake tenant tokio listener")
        };
        let router = Router::new()
            .route("/api/v2/steering/apps/private", get(list_apps))
            .route("/api/v2/steering/apps/private/{id}", get(get_app).patch(patch_app))
            .route("/api/v2/infrastructure/publishers", get(list_publishers))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .with_state(state.clone());
        let (shutdown, rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("fake-netskope".into())
            .spawn(move || {
                let mut grace_rx = rx.clone();
                let mut signal_rx = rx;
                rt.block_on(async move {
                    let serve = axum::serve(listener, router)
                        .with_graceful_shutdown(async move {
                            // A dropped sender counts as shutdown too.
                            let _ = signal_rx.wait_for(|stop| *stop).await;
                        })
                        .into_future();
                    // Graceful shutdown waits for every open connection; a client that keeps
                    // one half-written must not make Drop hang.
                    let cutoff = async move {
                        let _ = grace_rx.wait_for(|stop| *stop).await;
                        tokio::time::sleep(SHUTDOWN_GRACE).await;
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = cutoff => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(500));
            })
            .expect("spawn the fake tenant thread");
        Self { state, addr, shutdown, thread: Some(thread) }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A panicking test thread must not poison the fake for the others' asserts.
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// `http://IP:PORT`, without `/api/v2`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds a private app (`name` without brackets; served with them) and returns its id.
    /// `protocols` are (transport, port spec) pairs, e.g. `("tcp", "22,502,1024-2048")`.
    pub fn add_app(&self, name: &str, hosts: &[&str], protocols: &[(&str, &str)]) -> u64 {
        self.with(|s| {
            s.next_id += 1;
            let app = App {
                name: name.to_string(),
                hosts: clean_hosts(hosts.iter().copied()),
                protocols: protocols.iter().map(|(t, p)| (t.to_string(), p.to_string())).collect(),
                publishers: Vec::new(),
                tags: Vec::new(),
            };
            s.apps.insert(s.next_id, app);
            s.next_id
        })
    }

    pub fn delete_app(&self, id: u64) {
        self.with(|s| s.apps.remove(&id));
    }

    /// The app's current hosts in order (empty for an unknown app).
    pub fn hosts(&self, id: u64) -> Vec<String> {
        self.with(|s| s.apps.get(&id).map(|a| a.hosts.clone()).unwrap_or_default())
    }

    /// An admin editing the host list in the Netskope UI: no rate limit, not logged, not counted
    /// as a PATCH.
    pub fn set_hosts(&self, id: u64, hosts: &[&str]) {
        self.with(|s| {
            if let Some(a) = s.apps.get_mut(&id) {
                a.hosts = clean_hosts(hosts.iter().copied());
            }
        });
    }

    /// An admin setting the app's tags.
    pub fn set_tags(&self, id: u64, tags: &[&str]) {
        self.with(|s| {
            if let Some(a) = s.apps.get_mut(&id) {
                a.tags = tags.iter().map(|t| t.to_string()).collect();
            }
        });
    }

    /// Adds a connected publisher whose address is `ip` and returns its id.
    pub fn add_publisher(&self, name: &str, ip: &str) -> u64 {
        self.with(|s| {
            s.next_id += 1;
            let publisher = Publisher { name: name.to_string(), ip: ip.to_string(), status: "connected".into() };
            s.publishers.insert(s.next_id, publisher);
            s.next_id
        })
    }

    /// Sets a publisher's `status` as listed (`"connected"`, `"not registered"`, ...).
    pub fn set_publisher_status(&self, id: u64, status: &str) {
        self.with(|s| {
            if let Some(p) = s.publishers.get_mut(&id) {
                p.status = status.to_string();
            }
        });
    }

    /// Assigns a publisher to an app; the first one assigned is the primary.
    pub fn assign_publisher(&self, app: u64, publisher: u64) {
        self.with(|s| {
            if let Some(a) = s.apps.get_mut(&app)
                && !a.publishers.contains(&publisher)
            {
                a.publishers.push(publisher);
            }
        });
    }

    /// Removes a publisher and its assignments.
    pub fn remove_publisher(&self, id: u64) {
        self.with(|s| {
            s.publishers.remove(&id);
            for a in s.apps.values_mut() {
                a.publishers.retain(|p| *p != id);
            }
        });
    }

    /// Requests admitted in any one-second window (`None`: unlimited). Default `Some(4)`.
    pub fn set_rate_limit(&self, per_second: Option<u32>) {
        self.with(|s| s.rate_limit = per_second);
    }

    /// The next `n` authenticated requests (any endpoint) get `f`.
    pub fn fail_next(&self, n: usize, f: Failure) {
        self.with(|s| s.faults.extend(std::iter::repeat_n(f, n)));
    }

    /// The next `n` authenticated PATCHes get `f`; other requests pass.
    pub fn fail_next_writes(&self, n: usize, f: Failure) {
        self.with(|s| s.write_faults.extend(std::iter::repeat_n(f, n)));
    }

    /// The next `n` PATCHes that succeed are applied but answered with 504, as when a gateway
    /// times out after the tenant did the work: the client cannot tell it happened.
    pub fn lose_next_write_replies(&self, n: usize) {
        self.with(|s| s.lost_replies += n);
    }

    /// While on, every request (whatever its token) gets 503.
    pub fn set_outage(&self, on: bool) {
        self.with(|s| s.outage = on);
    }

    /// Every HTTP request received, in order, including refused ones.
    pub fn requests(&self) -> Vec<Logged> {
        self.with(|s| s.log.clone())
    }

    /// Successful PATCHes of app `id`.
    pub fn patches(&self, id: u64) -> usize {
        self.with(|s| s.patches.get(&id).copied().unwrap_or_default())
    }

    /// Polls `pred` every 20 ms until it holds (true) or `timeout` has passed (false).
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20).min(deadline - now));
        }
    }
}

impl Drop for FakeTenant {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            // Bounded: the thread cuts off connections after SHUTDOWN_GRACE.
            let _ = t.join();
        }
    }
}

/// Trims hosts and drops empty items, as Netskope does with the comma-separated string.
fn clean_hosts<'a>(hosts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    hosts.into_iter().map(str::trim).filter(|h| !h.is_empty()).map(String::from).collect()
}

/// A response before it becomes HTTP.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    html: bool,
}

impl Reply {
    fn ok(v: Value) -> Self {
        Self { status: 200, headers: Vec::new(), body: v.to_string(), html: false }
    }

    fn error(status: u16, message: &str) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: json!({"status": "error", "message": message}).to_string(),
            html: false,
        }
    }

    fn html(status: u16, text: &str) -> Self {
        let body = format!("<html><head><title>{status} {text}</title></head><body><h1>{text}</h1></body></html>");
        Self { status, headers: Vec::new(), body, html: true }
    }

    fn fault(f: Failure) -> Self {
        match f {
            Failure::RateLimited { retry_after_secs } => rate_limited(retry_after_secs),
            Failure::RateLimitedUntil { retry_after_secs } => {
                let mut r = Reply::error(429, "Too many requests, please retry later");
                let until = std::time::SystemTime::now() + Duration::from_secs(retry_after_secs);
                r.headers.push(("Retry-After", httpdate::fmt_http_date(until)));
                r
            }
            Failure::ServerError(code) => {
                let code = StatusCode::from_u16(code).map(|c| c.as_u16()).unwrap_or(500);
                match code {
                    502 => Self::html(code, "Bad Gateway"),
                    503 => Self::html(code, "Service Unavailable"),
                    504 => Self::html(code, "Gateway Timeout"),
                    _ => Self::error(code, "Internal Server Error"),
                }
            }
            Failure::StatusError(message) => Self::error(200, &message),
        }
    }
}

fn rate_limited(secs: u64) -> Reply {
    let mut r = Reply::error(429, "Too many requests, please retry later");
    r.headers.push(("Retry-After", secs.to_string()));
    r.headers.push(("RateLimit-Reset", secs.to_string()));
    r.headers.push(("RateLimit-Remaining", "0".into()));
    r
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let content_type = if self.html { "text/html; charset=utf-8" } else { "application/json" };
        let mut resp = (status, [(header::CONTENT_TYPE, content_type)], self.body).into_response();
        for (k, v) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&v) {
                resp.headers_mut().insert(k, v);
            }
        }
        resp
    }
}

/// What a handler knows of the request. Extracting it never fails, so every request reaches
/// [`process`] and the log, even one whose body could not be read.
struct Req {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    body_unreadable: bool,
}

impl<S: Send + Sync> FromRequest<S> for Req {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let (body, body_unreadable) = match axum::body::to_bytes(body, BODY_LIMIT).await {
            Ok(b) => (b, false),
            Err(_) => (Bytes::new(), true),
        };
        Ok(Self { method: parts.method, uri: parts.uri, headers: parts.headers, body, body_unreadable })
    }
}

/// Gates every request the way the tenant does (outage, token, injected faults, rate limit),
/// then runs `route`, and logs the outcome, all under one lock.
fn process(shared: &Shared, req: Req, route: impl FnOnce(&mut State, &Req) -> Reply) -> Response {
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    let token_ok = req.headers.get("netskope-api-token").is_some_and(|t| t.as_bytes() == s.token.as_bytes());
    let reply = gate(&mut s, &req, token_ok).unwrap_or_else(|| {
        if req.body_unreadable {
            Reply::error(413, "Request body too large or unreadable")
        } else {
            route(&mut s, &req)
        }
    });
    let path = req.uri.path_and_query().map_or_else(|| req.uri.path().to_string(), |p| p.as_str().to_string());
    s.log.push(Logged {
        method: req.method.to_string(),
        path,
        status: reply.status,
        token_ok,
        body: String::from_utf8_lossy(&req.body).into_owned(),
        at: Instant::now(),
    });
    reply.into_response()
}

/// The answer that replaces the real one, if any.
fn gate(s: &mut State, req: &Req, token_ok: bool) -> Option<Reply> {
    if s.outage {
        return Some(Reply::html(503, "Service Unavailable"));
    }
    if !token_ok {
        return Some(Reply::error(401, "Unauthorized"));
    }
    // Faults don't enter the rate window: a test that injects n faults gets exactly n, whatever
    // the timing.
    if let Some(f) = s.faults.pop_front() {
        return Some(Reply::fault(f));
    }
    if req.method == Method::PATCH
        && let Some(f) = s.write_faults.pop_front()
    {
        return Some(Reply::fault(f));
    }
    if let Some(limit) = s.rate_limit {
        let now = Instant::now();
        while s.window.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1)) {
            s.window.pop_front();
        }
        // Refused requests don't count, or a client retrying at the limit would never get in.
        if s.window.len() >= limit as usize {
            return Some(rate_limited(1));
        }
        s.window.push_back(now);
    }
    None
}

fn app_json(s: &State, id: u64, a: &App, listed: bool) -> Value {
    let protocols: Vec<Value> = a.protocols.iter().map(|(t, p)| json!({"port": p, "transport": t})).collect();
    let assignments: Vec<Value> = a
        .publishers
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            s.publishers.get(p).map(
                |publ| json!({"publisher_id": p, "publisher_name": publ.name, "primary": i == 0, "service_id": id}),
            )
        })
        .collect();
    let tags: Vec<Value> = a.tags.iter().map(|t| json!({"tag_name": t})).collect();
    // The list and the single-app endpoint name the same fields differently.
    let (id_key, name_key) = if listed { ("app_id", "app_name") } else { ("id", "name") };
    json!({
        id_key: id,
        name_key: format!("[{}]", a.name),
        "host": a.hosts.join(","),
        "protocols": protocols,
        "service_publisher_assignments": assignments,
        "tags": tags,
        "clientless_access": false,
        "use_publisher_dns": false,
        "trust_self_signed_certs": false,
    })
}

/// The `{id}` of `/api/v2/steering/apps/private/{id}`, if it is a number.
fn app_id(uri: &Uri) -> Option<u64> {
    uri.path().rsplit('/').next()?.parse().ok()
}

async fn list_apps(AxState(shared): AxState<Shared>, req: Req) -> Response {
    process(&shared, req, |s, _| {
        let apps: Vec<Value> = s.apps.iter().map(|(id, a)| app_json(s, *id, a, true)).collect();
        let total = apps.len();
        Reply::ok(json!({"status": "success", "data": {"private_apps": apps}, "total": total}))
    })
}

async fn get_app(AxState(shared): AxState<Shared>, req: Req) -> Response {
    process(&shared, req, |s, req| match app_id(&req.uri).and_then(|id| s.apps.get(&id).map(|a| (id, a))) {
        Some((id, a)) => Reply::ok(json!({"status": "success", "data": app_json(s, id, a, false)})),
        None => Reply::error(404, "Private app not found"),
    })
}

async fn patch_app(AxState(shared): AxState<Shared>, req: Req) -> Response {
    process(&shared, req, |s, r| {
        let reply = patch(s, r);
        if reply.status == 200 && s.lost_replies > 0 {
            s.lost_replies -= 1;
            return Reply::html(504, "Gateway Timeout");
        }
        reply
    })
}

/// PATCH: `host` replaces the whole list; `protocols` replaces the protocols. Everything is
/// validated before anything changes.
fn patch(s: &mut State, req: &Req) -> Reply {
    let Some(id) = app_id(&req.uri).filter(|id| s.apps.contains_key(id)) else {
        return Reply::error(404, "Private app not found");
    };
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return Reply::error(400, "Invalid JSON in request body");
    };
    let Some(body) = body.as_object() else { return Reply::error(400, "Request body must be a JSON object") };
    let hosts = match body.get("host") {
        None => None,
        Some(Value::String(h)) => Some(clean_hosts(h.split(','))),
        Some(_) => return Reply::error(400, "host must be a comma-separated string"),
    };
    if let Some(hosts) = &hosts {
        if hosts.len() > MAX_HOSTS {
            return Reply::error(
                400,
                &format!("Private app has {} hosts, exceeding the limit of {MAX_HOSTS} hosts", hosts.len()),
            );
        }
        if let Some(h) = hosts.iter().find(|h| s.publishers.values().any(|p| p.ip == **h)) {
            return Reply::error(
                400,
                &format!("Host {h} is the address of a publisher and cannot be a private app host"),
            );
        }
    }
    let protocols = match body.get("protocols") {
        None => None,
        Some(v) => match parse_protocols(v) {
            Ok(p) => Some(p),
            Err(m) => return Reply::error(400, &m),
        },
    };
    let Some(app) = s.apps.get_mut(&id) else { return Reply::error(404, "Private app not found") };
    if let Some(hosts) = hosts {
        app.hosts = hosts;
    }
    if let Some(protocols) = protocols {
        app.protocols = protocols;
    }
    *s.patches.entry(id).or_default() += 1;
    match s.apps.get(&id) {
        Some(a) => Reply::ok(json!({"status": "success", "data": app_json(s, id, a, false)})),
        None => Reply::error(404, "Private app not found"),
    }
}

fn parse_protocols(v: &Value) -> Result<Vec<(String, String)>, String> {
    let Some(items) = v.as_array() else { return Err("protocols must be an array".into()) };
    items
        .iter()
        .map(|p| {
            let transport = p.get("transport").and_then(Value::as_str).map(str::to_ascii_lowercase);
            let port = p.get("port").and_then(Value::as_str);
            match (transport.as_deref(), port) {
                (Some(t @ ("tcp" | "udp")), Some(port)) if !port.trim().is_empty() => {
                    Ok((t.to_string(), port.trim().to_string()))
                }
                _ => Err("each protocol needs a transport (tcp or udp) and a port string".into()),
            }
        })
        .collect()
}

async fn list_publishers(AxState(shared): AxState<Shared>, req: Req) -> Response {
    process(&shared, req, |s, _| {
        let list: Vec<Value> = s
            .publishers
            .iter()
            .map(|(id, p)| {
                json!({
                    "publisher_id": id,
                    "publisher_name": p.name,
                    "status": p.status,
                    "common_name": format!("{}.publisher.local", p.name),
                    "registered": p.status != "not registered",
                    "assessment": {"ip_address": p.ip, "version": "125.0.0.1234", "latency": 12},
                })
            })
            .collect();
        let total = list.len();
        Reply::ok(json!({"status": "success", "data": {"publishers": list}, "total": total}))
    })
}

async fn not_found(AxState(shared): AxState<Shared>, req: Req) -> Response {
    process(&shared, req, |_, _| Reply::error(404, "Resource not found"))
}

async fn method_not_allowed(AxState(shared): AxState<Shared>, req: Req) -> Response {
    process(&shared, req, |_, _| Reply::error(405, "Method not allowed"))
}
