//! The `gatekeeper` command line: the top-level parser ([`command`], [`parse`]) for the daemon's
//! own commands (run, detach, check; carried out by `main.rs`) and the client of the REST API
//! (`status`, `apply`, `diff`, `get`, `describe`, `delete`, `tag`, `untag`, `audit`, `netskope`),
//! carried out here.
//!
//! The parser lives in the library so that `cargo xtask docs` can generate the shell completions
//! and the man page from it. Tables by default, JSON or YAML with `-o json|yaml`; exit codes in
//! [`EXIT_CODES`].

mod diff;
mod output;

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::LazyLock,
};

use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
pub use output::{Output, write_stderr, write_stdout};
use output::{cell, fields, render, table};
use serde_json::{Value, json};

/// The exit codes, as `--help` and the README state them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  refused: the API answered 4xx (the problem is printed), or run/detach/check failed
     (an invalid policy, a pin directory another daemon holds, ...)
  2  usage error (unknown command or option, bad value)
  3  the API could not be reached (connection, TLS) or failed (5xx, a proxy's error page)";

/// `0.1.0 (git 1a2b3c4, map layout v4)`: the build and the pinned-map layout it reuses.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (git {}, map layout v{})",
        env!("CARGO_PKG_VERSION"),
        env!("GK_GIT_REV"),
        gatekeeper_common::LAYOUT_VERSION
    )
});

#[derive(Parser, Debug)]
#[command(name = "gatekeeper", about = "Agentless microsegmentation gatekeeper for OT networks", after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Attach to the bridge ports and enforce the policy (SIGHUP reloads; SIGTERM stops, enforcement stays).
    Run {
        /// The daemon's configuration file.
        #[arg(long, short, default_value = "/etc/gatekeeper/gatekeeper.toml")]
        config: PathBuf,
        /// Detach from the interfaces and remove the pins on exit (default: enforcement stays).
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Remove gatekeeper's programs, links and pins (for maintenance; stop the daemon first).
    Detach {
        /// The daemon's configuration file (for its pin directory).
        #[arg(long, short, default_value = "/etc/gatekeeper/gatekeeper.toml")]
        config: PathBuf,
        /// The pin directory, instead of reading it from the configuration.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Validate a policy file without touching the data plane.
    Check {
        /// The policy file (YAML or JSON); `-` reads standard input.
        file: PathBuf,
    },
    #[command(flatten)]
    Client(ClientCommand),
}

// How the client reaches the API; only the client's subcommands take these options ([`command`]).
// (No doc comment: clap would make it the about text of every subcommand it is added to.)
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Connection")]
pub struct Connection {
    /// Base URL of the gatekeeper API.
    #[arg(
        long,
        global = true,
        env = "GATEKEEPER_API",
        hide_env_values = true,
        default_value = "http://127.0.0.1:8080"
    )]
    pub api: String,
    /// File holding the bearer token.
    #[arg(long, global = true, env = "GATEKEEPER_TOKEN_FILE", hide_env_values = true)]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA (or self-signed) certificate an https API is verified against, instead
    /// of the system's roots.
    #[arg(long, global = true, env = "GATEKEEPER_CA_CERT", hide_env_values = true)]
    pub ca_cert: Option<PathBuf>,
}

/// The parsed command line: the command, and the connection when it is a client command.
#[derive(Debug)]
pub struct Parsed {
    pub command: Command,
    pub connection: Option<Connection>,
}

/// The ids of the hidden top-level copies of the [`Connection`] options, and their long names.
/// Older scripts write `gatekeeper --api URL status`; that still works, but `--help` shows the
/// options on the client commands only.
const TOP_LEVEL_CONNECTION: [(&str, &str); 3] =
    [("top_api", "api"), ("top_token_file", "token-file"), ("top_ca_cert", "ca-cert")];

/// The whole command line as clap sees it: [`Cli`], with the [`Connection`] options on every
/// client subcommand (and below it) rather than on the top level, and the version.
pub fn command() -> clap::Command {
    let client = ClientCommand::augment_subcommands(clap::Command::new("client"));
    let names: Vec<String> = client.get_subcommands().map(|s| s.get_name().to_string()).collect();
    let mut cmd = Cli::command().version(VERSION.as_str());
    for name in &names {
        cmd = cmd.mut_subcommand(name, |s| Connection::augment_args(s).after_help(EXIT_CODES));
    }
    for (id, long) in TOP_LEVEL_CONNECTION {
        cmd = {
            let help = format!("The older spelling of the client commands' --{long}, before the subcommand");
            cmd.arg(clap::Arg::new(id).long(long).hide(true).help(help).value_parser(clap::value_parser!(String)))
        };
    }
    cmd
}

/// Parses the process's arguments; exits with clap's usage error (2), help or version.
pub fn parse() -> Parsed {
    parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
}

/// Parses `args` (the program name first).
pub fn parse_from<I, T>(args: I) -> Result<Parsed, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut cmd = command();
    let matches = cmd.try_get_matches_from_mut(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let top: Vec<(&str, Option<&String>)> =
        TOP_LEVEL_CONNECTION.iter().map(|&(id, long)| (long, matches.get_one::<String>(id))).collect();
    let connection = match cli.command {
        Command::Client(_) => {
            // The options are global below the client subcommand: the deepest level has them all.
            let mut leaf = &matches;
            while let Some((_, sub)) = leaf.subcommand() {
                leaf = sub;
            }
            let mut c = Connection::from_arg_matches(leaf)?;
            // Given before the subcommand: it wins over the environment and the default, not
            // over the same option given after the subcommand.
            let after = |id: &str| leaf.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
            for (long, value) in top {
                let Some(v) = value.cloned() else { continue };
                match long {
                    "api" if !after("api") => c.api = v,
                    "token-file" if !after("token_file") => c.token_file = Some(v.into()),
                    "ca-cert" if !after("ca_cert") => c.ca_cert = Some(v.into()),
                    _ => {}
                }
            }
            Some(c)
        }
        _ => {
            if let Some((long, _)) = top.iter().find(|(_, v)| v.is_some()) {
                let msg = format!("--{long} applies to the client commands (status, get, apply, ...), not to this one");
                return Err(cmd.error(clap::error::ErrorKind::ArgumentConflict, msg));
            }
            None
        }
    };
    Ok(Parsed { command: cli.command, connection })
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("--ca-cert {0}")]
    CaCert(#[from] crate::tls::TlsError),
    #[error("--ca-cert {path}: not a usable CA certificate: {error}")]
    BadCa { path: PathBuf, error: rustls::Error },
}

/// The HTTP client for `c`: https is verified against `--ca-cert` when given, else against the
/// system's roots (rustls on ring); HTTP error statuses come back as responses.
pub fn agent(c: &Connection) -> Result<ureq::Agent, ClientError> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let roots = match &c.ca_cert {
        Some(path) => {
            let certs = crate::tls::load_certs(path)?;
            // ureq silently skips certificates rustls cannot use as roots: check them here.
            let mut store = rustls::RootCertStore::empty();
            for cert in &certs {
                store.add(cert.clone()).map_err(|error| ClientError::BadCa { path: path.clone(), error })?;
            }
            RootCerts::new_with_certs(&certs.iter().map(|d| Certificate::from_der(d).to_owned()).collect::<Vec<_>>())
        }
        None => RootCerts::PlatformVerifier,
    };
    let tls = TlsConfig::builder().provider(TlsProvider::Rustls).root_certs(roots).build();
    Ok(ureq::Agent::config_builder().tls_config(tls).http_status_as_error(false).build().into())
}

/// What `get` and `describe` name.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Kind {
    /// Assets (also: asset).
    #[value(name = "assets", alias = "asset")]
    Assets,
    /// Segments (also: segment, seg).
    #[value(name = "segments", aliases = ["segment", "seg", "segs"])]
    Segments,
    /// Rules (also: rule).
    #[value(name = "rules", alias = "rule")]
    Rules,
    /// Netskope private apps, named by their id (also: app).
    #[value(name = "apps", alias = "app")]
    Apps,
}

/// What `delete` removes (Netskope apps are unmapped instead: `netskope unmap`).
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum ObjectKind {
    /// An asset (also: asset).
    #[value(name = "assets", alias = "asset")]
    Assets,
    /// A segment; refused while a rule uses it (also: segment, seg).
    #[value(name = "segments", aliases = ["segment", "seg", "segs"])]
    Segments,
    /// A rule (also: rule).
    #[value(name = "rules", alias = "rule")]
    Rules,
}

impl ObjectKind {
    fn kind(self) -> Kind {
        match self {
            Self::Assets => Kind::Assets,
            Self::Segments => Kind::Segments,
            Self::Rules => Kind::Rules,
        }
    }
}

impl Kind {
    /// The collection's path under `/api/v1`.
    fn path(self) -> &'static str {
        match self {
            Self::Assets => "/assets",
            Self::Segments => "/segments",
            Self::Rules => "/rules",
            Self::Apps => "/integrations/netskope/apps",
        }
    }

    fn singular(self) -> &'static str {
        match self {
            Self::Assets => "asset",
            Self::Segments => "segment",
            Self::Rules => "rule",
            Self::Apps => "app",
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Policy epoch, last apply, interfaces, object counts, map fill levels.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Apply a policy document (YAML or JSON): the objects it names are created or replaced.
    Apply {
        /// The policy document; `-` reads standard input.
        #[arg(short = 'f', long, value_name = "FILE")]
        file: PathBuf,
        /// Show what would change, field by field; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Delete the objects the file does not name (without it they stay).
        #[arg(long)]
        prune: bool,
        /// Apply even if it leaves no enforce segment, or too many governed addresses ungoverned.
        #[arg(long)]
        force: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// What `apply -f FILE` would change, field by field (`apply --dry-run` that ignores the
    /// governance guard; the governance line says what apply would refuse).
    Diff {
        /// The policy document; `-` reads standard input.
        #[arg(short = 'f', long, value_name = "FILE")]
        file: PathBuf,
        /// Also show the deletions `apply --prune` would make.
        #[arg(long)]
        prune: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// List assets, segments, rules or Netskope apps, or show one.
    Get {
        /// What to list.
        #[arg(value_enum)]
        kind: Kind,
        /// Only this object (an app by its id).
        name: Option<String>,
        /// Only assets matching this selector (`role=plc`, `role in (plc,hmi)`).
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show an object and what relates to it: an asset's segments and rules, a segment's members
    /// and rules, a rule's segments and their members, an app's mapping and suggestions.
    Describe {
        /// What to describe.
        #[arg(value_enum)]
        kind: Kind,
        /// The object's name (an app's id).
        name: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete an asset, a segment or a rule.
    Delete {
        /// What to delete.
        #[arg(value_enum)]
        kind: ObjectKind,
        /// The object's name.
        name: String,
    },
    /// Set tags on an asset: `gatekeeper tag plc-1 role=plc site=plant-1`.
    Tag {
        /// The asset's name.
        asset: String,
        /// Tags as key=value.
        #[arg(required = true, value_name = "KEY=VALUE")]
        tags: Vec<String>,
    },
    /// Remove tags from an asset: `gatekeeper untag plc-1 quarantine`.
    Untag {
        /// The asset's name.
        asset: String,
        /// Tag keys to remove.
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// The audit log, newest first.
    Audit {
        /// How many entries.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Netskope One private apps that follow segment membership.
    #[command(subcommand)]
    Netskope(NetskopeCommand),
}

#[derive(Subcommand, Debug)]
pub enum NetskopeCommand {
    /// Connection (never the token), last sync, pending pushes, refused hosts.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Set the tenant; the token is read from a file, never from the command line.
    Configure {
        /// The tenant's URL: https://TENANT.goskope.com.
        #[arg(long)]
        tenant_url: String,
        /// File holding the REST API v2 token (omit to keep the current token).
        #[arg(long)]
        netskope_token_file: Option<PathBuf>,
        /// How often to import apps and publishers and correct drift: 24h, 30m, ...
        #[arg(long)]
        sync_interval: Option<String>,
    },
    /// Import private apps and publishers now.
    Sync,
    /// Private apps, their hosts and their mapping (also: `get apps`).
    Apps {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Map an app to segments and activate it: its hosts follow the segments' members.
    Map {
        /// The app's id.
        app: u64,
        /// Segments whose members become the app's hosts.
        #[arg(required = true)]
        segments: Vec<String>,
    },
    /// Stop a mapping: the hosts gatekeeper added are removed, the admin's stay.
    Unmap {
        /// The app's id.
        app: u64,
    },
    /// Segments whose members overlap the app's current hosts.
    Suggest {
        /// The app's id.
        app: u64,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

enum Failure {
    /// Exit 1.
    Refused(String),
    /// Exit 2: the command line asks for something that cannot be done (clap's own are exit 2 too).
    Usage(String),
    /// Exit 3.
    Unreachable(String),
}

struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// The largest response read (a listing of a policy at the maps' capacity fits).
const MAX_RESPONSE_BYTES: u64 = 1 << 30;

/// How much of an error body that is not a problem document is shown.
const BODY_START: usize = 300;

impl Client {
    fn new(c: &Connection) -> Result<Self, Failure> {
        let token = match &c.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    // A local file the user named, not the API: refused (1), like a policy file.
                    .map_err(|e| Failure::Refused(format!("token file {}: {e}", p.display())))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let agent = agent(c).map_err(|e| Failure::Unreachable(e.to_string()))?;
        Ok(Self { base: format!("{}/api/v1", c.api.trim_end_matches('/')), token, agent })
    }

    fn get(&self, path: &str) -> Result<Value, Failure> {
        self.send("GET", path, "", None)
    }

    fn send(&self, method: &str, path: &str, ct: &str, body: Option<String>) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        macro_rules! with_auth {
            ($r:expr) => {{
                let mut r = $r;
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r
            }};
        }
        let result = match (method, body) {
            ("GET", _) => with_auth!(self.agent.get(&url)).call(),
            ("DELETE", _) => with_auth!(self.agent.delete(&url)).call(),
            ("PATCH", Some(b)) => with_auth!(self.agent.patch(&url)).content_type(ct).send(b),
            ("POST", Some(b)) => with_auth!(self.agent.post(&url)).content_type(ct).send(b),
            ("PUT", Some(b)) => with_auth!(self.agent.put(&url)).content_type(ct).send(b),
            _ => return Err(Failure::Unreachable("internal: bad request shape".into())),
        };
        let mut resp = result.map_err(|e| Failure::Unreachable(format!("{url}: {e}")))?;
        let status = resp.status();
        let content_type =
            resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        // A 100k-asset listing is far over ureq's default 10 MB.
        let text = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_string()
            .map_err(|e| Failure::Unreachable(format!("{url}: {e}")))?;
        if status.is_success() {
            if text.trim().is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_str(&text).map_err(|e| {
                Failure::Unreachable(format!("{url}: {status}, but the body is not JSON ({e}): {}", start(&text)))
            });
        }
        let msg = match serde_json::from_str::<Value>(&text) {
            Ok(v) if v.get("title").is_some() || v.get("detail").is_some() => problem(status.as_u16(), &v),
            // Not our API's problem document: a proxy's error page, plain text, or nothing.
            _ => {
                let reason = status.canonical_reason().unwrap_or("");
                let ct = if content_type.is_empty() { "no content type".to_string() } else { content_type };
                match start(&text) {
                    s if s.is_empty() => format!("{} {reason} ({ct}), empty body, from {url}", status.as_u16()),
                    s => format!("{} {reason} ({ct}) from {url}: {s}", status.as_u16()),
                }
            }
        };
        Err(if status.is_client_error() { Failure::Refused(msg) } else { Failure::Unreachable(msg) })
    }

    /// A JSON Merge Patch of an asset's tags (`null` removes a tag).
    fn patch_tags(&self, asset: &str, tags: serde_json::Map<String, Value>) -> Result<Value, Failure> {
        let body = json!({"tags": tags}).to_string();
        self.send("PATCH", &format!("/assets/{}", urlencode(asset)), "application/merge-patch+json", Some(body))
    }
}

/// An RFC 9457 problem as one message: `422 title: detail` and one line per entry error.
fn problem(status: u16, v: &Value) -> String {
    let mut msg = format!("{status} {}: {}", v["title"].as_str().unwrap_or(""), v["detail"].as_str().unwrap_or(""));
    for e in v["errors"].as_array().into_iter().flatten() {
        msg += &format!(
            "\n  {}: {}: {}",
            e["entry"].as_str().unwrap_or(""),
            e["field"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or("")
        );
    }
    msg
}

/// The first [`BODY_START`] characters of `text`, whitespace collapsed.
fn start(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(BODY_START) {
        Some((i, _)) => format!("{}...", &flat[..i]),
        None => flat,
    }
}

/// `text` as the client prints it.
fn emit(text: &str) -> Result<(), Failure> {
    write_stdout(text).map_err(|e| Failure::Unreachable(format!("writing to standard output: {e}")))
}

fn show(output: Output, value: &Value, human: impl FnOnce(&Value) -> String) -> Result<(), Failure> {
    emit(&render(output, value, human).map_err(Failure::Unreachable)?)
}

/// A policy document from `file` (`-`: standard input) and its content type: JSON for a `.json`
/// file or text starting with `{`, YAML otherwise.
fn read_document(file: &Path) -> Result<(String, &'static str), Failure> {
    let stdin = file.as_os_str() == "-";
    let text = if stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Failure::Refused(format!("reading standard input: {e}")))?;
        text
    } else {
        std::fs::read_to_string(file).map_err(|e| Failure::Refused(format!("{}: {e}", file.display())))?
    };
    let json = if stdin { text.trim_start().starts_with('{') } else { file.extension().is_some_and(|e| e == "json") };
    Ok((text, if json { "application/json" } else { "application/yaml" }))
}

fn run_inner(conn: &Connection, cmd: ClientCommand) -> Result<(), Failure> {
    let c = Client::new(conn)?;
    match cmd {
        ClientCommand::Status { output } => {
            let v = c.get("/status")?;
            show(output, &v, status_text)?;
        }
        ClientCommand::Apply { file, dry_run, prune, force, output } => {
            let (text, ct) = read_document(&file)?;
            let v = c.send("POST", &format!("/apply?dry_run={dry_run}&prune={prune}&force={force}"), ct, Some(text))?;
            let verb = if dry_run { "would change" } else { "changed" };
            show(output, &with_field_diffs(v), |v| changes_text(v, verb))?;
        }
        ClientCommand::Diff { file, prune, output } => {
            let (text, ct) = read_document(&file)?;
            // `force`: a diff shows the changes even where apply would refuse them.
            let v = c.send("POST", &format!("/apply?dry_run=true&prune={prune}&force=true"), ct, Some(text))?;
            show(output, &with_field_diffs(v), |v| changes_text(v, "would change"))?;
        }
        ClientCommand::Get { kind, name, selector, output } => {
            let path = match (&name, &selector) {
                (Some(_), Some(_)) => return Err(Failure::Usage("--selector lists assets; it takes no NAME".into())),
                (None, Some(sel)) if kind == Kind::Assets => format!("/assets?selector={}", urlencode(sel)),
                (None, Some(_)) => return Err(Failure::Usage("--selector only applies to assets".into())),
                (Some(n), None) => format!("{}/{}", kind.path(), urlencode(n)),
                (None, None) => kind.path().to_string(),
            };
            let v = c.get(&path)?;
            show(output, &v, |v| match v {
                Value::Array(items) => list_table(kind, items),
                one => list_table(kind, std::slice::from_ref(one)),
            })?;
        }
        ClientCommand::Describe { kind, name, output } => {
            let v = describe(&c, kind, &name)?;
            show(output, &v, |v| describe_text(kind, v))?;
        }
        ClientCommand::Delete { kind, name } => {
            let kind = kind.kind();
            c.send("DELETE", &format!("{}/{}", kind.path(), urlencode(&name)), "", None)?;
            emit(&format!("{} {name:?} deleted", kind.singular()))?;
        }
        ClientCommand::Tag { asset, tags } => {
            let mut map = serde_json::Map::new();
            for t in &tags {
                let (k, v) =
                    t.split_once('=').ok_or_else(|| Failure::Usage(format!("{t:?}: write tags as key=value")))?;
                map.insert(k.into(), Value::String(v.into()));
            }
            c.patch_tags(&asset, map)?;
            emit(&format!("tagged {asset}: {}", tags.join(" ")))?;
        }
        ClientCommand::Untag { asset, keys } => {
            c.patch_tags(&asset, keys.iter().map(|k| (k.clone(), Value::Null)).collect())?;
            emit(&format!("untagged {asset}: {}", keys.join(" ")))?;
        }
        ClientCommand::Audit { limit, output } => {
            let v = c.get(&format!("/audit?limit={limit}"))?;
            show(output, &v, |v| audit_table(v.as_array().map_or(&[][..], Vec::as_slice)))?;
        }
        ClientCommand::Netskope(cmd) => netskope(&c, cmd)?,
    }
    Ok(())
}

fn status_text(v: &Value) -> String {
    let maps = v["maps"].as_object().map(|m| {
        m.iter()
            .map(
                |(k, x)| {
                    if x.is_object() { format!("{k} {}/{}", x["used"], x["capacity"]) } else { format!("{k} {x}") }
                },
            )
            .collect::<Vec<_>>()
            .join(", ")
    });
    fields(vec![
        ("epoch", v["epoch"].to_string()),
        (
            "last apply",
            format!(
                "{} ({} ms)",
                cell(&v["last_apply"]["at"]),
                v["last_apply"]["duration_ms"].as_f64().map_or(String::new(), |m| format!("{m:.1}"))
            ),
        ),
        ("interfaces", cell(&v["interfaces"])),
        ("objects", cell(&v["objects"])),
        ("maps", maps.unwrap_or_default()),
    ])
}

/// The apply response with each change's field differences added as `fields`.
fn with_field_diffs(mut v: Value) -> Value {
    for ch in v["changes"].as_array_mut().into_iter().flatten() {
        if ch["op"] == "update" {
            let diffs: Vec<Value> =
                diff::fields(&ch["old"], &ch["new"]).iter().map(diff::FieldChange::to_json).collect();
            ch["fields"] = Value::Array(diffs);
        }
    }
    v
}

/// One line per changed field (`asset plc-1: tags.zone: "cell-1" -> "cell-2"`), a count and the
/// governance summary.
fn changes_text(v: &Value, verb: &str) -> String {
    let changes = v["changes"].as_array().map_or(&[][..], Vec::as_slice);
    let mut lines = Vec::new();
    for ch in changes {
        let what = format!("{} {}", cell(&ch["kind"]), cell(&ch["name"]));
        match ch["op"].as_str().unwrap_or("") {
            "create" => lines.push(format!("{what}: created {}", diff::summary(&ch["new"]))),
            "delete" => lines.push(format!("{what}: deleted")),
            _ => {
                let f = diff::fields(&ch["old"], &ch["new"]);
                if f.is_empty() {
                    lines.push(format!("{what}: updated"));
                }
                lines.extend(f.iter().map(|f| format!("{what}: {}", f.line())));
            }
        }
    }
    let g = &v["governance"];
    let governed = format!(
        "governed addresses: {} -> {} ({} newly ungoverned, {} newly governed)",
        cell(&g["governed_before"]),
        cell(&g["governed_after"]),
        cell(&g["newly_ungoverned"]),
        cell(&g["newly_governed"])
    );
    if changes.is_empty() {
        format!("no changes\n{governed}")
    } else {
        format!("{}\n{} object(s) {verb}\n{governed}", lines.join("\n"), changes.len())
    }
}

fn list_table(kind: Kind, items: &[Value]) -> String {
    let rows = |cols: &[&str]| -> Vec<Vec<String>> {
        items.iter().map(|x| cols.iter().map(|c| cell(pointer(x, c))).collect()).collect()
    };
    match kind {
        Kind::Assets => table(&["NAME", "IPS", "TAGS"], rows(&["name", "ips", "tags"])),
        Kind::Segments => table(
            &["NAME", "SELECTOR", "CIDRS", "MODE", "GENERATED"],
            rows(&["name", "selector", "cidrs", "mode", "generated/by"]),
        ),
        Kind::Rules => table(
            &["NAME", "FROM", "TO", "PROTOCOL", "PORTS", "ACTION", "EXPIRES"],
            rows(&["name", "from", "to", "protocol", "ports", "action", "expires"]),
        ),
        Kind::Apps => table(
            &["ID", "NAME", "STATE", "ACTIVE", "SEGMENTS", "HOSTS", "MANAGED"],
            rows(&["id", "name", "state", "mapping/active", "mapping/segments", "hosts", "managed_hosts"]),
        ),
    }
}

/// `x`'s field at a `/`-separated path (`mapping/active`); null when absent.
fn pointer<'a>(x: &'a Value, path: &str) -> &'a Value {
    x.pointer(&format!("/{path}")).unwrap_or(&Value::Null)
}

fn audit_table(rows: &[Value]) -> String {
    table(
        &["ID", "AT", "ACTOR", "FROM", "ACTION", "KIND", "NAME"],
        rows.iter()
            .map(|e| ["id", "at", "actor", "address", "action", "kind", "name"].iter().map(|k| cell(&e[*k])).collect())
            .collect(),
    )
}

/// How many audit entries `describe` searches for an object's recent changes, and shows.
const AUDIT_SEARCHED: usize = 500;
const AUDIT_SHOWN: usize = 5;

/// An object and what relates to it, as one JSON value (what `-o json|yaml` prints).
fn describe(c: &Client, kind: Kind, name: &str) -> Result<Value, Failure> {
    let object = c.get(&format!("{}/{}", kind.path(), urlencode(name)))?;
    let members = |segment: &str| c.get(&format!("/segments/{}/members", urlencode(segment)));
    let mut out = json!({ kind.singular(): object });
    match kind {
        Kind::Assets => {
            // The API names a segment's members, not an asset's segments: ask each segment.
            let mut segments = Vec::new();
            for s in c.get("/segments")?.as_array().into_iter().flatten() {
                let m = members(s["name"].as_str().unwrap_or(""))?;
                if m["assets"].as_array().into_iter().flatten().any(|a| a["name"] == name) {
                    segments.push(s.clone());
                }
            }
            let names: Vec<&Value> = segments.iter().map(|s| &s["name"]).collect();
            let rules = related_rules(c, |r| names.contains(&&r["from"]) || names.contains(&&r["to"]))?;
            out["segments"] = Value::Array(segments);
            out["rules"] = rules;
        }
        Kind::Segments => {
            out["members"] = members(name)?;
            out["rules"] = related_rules(c, |r| r["from"] == name || r["to"] == name)?;
        }
        Kind::Rules => {
            for end in ["from", "to"] {
                let segment = out["rule"][end].as_str().unwrap_or("").to_string();
                out[end] = if segment == crate::policy::ANY {
                    json!({"segment": segment, "any": true})
                } else {
                    members(&segment)?
                };
            }
        }
        Kind::Apps => {
            out["suggestions"] =
                c.get(&format!("{}/{}/suggestions", kind.path(), urlencode(name)))?["suggestions"].take();
        }
    }
    if kind != Kind::Apps {
        let audit = c.get(&format!("/audit?limit={AUDIT_SEARCHED}"))?;
        let recent: Vec<Value> = audit
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["kind"] == kind.singular() && e["name"] == name)
            .take(AUDIT_SHOWN)
            .cloned()
            .collect();
        out["recent_changes"] = Value::Array(recent);
    }
    Ok(out)
}

fn related_rules(c: &Client, related: impl Fn(&Value) -> bool) -> Result<Value, Failure> {
    let rules = c.get("/rules")?;
    Ok(Value::Array(rules.as_array().into_iter().flatten().filter(|r| related(r)).cloned().collect()))
}

/// kubectl-style text for [`describe`]'s value.
fn describe_text(kind: Kind, v: &Value) -> String {
    let o = &v[kind.singular()];
    let lines = |x: &Value| match x {
        Value::Object(m) => m.iter().map(|(k, v)| format!("{k}={}", cell(v))).collect::<Vec<_>>().join("\n"),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join("\n"),
        other => cell(other),
    };
    let none = |s: String| if s.is_empty() { "<none>".to_string() } else { s };
    let section = |title: &str, body: String| format!("\n{title}:\n{}", indent(&body));
    let members_table = |m: &Value| {
        let assets = m["assets"].as_array().map_or(&[][..], Vec::as_slice);
        let mut rows: Vec<Vec<String>> = assets.iter().map(|a| vec![cell(&a["name"]), cell(&a["ips"])]).collect();
        rows.extend(m["cidrs"].as_array().into_iter().flatten().map(|c| vec!["(cidr)".into(), cell(c)]));
        if rows.is_empty() { "<none>".to_string() } else { table(&["ASSET", "IPS"], rows) }
    };
    let rules_table = |r: &Value| match r.as_array() {
        Some(a) if !a.is_empty() => list_table(Kind::Rules, a),
        _ => "<none>".to_string(),
    };
    let mut out = match kind {
        Kind::Assets => fields(vec![
            ("Name", cell(&o["name"])),
            ("IPs", none(lines(&o["ips"]))),
            ("Tags", none(lines(&o["tags"]))),
            ("Description", none(cell(&o["description"]))),
        ]),
        Kind::Segments => fields(vec![
            ("Name", cell(&o["name"])),
            ("Mode", cell(&o["mode"])),
            ("Selector", none(cell(&o["selector"]))),
            ("CIDRs", none(lines(&o["cidrs"]))),
            ("Generated", none(lines(&o["generated"]))),
            ("Description", none(cell(&o["description"]))),
        ]),
        Kind::Rules => fields(vec![
            ("Name", cell(&o["name"])),
            ("From", cell(&o["from"])),
            ("To", cell(&o["to"])),
            ("Protocol", cell(&o["protocol"])),
            ("Ports", none(cell(&o["ports"]))),
            ("Action", cell(&o["action"])),
            ("Expires", none(cell(&o["expires"]))),
            ("Generated", none(lines(&o["generated"]))),
            ("Description", none(cell(&o["description"]))),
        ]),
        Kind::Apps => fields(vec![
            ("ID", cell(&o["id"])),
            ("Name", cell(&o["name"])),
            ("State", cell(&o["state"])),
            ("Active", cell(&o["mapping"]["active"])),
            ("Segments", none(lines(&o["mapping"]["segments"]))),
            ("Hosts", none(lines(&o["hosts"]))),
            ("Managed hosts", none(lines(&o["managed_hosts"]))),
            ("Refused hosts", none(lines(&o["refused_hosts"]))),
            ("Last push", none(cell(&o["last_push"]))),
        ]),
    };
    match kind {
        Kind::Assets => {
            let segments = v["segments"].as_array().map_or(&[][..], Vec::as_slice);
            let seg = if segments.is_empty() {
                "<none>".to_string()
            } else {
                table(
                    &["SEGMENT", "MODE", "SELECTOR"],
                    segments.iter().map(|s| vec![cell(&s["name"]), cell(&s["mode"]), cell(&s["selector"])]).collect(),
                )
            };
            out += &section("Segments", seg);
            out += &section("Rules", rules_table(&v["rules"]));
        }
        Kind::Segments => {
            out += &section("Members", members_table(&v["members"]));
            out += &section("Rules", rules_table(&v["rules"]));
        }
        Kind::Rules => {
            for (title, end) in [("From", "from"), ("To", "to")] {
                let body = if v[end]["any"] == true { "any address".to_string() } else { members_table(&v[end]) };
                out += &section(&format!("{title} {}", cell(&o[end])), body);
            }
        }
        Kind::Apps => {
            let s = v["suggestions"].as_array().map_or(&[][..], Vec::as_slice);
            let body = if s.is_empty() { "<none>".to_string() } else { suggestions_table(s) };
            out += &section("Suggested segments", body);
        }
    }
    if let Some(recent) = v["recent_changes"].as_array() {
        let body = if recent.is_empty() { "<none>".to_string() } else { audit_table(recent) };
        out += &section("Recent changes", body);
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| if l.is_empty() { String::new() } else { format!("  {l}") }).collect::<Vec<_>>().join("\n")
}

fn suggestions_table(s: &[Value]) -> String {
    table(
        &["SEGMENT", "OVERLAPPING HOSTS", "MEMBERS"],
        s.iter().map(|x| vec![cell(&x["segment"]), cell(&x["overlapping_hosts"]), cell(&x["members"])]).collect(),
    )
}

fn netskope(c: &Client, cmd: NetskopeCommand) -> Result<(), Failure> {
    const BASE: &str = "/integrations/netskope";
    let json_ct = "application/json";
    match cmd {
        NetskopeCommand::Status { output } => {
            let v = c.get(BASE)?;
            show(output, &v, |v| {
                let mut rows = vec![
                    ("tenant", cell(&v["tenant_url"])),
                    ("token", if v["token_set"] == true { "set" } else { "NOT SET" }.to_string()),
                    (
                        "sync",
                        format!(
                            "every {}; last {} ({}); last success {}",
                            cell(&v["sync_interval"]),
                            cell(&v["last_sync"]["at"]),
                            cell(&v["last_sync"]["message"]),
                            cell(&v["last_successful_sync"])
                        ),
                    ),
                    (
                        "apps",
                        format!(
                            "{} ({} active), {} managed hosts, {} pending pushes",
                            v["apps"], v["active_apps"], v["managed_hosts"], v["pending_pushes"]
                        ),
                    ),
                    (
                        "publishers",
                        v["publishers"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|p| format!("{} {}", cell(&p["name"]), cell(&p["ip"])))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ),
                ];
                for r in v["refused_hosts"].as_array().into_iter().flatten() {
                    rows.push((
                        "refused",
                        format!("app {}: {} ({})", r["app_id"], cell(&r["host"]), cell(&r["reason"])),
                    ));
                }
                fields(rows)
            })?;
        }
        NetskopeCommand::Configure { tenant_url, netskope_token_file, sync_interval } => {
            let mut body = json!({"tenant_url": tenant_url});
            if let Some(p) = &netskope_token_file {
                let t = std::fs::read_to_string(p).map_err(|e| Failure::Refused(format!("{}: {e}", p.display())))?;
                body["token"] = Value::String(t.trim().to_string());
            }
            if let Some(i) = sync_interval {
                body["sync_interval"] = Value::String(i);
            }
            c.send("PUT", BASE, json_ct, Some(body.to_string()))?;
            emit(&format!("Netskope tenant set to {tenant_url}; syncing"))?;
        }
        NetskopeCommand::Sync => {
            let v = c.send("POST", &format!("{BASE}/sync"), json_ct, Some("{}".into()))?;
            emit(&format!("synced: {} apps, {} publishers", v["apps"], v["publishers"]))?;
        }
        NetskopeCommand::Apps { output } => {
            let v = c.get(&format!("{BASE}/apps"))?;
            show(output, &v, |v| list_table(Kind::Apps, v.as_array().map_or(&[][..], Vec::as_slice)))?;
        }
        NetskopeCommand::Map { app, segments } => {
            let body = json!({"segments": segments, "active": true});
            c.send("PUT", &format!("{BASE}/apps/{app}"), json_ct, Some(body.to_string()))?;
            emit(&format!("app {app} mapped to {}; its hosts follow their members", segments.join(", ")))?;
        }
        NetskopeCommand::Unmap { app } => {
            let body = json!({"segments": [], "active": false});
            c.send("PUT", &format!("{BASE}/apps/{app}"), json_ct, Some(body.to_string()))?;
            emit(&format!("app {app} unmapped; the hosts gatekeeper added are being removed"))?;
        }
        NetskopeCommand::Suggest { app, output } => {
            let v = c.get(&format!("{BASE}/apps/{app}/suggestions"))?;
            show(output, &v, |v| suggestions_table(v["suggestions"].as_array().map_or(&[][..], Vec::as_slice)))?;
        }
    }
    Ok(())
}

fn urlencode(s: &str) -> String {
    /// RFC 3986's unreserved characters stay; everything else is escaped, so a name or selector
    /// cannot add a path segment or a query parameter.
    const UNRESERVED: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
    percent_encoding::utf8_percent_encode(s, UNRESERVED).to_string()
}

/// Runs a client command; the exit code follows [`EXIT_CODES`].
pub fn run(conn: &Connection, cmd: ClientCommand) -> ExitCode {
    let (code, m) = match run_inner(conn, cmd) {
        Ok(()) => return ExitCode::SUCCESS,
        Err(Failure::Refused(m)) => (1, m),
        Err(Failure::Usage(m)) => (2, m),
        Err(Failure::Unreachable(m)) => (3, m),
    };
    write_stderr(&format!("error: {m}"));
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> Result<Parsed, clap::Error> {
        parse_from(std::iter::once("gatekeeper").chain(args.iter().copied()))
    }

    #[test]
    fn names_are_escaped_into_one_path_segment() {
        assert_eq!(urlencode("plc-1.a_b~"), "plc-1.a_b~");
        assert_eq!(urlencode("plc 1/../x?y=1#z é&"), "plc%201%2F..%2Fx%3Fy%3D1%23z%20%C3%A9%26");
    }

    #[test]
    fn every_argument_and_option_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if a.get_help().is_none() && !["help", "version"].contains(&id) {
                    missing.push(format!("{path} {id}"));
                }
            }
            for s in cmd.get_subcommands() {
                if s.get_about().is_none() && s.get_name() != "help" {
                    missing.push(format!("{path} {} (no about)", s.get_name()));
                }
                walk(s, &format!("{path} {}", s.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        let mut cmd = command();
        cmd.build();
        walk(&cmd, "gatekeeper", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:?}");
    }

    #[test]
    fn connection_options_are_on_client_commands_only() {
        let cmd = command();
        let has_api = |c: &clap::Command| c.get_arguments().any(|a| a.get_id() == "api");
        assert!(!has_api(&cmd));
        for daemon in ["run", "detach", "check"] {
            assert!(!has_api(cmd.find_subcommand(daemon).unwrap()), "{daemon}");
        }
        for client in ["status", "apply", "diff", "get", "describe", "delete", "tag", "netskope"] {
            assert!(has_api(cmd.find_subcommand(client).unwrap()), "{client}");
        }
        assert!(cmd.find_subcommand("get").unwrap().get_about().unwrap().to_string().starts_with("List"));
        assert!(parsed(&["run", "--api", "http://x"]).is_err());
        // The spelling before the subcommand still works for client commands (hidden in --help).
        let p = parsed(&["--api", "http://old:1", "--token-file", "/t", "status"]).unwrap();
        let c = p.connection.unwrap();
        assert_eq!((c.api.as_str(), c.token_file.unwrap()), ("http://old:1", PathBuf::from("/t")));
        let p = parsed(&["--api", "http://old:1", "status", "--api", "http://new:2"]).unwrap();
        assert_eq!(p.connection.unwrap().api, "http://new:2", "after the subcommand wins");
        let e = parsed(&["--api", "http://x", "run"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(!command().render_help().to_string().contains("--api"));
        let p = parsed(&["netskope", "apps", "--api", "http://x:1", "-o", "yaml"]).unwrap();
        assert_eq!(p.connection.unwrap().api, "http://x:1");
        let p = parsed(&["netskope", "--api", "http://y:2", "status"]).unwrap();
        assert_eq!(p.connection.unwrap().api, "http://y:2");
        let p = parsed(&["check", "-"]).unwrap();
        assert!(p.connection.is_none() && matches!(p.command, Command::Check { .. }));
    }

    #[test]
    fn kinds_take_singular_plural_and_short_forms() {
        for (word, kind) in [
            ("asset", Kind::Assets),
            ("assets", Kind::Assets),
            ("seg", Kind::Segments),
            ("rule", Kind::Rules),
            ("app", Kind::Apps),
        ] {
            match parsed(&["get", word]).unwrap().command {
                Command::Client(ClientCommand::Get { kind: k, name: None, .. }) => assert_eq!(k, kind, "{word}"),
                other => panic!("{word}: {other:?}"),
            }
        }
        assert!(parsed(&["delete", "app", "1"]).is_err(), "apps are unmapped, not deleted");
        let e = parsed(&["get", "nodes"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn version_names_the_revision_and_the_map_layout() {
        let v = command().render_version();
        assert!(
            v.contains(env!("GK_GIT_REV")) && v.contains(&format!("map layout v{}", gatekeeper_common::LAYOUT_VERSION)),
            "{v}"
        );
        assert!(command().render_help().to_string().contains("Exit codes:"));
    }

    #[test]
    fn error_bodies_are_cut_and_flattened() {
        assert_eq!(start("<html>\n  <b>502</b>\n</html>"), "<html> <b>502</b> </html>");
        let long = "x".repeat(BODY_START + 10);
        assert_eq!(start(&long), format!("{}...", "x".repeat(BODY_START)));
        let p = json!({"title": "Invalid", "detail": "1 problem", "errors": [{"entry": "rules[0]", "field": "to", "reason": "unknown"}]});
        assert_eq!(problem(422, &p), "422 Invalid: 1 problem\n  rules[0]: to: unknown");
    }

    #[test]
    fn apply_text_shows_each_changed_field() {
        let v = json!({"changes": [
            {"op": "update", "kind": "asset", "name": "plc-1",
             "old": {"name": "plc-1", "ips": ["10.0.0.1"], "tags": {"zone": "cell-1"}},
             "new": {"name": "plc-1", "ips": ["10.0.0.1", "10.0.0.2"], "tags": {"zone": "cell-2"}}},
            {"op": "create", "kind": "segment", "name": "s", "old": null, "new": {"name": "s", "mode": "enforce"}},
            {"op": "delete", "kind": "rule", "name": "r", "old": {"name": "r"}, "new": null}],
            "governance": {"governed_before": 1, "governed_after": 2, "newly_ungoverned": 0, "newly_governed": 1}});
        let text = changes_text(&v, "would change");
        assert_eq!(
            text,
            "asset plc-1: ips: added \"10.0.0.2\"\nasset plc-1: tags.zone: \"cell-1\" -> \"cell-2\"\n\
             segment s: created {\"mode\":\"enforce\"}\nrule r: deleted\n3 object(s) would change\n\
             governed addresses: 1 -> 2 (0 newly ungoverned, 1 newly governed)"
        );
        let j = with_field_diffs(v);
        assert_eq!(j["changes"][0]["fields"][1], json!({"path": "tags.zone", "old": "cell-1", "new": "cell-2"}));
        assert!(j["changes"][1].get("fields").is_none());
    }
}
