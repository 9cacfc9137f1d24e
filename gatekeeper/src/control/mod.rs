//! The control layer: the one change path from a desired state to the data plane and the store.
//!
//! Every change, whoever makes it (the REST API, the policy file at start and on SIGHUP, the
//! Netskope integration), takes the same steps in [`Control`]: validate the whole new document
//! (with the objects the integration generates; a single-asset write validates that asset),
//! compile it ([`Enforcer::stage`]: no map is
//! touched), record it and its audit rows in one store transaction, only then write it into the
//! data plane, and publish the status. A change the store refuses never reaches a packet; one the
//! data plane refuses is undone in the store: a refused or failed change changes nothing.
//!
//! * [`Handle`]: the shared control state behind one lock; blocking work (compiles, map writes,
//!   fsync, grace periods) runs on threads that take it, never on async workers. Status reads
//!   go to a [`StatusBoard`] published after each change, without the lock.
//! * [`writer`]: the queue that applies single-asset edits in batches (group commit).
//! * [`store`]: the SQLite store; [`netskope`]: the integration's state and generated objects;
//!   [`auth`]: credentials; [`telemetry`]: the counters the edges export.

pub mod auth;
pub mod enforcer;
pub mod expiry;
pub mod netskope;
mod netskope_change;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod writer;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, mpsc},
    time::Instant,
};

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use self::{
    auth::Actor,
    netskope::{Event, Integration, Settings},
    store::AuditRow,
    writer::{AssetEdit, AssetWrite},
};
pub use self::{
    enforcer::{EnforceError, Enforcer, Staged},
    status::{StatusBoard, StatusView},
    store::{Store, StoreError},
};
use crate::{
    dataplane::ApplyReport,
    policy::{
        Asset, AssetSpec, Mode, Policy, PolicyDocument, PolicyError, Problem, RuleSpec, SegmentSpec,
        diff::{Change, Kind, Spec, changes, inverse, merge_patch, merged, upsert},
        membership::{governed, member_assets},
        selector::Selector,
    },
};

/// Why a change was refused or not applied. Whatever the reason, nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The desired state is invalid: every problem, each naming its entry and field.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Problem>),
    /// The input is not a policy document.
    #[error(transparent)]
    Policy(PolicyError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// `If-Match` named another version than the one stored.
    #[error("{0}")]
    Precondition(String),
    /// The data plane refused the policy; the policy in force is unchanged.
    #[error(transparent)]
    Enforce(EnforceError),
    /// The store refused the change; it is not applied either.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// A part of the daemon the request needs is not running.
    #[error("{0}")]
    Unavailable(&'static str),
    /// The failure of a batch that this request was part of.
    #[error(transparent)]
    Batch(Arc<ControlError>),
}

impl From<EnforceError> for ControlError {
    /// A policy too large for the maps is the user's input, like any invalid policy: it names
    /// the map, its capacity and what was asked.
    fn from(e: EnforceError) -> Self {
        match e {
            EnforceError::Compile(c) => {
                Self::Invalid(vec![Problem { entry: "policy".into(), field: "capacity", reason: c.to_string() }])
            }
            EnforceError::Policy(p) => p.into(),
            e @ EnforceError::Dataplane(_) => Self::Enforce(e),
        }
    }
}

impl From<PolicyError> for ControlError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::Invalid { problems, .. } => Self::Invalid(problems),
            other => Self::Policy(other),
        }
    }
}

/// The daemon's control state: the desired state, the enforcer, the store, the integration.
pub struct Control {
    enforcer: Enforcer,
    store: Store,
    /// The desired state (what the store holds).
    doc: PolicyDocument,
    /// Asset name to its position in `doc.assets`.
    index: HashMap<String, usize>,
    last_apply: Option<(DateTime<Utc>, f64)>,
    /// Moves with every [`Control::publish`]: what readers cache derived figures by.
    revision: u64,
    /// The Netskope integration: its generated objects are enforced with `doc`.
    netskope: Integration,
    /// Wakes the Netskope worker (none until it runs).
    wake: Option<mpsc::Sender<Event>>,
    board: Arc<StatusBoard>,
    expiry: Arc<expiry::ExpiryClock>,
    /// The share of governed addresses an apply may leave ungoverned without `force`.
    max_ungoverned_share: f64,
    /// The tokens the API accepts (shared with it); those created through the API are kept in
    /// the store too.
    credentials: auth::CredentialSet,
}

/// Object changes logged one by one; beyond them, one line says how many more.
const LOGGED_CHANGES: usize = 20;

/// The audit action of a recorded change put back because the data plane refused it.
const UNDONE: &str = "undone: the data plane refused the change";

/// Default share of the governed addresses an apply may leave ungoverned without `force`.
pub const DEFAULT_MAX_UNGOVERNED_SHARE: f64 = 0.10;

/// How `POST /apply` applies a document.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    pub dry_run: bool,
    /// Delete the objects the document does not name (otherwise they stay).
    pub prune: bool,
    /// Apply even what would open the network (see [`Control::apply`]).
    pub force: bool,
}

/// What an apply changed (or would change), and how governance moves.
#[derive(Debug, Clone)]
pub struct Applied {
    pub changes: Vec<Change>,
    pub governance: Governance,
}

/// Addresses governed (by `enforce` or `monitor` segments) before and after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Governance {
    pub governed_before: usize,
    pub governed_after: usize,
    pub newly_ungoverned: usize,
    pub newly_governed: usize,
}

/// The one commit step of every change, durable before it is enforced: `stage` compiles the
/// change (no packet can see it yet), `record` commits it to the store, and only then is it
/// written into the data plane. A change the store refuses (a full disk, an I/O error) is
/// dropped before any map is touched, so a refused request changes nothing at any instant. If
/// the data plane then refuses the write (it never saw the change), `revert` records the
/// previous state again, so the store does not claim what is not enforced. Returns the apply
/// report when something was staged.
///
/// A `large` change (a reload restating 100k assets) writes its rows on a second thread while
/// it compiles, and its transaction commits only once the compile succeeded: the two costs
/// overlap instead of adding up, and the order above holds.
fn commit_step(
    kind: telemetry::ApplyKind,
    enforcer: &mut Enforcer,
    store: &mut Store,
    large: bool,
    stage: impl FnOnce(&mut Enforcer) -> Result<Option<Staged>, EnforceError>,
    record: impl FnOnce(&mut Store) -> Result<(), StoreError> + Send,
    revert: impl FnOnce(&mut Store) -> Result<(), StoreError>,
) -> Result<Option<ApplyReport>, ControlError> {
    let started = Instant::now();
    let result = commit_step_timed(enforcer, store, large, stage, record, revert);
    match &result {
        Ok(Some((report, before_publish))) => {
            telemetry::applied(kind, started.elapsed(), *before_publish + report.enforced_after);
        }
        Ok(None) => {}
        Err(_) => telemetry::apply_failed(),
    }
    result.map(|r| r.map(|(report, _)| report))
}

/// [`commit_step`], also returning how long it took to reach the data-plane write.
fn commit_step_timed(
    enforcer: &mut Enforcer,
    store: &mut Store,
    large: bool,
    stage: impl FnOnce(&mut Enforcer) -> Result<Option<Staged>, EnforceError>,
    record: impl FnOnce(&mut Store) -> Result<(), StoreError> + Send,
    revert: impl FnOnce(&mut Store) -> Result<(), StoreError>,
) -> Result<Option<(ApplyReport, std::time::Duration)>, ControlError> {
    let started = Instant::now();
    let (staged, recorded) = if large {
        let (compiled, gate) = std::sync::mpsc::channel();
        store.gate_next_commit(gate);
        let (staged, recorded) = std::thread::scope(|scope| {
            let recording =
                std::thread::Builder::new().name("gk-record".into()).spawn_scoped(scope, || record(&mut *store));
            let staged = stage(enforcer);
            let _ = compiled.send(staged.is_ok());
            let recorded = match recording {
                Ok(thread) => thread.join().unwrap_or_else(|_| Err(StoreError::Cancelled)),
                Err(e) => Err(StoreError::Io { path: "a thread to record the change".into(), error: e }),
            };
            (staged, recorded)
        });
        // A record that failed before its commit left the gate unused.
        store.clear_gate();
        (staged?, recorded)
    } else {
        let staged = stage(enforcer)?;
        (staged, record(store))
    };
    if let Err(e) = recorded {
        if let Some(staged) = staged {
            enforcer.abort(staged);
        }
        return Err(e.into());
    }
    let Some(staged) = staged else { return Ok(None) };
    let before_publish = started.elapsed();
    match enforcer.publish(staged) {
        Ok(report) => Ok(Some((report, before_publish))),
        Err(e) => {
            if let Err(back) = revert(store) {
                // The store now holds a change that is not enforced; the previous policy is
                // still in force. A restart would enforce the store's state.
                tracing::error!(
                    error = %e, revert_error = %back,
                    "the data plane refused a recorded change and the store could not be reverted: the store \
                     holds a change that is not enforced until the next start"
                );
            }
            Err(e.into())
        }
    }
}

/// Changes of at least this many objects record while they compile ([`commit_step`]).
const LARGE_CHANGE: usize = 1000;

/// The state a daemon starts from, validated but not yet enforced ([`Control::prepare`]).
pub struct Prepared {
    credentials: auth::CredentialSet,
    store: Store,
    stored: PolicyDocument,
    desired: PolicyDocument,
    policy: Policy,
    netskope: Integration,
}

impl Prepared {
    /// What will be enforced: the desired state with the generated objects.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Enforces the prepared state over `enforcer` and records what the policy file changed.
    pub fn enforce(self, mut enforcer: Enforcer) -> Result<(Control, ApplyReport), ControlError> {
        let Self { credentials, mut store, stored, desired, policy, netskope } = self;
        let started = Instant::now();
        let diff = changes(&stored, &desired);
        let actor = Actor::named("policy-file");
        let report = commit_step(
            telemetry::ApplyKind::Policy,
            &mut enforcer,
            &mut store,
            diff.len() >= LARGE_CHANGE,
            |e| e.stage(policy).map(Some),
            |s| if diff.is_empty() { Ok(()) } else { s.commit(&diff, &actor, "start") },
            |s| if diff.is_empty() { Ok(()) } else { s.commit(&inverse(&diff), &actor, UNDONE) },
        )?
        .expect("a staged policy is applied or refused");
        let mut control = Control {
            enforcer,
            store,
            doc: desired,
            index: HashMap::new(),
            last_apply: Some((Utc::now(), started.elapsed().as_secs_f64() * 1e3)),
            revision: 0,
            netskope,
            wake: None,
            board: Arc::new(StatusBoard::default()),
            expiry: Arc::default(),
            max_ungoverned_share: DEFAULT_MAX_UNGOVERNED_SHARE,
            credentials,
        };
        control.reindex();
        telemetry::netskope_apps(&control.netskope);
        control.publish();
        Ok((control, report))
    }
}

impl Control {
    /// Reads the stored state, records `netskope` settings from the configuration (they win over
    /// settings made through the API; the token stays in its file), merges the policy `file`
    /// into the stored state like `kubectl apply`, and validates the result with the generated
    /// objects. Nothing is enforced yet: a bad state stops here with the network untouched.
    /// `source` names the input in errors.
    pub fn prepare(
        mut store: Store,
        file: Option<&PolicyDocument>,
        netskope: Option<Settings>,
        source: &str,
    ) -> Result<Prepared, ControlError> {
        let stored = store.load()?;
        let mut integration = store.netskope_integration()?;
        if let Some(settings) = netskope {
            let unchanged = integration.settings.as_ref().is_some_and(|s| {
                s.tenant_url == settings.tenant_url && s.sync_interval_secs == settings.sync_interval_secs
            });
            if !unchanged {
                let audit = AuditRow {
                    actor: "config".into(),
                    action: "configure netskope".into(),
                    kind: Some("integration".into()),
                    name: Some("netskope".into()),
                    old: None,
                    new: Some(serde_json::json!({
                        "tenant_url": settings.tenant_url,
                        "sync_interval_secs": settings.sync_interval_secs,
                    })),
                };
                store.set_setting(netskope::KEY_SETTINGS, Some(&settings), &[audit])?;
            }
            integration.settings = Some(settings);
            integration.regenerate();
        }
        let desired = file.map_or_else(|| stored.clone(), |f| merged(&stored, f.clone()));
        let policy = integration.validate(&desired, source)?;
        // The tokens created through the API; those from files come with the API's router.
        let credentials = auth::CredentialSet::default();
        for c in store.credentials()? {
            if c.origin == auth::Origin::Api {
                credentials.insert(c);
            }
        }
        Ok(Prepared { credentials, store, stored, desired, policy, netskope: integration })
    }

    pub fn doc(&self) -> &PolicyDocument {
        &self.doc
    }

    /// The tokens requests are checked against.
    pub fn credentials(&self) -> &auth::CredentialSet {
        &self.credentials
    }

    /// Creates a token named `name` with `role`, recorded (its hash only) in the store and
    /// accepted at once; returns its secret, which exists nowhere else.
    pub fn create_token(&mut self, actor: &Actor, name: &str, role: auth::Role) -> Result<String, ControlError> {
        auth::check_token_name(name).map_err(|reason| {
            ControlError::Invalid(vec![Problem { entry: format!("tokens/{name}"), field: "name", reason }])
        })?;
        if self.credentials.get(name).is_some() {
            return Err(ControlError::Conflict(format!("a token named {name:?} exists; revoke it first")));
        }
        let secret =
            auth::new_secret().map_err(|source| ControlError::Io { what: "reading /dev/urandom".into(), source })?;
        let credential =
            auth::Credential { name: name.into(), role, origin: auth::Origin::Api, hash: auth::digest(&secret) };
        if !self.store.add_api_credential(actor, &credential)? {
            return Err(ControlError::Conflict(format!("a token named {name:?} exists; revoke it first")));
        }
        self.credentials.insert(credential);
        tracing::info!(actor = %actor, token = name, role = role.as_str(), "token created");
        Ok(secret)
    }

    /// Revokes a token created through the API: refused at once, and gone from the store.
    pub fn revoke_token(&mut self, actor: &Actor, name: &str) -> Result<(), ControlError> {
        match self.credentials.get(name) {
            None => return Err(ControlError::NotFound(format!("no token {name:?}"))),
            Some((_, auth::Origin::File)) => {
                return Err(ControlError::Conflict(format!(
                    "token {name:?} is read from a file: remove it from [api] in the configuration and restart"
                )));
            }
            Some((_, auth::Origin::Api)) => {}
        }
        self.store.remove_api_credential(actor, name)?;
        self.credentials.remove(name);
        tracing::info!(actor = %actor, token = name, "token revoked");
        Ok(())
    }

    /// Moves with every change published (see [`Control::publish`]).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn enforcer(&self) -> &Enforcer {
        &self.enforcer
    }

    pub fn enforcer_mut(&mut self) -> &mut Enforcer {
        &mut self.enforcer
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn netskope(&self) -> &Integration {
        &self.netskope
    }

    pub fn board(&self) -> Arc<StatusBoard> {
        self.board.clone()
    }

    /// What wakes the expiry thread on every change.
    pub fn expiry_clock(&self) -> Arc<expiry::ExpiryClock> {
        self.expiry.clone()
    }

    fn reindex(&mut self) {
        self.index = self.doc.assets.iter().enumerate().map(|(i, a)| (a.name.clone(), i)).collect();
    }

    /// The stored asset named `name`.
    pub fn asset(&self, name: &str) -> Option<&AssetSpec> {
        self.index.get(name).map(|&i| &self.doc.assets[i])
    }

    /// The stored assets a selector matches, in document order.
    pub fn assets_matching(&self, selector: &Selector) -> Vec<AssetSpec> {
        let matching: HashSet<&str> = self
            .enforcer
            .policy()
            .assets
            .iter()
            .filter(|a| selector.matches(&a.tags))
            .map(|a| a.name.as_str())
            .collect();
        self.doc.assets.iter().filter(|a| matching.contains(a.name.as_str())).cloned().collect()
    }

    /// The members of segment `name` as enforced: assets with their prefixes, and its CIDRs.
    #[allow(clippy::type_complexity)]
    pub fn segment_members(&self, name: &str) -> Result<(Vec<(String, Vec<IpNet>)>, Vec<IpNet>), ControlError> {
        let policy = self.enforcer.policy();
        let seg = policy
            .segments
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ControlError::NotFound(format!("no segment {name:?}")))?;
        let assets = member_assets(policy, seg).map(|a| (a.name.clone(), a.prefixes.clone())).collect();
        Ok((assets, seg.cidrs.clone()))
    }

    /// Edits a copy of the desired state with `edit` and makes it the desired state.
    pub fn edit(
        &mut self,
        actor: &Actor,
        action: &str,
        edit: impl FnOnce(&mut PolicyDocument),
    ) -> Result<Vec<Change>, ControlError> {
        let mut doc = self.doc.clone();
        edit(&mut doc);
        self.change(doc, actor, action, false)
    }

    /// Creates or replaces a segment.
    pub fn put_segment(&mut self, actor: &Actor, spec: SegmentSpec) -> Result<Vec<Change>, ControlError> {
        self.edit(actor, "put segment", |d| upsert(&mut d.segments, [spec], |x| &x.name))
    }

    /// Creates or replaces a rule.
    pub fn put_rule(&mut self, actor: &Actor, spec: RuleSpec) -> Result<Vec<Change>, ControlError> {
        self.edit(actor, "put rule", |d| upsert(&mut d.rules, [spec], |x| &x.name))
    }

    /// Deletes a segment no rule uses (a generated or mapped segment cannot be deleted).
    pub fn delete_segment(&mut self, actor: &Actor, name: &str) -> Result<(), ControlError> {
        if netskope::reserved_segment(name) {
            return Err(ControlError::Conflict(format!("segment {name:?} is generated from the Netskope publishers")));
        }
        if !self.doc.segments.iter().any(|s| s.name == name) {
            return Err(ControlError::NotFound(format!("no segment {name:?}")));
        }
        let users: Vec<&str> =
            self.doc.rules.iter().filter(|r| r.from == name || r.to == name).map(|r| r.name.as_str()).collect();
        if !users.is_empty() {
            return Err(ControlError::Conflict(format!(
                "segment {name:?} is used by rules {users:?}; delete or change them first"
            )));
        }
        self.edit(actor, "delete segment", |d| d.segments.retain(|x| x.name != name))?;
        Ok(())
    }

    /// Deletes a user rule (generated rules follow their mapping).
    pub fn delete_rule(&mut self, actor: &Actor, name: &str) -> Result<(), ControlError> {
        if self.netskope.rules.iter().any(|g| g.rule.name == name) {
            return Err(ControlError::Conflict(format!(
                "rule {name:?} is generated by a Netskope mapping; change the mapping instead"
            )));
        }
        if !self.doc.rules.iter().any(|r| r.name == name) {
            return Err(ControlError::NotFound(format!("no rule {name:?}")));
        }
        self.edit(actor, "delete rule", |d| d.rules.retain(|x| x.name != name))?;
        Ok(())
    }

    /// How much of what is governed an apply may leave ungoverned without `force`.
    pub fn set_apply_guard(&mut self, max_ungoverned_share: f64) {
        self.max_ungoverned_share = max_ungoverned_share.clamp(0.0, 1.0);
    }

    /// `POST /apply`: `doc` merged into the desired state (objects it does not name stay), or,
    /// with `prune`, replacing it. An apply that would leave no `enforce` segment where there was
    /// one, or leave more than the allowed share of the governed addresses ungoverned, is refused
    /// unless `force`: a typo or an empty file must not open the network.
    pub fn apply(
        &mut self,
        doc: PolicyDocument,
        actor: &Actor,
        action: &str,
        options: ApplyOptions,
    ) -> Result<Applied, ControlError> {
        let desired = if options.prune { doc } else { merged(&self.doc, doc) };
        self.check_generated_names(&desired)?;
        let after = self.netskope.validate(&desired, "request")?;
        let before = self.enforcer.policy();
        let (was, will) = (governed(before), governed(&after));
        let governance = Governance {
            governed_before: was.len(),
            governed_after: will.len(),
            newly_ungoverned: was.difference(&will).count(),
            newly_governed: will.difference(&was).count(),
        };
        let enforcing = |p: &Policy| p.segments.iter().any(|s| s.mode == Mode::Enforce);
        if !options.force {
            if enforcing(before) && !enforcing(&after) {
                let n = before.segments.iter().filter(|s| s.mode == Mode::Enforce).count();
                return Err(ControlError::Conflict(format!(
                    "this apply leaves no segment in enforce mode (there are {n} now): nothing would be dropped any \
                     more; apply it with force=true if that is meant"
                )));
            }
            let share = governance.newly_ungoverned as f64 / was.len().max(1) as f64;
            if share > self.max_ungoverned_share {
                return Err(ControlError::Conflict(format!(
                    "this apply leaves {} of {} governed addresses ungoverned ({:.0}%, more than the {:.0}% allowed); \
                     apply it with force=true if that is meant",
                    governance.newly_ungoverned,
                    was.len(),
                    share * 100.0,
                    self.max_ungoverned_share * 100.0
                )));
            }
        }
        let changes = self.change_validated(desired, after, actor, action, options.dry_run)?;
        Ok(Applied { changes, governance })
    }

    /// The policy file read again (SIGHUP): applied like `POST /apply` without prune or force
    /// (objects it does not name stay; it may not open the network by accident).
    pub fn reload(&mut self, file: PolicyDocument) -> Result<Vec<Change>, ControlError> {
        Ok(self.apply(file, &Actor::named("policy-file"), "reload", ApplyOptions::default())?.changes)
    }

    /// Compiles the policy in force again in full (a rule expired).
    pub fn refresh(&mut self) -> Result<ApplyReport, ControlError> {
        let report = self.enforcer.refresh()?;
        self.publish();
        Ok(report)
    }

    /// Makes `new` the desired state: validate, compile, record, enforce. Returns the changes.
    pub fn change(
        &mut self,
        new: PolicyDocument,
        actor: &Actor,
        action: &str,
        dry_run: bool,
    ) -> Result<Vec<Change>, ControlError> {
        self.check_generated_names(&new)?;
        let policy = self.netskope.validate(&new, "request")?;
        self.change_validated(new, policy, actor, action, dry_run)
    }

    /// [`Control::change`] of a document already checked and validated into `policy`.
    fn change_validated(
        &mut self,
        new: PolicyDocument,
        policy: Policy,
        actor: &Actor,
        action: &str,
        dry_run: bool,
    ) -> Result<Vec<Change>, ControlError> {
        let diff = changes(&self.doc, &new);
        if dry_run || diff.is_empty() {
            return Ok(diff);
        }
        self.commit(
            telemetry::ApplyKind::Policy,
            diff.len() >= LARGE_CHANGE,
            |e| e.stage(policy).map(Some),
            |s| s.commit(&diff, actor, action),
            |s| s.commit(&inverse(&diff), actor, UNDONE),
        )?;
        self.doc = new;
        self.reindex();
        self.publish();
        // Each object in the log, up to a point: a reload of 100k objects is one line more (the
        // audit log has every object).
        for c in diff.iter().take(LOGGED_CHANGES) {
            tracing::info!(actor = %actor, action, kind = c.kind.as_str(), name = %c.name, op = c.op(), "changed");
        }
        if diff.len() > LOGGED_CHANGES {
            let more = diff.len() - LOGGED_CHANGES;
            tracing::info!(actor = %actor, action, more, "changed, and more objects: see the audit log");
        }
        // Any object may move members in or out of a mapped segment; a push that finds
        // nothing to change costs no request.
        let acting = self.netskope.acting();
        self.netskope_mark(&acting, "change");
        Ok(diff)
    }

    /// The one commit step of every change (see [`commit_step`]); records when it last applied.
    fn commit(
        &mut self,
        kind: telemetry::ApplyKind,
        large: bool,
        stage: impl FnOnce(&mut Enforcer) -> Result<Option<Staged>, EnforceError>,
        record: impl FnOnce(&mut Store) -> Result<(), StoreError> + Send,
        revert: impl FnOnce(&mut Store) -> Result<(), StoreError>,
    ) -> Result<(), ControlError> {
        let started = Instant::now();
        if commit_step(kind, &mut self.enforcer, &mut self.store, large, stage, record, revert)?.is_some() {
            self.last_apply = Some((Utc::now(), started.elapsed().as_secs_f64() * 1e3));
        }
        Ok(())
    }

    /// Asset writes, each resolved against the asset as the writes before it left it and
    /// validated on its own, applied together: one incremental compile, one data-plane apply and
    /// one store transaction for the whole batch (group commit), so the fixed costs (the RCU
    /// grace period, the fsync) are paid once per batch. A write naming an asset already in the
    /// batch starts a new batch, so writes apply in order and a merge patch always applies to
    /// the latest version (no update is lost).
    pub fn change_assets(&mut self, writes: Vec<AssetWrite>) {
        let mut batch: Vec<Resolved> = Vec::new();
        let mut names = HashSet::new();
        for w in writes {
            if names.contains(&w.name) {
                self.apply_batch(std::mem::take(&mut batch));
                names.clear();
            }
            let resolved = self
                .precondition(&w.name, w.if_match.as_deref())
                .and_then(|()| self.resolve(&w.name, &w.edit))
                .and_then(|spec| {
                    let asset = spec.as_ref().map(|s| validate_asset(s, "request")).transpose()?.flatten();
                    Ok((spec, asset))
                });
            match resolved {
                Ok((spec, asset)) => {
                    names.insert(w.name.clone());
                    batch.push(Resolved { write: w, spec, asset });
                }
                Err(e) => {
                    let _ = w.reply.send(Err(e));
                }
            }
        }
        self.apply_batch(batch);
    }

    /// `If-Match`: the write applies only to the version the client read.
    fn precondition(&self, name: &str, if_match: Option<&str>) -> Result<(), ControlError> {
        let Some(wanted) = if_match else { return Ok(()) };
        let current = self.asset(name);
        let matches = match current {
            None => false,
            Some(_) if wanted.trim() == "*" => true,
            Some(a) => wanted.split(',').any(|t| t.trim() == writer::etag(a)),
        };
        if matches {
            Ok(())
        } else {
            Err(ControlError::Precondition(match current {
                None => format!("no asset {name:?} to match {wanted}"),
                Some(a) => format!("asset {name:?} changed since it was read: it is now {}", writer::etag(a)),
            }))
        }
    }

    /// What `edit` makes of asset `name` now: the new asset, or `None` to delete it.
    fn resolve(&self, name: &str, edit: &AssetEdit) -> Result<Option<AssetSpec>, ControlError> {
        let current = || self.asset(name).ok_or_else(|| ControlError::NotFound(format!("no asset {name:?}")));
        match edit {
            AssetEdit::Put(spec) => Ok(Some(spec.clone())),
            AssetEdit::Delete => current().map(|_| None),
            AssetEdit::Patch(patch) => {
                let mut v = serde_json::to_value(current()?).map_err(|e| body_error(e.to_string()))?;
                merge_patch(&mut v, patch);
                let serde_json::Value::Object(map) = &mut v else {
                    return Err(body_error("expected a JSON object".into()));
                };
                // The name comes from the path; a patch may repeat it, not change it.
                match map.get("name") {
                    Some(serde_json::Value::String(n)) if n != name => {
                        return Err(body_error(format!("name {n:?} differs from the path's {name:?}")));
                    }
                    Some(serde_json::Value::String(_)) | None => {}
                    Some(other) => return Err(body_error(format!("name: {other} is not a string"))),
                }
                map.insert("name".into(), serde_json::Value::String(name.into()));
                serde_json::from_value(v).map(Some).map_err(|e| body_error(e.to_string()))
            }
        }
    }

    fn apply_batch(&mut self, batch: Vec<Resolved>) {
        if batch.is_empty() {
            return;
        }
        let mut work = Vec::new();
        let mut recorded = Vec::new();
        for Resolved { write: w, spec, asset } in batch {
            let old = self.asset(&w.name).cloned();
            if old == spec {
                let _ = w.reply.send(Ok(spec));
                continue;
            }
            recorded.push((
                Change {
                    kind: Kind::Asset,
                    name: w.name.clone(),
                    old: old.as_ref().and_then(Spec::of),
                    new: spec.as_ref().and_then(Spec::of),
                },
                w.actor.clone(),
                w.action,
            ));
            work.push((w, spec, asset, old));
        }
        if work.is_empty() {
            return;
        }
        let apply: Vec<(String, Option<Asset>)> =
            work.iter_mut().map(|(w, _, a, _)| (w.name.clone(), a.take())).collect();
        let undo = || -> Vec<(Change, &Actor, &str)> {
            recorded.iter().rev().map(|(c, actor, _)| (c.inverse(), actor, UNDONE)).collect()
        };
        // Tag edits stay on this thread: a thread would cost more than their rows.
        let result = self.commit(
            telemetry::ApplyKind::Assets,
            false,
            |e| e.stage_assets(apply).map(Some),
            |s| s.commit_each(&recorded),
            |s| s.commit_each(&undo()),
        );
        if let Err(e) = result {
            let e = Arc::new(e);
            for (w, _, _, _) in work {
                let _ = w.reply.send(Err(ControlError::Batch(e.clone())));
            }
            return;
        }
        for (w, spec, _, _) in &work {
            // The document keeps its order (it is what users read back), so a removal shifts
            // positions; removals are rare next to tag edits.
            match (self.index.get(&w.name).copied(), spec) {
                (Some(i), Some(s)) => self.doc.assets[i] = s.clone(),
                (Some(i), None) => {
                    self.doc.assets.remove(i);
                    self.reindex();
                }
                (None, Some(s)) => {
                    self.index.insert(w.name.clone(), self.doc.assets.len());
                    self.doc.assets.push(s.clone());
                }
                (None, None) => {}
            }
        }
        self.publish();
        tracing::info!(assets = work.len(), "asset changes applied");
        let moved: Vec<(Option<&AssetSpec>, Option<&AssetSpec>)> =
            work.iter().map(|(_, spec, _, old)| (old.as_ref(), spec.as_ref())).collect();
        let affected = self.netskope_affected(&moved);
        self.netskope_mark(&affected, "change");
        for (w, spec, _, _) in work {
            let _ = w.reply.send(Ok(spec));
        }
    }

    /// Publishes the status (epoch, last apply, attachments, counts and map fill) for readers
    /// that must not wait for the control lock.
    pub fn publish(&mut self) {
        self.revision += 1;
        // A change may bring a rule whose expiry comes sooner.
        self.expiry.changed();
        let dp = self.enforcer.dataplane();
        let c = dp.applied();
        self.board.publish(StatusView {
            epoch: dp.epoch(),
            last_apply: self.last_apply,
            interfaces: dp.attachments(),
            objects: [self.doc.assets.len(), self.doc.segments.len(), self.doc.rules.len()],
            prefixes: c.counts,
            policy_entries: c.policy.len(),
            rules: c.rule_slots.len(),
            capacity: self.enforcer.capacity(),
            flows: None,
            flows_by_family: None,
        });
    }

    /// The newest `limit` audit rows.
    pub fn audit(&self, limit: usize) -> Result<Vec<store::AuditEntry>, ControlError> {
        Ok(self.store.audit(limit)?)
    }
}

/// An asset write with what it makes of the asset.
struct Resolved {
    write: AssetWrite,
    spec: Option<AssetSpec>,
    asset: Option<Asset>,
}

/// A request body that does not make an asset, said as the API says it.
fn body_error(error: String) -> ControlError {
    ControlError::Policy(PolicyError::Syntax { source_name: "body".into(), error })
}

/// One asset validated on its own (`source` names it in errors).
fn validate_asset(spec: &AssetSpec, source: &str) -> Result<Option<Asset>, ControlError> {
    Ok((PolicyDocument { assets: vec![spec.clone()], ..Default::default() }).validate(source)?.assets.pop())
}

/// A [`Handle`] that does not keep the control state alive.
pub struct WeakHandle {
    control: std::sync::Weak<Mutex<Control>>,
    board: std::sync::Weak<StatusBoard>,
    // Holding the set keeps no control state alive.
    credentials: auth::CredentialSet,
}

impl WeakHandle {
    pub fn upgrade(&self) -> Option<Handle> {
        let credentials = self.credentials.clone();
        Some(Handle { control: self.control.upgrade()?, board: self.board.upgrade()?, credentials })
    }
}

/// The shared control state: one lock for changes, a status board for cheap reads.
#[derive(Clone)]
pub struct Handle {
    control: Arc<Mutex<Control>>,
    board: Arc<StatusBoard>,
    credentials: auth::CredentialSet,
}

impl Handle {
    pub fn new(control: Control) -> Self {
        let board = control.board();
        let credentials = control.credentials.clone();
        Self { control: Arc::new(Mutex::new(control)), board, credentials }
    }

    /// The tokens requests are checked against, read without the control lock.
    pub fn credentials(&self) -> &auth::CredentialSet {
        &self.credentials
    }

    /// Runs `f` on the control state on a blocking thread, for async callers: taking the lock may
    /// wait for a change in progress, and a change may take seconds (compile, map writes, fsync).
    pub async fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Control) -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let handle = self.clone();
        tokio::task::spawn_blocking(move || f(&mut handle.lock())).await
    }

    /// The control state, once free. Blocks (a change may take seconds): call it on a thread of
    /// your own or in `spawn_blocking`, never on an async worker.
    pub fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|poisoned| {
            // A panic mid-change leaves the state as the last completed step left it: every step
            // keeps the store and the data plane consistent, so carry on rather than stop
            // serving, but say so (once).
            tracing::error!("a change panicked; carrying on from the state its last completed step left");
            self.control.clear_poison();
            poisoned.into_inner()
        })
    }

    /// A handle that does not keep the control state alive (threads that should end with it).
    pub fn downgrade(&self) -> WeakHandle {
        WeakHandle {
            control: Arc::downgrade(&self.control),
            board: Arc::downgrade(&self.board),
            credentials: self.credentials.clone(),
        }
    }

    /// The status as last published: never waits for a change in progress.
    pub fn status(&self) -> StatusView {
        self.board.get()
    }

    pub fn board(&self) -> &Arc<StatusBoard> {
        &self.board
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};
    use tokio::sync::oneshot;

    use super::*;
    use crate::compile::Timeouts;

    fn control(name: &str) -> Control {
        let dir = std::env::temp_dir().join(format!("gk-control-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir.join("state.db")).unwrap();
        Control::prepare(store, None, None, "test").unwrap().enforce(Enforcer::fake(Timeouts::default())).unwrap().0
    }

    type Reply = oneshot::Receiver<Result<Option<AssetSpec>, ControlError>>;

    fn write(name: &str, edit: AssetEdit) -> (AssetWrite, Reply) {
        let (reply, rx) = oneshot::channel();
        (AssetWrite { name: name.into(), edit, if_match: None, actor: "test".into(), action: "test", reply }, rx)
    }

    #[test]
    fn patches_in_one_batch_each_apply_to_the_latest_version() {
        let mut c = control("patches");
        let spec: AssetSpec = serde_json::from_value(json!({"name": "plc-1", "ips": ["10.0.0.1"]})).unwrap();
        let (put, put_rx) = write("plc-1", AssetEdit::Put(spec));
        let (a, a_rx) = write("plc-1", AssetEdit::Patch(json!({"tags": {"role": "plc"}})));
        let (b, b_rx) = write("plc-1", AssetEdit::Patch(json!({"tags": {"site": "a"}})));
        let (bad, bad_rx) = write("plc-1", AssetEdit::Patch(json!({"name": "other"})));
        let (gone, gone_rx) = write("nope", AssetEdit::Delete);
        c.change_assets(vec![put, a, b, bad, gone]);
        for rx in [put_rx, a_rx, b_rx] {
            assert!(rx.blocking_recv().unwrap().is_ok());
        }
        let tags = &c.asset("plc-1").unwrap().tags;
        assert_eq!(tags.len(), 2, "neither patch is lost: {tags:?}");
        let err = bad_rx.blocking_recv().unwrap().unwrap_err();
        assert!(err.to_string().contains("differs from the path's"), "{err}");
        assert!(matches!(gone_rx.blocking_recv().unwrap(), Err(ControlError::NotFound(_))));
        assert_eq!(c.store().load().unwrap().assets, c.doc().assets, "recorded as enforced");
        assert_eq!(c.board().get().objects, [1, 0, 0], "the status follows");
    }

    #[test]
    fn a_reload_that_would_open_the_network_is_refused() {
        let mut c = control("reload-guard");
        let doc: PolicyDocument = serde_json::from_value(json!({
            "assets": [{"name": "plc-1", "ips": ["10.0.0.1"], "tags": {"role": "plc"}},
                       {"name": "plc-2", "ips": ["10.0.0.2"], "tags": {"role": "plc"}}],
            "segments": [{"name": "plc", "selector": "role=plc"}, {"name": "wide", "cidrs": ["10.1.0.0/16"], "mode": "monitor"}],
        }))
        .unwrap();
        c.reload(doc.clone()).unwrap();
        // The enforce segment turned into a label: nothing would be dropped any more.
        let label: PolicyDocument =
            serde_json::from_value(json!({"segments": [{"name": "plc", "selector": "role=plc", "mode": "label"}]}))
                .unwrap();
        assert!(matches!(c.reload(label), Err(ControlError::Conflict(m)) if m.contains("no segment in enforce mode")));
        // One of three governed addresses (33%) leaving: more than the 10% allowed.
        let untag: PolicyDocument =
            serde_json::from_value(json!({"assets": [{"name": "plc-2", "ips": ["10.0.0.2"]}]})).unwrap();
        assert!(matches!(c.reload(untag.clone()), Err(ControlError::Conflict(m)) if m.contains("1 of 3")));
        assert_eq!(c.doc(), &doc, "refused reloads change nothing");
        c.set_apply_guard(0.5);
        c.reload(untag.clone()).unwrap();
        assert!(c.asset("plc-2").unwrap().tags.is_empty(), "within the configured share it applies");
    }

    #[test]
    fn a_policy_beyond_the_maps_is_refused_as_invalid_input() {
        let dir = std::env::temp_dir().join(format!("gk-control-{}-capacity", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir.join("state.db")).unwrap();
        let options = crate::dataplane::LoadOptions { host_entries: 8, ..Default::default() };
        let enforcer = Enforcer::new(
            Box::new(crate::dataplane::fake::FakeDataplane::new(&options)),
            Timeouts::default(),
            options.capacity(),
        );
        let mut c = Control::prepare(store, None, None, "test").unwrap().enforce(enforcer).unwrap().0;
        let mut doc = PolicyDocument::default();
        for i in 0..3 {
            doc.assets.push(
                serde_json::from_value(
                    json!({"name": format!("a{i}"), "ips": [format!("10.0.0.{i}")], "tags": {"r": "x"}}),
                )
                .unwrap(),
            );
        }
        doc.segments.push(serde_json::from_value(json!({"name": "s", "selector": "r=x"})).unwrap());
        let Err(ControlError::Invalid(problems)) = c.change(doc, &"test".into(), "apply", false) else {
            panic!("a policy beyond the maps' capacity must be refused as invalid")
        };
        assert_eq!(problems[0].field, "capacity");
        assert!(problems[0].reason.contains("IPv4 host") && problems[0].reason.contains("holds 2"), "{problems:?}");
        assert!(c.doc().assets.is_empty(), "nothing changed");
    }

    /// A control over the in-memory data plane with a handle that makes its writes fail.
    fn refusing(name: &str) -> (Control, Arc<std::sync::atomic::AtomicUsize>) {
        let dir = std::env::temp_dir().join(format!("gk-control-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir.join("state.db")).unwrap();
        let options = crate::dataplane::LoadOptions::default();
        let fake = crate::dataplane::fake::FakeDataplane::new(&options);
        let refuse = fake.refusals();
        let enforcer = Enforcer::new(Box::new(fake), Timeouts::default(), options.capacity());
        (Control::prepare(store, None, None, "test").unwrap().enforce(enforcer).unwrap().0, refuse)
    }

    #[test]
    fn a_change_the_data_plane_refuses_is_undone_in_the_store() {
        use std::sync::atomic::Ordering;
        let (mut c, refuse) = refusing("refused");
        let doc: PolicyDocument = serde_json::from_value(json!({
            "assets": [{"name": "plc-1", "ips": ["10.0.0.1"], "tags": {"role": "plc"}},
                       {"name": "hmi-1", "ips": ["10.0.0.2"], "tags": {"role": "hmi"}}],
            "segments": [{"name": "plc", "selector": "role=plc"}, {"name": "hmi", "selector": "role=hmi", "mode": "label"}],
        }))
        .unwrap();
        c.change(doc.clone(), &"test".into(), "apply", false).unwrap();
        let epoch = c.enforcer.dataplane().epoch();
        let audit = c.store().audit(1000).unwrap().len();

        // A rule (a full compile) and a tag edit (in place), each refused by the data plane.
        refuse.store(1, Ordering::SeqCst);
        let rule: RuleSpec =
            serde_json::from_value(json!({"name": "r", "from": "hmi", "to": "plc", "protocol": "tcp", "ports": [502]}))
                .unwrap();
        assert!(matches!(c.put_rule(&"test".into(), rule.clone()), Err(ControlError::Enforce(_))));
        refuse.store(1, Ordering::SeqCst);
        let (w, rx) = write("hmi-1", AssetEdit::Patch(json!({"tags": {"role": "plc"}})));
        c.change_assets(vec![w]);
        assert!(rx.blocking_recv().unwrap().is_err(), "the refused tag edit is answered with an error");

        assert_eq!(c.doc(), &doc, "the desired state is as before");
        assert_eq!(c.store().load().unwrap(), doc, "the store is as before");
        assert_eq!(c.enforcer.policy().assets.len(), 2);
        assert_eq!(c.asset("hmi-1").unwrap().tags, doc.assets[1].tags, "the refused tag is not kept");
        assert_eq!(c.enforcer.dataplane().epoch(), epoch, "nothing was written into the data plane");
        let rows = c.store().audit(1000).unwrap();
        let undone = rows.iter().filter(|r| r.action == UNDONE).count();
        assert_eq!(rows.len(), audit + 4, "each refused change is recorded and then undone: {rows:?}");
        assert_eq!(undone, 2, "{rows:?}");

        // The next writes apply (from a full compile: the compiler forgot what it staged).
        c.put_rule(&"test".into(), rule).unwrap();
        let (w, rx) = write("hmi-1", AssetEdit::Patch(json!({"tags": {"site": "a"}})));
        c.change_assets(vec![w]);
        rx.blocking_recv().unwrap().unwrap();
        assert_eq!(c.store().load().unwrap(), *c.doc());
        assert_eq!(c.doc().rules.len(), 1);
        assert!(c.enforcer.dataplane().epoch() > epoch);
    }

    /// `n` assets `a0..` with one tag each, in one segment.
    fn many(n: usize, tag: &str) -> PolicyDocument {
        let assets: Vec<Value> = (0..n)
            .map(|i| json!({"name": format!("a{i}"), "ips": [format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)], "tags": {"r": tag}}))
            .collect();
        serde_json::from_value(json!({"assets": assets, "segments": [{"name": "s", "selector": "r=x"}]})).unwrap()
    }

    #[test]
    fn a_large_change_records_while_it_compiles_and_commits_only_what_compiled() {
        let dir = std::env::temp_dir().join(format!("gk-control-{}-large", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir.join("state.db")).unwrap();
        // Four generations: 1.5 × LARGE_CHANGE hosts each.
        let options = crate::dataplane::LoadOptions { host_entries: (6 * LARGE_CHANGE) as u32, ..Default::default() };
        let fake = crate::dataplane::fake::FakeDataplane::new(&options);
        let refuse = fake.refusals();
        let enforcer = Enforcer::new(Box::new(fake), Timeouts::default(), options.capacity());
        let mut c = Control::prepare(store, None, None, "test").unwrap().enforce(enforcer).unwrap().0;

        // Large, and it fits: recorded on the second thread, committed, enforced.
        let fits = many(LARGE_CHANGE, "x");
        assert_eq!(c.change(fits.clone(), &"test".into(), "apply", false).unwrap().len(), LARGE_CHANGE + 1);
        assert_eq!(c.store().load().unwrap(), fits);
        assert_eq!(c.enforcer.policy().assets.len(), LARGE_CHANGE);
        let audit = c.store().audit(10 * LARGE_CHANGE).unwrap().len();

        // Large, and beyond the maps: its rows were written meanwhile, and rolled back.
        let beyond = many(2 * LARGE_CHANGE, "x");
        assert!(matches!(c.change(beyond, &"test".into(), "apply", false), Err(ControlError::Invalid(_))));
        assert_eq!(c.store().load().unwrap(), fits, "nothing of the refused change was committed");
        assert_eq!(c.store().audit(10 * LARGE_CHANGE).unwrap().len(), audit, "no audit row either");

        // Large, compiled and recorded, refused by the data plane: undone in the store.
        refuse.store(1, std::sync::atomic::Ordering::SeqCst);
        let retag = many(LARGE_CHANGE, "y");
        assert!(matches!(c.change(retag, &"test".into(), "apply", false), Err(ControlError::Enforce(_))));
        assert_eq!(c.store().load().unwrap(), fits, "undone");
        assert_eq!(c.doc(), &fits);

        // The store takes the next change as usual (no gate left behind).
        let small = many(LARGE_CHANGE, "x");
        let mut small = small;
        small.assets.truncate(LARGE_CHANGE - 1);
        c.change(small.clone(), &"test".into(), "apply", false).unwrap();
        assert_eq!(c.store().load().unwrap(), small);
    }
}
