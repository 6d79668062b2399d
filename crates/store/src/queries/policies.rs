//! Policies, policy sets, their immutable versions, and which set version a zone enforces.

use crate::db::{Db, Row, Statement, params};
use crate::model::{OutboxMessage, PolicyBinding, PolicyHeader, PolicyLoad, PolicyVersion};
use crate::store::{StoreError, all, first_row, not_found, now_ms, one, with_outbox};

/// The row columns of `policies`, for `concat!`.
macro_rules! select_policies {
    () => {
        "SELECT id, zone_id, name, description, created_at_ms, archived_at_ms FROM policies"
    };
}

/// The row columns of `policy_sets`, for `concat!`.
macro_rules! select_policy_sets {
    () => {
        "SELECT id, zone_id, name, description, created_at_ms, archived_at_ms FROM policy_sets"
    };
}

/// The row columns of `policy_versions`, for `concat!`.
macro_rules! select_policy_versions {
    () => {
        "SELECT id, zone_id, policy_id, version, content, content_sha256, created_at_ms FROM policy_versions"
    };
}

/// The row columns of `policy_set_versions`, for `concat!`.
macro_rules! select_policy_set_versions {
    () => {
        "SELECT id, zone_id, policy_set_id, version, manifest, manifest_sha256, created_at_ms FROM policy_set_versions"
    };
}

#[async_trait::async_trait]
pub trait Policies: Send + Sync {
    async fn create_policy(
        &self,
        policy: &PolicyHeader,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    async fn get_policy(&self, zone_id: &str, id: &str)
    -> Result<Option<PolicyHeader>, StoreError>;
    async fn list_policies(&self, zone_id: &str) -> Result<Vec<PolicyHeader>, StoreError>;
    /// Adds the next version of a policy of the zone (numbered from 1) and returns it. The
    /// version can never change afterwards.
    async fn add_policy_version(
        &self,
        zone_id: &str,
        policy_id: &str,
        id: &str,
        content: &str,
        sha256: &str,
        outbox: &[OutboxMessage],
    ) -> Result<PolicyVersion, StoreError>;
    async fn get_policy_version(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<PolicyVersion>, StoreError>;
    async fn list_policy_versions(
        &self,
        zone_id: &str,
        policy_id: &str,
    ) -> Result<Vec<PolicyVersion>, StoreError>;

    async fn create_policy_set(
        &self,
        set: &PolicyHeader,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    async fn get_policy_set(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<PolicyHeader>, StoreError>;
    async fn list_policy_sets(&self, zone_id: &str) -> Result<Vec<PolicyHeader>, StoreError>;
    /// Adds the next version of a policy set (its manifest) and returns it; immutable too.
    async fn add_policy_set_version(
        &self,
        zone_id: &str,
        set_id: &str,
        id: &str,
        manifest: &str,
        sha256: &str,
        outbox: &[OutboxMessage],
    ) -> Result<PolicyVersion, StoreError>;
    async fn get_policy_set_version(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<PolicyVersion>, StoreError>;
    async fn list_policy_set_versions(
        &self,
        zone_id: &str,
        set_id: &str,
    ) -> Result<Vec<PolicyVersion>, StoreError>;

    /// Makes `version_id` the zone's enforced set version; the version it replaces becomes the
    /// last known good. `outbox` (the invalidation) commits with it.
    async fn activate_policy_set_version(
        &self,
        zone_id: &str,
        version_id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<PolicyBinding, StoreError>;
    /// Rolls the zone back to `version_id` (its last known good): it becomes active and the
    /// version rolled back from is *not* remembered as good, so a second rollback has nothing
    /// to return to until a new activation succeeds.
    async fn rollback_policy_set_version(
        &self,
        zone_id: &str,
        version_id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<PolicyBinding, StoreError>;
    async fn policy_binding(&self, zone_id: &str) -> Result<Option<PolicyBinding>, StoreError>;
    /// Every zone's binding.
    async fn policy_bindings(&self) -> Result<Vec<PolicyBinding>, StoreError>;
    /// Archives a live policy (its versions stay, immutable, for the sets that name them).
    async fn archive_policy(
        &self,
        zone_id: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Archives a live policy set; if it is the zone's active set, the binding goes with it in
    /// the same transaction and the zone denies everything.
    async fn archive_policy_set(
        &self,
        zone_id: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;

    /// Records what a replica loaded (or failed to load) for a zone, replacing its last record.
    async fn record_policy_load(&self, load: &PolicyLoad) -> Result<(), StoreError>;
    /// The zone's load records, one per replica.
    async fn policy_loads(&self, zone_id: &str) -> Result<Vec<PolicyLoad>, StoreError>;
}

fn header(row: &Row) -> Result<PolicyHeader, StoreError> {
    Ok(PolicyHeader {
        id: row.text(0)?,
        zone_id: row.text(1)?,
        name: row.text(2)?,
        description: row.text(3)?,
        created_at_ms: row.int(4)?,
        archived_at_ms: row.opt_int(5)?,
    })
}

fn version(row: &Row) -> Result<PolicyVersion, StoreError> {
    Ok(PolicyVersion {
        id: row.text(0)?,
        zone_id: row.text(1)?,
        parent_id: row.text(2)?,
        version: row.int(3)?,
        content: row.text(4)?,
        sha256: row.text(5)?,
        created_at_ms: row.int(6)?,
    })
}

fn binding(row: &Row) -> Result<PolicyBinding, StoreError> {
    Ok(PolicyBinding {
        zone_id: row.text(0)?,
        policy_set_id: row.text(1)?,
        active_version_id: row.text(2)?,
        previous_version_id: row.opt_text(3)?,
        activated_at_ms: row.int(4)?,
    })
}

#[async_trait::async_trait]
impl<D: Db> Policies for D {
    async fn create_policy(
        &self,
        policy: &PolicyHeader,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let insert = Statement::new(
            "INSERT INTO policies (id, zone_id, name, description, created_at_ms, archived_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
            params![
                policy.id.as_str(),
                policy.zone_id.as_str(),
                policy.name.as_str(),
                policy.description.as_str(),
                policy.created_at_ms,
                policy.archived_at_ms,
            ],
        );
        self.atomic(with_outbox(insert, outbox)).await.map(|_| ())
    }

    async fn get_policy(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<PolicyHeader>, StoreError> {
        one(
            self,
            concat!(select_policies!(), " WHERE zone_id = $1 AND id = $2"),
            params![zone_id, id],
            header,
        )
        .await
    }

    async fn list_policies(&self, zone_id: &str) -> Result<Vec<PolicyHeader>, StoreError> {
        all(
            self,
            concat!(
                select_policies!(),
                " WHERE zone_id = $1 ORDER BY created_at_ms, id"
            ),
            params![zone_id],
            header,
        )
        .await
    }

    async fn add_policy_version(
        &self,
        zone_id: &str,
        policy_id: &str,
        id: &str,
        content: &str,
        sha256: &str,
        outbox: &[OutboxMessage],
    ) -> Result<PolicyVersion, StoreError> {
        // The next number comes from the table itself; two concurrent adds collide on the
        // (policy, version) key and one of them gets a conflict to retry.
        let insert = Statement::new(
            "INSERT INTO policy_versions (id, zone_id, policy_id, version, content, content_sha256, created_at_ms)
             SELECT $1, $2, $3, COALESCE(MAX(version), 0) + 1, $4, $5, $6
             FROM policy_versions WHERE policy_id = $3
             HAVING EXISTS (SELECT 1 FROM policies WHERE zone_id = $2 AND id = $3)
             RETURNING id, zone_id, policy_id, version, content, content_sha256, created_at_ms",
            params![id, zone_id, policy_id, content, sha256, now_ms()],
        )
        .must_change(not_found);
        let outcomes = self.atomic(with_outbox(insert, outbox)).await?;
        version(first_row(&outcomes)?)
    }

    async fn get_policy_version(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<PolicyVersion>, StoreError> {
        one(
            self,
            concat!(select_policy_versions!(), " WHERE zone_id = $1 AND id = $2"),
            params![zone_id, id],
            version,
        )
        .await
    }

    async fn list_policy_versions(
        &self,
        zone_id: &str,
        policy_id: &str,
    ) -> Result<Vec<PolicyVersion>, StoreError> {
        all(
            self,
            concat!(
                select_policy_versions!(),
                " WHERE zone_id = $1 AND policy_id = $2 ORDER BY version"
            ),
            params![zone_id, policy_id],
            version,
        )
        .await
    }

    async fn create_policy_set(
        &self,
        set: &PolicyHeader,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let insert = Statement::new(
            "INSERT INTO policy_sets (id, zone_id, name, description, created_at_ms, archived_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
            params![
                set.id.as_str(),
                set.zone_id.as_str(),
                set.name.as_str(),
                set.description.as_str(),
                set.created_at_ms,
                set.archived_at_ms,
            ],
        );
        self.atomic(with_outbox(insert, outbox)).await.map(|_| ())
    }

    async fn get_policy_set(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<PolicyHeader>, StoreError> {
        one(
            self,
            concat!(select_policy_sets!(), " WHERE zone_id = $1 AND id = $2"),
            params![zone_id, id],
            header,
        )
        .await
    }

    async fn list_policy_sets(&self, zone_id: &str) -> Result<Vec<PolicyHeader>, StoreError> {
        all(
            self,
            concat!(
                select_policy_sets!(),
                " WHERE zone_id = $1 ORDER BY created_at_ms, id"
            ),
            params![zone_id],
            header,
        )
        .await
    }

    async fn add_policy_set_version(
        &self,
        zone_id: &str,
        set_id: &str,
        id: &str,
        manifest: &str,
        sha256: &str,
        outbox: &[OutboxMessage],
    ) -> Result<PolicyVersion, StoreError> {
        let insert = Statement::new(
            "INSERT INTO policy_set_versions (id, zone_id, policy_set_id, version, manifest, manifest_sha256, created_at_ms)
             SELECT $1, $2, $3, COALESCE(MAX(version), 0) + 1, $4, $5, $6
             FROM policy_set_versions WHERE policy_set_id = $3
             HAVING EXISTS (SELECT 1 FROM policy_sets WHERE zone_id = $2 AND id = $3)
             RETURNING id, zone_id, policy_set_id, version, manifest, manifest_sha256, created_at_ms",
            params![id, zone_id, set_id, manifest, sha256, now_ms()],
        )
        .must_change(not_found);
        let outcomes = self.atomic(with_outbox(insert, outbox)).await?;
        version(first_row(&outcomes)?)
    }

    async fn get_policy_set_version(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<PolicyVersion>, StoreError> {
        one(
            self,
            concat!(
                select_policy_set_versions!(),
                " WHERE zone_id = $1 AND id = $2"
            ),
            params![zone_id, id],
            version,
        )
        .await
    }

    async fn list_policy_set_versions(
        &self,
        zone_id: &str,
        set_id: &str,
    ) -> Result<Vec<PolicyVersion>, StoreError> {
        all(
            self,
            concat!(
                select_policy_set_versions!(),
                " WHERE zone_id = $1 AND policy_set_id = $2 ORDER BY version"
            ),
            params![zone_id, set_id],
            version,
        )
        .await
    }

    async fn activate_policy_set_version(
        &self,
        zone_id: &str,
        version_id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<PolicyBinding, StoreError> {
        let upsert = Statement::new(
            "INSERT INTO policy_bindings (zone_id, policy_set_id, active_version_id, previous_version_id, activated_at_ms)
             SELECT $1, policy_set_id, id, NULL, $3 FROM policy_set_versions WHERE zone_id = $1 AND id = $2
             ON CONFLICT (zone_id) DO UPDATE SET
                 policy_set_id = excluded.policy_set_id,
                 previous_version_id = CASE
                     WHEN policy_bindings.active_version_id = excluded.active_version_id
                     THEN policy_bindings.previous_version_id
                     ELSE policy_bindings.active_version_id END,
                 active_version_id = excluded.active_version_id,
                 activated_at_ms = excluded.activated_at_ms
             RETURNING zone_id, policy_set_id, active_version_id, previous_version_id, activated_at_ms",
            params![zone_id, version_id, now_ms()],
        )
        .must_change(not_found);
        let outcomes = self.atomic(with_outbox(upsert, outbox)).await?;
        binding(first_row(&outcomes)?)
    }

    async fn rollback_policy_set_version(
        &self,
        zone_id: &str,
        version_id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<PolicyBinding, StoreError> {
        let update = Statement::new(
            "UPDATE policy_bindings SET active_version_id = $2, previous_version_id = NULL, activated_at_ms = $3
             WHERE zone_id = $1 AND previous_version_id = $2
             RETURNING zone_id, policy_set_id, active_version_id, previous_version_id, activated_at_ms",
            params![zone_id, version_id, now_ms()],
        )
        .must_change(not_found);
        let outcomes = self.atomic(with_outbox(update, outbox)).await?;
        binding(first_row(&outcomes)?)
    }

    async fn archive_policy(
        &self,
        zone_id: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE policies SET archived_at_ms = $3 WHERE zone_id = $1 AND id = $2 AND archived_at_ms IS NULL",
            params![zone_id, id, now_ms()],
        )
        .must_change(not_found);
        self.atomic(with_outbox(update, outbox)).await.map(|_| ())
    }

    async fn archive_policy_set(
        &self,
        zone_id: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE policy_sets SET archived_at_ms = $3 WHERE zone_id = $1 AND id = $2 AND archived_at_ms IS NULL",
            params![zone_id, id, now_ms()],
        )
        .must_change(not_found);
        let unbind = Statement::new(
            "DELETE FROM policy_bindings WHERE zone_id = $1 AND policy_set_id = $2",
            params![zone_id, id],
        );
        let mut statements = with_outbox(update, outbox);
        statements.insert(1, unbind);
        self.atomic(statements).await.map(|_| ())
    }

    async fn policy_bindings(&self) -> Result<Vec<PolicyBinding>, StoreError> {
        let rows = self
            .rows(
                "SELECT zone_id, policy_set_id, active_version_id, previous_version_id, activated_at_ms
                 FROM policy_bindings ORDER BY zone_id",
                params![],
            )
            .await?;
        rows.iter().map(binding).collect()
    }

    async fn record_policy_load(&self, load: &PolicyLoad) -> Result<(), StoreError> {
        self.change(
            "INSERT INTO policy_loads (zone_id, replica, policy_set_version_id, manifest_sha256, status, detail,
                 updated_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (zone_id, replica) DO UPDATE SET
                 policy_set_version_id = excluded.policy_set_version_id,
                 manifest_sha256 = excluded.manifest_sha256, status = excluded.status,
                 detail = excluded.detail, updated_at_ms = excluded.updated_at_ms",
            params![
                load.zone_id.as_str(),
                load.replica.as_str(),
                load.policy_set_version_id.as_str(),
                load.manifest_sha256.as_str(),
                load.status.as_str(),
                load.detail.as_str(),
                load.updated_at_ms,
            ],
        )
        .await
        .map(|_| ())
    }

    async fn policy_loads(&self, zone_id: &str) -> Result<Vec<PolicyLoad>, StoreError> {
        let rows = self
            .rows(
                "SELECT zone_id, replica, policy_set_version_id, manifest_sha256, status, detail, updated_at_ms
                 FROM policy_loads WHERE zone_id = $1 ORDER BY replica",
                params![zone_id],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(PolicyLoad {
                    zone_id: row.text(0)?,
                    replica: row.text(1)?,
                    policy_set_version_id: row.text(2)?,
                    manifest_sha256: row.text(3)?,
                    status: row.text(4)?,
                    detail: row.text(5)?,
                    updated_at_ms: row.int(6)?,
                })
            })
            .collect()
    }

    async fn policy_binding(&self, zone_id: &str) -> Result<Option<PolicyBinding>, StoreError> {
        one(
            self,
            "SELECT zone_id, policy_set_id, active_version_id, previous_version_id, activated_at_ms
             FROM policy_bindings WHERE zone_id = $1",
            params![zone_id],
            binding,
        )
        .await
    }
}
