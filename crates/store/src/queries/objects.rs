//! Admin bookkeeping objects (subject issuers, delegated grants, workloads): one table, the
//! object as JSON, written with its audit event's outbox row in one transaction.

use crate::db::{Db, Row, Statement, params};
use crate::model::{AdminObject, OutboxMessage};
use crate::store::{StoreError, all, not_found, one, with_outbox, zone_limited, zone_lock};

#[async_trait::async_trait]
pub trait Objects: Send + Sync {
    /// Inserts `object`. A taken `unique_key` among the zone's active objects of its kind is a
    /// [`StoreError::Conflict`], `max_active` of them already [`StoreError::LimitReached`]
    /// (checked first); either writes nothing.
    async fn insert_admin_object(
        &self,
        object: &AdminObject,
        max_active: Option<i64>,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Replaces an object's key, status and body; [`StoreError::NotFound`] if there is none.
    async fn update_admin_object(
        &self,
        object: &AdminObject,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    async fn delete_admin_object(
        &self,
        zone_id: &str,
        kind: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    async fn get_admin_object(
        &self,
        zone_id: &str,
        kind: &str,
        id: &str,
    ) -> Result<Option<AdminObject>, StoreError>;
    /// The object of `kind` with `id`, in whichever zone holds it.
    async fn find_admin_object(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<Option<AdminObject>, StoreError>;
    /// The zone's objects of `kind`, oldest first.
    async fn list_admin_objects(
        &self,
        zone_id: &str,
        kind: &str,
    ) -> Result<Vec<AdminObject>, StoreError>;
}

macro_rules! select_admin_objects {
    () => {
        "SELECT zone_id, kind, id, unique_key, status, body, created_at_ms, updated_at_ms FROM admin_objects"
    };
}

fn admin_object(row: &Row) -> Result<AdminObject, StoreError> {
    Ok(AdminObject {
        zone_id: row.text(0)?,
        kind: row.text(1)?,
        id: row.text(2)?,
        unique_key: row.opt_text(3)?,
        status: row.text(4)?,
        body: row.text(5)?,
        created_at_ms: row.int(6)?,
        updated_at_ms: row.int(7)?,
    })
}

fn over_limit() -> StoreError {
    StoreError::LimitReached("the zone holds the most objects of this kind it may".into())
}

#[async_trait::async_trait]
impl<D: Db> Objects for D {
    async fn insert_admin_object(
        &self,
        object: &AdminObject,
        max_active: Option<i64>,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let insert = Statement::new(
            "INSERT INTO admin_objects (zone_id, kind, id, unique_key, status, body, created_at_ms, updated_at_ms)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8
             WHERE CAST($9 AS BIGINT) IS NULL
                OR (SELECT COUNT(*) FROM admin_objects
                     WHERE zone_id = $1 AND kind = $2 AND status = 'active') < CAST($9 AS BIGINT)",
            params![
                object.zone_id.as_str(),
                object.kind.as_str(),
                object.id.as_str(),
                object.unique_key.clone(),
                object.status.as_str(),
                object.body.as_str(),
                object.created_at_ms,
                object.updated_at_ms,
                max_active,
            ],
        )
        .must_change(over_limit);
        self.atomic(zone_limited(zone_lock(&object.zone_id), insert, outbox))
            .await
            .map(|_| ())
    }

    async fn update_admin_object(
        &self,
        object: &AdminObject,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE admin_objects SET unique_key = $4, status = $5, body = $6, updated_at_ms = $7
             WHERE zone_id = $1 AND kind = $2 AND id = $3",
            params![
                object.zone_id.as_str(),
                object.kind.as_str(),
                object.id.as_str(),
                object.unique_key.clone(),
                object.status.as_str(),
                object.body.as_str(),
                object.updated_at_ms,
            ],
        )
        .must_change(not_found);
        self.atomic(with_outbox(update, outbox)).await.map(|_| ())
    }

    async fn delete_admin_object(
        &self,
        zone_id: &str,
        kind: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let delete = Statement::new(
            "DELETE FROM admin_objects WHERE zone_id = $1 AND kind = $2 AND id = $3",
            params![zone_id, kind, id],
        )
        .must_change(not_found);
        self.atomic(with_outbox(delete, outbox)).await.map(|_| ())
    }

    async fn get_admin_object(
        &self,
        zone_id: &str,
        kind: &str,
        id: &str,
    ) -> Result<Option<AdminObject>, StoreError> {
        one(
            self,
            concat!(
                select_admin_objects!(),
                " WHERE zone_id = $1 AND kind = $2 AND id = $3"
            ),
            params![zone_id, kind, id],
            admin_object,
        )
        .await
    }

    async fn find_admin_object(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<Option<AdminObject>, StoreError> {
        one(
            self,
            concat!(select_admin_objects!(), " WHERE kind = $1 AND id = $2"),
            params![kind, id],
            admin_object,
        )
        .await
    }

    async fn list_admin_objects(
        &self,
        zone_id: &str,
        kind: &str,
    ) -> Result<Vec<AdminObject>, StoreError> {
        all(
            self,
            concat!(
                select_admin_objects!(),
                " WHERE zone_id = $1 AND kind = $2 ORDER BY created_at_ms, id"
            ),
            params![zone_id, kind],
            admin_object,
        )
        .await
    }
}
