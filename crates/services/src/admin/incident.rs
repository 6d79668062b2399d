//! `/v1/incident/*`: the containment switches of the incident runbook. `freeze` refuses policy
//! activations, provider and resource changes (423 `change_freeze`; revocation, rollback and
//! rotation stay allowed); `fail_closed` refuses protected traffic at the STS and the Gateway
//! (503 `contained`), for the deployment or one zone. `POST /v1/zones/{zone}/sessions/{id}/
//! terminate` ends a session with its subtree and delegations from the operator's side. Every
//! action carries the operator's reason into its audit event, in the action's transaction.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use caracal_store::{Containment, now_ms};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Change, invalid_body, json, live_zone};
use crate::auth::{Access, AdminCaller, authenticate};
use crate::containment::{FAIL_CLOSED, FREEZE};
use crate::error::ApiError;
use crate::state::RoleState;

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/incident/containment", get(status))
        .route("/v1/incident/logs", get(logs))
        .route("/v1/incident/contain", post(contain))
        .route("/v1/incident/release", post(release))
        .route(
            "/v1/zones/{zone_id}/sessions/{session_id}/terminate",
            post(terminate_session),
        )
        .route(
            "/v1/zones/{zone_id}/applications/{application_id}/revoke",
            post(revoke_application),
        )
        .route(
            "/v1/zones/{zone_id}/invalidate-sessions",
            post(invalidate_zone),
        )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Switches {
    #[serde(default)]
    freeze: bool,
    #[serde(default)]
    fail_closed: bool,
    /// Only with `fail_closed`: one zone instead of the deployment.
    #[serde(default)]
    zone_id: Option<String>,
    reason: String,
}

/// 423 `change_freeze` while a freeze is in force.
pub(super) fn refuse_when_frozen(state: &RoleState) -> Result<(), ApiError> {
    if state.shared.containment.frozen() {
        return Err(ApiError::new(ErrorCode::ChangeFreeze));
    }
    Ok(())
}

pub(super) fn valid_reason(reason: &str) -> Result<String, ApiError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 || reason.chars().any(char::is_control) {
        return Err(invalid_body("reason", "1 to 500 printable characters"));
    }
    Ok(reason.to_owned())
}

fn body(state: &RoleState) -> Value {
    let switches: Vec<Value> = state
        .shared
        .containment
        .switches()
        .iter()
        .map(|switch| {
            json!({
                "kind": switch.kind,
                "zone_id": (!switch.zone_id.is_empty()).then_some(&switch.zone_id),
                "reason": switch.reason,
                "actor": switch.actor,
                "since": super::timestamp(switch.since_ms),
            })
        })
        .collect();
    json!({
        "frozen": state.shared.containment.frozen(),
        "switches": switches,
    })
}

async fn status(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authenticate(&state, &headers)
        .await?
        .require(Access::Read, None)?;
    state
        .shared
        .containment
        .refresh(state.shared.store.as_ref())
        .await?;
    Ok(Json(body(&state)))
}

/// This process's recent log lines (JSON, oldest first): for the evidence bundle.
async fn logs(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authenticate(&state, &headers)
        .await?
        .require(Access::Read, None)?;
    Ok(Json(json!({ "lines": crate::recent_logs::recent() })))
}

/// The switches a request names, as `(kind, zone)`; at least one.
fn named(request: &Switches) -> Result<Vec<(&'static str, String)>, ApiError> {
    let zone = request.zone_id.clone().unwrap_or_default();
    if !zone.is_empty() && !request.fail_closed {
        return Err(invalid_body("zone_id", "only with fail_closed"));
    }
    let mut switches = Vec::new();
    if request.freeze {
        switches.push((FREEZE, String::new()));
    }
    if request.fail_closed {
        switches.push((FAIL_CLOSED, zone));
    }
    if switches.is_empty() {
        return Err(invalid_body("", "name a switch: freeze or fail_closed"));
    }
    Ok(switches)
}

/// The audit event of a containment action, with the operator's reason.
fn evidence(
    caller: &AdminCaller,
    request_id: Option<&RequestId>,
    action: &'static str,
    kind: &str,
    zone_id: &str,
    reason: &str,
) -> Result<caracal_store::OutboxMessage, ApiError> {
    let mut event = super::audit_event(
        caller,
        request_id,
        Change {
            zone_id: if zone_id.is_empty() {
                crate::ledger::SYSTEM_ZONE
            } else {
                zone_id
            },
            action,
            entity_type: "containment",
            entity_id: kind,
            fields: vec!["state", "reason"],
        },
    );
    if let Some(metadata) = event.metadata_json.as_object_mut() {
        metadata.insert("reason".to_owned(), json!(reason));
        metadata.insert(
            "scope".to_owned(),
            json!(if zone_id.is_empty() {
                "deployment"
            } else {
                zone_id
            }),
        );
    }
    crate::evidence::outbox_message(&event).ok_or_else(|| ApiError::new(ErrorCode::InternalError))
}

async fn contain(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    switch(&state, &headers, request_id.as_deref(), &raw, true).await
}

async fn release(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    switch(&state, &headers, request_id.as_deref(), &raw, false).await
}

/// Turns the named switches on or off, each with its audit event in its own transaction;
/// switching off what is off changes nothing. A zone's switch is turned on only for a live
/// zone, and off for any zone the token may act on.
async fn switch(
    state: &RoleState,
    headers: &http::HeaderMap,
    request_id: Option<&RequestId>,
    raw: &[u8],
    on: bool,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(state, headers).await?;
    let request: Switches = json(raw)?;
    let reason = valid_reason(&request.reason)?;
    let action = if on {
        "incident.contain"
    } else {
        "incident.release"
    };
    for (kind, zone) in named(&request)? {
        if zone.is_empty() {
            caller.require(Access::Write, None)?;
        } else if on {
            live_zone(state, &caller, &zone, Access::Write).await?;
        } else {
            caller.require(Access::Write, Some(&zone))?;
        }
        let outbox = evidence(&caller, request_id, action, kind, &zone, &reason)?;
        let store = state.shared.store.as_ref();
        if on {
            let switch = Containment {
                kind: kind.to_owned(),
                zone_id: zone.clone(),
                reason: reason.clone(),
                actor: caller.actor(),
                since_ms: now_ms(),
            };
            store.set_containment(&switch, &[outbox]).await?;
        } else {
            match store.clear_containment(kind, &zone, &[outbox]).await {
                Ok(()) | Err(caracal_store::StoreError::NotFound(_)) => {}
                Err(other) => return Err(other.into()),
            }
        }
    }
    state
        .shared
        .containment
        .refresh(state.shared.store.as_ref())
        .await?;
    tracing::warn!(reason = %reason, on, "incident containment switched");
    Ok(Json(body(state)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    reason: String,
}

/// Ends a session with its subtree and every delegation touching it, as the Coordinator's
/// terminate does, from the operator's side (no lifecycle mandate needed).
async fn terminate_session(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, session_id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let operator = Operator::authorise(&state, &headers, &zone_id, &raw).await?;
    // Evidence first: the termination is recorded before it is applied.
    operator
        .record(
            &state,
            request_id.as_deref(),
            Change {
                zone_id: &zone_id,
                action: "session.terminate",
                entity_type: "session",
                entity_id: &session_id,
                fields: vec!["status", "reason"],
            },
        )
        .await?;
    let tree = state
        .shared
        .store
        .terminate_session_tree(
            &zone_id,
            &session_id,
            "operator_terminated",
            crate::propagation::revocations,
        )
        .await
        .map_err(|error| match error {
            caracal_store::StoreError::NotFound(_) => ApiError::with_description(
                ErrorCode::NotFound,
                format!("session `{session_id}` not found"),
            ),
            other => other.into(),
        })?;
    Ok(Json(json!({
        "terminated_sessions": tree.sessions.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        "revoked_edges": tree.edges.iter().map(|(id, _)| id).collect::<Vec<_>>(),
        "graph_epoch": tree.epoch,
    })))
}

/// Terminates every live session of the zone (of `application_id` only, if given), with
/// their subtrees and delegations; returns the ended sessions and revoked edges.
async fn end_sessions(
    state: &RoleState,
    zone_id: &str,
    application_id: Option<&str>,
    reason: &str,
) -> Result<(Vec<String>, Vec<String>), ApiError> {
    let store = state.shared.store.as_ref();
    let (mut sessions, mut edges) = (Vec::new(), Vec::new());
    for session in store.list_sessions(zone_id).await? {
        if !matches!(session.status.as_str(), "active" | "suspended")
            || application_id.is_some_and(|app| session.application_id != app)
        {
            continue;
        }
        match store
            .terminate_session_tree(
                zone_id,
                &session.id,
                reason,
                crate::propagation::revocations,
            )
            .await
        {
            Ok(tree) => {
                sessions.extend(tree.sessions.into_iter().map(|(id, _)| id));
                edges.extend(tree.edges.into_iter().map(|(id, _)| id));
            }
            // Already ended with an earlier session's subtree.
            Err(
                caracal_store::StoreError::NotFound(_) | caracal_store::StoreError::Conflict(_),
            ) => {}
            Err(other) => return Err(other.into()),
        }
    }
    Ok((sessions, edges))
}

/// An operator's action on a zone: a write token for the live zone, and a reason.
struct Operator {
    caller: AdminCaller,
    reason: String,
}

impl Operator {
    async fn authorise(
        state: &RoleState,
        headers: &http::HeaderMap,
        zone_id: &str,
        raw: &[u8],
    ) -> Result<Operator, ApiError> {
        let caller = authenticate(state, headers).await?;
        live_zone(state, &caller, zone_id, Access::Write).await?;
        let request: ReasonBody = json(raw)?;
        Ok(Operator {
            caller,
            reason: valid_reason(&request.reason)?,
        })
    }

    /// Records the action's audit event, with the reason, before it is applied.
    async fn record(
        &self,
        state: &RoleState,
        request_id: Option<&RequestId>,
        change: Change<'_>,
    ) -> Result<(), ApiError> {
        let mut event = super::audit_event(&self.caller, request_id, change);
        if let Some(metadata) = event.metadata_json.as_object_mut() {
            metadata.insert("reason".to_owned(), json!(self.reason));
        }
        super::record_now(state, event).await
    }
}

/// Revokes everything issued to an application: its sessions (with subtrees and
/// delegations) and the authority records it holds as a subject. Its secret is unchanged:
/// rotate it too (`caracal incident rotate app-secret`) to stop new mints.
async fn revoke_application(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, application_id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let operator = Operator::authorise(&state, &headers, &zone_id, &raw).await?;
    if state
        .shared
        .store
        .get_application(&zone_id, &application_id)
        .await?
        .is_none()
    {
        return Err(ApiError::with_description(
            ErrorCode::NotFound,
            format!("application `{application_id}` not found"),
        ));
    }
    operator
        .record(
            &state,
            request_id.as_deref(),
            Change {
                zone_id: &zone_id,
                action: "application.revoke",
                entity_type: "application",
                entity_id: &application_id,
                fields: vec!["sessions", "authority_records"],
            },
        )
        .await?;
    let (sessions, edges) = end_sessions(
        &state,
        &zone_id,
        Some(&application_id),
        "application_revoked",
    )
    .await?;
    let tree = state
        .shared
        .store
        .revoke_subject(
            &zone_id,
            &application_id,
            "application_revoked",
            crate::propagation::revocations,
        )
        .await?;
    Ok(Json(json!({
        "terminated_sessions": sessions,
        "revoked_edges": edges,
        "revoked_authority_records": tree.records,
    })))
}

/// After a signing key's exposure: every live session of the zone ends and every active
/// authority record is revoked, so nothing minted under the old key can be used.
async fn invalidate_zone(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let operator = Operator::authorise(&state, &headers, &zone_id, &raw).await?;
    operator
        .record(
            &state,
            request_id.as_deref(),
            Change {
                zone_id: &zone_id,
                action: "zone.invalidate_sessions",
                entity_type: "zone",
                entity_id: &zone_id,
                fields: vec!["sessions", "authority_records"],
            },
        )
        .await?;
    let (sessions, edges) = end_sessions(&state, &zone_id, None, "sessions_invalidated").await?;
    let records = state
        .shared
        .store
        .revoke_zone_authority(
            &zone_id,
            "sessions_invalidated",
            crate::propagation::record_revocations,
        )
        .await?;
    Ok(Json(json!({
        "terminated_sessions": sessions,
        "revoked_edges": edges,
        "revoked_authority_records": records,
    })))
}
