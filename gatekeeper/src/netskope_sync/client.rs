//! Netskope REST API v2 client: `Netskope-Api-Token` header, wrapped responses
//! (`{"status", "data", "total"}`; a 200 with `"status": "error"` is an error), client-side rate
//! limiting under Netskope's ~4 requests per second, `Retry-After`/`RateLimit-Reset` on 429 and
//! jittered backoff on 5xx. The token is never logged: errors name the URL path, not headers.

use std::{
    collections::VecDeque,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::control::netskope::{AppProtocol, Publisher, RemoteApp, split_hosts, strip_brackets};

/// Requests allowed in any one-second window: under Netskope's 4 with a margin for clock skew.
const PER_SECOND: usize = 3;
/// Attempts of one request before the error goes back to the caller (who keeps it pending).
const ATTEMPTS: u32 = 4;
/// Longest wait honoured from a `Retry-After` header.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Netskope {path}: HTTP {status}: {message}")]
    Http { path: String, status: u16, message: String },
    #[error("Netskope {path}: the API answered status \"error\": {message}")]
    Status { path: String, message: String },
    #[error("Netskope {path}: rate limited (429) {attempts} times in a row")]
    RateLimited { path: String, attempts: u32, retry_after: Option<Duration> },
    #[error("Netskope {path}: {message}")]
    Transport { path: String, message: String },
    #[error("Netskope {path}: unexpected response: {message}")]
    Decode { path: String, message: String },
}

impl ClientError {
    /// How long Netskope asked us to wait (the last 429's `Retry-After`/`RateLimit-Reset`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Worth trying again later (the change stays pending either way).
    pub fn transient(&self) -> bool {
        match self {
            Self::Http { status, .. } => *status == 429 || *status >= 500,
            Self::RateLimited { .. } | Self::Transport { .. } => true,
            Self::Status { .. } | Self::Decode { .. } => false,
        }
    }
}

/// Counts responses by status code (metrics); `0` stands for no response.
pub type Observer = Box<dyn Fn(u16) + Send + Sync>;

pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: String,
    sent: Mutex<VecDeque<Instant>>,
    observe: Observer,
    /// Sleeps (backoff, rate limit); replaced in tests to keep them fast.
    sleep: fn(Duration),
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("base", &self.base).finish_non_exhaustive()
    }
}

impl Client {
    /// `tenant_url` as checked by [`crate::control::netskope::check_tenant_url`]. HTTPS uses the system's roots.
    pub fn new(tenant_url: &str, token: &str, observe: Observer) -> Self {
        let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::PlatformVerifier).build();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .tls_config(tls)
            .build()
            .into();
        Self {
            agent,
            base: format!("{}/api/v2", tenant_url.trim_end_matches('/')),
            token: token.to_string(),
            sent: Mutex::new(VecDeque::new()),
            observe,
            sleep: std::thread::sleep,
        }
    }

    /// Waits until one more request keeps us under [`PER_SECOND`].
    fn pace(&self) {
        loop {
            let wait = {
                let Ok(mut sent) = self.sent.lock() else { return };
                let now = Instant::now();
                while sent.front().is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1)) {
                    sent.pop_front();
                }
                if sent.len() < PER_SECOND {
                    sent.push_back(now);
                    return;
                }
                Duration::from_secs(1).saturating_sub(now.duration_since(sent[0])) + Duration::from_millis(5)
            };
            (self.sleep)(wait);
        }
    }

    /// One request with retries; returns the unwrapped `data`.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        self.call_wrapped(method, path, body).map(|mut v| v.get_mut("data").map(Value::take).unwrap_or(Value::Null))
    }

    /// One request with retries; returns the whole `{"status", "data", "total"}` body.
    fn call_wrapped(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let mut last = None;
        let mut last_retry_after = None;
        for attempt in 0..ATTEMPTS {
            self.pace();
            match self.once(method, path, body) {
                Ok(v) => return Ok(v),
                Err((e, retry_after)) => {
                    let wait = match (&e, retry_after) {
                        (ClientError::Http { status: 429, .. }, after) => {
                            let wait = after.unwrap_or(Duration::from_secs(1)).min(MAX_RETRY_AFTER);
                            last_retry_after = Some(wait);
                            wait
                        }
                        (e, _) if e.transient() => backoff(attempt),
                        _ => return Err(e),
                    };
                    tracing::warn!(path, error = %e, wait_ms = wait.as_millis() as u64, "Netskope request failed; retrying");
                    last = Some(e);
                    if attempt + 1 < ATTEMPTS {
                        (self.sleep)(wait);
                    }
                }
            }
        }
        // Ending on a 429, the caller must keep waiting as long as Netskope asked.
        if matches!(last, Some(ClientError::Http { status: 429, .. })) {
            return Err(ClientError::RateLimited {
                path: path.into(),
                attempts: ATTEMPTS,
                retry_after: last_retry_after,
            });
        }
        Err(last.unwrap_or_else(|| ClientError::Transport { path: path.into(), message: "no attempt made".into() }))
    }

    fn once(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, (ClientError, Option<Duration>)> {
        let url = format!("{}{path}", self.base);
        let transport = |e: ureq::Error| {
            (self.observe)(0);
            (ClientError::Transport { path: path.into(), message: e.to_string() }, None)
        };
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Netskope-Api-Token", &self.token).call(),
            ("PATCH", Some(b)) => self.agent.patch(&url).header("Netskope-Api-Token", &self.token).send_json(b),
            _ => {
                return Err((
                    ClientError::Transport { path: path.into(), message: format!("unsupported {method}") },
                    None,
                ));
            }
        };
        let mut resp = result.map_err(transport)?;
        let status = resp.status().as_u16();
        (self.observe)(status);
        let header_secs = |name: &str| {
            resp.headers().get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok())
        };
        let retry_after =
            header_secs("retry-after").or_else(|| header_secs("ratelimit-reset")).map(Duration::from_secs);
        let text = resp.body_mut().read_to_string().map_err(transport)?;
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        let message = |parsed: &Option<Value>| {
            parsed
                .as_ref()
                .and_then(|v| v.get("message").or_else(|| v.get("error")))
                .and_then(|m| m.as_str().map(String::from).or_else(|| Some(m.to_string())))
                .unwrap_or_else(|| text.chars().take(200).collect())
        };
        if !(200..300).contains(&status) {
            return Err((ClientError::Http { path: path.into(), status, message: message(&parsed) }, retry_after));
        }
        let Some(v) = &parsed else {
            return Err((ClientError::Decode { path: path.into(), message: "the body is not JSON".into() }, None));
        };
        match v.get("status").and_then(Value::as_str) {
            Some("success") => Ok(v.clone()),
            Some("error") => Err((ClientError::Status { path: path.into(), message: message(&parsed) }, None)),
            _ => {
                Err((ClientError::Decode { path: path.into(), message: "no \"status\" in the response".into() }, None))
            }
        }
    }

    /// Every private app, and whether the listing is complete (no more apps than `total` says).
    pub fn list_apps(&self) -> Result<(Vec<RemoteApp>, bool), ClientError> {
        let path = "/steering/apps/private";
        let body = self.call_wrapped("GET", path, None)?;
        let apps = body
            .pointer("/data/private_apps")
            .and_then(Value::as_array)
            .ok_or_else(|| ClientError::Decode { path: path.into(), message: "no data.private_apps".into() })?;
        let apps: Vec<RemoteApp> =
            apps.iter().map(|a| app(a, "app_id", "app_name").map_err(|m| decode(path, m))).collect::<Result<_, _>>()?;
        let complete = body.get("total").and_then(Value::as_u64).is_none_or(|t| t as usize <= apps.len());
        Ok((apps, complete))
    }

    /// The app, or `None` when Netskope no longer has it.
    pub fn get_app(&self, id: u64) -> Result<Option<RemoteApp>, ClientError> {
        let path = format!("/steering/apps/private/{id}");
        match self.call("GET", &path, None) {
            Ok(data) => app(&data, "id", "name").map(Some).map_err(|m| decode(&path, m)),
            Err(ClientError::Http { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces the app's whole host list.
    pub fn set_hosts(&self, id: u64, hosts: &[String]) -> Result<(), ClientError> {
        let path = format!("/steering/apps/private/{id}");
        self.call("PATCH", &path, Some(&json!({"host": hosts.join(",")}))).map(|_| ())
    }

    pub fn list_publishers(&self) -> Result<Vec<Publisher>, ClientError> {
        let path = "/infrastructure/publishers";
        let data = self.call("GET", path, None)?;
        let list = data
            .get("publishers")
            .and_then(Value::as_array)
            .ok_or_else(|| decode(path, "no data.publishers".into()))?;
        list.iter()
            .map(|p| {
                let id = p.get("publisher_id").and_then(Value::as_u64).ok_or("a publisher without publisher_id")?;
                Ok(Publisher {
                    id,
                    name: p.get("publisher_name").and_then(Value::as_str).unwrap_or_default().to_string(),
                    status: p.get("status").and_then(Value::as_str).unwrap_or_default().to_string(),
                    ip: p
                        .pointer("/assessment/ip_address")
                        .and_then(Value::as_str)
                        .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
                        .map(String::from),
                })
            })
            .collect::<Result<_, &str>>()
            .map_err(|m| decode(path, m.into()))
    }

    #[cfg(test)]
    fn without_sleeping(mut self) -> Self {
        self.sleep = |_| {};
        self
    }
}

fn decode(path: &str, message: String) -> ClientError {
    ClientError::Decode { path: path.into(), message }
}

/// Exponential backoff with jitter: about 0.5 s, 1 s, 2 s, ...
fn backoff(attempt: u32) -> Duration {
    let base = 500u64 << attempt.min(6);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base / 2))
}

fn app(v: &Value, id_key: &str, name_key: &str) -> Result<RemoteApp, String> {
    let id = v.get(id_key).and_then(Value::as_u64).ok_or_else(|| format!("an app without {id_key}"))?;
    let strings = |key: &str, inner: &str| -> Vec<String> {
        v.get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.get(inner).and_then(Value::as_str).map(String::from)).collect())
            .unwrap_or_default()
    };
    Ok(RemoteApp {
        id,
        name: strip_brackets(v.get(name_key).and_then(Value::as_str).unwrap_or_default()),
        hosts: split_hosts(v.get("host").and_then(Value::as_str).unwrap_or_default()),
        protocols: v
            .get("protocols")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|p| AppProtocol {
                        transport: p.get("transport").and_then(Value::as_str).unwrap_or_default().to_string(),
                        port: match p.get("port") {
                            Some(Value::String(s)) => s.clone(),
                            Some(Value::Number(n)) => n.to_string(),
                            _ => String::new(),
                        },
                    })
                    .collect()
            })
            .unwrap_or_default(),
        publishers: strings("service_publisher_assignments", "publisher_name"),
        tags: strings("tags", "tag_name"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_app_shapes() {
        let listed = json!({"app_id": 7, "app_name": "[plc]", "host": "10.0.0.1, plc.local",
            "protocols": [{"port": "22,502", "transport": "tcp"}],
            "service_publisher_assignments": [{"publisher_id": 1, "publisher_name": "pub-a"}],
            "tags": [{"tag_name": "ot"}], "clientless_access": false});
        let a = app(&listed, "app_id", "app_name").unwrap();
        assert_eq!(a.name, "plc");
        assert_eq!(a.hosts, ["10.0.0.1", "plc.local"]);
        assert_eq!(a.protocols[0].port, "22,502");
        assert_eq!(a.publishers, ["pub-a"]);
        let single = json!({"id": 7, "name": "[plc]", "host": ""});
        let b = app(&single, "id", "name").unwrap();
        assert_eq!((b.id, b.name.as_str(), b.hosts.len()), (7, "plc", 0));
        assert!(app(&single, "app_id", "app_name").is_err());
    }

    #[test]
    fn pacing_keeps_under_the_limit() {
        let c = Client::new("http://127.0.0.1:9", "t", Box::new(|_| {}));
        let start = Instant::now();
        for _ in 0..PER_SECOND + 1 {
            c.pace();
        }
        assert!(start.elapsed() >= Duration::from_millis(900), "the fourth request must wait");
        let c = c.without_sleeping();
        assert!(c.sent.lock().unwrap().len() <= PER_SECOND);
    }

    #[test]
    fn errors_say_whether_to_retry() {
        let e = |status| ClientError::Http { path: "/x".into(), status, message: String::new() };
        assert!(e(503).transient() && e(429).transient());
        assert!(!e(400).transient());
        assert!(!ClientError::Status { path: "/x".into(), message: "no".into() }.transient());
        let b = backoff(2);
        assert!(b >= Duration::from_millis(1000) && b <= Duration::from_millis(2000), "{b:?}");
    }
}
