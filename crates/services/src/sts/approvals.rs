//! Human approval of gated mints: a mint whose scopes the policy gates answers 401
//! `interaction_required` with a hold; an approver decides it (operators through the admin
//! API, subjects here); the same mint retried with `approval_id` spends the approval once,
//! creating its authority record in the same transaction. A retry within two minutes of that
//! is answered for the same record without a new decision.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use caracal_policy::Bundle;
use caracal_store::{ApprovalHold, StoreError, now_ms};
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::{Sts, TokenError};
use crate::state::RoleState;

/// The decision contract's version, part of every binding: a new contract voids pending holds.
pub const CONTRACT_VERSION: &str = "caracal-decision-contract-2026-11-29";
/// How long after consumption the same request is answered again for the same record.
const REISSUE_WINDOW_MS: i64 = 120_000;
/// The longest a poll waits.
const MAX_WAIT: Duration = Duration::from_secs(25);
const MAX_REASON: usize = 500;

/// What the policy's tiers require: who approves, and for how long a hold stands.
pub(super) struct Gate {
    pub tier: String,
    pub approver_class: String,
    pub ttl_ms: i64,
    pub privacy: String,
}

/// Resolves the gated tiers against the bundle's `approval_tiers`: a specific approver class
/// wins over `any`; `operator` together with `subject` cannot be satisfied (403). The hold
/// lives for the shortest declared TTL, clamped per class, at least a minute.
pub(super) fn gate(bundle: Option<&Bundle>, tiers: &[String]) -> Result<Gate, TokenError> {
    let mut tiers = tiers.to_vec();
    tiers.sort();
    tiers.dedup();
    let declared: Vec<&caracal_policy::ApprovalTier> = bundle
        .map(|bundle| {
            bundle
                .approval_tiers
                .iter()
                .filter(|entry| tiers.contains(&entry.tier))
                .collect()
        })
        .unwrap_or_default();
    let mut class = "any";
    for entry in &declared {
        class = match (class, entry.approver.as_str()) {
            ("any", other) | (other, "any") => other,
            (same, other) if same == other => same,
            _ => {
                return Err(TokenError::denied(
                    "the approval tiers need both an operator and the subject; no one can approve",
                ));
            }
        };
    }
    let (default_s, max_s) = if class == "operator" {
        (4 * 3600, 7 * 24 * 3600)
    } else {
        (15 * 60, 24 * 3600)
    };
    let ttl_s = declared
        .iter()
        .map(|entry| entry.ttl_seconds)
        .min()
        .unwrap_or(default_s)
        .clamp(60, max_s);
    let privacy = declared
        .iter()
        .filter_map(|entry| entry.privacy.as_deref())
        .max_by_key(|privacy| match *privacy {
            "anonymous" => 2,
            "pseudonymous" => 1,
            _ => 0,
        })
        .unwrap_or("identified");
    Ok(Gate {
        tier: tiers.join(","),
        approver_class: if class == "any" && declared.is_empty() {
            "operator".to_owned()
        } else {
            class.to_owned()
        },
        ttl_ms: i64::try_from(ttl_s).unwrap_or(i64::MAX / 1000) * 1000,
        privacy: privacy.to_owned(),
    })
}

/// What an approval is bound to: SHA-256 over NUL-separated labelled sections, so a decision
/// applies to exactly this request under exactly this policy version.
pub(super) struct Binding<'a> {
    pub resources: &'a [String],
    pub scopes: &'a [String],
    pub principal: &'a str,
    pub authority_record: &'a str,
    pub session: &'a str,
    pub delegation: &'a str,
    pub policy_version: &'a str,
    pub manifest_sha256: &'a str,
}

impl Binding<'_> {
    pub fn hex(&self) -> String {
        let mut resources: Vec<String> = self.resources.iter().map(|r| r.to_lowercase()).collect();
        resources.sort();
        resources.dedup();
        let mut scopes = self.scopes.to_vec();
        scopes.sort();
        scopes.dedup();
        let mut text = String::new();
        for (label, value) in [
            ("resources", resources.join("\u{1f}")),
            ("scopes", scopes.join("\u{1f}")),
            ("principal", self.principal.to_owned()),
            ("authority_record", self.authority_record.to_owned()),
            ("session", self.session.to_owned()),
            ("delegation", self.delegation.to_owned()),
            ("policy_set_version", self.policy_version.to_owned()),
            ("manifest_sha256", self.manifest_sha256.to_owned()),
            ("contract", CONTRACT_VERSION.to_owned()),
        ] {
            text.push_str(label);
            text.push('=');
            text.push_str(&value);
            text.push('\0');
        }
        caracal_crypto::hex(&caracal_crypto::sha256(text.as_bytes()))
    }
}

/// A fresh hold id: a random UUIDv4, the capability the requester polls with.
fn hold_id() -> Result<String, TokenError> {
    let mut bytes: [u8; 16] = caracal_crypto::random_bytes().map_err(|_| TokenError::internal())?;
    if let Some(version) = bytes.get_mut(6) {
        *version = (*version & 0x0f) | 0x40;
    }
    if let Some(variant) = bytes.get_mut(8) {
        *variant = (*variant & 0x3f) | 0x80;
    }
    Ok(uuid::Uuid::from_bytes(bytes).to_string())
}

fn rfc3339(ms: i64) -> String {
    let since_epoch = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + since_epoch).to_string()
}

/// 401 `interaction_required` for `hold`, with the fields the SDK reads.
pub(super) fn interaction_required(hold: &ApprovalHold, now: i64) -> TokenError {
    let mut error = TokenError::new(
        StatusCode::UNAUTHORIZED,
        "interaction_required",
        "human approval is required; retry with approval_id once it is approved",
    );
    error.extra = Some(json!({
        "approval_id": hold.id,
        "approval_type": "human_approval",
        "state": crate::holds::state_of(hold, now),
        "tier": hold.tier,
        "binding": hold.binding_hash,
        "approval_expires_at": rfc3339(hold.expires_at_ms),
    }));
    error
}

/// How a gated mint proceeds once its approval is settled.
pub(super) enum Approved {
    /// Spend hold `0`, creating the mint's record with it.
    Consume(Box<ApprovalHold>),
    /// Already spent within the window for this record: mint again for it, no new record.
    Reissue { sid: String, expires_at_ms: i64 },
}

/// For a gated mint: the approval presented (or the hold to wait on). `Err` is the answer to
/// give now (the hold, or why the approval does not count).
#[allow(clippy::too_many_arguments)]
pub(super) async fn settle(
    state: &RoleState,
    zone_id: &str,
    application_id: &str,
    session_id: &str,
    approval_id: Option<&str>,
    binding: &str,
    gate: &Gate,
    metadata: serde_json::Value,
    request_id: &str,
) -> Result<Approved, TokenError> {
    let store = state.shared.store.as_ref();
    let now = now_ms();
    let Some(approval_id) = approval_id else {
        // The same request while its hold is pending gets the same hold.
        let pending = store.list_pending_approval_holds(zone_id).await?;
        if let Some(hold) = pending
            .iter()
            .find(|hold| hold.binding_hash == binding && hold.principal_id == application_id)
        {
            return Err(interaction_required(hold, now));
        }
        let hold = ApprovalHold {
            id: hold_id()?,
            zone_id: zone_id.to_owned(),
            session_id: session_id.to_owned(),
            principal_id: application_id.to_owned(),
            application_id: application_id.to_owned(),
            tier: gate.tier.clone(),
            approver_class: gate.approver_class.clone(),
            binding_hash: binding.to_owned(),
            metadata: json!({"privacy": gate.privacy, "request": metadata}).to_string(),
            created_at_ms: now,
            expires_at_ms: now + gate.ttl_ms,
            decision: None,
            decided_at_ms: None,
            decision_reason: None,
            approver_id: None,
            consumed_at_ms: None,
            consumed_record_id: None,
        };
        let issued = crate::holds::event("step_up_issued", &hold, request_id, "allow", json!({}))
            .ok_or_else(TokenError::internal)?;
        store.create_approval_hold(&hold, &[issued]).await?;
        return Err(interaction_required(&hold, now));
    };
    let hold = store
        .get_approval_hold(zone_id, approval_id)
        .await?
        .ok_or_else(|| TokenError::unauthenticated("approval not found"))?;
    if hold.binding_hash != binding || hold.principal_id != application_id {
        return Err(TokenError::unauthenticated("approval binding mismatch"));
    }
    match crate::holds::state_of(&hold, now) {
        "pending" => Err(interaction_required(&hold, now)),
        "rejected" => Err(TokenError::denied("approval rejected")),
        "expired" => Err(TokenError::unauthenticated("approval expired")),
        "consumed" => {
            let within = hold
                .consumed_at_ms
                .is_some_and(|at| now - at <= REISSUE_WINDOW_MS);
            let record = match (&hold.consumed_record_id, within) {
                (Some(record_id), true) => store.get_authority_record(zone_id, record_id).await?,
                _ => None,
            };
            match record {
                Some(record) if record.active(now) => Ok(Approved::Reissue {
                    sid: record.id,
                    expires_at_ms: record.expires_at_ms,
                }),
                _ => Err(consumed()),
            }
        }
        _ => Ok(Approved::Consume(Box::new(hold))),
    }
}

pub(super) fn consumed() -> TokenError {
    TokenError::new(
        StatusCode::CONFLICT,
        "approval_consumed",
        "the approval has already been used",
    )
}

/// A lost race to consume is `approval_consumed`; anything else as usual.
pub(super) fn consume_error(error: StoreError) -> TokenError {
    match error {
        StoreError::Conflict(_) => consumed(),
        other => other.into(),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct WaitQuery {
    wait: Option<u64>,
}

fn valid_hold_id(id: &str) -> bool {
    id.len() == 36 && uuid::Uuid::parse_str(id).is_ok()
}

/// `GET /approvals/{id}?wait=N`: the hold's state, waiting up to N (≤ 25) seconds for it to
/// leave `pending`. The id is the capability; an unknown or malformed one is 404.
pub async fn poll(
    State(state): State<RoleState>,
    request_id: Option<axum::Extension<caracal_core::RequestId>>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let request_id = request_id.map(|id| id.to_string()).unwrap_or_default();
    let Ok(Query(query)) = query else {
        return TokenError::malformed("wait must be a whole number of seconds").render(&request_id);
    };
    if !valid_hold_id(&id) {
        return not_found(&request_id);
    }
    let wait = Duration::from_secs(query.wait.unwrap_or(0)).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let hold = match state.shared.store.approval_hold_by_id(&id).await {
            Ok(Some(hold)) => hold,
            Ok(None) => return not_found(&request_id),
            Err(error) => return TokenError::from(error).render(&request_id),
        };
        let now = now_ms();
        let current = crate::holds::state_of(&hold, now);
        if current != "pending"
            || tokio::time::Instant::now() >= deadline
            || state.shared.is_draining()
        {
            return Json(
                json!({"id": hold.id, "state": current, "expires_at": rfc3339(hold.expires_at_ms)}),
            )
            .into_response();
        }
        tokio::time::sleep(Duration::from_millis(250).min(deadline - tokio::time::Instant::now()))
            .await;
    }
}

fn not_found(request_id: &str) -> Response {
    TokenError::new(
        StatusCode::NOT_FOUND,
        "resource_not_found",
        "no such approval",
    )
    .render(request_id)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DecisionBody {
    decision: String,
    binding: String,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /approvals/{id}/decision`: a subject decides a hold raised for it, with a user
/// session mandate as bearer. Operator-class holds are decided through the admin API.
pub async fn decide(
    State(state): State<RoleState>,
    request_id: Option<axum::Extension<caracal_core::RequestId>>,
    headers: http::HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let request_id = request_id.map(|id| id.to_string()).unwrap_or_default();
    let Some(sts) = state.sts.clone() else {
        return TokenError::internal().render(&request_id);
    };
    match decide_hold(&state, &sts, &headers, &id, &body, &request_id).await {
        Ok(answer) => Json(answer).into_response(),
        Err(error) => error.render(&request_id),
    }
}

async fn decide_hold(
    state: &RoleState,
    sts: &Sts,
    headers: &http::HeaderMap,
    id: &str,
    body: &[u8],
    request_id: &str,
) -> Result<serde_json::Value, TokenError> {
    if body.len() > super::MAX_FORM_BYTES {
        return Err(TokenError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the body is too large",
        ));
    }
    let decision: DecisionBody = serde_json::from_slice(body)
        .map_err(|error| TokenError::malformed(format!("invalid decision body: {error}")))?;
    if !matches!(decision.decision.as_str(), "approved" | "rejected") {
        return Err(TokenError::malformed(
            "decision must be approved or rejected",
        ));
    }
    let reason = decision.reason.unwrap_or_default();
    if reason.chars().count() > MAX_REASON {
        return Err(TokenError::malformed(
            "reason must be at most 500 characters",
        ));
    }
    if !valid_hold_id(id) {
        return Err(TokenError::new(
            StatusCode::NOT_FOUND,
            "resource_not_found",
            "no such approval",
        ));
    }
    let store = state.shared.store.as_ref();
    let hold = store.approval_hold_by_id(id).await?.ok_or_else(|| {
        TokenError::new(
            StatusCode::NOT_FOUND,
            "resource_not_found",
            "no such approval",
        )
    })?;
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| TokenError::bad_subject("a user session mandate is required"))?;
    let approver =
        super::exchange::verify_subject(state, sts, &hold.zone_id, bearer, "session").await?;
    if approver.sub_type != "user" {
        return Err(TokenError::denied(
            "only a user (subject) session can decide an approval here",
        ));
    }
    if hold.approver_class == "operator" {
        return Err(TokenError::denied(
            "this approval is for an operator (admin API)",
        ));
    }
    if aws_lc_rs::constant_time::verify_slices_are_equal(
        hold.binding_hash.as_bytes(),
        decision.binding.as_bytes(),
    )
    .is_err()
    {
        return Err(TokenError::unauthenticated("approval binding mismatch"));
    }
    // An approver cannot approve what its own lineage asked for.
    if hold.session_id == approver.sid || hold.session_id == approver.root_sid {
        return Err(TokenError::denied(
            "an approver cannot decide a hold raised by its own lineage",
        ));
    }
    let approver_id = format!("subject:{}", approver.sub);
    let decided = decided_event(
        &hold,
        request_id,
        &decision.decision,
        &approver_id,
        "subject",
    )
    .ok_or_else(TokenError::internal)?;
    store
        .decide_approval_hold(
            &hold.zone_id,
            &hold.id,
            &decision.decision,
            &reason,
            &approver_id,
            &[decided],
        )
        .await
        .map_err(|error| match error {
            StoreError::Conflict(_) => TokenError::new(
                StatusCode::CONFLICT,
                "approval_not_decidable",
                "the approval is no longer pending",
            ),
            other => other.into(),
        })?;
    Ok(json!({"id": hold.id, "state": decision.decision}))
}

/// `step_up_decided` for `hold`, decided `decision` by `approver_id` through `plane` (`admin`
/// or `subject`).
pub(crate) fn decided_event(
    hold: &ApprovalHold,
    request_id: &str,
    decision: &str,
    approver_id: &str,
    plane: &str,
) -> Option<caracal_store::OutboxMessage> {
    crate::holds::event(
        "step_up_decided",
        hold,
        request_id,
        if decision == "approved" {
            "allow"
        } else {
            "deny"
        },
        json!({"decision": decision, "approver_id": approver_id, "approver_plane": plane}),
    )
}
