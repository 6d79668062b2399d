//! `/v1/incident/validate` and `/v1/incident/bundles`: the runbook's recovery check and its
//! evidence bundle, over the API (the console's incident screen uses them). Both run the
//! binary's own operator tools; a process started without them answers 404.
//!
//! Validation reads with the caller's token; its canaries act as an agent in the zone, so they
//! need a write token for it. A bundle holds a snapshot of the whole database: building and
//! downloading one need a deployment-wide write token, and each is audited before it happens.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use caracal_core::{ErrorCode, RequestId};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Change, json};
use crate::auth::{Access, authenticate};
use crate::error::ApiError;
use crate::recovery::{Canary, OperatorTools};
use crate::state::RoleState;

/// Where bundles built over the API are kept, under the data directory.
pub const BUNDLES_DIR: &str = "bundles";
const BUNDLE_PREFIX: &str = "bundle-";

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/v1/incident/validate", post(validate))
        .route("/v1/incident/bundles", post(preserve))
        .route("/v1/incident/bundles/{name}", get(download))
}

fn tools(state: &RoleState) -> Result<Arc<dyn OperatorTools>, ApiError> {
    state.shared.operator_tools.clone().ok_or_else(|| {
        ApiError::with_description(
            ErrorCode::NotFound,
            "this process offers no operator tools (start it with `caracal up` or `caracal serve`)",
        )
    })
}

fn bearer(headers: &http::HeaderMap) -> &str {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map_or("", str::trim)
}

async fn validate(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    raw: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    let canary: Canary = if raw.is_empty() {
        Canary::default()
    } else {
        json(&raw)?
    };
    match canary.zone.as_deref() {
        Some(zone) => {
            super::live_zone(&state, &caller, zone, Access::Write).await?;
        }
        None => caller.require(Access::Read, None)?,
    }
    let checks = tools(&state)?.validate(bearer(&headers), &canary).await;
    let ok = checks.iter().all(|check| check.ok);
    Ok(Json(json!({ "ok": ok, "checks": checks })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreserveBody {
    reason: String,
}

fn bundles_dir(state: &RoleState) -> PathBuf {
    // The replay directory sits in the data directory, as the bundles do.
    state
        .shared
        .replay_dir
        .parent()
        .map_or_else(|| PathBuf::from(BUNDLES_DIR), |home| home.join(BUNDLES_DIR))
}

/// Builds a signed evidence bundle and its tar archive; answers its name.
async fn preserve(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    raw: Bytes,
) -> Result<(http::StatusCode, Json<Value>), ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Write, None)?;
    let body: PreserveBody = json(&raw)?;
    let reason = super::incident::valid_reason(&body.reason)?;
    let tools = tools(&state)?;
    let name = format!("{BUNDLE_PREFIX}{}", uuid::Uuid::now_v7().simple());
    let mut event = super::audit_event(
        &caller,
        request_id.as_deref(),
        Change {
            zone_id: crate::ledger::SYSTEM_ZONE,
            action: "incident.preserve",
            entity_type: "evidence_bundle",
            entity_id: &name,
            fields: vec![],
        },
    );
    if let Some(metadata) = event.metadata_json.as_object_mut() {
        metadata.insert("reason".to_owned(), json!(reason));
    }
    super::record_now(&state, event).await?;
    let dir = bundles_dir(&state);
    let out = dir.join(&name);
    std::fs::create_dir_all(&dir)
        .and_then(|()| {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new().mode(0o700).create(&out)
        })
        .map_err(|error| internal("creating the bundle", &error))?;
    let preserved = tools.preserve(&out).await.map_err(|error| {
        tracing::error!(%error, bundle = %name, "the evidence bundle was not written");
        ApiError::with_description(
            ErrorCode::InternalError,
            "the evidence bundle was not written",
        )
    })?;
    let archive = dir.join(format!("{name}.tar"));
    tokio::task::spawn_blocking(move || archive_dir(&out, &archive))
        .await
        .map_err(|error| internal("archiving the bundle", &error))?
        .map_err(|error| internal("archiving the bundle", &error))?;
    Ok((
        http::StatusCode::CREATED,
        Json(json!({
            "name": name,
            "complete": preserved.complete(),
            "failed": preserved.failed,
            "unverified": preserved.unverified,
            "files": preserved.files,
            "key_id": preserved.key_id,
        })),
    ))
}

fn internal(what: &str, error: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(%error, "{what}");
    ApiError::new(ErrorCode::InternalError)
}

/// `dir` as a tar archive whose entries sit under the directory's own name, readable by the
/// owner alone (it holds a snapshot of the database).
fn archive_dir(dir: &std::path::Path, archive: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = dir.file_name().unwrap_or_default();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(archive)?;
    let mut builder = tar::Builder::new(file);
    builder.mode(tar::HeaderMode::Deterministic);
    builder.append_dir_all(name, dir)?;
    builder.into_inner()?.sync_all()
}

/// The bundle's tar archive, audited before it leaves.
async fn download(
    State(state): State<RoleState>,
    headers: http::HeaderMap,
    request_id: Option<Extension<RequestId>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let caller = authenticate(&state, &headers).await?;
    caller.require(Access::Write, None)?;
    let not_found = || ApiError::with_description(ErrorCode::NotFound, "no such bundle");
    let plain = name
        .strip_prefix(BUNDLE_PREFIX)
        .is_some_and(|id| id.len() == 32 && id.bytes().all(|byte| byte.is_ascii_hexdigit()));
    if !plain {
        return Err(not_found());
    }
    let bytes = tokio::fs::read(bundles_dir(&state).join(format!("{name}.tar")))
        .await
        .map_err(|_| not_found())?;
    super::record_now(
        &state,
        super::audit_event(
            &caller,
            request_id.as_deref(),
            Change {
                zone_id: crate::ledger::SYSTEM_ZONE,
                action: "incident.bundle_download",
                entity_type: "evidence_bundle",
                entity_id: &name,
                fields: vec![],
            },
        ),
    )
    .await?;
    Ok((
        [
            (http::header::CONTENT_TYPE, "application/x-tar".to_owned()),
            (
                http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.tar\""),
            ),
            (http::header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        bytes,
    )
        .into_response())
}
