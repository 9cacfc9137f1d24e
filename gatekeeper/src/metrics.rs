//! The `/metrics` edge: the Prometheus text exposition of the telemetry registry, with the
//! data-plane figures (packets per interface and verdict, rule hits, segment drops, map fill,
//! attachments) and the policy's figures read at scrape time. Served behind the API's tokens on
//! the API listener, and without a token on the metrics listener (`[metrics] listen`).

use axum::{
    Router,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use std::{collections::HashMap, sync::Mutex};

use gatekeeper_common::{
    Counter, EVENT_FLOW_INSERT_FAILED, EVENT_FLOW_REVOKED, LOOPBACK_IFINDEX, OUTCOME_DROP_DEFAULT,
    OUTCOME_DROP_DENY_RULE, OUTCOME_DROP_MALFORMED, OUTCOME_MONITOR_DEFAULT, OUTCOME_MONITOR_DENY_RULE,
    OUTCOME_MONITOR_MALFORMED, OUTCOME_PASS_ALLOWED, OUTCOME_PASS_FLOW, OUTCOME_PASS_MALFORMED, OUTCOME_PASS_NEIGHBOR,
    OUTCOME_PASS_NON_IP, OUTCOME_PASS_UNGOVERNED, STATS_IFINDEX_LIMIT,
};
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, TextEncoder, core::Collector, proto::MetricFamily,
};

use crate::{
    control::{
        Control, Handle,
        auth::{self, AuthError, CredentialSet, Tokens},
        telemetry,
    },
    dataplane::{DataplaneError, ifindex},
    policy::membership::segments_by_asset,
};

/// The text exposition, with data-plane figures read now.
pub fn render(control: &Control) -> String {
    let Some(m) = telemetry::get() else { return String::new() };
    if let Ok(p) = control.netskope_pending() {
        m.netskope_pending.set(p.len() as i64);
    }
    let mut families = m.registry.gather();
    match dataplane_families(control) {
        Ok(more) => families.extend(more),
        // The rest is still worth serving; the log says why these are missing.
        Err(e) => tracing::warn!(error = %e, "reading the data plane's counters for /metrics failed"),
    }
    // The encoder refuses a family without samples (say, flow entries before the first sample),
    // and would stop there: leave those out, as the registry's own gather does.
    families.retain(|f| !f.get_metric().is_empty());
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!(error = %e, "encoding /metrics failed; the document is cut short");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// `verdict` and `reason` labels of each `OUTCOME_*` counter. Malformed packets keep the verdict
/// they got (dropped, would be dropped, passed), so `verdict="drop"` sums every dropped packet.
const OUTCOME_LABELS: [(u32, &str, &str); 12] = [
    (OUTCOME_PASS_NON_IP, "pass", "non_ip"),
    (OUTCOME_PASS_NEIGHBOR, "pass", "neighbor"),
    (OUTCOME_PASS_UNGOVERNED, "pass", "ungoverned"),
    (OUTCOME_PASS_FLOW, "pass", "flow"),
    (OUTCOME_PASS_ALLOWED, "pass", "allowed"),
    (OUTCOME_DROP_DENY_RULE, "drop", "deny_rule"),
    (OUTCOME_DROP_DEFAULT, "drop", "default_deny"),
    (OUTCOME_MONITOR_DENY_RULE, "would_drop", "deny_rule"),
    (OUTCOME_MONITOR_DEFAULT, "would_drop", "default_deny"),
    (OUTCOME_DROP_MALFORMED, "drop", "malformed"),
    (OUTCOME_MONITOR_MALFORMED, "would_drop", "malformed"),
    (OUTCOME_PASS_MALFORMED, "pass", "malformed"),
];

/// Members per segment, recomputed only when the policy changed (it walks every asset).
static MEMBERS: Mutex<Option<(u64, Vec<(String, usize)>)>> = Mutex::new(None);

fn members(control: &Control) -> Vec<(String, usize)> {
    let mut cache = MEMBERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((revision, members)) = cache.as_ref()
        && *revision == control.revision()
    {
        return members.clone();
    }
    let policy = control.enforcer().policy();
    let mut counts = vec![0usize; policy.segments.len()];
    for segments in segments_by_asset(policy) {
        for s in segments {
            counts[s] += 1;
        }
    }
    let members: Vec<(String, usize)> = policy.segments.iter().map(|s| s.name.clone()).zip(counts).collect();
    *cache = Some((control.revision(), members.clone()));
    members
}

/// The families read from the data plane and the policy now: packets and bytes per interface,
/// verdict and reason; rule hits; segment drops; flow and map fill; attachments; object counts.
fn dataplane_families(control: &Control) -> Result<Vec<MetricFamily>, MetricsError> {
    let dp = control.enforcer().dataplane();
    let status = control.board().get();
    // Blocks to read: attached interfaces by name, then the shared block of large ifindexes and
    // the loopback block (test runs), which are shown only when they counted something.
    let mut blocks: Vec<(String, u32)> = Vec::new();
    for (name, _) in dp.attachments() {
        match ifindex(&name) {
            Some(i) if i < STATS_IFINDEX_LIMIT => blocks.push((name, i)),
            _ => {}
        }
    }
    let optional: Vec<(String, u32)> = [("other", 0), ("lo", LOOPBACK_IFINDEX)]
        .iter()
        .filter(|(_, i)| !blocks.iter().any(|b| b.1 == *i))
        .map(|(n, i)| (n.to_string(), *i))
        .collect();
    let ifindexes: Vec<u32> = blocks.iter().chain(&optional).map(|b| b.1).collect();
    let snapshot = dp.counters(&ifindexes)?;

    let packets = IntCounterVec::new(
        Opts::new(
            "gatekeeper_packets_total",
            "Packets the XDP program judged, by ingress interface, verdict and reason",
        ),
        &["interface", "verdict", "reason"],
    )?;
    let bytes = IntCounterVec::new(
        Opts::new(
            "gatekeeper_bytes_total",
            "Bytes of the packets the XDP program judged (whole frames), by ingress interface, verdict and reason",
        ),
        &["interface", "verdict", "reason"],
    )?;
    let (mut revoked, mut insert_failed) = (0u64, 0u64);
    for (i, (ifindex, counters)) in snapshot.interfaces.iter().enumerate() {
        let name = blocks.iter().chain(&optional).find(|b| b.1 == *ifindex).map_or("other", |b| b.0.as_str());
        let shown = i < blocks.len() || counters.iter().any(|c| c.packets > 0);
        if shown {
            for &(outcome, verdict, reason) in &OUTCOME_LABELS {
                let c = counters.get(outcome as usize).copied().unwrap_or_default();
                packets.with_label_values(&[name, verdict, reason]).inc_by(c.packets);
                bytes.with_label_values(&[name, verdict, reason]).inc_by(c.bytes);
            }
        }
        revoked += counters.get(EVENT_FLOW_REVOKED as usize).map_or(0, |c| c.packets);
        insert_failed += counters.get(EVENT_FLOW_INSERT_FAILED as usize).map_or(0, |c| c.packets);
    }
    let revocations = IntCounter::new(
        "gatekeeper_flow_revocations_total",
        "Established flows cut because a new policy no longer allows them",
    )?;
    revocations.inc_by(revoked);
    let insert_failures = IntCounter::new(
        "gatekeeper_flow_insert_failures_total",
        "Allowed flows the flow table could not record (their packets are judged one by one)",
    )?;
    insert_failures.inc_by(insert_failed);

    let applied = dp.applied();
    let rule_hits = IntCounterVec::new(
        Opts::new(
            "gatekeeper_rule_hits_total",
            "Packets each rule decided (flow starts it allowed or denied), generated rules included",
        ),
        &["rule"],
    )?;
    let rule_bytes = IntCounterVec::new(
        Opts::new("gatekeeper_rule_bytes_total", "Bytes of the packets each rule decided"),
        &["rule"],
    )?;
    let by_slot: HashMap<u32, Counter> = snapshot.rules.iter().copied().collect();
    for (rule, slot) in &applied.rule_slots {
        let c = by_slot.get(slot).copied().unwrap_or_default();
        rule_hits.with_label_values(&[rule]).inc_by(c.packets);
        rule_bytes.with_label_values(&[rule]).inc_by(c.bytes);
    }

    let segment_drops = IntCounterVec::new(
        Opts::new(
            "gatekeeper_segment_drops_total",
            "Packets the policy dropped (verdict drop) or would drop (would_drop, monitor mode), by segment of the \
             destination when it is governed, else of the source",
        ),
        &["segment", "verdict"],
    )?;
    for (segment, d) in telemetry::segment_drops().update(&applied.identities, &snapshot.id_drops) {
        segment_drops.with_label_values(&[segment, "drop"]).inc_by(d.dropped);
        segment_drops.with_label_values(&[segment, "would_drop"]).inc_by(d.would_drop);
    }

    let flow_entries = IntGaugeVec::new(
        Opts::new("gatekeeper_flow_entries", "Entries in the flow table of each family (sampled every few seconds)"),
        &["family"],
    )?;
    let flow_capacity =
        IntGaugeVec::new(Opts::new("gatekeeper_flow_capacity", "Size of the flow table of each family"), &["family"])?;
    if let Some([v4, v6]) = status.flows_by_family {
        flow_entries.with_label_values(&["ipv4"]).set(v4 as i64);
        flow_entries.with_label_values(&["ipv6"]).set(v6 as i64);
    }
    flow_capacity.with_label_values(&["ipv4"]).set(i64::from(snapshot.flow_capacity[0]));
    flow_capacity.with_label_values(&["ipv6"]).set(i64::from(snapshot.flow_capacity[1]));

    let map_entries = IntGaugeVec::new(
        Opts::new(
            "gatekeeper_map_entries",
            "Entries the policy in force uses in each bounded map (one generation's share)",
        ),
        &["map"],
    )?;
    let map_capacity = IntGaugeVec::new(
        Opts::new(
            "gatekeeper_map_capacity",
            "What one policy generation may hold in each bounded map; an apply beyond it is refused",
        ),
        &["map"],
    )?;
    let cap = &status.capacity;
    let c = applied.counts;
    for (map, entries, capacity) in [
        ("hosts_v4", c[0], cap.hosts_v4),
        ("prefixes_v4", c[1], cap.prefixes_v4),
        ("hosts_v6", c[2], cap.hosts_v6),
        ("prefixes_v6", c[3], cap.prefixes_v6),
        ("policy", applied.policy.len(), cap.policy),
        ("rule_slots", applied.rule_slots.len(), cap.rules),
        ("flows_v4", status.flows_by_family.map_or(0, |f| f[0]), snapshot.flow_capacity[0] as usize),
        ("flows_v6", status.flows_by_family.map_or(0, |f| f[1]), snapshot.flow_capacity[1] as usize),
    ] {
        map_entries.with_label_values(&[map]).set(entries as i64);
        map_capacity.with_label_values(&[map]).set(capacity as i64);
    }

    let epoch =
        IntGauge::new("gatekeeper_policy_epoch", "Policy epoch in force (moves when an apply writes the maps)")?;
    epoch.set(i64::from(dp.epoch()));
    let attached = IntGaugeVec::new(
        Opts::new(
            "gatekeeper_xdp_attached",
            "1 for each interface the XDP program is attached to, with its attach mode",
        ),
        &["interface", "mode"],
    )?;
    for (name, mode) in dp.attachments() {
        attached.with_label_values(&[&name, mode]).set(1);
    }
    let [assets, segments, rules] = status.objects;
    let objects = [
        ("gatekeeper_assets", "Assets in the policy", assets),
        ("gatekeeper_segments", "Segments in the policy", segments),
        ("gatekeeper_rules", "Rules in the policy", rules),
    ];
    let members_gauge =
        IntGaugeVec::new(Opts::new("gatekeeper_segment_members", "Assets in each segment"), &["segment"])?;
    for (segment, n) in members(control) {
        members_gauge.with_label_values(&[&segment]).set(n as i64);
    }
    let build = IntGaugeVec::new(
        Opts::new("gatekeeper_build_info", "1, labelled with the version and git revision of the daemon"),
        &["version", "revision"],
    )?;
    build.with_label_values(&[env!("CARGO_PKG_VERSION"), env!("GK_GIT_REV")]).set(1);

    let mut out = Vec::new();
    out.extend(packets.collect());
    out.extend(bytes.collect());
    out.extend(revocations.collect());
    out.extend(insert_failures.collect());
    out.extend(rule_hits.collect());
    out.extend(rule_bytes.collect());
    out.extend(segment_drops.collect());
    out.extend(flow_entries.collect());
    out.extend(flow_capacity.collect());
    out.extend(map_entries.collect());
    out.extend(map_capacity.collect());
    out.extend(epoch.collect());
    out.extend(attached.collect());
    for (name, help, n) in objects {
        let g = IntGauge::new(name, help)?;
        g.set(n as i64);
        out.extend(g.collect());
    }
    out.extend(members_gauge.collect());
    out.extend(build.collect());
    Ok(out)
}

#[derive(Debug, thiserror::Error)]
enum MetricsError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("building a metric: {0}")]
    Prometheus(#[from] prometheus::Error),
}

/// `GET /metrics` on the metrics listener (`[metrics] listen`): no token, as Prometheus scrapes
/// it; it holds counters and names, no secrets. Bind it to the management network.
pub fn open_router(control: Handle) -> Router {
    Router::new().route("/metrics", get(open_metrics)).with_state(control)
}

async fn open_metrics(State(control): State<Handle>) -> Response {
    exposition(&control).await
}

async fn exposition(control: &Handle) -> Response {
    match control.run_blocking(|c| render(c)).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `GET /metrics` behind the same bearer tokens as the API (a reader's token is enough).
pub fn router(control: Handle, tokens: &Tokens) -> Router {
    let credentials = control.credentials().clone();
    credentials.set_files(tokens);
    let state = MetricsState { control, credentials };
    Router::new()
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

#[derive(Clone)]
struct MetricsState {
    control: Handle,
    credentials: CredentialSet,
}

/// A refused scrape is a plain status and reason: the daemon's HTTP surface turns every error
/// into `application/problem+json`.
async fn auth(State(state): State<MetricsState>, req: Request, next: Next) -> Response {
    let bearer = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match state.credentials.actor(bearer, auth::is_read_only(req.method().as_str())) {
        Ok(_) => next.run(req).await,
        Err(e) => {
            let status = match e {
                AuthError::Unauthorized => StatusCode::UNAUTHORIZED,
                AuthError::Forbidden => StatusCode::FORBIDDEN,
            };
            (status, e.to_string()).into_response()
        }
    }
}

/// The OpenAPI description of `/metrics`, for the daemon's document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    #[derive(utoipa::OpenApi)]
    #[openapi(paths(metrics))]
    struct Doc;
    <Doc as utoipa::OpenApi>::openapi()
}

/// The Prometheus text exposition of gatekeeper's counters and gauges (a reader's token is
/// enough).
#[utoipa::path(
    get, path = "/metrics", operation_id = "getMetrics", tag = "metrics",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain; version=0.0.4", body = String),
        (status = 401, description = "No valid bearer token", content_type = "application/problem+json", body = Object),
        (status = 500, description = "The counters could not be read", content_type = "application/problem+json", body = Object),
    )
)]
async fn metrics(State(s): State<MetricsState>) -> Response {
    exposition(&s.control).await
}
