//! The thread that talks to Netskope: syncs (on start, every `sync_interval`, on request) and
//! pushes pending apps, coalesced, within moments of a membership change.
//!
//! Durability: a membership change marks the affected apps pending in the store; a pending mark
//! is cleared only by a push that covered it (a newer mark stays). A Netskope outage or a
//! restart only delays pushes: every start marks every acting app for a reconcile, and failed
//! pushes are retried with backoff for as long as it takes.
//!
//! HTTP runs without the control lock; the lock is taken briefly to read what to push and to
//! record the result, through the control path's Netskope methods.

pub mod client;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::mpsc,
    time::{Duration, Instant},
};

use backon::{BackoffBuilder, ExponentialBuilder};
use serde_json::json;

use self::client::{Client, ClientError};
use crate::control::{
    ControlError, Handle,
    auth::Actor,
    netskope::{self, AppRecord, AppState, Event, PushResult, Refused, SyncStatus, desired_hosts, plan},
    store::{AuditRow, StoreError},
    telemetry,
};

/// Pushes wait this long after a change so changes in a burst go out together.
const COALESCE: Duration = Duration::from_millis(250);
/// Longest wait between retries of failed pushes or syncs.
const MAX_RETRY: Duration = Duration::from_secs(300);
/// Waits after an app's failed pushes in a row: 1 s, 2 s, 4 s, ... up to [`MAX_RETRY`], for as
/// long as it takes.
const PUSH_RETRY: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_secs(1))
    .with_factor(2.0)
    .with_max_delay(MAX_RETRY)
    .without_max_times();
/// Waits after failed syncs in a row: 30 s, 1 min, 2 min, ... up to [`MAX_RETRY`] (and never
/// longer than the sync interval).
const SYNC_RETRY: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_secs(30))
    .with_factor(2.0)
    .with_max_delay(MAX_RETRY)
    .without_max_times();

/// The waits after failures in a row, one `next()` per failure.
type Backoff = <ExponentialBuilder as BackoffBuilder>::Backoff;

/// Starts the worker and connects it to the control state; pending pushes are picked up at once,
/// and every acting app is reconciled (whatever happened while no worker ran). It stops when
/// [`crate::control::Control::netskope_disconnect`] closes its channel.
pub fn spawn(control: Handle) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("gk-netskope".into()).spawn(move || {
        let (tx, rx) = mpsc::channel();
        control.lock().netskope_connect(tx);
        Worker::new(control).run(rx)
    })
}

struct Worker {
    control: Handle,
    client: Option<(String, Client)>,
    /// Per app: the wanted hosts of its last successful push, so a change that does not alter
    /// them costs no request.
    pushed: BTreeMap<u64, BTreeSet<String>>,
    /// Per app: the backoff through its failed pushes in a row, and when to try again.
    failures: BTreeMap<u64, Backoff>,
    not_before: BTreeMap<u64, Instant>,
    /// After a 429: no request before this.
    quiet_until: Option<Instant>,
    /// Set while syncs fail in a row.
    sync_failures: Option<Backoff>,
}

/// Why a sync or a push failed.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("the Netskope integration is not configured (tenant URL and token)")]
    NotConfigured,
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SyncError {
    /// How long Netskope asked us to wait.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Client(e) => e.retry_after(),
            _ => None,
        }
    }
}

impl Worker {
    fn new(control: Handle) -> Self {
        Self {
            control,
            client: None,
            pushed: BTreeMap::new(),
            failures: BTreeMap::new(),
            not_before: BTreeMap::new(),
            quiet_until: None,
            sync_failures: None,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Event>) {
        let now = Instant::now();
        let mut next_sync = now;
        let mut push_at = Some(now);
        loop {
            let deadline = push_at.map_or(next_sync, |p| p.min(next_sync));
            let event = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
            let now = Instant::now();
            match event {
                Ok(Event::Push) => push_at = Some(push_at.map_or(now + COALESCE, |p| p.min(now + COALESCE))),
                Ok(Event::Sync(reply)) => {
                    let r = self.sync();
                    next_sync = self.after_sync(&r);
                    push_at = Some(now);
                    if let Some(reply) = reply {
                        let _ = reply.send(r.map_err(|e| e.to_string()));
                    }
                    continue;
                }
                Ok(Event::Settings) => {
                    self.client = None;
                    self.pushed.clear();
                    next_sync = now;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if next_sync <= now {
                let r = self.sync();
                next_sync = self.after_sync(&r);
                push_at = Some(now);
            }
            if push_at.is_some_and(|p| p <= Instant::now()) {
                push_at = self.push_pending().map(|wait| Instant::now() + wait);
            }
        }
    }

    /// The client for the current settings (`None` while the integration is not configured).
    fn client(&mut self) -> Option<&Client> {
        let settings = self.control.lock().netskope().settings.clone().filter(|s| !s.token.is_empty())?;
        let key = format!("{}\u{0}{}", settings.tenant_url, settings.token);
        if self.client.as_ref().is_none_or(|(k, _)| *k != key) {
            if settings.tenant_url.starts_with("http://") {
                tracing::warn!(tenant = %settings.tenant_url, "Netskope tenant over plain http: the API token crosses the network unencrypted");
            }
            let observe = Box::new(telemetry::netskope_response);
            self.client = Some((key, Client::new(&settings.tenant_url, &settings.token, observe)));
        }
        self.client.as_ref().map(|(_, c)| c)
    }

    fn sync_interval(&self) -> Duration {
        let secs = self
            .control
            .lock()
            .netskope()
            .settings
            .as_ref()
            .map_or(netskope::DEFAULT_SYNC_SECS, |s| s.sync_interval_secs);
        Duration::from_secs(secs)
    }

    fn after_sync(&mut self, r: &Result<SyncStatus, SyncError>) -> Instant {
        let interval = self.sync_interval();
        match r {
            Ok(_) => {
                self.sync_failures = None;
                Instant::now() + interval
            }
            Err(_) => {
                let retry = self.sync_failures.get_or_insert_with(|| SYNC_RETRY.build()).next();
                Instant::now() + retry.unwrap_or(MAX_RETRY).min(interval)
            }
        }
    }

    /// Imports apps and publishers; new apps are inactive, apps gone from Netskope are marked
    /// gone (their mappings stop), publishers' addresses refresh the publishers' segment. Every
    /// acting app is then marked for a reconcile (drift made by hand is corrected).
    fn sync(&mut self) -> Result<SyncStatus, SyncError> {
        let Some(client) = self.client() else { return Err(SyncError::NotConfigured) };
        let fetched = client.list_apps().and_then(|apps| client.list_publishers().map(|p| (apps, p)));
        let at = chrono::Utc::now().to_rfc3339();
        let mut control = self.control.lock();
        let ((remote, complete), publishers) = match fetched {
            Ok(x) => x,
            Err(e) => {
                let apps = control.netskope().apps.len();
                let status = SyncStatus { at, ok: false, message: e.to_string(), apps, publishers: 0 };
                telemetry::netskope_sync(false);
                tracing::warn!(error = %e, "Netskope sync failed; retrying later");
                control.netskope_sync_failed(status);
                return Err(e.into());
            }
        };
        let seen: BTreeSet<u64> = remote.iter().map(|a| a.id).collect();
        if !complete {
            // Netskope said there are more apps than it sent: absent is not deleted.
            tracing::warn!(listed = remote.len(), "the Netskope app listing is incomplete; no app is marked gone");
        }
        let gone = |id: &u64| complete && !seen.contains(id);
        let mut audit = Vec::new();
        let (apps_n, pubs_n) = (remote.len(), publishers.len());
        for r in &remote {
            if !control.netskope().apps.contains_key(&r.id) {
                audit.push(row("import app", r.id, None, Some(json!({"name": r.name, "hosts": r.hosts}))));
            }
        }
        for (id, a) in &control.netskope().apps {
            if a.state == AppState::Present && gone(id) {
                audit.push(row("app gone", *id, Some(json!({"name": a.remote.name})), None));
            }
        }
        let edit = |n: &mut netskope::Integration| {
            for r in remote {
                match n.apps.get_mut(&r.id) {
                    Some(rec) => {
                        rec.remote = r;
                        rec.state = AppState::Present;
                    }
                    None => {
                        n.apps.insert(
                            r.id,
                            AppRecord {
                                remote: r,
                                state: AppState::Present,
                                segments: vec![],
                                active: false,
                                managed: BTreeSet::new(),
                                refused: vec![],
                                last_push: None,
                            },
                        );
                    }
                }
            }
            // A gone app keeps what gatekeeper added: should it come back, those hosts are
            // still gatekeeper's to remove.
            for (id, rec) in n.apps.iter_mut() {
                if gone(id) {
                    rec.state = AppState::Gone;
                }
            }
            n.publishers = publishers;
        };
        if let Err(e) = control.netskope_edit(&Actor::named("netskope"), "sync", edit, Some("sync"), audit) {
            let status = SyncStatus { at, ok: false, message: e.to_string(), apps: apps_n, publishers: pubs_n };
            telemetry::netskope_sync(false);
            control.netskope_sync_failed(status);
            return Err(e.into());
        }
        let status = SyncStatus { at, ok: true, message: "ok".into(), apps: apps_n, publishers: pubs_n };
        control.netskope_sync_done(status.clone());
        telemetry::netskope_sync(true);
        tracing::info!(apps = apps_n, publishers = pubs_n, "Netskope sync done");
        Ok(status)
    }

    /// Pushes every pending app that is not waiting out a failure. Returns when to try again
    /// (`None`: nothing left). One app Netskope refuses does not hold up the others; a 429
    /// holds up all of them for as long as Netskope asked.
    fn push_pending(&mut self) -> Option<Duration> {
        let now = Instant::now();
        if let Some(t) = self.quiet_until.filter(|t| *t > now) {
            return Some(t - now);
        }
        let work = {
            let control = self.control.lock();
            let pending = match control.netskope_pending() {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "reading pending Netskope pushes failed");
                    return Some(Duration::from_secs(5));
                }
            };
            telemetry::netskope_pending(pending.len());
            if pending.is_empty() {
                return None;
            }
            // Pending pushes are kept until the integration is configured.
            control.netskope().settings.as_ref()?;
            let pubs = control.netskope().publisher_ips();
            let policy = control.enforcer().policy();
            pending
                .into_iter()
                .filter(|(id, _, _)| self.not_before.get(id).is_none_or(|t| *t <= now))
                .map(|(id, seq, reason)| {
                    let rec = control.netskope().apps.get(&id).cloned();
                    let want = rec.as_ref().filter(|r| r.acting()).map(|r| desired_hosts(policy, &r.segments, &pubs));
                    (id, seq, reason, rec, want)
                })
                .collect::<Vec<_>>()
        };
        for (id, seq, reason, rec, want) in work {
            match self.push(id, seq, &reason, rec, want) {
                Ok(()) => {
                    self.failures.remove(&id);
                    self.not_before.remove(&id);
                }
                Err(e) => {
                    // Netskope may hold something else than our last success now: read it next time.
                    self.pushed.remove(&id);
                    let backoff = self.failures.entry(id).or_insert_with(|| PUSH_RETRY.build()).next();
                    let wait = backoff.unwrap_or(MAX_RETRY).max(e.retry_after().unwrap_or_default());
                    tracing::warn!(app_id = id, error = %e, retry_in_ms = wait.as_millis() as u64, "Netskope push failed; it stays pending");
                    self.not_before.insert(id, Instant::now() + wait);
                    if e.retry_after().is_some() {
                        // Rate limited: every request waits, not only this app's.
                        self.quiet_until = Some(Instant::now() + wait);
                        break;
                    }
                }
            }
        }
        // Marks made while we pushed are picked up at once; apps in backoff when theirs ends.
        let pending = self.control.lock().netskope_pending().unwrap_or_default();
        telemetry::netskope_pending(pending.len());
        if pending.is_empty() {
            return None;
        }
        let now = Instant::now();
        let quiet = self.quiet_until.map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        let soonest = pending
            .iter()
            .map(|(id, _, _)| self.not_before.get(id).map_or(Duration::ZERO, |t| t.saturating_duration_since(now)))
            .min()
            .unwrap_or_default();
        Some(soonest.max(quiet))
    }

    fn push(
        &mut self,
        id: u64,
        seq: i64,
        reason: &str,
        rec: Option<AppRecord>,
        want: Option<(BTreeSet<String>, Vec<Refused>)>,
    ) -> Result<(), SyncError> {
        let clear = |worker: &Self, records: Vec<AppRecord>, audit: Vec<AuditRow>| -> Result<(), SyncError> {
            Ok(worker.control.lock().netskope_pushed(id, seq, records, audit)?)
        };
        let Some(mut rec) = rec.filter(|r| r.state == AppState::Present) else {
            return clear(self, vec![], vec![]);
        };
        let (want, refused) = want.unwrap_or_default();
        if !rec.acting() && rec.managed.is_empty() {
            return clear(self, vec![], vec![]);
        }
        if reason == "change" && rec.acting() && self.pushed.get(&id) == Some(&want) {
            telemetry::netskope_push("unchanged");
            return clear(self, vec![], vec![]);
        }
        let shared = self.control.clone();
        let Some(client) = self.client() else { return Err(SyncError::NotConfigured) };
        let remote = match client.get_app(id) {
            Ok(Some(r)) => r,
            Ok(None) => {
                // Deleted in Netskope since the last sync: the mapping stops. What gatekeeper
                // added stays recorded, should the app come back.
                rec.state = AppState::Gone;
                let audit = vec![row("app gone", id, Some(json!({"name": rec.remote.name})), None)];
                clear(self, vec![rec], audit)?;
                // Its generated rules go too.
                return Ok(self.control.lock().netskope_edit(
                    &Actor::named("netskope"),
                    "app gone",
                    |_| {},
                    None,
                    vec![],
                )?);
            }
            Err(e) => {
                telemetry::netskope_push("error");
                self.record_failure(id, &e.to_string());
                return Err(e.into());
            }
        };
        let p = plan(&remote.hosts, &rec.managed, &want, refused);
        let at = chrono::Utc::now().to_rfc3339();
        if p.changes(&remote.hosts) {
            // Recorded before the PATCH: if Netskope applies it but the answer is lost, the hosts
            // we added are still known to be ours (and so removable) on the next attempt.
            let intent: BTreeSet<String> = rec.managed.union(&p.managed).cloned().collect();
            if intent != rec.managed {
                shared.lock().netskope_save_managed(id, &intent)?;
            }
            if let Err(e) = client.set_hosts(id, &p.hosts) {
                telemetry::netskope_push("error");
                self.record_failure(id, &e.to_string());
                return Err(e.into());
            }
        }
        let mut audit = Vec::new();
        if !p.added.is_empty() || !p.removed.is_empty() {
            audit.push(row(
                "push",
                id,
                Some(json!({"hosts": remote.hosts})),
                Some(json!({"hosts": p.hosts, "added": p.added, "removed": p.removed})),
            ));
        }
        if !p.restored.is_empty() {
            tracing::warn!(app_id = id, hosts = ?p.restored, "managed hosts removed by hand in Netskope were put back");
            audit.push(row("drift corrected", id, None, Some(json!({"restored": p.restored}))));
        }
        for r in &p.refused {
            tracing::warn!(app_id = id, host = %r.host, reason = %r.reason, "Netskope cannot take this host");
        }
        let outcome = if p.changes(&remote.hosts) { "ok" } else { "unchanged" };
        telemetry::netskope_push(outcome);
        // Only the hosts: the app's protocols reach the generated rules through a sync.
        rec.remote.hosts = p.hosts.clone();
        rec.managed = p.managed;
        rec.refused = p.refused;
        rec.last_push = Some(PushResult { at, ok: true, message: outcome.into() });
        tracing::info!(app_id = id, added = p.added.len(), removed = p.removed.len(), "Netskope app in step");
        self.pushed.insert(id, want);
        clear(self, vec![rec], audit)
    }

    fn record_failure(&self, id: u64, message: &str) {
        let result = PushResult { at: chrono::Utc::now().to_rfc3339(), ok: false, message: message.into() };
        self.control.lock().netskope_push_failed(id, result);
    }
}

fn row(action: &str, id: u64, old: Option<serde_json::Value>, new: Option<serde_json::Value>) -> AuditRow {
    AuditRow {
        actor: "netskope".into(),
        action: action.into(),
        kind: Some("netskope-app".into()),
        name: Some(id.to_string()),
        old,
        new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_the_cap_and_go_on() {
        let secs = |b: ExponentialBuilder, n| b.build().take(n).map(|d| d.as_secs()).collect::<Vec<_>>();
        assert_eq!(secs(PUSH_RETRY, 12), [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(secs(SYNC_RETRY, 7), [30, 60, 120, 240, 300, 300, 300]);
        // Without an end: a push stays pending and is retried for as long as it takes.
        assert_eq!(PUSH_RETRY.build().nth(10_000), Some(MAX_RETRY));
    }
}
