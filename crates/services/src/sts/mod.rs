//! The STS role: `POST /oauth/2/token` (RFC 8693 token exchange into ES256 mandates) and
//! `GET /.well-known/jwks.json`. Everything a mint depends on — the client's secret, the
//! zone's key, live sessions and delegation edges, the zone's policy bundle, the authority
//! record, the audit event — must succeed before a mandate leaves; any failure refuses.

mod approvals;
pub mod control;
mod exchange;
pub mod form;
pub mod gateway;
pub mod run;
mod secrets;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderValue, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::group_commit::AuthorityWriter;
use crate::keys;
use crate::policy::PolicyCache;
use crate::state::RoleState;
use crate::wire::{Jwks, OAuthErrorBody};

pub(crate) use approvals::decided_event;
pub use exchange::MAX_FORM_BYTES;

/// Mints a minute per (zone, resource, application) unless configured.
pub const DEFAULT_MINT_LIMIT_PER_MINUTE: u64 = 1000;

/// The STS's state: what every replica holds in memory.
pub struct Sts {
    /// `iss` of every mandate and the audience of session and gateway mandates.
    pub issuer: String,
    pub policies: PolicyCache,
    pub keys: keys::KeyRing,
    secrets: secrets::SecretCache,
    authority: AuthorityWriter,
    /// Authenticates the Gateway's calls (derived from the KEK, so every replica shares it).
    gateway_key: [u8; 32],
    lockouts: std::sync::Mutex<std::collections::HashMap<String, (i64, u32)>>,
    /// Mints a minute per (zone, resource, application): the deployment's ceiling, and the
    /// limit in force (the ceiling, or an operator's lower `PUT /v1/mint-rate-limit`).
    mint_limit_ceiling: u64,
    mint_limit_per_minute: std::sync::atomic::AtomicU64,
    /// For `caracal run`'s client-credentials bindings: the client to providers' token
    /// endpoints (built on first use; none if TLS could not be set up), the tokens it fetched,
    /// and the private hosts it may reach (the Gateway's upstream allowlist).
    provider_client: std::sync::OnceLock<Option<crate::gateway::UpstreamClient>>,
    provider_tokens: crate::gateway::oauth::TokenCache,
    provider_host_allowlist: Vec<String>,
    /// Authorization-code connections whose token could not be refreshed (the STS role's
    /// metric, shared with the Gateway's in-process exchanges, which run here too).
    pub connection_refresh_failures: prometheus_client::metrics::counter::Counter,
}

impl Sts {
    /// Starts the STS's authority-record writer; call inside the runtime.
    pub fn start(
        issuer: String,
        policies: PolicyCache,
        store: Arc<dyn caracal_store::Store>,
        kek: &caracal_crypto::Kek,
    ) -> Sts {
        let authority = AuthorityWriter::start(store, 512);
        Sts {
            gateway_key: kek.derive(gateway::KEY_LABEL),
            issuer,
            policies,
            keys: keys::KeyRing::signing(),
            secrets: secrets::SecretCache::default(),
            authority,
            lockouts: std::sync::Mutex::default(),
            mint_limit_ceiling: DEFAULT_MINT_LIMIT_PER_MINUTE,
            mint_limit_per_minute: DEFAULT_MINT_LIMIT_PER_MINUTE.into(),
            provider_client: std::sync::OnceLock::new(),
            provider_tokens: crate::gateway::oauth::TokenCache::default(),
            provider_host_allowlist: Vec::new(),
            connection_refresh_failures: Default::default(),
        }
    }

    /// The private hosts a provider's token endpoint may be at (the Gateway's allowlist).
    pub fn with_provider_host_allowlist(mut self, hosts: Vec<String>) -> Sts {
        self.provider_host_allowlist = hosts;
        self
    }

    pub fn with_mint_limit(mut self, per_minute: u64) -> Sts {
        self.mint_limit_ceiling = per_minute.max(1);
        self.mint_limit_per_minute = self.mint_limit_ceiling.into();
        self
    }

    /// The mint limit in force, per (zone, resource, application) and minute.
    pub fn mint_limit(&self) -> u64 {
        self.mint_limit_per_minute
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the operator's mint limit from the store. A store that cannot answer leaves the
    /// limit in force as it was (mints need the store anyway).
    pub async fn refresh_mint_limit(
        &self,
        store: &dyn caracal_store::Store,
    ) -> Result<(), caracal_store::StoreError> {
        let operator = operator_mint_limit(store).await?;
        self.mint_limit_per_minute.store(
            effective_mint_limit(self.mint_limit_ceiling, operator),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }
}

/// The run-time setting holding an operator's mint limit per minute.
pub const MINT_LIMIT_SETTING: &str = "sts_mint_rate_limit_per_minute";

/// How often each STS replica re-reads the operator's mint limit.
pub const MINT_LIMIT_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// The operator's mint limit, if one is set.
pub async fn operator_mint_limit(
    store: &dyn caracal_store::Store,
) -> Result<Option<u64>, caracal_store::StoreError> {
    Ok(store
        .get_setting(MINT_LIMIT_SETTING)
        .await?
        .and_then(|setting| setting.value.parse().ok()))
}

/// The deployment's `ceiling`, lowered by the operator's setting, never raised; at least 1.
pub fn effective_mint_limit(ceiling: u64, operator: Option<u64>) -> u64 {
    operator.map_or(ceiling, |limit| limit.min(ceiling)).max(1)
}

pub fn routes() -> Router<RoleState> {
    Router::new()
        .route("/oauth/2/token", post(exchange::token))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/approvals/{id}", get(approvals::poll))
        .route("/approvals/{id}/decision", post(approvals::decide))
        .route("/v1/run/manifest", post(run::manifest))
        .route("/v1/run/credential", post(run::credential))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabels {
    /// `bootstrap`, `delegated` or `refused` (before a class was known).
    pub class: String,
    /// `allow`, or the error code.
    pub outcome: String,
}

/// The STS role's own families.
#[derive(Debug, Default)]
pub struct StsMetrics {
    pub exchanges: Family<ExchangeLabels, Counter>,
    /// Seconds since the policy bundles were last confirmed against the store.
    pub policy_bundle_age_seconds: Gauge,
    /// Bundles the STS refused to load (counted by its policy cache).
    pub policy_load_failures: Counter,
    pub auth_failures: Counter,
    /// Authorization-code connections whose access token could not be refreshed.
    pub connection_refresh_failures: Counter,
}

impl StsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "token_exchanges",
            "Token exchanges by class and outcome",
            self.exchanges.clone(),
        );
        registry.register(
            "policy_bundle_age_seconds",
            "Seconds since the policy bundles were last confirmed against the store",
            self.policy_bundle_age_seconds.clone(),
        );
        registry.register(
            "policy_load_failures",
            "Policy bundles refused at load; the previous bundle stayed in force",
            self.policy_load_failures.clone(),
        );
        registry.register(
            "client_auth_failures",
            "Failed client authentications",
            self.auth_failures.clone(),
        );
        registry.register(
            "provider_connection_refresh_failures",
            "Provider connections whose access token could not be refreshed; their calls were refused",
            self.connection_refresh_failures.clone(),
        );
    }
}

/// An error in the token endpoint's envelope: `{"error", "error_description", "requestId"}`.
/// The same code can come with different statuses (the reference's table), so the status is
/// carried, not derived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError {
    pub status: StatusCode,
    pub code: &'static str,
    pub description: String,
    pub retry_after: Option<u64>,
    /// More fields for the body (the approval hold of `interaction_required`).
    pub extra: Option<serde_json::Value>,
}

impl TokenError {
    fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> TokenError {
        TokenError {
            status,
            code,
            description: description.into(),
            retry_after: None,
            extra: None,
        }
    }

    /// 400 `invalid_token`: the request is malformed.
    pub fn malformed(description: impl Into<String>) -> TokenError {
        TokenError::new(StatusCode::BAD_REQUEST, "invalid_token", description)
    }

    /// 401 `access_denied`: the client or an approval does not authenticate.
    pub fn unauthenticated(description: impl Into<String>) -> TokenError {
        TokenError::new(StatusCode::UNAUTHORIZED, "access_denied", description)
    }

    /// 401 `invalid_token`: the subject token does not verify.
    pub fn bad_subject(description: impl Into<String>) -> TokenError {
        TokenError::new(StatusCode::UNAUTHORIZED, "invalid_token", description)
    }

    /// 403 `access_denied`: authenticated, but not allowed.
    pub fn denied(description: impl Into<String>) -> TokenError {
        TokenError::new(StatusCode::FORBIDDEN, "access_denied", description)
    }

    /// 503 `sts_unavailable`: a dependency is down; refused, retry later.
    pub fn unavailable(description: impl Into<String>) -> TokenError {
        let mut error = TokenError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "sts_unavailable",
            description,
        );
        error.retry_after = Some(1);
        error
    }

    pub fn internal() -> TokenError {
        TokenError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        )
    }

    pub fn render(self, request_id: &str) -> Response {
        let body = OAuthErrorBody {
            error: self.code.to_owned(),
            error_description: self.description,
            request_id: request_id.to_owned(),
            extra: match self.extra {
                Some(serde_json::Value::Object(fields)) => fields,
                _ => serde_json::Map::new(),
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if self.code == "interaction_required" {
            headers.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"interaction_required\""),
            );
        }
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        if let Some(seconds) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            headers.insert(http::header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<TokenError> for crate::gateway_sts::Refusal {
    fn from(error: TokenError) -> crate::gateway_sts::Refusal {
        crate::gateway_sts::Refusal {
            status: error.status,
            code: error.code.to_owned(),
            description: error.description,
        }
    }
}

impl From<caracal_store::StoreError> for TokenError {
    fn from(error: caracal_store::StoreError) -> TokenError {
        match error {
            caracal_store::StoreError::Unavailable(detail) => {
                tracing::warn!(%detail, "store unavailable: exchange refused");
                TokenError::unavailable("the store is unavailable")
            }
            other => {
                tracing::error!(error = %other, "store failure during an exchange");
                TokenError::internal()
            }
        }
    }
}

impl From<crate::evidence::EvidenceError> for TokenError {
    fn from(error: crate::evidence::EvidenceError) -> TokenError {
        let api = crate::api::evidence_error(error);
        let mut refused = TokenError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            api.code.as_str(),
            "audit evidence could not be recorded",
        );
        refused.retry_after = Some(1);
        refused
    }
}

impl From<keys::KeyError> for TokenError {
    fn from(error: keys::KeyError) -> TokenError {
        match error {
            keys::KeyError::Store(store) => store.into(),
            other => {
                tracing::error!(error = %other, "zone signing key unusable");
                TokenError::internal()
            }
        }
    }
}

#[derive(Debug, serde::Deserialize)]
struct JwksQuery {
    zone_id: Option<String>,
}

/// `GET /.well-known/jwks.json?zone_id=`: the zone's signer and every key in its overlap.
async fn jwks(
    State(state): State<RoleState>,
    request_id: Option<axum::Extension<caracal_core::RequestId>>,
    query: Result<Query<JwksQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let request_id = request_id.map(|id| id.to_string()).unwrap_or_default();
    let Some(sts) = state.sts.as_ref() else {
        return TokenError::internal().render(&request_id);
    };
    let zone_id = match query {
        Ok(Query(JwksQuery {
            zone_id: Some(zone),
        })) if !zone.is_empty() => zone,
        _ => return TokenError::malformed("zone_id is required").render(&request_id),
    };
    let store = state.shared.store.as_ref();
    match sts.keys.zone(store, &state.shared.kek, &zone_id).await {
        Ok(keys) => {
            let body = Jwks {
                keys: keys.jwks(caracal_store::now_ms()),
            };
            let mut response = axum::Json(body).into_response();
            response.headers_mut().insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300, must-revalidate"),
            );
            response
        }
        Err(keys::KeyError::NoKey(_)) => TokenError::new(
            StatusCode::NOT_FOUND,
            "resource_not_found",
            format!("zone `{zone_id}` has no signing keys"),
        )
        .render(&request_id),
        Err(error) => TokenError::from(error).render(&request_id),
    }
}

#[cfg(test)]
pub(crate) mod tests;
