//! The REST API under `/api/v1` (axum, JSON, `application/problem+json` errors, bearer tokens),
//! and its OpenAPI document, generated from the handlers and types here ([`utoipa`]).
//!
//! An edge over the control layer: every write goes through the one change path
//! ([`crate::control::Control`]), single-asset edits through its batching writer. Handlers never
//! block an async worker: work that takes the control lock runs in `spawn_blocking`, and
//! `GET /status` reads the published status without the lock.

pub mod netskope;
mod objects;
mod policy;
pub mod problem;
pub mod serve;
mod tokens;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, DefaultBodyLimit, Request, State},
    http::{HeaderMap, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::Value;
use utoipa::{
    Modify, OpenApi,
    openapi::{
        self,
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};
use utoipa_axum::router::OpenApiRouter;

pub use problem::{Kind, Problem};

use crate::{
    control::{
        Control, ControlError, Handle,
        auth::{self, Actor, AuthError, CredentialSet, Tokens},
        writer::AssetWriter,
    },
    policy::Problem as PolicyProblem,
};

/// Why a request was refused.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    /// A query string that is not what the operation takes.
    Query(String),
    /// A body that is not the JSON (or YAML) it claims, or not the object the operation takes.
    Body(String),
    Unauthorized,
    Forbidden,
    NotFound(String),
    Conflict(String),
    /// `If-Match` did not match.
    Precondition(String),
    Unsupported(String),
    Invalid(Vec<PolicyProblem>),
    Internal(String),
    /// An upstream service (Netskope) failed.
    Upstream(String),
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Invalid(problems) => Self::Invalid(problems),
            ControlError::Policy(e) => Self::Body(e.to_string()),
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

impl ApiError {
    fn problem(self) -> Problem {
        match self {
            Self::BadRequest(d) => Problem::new(Kind::BadRequest, d),
            Self::Query(d) => Problem::new(Kind::InvalidQuery, d),
            Self::Body(d) => Problem::new(Kind::InvalidBody, d),
            Self::Unauthorized => Problem::new(Kind::Unauthorized, "a valid bearer token is required"),
            Self::Forbidden => Problem::new(Kind::Forbidden, "this token may only read"),
            Self::NotFound(d) => Problem::new(Kind::NotFound, d),
            Self::Conflict(d) => Problem::new(Kind::Conflict, d),
            Self::Precondition(d) => Problem::new(Kind::PreconditionFailed, d),
            Self::Unsupported(d) => Problem::new(Kind::UnsupportedMediaType, d),
            Self::Invalid(problems) => {
                let detail = problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                let mut p = Problem::new(Kind::InvalidPolicy, detail);
                p.errors = problems
                    .into_iter()
                    .map(|p| problem::FieldProblem { entry: p.entry, field: p.field.into(), reason: p.reason })
                    .collect();
                p
            }
            Self::Internal(d) => Problem::new(Kind::NotApplied, d),
            Self::Upstream(d) => Problem::new(Kind::Upstream, d),
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
        self.problem().response()
    }
}

#[derive(Clone)]
pub struct ApiState {
    control: Handle,
    credentials: CredentialSet,
    writer: AssetWriter,
}

impl ApiState {
    /// The API over `control`; starts its asset writer thread.
    pub fn new(control: Handle, tokens: &Tokens) -> std::io::Result<Self> {
        let writer = AssetWriter::spawn(control.clone())?;
        // The file tokens join those created through the API (kept in the store).
        let credentials = control.credentials().clone();
        credentials.set_files(tokens);
        Ok(Self { control, credentials, writer })
    }

    /// Runs `f` on the control state on a blocking thread ([`Handle::run_blocking`]).
    pub(crate) async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Control) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        self.control.run_blocking(f).await.map_err(|e| ApiError::Internal(format!("the request's worker failed: {e}")))
    }
}

/// Checks the bearer token and records who is asking (the token's name and the client's
/// address) for the audit log.
async fn auth(State(state): State<ApiState>, mut req: Request, next: Next) -> Result<Response, ApiError> {
    let bearer = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let name = state.credentials.actor(bearer, auth::is_read_only(req.method().as_str()))?;
    // An IPv4 client of a `[::]` listener is recorded as IPv4, not `::ffff:a.b.c.d`.
    let address = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_canonical());
    let actor = Actor { name, address };
    req.extensions_mut().insert(actor);
    Ok(next.run(req).await)
}

/// A query string, refused as an [`ApiError::Query`] problem (axum's own rejection is plain
/// text).
pub struct Query<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(Query).map_err(|e| ApiError::Query(format!("query string: {e}")))
    }
}

/// Who made a request (set by [`auth`]).
pub(crate) fn actor(ext: &axum::http::Extensions) -> Actor {
    ext.get::<Actor>().cloned().unwrap_or_else(|| Actor::named("unknown"))
}

/// The media type of a request body (`application/json` when none is given); a header that is
/// not ASCII is no media type we take.
fn content_type(headers: &HeaderMap) -> Result<&str, ApiError> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else { return Ok("application/json") };
    let ct = v.to_str().map_err(|_| ApiError::Unsupported("the Content-Type header is not ASCII".into()))?;
    Ok(ct.split(';').next().unwrap_or("").trim())
}

/// A JSON body that must be a `T` (settings, mappings, new tokens).
pub(crate) fn body_as<T: serde::de::DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_value(body_json(headers, body, &["application/json"])?)
        .map_err(|e| ApiError::Body(format!("body: {e}")))
}

pub(crate) fn body_json(headers: &HeaderMap, body: &Bytes, accept: &[&str]) -> Result<Value, ApiError> {
    let ct = content_type(headers)?;
    if !accept.iter().any(|a| a.eq_ignore_ascii_case(ct)) {
        return Err(ApiError::Unsupported(format!("{ct}: use {}", accept.join(" or "))));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::Body(format!("body: {e}")))
}

/// The largest body of a request that writes one object (an asset, segment, rule, Netskope
/// setting or mapping): far more than any needs, and parsed on an async worker.
pub const OBJECT_BODY_LIMIT: usize = 1 << 20;

/// The API's routes, and the OpenAPI document describing them (without `/openapi.json`'s
/// content: the daemon adds the other edges' paths, then serves it with [`document`]).
/// `POST /apply` takes bodies up to `max_body_bytes` (parsed off the async workers), every
/// other route up to [`OBJECT_BODY_LIMIT`].
pub fn router(state: ApiState, max_body_bytes: usize) -> (Router, openapi::OpenApi) {
    let (schemas, paths, apply) = utoipa_axum::routes!(policy::apply);
    let apply = (
        schemas,
        paths,
        apply
            .layer(DefaultBodyLimit::max(max_body_bytes))
            .layer(middleware::from_fn(move |req, next| announced_within(max_body_bytes, req, next))),
    );
    let api = OpenApiRouter::new()
        .routes(utoipa_axum::routes!(objects::list_assets))
        .routes(utoipa_axum::routes!(
            objects::get_asset,
            objects::put_asset,
            objects::patch_asset,
            objects::delete_asset
        ))
        .routes(utoipa_axum::routes!(objects::list_segments))
        .routes(utoipa_axum::routes!(objects::get_segment, objects::put_segment, objects::delete_segment))
        .routes(utoipa_axum::routes!(objects::segment_members))
        .routes(utoipa_axum::routes!(objects::list_rules))
        .routes(utoipa_axum::routes!(objects::get_rule, objects::put_rule, objects::delete_rule))
        .routes(utoipa_axum::routes!(policy::status))
        .routes(utoipa_axum::routes!(policy::audit))
        .routes(utoipa_axum::routes!(
            netskope::get_integration,
            netskope::put_integration,
            netskope::delete_integration
        ))
        .routes(utoipa_axum::routes!(netskope::sync))
        .routes(utoipa_axum::routes!(netskope::list_apps))
        .routes(utoipa_axum::routes!(netskope::get_app, netskope::put_app))
        .routes(utoipa_axum::routes!(netskope::suggestions))
        .routes(utoipa_axum::routes!(tokens::list_tokens, tokens::create_token))
        .routes(utoipa_axum::routes!(tokens::revoke_token))
        // The routes above take one object; /apply, added after, has its own limit.
        .route_layer(middleware::from_fn(|req, next| announced_within(OBJECT_BODY_LIMIT, req, next)))
        .routes(apply)
        .route_layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state);
    // Outside the apply route's own limit, which is set later and so wins for it.
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi()).nest("/api/v1", api).split_for_parts();
    (router.layer(DefaultBodyLimit::max(OBJECT_BODY_LIMIT)), doc)
}

/// Refuses (413) a body whose `Content-Length` is over `limit` before reading any of it; the
/// body limit alone would read up to the limit first, and answer a client that then sees the
/// connection close while it still sends.
async fn announced_within(limit: usize, req: Request, next: Next) -> Response {
    let announced =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match announced {
        Some(n) if n > limit as u64 => {
            Problem::new(Kind::BodyTooLarge, format!("the body is {n} bytes; this operation takes at most {limit}"))
                .response()
        }
        _ => next.run(req).await,
    }
}

/// `GET /api/v1/openapi.json`: `doc`, the whole HTTP surface's document, serialized once.
pub fn document(doc: &openapi::OpenApi) -> Router {
    let text: Arc<str> = doc.to_json().unwrap_or_default().into();
    Router::new().route(
        "/api/v1/openapi.json",
        get(move || {
            let text = text.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], text.to_string()) }
        }),
    )
}

/// This document (OpenAPI 3.1), generated from the code.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    operation_id = "getOpenApiDocument",
    tag = "meta",
    security(()),
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
#[allow(dead_code)] // Served by `document`; this only describes it.
async fn openapi_document() {}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gatekeeper",
        description = "Agentless microsegmentation gatekeeper for OT networks: assets, tag-selected segments and rules, \
                       compiled into the XDP data plane. Every error is `application/problem+json` (RFC 9457); \
                       its `type` names the problem (see docs/problems.md).",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    paths(openapi_document),
    components(schemas(Problem, problem::FieldProblem)),
    modifiers(&Security),
    security(("bearer" = [])),
    tags(
        (name = "assets", description = "Devices, their addresses and tags"),
        (name = "segments", description = "Sets of addresses selected by tags or CIDRs"),
        (name = "rules", description = "Allowed and denied traffic between segments"),
        (name = "policy", description = "The whole policy at once, status and audit"),
        (name = "netskope", description = "Netskope One private apps kept in step with segments"),
        (name = "tokens", description = "The API's bearer tokens: those from files, and those created here"),
        (name = "meta", description = "This document"),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let bearer = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("An admin token may do anything; a reader token only GET and HEAD."))
            .build();
        doc.components.get_or_insert_with(Default::default).add_security_scheme("bearer", SecurityScheme::Http(bearer));
    }
}
