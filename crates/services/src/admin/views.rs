//! Read views over runtime state for operators and the published admin client:
//! `/v1/zones/{zone}/authority-records`, `/sessions` (with each session's subject) and
//! `/admin-audit` (the zone's admin changes from the ledger). Pages of 100 by default, at most
//! 1,000, with an opaque cursor; unknown filters are refused. `/overview` is the dashboard's
//! one read: counts over the zone's objects and its last day of decisions.

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::routing::get;
use axum::{Json, Router};
use caracal_core::ErrorCode;
use caracal_store::{
    AdminFilter, AuditFilter, AuthorityRecord, RecordFilter, SessionFilter, now_ms,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::timestamp;
use crate::auth::{Access, authenticate};
use crate::error::ApiError;
use crate::state::RoleState;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/zones/{zone_id}/authority-records", get(records))
        .route("/v1/zones/{zone_id}/sessions", get(sessions))
        .route("/v1/zones/{zone_id}/admin-audit", get(admin_audit))
        .route("/v1/zones/{zone_id}/delegations", get(edges))
        .route("/v1/zones/{zone_id}/audit/checkpoint", get(checkpoint))
        .route("/v1/zones/{zone_id}/audit/export", get(export))
        .route("/v1/zones/{zone_id}/overview", get(overview))
}

fn limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if (1..=MAX_LIMIT).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            format!("`limit` must be 1 to {MAX_LIMIT}"),
        ))
    }
}

/// `one_of` or refused, naming the filter.
fn choice(name: &str, value: Option<String>, one_of: &[&str]) -> Result<Option<String>, ApiError> {
    match value {
        Some(value) if !one_of.contains(&value.as_str()) => Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            format!("`{name}` must be one of {}", one_of.join(", ")),
        )),
        value => Ok(value),
    }
}

/// The next page's cursor: the last id, when the page is full.
fn next_cursor(ids: &[&str], limit: usize) -> Option<String> {
    (ids.len() == limit)
        .then(|| ids.last().map(|id| (*id).to_owned()))
        .flatten()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordQuery {
    authority_record_id: Option<String>,
    status: Option<String>,
    subject_id: Option<String>,
    kind: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

fn record_body(record: &AuthorityRecord) -> Value {
    json!({
        "id": record.id,
        "zone_id": record.zone_id,
        "kind": record.session_type,
        "subject_id": record.subject_id,
        "parent_id": record.parent_id,
        "status": record.status,
        "claims": serde_json::from_str::<Value>(&record.claims).unwrap_or(Value::Null),
        "expires_at": timestamp(record.expires_at_ms),
        "authenticated_at": timestamp(record.authenticated_at_ms),
        "created_at": timestamp(record.created_at_ms),
        "revoked_at": record.revoked_at_ms.map(timestamp),
        "revoked_reason": record.revoked_reason,
    })
}

async fn records(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query: RecordQuery = crate::api::query(raw.as_deref())?;
    let limit = limit(query.limit)?;
    let filter = RecordFilter {
        id: query.authority_record_id,
        status: choice("status", query.status, &["active", "revoked", "expired"])?,
        subject_id: query.subject_id,
        kind: choice("kind", query.kind, &["user", "application"])?,
    };
    let rows = state
        .shared
        .store
        .page_authority_records(&zone_id, &filter, query.cursor.as_deref(), limit as i64)
        .await?;
    let ids: Vec<&str> = rows.iter().map(|row| row.id.as_str()).collect();
    Ok(Json(json!({
        "items": rows.iter().map(record_body).collect::<Vec<_>>(),
        "next_cursor": next_cursor(&ids, limit),
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionQuery {
    status: Option<String>,
    lifecycle: Option<String>,
    label: Option<String>,
    parent_session_id: Option<String>,
    application_id: Option<String>,
    subject_id: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn sessions(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query: SessionQuery = crate::api::query(raw.as_deref())?;
    let limit = limit(query.limit)?;
    let filter = SessionFilter {
        status: choice(
            "status",
            query.status,
            &["active", "suspended", "terminated", "expired"],
        )?,
        lifecycle: choice("lifecycle", query.lifecycle, &["task", "service"])?,
        application_id: query.application_id,
        parent_id: query.parent_session_id,
        label: query.label,
        subject_id: query.subject_id,
    };
    let store = state.shared.store.as_ref();
    let rows = store
        .page_sessions(&zone_id, &filter, query.cursor.as_deref(), limit as i64)
        .await?;
    // Each session's subject, read once per distinct record.
    let mut subjects: BTreeMap<&str, Option<AuthorityRecord>> = BTreeMap::new();
    for row in &rows {
        if !subjects.contains_key(row.authority_record_id.as_str()) {
            let record = store
                .get_authority_record(&zone_id, &row.authority_record_id)
                .await?;
            subjects.insert(row.authority_record_id.as_str(), record);
        }
    }
    let items: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut body = crate::coordinator::session_body(row);
            let record = subjects
                .get(row.authority_record_id.as_str())
                .and_then(Option::as_ref);
            let user = record.filter(|record| record.session_type == "user");
            if let Some(fields) = body.as_object_mut() {
                fields.insert(
                    "subject_id".to_owned(),
                    json!(record.map(|record| &record.subject_id)),
                );
                fields.insert(
                    "federated_user_id".to_owned(),
                    json!(user.map(|record| &record.subject_id)),
                );
            }
            body
        })
        .collect();
    let ids: Vec<&str> = rows.iter().map(|row| row.id.as_str()).collect();
    Ok(Json(json!({
        "items": items,
        "next_cursor": next_cursor(&ids, limit),
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EdgeQuery {
    status: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn edges(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query: EdgeQuery = crate::api::query(raw.as_deref())?;
    let limit = limit(query.limit)?;
    let status = choice("status", query.status, &["active", "revoked", "expired"])?;
    let rows = state
        .shared
        .store
        .page_delegation_edges(
            &zone_id,
            status.as_deref(),
            query.cursor.as_deref(),
            limit as i64,
        )
        .await?;
    let ids: Vec<&str> = rows.iter().map(|row| row.id.as_str()).collect();
    Ok(Json(json!({
        "items": rows.iter().map(crate::coordinator::delegations::body).collect::<Vec<_>>(),
        "next_cursor": next_cursor(&ids, limit),
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminAuditQuery {
    since: Option<String>,
    until: Option<String>,
    actor_id: Option<String>,
    entity_type: Option<String>,
    entity_id: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
    format: Option<String>,
}

async fn admin_audit(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse as _;
    let caller = authenticate(&state, &headers).await?;
    super::ledger_readable(&state, &caller, &zone_id).await?;
    let query: AdminAuditQuery = crate::api::query(raw.as_deref())?;
    let limit = limit(query.limit)?;
    let csv = match query.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => {
            return Err(ApiError::with_description(
                ErrorCode::InvalidRequest,
                "`format` must be json or csv",
            ));
        }
    };
    let before = query
        .cursor
        .as_deref()
        .map(|cursor| {
            cursor.parse::<i64>().map_err(|_| {
                ApiError::with_description(
                    ErrorCode::InvalidRequest,
                    "`cursor` is not one this API issued",
                )
            })
        })
        .transpose()?;
    let filter = AuditFilter {
        since_ms: crate::api::instant("since", query.since.as_deref())?,
        until_ms: crate::api::instant("until", query.until.as_deref())?,
        admin: Some(AdminFilter {
            actor: query.actor_id,
            entity_type: query.entity_type,
            entity_id: query.entity_id,
        }),
        ..AuditFilter::default()
    };
    let rows = state
        .shared
        .store
        .search_audit(&zone_id, &filter, before, limit as i64)
        .await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|row| row.chain_seq.to_string()))
        .flatten();
    let items: Vec<Value> = rows
        .iter()
        .map(|row| {
            let metadata: Value = serde_json::from_str(&row.metadata).unwrap_or(Value::Null);
            json!({
                "id": row.id,
                "zone_id": row.zone_id,
                "action": row.event_type.strip_prefix("admin.").unwrap_or(&row.event_type),
                "actor_id": metadata.get("actor"),
                "entity_type": metadata.get("entity_type"),
                "entity_id": metadata.get("entity_id"),
                "changed_fields": metadata.get("changed_fields"),
                "request_id": row.request_id,
                "occurred_at": timestamp(row.occurred_at_ms),
                "chain_seq": row.chain_seq,
                // Every ledger row carries its chain MAC.
                "signed": true,
            })
        })
        .collect();
    if !csv {
        return Ok(Json(json!({ "items": items, "next_cursor": next })).into_response());
    }
    const COLUMNS: [&str; 9] = [
        "chain_seq",
        "id",
        "occurred_at",
        "action",
        "actor_id",
        "entity_type",
        "entity_id",
        "changed_fields",
        "request_id",
    ];
    let cell = |item: &Value, column: &str| match item.get(column) {
        Some(Value::String(text)) => text.clone(),
        None | Some(Value::Null) => String::new(),
        Some(other) => other.to_string(),
    };
    Ok(crate::api::csv_response(
        &COLUMNS,
        items
            .iter()
            .map(|item| COLUMNS.iter().map(|column| cell(item, column)).collect()),
    ))
}

/// The zone's latest signed checkpoint and the public key that verifies it.
async fn checkpoint(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    Path(zone_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    super::ledger_readable(&state, &caller, &zone_id).await?;
    let store = state.shared.store.as_ref();
    let latest = store
        .latest_audit_checkpoint(&zone_id)
        .await?
        .ok_or_else(|| {
            ApiError::with_description(
                ErrorCode::NotFound,
                "no signed checkpoint yet (the sweep signs one after a clean full sweep)",
            )
        })?;
    let public_key = store
        .checkpoint_keys()
        .await?
        .into_iter()
        .find(|(key_id, _)| *key_id == latest.key_id)
        .map(|(_, key)| key);
    Ok(Json(json!({
        "zone_id": latest.zone_id,
        "tree_size": latest.tree_size,
        "root_hash": latest.root_hash,
        "issued_at": timestamp(latest.issued_at_ms),
        "key_id": latest.key_id,
        "public_key": public_key,
        "signature": latest.signature,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    from_seq: Option<i64>,
    to_seq: Option<i64>,
}

/// The zone's rows `from_seq..=to_seq` (default all, clipped to the latest checkpoint) with the
/// checkpoint and an inclusion proof per row, as JSON lines: what `caracal audit export` writes
/// and `caracal audit verify` checks offline. The export is itself recorded first.
async fn export(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<axum::Extension<caracal_core::RequestId>>,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse as _;
    let caller = authenticate(&state, &headers).await?;
    super::ledger_readable(&state, &caller, &zone_id).await?;
    let query: ExportQuery = crate::api::query(raw.as_deref())?;
    let (from, to) = (
        query.from_seq.unwrap_or(1),
        query.to_seq.unwrap_or(i64::MAX),
    );
    if from < 1 || to < from {
        return Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            "`from_seq` must be at least 1 and at most `to_seq`",
        ));
    }
    let event = super::audit_event(
        &caller,
        request_id.as_deref(),
        super::Change {
            zone_id: &zone_id,
            action: "audit.export",
            entity_type: "audit",
            entity_id: &zone_id,
            fields: vec![],
        },
    );
    super::record_now(&state, event).await?;
    let bundle =
        crate::ledger::export_bundle(state.shared.store.as_ref(), &zone_id, from, to, &|_, _| {})
            .await
            .map_err(|error| match error {
                crate::ledger::LedgerError::Store(store) => ApiError::from(store),
                crate::ledger::LedgerError::Key(reason) => {
                    ApiError::with_description(ErrorCode::NotFound, reason)
                }
            })?;
    Ok((
        [
            (http::header::CONTENT_TYPE, "application/x-ndjson"),
            (http::header::CACHE_CONTROL, "no-store"),
        ],
        bundle,
    )
        .into_response())
}

const DAY_MS: i64 = 24 * 60 * 60 * 1000;
/// The decisions of the last day are counted over at most this many newest events, so the
/// dashboard's read stays bounded on a busy zone; `complete` says whether the day fit.
const DECISION_SCAN: i64 = 100_000;
const RECENT_EVENTS: i64 = 10;

/// The dashboard's counts: live objects, what would fail a call (expired applications,
/// resources without per-operation enforcement, no active policy), the last day of decisions,
/// pending approvals and the newest events.
async fn overview(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    Path(zone_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let store = &state.shared.store;
    let now = now_ms();
    let applications: Vec<_> = store
        .list_applications(&zone_id)
        .await?
        .into_iter()
        .filter(|application| application.archived_at_ms.is_none())
        .collect();
    let expiring = |application: &&caracal_store::Application| {
        application
            .expires_at_ms
            .is_some_and(|expires| expires > now && expires <= now + DAY_MS)
    };
    let resources: Vec<_> = store
        .list_resources(&zone_id)
        .await?
        .into_iter()
        .filter(|resource| resource.archived_at_ms.is_none())
        .collect();
    let providers = store
        .list_providers(&zone_id)
        .await?
        .iter()
        .filter(|provider| provider.archived_at_ms.is_none())
        .count();
    let policy = match store.policy_binding(&zone_id).await? {
        Some(binding) => {
            let set = store
                .get_policy_set(&zone_id, &binding.policy_set_id)
                .await?;
            json!({
                "enforcing": true,
                "policy_set_id": binding.policy_set_id,
                "policy_set_name": set.map(|set| set.name),
                "active_version_id": binding.active_version_id,
                "activated_at": timestamp(binding.activated_at_ms),
            })
        }
        None => json!({ "enforcing": false }),
    };
    let decisions = store
        .recent_decisions(&zone_id, now - DAY_MS, DECISION_SCAN)
        .await?;
    let pending = store
        .list_approval_holds(&zone_id)
        .await?
        .iter()
        .filter(|hold| crate::holds::state_of(hold, now) == "pending")
        .count();
    let recent = store
        .search_audit(&zone_id, &AuditFilter::default(), None, RECENT_EVENTS)
        .await?;
    Ok(Json(json!({
        "zone_id": zone_id,
        "generated_at": timestamp(now),
        "applications": {
            "total": applications.len(),
            "active": applications.iter().filter(|application| application.active(now)).count(),
            "expired": applications.iter().filter(|application| !application.active(now)).count(),
            "expiring_within_24h": applications.iter().filter(expiring).count(),
        },
        "resources": {
            "total": resources.len(),
            "transport_uniform": resources
                .iter()
                .filter(|resource| resource.operation_enforcement == "transport_uniform")
                .count(),
        },
        "providers": { "total": providers },
        "policy": policy,
        "authority_records": {
            "active": store.count_active_authority_records(&zone_id, now).await?,
        },
        "decisions_24h": {
            "counts": decisions.counts,
            "complete": decisions.complete,
        },
        "approvals": { "pending": pending },
        "recent_events": recent.into_iter().map(crate::api::event_body).collect::<Vec<_>>(),
    })))
}
