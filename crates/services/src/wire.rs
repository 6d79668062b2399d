//! JSON shapes that leave the process: error bodies, readiness, the run file.
//! Changing one is a wire change.

use serde::{Deserialize, Serialize};

/// Every JSON error body: `{"error": code, "error_description": text}`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// The body of `/ready`, both when ready (200) and not (503).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReadyBody {
    /// `ready` or `not_ready`.
    pub status: String,
    /// The first failed check's reason; absent when ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub checks: Vec<CheckBody>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckBody {
    pub name: String,
    pub ok: bool,
    pub reason: Option<String>,
}

/// `GET /v1/audit/tamper`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TamperFindingsResponse {
    pub items: Vec<TamperFindingBody>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TamperFindingBody {
    pub zone_id: String,
    pub seq: i64,
    pub kind: String,
    pub detail: String,
    pub found_at_ms: i64,
}

/// `POST /v1/audit/tamper/ack`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AckTamperResponse {
    pub acknowledged: u64,
}

/// One audit event in API answers.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditEventBody {
    pub id: String,
    pub zone_id: String,
    pub event_type: String,
    pub request_id: String,
    pub decision: String,
    pub policy_set_id: Option<String>,
    pub policy_set_version_id: Option<String>,
    pub manifest_sha: Option<String>,
    pub evaluation_status: String,
    pub determining_policies_json: serde_json::Value,
    pub diagnostics_json: serde_json::Value,
    pub metadata_json: serde_json::Value,
    pub occurred_at_ms: i64,
    pub chain_seq: i64,
    pub content_sha256: String,
}

/// `GET /v1/zones/{zone}/audit`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditSearchResponse {
    pub items: Vec<AuditEventBody>,
    /// Pass as `cursor` for the next (older) page; absent at the end.
    pub next_cursor: Option<String>,
}

/// `GET /v1/zones/{zone}/audit/explain`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditExplainResponse {
    pub request_id: String,
    pub zone_id: String,
    pub final_decision: String,
    pub events: Vec<AuditEventBody>,
    /// Each deny that recorded its policy input, decided again by the same evaluator against
    /// the policy set version it names.
    #[serde(default)]
    pub denied: Vec<DeniedBody>,
}

/// A deny rebuilt: the input it recorded, and what the evaluator decides for it now under
/// the version it was decided under (`rebuilt` is null when that cannot be done, with why).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DeniedBody {
    pub event_id: String,
    pub policy_set_version_id: Option<String>,
    pub policy_input: Option<serde_json::Value>,
    pub rebuilt: Option<caracal_policy::Decision>,
    pub matches_record: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// One entry of the audit dead-letter stream.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetterBody {
    pub id: String,
    pub source_id: String,
    pub reason: String,
    pub deliveries: u64,
    pub received_at_ms: i64,
    /// Only transient failures are re-sent; forged or unparseable entries never are.
    pub replayable: bool,
    pub event_id: Option<String>,
    pub zone_id: Option<String>,
}

/// `GET /v1/audit/dlq`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLettersResponse {
    pub items: Vec<DeadLetterBody>,
    pub next_cursor: Option<String>,
}

/// `POST /v1/audit/dlq/replay`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplayResponse {
    pub scanned: usize,
    pub replayed: usize,
    pub skipped: usize,
}

/// A page of a `/v1` list: `next_cursor` is null on the last page.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// A zone as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct ZoneBody {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub dcr_enabled: bool,
    pub created_at: String,
    pub archived_at: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DcrStatusBody {
    pub dcr_enabled: bool,
    pub live_dcr_applications: u64,
}

/// An application; `client_secret` appears only in the response that created or rotated it.
#[derive(Debug, Serialize)]
pub struct ApplicationBody {
    pub id: String,
    pub zone_id: String,
    pub name: String,
    pub registration_method: String,
    pub credential_type: &'static str,
    pub traits: Vec<String>,
    pub has_client_secret: bool,
    pub expires_at: Option<String>,
    pub created_at: String,
    pub archived_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

/// An admin token; `token` appears only in the response that minted it.
#[derive(Debug, Serialize)]
pub struct AdminTokenBody {
    pub id: String,
    pub name: String,
    pub scope: &'static str,
    pub zone_id: Option<String>,
    pub capability: String,
    pub created_by: String,
    pub created_at: String,
    pub revoked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// A provider: public configuration only; `secret_config_keys` names the sealed secrets.
#[derive(Debug, Serialize)]
pub struct ProviderBody {
    pub id: String,
    pub zone_id: String,
    pub name: String,
    pub identifier: String,
    pub kind: String,
    pub config_json: serde_json::Value,
    pub secret_config_keys: Vec<String>,
    pub created_at: String,
    pub archived_at: Option<String>,
}

/// The answer of an explicit, audited secret reveal.
#[derive(Debug, Serialize)]
pub struct RevealedSecretsBody {
    pub secrets: std::collections::BTreeMap<String, String>,
}

/// A `resource://…` audience.
#[derive(Debug, Serialize)]
pub struct ResourceBody {
    pub id: String,
    pub zone_id: String,
    pub name: String,
    pub identifier: String,
    pub scopes: Vec<String>,
    pub upstream_url: String,
    pub credential_provider_id: String,
    pub operations: serde_json::Value,
    pub operation_enforcement: String,
    pub created_at: String,
    pub archived_at: Option<String>,
}
