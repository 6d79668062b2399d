//! The transactional outbox and the leases that keep singleton jobs single.

use std::time::Duration;

use crate::db::{Db, Dialect, Statement, params};
use crate::model::{OutboxFailure, OutboxRow, OutboxStats};
use crate::store::{StoreError, age, fields_from_json, millis, not_found, now_ms};

#[async_trait::async_trait]
pub trait Outbox: Send + Sync {
    /// Takes up to `batch` publishable rows (oldest first) for `worker` for `lease`; rows
    /// another worker holds are skipped, so several dispatchers can run at once.
    async fn claim_outbox(
        &self,
        worker: &str,
        batch: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, StoreError>;
    /// Marks the named rows published if `worker` still holds them; returns how many it marked.
    /// Only rows the caller knows it sent are named, so a row whose failure could not be
    /// recorded stays pending and is sent again after its lease, never marked unsent.
    async fn outbox_published(&self, worker: &str, ids: &[i64]) -> Result<u64, StoreError>;
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
    /// The status (`pending`, `published` or `dead`) of the newest row with this dedupe key.
    async fn outbox_status(&self, dedupe_key: &str) -> Result<Option<String>, StoreError>;

    /// Takes or renews the named lease for `holder` until `ttl` from now; `false` while another
    /// holder's lease is live. Singleton jobs run only while they hold their lease.
    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError>;
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
}

#[async_trait::async_trait]
impl<D: Db> Outbox for D {
    async fn claim_outbox(
        &self,
        worker: &str,
        batch: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let now = now_ms();
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        // Each stream keeps its order across dispatchers: a row waits while an earlier row of
        // its stream is held by a dispatcher (this one included: a row whose fate it could not
        // record) or backs off after a failed publish. A dead row no longer holds the rest back.
        // PostgreSQL serves several dispatchers: claims take turns (an advisory lock) so each
        // sees the claims before it, and locked rows are skipped, not waited for. SQLite has
        // one writer, so its plain form is already exclusive.
        macro_rules! claim_sql {
            ($row_locks:literal) => {
                concat!(
                    "UPDATE outbox SET locked_by = $1, locked_until_ms = $2
                     WHERE id IN (
                         SELECT id FROM outbox
                         WHERE status = 'pending' AND available_at_ms <= $3
                           AND (locked_until_ms IS NULL OR locked_until_ms <= $3)
                           AND NOT EXISTS (
                               SELECT 1 FROM outbox earlier
                               WHERE earlier.stream = outbox.stream AND earlier.id < outbox.id
                                 AND earlier.status = 'pending'
                                 AND (earlier.available_at_ms > $3 OR earlier.locked_until_ms > $3))
                         ORDER BY id LIMIT $4",
                    $row_locks,
                    ")
                     RETURNING id, stream, fields, dedupe_key, attempts"
                )
            };
        }
        let params = params![worker, now.saturating_add(millis(lease)), now, limit];
        let statements = match self.dialect() {
            Dialect::Postgres => vec![
                Statement::new(
                    "SELECT 1 FROM (SELECT pg_advisory_xact_lock(hashtext('caracal.outbox.claim'))) AS locked",
                    Vec::new(),
                ),
                Statement::new(claim_sql!(" FOR UPDATE SKIP LOCKED"), params),
            ],
            Dialect::Sqlite => vec![Statement::new(claim_sql!(""), params)],
        };
        let rows = self
            .atomic(statements)
            .await?
            .pop()
            .map(|outcome| outcome.rows)
            .unwrap_or_default();
        let mut claimed = rows
            .iter()
            .map(|row| {
                Ok(OutboxRow {
                    id: row.int(0)?,
                    stream: row.text(1)?,
                    fields: fields_from_json(&row.text(2)?)?,
                    dedupe_key: row.opt_text(3)?,
                    attempts: u32::try_from(row.int(4)?).unwrap_or(u32::MAX),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        claimed.sort_by_key(|row| row.id);
        Ok(claimed)
    }

    async fn outbox_published(&self, worker: &str, ids: &[i64]) -> Result<u64, StoreError> {
        let now = now_ms();
        let statements = ids
            .iter()
            .map(|id| {
                Statement::new(
                    "UPDATE outbox SET status = 'published', published_at_ms = $3, locked_by = NULL,
                         locked_until_ms = NULL
                     WHERE id = $1 AND locked_by = $2 AND status = 'pending'",
                    params![*id, worker, now],
                )
            })
            .collect();
        let outcomes = self.atomic(statements).await?;
        Ok(outcomes.iter().map(|outcome| outcome.changed).sum())
    }

    async fn outbox_failed(
        &self,
        id: i64,
        error: &str,
        retry_in: Duration,
        max_attempts: u32,
    ) -> Result<OutboxFailure, StoreError> {
        let rows = self
            .rows(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $2, locked_by = NULL,
                     locked_until_ms = NULL, available_at_ms = $3,
                     status = CASE WHEN attempts + 1 >= $4 THEN 'dead' ELSE 'pending' END
                 WHERE id = $1 AND status = 'pending' RETURNING status",
                params![
                    id,
                    error,
                    now_ms().saturating_add(millis(retry_in)),
                    max_attempts
                ],
            )
            .await?;
        // A row that is gone or already published is never reported as "retrying".
        let status = rows.first().ok_or_else(not_found)?.text(0)?;
        Ok(if status == "dead" {
            OutboxFailure::Dead
        } else {
            OutboxFailure::Retrying
        })
    }

    async fn outbox_status(&self, dedupe_key: &str) -> Result<Option<String>, StoreError> {
        let rows = self
            .rows(
                "SELECT status FROM outbox WHERE dedupe_key = $1 ORDER BY id DESC LIMIT 1",
                params![dedupe_key],
            )
            .await?;
        rows.first().map(|row| row.text(0)).transpose()
    }

    async fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let rows = self
            .rows(
                "SELECT COUNT(*) FILTER (WHERE status = 'pending'),
                        COUNT(*) FILTER (WHERE status = 'dead'),
                        MIN(created_at_ms) FILTER (WHERE status = 'pending')
                 FROM outbox WHERE status <> 'published'",
                params![],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Corrupt("no outbox aggregate".into()))?;
        Ok(OutboxStats {
            pending: u64::try_from(row.int(0)?).unwrap_or(0),
            dead: u64::try_from(row.int(1)?).unwrap_or(0),
            oldest_pending_age: row.opt_int(2)?.map(|created| age(now_ms(), created)),
        })
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = now_ms();
        let changed = self
            .change(
                "INSERT INTO leases (name, holder, expires_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms
                 WHERE leases.holder = excluded.holder OR leases.expires_ms <= $4",
                params![name, holder, now.saturating_add(millis(ttl)), now],
            )
            .await?;
        Ok(changed == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.change(
            "DELETE FROM leases WHERE name = $1 AND holder = $2",
            params![name, holder],
        )
        .await
        .map(|_| ())
    }
}
