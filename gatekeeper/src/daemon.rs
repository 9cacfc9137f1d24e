//! `gatekeeper run`: attach to the bridge ports, enforce the policy file, reload it on SIGHUP,
//! recompile when a rule expires, detach on SIGTERM/SIGINT.

use std::time::Instant;

use chrono::Utc;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    compile::{CompileError, Compiler},
    config::Config,
    maps::{ApplyReport, Dataplane, DataplaneError, LoadOptions},
    policy::{self, Policy, PolicyError},
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
        Ok(Self { compiler, dataplane, policy: Policy::default() })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
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
                Ok(report)
            }
            Err(e) => {
                // The compiler moved ahead of the maps: compile the next change in full.
                self.compiler.reset();
                Err(e.into())
            }
        }
    }

    /// Compiles the policy in force again in full (a rule expired).
    pub fn refresh(&mut self) -> Result<ApplyReport, EnforceError> {
        let compiled = self.compiler.compile(&self.policy, Utc::now())?;
        Ok(self.dataplane.apply(compiled)?)
    }
}

/// Names of the assets that differ between `old` and `new` (edited, added or removed).
pub fn changed_assets(old: &Policy, new: &Policy) -> Vec<String> {
    let before: std::collections::HashMap<&str, &crate::policy::Asset> = old.assets.iter().map(|a| (a.name.as_str(), a)).collect();
    let after: std::collections::HashMap<&str, &crate::policy::Asset> = new.assets.iter().map(|a| (a.name.as_str(), a)).collect();
    let mut changed: Vec<String> =
        new.assets.iter().filter(|a| before.get(a.name.as_str()) != Some(a)).map(|a| a.name.clone()).collect();
    changed.extend(old.assets.iter().filter(|a| !after.contains_key(a.name.as_str())).map(|a| a.name.clone()));
    changed
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let policy = match &config.policy.file {
        Some(path) => policy::load_file(path)?,
        None => Policy::default(),
    };
    let mut enforcer = Enforcer::new(&config)?;
    let started = Instant::now();
    let report = enforcer.apply(policy)?;
    log_applied("start", &enforcer, report, started);

    // Maps are filled before the program sees its first packet.
    for interface in &config.dataplane.interfaces {
        match enforcer.dataplane_mut().attach(interface, config.dataplane.xdp_mode) {
            Ok(mode) => tracing::info!(interface = %interface, mode, "attached"),
            Err(e) => {
                let _ = enforcer.dataplane_mut().detach_all();
                return Err(e.into());
            }
        }
    }
    tracing::info!(interfaces = config.dataplane.interfaces.len(), "gatekeeper running");

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let next_expiry = enforcer.policy().next_expiry(Utc::now());
        let until_expiry = next_expiry
            .map(|t| (t - Utc::now()).to_std().unwrap_or_default())
            .unwrap_or(std::time::Duration::from_secs(3600));
        tokio::select! {
            _ = hup.recv() => reload(&config, &mut enforcer),
            _ = tokio::time::sleep(until_expiry), if next_expiry.is_some() => {
                let started = Instant::now();
                match enforcer.refresh() {
                    Ok(report) => log_applied("rule expiry", &enforcer, report, started),
                    Err(e) => tracing::error!(error = %e, "recompiling after a rule expired failed; the previous policy stays in force"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let stats = enforcer.dataplane().stats()?;
    let detached = config.dataplane.detach_on_exit;
    if detached {
        enforcer.dataplane_mut().detach_all()?;
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
            format!("gatekeeper stopped; enforcement stays in place (pinned under {})", config.dataplane.pin_dir.display())
        }
    );
    Ok(())
}

fn reload(config: &Config, enforcer: &mut Enforcer) {
    let Some(path) = &config.policy.file else {
        tracing::info!("SIGHUP: no policy file configured; nothing to reload");
        return;
    };
    let started = Instant::now();
    let result = policy::load_file(path).map_err(EnforceError::from).and_then(|p| enforcer.apply(p));
    match result {
        Ok(report) => log_applied("reload", enforcer, report, started),
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
