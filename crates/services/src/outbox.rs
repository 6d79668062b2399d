//! The outbox dispatcher: publishes rows that committed with a state change to their streams,
//! at least once, in order of writing. Each message gains `outbox_id` (and `dedupe_key` when
//! set) so consumers can drop duplicates. Several dispatchers may run against one PostgreSQL:
//! row claims never overlap, and a stream's later rows wait while another dispatcher holds its
//! earlier ones, so one stream never goes out interleaved.

use std::sync::Arc;
use std::time::{Duration, Instant};

use caracal_bus::Producer;
use caracal_store::{OutboxFailure, Store, StoreError};

use crate::metrics::OutboxMetrics;

#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Unique per process: marks the rows this dispatcher holds.
    pub worker: String,
    pub batch: usize,
    /// How long a claimed row stays reserved if this process dies mid-publish.
    pub lease: Duration,
    /// After this many failed publishes a row is dead (and the API role not ready).
    pub max_attempts: u32,
    /// Pause between polls when the outbox is empty.
    pub idle_poll: Duration,
}

impl DispatcherConfig {
    pub fn new(worker: String) -> DispatcherConfig {
        DispatcherConfig {
            worker,
            batch: 256,
            lease: Duration::from_secs(30),
            max_attempts: 10,
            idle_poll: Duration::from_millis(25),
        }
    }
}

pub struct Dispatcher {
    store: Arc<dyn Store>,
    producer: Producer,
    config: DispatcherConfig,
    metrics: Option<Arc<OutboxMetrics>>,
}

/// Seconds before retry `attempt` (1-based): grows by a second per attempt up to a minute, plus
/// up to a second of jitter so replicas do not retry in step.
pub fn backoff(attempt: u32) -> Duration {
    let jitter_ms = caracal_crypto::random_bytes::<2>()
        .map(|bytes| u64::from(u16::from_le_bytes(bytes)) % 1000)
        .unwrap_or(500);
    Duration::from_secs(u64::from(attempt.clamp(1, 60))) + Duration::from_millis(jitter_ms)
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        producer: Producer,
        config: DispatcherConfig,
        metrics: Option<Arc<OutboxMetrics>>,
    ) -> Dispatcher {
        Dispatcher {
            store,
            producer,
            config,
            metrics,
        }
    }

    /// Publishes one batch; returns how many rows it handled (published or failed). Rows go out
    /// in id order, each run of rows for the same stream as one append.
    pub async fn drain_once(&self) -> Result<usize, StoreError> {
        let rows = self
            .store
            .claim_outbox(&self.config.worker, self.config.batch, self.config.lease)
            .await?;
        let (mut sent, mut first_error) = (Vec::with_capacity(rows.len()), None);
        // A stream whose run failed sends nothing more in this batch: its later rows wait
        // (their claim lapses) until the failed one goes out, so the stream keeps its order.
        let mut failed_streams: Vec<&str> = Vec::new();
        for run in rows.chunk_by(|left, right| left.stream == right.stream) {
            let Some(stream) = run.first().map(|row| row.stream.as_str()) else {
                continue;
            };
            if failed_streams.contains(&stream) {
                continue;
            }
            let messages = run
                .iter()
                .map(|row| {
                    let mut fields = row.fields.clone();
                    fields.insert("outbox_id".to_owned(), row.id.to_string());
                    if let Some(dedupe_key) = &row.dedupe_key {
                        fields.insert("dedupe_key".to_owned(), dedupe_key.clone());
                    }
                    fields
                })
                .collect();
            match self.producer.publish_many(stream, messages).await {
                Ok(_) => sent.extend(run.iter().map(|row| row.id)),
                Err(error) => {
                    failed_streams.push(stream);
                    for row in run {
                        if let Err(store_error) = self.record_failure(row, &error.to_string()).await
                        {
                            // The row stays held until its lease ends, then is sent again.
                            first_error.get_or_insert(store_error);
                        }
                    }
                }
            }
        }
        // Only rows known to be sent are marked; anything else is retried, never lost.
        self.store
            .outbox_published(&self.config.worker, &sent)
            .await?;
        if let Some(error) = first_error {
            return Err(error);
        }
        Ok(rows.len())
    }

    async fn record_failure(
        &self,
        row: &caracal_store::OutboxRow,
        error: &str,
    ) -> Result<(), StoreError> {
        let attempt = row.attempts.saturating_add(1);
        let outcome = self
            .store
            .outbox_failed(row.id, error, backoff(attempt), self.config.max_attempts)
            .await?;
        tracing::warn!(outbox_id = row.id, attempt, %error, ?outcome, "outbox publish failed");
        if let (OutboxFailure::Dead, Some(metrics)) = (outcome, &self.metrics) {
            metrics.dead_total.inc();
        }
        Ok(())
    }

    async fn refresh_gauges(&self) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        match self.store.outbox_stats().await {
            Ok(stats) => metrics.observe(&stats),
            Err(error) => tracing::warn!(%error, "outbox stats unavailable"),
        }
    }

    /// Drains until `stop` turns true. Store errors are logged and retried after a pause; the
    /// rows stay in the outbox, so nothing is lost while the store or the bus is down.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut last_refresh: Option<Instant> = None;
        loop {
            if *stop.borrow() {
                return;
            }
            let pause = match self.drain_once().await {
                Ok(0) => self.config.idle_poll,
                Ok(_) => Duration::ZERO,
                Err(error) => {
                    tracing::warn!(%error, "outbox dispatcher cannot reach the store");
                    Duration::from_secs(1)
                }
            };
            if last_refresh.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                self.refresh_gauges().await;
                last_refresh = Some(Instant::now());
            }
            if !pause.is_zero() {
                tokio::select! {
                    _ = stop.changed() => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use caracal_bus::signature::{StreamKey, verify};
    use caracal_bus::{EmbeddedBus, Streams};
    use caracal_store::{Directory as _, NewZone, Outbox as _, OutboxMessage, SqliteStore};

    use super::*;
    use crate::test_support::DownBus;

    fn revoke(n: usize) -> OutboxMessage {
        OutboxMessage {
            stream: "caracal.sessions.revoke".into(),
            fields: BTreeMap::from([
                ("zone_id".into(), format!("zone-{n}")),
                ("reason".into(), "test".into()),
            ]),
            dedupe_key: Some(format!("revoke-{n}")),
        }
    }

    async fn store_with_rows(count: usize) -> (tempfile::TempDir, SqliteStore) {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        for n in 0..count {
            let zone = NewZone {
                id: format!("zone-{n}"),
                name: format!("Zone {n}"),
                slug: format!("zone-{n}"),
            };
            store.create_zone(&zone, &[revoke(n)]).await.unwrap();
        }
        (directory, store)
    }

    #[tokio::test]
    async fn rows_are_published_signed_with_their_outbox_id_and_dedupe_key() {
        let (_directory, store) = store_with_rows(3).await;
        let bus = Arc::new(EmbeddedBus::new(store.clone()));
        let key = StreamKey::new(b"stream key");
        let metrics = Arc::new(OutboxMetrics::default());
        let dispatcher = Dispatcher::new(
            Arc::new(store.clone()),
            Producer::new(bus.clone(), key.clone()),
            DispatcherConfig::new("test".into()),
            Some(Arc::clone(&metrics)),
        );
        assert_eq!(dispatcher.drain_once().await.unwrap(), 3);
        assert_eq!(dispatcher.drain_once().await.unwrap(), 0);

        bus.ensure_group("caracal.sessions.revoke", "gateway")
            .await
            .unwrap();
        let entries = bus
            .read_group(
                "caracal.sessions.revoke",
                "gateway",
                "c",
                10,
                Duration::ZERO,
            )
            .await
            .unwrap();
        assert_eq!(entries.len(), 3);
        for (n, entry) in entries.iter().enumerate() {
            assert_eq!(
                verify(&key, "caracal.sessions.revoke", &entry.fields),
                Ok(())
            );
            assert_eq!(entry.fields["zone_id"], format!("zone-{n}"));
            assert_eq!(entry.fields["dedupe_key"], format!("revoke-{n}"));
            assert!(entry.fields["outbox_id"].parse::<i64>().is_ok());
        }
        dispatcher.refresh_gauges().await;
        assert_eq!(
            (metrics.pending_rows.get(), metrics.dead_rows.get()),
            (0, 0)
        );
    }

    #[tokio::test]
    async fn a_bus_outage_keeps_rows_until_the_bound_then_marks_them_dead() {
        let (_directory, store) = store_with_rows(1).await;
        let metrics = Arc::new(OutboxMetrics::default());
        let config = DispatcherConfig {
            max_attempts: 2,
            ..DispatcherConfig::new("test".into())
        };
        let down = Dispatcher::new(
            Arc::new(store.clone()),
            Producer::new(Arc::new(DownBus), StreamKey::new(b"k")),
            config,
            Some(Arc::clone(&metrics)),
        );
        assert_eq!(down.drain_once().await.unwrap(), 1);
        let stats = store.outbox_stats().await.unwrap();
        assert_eq!((stats.pending, stats.dead), (1, 0), "kept for a retry");
        assert_eq!(down.drain_once().await.unwrap(), 0, "backing off");

        // Make the retry due now, then fail it again: the second failure is the last.
        store
            .run_blocking(|connection| {
                connection.execute("UPDATE outbox SET available_at_ms = 0", [])
            })
            .unwrap();
        assert_eq!(down.drain_once().await.unwrap(), 1);
        let stats = store.outbox_stats().await.unwrap();
        assert_eq!((stats.pending, stats.dead), (0, 1));
        assert_eq!(metrics.dead_total.get(), 1);
        down.refresh_gauges().await;
        assert_eq!(metrics.dead_rows.get(), 1);
    }

    #[tokio::test]
    async fn interleaved_streams_keep_their_order() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        let streams = ["a", "a", "b", "a", "b", "b", "a"];
        let outbox: Vec<OutboxMessage> = streams
            .iter()
            .enumerate()
            .map(|(n, stream)| OutboxMessage {
                stream: (*stream).to_owned(),
                fields: BTreeMap::from([("n".into(), n.to_string())]),
                dedupe_key: None,
            })
            .collect();
        let zone = NewZone {
            id: "z".into(),
            name: "z".into(),
            slug: "z".into(),
        };
        store.create_zone(&zone, &outbox).await.unwrap();
        let bus = Arc::new(EmbeddedBus::new(store.clone()));
        let dispatcher = Dispatcher::new(
            Arc::new(store.clone()),
            Producer::new(bus.clone(), StreamKey::new(b"k")),
            DispatcherConfig::new("test".into()),
            None,
        );
        assert_eq!(dispatcher.drain_once().await.unwrap(), 7);
        for (stream, expected) in [
            ("a", ["0", "1", "3", "6"].as_slice()),
            ("b", ["2", "4", "5"].as_slice()),
        ] {
            bus.ensure_group(stream, "g").await.unwrap();
            let entries = bus
                .read_group(stream, "g", "c", 10, Duration::ZERO)
                .await
                .unwrap();
            let numbers: Vec<&str> = entries
                .iter()
                .map(|entry| entry.fields["n"].as_str())
                .collect();
            assert_eq!(numbers, expected, "stream {stream}");
        }
    }

    #[test]
    fn backoff_grows_per_attempt_up_to_a_minute() {
        for (attempt, floor) in [(1, 1), (2, 2), (30, 30), (60, 60), (500, 60)] {
            let delay = backoff(attempt);
            assert!(delay >= Duration::from_secs(floor), "{attempt}: {delay:?}");
            assert!(
                delay < Duration::from_secs(floor + 1),
                "{attempt}: {delay:?}"
            );
        }
    }
}
