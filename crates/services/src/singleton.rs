//! Jobs that must run on exactly one replica at a time (sweepers, retention). Each runs only
//! while its process holds the job's lease in the shared store; if the holder dies, the lease
//! expires and another replica takes over.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use caracal_bus::{ReplayRegistry, Streams};
use caracal_store::Store;

/// Runs `job` once per `period` while holding lease `name` as `holder`, until `stop` turns true;
/// then releases the lease so another replica can take over at once.
pub async fn run_singleton<F, Fut>(
    store: Arc<dyn Store>,
    name: &'static str,
    holder: String,
    period: Duration,
    job: F,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    // A lease outlives a few missed renewals, not more.
    let ttl = period.saturating_mul(3);
    loop {
        if *stop.borrow() {
            break;
        }
        match store.try_lease(name, &holder, ttl).await {
            Ok(true) => job().await,
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(job = name, %error, "cannot renew the job lease; not running it")
            }
        }
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(period) => {}
        }
    }
    if let Err(error) = store.release_lease(name, &holder).await {
        tracing::warn!(job = name, %error, "could not release the job lease; it will expire");
    }
}

/// Retention: forgets expired idempotency receipts and replay keys, notification deliveries
/// settled a week ago, and the stream entries every consumer group has read and acknowledged
/// (an audit event, once in the ledger, is not kept twice).
pub async fn retention(store: &dyn Store, replay: &dyn ReplayRegistry, streams: &dyn Streams) {
    for stream in caracal_bus::stream_names::ALL {
        match streams.trim_consumed(stream).await {
            Ok(0) => {}
            Ok(trimmed) => tracing::debug!(stream, trimmed, "consumed stream entries trimmed"),
            Err(error) => tracing::warn!(stream, %error, "stream trim failed"),
        }
    }
    match store.purge_idempotency_receipts().await {
        Ok(0) => {}
        Ok(purged) => tracing::debug!(purged, "expired idempotency receipts purged"),
        Err(error) => tracing::warn!(%error, "idempotency receipt purge failed"),
    }
    if let Err(error) = replay.purge_expired().await {
        tracing::warn!(%error, "replay key purge failed");
    }
    // Registered clients are archived a day after they expire (they are refused from expiry on).
    match store
        .archive_lapsed_dcr_applications(caracal_store::now_ms().saturating_sub(24 * 3600 * 1000))
        .await
    {
        Ok(0) => {}
        Ok(archived) => tracing::debug!(archived, "lapsed registered applications archived"),
        Err(error) => tracing::warn!(%error, "archiving lapsed registered applications failed"),
    }
    let keep = i64::try_from(crate::notifier::RETENTION.as_millis()).unwrap_or(i64::MAX);
    match store
        .purge_notification_deliveries(caracal_store::now_ms().saturating_sub(keep))
        .await
    {
        Ok(0) => {}
        Ok(purged) => tracing::debug!(purged, "settled notification deliveries purged"),
        Err(error) => tracing::warn!(%error, "notification delivery purge failed"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use caracal_store::SqliteStore;

    use super::*;

    fn runner(
        store: &SqliteStore,
        holder: &str,
        runs: Arc<AtomicU32>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let store: Arc<dyn Store> = Arc::new(store.clone());
        let holder = holder.to_owned();
        tokio::spawn(run_singleton(
            store,
            "retention",
            holder,
            Duration::from_millis(20),
            move || {
                let runs = Arc::clone(&runs);
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                }
            },
            stop,
        ))
    }

    #[tokio::test]
    async fn one_replica_runs_the_job_and_another_takes_over_when_it_stops() {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        let (a_runs, b_runs) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (stop_a, stopped_a) = tokio::sync::watch::channel(false);
        let (stop_b, stopped_b) = tokio::sync::watch::channel(false);
        let a = runner(&store, "replica-a", Arc::clone(&a_runs), stopped_a);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let b = runner(&store, "replica-b", Arc::clone(&b_runs), stopped_b);
        // Counted, not timed: a loaded machine runs fewer rounds in a given time.
        let reaches = async |runs: &AtomicU32, count: u32| {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while runs.load(Ordering::SeqCst) < count && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            runs.load(Ordering::SeqCst) >= count
        };
        assert!(reaches(&a_runs, 5).await, "the leader runs the job");
        assert_eq!(b_runs.load(Ordering::SeqCst), 0, "the follower never does");

        stop_a.send(true).unwrap();
        a.await.unwrap();
        let handed_over = a_runs.load(Ordering::SeqCst);
        assert!(
            reaches(&b_runs, 5).await,
            "the follower takes over once the lease is released"
        );
        assert_eq!(a_runs.load(Ordering::SeqCst), handed_over);
        stop_b.send(true).unwrap();
        b.await.unwrap();
    }

    #[tokio::test]
    async fn retention_trims_what_every_group_has_consumed() {
        use caracal_bus::{EmbeddedBus, Fields, stream_names::AUDIT_EVENTS};
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        let bus = EmbeddedBus::new(store.clone());
        bus.ensure_group(AUDIT_EVENTS, "audit-ingestor")
            .await
            .unwrap();
        let entries: Vec<Fields> = (0..3)
            .map(|n| Fields::from([("n".to_owned(), n.to_string())]))
            .collect();
        let ids = bus.append_many(AUDIT_EVENTS, &entries).await.unwrap();
        bus.read_group(AUDIT_EVENTS, "audit-ingestor", "c", 10, Duration::ZERO)
            .await
            .unwrap();
        bus.ack(AUDIT_EVENTS, "audit-ingestor", &ids[..2])
            .await
            .unwrap();
        retention(&store, &bus, &bus).await;
        let left = bus.range(AUDIT_EVENTS, None, 10).await.unwrap();
        assert_eq!(left.len(), 1, "the unacknowledged entry stays");
        assert_eq!(left[0].id, ids[2]);
    }
}
