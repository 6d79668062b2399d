//! The interface the roles use for the system of record. Each family of records has its own
//! trait in `queries/`; [`Store`] is all of them, implemented once for every [`Db`] backend, so
//! SQLite and PostgreSQL run the same statements. `tests/conformance.rs` checks both.
//!
//! Every read and update of a zone's records names the zone: a record of another zone is
//! simply not found.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::db::{Db, Row, Statement, params};
use crate::model::OutboxMessage;
pub use crate::queries::{
    Audit, Deployment, Directory, Notifications, Objects, Outbox, Policies, Runtime,
};

#[derive(Debug, Clone, thiserror::Error)]
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
    /// A uniqueness rule or a state precondition refused the write.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The zone already holds as many records of this kind as it may (checked in the write).
    #[error("limit reached: {0}")]
    LimitReached(String),
    /// The record (in this zone), or one it refers to, does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    #[error("store query failed: {0}")]
    Query(String),
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
}

/// Every family of records.
pub trait Store:
    Deployment + Directory + Notifications + Objects + Policies + Runtime + Audit + Outbox
{
}

impl<D: Db> Store for D {}

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

pub(crate) fn fields_to_json(fields: &BTreeMap<String, String>) -> String {
    // A map of strings always serialises.
    serde_json::to_string(fields).unwrap_or_else(|_| "{}".to_owned())
}

pub(crate) fn fields_from_json(text: &str) -> Result<BTreeMap<String, String>, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("outbox fields: {error}")))
}

pub(crate) fn list_to_json(items: &[String]) -> String {
    serde_json::to_string(items).unwrap_or_else(|_| "[]".to_owned())
}

pub(crate) fn list_from_json(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt(format!("list column: {error}")))
}

pub(crate) fn not_found() -> StoreError {
    StoreError::NotFound("no such record in this zone".into())
}

/// The statements that enqueue `outbox` in the caller's transaction.
pub(crate) fn enqueue(outbox: &[OutboxMessage], now: i64) -> Vec<Statement> {
    outbox
        .iter()
        .map(|message| {
            Statement::new(
                "INSERT INTO outbox (stream, fields, dedupe_key, available_at_ms, created_at_ms)
                 VALUES ($1, $2, $3, $4, $4)",
                params![
                    message.stream.as_str(),
                    fields_to_json(&message.fields),
                    message.dedupe_key.clone(),
                    now
                ],
            )
        })
        .collect()
}

/// The first row of the first outcome, or not found.
pub(crate) fn first_row(outcomes: &[crate::db::Outcome]) -> Result<&Row, StoreError> {
    outcomes
        .first()
        .and_then(|outcome| outcome.rows.first())
        .ok_or_else(not_found)
}

/// `first`, then the statements enqueueing `outbox`.
pub(crate) fn with_outbox(first: Statement, outbox: &[OutboxMessage]) -> Vec<Statement> {
    let mut statements = vec![first];
    statements.extend(enqueue(outbox, now_ms()));
    statements
}

/// `insert`, which counts the zone's rows against a limit in its own `WHERE`, after `lock`, a
/// statement that locks the zone's row ([`zone_lock`], or one that also refuses): on
/// PostgreSQL (read committed) two inserts into one zone would otherwise each count the rows
/// committed before both and pass the limit together; locked, the second waits for the
/// first's commit and its count, a new snapshot, sees the first's row. SQLite's one writer
/// serializes them already. Then the outbox rows. A change that such a count reads (an
/// application archived or renamed, read by a registration) is sent the same way, to wait
/// for it likewise.
pub(crate) fn zone_limited(
    lock: Statement,
    insert: Statement,
    outbox: &[OutboxMessage],
) -> Vec<Statement> {
    let mut statements = vec![lock];
    statements.extend(with_outbox(insert, outbox));
    statements
}

/// Locks `zone_id`'s row until the transaction ends (see [`zone_limited`]).
pub(crate) fn zone_lock(zone_id: &str) -> Statement {
    Statement::new(
        "UPDATE zones SET name = name WHERE id = $1",
        crate::db::params![zone_id],
    )
}

/// The value of a `SELECT COUNT(*) …`.
pub(crate) async fn count<D: Db + ?Sized>(
    db: &D,
    sql: &'static str,
    params: Vec<crate::db::Value>,
) -> Result<i64, StoreError> {
    db.rows(sql, params)
        .await?
        .first()
        .ok_or_else(|| StoreError::Corrupt("a count returned no row".into()))?
        .int(0)
}

/// The first row of a query, mapped.
pub(crate) async fn one<D: Db + ?Sized, T>(
    db: &D,
    sql: &'static str,
    params: Vec<crate::db::Value>,
    map: fn(&Row) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    db.rows(sql, params).await?.first().map(map).transpose()
}

/// [`one`] for a query of the directory tables alone, which the backend may answer from
/// memory ([`Db::remembered_rows`](crate::db::Db::remembered_rows)).
pub(crate) async fn one_in_directory<D: Db + ?Sized, T>(
    db: &D,
    sql: &'static str,
    params: Vec<crate::db::Value>,
    map: fn(&Row) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    db.remembered_rows(crate::db::TableGroup::Directory, sql, params)
        .await?
        .first()
        .map(map)
        .transpose()
}

/// Every row of a query, mapped.
pub(crate) async fn all<D: Db + ?Sized, T>(
    db: &D,
    sql: &'static str,
    params: Vec<crate::db::Value>,
    map: fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    db.rows(sql, params).await?.iter().map(map).collect()
}
