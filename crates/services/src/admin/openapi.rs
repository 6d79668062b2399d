//! `GET /v1/openapi.json`: an OpenAPI 3.1 description of every `/v1` route, built from the
//! table below. A test reads the route declarations of the source and fails when one is
//! missing here (or listed here but not served).

use axum::Json;
use axum::Router;
use axum::routing::get;
use serde_json::{Map, Value, json};

use crate::state::RoleState;

pub fn routes() -> Router<RoleState> {
    Router::new().route("/v1/openapi.json", get(document))
}

/// One operation: method, path (axum syntax), who may call it, what it does.
pub struct Operation {
    pub method: &'static str,
    pub path: &'static str,
    pub access: &'static str,
    pub summary: &'static str,
}

const fn op(
    method: &'static str,
    path: &'static str,
    access: &'static str,
    summary: &'static str,
) -> Operation {
    Operation {
        method,
        path,
        access,
        summary,
    }
}

pub const OPERATIONS: &[Operation] = &[
    op("get", "/v1/openapi.json", "none", "This document"),
    op(
        "post",
        "/v1/control/invoke",
        "a control key's one-use mandate (not an admin token)",
        "Run one catalog command as a control key (when control.enabled)",
    ),
    op(
        "get",
        "/v1/zones",
        "read",
        "List zones (a zone token sees its own)",
    ),
    op(
        "post",
        "/v1/zones",
        "write, global",
        "Create a zone: `{name, slug?, dcr_enabled?}`",
    ),
    op("get", "/v1/zones/{zone_id}", "read", "Read a zone"),
    op(
        "patch",
        "/v1/zones/{zone_id}",
        "write",
        "Rename a zone or switch dynamic client registration: `{name?, slug?, dcr_enabled?, dcr_shutdown?: keep_live|revoke_live}` (409 dcr_shutdown_required when registered clients live)",
    ),
    op("delete", "/v1/zones/{zone_id}", "write", "Archive a zone"),
    op(
        "get",
        "/v1/zones/{zone_id}/signing-keys",
        "read",
        "The zone's mandate signing keys, newest first",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/signing-keys/rotate",
        "write",
        "Rotate the zone's signing key (the previous key verifies for `overlap_seconds`, default 24 h)",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/subjects/{subject_id}/revoke",
        "write",
        "Subject kill switch: revoke every authority record, session and delegation of a subject",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/subjects/revoke",
        "write",
        "Subject kill switch with the subject in the body: `{subject_id, reason?}`",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/subject-issuers",
        "read",
        "Federated subject issuers (recorded; this STS does not federate)",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/subject-issuers",
        "write",
        "Trust an issuer: `{issuer, jwks_url, audience}` (https URLs; at most 20 a zone)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/subject-issuers/{id}",
        "read",
        "One subject issuer",
    ),
    op(
        "patch",
        "/v1/zones/{zone_id}/subject-issuers/{id}",
        "write",
        "Change a subject issuer's fields",
    ),
    op(
        "delete",
        "/v1/zones/{zone_id}/subject-issuers/{id}",
        "write",
        "Archive a subject issuer",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/notification-sinks",
        "read",
        "Approval notification sinks, with their delivery health",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/notification-sinks",
        "write",
        "Register a webhook for approval events: `{name, url, event_types?, active?}` (https, or http to loopback; at most 20 a zone; the `nsk_` secret shown once)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/notification-sinks/{id}",
        "read",
        "One notification sink",
    ),
    op(
        "patch",
        "/v1/zones/{zone_id}/notification-sinks/{id}",
        "write",
        "Change a sink's name, url, event_types or active",
    ),
    op(
        "delete",
        "/v1/zones/{zone_id}/notification-sinks/{id}",
        "write",
        "Delete a sink and its deliveries",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/notification-sinks/{id}/deliveries",
        "read",
        "A sink's deliveries, newest first: state, attempts, response, payload (kept 7 days once settled)",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/notification-sinks/{id}/rotate-secret",
        "write",
        "A new `nsk_` signing secret, shown once; the old one signs nothing more",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/grants",
        "read",
        "Delegated grants (filters application_id, user_id or subject_id, resource_id, provider_id, status, scopes)",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/grants",
        "write",
        "Grant a user scopes of a resource through an application: `{application_id, user_id, resource_id, scopes}`",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/grants/{id}",
        "read",
        "One grant",
    ),
    op(
        "delete",
        "/v1/zones/{zone_id}/grants/{id}",
        "write",
        "Revoke a grant and every authority path of its user",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/workloads",
        "read",
        "Workloads (launcher identities) with their bindings",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/workloads",
        "write",
        "Create a workload: `{name}`; the `ws_` secret is in this answer only",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/workloads/{id}",
        "read",
        "One workload",
    ),
    op(
        "put",
        "/v1/zones/{zone_id}/workloads/{id}",
        "write",
        "Rename a workload or replace its bindings (at most 64; `{env, resource, scopes, optional, on_failure}`)",
    ),
    op(
        "delete",
        "/v1/zones/{zone_id}/workloads/{id}",
        "write",
        "Delete a workload",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/workloads/{id}/rotate-secret",
        "write",
        "A new workload secret, shown once",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/workloads/{id}/secret",
        "write",
        "Reveal the workload secret (audited; write capability)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/provider-connections",
        "read",
        "Stored provider connections (filters provider_id, subject_id, status); tokens never shown",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/provider-connections",
        "write",
        "Store a subject's tokens at a provider (sealed): `{subject_id?, provider_id, access_token, refresh_token?, expires_at?}`",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/provider-connections/revoke",
        "write",
        "Revoke a connection and delete its tokens: `{provider_id, subject_id?}`",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/provider-connections/oauth/authorize",
        "write",
        "Start a subject's browser OAuth flow at an oauth2_authorization_code provider (its config names authorization_url and redirect_uri): `{provider_id, subject_id?}` → authorization_url (PKCE S256, sealed state, 10 minutes)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/provider-connections/oauth/callback",
        "none",
        "The provider's redirect target: `?code=&state=` exchanged at the token_url and stored as the subject's connection (502 token_exchange_failed)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/audit/checkpoint",
        "read",
        "The zone's latest signed checkpoint and its public key",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/audit/export",
        "read",
        "The zone's rows with the checkpoint and inclusion proofs, JSON lines (from_seq, to_seq); recorded",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/delegations",
        "read",
        "Delegation edges (filter status; limit 1-1000, default 100; cursor)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/subjects",
        "read",
        "Subjects of the zone's authority records, one row a subject and kind with its records counted (kind, search; limit 1-200, default 100; cursor)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/subjects/overview",
        "read",
        "One subject's authority records counted per kind and in total (subject_id)",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/resources/{id}/test",
        "write",
        "Reachability test: a credential-less HEAD to the upstream through the address guard (10 a minute per zone)",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/providers/discovery",
        "write",
        "OpenID Connect discovery of {issuer} through the address guard: its endpoints and the suggested token_url (502 discovery_failed; 10 a minute per zone with the tests)",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/providers/{id}/test",
        "write",
        "Connectivity test of an OAuth provider's token endpoint (10 a minute per zone)",
    ),
    op(
        "get",
        "/v1/outbox/dead",
        "read",
        "Outbox rows given up on, oldest first, without payloads (limit 1-1000, default 100); dead_total",
    ),
    op(
        "post",
        "/v1/outbox/{id}/requeue",
        "write",
        "Send a dead outbox row again, attempts counted afresh (recorded; 404 unless it is dead)",
    ),
    op(
        "post",
        "/v1/outbox/requeue-dead",
        "write",
        "Send every dead outbox row again (recorded)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/overview",
        "read",
        "Dashboard counts: applications, resources, providers, active policy, active records, last 24 h of decisions, pending approvals, newest events",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/authority-records",
        "read",
        "Authority records (filters authority_record_id, status, subject_id, kind; limit 1-1000, default 100; cursor)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/sessions",
        "read",
        "Sessions with their subject (filters status, lifecycle, label, parent_session_id, application_id, subject_id; limit, cursor)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/admin-audit",
        "read",
        "The zone's admin changes from the ledger, newest first (filters since, until, actor_id, entity_type, entity_id; limit, cursor)",
    ),
    op(
        "get",
        "/v1/incident/containment",
        "read",
        "Incident containment switches in force",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/applications/{application_id}/revoke",
        "write",
        "Revoke everything issued to an application: its sessions, delegations and records",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/invalidate-sessions",
        "write",
        "End every session and revoke every authority record of a zone (after a key exposure)",
    ),
    op(
        "post",
        "/v1/admin-tokens/rotate",
        "read",
        "Replace the caller's own token with a new one (same name, scope, capabilities)",
    ),
    op(
        "get",
        "/v1/incident/logs",
        "read",
        "This process's recent log lines, oldest first",
    ),
    op(
        "post",
        "/v1/incident/validate",
        "read",
        "The recovery checks (readiness, freshness, backlogs, containment); with a zone's canaries (write) also as an agent",
    ),
    op(
        "post",
        "/v1/incident/bundles",
        "write",
        "Build a signed evidence bundle (deployment-wide token, with a reason; audited)",
    ),
    op(
        "get",
        "/v1/incident/bundles/{name}",
        "write",
        "Download an evidence bundle as a tar archive (deployment-wide token; audited)",
    ),
    op(
        "post",
        "/v1/incident/contain",
        "write",
        "Switch on a freeze (changes wait) or fail-closed (protected traffic refused), with a reason",
    ),
    op(
        "post",
        "/v1/incident/release",
        "write",
        "Switch containment off, with a reason",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/sessions/{session_id}/terminate",
        "write",
        "End a session with its subtree and delegations (operator)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/dcr-status",
        "read",
        "Dynamic client registration: `{dcr_enabled, live_dcr_applications}`",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/applications",
        "read",
        "List applications (?status=active|archived)",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/applications",
        "write",
        "Create an application; its client secret is shown once",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/applications/dcr",
        "write",
        "Dynamic client registration `{name, expires_in? (1-3600, default 3600)}` in a zone with dcr_enabled (403 dcr_disabled); at most 1,000 live a zone, 600 a minute per caller; secret shown once",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/applications/{id}",
        "read",
        "Read an application",
    ),
    op(
        "patch",
        "/v1/zones/{zone_id}/applications/{id}",
        "write",
        "Change name, traits or client secret",
    ),
    op(
        "delete",
        "/v1/zones/{zone_id}/applications/{id}",
        "write",
        "Archive an application",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/applications/{id}/rotate-secret",
        "write",
        "New client secret, shown once",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/applications/{id}/client-secret",
        "write",
        "Always 404 client_secret_not_stored: only a hash is kept",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/providers",
        "read",
        "List providers (secrets never shown)",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/providers",
        "write",
        "Create a provider; secret fields are sealed",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/providers/{id}",
        "read",
        "Read a provider",
    ),
    op(
        "patch",
        "/v1/zones/{zone_id}/providers/{id}",
        "write",
        "Change a provider; new secret fields rotate",
    ),
    op(
        "delete",
        "/v1/zones/{zone_id}/providers/{id}",
        "write",
        "Archive an unused provider",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/providers/{id}/reveal-secrets",
        "write",
        "Audited reveal of the sealed secrets",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/resources",
        "read",
        "List resources",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/resources",
        "write",
        "Create a resource bound to a provider",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/resources/{id}",
        "read",
        "Read a resource",
    ),
    op(
        "patch",
        "/v1/zones/{zone_id}/resources/{id}",
        "write",
        "Change a resource",
    ),
    op(
        "delete",
        "/v1/zones/{zone_id}/resources/{id}",
        "write",
        "Archive a resource",
    ),
    op(
        "post",
        "/v1/policies/validate",
        "read",
        "Check a data document",
    ),
    op(
        "get",
        "/v1/policy-templates",
        "read",
        "Starter data documents",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/policies",
        "read",
        "List policies",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/policies",
        "write",
        "Create a policy and its version 1",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/policies/{id}",
        "read",
        "Read a policy with its versions",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/policies/{id}/versions",
        "write",
        "Add an immutable version",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/policy-sets",
        "read",
        "List policy sets",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/policy-sets",
        "write",
        "Create a policy set",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/policy-sets/{id}",
        "read",
        "Read a set: active and last known good versions",
    ),
    op(
        "delete",
        "/v1/zones/{zone_id}/policy-sets/{id}",
        "write",
        "Archive a set; archiving the active set leaves the zone denying everything",
    ),
    op(
        "delete",
        "/v1/zones/{zone_id}/policies/{id}",
        "write",
        "Archive a policy (its versions stay, immutable)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/policy-sets/{id}/versions",
        "read",
        "List set versions",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/policy-sets/{id}/versions",
        "write",
        "Add a version: manifest and canary cases",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/policy-sets/{id}/versions/{version_id}",
        "read",
        "Read a set version",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/policy-sets/{id}/activate",
        "write",
        "Activate a version (202); its canaries run first",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/policy-sets/{id}/activation-status",
        "read",
        "Propagation of an activation",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/policy-sets/{id}/simulate",
        "read",
        "Decide a request against a version",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/policy-sets/{id}/rollback",
        "write",
        "Re-activate the last known good version",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/approvals",
        "read",
        "List approval holds (?state=&tier=)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/approvals/counts",
        "read",
        "Holds by state",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/approvals/{id}",
        "read",
        "Read a hold",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/approvals/{id}/approve",
        "approve",
        "Approve a pending hold",
    ),
    op(
        "post",
        "/v1/zones/{zone_id}/approvals/{id}/reject",
        "approve",
        "Reject a pending hold",
    ),
    op(
        "get",
        "/v1/admin-tokens",
        "write, global",
        "List admin tokens",
    ),
    op(
        "post",
        "/v1/admin-tokens",
        "write, global",
        "Mint a token, shown once",
    ),
    op(
        "delete",
        "/v1/admin-tokens/{id}",
        "write, global",
        "Revoke a token",
    ),
    op(
        "get",
        "/v1/audit/tamper",
        "read, global",
        "Open tamper findings",
    ),
    op(
        "post",
        "/v1/audit/tamper/ack",
        "write, global",
        "Acknowledge tamper findings (audited)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/audit/by-request/{request_id}",
        "read",
        "Every event of one request, oldest first",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/audit/by-request/{request_id}/explain",
        "read",
        "Explain one request (as `audit/explain?request_id=`)",
    ),
    op(
        "get",
        "/v1/audit-retention",
        "read, global",
        "How long the ledger keeps rows (the deployment's ceiling and the operator's setting)",
    ),
    op(
        "put",
        "/v1/audit-retention",
        "write, global",
        "Shorten the ledger's retention (never beyond `audit.retention_days`)",
    ),
    op(
        "get",
        "/v1/mint-rate-limit",
        "read, global",
        "Mandate mints allowed per zone, resource and application each minute (ceiling and setting)",
    ),
    op(
        "put",
        "/v1/mint-rate-limit",
        "write, global",
        "Lower the mint rate limit (never above `sts.mint_rate_limit_per_minute`)",
    ),
    op("get", "/v1/audit/dlq", "read, global", "Audit dead letters"),
    op(
        "get",
        "/v1/audit/dlq/{id}",
        "read, global",
        "One audit dead letter with the event it carried",
    ),
    op(
        "post",
        "/v1/audit/dlq/replay",
        "write, global",
        "Replay transient dead letters",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/audit",
        "read",
        "Search audit events (JSON or CSV)",
    ),
    op(
        "get",
        "/v1/zones/{zone_id}/audit/explain",
        "read",
        "Explain a request's decision",
    ),
];

fn document_value() -> Value {
    let mut paths = Map::new();
    for operation in OPERATIONS {
        let parameters: Vec<Value> = operation
            .path
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut responses = Map::new();
        responses.insert("2XX".into(), json!({"description": "success"}));
        responses.insert(
            "default".into(),
            json!({"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
        let mut entry = json!({
            "summary": operation.summary,
            "description": format!("Token: {}.", operation.access),
            "parameters": parameters,
            "responses": responses,
        });
        if operation.access == "none"
            && let Some(object) = entry.as_object_mut()
        {
            object.insert("security".into(), json!([]));
        }
        if let Some(item) = paths
            .entry(operation.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
        {
            item.insert(operation.method.to_owned(), entry);
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Caracal admin API", "version": env!("CARGO_PKG_VERSION")},
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An admin token (cat_…)"}},
            "schemas": {"Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {"type": "string", "description": "A stable code"},
                    "error_description": {"type": "string"},
                    "details": {"type": "object"},
                },
            }},
        },
    })
}

async fn document() -> Json<Value> {
    Json(document_value())
}
