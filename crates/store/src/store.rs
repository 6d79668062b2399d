//! The one interface the roles use for the system of record, implemented by the embedded SQLite
//! store and by PostgreSQL. `tests/conformance.rs` runs the same cases against both.

use std::time::Duration;

use caracal_crypto::TokenDigest;

use crate::model::{
    AdminTokenRecord, KekRecord, NewAdminToken, NewZone, OutboxFailure, OutboxMessage, OutboxRow,
    OutboxStats, Zone,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {message}")]
    Open { path: String, message: String },
    #[error(
        "store schema version {found} is newer than this binary supports ({supported}); \
         run a caracal release at least as new as the one that last used this data"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    /// The store cannot be reached or did not answer in time. Callers fail closed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule refused the write.
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("store query failed: {0}")]
    Query(String),
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
}

#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// A round trip to the database: the readiness probe.
    async fn ping(&self) -> Result<(), StoreError>;

    async fn deployment_kek(&self) -> Result<Option<KekRecord>, StoreError>;
    async fn record_deployment_kek(&self, record: &KekRecord) -> Result<(), StoreError>;

    async fn insert_admin_token(&self, token: &NewAdminToken) -> Result<(), StoreError>;
    /// Whether an unrevoked token created by `created_by` exists.
    async fn has_active_token_by(&self, created_by: &str) -> Result<bool, StoreError>;
    async fn find_admin_token(
        &self,
        digest: &TokenDigest,
    ) -> Result<Option<AdminTokenRecord>, StoreError>;

    /// Creates a zone and enqueues `outbox` in the same transaction. A taken slug is a
    /// [`StoreError::Conflict`] and enqueues nothing.
    async fn create_zone(
        &self,
        zone: &NewZone,
        outbox: &[OutboxMessage],
    ) -> Result<Zone, StoreError>;
    async fn get_zone(&self, zone_id: &str) -> Result<Option<Zone>, StoreError>;
    async fn list_zones(&self) -> Result<Vec<Zone>, StoreError>;

    /// Takes up to `batch` publishable rows (oldest first) for `worker` for `lease`; rows
    /// another worker holds are skipped, so several dispatchers can run at once.
    async fn claim_outbox(
        &self,
        worker: &str,
        batch: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, StoreError>;
    async fn outbox_published(&self, ids: &[i64]) -> Result<(), StoreError>;
    /// Records a failed attempt: the row becomes publishable again after `retry_in`, or dead
    /// once it has failed `max_attempts` times.
    async fn outbox_failed(
        &self,
        id: i64,
        error: &str,
        retry_in: Duration,
        max_attempts: u32,
    ) -> Result<OutboxFailure, StoreError>;
    async fn outbox_stats(&self) -> Result<OutboxStats, StoreError>;

    /// Takes or renews the named lease for `holder` until `ttl` from now; `false` while another
    /// holder's lease is live. Singleton jobs run only while they hold their lease.
    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError>;
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn age(now: i64, then: i64) -> Duration {
    Duration::from_millis(u64::try_from(now.saturating_sub(then)).unwrap_or(0))
}

pub(crate) fn fields_to_json(fields: &std::collections::BTreeMap<String, String>) -> String {
    // A map of strings always serialises.
    serde_json::to_string(fields).unwrap_or_else(|_| "{}".to_owned())
}

pub(crate) fn fields_from_json(
    text: &str,
) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("outbox fields: {error}")))
}
