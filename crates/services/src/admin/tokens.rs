//! `/v1/admin-tokens`: list, mint and revoke admin tokens. Global write tokens only; a minted
//! token is shown once and stored as its SHA-256.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use caracal_crypto::AdminToken;
use caracal_store::{AdminTokenRecord, NewAdminToken, TokenScope};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use super::{Change, evidence, invalid_body, json, list_query, live_zone, new_id, page, timestamp};
use crate::auth::{Access, authenticate};
use crate::error::ApiError;
use crate::ledger::SYSTEM_ZONE;
use crate::state::RoleState;
use crate::wire::{AdminTokenBody, Page};

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/admin-tokens", get(list).post(mint))
        .route("/v1/admin-tokens/rotate", post(rotate))
        .route("/v1/admin-tokens/{id}", delete(revoke))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MintToken {
    name: String,
    scope: String,
    zone_id: Option<String>,
    capability: Option<String>,
}

fn body(record: AdminTokenRecord, token: Option<String>) -> AdminTokenBody {
    let (scope, zone_id) = match record.scope {
        TokenScope::Global => ("global", None),
        TokenScope::Zone(zone) => ("zone", Some(zone)),
    };
    AdminTokenBody {
        id: record.id,
        name: record.name,
        scope,
        zone_id,
        capability: record.capabilities,
        created_by: record.created_by,
        created_at: timestamp(record.created_at_ms),
        revoked: record.revoked,
        token,
    }
}

async fn list(
    State(state): State<RoleState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<AdminTokenBody>>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Write, None)?;
    let query = list_query(raw.as_deref())?;
    let tokens = state.shared.store.list_admin_tokens().await?;
    Ok(Json(page(
        tokens,
        |token| (token.created_at_ms, token.id.clone()),
        &query,
        |token| body(token, None),
    )?))
}

async fn mint(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    raw: Bytes,
) -> Result<(StatusCode, Json<AdminTokenBody>), ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Write, None)?;
    let request: MintToken = json(&raw)?;
    let name = super::valid_name(&request.name)?;
    let capability = request.capability.unwrap_or_else(|| "write".to_owned());
    if !["read", "write", "approve"].contains(&capability.as_str()) {
        return Err(invalid_body("capability", "must be read, write or approve"));
    }
    let scope = match (request.scope.as_str(), request.zone_id) {
        ("global", None) => TokenScope::Global,
        ("zone", Some(zone_id)) if zone_id != SYSTEM_ZONE => {
            live_zone(&state, &caller, &zone_id, Access::Write).await?;
            TokenScope::Zone(zone_id)
        }
        ("global", Some(_)) => {
            return Err(invalid_body("zone_id", "a global token names no zone"));
        }
        ("zone", _) => return Err(invalid_body("zone_id", "a zone token names a live zone")),
        _ => return Err(invalid_body("scope", "must be global or zone")),
    };
    let token = AdminToken::generate().map_err(|_| ApiError::new(ErrorCode::InternalError))?;
    let id = format!("tok_{}", new_id().replace('-', ""));
    let audit_zone = match &scope {
        TokenScope::Global => SYSTEM_ZONE.to_owned(),
        TokenScope::Zone(zone) => zone.clone(),
    };
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &audit_zone,
            action: "admin_token.mint",
            entity_type: "admin_token",
            entity_id: &id,
            fields: vec!["name", "scope", "capability"],
        },
    )?;
    let new = NewAdminToken {
        id: id.clone(),
        name: name.clone(),
        digest: token.digest(),
        scope: scope.clone(),
        capabilities: capability.clone(),
        created_by: caller.actor(),
    };
    state
        .shared
        .store
        .insert_admin_token(&new, &[evidence])
        .await?;
    let minted = AdminTokenRecord {
        id,
        name,
        scope,
        capabilities: capability,
        created_by: new.created_by,
        revoked: false,
        created_at_ms: caracal_store::now_ms(),
    };
    Ok((
        StatusCode::CREATED,
        Json(body(minted, Some(token.expose().to_owned()))),
    ))
}

async fn revoke(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Write, None)?;
    let known = state
        .shared
        .store
        .list_admin_tokens()
        .await?
        .into_iter()
        .any(|token| token.id == id && !token.revoked);
    if !known {
        return Err(ApiError::with_description(
            ErrorCode::NotFound,
            format!("admin token `{id}` not found"),
        ));
    }
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: SYSTEM_ZONE,
            action: "admin_token.revoke",
            entity_type: "admin_token",
            entity_id: &id,
            fields: vec![],
        },
    )?;
    state
        .shared
        .store
        .revoke_admin_token(&id, &[evidence])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Rotates the caller's own token: a new one with the same name, scope and capabilities
/// replaces it in one transaction (audited); the new secret is shown once.
async fn rotate(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
) -> Result<(StatusCode, Json<AdminTokenBody>), ApiError> {
    let caller = authenticate(&state, &headers).await?;
    let current = state
        .shared
        .store
        .list_admin_tokens()
        .await?
        .into_iter()
        .find(|token| token.id == caller.token_id && !token.revoked)
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidAdminToken))?;
    let token = AdminToken::generate().map_err(|_| ApiError::new(ErrorCode::InternalError))?;
    let id = format!("tok_{}", new_id().replace('-', ""));
    let audit_zone = match &current.scope {
        TokenScope::Global => SYSTEM_ZONE.to_owned(),
        TokenScope::Zone(zone) => zone.clone(),
    };
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &audit_zone,
            action: "admin_token.rotate",
            entity_type: "admin_token",
            entity_id: &current.id,
            fields: vec!["token"],
        },
    )?;
    let new = NewAdminToken {
        id: id.clone(),
        name: current.name.clone(),
        digest: token.digest(),
        scope: current.scope.clone(),
        capabilities: current.capabilities.clone(),
        created_by: caller.actor(),
    };
    state
        .shared
        .store
        .rotate_admin_token(&current.id, &new, &[evidence])
        .await?;
    let rotated = AdminTokenRecord {
        id,
        name: new.name,
        scope: new.scope,
        capabilities: new.capabilities,
        created_by: new.created_by,
        revoked: false,
        created_at_ms: caracal_store::now_ms(),
    };
    Ok((
        StatusCode::CREATED,
        Json(body(rotated, Some(token.expose().to_owned()))),
    ))
}
