//! `POST /oauth/2/token`: transport rules, client authentication, the exchange classes, the
//! live delegation checks, the decision, and the mint.

use std::sync::Arc;

use axum::Extension;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use caracal_audit::Event;
use caracal_core::RequestId;
use caracal_policy::{Decision, Flow, Verdict};
use caracal_store::{
    Application, AuthorityRecord, DelegationEdge, Resource, Session, Store, now_ms,
};
use http::{HeaderValue, StatusCode};

use super::{ExchangeLabels, Sts, TokenError, form};
use crate::constraints::Constraints;
use crate::state::RoleState;
use crate::wire::{ChainHop, MandateClaims, TokenResponse};

/// The token endpoint's body limit.
pub const MAX_FORM_BYTES: usize = 64 * 1024;
pub(super) use crate::gateway_sts::ACCESS_TOKEN;
use crate::gateway_sts::TOKEN_EXCHANGE;
const ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
const LIFECYCLE: &str = "agent:lifecycle";
/// Mandate lifetime when none is asked for, and the caps with and without a subject token.
pub(super) const DEFAULT_TTL: i64 = 900;
const TTL_CAP: i64 = 3600;
const TTL_CAP_WITH_SUBJECT: i64 = 900;
use crate::constraints::MAX_HOPS;
/// Failed client authentications per application and minute before it is locked out.
const AUTH_FAILURES_PER_MINUTE: u32 = 60;

pub async fn token(
    State(state): State<RoleState>,
    request_id: Option<Extension<RequestId>>,
    request: Request,
) -> Response {
    let request_id = request_id.map(|id| id.to_string()).unwrap_or_default();
    let Some(sts) = state.sts.clone() else {
        return TokenError::internal().render(&request_id);
    };
    let mut class = "refused";
    let result = exchange(&state, &sts, &request_id, request, &mut class).await;
    let outcome = match &result {
        Ok(_) => "allow",
        Err(error) => error.code,
    };
    if let Some(metrics) = &state.metrics.sts {
        metrics
            .exchanges
            .get_or_create(&ExchangeLabels {
                class: class.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }
    match result {
        Ok(body) => {
            let mut response = axum::Json(body).into_response();
            let headers = response.headers_mut();
            headers.insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            );
            headers.insert(http::header::PRAGMA, HeaderValue::from_static("no-cache"));
            response
        }
        Err(error) => error.render(&request_id),
    }
}

/// A request that passed the transport rules: its head, raw body (gateway calls sign it) and
/// form.
pub(super) struct Received {
    pub parts: http::request::Parts,
    pub body: axum::body::Bytes,
    pub form: form::TokenForm,
}

/// The checks every token request passes before its fields mean anything.
async fn read_form(request: Request) -> Result<Received, TokenError> {
    let received = read_form_body(request).await?;
    if let Some(field) = received.form.refused_field {
        return Err(TokenError::malformed(format!("`{field}` is not supported")));
    }
    if received.form.grant_type.as_deref() != Some(TOKEN_EXCHANGE) {
        return Err(TokenError::malformed("unsupported grant_type"));
    }
    Ok(received)
}

/// The transport rules of the STS's form routes: no query, a form body of at most
/// [`MAX_FORM_BYTES`], strictly parsed.
pub(super) async fn read_form_body(request: Request) -> Result<Received, TokenError> {
    let (parts, body) = request.into_parts();
    if parts.uri.query().is_some() {
        return Err(TokenError::malformed("the STS's form routes take no query"));
    }
    let form_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|value| {
            value
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form_type {
        return Err(TokenError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "invalid_token",
            description: "the body must be application/x-www-form-urlencoded".to_owned(),
            retry_after: None,
            extra: None,
        });
    }
    let too_large = || TokenError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: "payload_too_large",
        description: format!("the body is larger than {MAX_FORM_BYTES} bytes"),
        retry_after: None,
        extra: None,
    };
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_FORM_BYTES as u64) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|error| {
            if over_limit(&error) {
                too_large()
            } else {
                TokenError::malformed("request body could not be read")
            }
        })?;
    let form = form::parse(&bytes).map_err(|error| TokenError::malformed(error.to_string()))?;
    Ok(Received {
        parts,
        body: bytes,
        form,
    })
}

/// Whether reading a body failed on its size limit (rather than on its sender or deadline).
fn over_limit(error: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if current.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = current.source();
    }
    false
}

/// What was asked, validated.
pub(super) struct Ask {
    pub zone_id: String,
    pub resources: Vec<String>,
    pub scopes: Vec<String>,
    pub ttl: Option<i64>,
}

pub(super) fn ask(form: &form::TokenForm) -> Result<Ask, TokenError> {
    let subject = form.subject_token.is_some();
    if subject != form.subject_token_type.is_some() {
        return Err(TokenError::malformed(
            "subject_token and subject_token_type come together",
        ));
    }
    let ttl = match form.ttl_seconds.as_deref() {
        None => None,
        Some(text) => {
            let ttl: i64 = text
                .parse()
                .map_err(|_| TokenError::malformed("ttl_seconds must be an integer"))?;
            let cap = if subject {
                TTL_CAP_WITH_SUBJECT
            } else {
                TTL_CAP
            };
            if ttl < 0 {
                return Err(TokenError::malformed("ttl_seconds must not be negative"));
            }
            if ttl > cap {
                return Err(TokenError::malformed(format!(
                    "ttl_seconds must be at most {cap}"
                )));
            }
            (ttl > 0).then_some(ttl)
        }
    };
    let mut resources = Vec::with_capacity(form.resources.len());
    for resource in &form.resources {
        let resource = resource.trim();
        if resource.is_empty() {
            return Err(TokenError::malformed("resource must not be empty"));
        }
        resources.push(resource.to_owned());
    }
    resources.sort();
    resources.dedup();
    if resources.is_empty() {
        return Err(TokenError::malformed("at least one resource is required"));
    }
    let zone_id = match form.zone_id.as_deref().map(str::trim) {
        Some(zone) if !zone.is_empty() => zone.to_owned(),
        // A control key's zone is its application's.
        _ if resources
            .iter()
            .all(|resource| resource == super::control::AUDIENCE) =>
        {
            String::new()
        }
        _ => return Err(TokenError::malformed("zone_id is required")),
    };
    let mut scopes: Vec<String> = form
        .scope
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    scopes.sort();
    scopes.dedup();
    Ok(Ask {
        zone_id,
        resources,
        scopes,
        ttl,
    })
}

async fn exchange(
    state: &RoleState,
    sts: &Arc<Sts>,
    request_id: &str,
    request: Request,
    class: &mut &'static str,
) -> Result<TokenResponse, TokenError> {
    if state.shared.is_draining() {
        return Err(TokenError::unavailable("the STS is shutting down"));
    }
    let received = read_form(request).await?;
    let ask = ask(&received.form)?;
    if state.shared.containment.fail_closed(&ask.zone_id) {
        let mut contained =
            TokenError::unavailable("an incident containment refuses protected traffic");
        contained.code = "contained";
        return Err(contained);
    }
    if super::gateway::is_gateway_call(&received.parts.headers) {
        *class = "gateway";
        super::gateway::authenticate(state, sts, request_id, &received).await?;
        let (answer, evidence) =
            super::gateway::reexchange(state, sts, request_id, &received.form, &ask, None).await?;
        evidence.durable().await?;
        return Ok(answer);
    }
    let form = received.form;
    let store = state.shared.store.as_ref();
    let application = authenticate(state, sts, &ask.zone_id, &form).await?;
    if ask
        .resources
        .iter()
        .any(|resource| resource == super::control::AUDIENCE)
    {
        *class = "control";
        let mut ask = ask;
        ask.zone_id.clone_from(&application.zone_id);
        return super::control::mint(state, sts, request_id, &form, &ask, &application).await;
    }

    if let Some(kind) = form.subject_token_type.as_deref() {
        if kind == ID_TOKEN {
            return Err(TokenError::malformed(
                "subject federation (id_token) is not offered by this STS",
            ));
        }
        if kind != ACCESS_TOKEN {
            return Err(TokenError::malformed("unsupported subject_token_type"));
        }
        // A valid session mandate is still no way in: resource exchanges go through the
        // Gateway, which signs its calls.
        let subject = form.subject_token.as_deref().unwrap_or_default();
        verify_subject(state, sts, &ask.zone_id, subject, "session").await?;
        return Err(TokenError::denied(
            "resource exchanges must use the Gateway",
        ));
    }

    let now = now_ms();
    let mut ttl = ask.ttl.unwrap_or(DEFAULT_TTL);
    let delegation = match (&form.agent_session_id, &form.delegation_edge_id) {
        (Some(session_id), Some(edge_id)) => {
            *class = "delegated";
            if ask.scopes.is_empty() {
                return Err(TokenError::malformed("a delegated mint needs scope"));
            }
            let delegation = delegation(
                store,
                &ask.zone_id,
                &application,
                session_id,
                edge_id,
                &ask.scopes,
                ask.ttl,
                now,
            )
            .await?;
            ttl = ttl.min(delegation.ttl_bound_seconds);
            if ttl <= 0 {
                return Err(TokenError::denied("the delegation has no lifetime left"));
            }
            Some(delegation)
        }
        (None, Some(_)) => {
            return Err(TokenError::denied(
                "delegation_edge_id needs agent_session_id",
            ));
        }
        (Some(session_id), None) => {
            *class = "bootstrap";
            let owned = store
                .get_session(&ask.zone_id, session_id)
                .await?
                .is_some_and(|session| {
                    session.application_id == application.id && session.live(now)
                });
            if !owned {
                return Err(TokenError::denied("agent session not active or not owned"));
            }
            None
        }
        (None, None) => {
            *class = "bootstrap";
            None
        }
    };
    if let Some(record_id) = &form.session_id {
        let record = store
            .get_authority_record(&ask.zone_id, record_id)
            .await?
            .filter(|record| {
                record.active(now)
                    && record.session_type == "application"
                    && record.subject_id == application.id
            });
        if record.is_none() {
            return Err(TokenError::denied(
                "authority record not active or not the caller's",
            ));
        }
    }

    let loaded = sts.policies.get(&ask.zone_id);
    let bundle = loaded.as_deref().map(|loaded| &loaded.bundle);
    let session_context = form.agent_session_id.is_some() || form.session_id.is_some();
    let mut granted = Vec::new();
    let mut events = Vec::new();
    let mut first_refusal: Option<String> = None;
    let mut gated_tiers: Vec<String> = Vec::new();
    for identifier in &ask.resources {
        let outcome = decide_resource(
            store,
            &ask,
            &application,
            identifier,
            delegation.as_ref(),
            bundle,
            session_context,
        )
        .await?;
        let (decision, refusal) = match outcome {
            Ok(decision) => (decision, None),
            Err((decision, description)) => (decision, Some(description)),
        };
        if refusal.is_none()
            && let Some(step_up) = &decision.step_up_required
        {
            gated_tiers.extend(step_up.tiers.iter().cloned());
        }
        events.push(exchange_event(
            &ask,
            request_id,
            &application,
            identifier,
            &decision,
            loaded.as_deref(),
            &form,
        ));
        match refusal {
            None => granted.push(identifier.clone()),
            Some(description) => {
                first_refusal.get_or_insert(description);
            }
        }
    }
    if granted.is_empty() {
        // Evidence before the answer, for refusals too.
        record_all(state, events).await?;
        return Err(TokenError::denied(
            first_refusal.unwrap_or_else(|| "policy denied (no_rule_matched)".to_owned()),
        ));
    }

    for resource in &granted {
        within_mint_limit(state, sts, &ask.zone_id, resource, &application.id).await?;
    }
    // A gated scope: the mint waits for a human decision, then spends it once.
    let mut approved = None;
    if !gated_tiers.is_empty() {
        let gate = super::approvals::gate(bundle, &gated_tiers)?;
        let binding = super::approvals::Binding {
            resources: &granted,
            scopes: &ask.scopes,
            principal: &application.id,
            authority_record: form.session_id.as_deref().unwrap_or_default(),
            session: form.agent_session_id.as_deref().unwrap_or_default(),
            delegation: form.delegation_edge_id.as_deref().unwrap_or_default(),
            policy_version: loaded
                .as_deref()
                .map_or("", |loaded| loaded.version_id.as_str()),
            manifest_sha256: loaded
                .as_deref()
                .map_or("", |loaded| loaded.manifest_sha256.as_str()),
        }
        .hex();
        let settled = super::approvals::settle(
            state,
            &ask.zone_id,
            &application.id,
            form.session_id.as_deref().unwrap_or_default(),
            form.approval_id.as_deref(),
            &binding,
            &gate,
            serde_json::json!({"resources": granted, "scopes": ask.scopes,
                "agent_session_id": form.agent_session_id, "delegation_edge_id": form.delegation_edge_id}),
            request_id,
        )
        .await;
        match settled {
            Ok(settled) => {
                let (approval_id, outcome) = match &settled {
                    super::approvals::Approved::Consume(hold) => (hold.id.as_str(), "consumed"),
                    super::approvals::Approved::Reissue { .. } => {
                        (form.approval_id.as_deref().unwrap_or_default(), "reissued")
                    }
                };
                note_approval(&mut events, approval_id, outcome);
                approved = Some(settled);
            }
            Err(answer) => {
                // The hold raised or found (`interaction_required`), or why the approval
                // presented does not count: the ledger links the request to its hold.
                let hold = answer
                    .extra
                    .as_ref()
                    .and_then(|extra| extra.get("approval_id"))
                    .and_then(serde_json::Value::as_str)
                    .or(form.approval_id.as_deref())
                    .unwrap_or_default()
                    .to_owned();
                note_approval(&mut events, &hold, answer.code);
                record_all(state, events).await?;
                return Err(answer);
            }
        }
    }
    let sid = match &approved {
        Some(super::approvals::Approved::Reissue { sid, expires_at_ms }) => {
            // The same record again: no longer than it has left.
            ttl = ttl.min((expires_at_ms - now) / 1000);
            if ttl <= 0 {
                return Err(super::approvals::consumed());
            }
            sid.clone()
        }
        _ => uuid::Uuid::now_v7().to_string(),
    };
    let Issued {
        token,
        record,
        scope,
    } = issue(
        state,
        sts,
        Issue {
            zone_id: &ask.zone_id,
            sid,
            root_sid: None,
            parent_id: None,
            sub: &application.id,
            sub_type: "application",
            client_id: &application.id,
            aud: vec![sts.issuer.clone()],
            use_: if delegation.is_some() {
                "gateway"
            } else {
                "session"
            },
            scope: (!ask.scopes.is_empty()).then(|| ask.scopes.join(" ")),
            target: granted.clone(),
            agent_session_id: form.agent_session_id.clone(),
            delegation: delegation.as_ref(),
            ttl,
            now,
        },
    )
    .await?;
    // An approved mint spends its approval, creating its record, before its evidence is
    // recorded, so the ledger says whether it was spent; the gate passed, the granted
    // resources' events are allows.
    if let Some(super::approvals::Approved::Consume(hold)) = &approved {
        let consumed = crate::holds::event(
            "step_up_consumed",
            hold,
            request_id,
            "allow",
            serde_json::json!({"authority_record_id": record.id}),
        )
        .ok_or_else(TokenError::internal)?;
        let spent = store
            .consume_approval_hold(&ask.zone_id, &hold.id, &record, &[consumed])
            .await
            .map_err(super::approvals::consume_error);
        match &spent {
            Ok(()) => allow_granted(&mut events, &granted),
            Err(refusal) => note_approval(&mut events, &hold.id, refusal.code),
        }
        record_all(state, events).await?;
        spent?;
        return Ok(answer(token, ttl, scope, granted, None));
    }
    if approved.is_some() {
        allow_granted(&mut events, &granted);
    }
    // The authority record (the revocation anchor and the issued-JTI registry) and the
    // evidence are written side by side; the mandate leaves only if both are stored. On the
    // embedded store the record's commit skips its own fsync (a record lost in a power cut
    // only makes its mandate unusable: every use checks the record). A reissue for an
    // approval already spent writes no new record.
    let record_written = async {
        match approved {
            None => sts.authority.write(record).await.map_err(TokenError::from),
            Some(_) => Ok(()),
        }
    };
    let (written, recorded) = tokio::join!(record_written, record_all(state, events));
    written?;
    recorded?;
    Ok(answer(token, ttl, scope, granted, None))
}

/// One mandate to issue: for whom, by whom, to what, for how long, in which lineage.
pub(super) struct Issue<'a> {
    pub zone_id: &'a str,
    pub sid: String,
    /// The lineage root; the mandate's own `sid` when it starts one.
    pub root_sid: Option<String>,
    /// The presented mandate's record, for a re-exchange.
    pub parent_id: Option<String>,
    pub sub: &'a str,
    pub sub_type: &'a str,
    pub client_id: &'a str,
    pub aud: Vec<String>,
    pub use_: &'static str,
    pub scope: Option<String>,
    pub target: Vec<String>,
    pub agent_session_id: Option<String>,
    pub delegation: Option<&'a Delegation>,
    pub ttl: i64,
    pub now: i64,
}

/// A signed mandate and the authority record that anchors it (not yet written).
pub(super) struct Issued {
    pub token: String,
    pub record: AuthorityRecord,
    pub scope: Option<String>,
}

/// Builds the claims (absent optional ones omitted), signs them with the zone's current key,
/// and builds the authority record: the revocation anchor and the issued-JTI registry.
pub(super) async fn issue(
    state: &RoleState,
    sts: &Sts,
    issue: Issue<'_>,
) -> Result<Issued, TokenError> {
    let keys = sts
        .keys
        .zone(
            state.shared.store.as_ref(),
            &state.shared.kek,
            issue.zone_id,
        )
        .await?;
    let jti = uuid::Uuid::now_v7().to_string();
    let iat = issue.now / 1000;
    let mut claims = MandateClaims {
        iss: sts.issuer.clone(),
        sub: issue.sub.to_owned(),
        aud: issue.aud,
        exp: iat + issue.ttl,
        iat,
        jti: jti.clone(),
        zone_id: issue.zone_id.to_owned(),
        client_id: issue.client_id.to_owned(),
        root_sid: issue.root_sid.unwrap_or_else(|| issue.sid.clone()),
        sid: issue.sid.clone(),
        use_: issue.use_.to_owned(),
        sub_type: issue.sub_type.to_owned(),
        scope: issue.scope,
        target: (!issue.target.is_empty()).then_some(issue.target),
        agent_session_id: issue.agent_session_id,
        delegation_edge_id: None,
        source_session_id: None,
        target_session_id: None,
        delegation_path: None,
        delegation_chain: None,
        hop_count: None,
        delegation_graph_epoch: None,
    };
    if let Some(delegation) = issue.delegation {
        delegation.stamp(&mut claims);
    }
    let Some(signer) = keys.signer.as_ref() else {
        tracing::error!(
            zone = issue.zone_id,
            "the STS's key ring holds no signing key"
        );
        return Err(TokenError::internal());
    };
    let token = crate::mandate::sign(&signer.header, &signer.key, &claims).map_err(|error| {
        tracing::error!(%error, "mandate signing failed");
        TokenError::internal()
    })?;
    keys.signed(&claims, &token);
    let record = AuthorityRecord {
        id: issue.sid,
        zone_id: issue.zone_id.to_owned(),
        session_type: if issue.sub_type == "user" {
            "user"
        } else {
            "application"
        }
        .to_owned(),
        subject_id: issue.sub.to_owned(),
        parent_id: issue.parent_id,
        status: "active".to_owned(),
        claims: serde_json::json!({"jti": jti, "client_id": issue.client_id, "use": issue.use_})
            .to_string(),
        expires_at_ms: issue.now + issue.ttl * 1000,
        authenticated_at_ms: issue.now,
        created_at_ms: issue.now,
        revoked_at_ms: None,
        revoked_reason: None,
    };
    Ok(Issued {
        token,
        record,
        scope: claims.scope,
    })
}

/// Writes a mint's authority record and records its evidence, side by side; the mandate may
/// leave only if both succeeded.
pub(super) async fn commit(
    state: &RoleState,
    sts: &Sts,
    record: AuthorityRecord,
    events: Vec<Event>,
) -> Result<(), TokenError> {
    let (written, recorded) = tokio::join!(sts.authority.write(record), record_all(state, events));
    written?;
    recorded
}

/// The token endpoint's success body.
pub(super) fn answer(
    token: String,
    ttl: i64,
    scope: Option<String>,
    targets: Vec<String>,
    upstreams: Option<std::collections::BTreeMap<String, crate::wire::Upstream>>,
) -> TokenResponse {
    TokenResponse {
        access_token: token,
        token_type: "Bearer".to_owned(),
        expires_in: ttl,
        scope,
        issued_token_type: ACCESS_TOKEN.to_owned(),
        target_resources: Some(targets),
        upstreams,
    }
}

/// The mint budget of (zone, resource, application) in this minute. Over it: 429
/// `rate_limited` with the seconds to the next window; a counter that cannot answer refuses.
pub(super) async fn within_mint_limit(
    state: &RoleState,
    sts: &Sts,
    zone_id: &str,
    resource: &str,
    application_id: &str,
) -> Result<(), TokenError> {
    let bucket = format!("sts-mint:{zone_id}:{resource}:{application_id}");
    let count = state
        .shared
        .bus
        .rates
        .hit(&bucket, std::time::Duration::from_secs(60))
        .await
        .map_err(|error| {
            tracing::warn!(%error, "rate counter unavailable: mint refused");
            TokenError::unavailable("the rate counter is unavailable")
        })?;
    if count > sts.mint_limit() {
        let mut error = TokenError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("the mint limit for `{resource}` is reached; retry after the window"),
        );
        error.retry_after = Some(60 - u64::try_from(now_ms() / 1000 % 60).unwrap_or(0));
        return Err(error);
    }
    Ok(())
}

pub(super) async fn record_all(state: &RoleState, events: Vec<Event>) -> Result<(), TokenError> {
    for event in events {
        state.shared.evidence.record(event).await?;
    }
    Ok(())
}

/// Client authentication: the application of `zone_id` and its secret. Failures all look the
/// same to the caller; an application that keeps failing is locked out for a minute.
async fn authenticate(
    state: &RoleState,
    sts: &Sts,
    zone_id: &str,
    form: &form::TokenForm,
) -> Result<Application, TokenError> {
    let refused = || TokenError::unauthenticated("invalid client credentials");
    let (Some(application_id), Some(secret)) = (&form.application_id, &form.client_secret) else {
        return Err(refused());
    };
    let now = now_ms();
    not_locked_out(sts, application_id, now)?;
    let application = state
        .shared
        .store
        .application_by_id(application_id)
        .await?
        .filter(|app| app.active(now));
    let verified = match application
        .as_ref()
        .and_then(|app| app.client_secret_hash.as_deref())
    {
        Some(hash) => sts.secrets.verify(application_id, secret, hash).await,
        None => false,
    };
    match application {
        // The secret proves the caller, who named the wrong zone: say which.
        Some(application) if verified && !zone_id.is_empty() && application.zone_id != zone_id => {
            Err(TokenError::new(
                StatusCode::FORBIDDEN,
                "zone_invalid",
                format!(
                    "application `{application_id}` belongs to zone `{}`, not `{zone_id}`",
                    application.zone_id
                ),
            ))
        }
        Some(application) if verified => Ok(application),
        _ => {
            count_failure(state, sts, application_id, now);
            Err(refused())
        }
    }
}

/// 429 `rate_limited` while `caller` (an application id, or `workload:<id>`) is locked out.
pub(super) fn not_locked_out(sts: &Sts, caller: &str, now: i64) -> Result<(), TokenError> {
    let Some(until) = locked_until(sts, caller, now) else {
        return Ok(());
    };
    let mut error = TokenError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many failed authentications; try again later",
    );
    error.retry_after = Some(u64::try_from((until - now) / 1000 + 1).unwrap_or(60));
    Err(error)
}

fn locked_until(sts: &Sts, application_id: &str, now: i64) -> Option<i64> {
    let lockouts = sts
        .lockouts
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    lockouts
        .get(application_id)
        .filter(|(window_start, failures)| {
            *failures > AUTH_FAILURES_PER_MINUTE && now < window_start + 60_000
        })
        .map(|(window_start, _)| window_start + 60_000)
}

/// One more failed authentication of `application_id` (or `workload:<id>`), counted and
/// shown in the metrics.
pub(super) fn count_failure(state: &RoleState, sts: &Sts, application_id: &str, now: i64) {
    if let Some(metrics) = &state.metrics.sts {
        metrics.auth_failures.inc();
    }
    let mut lockouts = sts
        .lockouts
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if lockouts.len() > 65_536 {
        lockouts.retain(|_, (window_start, _)| now < *window_start + 60_000);
    }
    let entry = lockouts
        .entry(application_id.to_owned())
        .or_insert((now, 0));
    if now >= entry.0 + 60_000 {
        *entry = (now, 0);
    }
    entry.1 += 1;
}

/// Verifies a subject token for `zone_id`: an ES256 mandate of this STS under one of the
/// zone's keys, unexpired, with the expected `use`, whose authority record is still active.
pub(super) async fn verify_subject(
    state: &RoleState,
    sts: &Sts,
    zone_id: &str,
    token: &str,
    expected_use: &str,
) -> Result<MandateClaims, TokenError> {
    let keys = match sts
        .keys
        .zone(state.shared.store.as_ref(), &state.shared.kek, zone_id)
        .await
    {
        Ok(keys) => keys,
        Err(crate::keys::KeyError::NoKey(_)) => {
            return Err(TokenError::bad_subject(
                "subject token not issued for this zone",
            ));
        }
        Err(error) => return Err(error.into()),
    };
    let now = now_ms();
    // An agent's session mandate comes back at every mint; a gateway mandate comes once.
    let verified = if expected_use == "session" {
        keys.verify_session(token, now)
    } else {
        keys.verify(token, now)
    };
    let claims = verified
        .map_err(|error| TokenError::bad_subject(format!("subject token rejected: {error}")))?;
    check_subject(state, sts, zone_id, &claims, expected_use).await?;
    Ok(claims)
}

/// Everything [`verify_subject`] checks but the signature: lifetime, issuer, zone, `use`, and
/// that the authority it was minted under is still active for its subject.
pub(super) async fn check_subject(
    state: &RoleState,
    sts: &Sts,
    zone_id: &str,
    claims: &MandateClaims,
    expected_use: &str,
) -> Result<(), TokenError> {
    let now = now_ms();
    crate::mandate::check_times(claims, now / 1000)
        .and_then(|()| crate::mandate::check_issuer(claims, &sts.issuer))
        .map_err(|error| TokenError::bad_subject(format!("subject token rejected: {error}")))?;
    if claims.zone_id != zone_id {
        return Err(TokenError::bad_subject(
            "subject token belongs to another zone",
        ));
    }
    if claims.use_ != expected_use {
        return Err(TokenError::bad_subject(format!(
            "subject token must have use={expected_use}"
        )));
    }
    let record = state
        .shared
        .store
        .get_authority_record(zone_id, &claims.sid)
        .await?;
    let active = record.is_some_and(|record| record.active(now) && record.subject_id == claims.sub);
    if !active {
        return Err(TokenError::bad_subject(
            "subject token's authority is no longer active",
        ));
    }
    Ok(())
}

/// A delegation checked against live state: the edge, its lineage (root first), the target
/// session, and how long a mandate along it may live.
pub(super) struct Delegation {
    pub leaf: DelegationEdge,
    pub path: Vec<(DelegationEdge, Constraints)>,
    pub target: Session,
    pub ttl_bound_seconds: i64,
    pub epoch: i64,
}

impl Delegation {
    pub(super) fn stamp(&self, claims: &mut MandateClaims) {
        let mut chain: Vec<ChainHop> = self
            .path
            .iter()
            .map(|(edge, _)| ChainHop {
                application_id: edge.issuer_application_id.clone(),
                agent_session_id: Some(edge.source_session_id.clone()),
                delegation_edge_id: Some(edge.id.clone()),
            })
            .collect();
        chain.push(ChainHop {
            application_id: self.leaf.receiver_application_id.clone(),
            agent_session_id: Some(self.target.id.clone()),
            delegation_edge_id: None,
        });
        claims.delegation_edge_id = Some(self.leaf.id.clone());
        claims.source_session_id = Some(self.leaf.source_session_id.clone());
        claims.target_session_id = Some(self.leaf.target_session_id.clone());
        claims.delegation_path = Some(self.path.iter().map(|(edge, _)| edge.id.clone()).collect());
        claims.delegation_chain = Some(chain);
        claims.hop_count = u32::try_from(self.path.len()).ok();
        claims.delegation_graph_epoch = (self.epoch > 0).then_some(self.epoch);
    }

    /// Whether every edge on the path lets `resource` through: its own resource, its listed
    /// resources, or no restriction (a broad edge).
    pub(super) fn allows(&self, resource: &Resource) -> bool {
        self.path
            .iter()
            .all(|(edge, constraints)| match &edge.resource_id {
                Some(id) => *id == resource.id,
                None => {
                    constraints.resources.is_empty()
                        || constraints.resources.contains(&resource.identifier)
                }
            })
    }
}

/// The checks of `sts-mandates.md` §4, against the store as it is now.
#[allow(clippy::too_many_arguments)]
pub(super) async fn delegation(
    store: &dyn Store,
    zone_id: &str,
    application: &Application,
    session_id: &str,
    edge_id: &str,
    scopes: &[String],
    requested_ttl: Option<i64>,
    now: i64,
) -> Result<Delegation, TokenError> {
    let denied = TokenError::denied;
    if scopes.iter().any(|scope| scope == LIFECYCLE) {
        return Err(denied("agent:lifecycle cannot be delegated"));
    }
    // The edge, both sessions and the graph epoch in one read (one snapshot).
    let context = store
        .delegation_context(zone_id, edge_id)
        .await?
        .filter(|context| context.edge.live(now))
        .ok_or_else(|| denied("delegation not active"))?;
    let (leaf, epoch) = (context.edge, context.epoch);
    if leaf.target_session_id != session_id {
        return Err(denied("delegation does not target this agent session"));
    }
    let target = context
        .target
        .filter(|session| session.live(now))
        .ok_or_else(|| denied("agent session not active"))?;
    let source = context
        .source
        .filter(|session| session.live(now))
        .ok_or_else(|| denied("delegating session not active"))?;
    if target.application_id != application.id {
        return Err(denied("agent session is not the caller's"));
    }
    if leaf.issuer_application_id != source.application_id
        || leaf.receiver_application_id != target.application_id
    {
        return Err(denied("delegation applications do not match its sessions"));
    }
    // The lineage, leaf first, each edge live and continuing the one below it.
    let mut lineage = vec![leaf.clone()];
    while let Some(parent_id) = lineage.last().and_then(|edge| edge.parent_edge_id.clone()) {
        if lineage.len() >= MAX_HOPS as usize {
            return Err(denied("delegation chain exceeds the hop limit"));
        }
        let child_source = lineage.last().map(|edge| {
            (
                edge.source_session_id.clone(),
                edge.issuer_application_id.clone(),
            )
        });
        let parent = store
            .get_delegation_edge(zone_id, &parent_id)
            .await?
            .filter(|edge| edge.live(now))
            .ok_or_else(|| denied("a delegation in the chain is not active"))?;
        if child_source
            != Some((
                parent.target_session_id.clone(),
                parent.receiver_application_id.clone(),
            ))
        {
            return Err(denied("delegation chain is not continuous"));
        }
        lineage.push(parent);
    }
    lineage.reverse();
    let hops = lineage.len();
    let mut path = Vec::with_capacity(hops);
    let mut ttl_bound = i64::MAX;
    for (index, edge) in lineage.into_iter().enumerate() {
        let constraints = Constraints::parse(&edge.constraints)
            .ok_or_else(|| denied("delegation constraints invalid"))?;
        // Every edge's budget covers the edges from it down to the leaf.
        if (constraints.max_hops() as usize) < hops - index {
            return Err(denied("delegation chain exceeds its hop budget"));
        }
        if !scopes.iter().all(|scope| edge.scopes.contains(scope)) {
            return Err(denied("policy denied (delegation_scope_exceeded)"));
        }
        if let Some(limit) = constraints.ttl_seconds {
            if requested_ttl.is_some_and(|ttl| ttl > i64::from(limit)) {
                return Err(denied("ttl_seconds exceeds the delegation's ttl_seconds"));
            }
            ttl_bound = ttl_bound.min(i64::from(limit));
        }
        if let Some(expires) = constraints.expires_at_ms() {
            let expires = expires.ok_or_else(|| denied("delegation constraints invalid"))?;
            ttl_bound = ttl_bound.min((expires - now) / 1000);
        }
        if let Some(expires) = edge.expires_at_ms {
            ttl_bound = ttl_bound.min((expires - now) / 1000);
        }
        path.push((edge, constraints));
    }
    Ok(Delegation {
        leaf,
        path,
        target,
        ttl_bound_seconds: ttl_bound,
        epoch,
    })
}

/// One resource's decision: the STS's own checks, then the zone's policy. `Err` carries the
/// refusal's decision (for the audit event) and its description.
pub(super) async fn decide_resource(
    store: &dyn Store,
    ask: &Ask,
    application: &Application,
    identifier: &str,
    delegation: Option<&Delegation>,
    bundle: Option<&caracal_policy::Bundle>,
    session_context: bool,
) -> Result<Result<Decision, (Decision, String)>, TokenError> {
    let refuse =
        |reason: &str, description: String| Ok(Err((denial(reason, &description), description)));
    let Some(resource) = store
        .find_resource(&ask.zone_id, identifier)
        .await?
        .filter(|resource| resource.archived_at_ms.is_none())
    else {
        return refuse(
            "resource_not_found",
            "policy denied (resource_not_granted)".to_owned(),
        );
    };
    let lifecycle_allowed = !resource.upstream_url.is_empty();
    let declared = ask
        .scopes
        .iter()
        .all(|scope| resource.scopes.contains(scope) || (scope == LIFECYCLE && lifecycle_allowed));
    if !declared {
        return refuse(
            "scope_not_declared",
            format!("scope not declared by resource `{}`", resource.identifier),
        );
    }
    if let Some(delegation) = delegation
        && !delegation.allows(&resource)
    {
        return refuse(
            "resource_not_delegated",
            format!(
                "resource `{}` is outside the delegation",
                resource.identifier
            ),
        );
    }
    let request = caracal_policy::Request {
        flow: if delegation.is_some() {
            Flow::Mint
        } else {
            Flow::Bootstrap
        },
        application_id: application.id.clone(),
        resource: resource.identifier.clone(),
        scopes: ask.scopes.clone(),
        labels: delegation
            .map(|d| d.target.labels.clone())
            .unwrap_or_default(),
        edge_scopes: delegation.map(|d| d.leaf.scopes.clone()),
        session: delegation.is_some() || session_context,
        subject: false,
        target: Vec::new(),
    };
    let decision = caracal_policy::decide(bundle, &request);
    if let Some(reason) = decision.reason() {
        let description = format!("policy denied ({reason})");
        return Ok(Err((decision, description)));
    }
    Ok(Ok(decision))
}

/// A denial the STS decides itself, before or beside the policy, in the policy's shape.
pub(super) fn denial(reason: &str, description: &str) -> Decision {
    Decision {
        decision: Verdict::Deny,
        evaluation_status: "complete".to_owned(),
        determining_policies: Vec::new(),
        diagnostics: vec![caracal_policy::Reason {
            code: reason.to_owned(),
            detail: description.to_owned(),
        }],
        step_up_required: None,
    }
}

/// Marks the events of the granted resources allows: their only refusal was the approval
/// gate, now passed.
fn allow_granted(events: &mut [Event], granted: &[String]) {
    for event in events {
        let resource = event
            .metadata_json
            .get("resource")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        if granted.iter().any(|granted| granted == resource) {
            event.decision = "allow".to_owned();
        }
    }
}

/// Links a gated request's events to its approval hold and what became of it (`consumed`,
/// `reissued`, or the refusal's code such as `interaction_required`).
fn note_approval(events: &mut [Event], approval_id: &str, outcome: &str) {
    for event in events {
        if let Some(metadata) = event.metadata_json.as_object_mut() {
            metadata.insert("approval_id".to_owned(), approval_id.into());
            metadata.insert("approval_outcome".to_owned(), outcome.into());
        }
    }
}

pub(super) fn exchange_event(
    ask: &Ask,
    request_id: &str,
    application: &Application,
    resource: &str,
    decision: &Decision,
    loaded: Option<&crate::policy::Loaded>,
    form: &form::TokenForm,
) -> Event {
    let allowed = decision.decision == Verdict::Allow && decision.step_up_required.is_none();
    Event {
        id: uuid::Uuid::now_v7().to_string(),
        zone_id: ask.zone_id.clone(),
        event_type: "token_exchange".to_owned(),
        request_id: request_id.to_owned(),
        decision: if allowed { "allow" } else { "deny" }.to_owned(),
        policy_set_id: None,
        policy_set_version_id: loaded.map(|loaded| loaded.version_id.clone()),
        manifest_sha: loaded.map(|loaded| loaded.manifest_sha256.clone()),
        evaluation_status: decision.evaluation_status.clone(),
        determining_policies_json: serde_json::to_value(&decision.determining_policies)
            .unwrap_or_default(),
        diagnostics_json: serde_json::to_value(&decision.diagnostics).unwrap_or_default(),
        metadata_json: serde_json::json!({
            "application_id": application.id,
            "resource": resource,
            "scopes": ask.scopes,
            "agent_session_id": form.agent_session_id,
            "delegation_edge_id": form.delegation_edge_id,
        }),
        occurred_at_ms: now_ms(),
    }
}
