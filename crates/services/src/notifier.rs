//! Approval notifications. Each active sink follows its zone's ledger from its cursor: every
//! approval event it subscribes to becomes one delivery row, and each due row is `POST`ed to
//! the sink, signed with the sink's secret, through the Gateway's address guard. A failure is
//! retried with a growing delay, eight attempts in all; settled rows are kept seven days.
//!
//! Reading the ledger, not the requests, means a notification exists only for what the ledger
//! holds, and none is lost to a crash between a step and its notification. Delivery is at
//! least once: a receiver tells repeats apart by `X-Caracal-Delivery`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use caracal_store::{
    AuditEvent, DeliveryOutcome, NotificationDelivery, NotificationSink, Store, StoreError, now_ms,
};
use serde_json::{Value, json};

use crate::metrics::NotifierMetrics;
use crate::state::Shared;

/// What a sink may subscribe to.
pub const EVENT_TYPES: [&str; 3] = ["step_up_issued", "step_up_decided", "step_up_consumed"];
/// How often the notifier runs; its lease (three rounds) outlasts a round's slowest send.
pub const ROUND: Duration = Duration::from_secs(5);
/// Attempts before a delivery is abandoned.
pub const MAX_ATTEMPTS: i64 = 8;
/// How long one attempt may take.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long delivered and abandoned rows are kept.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The KEK purpose sink secrets are sealed under.
pub const SEAL_PURPOSE: &str = "notification-sink-secret";
/// Ledger rows one sink reads in a round, and deliveries gathered or sent in a round.
const SCAN_WINDOW: i64 = 10_000;
const BATCH: i64 = 100;

/// One round: every live sink's new events gathered, then the due deliveries sent.
pub async fn run_once(shared: &Shared, metrics: &Arc<NotifierMetrics>) {
    let sinks = match shared.store.live_notification_sinks().await {
        Ok(sinks) => sinks,
        Err(error) => {
            tracing::warn!(%error, "notification sinks unreadable; nothing sent this round");
            return;
        }
    };
    if sinks.is_empty() {
        return;
    }
    for sink in &sinks {
        if let Err(error) = gather(shared.store.as_ref(), sink).await {
            tracing::warn!(sink = %sink.id, %error, "notification events not gathered");
        }
    }
    let sinks: HashMap<&str, &NotificationSink> =
        sinks.iter().map(|sink| (sink.id.as_str(), sink)).collect();
    if let Err(error) = send_due(shared, &sinks, metrics).await {
        tracing::warn!(%error, "due notifications not sent");
    }
}

/// Turns the sink's next approval events into deliveries and moves its cursor past them.
async fn gather(store: &dyn Store, sink: &NotificationSink) -> Result<(), StoreError> {
    let Some((head, _)) = store.audit_head(&sink.zone_id).await? else {
        return Ok(());
    };
    if head <= sink.cursor_seq {
        return Ok(());
    }
    let through = head.min(sink.cursor_seq.saturating_add(SCAN_WINDOW));
    let events = store
        .approval_events(&sink.zone_id, sink.cursor_seq, through, BATCH)
        .await?;
    let to = match events.last() {
        Some(last) if events.len() as i64 == BATCH => last.chain_seq,
        _ => through,
    };
    let subscribed: Vec<String> = serde_json::from_str(&sink.event_types).unwrap_or_default();
    let now = now_ms();
    let deliveries: Vec<NotificationDelivery> = events
        .iter()
        .filter(|event| subscribed.contains(&event.event_type))
        .map(|event| delivery(sink, event, now))
        .collect();
    match store
        .gather_notifications(&sink.id, sink.cursor_seq, to, &deliveries)
        .await
    {
        // Another notifier moved the cursor first: what it read is gathered.
        Err(StoreError::Conflict(_)) => Ok(()),
        other => other,
    }
}

fn delivery(sink: &NotificationSink, event: &AuditEvent, now: i64) -> NotificationDelivery {
    let id = uuid::Uuid::now_v7().to_string();
    let payload = json!({
        "id": id,
        "type": event.event_type,
        "zone_id": event.zone_id,
        "event_id": event.id,
        "request_id": event.request_id,
        "occurred_at": crate::wire::rfc3339(event.occurred_at_ms),
        "data": shown_metadata(&event.metadata),
    });
    NotificationDelivery {
        id,
        sink_id: sink.id.clone(),
        zone_id: sink.zone_id.clone(),
        event_id: event.id.clone(),
        event_type: event.event_type.clone(),
        payload: payload.to_string(),
        attempts: 0,
        available_at_ms: now,
        delivered_at_ms: None,
        abandoned_at_ms: None,
        response_status: None,
        last_error: None,
        created_at_ms: now,
    }
}

/// The event's metadata as a sink sees it: who approved is named only when the hold's
/// privacy mode is `identified`.
fn shown_metadata(metadata: &str) -> Value {
    let mut metadata: Value = serde_json::from_str(metadata).unwrap_or_else(|_| json!({}));
    if let Some(fields) = metadata.as_object_mut()
        && fields.get("privacy_mode").and_then(Value::as_str) != Some("identified")
    {
        fields.remove("approver_id");
    }
    metadata
}

async fn send_due(
    shared: &Shared,
    sinks: &HashMap<&str, &NotificationSink>,
    metrics: &Arc<NotifierMetrics>,
) -> Result<(), StoreError> {
    let due = shared.store.due_notifications(now_ms(), BATCH).await?;
    if due.is_empty() {
        return Ok(());
    }
    let client = crate::gateway::upstream_client();
    let mut sends = tokio::task::JoinSet::new();
    for delivery in due {
        let Some(sink) = sinks.get(delivery.sink_id.as_str()) else {
            continue;
        };
        let (shared, sink, client) = (shared.clone(), (*sink).clone(), client.clone());
        let metrics = Arc::clone(metrics);
        sends.spawn(async move {
            let attempt = match &client {
                Ok(client) => send(&shared, client, &sink, &delivery).await,
                Err(error) => Err((None, error.clone())),
            };
            let outcome = match attempt {
                Ok(status) => DeliveryOutcome::Delivered { status },
                Err((status, error)) => DeliveryOutcome::Failed {
                    status,
                    error,
                    retry_at_ms: retry_at(delivery.attempts + 1, now_ms()),
                },
            };
            match &outcome {
                DeliveryOutcome::Delivered { .. } => metrics.delivered.inc(),
                DeliveryOutcome::Failed {
                    retry_at_ms: Some(_),
                    ..
                } => metrics.retried.inc(),
                DeliveryOutcome::Failed { .. } => metrics.abandoned.inc(),
            };
            if let Err(error) = shared
                .store
                .settle_notification(&delivery, &outcome, now_ms())
                .await
            {
                tracing::warn!(delivery = %delivery.id, %error, "a notification's outcome was not stored");
            }
        });
    }
    while sends.join_next().await.is_some() {}
    Ok(())
}

/// When attempt `attempts + 1` is due: 5 s after the first failure, doubling to 10 minutes at
/// most; `None` once [`MAX_ATTEMPTS`] have failed.
pub fn retry_at(attempts: i64, now: i64) -> Option<i64> {
    (attempts < MAX_ATTEMPTS).then(|| {
        let doubling = u32::try_from(attempts.clamp(1, 16) - 1).unwrap_or(0);
        now + (5_000_i64 << doubling).min(600_000)
    })
}

/// One attempt: the status of a 2xx answer, or the status (if any) and why it failed.
async fn send(
    shared: &Shared,
    client: &crate::gateway::UpstreamClient,
    sink: &NotificationSink,
    delivery: &NotificationDelivery,
) -> Result<i64, (Option<i64>, String)> {
    let secret = shared
        .kek
        .open(SEAL_PURPOSE, &sink.sealed_secret)
        .map_err(|_| {
            (
                None,
                "the sink's secret does not open with this KEK".to_owned(),
            )
        })?;
    let uri = crate::gateway::upstream::check_url(&sink.url, &shared.upstream_host_allowlist)
        .await
        .map_err(|error| (None, error.to_string()))?;
    let timestamp = (now_ms() / 1000).to_string();
    let request = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "caracal-notifier")
        .header("x-caracal-event", &delivery.event_type)
        .header("x-caracal-delivery", &delivery.id)
        .header("x-caracal-sink", &sink.id)
        .header("x-caracal-timestamp", &timestamp)
        .header(
            "x-caracal-signature",
            signature(&secret, &timestamp, &delivery.payload),
        )
        .body(http_body_util::Limited::new(
            axum::body::Body::from(delivery.payload.clone()),
            delivery.payload.len(),
        ))
        .map_err(|error| (None, error.to_string()))?;
    match tokio::time::timeout(SEND_TIMEOUT, client.request(request)).await {
        Ok(Ok(response)) if response.status().is_success() => {
            Ok(i64::from(response.status().as_u16()))
        }
        Ok(Ok(response)) => Err((
            Some(i64::from(response.status().as_u16())),
            format!("answered {}", response.status()),
        )),
        Ok(Err(error)) => Err((None, error.to_string())),
        Err(_) => Err((
            None,
            format!("no answer within {} s", SEND_TIMEOUT.as_secs()),
        )),
    }
}

/// `v1=` and the hex HMAC-SHA256, under the sink's secret, of `<timestamp>.<body>`.
pub fn signature(secret: &[u8], timestamp: &str, body: &str) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let mut context = aws_lc_rs::hmac::Context::with_key(&key);
    context.update(timestamp.as_bytes());
    context.update(b".");
    context.update(body.as_bytes());
    format!("v1={}", caracal_crypto::hex(context.sign().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_five_seconds_to_ten_minutes_and_stop_at_eight_attempts() {
        let delays: Vec<Option<i64>> = (1..=9).map(|attempts| retry_at(attempts, 0)).collect();
        assert_eq!(
            delays,
            [
                Some(5_000),
                Some(10_000),
                Some(20_000),
                Some(40_000),
                Some(80_000),
                Some(160_000),
                Some(320_000),
                None,
                None
            ]
        );
    }

    #[test]
    fn the_signature_covers_the_timestamp_and_the_body() {
        let signed = signature(b"nsk_secret", "1700000000", r#"{"a":1}"#);
        assert!(
            signed.starts_with("v1=") && signed.len() == 3 + 64,
            "{signed}"
        );
        assert_ne!(signed, signature(b"nsk_secret", "1700000001", r#"{"a":1}"#));
        assert_ne!(signed, signature(b"nsk_secret", "1700000000", r#"{"a":2}"#));
        assert_ne!(signed, signature(b"nsk_other", "1700000000", r#"{"a":1}"#));
    }

    #[test]
    fn an_approver_is_named_to_sinks_only_when_the_hold_is_identified() {
        let identified =
            shown_metadata(r#"{"privacy_mode":"identified","approver_id":"subject:u"}"#);
        assert_eq!(identified["approver_id"], "subject:u");
        let pseudonymous =
            shown_metadata(r#"{"privacy_mode":"pseudonymous","approver_id":"subject:u"}"#);
        assert!(pseudonymous.get("approver_id").is_none());
        assert!(
            shown_metadata(r#"{"approver_id":"x"}"#)
                .get("approver_id")
                .is_none()
        );
    }
}
