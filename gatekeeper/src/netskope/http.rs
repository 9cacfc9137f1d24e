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

use super::{AppRecord, AppState, Settings, worker::Event};
use crate::{
    api::{ApiError, ApiState, actor, body_json},
    store::AuditRow,
};

pub async fn get_integration(State(s): State<ApiState>) -> Json<Value> {
    Json(s.app.lock().await.netskope_status())
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
    let tenant_url = super::check_tenant_url(&b.tenant_url).map_err(|e| bad("tenant_url", e))?;
    let sync_interval_secs = match &b.sync_interval {
        Some(i) => super::parse_interval(i).map_err(|e| bad("sync_interval", e))?,
        None => super::DEFAULT_SYNC_SECS,
    };
    let mut app = s.app.lock().await;
    let token = match (b.token, &app.netskope.settings) {
        (Some(t), _) => {
            let t = t.trim().to_string();
            if t.len() < 16 || t.contains(char::is_whitespace) {
                return Err(bad("token", "a Netskope REST API v2 token is a long string without spaces".into()));
            }
            t
        }
        (None, Some(cur)) => cur.token.clone(),
        (None, None) => return Err(bad("token", "required when the integration is first configured".into())),
    };
    app.netskope_configure(actor(&ext), Settings { tenant_url, token, sync_interval_secs })?;
    Ok(Json(app.netskope_status()))
}

/// Disconnects from Netskope (see [`crate::api::App::netskope_unconfigure`]).
pub async fn delete_integration(
    State(s): State<ApiState>,
    ext: axum::http::Extensions,
) -> Result<axum::http::StatusCode, ApiError> {
    let mut app = s.app.lock().await;
    if app.netskope.settings.is_none() {
        return Err(ApiError::NotFound("the Netskope integration is not configured".into()));
    }
    app.netskope_unconfigure(actor(&ext))?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

fn bad(field: &'static str, reason: String) -> ApiError {
    ApiError::Invalid(vec![crate::policy::Problem { entry: "integrations/netskope".into(), field, reason }])
}

/// Runs a sync and answers with its result (502 when Netskope could not be read).
pub async fn sync(State(s): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let app = s.app.lock().await;
        if app.netskope.settings.is_none() {
            return Err(ApiError::Conflict("the Netskope integration is not configured".into()));
        }
        if app.netskope.wake.is_none() {
            return Err(ApiError::Internal("the Netskope worker is not running".into()));
        }
        app.netskope.wake(Event::Sync(Some(tx)));
    }
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

pub async fn list_apps(State(s): State<ApiState>) -> Json<Vec<Value>> {
    Json(s.app.lock().await.netskope.apps.values().map(app_json).collect())
}

fn app_id(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| ApiError::BadRequest(format!("app id {text:?} is not a number")))
}

pub async fn get_app(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = app_id(&id)?;
    let app = s.app.lock().await;
    app.netskope.apps.get(&id).map(|a| Json(app_json(a))).ok_or_else(|| not_found(id))
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
    let mut app = s.app.lock().await;
    let Some(current) = app.netskope.apps.get(&id).cloned() else { return Err(not_found(id)) };
    if current.state == AppState::Gone && b.active {
        return Err(ApiError::Conflict(format!("Netskope private app {id} was deleted in Netskope")));
    }
    let mut problems = Vec::new();
    let mut segments = Vec::new();
    for (i, seg) in b.segments.iter().enumerate() {
        if !app.doc.segments.iter().any(|s| &s.name == seg) {
            problems.push(crate::policy::Problem {
                entry: format!("netskope app {id}"),
                field: "segments",
                reason: format!("segments[{i}]: unknown segment {seg:?}"),
            });
        } else if segments.contains(seg) {
            problems.push(crate::policy::Problem {
                entry: format!("netskope app {id}"),
                field: "segments",
                reason: format!("segments[{i}]: {seg:?} is listed twice"),
            });
        } else {
            segments.push(seg.clone());
        }
    }
    if b.active && segments.is_empty() && problems.is_empty() {
        problems.push(crate::policy::Problem {
            entry: format!("netskope app {id}"),
            field: "segments",
            reason: "an active mapping needs at least one segment".into(),
        });
    }
    if !problems.is_empty() {
        return Err(ApiError::Invalid(problems));
    }
    let audit = AuditRow {
        actor: actor(&ext).into(),
        action: "map netskope app".into(),
        kind: Some("netskope-app".into()),
        name: Some(id.to_string()),
        old: Some(json!({"segments": current.segments, "active": current.active})),
        new: Some(json!({"segments": segments, "active": b.active})),
    };
    let (segs, active) = (segments.clone(), b.active);
    app.netskope_edit(
        actor(&ext),
        "map",
        move |n| {
            if let Some(a) = n.apps.get_mut(&id) {
                a.segments = segs;
                a.active = active;
            }
        },
        Some("change"),
        vec![audit],
    )?;
    let a = app.netskope.apps.get(&id).ok_or_else(|| not_found(id))?;
    Ok(Json(app_json(a)))
}

pub async fn suggestions(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = app_id(&id)?;
    let app = s.app.lock().await;
    let a = app.netskope.apps.get(&id).ok_or_else(|| not_found(id))?;
    let list: Vec<Value> = super::suggestions(app.enforcer.policy(), &a.remote.hosts)
        .into_iter()
        .filter(|(name, _, _)| !super::reserved_segment(name))
        .map(
            |(segment, overlap, members)| json!({"segment": segment, "overlapping_hosts": overlap, "members": members}),
        )
        .collect();
    Ok(Json(json!({"app_id": id, "hosts": a.remote.hosts, "suggestions": list})))
}
