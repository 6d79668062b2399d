//! Stream names, as the reference and its SDK spell them.

pub const SESSIONS_REVOKE: &str = "caracal.sessions.revoke";
pub const DELEGATIONS_INVALIDATE: &str = "caracal.delegations.invalidate";
pub const POLICY_INVALIDATE: &str = "caracal.policy.invalidate";
pub const KEYS_INVALIDATE: &str = "caracal.keys.invalidate";
pub const AUDIT_EVENTS: &str = "caracal.audit.events";
pub const AGENTS_LIFECYCLE: &str = "caracal.agents.lifecycle";

/// Every stream the roles read through consumer groups (what retention trims).
pub const ALL: [&str; 6] = [
    SESSIONS_REVOKE,
    DELEGATIONS_INVALIDATE,
    POLICY_INVALIDATE,
    KEYS_INVALIDATE,
    AUDIT_EVENTS,
    AGENTS_LIFECYCLE,
];
