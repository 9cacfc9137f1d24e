//! Telemetry: the process-wide Prometheus registry and the counters the control path and the
//! edges update. The `metrics` edge serves it at `/metrics`, adding data-plane figures read at
//! scrape time.
//!
//! One registry, so every layer above can count without threading a handle through.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Mutex, MutexGuard, OnceLock},
    time::Duration,
};

use gatekeeper_common::IdDrops;

use prometheus::{Gauge, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// What a commit applied: a policy (a whole document, or objects of it) or asset writes (tag
/// changes, the incremental path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyKind {
    Policy,
    Assets,
}

impl ApplyKind {
    fn label(self) -> &'static str {
        match self {
            Self::Policy => "policy",
            Self::Assets => "assets",
        }
    }
}

/// Apply durations: from a tenth of a millisecond (a tag change) to a minute (a very large
/// policy on a slow machine).
const APPLY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub struct Metrics {
    pub registry: Registry,
    netskope_syncs: IntCounterVec,
    netskope_last_success: Gauge,
    pub netskope_pending: IntGauge,
    netskope_pushes: IntCounterVec,
    netskope_responses: IntCounterVec,
    netskope_managed: IntGaugeVec,
    netskope_refused: IntGaugeVec,
    applies: IntCounterVec,
    last_apply_success: IntGauge,
    last_apply_timestamp: Gauge,
    apply_duration: HistogramVec,
    tag_change_enforced: Histogram,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let m = Metrics {
        netskope_syncs: IntCounterVec::new(
            Opts::new("gatekeeper_netskope_syncs_total", "Netskope syncs by result"),
            &["result"],
        )?,
        netskope_last_success: Gauge::new(
            "gatekeeper_netskope_last_successful_sync_timestamp_seconds",
            "Unix time of the last successful Netskope sync",
        )?,
        netskope_pending: IntGauge::new("gatekeeper_netskope_pending_pushes", "Private apps waiting for a push")?,
        netskope_pushes: IntCounterVec::new(
            Opts::new("gatekeeper_netskope_pushes_total", "Pushes to Netskope private apps by result"),
            &["result"],
        )?,
        netskope_responses: IntCounterVec::new(
            Opts::new("gatekeeper_netskope_api_responses_total", "Netskope API responses by HTTP status (0: none)"),
            &["code"],
        )?,
        netskope_managed: IntGaugeVec::new(
            Opts::new("gatekeeper_netskope_managed_hosts", "Hosts gatekeeper manages in each private app"),
            &["app_id", "app"],
        )?,
        netskope_refused: IntGaugeVec::new(
            Opts::new("gatekeeper_netskope_refused_hosts", "Hosts Netskope cannot take, by app and reason"),
            &["app_id", "reason"],
        )?,
        applies: IntCounterVec::new(
            Opts::new("gatekeeper_applies_total", "Changes committed to the store and the data plane, by result"),
            &["result"],
        )?,
        last_apply_success: IntGauge::new(
            "gatekeeper_last_apply_success",
            "1 if the last change committed was enforced, 0 if the store or the data plane refused it",
        )?,
        last_apply_timestamp: Gauge::new(
            "gatekeeper_last_apply_timestamp_seconds",
            "Unix time of the last change enforced",
        )?,
        apply_duration: HistogramVec::new(
            HistogramOpts::new(
                "gatekeeper_apply_duration_seconds",
                "Commit of a change (compile, store, data-plane write), by kind: policy or assets",
            )
            .buckets(APPLY_BUCKETS.to_vec()),
            &["kind"],
        )?,
        tag_change_enforced: Histogram::with_opts(
            HistogramOpts::new(
                "gatekeeper_tag_change_enforced_seconds",
                "From the start of an asset write's commit (tags, addresses) to packets seeing it",
            )
            .buckets(APPLY_BUCKETS.to_vec()),
        )?,
        registry,
    };
    m.registry.register(Box::new(m.netskope_syncs.clone()))?;
    m.registry.register(Box::new(m.netskope_last_success.clone()))?;
    m.registry.register(Box::new(m.netskope_pending.clone()))?;
    m.registry.register(Box::new(m.netskope_pushes.clone()))?;
    m.registry.register(Box::new(m.netskope_responses.clone()))?;
    m.registry.register(Box::new(m.netskope_managed.clone()))?;
    m.registry.register(Box::new(m.netskope_refused.clone()))?;
    m.registry.register(Box::new(m.applies.clone()))?;
    m.registry.register(Box::new(m.last_apply_success.clone()))?;
    m.registry.register(Box::new(m.last_apply_timestamp.clone()))?;
    m.registry.register(Box::new(m.apply_duration.clone()))?;
    m.registry.register(Box::new(m.tag_change_enforced.clone()))?;
    // Series that exist from the start, so dashboards and alerts have them before any event.
    for result in ["ok", "error"] {
        m.applies.with_label_values(&[result]);
        m.netskope_syncs.with_label_values(&[result]);
    }
    for kind in [ApplyKind::Policy, ApplyKind::Assets] {
        m.apply_duration.with_label_values(&[kind.label()]);
    }
    // CPU, memory, open fds and start time of this process (`process_*`, the usual names).
    m.registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
    Ok(m)
}

/// The process-wide metrics (`None` only if the fixed definitions above were refused).
pub fn get() -> Option<&'static Metrics> {
    static M: OnceLock<Option<Metrics>> = OnceLock::new();
    M.get_or_init(|| build().map_err(|e| tracing::error!(error = %e, "metrics unavailable")).ok()).as_ref()
}

/// A change was enforced: `took` for the whole commit, `enforced` until packets saw it.
pub fn applied(kind: ApplyKind, took: Duration, enforced: Duration) {
    if let Some(m) = get() {
        m.applies.with_label_values(&["ok"]).inc();
        m.last_apply_success.set(1);
        m.last_apply_timestamp.set(chrono::Utc::now().timestamp_micros() as f64 / 1e6);
        m.apply_duration.with_label_values(&[kind.label()]).observe(took.as_secs_f64());
        if kind == ApplyKind::Assets {
            m.tag_change_enforced.observe(enforced.as_secs_f64());
        }
    }
}

/// A change was refused by the store or the data plane after it validated.
pub fn apply_failed() {
    if let Some(m) = get() {
        m.applies.with_label_values(&["error"]).inc();
        m.last_apply_success.set(0);
    }
}

pub fn netskope_sync(ok: bool) {
    if let Some(m) = get() {
        m.netskope_syncs.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
        if ok {
            m.netskope_last_success.set(chrono::Utc::now().timestamp() as f64);
        }
    }
}

pub fn netskope_pending(n: usize) {
    if let Some(m) = get() {
        m.netskope_pending.set(n as i64);
    }
}

pub fn netskope_push(result: &str) {
    if let Some(m) = get() {
        m.netskope_pushes.with_label_values(&[result]).inc();
    }
}

pub fn netskope_response(code: u16) {
    if let Some(m) = get() {
        m.netskope_responses.with_label_values(&[&code.to_string()]).inc();
    }
}

/// Managed and refused hosts per app, from the integration's state.
pub fn netskope_apps(n: &super::netskope::Integration) {
    let Some(m) = get() else { return };
    m.netskope_managed.reset();
    m.netskope_refused.reset();
    for a in n.apps.values() {
        m.netskope_managed.with_label_values(&[&a.remote.id.to_string(), &a.remote.name]).set(a.managed.len() as i64);
        for r in &a.refused {
            m.netskope_refused.with_label_values(&[&a.remote.id.to_string(), r.reason.code()]).inc();
        }
    }
}

/// Policy drops per segment, added up across scrapes from the data plane's per-identity
/// counters (`GK_ID_DROPS`). Identity ids are never reused while the daemon runs, so a count
/// charged to an identity the policy has since dropped still goes to that identity's segments.
#[derive(Debug, Default)]
pub struct SegmentDrops {
    /// The last value read per identity.
    seen: HashMap<u32, IdDrops>,
    /// Each identity's segments, as long as the identity may still be counted.
    segments_of: HashMap<u32, Vec<String>>,
    totals: BTreeMap<String, IdDrops>,
}

impl SegmentDrops {
    /// Adds what each identity was charged with since the last call; returns the totals.
    /// An identity's value below the last one read means its LRU entry was evicted and
    /// recreated: all of it is new.
    pub fn update(
        &mut self,
        identities: &BTreeMap<u32, Vec<String>>,
        charged: &[(u32, IdDrops)],
    ) -> &BTreeMap<String, IdDrops> {
        for (id, segments) in identities {
            self.segments_of.insert(*id, segments.clone());
        }
        for segment in identities.values().flatten() {
            self.totals.entry(segment.clone()).or_default();
        }
        for &(id, now) in charged {
            let last = self.seen.insert(id, now).unwrap_or_default();
            let grew = |n: u64, l: u64| if n >= l { n - l } else { n };
            let delta =
                IdDrops { dropped: grew(now.dropped, last.dropped), would_drop: grew(now.would_drop, last.would_drop) };
            for segment in self.segments_of.get(&id).into_iter().flatten() {
                let t = self.totals.entry(segment.clone()).or_default();
                t.dropped += delta.dropped;
                t.would_drop += delta.would_drop;
            }
        }
        // Identities neither in the policy nor in the map any more can never be counted again.
        let live: HashSet<u32> = charged.iter().map(|(id, _)| *id).collect();
        self.segments_of.retain(|id, _| identities.contains_key(id) || live.contains(id));
        self.seen.retain(|id, _| live.contains(id));
        &self.totals
    }
}

/// The process-wide [`SegmentDrops`].
pub fn segment_drops() -> MutexGuard<'static, SegmentDrops> {
    static S: OnceLock<Mutex<SegmentDrops>> = OnceLock::new();
    S.get_or_init(Mutex::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(dropped: u64, would_drop: u64) -> IdDrops {
        IdDrops { dropped, would_drop }
    }

    #[test]
    fn segment_drops_add_up_across_reads_and_policy_changes() {
        let mut s = SegmentDrops::default();
        let ids: BTreeMap<u32, Vec<String>> =
            [(1, vec!["plc".to_string()]), (2, vec!["plc".to_string(), "hmi".to_string()])].into();
        let t = s.update(&ids, &[(1, d(3, 0)), (2, d(1, 2))]).clone();
        assert_eq!(t["plc"], d(4, 2));
        assert_eq!(t["hmi"], d(1, 2));
        // Only the growth counts.
        let t = s.update(&ids, &[(1, d(5, 0)), (2, d(1, 2))]).clone();
        assert_eq!(t["plc"], d(6, 2));
        // Identity 1 left the policy but was charged once more before it aged out.
        let ids2: BTreeMap<u32, Vec<String>> = [(3, vec!["hmi".to_string()])].into();
        let t = s.update(&ids2, &[(1, d(6, 0)), (2, d(1, 2)), (3, d(1, 0))]).clone();
        assert_eq!((t["plc"], t["hmi"]), (d(7, 2), d(2, 2)));
        // An evicted and recreated entry starts again from zero: all of its value is new.
        let t = s.update(&ids2, &[(3, d(1, 0))]).clone();
        assert_eq!(t["hmi"], d(2, 2), "same value as last read: nothing new");
        let t = s.update(&ids2, &[]).clone();
        let t2 = s.update(&ids2, &[(3, d(1, 0))]).clone();
        assert_eq!((t["hmi"], t2["hmi"]), (d(2, 2), d(3, 2)));
    }
}
