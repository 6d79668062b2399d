//! PostgreSQL: the production system of record, shared by every replica. A pool of connections
//! with a statement timeout; broken connections are replaced on the next checkout, so the store
//! recovers from a database restart without a process restart.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use crate::db::{Db, Dialect, Outcome, Row, Statement, Then, Value};
use crate::store::{StoreError, millis, now_ms};

/// Migrations in order; entry `i` brings the schema to version `i + 1`. Never edit a released
/// entry: add a new one.
fn migrations() -> Vec<(&'static str, String)> {
    let common = include_str!("schema/common.sql")
        .replace("{BIGINT}", "BIGINT")
        .replace("{SERIAL}", "BIGSERIAL PRIMARY KEY");
    vec![
        (
            "initial schema",
            format!("{common}\n{}", include_str!("schema/postgres.sql")),
        ),
        (
            "audit tamper findings",
            include_str!("schema/0002_audit_findings.sql").replace("{BIGINT}", "BIGINT"),
        ),
        (
            "audit checkpoints",
            include_str!("schema/0003_audit_checkpoints.sql").replace("{BIGINT}", "BIGINT"),
        ),
        (
            "audit chain keys",
            include_str!("schema/0004_audit_chain_keys.sql").replace("{BIGINT}", "BIGINT"),
        ),
        (
            "audit retention cuts",
            include_str!("schema/0005_audit_cuts.sql").replace("{BIGINT}", "BIGINT"),
        ),
        (
            "audit chain hashes as bytes",
            include_str!("schema/0006_audit_binary_hashes.postgres.sql").to_owned(),
        ),
        (
            "admin api",
            include_str!("schema/0007_admin_api.sql").replace("{BIGINT}", "BIGINT"),
        ),
        (
            "outbox dedupe index",
            include_str!("schema/0008_outbox_dedupe_index.sql").to_owned(),
        ),
        (
            "policy loads",
            include_str!("schema/0009_policy_loads.sql").replace("{BIGINT}", "BIGINT"),
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
            include_str!("schema/0013_containment.sql").replace("{BIGINT}", "BIGINT"),
        ),
        (
            "admin objects",
            include_str!("schema/0014_admin_objects.sql").replace("{BIGINT}", "BIGINT"),
        ),
        (
            "console users",
            include_str!("schema/0015_console_users.sql").replace("{BIGINT}", "BIGINT"),
        ),
        (
            "console sessions",
            include_str!("schema/0016_console_sessions.sql").replace("{BIGINT}", "BIGINT"),
        ),
        (
            "replay memory",
            include_str!("schema/0017_replay_memory.sql").replace("{BIGINT}", "BIGINT"),
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
            include_str!("schema/0020_deployment_settings.sql").replace("{BIGINT}", "BIGINT"),
        ),
        (
            "notification sinks",
            include_str!("schema/0021_notifications.sql").replace("{BIGINT}", "BIGINT"),
        ),
        (
            "zone dynamic client registration",
            include_str!("schema/0022_zone_dcr.sql").replace("{BIGINT}", "BIGINT"),
        ),
    ]
}

/// The schema version this binary writes and understands.
pub fn schema_version() -> i64 {
    migrations().len() as i64
}

/// Serialises concurrent migrations from several replicas starting at once.
const MIGRATION_LOCK: i64 = 0x6361_7261_6361_6c00;

#[derive(Debug, Clone)]
pub struct PgOptions {
    pub pool_size: usize,
    /// Any statement running longer is cancelled (and the caller fails closed).
    pub statement_timeout: Duration,
    /// Bound on connecting and on waiting for a pooled connection.
    pub connect_timeout: Duration,
    /// Tables live in this schema (created if missing) instead of the default search path.
    pub schema: Option<String>,
}

impl Default for PgOptions {
    fn default() -> PgOptions {
        PgOptions {
            pool_size: 16,
            statement_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            schema: None,
        }
    }
}

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

fn pg_error(error: tokio_postgres::Error) -> StoreError {
    match error.as_db_error() {
        Some(db) if *db.code() == SqlState::UNIQUE_VIOLATION => {
            StoreError::Conflict(db.message().to_owned())
        }
        Some(db) if *db.code() == SqlState::QUERY_CANCELED => {
            StoreError::Unavailable(format!("statement timed out: {}", db.message()))
        }
        Some(db) if is_transient(db.code()) => {
            StoreError::Unavailable(format!("{} ({})", db.message(), db.code().code()))
        }
        Some(db) => StoreError::Query(db.message().to_owned()),
        None => StoreError::Unavailable(error_chain(&error)),
    }
}

/// A condition of the server rather than of the statement, which the same work may clear on a
/// retry: a lost connection, a full disk or another exhausted resource, a shutdown or restart,
/// an I/O failure, a read-only server (a standby after a failover), or a concurrency abort
/// (serialization failure, deadlock, lock timeout). Callers fail closed and retry; an audit
/// ingestor keeps the entries instead of dead-lettering them as refused.
fn is_transient(code: &SqlState) -> bool {
    let code = code.code();
    matches!(code.get(..2), Some("08" | "53" | "57" | "58"))
        || matches!(code, "40001" | "40P01" | "55P03" | "25006")
}

fn pool_error(error: deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Backend(error) => pg_error(error),
        other => StoreError::Unavailable(error_chain(&other)),
    }
}

/// An error and its causes, `outer: inner: innermost`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn is_identifier(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_')
}

impl PgStore {
    /// Connects, refuses a schema newer than [`schema_version`], and applies pending migrations.
    pub async fn connect(url: &str, options: &PgOptions) -> Result<PgStore, StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: crate::redact_url(url),
            message,
        };
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|error: tokio_postgres::Error| open_error(error.to_string()))?;
        let mut server_options =
            format!("-c statement_timeout={}", millis(options.statement_timeout));
        if let Some(schema) = &options.schema {
            if !is_identifier(schema) {
                return Err(open_error(format!(
                    "schema `{schema}` must be lower-case letters, digits and _"
                )));
            }
            server_options.push_str(&format!(" -c search_path={schema}"));
        }
        config.options(&server_options);
        config.connect_timeout(options.connect_timeout);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|error| open_error(error.to_string()))?;
        let store = PgStore { pool };
        let mut client = store.pool.get().await.map_err(|error| match error {
            deadpool_postgres::PoolError::Backend(error) => open_error(error_chain(&error)),
            other => open_error(error_chain(&other)),
        })?;
        if let Some(schema) = &options.schema {
            client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .await
                .map_err(pg_error)?;
        }
        migrate(&mut client).await?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pool_error)
    }
}

async fn migrate(client: &mut deadpool_postgres::Object) -> Result<(), StoreError> {
    let transaction = client.transaction().await.map_err(pg_error)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_error)?;
    let tracked: bool = transaction
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .map_err(pg_error)?
        .get(0);
    let applied: i64 = if tracked {
        transaction
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .await
            .map_err(pg_error)?
            .get(0)
    } else {
        0
    };
    if applied > schema_version() {
        return Err(StoreError::SchemaTooNew {
            found: applied,
            supported: schema_version(),
        });
    }
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version BIGINT PRIMARY KEY,
                 name TEXT NOT NULL,
                 applied_at_ms BIGINT NOT NULL
             )",
        )
        .await
        .map_err(pg_error)?;
    for (index, (name, sql)) in migrations().iter().enumerate() {
        let version = index as i64 + 1;
        if version <= applied {
            continue;
        }
        transaction.batch_execute(sql).await.map_err(pg_error)?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES ($1, $2, $3)",
                &[&version, name, &now_ms()],
            )
            .await
            .map_err(pg_error)?;
    }
    transaction.commit().await.map_err(pg_error)
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Text(text) => text.as_str().to_sql(ty, out),
            Value::Bytes(bytes) => bytes.as_slice().to_sql(ty, out),
            Value::Int(number) => match *ty {
                Type::INT8 => number.to_sql(ty, out),
                Type::INT4 => i32::try_from(*number)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*number)?.to_sql(ty, out),
                Type::BOOL => (*number != 0).to_sql(ty, out),
                _ => number.to_string().as_str().to_sql(ty, out),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn read_row(row: &tokio_postgres::Row) -> Result<Row, StoreError> {
    let corrupt = |error: tokio_postgres::Error| StoreError::Corrupt(error.to_string());
    let mut values = Vec::with_capacity(row.len());
    for (index, column) in row.columns().iter().enumerate() {
        let value = match *column.type_() {
            Type::INT8 => row
                .try_get::<_, Option<i64>>(index)
                .map_err(corrupt)?
                .map(Value::Int),
            Type::INT4 => row
                .try_get::<_, Option<i32>>(index)
                .map_err(corrupt)?
                .map(|n| Value::Int(i64::from(n))),
            Type::INT2 => row
                .try_get::<_, Option<i16>>(index)
                .map_err(corrupt)?
                .map(|n| Value::Int(i64::from(n))),
            Type::BOOL => row
                .try_get::<_, Option<bool>>(index)
                .map_err(corrupt)?
                .map(|b| Value::Int(i64::from(b))),
            Type::BYTEA => row
                .try_get::<_, Option<Vec<u8>>>(index)
                .map_err(corrupt)?
                .map(Value::Bytes),
            _ => row
                .try_get::<_, Option<String>>(index)
                .map_err(corrupt)?
                .map(Value::Text),
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

async fn run_statement(
    transaction: &deadpool_postgres::Transaction<'_>,
    statement: &Statement,
) -> Result<Outcome, StoreError> {
    let prepared = transaction
        .prepare_cached(statement.sql)
        .await
        .map_err(pg_error)?;
    let params: Vec<&(dyn ToSql + Sync)> = statement
        .params
        .iter()
        .map(|value| value as &(dyn ToSql + Sync))
        .collect();
    let mut outcome = Outcome::default();
    if prepared.columns().is_empty() {
        outcome.changed = transaction
            .execute(&prepared, &params)
            .await
            .map_err(pg_error)?;
    } else {
        let rows = transaction
            .query(&prepared, &params)
            .await
            .map_err(pg_error)?;
        outcome.rows = rows.iter().map(read_row).collect::<Result<_, _>>()?;
        outcome.changed = outcome.rows.len() as u64;
    }
    if let (Some(error), 0) = (statement.must_change, outcome.changed) {
        return Err(error());
    }
    Ok(outcome)
}

#[async_trait::async_trait]
impl Db for PgStore {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn pool_in_use_ratio(&self) -> Option<f64> {
        let status = self.pool.status();
        let in_use = status.size.saturating_sub(status.available);
        (status.max_size > 0).then(|| in_use as f64 / status.max_size as f64)
    }

    async fn atomic_with(
        &self,
        first: Vec<Statement>,
        then: Then,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error)?;
        let mut outcomes = Vec::with_capacity(first.len());
        for statement in &first {
            outcomes.push(run_statement(&transaction, statement).await?);
        }
        for statement in &then(&outcomes)? {
            outcomes.push(run_statement(&transaction, statement).await?);
        }
        // Returning early above drops the transaction, which rolls it back.
        transaction.commit().await.map_err(pg_error)?;
        Ok(outcomes)
    }
}
