//! The REST API under `/api/v1` (axum, JSON, `application/problem+json` errors, bearer tokens).
//!
//! An edge over the control layer: every write goes through the one change path
//! ([`crate::control::Control`]), single-asset edits through its batching writer. Handlers never
//! block an async worker: work that takes the control lock runs in `spawn_blocking`, and
//! `GET /status` reads the published status without the lock.

pub mod netskope;
pub mod serve;

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};

use crate::{
    control::{
        ApplyOptions, Control, ControlError, Handle,
        auth::{self, AuthError, Credentials, Tokens},
        writer::{AssetEdit, AssetWriter, etag},
    },
    policy::{AssetSpec, PolicyDocument, Problem, RuleSpec, SegmentSpec, diff::Change, selector::Selector},
};

/// Why a request was refused.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized,
    Forbidden,
    NotFound(String),
    Conflict(String),
    /// `If-Match` did not match.
    Precondition(String),
    Unsupported(String),
    Invalid(Vec<Problem>),
    Internal(String),
    /// An upstream service (Netskope) failed.
    Upstream(String),
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadRequest(d)
            | Self::NotFound(d)
            | Self::Conflict(d)
            | Self::Precondition(d)
            | Self::Unsupported(d)
            | Self::Internal(d)
            | Self::Upstream(d) => f.write_str(d),
            Self::Unauthorized => f.write_str("unauthorized"),
            Self::Forbidden => f.write_str("forbidden"),
            Self::Invalid(p) => f.write_str(&p.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")),
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Invalid(problems) => Self::Invalid(problems),
            ControlError::Policy(e) => Self::BadRequest(e.to_string()),
            ControlError::NotFound(d) => Self::NotFound(d),
            ControlError::Conflict(d) => Self::Conflict(d),
            ControlError::Precondition(d) => Self::Precondition(d),
            ControlError::Batch(e) => match Arc::try_unwrap(e) {
                Ok(e) => e.into(),
                Err(shared) => Self::Internal(shared.to_string()),
            },
            e @ (ControlError::Enforce(_)
            | ControlError::Store(_)
            | ControlError::Io { .. }
            | ControlError::Unavailable(_)) => Self::Internal(e.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Unauthorized => Self::Unauthorized,
            AuthError::Forbidden => Self::Forbidden,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A request the daemon could not serve is its fault, not the client's: say why.
        match &self {
            Self::Internal(d) => tracing::error!(cause = %d, "request not applied (500)"),
            Self::Upstream(d) => tracing::warn!(cause = %d, "upstream failure (502)"),
            _ => {}
        }
        let (status, title, detail, errors) = match self {
            Self::BadRequest(d) => (StatusCode::BAD_REQUEST, "bad request", d, vec![]),
            Self::Unauthorized => {
                (StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required".into(), vec![])
            }
            Self::Forbidden => (StatusCode::FORBIDDEN, "forbidden", "this token may only read".into(), vec![]),
            Self::NotFound(d) => (StatusCode::NOT_FOUND, "not found", d, vec![]),
            Self::Conflict(d) => (StatusCode::CONFLICT, "conflict", d, vec![]),
            Self::Precondition(d) => (StatusCode::PRECONDITION_FAILED, "precondition failed", d, vec![]),
            Self::Unsupported(d) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported media type", d, vec![]),
            Self::Invalid(problems) => {
                let errors =
                    problems.iter().map(|p| json!({"entry": p.entry, "field": p.field, "reason": p.reason})).collect();
                let detail = problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid policy", detail, errors)
            }
            Self::Internal(d) => (StatusCode::INTERNAL_SERVER_ERROR, "not applied", d, vec![]),
            Self::Upstream(d) => (StatusCode::BAD_GATEWAY, "upstream failure", d, vec![]),
        };
        let body = json!({"type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail, "errors": errors});
        (status, [(header::CONTENT_TYPE, "application/problem+json")], body.to_string()).into_response()
    }
}

#[derive(Clone)]
pub struct ApiState {
    control: Handle,
    credentials: Arc<Credentials>,
    writer: AssetWriter,
}

impl ApiState {
    /// The API over `control`; starts its asset writer thread.
    pub fn new(control: Handle, tokens: &Tokens) -> std::io::Result<Self> {
        let writer = AssetWriter::spawn(control.clone())?;
        Ok(Self { control, credentials: Arc::new(Credentials::new(tokens)), writer })
    }

    /// Runs `f` on the control state on a blocking thread ([`Handle::run_blocking`]).
    pub(crate) async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Control) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        self.control.run_blocking(f).await.map_err(|e| ApiError::Internal(format!("the request's worker failed: {e}")))
    }
}

/// Who made a request, for the audit log.
#[derive(Clone)]
struct Actor(&'static str);

async fn auth(State(state): State<ApiState>, mut req: Request, next: Next) -> Result<Response, ApiError> {
    let bearer = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let actor = state.credentials.actor(bearer, auth::is_read_only(req.method().as_str()))?;
    req.extensions_mut().insert(Actor(actor));
    Ok(next.run(req).await)
}

/// The media type of a request body (`application/json` when none is given); a header that is
/// not ASCII is no media type we take.
fn content_type(headers: &HeaderMap) -> Result<&str, ApiError> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else { return Ok("application/json") };
    let ct = v.to_str().map_err(|_| ApiError::Unsupported("the Content-Type header is not ASCII".into()))?;
    Ok(ct.split(';').next().unwrap_or("").trim())
}

pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/assets", get(list_assets))
        .route("/assets/{name}", get(get_asset).put(put_asset).delete(delete_asset).patch(patch_asset))
        .route("/segments", get(list_segments))
        .route("/segments/{name}", get(get_segment).put(put_segment).delete(delete_segment))
        .route("/segments/{name}/members", get(segment_members))
        .route("/rules", get(list_rules))
        .route("/rules/{name}", get(get_rule).put(put_rule).delete(delete_rule))
        .route("/apply", post(apply))
        .route("/status", get(status))
        .route("/audit", get(audit))
        .route(
            "/integrations/netskope",
            get(netskope::get_integration).put(netskope::put_integration).delete(netskope::delete_integration),
        )
        .route("/integrations/netskope/sync", post(netskope::sync))
        .route("/integrations/netskope/apps", get(netskope::list_apps))
        .route("/integrations/netskope/apps/{id}", get(netskope::get_app).put(netskope::put_app))
        .route("/integrations/netskope/apps/{id}/suggestions", get(netskope::suggestions))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .route("/openapi.json", get(openapi))
        .with_state(state);
    Router::new().nest("/api/v1", api)
}

pub(crate) fn body_json(headers: &HeaderMap, body: &Bytes, accept: &[&str]) -> Result<Value, ApiError> {
    let ct = content_type(headers)?;
    if !accept.contains(&ct) {
        return Err(ApiError::Unsupported(format!("{ct}: use {}", accept.join(" or "))));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
}

/// The object named `name` from a request body (the name comes from the path).
fn object<T: serde::de::DeserializeOwned>(name: &str, mut v: Value) -> Result<T, ApiError> {
    let Value::Object(map) = &mut v else { return Err(ApiError::BadRequest("body: expected a JSON object".into())) };
    match map.get("name") {
        Some(Value::String(n)) if n != name => {
            return Err(ApiError::BadRequest(format!("body: name {n:?} differs from the path's {name:?}")));
        }
        _ => {}
    }
    map.insert("name".into(), Value::String(name.into()));
    serde_json::from_value(v).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
}

pub(crate) fn actor(headers: &axum::http::Extensions) -> &'static str {
    headers.get::<Actor>().map_or("unknown", |a| a.0)
}

#[derive(Deserialize)]
struct ListQuery {
    selector: Option<String>,
}

async fn list_assets(State(s): State<ApiState>, Query(q): Query<ListQuery>) -> Result<Json<Vec<AssetSpec>>, ApiError> {
    let selector = q
        .selector
        .map(|text| Selector::parse(&text).map_err(|e| ApiError::BadRequest(format!("selector: {e}"))))
        .transpose()?;
    let assets = s
        .with(move |c| match selector {
            None => c.doc().assets.clone(),
            Some(sel) => c.assets_matching(&sel),
        })
        .await?;
    Ok(Json(assets))
}

/// The stored asset `name`, or a 404.
async fn stored_asset(s: &ApiState, name: &str) -> Result<AssetSpec, ApiError> {
    let n = name.to_string();
    s.with(move |c| c.asset(&n).cloned()).await?.ok_or_else(|| ApiError::NotFound(format!("no asset {name:?}")))
}

/// The asset with its version in `ETag`, for `If-Match` on the next write.
fn with_etag(spec: Option<AssetSpec>) -> Response {
    match spec {
        Some(a) => ([(header::ETAG, etag(&a))], Json(a)).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

/// `If-Match` of a request (`None`: none given).
fn if_match(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get(header::IF_MATCH)
        .map(|v| v.to_str().map(String::from).map_err(|_| ApiError::BadRequest("If-Match is not ASCII".into())))
        .transpose()
}

async fn get_asset(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    stored_asset(&s, &name).await.map(|a| with_etag(Some(a)))
}

async fn put_asset(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let spec: AssetSpec = object(&name, body_json(&headers, &body, &["application/json"])?)?;
    let written = s.writer.write(&name, AssetEdit::Put(spec), if_match(&headers)?, actor(&ext), "put asset").await?;
    Ok(with_etag(written))
}

async fn patch_asset(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let patch = body_json(&headers, &body, &["application/merge-patch+json", "application/json"])?;
    // Merged in the writer, against the latest version: concurrent patches lose nothing.
    let written = s.writer.write(&name, AssetEdit::Patch(patch), if_match(&headers)?, actor(&ext), "patch asset");
    Ok(with_etag(written.await?))
}

async fn delete_asset(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    s.writer.write(&name, AssetEdit::Delete, if_match(&headers)?, actor(&ext), "delete asset").await?;
    Ok(StatusCode::NO_CONTENT)
}

/// User objects, then generated ones marked with where they come from.
fn listing<'a, T: serde::Serialize + 'a>(user: &[T], generated: impl Iterator<Item = (&'a T, Value)>) -> Vec<Value> {
    let user = user.iter().map(|x| serde_json::to_value(x).unwrap_or_default());
    let generated = generated.map(|(x, by)| {
        let mut v = serde_json::to_value(x).unwrap_or_default();
        v["generated"] = by;
        v
    });
    user.chain(generated).collect()
}

fn segments_json(c: &Control) -> Vec<Value> {
    listing(&c.doc().segments, c.netskope().segments.iter().map(|x| (x, json!({"by": "netskope"}))))
}

fn rules_json(c: &Control) -> Vec<Value> {
    listing(&c.doc().rules, c.netskope().rules.iter().map(|g| (&g.rule, json!({"by": "netskope", "app_id": g.app_id}))))
}

fn named(list: Vec<Value>, name: &str, kind: &str) -> Result<Json<Value>, ApiError> {
    list.into_iter()
        .find(|v| v["name"] == name)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no {kind} {name:?}")))
}

async fn list_segments(State(s): State<ApiState>) -> Result<Json<Vec<Value>>, ApiError> {
    Ok(Json(s.with(|c| segments_json(c)).await?))
}

async fn get_segment(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    named(s.with(|c| segments_json(c)).await?, &name, "segment")
}

/// The control path's write of one object kind, and its deletion.
type Put<T> = fn(&mut Control, &str, T) -> Result<Vec<Change>, ControlError>;
type Delete = fn(&mut Control, &str, &str) -> Result<(), ControlError>;

/// A segment or rule from a PUT body, stored through the one change path.
async fn put_object<T: DeserializeOwned + serde::Serialize + Clone + Send + 'static>(
    s: &ApiState,
    name: &str,
    ext: &axum::http::Extensions,
    (headers, body): (&HeaderMap, &Bytes),
    put: Put<T>,
) -> Result<Response, ApiError> {
    let spec: T = object(name, body_json(headers, body, &["application/json"])?)?;
    let (actor, written) = (actor(ext), spec.clone());
    s.with(move |c| put(c, actor, written)).await??;
    Ok(Json(spec).into_response())
}

async fn delete_object(
    s: &ApiState,
    name: String,
    ext: &axum::http::Extensions,
    delete: Delete,
) -> Result<StatusCode, ApiError> {
    let actor = actor(ext);
    s.with(move |c| delete(c, actor, &name)).await??;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_segment(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    put_object::<SegmentSpec>(&s, &name, &ext, (&headers, &body), Control::put_segment).await
}

async fn delete_segment(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
) -> Result<StatusCode, ApiError> {
    delete_object(&s, name, &ext, Control::delete_segment).await
}

async fn segment_members(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let members = s.with({
        let name = name.clone();
        move |c| c.segment_members(&name)
    });
    let (assets, cidrs) = members.await??;
    let assets: Vec<Value> = assets
        .into_iter()
        .map(|(a, ips)| json!({"name": a, "ips": ips.iter().map(ToString::to_string).collect::<Vec<_>>()}))
        .collect();
    let cidrs: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
    Ok(Json(json!({"segment": name, "assets": assets, "cidrs": cidrs})))
}

async fn list_rules(State(s): State<ApiState>) -> Result<Json<Vec<Value>>, ApiError> {
    Ok(Json(s.with(|c| rules_json(c)).await?))
}

async fn get_rule(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    named(s.with(|c| rules_json(c)).await?, &name, "rule")
}

async fn put_rule(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    put_object::<RuleSpec>(&s, &name, &ext, (&headers, &body), Control::put_rule).await
}

async fn delete_rule(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
) -> Result<StatusCode, ApiError> {
    delete_object(&s, name, &ext, Control::delete_rule).await
}

#[derive(Deserialize)]
struct ApplyQuery {
    #[serde(default)]
    dry_run: bool,
    /// Delete the objects the document does not name.
    #[serde(default)]
    prune: bool,
    /// Apply even what would leave the network ungoverned.
    #[serde(default)]
    force: bool,
}

async fn apply(
    State(s): State<ApiState>,
    Query(q): Query<ApplyQuery>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let yaml = match content_type(&headers)? {
        "application/json" => false,
        "application/yaml" | "application/x-yaml" | "text/yaml" => true,
        other => return Err(ApiError::Unsupported(format!("{other}: use application/json or application/yaml"))),
    };
    // A large document takes a while to parse: off the async workers, and without the lock.
    let parse = move || -> Result<PolicyDocument, ApiError> {
        let text = std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest("body is not UTF-8".into()))?;
        if yaml {
            PolicyDocument::from_yaml(text, "body").map_err(|e| ApiError::BadRequest(e.to_string()))
        } else {
            serde_json::from_str(text).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
        }
    };
    let doc = tokio::task::spawn_blocking(parse)
        .await
        .map_err(|e| ApiError::Internal(format!("the request's worker failed: {e}")))??;
    let actor = actor(&ext);
    let options = ApplyOptions { dry_run: q.dry_run, prune: q.prune, force: q.force };
    let applied = s.with(move |c| c.apply(doc, actor, "apply", options)).await??;
    let items: Vec<Value> = applied
        .changes
        .iter()
        .map(|c| json!({"op": c.op(), "kind": c.kind, "name": c.name, "old": c.old, "new": c.new}))
        .collect();
    let g = applied.governance;
    Ok(Json(json!({
        "dry_run": q.dry_run,
        "prune": q.prune,
        "changes": items,
        "governance": {
            "governed_before": g.governed_before, "governed_after": g.governed_after,
            "newly_ungoverned": g.newly_ungoverned, "newly_governed": g.newly_governed,
        },
    })))
}

/// The published status: answered without the control lock, so a long apply or a full flow
/// table never delays it.
async fn status(State(s): State<ApiState>) -> Json<Value> {
    let v = s.control.status();
    let cap = v.capacity;
    let fill = |used: usize, max: usize| json!({"used": used, "capacity": max});
    let interfaces: BTreeMap<String, &str> = v.interfaces.into_iter().collect();
    let [h4, n4, h6, n6] = v.prefixes;
    Json(json!({
        "epoch": v.epoch,
        "last_apply": v.last_apply.map(|(t, ms)| json!({"at": t.to_rfc3339(), "duration_ms": ms})),
        "interfaces": interfaces,
        "objects": {"assets": v.objects[0], "segments": v.objects[1], "rules": v.objects[2]},
        "maps": {
            "hosts_v4": fill(h4, cap.hosts_v4), "prefixes_v4": fill(n4, cap.prefixes_v4),
            "hosts_v6": fill(h6, cap.hosts_v6), "prefixes_v6": fill(n6, cap.prefixes_v6),
            "policy": fill(v.policy_entries, cap.policy), "rules": fill(v.rules, cap.rules),
            "flows": v.flows.unwrap_or(0),
        },
    }))
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
}

async fn audit(State(s): State<ApiState>, Query(q): Query<AuditQuery>) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    let rows = s.with(move |c| c.audit(limit)).await??;
    Ok(Json(json!(rows)))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json"))
}
