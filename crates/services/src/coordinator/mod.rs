//! The Coordinator role: governed sessions (`/zones/{zone}/agents`) and delegation edges. An
//! agent proves itself with a lifecycle mandate of the zone (`use=session`, `agent:lifecycle`,
//! its authority record and application still active) and acts for its own application. On
//! the operator routes (reads, suspend, resume, terminate, revoke: the published admin
//! client's `coordinator_token` calls) an admin token is accepted too, with the capability
//! and zone it holds on the API, acting on any session or edge of the zone. Terminating a
//! session takes its whole subtree and every delegation edge touching it down in one
//! transaction, with the revocation messages in the same transaction's outbox.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use caracal_core::ErrorCode;
use caracal_store::{OutboxMessage, Session, TerminatedTree, now_ms};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

pub(crate) mod delegations;
mod idempotency;
mod verify;

use crate::auth::{Access, AdminCaller};
use crate::error::ApiError;
use crate::keys::KeyRing;
use crate::state::RoleState;
use crate::wire::MandateClaims;

pub use crate::propagation::{DELEGATIONS_INVALIDATE, SESSIONS_REVOKE, revocations};
const LIFECYCLE: &str = "agent:lifecycle";
/// How large session trees may grow; the defaults are the reference's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_depth: i64,
    pub max_children: usize,
    pub sessions_per_zone: i64,
    pub sessions_per_application: i64,
    /// Live idempotency receipts an application may hold per operation: a caller cannot grow
    /// the table without bound by sending a fresh key with every create.
    pub receipts_per_operation: i64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_depth: 10,
            max_children: 10,
            sessions_per_zone: 50,
            sessions_per_application: 200,
            receipts_per_operation: 10_000,
        }
    }
}
const MAX_LABELS: usize = 32;
const MAX_LABEL_CHARS: usize = 64;
const DEFAULT_TASK_TTL: i64 = 3600;
const MAX_TASK_TTL: i64 = 86_400;
/// How long a service session lives without a heartbeat.
const SERVICE_LEASE_MS: i64 = 60_000;

/// What the Coordinator holds in memory.
pub struct Coordinator {
    pub issuer: String,
    pub keys: KeyRing,
    pub limits: Limits,
}

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/zones/{zone_id}/agents", post(start).get(list))
        .route("/zones/{zone_id}/agents/{id}", get(read).delete(terminate))
        .route("/zones/{zone_id}/agents/{id}/heartbeat", post(heartbeat))
        .route("/zones/{zone_id}/agents/{id}/lease", post(lease))
        .route("/zones/{zone_id}/agents/{id}/impact", get(session_impact))
        .route("/zones/{zone_id}/agents/{id}/children", get(children))
        .route(
            "/zones/{zone_id}/agents/{id}/effective-authority",
            get(effective_authority),
        )
        // The SDK sends POST, the published admin client PATCH.
        .route(
            "/zones/{zone_id}/agents/{id}/suspend",
            post(suspend).patch(suspend),
        )
        .route(
            "/zones/{zone_id}/agents/{id}/resume",
            post(resume).patch(resume),
        )
        .route("/v1/verify", post(verify::verify))
        .merge(delegations::routes())
}

/// Ids in paths: what the SDK sends and the reference accepts.
pub(super) fn valid_id(id: &str) -> bool {
    caracal_core::is_plain_id(id)
}

pub(super) fn invalid(description: impl Into<String>) -> ApiError {
    ApiError::with_description(ErrorCode::InvalidParams, description)
}

fn not_found(id: &str) -> ApiError {
    ApiError::with_description(
        ErrorCode::SessionNotFound,
        format!("session `{id}` not found"),
    )
}

/// Who calls: an agent with its verified lifecycle mandate, or (on the operator routes only)
/// an operator with an admin token.
pub(super) enum Caller {
    Agent(Box<MandateClaims>),
    Operator(AdminCaller),
}

impl Caller {
    /// Whether the caller acts for `application_id`: an agent for its own application only, an
    /// operator for every application of the zones its token reaches.
    pub(super) fn acts_for(&self, application_id: &str) -> bool {
        match self {
            Caller::Agent(claims) => claims.client_id == application_id,
            Caller::Operator(_) => true,
        }
    }
}

/// Whether the bearer is an admin token rather than a mandate: the prefix tells them apart,
/// since a compact JWS starts with its base64url header (`eyJ`).
fn bears_admin_token(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|token| {
            token
                .trim_start()
                .starts_with(caracal_crypto::AdminToken::PREFIX)
        })
}

/// Admin tokens are budgeted here as on the API, and their failed authentications counted
/// against the caller's address (`auth::limit_auth_failures`), so the operator routes are no
/// way around the API's lockout. Agents' mandates pass straight through: they are checked by
/// signature, and an agent's request rate is not an operator's.
pub(crate) async fn budget_admin_tokens(
    State(state): State<RoleState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if bears_admin_token(request.headers()) {
        crate::auth::limit_auth_failures(State(state), request, next).await
    } else {
        next.run(request).await
    }
}

/// The caller of an operator route: an admin token holding `access` for the live zone
/// `zone_id` (checked by the API's own check: unknown or revoked 401, wrong capability or zone
/// 403, an archived or unknown zone 404), or an agent's lifecycle mandate; then `id` (a path
/// id) checked.
pub(super) async fn operator_or_agent(
    state: &RoleState,
    headers: &HeaderMap,
    zone_id: &str,
    id: Option<&str>,
    access: Access,
) -> Result<Caller, ApiError> {
    if !valid_id(zone_id) {
        return Err(invalid("zone id must be [A-Za-z0-9_.-:]{1,128}"));
    }
    // A control key's command runs here in process as an operator (`control`).
    let caller = if bears_admin_token(headers) || crate::auth::acting().is_some() {
        let operator = crate::auth::authenticate(state, headers).await?;
        crate::admin::live_zone(state, &operator, zone_id, access).await?;
        Caller::Operator(operator)
    } else {
        Caller::Agent(Box::new(authenticate(state, headers, zone_id).await?))
    };
    if let Some(id) = id.filter(|id| !valid_id(id)) {
        return Err(invalid(format!("`{id}` has an invalid id syntax")));
    }
    Ok(caller)
}

/// The caller: the verified lifecycle mandate of `zone_id`.
pub(super) async fn authenticate(
    state: &RoleState,
    headers: &HeaderMap,
    zone_id: &str,
) -> Result<MandateClaims, ApiError> {
    if !valid_id(zone_id) {
        return Err(invalid("zone id must be [A-Za-z0-9_.-:]{1,128}"));
    }
    let Some(coordinator) = state.coordinator.as_ref() else {
        return Err(ApiError::new(ErrorCode::InternalError));
    };
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| ApiError::new(ErrorCode::MissingToken))?;
    let bad = |why: &str| ApiError::with_description(ErrorCode::InvalidToken, why.to_owned());
    if token.starts_with(caracal_crypto::AdminToken::PREFIX) {
        return Err(bad(
            "an admin token acts only on the operator routes; this one needs a lifecycle mandate",
        ));
    }
    let store = state.shared.store.as_ref();
    // Verified with the keys of the zone it claims, then held to the path's zone.
    let claimed = crate::mandate::claimed_zone(token)
        .filter(|zone| valid_id(zone))
        .ok_or_else(|| bad("not a mandate"))?;
    let keys = match coordinator
        .keys
        .zone(store, &state.shared.kek, &claimed)
        .await
    {
        Ok(keys) => keys,
        Err(crate::keys::KeyError::Store(error)) => return Err(error.into()),
        Err(_) => return Err(bad("not a mandate of this zone")),
    };
    let now = now_ms();
    let claims = keys
        .verify_session(token, now)
        .map_err(|error| bad(&error.to_string()))?;
    crate::mandate::check_times(&claims, now / 1000)
        .and_then(|()| crate::mandate::check_issuer(&claims, &coordinator.issuer))
        .map_err(|error| bad(&error.to_string()))?;
    if claims.zone_id != zone_id {
        return Err(ApiError::with_description(
            ErrorCode::ZoneMismatch,
            "the mandate belongs to another zone",
        ));
    }
    if claims.use_ != "session" {
        return Err(bad("a lifecycle (use=session) mandate is required"));
    }
    if !claims
        .scope
        .as_deref()
        .is_some_and(|scope| scope.split(' ').any(|s| s == LIFECYCLE))
    {
        return Err(ApiError::with_description(
            ErrorCode::MissingScope,
            "the mandate lacks agent:lifecycle",
        ));
    }
    let record_active = store
        .get_authority_record(zone_id, &claims.sid)
        .await?
        .is_some_and(|record| record.active(now));
    let app_active = store
        .get_application(zone_id, &claims.client_id)
        .await?
        .is_some_and(|app| app.active(now));
    if !record_active || !app_active {
        return Err(ApiError::new(ErrorCode::IdentityRevoked));
    }
    Ok(claims)
}

/// The audit event of a Coordinator change: the caller (an agent's application and authority
/// record, or an operator's admin token), the action and the object.
pub(super) fn change_event(
    caller: &Caller,
    zone_id: &str,
    action: &str,
    entity_type: &str,
    entity_id: &str,
    request_id: Option<&caracal_core::RequestId>,
) -> caracal_audit::Event {
    caracal_audit::Event {
        id: uuid::Uuid::now_v7().to_string(),
        zone_id: zone_id.to_owned(),
        event_type: format!("coordinator.{action}"),
        request_id: request_id.map_or_else(|| "none".to_owned(), ToString::to_string),
        decision: "allow".to_owned(),
        policy_set_id: None,
        policy_set_version_id: None,
        manifest_sha: None,
        evaluation_status: "complete".to_owned(),
        determining_policies_json: json!([]),
        diagnostics_json: json!([]),
        metadata_json: json!({
            "actor": match caller {
                Caller::Agent(claims) => format!("application:{}", claims.client_id),
                Caller::Operator(operator) => operator.actor(),
            },
            "authority_record": match caller {
                Caller::Agent(claims) => Value::from(claims.sid.as_str()),
                Caller::Operator(_) => Value::Null,
            },
            "entity_type": entity_type,
            "entity_id": entity_id,
        }),
        occurred_at_ms: now_ms(),
    }
}

/// The event as an outbox message, to commit with the change.
pub(super) fn change_evidence(event: &caracal_audit::Event) -> Result<OutboxMessage, ApiError> {
    crate::evidence::outbox_message(event).ok_or_else(|| ApiError::new(ErrorCode::InternalError))
}

/// Records the event before a cascade is applied (the cascade builds its own outbox).
pub(super) async fn record_change(
    state: &RoleState,
    event: caracal_audit::Event,
) -> Result<(), ApiError> {
    state
        .shared
        .evidence
        .record(event)
        .await
        .map_err(crate::api::evidence_error)
}

/// [`authenticate`], then `id` (a path id) checked.
pub(super) async fn authenticate_for(
    state: &RoleState,
    headers: &HeaderMap,
    zone_id: &str,
    id: &str,
) -> Result<MandateClaims, ApiError> {
    let caller = authenticate(state, headers, zone_id).await?;
    if !valid_id(id) {
        return Err(invalid(format!("`{id}` has an invalid id syntax")));
    }
    Ok(caller)
}

pub(super) fn timestamp(ms: i64) -> String {
    let since_epoch = std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + since_epoch).to_string()
}

/// A session as the Coordinator (and the admin API's read view) shows it.
pub(crate) fn session_body(session: &Session) -> Value {
    json!({
        "agent_session_id": session.id,
        "zone_id": session.zone_id,
        "application_id": session.application_id,
        "parent_id": session.parent_id,
        "subject_authority_record_id": session.authority_record_id,
        "lifecycle": session.lifecycle,
        "labels": session.labels,
        "metadata": serde_json::from_str::<Value>(&session.metadata).unwrap_or(Value::Null),
        "status": session.status,
        "depth": session.depth,
        "ttl_seconds": session.ttl_seconds,
        "lease_generation": session.lease_generation,
        "heartbeat_deadline_at": session.heartbeat_deadline_ms.map(timestamp),
        "started_at": timestamp(session.started_at_ms),
        "delegation_edge_id": Value::Null,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRequest {
    application_id: String,
    #[serde(default)]
    lifecycle: Option<String>,
    #[serde(default)]
    parent_id: Option<String>,
    #[serde(default)]
    ttl_seconds: Option<i64>,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    subject_session_id: Option<String>,
    /// Accepted and ignored, as the SDK may send it.
    #[serde(default)]
    #[allow(dead_code)]
    subject_token: Option<String>,
    #[serde(default)]
    parent_authority: Option<String>,
    #[serde(default)]
    inherit_parent_edge_id: Option<String>,
}

/// `POST /zones/{zone}/agents`: starts a task (default) or service session for the caller's
/// application, optionally under a parent of the same application.
async fn start(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<axum::Extension<caracal_core::RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers, &zone_id).await?;
    let canonical: Value =
        serde_json::from_slice(&raw).map_err(|error| invalid(format!("invalid body: {error}")))?;
    let request: StartRequest = serde_json::from_value(canonical.clone())
        .map_err(|error| invalid(format!("invalid body: {error}")))?;
    let key = idempotency::from_request(
        &state,
        &headers,
        "session.start",
        &zone_id,
        &caller.client_id,
        &canonical,
    )?;
    if let Some(key) = &key {
        let store = state.shared.store.as_ref();
        let replay = idempotency::replay(&state, key, async |id: &str| {
            Ok(store
                .get_session(&zone_id, id)
                .await?
                .is_some_and(|session| session.live(now_ms())))
        })
        .await?;
        if let Some(replay) = replay {
            return Ok(replay);
        }
    }
    if request.application_id != caller.client_id {
        return Err(ApiError::with_description(
            ErrorCode::ParentOwnershipRequired,
            "a session is started for the caller's own application",
        ));
    }
    let lifecycle = request.lifecycle.as_deref().unwrap_or("task");
    if !matches!(lifecycle, "task" | "service") {
        return Err(invalid("lifecycle must be task or service"));
    }
    // The reference's default: a child holds a copy of its parent's delegation.
    let inherit = match request.parent_authority.as_deref() {
        None | Some("inherit") => true,
        Some("none") => false,
        Some(_) => return Err(invalid("parent_authority must be inherit or none")),
    };
    if let Some(edge) = &request.inherit_parent_edge_id {
        if !(inherit && request.parent_id.is_some()) {
            return Err(invalid(
                "inherit_parent_edge_id needs parent_id and parent_authority inherit",
            ));
        }
        if !valid_id(edge) {
            return Err(invalid("inherit_parent_edge_id has an invalid id syntax"));
        }
    }
    if request.labels.len() > MAX_LABELS
        || request
            .labels
            .iter()
            .any(|label| label.is_empty() || label.chars().count() > MAX_LABEL_CHARS)
    {
        return Err(invalid("at most 32 labels of 1 to 64 characters"));
    }
    let ttl_seconds = match (lifecycle, request.ttl_seconds) {
        ("service", Some(_)) => return Err(invalid("ttl_seconds applies to task sessions")),
        ("service", None) => None,
        (_, None) => Some(DEFAULT_TASK_TTL),
        (_, Some(ttl)) if (1..=MAX_TASK_TTL).contains(&ttl) => Some(ttl),
        (_, Some(_)) => return Err(invalid("ttl_seconds must be 1 to 86400")),
    };
    let store = state.shared.store.as_ref();
    let now = now_ms();
    let limits = state
        .coordinator
        .as_ref()
        .map(|coordinator| coordinator.limits)
        .unwrap_or_default();
    let (in_zone, of_app) = store
        .count_active_sessions(&zone_id, &caller.client_id)
        .await?;
    if in_zone >= limits.sessions_per_zone {
        return Err(ApiError::new(ErrorCode::SessionZoneLimitExceeded));
    }
    if of_app >= limits.sessions_per_application {
        return Err(ApiError::new(ErrorCode::SessionLimitExceeded));
    }
    // A dynamically registered client runs one task at a time, with no tree under it.
    let registered = store
        .get_application(&zone_id, &caller.client_id)
        .await?
        .is_some_and(|app| app.registration_method == "dcr");
    if registered {
        if lifecycle != "task" || request.parent_id.is_some() {
            return Err(invalid(
                "a registered (DCR) application starts task sessions only, without a parent",
            ));
        }
        if of_app >= 1 {
            return Err(ApiError::with_description(
                ErrorCode::SessionLimitExceeded,
                "a registered (DCR) application holds one live session at a time",
            ));
        }
    }
    let parent = match &request.parent_id {
        None => None,
        Some(parent_id) => {
            if !valid_id(parent_id) {
                return Err(invalid("parent_id has an invalid id syntax"));
            }
            let parent = store
                .get_session(&zone_id, parent_id)
                .await?
                .filter(|parent| parent.live(now))
                .ok_or_else(|| not_found(parent_id))?;
            if parent.application_id != caller.client_id {
                return Err(ApiError::new(ErrorCode::ParentOwnershipRequired));
            }
            if parent.lifecycle == "task" && lifecycle == "service" {
                return Err(invalid("a task session cannot start a service session"));
            }
            if parent.depth + 1 > limits.max_depth {
                return Err(ApiError::new(ErrorCode::SessionDepthLimitExceeded));
            }
            let children = store.list_child_sessions(&zone_id, parent_id).await?;
            if children.iter().filter(|child| child.live(now)).count() >= limits.max_children {
                return Err(ApiError::new(ErrorCode::SessionChildrenLimitExceeded));
            }
            Some(parent)
        }
    };
    let id = uuid::Uuid::now_v7().to_string();
    let inherited = match &parent {
        Some(parent) if inherit => {
            delegations::inherited(
                &state,
                &caller,
                parent,
                request.inherit_parent_edge_id.as_deref(),
                &id,
                now,
            )
            .await?
        }
        _ => None,
    };
    let session = Session {
        id,
        zone_id: zone_id.clone(),
        application_id: caller.client_id.clone(),
        parent_id: request.parent_id,
        authority_record_id: request
            .subject_session_id
            .unwrap_or_else(|| caller.sid.clone()),
        status: "active".to_owned(),
        lifecycle: lifecycle.to_owned(),
        depth: parent.map_or(0, |parent| parent.depth + 1),
        labels: request.labels,
        metadata: Value::Object(request.metadata.unwrap_or_default()).to_string(),
        ttl_seconds,
        lease_generation: i64::from(lifecycle == "service"),
        heartbeat_deadline_ms: (lifecycle == "service").then_some(now + SERVICE_LEASE_MS),
        started_at_ms: now,
        last_active_ms: now,
        terminated_at_ms: None,
        termination_reason: None,
    };
    let caller = Caller::Agent(Box::new(caller));
    let change = |action: &str, kind: &str, id: &str| {
        change_evidence(&change_event(
            &caller,
            &zone_id,
            action,
            kind,
            id,
            request_id.as_deref(),
        ))
    };
    let mut body = session_body(&session);
    let mut outbox = vec![change("session.start", "session", &session.id)?];
    if let Some(edge) = &inherited {
        if let Some(fields) = body.as_object_mut() {
            fields.insert(
                "delegation_edge_id".to_owned(),
                Value::from(edge.id.as_str()),
            );
        }
        outbox.push(change("delegation.inherit", "delegation", &edge.id)?);
        outbox.push(delegations::created(edge));
    }
    idempotency::create(
        &state,
        key.as_ref(),
        "session",
        &session.id,
        body,
        async |receipt| {
            store
                .create_session_with_receipt(&session, inherited.as_ref(), &outbox, receipt)
                .await
        },
    )
    .await
}

async fn read(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    operator_or_agent(&state, &headers, &zone_id, Some(&id), Access::Read).await?;
    let session = state
        .shared
        .store
        .get_session(&zone_id, &id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(session_body(&session)))
}

async fn list(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = operator_or_agent(&state, &headers, &zone_id, None, Access::Read).await?;
    let sessions = state.shared.store.list_sessions(&zone_id).await?;
    let items: Vec<Value> = sessions
        .iter()
        .filter(|session| caller.acts_for(&session.application_id))
        .map(session_body)
        .collect();
    Ok(Json(json!({ "items": items, "agents": items })))
}

#[derive(Debug, Deserialize)]
struct HeartbeatRequest {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    lease_generation: Option<i64>,
}

/// Why a lease operation on `id` was refused: fenced, lapsed or not a service session.
async fn lease_refusal(state: &RoleState, zone_id: &str, id: &str) -> ApiError {
    match state.shared.store.get_session(zone_id, id).await {
        Ok(None) => not_found(id),
        Ok(Some(session)) if session.lifecycle != "service" => {
            ApiError::new(ErrorCode::SessionNotService)
        }
        Ok(Some(session)) if !session.live(now_ms()) => ApiError::new(ErrorCode::SessionNotLive),
        Ok(Some(_)) => ApiError::new(ErrorCode::SessionLeaseFenced),
        Err(error) => error.into(),
    }
}

fn lease_body(status: &str, deadline_ms: i64, generation: i64) -> Value {
    json!({"status": status, "heartbeat_deadline_at": timestamp(deadline_ms), "lease_generation": generation})
}

/// `POST …/agents/{id}/heartbeat`: the holder of the current lease generation extends it.
async fn heartbeat(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    authenticate_for(&state, &headers, &zone_id, &id).await?;
    let request: HeartbeatRequest =
        serde_json::from_slice(&raw).map_err(|error| invalid(format!("invalid body: {error}")))?;
    if !matches!(
        request.status.as_deref(),
        None | Some("starting" | "healthy" | "degraded" | "unhealthy")
    ) {
        return Err(invalid(
            "status must be starting, healthy, degraded or unhealthy",
        ));
    }
    let generation = request
        .lease_generation
        .ok_or_else(|| ApiError::new(ErrorCode::LeaseGenerationRequired))?;
    let deadline = now_ms() + SERVICE_LEASE_MS;
    match state
        .shared
        .store
        .heartbeat_session(&zone_id, &id, generation, deadline)
        .await
    {
        Ok(()) => Ok(Json(
            json!({"agent": lease_body("active", deadline, generation)}),
        )),
        Err(caracal_store::StoreError::Conflict(_)) => {
            Err(lease_refusal(&state, &zone_id, &id).await)
        }
        Err(error) => Err(error.into()),
    }
}

/// `POST …/agents/{id}/lease`: takes the lease (the next generation), fencing the previous
/// holder.
async fn lease(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    authenticate_for(&state, &headers, &zone_id, &id).await?;
    let deadline = now_ms() + SERVICE_LEASE_MS;
    match state
        .shared
        .store
        .acquire_session_lease(&zone_id, &id, deadline)
        .await
    {
        Ok(generation) => Ok(Json(lease_body("active", deadline, generation))),
        Err(caracal_store::StoreError::Conflict(_)) => {
            Err(lease_refusal(&state, &zone_id, &id).await)
        }
        Err(error) => Err(error.into()),
    }
}

/// `POST …/agents/{id}/suspend`: the session stops minting at once (the STS reads its status)
/// and resource servers are told through `caracal.sessions.revoke`; `resume` lifts it.
async fn suspend(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<axum::Extension<caracal_core::RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    set_status(
        &state,
        &headers,
        request_id.as_deref(),
        &zone_id,
        &id,
        "suspended",
    )
    .await
}

async fn resume(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<axum::Extension<caracal_core::RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    set_status(
        &state,
        &headers,
        request_id.as_deref(),
        &zone_id,
        &id,
        "active",
    )
    .await
}

async fn set_status(
    state: &RoleState,
    headers: &HeaderMap,
    request_id: Option<&caracal_core::RequestId>,
    zone_id: &str,
    id: &str,
    status: &str,
) -> Result<Json<Value>, ApiError> {
    let caller = operator_or_agent(state, headers, zone_id, Some(id), Access::Write).await?;
    let store = state.shared.store.as_ref();
    let session = store
        .get_session(zone_id, id)
        .await?
        .filter(|session| matches!(session.status.as_str(), "active" | "suspended"))
        .ok_or_else(|| not_found(id))?;
    if !caller.acts_for(&session.application_id) {
        return Err(ApiError::new(ErrorCode::ParentOwnershipRequired));
    }
    let action = if status == "suspended" {
        "session.suspend"
    } else {
        "session.resume"
    };
    let evidence = change_evidence(&change_event(
        &caller, zone_id, action, "session", id, request_id,
    ))?;
    let outbox: Vec<OutboxMessage> = (status == "suspended")
        .then(|| OutboxMessage {
            stream: SESSIONS_REVOKE.to_owned(),
            fields: [
                ("zone_id", zone_id.to_owned()),
                ("agent_session_id", id.to_owned()),
                ("reason", "session_suspended".to_owned()),
            ]
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
            dedupe_key: None,
        })
        .into_iter()
        .chain([evidence])
        .collect();
    store
        .set_session_status(zone_id, id, status, None, &outbox)
        .await?;
    let session = store
        .get_session(zone_id, id)
        .await?
        .ok_or_else(|| not_found(id))?;
    Ok(Json(session_body(&session)))
}

/// Ends sessions whose task TTL or service lease ran out, each with its subtree and edges
/// and their revocation messages, as a termination would. Runs on one replica at a time.
pub async fn sweep_lapsed(store: &dyn caracal_store::Store) {
    let lapsed = match store.lapsed_sessions(now_ms(), 500).await {
        Ok(lapsed) => lapsed,
        Err(error) => {
            tracing::warn!(%error, "session sweep could not read; the next run retries");
            return;
        }
    };
    for (zone_id, id) in lapsed {
        if let Err(error) = store
            .terminate_session_tree(&zone_id, &id, "session_expired", revocations)
            .await
        {
            tracing::warn!(%error, zone = %zone_id, session = %id, "could not end a lapsed session");
        }
    }
}

/// Deletes sessions, edges and authority records that ended more than `keep` ago, in batches,
/// as a singleton job. `keep` is longer than the Gateway's 24 h revocation window, so nothing
/// it still has to refuse disappears from its snapshot.
pub async fn purge_ended(store: &dyn caracal_store::Store, keep: std::time::Duration) {
    const BATCH: i64 = 5_000;
    let before = now_ms() - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX / 2);
    for _ in 0..100 {
        match store.purge_ended_runtime(before, BATCH).await {
            Ok(0) => return,
            Ok(purged) => {
                tracing::debug!(purged, "ended sessions, edges and records purged");
                if purged < u64::try_from(BATCH).unwrap_or(u64::MAX) {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "runtime retention failed; the next run retries");
                return;
            }
        }
    }
}

/// What a revocation would take down, without taking it: `affected_sessions` (also as
/// `affected_agents`) and `affected_edges`; for an edge's impact also its `edge_id`, where the
/// published admin client reads it.
pub(super) fn impact_body(tree: &TerminatedTree, edge_id: Option<&str>) -> Value {
    let sessions: Vec<&str> = tree.sessions.iter().map(|(id, _)| id.as_str()).collect();
    let edges: Vec<&str> = tree.edges.iter().map(|(id, _)| id.as_str()).collect();
    let mut body = json!({
        "affected_sessions": sessions,
        "affected_agents": sessions,
        "affected_edges": edges,
        "graph_epoch": tree.epoch,
    });
    if let (Some(edge_id), Some(fields)) = (edge_id, body.as_object_mut()) {
        fields.insert("edge_id".to_owned(), Value::from(edge_id));
    }
    body
}

async fn session_impact(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    operator_or_agent(&state, &headers, &zone_id, Some(&id), Access::Read).await?;
    let tree = state
        .shared
        .store
        .session_tree_impact(&zone_id, &id)
        .await
        .map_err(|error| match error {
            caracal_store::StoreError::NotFound(_) => not_found(&id),
            other => other.into(),
        })?;
    Ok(Json(impact_body(&tree, None)))
}

/// `GET …/agents/{id}/children`: the session's direct children, oldest first.
async fn children(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    operator_or_agent(&state, &headers, &zone_id, Some(&id), Access::Read).await?;
    let store = state.shared.store.as_ref();
    if store.get_session(&zone_id, &id).await?.is_none() {
        return Err(not_found(&id));
    }
    let items: Vec<Value> = store
        .list_child_sessions(&zone_id, &id)
        .await?
        .iter()
        .map(session_body)
        .collect();
    Ok(Json(json!({ "items": items, "next_cursor": Value::Null })))
}

/// `GET …/agents/{id}/effective-authority`: what the session may act with now: its live
/// inbound edges (a delegated mint names one of them) and the scopes they reach together.
async fn effective_authority(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    operator_or_agent(&state, &headers, &zone_id, Some(&id), Access::Read).await?;
    let store = state.shared.store.as_ref();
    let session = store
        .get_session(&zone_id, &id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    let now = now_ms();
    let live = session.live(now);
    let edges: Vec<caracal_store::DelegationEdge> = if live {
        store
            .list_edges_to(&zone_id, &id)
            .await?
            .into_iter()
            .filter(|edge| edge.live(now))
            .collect()
    } else {
        Vec::new()
    };
    let scopes: std::collections::BTreeSet<&str> = edges
        .iter()
        .flat_map(|edge| edge.scopes.iter().map(String::as_str))
        .collect();
    Ok(Json(json!({
        "agent_session_id": session.id,
        "zone_id": session.zone_id,
        "application_id": session.application_id,
        "status": session.status,
        "live": live,
        "inbound_edges": edges.iter().map(delegations::body).collect::<Vec<Value>>(),
        "scopes": scopes,
    })))
}

#[derive(Debug, Default, Deserialize)]
struct TerminateQuery {
    reason: Option<String>,
}

/// `DELETE /zones/{zone}/agents/{id}`: the session, its subtree and every edge touching them,
/// in one transaction whose outbox carries one `caracal.sessions.revoke` message per session
/// and the new epoch on `caracal.delegations.invalidate`. Terminating a terminated session
/// again changes nothing and answers the same.
async fn terminate(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<axum::Extension<caracal_core::RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
    Query(query): Query<TerminateQuery>,
    raw: Bytes,
) -> Result<Response, ApiError> {
    let caller = operator_or_agent(&state, &headers, &zone_id, Some(&id), Access::Write).await?;
    let store = state.shared.store.as_ref();
    let session = store
        .get_session(&zone_id, &id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    if !caller.acts_for(&session.application_id) {
        return Err(ApiError::new(ErrorCode::ParentOwnershipRequired));
    }
    let reason = query
        .reason
        .filter(|reason| !reason.is_empty() && reason.len() <= 200)
        .unwrap_or_else(|| "session_terminated".to_owned());
    let ending = matches!(session.status.as_str(), "active" | "suspended");
    // An agent ends a service session only as the holder of its current lease (the body names
    // it); an operator ends it whoever holds the lease.
    if ending && session.lifecycle == "service" && matches!(caller, Caller::Agent(_)) {
        let generation = (!raw.is_empty())
            .then(|| serde_json::from_slice::<HeartbeatRequest>(&raw))
            .transpose()
            .map_err(|error| invalid(format!("invalid body: {error}")))?
            .and_then(|body| body.lease_generation)
            .ok_or_else(|| ApiError::new(ErrorCode::LeaseGenerationRequired))?;
        if generation != session.lease_generation {
            return Err(ApiError::new(ErrorCode::SessionLeaseFenced));
        }
    }
    if ending {
        record_change(
            &state,
            change_event(
                &caller,
                &zone_id,
                "session.terminate",
                "session",
                &id,
                request_id.as_deref(),
            ),
        )
        .await?;
    }
    store
        .terminate_session_tree(&zone_id, &id, &reason, revocations)
        .await
        .map_err(|error| match error {
            caracal_store::StoreError::NotFound(_) => not_found(&id),
            other => other.into(),
        })?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Starts the Coordinator's in-memory state.
pub fn start_state(issuer: String, limits: Limits) -> Arc<Coordinator> {
    Arc::new(Coordinator {
        issuer,
        keys: KeyRing::default(),
        limits,
    })
}

#[cfg(test)]
mod tests;
