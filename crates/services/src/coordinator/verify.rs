//! `POST /v1/verify`: a mandate checked for a service that would rather not hold JWKS and
//! revocation state itself. The signature against the zone's keys, lifetime and issuer, then
//! live state — the authority record, the application, and the agent session and delegation
//! edge it names — and the caller's requirements (a scope, an agent session, a delegation).
//! The answer is `{valid: true, claims}` or `{valid: false, error, error_description}`: a
//! verdict, not a failure of the call. Sixty verifications a minute per client address.

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use caracal_core::ErrorCode;
use caracal_store::now_ms;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::state::RoleState;
use crate::wire::MandateClaims;

const PER_MINUTE: u64 = 60;
const MAX_BODY: usize = 16 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyRequest {
    token: Option<String>,
    /// `Bearer <token>`, as a resource server received it.
    authorization: Option<String>,
    zone_id: String,
    required_scope: Option<String>,
    #[serde(default)]
    require_session: bool,
    #[serde(default)]
    require_delegation: bool,
}

/// Why a mandate does not verify: a stable code and what failed.
struct Invalid(&'static str, String);

fn invalid(code: &'static str, description: impl Into<String>) -> Invalid {
    Invalid(code, description.into())
}

pub(super) async fn verify(
    State(state): State<RoleState>,
    address: Option<Extension<ConnectInfo<std::net::SocketAddr>>>,
    raw: Bytes,
) -> Result<Response, ApiError> {
    let client = address.map_or_else(|| "unknown".to_owned(), |info| info.0.0.ip().to_string());
    let bucket = format!("verify:{client}");
    if let Some(refused) = crate::auth::spend_budget(&state, &bucket, PER_MINUTE).await? {
        return Ok(refused);
    }
    if raw.len() > MAX_BODY {
        return Err(super::invalid("the body is larger than 16 KiB"));
    }
    let request: VerifyRequest = serde_json::from_slice(&raw)
        .map_err(|error| super::invalid(format!("invalid body: {error}")))?;
    if !super::valid_id(&request.zone_id) {
        return Err(super::invalid("zone_id must be [A-Za-z0-9_.-:]{1,128}"));
    }
    let token = match (&request.token, &request.authorization) {
        (Some(token), None) => token.trim(),
        (None, Some(header)) => header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .ok_or_else(|| super::invalid("authorization must be `Bearer <token>`"))?,
        _ => {
            return Err(super::invalid(
                "give exactly one of token and authorization",
            ));
        }
    };
    if token.is_empty() {
        return Err(super::invalid("the token is empty"));
    }
    Ok(match check(&state, &request, token).await? {
        Ok(claims) => Json(json!({"valid": true, "claims": claims})).into_response(),
        Err(Invalid(code, description)) => Json(json!({
            "valid": false,
            "error": code,
            "error_description": description,
        }))
        .into_response(),
    })
}

/// The claims if the mandate verifies and meets the request; the store failing is the call's
/// error (503), never a verdict either way.
async fn check(
    state: &RoleState,
    request: &VerifyRequest,
    token: &str,
) -> Result<Result<MandateClaims, Invalid>, ApiError> {
    let Some(coordinator) = state.coordinator.as_ref() else {
        return Err(ApiError::new(ErrorCode::InternalError));
    };
    let store = state.shared.store.as_ref();
    if crate::mandate::claimed_zone(token).as_deref() != Some(request.zone_id.as_str()) {
        return Ok(Err(invalid("invalid_token", "not a mandate of this zone")));
    }
    let keys = match coordinator
        .keys
        .zone(store, &state.shared.kek, &request.zone_id)
        .await
    {
        Ok(keys) => keys,
        Err(crate::keys::KeyError::Store(error)) => return Err(error.into()),
        Err(_) => return Ok(Err(invalid("invalid_token", "not a mandate of this zone"))),
    };
    let now = now_ms();
    let claims = match keys.verify(token, now).and_then(|claims| {
        crate::mandate::check_times(&claims, now / 1000)?;
        if claims.iss != coordinator.issuer {
            return Err(crate::mandate::MandateError::Issuer);
        }
        Ok(claims)
    }) {
        Ok(claims) => claims,
        Err(error) => return Ok(Err(invalid("invalid_token", error.to_string()))),
    };
    if claims.zone_id != request.zone_id {
        return Ok(Err(invalid(
            "zone_mismatch",
            "the mandate belongs to another zone",
        )));
    }
    let zone = &request.zone_id;
    let record_active = store
        .get_authority_record(zone, &claims.sid)
        .await?
        .is_some_and(|record| record.active(now));
    let application_active = store
        .get_application(zone, &claims.client_id)
        .await?
        .is_some_and(|application| application.active(now));
    if !record_active || !application_active {
        return Ok(Err(invalid(
            "identity_revoked",
            "its authority record or application is no longer active",
        )));
    }
    if let Some(edge_id) = &claims.delegation_edge_id
        && !store
            .get_delegation_edge(zone, edge_id)
            .await?
            .is_some_and(|edge| edge.live(now))
    {
        return Ok(Err(invalid(
            "delegation_revoked",
            "its delegation edge is no longer live",
        )));
    }
    if let Some(session_id) = &claims.agent_session_id
        && !store
            .get_session(zone, session_id)
            .await?
            .is_some_and(|session| session.live(now))
    {
        return Ok(Err(invalid(
            "session_inactive",
            "its agent session has ended",
        )));
    }
    if let Some(scope) = &request.required_scope
        && !claims
            .scope
            .as_deref()
            .is_some_and(|scopes| scopes.split(' ').any(|granted| granted == scope))
    {
        return Ok(Err(invalid(
            "missing_scope",
            format!("the mandate lacks `{scope}`"),
        )));
    }
    if request.require_session && claims.agent_session_id.is_none() {
        return Ok(Err(invalid(
            "session_required",
            "the mandate names no agent session",
        )));
    }
    if request.require_delegation && claims.delegation_edge_id.is_none() {
        return Ok(Err(invalid(
            "delegation_required",
            "the mandate names no delegation",
        )));
    }
    Ok(Ok(claims))
}
