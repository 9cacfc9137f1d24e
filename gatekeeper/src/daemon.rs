//! `gatekeeper run`, the wiring: the only module that reads the configuration and starts the
//! edges. It opens the store, prepares and enforces the state through the control layer,
//! attaches to the bridge ports, serves the REST API and `/metrics`, starts the Netskope worker,
//! reloads the policy file on SIGHUP, recompiles when a rule expires, and stops on
//! SIGTERM/SIGINT (enforcement stays in place unless told otherwise).
//!
//! Everything that blocks (store, compile, map writes, grace periods) runs on blocking threads;
//! the async workers only serve requests and wait for signals.

use std::{path::Path, time::Duration};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    api::{self, ApiState},
    config::Config,
    control::{
        Control, Enforcer, Handle, Store,
        auth::{Role, Token, Tokens, token_hash},
        expiry,
        netskope::{self, Settings},
        status,
    },
    dataplane::{self, ApplyReport, LoadOptions},
    metrics, netskope_sync,
    policy::{PolicyDocument, PolicyError, read_file},
    tls,
};

/// How often the flow tables are counted for `GET /status`.
const FLOW_SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The daemon's HTTP surface: the REST API under `/api/v1`, `/metrics`, and the OpenAPI
/// document of both; every error `application/problem+json`; `POST /apply` bodies up to
/// `max_body_bytes`.
pub fn http_router(control: &Handle, tokens: &Tokens, max_body_bytes: usize) -> std::io::Result<axum::Router> {
    let (api_routes, mut doc) = api::router(ApiState::new(control.clone(), tokens)?, max_body_bytes);
    doc.merge(metrics::openapi());
    Ok(api_routes
        .merge(metrics::router(control.clone(), tokens))
        .merge(api::document(&doc))
        .layer(axum::middleware::from_fn(api::problem::normalize)))
}

/// Reads and validates the policy file (errors name the file and its entries).
fn file_document(path: &Path) -> Result<PolicyDocument, PolicyError> {
    read_file(path).map(|(doc, _)| doc)
}

/// Reads a secret from a file only its owner may read. `what` names the setting in errors.
fn read_secret(path: &Path, what: &str) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{what}: {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        anyhow::bail!("{what}: {} is readable by others; make it 0600", path.display());
    }
    let token = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{what}: {}: {e}", path.display()))?;
    let token = token.trim().to_string();
    if token.len() < 16 {
        anyhow::bail!("{what}: {} holds a token shorter than 16 characters", path.display());
    }
    Ok(token)
}

/// The `[netskope]` section as settings (config wins over settings made through the API).
fn netskope_settings(config: &Config) -> anyhow::Result<Option<Settings>> {
    let Some(n) = &config.netskope else { return Ok(None) };
    let token = read_secret(&n.token_file, "[netskope] token_file")?;
    let tenant_url =
        netskope::check_tenant_url(&n.tenant_url).map_err(|e| anyhow::anyhow!("[netskope] tenant_url: {e}"))?;
    let sync_interval_secs =
        netskope::parse_interval(&n.sync_interval).map_err(|e| anyhow::anyhow!("[netskope] sync_interval: {e}"))?;
    Ok(Some(Settings { tenant_url, token, sync_interval_secs }))
}

/// The API's tokens from their files (`None` without an `[api]` section): `admin_token_file`
/// is the token named `admin`, `reader_token_file` the one named `reader`, then `[[api.tokens]]`.
fn api_tokens(config: &Config) -> anyhow::Result<Option<Tokens>> {
    let Some(api) = &config.api else { return Ok(None) };
    let mut tokens = Vec::new();
    let roles = [(&api.admin_token_file, "admin", Role::Admin), (&api.reader_token_file, "reader", Role::Reader)];
    for (file, name, role) in roles {
        if let Some(path) = file {
            let secret = read_secret(path, &format!("[api] {name}_token_file"))?;
            tokens.push(Token { name: name.into(), role, secret, source: path.display().to_string() });
        }
    }
    for t in &api.tokens {
        let secret = read_secret(&t.file, &format!("[[api.tokens]] {}: file", t.name))?;
        tokens.push(Token { name: t.name.clone(), role: t.role, secret, source: t.file.display().to_string() });
    }
    for (i, t) in tokens.iter().enumerate() {
        if let Some(other) = tokens[..i].iter().find(|o| o.secret == t.secret) {
            anyhow::bail!(
                "[api] tokens {:?} and {:?} are the same token: the audit log could not tell them apart",
                other.name,
                t.name
            );
        }
    }
    Ok(Some(Tokens(tokens)))
}

/// Opens the store, enforces the desired state and attaches: the blocking part of the start.
/// The maps are filled before the program sees its first packet.
fn start(config: &Config, tokens: Option<&Tokens>) -> anyhow::Result<Handle> {
    let file = config.policy.file.as_deref().map(file_document).transpose()?;
    let mut store = Store::open(&config.store.path)?;
    // The store keeps the tokens' hashes (and audits additions, rotations and removals), never
    // the tokens.
    let tokens = tokens.map_or(&[][..], |t| &t.0[..]);
    for t in tokens {
        store.set_credential(&t.name, t.role.as_str(), &token_hash(&t.secret), &t.source)?;
    }
    store.retain_credentials(&tokens.iter().map(|t| t.name.as_str()).collect::<Vec<_>>())?;
    let source = config
        .policy
        .file
        .as_ref()
        .map_or_else(|| config.store.path.display().to_string(), |p| p.display().to_string());
    let prepared = Control::prepare(store, file.as_ref(), netskope_settings(config)?, &source)?;
    if config.dataplane.ephemeral {
        tracing::warn!("[dataplane] ephemeral = true: nothing is pinned; enforcement ends when this process stops");
    }
    let options = LoadOptions {
        flow_table_size: config.dataplane.flow_table_size,
        // Ephemeral: unpinned links, which go with the process however it ends.
        pin_dir: (!config.dataplane.ephemeral).then(|| config.dataplane.pin_dir.clone()),
        ..LoadOptions::default()
    };
    // The data plane's message already names its cause (a refusal explains itself at length);
    // as a chain it would be printed twice.
    let enforcer =
        Enforcer::with_options(options, config.dataplane.flow_timeouts.into()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let p = prepared.policy();
    // Large policies take seconds to compile: say what is going on.
    tracing::info!(
        assets = p.assets.len(),
        segments = p.segments.len(),
        rules = p.rules.len(),
        "compiling the policy and writing the maps"
    );
    let (mut control, report) = prepared.enforce(enforcer)?;
    if let Some(share) = config.policy.max_ungoverned_share {
        control.set_apply_guard(share);
    }
    log_applied("start", &control, report);
    for interface in &config.dataplane.interfaces {
        let dp = control.enforcer_mut().dataplane_mut();
        match dp.attach(interface, config.dataplane.xdp_mode) {
            Ok(mode) => {
                tracing::info!(interface = %interface, mode, "attached");
                if dataplane::ifindex(interface).is_some_and(|i| i >= gatekeeper_common::STATS_IFINDEX_LIMIT) {
                    tracing::warn!(
                        interface = %interface,
                        "ifindex of {} or more: its packets are counted under interface=\"other\" in /metrics",
                        gatekeeper_common::STATS_IFINDEX_LIMIT
                    );
                }
            }
            Err(e) => {
                if dp.took_over() {
                    // A running enforcement was taken over: removing its pins would leave the
                    // ports unfiltered. Everything stays pinned and enforcing; we exit.
                    tracing::error!(interface = %interface, "attach failed; the pinned enforcement stays in place");
                } else {
                    let _ = dp.detach_all();
                }
                return Err(e.into());
            }
        }
    }
    control.publish();
    let counter = control.enforcer().dataplane().flow_counter()?;
    let handle = Handle::new(control);
    expiry::spawn(&handle)?;
    if let Some(counter) = counter {
        status::spawn_flow_sampler(counter, handle.board(), FLOW_SAMPLE_EVERY)?;
    }
    Ok(handle)
}

/// Runs `f` on the control state on a blocking thread.
async fn blocking<T: Send + 'static>(handle: &Handle, f: impl FnOnce(&mut Control) -> T + Send + 'static) -> T {
    match handle.run_blocking(f).await {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Handlers first: a SIGHUP or SIGTERM during the start must not kill the daemon with the
    // default action. A SIGHUP that arrives meanwhile is applied once running; a SIGTERM stops
    // it cleanly as soon as the start is done.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let tokens = api_tokens(&config)?;
    // The API's certificate and port are checked before anything is attached, so a bad file or
    // a busy port stops the daemon with the network untouched.
    let api_listener = match &config.api {
        Some(api) => {
            let tls = match (&api.tls_cert, &api.tls_key) {
                (Some(cert), Some(key)) => {
                    Some(tls::server_config(cert, key).map_err(|e| anyhow::anyhow!("[api] {e}"))?)
                }
                // Config validation guarantees both or neither.
                _ => None,
            };
            let listener = tokio::net::TcpListener::bind(&api.listen)
                .await
                .map_err(|e| anyhow::anyhow!("[api] listen {}: {e}", api.listen))?;
            Some((listener, tls))
        }
        None => None,
    };
    let metrics_listener = match &config.metrics {
        Some(m) => Some(
            tokio::net::TcpListener::bind(&m.listen)
                .await
                .map_err(|e| anyhow::anyhow!("[metrics] listen {}: {e}", m.listen))?,
        ),
        None => None,
    };
    let handle = {
        let (config, tokens) = (config.clone(), tokens.clone());
        tokio::task::spawn_blocking(move || start(&config, tokens.as_ref())).await??
    };
    // Idle until the integration is configured (here or through the API).
    netskope_sync::spawn(handle.clone())?;
    if let (Some(api), Some(tokens), Some((listener, tls))) = (&config.api, tokens, api_listener) {
        let router = http_router(&handle, &tokens, api.max_body_bytes)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(listen = %api.listen, scheme, "API listening");
        // Header and idle timeouts, a connection cap below the fd limit: slow clients cannot
        // make the API unreachable (`api::serve`).
        tokio::spawn(async move {
            if let Err(e) = api::serve::serve(listener, tls, router).await {
                tracing::error!(error = %e, "API server stopped");
            }
        });
    }
    if let (Some(m), Some(listener)) = (&config.metrics, metrics_listener) {
        let router = metrics::open_router(handle.clone()).layer(axum::middleware::from_fn(api::problem::normalize));
        tracing::info!(listen = %m.listen, "metrics listening (no token: keep it on the management network)");
        // The API's server: the same timeouts and connection cap against slow clients.
        tokio::spawn(async move {
            if let Err(e) = api::serve::serve(listener, None, router).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    tracing::info!(interfaces = config.dataplane.interfaces.len(), "gatekeeper running");

    // Rule expiry has a thread of its own (`control::expiry`), woken by every change.
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let file = config.policy.file.clone();
                // Read and checked without the control lock: a large file's parse does not hold
                // up the API's writes.
                let started = std::time::Instant::now();
                let read = tokio::task::spawn_blocking(move || read_policy_file(file.as_deref())).await;
                if let Ok(Some(doc)) = read {
                    blocking(&handle, move |c| reload(doc, started, c)).await;
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let detached = config.dataplane.detach_on_exit;
    let stats = blocking(&handle, move |c| {
        let dp = c.enforcer_mut().dataplane_mut();
        let stats = dp.stats()?;
        if detached {
            dp.detach_all()?;
        }
        Ok::<_, crate::dataplane::DataplaneError>(stats)
    })
    .await?;
    tracing::info!(
        passed = stats.passed(),
        dropped = stats.dropped(),
        would_drop = stats.would_drop(),
        malformed = stats.malformed(),
        "{}",
        if detached {
            "detached; gatekeeper stopped".to_string()
        } else if config.dataplane.ephemeral {
            "gatekeeper stopped; enforcement ends with this process (ephemeral: nothing was pinned)".to_string()
        } else {
            format!(
                "gatekeeper stopped; enforcement stays in place (pinned under {})",
                config.dataplane.pin_dir.display()
            )
        }
    );
    Ok(())
}

/// SIGHUP, first step: the policy file read and checked on its own (errors name its objects as
/// the file has them). `None` when there is nothing to apply; the reason is logged.
fn read_policy_file(file: Option<&Path>) -> Option<PolicyDocument> {
    let Some(path) = file else {
        tracing::info!("SIGHUP: no policy file configured; nothing to reload");
        return None;
    };
    match file_document(path) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::error!("policy reload rejected; the policy in force is unchanged: {e}");
            None
        }
    }
}

/// SIGHUP, second step: the file applied through the change path (under the control lock).
fn reload(doc: PolicyDocument, started: std::time::Instant, control: &mut Control) {
    match control.reload(doc) {
        Ok(diff) => tracing::info!(
            reason = "reload",
            changes = diff.len(),
            epoch = control.enforcer().dataplane().epoch(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "applied policy"
        ),
        Err(e) => tracing::error!("policy reload rejected; the policy in force is unchanged: {e}"),
    }
}

fn log_applied(reason: &str, control: &Control, report: ApplyReport) {
    let p = control.enforcer().policy();
    let c = control.enforcer().dataplane().applied();
    tracing::info!(
        reason,
        epoch = report.epoch,
        assets = p.assets.len(),
        segments = p.segments.len(),
        rules = p.rules.len(),
        prefixes = c.v4.len() + c.v6.len(),
        policy_entries = c.policy.len(),
        changed_entries = report.entries,
        elapsed_ms = report.total.as_secs_f64() * 1e3,
        "applied policy"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_tokens_are_read_from_their_files() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("gk-daemon-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let secret = |name: &str, text: &str, mode: u32| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p.display().to_string()
        };
        let admin = secret("admin", "admin-token-0123456789\n", 0o600);
        let alice = secret("alice", "alice-token-0123456789", 0o600);
        let config = |alice_file: &str| {
            Config::parse(
                &format!(
                    "[dataplane]\ninterfaces = [\"eth1\"]\n[api]\nadmin_token_file = \"{admin}\"\n\
                     [[api.tokens]]\nname = \"alice\"\nrole = \"reader\"\nfile = \"{alice_file}\"\n"
                ),
                "c.toml",
            )
            .unwrap()
        };
        let tokens = api_tokens(&config(&alice)).unwrap().unwrap();
        let named: Vec<_> = tokens.0.iter().map(|t| (t.name.as_str(), t.role, t.secret.as_str())).collect();
        assert_eq!(
            named,
            [("admin", Role::Admin, "admin-token-0123456789"), ("alice", Role::Reader, "alice-token-0123456789")]
        );
        let open = secret("open", "open-token-0123456789", 0o644);
        let e = api_tokens(&config(&open)).unwrap_err().to_string();
        assert!(e.contains("[[api.tokens]] alice: file") && e.contains("make it 0600"), "{e}");
        let same = secret("same", "admin-token-0123456789", 0o600);
        let e = api_tokens(&config(&same)).unwrap_err().to_string();
        assert!(e.contains("are the same token"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
