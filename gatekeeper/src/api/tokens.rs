//! `/tokens`: the API's bearer tokens. Those read from files are listed; an admin may create
//! more here (only their hash is kept, in the store) and revoke them, effective at once.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    ApiError, ApiState, actor, body_as,
    objects::NameParam,
    problem::{
        BadRequest, BodyTooLarge, Conflict, Forbidden, InvalidPolicy, NotApplied, NotFound, Unauthorized,
        UnsupportedMediaType,
    },
};
use crate::control::auth::{Origin, Role};

/// A token gatekeeper accepts (never its secret).
#[derive(Serialize, ToSchema)]
pub struct TokenInfo {
    /// What the audit log records for the writes made with it.
    name: String,
    role: Role,
    /// `file`: read from a 0600 file named in the configuration; `api`: created here.
    origin: Origin,
}

/// A token to create.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// 1 to 64 letters, digits, `.`, `_`, `@` or `-`.
    name: String,
    role: Role,
}

/// A token just created: its secret is shown this once and kept nowhere.
#[derive(Serialize, ToSchema)]
pub struct CreatedToken {
    name: String,
    role: Role,
    /// The bearer token. Store it now: gatekeeper keeps only its hash.
    token: String,
}

/// Lists the tokens gatekeeper accepts.
#[utoipa::path(
    get, path = "/tokens", operation_id = "listTokens", tag = "tokens",
    responses((status = 200, description = "The tokens (names and roles, never secrets)", body = Vec<TokenInfo>), Unauthorized)
)]
pub async fn list_tokens(State(s): State<ApiState>) -> Json<Vec<TokenInfo>> {
    let list = s.credentials.list();
    Json(list.into_iter().map(|(name, role, origin)| TokenInfo { name, role, origin }).collect())
}

/// Creates a token; it is accepted at once and survives restarts.
#[utoipa::path(
    post, path = "/tokens", operation_id = "createToken", tag = "tokens",
    request_body(content = NewToken, content_type = "application/json"),
    responses(
        (status = 201, description = "The token, shown once", body = CreatedToken),
        BadRequest, Unauthorized, Forbidden, Conflict, BodyTooLarge, UnsupportedMediaType, InvalidPolicy, NotApplied
    )
)]
pub async fn create_token(
    State(s): State<ApiState>,
    ext: axum::http::Extensions,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let new: NewToken = body_as(&headers, &body)?;
    let (actor, name, role) = (actor(&ext), new.name.clone(), new.role);
    let token = s.with(move |c| c.create_token(&actor, &name, role)).await??;
    Ok((StatusCode::CREATED, Json(CreatedToken { name: new.name, role, token })).into_response())
}

/// Revokes a token created through the API: refused from the next request on.
#[utoipa::path(
    delete, path = "/tokens/{name}", operation_id = "revokeToken", tag = "tokens", params(NameParam),
    responses(
        (status = 204, description = "Revoked"),
        BadRequest, Unauthorized, Forbidden, NotFound, Conflict, NotApplied
    )
)]
pub async fn revoke_token(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    ext: axum::http::Extensions,
) -> Result<StatusCode, ApiError> {
    let actor = actor(&ext);
    s.with(move |c| c.revoke_token(&actor, &name)).await??;
    Ok(StatusCode::NO_CONTENT)
}
