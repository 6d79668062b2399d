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
    pub token_id: String,
    pub scope: TokenScope,
    capabilities: Vec<String>,
}

impl AdminCaller {
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

/// Authenticates the request's bearer token. A store failure denies (invariant 1).
pub async fn authenticate(state: &RoleState, headers: &HeaderMap) -> Result<AdminCaller, ApiError> {
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
    let record = match state.shared.store.find_admin_token(&token.digest()).await {
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
    })
}
