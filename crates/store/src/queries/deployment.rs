//! Deployment-wide records: the KEK record and admin tokens.

use caracal_crypto::TokenDigest;

use crate::db::{Db, Row, Statement, params};
use crate::model::{
    AdminTokenRecord, ConsoleSession, ConsoleUser, Containment, DeploymentSetting, KekRecord,
    NewAdminToken, OutboxMessage, TokenScope,
};
use crate::store::{StoreError, enqueue, not_found, now_ms, with_outbox};

#[async_trait::async_trait]
pub trait Deployment: Send + Sync {
    /// A round trip to the database: the readiness probe.
    async fn ping(&self) -> Result<(), StoreError>;
    /// The share of pooled connections in use (PostgreSQL); `None` without a pool.
    fn pool_usage(&self) -> Option<f64>;

    /// The containment switches in force.
    async fn list_containment(&self) -> Result<Vec<Containment>, StoreError>;
    /// A run-time setting, if an operator set it.
    async fn get_setting(&self, name: &str) -> Result<Option<DeploymentSetting>, StoreError>;
    /// Sets (or replaces) a run-time setting with `outbox` in the same transaction.
    async fn put_setting(
        &self,
        setting: &DeploymentSetting,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Turns a switch on (or renews its reason) with `outbox` in the same transaction.
    async fn set_containment(
        &self,
        containment: &Containment,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Turns a switch off; one that was off is [`StoreError::NotFound`].
    async fn clear_containment(
        &self,
        kind: &str,
        zone_id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;

    async fn deployment_kek(&self) -> Result<Option<KekRecord>, StoreError>;
    /// Records the deployment's KEK; a second record is a [`StoreError::Conflict`].
    async fn record_deployment_kek(&self, record: &KekRecord) -> Result<(), StoreError>;

    /// Stores a token and enqueues `outbox` in the same transaction.
    async fn insert_admin_token(
        &self,
        token: &NewAdminToken,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Creates the account with its admin token in one transaction; a taken email is a
    /// [`StoreError::Conflict`] and creates neither.
    async fn create_console_user(
        &self,
        user: &ConsoleUser,
        token: &NewAdminToken,
    ) -> Result<(), StoreError>;
    async fn console_user(&self, email: &str) -> Result<Option<ConsoleUser>, StoreError>;
    /// Stores a new console session, and in the same transaction deletes every session last
    /// seen before `seen_before` or created before `created_before` (expired ones).
    async fn start_console_session(
        &self,
        session: &ConsoleSession,
        seen_before: i64,
        created_before: i64,
    ) -> Result<(), StoreError>;
    async fn console_session(&self, id_sha256: &str) -> Result<Option<ConsoleSession>, StoreError>;
    /// Records that the session was seen at `seen_at_ms`. Not necessarily on disk when it
    /// returns: a crash loses at most the refresh, so the session only expires sooner.
    async fn touch_console_session(
        &self,
        id_sha256: &str,
        seen_at_ms: i64,
    ) -> Result<(), StoreError>;
    /// Deletes the session; one that was gone is not an error.
    async fn end_console_session(&self, id_sha256: &str) -> Result<(), StoreError>;
    /// Whether an unrevoked token created by `created_by` exists.
    async fn has_active_token_by(&self, created_by: &str) -> Result<bool, StoreError>;
    async fn find_admin_token(
        &self,
        digest: &TokenDigest,
    ) -> Result<Option<AdminTokenRecord>, StoreError>;
    /// Revokes a token and enqueues `outbox` in the same transaction; [`StoreError::NotFound`]
    /// (and nothing enqueued) if there is no such unrevoked token.
    async fn revoke_admin_token(
        &self,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Revokes `old_id` (live) and stores `new` in one transaction with `outbox`: at no moment
    /// are both valid or neither.
    async fn rotate_admin_token(
        &self,
        old_id: &str,
        new: &NewAdminToken,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Every token, revoked ones included, oldest first.
    async fn list_admin_tokens(&self) -> Result<Vec<AdminTokenRecord>, StoreError>;
}

fn admin_token_insert(token: &NewAdminToken) -> Statement {
    let (scope, zone_id) = match &token.scope {
        TokenScope::Global => ("global", None),
        TokenScope::Zone(zone_id) => ("zone", Some(zone_id.clone())),
    };
    Statement::new(
        "INSERT INTO admin_tokens
                 (id, name, token_sha256, scope, zone_id, capabilities, created_by, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        params![
            token.id.as_str(),
            token.name.as_str(),
            token.digest.as_str(),
            scope,
            zone_id,
            token.capabilities.as_str(),
            token.created_by.as_str(),
            now_ms(),
        ],
    )
}

fn admin_token(row: &Row) -> Result<AdminTokenRecord, StoreError> {
    Ok(AdminTokenRecord {
        id: row.text(0)?,
        name: row.text(1)?,
        scope: row
            .opt_text(2)?
            .map_or(TokenScope::Global, TokenScope::Zone),
        capabilities: row.text(3)?,
        created_by: row.text(4)?,
        revoked: row.opt_int(5)?.is_some(),
        created_at_ms: row.int(6)?,
    })
}

#[async_trait::async_trait]
impl<D: Db> Deployment for D {
    async fn ping(&self) -> Result<(), StoreError> {
        self.rows("SELECT 1", params![]).await.map(|_| ())
    }

    fn pool_usage(&self) -> Option<f64> {
        self.pool_in_use_ratio()
    }

    async fn list_containment(&self) -> Result<Vec<Containment>, StoreError> {
        let rows = self
            .rows(
                "SELECT kind, zone_id, reason, actor, since_ms FROM containment ORDER BY kind, zone_id",
                params![],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Containment {
                    kind: row.text(0)?,
                    zone_id: row.text(1)?,
                    reason: row.text(2)?,
                    actor: row.text(3)?,
                    since_ms: row.int(4)?,
                })
            })
            .collect()
    }

    async fn get_setting(&self, name: &str) -> Result<Option<DeploymentSetting>, StoreError> {
        let rows = self
            .rows(
                "SELECT name, value, updated_by, updated_at_ms FROM deployment_settings WHERE name = $1",
                params![name],
            )
            .await?;
        rows.first()
            .map(|row| {
                Ok(DeploymentSetting {
                    name: row.text(0)?,
                    value: row.text(1)?,
                    updated_by: row.text(2)?,
                    updated_at_ms: row.int(3)?,
                })
            })
            .transpose()
    }

    async fn put_setting(
        &self,
        s: &DeploymentSetting,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let upsert = Statement::new(
            "INSERT INTO deployment_settings (name, value, updated_by, updated_at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_by = excluded.updated_by,
                 updated_at_ms = excluded.updated_at_ms",
            params![
                s.name.as_str(),
                s.value.as_str(),
                s.updated_by.as_str(),
                s.updated_at_ms,
            ],
        );
        self.atomic(with_outbox(upsert, outbox)).await.map(|_| ())
    }

    async fn set_containment(
        &self,
        c: &Containment,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let upsert = Statement::new(
            "INSERT INTO containment (kind, zone_id, reason, actor, since_ms) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (kind, zone_id) DO UPDATE SET reason = excluded.reason, actor = excluded.actor",
            params![
                c.kind.as_str(),
                c.zone_id.as_str(),
                c.reason.as_str(),
                c.actor.as_str(),
                c.since_ms,
            ],
        );
        self.atomic(with_outbox(upsert, outbox)).await.map(|_| ())
    }

    async fn clear_containment(
        &self,
        kind: &str,
        zone_id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let delete = Statement::new(
            "DELETE FROM containment WHERE kind = $1 AND zone_id = $2",
            params![kind, zone_id],
        )
        .must_change(not_found);
        self.atomic(with_outbox(delete, outbox)).await.map(|_| ())
    }

    async fn deployment_kek(&self) -> Result<Option<KekRecord>, StoreError> {
        let rows = self
            .rows("SELECT kek_id, kek_check FROM deployment", params![])
            .await?;
        rows.first()
            .map(|row| {
                Ok(KekRecord {
                    kek_id: row.text(0)?,
                    kek_check: row.text(1)?,
                })
            })
            .transpose()
    }

    async fn record_deployment_kek(&self, record: &KekRecord) -> Result<(), StoreError> {
        self.change(
            "INSERT INTO deployment (singleton, kek_id, kek_check, created_at_ms) VALUES (1, $1, $2, $3)",
            params![record.kek_id.as_str(), record.kek_check.as_str(), now_ms()],
        )
        .await
        .map(|_| ())
    }

    async fn insert_admin_token(
        &self,
        token: &NewAdminToken,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let insert = admin_token_insert(token);
        self.atomic(with_outbox(insert, outbox)).await.map(|_| ())
    }

    async fn create_console_user(
        &self,
        user: &ConsoleUser,
        token: &NewAdminToken,
    ) -> Result<(), StoreError> {
        self.atomic(vec![
            Statement::new(
                "INSERT INTO console_users (email, password_hash, token_envelope, token_id, kek_id, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                params![
                    user.email.as_str(),
                    user.password_hash.as_str(),
                    user.token_envelope.as_str(),
                    user.token_id.as_str(),
                    user.kek_id.as_str(),
                    user.created_at_ms,
                ],
            ),
            admin_token_insert(token),
        ])
        .await
        .map(|_| ())
    }

    async fn console_user(&self, email: &str) -> Result<Option<ConsoleUser>, StoreError> {
        crate::store::one(
            self,
            "SELECT email, password_hash, token_envelope, token_id, kek_id, created_at_ms
             FROM console_users WHERE email = $1",
            params![email],
            console_user,
        )
        .await
    }

    async fn start_console_session(
        &self,
        session: &ConsoleSession,
        seen_before: i64,
        created_before: i64,
    ) -> Result<(), StoreError> {
        self.atomic(vec![
            Statement::new(
                "DELETE FROM console_sessions WHERE seen_at_ms < $1 OR created_at_ms < $2",
                params![seen_before, created_before],
            ),
            Statement::new(
                "INSERT INTO console_sessions (id_sha256, token_envelope, csrf, created_at_ms, seen_at_ms)
                 VALUES ($1, $2, $3, $4, $5)",
                params![
                    session.id_sha256.as_str(),
                    session.token_envelope.as_str(),
                    session.csrf.as_str(),
                    session.created_at_ms,
                    session.seen_at_ms,
                ],
            ),
        ])
        .await
        .map(|_| ())
    }

    async fn console_session(&self, id_sha256: &str) -> Result<Option<ConsoleSession>, StoreError> {
        crate::store::one(
            self,
            "SELECT id_sha256, token_envelope, csrf, created_at_ms, seen_at_ms
             FROM console_sessions WHERE id_sha256 = $1",
            params![id_sha256],
            console_session,
        )
        .await
    }

    async fn touch_console_session(
        &self,
        id_sha256: &str,
        seen_at_ms: i64,
    ) -> Result<(), StoreError> {
        self.atomic_unsynced(vec![Statement::new(
            "UPDATE console_sessions SET seen_at_ms = $2 WHERE id_sha256 = $1 AND seen_at_ms < $2",
            params![id_sha256, seen_at_ms],
        )])
        .await
        .map(|_| ())
    }

    async fn end_console_session(&self, id_sha256: &str) -> Result<(), StoreError> {
        self.change(
            "DELETE FROM console_sessions WHERE id_sha256 = $1",
            params![id_sha256],
        )
        .await
        .map(|_| ())
    }

    async fn has_active_token_by(&self, created_by: &str) -> Result<bool, StoreError> {
        let rows = self
            .rows(
                "SELECT id FROM admin_tokens WHERE created_by = $1 AND revoked_at_ms IS NULL LIMIT 1",
                params![created_by],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    async fn find_admin_token(
        &self,
        digest: &TokenDigest,
    ) -> Result<Option<AdminTokenRecord>, StoreError> {
        let rows = self
            .rows(
                "SELECT id, name, zone_id, capabilities, created_by, revoked_at_ms, created_at_ms
                 FROM admin_tokens WHERE token_sha256 = $1",
                params![digest.as_str()],
            )
            .await?;
        rows.first().map(admin_token).transpose()
    }

    async fn list_admin_tokens(&self) -> Result<Vec<AdminTokenRecord>, StoreError> {
        let rows = self
            .rows(
                "SELECT id, name, zone_id, capabilities, created_by, revoked_at_ms, created_at_ms
                 FROM admin_tokens ORDER BY created_at_ms, id",
                params![],
            )
            .await?;
        rows.iter().map(admin_token).collect()
    }

    async fn revoke_admin_token(
        &self,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE admin_tokens SET revoked_at_ms = $2 WHERE id = $1 AND revoked_at_ms IS NULL",
            params![id, now_ms()],
        )
        .must_change(not_found);
        self.atomic(with_outbox(update, outbox)).await.map(|_| ())
    }

    async fn rotate_admin_token(
        &self,
        old_id: &str,
        new: &NewAdminToken,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let revoke = Statement::new(
            "UPDATE admin_tokens SET revoked_at_ms = $2 WHERE id = $1 AND revoked_at_ms IS NULL",
            params![old_id, now_ms()],
        )
        .must_change(not_found);
        let mut statements = vec![revoke, admin_token_insert(new)];
        statements.extend(enqueue(outbox, now_ms()));
        self.atomic(statements).await.map(|_| ())
    }
}

fn console_session(row: &Row) -> Result<ConsoleSession, StoreError> {
    Ok(ConsoleSession {
        id_sha256: row.text(0)?,
        token_envelope: row.text(1)?,
        csrf: row.text(2)?,
        created_at_ms: row.int(3)?,
        seen_at_ms: row.int(4)?,
    })
}

fn console_user(row: &Row) -> Result<ConsoleUser, StoreError> {
    Ok(ConsoleUser {
        email: row.text(0)?,
        password_hash: row.text(1)?,
        token_envelope: row.text(2)?,
        token_id: row.text(3)?,
        kek_id: row.text(4)?,
        created_at_ms: row.int(5)?,
    })
}
