//! `/v1/zones/{zone_id}/subjects/revoke` (`{subject_id, reason?}`, the published admin
//! client's form) and `/v1/zones/{zone_id}/subjects/{subject_id}/revoke`: the subject kill
//! switch. Everything
//! issued for a subject goes at once: its authority records, every session bound to them
//! (with their subtrees) and every delegation touching those, with the revocation messages
//! in the same transaction.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Extension, Json, Router};
use caracal_core::RequestId;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Change, invalid_body, json};
use crate::auth::Access;
use crate::error::ApiError;
use crate::state::RoleState;

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/zones/{zone_id}/subjects/revoke", post(revoke_named))
        .route(
            "/v1/zones/{zone_id}/subjects/{subject_id}/revoke",
            post(revoke),
        )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeNamedRequest {
    subject_id: String,
    #[serde(default)]
    reason: Option<String>,
}

async fn revoke_named(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: RevokeNamedRequest = json(&raw)?;
    let reason = RevokeRequest {
        reason: request.reason,
    };
    kill(
        &state,
        &caller,
        request_id,
        zone_id,
        request.subject_id,
        reason,
    )
    .await
}

async fn revoke(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, subject_id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: RevokeRequest = if raw.is_empty() {
        RevokeRequest::default()
    } else {
        json(&raw)?
    };
    kill(&state, &caller, request_id, zone_id, subject_id, request).await
}

async fn kill(
    state: &RoleState,
    caller: &crate::auth::AdminCaller,
    request_id: Option<Extension<RequestId>>,
    zone_id: String,
    subject_id: String,
    request: RevokeRequest,
) -> Result<Json<Value>, ApiError> {
    if request
        .reason
        .as_deref()
        .is_some_and(|reason| reason.chars().count() > 500)
    {
        return Err(invalid_body("reason", "at most 500 characters"));
    }
    if subject_id.is_empty() || subject_id.len() > 512 {
        return Err(invalid_body("subject_id", "1 to 512 bytes"));
    }
    // Evidence first: the revocation is recorded before it is applied.
    let event = super::audit_event(
        caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "subject.revoke",
            entity_type: "subject",
            entity_id: &subject_id,
            fields: if request.reason.is_some() {
                vec!["status", "reason"]
            } else {
                vec!["status"]
            },
        },
    );
    super::record_now(state, event).await?;
    let tree = state
        .shared
        .store
        .revoke_subject(
            &zone_id,
            &subject_id,
            "subject_revoked",
            crate::propagation::revocations,
        )
        .await?;
    Ok(Json(json!({
        "subject_id": subject_id,
        "revoked_records": tree.records.len(),
        "terminated_sessions": tree.sessions.len(),
        "revoked_edges": tree.edges.len(),
        "graph_epoch": tree.epoch,
    })))
}
