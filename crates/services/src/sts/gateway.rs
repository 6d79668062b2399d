//! The Gateway's re-exchange: a `use=gateway` mandate, presented once by the Gateway on an
//! HMAC-signed call, becomes a `use=resource` mandate for one resource plus the directive
//! telling the Gateway how to reach the upstream and which credential to inject.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use caracal_bus::ReplayNamespace;
use caracal_policy::{Flow, Verdict};
use caracal_store::{Resource, now_ms};
use http::{HeaderMap, StatusCode};

use super::exchange::{
    ACCESS_TOKEN, Ask, DEFAULT_TTL, Issue, Issued, Received, answer, check_subject, delegation,
    issue, record_all, verify_subject,
};
use super::{Sts, TokenError};
use crate::state::RoleState;
use crate::wire::{TokenResponse, Upstream};

use crate::evidence::Pending;
use crate::gateway_sts::{Exchanged, GatewayCall, Refusal};
pub use crate::gateway_sts::{
    KEY_LABEL, MAX_SKEW_SECONDS, NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, signature,
};

/// How long a nonce is remembered: past the skew window on both sides.
const NONCE_TTL: Duration = Duration::from_secs(120);

/// Any of the three headers makes it a gateway call, which must then verify.
pub fn is_gateway_call(headers: &HeaderMap) -> bool {
    [TIMESTAMP_HEADER, NONCE_HEADER, SIGNATURE_HEADER]
        .iter()
        .any(|name| headers.contains_key(*name))
}

/// Verifies the call's signature, its time and that its nonce is new. Every failure is 401
/// `access_denied`; a nonce registry that cannot answer refuses with 503.
pub(super) async fn authenticate(
    state: &RoleState,
    sts: &Sts,
    request_id: &str,
    received: &Received,
) -> Result<(), TokenError> {
    let refused = |why: &str| {
        TokenError::unauthenticated(format!("invalid gateway exchange signature ({why})"))
    };
    let header = |name: &str| {
        received
            .parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
    };
    let (timestamp, nonce, presented) = (
        header(TIMESTAMP_HEADER),
        header(NONCE_HEADER),
        header(SIGNATURE_HEADER),
    );
    if timestamp.is_empty() || nonce.is_empty() || nonce.len() > 128 || presented.is_empty() {
        return Err(refused("missing headers"));
    }
    let expected = signature(
        &sts.gateway_key,
        timestamp,
        nonce,
        received.parts.method.as_str(),
        received.parts.uri.path(),
        &received.body,
    );
    if aws_lc_rs::constant_time::verify_slices_are_equal(expected.as_bytes(), presented.as_bytes())
        .is_err()
    {
        return Err(refused("signature"));
    }
    let sent: i64 = timestamp.parse().map_err(|_| refused("timestamp"))?;
    if (now_ms() / 1000 - sent).abs() > MAX_SKEW_SECONDS {
        return Err(refused("clock skew"));
    }
    if received.form.gateway_request_id.as_deref() != Some(request_id) {
        return Err(refused("gateway_request_id does not match X-Request-Id"));
    }
    match state
        .shared
        .bus
        .replay
        .claim_once(ReplayNamespace::GatewayNonce, nonce, NONCE_TTL)
        .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err(refused("replayed nonce")),
        Err(error) => {
            tracing::warn!(%error, "nonce registry unavailable: gateway exchange refused");
            Err(TokenError::unavailable(
                "the replay registry is unavailable",
            ))
        }
    }
}

/// The form of a Gateway's call, as the signed HTTP exchange sends it.
fn form_of(call: &GatewayCall, request_id: &str) -> super::form::TokenForm {
    super::form::TokenForm {
        grant_type: Some(crate::gateway_sts::TOKEN_EXCHANGE.to_owned()),
        zone_id: Some(call.zone_id.clone()),
        application_id: Some(call.application_id.clone()),
        resources: vec![call.resource.clone()],
        subject_token: Some(call.token.clone()),
        subject_token_type: Some(ACCESS_TOKEN.to_owned()),
        request_method: Some(call.method.clone()),
        request_path: Some(call.path.clone()),
        gateway_request_id: Some(request_id.to_owned()),
        ..super::form::TokenForm::default()
    }
}

#[async_trait::async_trait]
impl crate::gateway_sts::InProcessExchange for Sts {
    async fn exchange(
        &self,
        state: &RoleState,
        request_id: &str,
        call: &GatewayCall,
    ) -> Result<Exchanged, Refusal> {
        if state.shared.is_draining() {
            return Err(TokenError::unavailable("the STS is shutting down").into());
        }
        let form = form_of(call, request_id);
        let ask = super::exchange::ask(&form)?;
        let (answer, evidence) =
            reexchange(state, self, request_id, &form, &ask, call.verified.as_ref()).await?;
        Ok(Exchanged {
            answer,
            evidence: Some(evidence),
        })
    }
}

/// The re-exchange itself, after [`authenticate`]. `verified`: the claims an in-process Gateway
/// verified and whose `jti` it spent (see [`GatewayCall::verified`]). The answer comes with its
/// evidence not yet durable: the caller waits for it before reporting.
pub(super) async fn reexchange(
    state: &RoleState,
    sts: &Sts,
    request_id: &str,
    form: &super::form::TokenForm,
    ask: &Ask,
    verified: Option<&crate::wire::MandateClaims>,
) -> Result<(TokenResponse, Pending), TokenError> {
    let store = state.shared.store.as_ref();
    let (Some(token), Some(ACCESS_TOKEN)) = (
        form.subject_token.as_deref(),
        form.subject_token_type.as_deref(),
    ) else {
        return Err(TokenError::malformed(
            "a gateway exchange presents a subject_token access token",
        ));
    };
    if !ask.scopes.is_empty() {
        return Err(TokenError::malformed(
            "a gateway exchange inherits the mandate's scope; send none",
        ));
    }
    let [identifier] = ask.resources.as_slice() else {
        return Err(TokenError::malformed(
            "a gateway exchange names exactly one resource",
        ));
    };
    let presented = match verified {
        // Signed by the zone's keys and already spent by the Gateway: the other subject checks.
        Some(claims) if !claims.jti.is_empty() => {
            check_subject(state, sts, &ask.zone_id, claims, "gateway").await?;
            std::borrow::Cow::Borrowed(claims)
        }
        _ => {
            let presented = verify_subject(state, sts, &ask.zone_id, token, "gateway").await?;
            // A gateway mandate is one-shot: the first presentation spends it.
            match state
                .shared
                .bus
                .replay
                .claim_once(
                    ReplayNamespace::Jti,
                    &presented.jti,
                    Duration::from_secs(3600),
                )
                .await
            {
                Ok(true) => std::borrow::Cow::Owned(presented),
                Ok(false) => return Err(TokenError::bad_subject("token replay detected")),
                Err(error) => {
                    tracing::warn!(%error, "JTI registry unavailable: gateway exchange refused");
                    return Err(TokenError::unavailable(
                        "the replay registry is unavailable",
                    ));
                }
            }
        }
    };
    let (Some(session_id), Some(edge_id)) =
        (&presented.agent_session_id, &presented.delegation_edge_id)
    else {
        return Err(TokenError::denied("the mandate carries no delegation"));
    };
    let application = store
        .get_application(&ask.zone_id, &presented.client_id)
        .await?
        .filter(|app| app.active(now_ms()))
        .ok_or_else(|| TokenError::denied("the mandate's application is no longer active"))?;
    let scopes: Vec<String> = presented
        .scope
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let now = now_ms();
    // The delegation, re-checked against live state as at the mint.
    let delegation = delegation(
        store,
        &ask.zone_id,
        &application,
        session_id,
        edge_id,
        &scopes,
        ask.ttl,
        now,
    )
    .await?;
    let resource = store
        .find_resource(&ask.zone_id, identifier)
        .await?
        .filter(|resource| resource.archived_at_ms.is_none())
        .ok_or_else(|| TokenError::denied("policy denied (resource_not_granted)"))?;
    if !presented
        .target
        .as_ref()
        .is_some_and(|target| target.contains(&resource.identifier))
    {
        return Err(TokenError::denied(
            "policy denied (mandate_target_mismatch)",
        ));
    }
    if !delegation.allows(&resource) {
        return Err(TokenError::denied(format!(
            "resource `{}` is outside the delegation",
            resource.identifier
        )));
    }
    operation_floor(&resource, form, &scopes)?;
    let loaded = sts.policies.get(&ask.zone_id);
    let decision = caracal_policy::decide(
        loaded.as_deref().map(|loaded| &loaded.bundle),
        &caracal_policy::Request {
            flow: Flow::Use,
            application_id: application.id.clone(),
            resource: resource.identifier.clone(),
            scopes: scopes.clone(),
            labels: delegation.target.labels.clone(),
            edge_scopes: Some(delegation.leaf.scopes.clone()),
            session: true,
            subject: true,
            target: presented.target.clone().unwrap_or_default(),
        },
    );
    let event = super::exchange::exchange_event(
        ask,
        request_id,
        &application,
        &resource.identifier,
        &decision,
        loaded.as_deref(),
        form,
    );
    if decision.decision != Verdict::Allow {
        record_all(state, vec![event]).await?;
        return Err(TokenError::denied(format!(
            "policy denied ({})",
            decision.reason().unwrap_or("no_rule_matched")
        )));
    }
    super::exchange::within_mint_limit(
        state,
        sts,
        &ask.zone_id,
        &resource.identifier,
        &application.id,
    )
    .await?;
    let upstream = upstream(
        state,
        sts,
        &resource,
        &delegation.target.authority_record_id,
    )
    .await?;

    let ttl = ask
        .ttl
        .unwrap_or(DEFAULT_TTL)
        .min(delegation.ttl_bound_seconds);
    if ttl <= 0 {
        return Err(TokenError::denied("the delegation has no lifetime left"));
    }
    // In process (`verified`), a mandate the Gateway will not send upstream is not minted: no
    // signature and no authority record for a token that would never exist outside this call.
    // Over HTTP the answer always carries one, as the wire contract says.
    if verified.is_some() && !upstream.carries_mandate() {
        let evidence = state.shared.evidence.enqueue(event).await?;
        let answer = answer(
            String::new(),
            ttl,
            presented.scope.clone(),
            vec![resource.identifier.clone()],
            Some(BTreeMap::from([(resource.identifier, upstream)])),
        );
        return Ok((answer, evidence));
    }
    let Issued {
        token,
        record,
        scope,
    } = issue(
        state,
        sts,
        Issue {
            zone_id: &ask.zone_id,
            sid: uuid::Uuid::now_v7().to_string(),
            root_sid: Some(presented.root_sid.clone()),
            parent_id: Some(presented.sid.clone()),
            sub: &presented.sub,
            sub_type: &presented.sub_type,
            client_id: &application.id,
            aud: vec![resource.identifier.clone()],
            use_: "resource",
            scope: presented.scope.clone(),
            target: vec![resource.identifier.clone()],
            agent_session_id: Some(session_id.clone()),
            delegation: Some(&delegation),
            ttl,
            now,
        },
    )
    .await?;
    // The record is written before the mandate leaves; the event only handed over (the
    // caller waits for it before it reports anything, see `Pending`).
    let (written, evidence) = tokio::join!(
        sts.authority.write(record),
        state.shared.evidence.enqueue(event)
    );
    written?;
    let evidence = evidence?;
    let answer = answer(
        token,
        ttl,
        scope,
        vec![resource.identifier.clone()],
        Some(BTreeMap::from([(resource.identifier, upstream)])),
    );
    Ok((answer, evidence))
}

/// For a resource whose operations are enforced, `(METHOD, path)` must be a declared operation
/// whose scope the mandate holds.
fn operation_floor(
    resource: &Resource,
    form: &super::form::TokenForm,
    scopes: &[String],
) -> Result<(), TokenError> {
    if resource.operation_enforcement != "enforced" {
        return Ok(());
    }
    #[derive(serde::Deserialize)]
    struct Operation {
        method: String,
        path: String,
        scope: String,
    }
    let operations: Vec<Operation> = serde_json::from_str(&resource.operations).unwrap_or_default();
    let (method, path) = (
        form.request_method.as_deref().unwrap_or_default(),
        form.request_path.as_deref().unwrap_or_default(),
    );
    let permitted = operations.iter().any(|operation| {
        operation.method.eq_ignore_ascii_case(method)
            && operation.path == path
            && scopes.contains(&operation.scope)
    });
    if permitted {
        Ok(())
    } else {
        Err(TokenError::new(
            StatusCode::FORBIDDEN,
            "operation_not_permitted",
            format!(
                "`{method} {path}` is not a permitted operation of `{}`",
                resource.identifier
            ),
        ))
    }
}

/// No connection to inject is a refusal of the call (403); a connection the STS cannot read
/// or refresh is the upstream's failure (502). Either way nothing is sent.
fn connection_refusal(error: crate::connections::ConnectionError) -> TokenError {
    use crate::connections::ConnectionError;
    match error {
        ConnectionError::Missing { .. }
        | ConnectionError::Revoked { .. }
        | ConnectionError::Expired => TokenError::denied(format!("connection_required: {error}")),
        ConnectionError::Store(error) => error.into(),
        other => TokenError::new(
            StatusCode::BAD_GATEWAY,
            "http_request_failed",
            other.to_string(),
        ),
    }
}

/// How the Gateway reaches `resource` and what it injects, from the resource's provider, for
/// a call by the session of authority record `acting_record` (whose subject's connection an
/// authorization-code provider injects).
async fn upstream(
    state: &RoleState,
    sts: &Sts,
    resource: &Resource,
    acting_record: &str,
) -> Result<Upstream, TokenError> {
    let provider = state
        .shared
        .store
        .get_provider(&resource.zone_id, &resource.provider_id)
        .await?
        .filter(|provider| provider.archived_at_ms.is_none())
        .ok_or_else(|| {
            TokenError::new(
                StatusCode::BAD_GATEWAY,
                "http_request_failed",
                "the resource's credential provider is gone",
            )
        })?;
    upstream_of(state, sts, resource, &provider, Some(acting_record)).await
}

/// The directive for `resource` behind `provider` (live, already read): the provider's
/// credential in clear (for client credentials, the client secret and token endpoint).
pub(super) async fn upstream_of(
    state: &RoleState,
    sts: &Sts,
    resource: &Resource,
    provider: &caracal_store::Provider,
    acting_record: Option<&str>,
) -> Result<Upstream, TokenError> {
    let config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&provider.config).unwrap_or_default();
    let text = |key: &str| {
        config
            .get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let secrets = crate::provider_secrets::open(&state.shared, provider)
        .await
        .map_err(|_| {
            TokenError::new(
                StatusCode::BAD_GATEWAY,
                "http_request_failed",
                "the provider credential is unavailable",
            )
        })?;
    let mut upstream = Upstream {
        url: resource.upstream_url.clone(),
        auth_mode: "none".to_owned(),
        auth_location: None,
        auth_header: None,
        query_param_name: None,
        auth_scheme: None,
        allowed_token_hosts: config
            .get("allowed_token_hosts")
            .and_then(|hosts| serde_json::from_value(hosts.clone()).ok()),
        provider_token: None,
        provider_id: None,
        forward_caracal_identity: config
            .get("forward_caracal_identity")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
        token_url: None,
        client_id: None,
        token_scope: None,
        connection_id: None,
        expires_at: None,
    };
    match provider.kind.as_str() {
        "none" => {}
        "caracal_mandate" => upstream.auth_mode = "caracal_jwt".to_owned(),
        "api_key" => {
            upstream.auth_mode = "provider_apikey".to_owned();
            upstream.provider_id = Some(provider.id.clone());
            let query = text("query_param_name");
            upstream.auth_location = Some(text("auth_location").unwrap_or_else(|| {
                if query.is_some() {
                    "query".to_owned()
                } else {
                    "header".to_owned()
                }
            }));
            upstream.auth_header = text("header_name")
                .or_else(|| text("header"))
                .or_else(|| text("auth_header"));
            upstream.query_param_name = query;
            upstream.provider_token = secrets.get("api_key").cloned();
        }
        "bearer_token" => {
            upstream.auth_mode = "provider_oauth".to_owned();
            upstream.provider_id = Some(provider.id.clone());
            upstream.auth_scheme = Some("Bearer".to_owned());
            upstream.provider_token = secrets
                .get("bearer_token")
                .or_else(|| secrets.get("token"))
                .cloned();
        }
        "http_basic" => {
            upstream.auth_mode = "provider_oauth".to_owned();
            upstream.provider_id = Some(provider.id.clone());
            upstream.auth_scheme = Some("Basic".to_owned());
            let pair = format!(
                "{}:{}",
                text("username").unwrap_or_default(),
                secrets.get("password").cloned().unwrap_or_default()
            );
            upstream.provider_token = Some(base64::engine::general_purpose::STANDARD.encode(pair));
        }
        "oauth2_authorization_code" => {
            // On whose behalf: the subject of the acting session's authority record (read
            // only for this kind, to keep every other call's path as it was).
            // A session whose record is gone has no subject to act for: refused, never
            // served the zone's shared connection instead.
            let subject = match acting_record {
                Some(record_id) => Some(
                    state
                        .shared
                        .store
                        .get_authority_record(&resource.zone_id, record_id)
                        .await?
                        .map(|record| record.subject_id)
                        .ok_or_else(|| {
                            TokenError::denied("the acting session's authority record is gone")
                        })?,
                ),
                None => None,
            };
            let subject = subject.as_deref();
            let (token, connection) = crate::connections::access_token(
                &state.shared,
                provider,
                &config,
                &secrets,
                subject,
            )
            .await
            .map_err(|error| {
                if matches!(error, crate::connections::ConnectionError::Refresh(_)) {
                    sts.connection_refresh_failures.inc();
                }
                connection_refusal(error)
            })?;
            upstream.auth_mode = "provider_oauth".to_owned();
            upstream.provider_id = Some(provider.id.clone());
            upstream.auth_scheme = Some("Bearer".to_owned());
            upstream.provider_token = Some(token);
            upstream.expires_at = connection.expires_at_ms.map(crate::wire::rfc3339);
            upstream.connection_id = Some(connection.id);
        }
        // Client-credentials tokens are fetched and cached by the Gateway.
        _ => {
            upstream.auth_mode = "provider_oauth".to_owned();
            upstream.provider_id = Some(provider.id.clone());
            upstream.auth_scheme = Some("Bearer".to_owned());
            upstream.token_url = text("token_url");
            upstream.client_id = text("client_id");
            upstream.token_scope = text("scope");
            upstream.provider_token = secrets.get("client_secret").cloned();
        }
    }
    Ok(upstream)
}
