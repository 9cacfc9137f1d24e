//! The daemon's TOML configuration.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{
    compile::Timeouts,
    control::{
        auth::{self, Role},
        netskope,
    },
    dataplane::XdpAttachMode,
};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub dataplane: DataplaneConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// The REST API; served only when the section is present.
    pub api: Option<ApiConfig>,
    /// Netskope One private apps follow segment membership (also settable through the API).
    pub netskope: Option<NetskopeConfig>,
    /// A listener of its own for Prometheus (`/metrics` without a token); only when present.
    pub metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub log: LogConfig,
}

/// `[metrics]`: where Prometheus scrapes `/metrics` without a token. It serves counters and
/// object names (segments, rules, interfaces), no secrets; bind it to the management network.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `ADDR:PORT`, e.g. `"10.0.10.5:9469"`.
    pub listen: String,
}

/// How the daemon logs (to stderr); `GATEKEEPER_LOG_FORMAT` overrides `format`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetskopeConfig {
    /// `https://TENANT.goskope.com` (plain `http://` only for test tenants and TLS proxies).
    pub tenant_url: String,
    /// File holding the REST API v2 token (0600; never logged, never returned by the API).
    pub token_file: PathBuf,
    /// How often apps and publishers are imported and drift corrected (`24h`, `30m`, ...).
    #[serde(default = "default_sync_interval")]
    pub sync_interval: String,
}

fn default_sync_interval() -> String {
    "24h".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite database of the desired state and the audit log.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { path: default_store_path() }
    }
}

fn default_store_path() -> PathBuf {
    PathBuf::from("/var/lib/gatekeeper/state.db")
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// File holding the admin bearer token (0600).
    pub admin_token_file: Option<PathBuf>,
    /// File holding the read-only bearer token (0600).
    pub reader_token_file: Option<PathBuf>,
    /// More tokens, each with its own name (recorded in the audit log for every write made
    /// with it), role and 0600 file: `[[api.tokens]] name = "alice", role = "admin", file = ...`.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// The largest request body taken, in bytes (a larger one is refused with 413). The default,
    /// 64 MiB, takes a 100k-asset policy document.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// PEM certificate chain (leaf first): with `tls_key`, the API is served over HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (0600).
    pub tls_key: Option<PathBuf>,
}

/// A named bearer token.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    pub role: Role,
    /// File holding the token (0600).
    pub file: PathBuf,
}

/// The default of `[api] max_body_bytes`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 << 20;

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Bridge ports to attach to.
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: XdpAttachMode,
    /// Flow-table entries (LRU: the least recently used flow is evicted when full).
    #[serde(default = "default_flow_table_size")]
    pub flow_table_size: u32,
    #[serde(default)]
    pub flow_timeouts: FlowTimeouts,
    /// bpffs directory where maps and links are pinned, so enforcement outlives the daemon.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Detach and remove the pins when the daemon stops (default: enforcement stays).
    #[serde(default)]
    pub detach_on_exit: bool,
    /// Enforce only while the daemon runs: nothing is pinned (`pin_dir` is not used), so the
    /// program goes when the process stops, crashes or is killed. Without it, a daemon whose pins
    /// would not outlive it (a private mount namespace, as under `ip netns exec`) refuses to start.
    #[serde(default)]
    pub ephemeral: bool,
}

fn default_flow_table_size() -> u32 {
    1 << 17
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/gatekeeper")
}

/// Idle timeouts in seconds.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FlowTimeouts {
    pub tcp: u64,
    pub udp: u64,
    pub icmp: u64,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        let t = Timeouts::default();
        Self { tcp: t.tcp_secs, udp: t.udp_secs, icmp: t.icmp_secs }
    }
}

impl From<FlowTimeouts> for Timeouts {
    fn from(t: FlowTimeouts) -> Self {
        Self { tcp_secs: t.tcp, udp_secs: t.udp, icmp_secs: t.icmp }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The policy document, re-read on SIGHUP.
    pub file: Option<PathBuf>,
    /// The share (0 to 1) of the governed addresses an apply or reload may leave ungoverned
    /// without `force` (default 0.1).
    pub max_ungoverned_share: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {error}")]
    Parse { path: String, error: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: p.clone(), error })?;
        Self::parse(&text, &p)
    }

    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        let cfg: Self =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), error: e.to_string() })?;
        let bad = |error: String| ConfigError::Parse { path: path.into(), error };
        if cfg.dataplane.interfaces.is_empty() {
            return Err(bad("[dataplane] interfaces: list at least one bridge port".into()));
        }
        for (i, name) in cfg.dataplane.interfaces.iter().enumerate() {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                return Err(bad(format!("[dataplane] interfaces[{i}]: {name:?} is not an interface name")));
            }
            if cfg.dataplane.interfaces[..i].contains(name) {
                return Err(bad(format!("[dataplane] interfaces[{i}]: {name:?} is listed twice")));
            }
        }
        if !cfg.dataplane.pin_dir.is_absolute() {
            return Err(bad(format!(
                "[dataplane] pin_dir: {:?} must be an absolute path in bpffs",
                cfg.dataplane.pin_dir
            )));
        }
        if cfg.dataplane.flow_table_size == 0 {
            return Err(bad("[dataplane] flow_table_size: must be at least 1".into()));
        }
        if let Some(api) = &cfg.api {
            match (&api.tls_cert, &api.tls_key) {
                (Some(_), None) => {
                    return Err(bad("[api] tls_cert is set but tls_key is not; set both or neither".into()));
                }
                (None, Some(_)) => {
                    return Err(bad("[api] tls_key is set but tls_cert is not; set both or neither".into()));
                }
                _ => {}
            }
            if api.max_body_bytes < 1024 {
                return Err(bad(format!("[api] max_body_bytes: {} is too small (at least 1024)", api.max_body_bytes)));
            }
            if api.max_body_bytes > crate::policy::MAX_DOCUMENT_BYTES {
                return Err(bad(format!(
                    "[api] max_body_bytes: {} is more than a policy document may be ({} bytes)",
                    api.max_body_bytes,
                    crate::policy::MAX_DOCUMENT_BYTES
                )));
            }
            let mut names: Vec<&str> = Vec::new();
            if api.admin_token_file.is_some() {
                names.push("admin");
            }
            if api.reader_token_file.is_some() {
                names.push("reader");
            }
            for (i, t) in api.tokens.iter().enumerate() {
                auth::check_token_name(&t.name).map_err(|reason| bad(format!("[[api.tokens]] {i}: name {reason}")))?;
                if names.contains(&t.name.as_str()) {
                    return Err(bad(format!(
                        "[[api.tokens]] {i}: name {:?} is used twice (admin_token_file is \"admin\", reader_token_file is \"reader\")",
                        t.name
                    )));
                }
                names.push(&t.name);
            }
        }
        if let Some(share) = cfg.policy.max_ungoverned_share
            && !(0.0..=1.0).contains(&share)
        {
            return Err(bad(format!("[policy] max_ungoverned_share: {share} is not a share between 0 and 1")));
        }
        if let Some(n) = &cfg.netskope {
            netskope::check_tenant_url(&n.tenant_url).map_err(|e| bad(format!("[netskope] tenant_url: {e}")))?;
            netskope::parse_interval(&n.sync_interval).map_err(|e| bad(format!("[netskope] sync_interval: {e}")))?;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let c = Config::parse(
            "[dataplane]\ninterfaces = [\"eth1\", \"eth2\"]\nxdp_mode = \"generic\"\n[policy]\nfile = \"/etc/gatekeeper/policy.yaml\"\n",
            "c.toml",
        )
        .unwrap();
        assert_eq!(c.dataplane.interfaces, ["eth1", "eth2"]);
        assert_eq!(c.dataplane.xdp_mode, XdpAttachMode::Generic);
        assert_eq!(c.dataplane.flow_timeouts, FlowTimeouts::default());
        assert_eq!(c.policy.file.as_deref(), Some(Path::new("/etc/gatekeeper/policy.yaml")));
        assert_eq!(c.dataplane.pin_dir, Path::new("/sys/fs/bpf/gatekeeper"));
        assert!(!c.dataplane.detach_on_exit);
        assert!(!c.dataplane.ephemeral);
        let c = Config::parse("[dataplane]\ninterfaces = [\"eth1\"]\nephemeral = true\n", "c.toml").unwrap();
        assert!(c.dataplane.ephemeral);
    }

    #[test]
    fn named_tokens_and_the_body_limit_parse() {
        let c = Config::parse(
            "[dataplane]\ninterfaces = [\"eth1\"]\n[api]\nadmin_token_file = \"/a\"\nmax_body_bytes = 1048576\n\
             [[api.tokens]]\nname = \"alice@ops\"\nrole = \"admin\"\nfile = \"/t/alice\"\n\
             [[api.tokens]]\nname = \"grafana\"\nrole = \"reader\"\nfile = \"/t/grafana\"\n",
            "c.toml",
        )
        .unwrap();
        let api = c.api.unwrap();
        assert_eq!(api.max_body_bytes, 1 << 20);
        assert_eq!(api.tokens.len(), 2);
        assert_eq!((api.tokens[0].name.as_str(), api.tokens[0].role), ("alice@ops", Role::Admin));
        assert_eq!((api.tokens[1].name.as_str(), api.tokens[1].role), ("grafana", Role::Reader));
        let c = Config::parse("[dataplane]\ninterfaces = [\"eth1\"]\n[api]\n", "c.toml").unwrap();
        assert_eq!(c.api.unwrap().max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    }

    #[test]
    fn the_log_section_picks_the_format() {
        let base = "[dataplane]\ninterfaces = [\"eth1\"]\n";
        assert_eq!(Config::parse(base, "c.toml").unwrap().log.format, LogFormat::Text);
        for (section, want) in [("format = \"text\"", LogFormat::Text), ("format = \"json\"", LogFormat::Json)] {
            let c = Config::parse(&format!("{base}[log]\n{section}\n"), "c.toml").unwrap();
            assert_eq!(c.log.format, want, "{section}");
        }
        for (section, want) in [
            ("format = \"JSON\"", "unknown variant `JSON`, expected `text` or `json`"),
            ("level = \"debug\"", "unknown field `level`"),
        ] {
            let e = Config::parse(&format!("{base}[log]\n{section}\n"), "c.toml").unwrap_err().to_string();
            assert!(e.starts_with("c.toml: ") && e.contains(want), "{section}: {e}");
        }
    }

    #[test]
    fn rejects_bad_configs_precisely() {
        for (text, want) in [
            ("[dataplane]\ninterfaces = []\n", "list at least one"),
            ("[dataplane]\ninterfaces = [\"a\", \"a\"]\n", "listed twice"),
            ("[dataplane]\ninterfaces = [\"a\"]\nxdp_mode = \"turbo\"\n", "unknown variant `turbo`"),
            ("[dataplane]\ninterfaces = [\"a\"]\nflow_tabel_size = 3\n", "unknown field `flow_tabel_size`"),
            ("[policy]\nfile = \"x\"\n", "missing field `dataplane`"),
            ("[dataplane]\ninterfaces = [\"a\"]\npin_dir = \"rel\"\n", "must be an absolute path"),
            ("[dataplane]\ninterfaces = [\"a\"]\n[api]\ntls_cert = \"/c.pem\"\n", "tls_cert is set but tls_key is not"),
            ("[dataplane]\ninterfaces = [\"a\"]\n[api]\ntls_key = \"/k.pem\"\n", "tls_key is set but tls_cert is not"),
            (
                "[dataplane]\ninterfaces = [\"a\"]\n[netskope]\ntenant_url = \"acme.goskope.com\"\ntoken_file = \"/t\"\n",
                "[netskope] tenant_url: \"acme.goskope.com\" must start with https://",
            ),
            (
                "[dataplane]\ninterfaces = [\"a\"]\n[netskope]\ntenant_url = \"https://a.goskope.com\"\ntoken_file = \"/t\"\nsync_interval = \"1fortnight\"\n",
                "[netskope] sync_interval: \"1fortnight\": unknown unit",
            ),
            (
                "[dataplane]\ninterfaces = [\"a\"]\n[netskope]\ntenant_url = \"https://a.goskope.com\"\n",
                "missing field `token_file`",
            ),
            (
                "[dataplane]\ninterfaces = [\"a\"]\n[api]\nadmin_token_file = \"/a\"\n[[api.tokens]]\nname = \"admin\"\nrole = \"reader\"\nfile = \"/b\"\n",
                "[[api.tokens]] 0: name \"admin\" is used twice",
            ),
            (
                "[dataplane]\ninterfaces = [\"a\"]\n[api]\n[[api.tokens]]\nname = \"daemon\"\nrole = \"admin\"\nfile = \"/b\"\n",
                "is what the daemon records its own changes as",
            ),
            (
                "[dataplane]\ninterfaces = [\"a\"]\n[api]\n[[api.tokens]]\nname = \"al ice\"\nrole = \"admin\"\nfile = \"/b\"\n",
                "name \"al ice\" must be 1 to 64 letters",
            ),
            (
                "[dataplane]\ninterfaces = [\"a\"]\n[api]\n[[api.tokens]]\nname = \"alice\"\nrole = \"root\"\nfile = \"/b\"\n",
                "unknown variant `root`",
            ),
            ("[dataplane]\ninterfaces = [\"a\"]\n[api]\nmax_body_bytes = 10\n", "max_body_bytes: 10 is too small"),
            (
                "[dataplane]\ninterfaces = [\"a\"]\n[api]\nmax_body_bytes = 1000000000\n",
                "is more than a policy document may be",
            ),
            (
                "[dataplane]\ninterfaces = [\"a\"]\n[api]\n[[api.tokens]]\nname = \"Config\"\nrole = \"admin\"\nfile = \"/b\"\n",
                "is what the daemon records its own changes as",
            ),
        ] {
            let e = Config::parse(text, "c.toml").unwrap_err().to_string();
            assert!(e.starts_with("c.toml: ") && e.contains(want), "{text:?}: {e}");
        }
    }
}
