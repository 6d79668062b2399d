//! `/v1/zones/{zone_id}/signing-keys`: list a zone's mandate signing keys and rotate them.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use serde::Deserialize;

use super::{Change, evidence, invalid_body, json, timestamp};
use crate::auth::Access;
use crate::error::ApiError;
use crate::keys;
use crate::state::RoleState;
use crate::wire::{RotatedKeyBody, SigningKeyBody, SigningKeysBody};

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/zones/{zone_id}/signing-keys", get(list))
        .route("/v1/zones/{zone_id}/signing-keys/rotate", post(rotate))
}

/// The longest overlap a rotation may give the previous key: a week.
const MAX_OVERLAP_SECONDS: u64 = 7 * 24 * 3600;

async fn list(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    Path(zone_id): Path<String>,
) -> Result<Json<SigningKeysBody>, ApiError> {
    super::zone_caller(&state, &headers, &zone_id, Access::Read).await?;
    let rows = state.shared.store.list_signing_keys(&zone_id).await?;
    Ok(Json(SigningKeysBody {
        items: rows
            .into_iter()
            .rev()
            .map(|key| SigningKeyBody {
                kid: key.kid,
                status: key.status,
                algorithm: key.algorithm,
                created_at: timestamp(key.created_at_ms),
                verifies_until: key.retired_at_ms.map(timestamp),
            })
            .collect(),
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    /// How long the previous key keeps verifying; 24 h when absent.
    #[serde(default)]
    overlap_seconds: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

async fn rotate(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(zone_id): Path<String>,
    raw: Bytes,
) -> Result<Json<RotatedKeyBody>, ApiError> {
    let caller = super::zone_caller(&state, &headers, &zone_id, Access::Write).await?;
    let request: RotateRequest = if raw.is_empty() {
        RotateRequest::default()
    } else {
        json(&raw)?
    };
    let overlap = match request.overlap_seconds {
        None => keys::DEFAULT_OVERLAP,
        Some(seconds) if seconds <= MAX_OVERLAP_SECONDS => Duration::from_secs(seconds),
        Some(_) => {
            return Err(invalid_body(
                "overlap_seconds",
                "must be at most 604800 (7 days)",
            ));
        }
    };
    let audit = evidence(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: &zone_id,
            action: "signing_key.rotate",
            entity_type: "zone",
            entity_id: &zone_id,
            fields: if request.reason.is_some() {
                vec!["signing_key", "reason"]
            } else {
                vec!["signing_key"]
            },
        },
    )?;
    let kid = keys::rotate(
        state.shared.store.as_ref(),
        &state.shared.kek,
        &zone_id,
        overlap,
        audit,
    )
    .await
    .map_err(|error| match error {
        keys::KeyError::Store(store) => ApiError::from(store),
        other => {
            tracing::error!(error = %other, "signing key rotation failed");
            ApiError::new(ErrorCode::InternalError)
        }
    })?;
    tracing::info!(zone = %zone_id, %kid, reason = request.reason.as_deref().unwrap_or(""), "zone signing key rotated");
    Ok(Json(RotatedKeyBody {
        rotated: true,
        zone_id,
        kid,
    }))
}
