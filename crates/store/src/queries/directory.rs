//! A zone and what is configured in it: applications, providers, resources, provider
//! connections, sealed secrets and signing keys. Every write may carry outbox messages that
//! commit with it.

use crate::db::{Db, Row, Statement, params};
use crate::model::{
    Application, ApplicationChange, NewZone, OutboxMessage, Provider, ProviderConnection, Resource,
    SealedSecret, SigningKey, Zone,
};
use crate::store::{
    StoreError, all, count, first_row, list_from_json, list_to_json, not_found, now_ms, one,
    one_in_directory, with_outbox, zone_limited, zone_lock,
};

/// The row columns of `applications`, for `concat!`.
macro_rules! select_applications {
    () => {
        "SELECT id, zone_id, name, client_secret_hash, traits, registration_method, expires_at_ms, created_at_ms, archived_at_ms FROM applications"
    };
}

/// The insert head of `applications`, for `concat!`; [`application_params`] binds `$1`–`$9`.
macro_rules! insert_application {
    () => {
        "INSERT INTO applications (id, zone_id, name, client_secret_hash, traits, registration_method, expires_at_ms, created_at_ms, archived_at_ms)"
    };
}

fn application_params(app: &Application) -> Vec<crate::db::Value> {
    params![
        app.id.as_str(),
        app.zone_id.as_str(),
        app.name.as_str(),
        app.client_secret_hash.clone(),
        list_to_json(&app.traits),
        app.registration_method.as_str(),
        app.expires_at_ms,
        app.created_at_ms,
        app.archived_at_ms,
    ]
}

/// The row columns of `providers`, for `concat!`.
macro_rules! select_providers {
    () => {
        "SELECT id, zone_id, name, identifier, kind, config, secret_refs, created_at_ms, archived_at_ms FROM providers"
    };
}

/// The row columns of `resources`, for `concat!`.
macro_rules! select_resources {
    () => {
        "SELECT id, zone_id, name, identifier, upstream_url, provider_id, scopes, operations, operation_enforcement, created_at_ms, archived_at_ms FROM resources"
    };
}

/// The row columns of `zones`, for `concat!`.
macro_rules! select_zones {
    () => {
        "SELECT id, name, slug, created_at_ms, archived_at_ms, dcr_enabled FROM zones"
    };
}

#[async_trait::async_trait]
pub trait Directory: Send + Sync {
    /// Creates a zone and enqueues `outbox` in the same transaction. A taken slug is a
    /// [`StoreError::Conflict`] and enqueues nothing.
    async fn create_zone(
        &self,
        zone: &NewZone,
        outbox: &[OutboxMessage],
    ) -> Result<Zone, StoreError>;
    /// Creates a zone together with its first signing key, so its JWKS exists from the start,
    /// accepting dynamic client registration if `dcr_enabled`.
    async fn create_zone_with_key(
        &self,
        zone: &NewZone,
        dcr_enabled: bool,
        key: &SigningKey,
        outbox: &[OutboxMessage],
    ) -> Result<Zone, StoreError>;
    async fn get_zone(&self, zone_id: &str) -> Result<Option<Zone>, StoreError>;
    async fn list_zones(&self) -> Result<Vec<Zone>, StoreError>;
    /// Renames a live zone and sets whether it accepts dynamic client registration; a taken
    /// slug is a [`StoreError::Conflict`], an archived or missing zone [`StoreError::NotFound`].
    /// With `refuse_live_dcr_at`, a zone holding a registered application live at that time is
    /// left as it was ([`StoreError::LimitReached`]): checked after the zone's row is locked,
    /// so no registration commits between the check and the change.
    async fn update_zone(
        &self,
        zone_id: &str,
        name: &str,
        slug: &str,
        dcr_enabled: bool,
        refuse_live_dcr_at: Option<i64>,
        outbox: &[OutboxMessage],
    ) -> Result<Zone, StoreError>;
    /// Archives a live zone ([`StoreError::NotFound`] if there is none).
    async fn archive_zone(&self, zone_id: &str, outbox: &[OutboxMessage])
    -> Result<(), StoreError>;

    async fn create_application(
        &self,
        application: &Application,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Creates a dynamically registered application unless its zone already holds `max_live`
    /// live ones ([`StoreError::LimitReached`], counted in the insert under a lock on the
    /// zone's row) or no longer accepts registration ([`StoreError::NotFound`]).
    async fn register_dcr_application(
        &self,
        application: &Application,
        max_live: i64,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// How many dynamically registered applications of the zone are live at `now_ms`.
    async fn count_live_dcr_applications(
        &self,
        zone_id: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError>;
    async fn get_application(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<Application>, StoreError>;
    async fn list_applications(&self, zone_id: &str) -> Result<Vec<Application>, StoreError>;
    /// An application by id alone: the STS's client authentication uses it to tell a caller
    /// that named the wrong zone (`zone_invalid`, once the secret proves it) and to find a
    /// control key's zone. The other cross-zone reads are listed in ARCHITECTURE.md.
    async fn application_by_id(&self, id: &str) -> Result<Option<Application>, StoreError>;
    /// Replaces the client secret hash of an unarchived application.
    async fn set_application_secret(
        &self,
        zone_id: &str,
        id: &str,
        hash: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    async fn archive_application(
        &self,
        zone_id: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Archives every dynamically registered application that expired before
    /// `expired_before_ms`; returns how many.
    async fn archive_lapsed_dcr_applications(
        &self,
        expired_before_ms: i64,
    ) -> Result<u64, StoreError>;
    /// Sets a live application's name and traits, and its secret hash when given, in one
    /// statement; a live namesake in the zone is a [`StoreError::Conflict`].
    async fn update_application(
        &self,
        zone_id: &str,
        id: &str,
        change: &ApplicationChange,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;

    async fn create_provider(
        &self,
        provider: &Provider,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    async fn get_provider(&self, zone_id: &str, id: &str) -> Result<Option<Provider>, StoreError>;
    async fn list_providers(&self, zone_id: &str) -> Result<Vec<Provider>, StoreError>;
    /// Creates or updates a live provider and stores its new sealed secrets, in one
    /// transaction. A taken identifier is a [`StoreError::Conflict`]; updating an archived
    /// provider or another zone's is [`StoreError::NotFound`].
    async fn save_provider(
        &self,
        provider: &Provider,
        secrets: &[SealedSecret],
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Archives a live provider no live resource uses: one in use is a [`StoreError::Conflict`].
    async fn archive_provider(
        &self,
        zone_id: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;

    async fn create_resource(
        &self,
        resource: &Resource,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    async fn get_resource(&self, zone_id: &str, id: &str) -> Result<Option<Resource>, StoreError>;
    async fn find_resource(
        &self,
        zone_id: &str,
        identifier: &str,
    ) -> Result<Option<Resource>, StoreError>;
    async fn list_resources(&self, zone_id: &str) -> Result<Vec<Resource>, StoreError>;
    /// Creates or updates a live resource bound to a live provider of its zone (else
    /// [`StoreError::NotFound`]); a taken identifier is a [`StoreError::Conflict`].
    async fn save_resource(
        &self,
        resource: &Resource,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    async fn archive_resource(
        &self,
        zone_id: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;

    /// Creates or replaces the connection of (zone, subject, provider) of a provider of the
    /// zone (else [`StoreError::NotFound`]), with its sealed tokens and `outbox`, in one
    /// transaction.
    async fn put_provider_connection(
        &self,
        connection: &ProviderConnection,
        secrets: &[SealedSecret],
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Replaces a live connection's tokens after a refresh, with its sealed tokens, only if
    /// no one refreshed it since the caller read it (`seen_refreshed_at_ms`); otherwise a
    /// [`StoreError::Conflict`] and nothing is written.
    async fn refresh_provider_connection(
        &self,
        connection: &ProviderConnection,
        seen_refreshed_at_ms: Option<i64>,
        secrets: &[SealedSecret],
    ) -> Result<(), StoreError>;
    /// The zone's connections, oldest first.
    async fn list_provider_connections(
        &self,
        zone_id: &str,
    ) -> Result<Vec<ProviderConnection>, StoreError>;
    /// Marks the connection revoked and deletes its sealed tokens, with `outbox`, in one
    /// transaction; [`StoreError::NotFound`] if there is none.
    async fn revoke_provider_connection(
        &self,
        zone_id: &str,
        subject_id: &str,
        provider_id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    async fn get_provider_connection(
        &self,
        zone_id: &str,
        subject_id: &str,
        provider_id: &str,
    ) -> Result<Option<ProviderConnection>, StoreError>;

    /// Stores a sealed secret, replacing any previous one under the same reference; returns
    /// the new version (1 for a new reference).
    async fn put_sealed_secret(
        &self,
        secret: &SealedSecret,
        outbox: &[OutboxMessage],
    ) -> Result<i64, StoreError>;
    async fn get_sealed_secret(
        &self,
        zone_id: &str,
        secret_ref: &str,
    ) -> Result<Option<SealedSecret>, StoreError>;

    async fn insert_signing_key(
        &self,
        key: &SigningKey,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    async fn list_signing_keys(&self, zone_id: &str) -> Result<Vec<SigningKey>, StoreError>;
    /// Makes `key` the zone's active key: the active one becomes `retiring` and verifies until
    /// `previous_until_ms`; keys already retiring stop at once (at most two keys verify).
    async fn rotate_signing_key(
        &self,
        key: &SigningKey,
        previous_until_ms: i64,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Moves a key to `status` (`active` stamps its activation, `retired` its retirement).
    async fn set_signing_key_status(
        &self,
        zone_id: &str,
        kid: &str,
        status: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
}

fn zone(row: &Row) -> Result<Zone, StoreError> {
    Ok(Zone {
        id: row.text(0)?,
        name: row.text(1)?,
        slug: row.text(2)?,
        created_at_ms: row.int(3)?,
        archived_at_ms: row.opt_int(4)?,
        dcr_enabled: row.int(5)? != 0,
    })
}

fn application(row: &Row) -> Result<Application, StoreError> {
    Ok(Application {
        id: row.text(0)?,
        zone_id: row.text(1)?,
        name: row.text(2)?,
        client_secret_hash: row.opt_text(3)?,
        traits: list_from_json(&row.text(4)?)?,
        registration_method: row.text(5)?,
        expires_at_ms: row.opt_int(6)?,
        created_at_ms: row.int(7)?,
        archived_at_ms: row.opt_int(8)?,
    })
}

fn provider(row: &Row) -> Result<Provider, StoreError> {
    Ok(Provider {
        id: row.text(0)?,
        zone_id: row.text(1)?,
        name: row.text(2)?,
        identifier: row.text(3)?,
        kind: row.text(4)?,
        config: row.text(5)?,
        secret_refs: list_from_json(&row.text(6)?)?,
        created_at_ms: row.int(7)?,
        archived_at_ms: row.opt_int(8)?,
    })
}

fn resource(row: &Row) -> Result<Resource, StoreError> {
    Ok(Resource {
        id: row.text(0)?,
        zone_id: row.text(1)?,
        name: row.text(2)?,
        identifier: row.text(3)?,
        upstream_url: row.text(4)?,
        provider_id: row.text(5)?,
        scopes: list_from_json(&row.text(6)?)?,
        operations: row.text(7)?,
        operation_enforcement: row.text(8)?,
        created_at_ms: row.int(9)?,
        archived_at_ms: row.opt_int(10)?,
    })
}

fn connection(row: &Row) -> Result<ProviderConnection, StoreError> {
    Ok(ProviderConnection {
        id: row.text(0)?,
        zone_id: row.text(1)?,
        subject_id: row.text(2)?,
        provider_id: row.text(3)?,
        status: row.text(4)?,
        access_token_ref: row.opt_text(5)?,
        refresh_token_ref: row.opt_text(6)?,
        expires_at_ms: row.opt_int(7)?,
        refreshed_at_ms: row.opt_int(8)?,
        created_at_ms: row.int(9)?,
    })
}

fn sealed_secret(row: &Row) -> Result<SealedSecret, StoreError> {
    Ok(SealedSecret {
        zone_id: row.text(0)?,
        secret_ref: row.text(1)?,
        purpose: row.text(2)?,
        kek_id: row.text(3)?,
        envelope: row.text(4)?,
        version: row.int(5)?,
        updated_at_ms: row.int(6)?,
    })
}

fn signing_key(row: &Row) -> Result<SigningKey, StoreError> {
    Ok(SigningKey {
        kid: row.text(0)?,
        zone_id: row.text(1)?,
        algorithm: row.text(2)?,
        public_jwk: row.text(3)?,
        private_envelope: row.text(4)?,
        kek_id: row.text(5)?,
        status: row.text(6)?,
        created_at_ms: row.int(7)?,
        activated_at_ms: row.opt_int(8)?,
        retired_at_ms: row.opt_int(9)?,
    })
}

/// Stores a sealed secret, replacing (and versioning up) any under the same reference.
fn zone_insert(new: &NewZone, dcr_enabled: bool) -> Statement {
    Statement::new(
        "INSERT INTO zones (id, name, slug, created_at_ms, dcr_enabled) VALUES ($1, $2, $3, $4, $5)
         RETURNING id, name, slug, created_at_ms, archived_at_ms, dcr_enabled",
        params![
            new.id.as_str(),
            new.name.as_str(),
            new.slug.as_str(),
            now_ms(),
            i64::from(dcr_enabled)
        ],
    )
}

fn key_insert(key: &SigningKey) -> Statement {
    Statement::new(
        "INSERT INTO signing_keys (kid, zone_id, algorithm, public_jwk, private_envelope, kek_id, status,
             created_at_ms, activated_at_ms, retired_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        params![
            key.kid.as_str(),
            key.zone_id.as_str(),
            key.algorithm.as_str(),
            key.public_jwk.as_str(),
            key.private_envelope.as_str(),
            key.kek_id.as_str(),
            key.status.as_str(),
            key.created_at_ms,
            key.activated_at_ms,
            key.retired_at_ms,
        ],
    )
}

/// The outbox statements alone (for batches whose first statement is not a single one).
fn enqueue_only(outbox: &[OutboxMessage]) -> Vec<Statement> {
    crate::store::enqueue(outbox, now_ms())
}

fn seal_statement(secret: &SealedSecret) -> Statement {
    Statement::new(
        "INSERT INTO sealed_secrets (zone_id, secret_ref, purpose, kek_id, envelope, version, updated_at_ms)
         VALUES ($1, $2, $3, $4, $5, 1, $6)
         ON CONFLICT (zone_id, secret_ref) DO UPDATE SET purpose = excluded.purpose,
             kek_id = excluded.kek_id, envelope = excluded.envelope,
             version = sealed_secrets.version + 1, updated_at_ms = excluded.updated_at_ms
         RETURNING version",
        params![
            secret.zone_id.as_str(),
            secret.secret_ref.as_str(),
            secret.purpose.as_str(),
            secret.kek_id.as_str(),
            secret.envelope.as_str(),
            now_ms(),
        ],
    )
}

#[async_trait::async_trait]
impl<D: Db> Directory for D {
    async fn create_zone(
        &self,
        new: &NewZone,
        outbox: &[OutboxMessage],
    ) -> Result<Zone, StoreError> {
        let outcomes = self
            .atomic(with_outbox(zone_insert(new, false), outbox))
            .await?;
        zone(first_row(&outcomes)?)
    }

    async fn create_zone_with_key(
        &self,
        new: &NewZone,
        dcr_enabled: bool,
        key: &SigningKey,
        outbox: &[OutboxMessage],
    ) -> Result<Zone, StoreError> {
        let mut statements = vec![zone_insert(new, dcr_enabled), key_insert(key)];
        statements.extend(enqueue_only(outbox));
        let outcomes = self.atomic(statements).await?;
        zone(first_row(&outcomes)?)
    }

    async fn get_zone(&self, zone_id: &str) -> Result<Option<Zone>, StoreError> {
        one_in_directory(
            self,
            concat!(select_zones!(), " WHERE id = $1"),
            params![zone_id],
            zone,
        )
        .await
    }

    async fn list_zones(&self) -> Result<Vec<Zone>, StoreError> {
        all(
            self,
            concat!(select_zones!(), " ORDER BY created_at_ms, id"),
            params![],
            zone,
        )
        .await
    }

    async fn update_zone(
        &self,
        zone_id: &str,
        name: &str,
        slug: &str,
        dcr_enabled: bool,
        refuse_live_dcr_at: Option<i64>,
        outbox: &[OutboxMessage],
    ) -> Result<Zone, StoreError> {
        let update = Statement::new(
            "UPDATE zones SET name = $2, slug = $3, dcr_enabled = $4 WHERE id = $1 AND archived_at_ms IS NULL
             RETURNING id, name, slug, created_at_ms, archived_at_ms, dcr_enabled",
            params![zone_id, name, slug, i64::from(dcr_enabled)],
        )
        .must_change(not_found);
        let mut statements = with_outbox(update, outbox);
        // After the update, which holds the zone's row: a registration committed before it is
        // counted here (PostgreSQL reads afresh per statement); one after it sees the change.
        if let Some(now_ms) = refuse_live_dcr_at {
            statements.push(
                Statement::new(
                    "UPDATE zones SET name = name
                     WHERE id = $1 AND NOT EXISTS (
                         SELECT 1 FROM applications
                         WHERE zone_id = $1 AND registration_method = 'dcr'
                           AND archived_at_ms IS NULL AND expires_at_ms > $2)",
                    params![zone_id, now_ms],
                )
                .must_change(|| {
                    StoreError::LimitReached("registered applications are live".into())
                }),
            );
        }
        let outcomes = self.atomic(statements).await?;
        zone(first_row(&outcomes)?)
    }

    async fn archive_zone(
        &self,
        zone_id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE zones SET archived_at_ms = $2 WHERE id = $1 AND archived_at_ms IS NULL",
            params![zone_id, now_ms()],
        )
        .must_change(not_found);
        self.atomic(with_outbox(update, outbox)).await.map(|_| ())
    }

    async fn archive_lapsed_dcr_applications(
        &self,
        expired_before_ms: i64,
    ) -> Result<u64, StoreError> {
        // The zones first, as a registration locks them: see `register_dcr_application`.
        let lock = Statement::new(
            "UPDATE zones SET name = name
             WHERE id IN (SELECT zone_id FROM applications
                          WHERE registration_method = 'dcr' AND archived_at_ms IS NULL
                            AND expires_at_ms < $1)",
            params![expired_before_ms],
        );
        let archive = Statement::new(
            "UPDATE applications SET archived_at_ms = $2
             WHERE registration_method = 'dcr' AND archived_at_ms IS NULL
               AND expires_at_ms < $1",
            params![expired_before_ms, now_ms()],
        );
        let outcomes = self.atomic(vec![lock, archive]).await?;
        Ok(outcomes.last().map_or(0, |outcome| outcome.changed))
    }

    async fn create_application(
        &self,
        app: &Application,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let insert = Statement::new(
            concat!(
                insert_application!(),
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ),
            application_params(app),
        );
        self.atomic(with_outbox(insert, outbox)).await.map(|_| ())
    }

    async fn register_dcr_application(
        &self,
        app: &Application,
        max_live: i64,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let mut params = application_params(app);
        params.push(max_live.into());
        // A name already live is inserted anyway, so the unique index refuses it as the
        // duplicate it is rather than as one registration too many. Archiving or renaming an
        // application locks its zone's row first, as this does: on PostgreSQL, one committed
        // between this read and the index check would otherwise admit the name, one over the
        // cap; locked, it waits for this registration, or this registration's reads see it.
        let insert = Statement::new(
            concat!(
                insert_application!(),
                " SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
                 WHERE (SELECT COUNT(*) FROM applications
                         WHERE zone_id = $2 AND registration_method = 'dcr'
                           AND archived_at_ms IS NULL AND expires_at_ms > $8)
                       < CAST($10 AS BIGINT)
                    OR EXISTS (SELECT 1 FROM applications
                               WHERE zone_id = $2 AND lower(name) = lower($3)
                                 AND archived_at_ms IS NULL)"
            ),
            params,
        )
        .must_change(|| {
            StoreError::LimitReached("the zone holds the most live registered applications".into())
        });
        // The zone's row is locked only if it is live and still accepts registration, so none
        // commits after a shutdown that turned registration off.
        let lock = Statement::new(
            "UPDATE zones SET name = name
             WHERE id = $1 AND dcr_enabled = 1 AND archived_at_ms IS NULL",
            params![app.zone_id.as_str()],
        )
        .must_change(|| {
            StoreError::NotFound("the zone does not accept dynamic client registration".into())
        });
        self.atomic(zone_limited(lock, insert, outbox))
            .await
            .map(|_| ())
    }

    async fn count_live_dcr_applications(
        &self,
        zone_id: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        count(
            self,
            "SELECT COUNT(*) FROM applications
             WHERE zone_id = $1 AND registration_method = 'dcr'
               AND archived_at_ms IS NULL AND expires_at_ms > $2",
            params![zone_id, now_ms],
        )
        .await
    }

    async fn get_application(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<Application>, StoreError> {
        one_in_directory(
            self,
            concat!(select_applications!(), " WHERE zone_id = $1 AND id = $2"),
            params![zone_id, id],
            application,
        )
        .await
    }

    async fn application_by_id(&self, id: &str) -> Result<Option<Application>, StoreError> {
        one_in_directory(
            self,
            concat!(select_applications!(), " WHERE id = $1"),
            params![id],
            application,
        )
        .await
    }

    async fn list_applications(&self, zone_id: &str) -> Result<Vec<Application>, StoreError> {
        all(
            self,
            concat!(
                select_applications!(),
                " WHERE zone_id = $1 ORDER BY created_at_ms, id"
            ),
            params![zone_id],
            application,
        )
        .await
    }

    async fn set_application_secret(
        &self,
        zone_id: &str,
        id: &str,
        hash: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE applications SET client_secret_hash = $3
             WHERE zone_id = $1 AND id = $2 AND archived_at_ms IS NULL",
            params![zone_id, id, hash],
        )
        .must_change(not_found);
        self.atomic(with_outbox(update, outbox)).await.map(|_| ())
    }

    async fn archive_application(
        &self,
        zone_id: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE applications SET archived_at_ms = $3
             WHERE zone_id = $1 AND id = $2 AND archived_at_ms IS NULL",
            params![zone_id, id, now_ms()],
        )
        .must_change(not_found);
        // Locked as a registration locks it: see `register_dcr_application`.
        self.atomic(zone_limited(zone_lock(zone_id), update, outbox))
            .await
            .map(|_| ())
    }

    async fn update_application(
        &self,
        zone_id: &str,
        id: &str,
        change: &ApplicationChange,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE applications SET name = $3, traits = $4,
                 client_secret_hash = COALESCE($5, client_secret_hash)
             WHERE zone_id = $1 AND id = $2 AND archived_at_ms IS NULL",
            params![
                zone_id,
                id,
                change.name.as_str(),
                list_to_json(&change.traits),
                change.client_secret_hash.clone(),
            ],
        )
        .must_change(not_found);
        self.atomic(zone_limited(zone_lock(zone_id), update, outbox))
            .await
            .map(|_| ())
    }

    async fn create_provider(
        &self,
        provider: &Provider,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let insert = Statement::new(
            "INSERT INTO providers (id, zone_id, name, identifier, kind, config, secret_refs, created_at_ms,
                 archived_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            params![
                provider.id.as_str(),
                provider.zone_id.as_str(),
                provider.name.as_str(),
                provider.identifier.as_str(),
                provider.kind.as_str(),
                provider.config.as_str(),
                list_to_json(&provider.secret_refs),
                provider.created_at_ms,
                provider.archived_at_ms,
            ],
        );
        self.atomic(with_outbox(insert, outbox)).await.map(|_| ())
    }

    async fn get_provider(&self, zone_id: &str, id: &str) -> Result<Option<Provider>, StoreError> {
        one_in_directory(
            self,
            concat!(select_providers!(), " WHERE zone_id = $1 AND id = $2"),
            params![zone_id, id],
            provider,
        )
        .await
    }

    async fn list_providers(&self, zone_id: &str) -> Result<Vec<Provider>, StoreError> {
        all(
            self,
            concat!(
                select_providers!(),
                " WHERE zone_id = $1 ORDER BY created_at_ms, id"
            ),
            params![zone_id],
            provider,
        )
        .await
    }

    async fn create_resource(
        &self,
        resource: &Resource,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        // The provider must belong to the same zone: a cross-zone binding is "not found".
        let insert = Statement::new(
            "INSERT INTO resources (id, zone_id, name, identifier, upstream_url, provider_id, scopes, operations,
                 operation_enforcement, created_at_ms, archived_at_ms)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11
             WHERE EXISTS (SELECT 1 FROM providers WHERE zone_id = $2 AND id = $6)",
            params![
                resource.id.as_str(),
                resource.zone_id.as_str(),
                resource.name.as_str(),
                resource.identifier.as_str(),
                resource.upstream_url.as_str(),
                resource.provider_id.as_str(),
                list_to_json(&resource.scopes),
                resource.operations.as_str(),
                resource.operation_enforcement.as_str(),
                resource.created_at_ms,
                resource.archived_at_ms,
            ],
        )
        .must_change(not_found);
        self.atomic(with_outbox(insert, outbox)).await.map(|_| ())
    }

    async fn save_provider(
        &self,
        p: &Provider,
        secrets: &[SealedSecret],
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let upsert = Statement::new(
            "INSERT INTO providers (id, zone_id, name, identifier, kind, config, secret_refs, created_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, identifier = excluded.identifier,
                 kind = excluded.kind, config = excluded.config, secret_refs = excluded.secret_refs
             WHERE providers.zone_id = excluded.zone_id AND providers.archived_at_ms IS NULL",
            params![
                p.id.as_str(),
                p.zone_id.as_str(),
                p.name.as_str(),
                p.identifier.as_str(),
                p.kind.as_str(),
                p.config.as_str(),
                list_to_json(&p.secret_refs),
                p.created_at_ms,
            ],
        )
        .must_change(not_found);
        let mut statements = with_outbox(upsert, outbox);
        statements.extend(secrets.iter().map(seal_statement));
        self.atomic(statements).await.map(|_| ())
    }

    async fn archive_provider(
        &self,
        zone_id: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let in_use = self
            .rows(
                "SELECT id FROM resources WHERE zone_id = $1 AND provider_id = $2
                 AND archived_at_ms IS NULL LIMIT 1",
                params![zone_id, id],
            )
            .await?;
        if !in_use.is_empty() {
            return Err(StoreError::Conflict(format!(
                "provider `{id}` is used by a live resource"
            )));
        }
        let update = Statement::new(
            "UPDATE providers SET archived_at_ms = $3
             WHERE zone_id = $1 AND id = $2 AND archived_at_ms IS NULL
             AND NOT EXISTS (SELECT 1 FROM resources WHERE zone_id = $1 AND provider_id = $2
                             AND archived_at_ms IS NULL)",
            params![zone_id, id, now_ms()],
        )
        .must_change(not_found);
        self.atomic(with_outbox(update, outbox)).await.map(|_| ())
    }

    async fn save_resource(
        &self,
        r: &Resource,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        // The provider must be a live one of the same zone: anything else is "not found".
        let upsert = Statement::new(
            "INSERT INTO resources (id, zone_id, name, identifier, upstream_url, provider_id, scopes, operations,
                 operation_enforcement, created_at_ms)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10
             WHERE EXISTS (SELECT 1 FROM providers WHERE zone_id = $2 AND id = $6
                           AND archived_at_ms IS NULL)
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, identifier = excluded.identifier,
                 upstream_url = excluded.upstream_url, provider_id = excluded.provider_id,
                 scopes = excluded.scopes, operations = excluded.operations,
                 operation_enforcement = excluded.operation_enforcement
             WHERE resources.zone_id = excluded.zone_id AND resources.archived_at_ms IS NULL",
            params![
                r.id.as_str(),
                r.zone_id.as_str(),
                r.name.as_str(),
                r.identifier.as_str(),
                r.upstream_url.as_str(),
                r.provider_id.as_str(),
                list_to_json(&r.scopes),
                r.operations.as_str(),
                r.operation_enforcement.as_str(),
                r.created_at_ms,
            ],
        )
        .must_change(not_found);
        self.atomic(with_outbox(upsert, outbox)).await.map(|_| ())
    }

    async fn archive_resource(
        &self,
        zone_id: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE resources SET archived_at_ms = $3
             WHERE zone_id = $1 AND id = $2 AND archived_at_ms IS NULL",
            params![zone_id, id, now_ms()],
        )
        .must_change(not_found);
        self.atomic(with_outbox(update, outbox)).await.map(|_| ())
    }

    async fn get_resource(&self, zone_id: &str, id: &str) -> Result<Option<Resource>, StoreError> {
        one_in_directory(
            self,
            concat!(select_resources!(), " WHERE zone_id = $1 AND id = $2"),
            params![zone_id, id],
            resource,
        )
        .await
    }

    async fn find_resource(
        &self,
        zone_id: &str,
        identifier: &str,
    ) -> Result<Option<Resource>, StoreError> {
        one_in_directory(
            self,
            concat!(
                select_resources!(),
                " WHERE zone_id = $1 AND (identifier = $2 OR id = $2)"
            ),
            params![zone_id, identifier],
            resource,
        )
        .await
    }

    async fn list_resources(&self, zone_id: &str) -> Result<Vec<Resource>, StoreError> {
        all(
            self,
            concat!(
                select_resources!(),
                " WHERE zone_id = $1 ORDER BY created_at_ms, id"
            ),
            params![zone_id],
            resource,
        )
        .await
    }

    async fn put_provider_connection(
        &self,
        c: &ProviderConnection,
        secrets: &[SealedSecret],
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let mut statements: Vec<Statement> = secrets.iter().map(seal_statement).collect();
        statements.push(
            Statement::new(
                "INSERT INTO provider_connections (id, zone_id, subject_id, provider_id, status, access_token_ref,
                     refresh_token_ref, expires_at_ms, refreshed_at_ms, created_at_ms)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10
                 WHERE EXISTS (SELECT 1 FROM providers WHERE zone_id = $2 AND id = $4)
                 ON CONFLICT (zone_id, subject_id, provider_id) DO UPDATE SET
                     status = excluded.status, access_token_ref = excluded.access_token_ref,
                     refresh_token_ref = excluded.refresh_token_ref, expires_at_ms = excluded.expires_at_ms,
                     refreshed_at_ms = excluded.refreshed_at_ms",
                params![
                    c.id.as_str(),
                    c.zone_id.as_str(),
                    c.subject_id.as_str(),
                    c.provider_id.as_str(),
                    c.status.as_str(),
                    c.access_token_ref.clone(),
                    c.refresh_token_ref.clone(),
                    c.expires_at_ms,
                    c.refreshed_at_ms,
                    c.created_at_ms,
                ],
            )
            .must_change(not_found),
        );
        statements.extend(crate::store::enqueue(outbox, now_ms()));
        self.atomic(statements).await.map(|_| ())
    }

    async fn refresh_provider_connection(
        &self,
        c: &ProviderConnection,
        seen_refreshed_at_ms: Option<i64>,
        secrets: &[SealedSecret],
    ) -> Result<(), StoreError> {
        // The guard first: a lost race rolls the tokens' upserts back with it.
        let mut statements = vec![
            Statement::new(
                "UPDATE provider_connections SET access_token_ref = $4, refresh_token_ref = $5,
                     expires_at_ms = $6, refreshed_at_ms = $7
                 WHERE zone_id = $1 AND id = $2 AND status = 'connected'
                   AND COALESCE(refreshed_at_ms, -1) = COALESCE(CAST($3 AS BIGINT), -1)",
                params![
                    c.zone_id.as_str(),
                    c.id.as_str(),
                    seen_refreshed_at_ms,
                    c.access_token_ref.clone(),
                    c.refresh_token_ref.clone(),
                    c.expires_at_ms,
                    c.refreshed_at_ms,
                ],
            )
            .must_change(|| {
                StoreError::Conflict("the connection changed since it was read".into())
            }),
        ];
        statements.extend(secrets.iter().map(seal_statement));
        self.atomic(statements).await.map(|_| ())
    }

    async fn list_provider_connections(
        &self,
        zone_id: &str,
    ) -> Result<Vec<ProviderConnection>, StoreError> {
        all(
            self,
            "SELECT id, zone_id, subject_id, provider_id, status, access_token_ref, refresh_token_ref,
                    expires_at_ms, refreshed_at_ms, created_at_ms
             FROM provider_connections WHERE zone_id = $1 ORDER BY created_at_ms, id",
            params![zone_id],
            connection,
        )
        .await
    }

    async fn revoke_provider_connection(
        &self,
        zone_id: &str,
        subject_id: &str,
        provider_id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let mut statements = vec![
            Statement::new(
                "DELETE FROM sealed_secrets WHERE zone_id = $1 AND secret_ref IN (
                     SELECT access_token_ref FROM provider_connections
                      WHERE zone_id = $1 AND subject_id = $2 AND provider_id = $3
                        AND access_token_ref IS NOT NULL
                     UNION
                     SELECT refresh_token_ref FROM provider_connections
                      WHERE zone_id = $1 AND subject_id = $2 AND provider_id = $3
                        AND refresh_token_ref IS NOT NULL)",
                params![zone_id, subject_id, provider_id],
            ),
            Statement::new(
                "UPDATE provider_connections SET status = 'revoked', access_token_ref = NULL,
                     refresh_token_ref = NULL
                 WHERE zone_id = $1 AND subject_id = $2 AND provider_id = $3",
                params![zone_id, subject_id, provider_id],
            )
            .must_change(not_found),
        ];
        statements.extend(crate::store::enqueue(outbox, now_ms()));
        self.atomic(statements).await.map(|_| ())
    }

    async fn get_provider_connection(
        &self,
        zone_id: &str,
        subject_id: &str,
        provider_id: &str,
    ) -> Result<Option<ProviderConnection>, StoreError> {
        one(
            self,
            "SELECT id, zone_id, subject_id, provider_id, status, access_token_ref, refresh_token_ref,
                    expires_at_ms, refreshed_at_ms, created_at_ms
             FROM provider_connections WHERE zone_id = $1 AND subject_id = $2 AND provider_id = $3",
            params![zone_id, subject_id, provider_id],
            connection,
        )
        .await
    }

    async fn put_sealed_secret(
        &self,
        secret: &SealedSecret,
        outbox: &[OutboxMessage],
    ) -> Result<i64, StoreError> {
        let upsert = seal_statement(secret);
        let outcomes = self.atomic(with_outbox(upsert, outbox)).await?;
        first_row(&outcomes)?.int(0)
    }

    async fn get_sealed_secret(
        &self,
        zone_id: &str,
        secret_ref: &str,
    ) -> Result<Option<SealedSecret>, StoreError> {
        one(
            self,
            "SELECT zone_id, secret_ref, purpose, kek_id, envelope, version, updated_at_ms
             FROM sealed_secrets WHERE zone_id = $1 AND secret_ref = $2",
            params![zone_id, secret_ref],
            sealed_secret,
        )
        .await
    }

    async fn insert_signing_key(
        &self,
        key: &SigningKey,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        self.atomic(with_outbox(key_insert(key), outbox))
            .await
            .map(|_| ())
    }

    async fn rotate_signing_key(
        &self,
        key: &SigningKey,
        previous_until_ms: i64,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let retire_retiring = Statement::new(
            "UPDATE signing_keys SET status = 'retired', retired_at_ms = $2
             WHERE zone_id = $1 AND status = 'retiring'",
            params![key.zone_id.as_str(), now],
        );
        let retire_active = Statement::new(
            "UPDATE signing_keys SET status = 'retiring', retired_at_ms = $2
             WHERE zone_id = $1 AND status = 'active'",
            params![key.zone_id.as_str(), previous_until_ms],
        );
        let mut statements = vec![retire_retiring, retire_active, key_insert(key)];
        statements.extend(enqueue_only(outbox));
        self.atomic(statements).await.map(|_| ())
    }

    async fn list_signing_keys(&self, zone_id: &str) -> Result<Vec<SigningKey>, StoreError> {
        all(
            self,
            "SELECT kid, zone_id, algorithm, public_jwk, private_envelope, kek_id, status, created_at_ms,
                    activated_at_ms, retired_at_ms
             FROM signing_keys WHERE zone_id = $1 ORDER BY created_at_ms, kid",
            params![zone_id],
            signing_key,
        )
        .await
    }

    async fn set_signing_key_status(
        &self,
        zone_id: &str,
        kid: &str,
        status: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE signing_keys SET status = $3,
                 activated_at_ms = CASE WHEN $3 = 'active' THEN $4 ELSE activated_at_ms END,
                 retired_at_ms = CASE WHEN $3 = 'retired' THEN $4 ELSE retired_at_ms END
             WHERE zone_id = $1 AND kid = $2",
            params![zone_id, kid, status, now_ms()],
        )
        .must_change(not_found);
        self.atomic(with_outbox(update, outbox)).await.map(|_| ())
    }
}
