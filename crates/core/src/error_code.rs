//! Stable error codes: the `error` field of every JSON error body, with its HTTP status.
//!
//! A code is part of the wire contract: once shipped it never changes meaning or spelling.
//! Metrics label fail-closed denials with the same string.

/// Every error a client can see. Add variants; never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed: bad syntax, bad field, bad header.
    InvalidRequest,
    /// No such route or object (also used for objects of another zone).
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// The body exceeds the route's limit.
    PayloadTooLarge,
    /// The process is shutting down and refuses new protected work.
    Draining,
    /// A dependency or safety check failed; the role refuses protected work (fail closed).
    NotReady,
    /// The system of record cannot be reached (invariant 1: store down denies).
    StoreUnavailable,
    /// Anything unexpected. The client sees only this code; details go to the log once.
    InternalError,
    /// No, malformed, unknown or revoked admin bearer token.
    InvalidAdminToken,
    /// A read-capability token tried to change something.
    AdminTokenReadOnly,
    /// An approve-capability token tried something other than reading or deciding approvals.
    AdminTokenApproveOnly,
    /// A zone-scoped token named another zone, or a global-only route.
    AdminTokenZoneMismatch,
    /// The audit pipeline's buffer stayed full: retry after the `Retry-After` delay.
    AuditOverloaded,
    /// Audit evidence could not be recorded; protected work is refused (invariant 5).
    AuditEvidenceLost,
    /// A JSON body that does not parse, has unknown fields, wrong types or invalid values.
    InvalidBody,
    /// Another live zone has this slug.
    ZoneSlugConflict,
    /// Another live application of the zone has this name (case-insensitive).
    ApplicationNameConflict,
    /// Caracal keeps only a hash of client secrets; they cannot be shown again.
    ClientSecretNotStored,
    /// The reserved system zone cannot be changed through the API.
    SystemZoneReadOnly,
    /// Another provider of the zone has this identifier.
    ProviderIdentifierConflict,
    /// A live resource still uses the provider.
    ProviderInUse,
    /// Another active subject issuer of the zone has this issuer URL.
    SubjectIssuerConflict,
    /// Another workload of the zone has this name.
    WorkloadNameConflict,
    /// The zone already holds as many objects of this kind as it may (20 subject issuers).
    ZoneLimitExceeded,
    /// Another resource of the zone has this identifier.
    ResourceIdentifierConflict,
    /// A resource needs a credential provider.
    CredentialProviderRequired,
    /// A resource needs an upstream URL.
    UpstreamUrlRequired,
    /// A policy is not an acceptable data document; `details.diagnostics` says why.
    InvalidRego,
    /// A policy set version's documents do not compile into one bundle.
    InvalidPolicyBundle,
    /// A canary case of the version disagreed with its expected decision.
    CanaryFailed,
    /// The zone has no last known good version to roll back to.
    NoLastKnownGood,
    /// Another policy or policy set of the zone has this name.
    PolicyNameConflict,
    /// Deciding approvals needs a token with the approve capability.
    ApproveCapabilityRequired,
    /// The hold may only be decided by the subject (a federated user), not an operator.
    SubjectApprovalRequired,
    /// The hold is already decided, consumed or expired.
    ApprovalNotDecidable,
    /// Too many failed attempts from this address: wait for `Retry-After`.
    RateLimited,
    /// Coordinator: no bearer lifecycle mandate.
    MissingToken,
    /// Coordinator: the bearer is not a valid lifecycle mandate of this deployment.
    InvalidToken,
    /// Coordinator: the bearer's authority record or application is no longer active.
    IdentityRevoked,
    /// Coordinator: the bearer lacks `agent:lifecycle`.
    MissingScope,
    /// Coordinator: the bearer belongs to another zone than the path's.
    ZoneMismatch,
    /// Coordinator: a path id is not `[A-Za-z0-9_.-:]{1,128}`, or a body field is invalid.
    InvalidParams,
    /// Coordinator: no such live session in the zone.
    SessionNotFound,
    /// Coordinator: the session is another application's.
    ParentOwnershipRequired,
    /// Coordinator: the session tree would be deeper than allowed.
    SessionDepthLimitExceeded,
    /// Coordinator: the parent already has as many children as allowed.
    SessionChildrenLimitExceeded,
    /// Coordinator: the application already has as many live sessions as allowed.
    SessionLimitExceeded,
    /// Coordinator: the zone already has as many live sessions as allowed.
    SessionZoneLimitExceeded,
    /// Coordinator: no such delegation in the zone.
    DelegationNotFound,
    /// Coordinator: a new delegation would widen what its parent grants; the rule is named.
    DelegationExceedsParentAuthority,
    /// Coordinator: the delegation would close a cycle.
    DelegationCycleDenied,
    /// Coordinator: a delegation needs an expiry (`ttl_seconds` or `constraints.expires_at`).
    DelegationExpiryRequired,
    /// Coordinator: the delegation's sessions are not the issuer's and receiver's named.
    DelegationApplicationMismatch,
    /// Coordinator: the source session holds several delegations and none is named as parent.
    ParentDelegationAmbiguous,
    /// Coordinator: a delegation without resources needs the broad-delegation permission.
    BroadDelegationPermissionRequired,
    /// Coordinator: a child inheriting its parent's authority, where the parent holds several
    /// live delegations and none is named (`inherit_parent_edge_id`).
    InheritParentEdgeAmbiguous,
    /// Coordinator: the parent's delegation to inherit (named, or its only one) has lapsed.
    InheritParentEdgeNotActive,
    /// Coordinator: the idempotency key was used for a different request.
    IdempotencyKeyConflict,
    /// Coordinator: the application holds as many live idempotency receipts for this operation
    /// as allowed; send creates without a key, or wait for receipts to expire.
    IdempotencyReceiptLimitExceeded,
    /// Coordinator: the idempotency key's result (a session) is no longer live.
    IdempotencyResultInactive,
    /// Coordinator: a newer lease holder fenced this one.
    SessionLeaseFenced,
    /// Coordinator: the session is no longer live (ended, or its lease lapsed).
    SessionNotLive,
    /// Coordinator: leases and heartbeats are for service sessions.
    SessionNotService,
    /// Coordinator: a service session's heartbeat or termination names its lease generation.
    LeaseGenerationRequired,
    /// An incident freeze is in force: policy activations, provider and resource changes wait.
    ChangeFreeze,
    /// An audit retention longer than the deployment's `audit.retention_days`.
    RetentionAboveLimit,
    /// A mint limit higher than the deployment's `sts.mint_rate_limit_per_minute`.
    MintRateLimitAboveLimit,
    /// An OIDC issuer's discovery document could not be fetched or did not describe it.
    DiscoveryFailed,
    /// A provider's token endpoint refused or failed an authorization-code exchange.
    TokenExchangeFailed,
    /// Dynamic client registration asked of a zone that does not accept it.
    DcrDisabled,
    /// Registration turned off while registered applications live, without saying what
    /// becomes of them.
    DcrShutdownRequired,
    /// An incident containment refuses protected traffic (deployment-wide or for the zone).
    Contained,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Draining => "draining",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::InvalidAdminToken => "invalid_admin_token",
            ErrorCode::AdminTokenReadOnly => "admin_token_read_only",
            ErrorCode::AdminTokenApproveOnly => "admin_token_approve_only",
            ErrorCode::AdminTokenZoneMismatch => "admin_token_zone_mismatch",
            ErrorCode::AuditOverloaded => "audit_overloaded",
            ErrorCode::AuditEvidenceLost => "audit_evidence_lost",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::ZoneSlugConflict => "zone_slug_conflict",
            ErrorCode::ApplicationNameConflict => "application_name_conflict",
            ErrorCode::ClientSecretNotStored => "client_secret_not_stored",
            ErrorCode::SystemZoneReadOnly => "system_zone_read_only",
            ErrorCode::ProviderIdentifierConflict => "provider_identifier_conflict",
            ErrorCode::SubjectIssuerConflict => "subject_issuer_conflict",
            ErrorCode::WorkloadNameConflict => "workload_name_conflict",
            ErrorCode::ZoneLimitExceeded => "zone_limit_exceeded",
            ErrorCode::ProviderInUse => "provider_in_use",
            ErrorCode::ResourceIdentifierConflict => "resource_identifier_conflict",
            ErrorCode::CredentialProviderRequired => "credential_provider_required",
            ErrorCode::UpstreamUrlRequired => "upstream_url_required",
            ErrorCode::InvalidRego => "invalid_rego",
            ErrorCode::InvalidPolicyBundle => "invalid_policy_bundle",
            ErrorCode::CanaryFailed => "canary_failed",
            ErrorCode::NoLastKnownGood => "no_last_known_good",
            ErrorCode::PolicyNameConflict => "policy_name_conflict",
            ErrorCode::ApproveCapabilityRequired => "approve_capability_required",
            ErrorCode::SubjectApprovalRequired => "subject_approval_required",
            ErrorCode::ApprovalNotDecidable => "approval_not_decidable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::MissingToken => "missing_token",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::IdentityRevoked => "identity_revoked",
            ErrorCode::MissingScope => "missing_scope",
            ErrorCode::ZoneMismatch => "zone_mismatch",
            ErrorCode::InvalidParams => "invalid_params",
            ErrorCode::SessionNotFound => "session_not_found",
            ErrorCode::ParentOwnershipRequired => "parent_ownership_required",
            ErrorCode::SessionDepthLimitExceeded => "session_depth_limit_exceeded",
            ErrorCode::SessionChildrenLimitExceeded => "session_children_limit_exceeded",
            ErrorCode::SessionLimitExceeded => "session_limit_exceeded",
            ErrorCode::SessionZoneLimitExceeded => "session_zone_limit_exceeded",
            ErrorCode::DelegationNotFound => "delegation_not_found",
            ErrorCode::DelegationExceedsParentAuthority => "delegation_exceeds_parent_authority",
            ErrorCode::DelegationCycleDenied => "delegation_cycle_denied",
            ErrorCode::DelegationExpiryRequired => "delegation_expiry_required",
            ErrorCode::DelegationApplicationMismatch => "delegation_application_mismatch",
            ErrorCode::ParentDelegationAmbiguous => "parent_delegation_ambiguous",
            ErrorCode::BroadDelegationPermissionRequired => "broad_delegation_permission_required",
            ErrorCode::InheritParentEdgeAmbiguous => "inherit_parent_edge_ambiguous",
            ErrorCode::InheritParentEdgeNotActive => "inherit_parent_edge_not_active",
            ErrorCode::IdempotencyKeyConflict => "idempotency_key_conflict",
            ErrorCode::IdempotencyReceiptLimitExceeded => "idempotency_receipt_limit_exceeded",
            ErrorCode::IdempotencyResultInactive => "idempotency_result_inactive",
            ErrorCode::SessionLeaseFenced => "session_lease_fenced",
            ErrorCode::SessionNotLive => "session_not_live",
            ErrorCode::SessionNotService => "session_not_service",
            ErrorCode::LeaseGenerationRequired => "lease_generation_required",
            ErrorCode::ChangeFreeze => "change_freeze",
            ErrorCode::RetentionAboveLimit => "retention_above_limit",
            ErrorCode::MintRateLimitAboveLimit => "mint_rate_limit_above_limit",
            ErrorCode::DiscoveryFailed => "discovery_failed",
            ErrorCode::TokenExchangeFailed => "token_exchange_failed",
            ErrorCode::DcrDisabled => "dcr_disabled",
            ErrorCode::DcrShutdownRequired => "dcr_shutdown_required",
            ErrorCode::Contained => "contained",
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::InvalidBody
            | ErrorCode::CredentialProviderRequired
            | ErrorCode::UpstreamUrlRequired => 400,
            ErrorCode::ZoneSlugConflict
            | ErrorCode::ApplicationNameConflict
            | ErrorCode::ProviderIdentifierConflict
            | ErrorCode::SubjectIssuerConflict
            | ErrorCode::WorkloadNameConflict
            | ErrorCode::ZoneLimitExceeded
            | ErrorCode::ProviderInUse
            | ErrorCode::ResourceIdentifierConflict
            | ErrorCode::CanaryFailed
            | ErrorCode::NoLastKnownGood
            | ErrorCode::PolicyNameConflict
            | ErrorCode::ApprovalNotDecidable
            | ErrorCode::IdempotencyKeyConflict
            | ErrorCode::IdempotencyResultInactive
            | ErrorCode::SessionLeaseFenced
            | ErrorCode::SessionNotLive
            | ErrorCode::SessionNotService
            | ErrorCode::InheritParentEdgeAmbiguous
            | ErrorCode::InheritParentEdgeNotActive => 409,
            ErrorCode::LeaseGenerationRequired
            | ErrorCode::RetentionAboveLimit
            | ErrorCode::MintRateLimitAboveLimit => 400,
            ErrorCode::ChangeFreeze => 423,
            ErrorCode::DiscoveryFailed | ErrorCode::TokenExchangeFailed => 502,
            ErrorCode::DcrDisabled => 403,
            ErrorCode::DcrShutdownRequired => 409,
            ErrorCode::Contained => 503,
            ErrorCode::InvalidRego | ErrorCode::InvalidPolicyBundle => 422,
            ErrorCode::RateLimited
            | ErrorCode::SessionDepthLimitExceeded
            | ErrorCode::SessionChildrenLimitExceeded
            | ErrorCode::SessionLimitExceeded
            | ErrorCode::SessionZoneLimitExceeded
            | ErrorCode::IdempotencyReceiptLimitExceeded => 429,
            ErrorCode::MissingToken | ErrorCode::InvalidToken | ErrorCode::IdentityRevoked => 401,
            ErrorCode::MissingScope
            | ErrorCode::ZoneMismatch
            | ErrorCode::ParentOwnershipRequired => 403,
            ErrorCode::InvalidParams => 400,
            ErrorCode::SessionNotFound | ErrorCode::DelegationNotFound => 404,
            ErrorCode::DelegationExceedsParentAuthority
            | ErrorCode::BroadDelegationPermissionRequired => 403,
            ErrorCode::DelegationCycleDenied
            | ErrorCode::DelegationApplicationMismatch
            | ErrorCode::ParentDelegationAmbiguous => 409,
            ErrorCode::DelegationExpiryRequired => 400,
            ErrorCode::ClientSecretNotStored => 404,
            ErrorCode::SystemZoneReadOnly
            | ErrorCode::ApproveCapabilityRequired
            | ErrorCode::SubjectApprovalRequired => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Draining
            | ErrorCode::NotReady
            | ErrorCode::StoreUnavailable
            | ErrorCode::AuditOverloaded
            | ErrorCode::AuditEvidenceLost => 503,
            ErrorCode::InternalError => 500,
            ErrorCode::InvalidAdminToken => 401,
            ErrorCode::AdminTokenReadOnly
            | ErrorCode::AdminTokenApproveOnly
            | ErrorCode::AdminTokenZoneMismatch => 403,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_and_statuses_are_errors() {
        let all = [
            ErrorCode::InvalidRequest,
            ErrorCode::NotFound,
            ErrorCode::MethodNotAllowed,
            ErrorCode::PayloadTooLarge,
            ErrorCode::Draining,
            ErrorCode::NotReady,
            ErrorCode::StoreUnavailable,
            ErrorCode::InternalError,
            ErrorCode::InvalidAdminToken,
            ErrorCode::AdminTokenReadOnly,
            ErrorCode::AdminTokenApproveOnly,
            ErrorCode::AdminTokenZoneMismatch,
            ErrorCode::AuditOverloaded,
            ErrorCode::AuditEvidenceLost,
            ErrorCode::InvalidBody,
            ErrorCode::ZoneSlugConflict,
            ErrorCode::ApplicationNameConflict,
            ErrorCode::ClientSecretNotStored,
            ErrorCode::SystemZoneReadOnly,
            ErrorCode::ProviderIdentifierConflict,
            ErrorCode::SubjectIssuerConflict,
            ErrorCode::WorkloadNameConflict,
            ErrorCode::ZoneLimitExceeded,
            ErrorCode::ProviderInUse,
            ErrorCode::ResourceIdentifierConflict,
            ErrorCode::CredentialProviderRequired,
            ErrorCode::UpstreamUrlRequired,
            ErrorCode::InvalidRego,
            ErrorCode::InvalidPolicyBundle,
            ErrorCode::CanaryFailed,
            ErrorCode::NoLastKnownGood,
            ErrorCode::PolicyNameConflict,
            ErrorCode::ApproveCapabilityRequired,
            ErrorCode::SubjectApprovalRequired,
            ErrorCode::ApprovalNotDecidable,
            ErrorCode::RateLimited,
            ErrorCode::MissingToken,
            ErrorCode::InvalidToken,
            ErrorCode::IdentityRevoked,
            ErrorCode::MissingScope,
            ErrorCode::ZoneMismatch,
            ErrorCode::InvalidParams,
            ErrorCode::SessionNotFound,
            ErrorCode::ParentOwnershipRequired,
            ErrorCode::SessionDepthLimitExceeded,
            ErrorCode::SessionChildrenLimitExceeded,
            ErrorCode::SessionLimitExceeded,
            ErrorCode::SessionZoneLimitExceeded,
            ErrorCode::DelegationNotFound,
            ErrorCode::DelegationExceedsParentAuthority,
            ErrorCode::DelegationCycleDenied,
            ErrorCode::DelegationExpiryRequired,
            ErrorCode::DelegationApplicationMismatch,
            ErrorCode::ParentDelegationAmbiguous,
            ErrorCode::BroadDelegationPermissionRequired,
            ErrorCode::InheritParentEdgeAmbiguous,
            ErrorCode::InheritParentEdgeNotActive,
            ErrorCode::IdempotencyKeyConflict,
            ErrorCode::IdempotencyReceiptLimitExceeded,
            ErrorCode::IdempotencyResultInactive,
            ErrorCode::SessionLeaseFenced,
            ErrorCode::SessionNotLive,
            ErrorCode::SessionNotService,
            ErrorCode::LeaseGenerationRequired,
            ErrorCode::ChangeFreeze,
            ErrorCode::RetentionAboveLimit,
            ErrorCode::MintRateLimitAboveLimit,
            ErrorCode::DiscoveryFailed,
            ErrorCode::TokenExchangeFailed,
            ErrorCode::DcrDisabled,
            ErrorCode::DcrShutdownRequired,
            ErrorCode::Contained,
        ];
        for code in all {
            let text = code.as_str();
            assert!(
                text.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{text}"
            );
            assert!((400..600).contains(&code.http_status()), "{text}");
        }
    }
}
