//! Records the store reads and writes, shared by both backends.

use std::collections::BTreeMap;
use std::time::Duration;

use caracal_crypto::TokenDigest;

/// The KEK a deployment was initialised with: its id and check value, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekRecord {
    pub kek_id: String,
    pub kek_check: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenScope {
    Global,
    Zone(String),
}

#[derive(Debug, Clone)]
pub struct NewAdminToken {
    pub id: String,
    pub name: String,
    pub digest: TokenDigest,
    pub scope: TokenScope,
    /// Comma-separated capabilities (`read`, `write`, `approve`).
    pub capabilities: String,
    pub created_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTokenRecord {
    pub id: String,
    pub name: String,
    pub scope: TokenScope,
    pub capabilities: String,
    pub created_by: String,
    pub revoked: bool,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewZone {
    pub id: String,
    pub name: String,
    pub slug: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub created_at_ms: i64,
    pub archived_at_ms: Option<i64>,
    /// Whether it accepts dynamic client registration.
    pub dcr_enabled: bool,
}

/// A message to publish once the transaction that wrote it commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    pub stream: String,
    pub fields: BTreeMap<String, String>,
    /// Lets consumers drop a message published twice (the dispatcher is at-least-once).
    pub dedupe_key: Option<String>,
}

/// An outbox row claimed by one dispatcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub stream: String,
    pub fields: BTreeMap<String, String>,
    pub dedupe_key: Option<String>,
    /// Failed publish attempts so far.
    pub attempts: u32,
}

/// A row given up on after its last failed publish, as an operator sees it (no payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadOutboxRow {
    pub id: i64,
    pub stream: String,
    pub dedupe_key: Option<String>,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
}

/// What a failed publish did to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxFailure {
    /// It will be tried again after the backoff.
    Retrying,
    /// It reached the attempt bound and stays dead until an operator acts.
    Dead,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutboxStats {
    pub pending: u64,
    pub dead: u64,
    /// Age of the oldest row still waiting to be published.
    pub oldest_pending_age: Option<Duration>,
}

/// A confidential OAuth client of a zone (an agent's identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Application {
    pub id: String,
    pub zone_id: String,
    pub name: String,
    /// Argon2id PHC string; never the secret.
    pub client_secret_hash: Option<String>,
    pub traits: Vec<String>,
    /// `managed` or `dcr`.
    pub registration_method: String,
    pub expires_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub archived_at_ms: Option<i64>,
}

impl Application {
    /// Whether it may authenticate at `now_ms`: not archived, not past its expiry.
    pub fn active(&self, now_ms: i64) -> bool {
        self.archived_at_ms.is_none() && self.expires_at_ms.is_none_or(|expires| expires > now_ms)
    }
}

/// The mutable fields of an application, as `update_application` sets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplicationChange {
    pub name: String,
    pub traits: Vec<String>,
    /// A new Argon2id hash; `None` keeps the current one.
    pub client_secret_hash: Option<String>,
}

/// An upstream credential source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub id: String,
    pub zone_id: String,
    pub name: String,
    pub identifier: String,
    pub kind: String,
    /// Non-secret configuration, JSON.
    pub config: String,
    /// References of the provider's sealed secrets.
    pub secret_refs: Vec<String>,
    pub created_at_ms: i64,
    pub archived_at_ms: Option<i64>,
}

/// A `resource://…` audience agents call through the Gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub id: String,
    pub zone_id: String,
    pub name: String,
    pub identifier: String,
    pub upstream_url: String,
    pub provider_id: String,
    pub scopes: Vec<String>,
    /// `[{method, path, scope}]`, JSON.
    pub operations: String,
    /// `enforced` or `transport_uniform`.
    pub operation_enforcement: String,
    pub created_at_ms: i64,
    pub archived_at_ms: Option<i64>,
}

/// A local operator account of the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleUser {
    pub email: String,
    /// Argon2id.
    pub password_hash: String,
    /// The account's admin token, sealed under the KEK.
    pub token_envelope: String,
    pub token_id: String,
    pub kek_id: String,
    pub created_at_ms: i64,
}

/// A signed-in console session as stored: the cookie only as its SHA-256 (hex), the admin token
/// it acts with sealed under the KEK for that digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    pub id_sha256: String,
    pub token_envelope: String,
    pub csrf: String,
    pub created_at_ms: i64,
    pub seen_at_ms: i64,
}

/// An admin bookkeeping object (`subject_issuer`, `grant` or `workload`) as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminObject {
    pub zone_id: String,
    pub kind: String,
    pub id: String,
    /// Unique among the zone's active objects of the kind, when set.
    pub unique_key: Option<String>,
    /// `active`, `revoked` or `archived`.
    pub status: String,
    /// The object as JSON.
    pub body: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl AdminObject {
    /// The object's fields (its JSON body); none if the body is not a JSON object.
    pub fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(&self.body).unwrap_or_default()
    }
}

/// A subject's (or the zone's shared) connection to a provider; tokens are sealed secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConnection {
    pub id: String,
    pub zone_id: String,
    pub subject_id: String,
    pub provider_id: String,
    pub status: String,
    pub access_token_ref: Option<String>,
    pub refresh_token_ref: Option<String>,
    pub expires_at_ms: Option<i64>,
    pub refreshed_at_ms: Option<i64>,
    pub created_at_ms: i64,
}

/// A secret sealed under the KEK; the store never sees it in clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSecret {
    pub zone_id: String,
    pub secret_ref: String,
    /// What the secret is for; bound into the envelope so it cannot be moved to another use.
    pub purpose: String,
    pub kek_id: String,
    pub envelope: String,
    /// Starts at 1, grows by one on every replacement.
    pub version: i64,
    pub updated_at_ms: i64,
}

/// A zone's ES256 signing key: public JWK in clear, private key sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKey {
    pub kid: String,
    pub zone_id: String,
    pub algorithm: String,
    pub public_jwk: String,
    pub private_envelope: String,
    pub kek_id: String,
    /// `pending`, `active`, `retiring` or `retired`.
    pub status: String,
    pub created_at_ms: i64,
    pub activated_at_ms: Option<i64>,
    pub retired_at_ms: Option<i64>,
}

/// A named policy or policy set (the mutable header of immutable versions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyHeader {
    pub id: String,
    pub zone_id: String,
    pub name: String,
    pub description: String,
    pub created_at_ms: i64,
    pub archived_at_ms: Option<i64>,
}

/// An immutable version of a policy (Rego data document) or of a policy set (manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVersion {
    pub id: String,
    pub zone_id: String,
    /// The policy or policy set this is a version of.
    pub parent_id: String,
    pub version: i64,
    /// Rego source for a policy; the JSON manifest for a set.
    pub content: String,
    pub sha256: String,
    pub created_at_ms: i64,
}

/// The policy set version a zone enforces, and the one before it (last known good).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyBinding {
    pub zone_id: String,
    pub policy_set_id: String,
    pub active_version_id: String,
    pub previous_version_id: Option<String>,
    pub activated_at_ms: i64,
}

/// What one STS replica has loaded for a zone (its acknowledgement of an activation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyLoad {
    pub zone_id: String,
    pub replica: String,
    pub policy_set_version_id: String,
    pub manifest_sha256: String,
    /// `loaded`, or `failed` (the replica kept its previous bundle).
    pub status: String,
    pub detail: String,
    pub updated_at_ms: i64,
}

/// The immutable record of one STS exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityRecord {
    pub id: String,
    pub zone_id: String,
    /// `user` or `application`.
    pub session_type: String,
    pub subject_id: String,
    pub parent_id: Option<String>,
    /// `active`, `revoked` or `expired`.
    pub status: String,
    pub claims: String,
    pub expires_at_ms: i64,
    pub authenticated_at_ms: i64,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub revoked_reason: Option<String>,
}

impl AuthorityRecord {
    /// Whether mandates anchored on it still count at `now_ms`.
    pub fn active(&self, now_ms: i64) -> bool {
        self.status == "active" && self.expires_at_ms > now_ms
    }
}

/// A governed session (an agent run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub zone_id: String,
    pub application_id: String,
    pub parent_id: Option<String>,
    pub authority_record_id: String,
    /// `active`, `suspended`, `terminated` or `expired`.
    pub status: String,
    /// `task` or `service`.
    pub lifecycle: String,
    pub depth: i64,
    pub labels: Vec<String>,
    pub metadata: String,
    pub ttl_seconds: Option<i64>,
    pub lease_generation: i64,
    pub heartbeat_deadline_ms: Option<i64>,
    pub started_at_ms: i64,
    pub last_active_ms: i64,
    pub terminated_at_ms: Option<i64>,
    pub termination_reason: Option<String>,
}

impl Session {
    /// Whether it may act at `now_ms`: active, and within its TTL (task) or its lease
    /// (service). The one rule the STS and the Coordinator both apply (the expiry sweep's query
    /// is its complement in SQL).
    pub fn live(&self, now_ms: i64) -> bool {
        self.status == "active"
            && match self.lifecycle.as_str() {
                "service" => self
                    .heartbeat_deadline_ms
                    .is_some_and(|deadline| deadline > now_ms),
                _ => self
                    .ttl_seconds
                    .is_some_and(|ttl| ttl > 0 && self.started_at_ms + ttl * 1000 > now_ms),
            }
    }
}

/// Authority handed from one session to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegationEdge {
    pub id: String,
    pub zone_id: String,
    pub source_session_id: String,
    pub target_session_id: String,
    pub issuer_application_id: String,
    pub receiver_application_id: String,
    pub parent_edge_id: Option<String>,
    pub resource_id: Option<String>,
    pub scopes: Vec<String>,
    /// TTL, hop budget and other narrowing constraints, JSON.
    pub constraints: String,
    /// `active`, `revoked` or `expired`.
    pub status: String,
    pub expires_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

/// A delegation edge with both its sessions and the zone's graph epoch, read together (the
/// STS reads them at every delegated mint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegationContext {
    pub edge: DelegationEdge,
    pub source: Option<Session>,
    pub target: Option<Session>,
    pub epoch: i64,
}

/// A run-time setting an operator changed through the API, with who and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentSetting {
    pub name: String,
    /// The setting's value, as text.
    pub value: String,
    pub updated_by: String,
    pub updated_at_ms: i64,
}

/// One incident containment switch in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Containment {
    /// `freeze` or `fail_closed`.
    pub kind: String,
    /// Empty for the whole deployment.
    pub zone_id: String,
    pub reason: String,
    pub actor: String,
    pub since_ms: i64,
}

/// Every revoked anchor a Gateway must refuse, read across zones in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RevokedAnchors {
    /// Revoked authority records (`sid` and `root_sid` of a mandate).
    pub records: Vec<String>,
    /// Sessions that are suspended, or were terminated or expired in the window.
    pub sessions: Vec<String>,
    /// Delegation edges revoked in the window.
    pub edges: Vec<String>,
}

/// What terminating a session took down, in one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TerminatedTree {
    pub zone_id: String,
    /// Why, as given to the cascade.
    pub reason: String,
    /// `(session id, its authority record id)` of every session that was live and is now
    /// terminated: the root and its whole `parent_id` subtree.
    pub sessions: Vec<(String, String)>,
    /// `(edge id, target session id)` of every active edge that touched the subtree.
    pub edges: Vec<(String, String)>,
    /// Authority records revoked with it (the subject kill switch).
    pub records: Vec<String>,
    /// The zone graph epoch after the change.
    pub epoch: i64,
}

impl DelegationEdge {
    /// Whether it grants anything at `now_ms`: active, not revoked, not expired (an edge
    /// without an expiry grants nothing).
    pub fn live(&self, now_ms: i64) -> bool {
        self.status == "active"
            && self.revoked_at_ms.is_none()
            && self.expires_at_ms.is_some_and(|at| at > now_ms)
    }
}

/// A human-approval hold on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalHold {
    pub id: String,
    pub zone_id: String,
    pub session_id: String,
    pub principal_id: String,
    pub application_id: String,
    pub tier: String,
    pub approver_class: String,
    /// Hash of what the approval would grant; a decision applies to exactly this.
    pub binding_hash: String,
    pub metadata: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// `approved` or `rejected` once decided.
    pub decision: Option<String>,
    pub decided_at_ms: Option<i64>,
    pub decision_reason: Option<String>,
    pub approver_id: Option<String>,
    pub consumed_at_ms: Option<i64>,
    /// The authority record the consuming mint created.
    pub consumed_record_id: Option<String>,
}

/// The stored answer to an idempotent create, replayed for the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyReceipt {
    pub operation: String,
    pub zone_id: String,
    pub scope_id: String,
    pub key_digest: String,
    pub request_digest: String,
    pub resource_type: String,
    pub resource_id: String,
    pub response_status: i64,
    pub response_json: String,
    pub expires_at_ms: i64,
}

/// One row of a zone's audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub id: String,
    pub zone_id: String,
    pub event_type: String,
    pub request_id: String,
    pub decision: String,
    pub policy_set_id: Option<String>,
    pub policy_set_version_id: Option<String>,
    pub manifest_sha: Option<String>,
    pub evaluation_status: String,
    pub determining_policies: String,
    pub diagnostics: String,
    pub metadata: String,
    pub occurred_at_ms: i64,
    pub ingested_at_ms: i64,
    pub chain_seq: i64,
    pub content_sha256: String,
    pub prev_content_sha256: String,
    pub chain_mac: String,
    pub chain_key_id: String,
}

/// A tamper finding of the audit sweep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TamperFinding {
    pub zone_id: String,
    pub seq: i64,
    pub kind: String,
    pub detail: String,
    pub found_at_ms: i64,
    pub acknowledged_at_ms: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub ack_reason: Option<String>,
}

/// A signed statement of a zone chain's size and Merkle root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCheckpoint {
    pub zone_id: String,
    pub tree_size: i64,
    pub root_hash: String,
    pub issued_at_ms: i64,
    pub key_id: String,
    pub signature: String,
}

/// A zone's retention cut (see `0005_audit_cuts.sql`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCut {
    pub zone_id: String,
    pub cut_seq: i64,
    pub last_content_sha256: String,
    /// Comma-separated hex node hashes.
    pub frontier: String,
    pub cut_at_ms: i64,
    pub chain_key_id: String,
    pub cut_mac: String,
}

/// Filters of the authority-record read view; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordFilter {
    pub id: Option<String>,
    pub status: Option<String>,
    pub subject_id: Option<String>,
    /// `user` or `application` (the record's `session_type`).
    pub kind: Option<String>,
}

/// One subject's authority records of one kind, counted: a row of the subjects view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectSummary {
    pub subject_id: String,
    /// `user` or `application` (the records' `session_type`).
    pub kind: String,
    /// Active and unexpired at the time asked.
    pub active: i64,
    pub revoked: i64,
    /// Expired, whether marked so or only past their expiry.
    pub expired: i64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

/// Which subjects a subjects page holds; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectFilter {
    /// Exactly this subject.
    pub subject_id: Option<String>,
    pub kind: Option<String>,
    /// A case-insensitive substring of the subject id.
    pub search: Option<String>,
    /// The page starts after this (subject id, kind).
    pub after: Option<(String, String)>,
}

/// Filters of the session read view; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFilter {
    pub status: Option<String>,
    pub lifecycle: Option<String>,
    pub application_id: Option<String>,
    pub parent_id: Option<String>,
    /// One of the session's labels.
    pub label: Option<String>,
    /// The subject of the session's authority record.
    pub subject_id: Option<String>,
}

/// Audit events counted by decision (`allow`, `deny`, `partial`, …) over a window; not
/// `complete` when the bounded scan ended before the window's start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecisionCounts {
    pub counts: std::collections::BTreeMap<String, i64>,
    pub complete: bool,
}

/// Filters of an audit search; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Any of these event types; empty is any type.
    pub event_types: Vec<String>,
    pub decision: Option<String>,
    pub request_id: Option<String>,
    /// Matches `agent_session_id` or `session_id` in the event metadata.
    pub session_id: Option<String>,
    /// Matches `application_id` in the event metadata.
    pub application_id: Option<String>,
    /// Matches `session_id` (the authority record) in the event metadata.
    pub authority_record_id: Option<String>,
    /// Matches `delegation_edge_id` in the event metadata.
    pub edge_id: Option<String>,
    /// Admin changes only (`admin.*` events), optionally by actor, entity type and entity id.
    pub admin: Option<AdminFilter>,
}

/// The admin-audit view's filters over `admin.*` events' metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminFilter {
    pub actor: Option<String>,
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
}

/// A webhook an operator registered for a zone's approval events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationSink {
    pub id: String,
    pub zone_id: String,
    pub name: String,
    pub url: String,
    /// The HMAC secret, sealed under the KEK.
    pub sealed_secret: String,
    /// The event types it subscribes to, as a JSON array.
    pub event_types: String,
    pub active: bool,
    /// The zone's chain sequence it has read events up to.
    pub cursor_seq: i64,
    pub consecutive_failures: i64,
    pub last_success_at_ms: Option<i64>,
    pub last_failure_at_ms: Option<i64>,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One event to send to one sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationDelivery {
    pub id: String,
    pub sink_id: String,
    pub zone_id: String,
    pub event_id: String,
    pub event_type: String,
    /// The JSON body it is sent with.
    pub payload: String,
    pub attempts: i64,
    pub available_at_ms: i64,
    pub delivered_at_ms: Option<i64>,
    pub abandoned_at_ms: Option<i64>,
    pub response_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
}

/// How one attempt to send a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The sink answered 2xx.
    Delivered { status: i64 },
    /// It failed; tried again at `retry_at_ms`, or abandoned when that is `None`.
    Failed {
        status: Option<i64>,
        error: String,
        retry_at_ms: Option<i64>,
    },
}
