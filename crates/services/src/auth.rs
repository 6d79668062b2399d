//! Admin bearer tokens on `/v1`: who is calling and what they may do. Gate order follows the
//! reference: a bounded `Bearer` header, a known unrevoked token, then capability, then zone.

use caracal_core::ErrorCode;
use caracal_crypto::AdminToken;
use caracal_store::TokenScope;
use http::HeaderMap;

use crate::error::ApiError;
use crate::state::RoleState;

/// Headers longer than this are refused before any lookup.
const MAX_AUTHORIZATION: usize = 4096;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Approve,
}

/// An authenticated admin caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCaller {
    /// The admin token's id, or the control key's application id.
    pub token_id: String,
    pub scope: TokenScope,
    capabilities: Vec<String>,
    control_key: bool,
}

impl AdminCaller {
    /// A control key acting through the admin routes (`/v1/control/invoke`): confined to its
    /// zone, reading, or writing when its scope is a write or delete scope.
    pub(crate) fn control_key(application_id: &str, zone_id: &str, writes: bool) -> AdminCaller {
        AdminCaller {
            token_id: application_id.to_owned(),
            scope: TokenScope::Zone(zone_id.to_owned()),
            capabilities: vec![if writes { "write" } else { "read" }.to_owned()],
            control_key: true,
        }
    }

    /// Whether a control key acts (`/v1/control/invoke`), not an admin token.
    pub fn is_control_key(&self) -> bool {
        self.control_key
    }

    /// Who acted, as audit events and records name it.
    pub fn actor(&self) -> String {
        if self.control_key {
            format!("control:{}", self.token_id)
        } else {
            format!("admin:{}", self.token_id)
        }
    }

    fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|held| held == capability)
    }

    /// Checks capability and, for zone routes, that a zone-scoped token names this zone;
    /// `zone` is `None` for deployment-wide routes, which need a global token.
    pub fn require(&self, access: Access, zone: Option<&str>) -> Result<(), ApiError> {
        let allowed = match access {
            Access::Read => self.has("read") || self.has("write") || self.has("approve"),
            Access::Write => self.has("write"),
            Access::Approve => self.has("approve"),
        };
        if !allowed {
            let code = if access == Access::Approve {
                ErrorCode::ApproveCapabilityRequired
            } else if self.has("approve") && !self.has("write") {
                ErrorCode::AdminTokenApproveOnly
            } else {
                ErrorCode::AdminTokenReadOnly
            };
            return Err(ApiError::new(code));
        }
        match (&self.scope, zone) {
            (TokenScope::Global, _) => Ok(()),
            (TokenScope::Zone(own), Some(zone)) if own == zone => Ok(()),
            (TokenScope::Zone(_), _) => Err(ApiError::new(ErrorCode::AdminTokenZoneMismatch)),
        }
    }
}

tokio::task_local! {
    /// The caller of an admin route run in process on a control key's behalf; set only by
    /// [`acting_as`], never from a request, so no client can claim it.
    static ACTING: AdminCaller;
}

/// The caller [`acting_as`] set for this in-process call, if any.
pub(crate) fn acting() -> Option<AdminCaller> {
    ACTING.try_with(AdminCaller::clone).ok()
}

/// Runs `work` (an in-process call of an admin route) as `caller`.
pub(crate) async fn acting_as<F: std::future::Future>(caller: AdminCaller, work: F) -> F::Output {
    ACTING.scope(caller, work).await
}

/// Authenticates the request's bearer token (or, in process, the caller [`acting_as`] set). A
/// store failure denies (invariant 1).
pub async fn authenticate(state: &RoleState, headers: &HeaderMap) -> Result<AdminCaller, ApiError> {
    if let Some(caller) = acting() {
        return Ok(caller);
    }
    let invalid = || ApiError::new(ErrorCode::InvalidAdminToken);
    let header = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(invalid)?;
    if header.len() > MAX_AUTHORIZATION {
        return Err(invalid());
    }
    let text = header.to_str().map_err(|_| invalid())?;
    let token = text
        .strip_prefix("Bearer ")
        .and_then(|token| AdminToken::parse(token.trim()))
        .ok_or_else(invalid)?;
    caller_of(state, &token.digest()).await
}

/// The caller holding the live token whose digest is `digest`.
pub async fn caller_of(
    state: &RoleState,
    digest: &caracal_crypto::TokenDigest,
) -> Result<AdminCaller, ApiError> {
    let invalid = || ApiError::new(ErrorCode::InvalidAdminToken);
    let record = match state.shared.store.find_admin_token(digest).await {
        Ok(Some(record)) if !record.revoked => record,
        Ok(_) => return Err(invalid()),
        Err(error) => return Err(error.into()),
    };
    Ok(AdminCaller {
        token_id: record.id,
        scope: record.scope,
        capabilities: record
            .capabilities
            .split(',')
            .map(|capability| capability.trim().to_owned())
            .collect(),
        control_key: false,
    })
}

/// Failed admin authentications allowed per client address per window, across replicas.
pub const AUTH_FAILURES_PER_WINDOW: u64 = 60;
/// `/v1` requests allowed per client address, and per presented token, per window.
pub const REQUESTS_PER_WINDOW: u64 = 600;
const AUTH_FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Addresses refused until a moment (Unix ms), on this replica; the count is shared.
#[derive(Debug, Clone, Default)]
pub struct Lockouts(
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, i64>>>,
);

impl Lockouts {
    fn until(&self, address: std::net::IpAddr) -> Option<i64> {
        let now = caracal_store::now_ms();
        let mut locked = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locked.retain(|_, until| *until > now);
        locked.get(&address).copied()
    }

    fn lock(&self, address: std::net::IpAddr, until: i64) {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(address, until);
    }
}

/// 429 `rate_limited` with the seconds left until `until` (Unix ms) as `Retry-After`.
pub(crate) fn rate_limited(until: i64) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let seconds = ((until - caracal_store::now_ms()).max(0) / 1000 + 1).to_string();
    let mut response = ApiError::new(ErrorCode::RateLimited).into_response();
    if let Ok(value) = http::HeaderValue::from_str(&seconds) {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, value);
    }
    response
}

/// Counts one request against `bucket`'s budget of `per_minute` in a fixed one-minute window:
/// `Ok(None)` within it, `Ok(Some(429 answer))` past it. A counter that cannot count refuses
/// with 503 `not_ready` (invariant 1): nothing is let through uncounted.
pub(crate) async fn spend_budget(
    state: &RoleState,
    bucket: &str,
    per_minute: u64,
) -> Result<Option<axum::response::Response>, ApiError> {
    match state
        .shared
        .bus
        .rates
        .hit(bucket, AUTH_FAILURE_WINDOW)
        .await
    {
        Ok(count) if count > per_minute => {
            let window = i64::try_from(AUTH_FAILURE_WINDOW.as_millis()).unwrap_or(60_000);
            let now = caracal_store::now_ms();
            Ok(Some(rate_limited(now - now % window + window)))
        }
        Ok(_) => Ok(None),
        Err(error) => {
            tracing::warn!(%error, bucket, "cannot count requests; refusing");
            Err(ApiError::new(ErrorCode::NotReady))
        }
    }
}

/// Budgets `/v1` requests (600 a minute per client address and per presented token) and
/// counts failed admin authentications per client address (`invalid_admin_token` answers);
/// past the limit, the address gets 429 `rate_limited` before any token lookup until the
/// window ends. A request without a known peer address (in-process tests) is budgeted per
/// token only.
pub async fn limit_auth_failures(
    axum::extract::State(state): axum::extract::State<RoleState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    // The extractor reads the peer address the server records (tests supply it the same way).
    let (mut parts, body) = request.into_parts();
    let address =
        axum::RequestPartsExt::extract::<axum::extract::ConnectInfo<std::net::SocketAddr>>(
            &mut parts,
        )
        .await
        .ok()
        .map(|info| info.0.ip());
    let request = axum::extract::Request::from_parts(parts, body);
    if let Some(until) = address.and_then(|address| state.lockouts.until(address)) {
        return rate_limited(until);
    }
    // Request budgets, per address and per presented token (its digest; valid or not).
    let token = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|value| caracal_crypto::hex(&caracal_crypto::sha256(value.as_bytes())));
    let buckets = [
        address.map(|address| format!("admin-requests:{address}")),
        token.map(|digest| format!("admin-actor:{}", digest.get(..32).unwrap_or_default())),
    ];
    for bucket in buckets.into_iter().flatten() {
        match spend_budget(&state, &bucket, REQUESTS_PER_WINDOW).await {
            Ok(None) => {}
            Ok(Some(refused)) => return refused,
            Err(error) => return error.into_response(),
        }
    }
    let response = next.run(request).await;
    if let (Some(address), true) = (address, response.status() == http::StatusCode::UNAUTHORIZED) {
        match state
            .shared
            .bus
            .rates
            .hit(
                &format!("admin-auth-failures:{address}"),
                AUTH_FAILURE_WINDOW,
            )
            .await
        {
            Ok(failures) if failures >= AUTH_FAILURES_PER_WINDOW => {
                let window = i64::try_from(AUTH_FAILURE_WINDOW.as_millis()).unwrap_or(60_000);
                let now = caracal_store::now_ms();
                state.lockouts.lock(address, now - now % window + window);
                tracing::warn!(%address, failures, "admin authentication failures over the limit; address locked out");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot count admin authentication failures"),
        }
    }
    response
}
