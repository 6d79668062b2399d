//! Approval holds as both the admin API and the STS read them.

use caracal_store::ApprovalHold;

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
