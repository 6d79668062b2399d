//! `/health`, `/ready` and `/metrics`, served by every role.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use caracal_core::{Check, ErrorCode, Readiness, Role};

use crate::error::ApiError;
use crate::state::RoleState;
use crate::wire::{CheckBody, ReadyBody};

/// A dependency that does not answer within this bound counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Liveness: 200 while the process can answer at all.
pub async fn health() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Readiness: 200 only if every check passes, else 503 naming the failed checks.
pub async fn ready(State(state): State<RoleState>) -> Response {
    let readiness = evaluate(&state).await;
    state.metrics.ready.set(i64::from(readiness.is_ready()));
    for check in readiness.checks().iter().filter(|check| !check.ok) {
        state
            .metrics
            .ready_check_failures
            .get_or_create(&crate::metrics::CheckLabels {
                check: check.name.to_owned(),
            })
            .inc();
    }
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = ReadyBody {
        status: if readiness.is_ready() {
            "ready"
        } else {
            "not_ready"
        }
        .to_owned(),
        reason: readiness.first_reason().map(str::to_owned),
        checks: readiness
            .checks()
            .iter()
            .map(|check| CheckBody {
                name: check.name.to_owned(),
                ok: check.ok,
                reason: check.reason.map(str::to_owned),
            })
            .collect(),
    };
    (
        status,
        [(http::header::CACHE_CONTROL, "no-store")],
        Json(body),
    )
        .into_response()
}

/// The checks every role runs, then the role's own. More role checks (revocation freshness,
/// policy bundle, evidence latch) join as those roles land.
async fn evaluate(state: &RoleState) -> Readiness {
    let shared = &state.shared;
    let shutdown = if shared.is_draining() {
        Check::fail("shutdown", "draining")
    } else {
        Check::pass("shutdown")
    };
    let store = match tokio::time::timeout(CHECK_TIMEOUT, shared.store.ping()).await {
        Ok(Ok(())) => Check::pass("store"),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: store check failed");
            Check::fail("store", "store_unreachable")
        }
        Err(_) => Check::fail("store", "store_timeout"),
    };
    let bus = match tokio::time::timeout(CHECK_TIMEOUT, shared.bus.streams.ping()).await {
        Ok(Ok(())) => Check::pass("bus"),
        Ok(Err(error)) => {
            tracing::warn!(%error, "readiness: bus check failed");
            Check::fail("bus", "bus_unreachable")
        }
        Err(_) => Check::fail("bus", "bus_timeout"),
    };
    let mut checks = vec![shutdown, store, bus, evidence_check(state).await];
    if state.role == Role::Api {
        checks.push(outbox_check(state).await);
    }
    if state.role == Role::Audit {
        checks.push(tamper_check(state).await);
    }
    checks.extend(crate::gateway::readiness(state).await);
    Readiness::new(checks)
}

/// Invariant 5: with evidence lost (latched) or nowhere to spill it, protected traffic stops.
/// The spill check writes and removes a probe file of its own (concurrent probes do not trip
/// over each other) on a blocking thread, within the check timeout.
async fn evidence_check(state: &RoleState) -> Check {
    if state.shared.evidence.is_lost() {
        return Check::fail("evidence", "audit_evidence_lost");
    }
    let probe = state
        .shared
        .replay_dir
        .join(format!(".ready-{}", uuid::Uuid::now_v7().simple()));
    let attempt = tokio::task::spawn_blocking(move || {
        std::fs::write(&probe, b"").and_then(|()| std::fs::remove_file(&probe))
    });
    match tokio::time::timeout(CHECK_TIMEOUT, attempt).await {
        Ok(Ok(Ok(()))) => Check::pass("evidence"),
        _ => Check::fail("evidence", "audit_replay_unavailable"),
    }
}

/// Invariant 7: a tamper finding keeps the Audit role not ready until an operator
/// acknowledges it.
async fn tamper_check(state: &RoleState) -> Check {
    match tokio::time::timeout(CHECK_TIMEOUT, state.shared.store.open_tamper_findings()).await {
        Ok(Ok(findings)) if !findings.is_empty() => Check::fail("tamper", "audit_tamper_detected"),
        Ok(Ok(_)) => Check::pass("tamper"),
        Ok(Err(_)) => Check::fail("tamper", "store_unreachable"),
        Err(_) => Check::fail("tamper", "store_timeout"),
    }
}

/// A dead outbox row is a change other roles never heard about: not ready until an operator
/// acts (the reference's `outbox_dead`).
async fn outbox_check(state: &RoleState) -> Check {
    match tokio::time::timeout(CHECK_TIMEOUT, state.shared.store.outbox_stats()).await {
        Ok(Ok(stats)) if stats.dead > 0 => Check::fail("outbox", "outbox_dead"),
        Ok(Ok(_)) => Check::pass("outbox"),
        Ok(Err(_)) => Check::fail("outbox", "store_unreachable"),
        Err(_) => Check::fail("outbox", "store_timeout"),
    }
}

pub async fn metrics(State(state): State<RoleState>, headers: http::HeaderMap) -> Response {
    if let Some(expected) = &state.shared.metrics_bearer {
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        if aws_lc_rs::constant_time::verify_slices_are_equal(
            presented.as_bytes(),
            expected.as_bytes(),
        )
        .is_err()
        {
            return ApiError::with_description(
                ErrorCode::InvalidToken,
                "metrics need the configured bearer (metrics_bearer)",
            )
            .into_response();
        }
    }
    state
        .metrics
        .store_pool_in_use_ratio
        .set(state.shared.store.pool_usage().unwrap_or(0.0));
    match state.metrics.render() {
        Ok(text) => (
            [(
                http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError::new(ErrorCode::InternalError).into_response(),
    }
}
