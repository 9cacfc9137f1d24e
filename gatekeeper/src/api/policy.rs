//! `/apply`, `/status`, `/audit`: the whole policy at once, what is enforced, who changed what.

use std::collections::BTreeMap;

use axum::{Json, body::Bytes, extract::State, http::HeaderMap};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{
    ApiError, ApiState, Query, actor, content_type,
    problem::{
        BadRequest, BodyTooLarge, Conflict, Forbidden, InvalidPolicy, NotApplied, Unauthorized, UnsupportedMediaType,
    },
};
use crate::{
    control::{ApplyOptions, store::AuditEntry},
    policy::{
        PolicyDocument,
        diff::{Change, Spec},
    },
};

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ApplyQuery {
    /// Show what would change; change nothing.
    #[serde(default)]
    dry_run: bool,
    /// Delete the objects the document does not name.
    #[serde(default)]
    prune: bool,
    /// Apply even what would leave the network ungoverned.
    #[serde(default)]
    force: bool,
}

/// What an apply changed (or, dry, would change).
#[derive(Serialize, ToSchema)]
pub struct Applied {
    dry_run: bool,
    prune: bool,
    changes: Vec<ChangeView>,
    governance: Governance,
}

/// One object created, updated or deleted, with its old and new specs.
#[derive(Serialize, ToSchema)]
pub struct ChangeView {
    #[schema(inline)]
    op: Op,
    #[schema(inline)]
    kind: ObjectKind,
    name: String,
    /// The object before (absent when created).
    #[schema(value_type = Option<Object>)]
    old: Option<Spec>,
    /// The object after (absent when deleted).
    #[schema(value_type = Option<Object>)]
    new: Option<Spec>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum Op {
    Create,
    Update,
    Delete,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum ObjectKind {
    Asset,
    Segment,
    Rule,
}

/// How many addresses segments in enforce or monitor mode govern, before and after.
#[derive(Serialize, ToSchema)]
pub struct Governance {
    governed_before: usize,
    governed_after: usize,
    newly_ungoverned: usize,
    newly_governed: usize,
}

fn change_view(c: &Change) -> ChangeView {
    let op = match c.op() {
        "create" => Op::Create,
        "delete" => Op::Delete,
        _ => Op::Update,
    };
    let kind = match c.kind.as_str() {
        "asset" => ObjectKind::Asset,
        "segment" => ObjectKind::Segment,
        _ => ObjectKind::Rule,
    };
    ChangeView { op, kind, name: c.name.clone(), old: c.old.clone(), new: c.new.clone() }
}

/// Replaces the declarative state with a policy document (JSON or YAML): what the document
/// names is created or updated, what it does not name stays unless `prune`.
#[utoipa::path(
    post, path = "/apply", operation_id = "applyPolicy", tag = "policy", params(ApplyQuery),
    request_body(content(
        (PolicyDocument = "application/json"),
        (PolicyDocument = "application/yaml"),
    ), description = "A policy document"),
    responses(
        (status = 200, description = "What changed (or would, dry)", body = Applied),
        BadRequest, Unauthorized, Forbidden, Conflict, BodyTooLarge, UnsupportedMediaType, InvalidPolicy, NotApplied
    )
)]
pub async fn apply(
    State(s): State<ApiState>,
    Query(q): Query<ApplyQuery>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Applied>, ApiError> {
    let yaml = match content_type(&headers)?.to_ascii_lowercase().as_str() {
        "application/json" => false,
        "application/yaml" | "application/x-yaml" | "text/yaml" => true,
        other => return Err(ApiError::Unsupported(format!("{other}: use application/json or application/yaml"))),
    };
    // A large document takes a while to parse: off the async workers, and without the lock.
    let parse = move || -> Result<PolicyDocument, ApiError> {
        let text = std::str::from_utf8(&body).map_err(|_| ApiError::Body("body is not UTF-8".into()))?;
        if yaml {
            PolicyDocument::from_yaml(text, "body").map_err(|e| ApiError::Body(e.to_string()))
        } else {
            serde_json::from_str(text).map_err(|e| ApiError::Body(format!("body: {e}")))
        }
    };
    let doc = tokio::task::spawn_blocking(parse)
        .await
        .map_err(|e| ApiError::Internal(format!("the request's worker failed: {e}")))??;
    let actor = actor(&ext);
    let options = ApplyOptions { dry_run: q.dry_run, prune: q.prune, force: q.force };
    let applied = s.with(move |c| c.apply(doc, &actor, "apply", options)).await??;
    let g = applied.governance;
    Ok(Json(Applied {
        dry_run: q.dry_run,
        prune: q.prune,
        changes: applied.changes.iter().map(change_view).collect(),
        governance: Governance {
            governed_before: g.governed_before,
            governed_after: g.governed_after,
            newly_ungoverned: g.newly_ungoverned,
            newly_governed: g.newly_governed,
        },
    }))
}

/// What the data plane enforces now.
#[derive(Serialize, ToSchema)]
pub struct Status {
    /// The policy generation the data plane uses; moves with every change that writes a map.
    epoch: u32,
    last_apply: Option<LastApply>,
    /// Each bridge port and how gatekeeper's program is attached to it.
    interfaces: BTreeMap<String, String>,
    objects: Objects,
    maps: Maps,
}

#[derive(Serialize, ToSchema)]
pub struct LastApply {
    /// RFC 3339.
    at: String,
    duration_ms: f64,
}

#[derive(Serialize, ToSchema)]
pub struct Objects {
    assets: usize,
    segments: usize,
    rules: usize,
}

/// How full each BPF map is.
#[derive(Serialize, ToSchema)]
pub struct Maps {
    hosts_v4: Fill,
    prefixes_v4: Fill,
    hosts_v6: Fill,
    prefixes_v6: Fill,
    policy: Fill,
    rules: Fill,
    /// Entries in the flow tables at the last sample.
    flows: usize,
}

#[derive(Serialize, ToSchema)]
pub struct Fill {
    used: usize,
    capacity: usize,
}

/// The published status: answered without the control lock, so a long apply or a full flow
/// table never delays it.
#[utoipa::path(
    get, path = "/status", operation_id = "getStatus", tag = "policy",
    responses((status = 200, description = "The status", body = Status), Unauthorized)
)]
pub async fn status(State(s): State<ApiState>) -> Json<Status> {
    let v = s.control.status();
    let cap = v.capacity;
    let fill = |used: usize, capacity: usize| Fill { used, capacity };
    let [h4, n4, h6, n6] = v.prefixes;
    Json(Status {
        epoch: v.epoch,
        last_apply: v.last_apply.map(|(t, ms)| LastApply { at: t.to_rfc3339(), duration_ms: ms }),
        interfaces: v.interfaces.into_iter().map(|(name, how)| (name, how.to_string())).collect(),
        objects: Objects { assets: v.objects[0], segments: v.objects[1], rules: v.objects[2] },
        maps: Maps {
            hosts_v4: fill(h4, cap.hosts_v4),
            prefixes_v4: fill(n4, cap.prefixes_v4),
            hosts_v6: fill(h6, cap.hosts_v6),
            prefixes_v6: fill(n6, cap.prefixes_v6),
            policy: fill(v.policy_entries, cap.policy),
            rules: fill(v.rules, cap.rules),
            flows: v.flows.unwrap_or(0),
        },
    })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// The most rows returned, newest first (at most 10,000).
    #[param(minimum = 0)]
    limit: Option<usize>,
}

/// The audit log, newest first: who changed what, from where, old and new.
#[utoipa::path(
    get, path = "/audit", operation_id = "getAudit", tag = "policy", params(AuditQuery),
    responses((status = 200, description = "Audit rows", body = Vec<AuditEntry>), BadRequest, Unauthorized, NotApplied)
)]
pub async fn audit(State(s): State<ApiState>, Query(q): Query<AuditQuery>) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    Ok(Json(s.with(move |c| c.audit(limit)).await??))
}
