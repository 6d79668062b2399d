//! PostgreSQL: the production system of record, shared by every replica. A pool of connections
//! with a statement timeout; broken connections are replaced on the next checkout, so the store
//! recovers from a database restart without a process restart.

use std::time::Duration;

use caracal_crypto::TokenDigest;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

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
             created_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );
         CREATE TABLE admin_tokens (
             id TEXT PRIMARY KEY,
             name TEXT NOT NULL,
             token_sha256 TEXT NOT NULL UNIQUE,
             scope TEXT NOT NULL CHECK (scope IN ('global', 'zone')),
             zone_id TEXT,
             capabilities TEXT NOT NULL,
             created_by TEXT NOT NULL,
             created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             last_used_at TIMESTAMPTZ,
             revoked_at TIMESTAMPTZ,
             CHECK ((scope = 'global') = (zone_id IS NULL))
         );",
    ),
    (
        "zones, outbox and leases",
        "CREATE TABLE zones (
             id TEXT PRIMARY KEY,
             name TEXT NOT NULL,
             slug TEXT NOT NULL UNIQUE,
             created_at_ms BIGINT NOT NULL
         );
         CREATE TABLE outbox (
             id BIGSERIAL PRIMARY KEY,
             stream TEXT NOT NULL,
             fields TEXT NOT NULL,
             dedupe_key TEXT,
             status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'published', 'dead')),
             attempts INTEGER NOT NULL DEFAULT 0,
             available_at_ms BIGINT NOT NULL,
             locked_by TEXT,
             locked_until_ms BIGINT,
             last_error TEXT,
             created_at_ms BIGINT NOT NULL,
             published_at_ms BIGINT
         );
         CREATE INDEX outbox_publishable ON outbox (status, available_at_ms);
         CREATE TABLE leases (
             name TEXT PRIMARY KEY,
             holder TEXT NOT NULL,
             expires_ms BIGINT NOT NULL
         );",
    ),
];

/// The schema version this binary writes and understands.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

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
        Some(db) => StoreError::Query(db.message().to_owned()),
        None => StoreError::Unavailable(error_chain(&error)),
    }
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
    /// Connects, refuses a schema newer than [`SCHEMA_VERSION`], and applies pending migrations.
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
    if applied > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: applied,
            supported: SCHEMA_VERSION,
        });
    }
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version BIGINT PRIMARY KEY,
                 name TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(pg_error)?;
    for (index, (name, sql)) in MIGRATIONS.iter().enumerate() {
        let version = index as i64 + 1;
        if version <= applied {
            continue;
        }
        transaction.batch_execute(sql).await.map_err(pg_error)?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&version, name],
            )
            .await
            .map_err(pg_error)?;
    }
    transaction.commit().await.map_err(pg_error)
}

fn zone_from_row(row: &tokio_postgres::Row) -> Zone {
    Zone {
        id: row.get(0),
        name: row.get(1),
        slug: row.get(2),
        created_at_ms: row.get(3),
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute("SELECT 1", &[])
            .await
            .map_err(pg_error)
            .map(|_| ())
    }

    async fn deployment_kek(&self) -> Result<Option<KekRecord>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT kek_id, kek_check FROM deployment", &[])
            .await
            .map_err(pg_error)?;
        Ok(row.map(|row| KekRecord {
            kek_id: row.get(0),
            kek_check: row.get(1),
        }))
    }

    async fn record_deployment_kek(&self, record: &KekRecord) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO deployment (singleton, kek_id, kek_check) VALUES (1, $1, $2)",
                &[&record.kek_id, &record.kek_check],
            )
            .await
            .map_err(pg_error)
            .map(|_| ())
    }

    async fn insert_admin_token(&self, token: &NewAdminToken) -> Result<(), StoreError> {
        let (scope, zone_id) = match &token.scope {
            TokenScope::Global => ("global", None),
            TokenScope::Zone(zone_id) => ("zone", Some(zone_id.as_str())),
        };
        self.client()
            .await?
            .execute(
                "INSERT INTO admin_tokens (id, name, token_sha256, scope, zone_id, capabilities, created_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &token.id,
                    &token.name,
                    &token.digest.as_str(),
                    &scope,
                    &zone_id,
                    &token.capabilities,
                    &token.created_by,
                ],
            )
            .await
            .map_err(pg_error)
            .map(|_| ())
    }

    async fn has_active_token_by(&self, created_by: &str) -> Result<bool, StoreError> {
        Ok(self
            .client()
            .await?
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM admin_tokens WHERE created_by = $1 AND revoked_at IS NULL)",
                &[&created_by],
            )
            .await
            .map_err(pg_error)?
            .get(0))
    }

    async fn find_admin_token(
        &self,
        digest: &TokenDigest,
    ) -> Result<Option<AdminTokenRecord>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id, name, zone_id, capabilities, created_by, revoked_at IS NOT NULL
                 FROM admin_tokens WHERE token_sha256 = $1",
                &[&digest.as_str()],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.map(|row| {
            let zone_id: Option<String> = row.get(2);
            AdminTokenRecord {
                id: row.get(0),
                name: row.get(1),
                scope: zone_id.map_or(TokenScope::Global, TokenScope::Zone),
                capabilities: row.get(3),
                created_by: row.get(4),
                revoked: row.get(5),
            }
        }))
    }

    async fn create_zone(
        &self,
        zone: &NewZone,
        outbox: &[OutboxMessage],
    ) -> Result<Zone, StoreError> {
        let mut client = self.client().await?;
        let transaction = client.transaction().await.map_err(pg_error)?;
        let now = now_ms();
        transaction
            .execute(
                "INSERT INTO zones (id, name, slug, created_at_ms) VALUES ($1, $2, $3, $4)",
                &[&zone.id, &zone.name, &zone.slug, &now],
            )
            .await
            .map_err(pg_error)?;
        for message in outbox {
            transaction
                .execute(
                    "INSERT INTO outbox (stream, fields, dedupe_key, available_at_ms, created_at_ms)
                     VALUES ($1, $2, $3, $4, $4)",
                    &[&message.stream, &fields_to_json(&message.fields), &message.dedupe_key, &now],
                )
                .await
                .map_err(pg_error)?;
        }
        transaction.commit().await.map_err(pg_error)?;
        Ok(Zone {
            id: zone.id.clone(),
            name: zone.name.clone(),
            slug: zone.slug.clone(),
            created_at_ms: now,
        })
    }

    async fn get_zone(&self, zone_id: &str) -> Result<Option<Zone>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id, name, slug, created_at_ms FROM zones WHERE id = $1",
                &[&zone_id],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.as_ref().map(zone_from_row))
    }

    async fn list_zones(&self) -> Result<Vec<Zone>, StoreError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, name, slug, created_at_ms FROM zones ORDER BY created_at_ms, id",
                &[],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows.iter().map(zone_from_row).collect())
    }

    async fn claim_outbox(
        &self,
        worker: &str,
        batch: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let now = now_ms();
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        let rows = self
            .client()
            .await?
            .query(
                "UPDATE outbox SET locked_by = $1, locked_until_ms = $2
                 WHERE id IN (
                     SELECT id FROM outbox
                     WHERE status = 'pending' AND available_at_ms <= $3
                       AND (locked_until_ms IS NULL OR locked_until_ms <= $3)
                     ORDER BY id LIMIT $4
                     FOR UPDATE SKIP LOCKED)
                 RETURNING id, stream, fields, dedupe_key, attempts",
                &[&worker, &now.saturating_add(millis(lease)), &now, &limit],
            )
            .await
            .map_err(pg_error)?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                let fields: String = row.get(2);
                let attempts: i32 = row.get(4);
                Ok(OutboxRow {
                    id: row.get(0),
                    stream: row.get(1),
                    fields: fields_from_json(&fields)?,
                    dedupe_key: row.get(3),
                    attempts: u32::try_from(attempts).unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        claimed.sort_by_key(|row| row.id);
        Ok(claimed)
    }

    async fn outbox_published(&self, ids: &[i64]) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "UPDATE outbox SET status = 'published', published_at_ms = $2, locked_by = NULL,
                     locked_until_ms = NULL
                 WHERE id = ANY($1)",
                &[&ids, &now_ms()],
            )
            .await
            .map_err(pg_error)
            .map(|_| ())
    }

    async fn outbox_failed(
        &self,
        id: i64,
        error: &str,
        retry_in: Duration,
        max_attempts: u32,
    ) -> Result<OutboxFailure, StoreError> {
        let max_attempts = i32::try_from(max_attempts).unwrap_or(i32::MAX);
        let row = self
            .client()
            .await?
            .query_one(
                "UPDATE outbox SET attempts = attempts + 1, last_error = $2, locked_by = NULL,
                     locked_until_ms = NULL, available_at_ms = $3,
                     status = CASE WHEN attempts + 1 >= $4 THEN 'dead' ELSE 'pending' END
                 WHERE id = $1 RETURNING status",
                &[
                    &id,
                    &error,
                    &now_ms().saturating_add(millis(retry_in)),
                    &max_attempts,
                ],
            )
            .await
            .map_err(pg_error)?;
        let status: String = row.get(0);
        Ok(if status == "dead" {
            OutboxFailure::Dead
        } else {
            OutboxFailure::Retrying
        })
    }

    async fn outbox_stats(&self) -> Result<OutboxStats, StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT COUNT(*) FILTER (WHERE status = 'pending'),
                        COUNT(*) FILTER (WHERE status = 'dead'),
                        MIN(created_at_ms) FILTER (WHERE status = 'pending')
                 FROM outbox WHERE status <> 'published'",
                &[],
            )
            .await
            .map_err(pg_error)?;
        let (pending, dead, oldest): (i64, i64, Option<i64>) = (row.get(0), row.get(1), row.get(2));
        Ok(OutboxStats {
            pending: u64::try_from(pending).unwrap_or(0),
            dead: u64::try_from(dead).unwrap_or(0),
            oldest_pending_age: oldest.map(|created| age(now_ms(), created)),
        })
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let now = now_ms();
        let changed = self
            .client()
            .await?
            .execute(
                "INSERT INTO leases (name, holder, expires_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms
                 WHERE leases.holder = excluded.holder OR leases.expires_ms <= $4",
                &[&name, &holder, &now.saturating_add(millis(ttl)), &now],
            )
            .await
            .map_err(pg_error)?;
        Ok(changed == 1)
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "DELETE FROM leases WHERE name = $1 AND holder = $2",
                &[&name, &holder],
            )
            .await
            .map_err(pg_error)
            .map(|_| ())
    }
}
