//! Deployment-wide settings an operator may lower at run time, never raise past the
//! deployment's configuration (a deployment-wide write token; every change recorded):
//! - `GET`/`PUT /v1/audit-retention`: how long the ledger keeps rows, at most
//!   `audit.retention_days`; refused during a freeze (a tamper incident must not lose rows to
//!   cleanup). The Audit role's sweep reads it at every pass.
//! - `GET`/`PUT /v1/mint-rate-limit`: mints per (zone, resource, application) and minute, at
//!   most `sts.mint_rate_limit_per_minute`; allowed during a freeze (lowering it contains).
//!   Every STS replica re-reads it within `sts::MINT_LIMIT_REFRESH`.
//! - `GET /v1/outbox/dead`, `POST /v1/outbox/{id}/requeue` and `POST /v1/outbox/requeue-dead`:
//!   the outbox rows given up on (a change other roles never heard of, which keeps the API role
//!   not ready), and sending them again once the cause is fixed, recorded with the change.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
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
use crate::sts::{MINT_LIMIT_REFRESH, MINT_LIMIT_SETTING, effective_mint_limit};

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/audit-retention", get(read).put(update))
        .route(
            "/v1/mint-rate-limit",
            get(read_mint_limit).put(update_mint_limit),
        )
        .route("/v1/outbox/dead", get(dead_outbox))
        .route("/v1/outbox/{id}/requeue", post(requeue_one))
        .route("/v1/outbox/requeue-dead", post(requeue_all))
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
    let change = Change {
        zone_id: SYSTEM_ZONE,
        action: "audit_retention.update",
        entity_type: "audit_retention",
        entity_id: RETENTION_SETTING,
        fields: vec!["retention_days"],
    };
    let value = update.retention_days.to_string();
    store_setting(&state, &caller, request_id.as_deref(), change, value).await?;
    answer(&state).await
}

/// Records `change` and stores its setting in one transaction.
async fn store_setting(
    state: &RoleState,
    caller: &crate::auth::AdminCaller,
    request_id: Option<&RequestId>,
    change: Change<'_>,
    value: String,
) -> Result<(), ApiError> {
    let name = change.entity_id.to_owned();
    let audit = evidence(caller, request_id, change)?;
    let setting = DeploymentSetting {
        name,
        value,
        updated_by: caller.actor(),
        updated_at_ms: now_ms(),
    };
    state
        .shared
        .store
        .put_setting(&setting, std::slice::from_ref(&audit))
        .await?;
    Ok(())
}

async fn read_mint_limit(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authenticate(&state, &headers)
        .await?
        .require(Access::Read, None)?;
    mint_limit_answer(&state).await
}

async fn mint_limit_answer(state: &RoleState) -> Result<Json<Value>, ApiError> {
    let stored = state.shared.store.get_setting(MINT_LIMIT_SETTING).await?;
    let operator = stored
        .as_ref()
        .and_then(|setting| setting.value.parse::<u64>().ok());
    let ceiling = state.shared.mint_limit_ceiling;
    Ok(Json(json!({
        "limit_per_minute": effective_mint_limit(ceiling, operator),
        "max_per_minute": ceiling,
        "refresh_seconds": MINT_LIMIT_REFRESH.as_secs(),
        "updated_by": stored.as_ref().map(|setting| setting.updated_by.clone()),
        "updated_at": stored.as_ref().map(|setting| timestamp(setting.updated_at_ms)),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MintLimitUpdate {
    limit_per_minute: u64,
}

async fn update_mint_limit(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Write, None)?;
    let update: MintLimitUpdate = json(&raw)?;
    if update.limit_per_minute == 0 {
        return Err(invalid_body("limit_per_minute", "must be at least 1"));
    }
    let ceiling = state.shared.mint_limit_ceiling;
    if update.limit_per_minute > ceiling {
        return Err(ApiError::with_description(
            ErrorCode::MintRateLimitAboveLimit,
            format!("at most {ceiling} a minute (sts.mint_rate_limit_per_minute)"),
        ));
    }
    let change = Change {
        zone_id: SYSTEM_ZONE,
        action: "mint_rate_limit.update",
        entity_type: "mint_rate_limit",
        entity_id: MINT_LIMIT_SETTING,
        fields: vec!["limit_per_minute"],
    };
    let value = update.limit_per_minute.to_string();
    store_setting(&state, &caller, request_id.as_deref(), change, value).await?;
    // This process's STS, when it runs here, applies it at once; others at their next refresh.
    if let Some(sts) = &state.sts
        && let Err(error) = sts.refresh_mint_limit(&*state.shared.store).await
    {
        tracing::warn!(%error, "mint limit stored; this replica applies it at its next refresh");
    }
    mint_limit_answer(&state).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadQuery {
    limit: Option<i64>,
}

async fn dead_outbox(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    authenticate(&state, &headers)
        .await?
        .require(Access::Read, None)?;
    let query: DeadQuery = crate::api::query(raw.as_deref())?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            "`limit` must be 1 to 1000",
        ));
    }
    let store = &state.shared.store;
    let rows = store.dead_outbox(limit).await?;
    Ok(Json(json!({
        "dead_total": store.outbox_stats().await?.dead,
        "items": rows.iter().map(|row| json!({
            "id": row.id,
            "stream": row.stream,
            "dedupe_key": row.dedupe_key,
            "attempts": row.attempts,
            "last_error": row.last_error,
            "created_at": timestamp(row.created_at_ms),
        })).collect::<Vec<_>>(),
    })))
}

async fn requeue_one(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Write, None)?;
    let not_dead =
        || ApiError::with_description(ErrorCode::NotFound, format!("no dead outbox row `{id}`"));
    let row_id: i64 = id.parse().map_err(|_| not_dead())?;
    requeue(&state, &caller, request_id, Some(row_id), &id)
        .await?
        .filter(|requeued| *requeued > 0)
        .map(|requeued| Json(json!({ "requeued": requeued })))
        .ok_or_else(not_dead)
}

async fn requeue_all(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Write, None)?;
    let requeued = requeue(&state, &caller, request_id, None, "all").await?;
    Ok(Json(json!({ "requeued": requeued.unwrap_or(0) })))
}

/// Revives dead row `id` (every one when `None`) with its evidence in the same transaction;
/// `None` when nothing was dead, so nothing was changed or recorded.
async fn requeue(
    state: &RoleState,
    caller: &crate::auth::AdminCaller,
    request_id: Option<Extension<RequestId>>,
    id: Option<i64>,
    entity_id: &str,
) -> Result<Option<u64>, ApiError> {
    let store = &state.shared.store;
    // Dead rows are few (each keeps the API role not ready), so all of them are read.
    let dead = store.dead_outbox(i64::MAX).await?;
    if !dead.iter().any(|row| id.is_none_or(|id| row.id == id)) {
        return Ok(None);
    }
    let change = Change {
        zone_id: SYSTEM_ZONE,
        action: "outbox.requeue",
        entity_type: "outbox",
        entity_id,
        fields: vec!["status", "attempts"],
    };
    let audit = evidence(caller, request_id.as_deref(), change)?;
    let requeued = store
        .requeue_dead_outbox(id, std::slice::from_ref(&audit))
        .await?;
    Ok(Some(requeued))
}
