//! `GET`/`PUT /v1/audit-retention`: how long the ledger keeps rows. The deployment's
//! `audit.retention_days` is the ceiling; an operator with a deployment-wide write token may
//! shorten it (recorded, and refused during a freeze: a tamper incident must not lose rows to
//! cleanup), never lengthen it. The Audit role's sweep reads it at every pass.

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::get;
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use caracal_store::{DeploymentSetting, now_ms};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Change, evidence, invalid_body, json, timestamp};
use crate::auth::{Access, authenticate};
use crate::error::ApiError;
use crate::ledger::{RETENTION_SETTING, SYSTEM_ZONE};
use crate::state::RoleState;

pub fn routes() -> Router<RoleState> {
    Router::new().route("/v1/audit-retention", get(read).put(update))
}

const DAY_SECONDS: u64 = 86_400;

async fn read(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authenticate(&state, &headers)
        .await?
        .require(Access::Read, None)?;
    answer(&state).await
}

async fn answer(state: &RoleState) -> Result<Json<Value>, ApiError> {
    let stored = state.shared.store.get_setting(RETENTION_SETTING).await?;
    let operator_days = stored
        .as_ref()
        .and_then(|setting| setting.value.parse::<u64>().ok());
    let ceiling = state.shared.audit_retention;
    let effective = crate::ledger::effective_retention(ceiling, operator_days);
    Ok(Json(json!({
        // `null`: rows are kept for ever.
        "retention_days": effective.map(|keep| keep.as_secs() / DAY_SECONDS),
        "max_days": ceiling.map(|keep| keep.as_secs() / DAY_SECONDS),
        "updated_by": stored.as_ref().map(|setting| setting.updated_by.clone()),
        "updated_at": stored.as_ref().map(|setting| timestamp(setting.updated_at_ms)),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Update {
    retention_days: u64,
}

async fn update(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Write, None)?;
    let update: Update = json(&raw)?;
    if update.retention_days == 0 {
        return Err(invalid_body("retention_days", "must be at least 1"));
    }
    if let Some(ceiling) = state.shared.audit_retention
        && update.retention_days > ceiling.as_secs() / DAY_SECONDS
    {
        return Err(ApiError::with_description(
            ErrorCode::RetentionAboveLimit,
            format!(
                "at most {} days (audit.retention_days)",
                ceiling.as_secs() / DAY_SECONDS
            ),
        ));
    }
    super::incident::refuse_when_frozen(&state)?;
    let audit = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: SYSTEM_ZONE,
            action: "audit_retention.update",
            entity_type: "audit_retention",
            entity_id: RETENTION_SETTING,
            fields: vec!["retention_days"],
        },
    )?;
    let setting = DeploymentSetting {
        name: RETENTION_SETTING.to_owned(),
        value: update.retention_days.to_string(),
        updated_by: caller.actor(),
        updated_at_ms: now_ms(),
    };
    state
        .shared
        .store
        .put_setting(&setting, std::slice::from_ref(&audit))
        .await?;
    answer(&state).await
}
