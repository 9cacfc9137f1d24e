//! Errors as `application/problem+json` (RFC 9457): one [`Kind`] per problem, each with its
//! status, title and a `type` URI naming it (documented in `docs/problems.md`), and the
//! responses the OpenAPI document lists per operation.
//!
//! Every error leaves the daemon in this form, axum's own included: [`normalize`] rewrites any
//! other error response (an unknown route, a wrong method, a bad query string, a body over the
//! limit) before it is sent.

use axum::{
    body::{Body, to_bytes},
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::{IntoResponses, ToSchema};

/// The media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Where the problem types are described; a problem's `type` is this with `#` and its slug.
pub const TYPE_BASE: &str = "https://github.com/gatekeeper-ot/gatekeeper/blob/main/docs/problems.md";

/// What went wrong, as a problem type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    BadRequest,
    InvalidQuery,
    InvalidBody,
    Unauthorized,
    Forbidden,
    NotFound,
    NoRoute,
    MethodNotAllowed,
    Conflict,
    PreconditionFailed,
    BodyTooLarge,
    UnsupportedMediaType,
    InvalidPolicy,
    NotApplied,
    Upstream,
}

impl Kind {
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest | Self::InvalidQuery | Self::InvalidBody => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound | Self::NoRoute => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict => StatusCode::CONFLICT,
            Self::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidPolicy => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NotApplied => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Upstream => StatusCode::BAD_GATEWAY,
        }
    }

    /// The anchor of its description in `docs/problems.md`.
    pub fn slug(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::InvalidQuery => "invalid-query",
            Self::InvalidBody => "invalid-body",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not-found",
            Self::NoRoute => "no-route",
            Self::MethodNotAllowed => "method-not-allowed",
            Self::Conflict => "conflict",
            Self::PreconditionFailed => "precondition-failed",
            Self::BodyTooLarge => "body-too-large",
            Self::UnsupportedMediaType => "unsupported-media-type",
            Self::InvalidPolicy => "invalid-policy",
            Self::NotApplied => "not-applied",
            Self::Upstream => "upstream-failure",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::BadRequest => "bad request",
            Self::InvalidQuery => "invalid query string",
            Self::InvalidBody => "invalid request body",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not found",
            Self::NoRoute => "no such route",
            Self::MethodNotAllowed => "method not allowed",
            Self::Conflict => "conflict",
            Self::PreconditionFailed => "precondition failed",
            Self::BodyTooLarge => "request body too large",
            Self::UnsupportedMediaType => "unsupported media type",
            Self::InvalidPolicy => "invalid policy",
            Self::NotApplied => "not applied",
            Self::Upstream => "upstream failure",
        }
    }

    pub fn type_uri(self) -> String {
        format!("{TYPE_BASE}#{}", self.slug())
    }

    pub const ALL: [Self; 15] = [
        Self::BadRequest,
        Self::InvalidQuery,
        Self::InvalidBody,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::NoRoute,
        Self::MethodNotAllowed,
        Self::Conflict,
        Self::PreconditionFailed,
        Self::BodyTooLarge,
        Self::UnsupportedMediaType,
        Self::InvalidPolicy,
        Self::NotApplied,
        Self::Upstream,
    ];
}

/// An error, as RFC 9457 describes it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type; its page describes it.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    /// The HTTP status, repeated.
    pub status: u16,
    /// What happened, for a person.
    pub detail: String,
    /// For an invalid policy: each problem with the entry and field it is about.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldProblem>,
}

/// One problem of a policy document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldProblem {
    /// The entry, e.g. `assets[3] (plc-1)`.
    pub entry: String,
    pub field: String,
    pub reason: String,
}

impl Problem {
    pub fn new(kind: Kind, detail: impl Into<String>) -> Self {
        Self {
            kind: kind.type_uri(),
            title: kind.title().into(),
            status: kind.status().as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    pub fn response(&self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_string(self).unwrap_or_default();
        let mut resp = (status, [(header::CONTENT_TYPE, PROBLEM_JSON)], body).into_response();
        challenge(&mut resp);
        resp
    }
}

/// A 401 says how to authenticate (RFC 9110 11.6.1).
fn challenge(resp: &mut Response) {
    if resp.status() == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
}

/// The problem kind axum means by an error status it answers with itself.
fn kind_of(status: StatusCode) -> Kind {
    match status {
        StatusCode::NOT_FOUND => Kind::NoRoute,
        StatusCode::METHOD_NOT_ALLOWED => Kind::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => Kind::BodyTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Kind::UnsupportedMediaType,
        StatusCode::UNPROCESSABLE_ENTITY => Kind::InvalidBody,
        StatusCode::UNAUTHORIZED => Kind::Unauthorized,
        StatusCode::FORBIDDEN => Kind::Forbidden,
        s if s.is_server_error() => Kind::NotApplied,
        _ => Kind::BadRequest,
    }
}

/// The longest error body of axum's read to become a problem's detail.
const MAX_DETAIL: usize = 4096;

/// Rewrites an error response that is not already `application/problem+json` (axum's
/// rejections and its 404/405) into one, keeping its status and headers (`Allow` on a 405).
pub async fn normalize(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let status = resp.status();
    let is_problem = resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes() == PROBLEM_JSON.as_bytes());
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = to_bytes(body, MAX_DETAIL).await.map(|b| String::from_utf8_lossy(&b).trim().to_string());
    let kind = kind_of(status);
    let detail = match (kind, text) {
        (Kind::NoRoute, _) => format!("no route {path}"),
        (Kind::MethodNotAllowed, _) => {
            let allow = parts.headers.get(header::ALLOW).and_then(|v| v.to_str().ok()).unwrap_or("");
            format!("{method} is not allowed on {path} (allowed: {allow})")
        }
        (_, Ok(t)) if !t.is_empty() => t,
        _ => kind.title().to_string(),
    };
    let mut problem = Problem::new(kind, detail);
    problem.status = status.as_u16();
    let body = serde_json::to_string(&problem).unwrap_or_default();
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    parts.headers.remove(header::CONTENT_LENGTH);
    let mut resp = Response::from_parts(parts, Body::from(body));
    challenge(&mut resp);
    resp
}

// The error responses of the OpenAPI document, listed per operation.
macro_rules! responses {
    ($($name:ident = $status:literal, $doc:literal;)*) => {$(
        #[doc = $doc]
        #[derive(IntoResponses)]
        #[response(status = $status, content_type = "application/problem+json")]
        #[allow(dead_code)] // Only its OpenAPI description is used.
        pub struct $name(Problem);
    )*};
}

responses! {
    BadRequest = 400, "The request is malformed (a query string, a path parameter, a body that is not the JSON or YAML it claims).";
    Unauthorized = 401, "No valid bearer token (`WWW-Authenticate: Bearer`).";
    Forbidden = 403, "A reader's token cannot write.";
    NotFound = 404, "No such object.";
    Conflict = 409, "The change conflicts with the current state (an object still referenced; a change that would leave the network ungoverned without `force`).";
    PreconditionFailed = 412, "`If-Match` names another version.";
    BodyTooLarge = 413, "The body is larger than `[api] max_body_bytes`.";
    UnsupportedMediaType = 415, "A body media type the operation does not take.";
    InvalidPolicy = 422, "The policy would be invalid: every problem, with its entry and field.";
    NotApplied = 500, "The daemon could not apply the request (its store or data plane failed); nothing changed.";
    Upstream = 502, "Netskope could not be reached or refused the request.";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_type_is_described() {
        let page = include_str!("../../../docs/problems.md");
        for kind in Kind::ALL {
            assert!(page.contains(&format!("\n## {}\n{}.", kind.slug(), kind.status().as_u16())), "{kind:?}");
        }
        let slugs: std::collections::BTreeSet<_> = Kind::ALL.iter().map(|k| k.slug()).collect();
        assert_eq!(slugs.len(), Kind::ALL.len(), "slugs are distinct");
        assert_eq!(page.matches("\n## ").count(), Kind::ALL.len(), "no described type is unused");
    }
}
