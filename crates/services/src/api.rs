//! The API role's `/v1` routes that exist so far: the audit tamper findings and their
//! acknowledgement. (Zones, applications and the rest of the admin API land with issue 5.)

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use caracal_audit::Event;
use caracal_core::{ErrorCode, RequestId};
use caracal_store::now_ms;
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
        .route("/v1/audit/dlq", get(list_dead_letters))
        .route("/v1/audit/dlq/replay", post(replay_dead_letters))
        .route("/v1/audit/dlq/{id}", get(dead_letter))
        .route("/v1/zones/{zone_id}/audit", get(search_audit))
        .route("/v1/zones/{zone_id}/audit/explain", get(explain_audit))
        .route(
            "/v1/zones/{zone_id}/audit/by-request/{request_id}",
            get(events_of_request),
        )
        .route(
            "/v1/zones/{zone_id}/audit/by-request/{request_id}/explain",
            get(explain_by_request),
        )
}

/// Query of `GET /v1/zones/{zone}/audit`; unknown parameters are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    /// RFC 3339 or epoch milliseconds (the reference's form); `since_ms` is the older one.
    since: Option<String>,
    until: Option<String>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    /// One type, or up to 16 separated by commas.
    event_type: Option<String>,
    decision: Option<String>,
    request_id: Option<String>,
    session_id: Option<String>,
    edge_id: Option<String>,
    application_id: Option<String>,
    authority_record_id: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
    format: Option<String>,
}

/// RFC 3339 or epoch milliseconds.
pub(crate) fn instant(name: &str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let parsed = value.parse::<i64>().ok().or_else(|| {
        humantime::parse_rfc3339_weak(value)
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|since| i64::try_from(since.as_millis()).ok())
    });
    parsed.map(Some).ok_or_else(|| {
        ApiError::with_description(
            ErrorCode::InvalidRequest,
            format!("`{name}` must be RFC 3339 or epoch milliseconds"),
        )
    })
}

/// A query string into `T` (unknown parameters refused by `T`); any failure is 400.
pub(crate) fn query<T: serde::de::DeserializeOwned>(raw: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or_default()).map_err(|error| {
        ApiError::with_description(ErrorCode::InvalidRequest, format!("query: {error}"))
    })
}

pub(crate) fn event_body(row: caracal_store::AuditEvent) -> crate::wire::AuditEventBody {
    let document = |text: &str| serde_json::from_str(text).unwrap_or(serde_json::Value::Null);
    crate::wire::AuditEventBody {
        determining_policies_json: document(&row.determining_policies),
        diagnostics_json: document(&row.diagnostics),
        metadata_json: document(&row.metadata),
        id: row.id,
        zone_id: row.zone_id,
        event_type: row.event_type,
        request_id: row.request_id,
        decision: row.decision,
        policy_set_id: row.policy_set_id,
        policy_set_version_id: row.policy_set_version_id,
        manifest_sha: row.manifest_sha,
        evaluation_status: row.evaluation_status,
        occurred_at_ms: row.occurred_at_ms,
        chain_seq: row.chain_seq,
        content_sha256: row.content_sha256,
    }
}

/// One CSV field. Text a spreadsheet would run as a formula (client-chosen request ids reach
/// this export) is prefixed with `'`, the usual neutralisation; the JSON form is untouched.
fn csv_field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// A CSV download (RFC 4180: a header row, CRLF line ends, every field through [`csv_field`]).
pub(crate) fn csv_response(
    header: &[&str],
    rows: impl Iterator<Item = Vec<String>>,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let mut text = header.join(",");
    text.push_str("\r\n");
    for row in rows {
        let cells: Vec<String> = row.iter().map(|cell| csv_field(cell)).collect();
        text.push_str(&cells.join(","));
        text.push_str("\r\n");
    }
    (
        [(http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        text,
    )
        .into_response()
}

#[cfg(test)]
#[test]
fn csv_fields_are_quoted_and_never_formulas() {
    assert_eq!(csv_field("plain"), "plain");
    assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
    assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
    assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
    assert_eq!(csv_field("-1+2"), "'-1+2");
}

async fn search_audit(
    State(state): State<RoleState>,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse as _;
    authenticate(&state, &headers)
        .await?
        .require(Access::Read, Some(&zone_id))?;
    let params: SearchQuery = query(raw.as_deref())?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            "`limit` must be 1 to 1000",
        ));
    }
    let before = params
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
    if let Some(decision) = params.decision.as_deref()
        && !matches!(decision, "allow" | "deny" | "partial")
    {
        return Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            "`decision` must be allow, deny or partial",
        ));
    }
    let invalid = |text: &str| ApiError::with_description(ErrorCode::InvalidRequest, text);
    let bound = |name: &str, text: Option<String>, ms: Option<i64>| match (text, ms) {
        (Some(_), Some(_)) => Err(invalid(&format!("give `{name}` or `{name}_ms`, not both"))),
        (text, None) => instant(name, text.as_deref()),
        (None, ms) => Ok(ms),
    };
    let event_types: Vec<String> = params
        .event_type
        .iter()
        .flat_map(|types| types.split(','))
        .map(|kind| kind.trim().to_owned())
        .collect();
    if event_types.len() > 16 || event_types.iter().any(String::is_empty) {
        return Err(invalid(
            "`event_type` is 1 to 16 event types separated by commas",
        ));
    }
    let filter = caracal_store::AuditFilter {
        since_ms: bound("since", params.since, params.since_ms)?,
        until_ms: bound("until", params.until, params.until_ms)?,
        event_types,
        decision: params.decision,
        request_id: params.request_id,
        session_id: params.session_id,
        edge_id: params.edge_id,
        application_id: params.application_id,
        authority_record_id: params.authority_record_id,
        admin: None,
    };
    let rows = state
        .shared
        .store
        .search_audit(&zone_id, &filter, before, limit)
        .await?;
    let next_cursor = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|row| row.chain_seq.to_string()))
        .flatten();
    match params.format.as_deref().unwrap_or("json") {
        "json" => Ok(Json(crate::wire::AuditSearchResponse {
            items: rows.into_iter().map(event_body).collect(),
            next_cursor,
        })
        .into_response()),
        "csv" => Ok(csv_response(
            &[
                "chain_seq",
                "id",
                "occurred_at_ms",
                "event_type",
                "request_id",
                "decision",
                "evaluation_status",
                "policy_set_id",
                "policy_set_version_id",
                "metadata",
            ],
            rows.into_iter().map(|row| {
                vec![
                    row.chain_seq.to_string(),
                    row.id,
                    row.occurred_at_ms.to_string(),
                    row.event_type,
                    row.request_id,
                    row.decision,
                    row.evaluation_status,
                    row.policy_set_id.unwrap_or_default(),
                    row.policy_set_version_id.unwrap_or_default(),
                    row.metadata,
                ]
            }),
        )),
        _ => Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            "`format` must be json or csv",
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainQuery {
    request_id: String,
}

/// Events listed by one explanation (the newest ones).
const EXPLAIN_LIMIT: i64 = 1000;

async fn explain_audit(
    State(state): State<RoleState>,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Json<crate::wire::AuditExplainResponse>, ApiError> {
    authenticate(&state, &headers)
        .await?
        .require(Access::Read, Some(&zone_id))?;
    let params: ExplainQuery = query(raw.as_deref())?;
    explain(&state, zone_id, params.request_id).await
}

/// `GET /v1/zones/{zone}/audit/by-request/{request_id}/explain`: the published admin client's
/// form of `…/audit/explain?request_id=`.
async fn explain_by_request(
    State(state): State<RoleState>,
    Path((zone_id, request_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<crate::wire::AuditExplainResponse>, ApiError> {
    authenticate(&state, &headers)
        .await?
        .require(Access::Read, Some(&zone_id))?;
    explain(&state, zone_id, request_id).await
}

/// `GET /v1/zones/{zone}/audit/by-request/{request_id}`: every event of one request (at most
/// 1,000, the newest), oldest first.
async fn events_of_request(
    State(state): State<RoleState>,
    Path((zone_id, request_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authenticate(&state, &headers)
        .await?
        .require(Access::Read, Some(&zone_id))?;
    let filter = caracal_store::AuditFilter {
        request_id: Some(request_id.clone()),
        ..caracal_store::AuditFilter::default()
    };
    let mut rows = state
        .shared
        .store
        .search_audit(&zone_id, &filter, None, EXPLAIN_LIMIT)
        .await?;
    rows.reverse();
    let items: Vec<crate::wire::AuditEventBody> = rows.into_iter().map(event_body).collect();
    Ok(Json(serde_json::json!({
        "request_id": request_id,
        "zone_id": zone_id,
        "items": items,
    })))
}

/// The explanation of one request: its events and each deny rebuilt.
async fn explain(
    state: &RoleState,
    zone_id: String,
    request_id: String,
) -> Result<Json<crate::wire::AuditExplainResponse>, ApiError> {
    let filter = caracal_store::AuditFilter {
        request_id: Some(request_id.clone()),
        ..caracal_store::AuditFilter::default()
    };
    let store = &state.shared.store;
    let mut rows = store
        .search_audit(&zone_id, &filter, None, EXPLAIN_LIMIT)
        .await?;
    if rows.is_empty() {
        return Err(ApiError::new(ErrorCode::NotFound));
    }
    // The listing holds the newest events; a deny older than those still decides.
    let older_deny = rows.len() == usize::try_from(EXPLAIN_LIMIT).unwrap_or(usize::MAX) && {
        let denies = caracal_store::AuditFilter {
            decision: Some("deny".into()),
            ..filter
        };
        !store
            .search_audit(&zone_id, &denies, None, 1)
            .await?
            .is_empty()
    };
    rows.reverse();
    let mut denied = Vec::new();
    for row in rows.iter().filter(|row| row.decision == "deny") {
        denied.push(rebuild_deny(state, &zone_id, row).await?);
    }
    // Any deny decides; otherwise the last decision stands.
    let final_decision = if older_deny || rows.iter().any(|row| row.decision == "deny") {
        "deny".to_owned()
    } else {
        rows.last()
            .map(|row| row.decision.clone())
            .unwrap_or_default()
    };
    Ok(Json(crate::wire::AuditExplainResponse {
        request_id,
        zone_id,
        final_decision,
        events: rows.into_iter().map(event_body).collect(),
        denied,
    }))
}

/// Decides a recorded deny again: its `metadata.policy_input` under the policy set version it
/// names, with the same evaluator the STS uses. `matches_record` compares the rebuilt reason
/// with the first recorded diagnostic.
async fn rebuild_deny(
    state: &RoleState,
    zone_id: &str,
    row: &caracal_store::AuditEvent,
) -> Result<crate::wire::DeniedBody, ApiError> {
    let metadata: serde_json::Value = serde_json::from_str(&row.metadata).unwrap_or_default();
    let input = metadata.get("policy_input").cloned();
    let mut body = crate::wire::DeniedBody {
        event_id: row.id.clone(),
        policy_set_version_id: row.policy_set_version_id.clone(),
        policy_input: input.clone(),
        rebuilt: None,
        matches_record: None,
        unavailable: None,
    };
    let request =
        input.and_then(|input| serde_json::from_value::<caracal_policy::Request>(input).ok());
    let (Some(request), Some(version_id)) = (request, &row.policy_set_version_id) else {
        body.unavailable =
            Some("the event recorded no policy input or no policy set version".into());
        return Ok(body);
    };
    let Some(version) = state
        .shared
        .store
        .get_policy_set_version(zone_id, version_id)
        .await?
    else {
        body.unavailable = Some(format!(
            "policy set version `{version_id}` is not in this zone"
        ));
        return Ok(body);
    };
    let bundle = match crate::policy::set_version_content(&version) {
        Ok(content) => {
            crate::policy::compile_manifest(state.shared.store.as_ref(), zone_id, &content.manifest)
                .await
        }
        Err(error) => Err(error),
    };
    match bundle {
        Ok(bundle) => {
            let decision = caracal_policy::decide(Some(&bundle), &request);
            let recorded: serde_json::Value =
                serde_json::from_str(&row.diagnostics).unwrap_or_default();
            let recorded_reason = recorded
                .get(0)
                .and_then(|first| first.get("code"))
                .and_then(serde_json::Value::as_str);
            body.matches_record = Some(decision.reason() == recorded_reason);
            body.rebuilt = Some(decision);
        }
        Err(crate::policy::BundleError::Store(error)) => return Err(error.into()),
        Err(error) => body.unavailable = Some(error.to_string()),
    }
    Ok(body)
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
    let findings = state.shared.store.open_tamper_findings().await?;
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
    let open = state.shared.store.open_tamper_findings().await?;
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
        .acknowledge_tamper_findings(&caller.actor(), reason)
        .await?;
    Ok(Json(AckTamperResponse { acknowledged }))
}

/// Dead letters whose failure was transient; the others (unsigned, forged, unparseable) are
/// never re-sent as if they were trusted evidence.
fn replayable(reason: &str) -> bool {
    reason.starts_with("store_rejected:") || reason == "max_deliveries_exceeded"
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DlqQuery {
    limit: Option<usize>,
    after: Option<String>,
}

fn dlq_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(100);
    if (1..=1000).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            "`limit` must be 1 to 1000",
        ))
    }
}

fn bus_error(error: caracal_bus::BusError) -> ApiError {
    match error {
        caracal_bus::BusError::InvalidEntryId(_) => {
            ApiError::with_description(ErrorCode::InvalidRequest, "`after` is not an entry id")
        }
        other => {
            tracing::warn!(error = %other, "bus failure");
            ApiError::new(ErrorCode::NotReady)
        }
    }
}

async fn list_dead_letters(
    State(state): State<RoleState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Json<crate::wire::DeadLettersResponse>, ApiError> {
    authenticate(&state, &headers)
        .await?
        .require(Access::Read, None)?;
    let params: DlqQuery = query(raw.as_deref())?;
    let limit = dlq_limit(params.limit)?;
    let dead = caracal_bus::dead_letter_stream(caracal_bus::stream_names::AUDIT_EVENTS);
    let entries = state
        .shared
        .bus
        .streams
        .range(&dead, params.after.as_deref(), limit)
        .await
        .map_err(bus_error)?;
    let next_cursor = (entries.len() == limit)
        .then(|| entries.last().map(|entry| entry.id.clone()))
        .flatten();
    let items = entries.iter().map(dead_letter_body).collect();
    Ok(Json(crate::wire::DeadLettersResponse {
        items,
        next_cursor,
    }))
}

fn dead_letter_body(entry: &caracal_bus::Entry) -> crate::wire::DeadLetterBody {
    let field = |name: &str| entry.fields.get(name).cloned().unwrap_or_default();
    let payload: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&field("payload")).unwrap_or_default();
    let reason = field("reason");
    crate::wire::DeadLetterBody {
        replayable: replayable(&reason),
        id: entry.id.clone(),
        source_id: field("source_id"),
        reason,
        deliveries: field("deliveries").parse().unwrap_or(0),
        received_at_ms: entry
            .id
            .split('-')
            .next()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0),
        event_id: payload.get("id").cloned(),
        zone_id: payload.get("zone_id").cloned(),
    }
}

/// The stream id just before `id` (`ms-seq`), so a range after it starts at `id`.
fn entry_before(id: &str) -> Option<String> {
    let (ms, seq) = id.split_once('-')?;
    let (ms, seq) = (ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?);
    Some(match seq.checked_sub(1) {
        Some(seq) => format!("{ms}-{seq}"),
        // Sequence numbers past i64::MAX within one millisecond do not happen.
        None => format!("{}-{}", ms.checked_sub(1)?, i64::MAX),
    })
}

/// `GET /v1/audit/dlq/{id}`: one dead letter, with the event it carried and its raw fields.
async fn dead_letter(
    State(state): State<RoleState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    authenticate(&state, &headers)
        .await?
        .require(Access::Read, None)?;
    let not_found =
        || ApiError::with_description(ErrorCode::NotFound, format!("no dead letter `{id}`"));
    let after = entry_before(&id).ok_or_else(not_found)?;
    let dead = caracal_bus::dead_letter_stream(caracal_bus::stream_names::AUDIT_EVENTS);
    let entry = state
        .shared
        .bus
        .streams
        .range(&dead, Some(&after), 1)
        .await
        .map_err(|error| match error {
            caracal_bus::BusError::InvalidEntryId(_) => not_found(),
            other => bus_error(other),
        })?
        .into_iter()
        .find(|entry| entry.id == id)
        .ok_or_else(not_found)?;
    let source_event = entry
        .fields
        .get("payload")
        .and_then(|payload| serde_json::from_str::<serde_json::Value>(payload).ok());
    let mut body = serde_json::to_value(dead_letter_body(&entry))
        .map_err(|_| ApiError::new(ErrorCode::InternalError))?;
    if let Some(fields) = body.as_object_mut() {
        fields.insert("source_event".into(), source_event.unwrap_or_default());
        fields.insert("fields".into(), serde_json::json!(entry.fields));
    }
    Ok(Json(body))
}

async fn replay_dead_letters(
    State(state): State<RoleState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Json<crate::wire::ReplayResponse>, ApiError> {
    authenticate(&state, &headers)
        .await?
        .require(Access::Write, None)?;
    let params: DlqQuery = query(raw.as_deref())?;
    let limit = dlq_limit(params.limit)?;
    let dead = caracal_bus::dead_letter_stream(caracal_bus::stream_names::AUDIT_EVENTS);
    let streams = &state.shared.bus.streams;
    let entries = streams
        .range(&dead, params.after.as_deref(), limit)
        .await
        .map_err(bus_error)?;
    let (mut replayed, mut skipped) = (0, 0);
    for entry in &entries {
        let reason = entry
            .fields
            .get("reason")
            .map(String::as_str)
            .unwrap_or_default();
        let payload: Option<caracal_bus::Fields> = entry
            .fields
            .get("payload")
            .and_then(|payload| serde_json::from_str(payload).ok());
        let producer = state.shared.evidence.producer();
        // Anyone able to write to the dead-letter stream must not get an event signed: only a
        // genuine dead letter holding a genuinely signed event is re-sent.
        let Some(payload) = payload.filter(|payload| {
            replayable(reason)
                && producer.is_genuine(&dead, &entry.fields)
                && producer.is_genuine(caracal_bus::stream_names::AUDIT_EVENTS, payload)
        }) else {
            skipped += 1;
            continue;
        };
        // Re-sent first, deleted after: a crash in between re-sends twice, and ingestion is
        // idempotent on the event id.
        producer
            .publish(caracal_bus::stream_names::AUDIT_EVENTS, payload)
            .await
            .map_err(bus_error)?;
        streams
            .delete(&dead, std::slice::from_ref(&entry.id))
            .await
            .map_err(bus_error)?;
        replayed += 1;
    }
    Ok(Json(crate::wire::ReplayResponse {
        scanned: entries.len(),
        replayed,
        skipped,
    }))
}
