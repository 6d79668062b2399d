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

/// A mandate's claims (`sts-mandates.md` §3). Optional claims are omitted when absent, never
/// sent empty; unknown claims are refused when a mandate is read back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MandateClaims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    pub zone_id: String,
    pub client_id: String,
    pub sid: String,
    pub root_sid: String,
    #[serde(rename = "use")]
    pub use_: String,
    pub sub_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation_edge_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation_path: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation_chain: Option<Vec<ChainHop>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hop_count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation_graph_epoch: Option<i64>,
}

/// One entry of `delegation_chain`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChainHop {
    pub application_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation_edge_id: Option<String>,
}

/// A mandate's JOSE header as read back: only ES256 with a key id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MandateHeader {
    pub alg: String,
    pub kid: String,
    #[serde(default)]
    pub typ: Option<String>,
}

/// `POST /oauth/2/token` success (RFC 8693 §2.2.1 plus Caracal's fields).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    pub issued_token_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_resources: Option<Vec<String>>,
    /// Only on gateway-authenticated exchanges: how to reach each resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstreams: Option<std::collections::BTreeMap<String, Upstream>>,
}

/// One resource's upstream directive for the Gateway. Holds the provider credential: never
/// sent to anyone but an HMAC-authenticated Gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Upstream {
    pub url: String,
    /// `none`, `caracal_jwt`, `provider_apikey` or `provider_oauth`.
    pub auth_mode: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_param_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_token_hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// Also send the `use=resource` mandate as `X-Caracal-Identity` (provider credentials
    /// only): the upstream then knows on whose behalf the call comes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_caracal_identity: bool,
    /// OAuth 2.0 client credentials: the Gateway fetches the access token from `token_url` as
    /// `client_id` with the secret in `provider_token`, and caches it until near its expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_scope: Option<String>,
    /// `oauth2_authorization_code`: the connection whose access token `provider_token` is,
    /// and when that token expires (RFC 3339), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl Upstream {
    /// Whether the Gateway sends the `use=resource` mandate upstream: as the credential
    /// (`caracal_jwt`), or beside a provider credential (`forward_caracal_identity`).
    pub fn carries_mandate(&self) -> bool {
        match self.auth_mode.as_str() {
            "caracal_jwt" => true,
            "provider_apikey" | "provider_oauth" => self.forward_caracal_identity,
            _ => false,
        }
    }
}

/// The token endpoint's error body: the OAuth fields plus the request id (camel case, as the
/// SDK reads it).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct OAuthErrorBody {
    pub error: String,
    pub error_description: String,
    #[serde(rename = "requestId")]
    pub request_id: String,
    /// The hold of `interaction_required` (`approval_id`, `state`, `binding`, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// `GET /.well-known/jwks.json?zone_id=`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    #[serde(rename = "use")]
    pub use_: String,
    pub kid: String,
    pub alg: String,
    pub x: String,
    pub y: String,
}

/// `GET /v1/zones/{zone_id}/signing-keys`: newest first.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigningKeysBody {
    pub items: Vec<SigningKeyBody>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigningKeyBody {
    pub kid: String,
    /// `active` (signs), `retiring` (verifies until `verifies_until`), `retired`.
    pub status: String,
    pub algorithm: String,
    pub created_at: String,
    pub verifies_until: Option<String>,
}

/// `POST /v1/zones/{zone_id}/signing-keys/rotate`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RotatedKeyBody {
    pub rotated: bool,
    pub zone_id: String,
    pub kid: String,
}

/// RFC 3339 with milliseconds, UTC, of epoch milliseconds `ms`.
pub fn rfc3339(ms: i64) -> String {
    let since_epoch = std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + since_epoch).to_string()
}
