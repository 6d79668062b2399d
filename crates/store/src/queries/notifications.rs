//! Approval notification sinks and their deliveries. A sink's changes ride their audit event's
//! outbox row; the notifier moves a sink's cursor and inserts the deliveries it read in one
//! transaction, so an event is turned into a delivery once, however often it is read.

use crate::db::{Db, Row, Statement, params};
use crate::model::{DeliveryOutcome, NotificationDelivery, NotificationSink, OutboxMessage};
use crate::store::{StoreError, all, not_found, one, with_outbox, zone_limited, zone_lock};

#[async_trait::async_trait]
pub trait Notifications: Send + Sync {
    /// Inserts `sink`, its cursor at the zone's ledger head (it is sent what happens from now
    /// on). `max_per_zone` sinks already is [`StoreError::LimitReached`] and writes nothing.
    async fn insert_notification_sink(
        &self,
        sink: &NotificationSink,
        max_per_zone: i64,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Replaces a sink's name, URL, secret, event types and `active`.
    async fn update_notification_sink(
        &self,
        sink: &NotificationSink,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    /// Deletes a sink and its deliveries.
    async fn delete_notification_sink(
        &self,
        zone_id: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError>;
    async fn get_notification_sink(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<NotificationSink>, StoreError>;
    /// The zone's sinks, oldest first.
    async fn list_notification_sinks(
        &self,
        zone_id: &str,
    ) -> Result<Vec<NotificationSink>, StoreError>;
    /// Every active sink of a live zone.
    async fn live_notification_sinks(&self) -> Result<Vec<NotificationSink>, StoreError>;
    /// Moves the sink's cursor from `from_seq` to `to_seq` and inserts `deliveries` (one
    /// already there for the same sink and event is kept as it was). A cursor no longer at
    /// `from_seq` (another notifier moved it) is a [`StoreError::Conflict`] and writes nothing.
    async fn gather_notifications(
        &self,
        sink_id: &str,
        from_seq: i64,
        to_seq: i64,
        deliveries: &[NotificationDelivery],
    ) -> Result<(), StoreError>;
    /// Undelivered, unabandoned deliveries of active sinks due at `now_ms`, oldest first.
    async fn due_notifications(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<NotificationDelivery>, StoreError>;
    /// Records how an attempt ended, on the delivery and on its sink's health.
    async fn settle_notification(
        &self,
        delivery: &NotificationDelivery,
        outcome: &DeliveryOutcome,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// The sink's deliveries, newest first (by creation time, then id), after `before` in that
    /// order if given, at most `limit`.
    async fn list_notification_deliveries(
        &self,
        sink_id: &str,
        before: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<NotificationDelivery>, StoreError>;
    /// Forgets deliveries delivered or abandoned before `settled_before_ms`; returns how many.
    async fn purge_notification_deliveries(
        &self,
        settled_before_ms: i64,
    ) -> Result<u64, StoreError>;
}

macro_rules! select_sinks {
    () => {
        "SELECT id, zone_id, name, url, sealed_secret, event_types, active, cursor_seq,
                consecutive_failures, last_success_at_ms, last_failure_at_ms, last_error,
                created_at_ms, updated_at_ms
         FROM notification_sinks"
    };
}

macro_rules! select_deliveries {
    () => {
        "SELECT id, sink_id, zone_id, event_id, event_type, payload, attempts, available_at_ms,
                delivered_at_ms, abandoned_at_ms, response_status, last_error, created_at_ms
         FROM notification_deliveries"
    };
}

fn sink(row: &Row) -> Result<NotificationSink, StoreError> {
    Ok(NotificationSink {
        id: row.text(0)?,
        zone_id: row.text(1)?,
        name: row.text(2)?,
        url: row.text(3)?,
        sealed_secret: row.text(4)?,
        event_types: row.text(5)?,
        active: row.int(6)? != 0,
        cursor_seq: row.int(7)?,
        consecutive_failures: row.int(8)?,
        last_success_at_ms: row.opt_int(9)?,
        last_failure_at_ms: row.opt_int(10)?,
        last_error: row.opt_text(11)?,
        created_at_ms: row.int(12)?,
        updated_at_ms: row.int(13)?,
    })
}

fn delivery(row: &Row) -> Result<NotificationDelivery, StoreError> {
    Ok(NotificationDelivery {
        id: row.text(0)?,
        sink_id: row.text(1)?,
        zone_id: row.text(2)?,
        event_id: row.text(3)?,
        event_type: row.text(4)?,
        payload: row.text(5)?,
        attempts: row.int(6)?,
        available_at_ms: row.int(7)?,
        delivered_at_ms: row.opt_int(8)?,
        abandoned_at_ms: row.opt_int(9)?,
        response_status: row.opt_int(10)?,
        last_error: row.opt_text(11)?,
        created_at_ms: row.int(12)?,
    })
}

fn too_many() -> StoreError {
    StoreError::LimitReached("the zone holds the most notification sinks it may".into())
}

fn cursor_moved() -> StoreError {
    StoreError::Conflict("the sink's cursor was moved by another notifier".into())
}

#[async_trait::async_trait]
impl<D: Db> Notifications for D {
    async fn insert_notification_sink(
        &self,
        sink: &NotificationSink,
        max_per_zone: i64,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let insert = Statement::new(
            "INSERT INTO notification_sinks (id, zone_id, name, url, sealed_secret, event_types,
                 active, cursor_seq, created_at_ms, updated_at_ms)
             SELECT $1, $2, $3, $4, $5, $6, $7,
                    COALESCE((SELECT MAX(chain_seq) FROM audit_events WHERE zone_id = $2), 0), $8, $8
             WHERE (SELECT COUNT(*) FROM notification_sinks WHERE zone_id = $2) < CAST($9 AS BIGINT)",
            params![
                sink.id.as_str(),
                sink.zone_id.as_str(),
                sink.name.as_str(),
                sink.url.as_str(),
                sink.sealed_secret.as_str(),
                sink.event_types.as_str(),
                i64::from(sink.active),
                sink.created_at_ms,
                max_per_zone,
            ],
        )
        .must_change(too_many);
        self.atomic(zone_limited(zone_lock(&sink.zone_id), insert, outbox))
            .await
            .map(|_| ())
    }

    async fn update_notification_sink(
        &self,
        sink: &NotificationSink,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let update = Statement::new(
            "UPDATE notification_sinks SET name = $3, url = $4, sealed_secret = $5, event_types = $6,
                 active = $7, updated_at_ms = $8
             WHERE zone_id = $1 AND id = $2",
            params![
                sink.zone_id.as_str(),
                sink.id.as_str(),
                sink.name.as_str(),
                sink.url.as_str(),
                sink.sealed_secret.as_str(),
                sink.event_types.as_str(),
                i64::from(sink.active),
                sink.updated_at_ms,
            ],
        )
        .must_change(not_found);
        self.atomic(with_outbox(update, outbox)).await.map(|_| ())
    }

    async fn delete_notification_sink(
        &self,
        zone_id: &str,
        id: &str,
        outbox: &[OutboxMessage],
    ) -> Result<(), StoreError> {
        let mut statements = vec![
            Statement::new(
                "DELETE FROM notification_deliveries WHERE zone_id = $1 AND sink_id = $2",
                params![zone_id, id],
            ),
            Statement::new(
                "DELETE FROM notification_sinks WHERE zone_id = $1 AND id = $2",
                params![zone_id, id],
            )
            .must_change(not_found),
        ];
        statements.extend(crate::store::enqueue(outbox, crate::now_ms()));
        self.atomic(statements).await.map(|_| ())
    }

    async fn get_notification_sink(
        &self,
        zone_id: &str,
        id: &str,
    ) -> Result<Option<NotificationSink>, StoreError> {
        one(
            self,
            concat!(select_sinks!(), " WHERE zone_id = $1 AND id = $2"),
            params![zone_id, id],
            sink,
        )
        .await
    }

    async fn list_notification_sinks(
        &self,
        zone_id: &str,
    ) -> Result<Vec<NotificationSink>, StoreError> {
        all(
            self,
            concat!(
                select_sinks!(),
                " WHERE zone_id = $1 ORDER BY created_at_ms, id"
            ),
            params![zone_id],
            sink,
        )
        .await
    }

    async fn live_notification_sinks(&self) -> Result<Vec<NotificationSink>, StoreError> {
        all(
            self,
            concat!(
                select_sinks!(),
                " WHERE active = 1 AND zone_id IN (SELECT id FROM zones WHERE archived_at_ms IS NULL)
                  ORDER BY id"
            ),
            params![],
            sink,
        )
        .await
    }

    async fn gather_notifications(
        &self,
        sink_id: &str,
        from_seq: i64,
        to_seq: i64,
        deliveries: &[NotificationDelivery],
    ) -> Result<(), StoreError> {
        let mut statements = vec![
            Statement::new(
                "UPDATE notification_sinks SET cursor_seq = $3 WHERE id = $1 AND cursor_seq = $2",
                params![sink_id, from_seq, to_seq],
            )
            .must_change(cursor_moved),
        ];
        statements.extend(deliveries.iter().map(|d| {
            Statement::new(
                "INSERT INTO notification_deliveries (id, sink_id, zone_id, event_id, event_type,
                     payload, attempts, available_at_ms, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8)
                 ON CONFLICT (sink_id, event_id) DO NOTHING",
                params![
                    d.id.as_str(),
                    d.sink_id.as_str(),
                    d.zone_id.as_str(),
                    d.event_id.as_str(),
                    d.event_type.as_str(),
                    d.payload.as_str(),
                    d.available_at_ms,
                    d.created_at_ms,
                ],
            )
        }));
        self.atomic(statements).await.map(|_| ())
    }

    async fn due_notifications(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<NotificationDelivery>, StoreError> {
        all(
            self,
            concat!(
                select_deliveries!(),
                " WHERE delivered_at_ms IS NULL AND abandoned_at_ms IS NULL AND available_at_ms <= $1
                    AND sink_id IN (SELECT id FROM notification_sinks WHERE active = 1)
                  ORDER BY available_at_ms, id LIMIT CAST($2 AS BIGINT)"
            ),
            params![now_ms, limit],
            delivery,
        )
        .await
    }

    async fn settle_notification(
        &self,
        delivery: &NotificationDelivery,
        outcome: &DeliveryOutcome,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let (id, sink_id) = (delivery.id.as_str(), delivery.sink_id.as_str());
        let statements = match outcome {
            DeliveryOutcome::Delivered { status } => vec![
                Statement::new(
                    "UPDATE notification_deliveries SET attempts = attempts + 1, delivered_at_ms = $2,
                         response_status = $3, last_error = NULL
                     WHERE id = $1 AND delivered_at_ms IS NULL AND abandoned_at_ms IS NULL",
                    params![id, now_ms, *status],
                ),
                Statement::new(
                    "UPDATE notification_sinks SET consecutive_failures = 0, last_success_at_ms = $2
                     WHERE id = $1",
                    params![sink_id, now_ms],
                ),
            ],
            DeliveryOutcome::Failed {
                status,
                error,
                retry_at_ms,
            } => vec![
                Statement::new(
                    "UPDATE notification_deliveries SET attempts = attempts + 1, response_status = $2,
                         last_error = $3,
                         available_at_ms = COALESCE(CAST($4 AS BIGINT), available_at_ms),
                         abandoned_at_ms = CASE WHEN CAST($4 AS BIGINT) IS NULL THEN CAST($5 AS BIGINT) END
                     WHERE id = $1 AND delivered_at_ms IS NULL AND abandoned_at_ms IS NULL",
                    params![id, *status, error.as_str(), *retry_at_ms, now_ms],
                ),
                Statement::new(
                    "UPDATE notification_sinks SET consecutive_failures = consecutive_failures + 1,
                         last_failure_at_ms = $2, last_error = $3
                     WHERE id = $1",
                    params![sink_id, now_ms, error.as_str()],
                ),
            ],
        };
        self.atomic(statements).await.map(|_| ())
    }

    async fn list_notification_deliveries(
        &self,
        sink_id: &str,
        before: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<NotificationDelivery>, StoreError> {
        let (before_ms, before_id) = before.unwrap_or((i64::MAX, ""));
        let unbounded = i64::from(before.is_none());
        all(
            self,
            concat!(
                select_deliveries!(),
                " WHERE sink_id = $1
                    AND (CAST($4 AS BIGINT) = 1 OR created_at_ms < $2 OR (created_at_ms = $2 AND id < $3))
                  ORDER BY created_at_ms DESC, id DESC LIMIT CAST($5 AS BIGINT)"
            ),
            params![sink_id, before_ms, before_id, unbounded, limit],
            delivery,
        )
        .await
    }

    async fn purge_notification_deliveries(
        &self,
        settled_before_ms: i64,
    ) -> Result<u64, StoreError> {
        let outcomes = self
            .atomic(vec![Statement::new(
                "DELETE FROM notification_deliveries
                 WHERE COALESCE(delivered_at_ms, abandoned_at_ms) < $1",
                params![settled_before_ms],
            )])
            .await?;
        Ok(outcomes.iter().map(|outcome| outcome.changed).sum())
    }
}
