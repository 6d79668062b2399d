//! Replay registries and rate counters: small shared registers every replica must agree on.

use std::time::Duration;

use crate::BusError;

/// What a single-use key protects; each namespace is a separate key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplayNamespace {
    /// Mandate ids (`jti`) that may be presented once.
    Jti,
    /// Nonces of HMAC-signed Gateway → STS calls.
    GatewayNonce,
    /// Mandate ids the Gateway has accepted once (apart from the STS's own register, so the
    /// Gateway's check does not spend the STS's).
    GatewayJti,
    /// Control mandates, each good for one invocation.
    ControlJti,
}

impl ReplayNamespace {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayNamespace::Jti => "jti",
            ReplayNamespace::GatewayNonce => "gateway_nonce",
            ReplayNamespace::GatewayJti => "gateway_jti",
            ReplayNamespace::ControlJti => "control_jti",
        }
    }
}

#[async_trait::async_trait]
pub trait ReplayRegistry: Send + Sync {
    /// Records `key` for `ttl` if it is not already recorded. Returns `true` for the first use
    /// and `false` for every later use within the TTL. An error means "unknown": callers deny.
    async fn claim_once(
        &self,
        namespace: ReplayNamespace,
        key: &str,
        ttl: Duration,
    ) -> Result<bool, BusError>;

    /// Forgets keys whose TTL has passed; returns how many. Backends that expire keys by
    /// themselves (Redis) have nothing to do.
    async fn purge_expired(&self) -> Result<u64, BusError>;

    /// Keys of `namespace` issued before this instant (Unix ms) may have been claimed by an
    /// earlier process and forgotten: a caller refuses them rather than claim them. 0 for a
    /// registry that forgets nothing.
    fn forgotten_before_ms(&self, _namespace: ReplayNamespace) -> i64 {
        0
    }
}

#[async_trait::async_trait]
pub trait RateCounter: Send + Sync {
    /// Counts one hit against `bucket` in the current fixed window of length `window` and
    /// returns the hits in that window so far, this one included.
    async fn hit(&self, bucket: &str, window: Duration) -> Result<u64, BusError>;
}

/// The index of the fixed window `now_ms` falls in.
pub(crate) fn window_index(now_ms: u64, window: Duration) -> u64 {
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
    now_ms / window_ms
}
