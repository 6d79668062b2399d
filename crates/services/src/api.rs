//! The API role's `/v1` routes that exist so far: the audit tamper findings and their
//! acknowledgement. (Zones, applications and the rest of the admin API land with issue 5.)

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use caracal_audit::Event;
use caracal_core::{ErrorCode, RequestId};
use caracal_store::{StoreError, now_ms};
use http::HeaderMap;
use serde::Deserialize;

use crate::auth::{Access, authenticate};
use crate::error::ApiError;
use crate::evidence::EvidenceError;
use crate::ledger::SYSTEM_ZONE;
use crate::state::RoleState;
use crate::wire::{AckTamperResponse, TamperFindingBody, TamperFindingsResponse};

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/audit/tamper", get(list_tamper))
        .route("/v1/audit/tamper/ack", post(acknowledge_tamper))
}

fn store_error(error: StoreError) -> ApiError {
    match error {
        StoreError::Unavailable(_) => ApiError::new(ErrorCode::StoreUnavailable),
        other => {
            tracing::error!(error = %other, "store failure");
            ApiError::new(ErrorCode::InternalError)
        }
    }
}

/// Invariant 5: the change is not made (nor reported) unless its evidence is accepted.
pub fn evidence_error(error: EvidenceError) -> ApiError {
    match error {
        EvidenceError::Overloaded => ApiError::new(ErrorCode::AuditOverloaded),
        EvidenceError::Lost | EvidenceError::Stopped => ApiError::new(ErrorCode::AuditEvidenceLost),
    }
}

async fn list_tamper(
    State(state): State<RoleState>,
    headers: HeaderMap,
) -> Result<Json<TamperFindingsResponse>, ApiError> {
    authenticate(&state, &headers)
        .await?
        .require(Access::Read, None)?;
    let findings = state
        .shared
        .store
        .open_tamper_findings()
        .await
        .map_err(store_error)?;
    Ok(Json(TamperFindingsResponse {
        items: findings
            .into_iter()
            .map(|finding| TamperFindingBody {
                zone_id: finding.zone_id,
                seq: finding.seq,
                kind: finding.kind,
                detail: finding.detail,
                found_at_ms: finding.found_at_ms,
            })
            .collect(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckRequest {
    reason: String,
}

async fn acknowledge_tamper(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<axum::Extension<RequestId>>,
    body: Bytes,
) -> Result<Json<AckTamperResponse>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Write, None)?;
    let request: AckRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::with_description(
            ErrorCode::InvalidRequest,
            format!("body must be {{\"reason\": \"…\"}}: {error}"),
        )
    })?;
    let reason = request.reason.trim();
    if reason.is_empty() || reason.len() > 1000 {
        return Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            "`reason` must be 1 to 1000 characters",
        ));
    }
    let open = state
        .shared
        .store
        .open_tamper_findings()
        .await
        .map_err(store_error)?;
    let event = Event {
        id: uuid::Uuid::now_v7().to_string(),
        zone_id: SYSTEM_ZONE.to_owned(),
        event_type: "audit.tamper_acknowledged".to_owned(),
        request_id: request_id.map_or_else(|| "none".to_owned(), |id| id.0.to_string()),
        decision: "allow".to_owned(),
        policy_set_id: None,
        policy_set_version_id: None,
        manifest_sha: None,
        evaluation_status: "complete".to_owned(),
        determining_policies_json: serde_json::json!([]),
        diagnostics_json: serde_json::json!([]),
        metadata_json: serde_json::json!({
            "acknowledged_by": caller.token_id,
            "reason": reason,
            "open_findings": open.len(),
        }),
        occurred_at_ms: now_ms(),
    };
    state
        .shared
        .evidence
        .record(event)
        .await
        .map_err(evidence_error)?;
    let acknowledged = state
        .shared
        .store
        .acknowledge_tamper_findings(&format!("admin:{}", caller.token_id), reason)
        .await
        .map_err(store_error)?;
    Ok(Json(AckTamperResponse { acknowledged }))
}
