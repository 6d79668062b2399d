//! Requests an operator asks this deployment to make, each through the Gateway's address guard
//! and host allowlist, recorded before it is made, ten a minute per zone together:
//! - `POST /v1/zones/{zone}/resources/{id}/test` and `…/providers/{id}/test`: can it reach the
//!   resource's upstream, or an OAuth provider's token endpoint, right now? One `HEAD` without
//!   any credential; any HTTP answer counts as reachable.
//! - `POST /v1/zones/{zone}/providers/discovery` (`{issuer}`): the issuer's OpenID Connect
//!   discovery document, checked to describe that issuer, and the provider configuration it
//!   suggests.

use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use caracal_store::now_ms;
use serde_json::{Value, json};

use super::providers::live_provider;
use super::resources::live_resource;
use super::{Change, timestamp};
use crate::auth::Access;
use crate::error::ApiError;
use crate::gateway::upstream::check_url;
use crate::state::RoleState;

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route(
            "/v1/zones/{zone_id}/resources/{id}/test",
            post(test_resource),
        )
        .route(
            "/v1/zones/{zone_id}/providers/{id}/test",
            post(test_provider),
        )
        .route("/v1/zones/{zone_id}/providers/discovery", post(discover))
}

const TESTS_PER_MINUTE: u64 = 10;
const TEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_DISCOVERY_BYTES: usize = 64 * 1024;

async fn test_resource(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let resource = live_resource(&state, &zone_id, &id).await?;
    if resource.upstream_url.is_empty() {
        return Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            format!("resource `{id}` has no upstream to reach"),
        ));
    }
    let target = Target {
        zone_id: &zone_id,
        action: "resource.test",
        entity_type: "resource",
        id: &id,
        url: &resource.upstream_url,
    };
    test(&state, &caller, request_id, target).await
}

async fn test_provider(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let provider = live_provider(&state, &zone_id, &id).await?;
    let config: Value = serde_json::from_str(&provider.config).unwrap_or(Value::Null);
    let token_url = match (
        provider.kind.as_str(),
        config.get("token_url").and_then(Value::as_str),
    ) {
        ("oauth2_client_credentials", Some(url)) => url.to_owned(),
        (kind, _) => {
            return Err(ApiError::with_description(
                ErrorCode::InvalidRequest,
                format!("a `{kind}` provider has no endpoint to test; only OAuth providers do"),
            ));
        }
    };
    let target = Target {
        zone_id: &zone_id,
        action: "provider.test",
        entity_type: "provider",
        id: &id,
        url: &token_url,
    };
    test(&state, &caller, request_id, target).await
}

struct Target<'a> {
    zone_id: &'a str,
    action: &'static str,
    entity_type: &'static str,
    id: &'a str,
    url: &'a str,
}

async fn test(
    state: &RoleState,
    caller: &crate::auth::AdminCaller,
    request_id: Option<Extension<RequestId>>,
    target: Target<'_>,
) -> Result<Response, ApiError> {
    if let Some(refused) = budget_and_record(state, caller, request_id, &target).await? {
        return Ok(refused);
    }
    let started = Instant::now();
    let outcome = probe(target.url, &state.shared.upstream_host_allowlist).await;
    let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let (reachable, status, error, detail) = match outcome {
        Ok(status) => (true, Some(status), None, None),
        Err((code, detail)) => (false, None, Some(code), Some(detail)),
    };
    Ok(Json(json!({
        "id": target.id,
        "url": target.url,
        "reachable": reachable,
        "status": status,
        "error": error,
        "detail": detail,
        "latency_ms": latency_ms,
        "checked_at": timestamp(now_ms()),
    }))
    .into_response())
}

/// The zone's budget of outbound requests (the answer to give instead when it is spent), then
/// the request recorded.
async fn budget_and_record(
    state: &RoleState,
    caller: &crate::auth::AdminCaller,
    request_id: Option<Extension<RequestId>>,
    target: &Target<'_>,
) -> Result<Option<Response>, ApiError> {
    let bucket = format!("outbound-checks:{}", target.zone_id);
    if let Some(refused) = crate::auth::spend_budget(state, &bucket, TESTS_PER_MINUTE).await? {
        return Ok(Some(refused));
    }
    let event = super::audit_event(
        caller,
        request_id.as_deref(),
        Change {
            zone_id: target.zone_id,
            action: target.action,
            entity_type: target.entity_type,
            entity_id: target.id,
            fields: Vec::new(),
        },
    );
    super::record_now(state, event).await?;
    Ok(None)
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscoveryRequest {
    issuer: String,
}

async fn discover(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: DiscoveryRequest = super::json(&raw)?;
    let issuer = request.issuer.trim_end_matches('/');
    if super::https_or_loopback(issuer).is_none_or(|uri| uri.query().is_some()) {
        return Err(super::invalid_body(
            "issuer",
            "must be an https URL (http only on loopback) without query or fragment",
        ));
    }
    let url = format!("{issuer}/.well-known/openid-configuration");
    let target = Target {
        zone_id: &zone_id,
        action: "provider.discovery",
        entity_type: "provider",
        id: issuer,
        url: &url,
    };
    if let Some(refused) = budget_and_record(&state, &caller, request_id, &target).await? {
        return Ok(refused);
    }
    let failed = |why: String| {
        ApiError::with_description(ErrorCode::DiscoveryFailed, format!("{url}: {why}"))
    };
    let document = crate::gateway::upstream::fetch_json(
        &url,
        None,
        &state.shared.upstream_host_allowlist,
        MAX_DISCOVERY_BYTES,
        TEST_TIMEOUT,
    )
    .await
    .map_err(failed)?;
    let text = |key: &str| document.get(key).and_then(Value::as_str).map(str::to_owned);
    if text("issuer")
        .as_deref()
        .map(|named| named.trim_end_matches('/'))
        != Some(issuer)
    {
        return Err(failed("the document names another issuer".into()));
    }
    let token_endpoint = text("token_endpoint")
        .filter(|endpoint| endpoint.starts_with("https://") || endpoint.starts_with("http://"))
        .ok_or_else(|| failed("the document has no http(s) token_endpoint".into()))?;
    let listed = |key: &str| document.get(key).filter(|value| value.is_array()).cloned();
    Ok(Json(json!({
        "issuer": text("issuer"),
        "token_endpoint": token_endpoint,
        "authorization_endpoint": text("authorization_endpoint"),
        "jwks_uri": text("jwks_uri"),
        "scopes_supported": listed("scopes_supported"),
        "grant_types_supported": listed("grant_types_supported"),
        "token_endpoint_auth_methods_supported": listed("token_endpoint_auth_methods_supported"),
        // What an `oauth2_client_credentials` provider needs from it; the client's id and
        // secret are the operator's to add.
        "suggested_config": { "token_url": token_endpoint },
    }))
    .into_response())
}

/// The status of a credential-less `HEAD` to `url`, or why none came: a stable code and a
/// description.
async fn probe(url: &str, allowlist: &[String]) -> Result<u16, (&'static str, String)> {
    let uri = check_url(url, allowlist)
        .await
        .map_err(|error| ("upstream_not_addressable", error.to_string()))?;
    let client = crate::gateway::upstream_client()
        .map_err(|error| ("upstream_unreachable", error.to_string()))?;
    let request = http::Request::head(uri)
        .body(http_body_util::Limited::new(axum::body::Body::empty(), 0))
        .map_err(|error| ("upstream_not_addressable", error.to_string()))?;
    match tokio::time::timeout(TEST_TIMEOUT, client.request(request)).await {
        Ok(Ok(response)) => Ok(response.status().as_u16()),
        Ok(Err(error)) => Err(("upstream_unreachable", error.to_string())),
        Err(_) => Err((
            "upstream_timeout",
            format!("no answer within {} s", TEST_TIMEOUT.as_secs()),
        )),
    }
}
