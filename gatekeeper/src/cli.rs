//! The command-line client of the REST API: `gatekeeper status|apply|get|tag|untag|audit|netskope`.
//!
//! Human tables by default, JSON with `-o json`. Exit codes: 0 done, 1 refused by the API (the
//! problem is printed on stderr), 3 the API could not be reached (TLS failures included) or failed.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// Base URL of the gatekeeper API.
    #[arg(long, global = true, env = "GATEKEEPER_API", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// File holding the bearer token.
    #[arg(long, global = true, env = "GATEKEEPER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA (or self-signed) certificate an https API is verified against, instead
    /// of the system's roots.
    #[arg(long, global = true, env = "GATEKEEPER_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
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

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Policy epoch, last apply, interfaces, object counts, map fill levels.
    Status {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Replace the declarative state with a policy document (YAML or JSON).
    Apply {
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Delete the objects the file does not name (without it they stay).
        #[arg(long)]
        prune: bool,
        /// Apply even if it leaves no enforce segment, or too many governed addresses ungoverned.
        #[arg(long)]
        force: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// List assets, segments or rules.
    Get {
        #[arg(value_parser = ["assets", "segments", "rules"])]
        kind: String,
        /// Only assets matching this selector.
        #[arg(long)]
        selector: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Set tags on an asset: `gatekeeper tag plc-1 role=plc site=plant-1`.
    Tag {
        asset: String,
        #[arg(required = true)]
        tags: Vec<String>,
    },
    /// Remove tags from an asset: `gatekeeper untag plc-1 quarantine`.
    Untag {
        asset: String,
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// The audit log, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: usize,
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
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Set the tenant; the token is read from a file, never from the command line.
    Configure {
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
    /// Private apps, their hosts and their mapping.
    Apps {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Map an app to segments and activate it: its hosts follow the segments' members.
    Map {
        app: u64,
        #[arg(required = true)]
        segments: Vec<String>,
    },
    /// Stop a mapping: the hosts gatekeeper added are removed, the admin's stay.
    Unmap { app: u64 },
    /// Segments whose members overlap the app's current hosts.
    Suggest {
        app: u64,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

enum Failure {
    Refused(String),
    Unreachable(String),
}

struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    fn new(c: &Connection) -> Result<Self, Failure> {
        let token = match &c.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| Failure::Unreachable(format!("token file {}: {e}", p.display())))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let agent = agent(c).map_err(|e| Failure::Unreachable(e.to_string()))?;
        Ok(Self { base: format!("{}/api/v1", c.api.trim_end_matches('/')), token, agent })
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
            ("PATCH", Some(b)) => with_auth!(self.agent.patch(&url)).content_type(ct).send(b),
            ("POST", Some(b)) => with_auth!(self.agent.post(&url)).content_type(ct).send(b),
            ("PUT", Some(b)) => with_auth!(self.agent.put(&url)).content_type(ct).send(b),
            _ => return Err(Failure::Unreachable("internal: bad request shape".into())),
        };
        let mut resp = result.map_err(|e| Failure::Unreachable(format!("{url}: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(|e| Failure::Unreachable(format!("{url}: {e}")))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        match status {
            200..=299 => Ok(value),
            400..=499 => {
                let mut msg = format!(
                    "{status} {}: {}",
                    value["title"].as_str().unwrap_or(""),
                    value["detail"].as_str().unwrap_or("")
                );
                for e in value["errors"].as_array().into_iter().flatten() {
                    msg += &format!(
                        "\n  {}: {}: {}",
                        e["entry"].as_str().unwrap_or(""),
                        e["field"].as_str().unwrap_or(""),
                        e["reason"].as_str().unwrap_or("")
                    );
                }
                Err(Failure::Refused(msg))
            }
            _ => Err(Failure::Unreachable(format!(
                "{status}: {}",
                value["detail"].as_str().unwrap_or(&value.to_string())
            ))),
        }
    }
}

impl Client {
    /// A JSON Merge Patch of an asset's tags (`null` removes a tag).
    fn patch_tags(&self, asset: &str, tags: serde_json::Map<String, Value>) -> Result<Value, Failure> {
        let body = json!({"tags": tags}).to_string();
        self.send("PATCH", &format!("/assets/{}", urlencode(asset)), "application/merge-patch+json", Some(body))
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(s).collect::<Vec<_>>().join(","),
        Value::Object(o) => o.iter().map(|(k, v)| format!("{k}={}", s(v))).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn print(output: Output, value: &Value, human: impl FnOnce(&Value) -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
        Output::Table => println!("{}", human(value)),
    }
}

fn run_inner(conn: &Connection, cmd: ClientCommand) -> Result<(), Failure> {
    let c = Client::new(conn)?;
    match cmd {
        ClientCommand::Status { output } => {
            let v = c.send("GET", "/status", "", None)?;
            print(output, &v, |v| {
                let maps = v["maps"].as_object().map(|m| {
                    m.iter()
                        .map(|(k, x)| {
                            if x.is_object() {
                                format!("{k} {}/{}", x["used"], x["capacity"])
                            } else {
                                format!("{k} {x}")
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                });
                format!(
                    "epoch        {}\nlast apply   {} ({} ms)\ninterfaces   {}\nobjects      {}\nmaps         {}",
                    v["epoch"],
                    s(&v["last_apply"]["at"]),
                    v["last_apply"]["duration_ms"].as_f64().map_or(String::new(), |m| format!("{m:.1}")),
                    s(&v["interfaces"]),
                    s(&v["objects"]),
                    maps.unwrap_or_default()
                )
            });
        }
        ClientCommand::Apply { file, dry_run, prune, force, output } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| Failure::Refused(format!("{}: {e}", file.display())))?;
            let ct =
                if file.extension().is_some_and(|e| e == "json") { "application/json" } else { "application/yaml" };
            let path = format!("/apply?dry_run={dry_run}&prune={prune}&force={force}");
            let v = c.send("POST", &path, ct, Some(text))?;
            print(output, &v, |v| {
                let rows: Vec<Vec<String>> = v["changes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|ch| vec![s(&ch["op"]), s(&ch["kind"]), s(&ch["name"])])
                    .collect();
                let n = rows.len();
                let verb = if dry_run { "would change" } else { "changed" };
                let g = &v["governance"];
                let governed = format!(
                    "governed addresses: {} -> {} ({} newly ungoverned, {} newly governed)",
                    s(&g["governed_before"]),
                    s(&g["governed_after"]),
                    s(&g["newly_ungoverned"]),
                    s(&g["newly_governed"])
                );
                if n == 0 {
                    format!("no changes\n{governed}")
                } else {
                    format!("{}\n{n} object(s) {verb}\n{governed}", table(&["OP", "KIND", "NAME"], rows))
                }
            });
        }
        ClientCommand::Get { kind, selector, output } => {
            let path = match &selector {
                Some(sel) if kind == "assets" => format!("/assets?selector={}", urlencode(sel)),
                Some(_) => return Err(Failure::Refused("--selector only applies to assets".into())),
                None => format!("/{kind}"),
            };
            let v = c.send("GET", &path, "", None)?;
            print(output, &v, |v| {
                let items = v.as_array().cloned().unwrap_or_default();
                match kind.as_str() {
                    "assets" => table(
                        &["NAME", "IPS", "TAGS"],
                        items.iter().map(|a| vec![s(&a["name"]), s(&a["ips"]), s(&a["tags"])]).collect(),
                    ),
                    "segments" => table(
                        &["NAME", "SELECTOR", "CIDRS", "MODE"],
                        items
                            .iter()
                            .map(|x| vec![s(&x["name"]), s(&x["selector"]), s(&x["cidrs"]), s(&x["mode"])])
                            .collect(),
                    ),
                    _ => table(
                        &["NAME", "FROM", "TO", "PROTOCOL", "PORTS", "ACTION", "EXPIRES"],
                        items
                            .iter()
                            .map(|r| {
                                vec![
                                    s(&r["name"]),
                                    s(&r["from"]),
                                    s(&r["to"]),
                                    s(&r["protocol"]),
                                    s(&r["ports"]),
                                    s(&r["action"]),
                                    s(&r["expires"]),
                                ]
                            })
                            .collect(),
                    ),
                }
            });
        }
        ClientCommand::Tag { asset, tags } => {
            let mut map = serde_json::Map::new();
            for t in &tags {
                let (k, v) =
                    t.split_once('=').ok_or_else(|| Failure::Refused(format!("{t:?}: write tags as key=value")))?;
                map.insert(k.into(), Value::String(v.into()));
            }
            c.patch_tags(&asset, map)?;
            println!("tagged {asset}: {}", tags.join(" "));
        }
        ClientCommand::Untag { asset, keys } => {
            c.patch_tags(&asset, keys.iter().map(|k| (k.clone(), Value::Null)).collect())?;
            println!("untagged {asset}: {}", keys.join(" "));
        }
        ClientCommand::Audit { limit, output } => {
            let v = c.send("GET", &format!("/audit?limit={limit}"), "", None)?;
            print(output, &v, |v| {
                table(
                    &["ID", "AT", "ACTOR", "ACTION", "KIND", "NAME"],
                    v.as_array()
                        .into_iter()
                        .flatten()
                        .map(|e| {
                            vec![
                                s(&e["id"]),
                                s(&e["at"]),
                                s(&e["actor"]),
                                s(&e["action"]),
                                s(&e["kind"]),
                                s(&e["name"]),
                            ]
                        })
                        .collect(),
                )
            });
        }
        ClientCommand::Netskope(cmd) => netskope(&c, cmd)?,
    }
    Ok(())
}

fn netskope(c: &Client, cmd: NetskopeCommand) -> Result<(), Failure> {
    const BASE: &str = "/integrations/netskope";
    let json_ct = "application/json";
    match cmd {
        NetskopeCommand::Status { output } => {
            let v = c.send("GET", BASE, "", None)?;
            print(output, &v, |v| {
                let mut out = format!(
                    "tenant        {}\ntoken         {}\nsync          every {}; last {} ({}); last success {}\napps          {} ({} active), {} managed hosts, {} pending pushes\npublishers    {}",
                    s(&v["tenant_url"]),
                    if v["token_set"] == true { "set" } else { "NOT SET" },
                    s(&v["sync_interval"]),
                    s(&v["last_sync"]["at"]),
                    s(&v["last_sync"]["message"]),
                    s(&v["last_successful_sync"]),
                    v["apps"],
                    v["active_apps"],
                    v["managed_hosts"],
                    v["pending_pushes"],
                    v["publishers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| format!("{} {}", s(&p["name"]), s(&p["ip"])))
                        .collect::<Vec<_>>()
                        .join(", "),
                );
                for r in v["refused_hosts"].as_array().into_iter().flatten() {
                    out += &format!("\nrefused       app {}: {} ({})", r["app_id"], s(&r["host"]), s(&r["reason"]));
                }
                out
            });
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
            println!("Netskope tenant set to {tenant_url}; syncing");
        }
        NetskopeCommand::Sync => {
            let v = c.send("POST", &format!("{BASE}/sync"), json_ct, Some("{}".into()))?;
            println!("synced: {} apps, {} publishers", v["apps"], v["publishers"]);
        }
        NetskopeCommand::Apps { output } => {
            let v = c.send("GET", &format!("{BASE}/apps"), "", None)?;
            print(output, &v, |v| {
                table(
                    &["ID", "NAME", "STATE", "ACTIVE", "SEGMENTS", "HOSTS", "MANAGED"],
                    v.as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            vec![
                                s(&a["id"]),
                                s(&a["name"]),
                                s(&a["state"]),
                                s(&a["mapping"]["active"]),
                                s(&a["mapping"]["segments"]),
                                s(&a["hosts"]),
                                s(&a["managed_hosts"]),
                            ]
                        })
                        .collect(),
                )
            });
        }
        NetskopeCommand::Map { app, segments } => {
            let body = json!({"segments": segments, "active": true});
            c.send("PUT", &format!("{BASE}/apps/{app}"), json_ct, Some(body.to_string()))?;
            println!("app {app} mapped to {}; its hosts follow their members", segments.join(", "));
        }
        NetskopeCommand::Unmap { app } => {
            let body = json!({"segments": [], "active": false});
            c.send("PUT", &format!("{BASE}/apps/{app}"), json_ct, Some(body.to_string()))?;
            println!("app {app} unmapped; the hosts gatekeeper added are being removed");
        }
        NetskopeCommand::Suggest { app, output } => {
            let v = c.send("GET", &format!("{BASE}/apps/{app}/suggestions"), "", None)?;
            print(output, &v, |v| {
                table(
                    &["SEGMENT", "OVERLAPPING HOSTS", "MEMBERS"],
                    v["suggestions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|x| vec![s(&x["segment"]), s(&x["overlapping_hosts"]), s(&x["members"])])
                        .collect(),
                )
            });
        }
    }
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Runs a client command; the exit code follows the module's table.
pub fn run(conn: &Connection, cmd: ClientCommand) -> ExitCode {
    match run_inner(conn, cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(3)
        }
    }
}
