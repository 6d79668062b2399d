//! `/v1/zones/{zone}/notification-sinks`: webhooks a zone's approval events are sent to (see
//! [`crate::notifier`]). At most 20 a zone; `https`, or `http` to a loopback host; the HMAC
//! secret (`nsk_…`) is shown once, at creation and at rotation, and kept sealed under the KEK.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use caracal_store::{NotificationDelivery, NotificationSink, StoreError, now_ms};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Change, ListQuery, evidence, invalid_body, json, page, timestamp, valid_name};
use crate::auth::{Access, AdminCaller};
use crate::error::ApiError;
use crate::notifier::{EVENT_TYPES, SEAL_PURPOSE};
use crate::state::RoleState;
use crate::wire::Page;

const MAX_SINKS: i64 = 20;

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route(
            "/v1/zones/{zone_id}/notification-sinks",
            get(list).post(create),
        )
        .route(
            "/v1/zones/{zone_id}/notification-sinks/{id}",
            get(read).patch(update).delete(remove),
        )
        .route(
            "/v1/zones/{zone_id}/notification-sinks/{id}/deliveries",
            get(deliveries),
        )
        .route(
            "/v1/zones/{zone_id}/notification-sinks/{id}/rotate-secret",
            post(rotate_secret),
        )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSink {
    name: String,
    url: String,
    event_types: Option<Vec<String>>,
    active: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SinkChange {
    name: Option<String>,
    url: Option<String>,
    event_types: Option<Vec<String>>,
    active: Option<bool>,
}

fn shown(sink: &NotificationSink) -> Value {
    json!({
        "id": sink.id,
        "zone_id": sink.zone_id,
        "name": sink.name,
        "url": sink.url,
        "event_types": serde_json::from_str::<Value>(&sink.event_types).unwrap_or(Value::Null),
        "active": sink.active,
        "consecutive_failures": sink.consecutive_failures,
        "last_success_at": sink.last_success_at_ms.map(timestamp),
        "last_failure_at": sink.last_failure_at_ms.map(timestamp),
        "last_error": sink.last_error,
        "created_at": timestamp(sink.created_at_ms),
        "updated_at": timestamp(sink.updated_at_ms),
    })
}

fn shown_delivery(delivery: &NotificationDelivery) -> Value {
    let state = if delivery.delivered_at_ms.is_some() {
        "delivered"
    } else if delivery.abandoned_at_ms.is_some() {
        "abandoned"
    } else {
        "pending"
    };
    json!({
        "id": delivery.id,
        "sink_id": delivery.sink_id,
        "event_id": delivery.event_id,
        "event_type": delivery.event_type,
        "state": state,
        "attempts": delivery.attempts,
        "next_attempt_at": (state == "pending").then(|| timestamp(delivery.available_at_ms)),
        "delivered_at": delivery.delivered_at_ms.map(timestamp),
        "abandoned_at": delivery.abandoned_at_ms.map(timestamp),
        "response_status": delivery.response_status,
        "last_error": delivery.last_error,
        "payload": serde_json::from_str::<Value>(&delivery.payload).unwrap_or(Value::Null),
        "created_at": timestamp(delivery.created_at_ms),
    })
}

/// The sink URL, refused unless `https` (or `http` to loopback) and, when it names an address,
/// one the address guard lets the notifier reach.
fn valid_url(url: &str) -> Result<String, ApiError> {
    let refused = |why: &str| invalid_body("url", why);
    let uri = super::https_or_loopback(url).ok_or_else(|| {
        refused("must be an https URL (http only on loopback) without credentials or fragment")
    })?;
    let host = uri.host().unwrap_or_default();
    if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        && crate::gateway::upstream::is_forbidden(ip)
    {
        return Err(refused("names an address this deployment never calls"));
    }
    Ok(url.to_owned())
}

/// A non-empty subset of the approval event types, each once, as stored (a JSON array).
fn valid_event_types(types: Option<Vec<String>>) -> Result<String, ApiError> {
    let types = types.unwrap_or_else(|| EVENT_TYPES.iter().map(|t| (*t).to_owned()).collect());
    let known = types.iter().all(|t| EVENT_TYPES.contains(&t.as_str()));
    let mut unique = types.clone();
    unique.sort();
    unique.dedup();
    if types.is_empty() || !known || unique.len() != types.len() {
        return Err(invalid_body(
            "event_types",
            &format!("must name, once each, some of {}", EVENT_TYPES.join(", ")),
        ));
    }
    Ok(serde_json::to_string(&types).unwrap_or_else(|_| "[]".to_owned()))
}

/// A fresh `nsk_` secret and its sealed copy.
fn new_secret(state: &RoleState) -> Result<(String, String), ApiError> {
    let secret = super::applications::random_secret("nsk_")?;
    let sealed = state
        .shared
        .kek
        .seal(SEAL_PURPOSE, secret.as_bytes())
        .map_err(|error| {
            tracing::error!(%error, "sealing a notification sink secret failed");
            ApiError::new(ErrorCode::InternalError)
        })?;
    Ok((secret, sealed))
}

fn with_secret(sink: &NotificationSink, secret: String) -> Value {
    let mut shown = shown(sink);
    if let Some(fields) = shown.as_object_mut() {
        fields.insert("secret".into(), json!(secret));
    }
    shown
}

fn change<'a>(
    zone_id: &'a str,
    action: &'static str,
    id: &'a str,
    fields: Vec<&'static str>,
) -> Change<'a> {
    Change {
        zone_id,
        action,
        entity_type: "notification_sink",
        entity_id: id,
        fields,
    }
}

async fn found(state: &RoleState, zone_id: &str, id: &str) -> Result<NotificationSink, ApiError> {
    state
        .shared
        .store
        .get_notification_sink(zone_id, id)
        .await?
        .ok_or_else(|| {
            ApiError::with_description(
                ErrorCode::NotFound,
                format!("notification sink `{id}` not found"),
            )
        })
}

async fn list(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path(zone_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<Value>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query = super::list_query(raw.as_deref())?;
    let sinks = state.shared.store.list_notification_sinks(&zone_id).await?;
    Ok(Json(page(
        sinks,
        |sink| (sink.created_at_ms, sink.id.clone()),
        &query,
        |sink| shown(&sink),
    )?))
}

async fn create(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: NewSink = json(&raw)?;
    let now = now_ms();
    let (secret, sealed_secret) = new_secret(&state)?;
    let mut sink = NotificationSink {
        id: super::new_id(),
        zone_id: zone_id.clone(),
        name: valid_name(&request.name)?,
        url: valid_url(&request.url)?,
        sealed_secret,
        event_types: valid_event_types(request.event_types)?,
        active: request.active.unwrap_or(true),
        cursor_seq: 0,
        consecutive_failures: 0,
        last_success_at_ms: None,
        last_failure_at_ms: None,
        last_error: None,
        created_at_ms: now,
        updated_at_ms: now,
    };
    let recorded = evidence(
        &caller,
        request_id.as_deref(),
        change(
            &zone_id,
            "notification_sink.create",
            &sink.id,
            vec!["name", "url", "event_types", "active", "secret"],
        ),
    )?;
    let store = state.shared.store.as_ref();
    match store
        .insert_notification_sink(&sink, MAX_SINKS, &[recorded])
        .await
    {
        Ok(()) => {}
        Err(StoreError::LimitReached(_)) => {
            return Err(ApiError::with_description(
                ErrorCode::ZoneLimitExceeded,
                format!("a zone has at most {MAX_SINKS} notification sinks"),
            ));
        }
        Err(other) => return Err(other.into()),
    }
    // The cursor the store started it at (the ledger's head).
    sink = found(&state, &zone_id, &sink.id).await?;
    Ok((StatusCode::CREATED, Json(with_secret(&sink, secret))))
}

async fn read(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    Ok(Json(shown(&found(&state, &zone_id, &id).await?)))
}

async fn update(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: SinkChange = json(&raw)?;
    let mut sink = found(&state, &zone_id, &id).await?;
    let mut fields = Vec::new();
    if let Some(name) = &request.name {
        sink.name = valid_name(name)?;
        fields.push("name");
    }
    if let Some(url) = &request.url {
        sink.url = valid_url(url)?;
        fields.push("url");
    }
    if request.event_types.is_some() {
        sink.event_types = valid_event_types(request.event_types)?;
        fields.push("event_types");
    }
    if let Some(active) = request.active {
        sink.active = active;
        fields.push("active");
    }
    if fields.is_empty() {
        return Err(invalid_body("", "name at least one field to change"));
    }
    sink.updated_at_ms = now_ms();
    let recorded = evidence(
        &caller,
        request_id.as_deref(),
        change(&zone_id, "notification_sink.update", &id, fields),
    )?;
    state
        .shared
        .store
        .update_notification_sink(&sink, &[recorded])
        .await?;
    Ok(Json(shown(&found(&state, &zone_id, &id).await?)))
}

async fn remove(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    found(&state, &zone_id, &id).await?;
    let recorded = evidence(
        &caller,
        request_id.as_deref(),
        change(&zone_id, "notification_sink.delete", &id, Vec::new()),
    )?;
    state
        .shared
        .store
        .delete_notification_sink(&zone_id, &id, &[recorded])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rotate_secret(
    State(state): State<RoleState>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path((zone_id, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let caller: AdminCaller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let mut sink = found(&state, &zone_id, &id).await?;
    let (secret, sealed) = new_secret(&state)?;
    sink.sealed_secret = sealed;
    sink.updated_at_ms = now_ms();
    let recorded = evidence(
        &caller,
        request_id.as_deref(),
        change(
            &zone_id,
            "notification_sink.rotate_secret",
            &id,
            vec!["secret"],
        ),
    )?;
    state
        .shared
        .store
        .update_notification_sink(&sink, &[recorded])
        .await?;
    Ok(Json(with_secret(&sink, secret)))
}

async fn deliveries(
    State(state): State<RoleState>,
    headers: HeaderMap,
    Path((zone_id, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Page<Value>>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let query: ListQuery = super::list_query(raw.as_deref())?;
    if query.status.is_some() {
        return Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            "deliveries are not filtered by `status`",
        ));
    }
    let (limit, before) = super::limit_and_after(&query, 100)?;
    found(&state, &zone_id, &id).await?;
    let limit_i64 = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut rows = state
        .shared
        .store
        .list_notification_deliveries(
            &id,
            before.as_ref().map(|(at, id)| (*at, id.as_str())),
            limit_i64 + 1,
        )
        .await?;
    let next_cursor = (rows.len() > limit)
        .then(|| rows.get(limit - 1))
        .flatten()
        .map(|last| super::encode_cursor(&(last.created_at_ms, last.id.clone())));
    rows.truncate(limit);
    Ok(Json(Page {
        items: rows.iter().map(shown_delivery).collect(),
        next_cursor,
    }))
}
