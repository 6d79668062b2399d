//! The embedded store: one SQLite file, forward-only migrations, blocking work off the runtime.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use caracal_crypto::TokenDigest;
use rusqlite::{Connection, ErrorCode, OptionalExtension as _, params};

use crate::model::{
    AdminTokenRecord, KekRecord, NewAdminToken, NewZone, OutboxFailure, OutboxMessage, OutboxRow,
    OutboxStats, TokenScope, Zone,
};
use crate::store::{Store, StoreError, age, fields_from_json, fields_to_json, millis, now_ms};

/// Migrations in order; entry `i` brings the schema to version `i + 1`. Never edit a shipped
/// entry: add a new one.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "deployment and admin tokens",
        "CREATE TABLE deployment (
         singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
         kek_id TEXT NOT NULL,
         kek_check TEXT NOT NULL,
         created_at INTEGER NOT NULL
     ) STRICT;
     CREATE TABLE admin_tokens (
         id TEXT PRIMARY KEY,
         name TEXT NOT NULL,
         token_sha256 TEXT NOT NULL UNIQUE,
         scope TEXT NOT NULL CHECK (scope IN ('global', 'zone')),
         zone_id TEXT,
         capabilities TEXT NOT NULL,
         created_by TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         last_used_at INTEGER,
         revoked_at INTEGER,
         CHECK ((scope = 'global') = (zone_id IS NULL))
     ) STRICT;",
    ),
    (
        "embedded streams",
        "CREATE TABLE streams (
             name TEXT PRIMARY KEY,
             last_seq INTEGER NOT NULL
         ) STRICT;
         CREATE TABLE stream_entries (
             stream TEXT NOT NULL,
             seq INTEGER NOT NULL,
             appended_ms INTEGER NOT NULL,
             fields TEXT NOT NULL,
             PRIMARY KEY (stream, seq)
         ) STRICT, WITHOUT ROWID;
         CREATE TABLE stream_groups (
             stream TEXT NOT NULL,
             name TEXT NOT NULL,
             last_delivered INTEGER NOT NULL,
             PRIMARY KEY (stream, name)
         ) STRICT;
         CREATE TABLE stream_pending (
             stream TEXT NOT NULL,
             grp TEXT NOT NULL,
             seq INTEGER NOT NULL,
             consumer TEXT NOT NULL,
             delivered_ms INTEGER NOT NULL,
             deliveries INTEGER NOT NULL,
             PRIMARY KEY (stream, grp, seq)
         ) STRICT, WITHOUT ROWID;",
    ),
    (
        "replay registry",
        "CREATE TABLE replay_keys (
             namespace TEXT NOT NULL,
             key TEXT NOT NULL,
             expires_ms INTEGER NOT NULL,
             PRIMARY KEY (namespace, key)
         ) STRICT, WITHOUT ROWID;
         CREATE INDEX replay_keys_expiry ON replay_keys (expires_ms);",
    ),
    (
        "zones, outbox and leases",
        "CREATE TABLE zones (
             id TEXT PRIMARY KEY,
             name TEXT NOT NULL,
             slug TEXT NOT NULL UNIQUE,
             created_at_ms INTEGER NOT NULL
         ) STRICT;
         CREATE TABLE outbox (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             stream TEXT NOT NULL,
             fields TEXT NOT NULL,
             dedupe_key TEXT,
             status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'published', 'dead')),
             attempts INTEGER NOT NULL DEFAULT 0,
             available_at_ms INTEGER NOT NULL,
             locked_by TEXT,
             locked_until_ms INTEGER,
             last_error TEXT,
             created_at_ms INTEGER NOT NULL,
             published_at_ms INTEGER
         ) STRICT;
         CREATE INDEX outbox_publishable ON outbox (status, available_at_ms);
         CREATE TABLE leases (
             name TEXT PRIMARY KEY,
             holder TEXT NOT NULL,
             expires_ms INTEGER NOT NULL
         ) STRICT;",
    ),
];

/// The schema version this binary writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The embedded store. Cloning shares the one connection.
#[derive(Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
}

/// Maps SQLite failures to the backend-neutral error: uniqueness → conflict, busy/locked →
/// unavailable (fail closed), anything else → query failure.
fn store_error(error: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(failure, _) = &error {
        const UNIQUE: i32 = 2067;
        const PRIMARY_KEY: i32 = 1555;
        if failure.extended_code == UNIQUE || failure.extended_code == PRIMARY_KEY {
            return StoreError::Conflict(error.to_string());
        }
        if matches!(
            failure.code,
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked
        ) {
            return StoreError::Unavailable(error.to_string());
        }
    }
    StoreError::Query(error.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed, mode 0600) the database, refuses a schema newer than
    /// [`SCHEMA_VERSION`] before writing anything, then applies pending migrations in one
    /// transaction each.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        create_owner_only(path).map_err(|error| open_error(error.to_string()))?;
        let mut connection =
            Connection::open(path).map_err(|error| open_error(error.to_string()))?;
        let found = applied_version(&connection).map_err(|error| open_error(error.to_string()))?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = ON;
                 PRAGMA busy_timeout = 5000;",
            )
            .map_err(|error| open_error(error.to_string()))?;
        migrate(&mut connection, found).map_err(|error| open_error(error.to_string()))?;
        Ok(SqliteStore {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    /// Runs `work` on the connection on a blocking thread, so SQLite never stalls the runtime.
    pub async fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock poisons it; the connection itself is still sound
            // because SQLite rolls back any open transaction on the next statement.
            let mut guard = connection
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            work(&mut guard).map_err(store_error)
        })
        .await
        .map_err(|_| StoreError::Unavailable("store worker stopped".into()))?
    }

    /// Same as [`SqliteStore::run`] on the caller's thread, for start-up and tests.
    pub fn run_blocking<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let mut guard = self
            .connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        work(&mut guard).map_err(store_error)
    }
}

fn insert_outbox(
    transaction: &rusqlite::Transaction<'_>,
    outbox: &[OutboxMessage],
    now: i64,
) -> Result<(), rusqlite::Error> {
    for message in outbox {
        transaction.execute(
            "INSERT INTO outbox (stream, fields, dedupe_key, available_at_ms, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?4)",
            params![
                message.stream,
                fields_to_json(&message.fields),
                message.dedupe_key,
                now
            ],
        )?;
    }
    Ok(())
}

fn zone_from_row(row: &rusqlite::Row<'_>) -> Result<Zone, rusqlite::Error> {
    Ok(Zone {
        id: row.get(0)?,
        name: row.get(1)?,
        slug: row.get(2)?,
        created_at_ms: row.get(3)?,
    })
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|connection| connection.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

    async fn deployment_kek(&self) -> Result<Option<KekRecord>, StoreError> {
        self.run(|connection| {
            connection
                .query_row("SELECT kek_id, kek_check FROM deployment", [], |row| {
                    Ok(KekRecord {
                        kek_id: row.get(0)?,
                        kek_check: row.get(1)?,
                    })
                })
                .optional()
        })
        .await
    }

    async fn record_deployment_kek(&self, record: &KekRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.run(move |connection| {
            connection.execute(
                "INSERT INTO deployment (singleton, kek_id, kek_check, created_at) VALUES (1, ?1, ?2, unixepoch())",
                params![record.kek_id, record.kek_check],
            )
        })
        .await
        .map(|_| ())
    }

    async fn insert_admin_token(&self, token: &NewAdminToken) -> Result<(), StoreError> {
        let token = token.clone();
        self.run(move |connection| {
            let (scope, zone_id) = match &token.scope {
                TokenScope::Global => ("global", None),
                TokenScope::Zone(zone_id) => ("zone", Some(zone_id.clone())),
            };
            connection.execute(
                "INSERT INTO admin_tokens
                     (id, name, token_sha256, scope, zone_id, capabilities, created_by, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, unixepoch())",
                params![
                    token.id,
                    token.name,
                    token.digest.as_str(),
                    scope,
                    zone_id,
                    token.capabilities,
                    token.created_by
                ],
            )
        })
        .await
        .map(|_| ())
    }

    async fn has_active_token_by(&self, created_by: &str) -> Result<bool, StoreError> {
        let created_by = created_by.to_owned();
        self.run(move |connection| {
            connection.query_row(
                "SELECT EXISTS (SELECT 1 FROM admin_tokens WHERE created_by = ?1 AND revoked_at IS NULL)",
                [created_by],
                |row| row.get(0),
            )
        })
        .await
    }

    async fn find_admin_token(
        &self,
        digest: &TokenDigest,
    ) -> Result<Option<AdminTokenRecord>, StoreError> {
        let digest = digest.as_str().to_owned();
        self.run(move |connection| {
            connection
                .query_row(
                    "SELECT id, name, zone_id, capabilities, created_by, revoked_at IS NOT NULL
                     FROM admin_tokens WHERE token_sha256 = ?1",
                    [digest],
                    |row| {
                        let zone_id: Option<String> = row.get(2)?;
                        Ok(AdminTokenRecord {
                            id: row.get(0)?,
                            name: row.get(1)?,
                            scope: zone_id.map_or(TokenScope::Global, TokenScope::Zone),
                            capabilities: row.get(3)?,
                            created_by: row.get(4)?,
                            revoked: row.get(5)?,
                        })
                    },
                )
                .optional()
        })
        .await
    }

    async fn create_zone(
        &self,
        zone: &NewZone,
        outbox: &[OutboxMessage],
    ) -> Result<Zone, StoreError> {
        let (zone, outbox) = (zone.clone(), outbox.to_vec());
        self.run(move |connection| {
            let transaction = connection.transaction()?;
            let now = now_ms();
            transaction.execute(
                "INSERT INTO zones (id, name, slug, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![zone.id, zone.name, zone.slug, now],
            )?;
            insert_outbox(&transaction, &outbox, now)?;
            transaction.commit()?;
            Ok(Zone {
                id: zone.id,
                name: zone.name,
                slug: zone.slug,
                created_at_ms: now,
            })
        })
        .await
    }

    async fn get_zone(&self, zone_id: &str) -> Result<Option<Zone>, StoreError> {
        let zone_id = zone_id.to_owned();
        self.run(move |connection| {
            connection
                .query_row(
                    "SELECT id, name, slug, created_at_ms FROM zones WHERE id = ?1",
                    [zone_id],
                    zone_from_row,
                )
                .optional()
        })
        .await
    }

    async fn list_zones(&self) -> Result<Vec<Zone>, StoreError> {
        self.run(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, name, slug, created_at_ms FROM zones ORDER BY created_at_ms, id",
            )?;
            statement.query_map([], zone_from_row)?.collect()
        })
        .await
    }

    async fn claim_outbox(
        &self,
        worker: &str,
        batch: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let worker = worker.to_owned();
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        let rows: Vec<(i64, String, String, Option<String>, i64)> = self
            .run(move |connection| {
                let transaction = connection.transaction()?;
                let now = now_ms();
                let rows: Vec<(i64, String, String, Option<String>, i64)> = {
                    let mut statement = transaction.prepare_cached(
                        "SELECT id, stream, fields, dedupe_key, attempts FROM outbox
                         WHERE status = 'pending' AND available_at_ms <= ?1
                           AND (locked_until_ms IS NULL OR locked_until_ms <= ?1)
                         ORDER BY id LIMIT ?2",
                    )?;
                    statement
                        .query_map(params![now, limit], |row| {
                            Ok((
                                row.get(0)?,
                                row.get(1)?,
                                row.get(2)?,
                                row.get(3)?,
                                row.get(4)?,
                            ))
                        })?
                        .collect::<Result<_, _>>()?
                };
                for (id, ..) in &rows {
                    transaction.execute(
                        "UPDATE outbox SET locked_by = ?2, locked_until_ms = ?3 WHERE id = ?1",
                        params![id, worker, now.saturating_add(millis(lease))],
                    )?;
                }
                transaction.commit()?;
                Ok(rows)
            })
            .await?;
        rows.into_iter()
            .map(|(id, stream, fields, dedupe_key, attempts)| {
                Ok(OutboxRow {
                    id,
                    stream,
                    fields: fields_from_json(&fields)?,
                    dedupe_key,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                })
            })
            .collect()
    }

    async fn outbox_published(&self, ids: &[i64]) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.run(move |connection| {
            let transaction = connection.transaction()?;
            let now = now_ms();
            for id in ids {
                transaction.execute(
                    "UPDATE outbox SET status = 'published', published_at_ms = ?2, locked_by = NULL,
                         locked_until_ms = NULL
                     WHERE id = ?1",
                    params![id, now],
                )?;
            }
            transaction.commit()
        })
        .await
    }

    async fn outbox_failed(
        &self,
        id: i64,
        error: &str,
        retry_in: Duration,
        max_attempts: u32,
    ) -> Result<OutboxFailure, StoreError> {
        let error = error.to_owned();
        let status: String = self
            .run(move |connection| {
                connection.query_row(
                    "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, locked_by = NULL,
                         locked_until_ms = NULL, available_at_ms = ?3,
                         status = CASE WHEN attempts + 1 >= ?4 THEN 'dead' ELSE 'pending' END
                     WHERE id = ?1 RETURNING status",
                    params![
                        id,
                        error,
                        now_ms().saturating_add(millis(retry_in)),
                        max_attempts
                    ],
                    |row| row.get(0),
                )
            })
            .await?;
        Ok(if status == "dead" {
            OutboxFailure::Dead
        } else {
            OutboxFailure::Retrying
        })
    }

    async fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let (pending, dead, oldest): (i64, i64, Option<i64>) = self
            .run(|connection| {
                connection.query_row(
                    "SELECT COUNT(*) FILTER (WHERE status = 'pending'),
                            COUNT(*) FILTER (WHERE status = 'dead'),
                            MIN(created_at_ms) FILTER (WHERE status = 'pending')
                     FROM outbox WHERE status <> 'published'",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
            })
            .await?;
        Ok(OutboxStats {
            pending: u64::try_from(pending).unwrap_or(0),
            dead: u64::try_from(dead).unwrap_or(0),
            oldest_pending_age: oldest.map(|created| age(now_ms(), created)),
        })
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        let changed = self
            .run(move |connection| {
                let now = now_ms();
                connection.execute(
                    "INSERT INTO leases (name, holder, expires_ms) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms
                     WHERE leases.holder = excluded.holder OR leases.expires_ms <= ?4",
                    params![name, holder, now.saturating_add(millis(ttl)), now],
                )
            })
            .await?;
        Ok(changed == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.run(move |connection| {
            connection.execute(
                "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                params![name, holder],
            )
        })
        .await
        .map(|_| ())
    }
}

/// Creates the database file mode 0600 if it is missing; SQLite gives its WAL and shared-memory
/// files the same mode, so no other user can read the store even in a more open directory.
fn create_owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error),
    }
}

fn applied_version(connection: &Connection) -> Result<i64, rusqlite::Error> {
    let tracked: Option<String> = connection
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    if tracked.is_none() {
        return Ok(0);
    }
    connection.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |row| row.get(0),
    )
}

fn migrate(connection: &mut Connection, applied: i64) -> Result<(), rusqlite::Error> {
    connection.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             name TEXT NOT NULL,
             applied_at INTEGER NOT NULL
         ) STRICT;",
    )?;
    for (index, (name, sql)) in MIGRATIONS.iter().enumerate() {
        let version = index as i64 + 1;
        if version <= applied {
            continue;
        }
        let transaction = connection.transaction()?;
        transaction.execute_batch(sql)?;
        transaction.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, unixepoch())",
            params![version, name],
        )?;
        transaction.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_reopens() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        let count = |store: &SqliteStore| {
            store
                .run_blocking(|c| {
                    c.query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| {
                        r.get::<_, i64>(0)
                    })
                })
                .unwrap()
        };
        assert_eq!(count(&store), SCHEMA_VERSION);
        drop(store);
        assert_eq!(count(&SqliteStore::open(&path).unwrap()), SCHEMA_VERSION);
    }

    #[test]
    fn a_newer_schema_is_refused_and_left_untouched() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("store.db");
        SqliteStore::open(&path)
            .unwrap()
            .run_blocking(|c| {
                c.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, 'future', 0)",
                    [SCHEMA_VERSION + 5],
                )
            })
            .unwrap();
        let before = std::fs::read(&path).unwrap();
        let error = SqliteStore::open(&path).err().unwrap();
        assert!(
            matches!(error, StoreError::SchemaTooNew { found, supported } if found == SCHEMA_VERSION + 5 && supported == SCHEMA_VERSION),
            "{error}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[tokio::test]
    async fn ping_answers() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        store.ping().await.unwrap();
    }
}
