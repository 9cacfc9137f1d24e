//! The REST API under `/api/v1` (axum, JSON, `application/problem+json` errors, bearer tokens).
//!
//! Every write goes through [`App::change`], the one path from a desired state to the data
//! plane (the policy file takes it too): validate the whole new document, enforce it, then record
//! it and its audit rows in one store transaction. If any step fails, nothing changed: a refused
//! store write puts the previous policy back into the data plane.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    daemon::Enforcer,
    netskope::http as netskope,
    policy::{AssetSpec, PolicyDocument, PolicyError, Problem, RuleSpec, SegmentSpec},
    selector::Selector,
    store::{Change, Store, changes},
};

/// The daemon's state behind the API.
pub struct App {
    pub enforcer: Enforcer,
    pub store: Store,
    /// The desired state (what the store holds).
    pub doc: PolicyDocument,
    pub last_apply: Option<(DateTime<Utc>, f64)>,
    /// The Netskope integration: its generated objects are enforced with `doc`.
    pub netskope: crate::netskope::Integration,
    /// Asset name to its position in `doc.assets`.
    index: std::collections::HashMap<String, usize>,
}

/// Why a request was refused.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized,
    Forbidden,
    NotFound(String),
    Conflict(String),
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
            | Self::Unsupported(d)
            | Self::Internal(d)
            | Self::Upstream(d) => f.write_str(d),
            Self::Unauthorized => f.write_str("unauthorized"),
            Self::Forbidden => f.write_str("forbidden"),
            Self::Invalid(p) => f.write_str(&p.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, title, detail, errors) = match self {
            Self::BadRequest(d) => (StatusCode::BAD_REQUEST, "bad request", d, vec![]),
            Self::Unauthorized => {
                (StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required".into(), vec![])
            }
            Self::Forbidden => (StatusCode::FORBIDDEN, "forbidden", "this token may only read".into(), vec![]),
            Self::NotFound(d) => (StatusCode::NOT_FOUND, "not found", d, vec![]),
            Self::Conflict(d) => (StatusCode::CONFLICT, "conflict", d, vec![]),
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

impl App {
    pub fn new(enforcer: Enforcer, store: Store, doc: PolicyDocument) -> Self {
        let mut app =
            Self { enforcer, store, doc, last_apply: None, netskope: Default::default(), index: Default::default() };
        app.reindex();
        app
    }

    fn reindex(&mut self) {
        self.index = self.doc.assets.iter().enumerate().map(|(i, a)| (a.name.clone(), i)).collect();
    }

    /// The stored asset named `name`.
    pub fn asset(&self, name: &str) -> Option<&AssetSpec> {
        self.index.get(name).map(|&i| &self.doc.assets[i])
    }

    /// Edits a copy of the desired state with `edit` and makes it the desired state.
    pub fn edit(
        &mut self,
        actor: &str,
        action: &str,
        edit: impl FnOnce(&mut PolicyDocument),
    ) -> Result<Vec<Change>, ApiError> {
        let mut doc = self.doc.clone();
        edit(&mut doc);
        self.change(doc, actor, action, false)
    }

    /// Makes `new` the desired state: validate, enforce, record. Returns the changes.
    pub fn change(
        &mut self,
        new: PolicyDocument,
        actor: &str,
        action: &str,
        dry_run: bool,
    ) -> Result<Vec<Change>, ApiError> {
        self.check_generated_names(&new)?;
        let policy = self.validate_effective(&new)?;
        let diff = changes(&self.doc, &new);
        if dry_run || diff.is_empty() {
            return Ok(diff);
        }
        let previous = self.enforcer.policy().clone();
        let started = Instant::now();
        self.enforcer.apply(policy).map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Err(e) = self.store.commit(&diff, actor, action) {
            // Not recorded, so not applied either: put the previous policy back.
            if let Err(back) = self.enforcer.apply(previous) {
                tracing::error!(error = %back, "could not restore the previous policy after a store failure");
            }
            return Err(ApiError::Internal(e.to_string()));
        }
        self.last_apply = Some((Utc::now(), started.elapsed().as_secs_f64() * 1e3));
        self.doc = new;
        self.reindex();
        for c in &diff {
            tracing::info!(actor, action, kind = c.kind.as_str(), name = %c.name, "changed");
        }
        // Any object may move members in or out of a mapped segment; a push that finds
        // nothing to change costs no request.
        let acting = self.netskope.acting();
        self.netskope_mark(&acting, "change");
        Ok(diff)
    }
}

/// One asset write waiting for the writer (see [`App::change_assets`]).
pub struct AssetWrite {
    pub name: String,
    /// The new asset, or `None` to delete it.
    pub spec: Option<AssetSpec>,
    pub actor: &'static str,
    pub action: &'static str,
    pub reply: tokio::sync::oneshot::Sender<Result<(), ApiError>>,
}

impl App {
    /// Asset writes, each validated on its own, applied together: one incremental compile, one
    /// data-plane apply and one store transaction for the whole batch (group commit), so the
    /// fixed costs (the RCU grace period, the fsync) are paid once per batch. A write naming an
    /// asset already in the batch starts a new batch, so writes apply in order.
    pub fn change_assets(&mut self, writes: Vec<AssetWrite>) {
        let mut batch: Vec<(AssetWrite, Option<crate::policy::Asset>)> = Vec::new();
        let mut names = std::collections::HashSet::new();
        for w in writes {
            let asset = match &w.spec {
                None => None,
                Some(spec) => {
                    match (PolicyDocument { assets: vec![spec.clone()], ..Default::default() }).validate("request") {
                        Ok(mut p) => p.assets.pop(),
                        Err(PolicyError::Invalid { problems, .. }) => {
                            let _ = w.reply.send(Err(ApiError::Invalid(problems)));
                            continue;
                        }
                        Err(e) => {
                            let _ = w.reply.send(Err(ApiError::BadRequest(e.to_string())));
                            continue;
                        }
                    }
                }
            };
            if !names.insert(w.name.clone()) {
                self.apply_batch(std::mem::take(&mut batch));
                names.clear();
                names.insert(w.name.clone());
            }
            batch.push((w, asset));
        }
        self.apply_batch(batch);
    }

    fn apply_batch(&mut self, batch: Vec<(AssetWrite, Option<crate::policy::Asset>)>) {
        if batch.is_empty() {
            return;
        }
        let mut work = Vec::new();
        let mut changes = Vec::new();
        for (w, asset) in batch {
            let old = self.asset(&w.name).cloned();
            if old == w.spec {
                let _ = w.reply.send(Ok(()));
                continue;
            }
            changes.push((
                Change {
                    kind: crate::store::Kind::Asset,
                    name: w.name.clone(),
                    old: old.as_ref().and_then(|o| serde_json::to_value(o).ok()),
                    new: w.spec.as_ref().and_then(|n| serde_json::to_value(n).ok()),
                },
                w.actor,
                w.action,
            ));
            work.push((w, asset, old));
        }
        if work.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = self
            .enforcer
            .apply_assets(work.iter().map(|(w, a, _)| (w.name.clone(), a.clone())).collect())
            .map_err(|e| ApiError::Internal(e.to_string()))
            .and_then(|_| {
                self.store.commit_each(&changes, None).map_err(|e| {
                    // Not recorded, so not applied either: put the previous assets back.
                    let back: Vec<(String, Option<crate::policy::Asset>)> = work
                        .iter()
                        .map(|(w, _, old)| {
                            let a = old.as_ref().and_then(|o| {
                                (PolicyDocument { assets: vec![o.clone()], ..Default::default() })
                                    .validate("store")
                                    .ok()
                                    .and_then(|mut p| p.assets.pop())
                            });
                            (w.name.clone(), a)
                        })
                        .collect();
                    if let Err(err) = self.enforcer.apply_assets(back) {
                        tracing::error!(error = %err, "could not restore the previous assets after a store failure");
                    }
                    ApiError::Internal(e.to_string())
                })
            });
        match result {
            Ok(()) => {
                let mut removed = false;
                for (w, _, _) in &work {
                    // The document keeps its order (it is what users read back), so a removal
                    // shifts positions; removals are rare next to tag edits.
                    match (self.index.get(&w.name).copied(), &w.spec) {
                        (Some(i), Some(s)) => self.doc.assets[i] = s.clone(),
                        (Some(i), None) => {
                            self.doc.assets.remove(i);
                            self.index.remove(&w.name);
                            removed = true;
                        }
                        (None, Some(s)) => {
                            self.index.insert(w.name.clone(), self.doc.assets.len());
                            self.doc.assets.push(s.clone());
                        }
                        (None, None) => {}
                    }
                    if removed {
                        self.reindex();
                        removed = false;
                    }
                }
                self.last_apply = Some((Utc::now(), started.elapsed().as_secs_f64() * 1e3));
                tracing::info!(assets = work.len(), "asset changes applied");
                let moved: Vec<(Option<&AssetSpec>, Option<&AssetSpec>)> =
                    work.iter().map(|(w, _, old)| (old.as_ref(), w.spec.as_ref())).collect();
                let affected = self.netskope_affected(&moved);
                self.netskope_mark(&affected, "change");
                for (w, _, _) in work {
                    let _ = w.reply.send(Ok(()));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (w, _, _) in work {
                    let _ = w.reply.send(Err(ApiError::Internal(msg.clone())));
                }
            }
        }
    }
}

/// Takes asset writes off the queue in batches and applies each batch at once.
async fn writer(app: Arc<tokio::sync::Mutex<App>>, mut rx: tokio::sync::mpsc::Receiver<AssetWrite>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        app.lock().await.change_assets(batch);
    }
}

/// Bearer tokens read from the files named in the configuration.
#[derive(Clone, Default)]
pub struct Tokens {
    pub admin: Option<String>,
    pub reader: Option<String>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("admin", &self.admin.is_some()).field("reader", &self.reader.is_some()).finish()
    }
}

/// SHA-256 of a token, hex: what the store keeps and what requests are compared against.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The tokens' hashes: the tokens themselves are dropped once hashed.
#[derive(Debug, Default)]
struct Credentials {
    admin: Option<String>,
    reader: Option<String>,
}

/// Constant-time comparison, so response times say nothing about a token.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone)]
pub struct ApiState {
    pub app: Arc<tokio::sync::Mutex<App>>,
    credentials: Arc<Credentials>,
    writes: tokio::sync::mpsc::Sender<AssetWrite>,
}

impl ApiState {
    /// Starts the asset writer; call inside a tokio runtime.
    pub fn new(app: Arc<tokio::sync::Mutex<App>>, tokens: Tokens) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(8192);
        tokio::spawn(writer(app.clone(), rx));
        let credentials = Credentials {
            admin: tokens.admin.as_deref().map(token_hash),
            reader: tokens.reader.as_deref().map(token_hash),
        };
        Self { app, credentials: Arc::new(credentials), writes: tx }
    }

    async fn write_asset(
        &self,
        name: &str,
        spec: Option<AssetSpec>,
        actor: &'static str,
        action: &'static str,
    ) -> Result<(), ApiError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let w = AssetWrite { name: name.to_string(), spec, actor, action, reply };
        self.writes.send(w).await.map_err(|_| ApiError::Internal("the writer stopped".into()))?;
        rx.await.map_err(|_| ApiError::Internal("the writer stopped".into()))?
    }
}

/// Who made a request, for the audit log.
#[derive(Clone)]
struct Actor(&'static str);

async fn auth(State(state): State<ApiState>, mut req: Request, next: Next) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    let presented = token_hash(presented);
    let is = |t: &Option<String>| t.as_deref().is_some_and(|t| same(t, &presented));
    let actor = if is(&state.credentials.admin) {
        "admin"
    } else if is(&state.credentials.reader) {
        if req.method() != Method::GET {
            return Err(ApiError::Forbidden);
        }
        "reader"
    } else {
        return Err(ApiError::Unauthorized);
    };
    req.extensions_mut().insert(Actor(actor));
    Ok(next.run(req).await)
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
        .with_state(state.clone());
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state);
    Router::new().nest("/api/v1", api).merge(metrics)
}

pub(crate) fn body_json(headers: &HeaderMap, body: &Bytes, accept: &[&str]) -> Result<Value, ApiError> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    let ct = ct.split(';').next().unwrap_or("").trim();
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

/// RFC 7396 JSON Merge Patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

pub(crate) fn actor(headers: &axum::http::Extensions) -> &'static str {
    headers.get::<Actor>().map_or("unknown", |a| a.0)
}

#[derive(Deserialize)]
struct ListQuery {
    selector: Option<String>,
}

async fn list_assets(State(s): State<ApiState>, Query(q): Query<ListQuery>) -> Result<Json<Vec<AssetSpec>>, ApiError> {
    let app = s.app.lock().await;
    let Some(text) = q.selector else { return Ok(Json(app.doc.assets.clone())) };
    let sel = Selector::parse(&text).map_err(|e| ApiError::BadRequest(format!("selector: {e}")))?;
    let matching = app
        .enforcer
        .policy()
        .assets
        .iter()
        .filter(|a| sel.matches(&a.tags))
        .map(|a| a.name.as_str())
        .collect::<Vec<_>>();
    Ok(Json(app.doc.assets.iter().filter(|a| matching.contains(&a.name.as_str())).cloned().collect()))
}

fn find<'a, T>(list: &'a [T], name: &str, of: impl Fn(&T) -> &str, kind: &str) -> Result<&'a T, ApiError> {
    list.iter().find(|x| of(x) == name).ok_or_else(|| ApiError::NotFound(format!("no {kind} {name:?}")))
}

async fn get_asset(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Json<AssetSpec>, ApiError> {
    let app = s.app.lock().await;
    app.asset(&name).cloned().map(Json).ok_or_else(|| ApiError::NotFound(format!("no asset {name:?}")))
}

/// Replaces the items of `list` named like those of `items`, appends the others.
pub(crate) fn upsert<T: Clone>(list: &mut Vec<T>, items: &[T], name: impl Fn(&T) -> &str) {
    for item in items {
        match list.iter().position(|x| name(x) == name(item)) {
            Some(i) => list[i] = item.clone(),
            None => list.push(item.clone()),
        }
    }
}

async fn put_asset(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let spec: AssetSpec = object(&name, body_json(&headers, &body, &["application/json"])?)?;
    s.write_asset(&name, Some(spec.clone()), actor(&ext), "put asset").await?;
    Ok(Json(spec).into_response())
}

async fn patch_asset(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let patch = body_json(&headers, &body, &["application/merge-patch+json", "application/json"])?;
    let current = {
        let app = s.app.lock().await;
        app.asset(&name).cloned().ok_or_else(|| ApiError::NotFound(format!("no asset {name:?}")))?
    };
    let mut v = serde_json::to_value(&current).map_err(|e| ApiError::Internal(e.to_string()))?;
    merge_patch(&mut v, &patch);
    let spec: AssetSpec = object(&name, v)?;
    s.write_asset(&name, Some(spec.clone()), actor(&ext), "patch asset").await?;
    Ok(Json(spec).into_response())
}

async fn delete_asset(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
) -> Result<StatusCode, ApiError> {
    if s.app.lock().await.asset(&name).is_none() {
        return Err(ApiError::NotFound(format!("no asset {name:?}")));
    }
    s.write_asset(&name, None, actor(&ext), "delete asset").await?;
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

fn segments_json(app: &App) -> Vec<Value> {
    listing(&app.doc.segments, app.netskope.segments.iter().map(|x| (x, json!({"by": "netskope"}))))
}

fn rules_json(app: &App) -> Vec<Value> {
    listing(&app.doc.rules, app.netskope.rules.iter().map(|g| (&g.rule, json!({"by": "netskope", "app_id": g.app_id}))))
}

/// A segment or rule from a PUT body, stored through the one change path.
async fn put_object<T: serde::de::DeserializeOwned + serde::Serialize + Clone>(
    s: &ApiState,
    name: &str,
    ext: &axum::http::Extensions,
    (headers, body): (&HeaderMap, &Bytes),
    action: &str,
    list: fn(&mut PolicyDocument) -> &mut Vec<T>,
    name_of: fn(&T) -> &str,
) -> Result<Response, ApiError> {
    let spec: T = object(name, body_json(headers, body, &["application/json"])?)?;
    s.app.lock().await.edit(actor(ext), action, |d| upsert(list(d), std::slice::from_ref(&spec), name_of))?;
    Ok(Json(spec).into_response())
}

fn named(list: Vec<Value>, name: &str, kind: &str) -> Result<Json<Value>, ApiError> {
    list.into_iter()
        .find(|v| v["name"] == name)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no {kind} {name:?}")))
}

async fn list_segments(State(s): State<ApiState>) -> Json<Vec<Value>> {
    Json(segments_json(&*s.app.lock().await))
}

async fn get_segment(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    named(segments_json(&*s.app.lock().await), &name, "segment")
}

async fn put_segment(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    put_object::<SegmentSpec>(&s, &name, &ext, (&headers, &body), "put segment", |d| &mut d.segments, |x| &x.name).await
}

async fn delete_segment(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
) -> Result<StatusCode, ApiError> {
    let mut app = s.app.lock().await;
    if crate::netskope::reserved_segment(&name) {
        return Err(ApiError::Conflict(format!("segment {name:?} is generated from the Netskope publishers")));
    }
    find(&app.doc.segments, &name, |x| &x.name, "segment")?;
    let users: Vec<&str> =
        app.doc.rules.iter().filter(|r| r.from == name || r.to == name).map(|r| r.name.as_str()).collect();
    if !users.is_empty() {
        return Err(ApiError::Conflict(format!(
            "segment {name:?} is used by rules {users:?}; delete or change them first"
        )));
    }
    app.edit(actor(&ext), "delete segment", |d| d.segments.retain(|x| x.name != name))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn segment_members(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let app = s.app.lock().await;
    let policy = app.enforcer.policy();
    let seg = find(&policy.segments, &name, |x| &x.name, "segment")?;
    let assets: Vec<Value> = policy
        .assets
        .iter()
        .filter(|a| seg.selector.as_ref().is_some_and(|sel| sel.matches(&a.tags)))
        .map(|a| json!({"name": a.name, "ips": a.prefixes.iter().map(ToString::to_string).collect::<Vec<_>>()}))
        .collect();
    let cidrs: Vec<String> = seg.cidrs.iter().map(ToString::to_string).collect();
    Ok(Json(json!({"segment": name, "assets": assets, "cidrs": cidrs})))
}

async fn list_rules(State(s): State<ApiState>) -> Json<Vec<Value>> {
    Json(rules_json(&*s.app.lock().await))
}

async fn get_rule(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    named(rules_json(&*s.app.lock().await), &name, "rule")
}

async fn put_rule(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    put_object::<RuleSpec>(&s, &name, &ext, (&headers, &body), "put rule", |d| &mut d.rules, |x| &x.name).await
}

async fn delete_rule(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
) -> Result<StatusCode, ApiError> {
    let mut app = s.app.lock().await;
    if app.netskope.rules.iter().any(|g| g.rule.name == name) {
        return Err(ApiError::Conflict(format!(
            "rule {name:?} is generated by a Netskope mapping; change the mapping instead"
        )));
    }
    find(&app.doc.rules, &name, |x| &x.name, "rule")?;
    app.edit(actor(&ext), "delete rule", |d| d.rules.retain(|x| x.name != name))?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ApplyQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn apply(
    State(s): State<ApiState>,
    Query(q): Query<ApplyQuery>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    let ct = ct.split(';').next().unwrap_or("").trim();
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest("body is not UTF-8".into()))?;
    let doc = match ct {
        "application/json" => serde_json::from_str(text).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?,
        "application/yaml" | "application/x-yaml" | "text/yaml" => {
            PolicyDocument::from_yaml(text, "body").map_err(|e| ApiError::BadRequest(e.to_string()))?
        }
        other => return Err(ApiError::Unsupported(format!("{other}: use application/json or application/yaml"))),
    };
    let mut app = s.app.lock().await;
    let diff = app.change(doc, actor(&ext), "apply", q.dry_run)?;
    let items: Vec<Value> = diff
        .iter()
        .map(|c| {
            let op = match (&c.old, &c.new) {
                (None, _) => "create",
                (_, None) => "delete",
                _ => "update",
            };
            json!({"op": op, "kind": c.kind, "name": c.name, "old": c.old, "new": c.new})
        })
        .collect();
    Ok(Json(json!({"dry_run": q.dry_run, "changes": items})))
}

async fn status(State(s): State<ApiState>) -> Json<Value> {
    let app = s.app.lock().await;
    let dp = app.enforcer.dataplane();
    let c = dp.applied();
    let (h4, n4) =
        (c.v4.keys().filter(|n| n.prefix_len() == 32).count(), c.v4.keys().filter(|n| n.prefix_len() < 32).count());
    let (h6, n6) =
        (c.v6.keys().filter(|n| n.prefix_len() == 128).count(), c.v6.keys().filter(|n| n.prefix_len() < 128).count());
    let cap = app.enforcer.capacity();
    let fill = |used: usize, max: usize| json!({"used": used, "capacity": max});
    let interfaces: BTreeMap<String, &str> = dp.attachments().into_iter().collect();
    Json(json!({
        "epoch": dp.epoch(),
        "last_apply": app.last_apply.map(|(t, ms)| json!({"at": t.to_rfc3339(), "duration_ms": ms})),
        "interfaces": interfaces,
        "objects": {"assets": app.doc.assets.len(), "segments": app.doc.segments.len(), "rules": app.doc.rules.len()},
        "maps": {
            "hosts_v4": fill(h4, cap.hosts_v4), "prefixes_v4": fill(n4, cap.prefixes_v4),
            "hosts_v6": fill(h6, cap.hosts_v6), "prefixes_v6": fill(n6, cap.prefixes_v6),
            "policy": fill(c.policy.len(), cap.policy), "rules": fill(c.rule_slots.len(), cap.rules),
            "flows": dp.flow_count().unwrap_or(0),
        },
    }))
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
}

async fn audit(State(s): State<ApiState>, Query(q): Query<AuditQuery>) -> Result<Json<Value>, ApiError> {
    let app = s.app.lock().await;
    let rows = app.store.audit(q.limit.unwrap_or(100).min(10_000)).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(json!(rows)))
}

async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    let text = crate::metrics::render(&*s.app.lock().await);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json"))
}
