//! `/v1/zones/{zone}/approvals`: human-approval holds the STS raised, with their derived state,
//! and the operator's decision (approve capability only).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use caracal_store::{ApprovalHold, now_ms};
use http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{invalid_body, json, on_conflict, page, timestamp};
use crate::auth::Access;
use crate::error::ApiError;
use crate::state::RoleState;
use crate::wire::Page;

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/zones/{zone_id}/approvals", get(list))
        .route("/v1/zones/{zone_id}/approvals/counts", get(counts))
        .route("/v1/zones/{zone_id}/approvals/{id}", get(read))
        .route("/v1/zones/{zone_id}/approvals/{id}/approve", post(approve))
        .route("/v1/zones/{zone_id}/approvals/{id}/reject", post(reject))
}

const STATES: [&str; 5] = ["pending", "approved", "rejected", "expired", "consumed"];
const MAX_REASON: usize = 500;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    tier: Option<String>,
    principal: Option<String>,
    /// Created at or after / before (RFC 3339 or epoch milliseconds).
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Decision {
    reason: Option<String>,
}

use crate::holds::state_of;

fn body(hold: &ApprovalHold, now: i64) -> Value {
    json!({
        "id": hold.id,
        "zone_id": hold.zone_id,
        "state": state_of(hold, now),
        "tier": hold.tier,
        "approver_class": hold.approver_class,
        "principal_id": hold.principal_id,
        "application_id": hold.application_id,
        "session_id": hold.session_id,
        "binding": hold.binding_hash,
        "metadata": serde_json::from_str::<Value>(&hold.metadata).unwrap_or(Value::Null),
        "created_at": timestamp(hold.created_at_ms),
        "expires_at": timestamp(hold.expires_at_ms),
        "decided_at": hold.decided_at_ms.map(timestamp),
        "decision_reason": hold.decision_reason,
        "approver_id": hold.approver_id,
        "consumed_at": hold.consumed_at_ms.map(timestamp),
    })
}

async fn list(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<Value>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query: ListQuery = crate::api::query(raw.as_deref())?;
    if let Some(wanted) = &query.state
        && !STATES.contains(&wanted.as_str())
    {
        return Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            format!("`state` is one of {}", STATES.join(", ")),
        ));
    }
    let since = crate::api::instant("since", query.since.as_deref())?;
    let until = crate::api::instant("until", query.until.as_deref())?;
    let now = now_ms();
    let holds: Vec<ApprovalHold> = state
        .shared
        .store
        .list_approval_holds(&zone_id)
        .await?
        .into_iter()
        .filter(|hold| {
            query
                .state
                .as_deref()
                .is_none_or(|wanted| state_of(hold, now) == wanted)
        })
        .filter(|hold| query.tier.as_deref().is_none_or(|tier| hold.tier == tier))
        .filter(|hold| {
            query
                .principal
                .as_deref()
                .is_none_or(|principal| hold.principal_id == principal)
        })
        .filter(|hold| since.is_none_or(|since| hold.created_at_ms >= since))
        .filter(|hold| until.is_none_or(|until| hold.created_at_ms < until))
        .collect();
    let paging = super::ListQuery {
        limit: query.limit,
        cursor: query.cursor,
        status: None,
    };
    Ok(Json(page(
        holds,
        |hold| (hold.created_at_ms, hold.id.clone()),
        &paging,
        |hold| body(&hold, now),
    )?))
}

async fn counts(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
) -> Result<Json<BTreeMap<&'static str, u64>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let now = now_ms();
    let mut counts: BTreeMap<&'static str, u64> = STATES.iter().map(|state| (*state, 0)).collect();
    for hold in state.shared.store.list_approval_holds(&zone_id).await? {
        *counts.entry(state_of(&hold, now)).or_default() += 1;
    }
    Ok(Json(counts))
}

async fn hold_of(state: &RoleState, zone_id: &str, id: &str) -> Result<ApprovalHold, ApiError> {
    state
        .shared
        .store
        .get_approval_hold(zone_id, id)
        .await?
        .ok_or_else(|| {
            ApiError::with_description(ErrorCode::NotFound, format!("approval `{id}` not found"))
        })
}

async fn read(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    Ok(Json(body(&hold_of(&state, &zone_id, &id).await?, now_ms())))
}

async fn approve(
    state: State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    path: Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    decide(state, headers, request_id, path, raw, "approved").await
}

async fn reject(
    state: State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    path: Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    decide(state, headers, request_id, path, raw, "rejected").await
}

/// An operator's decision: approve capability, an operator-decidable hold, still pending.
async fn decide(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
    raw: Bytes,
    decision: &'static str,
) -> Result<Json<Value>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Approve).await?;
    let request: Decision = if raw.is_empty() {
        Decision::default()
    } else {
        json(&raw)?
    };
    let reason = request.reason.unwrap_or_default();
    if reason.chars().count() > MAX_REASON || reason.chars().any(char::is_control) {
        return Err(invalid_body(
            "reason",
            &format!("at most {MAX_REASON} printable characters"),
        ));
    }
    let hold = hold_of(&state, &zone_id, &id).await?;
    if !["operator", "any"].contains(&hold.approver_class.as_str()) {
        return Err(ApiError::new(ErrorCode::SubjectApprovalRequired));
    }
    let current = state_of(&hold, now_ms());
    let not_decidable = || {
        ApiError::with_description(
            ErrorCode::ApprovalNotDecidable,
            format!("the approval is {current}"),
        )
        .with_details(json!({ "state": current }))
    };
    if current != "pending" {
        return Err(not_decidable());
    }
    let recorded = crate::sts::decided_event(
        &hold,
        &request_id
            .as_deref()
            .map_or_else(|| "none".to_owned(), ToString::to_string),
        decision,
        &caller.actor(),
        "admin",
    )
    .ok_or_else(|| ApiError::new(ErrorCode::InternalError))?;
    state
        .shared
        .store
        .decide_approval_hold(
            &zone_id,
            &id,
            decision,
            &reason,
            &caller.actor(),
            &[recorded],
        )
        .await
        .map_err(on_conflict(not_decidable()))?;
    Ok(Json(body(&hold_of(&state, &zone_id, &id).await?, now_ms())))
}
