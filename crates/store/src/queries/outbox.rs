//! The transactional outbox and the leases that keep singleton jobs single.

use std::time::Duration;

use crate::db::{Db, Dialect, Statement, params};
use crate::model::{DeadOutboxRow, OutboxFailure, OutboxMessage, OutboxRow, OutboxStats};
use crate::store::{StoreError, age, fields_from_json, millis, not_found, now_ms, with_outbox};

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
    /// The dead rows, oldest first, at most `limit`.
    async fn dead_outbox(&self, limit: i64) -> Result<Vec<DeadOutboxRow>, StoreError>;
    /// Makes the dead row `id` (every dead row when `None`) publishable again now, with its
    /// attempts counted afresh, in one transaction with `outbox` (the change's evidence);
    /// returns how many rows it revived.
    async fn requeue_dead_outbox(
        &self,
        id: Option<i64>,
        outbox: &[OutboxMessage],
    ) -> Result<u64, StoreError>;
    /// The status (`pending`, `published` or `dead`) of the newest row with this dedupe key.
    async fn outbox_status(&self, dedupe_key: &str) -> Result<Option<String>, StoreError>;

    /// Takes or renews the named lease for `holder` until `ttl` from now; `false` while another
    /// holder's lease is live. Singleton jobs run only while they hold their lease.
    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError>;
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;
}

/// Each stream keeps its order across dispatchers: a row waits while an earlier row of its
/// stream is held by a dispatcher (this one included: a row whose fate it could not record) or
/// backs off after a failed publish. A dead row no longer holds the rest back. The held rows
/// are gathered once per claim, each stream's first (`blocked`), so a claim costs one pass over
/// the backlog whatever plan the database picks; asking per candidate row whether an earlier row
/// is held made a claim quadratic in the backlog. PostgreSQL serves several dispatchers: claims
/// take turns (an advisory lock) so each sees the claims before it, and locked rows are skipped,
/// not waited for. SQLite has one writer, so its plain form is already exclusive.
macro_rules! claim_sql {
    ($row_locks:literal) => {
        concat!(
            "UPDATE outbox SET locked_by = $1, locked_until_ms = $2
             WHERE id IN (
                 WITH blocked AS MATERIALIZED (
                     SELECT stream, MIN(id) AS first_id FROM outbox
                     WHERE status = 'pending'
                       AND (available_at_ms > $3 OR locked_until_ms > $3)
                     GROUP BY stream)
                 SELECT id FROM outbox
                 WHERE status = 'pending' AND available_at_ms <= $3
                   AND (locked_until_ms IS NULL OR locked_until_ms <= $3)
                   AND NOT EXISTS (
                       SELECT 1 FROM blocked
                       WHERE blocked.stream = outbox.stream AND blocked.first_id < outbox.id)
                 ORDER BY id LIMIT CAST($4 AS BIGINT)",
            $row_locks,
            ")
             RETURNING id, stream, fields, dedupe_key, attempts"
        )
    };
}

const SQLITE_CLAIM: &str = claim_sql!("");
const POSTGRES_CLAIM: &str = claim_sql!(" FOR UPDATE SKIP LOCKED");

#[async_trait::async_trait]
impl<D: Db> Outbox for D {
    async fn claim_outbox(
        &self,
        worker: &str,
        batch: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let now = now_ms();
        // Most polls find nothing due. Asking a reader first keeps an idle dispatcher off the
        // writer: a claim is a write transaction even when it changes nothing. The look is
        // wider than the claim (held rows count), so it can never hide a claimable row; a row
        // committed after it waits for the next poll.
        let due = self
            .rows(
                "SELECT 1 FROM outbox WHERE status = 'pending' AND available_at_ms <= $1 LIMIT 1",
                params![now],
            )
            .await?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        let params = params![worker, now.saturating_add(millis(lease)), now, limit];
        let statements = match self.dialect() {
            Dialect::Postgres => vec![
                Statement::new(
                    "SELECT 1 FROM (SELECT pg_advisory_xact_lock(hashtext('caracal.outbox.claim'))) AS locked",
                    Vec::new(),
                ),
                Statement::new(POSTGRES_CLAIM, params),
            ],
            Dialect::Sqlite => vec![Statement::new(SQLITE_CLAIM, params)],
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

    async fn dead_outbox(&self, limit: i64) -> Result<Vec<DeadOutboxRow>, StoreError> {
        let rows = self
            .rows(
                "SELECT id, stream, dedupe_key, attempts, last_error, created_at_ms FROM outbox
                 WHERE status = 'dead' ORDER BY id LIMIT CAST($1 AS BIGINT)",
                params![limit],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(DeadOutboxRow {
                    id: row.int(0)?,
                    stream: row.text(1)?,
                    dedupe_key: row.opt_text(2)?,
                    attempts: row.int(3)?,
                    last_error: row.opt_text(4)?,
                    created_at_ms: row.int(5)?,
                })
            })
            .collect()
    }

    async fn requeue_dead_outbox(
        &self,
        id: Option<i64>,
        outbox: &[OutboxMessage],
    ) -> Result<u64, StoreError> {
        let revive = Statement::new(
            "UPDATE outbox SET status = 'pending', attempts = 0, available_at_ms = $2,
                 locked_by = NULL, locked_until_ms = NULL
             WHERE status = 'dead' AND (CAST($1 AS BIGINT) IS NULL OR id = CAST($1 AS BIGINT))",
            params![id, now_ms()],
        );
        let outcomes = self.atomic(with_outbox(revive, outbox)).await?;
        Ok(outcomes.first().map_or(0, |outcome| outcome.changed))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite's count of virtual-machine steps for one claim of 256 rows from `backlog`
    /// pending rows of one stream, the first of them backing off.
    fn claim_steps(backlog: i64) -> i64 {
        let directory = tempfile::tempdir().unwrap();
        let store = crate::SqliteStore::open(&directory.path().join("store.db")).unwrap();
        store
            .run_blocking(|c| {
                // Stream `s` is held back by its first row; stream `t`, never held back, is what
                // the claim can take.
                c.execute(
                    "WITH RECURSIVE n (value) AS (
                         SELECT 1 UNION ALL SELECT value + 1 FROM n WHERE value < ?1)
                     INSERT INTO outbox (stream, fields, available_at_ms, created_at_ms)
                     SELECT 's', '{}', CASE WHEN value = 1 THEN 100 ELSE 0 END, 0 FROM n
                     UNION ALL SELECT 't', '{}', 0, 0 FROM n",
                    [backlog],
                )?;
                // The text the store runs, parameters converted as it converts them.
                let mut claim = c.prepare(crate::sqlite::sqlite_sql(SQLITE_CLAIM))?;
                let claimed = claim
                    .query_map(rusqlite::params!["worker", 50_i64, 10_i64, 256_i64], |_| {
                        Ok(())
                    })?
                    .count();
                assert_eq!(claimed, 256);
                Ok(i64::from(
                    claim.get_status(rusqlite::StatementStatus::VmStep),
                ))
            })
            .unwrap()
    }

    /// A backlog four times as long costs a claim about four times the work, not sixteen: with
    /// the earlier-row check asked per candidate, a claim from 20,000 pending rows held the
    /// writer (and so every write) for seconds. SQLite's step count is exact, not a timing.
    #[test]
    fn a_claim_costs_one_pass_over_the_backlog() {
        let (small, large) = (claim_steps(1_000), claim_steps(4_000));
        assert!(
            large < small * 6,
            "4x the backlog took {large} steps against {small}"
        );
    }
}
