//! `Idempotency-Key` on creates: the same key with the same request replays the stored answer
//! (with `Idempotency-Replayed: true`); the same key with another request is 409
//! `idempotency_key_conflict`. Keys are stored only as HMAC digests (a KEK-derived key), with a
//! digest of the request; receipts live 7 days, 1 day for SDK-generated keys.
//!
//! The receipt is written in the create's own transaction: a create is remembered exactly when
//! it happened, and of two concurrent requests with one key only one creates (the other
//! answers what it stored).

use axum::Json;
use axum::response::{IntoResponse, Response};
use caracal_core::ErrorCode;
use caracal_store::{IdempotencyReceipt, StoreError, now_ms};
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::Value;

use super::invalid;
use crate::error::ApiError;
use crate::state::RoleState;

const EXPLICIT_TTL_MS: i64 = 7 * 24 * 3600 * 1000;
const GENERATED_TTL_MS: i64 = 24 * 3600 * 1000;

/// One create's key, as stored.
pub(super) struct Key {
    operation: &'static str,
    zone_id: String,
    scope_id: String,
    key_digest: String,
    request_digest: String,
    ttl_ms: i64,
}

/// The request's key, if it sent one; a malformed key is 400 `invalid_params`.
pub(super) fn from_request(
    state: &RoleState,
    headers: &HeaderMap,
    operation: &'static str,
    zone_id: &str,
    application_id: &str,
    request: &Value,
) -> Result<Option<Key>, ApiError> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|key| {
            !key.is_empty()
                && key.len() <= 255
                && key.trim() == *key
                && !key.chars().any(char::is_control)
        })
        .ok_or_else(|| {
            invalid("Idempotency-Key must be 1 to 255 bytes, no control characters or edge spaces")
        })?;
    let generated = headers
        .get("idempotency-key-kind")
        .is_some_and(|kind| kind.as_bytes() == b"generated");
    let secret = state.shared.kek.derive("coordinator-idempotency-v1");
    let tag = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret),
        key.as_bytes(),
    );
    Ok(Some(Key {
        operation,
        zone_id: zone_id.to_owned(),
        scope_id: application_id.to_owned(),
        key_digest: caracal_crypto::hex(tag.as_ref()),
        request_digest: caracal_crypto::hex(&caracal_crypto::sha256(
            request.to_string().as_bytes(),
        )),
        ttl_ms: if generated {
            GENERATED_TTL_MS
        } else {
            EXPLICIT_TTL_MS
        },
    }))
}

fn replayed(status: i64, body: &str) -> Response {
    let status = u16::try_from(status)
        .ok()
        .and_then(|status| StatusCode::from_u16(status).ok())
        .unwrap_or(StatusCode::OK);
    let body: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert("idempotency-replayed", HeaderValue::from_static("true"));
    response
}

/// The stored answer for `key`, if a live receipt holds one. `still_live` says whether the
/// object it created still counts (a terminated session does not).
pub(super) async fn replay(
    state: &RoleState,
    key: &Key,
    still_live: impl AsyncFnOnce(&str) -> Result<bool, ApiError>,
) -> Result<Option<Response>, ApiError> {
    let Some(receipt) = state
        .shared
        .store
        .get_idempotency_receipt(key.operation, &key.zone_id, &key.scope_id, &key.key_digest)
        .await?
        .filter(|receipt| receipt.expires_at_ms > now_ms())
    else {
        return Ok(None);
    };
    if receipt.request_digest != key.request_digest {
        return Err(ApiError::new(ErrorCode::IdempotencyKeyConflict));
    }
    if !still_live(&receipt.resource_id).await? {
        return Err(ApiError::new(ErrorCode::IdempotencyResultInactive));
    }
    Ok(Some(replayed(
        receipt.response_status,
        &receipt.response_json,
    )))
}

/// Creates through `insert`, which stores the receipt (if the request sent a key) in the
/// create's own transaction, and answers 201 with `body`. If another request with the same key
/// won, nothing is created and its stored answer is replayed (or 409 if it asked otherwise).
pub(super) async fn create(
    state: &RoleState,
    key: Option<&Key>,
    resource_type: &str,
    resource_id: &str,
    body: Value,
    insert: impl AsyncFnOnce(Option<&IdempotencyReceipt>) -> Result<(), StoreError>,
) -> Result<Response, ApiError> {
    if let Some(key) = key
        && state
            .shared
            .store
            .count_idempotency_receipts(key.operation, &key.zone_id, &key.scope_id)
            .await?
            >= state
                .coordinator
                .as_ref()
                .map_or(0, |coordinator| coordinator.limits.receipts_per_operation)
    {
        return Err(ApiError::new(ErrorCode::IdempotencyReceiptLimitExceeded));
    }
    let receipt = key.map(|key| IdempotencyReceipt {
        operation: key.operation.to_owned(),
        zone_id: key.zone_id.clone(),
        scope_id: key.scope_id.clone(),
        key_digest: key.key_digest.clone(),
        request_digest: key.request_digest.clone(),
        resource_type: resource_type.to_owned(),
        resource_id: resource_id.to_owned(),
        response_status: i64::from(StatusCode::CREATED.as_u16()),
        response_json: body.to_string(),
        expires_at_ms: now_ms() + key.ttl_ms,
    });
    match insert(receipt.as_ref()).await {
        Ok(()) => Ok((StatusCode::CREATED, Json(body)).into_response()),
        Err(StoreError::Conflict(conflict)) => match key {
            Some(key) => match replay(state, key, async |_| Ok(true)).await? {
                Some(earlier) => Ok(earlier),
                None => Err(StoreError::Conflict(conflict).into()),
            },
            None => Err(StoreError::Conflict(conflict).into()),
        },
        Err(other) => Err(other.into()),
    }
}
