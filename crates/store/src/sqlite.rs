//! The embedded store: one SQLite file, forward-only migrations, blocking work off the runtime.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension as _, params};

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
];

/// The schema version this binary writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error(
        "store schema version {found} is newer than this binary supports ({supported}); \
         run a caracal release at least as new as the one that last used this data"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("store {path}: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("store query failed: {0}")]
    Query(#[from] rusqlite::Error),
    #[error("store worker stopped")]
    WorkerGone,
}

/// The embedded store. Cloning shares the one connection.
#[derive(Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database, refuses a schema newer than [`SCHEMA_VERSION`]
    /// before writing anything, then applies pending migrations in one transaction each.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        create_owner_only(path).map_err(|source| StoreError::Create {
            path: path.display().to_string(),
            source,
        })?;
        let mut connection = Connection::open(path).map_err(open_error)?;
        let found = applied_version(&connection).map_err(open_error)?;
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
            .map_err(open_error)?;
        migrate(&mut connection, found).map_err(open_error)?;
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
            work(&mut guard).map_err(StoreError::Query)
        })
        .await
        .map_err(|_| StoreError::WorkerGone)?
    }

    /// Same as [`SqliteStore::run`] for the synchronous start-up path.
    pub fn run_blocking<T>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let mut guard = self
            .connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        work(&mut guard).map_err(StoreError::Query)
    }

    /// A round trip through the database: the readiness probe.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run(|connection| connection.query_row("SELECT 1", [], |_| Ok(())))
            .await
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
