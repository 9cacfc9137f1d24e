//! Telemetry: the process-wide Prometheus registry and the counters the control path and the
//! edges update. The `metrics` edge serves it at `/metrics`, adding data-plane figures read at
//! scrape time.
//!
//! One registry, so every layer above can count without threading a handle through.

use std::sync::OnceLock;

use prometheus::{Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub struct Metrics {
    pub registry: Registry,
    netskope_syncs: IntCounterVec,
    netskope_last_success: Gauge,
    pub netskope_pending: IntGauge,
    netskope_pushes: IntCounterVec,
    netskope_responses: IntCounterVec,
    netskope_managed: IntGaugeVec,
    netskope_refused: IntGaugeVec,
    pub packets: IntGaugeVec,
    pub epoch: IntGauge,
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
        packets: IntGaugeVec::new(
            Opts::new("gatekeeper_packets", "Packets judged by the data plane since the maps were created, by outcome"),
            &["outcome"],
        )?,
        epoch: IntGauge::new("gatekeeper_policy_epoch", "Policy epoch in force (moves when an apply writes the maps)")?,
        registry,
    };
    m.registry.register(Box::new(m.netskope_syncs.clone()))?;
    m.registry.register(Box::new(m.netskope_last_success.clone()))?;
    m.registry.register(Box::new(m.netskope_pending.clone()))?;
    m.registry.register(Box::new(m.netskope_pushes.clone()))?;
    m.registry.register(Box::new(m.netskope_responses.clone()))?;
    m.registry.register(Box::new(m.netskope_managed.clone()))?;
    m.registry.register(Box::new(m.netskope_refused.clone()))?;
    m.registry.register(Box::new(m.packets.clone()))?;
    m.registry.register(Box::new(m.epoch.clone()))?;
    Ok(m)
}

/// The process-wide metrics (`None` only if the fixed definitions above were refused).
pub fn get() -> Option<&'static Metrics> {
    static M: OnceLock<Option<Metrics>> = OnceLock::new();
    M.get_or_init(|| build().map_err(|e| tracing::error!(error = %e, "metrics unavailable")).ok()).as_ref()
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
