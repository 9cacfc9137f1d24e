//! `/api/v1/integrations/netskope`: settings (the token is write-only), sync, apps and their
//! mappings, suggestions.

use std::collections::BTreeSet;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{
    ApiError, ApiState, actor, body_as,
    problem::{
        BadRequest, BodyTooLarge, Conflict, Forbidden, InvalidPolicy, NotApplied, NotFound, Unauthorized,
        UnsupportedMediaType, Upstream,
    },
};
use crate::control::{
    Control,
    netskope::{self, AppProtocol, AppRecord, AppState, Publisher, PushResult, Refused, SyncStatus},
};

/// The integration as `GET /integrations/netskope` shows it (never the token).
#[derive(Serialize, ToSchema)]
pub struct IntegrationStatus {
    configured: bool,
    tenant_url: Option<String>,
    /// Whether a token is set (the token itself is never shown).
    token_set: bool,
    /// Seconds, e.g. `300s`.
    sync_interval: Option<String>,
    last_sync: Option<SyncStatus>,
    /// RFC 3339.
    last_successful_sync: Option<String>,
    apps: usize,
    active_apps: usize,
    publishers: Vec<Publisher>,
    managed_hosts: usize,
    refused_hosts: Vec<AppRefused>,
    pending_pushes: usize,
    problems: Vec<AppProblem>,
}

/// A host an app's push left out, and why.
#[derive(Serialize, ToSchema)]
pub struct AppRefused {
    app_id: u64,
    host: String,
    reason: String,
}

/// An app protocol that generates no rule, and why.
#[derive(Serialize, ToSchema)]
pub struct AppProblem {
    app_id: u64,
    reason: String,
}

fn status_view(c: &Control) -> IntegrationStatus {
    let n = c.netskope();
    let refused = n
        .apps
        .values()
        .flat_map(|a| {
            a.refused.iter().map(move |r| AppRefused {
                app_id: a.remote.id,
                host: r.host.clone(),
                reason: r.reason.to_string(),
            })
        })
        .collect();
    IntegrationStatus {
        configured: n.settings.is_some(),
        tenant_url: n.settings.as_ref().map(|s| s.tenant_url.clone()),
        token_set: n.settings.as_ref().is_some_and(|s| !s.token.is_empty()),
        sync_interval: n.settings.as_ref().map(|s| format!("{}s", s.sync_interval_secs)),
        last_sync: n.last_sync.clone(),
        last_successful_sync: n.last_success.clone(),
        apps: n.apps.len(),
        active_apps: n.acting().len(),
        publishers: n.publishers.clone(),
        managed_hosts: n.apps.values().map(|a| a.managed.len()).sum(),
        refused_hosts: refused,
        pending_pushes: c.netskope_pending().map(|p| p.len()).unwrap_or_default(),
        problems: n.problems.iter().map(|(id, p)| AppProblem { app_id: *id, reason: p.clone() }).collect(),
    }
}

/// The integration's settings (never the token) and state.
#[utoipa::path(
    get, path = "/integrations/netskope", operation_id = "getNetskopeIntegration", tag = "netskope",
    responses((status = 200, description = "The integration", body = IntegrationStatus), Unauthorized, NotApplied)
)]
pub async fn get_integration(State(s): State<ApiState>) -> Result<Json<IntegrationStatus>, ApiError> {
    Ok(Json(s.with(|c| status_view(c)).await?))
}

/// Settings of the Netskope integration.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsBody {
    /// `https://TENANT.goskope.com`.
    tenant_url: String,
    /// A REST API v2 token. Write-only; omitted keeps the current token.
    token: Option<String>,
    /// How often to sync, e.g. `5m` or `300s`.
    sync_interval: Option<String>,
}

/// Connects to a Netskope tenant (or changes the settings).
#[utoipa::path(
    put, path = "/integrations/netskope", operation_id = "putNetskopeIntegration", tag = "netskope",
    request_body(content = SettingsBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The integration", body = IntegrationStatus),
        BadRequest, Unauthorized, Forbidden, Conflict, BodyTooLarge, UnsupportedMediaType, InvalidPolicy, NotApplied
    )
)]
pub async fn put_integration(
    State(s): State<ApiState>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<IntegrationStatus>, ApiError> {
    let b: SettingsBody = body_as(&headers, &body)?;
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
        c.netskope_configure(&actor, tenant_url, token, sync_interval_secs)?;
        Ok::<_, crate::control::ControlError>(status_view(c))
    });
    Ok(Json(status.await??))
}

/// Disconnects from Netskope: the generated segments and rules go; the apps' records stay.
#[utoipa::path(
    delete, path = "/integrations/netskope", operation_id = "deleteNetskopeIntegration", tag = "netskope",
    responses((status = 204, description = "Disconnected"), Unauthorized, Forbidden, NotFound, Conflict, NotApplied)
)]
pub async fn delete_integration(
    State(s): State<ApiState>,
    ext: axum::http::Extensions,
) -> Result<StatusCode, ApiError> {
    let actor = actor(&ext);
    s.with(move |c| c.netskope_unconfigure(&actor)).await??;
    Ok(StatusCode::NO_CONTENT)
}

fn bad(field: &'static str, reason: String) -> ApiError {
    ApiError::Invalid(vec![crate::policy::Problem { entry: "integrations/netskope".into(), field, reason }])
}

/// Runs a sync now and answers with its result.
#[utoipa::path(
    post, path = "/integrations/netskope/sync", operation_id = "syncNetskope", tag = "netskope",
    responses(
        (status = 200, description = "The sync's result", body = SyncStatus),
        Unauthorized, Forbidden, Conflict, NotApplied, Upstream
    )
)]
pub async fn sync(State(s): State<ApiState>, ext: axum::http::Extensions) -> Result<Json<SyncStatus>, ApiError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let actor = actor(&ext);
    s.with(move |c| c.netskope_request_sync(&actor, tx)).await??;
    let result = tokio::task::spawn_blocking(move || rx.recv_timeout(std::time::Duration::from_secs(120)))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    match result {
        Ok(Ok(status)) => Ok(Json(status)),
        Ok(Err(message)) => Err(ApiError::Upstream(message)),
        Err(_) => Err(ApiError::Upstream("the sync is still running; see GET /integrations/netskope".into())),
    }
}

/// A Netskope private app, and how gatekeeper maps it.
#[derive(Serialize, ToSchema)]
pub struct App {
    id: u64,
    name: String,
    hosts: Vec<String>,
    protocols: Vec<AppProtocol>,
    publishers: Vec<String>,
    tags: Vec<String>,
    state: AppState,
    mapping: Mapping,
    /// Hosts gatekeeper added and may remove.
    managed_hosts: BTreeSet<String>,
    refused_hosts: Vec<Refused>,
    last_push: Option<PushResult>,
}

/// The segments whose members an app's hosts follow, and whether the mapping acts.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    segments: Vec<String>,
    active: bool,
}

fn app_view(a: &AppRecord) -> App {
    App {
        id: a.remote.id,
        name: a.remote.name.clone(),
        hosts: a.remote.hosts.clone(),
        protocols: a.remote.protocols.clone(),
        publishers: a.remote.publishers.clone(),
        tags: a.remote.tags.clone(),
        state: a.state,
        mapping: Mapping { segments: a.segments.clone(), active: a.active },
        managed_hosts: a.managed.clone(),
        refused_hosts: a.refused.clone(),
        last_push: a.last_push.clone(),
    }
}

/// The private apps the last sync imported.
#[utoipa::path(
    get, path = "/integrations/netskope/apps", operation_id = "listNetskopeApps", tag = "netskope",
    responses((status = 200, description = "The apps", body = Vec<App>), Unauthorized, NotApplied)
)]
pub async fn list_apps(State(s): State<ApiState>) -> Result<Json<Vec<App>>, ApiError> {
    Ok(Json(s.with(|c| c.netskope().apps.values().map(app_view).collect()).await?))
}

fn app_id(text: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| ApiError::BadRequest(format!("app id {text:?} is not a number")))
}

/// A private app's id, in the path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AppIdParam {
    /// Netskope's id of the private app.
    #[allow(dead_code)] // Read with `Path<String>` (a bad id is a problem, not a rejection).
    id: u64,
}

/// Reads one private app.
#[utoipa::path(
    get, path = "/integrations/netskope/apps/{id}", operation_id = "getNetskopeApp", tag = "netskope",
    params(AppIdParam),
    responses((status = 200, description = "The app", body = App), BadRequest, Unauthorized, NotFound, NotApplied)
)]
pub async fn get_app(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Json<App>, ApiError> {
    let id = app_id(&id)?;
    let found = s.with(move |c| c.netskope().apps.get(&id).map(app_view));
    found.await?.map(Json).ok_or_else(|| not_found(id))
}

fn not_found(id: u64) -> ApiError {
    ApiError::NotFound(format!("no Netskope private app {id} (POST /integrations/netskope/sync imports them)"))
}

/// Maps an app to segments and (de)activates it; the generated rules follow at once and the
/// app is pushed.
#[utoipa::path(
    put, path = "/integrations/netskope/apps/{id}", operation_id = "putNetskopeApp", tag = "netskope",
    params(AppIdParam),
    request_body(content = Mapping, content_type = "application/json"),
    responses(
        (status = 200, description = "The app as mapped", body = App),
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, BodyTooLarge, UnsupportedMediaType, InvalidPolicy,
        NotApplied
    )
)]
pub async fn put_app(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<App>, ApiError> {
    let id = app_id(&id)?;
    let b: Mapping = body_as(&headers, &body)?;
    let actor = actor(&ext);
    let mapped = s.with(move |c| c.netskope_map(&actor, id, b.segments, b.active));
    Ok(Json(app_view(&mapped.await??)))
}

/// Segments whose members overlap an app's hosts, best first: candidates for its mapping.
#[derive(Serialize, ToSchema)]
pub struct Suggestions {
    app_id: u64,
    hosts: Vec<String>,
    suggestions: Vec<Suggestion>,
}

#[derive(Serialize, ToSchema)]
pub struct Suggestion {
    segment: String,
    /// The app's hosts the segment holds.
    overlapping_hosts: Vec<String>,
    /// How many addresses the segment holds.
    members: usize,
}

/// Which segments could map an app.
#[utoipa::path(
    get, path = "/integrations/netskope/apps/{id}/suggestions", operation_id = "getNetskopeAppSuggestions",
    tag = "netskope", params(AppIdParam),
    responses((status = 200, description = "The suggestions", body = Suggestions), BadRequest, Unauthorized, NotFound, NotApplied)
)]
pub async fn suggestions(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Json<Suggestions>, ApiError> {
    let id = app_id(&id)?;
    let found = s.with(move |c| {
        c.netskope()
            .apps
            .get(&id)
            .map(|a| (a.remote.hosts.clone(), netskope::suggestions(c.enforcer().policy(), &a.remote.hosts)))
    });
    let (hosts, suggested) = found.await?.ok_or_else(|| not_found(id))?;
    let suggestions = suggested
        .into_iter()
        .filter(|(name, _, _)| !netskope::reserved_segment(name))
        .map(|(segment, overlapping_hosts, members)| Suggestion { segment, overlapping_hosts, members })
        .collect();
    Ok(Json(Suggestions { app_id: id, hosts, suggestions }))
}
