//! `/v1/zones/{zone}/provider-connections`: stored upstream accounts of a subject (or of the
//! zone, `caracal:shared`) at a provider. Tokens are sealed under the KEK in the same
//! transaction as the connection and never returned; revoking deletes them. The STS injects
//! them for `oauth2_authorization_code` providers (see [`crate::connections`]). The browser
//! flow that would obtain them is not offered: `…/oauth/authorize` answers 400 saying so, and
//! tokens obtained elsewhere are stored with `POST …/provider-connections`.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use caracal_store::{ProviderConnection, SealedSecret, now_ms};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Change, evidence, invalid_body, json, new_id, page, timestamp};
use crate::auth::Access;
use crate::error::ApiError;
use crate::state::RoleState;
use crate::wire::Page;

use crate::connections::SHARED;

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route(
            "/v1/zones/{zone_id}/provider-connections",
            get(list).post(create),
        )
        .route(
            "/v1/zones/{zone_id}/provider-connections/revoke",
            post(revoke),
        )
        .route(
            "/v1/zones/{zone_id}/provider-connections/oauth/authorize",
            post(authorize),
        )
}

fn body(connection: &ProviderConnection) -> Value {
    json!({
        "id": connection.id,
        "zone_id": connection.zone_id,
        "subject_id": connection.subject_id,
        "provider_id": connection.provider_id,
        "status": connection.status,
        "has_refresh_token": connection.refresh_token_ref.is_some(),
        "expires_at": connection.expires_at_ms.map(timestamp),
        "created_at": timestamp(connection.created_at_ms),
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    provider_id: Option<String>,
    subject_id: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<Value>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query: ListQuery = crate::api::query(raw.as_deref())?;
    let wanted =
        |value: &str, filter: &Option<String>| filter.as_deref().is_none_or(|f| f == value);
    let rows: Vec<ProviderConnection> = state
        .shared
        .store
        .list_provider_connections(&zone_id)
        .await?
        .into_iter()
        .filter(|c| {
            wanted(&c.provider_id, &query.provider_id)
                && wanted(&c.subject_id, &query.subject_id)
                && wanted(&c.status, &query.status)
        })
        .collect();
    let paging = super::ListQuery {
        limit: query.limit,
        cursor: query.cursor,
        status: None,
    };
    Ok(Json(page(
        rows,
        |c| (c.created_at_ms, c.id.clone()),
        &paging,
        |c| body(&c),
    )?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateConnection {
    #[serde(default)]
    subject_id: Option<String>,
    provider_id: String,
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    expires_at: Option<String>,
}

fn token(path: &str, token: &str) -> Result<(), ApiError> {
    if token.is_empty() || token.len() > 16 * 1024 || token.chars().any(char::is_control) {
        return Err(invalid_body(path, "must be 1 to 16384 printable bytes"));
    }
    Ok(())
}

fn sealed(
    state: &RoleState,
    zone_id: &str,
    secret_ref: String,
    value: &str,
) -> Result<SealedSecret, ApiError> {
    crate::connections::seal(&state.shared, zone_id, secret_ref, value)
        .map_err(|_| ApiError::new(ErrorCode::InternalError))
}

async fn create(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: CreateConnection = json(&raw)?;
    let subject_id = request.subject_id.unwrap_or_else(|| SHARED.to_owned());
    if subject_id.is_empty() || subject_id.len() > 512 {
        return Err(invalid_body("subject_id", "1 to 512 bytes"));
    }
    token("access_token", &request.access_token)?;
    if let Some(refresh) = &request.refresh_token {
        token("refresh_token", refresh)?;
    }
    let expires_at_ms = request
        .expires_at
        .as_deref()
        .map(|text| {
            humantime::parse_rfc3339_weak(text)
                .ok()
                .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
                .and_then(|since| i64::try_from(since.as_millis()).ok())
                .ok_or_else(|| invalid_body("expires_at", "must be an RFC 3339 time"))
        })
        .transpose()?;
    super::providers::live_provider(&state, &zone_id, &request.provider_id).await?;
    let id = match state
        .shared
        .store
        .get_provider_connection(&zone_id, &subject_id, &request.provider_id)
        .await?
    {
        Some(existing) => existing.id,
        None => new_id(),
    };
    let mut secrets = vec![sealed(
        &state,
        &zone_id,
        format!("connection/{id}/access_token"),
        &request.access_token,
    )?];
    if let Some(refresh) = &request.refresh_token {
        secrets.push(sealed(
            &state,
            &zone_id,
            format!("connection/{id}/refresh_token"),
            refresh,
        )?);
    }
    let now = now_ms();
    let connection = ProviderConnection {
        id: id.clone(),
        zone_id: zone_id.clone(),
        subject_id,
        provider_id: request.provider_id,
        status: "connected".into(),
        access_token_ref: secrets.first().map(|secret| secret.secret_ref.clone()),
        refresh_token_ref: secrets.get(1).map(|secret| secret.secret_ref.clone()),
        expires_at_ms,
        refreshed_at_ms: Some(now),
        created_at_ms: now,
    };
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "provider_connection.store",
            entity_type: "provider_connection",
            entity_id: &id,
            fields: vec!["subject_id", "provider_id", "tokens"],
        },
    )?;
    state
        .shared
        .store
        .put_provider_connection(&connection, &secrets, &[evidence])
        .await?;
    Ok((StatusCode::CREATED, Json(body(&connection))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeConnection {
    provider_id: String,
    #[serde(default)]
    subject_id: Option<String>,
}

async fn revoke(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: RevokeConnection = json(&raw)?;
    let subject_id = request.subject_id.unwrap_or_else(|| SHARED.to_owned());
    let store = state.shared.store.as_ref();
    let connection = store
        .get_provider_connection(&zone_id, &subject_id, &request.provider_id)
        .await?
        .ok_or_else(|| {
            ApiError::with_description(
                ErrorCode::NotFound,
                format!(
                    "no connection of `{subject_id}` to provider `{}`",
                    request.provider_id
                ),
            )
        })?;
    let evidence = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "provider_connection.revoke",
            entity_type: "provider_connection",
            entity_id: &connection.id,
            fields: vec!["status", "tokens"],
        },
    )?;
    store
        .revoke_provider_connection(&zone_id, &subject_id, &request.provider_id, &[evidence])
        .await?;
    Ok(Json(json!({
        "id": connection.id,
        "subject_id": subject_id,
        "provider_id": request.provider_id,
        "status": "revoked",
    })))
}

/// The browser authorization flow is not offered: refused after the caller's rights are
/// checked, so the answer leaks nothing.
async fn authorize(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    Err(ApiError::with_description(
        ErrorCode::InvalidRequest,
        "the OAuth authorization-code flow is not offered; store tokens with POST …/provider-connections",
    ))
}
