use std::time::Duration;

use caracal_bus::signature::{StreamKey, verify};
use caracal_bus::{BusError, EmbeddedBus, Entry, PendingEntry, StreamInfo, Streams};
use caracal_store::SqliteStore;

use super::*;

/// The embedded bus behind a switch: when `down`, appends fail as Redis's do in an outage;
/// `delay` slows every append.
struct SwitchBus {
    inner: EmbeddedBus,
    down: AtomicBool,
    delay: Duration,
}

#[async_trait::async_trait]
impl Streams for SwitchBus {
    async fn append(&self, stream: &str, fields: &Fields) -> Result<String, BusError> {
        let mut ids = self
            .append_many(stream, std::slice::from_ref(fields))
            .await?;
        ids.pop().ok_or_else(|| BusError::Protocol("no id".into()))
    }
    async fn append_many(&self, stream: &str, entries: &[Fields]) -> Result<Vec<String>, BusError> {
        tokio::time::sleep(self.delay).await;
        if self.down.load(Ordering::SeqCst) {
            return Err(BusError::Unavailable("connection refused".into()));
        }
        self.inner.append_many(stream, entries).await
    }
    async fn ensure_group(&self, stream: &str, group: &str) -> Result<(), BusError> {
        self.inner.ensure_group(stream, group).await
    }
    async fn ensure_group_at_end(&self, stream: &str, group: &str) -> Result<(), BusError> {
        self.inner.ensure_group_at_end(stream, group).await
    }
    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, BusError> {
        self.inner
            .read_group(stream, group, consumer, count, block)
            .await
    }
    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64, BusError> {
        self.inner.ack(stream, group, ids).await
    }
    async fn pending(
        &self,
        stream: &str,
        group: &str,
        count: usize,
    ) -> Result<Vec<PendingEntry>, BusError> {
        self.inner.pending(stream, group, count).await
    }
    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>, BusError> {
        self.inner
            .claim_idle(stream, group, consumer, min_idle, count)
            .await
    }
    async fn info(&self, stream: &str) -> Result<StreamInfo, BusError> {
        self.inner.info(stream).await
    }
    async fn range(
        &self,
        stream: &str,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<Entry>, BusError> {
        self.inner.range(stream, after, count).await
    }
    async fn delete(&self, stream: &str, ids: &[String]) -> Result<u64, BusError> {
        self.inner.delete(stream, ids).await
    }
    async fn trim_consumed(&self, stream: &str) -> Result<u64, BusError> {
        self.inner.trim_consumed(stream).await
    }
    async fn ping(&self) -> Result<(), BusError> {
        self.inner.ping().await
    }
}

struct Fixture {
    directory: tempfile::TempDir,
    bus: Arc<SwitchBus>,
    key: StreamKey,
}

impl Fixture {
    fn new(delay: Duration) -> Fixture {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        Fixture {
            directory,
            bus: Arc::new(SwitchBus {
                inner: EmbeddedBus::new(store),
                down: AtomicBool::new(false),
                delay,
            }),
            key: StreamKey::new(b"stream key"),
        }
    }

    fn replay_dir(&self) -> PathBuf {
        self.directory.path().join("audit-replay")
    }

    fn start(&self, tune: impl FnOnce(&mut EvidenceConfig)) -> (Evidence, EvidenceTasks) {
        let mut config = EvidenceConfig::new(self.replay_dir());
        config.replay_interval = Duration::from_millis(50);
        tune(&mut config);
        Evidence::start(Producer::new(self.bus.clone(), self.key.clone()), config).unwrap()
    }

    /// Every event on the audit stream, signatures checked.
    async fn stream_events(&self) -> Vec<Event> {
        let info = self.bus.info(stream_names::AUDIT_EVENTS).await.unwrap();
        if info.length == 0 {
            return Vec::new();
        }
        let group = format!("reader-{}", uuid::Uuid::now_v7());
        self.bus
            .ensure_group(stream_names::AUDIT_EVENTS, &group)
            .await
            .unwrap();
        let entries = self
            .bus
            .read_group(
                stream_names::AUDIT_EVENTS,
                &group,
                "c",
                100_000,
                Duration::ZERO,
            )
            .await
            .unwrap();
        entries
            .iter()
            .map(|entry| {
                assert_eq!(
                    verify(&self.key, stream_names::AUDIT_EVENTS, &entry.fields),
                    Ok(())
                );
                Event::parse(entry.fields["data"].as_bytes()).unwrap()
            })
            .collect()
    }
}

fn event(n: usize) -> Event {
    Event {
        id: format!("ev-{n}"),
        zone_id: "zone-1".into(),
        event_type: "gateway.request".into(),
        request_id: format!("req-{n}"),
        decision: "allow".into(),
        policy_set_id: None,
        policy_set_version_id: None,
        manifest_sha: None,
        evaluation_status: "complete".into(),
        determining_policies_json: serde_json::json!([]),
        diagnostics_json: serde_json::json!([]),
        metadata_json: serde_json::json!({"n": n}),
        occurred_at_ms: 1_760_000_000_000,
    }
}

/// Records every event from a task of its own, all at once; each must be accepted.
async fn record_concurrently(evidence: &Evidence, events: impl Iterator<Item = Event>) {
    let recorders: Vec<_> = events
        .map(|event| {
            let evidence = evidence.clone();
            tokio::spawn(async move { evidence.record(event).await })
        })
        .collect();
    for recorder in recorders {
        recorder.await.unwrap().unwrap();
    }
}

fn ids(events: &[Event]) -> std::collections::BTreeSet<String> {
    events.iter().map(|event| event.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_events_reach_the_stream_signed() {
    let fixture = Fixture::new(Duration::ZERO);
    let (evidence, tasks) = fixture.start(|_| {});
    record_concurrently(&evidence, (0..200).map(event)).await;
    tasks.shutdown().await;
    let stored = fixture.stream_events().await;
    assert_eq!(stored.len(), 200);
    assert_eq!(ids(&stored), ids(&(0..200).map(event).collect::<Vec<_>>()));
    assert_eq!(stored.iter().find(|e| e.id == "ev-7").unwrap(), &event(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_outage_spills_to_replay_files_that_are_resent_on_recovery() {
    let fixture = Fixture::new(Duration::ZERO);
    let (evidence, tasks) = fixture.start(|_| {});
    fixture.bus.down.store(true, Ordering::SeqCst);
    for n in 0..20 {
        evidence.record(event(n)).await.unwrap();
    }
    assert!(!evidence.is_lost());
    assert_eq!(evidence.metrics().spilled_total.get(), 20);
    assert!(
        std::fs::read_dir(fixture.replay_dir()).unwrap().count() > 0,
        "replay files were written"
    );
    assert!(fixture.stream_events().await.is_empty());

    fixture.bus.down.store(false, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fixture.stream_events().await.len() < 20 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tasks.shutdown().await;
    let stored = fixture.stream_events().await;
    assert_eq!(ids(&stored), ids(&(0..20).map(event).collect::<Vec<_>>()));
    assert_eq!(stored.len(), 20, "nothing doubled");
    assert_eq!(
        std::fs::read_dir(fixture.replay_dir()).unwrap().count(),
        0,
        "replay files are gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_bus_and_disk_both_fail_evidence_is_lost_and_the_latch_holds() {
    let fixture = Fixture::new(Duration::ZERO);
    let (evidence, tasks) = fixture.start(|_| {});
    fixture.bus.down.store(true, Ordering::SeqCst);
    // The replay directory becomes unusable.
    std::fs::remove_dir_all(fixture.replay_dir()).unwrap();
    std::fs::write(fixture.replay_dir(), "not a directory").unwrap();
    assert_eq!(evidence.record(event(1)).await, Err(EvidenceError::Lost));
    assert!(evidence.is_lost());
    assert_eq!(evidence.metrics().lost_total.get(), 1);
    fixture.bus.down.store(false, Ordering::SeqCst);
    assert_eq!(
        evidence.record(event(2)).await,
        Err(EvidenceError::Lost),
        "latched even after the bus returns"
    );
    tasks.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_answers_overloaded_and_drops_nothing_it_accepted() {
    let fixture = Fixture::new(Duration::from_millis(300));
    let (evidence, tasks) = fixture.start(|config| {
        config.capacity = 2;
        config.batch = 1;
        config.enqueue_wait = Duration::from_millis(30);
    });
    let recorders: Vec<_> = (0..12)
        .map(|n| {
            let evidence = evidence.clone();
            tokio::spawn(async move { (n, evidence.record(event(n)).await) })
        })
        .collect();
    let mut accepted = Vec::new();
    let mut overloaded = 0;
    for recorder in recorders {
        match recorder.await.unwrap() {
            (n, Ok(())) => accepted.push(event(n)),
            (_, Err(EvidenceError::Overloaded)) => overloaded += 1,
            (n, Err(error)) => panic!("event {n}: {error}"),
        }
    }
    assert!(overloaded > 0, "back-pressure answered some callers");
    assert!(!accepted.is_empty());
    assert_eq!(evidence.metrics().overloaded_total.get(), overloaded);
    tasks.shutdown().await;
    assert_eq!(
        ids(&fixture.stream_events().await),
        ids(&accepted),
        "every accepted event was written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_what_is_buffered() {
    let fixture = Fixture::new(Duration::from_millis(20));
    let (evidence, tasks) = fixture.start(|config| config.batch = 5);
    let recorders: Vec<_> = (0..50)
        .map(|n| {
            let evidence = evidence.clone();
            tokio::spawn(async move { evidence.record(event(n)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    tasks.shutdown().await;
    let mut acknowledged = Vec::new();
    for (n, recorder) in recorders.into_iter().enumerate() {
        match recorder.await.unwrap() {
            Ok(()) => acknowledged.push(event(n)),
            Err(EvidenceError::Stopped) => {}
            Err(error) => panic!("{error}"),
        }
    }
    assert!(!acknowledged.is_empty());
    // Exactly what callers were told is recorded is on the stream: nothing acknowledged is
    // missing, nothing refused was written.
    assert_eq!(ids(&fixture.stream_events().await), ids(&acknowledged));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_files_left_by_an_earlier_run_are_sent_on_start() {
    let fixture = Fixture::new(Duration::ZERO);
    std::fs::create_dir_all(fixture.replay_dir()).unwrap();
    let spill = Spill {
        directory: fixture.replay_dir(),
        counter: Arc::new(AtomicU64::new(0)),
    };
    spill.write(&(0..5).map(event).collect::<Vec<_>>()).unwrap();
    let (_evidence, tasks) = fixture.start(|_| {});
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fixture.stream_events().await.len() < 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tasks.shutdown().await;
    assert_eq!(fixture.stream_events().await.len(), 5);
    assert_eq!(std::fs::read_dir(fixture.replay_dir()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_corrupt_replay_file_is_kept_for_the_operator_and_latches_evidence_lost() {
    let fixture = Fixture::new(Duration::ZERO);
    std::fs::create_dir_all(fixture.replay_dir()).unwrap();
    let spill = Spill {
        directory: fixture.replay_dir(),
        counter: Arc::new(AtomicU64::new(0)),
    };
    spill.write(&(0..3).map(event).collect::<Vec<_>>()).unwrap();
    let file = spill.pending().remove(0);
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("{\"id\": not json\n");
    std::fs::write(&file, text).unwrap();
    let (evidence, tasks) = fixture.start(|_| {});
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !evidence.is_lost() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tasks.shutdown().await;
    assert!(evidence.is_lost(), "an unreadable replay line must latch");
    assert_eq!(evidence.metrics().lost_total.get(), 1);
    assert_eq!(
        fixture.stream_events().await.len(),
        3,
        "readable events still sent"
    );
    let kept: Vec<String> = std::fs::read_dir(fixture.replay_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept.len(), 1);
    assert!(kept[0].ends_with(".ndjson.unreadable"), "{kept:?}");
}

/// An evidence producer that appends to the ledger of `store` directly.
fn start_direct(
    fixture: &Fixture,
    store: Arc<dyn Store>,
    kek: &caracal_crypto::Kek,
) -> (Evidence, EvidenceTasks) {
    fixture.start(|config| {
        config.ledger = Some(DirectLedger {
            store,
            kek: kek.clone(),
        });
    })
}

/// [`start_direct`] on a ledger of its own, with a fresh key-encryption key.
fn start_on_a_ledger(
    fixture: &Fixture,
) -> (Arc<dyn Store>, caracal_crypto::Kek, Evidence, EvidenceTasks) {
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&fixture.directory.path().join("ledger.db")).unwrap());
    let kek = caracal_crypto::Kek::generate().unwrap();
    let (evidence, tasks) = start_direct(fixture, Arc::clone(&store), &kek);
    (store, kek, evidence, tasks)
}

/// The zone's stored events, after checking its chain is whole and unbroken.
async fn verified_chain(store: &dyn Store, kek: &caracal_crypto::Kek, zone: &str) -> Vec<String> {
    let rows = store.audit_range(zone, 1, 100_000).await.unwrap();
    let keys = crate::ledger::all_chain_keys(store, kek).await.unwrap();
    let stored: Vec<_> = rows.iter().map(crate::ledger::from_row).collect();
    let anchor = caracal_audit::chain::Anchor {
        after: None,
        at_least: 0,
    };
    assert_eq!(
        caracal_audit::chain::verify(zone, &stored, &keys, anchor),
        Vec::new(),
        "{zone} verifies"
    );
    let sequence: Vec<i64> = rows.iter().map(|row| row.chain_seq).collect();
    assert_eq!(sequence, (1..=rows.len() as i64).collect::<Vec<_>>());
    rows.into_iter().map(|row| row.id).collect()
}

fn in_zone(n: usize) -> Event {
    Event {
        zone_id: if n.is_multiple_of(2) {
            "zone-a"
        } else {
            "zone-b"
        }
        .into(),
        ..event(n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_direct_ledger_events_reach_their_zone_chains_and_not_the_stream() {
    let fixture = Fixture::new(Duration::ZERO);
    let (store, kek, evidence, tasks) = start_on_a_ledger(&fixture);
    record_concurrently(&evidence, (0..300).map(in_zone)).await;
    // Answered "recorded" means stored: checked before shutdown flushes anything.
    let a = verified_chain(store.as_ref(), &kek, "zone-a").await;
    let b = verified_chain(store.as_ref(), &kek, "zone-b").await;
    assert_eq!((a.len(), b.len()), (150, 150));
    let all: Vec<Event> = (0..300).map(in_zone).collect();
    let stored: std::collections::BTreeSet<String> = a.into_iter().chain(b).collect();
    assert_eq!(stored, ids(&all));
    assert_eq!(evidence.metrics().ingest.ingested_total.get(), 300);
    tasks.shutdown().await;
    assert!(
        fixture.stream_events().await.is_empty(),
        "nothing took the stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_outage_spills_and_the_replay_reaches_the_chain_once() {
    let fixture = Fixture::new(Duration::ZERO);
    let switch = Arc::new(crate::test_support::SwitchableStore {
        inner: SqliteStore::open(&fixture.directory.path().join("ledger.db")).unwrap(),
        down: AtomicBool::new(false),
    });
    let store: Arc<dyn Store> = switch.clone();
    let kek = caracal_crypto::Kek::generate().unwrap();
    let (evidence, tasks) = start_direct(&fixture, Arc::clone(&store), &kek);
    evidence.record(event(0)).await.unwrap();
    switch.down.store(true, Ordering::SeqCst);
    for n in 1..20 {
        evidence.record(event(n)).await.unwrap();
    }
    assert!(!evidence.is_lost());
    assert_eq!(evidence.metrics().spilled_total.get(), 19);
    switch.down.store(false, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while store.audit_range("zone-1", 1, 100).await.unwrap().len() < 20
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tasks.shutdown().await;
    let stored = verified_chain(store.as_ref(), &kek, "zone-1").await;
    assert_eq!(stored.len(), 20, "every event once");
    assert_eq!(
        stored
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>(),
        ids(&(0..20).map(event).collect::<Vec<_>>())
    );
    assert!(fixture.stream_events().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_ledger_would_refuse_goes_through_the_stream_to_be_dead_lettered() {
    let fixture = Fixture::new(Duration::ZERO);
    let (store, _, evidence, tasks) = start_on_a_ledger(&fixture);
    let unnamed = Event {
        decision: String::new(),
        ..event(1)
    };
    evidence.record(unnamed.clone()).await.unwrap();
    tasks.shutdown().await;
    let entries = fixture
        .bus
        .range(stream_names::AUDIT_EVENTS, None, 10)
        .await
        .unwrap();
    let sent: Vec<Event> = entries
        .iter()
        .map(|entry| serde_json::from_str(&entry.fields["data"]).unwrap())
        .collect();
    assert_eq!(
        sent,
        vec![unnamed],
        "the ingestor reads it, and dead-letters it"
    );
    assert!(store.audit_range("zone-1", 1, 10).await.unwrap().is_empty());
}
