//! `/assets`, `/segments`, `/rules`: the policy's objects one at a time.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use utoipa::{
    IntoParams, PartialSchema, ToSchema,
    openapi::{RefOr, schema::Schema},
};

use super::{
    ApiError, ApiState, Query, actor, body_json,
    problem::{
        BadRequest, BodyTooLarge, Conflict, Forbidden, InvalidPolicy, NotApplied, NotFound, PreconditionFailed,
        Unauthorized, UnsupportedMediaType,
    },
};
use crate::{
    control::{
        Control, ControlError,
        auth::Actor,
        writer::{AssetEdit, etag},
    },
    policy::{AssetSpec, RuleSpec, SegmentSpec, diff::Change, selector::Selector},
};

/// The object named `name` from a request body (the name comes from the path).
fn object<T: DeserializeOwned>(name: &str, mut v: Value) -> Result<T, ApiError> {
    let Value::Object(map) = &mut v else { return Err(ApiError::Body("body: expected a JSON object".into())) };
    match map.get("name") {
        Some(Value::String(n)) if n != name => {
            return Err(ApiError::Body(format!("body: name {n:?} differs from the path's {name:?}")));
        }
        Some(Value::String(_)) | None => {}
        Some(other) => return Err(ApiError::Body(format!("body: name: {other} is not a string"))),
    }
    map.insert("name".into(), Value::String(name.into()));
    serde_json::from_value(v).map_err(|e| ApiError::Body(format!("body: {e}")))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only the assets this tag selector matches, e.g. `zone=cell-1,role in (plc,hmi)`.
    selector: Option<String>,
}

/// Lists the assets (those a selector matches, with `selector`).
#[utoipa::path(
    get, path = "/assets", operation_id = "listAssets", tag = "assets", params(ListQuery),
    responses((status = 200, description = "The assets", body = Vec<AssetSpec>), BadRequest, Unauthorized, NotApplied)
)]
pub async fn list_assets(
    State(s): State<ApiState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<AssetSpec>>, ApiError> {
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

/// An object's name, in the path.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct NameParam {
    /// The object's name (a path segment: percent-encoded UTF-8).
    #[allow(dead_code)] // Read with `Path<String>`; this describes it.
    name: String,
}

/// `If-Match` on an asset write.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IfMatchParam {
    /// Write only if the asset's current `ETag` is this one (`*`: only if it exists).
    #[serde(rename = "If-Match")]
    #[allow(dead_code)] // Read from the headers; this describes it.
    if_match: Option<String>,
}

/// Reads one asset; its `ETag` is its version.
#[utoipa::path(
    get, path = "/assets/{name}", operation_id = "getAsset", tag = "assets", params(NameParam),
    responses(
        (status = 200, description = "The asset", body = AssetSpec,
         headers(("ETag" = String, description = "The asset's version, for If-Match"))),
        BadRequest, Unauthorized, NotFound, NotApplied
    )
)]
pub async fn get_asset(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    stored_asset(&s, &name).await.map(|a| with_etag(Some(a)))
}

/// Creates or replaces an asset; it is enforced when the response comes.
#[utoipa::path(
    put, path = "/assets/{name}", operation_id = "putAsset", tag = "assets", params(NameParam, IfMatchParam),
    request_body(content = AssetBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The asset as written", body = AssetSpec,
         headers(("ETag" = String, description = "The asset's new version"))),
        BadRequest, Unauthorized, Forbidden, PreconditionFailed, BodyTooLarge, UnsupportedMediaType, InvalidPolicy,
        NotApplied
    )
)]
pub async fn put_asset(
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

/// Changes an asset with an RFC 7396 merge patch (`{"tags": {"zone": null}}` removes a tag).
#[utoipa::path(
    patch, path = "/assets/{name}", operation_id = "patchAsset", tag = "assets", params(NameParam, IfMatchParam),
    request_body(content(
        (Object = "application/merge-patch+json"),
        (Object = "application/json"),
    ), description = "A JSON merge patch of the asset"),
    responses(
        (status = 200, description = "The asset as written", body = AssetSpec,
         headers(("ETag" = String, description = "The asset's new version"))),
        BadRequest, Unauthorized, Forbidden, NotFound, PreconditionFailed, BodyTooLarge, UnsupportedMediaType,
        InvalidPolicy, NotApplied
    )
)]
pub async fn patch_asset(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let patch = body_json(&headers, &body, &["application/merge-patch+json", "application/json"])?;
    if !patch.is_object() {
        return Err(ApiError::Body("body: a merge patch of an asset is a JSON object".into()));
    }
    // Merged in the writer, against the latest version: concurrent patches lose nothing.
    let written = s.writer.write(&name, AssetEdit::Patch(patch), if_match(&headers)?, actor(&ext), "patch asset");
    Ok(with_etag(written.await?))
}

/// Deletes an asset.
#[utoipa::path(
    delete, path = "/assets/{name}", operation_id = "deleteAsset", tag = "assets", params(NameParam, IfMatchParam),
    responses(
        (status = 204, description = "Deleted"),
        BadRequest, Unauthorized, Forbidden, NotFound, PreconditionFailed, InvalidPolicy, NotApplied
    )
)]
pub async fn delete_asset(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    s.writer.write(&name, AssetEdit::Delete, if_match(&headers)?, actor(&ext), "delete asset").await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Where a generated object comes from.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Generated {
    /// The integration that made it.
    #[schema(inline)]
    by: Integration,
    /// The Netskope private app a generated rule serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    app_id: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum Integration {
    Netskope,
}

/// A segment or rule as a listing shows it: as written, and for a generated one where it comes
/// from. Its schema is the object's (which refuses unknown properties) with `generated` added.
#[derive(Serialize)]
pub struct Listed<'a, T> {
    #[serde(flatten)]
    spec: &'a T,
    #[serde(skip_serializing_if = "Option::is_none")]
    generated: Option<Generated>,
}

/// The schemas `SegmentListed` and `RuleListed`.
macro_rules! listed_schema {
    ($name:ident, $spec:ty, $what:literal) => {
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                let mut schema = <$spec as PartialSchema>::schema();
                if let RefOr::T(Schema::Object(o)) = &mut schema {
                    o.description =
                        Some(concat!("A ", $what, " as written; `generated` says which integration made it").into());
                    o.properties
                        .insert("generated".into(), RefOr::Ref(utoipa::openapi::Ref::from_schema_name("Generated")));
                }
                schema
            }
        }

        impl ToSchema for $name {
            fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
                schemas.push((<$spec as ToSchema>::name().into(), <$spec as PartialSchema>::schema()));
                <$spec as ToSchema>::schemas(schemas);
                schemas.push(("Generated".into(), <Generated as PartialSchema>::schema()));
                <Generated as ToSchema>::schemas(schemas);
            }
        }
    };
}

listed_schema!(SegmentListed, SegmentSpec, "segment");
listed_schema!(RuleListed, RuleSpec, "rule");

/// The schemas `AssetBody`, `SegmentBody` and `RuleBody`: a PUT body is the object without a
/// required `name` (the path names it; a `name` in the body must be the same).
macro_rules! body_schema {
    ($name:ident, $spec:ty, $what:literal) => {
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                let mut schema = <$spec as PartialSchema>::schema();
                if let RefOr::T(Schema::Object(o)) = &mut schema {
                    o.required.retain(|r| r != "name");
                    o.description = Some(
                        concat!("A ", $what, "; `name` may be left out (the path names it) or must match it").into(),
                    );
                }
                schema
            }
        }

        impl ToSchema for $name {
            fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
                <$spec as ToSchema>::schemas(schemas);
            }
        }
    };
}

body_schema!(AssetBody, AssetSpec, "asset");
body_schema!(SegmentBody, SegmentSpec, "segment");
body_schema!(RuleBody, RuleSpec, "rule");

/// User objects, then generated ones marked with where they come from.
fn listing<'a, T: Serialize>(
    user: &'a [T],
    generated: impl Iterator<Item = (&'a T, Option<u64>)>,
) -> Vec<Listed<'a, T>> {
    let user = user.iter().map(|spec| Listed { spec, generated: None });
    let generated = generated
        .map(|(spec, app_id)| Listed { spec, generated: Some(Generated { by: Integration::Netskope, app_id }) });
    user.chain(generated).collect()
}

/// The listing as JSON (built under the lock, sent after).
fn segments_json(c: &Control, name: Option<&str>) -> Vec<Value> {
    let list = listing(&c.doc().segments, c.netskope().segments.iter().map(|x| (x, None)));
    select(list, name, |l| &l.spec.name)
}

fn rules_json(c: &Control, name: Option<&str>) -> Vec<Value> {
    let list = listing(&c.doc().rules, c.netskope().rules.iter().map(|g| (&g.rule, Some(g.app_id))));
    select(list, name, |l| &l.spec.name)
}

/// Every item as JSON, or only the one named `name`.
fn select<T: Serialize>(list: Vec<T>, name: Option<&str>, name_of: impl Fn(&T) -> &String) -> Vec<Value> {
    list.iter()
        .filter(|x| name.is_none_or(|n| name_of(x) == n))
        .map(|x| serde_json::to_value(x).unwrap_or_default())
        .collect()
}

fn named(list: Vec<Value>, name: &str, kind: &str) -> Result<Json<Value>, ApiError> {
    list.into_iter().next().map(Json).ok_or_else(|| ApiError::NotFound(format!("no {kind} {name:?}")))
}

/// Lists the segments: those written, then those the Netskope integration generated.
#[utoipa::path(
    get, path = "/segments", operation_id = "listSegments", tag = "segments",
    responses((status = 200, description = "The segments", body = Vec<SegmentListed>), Unauthorized, NotApplied)
)]
pub async fn list_segments(State(s): State<ApiState>) -> Result<Json<Vec<Value>>, ApiError> {
    Ok(Json(s.with(|c| segments_json(c, None)).await?))
}

/// Reads one segment.
#[utoipa::path(
    get, path = "/segments/{name}", operation_id = "getSegment", tag = "segments", params(NameParam),
    responses(
        (status = 200, description = "The segment", body = SegmentListed),
        BadRequest, Unauthorized, NotFound, NotApplied
    )
)]
pub async fn get_segment(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let n = name.clone();
    named(s.with(move |c| segments_json(c, Some(&n))).await?, &name, "segment")
}

/// The control path's write of one object kind, and its deletion.
type Put<T> = fn(&mut Control, &Actor, T) -> Result<Vec<Change>, ControlError>;
type Delete = fn(&mut Control, &Actor, &str) -> Result<(), ControlError>;

/// A segment or rule from a PUT body, stored through the one change path.
async fn put_object<T: DeserializeOwned + Serialize + Clone + Send + 'static>(
    s: &ApiState,
    name: &str,
    ext: &axum::http::Extensions,
    (headers, body): (&HeaderMap, &Bytes),
    put: Put<T>,
) -> Result<Response, ApiError> {
    let spec: T = object(name, body_json(headers, body, &["application/json"])?)?;
    let (actor, written) = (actor(ext), spec.clone());
    s.with(move |c| put(c, &actor, written)).await??;
    Ok(Json(spec).into_response())
}

async fn delete_object(
    s: &ApiState,
    name: String,
    ext: &axum::http::Extensions,
    delete: Delete,
) -> Result<StatusCode, ApiError> {
    let actor = actor(ext);
    s.with(move |c| delete(c, &actor, &name)).await??;
    Ok(StatusCode::NO_CONTENT)
}

/// Creates or replaces a segment; enforced when the response comes.
#[utoipa::path(
    put, path = "/segments/{name}", operation_id = "putSegment", tag = "segments", params(NameParam),
    request_body(content = SegmentBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The segment as written", body = SegmentSpec),
        BadRequest, Unauthorized, Forbidden, Conflict, BodyTooLarge, UnsupportedMediaType, InvalidPolicy, NotApplied
    )
)]
pub async fn put_segment(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    put_object::<SegmentSpec>(&s, &name, &ext, (&headers, &body), Control::put_segment).await
}

/// Deletes a segment no rule names.
#[utoipa::path(
    delete, path = "/segments/{name}", operation_id = "deleteSegment", tag = "segments", params(NameParam),
    responses(
        (status = 204, description = "Deleted"),
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, InvalidPolicy, NotApplied
    )
)]
pub async fn delete_segment(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
) -> Result<StatusCode, ApiError> {
    delete_object(&s, name, &ext, Control::delete_segment).await
}

/// A segment's members: the assets it selects, with their addresses, and its CIDRs.
#[derive(Serialize, ToSchema)]
pub struct Members {
    segment: String,
    assets: Vec<Member>,
    /// Addresses or CIDRs.
    cidrs: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Member {
    name: String,
    /// Addresses or CIDRs.
    ips: Vec<String>,
}

/// The assets and CIDRs a segment holds now.
#[utoipa::path(
    get, path = "/segments/{name}/members", operation_id = "getSegmentMembers", tag = "segments", params(NameParam),
    responses(
        (status = 200, description = "The members", body = Members),
        BadRequest, Unauthorized, NotFound, NotApplied
    )
)]
pub async fn segment_members(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Json<Members>, ApiError> {
    let members = s.with({
        let name = name.clone();
        move |c| c.segment_members(&name)
    });
    let (assets, cidrs) = members.await??;
    let assets = assets
        .into_iter()
        .map(|(name, ips)| Member { name, ips: ips.iter().map(ToString::to_string).collect() })
        .collect();
    Ok(Json(Members { segment: name, assets, cidrs: cidrs.iter().map(ToString::to_string).collect() }))
}

/// Lists the rules: those written, then those the Netskope integration generated.
#[utoipa::path(
    get, path = "/rules", operation_id = "listRules", tag = "rules",
    responses((status = 200, description = "The rules", body = Vec<RuleListed>), Unauthorized, NotApplied)
)]
pub async fn list_rules(State(s): State<ApiState>) -> Result<Json<Vec<Value>>, ApiError> {
    Ok(Json(s.with(|c| rules_json(c, None)).await?))
}

/// Reads one rule.
#[utoipa::path(
    get, path = "/rules/{name}", operation_id = "getRule", tag = "rules", params(NameParam),
    responses(
        (status = 200, description = "The rule", body = RuleListed),
        BadRequest, Unauthorized, NotFound, NotApplied
    )
)]
pub async fn get_rule(State(s): State<ApiState>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let n = name.clone();
    named(s.with(move |c| rules_json(c, Some(&n))).await?, &name, "rule")
}

/// Creates or replaces a rule; enforced when the response comes.
#[utoipa::path(
    put, path = "/rules/{name}", operation_id = "putRule", tag = "rules", params(NameParam),
    request_body(content = RuleBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The rule as written", body = RuleSpec),
        BadRequest, Unauthorized, Forbidden, Conflict, BodyTooLarge, UnsupportedMediaType, InvalidPolicy, NotApplied
    )
)]
pub async fn put_rule(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    put_object::<RuleSpec>(&s, &name, &ext, (&headers, &body), Control::put_rule).await
}

/// Deletes a rule.
#[utoipa::path(
    delete, path = "/rules/{name}", operation_id = "deleteRule", tag = "rules", params(NameParam),
    responses(
        (status = 204, description = "Deleted"),
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, NotApplied
    )
)]
pub async fn delete_rule(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
) -> Result<StatusCode, ApiError> {
    delete_object(&s, name, &ext, Control::delete_rule).await
}
