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
use base64::Engine as _;

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
        .route(
            "/v1/zones/{zone_id}/provider-connections/oauth/callback",
            get(callback),
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Authorize {
    provider_id: String,
    #[serde(default)]
    subject_id: Option<String>,
}

/// What the browser carries from `authorize` to `callback`, sealed under the KEK (it can
/// neither read the PKCE verifier nor change the subject).
#[derive(Debug, serde::Serialize, Deserialize)]
struct OAuthState {
    zone_id: String,
    provider_id: String,
    subject_id: String,
    verifier: String,
    expires_at_ms: i64,
}

const STATE_PURPOSE: &str = "provider-connection-oauth-state";
const STATE_LIFETIME_MS: i64 = 10 * 60 * 1000;

/// An `oauth2_authorization_code` provider of the zone, with its configuration, or 400 naming
/// what it lacks for the browser flow.
async fn oauth_provider(
    state: &RoleState,
    zone_id: &str,
    provider_id: &str,
) -> Result<(caracal_store::Provider, serde_json::Map<String, Value>), ApiError> {
    let provider = super::providers::live_provider(state, zone_id, provider_id).await?;
    let config: serde_json::Map<String, Value> =
        serde_json::from_str(&provider.config).unwrap_or_default();
    let refused = |why: String| ApiError::with_description(ErrorCode::InvalidRequest, why);
    if provider.kind != "oauth2_authorization_code" {
        return Err(refused(
            "the browser flow needs an `oauth2_authorization_code` provider".into(),
        ));
    }
    for key in ["authorization_url", "redirect_uri"] {
        if config
            .get(key)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(refused(format!(
                "the provider's configuration has no `{key}`"
            )));
        }
    }
    Ok((provider, config))
}

/// `POST …/oauth/authorize` (`{provider_id, subject_id?}`): the URL to send the subject's
/// browser to (PKCE S256, a sealed `state` good for 10 minutes). The provider's configuration
/// names `authorization_url` and `redirect_uri` (this route's `…/oauth/callback` as the
/// browser reaches it), and may name `scope`.
async fn authorize(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: Authorize = json(&raw)?;
    let subject_id = request.subject_id.unwrap_or_else(|| SHARED.to_owned());
    if subject_id.is_empty() || subject_id.len() > 512 {
        return Err(invalid_body("subject_id", "1 to 512 bytes"));
    }
    let (provider, config) = oauth_provider(&state, &zone_id, &request.provider_id).await?;
    let text = |key: &str| config.get(key).and_then(Value::as_str).unwrap_or_default();
    let verifier = super::applications::random_secret("")?;
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(caracal_crypto::sha256(verifier.as_bytes()));
    let expires_at_ms = now_ms() + STATE_LIFETIME_MS;
    let sealed_state = serde_json::to_vec(&OAuthState {
        zone_id: zone_id.clone(),
        provider_id: provider.id.clone(),
        subject_id: subject_id.clone(),
        verifier,
        expires_at_ms,
    })
    .ok()
    .and_then(|plain| state.shared.kek.seal(STATE_PURPOSE, &plain).ok())
    .ok_or_else(|| ApiError::new(ErrorCode::InternalError))?;
    let mut query = vec![
        ("response_type", "code"),
        ("client_id", text("client_id")),
        ("redirect_uri", text("redirect_uri")),
        ("state", sealed_state.as_str()),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    if !text("scope").is_empty() {
        query.push(("scope", text("scope")));
    }
    let query =
        serde_urlencoded::to_string(&query).map_err(|_| ApiError::new(ErrorCode::InternalError))?;
    let base = text("authorization_url");
    let separator = if base.contains('?') { '&' } else { '?' };
    let event = super::audit_event(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "provider_connection.authorize",
            entity_type: "provider",
            entity_id: &provider.id,
            fields: vec!["subject_id"],
        },
    );
    super::record_now(&state, event).await?;
    Ok(Json(json!({
        "authorization_url": format!("{base}{separator}{query}"),
        "subject_id": subject_id,
        "provider_id": provider.id,
        "state_expires_at": timestamp(expires_at_ms),
    })))
}

#[derive(Debug, Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET …/oauth/callback?code=&state=`: where the provider sends the subject's browser back.
/// Public (the browser carries no token): the sealed `state` is the authority. The code is
/// exchanged at the provider's `token_url` with the PKCE verifier, and the tokens stored as
/// the subject's connection, recorded.
async fn callback(
    State(state): State<RoleState>,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let refused = |why: &str| ApiError::with_description(ErrorCode::InvalidRequest, why.to_owned());
    let query: CallbackQuery = serde_urlencoded::from_str(raw.as_deref().unwrap_or_default())
        .map_err(|_| refused("the callback's query is malformed"))?;
    if let Some(error) = query.error {
        return Err(refused(&format!(
            "the provider answered `{}`",
            error
                .chars()
                .filter(|c| !c.is_control())
                .take(100)
                .collect::<String>()
        )));
    }
    let (Some(code), Some(sealed)) = (query.code, query.state) else {
        return Err(refused("the callback needs `code` and `state`"));
    };
    let flow: OAuthState = state
        .shared
        .kek
        .open(STATE_PURPOSE, &sealed)
        .ok()
        .and_then(|plain| serde_json::from_slice(&plain).ok())
        .filter(|flow: &OAuthState| flow.zone_id == zone_id)
        .ok_or_else(|| refused("`state` is not one this deployment issued for this zone"))?;
    if flow.expires_at_ms <= now_ms() {
        return Err(refused("`state` has expired; start again"));
    }
    let (provider, config) = oauth_provider(&state, &zone_id, &flow.provider_id).await?;
    let secrets = crate::provider_secrets::open(&state.shared, &provider)
        .await
        .map_err(|_| ApiError::new(ErrorCode::InternalError))?;
    let text = |key: &str| config.get(key).and_then(Value::as_str).unwrap_or_default();
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", text("redirect_uri")),
        ("client_id", text("client_id")),
        ("code_verifier", flow.verifier.as_str()),
    ];
    if let Some(secret) = secrets.get("client_secret") {
        form.push(("client_secret", secret));
    }
    let form =
        serde_urlencoded::to_string(&form).map_err(|_| ApiError::new(ErrorCode::InternalError))?;
    let answer = crate::connections::token_endpoint(
        text("token_url"),
        form,
        &state.shared.upstream_host_allowlist,
    )
    .await
    .map_err(|why| {
        ApiError::with_description(
            ErrorCode::TokenExchangeFailed,
            format!("the provider's {why}"),
        )
    })?;
    let id = match state
        .shared
        .store
        .get_provider_connection(&zone_id, &flow.subject_id, &provider.id)
        .await?
    {
        Some(existing) => existing.id,
        None => new_id(),
    };
    let recorded = super::outbox_evidence(super::audit_event_by(
        format!("oauth:{}", flow.subject_id),
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "provider_connection.connected",
            entity_type: "provider_connection",
            entity_id: &id,
            fields: vec!["subject_id", "provider_id", "tokens"],
        },
    ))?;
    let now = now_ms();
    let connection = ProviderConnection {
        id,
        zone_id: zone_id.clone(),
        subject_id: flow.subject_id,
        provider_id: provider.id,
        status: "connected".into(),
        access_token_ref: None,
        refresh_token_ref: None,
        expires_at_ms: None,
        refreshed_at_ms: Some(now),
        created_at_ms: now,
    };
    let (connection, sealed) = crate::connections::with_tokens(&state.shared, connection, &answer)
        .map_err(|error| {
            ApiError::with_description(ErrorCode::TokenExchangeFailed, error.to_string())
        })?;
    state
        .shared
        .store
        .put_provider_connection(&connection, &sealed, &[recorded])
        .await?;
    Ok(Json(
        json!({"connected": true, "connection": body(&connection)}),
    ))
}
