//! Approval holds as both the admin API and the STS read them.

use caracal_audit::Event;
use caracal_store::{ApprovalHold, OutboxMessage, now_ms};

/// The hold's state, by precedence: consumed > rejected > expired > approved > pending (an
/// approved hold past its window reads expired).
pub fn state_of(hold: &ApprovalHold, now: i64) -> &'static str {
    if hold.consumed_at_ms.is_some() {
        "consumed"
    } else if hold.decision.as_deref() == Some("rejected") {
        "rejected"
    } else if hold.expires_at_ms <= now {
        "expired"
    } else if hold.decision.as_deref() == Some("approved") {
        "approved"
    } else {
        "pending"
    }
}

/// The ledger event of a hold's step (`step_up_issued`, `step_up_decided`,
/// `step_up_consumed`): the hold's identity and binding, and what `extra` adds (who decided
/// and how, the record it was spent on). Written in the step's own transaction.
pub fn event(
    event_type: &str,
    hold: &ApprovalHold,
    request_id: &str,
    decision: &str,
    extra: serde_json::Value,
) -> Option<OutboxMessage> {
    let privacy = serde_json::from_str::<serde_json::Value>(&hold.metadata)
        .ok()
        .and_then(|metadata| metadata.get("privacy").cloned())
        .unwrap_or(serde_json::Value::Null);
    let mut metadata = serde_json::json!({
        "challenge_id": hold.id,
        "tier": hold.tier,
        "approver_class": hold.approver_class,
        "privacy_mode": privacy,
        "binding": hold.binding_hash,
        "principal_id": hold.principal_id,
        "application_id": hold.application_id,
        "session_id": hold.session_id,
        "expires_at_ms": hold.expires_at_ms,
    });
    if let (Some(metadata), serde_json::Value::Object(extra)) = (metadata.as_object_mut(), extra) {
        metadata.extend(extra);
    }
    crate::evidence::outbox_message(&Event {
        id: uuid::Uuid::now_v7().to_string(),
        zone_id: hold.zone_id.clone(),
        event_type: event_type.to_owned(),
        request_id: request_id.to_owned(),
        decision: decision.to_owned(),
        policy_set_id: None,
        policy_set_version_id: None,
        manifest_sha: None,
        evaluation_status: "complete".to_owned(),
        determining_policies_json: serde_json::json!([]),
        diagnostics_json: serde_json::json!([]),
        metadata_json: metadata,
        occurred_at_ms: now_ms(),
    })
}
