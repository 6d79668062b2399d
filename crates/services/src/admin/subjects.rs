//! The subjects of a zone's authority records: `GET /v1/zones/{zone_id}/subjects` (one row a
//! subject and kind, counted) and `…/subjects/overview?subject_id=`; and
//! `/v1/zones/{zone_id}/subjects/revoke` (`{subject_id, reason?}`, the published admin
//! client's form) and `/v1/zones/{zone_id}/subjects/{subject_id}/revoke`: the subject kill
//! switch. Everything
//! issued for a subject goes at once: its authority records, every session bound to them
//! (with their subtrees) and every delegation touching those, with the revocation messages
//! in the same transaction.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caracal_core::{ErrorCode, RequestId};
use caracal_store::{SubjectFilter, SubjectSummary, now_ms};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Change, invalid_body, json, timestamp};
use crate::auth::Access;
use crate::error::ApiError;
use crate::state::RoleState;

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/zones/{zone_id}/subjects", get(list))
        .route("/v1/zones/{zone_id}/subjects/overview", get(overview))
        .route("/v1/zones/{zone_id}/subjects/revoke", post(revoke_named))
        .route(
            "/v1/zones/{zone_id}/subjects/{subject_id}/revoke",
            post(revoke),
        )
}

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 200;
const MAX_SEARCH: usize = 200;
const KINDS: [&str; 2] = ["user", "application"];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    kind: Option<String>,
    search: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverviewQuery {
    subject_id: String,
}

fn invalid(description: String) -> ApiError {
    ApiError::with_description(ErrorCode::InvalidRequest, description)
}

fn summary_body(row: &SubjectSummary) -> Value {
    json!({
        "subject_id": row.subject_id,
        "kind": row.kind,
        "authority_records": {
            "active": row.active,
            "revoked": row.revoked,
            "expired": row.expired,
        },
        "first_seen_at": timestamp(row.first_seen_ms),
        "last_seen_at": timestamp(row.last_seen_ms),
    })
}

/// The cursor is opaque to callers: base64url of `<kind>:<subject id>` of the last row.
fn encode_cursor(row: &SubjectSummary) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", row.kind, row.subject_id))
}

fn decode_cursor(cursor: &str) -> Option<(String, String)> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()?;
    let (kind, subject_id) = text.split_once(':')?;
    Some((subject_id.to_owned(), kind.to_owned()))
}

async fn list(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query: ListQuery = crate::api::query(raw.as_deref())?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(invalid(format!("`limit` must be 1 to {MAX_LIMIT}")));
    }
    if let Some(kind) = &query.kind
        && !KINDS.contains(&kind.as_str())
    {
        return Err(invalid(format!(
            "`kind` must be one of {}",
            KINDS.join(", ")
        )));
    }
    if let Some(search) = &query.search
        && (search.is_empty() || search.chars().count() > MAX_SEARCH)
    {
        return Err(invalid(format!(
            "`search` must be 1 to {MAX_SEARCH} characters"
        )));
    }
    let after = match &query.cursor {
        Some(cursor) => Some(
            decode_cursor(cursor).ok_or_else(|| invalid("`cursor` is not one we issued".into()))?,
        ),
        None => None,
    };
    let filter = SubjectFilter {
        subject_id: None,
        kind: query.kind,
        search: query.search,
        after,
    };
    let rows = state
        .shared
        .store
        .page_subjects(&zone_id, &filter, now_ms(), limit as i64)
        .await?;
    let next_cursor = (rows.len() == limit)
        .then(|| rows.last().map(encode_cursor))
        .flatten();
    Ok(Json(json!({
        "items": rows.iter().map(summary_body).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    })))
}

/// One subject across kinds: its authority records counted per kind and in total.
async fn overview(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query: OverviewQuery = crate::api::query(raw.as_deref())?;
    if query.subject_id.is_empty() || query.subject_id.len() > 512 {
        return Err(invalid("`subject_id` must be 1 to 512 bytes".into()));
    }
    let filter = SubjectFilter {
        subject_id: Some(query.subject_id.clone()),
        ..SubjectFilter::default()
    };
    let rows = state
        .shared
        .store
        .page_subjects(&zone_id, &filter, now_ms(), KINDS.len() as i64)
        .await?;
    let (Some(first), Some(last)) = (
        rows.iter().map(|row| row.first_seen_ms).min(),
        rows.iter().map(|row| row.last_seen_ms).max(),
    ) else {
        return Err(ApiError::with_description(
            ErrorCode::NotFound,
            format!(
                "subject `{}` has no authority records in this zone",
                query.subject_id
            ),
        ));
    };
    let total = |count: fn(&SubjectSummary) -> i64| rows.iter().map(count).sum::<i64>();
    Ok(Json(json!({
        "subject_id": query.subject_id,
        "authority_records": {
            "active": total(|row| row.active),
            "revoked": total(|row| row.revoked),
            "expired": total(|row| row.expired),
        },
        "kinds": rows.iter().map(summary_body).collect::<Vec<_>>(),
        "first_seen_at": timestamp(first),
        "last_seen_at": timestamp(last),
    })))
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
