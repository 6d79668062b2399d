//! The embedded store: one SQLite file, forward-only migrations, writes on a writer thread.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OptionalExtension as _, params};

use crate::db::{Db, Dialect, Outcome, Row, Statement, TableGroup, Then, Value};
use crate::row_cache::RowCache;
use crate::store::{StoreError, now_ms};

/// Migrations in order; entry `i` brings the schema to version `i + 1`. Never edit a released
/// entry: add a new one.
fn migrations() -> Vec<(&'static str, String)> {
    let common = include_str!("schema/common.sql")
        .replace("{BIGINT}", "INTEGER")
        .replace("{SERIAL}", "INTEGER PRIMARY KEY AUTOINCREMENT");
    vec![
        (
            "initial schema",
            format!("{common}\n{}", include_str!("schema/sqlite.sql")),
        ),
        (
            "audit tamper findings",
            include_str!("schema/0002_audit_findings.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "audit checkpoints",
            include_str!("schema/0003_audit_checkpoints.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "audit chain keys",
            include_str!("schema/0004_audit_chain_keys.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "audit retention cuts",
            include_str!("schema/0005_audit_cuts.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "audit chain hashes as bytes",
            include_str!("schema/0006_audit_binary_hashes.sqlite.sql").to_owned(),
        ),
        (
            "admin api",
            include_str!("schema/0007_admin_api.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "outbox dedupe index",
            include_str!("schema/0008_outbox_dedupe_index.sql").to_owned(),
        ),
        (
            "policy loads",
            include_str!("schema/0009_policy_loads.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "approval consumption",
            include_str!("schema/0010_approval_consumption.sql").to_owned(),
        ),
        (
            "delegation parent index",
            include_str!("schema/0011_delegation_parent_index.sql").to_owned(),
        ),
        (
            "runtime retention indexes",
            include_str!("schema/0012_runtime_retention_indexes.sql").to_owned(),
        ),
        (
            "containment",
            include_str!("schema/0013_containment.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "admin objects",
            include_str!("schema/0014_admin_objects.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "console users",
            include_str!("schema/0015_console_users.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "console sessions",
            include_str!("schema/0016_console_sessions.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "replay memory",
            include_str!("schema/0017_replay_memory.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "authority expiry index dropped",
            include_str!("schema/0018_drop_authority_expiry_index.sql").to_owned(),
        ),
        (
            "admin objects by id",
            include_str!("schema/0019_admin_objects_by_id.sql").to_owned(),
        ),
        (
            "deployment settings",
            include_str!("schema/0020_deployment_settings.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "notification sinks",
            include_str!("schema/0021_notifications.sql").replace("{BIGINT}", "INTEGER"),
        ),
        (
            "zone dynamic client registration",
            include_str!("schema/0022_zone_dcr.sql").replace("{BIGINT}", "INTEGER"),
        ),
    ]
}

/// The schema version this binary writes and understands.
pub fn schema_version() -> i64 {
    migrations().len() as i64
}

/// The embedded store. Cloning shares the connections: one writer, through which every
/// transaction goes, and a few read-only connections for single `SELECT`s. In WAL mode a
/// reader sees the last committed state and never waits for the writer's commit (an fsync),
/// so reads on the request path do not queue behind durable writes.
#[derive(Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
    writer: Arc<Writer>,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: Arc<std::sync::atomic::AtomicUsize>,
    remembered: Arc<RowCache>,
}

/// Work for the writer thread. It runs in a savepoint of its batch's transaction and returns
/// how to answer its caller once the transaction's fate is known; handed an error instead of
/// the connection, it answers the caller with it and runs nothing.
type Job = Box<dyn FnOnce(Result<&mut Connection, StoreError>) -> Settle + Send>;
/// Answers a job's caller with its batch's commit: a job's changes exist only if it committed.
type Settle = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

struct Queued {
    job: Job,
    mode: Mode,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The commit reaches the disk before the caller hears of it (`synchronous = FULL`).
    Durable,
    /// See [`SqliteStore::run_relaxed`].
    Relaxed,
    /// Outside any transaction (checkpoints, `VACUUM`): see [`SqliteStore::run_alone`].
    Alone,
}

/// The queue to the writer thread. Dropping the last handle closes the queue and waits for
/// the thread to finish what was queued and close its connection, as closing a store should.
struct Writer {
    jobs: Option<std::sync::mpsc::Sender<Queued>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

/// Jobs that share one transaction at most.
const MAX_BATCH: usize = 256;

/// How often the writer looks for commits by another connection to the file (a tool such as
/// `caracal console add-user`, or a hand edit), so that rows remembered from before them are
/// forgotten within this bound (plus the batch in progress).
const OTHER_WRITERS_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Read-only connections per store.
const READERS: usize = 4;

/// Maps SQLite failures to the backend-neutral error: uniqueness → conflict, a missing
/// referenced row → not found; the file or its disk unable to take the work now (busy, locked,
/// full, read-only, I/O or memory failure) → unavailable, so that callers fail closed and retry
/// rather than treat the write as refused; anything else → query.
fn store_error(error: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(failure, _) = &error {
        const UNIQUE: i32 = 2067;
        const PRIMARY_KEY: i32 = 1555;
        const FOREIGN_KEY: i32 = 787;
        match failure.extended_code {
            UNIQUE | PRIMARY_KEY => return StoreError::Conflict(error.to_string()),
            FOREIGN_KEY => return StoreError::NotFound("a referenced row does not exist".into()),
            _ => {}
        }
        if matches!(
            failure.code,
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::DiskFull
                | ErrorCode::ReadOnly
                | ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen
                | ErrorCode::FileLockingProtocolFailed
                | ErrorCode::OutOfMemory
        ) {
            return StoreError::Unavailable(error.to_string());
        }
    }
    StoreError::Query(error.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed, mode 0600) the database, refuses a schema newer than this
    /// binary knows before writing anything, then applies pending migrations in one
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
        if found > schema_version() {
            return Err(StoreError::SchemaTooNew {
                found,
                supported: schema_version(),
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
        // Every query is prepared once and kept: parsing SQL costs more than running it.
        connection.set_prepared_statement_cache_capacity(256);
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let reader = Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|error| open_error(error.to_string()))?;
            reader
                .execute_batch("PRAGMA busy_timeout = 5000; PRAGMA query_only = ON;")
                .map_err(|error| open_error(error.to_string()))?;
            reader.set_prepared_statement_cache_capacity(256);
            readers.push(Mutex::new(reader));
        }
        let remembered = Arc::new(RowCache::default());
        remembered.watch(&connection);
        let connection = Arc::new(Mutex::new(connection));
        let (writer, jobs) = std::sync::mpsc::channel();
        let writing = Arc::clone(&connection);
        let ended = Arc::clone(&remembered);
        let thread = std::thread::Builder::new()
            .name("caracal-sqlite-writer".into())
            .spawn(move || write_loop(&writing, &jobs, &ended))
            .map_err(|error| open_error(error.to_string()))?;
        Ok(SqliteStore {
            connection,
            writer: Arc::new(Writer {
                jobs: Some(writer),
                thread: Some(thread),
            }),
            readers: Arc::new(readers),
            next_reader: Arc::default(),
            remembered,
        })
    }

    /// Runs one `SELECT` on a read-only connection. A free reader runs it right here: an
    /// indexed read takes microseconds, less than handing it to another thread would. With
    /// every reader busy, it waits for one on a blocking thread.
    async fn read(&self, sql: &'static str, params: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        let start = self
            .next_reader
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let count = self.readers.len().max(1);
        for offset in 0..count {
            if let Some(reader) = self.readers.get((start + offset) % count)
                && let Ok(mut guard) = reader.try_lock()
            {
                return select(&mut guard, sql, &params);
            }
        }
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || {
            let mut guard = readers
                .get(start % count)
                .ok_or_else(|| StoreError::Unavailable("no reader".into()))?
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            select(&mut guard, sql, &params)
        })
        .await
        .map_err(|_| StoreError::Unavailable("store worker stopped".into()))?
    }

    /// Runs `work` on the writer connection, in a savepoint of a transaction it may share with
    /// other callers' work; answers once that transaction is committed (fsynced). An `Err`
    /// from `work` rolls back its own changes only.
    pub async fn run<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        self.submit(work, Mode::Durable).await
    }

    /// [`SqliteStore::run`] whose commit does not wait for the disk (`synchronous = NORMAL`,
    /// in a transaction no durable job shares): it survives a crash of the process, and only a
    /// power cut may lose it. WAL frames are appended in order, so the next durable commit
    /// persists it too.
    pub async fn run_relaxed<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        self.submit(work, Mode::Relaxed).await
    }

    /// Runs `work` on the writer connection outside any transaction, between batches: for
    /// what SQLite refuses inside one (`PRAGMA wal_checkpoint`, `VACUUM`, `VACUUM INTO`).
    pub async fn run_alone<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        self.submit(work, Mode::Alone).await
    }

    async fn submit<T, F>(&self, work: F, mode: Mode) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |connection| {
            let connection = match connection {
                Ok(connection) => connection,
                Err(error) => {
                    let _ = reply.send(Err(error));
                    return Box::new(|_| {});
                }
            };
            let result = if mode == Mode::Alone {
                work(connection)
            } else {
                in_savepoint(connection, work)
            };
            match result {
                Ok(value) => Box::new(move |committed: Result<(), StoreError>| {
                    let _ = reply.send(committed.map(|()| value));
                }),
                Err(error) => {
                    let _ = reply.send(Err(store_error(error)));
                    Box::new(|_| {})
                }
            }
        });
        let stopped = || StoreError::Unavailable("store writer stopped".into());
        self.writer
            .jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(Queued { job, mode })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
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
        let done = work(&mut guard).map_err(store_error);
        self.remembered.transaction_ended();
        done
    }
}

/// The writer thread: takes what is queued (up to [`MAX_BATCH`] jobs) and runs it in two
/// transactions, the relaxed jobs' first (no fsync, so a replay claim or an authority record
/// never waits for the disk on behalf of its neighbours) and then the durable jobs' with one
/// fsync they all share. Queued jobs are concurrent (no caller waits on another's job), so
/// committing the relaxed ones first reorders nothing anyone could observe. Every
/// [`OTHER_WRITERS_POLL`], between batches or idle, it looks for commits by other connections,
/// which the remembered rows cannot have seen. It ends when every handle to the store is dropped.
fn write_loop(
    connection: &Mutex<Connection>,
    jobs: &std::sync::mpsc::Receiver<Queued>,
    remembered: &RowCache,
) {
    let mut synchronous_full = true;
    let mut looked = std::time::Instant::now();
    let mut look_for_other_writers = |connection: &Connection| {
        if looked.elapsed() >= OTHER_WRITERS_POLL {
            remembered.notice_other_writers(connection);
            looked = std::time::Instant::now();
        }
    };
    loop {
        let first = match jobs.recv_timeout(OTHER_WRITERS_POLL) {
            Ok(first) => first,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                look_for_other_writers(
                    &connection
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()),
                );
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(queued) => batch.push(queued),
                Err(_) => break,
            }
        }
        // A panic while holding the lock poisons it; the connection itself is still sound.
        let mut guard = connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut shared = Vec::with_capacity(batch.len());
        for queued in batch {
            if queued.mode == Mode::Alone {
                commit_by_mode(&mut guard, &mut shared, &mut synchronous_full, remembered);
                run_alone(&mut guard, queued.job, remembered);
            } else {
                shared.push(queued);
            }
        }
        commit_by_mode(&mut guard, &mut shared, &mut synchronous_full, remembered);
        look_for_other_writers(&guard);
    }
}

/// Commits `jobs` (and empties it): the relaxed ones in a transaction of their own first, then
/// the durable ones.
fn commit_by_mode(
    connection: &mut Connection,
    jobs: &mut Vec<Queued>,
    synchronous_full: &mut bool,
    remembered: &RowCache,
) {
    let (relaxed, durable): (Vec<Queued>, Vec<Queued>) = jobs
        .drain(..)
        .partition(|queued| queued.mode == Mode::Relaxed);
    commit_batch(connection, relaxed, synchronous_full, remembered);
    commit_batch(connection, durable, synchronous_full, remembered);
}

/// A job outside any transaction: nothing to commit, so it is settled at once.
fn run_alone(connection: &mut Connection, job: Job, remembered: &RowCache) {
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Ok(connection))));
    if !connection.is_autocommit() {
        // A job that left a transaction open must not hand it to the next batch.
        let _ = connection.execute_batch("ROLLBACK");
    }
    remembered.transaction_ended();
    match ran {
        Ok(settle) => settle(Ok(())),
        Err(_) => tracing::error!("a store job panicked"),
    }
}

fn commit_batch(
    connection: &mut Connection,
    batch: Vec<Queued>,
    synchronous_full: &mut bool,
    remembered: &RowCache,
) {
    if batch.is_empty() {
        return;
    }
    let durable = batch.iter().any(|queued| queued.mode == Mode::Durable);
    let mut settles: Vec<Settle> = Vec::with_capacity(batch.len());
    let fail_all = |settles: &mut Vec<Settle>, error: &StoreError| {
        for settle in settles.drain(..) {
            settle(Err(error.clone()));
        }
    };
    // The safety level cannot change inside a transaction: it is set per batch.
    if durable != *synchronous_full {
        let level = if durable { "FULL" } else { "NORMAL" };
        if let Err(error) = connection.pragma_update(None, "synchronous", level) {
            let error = store_error(error);
            for queued in batch {
                drop((queued.job)(Err(error.clone())));
            }
            return;
        }
        *synchronous_full = durable;
    }
    let mut open = false;
    for queued in batch {
        if !open {
            if let Err(error) = control(connection, "BEGIN IMMEDIATE") {
                drop((queued.job)(Err(store_error(error))));
                continue;
            }
            open = true;
        }
        let job = queued.job;
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Ok(connection))));
        match ran {
            Ok(settle) => settles.push(settle),
            Err(_) => {
                // A job that panicked leaves its savepoint in an unknown state: the whole
                // transaction goes, and so does every job that shared it.
                tracing::error!("a store job panicked: its batch is rolled back");
                let _ = connection.execute_batch("ROLLBACK");
            }
        }
        // Some failures (I/O, a full disk, a panic above) roll the whole transaction back:
        // what the jobs before did is gone, so they fail; the next job opens a new one.
        if connection.is_autocommit() {
            fail_all(
                &mut settles,
                &StoreError::Unavailable("the store rolled the transaction back".into()),
            );
            open = false;
        }
    }
    if !open {
        return;
    }
    let committed = control(connection, "COMMIT").map_err(store_error);
    if committed.is_err() && !connection.is_autocommit() {
        let _ = connection.execute_batch("ROLLBACK");
    }
    remembered.transaction_ended();
    for settle in settles {
        settle(committed.clone());
    }
}

/// A transaction-control statement, prepared once per connection: the writer runs four of them
/// per job or batch.
fn control(connection: &Connection, sql: &'static str) -> Result<(), rusqlite::Error> {
    connection.prepare_cached(sql)?.execute([]).map(drop)
}

/// Runs `work` in a savepoint: its changes are kept if it succeeds, rolled back if not (the
/// closures need no transaction of their own for atomicity).
fn in_savepoint<T>(
    connection: &mut Connection,
    work: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
) -> Result<T, rusqlite::Error> {
    control(connection, "SAVEPOINT job")?;
    let result =
        work(connection).and_then(|value| control(connection, "RELEASE job").map(|()| value));
    if result.is_err() && !connection.is_autocommit() {
        let _ = connection.execute_batch("ROLLBACK TO job; RELEASE job");
    }
    result
}

fn select(
    connection: &mut Connection,
    sql: &'static str,
    params: &[Value],
) -> Result<Vec<Row>, StoreError> {
    let sql = sqlite_sql(sql);
    let mut prepared = connection.prepare_cached(sql).map_err(store_error)?;
    let columns = prepared.column_count();
    let mut rows = prepared
        .query(rusqlite::params_from_iter(params.iter().map(sqlite_value)))
        .map_err(store_error)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(store_error)? {
        out.push(read_row(row, columns).map_err(store_error)?);
    }
    Ok(out)
}

/// [`sqlite_parameters`] of a query text, converted once per text: every query is a
/// `&'static str`, so the texts are few and the converted copies live as long as the process.
pub(crate) fn sqlite_sql(sql: &'static str) -> &'static str {
    type Converted = std::collections::HashMap<(usize, usize), &'static str>;
    static CONVERTED: std::sync::OnceLock<std::sync::RwLock<Converted>> =
        std::sync::OnceLock::new();
    let converted = CONVERTED.get_or_init(Default::default);
    // Keyed by where the text lives, not by its contents: no hashing of the text per call.
    let key = (sql.as_ptr() as usize, sql.len());
    if let Some(found) = converted
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&key)
    {
        return found;
    }
    let text: &'static str = Box::leak(sqlite_parameters(sql).into_boxed_str());
    let mut converted = converted
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let kept: &'static str = converted.entry(key).or_insert(text);
    kept
}

/// `$1`, `$2`, … become `?1`, `?2`, …; a `$` not followed by a digit (a JSON path) stays.
fn sqlite_parameters(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut characters = sql.chars().peekable();
    while let Some(character) = characters.next() {
        if character == '$' && characters.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(character);
        }
    }
    out
}

fn sqlite_value(value: &Value) -> rusqlite::types::Value {
    match value {
        Value::Null => rusqlite::types::Value::Null,
        Value::Int(number) => rusqlite::types::Value::Integer(*number),
        Value::Text(text) => rusqlite::types::Value::Text(text.clone()),
        Value::Bytes(bytes) => rusqlite::types::Value::Blob(bytes.clone()),
    }
}

fn read_row(row: &rusqlite::Row<'_>, columns: usize) -> Result<Row, rusqlite::Error> {
    let mut values = Vec::with_capacity(columns);
    for index in 0..columns {
        values.push(match row.get_ref(index)? {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(number) => Value::Int(number),
            ValueRef::Text(bytes) => Value::Text(String::from_utf8_lossy(bytes).into_owned()),
            ValueRef::Real(number) => Value::Text(number.to_string()),
            ValueRef::Blob(bytes) => Value::Bytes(bytes.to_vec()),
        });
    }
    Ok(Row(values))
}

#[async_trait::async_trait]
impl Db for SqliteStore {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    async fn atomic_with(
        &self,
        first: Vec<Statement>,
        then: Then,
    ) -> Result<Vec<Outcome>, StoreError> {
        self.run(move |connection| {
            let transaction = connection.savepoint()?;
            let mut outcomes = Vec::with_capacity(first.len());
            for statement in &first {
                match run_statement(&transaction, statement)? {
                    Ok(outcome) => outcomes.push(outcome),
                    Err(error) => return Ok(Err(error)),
                }
            }
            let second = match then(&outcomes) {
                Ok(statements) => statements,
                Err(error) => return Ok(Err(error)),
            };
            for statement in &second {
                match run_statement(&transaction, statement)? {
                    Ok(outcome) => outcomes.push(outcome),
                    Err(error) => return Ok(Err(error)),
                }
            }
            transaction.commit()?;
            Ok(Ok(outcomes))
        })
        .await?
    }

    async fn atomic_unsynced(
        &self,
        statements: Vec<Statement>,
    ) -> Result<Vec<Outcome>, StoreError> {
        self.run_relaxed(move |connection| {
            let transaction = connection.savepoint()?;
            let mut outcomes = Vec::with_capacity(statements.len());
            for statement in &statements {
                match run_statement(&transaction, statement)? {
                    Ok(outcome) => outcomes.push(outcome),
                    Err(error) => return Ok(Err(error)),
                }
            }
            transaction.commit()?;
            Ok(Ok(outcomes))
        })
        .await?
    }

    async fn rows(&self, sql: &'static str, params: Vec<Value>) -> Result<Vec<Row>, StoreError> {
        let is_select = sql
            .trim_start()
            .get(..6)
            .is_some_and(|word| word.eq_ignore_ascii_case("select"));
        if !is_select {
            let mut outcomes = self.atomic(vec![Statement::new(sql, params)]).await?;
            return Ok(outcomes
                .pop()
                .map(|outcome| outcome.rows)
                .unwrap_or_default());
        }
        self.read(sql, params).await
    }

    async fn remembered_rows(
        &self,
        group: TableGroup,
        sql: &'static str,
        params: Vec<Value>,
    ) -> Result<Vec<Row>, StoreError> {
        let generation = self.remembered.generation(group);
        let read = crate::row_cache::read(group, sql, params);
        if let Some(rows) = self.remembered.get(&read, generation) {
            return Ok(rows);
        }
        let rows = self.read(sql, read.2.clone()).await?;
        self.remembered.put(read, generation, rows.clone());
        Ok(rows)
    }
}

/// Runs one statement; the inner error is a `must_change` refusal (the caller then drops the
/// transaction, which rolls it back).
fn run_statement(
    transaction: &Connection,
    statement: &Statement,
) -> Result<Result<Outcome, StoreError>, rusqlite::Error> {
    let sql = sqlite_sql(statement.sql);
    let mut prepared = transaction.prepare_cached(sql)?;
    let columns = prepared.column_count();
    let params = rusqlite::params_from_iter(statement.params.iter().map(sqlite_value));
    let mut outcome = Outcome::default();
    if columns > 0 {
        let mut rows = prepared.query(params)?;
        while let Some(row) = rows.next()? {
            outcome.rows.push(read_row(row, columns)?);
        }
        outcome.changed = outcome.rows.len() as u64;
    } else {
        outcome.changed = prepared.execute(params)? as u64;
    }
    if let (Some(error), 0) = (statement.must_change, outcome.changed) {
        return Ok(Err(error()));
    }
    Ok(Ok(outcome))
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
             applied_at_ms INTEGER NOT NULL
         );",
    )?;
    for (index, (name, sql)) in migrations().iter().enumerate() {
        let version = index as i64 + 1;
        if version <= applied {
            continue;
        }
        let transaction = connection.transaction()?;
        transaction.execute_batch(sql)?;
        transaction.execute(
            "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (?1, ?2, ?3)",
            params![version, name, now_ms()],
        )?;
        transaction.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Deployment as _;
    use crate::NewZone;

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
        assert_eq!(count(&store), schema_version());
        drop(store);
        assert_eq!(count(&SqliteStore::open(&path).unwrap()), schema_version());
    }

    #[test]
    fn a_newer_schema_is_refused_and_left_untouched() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("store.db");
        SqliteStore::open(&path)
            .unwrap()
            .run_blocking(|c| {
                c.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (?1, 'future', 0)",
                    [schema_version() + 5],
                )
            })
            .unwrap();
        let before = std::fs::read(&path).unwrap();
        let error = SqliteStore::open(&path).err().unwrap();
        assert!(
            matches!(error, StoreError::SchemaTooNew { found, supported } if found == schema_version() + 5 && supported == schema_version()),
            "{error}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn only_numbered_parameters_are_rewritten() {
        assert_eq!(
            sqlite_parameters("SELECT value ->> '$.id' FROM json_each($1) WHERE x = $12"),
            "SELECT value ->> '$.id' FROM json_each(?1) WHERE x = ?12"
        );
    }

    #[test]
    fn an_older_database_is_migrated_forward() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("store.db");
        // Make a version-1 database: what an earlier release left behind.
        SqliteStore::open(&path)
            .unwrap()
            .run_blocking(|c| {
                c.execute_batch(
                    "DROP TABLE audit_tamper_findings; DROP TABLE audit_checkpoints; DROP TABLE audit_checkpoint_keys;
                     DROP TABLE audit_chain_keys; DROP TABLE audit_cuts;
                     DROP INDEX applications_live_name; ALTER TABLE zones DROP COLUMN archived_at_ms;
                     DROP INDEX outbox_dedupe; DROP TABLE policy_loads;
                     ALTER TABLE approval_holds DROP COLUMN consumed_record_id;
                     DROP INDEX delegation_edges_parent;
                     DROP INDEX authority_records_status_expiry;
                     DROP INDEX sessions_status_ended; DROP INDEX sessions_authority_record;
                     DROP INDEX delegation_edges_status_revoked; DROP TABLE containment;
                     DROP TABLE admin_objects; DROP TABLE console_users; DROP TABLE console_sessions; DROP TABLE replay_memory;
                     DROP TABLE deployment_settings; DROP TABLE notification_sinks;
                     DROP TABLE notification_deliveries; ALTER TABLE zones DROP COLUMN dcr_enabled;
                     DELETE FROM schema_migrations WHERE version >= 2;",
                )
            })
            .unwrap();
        let store = SqliteStore::open(&path).unwrap();
        let (version, tables): (i64, i64) = store
            .run_blocking(|c| {
                c.query_row(
                    "SELECT (SELECT MAX(version) FROM schema_migrations),
                            (SELECT COUNT(*) FROM sqlite_master WHERE name = 'audit_tamper_findings')",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
            })
            .unwrap();
        assert_eq!((version, tables), (schema_version(), 1));
    }

    /// Concurrent jobs share transactions; whatever happens to a neighbour, a job is answered
    /// `Ok` exactly when its row is stored.
    async fn answered_ok_iff_stored(fate: fn(i64) -> Fate) -> (tempfile::TempDir, SqliteStore) {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        store
            .run(|c| c.execute_batch("CREATE TABLE shared (x INTEGER PRIMARY KEY)"))
            .await
            .unwrap();
        let jobs: Vec<_> = (0..300_i64)
            .map(|x| {
                let store = store.clone();
                tokio::spawn(async move {
                    let work = move |c: &mut Connection| {
                        c.execute("INSERT INTO shared (x) VALUES (?1)", [x])?;
                        match fate(x) {
                            Fate::Commits => {}
                            Fate::Fails => {
                                c.execute("INSERT INTO shared (x) VALUES (?1)", [x])?;
                            }
                            Fate::Panics => panic!("job {x} panics"),
                        }
                        Ok(())
                    };
                    let answer = if x % 2 == 0 {
                        store.run(work).await
                    } else {
                        store.run_relaxed(work).await
                    };
                    (x, answer)
                })
            })
            .collect();
        let mut answered_ok = Vec::new();
        for job in jobs {
            let (x, answer) = job.await.unwrap();
            match fate(x) {
                Fate::Commits => {}
                Fate::Fails => assert!(matches!(answer, Err(StoreError::Conflict(_))), "{x}"),
                Fate::Panics => assert!(answer.is_err(), "{x}"),
            }
            if answer.is_ok() {
                answered_ok.push(x);
            }
        }
        let stored: Vec<i64> = store
            .run(|c| {
                c.prepare("SELECT x FROM shared ORDER BY x")?
                    .query_map([], |row| row.get(0))?
                    .collect()
            })
            .await
            .unwrap();
        assert_eq!(stored, answered_ok);
        (directory, store)
    }

    #[derive(Clone, Copy)]
    enum Fate {
        Commits,
        Fails,
        Panics,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_job_loses_only_its_own_changes() {
        let (_directory, store) = answered_ok_iff_stored(|x| {
            if x % 3 == 0 {
                Fate::Fails
            } else {
                Fate::Commits
            }
        })
        .await;
        // Every job but the failing ones committed.
        let count: i64 = store
            .run(|c| c.query_row("SELECT COUNT(*) FROM shared", [], |row| row.get(0)))
            .await
            .unwrap();
        assert_eq!(count, 200);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_job_fails_its_batch_and_the_writer_goes_on() {
        let (_directory, store) = answered_ok_iff_stored(|x| {
            if x % 50 == 7 {
                Fate::Panics
            } else {
                Fate::Commits
            }
        })
        .await;
        store
            .run(|c| c.execute("INSERT INTO shared (x) VALUES (1000)", []))
            .await
            .unwrap();
    }

    /// A relaxed job queued beside a durable one commits without the fsync (`synchronous`
    /// NORMAL, 1) in a transaction of its own; the durable one with it (FULL, 2).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relaxed_jobs_never_share_a_durable_commit() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let holding = tokio::spawn({
            let store = store.clone();
            async move { store.run(move |_| Ok(held.recv().ok())).await }
        });
        let level = |c: &mut Connection| c.query_row("PRAGMA synchronous", [], |row| row.get(0));
        // Both queue behind the held job, so the writer takes them in one batch.
        let durable = tokio::spawn({
            let store = store.clone();
            async move { store.run(level).await }
        });
        let relaxed = tokio::spawn({
            let store = store.clone();
            async move { store.run_relaxed(level).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        release.send(()).unwrap();
        holding.await.unwrap().unwrap();
        let durable: i64 = durable.await.unwrap().unwrap();
        let relaxed: i64 = relaxed.await.unwrap().unwrap();
        assert_eq!((relaxed, durable), (1, 2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoints_and_vacuum_run_between_batches() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        store
            .run(|c| c.execute_batch("CREATE TABLE t (x INTEGER)"))
            .await
            .unwrap();
        let writes: Vec<_> = (0..100_i64)
            .map(|x| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .run(move |c| c.execute("INSERT INTO t (x) VALUES (?1)", [x]))
                        .await
                })
            })
            .collect();
        let copy = directory.path().join("copy.db");
        let target = copy.display().to_string();
        store
            .run_alone(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)"))
            .await
            .unwrap();
        store
            .run_alone(move |c| c.execute("VACUUM INTO ?1", [target]))
            .await
            .unwrap();
        for write in writes {
            write.await.unwrap().unwrap();
        }
        let copied: i64 = Connection::open(&copy)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM t", [], |row| row.get(0))
            .unwrap();
        assert!((0..=100).contains(&copied));
        // Inside a shared transaction, SQLite refuses the checkpoint.
        assert!(
            store
                .run(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)"))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_write_that_cannot_begin_is_refused_and_nothing_of_it_stays() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        store
            .run_alone(|c| c.execute_batch("CREATE TABLE t (x INTEGER); PRAGMA busy_timeout = 50;"))
            .await
            .unwrap();
        // Another process holds the write lock.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let refused = store
            .run(|c| c.execute("INSERT INTO t (x) VALUES (1)", []))
            .await;
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{refused:?}"
        );
        other.execute_batch("ROLLBACK").unwrap();
        store
            .run(|c| c.execute("INSERT INTO t (x) VALUES (2)", []))
            .await
            .unwrap();
        let stored: Vec<i64> = store
            .run(|c| {
                c.prepare("SELECT x FROM t")?
                    .query_map([], |row| row.get(0))?
                    .collect()
            })
            .await
            .unwrap();
        assert_eq!(stored, [2]);
    }

    #[tokio::test]
    async fn a_full_disk_refuses_writes_as_unavailable_and_keeps_what_was_stored() {
        use crate::Directory as _;
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        let zone = |id: String| NewZone {
            name: format!("zone {id}"),
            slug: id.clone(),
            id,
        };
        // The file may not grow past its present size: the engine answers as a full disk does.
        store
            .run_alone(|c| c.query_row("PRAGMA max_page_count = 1", [], |row| row.get::<_, i64>(0)))
            .await
            .unwrap();
        let mut created = Vec::new();
        let refused = loop {
            let id = format!("z{}", created.len());
            match store.create_zone(&zone(id.clone()), &[]).await {
                Ok(_) => created.push(id),
                Err(error) => break error,
            }
            assert!(created.len() < 10_000, "the page limit never took effect");
        };
        assert!(
            matches!(refused, StoreError::Unavailable(ref message) if message.contains("full")),
            "{refused:?}"
        );
        let refused_id = format!("z{}", created.len());
        assert!(store.get_zone(&refused_id).await.unwrap().is_none());
        // Room again: what was stored before is intact and the refused write goes through.
        store
            .run_alone(|c| {
                c.query_row("PRAGMA max_page_count = 1073741823", [], |row| {
                    row.get::<_, i64>(0)
                })
            })
            .await
            .unwrap();
        for id in &created {
            assert_eq!(
                store.get_zone(id).await.unwrap().unwrap().name,
                format!("zone {id}")
            );
        }
        store
            .create_zone(&zone(refused_id.clone()), &[])
            .await
            .unwrap();
        assert!(store.get_zone(&refused_id).await.unwrap().is_some());
    }

    #[test]
    fn conditions_of_the_file_or_disk_are_unavailable_and_a_bad_statement_is_not() {
        let failure = |code: i32| {
            store_error(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        for code in [
            rusqlite::ffi::SQLITE_BUSY,
            rusqlite::ffi::SQLITE_LOCKED,
            rusqlite::ffi::SQLITE_FULL,
            rusqlite::ffi::SQLITE_READONLY,
            rusqlite::ffi::SQLITE_IOERR,
            rusqlite::ffi::SQLITE_CANTOPEN,
            rusqlite::ffi::SQLITE_PROTOCOL,
            rusqlite::ffi::SQLITE_NOMEM,
        ] {
            assert!(
                matches!(failure(code), StoreError::Unavailable(_)),
                "{code}"
            );
        }
        assert!(matches!(
            failure(rusqlite::ffi::SQLITE_ERROR),
            StoreError::Query(_)
        ));
        assert!(matches!(failure(2067), StoreError::Conflict(_)));
    }

    #[tokio::test]
    async fn a_remembered_directory_row_is_forgotten_by_every_change_to_a_directory_table() {
        use crate::Directory as _;
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        let zone = |id: &str| NewZone {
            id: id.into(),
            name: "first".into(),
            slug: id.into(),
        };
        store.create_zone(&zone("z1"), &[]).await.unwrap();
        let name = || async {
            store
                .get_zone("z1")
                .await
                .unwrap()
                .map(|zone| zone.name)
                .unwrap()
        };
        assert_eq!(name().await, "first");
        // Every way the writer changes a directory table forgets what was remembered (the
        // writer's own commits do not move its data version: only the update hook tells).
        store
            .update_zone("z1", "updated", "z1", false, None, &[])
            .await
            .unwrap();
        assert_eq!(name().await, "updated");
        store
            .run_blocking(|c| {
                c.execute(
                    "UPDATE zones SET name = 'by run_blocking' WHERE id = 'z1'",
                    [],
                )
            })
            .unwrap();
        assert_eq!(name().await, "by run_blocking");
        store
            .run_relaxed(|c| {
                c.execute(
                    "UPDATE zones SET name = 'by run_relaxed' WHERE id = 'z1'",
                    [],
                )
            })
            .await
            .unwrap();
        assert_eq!(name().await, "by run_relaxed");
        store
            .run_alone(|c| c.execute("UPDATE zones SET name = 'by run_alone' WHERE id = 'z1'", []))
            .await
            .unwrap();
        assert_eq!(name().await, "by run_alone");
        store
            .run(|c| c.execute("UPDATE zones SET name = 'by run' WHERE id = 'z1'", []))
            .await
            .unwrap();
        assert_eq!(name().await, "by run");

        // Another process's commit (a tool beside the server, a hand edit) is noticed by the
        // idle writer within its poll.
        Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE zones SET name = 'by another process' WHERE id = 'z1'",
                [],
            )
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while name().await != "by another process" {
            assert!(
                std::time::Instant::now() < deadline,
                "another process's change was never noticed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn dropping_the_store_closes_its_writer() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("store.db");
        let store = SqliteStore::open(&path).unwrap();
        store
            .run(|c| c.execute_batch("CREATE TABLE t (x INTEGER)"))
            .await
            .unwrap();
        drop(store);
        // The last connection closed checkpoints the WAL away.
        assert!(!directory.path().join("store.db-wal").exists());
    }

    #[tokio::test]
    async fn ping_answers() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        store.ping().await.unwrap();
    }

    /// SQLite plans with a bare `LIMIT ?n`'s value, so rebinding it expires the statement and
    /// every run parses and plans it again (the outbox claim, every 25 ms, did). A cast hides
    /// the value from the planner; the statement then stays prepared.
    #[test]
    fn a_cast_limit_keeps_its_statement_prepared_where_a_bare_one_does_not() {
        let connection = Connection::open_in_memory().unwrap();
        connection
            .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .unwrap();
        let reprepares = |sql: &str| {
            for limit in [10, 10, 20] {
                let mut statement = connection.prepare_cached(sql).unwrap();
                statement.query([limit]).unwrap().next().unwrap();
            }
            let statement = connection.prepare_cached(sql).unwrap();
            statement.get_status(rusqlite::StatementStatus::RePrepare)
        };
        assert_eq!(reprepares("SELECT id FROM t ORDER BY id LIMIT ?1"), 3);
        assert_eq!(
            reprepares("SELECT id FROM t ORDER BY id LIMIT CAST(?1 AS BIGINT)"),
            0
        );
    }

    /// The retention cut of authority records searches by (status, expiry), not a scan of
    /// every record: migration 18 dropped the index on expiry alone.
    #[test]
    fn the_authority_retention_cut_searches_the_status_expiry_index() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        let sql = sqlite_sql(crate::queries::runtime::PURGE_AUTHORITY_RECORDS);
        let plan: Vec<String> = store
            .run_blocking(|connection| {
                let mut explain = connection.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                explain
                    .query_map([0, 10], |row| row.get::<_, String>(3))?
                    .collect()
            })
            .unwrap();
        assert!(
            plan.iter().any(
                |step| step.starts_with("SEARCH r USING INDEX authority_records_status_expiry")
            ),
            "{plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step.starts_with("SCAN r")),
            "{plan:?}"
        );
    }

    /// Every source of the store and the bus, so every query text they run: none binds a
    /// bare limit.
    #[test]
    fn no_query_binds_a_bare_limit() {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut pending = vec![manifest.join("src"), manifest.join("../bus/src")];
        let mut files = Vec::new();
        while let Some(source) = pending.pop() {
            for entry in std::fs::read_dir(&source).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else if path.extension().is_some_and(|extension| extension == "rs") {
                    files.push(path);
                }
            }
        }
        let bare = |text: &str| {
            text.match_indices("LIMIT ").any(|(at, _)| {
                let after = &text[at + "LIMIT ".len()..];
                after.starts_with('$') || after.starts_with('?')
            })
        };
        assert!(bare("SELECT 1 LIMIT $2") && !bare("SELECT 1 LIMIT CAST($2 AS BIGINT)"));
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            // Up to the file's tests, which show bare limits on purpose.
            let text = text.split("#[cfg(test)]").next().unwrap_or_default();
            assert!(!bare(text), "{} binds a bare LIMIT", file.display());
        }
        assert!(files.len() > 10, "the sources moved: {files:?}");
    }
}
