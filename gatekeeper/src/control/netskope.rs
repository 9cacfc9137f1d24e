//! Netskope One Private Access: private applications follow segment membership.
//!
//! A private app maps to segments; while the mapping is active, the app's host list holds the
//! addresses of those segments' members. Gatekeeper remembers which hosts it added (`managed`)
//! and only ever adds or removes those: hosts an admin typed in Netskope are never touched.
//! Publishers' addresses form the built-in segment [`PUBLISHERS_SEGMENT`], and every active
//! mapping generates rules allowing it to reach the mapped segments on the app's protocols, so
//! mapped servers are reachable through Netskope and otherwise only as the other rules say.
//!
//! This module holds the integration's state (what the store keeps) and the pure planning:
//! what to push, what the generated policy objects are. Changes to it go through the control
//! path (`control::netskope_change`); the edge `netskope_sync` talks to Netskope and the API
//! edge serves it.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::policy::{Mode, Policy, Protocol, RuleSpec, Scalar, SegmentSpec, membership::member_addresses};

/// The segment of the publishers' addresses, kept in step on each sync.
pub const PUBLISHERS_SEGMENT: &str = "netskope-publishers";
/// Prefix of generated rules' names (reserved: user rules may not use it).
pub const RULE_PREFIX: &str = "netskope-";
/// Netskope refuses private apps with more hosts than this.
pub const MAX_HOSTS: usize = 500;
/// Shortest CIDR prefix Netskope accepts as a private app host.
pub const MIN_CIDR_V4: u8 = 8;

/// The connection settings (`[netskope]` or `PUT /integrations/netskope`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub tenant_url: String,
    /// Never logged, never returned by the API, never in the database: it comes from
    /// `[netskope] token_file`, or from the API into [`TOKEN_FILE`] beside the store (0600).
    #[serde(skip)]
    pub token: String,
    pub sync_interval_secs: u64,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("tenant_url", &self.tenant_url)
            .field("token", &"<redacted>")
            .field("sync_interval_secs", &self.sync_interval_secs)
            .finish()
    }
}

/// Default sync interval: daily.
pub const DEFAULT_SYNC_SECS: u64 = 24 * 3600;

/// Shortest sync interval: Netskope's rate limit is shared with everything else on the tenant.
const MIN_SYNC_SECS: u64 = 60;
/// Longest sync interval (a year and a day); also keeps deadlines far from `Instant`'s range.
const MAX_SYNC_SECS: u64 = 366 * 86400;

/// Parses a sync interval in whole seconds: `24h`, `30m`, `90s`, `1d`, `1h 30m`, `1w` (humantime's
/// units) or plain seconds, from 60 s to 366 days.
pub fn parse_interval(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let secs = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>().map_err(|_| format!("{text:?}: the sync interval must be at most 366 d"))?
    } else {
        let d = humantime::parse_duration(t).map_err(|e| match e {
            humantime::DurationError::UnknownUnit { unit, .. } => {
                format!("{text:?}: unknown unit {unit:?} (use s, m, h, d or w, like 24h, 30m or 1h 30m)")
            }
            e => format!("{text:?} is not a duration like 24h, 30m or 90s: {e}"),
        })?;
        if d.subsec_nanos() != 0 {
            return Err(format!("{text:?}: the sync interval must be a whole number of seconds"));
        }
        d.as_secs()
    };
    if secs < MIN_SYNC_SECS {
        return Err(format!("{text:?}: the sync interval must be at least {MIN_SYNC_SECS} s"));
    }
    if secs > MAX_SYNC_SECS {
        return Err(format!("{text:?}: the sync interval must be at most 366 d"));
    }
    Ok(secs)
}

/// Checks a tenant URL: `https://…`, or `http://…` (accepted with a warning by the caller).
pub fn check_tenant_url(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} must start with https:// (or http:// for a test tenant)"))?;
    let bad = || format!("{url:?} must be the tenant's base URL, like https://TENANT.goskope.com");
    // A host and an optional port, nothing else: no user, query or fragment that would bend the
    // request URLs built from it (`https://acme.goskope.com?x` + `/api/v2/...`).
    let authority = rest.strip_suffix("/api/v2").unwrap_or(rest);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && (h.starts_with('[') || !h.contains(':')) => (h, Some(p)),
        _ => (authority, None),
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
                && !host.starts_with(['.', '-'])
        }
    };
    if !host_ok || port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(bad());
    }
    Ok(url.trim_end_matches("/api/v2").to_string())
}

/// One protocol entry of a private app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppProtocol {
    pub transport: String,
    /// Netskope's port list: `"22,502,1024-2048"`.
    pub port: String,
}

/// A private app as Netskope reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RemoteApp {
    pub id: u64,
    /// Without Netskope's brackets.
    pub name: String,
    pub hosts: Vec<String>,
    pub protocols: Vec<AppProtocol>,
    pub publishers: Vec<String>,
    pub tags: Vec<String>,
}

/// A publisher as Netskope reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Publisher {
    pub id: u64,
    pub name: String,
    pub status: String,
    /// `None` when Netskope reports no usable address.
    pub ip: Option<String>,
}

/// Whether the app still exists in Netskope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AppState {
    #[default]
    Present,
    /// Deleted in Netskope: shown, but its mapping no longer acts.
    Gone,
}

/// A host gatekeeper wanted to push but Netskope cannot take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Refused {
    pub host: String,
    /// Why, as a sentence.
    #[schema(value_type = String)]
    pub reason: RefusedReason,
}

/// Why Netskope cannot take a host. Stored and shown as its message; [`RefusedReason::code`]
/// labels the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum RefusedReason {
    /// An IPv4 CIDR shorter than [`MIN_CIDR_V4`].
    CidrTooShort,
    /// A Netskope publisher's own address.
    PublisherAddress,
    /// The app would exceed [`MAX_HOSTS`].
    HostLimit,
}

impl RefusedReason {
    const ALL: [Self; 3] = [Self::CidrTooShort, Self::PublisherAddress, Self::HostLimit];

    pub fn code(self) -> &'static str {
        match self {
            Self::CidrTooShort => "cidr_too_short",
            Self::PublisherAddress => "publisher_address",
            Self::HostLimit => "host_limit",
        }
    }
}

impl std::fmt::Display for RefusedReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CidrTooShort => write!(f, "Netskope accepts CIDRs of /{MIN_CIDR_V4} or longer"),
            Self::PublisherAddress => f.write_str("is a Netskope publisher's address"),
            Self::HostLimit => write!(f, "the app would exceed {MAX_HOSTS} hosts"),
        }
    }
}

impl From<RefusedReason> for String {
    fn from(r: RefusedReason) -> Self {
        r.to_string()
    }
}

impl TryFrom<String> for RefusedReason {
    type Error = String;

    /// The message (as stored) or the code.
    fn try_from(text: String) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.to_string() == text || r.code() == text)
            .ok_or_else(|| format!("unknown reason for a refused host: {text:?}"))
    }
}

/// The result of the last push of an app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PushResult {
    pub at: String,
    pub ok: bool,
    pub message: String,
}

/// What the store keeps of one private app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    #[serde(flatten)]
    pub remote: RemoteApp,
    pub state: AppState,
    /// Mapped segments.
    #[serde(default)]
    pub segments: Vec<String>,
    #[serde(default)]
    pub active: bool,
    /// Hosts gatekeeper added and may remove.
    #[serde(default)]
    pub managed: BTreeSet<String>,
    #[serde(default)]
    pub refused: Vec<Refused>,
    #[serde(default)]
    pub last_push: Option<PushResult>,
}

impl AppRecord {
    /// Whether the mapping acts: active and the app still exists.
    pub fn acting(&self) -> bool {
        self.active && self.state == AppState::Present && !self.segments.is_empty()
    }
}

/// Netskope returns names in brackets (`"[plc-access]"`).
pub fn strip_brackets(name: &str) -> String {
    let n = name.trim();
    n.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(n).to_string()
}

/// Netskope's comma-separated host string as a list.
pub fn split_hosts(hosts: &str) -> Vec<String> {
    hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).map(String::from).collect()
}

/// How a member address is written in a host list: a plain address for a host prefix.
pub fn host_text(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() { net.addr().to_string() } else { net.to_string() }
}

/// The hosts an active mapping wants (sorted), and those Netskope could not take, with why.
pub fn desired_hosts(
    policy: &Policy,
    segments: &[String],
    publisher_ips: &BTreeSet<String>,
) -> (BTreeSet<String>, Vec<Refused>) {
    let mut want = BTreeSet::new();
    let mut refused = Vec::new();
    let nets: BTreeSet<IpNet> = segments.iter().flat_map(|s| member_addresses(policy, s)).collect();
    for net in nets {
        let host = host_text(&net);
        if matches!(net, IpNet::V4(_)) && net.prefix_len() < MIN_CIDR_V4 {
            refused.push(Refused { host, reason: RefusedReason::CidrTooShort });
        } else if publisher_ips.contains(&host) {
            refused.push(Refused { host, reason: RefusedReason::PublisherAddress });
        } else {
            want.insert(host);
        }
    }
    (want, refused)
}

/// What one push does to an app's host list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The whole new host list (Netskope's PATCH replaces it).
    pub hosts: Vec<String>,
    pub managed: BTreeSet<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Managed hosts someone removed in Netskope, put back.
    pub restored: Vec<String>,
    pub refused: Vec<Refused>,
}

impl Plan {
    pub fn changes(&self, current: &[String]) -> bool {
        self.hosts != current
    }
}

/// Plans a push: keep every host gatekeeper does not manage, remove managed hosts no longer
/// wanted, add wanted hosts that are missing, within Netskope's cap (what does not fit is
/// refused with the reason, never silently cut).
/// `want` and `managed` hold canonical forms ([`canonical`]); `current` is compared through it,
/// so `FD00::B` typed in Netskope is the same host as `fd00::b`.
pub fn plan(current: &[String], managed: &BTreeSet<String>, want: &BTreeSet<String>, refused: Vec<Refused>) -> Plan {
    let present: BTreeSet<String> = current.iter().map(|h| canonical(h)).collect();
    let ours_unwanted = |h: &String| {
        let c = canonical(h);
        managed.contains(&c) && !want.contains(&c)
    };
    let removed: Vec<String> = current.iter().filter(|h| ours_unwanted(h)).cloned().collect();
    let mut hosts: Vec<String> = current.iter().filter(|h| !ours_unwanted(h)).cloned().collect();
    // A host listed twice by hand stays as it is; duplicates are not ours to fix.
    let mut out = Plan { removed, refused, ..Plan::default() };
    for h in want {
        if present.contains(h) {
            if managed.contains(h) {
                out.managed.insert(h.clone());
            }
            continue;
        }
        if hosts.len() >= MAX_HOSTS {
            out.refused.push(Refused { host: h.clone(), reason: RefusedReason::HostLimit });
            continue;
        }
        hosts.push(h.clone());
        out.managed.insert(h.clone());
        if managed.contains(h) {
            out.restored.push(h.clone());
        } else {
            out.added.push(h.clone());
        }
    }
    out.hosts = hosts;
    out
}

/// The form a host is compared in: addresses and CIDRs as Rust prints them (lower case,
/// shortest IPv6), names in lower case.
pub fn canonical(host: &str) -> String {
    let h = host.trim();
    if let Ok(a) = h.parse::<std::net::IpAddr>() {
        a.to_string()
    } else if let Ok(n) = h.parse::<IpNet>() {
        host_text(&n)
    } else {
        h.to_ascii_lowercase()
    }
}

/// Parses Netskope's port list (`"22,502,1024-2048"`) into rule ports; empty or `*`: all.
pub fn parse_ports(spec: &str) -> Result<Vec<Scalar>, String> {
    let s = spec.trim();
    if s.is_empty() || s == "*" || s.eq_ignore_ascii_case("any") {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let scalar = Scalar::Str(part.to_string());
        crate::policy::parse_port_range(&scalar).map_err(|e| format!("port list {spec:?}: {e}"))?;
        out.push(scalar);
    }
    Ok(out)
}

/// The policy objects the integration generates: the publishers' segment and, for each acting
/// mapping, rules from it to the mapped segments on the app's protocols and ports. Protocols
/// gatekeeper cannot express are listed in the second value with the reason.
pub fn generated(
    apps: &[AppRecord],
    publishers: &[Publisher],
) -> (Vec<SegmentSpec>, Vec<GeneratedRule>, Vec<(u64, String)>) {
    let cidrs: BTreeSet<String> = publishers.iter().filter_map(|p| p.ip.clone()).collect();
    let segment = SegmentSpec {
        name: PUBLISHERS_SEGMENT.into(),
        selector: None,
        cidrs: cidrs.into_iter().collect(),
        mode: Mode::Label,
        description: Some("Netskope publishers (generated from the tenant; kept in step on each sync)".into()),
    };
    let mut rules = Vec::new();
    let mut problems = Vec::new();
    for app in apps.iter().filter(|a| a.acting()) {
        for (si, seg) in app.segments.iter().enumerate() {
            for p in &app.remote.protocols {
                let protocol = match p.transport.to_ascii_lowercase().as_str() {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    other => {
                        problems.push((app.remote.id, format!("transport {other:?} is not tcp or udp")));
                        continue;
                    }
                };
                let ports = match parse_ports(&p.port) {
                    Ok(ports) => ports,
                    Err(e) => {
                        problems.push((app.remote.id, e));
                        continue;
                    }
                };
                let transport = if protocol == Protocol::Tcp { "tcp" } else { "udp" };
                let mut name = format!("{RULE_PREFIX}{}-{seg}-{transport}", app.remote.id);
                if !crate::policy::valid_name(&name) {
                    name = format!("{RULE_PREFIX}{}-{si}-{transport}", app.remote.id);
                }
                // Two entries with the same transport become one rule with both port lists.
                if let Some(r) = rules.iter_mut().find(|r: &&mut GeneratedRule| r.rule.name == name) {
                    // No ports means every port: merged with a list, every port still.
                    if r.rule.ports.is_empty() || ports.is_empty() {
                        r.rule.ports.clear();
                    } else {
                        r.rule.ports.extend(ports);
                    }
                    continue;
                }
                rules.push(GeneratedRule {
                    app_id: app.remote.id,
                    rule: RuleSpec {
                        name,
                        from: PUBLISHERS_SEGMENT.into(),
                        to: seg.clone(),
                        protocol,
                        ports,
                        description: Some(format!(
                            "generated: Netskope private app {} ({}) reaches segment {seg}",
                            app.remote.id, app.remote.name
                        )),
                        ..RuleSpec::default()
                    },
                });
            }
        }
    }
    (vec![segment], rules, problems)
}

/// A rule the mapping of `app_id` generated.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedRule {
    pub app_id: u64,
    pub rule: RuleSpec,
}

/// Segments whose members' addresses overlap an app's current hosts, most overlap first.
pub fn suggestions(policy: &Policy, hosts: &[String]) -> Vec<(String, Vec<String>, usize)> {
    let overlaps = |m: &BTreeSet<IpNet>, h: &str| {
        if let Ok(a) = h.parse::<std::net::IpAddr>() {
            m.iter().any(|net| net.contains(&a))
        } else if let Ok(n) = h.parse::<IpNet>() {
            m.iter().any(|net| net.contains(&n) || n.contains(net))
        } else {
            false // a hostname: nothing to compare with
        }
    };
    let mut out: Vec<(String, Vec<String>, usize)> = policy
        .segments
        .iter()
        .filter_map(|s| {
            let m = member_addresses(policy, &s.name);
            let overlap: Vec<String> = hosts.iter().filter(|h| overlaps(&m, h)).cloned().collect();
            (!overlap.is_empty()).then(|| (s.name.clone(), overlap, m.len()))
        })
        .collect();
    out.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    out
}

/// The outcome of the last sync.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SyncStatus {
    pub at: String,
    pub ok: bool,
    pub message: String,
    pub apps: usize,
    pub publishers: usize,
}

/// The integration's state in the daemon (mirrors the store).
#[derive(Debug, Default)]
pub struct Integration {
    pub settings: Option<Settings>,
    pub apps: BTreeMap<u64, AppRecord>,
    pub publishers: Vec<Publisher>,
    pub last_sync: Option<SyncStatus>,
    pub last_success: Option<String>,
    /// Generated policy objects (present while the integration is configured).
    pub segments: Vec<SegmentSpec>,
    pub rules: Vec<GeneratedRule>,
    /// App protocols that generate no rule, with why.
    pub problems: Vec<(u64, String)>,
}

/// What wakes the Netskope worker.
#[derive(Debug)]
pub enum Event {
    /// Apps were marked pending.
    Push,
    /// Sync now; the reply (if any) gets the result, or the message of why it failed.
    Sync(Option<std::sync::mpsc::Sender<Result<SyncStatus, String>>>),
    /// The settings changed: new client, sync now. (The worker stops when the channel closes.)
    Settings,
}

/// Where a token set through the API is kept: a 0600 file beside the store, so copies of the
/// database hold no secret.
pub const TOKEN_FILE: &str = "netskope.token";

/// Writes `token` beside `path` with mode 0600 and returns the staged file; [`commit_token`]
/// renames it into place once the settings that go with it are recorded. Never half-written,
/// never readable by others even for a moment.
pub fn stage_token(path: &std::path::Path, token: &str) -> std::io::Result<std::path::PathBuf> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    Ok(tmp)
}

pub fn commit_token(staged: &std::path::Path, path: &std::path::Path) -> std::io::Result<()> {
    std::fs::rename(staged, path)
}

/// Store keys of the integration's settings.
pub const KEY_SETTINGS: &str = "netskope.settings";
pub const KEY_PUBLISHERS: &str = "netskope.publishers";
pub const KEY_LAST_SYNC: &str = "netskope.last_sync";
pub const KEY_LAST_SUCCESS: &str = "netskope.last_success";

impl Integration {
    /// Recomputes the generated objects; returns whether they changed.
    pub fn regenerate(&mut self) -> bool {
        let (segments, rules, problems) = if self.settings.is_some() {
            let apps: Vec<AppRecord> = self.apps.values().cloned().collect();
            generated(&apps, &self.publishers)
        } else {
            (vec![], vec![], vec![])
        };
        let changed = segments != self.segments || rules != self.rules;
        self.segments = segments;
        self.rules = rules;
        self.problems = problems;
        changed
    }

    /// Validates the user's document with the generated objects added after it (what is
    /// enforced); problems in the user's entries keep their indices. Without generated objects
    /// the document is validated as it is, not copied.
    pub fn validate(
        &self,
        doc: &crate::policy::PolicyDocument,
        source: &str,
    ) -> Result<Policy, crate::policy::PolicyError> {
        if self.segments.is_empty() && self.rules.is_empty() {
            return doc.validate(source);
        }
        let mut out = doc.clone();
        out.segments.extend(self.segments.iter().cloned());
        out.rules.extend(self.rules.iter().map(|r| r.rule.clone()));
        out.validate(source)
    }

    /// Apps whose mapping acts.
    pub fn acting(&self) -> Vec<u64> {
        self.apps.values().filter(|a| a.acting()).map(|a| a.remote.id).collect()
    }

    pub fn publisher_ips(&self) -> BTreeSet<String> {
        self.publishers.iter().filter_map(|p| p.ip.as_deref().map(canonical)).collect()
    }
}

/// Whether a user object's name is one the integration generates.
pub fn reserved_segment(name: &str) -> bool {
    name == PUBLISHERS_SEGMENT
}

/// `netskope-<app id>-…`: the names of generated rules.
pub fn reserved_rule(name: &str) -> bool {
    name.strip_prefix(RULE_PREFIX)
        .and_then(|r| r.split('-').next())
        .is_some_and(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyDocument;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }
    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_and_host_strings() {
        assert_eq!(strip_brackets("[plc-access]"), "plc-access");
        assert_eq!(strip_brackets("plain"), "plain");
        assert_eq!(split_hosts(" 10.0.0.1, plc.local,,10.0.0.2 "), list(&["10.0.0.1", "plc.local", "10.0.0.2"]));
        assert_eq!(parse_interval("24h").unwrap(), 86400);
        assert_eq!(parse_interval("90s").unwrap(), 90);
        assert!(parse_interval("10s").unwrap_err().contains("at least 60"));
        assert!(parse_interval("1fortnight").unwrap_err().contains("unknown unit \"fortnight\""));
        assert_eq!(check_tenant_url("https://acme.goskope.com/").unwrap(), "https://acme.goskope.com");
        assert!(check_tenant_url("acme.goskope.com").is_err());
        assert!(check_tenant_url("ftp://x").is_err());
        for url in [
            "https://acme.goskope.com?x",
            "https://acme.goskope.com#x",
            "https://user@acme.goskope.com",
            "https://acme.goskope.com/other",
            "https://acme.goskope.com:99999",
            "https://acme.goskope.com:",
            "https://",
            "https://acme goskope.com",
        ] {
            assert!(check_tenant_url(url).is_err(), "{url} was accepted");
        }
        for (url, base) in [
            ("http://127.0.0.1:8443", "http://127.0.0.1:8443"),
            ("https://[::1]:8443/api/v2", "https://[::1]:8443"),
            ("https://acme-eu.goskope.com/api/v2/", "https://acme-eu.goskope.com"),
        ] {
            assert_eq!(check_tenant_url(url).as_deref(), Ok(base), "{url}");
        }
    }

    #[test]
    fn sync_intervals() {
        let ok = |t: &str| parse_interval(t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
        for (text, secs) in [
            ("5m", 300),
            ("300s", 300),
            ("300", 300),
            (" 60 ", 60),
            ("1d", 86400),
            ("1h 30m", 5400),
            ("1h30m", 5400),
            ("2min", 120),
            ("1w", 604800),
            ("1.5h", 5400),
            ("90000ms", 90),
            ("366d", 366 * 86400),
        ] {
            assert_eq!(ok(text), secs, "{text:?}");
        }
        // What the API shows ("{secs}s") reads back as the same interval.
        for secs in [60, 300, 86400, 366 * 86400] {
            assert_eq!(ok(&format!("{secs}s")), secs);
        }
        for (text, want) in [
            ("59s", "\"59s\": the sync interval must be at least 60 s"),
            ("0", "\"0\": the sync interval must be at least 60 s"),
            ("367d", "\"367d\": the sync interval must be at most 366 d"),
            ("99999999999999999999", "must be at most 366 d"),
            (
                "99999999999999999999h",
                "\"99999999999999999999h\" is not a duration like 24h, 30m or 90s: number is too large",
            ),
            ("90500ms", "\"90500ms\": the sync interval must be a whole number of seconds"),
            ("5x", "\"5x\": unknown unit \"x\" (use s, m, h, d or w"),
            ("", "\"\" is not a duration like 24h, 30m or 90s: value was empty"),
            ("soon", "\"soon\" is not a duration like 24h, 30m or 90s: expected number at 0"),
            ("-5m", "\"-5m\" is not a duration"),
            ("5m;", "\"5m;\" is not a duration like 24h, 30m or 90s: invalid character at 2"),
        ] {
            let e = parse_interval(text).unwrap_err();
            assert!(e.starts_with(want) || e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn plan_touches_only_managed_hosts() {
        // An admin typed plc.local and 10.0.0.9; gatekeeper manages 10.0.0.1 and 10.0.0.2.
        let current = list(&["plc.local", "10.0.0.1", "10.0.0.9", "10.0.0.2"]);
        let managed = set(&["10.0.0.1", "10.0.0.2"]);
        let p = plan(&current, &managed, &set(&["10.0.0.2", "10.0.0.3", "10.0.0.9"]), vec![]);
        assert_eq!(p.hosts, list(&["plc.local", "10.0.0.9", "10.0.0.2", "10.0.0.3"]));
        assert_eq!(p.removed, list(&["10.0.0.1"]));
        assert_eq!(p.added, list(&["10.0.0.3"]));
        // 10.0.0.9 was the admin's: wanted now, but still not ours to remove later.
        assert_eq!(p.managed, set(&["10.0.0.2", "10.0.0.3"]));
        // Nothing wanted: only our hosts go.
        let p = plan(&p.hosts, &p.managed, &BTreeSet::new(), vec![]);
        assert_eq!(p.hosts, list(&["plc.local", "10.0.0.9"]));
        assert!(p.managed.is_empty());
    }

    #[test]
    fn hosts_compare_in_canonical_form() {
        assert_eq!(canonical("FD00::0B"), "fd00::b");
        assert_eq!(canonical("10.0.0.0/8"), "10.0.0.0/8");
        assert_eq!(canonical("10.0.0.1/32"), "10.0.0.1");
        assert_eq!(canonical("PLC.Example.local"), "plc.example.local");
        // Ours, written differently by hand: still ours to remove.
        let p = plan(&list(&["FD00::B", "x.local"]), &set(&["fd00::b"]), &BTreeSet::new(), vec![]);
        assert_eq!(p.hosts, list(&["x.local"]));
        assert_eq!(p.removed, list(&["FD00::B"]));
        // Wanted and already there in another spelling: not added twice.
        let p = plan(&list(&["FD00::B"]), &BTreeSet::new(), &set(&["fd00::b"]), vec![]);
        assert_eq!(p.hosts, list(&["FD00::B"]));
        assert!(p.added.is_empty() && p.managed.is_empty());
    }

    #[test]
    fn plan_restores_drift_and_respects_the_cap() {
        let managed = set(&["10.0.0.1"]);
        let p = plan(&list(&["x.local"]), &managed, &set(&["10.0.0.1"]), vec![]);
        assert_eq!(p.restored, list(&["10.0.0.1"]));
        assert!(p.added.is_empty());
        let current: Vec<String> = (0..499).map(|i| format!("h{i}.local")).collect();
        let p = plan(&current, &BTreeSet::new(), &set(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]), vec![]);
        assert_eq!(p.hosts.len(), MAX_HOSTS);
        assert_eq!(p.added, list(&["10.0.0.1"]));
        assert_eq!(p.refused.len(), 2);
        assert!(p.refused[0].reason.to_string().contains("500"), "{:?}", p.refused);
        assert!(!p.changes(&p.hosts));
    }

    #[test]
    fn desired_hosts_follow_members_and_refuse_what_netskope_cannot_take() {
        let doc = PolicyDocument::from_yaml(
            "assets:\n  - {name: p1, ips: [10.0.0.10], tags: {role: plc}}\n  - {name: p2, ips: [10.0.0.11, 10.9.0.0/16], tags: {role: plc}}\n  - {name: h, ips: [10.0.0.20], tags: {role: hmi}}\nsegments:\n  - {name: plc, selector: role=plc}\n  - {name: wide, cidrs: [10.0.0.0/7, 192.0.2.5/32]}\n",
            "t",
        )
        .unwrap()
        .validate("t")
        .unwrap();
        let (want, refused) = desired_hosts(&doc, &list(&["plc", "wide"]), &set(&["192.0.2.5"]));
        assert_eq!(want, set(&["10.0.0.10", "10.0.0.11", "10.9.0.0/16"]));
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused.iter().any(|r| r.host == "10.0.0.0/7" && r.reason.to_string().contains("/8")));
        assert!(refused.iter().any(|r| r.host == "192.0.2.5" && r.reason.to_string().contains("publisher")));
        let s = suggestions(&doc, &list(&["10.0.0.10", "plc.local"]));
        assert_eq!(s[0].0, "plc");
        assert_eq!(s[0].1, list(&["10.0.0.10"]));
    }

    #[test]
    fn generated_rules_follow_acting_mappings() {
        let app = |id: u64, active: bool, state: AppState| AppRecord {
            remote: RemoteApp {
                id,
                name: format!("app{id}"),
                hosts: vec![],
                protocols: vec![
                    AppProtocol { transport: "tcp".into(), port: "22,502,1024-2048".into() },
                    AppProtocol { transport: "udp".into(), port: "161".into() },
                ],
                publishers: vec![],
                tags: vec![],
            },
            state,
            segments: list(&["plc"]),
            active,
            managed: BTreeSet::new(),
            refused: vec![],
            last_push: None,
        };
        let pubs =
            vec![Publisher { id: 1, name: "p".into(), status: "connected".into(), ip: Some("192.0.2.5".into()) }];
        let (segs, rules, problems) = generated(
            &[app(1, true, AppState::Present), app(2, false, AppState::Present), app(3, true, AppState::Gone)],
            &pubs,
        );
        assert_eq!(segs[0].cidrs, list(&["192.0.2.5"]));
        assert_eq!(segs[0].mode, Mode::Label);
        assert!(problems.is_empty());
        let names: Vec<&str> = rules.iter().map(|r| r.rule.name.as_str()).collect();
        assert_eq!(names, ["netskope-1-plc-tcp", "netskope-1-plc-udp"]);
        assert_eq!(rules[0].rule.ports.len(), 3);
        assert_eq!(rules[0].rule.from, PUBLISHERS_SEGMENT);
        assert!(parse_ports("22,x").is_err());
        assert!(parse_ports("*").unwrap().is_empty());
    }
}
