//! `gatekeeper run`: attach to the bridge ports, enforce the policy file, reload it on SIGHUP,
//! recompile when a rule expires, detach on SIGTERM/SIGINT.

use std::time::Instant;

use chrono::Utc;
use tokio::signal::unix::{SignalKind, signal};

use std::sync::Arc;

use crate::{
    api::{ApiState, App, Tokens},
    compile::{CompileError, Compiler},
    config::Config,
    maps::{ApplyReport, Dataplane, DataplaneError, LoadOptions},
    policy::PolicyDocument,
    policy::{Policy, PolicyError},
    store::{Store, changes},
};

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("policy does not fit the data plane: {0}")]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// The one path from a desired policy to the data plane: compile, then apply atomically.
/// Whatever fails, the policy in force stays exactly as it was.
pub struct Enforcer {
    compiler: Compiler,
    dataplane: Dataplane,
    policy: Policy,
    /// Asset name to its position in `policy.assets`.
    index: std::collections::HashMap<String, usize>,
}

impl Enforcer {
    pub fn new(config: &Config) -> Result<Self, EnforceError> {
        let options = LoadOptions {
            flow_table_size: config.dataplane.flow_table_size,
            pin_dir: Some(config.dataplane.pin_dir.clone()),
            ..LoadOptions::default()
        };
        let compiler = Compiler::new(config.dataplane.flow_timeouts.into(), options.capacity());
        let dataplane = Dataplane::load(options)?;
        Ok(Self { compiler, dataplane, policy: Policy::default(), index: Default::default() })
    }

    /// An enforcer over a data plane loaded with `options` (tests and tools; the daemon uses
    /// [`Enforcer::new`]).
    pub fn with_options(options: LoadOptions, timeouts: crate::compile::Timeouts) -> Result<Self, EnforceError> {
        let compiler = Compiler::new(timeouts, options.capacity());
        let dataplane = Dataplane::load(options)?;
        Ok(Self { compiler, dataplane, policy: Policy::default(), index: Default::default() })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// What one policy generation may hold.
    pub fn capacity(&self) -> crate::compile::Capacity {
        self.compiler.capacity
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dataplane
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// Puts `policy` in force. When only assets differ from the policy in force, only the
    /// changed assets are compiled.
    pub fn apply(&mut self, policy: Policy) -> Result<ApplyReport, EnforceError> {
        let now = Utc::now();
        let result = if self.policy.segments == policy.segments && self.policy.rules == policy.rules {
            let changed = changed_assets(&self.policy, &policy);
            let names: Vec<&str> = changed.iter().map(String::as_str).collect();
            let delta = self.compiler.update_assets(&policy, &names, self.dataplane.applied(), now)?;
            self.dataplane.apply_delta(delta)
        } else {
            let compiled = self.compiler.compile(&policy, now)?;
            self.dataplane.apply(compiled)
        };
        match result {
            Ok(report) => {
                self.policy = policy;
                self.reindex();
                Ok(report)
            }
            Err(e) => {
                // The compiler moved ahead of the maps: compile the next change in full.
                self.compiler.reset();
                Err(e.into())
            }
        }
    }

    /// Replaces (or with `None` removes) assets of the policy in force, by name (each at most
    /// once), and compiles only those changes: the path of tag edits. On error the policy in
    /// force is unchanged.
    pub fn apply_assets(
        &mut self,
        changes: Vec<(String, Option<crate::policy::Asset>)>,
    ) -> Result<ApplyReport, EnforceError> {
        // Only the changed assets are saved for a rollback: cloning the whole list would make
        // a tag edit cost as much as the policy is large.
        let mut undo: Vec<(String, Option<crate::policy::Asset>)> = Vec::with_capacity(changes.len());
        for (name, asset) in &changes {
            let previous = self.index.get(name).map(|&i| self.policy.assets[i].clone());
            undo.push((name.clone(), previous));
            self.put_asset(name, asset.clone());
        }
        let given: Vec<(&str, Option<&crate::policy::Asset>)> =
            changes.iter().map(|(n, _)| (n.as_str(), self.index.get(n).map(|&i| &self.policy.assets[i]))).collect();
        let result = self
            .compiler
            .update_assets_given(&self.policy, &given, self.dataplane.applied(), Utc::now())
            .map_err(EnforceError::from)
            // Each change is one request's asset: the moves may be written in place.
            .and_then(|delta| self.dataplane.apply_moves(delta).map_err(EnforceError::from));
        if result.is_err() {
            // Put the assets back as they were; the compiler starts over from a full compile.
            for (name, previous) in undo.into_iter().rev() {
                self.put_asset(&name, previous);
            }
            self.compiler.reset();
        }
        result
    }

    /// Sets, adds or (with `None`) removes one asset. Order does not matter to the compiler,
    /// so removal swaps the last asset into the hole.
    fn put_asset(&mut self, name: &str, asset: Option<crate::policy::Asset>) {
        match (self.index.get(name).copied(), asset) {
            (Some(i), Some(a)) => self.policy.assets[i] = a,
            (Some(i), None) => {
                self.policy.assets.swap_remove(i);
                self.index.remove(name);
                if let Some(moved) = self.policy.assets.get(i) {
                    self.index.insert(moved.name.clone(), i);
                }
            }
            (None, Some(a)) => {
                self.index.insert(a.name.clone(), self.policy.assets.len());
                self.policy.assets.push(a);
            }
            (None, None) => {}
        }
    }

    fn reindex(&mut self) {
        self.index = self.policy.assets.iter().enumerate().map(|(i, a)| (a.name.clone(), i)).collect();
    }

    /// Compiles the policy in force again in full (a rule expired).
    pub fn refresh(&mut self) -> Result<ApplyReport, EnforceError> {
        let compiled = self.compiler.compile(&self.policy, Utc::now())?;
        Ok(self.dataplane.apply(compiled)?)
    }
}

/// Names of the assets that differ between `old` and `new` (edited, added or removed).
pub fn changed_assets(old: &Policy, new: &Policy) -> Vec<String> {
    let before: std::collections::HashMap<&str, &crate::policy::Asset> =
        old.assets.iter().map(|a| (a.name.as_str(), a)).collect();
    let after: std::collections::HashMap<&str, &crate::policy::Asset> =
        new.assets.iter().map(|a| (a.name.as_str(), a)).collect();
    let mut changed: Vec<String> =
        new.assets.iter().filter(|a| before.get(a.name.as_str()) != Some(a)).map(|a| a.name.clone()).collect();
    changed.extend(old.assets.iter().filter(|a| !after.contains_key(a.name.as_str())).map(|a| a.name.clone()));
    changed
}

/// The policy file merged into the stored state, like `kubectl apply`: objects the file names
/// replace the stored ones of the same kind and name; other stored objects stay.
pub fn merged(base: &PolicyDocument, file: &PolicyDocument) -> PolicyDocument {
    let mut out = base.clone();
    crate::api::upsert(&mut out.assets, &file.assets, |a| &a.name);
    crate::api::upsert(&mut out.segments, &file.segments, |s| &s.name);
    crate::api::upsert(&mut out.rules, &file.rules, |r| &r.name);
    out
}

/// Reads and validates the policy file (errors name the file and its entries).
fn file_document(path: &std::path::Path) -> Result<PolicyDocument, PolicyError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| PolicyError::Read { source_name: name.clone(), error })?;
    let doc = PolicyDocument::from_yaml(&text, &name)?;
    doc.validate(&name)?;
    Ok(doc)
}

/// Reads a secret from a file only its owner may read. `what` names the setting in errors.
fn read_secret(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
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
fn netskope_settings(config: &Config) -> anyhow::Result<Option<crate::netskope::Settings>> {
    let Some(n) = &config.netskope else { return Ok(None) };
    let token = read_secret(&n.token_file, "[netskope] token_file")?;
    let tenant_url =
        crate::netskope::check_tenant_url(&n.tenant_url).map_err(|e| anyhow::anyhow!("[netskope] tenant_url: {e}"))?;
    let sync_interval_secs = crate::netskope::parse_interval(&n.sync_interval)
        .map_err(|e| anyhow::anyhow!("[netskope] sync_interval: {e}"))?;
    Ok(Some(crate::netskope::Settings { tenant_url, token, sync_interval_secs }))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let file = match &config.policy.file {
        Some(path) => Some(file_document(path)?),
        None => None,
    };
    let mut store = Store::open(&config.store.path)?;
    let stored = store.load()?;
    let mut integration = crate::netskope::Integration::load(&store)?;
    if let Some(settings) = netskope_settings(&config)? {
        let stored = integration.settings.as_ref().is_some_and(|s| {
            s.tenant_url == settings.tenant_url && s.sync_interval_secs == settings.sync_interval_secs
        });
        let audit = crate::store::AuditRow {
            actor: "config".into(),
            action: "configure netskope".into(),
            kind: Some("integration".into()),
            name: Some("netskope".into()),
            old: None,
            new: Some(
                serde_json::json!({"tenant_url": settings.tenant_url, "sync_interval_secs": settings.sync_interval_secs}),
            ),
        };
        if !stored {
            store.set_setting(crate::netskope::KEY_SETTINGS, Some(&settings), &[audit])?;
        }
        // The token stays in its file: the database never holds it.
        integration.settings = Some(settings);
        integration.regenerate();
    }
    let desired = file.as_ref().map_or_else(|| stored.clone(), |f| merged(&stored, f));
    let source = config
        .policy
        .file
        .as_ref()
        .map_or_else(|| config.store.path.display().to_string(), |p| p.display().to_string());
    // Enforced: the user's objects and those the Netskope mappings generate.
    let policy = integration.validate(&desired, &source)?;
    let tokens = match &config.api {
        Some(api) => Some(Tokens {
            admin: api.admin_token_file.as_deref().map(|p| read_secret(p, "[api] admin_token_file")).transpose()?,
            reader: api.reader_token_file.as_deref().map(|p| read_secret(p, "[api] reader_token_file")).transpose()?,
        }),
        None => None,
    };
    // The store keeps the tokens' hashes (and audits rotations), never the tokens.
    for (role, token, file) in [
        (
            "admin",
            tokens.as_ref().and_then(|t| t.admin.as_deref()),
            config.api.as_ref().and_then(|a| a.admin_token_file.as_ref()),
        ),
        (
            "reader",
            tokens.as_ref().and_then(|t| t.reader.as_deref()),
            config.api.as_ref().and_then(|a| a.reader_token_file.as_ref()),
        ),
    ] {
        match (token, file) {
            (Some(t), Some(f)) => {
                store.set_credential(role, &crate::api::token_hash(t), &f.display().to_string())?;
            }
            _ => store.remove_credential(role)?,
        }
    }
    // The API's certificate and port are checked before anything is attached, so a bad file or
    // a busy port stops the daemon with the network untouched.
    let api_listener = match &config.api {
        Some(api) => {
            let tls = match (&api.tls_cert, &api.tls_key) {
                (Some(cert), Some(key)) => {
                    Some(crate::tls::server_config(cert, key).map_err(|e| anyhow::anyhow!("[api] {e}"))?)
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
    let mut enforcer = Enforcer::new(&config)?;
    let started = Instant::now();
    // Large policies take seconds to compile: say what is going on.
    tracing::info!(
        assets = policy.assets.len(),
        segments = policy.segments.len(),
        rules = policy.rules.len(),
        "compiling the policy and writing the maps"
    );
    let report = enforcer.apply(policy)?;
    log_applied("start", &enforcer, report, started);
    let diff = changes(&stored, &desired);
    if !diff.is_empty() {
        store.commit(&diff, "policy-file", "start")?;
    }
    let mut app = App::new(enforcer, store, desired);
    app.last_apply = Some((Utc::now(), started.elapsed().as_secs_f64() * 1e3));
    app.netskope = integration;
    crate::metrics::netskope_apps(&app.netskope);

    // Maps are filled before the program sees its first packet.
    for interface in &config.dataplane.interfaces {
        match app.enforcer.dataplane_mut().attach(interface, config.dataplane.xdp_mode) {
            Ok(mode) => tracing::info!(interface = %interface, mode, "attached"),
            Err(e) => {
                if app.enforcer.dataplane().took_over() {
                    // A running enforcement was taken over: removing its pins would leave the
                    // ports unfiltered. Everything stays pinned and enforcing; we exit.
                    tracing::error!(interface = %interface, "attach failed; the pinned enforcement stays in place");
                } else {
                    let _ = app.enforcer.dataplane_mut().detach_all();
                }
                return Err(e.into());
            }
        }
    }
    let app = Arc::new(tokio::sync::Mutex::new(app));
    // Idle until the integration is configured (here or through the API).
    crate::netskope::worker::spawn(app.clone())?;
    if let (Some(api), Some(tokens), Some((listener, tls))) = (&config.api, tokens, api_listener) {
        let router = crate::api::router(ApiState::new(app.clone(), tokens));
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(listen = %api.listen, scheme, "API listening{}", if tls.is_some() { " (https)" } else { "" });
        tokio::spawn(async move {
            let served = match tls {
                Some(tls) => match crate::tls::TlsListener::new(listener, tls) {
                    Ok(l) => axum::serve(l, router).await,
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                },
                None => axum::serve(listener, router).await,
            };
            if let Err(e) = served {
                tracing::error!(error = %e, "API server stopped");
            }
        });
    }
    tracing::info!(interfaces = config.dataplane.interfaces.len(), "gatekeeper running");

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let next_expiry = app.lock().await.enforcer.policy().next_expiry(Utc::now());
        let until_expiry = next_expiry
            .map(|t| (t - Utc::now()).to_std().unwrap_or_default())
            .unwrap_or(std::time::Duration::from_secs(3600));
        tokio::select! {
            _ = hup.recv() => reload(&config, &mut *app.lock().await),
            _ = tokio::time::sleep(until_expiry), if next_expiry.is_some() => {
                let mut app = app.lock().await;
                let started = Instant::now();
                match app.enforcer.refresh() {
                    Ok(report) => log_applied("rule expiry", &app.enforcer, report, started),
                    Err(e) => tracing::error!(error = %e, "recompiling after a rule expired failed; the previous policy stays in force"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let mut app = app.lock().await;
    let stats = app.enforcer.dataplane().stats()?;
    let detached = config.dataplane.detach_on_exit;
    if detached {
        app.enforcer.dataplane_mut().detach_all()?;
    }
    tracing::info!(
        passed = stats.passed(),
        dropped = stats.dropped(),
        would_drop = stats.would_drop(),
        malformed = stats.malformed(),
        "{}",
        if detached {
            "detached; gatekeeper stopped".to_string()
        } else {
            format!(
                "gatekeeper stopped; enforcement stays in place (pinned under {})",
                config.dataplane.pin_dir.display()
            )
        }
    );
    Ok(())
}

fn reload(config: &Config, app: &mut App) {
    let Some(path) = &config.policy.file else {
        tracing::info!("SIGHUP: no policy file configured; nothing to reload");
        return;
    };
    let started = Instant::now();
    let doc = match file_document(path) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("policy reload rejected; the policy in force is unchanged: {e}");
            return;
        }
    };
    let desired = merged(&app.doc, &doc);
    match app.change(desired, "policy-file", "reload", false) {
        Ok(diff) => tracing::info!(
            reason = "reload",
            changes = diff.len(),
            epoch = app.enforcer.dataplane().epoch(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "applied policy"
        ),
        Err(e) => tracing::error!("policy reload rejected; the policy in force is unchanged: {e}"),
    }
}

fn log_applied(reason: &str, enforcer: &Enforcer, report: ApplyReport, started: Instant) {
    let p = enforcer.policy();
    let c = enforcer.dataplane().applied();
    tracing::info!(
        reason,
        epoch = report.epoch,
        assets = p.assets.len(),
        segments = p.segments.len(),
        rules = p.rules.len(),
        prefixes = c.v4.len() + c.v6.len(),
        policy_entries = c.policy.len(),
        changed_entries = report.entries,
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "applied policy"
    );
}
