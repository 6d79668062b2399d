//! The admin API on the API role (`/v1`). What every route shares lives here: strict JSON
//! bodies, `{items, next_cursor}` pages, the zone lookup, and evidence before success.

mod applications;
mod approvals;
mod connections;
mod deployment;
mod incident;
mod keys;
mod notifications;
mod objects;
mod openapi;
mod policies;
mod providers;
mod reachability;
mod recovery;
mod resources;
mod subjects;
mod tokens;
mod views;
mod zones;

pub(crate) use applications::privileged_trait;

use axum::Router;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caracal_audit::Event;
use caracal_core::{ErrorCode, RequestId};
use caracal_store::{OutboxMessage, TokenScope, Zone, now_ms};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::auth::{Access, AdminCaller};
use crate::error::ApiError;
use crate::ledger::SYSTEM_ZONE;
use crate::state::RoleState;
use crate::wire::Page;

/// `/v1` request bodies above this get 413 (the router applies it to every `/v1` route).
pub const MAX_BODY: usize = 256 * 1024;
/// Page sizes of list routes.
const DEFAULT_LIMIT: usize = 200;
pub(crate) const MAX_LIMIT: usize = 500;

pub fn routes() -> Router<RoleState> {
    Router::new()
        .merge(zones::routes())
        .merge(applications::routes())
        .merge(approvals::routes())
        .merge(incident::routes())
        .merge(recovery::routes())
        .merge(keys::routes())
        .merge(openapi::routes())
        .merge(policies::routes())
        .merge(providers::routes())
        .merge(reachability::routes())
        .merge(resources::routes())
        .merge(deployment::routes())
        .merge(subjects::routes())
        .merge(tokens::routes())
        .merge(views::routes())
        .merge(objects::routes())
        .merge(notifications::routes())
        .merge(connections::routes())
}

/// A JSON body into `T`, whose unknown fields are refused; any failure is 400 `invalid_body`
/// naming what is wrong.
fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| invalid_body("", &error.to_string()))
}

/// 400 `invalid_body` about `path` (a field name, or empty for the whole body).
fn invalid_body(path: &str, message: &str) -> ApiError {
    let description = if path.is_empty() {
        message.to_owned()
    } else {
        format!("`{path}`: {message}")
    };
    ApiError::with_description(ErrorCode::InvalidBody, description)
        .with_details(serde_json::json!({"issues": [{"path": path, "message": message}]}))
}

/// `?limit=&cursor=` (and, on some lists, `status=`); anything else is refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    status: Option<String>,
}

fn list_query(raw: Option<&str>) -> Result<ListQuery, ApiError> {
    crate::api::query(raw)
}

/// One page of `rows` as `body` shows them, newest first (by creation time, then id), after `query.cursor`. The
/// cursor is opaque to callers: base64url of `<created_ms>:<id>` of the last item returned.
fn page<T, B>(
    mut rows: Vec<T>,
    key: impl Fn(&T) -> (i64, String),
    query: &ListQuery,
    body: impl FnMut(T) -> B,
) -> Result<Page<B>, ApiError> {
    let (limit, after) = limit_and_after(query, DEFAULT_LIMIT)?;
    rows.sort_by_key(|row| std::cmp::Reverse(key(row)));
    if let Some(after) = after {
        rows.retain(|row| key(row) < after);
    }
    let next_cursor = (rows.len() > limit)
        .then(|| rows.get(limit - 1).map(|row| encode_cursor(&key(row))))
        .flatten();
    rows.truncate(limit);
    Ok(Page {
        items: rows.into_iter().map(body).collect(),
        next_cursor,
    })
}

/// `query`'s page size (`default` when absent, 1 to [`MAX_LIMIT`]) and the `(created_ms, id)`
/// its cursor continues after.
fn limit_and_after(
    query: &ListQuery,
    default: usize,
) -> Result<(usize, Option<(i64, String)>), ApiError> {
    let limit = query.limit.unwrap_or(default);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::with_description(
            ErrorCode::InvalidRequest,
            format!("`limit` must be 1 to {MAX_LIMIT}"),
        ));
    }
    let after = match &query.cursor {
        None => None,
        Some(cursor) => Some(decode_cursor(cursor).ok_or_else(|| {
            ApiError::with_description(ErrorCode::InvalidRequest, "`cursor` is not one we issued")
        })?),
    };
    Ok((limit, after))
}

fn encode_cursor((created_ms, id): &(i64, String)) -> String {
    URL_SAFE_NO_PAD.encode(format!("{created_ms}:{id}"))
}

fn decode_cursor(cursor: &str) -> Option<(i64, String)> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()?;
    let (created_ms, id) = text.split_once(':')?;
    Some((created_ms.parse().ok()?, id.to_owned()))
}

/// RFC 3339 with milliseconds, UTC: how every timestamp leaves the API.
fn timestamp(ms: i64) -> String {
    crate::wire::rfc3339(ms)
}

/// Longest display name of any admin object, in characters.
const MAX_NAME: usize = 200;

/// A display name: trimmed, 1 to 200 printable characters.
fn valid_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(invalid_body(
            "name",
            &format!("must be 1 to {MAX_NAME} printable characters"),
        ));
    }
    Ok(name.to_owned())
}

/// A slug made from a name: lower-case letters and digits, every other run one `-`, at most
/// `max` characters; `fallback` when nothing is left.
fn slug_of(name: &str, max: usize, fallback: &str) -> String {
    let mut slug = String::new();
    for character in name.chars().flat_map(char::to_lowercase) {
        if character.is_ascii_lowercase() || character.is_ascii_digit() {
            slug.push(character);
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug: String = slug.chars().take(max).collect();
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() {
        fallback.to_owned()
    } else {
        slug.to_owned()
    }
}

/// `url` as a URI when it is an absolute `https` URL, or `http` to a loopback host, without
/// user information or fragment, at most 2,048 bytes: where this deployment sends something
/// of an operator's choosing (discovery, notifications).
fn https_or_loopback(url: &str) -> Option<http::Uri> {
    let uri: http::Uri = url.parse().ok()?;
    let authority = uri.authority()?;
    let host = authority.host();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let secure =
        uri.scheme_str() == Some("https") || (uri.scheme_str() == Some("http") && loopback);
    let plain = !authority.as_str().contains('@') && !url.contains('#') && url.len() <= 2048;
    (secure && plain && !host.is_empty()).then_some(uri)
}

/// A new object id.
fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Maps a store conflict (a taken name, a state that forbids the change) to `conflict`, and
/// any other store error as usual.
fn on_conflict(conflict: ApiError) -> impl FnOnce(caracal_store::StoreError) -> ApiError {
    move |error| match error {
        caracal_store::StoreError::Conflict(_) => conflict,
        other => other.into(),
    }
}

/// The request's admin caller, allowed `access` on the live zone `zone_id` (see [`live_zone`]).
async fn zone_caller(
    state: &RoleState,
    headers: &http::HeaderMap,
    zone_id: &str,
    access: Access,
) -> Result<AdminCaller, ApiError> {
    let caller = crate::auth::authenticate(state, headers).await?;
    live_zone(state, &caller, zone_id, access).await?;
    Ok(caller)
}

/// The caller may act on `zone_id` with `access`, and it is a live zone; otherwise 403 (token)
/// or 404 (no such live zone, which is also what another zone's token cannot tell apart).
pub(crate) async fn live_zone(
    state: &RoleState,
    caller: &AdminCaller,
    zone_id: &str,
    access: Access,
) -> Result<Zone, ApiError> {
    caller.require(access, Some(zone_id))?;
    if zone_id == SYSTEM_ZONE && access != Access::Read {
        return Err(ApiError::new(ErrorCode::SystemZoneReadOnly));
    }
    match state.shared.store.get_zone(zone_id).await? {
        Some(zone) if zone.archived_at_ms.is_none() => Ok(zone),
        _ => Err(ApiError::with_description(
            ErrorCode::NotFound,
            format!("zone `{zone_id}` not found"),
        )),
    }
}

/// The caller may read `zone_id`'s ledger: a live zone's (see [`live_zone`]), or the system
/// zone's, where deployment-wide actions (tokens, containment, evidence bundles) are recorded
/// and which has no zone row, with a global token.
pub(crate) async fn ledger_readable(
    state: &RoleState,
    caller: &AdminCaller,
    zone_id: &str,
) -> Result<(), ApiError> {
    if zone_id == SYSTEM_ZONE {
        caller.require(Access::Read, None)
    } else {
        live_zone(state, caller, zone_id, Access::Read)
            .await
            .map(|_| ())
    }
}

/// The zone a token is confined to, if any.
fn token_zone(caller: &AdminCaller) -> Option<&str> {
    match &caller.scope {
        TokenScope::Global => None,
        TokenScope::Zone(zone) => Some(zone),
    }
}

/// What a mutation did, for its audit event: never a secret, only the names of changed fields.
struct Change<'a> {
    zone_id: &'a str,
    action: &'static str,
    entity_type: &'static str,
    entity_id: &'a str,
    fields: Vec<&'static str>,
}

/// The audit event of an admin action: who, what, on which object, which fields (never a
/// secret).
fn audit_event(caller: &AdminCaller, request_id: Option<&RequestId>, change: Change<'_>) -> Event {
    audit_event_by(caller.actor(), request_id, change)
}

/// [`audit_event`] for an actor that holds no admin token (a subject's browser flow).
fn audit_event_by(actor: String, request_id: Option<&RequestId>, change: Change<'_>) -> Event {
    Event {
        id: new_id(),
        zone_id: change.zone_id.to_owned(),
        event_type: format!("admin.{}", change.action),
        request_id: request_id.map_or_else(|| "none".to_owned(), ToString::to_string),
        decision: "allow".to_owned(),
        policy_set_id: None,
        policy_set_version_id: None,
        manifest_sha: None,
        evaluation_status: "complete".to_owned(),
        determining_policies_json: serde_json::json!([]),
        diagnostics_json: serde_json::json!([]),
        metadata_json: serde_json::json!({
            "actor": actor,
            "entity_type": change.entity_type,
            "entity_id": change.entity_id,
            "changed_fields": change.fields,
        }),
        occurred_at_ms: now_ms(),
    }
}

/// Invariant 5 for admin changes: the change's audit event rides the change's own store
/// transaction (through the outbox, which publishes it to `caracal.audit.events`), so the
/// evidence is durable exactly when the change is, and a refused change leaves none.
fn evidence(
    caller: &AdminCaller,
    request_id: Option<&RequestId>,
    change: Change<'_>,
) -> Result<OutboxMessage, ApiError> {
    outbox_evidence(audit_event(caller, request_id, change))
}

/// `event` as the outbox row that carries it in its change's transaction.
fn outbox_evidence(event: Event) -> Result<OutboxMessage, ApiError> {
    crate::evidence::outbox_message(&event).ok_or_else(|| {
        tracing::error!(event = %event.id, "an admin audit event did not serialise");
        ApiError::new(ErrorCode::InternalError)
    })
}

/// For actions that change nothing in the store (a reveal): the event must be on the stream
/// or in a replay file before the action's result leaves.
async fn record_now(state: &RoleState, event: Event) -> Result<(), ApiError> {
    state
        .shared
        .evidence
        .record(event)
        .await
        .map_err(crate::api::evidence_error)
}

#[cfg(test)]
mod tests;
