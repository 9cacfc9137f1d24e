//! The `/metrics` edge: the Prometheus text exposition of the telemetry registry, with the
//! data-plane figures (outcome counters, epoch) and pending pushes read at scrape time.

use axum::{
    Router,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus::{Encoder, TextEncoder};

use crate::control::{
    Control, Handle,
    auth::{self, AuthError, CredentialSet, Tokens},
    telemetry,
};

/// The text exposition, with data-plane figures read now.
pub fn render(control: &Control) -> String {
    let Some(m) = telemetry::get() else { return String::new() };
    let dp = control.enforcer().dataplane();
    if let Ok(stats) = dp.stats() {
        m.packets.with_label_values(&["passed"]).set(stats.passed() as i64);
        m.packets.with_label_values(&["dropped"]).set(stats.dropped() as i64);
        m.packets.with_label_values(&["would_drop"]).set(stats.would_drop() as i64);
        m.packets.with_label_values(&["malformed"]).set(stats.malformed() as i64);
    }
    m.epoch.set(i64::from(dp.epoch()));
    if let Ok(p) = control.netskope_pending() {
        m.netskope_pending.set(p.len() as i64);
    }
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&m.registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
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
    match s.control.run_blocking(|c| render(c)).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
