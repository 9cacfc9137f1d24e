//! Netskope REST API v2 client: `Netskope-Api-Token` header, wrapped responses
//! (`{"status", "data", "total"}`; a 200 with `"status": "error"` is an error), client-side rate
//! limiting under Netskope's ~4 requests per second (`governor`), `Retry-After` (seconds or an
//! HTTP date) or `RateLimit-Reset` on 429 and jittered backoff on 5xx (`backon`). The token is
//! never logged: errors name the URL path, not headers.
//!
//! Request targets are fixed paths and numeric app ids; names and hosts travel only in JSON
//! bodies, so nothing taken from Netskope or a user is ever spliced into a URL.

use std::{
    cell::Cell,
    num::NonZeroU32,
    rc::Rc,
    time::{Duration, SystemTime},
};

use backon::{BlockingRetryable, ExponentialBuilder};
use governor::{DefaultDirectRateLimiter, Quota, clock::Clock};
use serde_json::{Value, json};

use crate::control::netskope::{AppProtocol, Publisher, RemoteApp, split_hosts, strip_brackets};

/// Requests allowed in any one-second window: under Netskope's 4 with a margin for timing jitter.
const PER_SECOND: NonZeroU32 = NonZeroU32::new(3).unwrap();
/// Attempts of one request before the error goes back to the caller (who keeps it pending).
const ATTEMPTS: usize = 4;
/// Waits between attempts after a 5xx or a transport error: 0.25-0.5 s, 0.5-1 s, 1-2 s.
const BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(250))
    .with_factor(2.0)
    .with_jitter()
    .with_max_times(ATTEMPTS - 1);
/// Wait after a 429 that says nothing of how long.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
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
    limiter: DefaultDirectRateLimiter,
    observe: Observer,
    /// How this client waits (pacing, backoff, `Retry-After`): one function, handed to
    /// [`retrying`], so tests run the retry logic with a sleeper that only records.
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
            limiter: DefaultDirectRateLimiter::direct(quota(PER_SECOND)),
            observe,
            sleep: std::thread::sleep,
        }
    }

    /// Waits until one more request keeps us under [`PER_SECOND`]. Bounded in time: each wait
    /// lasts until the limiter has room (at most one period, as only this client's thread sends).
    fn pace(&self) {
        while let Err(not_until) = self.limiter.check() {
            (self.sleep)(not_until.wait_time_from(self.limiter.clock().now()));
        }
    }

    /// One request with retries; returns the unwrapped `data`.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        self.call_wrapped(method, path, body).map(|mut v| v.get_mut("data").map(Value::take).unwrap_or(Value::Null))
    }

    /// One request with retries; returns the whole `{"status", "data", "total"}` body.
    fn call_wrapped(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        retrying(path, self.sleep, || {
            self.pace();
            self.once(method, path, body)
        })
    }

    fn once(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
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
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
        let retry_after = retry_after(header("retry-after"), header("ratelimit-reset"), SystemTime::now());
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
}

fn decode(path: &str, message: String) -> ClientError {
    ClientError::Decode { path: path.into(), message }
}

/// One failed attempt: the error, and the wait Netskope asked for (429 only).
type Failure = (ClientError, Option<Duration>);

/// At most `per_second` requests in any one-second window: one every `1 s / per_second`, with no
/// burst (a burst of n after an idle spell would let up to 2n - 1 into one second).
fn quota(per_second: NonZeroU32) -> Quota {
    Quota::per_second(per_second).allow_burst(NonZeroU32::MIN)
}

/// How long a response asks us to wait: `Retry-After` as delta-seconds or an HTTP date (one in
/// the past means now), else `RateLimit-Reset` (seconds). A value that parses as neither is
/// ignored.
fn retry_after(retry_after: Option<&str>, ratelimit_reset: Option<&str>, now: SystemTime) -> Option<Duration> {
    let secs = |v: &str| v.trim().parse::<u64>().ok().map(Duration::from_secs);
    let date =
        |v: &str| httpdate::parse_http_date(v.trim()).ok().map(|at| at.duration_since(now).unwrap_or(Duration::ZERO));
    retry_after.and_then(|v| secs(v).or_else(|| date(v))).or_else(|| ratelimit_reset.and_then(secs))
}

/// The wait after a 429.
fn rate_limit_wait(asked: Option<Duration>) -> Duration {
    asked.unwrap_or(DEFAULT_RETRY_AFTER).min(MAX_RETRY_AFTER)
}

/// Runs `attempt` up to [`ATTEMPTS`] times while it fails with a transient error: a 429 waits as
/// Netskope asked ([`rate_limit_wait`]), anything else as [`BACKOFF`] says. Ending on a 429 the
/// error is [`ClientError::RateLimited`], so the caller keeps waiting as long as Netskope asked.
fn retrying<T>(path: &str, sleep: fn(Duration), attempt: impl FnMut() -> Result<T, Failure>) -> Result<T, ClientError> {
    // backon's blocking retry has no `adjust` (only its async one has): `notify`, which sees the
    // error, hands a 429's wait to the sleeper, which backon calls right after it.
    let asked = Rc::new(Cell::new(None));
    let sleeper = {
        let asked = asked.clone();
        move |backoff| sleep(asked.take().unwrap_or(backoff))
    };
    attempt
        .retry(BACKOFF)
        .when(|(e, _): &Failure| e.transient())
        .notify(|(e, after): &Failure, backoff| {
            let wait = match e {
                ClientError::Http { status: 429, .. } => {
                    asked.set(Some(rate_limit_wait(*after)));
                    rate_limit_wait(*after)
                }
                _ => backoff,
            };
            tracing::warn!(path, error = %e, wait_ms = wait.as_millis() as u64, "Netskope request failed; retrying");
        })
        .sleep(sleeper)
        .call()
        .map_err(|(e, after)| match e {
            ClientError::Http { status: 429, .. } => ClientError::RateLimited {
                path: path.into(),
                attempts: ATTEMPTS as u32,
                retry_after: Some(rate_limit_wait(after)),
            },
            e => e,
        })
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
        let mut at = Vec::new();
        for _ in 0..6 {
            c.pace();
            at.push(std::time::Instant::now());
        }
        let per = PER_SECOND.get() as usize;
        for w in at.windows(per + 1) {
            let span = w[per] - w[0];
            // Nanosecond rounding of the 1/3 s period aside.
            assert!(span >= Duration::from_millis(999), "{} requests within {span:?}", per + 1);
        }
        // Spread out, not bunched: the second request already waits about a period.
        assert!(at[1] - at[0] >= Duration::from_millis(300), "{:?}", at[1] - at[0]);
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_792_567_680); // Wed, 21 Oct 2026 07:28:00 GMT
        let at = |v: &str| retry_after(Some(v), None, now);
        assert_eq!(at("7"), Some(Duration::from_secs(7)));
        assert_eq!(at(" 0 "), Some(Duration::ZERO));
        assert_eq!(at("Wed, 21 Oct 2026 07:28:30 GMT"), Some(Duration::from_secs(30)));
        // The obsolete forms HTTP still allows.
        assert_eq!(at("Wednesday, 21-Oct-26 07:29:00 GMT"), Some(Duration::from_secs(60)));
        assert_eq!(at("Wed Oct 21 07:28:05 2026"), Some(Duration::from_secs(5)));
        assert_eq!(at("Wed, 21 Oct 2026 07:00:00 GMT"), Some(Duration::ZERO), "a date in the past: now");
        // Long waits are taken as given here and clamped when waited on.
        assert_eq!(at("Thu, 22 Oct 2026 07:28:00 GMT"), Some(Duration::from_secs(86400)));
        assert_eq!(rate_limit_wait(at("Thu, 22 Oct 2026 07:28:00 GMT")), MAX_RETRY_AFTER);
        for garbage in ["soon", "-5", "1.5", "", "Wed, 21 Oct 2026 25:00:00 GMT", "99999999999999999999"] {
            assert_eq!(at(garbage), None, "{garbage:?}");
            assert_eq!(rate_limit_wait(at(garbage)), DEFAULT_RETRY_AFTER, "{garbage:?}");
        }
        // RateLimit-Reset (seconds) when Retry-After is missing or unusable.
        assert_eq!(retry_after(None, Some("3"), now), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(Some("soon"), Some("3"), now), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(Some("2"), Some("3"), now), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(None, Some("Wed, 21 Oct 2026 07:28:30 GMT"), now), None);
        assert_eq!(retry_after(None, None, now), None);
    }

    thread_local! {
        static SLEPT: std::cell::RefCell<Vec<Duration>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Runs [`retrying`] over `script` (one outcome per attempt; `Ok` ends it) with a sleeper
    /// that records instead of sleeping; returns the result, the attempts made and the waits.
    fn run(script: Vec<Result<(), Failure>>) -> (Result<(), ClientError>, usize, Vec<Duration>) {
        SLEPT.with(|s| s.borrow_mut().clear());
        let mut script = script.into_iter();
        let mut attempts = 0;
        let r = retrying(
            "/x",
            |d| SLEPT.with(|s| s.borrow_mut().push(d)),
            || {
                attempts += 1;
                script.next().unwrap_or(Ok(()))
            },
        );
        (r, attempts, SLEPT.with(|s| s.take()))
    }

    fn http(status: u16, after: Option<u64>) -> Result<(), Failure> {
        Err((ClientError::Http { path: "/x".into(), status, message: String::new() }, after.map(Duration::from_secs)))
    }

    #[test]
    fn retries_back_off_and_wait_as_asked() {
        // 5xx: jittered exponential backoff, then success.
        let (r, n, slept) = run(vec![http(503, None), http(502, None), http(500, None)]);
        assert!(r.is_ok() && n == 4, "{r:?} after {n}");
        let ms = |d: &Duration| d.as_millis() as u64;
        assert!((250..500).contains(&ms(&slept[0])), "{slept:?}");
        assert!((500..1000).contains(&ms(&slept[1])), "{slept:?}");
        assert!((1000..2000).contains(&ms(&slept[2])), "{slept:?}");

        // 429: as long as Retry-After says (clamped; 1 s without one), whatever the backoff.
        let (r, _, slept) = run(vec![http(429, Some(7)), http(429, None), http(429, Some(900))]);
        assert!(r.is_ok());
        assert_eq!(slept, [Duration::from_secs(7), DEFAULT_RETRY_AFTER, MAX_RETRY_AFTER]);

        // Four 429s in a row: rate limited, with the last wait asked; no sleep after the last.
        let (r, n, slept) = run(vec![http(503, None), http(429, Some(5)), http(429, None), http(429, Some(3))]);
        assert_eq!((n, slept.len()), (ATTEMPTS, ATTEMPTS - 1));
        assert_eq!(slept[1..], [Duration::from_secs(5), DEFAULT_RETRY_AFTER]);
        match r {
            Err(e @ ClientError::RateLimited { .. }) => assert_eq!(e.retry_after(), Some(Duration::from_secs(3))),
            other => panic!("{other:?}"),
        }

        // Spent on 5xx: the last error as it was.
        let (r, n, _) = run((0..5).map(|_| http(503, None)).collect());
        assert!(matches!(r, Err(ClientError::Http { status: 503, .. })) && n == ATTEMPTS, "{r:?}");

        // Not transient: no retry, no wait.
        let (r, n, slept) = run(vec![http(400, None), http(503, None)]);
        assert!(matches!(r, Err(ClientError::Http { status: 400, .. })) && n == 1 && slept.is_empty(), "{r:?}");
        let status = Err((ClientError::Status { path: "/x".into(), message: "no".into() }, None));
        let (r, n, _) = run(vec![status]);
        assert!(matches!(r, Err(ClientError::Status { .. })) && n == 1);
    }

    #[test]
    fn errors_say_whether_to_retry() {
        let e = |status| ClientError::Http { path: "/x".into(), status, message: String::new() };
        assert!(e(503).transient() && e(429).transient());
        assert!(!e(400).transient());
        assert!(!ClientError::Status { path: "/x".into(), message: "no".into() }.transient());
    }
}
