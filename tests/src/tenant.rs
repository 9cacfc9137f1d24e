//! A fake Netskope One tenant: the REST API v2 shapes and behaviour gatekeeper's client must
//! handle (wrapped responses, bracketed names, comma-separated hosts, whole-list PATCH, the
//! 500-host cap, publisher addresses refused, ~4 requests/s with 429 and `Retry-After`), plus
//! faults a test can inject (429 storms, 5xx, 200 with `"status": "error"`, outages).

use std::{
    collections::{BTreeMap, VecDeque},
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// A fault to answer with instead of the real response.
#[derive(Debug, Clone)]
pub enum Failure {
    RateLimited { retry_after_secs: u64 },
    ServerError(u16),
    StatusError(String),
}

/// One request the tenant received.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub token_ok: bool,
    pub body: String,
    pub at: Instant,
}

#[derive(Debug, Clone)]
struct App {
    name: String,
    hosts: Vec<String>,
    protocols: Vec<(String, String)>,
    publishers: Vec<u64>,
}

#[derive(Debug, Default)]
struct State {
    apps: BTreeMap<u64, App>,
    publishers: BTreeMap<u64, (String, String)>,
    next_id: u64,
    rate_limit: Option<u32>,
    recent: VecDeque<Instant>,
    faults: VecDeque<Failure>,
    write_faults: VecDeque<Failure>,
    outage: bool,
    log: Vec<Logged>,
    patches: BTreeMap<u64, usize>,
}

pub struct FakeTenant {
    state: Arc<Mutex<State>>,
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeTenant {
    /// Listens on 127.0.0.1 on a free port.
    pub fn start(token: &str) -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").expect("bind the fake tenant"), token)
    }

    /// Serves on `listener` (made by the caller, e.g. inside a network namespace).
    pub fn start_on(listener: TcpListener, token: &str) -> Self {
        let addr = listener.local_addr().expect("listener address");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let state = Arc::new(Mutex::new(State { next_id: 100, rate_limit: Some(4), ..State::default() }));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, token) = (state.clone(), stop.clone(), token.to_string());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (s, token) = (s.clone(), token.clone());
                        std::thread::spawn(move || serve(stream, &s, &token));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { state, addr, stop, thread: Some(thread) }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds an app (`name` without brackets; served with them). Returns its id.
    pub fn add_app(&self, name: &str, hosts: &[&str], protocols: &[(&str, &str)]) -> u64 {
        self.with(|s| {
            s.next_id += 1;
            let app = App {
                name: name.into(),
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                protocols: protocols.iter().map(|(t, p)| (t.to_string(), p.to_string())).collect(),
                publishers: vec![],
            };
            s.apps.insert(s.next_id, app);
            s.next_id
        })
    }

    pub fn delete_app(&self, id: u64) {
        self.with(|s| s.apps.remove(&id));
    }

    pub fn hosts(&self, id: u64) -> Vec<String> {
        self.with(|s| s.apps.get(&id).map(|a| a.hosts.clone()).unwrap_or_default())
    }

    /// An admin editing the host list in the Netskope UI.
    pub fn set_hosts(&self, id: u64, hosts: &[&str]) {
        self.with(|s| {
            if let Some(a) = s.apps.get_mut(&id) {
                a.hosts = hosts.iter().map(|h| h.to_string()).collect();
            }
        });
    }

    pub fn add_publisher(&self, name: &str, ip: &str) -> u64 {
        self.with(|s| {
            s.next_id += 1;
            s.publishers.insert(s.next_id, (name.into(), ip.into()));
            s.next_id
        })
    }

    pub fn assign_publisher(&self, app: u64, publisher: u64) {
        self.with(|s| {
            if let Some(a) = s.apps.get_mut(&app) {
                a.publishers.push(publisher);
            }
        });
    }

    pub fn remove_publisher(&self, id: u64) {
        self.with(|s| s.publishers.remove(&id));
    }

    /// Requests allowed in any one-second window (`None`: unlimited). Default 4.
    pub fn set_rate_limit(&self, per_second: Option<u32>) {
        self.with(|s| s.rate_limit = per_second);
    }

    /// The next `n` requests (any endpoint) fail with `f`.
    pub fn fail_next(&self, n: usize, f: Failure) {
        self.with(|s| s.faults.extend(std::iter::repeat_n(f, n)));
    }

    /// The next `n` PATCHes fail with `f`.
    pub fn fail_next_writes(&self, n: usize, f: Failure) {
        self.with(|s| s.write_faults.extend(std::iter::repeat_n(f, n)));
    }

    /// While on, every request gets 503.
    pub fn set_outage(&self, on: bool) {
        self.with(|s| s.outage = on);
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.with(|s| s.log.clone())
    }

    /// Successful PATCHes of app `id`.
    pub fn patches(&self, id: u64) -> usize {
        self.with(|s| s.patches.get(&id).copied().unwrap_or_default())
    }

    /// Polls `pred` every 20 ms until it holds or `timeout` passes.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeTenant {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves one connection (keep-alive: requests until the client closes it).
fn serve(stream: TcpStream, state: &Mutex<State>, token: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(write_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut out = write_half;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len.min(1 << 20)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        let token_ok = headers.get("netskope-api-token").is_some_and(|t| t == token);
        let (status, extra, text) = {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            let (status, extra, text) = respond(&mut s, &method, &path, &body, token_ok);
            s.log.push(Logged {
                method: method.clone(),
                path: path.clone(),
                status,
                token_ok,
                body,
                at: Instant::now(),
            });
            (status, extra, text)
        };
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            429 => "Too Many Requests",
            _ => "Error",
        };
        let mut resp = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            text.len()
        );
        for (k, v) in extra {
            resp.push_str(&format!("{k}: {v}\r\n"));
        }
        resp.push_str("\r\n");
        resp.push_str(&text);
        if out.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

fn error(status: u16, message: &str) -> (u16, Vec<(String, String)>, String) {
    (status, vec![], json!({"status": "error", "message": message}).to_string())
}

fn fault(f: Failure) -> (u16, Vec<(String, String)>, String) {
    match f {
        Failure::RateLimited { retry_after_secs } => {
            let secs = retry_after_secs.to_string();
            let (s, _, t) = error(429, "Too many requests");
            (s, vec![("Retry-After".into(), secs.clone()), ("RateLimit-Reset".into(), secs)], t)
        }
        Failure::ServerError(code) => (code, vec![], "<html><body>upstream error</body></html>".into()),
        Failure::StatusError(m) => (200, vec![], json!({"status": "error", "message": m}).to_string()),
    }
}

fn app_json(s: &State, id: u64, a: &App, listed: bool) -> Value {
    let protocols: Vec<Value> = a.protocols.iter().map(|(t, p)| json!({"transport": t, "port": p})).collect();
    let publishers: Vec<Value> = a
        .publishers
        .iter()
        .filter_map(|p| {
            s.publishers.get(p).map(|(n, _)| json!({"publisher_id": p, "publisher_name": n, "primary": true}))
        })
        .collect();
    let (id_key, name_key) = if listed { ("app_id", "app_name") } else { ("id", "name") };
    json!({
        id_key: id,
        name_key: format!("[{}]", a.name),
        "host": a.hosts.join(","),
        "protocols": protocols,
        "service_publisher_assignments": publishers,
        "tags": [{"tag_name": "ot"}],
        "clientless_access": false,
        "use_publisher_dns": false,
        "trust_self_signed_certs": false,
    })
}

fn respond(
    s: &mut State,
    method: &str,
    path: &str,
    body: &str,
    token_ok: bool,
) -> (u16, Vec<(String, String)>, String) {
    if s.outage {
        return (503, vec![], "<html>503 Service Unavailable</html>".into());
    }
    if !token_ok {
        return error(401, "Unauthorized");
    }
    if let Some(f) = s.faults.pop_front() {
        return fault(f);
    }
    if method == "PATCH"
        && let Some(f) = s.write_faults.pop_front()
    {
        return fault(f);
    }
    if let Some(limit) = s.rate_limit {
        let now = Instant::now();
        while s.recent.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1)) {
            s.recent.pop_front();
        }
        if s.recent.len() >= limit as usize {
            return fault(Failure::RateLimited { retry_after_secs: 1 });
        }
        s.recent.push_back(now);
    }
    let path = path.split('?').next().unwrap_or(path);
    let Some(rest) = path.strip_prefix("/api/v2") else { return error(404, "no such endpoint") };
    match (method, rest) {
        ("GET", "/steering/apps/private") => {
            let apps: Vec<Value> = s.apps.iter().map(|(id, a)| app_json(s, *id, a, true)).collect();
            let n = apps.len();
            (200, vec![], json!({"status": "success", "data": {"private_apps": apps}, "total": n}).to_string())
        }
        ("GET", "/infrastructure/publishers") => {
            let list: Vec<Value> = s
                .publishers
                .iter()
                .map(|(id, (n, ip))| {
                    json!({"publisher_id": id, "publisher_name": n, "status": "connected",
                           "assessment": {"ip_address": ip, "version": "118.0.0"}})
                })
                .collect();
            let n = list.len();
            (200, vec![], json!({"status": "success", "data": {"publishers": list}, "total": n}).to_string())
        }
        (m, r) if r.starts_with("/steering/apps/private/") => {
            let Ok(id) = r["/steering/apps/private/".len()..].parse::<u64>() else {
                return error(400, "bad app id");
            };
            let Some(app) = s.apps.get(&id).cloned() else { return error(404, "private app not found") };
            match m {
                "GET" => (200, vec![], json!({"status": "success", "data": app_json(s, id, &app, false)}).to_string()),
                "PATCH" => {
                    let Ok(v) = serde_json::from_str::<Value>(body) else { return error(400, "invalid JSON body") };
                    let Some(host) = v.get("host") else {
                        return (
                            200,
                            vec![],
                            json!({"status": "success", "data": app_json(s, id, &app, false)}).to_string(),
                        );
                    };
                    let Some(host) = host.as_str() else { return error(400, "host must be a string") };
                    let hosts: Vec<String> =
                        host.split(',').map(str::trim).filter(|h| !h.is_empty()).map(String::from).collect();
                    if hosts.len() > 500 {
                        return error(400, "a private app can have at most 500 hosts");
                    }
                    if let Some(h) = hosts.iter().find(|h| s.publishers.values().any(|(_, ip)| ip == *h)) {
                        return error(400, &format!("host {h} is the address of a publisher"));
                    }
                    if let Some(a) = s.apps.get_mut(&id) {
                        a.hosts = hosts;
                    }
                    *s.patches.entry(id).or_default() += 1;
                    let app = s.apps.get(&id).cloned().unwrap_or(app);
                    (200, vec![], json!({"status": "success", "data": app_json(s, id, &app, false)}).to_string())
                }
                _ => error(405, "method not allowed"),
            }
        }
        _ => error(404, "no such endpoint"),
    }
}
