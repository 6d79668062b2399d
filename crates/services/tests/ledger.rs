//! The audit ledger end to end on both stores: events recorded through the producer are
//! ingested into a contiguous, verifiable chain, once each; bad entries are dead-lettered with
//! their reason; and tampering done to the stored rows by hand is found by the sweep, by kind.
//! PostgreSQL is required (see the store conformance suite for the opt-out rules).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test that cannot proceed should stop loudly"
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use caracal_audit::Event;
use caracal_audit::chain::{FindingKind, content_hash};
use caracal_bus::signature::StreamKey;
use caracal_bus::{
    Consumer, ConsumerConfig, EmbeddedBus, Producer, Streams, dead_letter_stream, stream_names,
};
use caracal_crypto::{Kek, hex};
use caracal_services::evidence::{Evidence, EvidenceConfig};
use caracal_services::ledger::INITIAL_CHAIN_KEY_ID;
use caracal_services::ledger::ingest::{GROUP, IngestMetrics, Ingestor};
use caracal_services::ledger::sweep::{SweepMetrics, Sweeper};
use caracal_store::db::{Db, Value};
use caracal_store::{PgOptions, PgStore, SqliteStore, Store};

struct Ledger {
    store: Arc<dyn Store>,
    db: Arc<dyn Db>,
    bus: Arc<EmbeddedBus>,
    kek: Kek,
    key: StreamKey,
    schema: Option<String>,
    _directory: tempfile::TempDir,
}

impl Ledger {
    async fn sqlite() -> Ledger {
        let directory = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&directory.path().join("store.db")).unwrap();
        Ledger {
            store: Arc::new(store.clone()),
            db: Arc::new(store.clone()),
            bus: Arc::new(EmbeddedBus::new(store)),
            kek: Kek::generate().unwrap(),
            key: StreamKey::new(b"stream key"),
            schema: None,
            _directory: directory,
        }
    }

    async fn postgres() -> Option<Ledger> {
        let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
        let opted_out = std::env::var("CARACAL_TEST_SKIP_EXTERNAL").is_ok_and(|value| value == "1");
        assert!(
            !(in_ci && opted_out),
            "CARACAL_TEST_SKIP_EXTERNAL is refused when CI=true"
        );
        if opted_out {
            return None;
        }
        let directory = tempfile::tempdir().unwrap();
        let schema = format!("test_{}", uuid::Uuid::now_v7().simple());
        let options = PgOptions {
            pool_size: 4,
            schema: Some(schema.clone()),
            ..PgOptions::default()
        };
        let store = PgStore::connect("postgres://postgres@127.0.0.1:5432/test", &options)
            .await
            .expect("PostgreSQL at 127.0.0.1:5432 is required");
        // The bus is embedded either way: what is under test here is the store.
        let bus_store = SqliteStore::open(&directory.path().join("bus.db")).unwrap();
        Some(Ledger {
            store: Arc::new(store.clone()),
            db: Arc::new(store),
            bus: Arc::new(EmbeddedBus::new(bus_store)),
            kek: Kek::generate().unwrap(),
            key: StreamKey::new(b"stream key"),
            schema: Some(schema),
            _directory: directory,
        })
    }

    async fn cleanup(self) {
        if let Some(schema) = &self.schema {
            let (client, connection) = tokio_postgres::connect(
                "postgres://postgres@127.0.0.1:5432/test",
                tokio_postgres::NoTls,
            )
            .await
            .unwrap();
            tokio::spawn(connection);
            client
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await
                .unwrap();
        }
    }

    async fn ingestor(&self) -> Ingestor {
        self.ingestor_with(Duration::from_secs(30)).await
    }

    /// An ingestor whose consumer takes over entries pending longer than `reclaim_idle`.
    async fn ingestor_with(&self, reclaim_idle: Duration) -> Ingestor {
        let consumer = Consumer::start(
            self.bus.clone(),
            self.key.clone(),
            ConsumerConfig {
                stream: stream_names::AUDIT_EVENTS.into(),
                group: GROUP.into(),
                consumer: "audit-test".into(),
                batch: 64,
                block: Duration::from_millis(20),
                reclaim_idle,
                max_deliveries: 8,
                dedupe_window: 10_000,
            },
        )
        .await
        .unwrap();
        Ingestor::new(
            Arc::clone(&self.store),
            consumer,
            self.kek.clone(),
            Arc::new(IngestMetrics::default()),
        )
    }

    fn sweeper(&self) -> Sweeper {
        Sweeper::new(
            Arc::clone(&self.store),
            self.kek.clone(),
            Arc::new(SweepMetrics::default()),
        )
    }

    /// Events straight through the producer, as a role records them.
    async fn record(&self, events: Vec<Event>) {
        let directory = tempfile::tempdir().unwrap();
        let (evidence, tasks) = Evidence::start(
            Producer::new(self.bus.clone(), self.key.clone()),
            EvidenceConfig::new(directory.path().join("replay")),
        )
        .unwrap();
        for event in events {
            evidence.record(event).await.unwrap();
        }
        tasks.shutdown().await;
    }

    /// Ingests until the stream is drained, the way the Audit role does (pipelined).
    async fn ingest_all(&self, ingestor: &Ingestor) {
        ingestor.ingest_while(|_| true).await.unwrap();
    }
}

fn event(zone: &str, n: usize) -> Event {
    Event {
        id: format!("{zone}-ev-{n}"),
        zone_id: zone.to_owned(),
        event_type: "gateway.request".into(),
        request_id: format!("req-{n}"),
        decision: if n.is_multiple_of(4) { "deny" } else { "allow" }.into(),
        policy_set_id: Some("set-1".into()),
        policy_set_version_id: Some("set-1-v1".into()),
        manifest_sha: None,
        evaluation_status: "complete".into(),
        determining_policies_json: serde_json::json!([{"id": "baseline"}]),
        diagnostics_json: serde_json::json!([{"code": "scope_allowed"}]),
        metadata_json: serde_json::json!({"resource": "resource://crm", "n": n}),
        occurred_at_ms: 1_760_000_000_000 + n as i64,
    }
}

macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let ledger = super::Ledger::sqlite().await;
                    super::$case(&ledger).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(ledger) = super::Ledger::postgres().await {
                        super::$case(&ledger).await;
                        ledger.cleanup().await;
                    }
                }
            )*
        }
    };
}

on_both_stores!(
    recorded_events_form_one_verifiable_chain_per_zone_once_each,
    bad_entries_are_dead_lettered_with_their_reason,
    the_sweep_reports_every_kind_of_tampering_by_kind,
    a_key_rotation_takes_effect_at_once_and_old_rows_keep_verifying,
    an_ingestor_killed_mid_load_loses_and_doubles_nothing,
    retention_drops_old_rows_and_the_rest_stays_verifiable,
    a_zone_the_store_refuses_is_dead_lettered_alone,
);

async fn recorded_events_form_one_verifiable_chain_per_zone_once_each(ledger: &Ledger) {
    let ingestor = ledger.ingestor().await;
    let mut events: Vec<Event> = (0..60)
        .map(|n| event(if n % 2 == 0 { "zone-a" } else { "zone-b" }, n))
        .collect();
    // A producer retry after a lost ack: the same events arrive twice.
    events.extend((0..10usize).map(|n| {
        event(
            if n.is_multiple_of(2) {
                "zone-a"
            } else {
                "zone-b"
            },
            n,
        )
    }));
    ledger.record(events).await;
    ledger.ingest_all(&ingestor).await;
    for zone in ["zone-a", "zone-b"] {
        let rows = ledger.store.audit_range(zone, 1, 1000).await.unwrap();
        let sequence: Vec<i64> = rows.iter().map(|row| row.chain_seq).collect();
        assert_eq!(sequence, (1..=30).collect::<Vec<i64>>(), "{zone}");
        assert!(
            rows.iter()
                .all(|row| row.chain_key_id == INITIAL_CHAIN_KEY_ID)
        );
    }
    assert!(
        ledger.sweeper().full().await.unwrap().is_empty(),
        "an untouched ledger sweeps clean"
    );
    assert!(
        ledger
            .store
            .open_tamper_findings()
            .await
            .unwrap()
            .is_empty()
    );
    let pending = ledger
        .bus
        .pending(stream_names::AUDIT_EVENTS, GROUP, 10)
        .await
        .unwrap();
    assert!(pending.is_empty(), "everything stored was acknowledged");
}

async fn bad_entries_are_dead_lettered_with_their_reason(ledger: &Ledger) {
    let ingestor = ledger.ingestor().await;
    let producer = Producer::new(ledger.bus.clone(), ledger.key.clone());
    let fields = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    producer
        .publish(stream_names::AUDIT_EVENTS, fields(&[("id", "x")]))
        .await
        .unwrap();
    producer
        .publish(stream_names::AUDIT_EVENTS, fields(&[("data", "{not json")]))
        .await
        .unwrap();
    producer
        .publish(stream_names::AUDIT_EVENTS, fields(&[("data", r#"{"id":"","zone_id":"z","event_type":"t","request_id":"r","decision":"allow","evaluation_status":"complete","occurred_at_ms":1}"#)]))
        .await
        .unwrap();
    ledger.record(vec![event("zone-a", 1)]).await;
    ledger.ingest_all(&ingestor).await;
    assert_eq!(
        ledger
            .store
            .audit_range("zone-a", 1, 10)
            .await
            .unwrap()
            .len(),
        1,
        "good events still land"
    );
    let dead = dead_letter_stream(stream_names::AUDIT_EVENTS);
    ledger.bus.ensure_group(&dead, "inspect").await.unwrap();
    let letters = ledger
        .bus
        .read_group(&dead, "inspect", "i", 10, Duration::ZERO)
        .await
        .unwrap();
    let reasons: Vec<&str> = letters
        .iter()
        .map(|letter| letter.fields["reason"].as_str())
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert_eq!(reasons[0], "missing_data_field");
    assert!(
        reasons[1].starts_with("invalid_event: audit event is not valid JSON"),
        "{reasons:?}"
    );
    assert_eq!(reasons[2], "invalid_event: audit event field `id` is empty");
}

/// One zone per kind of tampering, each a fresh 10-row chain.
async fn the_sweep_reports_every_kind_of_tampering_by_kind(ledger: &Ledger) {
    let zones = [
        "clean", "edit", "rehash", "delete", "truncate", "reorder", "insert", "mac",
    ];
    let ingestor = ledger.ingestor().await;
    ledger
        .record(
            zones
                .iter()
                .flat_map(|zone| (1..=10).map(move |n| event(zone, n)))
                .collect(),
        )
        .await;
    ledger.ingest_all(&ingestor).await;
    let sweeper = ledger.sweeper();
    assert!(sweeper.full().await.unwrap().is_empty());

    let db = &ledger.db;
    let sql = |text: &'static str, params: Vec<Value>| async move {
        db.change(text, params).await.unwrap()
    };
    sql(
        "UPDATE audit_events SET decision = 'allow-all' WHERE zone_id = $1 AND chain_seq = 5",
        vec!["edit".into()],
    )
    .await;
    let mut edited = ledger
        .store
        .audit_range("rehash", 5, 5)
        .await
        .unwrap()
        .remove(0);
    edited.decision = "allow-all".into();
    let rehashed = hex(&content_hash(
        &caracal_services::ledger::from_row(&edited).content,
    ));
    sql(
        "UPDATE audit_events SET decision = 'allow-all', content_sha256 = $2 WHERE zone_id = $1 AND chain_seq = 5",
        vec!["rehash".into(), rehashed.into()],
    )
    .await;
    sql(
        "DELETE FROM audit_events WHERE zone_id = $1 AND chain_seq = 6",
        vec!["delete".into()],
    )
    .await;
    sql(
        "DELETE FROM audit_events WHERE zone_id = $1 AND chain_seq > 8",
        vec!["truncate".into()],
    )
    .await;
    for (from, to) in [(5, -5), (6, 5), (-5, 6)] {
        sql(
            "UPDATE audit_events SET chain_seq = $3 WHERE zone_id = $1 AND chain_seq = $2",
            vec!["reorder".into(), Value::Int(from), Value::Int(to)],
        )
        .await;
    }
    let last = ledger
        .store
        .audit_range("insert", 10, 10)
        .await
        .unwrap()
        .remove(0);
    let mut forged = last.clone();
    forged.id = "forged".into();
    forged.chain_seq = 11;
    forged.prev_content_sha256 = last.content_sha256.clone();
    forged.chain_mac = "00".repeat(32);
    ledger.store.insert_audit_events(&[forged]).await.unwrap();
    sql(
        "UPDATE audit_events SET chain_mac = $2 WHERE zone_id = $1 AND chain_seq = 3",
        vec!["mac".into(), "11".repeat(32).into()],
    )
    .await;

    // The newest-row deletion is caught against the head seen before; the rest by re-verification.
    let mut findings = sweeper.incremental().await.unwrap();
    findings.extend(sweeper.full().await.unwrap());
    let kinds_of = |zone: &str| {
        let mut kinds: Vec<FindingKind> = findings
            .iter()
            .filter(|f| f.zone_id == zone)
            .map(|f| f.kind)
            .collect();
        kinds.sort();
        kinds.dedup();
        kinds
    };
    for (zone, expected) in [
        ("edit", FindingKind::ContentMismatch),
        ("rehash", FindingKind::MacFailure),
        ("delete", FindingKind::SequenceGap),
        ("truncate", FindingKind::Truncated),
        ("reorder", FindingKind::Reordered),
        ("insert", FindingKind::MacFailure),
        ("mac", FindingKind::MacFailure),
    ] {
        assert!(
            kinds_of(zone).contains(&expected),
            "{zone}: expected {expected:?}, found {:?}",
            kinds_of(zone)
        );
    }
    assert_eq!(kinds_of("clean"), [], "a clean chain never reports");

    // Findings stay open until acknowledged, and an acknowledged finding does not come back.
    let open = ledger.store.open_tamper_findings().await.unwrap();
    assert!(
        open.iter()
            .any(|finding| finding.zone_id == "truncate" && finding.kind == "truncated")
    );
    assert!(
        ledger
            .store
            .acknowledge_tamper_findings("operator", "drill")
            .await
            .unwrap()
            >= 7
    );
    sweeper.full().await.unwrap();
    assert!(
        ledger
            .store
            .open_tamper_findings()
            .await
            .unwrap()
            .is_empty()
    );
}

on_both_stores_checkpoints!(checkpoints_anchor_exports_and_catch_truncation_after_a_restart);

async fn checkpoints_anchor_exports_and_catch_truncation_after_a_restart(ledger: &Ledger) {
    let ingestor = ledger.ingestor().await;
    ledger
        .record((1..=12).map(|n| event("zone-a", n)).collect())
        .await;
    ledger.ingest_all(&ingestor).await;
    let signer = caracal_services::ledger::checkpoint_signer(ledger.store.as_ref(), &ledger.kek)
        .await
        .unwrap();
    let public_key = signer.public_key_hex();
    // The same key comes back from the store on the next start.
    let again = caracal_services::ledger::checkpoint_signer(ledger.store.as_ref(), &ledger.kek)
        .await
        .unwrap();
    assert_eq!(again.public_key_hex(), public_key);
    assert!(
        ledger
            .sweeper()
            .with_checkpoints(signer)
            .full()
            .await
            .unwrap()
            .is_empty()
    );
    let checkpoint = ledger
        .store
        .latest_audit_checkpoint("zone-a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.tree_size, 12);

    let bundle =
        caracal_services::ledger::export_bundle(ledger.store.as_ref(), "zone-a", 4, 9, &|_, _| {})
            .await
            .unwrap();
    let verified = caracal_audit::bundle::verify(&bundle, &public_key).unwrap();
    assert_eq!(
        (verified.first_seq, verified.last_seq, verified.tree_size),
        (4, 9, 12)
    );

    // The newest rows go while no sweeper runs; a fresh sweeper (no memory) still sees it.
    ledger
        .db
        .change(
            "DELETE FROM audit_events WHERE zone_id = $1 AND chain_seq > 10",
            vec!["zone-a".into()],
        )
        .await
        .unwrap();
    let findings = ledger.sweeper().full().await.unwrap();
    assert!(
        findings
            .iter()
            .any(|finding| finding.kind == FindingKind::Truncated && finding.seq == 10),
        "{findings:?}"
    );
}

macro_rules! on_both_stores_checkpoints {
    ($case:ident) => {
        mod checkpoints {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let ledger = super::Ledger::sqlite().await;
                super::$case(&ledger).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(ledger) = super::Ledger::postgres().await {
                    super::$case(&ledger).await;
                    ledger.cleanup().await;
                }
            }
        }
    };
}
use on_both_stores_checkpoints;

async fn a_key_rotation_takes_effect_at_once_and_old_rows_keep_verifying(ledger: &Ledger) {
    let ingestor = ledger.ingestor().await;
    ledger
        .record((1..=5).map(|n| event("zone-a", n)).collect())
        .await;
    ledger.ingest_all(&ingestor).await;
    ledger.store.add_audit_chain_key("chain-2").await.unwrap();
    assert!(
        ledger.store.add_audit_chain_key("chain-2").await.is_err(),
        "a key id is never reused"
    );
    ledger
        .record((6..=9).map(|n| event("zone-a", n)).collect())
        .await;
    ledger.ingest_all(&ingestor).await;
    let keys: Vec<String> = ledger
        .store
        .audit_range("zone-a", 1, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.chain_key_id)
        .collect();
    assert_eq!(keys, [vec!["chain-1"; 5], vec!["chain-2"; 4]].concat());
    assert!(
        ledger.sweeper().full().await.unwrap().is_empty(),
        "old rows verify with their own key"
    );
}

async fn an_ingestor_killed_mid_load_loses_and_doubles_nothing(ledger: &Ledger) {
    ledger
        .record(
            (1..=200usize)
                .map(|n| {
                    event(
                        if n.is_multiple_of(2) {
                            "zone-a"
                        } else {
                            "zone-b"
                        },
                        n,
                    )
                })
                .collect(),
        )
        .await;
    // An ingestor stores a batch, then dies before acknowledging it: the worst moment.
    let consumer = Consumer::start(
        ledger.bus.clone(),
        ledger.key.clone(),
        ConsumerConfig {
            stream: stream_names::AUDIT_EVENTS.into(),
            group: GROUP.into(),
            consumer: "audit-test".into(),
            batch: 64,
            block: Duration::from_millis(20),
            reclaim_idle: Duration::from_millis(100),
            max_deliveries: 8,
            dedupe_window: 10_000,
        },
    )
    .await
    .unwrap();
    let taken = consumer.poll().await.unwrap();
    assert_eq!(taken.len(), 64);
    let events: Vec<Event> = taken
        .iter()
        .map(|entry| Event::parse(entry.fields["data"].as_bytes()).unwrap())
        .collect();
    for zone in ["zone-a", "zone-b"] {
        let mine: Vec<Event> = events
            .iter()
            .filter(|event| event.zone_id == zone)
            .cloned()
            .collect();
        let ids: Vec<String> = mine.iter().map(|event| event.id.clone()).collect();
        let key = caracal_services::ledger::chain_key(&ledger.kek, INITIAL_CHAIN_KEY_ID);
        ledger
            .store
            .append_audit_chain(
                zone,
                &ids,
                caracal_services::ledger::ingest::chain_builder(key, mine),
            )
            .await
            .unwrap();
    }
    drop(consumer);

    // The restarted ingestor takes the orphaned batch over once it is idle, and the rest.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let restarted = ledger.ingestor_with(Duration::from_millis(100)).await;
    ledger.ingest_all(&restarted).await;
    let mut stored = 0;
    for zone in ["zone-a", "zone-b"] {
        let rows = ledger.store.audit_range(zone, 1, 1000).await.unwrap();
        let sequence: Vec<i64> = rows.iter().map(|row| row.chain_seq).collect();
        assert_eq!(
            sequence,
            (1..=100).collect::<Vec<i64>>(),
            "{zone}: contiguous, no duplicates"
        );
        stored += rows.len();
    }
    assert_eq!(stored, 200, "stored == produced");
    assert!(ledger.sweeper().full().await.unwrap().is_empty());
    assert!(
        ledger
            .bus
            .pending(stream_names::AUDIT_EVENTS, GROUP, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn retention_drops_old_rows_and_the_rest_stays_verifiable(ledger: &Ledger) {
    let ingestor = ledger.ingestor().await;
    for zone in ["kept", "cut", "forged", "uncut", "root"] {
        ledger
            .record((1..=12).map(|n| event(zone, n)).collect())
            .await;
    }
    ledger.ingest_all(&ingestor).await;
    let signer = caracal_services::ledger::checkpoint_signer(ledger.store.as_ref(), &ledger.kek)
        .await
        .unwrap();
    let public_key = signer.public_key_hex();

    // A long retention keeps everything.
    let keeping = ledger
        .sweeper()
        .with_checkpoints(
            caracal_services::ledger::checkpoint_signer(ledger.store.as_ref(), &ledger.kek)
                .await
                .unwrap(),
        )
        .with_retention(Duration::from_secs(86_400));
    assert_eq!(keeping.full().await.unwrap(), []);
    assert_eq!(ledger.store.audit_cut("kept").await.unwrap(), None);
    assert_eq!(
        ledger.store.audit_range("kept", 1, 99).await.unwrap().len(),
        12
    );

    // Everything has expired: all but the newest row goes, anchored on the signed checkpoint;
    // but not while a freeze holds.
    let sweeper = ledger
        .sweeper()
        .with_checkpoints(signer)
        .with_retention(Duration::ZERO);
    let freeze = caracal_store::Containment {
        kind: "freeze".into(),
        zone_id: String::new(),
        reason: "tamper investigation".into(),
        actor: "test".into(),
        since_ms: 0,
    };
    ledger.store.set_containment(&freeze, &[]).await.unwrap();
    assert_eq!(sweeper.full().await.unwrap(), []);
    assert_eq!(
        ledger.store.audit_cut("cut").await.unwrap(),
        None,
        "frozen: nothing dropped"
    );
    ledger
        .store
        .clear_containment("freeze", "", &[])
        .await
        .unwrap();
    assert_eq!(sweeper.full().await.unwrap(), []);
    let cut = ledger.store.audit_cut("cut").await.unwrap().unwrap();
    assert_eq!(cut.cut_seq, 11);
    let left: Vec<i64> = ledger
        .store
        .audit_range("cut", 1, 99)
        .await
        .unwrap()
        .iter()
        .map(|row| row.chain_seq)
        .collect();
    assert_eq!(left, [12]);

    // The chain goes on from the kept row; later sweeps, exports and checkpoints still verify.
    ledger
        .record((13..=20).map(|n| event("cut", n)).collect())
        .await;
    ledger.ingest_all(&ingestor).await;
    assert_eq!(sweeper.incremental().await.unwrap(), []);
    assert_eq!(
        ledger.sweeper().full().await.unwrap(),
        [],
        "a fresh sweeper starts at the cut"
    );
    assert_eq!(sweeper.full().await.unwrap(), []);
    assert_eq!(
        ledger
            .store
            .audit_cut("cut")
            .await
            .unwrap()
            .unwrap()
            .cut_seq,
        19
    );
    let checkpoint = ledger
        .store
        .latest_audit_checkpoint("cut")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.tree_size, 20);
    let bundle =
        caracal_services::ledger::export_bundle(ledger.store.as_ref(), "cut", 1, 20, &|_, _| {})
            .await
            .unwrap();
    let verified = caracal_audit::bundle::verify(&bundle, &public_key).unwrap();
    assert_eq!(
        (verified.first_seq, verified.last_seq, verified.tree_size),
        (20, 20, 20)
    );

    // Tampering with what the cut left behind is caught.
    let sql = |statement: &'static str, zone: &'static str| async move {
        ledger
            .db
            .change(statement, vec![zone.into()])
            .await
            .unwrap();
    };
    sql(
        "UPDATE audit_cuts SET last_content_sha256 = substr(frontier, 1, 64) WHERE zone_id = $1",
        "forged",
    )
    .await;
    sql("DELETE FROM audit_cuts WHERE zone_id = $1", "uncut").await;
    sql(
        "UPDATE audit_checkpoints SET root_hash = substr(signature, 1, 64) WHERE zone_id = $1",
        "root",
    )
    .await;
    let findings = ledger.sweeper().full().await.unwrap();
    let kinds_of = |zone: &str| {
        let mut kinds: Vec<FindingKind> = findings
            .iter()
            .filter(|f| f.zone_id == zone)
            .map(|f| f.kind)
            .collect();
        kinds.sort();
        kinds.dedup();
        kinds
    };
    assert!(kinds_of("forged").contains(&FindingKind::MacFailure));
    assert_eq!(kinds_of("uncut"), [FindingKind::SequenceGap]);
    assert_eq!(kinds_of("root"), [FindingKind::CheckpointMismatch]);
    assert_eq!(kinds_of("cut"), []);
}

async fn a_zone_the_store_refuses_is_dead_lettered_alone(ledger: &Ledger) {
    let ingestor = ledger.ingestor().await;
    ledger.record(vec![event("zone-bad", 1)]).await;
    ledger.ingest_all(&ingestor).await;
    // A head the chain cannot link to: appending to this zone is refused (not an outage).
    ledger
        .db
        .change(
            "UPDATE audit_events SET content_sha256 = 'not hex' WHERE zone_id = $1",
            vec!["zone-bad".into()],
        )
        .await
        .unwrap();
    ledger
        .record(vec![
            event("zone-good", 1),
            event("zone-bad", 2),
            event("zone-good", 2),
        ])
        .await;
    ledger.ingest_all(&ingestor).await;
    let good = ledger.store.audit_range("zone-good", 1, 10).await.unwrap();
    assert_eq!(good.len(), 2, "the other zone of the batch is stored");
    assert_eq!(
        ledger
            .store
            .audit_range("zone-bad", 1, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let dead = dead_letter_stream(stream_names::AUDIT_EVENTS);
    ledger.bus.ensure_group(&dead, "inspect").await.unwrap();
    let letters = ledger
        .bus
        .read_group(&dead, "inspect", "i", 10, Duration::ZERO)
        .await
        .unwrap();
    let reasons: Vec<&str> = letters
        .iter()
        .map(|letter| letter.fields["reason"].as_str())
        .collect();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].starts_with("store_rejected: "), "{reasons:?}");
}
