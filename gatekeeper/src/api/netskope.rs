//! `/api/v1/integrations/netskope`: settings (the token is write-only), sync, apps and their
//! mappings, suggestions.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::HeaderMap,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiState, actor, body_json};
use crate::control::{
    Control,
    netskope::{self, AppRecord},
};

/// The integration as `GET /integrations/netskope` shows it (never the token).
fn status_json(c: &Control) -> Value {
    let n = c.netskope();
    let managed: usize = n.apps.values().map(|a| a.managed.len()).sum();
    let refused: Vec<_> = n
        .apps
        .values()
        .flat_map(|a| a.refused.iter().map(move |r| json!({"app_id": a.remote.id, "host": r.host, "reason": r.reason})))
        .collect();
    json!({
        "configured": n.settings.is_some(),
        "tenant_url": n.settings.as_ref().map(|s| s.tenant_url.clone()),
        "token_set": n.settings.as_ref().is_some_and(|s| !s.token.is_empty()),
        "sync_interval": n.settings.as_ref().map(|s| format!("{}s", s.sync_interval_secs)),
        "last_sync": n.last_sync,
        "last_successful_sync": n.last_success,
        "apps": n.apps.len(),
        "active_apps": n.acting().len(),
        "publishers": n.publishers,
        "managed_hosts": managed,
        "refused_hosts": refused,
        "pending_pushes": c.netskope_pending().map(|p| p.len()).unwrap_or_default(),
        "problems": n.problems.iter().map(|(id, p)| json!({"app_id": id, "reason": p})).collect::<Vec<_>>(),
    })
}

pub async fn get_integration(State(s): State<ApiState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(s.with(|c| status_json(c)).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    tenant_url: String,
    /// Write-only; omitted keeps the current token.
    token: Option<String>,
    sync_interval: Option<String>,
}

pub async fn put_integration(
    State(s): State<ApiState>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let v = body_json(&headers, &body, &["application/json"])?;
    let b: SettingsBody = serde_json::from_value(v).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    let tenant_url = netskope::check_tenant_url(&b.tenant_url).map_err(|e| bad("tenant_url", e))?;
    let sync_interval_secs = match &b.sync_interval {
        Some(i) => netskope::parse_interval(i).map_err(|e| bad("sync_interval", e))?,
        None => netskope::DEFAULT_SYNC_SECS,
    };
    let token = match b.token {
        Some(t) => {
            let t = t.trim().to_string();
            if t.len() < 16 || t.contains(char::is_whitespace) {
                return Err(bad("token", "a Netskope REST API v2 token is a long string without spaces".into()));
            }
            Some(t)
        }
        None => None,
    };
    let actor = actor(&ext);
    let status = s.with(move |c| {
        c.netskope_configure(actor, tenant_url, token, sync_interval_secs)?;
        Ok::<_, crate::control::ControlError>(status_json(c))
    });
    Ok(Json(status.await??))
}

/// Disconnects from Netskope (see [`Control::netskope_unconfigure`]).
pub async fn delete_integration(
    State(s): State<ApiState>,
    ext: axum::http::Extensions,
) -> Result<axum::http::StatusCode, ApiError> {
    let actor = actor(&ext);
    s.with(move |c| c.netskope_unconfigure(actor)).await??;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

fn bad(field: &'static str, reason: String) -> ApiError {
    ApiError::Invalid(vec![crate::policy::Problem { entry: "integrations/netskope".into(), field, reason }])
}

/// Runs a sync and answers with its result (502 when Netskope could not be read).
pub async fn sync(State(s): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let (tx, rx) = std::sync::mpsc::channel();
    s.with(move |c| c.netskope_request_sync(tx)).await??;
    let result = tokio::task::spawn_blocking(move || rx.recv_timeout(std::time::Duration::from_secs(120)))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    match result {
        Ok(Ok(status)) => Ok(Json(json!(status))),
        Ok(Err(message)) => Err(ApiError::Upstream(message)),
        Err(_) => Err(ApiError::Upstream("the sync is still running; see GET /integrations/netskope".into())),
    }
}

fn app_json(a: &AppRecord) -> Value {
    json!({
        "id": a.remote.id,
        "name": a.remote.name,
        "hosts": a.remote.hosts,
        "protocols": a.remote.protocols,
        "publishers": a.remote.publishers,
        "tags": a.remote.tags,
        "state": a.state,
        "mapping": {"segments": a.segments, "active": a.active},
        "managed_hosts": a.managed,
        "refused_hosts": a.refused,
        "last_push": a.last_push,
    })
}

pub async fn list_apps(State(s): State<ApiState>) -> Result<Json<Vec<Value>>, ApiError> {
    Ok(Json(s.with(|c| c.netskope().apps.values().map(app_json).collect()).await?))
}

fn app_id(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| ApiError::BadRequest(format!("app id {text:?} is not a number")))
}

pub async fn get_app(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = app_id(&id)?;
    let found = s.with(move |c| c.netskope().apps.get(&id).map(app_json));
    found.await?.map(Json).ok_or_else(|| not_found(id))
}

fn not_found(id: u64) -> ApiError {
    ApiError::NotFound(format!("no Netskope private app {id} (POST /integrations/netskope/sync imports them)"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingBody {
    segments: Vec<String>,
    active: bool,
}

/// Maps an app to segments and (de)activates it; the generated rules follow at once and the
/// app is pushed.
pub async fn put_app(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let id = app_id(&id)?;
    let v = body_json(&headers, &body, &["application/json"])?;
    let b: MappingBody = serde_json::from_value(v).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    let actor = actor(&ext);
    let mapped = s.with(move |c| c.netskope_map(actor, id, b.segments, b.active));
    Ok(Json(app_json(&mapped.await??)))
}

pub async fn suggestions(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = app_id(&id)?;
    let found = s.with(move |c| {
        c.netskope()
            .apps
            .get(&id)
            .map(|a| (a.remote.hosts.clone(), netskope::suggestions(c.enforcer().policy(), &a.remote.hosts)))
    });
    let (hosts, suggested) = found.await?.ok_or_else(|| not_found(id))?;
    let list: Vec<Value> = suggested
        .into_iter()
        .filter(|(name, _, _)| !netskope::reserved_segment(name))
        .map(
            |(segment, overlap, members)| json!({"segment": segment, "overlapping_hosts": overlap, "members": members}),
        )
        .collect();
    Ok(Json(json!({"app_id": id, "hosts": hosts, "suggestions": list})))
}
