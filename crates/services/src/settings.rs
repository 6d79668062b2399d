//! The validated configuration a process runs with. The CLI builds it from flags, environment,
//! file and defaults; nothing here reads any of those.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use caracal_core::Role;
use caracal_store::StoreUrl;

#[derive(Debug, Clone)]
pub struct Settings {
    /// `$CARACAL_HOME`: the data directory (KEK, admin token, embedded store).
    pub home: PathBuf,
    /// Address every role binds to; loopback unless the operator says otherwise.
    pub bind: IpAddr,
    /// Port of every role; 0 asks the OS for a free port (tests).
    pub ports: BTreeMap<Role, u16>,
    pub store: StoreUrl,
    pub bus: BusUrl,
    /// The `iss` of every mandate and the base of the JWKS URL.
    pub issuer_url: String,
    /// How long shutdown waits for in-flight requests before cutting them off.
    pub shutdown_grace: Duration,
    /// Audit rows ingested longer ago are dropped once a signed checkpoint covers them;
    /// `None` keeps every row.
    pub audit_retention: Option<Duration>,
    /// An audit event read but not stored (the store failing) is delivered again after this
    /// long; after eight deliveries it is dead-lettered.
    pub audit_reclaim_idle: Duration,
    /// The console's cookies carry `Secure`: set when the console is reached over HTTPS (a
    /// TLS-terminating proxy in front of it).
    pub console_secure_cookies: bool,
    /// Roles served by other processes (`role=host:port`): the console's overview, `caracal
    /// status` and `validate` probe them beside this process's own.
    pub peers: Vec<(caracal_core::Role, std::net::SocketAddr)>,
    /// Mints a minute per (zone, resource, application) before the STS answers 429.
    pub mint_rate_limit_per_minute: u64,
    /// Coordinator limits: tree depth, live children per session, live sessions per zone and
    /// per application.
    pub coordinator_max_depth: u64,
    pub coordinator_max_children: u64,
    pub coordinator_sessions_per_zone: u64,
    pub coordinator_sessions_per_application: u64,
    /// Ended sessions, revoked or expired edges and expired authority records are deleted
    /// this long after they ended.
    pub coordinator_retention: Duration,
    /// PostgreSQL connections per process.
    pub store_pool_size: usize,
    /// PostgreSQL schema holding Caracal's tables (created if missing); `None` uses the
    /// connection's search path.
    pub store_schema: Option<String>,
    /// PostgreSQL statements running longer are cancelled (the request fails closed).
    pub store_statement_timeout: Duration,
    /// The key that signs stream messages. Replicas sharing a bus must share it; when unset,
    /// `$CARACAL_HOME/stream-key` is used (created on first start).
    pub stream_key: Option<SecretBytes>,
    /// During a stream key rotation, the previous key: messages it signed are still accepted,
    /// nothing new is signed with it. When unset with `stream_key` unset,
    /// `$CARACAL_HOME/stream-key.previous` is used if present.
    pub stream_key_previous: Option<SecretBytes>,
    /// When set, every role's `GET /metrics` needs `Authorization: Bearer <this>`.
    pub metrics_bearer: Option<SecretBytes>,
    /// `POST /v1/control/invoke` runs control keys' commands; off, it answers 503
    /// `control_disabled`.
    pub control_enabled: bool,
    /// The Gateway's limits and where it finds the STS when that runs elsewhere.
    pub gateway: crate::gateway::GatewayConfig,
}

/// Secret bytes whose `Debug` shows nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(pub Vec<u8>);

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBytes(***)")
    }
}

impl Settings {
    /// The metrics bearer as the roles compare it and the probes send it.
    pub fn metrics_bearer_text(&self) -> Option<std::sync::Arc<str>> {
        self.metrics_bearer
            .as_ref()
            .map(|bearer| std::sync::Arc::from(String::from_utf8_lossy(&bearer.0).as_ref()))
    }

    pub fn port(&self, role: Role) -> u16 {
        self.ports
            .get(&role)
            .copied()
            .unwrap_or_else(|| role.default_port())
    }
}

/// Where cross-role events travel: the in-process stream, or Redis Streams.
#[derive(Clone, PartialEq, Eq)]
pub enum BusUrl {
    Embedded,
    Redis(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bus URL `{0}` is not accepted (accepted: embedded, redis://…, rediss://…)")]
pub struct BusUrlError(String);

impl FromStr for BusUrl {
    type Err = BusUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "embedded" {
            return Ok(BusUrl::Embedded);
        }
        if text.starts_with("redis://") || text.starts_with("rediss://") {
            return Ok(BusUrl::Redis(text.to_owned()));
        }
        Err(BusUrlError(caracal_store::redact_url(text)))
    }
}

impl fmt::Display for BusUrl {
    /// Prints the URL with any password replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusUrl::Embedded => f.write_str("embedded"),
            BusUrl::Redis(url) => f.write_str(&caracal_store::redact_url(url)),
        }
    }
}

impl fmt::Debug for BusUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BusUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_urls() {
        assert_eq!("embedded".parse::<BusUrl>(), Ok(BusUrl::Embedded));
        let redis: BusUrl = "redis://:pw@127.0.0.1:6379".parse().unwrap();
        assert_eq!(redis.to_string(), "redis://:***@127.0.0.1:6379");
        assert_eq!(
            "kafka://x".parse::<BusUrl>().unwrap_err().to_string(),
            "bus URL `kafka://x` is not accepted (accepted: embedded, redis://…, rediss://…)"
        );
    }
}
